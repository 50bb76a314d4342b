//! Pooling on `[batch, channels, height, width]` maps (f32), one task per output plane:
//! max and average windows with PyTorch's padding and ceil-mode rules, and adaptive
//! average pooling.

use std::ops::Range;

use rayon::prelude::*;

use super::Real;

/// A pooling window over every plane of a `[batch, channels, height, width]` map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2d {
    /// Input shape `[batch, channels, height, width]`.
    pub input: [usize; 4],
    /// Output `[height, width]` (the caller's rule: floor or ceil mode).
    pub output: [usize; 2],
    /// Window `[height, width]`.
    pub kernel: [usize; 2],
    /// Step `[height, width]`.
    pub stride: [usize; 2],
    /// Zero padding `[top = bottom, left = right]`.
    pub padding: [usize; 2],
}

impl Pool2d {
    /// Values of the input.
    pub fn input_len(&self) -> usize {
        self.input.iter().product()
    }

    /// Values of the output `[batch, channels, out_h, out_w]`.
    pub fn output_len(&self) -> usize {
        self.input[0] * self.input[1] * self.output[0] * self.output[1]
    }

    /// The window of output position `o` along `axis`: its first index in the padded
    /// input (may be negative), and the clipped input range `[start, end)`.
    fn span(&self, axis: usize, o: usize) -> (isize, usize, usize) {
        let size = self.input[2 + axis];
        let start = (o * self.stride[axis]) as isize - self.padding[axis] as isize;
        let end = (start + self.kernel[axis] as isize).min(size as isize);
        let first = start.max(0) as usize;
        (start, first, (end.max(0) as usize).max(first))
    }

    fn check(&self, x: &[f32], out: &[f32]) {
        assert_eq!(x.len(), self.input_len(), "pool input length");
        assert_eq!(out.len(), self.output_len(), "pool output length");
        self.check_window();
    }

    /// Panics unless the window and the stride are positive.
    pub(crate) fn check_window(&self) {
        assert!(
            self.stride.iter().chain(&self.kernel).all(|&v| v > 0),
            "pool window and stride must be positive"
        );
    }

    /// Whether every window is a whole 2 x 2 block of the input, side by side (stride 2,
    /// no padding, the output inside the input).
    pub fn pairs(&self) -> bool {
        let [oh, ow] = self.output;
        self.kernel == [2, 2]
            && self.stride == [2, 2]
            && self.padding == [0, 0]
            && 2 * oh <= self.input[2]
            && 2 * ow <= self.input[3]
    }

    /// The windows of an output plane, laid out for the loops of [`Windows`].
    pub(crate) fn windows(&self) -> Windows {
        let spans = |axis: usize| -> Vec<Range<usize>> {
            (0..self.output[axis])
                .map(|o| {
                    let (_, first, end) = self.span(axis, o);
                    first..end
                })
                .collect()
        };
        let side_by_side = self.kernel == [2, 2] && self.stride == [2, 2] && self.padding == [0, 0];
        let whole = [0, 1].map(|axis| self.output[axis].min(self.input[2 + axis] / 2));
        let blocks = (side_by_side && !self.pairs()).then(|| {
            Box::new(
                Pool2d {
                    output: whole,
                    ..*self
                }
                .windows(),
            )
        });
        Windows {
            rows: spans(0),
            cols: spans(1),
            width: self.input[3],
            across: [self.kernel[1], self.stride[1], self.padding[1]],
            pairs: self.pairs(),
            blocks,
            stride_two_inner: self.stride_two_inner_windows(),
        }
    }

    /// The output columns whose windows lie wholly inside the row, where the windows step
    /// by 2 along it (ResNet's 3 x 3 / 2 pooling): `stride_two_windows_max` takes those;
    /// none otherwise.
    fn stride_two_inner_windows(&self) -> Range<usize> {
        let ([kernel, stride, pad], width) = (
            [self.kernel[1], self.stride[1], self.padding[1]],
            self.input[3],
        );
        if stride != 2 || width + pad < kernel {
            return 0..0;
        }
        // Window ox reads columns 2 ox - pad .. 2 ox - pad + kernel.
        let first = pad.div_ceil(2);
        let end = ((width + pad - kernel) / 2 + 1).min(self.output[1]);
        first..end.max(first)
    }

    /// Runs `f(input plane, output plane)` for every plane, in parallel.
    fn planes(&self, x: &[f32], out: &mut [f32], f: impl Fn(&[f32], &mut [f32]) + Sync) {
        let in_plane = self.input[2] * self.input[3];
        let out_plane = self.output[0] * self.output[1];
        if in_plane == 0 || out_plane == 0 {
            return;
        }
        out.par_chunks_mut(out_plane)
            .zip(x.par_chunks(in_plane))
            .for_each(|(o, i)| f(i, o));
    }
}

/// The windows of a pooling's output plane: each output row's input rows and each output
/// column's input columns, clipped to the input.
///
/// A window's maximum is the first largest value in row-major order, a NaN winning (the
/// last NaN), as PyTorch and burn pick it, so that a backward pass routes the gradient
/// where theirs does; padding never wins. `each_max` (in the tests) is that definition,
/// one window at a time; the loops here are vector code that gives the same results.
#[derive(Debug, Clone)]
pub(crate) struct Windows {
    rows: Vec<Range<usize>>,
    cols: Vec<Range<usize>>,
    /// The input plane's width.
    width: usize,
    /// Kernel, stride and padding along the width.
    across: [usize; 3],
    /// Whether every window is a whole 2x2 block of the input, side by side (stride 2, no
    /// padding): the common case, with its own loops (`max_plane`, `relu_pairs_max`).
    pairs: bool,
    /// For 2 x 2 windows of stride 2 without padding whose ceil-mode output overhangs the
    /// input: the windows of the input's whole 2 x 2 blocks alone (`relu_pairs_max` runs
    /// the blocks' loop on them, then the overhanging windows one by one).
    blocks: Option<Box<Windows>>,
    /// The output columns whose windows of stride 2 lie wholly inside the row (empty for
    /// other strides): the vector loops of `stride_two_windows_max`.
    stride_two_inner: Range<usize>,
}

