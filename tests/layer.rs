//! The layer's contract beyond the golden cases: typed configuration errors, clear input
//! errors, output shapes equal to the dense `Conv2d`'s, finite-difference gradients, and
//! the authors' initialisation.

use crate::common;

use burn::module::Param;
use burn::nn::conv::Conv2dConfig;
use burn::nn::PaddingConfig2d;
use burn::tensor::{DType, Device, Tensor, TensorData};
use common::{assert_close, host, host_any, Rng};
use versatile::layer::{
    authors_initializer, ChannelMode, VConv2dConfig, VConvConfigError, VConvShapeError,
};

fn config(c: usize, n: usize, d: usize) -> VConv2dConfig {
    VConv2dConfig::new([c, n], [d, d])
}

#[test]
fn invalid_configurations_name_the_problem() {
    let cases: Vec<(VConv2dConfig, VConvConfigError, &str)> = vec![
        (
            config(4, 8, 3).with_delta(4),
            VConvConfigError::DeltaTooLarge {
                delta: 4,
                in_channels: 4,
            },
            "delta = 4 must be smaller than in_channels = 4",
        ),
        (
            config(8, 8, 3).with_delta(2).with_g(0),
            VConvConfigError::ZeroG,
            "g (the channel stride) must be positive",
        ),
        (
            config(8, 8, 3).with_delta(3).with_g(2),
            VConvConfigError::GDoesNotDivideDelta { g: 2, delta: 3 },
            "g = 2 must divide delta = 3",
        ),
        (
            config(8, 12, 3).with_groups(4),
            VConvConfigError::PrimaryNotDivisibleByGroups {
                primary: 6,
                groups: 4,
            },
            "m = ceil(out_channels / (s * n_c)) = 6 is not divisible by groups = 4",
        ),
        (
            config(6, 8, 3).with_groups(4),
            VConvConfigError::InChannelsNotDivisibleByGroups {
                in_channels: 6,
                groups: 4,
            },
            "in_channels = 6 is not divisible by groups = 4",
        ),
        (
            config(8, 14, 3).with_groups(7),
            VConvConfigError::InChannelsNotDivisibleByGroups {
                in_channels: 8,
                groups: 7,
            },
            "not divisible by groups = 7",
        ),
        (
            config(8, 16, 5).with_groups(2),
            VConvConfigError::GroupsNeedFullBlocks {
                groups: 2,
                out_channels: 16,
                s: 3,
                primary: 6,
            },
            "out_channels = 16 must equal s * m = 3 * 6",
        ),
        (
            config(8, 16, 3).with_groups(2).with_delta(2),
            VConvConfigError::ChannelWithGroups {
                delta: 2,
                groups: 2,
            },
            "delta = 2) with groups = 2 are not supported",
        ),
        (
            config(4, 8, 0),
            VConvConfigError::ZeroKernel {
                height: 0,
                width: 0,
            },
            "kernel size must be positive, got 0x0",
        ),
        (
            VConv2dConfig::new([4, 8], [3, 5]),
            VConvConfigError::NonSquareKernel {
                height: 3,
                width: 5,
            },
            "square kernel, got 3x5",
        ),
        (
            config(4, 8, 3).with_stride([1, 0]),
            VConvConfigError::ZeroStride([1, 0]),
            "stride must be positive, got [1, 0]",
        ),
        (
            config(4, 8, 3).with_dilation([0, 1]),
            VConvConfigError::ZeroDilation([0, 1]),
            "dilation must be positive, got [0, 1]",
        ),
        (
            config(4, 8, 3).with_groups(0),
            VConvConfigError::ZeroGroups,
            "groups must be positive",
        ),
        (
            config(0, 8, 3),
            VConvConfigError::ZeroChannels {
                in_channels: 0,
                out_channels: 8,
            },
            "in_channels = 0",
        ),
    ];
    let device = Device::flex();
    for (cfg, expected, message) in cases {
        let err = cfg.validate().unwrap_err();
        assert_eq!(err, expected);
        assert!(
            err.to_string().contains(message),
            "'{err}' lacks '{message}'"
        );
        assert_eq!(cfg.try_init(&device).unwrap_err(), expected);
        // `init` panics with the same message.
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cfg.init(&device)))
            .unwrap_err();
        let text = panic.downcast_ref::<String>().unwrap();
        assert!(
            text.contains(&err.to_string()),
            "panic '{text}' differs from '{err}'"
        );
    }
}

