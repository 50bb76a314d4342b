//! Deployment: the dense form computes what the versatile model computes, the dense
//! safetensors carry torchvision's keys and layouts (and load back), and the ONNX
//! export run in onnxruntime gives our outputs within 1e-4 relative, for a small VGG
//! and ResNet-18 in every variant.
//!
//! The ONNX check needs Python with onnxruntime and numpy (`.ci/run` installs them);
//! without them it prints a note and skips locally, and fails under CI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::Device;
use safetensors::SafeTensors;
use versatile::checkpoint::export::{export_dense_safetensors, to_dense};
use versatile::checkpoint::import::import_state_dict;
use versatile::checkpoint::onnx::{export_onnx, export_onnx_as, OnnxForm};
use versatile::checkpoint::{load_model, save_model, CheckpointError};
use versatile::models::{ConvLayer, FeatureLayer, ImageClassifier, Model};

use crate::support;
use support::{
    authors_io, authors_small_vgg, config, input, random_model, relative_error, scratch, values,
    AUTHORS_PTH,
};

const VARIANTS: [&str; 4] = [
    "dense",
    "spatial",
    "spatial+channel",
    "spatial+channel:delta=2,g=2,mode=sliding",
];

#[test]
fn the_dense_form_computes_what_the_versatile_model_computes() {
    let device = Device::flex();
    for (name, side) in [("vgg_small", 28), ("resnet18", 32)] {
        for variant in VARIANTS {
            let config = config(name, variant);
            let model = random_model(&config, &device);
            let dense = to_dense(&model).unwrap();
            assert_eq!(dense.config(), &config.dense_twin());
            // Only plain convolutions are left.
            let left = match &dense {
                Model::ConvNet(net) => net
                    .features
                    .iter()
                    .filter(|l| matches!(l, FeatureLayer::Conv(ConvLayer::Versatile(_))))
                    .count(),
                Model::ResNet(net) => usize::from(matches!(net.conv1, ConvLayer::Versatile(_))),
            };
            assert_eq!(left, 0, "{name} {variant}");
            let x = input(&config, 2, side, &device);
            let ours = values(model.forward(x.clone()));
            let theirs = values(dense.forward(x));
            let err = relative_error(&theirs, &ours);
            assert!(err < 1e-5, "{name} {variant}: {err}");
        }
    }
    // The bottleneck blocks (conv3, 1x1 downsampling), every convolution versatile.
    let config = config("resnet50", "spatial+channel").with_num_classes(10);
    let model = random_model(&config, &device);
    let dense = to_dense(&model).unwrap();
    let x = input(&config, 1, 32, &device);
    let err = relative_error(&values(dense.forward(x.clone())), &values(model.forward(x)));
    assert!(err < 1e-5, "resnet50: {err}");
}

/// torchvision's ResNet-18 state dict: every key with its shape.
fn torchvision_resnet18(classes: usize) -> BTreeMap<String, Vec<usize>> {
    let mut keys = BTreeMap::new();
    let mut bn = |prefix: &str, n: usize| {
        for stat in ["weight", "bias", "running_mean", "running_var"] {
            keys.insert(format!("{prefix}.{stat}"), vec![n]);
        }
        keys.insert(format!("{prefix}.num_batches_tracked"), vec![]);
    };
    bn("bn1", 64);
    let mut convs = vec![("conv1.weight".to_string(), vec![64, 3, 7, 7])];
    let mut inplanes = 64;
    for stage in 1..=4 {
        let planes = 64 << (stage - 1);
        for block in 0..2 {
            let p = format!("layer{stage}.{block}");
            let first_in = if block == 0 { inplanes } else { planes };
            convs.push((format!("{p}.conv1.weight"), vec![planes, first_in, 3, 3]));
            convs.push((format!("{p}.conv2.weight"), vec![planes, planes, 3, 3]));
            bn(&format!("{p}.bn1"), planes);
            bn(&format!("{p}.bn2"), planes);
            if block == 0 && stage > 1 {
                convs.push((
                    format!("{p}.downsample.0.weight"),
                    vec![planes, inplanes, 1, 1],
                ));
                bn(&format!("{p}.downsample.1"), planes);
            }
        }
        inplanes = planes;
    }
    keys.extend(convs);
    keys.insert("fc.weight".to_string(), vec![classes, 512]);
    keys.insert("fc.bias".to_string(), vec![classes]);
    keys
}

fn file_keys(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| (name.to_string(), view.shape().to_vec()))
        .collect()
}