impl Windows {
    /// Calls `f(o, window)` for each output position `o` of `plane` in row-major order,
    /// with the window's maximum of `value(v)` over its values `v` and where it is (an
    /// index into `plane`), as the type's documentation defines it; `None` for a window
    /// with no input value. The reference the vector loops are tested against.
    #[cfg(test)]
    pub(crate) fn each_max(
        &self,
        plane: &[f32],
        value: impl Fn(f32) -> f32,
        mut f: impl FnMut(usize, Option<(usize, f32)>),
    ) {
        // Selects, not a branch: which value wins is data, and a mispredicted branch per
        // value cost more than the whole window.
        let take = |(at, best): (usize, f32), i: usize, v: f32| {
            let v = value(v);
            let wins = (v > best) | v.is_nan();
            (if wins { i } else { at }, if wins { v } else { best })
        };
        let (w, ow) = (self.width, self.cols.len());
        for (oy, rows) in self.rows.iter().enumerate() {
            for (ox, cols) in self.cols.iter().enumerate() {
                let mut max = None;
                for y in rows.clone() {
                    let row = y * w + cols.start;
                    for (i, &v) in (row..).zip(&plane[row..row + cols.len()]) {
                        max = Some(max.map_or_else(|| (i, value(v)), |max| take(max, i, v)));
                    }
                }
                f(oy * ow + ox, max);
            }
        }
    }

    /// For 2 x 2 windows of stride 2 without padding, a ceil-mode output's overhanging
    /// windows included (else `false`, nothing written): with `v * scale +
    /// shift` for each value `v` of `plane`, each window's maximum (the type's rule),
    /// where it is above zero or NaN (a ReLU after it), into `values[o]` and its index
    /// into `sources[o]`; elsewhere `0.0` and `not_passed`. One branch-free pass over each
    /// pair of rows, which the compiler turns into vector code, at the widest vectors this
    /// CPU has (the same selects, so the same results).
    pub(crate) fn relu_pairs_max(
        &self,
        plane: &[f32],
        factors: [f32; 2],
        values: &mut [f32],
        sources: &mut [u32],
        not_passed: u32,
    ) -> bool {
        if self.pairs {
            relu_pairs_max_widest(self, plane, factors, values, sources, not_passed);
            return true;
        }
        let Some(blocks) = &self.blocks else {
            return false;
        };
        // The whole blocks into rows of their own, then into the output's longer rows.
        let (ow, [rows, columns]) = (self.cols.len(), [blocks.rows.len(), blocks.cols.len()]);
        SCRATCH.with_borrow_mut(|scratch| {
            let (block_values, block_sources) = scratch.take(rows * columns, rows * columns);
            relu_pairs_max_widest(
                blocks,
                plane,
                factors,
                block_values,
                block_sources,
                not_passed,
            );
            for oy in 0..rows {
                let (from, to) = (oy * columns, oy * ow);
                values[to..to + columns].copy_from_slice(&block_values[from..from + columns]);
                sources[to..to + columns].copy_from_slice(&block_sources[from..from + columns]);
            }
        });
        // The overhanging windows (cut by the input's edge, or past it and empty), one by
        // one in the rule's row-major order.
        let ([scale, shift], w) = (factors, self.width);
        for (oy, window_rows) in self.rows.iter().enumerate() {
            let first = if oy < rows { columns } else { 0 };
            for (ox, window_cols) in self.cols.iter().enumerate().skip(first) {
                let (mut at, mut best) = (0u32, f32::NEG_INFINITY);
                for y in window_rows.clone() {
                    for x in window_cols.clone() {
                        let v = plane[y * w + x] * scale + shift;
                        let wins = (v > best) | v.is_nan();
                        at = if wins { (y * w + x) as u32 } else { at };
                        best = if wins { v } else { best };
                    }
                }
                let passes = (best > 0.0) | best.is_nan();
                values[oy * ow + ox] = if passes { best } else { 0.0 };
                sources[oy * ow + ox] = if passes { at } else { not_passed };
            }
        }
        true
    }

    /// Any window: with `v * scale + shift` for each value `v` of `plane`, each window's
    /// maximum (the type's rule), where it is above zero or NaN (a ReLU after it), into
    /// `values[o]` and its index into `sources[o]`; elsewhere `0.0` and `not_passed`.
    ///
    /// Every window shape: the maxima of each input row over the windows' columns, then of
    /// the rows over each window's rows (see `relu_any_max`). (Starting from -inf instead
    /// of the first value changes no result: -inf never wins, and a window whose maximum
    /// is -inf is cut by the ReLU either way.)
    pub(crate) fn relu_any_max(
        &self,
        plane: &[f32],
        factors: [f32; 2],
        values: &mut [f32],
        sources: &mut [u32],
        not_passed: u32,
    ) {
        SCRATCH.with_borrow_mut(|scratch| {
            #[cfg(target_arch = "x86_64")]
            if let Some(selects) = avx512::Selects::detect() {
                let out = (values, sources, not_passed);
                return relu_any_max(self, plane, factors, out.0, out.1, out.2, scratch, &selects);
            }
            let selects = &PortableSelects;
            relu_any_max_widest(
                self, plane, factors, values, sources, not_passed, scratch, selects,
            )
        })
    }
}

/// [`Windows::relu_pairs_max`] for any CPU, inlined into the versions for wider vectors;
/// the windows are 2 x 2 of stride 2.
#[inline(always)]
fn relu_pairs_max(
    windows: &Windows,
    plane: &[f32],
    [scale, shift]: [f32; 2],
    values: &mut [f32],
    sources: &mut [u32],
    not_passed: u32,
) {
    let (w, ow) = (windows.width, windows.cols.len());
    for oy in 0..windows.rows.len() {
        let (top_at, bottom_at) = (2 * oy * w, (2 * oy + 1) * w);
        let top = &plane[top_at..top_at + 2 * ow];
        let bottom = &plane[bottom_at..bottom_at + 2 * ow];
        let values = &mut values[oy * ow..(oy + 1) * ow];
        let sources = &mut sources[oy * ow..(oy + 1) * ow];
        for ox in 0..ow {
            let candidates = [
                (top_at + 2 * ox, top[2 * ox]),
                (top_at + 2 * ox + 1, top[2 * ox + 1]),
                (bottom_at + 2 * ox, bottom[2 * ox]),
                (bottom_at + 2 * ox + 1, bottom[2 * ox + 1]),
            ];
            let (mut at, mut best) = (candidates[0].0, candidates[0].1 * scale + shift);
            for &(i, v) in &candidates[1..] {
                let v = v * scale + shift;
                let wins = (v > best) | v.is_nan();
                at = if wins { i } else { at };
                best = if wins { v } else { best };
            }
            let passes = (best > 0.0) | best.is_nan();
            values[ox] = if passes { best } else { 0.0 };
            sources[ox] = if passes { at as u32 } else { not_passed };
        }
    }
}

