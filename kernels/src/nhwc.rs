//! Convolution on channels-last activations (`[batch, height, width, channels]`) by the
//! indirect method: each output position's input pixels are rows of the image itself,
//! so the micro-kernel (sgemm's `IndirectKernel`) broadcasts them in place against the
//! weight, laid out once in panels. Nothing of the image is packed or copied (the
//! channels-first passes gather a column matrix per tile), and each tile of output
//! positions is written once, its epilogue applied from the registers. Layers of few
//! input channels gather each block's positions into rows instead.
//!
//! A versatile layer's rings are summed from the innermost out, each ring's taps
//! together, into the accumulators of crop 0 (the whole kernel); once a ring is done, the
//! running sums are the crop it completes, written (through its epilogue) to that crop's
//! channels while the tile is in L1. A dense convolution is one ring of every tap.

use rayon::prelude::*;

use crate::alloc::LineAligned;
use crate::epilogue::Epilogue;
use crate::plan::ConvPlan;
use crate::sgemm::{self, Indirect, Tile, TileFinish, KC};

/// Output positions a thread takes in one block: their rows of every tap stay in L2
/// while the weight's blocks pass through L1.
const POSITIONS_BLOCK: usize = 96;

/// Layers of fewer input channels gather each block's positions into rows of their
/// whole `k` (an image network's first layer: 3 channels a tap). At most the fewest
/// channels [`chunk_channels`] gives a call, so that a ring's weight block is one chunk,
/// tap by tap: the order of a gathered row.
const GATHER_BELOW: usize = 16;

/// Input channels per kernel call of a ring of `taps` taps: 128 for one tap; for more,
/// whole vectors' worth (16) of channels such that `taps x channels <= KC`; so that the
/// call's block of the weight (128 x 64 or 9 x 16 x 64 values: 32 or 36 KiB) stays in L1
/// beside the rows across the block's tiles. (One tap, 160 channels as sgemm's KC against
/// 128: ResNet-50 spatial 28.4/26.9/27.3 against 27.3/26.1/26.8 ms, dense 34.6/32.5/34.0
/// against 33.4/33.4/32.8, alternated; 128 also splits 256 to 2048 channels evenly.)
fn chunk_channels(taps: usize) -> usize {
    if taps <= 1 {
        ONE_TAP_CHANNELS
    } else {
        (KC / taps / 16 * 16).max(16)
    }
}

/// See [`chunk_channels`].
const ONE_TAP_CHANNELS: usize = 128;

/// Where `n` output channels split into panels of at most `nr` (the first of each, then
/// `n`): `nr` each, except that a last panel of 16 or fewer would run on a single vector,
/// at most a third of the multiply-adds per broadcast (and so bound by the loads); with
/// the one before it, it becomes panels of 32 and `nr - 32 + rest`.
fn panel_starts(n: usize, nr: usize) -> Vec<usize> {
    let mut starts: Vec<usize> = (0..n).step_by(nr.max(1)).collect();
    let rest = n % nr.max(1);
    if starts.len() >= 2 && (1..=16).contains(&rest) && nr > 32 {
        let last = starts.len() - 1;
        starts[last] = starts[last - 1] + 32;
    }
    starts.push(n);
    starts
}

/// `x` (`[n, c, h, w]`, channels-first) as `[n, h, w, c]` into `out` (resized to its
/// length), in parallel blocks of 16 positions: each block's values stay in L1 while
/// every channel adds its 16.
///
/// # Panics
/// If `x` does not hold `n * c * h * w` values.
pub fn to_channels_last(x: &[f32], [n, c, h, w]: [usize; 4], out: &mut Vec<f32>) {
    const BLOCK: usize = 16;
    assert_eq!(x.len(), n * c * h * w, "input length");
    out.resize(x.len(), 0.0);
    let plane = h * w;
    if c == 0 || plane == 0 {
        return;
    }
    out.par_chunks_mut(c * plane)
        .zip(x.par_chunks(c * plane))
        .for_each(|(dst, image)| {
            dst.par_chunks_mut(BLOCK * c)
                .enumerate()
                .for_each(|(block, dst)| {
                    let first = block * BLOCK;
                    for (ch, src) in image.chunks_exact(plane).enumerate() {
                        for (p, &v) in src[first..].iter().take(dst.len() / c).enumerate() {
                            dst[p * c + ch] = v;
                        }
                    }
                });
        });
}

