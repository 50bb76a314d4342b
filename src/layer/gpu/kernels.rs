//! The nested evaluation as CubeCL kernels: forward, input gradient, weight gradient and
//! bias gradient of a versatile convolution, on NCHW tensors addressed through their
//! strides.
//!
//! Every kernel gives one thread one value of one *chunk* of its reduction (input
//! channels for the forward pass, output channels for the input gradient, output rows
//! for the weight and bias gradients) and sums in a fixed order; [`sum_chunks()`] then adds
//! the chunks in order. The chunks bound the work of one thread: it keeps many threads
//! busy on large reductions, and it keeps every loop far below 65,535 iterations, where
//! Mesa's software Vulkan driver (lavapipe, the CI's GPU) silently stops a loop. Chunk
//! sizes follow from the shapes alone, so a result does not depend on scheduling: the
//! same inputs give the same bits on every run.
//!
//! Which primary filter, crop and channel window feed output channel `o` follows from the
//! block layout (`o = (crop * n_c + j) * m + primary`, SPEC section 1); crop `i` keeps the
//! kernel positions `i <= ky < kh - i`, `i <= kx < kw - i`.

use cubecl::prelude::*;

/// The geometry of one nested convolution call, as the kernels are told it.
#[derive(CubeLaunch, CubeType, Clone, Copy)]
pub struct NestedArgs {
    /// Images in the batch.
    pub batch: usize,
    /// Input channels `c`.
    pub in_channels: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Output channels `n`.
    pub out_channels: usize,
    /// Output height.
    pub out_h: usize,
    /// Output width.
    pub out_w: usize,
    /// Kernel height.
    pub kernel_h: usize,
    /// Kernel width.
    pub kernel_w: usize,
    /// Vertical stride.
    pub stride_h: usize,
    /// Horizontal stride.
    pub stride_w: usize,
    /// Vertical dilation.
    pub dilation_h: usize,
    /// Horizontal dilation.
    pub dilation_w: usize,
    /// Padding above the first row.
    pub pad_h: usize,
    /// Padding left of the first column.
    pub pad_w: usize,
    /// Crops `s` (rings of the kernel).
    pub crops: usize,
    /// Primary filters `m`.
    pub primaries: usize,
    /// Channel windows `n_c`.
    pub windows: usize,
    /// Input channels one window reads.
    pub depth: usize,
    /// Primary filters per group (`m` when the layer is not grouped).
    pub group_rows: usize,
    /// First input channel of group `q` is `q * group_in_stride`.
    pub group_in_stride: usize,
    /// First input channel of window `j` is `j * window_in_stride` (plus the group's).
    pub window_in_stride: usize,
    /// First weight channel of window `j` is `j * window_weight_stride`.
    pub window_weight_stride: usize,
    /// Reduction items per chunk (input channels, output channels or output rows, as
    /// the kernel says).
    pub chunk: usize,
}

/// Where output channel `o` comes from: `(primary, crop, first input channel, first
/// weight channel)`.
#[cube]
fn channel_source(o: usize, a: &NestedArgs) -> (usize, usize, usize, usize) {
    let primary = o % a.primaries;
    let block = o / a.primaries;
    let crop = block / a.windows;
    let window = block % a.windows;
    let in_offset = (primary / a.group_rows) * a.group_in_stride + window * a.window_in_stride;
    (primary, crop, in_offset, window * a.window_weight_stride)
}

