//! im2col and col2im rows through a table of input offsets, for tiles of short runs.
//!
//! On small maps a run of output pixels is a few values long (ResNet-18 at 32x32 has rows
//! of 8, 4, 2 and 1 pixels), and copying run by run costs more in bookkeeping and calls to
//! memset and memcpy than in the values moved. Here the input offset of every column of
//! the tile is worked out once per kernel position ([`Offsets`]); a row of the column
//! matrix is then one gather over the tile (AVX-512 `vgatherdps`, 16 columns at a time)
//! and a row of col2im one gather, add and scatter. The values and the order of the adds
//! into each input-gradient value are those of the run-by-run loops, so are the bits.
//!
//! Where the live columns of a vector read consecutive input values (a stride-1
//! convolution, within one image: the rows of a plane, with padding holes at their ends)
//! the table notes the vector's shift, and a masked load or store replaces the gather or
//! scatter. Gathers and scatters move one value at a time, and cost more still on CPUs
//! with the microcode against gather data sampling.
//!
//! A strided convolution's run reads every `stride`-th input value ([`copy_strided`]);
//! with stride 2 (ResNet's downsampling layers) on AVX-512, 16 of them from two loads and
//! one permute.

use super::Real;

/// Marks a column that reads padding.
const PADDING: u32 = u32::MAX;

/// Columns per vector of the `f32` path; rows of [`Offsets`] are padded to a multiple.
const LANES: usize = 16;

/// The shift of a vector none of whose columns reads the input yet.
const NO_READS: i64 = i64::MAX;

/// The shift of a vector whose columns do not read consecutive values.
const SCATTERED: i64 = i64::MIN;

/// The input offsets of each column of a tile at each kernel position: row `p` holds,
/// for column `j`, the offset of the value it reads relative to the start of channel 0
/// of the tile's first image (add `ch * h * w` for channel `ch`), or a mark for padding.
pub(crate) struct Offsets {
    /// `[positions][stride]`, padded with marks.
    values: Vec<u32>,
    /// `[positions][stride / LANES]`: for each vector of a row, the `shift` such that
    /// every column `start + i` of it that reads the input reads offset `shift + i`, or
    /// [`NO_READS`] or [`SCATTERED`].
    shifts: Vec<i64>,
    /// The tile's columns.
    columns: usize,
    /// Row length (`columns` rounded up to [`LANES`]).
    stride: usize,
    /// The largest offset in the table (0 if none).
    max: usize,
}

impl Offsets {
    /// An empty table for `positions` kernel positions and `columns` columns, or `None`
    /// where an offset could exceed `limit` (the gathers take signed 32-bit offsets).
    pub(crate) fn new(positions: usize, columns: usize, limit: usize) -> Option<Self> {
        if limit > i32::MAX as usize {
            return None;
        }
        let stride = columns.div_ceil(LANES) * LANES;
        Some(Self {
            values: vec![PADDING; positions * stride],
            shifts: vec![NO_READS; positions * (stride / LANES)],
            columns,
            stride,
            max: 0,
        })
    }

    /// Sets column `column` of position `position` to read `offset`.
    ///
    /// # Panics
    /// If the position or the column is out of range or `offset` exceeds `i32::MAX`.
    #[cfg(test)]
    pub(crate) fn set(&mut self, position: usize, column: usize, offset: usize) {
        self.set_run(position, column, offset, 1, 1);
    }