#[test]
fn inputs_that_do_not_fit_get_clear_errors() {
    let device = Device::flex();
    let layer = config(3, 8, 5).with_dilation([2, 1]).init(&device);
    let err = layer
        .try_forward(Tensor::zeros([1, 3, 8, 20], &device))
        .unwrap_err();
    assert_eq!(
        err,
        VConvShapeError::InputTooSmall {
            height: 8,
            width: 20,
            padding: [0, 0, 0, 0],
            kernel: 5,
            dilation: [2, 1],
            extent: [9, 5],
        }
    );
    assert!(err
        .to_string()
        .contains("smaller than the kernel's extent 9x5"));
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        layer.forward(Tensor::zeros([1, 3, 4, 4], &device))
    }))
    .unwrap_err();
    assert!(panic
        .downcast_ref::<String>()
        .unwrap()
        .contains("smaller than the kernel"));

    let err = layer
        .try_forward(Tensor::zeros([1, 4, 16, 16], &device))
        .unwrap_err();
    assert_eq!(
        err,
        VConvShapeError::InputChannels {
            expected: 3,
            got: 4
        }
    );

    let wrong = Tensor::zeros([2, 3, 5, 5], &device);
    let err = layer.clone().load_authors_weight(wrong).unwrap_err();
    assert!(err.to_string().contains("expected [3, 3, 5, 5]"), "{err}");
}

#[test]
fn output_shape_equals_dense_conv2d() {
    let device = Device::flex();
    let paddings = [
        PaddingConfig2d::Valid,
        PaddingConfig2d::Same,
        PaddingConfig2d::Explicit(1, 1, 1, 1),
        PaddingConfig2d::Explicit(0, 2, 1, 3),
    ];
    for d in [1, 2, 3, 4, 5, 7] {
        for stride in [[1, 1], [2, 1], [3, 2]] {
            for dilation in [[1, 1], [2, 1]] {
                for padding in &paddings {
                    for (h, w) in [(13, 9), (16, 16)] {
                        let dense = Conv2dConfig::new([4, 6], [d, d])
                            .with_stride(stride)
                            .with_dilation(dilation)
                            .with_padding(padding.clone())
                            .init(&device);
                        let versatile = config(4, 6, d)
                            .with_stride(stride)
                            .with_dilation(dilation)
                            .with_padding(padding.clone())
                            .init(&device);
                        let x = Tensor::<4>::zeros([2, 4, h, w], &device);
                        let dense_dims = dense.forward(x.clone()).dims();
                        let ours = versatile.forward(x).dims();
                        assert_eq!(
                            ours, dense_dims,
                            "d {d} stride {stride:?} dilation {dilation:?} {padding:?} {h}x{w}"
                        );
                        assert_eq!(versatile.output_shape([2, 4, h, w]).unwrap(), ours);
                    }
                }
            }
        }
    }
}

