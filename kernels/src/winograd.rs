//! 3 x 3 stride-1 convolutions on channels-last activations by Winograd's minimal
//! filtering F(2 x 2, 3 x 3) (Lavin and Gray, 2016): each 2 x 2 block of outputs from its
//! 4 x 4 input patch with 16 multiplies per input channel and filter instead of 36. The
//! patches and the filters are transformed (`V = Bᵀ d B`, `U = G g Gᵀ`, sixteen values
//! each), the sixteen products `M_e = V_e U_e` are plain matrix products over a block of
//! patches (on [`NhwcConv`]'s micro-kernel, the weight laid out once), and each block of
//! outputs is `Aᵀ M A`, written through the epilogue.
//!
//! A versatile layer with a 3 x 3 crop and its 1 x 1 centre (two rings: the outer eight
//! taps, then the centre) computes the 3 x 3 crop this way, and the 1 x 1 crop as a
//! product of the centre pixels with the centre taps: 20 multiplies per 2 x 2 outputs,
//! input channel and primary, where the nested evaluation does 36.
//!
//! The sums are not those of the direct convolution: the transforms add and subtract
//! inputs before the products (halves in `G`), so the outputs differ from it by a few
//! units in the last place of the largest terms, as any reordering of the sums does.

use rayon::prelude::*;

use crate::epilogue::Epilogue;
use crate::nhwc::NhwcConv;
use crate::plan::ConvPlan;
use crate::workspace::{self, grow, Slot};

/// Channels a transform handles at once: one AVX-512 vector.
pub(crate) const LANES: usize = 16;

/// Bytes of the transformed patches and products of one block: the block is transformed,
/// multiplied and transformed back while it stays in the last-level cache.
const BLOCK_BYTES: usize = 2 << 20;

/// Layers with fewer input channels stay on the direct pass: the transforms cost per
/// channel what the products save only when each patch meets many filters.
const MIN_CHANNELS: usize = 32;

/// Nor layers of fewer primaries (filters of the 3 x 3 crop): a spatial layer of 64
/// channels (32 primaries) at 56 x 56 took 0.56-0.70 ms either way, and the transformed
/// weight is 16/9 of the direct one.
const MIN_PRIMARIES: usize = 64;

/// Nor layers of fewer output positions, whose transformed weight (16/9 of the direct
/// one, read by every thread) outweighs the multiplies saved: ResNet-50's spatial 512 ->
/// 512 at 7 x 7, batch 1, took 0.88 against 0.60 ms in the network; at batch 2 (98
/// positions) 1.05 against 1.19 ms alone.
const MIN_POSITIONS: usize = 64;

/// Whether Winograd passes may run: the environment does not say `VERSATILE_WINOGRAD=0`
/// (which keeps every layer on the direct passes, for comparisons). Read once.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("VERSATILE_WINOGRAD").is_none_or(|v| v != "0"))
}

/// Whether F(2 x 2, 3 x 3) computes `plan` (with the 1 x 1 crop as a product of the centre
/// taps): a plan the channels-last micro-kernel takes ([`NhwcConv::supports`]: one window
/// over every input channel, no dilation) with a 3 x 3 kernel of stride 1, whose rings are
/// all nine taps (dense) or the outer eight and the centre. The passes that use it add
/// their own size rules.
pub(crate) fn computes(plan: &ConvPlan) -> bool {
    let rings_fit = match plan.rings.as_slice() {
        [all] => all.len() == 9,
        [outer, centre] => outer.len() == 8 && centre.as_slice() == [(1, 1)],
        _ => false,
    };
    NhwcConv::supports(plan) && plan.kernel == [3, 3] && plan.stride == [1, 1] && rings_fit
}

