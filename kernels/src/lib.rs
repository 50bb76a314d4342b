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
//! column matrix ordered ring by ring (on small maps, whose rows are a few pixels long,
//! through a table of input offsets and vector gathers), then a matrix
//! product on ring segments: in `f32`
//! on AVX-512 or AVX2 + FMA, the project's own [`sgemm`] (packed panels, register-tiled
//! micro-kernels, bits independent of the thread count), with the forward pass's weight
//! blocks laid out in its panels once per call (once per plan in a [`PackedWeight`]);
//! elsewhere the `gemm` crate burn-flex uses. Threads (rayon) take contiguous ranges of columns, each with its own
//! thread-local [workspace] of one tile; calls with few columns run one task and let
//! gemm split its matrices instead.
//!
//! Two more layouts serve particular shapes: at stride 1, gemm runs straight on shifted
//! views of a padded image (no column matrix; on [`sgemm`] the views are gathered while
//! its operand is packed, one product per ring); a layer with a large weight and too few
//! output columns to fill sgemm's tiles (a fully connected layer as a convolution at a
//! small batch) streams its weight in chunks of primary filters, so the weight is read
//! once per pass.
//!
//! A dense convolution is the same kernel with one ring ([`ConvPlan::dense`]).
//!
//! For inference, [`PackedWeight`] lays a weight out once and [`forward_packed`] writes
//! each output value through an [`Epilogue`] (scale and shift of a folded batch norm,
//! residual add, ReLU) into a caller's buffer. On channels-last activations,
//! [`nhwc::NhwcConv`] reads each output position's pixels in place, and
//! [`winograd::WinogradConv`] runs 3 x 3 stride-1 layers by Winograd's F(2 x 2, 3 x 3)
//! (a versatile layer's 1 x 1 crop as a product of the centre taps). The training passes
//! ([`forward`], [`forward_with_moments`], [`backward`]) run such layers by F(2 x 2, 3 x 3)
//! too, on their channels-first activations, the forward pass and both gradients (see
//! `winograd_nchw.rs`).
//!
//! Everything is generic over [`Real`] (`f32`, the fast path, and `f64`).

#![warn(missing_docs)]

pub mod alloc;
mod epilogue;
mod gather;
mod im2col;
pub mod moments;
mod nested;
pub mod nhwc;
pub mod norm;
pub mod optim;
mod peak;
mod plan;
pub mod pool;
pub mod sgemm;
mod shifted;
mod small_map;
mod streaming;
mod threads;
pub mod trace;
pub mod tuning;
pub mod winograd;
mod winograd_nchw;
pub mod workspace;

use std::cell::Cell;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Mul, Range, Sub};

pub use epilogue::Epilogue;
pub use nested::{
    backward, forward, forward_packed, forward_with_moments, Gradients, Needs, PackedWeight,
};
pub use peak::fma_peak_gflops;
pub use plan::{ConvPlan, PlanError, PlanSpec, Window};
pub use threads::{run_with_polling_threads, threads};

mod sealed {
    /// Only the float types the kernels were written for implement [`super::Real`]
    /// (gemm dispatches on them, and the SIMD transposes assume their layout).
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A float type the kernels run on: `f32` or `f64` (sealed).
pub trait Real:
    sealed::Sealed
    + Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialEq
    + PartialOrd
    + Add<Output = Self>
    + AddAssign
    + Mul<Output = Self>
    + Sub<Output = Self>
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;

    /// The value as an f64 (exact).
    fn to_f64(self) -> f64;

    /// The nearest value to `v`.
    fn from_f64(v: f64) -> Self;

    /// Runs `f` with the thread-local workspace slots of this type.
    fn slots<R>(f: impl FnOnce(&workspace::Slots<Self>) -> R) -> R;

    /// Transposes the first columns of four rows into pixel-major runs:
    /// `out[i * stride + k] = rows[k][i]` for `i` below the returned count (a multiple of
    /// 4, at most the rows' length); the caller does the rest.
    fn transpose_4xn(rows: [&[Self]; 4], out: &mut [Self], stride: usize) -> usize {
        let n = rows.iter().map(|r| r.len()).min().unwrap_or(0) / 4 * 4;
        for i in 0..n {
            for (k, row) in rows.iter().enumerate() {
                out[i * stride + k] = row[i];
            }
        }
        n
    }

