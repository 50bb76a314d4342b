//! `versatile predict`: the most probable classes of images under a checkpoint's model.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use versatile::checkpoint::predict::predict;
use versatile::train::{self, DeviceChoice};

use super::files::{checkpoint_error, load_model};
use super::train::train_error;
use super::UsageError;

/// Arguments of `versatile predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// A model file (.bpk or .safetensors written by versatile), or a run directory
    /// (its final model, else its latest checkpoint's).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Images (PNG, JPEG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Device: cpu, cuda, wgpu.
    #[arg(long, default_value = "cpu", value_parser = |s: &str| s.parse::<DeviceChoice>())]
    device: DeviceChoice,
    /// Print one JSON array instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `versatile predict`.
pub fn run(args: &PredictArgs) -> Result<()> {
    if args.top == 0 {
        return Err(UsageError::from_display("--top must be at least 1"));
    }
    let device = train::device(args.device).map_err(train_error)?;
    let (model, meta) = load_model(&args.checkpoint, &device)?;
    let predictions =
        predict(&model, &meta, &args.images, args.top, &device).map_err(checkpoint_error)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&predictions)?);
        return Ok(());
    }
    for prediction in &predictions {
        println!("{}", prediction.image.display());
        for (rank, score) in prediction.top.iter().enumerate() {
            let label = match &score.name {
                Some(name) => format!("{name} ({})", score.class),
                None => format!("class {}", score.class),
            };
            println!(
                "  {}. {label:<24} {:>7.3} %",
                rank + 1,
                100.0 * score.probability
            );
        }
    }
    Ok(())
}