/// A 3 x 3 stride-1 convolution (dense, or a versatile layer's 3 x 3 and 1 x 1 crops) on
/// channels-last activations by F(2 x 2, 3 x 3), its weight transformed and laid out.
#[derive(Debug, Clone)]
pub struct WinogradConv {
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    /// Filters of the 3 x 3 crop: output channels `0..primaries`.
    primaries: usize,
    /// The 1 x 1 crop's channels, `primaries..out_channels` (0 for a dense layer).
    centre_channels: usize,
    input: [usize; 2],
    output: [usize; 2],
    /// Padding before the first row and column.
    pad: [usize; 2],
    /// 2 x 2 output blocks down and across one image.
    tiles: [usize; 2],
    /// Tiles (2 x 2 output blocks) per block of work: whole pairs of output rows, the
    /// positions of each product call.
    block: usize,
    /// `M_e = V_e U_e` for the sixteen `e`: 1 x 1 convolutions of `block` positions.
    products: Vec<NhwcConv>,
    /// The 1 x 1 crop: a 1 x 1 convolution of `4 * block` centre pixels.
    centre: Option<NhwcConv>,
}

impl WinogradConv {
    /// Whether [`WinogradConv::new`] makes `plan`: a channels-last plan ([`NhwcConv`])
    /// with a 3 x 3 kernel of stride 1, whose rings are all nine taps (dense) or the outer
    /// eight and the centre, of at least 32 input channels, 64 primaries and 64 output
    /// positions.
    pub fn supports(plan: &ConvPlan) -> bool {
        computes(plan)
            && plan.in_channels >= MIN_CHANNELS
            && plan.primaries >= MIN_PRIMARIES
            && plan.batch * plan.output[0] * plan.output[1] >= MIN_POSITIONS
    }

    /// `plan` with its weight (`[primaries, in_channels, 3, 3]`) transformed: `None`
    /// where [`WinogradConv::supports`] declines it.
    ///
    /// # Panics
    /// If `weight` does not hold the plan's weight.
    pub fn new(plan: &ConvPlan, weight: &[f32]) -> Option<Self> {
        assert_eq!(weight.len(), plan.weight_len(), "weight length");
        if !Self::supports(plan) {
            return None;
        }
        let (cin, m) = (plan.in_channels, plan.primaries);
        let centre_channels = plan.out_channels.saturating_sub(m);
        let [oh, ow] = plan.output;
        let tiles = [oh.div_ceil(2), ow.div_ceil(2)];
        // Blocks of whole pairs of output rows, as many as the budget allows, at least
        // one per thread where there are that many pairs, as even as whole pairs give.
        let per_tile = 4 * (16 * (cin + m) + 4 * (cin + centre_channels));
        let pairs = plan.batch * tiles[0];
        let most = (BLOCK_BYTES / per_tile / tiles[1]).max(1);
        let blocks = pairs.div_ceil(most).max(crate::threads().min(pairs));
        let block = pairs.div_ceil(blocks) * tiles[1];
        // U_e[p][c] = (G g Gᵀ)_e of primary p's filter of channel c.
        let mut transformed = vec![vec![0.0f32; m * cin]; 16];
        for (pc, g) in weight.chunks_exact(9).enumerate() {
            let u = transform_filter(g.try_into().expect("nine taps"));
            for (e, value) in u.into_iter().enumerate() {
                transformed[e][pc] = value;
            }
        }
        let product_plan = |positions: usize, out: usize| {
            ConvPlan::dense(
                [1, cin, 1, positions],
                out,
                [1, 1],
                [1, 1],
                [1, 1],
                1,
                [(0, 0), (0, 0)],
            )
            .ok()
        };
        let products = transformed
            .iter()
            .map(|u| NhwcConv::new(&product_plan(block, m)?, u))
            .collect::<Option<Vec<_>>>()?;
        let centre = if centre_channels > 0 {
            let taps: Vec<f32> = weight
                .chunks_exact(9)
                .take(centre_channels * cin)
                .map(|g| g[4])
                .collect();
            Some(NhwcConv::new(
                &product_plan(4 * block, centre_channels)?,
                &taps,
            )?)
        } else {
            None
        };
        Some(Self {
            batch: plan.batch,
            in_channels: cin,
            out_channels: plan.out_channels,
            primaries: m,
            centre_channels,
            input: plan.input,
            output: plan.output,
            pad: plan.pad,
            tiles,
            block,
            products,
            centre,
        })
    }

