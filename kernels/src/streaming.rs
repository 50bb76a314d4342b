//! Weight streaming for layers with a large weight and few output columns (a fully
//! connected layer written as a convolution, such as VGG's fc6: 7x7 kernel on a 7x7 map).
//!
//! There the cost is moving the weight, not multiplying it: the general path would copy
//! the whole weight into ring layout and back. Here the column matrix of all columns is
//! built once, and the threads take chunks of primary filters: each chunk of the weight
//! is put into ring layout in a small cache-resident buffer and multiplied at once, so the
//! weight is read once per pass and the weight gradient written once, straight into its
//! `[m, depth, kh, kw]` layout.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::epilogue::Epilogue;
use super::im2col::{col2im, im2col, runs, segment_rows, Run};
use super::nested::{
    add_in_order, add_into, gemm, gemm_panels, lhs_panels, rhs_panels, SharedMut, PARALLEL_WEIGHT,
};
use super::plan::ConvPlan;
use super::sgemm::{self, Panels};
use super::workspace::{self, grow, Slot};
use super::Real;

/// Primary filters per chunk in the forward pass (its ring copy stays in L2).
const CHUNK_FORWARD: usize = 16;
/// Primary filters per chunk in the backward pass (fewer passes over the column-matrix
/// gradient; the chunk and its gradient stay in L3).
const CHUNK_BACKWARD: usize = 32;
/// Weights from this many values on stream (below, the general path is as good).
const MIN_WEIGHT: usize = 1 << 20;

/// Whether the plan streams its weight: one window covering the whole weight, and
/// (unless `forced`) a large weight that dwarfs the column matrix of all output columns
/// (at least four times its size), which is then built at once.
pub fn suits(plan: &ConvPlan, forced: bool) -> bool {
    let covered = plan.windows.len() == 1
        && plan.windows[0].first_primary == 0
        && plan.windows[0].weight_offset == 0
        && plan.windows[0].rows == plan.primaries
        && plan.window_depth == plan.weight_depth;
    let weight = plan.weight_len();
    covered
        && (forced
            || (weight >= MIN_WEIGHT
                && plan
                    .columns()
                    .saturating_mul(plan.col_rows())
                    .saturating_mul(4)
                    <= weight))
}

/// Ring geometry of a chunk buffer: per ring, its offset in the buffer for `rows`
/// primaries, its leading dimension `depth * npos_r` and the patch index of each position.
struct ChunkLayout {
    rings: Vec<(usize, usize, Vec<usize>)>,
    len_per_row: usize,
}

impl ChunkLayout {
    fn new(plan: &ConvPlan) -> Self {
        let kw = plan.kernel[1];
        let mut per_row = 0;
        let rings = plan
            .rings
            .iter()
            .map(|ring| {
                let ld = plan.weight_depth * ring.len();
                let index = ring.iter().map(|&(ky, kx)| ky * kw + kx).collect();
                let at = per_row;
                per_row += ld;
                (at, ld, index)
            })
            .collect();
        Self {
            rings,
            len_per_row: per_row,
        }
    }

    /// Offset of ring `r` in a buffer of `rows` primaries.
    fn offset(&self, r: usize, rows: usize) -> usize {
        self.rings[r].0 * rows
    }
}

/// Copies primaries `[p0, p0 + rows)` of the weight into the chunk buffer, ring layout.
fn load_chunk<T: Real>(
    plan: &ConvPlan,
    layout: &ChunkLayout,
    weight: &[T],
    p0: usize,
    rows: usize,
    buf: &mut [T],
) {
    let area = plan.kernel[0] * plan.kernel[1];
    let patch_len = plan.weight_depth * area;
    for (r, (_, ld, index)) in layout.rings.iter().enumerate() {
        let ring = &mut buf[layout.offset(r, rows)..layout.offset(r, rows) + rows * ld];
        for (p, row) in ring.chunks_exact_mut(*ld).enumerate() {
            let patches = &weight[(p0 + p) * patch_len..(p0 + p + 1) * patch_len];
            for (patch, dst) in patches
                .chunks_exact(area)
                .zip(row.chunks_exact_mut(index.len()))
            {
                for (d, &i) in dst.iter_mut().zip(index) {
                    *d = patch[i];
                }
            }
        }
    }
}

