//! The AVX2 + FMA micro-kernel: a 6 x 16 tile of `dst` in 12 ymm accumulators; per `k`,
//! two loads of `rhs` and six broadcasts of `lhs` feed twelve fused multiply-adds. The
//! indirect kernel (channels-last convolutions) has the same tile, its rows read in
//! place.

use std::arch::x86_64::*;

use super::{Indirect, Micro, Tile, TileFinish};

/// Rows of the tile.
const MR: usize = 6;
/// Columns of the tile (two vectors).
const NR: usize = 16;

pub(super) const MICRO: Micro = Micro {
    name: "avx2",
    kernel: entry,
    direct: None,
    indirect: &[Indirect {
        kernel: indirect_entry,
        mr: MR,
        nr: NR,
    }],
    mr: MR,
    nr: NR,
};

/// # Safety
/// The [`super::Kernel`] contract, on a CPU with AVX2 and FMA ([`super::detect`] picks
/// this kernel only there).
unsafe fn entry(kc: usize, a: *const f32, b: *const f32, dst: Tile, add: bool) {
    // SAFETY: forwarded; the CPU has AVX2 and FMA.
    unsafe { kernel(kc, a, b, dst, add) }
}

/// # Safety
/// The [`super::IndirectKernel`] contract, on a CPU with AVX2 and FMA ([`super::detect`]
/// picks this kernel only there).
unsafe fn indirect_entry(
    kc: usize,
    taps: usize,
    rows: (*const *const f32, usize),
    b: (*const f32, *const f32),
    dst: Tile,
    add: bool,
    finish: Option<TileFinish>,
) {
    // SAFETY: forwarded; the CPU has AVX2 and FMA.
    unsafe { indirect(kc, taps, rows, b, dst, add, finish) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn indirect(
    kc: usize,
    taps: usize,
    rows: (*const *const f32, usize),
    b: (*const f32, *const f32),
    dst: Tile,
    add: bool,
    finish: Option<TileFinish>,
) {
    // SAFETY: forwarded (the panel holds taps * kc * NR values, zero past the tile's
    // columns, so its loads need no masks).
    unsafe {
        if dst.cols <= 8 {
            indirect_tile::<1>(kc, taps, rows, b, dst, add, finish)
        } else {
            indirect_tile::<2>(kc, taps, rows, b, dst, add, finish)
        }
    }
}

/// The indirect kernel's tile over its first `VECTORS` vectors of 8 columns: tap by tap,
/// the tap's `MR` rows read in place for `kc` steps, all into the same accumulators.
///
/// # Safety
/// The [`super::IndirectKernel`] contract, with `dst.cols <= 8 * VECTORS`, on a CPU with
/// AVX2 and FMA.
#[inline(always)]
unsafe fn indirect_tile<const VECTORS: usize>(
    kc: usize,
    taps: usize,
    (rows, offset): (*const *const f32, usize),
    (b, ahead): (*const f32, *const f32),
    dst: Tile,
    add: bool,
    finish: Option<TileFinish>,
) {
    let mut acc = [[_mm256_setzero_ps(); VECTORS]; MR];
    for tap in 0..taps {
        // SAFETY: tap < taps: the contract grants its MR row pointers, each valid for
        // offset + kc values, and its kc * NR panel values; p < kc reads inside both.
        unsafe {
            let tap_rows = std::ptr::read(rows.add(tap * MR).cast::<[*const f32; MR]>())
                .map(|row| row.add(offset));
            let b = b.add(tap * kc * NR);
            let ahead = ahead.wrapping_add(tap * kc * NR);
            for p in 0..kc {
                // One line of `ahead` per step on its way to L2 (a prefetch never faults).
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(p * NR).cast());
                let mut bv = [_mm256_setzero_ps(); VECTORS];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = _mm256_loadu_ps(b.add(p * NR + 8 * v));
                }
                for (row, sums) in tap_rows.iter().zip(acc.iter_mut()) {
                    let ai = _mm256_set1_ps(*row.add(p));
                    for (sum, &bv) in sums.iter_mut().zip(&bv) {
                        *sum = _mm256_fmadd_ps(ai, bv, *sum);
                    }
                }
            }
        }
    }
    // SAFETY: forwarded (the caller's promise on the tile and on `finish`).
    unsafe { store(acc, dst, add, finish) };
}