    /// Values of the input, `[batch, h, w, in_channels]`.
    pub fn input_len(&self) -> usize {
        self.batch * self.input[0] * self.input[1] * self.in_channels
    }

    /// Values of the output, `[batch, out_h, out_w, out_channels]`.
    pub fn output_len(&self) -> usize {
        self.batch * self.output[0] * self.output[1] * self.out_channels
    }

    /// Bytes of the laid-out weights.
    pub fn weight_bytes(&self) -> usize {
        self.products
            .iter()
            .chain(&self.centre)
            .map(NhwcConv::weight_bytes)
            .sum()
    }

    /// `out = epilogue(conv(x))`, `x` `[batch, h, w, in_channels]` and `out` (and the
    /// epilogue's residual) `[batch, out_h, out_w, out_channels]`, on the rayon pool's
    /// threads, each taking whole blocks. Each value's sums run in an order fixed by the
    /// shapes: the bits do not depend on the thread count.
    ///
    /// # Panics
    /// If a length does not match, or the epilogue pools.
    pub fn forward(&self, x: &[f32], epilogue: &Epilogue<'_, f32>, out: &mut [f32]) {
        epilogue.check_channels_last(
            (x, self.input_len()),
            (out, self.output_len()),
            self.out_channels,
        );
        // Blocks of whole pairs of output rows (pair `image * th + py` holds tile row
        // `py`'s outputs): each block writes only its pairs' values, a range of `out`.
        let [th, tw] = self.tiles;
        let pairs = self.batch * th;
        let per_block = self.block / tw;
        let mut chunks = Vec::with_capacity(pairs.div_ceil(per_block));
        let mut rest = out;
        for first in (0..pairs).step_by(per_block) {
            let len = self.pair_start(first + per_block) - self.pair_start(first);
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            chunks.push((first, head));
            rest = tail;
        }
        chunks.into_par_iter().for_each(|(first_pair, chunk)| {
            workspace::with::<f32, _>(Slot::Task, |ws| {
                let (cin, m, m1, block) = (
                    self.in_channels,
                    self.primaries,
                    self.centre_channels,
                    self.block,
                );
                let scratch = grow(&mut ws.cols, 16 * block * (cin + m));
                let (patches, products) = scratch.split_at_mut(16 * block * cin);
                let centre_len = if m1 > 0 { 4 * block * (cin + m1) } else { 0 };
                let scratch = grow(&mut ws.dcols, centre_len);
                let (centre_in, centre_out) = scratch.split_at_mut(centre_len.min(4 * block * cin));
                let first = first_pair * tw;
                let last = ((first_pair + per_block) * tw).min(pairs * tw);
                let tiles = first..last;
                isa::transform_inputs(self, x, tiles.clone(), patches, centre_in);
                for (e, product) in self.products.iter().enumerate() {
                    product.forward_on_this_thread(
                        &patches[e * block * cin..][..block * cin],
                        &mut products[e * block * m..][..block * m],
                    );
                }
                if let Some(centre) = &self.centre {
                    centre.forward_on_this_thread(centre_in, centre_out);
                }
                let sums = (&*products, &*centre_out);
                isa::transform_outputs(self, tiles, sums, epilogue, chunk);
            })
        });
    }

    /// Where output row pair `pair`'s values start (the output's length past the last).
    fn pair_start(&self, pair: usize) -> usize {
        let [th, _] = self.tiles;
        let [oh, ow] = self.output;
        let (image, py) = (pair / th, pair % th);
        ((image * oh + 2 * py) * ow * self.out_channels).min(self.output_len())
    }