/// A streaming forward pass's weight.
#[derive(Clone, Copy)]
pub enum StreamWeight<'a, T> {
    /// `[m, depth, kh, kw]`: each chunk is copied into ring layout as it is used.
    Plain(&'a [T]),
    /// Already in chunk layout ([`pack_chunks`]), with each chunk's rings in sgemm's
    /// panels where they were made ([`chunk_panels`]).
    Chunked(&'a [T], Option<&'a [Panels]>),
}

/// The weight `[m, depth, kh, kw]` in the forward pass's chunk layout: the chunk of
/// primaries `[p0, p0 + rows)` at `[p0 * len_per_row, (p0 + rows) * len_per_row)`, laid
/// out as [`load_chunk`] writes it, so a forward pass reads chunks in place.
pub fn pack_chunks<T: Real>(plan: &ConvPlan, weight: &[T]) -> Vec<T> {
    let layout = ChunkLayout::new(plan);
    let mut packed = vec![T::ZERO; plan.primaries * layout.len_per_row];
    for p0 in (0..plan.primaries).step_by(CHUNK_FORWARD) {
        let rows = CHUNK_FORWARD.min(plan.primaries - p0);
        let chunk = &mut packed[p0 * layout.len_per_row..(p0 + rows) * layout.len_per_row];
        load_chunk(plan, &layout, weight, p0, rows, chunk);
    }
    packed
}

/// The rings of each chunk of `packed` ([`pack_chunks`]) in the panels sgemm reads as its
/// `lhs`, `[chunk * rings + ring]`: a forward pass then multiplies them in place instead
/// of laying each chunk out again. `None` where sgemm would not run the forward products
/// (`f64`, no micro-kernel, or too few output columns to fill its tiles: the panels would
/// only cost memory).
///
/// # Panics
/// If `packed` is not the plan's chunk layout length.
pub(crate) fn chunk_panels<T: Real>(plan: &ConvPlan, packed: &[T]) -> Option<Vec<Panels>> {
    if !sgemm::fills::<T>(CHUNK_FORWARD.min(plan.primaries), plan.columns()) {
        return None;
    }
    let layout = ChunkLayout::new(plan);
    assert_eq!(
        packed.len(),
        plan.primaries * layout.len_per_row,
        "chunk layout length"
    );
    let chunks: Vec<(usize, usize)> = (0..plan.primaries.div_ceil(CHUNK_FORWARD))
        .flat_map(|chunk| (0..plan.rings_count()).map(move |r| (chunk, r)))
        .collect();
    let panels = |&(chunk, r): &(usize, usize)| {
        let p0 = chunk * CHUNK_FORWARD;
        let rows = CHUNK_FORWARD.min(plan.primaries - p0);
        let (_, ld, ref index) = layout.rings[r];
        let k = plan.window_depth * index.len();
        let start = p0 * layout.len_per_row + layout.offset(r, rows);
        lhs_panels(packed, start, [rows, k], ld).expect("sgemm runs (checked above)")
    };
    Some(if packed.len() >= PARALLEL_WEIGHT {
        chunks.par_iter().map(panels).collect()
    } else {
        chunks.iter().map(panels).collect()
    })
}

/// Chunks of `chunk` primaries, grouped into one contiguous range per thread.
fn chunk_groups(plan: &ConvPlan, chunk: usize) -> Vec<(usize, usize)> {
    let chunks = plan.primaries.div_ceil(chunk);
    let threads = super::threads().clamp(1, chunks.max(1));
    (0..threads)
        .map(|t| (chunks * t / threads, chunks * (t + 1) / threads))
        .filter(|(a, b)| b > a)
        .collect()
}