/// Lanes of vector `v` (8 columns from `8 * v`) inside a tile's first `cols` columns: a
/// lane's mask is its sign bit; masked lanes are neither read nor written.
#[target_feature(enable = "avx2")]
fn lanes(cols: usize, v: usize) -> __m256i {
    let n = cols.saturating_sub(8 * v).min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// Stores the tile's accumulators, added to what the tile holds where `add`, through
/// `finish` where given (the same operations, in the same order, as
/// `Epilogue::apply`). A function of its own, as the AVX-512 kernel's: inlined into the
/// multiply-add loop, the compiler kept the accumulators in memory.
///
/// # Safety
/// The tile's `rows x cols` values are valid (rows `dst.rs` apart), and so are
/// `finish`'s pointers, where not null, for them; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn store<const VECTORS: usize>(
    acc: [[__m256; VECTORS]; MR],
    dst: Tile,
    add: bool,
    finish: Option<TileFinish>,
) {
    let masks: [__m256i; VECTORS] = std::array::from_fn(|v| lanes(dst.cols, v));
    for (i, row) in acc.iter().enumerate().take(dst.rows) {
        for (v, (&sum, &mask)) in row.iter().zip(&masks).enumerate() {
            // SAFETY: the lanes of dst.ptr + i * dst.rs + [0, cols) for i < rows are in
            // the tile the contract grants (cols <= 8 * VECTORS), and finish's pointers
            // valid for its columns (its residual for its rows); the masks keep every
            // access among them.
            unsafe {
                let d = dst.ptr.add(i * dst.rs + 8 * v);
                let mut value = if add {
                    _mm256_add_ps(_mm256_maskload_ps(d, mask), sum)
                } else {
                    sum
                };
                if let Some(finish) = finish {
                    let column = 8 * v;
                    if !finish.scale.is_null() {
                        let scale = _mm256_maskload_ps(finish.scale.add(column), mask);
                        value = _mm256_mul_ps(value, scale);
                    }
                    if !finish.shift.is_null() {
                        let shift = _mm256_maskload_ps(finish.shift.add(column), mask);
                        value = _mm256_add_ps(value, shift);
                    }
                    if !finish.residual.is_null() {
                        let r = finish.residual.add(i * dst.rs + column);
                        value = _mm256_add_ps(value, _mm256_maskload_ps(r, mask));
                    }
                    if finish.relu {
                        // y <= 0 becomes +0 (a NaN compares false and stays).
                        let zero = _mm256_setzero_ps();
                        let negative = _mm256_cmp_ps::<_CMP_LE_OQ>(value, zero);
                        value = _mm256_blendv_ps(value, zero, negative);
                    }
                }
                _mm256_maskstore_ps(d, mask, value);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, dst: Tile, add: bool) {
    // SAFETY: forwarded (the panels hold kc * MR and kc * NR values).
    unsafe {
        if dst.cols <= 8 {
            tile::<1>(kc, a, b, dst, add)
        } else {
            tile::<2>(kc, a, b, dst, add)
        }
    }
}

/// The tile's products over its first `VECTORS` vectors of 8 columns. A tile of at most 8
/// columns (the ragged edge of a 7 x 7 map's 49 columns) runs on one vector and half the
/// multiply-adds; each value's sum is the same either way.
///
/// # Safety
/// The [`super::Kernel`] contract, with `dst.cols <= 8 * VECTORS`, on a CPU with AVX2 and
/// FMA.
#[inline(always)]
unsafe fn tile<const VECTORS: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    dst: Tile,
    add: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); VECTORS]; MR];
    for p in 0..kc {
        // SAFETY: p < kc, so a[p * MR..][..MR] and b[p * NR..][..NR] are in the panels.
        unsafe {
            let mut bv = [_mm256_setzero_ps(); VECTORS];
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = _mm256_loadu_ps(b.add(p * NR + 8 * v));
            }
            // The next lhs panel on its way to L1 (as in the AVX-512 kernel).
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(kc * MR + p * MR).cast());
            let a = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_set1_ps(*a.add(i));
                for (sum, &bv) in row.iter_mut().zip(&bv) {
                    *sum = _mm256_fmadd_ps(ai, bv, *sum);
                }
            }
        }
    }
    // SAFETY: AVX2 (the caller's promise).
    let masks: [__m256i; VECTORS] = std::array::from_fn(|v| unsafe { lanes(dst.cols, v) });
    for (i, row) in acc.iter().enumerate().take(dst.rows) {
        for (v, (&sum, &mask)) in row.iter().zip(&masks).enumerate() {
            // SAFETY: the lanes of dst.ptr + i * dst.rs + [0, cols) for i < rows are in
            // the tile the contract grants (cols <= 8 * VECTORS); the mask keeps every
            // access among them.
            unsafe {
                let d = dst.ptr.add(i * dst.rs + 8 * v);
                let value = if add {
                    _mm256_add_ps(_mm256_maskload_ps(d, mask), sum)
                } else {
                    sum
                };
                _mm256_maskstore_ps(d, mask, value);
            }
        }
    }
}

