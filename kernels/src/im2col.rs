//! Tiles of output columns, and the im2col / col2im transforms between an NCHW input and
//! the ring-ordered column matrix of one tile.
//!
//! Column matrix layout (one tile of `cols` output pixels): the rows of ring `r` form a
//! segment starting at row `c * (positions of rings 0..r)`; inside a segment, row
//! `ch * npos_r + pos` holds input channel `ch` at the ring's `pos`-th kernel position.
//! A channel window is therefore a contiguous row range of every segment.

use super::gather::Offsets;
use super::plan::ConvPlan;
use super::Real;

/// Tiles whose runs average fewer columns than this go through an offset table (see
/// [`gather`](super::gather)) where the CPU gathers fast.
const SHORT_RUNS: usize = 16;

/// Tiles whose runs average fewer columns than this go through an offset table where the
/// input has at least [`TABLE_CHANNELS`] channels: the table's masked loads beat
/// copying run by run, and its cost is shared by the channels.
const MEDIUM_RUNS: usize = 33;

/// See [`MEDIUM_RUNS`].
const TABLE_CHANNELS: usize = 8;

/// A run of consecutive output pixels on one output row of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Image.
    pub image: usize,
    /// Output row.
    pub oy: usize,
    /// First output column.
    pub ox: usize,
    /// Pixels in the run.
    pub len: usize,
    /// Column of the run's first pixel inside the tile.
    pub col: usize,
}

/// Splits the output columns `[start, end)` (flattened `(image, oy, ox)`) into runs.
pub fn runs(plan: &ConvPlan, start: usize, end: usize, out: &mut Vec<Run>) {
    out.clear();
    let [_, ow] = plan.output;
    let pixels = plan.out_pixels();
    let mut t = start;
    while t < end {
        let image = t / pixels;
        let q = t % pixels;
        let (oy, ox) = (q / ow, q % ow);
        let len = (ow - ox).min(end - t);
        out.push(Run {
            image,
            oy,
            ox,
            len,
            col: t - start,
        });
        t += len;
    }
}

/// Row offset of each ring's segment in the column matrix (one entry per ring).
pub fn segment_rows(plan: &ConvPlan) -> Vec<usize> {
    let mut offset = 0;
    plan.rings
        .iter()
        .map(|ring| {
            let here = offset;
            offset += plan.in_channels * ring.len();
            here
        })
        .collect()
}

/// The output columns `[lo, hi)` of a run whose input column `ox * stride + shift - pad`
/// falls inside `[0, width)`, relative to the run's start.
#[inline]
fn valid_span(run: &Run, stride: usize, offset: isize, width: usize) -> (usize, usize) {
    // Input column of output column ox: ox * stride + offset.
    let first = run.ox as isize;
    let lo_ox = if offset >= 0 {
        first
    } else {
        first.max((-offset + stride as isize - 1) / stride as isize)
    };
    let last_valid = width as isize - 1 - offset; // ox * stride <= last_valid
    let hi_ox = if last_valid < 0 {
        first
    } else {
        (first + run.len as isize).min(last_valid / stride as isize + 1)
    };
    let lo = (lo_ox - first).clamp(0, run.len as isize) as usize;
    let hi = (hi_ox - first).clamp(lo as isize, run.len as isize) as usize;
    (lo, hi)
}

/// Where each run of a tile reads the input, per kernel row and per kernel column:
/// worked out once per tile rather than once per input channel and kernel position
/// (on small maps the runs are a few pixels long, and this arithmetic, divisions
/// included, cost more than the copies).
struct RunTable {
    runs: usize,
    /// `rows[ky * runs + r]`: run `r`'s input row at kernel row `ky`, if inside the input.
    rows: Vec<Option<usize>>,
    /// `spans[kx * runs + r]`: the run's valid columns `[lo, hi)` (see [`valid_span`]) at
    /// kernel column `kx`, and the input column of `lo`.
    spans: Vec<(usize, usize, usize)>,
    /// `reads[ring][pos]`: whether some run reads the input at that kernel position (on
    /// maps smaller than the kernel, most positions fall in the padding for every run).
    reads: Vec<Vec<bool>>,
}

