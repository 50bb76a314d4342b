//! What the checkpoint commands share: exit codes for checkpoint errors, sizes in words.

use versatile::checkpoint::CheckpointError;
use versatile::models::reference::grouped;

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

/// `bytes` as `1.23 MB (1,234,567 bytes)`.
pub(crate) fn size(bytes: u64) -> String {
    format!("{:.2} MB ({} bytes)", bytes as f64 / 1e6, grouped(bytes))
}
