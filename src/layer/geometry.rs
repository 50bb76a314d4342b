//! The geometry of a versatile layer (SPEC section 1): how many secondary filters come
//! out of each primary filter, which input channels each window reads, where each output
//! channel sits, and how padding resolves for an input size.
//!
//! Everything here is plain arithmetic on sizes: no tensors, so the cost model, the CPU
//! kernels and the dense form all share one statement of the layout.

use burn::nn::PaddingConfig2d;
use serde::{Deserialize, Serialize};

use super::error::{VConvConfigError, VConvShapeError};
use crate::kernels::{ConvPlan, PlanError, PlanSpec, Window};

/// How the channel windows of a primary filter share weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelMode {
    /// Every window uses the same `c_hat`-deep filter (the authors' current code).
    #[default]
    Shared,
    /// The filter is `c` deep and window `j` uses its channels `[j*g, j*g + c_hat)`
    /// (the paper's Fig. 2(b)).
    Sliding,
}

impl std::fmt::Display for ChannelMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChannelMode::Shared => "shared",
            ChannelMode::Sliding => "sliding",
        })
    }
}

impl std::str::FromStr for ChannelMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(ChannelMode::Shared),
            "sliding" => Ok(ChannelMode::Sliding),
            other => Err(format!(
                "unknown channel mode '{other}' (expected 'shared' or 'sliding')"
            )),
        }
    }
}

/// The settings that fix a versatile layer's geometry, before validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeometrySpec {
    /// Input channels `c`.
    pub in_channels: usize,
    /// Output channels `n`.
    pub out_channels: usize,
    /// Kernel size `[height, width]` (must be square).
    pub kernel_size: [usize; 2],
    /// Stride `[height, width]`.
    pub stride: [usize; 2],
    /// Dilation `[height, width]`.
    pub dilation: [usize; 2],
    /// Groups of the convolution.
    pub groups: usize,
    /// Channel offset range `delta` (0 = spatial only).
    pub delta: usize,
    /// Channel stride `g` of the windows.
    pub g: usize,
    /// Weight sharing between channel windows.
    pub mode: ChannelMode,
}

/// A validated versatile layer geometry with its derived sizes.
///
/// Output channels come in `s * n_c` blocks of `m` channels, block `b = i * n_c + j`
/// holding secondary filter `i` (the centre `(d-2i)x(d-2i)` crop) on channel window `j`
/// (input channels `[j*g, j*g + c_hat)`); channels from `n` on are not emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// Input channels `c`.
    pub in_channels: usize,
    /// Output channels `n`.
    pub out_channels: usize,
    /// Kernel side `d`.
    pub kernel: usize,
    /// Stride `[height, width]`.
    pub stride: [usize; 2],
    /// Dilation `[height, width]`.
    pub dilation: [usize; 2],
    /// Groups.
    pub groups: usize,
    /// Channel offset range `delta`.
    pub delta: usize,
    /// Channel stride `g`.
    pub g: usize,
    /// Weight sharing between channel windows.
    pub mode: ChannelMode,
    /// Spatial secondary filters per primary, `ceil(d / 2)`.
    pub s: usize,
    /// Channel windows per primary, `delta / g + 1`.
    pub n_c: usize,
    /// Primary filters `m = ceil(n / (s * n_c))`.
    pub primary: usize,
    /// Channels one window reads: `c - delta`, or `c / groups` for grouped layers.
    pub c_hat: usize,
}

/// Padding resolved for one input size: `[(top, bottom), (left, right)]`.
pub type PaddingPairs = [(usize, usize); 2];

/// Where one output channel of the block layout comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelSource {
    /// Spatial secondary index `i` (crop `(d-2i)x(d-2i)`).
    pub crop: usize,
    /// Channel window `j`.
    pub window: usize,
    /// Primary filter `p`.
    pub primary: usize,
}