impl RunTable {
    fn new(plan: &ConvPlan, runs: &[Run]) -> Self {
        let [h, w] = plan.input;
        let [kh, kw] = plan.kernel;
        let [sh, sw] = plan.stride;
        let [dh, dw] = plan.dilation;
        let [pt, pl] = plan.pad;
        let rows = (0..kh)
            .flat_map(|ky| {
                runs.iter().map(move |run| {
                    let iy = (run.oy * sh + ky * dh) as isize - pt as isize;
                    (0..h as isize).contains(&iy).then_some(iy as usize)
                })
            })
            .collect();
        let spans = (0..kw)
            .flat_map(|kx| {
                let offset = (kx * dw) as isize - pl as isize;
                runs.iter().map(move |run| {
                    let (lo, hi) = valid_span(run, sw, offset, w);
                    let ix0 = if hi > lo {
                        (((run.ox + lo) * sw) as isize + offset) as usize
                    } else {
                        0
                    };
                    (lo, hi, ix0)
                })
            })
            .collect();
        let mut table = RunTable {
            runs: runs.len(),
            rows,
            spans,
            reads: Vec::new(),
        };
        table.reads = plan
            .rings
            .iter()
            .map(|ring| {
                ring.iter()
                    .map(|&(ky, kx)| table.reads_at(ky, kx))
                    .collect()
            })
            .collect();
        table
    }

    /// Whether some run reads the input at kernel position `(ky, kx)`.
    fn reads_at(&self, ky: usize, kx: usize) -> bool {
        let rows = &self.rows[ky * self.runs..][..self.runs];
        let spans = &self.spans[kx * self.runs..][..self.runs];
        rows.iter().any(Option::is_some) && spans.iter().any(|&(lo, hi, _)| hi > lo)
    }

    /// Whether a tile of these runs goes through an offset table: short runs, or runs of
    /// medium length over enough channels, on a CPU that gathers `T` fast.
    fn gathers<T: Real>(plan: &ConvPlan, runs: &[Run]) -> bool {
        let columns: usize = runs.iter().map(|run| run.len).sum();
        let limit = if plan.in_channels >= TABLE_CHANNELS {
            MEDIUM_RUNS
        } else {
            SHORT_RUNS
        };
        !runs.is_empty() && columns < limit * runs.len() && T::gathers_fast()
    }

    /// The offset of each column's input value at each kernel position (rings in order),
    /// relative to channel 0 of image `first_image`; `None` where the offsets would not
    /// fit the gathers' 31 bits.
    fn offsets(&self, plan: &ConvPlan, runs: &[Run], first_image: usize) -> Option<Offsets> {
        let columns: usize = runs.iter().map(|run| run.len).sum();
        let [h, w] = plan.input;
        let image_len = plan.in_channels * h * w;
        let sw = plan.stride[1];
        let positions = plan.rings.iter().flatten();
        let mut offsets = Offsets::new(positions.clone().count(), columns, plan.input_len())?;
        for (p, &(ky, kx)) in positions.enumerate() {
            for (run, (iy, (lo, hi, ix0))) in runs.iter().zip(self.at(ky, kx)) {
                let Some(iy) = iy else { continue };
                let row = (run.image - first_image) * image_len + iy * w + ix0;
                offsets.set_run(p, run.col + lo, row, hi.saturating_sub(lo), sw);
            }
        }
        Some(offsets)
    }

    /// Each run's input row (if any) and valid span at kernel position `(ky, kx)`.
    fn at(
        &self,
        ky: usize,
        kx: usize,
    ) -> impl Iterator<Item = (Option<usize>, (usize, usize, usize))> + '_ {
        let rows = &self.rows[ky * self.runs..][..self.runs];
        let spans = &self.spans[kx * self.runs..][..self.runs];
        rows.iter().copied().zip(spans.iter().copied())
    }
}

/// Fills the column matrix `cols` (`plan.col_rows()` rows of `width` values) of one tile
/// from the input `x` `[batch, c, h, w]`.
pub fn im2col<T: Real>(plan: &ConvPlan, x: &[T], runs: &[Run], width: usize, cols: &mut [T]) {
    let [h, w] = plan.input;
    let c = plan.in_channels;
    let sw = plan.stride[1];
    let table = RunTable::new(plan, runs);
    let offsets = RunTable::gathers::<T>(plan, runs)
        .then(|| table.offsets(plan, runs, 0))
        .flatten();
    if let Some(offsets) = offsets {
        im2col_by_offsets(plan, x, &table, &offsets, width, cols);
        return;
    }
    let mut row = 0;
    for (ring, reads) in plan.rings.iter().zip(&table.reads) {
        for ch in 0..c {
            for (&(ky, kx), &read) in ring.iter().zip(reads) {
                let dst = &mut cols[row * width..(row + 1) * width];
                row += 1;
                if !read {
                    dst.fill(T::ZERO);
                    continue;
                }
                for (run, (iy, (lo, hi, ix0))) in runs.iter().zip(table.at(ky, kx)) {
                    let out = &mut dst[run.col..run.col + run.len];
                    let Some(iy) = iy else {
                        out.fill(T::ZERO);
                        continue;
                    };
                    let src_row = ((run.image * c + ch) * h + iy) * w;
                    let src = &x[src_row..src_row + w];
                    out[..lo].fill(T::ZERO);
                    out[hi..].fill(T::ZERO);
                    if hi > lo {
                        if sw == 1 {
                            out[lo..hi].copy_from_slice(&src[ix0..ix0 + (hi - lo)]);
                        } else {
                            T::copy_strided(&src[ix0..], sw, &mut out[lo..hi]);
                        }
                    }
                }
            }
        }
    }
}

