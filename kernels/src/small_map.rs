//! Convolutions on maps of a few pixels as one matrix product over the whole batch.
//!
//! On a small map a convolution is a linear map from an image's `c · h · w` input values
//! to its `n · oh · ow` outputs: `y = x · M`, where `M[(c, p_in), (o, p_out)]` is filter
//! `o`'s tap at channel `c` that carries input pixel `p_in` to output pixel `p_out` (zero
//! where no tap does). Where nearly every kernel tap meets the image at every output
//! pixel, `M` is nearly all taps: ResNet's 3 × 3 layers on the 2 × 2 maps of a 32 × 32
//! input, the stride-2 layer that leaves 1 × 1 maps, and those 1 × 1 maps. The
//! channels-first activations are already the rows of the product, so the whole batch is
//! one GEMM of `batch × c·h·w` by `c·h·w × n·oh·ow`, where the direct passes run
//! products a few columns wide and Winograd's tiles cover a 2 × 2 map once, saving
//! nothing. The input gradient is `dy · Mᵀ`, the weight gradient `dyᵀ · x` gathered back
//! onto the taps.
//!
//! `M` is built from each output channel's filter as a dense convolution sees it (its
//! crop's taps at its window's channels, zeros elsewhere), so any plan can run here;
//! [`SmallMap::new`] takes those whose product multiplies at most [`MAX_WASTE`] times the
//! direct passes' live multiply-adds.
//!
//! Every sum runs in an order fixed by the shapes (the products on [`gemm`], the weight
//! gradient's gathers tap by tap in pixel order): the bits depend on the plan and the
//! thread count only.

use rayon::prelude::*;

use crate::nested::gemm;
use crate::plan::ConvPlan;
use crate::tuning::Strategy;
use crate::workspace::{self, grow, Slot};
use crate::Real;

/// Input pixels times output pixels at most: `M` holds `c · n` times as many values.
const MAX_PAIRS: usize = 16;

/// Values of `M` at most (64 MiB of `f32`).
const MAX_MATRIX: usize = 1 << 24;

/// How many times the direct passes' multiply-adds (live taps only) the product may
/// spend: the product runs near the machine's peak where the direct passes on a few
/// pixels do not.
const MAX_WASTE: usize = 2;

/// Where an output channel's filter comes from: its crop, its window and its primary.
#[derive(Clone, Copy)]
struct Source {
    crop: usize,
    window: usize,
    primary: usize,
}

/// A plan that runs as one matrix product, with the tables its passes share (made once
/// per call).
pub(crate) struct SmallMap<'p> {
    plan: &'p ConvPlan,
    in_pixels: usize,
    out_pixels: usize,
    /// `taps[crop][p_out * in_pixels + p_in]`: the kernel position `ky * kw + kx` of the
    /// crop that carries input pixel `p_in` to output pixel `p_out`, if any.
    taps: Vec<Vec<Option<usize>>>,
    /// Each output channel's source, in channel order (a checked plan emits every channel
    /// below `out_channels` exactly once).
    sources: Vec<Option<Source>>,
}