/// Central-difference check of the autodiff gradients, in f64.
fn finite_difference_check(cfg: &VConv2dConfig, input: [usize; 4], rng: &mut Rng) {
    let device = Device::flex().autodiff();
    let f64_tensor = |shape: Vec<usize>, rng: &mut Rng| {
        let n = shape.iter().product();
        let values: Vec<f64> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        (values.clone(), shape)
    };
    let mut layer = cfg.init(&device);
    let (w, w_shape) = f64_tensor(layer.geometry().weight_shape().to_vec(), rng);
    let (b, b_shape) = f64_tensor(vec![layer.geometry().out_channels], rng);
    let (x, x_shape) = f64_tensor(input.to_vec(), rng);
    let out_shape = layer.output_shape(input).unwrap();
    let (r, r_shape) = f64_tensor(out_shape.to_vec(), rng);
    let make = |v: &[f64], s: &[usize]| -> TensorData { TensorData::new(v.to_vec(), s.to_vec()) };

    let loss_of = |w: &[f64], b: &[f64], x: &[f64]| -> f64 {
        let plain = Device::flex();
        let mut l = cfg.init(&plain);
        l.weight = Param::from_tensor(Tensor::from_data(make(w, &w_shape), (&plain, DType::F64)));
        if l.bias.is_some() {
            l.bias = Some(Param::from_tensor(Tensor::from_data(
                make(b, &b_shape),
                (&plain, DType::F64),
            )));
        }
        let out = l.forward(Tensor::<4>::from_data(
            make(x, &x_shape),
            (&plain, DType::F64),
        ));
        let r = Tensor::<4>::from_data(make(&r, &r_shape), (&plain, DType::F64));
        host_any((out * r).sum())[0]
    };

    layer.weight = Param::from_tensor(Tensor::from_data(make(&w, &w_shape), (&device, DType::F64)));
    if layer.bias.is_some() {
        layer.bias = Some(Param::from_tensor(Tensor::from_data(
            make(&b, &b_shape),
            (&device, DType::F64),
        )));
    }
    let xt = Tensor::<4>::from_data(make(&x, &x_shape), (&device, DType::F64)).require_grad();
    let rt = Tensor::<4>::from_data(make(&r, &r_shape), (&device, DType::F64));
    let grads = (layer.forward(xt.clone()) * rt).sum().backward();
    let grad_w = host_any(layer.weight.grad(&grads).unwrap());
    let grad_x = host_any(xt.grad(&grads).unwrap());
    let grad_b = layer
        .bias
        .as_ref()
        .map(|b| host_any(b.grad(&grads).unwrap()));

    let eps = 1e-5;
    let numeric = |which: usize, index: usize| -> f64 {
        let (mut wp, mut bp, mut xp) = (w.clone(), b.clone(), x.clone());
        let (mut wm, mut bm, mut xm) = (w.clone(), b.clone(), x.clone());
        match which {
            0 => {
                wp[index] += eps;
                wm[index] -= eps;
            }
            1 => {
                bp[index] += eps;
                bm[index] -= eps;
            }
            _ => {
                xp[index] += eps;
                xm[index] -= eps;
            }
        }
        (loss_of(&wp, &bp, &xp) - loss_of(&wm, &bm, &xm)) / (2.0 * eps)
    };
    let mut probe = |which: usize, analytic: &[f64], name: &str| {
        for _ in 0..6 {
            let index = rng.below(analytic.len());
            let expected = numeric(which, index);
            let got = analytic[index];
            assert!(
                (got - expected).abs() <= 1e-6 * (1.0 + expected.abs()),
                "{name}[{index}]: autodiff {got} vs finite difference {expected} for {cfg:?}"
            );
        }
    };
    probe(0, &grad_w, "grad_weight");
    if let Some(grad_b) = grad_b {
        probe(1, &grad_b, "grad_bias");
    }
    probe(2, &grad_x, "grad_x");
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(7);
    let cases = [
        (
            config(5, 9, 3)
                .with_padding(PaddingConfig2d::Same)
                .with_delta(2)
                .with_g(2),
            [2, 5, 6, 5],
        ),
        (
            config(6, 10, 5)
                .with_padding(PaddingConfig2d::Explicit(1, 0, 2, 1))
                .with_stride([2, 1])
                .with_dilation([1, 2])
                .with_bias(false),
            [1, 6, 9, 11],
        ),
        (
            config(4, 8, 3)
                .with_delta(2)
                .with_channel_mode(ChannelMode::Sliding),
            [2, 4, 5, 5],
        ),
        (
            config(8, 8, 4)
                .with_groups(2)
                .with_padding(PaddingConfig2d::Same),
            [1, 8, 7, 6],
        ),
    ];
    for (cfg, input) in cases {
        finite_difference_check(&cfg, input, &mut rng);
    }
}

#[test]
fn authors_initializer_is_kaiming_normal_fan_out() {
    let device = Device::flex();
    device.seed(3);
    let layer = config(64, 128, 3)
        .with_initializer(authors_initializer())
        .init(&device);
    // PyTorch's fan_out of the authors' [m, c, d, d] weight: m * d * d.
    let expected_std = (2.0 / (64.0 * 9.0f64)).sqrt();
    let values = host_any(layer.weight.val());
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
    assert!(mean.abs() < 0.05 * expected_std, "mean {mean}");
    assert!(
        (std / expected_std - 1.0).abs() < 0.03,
        "std {std} vs {expected_std}"
    );
}

