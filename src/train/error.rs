//! What can go wrong while configuring, running or resuming a training run.

use std::path::PathBuf;

use thiserror::Error;

use crate::data::DataError;
use crate::infer::InferError;
use crate::models::ModelError;

/// An error of the training loop, its configuration or its files.
#[derive(Debug, Error)]
pub enum TrainError {
    /// A setting that cannot work, named with its value.
    #[error("invalid training configuration: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The setting (`epochs`, `optimizer.lr`, ...).
        field: &'static str,
        /// Its value as given.
        value: String,
        /// Why it cannot work.
        reason: String,
    },
    /// A TOML configuration file that cannot be parsed.
    #[error("configuration file {path}: {message}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// The parser's message (line and column included).
        message: String,
    },
    /// A file or directory of the run that cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A model or optimizer record that cannot be read or written.
    #[error("{path}: {message}")]
    Record {
        /// The file.
        path: PathBuf,
        /// burn's message.
        message: String,
    },
    /// A checkpoint or run directory that is missing a file or is inconsistent.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The run directory or checkpoint file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model could not be built or does not fit the data.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The compiled inference plan failed.
    #[error("inference plan: {0}")]
    Inference(#[from] InferError),
    /// The loss became NaN or infinite; the last good checkpoint is kept.
    #[error(
        "the loss became {loss} at epoch {epoch}, batch {batch} (learning rate {lr:e}): \
         training stopped; {kept}"
    )]
    NonFinite {
        /// Epoch, from 0.
        epoch: usize,
        /// Batch within the epoch, from 0.
        batch: usize,
        /// The loss value (NaN or ±inf).
        loss: f32,
        /// The learning rate of that step.
        lr: f64,
        /// Which checkpoint is left (or that none was written yet).
        kept: String,
    },
    /// A checkpoint could not be written (a full disk, ...): training stopped, and the
    /// previous checkpoint is still the latest.
    #[error("{error}: training stopped without writing this checkpoint; {kept}")]
    SaveFailed {
        /// What failed.
        error: Box<TrainError>,
        /// Which checkpoint is left (or that none was written yet).
        kept: String,
    },
    /// The ranks of a data-parallel run disagree (settings, position or weights differ:
    /// another build, another checkpoint, files not shared between the hosts).
    #[error("data-parallel run: {reason}")]
    Distributed {
        /// What differs.
        reason: String,
    },
    /// A requested device that this build does not support or that cannot start.
    #[error("device {device}: {reason}")]
    Device {
        /// The device name.
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
}

impl TrainError {
    /// An [`TrainError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
        let path = path.into();
        move |source| TrainError::Io { path, source }
    }

    /// `true` for errors in what the user asked for (configuration, arguments), as opposed
    /// to failures while doing it.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            TrainError::InvalidConfig { .. }
                | TrainError::ConfigFile { .. }
                | TrainError::Device { .. }
        )
    }
}
