//! Per-thread scratch buffers, kept between calls so a training loop does not allocate a
//! column matrix per layer per step.
//!
//! A buffer is taken out of its thread-local slot for the duration of one use and put back
//! afterwards; a nested use on the same thread (rayon work stealing inside a parallel
//! gemm) finds the slot empty and works on a fresh buffer instead of aliasing.

use std::cell::Cell;

use super::im2col::Run;

/// The scratch buffers of one thread.
#[derive(Debug, Default)]
pub struct Workspace<T> {
    /// Column matrix of a tile (forward, weight gradient).
    pub cols: Vec<T>,
    /// Column-matrix gradient of a tile (input gradient).
    pub dcols: Vec<T>,
    /// Accumulator of a window's rows over a tile (forward partial sums, backward
    /// running sums of the output gradients).
    pub acc: Vec<T>,
    /// Weight in ring layout (call level) or a task's weight-gradient partial.
    pub weight: Vec<T>,
    /// Runs of the current tile.
    pub runs: Vec<Run>,
}

/// Which of a thread's workspaces: the calling thread's call-level buffers, or a task's.
#[derive(Debug, Clone, Copy)]
pub enum Slot {
    /// Buffers that live for one kernel call on the calling thread.
    Call = 0,
    /// Buffers of one parallel task.
    Task = 1,
}

/// The thread-local slots of one element type.
pub type Slots<T> = [Cell<Option<Box<Workspace<T>>>>; 2];

/// Grows `buf` to at least `len` values and returns its first `len` (contents
/// unspecified: stale values of an earlier use, or zeros).
pub fn grow<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    &mut buf[..len]
}

/// Runs `f` with this thread's workspace of `slot` (a fresh one when it is in use).
pub fn with<T: super::Real, R>(slot: Slot, f: impl FnOnce(&mut Workspace<T>) -> R) -> R {
    T::slots(|slots| {
        let cell = &slots[slot as usize];
        let mut ws = cell.take().unwrap_or_default();
        let result = f(&mut ws);
        cell.set(Some(ws));
        result
    })
}
