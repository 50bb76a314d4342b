//! The fused nested kernel against the dense form on random configurations: output and
//! the gradients of `sum(out * r)` with respect to the input, the weight and the bias.
//!
//! Configurations cover strides, Valid / Same / explicit (asymmetric, cropping) padding,
//! dilations, channel windows (delta, g, both modes), groups, even and 1x1 kernels, cut
//! blocks (n not divisible by s * n_c) and batch sizes; every kernel layout (im2col
//! tiles, shifted views at stride 1, weight streaming) runs; the kernel's tiles are made small so that tile
//! borders fall inside rows and between images, and its parallel split kicks in on small
//! inputs.

use crate::common;

use std::collections::HashMap;

use burn::module::Param;
use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Device, Tensor};
use common::{host_any, random_case, relative_error, run_on_path, Outputs, Rng};
use versatile::kernels::trace::{self, Executed, Layout, Pass};
use versatile::kernels::tuning::{self, Strategy, Tuning};
use versatile::layer::{ChannelMode, ForwardPath, VConv2d, VConv2dConfig, VConvShapeError};

/// Output and gradients (input, weight, bias) of `sum(out * r)` through `path`, and the
/// kernel calls that ran.
fn run(
    layer: &VConv2d,
    path: ForwardPath,
    x: &Tensor<4>,
    r: &Tensor<4>,
) -> (Outputs, Vec<Executed>) {
    trace::record(|| run_on_path(layer, path, x, r))
}

/// The layout a forced `strategy` must run for `config` (`None`: `Auto` chooses).
fn forced_layout(strategy: Strategy, config: &VConv2dConfig) -> Option<Layout> {
    let covering_window = config.groups == 1 && config.delta == 0;
    match strategy {
        Strategy::Auto => None,
        Strategy::Im2col => Some(Layout::Im2col),
        Strategy::Shifted if config.stride == [1, 1] => Some(Layout::Shifted),
        Strategy::Stream if covering_window => Some(Layout::Streaming),
        Strategy::Shifted | Strategy::Stream => Some(Layout::Im2col),
    }
}

