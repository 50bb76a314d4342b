//! Run directories and their checkpoints.
//!
//! ```text
//! RUN/
//!   config.toml            the run's settings
//!   checkpoint.json        which checkpoint is the latest (replaced atomically)
//!   checkpoints/step-N/    model.bpk, model.json, optimizer.bpk, state.json
//!   metrics.csv, metrics.json
//!   model.bpk              the final model, a checkpoint of `crate::checkpoint` (its
//!                          description, class names and preprocessing in its metadata)
//! ```
//!
//! A checkpoint is written into a temporary directory, flushed, renamed into place, and
//! only then named by `checkpoint.json` (itself replaced atomically), all through
//! [`crate::fsutil`]: a write that is killed or fails (a full disk) never leaves a run
//! without a complete checkpoint, and `checkpoint.json` always names the last complete
//! one. Older checkpoints are removed only after that. A checkpoint holds
//! everything to continue exactly: the model (burn's burnpack, parameter ids included,
//! which the optimizer state is keyed by), the optimizer state, the data
//! [`Position`], the step counter the learning rate derives from, the metrics so far and
//! the partial tally of an interrupted epoch. Random numbers need no saved state: the
//! data order and augmentations derive from (seed, epoch, sample) and the device
//! generator is re-seeded from (seed, epoch, batch) before every step.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::error::TrainError;
use super::metrics::{EpochMetrics, Tally};
use crate::checkpoint::{CheckpointError, CheckpointMeta};
use crate::data::Position;
use crate::fsutil;
use crate::models::{Model, ModelConfig};

/// Version of the checkpoint layout.
pub const FORMAT: u32 = 1;
/// The file naming the latest checkpoint of a run.
pub const POINTER: &str = "checkpoint.json";
/// Weights file name (burnpack).
pub const MODEL_FILE: &str = "model.bpk";
/// The [`ModelConfig`] next to a weights file.
pub const MODEL_CONFIG_FILE: &str = "model.json";
const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "state.json";
const CHECKPOINTS: &str = "checkpoints";

/// How random numbers are reproduced on resume (recorded in every checkpoint).
pub const RNG_SCHEME: &str = "data order and augmentation: derive_seed(seed, epoch, sample); \
     device generator re-seeded with derive_seed(seed, 'STEP', epoch, batch) before each step";

/// Where a run stands: everything but the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// [`FORMAT`].
    pub format: u32,
    /// The run's settings.
    pub config: TrainConfig,
    /// The model's settings.
    pub model: ModelConfig,
    /// The next batch to train on.
    pub next: Position,
    /// Optimizer steps done (the learning rate is a function of it).
    pub global_step: u64,
    /// Metrics of the finished epochs.
    pub history: Vec<EpochMetrics>,
    /// Tally of the current epoch's batches so far (an interrupted epoch).
    pub partial: Tally,
    /// Training seconds of the current epoch so far.
    pub partial_seconds: f64,
    /// [`RNG_SCHEME`].
    pub rng: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Pointer {
    checkpoint: String,
    next: Position,
}

fn record_error(path: &Path) -> impl FnOnce(burn::store::RecordError) -> TrainError + '_ {
    move |err| TrainError::Record {
        path: path.to_path_buf(),
        message: err.to_string(),
    }
}

fn checkpoint_error(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("checkpoint state serializes")
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, TrainError> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    serde_json::from_str(&text).map_err(|err| checkpoint_error(path, err.to_string()))
}

/// The whole file in memory. burn's file loaders keep tensor data file-backed and read it
/// lazily, which breaks once a newer checkpoint replaces the file.
fn read_bytes(path: &Path) -> Result<Bytes, TrainError> {
    let bytes = std::fs::read(path).map_err(TrainError::io(path))?;
    Ok(Bytes::from_bytes_vec(bytes))
}

