//! The AVX-512 micro-kernel: an 8 x 48 tile of `dst` in 24 zmm accumulators; per `k`,
//! three loads of `rhs` and eight broadcasts of `lhs` feed 24 fused multiply-adds. A
//! tile's last one to four ragged columns run down its rows instead (`tile`'s `EXTRA`).
//!
//! Why 8 x 48: alone on panels in L1, one thread (`micro_kernel_gflops`, printed by the
//! `sgemm_peak` example), this kernel ran 148-161 GFLOP/s as 8 x 32 with KC 256 and
//! 164-171 as 8 x 48 with KC 160 (FMA peak 204-212); square SGEMMs followed, 233-246
//! against 246-268 GFLOP/s on two threads. About half of it is the per-step prefetch of
//! the next `lhs` panel, which the wider tile spreads over more multiply-adds (8 x 32
//! without it: 163-164). A bare loop without prefetch or masks runs every tile from
//! 8 x 32 to 6 x 64 at 75-88 % of the peak (the `micro_kernel_shapes` example). Eight
//! rows keep the channel counts of real networks in whole panels.
//!
//! The channels-last (indirect) kernels come in 8 x 48, 6 x 64 and 12 x 32; a layer takes
//! the widest whose width divides its primaries (12 x 32 for 32, whose 48-wide panel would
//! multiply 16 columns of zeros).

use std::arch::x86_64::*;

use super::{Indirect, Micro, RhsRows, Tile, TileFinish};

/// Rows of the tile.
const MR: usize = 8;
/// Columns of the tile (three vectors).
const NR: usize = 48;

pub(super) const MICRO: Micro = Micro {
    name: "avx512",
    kernel: entry,
    direct: Some(direct_entry),
    indirect: &[
        Indirect {
            kernel: indirect_entry::<MR, NR>,
            mr: MR,
            nr: NR,
        },
        Indirect {
            kernel: indirect_entry::<6, 64>,
            mr: 6,
            nr: 64,
        },
        // For 32 primaries (a 48-wide panel would multiply 16 columns of zeros).
        Indirect {
            kernel: indirect_entry::<12, 32>,
            mr: 12,
            nr: 32,
        },
    ],
    mr: MR,
    nr: NR,
};

/// # Safety
/// The [`super::Kernel`] contract, on a CPU with AVX-512F ([`super::detect`] picks this
/// kernel only there).
unsafe fn entry(kc: usize, a: *const f32, b: *const f32, dst: Tile, add: bool) {
    // SAFETY: forwarded; the CPU has AVX-512F.
    unsafe { kernel(kc, a, b, dst, add) }
}

/// # Safety
/// The [`super::DirectKernel`] contract, on a CPU with AVX-512F ([`super::detect`] picks
/// this kernel only there).
unsafe fn direct_entry(kc: usize, a: *const f32, b: RhsRows, dst: Tile, add: bool) {
    // SAFETY: forwarded; the CPU has AVX-512F.
    unsafe { direct(kc, a, b, dst, add) }
}

/// # Safety
/// The [`super::IndirectKernel`] contract, on a CPU with AVX-512F ([`super::detect`]
/// picks this kernel only there).
unsafe fn indirect_entry<const ROWS: usize, const WIDTH: usize>(
    kc: usize,
    taps: usize,
    rows: (*const *const f32, usize),
    b: (*const f32, *const f32),
    dst: Tile,
    add: bool,
    finish: Option<TileFinish>,
) {
    // SAFETY: forwarded; the CPU has AVX-512F.
    unsafe { indirect::<ROWS, WIDTH>(kc, taps, rows, b, dst, add, finish) }
}

/// Lanes of the three vectors inside a tile's `cols` columns (masked lanes are neither read
/// nor written).
#[inline(always)]
fn lanes(cols: usize) -> (__mmask16, __mmask16, __mmask16) {
    (mask(cols, 0), mask(cols, 1), mask(cols, 2))
}

