//! `versatile import`: weights from PyTorch (a `.pth`/`.pt` state dict in the authors'
//! VConv2d layout or torchvision's, or safetensors with PyTorch's names) into a zoo
//! model, saved as a checkpoint that describes its model.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use versatile::checkpoint::import::import_state_dict;
use versatile::checkpoint::{save_checkpoint, CheckpointMeta};
use versatile::models::ImageClassifier;

use super::files::{checkpoint_error, size};
use super::ModelArgs;

/// Arguments of `versatile import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The state dict: .pth/.pt (PyTorch) or .safetensors with PyTorch's key names.
    file: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Class names in output order, comma separated (stored for `predict`).
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    class_names: Option<Vec<String>>,
    /// The checkpoint to write: .bpk or .safetensors.
    #[arg(long, short)]
    output: PathBuf,
}

/// Runs `versatile import`.
pub fn run(args: &ImportArgs) -> Result<()> {
    let config = args.model.config()?;
    let device = burn::tensor::Device::flex();
    let imported = import_state_dict(&args.file, &config, &device).map_err(checkpoint_error)?;
    let mut meta = CheckpointMeta::new(imported.model.config().clone());
    if let Some(names) = &args.class_names {
        meta = meta.with_class_names(names.clone());
    }
    save_checkpoint(&args.output, &imported.model, &meta).map_err(checkpoint_error)?;

    let notes = &imported.notes;
    println!(
        "imported {} tensors from {} into {} ({}), {} classes, {} input channels",
        imported.tensors,
        args.file.display(),
        config.name(),
        config.variant,
        config.num_classes,
        config.in_channels
    );
    if let Some(prefix) = &imported.stripped_prefix {
        println!("  key prefix '{prefix}' removed");
    }
    if !notes.authors_weights.is_empty() {
        println!(
            "  {} versatile weight(s) in the authors' [m, c, d, d] layout: their unused last delta input channels dropped ({})",
            notes.authors_weights.len(),
            notes.authors_weights.join(", ")
        );
    }
    if notes.torchvision_classifier {
        println!("  torchvision's VGG classifier (Linear 0, 3, 6) taken as fc6, classifier.2, classifier.5");
    }
    if notes.ignored_counters > 0 {
        println!(
            "  {} batch-norm num_batches_tracked counter(s) ignored",
            notes.ignored_counters
        );
    }
    if !notes.converted.is_empty() {
        println!("  {} tensor(s) converted to float32", notes.converted.len());
    }
    let written = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    println!("wrote {} ({})", args.output.display(), size(written));
    Ok(())
}