#[test]
fn dense_safetensors_of_resnet18_are_torchvisions_state_dict() {
    let device = Device::flex();
    let dir = scratch("torchvision");
    let config = config("resnet18", "spatial+channel").with_num_classes(7);
    let model = random_model(&config, &device);
    let path = dir.join("resnet18-dense.safetensors");
    export_dense_safetensors(&model, None, &path).unwrap();
    let keys = file_keys(&path);
    assert_eq!(keys, torchvision_resnet18(7));
    assert_eq!(
        keys.len(),
        122,
        "torchvision's resnet18 has 122 state dict entries"
    );

    // The file describes the dense twin and loads back as it, with the same outputs.
    let x = input(&config, 2, 32, &device);
    let ours = values(model.forward(x.clone()));
    let back = load_model(&path, &device).unwrap();
    assert_eq!(back.config(), &config.dense_twin());
    let err = relative_error(&values(back.forward(x.clone())), &ours);
    assert!(err < 1e-5, "{err}");
    // ... and imports as a PyTorch state dict into the dense model.
    let imported = import_state_dict(&path, &config.dense_twin(), &device).unwrap();
    assert_eq!(imported.notes.ignored_counters, 20);
    let err = relative_error(&values(imported.model.forward(x)), &ours);
    assert!(err < 1e-5, "{err}");
}

#[test]
fn dense_safetensors_of_a_small_vgg_keep_the_zoo_names() {
    let device = Device::flex();
    let dir = scratch("vgg-names");
    let config = config("vgg11_bn_small", "spatial");
    let model = random_model(&config, &device);
    let path = dir.join("vgg.safetensors");
    export_dense_safetensors(&model, None, &path).unwrap();
    let keys = file_keys(&path);
    // Dense 3x3 weights [out, in, 3, 3], batch norm with its counter, linear [out, in].
    assert_eq!(keys["features.0.weight"], [64, 3, 3, 3]);
    assert_eq!(keys["features.1.num_batches_tracked"], Vec::<usize>::new());
    assert_eq!(keys["features.4.weight"], [128, 64, 3, 3]);
    assert_eq!(keys["classifier.0.weight"], [10, 512]);
}

#[test]
fn export_refuses_what_it_cannot_express() {
    let device = Device::flex();
    let dir = scratch("refuse");
    let model = config("lenet5", "spatial").init(&device).unwrap();
    let err = export_dense_safetensors(&model, None, dir.join("x.bpk")).unwrap_err();
    assert!(
        matches!(err, CheckpointError::UnknownFormat { .. }),
        "{err:?}"
    );
    let err = export_onnx(&model, [28, 28], dir.join("x.safetensors")).unwrap_err();
    assert!(
        matches!(err, CheckpointError::UnknownFormat { .. }),
        "{err:?}"
    );
    let err = export_onnx(&model, [8, 8], dir.join("x.onnx")).unwrap_err();
    assert!(err.to_string().contains("too small"), "{err}");
    // LeNet-5 pools adaptively to 5x5: a 32x32 input leaves a 6x6 map, no fixed pooling.
    let err = export_onnx(&model, [32, 32], dir.join("x.onnx")).unwrap_err();
    assert!(err.to_string().contains("adaptively to 5x5"), "{err}");
}

// ---------------------------------------------------------------------------------------
// ONNX in onnxruntime
// ---------------------------------------------------------------------------------------

