//! 3 x 3 stride-1 convolutions on channels-first activations by Winograd's F(2 x 2,
//! 3 x 3): the forward pass, the input gradient and the weight gradient of a training
//! step's layers, which [`crate::forward`] and [`crate::backward`] hand here where the
//! plan suits ([`suits`]).
//!
//! The work runs in blocks of whole pairs of output rows. A block's input rows are copied
//! channels-last into a band of scratch (so that the transforms run on vectors of
//! channels, as [`crate::winograd`]'s do), transformed (`V = Bᵀ d B`), multiplied by the
//! sixteen transformed filters on [`NhwcConv`]'s micro-kernel, transformed back (`Aᵀ M
//! A`) into channels-last scratch and copied into the channels-first output, whose batch
//! statistics are taken there while the block is in the cache.
//!
//! - A versatile layer's 1 x 1 crop is a product of the centre pixels with the centre
//!   taps, as in [`crate::winograd`].
//! - The input gradient is the same pass over the output gradient: a 3 x 3 stride-1
//!   convolution with each filter turned half a turn and the input and output channels
//!   swapped, padded `2 - pad`. The 1 x 1 crop's channels add the product of their
//!   gradient with the centre taps.
//! - A layer's channel windows run as one window over every input channel, `n_c * m`
//!   filters each holding its window's taps at the window's channels and zeros elsewhere
//!   ([`ConvPlan::windows_unfolded`]): windows that read overlapping inputs share one
//!   band and one input transform. The weight gradient of those filters is folded back,
//!   window by window in order.
//! - The weight gradient is that of the algorithm itself: `dU_e = Σ (A dY Aᵀ)_e V_e` over
//!   the tiles, then `dW = Gᵀ dU G`. The algorithm computes the convolution exactly (up
//!   to rounding), so this is its gradient.
//!
//! Every block's sums run in an order fixed by the shapes, and the weight gradient's
//! partial sums (one per task, a contiguous range of blocks) are added in task order: the
//! bits depend on the plan and the thread count only.

use std::any::TypeId;
use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::moments::{merge_tiles, Moments, TileMoments};
use crate::nested::{add_in_order, gemm, SharedMut};
use crate::nhwc::NhwcConv;
use crate::plan::ConvPlan;
use crate::trace::{self, Layout as Traced, Pass as TracedPass};
use crate::tuning::Strategy;
use crate::winograd::{
    add, chunks, load, store, sub, transform_filter, transform_patch, transform_products, LANES,
};
use crate::workspace::{self, grow, Slot};
use crate::Real;

/// Bytes of one block's scratch: its rows, patches, products and outputs stay in the
/// last-level cache between the transforms and the products.
const BLOCK_BYTES: usize = 2 << 20;

/// Layers with fewer input channels stay direct: the transforms cost per channel what
/// the products save only when each patch meets many filters.
const MIN_CHANNELS: usize = 16;

/// Nor layers of fewer primaries. At first vgg_small's spatial 32 -> 32 at 28 x 28 (16
/// primaries, batch 128) took 26.7 ms forward and backward against 22.3 direct; after
/// the row tables, the band copy and the transforms on AVX-512, 20.1–22.2 against
/// 21.9–22.4, and its training step gained 4 % (1,291–1,495 against 1,317–1,442
/// images/s, nine pairs alternated).
const MIN_PRIMARIES: usize = 16;

/// Nor layers of fewer output positions.
const MIN_POSITIONS: usize = 64;

/// Whether the plan's passes run here: `f32` on a CPU with the channels-last
/// micro-kernel, a 3 x 3 kernel of stride 1 and no dilation over every input channel
/// (one window and no groups, or channel windows that each read at least 8/9 of the
/// channels, unfolded: [`runnable`]), rings that are all nine taps (dense) or the outer
/// eight and the centre, padding of at most 2 on each side, at least 16 input channels,
/// 16 primaries (`n_c * m` for windows) and 64 output positions, the default strategy,
/// and the environment not saying `VERSATILE_WINOGRAD=0`.
pub(crate) fn suits<T: Real>(plan: &ConvPlan) -> bool {
    runnable::<T>(plan).is_some()
}

/// The plan the passes run for `plan`: the plan itself where it runs as it is, else its
/// channel windows unfolded into one window over every input channel
/// ([`ConvPlan::windows_unfolded`]), so that the windows share one transformed input.
/// The unfolded filters' zeros are multiplied too: only windows that each read at least
/// 8/9 of the input channels are unfolded.
fn runnable<T: Real>(plan: &ConvPlan) -> Option<Cow<'_, ConvPlan>> {
    if runs_as_is::<T>(plan) {
        return Some(Cow::Borrowed(plan));
    }
    if plan.in_channels * 8 > plan.window_depth * 9 {
        return None;
    }
    plan.windows_unfolded()
        .filter(runs_as_is::<T>)
        .map(Cow::Owned)
}

/// [`suits`]'s rules for a plan of one window.
fn runs_as_is<T: Real>(plan: &ConvPlan) -> bool {
    // The bottom and right padding show in the output size only.
    let pad_fits = |axis: usize| {
        let (size, out, before) = (plan.input[axis], plan.output[axis], plan.pad[axis]);
        before <= 2
            && (out + 2)
                .checked_sub(size + before)
                .is_some_and(|after| after <= 2)
    };
    let centre_fits =
        plan.out_channels >= plan.primaries && plan.out_channels - plan.primaries <= plan.primaries;
    TypeId::of::<T>() == TypeId::of::<f32>()
        && plan.tuning.strategy == Strategy::Auto
        && crate::winograd::enabled()
        && crate::winograd::computes(plan)
        && pad_fits(0)
        && pad_fits(1)
        && centre_fits
        && plan.in_channels >= MIN_CHANNELS
        && plan.primaries >= MIN_PRIMARIES
        && plan.batch * plan.output[0] * plan.output[1] >= MIN_POSITIONS
}

/// `values` as `f32` where `T` is `f32`.
fn as_f32<T: Real>(values: &[T]) -> Option<&[f32]> {
    // SAFETY: `T` is `f32` (checked), so the slice's memory holds `len` f32 values.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<f32>(), values.len()) })
}

/// `values` as a `Vec<T>`.
///
/// # Panics
/// If `T` is not `f32`.
fn from_f32<T: Real>(values: Vec<f32>) -> Vec<T> {
    assert_eq!(TypeId::of::<T>(), TypeId::of::<f32>(), "from_f32: T is f32");
    let mut values = std::mem::ManuallyDrop::new(values);
    let (ptr, len, capacity) = (values.as_mut_ptr(), values.len(), values.capacity());
    // SAFETY: `T` is `f32` (asserted): the allocation, its length and capacity are those
    // of a `Vec<T>`, and the original is not dropped.
    unsafe { Vec::from_raw_parts(ptr.cast::<T>(), len, capacity) }
}

/// The forward pass of a plan that [`suits`]: the output `[batch, n, out_h, out_w]` and,
/// where `moments` asks, each output channel's moments. `None` where it does not suit.
pub(crate) fn forward<T: Real>(
    plan: &ConvPlan,
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    moments: bool,
) -> Option<(Vec<T>, Option<Vec<Moments>>)> {
    let run = runnable::<T>(plan)?;
    let (x, weight) = (as_f32(x)?, as_f32(weight)?);
    let bias = match bias {
        Some(bias) => Some(as_f32(bias)?),
        None => None,
    };
    assert_eq!(x.len(), plan.input_len(), "input length");
    assert_eq!(weight.len(), plan.weight_len(), "weight length");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), plan.out_channels, "bias length");
    }
    let pass = Geometry::forward(&run);
    let filters = pass.filters(&unfolded_weight(plan, weight), false)?;
    let len = plan.output_len();
    let mut out = workspace::uninit::<f32>(len);
    let moments = pass.run(&filters, x, bias, SharedMut(out.as_mut_ptr()), moments);
    trace::note(TracedPass::Forward, Traced::Winograd, pass.block_count());
    // SAFETY: `run` wrote every value of the output.
    unsafe { out.set_len(len) };
    Some((from_f32(out), moments))
}

/// The backward pass of a plan that [`suits`]: the input gradient into `dx` where given
/// (every value written, whatever it held), and the weight gradient, returned where
/// `needs_weight`. `None`, with nothing written, where the plan does not suit.
pub(crate) fn backward<T: Real>(
    plan: &ConvPlan,
    (x, weight, grad_out): (&[T], &[T], &[T]),
    dx: Option<&mut [MaybeUninit<T>]>,
    needs_weight: bool,
) -> Option<Option<Vec<T>>> {
    let run = runnable::<T>(plan)?;
    let (x, weight, grad_out) = (as_f32(x)?, as_f32(weight)?, as_f32(grad_out)?);
    assert_eq!(x.len(), plan.input_len(), "input length");
    assert_eq!(weight.len(), plan.weight_len(), "weight length");
    assert_eq!(grad_out.len(), plan.output_len(), "output gradient length");
    let forward = Geometry::forward(&run);
    let input_gradient = Geometry::input_gradient(&run);
    let filters = match &dx {
        Some(_) => Some(input_gradient.filters(&unfolded_weight(plan, weight), true)?),
        None => None,
    };
    // The filters go when the input gradient is done (moved into this block), before the
    // weight gradient's buffers come.
    if let (Some(dx), Some(filters)) = (dx, filters) {
        assert_eq!(dx.len(), plan.input_len(), "input gradient length");
        // `T` is `f32` (`suits`): the pass writes f32 values into the buffer's slots.
        let out = SharedMut(dx.as_mut_ptr().cast::<f32>());
        input_gradient.run(&filters, grad_out, None, out, false);
    }
    trace::note(
        TracedPass::Backward,
        Traced::Winograd,
        forward.block_count(),
    );
    Some(needs_weight.then(|| {
        from_f32(folded_gradient(
            plan,
            forward.weight_gradient(&run, x, grad_out),
        ))
    }))
}