/// The CPU training batch norm (`batch_norm_train`, NCHW kernels) against burn's own
/// `BatchNorm::forward` on the same module, `batch_norm_relu_train` against burn's batch
/// norm then ReLU, and `batch_norm_add_relu_train` against burn's batch norm, add and
/// ReLU, and `batch_norm_relu_max_pool_train` against burn's batch norm, ReLU and max
/// pooling (a 2x2 window, and ResNet's padded, overlapping 3x3 one with stride 2):
/// output, the gradients (the residual's included) and the running statistics, over
/// batches of one and more, odd planes and two steps; and the same bits on a second run.
#[test]
fn training_batch_norm_matches_burns() {
    use burn::nn::pool::MaxPool2dConfig;
    use burn::nn::BatchNormConfig;
    use burn::nn::PaddingConfig2d;
    use burn::tensor::activation::relu as burn_relu;
    use versatile::layer::{
        batch_norm_add_relu_train, batch_norm_relu_max_pool_train, batch_norm_relu_train,
        batch_norm_train,
    };

    #[derive(Debug, Clone, Copy)]
    enum Then {
        Nothing,
        Relu,
        AddRelu,
        /// A max pool: window, stride and padding (each the same on both axes).
        ReluMaxPool(usize, usize, usize),
    }
    let device = Device::flex().autodiff();
    let mut rng = Rng(0x626e);
    let shapes = [[4, 3, 5, 7], [1, 6, 3, 3], [6, 5, 1, 1], [3, 2, 9, 11]];
    let modes = [
        Then::Nothing,
        Then::Relu,
        Then::AddRelu,
        Then::ReluMaxPool(2, 2, 0),
        Then::ReluMaxPool(3, 2, 1),
    ];
    for (then, shape) in modes
        .into_iter()
        .flat_map(|then| shapes.map(|shape| (then, shape)))
        // A 2x2 window needs a map of at least 2x2 (the 3x3 one is padded).
        .filter(|(then, shape)| {
            !matches!(then, Then::ReluMaxPool(2, ..)) || shape[2].min(shape[3]) >= 2
        })
    {
        let pool = match then {
            Then::ReluMaxPool(kernel, stride, pad) => MaxPool2dConfig::new([kernel; 2])
                .with_strides([stride; 2])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .init(),
            _ => MaxPool2dConfig::new([1, 1]).init(),
        };
        let theirs_forward = |norm: &burn::nn::BatchNorm, x: Tensor<4>, res: Tensor<4>| {
            let y = norm.forward(x);
            match then {
                Then::Nothing => y,
                Then::Relu => burn_relu(y),
                Then::AddRelu => burn_relu(y + res),
                Then::ReluMaxPool(..) => pool.forward(burn_relu(y)),
            }
        };
        let ours_forward = |norm: &burn::nn::BatchNorm, x: Tensor<4>, res: Tensor<4>| match then {
            Then::Nothing => batch_norm_train(norm, x),
            Then::Relu => batch_norm_relu_train(norm, x),
            Then::AddRelu => batch_norm_add_relu_train(norm, x, res),
            Then::ReluMaxPool(..) => batch_norm_relu_max_pool_train(norm, &pool, x),
        };
        let channels = shape[1];
        let gamma = rng.tensor([channels], &device, DType::F32) + 1.5;
        let beta = rng.tensor([channels], &device, DType::F32);
        // Two modules built apart: a clone would share its running statistics.
        let make = || {
            let mut norm = BatchNormConfig::new(channels)
                .with_momentum(0.3)
                .init(&device);
            norm.gamma = Param::from_tensor(gamma.clone().detach());
            norm.beta = Param::from_tensor(beta.clone().detach());
            norm
        };
        let (theirs, ours) = (make(), make());
        let twin = make();
        let bits = |v: &[Vec<f64>]| v.concat().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for step in 0..2 {
            let x = (rng.tensor(shape, &device, DType::F32) * 3.0 + 0.5).require_grad();
            let out_shape = theirs_forward(&make(), x.clone().detach(), x.clone().detach()).dims();
            let r = rng.tensor(out_shape, &device, DType::F32);
            let res = rng.tensor(shape, &device, DType::F32);
            type Step<'a> = &'a dyn Fn(Tensor<4>, Tensor<4>) -> Tensor<4>;
            let run = |f: Step, norm: &burn::nn::BatchNorm| {
                let x = x.clone().detach().require_grad();
                let res = res.clone().detach().require_grad();
                let out = f(x.clone(), res.clone());
                let grads = (out.clone() * r.clone()).sum().backward();
                vec![
                    host_any(out),
                    host_any(x.grad(&grads).unwrap()),
                    host_any(norm.gamma.grad(&grads).unwrap()),
                    host_any(norm.beta.grad(&grads).unwrap()),
                    res.grad(&grads).map(host_any).unwrap_or_default(),
                ]
            };
            let want = run(&|x, res| theirs_forward(&theirs, x, res), &theirs);
            let got = run(&|x, res| ours_forward(&ours, x, res), &ours);
            let stats = |norm: &burn::nn::BatchNorm| {
                vec![
                    host_any(norm.running_mean.value_sync()),
                    host_any(norm.running_var.value_sync()),
                ]
            };
            let (want_stats, got_stats) = (stats(&theirs), stats(&ours));
            let names = [
                "out",
                "grad_x",
                "grad_gamma",
                "grad_beta",
                "grad_residual",
                "running_mean",
                "running_var",
            ];
            let pairs = want
                .iter()
                .chain(&want_stats)
                .zip(got.iter().chain(&got_stats));
            for (name, (w, g)) in names.iter().zip(pairs) {
                let err = common::relative_error(g, w);
                assert!(
                    err < 1e-5,
                    "{shape:?} {then:?} step {step} {name}: relative error {err:.2e}"
                );
            }
            let again = run(&|x, res| ours_forward(&twin, x, res), &twin);
            assert_eq!(
                bits(&got),
                bits(&again),
                "{shape:?} step {step}: a second run differs"
            );
        }
    }
}