/// Whether this CPU has the micro-kernels of channels-last convolutions (AVX-512, or AVX2
/// with FMA).
pub fn available() -> bool {
    !sgemm::indirect().is_empty()
}

/// One ring in the order the kernel sums them.
#[derive(Debug, Clone)]
struct Ring {
    /// The plan's index of the ring, which is also the crop its sum completes.
    crop: usize,
    /// Its first tap among all taps in summing order.
    first_tap: usize,
    /// Its taps, `ky * kw + kx`.
    taps: Vec<usize>,
    /// Where its block of `k` starts: `taps before it x in_channels`.
    first_k: usize,
}

/// A convolution's geometry on channels-last activations, with its weight laid out for
/// this CPU's indirect micro-kernel.
#[derive(Debug, Clone)]
pub struct NhwcConv {
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    /// Primary filters: the columns of the product (crop `r` of primary `p` is output
    /// channel `r * primaries + p`, where below `out_channels`).
    primaries: usize,
    input: [usize; 2],
    output: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    /// Padding before the first row and column.
    pad: [usize; 2],
    /// Innermost first.
    rings: Vec<Ring>,
    macs: u64,
    /// The first primary of each panel, and the end of the last ([`panel_starts`]).
    starts: Vec<usize>,
    /// One panel per range of `starts`, each `k x NR` values (`k = kh * kw *
    /// in_channels`: ring by ring, in each ring chunk by chunk of channels, in each chunk
    /// tap by tap), zero past the panel's primaries.
    panels: LineAligned,
    /// The micro-kernel, whose `nr` is the panels' width.
    micro: Indirect,
    /// The taps in summing order as runs along a kernel row: `(first tap in summing
    /// order, ky, kx, taps)`, consecutive taps of one run reading neighbouring pixels
    /// (contiguous values, channels-last), so that a gathered row copies a run at once.
    runs: Vec<(usize, usize, usize, usize)>,
    /// Whether each block gathers its positions' `k` values into rows of their own
    /// (few input channels: a call per tap would run a few steps each).
    gathers: bool,
    /// Whether, gathering, the summing order is the kernel's rows in order, each row's
    /// taps in order (a dense layer): then a position's kernel row is `kw x in_channels`
    /// contiguous values of the image itself, and only positions whose rows cross the
    /// left or right edge are gathered.
    kernel_rows: bool,
    /// Zeros for taps that read padding: a pixel's worth, or a gathered row's.
    zeros: Vec<f32>,
}

impl NhwcConv {
    /// Whether [`NhwcConv::new`] makes `plan`: this CPU has an indirect micro-kernel, and
    /// the plan has one channel window reading every input channel (no channel windows,
    /// no groups) and no dilation.
    pub fn supports(plan: &ConvPlan) -> bool {
        let whole_input = plan.windows.len() == 1
            && plan.n_c == 1
            && plan.window_depth == plan.in_channels
            && plan.weight_depth == plan.in_channels
            && plan.windows[0].in_offset == 0
            && plan.windows[0].weight_offset == 0
            && plan.windows[0].first_primary == 0
            && plan.windows[0].rows == plan.primaries;
        whole_input && plan.dilation == [1, 1] && available()
    }

    /// `plan` on channels-last activations with its weight (`[primaries, in_channels,
    /// kh, kw]`): `None` where this CPU has no indirect micro-kernel or the plan is not
    /// one this pass runs (several channel windows or groups, a dilated kernel).
    ///
    /// # Panics
    /// If `weight` does not hold the plan's weight.
    pub fn new(plan: &ConvPlan, weight: &[f32]) -> Option<Self> {
        assert_eq!(weight.len(), plan.weight_len(), "weight length");
        if !Self::supports(plan) {
            return None;
        }
        // The widest tile whose width divides the primaries (no ragged panel), else the
        // first.
        let kernels = sgemm::indirect();
        let micro = *kernels
            .iter()
            .filter(|k| plan.primaries.is_multiple_of(k.nr))
            .max_by_key(|k| k.nr)
            .or(kernels.first())?;
        Some(Self::with_kernel(plan, weight, micro))
    }

