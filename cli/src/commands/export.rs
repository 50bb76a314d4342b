//! `versatile export`: a checkpoint's model as a plain dense model, as safetensors in
//! torchvision's keys and layouts or as ONNX.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use versatile::checkpoint::export::export_dense_safetensors;
use versatile::checkpoint::onnx::{export_onnx_as, OnnxForm};

use super::files::{checkpoint_error, load_model, model_file, size};
use super::layer::parse_hw;

/// What `versatile export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Dense safetensors with torchvision's key names and layouts.
    DenseSafetensors,
    /// ONNX (opset 18) of the dense form, batch axis symbolic.
    Onnx,
}

/// The form of an ONNX export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Form {
    /// The dense form.
    Dense,
    /// The versatile form.
    Versatile,
}

/// Arguments of `versatile export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A model file (.bpk or .safetensors written by versatile), or a run directory
    /// (its final model, else its latest checkpoint's).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The output format.
    #[arg(long = "to", value_enum)]
    target: Target,
    /// The file to write (.safetensors or .onnx).
    #[arg(long, short)]
    output: PathBuf,
    /// ONNX only: `dense` (every versatile layer unfolded) or `versatile` (each primary
    /// weight stored once, the secondary filters sliced from it in the graph).
    #[arg(long, value_enum, default_value = "dense")]
    form: Form,
    /// ONNX input size HxW; default: the checkpoint's input size.
    #[arg(long, value_name = "HxW", value_parser = parse_hw)]
    input: Option<[usize; 2]>,
}

/// Runs `versatile export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    let device = burn::tensor::Device::flex();
    let file = model_file(&args.checkpoint)?;
    let (model, meta) = load_model(&file, &device)?;
    let config = &meta.config;
    match args.target {
        Target::DenseSafetensors => {
            export_dense_safetensors(&model, Some(&meta), &args.output)
                .map_err(checkpoint_error)?;
            println!(
                "wrote the dense form of {} ({}) to {} in torchvision's layout",
                config.name(),
                config.variant,
                args.output.display()
            );
        }
        Target::Onnx => {
            let input = args.input.unwrap_or(meta.preprocess().input_size);
            let form = match args.form {
                Form::Dense => OnnxForm::Dense,
                Form::Versatile => OnnxForm::Versatile,
            };
            let export =
                export_onnx_as(&model, input, &args.output, form).map_err(checkpoint_error)?;
            let [_, c, h, w] = export.input;
            println!(
                "wrote the {} form of {} ({}) to {} as ONNX opset 18: input [batch, {c}, {h}, {w}], output [batch, {}]",
                if form == OnnxForm::Dense { "dense" } else { "versatile" },
                config.name(),
                config.variant,
                args.output.display(),
                export.output[1]
            );
        }
    }
    let written = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    let compact = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    println!("  {} (the checkpoint: {})", size(written), size(compact));
    Ok(())
}