/// Runs `f(item, first chunk, last chunk)` for each group with its own item, in
/// parallel when there are several.
fn for_each_group<I: Send>(
    groups: &[(usize, usize)],
    items: Vec<I>,
    f: impl Fn(I, usize, usize) + Sync,
) {
    let jobs = items.into_iter().zip(groups.iter().copied());
    if groups.len() == 1 {
        jobs.for_each(|(item, (a, b))| f(item, a, b));
    } else {
        jobs.collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|(item, (a, b))| f(item, a, b));
    }
}

/// The forward pass of a streaming plan (see [`suits`]); returns the number of
/// parallel tasks.
pub fn forward<T: Real>(
    plan: &ConvPlan,
    x: &[T],
    weight: StreamWeight<'_, T>,
    epilogue: &Epilogue<'_, T>,
    out: SharedMut<T>,
) -> usize {
    let width = plan.columns();
    let layout = ChunkLayout::new(plan);
    let segment = segment_rows(plan);
    let window = plan.windows[0];
    let pixels = plan.out_pixels();
    let ow = plan.output[1];
    let rings = plan.rings_count();
    let groups = chunk_groups(plan, CHUNK_FORWARD);
    workspace::with::<T, _>(Slot::Call, |call| {
        runs(plan, 0, width, &mut call.runs);
        let cols = grow(&mut call.cols, plan.col_rows() * width);
        im2col(plan, x, &call.runs, width, cols);
        let (cols, run_list): (&[T], &[Run]) = (cols, &call.runs);
        // Each ring's column segment in panels once: every chunk multiplies it.
        let segments: Vec<_> = (0..rings)
            .map(|r| {
                let k = plan.window_depth * layout.rings[r].2.len();
                rhs_panels(cols, segment[r] * width, [k, width])
            })
            .collect();
        let chunk_panels = match weight {
            StreamWeight::Chunked(_, panels) => panels,
            StreamWeight::Plain(_) => None,
        };
        let items = vec![(); groups.len()];
        for_each_group(&groups, items, |(), first, last| {
            workspace::with::<T, _>(Slot::Task, |ws| {
                for chunk in first..last {
                    let p0 = chunk * CHUNK_FORWARD;
                    let rows = CHUNK_FORWARD.min(plan.primaries - p0);
                    let chunk_len = rows * layout.len_per_row;
                    let buf: &[T] = match weight {
                        StreamWeight::Plain(weight) => {
                            let buf = grow(&mut ws.weight, chunk_len);
                            load_chunk(plan, &layout, weight, p0, rows, buf);
                            buf
                        }
                        StreamWeight::Chunked(packed, _) => {
                            let start = p0 * layout.len_per_row;
                            &packed[start..start + chunk_len]
                        }
                    };
                    let acc = grow(&mut ws.acc, rows * width);
                    // Primary-major: gemm then reads the chunk transposed in place (no
                    // packing of the weight) and the column matrix column-major.
                    let (acc_rs, acc_cs) = (width, 1);
                    for r in (0..rings).rev() {
                        let (_, ld, ref index) = layout.rings[r];
                        let k = plan.window_depth * index.len();
                        // SAFETY: acc is rows x width; ring r of the chunk buffer is
                        // rows x ld; its column segment is k rows of width values, and
                        // its panels (where made) hold that segment.
                        unsafe {
                            gemm_panels(
                                [rows, width, k],
                                acc.as_mut_ptr(),
                                [acc_cs, acc_rs],
                                r + 1 < rings,
                                (
                                    buf.as_ptr().add(layout.offset(r, rows)),
                                    [1, ld],
                                    chunk_panels.map(|panels| (&panels[chunk * rings + r], 0)),
                                ),
                                (
                                    cols.as_ptr().add(segment[r] * width),
                                    [1, width],
                                    segments[r].as_ref().map(|panels| (panels, 0)),
                                ),
                                gemm::Parallelism::None,
                                None,
                            );
                        }
                        // Crop r: the chunk's primaries that crop r emits.
                        let base = plan.channel_base(r, &window);
                        let emitted = plan.emitted(r, &window);
                        for p in 0..rows.min(emitted.saturating_sub(p0)) {
                            let ch = base + p0 + p;
                            let factors = epilogue.channel(ch);
                            for run in run_list {
                                let at = (run.image * plan.out_channels + ch) * pixels
                                    + run.oy * ow
                                    + run.ox;
                                let first = p * acc_rs + run.col * acc_cs;
                                // SAFETY: inside the output (the residual has the
                                // output's length); channel ch belongs to this chunk only;
                                // the run's accumulators are inside acc, this task's own.
                                unsafe {
                                    epilogue.write_run(
                                        (acc.as_ptr().add(first), acc_cs),
                                        factors,
                                        out.ptr(),
                                        at,
                                        run.len,
                                    );
                                }
                            }
                        }
                    }
                }
            })
        });
    });
    groups.len()
}