    /// Sets the `len` columns from `column` of position `position` to read `offset`,
    /// `offset + step`, ...: one run of a row of the input.
    ///
    /// # Panics
    /// If the position or a column is out of range or an offset exceeds `i32::MAX`.
    pub(crate) fn set_run(
        &mut self,
        position: usize,
        column: usize,
        offset: usize,
        len: usize,
        step: usize,
    ) {
        let Some(last) = len.checked_sub(1) else {
            return;
        };
        assert!(
            column
                .checked_add(len)
                .is_some_and(|end| end <= self.columns),
            "offset table column"
        );
        // The gathers take signed 32-bit offsets.
        let last_offset = last
            .checked_mul(step)
            .and_then(|span| span.checked_add(offset))
            .filter(|&o| o <= i32::MAX as usize)
            .expect("offset table: offset beyond 31 bits");
        let row = &mut self.values[position * self.stride..][..self.stride];
        for (k, value) in row[column..column + len].iter_mut().enumerate() {
            *value = (offset + k * step) as u32;
        }
        self.max = self.max.max(last_offset);
        // A vector stays consecutive while each offset set in it agrees with the shift of
        // the ones before; one that does not (an overwrite included) makes it scattered
        // for good, so a consecutive vector's shift always holds for all its reads.
        let vectors = self.stride / LANES;
        let (first_vector, last_vector) = (column / LANES, (column + last) / LANES);
        let shifts = &mut self.shifts[position * vectors..][..vectors];
        let touched = shifts[first_vector..=last_vector].iter_mut();
        for (vector, shift) in (first_vector..).zip(touched) {
            let start = vector * LANES;
            // The run's columns in this vector, and the offset of the first.
            let first = column.max(start);
            let end = (column + len).min(start + LANES);
            let first_offset = offset + (first - column) * step;
            let this = if step == 1 || end - first == 1 {
                first_offset as i64 - (first - start) as i64
            } else {
                SCATTERED
            };
            *shift = match *shift {
                NO_READS => this,
                s if s == this => s,
                _ => SCATTERED,
            };
        }
    }

    /// The row of position `position`.
    pub(crate) fn row(&self, position: usize) -> OffsetRow<'_> {
        let vectors = self.stride / LANES;
        OffsetRow {
            values: &self.values[position * self.stride..][..self.stride],
            shifts: &self.shifts[position * vectors..][..vectors],
            columns: self.columns,
            max: self.max,
        }
    }
}

/// One kernel position's row of an [`Offsets`] table.
#[derive(Clone, Copy)]
pub struct OffsetRow<'a> {
    /// Offsets, a multiple of [`LANES`] long, marks past `columns`.
    values: &'a [u32],
    /// Each vector's shift (see [`Offsets`]), one per [`LANES`] values.
    shifts: &'a [i64],
    columns: usize,
    /// At least every offset in `values` other than the marks.
    max: usize,
}

impl OffsetRow<'_> {
    /// Checks that `base + offset` lies inside a slice of `len` values for every offset,
    /// and that `out_len` holds the row's columns.
    ///
    /// # Panics
    /// If not.
    fn check(&self, base: usize, len: usize, out_len: usize) {
        assert!(out_len >= self.columns, "offset row: too few columns");
        assert!(
            base.checked_add(self.max).is_some_and(|last| last < len),
            "offset row: offsets outside the input"
        );
    }
}

/// The portable [`Real::gather_row`].
///
/// # Panics
/// If an offset reads outside `x` or `out` is shorter than the row.
pub(crate) fn gather_row<T: Real>(x: &[T], base: usize, row: OffsetRow<'_>, out: &mut [T]) {
    row.check(base, x.len(), out.len());
    for (v, &offset) in out[..row.columns].iter_mut().zip(row.values) {
        *v = if offset == PADDING {
            T::ZERO
        } else {
            x[base + offset as usize]
        };
    }
}

/// The portable [`Real::scatter_add_row`].
///
/// # Panics
/// If an offset writes outside `dx` or `values` is shorter than the row.
pub(crate) fn scatter_add_row<T: Real>(
    values: &[T],
    dx: &mut [T],
    base: usize,
    row: OffsetRow<'_>,
) {
    row.check(base, dx.len(), values.len());
    for (&v, &offset) in values[..row.columns].iter().zip(row.values) {
        if offset != PADDING {
            dx[base + offset as usize] += v;
        }
    }
}

