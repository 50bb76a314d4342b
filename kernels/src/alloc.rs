//! A global allocator wrapper that counts heap bytes in use and their high-water mark,
//! for memory reports (`versatile bench --memory`, the training step's peak), and the
//! tuning of glibc's allocator for a training loop ([`retain_freed_memory`]). They live
//! here, beside the other `unsafe` code, so that the CLI uses them without any.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: CountingAllocator<std::alloc::System> = CountingAllocator(std::alloc::System);
//! ```

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Forwards every call to the allocator it wraps and counts the bytes; two relaxed
/// atomics per call. The counts are process-wide: install it once, as the global
/// allocator.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAllocator<A>(pub A);

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the wrapped allocator with the caller's arguments
// unchanged and returns its result unchanged, so the wrapped allocator's guarantees hold;
// the counters are plain atomics that no allocation depends on.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAllocator<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        let ptr = unsafe { self.0.alloc(layout) };
        if !ptr.is_null() {
            count_alloc(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { self.0.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count_alloc(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from the wrapped one, with
        // `layout` (the caller's contract).
        unsafe { self.0.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and `new_size` meets `realloc`'s contract.
        let new = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
            count_alloc(new_size);
        }
        new
    }
}

fn count_alloc(size: usize) {
    let now = IN_USE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// Heap bytes in use now (0 unless a [`CountingAllocator`] is the global allocator).
pub fn heap_in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// Resets the high-water mark to the bytes in use now.
pub fn reset_heap_peak() {
    PEAK.store(heap_in_use(), Ordering::Relaxed);
}

/// The most heap bytes in use at once since the last [`reset_heap_peak`].
pub fn heap_peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Makes glibc's `malloc` keep the memory a training step frees for the next step,
/// instead of handing it back to the kernel and faulting it in again as fresh zeroed
/// pages (by default it trims the heap top and serves large blocks by `mmap`; the page
/// clearing was 11-29 % of a training step's profile). Settings: blocks up to 32 MiB (the
/// most glibc allows) from the heap, trim the top only above 1 GiB free, grow the heap
/// 64 MiB at a time. Returns whether they took; `false` off glibc, where this does nothing.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let settings = [
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
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        assert!(super::retain_freed_memory());
        let block = vec![1u8; 40 << 20];
        assert_eq!(block.iter().map(|&b| b as usize).sum::<usize>(), 40 << 20);
    }
}