/// `weight` laid out as its plan's unfolded weight ([`ConvPlan::windows_unfolded`]):
/// window `j`'s filters at the window's input channels, zeros elsewhere. The weight
/// itself for a plan of one window.
fn unfolded_weight<'w>(plan: &ConvPlan, weight: &'w [f32]) -> Cow<'w, [f32]> {
    if plan.n_c == 1 {
        return Cow::Borrowed(weight);
    }
    let (m, channels) = (plan.primaries, plan.in_channels);
    let taps = plan.kernel[0] * plan.kernel[1];
    let span = plan.window_depth * taps;
    let mut wide = vec![0.0; plan.n_c * m * channels * taps];
    for w in &plan.windows {
        for p in 0..m {
            let from = (p * plan.weight_depth + w.weight_offset) * taps;
            let to = ((w.j * m + p) * channels + w.in_offset) * taps;
            wide[to..to + span].copy_from_slice(&weight[from..from + span]);
        }
    }
    Cow::Owned(wide)
}

/// The gradient of a plan's weight from that of its unfolded weight
/// ([`unfolded_weight`]): each window's share added in window order.
fn folded_gradient(plan: &ConvPlan, wide: Vec<f32>) -> Vec<f32> {
    if plan.n_c == 1 {
        return wide;
    }
    let (m, channels) = (plan.primaries, plan.in_channels);
    let taps = plan.kernel[0] * plan.kernel[1];
    let span = plan.window_depth * taps;
    let mut gradient = vec![0.0; plan.weight_len()];
    for w in &plan.windows {
        for p in 0..m {
            let to = (p * plan.weight_depth + w.weight_offset) * taps;
            let from = ((w.j * m + p) * channels + w.in_offset) * taps;
            for (sum, part) in gradient[to..to + span]
                .iter_mut()
                .zip(&wide[from..from + span])
            {
                *sum += part;
            }
        }
    }
    gradient
}

/// The 1 x 1 part of a pass: a versatile layer's 1 x 1 crop.
#[derive(Debug, Clone)]
struct Centre {
    /// Input channels it reads.
    input: Range<usize>,
    /// Output channels it writes.
    output: Range<usize>,
    /// Whether it adds into the 3 x 3 part's outputs (the input gradient), else it
    /// writes channels of its own (the forward pass).
    adds: bool,
}

/// One Winograd pass over channels-first activations: its shapes and blocks.
#[derive(Debug, Clone)]
struct Geometry {
    batch: usize,
    /// Channels of the input tensor.
    in_channels: usize,
    /// Channels of the output tensor.
    out_channels: usize,
    input: [usize; 2],
    output: [usize; 2],
    /// Padding before the first row and column (after: what the output size implies).
    pad: [usize; 2],
    /// 2 x 2 output tiles down and across one image.
    tiles: [usize; 2],
    /// The 3 x 3 part reads input channels `0..wide_in` and writes `0..wide_out`.
    wide_in: usize,
    wide_out: usize,
    centre: Option<Centre>,
    /// Pairs of output rows (tile rows) per block.
    block_pairs: usize,
}

/// The filters of a pass laid out for the micro-kernel: the sixteen transformed filters
/// (`M_e = V_e U_e`) and the centre taps.
struct Filters {
    products: Vec<NhwcConv>,
    centre: Option<NhwcConv>,
}

/// The pairs of output rows of one image in a block, and where their input rows start in
/// the block's band of scratch rows.
#[derive(Debug, Clone, Copy)]
struct Segment {
    image: usize,
    /// First tile row, and one past the last.
    first: usize,
    end: usize,
    /// The block's index of its first pair.
    pair: usize,
    /// The band's row of its first input row.
    row: usize,
}

impl Geometry {
    /// The forward pass of `plan`.
    fn forward(plan: &ConvPlan) -> Self {
        let centre_channels = plan.out_channels - plan.primaries;
        Self::new(
            plan.batch,
            [plan.in_channels, plan.out_channels],
            [plan.input, plan.output],
            plan.pad,
            [plan.in_channels, plan.primaries],
            (centre_channels > 0).then_some(Centre {
                input: 0..plan.in_channels,
                output: plan.primaries..plan.out_channels,
                adds: false,
            }),
        )
    }

    /// The input gradient of `plan`: a pass over the output gradient.
    fn input_gradient(plan: &ConvPlan) -> Self {
        let centre_channels = plan.out_channels - plan.primaries;
        Self::new(
            plan.batch,
            [plan.out_channels, plan.in_channels],
            [plan.output, plan.input],
            [2 - plan.pad[0], 2 - plan.pad[1]],
            [plan.primaries, plan.in_channels],
            (centre_channels > 0).then_some(Centre {
                input: plan.primaries..plan.out_channels,
                output: 0..plan.in_channels,
                adds: true,
            }),
        )
    }

    fn new(
        batch: usize,
        [in_channels, out_channels]: [usize; 2],
        [input, output]: [[usize; 2]; 2],
        pad: [usize; 2],
        [wide_in, wide_out]: [usize; 2],
        centre: Option<Centre>,
    ) -> Self {
        let tiles = [output[0].div_ceil(2), output[1].div_ceil(2)];
        let mut geometry = Self {
            batch,
            in_channels,
            out_channels,
            input,
            output,
            pad,
            tiles,
            wide_in,
            wide_out,
            centre,
            block_pairs: 1,
        };
        // As many pairs as the budget allows, at least one block per thread where there
        // are that many pairs, as even as whole pairs give.
        let pairs = geometry.pairs();
        let most = (BLOCK_BYTES / (4 * geometry.scratch_per_pair())).max(1);
        let blocks = pairs.div_ceil(most).max(crate::threads().min(pairs)).max(1);
        geometry.block_pairs = pairs.div_ceil(blocks).max(1);
        geometry
    }

    /// Values of scratch one pair of output rows takes (rows, patches, products, centre
    /// pixels and products, outputs; the weight gradient's output-gradient rows too).
    fn scratch_per_pair(&self) -> usize {
        let tw = self.tiles[1];
        let (centre_in, centre_out) = self.centre_widths();
        4 * self.padded_width() * self.in_channels
            + tw * (16 * (self.wide_in + self.wide_out) + 4 * (centre_in + centre_out))
            + 2 * 2 * tw * self.out_channels
    }

    fn centre_widths(&self) -> (usize, usize) {
        self.centre
            .as_ref()
            .map_or((0, 0), |c| (c.input.len(), c.output.len()))
    }

    /// Columns of a band's rows: every tile's four input columns.
    fn padded_width(&self) -> usize {
        2 * self.tiles[1] + 2
    }

    /// Pairs of output rows (tile rows) of the batch.
    fn pairs(&self) -> usize {
        self.batch * self.tiles[0]
    }

    /// Tiles of a full block.
    fn block_tiles(&self) -> usize {
        self.block_pairs * self.tiles[1]
    }

    /// Rows of a block's band: two per pair and two more per image.
    fn band_rows(&self) -> usize {
        4 * self.block_pairs
    }

    /// How many blocks there are.
    fn block_count(&self) -> usize {
        self.pairs().div_ceil(self.block_pairs)
    }

    /// The blocks: ranges of pairs.
    fn blocks(&self) -> Vec<Range<usize>> {
        let pairs = self.pairs();
        (0..pairs)
            .step_by(self.block_pairs)
            .map(|first| first..(first + self.block_pairs).min(pairs))
            .collect()
    }

    /// The block's pairs image by image, each with two rows of the band per pair and two
    /// more (the patches' overlap).
    fn segments(&self, block: Range<usize>) -> Vec<Segment> {
        let th = self.tiles[0];
        let mut segments = Vec::new();
        let (mut pair, mut row) = (block.start, 0);
        while pair < block.end {
            let (image, first) = (pair / th, pair % th);
            let end = th.min(first + block.end - pair);
            segments.push(Segment {
                image,
                first,
                end,
                pair: pair - block.start,
                row,
            });
            row += 2 * (end - first) + 2;
            pair += end - first;
        }
        segments
    }