    /// The patches of `tiles` into `patches` (`[16][block][in_channels]`, zeros past the
    /// last tile), and their centre pixels into `centre` (`[block][4][in_channels]`, where
    /// the layer has a 1 x 1 crop).
    #[inline(always)]
    fn transform_inputs_portable(
        &self,
        x: &[f32],
        tiles: std::ops::Range<usize>,
        patches: &mut [f32],
        centre: &mut [f32],
    ) {
        let (cin, block) = (self.in_channels, self.block);
        for t in 0..block {
            let pixels = self.patch(tiles.start + t, tiles.end);
            chunks(
                cin,
                #[inline(always)]
                |c0, lanes| {
                    transform_patch(
                        #[inline(always)]
                        |i| pixel(x, pixels[i], c0, lanes),
                        #[inline(always)]
                        |e, v| store(v, &mut patches[(e * block + t) * cin + c0..], lanes),
                    );
                    if self.centre_channels > 0 {
                        for (k, tap) in [5, 6, 9, 10].into_iter().enumerate() {
                            store(
                                &pixel(x, pixels[tap], c0, lanes),
                                &mut centre[(t * 4 + k) * cin + c0..],
                                lanes,
                            );
                        }
                    }
                },
            );
        }
    }

    /// Where tile `tile`'s sixteen input pixels start in the input (`None`: padding, or
    /// at or past `end`), row by row; [`pixel`] reads them, bounds-checked.
    fn patch(&self, tile: usize, end: usize) -> [Option<usize>; 16] {
        let mut pixels = [None; 16];
        if tile >= end {
            return pixels;
        }
        let [th, tw] = self.tiles;
        let (image, ty, tx) = (tile / (th * tw), tile / tw % th, tile % tw);
        let [h, w] = self.input;
        for (i, pixel) in pixels.iter_mut().enumerate() {
            let iy = (2 * ty + i / 4).wrapping_sub(self.pad[0]);
            let ix = (2 * tx + i % 4).wrapping_sub(self.pad[1]);
            if iy < h && ix < w {
                let at = ((image * h + iy) * w + ix) * self.in_channels;
                *pixel = Some(at);
            }
        }
        pixels
    }

    /// The outputs of `tiles` (whole row pairs, from the first's) from their products
    /// `(M, the 1 x 1 crop's)`, through the epilogue, into `chunk`: the output from the
    /// first tile's row pair on.
    #[inline(always)]
    fn transform_outputs_portable(
        &self,
        tiles: std::ops::Range<usize>,
        (products, centre): (&[f32], &[f32]),
        epilogue: &Epilogue<'_, f32>,
        chunk: &mut [f32],
    ) {
        let (m, m1, n, block) = (
            self.primaries,
            self.centre_channels,
            self.out_channels,
            self.block,
        );
        let [th, tw] = self.tiles;
        let [oh, ow] = self.output;
        let chunk_start = self.pair_start(tiles.start / tw);
        for tile in tiles.clone() {
            let (t, image, py, tx) = (
                tile - tiles.start,
                tile / (th * tw),
                tile / tw % th,
                tile % tw,
            );
            // The tile's outputs inside the map: (k, index of its channel 0 in `chunk`).
            let outputs = (0..4).filter_map(|k| {
                let (oy, ox) = (2 * py + k / 2, 2 * tx + k % 2);
                (oy < oh && ox < ow).then(|| (k, ((image * oh + oy) * ow + ox) * n))
            });
            chunks(
                m,
                #[inline(always)]
                |c0, lanes| {
                    let y = transform_products(
                        #[inline(always)]
                        |e| load(&products[(e * block + t) * m + c0..], lanes),
                    );
                    for (k, at) in outputs.clone() {
                        let y = finish(epilogue, y[k], c0, at + c0, lanes);
                        store(&y, &mut chunk[at + c0 - chunk_start..], lanes);
                    }
                },
            );
            for (k, at) in outputs {
                chunks(
                    m1,
                    #[inline(always)]
                    |c0, lanes| {
                        let sums = load(&centre[(t * 4 + k) * m1 + c0..], lanes);
                        let (channel, at) = (m + c0, at + m + c0);
                        let y = finish(epilogue, sums, channel, at, lanes);
                        store(&y, &mut chunk[at - chunk_start..], lanes);
                    },
                );
            }
        }
    }
}

