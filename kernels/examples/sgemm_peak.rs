//! The two ceilings `versatile bench` quotes shares against, alone: the f32 FMA peak
//! (independent vector FMA chains on every thread) and the rate of the kernels' SGEMM on
//! a square product, on rayon's threads (`RAYON_NUM_THREADS`); and between them, the
//! micro-kernels alone on one thread (the packed one, and the channels-last
//! convolutions' indirect ones on one tap of 160 channels and on nine of 64).
//!
//! ```text
//! cargo run --release -p versatile-kernels --example sgemm_peak -- [SIZE=2048] [REPS=5]
//! ```

use versatile_kernels::{fma_peak_gflops, sgemm, sgemm_gflops, threads};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut number = |name: &str, default: usize| {
        args.next().map_or(default, |s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number, not {s:?}"))
        })
    };
    let (size, reps) = (number("SIZE", 2048), number("REPS", 5));
    let threads = threads();
    match fma_peak_gflops(20_000_000, 3) {
        Some(peak) => println!("f32 FMA peak on {threads} threads: {peak:.1} GFLOP/s"),
        None => println!("f32 FMA peak: this CPU has no vector FMA the probe times"),
    }
    if let Some(kernel) = sgemm::micro_kernel_gflops(200_000) {
        let name = sgemm::micro_kernel().unwrap_or("none");
        println!("the {name} micro-kernel alone, on L1 panels, one thread: {kernel:.1} GFLOP/s");
    }
    for (taps, kc) in [(1, 160), (9, 64)] {
        for (mr, nr, gflops) in sgemm::indirect_kernel_gflops(taps, kc, 2_000_000 / (taps * kc)) {
            println!(
                "the indirect {mr} x {nr} micro-kernel alone, {taps} tap(s) of {kc} channels, \
                 one thread: {gflops:.1} GFLOP/s"
            );
        }
    }
    let sgemm = sgemm_gflops(size, reps);
    println!("SGEMM {size}^3 on {threads} threads (median of {reps}): {sgemm:.1} GFLOP/s");
}
