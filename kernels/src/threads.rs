//! The threads the kernels' parallel passes run on: rayon's pool, and a way to keep its
//! threads awake through a run of many short passes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Threads the kernels use: rayon's pool size.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `f` on one of rayon's threads while the pool's other threads, as many as the
/// machine has cores for, poll for its tasks instead of sleeping; returns `f`'s result.
///
/// A network's forward or backward pass is a chain of short parallel passes (ResNet-50 at
/// batch 1: about sixty of 0.1 to 1 ms). An idle rayon thread goes to sleep microseconds
/// after it runs out of work, so each pass's first task is stolen only once the thread has
/// been woken again (a futex wake; on a virtual machine, an interrupt to a halted vCPU),
/// and meanwhile the thread that runs `f` works alone. Here the other threads take tasks
/// the moment they are queued, and yield to the OS when there are none (so an
/// oversubscribed machine still runs whatever else is ready). Which thread runs a task
/// never changes a result: the kernels' splits are fixed.
///
/// From a thread outside the pool, `f` is handed to the pool and the caller waits; the
/// kernels' passes then start on the thread that runs `f` and the others steal from it,
/// instead of each pass being handed over and waited for.
pub fn run_with_polling_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let done = AtomicBool::new(false);
    rayon::scope(|scope| {
        let owner = rayon::current_thread_index();
        for _ in 1..threads().min(cores()) {
            let done = &done;
            scope.spawn(move |_| {
                // The thread running `f` can pick this task up while it waits inside `f`
                // for a task of its own; polling there until `f` ends would never end.
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::thread::yield_now();
                    }
                }
            });
        }
        // Set however `f` ends, a panic included: the scope waits for the pollers.
        let _stop = SetOnDrop(&done);
        f()
    })
}

/// The cores this process may run on, read once (the standard library reads the CPU
/// affinity and the cgroup's quota, files among them, on every call).
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn returns_the_result_and_runs_nested_parallel_work() {
        let sums: Vec<u64> = run_with_polling_threads(|| {
            (0..64u64)
                .map(|round| (0..10_000u64).into_par_iter().map(|i| i * round).sum())
                .collect()
        });
        let expected: Vec<u64> = (0..64u64).map(|round| round * 49_995_000).collect();
        assert_eq!(sums, expected);
    }

    #[test]
    fn a_panic_in_f_reaches_the_caller() {
        // (Were the pollers left polling, the scope would wait for them forever.)
        let caught = std::panic::catch_unwind(|| run_with_polling_threads(|| panic!("inside")));
        assert!(caught.is_err());
    }

    #[test]
    fn works_on_a_pool_of_one_thread_and_from_inside_the_pool() {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let total: u64 = pool.install(|| {
                // Called from a pool thread, and nested.
                run_with_polling_threads(|| {
                    run_with_polling_threads(|| (0..1000u64).into_par_iter().sum::<u64>())
                })
            });
            assert_eq!(total, 499_500);
        }
    }
}
