//! What the nested passes share: the ring layout of the weight and the column matrix,
//! the strided gemm call, the pointer tasks write disjoint parts of one buffer through,
//! and the fixed-order sum of per-task partials.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::im2col::segment_rows;
use crate::moments::Moments;
use crate::plan::{ConvPlan, Window};
pub(crate) use crate::sgemm::Finish;
use crate::sgemm::{self, Operand, Panels, Strided};
use crate::workspace;
use crate::Real;

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);

// SAFETY: every user writes a range of the buffer no other task touches (disjoint output
// columns), and the buffer outlives the parallel section.
unsafe impl<T: Send> Send for SharedMut<T> {}

unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn ptr(&self) -> *mut T {
        self.0
    }
}

/// The ring-layout weight from `offset` on, as a gemm operand's pointer; null where the
/// weight was kept as panels only (`ringed` empty: [`super::PackedWeight`] drops the ring
/// layout where its panels serve every product).
///
/// # Panics
/// If `offset` is past a non-empty `ringed`.
pub(crate) fn ring_block<T>(ringed: &[T], offset: usize) -> *const T {
    if ringed.is_empty() {
        std::ptr::null()
    } else {
        ringed[offset..].as_ptr()
    }
}

/// A forward accumulator as the epilogue reads it: value `(p, q)` (primary, column) at
/// `ptr + p * rs + q * cs`. A pointer, not a slice: sgemm's tasks write other parts of
/// the buffer while a finished block is read.
#[derive(Clone, Copy)]
pub(crate) struct Accumulator<T> {
    pub(crate) ptr: *const T,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

// SAFETY: readers read only blocks that are final (sgemm's `finish` contract), which no
// task writes any more, and the buffer outlives the product.
unsafe impl<T: Send> Send for Accumulator<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Accumulator<T> {}

/// Ring offsets shared by the passes: column-matrix segment rows, ring-layout weight
/// offsets and each ring's kernel positions.
pub(crate) struct Layout {
    segment: Vec<usize>,
    weight: Vec<usize>,
    pub(crate) positions: Vec<usize>,
}

impl Layout {
    pub(crate) fn new(plan: &ConvPlan) -> Self {
        let positions: Vec<usize> = plan.rings.iter().map(Vec::len).collect();
        let mut offset = 0;
        let weight = positions
            .iter()
            .map(|&npos| {
                let here = offset;
                offset += plan.primaries * plan.weight_depth * npos;
                here
            })
            .collect();
        Self {
            segment: segment_rows(plan),
            weight,
            positions,
        }
    }

    /// Leading dimension of ring `r`'s weight matrix `[m, depth * npos_r]`.
    pub(crate) fn weight_ld(&self, plan: &ConvPlan, r: usize) -> usize {
        plan.weight_depth * self.positions[r]
    }

    /// Offset of window `w`'s block (its first primary, first weight channel) in ring
    /// `r`'s weight matrix.
    pub(crate) fn weight_block(&self, plan: &ConvPlan, r: usize, w: &Window) -> usize {
        self.weight[r]
            + w.first_primary * self.weight_ld(plan, r)
            + w.weight_offset * self.positions[r]
    }

