//! The AVX2 + FMA micro-kernel: a 6 x 16 tile of `dst` in 12 ymm accumulators; per `k`,
//! two loads of `rhs` and six broadcasts of `lhs` feed twelve fused multiply-adds.

use std::arch::x86_64::*;

use super::Micro;

/// Rows of the tile.
const MR: usize = 6;
/// Columns of the tile (two vectors).
const NR: usize = 16;

pub(super) const MICRO: Micro = Micro {
    kernel: entry,
    mr: MR,
    nr: NR,
};

/// # Safety
/// The [`super::Kernel`] contract, on a CPU with AVX2 and FMA ([`super::detect`] picks
/// this kernel only there).
unsafe fn entry(kc: usize, a: *const f32, b: *const f32, dst: *mut f32, rs: usize, add: bool) {
    // SAFETY: forwarded; the CPU has AVX2 and FMA.
    unsafe { kernel(kc, a, b, dst, rs, add) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, dst: *mut f32, rs: usize, add: bool) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for p in 0..kc {
        // SAFETY: p < kc, so a[p * MR..][..MR] and b[p * NR..][..NR] are in the panels.
        unsafe {
            let b0 = _mm256_loadu_ps(b.add(p * NR));
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            let a = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_set1_ps(*a.add(i));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: dst + i * rs + [0, 16) is in the tile the contract grants.
        unsafe {
            let d = dst.add(i * rs);
            let (mut v0, mut v1) = (row[0], row[1]);
            if add {
                v0 = _mm256_add_ps(_mm256_loadu_ps(d), v0);
                v1 = _mm256_add_ps(_mm256_loadu_ps(d.add(8)), v1);
            }
            _mm256_storeu_ps(d, v0);
            _mm256_storeu_ps(d.add(8), v1);
        }
    }
}
