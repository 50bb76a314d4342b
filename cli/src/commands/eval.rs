//! `versatile eval`: loss, top-1 and top-5 of a trained model on a dataset.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use versatile::data::{Dataset, DatasetKind, Loader, LoaderConfig, Split, Transform};
use versatile::train::{self, DeviceChoice};

use super::train::train_error;
use super::UsageError;

/// Arguments of `versatile eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run directory (its final model, else its latest checkpoint) or a checkpoint
    /// file (a run's model.bpk, or any .bpk/.safetensors written by versatile).
    #[arg(long, value_name = "RUN_DIR_OR_MODEL")]
    checkpoint: PathBuf,
    /// Dataset directory.
    #[arg(long, value_name = "PATH")]
    data: PathBuf,
    /// Dataset format: idx, cifar10, cifar100, imagefolder [default: detected].
    #[arg(long)]
    kind: Option<String>,
    /// Which split: test or train.
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    split: String,
    /// Batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Device: cpu, cuda, wgpu.
    #[arg(long, default_value = "cpu", value_parser = |s: &str| s.parse::<DeviceChoice>())]
    device: DeviceChoice,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs `versatile eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    if args.batch_size == 0 {
        return Err(UsageError::from_display("--batch-size must be at least 1"));
    }
    train::init_threads(args.threads).map_err(train_error)?;
    let device = train::device(args.device).map_err(train_error)?;
    let kind = match &args.kind {
        Some(kind) => kind
            .parse::<DatasetKind>()
            .map_err(UsageError::from_display)?,
        None => DatasetKind::detect(&args.data)?,
    };
    let split = if args.split == "train" {
        Split::Train
    } else {
        Split::Test
    };
    let (model, config) =
        train::load_trained_model(&args.checkpoint, &device).map_err(train_error)?;
    let dataset = Dataset::open(kind, &args.data, split)?;
    let loader = Loader::new(
        dataset,
        Transform::standard(kind, false),
        LoaderConfig::new(args.batch_size).with_shuffle(false),
    )?;
    let [c, h, w] = loader.sample_shape().dims();
    config
        .check_input([1, c, h, w])
        .map_err(UsageError::from_display)?;
    if loader.num_classes() > config.num_classes {
        return Err(UsageError::from_display(format!(
            "the dataset has {} classes, the model {}",
            loader.num_classes(),
            config.num_classes
        )));
    }
    let start = std::time::Instant::now();
    let tally = train::evaluate(&model, &loader, &device).map_err(train_error)?;
    let seconds = start.elapsed().as_secs_f64();
    if args.json {
        let value = json!({
            "model": config.name(),
            "variant": config.variant.to_string(),
            "images": tally.images,
            "loss": tally.loss(),
            "top1": tally.top1(),
            "top5": tally.top5(),
            "seconds": seconds,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "{} ({}) on {} {} images of {}: loss {:.4}, top-1 {:.2}%, top-5 {:.2}% ({:.1} s)",
            config.name(),
            config.variant,
            tally.images,
            args.split,
            args.data.display(),
            tally.loss(),
            100.0 * tally.top1(),
            100.0 * tally.top5(),
            seconds
        );
    }
    Ok(())
}
