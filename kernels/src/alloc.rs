//! A global allocator wrapper that counts heap bytes in use and their high-water mark,
//! for memory reports (`versatile bench --memory`, the training step's peak), and the
//! tuning of glibc's allocator for a training loop ([`retain_freed_memory`]). They live
//! here, beside the other `unsafe` code, so that the CLI uses them without any. And
//! storage aligned to cache lines ([`LineAligned`]).
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: CountingAllocator<std::alloc::System> = CountingAllocator(std::alloc::System);
//! ```

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

/// 64 bytes, so that what is stored in them starts on a cache line.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [f32; 16]);

/// `f32` values on storage that starts on a cache line, for a weight or an activation
/// that a micro-kernel reads or writes a vector at a time: a plain `Vec<f32>` of this
/// size is only 16-byte aligned, and where it starts off a line every 64-byte access
/// straddles two lines
/// (ResNet-50's 3 x 3 64 -> 64 layer at 56 x 56 channels-last: 0.92 -> 0.82 ms with its
/// weight's panels aligned).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LineAligned {
    lines: Vec<Line>,
    len: usize,
}

impl LineAligned {
    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        Self {
            lines: vec![Line::default(); len.div_ceil(16)],
            len,
        }
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The values.
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` over `[f32; 16]` with no padding (64 bytes, its
        // alignment), so the lines are `16 * lines.len() >= len` contiguous, initialised
        // `f32`s, borrowed with `self`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    /// The values, to write.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, borrowed mutably with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// Forwards every call to the allocator it wraps and counts the bytes. The counts are
/// process-wide: install it once, as the global allocator.
///
/// Each thread holds back its small changes until they add up to [`THREAD_SLACK`] bytes
/// either way, and passes larger ones on at once: shared atomics on every call, from two
/// threads allocating at a training step's rate, were 3.7 % of a vgg_small step (the
/// cache line moving between cores). So the counts may lag the truth by less than
/// `THREAD_SLACK` bytes per thread, and a thread that exits takes its held-back bytes
/// with it.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAllocator<A>(pub A);

/// See [`CountingAllocator`].
pub const THREAD_SLACK: usize = 32 << 10;

/// Signed: a thread may free what another's held-back count still holds.
static IN_USE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's bytes allocated less freed, not yet in [`IN_USE`].
    static HELD_BACK: Cell<isize> = const { Cell::new(0) };
}

// SAFETY: every method forwards to the wrapped allocator with the caller's arguments
// unchanged and returns its result unchanged, so the wrapped allocator's guarantees hold;
// the counters are plain atomics that no allocation depends on.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAllocator<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        let ptr = unsafe { self.0.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { self.0.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from the wrapped one, with
        // `layout` (the caller's contract).
        unsafe { self.0.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and `new_size` meets `realloc`'s contract.
        let new = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        new
    }
}

/// Counts `delta` bytes allocated (freed where negative): held back in this thread while
/// it and the thread's total stay under [`THREAD_SLACK`], else passed on with the total.
fn count(delta: isize) {
    let slack = THREAD_SLACK as isize;
    let pass_on = HELD_BACK
        .try_with(|held| {
            let total = held.get() + delta;
            if delta.abs() < slack && total.abs() < slack {
                held.set(total);
                0
            } else {
                held.set(0);
                total
            }
        })
        // The thread's storage is gone (it is exiting): count directly.
        .unwrap_or(delta);
    if pass_on != 0 {
        let now = IN_USE.fetch_add(pass_on, Ordering::Relaxed) + pass_on;
        if pass_on > 0 {
            PEAK.fetch_max(now.max(0) as usize, Ordering::Relaxed);
        }
    }
}

/// Heap bytes in use now (0 unless a [`CountingAllocator`] is the global allocator),
/// within [`THREAD_SLACK`] bytes per thread.
pub fn heap_in_use() -> usize {
    IN_USE.load(Ordering::Relaxed).max(0) as usize
}

/// Resets the high-water mark to the bytes in use now.
pub fn reset_heap_peak() {
    PEAK.store(heap_in_use(), Ordering::Relaxed);
}

/// The most heap bytes in use at once since the last [`reset_heap_peak`], within
/// [`THREAD_SLACK`] bytes per thread.
pub fn heap_peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Makes glibc's `malloc` keep the memory a training step frees for the next step,
/// instead of handing it back to the kernel and faulting it in again as fresh zeroed
/// pages (by default it trims the heap top and serves large blocks by `mmap`; the page
/// clearing was 11-29 % of a training step's profile). Settings: blocks up to 32 MiB (the
/// most glibc allows) from the heap, trim the top only above 1 GiB free, grow the heap
/// 64 MiB at a time, and one arena for all threads: a step's forward and backward run on
/// different threads, and a second arena would keep its own pad and freed blocks beside
/// the first's (resnet18 dense: the step's resident set 217 -> 292 MiB with two). Returns
/// whether they took; `false` off glibc, where this does nothing.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let settings = [
            (libc::M_ARENA_MAX, 1),
            (libc::M_MMAP_THRESHOLD, 32 << 20),
            (libc::M_TRIM_THRESHOLD, 1 << 30),
            (libc::M_TOP_PAD, 64 << 20),
        ];
        settings.iter().fold(true, |all, &(param, value)| {
            // SAFETY: `mallopt` takes two integers by value and only changes glibc's
            // tuning parameters, under its own arena lock; no memory is passed or
            // returned, and every value here is in the range glibc documents.
            let took = unsafe { libc::mallopt(param, value) } == 1;
            all && took
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length starts on a cache line and holds exactly its values, zeros first.
    #[test]
    fn line_aligned_values_start_on_a_cache_line() {
        for len in [0, 1, 15, 16, 17, 1000, 300_001] {
            let mut values = LineAligned::zeros(len);
            assert_eq!(values.len(), len);
            assert_eq!(values.is_empty(), len == 0);
            assert_eq!(values.as_slice().as_ptr() as usize % 64, 0, "{len} values");
            assert!(values.as_slice().iter().all(|&v| v == 0.0));
            values
                .as_mut_slice()
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = i as f32);
            assert!(values
                .as_slice()
                .iter()
                .enumerate()
                .all(|(i, &v)| v == i as f32));
        }
    }

    /// Small changes wait in the thread until they reach the slack; a large one passes on
    /// with them, and so does a small one that takes the total past the slack. (No other
    /// test counts: the test binary's allocator is not a `CountingAllocator`.)
    #[test]
    fn small_changes_wait_in_the_thread_and_large_ones_pass_on() {
        let slack = THREAD_SLACK as isize;
        let base = heap_in_use();
        count(100);
        count(-40);
        assert_eq!(heap_in_use(), base);
        count(slack);
        assert_eq!(heap_in_use(), base + 60 + THREAD_SLACK);
        assert!(heap_peak() >= heap_in_use());
        reset_heap_peak();
        count(-(slack + 60));
        assert_eq!(heap_in_use(), base);
        assert_eq!(heap_peak(), base + 60 + THREAD_SLACK);
        for _ in 0..4 {
            count(slack / 4);
        }
        assert_eq!(heap_in_use(), base + THREAD_SLACK);
        count(-slack);
        assert_eq!(heap_in_use(), base);
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        assert!(super::retain_freed_memory());
        let block = vec![1u8; 40 << 20];
        assert_eq!(block.iter().map(|&b| b as usize).sum::<usize>(), 40 << 20);
    }
}
