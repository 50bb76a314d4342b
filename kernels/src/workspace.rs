//! Per-thread scratch buffers, kept between calls so a training loop does not allocate a
//! column matrix per layer per step.
//!
//! A buffer is taken out of its thread-local slot for the duration of one use and put back
//! afterwards; a nested use on the same thread (rayon work stealing inside a parallel
//! gemm) finds the slot empty and works on a fresh buffer instead of aliasing.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::im2col::Run;
use super::nested::ForwardPanels;

/// The scratch buffers of one thread.
#[derive(Debug, Default)]
pub struct Workspace<T> {
    /// Column matrix of a tile (forward, weight gradient); the output gradient by
    /// columns (whole-map path).
    pub cols: Vec<T>,
    /// Column-matrix gradient of a tile (input gradient); the input by columns
    /// (whole-map path).
    pub dcols: Vec<T>,
    /// Accumulator of a window's rows over a tile (forward partial sums, backward
    /// running sums of the output gradients); the matrix's gradient (whole-map path).
    pub acc: Vec<T>,
    /// Weight in ring layout (call level), a task's weight-gradient partial, or the
    /// whole-map path's matrix.
    pub weight: Vec<T>,
    /// Shifted running sums of a tile (shifted path, input gradient).
    pub scol: Vec<T>,
    /// Weight rearranged per position (shifted path, input gradient).
    pub wt: Vec<T>,
    /// Runs of the current tile.
    pub runs: Vec<Run>,
    /// Partial sums of parallel tasks (call level), added in task order.
    pub partials: Vec<Vec<T>>,
    /// The last forward call's weight blocks in sgemm's panels, whose buffers the next
    /// call refills (call level).
    pub(crate) panels: Option<ForwardPanels>,
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
        let before = buf.capacity();
        buf.resize(len, T::default());
        let added = (buf.capacity() - before) * std::mem::size_of::<T>();
        RETAINED.fetch_add(added, Ordering::Relaxed);
    }
    &mut buf[..len]
}

/// Bytes of scratch buffers the kernels hold, over all threads.
static RETAINED: AtomicUsize = AtomicUsize::new(0);

/// Bytes of scratch buffers the kernels keep between calls, over all threads (they only
/// grow, to the largest tile or weight seen).
pub fn retained_bytes() -> usize {
    RETAINED.load(Ordering::Relaxed)
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

/// Buffers from this many bytes on are backed by transparent huge pages where the
/// kernel offers them on request (Linux `madvise`): far fewer page faults on the first
/// touch of a large new output.
const HUGE_PAGE_BYTES: usize = 4 << 20;

/// A new zeroed buffer of `len` values (fresh from the allocator: zero pages the first
/// touch maps, huge pages for large buffers on Linux).
pub fn zeroed<T: super::Real>(len: usize) -> Vec<T> {
    let buffer = vec![T::ZERO; len];
    advise_huge_pages(&buffer);
    buffer
}

/// An empty buffer with room for `len` values (huge pages for large ones, as
/// [`zeroed`]); the caller writes all of them before `set_len`.
pub fn uninit<T>(len: usize) -> Vec<T> {
    let buffer = Vec::with_capacity(len);
    advise_huge_pages_raw(buffer.as_ptr() as usize, len * std::mem::size_of::<T>());
    buffer
}

fn advise_huge_pages<T>(buffer: &[T]) {
    advise_huge_pages_raw(buffer.as_ptr() as usize, std::mem::size_of_val(buffer));
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages_raw(_address: usize, _bytes: usize) {}

#[cfg(target_os = "linux")]
fn advise_huge_pages_raw(address: usize, bytes: usize) {
    const MADV_HUGEPAGE: i32 = 14;
    const HUGE: usize = 2 << 20;
    extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    if bytes < HUGE_PAGE_BYTES {
        return;
    }
    let start = address.next_multiple_of(HUGE);
    let end = (address + bytes) / HUGE * HUGE;
    if end > start {
        // SAFETY: [start, end) lies inside the buffer's allocation; the advice changes how
        // the kernel backs those pages, never their contents. A failure (no THP support)
        // is harmless and ignored.
        unsafe {
            madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE);
        }
    }
}

/// `slots` set to `T::default()`, as the initialised slice they now are.
pub(crate) fn zeroed_slots<T: Copy + Default>(slots: &mut [MaybeUninit<T>]) -> &mut [T] {
    slots.fill(MaybeUninit::new(T::default()));
    // SAFETY: every slot of `slots` was just written, and `MaybeUninit<T>` has the size,
    // alignment and layout of `T`, so the slice is a valid `[T]` of the same length,
    // borrowing `slots` mutably for as long as it lives.
    unsafe { &mut *(slots as *mut [MaybeUninit<T>] as *mut [T]) }
}
