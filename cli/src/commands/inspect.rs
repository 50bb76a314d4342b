//! `versatile inspect`: what a checkpoint file holds (model, tensors, header) and its
//! size against its dense twin's.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use versatile::checkpoint::{inspect, CheckpointInfo, StoredSize};
use versatile::models::reference::grouped;

use super::files::{checkpoint_error, model_file, size};
use super::ratio;

/// Arguments of `versatile inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A checkpoint: .bpk, .safetensors, or a PyTorch .pth/.pt state dict; or a run
    /// directory (its final model, else its latest checkpoint's).
    file: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `versatile inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let file = model_file(&args.file)?;
    let info = inspect(&file).map_err(checkpoint_error)?;
    if args.json {
        let mut value = serde_json::to_value(&info)?;
        value["overhead_bytes"] = json!(info.overhead());
        value["dense_twin_file_size"] = json!(info.dense_twin_file_size());
        value["size_ratio"] = json!(info
            .dense_twin_file_size()
            .map(|dense| ratio(info.file_size, dense)));
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_info(&info);
    }
    Ok(())
}

fn stored(label: &str, s: &StoredSize) {
    println!(
        "{label:<12} {} parameters + {} buffers = {} float32 bytes",
        grouped(s.params),
        grouped(s.buffers),
        grouped(s.stored_bytes)
    );
}

fn print_info(info: &CheckpointInfo) {
    println!(
        "{}: {} file, {}",
        info.path.display(),
        info.format,
        size(info.file_size)
    );
    match &info.meta {
        Some(meta) => {
            let c = &meta.config;
            println!(
                "model:       {} ({}), {} classes, {} input channels",
                c.name(),
                c.variant,
                c.num_classes,
                c.in_channels
            );
            if let Some(layout) = info.layout {
                println!("key layout:  {layout}");
            }
            if let Some(names) = &meta.class_names {
                println!("classes:     {}", names.join(", "));
            }
            let p = meta.preprocess();
            println!(
                "input:       {}x{} (shorter side resized to {}, centre crop)",
                p.input_size[0], p.input_size[1], p.resize
            );
        }
        None => {
            println!("model:       not described (weights from elsewhere: use `versatile import`)")
        }
    }
    println!(
        "tensors:     {} holding {} values, {} bytes of data, {} bytes of header and alignment",
        info.tensors,
        grouped(info.values),
        grouped(info.data_bytes),
        grouped(info.overhead())
    );
    if let (Some(model), Some(dense), Some(dense_file)) =
        (&info.model, &info.dense_twin, info.dense_twin_file_size())
    {
        stored("stored:", model);
        stored("dense twin:", dense);
        println!(
            "on disk:     {} against about {} for the dense twin: {:.3} of its size",
            size(info.file_size),
            size(dense_file),
            ratio(info.file_size, dense_file)
        );
    }
}
