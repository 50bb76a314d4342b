//! A global allocator wrapper that counts heap bytes in use and their high-water mark,
//! for memory reports (`versatile bench --memory`, the training step's peak). It lives
//! here, beside the other `unsafe` code, so that the CLI installs it without any.
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