    /// [`NhwcConv::new`] on the micro-kernel `micro` (a plan [`NhwcConv::supports`]).
    fn with_kernel(plan: &ConvPlan, weight: &[f32], micro: Indirect) -> Self {
        let nr = micro.nr;
        let cin = plan.in_channels;
        let [kh, kw] = plan.kernel;
        let taps = kh * kw;
        let mut rings = Vec::with_capacity(plan.rings.len());
        let mut first_tap = 0;
        for (crop, ring) in plan.rings.iter().enumerate().rev() {
            rings.push(Ring {
                crop,
                first_tap,
                taps: ring.iter().map(|&(ky, kx)| ky * kw + kx).collect(),
                first_k: first_tap * cin,
            });
            first_tap += ring.len();
        }
        let k = taps * cin;
        let mut runs: Vec<(usize, usize, usize, usize)> = Vec::new();
        for (at, tap) in rings
            .iter()
            .flat_map(|r| r.taps.iter().copied())
            .enumerate()
        {
            let (ky, kx) = (tap / kw, tap % kw);
            match runs.last_mut() {
                Some((first, y, x, len)) if *y == ky && *x + *len == kx && *first + *len == at => {
                    *len += 1
                }
                _ => runs.push((at, ky, kx, 1)),
            }
        }
        let gathers = cin < GATHER_BELOW;
        let kernel_rows = gathers
            && runs.len() == kh
            && runs
                .iter()
                .enumerate()
                .all(|(ky, &run)| run == (ky * kw, ky, 0, kw));
        let starts = panel_starts(plan.primaries, nr);
        let mut panels = LineAligned::zeros((starts.len() - 1) * k * nr);
        for (primary, filter) in weight.chunks_exact(cin * taps).enumerate() {
            let j = starts.partition_point(|&start| start <= primary) - 1;
            let (panel, lane) = (
                &mut panels.as_mut_slice()[j * k * nr..][..k * nr],
                primary - starts[j],
            );
            for ring in &rings {
                let chunk = chunk_channels(ring.taps.len());
                for c0 in (0..cin).step_by(chunk) {
                    let kc = (cin - c0).min(chunk);
                    let block = ring.first_k + c0 * ring.taps.len();
                    for (t, &tap) in ring.taps.iter().enumerate() {
                        for c in 0..kc {
                            panel[(block + t * kc + c) * nr + lane] = filter[(c0 + c) * taps + tap];
                        }
                    }
                }
            }
        }
        Self {
            batch: plan.batch,
            in_channels: cin,
            out_channels: plan.out_channels,
            primaries: plan.primaries,
            input: plan.input,
            output: plan.output,
            kernel: plan.kernel,
            stride: plan.stride,
            pad: plan.pad,
            rings,
            runs,
            macs: plan.macs(),
            starts,
            panels,
            micro,
            gathers,
            kernel_rows,
            zeros: vec![0.0; if gathers { k } else { cin }],
        }
    }

    /// The output's shape, `[batch, out_channels, out_h, out_w]` (stored channels-last).
    pub fn output_shape(&self) -> [usize; 4] {
        [
            self.batch,
            self.out_channels,
            self.output[0],
            self.output[1],
        ]
    }

    /// Values of the input.
    pub fn input_len(&self) -> usize {
        self.batch * self.input[0] * self.input[1] * self.in_channels
    }

    /// Values of the output.
    pub fn output_len(&self) -> usize {
        self.batch * self.output[0] * self.output[1] * self.out_channels
    }

    /// Multiply-adds of one call.
    pub fn macs(&self) -> u64 {
        self.macs
    }

    /// Bytes of the weight's panels.
    pub fn weight_bytes(&self) -> usize {
        std::mem::size_of_val(self.panels.as_slice())
    }