#[target_feature(enable = "avx512f")]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, dst: Tile, add: bool) {
    // SAFETY: p < kc, so b[p * NR..][..NR] is in the panel (all 48 lanes, zero-padded);
    // the rest is the caller's promise.
    unsafe { tile_of_width(kc, Panel(a), |p| b.add(p * NR), (!0, !0, !0), dst, add) }
}

#[target_feature(enable = "avx512f")]
unsafe fn indirect<const ROWS: usize, const WIDTH: usize>(
    kc: usize,
    taps: usize,
    rows: (*const *const f32, usize),
    b: (*const f32, *const f32),
    dst: Tile,
    add: bool,
    finish: Option<TileFinish>,
) {
    let m = |v: usize| mask(dst.cols, v);
    // SAFETY: the contract: taps * ROWS row pointers, each valid for kc values, the panel
    // taps * kc * WIDTH values; whole vectors only, no extra columns.
    unsafe {
        if dst.cols == WIDTH && WIDTH == 64 {
            // A whole panel: constant masks, so the compiler loads without them.
            return indirect_tile::<ROWS, 4, WIDTH>(kc, taps, rows, b, [!0; 4], dst, add, finish);
        }
        if dst.cols == WIDTH && WIDTH == 48 {
            return indirect_tile::<ROWS, 3, WIDTH>(kc, taps, rows, b, [!0; 3], dst, add, finish);
        }
        if dst.cols == WIDTH && WIDTH == 32 {
            return indirect_tile::<ROWS, 2, WIDTH>(kc, taps, rows, b, [!0; 2], dst, add, finish);
        }
        match dst.cols.div_ceil(16) {
            0 | 1 => indirect_tile::<ROWS, 1, WIDTH>(kc, taps, rows, b, [m(0)], dst, add, finish),
            2 => indirect_tile::<ROWS, 2, WIDTH>(kc, taps, rows, b, [m(0), m(1)], dst, add, finish),
            3 => indirect_tile::<ROWS, 3, WIDTH>(
                kc,
                taps,
                rows,
                b,
                [m(0), m(1), m(2)],
                dst,
                add,
                finish,
            ),
            _ => indirect_tile::<ROWS, 4, WIDTH>(
                kc,
                taps,
                rows,
                b,
                [m(0), m(1), m(2), m(3)],
                dst,
                add,
                finish,
            ),
        }
    }
}

/// The lanes of vector `v` inside a tile's first `cols` columns.
#[inline(always)]
fn mask(cols: usize, v: usize) -> __mmask16 {
    let n = cols.saturating_sub(16 * v).min(16);
    ((1u32 << n) - 1) as __mmask16
}

/// The [`super::IndirectKernel`] on `ROWS` rows and `VECTORS` vectors of columns, panel
/// rows `WIDTH` apart: tap by tap, the tap's rows read in place for `kc` steps, all into
/// the same accumulators.
///
/// # Safety
/// The [`super::IndirectKernel`] contract, with `dst.cols <= 16 * VECTORS <= WIDTH`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn indirect_tile<const ROWS: usize, const VECTORS: usize, const WIDTH: usize>(
    kc: usize,
    taps: usize,
    (rows, offset): (*const *const f32, usize),
    (b, ahead): (*const f32, *const f32),
    b_lanes: [__mmask16; VECTORS],
    dst: Tile,
    add: bool,
    finish: Option<TileFinish>,
) {
    let mut acc = [[_mm512_setzero_ps(); VECTORS]; ROWS];
    for tap in 0..taps {
        // SAFETY: tap < taps: the contract grants its ROWS row pointers and its
        // kc * WIDTH panel values; p < kc reads inside both.
        unsafe {
            let tap_rows = std::ptr::read(rows.add(tap * ROWS).cast::<[*const f32; ROWS]>());
            let a = Rows(tap_rows.map(|row| row.add(offset)));
            let b = b.add(tap * kc * WIDTH);
            let ahead = ahead.wrapping_add(tap * kc * 16);
            for p in 0..kc {
                // One line of `ahead` per step on its way to L2 (a prefetch never faults).
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(p * 16).cast());
                step(&mut acc, a, p, b.add(p * WIDTH), b_lanes);
            }
        }
    }
    // SAFETY: forwarded (the caller's promise on the tile and on `finish`).
    unsafe { store(acc, dst, 0, add, finish) };
}