/// [`Windows::relu_any_max`] for any CPU, inlined into the versions for wider vectors.
///
/// Separable: each input row's maximum over every window's columns (a row is scaled as it
/// is read, and read once for all the output rows whose windows cover it), then each
/// window's maximum over its rows' maxima. That is the rule's row-major order: the first
/// row holding the window's largest value wins a tie between rows and, within the row,
/// its first column; the last row holding a NaN wins and, within it, the last NaN.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn relu_any_max(
    windows: &Windows,
    plane: &[f32],
    [scale, shift]: [f32; 2],
    values: &mut [f32],
    sources: &mut [u32],
    not_passed: u32,
    scratch: &mut Scratch,
    selects: &impl Selects,
) {
    let (w, ow) = (windows.width, windows.cols.len());
    // The rows some window reads.
    let first_row = windows
        .rows
        .iter()
        .map(|rows| rows.start)
        .min()
        .unwrap_or(0);
    let end_row = windows
        .rows
        .iter()
        .map(|rows| rows.end)
        .max()
        .unwrap_or(0)
        .max(first_row);
    let used = (end_row - first_row) * ow;
    let [kernel, stride, pad] = windows.across;
    let positions = if ow == 0 { 0 } else { stride * (ow - 1) + 1 };
    let padded_len = (positions + kernel - 1).max(pad + w);
    let (floats, indices) = scratch.take(used + padded_len + positions + ow, used + positions + ow);
    let (row_best, floats) = floats.split_at_mut(used);
    let (padded, floats) = floats.split_at_mut(padded_len);
    let (every_best, best) = floats.split_at_mut(positions);
    let (row_at, indices) = indices.split_at_mut(used);
    let (every_at, at) = indices.split_at_mut(positions);
    // A row scaled, with -inf on both sides where the windows reach past it: window
    // ox's column j is `padded[stride * ox + j]`.
    padded.fill(f32::NEG_INFINITY);
    // The maxima of windows starting at every column, not only every stride-th
    // (`every_best`): contiguous loads, so that the loop is vector code.
    for y in first_row..end_row {
        let row = &plane[y * w..(y + 1) * w];
        for (p, &v) in padded[pad..pad + w].iter_mut().zip(row) {
            *p = v * scale + shift;
        }
        every_best.fill(f32::NEG_INFINITY);
        // Where padded column `q` lies in the plane (wrapping below zero: padding, which
        // never wins).
        let first = ((y * w) as u32).wrapping_sub(pad as u32);
        for j in 0..kernel {
            let columns = &padded[j..j + positions];
            selects.take_run(every_best, every_at, columns, first.wrapping_add(j as u32));
        }
        let at_row = (y - first_row) * ow;
        let row_windows = row_best[at_row..at_row + ow]
            .iter_mut()
            .zip(&mut row_at[at_row..at_row + ow]);
        for (ox, (best, at)) in row_windows.enumerate() {
            (*best, *at) = (every_best[stride * ox], every_at[stride * ox]);
        }
    }
    for (oy, rows) in windows.rows.iter().enumerate() {
        best.fill(f32::NEG_INFINITY);
        for y in rows.clone() {
            let at_row = (y - first_row) * ow;
            let candidates = &row_best[at_row..at_row + ow];
            selects.take_at(best, at, candidates, &row_at[at_row..at_row + ow]);
        }
        let values = &mut values[oy * ow..(oy + 1) * ow];
        let sources = &mut sources[oy * ow..(oy + 1) * ow];
        selects.relu(best, at, (values, sources), not_passed);
    }
}

/// The element-wise selects of `relu_any_max`, where a value wins over the best so far
/// when it is larger or NaN (the rule of [`Windows`]).
trait Selects {
    /// Where `values[i]` wins over `best[i]`: it, and the index `first + i` into `at[i]`.
    fn take_run(&self, best: &mut [f32], at: &mut [u32], values: &[f32], first: u32);
    /// Where `values[i]` wins over `best[i]`: it, and `indices[i]` into `at[i]`.
    fn take_at(&self, best: &mut [f32], at: &mut [u32], values: &[f32], indices: &[u32]);
    /// A ReLU: `best[i]` and `at[i]` into `values[i]` and `sources[i]` where `best[i]` is
    /// above zero or NaN, else `0.0` and `not_passed`.
    fn relu(&self, best: &[f32], at: &[u32], out: (&mut [f32], &mut [u32]), not_passed: u32);
}

/// [`Selects`] in portable loops (the compiler's vectors where the loops are long).
struct PortableSelects;

impl Selects for PortableSelects {
    #[inline(always)]
    fn take_run(&self, best: &mut [f32], at: &mut [u32], values: &[f32], first: u32) {
        for (i, ((best, at), &v)) in best.iter_mut().zip(at).zip(values).enumerate() {
            let wins = (v > *best) | v.is_nan();
            *at = if wins {
                first.wrapping_add(i as u32)
            } else {
                *at
            };
            *best = if wins { v } else { *best };
        }
    }

    #[inline(always)]
    fn take_at(&self, best: &mut [f32], at: &mut [u32], values: &[f32], indices: &[u32]) {
        let candidates = values.iter().zip(indices);
        for ((best, at), (&v, &i)) in best.iter_mut().zip(at).zip(candidates) {
            let wins = (v > *best) | v.is_nan();
            *at = if wins { i } else { *at };
            *best = if wins { v } else { *best };
        }
    }

    #[inline(always)]
    fn relu(
        &self,
        best: &[f32],
        at: &[u32],
        (values, sources): (&mut [f32], &mut [u32]),
        not_passed: u32,
    ) {
        for (((value, source), &best), &at) in values.iter_mut().zip(sources).zip(best).zip(at) {
            let passes = (best > 0.0) | best.is_nan();
            *value = if passes { best } else { 0.0 };
            *source = if passes { at } else { not_passed };
        }
    }
}

