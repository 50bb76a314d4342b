//! Import of weights written elsewhere: PyTorch state dicts (`.pth`, `.pt`, read in pure
//! Rust, no Python), and safetensors files in PyTorch's naming, into a zoo model the
//! caller names.
//!
//! The file is read with PyTorch's conventions ([`KeyLayout::Torch`]):
//!
//! - the authors' `VConv2d` layout: weight `[m, c, d, d]` of which a shared-mode layer
//!   uses the first `c - delta` input channels (the last `delta` are never read by the
//!   authors' forward pass and are dropped), key names `features.N.weight`,
//!   `fc6.weight`, `classifier.N.weight`; the compact `[m, c - delta, d, d]` is taken too;
//! - torchvision's dense checkpoints into the dense variants: ResNet as it is
//!   (`num_batches_tracked` ignored), VGG with its classifier `Linear(512·7·7, 4096)`,
//!   `classifier.3`, `classifier.6` taken as the authors' `fc6` convolution (the same
//!   function), `classifier.2`, `classifier.5`;
//! - `torch.save({'state_dict': ...})` checkpoints: only the tensors under `state_dict.`
//!   are read, and a `module.` prefix (`nn.DataParallel`) is removed.
//!
//! Keys that do not fit are all reported ([`CheckpointError::Mismatch`]: missing,
//! unexpected, shape mismatch) and nothing is loaded.

use std::path::Path;

use burn::store::burn_pack::Tensor as PackTensor;
use burn::tensor::Device;

use crate::models::{Model, ModelConfig};

use super::error::CheckpointError;
use super::format::{self, Format};
use super::keys::{self, KeyLayout, LoadNotes};

/// A model with imported weights, and what was adjusted on the way.
#[derive(Debug)]
pub struct Imported {
    /// The model.
    pub model: Model,
    /// What was adjusted.
    pub notes: LoadNotes,
    /// The key prefix removed from every key (`state_dict.`, `module.`), if any.
    pub stripped_prefix: Option<String>,
    /// Tensors read from the file.
    pub tensors: usize,
}

/// Keeps the tensors under `state_dict.` when the file has such a section, then removes
/// a `module.` prefix all keys share; returns what was removed.
fn strip_prefixes(tensors: &mut Vec<PackTensor>) -> Option<String> {
    let mut stripped = String::new();
    for (prefix, section) in [("state_dict.", true), ("module.", false)] {
        let some = tensors.iter().any(|t| t.name.starts_with(prefix));
        let all = tensors.iter().all(|t| t.name.starts_with(prefix));
        if some && (section || all) {
            tensors.retain(|t| t.name.starts_with(prefix));
            for tensor in tensors.iter_mut() {
                tensor.name.drain(..prefix.len());
            }
            stripped.push_str(prefix);
        }
    }
    (!stripped.is_empty()).then_some(stripped)
}

/// Imports the weights of a PyTorch-convention file (`.pth`, `.pt`, or `.safetensors`)
/// into the model `config` describes, built on `device`.
pub fn import_state_dict(
    path: impl AsRef<Path>,
    config: &ModelConfig,
    device: &Device,
) -> Result<Imported, CheckpointError> {
    let path = path.as_ref();
    let format = Format::of(
        path,
        &[Format::Pytorch, Format::Safetensors],
        ".pth, .pt (PyTorch) or .safetensors",
    )?;
    let mut raw = format::read(path, format)?;
    let stripped_prefix = strip_prefixes(&mut raw.tensors);
    let tensors = raw.tensors.len();
    let model = config
        .init(device)
        .map_err(|source| CheckpointError::Model {
            path: path.to_path_buf(),
            source,
        })?;
    let (model, notes) = keys::load(model, raw.tensors, KeyLayout::Torch, path, format)?;
    Ok(Imported {
        model,
        notes,
        stripped_prefix,
        tensors,
    })
}
