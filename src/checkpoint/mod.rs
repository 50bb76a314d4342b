//! Checkpoints and deployment: save and load every model of the zoo, import PyTorch
//! state dicts, export the dense form (safetensors in torchvision's layout, ONNX), and
//! classify images with a saved model.
//!
//! # Files
//!
//! | extension | format | keys and layouts ([`KeyLayout`]) | written by |
//! |---|---|---|---|
//! | `.bpk` | burnpack, burn's native format | burn's own (`burn`) | [`save_model`] |
//! | `.safetensors` | safetensors | PyTorch's (`torch`): the authors' / torchvision's names | [`save_model`] |
//! | `.safetensors` | safetensors, dense | torchvision's (`torchvision`) | [`export::export_dense_safetensors`] |
//! | `.onnx` | ONNX (opset 18), dense | graph with embedded weights | [`onnx::export_onnx`] |
//! | `.pth`, `.pt` | PyTorch `torch.save` (read only) | PyTorch's | PyTorch; read by [`import`] |
//!
//! A versatile layer stores only its primary filters (`[m, depth, d, d]`), so a
//! checkpoint holds exactly the model's parameters and batch-norm statistics, 4 bytes
//! each, plus a header: a few hundred bytes of metadata and, for burnpack, up to 255
//! bytes of alignment per tensor.
//!
//! Every file written here carries, in its string metadata, the model it holds
//! ([`CheckpointMeta`] as JSON under [`METADATA_MODEL`]: architecture, variant, classes,
//! input channels, optional class names and preprocessing) and its key layout (under
//! [`METADATA_LAYOUT`]), so the file alone rebuilds its model:
//!
//! ```no_run
//! use burn::tensor::Device;
//! use versatile::checkpoint::{load_model, save_model};
//! use versatile::models::ModelConfig;
//!
//! let device = Device::flex();
//! let model = ModelConfig::parse("vgg_small", "spatial")?.with_in_channels(1).init(&device)?;
//! save_model("vgg_small.bpk", &model)?;
//! let back = load_model("vgg_small.bpk", &device)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Loading is all or nothing
//!
//! A file's tensors are compared with the model's, key by key, before any is applied:
//! keys the model lacks, keys the file lacks and keys of another shape are all listed in
//! one [`CheckpointError::Mismatch`], and nothing is loaded. A truncated file, a file of
//! another format and a damaged header are told apart ([`CheckpointError::Truncated`],
//! [`CheckpointError::WrongMagic`], [`CheckpointError::Corrupt`]) before any weight is
//! read.
//!
//! # A description is checked against its file
//!
//! Before a model is built from a file's description, the description must stay within
//! the zoo's limits ([`crate::models::MAX_CHANNELS`], ...), its class names and
//! preprocessing must fit it, and the model must not store more values than the file's
//! tensors hold ([`CheckpointError::DescriptionBeyondTensors`]): a crafted description
//! costs no more memory than its file. [`inspect`] compares the tensors with the model
//! key by key as a load does, reading no weight.

mod error;
pub mod export;
mod format;
pub mod import;
mod keys;
pub mod onnx;
pub mod predict;
mod walk;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::models::{ImageClassifier, Model, ModelConfig};

use format::RawFile;

pub use error::{CheckpointError, KeyMismatch, KeyReport, TensorSpec};
pub use format::Format;
pub use keys::{KeyLayout, LoadNotes};
pub use predict::Preprocess;

/// Metadata key of the model description ([`CheckpointMeta`] as JSON).
pub const METADATA_MODEL: &str = "versatile.model";
/// Metadata key of the key layout (`burn`, `torch`, `torchvision`).
pub const METADATA_LAYOUT: &str = "versatile.layout";
/// Metadata key of this crate's checkpoint version.
pub const METADATA_VERSION: &str = "versatile.checkpoint_version";
/// The checkpoint version this crate writes.
pub const CHECKPOINT_VERSION: &str = "1";

/// What a checkpoint says about its model besides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The model: architecture, variant, classes, input channels.
    pub config: ModelConfig,
    /// Names of the classes, in output order (predictions show them when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
    /// How images are brought to the model's input (predictions use
    /// [`Preprocess::for_config`] when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
}