    /// First column-matrix row of window `w` in ring `r`'s segment.
    pub(crate) fn col_block(&self, r: usize, w: &Window) -> usize {
        self.segment[r] + w.in_offset * self.positions[r]
    }
}

/// Weights from this many values on are transformed by all threads.
pub(crate) const PARALLEL_WEIGHT: usize = 1 << 20;

/// Per ring of the ring layout: its offset, leading dimension and the patch index
/// (`ky * kw + kx`) of each of its positions.
pub(crate) fn ring_columns(plan: &ConvPlan, layout: &Layout) -> Vec<(usize, usize, Vec<usize>)> {
    let kw = plan.kernel[1];
    plan.rings
        .iter()
        .enumerate()
        .map(|(r, ring)| {
            let index = ring.iter().map(|&(ky, kx)| ky * kw + kx).collect();
            (layout.weight[r], layout.weight_ld(plan, r), index)
        })
        .collect()
}

/// Copies the weight `[m, depth, kh, kw]` into ring layout: ring `r` is a row-major
/// `[m, depth * npos_r]` matrix, column `ch * npos_r + pos`. One pass, parallel over
/// primaries for large weights.
pub(crate) fn to_ring_layout<T: Real>(
    plan: &ConvPlan,
    layout: &Layout,
    weight: &[T],
    out: &mut [T],
) {
    let kw = plan.kernel[1];
    let area = plan.kernel[0] * kw;
    let depth = plan.weight_depth;
    let rings = ring_columns(plan, layout);
    let dst = SharedMut(out.as_mut_ptr());
    let primary = |p: usize| {
        let patches = &weight[p * depth * area..(p + 1) * depth * area];
        for (offset, ld, index) in &rings {
            let npos = index.len();
            // SAFETY: primary p's row of ring r, [offset + p * ld, + depth * npos), lies
            // inside the ring layout (len weight_len) and only this call writes it.
            let row =
                unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(offset + p * ld), *ld) };
            for (patch, dst) in patches.chunks_exact(area).zip(row.chunks_exact_mut(npos)) {
                for (d, &i) in dst.iter_mut().zip(index) {
                    *d = patch[i];
                }
            }
        }
    };
    if plan.weight_len() >= PARALLEL_WEIGHT {
        (0..plan.primaries).into_par_iter().for_each(primary);
    } else {
        (0..plan.primaries).for_each(primary);
    }
}

/// Inverse of [`to_ring_layout`]: a new `[m, depth, kh, kw]` weight.
pub(crate) fn from_ring_layout<T: Real>(plan: &ConvPlan, layout: &Layout, ringed: &[T]) -> Vec<T> {
    let kw = plan.kernel[1];
    let area = plan.kernel[0] * kw;
    let depth = plan.weight_depth;
    let rings = ring_columns(plan, layout);
    let len = plan.weight_len();
    let mut out = workspace::uninit(len);
    let primary = |(p, patches): (usize, &mut [MaybeUninit<T>])| {
        for (offset, ld, index) in &rings {
            let row = &ringed[offset + p * ld..offset + (p + 1) * ld];
            for (patch, src) in patches
                .chunks_exact_mut(area)
                .zip(row.chunks_exact(index.len()))
            {
                for (&v, &i) in src.iter().zip(index) {
                    patch[i].write(v);
                }
            }
        }
    };
    let chunk = (depth * area).max(1);
    let spare = &mut out.spare_capacity_mut()[..len];
    if len >= PARALLEL_WEIGHT {
        spare.par_chunks_mut(chunk).enumerate().for_each(primary);
    } else {
        spare.chunks_mut(chunk).enumerate().for_each(primary);
    }
    // SAFETY: the rings partition the kernel positions, so every value of every patch
    // of every primary was written.
    unsafe { out.set_len(len) };
    out
}

/// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]`, all strided; `accumulate` keeps `dst`:
/// the backward passes' products (the forward passes call [`gemm_panels`]). A row-major
/// `lhs` times a column-major `rhs` (a weight gradient: the output gradient times the
/// transposed input) runs on [`sgemm`] where it takes it, the rest on the `gemm` crate:
/// timed call by call in resnet18 training steps, sgemm took 479 against 538 ms (dense)
/// and 256 against 292 (spatial) on the former, 483 against 401 and 251 against 210 on
/// the others (a column-major `lhs`, whose packing transposes it).
///
/// # Safety
/// Every pointer with its strides must address `m x n`, `m x k`, `k x n` valid values, and
/// `dst` must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn gemm<T: Real>(
    [m, n, k]: [usize; 3],
    dst: *mut T,
    [dst_cs, dst_rs]: [usize; 2],
    accumulate: bool,
    lhs: *const T,
    [lhs_cs, lhs_rs]: [usize; 2],
    rhs: *const T,
    [rhs_cs, rhs_rs]: [usize; 2],
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j * dst_cs) = T::ZERO;
                }
            }
        }
        return;
    }
    // SAFETY: forwarded to the caller.
    let on_sgemm = lhs_cs == 1
        && rhs_rs == 1
        && unsafe {
            sgemm_of(
                [m, n, k],
                dst,
                [dst_cs, dst_rs],
                accumulate,
                (lhs, [lhs_cs, lhs_rs], None),
                (rhs, [rhs_cs, rhs_rs], None),
                parallelism,
                None,
            )
        };
    if on_sgemm {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::ONE,
        T::ONE,
        false,
        false,
        false,
        parallelism,
    );
}