/// Saves a run's final model as `run_dir/model.bpk`, a checkpoint of
/// [`crate::checkpoint`] carrying its description (model, class names, preprocessing),
/// so `versatile predict`, `export` and `inspect` take it as it is.
pub fn save_final_model(
    run_dir: &Path,
    model: &Model,
    meta: &CheckpointMeta,
) -> Result<PathBuf, TrainError> {
    let path = run_dir.join(MODEL_FILE);
    crate::checkpoint::save_checkpoint(&path, &model.valid(), meta).map_err(|err| {
        TrainError::Checkpoint {
            path: path.clone(),
            reason: err.to_string(),
        }
    })?;
    Ok(path)
}

/// The model file `path` names: `path` itself when it is a file, a directory's
/// `model.bpk`, or a run directory's latest checkpoint's `model.bpk` when the run has no
/// final model yet.
///
/// # Errors
/// [`TrainError::Checkpoint`] when there is no model there.
pub fn model_file(path: &Path) -> Result<PathBuf, TrainError> {
    if path.is_dir() {
        if path.join(MODEL_FILE).is_file() {
            Ok(path.join(MODEL_FILE))
        } else if path.join(POINTER).is_file() {
            Ok(latest_checkpoint(path)?.join(MODEL_FILE))
        } else {
            Err(checkpoint_error(
                path,
                format!("no {MODEL_FILE} and no {POINTER} (not a model or run directory)"),
            ))
        }
    } else if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(checkpoint_error(path, "no such file or directory"))
    }
}

/// Loads a trained model with its description (see [`model_file`] for what `path` may
/// be). A `model.bpk` without a description in its metadata (the model half of a
/// resumable checkpoint) is read with the `model.json` beside it, and gets the default
/// preprocessing and no class names.
///
/// # Errors
/// [`TrainError::Checkpoint`] when no model is found there or the file is damaged or of
/// another model, [`TrainError::Record`] for a corrupt record.
pub fn load_trained_checkpoint(
    path: &Path,
    device: &Device,
) -> Result<(Model, CheckpointMeta), TrainError> {
    let weights = model_file(path)?;
    match crate::checkpoint::load_checkpoint(&weights, device) {
        Ok(checkpoint) => Ok((checkpoint.model, checkpoint.meta)),
        Err(CheckpointError::NoModelDescription { .. }) => load_checkpoint_model(&weights, device),
        Err(err) => Err(checkpoint_error(&weights, err.to_string())),
    }
}

/// Whether the model file `weights` is the model half of a resumable checkpoint: a
/// `model.json` lies beside it.
pub fn is_checkpoint_model(weights: &Path) -> bool {
    weights.with_file_name(MODEL_CONFIG_FILE).is_file()
}

/// Loads a trained model with its configuration ([`load_trained_checkpoint`] without
/// the rest of the description).
///
/// # Errors
/// As [`load_trained_checkpoint`].
pub fn load_trained_model(
    path: &Path,
    device: &Device,
) -> Result<(Model, ModelConfig), TrainError> {
    let (model, meta) = load_trained_checkpoint(path, device)?;
    Ok((model, meta.config))
}

/// Loads the model half of a resumable checkpoint (see [`is_checkpoint_model`]), with
/// the description of its `model.json`: default preprocessing, no class names.
///
/// # Errors
/// As [`load_trained_checkpoint`].
pub fn load_checkpoint_model(
    weights: &Path,
    device: &Device,
) -> Result<(Model, CheckpointMeta), TrainError> {
    let (model, config) = load_model_files(weights, device)?;
    Ok((model, CheckpointMeta::new(config)))
}

/// Burn's record at `weights` and the `model.json` beside it.
fn load_model_files(weights: &Path, device: &Device) -> Result<(Model, ModelConfig), TrainError> {
    let dir = weights.parent().unwrap_or(Path::new("."));
    let config: ModelConfig = read_json(&dir.join(MODEL_CONFIG_FILE))?;
    let record = ModuleRecord::from_bytes(read_bytes(weights)?).map_err(record_error(weights))?;
    let model = config
        .init(device)?
        .try_load_record(record)
        .map_err(record_error(weights))?;
    Ok((model, config))
}

