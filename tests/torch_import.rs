//! Import of a PyTorch state dict in the authors' VConv2d layout (`tests/data/torch/`,
//! see its README): read in pure Rust, its junk channels dropped, into the zoo's small
//! `fc6` VGG, giving the recorded logits; and the clear report when the model named
//! does not fit the file.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use versatile::checkpoint::import::import_state_dict;
use versatile::checkpoint::{inspect, load_model, save_model, CheckpointError, Format};
use versatile::models::{ImageClassifier, ModelConfig};

use crate::support;
use support::{authors_io as recorded, authors_small_vgg, scratch, AUTHORS_PTH as PTH};

fn logits(model: &impl ImageClassifier, x: Tensor<4>) -> Vec<f32> {
    model
        .forward(x)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_authors_state_dict_gives_the_recorded_logits() {
    let device = Device::flex();
    let config = authors_small_vgg();
    let imported = import_state_dict(PTH, &config, &device).unwrap();
    assert_eq!(imported.tensors, 10);
    // Only the channel-versatile layer stores unused channels in the authors' layout.
    assert_eq!(imported.notes.authors_weights, ["features.3.weight"]);
    let (x, expected) = recorded(&device);
    let ours = logits(&imported.model, x.clone());
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = max_abs_diff(&ours, &expected);
    println!("max |ours - recorded| = {err:.3e} (logits up to {scale:.3})");
    assert!(err <= 1e-5 * scale.max(1.0), "{err}");

    // Saved in our compact form, the model comes back alone, same logits.
    let dir = scratch("torch-import");
    let path = dir.join("authors.safetensors");
    save_model(&path, &imported.model).unwrap();
    let back = load_model(&path, &device).unwrap();
    assert_eq!(logits(&back, x), ours);
    // The compact file drops the authors' unused channel: 8*1*3*3 fewer values.
    let info = inspect(PTH).unwrap();
    let ours_info = inspect(&path).unwrap();
    assert_eq!(info.format, Format::Pytorch);
    assert!(info.meta.is_none());
    assert_eq!(info.values - ours_info.values, 8 * 9);
}

#[test]
fn a_model_that_does_not_fit_the_state_dict_is_reported_key_by_key() {
    let device = Device::flex();
    // Spatial only: features.3 would hold 16 primaries 16 deep, the file has 8.
    let spatial = ModelConfig::parse("vgg_fc6:64:16-M-32-M", "spatial")
        .unwrap()
        .with_in_channels(1)
        .with_num_classes(10);
    let err = import_state_dict(PTH, &spatial, &device).unwrap_err();
    let CheckpointError::Mismatch { report, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(
        report.missing.is_empty() && report.unexpected.is_empty(),
        "{report}"
    );
    assert_eq!(report.mismatched.len(), 1, "{report}");
    let m = &report.mismatched[0];
    assert_eq!(m.key, "features.3.weight");
    assert_eq!(m.expected.shape, [16, 16, 3, 3]);
    assert_eq!(m.found.shape, [8, 16, 3, 3]);

    // Another architecture altogether: every key is listed.
    let lenet = ModelConfig::parse("lenet5", "spatial").unwrap();
    let err = import_state_dict(PTH, &lenet, &device).unwrap_err();
    let CheckpointError::Mismatch { report, .. } = &err else {
        panic!("{err:?}");
    };
    let unexpected: Vec<&str> = report.unexpected.iter().map(|(k, _)| k.as_str()).collect();
    assert!(unexpected.contains(&"fc6.weight"), "{unexpected:?}");
    let missing: Vec<&str> = report.missing.iter().map(|(k, _)| k.as_str()).collect();
    assert!(missing.contains(&"classifier.2.weight"), "{missing:?}");
    assert!(err.to_string().contains("nothing was loaded"));
}

#[test]
fn import_reads_pytorch_files_only_by_their_extension() {
    let device = Device::flex();
    let err =
        import_state_dict(Path::new("weights.ckpt"), &authors_small_vgg(), &device).unwrap_err();
    assert!(
        matches!(err, CheckpointError::UnknownFormat { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(".pth, .pt"), "{err}");
}
