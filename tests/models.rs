//! The model zoo: forward shapes layer by layer against the cost report, the published
//! whole-network figures, parameter savings against the per-layer formulas, clear
//! errors below the minimum input, initialization and gradients.
//!
//! Actual forward passes run for every small model and every variant, for every ResNet
//! variant, AlexNet, and one ImageNet VGG per code path (`vgg11` dense at 224×224,
//! `vgg11_bn` spatial + channel at its 32×32 minimum); the other ImageNet VGGs are
//! table rows of the same code and are checked through the traced report only (their
//! initialization alone takes seconds). Batches are 1 or 2 images.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use versatile::layer::ChannelMode;
use versatile::models::{
    Arch, ConvLayer, CostReport, FeatureLayer, ImageClassifier, Model, ModelConfig, ModelError,
    Modules, Variant,
};

const VARIANTS: [&str; 4] = [
    "dense",
    "spatial",
    "spatial+channel",
    "spatial+channel:delta=2,g=2,mode=sliding",
];

fn config(name: &str, variant: &str) -> ModelConfig {
    ModelConfig::parse(name, variant).unwrap_or_else(|err| panic!("{name} {variant}: {err}"))
}

fn random_input(batch: usize, config: &ModelConfig, hw: [usize; 2], device: &Device) -> Tensor<4> {
    Tensor::random(
        [batch, config.in_channels, hw[0], hw[1]],
        Distribution::Normal(0.0, 1.0),
        device,
    )
}

fn row<'a>(report: &'a CostReport, name: &str) -> &'a [usize] {
    &report
        .layers
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("{}: no row {name}", report.model))
        .output
}

/// Runs `model` on a `[batch, C, H, W]` input and checks every intermediate shape
/// against the traced report, then the logits.
fn check_forward(model: &Model, hw: [usize; 2], batch: usize, device: &Device) {
    let config = model.config().clone();
    let what = format!(
        "{} {} at {}x{}",
        config.name(),
        config.variant,
        hw[0],
        hw[1]
    );
    let report = config.cost_report(hw).unwrap();
    let input = random_input(batch, &config, hw, device);
    let per_image = |dims: [usize; 4]| {
        assert_eq!(dims[0], batch, "{what}");
        dims[1..].to_vec()
    };
    match model {
        Model::ConvNet(net) => {
            let mut x = input.clone();
            for (i, layer) in net.features.iter().enumerate() {
                x = layer.walk(&mut Modules, x.into()).unwrap().values;
                let name = format!("features.{i}");
                assert_eq!(per_image(x.dims()), row(&report, &name), "{what}: {name}");
            }
        }
        Model::ResNet(net) => {
            let mut x = net.conv1.forward(input.clone());
            x = net.maxpool.forward(net.relu.forward(net.bn1.forward(x)));
            assert_eq!(per_image(x.dims()), row(&report, "maxpool"), "{what}");
            let stages = [&net.layer1, &net.layer2, &net.layer3, &net.layer4];
            for (s, blocks) in stages.into_iter().enumerate() {
                for (b, block) in blocks.iter().enumerate() {
                    x = block.walk(&mut Modules, x.into()).unwrap().values;
                    let name = format!("layer{}.{b}.add", s + 1);
                    assert_eq!(per_image(x.dims()), row(&report, &name), "{what}: {name}");
                }
            }
        }
    }
    let logits = model.try_forward(input).unwrap();
    assert_eq!(logits.dims(), [batch, config.num_classes], "{what}");
    assert_eq!(report.output(), [config.num_classes]);
    let values = logits.into_data().try_to_vec::<f32>().unwrap();
    assert!(
        values.iter().all(|v| v.is_finite()),
        "{what}: non-finite logits"
    );
}

/// Builds `name` in each variant and runs it at its minimum and the given sizes.
fn forward_all_variants(name: &str, variants: &[&str], sizes: &[[usize; 2]], batch: usize) {
    let device = Device::flex();
    for variant in variants {
        let config = config(name, variant);
        let min = config.min_input().unwrap();
        let model = config.init(&device).unwrap();
        check_forward(&model, [min, min], batch, &device);
        for &hw in sizes {
            check_forward(&model, hw, batch, &device);
        }
    }
}