#[target_feature(enable = "avx512f")]
unsafe fn direct(kc: usize, a: *const f32, b: RhsRows, dst: Tile, add: bool) {
    let lanes = lanes(dst.cols);
    // SAFETY: for p < kc the row's `cols` values are valid (the contract); the masks keep
    // the loads among them. (One loop per kind of row address, not a branch per `p`.)
    unsafe {
        match b {
            RhsRows::Offsets(b, offsets) => {
                tile_of_width(kc, Panel(a), |p| b.add(*offsets.add(p)), lanes, dst, add)
            }
            RhsRows::Strided(b, stride) => {
                tile_of_width(kc, Panel(a), |p| b.add(p * stride), lanes, dst, add)
            }
        }
    }
}

/// [`tile`] on as few vectors as the tile's columns need, its last one to [`EXTRA_MAX`]
/// columns past whole vectors as extra columns: `(first, second, third)` are the loads'
/// lane masks of the three vectors.
///
/// # Safety
/// As [`tile`], with `dst.cols <= NR`.
#[inline(always)]
unsafe fn tile_of_width(
    kc: usize,
    a: Panel,
    b_row: impl Fn(usize) -> *const f32,
    (first, second, third): (__mmask16, __mmask16, __mmask16),
    dst: Tile,
    add: bool,
) {
    // SAFETY: forwarded; each arm's vectors and extra columns cover exactly the tile's
    // columns (`16 * VECTORS + EXTRA == cols` where EXTRA > 0, else `cols <= 16 * VECTORS`).
    unsafe {
        match dst.cols {
            1 => tile::<0, 1>(kc, a, b_row, [], dst, add, None),
            2 => tile::<0, 2>(kc, a, b_row, [], dst, add, None),
            3 => tile::<0, 3>(kc, a, b_row, [], dst, add, None),
            4 => tile::<0, 4>(kc, a, b_row, [], dst, add, None),
            5..=16 => tile::<1, 0>(kc, a, b_row, [first], dst, add, None),
            17 => tile::<1, 1>(kc, a, b_row, [first], dst, add, None),
            18 => tile::<1, 2>(kc, a, b_row, [first], dst, add, None),
            19 => tile::<1, 3>(kc, a, b_row, [first], dst, add, None),
            20 => tile::<1, 4>(kc, a, b_row, [first], dst, add, None),
            21..=32 => tile::<2, 0>(kc, a, b_row, [first, second], dst, add, None),
            33 => tile::<2, 1>(kc, a, b_row, [first, second], dst, add, None),
            34 => tile::<2, 2>(kc, a, b_row, [first, second], dst, add, None),
            35 => tile::<2, 3>(kc, a, b_row, [first, second], dst, add, None),
            36 => tile::<2, 4>(kc, a, b_row, [first, second], dst, add, None),
            _ => tile::<3, 0>(kc, a, b_row, [first, second, third], dst, add, None),
        }
    }
}

/// The most ragged columns a tile runs as [`tile`]'s extra columns.
const EXTRA_MAX: usize = 4;