impl Geometry {
    /// Validates `spec` and derives the layer's sizes.
    pub fn new(spec: GeometrySpec) -> Result<Self, VConvConfigError> {
        let GeometrySpec {
            in_channels: c,
            out_channels: n,
            kernel_size,
            stride,
            dilation,
            groups,
            delta,
            g,
            mode,
        } = spec;
        if c == 0 || n == 0 {
            return Err(VConvConfigError::ZeroChannels {
                in_channels: c,
                out_channels: n,
            });
        }
        let [kh, kw] = kernel_size;
        if kh == 0 || kw == 0 {
            return Err(VConvConfigError::ZeroKernel {
                height: kh,
                width: kw,
            });
        }
        if kh != kw {
            return Err(VConvConfigError::NonSquareKernel {
                height: kh,
                width: kw,
            });
        }
        if stride.contains(&0) {
            return Err(VConvConfigError::ZeroStride(stride));
        }
        if dilation.contains(&0) {
            return Err(VConvConfigError::ZeroDilation(dilation));
        }
        if groups == 0 {
            return Err(VConvConfigError::ZeroGroups);
        }
        if delta >= c {
            return Err(VConvConfigError::DeltaTooLarge {
                delta,
                in_channels: c,
            });
        }
        if g == 0 {
            return Err(VConvConfigError::ZeroG);
        }
        if delta % g != 0 {
            return Err(VConvConfigError::GDoesNotDivideDelta { g, delta });
        }
        if groups > 1 && delta > 0 {
            return Err(VConvConfigError::ChannelWithGroups { delta, groups });
        }
        if c % groups != 0 {
            return Err(VConvConfigError::InChannelsNotDivisibleByGroups {
                in_channels: c,
                groups,
            });
        }
        let d = kh;
        let s = d.div_ceil(2);
        let n_c = delta / g + 1;
        let primary = n.div_ceil(s * n_c);
        if groups > 1 {
            if primary % groups != 0 {
                return Err(VConvConfigError::PrimaryNotDivisibleByGroups { primary, groups });
            }
            if primary * s != n {
                return Err(VConvConfigError::GroupsNeedFullBlocks {
                    groups,
                    out_channels: n,
                    s,
                    primary,
                });
            }
        }
        let c_hat = if groups > 1 { c / groups } else { c - delta };
        Ok(Self {
            in_channels: c,
            out_channels: n,
            kernel: d,
            stride,
            dilation,
            groups,
            delta,
            g,
            mode,
            s,
            n_c,
            primary,
            c_hat,
        })
    }

    /// Number of output blocks `s * n_c` (the last ones may be cut or empty).
    pub fn blocks(&self) -> usize {
        self.s * self.n_c
    }

    /// Depth of the trainable weight: `c_hat` (shared), `c` (sliding) or `c / groups`.
    pub fn weight_depth(&self) -> usize {
        match self.mode {
            ChannelMode::Sliding if self.groups == 1 => self.in_channels,
            _ => self.c_hat,
        }
    }