/// `f(c0, lanes)` for the chunks of at most [`LANES`] of `n` channels: the whole vectors
/// first, then the rest. Inlined, the first call site sees `lanes == LANES` as a
/// constant; with one call in a loop, the compiler folds `load`'s and `store`'s two paths
/// into one `memcpy` call of `lanes` values.
#[inline(always)]
pub(crate) fn chunks(n: usize, mut f: impl FnMut(usize, usize)) {
    let whole = n / LANES * LANES;
    for c0 in (0..whole).step_by(LANES) {
        f(c0, LANES);
    }
    if whole < n {
        f(whole, n - whole);
    }
}

/// The transforms compiled for the instruction set of sgemm's micro-kernel (this CPU's
/// widest, unless `VERSATILE_SGEMM=avx2` holds them to AVX2), their portable bodies
/// inlined into each.
mod isa {
    use super::*;

    /// [`WinogradConv::transform_inputs_portable`] on this CPU's widest vectors.
    pub(super) fn transform_inputs(
        conv: &WinogradConv,
        x: &[f32],
        tiles: std::ops::Range<usize>,
        patches: &mut [f32],
        centre: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        match crate::sgemm::micro_kernel() {
            // SAFETY: sgemm picks its AVX-512 micro-kernel only on a CPU with AVX-512F.
            Some("avx512") => return unsafe { inputs_avx512(conv, x, tiles, patches, centre) },
            // SAFETY: and its AVX2 one only on a CPU with AVX2 and FMA.
            Some("avx2") => return unsafe { inputs_avx2(conv, x, tiles, patches, centre) },
            _ => {}
        }
        conv.transform_inputs_portable(x, tiles, patches, centre)
    }

    /// [`WinogradConv::transform_outputs_portable`] on this CPU's widest vectors.
    pub(super) fn transform_outputs(
        conv: &WinogradConv,
        tiles: std::ops::Range<usize>,
        sums: (&[f32], &[f32]),
        epilogue: &Epilogue<'_, f32>,
        chunk: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        match crate::sgemm::micro_kernel() {
            // SAFETY: sgemm picks its AVX-512 micro-kernel only on a CPU with AVX-512F.
            Some("avx512") => return unsafe { outputs_avx512(conv, tiles, sums, epilogue, chunk) },
            // SAFETY: and its AVX2 one only on a CPU with AVX2 and FMA.
            Some("avx2") => return unsafe { outputs_avx2(conv, tiles, sums, epilogue, chunk) },
            _ => {}
        }
        conv.transform_outputs_portable(tiles, sums, epilogue, chunk)
    }

    macro_rules! isa_versions {
        ($feature:literal, $inputs:ident, $outputs:ident) => {
            /// The input transform for one instruction set.
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feature)]
            unsafe fn $inputs(
                conv: &WinogradConv,
                x: &[f32],
                tiles: std::ops::Range<usize>,
                patches: &mut [f32],
                centre: &mut [f32],
            ) {
                conv.transform_inputs_portable(x, tiles, patches, centre)
            }

            /// The output transform for one instruction set.
            ///
            /// # Safety
            /// The CPU must have the instruction set.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $feature)]
            unsafe fn $outputs(
                conv: &WinogradConv,
                tiles: std::ops::Range<usize>,
                sums: (&[f32], &[f32]),
                epilogue: &Epilogue<'_, f32>,
                chunk: &mut [f32],
            ) {
                conv.transform_outputs_portable(tiles, sums, epilogue, chunk)
            }
        };
    }

    isa_versions!("avx512f", inputs_avx512, outputs_avx512);
    isa_versions!("avx2,fma", inputs_avx2, outputs_avx2);
}

