//! The nested forward and backward passes over tiles of output columns: the choice of
//! path (shifted views, im2col or the streaming kernel) and the public entry points here;
//! the shared primitives in [`primitives`], the tile tasks in [`tasks`].

mod primitives;
mod tasks;

pub(crate) use primitives::split;
pub(crate) use primitives::{
    accumulator_strides, add_in_order, add_into, gemm, gemm_gathered, gemm_panels, lhs_panels,
    push_segment, rhs_panels, ring_block, tile_moments, windows_partition_channels, Accumulator,
    BackwardArgs, ForwardPanels, ForwardTiles, SharedMut, TaskInput, TileSegments, PARALLEL_WEIGHT,
};
use primitives::{from_ring_layout, to_ring_layout, Layout};
use tasks::{backward_tasks, bias_gradient, forward_task};

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::epilogue::Epilogue;
use super::moments::{channel_moments, merge_tiles, Moments, TileMoments};
use super::plan::{ConvPlan, LiveCrops};
use super::sgemm;
use super::shifted;
use super::small_map::SmallMap;
use super::streaming::{self, StreamWeight};
use super::trace::{self, Layout as Traced, Pass};
use super::tuning::{self, Strategy};
use super::workspace::{self, grow, Slot};
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

/// Whether the ring layout of the plan's weight is the weight itself (one ring holding
/// every kernel position in row-major order: a dense convolution), so that it is read in
/// place instead of copied.
fn ring_layout_is_identity(plan: &ConvPlan) -> bool {
    let [kh, kw] = plan.kernel;
    match plan.rings.as_slice() {
        [ring] => {
            ring.len() == kh * kw
                && ring
                    .iter()
                    .enumerate()
                    .all(|(i, &(ky, kx))| ky * kw + kx == i)
        }
        _ => false,
    }
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

/// Whether this plan writes a pooling [`Epilogue`]'s output straight from its tiles: on
/// the shifted path, whose tiles then hold whole pairs of output rows.
fn pools_in_tiles(plan: &ConvPlan) -> bool {
    use_shifted(plan) && plan.output[0].is_multiple_of(2)
}

impl ConvPlan {
    /// Whether a forward pass with a pooling [`Epilogue`] pools in its output write. Where
    /// it does not, [`forward_packed`] writes the full output to scratch and pools it
    /// after, which saves nothing over a pooling of its own.
    pub fn pools_in_write(&self) -> bool {
        let live = self.on_live_window();
        pools_in_tiles(live.as_ref().map_or(self, |(live, _)| live))
    }
}

/// Whether this plan streams its weight (see [`streaming`]).
fn use_streaming(plan: &ConvPlan) -> bool {
    match plan.tuning.strategy {
        Strategy::Stream => streaming::suits(plan, true),
        // Where sgemm multiplies the whole weight with the columns at once (enough columns
        // to fill its tiles), the general path reads the weight once too.
        Strategy::Auto => {
            streaming::suits(plan, false) && !sgemm::fills::<f32>(plan.primaries, plan.columns())
        }
        Strategy::Im2col | Strategy::Shifted => false,
    }
}

/// Columns per tile for this plan: the tile's column matrix (im2col) or one position's
/// view of a window (shifted) holds about `TILE_VALUES` values.
fn tile_columns(plan: &ConvPlan, shifted: bool) -> usize {
    if let Some(columns) = plan.tuning.tile_columns {
        return columns.max(1);
    }
    if weight_in_one_tile(plan, shifted) {
        return plan.columns().max(1);
    }
    let tile = (tuning::TILE_VALUES / tile_rows(plan, shifted).max(1)).max(32);
    tile.div_ceil(16) * 16
}

/// Rows of a tile's column matrix (im2col) or of one position's view (shifted).
fn tile_rows(plan: &ConvPlan, shifted: bool) -> usize {
    if shifted {
        plan.window_depth
    } else {
        plan.col_rows()
    }
}

/// Whether the weight is larger than all the columns' matrix, and so read once, by one
/// tile of them all.
fn weight_in_one_tile(plan: &ConvPlan, shifted: bool) -> bool {
    plan.weight_len() >= tile_rows(plan, shifted).saturating_mul(plan.columns())
}

/// Columns per tile of a forward pass: as [`tile_columns`], and, where the tuning leaves
/// the width to the kernels and the weight is not read by one tile of all the columns, a
/// tile's accumulator (the window's rows by the tile's columns) holds at most
/// `TILE_VALUES` values unless that cuts the tile below [`ACCUMULATOR_TILE_FLOOR`]
/// columns. An expanding layer (few input channels, many output rows) otherwise sizes its
/// tile by its narrow input alone, and its accumulator crowds the view and the output out
/// of L2 (ResNet-50's 64 -> 256 1 x 1 at 56 x 56, batch 1: 2048-column tiles 0.67 ms, 3.2
/// ms from cold caches; 480-column ones 0.56 and 2.1 ms). The backward keeps
/// [`tile_columns`]: its tiles order the weight gradient's sums, so a change there would
/// change training's bits.
fn forward_tile_columns(plan: &ConvPlan, shifted: bool) -> usize {
    let tile = tile_columns(plan, shifted);
    if plan.tuning.tile_columns.is_some() || weight_in_one_tile(plan, shifted) {
        return tile;
    }
    let acc_rows = plan.windows.iter().map(|w| w.rows).max().unwrap_or(0);
    let capped = (tuning::TILE_VALUES / acc_rows.max(1)).max(ACCUMULATOR_TILE_FLOOR);
    tile.min(capped)
}

/// The narrowest tile [`forward_tile_columns`] cuts for its accumulator's sake: below, a
/// tile's product is too short to pay for its packing (at 28 x 28 and 14 x 14, splitting a
/// task's 196-392 columns into tiles of 208 or 112 was 3-25 % slower).
const ACCUMULATOR_TILE_FLOOR: usize = 512;

/// Number of parallel tasks for `columns` output columns of `plan`.
fn task_count(plan: &ConvPlan, columns: usize) -> usize {
    tasks_from(plan.tuning.min_task_columns, columns)
}

/// Number of parallel tasks for `columns` output columns, each at least `min_columns`.
fn tasks_from(min_columns: usize, columns: usize) -> usize {
    let threads = crate::threads();
    if threads <= 1 || columns < threads.saturating_mul(min_columns) {
        1
    } else {
        threads
    }
}

/// Number of parallel tasks of a forward pass over `columns` output columns of `plan`.
///
/// A pass that gathers its columns (im2col, or a shifted pass over every kernel but an
/// unpadded 1 x 1) splits them from a quarter of the tuning's `min_task_columns` on. As
/// one task, sgemm would split the product by rows, and every thread would gather all of
/// `rhs` again (measured at batch 1: 512 -> 512 3 x 3 spatial at 14 x 14, shifted, 2.6 ->
/// 2.1 ms, dense 4.3 -> 3.9 ms; 256 -> 256 3 x 3 / 2 spatial at 28 x 28, im2col, 1.4-1.8
/// -> 0.74 ms). A shifted 1 x 1 read in place, whose `rhs` is a plain copy, is faster
/// split by rows.
fn forward_task_count(plan: &ConvPlan, columns: usize, shifted: bool) -> usize {
    if !(shifted && shifted::reads_in_place(plan)) {
        tasks_from((plan.tuning.min_task_columns / 4).max(1), columns)
    } else {
        task_count(plan, columns)
    }
}

/// gemm parallelism for a call that runs `tasks` tasks.
fn gemm_parallelism(tasks: usize) -> gemm::Parallelism {
    let threads = crate::threads();
    if tasks == 1 && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// The forward pass: `[batch, n, out_h, out_w]` from the input `[batch, c, h, w]`, the
/// primary weight `[m, depth, kh, kw]` and the bias `[n]`. Kernel positions that read
/// padding only are skipped ([`ConvPlan::on_live_window`]).
///
/// # Panics
/// If a slice length does not match the plan.
pub fn forward<T: Real>(plan: &ConvPlan, x: &[T], weight: &[T], bias: Option<&[T]>) -> Vec<T> {
    forward_plain(plan, x, weight, bias, false).0
}

/// [`forward`], and each output channel's [`Moments`] over the batch: a training batch
/// norm's statistics, taken tile by tile as the output is written (while each tile is
/// still in the cache) where the pass runs in tiles, from the finished output otherwise.
/// The moments depend on the plan and the thread count only, never on timing.
///
/// # Panics
/// If a slice length does not match the plan.
pub fn forward_with_moments<T: Real>(
    plan: &ConvPlan,
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
) -> (Vec<T>, Vec<Moments>) {
    let (out, moments) = forward_plain(plan, x, weight, bias, true);
    let [batch, channels, h, w] = plan.output_shape();
    let moments = moments.unwrap_or_else(|| channel_moments(&out, [batch, channels, h * w]));
    (out, moments)
}

/// [`forward`], with the tiles' moments where `moments` asks for them and the pass takes
/// them (`None` where it does not).
fn forward_plain<T: Real>(
    plan: &ConvPlan,
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    moments: bool,
) -> (Vec<T>, Option<Vec<Moments>>) {
    assert_eq!(weight.len(), plan.weight_len(), "weight length");
    if let Some(live) = plan.live_crops() {
        let narrowed = narrow_weight(plan, weight, live.window);
        if live.merged_crops == 0 {
            return forward_plain(&live.plan, x, &narrowed, bias, moments);
        }
        let out = forward(&live.plan, x, &narrowed, None);
        return (spread_crops(plan, &live, &out, bias), None);
    }
    if let Some(result) = super::winograd_nchw::forward(plan, x, weight, bias, moments) {
        return result;
    }
    let epilogue = Epilogue::bias(bias);
    check_forward(plan, x, &epilogue);
    if let Some(map) = SmallMap::new(plan) {
        trace::note(Pass::Forward, Traced::WholeMap, 1);
        return (map.forward(x, weight, bias), None);
    }
    let len = plan.output_len();
    // Every output value is written exactly once (each channel comes from one crop,
    // window and primary; each pixel from one tile), so the buffer starts uninitialized
    // and is only written through raw pointers.
    let mut out = workspace::uninit(len);
    let moments = forward_core(
        plan,
        x,
        Weight::Plain(weight),
        &epilogue,
        SharedMut(out.as_mut_ptr()),
        moments,
    );
    // SAFETY: forward_core wrote all `len` values.
    unsafe { out.set_len(len) };
    (out, moments)
}

/// Offsets inside one `kh x kw` filter of the positions of `window` (`[[first row, rows],
/// [first column, columns]]`), row by row.
fn window_offsets(plan: &ConvPlan, [[y0, rows], [x0, cols]]: [[usize; 2]; 2]) -> Vec<usize> {
    let kw = plan.kernel[1];
    (y0..y0 + rows)
        .flat_map(|y| (x0..x0 + cols).map(move |x| y * kw + x))
        .collect()
}

/// The positions `window` of a weight `[m, depth, kh, kw]` of `plan`: `[m, depth, rows,
/// columns]`. (Value by value: the windows are a value or a few wide, where a copy call
/// per row cost more than the values; filters in parallel, as a pass over the whole
/// weight it is memory bound: ResNet's 512-channel 3 x 3 layers at a 1 x 1 map read 9.4
/// MB of weight for 1 MB of centre taps.)
fn narrow_weight<T: Real>(plan: &ConvPlan, weight: &[T], window: [[usize; 2]; 2]) -> Vec<T> {
    let offsets = window_offsets(plan, window);
    let filter_len = plan.kernel[0] * plan.kernel[1];
    let filters = weight.len() / filter_len;
    let mut narrowed = vec![T::ZERO; filters * offsets.len()];
    if offsets.is_empty() {
        return narrowed;
    }
    narrowed
        .par_chunks_mut(offsets.len() * FILTERS_PER_TASK)
        .zip(weight.par_chunks(filter_len * FILTERS_PER_TASK))
        .for_each(|(narrowed, weight)| {
            for (to, filter) in narrowed
                .chunks_exact_mut(offsets.len())
                .zip(weight.chunks_exact(filter_len))
            {
                for (to, &o) in to.iter_mut().zip(&offsets) {
                    *to = filter[o];
                }
            }
        });
    narrowed
}

/// The inverse of [`narrow_weight`]: a weight of `plan` holding `narrowed` at `window`
/// and zeros elsewhere (the gradient of the positions that read padding only).
fn widen_weight<T: Real>(plan: &ConvPlan, narrowed: &[T], window: [[usize; 2]; 2]) -> Vec<T> {
    let offsets = window_offsets(plan, window);
    let filter_len = plan.kernel[0] * plan.kernel[1];
    let len = plan.weight_len();
    let filters = len / filter_len.max(1);
    assert_eq!(len, filters * filter_len, "widen_weight: whole filters");
    assert_eq!(
        narrowed.len(),
        filters * offsets.len(),
        "widen_weight: narrowed length"
    );
    if offsets.is_empty() {
        return vec![T::ZERO; len];
    }
    // Zeroed and filled chunk by chunk in one parallel pass (not a serial zeroing pass
    // over the whole weight first).
    let mut weight = workspace::uninit(len);
    weight.spare_capacity_mut()[..len]
        .par_chunks_mut(filter_len * FILTERS_PER_TASK)
        .zip(narrowed.par_chunks(offsets.len() * FILTERS_PER_TASK))
        .for_each(|(slots, values)| {
            let weight = workspace::zeroed_slots(slots);
            for (filter, values) in weight
                .chunks_exact_mut(filter_len)
                .zip(values.chunks_exact(offsets.len()))
            {
                for (&o, &value) in offsets.iter().zip(values) {
                    filter[o] = value;
                }
            }
        });
    // SAFETY: `uninit` made room for `len` values; the chunks cover the first `len` spare
    // slots exactly (`len = filters * filter_len` and `narrowed` holds `filters` filters
    // of `offsets.len()` values, both checked above, so both sides have the same number
    // of chunks), and every task zeroed each slot of its chunk before this line (a task's
    // panic reaches this thread first).
    unsafe { weight.set_len(len) };
    weight
}

/// Filters a task of [`narrow_weight`] and [`widen_weight`] copies.
const FILTERS_PER_TASK: usize = 4096;

/// The output of `plan` from the output `out` of its narrowed plan `live` (whose crop 0
/// stands for the merged crops as well), plus the bias.
fn spread_crops<T: Real>(
    plan: &ConvPlan,
    live: &LiveCrops,
    out: &[T],
    bias: Option<&[T]>,
) -> Vec<T> {
    let pixels = plan.out_pixels();
    let mut spread = Vec::with_capacity(plan.output_len());
    for image in out.chunks_exact(live.plan.out_channels * pixels) {
        for channel in 0..plan.out_channels {
            let from = live.channel(channel) * pixels;
            let shift = bias.map_or(T::ZERO, |bias| bias[channel]);
            spread.extend(image[from..from + pixels].iter().map(|&v| v + shift));
        }
    }
    spread
}

/// The output gradient of the narrowed plan `live` from `plan`'s: the gradients of the
/// merged crops summed into its crop 0, channel by channel in increasing order.
fn gather_crops<T: Real>(plan: &ConvPlan, live: &LiveCrops, grad_out: &[T]) -> Vec<T> {
    let pixels = plan.out_pixels();
    let mut gathered = vec![T::ZERO; live.plan.output_len()];
    for (image, grad) in gathered
        .chunks_exact_mut(live.plan.out_channels * pixels)
        .zip(grad_out.chunks_exact(plan.out_channels * pixels))
    {
        for (channel, values) in grad.chunks_exact(pixels).enumerate() {
            let to = live.channel(channel) * pixels;
            for (sum, &v) in image[to..to + pixels].iter_mut().zip(values) {
                *sum += v;
            }
        }
    }
    gathered
}

/// A weight laid out once for many forward passes ([`forward_packed`]): the ring layout
/// the gemm calls read (as sgemm's panels only, where they serve every product), or the
/// plain layout where the plan streams its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight<T> {
    values: Vec<T>,
    /// Ring layout (else the streaming kernel's chunk layout).
    ringed: bool,
    /// The ring layout's blocks in sgemm's panels (`f32` on a CPU with a micro-kernel).
    panels: Option<ForwardPanels>,
    /// The chunks' rings in sgemm's panels (chunk layout, where sgemm runs its products).
    chunks: Option<Vec<sgemm::Panels>>,
    shape: [usize; 4],
    rings: Vec<Vec<(usize, usize)>>,
}

impl<T: Real> PackedWeight<T> {
    /// Lays out `weight` (`[m, depth, kh, kw]`) for the plans that share `plan`'s weight
    /// shape, rings and layout choice: the ring layout, or the streaming kernel's chunks.
    /// Only the kernel positions some output reads inside the input are kept
    /// ([`ConvPlan::on_live_window`]).
    ///
    /// # Panics
    /// If the weight's length does not match the plan.
    pub fn new(plan: &ConvPlan, weight: &[T]) -> Self {
        assert_eq!(weight.len(), plan.weight_len(), "weight length");
        if let Some((live, window)) = plan.on_live_window() {
            return Self::new(&live, &narrow_weight(plan, weight, window));
        }
        let ringed = !streams(plan);
        let mut panels = None;
        let mut chunks = None;
        let values = if ringed {
            let layout = Layout::new(plan);
            let mut values = vec![T::ZERO; plan.weight_len()];
            to_ring_layout(plan, &layout, weight, &mut values);
            panels = ForwardPanels::new(plan, &layout, &values);
            if panels.as_ref().is_some_and(|p| p.covers(plan)) {
                // Every product reads the panels (sgemm runs them all): the ring layout
                // would only double the weight's memory.
                values = Vec::new();
            }
            values
        } else {
            let values = streaming::pack_chunks(plan, weight);
            chunks = streaming::chunk_panels(plan, &values);
            values
        };
        Self {
            values,
            ringed,
            panels,
            chunks,
            shape: plan.weight_shape(),
            rings: plan.rings.clone(),
        }
    }

    /// Whether `plan` reads this weight as it is laid out.
    pub fn fits(&self, plan: &ConvPlan) -> bool {
        let live = plan.on_live_window();
        self.fits_narrowed(live.as_ref().map_or(plan, |(live, _)| live))
    }

    /// [`fits`](Self::fits) for a plan already narrowed to its live window.
    fn fits_narrowed(&self, plan: &ConvPlan) -> bool {
        self.shape == plan.weight_shape()
            && self.rings == plan.rings
            && self.ringed != streams(plan)
            && (!self.values.is_empty() || self.panels.as_ref().is_some_and(|p| p.fits(plan)))
    }

    /// Bytes of the values (and of their panels, where the forward pass has them).
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.values.as_slice())
            + self.panels.as_ref().map_or(0, ForwardPanels::bytes)
            + self
                .chunks
                .iter()
                .flatten()
                .map(sgemm::Panels::bytes)
                .sum::<usize>()
    }
}