/// A convolution that takes its output's batch statistics as it writes it (dense with
/// bias, versatile without): the statistics are the output's, and a training batch norm
/// fed them gives the output, gradients and running statistics it gives when it takes
/// them itself; where the kernel does not take them (f64) there are none.
#[test]
fn a_convolution_takes_the_batch_statistics_of_its_output() {
    use burn::nn::BatchNormConfig;
    use versatile::layer::{batch_norm_relu_train, conv2d_forward_measured, Activation};

    let device = Device::flex().autodiff();
    let mut rng = Rng(0x6d65_6173);
    let mut versatile_config = config(8, 16, 3).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1));
    versatile_config.bias = false;
    let versatile = versatile_config.init(&device);
    let dense = Conv2dConfig::new([8, 12], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    type Measured<'a> = &'a dyn Fn(Tensor<4>, bool) -> (Tensor<4>, Option<Tensor<2>>);
    let layers: [(&str, Measured, usize); 2] = [
        (
            "versatile",
            &|x, stats| versatile.forward_measured(x, stats),
            16,
        ),
        (
            "dense",
            &|x, stats| conv2d_forward_measured(&dense, x, stats),
            12,
        ),
    ];
    for (what, forward, channels) in layers {
        let x = rng.tensor([6, 8, 9, 11], &device, DType::F32) + 0.5;
        let (y, stats) = forward(x.clone(), true);
        let stats = stats.unwrap_or_else(|| panic!("{what}: no statistics"));
        assert_eq!(stats.dims(), [2, channels], "{what}");
        let per_channel = y
            .clone()
            .detach()
            .swap_dims(0, 1)
            .reshape([channels, 6 * 9 * 11]);
        let mean = per_channel.clone().mean_dim(1);
        let variance = (per_channel - mean.clone()).powi_scalar(2).mean_dim(1);
        let stats = host_any(stats);
        assert_close(
            &format!("{what}: means"),
            &stats[..channels],
            &host_any(mean),
            1e-5,
        );
        assert_close(
            &format!("{what}: variances"),
            &stats[channels..],
            &host_any(variance),
            1e-5,
        );

        // The batch norm after it, fed the convolution's statistics or taking its own.
        let r = rng.tensor([6, channels, 9, 11], &device, DType::F32);
        let run = |measured: bool| {
            let norm = BatchNormConfig::new(channels).init(&device);
            let x = x.clone().detach().require_grad();
            let y = if measured {
                let (values, batch_stats) = forward(x.clone(), true);
                batch_norm_relu_train(
                    &norm,
                    Activation {
                        values,
                        batch_stats,
                    },
                )
            } else {
                batch_norm_relu_train(&norm, forward(x.clone(), false).0)
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            [
                host_any(y),
                host_any(x.grad(&grads).unwrap()),
                host(norm.running_mean.value_sync()),
                host(norm.running_var.value_sync()),
            ]
        };
        let (measured, own) = (run(true), run(false));
        for (part, (got, want)) in ["output", "input gradient", "running mean", "running var"]
            .iter()
            .zip(measured.iter().zip(&own))
        {
            assert_close(&format!("{what}: {part}"), got, want, 1e-4);
        }
    }
    // No statistics where the kernel does not take them.
    let plain = Device::flex();
    let x = rng.tensor([2, 8, 5, 5], &plain, DType::F64);
    let mut layer = config(8, 16, 3).init(&plain);
    layer.weight = Param::from_tensor(layer.weight.val().cast(DType::F64));
    layer.bias = layer
        .bias
        .map(|b| Param::from_tensor(b.val().cast(DType::F64)));
    let (y, stats) = layer.forward_measured(x, true);
    assert_eq!(y.dtype(), DType::F64);
    assert!(stats.is_none());
}
