//! Runs one convolution through the inference kernel (packed weight, bias and ReLU in
//! the write) many times, for profiling one layer shape alone (`perf record`): dense, or
//! with `SPATIAL=1` in the environment the spatial versatile layer of the same shape;
//! `POOL=1` pools the output 2 x 2 in the write; `FLUSH=1` reads 256 MiB between runs,
//! so that the layer starts from cold caches, as inside a network; `LAYOUT=nhwc` runs
//! the channels-last convolution ([`NhwcConv`]) instead, `LAYOUT=winograd` the
//! channels-last F(2 x 2, 3 x 3) one ([`WinogradConv`]).
//!
//! ```text
//! cargo run --release --example conv_steps -- IN OUT KERNEL SIDE [STRIDE=1] [BATCH=1] [RUNS=50]
//! ```

use std::process::ExitCode;
use std::time::Instant;

use versatile::layer::{ChannelMode, Geometry, GeometrySpec};
use versatile_kernels::nhwc::NhwcConv;
use versatile_kernels::tuning::Strategy;
use versatile_kernels::winograd::WinogradConv;
use versatile_kernels::{forward_packed, ConvPlan, Epilogue, PackedWeight};

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: usize| -> Result<usize, std::num::ParseIntError> {
        args.get(i).map_or(Ok(default), |s| s.parse())
    };
    let (cin, cout, kernel, side) = (arg(0, 512)?, arg(1, 512)?, arg(2, 3)?, arg(3, 14)?);
    let (stride, batch, runs) = (arg(4, 1)?, arg(5, 1)?, arg(6, 50)?.max(1));
    let pad = kernel / 2;
    let input = [batch, cin, side, side];
    let plan = if std::env::var("SPATIAL").is_ok_and(|v| v == "1") {
        Geometry::new(GeometrySpec {
            in_channels: cin,
            out_channels: cout,
            kernel_size: [kernel; 2],
            stride: [stride; 2],
            dilation: [1, 1],
            groups: 1,
            delta: 0,
            g: 1,
            mode: ChannelMode::Shared,
        })?
        .plan(input, [(pad, pad); 2])?
    } else {
        ConvPlan::dense(
            input,
            cout,
            [kernel; 2],
            [stride; 2],
            [1, 1],
            1,
            [(pad, pad); 2],
        )?
    };
    // TILE=columns and STRATEGY=im2col|shifted in the environment override the tile
    // width and the layout (for tuning runs).
    let mut tuning = plan.tuning();
    if let Some(columns) = std::env::var("TILE").ok().and_then(|t| t.parse().ok()) {
        tuning.tile_columns = Some(columns);
    }
    match std::env::var("STRATEGY").as_deref() {
        Ok("im2col") => tuning.strategy = Strategy::Im2col,
        Ok("shifted") => tuning.strategy = Strategy::Shifted,
        _ => {}
    }
    let plan = plan.with_tuning(tuning);
    let weight: Vec<f32> = (0..plan.weight_len())
        .map(|i| ((i * 7919) % 255) as f32 / 2550.0 - 0.05)
        .collect();
    let bias = vec![0.01f32; cout];
    let layout = std::env::var("LAYOUT").unwrap_or_default();
    let winograd = if layout == "winograd" {
        let conv = WinogradConv::new(&plan, &weight)
            .ok_or("this CPU or layer has no Winograd convolution")?;
        Some(conv)
    } else {
        None
    };
    let nhwc = if layout == "nhwc" {
        if std::env::var("POOL").is_ok_and(|v| v == "1") {
            return Err("a channels-last convolution does not pool in its write".into());
        }
        let conv = NhwcConv::new(&plan, &weight)
            .ok_or("this CPU or layer has no channels-last convolution")?;
        Some(conv)
    } else {
        None
    };
    let packed = PackedWeight::new(&plan, &weight);
    // The input's values in either layout: the time does not depend on them.
    let pass = |x: &[f32], epilogue: &Epilogue<'_, f32>, out: &mut [f32]| match (&nhwc, &winograd) {
        (Some(conv), _) => conv.forward(x, epilogue, out),
        (_, Some(conv)) => conv.forward(x, epilogue, out),
        (None, None) => forward_packed(&plan, x, &packed, epilogue, out),
    };
    let x: Vec<f32> = (0..plan.input_len())
        .map(|i| ((i * 104_729) % 255) as f32 / 255.0 - 0.5)
        .collect();
    let epilogue = Epilogue {
        shift: Some(&bias),
        relu: true,
        pool: std::env::var("POOL").is_ok_and(|v| v == "1"),
        ..Epilogue::default()
    };
    let mut out = vec![0.0f32; epilogue.output_len(&plan)];
    pass(&x, &epilogue, &mut out);
    let mut times = Vec::with_capacity(runs);
    // FLUSH=1: 256 MiB written once, then read (not written: no dirty lines to write
    // back during the timed run) before each run.
    let flush = vec![
        1u8;
        if std::env::var("FLUSH").is_ok() {
            256 << 20
        } else {
            0
        }
    ];
    let mut flushed = 0u64;
    for _ in 0..runs {
        flushed += flush.iter().step_by(64).map(|&v| u64::from(v)).sum::<u64>();
        let start = Instant::now();
        pass(&x, &epilogue, &mut out);
        times.push(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(flushed);
    times.sort_by(f64::total_cmp);
    let median = times[runs / 2];
    println!(
        "conv {cin}->{cout} {kernel}x{kernel}/{stride} {side}x{side} batch {batch}: median {:.3} ms (min {:.3}, max {:.3}), {:.1} GFLOP/s",
        median * 1e3,
        times[0] * 1e3,
        times[runs - 1] * 1e3,
        2.0 * plan.macs() as f64 / median / 1e9
    );
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