impl CheckpointMeta {
    /// The description of a model with no class names and default preprocessing.
    pub fn new(config: ModelConfig) -> Self {
        Self {
            config,
            class_names: None,
            preprocess: None,
        }
    }

    /// Sets the class names.
    pub fn with_class_names(mut self, names: Vec<String>) -> Self {
        self.class_names = Some(names);
        self
    }

    /// Sets the preprocessing.
    pub fn with_preprocess(mut self, preprocess: Preprocess) -> Self {
        self.preprocess = Some(preprocess);
        self
    }

    /// The preprocessing to apply: the stored one or the model's default.
    pub fn preprocess(&self) -> Preprocess {
        self.preprocess
            .clone()
            .unwrap_or_else(|| Preprocess::for_config(&self.config))
    }
}

/// A loaded checkpoint: the model and what the file said about it.
#[derive(Debug)]
pub struct Checkpoint {
    /// The model, weights loaded.
    pub model: Model,
    /// The file's description of it.
    pub meta: CheckpointMeta,
    /// The file's format.
    pub format: Format,
    /// The file's key layout.
    pub layout: KeyLayout,
    /// What was adjusted while loading.
    pub notes: LoadNotes,
}

fn model_line(config: &ModelConfig) -> String {
    format!(
        "{} ({}), {} classes, {} input channels",
        config.name(),
        config.variant,
        config.num_classes,
        config.in_channels
    )
}

/// The metadata entries of a file holding `meta` in `layout`.
fn metadata_entries(
    meta: &CheckpointMeta,
    layout: KeyLayout,
) -> Result<BTreeMap<String, String>, CheckpointError> {
    let json = serde_json::to_string(meta).map_err(|err| {
        CheckpointError::Unsupported(format!("cannot describe the model as JSON: {err}"))
    })?;
    Ok(BTreeMap::from([
        (METADATA_MODEL.to_string(), json),
        (METADATA_LAYOUT.to_string(), layout.as_str().to_string()),
        (METADATA_VERSION.to_string(), CHECKPOINT_VERSION.to_string()),
    ]))
}

/// The layout a format is written in by [`save_checkpoint`].
fn native_layout(format: Format) -> KeyLayout {
    match format {
        Format::Burnpack => KeyLayout::Burn,
        Format::Safetensors | Format::Pytorch => KeyLayout::Torch,
    }
}

const SAVE_FORMATS: &str = ".bpk (burnpack) or .safetensors";

/// Saves `model` to `path` in the format its extension names (`.bpk` or
/// `.safetensors`), with its description in the file's metadata. Replaces an existing
/// file only once the new one is complete.
pub fn save_model(path: impl AsRef<Path>, model: &Model) -> Result<(), CheckpointError> {
    save_checkpoint(path, model, &CheckpointMeta::new(model.config().clone()))
}

/// [`save_model`] with class names and preprocessing in the metadata. `meta.config`
/// must be the model's own.
pub fn save_checkpoint(
    path: impl AsRef<Path>,
    model: &Model,
    meta: &CheckpointMeta,
) -> Result<(), CheckpointError> {
    let path = path.as_ref();
    let format = Format::of(path, &[Format::Burnpack, Format::Safetensors], SAVE_FORMATS)?;
    if &meta.config != model.config() {
        return Err(CheckpointError::Unsupported(format!(
            "the metadata describes {}, but the model is {}",
            model_line(&meta.config),
            model_line(model.config())
        )));
    }
    check_class_names(meta)?;
    let layout = native_layout(format);
    let metadata = metadata_entries(meta, layout)?;
    format::write(path, format, keys::collect(model, layout), &metadata)
}

fn check_class_names(meta: &CheckpointMeta) -> Result<(), CheckpointError> {
    match &meta.class_names {
        Some(names) if names.len() != meta.config.num_classes => {
            Err(CheckpointError::Unsupported(format!(
                "{} class names given for a model with {} classes",
                names.len(),
                meta.config.num_classes
            )))
        }
        _ => Ok(()),
    }
}