    /// `out = epilogue(conv(x))`, `x` `[batch, h, w, in_channels]` and `out` (and the
    /// epilogue's residual) `[batch, out_h, out_w, out_channels]`, on the rayon pool's
    /// threads. Each value is its products summed tap by tap in blocks of at most `KC`
    /// channels, the blocks added in order: the bits do not depend on the thread count.
    ///
    /// # Panics
    /// If a length does not match, or the epilogue pools.
    pub fn forward(&self, x: &[f32], epilogue: &Epilogue<'_, f32>, out: &mut [f32]) {
        epilogue.check_channels_last(
            (x, self.input_len()),
            (out, self.output_len()),
            self.out_channels,
        );
        let positions = self.batch * self.output[0] * self.output[1];
        let panel_count = self.starts.len() - 1;
        let threads = crate::threads();
        let out_ptr = SendPtr(out.as_mut_ptr());
        // Many positions: each thread its positions, all panels (the weight read once per
        // block of positions). Few: each thread its panels, all positions (each thread
        // reads only its share of the weight).
        let by_positions = positions >= threads * 2 * POSITIONS_BLOCK || panel_count < threads;
        let parts = if self.macs < 1 << 18 { 1 } else { threads };
        let run = |part: usize| {
            let (positions, panels) = if by_positions {
                let tiles = positions.div_ceil(self.micro.mr);
                let begin = tiles * part / parts * self.micro.mr;
                let end = (tiles * (part + 1) / parts * self.micro.mr).min(positions);
                (begin..end, 0..panel_count)
            } else {
                (
                    0..positions,
                    panel_count * part / parts..panel_count * (part + 1) / parts,
                )
            };
            // SAFETY: the parts' (positions x panels) blocks of the output are disjoint,
            // and `out` is borrowed mutably for the whole call.
            unsafe { self.block(x, epilogue, out_ptr, positions, panels) };
        };
        if parts == 1 {
            run(0);
        } else {
            (0..parts).into_par_iter().for_each(run);
        }
    }