/// [`Selects`] in AVX-512 registers: sixteen lanes at a time, the last ones masked. The
/// rows of small planes (ResNet's 16 x 16 stem pooling: 8 windows a row) are shorter than
/// the compiler's vector loops take, so those ran scalar, their selects as branches.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The selects, made only where the CPU has AVX-512F (which makes them safe to run).
    pub(super) struct Selects(());

    impl Selects {
        /// The selects where this CPU has AVX-512F.
        pub(super) fn detect() -> Option<Self> {
            is_x86_feature_detected!("avx512f").then_some(Selects(()))
        }
    }

    /// The mask of lanes `[at, at + 16)` inside a slice of `len > at` values.
    fn lanes(at: usize, len: usize) -> __mmask16 {
        let inside = (len - at).min(16) as u32;
        ((1u32 << inside) - 1) as __mmask16
    }

    /// The lanes where `v` wins over `best`: larger, or NaN.
    #[target_feature(enable = "avx512f")]
    fn wins(v: __m512, best: __m512) -> __mmask16 {
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
    }

    /// `super::Selects::take_run` (the CPU must have AVX-512F).
    #[target_feature(enable = "avx512f")]
    fn take_run(best: &mut [f32], at: &mut [u32], values: &[f32], first: u32) {
        let len = best.len().min(at.len()).min(values.len());
        let steps = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for i in (0..len).step_by(16) {
            let mask = lanes(i, len);
            let index = _mm512_add_epi32(
                _mm512_set1_epi32(first.wrapping_add(i as u32) as i32),
                steps,
            );
            // SAFETY: the masked lanes are `i..min(i + 16, len)`, inside all three slices
            // (masked-off lanes are neither read nor written).
            unsafe {
                let b = _mm512_maskz_loadu_ps(mask, best.as_ptr().add(i));
                let v = _mm512_maskz_loadu_ps(mask, values.as_ptr().add(i));
                let take = wins(v, b) & mask;
                _mm512_mask_storeu_ps(best.as_mut_ptr().add(i), take, v);
                _mm512_mask_storeu_epi32(at.as_mut_ptr().add(i).cast(), take, index);
            }
        }
    }

    /// `super::Selects::take_at` (the CPU must have AVX-512F).
    #[target_feature(enable = "avx512f")]
    fn take_at(best: &mut [f32], at: &mut [u32], values: &[f32], indices: &[u32]) {
        let len = best
            .len()
            .min(at.len())
            .min(values.len())
            .min(indices.len());
        for i in (0..len).step_by(16) {
            let mask = lanes(i, len);
            // SAFETY: the masked lanes are `i..min(i + 16, len)`, inside all four slices.
            unsafe {
                let b = _mm512_maskz_loadu_ps(mask, best.as_ptr().add(i));
                let v = _mm512_maskz_loadu_ps(mask, values.as_ptr().add(i));
                let index = _mm512_maskz_loadu_epi32(mask, indices.as_ptr().add(i).cast());
                let take = wins(v, b) & mask;
                _mm512_mask_storeu_ps(best.as_mut_ptr().add(i), take, v);
                _mm512_mask_storeu_epi32(at.as_mut_ptr().add(i).cast(), take, index);
            }
        }
    }

    /// `super::Selects::relu` (the CPU must have AVX-512F).
    #[target_feature(enable = "avx512f")]
    fn relu(
        best: &[f32],
        at: &[u32],
        (values, sources): (&mut [f32], &mut [u32]),
        not_passed: u32,
    ) {
        let len = best
            .len()
            .min(at.len())
            .min(values.len())
            .min(sources.len());
        let cut = _mm512_set1_epi32(not_passed as i32);
        for i in (0..len).step_by(16) {
            let mask = lanes(i, len);
            // SAFETY: the masked lanes are `i..min(i + 16, len)`, inside all four slices.
            unsafe {
                let b = _mm512_maskz_loadu_ps(mask, best.as_ptr().add(i));
                let a = _mm512_maskz_loadu_epi32(mask, at.as_ptr().add(i).cast());
                // Above zero or NaN: not (b <= 0).
                let passes = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(b, _mm512_setzero_ps());
                let value = _mm512_maskz_mov_ps(passes, b);
                let source = _mm512_mask_blend_epi32(passes, cut, a);
                _mm512_mask_storeu_ps(values.as_mut_ptr().add(i), mask, value);
                _mm512_mask_storeu_epi32(sources.as_mut_ptr().add(i).cast(), mask, source);
            }
        }
    }

    impl super::Selects for Selects {
        fn take_run(&self, best: &mut [f32], at: &mut [u32], values: &[f32], first: u32) {
            // SAFETY: `Selects` is only made on a CPU with AVX-512F.
            unsafe { take_run(best, at, values, first) }
        }

        fn take_at(&self, best: &mut [f32], at: &mut [u32], values: &[f32], indices: &[u32]) {
            // SAFETY: `Selects` is only made on a CPU with AVX-512F.
            unsafe { take_at(best, at, values, indices) }
        }

        fn relu(&self, best: &[f32], at: &[u32], out: (&mut [f32], &mut [u32]), not_passed: u32) {
            // SAFETY: `Selects` is only made on a CPU with AVX-512F.
            unsafe { relu(best, at, out, not_passed) }
        }
    }
}

/// Buffers a thread's `relu_any_max` reuses from plane to plane: allocating them per plane
/// (thousands of small allocations a pass, both threads taking the allocator's lock) cost
/// more than the pooling.
#[derive(Default)]
struct Scratch {
    floats: Vec<f32>,
    indices: Vec<u32>,
}

impl Scratch {
    /// At least `floats` and `indices` values (left as a previous plane wrote them).
    fn take(&mut self, floats: usize, indices: usize) -> (&mut [f32], &mut [u32]) {
        if self.floats.len() < floats {
            self.floats.resize(floats, 0.0);
        }
        if self.indices.len() < indices {
            self.indices.resize(indices, 0);
        }
        (&mut self.floats[..floats], &mut self.indices[..indices])
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Max pooling (padding never wins; NaN propagates, as PyTorch). A window with no input
/// value (only possible with padding above half the window) gives 0.
///
/// # Panics
/// If a length does not match `pool`.
pub fn max_pool2d(pool: &Pool2d, x: &[f32], out: &mut [f32]) {
    pool.check(x, out);
    let windows = pool.windows();
    pool.planes(x, out, |plane, dst| {
        let mut scratch = vec![0.0f32; 3 * windows.width + 2 * windows.cols.len()];
        let scratch = scratch.as_mut_slice();
        // The widest vectors this CPU has (the same selects, so the same values).
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { max_plane_avx512(&windows, plane, dst, scratch) };
            }
            if is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                return unsafe { max_plane_avx2(&windows, plane, dst, scratch) };
            }
        }
        max_plane(&windows, plane, dst, scratch);
    });
}

/// `max_plane` compiled with the target feature `$feature` (safety: to be called on a CPU
/// that has it).
#[cfg(target_arch = "x86_64")]
macro_rules! max_plane_for {
    ($name:ident, $feature:literal) => {
        #[target_feature(enable = $feature)]
        unsafe fn $name(windows: &Windows, plane: &[f32], dst: &mut [f32], scratch: &mut [f32]) {
            max_plane(windows, plane, dst, scratch)
        }
    };
}

/// `$name`: `$body` (`relu_any_max` or `relu_pairs_max`) compiled for the widest vectors
/// this CPU has (the same selects, so the same results) and picked at run time.
macro_rules! relu_max_widest {
    ($name:ident, $body:ident $(, $extra:ident: $extra_type:ty)*) => {
        #[allow(clippy::too_many_arguments)]
        fn $name(
            windows: &Windows,
            plane: &[f32],
            factors: [f32; 2],
            values: &mut [f32],
            sources: &mut [u32],
            not_passed: u32,
            $($extra: $extra_type,)*
        ) {
            /// `$body` compiled with the target feature `$feature` (safety: to be called
            /// on a CPU that has it).
            #[cfg(target_arch = "x86_64")]
            macro_rules! isa_version {
                ($isa:ident, $feature:literal) => {
                    #[target_feature(enable = $feature)]
                    unsafe fn $isa(
                        windows: &Windows,
                        plane: &[f32],
                        factors: [f32; 2],
                        values: &mut [f32],
                        sources: &mut [u32],
                        not_passed: u32,
                        $($extra: $extra_type,)*
                    ) {
                        $body(windows, plane, factors, values, sources, not_passed $(, $extra)*)
                    }
                };
            }
            #[cfg(target_arch = "x86_64")]
            {
                isa_version!(avx512, "avx512f");
                isa_version!(avx2, "avx2");
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe {
                        avx512(windows, plane, factors, values, sources, not_passed $(, $extra)*)
                    };
                }
                if is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    return unsafe {
                        avx2(windows, plane, factors, values, sources, not_passed $(, $extra)*)
                    };
                }
            }
            $body(windows, plane, factors, values, sources, not_passed $(, $extra)*)
        }
    };
}