/// The model description and layout of a file's metadata, checked against the file
/// ([`check_description`]).
fn read_meta(
    path: &Path,
    raw: &RawFile,
    format: Format,
) -> Result<(CheckpointMeta, KeyLayout), CheckpointError> {
    let json =
        raw.metadata
            .get(METADATA_MODEL)
            .ok_or_else(|| CheckpointError::NoModelDescription {
                path: path.to_path_buf(),
            })?;
    let bad = |detail: String| CheckpointError::BadModelDescription {
        path: path.to_path_buf(),
        detail,
    };
    let meta: CheckpointMeta = serde_json::from_str(json).map_err(|err| bad(err.to_string()))?;
    let layout = match raw.metadata.get(METADATA_LAYOUT) {
        Some(layout) => layout.parse().map_err(bad)?,
        None => native_layout(format),
    };
    check_description(path, &meta, raw)?;
    Ok((meta, layout))
}

/// Checks a file's model description before anything is built from it: its settings
/// within the zoo's limits, class names and preprocessing that fit the model, and
/// tensors holding at least the values the model stores. A description asking for more
/// than its file holds is refused here, so it never costs more memory than the file.
fn check_description(
    path: &Path,
    meta: &CheckpointMeta,
    raw: &RawFile,
) -> Result<(), CheckpointError> {
    let bad = |detail: String| CheckpointError::BadModelDescription {
        path: path.to_path_buf(),
        detail,
    };
    let config = &meta.config;
    config.plan().map_err(|err| bad(err.to_string()))?;
    check_class_names(meta).map_err(|err| bad(err.to_string()))?;
    if let Some(preprocess) = &meta.preprocess {
        preprocess
            .check_sizes(config.in_channels)
            .map_err(|err| bad(err.to_string()))?;
    }
    let stored = stored_size(config)
        .ok_or_else(|| bad(format!("{} takes no input of any size", model_line(config))))?;
    let needed = stored.params + stored.buffers;
    let held = raw.values();
    if needed > held {
        return Err(CheckpointError::DescriptionBeyondTensors {
            path: path.to_path_buf(),
            model: model_line(config),
            needed,
            held,
        });
    }
    Ok(())
}

/// Loads the model a checkpoint (`.bpk` or `.safetensors` written by this crate)
/// describes, onto `device`.
pub fn load_model(path: impl AsRef<Path>, device: &Device) -> Result<Model, CheckpointError> {
    load_checkpoint(path, device).map(|checkpoint| checkpoint.model)
}

/// Loads a checkpoint that must hold the model `expected` describes (same architecture,
/// variant, classes and input channels): [`CheckpointError::OtherModel`] otherwise,
/// decided from the file's metadata before any weight is read.
pub fn load_model_as(
    path: impl AsRef<Path>,
    expected: &ModelConfig,
    device: &Device,
) -> Result<Model, CheckpointError> {
    load(path.as_ref(), device, Some(expected)).map(|checkpoint| checkpoint.model)
}

/// Loads a checkpoint with its description and load notes.
pub fn load_checkpoint(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<Checkpoint, CheckpointError> {
    load(path.as_ref(), device, None)
}

fn load(
    path: &Path,
    device: &Device,
    expected: Option<&ModelConfig>,
) -> Result<Checkpoint, CheckpointError> {
    let format = load_format(path)?;
    let raw = format::read(path, format)?;
    let (meta, layout) = read_meta(path, &raw, format)?;
    if let Some(expected) = expected {
        if &meta.config != expected {
            return Err(CheckpointError::OtherModel {
                path: path.to_path_buf(),
                expected: model_line(expected),
                found: model_line(&meta.config),
            });
        }
    }
    let model = build(path, &meta.config, device)?;
    let (model, notes) = keys::load(model, raw.tensors, layout, path, format)?;
    Ok(Checkpoint {
        model,
        meta,
        format,
        layout,
        notes,
    })
}

/// The model `config` describes, fresh, for the file at `path`.
fn build(path: &Path, config: &ModelConfig, device: &Device) -> Result<Model, CheckpointError> {
    config
        .init(device)
        .map_err(|source| CheckpointError::Model {
            path: path.to_path_buf(),
            source,
        })
}

fn load_format(path: &Path) -> Result<Format, CheckpointError> {
    let format = Format::of(
        path,
        &[Format::Burnpack, Format::Safetensors, Format::Pytorch],
        SAVE_FORMATS,
    )?;
    if format == Format::Pytorch {
        return Err(CheckpointError::NoModelDescription {
            path: path.to_path_buf(),
        });
    }
    Ok(format)
}

/// Sizes of a model as stored, against its dense twin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredSize {
    /// Parameters (batch-norm scale and shift included).
    pub params: u64,
    /// Buffers (batch-norm running statistics).
    pub buffers: u64,
    /// Float32 bytes of parameters and buffers.
    pub stored_bytes: u64,
}