/// The forward pass with a packed weight and an [`Epilogue`], into `out`
/// (`[batch, n, out_h, out_w]`, or the pooled `[batch, n, out_h / 2, out_w / 2]` for a
/// pooling epilogue; every value overwritten).
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
    // The weight holds the live window's positions only (see `PackedWeight::new`).
    let live = plan.on_live_window();
    let plan = live.as_ref().map_or(plan, |(live, _)| live);
    assert!(
        weight.fits_narrowed(plan),
        "packed weight laid out for another plan"
    );
    check_forward(plan, x, epilogue);
    assert_eq!(out.len(), epilogue.output_len(plan), "output length");
    let source = if weight.ringed {
        Weight::Ringed(&weight.values, weight.panels.as_ref())
    } else {
        Weight::Chunked(&weight.values, weight.chunks.as_deref())
    };
    forward_core(
        plan,
        x,
        source,
        epilogue,
        SharedMut(out.as_mut_ptr()),
        false,
    );
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
    /// Already in ring layout (never for a streaming plan), with its blocks in panels
    /// where they were made.
    Ringed(&'a [T], Option<&'a ForwardPanels>),
    /// Already in the streaming kernel's chunk layout (only for a streaming plan).
    Chunked(&'a [T], Option<&'a [sgemm::Panels]>),
}