/// Channels `c0..c0 + lanes` of the pixel at `at` in `x` (zeros for padding, `None`), as
/// [`load`] gives them.
#[inline(always)]
fn pixel(x: &[f32], at: Option<usize>, c0: usize, lanes: usize) -> [f32; LANES] {
    match at {
        Some(at) => load(&x[at + c0..], lanes),
        None => [0.0; LANES],
    }
}

/// `lanes` values from the front of `src` (whole vectors at once), zeros after them.
#[inline(always)]
pub(crate) fn load(src: &[f32], lanes: usize) -> [f32; LANES] {
    if lanes == LANES {
        src[..LANES].try_into().expect("a whole vector")
    } else {
        let mut values = [0.0; LANES];
        values[..lanes].copy_from_slice(&src[..lanes]);
        values
    }
}

/// The first `lanes` of `values` to the front of `dst`.
#[inline(always)]
pub(crate) fn store(values: &[f32; LANES], dst: &mut [f32], lanes: usize) {
    if lanes == LANES {
        dst[..LANES].copy_from_slice(values);
    } else {
        dst[..lanes].copy_from_slice(&values[..lanes]);
    }
}

/// The epilogue of `lanes` values of channels `channel..` at output index `at..` (the
/// lanes past them are left as they are).
#[inline(always)]
fn finish(
    epilogue: &Epilogue<'_, f32>,
    mut y: [f32; LANES],
    channel: usize,
    at: usize,
    lanes: usize,
) -> [f32; LANES] {
    if let Some(scale) = epilogue.scale {
        let scale = load(&scale[channel..], lanes);
        for (y, s) in y.iter_mut().zip(scale) {
            *y *= s;
        }
    }
    if let Some(shift) = epilogue.shift {
        let shift = load(&shift[channel..], lanes);
        for (y, s) in y.iter_mut().zip(shift) {
            *y += s;
        }
    }
    if let Some(residual) = epilogue.residual {
        let residual = load(&residual[at..], lanes);
        for (y, r) in y.iter_mut().zip(residual) {
            *y += r;
        }
    }
    if epilogue.relu {
        // `y < 0` is false for NaN: NaN stays NaN, as the other passes' ReLU.
        for y in &mut y {
            if *y < 0.0 {
                *y = 0.0;
            }
        }
    }
    y
}

/// `G g Gᵀ` of a 3 x 3 filter `g` (row-major), as sixteen values row-major.
pub(crate) fn transform_filter(g: [f32; 9]) -> [f32; 16] {
    // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
    let rows = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    let mut t = [[0.0f32; 4]; 3];
    for (j, t) in t.iter_mut().enumerate() {
        // Column j of g through G: four values.
        *t = rows(g[j], g[3 + j], g[6 + j]);
    }
    let mut u = [0.0f32; 16];
    for i in 0..4 {
        let row = rows(t[0][i], t[1][i], t[2][i]);
        u[i * 4..][..4].copy_from_slice(&row);
    }
    u
}

/// `[f(0), f(1), f(2), f(3)]`, written out (`std::array::from_fn` is not inlined into the
/// instruction sets' versions).
#[inline(always)]
pub(crate) fn four(f: impl Fn(usize) -> [f32; LANES]) -> [[f32; LANES]; 4] {
    [f(0), f(1), f(2), f(3)]
}

/// `a + b` lane by lane.
#[inline(always)]
pub(crate) fn add(a: [f32; LANES], b: [f32; LANES]) -> [f32; LANES] {
    let mut sum = a;
    for (s, b) in sum.iter_mut().zip(b) {
        *s += b;
    }
    sum
}