/// The threads a gemm call may use under `parallelism` (`Rayon(0)`: all of rayon's).
fn threads_of(parallelism: gemm::Parallelism) -> usize {
    match parallelism {
        gemm::Parallelism::None => 1,
        gemm::Parallelism::Rayon(0) => crate::threads(),
        gemm::Parallelism::Rayon(threads) => threads,
    }
}

/// A gemm operand: the matrix, its `[column, row]` strides and, for `f32`, the same
/// matrix laid out ahead for [`sgemm`] (with the panel row it starts at).
pub(crate) type GemmOperand<'a, T> = (*const T, [usize; 2], Option<(&'a Panels, usize)>);

/// [`sgemm`] on operands of `T`: `false`, and nothing written, where `T` is not `f32` or
/// sgemm declines the product.
///
/// # Safety
/// As [`gemm_panels`].
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_of<T: Real>(
    dims: [usize; 3],
    dst: *mut T,
    [dst_cs, dst_rs]: [usize; 2],
    accumulate: bool,
    (lhs, [lhs_cs, lhs_rs], lhs_panels): GemmOperand<'_, T>,
    (rhs, [rhs_cs, rhs_rs], rhs_panels): GemmOperand<'_, T>,
    parallelism: gemm::Parallelism,
    finish: Option<Finish<'_>>,
) -> bool {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
        return false;
    }
    let strided = |ptr: *const T, rs, cs| Strided {
        ptr: ptr.cast::<f32>(),
        rs,
        cs,
    };
    // SAFETY: T is f32 (checked above), so the casts keep the pointees' type; the
    // caller's promises are sgemm's.
    unsafe {
        sgemm::sgemm(
            dims,
            Strided {
                ptr: dst.cast::<f32>(),
                rs: dst_rs,
                cs: dst_cs,
            },
            accumulate,
            Operand {
                panels: lhs_panels,
                ..Operand::strided(strided(lhs, lhs_rs, lhs_cs))
            },
            Operand {
                panels: rhs_panels,
                ..Operand::strided(strided(rhs, rhs_rs, rhs_cs))
            },
            threads_of(parallelism),
            finish,
        )
    }
}

/// [`gemm`](fn@gemm) on [`sgemm`] where it runs (`f32` on a CPU with a micro-kernel, a product that
/// fills its tiles), with operands that may come laid out ahead in its panels: the
/// forward passes' products. Elsewhere the `gemm` crate on the strided form.
///
/// `finish` is called on blocks that cover `dst` once each as they become final (on
/// sgemm, strip by strip while they are in cache; else once for all of `dst`, after).
///
/// # Safety
/// As [`gemm`](fn@gemm); panels must hold the operand they come with.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_panels<T: Real>(
    [m, n, k]: [usize; 3],
    dst: *mut T,
    [dst_cs, dst_rs]: [usize; 2],
    accumulate: bool,
    (lhs, [lhs_cs, lhs_rs], lhs_panels): GemmOperand<'_, T>,
    (rhs, [rhs_cs, rhs_rs], rhs_panels): GemmOperand<'_, T>,
    parallelism: gemm::Parallelism,
    finish: Option<Finish<'_>>,
) {
    // (Empty products and k = 0 are sgemm's or gemm's to handle.)
    // SAFETY: forwarded to the caller.
    let done = unsafe {
        sgemm_of(
            [m, n, k],
            dst,
            [dst_cs, dst_rs],
            accumulate,
            (lhs, [lhs_cs, lhs_rs], lhs_panels),
            (rhs, [rhs_cs, rhs_rs], rhs_panels),
            parallelism,
            finish,
        )
    };
    if done {
        return;
    }
    assert!(
        !lhs.is_null() && !rhs.is_null(),
        "an operand given as panels only runs on sgemm"
    );
    // SAFETY: forwarded to the caller.
    unsafe {
        gemm(
            [m, n, k],
            dst,
            [dst_cs, dst_rs],
            accumulate,
            lhs,
            [lhs_cs, lhs_rs],
            rhs,
            [rhs_cs, rhs_rs],
            parallelism,
        )
    }
    if let Some(finish) = finish {
        finish([0, m], [0, n]);
    }
}

/// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]` on [`sgemm`] with `lhs` in its panels and
/// `rhs` gathered while packing: element `(p, j)` at `rhs + k_offsets[p] + j`. For a
/// primary-major (unit column stride) `f32` accumulator whose `lhs` panels exist, which
/// [`ForwardPanels`] only do where sgemm runs.
///
/// # Safety
/// `dst` must address `m x n` values (columns unit-stride, rows `dst_rs` apart), the panels
/// must hold `lhs` (`m x k`) from their first row, and `rhs + k_offsets[p] + j` must be a
/// valid value for every `p < k`, `j < n`; `dst` must overlap neither.
///
/// `finish` as for [`gemm_panels`].
///
/// # Panics
/// If `T` is not `f32`, or sgemm declines (no micro-kernel).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_gathered<T: Real>(
    [m, n, k]: [usize; 3],
    (dst, dst_rs): (*mut T, usize),
    accumulate: bool,
    lhs: &Panels,
    (rhs, k_offsets): (*const T, &[usize]),
    parallelism: gemm::Parallelism,
    finish: Option<Finish<'_>>,
) {
    assert!(on_sgemm::<T>(), "a gathered product runs on sgemm only");
    assert_eq!(k_offsets.len(), k, "one offset per k");
    assert!(
        lhs.fits_lhs([m, k]),
        "lhs panels of the product's shape and side"
    );
    let threads = threads_of(parallelism);
    // SAFETY: T is f32 (asserted above); the caller's promises are sgemm's, and the
    // panels' strided form is never read (panels of the lhs width, no transposition:
    // dst has unit column stride).
    let done = unsafe {
        sgemm::sgemm(
            [m, n, k],
            Strided {
                ptr: dst.cast::<f32>(),
                rs: dst_rs,
                cs: 1,
            },
            accumulate,
            Operand {
                strided: Strided {
                    ptr: std::ptr::null(),
                    rs: 0,
                    cs: 0,
                },
                panels: Some((lhs, 0)),
                k_offsets: None,
            },
            Operand {
                strided: Strided {
                    ptr: rhs.cast::<f32>(),
                    rs: 0,
                    cs: 1,
                },
                panels: None,
                k_offsets: Some(k_offsets),
            },
            threads,
            finish,
        )
    };
    assert!(done, "sgemm runs every gathered product");
}

/// The weight blocks the forward pass multiplies, laid out ahead for [`sgemm`] (`f32` on
/// a CPU with a micro-kernel): per window and ring, the block of the ring-layout weight
/// (`rows x depth * npos`, the column matrix's row order) in `lhs` panels. The im2col path
/// multiplies it with the tile's column matrix; the shifted path with the shifted views of
/// the image, gathered while sgemm packs them (one product per ring, not one per kernel
/// position). Made once per forward call, or once for many in a
/// [`super::PackedWeight`]; without it every tile would lay the same blocks out again.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ForwardPanels {
    /// `[window * rings + ring]` (empty panels for an empty window).
    blocks: Vec<Option<Panels>>,
    rings: usize,
    /// The windows they were laid out for.
    windows: Vec<Window>,
}

impl ForwardPanels {
    /// The panels of `ringed` (ring layout of `plan`'s weight); `None` where sgemm does not
    /// run (`f64`, or no micro-kernel).
    pub(crate) fn new<T: Real>(plan: &ConvPlan, layout: &Layout, ringed: &[T]) -> Option<Self> {
        Self::refill(None, plan, layout, ringed)
    }