/// Adds the column matrix `cols` of one tile back into the input gradient `dx`
/// `[images, c, h, w]` (images counted from `first_image`).
pub fn col2im<T: Real>(
    plan: &ConvPlan,
    cols: &[T],
    runs: &[Run],
    width: usize,
    first_image: usize,
    dx: &mut [T],
) {
    let [h, w] = plan.input;
    let c = plan.in_channels;
    let sw = plan.stride[1];
    let table = RunTable::new(plan, runs);
    let offsets = RunTable::gathers::<T>(plan, runs)
        .then(|| table.offsets(plan, runs, first_image))
        .flatten();
    if let Some(offsets) = offsets {
        col2im_by_offsets(plan, cols, &table, &offsets, width, dx);
        return;
    }
    let mut row = 0;
    for (ring, reads) in plan.rings.iter().zip(&table.reads) {
        for ch in 0..c {
            for (&(ky, kx), &read) in ring.iter().zip(reads) {
                let src = &cols[row * width..(row + 1) * width];
                row += 1;
                if !read {
                    continue;
                }
                for (run, (iy, (lo, hi, ix0))) in runs.iter().zip(table.at(ky, kx)) {
                    let Some(iy) = iy else { continue };
                    if hi <= lo {
                        continue;
                    }
                    let dst_row = (((run.image - first_image) * c + ch) * h + iy) * w;
                    let values = &src[run.col + lo..run.col + hi];
                    if sw == 1 {
                        let dst = &mut dx[dst_row + ix0..dst_row + ix0 + (hi - lo)];
                        for (d, &v) in dst.iter_mut().zip(values) {
                            *d += v;
                        }
                    } else {
                        let dst = &mut dx[dst_row..dst_row + w];
                        for (k, &v) in values.iter().enumerate() {
                            dst[ix0 + k * sw] += v;
                        }
                    }
                }
            }
        }
    }
}

/// The rows of a tile's column matrix in order, each as the offset of its channel's plane
/// in an image, its kernel position's row in the tile's [`Offsets`], and whether some
/// column reads the input there.
fn table_rows<'a>(
    plan: &'a ConvPlan,
    table: &'a RunTable,
) -> impl Iterator<Item = (usize, usize, bool)> + 'a {
    let plane = plan.input[0] * plan.input[1];
    let first_positions = plan.rings.iter().scan(0, |next, ring| {
        let first = *next;
        *next += ring.len();
        Some(first)
    });
    table
        .reads
        .iter()
        .zip(first_positions)
        .flat_map(move |(reads, first)| {
            (0..plan.in_channels).flat_map(move |ch| {
                let rows = reads.iter().enumerate();
                rows.map(move |(p, &read)| (ch * plane, first + p, read))
            })
        })
}

/// [`im2col`] through an offset table of the tile: one gather per row.
fn im2col_by_offsets<T: Real>(
    plan: &ConvPlan,
    x: &[T],
    table: &RunTable,
    offsets: &Offsets,
    width: usize,
    cols: &mut [T],
) {
    for (row, (base, position, read)) in table_rows(plan, table).enumerate() {
        let dst = &mut cols[row * width..(row + 1) * width];
        if read {
            T::gather_row(x, base, offsets.row(position), dst);
        } else {
            dst.fill(T::ZERO);
        }
    }
}