relu_max_widest!(
    relu_any_max_widest,
    relu_any_max,
    scratch: &mut Scratch,
    selects: &PortableSelects
);
relu_max_widest!(relu_pairs_max_widest, relu_pairs_max);

#[cfg(target_arch = "x86_64")]
max_plane_for!(max_plane_avx512, "avx512f");
#[cfg(target_arch = "x86_64")]
max_plane_for!(max_plane_avx2, "avx2");

/// One plane of [`max_pool2d`], separable: for each output row, the maximum of every
/// input column over the window's rows (whole rows at a time), then each window's
/// maximum over its columns. Only the values are wanted here, not where they are.
///
/// Column by column is not the rule's row-major order (see [`Windows`]): where two values
/// tie in value but not in bits (+0 and -0) or several NaNs meet, it can pick another of
/// them. Such a tie can only make a maximum of zero or NaN, so an output row that has one
/// and whose input rows hold a -0 or a NaN is done again in the rule's order
/// ([`max_plane_in_order`]); every other row (a ReLU's output among them) keeps the
/// column-first result, which is then the same bits.
///
/// Each pass writes a buffer it does not read: a select stored back where it was loaded
/// compiles to a masked store, and the next pass's loads of those values then wait for
/// it (store forwarding fails), which made the column maxima of ResNet-50's stem pooling
/// take most of its time. `scratch` holds three input rows and two output rows.
#[inline(always)]
fn max_plane(windows: &Windows, plane: &[f32], dst: &mut [f32], scratch: &mut [f32]) {
    let (w, ow) = (windows.width, windows.cols.len());
    let (mut column_max, rest) = scratch.split_at_mut(w);
    let (mut spare, rest) = rest.split_at_mut(w);
    let (row_max, rest) = rest.split_at_mut(ow);
    let (phases, window_spare) = rest.split_at_mut(w);
    let mut row_scratch = RowScratch {
        phases,
        spare: &mut window_spare[..ow],
    };
    // (Blocks folded without an early exit, so that the tests vectorize.)
    let any = |values: &[f32], test: fn(f32) -> bool| {
        values
            .chunks(256)
            .any(|block| block.iter().fold(false, |seen, &v| seen | test(v)))
    };
    for (rows, dst) in windows.rows.iter().zip(dst.chunks_exact_mut(ow.max(1))) {
        if rows.is_empty() {
            dst.fill(0.0);
            continue;
        }
        let row = |y: usize| &plane[y * w..][..w];
        if rows.len() == 1 {
            column_max.copy_from_slice(row(rows.start));
        } else {
            larger_of_rows(row(rows.start), row(rows.start + 1), column_max);
            for y in rows.start + 2..rows.end {
                larger_of_rows(column_max, row(y), spare);
                std::mem::swap(&mut column_max, &mut spare);
            }
        }
        row_windows_max(windows, column_max, dst, &mut row_scratch);
        let inputs = &plane[rows.start * w..rows.end * w];
        if any(dst, |v| (v == 0.0) | v.is_nan())
            && any(inputs, |v| {
                v.is_nan() | (v.to_bits() == (-0.0f32).to_bits())
            })
        {
            max_plane_in_order(windows, inputs, dst, row_max, &mut row_scratch);
        }
    }
}

/// One output row of [`max_plane`] in the rule's order, from its input `rows` (whole
/// rows, in order): each row's window maxima, then those of the rows in turn (a maximum
/// over consecutive runs of the row-major order, then over the runs' maxima in order, is
/// the first largest of all, and the last NaN). `row_max` holds an output row.
#[inline(always)]
fn max_plane_in_order(
    windows: &Windows,
    rows: &[f32],
    dst: &mut [f32],
    row_max: &mut [f32],
    scratch: &mut RowScratch<'_>,
) {
    let mut rows = rows.chunks_exact(windows.width);
    if let Some(first) = rows.next() {
        row_windows_max(windows, first, dst, scratch);
    }
    for row in rows {
        row_windows_max(windows, row, row_max, scratch);
        rows_max(dst, row_max);
    }
}

/// Scratch of [`row_windows_max`]: an input row's values (`phases`) and an output row's
/// (`spare`).
struct RowScratch<'a> {
    phases: &'a mut [f32],
    spare: &'a mut [f32],
}

/// `dst[ox]`: the first largest value (a NaN winning, the last) of `row` in the columns
/// of window `ox`, 0 where it has none.
#[inline(always)]
fn row_windows_max(windows: &Windows, row: &[f32], dst: &mut [f32], scratch: &mut RowScratch<'_>) {
    if windows.pairs {
        pairs_max(row, dst);
        return;
    }
    let inner = windows.stride_two_inner.clone();
    if !inner.is_empty() {
        stride_two_windows_max(windows, row, inner.clone(), dst, scratch);
    }
    for ox in (0..inner.start).chain(inner.end..dst.len()) {
        dst[ox] = match row[windows.cols[ox].clone()].split_first() {
            Some((&first, rest)) => rest.iter().fold(first, |best, &v| larger(best, v)),
            None => 0.0,
        };
    }
}

