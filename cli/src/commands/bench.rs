//! `versatile bench`: times the fused versatile layer, its dense form and burn's dense
//! conv2d (forward, forward+backward) on the CPU, against the machine's measured FMA peak;
//! with `--device wgpu|cuda`, the same layers and models on a GPU ([`super::bench_gpu`]).

use std::time::Instant;
use versatile::kernels::alloc::{heap_in_use, heap_peak, reset_heap_peak};

use anyhow::Result;
use burn::nn::conv::Conv2dConfig;
use burn::nn::PaddingConfig2d;
use burn::tensor::{Device, Distribution, Tensor};
use clap::{Args, ValueEnum};
use serde_json::json;
use versatile::checkpoint::onnx::{export_onnx_as, OnnxForm};
use versatile::cost;
use versatile::infer::InferencePlan;
use versatile::kernels;
use versatile::layer::{conv2d_forward, conv_path_for, ConvPath, ForwardPath, VConv2dConfig};
use versatile::models::{ImageClassifier, ModelConfig};
use versatile::train::{self, DeviceChoice};

use super::train::train_error;
use super::UsageError;

/// Arguments of `versatile bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A layer shape `N,C,OUT,H,W,D,PAD[,STRIDE,DELTA,G]` (batch, in and out channels,
    /// square input side or H,W given as H then W, kernel, padding; stride 1, delta 0 and
    /// g 1 by default). Repeatable; without it, the default set S1..S6 and S1 with delta 1.
    #[arg(long = "shape", value_name = "N,C,OUT,H,W,D,PAD[,STRIDE,DELTA,G]", value_parser = parse_shape)]
    pub(super) shapes: Vec<BenchShape>,
    /// Implementations to time, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "fused,dense_form,conv2d")]
    pub(super) impls: Vec<Impl>,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub(super) warmup: usize,
    /// Timed runs (the median is reported); 3 when one run takes over 2 seconds.
    #[arg(long, default_value_t = 9)]
    pub(super) reps: usize,
    /// Side of the square SGEMM whose rate is the "SGEMM peak" (0: skip it and the f32
    /// FMA peak, which independent vector FMA chains on every thread measure).
    #[arg(long, default_value_t = 2048)]
    pub(super) peak_size: usize,
    /// Also measure the peak heap in use during one forward+backward.
    #[arg(long)]
    pub(super) memory: bool,
    /// How the kernels use the threads: `tasks` (each thread takes its own columns or
    /// images, the default) or `gemm` (one task, gemm splits each product).
    #[arg(long, default_value = "tasks")]
    split: Split,
    /// One JSON object per row (JSON lines) instead of a table.
    #[arg(long)]
    pub(super) json: bool,
    /// Time a whole model instead of layers: inference on the compiled plan
    /// (`versatile::infer`) and on burn's module forward, and a training step (forward
    /// and backward of the model in training); random weights.
    #[arg(long, value_name = "NAME")]
    pub(super) model: Option<String>,
    /// The model's variant (with `--model`).
    #[arg(long, default_value = "dense")]
    pub(super) variant: String,
    /// Images per run (with `--model`).
    #[arg(long, default_value_t = 1)]
    pub(super) batch: usize,
    /// Input `HxW` (with `--model`; default: the model's own input side).
    #[arg(long, value_name = "HxW", value_parser = parse_hw)]
    pub(super) input: Option<[usize; 2]>,
    /// Input channels (with `--model`; default: the model's).
    #[arg(long)]
    pub(super) in_channels: Option<usize>,
    /// Time the compiled plan only, not burn's module forward or a training step (with
    /// `--model`): `benches/infer_side_by_side.sh` times the plan again after the
    /// runtimes, so that drift between the two timings shows and averages out.
    #[arg(long)]
    pub(super) plan_only: bool,
    /// Also write the timed model's dense form as ONNX here (with `--model`), for the
    /// runtimes `benches/infer_reference.py` times on the same weights.
    #[arg(long, value_name = "FILE")]
    pub(super) onnx: Option<std::path::PathBuf>,
    /// Also write its versatile-form ONNX here (with `--model`; see `export --form`).
    #[arg(long, value_name = "FILE")]
    pub(super) onnx_versatile: Option<std::path::PathBuf>,
    /// Device: cpu, or a GPU (wgpu, cuda: the cargo feature of that name), where the
    /// layers run their nested GPU kernel against the dense form and burn's conv2d, and
    /// `--model` times inference and a training step on both paths.
    #[arg(long, default_value = "cpu", value_parser = |s: &str| s.parse::<DeviceChoice>())]
    pub(super) device: DeviceChoice,
}