/// What a checkpoint file holds, read from its header.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointInfo {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    #[serde(serialize_with = "display")]
    pub format: Format,
    /// Bytes on disk.
    pub file_size: u64,
    /// Its model description (`None` for files from elsewhere, e.g. PyTorch).
    pub meta: Option<CheckpointMeta>,
    /// Its key layout (`None` when it does not say).
    #[serde(serialize_with = "display_option")]
    pub layout: Option<KeyLayout>,
    /// Number of tensors.
    pub tensors: usize,
    /// Values in all tensors.
    pub values: u64,
    /// Bytes of tensor data.
    pub data_bytes: u64,
    /// The model as the cost report counts it (`None` without a description).
    pub model: Option<StoredSize>,
    /// Its dense twin.
    pub dense_twin: Option<StoredSize>,
}

fn display<S: serde::Serializer, T: std::fmt::Display>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn display_option<S: serde::Serializer, T: std::fmt::Display>(
    value: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => serializer.collect_str(value),
        None => serializer.serialize_none(),
    }
}

impl CheckpointInfo {
    /// Bytes of the file that are not tensor data (headers, metadata, alignment).
    pub fn overhead(&self) -> u64 {
        self.file_size.saturating_sub(self.data_bytes)
    }

    /// The dense twin's file size in the same format: its tensor data plus this file's
    /// overhead (an estimate: alignment padding differs by a few bytes per tensor).
    pub fn dense_twin_file_size(&self) -> Option<u64> {
        self.dense_twin
            .as_ref()
            .map(|dense| dense.stored_bytes + self.overhead())
    }
}

fn stored_size(config: &ModelConfig) -> Option<StoredSize> {
    let side = config.arch.default_input();
    let report = config
        .cost_report([side, side])
        .or_else(|_| {
            let min = config.min_input().unwrap_or(side);
            config.cost_report([min, min])
        })
        .ok()?;
    let total = report.total();
    Some(StoredSize {
        params: total.params,
        buffers: total.buffers,
        stored_bytes: total.stored_bytes(),
    })
}

/// Reads a checkpoint's header: its model, tensors and sizes, against the dense twin's.
/// A file that describes its model must hold exactly that model's tensors (names,
/// shapes, types), as a load would check; no weight is read.
pub fn inspect(path: impl AsRef<Path>) -> Result<CheckpointInfo, CheckpointError> {
    let path = path.as_ref();
    let format = Format::of(
        path,
        &[Format::Burnpack, Format::Safetensors, Format::Pytorch],
        ".bpk, .safetensors, .pth or .pt",
    )?;
    let raw = format::read(path, format)?;
    let (meta, layout) = match read_meta(path, &raw, format) {
        Ok((meta, layout)) => (Some(meta), Some(layout)),
        Err(CheckpointError::NoModelDescription { .. }) => (None, None),
        Err(err) => return Err(err),
    };
    let values = raw.values();
    let data_bytes = raw.tensors.iter().map(|t| t.byte_len() as u64).sum();
    let tensors = raw.tensors.len();
    let (model, dense_twin) = match (&meta, layout) {
        (Some(meta), Some(layout)) => {
            let model = build(path, &meta.config, &Device::flex())?;
            keys::fit(&model, raw.tensors, layout, path)?;
            (
                stored_size(&meta.config),
                stored_size(&meta.config.dense_twin()),
            )
        }
        _ => (None, None),
    };
    Ok(CheckpointInfo {
        path: path.to_path_buf(),
        format,
        file_size: raw.file_size,
        meta,
        layout,
        tensors,
        values,
        data_bytes,
        model,
        dense_twin,
    })
}