    /// As [`new`](Self::new), laying the blocks out into the buffers of `reuse` (an
    /// earlier call's panels) where it has them.
    pub(crate) fn refill<T: Real>(
        reuse: Option<Self>,
        plan: &ConvPlan,
        layout: &Layout,
        ringed: &[T],
    ) -> Option<Self> {
        if !on_sgemm::<T>() {
            return None;
        }
        assert_eq!(ringed.len(), plan.weight_len(), "ring-layout weight length");
        let rings = plan.rings_count();
        let jobs: Vec<(usize, usize)> = (0..plan.windows.len())
            .flat_map(|w| (0..rings).map(move |r| (w, r)))
            .collect();
        let mut spare: Vec<Option<Panels>> = reuse.map_or_else(Vec::new, |old| old.blocks);
        spare.resize_with(jobs.len(), || None);
        let block = |(&(w, r), spare): (&(usize, usize), Option<Panels>)| -> Option<Panels> {
            let window = &plan.windows[w];
            if window.rows == 0 {
                return None;
            }
            let depth = plan.window_depth * layout.positions[r];
            let start = layout.weight_block(plan, r, window);
            let ld = layout.weight_ld(plan, r);
            lhs_panels_into(spare, ringed, start, [window.rows, depth], ld)
        };
        let blocks = if plan.weight_len() >= PARALLEL_WEIGHT {
            jobs.par_iter().zip(spare).map(block).collect()
        } else {
            jobs.iter().zip(spare).map(block).collect()
        };
        Some(Self {
            blocks,
            rings,
            windows: plan.windows.clone(),
        })
    }

    /// Whether they hold every block a forward pass of `plan` multiplies (each window
    /// with rows, each ring), so that it needs no other form of the weight.
    pub(crate) fn covers(&self, plan: &ConvPlan) -> bool {
        self.fits(plan)
            && plan.windows.iter().enumerate().all(|(w, window)| {
                window.rows == 0 || (0..self.rings).all(|r| self.get(w, r).is_some())
            })
    }

    /// Whether these panels were laid out for `plan`'s windows.
    pub(crate) fn fits(&self, plan: &ConvPlan) -> bool {
        self.windows == plan.windows && self.rings == plan.rings_count()
    }

    /// The panels of window `w`, ring `r`.
    pub(crate) fn get(&self, w: usize, r: usize) -> Option<&Panels> {
        self.blocks.get(w * self.rings + r).and_then(Option::as_ref)
    }

    /// Bytes of the values.
    pub(crate) fn bytes(&self) -> usize {
        self.blocks.iter().flatten().map(Panels::bytes).sum()
    }
}

/// The matrix `values[start..]` (`rows x k`, rows `ld` apart, unit-stride columns) in the
/// panels [`sgemm`] reads as its `lhs` (`None` where sgemm does not run: `f64`, or no
/// micro-kernel).
///
/// # Panics
/// If the matrix is not inside `values`.
pub(crate) fn lhs_panels<T: Real>(
    values: &[T],
    start: usize,
    dims: [usize; 2],
    ld: usize,
) -> Option<Panels> {
    lhs_panels_into(None, values, start, dims, ld)
}

/// As [`lhs_panels`], into the buffer of `reuse` where given.
///
/// # Panics
/// If the matrix is not inside `values`.
pub(crate) fn lhs_panels_into<T: Real>(
    reuse: Option<Panels>,
    values: &[T],
    start: usize,
    [rows, k]: [usize; 2],
    ld: usize,
) -> Option<Panels> {
    if !on_sgemm::<T>() {
        return None;
    }
    if rows > 0 && k > 0 {
        assert!(
            k <= ld && start + (rows - 1) * ld + k <= values.len(),
            "lhs_panels bounds"
        );
    }
    // SAFETY: T is f32 (checked above); element (i, p) for i < rows, p < k is at
    // start + i * ld + p <= start + (rows - 1) * ld + k - 1, inside the slice.
    unsafe {
        let view = Strided {
            ptr: values.as_ptr().cast::<f32>().add(start),
            rs: ld,
            cs: 1,
        };
        Panels::for_side_into(reuse, view, [rows, k], false)
    }
}