/// Forward: one thread per (chunk of `a.chunk` window channels, output value
/// `[b, o, oy, ox]`); `out` is contiguous `[chunks, batch, n, out_h, out_w]`, the bias
/// added by chunk 0.
#[cube(launch, address_type = "dynamic")]
pub fn nested_forward<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    bias: &Tensor<F>,
    out: &mut Tensor<F>,
    a: NestedArgs,
    #[comptime] has_bias: bool,
) {
    if ABSOLUTE_POS >= out.len() {
        terminate!();
    }
    let out_len = a.batch * a.out_channels * a.out_h * a.out_w;
    let chunk = ABSOLUTE_POS / out_len;
    let at = ABSOLUTE_POS % out_len;
    let ox = at % a.out_w;
    let oy = (at / a.out_w) % a.out_h;
    let o = (at / (a.out_w * a.out_h)) % a.out_channels;
    let b = at / (a.out_w * a.out_h * a.out_channels);
    let (primary, crop, in_offset, weight_offset) = channel_source(o, &a);
    let first = chunk * a.chunk;
    let end = clamp_max(first + a.chunk, a.depth);

    let mut sum = F::new(0.0);
    // Two `if`s: the outer one is decided when the kernel is compiled.
    #[allow(clippy::collapsible_if)]
    if has_bias {
        if chunk == 0 {
            sum = bias[o * bias.stride(0)];
        }
    }
    for ky in crop..a.kernel_h - crop {
        let iy = oy * a.stride_h + ky * a.dilation_h;
        if iy >= a.pad_h && iy - a.pad_h < a.in_h {
            for kx in crop..a.kernel_w - crop {
                let ix = ox * a.stride_w + kx * a.dilation_w;
                if ix >= a.pad_w && ix - a.pad_w < a.in_w {
                    let x_at = b * x.stride(0)
                        + (iy - a.pad_h) * x.stride(2)
                        + (ix - a.pad_w) * x.stride(3);
                    let w_at =
                        primary * weight.stride(0) + ky * weight.stride(2) + kx * weight.stride(3);
                    for c in first..end {
                        sum += x[x_at + (in_offset + c) * x.stride(1)]
                            * weight[w_at + (weight_offset + c) * weight.stride(1)];
                    }
                }
            }
        }
    }
    out[ABSOLUTE_POS] = sum;
}