    /// `out = conv(x)` (no epilogue) on the calling thread alone: for a caller that
    /// splits its own work over the threads ([`crate::winograd`]).
    ///
    /// # Panics
    /// If a length does not match.
    pub(crate) fn forward_on_this_thread(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.input_len(), "input length");
        assert_eq!(out.len(), self.output_len(), "output length");
        let positions = self.batch * self.output[0] * self.output[1];
        let panels = self.starts.len() - 1;
        // SAFETY: every position of every panel belongs to this call, and `out` is
        // borrowed mutably for all of it.
        unsafe {
            self.block(
                x,
                &Epilogue::default(),
                SendPtr(out.as_mut_ptr()),
                0..positions,
                0..panels,
            )
        };
    }

    /// Output positions `positions` for the panels `panels`.
    ///
    /// # Safety
    /// `out` must hold the output, and no one else may access these positions' values
    /// of these panels' primaries (of any crop) meanwhile.
    unsafe fn block(
        &self,
        x: &[f32],
        epilogue: &Epilogue<'_, f32>,
        out: SendPtr,
        positions: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
    ) {
        let Indirect { kernel, mr, nr } = self.micro;
        let [kh, kw] = self.kernel;
        let taps = kh * kw;
        let cin = self.in_channels;
        let cout = self.out_channels;
        let k = taps * cin;
        let [oh, ow] = self.output;
        let [h, w] = self.input;
        let [sy, sx] = self.stride;
        let [py, px] = self.pad;
        // Per tile of the block, per tap in summing order, per row: where the tile's row
        // reads the tap's pixel (its channel 0), or the zeros where the tap reads padding
        // or the tile has fewer rows. Where the layer gathers, one pointer per row: its
        // gathered values; by kernel rows, one per kernel row: the row in the image, or
        // in the position's gathered values where it crosses an edge.
        let table_taps = match (self.gathers, self.kernel_rows) {
            (true, true) => kh,
            (true, false) => 1,
            (false, _) => taps,
        };
        let mut table = vec![self.zeros.as_ptr(); POSITIONS_BLOCK.div_ceil(mr) * table_taps * mr];
        // A 1 x 1 kernel of stride 1 without padding (the products of the Winograd passes):
        // each position's row is the input's row, one table entry per position, made
        // without the general path's per-position index arithmetic (a tenth of a Winograd
        // layer at 32 channels).
        let plain_rows =
            taps == 1 && self.stride == [1, 1] && self.pad == [0, 0] && self.input == self.output;
        // The block's gathered rows, addressed through one raw pointer: the table holds
        // pointers into earlier rows while later ones are written, and a `&mut` to the
        // whole buffer for each row would invalidate those pointers.
        let mut gathered_rows = vec![0.0f32; if self.gathers { POSITIONS_BLOCK * k } else { 0 }];
        let gathered = gathered_rows.as_mut_ptr();
        // Row i of the block's gathered rows, to write.
        let gathered_row = |i: usize| {
            assert!(i < POSITIONS_BLOCK && self.gathers);
            // SAFETY: i < POSITIONS_BLOCK, so the row's k values lie in the buffer; no
            // reference to them is live (the table's pointers are read only by the
            // kernel calls after the block's rows are all written).
            unsafe { std::slice::from_raw_parts_mut(gathered.add(i * k), k) }
        };
        let mut first = positions.start;
        while first < positions.end {
            // Blocks of at most POSITIONS_BLOCK, as even as whole tiles allow.
            let left = positions.end - first;
            let blocks = left.div_ceil(POSITIONS_BLOCK);
            let count = (left.div_ceil(blocks).div_ceil(mr) * mr).min(left);
            let tiles = count.div_ceil(mr);
            // (image, oy, ox) of the block's first position, then stepped along.
            let (mut image, mut oy, mut ox) = (first / (oh * ow), (first / ow) % oh, first % ow);
            if plain_rows {
                // Position i reads the input's row i (a 1 x 1 gathered row would be a copy
                // of it).
                for (i, row) in table[..tiles * mr].iter_mut().enumerate() {
                    *row = if i < count {
                        x[(first + i) * cin..][..cin].as_ptr()
                    } else {
                        self.zeros.as_ptr()
                    };
                }
            } else {
                // Row `row` of tile `tile` is position `i = tile * mr + row` of the block.
                let (mut tile, mut row) = (0, 0);
                for i in 0..tiles * mr {
                    if self.kernel_rows {
                        let ix = (ox * sx).wrapping_sub(px);
                        let inside_x = ix < w && ix + kw <= w;
                        if i < count && !inside_x {
                            self.gather(x, [image, oy, ox], gathered_row(i));
                        }
                        for ky in 0..kh {
                            let iy = (oy * sy + ky).wrapping_sub(py);
                            table[(tile * kh + ky) * mr + row] = if i >= count {
                                self.zeros.as_ptr()
                            } else if !inside_x {
                                // Its kernel row's kw * cin values, inside the row's k.
                                gathered.wrapping_add(i * k + ky * kw * cin).cast_const()
                            } else if iy < h {
                                // The kernel row's kw pixels of cin values.
                                x[((image * h + iy) * w + ix) * cin..][..kw * cin].as_ptr()
                            } else {
                                self.zeros.as_ptr()
                            };
                        }
                    } else if self.gathers {
                        table[tile * mr + row] = if i < count {
                            self.gather(x, [image, oy, ox], gathered_row(i));
                            gathered.wrapping_add(i * k).cast_const()
                        } else {
                            self.zeros.as_ptr()
                        };
                    } else {
                        for ring in &self.rings {
                            for (t, &tap) in ring.taps.iter().enumerate() {
                                let (ky, kx) = (tap / kw, tap % kw);
                                let iy = (oy * sy + ky).wrapping_sub(py);
                                let ix = (ox * sx + kx).wrapping_sub(px);
                                let inside = i < count && iy < h && ix < w;
                                table[(tile * taps + ring.first_tap + t) * mr + row] = if inside {
                                    // The pixel's cin values.
                                    x[((image * h + iy) * w + ix) * cin..][..cin].as_ptr()
                                } else {
                                    self.zeros.as_ptr()
                                };
                            }
                        }
                    }
                    ox += 1;
                    if ox == ow {
                        ox = 0;
                        oy += 1;
                        if oy == oh {
                            oy = 0;
                            image += 1;
                        }
                    }
                    row += 1;
                    if row == mr {
                        row = 0;
                        tile += 1;
                    }
                }
            }
            for panel in panels.clone() {
                let (p0, cols) = (
                    self.starts[panel],
                    self.starts[panel + 1] - self.starts[panel],
                );
                let weight = &self.panels.as_slice()[panel * k * nr..][..k * nr];
                let mut started = false;
                for (r, ring) in self.rings.iter().enumerate() {
                    let ring_taps = ring.taps.len();
                    let crop0 = r + 1 == self.rings.len();
                    // The ring's calls: chunks of channels, each over the ring's taps
                    // (`(kc, taps, first k of the block, where in each row)`); or, gathered,
                    // one call over the ring's whole block of each row.
                    let chunk = chunk_channels(ring_taps);
                    let calls: Vec<(usize, usize, usize, usize)> = if self.kernel_rows {
                        // One ring of every tap, kernel row by kernel row.
                        vec![(kw * cin, kh, 0, 0)]
                    } else if self.gathers {
                        vec![(ring_taps * cin, 1, ring.first_k, ring.first_k)]
                    } else {
                        (0..cin)
                            .step_by(chunk)
                            .map(|c0| {
                                let kc = (cin - c0).min(chunk);
                                (kc, ring_taps, ring.first_k + c0 * ring_taps, c0)
                            })
                            .collect()
                    };
                    for (call, &(kc, call_taps, at_k, in_row)) in calls.iter().enumerate() {
                        let b = weight[at_k * nr..][..call_taps * kc * nr].as_ptr();
                        // The weight's next block (this panel's next, or the next
                        // panel's first), a tile's steps' worth of lines per tile.
                        let next = b.wrapping_add(call_taps * kc * nr);
                        let ring_done = call + 1 == calls.len();
                        let first_row = if self.gathers { 0 } else { ring.first_tap };
                        for tile in 0..tiles {
                            let q = first + tile * mr;
                            let tile_rows = (first + count - q).min(mr);
                            // Crop 0's channels hold the running sums.
                            let at = q * cout + p0;
                            let dst = Tile {
                                // SAFETY: position q < positions, primary p0 < primaries
                                // <= cout: in the output.
                                ptr: unsafe { out.0.add(at) },
                                rs: cout,
                                rows: tile_rows,
                                cols,
                            };
                            let finish =
                                (crop0 && ring_done).then(|| tile_finish(epilogue, at, p0));
                            let rows = table[(tile * table_taps + first_row) * mr..]
                                [..call_taps * mr]
                                .as_ptr();
                            let ahead = next.wrapping_add(tile * call_taps * kc * 16);
                            // SAFETY: call_taps * MR rows, each valid from in_row for kc
                            // values (image pixels of cin values with in_row = c0, or
                            // gathered rows and zeros of k values, in_row + kc <= k; by
                            // kernel rows, in_row = 0 and kc = kw * cin: a row of kw
                            // pixels inside the image, a gathered row from its kernel
                            // row's start, or the zeros' k values); the
                            // weight block holds call_taps * kc * NR values; the tile is
                            // this block's, rows cout apart, cols <= NR columns; scale and
                            // shift hold cout values, the residual the output's.
                            unsafe {
                                kernel(
                                    kc,
                                    call_taps,
                                    (rows, in_row),
                                    (b, ahead),
                                    dst,
                                    started,
                                    finish,
                                )
                            };
                            if ring_done && !crop0 {
                                // SAFETY: the tile's sums are final for this crop, in
                                // the output; its channels of the crop belong to this
                                // block too.
                                unsafe {
                                    emit_crop(
                                        self,
                                        epilogue,
                                        out,
                                        (q, tile_rows),
                                        (p0, cols),
                                        ring.crop,
                                    )
                                };
                            }
                        }
                        started = true;
                    }
                }
            }
            first += count;
        }
    }
}