/// `dst[ox]` for the windows `inner` of stride 2 that lie wholly inside `row`, in vector
/// loops: the row split into its even and odd columns, then one pass per column of the
/// window, left to right (the same selects, in the same order, as the fold of
/// [`row_windows_max`]), each pass writing the buffer the previous one did not, so that
/// the last writes `dst`.
#[inline(always)]
fn stride_two_windows_max(
    windows: &Windows,
    row: &[f32],
    inner: Range<usize>,
    dst: &mut [f32],
    scratch: &mut RowScratch<'_>,
) {
    let [kernel, _, pad] = windows.across;
    let (even, odd) = scratch.phases[..row.len()].split_at_mut(row.len().div_ceil(2));
    for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2)) {
        *e = pair[0];
        *o = pair[1];
    }
    if row.len() % 2 == 1 {
        even[row.len() / 2] = row[row.len() - 1];
    }
    let (even, odd) = (&*even, &*odd);
    // Column 2 ox - pad + j of the row is column ox + shift of its phase (ox >= pad / 2
    // and the window inside the row keep every index in range).
    let column = |j: usize| -> &[f32] {
        let offset = j as isize - pad as isize;
        let phase = if offset.rem_euclid(2) == 0 { even } else { odd };
        let from = (inner.start as isize + offset.div_euclid(2)) as usize;
        &phase[from..from + inner.len()]
    };
    let (dst, spare) = (&mut dst[inner.clone()], &mut scratch.spare[..inner.len()]);
    if kernel == 1 {
        dst.copy_from_slice(column(0));
        return;
    }
    // Pass j writes dst where k - 1 - j is even, so the last pass writes dst.
    let target = |j: usize| (kernel - 1 - j).is_multiple_of(2);
    let first = if target(1) { &mut *dst } else { &mut *spare };
    larger_of_rows(column(0), column(1), first);
    for j in 2..kernel {
        if target(j) {
            larger_of_rows(spare, column(j), dst);
        } else {
            larger_of_rows(dst, column(j), spare);
        }
    }
}

/// The larger of two values, a NaN winning (a select, so the loops vectorize): the
/// maximum of max pooling.
#[inline(always)]
fn larger<T: Real>(best: T, v: T) -> T {
    // (`v != v`: NaN, for any `Real`.)
    #[allow(clippy::eq_op)]
    let wins = (v > best) | (v != v);
    if wins {
        v
    } else {
        best
    }
}

/// `out[i] = larger(a[i], b[i])`.
#[inline(always)]
fn larger_of_rows<T: Real>(a: &[T], b: &[T], out: &mut [T]) {
    for ((out, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *out = larger(a, b);
    }
}

/// `best[i] = larger(best[i], row[i])`: one more input row into a row of column maxima.
#[inline(always)]
fn rows_max<T: Real>(best: &mut [T], row: &[T]) {
    for (best, &v) in best.iter_mut().zip(row) {
        *best = larger(*best, v);
    }
}

/// `dst[i] = larger(row[2i], row[2i + 1])`: the windows of a 2 x 2 pooling of stride 2
/// along one input row (side-by-side pairs: a loop that vectorizes).
#[inline(always)]
fn pairs_max<T: Real>(row: &[T], dst: &mut [T]) {
    for (d, pair) in dst.iter_mut().zip(row.chunks_exact(2)) {
        *d = larger(pair[0], pair[1]);
    }
}

/// One output row of a 2 x 2 pooling of stride 2 from its two input rows, `top` and
/// `bottom` (their first `2 * dst.len()` values): the same selects as [`max_pool2d`], in
/// the widest vectors this CPU has.
pub(crate) fn pool_row_pair<T: Real>(top: &[T], bottom: &[T], dst: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { pool_row_pair_avx512(top, bottom, dst) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { pool_row_pair_avx2(top, bottom, dst) };
        }
    }
    pool_row_pair_portable(top, bottom, dst);
}

/// [`pool_row_pair`] for any CPU, inlined into the versions for wider vectors.
#[inline(always)]
fn pool_row_pair_portable<T: Real>(top: &[T], bottom: &[T], dst: &mut [T]) {
    // The top pair, then the bottom one: the rule's row-major order. (One pass that
    // writes `dst` only: see `max_plane` on storing back what was just loaded.)
    let len = 2 * dst.len();
    let pairs = top[..len]
        .chunks_exact(2)
        .zip(bottom[..len].chunks_exact(2));
    for (d, (top, bottom)) in dst.iter_mut().zip(pairs) {
        *d = larger(larger(top[0], top[1]), larger(bottom[0], bottom[1]));
    }
}

/// `pool_row_pair_portable` compiled with the target feature `$feature` (safety: to be
/// called on a CPU that has it).
#[cfg(target_arch = "x86_64")]
macro_rules! pool_row_pair_for {
    ($name:ident, $feature:literal) => {
        #[target_feature(enable = $feature)]
        unsafe fn $name<T: Real>(top: &[T], bottom: &[T], dst: &mut [T]) {
            pool_row_pair_portable(top, bottom, dst)
        }
    };
}

#[cfg(target_arch = "x86_64")]
pool_row_pair_for!(pool_row_pair_avx512, "avx512f");
#[cfg(target_arch = "x86_64")]
pool_row_pair_for!(pool_row_pair_avx2, "avx2");

/// Average pooling counting the padding, as PyTorch's default (`count_include_pad`):
/// the divisor is the window clipped to the padded input, not to the input.
///
/// # Panics
/// If a length does not match `pool`.
pub fn avg_pool2d(pool: &Pool2d, x: &[f32], out: &mut [f32]) {
    pool.check(x, out);
    let [oh, ow] = pool.output;
    let [h, w] = [pool.input[2], pool.input[3]];
    let padded_end = |axis: usize, start: isize| {
        let size = [h, w][axis] + pool.padding[axis];
        (start + pool.kernel[axis] as isize).min(size as isize)
    };
    pool.planes(x, out, |plane, dst| {
        for oy in 0..oh {
            let (sy, y0, y1) = pool.span(0, oy);
            for ox in 0..ow {
                let (sx, x0, x1) = pool.span(1, ox);
                let area = (padded_end(0, sy) - sy) * (padded_end(1, sx) - sx);
                let mut sum = 0.0f32;
                for y in y0..y1 {
                    for &v in &plane[y * w + x0..y * w + x1] {
                        sum += v;
                    }
                }
                dst[oy * ow + ox] = sum / area.max(1) as f32;
            }
        }
    });
}

/// Adaptive average pooling to `output` (PyTorch's windows: rows
/// `floor(i * h / oh) .. ceil((i + 1) * h / oh)`, columns alike).
///
/// # Panics
/// If a length does not match.
pub fn adaptive_avg_pool2d(input: [usize; 4], output: [usize; 2], x: &[f32], out: &mut [f32]) {
    let [_, _, h, w] = input;
    let [oh, ow] = output;
    let pool = Pool2d {
        input,
        output,
        kernel: [1, 1],
        stride: [1, 1],
        padding: [0, 0],
    };
    pool.check(x, out);
    let bounds =
        |i: usize, size: usize, out: usize| (i * size / out, ((i + 1) * size).div_ceil(out));
    pool.planes(x, out, |plane, dst| {
        for oy in 0..oh {
            let (y0, y1) = bounds(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1) = bounds(ox, w, ow);
                let mut sum = 0.0f32;
                for y in y0..y1 {
                    for &v in &plane[y * w + x0..y * w + x1] {
                        sum += v;
                    }
                }
                dst[oy * ow + ox] = sum / ((y1 - y0) * (x1 - x0)).max(1) as f32;
            }
        }
    });
}

