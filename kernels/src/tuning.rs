//! The kernels' work split ([`Tuning`]): which layout runs a call, the tile width, the
//! smallest parallel task and how the shifted path pads. The defaults are what the
//! benchmarks chose; tests (small tiles exercise tile boundaries on small inputs) and
//! tuning benchmarks change them.
//!
//! A plan takes its tuning when it is made, from the calling thread's setting
//! ([`current`], changed for a scope by [`scoped`]), or explicitly with
//! [`ConvPlan::with_tuning`](super::ConvPlan::with_tuning). Nothing is process-wide, so
//! tests running in parallel in one binary cannot change each other's paths; which path
//! actually ran is reported by [`super::trace`].

use std::cell::Cell;

/// Target size of one tile's column matrix, in values (f32: 512 KiB, half an L2 here).
pub const TILE_VALUES: usize = 128 * 1024;
/// Default fewest output columns a parallel task gets; below, one task runs and gemm
/// splits its matrices over the threads instead.
pub const MIN_TASK_COLUMNS: usize = 256;
/// Default size from which the shifted forward pads a band of rows per tile instead of
/// the whole image: a band stays in the cache where a large image would not (measured:
/// a 13 MB image's copy was an eighth of its layer, and a band is faster from about
/// 3 MB on, slower below, where the bands' overlapping rows are copied for nothing).
pub const BAND_BYTES: usize = 2 << 20;

/// How the kernels lay out a convolution for gemm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// Shifted views where they suit the plan (stride 1, few junk columns, windows of 16
    /// channels or more), weight streaming for large weights on few columns, im2col
    /// elsewhere.
    #[default]
    Auto,
    /// im2col tiles everywhere.
    Im2col,
    /// Shifted views wherever the stride is 1, im2col elsewhere.
    Shifted,
    /// Weight streaming wherever one window covers the weight (all columns in one tile,
    /// whatever their number), im2col elsewhere.
    Stream,
}

/// The work split of a kernel call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuning {
    /// Which layout runs the call.
    pub strategy: Strategy,
    /// Output columns per tile (`None`: sized from [`TILE_VALUES`]).
    pub tile_columns: Option<usize>,
    /// The fewest output columns a parallel task gets.
    pub min_task_columns: usize,
    /// Padded images larger than this many bytes are padded a band of rows per tile
    /// (shifted forward path), smaller ones whole.
    pub band_bytes: usize,
}

impl Tuning {
    /// What the benchmarks chose.
    pub const DEFAULT: Self = Self {
        strategy: Strategy::Auto,
        tile_columns: None,
        min_task_columns: MIN_TASK_COLUMNS,
        band_bytes: BAND_BYTES,
    };
}

impl Default for Tuning {
    fn default() -> Self {
        Self::DEFAULT
    }
}

thread_local! {
    static CURRENT: Cell<Tuning> = const { Cell::new(Tuning::DEFAULT) };
}

/// The tuning plans made on this thread take.
pub fn current() -> Tuning {
    CURRENT.with(Cell::get)
}

/// Sets the tuning of the plans made on this thread until the returned guard is dropped
/// (then the previous setting returns).
#[must_use = "the setting lasts as long as the guard"]
pub fn scoped(tuning: Tuning) -> TuningGuard {
    TuningGuard {
        previous: CURRENT.with(|c| c.replace(tuning)),
        _not_send: std::marker::PhantomData,
    }
}

/// Restores the calling thread's previous [`Tuning`] when dropped (see [`scoped`]).
#[derive(Debug)]
pub struct TuningGuard {
    previous: Tuning,
    // The guard restores a thread-local, so it must be dropped on its own thread.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for TuningGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}
