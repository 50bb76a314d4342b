//! The nested forward and backward passes over tiles of output columns.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::epilogue::Epilogue;
use super::im2col::{col2im, im2col, runs, segment_rows, Run};
use super::plan::{ConvPlan, Window};
use super::shifted;
use super::streaming::{self, StreamWeight};
use super::trace::{self, Layout as Traced, Pass};
use super::tuning::{self, Strategy};
use super::workspace::{self, grow, Slot, Workspace};
use super::Real;

/// Which gradients a backward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Input gradient.
    pub x: bool,
    /// Weight gradient.
    pub weight: bool,
    /// Bias gradient.
    pub bias: bool,
}

/// Gradients of a backward pass, each present when it was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<T> {
    /// Input gradient `[batch, c, h, w]`.
    pub x: Option<Vec<T>>,
    /// Weight gradient `[m, depth, kh, kw]`.
    pub weight: Option<Vec<T>>,
    /// Bias gradient `[n]`.
    pub bias: Option<Vec<T>>,
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(super) struct SharedMut<T>(pub(super) *mut T);
// SAFETY: every user writes a range of the buffer no other task touches (disjoint output
// columns), and the buffer outlives the parallel section.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(super) fn ptr(&self) -> *mut T {
        self.0
    }
}

/// Ring offsets shared by the passes: column-matrix segment rows, ring-layout weight
/// offsets and each ring's kernel positions.
pub(super) struct Layout {
    segment: Vec<usize>,
    weight: Vec<usize>,
    pub(super) positions: Vec<usize>,
}

