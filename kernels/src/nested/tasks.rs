//! The tile tasks of the nested passes: each task takes tiles of output columns, builds
//! their column matrix (im2col) or shifted views, runs one gemm per ring and window, and
//! writes the crops it completes (forward), or the input and weight gradients (backward).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::epilogue::Epilogue;
use crate::im2col::{col2im, im2col, runs, Run};
use crate::moments::TileMoments;
use crate::plan::{ConvPlan, Window};
use crate::shifted;
use crate::workspace::{self, grow, Slot, Workspace};
use crate::Real;

use super::*;

/// Forward pass of the output columns `[start, end)`, tile by tile; each tile's
/// per-channel moments appended to `moments` where given (a plain epilogue's output).
pub(super) fn forward_task<T: Real>(
    (plan, layout, x, ringed): TaskInput<'_, T>,
    panels: Option<&ForwardPanels>,
    ws: &mut Workspace<T>,
    epilogue: &Epilogue<'_, T>,
    out: SharedMut<T>,
    ((start, end), tile, parallelism): ForwardTiles,
    mut moments: Option<&mut Vec<TileMoments>>,
) {
    let rings = plan.rings_count();
    let ow = plan.output[1];
    let mut segments = TileSegments::new();
    let mut t0 = start;
    while t0 < end {
        let t1 = (t0 + tile).min(end);
        let width = t1 - t0;
        runs(plan, t0, t1, &mut ws.runs);
        let cols = grow(&mut ws.cols, plan.col_rows() * width);
        im2col(plan, x, &ws.runs, width, cols);
        for (w, window) in plan.windows.iter().enumerate() {
            if window.rows == 0 {
                continue;
            }
            let acc = grow(&mut ws.acc, window.rows * width);
            let (acc_rs, acc_cs) = accumulator_strides::<T>(window.rows, width);
            // One pointer for sgemm's writes and the epilogue's reads of final blocks.
            let acc = acc.as_mut_ptr();
            let view = Accumulator {
                ptr: acc.cast_const(),
                rs: acc_rs,
                cs: acc_cs,
            };
            let run_list = &ws.runs;
            for r in (0..rings).rev() {
                // Crop r is written block by block as the product finishes them.
                let write = |rows: [usize; 2], columns: [usize; 2]| {
                    // SAFETY: the block is final; its output pixels belong to this task.
                    unsafe {
                        emit(
                            plan, window, r, view, run_list, epilogue, out, rows, columns,
                        )
                    };
                };
                let k = plan.window_depth * layout.positions[r];
                // SAFETY: acc is rows x width; the weight block starts inside ring r's
                // [m, ld] matrix with rows <= m - first_primary and
                // weight_offset + window_depth <= weight_depth; the column block is
                // k rows of width inside the tile's column matrix; the panels, where
                // given, hold that weight block (laid out for this plan and path).
                unsafe {
                    gemm_panels(
                        [window.rows, width, k],
                        acc,
                        [acc_cs, acc_rs],
                        r + 1 < rings,
                        (
                            ring_block(ringed, layout.weight_block(plan, r, window)),
                            [1, layout.weight_ld(plan, r)],
                            panels.and_then(|p| p.get(w, r)).map(|p| (p, 0)),
                        ),
                        (
                            cols.as_ptr().add(layout.col_block(r, window) * width),
                            [1, width],
                            None,
                        ),
                        parallelism,
                        Some(&write),
                    );
                }
            }
        }
        if let Some(moments) = moments.as_deref_mut() {
            segments.clear();
            for run in &ws.runs {
                push_segment(&mut segments, (run.image, run.oy * ow + run.ox, run.len));
            }
            // SAFETY: every window's product and its writes are done: the tile's pixels
            // of every channel are written, by this task, into the plan's output.
            moments.push((t0, unsafe { tile_moments(plan, out, &segments) }));
        }
        t0 = t1;
    }
}

