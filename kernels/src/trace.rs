//! Which kernel layouts ran on this thread, for tests that must know the path they
//! exercised (a kernel call is dispatched on the calling thread, and burn runs a
//! backward pass on the thread that asked for it).

use std::cell::RefCell;

/// Forward or backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pass {
    /// The forward pass.
    Forward,
    /// The backward pass (input and/or weight gradient).
    Backward,
}

/// How a call laid the convolution out for gemm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// im2col tiles.
    Im2col,
    /// Shifted views of a padded image.
    Shifted,
    /// Weight streaming.
    Streaming,
    /// Winograd's F(2 x 2, 3 x 3) on channels-first activations.
    Winograd,
    /// The whole map as one matrix product over the batch (maps of a few pixels).
    WholeMap,
}

/// One kernel call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Executed {
    /// Which pass.
    pub pass: Pass,
    /// Which layout.
    pub layout: Layout,
    /// Parallel tasks the call ran. Backwards, each task but the first adds a partial
    /// sum (weight gradient, or the streaming path's input gradient) into the first's,
    /// in task order.
    pub tasks: usize,
}

thread_local! {
    static LOG: RefCell<Option<Vec<Executed>>> = const { RefCell::new(None) };
}

/// Runs `f` and returns, with its result, the kernel calls it made on this thread.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Vec<Executed>) {
    struct Restore(Option<Vec<Executed>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            LOG.with(|log| {
                let inner = log.replace(outer);
                // An enclosing record sees the inner calls too.
                if let (Some(outer), Some(inner)) = (log.borrow_mut().as_mut(), inner) {
                    outer.extend(inner);
                }
            });
        }
    }
    let restore = Restore(LOG.with(|log| log.replace(Some(Vec::new()))));
    let result = f();
    let calls = LOG.with(|log| log.borrow().clone().unwrap_or_default());
    drop(restore);
    (result, calls)
}

/// Notes a call when a [`record`] is running on this thread.
pub(super) fn note(pass: Pass, layout: Layout, tasks: usize) {
    LOG.with(|log| {
        if let Some(log) = log.borrow_mut().as_mut() {
            log.push(Executed {
                pass,
                layout,
                tasks,
            });
        }
    });
}