/// Parses `HxW` (or a single side).
fn parse_hw(text: &str) -> Result<[usize; 2], String> {
    let sides: Vec<&str> = text.split(['x', 'X']).collect();
    let parse = |s: &str| {
        s.trim()
            .parse::<usize>()
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| format!("`{text}` is not HxW with positive sides"))
    };
    match sides.as_slice() {
        [side] => parse(side).map(|v| [v, v]),
        [h, w] => Ok([parse(h)?, parse(w)?]),
        _ => Err(format!("`{text}` is not HxW")),
    }
}

/// How the kernels use the threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Split {
    /// Parallel tasks over columns or images.
    Tasks,
    /// One task; gemm's own parallelism.
    Gemm,
}

/// One implementation of the layer's computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[allow(clippy::enum_variant_names)]
pub(super) enum Impl {
    /// VConv2d through the fused nested-ring kernel.
    #[value(name = "fused")]
    Fused,
    /// VConv2d through its dense form (unfolded weight, burn's conv2d).
    #[value(name = "dense_form")]
    DenseForm,
    /// burn's dense conv2d with the same c -> n (its own weights).
    #[value(name = "conv2d")]
    Conv2d,
    /// The same dense conv2d through the project's one-ring nested kernel
    /// (`conv2d_forward` pinned to `ConvPath::Nested`).
    #[value(name = "conv2d_nested")]
    Conv2dNested,
}

impl Impl {
    pub(super) fn name(self) -> &'static str {
        match self {
            Impl::Fused => "fused",
            Impl::DenseForm => "dense_form",
            Impl::Conv2d => "conv2d",
            Impl::Conv2dNested => "conv2d_nested",
        }
    }
}

/// A benchmarked layer shape.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct BenchShape {
    pub(super) name: String,
    pub(super) batch: usize,
    pub(super) channels: [usize; 2],
    pub(super) input: [usize; 2],
    pub(super) kernel: usize,
    pub(super) padding: usize,
    pub(super) stride: usize,
    pub(super) delta: usize,
    pub(super) g: usize,
    /// PyTorch 2.15 CPU (oneDNN) forward+backward median of the authors' layer, from the
    /// issue, for the default shapes.
    pub(super) torch_ms: Option<f64>,
}

impl BenchShape {
    /// The shape's name in tables: its name when it is one of the set, else `-`.
    pub(super) fn label(&self) -> &str {
        if self.torch_ms.is_some() {
            &self.name
        } else {
            "-"
        }
    }

    pub(super) fn spec(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{},{},{}",
            self.batch,
            self.channels[0],
            self.channels[1],
            self.input[0],
            self.input[1],
            self.kernel,
            self.padding,
            self.stride,
            self.delta,
            self.g
        )
    }

    pub(super) fn vconv_config(&self) -> VConv2dConfig {
        let p = self.padding;
        VConv2dConfig::new(self.channels, [self.kernel; 2])
            .with_stride([self.stride; 2])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .with_delta(self.delta)
            .with_g(self.g)
    }

    pub(super) fn dims(&self) -> [usize; 4] {
        [self.batch, self.channels[0], self.input[0], self.input[1]]
    }
}

/// The default shape set of the issue: S1..S6 and S1 with delta 1.
pub(super) fn default_shapes() -> Vec<BenchShape> {
    let shape = |name: &str, n, c, out, hw, d, p, delta, torch| BenchShape {
        name: name.to_string(),
        batch: n,
        channels: [c, out],
        input: [hw, hw],
        kernel: d,
        padding: p,
        stride: 1,
        delta,
        g: 1,
        torch_ms: Some(torch),
    };
    vec![
        shape("S1", 16, 64, 64, 56, 3, 1, 0, 40.1),
        shape("S2", 16, 128, 128, 28, 3, 1, 0, 20.3),
        shape("S3", 16, 256, 256, 14, 3, 1, 0, 18.3),
        shape("S4", 16, 64, 96, 28, 5, 2, 0, 19.7),
        shape("S5", 16, 512, 4096, 7, 7, 0, 0, 475.0),
        shape("S6", 128, 32, 64, 28, 3, 1, 0, 55.2),
        shape("S1d1", 16, 64, 64, 56, 3, 1, 1, 33.9),
    ]
}

