//! `conv2d_forward` through the one-ring nested kernel against burn's own `conv2d` on
//! random dense configurations (non-square kernels, strides, dilations, Valid / Same /
//! asymmetric explicit padding, groups, with and without bias): output and the gradients
//! of `sum(out * r)` with respect to the input, the weight and the bias.

use crate::common;

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Device, Tensor};
use common::{host_any, relative_error, Rng};
use versatile::kernels::trace::{self, Layout, Pass};
use versatile::kernels::tuning::{self, Strategy, Tuning};
use versatile::layer::{conv2d_forward, conv_path_for, dense_conv_plan, pin_conv_path, ConvPath};

/// Output and gradients through `conv2d_forward` with the path pinned to `path`; checks
/// that the nested kernel ran (forward and backward, in `layout` when given) exactly
/// when `path` is `Nested`.
fn run(
    conv: &Conv2d,
    path: ConvPath,
    x: &Tensor<4>,
    r: &Tensor<4>,
    layout: Option<Layout>,
) -> Vec<Vec<f64>> {
    let _pin = pin_conv_path(path);
    let x = x.clone().require_grad();
    assert_eq!(conv_path_for(conv, &x), path);
    let ((out, grads), calls) = trace::record(|| {
        let out = conv2d_forward(conv, x.clone());
        let grads = (out.clone() * r.clone()).sum().backward();
        (out, grads)
    });
    if path == ConvPath::Nested {
        let passes: Vec<Pass> = calls.iter().map(|c| c.pass).collect();
        assert_eq!(passes, [Pass::Forward, Pass::Backward]);
        if let Some(layout) = layout {
            assert!(calls.iter().all(|c| c.layout == layout), "{calls:?}");
        }
    } else {
        assert!(
            calls.is_empty(),
            "burn's conv2d path ran the kernel: {calls:?}"
        );
    }
    let mut result = vec![
        host_any(out),
        host_any(x.grad(&grads).unwrap()),
        host_any(conv.weight.grad(&grads).unwrap()),
    ];
    if let Some(b) = &conv.bias {
        result.push(host_any(b.grad(&grads).unwrap()));
    }
    result
}