/// The directory of the latest checkpoint of a run.
///
/// # Errors
/// [`TrainError::Checkpoint`] when the run has no checkpoint.
pub fn latest_checkpoint(run_dir: &Path) -> Result<PathBuf, TrainError> {
    let pointer_path = run_dir.join(POINTER);
    if !pointer_path.is_file() {
        return Err(checkpoint_error(
            run_dir,
            format!("no {POINTER}: not a run directory, or no epoch finished yet"),
        ));
    }
    let pointer: Pointer = read_json(&pointer_path)?;
    let dir = run_dir.join(&pointer.checkpoint);
    if !dir.is_dir() {
        return Err(checkpoint_error(
            &pointer_path,
            format!("names {}, which is missing", dir.display()),
        ));
    }
    Ok(dir)
}

/// Writes a checkpoint of the run in `run_dir` and makes it the latest; older ones (and
/// temporaries of killed writes) are removed once the new one is in place.
///
/// # Errors
/// I/O and record errors of the write; the previous checkpoint is then still the latest.
pub fn save_checkpoint(
    run_dir: &Path,
    model: &Model,
    optimizer: &ModuleOptimizer,
    state: &RunState,
) -> Result<PathBuf, TrainError> {
    let root = run_dir.join(CHECKPOINTS);
    std::fs::create_dir_all(&root).map_err(TrainError::io(&root))?;
    let name = unused_name(&root, state.global_step);
    let final_dir = root.join(&name);
    let temp = fsutil::create_temp_dir(&final_dir).map_err(TrainError::io(&final_dir))?;
    let written = write_checkpoint_files(&temp, &final_dir, model, optimizer, state)
        .and_then(|()| fsutil::publish_dir(&temp, &final_dir).map_err(TrainError::io(&final_dir)));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    written?;
    let pointer = run_dir.join(POINTER);
    let text = json(&Pointer {
        checkpoint: format!("{CHECKPOINTS}/{name}"),
        next: state.next,
    });
    fsutil::write_atomic(&pointer, text.as_bytes()).map_err(TrainError::io(&pointer))?;
    remove_checkpoints_but(&root, &name);
    Ok(final_dir)
}

