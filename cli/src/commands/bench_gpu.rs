//! `versatile bench --device wgpu|cuda`: the layers and models of `versatile bench` on a
//! GPU. Layers: the nested GPU kernel (`fused`), the dense form and burn's conv2d,
//! forward and forward+backward. Models (`--model`): inference and a training step
//! (forward, backward) on the nested kernel and on the dense form. Every timed run ends
//! with `Device::sync`, so the time is the GPU's, not the time to queue the work.

use anyhow::Result;
use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use serde_json::json;
use versatile::cost;
use versatile::layer::{pin_auto_path, ForwardPath};
use versatile::models::ImageClassifier;

use super::bench::{
    default_shapes, load_average, median_ms, model_and_input, BenchArgs, BenchShape, Impl, Layer,
    Timing,
};
use super::UsageError;

/// Waits for the device's queued work.
fn sync(device: &Device) -> Result<()> {
    device
        .sync()
        .map_err(|e| anyhow::anyhow!("the device failed: {e:?}"))
}

/// Runs `versatile bench` on `device` (a GPU).
pub fn run(args: &BenchArgs, device: &Device) -> Result<()> {
    if let Some(name) = &args.model {
        return run_model(name, args, device);
    }
    let shapes = if args.shapes.is_empty() {
        default_shapes()
    } else {
        args.shapes.clone()
    };
    if !args.json {
        println!(
            "device {device:?}; medians of {} runs after {} warm-up",
            args.reps, args.warmup
        );
        println!("load average at start: {}", load_average());
        println!();
        println!(
            "{:<6} {:<28} {:<11} {:>9} {:>9} {:>9}",
            "shape", "N,C,OUT,H,W,D,PAD,S,DELTA,G", "impl", "fwd ms", "fwd+bwd", "GFLOP/s"
        );
    }
    for shape in &shapes {
        let geometry = shape
            .vconv_config()
            .geometry()
            .map_err(UsageError::from_display)?;
        let out = shape
            .vconv_config()
            .init(&Device::flex())
            .output_shape(shape.dims())
            .map_err(UsageError::from_display)?;
        let layer_cost = cost::vconv2d(&geometry, true, [out[2], out[3]]);
        let macs_nested = layer_cost.macs_nested * shape.batch as u64;
        for &imp in &args.impls {
            if imp == Impl::Conv2dNested {
                // The one-ring kernel for dense layers is the CPU's.
                continue;
            }
            let (fwd, fwd_bwd) = time_layer(shape, imp, args, device)?;
            let gflops = 6.0 * macs_nested as f64 / (fwd_bwd.median_ms * 1e-3) / 1e9;
            if args.json {
                println!(
                    "{}",
                    json!({
                        "shape": shape.name,
                        "spec": shape.spec(),
                        "impl": imp.name(),
                        "device": format!("{device:?}"),
                        "fwd_ms": fwd.median_ms,
                        "fwd_bwd_ms": fwd_bwd.median_ms,
                        "macs_nested": macs_nested,
                        "macs_dense": layer_cost.macs_dense * shape.batch as u64,
                        "gflops_nested": gflops,
                    })
                );
            } else {
                println!(
                    "{:<6} {:<28} {:<11} {:>9.3} {:>9.3} {:>9.1}",
                    shape.label(),
                    shape.spec(),
                    imp.name(),
                    fwd.median_ms,
                    fwd_bwd.median_ms,
                    gflops
                );
            }
        }
    }
    Ok(())
}

/// Forward and forward+backward timings of one layer implementation on `device`.
fn time_layer(
    shape: &BenchShape,
    imp: Impl,
    args: &BenchArgs,
    device: &Device,
) -> Result<(Timing, Timing)> {
    let layer = Layer::new(shape, imp, device)?;
    let x = Tensor::<4>::random(shape.dims(), Distribution::Default, device);
    let fwd = median_ms(args.warmup, args.reps, || {
        layer.forward(x.clone())?;
        sync(device)
    })?;
    let autodiff = device.clone().autodiff();
    let layer = Layer::new(shape, imp, &autodiff)?;
    let x = Tensor::<4>::random(shape.dims(), Distribution::Default, &autodiff).require_grad();
    let fwd_bwd = median_ms(args.warmup, args.reps, || {
        let grads = layer.forward(x.clone())?.backward();
        anyhow::ensure!(x.grad(&grads).is_some(), "no input gradient");
        sync(&autodiff)
    })?;
    Ok((fwd, fwd_bwd))
}

/// `--model` on a GPU: inference (eval forward) and a training step (forward, backward)
/// of the model, on the nested kernel and on the dense form.
fn run_model(name: &str, args: &BenchArgs, device: &Device) -> Result<()> {
    let (config, shape) = model_and_input(name, args)?;
    let [h, w] = [shape[2], shape[3]];
    let report = config.cost_report([h, w])?;
    let macs = report.total().macs_nested * args.batch as u64;
    let autodiff = device.clone().autodiff();
    let model = config.init(&autodiff)?;
    let eval_model = model.valid();
    let x = Tensor::<4>::random(shape, Distribution::Uniform(-1.0, 1.0), device);
    let x_train = x.clone().to_device(&autodiff);
    if !args.json {
        println!(
            "{} {} on {shape:?}, device {device:?}, {:.2} G multiply-adds per forward (nested)",
            config.name(),
            config.variant,
            macs as f64 / 1e9
        );
        println!(
            "{:<10} {:<11} {:>10} {:>10}",
            "pass", "path", "ms", "images/s"
        );
    }
    for path in [ForwardPath::Fused, ForwardPath::DenseForm] {
        let _pin = pin_auto_path(path);
        let inference = median_ms(args.warmup, args.reps, || {
            let _ = eval_model.try_forward(x.clone())?;
            sync(device)
        })?;
        let step = median_ms(args.warmup, args.reps, || {
            let logits = model.try_forward(x_train.clone())?;
            let _grads = logits.sum().backward();
            sync(&autodiff)
        })?;
        for (pass, t, flops) in [
            ("inference", &inference, 2.0 * macs as f64),
            ("train step", &step, 6.0 * macs as f64),
        ] {
            let images = args.batch as f64 / (t.median_ms * 1e-3);
            if args.json {
                println!(
                    "{}",
                    json!({
                        "model": config.name(),
                        "variant": config.variant.to_string(),
                        "input": shape,
                        "device": format!("{device:?}"),
                        "pass": pass,
                        "path": path.to_string(),
                        "ms": t.median_ms,
                        "images_per_s": images,
                        "gflops_nested": flops / (t.median_ms * 1e-3) / 1e9,
                    })
                );
            } else {
                println!(
                    "{pass:<10} {:<11} {:>10.2} {images:>10.1}",
                    path.to_string(),
                    t.median_ms
                );
            }
        }
    }
    Ok(())
}