/// The row-major matrix `values[start..][..k * n]` (`k x n`) in the panels [`sgemm`]
/// reads as its `rhs`, for products that multiply it many times (`None` where sgemm does
/// not run: `f64`, or no micro-kernel).
///
/// # Panics
/// If the matrix is not inside `values`.
pub(crate) fn rhs_panels<T: Real>(
    values: &[T],
    start: usize,
    [k, n]: [usize; 2],
) -> Option<Panels> {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
        return None;
    }
    assert!(start + k * n <= values.len(), "rhs_panels bounds");
    // SAFETY: T is f32 (checked above); the transposed view (n x k, rows unit-stride,
    // columns n apart) addresses values[start..start + k * n], inside the slice.
    unsafe {
        let view = Strided {
            ptr: values.as_ptr().cast::<f32>().add(start),
            rs: 1,
            cs: n,
        };
        Panels::for_side(view, [n, k], true)
    }
}

/// Splits `[0, total)` into `parts` nearly equal contiguous ranges.
pub(crate) fn split(total: usize, parts: usize) -> Vec<(usize, usize)> {
    (0..parts)
        .map(|i| (total * i / parts, total * (i + 1) / parts))
        .filter(|(a, b)| b > a)
        .collect()
}

/// What every task reads: the plan, the ring offsets, the input and the ring-layout weight.
pub(crate) type TaskInput<'a, T> = (&'a ConvPlan, &'a Layout, &'a [T], &'a [T]);

/// A forward task's share: its range of columns, the columns per tile, and the gemm
/// parallelism inside it.
pub(crate) type ForwardTiles = ((usize, usize), usize, gemm::Parallelism);

/// Windows of at most this many primaries accumulate pixel-major in the forward pass on
/// the `gemm` crate: its micro-kernel rows then run over the primaries (16 or 32 of them
/// fill its 16-row blocks exactly), with no ragged edge of its 6-wide column blocks.
/// [`sgemm`] wants them primary-major: its 8-row tiles run over the primaries and its
/// 32-wide tiles over the pixels, where pixel-major would leave half of each tile empty
/// for 16 primaries.
pub(crate) const PIXEL_MAJOR_ROWS: usize = 32;

/// Whether `f32`-sized products of `T` run on [`sgemm`]'s micro-kernels.
fn on_sgemm<T: Real>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && sgemm::micro_kernel().is_some()
}

/// Strides `(row, column)` of a forward accumulator of `rows` primaries by `width`
/// pixels, for products of `T`.
pub(crate) fn accumulator_strides<T: Real>(rows: usize, width: usize) -> (usize, usize) {
    if rows <= PIXEL_MAJOR_ROWS && !on_sgemm::<T>() {
        (1, rows)
    } else {
        (width, 1)
    }
}

/// Adds each of `partials` (in their order) into `sum`: `sum[i] + p0[i] + p1[i] + ...`,
/// element by element, the same association whatever the thread count; in parallel over
/// blocks of elements for large sums.
pub(crate) fn add_in_order<T: Real, P: AsRef<[T]> + Sync>(sum: &mut [T], partials: &[P]) {
    if partials.is_empty() {
        return;
    }
    const BLOCK: usize = 1 << 14;
    let add_block = |(b, block): (usize, &mut [T])| {
        for partial in partials {
            add_into(block, &partial.as_ref()[b * BLOCK..b * BLOCK + block.len()]);
        }
    };
    if sum.len() >= PARALLEL_WEIGHT {
        sum.par_chunks_mut(BLOCK).enumerate().for_each(add_block);
    } else {
        sum.chunks_mut(BLOCK).enumerate().for_each(add_block);
    }
}

