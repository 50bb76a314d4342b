//! The stride-1 path without a column matrix: gemm straight on shifted views of a padded
//! image.
//!
//! With stride 1, the column-matrix row of kernel position `(ky, kx)` is the padded image
//! shifted by `ky * dh * wp + kx * dw` when the output is computed on the padded width
//! `wp` ("wide" columns `oy * wp + ox`; the columns `ox >= out_w` are junk, never emitted,
//! and carry zero gradient). So each kernel position is one gemm over a window's channels
//! (row stride `hp * wp`) with no copy; positions are visited ring by ring from the centre
//! outwards, and the partial sum is emitted after each ring exactly as in the im2col path.
//! Backwards, the weight gradient of a position reads the same shifted view and the input
//! gradient of a position is added into a padded gradient image at the same shift.

use super::nested::{gemm, BackwardArgs, SharedMut, TaskInput};
use super::plan::{ConvPlan, Window};
use super::workspace::{grow, Workspace};
use super::Real;

/// Padded image geometry of a stride-1 plan.
#[derive(Debug, Clone, Copy)]
pub struct Padded {
    /// Padded height (`out_h + (kh - 1) * dh`).
    pub hp: usize,
    /// Padded width (`out_w + (kw - 1) * dw`).
    pub wp: usize,
}

impl Padded {
    pub fn new(plan: &ConvPlan) -> Self {
        Self {
            hp: plan.output[0] + (plan.kernel[0] - 1) * plan.dilation[0],
            wp: plan.output[1] + (plan.kernel[1] - 1) * plan.dilation[1],
        }
    }

    /// Values of one padded channel.
    pub fn plane(&self) -> usize {
        self.hp * self.wp
    }

    /// Values of one padded image, with slack for the junk columns' reads past the end.
    pub fn image_len(&self, plan: &ConvPlan) -> usize {
        plan.in_channels * self.plane() + self.wp + plan.kernel[1] * plan.dilation[1]
    }

    /// Wide output columns of one image.
    pub fn wide_columns(&self, plan: &ConvPlan) -> usize {
        plan.output[0] * self.wp
    }
}

/// Whether the shifted path applies to the plan and is expected to beat im2col: stride 1,
/// few junk columns, and windows deep enough for a per-position gemm.
pub fn suits(plan: &ConvPlan) -> bool {
    let padded = Padded::new(plan);
    plan.stride == [1, 1]
        && plan.output[1] > 0
        && padded.wp * 3 <= plan.output[1] * 4
        && plan.window_depth >= 16
}

/// Copies image `image` of `x` into `dst` (`c` planes of `hp x wp`), zero borders and slack.
fn pad_image<T: Real>(plan: &ConvPlan, padded: Padded, x: &[T], image: usize, dst: &mut [T]) {
    let [h, w] = plan.input;
    let [pt, pl] = plan.pad;
    let c = plan.in_channels;
    let plane = padded.plane();
    dst.fill(T::ZERO);
    for ch in 0..c {
        let src = &x[(image * c + ch) * h * w..][..h * w];
        let rows = h.min(padded.hp.saturating_sub(pt));
        let cols = w.min(padded.wp.saturating_sub(pl));
        for y in 0..rows {
            let d = ch * plane + (y + pt) * padded.wp + pl;
            dst[d..d + cols].copy_from_slice(&src[y * w..y * w + cols]);
        }
    }
}

/// Values of one padded image in pixel-major order (`hp * wp` pixels of `c` channels),
/// with slack for the junk columns' reads past the end.
fn pixel_major_len(plan: &ConvPlan, padded: Padded) -> usize {
    (padded.plane() + plan.kernel[1] * plan.dilation[1] + 1) * plan.in_channels
}

/// Copies image `image` of `x` into `dst` in pixel-major order (`[hp * wp, c]`, channels
/// contiguous), zero borders and slack: the layout in which a shifted view, read as
/// `[channels, pixels]`, is column-major for gemm.
fn pad_image_pixel_major<T: Real>(
    plan: &ConvPlan,
    padded: Padded,
    x: &[T],
    image: usize,
    dst: &mut [T],
) {
    let [h, w] = plan.input;
    let [pt, pl] = plan.pad;
    let c = plan.in_channels;
    dst.fill(T::ZERO);
    let rows = h.min(padded.hp.saturating_sub(pt));
    let cols = w.min(padded.wp.saturating_sub(pl));
    // Blocks of channels keep the reads of each plane sequential while the writes stay
    // within a few cache lines per pixel.
    const BLOCK: usize = 16;
    for ch0 in (0..c).step_by(BLOCK) {
        let ch1 = (ch0 + BLOCK).min(c);
        for y in 0..rows {
            let pixel0 = (y + pt) * padded.wp + pl;
            for ch in ch0..ch1 {
                let src = &x[((image * c + ch) * h + y) * w..][..cols];
                for (xx, &v) in src.iter().enumerate() {
                    dst[(pixel0 + xx) * c + ch] = v;
                }
            }
        }
    }
}