impl NhwcConv {
    /// The `k` values output position `(image, oy, ox)` reads, in summing order, into
    /// `dst` (zeros where a tap reads padding): run by run, a whole run at once where it
    /// lies inside the image.
    fn gather(&self, x: &[f32], [image, oy, ox]: [usize; 3], dst: &mut [f32]) {
        let cin = self.in_channels;
        let [h, w] = self.input;
        let iy0 = oy * self.stride[0];
        let ix0 = ox * self.stride[1];
        for &(at, ky, kx, len) in &self.runs {
            let dst = &mut dst[at * cin..][..len * cin];
            let iy = (iy0 + ky).wrapping_sub(self.pad[0]);
            let ix = (ix0 + kx).wrapping_sub(self.pad[1]);
            if iy < h && ix < w && ix + len <= w {
                let src = &x[((image * h + iy) * w + ix) * cin..][..len * cin];
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = v;
                }
                continue;
            }
            for (t, dst) in dst.chunks_exact_mut(cin).enumerate() {
                let ix = ix.wrapping_add(t);
                if iy < h && ix < w {
                    let src = &x[((image * h + iy) * w + ix) * cin..][..cin];
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = v;
                    }
                } else {
                    dst.fill(0.0);
                }
            }
        }
    }
}

/// The output write of crop 0's tile at output index `at` (primary `p0`, which is also
/// its channel).
fn tile_finish(epilogue: &Epilogue<'_, f32>, at: usize, p0: usize) -> TileFinish {
    TileFinish {
        scale: epilogue
            .scale
            .map_or(std::ptr::null(), |s| s[p0..].as_ptr()),
        shift: epilogue
            .shift
            .map_or(std::ptr::null(), |s| s[p0..].as_ptr()),
        residual: epilogue
            .residual
            .map_or(std::ptr::null(), |r| r[at..].as_ptr()),
        relu: epilogue.relu,
    }
}