#[test]
fn small_models_forward_in_every_variant() {
    forward_all_variants("vgg_small", &VARIANTS, &[[28, 28], [32, 32], [28, 32]], 2);
    forward_all_variants("lenet5", &VARIANTS, &[[28, 28], [32, 32]], 2);
    forward_all_variants("vgg11_small", &VARIANTS, &[[28, 28], [32, 32]], 2);
    forward_all_variants("vgg16_bn_small", &VARIANTS, &[[28, 28], [32, 32]], 2);
    // A custom table, on one-channel images.
    let device = Device::flex();
    let config = config("vgg:8-M-16-M", "spatial").with_in_channels(1);
    check_forward(&config.init(&device).unwrap(), [28, 28], 2, &device);
}

#[test]
fn resnets_forward_in_every_variant() {
    forward_all_variants("resnet18", &VARIANTS, &[[224, 224], [64, 48]], 1);
    forward_all_variants("resnet50", &VARIANTS[..3], &[[224, 224]], 1);
    forward_all_variants("resnet34", &["spatial+channel"], &[[224, 224]], 1);
}

#[test]
fn alexnet_forwards_in_every_variant() {
    forward_all_variants("alexnet", &VARIANTS[..3], &[[224, 224]], 1);
}

#[test]
fn imagenet_vggs_forward() {
    let device = Device::flex();
    let dense = config("vgg11", "dense").init(&device).unwrap();
    check_forward(&dense, [224, 224], 1, &device);
    let versatile = config("vgg11_bn", "spatial+channel").init(&device).unwrap();
    check_forward(&versatile, [32, 32], 1, &device);
}

#[test]
fn every_model_and_variant_traces_at_its_minimum_and_standard_size() {
    for arch in Arch::all() {
        for variant in VARIANTS {
            let config = ModelConfig::new(arch.clone(), variant.parse().unwrap());
            let side = arch.default_input();
            let min = config.min_input().unwrap();
            for hw in [[min, min], [side, side]] {
                let report = config.cost_report(hw).unwrap();
                assert_eq!(report.output(), [config.num_classes], "{arch} {variant}");
            }
            assert!(
                config.cost_report([min - 1, min - 1]).is_err(),
                "{arch} {variant}: {} should be too small",
                min - 1
            );
        }
    }
}

#[test]
fn minimum_inputs_are_the_known_ones() {
    // torchvision's documented minimum sizes: VGG 32, AlexNet 63, ResNet 1.
    for (name, min) in [
        ("vgg16", 32),
        ("vgg11_bn", 32),
        ("alexnet", 63),
        ("resnet50", 1),
        // LeNet-5: 28 -> 28 -> 14 needs >= 5 for conv2 and its output >= 2 for the pool.
        ("lenet5", 12),
        // Ceil-mode pools: three need 5 (5, 3, 2, 1), five need 17.
        ("vgg_small", 5),
        ("vgg16_small", 17),
    ] {
        for variant in ["dense", "spatial+channel"] {
            assert_eq!(config(name, variant).min_input(), Some(min), "{name}");
        }
    }
}