/// Whether [`gather_row_f32`] and [`scatter_add_row_f32`] run on vectors here.
pub(crate) fn f32_rows_vectorized() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`gather_row`] for `f32`, on AVX-512 gathers where the CPU has them.
///
/// # Panics
/// As [`gather_row`].
pub(crate) fn gather_row_f32(x: &[f32], base: usize, row: OffsetRow<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            row.check(base, x.len(), out.len());
            // SAFETY: the CPU has AVX-512F and the arguments passed `check`.
            unsafe { avx512::gather(x, base, row, out) };
            return;
        }
    }
    gather_row(x, base, row, out)
}

/// [`scatter_add_row`] for `f32`, on AVX-512 gathers and scatters where the CPU has them.
///
/// # Panics
/// As [`scatter_add_row`].
pub(crate) fn scatter_add_row_f32(values: &[f32], dx: &mut [f32], base: usize, row: OffsetRow<'_>) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            row.check(base, dx.len(), values.len());
            // SAFETY: the CPU has AVX-512F and the arguments passed `check`.
            unsafe { avx512::scatter_add(values, dx, base, row) };
            return;
        }
    }
    scatter_add_row(values, dx, base, row)
}

/// `dst[k] = src[k * stride]` for every `k < dst.len()`: one run of a strided
/// convolution's column matrix.
///
/// # Panics
/// If `src` is shorter than the run reads (`(dst.len() - 1) * stride + 1` values).
pub(crate) fn copy_strided<T: Copy>(src: &[T], stride: usize, dst: &mut [T]) {
    check_strided(src.len(), stride, dst.len());
    for (k, v) in dst.iter_mut().enumerate() {
        *v = src[k * stride];
    }
}

/// Panics unless a source of `src` values holds the `dst` values every `stride` that a
/// strided copy reads (`(dst - 1) * stride + 1` of them).
fn check_strided(src: usize, stride: usize, dst: usize) {
    if let Some(last) = dst.checked_sub(1) {
        assert!(
            last.saturating_mul(stride) < src,
            "copy_strided: {dst} values every {stride} from {src}"
        );
    }
}