/// Writes the block `[first row, rows] x [first column, columns]` of crop `crop` of a
/// window (the accumulator's emitted rows among them, through the epilogue) into the
/// output pixels of those tile columns.
///
/// # Safety
/// The block of `acc` must be final (not written meanwhile), inside the tile's
/// accumulator, and `runs` the tile's; its output pixels must belong to the caller's task.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn emit<T: Real>(
    plan: &ConvPlan,
    window: &Window,
    crop: usize,
    acc: Accumulator<T>,
    runs: &[Run],
    epilogue: &Epilogue<'_, T>,
    out: SharedMut<T>,
    [row0, rows]: [usize; 2],
    [col0, cols]: [usize; 2],
) {
    let base = plan.channel_base(crop, window);
    let pixels = plan.out_pixels();
    let ow = plan.output[1];
    let col_end = col0 + cols;
    // The runs that reach into the block's columns (runs are in column order).
    let first_run = runs.partition_point(|run| run.col + run.len <= col0);
    for p in row0..(row0 + rows).min(plan.emitted(crop, window)) {
        let ch = base + p;
        let factors = epilogue.channel(ch);
        // (output offset, first tile column, pixels) of a segment to write.
        let write = |(offset, start, len): (usize, usize, usize)| {
            // SAFETY: the segment's pixels lie inside the output's allocation (the
            // residual has the output's length) and belong to this task's columns only;
            // the block's accumulators are final and inside the tile's (the caller's
            // promise).
            unsafe {
                let from = acc.ptr.add(p * acc.rs + start * acc.cs);
                epilogue.write_run((from, acc.cs), factors, out.ptr(), offset, len);
            }
        };
        // Runs that continue each other in the output and in the tile (an image's whole
        // rows: a 7 x 7 map's seven runs) are written as one segment.
        let mut pending: Option<(usize, usize, usize)> = None;
        for run in runs[first_run..].iter().take_while(|run| run.col < col_end) {
            let start = run.col.max(col0);
            let len = (run.col + run.len).min(col_end) - start;
            let skip = start - run.col;
            let offset =
                (run.image * plan.out_channels + ch) * pixels + run.oy * ow + run.ox + skip;
            pending = match pending {
                Some((at, first, n)) if at + n == offset && first + n == start => {
                    Some((at, first, n + len))
                }
                _ => {
                    if let Some(segment) = pending {
                        write(segment);
                    }
                    Some((offset, start, len))
                }
            };
        }
        if let Some(segment) = pending {
            write(segment);
        }
    }
}

/// Splits the backward pass into tasks of whole images (each owns its part of the input
/// gradient) and runs them; returns the number of tasks. The first task accumulates the
/// weight gradient into `dw` (ring layout), each other task into a buffer of `partials`;
/// the partials are then added into `dw` in task order, so the sum is the same whatever
/// order the tasks finish in.
///
/// `dx` need not be initialised: each task writes every value of its images' part, the
/// shifted path once each, the im2col path after zeroing the part (its tiles add into
/// it), in parallel and just before its tiles use it, rather than in one serial pass over
/// the whole gradient ahead of the tasks (the first layers' input gradients are tens of
/// MiB, and zeroing them was 3.5 % of a `vgg_small` spatial step).
pub(super) fn backward_tasks<T: Real>(
    task: TaskInput<'_, T>,
    grad_out: &[T],
    dx: Option<&mut [MaybeUninit<T>]>,
    mut dw: Option<&mut [T]>,
    partials: &mut Vec<Vec<T>>,
) -> usize {
    let plan = task.0;
    let tasks = if plan.batch >= crate::threads() {
        task_count(plan, plan.columns()).min(plan.batch)
    } else {
        1
    };
    let shifted = use_shifted(plan);
    let tile = tile_columns(plan, shifted);
    let parallelism = gemm_parallelism(tasks);
    let image_len = plan.in_channels * plan.input[0] * plan.input[1];
    let ranges = split(plan.batch, tasks);
    let mut dx_chunks: Vec<Option<&mut [MaybeUninit<T>]>> = Vec::with_capacity(ranges.len());
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
            if shifted {
                let task_args = (grad_out, images, dx, dw, fresh, tile, parallelism);
                shifted::backward_task(task, ws, task_args);
            } else {
                let dx = dx.map(workspace::zeroed_slots);
                let task_args = (grad_out, images, dx, dw, fresh, tile, parallelism);
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

/// One backward task's images, its input-gradient chunk (not yet written) and its
/// weight-gradient target.
pub(super) type BackwardJob<'a, T> = (
    ((usize, usize), Option<&'a mut [MaybeUninit<T>]>),
    Option<&'a mut [T]>,
);

/// Backward pass of images `[first, last)` through im2col: their input gradient into
/// `dx` (those images only), their weight-gradient contribution added into `dw` (ring
/// layout).
pub(super) fn backward_task<T: Real>(
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
                                add_into(s, g);
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

/// Bias gradient: the output gradient summed over images and pixels, per channel, in
/// [`BIAS_LANES`] partial sums (a loop that vectorizes; one running sum was a chain of
/// dependent scalar adds, 5 % of a vgg_small step) added in a fixed order.
pub(super) fn bias_gradient<T: Real>(plan: &ConvPlan, grad_out: &[T]) -> Vec<T> {
    let pixels = plan.out_pixels();
    let body = pixels / BIAS_LANES * BIAS_LANES;
    (0..plan.out_channels)
        .into_par_iter()
        .map(|ch| {
            let mut lanes = [T::ZERO; BIAS_LANES];
            let mut rest = T::ZERO;
            for b in 0..plan.batch {
                let plane = &grad_out[(b * plan.out_channels + ch) * pixels..][..pixels];
                for chunk in plane[..body].chunks_exact(BIAS_LANES) {
                    for (lane, &v) in lanes.iter_mut().zip(chunk) {
                        *lane += v;
                    }
                }
                for &v in &plane[body..] {
                    rest += v;
                }
            }
            lanes.iter().fold(rest, |total, &lane| total + lane)
        })
        .collect()
}

/// Partial sums of [`bias_gradient`].
const BIAS_LANES: usize = 8;