impl<'p> SmallMap<'p> {
    /// `plan` as one product, where it runs here: the default strategy, a map of at most
    /// [`MAX_PAIRS`] pixel pairs, a matrix of at most [`MAX_MATRIX`] values, and a product
    /// of at most [`MAX_WASTE`] times the direct passes' live multiply-adds.
    pub(crate) fn new(plan: &'p ConvPlan) -> Option<Self> {
        let ([h, w], [oh, ow]) = (plan.input, plan.output);
        let (in_pixels, out_pixels) = (h * w, oh * ow);
        let pairs = in_pixels.checked_mul(out_pixels)?;
        if plan.tuning.strategy != Strategy::Auto || plan.columns() == 0 || pairs > MAX_PAIRS {
            return None;
        }
        let rows = plan.in_channels * in_pixels;
        let cols = plan.out_channels * out_pixels;
        if rows.checked_mul(cols).is_none_or(|len| len > MAX_MATRIX) {
            return None;
        }
        let [kh, kw] = plan.kernel;
        // The input coordinate of output `o` at kernel position `k` along `axis`.
        let at = |axis: usize, o: usize, k: usize| {
            (o * plan.stride[axis] + k * plan.dilation[axis])
                .checked_sub(plan.pad[axis])
                .filter(|&i| i < plan.input[axis])
        };
        let mut tap = vec![None; pairs];
        for (oy, ox) in (0..oh).flat_map(|oy| (0..ow).map(move |ox| (oy, ox))) {
            for (ky, kx) in (0..kh).flat_map(|ky| (0..kw).map(move |kx| (ky, kx))) {
                if let (Some(iy), Some(ix)) = (at(0, oy, ky), at(1, ox, kx)) {
                    // Distinct kernel positions read distinct input pixels of one output.
                    tap[(oy * ow + ox) * in_pixels + iy * w + ix] = Some(ky * kw + kx);
                }
            }
        }
        // Crop `crop` holds rings `crop..`.
        let taps: Vec<Vec<Option<usize>>> = (0..plan.rings.len())
            .map(|crop| {
                let mut held = vec![false; kh * kw];
                for &(ky, kx) in plan.rings[crop..].iter().flatten() {
                    held[ky * kw + kx] = true;
                }
                tap.iter().map(|t| t.filter(|&t| held[t])).collect()
            })
            .collect();
        let mut sources = vec![None; plan.out_channels];
        for crop in 0..plan.rings.len() {
            for (window, w) in plan.windows.iter().enumerate() {
                let base = plan.channel_base(crop, w);
                for r in 0..plan.emitted(crop, w) {
                    sources[base + r] = Some(Source {
                        crop,
                        window,
                        primary: w.first_primary + r,
                    });
                }
            }
        }
        // Live multiply-adds of one image: each channel's filter at the pairs its crop
        // joins.
        let live: usize = sources
            .iter()
            .flatten()
            .map(|s| taps[s.crop].iter().flatten().count() * plan.window_depth)
            .sum();
        (rows * cols <= MAX_WASTE * live).then_some(Self {
            plan,
            in_pixels,
            out_pixels,
            taps,
            sources,
        })
    }

    /// Rows of `M`: `c · in_pixels`.
    fn rows(&self) -> usize {
        self.plan.in_channels * self.in_pixels
    }

    /// Columns of `M`: `n · out_pixels`.
    fn cols(&self) -> usize {
        self.plan.out_channels * self.out_pixels
    }

    /// The forward pass `[batch, n, oh, ow]` of the input `[batch, c, h, w]`, the weight
    /// and the bias (their lengths checked by the caller: the products read them through
    /// raw pointers).
    pub(crate) fn forward<T: Real>(&self, x: &[T], weight: &[T], bias: Option<&[T]>) -> Vec<T> {
        let plan = self.plan;
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![T::ZERO; plan.output_len()];
        workspace::with::<T, _>(Slot::Call, |ws| {
            let transposed = grow(&mut ws.weight, rows * cols);
            self.matrix(weight, transposed);
            // SAFETY: `x` is `batch × rows` row-major (a plan's input length), `transposed`
            // is `cols × rows` row-major, read as the `rows × cols` right operand (strides 1
            // down a column, `rows` across), and `out` is `batch × cols` row-major, a
            // buffer of its own.
            unsafe {
                gemm(
                    [plan.batch, cols, rows],
                    out.as_mut_ptr(),
                    [1, cols],
                    false,
                    x.as_ptr(),
                    [1, rows],
                    transposed.as_ptr(),
                    [rows, 1],
                    gemm::Parallelism::Rayon(0),
                );
            }
        });
        if let Some(bias) = bias {
            for image in out.chunks_exact_mut(cols) {
                for (plane, &b) in image.chunks_exact_mut(self.out_pixels).zip(bias) {
                    plane.iter_mut().for_each(|v| *v += b);
                }
            }
        }
        out
    }