#[test]
fn nested_dense_conv_matches_burn_conv2d() {
    let device = Device::flex().autodiff();
    let mut rng = Rng(0xc0_2d);
    let mut failures = Vec::new();
    for case in 0..250 {
        let dtype = if case % 5 == 4 {
            DType::F64
        } else {
            DType::F32
        };
        let tolerance = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
        let groups = if rng.range(0, 3) == 0 {
            rng.range(2, 3)
        } else {
            1
        };
        let c = groups * rng.range(1, 6);
        let n = groups * rng.range(1, 6);
        let kernel = [rng.range(1, 5), rng.range(1, 5)];
        let stride = [rng.range(1, 3), rng.range(1, 3)];
        let dilation = [rng.range(1, 2), rng.range(1, 2)];
        let padding = match rng.range(0, 2) {
            0 => PaddingConfig2d::Valid,
            1 => PaddingConfig2d::Same,
            _ => PaddingConfig2d::Explicit(
                rng.range(0, 3),
                rng.range(0, 3),
                rng.range(0, 3),
                rng.range(0, 3),
            ),
        };
        let config = Conv2dConfig::new([c, n], kernel)
            .with_stride(stride)
            .with_dilation(dilation)
            .with_groups(groups)
            .with_padding(padding)
            .with_bias(rng.range(0, 3) > 0);
        let mut conv = config.init(&device);
        let weight_shape = conv.weight.dims();
        conv.weight = Param::from_tensor(rng.tensor(weight_shape, &device, dtype));
        if conv.bias.is_some() {
            conv.bias = Some(Param::from_tensor(rng.tensor([n], &device, dtype)));
        }
        let shape = [
            rng.range(1, 4),
            c,
            rng.range(kernel[0] * dilation[0], 14),
            rng.range(kernel[1] * dilation[1], 14),
        ];
        let x = rng.tensor(shape, &device, dtype);
        let out_shape = conv.forward(x.clone()).dims();
        let r = rng.tensor(out_shape, &device, dtype);
        let strategy = [Strategy::Auto, Strategy::Im2col, Strategy::Shifted][rng.range(0, 2)];
        let _tuning = tuning::scoped(Tuning {
            strategy,
            tile_columns: [None, Some(5), Some(23)][rng.range(0, 2)],
            // Parallel tasks from a few columns on, so small inputs split too.
            min_task_columns: 16,
            band_bytes: [0, tuning::BAND_BYTES][rng.range(0, 1)],
        });
        let layout = match strategy {
            Strategy::Im2col => Some(Layout::Im2col),
            Strategy::Shifted if stride == [1, 1] => Some(Layout::Shifted),
            Strategy::Shifted => Some(Layout::Im2col),
            _ => None,
        };
        let burn = run(&conv, ConvPath::Burn, &x, &r, None);
        let nested = run(&conv, ConvPath::Nested, &x, &r, layout);
        for (what, (got, want)) in ["out", "grad_x", "grad_weight", "grad_bias"]
            .iter()
            .zip(nested.iter().zip(&burn))
        {
            let err = relative_error(got, want);
            if err > tolerance {
                failures.push(format!(
                    "case {case} {what}: {err:.2e} ({config:?}, input {shape:?})"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn small_maps_skip_the_kernel_positions_that_read_padding_only() {
    // A padded 3 x 3 kernel at a 1 x 1 map reads its centre alone, and at stride 2 from
    // 2 x 2 its lower right 2 x 2: the narrowed plan runs, with the same outputs and
    // gradients (zero for the positions left out) as burn's conv2d.
    let device = Device::flex().autodiff();
    let mut rng = Rng(0xdead_7a95);
    for (side, stride, window) in [
        (1, 1, [[1, 1], [1, 1]]),
        (2, 2, [[1, 2], [1, 2]]),
        (1, 2, [[1, 1], [1, 1]]),
    ] {
        let config = Conv2dConfig::new([5, 7], [3, 3])
            .with_stride([stride; 2])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1));
        let mut conv = config.init(&device);
        let weight_shape = conv.weight.dims();
        conv.weight = Param::from_tensor(rng.tensor(weight_shape, &device, DType::F32));
        let shape = [4, 5, side, side];
        let plan = dense_conv_plan(&conv, shape).unwrap();
        assert_eq!(plan.on_live_window().map(|(_, w)| w), Some(window));
        let x = rng.tensor(shape, &device, DType::F32);
        let r = rng.tensor(conv.forward(x.clone()).dims(), &device, DType::F32);
        let burn = run(&conv, ConvPath::Burn, &x, &r, None);
        let nested = run(&conv, ConvPath::Nested, &x, &r, None);
        let weight_grad = &nested[2];
        for (what, (got, want)) in ["out", "grad_x", "grad_weight", "grad_bias"]
            .iter()
            .zip(nested.iter().zip(&burn))
        {
            let err = relative_error(got, want);
            assert!(err < 2e-5, "side {side}, {what}: relative error {err:.2e}");
        }
        // The positions left out get exactly zero.
        let [[y0, rows], [x0, cols]] = window;
        for (i, g) in weight_grad.iter().enumerate() {
            let (ky, kx) = ((i / 3) % 3, i % 3);
            if !(y0..y0 + rows).contains(&ky) || !(x0..x0 + cols).contains(&kx) {
                assert_eq!(*g, 0.0, "side {side}: weight gradient {i}");
            }
        }
    }
}

#[test]
fn burn_path_elsewhere_and_for_inputs_that_do_not_fit() {
    let device = Device::flex();
    let conv = Conv2dConfig::new([2, 3], [3, 3]).init(&device);
    // Too small for the kernel: burn's conv2d is the one to report it.
    let tiny = Tensor::<4>::zeros([1, 2, 2, 2], &device);
    assert_eq!(conv_path_for(&conv, &tiny), ConvPath::Burn);
    let half = Tensor::<4>::zeros([1, 2, 5, 5], (&device, DType::F16));
    assert_eq!(conv_path_for(&conv, &half), ConvPath::Burn);
}