    /// Shape of the trainable weight `[m, depth, d, d]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.primary, self.weight_depth(), self.kernel, self.kernel]
    }

    /// First input channel that window `j` reads.
    pub fn window_input_offset(&self, window: usize) -> usize {
        window * self.g
    }

    /// First weight channel that window `j` uses (non-zero only in sliding mode).
    pub fn window_weight_offset(&self, window: usize) -> usize {
        match self.mode {
            ChannelMode::Sliding => window * self.g,
            ChannelMode::Shared => 0,
        }
    }

    /// Group of primary filter `p` (0 unless `groups > 1`).
    pub fn group_of_primary(&self, primary: usize) -> usize {
        primary / (self.primary / self.groups)
    }

    /// Where output channel `k` of the block layout comes from.
    pub fn source(&self, channel: usize) -> ChannelSource {
        let block = channel / self.primary;
        ChannelSource {
            crop: block / self.n_c,
            window: block % self.n_c,
            primary: channel % self.primary,
        }
    }

    /// Output channel (block layout) of crop `i`, window `j`, primary `p`, if emitted.
    pub fn channel(&self, crop: usize, window: usize, primary: usize) -> Option<usize> {
        let k = (crop * self.n_c + window) * self.primary + primary;
        (k < self.out_channels).then_some(k)
    }

    /// Ring of kernel position `(ky, kx)`: its distance from the border. The position
    /// belongs to crops `0..=ring`, so crop `i` is the union of rings `i..s`.
    pub fn ring(&self, ky: usize, kx: usize) -> usize {
        let d = self.kernel;
        ky.min(kx).min(d - 1 - ky).min(d - 1 - kx)
    }

    /// Number of kernel positions in crop `i`: `(d - 2i)^2`.
    pub fn crop_area(&self, crop: usize) -> usize {
        let side = self.kernel - 2 * crop;
        side * side
    }

    /// Largest crop a primary filter on window `j` must produce: the smallest `i` whose
    /// channel is emitted, or `None` when the cut removed every channel of it.
    pub fn widest_emitted_crop(&self, window: usize, primary: usize) -> Option<usize> {
        (0..self.s).find(|&i| self.channel(i, window, primary).is_some())
    }

    /// Dense output channel order: dense channel `k` is block-layout channel `order[k]`.
    ///
    /// A grouped dense convolution needs each group's outputs contiguous, so for
    /// `groups > 1` the channels of group `q` come together, crop outer, primary inner.
    /// The identity for `groups == 1`.
    pub fn dense_order(&self) -> Vec<usize> {
        if self.groups == 1 {
            return (0..self.out_channels).collect();
        }
        let per_group = self.primary / self.groups;
        let mut order = Vec::with_capacity(self.out_channels);
        for q in 0..self.groups {
            for i in 0..self.s {
                for p in q * per_group..(q + 1) * per_group {
                    order.extend(self.channel(i, 0, p));
                }
            }
        }
        order
    }

    /// The kernels' plan of this layer on an input `[batch, c, h, w]` with resolved
    /// `pads`: ring `r` holds the kernel positions at distance `r` from the border, and
    /// one window per channel window (or group). An error when the input does not fit.
    pub fn plan(&self, input: [usize; 4], pads: PaddingPairs) -> Result<ConvPlan, PlanError> {
        let d = self.kernel;
        let mut rings = vec![Vec::new(); d.div_ceil(2)];
        for ky in 0..d {
            for kx in 0..d {
                rings[self.ring(ky, kx)].push((ky, kx));
            }
        }
        let windows = if self.groups > 1 {
            let per_group = self.primary / self.groups;
            (0..self.groups)
                .map(|q| Window {
                    j: 0,
                    in_offset: q * self.c_hat,
                    weight_offset: 0,
                    first_primary: q * per_group,
                    rows: per_group,
                })
                .collect()
        } else {
            (0..self.n_c)
                .map(|j| Window {
                    j,
                    in_offset: self.window_input_offset(j),
                    weight_offset: self.window_weight_offset(j),
                    first_primary: 0,
                    rows: self.primary,
                })
                .collect()
        };
        ConvPlan::new(PlanSpec {
            input,
            kernel: [d, d],
            stride: self.stride,
            dilation: self.dilation,
            padding: pads,
            out_channels: self.out_channels,
            primaries: self.primary,
            n_c: self.n_c,
            window_depth: self.c_hat,
            weight_depth: self.weight_depth(),
            rings,
            windows,
        })
    }

    /// Resolves `padding` for an `height x width` input exactly as burn's `Conv2d` does,
    /// so the two layers always agree on the output shape: `Same` puts the odd extra
    /// pixel at the end (the ONNX convention) and, like burn 0.22, sizes the padding from
    /// the undilated kernel.
    pub fn resolve_padding(
        &self,
        padding: &PaddingConfig2d,
        height: usize,
        width: usize,
    ) -> PaddingPairs {
        match *padding {
            PaddingConfig2d::Valid => [(0, 0), (0, 0)],
            PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
            PaddingConfig2d::Same => [
                same_padding(self.kernel, self.stride[0], height),
                same_padding(self.kernel, self.stride[1], width),
            ],
        }
    }

    /// Dilated kernel extent along `axis` (0 = height, 1 = width).
    pub fn extent(&self, axis: usize) -> usize {
        self.dilation[axis] * (self.kernel - 1) + 1
    }

    /// Output size `[out_h, out_w]` for an input of `height x width` with `pads`,
    /// or an error when the padded input is smaller than the dilated kernel.
    pub fn output_size(
        &self,
        height: usize,
        width: usize,
        pads: PaddingPairs,
    ) -> Result<[usize; 2], VConvShapeError> {
        let padded = [
            height + pads[0].0 + pads[0].1,
            width + pads[1].0 + pads[1].1,
        ];
        let extent = [self.extent(0), self.extent(1)];
        if padded[0] < extent[0] || padded[1] < extent[1] {
            return Err(VConvShapeError::InputTooSmall {
                height,
                width,
                padding: [pads[0].0, pads[0].1, pads[1].0, pads[1].1],
                kernel: self.kernel,
                dilation: self.dilation,
                extent,
            });
        }
        Ok([
            (padded[0] - extent[0]) / self.stride[0] + 1,
            (padded[1] - extent[1]) / self.stride[1] + 1,
        ])
    }
}

