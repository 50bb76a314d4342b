//! Checkpoints: every model family saved and loaded in both formats with the same
//! outputs, file sizes against the parameter count, the metadata that rebuilds the
//! model, and clear errors for truncated, foreign, mismatched and misnamed files.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{BurnpackStore, ModuleSnapshot};
use burn::tensor::Device;
use safetensors::SafeTensors;
use serde_json::json;
use versatile::checkpoint::{
    inspect, load_checkpoint, load_model, load_model_as, save_checkpoint, save_model,
    CheckpointError, CheckpointMeta, Format, KeyLayout,
};
use versatile::models::{ConvLayer, FeatureLayer, ImageClassifier, Model, ModelConfig};

use crate::support;
use support::{config, input, random_model, scratch, values};

/// Bytes of tensor data a model's checkpoint holds: parameters and buffers, float32.
fn stored_bytes(config: &ModelConfig) -> u64 {
    let side = config.min_input().unwrap().max(config.arch.default_input());
    config
        .cost_report([side, side])
        .unwrap()
        .total()
        .stored_bytes()
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// The JSON header length of a safetensors file.
fn safetensors_header_len(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

/// The metadata length of a burnpack file (bytes 6..10 of its header).
fn burnpack_metadata_len(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    u32::from_le_bytes(bytes[6..10].try_into().unwrap()) as u64
}

/// Saves `model` in both formats, checks the sizes against the parameter count, loads
/// both back from the files alone and checks the logits are the same.
fn round_trip(model: &Model, side: usize, dir: &Path, device: &Device) {
    let config = model.config().clone();
    let what = format!("{} ({})", config.name(), config.variant);
    let x = input(&config, 2, side, device);
    let expected = values(model.forward(x.clone()));
    let data = stored_bytes(&config);
    let tensors = model.collect(None, None, false).len() as u64;
    let stem = config.name().replace([':', '-'], "_");
    for ext in ["bpk", "safetensors"] {
        let path = dir.join(format!("{stem}.{ext}"));
        save_model(&path, model).unwrap();
        let size = file_size(&path);
        // The compact form: exactly the parameters and buffers, plus a header.
        match ext {
            "safetensors" => {
                assert_eq!(size, 8 + safetensors_header_len(&path) + data, "{what}");
            }
            _ => {
                let header = 10 + burnpack_metadata_len(&path);
                assert!(size >= data + header, "{what}: {size} < {data} + {header}");
                assert!(
                    size <= data + header + 256 * (tensors + 1),
                    "{what}: {size} bytes for {data} bytes of data, {header} of header, {tensors} tensors"
                );
            }
        }
        let info = inspect(&path).unwrap();
        assert_eq!(info.data_bytes, data, "{what} {ext}");
        assert_eq!(info.meta.as_ref().unwrap().config, config, "{what} {ext}");

        let back = load_model(&path, device).unwrap();
        assert_eq!(back.config(), &config, "{what} {ext}");
        let got = values(back.forward(x.clone()));
        assert!(expected.iter().all(|v| v.is_finite()), "{what}");
        assert!(
            got == expected,
            "{what} {ext}: other logits after the round trip"
        );
    }
}

#[test]
fn every_model_family_round_trips_in_both_formats() {
    let device = Device::flex();
    let dir = scratch("round-trip");
    for (name, variant, side) in [
        ("vgg_small", "dense", 28),
        ("vgg_small", "spatial", 28),
        ("vgg_small", "spatial+channel", 28),
        ("vgg_small", "spatial+channel:delta=2,g=2,mode=sliding", 28),
        ("vgg_fc6:16:8-M-16-M", "spatial+channel:max_kernel=3", 28),
        ("lenet5", "spatial", 28),
        ("resnet18", "spatial+channel", 32),
    ] {
        let model = random_model(&config(name, variant), &device);
        round_trip(&model, side, &dir, &device);
    }
    let grey = config("vgg:8-M-16", "spatial")
        .with_in_channels(1)
        .with_num_classes(3);
    round_trip(&random_model(&grey, &device), 28, &dir, &device);
}

#[test]
fn a_checkpoint_loads_onto_an_autodiff_device_for_training() {
    let device = Device::flex();
    let dir = scratch("autodiff");
    let model = random_model(&config("vgg_small", "spatial+channel"), &device);
    let path = dir.join("vgg.bpk");
    save_model(&path, &model).unwrap();
    let autodiff = device.clone().autodiff();
    let back = load_model(&path, &autodiff).unwrap();
    // The loaded values, not fresh ones: same logits in inference mode.
    let x = input(model.config(), 2, 28, &device);
    let expected = values(model.forward(x.clone()));
    assert!(values(back.valid().forward(x)) == expected);
    // And trainable: gradients reach the primary filters.
    let loss = back.forward(input(model.config(), 2, 28, &autodiff)).sum();
    let grads = loss.backward();
    let Model::ConvNet(net) = &back else {
        panic!("a VGG is a ConvNet")
    };
    let FeatureLayer::Conv(ConvLayer::Versatile(conv)) = &net.features[3] else {
        panic!("features.3 is versatile")
    };
    let grad = conv
        .weight
        .grad(&grads)
        .expect("a gradient for features.3.weight");
    assert_eq!(grad.dims(), conv.weight.dims());
}

#[test]
fn a_versatile_file_is_smaller_than_its_dense_twin_by_the_parameter_ratio() {
    let device = Device::flex();
    let dir = scratch("sizes");
    let versatile = config("vgg_small", "spatial").init(&device).unwrap();
    let dense = config("vgg_small", "dense").init(&device).unwrap();
    let (v, d) = (dir.join("v.safetensors"), dir.join("d.safetensors"));
    save_model(&v, &versatile).unwrap();
    save_model(&d, &dense).unwrap();
    let ratio = file_size(&v) as f64 / file_size(&d) as f64;
    let params = stored_bytes(versatile.config()) as f64 / stored_bytes(dense.config()) as f64;
    // 3x3 spatial filters: half the convolution weights.
    assert!((0.45..0.6).contains(&params), "{params}");
    assert!(
        (ratio - params).abs() < 0.01,
        "files {ratio}, parameters {params}"
    );
    let info = inspect(&v).unwrap();
    // The estimate takes this file's header for the twin's: a few bytes of JSON apart.
    let estimate = info.dense_twin_file_size().unwrap() as i64;
    assert!(
        (estimate - file_size(&d) as i64).abs() < 256,
        "{estimate} vs {}",
        file_size(&d)
    );
}

#[test]
fn the_native_file_is_a_plain_burnpack_that_burn_store_reads() {
    let device = Device::flex();
    let dir = scratch("burnpack");
    let model = random_model(&config("lenet5", "spatial"), &device);
    let path = dir.join("lenet.bpk");
    save_model(&path, &model).unwrap();
    // burn's own reader, no help from this crate.
    let mut other = config("lenet5", "spatial").init(&device).unwrap();
    let mut store = BurnpackStore::from_file(&path);
    let result = other.load_from(&mut store).unwrap();
    assert!(result.missing.is_empty() && result.unused.is_empty() && result.errors.is_empty());
    let x = input(model.config(), 1, 28, &device);
    assert!(values(other.forward(x.clone())) == values(model.forward(x)));
}

#[test]
fn safetensors_checkpoints_use_pytorch_names_and_layouts() {
    let device = Device::flex();
    let dir = scratch("torch-names");
    let model = config("vgg11_bn_small", "spatial+channel")
        .init(&device)
        .unwrap();
    let path = dir.join("vgg.safetensors");
    save_model(&path, &model).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let shape = |key: &str| file.tensor(key).unwrap().shape().to_vec();
    // features.0: 3 -> 64, 3x3, delta 1 (n_c = 2, s = 2): 16 primaries 2 deep.
    assert_eq!(shape("features.0.weight"), [16, 2, 3, 3]);
    assert_eq!(shape("features.1.weight"), [64]); // batch norm scale, PyTorch's name
    assert_eq!(shape("features.1.running_var"), [64]);
    // The linear head as PyTorch holds it: [out, in].
    assert_eq!(shape("classifier.0.weight"), [10, 512]);
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().unwrap();
    assert_eq!(metadata["versatile.layout"], "torch");
    assert!(metadata["versatile.model"].contains("\"arch\":\"vgg11_bn_small\""));
}

#[test]
fn class_names_and_preprocessing_travel_with_the_file() {
    let device = Device::flex();
    let dir = scratch("meta");
    let model = config("lenet5", "dense").init(&device).unwrap();
    let names: Vec<String> = (0..10).map(|i| format!("class-{i}")).collect();
    let meta = CheckpointMeta::new(model.config().clone()).with_class_names(names.clone());
    let path = dir.join("lenet.bpk");
    save_checkpoint(&path, &model, &meta).unwrap();
    let checkpoint = load_checkpoint(&path, &device).unwrap();
    assert_eq!(checkpoint.meta.class_names, Some(names));
    assert_eq!(checkpoint.format, Format::Burnpack);
    assert_eq!(checkpoint.layout, KeyLayout::Burn);

    let wrong =
        CheckpointMeta::new(model.config().clone()).with_class_names(vec!["a".into(), "b".into()]);
    let err = save_checkpoint(dir.join("x.bpk"), &model, &wrong).unwrap_err();
    assert!(
        err.to_string()
            .contains("2 class names given for a model with 10 classes"),
        "{err}"
    );
    let other = CheckpointMeta::new(config("lenet5", "spatial"));
    let err = save_checkpoint(dir.join("y.bpk"), &model, &other).unwrap_err();
    assert!(
        err.to_string()
            .contains("the metadata describes lenet5 (spatial)"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Bad files
// ---------------------------------------------------------------------------------------

fn save_lenet(dir: &Path, ext: &str) -> PathBuf {
    let device = Device::flex();
    let model = config("lenet5", "spatial").init(&device).unwrap();
    let path = dir.join(format!("lenet.{ext}"));
    save_model(&path, &model).unwrap();
    path
}

fn load_err(path: &Path) -> CheckpointError {
    load_model(path, &Device::flex()).expect_err("the load must fail")
}

#[test]
fn truncated_files_are_reported_as_truncated() {
    let dir = scratch("truncated");
    for ext in ["bpk", "safetensors"] {
        let path = save_lenet(&dir, ext);
        let bytes = std::fs::read(&path).unwrap();
        for keep in [bytes.len() - 100, bytes.len() / 2, 300, 9, 5] {
            let cut = dir.join(format!("cut-{keep}.{ext}"));
            std::fs::write(&cut, &bytes[..keep]).unwrap();
            let err = load_err(&cut);
            assert!(
                matches!(err, CheckpointError::Truncated { .. }),
                "{ext} cut at {keep}: {err:?}"
            );
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }
    // A PyTorch archive without its end.
    let pth = std::fs::read("tests/data/torch/small_vgg_authors_layout.pth").unwrap();
    let cut = dir.join("cut.pth");
    std::fs::write(&cut, &pth[..pth.len() / 2]).unwrap();
    let err = inspect(&cut).unwrap_err();
    assert!(matches!(err, CheckpointError::Truncated { .. }), "{err:?}");
}

#[test]
fn files_of_another_format_are_reported_by_their_first_bytes() {
    let dir = scratch("magic");
    let safetensors = save_lenet(&dir, "safetensors");
    let bpk = save_lenet(&dir, "bpk");
    // A safetensors file named .bpk, a burnpack file named .safetensors, text as .pth.
    let cases = [
        (safetensors.clone(), "bpk", "burnpack"),
        (bpk.clone(), "safetensors", "safetensors"),
    ];
    for (source, ext, format) in cases {
        let renamed = dir.join(format!("renamed.{ext}"));
        std::fs::copy(&source, &renamed).unwrap();
        let err = load_err(&renamed);
        assert!(matches!(err, CheckpointError::WrongMagic { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&format!("is not a {format} file")),
            "{err}"
        );
    }
    let text = dir.join("notes.pth");
    std::fs::write(&text, "these are not weights").unwrap();
    let err = inspect(&text).unwrap_err();
    assert!(matches!(err, CheckpointError::WrongMagic { .. }), "{err:?}");
    assert!(err.to_string().contains("'thes'"), "{err}");

    let empty = dir.join("empty.bpk");
    std::fs::write(&empty, []).unwrap();
    assert!(matches!(
        load_err(&empty),
        CheckpointError::WrongMagic { .. }
    ));

    let err = load_err(&dir.join("weights.ckpt"));
    assert!(
        matches!(err, CheckpointError::UnknownFormat { .. }),
        "{err:?}"
    );
    let err = load_err(&dir.join("missing.bpk"));
    assert!(matches!(err, CheckpointError::Io { .. }), "{err:?}");
}

#[test]
fn a_state_dict_without_a_model_description_points_to_import() {
    let err = load_err(Path::new("tests/data/torch/small_vgg_authors_layout.pth"));
    assert!(matches!(err, CheckpointError::NoModelDescription { .. }));
    assert!(err.to_string().contains("versatile import"), "{err}");
}

/// Rewrites a safetensors file's metadata entry `key`.
fn with_metadata(path: &Path, out: &Path, key: &str, value: &str) {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = header.metadata().clone().unwrap();
    metadata.insert(key.to_string(), value.to_string());
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name.to_string(), view))
        .collect();
    safetensors::serialize_to_file(tensors, Some(metadata), out).unwrap();
}

#[test]
fn tensors_of_another_model_are_listed_and_nothing_is_loaded() {
    let dir = scratch("other-model");
    let lenet = save_lenet(&dir, "safetensors");
    // The file says it holds a small VGG, its tensors are LeNet-5's.
    let vgg = config("vgg:8-M-16-M-16", "spatial").with_num_classes(10);
    let lying = dir.join("lying.safetensors");
    let description = serde_json::json!({ "config": vgg }).to_string();
    with_metadata(&lenet, &lying, "versatile.model", &description);
    let err = load_err(&lying);
    let CheckpointError::Mismatch { report, model, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(model, "vgg:8-M-16-M-16 (spatial)");
    let missing: Vec<&str> = report.missing.iter().map(|(k, _)| k.as_str()).collect();
    let unexpected: Vec<&str> = report.unexpected.iter().map(|(k, _)| k.as_str()).collect();
    // features.0 is in both (another shape); VGG's features.6 exists only in VGG.
    assert!(missing.contains(&"features.6.weight"), "{missing:?}");
    assert!(
        unexpected.contains(&"classifier.4.weight"),
        "{unexpected:?}"
    );
    let features0 = report
        .mismatched
        .iter()
        .find(|m| m.key == "features.0.weight")
        .expect("features.0.weight listed");
    assert_eq!(features0.expected.shape, [4, 3, 3, 3]);
    let text = err.to_string();
    assert!(text.contains("nothing was loaded"), "{text}");
    assert!(
        text.contains("features.0.weight (model [4, 3, 3, 3] F32, file"),
        "{text}"
    );

    // The same file asked for as another model: refused from the metadata alone.
    let err = load_model_as(&lenet, &vgg, &Device::flex()).unwrap_err();
    assert!(matches!(err, CheckpointError::OtherModel { .. }), "{err:?}");
    assert!(err.to_string().contains("holds lenet5 (spatial)"), "{err}");

    // A description that does not parse.
    let broken = dir.join("broken.safetensors");
    with_metadata(
        &lenet,
        &broken,
        "versatile.model",
        "{\"config\": {\"arch\": \"vgg17\"}}",
    );
    let err = load_err(&broken);
    assert!(
        matches!(err, CheckpointError::BadModelDescription { .. }),
        "{err:?}"
    );
}

#[test]
fn wrong_shapes_are_reported_with_both_shapes() {
    let device = Device::flex();
    let dir = scratch("shapes");
    let path = save_lenet(&dir, "safetensors");
    // The same architecture with 3 classes instead of 10.
    let three = config("lenet5", "spatial").with_num_classes(3);
    let description = serde_json::json!({ "config": three }).to_string();
    let lying = dir.join("three.safetensors");
    with_metadata(&path, &lying, "versatile.model", &description);
    let err = load_model(&lying, &device).unwrap_err();
    let CheckpointError::Mismatch { report, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(
        report.missing.is_empty() && report.unexpected.is_empty(),
        "{report}"
    );
    let keys: Vec<&str> = report.mismatched.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let weight = &report
        .mismatched
        .iter()
        .find(|m| m.key.ends_with("weight"))
        .unwrap();
    assert_eq!(weight.expected.shape[0], 3);
    assert_eq!(weight.found.shape[0], 10);
}

/// A safetensors copy of `path` whose model description has `field` (a key of the
/// description, or `config.KEY`) set to the JSON `value`.
fn with_description(path: &Path, out: &Path, field: &str, value: serde_json::Value) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let json = &header.metadata().as_ref().unwrap()["versatile.model"];
    let mut description: serde_json::Value = serde_json::from_str(json).unwrap();
    match field.strip_prefix("config.") {
        Some(key) => description["config"][key] = value,
        None => description[field] = value,
    }
    with_metadata(path, out, "versatile.model", &description.to_string());
}

#[test]
fn descriptions_beyond_the_files_tensors_are_refused_before_building() {
    let dir = scratch("crafted-descriptions");
    let lenet = save_lenet(&dir, "safetensors");
    let big = 1_000_000_000_000u64;
    // Each would have the model (or its preprocessing) allocate far more than the file.
    let cases = [
        (
            "config.num_classes",
            json!(big),
            "num_classes is 1000000000000, above the limit",
        ),
        (
            "config.in_channels",
            json!(big),
            "in_channels is 1000000000000, above the limit",
        ),
        (
            "config.arch",
            json!("vgg_bn:100000000-M"),
            "channels is 100000000, above the limit",
        ),
        (
            "config.arch",
            json!("vgg_fc6:100000000000:8-M"),
            "hidden width is 100000000000",
        ),
        (
            "config.arch",
            json!(format!("vgg:{}", ["8"; 300].join("-"))),
            "entries is 300",
        ),
        (
            "config.arch",
            json!("vgg16"),
            "but the file's tensors hold only",
        ),
        (
            "config.arch",
            json!("resnet50"),
            "but the file's tensors hold only",
        ),
        (
            "class_names",
            json!(["a", "b"]),
            "2 class names given for a model with 10 classes",
        ),
        (
            "preprocess",
            json!({"input_size": [1_000_000, 1_000_000], "resize": 1_000_000, "mean": [0.0], "std": [1.0]}),
            "sides above 4096",
        ),
        (
            "preprocess",
            json!({"input_size": [u64::MAX, 1], "resize": u64::MAX, "mean": [0.0], "std": [1.0]}),
            "sides above 4096",
        ),
        (
            "preprocess",
            json!({"input_size": [28, 28], "resize": 28, "mean": [0.0], "std": [0.0]}),
            "standard deviation 0",
        ),
        (
            "preprocess",
            json!({"input_size": [28, 28], "resize": 28, "mean": [0.0, 0.0], "std": [1.0, 1.0]}),
            "2 means and 2 deviations for 1 input channels",
        ),
    ];
    for (index, (field, value, expected)) in cases.into_iter().enumerate() {
        let crafted = dir.join(format!("crafted-{index}.safetensors"));
        with_description(&lenet, &crafted, field, value);
        for err in [load_err(&crafted), inspect(&crafted).unwrap_err()] {
            assert!(
                matches!(
                    err,
                    CheckpointError::BadModelDescription { .. }
                        | CheckpointError::DescriptionBeyondTensors { .. }
                ),
                "{field}: {err:?}"
            );
            assert!(err.to_string().contains(expected), "{field}: {err}");
        }
    }
}

#[test]
fn inspect_checks_the_tensors_against_the_description() {
    let dir = scratch("inspect-keys");
    let lenet = save_lenet(&dir, "safetensors");
    // As many values as LeNet-5 stores, under other names: the description fits the
    // byte count, not the tensors.
    let bytes = std::fs::read(&lenet).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (format!("other.{name}"), view))
        .collect();
    let foreign = dir.join("foreign.safetensors");
    safetensors::serialize_to_file(renamed, header.metadata().clone(), &foreign).unwrap();
    let err = inspect(&foreign).unwrap_err();
    let CheckpointError::Mismatch { report, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(report.missing.len(), report.unexpected.len(), "{report}");
    assert!(
        !report.missing.is_empty() && report.mismatched.is_empty(),
        "{report}"
    );
    // The file it was made from passes.
    assert_eq!(inspect(&lenet).unwrap().tensors, report.missing.len());
}

#[test]
fn a_pytorch_view_spanning_more_than_its_file_is_refused() {
    // A 1 KB state dict with a [1000000, 1000] broadcast view (strides 0): refused from
    // its shape, before any of its 4 GB would be materialized.
    let path = Path::new("tests/data/hostile/broadcast_view_large.pth");
    let err = inspect(path).unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("tensor 'huge' of shape [1000000, 1000] spans 4000000000 bytes"),
        "{text}"
    );
    let small = config("vgg:4-M", "dense")
        .with_in_channels(1)
        .with_num_classes(10);
    let err = versatile::checkpoint::import::import_state_dict(path, &small, &Device::flex())
        .unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err:?}");
}

#[test]
fn fuzz_found_header_lengths_beyond_the_file_are_truncation() {
    // The fuzzer's input: a valid file whose header length reads 2^64 - 1.
    let path = Path::new("tests/data/fuzz/safetensors_header_length_max.safetensors");
    for err in [load_err(path), inspect(path).unwrap_err()] {
        assert!(matches!(err, CheckpointError::Truncated { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("announces 18446744073709551615 bytes of JSON"),
            "{err}"
        );
    }
}
