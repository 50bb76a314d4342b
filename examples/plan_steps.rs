//! Runs a zoo model's compiled inference plan many times, for profiling
//! (`perf record`) and for timing it alone.
//!
//! ```text
//! cargo run --release --example plan_steps -- MODEL VARIANT [BATCH=1] [SIDE=224] [RUNS=20] [--profile]
//! ```
//!
//! With `--profile`, each step's median time and GFLOP/s follow the total.

use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::Device;
use versatile::infer::InferencePlan;
use versatile::models::ModelConfig;

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let profile = args.iter().any(|a| a == "--profile");
    let args: Vec<String> = args.iter().filter(|a| *a != "--profile").cloned().collect();
    let model_name = args.first().map_or("resnet50", String::as_str);
    let variant = args.get(1).map_or("dense", String::as_str);
    let batch: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let side: usize = args.get(3).map_or(Ok(224), |s| s.parse())?;
    let runs: usize = args.get(4).map_or(Ok(20), |s| s.parse())?;
    let model = ModelConfig::parse(model_name, variant)?.init(&Device::flex())?;
    let mut plan = InferencePlan::compile(&model, [batch, 3, side, side])?;
    let image: Vec<f32> = (0..batch * 3 * side * side)
        .map(|i| ((i * 7919) % 255) as f32 / 255.0 - 0.5)
        .collect();
    plan.run(&image)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        plan.run(&image)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{model_name} {variant} batch {batch} {side}x{side}: median {:.1} ms (min {:.1}, max {:.1}) over {runs} runs",
        times[runs / 2],
        times[0],
        times[runs - 1]
    );
    if profile {
        let steps = plan.profile(&image, runs)?;
        let total: f64 = steps.iter().map(|s| s.seconds).sum();
        for step in steps {
            let gflops = 2.0 * step.macs as f64 / step.seconds / 1e9;
            println!(
                "{:7.2} ms {:5.1} % {:6.1} GFLOP/s  {}",
                step.seconds * 1e3,
                100.0 * step.seconds / total,
                gflops,
                step.name
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