/// `out[p * width + i] = x[i * rs + p]` for `i < width` (a multiple of 8) and `p` below
/// the returned count (`kc` rounded down to 8), in 8 x 8 blocks of AVX shuffles; the
/// caller copies the rest.
///
/// # Safety
/// The CPU must have AVX; `x + i * rs + p` must be valid for `i < width`, `p < kc`, and
/// `out` for `kc * width` values.
#[target_feature(enable = "avx")]
pub(super) unsafe fn transpose_rows(
    x: *const f32,
    rs: usize,
    [width, kc]: [usize; 2],
    out: *mut f32,
) -> usize {
    let blocks = kc / 8 * 8;
    for i0 in (0..width).step_by(8) {
        for p0 in (0..blocks).step_by(8) {
            // SAFETY: rows i0..i0 + 8 <= width and columns p0..p0 + 8 <= kc are inside x;
            // the stores write out[(p0 + j) * width + i0..][..8], inside kc * width.
            unsafe {
                let row = |r: usize| _mm256_loadu_ps(x.add((i0 + r) * rs + p0));
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                let (r4, r5, r6, r7) = (row(4), row(5), row(6), row(7));
                let t0 = _mm256_unpacklo_ps(r0, r1);
                let t1 = _mm256_unpackhi_ps(r0, r1);
                let t2 = _mm256_unpacklo_ps(r2, r3);
                let t3 = _mm256_unpackhi_ps(r2, r3);
                let t4 = _mm256_unpacklo_ps(r4, r5);
                let t5 = _mm256_unpackhi_ps(r4, r5);
                let t6 = _mm256_unpacklo_ps(r6, r7);
                let t7 = _mm256_unpackhi_ps(r6, r7);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let column = |j: usize| out.add((p0 + j) * width + i0);
                _mm256_storeu_ps(column(0), _mm256_permute2f128_ps::<0x20>(u0, u4));
                _mm256_storeu_ps(column(1), _mm256_permute2f128_ps::<0x20>(u1, u5));
                _mm256_storeu_ps(column(2), _mm256_permute2f128_ps::<0x20>(u2, u6));
                _mm256_storeu_ps(column(3), _mm256_permute2f128_ps::<0x20>(u3, u7));
                _mm256_storeu_ps(column(4), _mm256_permute2f128_ps::<0x31>(u0, u4));
                _mm256_storeu_ps(column(5), _mm256_permute2f128_ps::<0x31>(u1, u5));
                _mm256_storeu_ps(column(6), _mm256_permute2f128_ps::<0x31>(u2, u6));
                _mm256_storeu_ps(column(7), _mm256_permute2f128_ps::<0x31>(u3, u7));
            }
        }
    }
    blocks
}
