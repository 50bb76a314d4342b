//! `train → eval → predict → export` with `--device wgpu` on the shipped Fashion-MNIST
//! sample (in CI: Mesa's lavapipe, Vulkan on the CPU), and the trained model scored on the
//! CPU and on the GPU alike. LeNet-5 keeps it quick on the software device (scoring the
//! sample's 1,000 test images with `vgg_small` takes it 48 s); `tests/gpu.rs` runs every
//! zoo model's forward and backward there.

mod common;

use std::path::PathBuf;

use common::{repo_file, scratch, text, versatile_in as versatile};

fn sample() -> PathBuf {
    repo_file("data/fashion-mnist-sample")
}

fn json(out: std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn train_eval_predict_export_on_wgpu() {
    let dir = scratch("gpu-flow");
    let sample = sample();
    let sample = sample.to_str().unwrap();
    let out = versatile(
        &[
            "train",
            "--data",
            sample,
            "--model",
            "lenet5",
            "--variant",
            "spatial+channel",
            "--train-per-class",
            "16",
            "--test-per-class",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--device",
            "wgpu",
            "--output",
            "run",
        ],
        &dir,
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for file in ["metrics.csv", "model.bpk", "summary.json"] {
        assert!(dir.join("run").join(file).is_file(), "run/{file}");
    }

    // The same checkpoint scores the same on the GPU and on the CPU.
    let eval = |device: &str| {
        json(versatile(
            &[
                "eval",
                "--checkpoint",
                "run",
                "--data",
                sample,
                "--device",
                device,
                "--json",
            ],
            &dir,
        ))
    };
    let (gpu, cpu) = (eval("wgpu"), eval("cpu"));
    assert_eq!(gpu["images"], 1000, "{gpu}");
    let (top1_gpu, top1_cpu) = (gpu["top1"].as_f64().unwrap(), cpu["top1"].as_f64().unwrap());
    // Float sums in another order may flip an image whose two best classes tie.
    assert!((top1_gpu - top1_cpu).abs() <= 0.002, "{gpu} vs {cpu}");

    let image = dir.join("pattern.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * y) % 256) as u8]))
        .save(&image)
        .unwrap();
    let predict = |device: &str| {
        json(versatile(
            &[
                "predict",
                "--checkpoint",
                "run",
                image.to_str().unwrap(),
                "--device",
                device,
                "--json",
            ],
            &dir,
        ))
    };
    let (gpu, cpu) = (predict("wgpu"), predict("cpu"));
    let top = |v: &serde_json::Value| v[0]["top"][0]["class"].clone();
    assert_eq!(top(&gpu), top(&cpu), "{gpu} vs {cpu}");
    let p = |v: &serde_json::Value| v[0]["top"][0]["probability"].as_f64().unwrap();
    assert!((p(&gpu) - p(&cpu)).abs() < 1e-4, "{gpu} vs {cpu}");

    // The GPU-trained run exports like any other.
    let out = versatile(
        &[
            "export",
            "--checkpoint",
            "run",
            "--to",
            "dense-safetensors",
            "--output",
            "dense.safetensors",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.join("dense.safetensors").is_file());
}