/// Whether the windows read disjoint input channels that cover all of them (then each
/// column-matrix row of the input gradient is written exactly once).
pub(crate) fn windows_partition_channels(plan: &ConvPlan) -> bool {
    let mut ranges: Vec<(usize, usize)> = plan
        .windows
        .iter()
        .filter(|w| w.rows > 0)
        .map(|w| (w.in_offset, w.in_offset + plan.window_depth))
        .collect();
    ranges.sort_unstable();
    let mut next = 0;
    for (a, b) in ranges {
        if a != next {
            return false;
        }
        next = b;
    }
    next == plan.in_channels
}

/// What a backward task works on besides the [`TaskInput`]: the output gradient, its
/// images `[first, last)`, the input gradient of those images (values `D`: `T`, or not yet
/// written where the task writes each of them once), the weight-gradient buffer (ring
/// layout; `fresh`: its first write overwrites), the tile width and gemm's parallelism.
pub(crate) type BackwardArgs<'a, T, D = T> = (
    &'a [T],
    (usize, usize),
    Option<&'a mut [D]>,
    Option<&'a mut [T]>,
    bool,
    usize,
    gemm::Parallelism,
);

/// The output pixels of a tile as segments `(image, first pixel of the plane, pixels)`,
/// the same for every channel; [`push_segment`] joins those that continue each other.
pub(crate) type TileSegments = Vec<(usize, usize, usize)>;

/// Appends `(image, pixel, len)` to `segments`, joined with the last segment where it
/// continues it.
pub(crate) fn push_segment(
    segments: &mut TileSegments,
    (image, pixel, len): (usize, usize, usize),
) {
    match segments.last_mut() {
        Some((last_image, last_pixel, last_len))
            if *last_image == image && *last_pixel + *last_len == pixel =>
        {
            *last_len += len;
        }
        _ => segments.push((image, pixel, len)),
    }
}

/// Each output channel's moments over the pixels `segments` of a tile that this task
/// has written completely: read back while they are still in the cache.
///
/// # Safety
/// `out` must hold the plan's whole output; the segments' pixels of every channel must
/// have been written, by this task (or by threads it joined), and not be written by
/// anyone meanwhile.
pub(crate) unsafe fn tile_moments<T: Real>(
    plan: &ConvPlan,
    out: SharedMut<T>,
    segments: &[(usize, usize, usize)],
) -> Vec<Moments> {
    let pixels = plan.out_pixels();
    (0..plan.out_channels)
        .map(|ch| {
            let values = segments.iter().map(|&(image, pixel, len)| {
                let offset = (image * plan.out_channels + ch) * pixels + pixel;
                // SAFETY: a segment lies inside one plane of the output (the caller's
                // promise that `out` holds it), written and not being written (the
                // caller's promise).
                unsafe { std::slice::from_raw_parts(out.ptr().add(offset).cast_const(), len) }
            });
            Moments::of_segments(values)
        })
        .collect()
}

/// `dst[i] += src[i]` for every `i`: a backward pass's running sums over the output
/// gradient's runs. Compiled for the widest vectors of this CPU (element by element the
/// same additions, so the same bits on every CPU); x86-64's baseline adds four floats at
/// a time.
///
/// # Panics
/// If the slices differ in length.
#[inline]
pub(crate) fn add_into<T: Real>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "add_into: lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { wide::add_into_avx512(dst, src) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { wide::add_into_avx2(dst, src) };
        }
    }
    add_into_portable(dst, src);
}

/// [`add_into`] in portable code (inlined into each instruction set's version).
#[inline(always)]
fn add_into_portable<T: Real>(dst: &mut [T], src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// [`add_into`] compiled for wider vectors than x86-64's baseline.
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::add_into_portable;
    use crate::Real;

    /// `add_into` compiled with the target feature `$feature`.
    macro_rules! isa_version {
        ($feature:literal, $name:ident) => {
            /// `add_into` for one instruction set.
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name<T: Real>(dst: &mut [T], src: &[T]) {
                add_into_portable(dst, src)
            }
        };
    }

    isa_version!("avx512f", add_into_avx512);
    isa_version!("avx2", add_into_avx2);
}