/// Parses `N,C,OUT,H,W,D,PAD[,STRIDE,DELTA,G]`.
fn parse_shape(text: &str) -> Result<BenchShape, String> {
    let values: Vec<usize> = text
        .split(',')
        .map(|v| v.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("'{text}' is not N,C,OUT,H,W,D,PAD[,STRIDE,DELTA,G] (numbers)"))?;
    if !(7..=10).contains(&values.len()) {
        return Err(format!(
            "'{text}' has {} numbers; expected 7 to 10: N,C,OUT,H,W,D,PAD[,STRIDE,DELTA,G]",
            values.len()
        ));
    }
    let get = |i: usize, default: usize| values.get(i).copied().unwrap_or(default);
    Ok(BenchShape {
        name: text.to_string(),
        batch: values[0],
        channels: [values[1], values[2]],
        input: [values[3], values[4]],
        kernel: values[5],
        padding: values[6],
        stride: get(7, 1),
        delta: get(8, 0),
        g: get(9, 1),
        torch_ms: None,
    })
}

/// The layer under test in one implementation, on one device.
pub(super) enum Layer {
    Versatile(versatile::VConv2d),
    /// A dense conv2d; `true`: through the nested kernel.
    Dense(burn::nn::conv::Conv2d, bool),
}

impl Layer {
    pub(super) fn new(shape: &BenchShape, imp: Impl, device: &Device) -> Result<Self> {
        Ok(match imp {
            Impl::Fused | Impl::DenseForm => {
                let path = if imp == Impl::Fused {
                    ForwardPath::Fused
                } else {
                    ForwardPath::DenseForm
                };
                let layer = shape
                    .vconv_config()
                    .try_init(device)
                    .map_err(UsageError::from_display)?
                    .with_path(path);
                layer
                    .output_shape(shape.dims())
                    .map_err(UsageError::from_display)?;
                Layer::Versatile(layer)
            }
            Impl::Conv2d | Impl::Conv2dNested => {
                let p = shape.padding;
                Layer::Dense(
                    Conv2dConfig::new(shape.channels, [shape.kernel; 2])
                        .with_stride([shape.stride; 2])
                        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                        .init(device),
                    imp == Impl::Conv2dNested,
                )
            }
        })
    }

    pub(super) fn forward(&self, x: Tensor<4>) -> Result<Tensor<4>> {
        Ok(match self {
            Layer::Versatile(layer) => layer.try_forward(x)?,
            Layer::Dense(conv, true) => {
                anyhow::ensure!(
                    conv_path_for(conv, &x) == ConvPath::Nested,
                    "the nested kernel does not take this dense layer"
                );
                conv2d_forward(conv, x)
            }
            // burn's own conv2d, not the project's dense entry point.
            Layer::Dense(conv, false) => conv.forward(x),
        })
    }
}

/// CPU seconds this process has used so far (user + system, all threads), from
/// `/proc/self/stat` (Linux; `None` elsewhere). Unlike wall time it barely moves when
/// other processes share the cores, so it gives a load-robust efficiency.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) (utime, stime) in USER_HZ = 100 ticks per second.
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / 100.0)
}

/// A timed operation: the median wall time and the mean CPU time of the timed runs (ms).
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    pub(super) median_ms: f64,
    pub(super) cpu_ms: Option<f64>,
}

/// Median of the timed runs of `f` (in milliseconds) after `warmup` untimed ones, and
/// their mean CPU time.
pub(super) fn median_ms(
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    let mut first = None;
    for _ in 0..warmup {
        let start = Instant::now();
        f()?;
        first.get_or_insert(start.elapsed().as_secs_f64());
    }
    let reps = if first.unwrap_or(0.0) > 2.0 {
        reps.min(3)
    } else {
        reps
    };
    let mut times = Vec::with_capacity(reps.max(1));
    let cpu_start = cpu_seconds();
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_ms = cpu_start
        .zip(cpu_seconds())
        .map(|(a, b)| (b - a) * 1e3 / times.len() as f64);
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: times[times.len() / 2],
        cpu_ms,
    })
}