/// Input gradient: one thread per (chunk of `a.chunk` output channels, input value
/// `[b, c, iy, ix]`), gathering from the chunk's channels whose window reads channel `c`;
/// `dx` is contiguous `[chunks, batch, c, h, w]`.
#[cube(launch, address_type = "dynamic")]
pub fn nested_input_grad<F: Float>(
    grad: &Tensor<F>,
    weight: &Tensor<F>,
    dx: &mut Tensor<F>,
    a: NestedArgs,
) {
    if ABSOLUTE_POS >= dx.len() {
        terminate!();
    }
    let in_len = a.batch * a.in_channels * a.in_h * a.in_w;
    let chunk = ABSOLUTE_POS / in_len;
    let at = ABSOLUTE_POS % in_len;
    let ix = at % a.in_w;
    let iy = (at / a.in_w) % a.in_h;
    let c = (at / (a.in_w * a.in_h)) % a.in_channels;
    let b = at / (a.in_w * a.in_h * a.in_channels);
    let ty = iy + a.pad_h;
    let tx = ix + a.pad_w;
    let first = chunk * a.chunk;
    let end = clamp_max(first + a.chunk, a.out_channels);

    let mut sum = F::new(0.0);
    for o in first..end {
        let (primary, crop, in_offset, weight_offset) = channel_source(o, &a);
        if c >= in_offset && c < in_offset + a.depth {
            let w_channel =
                primary * weight.stride(0) + (weight_offset + c - in_offset) * weight.stride(1);
            let g_channel = b * grad.stride(0) + o * grad.stride(1);
            for ky in crop..a.kernel_h - crop {
                let reach_y = ky * a.dilation_h;
                if ty >= reach_y && (ty - reach_y).is_multiple_of(a.stride_h) {
                    let oy = (ty - reach_y) / a.stride_h;
                    if oy < a.out_h {
                        for kx in crop..a.kernel_w - crop {
                            let reach_x = kx * a.dilation_w;
                            if tx >= reach_x && (tx - reach_x).is_multiple_of(a.stride_w) {
                                let ox = (tx - reach_x) / a.stride_w;
                                if ox < a.out_w {
                                    sum += grad
                                        [g_channel + oy * grad.stride(2) + ox * grad.stride(3)]
                                        * weight[w_channel
                                            + ky * weight.stride(2)
                                            + kx * weight.stride(3)];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    dx[ABSOLUTE_POS] = sum;
}

/// Weight gradient, first step: one thread per (chunk of `a.chunk` output rows of the
/// flattened `[batch, out_h]`, primary weight value `[p, wc, ky, kx]`), summing over every
/// output channel that primary value feeds (each crop that keeps `(ky, kx)`, each window
/// that uses weight channel `wc`) and over the chunk's rows. `partial` is contiguous
/// `[chunks, weight_len]`.
#[cube(launch, address_type = "dynamic")]
pub fn nested_weight_grad_partial<F: Float>(
    x: &Tensor<F>,
    grad: &Tensor<F>,
    partial: &mut Tensor<F>,
    weight_depth: usize,
    a: NestedArgs,
) {
    if ABSOLUTE_POS >= partial.len() {
        terminate!();
    }
    let weight_len = a.primaries * weight_depth * a.kernel_h * a.kernel_w;
    let chunk = ABSOLUTE_POS / weight_len;
    let at = ABSOLUTE_POS % weight_len;
    let kx = at % a.kernel_w;
    let ky = (at / a.kernel_w) % a.kernel_h;
    let wc = (at / (a.kernel_w * a.kernel_h)) % weight_depth;
    let primary = at / (a.kernel_w * a.kernel_h * weight_depth);
    // The innermost crop that keeps (ky, kx): its distance to the kernel's border.
    let ring = clamp_max(
        clamp_max(ky, a.kernel_h - 1 - ky),
        clamp_max(kx, a.kernel_w - 1 - kx),
    );
    let first_row = chunk * a.chunk;
    let end_row = clamp_max(first_row + a.chunk, a.batch * a.out_h);

    let mut sum = F::new(0.0);
    for crop in 0..a.crops {
        if crop <= ring {
            for window in 0..a.windows {
                let o = (crop * a.windows + window) * a.primaries + primary;
                if o < a.out_channels {
                    let (_, _, in_offset, weight_offset) = channel_source(o, &a);
                    if wc >= weight_offset && wc < weight_offset + a.depth {
                        let x_channel = (in_offset + wc - weight_offset) * x.stride(1);
                        for row in first_row..end_row {
                            let b = row / a.out_h;
                            let oy = row % a.out_h;
                            let iy = oy * a.stride_h + ky * a.dilation_h;
                            if iy >= a.pad_h && iy - a.pad_h < a.in_h {
                                let x_row =
                                    b * x.stride(0) + x_channel + (iy - a.pad_h) * x.stride(2);
                                let g_row =
                                    b * grad.stride(0) + o * grad.stride(1) + oy * grad.stride(2);
                                for ox in 0..a.out_w {
                                    let ix = ox * a.stride_w + kx * a.dilation_w;
                                    if ix >= a.pad_w && ix - a.pad_w < a.in_w {
                                        sum += grad[g_row + ox * grad.stride(3)]
                                            * x[x_row + (ix - a.pad_w) * x.stride(3)];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    partial[ABSOLUTE_POS] = sum;
}

/// Bias gradient, first step: one thread per (chunk of `a.chunk` output rows of the
/// flattened `[batch, out_h]`, output channel), the sum of the chunk's output gradients.
/// `partial` is contiguous `[chunks, out_channels]`.
#[cube(launch, address_type = "dynamic")]
pub fn nested_bias_grad_partial<F: Float>(
    grad: &Tensor<F>,
    partial: &mut Tensor<F>,
    a: NestedArgs,
) {
    if ABSOLUTE_POS >= partial.len() {
        terminate!();
    }
    let o = ABSOLUTE_POS % a.out_channels;
    let first_row = (ABSOLUTE_POS / a.out_channels) * a.chunk;
    let end_row = clamp_max(first_row + a.chunk, a.batch * a.out_h);
    let mut sum = F::new(0.0);
    for row in first_row..end_row {
        let g_row = (row / a.out_h) * grad.stride(0)
            + o * grad.stride(1)
            + (row % a.out_h) * grad.stride(2);
        for ox in 0..a.out_w {
            sum += grad[g_row + ox * grad.stride(3)];
        }
    }
    partial[ABSOLUTE_POS] = sum;
}

/// Second step of the chunked reductions: `out[i] = sum over k of partial[k * len + i]`,
/// chunks added in order. `partial` is contiguous `[chunks, len]`, `out` contiguous.
#[cube(launch, address_type = "dynamic")]
pub fn sum_chunks<F: Float>(partial: &Tensor<F>, out: &mut Tensor<F>, chunks: usize) {
    if ABSOLUTE_POS >= out.len() {
        terminate!();
    }
    let len = out.len();
    let mut sum = F::new(0.0);
    for k in 0..chunks {
        sum += partial[k * len + ABSOLUTE_POS];
    }
    out[ABSOLUTE_POS] = sum;
}