/// Writes crop `crop` of the tile of positions `q..q + rows` and primaries `p0..p0 +
/// cols` from the running sums in crop 0's channels: channel `crop * primaries + p` for
/// those below `out_channels`, through the epilogue.
///
/// # Safety
/// `out` must hold the output, the tile's sums must be final for this crop, and no one
/// else may access these values meanwhile.
unsafe fn emit_crop(
    conv: &NhwcConv,
    epilogue: &Epilogue<'_, f32>,
    out: SendPtr,
    (q, rows): (usize, usize),
    (p0, cols): (usize, usize),
    crop: usize,
) {
    let cout = conv.out_channels;
    let channel = crop * conv.primaries + p0;
    let len = cols.min(cout.saturating_sub(channel));
    for position in q..q + rows {
        let row = position * cout;
        // SAFETY: the caller's promise; crop 0's primaries and crop `crop`'s channels of
        // one position are disjoint (crop >= 1, channel >= primaries > p0 + cols - 1).
        unsafe {
            let sums = std::slice::from_raw_parts(out.0.add(row + p0), len);
            let dst = std::slice::from_raw_parts_mut(out.0.add(row + channel), len);
            for (i, (d, &sum)) in dst.iter_mut().zip(sums).enumerate() {
                let (scale, shift) = epilogue.channel(channel + i);
                *d = epilogue.apply(sum, (scale, shift), row + channel + i);
            }
        }
    }
}