/// The backward pass of a streaming plan: the input gradient into `dx` (zeroed, all
/// images) when given, and a new weight gradient when `need_w`; with the number of
/// parallel tasks. The input gradient is summed over the tasks' chunks of primaries:
/// the first task accumulates into the sum, the others into partials added in task
/// order, so the result does not depend on timing.
pub fn backward<T: Real>(
    plan: &ConvPlan,
    x: &[T],
    weight: &[T],
    grad_out: &[T],
    dx: Option<&mut [T]>,
    need_w: bool,
) -> (Option<Vec<T>>, usize) {
    let width = plan.columns();
    let layout = ChunkLayout::new(plan);
    let segment = segment_rows(plan);
    let window = plan.windows[0];
    let pixels = plan.out_pixels();
    let ow = plan.output[1];
    let rings = plan.rings_count();
    let m = plan.primaries;
    let need_x = dx.is_some();
    let area = plan.kernel[0] * plan.kernel[1];
    let patch_len = plan.weight_depth * area;
    let groups = chunk_groups(plan, CHUNK_BACKWARD);
    let mut dw = need_w.then(|| workspace::uninit::<T>(plan.weight_len()));
    let dw_ptr = dw.as_mut().map(|v| SharedMut(v.as_mut_ptr()));
    workspace::with::<T, _>(Slot::Call, |call| {
        runs(plan, 0, width, &mut call.runs);
        let col_rows = plan.col_rows();
        let cols_len = if need_w { col_rows * width } else { 0 };
        let buffer = grow(&mut call.cols, 2 * cols_len);
        let (cols, cols_t) = buffer.split_at_mut(cols_len);
        if need_w {
            im2col(plan, x, &call.runs, width, cols);
            // Pixel-major copy: its ring segments, read as [k, width], are column-major
            // for gemm (no packing per chunk).
            for (i, row) in cols.chunks_exact(width).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    cols_t[j * col_rows + i] = v;
                }
            }
        }
        // Running sums S_r of all primaries, [rings][m, width].
        let sums = grow(&mut call.acc, rings * m * width);
        for r in 0..rings {
            let at = r * m * width;
            if r == 0 {
                sums[..m * width].fill(T::ZERO);
            } else {
                sums.copy_within(at - m * width..at, at);
            }
            let base = plan.channel_base(r, &window);
            for p in 0..plan.emitted(r, &window) {
                let row = &mut sums[at + p * width..at + (p + 1) * width];
                for run in &call.runs {
                    let g =
                        (run.image * plan.out_channels + base + p) * pixels + run.oy * ow + run.ox;
                    add_into(
                        &mut row[run.col..run.col + run.len],
                        &grad_out[g..g + run.len],
                    );
                }
            }
        }
        let dcols_len = if need_x { plan.col_rows() * width } else { 0 };
        let dcols_sum = grow(&mut call.dcols, dcols_len);
        let mut partials = std::mem::take(&mut call.partials);
        if partials.len() < groups.len() - 1 {
            partials.resize_with(groups.len() - 1, Vec::new);
        }
        let mut targets: Vec<&mut [T]> = Vec::with_capacity(groups.len());
        targets.push(dcols_sum);
        for partial in partials.iter_mut().take(groups.len() - 1) {
            targets.push(grow(partial, dcols_len));
        }
        for target in targets.iter_mut() {
            target.fill(T::ZERO);
        }
        let (cols_t, sums): (&[T], &[T]) = (cols_t, sums);
        for_each_group(&groups, targets, |partial, first, last| {
            workspace::with::<T, _>(Slot::Task, |ws| {
                for chunk in first..last {
                    let p0 = chunk * CHUNK_BACKWARD;
                    let rows = CHUNK_BACKWARD.min(m - p0);
                    let buf = grow(&mut ws.weight, 2 * rows * layout.len_per_row);
                    let (wbuf, dwbuf) = buf.split_at_mut(rows * layout.len_per_row);
                    if need_x {
                        load_chunk(plan, &layout, weight, p0, rows, wbuf);
                    }
                    for (r, &seg) in segment.iter().enumerate() {
                        let (_, ld, ref index) = layout.rings[r];
                        let k = plan.window_depth * index.len();
                        let s_r = r * m * width + p0 * width;
                        let ring_at = layout.offset(r, rows);
                        if need_w {
                            // dW_r[rows, k] = S_r[rows, width] * X_r[k, width]^T (one tile:
                            // every column at once, so the chunk's ring is written once).
                            // SAFETY: dwbuf ring r is rows x ld; S_r rows of width; the
                            // pixel-major segment holds width pixels of k values.
                            unsafe {
                                gemm(
                                    [rows, k, width],
                                    dwbuf.as_mut_ptr().add(ring_at),
                                    [1, ld],
                                    false,
                                    sums.as_ptr().add(s_r),
                                    [1, width],
                                    cols_t.as_ptr().add(seg),
                                    [1, col_rows],
                                    gemm::Parallelism::None,
                                );
                            }
                        }
                        if need_x {
                            // dX_r[k, width] += W_r[rows, k]^T * S_r[rows, width]
                            // SAFETY: partial has the column matrix's shape; wbuf ring r
                            // is rows x ld.
                            unsafe {
                                gemm(
                                    [k, width, rows],
                                    partial.as_mut_ptr().add(seg * width),
                                    [1, width],
                                    true,
                                    wbuf.as_ptr().add(ring_at),
                                    [ld, 1],
                                    sums.as_ptr().add(s_r),
                                    [1, width],
                                    gemm::Parallelism::None,
                                );
                            }
                        }
                    }
                    if let Some(dw) = dw_ptr {
                        // The chunk's weight gradient into [m, depth, kh, kw].
                        for p in 0..rows {
                            // SAFETY: primary p0 + p's patches lie inside the weight
                            // gradient's allocation and only this chunk writes them.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(
                                    dw.ptr().add((p0 + p) * patch_len) as *mut MaybeUninit<T>,
                                    patch_len,
                                )
                            };
                            for (r, (_, ld, index)) in layout.rings.iter().enumerate() {
                                let row = &dwbuf[layout.offset(r, rows) + p * ld..][..*ld];
                                for (patch, src) in dst
                                    .chunks_exact_mut(area)
                                    .zip(row.chunks_exact(index.len()))
                                {
                                    for (&v, &i) in src.iter().zip(index) {
                                        patch[i].write(v);
                                    }
                                }
                            }
                        }
                    }
                }
            })
        });
        if let Some(dx) = dx {
            let dcols = grow(&mut call.dcols, dcols_len);
            add_in_order(dcols, &partials[..groups.len() - 1]);
            col2im(plan, dcols, &call.runs, width, 0, dx);
        }
        call.partials = partials;
    });
    if let Some(dw) = dw.as_mut() {
        // SAFETY: the chunks cover every primary and the rings every position, so every
        // value was written.
        unsafe { dw.set_len(plan.weight_len()) };
    }
    (dw, groups.len())
}
