//! The checkpoint commands end to end: import the authors' PyTorch state dict, inspect
//! it against its dense twin, export it (dense safetensors, ONNX), predict, and the
//! exit codes of bad files.

mod common;

use std::path::Path;

use common::{fails, ok, repo_file, scratch};

fn pth() -> String {
    repo_file("tests/data/torch/small_vgg_authors_layout.pth")
        .display()
        .to_string()
}

/// Imports the authors' state dict into `dir/authors.EXT`.
fn import(dir: &Path, ext: &str) -> String {
    let out = dir.join(format!("authors.{ext}")).display().to_string();
    let pth = pth();
    let mut args = vec!["import", pth.as_str()];
    args.extend(common::AUTHORS_MODEL);
    args.extend([
        "--class-names",
        "t-shirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,boot",
        "--output",
        &out,
    ]);
    let text = ok(&args);
    assert!(text.contains("imported 10 tensors"), "{text}");
    assert!(text.contains("features.3.weight"), "{text}");
    out
}

#[test]
fn import_inspect_export_predict() {
    let dir = scratch("flow");
    let checkpoint = import(&dir, "bpk");

    let info: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", &checkpoint, "--json"])).unwrap();
    assert_eq!(info["format"], "burnpack");
    assert_eq!(info["meta"]["config"]["arch"], "vgg_fc6:64:16-M-32-M");
    assert_eq!(info["meta"]["class_names"][9], "boot");
    // Every value of the file is a parameter of the model: no bias, no junk.
    assert_eq!(info["values"], info["model"]["params"]);
    let ratio = info["size_ratio"].as_f64().unwrap();
    assert!((0.2..0.4).contains(&ratio), "{ratio}");
    let text = ok(&["inspect", &checkpoint]);
    assert!(text.contains("of its size"), "{text}");

    // The PyTorch file itself: no description, its tensors counted.
    let text = ok(&["inspect", &pth()]);
    assert!(text.contains("not described"), "{text}");

    let dense = dir.join("dense.safetensors").display().to_string();
    let text = ok(&[
        "export",
        "--checkpoint",
        &checkpoint,
        "--to",
        "dense-safetensors",
        "-o",
        &dense,
    ]);
    assert!(text.contains("torchvision's layout"), "{text}");
    let onnx = dir.join("model.onnx").display().to_string();
    let text = ok(&[
        "export",
        "--checkpoint",
        &checkpoint,
        "--to",
        "onnx",
        "-o",
        &onnx,
    ]);
    assert!(
        text.contains("input [batch, 1, 28, 28], output [batch, 10]"),
        "{text}"
    );
    assert!(std::fs::metadata(&onnx).unwrap().len() > 100_000);

    let image = dir.join("shirt.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * y) % 256) as u8]))
        .save(&image)
        .unwrap();
    let image = image.display().to_string();
    let predictions: serde_json::Value = serde_json::from_str(&ok(&[
        "predict",
        "--checkpoint",
        &checkpoint,
        &image,
        &image,
        "--json",
    ]))
    .unwrap();
    let first = predictions[0]["top"].as_array().unwrap();
    assert_eq!(first.len(), 5);
    assert_eq!(predictions[1]["top"], predictions[0]["top"]);
    let total: f64 = first
        .iter()
        .map(|s| s["probability"].as_f64().unwrap())
        .sum();
    assert!(total > 0.0 && total <= 1.0 + 1e-6, "{total}");
    assert!(first[0]["name"].is_string());
    let text = ok(&["predict", "--checkpoint", &dense, &image, "--top", "3"]);
    assert!(
        text.contains(" 1. ") && text.contains(" 3. ") && !text.contains(" 4. "),
        "{text}"
    );
}

#[test]
fn bad_files_and_misfits_exit_with_usage_errors() {
    let dir = scratch("errors");
    // The state dict into a model it does not fit.
    let out = dir.join("x.bpk").display().to_string();
    let pth = pth();
    let err = fails(
        &[
            "import",
            &pth,
            "--model",
            "vgg_fc6:64:16-M-32-M",
            "--variant",
            "spatial",
            "--in-channels",
            "1",
            "--output",
            &out,
        ],
        2,
    );
    assert!(err.contains("nothing was loaded"), "{err}");
    assert!(
        err.contains("features.3.weight (model [16, 16, 3, 3] F32, file [8, 16, 3, 3] F32)"),
        "{err}"
    );
    assert!(!Path::new(&out).exists());

    let checkpoint = import(&dir, "safetensors");
    let bytes = std::fs::read(&checkpoint).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&["inspect", cut.to_str().unwrap()], 2);
    assert!(err.contains("truncated"), "{err}");
    let err = fails(&["predict", "--checkpoint", &pth, "x.png"], 2);
    assert!(err.contains("versatile import"), "{err}");
    let err = fails(
        &[
            "export",
            "--checkpoint",
            &checkpoint,
            "--to",
            "onnx",
            "-o",
            "x.bin",
        ],
        2,
    );
    assert!(err.contains(".onnx"), "{err}");
    let err = fails(&["predict", "--checkpoint", &checkpoint, "missing.png"], 2);
    assert!(err.contains("cannot read image missing.png"), "{err}");
}