    /// The pass's filters from the layer's weight `[primaries, in, 3, 3]`: as they are
    /// (the forward pass), or turned half a turn with input and output swapped (the input
    /// gradient). `None` where the micro-kernel declines a product.
    fn filters(&self, weight: &[f32], turned: bool) -> Option<Filters> {
        let (wide_in, wide_out) = (self.wide_in, self.wide_out);
        // The layer's input channels and primaries.
        let (cin, m) = if turned {
            (wide_out, wide_in)
        } else {
            (wide_in, wide_out)
        };
        // Each filter's sixteen transformed values, `[o][i][e]` for output channel o of
        // the pass from its input channel i, output channels in parallel.
        let mut by_filter = vec![[0.0f32; 16]; wide_out * wide_in];
        by_filter
            .par_chunks_mut(wide_in)
            .enumerate()
            .for_each(|(o, filters)| {
                for (i, u) in filters.iter_mut().enumerate() {
                    let (p, c) = if turned { (i, o) } else { (o, i) };
                    let mut g: [f32; 9] = weight[(p * cin + c) * 9..][..9]
                        .try_into()
                        .expect("nine taps");
                    if turned {
                        g.reverse();
                    }
                    *u = transform_filter(g);
                }
            });
        let product = |positions: usize, [inputs, outputs]: [usize; 2], weight: &[f32]| {
            let plan = ConvPlan::dense(
                [1, inputs, 1, positions],
                outputs,
                [1, 1],
                [1, 1],
                [1, 1],
                1,
                [(0, 0), (0, 0)],
            )
            .ok()?;
            NhwcConv::new(&plan, weight)
        };
        let tiles = self.block_tiles();
        // U_e (`[o][i]`) laid out for the micro-kernel, the sixteen in parallel.
        let products = (0..16)
            .into_par_iter()
            .map(|e| {
                let u: Vec<f32> = by_filter.iter().map(|u| u[e]).collect();
                product(tiles, [wide_in, wide_out], &u)
            })
            .collect::<Option<Vec<_>>>()?;
        let centre = match &self.centre {
            Some(centre) => {
                let (inputs, outputs) = (centre.input.len(), centre.output.len());
                // Centre taps [output][input] of the pass.
                let mut taps = vec![0.0f32; outputs * inputs];
                for (p, filters) in weight.chunks_exact(9 * cin).take(m).enumerate() {
                    for (c, g) in filters.chunks_exact(9).enumerate() {
                        let (o, i) = if turned { (c, p) } else { (p, c) };
                        if o < outputs && i < inputs {
                            taps[o * inputs + i] = g[4];
                        }
                    }
                }
                Some(product(4 * tiles, [inputs, outputs], &taps)?)
            }
            None => None,
        };
        Some(Filters { products, centre })
    }

    /// The pass: every value of the output (`out`, `[batch, out_channels, out_h,
    /// out_w]`) written, with `bias` added where given; where `moments` asks, each
    /// output channel's moments.
    fn run(
        &self,
        filters: &Filters,
        x: &[f32],
        bias: Option<&[f32]>,
        out: SharedMut<f32>,
        moments: bool,
    ) -> Option<Vec<Moments>> {
        assert_eq!(
            x.len(),
            self.batch * self.in_channels * self.input[0] * self.input[1],
            "pass input length"
        );
        let blocks = self.blocks();
        let run = |block: &Range<usize>| -> TileMoments {
            workspace::with::<f32, _>(Slot::Task, |ws| {
                let tiles = self.block_tiles();
                let (centre_in, centre_out) = self.centre_widths();
                let rows_len = self.band_rows() * self.padded_width() * self.in_channels;
                let outputs_len = 2 * self.block_pairs * self.output[1] * self.out_channels;
                let scratch = grow(
                    &mut ws.cols,
                    rows_len + 16 * tiles * self.wide_in + 4 * tiles * centre_in + outputs_len,
                );
                let (rows, scratch) = scratch.split_at_mut(rows_len);
                let (patches, scratch) = scratch.split_at_mut(16 * tiles * self.wide_in);
                let (centre_pixels, outputs) = scratch.split_at_mut(4 * tiles * centre_in);
                let scratch = grow(
                    &mut ws.dcols,
                    16 * tiles * self.wide_out + 4 * tiles * centre_out,
                );
                let (products, centre_products) = scratch.split_at_mut(16 * tiles * self.wide_out);
                let segments = self.segments(block.clone());
                self.gather_input(x, &segments, rows);
                isa::transform_inputs(self, &segments, rows, patches, centre_pixels);
                for (e, product) in filters.products.iter().enumerate() {
                    product.forward_on_this_thread(
                        &patches[e * tiles * self.wide_in..][..tiles * self.wide_in],
                        &mut products[e * tiles * self.wide_out..][..tiles * self.wide_out],
                    );
                }
                if let Some(centre) = &filters.centre {
                    centre.forward_on_this_thread(centre_pixels, centre_products);
                }
                let sums = (&*products, &*centre_products);
                isa::transform_outputs(self, &segments, sums, bias, outputs);
                self.write_channels_first(&segments, outputs, out);
                let block_moments = if moments {
                    self.moments(&segments, out)
                } else {
                    Vec::new()
                };
                (block.start, block_moments)
            })
        };
        let blocks_moments: Vec<TileMoments> = blocks.par_iter().map(run).collect();
        moments.then(|| merge_tiles(blocks_moments, self.out_channels))
    }

    /// The segments' input rows into `rows`, channels-last with zero padding (a band per
    /// segment, [`Segment::row`] on: `[row][padded column][in_channels]`).
    fn gather_input(&self, x: &[f32], segments: &[Segment], rows: &mut [f32]) {
        let (wp, c) = (self.padded_width(), self.in_channels);
        for segment in segments {
            let count = 2 * (segment.end - segment.first) + 2;
            let first_row = (2 * segment.first) as isize - self.pad[0] as isize;
            let band = &mut rows[segment.row * wp * c..][..count * wp * c];
            rows_channels_last(
                x,
                [c, self.input[0], self.input[1]],
                (segment.image, first_row, count),
                (self.pad[1], wp),
                band,
            );
        }
    }

    /// Where tile `tx` of pair `py` of `segment` has its patch's first pixel in the band.
    #[inline(always)]
    fn patch_at(&self, segment: &Segment, py: usize, tx: usize) -> usize {
        let row = segment.row + 2 * (py - segment.first);
        (row * self.padded_width() + 2 * tx) * self.in_channels
    }

    /// The patches of the segments' tiles into `patches` (`[16][block tiles][wide_in]`),
    /// from channel `first_channel` on (the channels before it are done), and, where there
    /// is a 1 x 1 part, their four centre pixels' channels it reads into `centre`
    /// (`[block tiles][4][its inputs]`).
    #[inline(always)]
    fn transform_inputs_portable(
        &self,
        segments: &[Segment],
        rows: &[f32],
        (patches, first_channel): (&mut [f32], usize),
        centre: &mut [f32],
    ) {
        let (c, wp, tw, tiles) = (
            self.in_channels,
            self.padded_width(),
            self.tiles[1],
            self.block_tiles(),
        );
        let wide_in = self.wide_in;
        for segment in segments {
            for py in segment.first..segment.end {
                for tx in 0..tw {
                    let t = (segment.pair + py - segment.first) * tw + tx;
                    let at = self.patch_at(segment, py, tx);
                    let pixel = |i: usize| at + ((i / 4) * wp + i % 4) * c;
                    chunks(
                        wide_in - first_channel,
                        #[inline(always)]
                        |c0, lanes| {
                            let c0 = first_channel + c0;
                            transform_patch(
                                #[inline(always)]
                                |i| load(&rows[pixel(i) + c0..], lanes),
                                #[inline(always)]
                                |e, v| {
                                    store(v, &mut patches[(e * tiles + t) * wide_in + c0..], lanes)
                                },
                            );
                        },
                    );
                    if let Some(part) = &self.centre {
                        let inputs = part.input.len();
                        chunks(
                            inputs,
                            #[inline(always)]
                            |c0, lanes| {
                                for (k, tap) in [5, 6, 9, 10].into_iter().enumerate() {
                                    let v =
                                        load(&rows[pixel(tap) + part.input.start + c0..], lanes);
                                    store(&v, &mut centre[(t * 4 + k) * inputs + c0..], lanes);
                                }
                            },
                        );
                    }
                }
            }
        }
    }

