//! The register tile of an AVX-512 SGEMM micro-kernel, alone: `MR` broadcast rows by
//! `16 * V` vector columns, `kc` steps of the same form as `sgemm`'s kernel (the `rhs`
//! row's `V` vectors loaded, then one broadcast of `lhs` and `V` fused multiply-adds per
//! row) on panels that stay in L1, one thread. No packing, no memory traffic: how close
//! each tile shape gets to the FMA peak by its instruction mix alone. (Why `sgemm` runs
//! 8 x 48; BENCHMARKS.md, "The micro-kernel's tile".)
//!
//! ```text
//! cargo run --release -p versatile-kernels --example micro_kernel_shapes -- [ROUNDS=2]
//! ```

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::time::Instant;

/// `dst[MR x 16V] += lhs panel * rhs panel` over `kc` steps, the sums in registers.
///
/// # Safety
/// The CPU has AVX-512F; `a` holds `kc * MR` values, `b` holds `kc * 16 * V`, `dst` holds
/// `MR * 16 * V`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const MR: usize, const V: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    dst: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; MR];
    for p in 0..kc {
        // SAFETY: p < kc, so row p of both panels is inside them (the caller's sizes).
        unsafe {
            let row = b.add(p * 16 * V);
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = _mm512_loadu_ps(row.add(16 * v));
            }
            let column = a.add(p * MR);
            for (i, sums) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*column.add(i));
                for (sum, &bv) in sums.iter_mut().zip(&bv) {
                    *sum = _mm512_fmadd_ps(ai, bv, *sum);
                }
            }
        }
    }
    for (i, sums) in acc.iter().enumerate() {
        for (v, &sum) in sums.iter().enumerate() {
            // SAFETY: (i * V + v) * 16 + 16 <= MR * 16 * V values of dst.
            unsafe {
                let d = dst.add((i * V + v) * 16);
                _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), sum));
            }
        }
    }
}

/// A tile's rate: GFLOP/s of `(kc, reps)`.
#[cfg(target_arch = "x86_64")]
type Rate = fn(usize, usize) -> f64;

/// GFLOP/s of the `MR x 16V` tile over `kc` steps, `reps` calls.
#[cfg(target_arch = "x86_64")]
fn rate<const MR: usize, const V: usize>(kc: usize, reps: usize) -> f64 {
    let a = vec![0.5f32; kc * MR];
    let b = vec![0.25f32; kc * 16 * V];
    let mut dst = vec![0f32; MR * 16 * V];
    let start = Instant::now();
    for _ in 0..reps {
        // SAFETY: main checked AVX-512F; the three buffers have the sizes `tile` reads.
        unsafe { tile::<MR, V>(kc, a.as_ptr(), b.as_ptr(), dst.as_mut_ptr()) }
    }
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    2.0 * (kc * MR * 16 * V * reps) as f64 / seconds / 1e9
}

#[cfg(target_arch = "x86_64")]
fn main() {
    if !is_x86_feature_detected!("avx512f") {
        println!("this CPU has no AVX-512F");
        return;
    }
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(2, |s| s.parse().expect("ROUNDS must be a number"));
    let Some(peak) = versatile_kernels::fma_peak_gflops(20_000_000, 3) else {
        println!("this CPU has no vector FMA the probe times");
        return;
    };
    println!("f32 FMA peak on one thread: {peak:.1} GFLOP/s");
    // kc keeps each rhs panel at 24-32 KiB, in L1 beside its lhs panel.
    let shapes: [(&str, usize, Rate); 6] = [
        ("8 x 32", 256, rate::<8, 2>),
        ("8 x 48", 160, rate::<8, 3>),
        ("12 x 32", 256, rate::<12, 2>),
        ("14 x 32", 256, rate::<14, 2>),
        ("6 x 64", 128, rate::<6, 4>),
        ("4 x 64", 128, rate::<4, 4>),
    ];
    for round in 0..rounds {
        for (name, kc, rate) in shapes {
            let gflops = rate(kc, 100_000);
            println!(
                "round {round}: {name:>7} tile, kc {kc}: {gflops:6.1} GFLOP/s, {:.0} % of the peak",
                100.0 * gflops / peak
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("an x86-64 benchmark");
}