/// Removes every entry of the checkpoint directory `root` but `keep` (best effort: what
/// stays is removed by the next checkpoint or resume).
fn remove_checkpoints_but(root: &Path, keep: &str) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy() != keep {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Removes what killed writes left in a run directory: temporary files, temporary
/// checkpoint directories, and checkpoints other than the latest (a run killed between
/// publishing a checkpoint and removing the older ones, or before pointing to the new
/// one, leaves one behind; a resumed run may have nothing left to write that would
/// remove it).
pub(crate) fn remove_stale_temporaries(run_dir: &Path) -> Result<(), TrainError> {
    for dir in [run_dir.to_path_buf(), run_dir.join(CHECKPOINTS)] {
        fsutil::remove_stale_temporaries(&dir).map_err(TrainError::io(&dir))?;
    }
    if let Ok(latest) = latest_checkpoint(run_dir) {
        if let Some(name) = latest.file_name() {
            remove_checkpoints_but(&run_dir.join(CHECKPOINTS), &name.to_string_lossy());
        }
    }
    Ok(())
}

/// `step-N` for a checkpoint after `step` optimizer steps, or `step-N-K` (the first free
/// K) when one of that step exists already (a run stopped twice at the same step): the
/// checkpoint `checkpoint.json` names is never replaced in place.
fn unused_name(root: &Path, step: u64) -> String {
    let base = format!("step-{step:09}");
    std::iter::once(base.clone())
        .chain((1..).map(|k| format!("{base}-{k}")))
        .find(|name| !root.join(name).exists())
        .expect("some name is free")
}

/// Writes the files of a checkpoint into the (temporary) directory `dir`; errors name
/// them as they will be named once `dir` becomes `named`.
fn write_checkpoint_files(
    dir: &Path,
    named: &Path,
    model: &Model,
    optimizer: &ModuleOptimizer,
    state: &RunState,
) -> Result<(), TrainError> {
    // The validation snapshot: burn keeps a batch-norm running statistic's latest update
    // per thread until it is synchronized, which `valid()` does; the training module's
    // own record would miss the last step's update. Its record keeps the parameter ids
    // the optimizer state is keyed by.
    model
        .valid()
        .save_file(dir.join(MODEL_FILE))
        .map_err(record_error(&named.join(MODEL_FILE)))?;
    optimizer
        .to_record()
        .save(dir.join(OPTIMIZER_FILE))
        .map_err(record_error(&named.join(OPTIMIZER_FILE)))?;
    for (file, text) in [
        (MODEL_CONFIG_FILE, json(&state.model)),
        (STATE_FILE, json(state)),
    ] {
        std::fs::write(dir.join(file), text).map_err(TrainError::io(named.join(file)))?;
    }
    Ok(())
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// Where it was read from.
    pub dir: PathBuf,
    /// The run state.
    pub state: RunState,
    /// The model, on the requested device.
    pub model: Model,
    /// The optimizer state.
    pub optimizer: OptimizerRecord,
}

/// Reads the latest checkpoint of `run_dir` onto `device`.
///
/// # Errors
/// [`TrainError::Checkpoint`] for a missing or inconsistent checkpoint,
/// [`TrainError::Record`] for corrupt tensor files.
pub fn load_checkpoint(run_dir: &Path, device: &Device) -> Result<Checkpoint, TrainError> {
    let dir = latest_checkpoint(run_dir)?;
    let state_path = dir.join(STATE_FILE);
    let state: RunState = read_json(&state_path)?;
    if state.format != FORMAT {
        return Err(checkpoint_error(
            &state_path,
            format!("format {} (this build reads {FORMAT})", state.format),
        ));
    }
    let (model, config) = load_model_files(&dir.join(MODEL_FILE), device)?;
    if config != state.model {
        return Err(checkpoint_error(
            &dir,
            "model.json and state.json describe different models",
        ));
    }
    let optim_path = dir.join(OPTIMIZER_FILE);
    let optimizer =
        OptimizerRecord::from_bytes(read_bytes(&optim_path)?).map_err(record_error(&optim_path))?;
    Ok(Checkpoint {
        dir,
        state,
        model,
        optimizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run killed after publishing a checkpoint but before removing the older one (or
    /// before pointing to the new one) leaves two; the cleanup on resume keeps only the
    /// one `checkpoint.json` names, even when the resumed run writes no checkpoint.
    #[test]
    fn cleanup_keeps_only_the_checkpoint_the_pointer_names() {
        let run = std::env::temp_dir().join(format!("versatile-prune-{}", std::process::id()));
        let root = run.join(CHECKPOINTS);
        for (pointed, orphan) in [
            ("step-000000004", "step-000000002"),
            ("step-000000002", "step-000000004"),
        ] {
            let _ = std::fs::remove_dir_all(&run);
            for name in [pointed, orphan] {
                std::fs::create_dir_all(root.join(name)).unwrap();
                std::fs::write(root.join(name).join(STATE_FILE), "{}").unwrap();
            }
            let pointer = Pointer {
                checkpoint: format!("{CHECKPOINTS}/{pointed}"),
                next: Position::default(),
            };
            std::fs::write(run.join(POINTER), json(&pointer)).unwrap();
            remove_stale_temporaries(&run).unwrap();
            let left: Vec<String> = std::fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(left, [pointed], "orphan {orphan}");
        }
        std::fs::remove_dir_all(&run).unwrap();
    }

    /// A resumed run continues from the tally and metrics the checkpoint stores as JSON, so
    /// every f64 must read back with the bits it was written with (serde_json's default
    /// parser is off by one unit in the last place for about one value in nine).
    #[test]
    fn state_numbers_read_back_bit_identical() {
        let tallies: Vec<Tally> = (0..20_000u64)
            .map(|i| {
                let bits = crate::data::derive_seed(&[i]);
                Tally {
                    images: i,
                    loss_sum: (bits >> 11) as f64 / (1u64 << 53) as f64 * 3.0,
                    top1: 0,
                    top5: 0,
                }
            })
            .collect();
        let back: Vec<Tally> = serde_json::from_str(&json(&tallies)).unwrap();
        let differ = tallies
            .iter()
            .zip(&back)
            .filter(|(a, b)| a.loss_sum.to_bits() != b.loss_sum.to_bits())
            .count();
        assert_eq!(differ, 0, "{differ} of {} values changed", tallies.len());
    }
}