/// [`max_pool2d`] on channels-last values: `x` `[batch, h, w, channels]` and `out`
/// `[batch, out_h, out_w, channels]`. Each window's values are taken in the same order
/// with the same selects, so each maximum is the same value.
///
/// # Panics
/// If a length does not match, or the window or the stride is 0.
pub fn max_pool2d_channels_last(pool: &Pool2d, x: &[f32], out: &mut [f32]) {
    pool.check(x, out);
    let [_, channels, h, w] = pool.input;
    let [oh, ow] = pool.output;
    if channels == 0 || oh * ow == 0 {
        return;
    }
    // One task per output row of an image.
    out.par_chunks_mut(ow * channels)
        .enumerate()
        .for_each(|(row, dst)| {
            let (image, oy) = (row / oh, row % oh);
            let (_, y0, y1) = pool.span(0, oy);
            let plane = &x[image * h * w * channels..][..h * w * channels];
            for (ox, dst) in dst.chunks_exact_mut(channels).enumerate() {
                let (_, x0, x1) = pool.span(1, ox);
                let mut first = true;
                for y in y0..y1 {
                    for px in x0..x1 {
                        let pixel = &plane[(y * w + px) * channels..][..channels];
                        if first {
                            dst.copy_from_slice(pixel);
                            first = false;
                        } else {
                            rows_max_dispatch(dst, pixel);
                        }
                    }
                }
                if first {
                    // A window with no input value.
                    dst.fill(0.0);
                }
            }
        });
}

/// [`rows_max`] on the widest vectors this CPU has (the same selects, so the same values).
fn rows_max_dispatch(best: &mut [f32], row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { rows_max_avx512(best, row) };
    }
    rows_max(best, row);
}

/// [`rows_max`] compiled for AVX-512F.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_max_avx512(best: &mut [f32], row: &[f32]) {
    rows_max(best, row);
}