/// The tile's products over its first `VECTORS` vectors of 16 columns (`rhs` row `p`,
/// the masked lanes zero, at `b_row(p)`), then over `EXTRA` single columns after them.
///
/// A tile's columns past whole vectors would waste most of a vector's lanes (a 7 x 7
/// map's 49 columns end in a tile of 1, a 14 x 14 map's 196 in one of 4). An extra
/// column instead runs down the tile's rows: the lhs panel's `MR` values of `p` (one
/// 8-lane vector) times the column's one `rhs` value, so its cost is one 8-lane
/// multiply-add per `p` instead of `MR` 16-lane ones. Every value is the same chain of
/// fused multiply-adds in increasing `p` either way, so the bits do not depend on it.
///
/// # Safety
/// `a` holds `kc * MR` values; the masked lanes of `b_row(p)` and, where `EXTRA > 0`,
/// its values `16 * VECTORS..16 * VECTORS + EXTRA` for `p < kc` are valid values; `dst`
/// as the [`super::Kernel`] contract, with `dst.cols <= 16 * VECTORS` where `EXTRA` is 0
/// and `dst.cols == 16 * VECTORS + EXTRA` where it is not.
#[inline(always)]
unsafe fn tile<const VECTORS: usize, const EXTRA: usize>(
    kc: usize,
    a: Panel,
    b_row: impl Fn(usize) -> *const f32,
    b_lanes: [__mmask16; VECTORS],
    dst: Tile,
    add: bool,
    finish: Option<TileFinish>,
) {
    debug_assert!(EXTRA <= EXTRA_MAX && (EXTRA == 0 || dst.cols == 16 * VECTORS + EXTRA));
    debug_assert!(
        EXTRA == 0 || finish.is_none(),
        "extra columns are stored unfinished"
    );
    let mut acc = [[_mm512_setzero_ps(); VECTORS]; MR];
    let mut extra = [_mm256_setzero_ps(); EXTRA];
    for p in 0..kc {
        // SAFETY: p < kc, so a[p * MR..][..MR] is in the panel; the loads of b read the
        // lanes and extra columns the caller vouches for.
        unsafe {
            let b = b_row(p);
            // The next lhs panel (the next call's, where this one is not the block's
            // last) on its way to L1 while this one is multiplied: weights come from L3 in
            // a network. A prefetch never faults, so past the block's end it is harmless.
            _mm_prefetch::<_MM_HINT_T0>(a.0.wrapping_add(kc * MR + p * MR).cast());
            step(&mut acc, a, p, b, b_lanes);
            if EXTRA > 0 {
                let column = a.column(p);
                for (e, sum) in extra.iter_mut().enumerate() {
                    let bj = _mm256_set1_ps(*b.add(16 * VECTORS + e));
                    *sum = _mm256_fmadd_ps(column, bj, *sum);
                }
            }
        }
    }
    // SAFETY: forwarded (the caller's promise on the tile and on `finish`).
    unsafe { store(acc, dst, EXTRA, add, finish) };
    for (e, &sum) in extra.iter().enumerate() {
        let mut column = [0.0f32; MR];
        // SAFETY: `column` holds the 8 lanes.
        unsafe { _mm256_storeu_ps(column.as_mut_ptr(), sum) };
        for (i, &value) in column.iter().enumerate().take(dst.rows) {
            // SAFETY: row i < rows, column 16 * VECTORS + e < cols: in the tile.
            unsafe {
                let d = dst.ptr.add(i * dst.rs + 16 * VECTORS + e);
                *d = if add { *d + value } else { value };
            }
        }
    }
}

