//! What the checkpoint commands share: where a model file is, loading it, exit codes
//! for checkpoint errors, sizes in words.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use versatile::checkpoint::{load_checkpoint, CheckpointError, CheckpointMeta};
use versatile::models::reference::grouped;
use versatile::models::Model;
use versatile::train;

use super::train::train_error;
use super::UsageError;

/// A checkpoint error as the CLI reports it: a problem with the files or settings the
/// user gave is a usage error (exit code 2); the file system or the exporter failing is
/// a failure (exit code 1).
pub(crate) fn checkpoint_error(err: CheckpointError) -> anyhow::Error {
    match err {
        CheckpointError::Io { .. } | CheckpointError::Onnx(_) => anyhow::Error::new(err),
        other => UsageError::from_display(other),
    }
}

/// The model file `path` names: `path` itself, or a directory's model (a run
/// directory's final model, else its latest checkpoint's; see [`train::model_file`]).
pub(crate) fn model_file(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_dir() {
        train::model_file(path).map_err(train_error)
    } else {
        Ok(path.to_path_buf())
    }
}

/// The model and its description from a model file or a run directory. A file's own
/// errors come as [`checkpoint_error`] reports them; the model half of a resumable
/// checkpoint (no description inside) is read with its `model.json`.
pub(crate) fn load_model(path: &Path, device: &Device) -> anyhow::Result<(Model, CheckpointMeta)> {
    let file = model_file(path)?;
    match load_checkpoint(&file, device) {
        Ok(checkpoint) => Ok((checkpoint.model, checkpoint.meta)),
        Err(CheckpointError::NoModelDescription { .. }) if train::is_checkpoint_model(&file) => {
            train::load_checkpoint_model(&file, device).map_err(train_error)
        }
        Err(err) => Err(checkpoint_error(err)),
    }
}

/// `bytes` as `1.23 MB (1,234,567 bytes)`.
pub(crate) fn size(bytes: u64) -> String {
    format!("{:.2} MB ({} bytes)", bytes as f64 / 1e6, grouped(bytes))
}