/// Visits the valid pixels of wide columns `[q0, q1)`: `f(tile column, oy, ox, len)`.
fn valid_segments(
    plan: &ConvPlan,
    padded: Padded,
    q0: usize,
    q1: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let ow = plan.output[1];
    let mut q = q0;
    while q < q1 {
        let (oy, ox) = (q / padded.wp, q % padded.wp);
        let row_end = (oy + 1) * padded.wp;
        if ox < ow {
            let len = (ow - ox).min(q1 - q);
            f(q - q0, oy, ox, len);
        }
        q = row_end.min(q1).max(q + 1);
    }
}

/// Forward pass of wide columns `[start, end)` of the flattened `(image, wide column)`
/// range.
pub fn forward_task<T: Real>(
    (plan, layout, x, ringed): TaskInput<'_, T>,
    ws: &mut Workspace<T>,
    bias: Option<&[T]>,
    out: SharedMut<T>,
    (start, end): (usize, usize),
    tile: usize,
    parallelism: gemm::Parallelism,
) {
    let padded = Padded::new(plan);
    let wide = padded.wide_columns(plan);
    let plane = padded.plane();
    let rings = plan.rings_count();
    {
        let mut t = start;
        while t < end {
            let image = t / wide;
            let stop = end.min((image + 1) * wide);
            let image_buf = grow(&mut ws.cols, padded.image_len(plan));
            pad_image(plan, padded, x, image, image_buf);
            let mut q0 = t - image * wide;
            let q_end = stop - image * wide;
            while q0 < q_end {
                let q1 = (q0 + tile).min(q_end);
                let width = q1 - q0;
                for window in &plan.windows {
                    if window.rows == 0 {
                        continue;
                    }
                    let acc = grow(&mut ws.acc, window.rows * width);
                    let mut first = true;
                    for r in (0..rings).rev() {
                        let npos = layout.positions[r];
                        let block = layout.weight_block(plan, r, window);
                        for (pos, &(ky, kx)) in plan.rings[r].iter().enumerate() {
                            let shift = ky * plan.dilation[0] * padded.wp + kx * plan.dilation[1];
                            let view = window.in_offset * plane + q0 + shift;
                            // SAFETY: acc is rows x width; the weight block addresses
                            // rows x window_depth values of ring r's matrix (column stride
                            // npos); the view reads window_depth planes of the padded image
                            // from column q0 + shift, at most plane + wp + kw * dw values
                            // past each plane start, inside image_len.
                            unsafe {
                                gemm(
                                    [window.rows, width, plan.window_depth],
                                    acc.as_mut_ptr(),
                                    [1, width],
                                    !first,
                                    ringed.as_ptr().add(block + pos),
                                    [npos, layout.weight_ld(plan, r)],
                                    image_buf.as_ptr().add(view),
                                    [1, plane],
                                    parallelism,
                                );
                            }
                            first = false;
                        }
                        emit(plan, padded, window, r, acc, image, (q0, q1), bias, out);
                    }
                }
                q0 = q1;
            }
            t = stop;
        }
    }
}

/// Writes crop `crop` of a window (the accumulator's emitted rows, plus bias) into the
/// valid output pixels of wide columns `[q0, q1)` of `image`.
#[allow(clippy::too_many_arguments)]
fn emit<T: Real>(
    plan: &ConvPlan,
    padded: Padded,
    window: &Window,
    crop: usize,
    acc: &[T],
    image: usize,
    (q0, q1): (usize, usize),
    bias: Option<&[T]>,
    out: SharedMut<T>,
) {
    let width = q1 - q0;
    let base = plan.channel_base(crop, window);
    let pixels = plan.out_pixels();
    let ow = plan.output[1];
    for p in 0..plan.emitted(crop, window) {
        let ch = base + p;
        let b = bias.map_or(T::ZERO, |b| b[ch]);
        let row = &acc[p * width..(p + 1) * width];
        valid_segments(plan, padded, q0, q1, |col, oy, ox, len| {
            let offset = (image * plan.out_channels + ch) * pixels + oy * ow + ox;
            // SAFETY: the pixels lie inside the output and belong to this task only.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(offset), len) };
            for (d, &v) in dst.iter_mut().zip(&row[col..col + len]) {
                *d = v + b;
            }
        });
    }
}

