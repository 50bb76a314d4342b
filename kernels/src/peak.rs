//! The machine's f32 fused multiply-add peak: every thread of rayon's pool runs
//! independent chains of the widest vector FMA the CPU has, at the same time.
//!
//! This is the ceiling a share of the peak is quoted against. [`crate::sgemm_gflops`]
//! (a large SGEMM) is lower by the packing and the memory traffic around its
//! micro-kernel: 83–87 % of this on a Zen 4, 74–79 % on a Xeon of family 6 model 207
//! (two 512-bit FMA units per core), measured.

use std::time::Instant;

/// Independent accumulator chains per thread: above latency (4–5 cycles) times FMA
/// units (2) on every current x86 core, within the 16 vector registers of AVX2.
const CHAINS: usize = 12;

/// The f32 FMA peak of this machine on all of rayon's threads, in GFLOP/s (2 per
/// multiply-add): the best of `reps` (at least 1) timings of `iterations` rounds of
/// `CHAINS` (12) independent vector FMAs per thread, all threads at once. `None` where the
/// CPU has neither AVX-512F nor AVX2 + FMA (no vector FMA to time).
///
/// The best timing, not the median: a slow run is the VM's neighbours, not the CPU.
pub fn fma_peak_gflops(iterations: usize, reps: usize) -> Option<f64> {
    let (lanes, chains_of) = vector_fma()?;
    let threads = crate::threads();
    let best = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            let sums = rayon::broadcast(|_| chains_of(iterations));
            let seconds = start.elapsed().as_secs_f64();
            std::hint::black_box(sums);
            seconds
        })
        .fold(f64::INFINITY, f64::min);
    // In f64, so that no count of iterations overflows.
    let flops = 2.0 * threads as f64 * iterations as f64 * (CHAINS * lanes) as f64;
    Some(flops / best / 1e9)
}

/// The lanes of a vector FMA and the function that runs [`CHAINS`] chains of it for a
/// number of iterations.
type VectorFma = (usize, fn(usize) -> f32);

/// The widest vector FMA of this CPU, or AVX2's where the micro-kernels were held to
/// AVX2 (`VERSATILE_SGEMM=avx2`: the peak of the machine that setting stands for).
#[cfg(target_arch = "x86_64")]
fn vector_fma() -> Option<VectorFma> {
    if is_x86_feature_detected!("avx512f") && crate::sgemm::micro_kernel() != Some("avx2") {
        Some((16, |n| {
            // SAFETY: this function pointer is handed out only here, after the check
            // that the CPU has AVX-512F.
            unsafe { chains_avx512(n) }
        }))
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Some((8, |n| {
            // SAFETY: handed out only here, after the check that the CPU has AVX2 and
            // FMA.
            unsafe { chains_avx2(n) }
        }))
    } else {
        None
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn vector_fma() -> Option<VectorFma> {
    None
}

/// `iterations` rounds of [`CHAINS`] independent 16-lane FMAs; returns a value that
/// depends on every chain, so none is optimized away.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains_avx512(iterations: usize) -> f32 {
    use std::arch::x86_64::*;
    let scale = _mm512_set1_ps(std::hint::black_box(0.999_9));
    let shift = _mm512_set1_ps(std::hint::black_box(1e-5));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..iterations {
        for sum in &mut acc {
            *sum = _mm512_fmadd_ps(*sum, scale, shift);
        }
    }
    acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
}

/// As [`chains_avx512`] on 8-lane AVX2 vectors.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains_avx2(iterations: usize) -> f32 {
    use std::arch::x86_64::*;
    let scale = _mm256_set1_ps(std::hint::black_box(0.999_9));
    let shift = _mm256_set1_ps(std::hint::black_box(1e-5));
    let mut acc = [_mm256_setzero_ps(); CHAINS];
    for _ in 0..iterations {
        for sum in &mut acc {
            *sum = _mm256_fmadd_ps(*sum, scale, shift);
        }
    }
    let mut total = 0.0;
    for v in acc {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds the 8 values an unaligned store writes.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        total += lanes.iter().sum::<f32>();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chains_compute_the_recurrence() {
        // Each lane runs x <- x * 0.9999 + 1e-5 from 0; the probe's result is the sum
        // over chains and lanes, so a miscompiled or skipped loop shows in the value.
        let Some((lanes, chains_of)) = vector_fma() else {
            return;
        };
        let iterations = 1000;
        let mut lane = 0.0f32;
        for _ in 0..iterations {
            lane = lane.mul_add(0.999_9, 1e-5);
        }
        let expected = lane * (lanes * CHAINS) as f32;
        let got = chains_of(iterations);
        assert!(
            (got - expected).abs() <= 1e-5 * expected.abs(),
            "{got} against {expected}"
        );
        assert!(fma_peak_gflops(1000, 1).is_some_and(|g| g.is_finite() && g > 0.0));
    }
}