/// The forward pass into `out`, which must hold `epilogue.output_len(plan)` values
/// (lengths checked by the callers); writes every one of them. Where `moments` asks, and
/// the pass runs in tiles, returns each channel's moments over the output, merged from
/// the tiles' in column order.
///
/// # Panics
/// If `moments` asks for the moments of a pooled output.
fn forward_core<T: Real>(
    plan: &ConvPlan,
    x: &[T],
    weight: Weight<'_, T>,
    epilogue: &Epilogue<'_, T>,
    out: SharedMut<T>,
    moments: bool,
) -> Option<Vec<Moments>> {
    assert!(
        !(moments && epilogue.pool),
        "the moments of a pooled output are not taken"
    );
    if plan.output_len() == 0 {
        return None;
    }
    if epilogue.pool && !pools_in_tiles(plan) {
        let full_epilogue = Epilogue {
            pool: false,
            ..*epilogue
        };
        let mut full = workspace::zeroed::<T>(plan.output_len());
        forward_core(
            plan,
            x,
            weight,
            &full_epilogue,
            SharedMut(full.as_mut_ptr()),
            false,
        );
        // SAFETY: the caller's promise: out holds the pooled output's values, and only
        // this call writes them.
        let out = unsafe { std::slice::from_raw_parts_mut(out.ptr(), epilogue.output_len(plan)) };
        pool_pairs(plan, &full, out);
        return None;
    }
    let layout = Layout::new(plan);
    let shifted = use_shifted(plan);
    let tile = forward_tile_columns(plan, shifted);
    if streams(plan) {
        let weight = match weight {
            Weight::Plain(weight) => StreamWeight::Plain(weight),
            Weight::Chunked(packed, panels) => StreamWeight::Chunked(packed, panels),
            Weight::Ringed(..) => {
                unreachable!("a streaming plan's weight is never packed in ring layout")
            }
        };
        let tasks = streaming::forward(plan, x, weight, epilogue, out);
        trace::note(Pass::Forward, Traced::Streaming, tasks);
        return None;
    }
    workspace::with::<T, _>(Slot::Call, |call| {
        let (ringed, prepared): (&[T], _) = match weight {
            Weight::Ringed(ringed, panels) => (ringed, panels),
            Weight::Plain(weight) if ring_layout_is_identity(plan) => (weight, None),
            Weight::Plain(weight) => {
                let ringed = grow(&mut call.weight, plan.weight_len());
                to_ring_layout(plan, &layout, weight, ringed);
                (ringed, None)
            }
            Weight::Chunked(..) => {
                unreachable!("only a streaming plan's weight is packed in chunks")
            }
        };
        // The weight blocks in panels: the packed weight's, or laid out now (once for all
        // the tiles that read them).
        // (Laid out now, into the buffers of the thread's previous call: a training step
        // lays every layer's weight out again, and fresh allocations cost page faults.)
        let mut made = None;
        let panels = match prepared {
            Some(panels) if panels.fits(plan) => Some(panels),
            _ => {
                made = ForwardPanels::refill(call.panels.take(), plan, &layout, ringed);
                made.as_ref()
            }
        };
        let columns = if shifted {
            plan.batch * shifted::Padded::new(plan).wide_columns(plan)
        } else {
            plan.columns()
        };
        // A pooled write needs whole pairs of output rows in every tile.
        let pair = if epilogue.pool {
            2 * shifted::Padded::new(plan).wp
        } else {
            1
        };
        let tile = (tile / pair).max(1) * pair;
        let tasks: Vec<_> = split(columns / pair, forward_task_count(plan, columns, shifted))
            .into_iter()
            .map(|(start, end)| (start * pair, end * pair))
            .collect();
        let traced = if shifted {
            Traced::Shifted
        } else {
            Traced::Im2col
        };
        trace::note(Pass::Forward, traced, tasks.len());
        let parallelism = gemm_parallelism(tasks.len());
        // Each task's tiles' moments, in tile order.
        let run = |&range: &(usize, usize)| {
            let mut tiles_moments = Vec::new();
            workspace::with::<T, _>(Slot::Task, |ws| {
                let task = (plan, &layout, x, ringed);
                let tiles = (range, tile, parallelism);
                let sink = moments.then_some(&mut tiles_moments);
                if shifted {
                    shifted::forward_task(task, panels, ws, epilogue, out, tiles, sink)
                } else {
                    forward_task(task, panels, ws, epilogue, out, tiles, sink)
                }
            });
            tiles_moments
        };
        let tiles_moments: Vec<TileMoments> = if tasks.len() == 1 {
            run(&tasks[0])
        } else {
            tasks.par_iter().flat_map_iter(run).collect()
        };
        if made.is_some() {
            call.panels = made;
        }
        moments.then(|| merge_tiles(tiles_moments, plan.out_channels()))
    })
}