/// Backward pass of images `[first, last)` through the shifted views: their input
/// gradient into `dx` (those images only), their weight-gradient contribution into `dw`
/// (ring layout, accumulated).
pub fn backward_task<T: Real>(
    (plan, layout, x, ringed): TaskInput<'_, T>,
    ws: &mut Workspace<T>,
    (grad_out, (first, last), mut dx, mut dw, fresh, tile, parallelism): BackwardArgs<'_, T>,
) {
    let mut overwrite = fresh;
    let padded = Padded::new(plan);
    let wide = padded.wide_columns(plan);
    let plane = padded.plane();
    let rings = plan.rings_count();
    let pixels = plan.out_pixels();
    let ow = plan.output[1];
    let [h, w] = plan.input;
    let [pt, pl] = plan.pad;
    let c = plan.in_channels;
    {
        for image in first..last {
            let image_buf = grow(
                &mut ws.cols,
                if dw.is_some() {
                    pixel_major_len(plan, padded)
                } else {
                    0
                },
            );
            if dw.is_some() {
                pad_image_pixel_major(plan, padded, x, image, image_buf);
            }
            let grad_buf = grow(
                &mut ws.dcols,
                if dx.is_some() {
                    padded.image_len(plan)
                } else {
                    0
                },
            );
            grad_buf.fill(T::ZERO);
            let mut q0 = 0;
            while q0 < wide {
                let q1 = (q0 + tile).min(wide);
                let width = q1 - q0;
                for window in &plan.windows {
                    if window.rows == 0 {
                        continue;
                    }
                    let sums = grow(&mut ws.acc, window.rows * width);
                    sums.fill(T::ZERO);
                    for r in 0..rings {
                        // Running sum S_r = S_{r-1} + G_r over the emitted rows of crop r.
                        let base = plan.channel_base(r, window);
                        for p in 0..plan.emitted(r, window) {
                            let row = &mut sums[p * width..(p + 1) * width];
                            let channel = (image * plan.out_channels + base + p) * pixels;
                            valid_segments(plan, padded, q0, q1, |col, oy, ox, len| {
                                let g = &grad_out[channel + oy * ow + ox..][..len];
                                for (s, &g) in row[col..col + len].iter_mut().zip(g) {
                                    *s += g;
                                }
                            });
                        }
                        let npos = layout.positions[r];
                        let ld = layout.weight_ld(plan, r);
                        let block = layout.weight_block(plan, r, window);
                        for (pos, &(ky, kx)) in plan.rings[r].iter().enumerate() {
                            let shift = ky * plan.dilation[0] * padded.wp + kx * plan.dilation[1];
                            let view = window.in_offset * plane + q0 + shift;
                            if let Some(dw) = dw.as_deref_mut() {
                                // dW_pos^T[depth, rows] += X_shift[depth, width] * S[rows, width]^T,
                                // X_shift read from the pixel-major image (column-major for
                                // gemm, no packing).
                                let pixel_view = (q0 + shift) * c + window.in_offset;
                                // SAFETY: dw has the ring layout (window block, column stride
                                // npos); the view covers width pixels of window_depth channels
                                // inside the pixel-major image and its slack; sums is
                                // rows x width.
                                unsafe {
                                    gemm(
                                        [plan.window_depth, window.rows, width],
                                        dw.as_mut_ptr().add(block + pos),
                                        [ld, npos],
                                        !overwrite,
                                        image_buf.as_ptr().add(pixel_view),
                                        [c, 1],
                                        sums.as_ptr(),
                                        [width, 1],
                                        parallelism,
                                    );
                                }
                            }
                            if dx.is_some() {
                                // dX_shift[depth, width] += W_pos[rows, depth]^T * S[rows, width]
                                // SAFETY: grad_buf has the padded image's layout and slack.
                                unsafe {
                                    gemm(
                                        [plan.window_depth, width, window.rows],
                                        grad_buf.as_mut_ptr().add(view),
                                        [1, plane],
                                        true,
                                        ringed.as_ptr().add(block + pos),
                                        [ld, npos],
                                        sums.as_ptr(),
                                        [1, width],
                                        parallelism,
                                    );
                                }
                            }
                        }
                    }
                }
                overwrite = false;
                q0 = q1;
            }
            if let Some(dx) = dx.as_deref_mut() {
                // The interior of the padded gradient is the input gradient.
                for ch in 0..c {
                    let dst = &mut dx[((image - first) * c + ch) * h * w..][..h * w];
                    for y in 0..h {
                        let src = ch * plane + (y + pt) * padded.wp + pl;
                        dst[y * w..(y + 1) * w].copy_from_slice(&grad_buf[src..src + w]);
                    }
                }
            }
        }
    }
}