    /// Whether [`gather_row`](Self::gather_row) and
    /// [`scatter_add_row`](Self::scatter_add_row) run on vector gathers on this CPU (the
    /// im2col of tiles of short runs goes through them only then).
    fn gathers_fast() -> bool {
        false
    }

    /// One row of a tile's column matrix: `out[j] = x[base + offset_j]`, zero for the
    /// columns that read padding.
    ///
    /// # Panics
    /// If an offset reads outside `x` or `out` is shorter than the row.
    fn gather_row(x: &[Self], base: usize, row: gather::OffsetRow<'_>, out: &mut [Self]) {
        gather::gather_row(x, base, row, out)
    }

    /// One row of a tile's col2im: `dx[base + offset_j] += values[j]` for the columns
    /// that do not read padding.
    ///
    /// # Panics
    /// If an offset writes outside `dx` or `values` is shorter than the row.
    fn scatter_add_row(values: &[Self], dx: &mut [Self], base: usize, row: gather::OffsetRow<'_>) {
        gather::scatter_add_row(values, dx, base, row)
    }

    /// One run of a strided convolution's column matrix: `dst[k] = src[k * stride]`.
    ///
    /// # Panics
    /// If `src` is shorter than the run reads.
    fn copy_strided(src: &[Self], stride: usize, dst: &mut [Self]) {
        gather::copy_strided(src, stride, dst)
    }
}

macro_rules! real {
    ($t:ty, $local:ident $(, $hooks:item)*) => {
        thread_local! {
            static $local: workspace::Slots<$t> = const { [Cell::new(None), Cell::new(None)] };
        }

        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;

            fn to_f64(self) -> f64 {
                f64::from(self)
            }

            fn from_f64(v: f64) -> Self {
                v as $t
            }

            fn slots<R>(f: impl FnOnce(&workspace::Slots<Self>) -> R) -> R {
                $local.with(f)
            }

            $($hooks)*
        }
    };
}

/// The first `cols` pixels of rows `rows` of image `image` of the channels-first `x`
/// (`[c, h, w]` per image) into `dst` pixel-major, row `rows.start + r` from
/// `dst[r * dst_row]` on (`dst[r * dst_row + pixel * c + channel]`): 4 x 4 blocks
/// (channels x pixels) transposed in registers, the edges one by one.
///
/// Four channels at a time, each over all the rows: it reads four planes' rows in order,
/// streams the prefetcher follows, rather than `c` planes a row at a time.
///
/// # Panics
/// If a row is not inside `x`, or `dst` is shorter than the last row's `dst_row * r +
/// cols * c`.
pub(crate) fn rows_to_pixel_major<T: Real>(
    x: &[T],
    [c, h, w]: [usize; 3],
    (image, rows, cols): (usize, Range<usize>, usize),
    (dst, dst_row): (&mut [T], usize),
) {
    let plane_row = |ch: usize, y: usize| &x[((image * c + ch) * h + y) * w..][..cols];
    let mut ch = 0;
    while ch + 4 <= c {
        for (r, y) in rows.clone().enumerate() {
            let planes = [
                plane_row(ch, y),
                plane_row(ch + 1, y),
                plane_row(ch + 2, y),
                plane_row(ch + 3, y),
            ];
            let out = &mut dst[r * dst_row + ch..];
            let done = T::transpose_4xn(planes, out, c);
            for px in done..cols {
                for (k, plane) in planes.iter().enumerate() {
                    out[px * c + k] = plane[px];
                }
            }
        }
        ch += 4;
    }
    for ch in ch..c {
        for (r, y) in rows.clone().enumerate() {
            for (px, &v) in plane_row(ch, y).iter().enumerate() {
                dst[r * dst_row + px * c + ch] = v;
            }
        }
    }
}