/// Timings of one shape in one implementation.
struct Row {
    fwd: Timing,
    fwd_bwd: Timing,
    memory: Option<(usize, usize)>,
}

fn bench_one(shape: &BenchShape, imp: Impl, args: &BenchArgs) -> Result<Row> {
    let plain = Device::flex();
    let layer = Layer::new(shape, imp, &plain)?;
    let x = Tensor::<4>::random(shape.dims(), Distribution::Default, &plain);
    let fwd = median_ms(args.warmup, args.reps, || {
        layer.forward(x.clone())?;
        Ok(())
    })?;
    drop(layer);

    let device = Device::flex().autodiff();
    let layer = Layer::new(shape, imp, &device)?;
    let x = Tensor::<4>::random(shape.dims(), Distribution::Default, &device).require_grad();
    let step = || -> Result<()> {
        let out = layer.forward(x.clone())?;
        let grads = out.backward();
        anyhow::ensure!(x.grad(&grads).is_some(), "no input gradient");
        Ok(())
    };
    let fwd_bwd = median_ms(args.warmup, args.reps, step)?;
    let memory = if args.memory {
        let before = heap_in_use();
        let scratch = kernels::workspace::retained_bytes();
        reset_heap_peak();
        step()?;
        // Scratch buffers the kernels kept from earlier runs are part of the footprint.
        let peak = heap_peak() - before + scratch;
        // Budget: input, output and their gradients (f32).
        let out_elems: usize = match &layer {
            Layer::Versatile(l) => l.output_shape(shape.dims())?.iter().product(),
            Layer::Dense(..) => layer.forward(x.clone())?.shape().num_elements(),
        };
        let in_elems: usize = shape.dims().iter().product();
        // x is alive before and during the step: count it in the peak.
        Some((peak + in_elems * 4, 2 * (in_elems + out_elems) * 4))
    } else {
        None
    };
    Ok(Row {
        fwd,
        fwd_bwd,
        memory,
    })
}

/// The f32 FMA peak on all threads (`kernels::fma_peak_gflops`, best of 3 runs of about
/// 0.1 s), measured where `--peak-size` is not 0 and the CPU has a vector FMA.
fn fma_peak(args: &BenchArgs) -> Option<f64> {
    (args.peak_size > 0)
        .then(|| kernels::fma_peak_gflops(20_000_000, 3))
        .flatten()
}

/// The 1-minute load average (`/proc/loadavg`), or "-".
pub(super) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "-".to_string())
}

/// The model `--model name --variant` (with `--in-channels`) and the input shape
/// `[batch, channels, h, w]` the arguments ask for, checked against the model.
pub(super) fn model_and_input(name: &str, args: &BenchArgs) -> Result<(ModelConfig, [usize; 4])> {
    let mut config = ModelConfig::parse(name, &args.variant).map_err(UsageError::from_display)?;
    if let Some(channels) = args.in_channels {
        config = config.with_in_channels(channels);
    }
    let [h, w] = args.input.unwrap_or([config.arch.default_input(); 2]);
    let shape = [args.batch, config.in_channels, h, w];
    config
        .check_input(shape)
        .map_err(UsageError::from_display)?;
    Ok((config, shape))
}

/// `versatile bench --model`: the compiled plan against the module forward.
/// The `impl` of `--model`'s training-step row.
const TRAIN_STEP: &str = "train step";