/// The 2 x 2 max pooling of stride 2 (floor mode) of the output `full` into `out`, as a
/// pooling [`Epilogue`] defines it.
fn pool_pairs<T: Real>(plan: &ConvPlan, full: &[T], out: &mut [T]) {
    let [h, w] = plan.output;
    let pooled_w = w / 2;
    if pooled_w == 0 || h < 2 {
        return;
    }
    for (plane, out) in full
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut((h / 2) * pooled_w))
    {
        for (pair, dst) in plane
            .chunks_exact(2 * w)
            .zip(out.chunks_exact_mut(pooled_w))
        {
            crate::pool::pool_row_pair(&pair[..2 * pooled_w], &pair[w..w + 2 * pooled_w], dst);
        }
    }
}

/// The backward pass: the gradients `needs` asks for, from the forward's input and
/// weight and the output gradient `[batch, n, out_h, out_w]`.
///
/// The result depends on the plan and the thread count only, never on timing: parallel
/// partial sums are added in task order. Kernel positions that read padding only are
/// skipped, their weight gradient is zero ([`ConvPlan::on_live_window`]).
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
    if let Some(live) = plan.live_crops() {
        let narrowed = narrow_weight(plan, weight, live.window);
        let mut gradients = if live.merged_crops == 0 {
            backward(&live.plan, x, &narrowed, grad_out, needs)
        } else {
            let grad_live = gather_crops(plan, &live, grad_out);
            let needs_live = Needs {
                bias: false,
                ..needs
            };
            let mut gradients = backward(&live.plan, x, &narrowed, &grad_live, needs_live);
            gradients.bias = needs.bias.then(|| bias_gradient(plan, grad_out));
            gradients
        };
        gradients.weight = gradients
            .weight
            .map(|dw| widen_weight(plan, &dw, live.window));
        return gradients;
    }
    let bias = needs.bias.then(|| bias_gradient(plan, grad_out));
    let shifted = use_shifted(plan);
    let tiled = (needs.x || needs.weight) && plan.columns() > 0;
    if let Some(map) = tiled.then(|| SmallMap::new(plan)).flatten() {
        trace::note(Pass::Backward, Traced::WholeMap, 1);
        let (dx, dw) = map.backward((x, weight, grad_out), [needs.x, needs.weight]);
        return Gradients {
            x: dx,
            weight: dw,
            bias,
        };
    }
    if tiled && super::winograd_nchw::suits::<T>(plan) {
        let len = plan.input_len();
        let mut dx = needs.x.then(|| workspace::uninit(len));
        let spare = dx.as_mut().map(|dx| &mut dx.spare_capacity_mut()[..len]);
        let passes = (x, weight, grad_out);
        if let Some(dw) = super::winograd_nchw::backward(plan, passes, spare, needs.weight) {
            if let Some(dx) = dx.as_mut() {
                // SAFETY: the capacity is `len`, and the Winograd pass wrote every one of
                // its values.
                unsafe { dx.set_len(len) };
            }
            return Gradients {
                x: dx,
                weight: dw,
                bias,
            };
        }
    }
    if tiled && !shifted && use_streaming(plan) {
        let mut dx = needs.x.then(|| workspace::zeroed(plan.input_len()));
        let (dw, tasks) =
            streaming::backward(plan, x, weight, grad_out, dx.as_deref_mut(), needs.weight);
        trace::note(Pass::Backward, Traced::Streaming, tasks);
        return Gradients {
            x: dx,
            weight: dw,
            bias,
        };
    }
    let (dx, dw) = if tiled {
        let len = plan.input_len();
        let mut dx = needs.x.then(|| workspace::uninit(len));
        let dw = tiled_backward(
            plan,
            (x, weight, grad_out),
            dx.as_mut().map(|dx| &mut dx.spare_capacity_mut()[..len]),
            needs.weight,
        );
        if let Some(dx) = dx.as_mut() {
            // SAFETY: the capacity is `len`, and `tiled_backward` wrote every one of its
            // values.
            unsafe { dx.set_len(len) };
        }
        (dx, dw)
    } else {
        (
            needs.x.then(|| workspace::zeroed(plan.input_len())),
            needs.weight.then(|| vec![T::ZERO; plan.weight_len()]),
        )
    };
    Gradients {
        x: dx,
        weight: dw,
        bias,
    }
}

