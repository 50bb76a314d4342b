//! The AVX2 + FMA micro-kernel: a 6 x 16 tile of `dst` in 12 ymm accumulators; per `k`,
//! two loads of `rhs` and six broadcasts of `lhs` feed twelve fused multiply-adds.

use std::arch::x86_64::*;

use super::{Micro, Tile};

/// Rows of the tile.
const MR: usize = 6;
/// Columns of the tile (two vectors).
const NR: usize = 16;

pub(super) const MICRO: Micro = Micro {
    name: "avx2",
    kernel: entry,
    direct: None,
    indirect: &[],
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
    // Lanes of the vectors inside the tile's `cols` columns (a lane's mask is its sign
    // bit; masked lanes are neither read nor written).
    let lanes = |first: usize| -> __m256i {
        let n = dst.cols.saturating_sub(first).min(8) as i32;
        // SAFETY: AVX2 (the caller's promise).
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    };
    let masks: [__m256i; VECTORS] = std::array::from_fn(|v| lanes(8 * v));
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
