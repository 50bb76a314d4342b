//! The GPU path on burn's wgpu device (in CI: Mesa's lavapipe, Vulkan on the CPU).
//!
//! - the golden cases (output and every gradient) through `VConv2d` on wgpu, on the
//!   nested GPU kernel and on the dense form;
//! - the nested GPU kernel against the dense form on random configurations (strides,
//!   paddings, dilations, groups, both channel modes, delta/g, even and 1x1 kernels), and
//!   bit-identical on a second run; layers whose reductions are split into chunks;
//! - every zoo model's forward and backward on wgpu against flex at small sizes, the
//!   gradients' tolerance calibrated by how far rounding-sized changes move them;
//! - a seed gives the same initial weights on every device.
//!
//! Built with `--features wgpu`; needs a Vulkan device (`apt-get install
//! mesa-vulkan-drivers` gives a software one).

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Device, DeviceKind, Tensor, TensorData};
use common::{
    case_files, golden_dir, host_any, random_case, relative_error, run_on_path as run, GoldenCase,
    Outputs, Rng,
};
use versatile::layer::{pin_auto_path, ChannelMode, ForwardPath, VConv2d, VConv2dConfig};
use versatile::models::{Arch, HeadLayer, ImageClassifier, Model, ModelConfig};

fn wgpu() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice)
}

/// `values` as an f32 tensor of `shape` on `device`.
fn f32_tensor<const D: usize>(values: &[f64], shape: &[usize], device: &Device) -> Tensor<D> {
    let data = TensorData::new(values.to_vec(), shape.to_vec());
    Tensor::from_data(data, (device, DType::F32))
}

#[test]
fn the_nested_kernel_is_the_default_on_wgpu() {
    let device = wgpu().autodiff();
    let layer = versatile::layer::VConv2dConfig::new([4, 6], [3, 3]).init(&device);
    let x = Tensor::<4>::zeros([1, 4, 5, 5], &device);
    assert_eq!(layer.path_for(&x).unwrap(), ForwardPath::Fused);
    let dense = layer.with_path(ForwardPath::DenseForm);
    assert_eq!(dense.path_for(&x).unwrap(), ForwardPath::DenseForm);
}

