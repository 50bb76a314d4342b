//! The compiled inference plan against the model's eval forward: every zoo model under
//! every variant (and channel windows with more windows and sliding weights), batch 1
//! and 2, square and odd rectangular inputs; batch-norm statistics and biases made
//! non-trivial first, so that folding them is tested.

use crate::common;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Device, Tensor, TensorData};
use common::Rng;
use versatile::infer::{InferError, InferencePlan};
use versatile::models::{Arch, ImageClassifier, Model, ModelConfig, Variant};

/// Moves every vector parameter and buffer (biases, batch-norm weights, shifts, running
/// means and variances) away from its initial value: `v * U(0.5, 1.5) + U(-0.2, 0.2)`
/// (variances stay positive: they start at 1).
struct Perturb(Rng);

impl ModuleMapper for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D != 1 {
            return param;
        }
        let rng = &mut self.0;
        param.map(|tensor| {
            let device = tensor.device();
            let shape = tensor.dims();
            let values: Vec<f32> = tensor
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap()
                .into_iter()
                .map(|v| v * rng.uniform(0.5, 1.5) as f32 + rng.uniform(-0.2, 0.2) as f32)
                .collect();
            Tensor::from_data(TensorData::new(values, shape), &device)
        })
    }
}

fn model(config: &ModelConfig, seed: u64) -> Model {
    let model = config.init(&Device::flex()).expect("a zoo model");
    model.map(&mut Perturb(Rng::new(seed)))
}

fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Compiles `model` for `shape` and compares its logits with the eval forward.
fn check(model: &Model, shape: [usize; 4], seed: u64) {
    let device = Device::flex();
    let what = format!(
        "{} {} on {shape:?}",
        model.config().name(),
        model.config().variant
    );
    let input = Rng::new(seed).tensor(shape, &device, DType::F32);
    let expected: Vec<f32> = model
        .forward(input.clone())
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    let mut plan = InferencePlan::compile(model, shape).unwrap_or_else(|e| panic!("{what}: {e}"));
    let values: Vec<f32> = input
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    let got = plan.run(&values).unwrap().to_vec();
    assert_eq!(got.len(), expected.len(), "{what}");
    let scale = max_abs(&expected).max(1.0);
    let worst = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 2e-4 * scale,
        "{what}: logits differ by {worst} (largest logit {scale})"
    );
    // A second run on the same buffers gives the same bits.
    assert_eq!(plan.run(&values).unwrap(), &got[..], "{what}: second run");
}

fn variants() -> Vec<Variant> {
    let mut all = Variant::all().to_vec();
    for extra in [
        "spatial+channel:delta=2,g=1",
        "spatial+channel:delta=2,windows=2,mode=sliding",
    ] {
        all.push(extra.parse().unwrap());
    }
    all
}

/// Whether the test runs `arch` under every variant: all but the ImageNet-head VGGs,
/// whose 4096-wide `fc6` and classifier (about 120 M weights) make each case seconds
/// long; of those, the smallest table with and without batch norm runs every variant,
/// VGG-16-BN the paper's spatial one, the rest dense (their tables run every variant
/// under the small head).
fn variants_of(arch: &Arch) -> Vec<Variant> {
    let name = arch.to_string();
    match name.as_str() {
        "vgg11" | "vgg11_bn" => variants(),
        "vgg16_bn" => vec![Variant::Spatial],
        "vgg13" | "vgg13_bn" | "vgg16" | "vgg19" | "vgg19_bn" => vec![Variant::Dense],
        _ => variants(),
    }
}

#[test]
fn every_zoo_model_and_variant_matches_the_eval_forward() {
    let mut seed = 1;
    for arch in Arch::all() {
        for variant in variants_of(&arch) {
            let config = ModelConfig::new(arch.clone(), variant)
                .with_num_classes(7)
                .with_in_channels(if matches!(arch, Arch::LeNet5) { 1 } else { 3 });
            let side = config.min_input().expect("a minimum input");
            seed += 1;
            let model = model(&config, seed);
            check(&model, [1, config.in_channels, side, side], seed);
            check(
                &model,
                [2, config.in_channels, side + 3, side + 1],
                seed + 100,
            );
        }
    }
}

#[test]
fn larger_inputs_and_batches_match_the_eval_forward() {
    for (name, variant, shape) in [
        ("vgg_small", "spatial", [4, 1, 28, 28]),
        ("vgg_small", "spatial+channel", [3, 1, 29, 31]),
        ("resnet18", "spatial", [2, 3, 64, 48]),
        ("resnet50", "spatial+channel", [1, 3, 65, 65]),
        ("lenet5", "spatial", [5, 1, 32, 32]),
        ("vgg_bn_fc6:64:16-M-32-M", "spatial+channel", [2, 1, 28, 28]),
        ("alexnet", "spatial", [1, 3, 67, 70]),
    ] {
        let config = ModelConfig::parse(name, variant)
            .unwrap()
            .with_in_channels(shape[1])
            .with_num_classes(10);
        check(&model(&config, 7), shape, 11);
    }
}