struct Job {
    what: String,
    model: PathBuf,
    input: PathBuf,
    shape: [usize; 4],
    output: PathBuf,
    expected: Vec<f32>,
}

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn onnx_exports_run_in_onnxruntime_with_our_outputs() {
    let device = Device::flex();
    let dir = scratch("onnx");
    let mut jobs = Vec::new();
    let models = VARIANTS
        .iter()
        .map(|v| ("vgg_small", *v, 28))
        .chain(VARIANTS.iter().map(|v| ("resnet18", *v, 32)))
        .chain([("vgg_fc6:16:8-M-16-M", "spatial+channel:max_kernel=3", 28)]);
    for (k, (name, variant, side)) in models.enumerate() {
        let config = config(name, variant).with_in_channels(if k % 2 == 0 { 3 } else { 1 });
        let model = random_model(&config, &device);
        // A batch of 3, not the sizes traced at export: the batch axis is symbolic.
        let x = input(&config, 3, side, &device);
        let shape: [usize; 4] = x.dims();
        let expected = values(model.forward(x.clone()));
        let input = dir.join(format!("input-{k}.f32"));
        write_f32(&input, &values(x.clone()));
        let compact = dir.join(format!("model-{k}.safetensors"));
        save_model(&compact, &model).unwrap();
        let compact = std::fs::metadata(&compact).unwrap().len() as f64;
        for form in [OnnxForm::Dense, OnnxForm::Versatile] {
            let onnx = dir.join(format!("model-{k}-{form:?}.onnx"));
            let export = export_onnx_as(&model, [side, side], &onnx, form).unwrap();
            assert_eq!(export.input, [1, config.in_channels, side, side]);
            if form == OnnxForm::Versatile {
                // The primary weights once: the compact checkpoint's size plus the
                // graph (slice bounds, gather indices, node names: tens of KB, most
                // of these tiny models' overhead, little of a real one's).
                let bytes = export.bytes as f64;
                assert!(
                    bytes >= 0.9 * compact && bytes <= 1.02 * compact + 64.0 * 1024.0,
                    "{name} ({variant}): versatile ONNX {} bytes, checkpoint {compact}",
                    export.bytes
                );
            }
            // The export leaves the model as it was.
            assert_eq!(
                values(model.forward(x.clone())),
                expected,
                "{name} after the export"
            );
            jobs.push(Job {
                what: format!("{name} ({variant}, {form:?} form)"),
                model: onnx,
                input: input.clone(),
                shape,
                output: dir.join(format!("output-{k}-{form:?}.f32")),
                expected: expected.clone(),
            });
        }
    }
    // The authors' PyTorch state dict, imported and exported: onnxruntime against the
    // logits recorded with it (an independent statement of the layer), not ours.
    let imported = import_state_dict(AUTHORS_PTH, &authors_small_vgg(), &device).unwrap();
    let onnx = dir.join("authors.onnx");
    export_onnx(&imported.model, [28, 28], &onnx).unwrap();
    let (x, recorded) = authors_io(&device);
    let input = dir.join("authors-input.f32");
    write_f32(&input, &values(x));
    jobs.push(Job {
        what: "the authors' state dict, against its recorded logits".to_string(),
        model: onnx,
        input,
        shape: [2, 1, 28, 28],
        output: dir.join("authors-output.f32"),
        expected: recorded,
    });

    let list: Vec<serde_json::Value> = jobs
        .iter()
        .map(|j| {
            serde_json::json!({
                "model": j.model, "input": j.input, "shape": j.shape, "output": j.output,
            })
        })
        .collect();
    let jobs_file = dir.join("jobs.json");
    std::fs::write(&jobs_file, serde_json::to_string(&list).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/onnx_run.py");
    let run = Command::new("python3")
        .arg(&script)
        .arg(&jobs_file)
        .output();
    let in_ci = std::env::var_os("CI").is_some();
    let missing = match &run {
        Err(err) => Some(format!("python3 not found ({err})")),
        Ok(out) if out.status.code() == Some(3) => {
            Some(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
        Ok(_) => None,
    };
    if let Some(why) = missing {
        assert!(!in_ci, "CI must run the ONNX check: {why}");
        println!("note: ONNX check skipped, onnxruntime unavailable: {why} (pip install onnxruntime numpy)");
        return;
    }
    let out = run.unwrap();
    assert!(
        out.status.success(),
        "onnxruntime failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut worst = 0f64;
    for job in &jobs {
        let theirs = read_f32(&job.output);
        let err = relative_error(&theirs, &job.expected);
        println!("{}: ONNX vs ours, relative error {err:.2e}", job.what);
        assert!(err < 1e-4, "{}: relative error {err}", job.what);
        worst = worst.max(err);
    }
    println!(
        "worst relative error over {} models: {worst:.2e}",
        jobs.len()
    );
}

#[test]
fn dense_safetensors_of_an_imagenet_vgg_are_torchvisions_vgg() {
    let device = Device::flex();
    let dir = scratch("torchvision-vgg");
    let started = std::time::Instant::now();
    // The smallest ImageNet-form VGG (129 M parameters, most in fc6). Dense: the
    // unfolding is checked on the small models; this test is about the key layout.
    let config = config("vgg11", "dense")
        .with_in_channels(1)
        .with_num_classes(10);
    let model = config.init(&device).unwrap();
    let path = dir.join("vgg11-dense.safetensors");
    export_dense_safetensors(&model, None, &path).unwrap();
    let keys = file_keys(&path);
    // torchvision's vgg11(num_classes=10) on 1-channel images: features 0, 3, 6, 8, 11,
    // 13, 16, 18; classifier 0, 3, 6; the authors' fc6 is classifier.0 as a Linear.
    let mut expected = BTreeMap::new();
    let convs = [(0, 1, 64), (3, 64, 128), (6, 128, 256), (8, 256, 256)];
    let more = [
        (11, 256, 512),
        (13, 512, 512),
        (16, 512, 512),
        (18, 512, 512),
    ];
    for (index, c, n) in convs.into_iter().chain(more) {
        expected.insert(format!("features.{index}.weight"), vec![n, c, 3, 3]);
        expected.insert(format!("features.{index}.bias"), vec![n]);
    }
    for (index, i, o) in [(0, 512 * 7 * 7, 4096), (3, 4096, 4096), (6, 4096, 10)] {
        expected.insert(format!("classifier.{index}.weight"), vec![o, i]);
        expected.insert(format!("classifier.{index}.bias"), vec![o]);
    }
    assert_eq!(keys, expected);

    let x = input(&config, 1, 32, &device);
    let ours = values(model.forward(x.clone()));
    // Read back as torchvision's VGG through the import path (the file's own
    // description is not used there).
    let imported = import_state_dict(&path, &config.dense_twin(), &device).unwrap();
    assert!(imported.notes.torchvision_classifier);
    let err = relative_error(&values(imported.model.forward(x)), &ours);
    assert!(err < 1e-5, "{err}");
    println!("took {:?}", started.elapsed());
}
