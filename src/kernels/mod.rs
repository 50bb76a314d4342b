//! CPU kernels of the nested evaluation (SPEC section 2), on plain host slices.
//!
//! One primary filter yields all its secondary outputs for the multiply-adds of the
//! largest one: the kernel positions are summed ring by ring from the centre outwards
//! and the partial sum is emitted after each ring (crop `i` is rings `i..s`). Backwards,
//! the running sums `S_r = sum_{i <= r} G_i` of the output gradients drive the weight
//! gradient (`dW_r = S_r X_r^T`) and the input gradient (`dX_r = W_r^T S_r`, then col2im)
//! of each ring.
//!
//! The work is im2col on tiles of output columns (`batch * out_h * out_w` flattened), the
//! column matrix ordered ring by ring, then gemm (the `gemm` crate burn-flex uses, with
//! its AVX-512 kernels where burn's `x86-v4` feature is on and the CPU has them) on ring
//! segments. Threads (rayon) take contiguous ranges of columns, each with its own
//! thread-local [workspace] of one tile; calls with few columns run one task and let
//! gemm split its matrices instead.
//!
//! A dense convolution is the same kernel with one ring ([`ConvPlan::dense`]).
//!
//! Everything is generic over [`Real`] (`f32`, the fast path, and `f64`).

mod im2col;
mod nested;
mod plan;
mod shifted;
pub mod tuning;
pub mod workspace;

use std::cell::Cell;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Mul};

pub use nested::{backward, forward, Gradients, Needs};
pub use plan::{ConvPlan, Window};

/// A float type the kernels run on.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialEq
    + Add<Output = Self>
    + AddAssign
    + Mul<Output = Self>
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;

    /// Runs `f` with the thread-local workspace slots of this type.
    fn slots<R>(f: impl FnOnce(&workspace::Slots<Self>) -> R) -> R;
}

macro_rules! real {
    ($t:ty, $local:ident) => {
        thread_local! {
            static $local: workspace::Slots<$t> = const { [Cell::new(None), Cell::new(None)] };
        }

        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;

            fn slots<R>(f: impl FnOnce(&workspace::Slots<Self>) -> R) -> R {
                $local.with(f)
            }
        }
    };
}

real!(f32, SLOTS_F32);
real!(f64, SLOTS_F64);

/// Threads the kernels use: rayon's pool size.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Measures the single-precision multiply-add throughput of this machine: the median
/// GFLOP/s (2 per multiply-add) of `reps` square SGEMMs of side `size` on all threads,
/// through the same gemm crate the kernels use.
pub fn sgemm_gflops(size: usize, reps: usize) -> f64 {
    let a = vec![1.0f32; size * size];
    let b = vec![0.5f32; size * size];
    let mut c = vec![0.0f32; size * size];
    let mut times: Vec<f64> = (0..reps.max(1) + 1)
        .map(|_| {
            let start = std::time::Instant::now();
            // SAFETY: all three matrices are size x size, row-major, in bounds.
            unsafe {
                gemm::gemm(
                    size,
                    size,
                    size,
                    c.as_mut_ptr(),
                    1,
                    size as isize,
                    false,
                    a.as_ptr(),
                    1,
                    size as isize,
                    b.as_ptr(),
                    1,
                    size as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads()),
                );
            }
            start.elapsed().as_secs_f64()
        })
        .skip(1)
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    2.0 * (size as f64).powi(3) / median / 1e9
}