/// Stores the tile's accumulators (all but its `extra` last columns), through `finish`
/// where given. A function of its own: inlined into the multiply-add loop, its branches
/// made the compiler keep the accumulators in memory, a store after every multiply-add.
///
/// # Safety
/// The tile's `rows x (cols - extra)` values are valid (rows `dst.rs` apart), and so are
/// `finish`'s pointers, where not null, for them.
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn store<const ROWS: usize, const VECTORS: usize>(
    acc: [[__m512; VECTORS]; ROWS],
    dst: Tile,
    extra: usize,
    add: bool,
    finish: Option<TileFinish>,
) {
    let masks: [__mmask16; VECTORS] = std::array::from_fn(|v| mask(dst.cols - extra, v));
    for (i, row) in acc.iter().enumerate().take(dst.rows) {
        for (v, (&sum, &mask)) in row.iter().zip(&masks).enumerate() {
            // SAFETY: the lanes of dst.ptr + i * dst.rs + [0, cols) for i < rows are in
            // the tile the contract grants (cols <= 16 * VECTORS + extra); the masks keep
            // every access among the first cols - extra.
            unsafe {
                let d = dst.ptr.add(i * dst.rs + 16 * v);
                let mut value = if add {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d), sum)
                } else {
                    sum
                };
                if let Some(finish) = finish {
                    // The same operations, in the same order, as `Epilogue::apply`.
                    let column = 16 * v;
                    if !finish.scale.is_null() {
                        let scale = _mm512_maskz_loadu_ps(mask, finish.scale.add(column));
                        value = _mm512_mul_ps(value, scale);
                    }
                    if !finish.shift.is_null() {
                        let shift = _mm512_maskz_loadu_ps(mask, finish.shift.add(column));
                        value = _mm512_add_ps(value, shift);
                    }
                    if !finish.residual.is_null() {
                        let r = finish.residual.add(i * dst.rs + column);
                        value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, r));
                    }
                    if finish.relu {
                        // y <= 0 becomes +0 (a NaN compares false and stays).
                        let zero = _mm512_setzero_ps();
                        let negative = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(value, zero);
                        value = _mm512_mask_mov_ps(value, negative, zero);
                    }
                }
                _mm512_mask_storeu_ps(d, mask, value);
            }
        }
    }
}

/// One step `p` of a tile: `acc[i][v] += lhs(i, p) * b[16 v..][..16]` (the masked lanes
/// of `b` read as zero).
///
/// # Safety
/// `a`'s value `p` of every row and `b`'s masked lanes must be valid.
#[inline(always)]
unsafe fn step<const ROWS: usize, const VECTORS: usize>(
    acc: &mut [[__m512; VECTORS]; ROWS],
    a: impl Lhs,
    p: usize,
    b: *const f32,
    b_lanes: [__mmask16; VECTORS],
) {
    let mut bv = [_mm512_setzero_ps(); VECTORS];
    for (v, (bv, &lanes)) in bv.iter_mut().zip(&b_lanes).enumerate() {
        // SAFETY: the caller vouches for the masked lanes.
        *bv = unsafe { _mm512_maskz_loadu_ps(lanes, b.add(16 * v)) };
    }
    for (i, row) in acc.iter_mut().enumerate() {
        // SAFETY: the caller vouches for value p of row i.
        let ai = _mm512_set1_ps(unsafe { a.value(p, i) });
        for (sum, &bv) in row.iter_mut().zip(&bv) {
            *sum = _mm512_fmadd_ps(ai, bv, *sum);
        }
    }
}

/// Where the micro-kernel finds `lhs`: value `p` of row `i` of the tile.
trait Lhs: Copy {
    /// Value `p` of row `i`.
    ///
    /// # Safety
    /// `i` below the tile's rows, and the value must be valid.
    unsafe fn value(self, p: usize, i: usize) -> f32;
}

/// A packed panel: value `(i, p)` at `p * MR + i`.
#[derive(Clone, Copy)]
struct Panel(*const f32);

impl Panel {
    /// Values `p` of the `MR` rows, as one 8-lane vector.
    ///
    /// # Safety
    /// The panel must hold them.
    #[inline(always)]
    unsafe fn column(self, p: usize) -> __m256 {
        // SAFETY: MR = 8 values of the panel from p * MR (the caller's promise).
        unsafe { _mm256_loadu_ps(self.0.add(p * MR)) }
    }
}

impl Lhs for Panel {
    #[inline(always)]
    unsafe fn value(self, p: usize, i: usize) -> f32 {
        // SAFETY: the caller's promise.
        unsafe { *self.0.add(p * MR + i) }
    }
}

/// Rows read in place: value `(i, p)` at `rows[i] + p`.
#[derive(Clone, Copy)]
struct Rows<const ROWS: usize>([*const f32; ROWS]);

impl<const ROWS: usize> Lhs for Rows<ROWS> {
    #[inline(always)]
    unsafe fn value(self, p: usize, i: usize) -> f32 {
        // SAFETY: the caller's promise.
        unsafe { *self.0[i].add(p) }
    }
}