/// Compares the two paths on `cases` random configurations in `dtype`, with parallel
/// tasks from `min_task_columns` columns on; checks that every forced layout ran where
/// it applies and returns how often each layout ran.
fn compare_random(
    seed: u64,
    cases: usize,
    dtype: DType,
    tolerance: f64,
    min_task_columns: usize,
) -> HashMap<Layout, usize> {
    let device = Device::flex().autodiff();
    let mut rng = Rng(seed);
    let mut failures = Vec::new();
    let mut layouts = HashMap::new();
    for case in 0..cases {
        let (config, shape) = random_case(&mut rng);
        // Small, odd tiles: borders inside output rows and between images.
        let tile_columns = Some(rng.pick(&[0, 7, 13, 40])).filter(|&t| t > 0);
        // Every layout: im2col tiles, shifted views (stride 1 only), weight streaming
        // (one covering window only).
        let strategy = rng.pick(&[
            Strategy::Auto,
            Strategy::Im2col,
            Strategy::Shifted,
            Strategy::Stream,
        ]);
        // The shifted path pads these small images whole, or a band of rows per tile.
        let band_bytes = rng.pick(&[0, tuning::BAND_BYTES]);
        let _tuning = tuning::scoped(Tuning {
            strategy,
            tile_columns,
            min_task_columns,
            band_bytes,
        });
        let mut layer = config.init(&device);
        let weight_shape = layer.weight.dims();
        layer.weight = Param::from_tensor(rng.tensor(weight_shape, &device, dtype));
        if layer.bias.is_some() {
            let n = config.channels[1];
            layer.bias = Some(Param::from_tensor(rng.tensor([n], &device, dtype)));
        }
        let x = rng.tensor(shape, &device, dtype);
        let out_shape = layer.output_shape(shape).unwrap();
        let r = rng.tensor(out_shape, &device, dtype);
        let (dense, dense_calls) = run(&layer, ForwardPath::DenseForm, &x, &r);
        let (fused, calls) = run(&layer, ForwardPath::Fused, &x, &r);
        assert!(dense_calls.is_empty(), "the dense form ran the kernel");
        let passes: Vec<Pass> = calls.iter().map(|c| c.pass).collect();
        assert_eq!(passes, [Pass::Forward, Pass::Backward], "case {case}");
        if let Some(layout) = forced_layout(strategy, &config) {
            assert!(
                calls.iter().all(|c| c.layout == layout),
                "case {case}: {strategy:?} ran {calls:?} ({config:?})"
            );
        }
        *layouts.entry(calls[0].layout).or_insert(0) += 1;
        let mut check = |what: &str, got: &[f64], want: &[f64]| {
            let err = relative_error(got, want);
            if err > tolerance {
                failures.push(format!(
                    "case {case} {what}: relative error {err:.2e} ({config:?}, input {shape:?})"
                ));
            }
        };
        check("out", &fused.0, &dense.0);
        check("grad_x", &fused.1, &dense.1);
        check("grad_weight", &fused.2, &dense.2);
        if let (Some(f), Some(d)) = (&fused.3, &dense.3) {
            check("grad_bias", f, d);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    layouts
}

#[test]
fn fused_matches_dense_form_on_random_configurations() {
    // Parallel tasks from a few columns on, so small inputs split too.
    let layouts = compare_random(0x5eed_0001, 600, DType::F32, 2e-5, 16);
    for layout in [Layout::Im2col, Layout::Shifted, Layout::Streaming] {
        let runs = layouts.get(&layout).copied().unwrap_or(0);
        assert!(runs >= 10, "{layout:?} ran {runs} times: {layouts:?}");
    }
    compare_random(0x5eed_0002, 120, DType::F64, 1e-12, 16);
}

/// Asserts that the output and the input and weight gradients of `fused` are within
/// `2e-5` (relative) of `dense`'s.
fn assert_close(fused: &Outputs, dense: &Outputs, context: &str) {
    for (what, got, want) in [
        ("out", &fused.0, &dense.0),
        ("grad_x", &fused.1, &dense.1),
        ("grad_weight", &fused.2, &dense.2),
    ] {
        let err = relative_error(got, want);
        assert!(err < 2e-5, "{context}, {what}: relative error {err:.2e}");
    }
}

#[test]
fn fused_handles_wide_layers_with_parallel_tasks() {
    // Default tiling: several tiles per task, two tasks, cut blocks, channel windows; few
    // and many input channels (the input-gradient tile changes layout at 32).
    let device = Device::flex().autodiff();
    let mut rng = Rng(7);
    for (c, n, mode) in [
        (24, 50, ChannelMode::Sliding),
        (44, 38, ChannelMode::Shared),
    ] {
        let config = VConv2dConfig::new([c, n], [5, 5])
            .with_padding(PaddingConfig2d::Explicit(1, 2, 3, 0))
            .with_delta(4)
            .with_g(2)
            .with_channel_mode(mode);
        let mut layer = config.init(&device);
        let weight_shape = layer.weight.dims();
        layer.weight = Param::from_tensor(rng.tensor(weight_shape, &device, DType::F32));
        let x = rng.tensor([4, c, 30, 33], &device, DType::F32);
        let r = rng.tensor(layer.output_shape(x.dims()).unwrap(), &device, DType::F32);
        // Two threads whatever the machine: two parallel tasks, forward and backward.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (dense, _) = pool.install(|| run(&layer, ForwardPath::DenseForm, &x, &r));
        let (fused, calls) = pool.install(|| run(&layer, ForwardPath::Fused, &x, &r));
        assert!(calls.iter().all(|c| c.tasks == 2), "{calls:?}");
        assert_close(&fused, &dense, &format!("c = {c}"));
    }
}

#[test]
fn small_maps_skip_the_kernel_positions_that_read_padding_only() {
    // ResNet's last stage at 32 x 32 inputs: 2 x 2 -> 1 x 1 at stride 2 (both rings keep
    // positions) and 1 x 1 maps (the outer ring reads padding only: the narrowed plan
    // computes the inner crop once for both); same outputs and gradients as the dense
    // form, with and without a bias, with a cut block.
    let device = Device::flex().autodiff();
    let mut rng = Rng(0x11fe);
    for (side, stride, n, bias, narrowed) in [
        (2, 2, 8, true, true),
        (1, 1, 8, true, false),
        (1, 2, 7, false, false),
        (1, 1, 3, true, false),
    ] {
        let config = VConv2dConfig::new([6, n], [3, 3])
            .with_stride([stride; 2])
            .with_bias(bias)
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1));
        let mut layer = config.init(&device);
        let weight_shape = layer.weight.dims();
        layer.weight = Param::from_tensor(rng.tensor(weight_shape, &device, DType::F32));
        if bias {
            layer.bias = Some(Param::from_tensor(rng.tensor([n], &device, DType::F32)));
        }
        let shape = [3, 6, side, side];
        let plan = layer
            .geometry()
            .plan(shape, layer.check_input(&shape).unwrap())
            .unwrap();
        assert_eq!(plan.on_live_window().is_some(), narrowed, "side {side}");
        let x = rng.tensor(shape, &device, DType::F32);
        let r = rng.tensor(layer.output_shape(shape).unwrap(), &device, DType::F32);
        let (dense, _) = run(&layer, ForwardPath::DenseForm, &x, &r);
        let (fused, calls) = run(&layer, ForwardPath::Fused, &x, &r);
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_close(&fused, &dense, &format!("side {side}"));
        if let (Some(f), Some(d)) = (&fused.3, &dense.3) {
            let err = relative_error(f, d);
            assert!(
                err < 2e-5,
                "side {side}, grad_bias: relative error {err:.2e}"
            );
        }
    }
}