/// [`col2im`] through an offset table of the tile: one gather, add and scatter per row,
/// the rows in the same order as the run-by-run loop (so the same sums).
fn col2im_by_offsets<T: Real>(
    plan: &ConvPlan,
    cols: &[T],
    table: &RunTable,
    offsets: &Offsets,
    width: usize,
    dx: &mut [T],
) {
    for (row, (base, position, read)) in table_rows(plan, table).enumerate() {
        if read {
            let src = &cols[row * width..(row + 1) * width];
            T::scatter_add_row(src, dx, base, offsets.row(position));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(output: [usize; 2], batch: usize) -> ConvPlan {
        // A 1x1 kernel without padding: the output is the input's size.
        ConvPlan::dense(
            [batch, 1, output[0], output[1]],
            1,
            [1, 1],
            [1, 1],
            [1, 1],
            1,
            [(0, 0), (0, 0)],
        )
        .unwrap()
    }

    #[test]
    fn runs_split_at_row_and_image_borders() {
        let plan = plan([2, 3], 2);
        let mut out = Vec::new();
        runs(&plan, 2, 9, &mut out);
        let got: Vec<_> = out
            .iter()
            .map(|r| (r.image, r.oy, r.ox, r.len, r.col))
            .collect();
        assert_eq!(got, vec![(0, 0, 2, 1, 0), (0, 1, 0, 3, 1), (1, 0, 0, 3, 4)]);
    }

    #[test]
    fn valid_span_matches_brute_force() {
        for stride in 1..4 {
            for offset in -5isize..5 {
                for width in 1..7 {
                    for ox in 0..4 {
                        for len in 1..6 {
                            let run = Run {
                                image: 0,
                                oy: 0,
                                ox,
                                len,
                                col: 0,
                            };
                            let valid: Vec<usize> = (0..len)
                                .filter(|i| {
                                    let ix = ((ox + i) * stride) as isize + offset;
                                    ix >= 0 && ix < width as isize
                                })
                                .collect();
                            let (lo, hi) = valid_span(&run, stride, offset, width);
                            assert_eq!((lo..hi).collect::<Vec<_>>(), valid);
                        }
                    }
                }
            }
        }
    }

    /// The offset-table path against the run-by-run loops (in f64, whose rows never go
    /// through a table), on dense and ringed kernels, strides 1 and 2, and tiles that
    /// start and end inside images. The f32 rows run on vector gathers where the CPU has
    /// AVX-512; the values are small integers, so both types hold them exactly.
    #[test]
    fn offset_tables_give_the_run_loops_values() {
        for (kernel, stride, pad, ringed) in [
            (3, 1, 1, false),
            (3, 2, 1, false),
            (5, 1, 2, true),
            (5, 2, 1, true),
            (1, 2, 0, false),
        ] {
            let input = [3, 2, 5, 4];
            let mut plan = ConvPlan::dense(
                input,
                4,
                [kernel, kernel],
                [stride, stride],
                [1, 1],
                1,
                [(pad, pad), (pad, pad)],
            )
            .unwrap();
            if ringed {
                // Rings by distance from the centre, as a versatile layer orders them.
                let centre = kernel / 2;
                plan.rings = (0..=centre)
                    .map(|r| {
                        let positions =
                            (0..kernel).flat_map(|ky| (0..kernel).map(move |kx| (ky, kx)));
                        positions
                            .filter(|&(ky, kx)| ky.abs_diff(centre).max(kx.abs_diff(centre)) == r)
                            .collect()
                    })
                    .collect();
            }
            let x64: Vec<f64> = (0..plan.input_len())
                .map(|v| (v % 23) as f64 - 11.0)
                .collect();
            let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
            let total = plan.columns();
            for (start, end) in [(0, total), (3, total - 2), (total / 2, total)] {
                let mut tile = Vec::new();
                runs(&plan, start, end, &mut tile);
                let width = end - start + 3;
                let rows = plan.col_rows();
                let mut want = vec![f64::NAN; rows * width];
                im2col(&plan, &x64, &tile, width, &mut want);
                let table = RunTable::new(&plan, &tile);
                let offsets = table.offsets(&plan, &tile, 0).unwrap();
                let mut got64 = vec![f64::NAN; rows * width];
                im2col_by_offsets(&plan, &x64, &table, &offsets, width, &mut got64);
                let mut got32 = vec![f32::NAN; rows * width];
                im2col_by_offsets(&plan, &x32, &table, &offsets, width, &mut got32);
                for (i, &w) in want.iter().enumerate() {
                    let same = |v: f64| v == w || (v.is_nan() && w.is_nan());
                    assert!(same(got64[i]) && same(got32[i] as f64), "im2col value {i}");
                }

                // col2im of the same tile into the gradient of its images only.
                let first = tile[0].image;
                let images = tile.last().unwrap().image + 1 - first;
                let len = images * plan.input_len() / input[0];
                let cols64: Vec<f64> = (0..rows * width).map(|v| (v % 7) as f64).collect();
                let cols32: Vec<f32> = cols64.iter().map(|&v| v as f32).collect();
                let mut want = vec![0.5f64; len];
                col2im(&plan, &cols64, &tile, width, first, &mut want);
                let offsets = table.offsets(&plan, &tile, first).unwrap();
                let mut got64 = vec![0.5f64; len];
                col2im_by_offsets(&plan, &cols64, &table, &offsets, width, &mut got64);
                let mut got32 = vec![0.5f32; len];
                col2im_by_offsets(&plan, &cols32, &table, &offsets, width, &mut got32);
                assert_eq!(got64, want);
                assert_eq!(got32.iter().map(|&v| v as f64).collect::<Vec<_>>(), want);
            }
        }
    }
}