#[test]
fn inputs_below_the_minimum_get_a_clear_error() {
    let err = config("vgg16", "spatial")
        .cost_report([31, 31])
        .unwrap_err();
    match &err {
        ModelError::InputTooSmall {
            min, layer, height, ..
        } => {
            assert_eq!((*min, *height), (32, 31));
            assert_eq!(layer, "features.30", "the fifth max pool gets a 1x1 map");
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err
        .to_string()
        .contains("smallest square input it takes is 32x32"));

    // A built model refuses the input instead of panicking inside burn.
    let device = Device::flex();
    let small = config("vgg_small", "spatial").init(&device).unwrap();
    let err = small
        .try_forward(Tensor::zeros([2, 3, 4, 4], &device))
        .unwrap_err();
    assert!(
        matches!(err, ModelError::InputTooSmall { min: 5, .. }),
        "{err}"
    );
    let err = small
        .try_forward(Tensor::zeros([2, 1, 28, 28], &device))
        .unwrap_err();
    assert_eq!(
        err,
        ModelError::InputChannels {
            model: "vgg_small".into(),
            expected: 3,
            got: 1
        }
    );
    let lenet = config("lenet5", "dense").init(&device).unwrap();
    assert!(matches!(
        lenet.try_forward(Tensor::zeros([1, 1, 11, 30], &device)),
        Err(ModelError::InputTooSmall { min: 12, .. })
    ));
}

#[test]
fn bad_names_settings_and_variants_are_refused() {
    assert!(matches!(
        ModelConfig::parse("vgg17", "dense"),
        Err(ModelError::UnknownModel { .. })
    ));
    assert!(matches!(
        ModelConfig::parse("vgg16", "channel"),
        Err(ModelError::Variant(_))
    ));
    let zero = config("resnet18", "dense").with_num_classes(0);
    assert!(matches!(
        zero.cost_report([224, 224]),
        Err(ModelError::Zero {
            what: "num_classes"
        })
    ));
}

fn millions(v: u64) -> f64 {
    v as f64 / 1e6
}

fn giga(v: u64) -> f64 {
    v as f64 / 1e9
}

fn mib(params: u64) -> f64 {
    (params * 4) as f64 / (1u64 << 20) as f64
}

/// `value` truncated to one decimal, as the paper prints its MB.
fn truncated(value: f64) -> f64 {
    (value * 10.0).floor() / 10.0
}

fn imagenet_report(name: &str, variant: &str) -> CostReport {
    config(name, variant).cost_report([224, 224]).unwrap()
}

#[test]
fn vgg16_figures_agree_with_spec() {
    let dense = imagenet_report("vgg16", "dense").total();
    // torchvision's vgg16 has 138,357,544 parameters; the 7x7 fc6 conv has the same
    // count as its Linear(25088, 4096).
    assert_eq!(dense.params, 138_357_544);
    assert_eq!(format!("{:.2}", millions(dense.params)), "138.36");
    assert_eq!(format!("{:.2}", giga(dense.macs_paper)), "15.47");
    assert_eq!(dense.macs_paper, dense.macs_dense);

    let spatial = imagenet_report("vgg16", "spatial").total();
    assert_eq!(format!("{:.2}", millions(spatial.params)), "53.93");
    assert_eq!(format!("{:.2}", giga(spatial.macs_paper)), "8.59");
    assert_eq!(spatial.macs_dense, dense.macs_dense);
    assert!(spatial.macs_nested < spatial.macs_paper);
}

#[test]
fn resnet50_figures_agree_with_the_paper() {
    let dense = imagenet_report("resnet50", "dense");
    let v1 = imagenet_report("resnet50", "spatial");
    let v2 = imagenet_report("resnet50", "spatial+channel");
    // torchvision's resnet50 has 25,557,032 parameters.
    assert_eq!(dense.total().params, 25_557_032);
    assert_eq!(format!("{:.1}", giga(dense.total().macs_paper)), "4.1");
    assert_eq!(format!("{:.1}", giga(v1.total().macs_paper)), "3.2");
    assert_eq!(format!("{:.1}", millions(v2.total().params)), "11.0");

    // MB: conv + fc parameters (no batch norm) as the authors allocate them, in MiB,
    // truncated: 97.2 / 75.6 / 41.7.
    let authors_mb = |r: &CostReport| truncated(mib(r.params_authors() - r.params_batch_norm()));
    assert_eq!(authors_mb(&dense), 97.2);
    assert_eq!(authors_mb(&v1), 75.6);
    assert_eq!(authors_mb(&v2), 41.7);
    // What we store for v2 rounds to the same 41.7.
    assert_eq!(
        format!("{:.1}", mib(v2.params_without_batch_norm())),
        "41.7"
    );

    // "About 3.0 G": delta = 1 stays near v1 by the paper count; c_hat = 15c/16 gives 3.0.
    let v2_macs = giga(v2.total().macs_paper);
    assert!(v2_macs < giga(v1.total().macs_paper) && (v2_macs - 3.0).abs() < 0.2);
    let alternative = imagenet_report("resnet50", "spatial+channel:ratio=0.0625,windows=2");
    assert_eq!(
        format!("{:.1}", giga(alternative.total().macs_paper)),
        "3.0"
    );
}

#[test]
fn versatile_twins_save_exactly_what_the_layer_formulas_say() {
    let device = Device::flex();
    for name in [
        "vgg16",
        "vgg_small",
        "resnet50",
        "resnet18",
        "alexnet",
        "lenet5",
    ] {
        let dense_config = config(name, "dense");
        let side = dense_config.arch.default_input();
        let dense_report = dense_config.cost_report([side, side]).unwrap();
        let dense_model = dense_config.init(&device).unwrap();
        let dense_total = dense_report.total();
        assert_eq!(
            dense_model.num_params() as u64,
            dense_total.params + dense_total.buffers,
            "{name}: module and report disagree"
        );
        for variant in &VARIANTS[1..] {
            let config = config(name, variant);
            let report = config.cost_report([side, side]).unwrap();
            // Dense n*c*d*d against m*depth*d*d per versatile layer (biases cancel).
            let saving: u64 = report
                .versatile_layers()
                .map(|row| {
                    let v = row.versatile.unwrap();
                    let (n, c, d) = (row.output[0], v.in_channels, v.kernel);
                    let depth = match v.mode {
                        ChannelMode::Shared => v.c_hat,
                        ChannelMode::Sliding => c,
                    };
                    assert_eq!(v.primary, n.div_ceil(v.s * v.n_c), "{name} {}", row.name);
                    (n * c * d * d - v.primary * depth * d * d) as u64
                })
                .sum();
            assert!(saving > 0, "{name} {variant}");
            let model = config.init(&device).unwrap();
            assert_eq!(
                dense_model.num_params() - model.num_params(),
                saving as usize,
                "{name} {variant}"
            );
            let total = report.total();
            assert_eq!(model.num_params() as u64, total.params + total.buffers);
            assert_eq!(
                report.params_dense(),
                dense_total.params,
                "{name} {variant}"
            );
        }
    }
}

#[test]
fn spatial_variant_leaves_1x1_convs_dense_and_channel_variant_takes_them() {
    let spatial = imagenet_report("resnet50", "spatial");
    let conv1x1 =
        |r: &CostReport, name: &str| r.layers.iter().find(|row| row.name == name).unwrap().kind;
    assert_eq!(conv1x1(&spatial, "layer1.0.conv1"), "Conv2d");
    assert_eq!(conv1x1(&spatial, "layer1.0.conv2"), "VConv2d");
    assert_eq!(conv1x1(&spatial, "conv1"), "VConv2d", "the 7x7 stem");
    let v2 = imagenet_report("resnet50", "spatial+channel");
    for name in ["layer1.0.conv1", "layer1.0.conv3", "layer1.0.downsample.0"] {
        let row = v2.layers.iter().find(|row| row.name == name).unwrap();
        let layout = row.versatile.unwrap();
        assert_eq!((layout.s, layout.n_c, layout.delta), (1, 2, 1), "{name}");
    }
    // Linear layers stay dense in every variant.
    assert!(v2
        .layers
        .iter()
        .all(|r| r.kind != "Linear" || r.versatile.is_none()));
}

#[test]
fn one_channel_first_layer_falls_back_to_spatial_only() {
    let config = config("lenet5", "spatial+channel");
    let report = config.cost_report([28, 28]).unwrap();
    let first = report.layers[0].versatile.unwrap();
    assert_eq!((first.delta, first.n_c, first.s), (0, 1, 3));
    let second = report.layers[3].versatile.unwrap();
    assert_eq!((second.delta, second.n_c), (1, 2));
    assert!(
        report.notes.iter().any(|n| n.contains("features.0")),
        "{:?}",
        report.notes
    );
}

fn std_of(values: &[f32]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    (values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt()
}

#[test]
fn weights_are_initialized_as_torchvision() {
    let device = Device::flex();
    for (variant, primaries) in [("dense", 128.0), ("spatial", 64.0)] {
        let model = config("vgg_small", variant).init(&device).unwrap();
        let Model::ConvNet(net) = model else {
            panic!("vgg_small is a ConvNet")
        };
        // features.17 is the 128 -> 128 3x3 conv: Kaiming-normal fan-out, zero bias.
        let (weight, bias) = match &net.features[17] {
            FeatureLayer::Conv(ConvLayer::Dense(conv)) => (conv.weight.val(), conv.bias.clone()),
            FeatureLayer::Conv(ConvLayer::Versatile(conv)) => {
                (conv.weight.val(), conv.bias.clone())
            }
            other => panic!("features.17 is {other:?}"),
        };
        let expected = (2.0 / (primaries * 9.0f64)).sqrt();
        let std = std_of(&weight.into_data().try_to_vec::<f32>().unwrap());
        assert!(
            (std / expected - 1.0).abs() < 0.03,
            "{variant}: std {std}, expected {expected}"
        );
        let bias = bias.unwrap().val().into_data().try_to_vec::<f32>().unwrap();
        assert!(bias.iter().all(|&b| b == 0.0));
        // Batch norm weight 1, bias 0; the linear head Normal(0, 0.01), zero bias.
        let FeatureLayer::BatchNorm(norm) = &net.features[18] else {
            panic!("features.18 is a batch norm")
        };
        let gamma = norm.gamma.val().into_data().try_to_vec::<f32>().unwrap();
        assert!(gamma.iter().all(|&g| g == 1.0));
        let versatile::models::HeadLayer::Linear(head) = &net.classifier[0] else {
            panic!("classifier.0 is linear")
        };
        let std = std_of(&head.weight.val().into_data().try_to_vec::<f32>().unwrap());
        assert!((std / 0.01 - 1.0).abs() < 0.1, "linear std {std}");
    }
}

#[test]
fn gradients_reach_every_weight_in_training_mode() {
    let device = Device::flex().autodiff();
    let config = config("vgg_small", "spatial+channel").with_in_channels(1);
    let model = config.init(&device).unwrap();
    let input = random_input(4, &config, [28, 28], &device);
    let logits = model.try_forward(input).unwrap();
    let weights = Tensor::<2>::random(logits.dims(), Distribution::Normal(0.0, 1.0), &device);
    let grads = (logits * weights).sum().backward();
    let Model::ConvNet(net) = &model else {
        panic!("vgg_small is a ConvNet")
    };
    let mut convs = 0;
    for layer in &net.features {
        if let FeatureLayer::Conv(conv) = layer {
            let grad = match conv {
                ConvLayer::Dense(c) => c.weight.grad(&grads),
                ConvLayer::Versatile(c) => c.weight.grad(&grads),
            }
            .expect("every conv weight has a gradient");
            let values = grad.into_data().try_to_vec::<f32>().unwrap();
            assert!(values.iter().all(|v| v.is_finite()));
            assert!(values.iter().any(|&v| v != 0.0));
            convs += 1;
        }
    }
    assert_eq!(convs, 6);
}

#[test]
fn configs_serialize_by_name() {
    let config = config("vgg_bn:16-M-32", "spatial+channel:delta=2,g=1,mode=sliding")
        .with_in_channels(1)
        .with_num_classes(7);
    let text = serde_json::to_string(&config).unwrap();
    assert!(text.contains("\"arch\":\"vgg_bn:16-M-32\""), "{text}");
    let back: ModelConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(back, config);
    assert_eq!(
        back.variant,
        "spatial+channel:delta=2,mode=sliding"
            .parse::<Variant>()
            .unwrap()
    );
}

#[test]
fn record_keys_are_torchvisions_once_enum_variants_are_skipped() {
    use burn::store::ModuleSnapshot;
    let device = Device::flex();
    let keys = |name: &str, variant: &str| -> Vec<String> {
        let model = config(name, variant).init(&device).unwrap();
        model
            .collect(None, None, true)
            .into_iter()
            .map(|t| t.name)
            .collect()
    };
    let vgg = keys("vgg11_bn", "spatial");
    for key in [
        "features.0.weight",
        "features.0.bias",
        "features.1.running_mean",
        "features.4.weight",
        "fc6.weight",
        "classifier.2.weight",
        "classifier.5.bias",
    ] {
        assert!(vgg.iter().any(|k| k == key), "{key} not in {vgg:?}");
    }
    let resnet = keys("resnet18", "spatial+channel");
    for key in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer4.1.bn2.running_var",
        "fc.weight",
        "fc.bias",
    ] {
        assert!(resnet.iter().any(|k| k == key), "{key} not in {resnet:?}");
    }
}