/// [`copy_strided`] for `f32`, stride 2 on AVX-512 where the CPU has it.
///
/// # Panics
/// As [`copy_strided`].
pub(crate) fn copy_strided_f32(src: &[f32], stride: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if stride == 2 && is_x86_feature_detected!("avx512f") {
            check_strided(src.len(), stride, dst.len());
            // SAFETY: the CPU has AVX-512F; src holds the values the run reads.
            unsafe { avx512::copy_every_second(src, dst) };
            return;
        }
    }
    copy_strided(src, stride, dst)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{OffsetRow, LANES, NO_READS, PADDING, SCATTERED};
    use std::arch::x86_64::*;

    /// The lanes of the chunk at `start` that hold one of the row's `columns`.
    #[inline(always)]
    fn in_row(start: usize, columns: usize) -> u16 {
        let n = (columns - start).min(LANES);
        ((1u32 << n) - 1) as u16
    }

    /// [`super::gather_row`] on `vgatherdps`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the arguments pass `OffsetRow::check`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather(x: &[f32], base: usize, row: OffsetRow<'_>, out: &mut [f32]) {
        // SAFETY: base <= base + max < x.len() by `check`.
        let from = unsafe { x.as_ptr().add(base) };
        let to = out.as_mut_ptr();
        let padding = _mm512_set1_epi32(PADDING as i32);
        let mut start = 0;
        while start < row.columns {
            let shift = row.shifts[start / LANES];
            // SAFETY: row.values holds a multiple of LANES values and start < columns <=
            // its length, so the 16 offsets at `start` are inside it. A lane that is not
            // padding reads from[offset] with offset <= max, inside `x` by `check`
            // (offsets are below i32::MAX, so the signed index is the offset); padding
            // lanes are masked off and not accessed. A consecutive vector's lane i reads
            // from[shift + i], which is its offset (`Offsets::set_run` keeps the shift true
            // for every live lane), so the masked load touches only those values; its
            // pointer is formed by wrapping arithmetic, as it may lie before `from`
            // where the first lanes are padding. The store writes out[start + i] only for
            // start + i < columns <= out.len().
            unsafe {
                let offsets = _mm512_loadu_si512(row.values.as_ptr().add(start).cast());
                let live = _mm512_cmpneq_epi32_mask(offsets, padding);
                let v = if shift == SCATTERED || shift == NO_READS {
                    _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), live, offsets, from)
                } else {
                    _mm512_maskz_loadu_ps(live, from.wrapping_offset(shift as isize))
                };
                _mm512_mask_storeu_ps(to.add(start), in_row(start, row.columns), v);
            }
            start += LANES;
        }
    }

    /// `dst[k] = src[2 * k]`: the even lanes of two loads of 16, by one permute.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `src` holds at least `2 * dst.len() - 1` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn copy_every_second(src: &[f32], dst: &mut [f32]) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let lanes = |n: usize| -> u16 { ((1u32 << n.min(LANES)) - 1) as u16 };
        let mut k = 0;
        while k < dst.len() {
            let outputs = (dst.len() - k).min(LANES);
            // Values src[2k..] this chunk may load: its outputs read up to 2 * outputs - 1
            // of them, and nothing past the slice's end is touched.
            let available = src.len() - 2 * k;
            // SAFETY: 2k < src.len() (the caller's bound, k < dst.len()); the masks keep
            // the loads among the `available` values from src[2k] and the store among the
            // `outputs` values from dst[k].
            unsafe {
                let from = src.as_ptr().add(2 * k);
                let low = _mm512_maskz_loadu_ps(lanes(available), from);
                let high = _mm512_maskz_loadu_ps(
                    lanes(available.saturating_sub(LANES)),
                    from.add(LANES.min(available)),
                );
                let v = _mm512_permutex2var_ps(low, even, high);
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(k), lanes(outputs), v);
            }
            k += LANES;
        }
    }

    /// [`super::scatter_add_row`] on `vgatherdps` and `vscatterdps`. The offsets of one
    /// row are distinct (a kernel position maps distinct output pixels to distinct input
    /// pixels), so no two lanes of a scatter write the same value.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the arguments pass `OffsetRow::check`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scatter_add(
        values: &[f32],
        dx: &mut [f32],
        base: usize,
        row: OffsetRow<'_>,
    ) {
        // SAFETY: base <= base + max < dx.len() by `check`.
        let to = unsafe { dx.as_mut_ptr().add(base) };
        let padding = _mm512_set1_epi32(PADDING as i32);
        let mut start = 0;
        while start < row.columns {
            let shift = row.shifts[start / LANES];
            // SAFETY: the offsets are read as in `gather`; `values` is read at start + i
            // for lanes below `columns - start`, inside it by `check`; a lane that is not
            // padding reads and writes to[offset], inside `dx` by `check`. A consecutive
            // vector's masked load and store touch to[shift + i] = to[offset] for those
            // lanes only, as in `gather`.
            unsafe {
                let offsets = _mm512_loadu_si512(row.values.as_ptr().add(start).cast());
                let columns = in_row(start, row.columns);
                let live = _mm512_cmpneq_epi32_mask(offsets, padding) & columns;
                let v = _mm512_maskz_loadu_ps(columns, values.as_ptr().add(start));
                if shift == SCATTERED || shift == NO_READS {
                    let d = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), live, offsets, to);
                    _mm512_mask_i32scatter_ps::<4>(to, live, offsets, _mm512_add_ps(d, v));
                } else {
                    let at = to.wrapping_offset(shift as isize);
                    let d = _mm512_maskz_loadu_ps(live, at);
                    _mm512_mask_storeu_ps(at, live, _mm512_add_ps(d, v));
                }
            }
            start += LANES;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(columns: usize, offsets: &[Option<usize>]) -> Offsets {
        let mut table = Offsets::new(1, columns, 1000).unwrap();
        for (j, offset) in offsets.iter().enumerate() {
            if let Some(offset) = offset {
                table.set(0, j, *offset);
            }
        }
        table
    }

    /// Rows of every length up to three vectors, with padding and distinct offsets: the
    /// f32 path (vector where the CPU has AVX-512) against the definition.
    #[test]
    fn f32_rows_match_the_definition() {
        let x: Vec<f32> = (0..200).map(|v| v as f32 * 0.5 - 3.0).collect();
        for columns in 0..50 {
            let offsets: Vec<Option<usize>> = (0..columns)
                .map(|j| (j % 5 != 2).then_some((j * 37) % 97))
                .collect();
            check_rows(&x, &offsets, &table(columns, &offsets));
        }
    }

    /// Rows whose vectors read consecutive values with padding holes (the rows of small
    /// planes, shifted by a kernel position), including vectors whose first reading lane
    /// is past the input's start, and a column set twice: the f32 path (masked loads and
    /// stores where the CPU has AVX-512) against the definition.
    #[test]
    fn consecutive_rows_match_the_definition() {
        let x: Vec<f32> = (0..90).map(|v| v as f32 * 0.25 - 7.0).collect();
        for (width, dx) in [(4usize, -1isize), (4, 1), (8, 0), (8, -1), (3, 1), (5, 2)] {
            for columns in [1, 15, 16, 17, 40, 64] {
                // Column j is pixel (j / width, j % width) of a plane; it reads the pixel
                // `dx` to the side, where that lies in the plane's row.
                let offsets: Vec<Option<usize>> = (0..columns)
                    .map(|j| {
                        let column = (j % width) as isize + dx;
                        (0..width as isize)
                            .contains(&column)
                            .then(|| (j / width * width) as isize + column)
                            .map(|o| o as usize)
                    })
                    .collect();
                let mut tables = vec![table(columns, &offsets)];
                assert!(!tables[0].shifts.contains(&SCATTERED));
                // Overwrites: one that keeps a vector consecutive, one that breaks it.
                if let Some(first) = offsets.iter().position(Option::is_some) {
                    let mut again = table(columns, &offsets);
                    again.set(0, first, offsets[first].unwrap());
                    tables.push(again);
                    let mut moved = table(columns, &offsets);
                    moved.set(0, first, 80);
                    assert_eq!(moved.shifts[first / LANES], SCATTERED);
                    let mut moved_offsets = offsets.clone();
                    moved_offsets[first] = Some(80);
                    tables.push(moved);
                    check_rows(&x, &moved_offsets, tables.last().unwrap());
                    tables.pop();
                }
                for table in &tables {
                    check_rows(&x, &offsets, table);
                }
            }
        }
    }

    /// A run set at once gives the table (offsets, bound and vector shifts) that setting
    /// its columns one by one gives, for runs that start, end and cross vectors anywhere,
    /// at steps 1 to 3, over a row already holding runs.
    #[test]
    fn a_run_set_at_once_is_its_columns_set_one_by_one() {
        let columns = 50;
        for step in 1..=3 {
            for column in [0, 5, 15, 16, 30] {
                for len in [0, 1, 2, 11, 17, 20] {
                    if column + len > columns {
                        continue;
                    }
                    let mut at_once = Offsets::new(2, columns, 1000).unwrap();
                    let mut one_by_one = Offsets::new(2, columns, 1000).unwrap();
                    for table in [&mut at_once, &mut one_by_one] {
                        table.set_run(1, 0, 3, 8, 1);
                        table.set_run(1, 40, 200, 10, 1);
                    }
                    at_once.set_run(1, column, 100, len, step);
                    for k in 0..len {
                        one_by_one.set(1, column + k, 100 + k * step);
                    }
                    assert_eq!(at_once.values, one_by_one.values);
                    assert_eq!(at_once.shifts, one_by_one.shifts);
                    assert_eq!(at_once.max, one_by_one.max);
                }
            }
        }
    }

    /// The f32 and portable gathers and scatter-adds of row 0 of `table` against its
    /// `offsets`, at a few bases, from `x` and from `x` cut after the last value read.
    fn check_rows(x: &[f32], offsets: &[Option<usize>], table: &Offsets) {
        let columns = offsets.len();
        let last = offsets.iter().flatten().max().copied().unwrap_or(0);
        let fits = |&base: &usize| base + last < x.len();
        let bases = [0, 1, 3, 9, 100]
            .into_iter()
            .filter(fits)
            .map(|base| (base, x));
        let cut = [0, 9].into_iter().filter(fits);
        for (base, x) in bases.chain(cut.map(|base| (base, &x[..=base + last]))) {
            let mut out = vec![f32::NAN; columns + 2];
            gather_row_f32(x, base, table.row(0), &mut out);
            let mut portable = vec![f32::NAN; columns];
            gather_row(x, base, table.row(0), &mut portable);
            for (j, offset) in offsets.iter().enumerate() {
                let want = offset.map_or(0.0, |o| x[base + o]);
                assert_eq!(out[j], want, "column {j}");
                assert_eq!(portable[j], want, "column {j}");
            }
            assert!(out[columns].is_nan() && out[columns + 1].is_nan());
            let values: Vec<f32> = (0..columns).map(|v| v as f32 + 0.5).collect();
            let mut want = x.to_vec();
            for (j, offset) in offsets.iter().enumerate() {
                if let Some(o) = offset {
                    want[base + o] += values[j];
                }
            }
            let mut dx = x.to_vec();
            scatter_add_row_f32(&values, &mut dx, base, table.row(0));
            assert_eq!(dx, want);
            let mut dx = x.to_vec();
            scatter_add_row(&values, &mut dx, base, table.row(0));
            assert_eq!(dx, want);
        }
    }

    /// Runs of every length up to three vectors, strides 1 to 3, from sources exactly as
    /// long as the run reads (the last vector's loads must stop at the slice's end) and
    /// longer: the f32 path against the definition.
    #[test]
    fn strided_copies_match_the_definition() {
        for stride in 1..=3 {
            for len in 0..50usize {
                let reads = len.saturating_sub(1) * stride + usize::from(len > 0);
                for extra in [0, 1, 17] {
                    let src: Vec<f32> = (0..reads + extra).map(|v| v as f32 * 0.5 - 3.0).collect();
                    let mut out = vec![f32::NAN; len + 2];
                    copy_strided_f32(&src, stride, &mut out[..len]);
                    let mut portable = vec![f32::NAN; len];
                    copy_strided(&src, stride, &mut portable);
                    for k in 0..len {
                        assert_eq!(out[k], src[k * stride], "stride {stride}, len {len}");
                        assert_eq!(portable[k], src[k * stride]);
                    }
                    assert!(out[len].is_nan() && out[len + 1].is_nan());
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "copy_strided")]
    fn a_strided_copy_past_its_source_panics() {
        // Five values every 2 read nine.
        let src = [1.0f32; 8];
        let mut out = [0.0f32; 5];
        copy_strided_f32(&src, 2, &mut out);
    }

    #[test]
    #[should_panic(expected = "offsets outside the input")]
    fn a_row_reading_past_the_input_panics() {
        let table = table(4, &[Some(0), None, Some(9), Some(3)]);
        let x = [1.0f32; 12];
        let mut out = [0.0f32; 4];
        gather_row_f32(&x, 3, table.row(0), &mut out);
    }

    #[test]
    #[should_panic(expected = "offsets outside the input")]
    fn a_row_writing_past_the_gradient_panics() {
        let table = table(4, &[Some(0), None, Some(9), Some(3)]);
        let values = [1.0f32; 4];
        let mut dx = [0.0f32; 10];
        scatter_add_row_f32(&values, &mut dx, 1, table.row(0));
    }

    #[test]
    fn tables_too_large_for_32_bit_offsets_are_refused() {
        assert!(Offsets::new(1, 4, i32::MAX as usize + 1).is_none());
        assert!(Offsets::new(1, 4, i32::MAX as usize).is_some());
    }
}
