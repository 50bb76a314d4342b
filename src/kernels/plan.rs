//! [`ConvPlan`]: everything the nested kernels need to know about one call, as plain
//! sizes. A versatile layer and a dense convolution are both plans: the dense one has a
//! single ring holding every kernel position.

use crate::layer::{Geometry, PaddingPairs};

/// A set of primary filters that read one contiguous range of input channels with one
/// contiguous range of weight channels (a channel window `j`, or a group of a grouped
/// layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Channel window index `j` in the output block layout (0 for groups).
    pub j: usize,
    /// First input channel the window reads.
    pub in_offset: usize,
    /// First weight channel the window uses.
    pub weight_offset: usize,
    /// First primary filter of the window.
    pub first_primary: usize,
    /// Primary filters of the window that reach at least one emitted channel.
    pub rows: usize,
}

/// The shape of one nested convolution call: input, output, kernel rings, windows and
/// the output channel layout (`channel = (crop * n_c + j) * m + primary`, channels from
/// `out_channels` on not emitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvPlan {
    /// Batch size.
    pub batch: usize,
    /// Input channels `c`.
    pub in_channels: usize,
    /// Input `[height, width]`.
    pub input: [usize; 2],
    /// Output `[height, width]`.
    pub output: [usize; 2],
    /// Kernel `[height, width]`.
    pub kernel: [usize; 2],
    /// Stride `[height, width]`.
    pub stride: [usize; 2],
    /// Dilation `[height, width]`.
    pub dilation: [usize; 2],
    /// Padding before the first row and column `[top, left]` (the bottom and right
    /// padding only show in the output size).
    pub pad: [usize; 2],
    /// Output channels `n`.
    pub out_channels: usize,
    /// Primary filters `m` (rows of the weight).
    pub primaries: usize,
    /// Channel windows per primary `n_c` (1 for dense and grouped layers).
    pub n_c: usize,
    /// Input channels one window reads.
    pub window_depth: usize,
    /// Channels of the weight, `[m, weight_depth, kh, kw]`.
    pub weight_depth: usize,
    /// Kernel positions `(ky, kx)` of each ring, ring 0 the outermost; crop `i` is the
    /// union of rings `i..`.
    pub rings: Vec<Vec<(usize, usize)>>,
    /// The windows, each producing its own blocks.
    pub windows: Vec<Window>,
}

impl ConvPlan {
    /// The plan of a versatile layer on a `[batch, c, h, w]` input with resolved `pads`.
    /// The caller has validated the input (channels and size) against the geometry.
    pub fn versatile(geometry: &Geometry, input: [usize; 4], pads: PaddingPairs) -> Self {
        let [batch, _, height, width] = input;
        let d = geometry.kernel;
        let output = geometry
            .output_size(height, width, pads)
            .expect("input validated against the geometry");
        let mut rings = vec![Vec::new(); geometry.s];
        for ky in 0..d {
            for kx in 0..d {
                rings[geometry.ring(ky, kx)].push((ky, kx));
            }
        }
        let mut windows = Vec::new();
        if geometry.groups > 1 {
            let per_group = geometry.primary / geometry.groups;
            for q in 0..geometry.groups {
                windows.push(Window {
                    j: 0,
                    in_offset: q * geometry.c_hat,
                    weight_offset: 0,
                    first_primary: q * per_group,
                    rows: per_group,
                });
            }
        } else {
            for j in 0..geometry.n_c {
                windows.push(Window {
                    j,
                    in_offset: geometry.window_input_offset(j),
                    weight_offset: geometry.window_weight_offset(j),
                    first_primary: 0,
                    rows: geometry.primary,
                });
            }
        }
        Self {
            batch,
            in_channels: geometry.in_channels,
            input: [height, width],
            output,
            kernel: [d, d],
            stride: geometry.stride,
            dilation: geometry.dilation,
            pad: [pads[0].0, pads[1].0],
            out_channels: geometry.out_channels,
            primaries: geometry.primary,
            n_c: geometry.n_c,
            window_depth: geometry.c_hat,
            weight_depth: geometry.weight_depth(),
            rings,
            windows,
        }
        .trimmed()
    }

    /// The plan of a dense (possibly grouped) convolution with weight
    /// `[out_channels, in_channels / groups, kh, kw]`: one ring holding every position.
    #[allow(clippy::too_many_arguments)]
    pub fn dense(
        input: [usize; 4],
        out_channels: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
        pads: PaddingPairs,
        output: [usize; 2],
    ) -> Self {
        let [batch, in_channels, height, width] = input;
        let depth = in_channels / groups;
        let per_group = out_channels / groups;
        let ring = (0..kernel[0])
            .flat_map(|ky| (0..kernel[1]).map(move |kx| (ky, kx)))
            .collect();
        let windows = (0..groups)
            .map(|q| Window {
                j: 0,
                in_offset: q * depth,
                weight_offset: 0,
                first_primary: q * per_group,
                rows: per_group,
            })
            .collect();
        Self {
            batch,
            in_channels,
            input: [height, width],
            output,
            kernel,
            stride,
            dilation,
            pad: [pads[0].0, pads[1].0],
            out_channels,
            primaries: out_channels,
            n_c: 1,
            window_depth: depth,
            weight_depth: depth,
            rings: vec![ring],
            windows,
        }
    }

    /// Drops from each window the primaries whose every channel was cut (the widest crop,
    /// `i = 0`, emits the most rows).
    fn trimmed(mut self) -> Self {
        for w in 0..self.windows.len() {
            let rows = self.emitted(0, &self.windows[w]);
            self.windows[w].rows = rows;
        }
        self
    }

    /// Number of rings `s`.
    pub fn rings_count(&self) -> usize {
        self.rings.len()
    }

    /// Output channel of crop `i`, window `w`, the window's first primary.
    pub fn channel_base(&self, crop: usize, window: &Window) -> usize {
        (crop * self.n_c + window.j) * self.primaries + window.first_primary
    }

    /// How many of the window's primaries crop `i` emits (a prefix of them).
    pub fn emitted(&self, crop: usize, window: &Window) -> usize {
        self.out_channels
            .saturating_sub(self.channel_base(crop, window))
            .min(window.rows)
    }

    /// Output pixels per image.
    pub fn out_pixels(&self) -> usize {
        self.output[0] * self.output[1]
    }

    /// Output columns of the whole call: `batch * out_h * out_w`.
    pub fn columns(&self) -> usize {
        self.batch * self.out_pixels()
    }

    /// Elements of the input `[batch, c, h, w]`.
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.input[0] * self.input[1]
    }

    /// Elements of the output `[batch, n, out_h, out_w]`.
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_pixels()
    }

    /// Elements of the weight `[m, depth, kh, kw]`.
    pub fn weight_len(&self) -> usize {
        self.primaries * self.weight_depth * self.kernel[0] * self.kernel[1]
    }

    /// Rows of the im2col matrix: every input channel at every kernel position.
    pub fn col_rows(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }

    /// Multiply-adds of the nested evaluation (one pass: forward, or one gradient).
    pub fn macs(&self) -> u64 {
        let positions = (self.kernel[0] * self.kernel[1]) as u64;
        let rows: u64 = self.windows.iter().map(|w| w.rows as u64).sum();
        self.columns() as u64 * rows * self.window_depth as u64 * positions
    }
}