impl Layout {
    fn new(plan: &ConvPlan) -> Self {
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
    pub(super) fn weight_ld(&self, plan: &ConvPlan, r: usize) -> usize {
        plan.weight_depth * self.positions[r]
    }

    /// Offset of window `w`'s block (its first primary, first weight channel) in ring
    /// `r`'s weight matrix.
    pub(super) fn weight_block(&self, plan: &ConvPlan, r: usize, w: &Window) -> usize {
        self.weight[r]
            + w.first_primary * self.weight_ld(plan, r)
            + w.weight_offset * self.positions[r]
    }

    /// First column-matrix row of window `w` in ring `r`'s segment.
    fn col_block(&self, r: usize, w: &Window) -> usize {
        self.segment[r] + w.in_offset * self.positions[r]
    }
}

/// Weights from this many values on are transformed by all threads.
const PARALLEL_WEIGHT: usize = 1 << 20;

/// Per ring of the ring layout: its offset, leading dimension and the patch index
/// (`ky * kw + kx`) of each of its positions.
fn ring_columns(plan: &ConvPlan, layout: &Layout) -> Vec<(usize, usize, Vec<usize>)> {
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
fn to_ring_layout<T: Real>(plan: &ConvPlan, layout: &Layout, weight: &[T], out: &mut [T]) {
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
fn from_ring_layout<T: Real>(plan: &ConvPlan, layout: &Layout, ringed: &[T]) -> Vec<T> {
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

/// Whether the plan's single window covers the whole weight, so that the first write of
/// a weight-gradient buffer can overwrite instead of accumulating.
fn weight_covered(plan: &ConvPlan) -> bool {
    plan.windows.len() == 1
        && plan.windows[0].first_primary == 0
        && plan.windows[0].weight_offset == 0
        && plan.windows[0].rows == plan.primaries
        && plan.window_depth == plan.weight_depth
}

/// Whether this plan runs through the shifted views (else im2col).
fn use_shifted(plan: &ConvPlan) -> bool {
    match plan.tuning.strategy {
        Strategy::Auto => shifted::suits(plan),
        Strategy::Shifted => plan.stride == [1, 1],
        Strategy::Im2col | Strategy::Stream => false,
    }
}

/// Whether this plan streams its weight (see [`streaming`]).
fn use_streaming(plan: &ConvPlan) -> bool {
    match plan.tuning.strategy {
        Strategy::Stream => streaming::suits(plan, true),
        Strategy::Auto => streaming::suits(plan, false),
        Strategy::Im2col | Strategy::Shifted => false,
    }
}

/// Columns per tile for this plan: the tile's column matrix (im2col) or one position's
/// view of a window (shifted) holds about `TILE_VALUES` values.
fn tile_columns(plan: &ConvPlan, shifted: bool) -> usize {
    if let Some(columns) = plan.tuning.tile_columns {
        return columns.max(1);
    }
    let rows = if shifted {
        plan.window_depth
    } else {
        plan.col_rows()
    };
    let tile = (tuning::TILE_VALUES / rows.max(1)).max(32);
    tile.div_ceil(16) * 16
}

/// Number of parallel tasks for `columns` output columns of `plan`.
fn task_count(plan: &ConvPlan, columns: usize) -> usize {
    let threads = super::threads();
    if threads <= 1 || columns < threads.saturating_mul(plan.tuning.min_task_columns) {
        1
    } else {
        threads
    }
}

/// gemm parallelism for a call that runs `tasks` tasks.
fn gemm_parallelism(tasks: usize) -> gemm::Parallelism {
    let threads = super::threads();
    if tasks == 1 && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]`, all strided; `accumulate` keeps `dst`.
///
/// # Safety
/// Every pointer with its strides must address `m x n`, `m x k`, `k x n` valid values, and
/// `dst` must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) unsafe fn gemm<T: Real>(
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

/// Splits `[0, total)` into `parts` nearly equal contiguous ranges.
fn split(total: usize, parts: usize) -> Vec<(usize, usize)> {
    (0..parts)
        .map(|i| (total * i / parts, total * (i + 1) / parts))
        .filter(|(a, b)| b > a)
        .collect()
}

/// The forward pass: `[batch, n, out_h, out_w]` from the input `[batch, c, h, w]`, the
/// primary weight `[m, depth, kh, kw]` and the bias `[n]`.
///
/// # Panics
/// If a slice length does not match the plan.
pub fn forward<T: Real>(plan: &ConvPlan, x: &[T], weight: &[T], bias: Option<&[T]>) -> Vec<T> {
    assert_eq!(weight.len(), plan.weight_len(), "weight length");
    let epilogue = Epilogue::bias(bias);
    check_forward(plan, x, &epilogue);
    let len = plan.output_len();
    // Every output value is written exactly once (each channel comes from one crop,
    // window and primary; each pixel from one tile), so the buffer starts uninitialized
    // and is only written through raw pointers.
    let mut out = workspace::uninit(len);
    forward_core(
        plan,
        x,
        Weight::Plain(weight),
        &epilogue,
        SharedMut(out.as_mut_ptr()),
    );
    // SAFETY: forward_core wrote all `len` values.
    unsafe { out.set_len(len) };
    out
}

/// A weight laid out once for many forward passes ([`forward_packed`]): the ring layout
/// the gemm calls read, or the plain layout where the plan streams its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight<T> {
    values: Vec<T>,
    /// Ring layout (else the streaming kernel's chunk layout).
    ringed: bool,
    shape: [usize; 4],
    rings: Vec<Vec<(usize, usize)>>,
}

impl<T: Real> PackedWeight<T> {
    /// Lays out `weight` (`[m, depth, kh, kw]`) for the plans that share `plan`'s weight
    /// shape, rings and layout choice: the ring layout, or the streaming kernel's chunks.
    ///
    /// # Panics
    /// If the weight's length does not match the plan.
    pub fn new(plan: &ConvPlan, weight: &[T]) -> Self {
        assert_eq!(weight.len(), plan.weight_len(), "weight length");
        let ringed = !streams(plan);
        let values = if ringed {
            let mut values = vec![T::ZERO; plan.weight_len()];
            to_ring_layout(plan, &Layout::new(plan), weight, &mut values);
            values
        } else {
            streaming::pack_chunks(plan, weight)
        };
        Self {
            values,
            ringed,
            shape: plan.weight_shape(),
            rings: plan.rings.clone(),
        }
    }

    /// Whether `plan` reads this weight as it is laid out.
    pub fn fits(&self, plan: &ConvPlan) -> bool {
        self.shape == plan.weight_shape()
            && self.rings == plan.rings
            && self.ringed != streams(plan)
    }

    /// Bytes of the values.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.values.as_slice())
    }
}

/// The forward pass with a packed weight and an [`Epilogue`], into `out`
/// (`[batch, n, out_h, out_w]`, every value overwritten).
///
/// # Panics
/// If a slice length does not match the plan, or `weight` does not
/// [fit](PackedWeight::fits) it.
pub fn forward_packed<T: Real>(
    plan: &ConvPlan,
    x: &[T],
    weight: &PackedWeight<T>,
    epilogue: &Epilogue<'_, T>,
    out: &mut [T],
) {
    assert!(weight.fits(plan), "packed weight laid out for another plan");
    check_forward(plan, x, epilogue);
    assert_eq!(out.len(), plan.output_len(), "output length");
    let source = if weight.ringed {
        Weight::Ringed(&weight.values)
    } else {
        Weight::Chunked(&weight.values)
    };
    forward_core(plan, x, source, epilogue, SharedMut(out.as_mut_ptr()));
}

fn check_forward<T: Real>(plan: &ConvPlan, x: &[T], epilogue: &Epilogue<'_, T>) {
    assert_eq!(x.len(), plan.input_len(), "input length");
    epilogue.check(plan);
}

/// Whether the forward pass of `plan` streams its weight (else it reads the ring layout).
fn streams(plan: &ConvPlan) -> bool {
    !use_shifted(plan) && use_streaming(plan)
}

/// A forward pass's weight as given.
#[derive(Clone, Copy)]
enum Weight<'a, T> {
    /// `[m, depth, kh, kw]`.
    Plain(&'a [T]),
    /// Already in ring layout (never for a streaming plan).
    Ringed(&'a [T]),
    /// Already in the streaming kernel's chunk layout (only for a streaming plan).
    Chunked(&'a [T]),
}

/// The forward pass into `out`, which must hold `plan.output_len()` values (lengths
/// checked by the callers); writes every one of them.
fn forward_core<T: Real>(
    plan: &ConvPlan,
    x: &[T],
    weight: Weight<'_, T>,
    epilogue: &Epilogue<'_, T>,
    out: SharedMut<T>,
) {
    if plan.output_len() == 0 {
        return;
    }
    let layout = Layout::new(plan);
    let shifted = use_shifted(plan);
    let tile = tile_columns(plan, shifted);
    if streams(plan) {
        let weight = match weight {
            Weight::Plain(weight) => StreamWeight::Plain(weight),
            Weight::Chunked(packed) => StreamWeight::Chunked(packed),
            Weight::Ringed(_) => {
                unreachable!("a streaming plan's weight is never packed in ring layout")
            }
        };
        let tasks = streaming::forward(plan, x, weight, epilogue, out);
        trace::note(Pass::Forward, Traced::Streaming, tasks);
        return;
    }
    workspace::with::<T, _>(Slot::Call, |call| {
        let ringed: &[T] = match weight {
            Weight::Ringed(ringed) => ringed,
            Weight::Plain(weight) => {
                let ringed = grow(&mut call.weight, plan.weight_len());
                to_ring_layout(plan, &layout, weight, ringed);
                ringed
            }
            Weight::Chunked(_) => {
                unreachable!("only a streaming plan's weight is packed in chunks")
            }
        };
        let columns = if shifted {
            plan.batch * shifted::Padded::new(plan).wide_columns(plan)
        } else {
            plan.columns()
        };
        let tasks = split(columns, task_count(plan, columns));
        let traced = if shifted {
            Traced::Shifted
        } else {
            Traced::Im2col
        };
        trace::note(Pass::Forward, traced, tasks.len());
        let parallelism = gemm_parallelism(tasks.len());
        let run = |&range: &(usize, usize)| {
            workspace::with::<T, _>(Slot::Task, |ws| {
                let task = (plan, &layout, x, ringed);
                if shifted {
                    shifted::forward_task(task, ws, epilogue, out, range, tile, parallelism)
                } else {
                    forward_task(task, ws, epilogue, out, range, tile, parallelism)
                }
            })
        };
        if tasks.len() == 1 {
            run(&tasks[0]);
        } else {
            tasks.par_iter().for_each(run);
        }
    });
}

/// What every task reads: the plan, the ring offsets, the input and the ring-layout weight.
pub(super) type TaskInput<'a, T> = (&'a ConvPlan, &'a Layout, &'a [T], &'a [T]);

/// Forward pass of the output columns `[start, end)`, tile by tile.
fn forward_task<T: Real>(
    (plan, layout, x, ringed): TaskInput<'_, T>,
    ws: &mut Workspace<T>,
    epilogue: &Epilogue<'_, T>,
    out: SharedMut<T>,
    (start, end): (usize, usize),
    tile: usize,
    parallelism: gemm::Parallelism,
) {
    let rings = plan.rings_count();
    let mut t0 = start;
    while t0 < end {
        let t1 = (t0 + tile).min(end);
        let width = t1 - t0;
        runs(plan, t0, t1, &mut ws.runs);
        let cols = grow(&mut ws.cols, plan.col_rows() * width);
        im2col(plan, x, &ws.runs, width, cols);
        for window in &plan.windows {
            if window.rows == 0 {
                continue;
            }
            let acc = grow(&mut ws.acc, window.rows * width);
            let (acc_rs, acc_cs) = accumulator_strides(window.rows, width);
            for r in (0..rings).rev() {
                let k = plan.window_depth * layout.positions[r];
                // SAFETY: acc is rows x width; the weight block starts inside ring r's
                // [m, ld] matrix with rows <= m - first_primary and
                // weight_offset + window_depth <= weight_depth; the column block is
                // k rows of width inside the tile's column matrix.
                unsafe {
                    gemm(
                        [window.rows, width, k],
                        acc.as_mut_ptr(),
                        [acc_cs, acc_rs],
                        r + 1 < rings,
                        ringed.as_ptr().add(layout.weight_block(plan, r, window)),
                        [1, layout.weight_ld(plan, r)],
                        cols.as_ptr().add(layout.col_block(r, window) * width),
                        [1, width],
                        parallelism,
                    );
                }
                let acc = (&*acc, acc_rs, acc_cs);
                emit(plan, window, r, acc, &ws.runs, epilogue, out);
            }
        }
        t0 = t1;
    }
}

/// Writes crop `crop` of a window (the accumulator's emitted rows, through the epilogue) into the
/// output columns of the tile.
#[allow(clippy::too_many_arguments)]
fn emit<T: Real>(
    plan: &ConvPlan,
    window: &Window,
    crop: usize,
    (acc, acc_rs, acc_cs): (&[T], usize, usize),
    runs: &[Run],
    epilogue: &Epilogue<'_, T>,
    out: SharedMut<T>,
) {
    let base = plan.channel_base(crop, window);
    let pixels = plan.out_pixels();
    let ow = plan.output[1];
    for p in 0..plan.emitted(crop, window) {
        let ch = base + p;
        let factors = epilogue.channel(ch);
        for run in runs {
            let offset = (run.image * plan.out_channels + ch) * pixels + run.oy * ow + run.ox;
            let first = p * acc_rs + run.col * acc_cs;
            for i in 0..run.len {
                let value = epilogue.apply(acc[first + i * acc_cs], factors, offset + i);
                // SAFETY: the run's pixels lie inside the output's allocation and belong
                // to this task's columns only.
                unsafe { out.ptr().add(offset + i).write(value) };
            }
        }
    }
}

/// Windows of at most this many primaries accumulate pixel-major in the forward pass:
/// gemm's micro-kernel rows then run over the primaries (16 or 32 of them fill its
/// 16-row blocks exactly), with no ragged edge of its 6-wide column blocks.
pub(super) const PIXEL_MAJOR_ROWS: usize = 32;

/// Strides `(row, column)` of a forward accumulator of `rows` primaries by `width`
/// pixels.
pub(super) fn accumulator_strides(rows: usize, width: usize) -> (usize, usize) {
    if rows <= PIXEL_MAJOR_ROWS {
        (1, rows)
    } else {
        (width, 1)
    }
}

/// The backward pass: the gradients `needs` asks for, from the forward's input and
/// weight and the output gradient `[batch, n, out_h, out_w]`.
///
/// The result depends on the plan and the thread count only, never on timing: parallel
/// partial sums are added in task order.
///
/// # Panics
/// If a slice length does not match the plan.
pub fn backward<T: Real>(
    plan: &ConvPlan,
    x: &[T],
    weight: &[T],
    grad_out: &[T],
    needs: Needs,
) -> Gradients<T> {
    assert_eq!(x.len(), plan.input_len(), "input length");
    assert_eq!(weight.len(), plan.weight_len(), "weight length");
    assert_eq!(grad_out.len(), plan.output_len(), "output gradient length");
    let bias = needs.bias.then(|| bias_gradient(plan, grad_out));
    let mut dx = needs.x.then(|| workspace::zeroed(plan.input_len()));
    let mut dw = None;
    let shifted = use_shifted(plan);
    if (needs.x || needs.weight) && plan.columns() > 0 && !shifted && use_streaming(plan) {
        let (dw, tasks) =
            streaming::backward(plan, x, weight, grad_out, dx.as_deref_mut(), needs.weight);
        trace::note(Pass::Backward, Traced::Streaming, tasks);
        return Gradients {
            x: dx,
            weight: dw,
            bias,
        };
    }
    if (needs.x || needs.weight) && plan.columns() > 0 {
        let layout = Layout::new(plan);
        workspace::with::<T, _>(Slot::Call, |call| {
            let weight_len = plan.weight_len();
            let dw_len = if needs.weight { weight_len } else { 0 };
            let buffer = grow(&mut call.weight, weight_len + dw_len);
            let (ringed, dw_ringed) = buffer.split_at_mut(weight_len);
            to_ring_layout(plan, &layout, weight, ringed);
            let tasks = backward_tasks(
                (plan, &layout, x, ringed),
                grad_out,
                dx.as_deref_mut(),
                needs.weight.then_some(&mut *dw_ringed),
                &mut call.partials,
            );
            let traced = if shifted {
                Traced::Shifted
            } else {
                Traced::Im2col
            };
            trace::note(Pass::Backward, traced, tasks);
            if needs.weight {
                dw = Some(from_ring_layout(plan, &layout, dw_ringed));
            }
        });
    } else if needs.weight {
        dw = Some(vec![T::ZERO; plan.weight_len()]);
    }
    Gradients {
        x: dx,
        weight: dw,
        bias,
    }
}

/// Splits the backward pass into tasks of whole images (each owns its part of the input
/// gradient) and runs them; returns the number of tasks. The first task accumulates the
/// weight gradient into `dw` (ring layout), each other task into a buffer of `partials`;
/// the partials are then added into `dw` in task order, so the sum is the same whatever
/// order the tasks finish in.
fn backward_tasks<T: Real>(
    task: TaskInput<'_, T>,
    grad_out: &[T],
    dx: Option<&mut [T]>,
    mut dw: Option<&mut [T]>,
    partials: &mut Vec<Vec<T>>,
) -> usize {
    let plan = task.0;
    let tasks = if plan.batch >= super::threads() {
        task_count(plan, plan.columns()).min(plan.batch)
    } else {
        1
    };
    let shifted = use_shifted(plan);
    let tile = tile_columns(plan, shifted);
    let parallelism = gemm_parallelism(tasks);
    let image_len = plan.in_channels * plan.input[0] * plan.input[1];
    let ranges = split(plan.batch, tasks);
    let mut dx_chunks: Vec<Option<&mut [T]>> = Vec::with_capacity(ranges.len());
    match dx {
        Some(mut rest) => {
            for &(a, b) in &ranges {
                let (head, tail) = rest.split_at_mut((b - a) * image_len);
                dx_chunks.push(Some(head));
                rest = tail;
            }
        }
        None => dx_chunks.extend(ranges.iter().map(|_| None)),
    }
    // The first write of a weight-gradient buffer overwrites it when one window covers
    // the whole weight; otherwise buffers start from zero.
    let fresh = weight_covered(plan);
    let need_w = dw.is_some();
    let partial_len = if need_w { plan.weight_len() } else { 0 };
    if partials.len() < ranges.len() - 1 {
        partials.resize_with(ranges.len() - 1, Vec::new);
    }
    let mut dw_targets: Vec<Option<&mut [T]>> = Vec::with_capacity(ranges.len());
    dw_targets.push(dw.as_deref_mut());
    for partial in partials.iter_mut().take(ranges.len() - 1) {
        dw_targets.push(need_w.then(|| grow(partial, partial_len)));
    }
    if !fresh {
        for target in dw_targets.iter_mut().flatten() {
            target.fill(T::ZERO);
        }
    }
    let run = |((images, dx), dw): BackwardJob<'_, T>| {
        workspace::with::<T, _>(Slot::Task, |ws| {
            let task_args = (grad_out, images, dx, dw, fresh, tile, parallelism);
            if shifted {
                shifted::backward_task(task, ws, task_args);
            } else {
                backward_task(task, ws, task_args);
            }
        })
    };
    let jobs = ranges.into_iter().zip(dx_chunks).zip(dw_targets);
    if tasks == 1 {
        jobs.for_each(run);
    } else {
        jobs.collect::<Vec<_>>().into_par_iter().for_each(run);
    }
    if let Some(sum) = dw {
        add_in_order(sum, &partials[..tasks - 1]);
    }
    tasks
}

/// One backward task's images, its input-gradient chunk and its weight-gradient target.
type BackwardJob<'a, T> = (((usize, usize), Option<&'a mut [T]>), Option<&'a mut [T]>);

/// Adds each of `partials` (in their order) into `sum`: `sum[i] + p0[i] + p1[i] + ...`,
/// element by element, the same association whatever the thread count; in parallel over
/// blocks of elements for large sums.
pub(super) fn add_in_order<T: Real, P: AsRef<[T]> + Sync>(sum: &mut [T], partials: &[P]) {
    if partials.is_empty() {
        return;
    }
    const BLOCK: usize = 1 << 14;
    let add_block = |(b, block): (usize, &mut [T])| {
        for partial in partials {
            let part = &partial.as_ref()[b * BLOCK..b * BLOCK + block.len()];
            for (s, &v) in block.iter_mut().zip(part) {
                *s += v;
            }
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
pub(super) fn windows_partition_channels(plan: &ConvPlan) -> bool {
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
/// images `[first, last)`, the input gradient of those images, the weight-gradient buffer
/// (ring layout; `fresh`: its first write overwrites), the tile width and gemm's
/// parallelism.
pub(super) type BackwardArgs<'a, T> = (
    &'a [T],
    (usize, usize),
    Option<&'a mut [T]>,
    Option<&'a mut [T]>,
    bool,
    usize,
    gemm::Parallelism,
);

/// Backward pass of images `[first, last)` through im2col: their input gradient into
/// `dx` (those images only), their weight-gradient contribution added into `dw` (ring
/// layout).
fn backward_task<T: Real>(
    (plan, layout, x, ringed): TaskInput<'_, T>,
    ws: &mut Workspace<T>,
    (grad_out, (first, last), mut dx, mut dw, fresh, tile, parallelism): BackwardArgs<'_, T>,
) {
    let mut overwrite = fresh;
    let need_w = dw.is_some();
    let need_x = dx.is_some();
    let rings = plan.rings_count();
    let pixels = plan.out_pixels();
    let ow = plan.output[1];
    let exclusive_rows = windows_partition_channels(plan);
    let (start, end) = (first * pixels, last * pixels);
    {
        let mut t0 = start;
        while t0 < end {
            let t1 = (t0 + tile).min(end);
            let width = t1 - t0;
            runs(plan, t0, t1, &mut ws.runs);
            let cols = grow(
                &mut ws.cols,
                if need_w { plan.col_rows() * width } else { 0 },
            );
            if need_w {
                im2col(plan, x, &ws.runs, width, cols);
            }
            let dcols = grow(
                &mut ws.dcols,
                if need_x { plan.col_rows() * width } else { 0 },
            );
            if need_x && !exclusive_rows {
                dcols.fill(T::ZERO);
            }
            for window in &plan.windows {
                if window.rows == 0 {
                    continue;
                }
                let sums = grow(&mut ws.acc, window.rows * width);
                for r in 0..rings {
                    // Running sum S_r = S_{r-1} + G_r over the emitted rows of crop r.
                    let base = plan.channel_base(r, window);
                    for p in 0..plan.emitted(r, window) {
                        let row = &mut sums[p * width..(p + 1) * width];
                        for run in &ws.runs {
                            let offset = (run.image * plan.out_channels + base + p) * pixels
                                + run.oy * ow
                                + run.ox;
                            let g = &grad_out[offset..offset + run.len];
                            let s = &mut row[run.col..run.col + run.len];
                            if r == 0 {
                                s.copy_from_slice(g);
                            } else {
                                for (s, &g) in s.iter_mut().zip(g) {
                                    *s += g;
                                }
                            }
                        }
                    }
                    let k = plan.window_depth * layout.positions[r];
                    let ld = layout.weight_ld(plan, r);
                    let col_block = layout.col_block(r, window) * width;
                    let weight_block = layout.weight_block(plan, r, window);
                    if let Some(dw) = dw.as_deref_mut() {
                        // dW_r[rows, k] += S_r[rows, width] * X_r[k, width]^T
                        // SAFETY: as in the forward; the weight-gradient partial has the
                        // ring layout of the weight.
                        unsafe {
                            gemm(
                                [window.rows, k, width],
                                dw.as_mut_ptr().add(weight_block),
                                [1, ld],
                                !overwrite,
                                sums.as_ptr(),
                                [1, width],
                                cols.as_ptr().add(col_block),
                                [width, 1],
                                parallelism,
                            );
                        }
                    }
                    if need_x {
                        // dX_r[k, width] (+)= W_r[rows, k]^T * S_r[rows, width]
                        // SAFETY: as above; dcols has the shape of cols.
                        unsafe {
                            gemm(
                                [k, width, window.rows],
                                dcols.as_mut_ptr().add(col_block),
                                [1, width],
                                !exclusive_rows,
                                ringed.as_ptr().add(weight_block),
                                [ld, 1],
                                sums.as_ptr(),
                                [1, width],
                                parallelism,
                            );
                        }
                    }
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                col2im(plan, dcols, &ws.runs, width, first, dx);
            }
            overwrite = false;
            t0 = t1;
        }
    }
}

/// Bias gradient: the output gradient summed over images and pixels, per channel.
fn bias_gradient<T: Real>(plan: &ConvPlan, grad_out: &[T]) -> Vec<T> {
    let pixels = plan.out_pixels();
    (0..plan.out_channels)
        .into_par_iter()
        .map(|ch| {
            let mut total = T::ZERO;
            for b in 0..plan.batch {
                let offset = (b * plan.out_channels + ch) * pixels;
                for &v in &grad_out[offset..offset + pixels] {
                    total += v;
                }
            }
            total
        })
        .collect()
}