#[test]
fn golden_cases_on_wgpu() {
    let device = wgpu().autodiff();
    let files = case_files(&golden_dir());
    assert!(!files.is_empty(), "no golden case");
    let mut failures = Vec::new();
    for file in &files {
        let case = GoldenCase::load(file);
        let meta = &case.meta;
        // f32 on the GPU whatever the case's precision: its values, its f32 tolerance.
        let tensor4 = |name: &str| {
            let (shape, values) = case.get(name);
            f32_tensor::<4>(values, shape, &device)
        };
        let mut layer = meta.config().init(&device);
        layer.weight = Param::from_tensor(tensor4("weight"));
        if meta.bias {
            let (shape, values) = case.get("bias");
            layer.bias = Some(Param::from_tensor(f32_tensor::<1>(values, shape, &device)));
        }
        for path in [ForwardPath::Fused, ForwardPath::DenseForm] {
            let (out, gx, gw, gb) = run(&layer, path, &tensor4("x"), &tensor4("r"));
            let mut check = |what: &str, got: &[f64], name: &str| {
                let err = relative_error(got, case.values(name));
                if err > 1e-4 {
                    failures.push(format!("{} {path} {what}: {err:.2e}", meta.name));
                }
            };
            check("out", &out, "out");
            check("grad_x", &gx, "grad_x");
            check("grad_weight", &gw, "grad_weight");
            if let Some(gb) = gb {
                check("grad_bias", &gb, "grad_bias");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The nested kernel against the dense form on one layer with random weights: every
/// output and gradient within `2e-5`, and a second run bit-identical. Failures as lines.
fn compare_paths(
    layer: &VConv2d,
    shape: [usize; 4],
    rng: &mut Rng,
    what: &str,
    failures: &mut Vec<String>,
) {
    let device = layer.weight.device();
    let mut layer = layer.clone();
    let weight_shape = layer.weight.dims();
    layer.weight = Param::from_tensor(rng.tensor(weight_shape, &device, DType::F32));
    if let Some(bias) = &layer.bias {
        let n = bias.dims();
        layer.bias = Some(Param::from_tensor(rng.tensor(n, &device, DType::F32)));
    }
    let x = rng.tensor(shape, &device, DType::F32);
    let r = rng.tensor(layer.output_shape(shape).unwrap(), &device, DType::F32);
    let dense = run(&layer, ForwardPath::DenseForm, &x, &r);
    let nested = run(&layer, ForwardPath::Fused, &x, &r);
    let again = run(&layer, ForwardPath::Fused, &x, &r);
    let bits = |o: &Outputs| {
        let all = [&o.0, &o.1, &o.2]
            .into_iter()
            .chain(o.3.as_ref())
            .flatten()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>();
        all
    };
    if bits(&nested) != bits(&again) {
        failures.push(format!("{what}: a second run differs"));
    }
    let mut check = |name: &str, got: &[f64], want: &[f64]| {
        let err = relative_error(got, want);
        if err > 2e-5 {
            failures.push(format!("{what} {name}: relative error {err:.2e}"));
        }
    };
    check("out", &nested.0, &dense.0);
    check("grad_x", &nested.1, &dense.1);
    check("grad_weight", &nested.2, &dense.2);
    if let (Some(n), Some(d)) = (&nested.3, &dense.3) {
        check("grad_bias", n, d);
    }
}

#[test]
fn nested_kernel_matches_the_dense_form_on_random_configurations() {
    let device = wgpu().autodiff();
    let mut rng = Rng(0x6770_7531);
    let mut failures = Vec::new();
    for case in 0..150 {
        let (config, shape) = random_case(&mut rng);
        let what = format!("case {case} ({config:?}, input {shape:?})");
        compare_paths(&config.init(&device), shape, &mut rng, &what, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Layers whose reductions are longer than one GPU thread's budget: the forward pass
/// splits the window's channels and the input gradient the output channels into chunks
/// (the small random configurations split only the weight and bias gradients' rows).
#[test]
fn long_reductions_are_split_into_chunks_exactly() {
    let device = wgpu().autodiff();
    let mut rng = Rng(0x6368_756e);
    let mut failures = Vec::new();
    let spatial =
        VConv2dConfig::new([200, 300], [7, 7]).with_padding(PaddingConfig2d::Explicit(3, 3, 3, 3));
    let sliding = VConv2dConfig::new([340, 350], [5, 5])
        .with_delta(20)
        .with_g(4)
        .with_channel_mode(ChannelMode::Sliding)
        .with_stride([2, 1]);
    for (config, shape) in [(spatial, [2, 200, 9, 8]), (sliding, [1, 340, 9, 7])] {
        let what = format!("{config:?}, input {shape:?}");
        compare_paths(&config.init(&device), shape, &mut rng, &what, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every float parameter of a module, in visiting order, as host values.
fn parameters(model: &Model) -> Vec<(String, Vec<f64>)> {
    struct Collect(Vec<(String, Vec<f64>)>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let id = param.id.to_string();
            self.0.push((id, host_any(param.val())));
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

/// The gradient of every float parameter of `model` for `sum(logits * r)`.
fn gradients(model: &Model, x: Tensor<4>, r: &Tensor<2>) -> Vec<Vec<f64>> {
    let logits = model.forward(x);
    let grads = (logits * r.clone()).sum().backward();
    struct Collect<'a>(&'a burn::tensor::Gradients, Vec<Vec<f64>>);
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = param.val().grad(self.0) {
                self.1.push(host_any(grad));
            }
        }
    }
    let mut collect = Collect(&grads, Vec::new());
    model.visit(&mut collect);
    collect.1
}

/// The largest buffer the software Vulkan device (lavapipe through wgpu) allocates; a
/// model with a larger parameter runs on real GPUs only.
const MAX_BUFFER_BYTES: usize = 128 << 20;

/// Dropout draws from each device's own generator; off, so the two devices compute the
/// same function (batch norm still trains).
fn without_dropout(mut model: Model) -> Model {
    if let Model::ConvNet(net) = &mut model {
        for layer in &mut net.classifier {
            if let HeadLayer::Dropout(dropout) = layer {
                dropout.prob = 0.0;
            }
        }
    }
    model
}

/// Largest difference between `got` and `want` over all parameters, each divided by the
/// larger of its parameter's largest gradient and a thousandth of the model's largest (a
/// gradient that is zero in exact arithmetic, as a convolution bias's before batch norm,
/// is rounding noise on both devices).
fn gradient_errors(got: &[Vec<f64>], want: &[Vec<f64>]) -> Vec<f64> {
    let largest = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let model = want.iter().map(|w| largest(w)).fold(0.0, f64::max);
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let scale = largest(w).max(1e-3 * model).max(f64::MIN_POSITIVE);
            g.iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max)
                / scale
        })
        .collect()
}

#[test]
fn every_zoo_model_forward_and_backward_on_wgpu_matches_flex() {
    let variants = [
        "dense",
        "spatial",
        "spatial+channel",
        "spatial+channel:delta=2,g=2,mode=sliding",
    ];
    let (cpu, gpu) = (Device::flex().autodiff(), wgpu().autodiff());
    let mut failures = Vec::new();
    let mut skipped = Vec::new();
    let mut imagenet_vggs = 0;
    for (i, arch) in Arch::all().into_iter().enumerate() {
        let name = arch.to_string();
        // vgg_small and LeNet-5 in every variant; the other tables one variant each, in
        // turn (the variants' code paths are the same for every table); one ImageNet VGG
        // (the rest differ only in the table the `_small` VGGs run).
        let chosen: Vec<&str> = match name.as_str() {
            "vgg_small" | "lenet5" => variants.to_vec(),
            _ => vec![variants[i % variants.len()]],
        };
        let imagenet_vgg = name.starts_with("vgg") && !name.contains("small");
        if imagenet_vgg {
            imagenet_vggs += 1;
            if name != "vgg11_bn" {
                continue;
            }
        }
        for variant in chosen {
            let variant = if imagenet_vgg { "spatial" } else { variant };
            let config = ModelConfig::new(arch.clone(), variant.parse().unwrap());
            let side = config.min_input().unwrap().max(12);
            let started = std::time::Instant::now();
            let model = without_dropout(versatile::train::initial_model(&config, &cpu, 7).unwrap());
            let largest = parameters(&model)
                .iter()
                .map(|(_, v)| v.len())
                .max()
                .unwrap();
            if largest * 4 > MAX_BUFFER_BYTES {
                skipped.push(name.clone());
                continue;
            }
            let on_gpu = model.clone().fork(&gpu);
            let mut rng = Rng(0x1234 + i as u64);
            let host = Device::flex();
            // A ResNet's last stage is 1x1 at these sizes: a larger batch gives its batch
            // norm more than two values per channel to normalise.
            let batch = if name.starts_with("resnet") { 8 } else { 2 };
            let x = rng.tensor([batch, config.in_channels, side, side], &host, DType::F32);
            let r = rng.tensor([batch, config.num_classes], &host, DType::F32);
            let what = format!("{arch} {variant}, {batch} at {side}x{side}");
            let grads = |m: &Model, device: &Device, x: &Tensor<4>, path: ForwardPath| {
                let _pin = pin_auto_path(path);
                gradients(m, x.clone().to_device(device), &r.clone().to_device(device))
            };
            let want = grads(&model, &cpu, &x, ForwardPath::Auto);
            let got = grads(&on_gpu, &gpu, &x, ForwardPath::Auto);
            if want.len() != got.len() || want.is_empty() {
                failures.push(format!("{what}: {} vs {} gradients", got.len(), want.len()));
                continue;
            }
            // How far rounding-sized changes move each gradient: the same network on flex
            // with the input moved by a millionth. Deep networks whose batch norm sees
            // few values per channel (batch 2 at small sizes) amplify them, and the two
            // devices round differently at every layer.
            let nudge = rng.tensor(x.dims(), &host, DType::F32) * 1e-6;
            let nudged = grads(&model, &cpu, &(x.clone() + nudge), ForwardPath::Auto);
            let floors = gradient_errors(&nudged, &want);
            let tolerances: Vec<f64> = floors.iter().map(|f| (10.0 * f).max(2e-3)).collect();
            let errors = gradient_errors(&got, &want);
            if errors.iter().zip(&tolerances).any(|(e, t)| e > t) {
                // A ReLU or max-pooling tie that the devices break apart moves a gradient
                // by more than rounding does, in burn's own operations too. Such a
                // difference is not the nested kernel's when the dense form differs as
                // much between the devices and the two paths agree on the GPU.
                let dense_cpu = grads(&model, &cpu, &x, ForwardPath::DenseForm);
                let dense_gpu = grads(&on_gpu, &gpu, &x, ForwardPath::DenseForm);
                let burn = gradient_errors(&dense_gpu, &dense_cpu);
                let paths = gradient_errors(&got, &dense_gpu);
                for k in 0..errors.len() {
                    let (err, tolerance) = (errors[k], tolerances[k]);
                    if err > tolerance && (err > 2.0 * burn[k] || paths[k] > tolerance) {
                        failures.push(format!(
                            "{what}: parameter {k}: relative error {err:.2e} (tolerance \
                             {tolerance:.2e}; dense form between the devices {:.2e}, nested \
                             against dense form on wgpu {:.2e})",
                            burn[k], paths[k]
                        ));
                    }
                }
            }
            let logits = |m: &Model, x: Tensor<4>| host_any(m.valid().forward(x));
            let err = relative_error(
                &logits(&on_gpu, x.clone().to_device(&wgpu())),
                &logits(&model, x),
            );
            if err > 1e-4 {
                failures.push(format!("{what}: eval logits: relative error {err:.2e}"));
            }
            let floor = floors.iter().fold(0.0f64, |m, &f| m.max(f));
            eprintln!(
                "{what}: {:.1} s, rounding floor {floor:.1e}",
                started.elapsed().as_secs_f64()
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(imagenet_vggs, 8, "the zoo's ImageNet VGGs");
    // Only AlexNet's 9216 -> 4096 layer (151 MB) is too large for one buffer.
    assert_eq!(skipped, ["alexnet"], "skipped for their size");
}

#[test]
fn a_seed_gives_the_same_initial_weights_on_every_device() {
    for variant in ["dense", "spatial+channel"] {
        let config = ModelConfig::parse("vgg_small", variant).unwrap();
        let cpu = versatile::train::initial_model(&config, &Device::flex().autodiff(), 11).unwrap();
        let gpu = versatile::train::initial_model(&config, &wgpu().autodiff(), 11).unwrap();
        let other = versatile::train::initial_model(&config, &wgpu().autodiff(), 12).unwrap();
        let (cpu, gpu, other) = (parameters(&cpu), parameters(&gpu), parameters(&other));
        assert_eq!(cpu.len(), gpu.len());
        for ((name, a), (_, b)) in cpu.iter().zip(&gpu) {
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(a),
                bits(b),
                "{variant}: {name} differs between cpu and wgpu"
            );
        }
        assert!(
            cpu.iter().zip(&other).any(|((_, a), (_, b))| a != b),
            "{variant}: another seed gave the same weights"
        );
    }
}
