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

use std::arch::x86_64::*;

use super::{Micro, RhsRows, Tile};

/// Rows of the tile.
const MR: usize = 8;
/// Columns of the tile (three vectors).
const NR: usize = 48;

pub(super) const MICRO: Micro = Micro {
    name: "avx512",
    kernel: entry,
    direct: Some(direct_entry),
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

/// Lanes of the three vectors inside a tile's `cols` columns (masked lanes are neither read
/// nor written).
#[inline(always)]
fn lanes(cols: usize) -> (__mmask16, __mmask16, __mmask16) {
    let lane = |first: usize| -> __mmask16 {
        let n = cols.saturating_sub(first).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    (lane(0), lane(16), lane(32))
}

#[target_feature(enable = "avx512f")]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, dst: Tile, add: bool) {
    // SAFETY: p < kc, so b[p * NR..][..NR] is in the panel (all 48 lanes, zero-padded);
    // the rest is the caller's promise.
    unsafe { tile_of_width(kc, a, |p| b.add(p * NR), (!0, !0, !0), dst, add) }
}

#[target_feature(enable = "avx512f")]
unsafe fn direct(kc: usize, a: *const f32, b: RhsRows, dst: Tile, add: bool) {
    let lanes = lanes(dst.cols);
    // SAFETY: for p < kc the row's `cols` values are valid (the contract); the masks keep
    // the loads among them. (One loop per kind of row address, not a branch per `p`.)
    unsafe {
        match b {
            RhsRows::Offsets(b, offsets) => {
                tile_of_width(kc, a, |p| b.add(*offsets.add(p)), lanes, dst, add)
            }
            RhsRows::Strided(b, stride) => {
                tile_of_width(kc, a, |p| b.add(p * stride), lanes, dst, add)
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
    a: *const f32,
    b_row: impl Fn(usize) -> *const f32,
    (first, second, third): (__mmask16, __mmask16, __mmask16),
    dst: Tile,
    add: bool,
) {
    // SAFETY: forwarded; each arm's vectors and extra columns cover exactly the tile's
    // columns (`16 * VECTORS + EXTRA == cols` where EXTRA > 0, else `cols <= 16 * VECTORS`).
    unsafe {
        match dst.cols {
            1 => tile::<0, 1>(kc, a, b_row, [], dst, add),
            2 => tile::<0, 2>(kc, a, b_row, [], dst, add),
            3 => tile::<0, 3>(kc, a, b_row, [], dst, add),
            4 => tile::<0, 4>(kc, a, b_row, [], dst, add),
            5..=16 => tile::<1, 0>(kc, a, b_row, [first], dst, add),
            17 => tile::<1, 1>(kc, a, b_row, [first], dst, add),
            18 => tile::<1, 2>(kc, a, b_row, [first], dst, add),
            19 => tile::<1, 3>(kc, a, b_row, [first], dst, add),
            20 => tile::<1, 4>(kc, a, b_row, [first], dst, add),
            21..=32 => tile::<2, 0>(kc, a, b_row, [first, second], dst, add),
            33 => tile::<2, 1>(kc, a, b_row, [first, second], dst, add),
            34 => tile::<2, 2>(kc, a, b_row, [first, second], dst, add),
            35 => tile::<2, 3>(kc, a, b_row, [first, second], dst, add),
            36 => tile::<2, 4>(kc, a, b_row, [first, second], dst, add),
            _ => tile::<3, 0>(kc, a, b_row, [first, second, third], dst, add),
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
    a: *const f32,
    b_row: impl Fn(usize) -> *const f32,
    b_lanes: [__mmask16; VECTORS],
    dst: Tile,
    add: bool,
) {
    debug_assert!(EXTRA <= EXTRA_MAX && (EXTRA == 0 || dst.cols == 16 * VECTORS + EXTRA));
    let mut acc = [[_mm512_setzero_ps(); VECTORS]; MR];
    let mut extra = [_mm256_setzero_ps(); EXTRA];
    for p in 0..kc {
        // SAFETY: p < kc, so a[p * MR..][..MR] is in the panel; the loads of b read the
        // lanes and extra columns the caller vouches for.
        unsafe {
            let b = b_row(p);
            let mut bv = [_mm512_setzero_ps(); VECTORS];
            for (v, (bv, &lanes)) in bv.iter_mut().zip(&b_lanes).enumerate() {
                *bv = _mm512_maskz_loadu_ps(lanes, b.add(16 * v));
            }
            // The next lhs panel (the next call's, where this one is not the block's
            // last) on its way to L1 while this one is multiplied: weights come from L3 in
            // a network. A prefetch never faults, so past the block's end it is harmless.
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(kc * MR + p * MR).cast());
            let a = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a.add(i));
                for (sum, &bv) in row.iter_mut().zip(&bv) {
                    *sum = _mm512_fmadd_ps(ai, bv, *sum);
                }
            }
            if EXTRA > 0 {
                // MR = 8 rows: one 8-lane vector of the panel.
                let column = _mm256_loadu_ps(a);
                for (e, sum) in extra.iter_mut().enumerate() {
                    let bj = _mm256_set1_ps(*b.add(16 * VECTORS + e));
                    *sum = _mm256_fmadd_ps(column, bj, *sum);
                }
            }
        }
    }
    let (first, second, third) = lanes(dst.cols - EXTRA);
    let masks = [first, second, third];
    for (i, row) in acc.iter().enumerate().take(dst.rows) {
        for (v, (&sum, &mask)) in row.iter().zip(&masks).enumerate() {
            // SAFETY: the lanes of dst.ptr + i * dst.rs + [0, cols) for i < rows are in
            // the tile the contract grants (cols <= 16 * VECTORS + EXTRA); the masks keep
            // every access among the first cols - EXTRA.
            unsafe {
                let d = dst.ptr.add(i * dst.rs + 16 * v);
                let value = if add {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d), sum)
                } else {
                    sum
                };
                _mm512_mask_storeu_ps(d, mask, value);
            }
        }
    }
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