    /// The outputs of the segments' tiles from their products `(M, the 1 x 1 part's)`,
    /// with `bias`, into `outputs`: channels-last, `[block pair][2][out_w][out_channels]`.
    #[inline(always)]
    fn transform_outputs_portable(
        &self,
        segments: &[Segment],
        (products, centre): (&[f32], &[f32]),
        bias: Option<&[f32]>,
        (outputs, first_channel): (&mut [f32], usize),
    ) {
        let ([oh, ow], tw, n) = (self.output, self.tiles[1], self.out_channels);
        let (tiles, wide_out) = (self.block_tiles(), self.wide_out);
        let with_bias = |v: [f32; LANES], channel: usize, lanes: usize| match bias {
            Some(bias) => add(v, load(&bias[channel..], lanes)),
            None => v,
        };
        for segment in segments {
            for py in segment.first..segment.end {
                let pair = segment.pair + py - segment.first;
                for tx in 0..tw {
                    let t = pair * tw + tx;
                    // The tile's outputs inside the map: (k, index of its channel 0).
                    let inside = (0..4).filter_map(|k: usize| {
                        let (oy, ox) = (2 * py + k / 2, 2 * tx + k % 2);
                        (oy < oh && ox < ow).then(|| (k, ((2 * pair + k / 2) * ow + ox) * n))
                    });
                    let adds = self.centre.as_ref().filter(|part| part.adds);
                    chunks(
                        wide_out - first_channel,
                        #[inline(always)]
                        |c0, lanes| {
                            let c0 = first_channel + c0;
                            let y = transform_products(
                                #[inline(always)]
                                |e| load(&products[(e * tiles + t) * wide_out + c0..], lanes),
                            );
                            for (k, at) in inside.clone() {
                                let mut v = y[k];
                                if adds.is_some() {
                                    v = add(v, load(&centre[(t * 4 + k) * wide_out + c0..], lanes));
                                }
                                let v = with_bias(v, c0, lanes);
                                store(&v, &mut outputs[at + c0..], lanes);
                            }
                        },
                    );
                    if let Some(part) = self.centre.as_ref().filter(|part| !part.adds) {
                        let width = part.output.len();
                        for (k, at) in inside {
                            chunks(
                                width,
                                #[inline(always)]
                                |c0, lanes| {
                                    let v = load(&centre[(t * 4 + k) * width + c0..], lanes);
                                    let channel = part.output.start + c0;
                                    let v = with_bias(v, channel, lanes);
                                    store(&v, &mut outputs[at + channel..], lanes);
                                },
                            );
                        }
                    }
                }
            }
        }
    }

    /// The output rows of each segment (`[out_w * rows][out_channels]` in `outputs`)
    /// into their places in the channels-first output, four channels at a time.
    fn write_channels_first(&self, segments: &[Segment], outputs: &[f32], out: SharedMut<f32>) {
        let ([oh, ow], n) = (self.output, self.out_channels);
        for segment in segments {
            let (first_row, end_row) = (2 * segment.first, (2 * segment.end).min(oh));
            let pixels = (end_row - first_row) * ow;
            let src = &outputs[2 * segment.pair * ow * n..][..pixels * n];
            let channel_rows = |channel: usize| {
                let start = ((segment.image * n + channel) * oh + first_row) * ow;
                // SAFETY: the output holds `batch * n * oh * ow` values (the callers'
                // lengths); these `pixels` values of this channel of this image are rows
                // `first_row..end_row`, this block's alone (blocks hold disjoint pairs),
                // and each channel's are borrowed once.
                unsafe { std::slice::from_raw_parts_mut(out.ptr().add(start), pixels) }
            };
            let mut channel = 0;
            while channel + 4 <= n {
                let dst = [0, 1, 2, 3].map(|k| channel_rows(channel + k));
                four_channels_first(&src[channel..], n, dst);
                channel += 4;
            }
            for channel in channel..n {
                for (pixel, value) in channel_rows(channel).iter_mut().enumerate() {
                    *value = src[pixel * n + channel];
                }
            }
        }
    }

    /// Each output channel's moments over the block's outputs (written by
    /// [`Self::write_channels_first`]).
    fn moments(&self, segments: &[Segment], out: SharedMut<f32>) -> Vec<Moments> {
        let ([oh, ow], n) = (self.output, self.out_channels);
        (0..n)
            .map(|channel| {
                Moments::of_segments(segments.iter().map(|segment| {
                    let (first_row, end_row) = (2 * segment.first, (2 * segment.end).min(oh));
                    let start = ((segment.image * n + channel) * oh + first_row) * ow;
                    // SAFETY: as in `write_channels_first`: this block's own values, all
                    // written by it before this call.
                    unsafe {
                        std::slice::from_raw_parts(out.ptr().add(start), (end_row - first_row) * ow)
                    }
                }))
            })
            .collect()
    }

    /// The weight gradient `[primaries, in_channels, 3, 3]` of the layer whose forward
    /// pass this is, from its input `x` and its output gradient `grad_out`.
    fn weight_gradient(&self, plan: &ConvPlan, x: &[f32], grad_out: &[f32]) -> Vec<f32> {
        let (cin, m, n) = (self.in_channels, self.wide_out, self.out_channels);
        let centre_channels = n - m;
        let blocks = self.blocks();
        let tasks = crate::threads().min(blocks.len()).max(1);
        let ranges = crate::nested::split(blocks.len(), tasks);
        let partial_len = 16 * m * cin + centre_channels * cin;
        let task = |&(start, end): &(usize, usize)| -> Vec<f32> {
            assert!(start < end, "a task of no blocks");
            // Not zeroed: the first block's products write every value.
            let mut partial = workspace::uninit::<f32>(partial_len);
            let slots = &mut partial.spare_capacity_mut()[..partial_len];
            workspace::with::<f32, _>(Slot::Task, |ws| {
                for (i, block) in blocks[start..end].iter().enumerate() {
                    let adds = i > 0;
                    self.add_weight_gradient(ws, block.clone(), (x, grad_out), (slots, adds));
                }
            });
            // SAFETY: the capacity is `partial_len`, and the first block wrote every value.
            unsafe { partial.set_len(partial_len) };
            partial
        };
        let mut partials: Vec<Vec<f32>> = ranges.par_iter().map(task).collect();
        let mut sum = partials.remove(0);
        add_in_order(&mut sum, &partials);
        // Freed before the gradient is allocated: a backward pass's first layer runs at
        // the step's memory peak.
        drop(partials);
        let (transformed, centre) = sum.split_at(16 * m * cin);
        let mut dw = vec![0.0f32; plan.weight_len()];
        dw.par_chunks_mut(9 * cin)
            .enumerate()
            .for_each(|(p, filters)| {
                for (c, dw) in filters.chunks_exact_mut(9).enumerate() {
                    let pc = p * cin + c;
                    let du: [f32; 16] = std::array::from_fn(|e| transformed[e * m * cin + pc]);
                    dw.copy_from_slice(&filter_gradient(du));
                    if p < centre_channels {
                        dw[4] += centre[pc];
                    }
                }
            });
        dw
    }

    /// One block's part of the weight gradient added into `partial` (`adds`), or written
    /// there (every value): `[16][m][in]` of the transformed filters, then the centre
    /// taps' `[centre channels][in]`.
    ///
    /// # Panics
    /// If `partial` is not `16 * m * in + centre channels * in` long.
    fn add_weight_gradient(
        &self,
        ws: &mut workspace::Workspace<f32>,
        block: Range<usize>,
        (x, grad_out): (&[f32], &[f32]),
        (partial, adds): (&mut [MaybeUninit<f32>], bool),
    ) {
        let (cin, m, n, tw) = (
            self.in_channels,
            self.wide_out,
            self.out_channels,
            self.tiles[1],
        );
        let centre_channels = n - m;
        let tiles = self.block_tiles();
        let used = (block.end - block.start) * tw;
        let rows_len = self.band_rows() * self.padded_width() * cin;
        let grad_rows_len = 2 * self.block_pairs * 2 * tw * n;
        let scratch = grow(
            &mut ws.cols,
            rows_len + 16 * tiles * cin + 4 * tiles * cin + grad_rows_len,
        );
        let (rows, scratch) = scratch.split_at_mut(rows_len);
        let (patches, scratch) = scratch.split_at_mut(16 * tiles * cin);
        let (centre_pixels, grad_rows) = scratch.split_at_mut(4 * tiles * cin);
        let scratch = grow(&mut ws.dcols, 16 * tiles * m + 4 * tiles * centre_channels);
        let (grad_products, grad_centre) = scratch.split_at_mut(16 * tiles * m);
        let segments = self.segments(block);
        self.gather_input(x, &segments, rows);
        isa::transform_inputs(self, &segments, rows, patches, centre_pixels);
        for segment in &segments {
            let count = 2 * (segment.end - segment.first);
            let band = &mut grad_rows[2 * segment.pair * 2 * tw * n..][..count * 2 * tw * n];
            rows_channels_last(
                grad_out,
                [n, self.output[0], self.output[1]],
                (segment.image, (2 * segment.first) as isize, count),
                (0, 2 * tw),
                band,
            );
        }
        isa::transform_gradients(self, used, grad_rows, grad_products, grad_centre);
        assert_eq!(
            partial.len(),
            (16 * m + centre_channels) * cin,
            "partial length"
        );
        let (du, dcentre) = partial.split_at_mut(16 * m * cin);
        for e in 0..16 {
            // SAFETY: dU_e is `m x cin` (row-major) inside `du`, read only where `adds`
            // (the values an earlier block wrote), else written whole; dM_e's first
            // `used` tiles (`[tile][m]`, read as its transpose) and V_e's (`[tile][cin]`)
            // lie inside their buffers; `du` overlaps neither (a separate allocation).
            unsafe {
                gemm(
                    [m, cin, used],
                    du[e * m * cin..].as_mut_ptr().cast::<f32>(),
                    [1, cin],
                    adds,
                    grad_products[e * tiles * m..].as_ptr(),
                    [m, 1],
                    patches[e * tiles * cin..].as_ptr(),
                    [1, cin],
                    gemm::Parallelism::None,
                );
            }
        }
        if centre_channels > 0 {
            // SAFETY: as above, with the `4 * used` centre outputs' gradients
            // (`[output][centre channels]`) and pixels (`[output][cin]`).
            unsafe {
                gemm(
                    [centre_channels, cin, 4 * used],
                    dcentre.as_mut_ptr().cast::<f32>(),
                    [1, cin],
                    adds,
                    grad_centre.as_ptr(),
                    [centre_channels, 1],
                    centre_pixels.as_ptr(),
                    [1, cin],
                    gemm::Parallelism::None,
                );
            }
        }
    }