    /// The input gradient (where `input`) and the weight gradient (where `weight`) of the
    /// output gradient `[batch, n, oh, ow]` (every length checked by the caller).
    pub(crate) fn backward<T: Real>(
        &self,
        (x, weight, grad_out): (&[T], &[T], &[T]),
        [input, weight_gradient]: [bool; 2],
    ) -> (Option<Vec<T>>, Option<Vec<T>>) {
        let plan = self.plan;
        let (rows, cols) = (self.rows(), self.cols());
        workspace::with::<T, _>(Slot::Call, |ws| {
            let dx = input.then(|| {
                let transposed = grow(&mut ws.weight, rows * cols);
                self.matrix(weight, transposed);
                let mut dx = vec![T::ZERO; plan.input_len()];
                // SAFETY: `grad_out` is `batch × cols` row-major, `transposed` the `cols ×
                // rows` row-major right operand `Mᵀ`, and `dx` is `batch × rows`
                // row-major, a buffer of its own.
                unsafe {
                    gemm(
                        [plan.batch, rows, cols],
                        dx.as_mut_ptr(),
                        [1, rows],
                        false,
                        grad_out.as_ptr(),
                        [1, cols],
                        transposed.as_ptr(),
                        [1, rows],
                        gemm::Parallelism::Rayon(0),
                    );
                }
                dx
            });
            let dw = weight_gradient.then(|| {
                // The product, a sum over the batch, runs on transposed copies: a
                // row-major left and a column-major right operand, the layout sgemm takes.
                let grad_by_column = grow(&mut ws.cols, cols * plan.batch);
                transpose(grad_out, plan.batch, cols, grad_by_column);
                let x_by_column = grow(&mut ws.dcols, rows * plan.batch);
                transpose(x, plan.batch, rows, x_by_column);
                // dMᵀ = dyᵀ · x: row (o, p_out) of `rows` values.
                let product = grow(&mut ws.acc, cols * rows);
                // SAFETY: `grad_by_column` is `dyᵀ`, `cols × batch` row-major;
                // `x_by_column` (`rows × batch` row-major) is read as the `batch × rows`
                // right operand `x` (strides 1 down, `batch` across); `product` is `cols ×
                // rows` row-major, overwritten (no accumulation), apart from both.
                unsafe {
                    gemm(
                        [cols, rows, plan.batch],
                        product.as_mut_ptr(),
                        [1, rows],
                        false,
                        grad_by_column.as_ptr(),
                        [1, plan.batch],
                        x_by_column.as_ptr(),
                        [plan.batch, 1],
                        gemm::Parallelism::Rayon(0),
                    );
                }
                self.fold(product)
            });
            (dx, dw)
        })
    }

    /// For output channel `source`'s pairs its crop joins, in pixel order: where its
    /// window's first channel lies in row `p_out` of the channel's block of `Mᵀ` (`rows`
    /// values per row, channel `c` at `c · in_pixels + p_in`), and the tap.
    fn placed(&self, source: &Source) -> impl Iterator<Item = (usize, usize)> + '_ {
        let (in_pixels, rows) = (self.in_pixels, self.rows());
        let in_offset = self.plan.windows[source.window].in_offset;
        self.taps[source.crop]
            .iter()
            .enumerate()
            .filter_map(move |(pair, tap)| {
                let (p_out, p_in) = (pair / in_pixels, pair % in_pixels);
                tap.map(|t| (p_out * rows + in_offset * in_pixels + p_in, t))
            })
    }

    /// `Mᵀ` into `transposed`, row `(o, p_out)` of `c · in_pixels` values: the weight `[m,
    /// depth, kh, kw]` placed at each output channel's taps and channels, zeros elsewhere
    /// (output channels in parallel; pairs outside and channels inside, so that the inner
    /// loop is a strided copy, not a loop over a few pixels).
    fn matrix<T: Real>(&self, weight: &[T], transposed: &mut [T]) {
        let plan = self.plan;
        let area = plan.kernel[0] * plan.kernel[1];
        let depth = plan.window_depth;
        transposed.fill(T::ZERO);
        transposed
            .par_chunks_mut(self.rows() * self.out_pixels)
            .zip(&self.sources)
            .for_each(|(channel, source)| {
                let Some(source) = source else { return };
                let first =
                    source.primary * plan.weight_depth + plan.windows[source.window].weight_offset;
                let filter = &weight[first * area..][..depth * area];
                for (at, t) in self.placed(source) {
                    let values = channel[at..].iter_mut().step_by(self.in_pixels);
                    for (value, taps) in values.zip(filter.chunks_exact(area)) {
                        *value = taps[t];
                    }
                }
            });
    }

    /// The weight gradient `[m, depth, kh, kw]` of `dMᵀ`: each weight value's share of
    /// every output channel that reads it, channels in order, each channel's pairs in
    /// pixel order (primaries in parallel; pairs outside, channels inside, as in
    /// [`matrix`](Self::matrix)).
    fn fold<T: Real>(&self, product: &[T]) -> Vec<T> {
        let plan = self.plan;
        let area = plan.kernel[0] * plan.kernel[1];
        let depth = plan.window_depth;
        let mut dw = vec![T::ZERO; plan.weight_len()];
        dw.par_chunks_mut(plan.weight_depth * area)
            .enumerate()
            .for_each(|(primary, dw)| {
                let channels = product.chunks_exact(self.rows() * self.out_pixels);
                for (channel, source) in channels.zip(&self.sources) {
                    let Some(source) = source.filter(|s| s.primary == primary) else {
                        continue;
                    };
                    let first = plan.windows[source.window].weight_offset;
                    let filter = &mut dw[first * area..][..depth * area];
                    for (at, t) in self.placed(&source) {
                        let values = channel[at..].iter().step_by(self.in_pixels);
                        for (&value, taps) in values.zip(filter.chunks_exact_mut(area)) {
                            taps[t] += value;
                        }
                    }
                }
            });
        dw
    }
}