/// `--model` on the CPU: the compiled inference plan, burn's module forward, and a
/// training step (forward and backward, no optimizer) of the model in training.
fn run_model(name: &str, args: &BenchArgs) -> Result<()> {
    let (config, shape) = model_and_input(name, args)?;
    let [h, w] = [shape[2], shape[3]];
    let device = Device::flex();
    let model = config.init(&device)?;
    for (path, form) in [
        (&args.onnx, OnnxForm::Dense),
        (&args.onnx_versatile, OnnxForm::Versatile),
    ] {
        if let Some(path) = path {
            export_onnx_as(&model, [h, w], path, form)?;
        }
    }
    let threads = kernels::threads();
    let peak = (args.peak_size > 0).then(|| kernels::sgemm_gflops(args.peak_size, 5));
    let fma_peak = fma_peak(args);
    let compile_start = Instant::now();
    let mut plan = InferencePlan::compile(&model, shape)?;
    let compile_ms = compile_start.elapsed().as_secs_f64() * 1e3;
    let input: Tensor<4> = Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
    let values: Vec<f32> = input
        .to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let planned = median_ms(args.warmup, args.reps, || {
        plan.run(&values).map(|_| ()).map_err(Into::into)
    })?;
    let (module, step) = if args.plan_only {
        (None, None)
    } else {
        let module = median_ms(args.warmup, args.reps, || {
            let _ = model.try_forward(input.clone())?.into_data();
            Ok(())
        })?;
        // A training step: the forward (batch norm on the batch's statistics) and
        // backward of the model in training, on the autodiff device, without the
        // optimizer (`train --bench-steps` times whole steps on real data).
        let autodiff = device.clone().autodiff();
        let trained = config.init(&autodiff)?;
        let x_train = input.clone().to_device(&autodiff);
        let step = median_ms(args.warmup, args.reps, || {
            let _grads = trained.try_forward(x_train.clone())?.sum().backward();
            Ok(())
        })?;
        (Some(module), Some(step))
    };
    // Multiply-adds: the forward's, and twice as many backward (input and weight
    // gradients), counted as direct convolution (the nested evaluation) does them: the
    // plan's layers by Winograd's F(2x2,3x3) do fewer multiplies, so its rate is an
    // effective one and can pass the FMA peak.
    let forward_flops = 2.0 * plan.macs() as f64;
    let flops = |what: &str| {
        if what == TRAIN_STEP {
            3.0 * forward_flops
        } else {
            forward_flops
        }
    };
    let gflops = |what: &str, t: &Timing| flops(what) / (t.median_ms * 1e-3) / 1e9;
    let share = |what: &str, t: &Timing| peak.map(|p| gflops(what, t) / p);
    let share_of_fma = |what: &str, t: &Timing| fma_peak.map(|p| gflops(what, t) / p);
    let memory =
        plan.weight_bytes() + plan.activation_bytes() + kernels::workspace::retained_bytes();
    let row = |what: &str, t: &Timing| {
        json!({
            "model": config.name(),
            "variant": config.variant.to_string(),
            "input": shape,
            "threads": threads,
            "impl": what,
            "ms": t.median_ms,
            "images_per_s": args.batch as f64 / (t.median_ms * 1e-3),
            "gflops": gflops(what, t),
            "peak_gflops": peak,
            "share_of_peak": share(what, t),
            "fma_peak_gflops": fma_peak,
            "share_of_fma_peak": share_of_fma(what, t),
        })
    };
    let rows: Vec<(&str, &Timing)> = [
        ("plan", Some(&planned)),
        ("module", module.as_ref()),
        (TRAIN_STEP, step.as_ref()),
    ]
    .into_iter()
    .filter_map(|(what, t)| Some((what, t?)))
    .collect();
    if args.json {
        for (what, t) in rows {
            let mut value = row(what, t);
            if what == "plan" {
                value["compile_ms"] = json!(compile_ms);
                value["weight_bytes"] = json!(plan.weight_bytes());
                value["activation_bytes"] = json!(plan.activation_bytes());
                value["memory_bytes"] = json!(memory);
            }
            println!("{value}");
        }
        return Ok(());
    }
    println!(
        "{} {} on {shape:?}, {threads} threads, {:.2} G multiply-adds; plan: {} steps, compiled in {compile_ms:.0} ms",
        config.name(),
        config.variant,
        plan.macs() as f64 / 1e9,
        plan.steps()
    );
    if let Some(p) = peak {
        println!("SGEMM peak ({0}x{0}x{0}): {p:.1} GFLOP/s", args.peak_size);
    }
    if let Some(p) = fma_peak {
        println!("f32 FMA peak (vector FMA chains on every thread): {p:.1} GFLOP/s");
    }
    println!(
        "plan memory: weights {:.1} MiB + activations {:.1} MiB + kernel scratch {:.1} MiB",
        plan.weight_bytes() as f64 / 1048576.0,
        plan.activation_bytes() as f64 / 1048576.0,
        kernels::workspace::retained_bytes() as f64 / 1048576.0
    );
    println!("load average at start: {}", load_average());
    println!();
    println!(
        "{:<10} {:>10} {:>10} {:>9} {:>8} {:>8}",
        "impl", "ms", "images/s", "GFLOP/s", "SGEMM", "FMA peak"
    );
    let percent = |s: Option<f64>| s.map_or("-".into(), |s| format!("{:.0} %", s * 100.0));
    for &(what, t) in &rows {
        println!(
            "{what:<10} {:>10.2} {:>10.1} {:>9.1} {:>8} {:>8}",
            t.median_ms,
            args.batch as f64 / (t.median_ms * 1e-3),
            gflops(what, t),
            percent(share(what, t)),
            percent(share_of_fma(what, t))
        );
    }
    println!(
        "(GFLOP/s: the nested evaluation's multiply-adds per second; the plan's layers by \
         Winograd's F(2x2,3x3) do fewer multiplies, so its rate can pass the FMA peak)"
    );
    if let Some(module) = module {
        println!(
            "plan speedup over the module forward: {:.2}x",
            module.median_ms / planned.median_ms
        );
    }
    Ok(())
}

