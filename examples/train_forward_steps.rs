//! Times each step of a zoo model's training forward (the burn modules on an autodiff
//! `Flex` device, batch statistics and all, as `versatile train` runs them) and the
//! whole backward, for finding where a training step's time goes; beside `plan_steps`
//! (the inference plan's steps) it shows what training adds to each layer.
//!
//! ```text
//! cargo run --release --example train_forward_steps -- MODEL VARIANT [BATCH=128] [SIDE=32] [RUNS=5]
//! ```
//!
//! Each step's median over the runs (after one untimed run), then the forward's and the
//! backward's medians and the steps' sums by kind.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use burn::nn::pool::{AdaptiveAvgPool2d, AvgPool2d, MaxPool2d};
use burn::nn::{BatchNorm, Dropout, Linear};
use burn::tensor::{Device, Tensor, TensorData};
use versatile::layer::Activation;
use versatile::models::{ConvLayer, Forward, ModelConfig, Modules};

/// [`Modules`], each step timed: `(step index, what) -> milliseconds of each run`.
struct Timed {
    inner: Modules,
    step: usize,
    times: BTreeMap<(usize, String), Vec<f64>>,
}

impl Timed {
    fn time<R>(&mut self, name: String, f: impl FnOnce(&mut Modules) -> R) -> R {
        let start = Instant::now();
        let r = f(&mut self.inner);
        self.times
            .entry((self.step, name))
            .or_default()
            .push(start.elapsed().as_secs_f64() * 1e3);
        self.step += 1;
        r
    }
}

type R<T> = Result<T, std::convert::Infallible>;

impl Forward for Timed {
    type Map = Activation;
    type Vector = Tensor<2>;
    type Error = std::convert::Infallible;
    fn conv(&mut self, layer: &ConvLayer, x: Activation) -> R<Activation> {
        let d = x.values.dims();
        self.time(format!("conv {:?}", d), |m| m.conv(layer, x))
    }
    fn batch_norm(&mut self, n: &BatchNorm, x: Activation) -> R<Activation> {
        self.time("bn".into(), |m| m.batch_norm(n, x))
    }
    fn batch_norm_relu(&mut self, n: &BatchNorm, x: Activation) -> R<Activation> {
        let d = x.values.dims();
        self.time(format!("bn_relu {:?}", d), |m| m.batch_norm_relu(n, x))
    }
    fn batch_norm_relu_max_pool(
        &mut self,
        n: &BatchNorm,
        p: &MaxPool2d,
        x: Activation,
    ) -> R<Activation> {
        let d = x.values.dims();
        self.time(format!("bn_relu_pool {:?}", d), |m| {
            m.batch_norm_relu_max_pool(n, p, x)
        })
    }
    fn relu(&mut self, x: Activation) -> R<Activation> {
        self.time("relu".into(), |m| m.relu(x))
    }
    fn max_pool(&mut self, p: &MaxPool2d, x: Activation) -> R<Activation> {
        self.time("maxpool".into(), |m| m.max_pool(p, x))
    }
    fn avg_pool(&mut self, p: &AvgPool2d, x: Activation) -> R<Activation> {
        self.time("avgpool".into(), |m| m.avg_pool(p, x))
    }
    fn adaptive_avg_pool(&mut self, p: &AdaptiveAvgPool2d, x: Activation) -> R<Activation> {
        self.time("adaptive".into(), |m| m.adaptive_avg_pool(p, x))
    }
    fn add_relu(&mut self, x: Activation, s: Activation) -> R<Activation> {
        self.time("add_relu".into(), |m| m.add_relu(x, s))
    }
    fn batch_norm_add_relu(
        &mut self,
        n: &BatchNorm,
        x: Activation,
        s: Activation,
    ) -> R<Activation> {
        let d = x.values.dims();
        self.time(format!("bn_add_relu {:?}", d), |m| {
            m.batch_norm_add_relu(n, x, s)
        })
    }
    fn flatten(&mut self, x: Activation) -> R<Tensor<2>> {
        self.time("flatten".into(), |m| m.flatten(x))
    }
    fn linear(&mut self, l: &Linear, x: Tensor<2>) -> R<Tensor<2>> {
        self.time("linear".into(), |m| m.linear(l, x))
    }
    fn relu_vector(&mut self, x: Tensor<2>) -> R<Tensor<2>> {
        self.time("relu_vec".into(), |m| m.relu_vector(x))
    }
    fn dropout(&mut self, d: &Dropout, x: Tensor<2>) -> R<Tensor<2>> {
        self.time("dropout".into(), |m| m.dropout(d, x))
    }
}

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let model_name = args.first().map_or("resnet18", String::as_str);
    let variant = args.get(1).map_or("spatial", String::as_str);
    let batch: usize = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let side: usize = args.get(3).map_or(Ok(32), |s| s.parse())?;
    let runs: usize = args.get(4).map_or(Ok(5), |s| s.parse())?;
    // As the CLI does: freed memory kept, not returned to the system between steps.
    let _ = versatile::kernels::alloc::retain_freed_memory();
    let device = Device::flex().autodiff();
    let model = ModelConfig::parse(model_name, variant)?
        .with_num_classes(100)
        .init(&device)?;
    let image: Vec<f32> = (0..batch * 3 * side * side)
        .map(|i| ((i * 7919) % 255) as f32 / 255.0 - 0.5)
        .collect();
    let mut timed = Timed {
        inner: Modules,
        step: 0,
        times: BTreeMap::new(),
    };
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for _ in 0..runs + 1 {
        let x: Tensor<4> = Tensor::from_data(
            TensorData::new(image.clone(), [batch, 3, side, side]),
            &device,
        );
        timed.step = 0;
        let t0 = Instant::now();
        let y = model.walk(&mut timed, Activation::from(x)).unwrap();
        let loss = y.sum();
        let t1 = Instant::now();
        let _grads = loss.backward();
        let t2 = Instant::now();
        fwd.push((t1 - t0).as_secs_f64() * 1e3);
        bwd.push((t2 - t1).as_secs_f64() * 1e3);
    }
    let med = |v: &mut Vec<f64>| {
        v.remove(0);
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut sum = 0.0;
    let mut by_kind: BTreeMap<String, f64> = BTreeMap::new();
    for ((i, name), mut t) in std::mem::take(&mut timed.times) {
        let m = med(&mut t);
        sum += m;
        *by_kind
            .entry(name.split(' ').next().unwrap().to_string())
            .or_default() += m;
        println!("{i:3} {m:7.2} ms  {name}");
    }
    println!(
        "steps sum {sum:.1} ms; forward {:.1} ms, backward {:.1} ms",
        med(&mut fwd),
        med(&mut bwd)
    );
    for (k, v) in by_kind {
        println!("  {k}: {v:.1} ms");
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
