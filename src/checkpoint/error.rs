//! Errors of checkpoints, imports and exports, and the report of keys that do not fit.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use crate::models::ModelError;

use super::format::Format;

/// Why a checkpoint cannot be read, written, imported or exported.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// The file system refused.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`read`, `write`, ...).
        action: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file name's extension names no format this operation takes.
    #[error("{}: cannot tell the format from the extension '{extension}'; expected {expected}", path.display())]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// Its extension (empty when it has none).
        extension: String,
        /// The extensions this operation takes.
        expected: &'static str,
    },
    /// The file does not start as a file of its format does.
    #[error("{} is not a {format} file: it starts with {found}, where a {format} file starts with {expected}", path.display())]
    WrongMagic {
        /// The file.
        path: PathBuf,
        /// The format its extension names.
        format: Format,
        /// What the format's files start with.
        expected: String,
        /// What this file starts with.
        found: String,
    },
    /// The file ends before its header says it does.
    #[error("{} is truncated ({format}): {detail}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its format.
        format: Format,
        /// What is missing, with the sizes.
        detail: String,
    },
    /// The file's header or contents are invalid.
    #[error("{} is not a valid {format} file: {detail}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Its format.
        format: Format,
        /// What is wrong.
        detail: String,
    },
    /// The file carries no model description, so it cannot rebuild its model alone.
    #[error(
        "{} carries no versatile model description in its metadata; weights from elsewhere \
         (a PyTorch state dict, another tool's safetensors) come in through `versatile import` \
         with --model and --variant", path.display()
    )]
    NoModelDescription {
        /// The file.
        path: PathBuf,
    },
    /// The file's model description does not parse.
    #[error("{}: invalid model description in its metadata: {detail}", path.display())]
    BadModelDescription {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The file's model description asks for more values than its tensors hold: it does
    /// not describe this file, and nothing was built from it.
    #[error(
        "{}: its metadata describes {model}, which stores {needed} values, but the file's \
         tensors hold only {held}; the description does not match the file", path.display()
    )]
    DescriptionBeyondTensors {
        /// The file.
        path: PathBuf,
        /// The model described (`name (variant), K classes, C input channels`).
        model: String,
        /// Values (parameters and buffers) the model stores.
        needed: u64,
        /// Values in the file's tensors.
        held: u64,
    },
    /// The model the file describes cannot be built.
    #[error("{}: {source}", path.display())]
    Model {
        /// The file.
        path: PathBuf,
        /// Why the model cannot be built.
        source: ModelError,
    },
    /// The file holds another model than the one asked for.
    #[error("{} holds {found}, not {expected}", path.display())]
    OtherModel {
        /// The file.
        path: PathBuf,
        /// The model asked for (`name (variant), K classes, C input channels`).
        expected: String,
        /// The model in the file.
        found: String,
    },
    /// The file's tensors do not fit the model: nothing was loaded.
    #[error("{} does not fit {model}; nothing was loaded. {report}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The model (`name (variant)`).
        model: String,
        /// Every key that does not fit.
        report: KeyReport,
    },
    /// The operation cannot handle this model or file.
    #[error("{0}")]
    Unsupported(String),
    /// The ONNX exporter failed.
    #[error("ONNX export failed: {0}")]
    Onnx(String),
    /// An image cannot be read for a prediction.
    #[error("cannot read image {}: {detail}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

/// A tensor's shape and element type, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The shape.
    pub shape: Vec<usize>,
    /// The element type (`F32`, `I64`, ...).
    pub dtype: String,
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}", self.shape, self.dtype)
    }
}

/// A key present in both the model and the file with a different shape or type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMismatch {
    /// The key.
    pub key: String,
    /// What the model holds.
    pub expected: TensorSpec,
    /// What the file holds.
    pub found: TensorSpec,
}

/// Every key of a file that does not fit a model: none of them is loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyReport {
    /// Keys the model needs that the file lacks, with the shape the model expects.
    pub missing: Vec<(String, TensorSpec)>,
    /// Keys of the file the model has no place for, with their shapes.
    pub unexpected: Vec<(String, TensorSpec)>,
    /// Keys in both with different shapes or element types.
    pub mismatched: Vec<KeyMismatch>,
}

impl KeyReport {
    /// `true` when every key fits.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

/// Keys listed in full in a report line; longer lists end with a count of the rest.
const LISTED: usize = 12;

fn list<T>(
    f: &mut fmt::Formatter<'_>,
    what: &str,
    items: &[T],
    show: impl Fn(&T) -> String,
) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = items.iter().take(LISTED).map(show).collect();
    write!(f, "\n  {what} ({}): {}", items.len(), shown.join(", "))?;
    if items.len() > LISTED {
        write!(f, ", ... and {} more", items.len() - LISTED)?;
    }
    Ok(())
}

impl fmt::Display for KeyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} missing, {} unexpected, {} with another shape:",
            self.missing.len(),
            self.unexpected.len(),
            self.mismatched.len()
        )?;
        list(f, "missing", &self.missing, |(key, spec)| {
            format!("{key} {spec}")
        })?;
        list(f, "unexpected", &self.unexpected, |(key, spec)| {
            format!("{key} {spec}")
        })?;
        list(f, "shape mismatch", &self.mismatched, |m| {
            format!("{} (model {}, file {})", m.key, m.expected, m.found)
        })
    }
}