/// `values` (`[count, len]` row-major) transposed into `out` (`[len, count]`).
fn transpose<T: Real>(values: &[T], count: usize, len: usize, out: &mut [T]) {
    crate::rows_to_pixel_major(values, [count, 1, len], (0, 0..1, len), (out, 0));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nhwc::tests::values;
    use crate::trace::{self, Layout, Pass};
    use crate::winograd_nchw::tests::{assert_close, direct, plan, windows_plan};
    use crate::Needs;

    /// Whether the plan runs as one product.
    fn suits(plan: &ConvPlan) -> bool {
        SmallMap::new(plan).is_some()
    }

    fn dense(
        input: [usize; 4],
        out: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
    ) -> ConvPlan {
        let pad = kernel / 2;
        ConvPlan::dense(
            input,
            out,
            [kernel; 2],
            [stride; 2],
            [1, 1],
            groups,
            [(pad, pad); 2],
        )
        .unwrap()
    }

    fn cases() -> Vec<(&'static str, ConvPlan)> {
        vec![
            ("dense 3 x 3, 2 x 2 maps", dense([5, 12, 2, 2], 20, 3, 1, 1)),
            (
                "dense 3 x 3 of stride 2, 2 x 2 maps to 1 x 1",
                dense([4, 9, 2, 2], 14, 3, 2, 1),
            ),
            ("dense 1 x 1, 1 x 1 maps", dense([6, 10, 1, 1], 7, 1, 1, 1)),
            ("dense 3 x 3, 1 x 1 maps", dense([3, 8, 1, 1], 5, 3, 1, 1)),
            (
                "grouped 3 x 3, 2 x 2 maps",
                dense([3, 8, 2, 2], 12, 3, 1, 2),
            ),
            (
                "versatile, 1 x 1 crop shorter than the 3 x 3, 2 x 2 maps",
                plan([7, 10, 2, 2], (30, 16), [(1, 1); 2]),
            ),
            (
                "versatile, uneven padding, 2 x 1 maps",
                plan([4, 6, 2, 1], (12, 6), [(0, 2), (1, 1)]),
            ),
            (
                "channel windows, sliding weight, three windows, 2 x 2 maps",
                windows_plan([3, 12, 2, 2], 36, [2, 1], true),
            ),
            (
                "channel windows of stride 2, the last 1 x 1 block cut",
                windows_plan([2, 12, 2, 2], 19, [2, 2], false),
            ),
        ]
    }

    /// Forward pass (with bias and moments), input gradient and weight gradient run here
    /// (the trace says so) and match the direct passes up to rounding, on dense, strided,
    /// grouped and versatile plans, channel windows and uneven padding.
    #[test]
    fn passes_match_the_direct_convolution() {
        for (what, plan) in cases() {
            assert!(suits(&plan), "{what}: declined");
            let x = values(plan.input_len(), 1);
            let w = values(plan.weight_len(), 2);
            let bias = values(plan.out_channels, 3);
            let g = values(plan.output_len(), 4);
            let reference = direct(&plan);
            let needs = Needs {
                x: true,
                weight: true,
                bias: true,
            };
            let ((out, moments, got), traced) = trace::record(|| {
                let (out, moments) = crate::forward_with_moments(&plan, &x, &w, Some(&bias));
                (out, moments, crate::backward(&plan, &x, &w, &g, needs))
            });
            assert_eq!(
                traced
                    .iter()
                    .map(|e| (e.pass, e.layout))
                    .collect::<Vec<_>>(),
                [
                    (Pass::Forward, Layout::WholeMap),
                    (Pass::Backward, Layout::WholeMap)
                ],
                "{what}"
            );
            let (want, want_moments) = crate::forward_with_moments(&reference, &x, &w, Some(&bias));
            let area = plan.kernel[0] * plan.kernel[1];
            assert_close(
                &out,
                &want,
                area * plan.in_channels,
                &format!("{what}: forward"),
            );
            for (got, want) in moments.iter().zip(&want_moments) {
                assert_eq!(got.count, want.count, "{what}: moments count");
                assert!((got.mean - want.mean).abs() <= 1e-5, "{what}: mean");
            }
            let want = crate::backward(&reference, &x, &w, &g, needs);
            let [_, _, oh, ow] = plan.output_shape();
            assert_close(
                got.x.as_ref().unwrap(),
                want.x.as_ref().unwrap(),
                area * plan.out_channels,
                &format!("{what}: input gradient"),
            );
            assert_close(
                got.weight.as_ref().unwrap(),
                want.weight.as_ref().unwrap(),
                plan.batch * oh * ow * plan.rings.len(),
                &format!("{what}: weight gradient"),
            );
            assert_eq!(got.bias, want.bias, "{what}: bias gradient");
        }
    }

    /// Maps whose matrix would mostly multiply zeros, or hold too many pixel pairs, stay
    /// on the other passes; so do plans pinned to another strategy.
    #[test]
    fn declines_sparse_or_large_maps() {
        // 4 x 4: a 3 x 3 kernel joins 100 of the 256 pixel pairs.
        assert!(!suits(&dense([2, 8, 4, 4], 8, 3, 1, 1)));
        // 4 x 4 to 2 x 2 at stride 2: 25 of 64.
        assert!(!suits(&dense([2, 8, 4, 4], 8, 3, 2, 1)));
        // 1 x 1 on 4 x 4 maps: 16 of 256.
        assert!(!suits(&dense([2, 8, 4, 4], 8, 1, 1, 1)));
        // Four groups: a quarter of each filter's channels.
        assert!(!suits(&dense([2, 8, 2, 2], 8, 3, 1, 4)));
        assert!(!suits(&direct(&dense([2, 8, 2, 2], 8, 3, 1, 1))));
        assert!(suits(&dense([2, 8, 2, 2], 8, 3, 1, 1)));
    }

    /// A short input is refused before the products read it (they read through raw
    /// pointers).
    #[test]
    #[should_panic(expected = "input length")]
    fn a_short_input_is_refused() {
        let plan = dense([2, 8, 2, 2], 8, 3, 1, 1);
        assert!(suits(&plan));
        let x = values(plan.input_len() - 1, 1);
        let w = values(plan.weight_len(), 2);
        crate::forward(&plan, &x, &w, None);
    }

    /// On 1, 2, 3 and 5 threads each thread count gives the same bits on every run.
    #[test]
    fn bits_depend_on_nothing_but_the_thread_count() {
        let plan = dense([16, 64, 2, 2], 96, 3, 1, 1);
        let x = values(plan.input_len(), 5);
        let w = values(plan.weight_len(), 6);
        let g = values(plan.output_len(), 7);
        let needs = Needs {
            x: true,
            weight: true,
            bias: false,
        };
        let run = || {
            let out = crate::forward(&plan, &x, &w, None);
            let grads = crate::backward(&plan, &x, &w, &g, needs);
            (out, grads.x.unwrap(), grads.weight.unwrap())
        };
        for threads in [1, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let first = pool.install(run);
            for _ in 0..2 {
                assert_eq!(pool.install(run), first, "{threads} threads");
            }
        }
    }
}