mod transpose {
    /// `f32` 4 x 4 transposes with SSE (every x86-64 CPU has it).
    #[cfg(target_arch = "x86_64")]
    pub fn f32_4xn(rows: [&[f32]; 4], out: &mut [f32], stride: usize) -> usize {
        use std::arch::x86_64::*;
        let n = rows.iter().map(|r| r.len()).min().unwrap_or(0) / 4 * 4;
        if n == 0 {
            return 0;
        }
        let last = (n - 1).checked_mul(stride).and_then(|v| v.checked_add(4));
        assert!(
            stride >= 4 && last.is_some_and(|last| out.len() >= last),
            "transpose_4xn bounds"
        );
        let mut i = 0;
        while i < n {
            // SAFETY: SSE is part of x86-64; the four loads read rows[k][i..i + 4] with
            // i + 4 <= n <= rows[k].len(); the four stores write out[(i + j) * stride..+4]
            // with (i + 3) * stride + 4 <= out.len() (asserted above). Unaligned loads and
            // stores throughout.
            unsafe {
                let r0 = _mm_loadu_ps(rows[0].as_ptr().add(i));
                let r1 = _mm_loadu_ps(rows[1].as_ptr().add(i));
                let r2 = _mm_loadu_ps(rows[2].as_ptr().add(i));
                let r3 = _mm_loadu_ps(rows[3].as_ptr().add(i));
                let t0 = _mm_unpacklo_ps(r0, r1);
                let t1 = _mm_unpacklo_ps(r2, r3);
                let t2 = _mm_unpackhi_ps(r0, r1);
                let t3 = _mm_unpackhi_ps(r2, r3);
                let o = out.as_mut_ptr().add(i * stride);
                _mm_storeu_ps(o, _mm_movelh_ps(t0, t1));
                _mm_storeu_ps(o.add(stride), _mm_movehl_ps(t1, t0));
                _mm_storeu_ps(o.add(2 * stride), _mm_movelh_ps(t2, t3));
                _mm_storeu_ps(o.add(3 * stride), _mm_movehl_ps(t3, t2));
            }
            i += 4;
        }
        n
    }

    /// Portable fallback: the scalar loop.
    #[cfg(not(target_arch = "x86_64"))]
    pub fn f32_4xn(rows: [&[f32]; 4], out: &mut [f32], stride: usize) -> usize {
        let n = rows.iter().map(|r| r.len()).min().unwrap_or(0) / 4 * 4;
        for i in 0..n {
            for (k, row) in rows.iter().enumerate() {
                out[i * stride + k] = row[i];
            }
        }
        n
    }
}

real!(
    f32,
    SLOTS_F32,
    fn transpose_4xn(rows: [&[Self]; 4], out: &mut [Self], stride: usize) -> usize {
        transpose::f32_4xn(rows, out, stride)
    },
    fn gathers_fast() -> bool {
        gather::f32_rows_vectorized()
    },
    fn gather_row(x: &[Self], base: usize, row: gather::OffsetRow<'_>, out: &mut [Self]) {
        gather::gather_row_f32(x, base, row, out)
    },
    fn scatter_add_row(values: &[Self], dx: &mut [Self], base: usize, row: gather::OffsetRow<'_>) {
        gather::scatter_add_row_f32(values, dx, base, row)
    },
    fn copy_strided(src: &[Self], stride: usize, dst: &mut [Self]) {
        gather::copy_strided_f32(src, stride, dst)
    }
);
real!(f64, SLOTS_F64);

/// Measures the single-precision multiply-add throughput of this machine: the median
/// GFLOP/s (2 per multiply-add) of `reps` square SGEMMs of side `size` on all threads,
/// through the same matrix product the kernels use ([`sgemm::matmul`]).
///
/// # Panics
/// If `size * size` overflows.
pub fn sgemm_gflops(size: usize, reps: usize) -> f64 {
    let len = size
        .checked_mul(size)
        .expect("sgemm_gflops: size * size overflows");
    let a = vec![1.0f32; len];
    let b = vec![0.5f32; len];
    let mut c = vec![0.0f32; len];
    let mut times: Vec<f64> = (0..reps.max(1) + 1)
        .map(|_| {
            let start = std::time::Instant::now();
            sgemm::matmul([size, size, size], &a, &b, &mut c);
            start.elapsed().as_secs_f64()
        })
        .skip(1)
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    2.0 * (size as f64).powi(3) / median / 1e9
}