#[test]
fn plain_device_forward_matches_and_auto_picks_fused_on_flex() {
    let device = Device::flex();
    let layer = VConv2dConfig::new([5, 9], [3, 3])
        .with_padding(PaddingConfig2d::Same)
        .init(&device);
    let mut rng = Rng(11);
    let x = rng.tensor([2, 5, 8, 6], &device, DType::F32);
    assert_eq!(layer.path_for(&x).unwrap(), ForwardPath::Fused);
    let fused = host_any(layer.forward(x.clone()));
    let dense = host_any(layer.clone().with_path(ForwardPath::DenseForm).forward(x));
    assert!(relative_error(&fused, &dense) < 2e-5);
}

#[test]
fn forcing_fused_on_an_unsupported_dtype_is_an_error() {
    let device = Device::flex();
    let layer = VConv2dConfig::new([2, 4], [3, 3])
        .init(&device)
        .with_path(ForwardPath::Fused);
    let x = Tensor::<4>::zeros([1, 2, 5, 5], (&device, DType::F16));
    match layer.try_forward(x.clone()) {
        Err(VConvShapeError::FusedUnavailable { input_dtype, .. }) => {
            assert!(input_dtype.contains("F16"), "{input_dtype}")
        }
        other => panic!("expected FusedUnavailable, got {other:?}"),
    }
    // Auto falls back to the dense form for it.
    let auto = layer.with_path(ForwardPath::Auto);
    assert_eq!(auto.path_for(&x).unwrap(), ForwardPath::DenseForm);
}

#[test]
fn weight_gradients_without_an_input_gradient() {
    // A first layer: the input does not require a gradient, so the backward pass computes
    // only the weight and bias gradients (in every layout).
    let device = Device::flex().autodiff();
    let mut rng = Rng(23);
    for strategy in [Strategy::Im2col, Strategy::Shifted, Strategy::Stream] {
        let config = VConv2dConfig::new([20, 30], [3, 3]).with_padding(PaddingConfig2d::Same);
        let mut layer = config.init(&device);
        let weight_shape = layer.weight.dims();
        layer.weight = Param::from_tensor(rng.tensor(weight_shape, &device, DType::F32));
        let x = rng.tensor([2, 20, 12, 13], &device, DType::F32);
        let r = rng.tensor([2, 30, 12, 13], &device, DType::F32);
        let grads_of = |path: ForwardPath| {
            let _tuning = tuning::scoped(Tuning {
                strategy,
                ..Tuning::default()
            });
            let layer = layer.clone().with_path(path);
            let (grads, calls) =
                trace::record(|| (layer.forward(x.clone()) * r.clone()).sum().backward());
            assert!(x.grad(&grads).is_none());
            let expected = forced_layout(strategy, &config).unwrap();
            if path == ForwardPath::Fused {
                assert!(calls.len() == 2 && calls.iter().all(|c| c.layout == expected));
            }
            (
                host_any(layer.weight.grad(&grads).unwrap()),
                host_any(layer.bias.as_ref().unwrap().grad(&grads).unwrap()),
            )
        };
        let fused = grads_of(ForwardPath::Fused);
        let dense = grads_of(ForwardPath::DenseForm);
        assert!(
            relative_error(&fused.0, &dense.0) < 2e-5,
            "{strategy:?} weight"
        );
        assert!(
            relative_error(&fused.1, &dense.1) < 2e-5,
            "{strategy:?} bias"
        );
    }
}