/// `a - b` lane by lane.
#[inline(always)]
pub(crate) fn sub(a: [f32; LANES], b: [f32; LANES]) -> [f32; LANES] {
    let mut difference = a;
    for (d, b) in difference.iter_mut().zip(b) {
        *d -= b;
    }
    difference
}

/// `Bᵀ d B` of the 4 x 4 patch whose pixel `i` (row-major) is `d(i)`, lane by lane: `emit(e, V_e)` for the
/// sixteen values row-major.
#[inline(always)]
pub(crate) fn transform_patch(
    d: impl Fn(usize) -> [f32; LANES],
    mut emit: impl FnMut(usize, &[f32; LANES]),
) {
    // Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]: row i of Bᵀ d,
    // column j; then B on the columns of each such row.
    for i in 0..4 {
        let t = four(
            #[inline(always)]
            |j| match i {
                0 => sub(d(j), d(8 + j)),
                1 => add(d(4 + j), d(8 + j)),
                2 => sub(d(8 + j), d(4 + j)),
                _ => sub(d(4 + j), d(12 + j)),
            },
        );
        let [t0, t1, t2, t3] = t;
        emit(4 * i, &sub(t0, t2));
        emit(4 * i + 1, &add(t1, t2));
        emit(4 * i + 2, &sub(t2, t1));
        emit(4 * i + 3, &sub(t1, t3));
    }
}