    /// `A dY Aᵀ` of the first `used` tiles' 2 x 2 output gradients (of the primaries'
    /// channels, from `grad_rows`: `[block pair][2][2 * tiles across][out_channels]`)
    /// into `products` (`[16][block tiles][primaries]`), and their centre channels'
    /// gradients into `centre` (`[tile][4][centre channels]`).
    #[inline(always)]
    fn transform_gradients_portable(
        &self,
        used: usize,
        grad_rows: &[f32],
        (products, first_channel): (&mut [f32], usize),
        centre: &mut [f32],
    ) {
        let (m, n, tw, tiles) = (
            self.wide_out,
            self.out_channels,
            self.tiles[1],
            self.block_tiles(),
        );
        let centre_channels = n - m;
        for t in 0..used {
            let (pair, tx) = (t / tw, t % tw);
            let at = |k: usize| ((2 * pair + k / 2) * 2 * tw + 2 * tx + k % 2) * n;
            chunks(
                m - first_channel,
                #[inline(always)]
                |c0, lanes| {
                    let c0 = first_channel + c0;
                    let g = |k: usize| load(&grad_rows[at(k) + c0..], lanes);
                    let (a, b, c, d) = (g(0), g(1), g(2), g(3));
                    let zero = [0.0; LANES];
                    // A = [[1, 0], [1, 1], [1, -1], [0, -1]]: the rows of A g, then each
                    // row [u, v] times Aᵀ: [u, u + v, u - v, -v].
                    let rows = [
                        (a, b),
                        (add(a, c), add(b, d)),
                        (sub(a, c), sub(b, d)),
                        (sub(zero, c), sub(zero, d)),
                    ];
                    for (i, (u, v)) in rows.into_iter().enumerate() {
                        let values = [u, add(u, v), sub(u, v), sub(zero, v)];
                        for (j, value) in values.iter().enumerate() {
                            let e = 4 * i + j;
                            store(value, &mut products[(e * tiles + t) * m + c0..], lanes);
                        }
                    }
                },
            );
            chunks(
                centre_channels,
                #[inline(always)]
                |c0, lanes| {
                    for k in 0..4 {
                        let v = load(&grad_rows[at(k) + m + c0..], lanes);
                        store(&v, &mut centre[(t * 4 + k) * centre_channels + c0..], lanes);
                    }
                },
            );
        }
    }
}

/// `Gᵀ dU G`: the gradient of a 3 x 3 filter from that of its transform `U = G g Gᵀ`
/// (sixteen values row-major), nine values row-major.
fn filter_gradient(du: [f32; 16]) -> [f32; 9] {
    // Gᵀ = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]], applied to four
    // values.
    let rows = |v: [f32; 4]| {
        [
            v[0] + 0.5 * (v[1] + v[2]),
            0.5 * (v[1] - v[2]),
            0.5 * (v[1] + v[2]) + v[3],
        ]
    };
    // Gᵀ dU: column j of dU through Gᵀ.
    let mut left = [[0.0f32; 4]; 3];
    for j in 0..4 {
        let column = rows([du[j], du[4 + j], du[8 + j], du[12 + j]]);
        for i in 0..3 {
            left[i][j] = column[i];
        }
    }
    // Then G on the right: each row of Gᵀ dU through Gᵀ.
    let mut dw = [0.0f32; 9];
    for (i, row) in left.iter().enumerate() {
        dw[i * 3..][..3].copy_from_slice(&rows(*row));
    }
    dw
}