/// The output's pointer, shared by the threads that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: the tasks write disjoint blocks of the output (`NhwcConv::forward`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::plan::{PlanSpec, Window};
    use crate::{forward_packed, PackedWeight};

    pub(crate) fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919) % 251) as f32 / 251.0 - 0.5)
            .collect()
    }

    /// `[n, c, h, w]` values as `[n, h, w, c]`.
    pub(crate) fn channels_last(x: &[f32], shape: [usize; 4]) -> Vec<f32> {
        let mut out = Vec::new();
        to_channels_last(x, shape, &mut out);
        out
    }

    /// The rings of a `d x d` kernel, outermost first, each's positions row by row.
    pub(crate) fn square_rings(d: usize) -> Vec<Vec<(usize, usize)>> {
        let mut rings = vec![Vec::new(); d.div_ceil(2)];
        for ky in 0..d {
            for kx in 0..d {
                rings[ky.min(kx).min(d - 1 - ky).min(d - 1 - kx)].push((ky, kx));
            }
        }
        rings
    }

    /// A spatial versatile plan: `kernel x kernel` in one ring per crop, outermost first.
    pub(crate) fn versatile(
        input: [usize; 4],
        out_channels: usize,
        kernel: usize,
        stride: usize,
    ) -> ConvPlan {
        let rings = square_rings(kernel);
        let primaries = out_channels.div_ceil(rings.len());
        ConvPlan::new(PlanSpec {
            input,
            kernel: [kernel; 2],
            stride: [stride; 2],
            dilation: [1, 1],
            padding: [(kernel / 2, kernel / 2); 2],
            out_channels,
            primaries,
            n_c: 1,
            window_depth: input[1],
            weight_depth: input[1],
            rings,
            windows: vec![Window::whole(primaries)],
        })
        .expect("a valid plan")
    }

    /// The plan on channels-last activations against the channels-first pass, with and
    /// without a full epilogue, on every indirect micro-kernel this CPU runs (the one
    /// `new` picks among them, and the AVX2 one too on an AVX-512 CPU).
    fn check(plan: &ConvPlan) {
        let weight = values(plan.weight_len(), 1);
        if !available() {
            return; // no indirect micro-kernel on this CPU
        }
        assert!(
            NhwcConv::new(plan, &weight).is_some(),
            "a plan of one window"
        );
        let mut kernels: Vec<Indirect> = sgemm::indirect().to_vec();
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // Unless they are this CPU's own already.
            let avx2 = sgemm::avx2_indirect();
            if !kernels
                .iter()
                .any(|k| (k.mr, k.nr) == (avx2[0].mr, avx2[0].nr))
            {
                kernels.extend(avx2);
            }
        }
        for kernel in kernels {
            check_conv(plan, &weight, &NhwcConv::with_kernel(plan, &weight, kernel));
        }
    }

    fn check_conv(plan: &ConvPlan, weight: &[f32], conv: &NhwcConv) {
        let input = plan.input_shape();
        let output = plan.output_shape();
        let x = values(plan.input_len(), 2);
        let n = plan.out_channels();
        let (scale, shift) = (values(n, 3), values(n, 4));
        let residual = values(plan.output_len(), 5);
        let residual_last = channels_last(&residual, output);
        let packed = PackedWeight::new(plan, weight);
        for full in [false, true] {
            let epilogue = |residual| Epilogue {
                scale: full.then_some(&scale[..]),
                shift: full.then_some(&shift[..]),
                residual: full.then_some(residual),
                relu: full,
                pool: false,
            };
            let mut want = vec![0.0; plan.output_len()];
            forward_packed(plan, &x, &packed, &epilogue(&residual[..]), &mut want);
            let want = channels_last(&want, output);
            let mut got = vec![f32::NAN; conv.output_len()];
            conv.forward(
                &channels_last(&x, input),
                &epilogue(&residual_last[..]),
                &mut got,
            );
            for (i, (&got, &want)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{input:?} -> {output:?} {:?}/{:?}, {} x {} kernel, at {i}: {got} against {want}",
                    plan.kernel(),
                    plan.stride(),
                    conv.micro.mr,
                    conv.micro.nr,
                );
            }
        }
    }

    #[test]
    fn dense_matches_the_channels_first_pass() {
        // (batch, cin, cout, side, kernel, stride): 1 x 1 and 3 x 3, strided, ragged
        // last panels and tiles, more than KC channels, odd sizes.
        for (batch, cin, cout, side, k, s) in [
            (1, 16, 48, 7, 1, 1),
            (2, 8, 20, 9, 3, 1),
            (1, 200, 64, 5, 3, 2),
            (3, 5, 100, 11, 1, 2),
            (1, 32, 17, 6, 5, 1),
            (2, 64, 96, 28, 3, 1),
            // Few channels, by kernel rows: pixels in place, gathered at the edges.
            (1, 3, 64, 30, 7, 2),
            (2, 4, 40, 12, 5, 1),
        ] {
            let p = k / 2;
            let plan = ConvPlan::dense(
                [batch, cin, side, side],
                cout,
                [k, k],
                [s, s],
                [1, 1],
                1,
                [(p, p); 2],
            )
            .expect("a valid plan");
            check(&plan);
        }
    }

    #[test]
    fn versatile_rings_match_the_channels_first_pass() {
        // Two crops of a 3 x 3 (an odd channel count leaves crop 1's last primary out),
        // three of a 5 x 5, four of a 7 x 7, strided, batch 2.
        for (batch, cin, cout, side, k, s) in [
            (1, 16, 64, 9, 3, 1),
            (2, 24, 63, 8, 3, 2),
            (1, 40, 96, 7, 5, 1),
            (1, 170, 128, 6, 3, 1),
            // Few channels: gathered rows (an image network's first layer).
            (2, 3, 64, 23, 7, 2),
        ] {
            check(&versatile([batch, cin, side, side], cout, k, s));
        }
    }

    #[test]
    fn declines_channel_windows_and_groups() {
        let grouped = ConvPlan::dense([1, 8, 5, 5], 8, [3, 3], [1, 1], [1, 1], 2, [(1, 1); 2])
            .expect("a valid plan");
        assert!(NhwcConv::new(&grouped, &values(grouped.weight_len(), 0)).is_none());
        let dense = ConvPlan::dense([1, 8, 5, 5], 8, [3, 3], [1, 1], [1, 1], 1, [(1, 1); 2])
            .expect("a valid plan");
        let made = NhwcConv::new(&dense, &values(dense.weight_len(), 0));
        assert_eq!(made.is_some(), available());
    }
}
