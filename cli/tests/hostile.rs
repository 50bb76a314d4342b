//! Crafted files against the commands that read them, with the address space limited:
//! each must be refused with a message naming the problem and exit code 1 or 2, never
//! abort on an allocation the file asked for.

mod common;

use std::path::Path;

use common::{ok, png, repo_file, scratch, text, versatile_limited};
use serde_json::{json, Value};

/// Address space the commands run in: ample for every command on these small files,
/// far below what the crafted files ask for.
const LIMIT_MIB: u64 = 1024;

/// Runs `versatile ARGS` in `dir` under [`LIMIT_MIB`]; it must fail with exit code 1 or 2
/// and a message containing `expected`.
fn refused(args: &[&str], dir: &Path, expected: &str) {
    let out = versatile_limited(args, dir, LIMIT_MIB);
    let stderr = text(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "versatile {args:?}: {:?}\n{stderr}",
        out.status
    );
    assert!(stderr.contains(expected), "versatile {args:?}: {stderr}");
}

/// A copy of the safetensors file `from` whose model description is changed by `edit`.
fn with_description(from: &Path, to: &Path, edit: impl FnOnce(&mut Value)) {
    let bytes = std::fs::read(from).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let metadata = &mut header["__metadata__"]["versatile.model"];
    let mut description: Value = serde_json::from_str(metadata.as_str().unwrap()).unwrap();
    edit(&mut description);
    *metadata = Value::String(description.to_string());
    let mut json = serde_json::to_vec(&header).unwrap();
    // The data starts 8-byte aligned.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(to, out).unwrap();
}

/// Imports the authors' small network (1x28x28 inputs, 10 classes) as `dir/NAME`.
fn import(dir: &Path, name: &str) {
    let pth = repo_file("tests/data/torch/small_vgg_authors_layout.pth");
    let output = dir.join(name);
    let mut args = vec!["import", pth.to_str().unwrap()];
    args.extend(common::AUTHORS_MODEL);
    args.extend(["--output", output.to_str().unwrap()]);
    ok(&args);
}

#[test]
fn crafted_checkpoints_and_images_are_refused_within_bounded_memory() {
    let dir = scratch("hostile");
    import(&dir, "model.safetensors");
    let image = dir.join("digit.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([(x * y % 256) as u8]))
        .save(&image)
        .unwrap();
    let original = dir.join("model.safetensors");
    // The untouched file works under the same limit.
    let out = versatile_limited(
        &["predict", "--checkpoint", "model.safetensors", "digit.png"],
        &dir,
        LIMIT_MIB,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let channels = dir.join("channels.safetensors");
    with_description(&original, &channels, |d| {
        d["config"]["in_channels"] = json!(1_000_000_000_000u64)
    });
    for command in ["inspect", "predict"] {
        let mut args = vec![command];
        if command == "predict" {
            args.extend(["--checkpoint", "channels.safetensors", "digit.png"]);
        } else {
            args.push("channels.safetensors");
        }
        refused(&args, &dir, "in_channels is 1000000000000, above the limit");
    }
    let preprocess = dir.join("preprocess.safetensors");
    with_description(&original, &preprocess, |d| {
        d["preprocess"] = json!({
            "input_size": [1_000_000, 1_000_000],
            "resize": 1_000_000,
            "mean": [0.0],
            "std": [1.0]
        })
    });
    refused(
        &[
            "predict",
            "--checkpoint",
            "preprocess.safetensors",
            "digit.png",
        ],
        &dir,
        "sides above 4096",
    );
    let batch_norm = dir.join("batch-norm.safetensors");
    with_description(&original, &batch_norm, |d| {
        d["config"]["arch"] = json!("vgg_bn_fc6:64:65536-65536-M-65536-M")
    });
    refused(
        &["inspect", "batch-norm.safetensors"],
        &dir,
        "but the file's tensors hold only",
    );

    // A PNG header announcing 100000 x 100000 pixels.
    let bytes = std::fs::read(&image).unwrap();
    std::fs::write(
        dir.join("huge.png"),
        png::with_size(&bytes, 100_000, 100_000),
    )
    .unwrap();
    refused(
        &["predict", "--checkpoint", "model.safetensors", "huge.png"],
        &dir,
        "image of 100000x100000 pixels, above the limit of 16384",
    );
}

#[test]
fn crafted_datasets_and_run_files_are_refused_within_bounded_memory() {
    let dir = scratch("hostile-data");
    import(&dir, "model.bpk");
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    let sample = repo_file("data/fashion-mnist-sample");
    for name in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
        std::fs::copy(sample.join(name), data.join(name)).unwrap();
    }
    // The gzip trailer announces 4 GiB - 1 of data: the old reader reserved 1 GiB on
    // its word. The stream itself is cut.
    let images = data.join("t10k-images-idx3-ubyte.gz");
    let mut bytes = std::fs::read(&images).unwrap();
    bytes.truncate(bytes.len() / 2);
    bytes.extend_from_slice(&[0xff; 4]);
    std::fs::write(&images, bytes).unwrap();
    refused(
        &["eval", "--checkpoint", "model.bpk", "--data", "data"],
        &dir,
        "t10k-images-idx3-ubyte.gz",
    );

    let config = dir.join("huge.toml");
    let mut toml = String::from("epochs = 1\n");
    toml.push_str(&"# padding\n".repeat(200_000));
    std::fs::write(&config, toml).unwrap();
    refused(
        &["train", "--config", "huge.toml"],
        &dir,
        "longer than 1048576 bytes",
    );
    std::fs::write(&config, "threads = 1000000000\n").unwrap();
    refused(&["train", "--config", "huge.toml"], &dir, "at most 1024");
}