/// Runs `versatile bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.device != DeviceChoice::Cpu {
        let device = train::device(args.device).map_err(train_error)?;
        return super::bench_gpu::run(args, &device);
    }
    if let Some(name) = &args.model {
        return run_model(name, args);
    }
    let shapes = if args.shapes.is_empty() {
        default_shapes()
    } else {
        args.shapes.clone()
    };
    for shape in &shapes {
        shape
            .vconv_config()
            .validate()
            .map_err(|e| UsageError::from_display(format!("shape {}: {e}", shape.name)))?;
    }
    // One task per call (gemm splits its matrices) when asked; the plans made on this
    // thread take it.
    let _tuning = (args.split == Split::Gemm).then(|| {
        kernels::tuning::scoped(kernels::tuning::Tuning {
            min_task_columns: usize::MAX,
            ..Default::default()
        })
    });
    let threads = kernels::threads();
    // The peak on all threads (wall time), and per core from the CPU time of the same
    // runs (5 timed + 1 warm-up SGEMMs).
    let cpu_before = cpu_seconds();
    let peak = (args.peak_size > 0).then(|| kernels::sgemm_gflops(args.peak_size, 5));
    let core_peak = peak
        .and(cpu_before)
        .zip(cpu_seconds())
        .map(|(a, b)| 6.0 * 2.0 * (args.peak_size as f64).powi(3) / (b - a) / 1e9);
    let fma_peak = fma_peak(args);
    if !args.json {
        match peak {
            Some(p) => println!(
                "SGEMM peak ({0}x{0}x{0}, {threads} threads, median of 5): {p:.1} GFLOP/s; per core from CPU time: {1}",
                args.peak_size,
                core_peak.map_or("-".to_string(), |c| format!("{c:.1} GFLOP/s"))
            ),
            None => println!("SGEMM peak not measured (--peak-size 0)"),
        }
        if let Some(p) = fma_peak {
            println!("f32 FMA peak (vector FMA chains on every thread): {p:.1} GFLOP/s");
        }
        println!(
            "medians of {} runs after {} warm-up; eff = 6 * nested MACs / fwd+bwd time / peak; cpu ms = mean CPU time of a run (all threads), eff(cpu) = 6 * nested MACs / cpu time / per-core peak",
            args.reps, args.warmup
        );
        println!("load average at start: {}", load_average());
        println!();
        println!(
            "{:<6} {:<28} {:<13} {:>8} {:>8} {:>8} {:>8} {:>5} {:>8} {:>8} {:>8}{}",
            "shape",
            "N,C,OUT,H,W,D,PAD,S,DELTA,G",
            "impl",
            "fwd ms",
            "fwd+bwd",
            "GFLOP/s",
            "eff",
            "cpu ms",
            "eff(cpu)",
            "torch ms",
            "speedup",
            if args.memory {
                "   peak MiB / budget"
            } else {
                ""
            }
        );
    }
    for shape in &shapes {
        let geometry = shape
            .vconv_config()
            .geometry()
            .map_err(UsageError::from_display)?;
        let layer = shape.vconv_config().init(&Device::flex());
        let out = layer
            .output_shape(shape.dims())
            .map_err(UsageError::from_display)?;
        let layer_cost = cost::vconv2d(&geometry, true, [out[2], out[3]]);
        let macs_nested = layer_cost.macs_nested * shape.batch as u64;
        let macs_dense = layer_cost.macs_dense * shape.batch as u64;
        for &imp in &args.impls {
            let row = bench_one(shape, imp, args)?;
            let gflops = 6.0 * macs_nested as f64 / (row.fwd_bwd.median_ms * 1e-3) / 1e9;
            let efficiency = peak.map(|p| gflops / p);
            let efficiency_cpu = row
                .fwd_bwd
                .cpu_ms
                .zip(core_peak)
                .map(|(cpu, core)| 6.0 * macs_nested as f64 / (cpu * 1e-3) / 1e9 / core);
            let speedup = shape.torch_ms.map(|t| t / row.fwd_bwd.median_ms);
            if args.json {
                let mut object = json!({
                    "shape": shape.name,
                    "spec": shape.spec(),
                    "impl": imp.name(),
                    "fwd_ms": row.fwd.median_ms,
                    "fwd_bwd_ms": row.fwd_bwd.median_ms,
                    "fwd_cpu_ms": row.fwd.cpu_ms,
                    "fwd_bwd_cpu_ms": row.fwd_bwd.cpu_ms,
                    "macs_nested": macs_nested,
                    "macs_dense": macs_dense,
                    "gflops_nested": gflops,
                    "threads": threads,
                    "split": format!("{:?}", args.split).to_lowercase(),
                    "peak_gflops": peak,
                    "core_peak_gflops": core_peak,
                    "fma_peak_gflops": fma_peak,
                    "efficiency_fma": fma_peak.map(|p| gflops / p),
                    "efficiency": efficiency,
                    "efficiency_cpu": efficiency_cpu,
                    "load_average": load_average(),
                    "torch_fwd_bwd_ms": shape.torch_ms,
                    "speedup_vs_torch": speedup,
                });
                if let Some((used, budget)) = row.memory {
                    object["peak_bytes"] = json!(used);
                    object["budget_bytes"] = json!(budget);
                    object["memory_ratio"] = json!(used as f64 / budget as f64);
                }
                println!("{object}");
            } else {
                let opt = |v: Option<f64>, digits: usize| {
                    v.map_or("-".to_string(), |v| format!("{v:.digits$}"))
                };
                let memory = row.memory.map_or(String::new(), |(used, budget)| {
                    format!(
                        "   {:.1} / {:.1} ({:.2}x)",
                        used as f64 / 1048576.0,
                        budget as f64 / 1048576.0,
                        used as f64 / budget as f64
                    )
                });
                let percent =
                    |e: Option<f64>| e.map_or("-".to_string(), |e| format!("{:.0}%", e * 100.0));
                println!(
                    "{:<6} {:<28} {:<13} {:>8.2} {:>8.2} {:>8.1} {:>8} {:>5} {:>8} {:>8} {:>8}{memory}",
                    shape.label(),
                    shape.spec(),
                    imp.name(),
                    row.fwd.median_ms,
                    row.fwd_bwd.median_ms,
                    gflops,
                    percent(efficiency),
                    opt(row.fwd_bwd.cpu_ms, 0),
                    percent(efficiency_cpu),
                    opt(shape.torch_ms, 1),
                    opt(speedup, 2),
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_with_defaults_and_reject_bad_input() {
        let s = parse_shape("16,64,64,56,56,3,1").unwrap();
        assert_eq!(
            (s.batch, s.channels, s.input, s.kernel, s.padding),
            (16, [64, 64], [56, 56], 3, 1)
        );
        assert_eq!((s.stride, s.delta, s.g), (1, 0, 1));
        let s = parse_shape("2,8,8,9,7,3,1,2,2,1").unwrap();
        assert_eq!((s.input, s.stride, s.delta, s.g), ([9, 7], 2, 2, 1));
        assert!(parse_shape("1,2,3")
            .unwrap_err()
            .contains("expected 7 to 10"));
        assert!(parse_shape("1,2,x,4,5,6,7")
            .unwrap_err()
            .contains("numbers"));
    }
}