/// `Same` padding for one axis: `(start, end)` with the odd pixel at the end.
pub(crate) fn same_padding(kernel: usize, stride: usize, size: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    if out == 0 {
        return (0, 0);
    }
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// Output size of a sliding window along one axis (`None` when the padded input is
/// smaller than the window). `ceil` follows PyTorch: the last window must start inside
/// the input or its left padding.
pub(crate) fn window_out(
    size: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil: bool,
) -> Option<usize> {
    let padded = size + 2 * padding;
    if padded < kernel {
        return None;
    }
    let span = padded - kernel;
    if ceil {
        let out = span.div_ceil(stride) + 1;
        Some(if (out - 1) * stride >= size + padding {
            out - 1
        } else {
            out
        })
    } else {
        Some(span / stride + 1)
    }
}

/// A padding as `[rows, columns]` when each axis has the same padding on both sides
/// (`Valid`, or an `Explicit` one that is symmetric); `None` otherwise.
pub(crate) fn symmetric_padding(padding: &PaddingConfig2d) -> Option<[usize; 2]> {
    match *padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some([top, left])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(c: usize, n: usize, d: usize) -> GeometrySpec {
        GeometrySpec {
            in_channels: c,
            out_channels: n,
            kernel_size: [d, d],
            stride: [1, 1],
            dilation: [1, 1],
            groups: 1,
            delta: 0,
            g: 1,
            mode: ChannelMode::Shared,
        }
    }

    #[test]
    fn derived_sizes_follow_the_spec() {
        let g = Geometry::new(GeometrySpec {
            delta: 2,
            g: 1,
            ..spec(6, 9, 1)
        })
        .unwrap();
        assert_eq!((g.s, g.n_c, g.primary, g.c_hat), (1, 3, 3, 4));
        let g = Geometry::new(spec(4, 10, 5)).unwrap();
        assert_eq!((g.s, g.n_c, g.primary, g.c_hat), (3, 1, 4, 4));
        // n = 10 of 12: the last block keeps only 2 of its 4 channels.
        assert_eq!(g.channel(2, 0, 1), Some(9));
        assert_eq!(g.channel(2, 0, 2), None);
        let g = Geometry::new(spec(3, 8, 4)).unwrap();
        assert_eq!(g.s, 2);
        assert_eq!(g.crop_area(1), 4);
    }

    #[test]
    fn rings_count_from_the_border() {
        let g = Geometry::new(spec(1, 3, 5)).unwrap();
        assert_eq!(g.ring(0, 3), 0);
        assert_eq!(g.ring(1, 3), 1);
        assert_eq!(g.ring(2, 2), 2);
        let even = Geometry::new(spec(1, 2, 4)).unwrap();
        assert_eq!(even.ring(1, 2), 1);
        assert_eq!(even.ring(2, 3), 0);
    }

    #[test]
    fn grouped_dense_order_keeps_groups_contiguous() {
        let g = Geometry::new(GeometrySpec {
            groups: 2,
            ..spec(8, 16, 3)
        })
        .unwrap();
        assert_eq!(
            g.dense_order(),
            vec![0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
        );
    }

    #[test]
    fn same_padding_matches_conv2d() {
        let g = Geometry::new(spec(1, 2, 4)).unwrap();
        let pads = g.resolve_padding(&PaddingConfig2d::Same, 9, 7);
        assert_eq!(pads, [(1, 2), (1, 2)]);
        assert_eq!(g.output_size(9, 7, pads).unwrap(), [9, 7]);
    }
}