/// `Aᵀ M A` of the sixteen products `m(e)` (row-major), lane by lane: the 2 x 2 outputs
/// row-major.
#[inline(always)]
pub(crate) fn transform_products(m: impl Fn(usize) -> [f32; LANES]) -> [[f32; LANES]; 4] {
    // Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]: row i of Aᵀ M, column j; then A on the columns.
    let mut y = [[0.0f32; LANES]; 4];
    for i in 0..2 {
        let t = four(
            #[inline(always)]
            |j| {
                if i == 0 {
                    add(add(m(j), m(4 + j)), m(8 + j))
                } else {
                    sub(sub(m(4 + j), m(8 + j)), m(12 + j))
                }
            },
        );
        let [t0, t1, t2, t3] = t;
        y[2 * i] = add(add(t0, t1), t2);
        y[2 * i + 1] = sub(sub(t1, t2), t3);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nhwc::tests::{channels_last, values, versatile};

    /// A dense 3 x 3 plan, padded `padding`.
    fn dense(input: [usize; 4], out_channels: usize, padding: [(usize, usize); 2]) -> ConvPlan {
        ConvPlan::dense(input, out_channels, [3, 3], [1, 1], [1, 1], 1, padding).unwrap()
    }

    /// The Winograd pass against the direct channels-last pass ([`NhwcConv`]), with and
    /// without a full epilogue (scale, shift, residual, ReLU), within `f32` rounding of
    /// the sums' magnitude.
    fn check(plan: &ConvPlan) {
        let weight = values(plan.weight_len(), 1);
        let Some(direct) = NhwcConv::new(plan, &weight) else {
            return; // no channels-last micro-kernel on this CPU
        };
        let winograd = WinogradConv::new(plan, &weight).expect("a plan it supports");
        let x = channels_last(&values(plan.input_len(), 2), plan.input_shape());
        let n = plan.out_channels();
        let (scale, shift) = (values(n, 3), values(n, 4));
        let residual = values(plan.output_len(), 5);
        // The sums' magnitude: every product of one output positive.
        let bound = plan.input_shape()[1] as f32 * 9.0 * 0.25;
        for full in [false, true] {
            let epilogue = Epilogue {
                scale: full.then_some(&scale[..]),
                shift: full.then_some(&shift[..]),
                residual: full.then_some(&residual[..]),
                relu: full,
                pool: false,
            };
            let mut want = vec![0.0; plan.output_len()];
            direct.forward(&x, &epilogue, &mut want);
            let mut got = vec![f32::NAN; plan.output_len()];
            winograd.forward(&x, &epilogue, &mut got);
            for (i, (&got, &want)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-6 * bound,
                    "{:?} -> {:?}, full epilogue {full}, at {i}: {got} against {want}",
                    plan.input_shape(),
                    plan.output_shape(),
                );
            }
        }
    }

    #[test]
    fn dense_layers_match_the_direct_pass() {
        // Odd sizes (a last row and column of tiles half outside the map), uneven and no
        // padding, channels not a multiple of the lanes, several images and blocks.
        check(&dense([1, 32, 8, 8], 64, [(1, 1), (1, 1)]));
        check(&dense([2, 40, 7, 5], 70, [(1, 1), (1, 1)]));
        check(&dense([3, 33, 9, 6], 80, [(1, 0), (0, 2)]));
        check(&dense([1, 64, 10, 11], 64, [(0, 0), (0, 0)]));
        check(&dense([2, 32, 60, 58], 72, [(1, 1), (1, 1)]));
    }

    #[test]
    fn versatile_crops_match_the_direct_pass() {
        // Both crops whole, and the 1 x 1 crop cut short (channels past out_channels
        // not emitted).
        check(&versatile([1, 32, 8, 8], 128, 3, 1));
        check(&versatile([2, 48, 9, 7], 135, 3, 1));
        check(&versatile([1, 64, 56, 56], 128, 3, 1));
    }

    /// The bits do not depend on the thread count, which sizes the blocks.
    #[test]
    fn the_bits_do_not_depend_on_the_thread_count() {
        let plan = versatile([3, 40, 13, 11], 130, 3, 1);
        let weight = values(plan.weight_len(), 1);
        let x = channels_last(&values(plan.input_len(), 2), plan.input_shape());
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let conv = WinogradConv::new(&plan, &weight)?;
                let mut out = vec![0.0; plan.output_len()];
                conv.forward(&x, &Epilogue::default(), &mut out);
                Some((conv.block, out))
            })
        };
        let Some((one_block, one)) = run(1) else {
            return; // no channels-last micro-kernel on this CPU
        };
        for threads in [2, 3, 5] {
            let (block, out) = run(threads).unwrap();
            assert!(
                block < one_block,
                "{threads} threads: blocks of {block} tiles"
            );
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&one), "{threads} threads");
        }
    }

    #[test]
    fn declines_what_it_does_not_compute() {
        let weight = |plan: &ConvPlan| vec![0.0; plan.weight_len()];
        let declined = |plan: ConvPlan| WinogradConv::new(&plan, &weight(&plan)).is_none();
        // Strided, 5 x 5, 1 x 1, few channels, three crops of a 5 x 5.
        assert!(declined(
            ConvPlan::dense([1, 32, 8, 8], 32, [3, 3], [2, 2], [1, 1], 1, [(1, 1); 2]).unwrap()
        ));
        assert!(declined(
            ConvPlan::dense([1, 32, 8, 8], 32, [5, 5], [1, 1], [1, 1], 1, [(2, 2); 2]).unwrap()
        ));
        assert!(declined(
            ConvPlan::dense([1, 32, 8, 8], 32, [1, 1], [1, 1], [1, 1], 1, [(0, 0); 2]).unwrap()
        ));
        assert!(declined(dense([1, 3, 8, 8], 64, [(1, 1); 2])));
        assert!(declined(versatile([1, 32, 8, 8], 96, 5, 1)));
        // Too few primaries, too few output positions; and each just past the bound.
        assert!(declined(versatile([1, 32, 8, 8], 126, 3, 1)));
        assert!(declined(dense([1, 32, 7, 9], 64, [(1, 1); 2])));
        if crate::nhwc::available() {
            assert!(!declined(versatile([1, 32, 8, 8], 127, 3, 1)));
            assert!(!declined(dense([1, 32, 8, 8], 64, [(1, 1); 2])));
        }
    }
}