/// `dst[k][p] = src[p * stride + k]`: four channels of channels-last pixels (`src` from
/// the first channel on, `stride` values per pixel) into their channels-first rows, 4 x 4
/// blocks transposed in registers.
///
/// # Panics
/// If the rows differ in length or `src` does not hold their pixels.
fn four_channels_first(src: &[f32], stride: usize, mut dst: [&mut [f32]; 4]) {
    let pixels = dst[0].len();
    assert!(
        dst.iter().all(|d| d.len() == pixels)
            && stride >= 4
            && (pixels == 0 || src.len() >= (pixels - 1) * stride + 4),
        "four_channels_first bounds"
    );
    let whole = pixels / 4 * 4;
    #[cfg(target_arch = "x86_64")]
    for p in (0..whole).step_by(4) {
        use std::arch::x86_64::*;
        // SAFETY: SSE is part of x86-64; the loads read src[(p + j) * stride..+4], inside
        // `src` as (p + 3) * stride + 4 <= (pixels - 1) * stride + 4 (asserted); the
        // stores write dst[k][p..p + 4] with p + 4 <= pixels, each row's length
        // (asserted). Unaligned loads and stores throughout.
        unsafe {
            let at = |j: usize| src.as_ptr().add((p + j) * stride);
            let (r0, r1, r2, r3) = (
                _mm_loadu_ps(at(0)),
                _mm_loadu_ps(at(1)),
                _mm_loadu_ps(at(2)),
                _mm_loadu_ps(at(3)),
            );
            let t0 = _mm_unpacklo_ps(r0, r1);
            let t1 = _mm_unpacklo_ps(r2, r3);
            let t2 = _mm_unpackhi_ps(r0, r1);
            let t3 = _mm_unpackhi_ps(r2, r3);
            _mm_storeu_ps(dst[0].as_mut_ptr().add(p), _mm_movelh_ps(t0, t1));
            _mm_storeu_ps(dst[1].as_mut_ptr().add(p), _mm_movehl_ps(t1, t0));
            _mm_storeu_ps(dst[2].as_mut_ptr().add(p), _mm_movelh_ps(t2, t3));
            _mm_storeu_ps(dst[3].as_mut_ptr().add(p), _mm_movehl_ps(t3, t2));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let whole = 0;
    for p in whole..pixels {
        for (k, row) in dst.iter_mut().enumerate() {
            row[p] = src[p * stride + k];
        }
    }
}

/// Rows `first_row..first_row + count` of image `image` of the channels-first `src`
/// (`[channels, h, w]` per image) into `dst`, channels-last: `[count][width][channels]`,
/// each row's `w` pixels from column `left` on, zeros around them and for rows outside
/// the image.
fn rows_channels_last(
    src: &[f32],
    [channels, h, w]: [usize; 3],
    (image, first_row, count): (usize, isize, usize),
    (left, width): (usize, usize),
    dst: &mut [f32],
) {
    let c = channels;
    let cols = w.min(width.saturating_sub(left));
    // The band's rows inside the image, `inside.start - first_row` on.
    let inside = first_row.clamp(0, h as isize) as usize
        ..(first_row + count as isize).clamp(0, h as isize) as usize;
    let first_inside = (inside.start as isize - first_row).max(0) as usize;
    for (r, row) in dst.chunks_exact_mut(width * c).take(count).enumerate() {
        if (first_inside..first_inside + inside.len()).contains(&r) {
            row[..left * c].fill(0.0);
            row[(left + cols) * c..].fill(0.0);
        } else {
            row.fill(0.0);
        }
    }
    if !inside.is_empty() {
        let from = first_inside * width * c + left * c;
        crate::rows_to_pixel_major(
            src,
            [c, h, w],
            (image, inside, cols),
            (&mut dst[from..], width * c),
        );
    }
}

/// The transforms compiled for the instruction set of sgemm's micro-kernel, their
/// portable bodies inlined into each (as in [`crate::winograd`]).
mod isa {
    use super::*;

    /// [`Geometry::transform_inputs_portable`] on this CPU's widest vectors.
    pub(super) fn transform_inputs(
        pass: &Geometry,
        segments: &[Segment],
        rows: &[f32],
        patches: &mut [f32],
        centre: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        match crate::sgemm::micro_kernel() {
            // SAFETY: sgemm picks its AVX-512 micro-kernel only on a CPU with AVX-512F.
            Some("avx512") => {
                // SAFETY: as above.
                let done = unsafe { inputs_by_columns_avx512(pass, segments, rows, patches) };
                return unsafe { inputs_avx512(pass, segments, rows, (patches, done), centre) };
            }
            // SAFETY: and its AVX2 one only on a CPU with AVX2 and FMA.
            Some("avx2") => {
                return unsafe { inputs_avx2(pass, segments, rows, (patches, 0), centre) }
            }
            _ => {}
        }
        pass.transform_inputs_portable(segments, rows, (patches, 0), centre)
    }

    /// The input transform of [`Geometry::transform_inputs_portable`] for the whole
    /// 16-channel vectors of the 3 x 3 part's channels, on AVX-512, a row of tiles at a
    /// time: each band column's `Bᵀ` part (its four rows combined) is made once and serves
    /// the two tiles that share the column, so each pixel is read once per row of tiles
    /// (the patch by patch transform reads it four times). The same sums in the same
    /// order, so the same bits. Returns the channels done.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn inputs_by_columns_avx512(
        pass: &Geometry,
        segments: &[Segment],
        rows: &[f32],
        patches: &mut [f32],
    ) -> usize {
        use std::arch::x86_64::*;
        let (c, wp, tw, tiles) = (
            pass.in_channels,
            pass.padded_width(),
            pass.tiles[1],
            pass.block_tiles(),
        );
        let wide_in = pass.wide_in;
        let whole = wide_in / 16 * 16;
        assert!(wide_in <= c, "the 3 x 3 part reads the input's channels");
        for segment in segments {
            for py in segment.first..segment.end {
                let first_tile = (segment.pair + py - segment.first) * tw;
                // The patches' four band rows from `base` on, `wp` pixels of `c` channels
                // each; the tiles' sixteen values at `(e * tiles + tile) * wide_in`.
                let base = pass.patch_at(segment, py, 0);
                assert!(
                    base + 4 * wp * c <= rows.len()
                        && (15 * tiles + first_tile + tw) * wide_in <= patches.len(),
                    "a row of tiles inside the band and the patches"
                );
                let src = rows.as_ptr().wrapping_add(base);
                let dst = patches.as_mut_ptr();
                for c0 in (0..whole).step_by(16) {
                    // Bᵀ over the four rows of band column `j`.
                    let column = |j: usize| {
                        // SAFETY: r < 4, j < wp and c0 + 16 <= wide_in <= c, so the read
                        // lies below base + 4 * wp * c (asserted inside `rows`).
                        let d =
                            |r: usize| unsafe { _mm512_loadu_ps(src.add((r * wp + j) * c + c0)) };
                        let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                        [
                            _mm512_sub_ps(d0, d2),
                            _mm512_add_ps(d1, d2),
                            _mm512_sub_ps(d2, d1),
                            _mm512_sub_ps(d1, d3),
                        ]
                    };
                    let (mut left, mut second) = (column(0), column(1));
                    for tx in 0..tw {
                        // Tile tx reads band columns 2 tx .. 2 tx + 4 < wp = 2 tw + 2.
                        let (third, right) = (column(2 * tx + 2), column(2 * tx + 3));
                        // Value e at `at + e * stride`: one running address, not sixteen.
                        let stride = tiles * wide_in;
                        let mut at = (first_tile + tx) * wide_in + c0;
                        for i in 0..4 {
                            let (t0, t1, t2, t3) = (left[i], second[i], third[i], right[i]);
                            let values = [
                                _mm512_sub_ps(t0, t2),
                                _mm512_add_ps(t1, t2),
                                _mm512_sub_ps(t2, t1),
                                _mm512_sub_ps(t1, t3),
                            ];
                            for v in values {
                                // SAFETY: `at` is (e * tiles + tile) * wide_in + c0 for e =
                                // 4 i + k < 16, tile < first_tile + tw and c0 + 16 <=
                                // wide_in: the 16 values lie below (15 * tiles + first_tile
                                // + tw) * wide_in (asserted inside `patches`).
                                unsafe { _mm512_storeu_ps(dst.add(at), v) };
                                at += stride;
                            }
                        }
                        (left, second) = (third, right);
                    }
                }
            }
        }
        whole
    }

    /// [`Geometry::transform_outputs_portable`] on this CPU's widest vectors.
    pub(super) fn transform_outputs(
        pass: &Geometry,
        segments: &[Segment],
        sums: (&[f32], &[f32]),
        bias: Option<&[f32]>,
        outputs: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        match crate::sgemm::micro_kernel() {
            // SAFETY: as in `transform_inputs`.
            Some("avx512") => {
                // SAFETY: as in `transform_inputs`.
                let done =
                    unsafe { outputs_by_vectors_avx512(pass, segments, sums, bias, outputs) };
                return unsafe { outputs_avx512(pass, segments, sums, bias, (outputs, done)) };
            }
            // SAFETY: as in `transform_inputs`.
            Some("avx2") => {
                return unsafe { outputs_avx2(pass, segments, sums, bias, (outputs, 0)) }
            }
            _ => {}
        }
        pass.transform_outputs_portable(segments, sums, bias, (outputs, 0))
    }

    /// The 3 x 3 part of [`Geometry::transform_outputs_portable`] for its whole 16-channel
    /// vectors, on AVX-512: each product read once (the portable transform reads eight of
    /// the sixteen twice), the 1 x 1 part's gradient and the bias added where the pass
    /// has them. The same sums in the same order, so the same bits. Returns the channels
    /// done.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn outputs_by_vectors_avx512(
        pass: &Geometry,
        segments: &[Segment],
        (products, centre): (&[f32], &[f32]),
        bias: Option<&[f32]>,
        outputs: &mut [f32],
    ) -> usize {
        use std::arch::x86_64::*;
        let ([oh, ow], tw, n) = (pass.output, pass.tiles[1], pass.out_channels);
        let (tiles, wide_out) = (pass.block_tiles(), pass.wide_out);
        let whole = wide_out / 16 * 16;
        let adds = pass.centre.as_ref().is_some_and(|part| part.adds);
        assert!(
            wide_out <= n
                && products.len() >= 16 * tiles * wide_out
                && (!adds || centre.len() >= 4 * tiles * wide_out)
                && bias.is_none_or(|bias| bias.len() >= wide_out),
            "the products, the 1 x 1 part's sums and the bias of a block"
        );
        let stride = tiles * wide_out;
        for segment in segments {
            for py in segment.first..segment.end {
                let pair = segment.pair + py - segment.first;
                assert!(
                    pair < pass.block_pairs && (2 * pair + 2) * ow * n <= outputs.len(),
                    "a pair of output rows inside the block's outputs"
                );
                for tx in 0..tw {
                    let t = pair * tw + tx;
                    // Which of the tile's four outputs lie inside the map.
                    let inside: [bool; 4] =
                        std::array::from_fn(|k| 2 * py + k / 2 < oh && 2 * tx + k % 2 < ow);
                    for c0 in (0..whole).step_by(16) {
                        // SAFETY: e < 16, t < tiles and c0 + 16 <= wide_out: inside the
                        // block's products (asserted).
                        let m: [__m512; 16] = std::array::from_fn(|e| unsafe {
                            _mm512_loadu_ps(products.as_ptr().add(e * stride + t * wide_out + c0))
                        });
                        let rows = [
                            std::array::from_fn::<__m512, 4, _>(|j| {
                                _mm512_add_ps(_mm512_add_ps(m[j], m[4 + j]), m[8 + j])
                            }),
                            std::array::from_fn::<__m512, 4, _>(|j| {
                                _mm512_sub_ps(_mm512_sub_ps(m[4 + j], m[8 + j]), m[12 + j])
                            }),
                        ];
                        for (i, [t0, t1, t2, t3]) in rows.into_iter().enumerate() {
                            let pair_of = [
                                _mm512_add_ps(_mm512_add_ps(t0, t1), t2),
                                _mm512_sub_ps(_mm512_sub_ps(t1, t2), t3),
                            ];
                            for (x, mut v) in pair_of.into_iter().enumerate() {
                                let k = 2 * i + x;
                                if !inside[k] {
                                    continue;
                                }
                                if adds {
                                    // SAFETY: t * 4 + k < 4 * tiles and c0 + 16 <=
                                    // wide_out: inside the 1 x 1 part's sums (asserted).
                                    let sum = unsafe {
                                        _mm512_loadu_ps(
                                            centre.as_ptr().add((t * 4 + k) * wide_out + c0),
                                        )
                                    };
                                    v = _mm512_add_ps(v, sum);
                                }
                                if let Some(bias) = bias {
                                    // SAFETY: c0 + 16 <= wide_out <= bias.len() (asserted).
                                    let b = unsafe { _mm512_loadu_ps(bias.as_ptr().add(c0)) };
                                    v = _mm512_add_ps(v, b);
                                }
                                let at = ((2 * pair + i) * ow + 2 * tx + x) * n + c0;
                                // SAFETY: 2 * pair + i < 2 * pair + 2, 2 * tx + x < ow
                                // (inside) and c0 + 16 <= wide_out <= n: below (2 * pair +
                                // 2) * ow * n <= outputs.len() (asserted).
                                unsafe { _mm512_storeu_ps(outputs.as_mut_ptr().add(at), v) };
                            }
                        }
                    }
                }
            }
        }
        whole
    }

    /// [`Geometry::transform_gradients_portable`] on this CPU's widest vectors.
    pub(super) fn transform_gradients(
        pass: &Geometry,
        used: usize,
        grad_rows: &[f32],
        products: &mut [f32],
        centre: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        match crate::sgemm::micro_kernel() {
            // SAFETY: as in `transform_inputs`.
            Some("avx512") => {
                // SAFETY: as in `transform_inputs`.
                let done = unsafe { gradients_by_vectors_avx512(pass, used, grad_rows, products) };
                let products = (products, done);
                return unsafe { gradients_avx512(pass, used, grad_rows, products, centre) };
            }
            // SAFETY: as in `transform_inputs`.
            Some("avx2") => {
                let products = (products, 0);
                return unsafe { gradients_avx2(pass, used, grad_rows, products, centre) };
            }
            _ => {}
        }
        pass.transform_gradients_portable(used, grad_rows, (products, 0), centre)
    }

    /// The 3 x 3 part of [`Geometry::transform_gradients_portable`] for its whole
    /// 16-channel vectors, on AVX-512: the sixteen values of each tile stored through one
    /// running address. The same sums in the same order, so the same bits. Returns the
    /// channels done.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn gradients_by_vectors_avx512(
        pass: &Geometry,
        used: usize,
        grad_rows: &[f32],
        products: &mut [f32],
    ) -> usize {
        use std::arch::x86_64::*;
        let (m, n, tw, tiles) = (
            pass.wide_out,
            pass.out_channels,
            pass.tiles[1],
            pass.block_tiles(),
        );
        let whole = m / 16 * 16;
        // Tile t = pair * tw + tx reads rows 2 pair, 2 pair + 1 of `2 * tw` pixels.
        let pairs = used.div_ceil(tw.max(1));
        assert!(
            used <= tiles
                && m <= n
                && 16 * tiles * m <= products.len()
                && pairs * 2 * 2 * tw * n <= grad_rows.len(),
            "the tiles' output gradients and products inside their buffers"
        );
        let zero = _mm512_setzero_ps();
        let stride = tiles * m;
        for t in 0..used {
            let (pair, tx) = (t / tw, t % tw);
            let at = |k: usize| ((2 * pair + k / 2) * 2 * tw + 2 * tx + k % 2) * n;
            for c0 in (0..whole).step_by(16) {
                // SAFETY: pair < pairs, k / 2 < 2, 2 tx + k % 2 < 2 tw and c0 + 16 <= m
                // <= n: below pairs * 2 * 2 tw * n (asserted inside `grad_rows`).
                let g = |k: usize| unsafe { _mm512_loadu_ps(grad_rows.as_ptr().add(at(k) + c0)) };
                let (a, b, c, d) = (g(0), g(1), g(2), g(3));
                let rows = [
                    (a, b),
                    (_mm512_add_ps(a, c), _mm512_add_ps(b, d)),
                    (_mm512_sub_ps(a, c), _mm512_sub_ps(b, d)),
                    (_mm512_sub_ps(zero, c), _mm512_sub_ps(zero, d)),
                ];
                let mut to = t * m + c0;
                for (u, v) in rows {
                    let values = [
                        u,
                        _mm512_add_ps(u, v),
                        _mm512_sub_ps(u, v),
                        _mm512_sub_ps(zero, v),
                    ];
                    for value in values {
                        // SAFETY: `to` is (e * tiles + t) * m + c0 for e < 16, t < used <=
                        // tiles and c0 + 16 <= m: below 16 * tiles * m (asserted inside
                        // `products`).
                        unsafe { _mm512_storeu_ps(products.as_mut_ptr().add(to), value) };
                        to += stride;
                    }
                }
            }
        }
        whole
    }

    macro_rules! isa_versions {
        ($feature:literal, $inputs:ident, $outputs:ident, $gradients:ident) => {
            /// The input transform for one instruction set.
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feature)]
            unsafe fn $inputs(
                pass: &Geometry,
                segments: &[Segment],
                rows: &[f32],
                patches: (&mut [f32], usize),
                centre: &mut [f32],
            ) {
                pass.transform_inputs_portable(segments, rows, patches, centre)
            }

            /// The output transform for one instruction set.
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feature)]
            unsafe fn $outputs(
                pass: &Geometry,
                segments: &[Segment],
                sums: (&[f32], &[f32]),
                bias: Option<&[f32]>,
                outputs: (&mut [f32], usize),
            ) {
                pass.transform_outputs_portable(segments, sums, bias, outputs)
            }

            /// The output gradient's transform for one instruction set.
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feature)]
            unsafe fn $gradients(
                pass: &Geometry,
                used: usize,
                grad_rows: &[f32],
                products: (&mut [f32], usize),
                centre: &mut [f32],
            ) {
                pass.transform_gradients_portable(used, grad_rows, products, centre)
            }
        };
    }

    isa_versions!("avx512f", inputs_avx512, outputs_avx512, gradients_avx512);
    isa_versions!("avx2,fma", inputs_avx2, outputs_avx2, gradients_avx2);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nhwc::tests::{square_rings, values};
    use crate::plan::{PlanSpec, Window};
    use crate::tuning::Tuning;
    use crate::Needs;

    /// A 3 x 3 plan: dense (`out_channels` primaries, one ring) or spatial versatile
    /// (`primaries` filters, rings the outer eight and the centre), padded `padding`.
    pub(crate) fn plan(
        input: [usize; 4],
        (out_channels, primaries): (usize, usize),
        padding: [(usize, usize); 2],
    ) -> ConvPlan {
        let rings = if primaries == out_channels {
            vec![square_rings(3).concat()]
        } else {
            square_rings(3)
        };
        ConvPlan::new(PlanSpec {
            input,
            kernel: [3, 3],
            stride: [1, 1],
            dilation: [1, 1],
            padding,
            out_channels,
            primaries,
            n_c: 1,
            window_depth: input[1],
            weight_depth: input[1],
            rings,
            windows: vec![Window::whole(primaries)],
        })
        .unwrap()
    }

    /// A spatial+channel 3 x 3 plan: `n` output channels from windows `delta / g + 1`
    /// windows `c - delta` deep, the weight shared by the windows or sliding with them,
    /// padded 1.
    pub(crate) fn windows_plan(
        input: [usize; 4],
        n: usize,
        [delta, g]: [usize; 2],
        sliding: bool,
    ) -> ConvPlan {
        let depth = input[1] - delta;
        let n_c = delta / g + 1;
        let primaries = n.div_ceil(2 * n_c);
        ConvPlan::new(PlanSpec {
            input,
            kernel: [3, 3],
            stride: [1, 1],
            dilation: [1, 1],
            padding: [(1, 1); 2],
            out_channels: n,
            primaries,
            n_c,
            window_depth: depth,
            weight_depth: if sliding { input[1] } else { depth },
            rings: square_rings(3),
            windows: (0..n_c)
                .map(|j| Window {
                    j,
                    in_offset: j * g,
                    weight_offset: if sliding { j * g } else { 0 },
                    first_primary: 0,
                    rows: primaries,
                })
                .collect(),
        })
        .unwrap()
    }

    /// The plan on the direct passes.
    pub(crate) fn direct(plan: &ConvPlan) -> ConvPlan {
        plan.clone().with_tuning(Tuning {
            strategy: Strategy::Im2col,
            ..Tuning::DEFAULT
        })
    }

    /// Whether `got` is `want` up to the rounding of sums over `terms` values: within
    /// `1e-5 * terms` of the largest magnitude.
    pub(crate) fn assert_close(got: &[f32], want: &[f32], terms: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        let tolerance = 1e-5 * terms as f32 * scale;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tolerance,
                "{what}: value {i} is {g}, the direct pass gives {w} (tolerance {tolerance})"
            );
        }
    }

    fn cases() -> Vec<(&'static str, ConvPlan)> {
        vec![
            ("dense, odd map", plan([2, 16, 7, 9], (32, 32), [(1, 1); 2])),
            (
                "dense, uneven padding, channel tails",
                plan([2, 21, 6, 7], (34, 34), [(0, 2), (2, 1)]),
            ),
            (
                "versatile, 1 x 1 crop shorter than the 3 x 3",
                plan([3, 20, 6, 5], (60, 32), [(1, 1); 2]),
            ),
            (
                "versatile, 2 x 3 maps, blocks across images",
                plan([40, 16, 2, 3], (64, 32), [(1, 1); 2]),
            ),
            (
                "versatile, no padding",
                plan([2, 17, 9, 10], (65, 33), [(0, 0); 2]),
            ),
            (
                "channel windows, shared weight",
                windows_plan([2, 33, 6, 7], 64, [1, 1], false),
            ),
            (
                "channel windows, sliding weight, three windows",
                windows_plan([3, 40, 5, 6], 96, [2, 1], true),
            ),
            (
                "channel windows of stride 2, the last 1 x 1 block cut",
                windows_plan([4, 36, 4, 4], 65, [2, 2], false),
            ),
        ]
    }

    /// Forward pass (with bias and moments), input gradient and weight gradient match
    /// the direct passes up to rounding, on dense and versatile plans, odd maps, uneven
    /// padding, channel counts that are not whole vectors, and blocks that span images.
    #[test]
    fn passes_match_the_direct_convolution() {
        for (what, plan) in cases() {
            assert!(suits::<f32>(&plan), "{what}: declined");
            let x = values(plan.input_len(), 1);
            let w = values(plan.weight_len(), 2);
            let bias = values(plan.out_channels, 3);
            let g = values(plan.output_len(), 4);
            let reference = direct(&plan);
            let (out, moments) = forward(&plan, &x, &w, Some(&bias), true).unwrap();
            let want = crate::forward(&reference, &x, &w, Some(&bias));
            let terms = 9 * plan.in_channels;
            assert_close(&out, &want, terms, &format!("{what}: forward"));
            let [batch, n, oh, ow] = plan.output_shape();
            let want_moments = crate::moments::channel_moments(&out, [batch, n, oh * ow]);
            for (got, want) in moments.unwrap().iter().zip(&want_moments) {
                assert_eq!(got.count, want.count, "{what}: moments count");
                assert!((got.mean - want.mean).abs() <= 1e-6, "{what}: mean");
                assert!(
                    (got.variance() - want.variance()).abs() <= 1e-5 * want.variance().max(1.0),
                    "{what}: variance"
                );
            }
            let needs = Needs {
                x: true,
                weight: true,
                bias: false,
            };
            let got = crate::backward(&plan, &x, &w, &g, needs);
            let want = crate::backward(&reference, &x, &w, &g, needs);
            let terms_dx = 9 * plan.out_channels;
            let terms_dw = plan.batch * oh * ow;
            assert_close(
                got.x.as_ref().unwrap(),
                want.x.as_ref().unwrap(),
                terms_dx,
                &format!("{what}: input gradient"),
            );
            assert_close(
                got.weight.as_ref().unwrap(),
                want.weight.as_ref().unwrap(),
                terms_dw,
                &format!("{what}: weight gradient"),
            );
        }
    }

    /// The passes ran here (the trace says so), and on 1, 2, 3 and 5 threads each thread
    /// count gives the same bits on every run (the blocks, and so the sums, depend on the
    /// thread count, never on timing).
    #[test]
    fn bits_depend_on_nothing_but_the_thread_count() {
        let (_, plan) = cases().remove(2);
        let x = values(plan.input_len(), 5);
        let w = values(plan.weight_len(), 6);
        let g = values(plan.output_len(), 7);
        let needs = Needs {
            x: true,
            weight: true,
            bias: false,
        };
        let run = || {
            let (out, _) = crate::forward_with_moments(&plan, &x, &w, None);
            let grads = crate::backward(&plan, &x, &w, &g, needs);
            (out, grads.x.unwrap(), grads.weight.unwrap())
        };
        for threads in [1, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (first, traced) = pool.install(|| trace::record(run));
            assert!(
                traced.iter().all(|e| e.layout == Traced::Winograd) && traced.len() == 2,
                "{threads} threads: {traced:?}"
            );
            for _ in 0..2 {
                assert_eq!(pool.install(run), first, "{threads} threads");
            }
        }
    }

    /// What stays on the direct passes: f64, a strategy other than the default, too few
    /// channels, primaries or positions (each bound and just past it), plans with other
    /// kernels, strides, groups or padding, and channel windows that read too few of the
    /// input channels or unfold to too few primaries.
    #[test]
    fn declines_what_it_does_not_run() {
        let base = plan([1, 16, 8, 8], (32, 32), [(1, 1); 2]);
        assert!(suits::<f32>(&base));
        assert!(!suits::<f64>(&base));
        assert!(!suits::<f32>(&direct(&base)));
        assert!(!suits::<f32>(&plan([1, 15, 8, 8], (32, 32), [(1, 1); 2])));
        assert!(!suits::<f32>(&plan([1, 16, 8, 8], (15, 15), [(1, 1); 2])));
        assert!(suits::<f32>(&plan([1, 16, 8, 8], (16, 16), [(1, 1); 2])));
        assert!(!suits::<f32>(&plan([1, 16, 7, 9], (32, 32), [(1, 1); 2])));
        assert!(suits::<f32>(&plan([1, 16, 8, 8], (64, 32), [(1, 1); 2])));
        assert!(!suits::<f32>(&plan([1, 16, 8, 8], (30, 15), [(1, 1); 2])));
        assert!(suits::<f32>(&plan([1, 16, 8, 8], (32, 16), [(1, 1); 2])));
        assert!(!suits::<f32>(&plan(
            [1, 16, 10, 10],
            (32, 32),
            [(3, 1), (1, 1)]
        )));
        let strided =
            ConvPlan::dense([1, 16, 16, 16], 32, [3, 3], [2, 2], [1, 1], 1, [(1, 1); 2]).unwrap();
        assert!(!suits::<f32>(&strided));
        let wide =
            ConvPlan::dense([1, 16, 8, 8], 32, [5, 5], [1, 1], [1, 1], 1, [(2, 2); 2]).unwrap();
        assert!(!suits::<f32>(&wide));
        let grouped =
            ConvPlan::dense([1, 32, 8, 8], 64, [3, 3], [1, 1], [1, 1], 2, [(1, 1); 2]).unwrap();
        assert!(!suits::<f32>(&grouped));
        // Channel windows: unfolded while each reads at least 8/9 of the channels, and
        // where the unfolded plan has 16 primaries.
        assert!(suits::<f32>(&windows_plan(
            [1, 36, 8, 8],
            64,
            [4, 1],
            false
        )));
        assert!(!suits::<f32>(&windows_plan(
            [1, 36, 8, 8],
            64,
            [5, 5],
            false
        )));
        assert!(!suits::<f32>(&windows_plan(
            [1, 36, 8, 8],
            28,
            [1, 1],
            false
        )));
        assert!(suits::<f32>(&windows_plan(
            [1, 36, 8, 8],
            32,
            [1, 1],
            false
        )));
    }

    /// The input transform this CPU runs (by columns on AVX-512, the channels past the last
    /// whole vector patch by patch) gives the portable transform's bits, for a layer with a
    /// 1 x 1 part, 40 channels (a vector's tail) and blocks spanning images.
    #[test]
    fn input_transform_matches_the_portable_one() {
        let plan = plan([6, 40, 6, 5], (64, 32), [(1, 1); 2]);
        let pass = Geometry::forward(&plan);
        let tiles = pass.block_tiles();
        let rows = values(pass.band_rows() * pass.padded_width() * 40, 8);
        for block in pass.blocks() {
            let segments = pass.segments(block);
            let mut want = (vec![0.0; 16 * tiles * 40], vec![0.0; 4 * tiles * 40]);
            let mut got = want.clone();
            pass.transform_inputs_portable(&segments, &rows, (&mut want.0, 0), &mut want.1);
            isa::transform_inputs(&pass, &segments, &rows, &mut got.0, &mut got.1);
            assert_eq!(got, want);
        }
    }

    /// The output transform this CPU runs gives the portable transform's bits: the
    /// forward pass with a bias and a 1 x 1 part of its own, and the input gradient's,
    /// whose 1 x 1 part adds into the 3 x 3 part's channels; 40 and 48 channels, odd maps
    /// (tiles with outputs outside the map).
    #[test]
    fn output_transform_matches_the_portable_one() {
        let plan = plan([6, 48, 5, 7], (80, 40), [(1, 1); 2]);
        let bias = values(80, 9);
        for (pass, bias) in [
            (Geometry::forward(&plan), Some(&bias[..])),
            (Geometry::input_gradient(&plan), None),
        ] {
            let tiles = pass.block_tiles();
            let (wide_out, n) = (pass.wide_out, pass.out_channels);
            let products = values(16 * tiles * wide_out, 10);
            let centre = values(4 * tiles * wide_out.max(n - wide_out), 11);
            for block in pass.blocks() {
                let segments = pass.segments(block);
                let mut want = vec![0.0; pass.block_pairs * 2 * pass.output[1] * n];
                let mut got = want.clone();
                let sums = (&products[..], &centre[..]);
                pass.transform_outputs_portable(&segments, sums, bias, (&mut want, 0));
                isa::transform_outputs(&pass, &segments, sums, bias, &mut got);
                assert_eq!(got, want);
            }
        }
    }

    /// The output gradient's transform this CPU runs gives the portable transform's bits,
    /// for 40 primaries (a vector's tail) and a 1 x 1 part, all of a block's tiles and
    /// fewer.
    #[test]
    fn gradient_transform_matches_the_portable_one() {
        let plan = plan([4, 24, 6, 7], (72, 40), [(1, 1); 2]);
        let pass = Geometry::forward(&plan);
        let (tiles, m, n) = (pass.block_tiles(), pass.wide_out, pass.out_channels);
        let grad_rows = values(pass.block_pairs * 2 * 2 * pass.tiles[1] * n, 12);
        for used in [tiles, tiles - 1] {
            let mut want = (vec![0.0; 16 * tiles * m], vec![0.0; 4 * tiles * (n - m)]);
            let mut got = want.clone();
            pass.transform_gradients_portable(used, &grad_rows, (&mut want.0, 0), &mut want.1);
            isa::transform_gradients(&pass, used, &grad_rows, &mut got.0, &mut got.1);
            assert_eq!(got, want);
        }
    }

    /// `Gᵀ dU G` is the adjoint of `G g Gᵀ`: `<G g Gᵀ, dU> = <g, Gᵀ dU G>` for any `g`
    /// and `dU`.
    #[test]
    fn filter_gradient_is_the_transform_adjoint() {
        let g: [f32; 9] = values(9, 8).try_into().unwrap();
        let du: [f32; 16] = values(16, 9).try_into().unwrap();
        let left: f32 = transform_filter(g)
            .iter()
            .zip(&du)
            .map(|(a, b)| a * b)
            .sum();
        let right: f32 = g.iter().zip(&filter_gradient(du)).map(|(a, b)| a * b).sum();
        assert!((left - right).abs() < 1e-5, "{left} against {right}");
    }
}