/// The backward pass through tiles (the shifted or the im2col path) of a plan with
/// output columns: every value of the input gradient written into `dx` where given
/// (whatever it held), and the weight gradient returned where `weight_gradient`.
fn tiled_backward<T: Real>(
    plan: &ConvPlan,
    (x, weight, grad_out): (&[T], &[T], &[T]),
    dx: Option<&mut [MaybeUninit<T>]>,
    weight_gradient: bool,
) -> Option<Vec<T>> {
    let layout = Layout::new(plan);
    workspace::with::<T, _>(Slot::Call, |call| {
        let weight_len = plan.weight_len();
        let dw_len = if weight_gradient { weight_len } else { 0 };
        let identity = ring_layout_is_identity(plan);
        let ringed_len = if identity { 0 } else { weight_len };
        let buffer = grow(&mut call.weight, ringed_len + dw_len);
        let (ringed, dw_ringed) = buffer.split_at_mut(ringed_len);
        let ringed: &[T] = if identity {
            weight
        } else {
            to_ring_layout(plan, &layout, weight, ringed);
            ringed
        };
        let tasks = backward_tasks(
            (plan, &layout, x, ringed),
            grad_out,
            dx,
            weight_gradient.then_some(&mut *dw_ringed),
            &mut call.partials,
        );
        let traced = if use_shifted(plan) {
            Traced::Shifted
        } else {
            Traced::Im2col
        };
        trace::note(Pass::Backward, traced, tasks);
        weight_gradient.then(|| {
            if identity {
                dw_ringed.to_vec()
            } else {
                from_ring_layout(plan, &layout, dw_ringed)
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dense plan's weight is read in place; reordered or split positions are copied.
    #[test]
    fn only_one_row_major_ring_is_the_identity_layout() {
        let dense = |kernel: usize| {
            let pad = kernel / 2;
            ConvPlan::dense(
                [1, 4, 6, 6],
                8,
                [kernel; 2],
                [1, 1],
                [1, 1],
                1,
                [(pad, pad); 2],
            )
            .unwrap()
        };
        assert!(ring_layout_is_identity(&dense(3)));
        assert!(ring_layout_is_identity(&dense(1)));
        let mut swapped = dense(3);
        swapped.rings[0].swap(0, 4);
        assert!(!ring_layout_is_identity(&swapped));
        let mut ringed = dense(3);
        let centre = ringed.rings[0].remove(4);
        ringed.rings.push(vec![centre]);
        assert!(!ring_layout_is_identity(&ringed));
    }

    /// The tiled backward passes write every value of the input gradient, whatever the
    /// buffer held (`backward` hands them an uninitialised one): a gradient poisoned with
    /// NaN comes back with the bits of one that started at zero, on the shifted and the
    /// im2col path, dense, grouped (windows that partition the channels) and versatile
    /// with overlapping channel windows, padded unevenly, over one and three threads.
    #[test]
    fn tiled_backward_writes_every_input_gradient_value() {
        use crate::nhwc::tests::square_rings;
        use crate::plan::{PlanSpec, Window};
        use crate::tuning::Tuning;
        let window = |j, in_offset, weight_offset, first_primary, rows| Window {
            j,
            in_offset,
            weight_offset,
            first_primary,
            rows,
        };
        let dense = PlanSpec {
            input: [2, 3, 7, 6],
            kernel: [3, 3],
            stride: [1, 1],
            dilation: [1, 2],
            padding: [(1, 0), (2, 1)],
            out_channels: 5,
            primaries: 5,
            n_c: 1,
            window_depth: 3,
            weight_depth: 3,
            rings: vec![square_rings(3).concat()],
            windows: vec![window(0, 0, 0, 0, 5)],
        };
        let grouped = PlanSpec {
            input: [3, 4, 5, 5],
            padding: [(1, 1), (0, 2)],
            dilation: [1, 1],
            out_channels: 6,
            primaries: 6,
            window_depth: 2,
            weight_depth: 2,
            windows: vec![window(0, 0, 0, 0, 3), window(0, 2, 0, 3, 3)],
            ..dense.clone()
        };
        let versatile = PlanSpec {
            input: [3, 6, 8, 7],
            kernel: [5, 5],
            dilation: [1, 1],
            padding: [(2, 2), (1, 2)],
            out_channels: 14,
            primaries: 2,
            n_c: 3,
            window_depth: 4,
            weight_depth: 6,
            rings: square_rings(5),
            windows: (0..3).map(|j| window(j, j, j, 0, 2)).collect(),
            ..dense.clone()
        };
        let value = |i: usize| ((i * 7919) % 255) as f32 / 255.0 - 0.5;
        for spec in [dense, grouped, versatile] {
            for strategy in [Strategy::Shifted, Strategy::Im2col] {
                let tuning = Tuning {
                    strategy,
                    tile_columns: Some(7),
                    min_task_columns: 4,
                    ..Tuning::DEFAULT
                };
                let plan = ConvPlan::new(spec.clone()).unwrap().with_tuning(tuning);
                let x: Vec<f32> = (0..plan.input_len()).map(value).collect();
                let w: Vec<f32> = (0..plan.weight_len()).map(|i| value(i + 3)).collect();
                let g: Vec<f32> = (0..plan.output_len()).map(|i| value(i + 5)).collect();
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let input_gradient = |fill: f32| {
                        let mut dx = vec![MaybeUninit::new(fill); plan.input_len()];
                        let dw = pool
                            .install(|| tiled_backward(&plan, (&x, &w, &g), Some(&mut dx), true));
                        // SAFETY: every value was initialised by `MaybeUninit::new` above,
                        // and since only ever overwritten with initialised values.
                        let dx: Vec<f32> =
                            dx.into_iter().map(|v| unsafe { v.assume_init() }).collect();
                        (dx, dw)
                    };
                    let (poisoned, dw_poisoned) = input_gradient(f32::NAN);
                    let (zeroed, dw_zeroed) = input_gradient(0.0);
                    let what = format!("{spec:?} {strategy:?} on {threads} threads");
                    assert!(
                        poisoned.iter().all(|v| !v.is_nan()),
                        "{what}: a value left unwritten"
                    );
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&poisoned), bits(&zeroed), "{what}");
                    assert_eq!(dw_poisoned, dw_zeroed, "{what}");
                    assert!(
                        zeroed.iter().any(|&v| v != 0.0),
                        "{what}: no gradient at all"
                    );
                }
            }
        }
    }
}
