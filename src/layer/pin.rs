//! A setting pinned on the calling thread for a scope: the layer's path switches
//! ([`super::pin_auto_path`], [`super::pin_conv_path`]) are thread-local, so tests
//! running in parallel in one binary cannot change each other's paths.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::thread::LocalKey;

/// Restores the calling thread's previous value of a pinned setting when dropped.
#[must_use = "the pin lasts as long as the guard"]
pub struct PinGuard<T: Copy + 'static> {
    slot: &'static LocalKey<Cell<T>>,
    previous: T,
    // Restores a thread-local, so it must be dropped on its own thread.
    _not_send: PhantomData<*const ()>,
}

impl<T: Copy + 'static> PinGuard<T> {
    /// Sets `slot` to `value` on this thread until the guard is dropped.
    pub(super) fn set(slot: &'static LocalKey<Cell<T>>, value: T) -> Self {
        Self {
            slot,
            previous: slot.with(|cell| cell.replace(value)),
            _not_send: PhantomData,
        }
    }
}

impl<T: Copy + 'static> Drop for PinGuard<T> {
    fn drop(&mut self) {
        self.slot.with(|cell| cell.set(self.previous));
    }
}

impl<T: Copy + fmt::Debug + 'static> fmt::Debug for PinGuard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinGuard")
            .field("previous", &self.previous)
            .finish()
    }
}