/// [`adaptive_avg_pool2d`] to one value per channel, on channels-last values: `x`
/// `[batch, h, w, channels]`, `out` `[batch, channels]`. Each channel's values are
/// summed in the same order, so each mean is the same value.
///
/// # Panics
/// If a length does not match.
pub fn global_avg_pool_channels_last(input: [usize; 4], x: &[f32], out: &mut [f32]) {
    let [batch, channels, h, w] = input;
    assert_eq!(
        x.len(),
        input.iter().product::<usize>(),
        "pool input length"
    );
    assert_eq!(out.len(), batch * channels, "pool output length");
    if channels == 0 {
        return;
    }
    let count = (h * w).max(1) as f32;
    for (image, dst) in out.chunks_exact_mut(channels).enumerate() {
        dst.fill(0.0);
        for pixel in x[image * h * w * channels..][..h * w * channels].chunks_exact(channels) {
            for (sum, &v) in dst.iter_mut().zip(pixel) {
                *sum += v;
            }
        }
        for sum in dst.iter_mut() {
            *sum /= count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `max_pool2d` against `each_max` (the definition of the window maxima) on padded,
    /// strided, odd-sized and NaN-holding inputs, with ties of +0 and -0 (the first wins).
    #[test]
    fn max_pool_matches_the_window_maxima() {
        // Input, then kernel, stride and padding (height, width), and whether the output
        // rounds up (ceil mode: a last window may hang over the edge).
        let cases = [
            ([2, 3, 8, 8], [[2, 2], [2, 2], [0, 0]], false),
            ([1, 2, 9, 7], [[2, 2], [2, 2], [0, 0]], false),
            ([1, 4, 11, 12], [[3, 3], [2, 2], [1, 1]], false),
            ([2, 1, 5, 6], [[3, 2], [1, 2], [1, 0]], false),
            ([1, 2, 3, 3], [[2, 2], [3, 3], [1, 1]], false),
            // Windows of stride 2 along the row, inner ones in vector loops.
            ([1, 2, 13, 13], [[3, 3], [2, 2], [1, 1]], false),
            ([1, 2, 12, 14], [[3, 3], [2, 2], [0, 0]], true),
            ([1, 3, 9, 16], [[5, 5], [2, 2], [2, 2]], false),
            ([1, 2, 7, 11], [[2, 3], [2, 2], [0, 1]], true),
            ([1, 1, 4, 9], [[1, 4], [1, 2], [0, 1]], false),
            ([1, 1, 3, 2], [[3, 3], [2, 2], [1, 1]], false),
        ];
        for (input, [kernel, stride, padding], ceil) in cases {
            let output = [0, 1].map(|a| {
                let span: usize = input[2 + a] + 2 * padding[a] - kernel[a];
                let steps = if ceil {
                    span.div_ceil(stride[a])
                } else {
                    span / stride[a]
                };
                steps + 1
            });
            let pool = Pool2d {
                input,
                output,
                kernel,
                stride,
                padding,
            };
            let x = tricky(pool.input_len());
            let mut got = vec![0.0; pool.output_len()];
            max_pool2d(&pool, &x, &mut got);
            let windows = pool.windows();
            let (in_plane, out_plane) = (input[2] * input[3], output[0] * output[1]);
            for (plane, dst) in x.chunks(in_plane).zip(got.chunks(out_plane)) {
                windows.each_max(
                    plane,
                    |v| v,
                    |o, max| {
                        let want = max.map_or(0.0, |(_, v)| v);
                        assert!(
                            want.to_bits() == dst[o].to_bits()
                                || (want.is_nan() && dst[o].is_nan()),
                            "{input:?} {kernel:?}/{stride:?} pad {padding:?} at {o}: {} vs {want}",
                            dst[o]
                        );
                    },
                );
            }
        }
    }

    /// A tie of +0 and -0 across a window's rows: the first in row-major order wins
    /// (PyTorch's pick), in `max_pool2d` and in the convolution's pooled write alike.
    #[test]
    fn a_zero_tie_goes_to_the_first_in_row_major_order() {
        // Row 0: -1, +0; row 1: -0, -1. Row-major the +0 comes first.
        let pool = Pool2d {
            input: [1, 1, 2, 2],
            output: [1, 1],
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
        };
        let x = [-1.0f32, 0.0, -0.0, -1.0];
        let mut pooled = [f32::NAN];
        max_pool2d(&pool, &x, &mut pooled);
        let mut paired = [f32::NAN];
        pool_row_pair(&[-1.0f32, 0.0], &[-0.0f32, -1.0], &mut paired);
        // The same tie in a 3 x 3 window of stride 2 with padding (not side-by-side pairs):
        // rows 1 and 2 of a 3 x 5 input.
        let padded = Pool2d {
            input: [1, 1, 3, 5],
            output: [2, 3],
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
        };
        let mut y = vec![-1.0f32; 15];
        (y[5 + 3], y[10 + 1]) = (0.0, -0.0);
        let mut got = vec![f32::NAN; 6];
        max_pool2d(&padded, &y, &mut got);
        let want = |plane: &[f32], pool: &Pool2d| {
            let mut want = vec![f32::NAN; pool.output_len()];
            pool.windows()
                .each_max(plane, |v| v, |o, max| want[o] = max.map_or(0.0, |(_, v)| v));
            want
        };
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(pooled[0].to_bits(), 0.0f32.to_bits());
        assert_eq!(paired[0].to_bits(), 0.0f32.to_bits());
        assert_eq!(bits(&pooled), bits(&want(&x, &pool)));
        assert_eq!(bits(&got), bits(&want(&y, &padded)));
        assert_eq!(got[4].to_bits(), 0.0f32.to_bits(), "{got:?}");
    }

    /// The vector loop of the fused batch norm + ReLU + max pooling against the window
    /// maxima of `each_max` (the definition): every window shape, stride and padding,
    /// ceil-mode windows that overhang the input, ties (the first largest wins), NaN and
    /// infinities.
    #[test]
    fn relu_any_max_matches_the_window_maxima() {
        const NOT_PASSED: u32 = u32::MAX;
        for (input, [kernel, stride, padding], extra) in [
            ([9, 10], [[3, 3], [2, 2], [1, 1]], 0),
            ([16, 16], [[3, 3], [2, 2], [1, 1]], 0),
            ([8, 8], [[2, 2], [2, 2], [0, 0]], 0),
            ([7, 9], [[2, 2], [2, 2], [0, 0]], 1),
            ([7, 7], [[2, 2], [2, 2], [0, 0]], 0),
            ([7, 9], [[2, 3], [1, 2], [0, 1]], 1),
            ([11, 12], [[3, 3], [3, 3], [1, 1]], 1),
            ([5, 6], [[2, 2], [1, 3], [1, 1]], 0),
            ([4, 5], [[3, 1], [2, 1], [1, 0]], 1),
            ([3, 3], [[2, 2], [3, 3], [1, 1]], 0),
        ] {
            let output =
                [0, 1].map(|a| (input[a] + 2 * padding[a] - kernel[a]) / stride[a] + 1 + extra);
            let pool = Pool2d {
                input: [1, 1, input[0], input[1]],
                output,
                kernel,
                stride,
                padding,
            };
            let windows = pool.windows();
            for (seed, [scale, shift]) in [(0, [1.0, 0.0]), (1, [-0.5, 0.25]), (2, [2.0, -3.0])] {
                let plane: Vec<f32> = (0..input[0] * input[1])
                    .map(|i| match (i * 13 + seed * 7) % 31 {
                        3 => f32::NAN,
                        4 => f32::INFINITY,
                        5 => f32::NEG_INFINITY,
                        // Few distinct values, so that windows hold ties.
                        j => (j % 5) as f32 - 2.0,
                    })
                    .collect();
                let outputs = output[0] * output[1];
                let (mut values, mut sources) = (vec![7.0; outputs], vec![7u32; outputs]);
                windows.relu_any_max(
                    &plane,
                    [scale, shift],
                    &mut values,
                    &mut sources,
                    NOT_PASSED,
                );
                // The portable selects (what a CPU without AVX-512 runs): the same bits.
                let (mut portable, mut portable_sources) =
                    (vec![7.0; outputs], vec![7u32; outputs]);
                relu_any_max(
                    &windows,
                    &plane,
                    [scale, shift],
                    &mut portable,
                    &mut portable_sources,
                    NOT_PASSED,
                    &mut Scratch::default(),
                    &PortableSelects,
                );
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&portable), bits(&values), "{input:?}");
                assert_eq!(portable_sources, sources, "{input:?}");
                windows.each_max(
                    &plane,
                    |v| v * scale + shift,
                    |o, max| {
                        let (want_value, want_source) = match max {
                            Some((at, max)) if max > 0.0 || max.is_nan() => (max, at as u32),
                            _ => (0.0, NOT_PASSED),
                        };
                        let same = values[o] == want_value || (values[o].is_nan() && want_value.is_nan());
                        assert!(same, "{input:?} {kernel:?}/{stride:?} pad {padding:?} at {o}: {} vs {want_value}", values[o]);
                        assert_eq!(sources[o], want_source, "{input:?} {kernel:?}/{stride:?} at {o}");
                    },
                );
                // 2 x 2 windows of stride 2 have their own loop: the same bits.
                let (mut pairs, mut pair_sources) = (vec![7.0; outputs], vec![7u32; outputs]);
                let took = windows.relu_pairs_max(
                    &plane,
                    [scale, shift],
                    &mut pairs,
                    &mut pair_sources,
                    NOT_PASSED,
                );
                if took {
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&pairs), bits(&values), "{input:?}");
                    assert_eq!(pair_sources, sources, "{input:?}");
                }
                assert_eq!(
                    took,
                    kernel == [2, 2] && stride == [2, 2] && padding == [0, 0]
                );
            }
        }
    }

    use crate::nhwc::tests::channels_last;

    /// Values with NaNs and ties of +0 and -0 among them.
    fn tricky(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| match i % 29 {
                5 => f32::NAN,
                _ if i % 3 == 0 => [0.0f32, -0.0][(i / 3) % 2],
                j => ((i * 7919) % 101) as f32 / 10.0 - 5.0 + j as f32 * 0.001,
            })
            .collect()
    }

    #[test]
    fn channels_last_pools_give_the_same_values() {
        for (input, [kernel, stride, padding]) in [
            ([2, 5, 9, 9], [[3, 3], [2, 2], [1, 1]]),
            ([1, 17, 8, 7], [[2, 2], [2, 2], [0, 0]]),
            ([1, 3, 3, 3], [[2, 2], [3, 3], [1, 1]]),
        ] {
            let output =
                [0, 1].map(|a| (input[2 + a] + 2 * padding[a] - kernel[a]) / stride[a] + 1);
            let pool = Pool2d {
                input,
                output,
                kernel,
                stride,
                padding,
            };
            let x = tricky(pool.input_len());
            let mut want = vec![0.0; pool.output_len()];
            max_pool2d(&pool, &x, &mut want);
            let mut got = vec![1.0; pool.output_len()];
            max_pool2d_channels_last(&pool, &channels_last(&x, input), &mut got);
            let want = channels_last(&want, [input[0], input[1], output[0], output[1]]);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "max pool {input:?}");
            let x: Vec<f32> = (0..pool.input_len())
                .map(|i| ((i * 31) % 17) as f32 * 0.37)
                .collect();
            let mut want = vec![0.0; input[0] * input[1]];
            adaptive_avg_pool2d(input, [1, 1], &x, &mut want);
            let mut got = vec![1.0; want.len()];
            global_avg_pool_channels_last(input, &channels_last(&x, input), &mut got);
            assert_eq!(bits(&got), bits(&want), "global average {input:?}");
        }
    }
}
