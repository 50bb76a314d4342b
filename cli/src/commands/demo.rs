//! `versatile demo`: the paper's claim on real data in one command. Trains the small VGG
//! (`vgg_small`: 32-32-M-64-64-M-128-128-M, batch norm, global average pooling, linear
//! head) dense and with spatial versatile filters, same recipe and seed, on the
//! Fashion-MNIST sample shipped in the repository (or the full set with `--data`), then
//! prints them side by side and plots their learning curves.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use versatile::train::{DeviceChoice, Outcome, ProgressBars, Summary, TrainConfig, Trainer};

use super::plot;
use super::train::{stop_flag, train_error};
use super::{ratio, UsageError};

/// The shipped sample (6,000 training and 1,000 test images).
const SAMPLE: &str = "data/fashion-mnist-sample";

/// Arguments of `versatile demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Dataset directory (IDX); e.g. /usr/share/datasets/fashion-mnist for the full set
    /// [default: the shipped sample, data/fashion-mnist-sample].
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    /// Epochs per model [default: 3; 1 with --quick].
    #[arg(long)]
    epochs: Option<usize>,
    /// A reduced run for smoke tests: 1 epoch on 30 training and 10 test images per class.
    #[arg(long)]
    quick: bool,
    /// Keep only the first N training images of each class.
    #[arg(long, value_name = "N")]
    train_per_class: Option<usize>,
    /// Directory of the two runs and the comparison chart.
    #[arg(long, value_name = "DIR", default_value = "runs/demo")]
    output: PathBuf,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Seed (the same for both models).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device: cpu, cuda, wgpu.
    #[arg(long, default_value = "cpu", value_parser = |s: &str| s.parse::<DeviceChoice>())]
    device: DeviceChoice,
}

fn sample_dir() -> PathBuf {
    // From the repository root (cargo run) or next to the sources (tests, other dirs).
    let local = PathBuf::from(SAMPLE);
    if local.is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(SAMPLE)
}

/// The demo's recipe: SGD with Nesterov momentum 0.9, lr 0.05, weight decay 5e-4,
/// cosine schedule, batch 128, pad-and-crop + flip.
fn recipe(args: &DemoArgs, variant: &str) -> TrainConfig {
    let mut config = TrainConfig {
        model: "vgg_small".into(),
        variant: variant.into(),
        epochs: args.epochs.unwrap_or(if args.quick { 1 } else { 3 }),
        seed: args.seed,
        threads: args.threads,
        device: args.device,
        output: args.output.join(variant),
        ..TrainConfig::default()
    };
    config.optimizer.lr = 0.05;
    config.data.path = args.data.clone().unwrap_or_else(sample_dir);
    config.data.train_per_class = args.train_per_class;
    if args.quick {
        config.data.train_per_class = Some(args.train_per_class.unwrap_or(30));
        config.data.test_per_class = Some(10);
        config.batch_size = 60;
    }
    config
}

/// Runs `versatile demo`.
pub fn run(args: &DemoArgs) -> Result<()> {
    let variants = ["dense", "spatial"];
    let mut results: Vec<(String, Summary, PathBuf)> = Vec::new();
    for variant in variants {
        let config = recipe(args, variant);
        config.validate().map_err(train_error)?;
        let dir = config.output.clone();
        // The demo owns its run directories: start each from scratch.
        if dir.join("checkpoint.json").exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the previous demo run {}", dir.display()))?;
        }
        if results.is_empty() {
            println!(
                "Training vgg_small (32-32-M-64-64-M-128-128-M, batch norm, global average pooling) dense and spatial-versatile on {} ({} epochs each, SGD Nesterov lr {} cosine, batch {}).",
                config.data.path.display(),
                config.epochs,
                config.optimizer.lr,
                config.batch_size
            );
        }
        let mut trainer = Trainer::new(config).map_err(train_error)?;
        let outcome = trainer
            .run(
                &mut ProgressBars::new(format!("{variant:>7}")),
                &stop_flag(),
            )
            .map_err(train_error)?;
        plot::write_run_plots(&dir)?;
        match outcome {
            Outcome::Finished(summary) => results.push((variant.to_string(), summary, dir)),
            Outcome::Stopped { .. } => {
                return Err(UsageError::from_display(format!(
                    "interrupted; the {variant} run can continue with: versatile train --resume {}",
                    dir.display()
                )))
            }
        }
    }
    print_table(&results);
    let runs: Vec<(String, Vec<_>)> = results
        .iter()
        .map(|(label, _, dir)| {
            versatile::train::metrics::read_metrics(dir)
                .map(|m| (label.clone(), m))
                .map_err(train_error)
        })
        .collect::<Result<_>>()?;
    let written = plot::write_plots(&runs, &args.output.join("compare"))?;
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("\nlearning curves: {}", names.join(", "));
    Ok(())
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let head = digits.len() % 3;
    let mut groups: Vec<&str> = Vec::new();
    if head > 0 {
        groups.push(&digits[..head]);
    }
    groups.extend(
        digits.as_bytes()[head..]
            .chunks(3)
            .map(|c| std::str::from_utf8(c).expect("ASCII digits")),
    );
    groups.join(",")
}

fn print_table(results: &[(String, Summary, PathBuf)]) {
    let [(_, dense, _), (_, spatial, _)] = results else {
        return;
    };
    let rows: [(&str, String, String, String); 7] = [
        (
            "parameters",
            thousands(dense.params),
            thousands(spatial.params),
            format!("{:.3}", ratio(spatial.params, dense.params)),
        ),
        (
            "conv parameters",
            thousands(dense.conv_params),
            thousands(spatial.conv_params),
            format!("{:.3}", ratio(spatial.conv_params, dense.conv_params)),
        ),
        (
            "MACs / image (paper)",
            format!("{:.2} M", dense.macs_paper as f64 / 1e6),
            format!("{:.2} M", spatial.macs_paper as f64 / 1e6),
            format!("{:.3}", ratio(spatial.macs_paper, dense.macs_paper)),
        ),
        (
            "MACs / image (nested)",
            format!("{:.2} M", dense.macs_nested as f64 / 1e6),
            format!("{:.2} M", spatial.macs_nested as f64 / 1e6),
            format!("{:.3}", ratio(spatial.macs_nested, dense.macs_nested)),
        ),
        (
            "test top-1",
            format!("{:.2}%", 100.0 * dense.val_top1),
            format!("{:.2}%", 100.0 * spatial.val_top1),
            format!("{:+.2} pt", 100.0 * (spatial.val_top1 - dense.val_top1)),
        ),
        (
            "test top-5",
            format!("{:.2}%", 100.0 * dense.val_top5),
            format!("{:.2}%", 100.0 * spatial.val_top5),
            format!("{:+.2} pt", 100.0 * (spatial.val_top5 - dense.val_top5)),
        ),
        (
            "time / epoch",
            format!("{:.1} s", dense.seconds_per_epoch),
            format!("{:.1} s", spatial.seconds_per_epoch),
            format!(
                "{:.2}",
                if dense.seconds_per_epoch > 0.0 {
                    spatial.seconds_per_epoch / dense.seconds_per_epoch
                } else {
                    0.0
                }
            ),
        ),
    ];
    println!();
    println!(
        "vgg_small after {} epochs ({} thread(s))",
        dense.epochs, dense.threads
    );
    println!(
        "{:<22} {:>12} {:>12} {:>10}",
        "", "dense", "spatial", "spatial/dense"
    );
    for (name, d, s, r) in rows {
        println!("{name:<22} {d:>12} {s:>12} {r:>10}");
    }
}
