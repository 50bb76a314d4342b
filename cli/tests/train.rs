//! `versatile demo`, `train`, `eval` and `plot` end to end on the shipped Fashion-MNIST
//! sample.

mod common;

use std::path::PathBuf;

use common::{repo_file, scratch, text, versatile_in as versatile};

fn sample() -> PathBuf {
    repo_file("data/fashion-mnist-sample")
}

#[test]
fn quick_demo_then_eval_and_plot_its_runs() {
    let dir = scratch("demo");
    let out = versatile(&["demo", "--quick", "--output", "demo"], &dir);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    // The side-by-side table: the spatial twin has about half the parameters.
    for row in [
        "parameters",
        "conv parameters",
        "MACs / image (paper)",
        "test top-1",
        "time / epoch",
    ] {
        assert!(stdout.contains(row), "no '{row}' row in:\n{stdout}");
    }
    let params = stdout
        .lines()
        .find(|l| l.starts_with("parameters"))
        .unwrap()
        .split_whitespace()
        .map(|w| w.replace(',', ""))
        .filter_map(|w| w.parse::<f64>().ok())
        .collect::<Vec<_>>();
    assert_eq!(params.len(), 3, "{stdout}");
    assert!(params[1] < 0.55 * params[0], "{params:?}");
    for run in ["dense", "spatial"] {
        for file in ["metrics.csv", "metrics.json", "model.bpk", "summary.json"] {
            assert!(
                dir.join("demo").join(run).join(file).is_file(),
                "{run}/{file}"
            );
        }
    }
    assert!(dir.join("demo/compare.svg").is_file());

    // eval reads the run directory back and scores the shipped test images.
    let sample = sample();
    let out = versatile(
        &[
            "eval",
            "--checkpoint",
            "demo/spatial",
            "--data",
            sample.to_str().unwrap(),
            "--json",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["images"], 1000);
    assert_eq!(v["variant"], "spatial");
    let top1 = v["top1"].as_f64().unwrap();
    let top5 = v["top5"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1) && top5 >= top1, "{v}");

    // predict, inspect and export take the run directory as eval does.
    let image = dir.join("pattern.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * y) % 256) as u8]))
        .save(&image)
        .unwrap();
    let out = versatile(
        &[
            "predict",
            "--checkpoint",
            "demo/spatial",
            image.to_str().unwrap(),
            "--json",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let predictions: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let top = predictions[0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 5, "{predictions}");
    assert!(top[0]["name"].is_string(), "{predictions}");
    let out = versatile(&["inspect", "demo/spatial", "--json"], &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["meta"]["config"]["variant"], "spatial", "{info}");

    // The run's final model is a deployable checkpoint: the dense export takes it.
    let out = versatile(
        &[
            "export",
            "--checkpoint",
            "demo/spatial",
            "--to",
            "dense-safetensors",
            "--output",
            "spatial-dense.safetensors",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.join("spatial-dense.safetensors").is_file());

    // plot compares the two runs.
    let out = versatile(
        &["plot", "demo/dense", "demo/spatial", "--output", "both"],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.join("both.svg").is_file());
    let svg = std::fs::read_to_string(dir.join("both.svg")).unwrap();
    assert!(svg.contains("spatial test") && svg.contains("dense train"));
}

#[test]
fn bad_configurations_exit_with_usage_errors() {
    let dir = scratch("config");
    std::fs::write(
        dir.join("bad.toml"),
        "epochs = 3\n[optimizer]\nlearning_rate = 0.1\n",
    )
    .unwrap();
    let out = versatile(&["train", "--config", "bad.toml"], &dir);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("learning_rate"),
        "{stderr}"
    );

    let out = versatile(&["train", "--epochs", "0"], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("epochs"));

    let out = versatile(&["train", "--momentum", "0", "--nesterov", "true"], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("nesterov"));

    let out = versatile(&["train", "--variant", "sparse"], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("sparse"));

    let out = versatile(&["train", "--resume", "nowhere"], &dir);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no checkpoint"),
        "{}",
        text(&out.stderr)
    );

    let out = versatile(
        &[
            "eval",
            "--checkpoint",
            "nowhere",
            "--data",
            sample().to_str().unwrap(),
        ],
        &dir,
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("nowhere"));
}

/// `--bench-steps --json` reports the step's memory beside its timings: a heap peak at
/// least as large as the activations the step must hold at once, and (on Linux) the
/// resident set's rise and high-water mark.
#[test]
fn bench_steps_report_the_memory_of_a_step() {
    let dir = scratch("bench-memory");
    let sample = sample();
    let out = versatile(
        &[
            "train",
            "--model",
            "vgg_small",
            "--variant",
            "spatial",
            "--data",
            sample.to_str().unwrap(),
            "--train-per-class",
            "4",
            "--test-per-class",
            "1",
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--bench-steps",
            "1",
            "--json",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    let memory = &report["memory"];
    let heap = memory["heap_peak_bytes"].as_u64().expect("heap_peak_bytes");
    // The first convolution's output alone: 32 images x 32 channels x 28 x 28 floats,
    // kept for the backward pass with the batch norm's and the next layer's.
    let first_map = 32 * 32 * 28 * 28 * 4;
    assert!(heap > 3 * first_map, "{memory}");
    if cfg!(target_os = "linux") {
        let rise = memory["rss_growth_bytes"]
            .as_u64()
            .expect("rss_growth_bytes");
        let peak = memory["rss_peak_bytes"].as_u64().expect("rss_peak_bytes");
        assert!(rise > 0 && peak > rise, "{memory}");
    }
}

/// The small VGG through `bench --model`, no warm-up and one timed run of each timing,
/// with `extra` arguments: what it printed.
fn bench_vgg_small(extra: &[&str], dir: &std::path::Path) -> String {
    let args = [
        "bench",
        "--model",
        "vgg_small",
        "--warmup",
        "0",
        "--reps",
        "1",
        "--peak-size",
        "0",
    ];
    let out = versatile(&[&args[..], extra].concat(), dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The rows of `bench --json`'s output.
fn json_rows(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// `bench --model M --json` times a training step beside the compiled plan and the module
/// forward: three rows with positive times, the step's rate counting three times the
/// forward's multiply-adds (forward, input gradient, weight gradient).
#[test]
fn bench_model_times_a_training_step() {
    let dir = scratch("bench-model");
    let rows = json_rows(&bench_vgg_small(
        &["--variant", "spatial", "--batch", "4", "--json"],
        &dir,
    ));
    let impls: Vec<&str> = rows.iter().map(|r| r["impl"].as_str().unwrap()).collect();
    assert_eq!(impls, ["plan", "module", "train step"]);
    for row in &rows {
        assert!(row["ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    let work =
        |row: &serde_json::Value| row["gflops"].as_f64().unwrap() * row["ms"].as_f64().unwrap();
    let ratio = work(&rows[2]) / work(&rows[0]);
    assert!((ratio - 3.0).abs() < 1e-9, "{ratio}");
}

/// `bench --model M --plan-only` (the second timing of `benches/infer_side_by_side.sh`)
/// times the compiled plan alone: one row, in the JSON form and the table.
#[test]
fn bench_model_plan_only_times_the_plan_alone() {
    let dir = scratch("bench-plan-only");
    let rows = json_rows(&bench_vgg_small(
        &["--batch", "2", "--plan-only", "--json"],
        &dir,
    ));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["impl"], "plan");
    assert!(rows[0]["ms"].as_f64().unwrap() > 0.0, "{}", rows[0]);
    let table = bench_vgg_small(&["--batch", "2", "--plan-only"], &dir);
    // The timing row: `plan`, then its milliseconds (not the "plan memory" line).
    let timed = |line: &str| {
        let mut words = line.split_whitespace();
        words.next() == Some("plan") && words.next().is_some_and(|ms| ms.parse::<f64>().is_ok())
    };
    assert_eq!(
        table.lines().filter(|line| timed(line)).count(),
        1,
        "{table}"
    );
    assert!(
        !table.contains("module") && !table.contains("train step"),
        "{table}"
    );
}
