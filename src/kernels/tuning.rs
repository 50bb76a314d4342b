//! Process-wide knobs of the kernels' work split, for tests (small tiles exercise tile
//! boundaries on small inputs) and for tuning benchmarks. The defaults are what the
//! benchmarks chose.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Target size of one tile's column matrix, in values (f32: 512 KiB, half an L2 here).
pub const TILE_VALUES: usize = 128 * 1024;
/// Default fewest output columns a parallel task gets; below, one task runs and gemm
/// splits its matrices over the threads instead.
pub const MIN_TASK_COLUMNS: usize = 256;

/// How the kernels lay out a convolution for gemm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Shifted views where they suit the plan (stride 1, few junk columns, windows of 16
    /// channels or more), im2col elsewhere.
    #[default]
    Auto,
    /// im2col tiles everywhere.
    Im2col,
    /// Shifted views wherever the stride is 1.
    Shifted,
    /// Weight streaming wherever one window covers the weight (all columns in one tile,
    /// whatever their number), im2col elsewhere.
    Stream,
}

static STRATEGY: AtomicUsize = AtomicUsize::new(0);

/// Forces a strategy for every later kernel call of the process.
pub fn set_strategy(strategy: Strategy) {
    let code = match strategy {
        Strategy::Auto => 0,
        Strategy::Im2col => 1,
        Strategy::Shifted => 2,
        Strategy::Stream => 3,
    };
    STRATEGY.store(code, Ordering::Relaxed);
}

/// The strategy in force.
pub fn strategy() -> Strategy {
    match STRATEGY.load(Ordering::Relaxed) {
        1 => Strategy::Im2col,
        2 => Strategy::Shifted,
        3 => Strategy::Stream,
        _ => Strategy::Auto,
    }
}

static TILE_COLUMNS: AtomicUsize = AtomicUsize::new(0);
static MIN_TASK: AtomicUsize = AtomicUsize::new(MIN_TASK_COLUMNS);

/// Fixes the number of output columns per tile (`None`: sized from [`TILE_VALUES`]).
pub fn set_tile_columns(columns: Option<usize>) {
    TILE_COLUMNS.store(columns.unwrap_or(0), Ordering::Relaxed);
}

/// The fixed tile width, if any.
pub fn tile_columns() -> Option<usize> {
    match TILE_COLUMNS.load(Ordering::Relaxed) {
        0 => None,
        columns => Some(columns),
    }
}

/// Sets the fewest output columns a parallel task gets (default [`MIN_TASK_COLUMNS`]).
pub fn set_min_task_columns(columns: usize) {
    MIN_TASK.store(columns, Ordering::Relaxed);
}

/// The fewest output columns a parallel task gets.
pub fn min_task_columns() -> usize {
    MIN_TASK.load(Ordering::Relaxed)
}