/// Networks run channels-last where the CPU has the kernels (and agree with the
/// channels-first plan): ResNets; VGGs, their poolings as steps of their own, their
/// `fc6` that reads the whole 7 x 7 map and a linear layer on a flattened map with the
/// weight's columns in channels-last order. Channel windows keep a network
/// channels-first.
#[test]
fn networks_run_channels_last_where_the_cpu_can() {
    let can = versatile::kernels::nhwc::available();
    // (model, variant, input, channels-last, some layers by Winograd's F(2 x 2, 3 x 3):
    // 3 x 3 stride-1 layers of at least 32 input channels, 64 primaries and 64 output
    // positions)
    let winograd = can && versatile::kernels::winograd::enabled();
    for (name, variant, shape, last, by_winograd) in [
        ("resnet18", "dense", [2, 3, 33, 40], can, winograd),
        ("resnet18", "spatial", [1, 3, 32, 32], can, false),
        ("resnet50", "spatial", [1, 3, 64, 64], can, winograd),
        ("resnet18", "spatial+channel", [1, 3, 32, 32], false, false),
        ("vgg_small", "spatial", [2, 1, 28, 28], can, winograd),
        (
            "vgg_bn_fc6:64:16-M-32-M",
            "dense",
            [2, 1, 28, 28],
            can,
            false,
        ),
        (
            "vgg_bn_fc6:64:16-M-32-M",
            "spatial",
            [1, 1, 28, 28],
            can,
            false,
        ),
        ("lenet5", "dense", [3, 1, 28, 28], can, false),
    ] {
        let config = ModelConfig::parse(name, variant)
            .unwrap()
            .with_in_channels(shape[1])
            .with_num_classes(10);
        let model = model(&config, 3);
        let mut plan = InferencePlan::compile(&model, shape).unwrap();
        assert_eq!(plan.channels_last(), last, "{name} {variant}");
        let mut first = InferencePlan::compile_channels_first(&model, shape).unwrap();
        assert!(
            !first.channels_last(),
            "{name} {variant}: channels-first asked"
        );
        let input: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|i| ((i * 7919) % 255) as f32 / 255.0 - 0.5)
            .collect();
        let want = first.run(&input).unwrap().to_vec();
        let got = plan.run(&input).unwrap().to_vec();
        let scale = max_abs(&want).max(1.0);
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 2e-4 * scale,
                "{name} {variant}: {a} against {b}"
            );
        }
        // Which ran by Winograd (the comparison above checks them).
        let steps = plan.profile(&input, 1).unwrap();
        let winograd_steps = steps
            .iter()
            .filter(|step| step.name.ends_with("by F(2x2,3x3)"))
            .count();
        assert_eq!(
            winograd_steps > 0,
            by_winograd,
            "{name} {variant}: {winograd_steps} steps by Winograd"
        );
    }
}

/// `vgg_small` spatial for one-channel images and ten classes.
fn grey_vgg_small(seed: u64) -> Model {
    let config = ModelConfig::parse("vgg_small", "spatial")
        .unwrap()
        .with_in_channels(1)
        .with_num_classes(10);
    model(&config, seed)
}

#[test]
fn inputs_the_plan_was_not_compiled_for_are_refused() {
    let model = grey_vgg_small(3);
    let mut plan = InferencePlan::compile(&model, [2, 1, 28, 28]).unwrap();
    let err = plan.run(&[0.0; 28 * 28]).unwrap_err();
    assert!(matches!(err, InferError::Input { got: 784, .. }), "{err}");
    let tensor = Tensor::<4>::zeros([1, 1, 28, 28], &Device::flex());
    assert!(matches!(
        plan.forward(tensor),
        Err(InferError::Shape { .. })
    ));
    // Shapes the model cannot take are refused at compile time.
    for shape in [[1, 3, 28, 28], [1, 1, 2, 2], [0, 1, 28, 28]] {
        let err = InferencePlan::compile(&model, shape).unwrap_err();
        assert!(!err.to_string().is_empty(), "{shape:?}");
    }
}

/// In a channels-first plan, VGG's 2 x 2 poolings run in the write of the convolutions
/// before them where those run on the shifted path (the comparisons above check the
/// values); others, and a pooling after anything but a convolution, stay steps of their
/// own. (A channels-last plan pools in steps of their own.)
#[test]
fn poolings_after_shifted_convolutions_run_in_their_write() {
    let model = grey_vgg_small(5);
    let shape = [2, 1, 28, 28];
    let mut plan = InferencePlan::compile_channels_first(&model, shape).unwrap();
    let input = vec![0.5; shape.iter().product()];
    let names: Vec<String> = plan
        .profile(&input, 1)
        .unwrap()
        .into_iter()
        .map(|step| step.name)
        .collect();
    let fused = names
        .iter()
        .filter(|n| n.ends_with("+ 2x2 max pool"))
        .count();
    let alone = names.iter().filter(|n| *n == "max pool").count();
    // 32-32-M-64-64-M-128-128-M on 28 x 28: the poolings at 28 x 28 and 14 x 14 follow
    // shifted convolutions; the one at 7 x 7 follows one on im2col, and its height is odd.
    assert_eq!((fused, alone), (2, 1), "{names:?}");
}
