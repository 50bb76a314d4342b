//! [`TrainConfig`]: everything a run needs, from a TOML file, command-line flags or code.
//!
//! ```toml
//! model = "vgg_small"
//! variant = "spatial"
//! epochs = 30
//! batch_size = 128
//! seed = 1
//! output = "runs/vgg_small-spatial"
//!
//! [data]
//! path = "/usr/share/datasets/fashion-mnist"
//!
//! [optimizer]
//! kind = "sgd"          # sgd | adam | adamw
//! lr = 0.1
//! momentum = 0.9
//! nesterov = true
//! weight_decay = 5e-4
//!
//! [schedule]
//! kind = "cosine"       # constant | step | cosine
//! warmup_epochs = 1
//! ```
//!
//! Every key is optional (the defaults are [`TrainConfig::default`]); unknown keys are
//! errors, so a typo never silently falls back to a default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::TrainError;
use crate::data::DatasetKind;
use crate::models::ModelConfig;

/// The settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model name (see `versatile models`), e.g. `vgg_small`.
    pub model: String,
    /// Variant: `dense`, `spatial`, `spatial+channel[:...]`.
    pub variant: String,
    /// The data.
    pub data: DataSettings,
    /// Epochs to train.
    pub epochs: usize,
    /// Training batch size.
    pub batch_size: usize,
    /// Evaluation batch size.
    pub eval_batch_size: usize,
    /// The optimizer.
    pub optimizer: OptimizerSettings,
    /// The learning-rate schedule.
    pub schedule: ScheduleSettings,
    /// Seed of the initialization, the data order, the augmentations and dropout.
    pub seed: u64,
    /// Size of the rayon pool the compute backend uses (0: leave it as it is, by default
    /// one thread per core).
    pub threads: usize,
    /// Also write a checkpoint every N optimizer steps within an epoch (0: only at the
    /// end of each epoch and on a stop).
    pub checkpoint_every: usize,
    /// The run directory (metrics, checkpoints, plots).
    pub output: PathBuf,
    /// Where the tensors live.
    pub device: DeviceChoice,
    /// Split every batch (every rank's share of it, under MPI) into this many
    /// micro-batches, run one after the other with their gradients accumulated: the
    /// same update as one pass over the whole batch, except that batch norm normalises
    /// each micro-batch on its own statistics. 1: the whole batch at once.
    #[serde(skip_serializing_if = "is_one")]
    pub micro_batches: usize,
}

fn is_one(value: &usize) -> bool {
    *value == 1
}

/// Which data and how to load it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSettings {
    /// Format (`idx`, `cifar10`, `cifar100`, `imagefolder`); detected from the files when
    /// absent.
    pub kind: Option<String>,
    /// The dataset directory.
    pub path: PathBuf,
    /// Random augmentation of the training images (pad-and-crop and flip for 28×28 and
    /// 32×32 sets, random-resized crop and flip for ImageFolder).
    pub augment: bool,
    /// Keep only the first N training images of each class (a class-balanced subset).
    pub train_per_class: Option<usize>,
    /// Keep only the first N test images of each class.
    pub test_per_class: Option<usize>,
    /// Threads decoding and augmenting images (1: the loader's producer thread alone).
    pub loader_threads: usize,
}

/// The optimizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with momentum, Nesterov and L2 weight decay, as PyTorch's `torch.optim.SGD`
    /// (dampening 0).
    Sgd,
    /// Adam with L2 weight decay added to the gradient, as `torch.optim.Adam`.
    Adam,
    /// Adam with decoupled weight decay, as `torch.optim.AdamW`.
    AdamW,
}

/// Optimizer settings (PyTorch's meaning and defaults for each optimizer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSettings {
    /// Which optimizer.
    pub kind: OptimizerKind,
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    /// SGD momentum (0: plain SGD).
    pub momentum: f64,
    /// Nesterov momentum (SGD; needs momentum > 0).
    pub nesterov: bool,
    /// Weight decay: L2 penalty (SGD, Adam) or decoupled decay (AdamW).
    pub weight_decay: f64,
    /// Adam's `(beta1, beta2)`.
    pub betas: [f64; 2],
    /// Adam's epsilon.
    pub eps: f64,
}

/// The shapes of learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The same learning rate throughout.
    Constant,
    /// Multiplied by `gamma` every `step_epochs` epochs (the authors: ×0.1 every 40).
    Step,
    /// Cosine annealing from the peak to `min_lr` over the epochs after warm-up,
    /// updated every iteration.
    Cosine,
}

/// Learning-rate schedule settings. The rate is a pure function of the position in the
/// run (epoch and iteration), so a resumed run continues on the same curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleSettings {
    /// Shape of the schedule.
    pub kind: ScheduleKind,
    /// Step schedule: epochs between decays.
    pub step_epochs: usize,
    /// Step schedule: the decay factor.
    pub gamma: f64,
    /// Cosine schedule: the final learning rate.
    pub min_lr: f64,
    /// Linear warm-up from `lr / warm-up iterations` to `lr` over this many epochs
    /// (0: none).
    pub warmup_epochs: usize,
}

/// Where training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The CPU (burn's flex backend, with this project's versatile kernel).
    #[default]
    Cpu,
    /// An NVIDIA GPU through burn's CUDA backend (cargo feature `cuda`).
    Cuda,
    /// A GPU through burn's wgpu backend (cargo feature `wgpu`).
    Wgpu,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "vgg_small".into(),
            variant: "dense".into(),
            data: DataSettings::default(),
            epochs: 30,
            batch_size: 128,
            eval_batch_size: 256,
            optimizer: OptimizerSettings::default(),
            schedule: ScheduleSettings::default(),
            seed: 0,
            threads: 0,
            checkpoint_every: 0,
            output: PathBuf::from("runs/run"),
            device: DeviceChoice::Cpu,
            micro_batches: 1,
        }
    }
}

impl Default for DataSettings {
    fn default() -> Self {
        DataSettings {
            kind: None,
            path: PathBuf::from("data/fashion-mnist-sample"),
            augment: true,
            train_per_class: None,
            test_per_class: None,
            loader_threads: 1,
        }
    }
}

impl Default for OptimizerSettings {
    /// SGD, lr 0.1, momentum 0.9 (Nesterov), weight decay 5e-4; Adam's betas and
    /// epsilon as PyTorch's (0.9, 0.999) and 1e-8.
    fn default() -> Self {
        OptimizerSettings {
            kind: OptimizerKind::Sgd,
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
        }
    }
}

impl Default for ScheduleSettings {
    /// Cosine to 0 without warm-up; step settings as the authors (×0.1 every 40 epochs).
    fn default() -> Self {
        ScheduleSettings {
            kind: ScheduleKind::Cosine,
            step_epochs: 40,
            gamma: 0.1,
            min_lr: 0.0,
            warmup_epochs: 0,
        }
    }
}

macro_rules! name_parse {
    ($ty:ty, $what:literal, $($name:literal => $value:expr),+ $(,)?) => {
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.to_ascii_lowercase().as_str() {
                    $($name => Ok($value),)+
                    _ => Err(format!(
                        concat!("unknown ", $what, " '{}': expected one of {}"),
                        s,
                        [$($name),+].join(", ")
                    )),
                }
            }
        }
    };
}

name_parse!(OptimizerKind, "optimizer", "sgd" => OptimizerKind::Sgd, "adam" => OptimizerKind::Adam, "adamw" => OptimizerKind::AdamW);
name_parse!(ScheduleKind, "schedule", "constant" => ScheduleKind::Constant, "step" => ScheduleKind::Step, "cosine" => ScheduleKind::Cosine);
name_parse!(DeviceChoice, "device", "cpu" => DeviceChoice::Cpu, "cuda" => DeviceChoice::Cuda, "wgpu" => DeviceChoice::Wgpu);

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
            OptimizerKind::AdamW => "adamw",
        })
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Step => "step",
            ScheduleKind::Cosine => "cosine",
        })
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Wgpu => "wgpu",
        })
    }
}

/// Most bytes of a TOML run configuration (a complete one takes about 1 KB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Most threads a run may ask for, for computing or for loading data.
pub const MAX_THREADS: usize = 1024;

fn invalid(field: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> TrainError {
    TrainError::InvalidConfig {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl TrainConfig {
    /// Parses a TOML configuration (`path` only names it in errors).
    ///
    /// # Errors
    /// [`TrainError::ConfigFile`] with the parser's line and column for bad syntax, a
    /// wrong type or an unknown key.
    pub fn from_toml_str(text: &str, path: impl AsRef<Path>) -> Result<Self, TrainError> {
        toml::from_str(text).map_err(|err| TrainError::ConfigFile {
            path: path.as_ref().to_path_buf(),
            message: err.to_string().trim_end().to_string(),
        })
    }

    /// Reads a TOML configuration file.
    ///
    /// # Errors
    /// [`TrainError::Io`] when the file cannot be read; as [`TrainConfig::from_toml_str`].
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, TrainError> {
        let path = path.as_ref();
        let bytes = crate::limited::read_at_most(path, MAX_CONFIG_BYTES)
            .map_err(TrainError::io(path))?
            .ok_or_else(|| TrainError::ConfigFile {
                path: path.to_path_buf(),
                message: format!("longer than {MAX_CONFIG_BYTES} bytes: not a run configuration"),
            })?;
        let text = String::from_utf8(bytes).map_err(|err| TrainError::ConfigFile {
            path: path.to_path_buf(),
            message: format!("not UTF-8 text: {err}"),
        })?;
        Self::from_toml_str(&text, path)
    }

    /// The configuration as TOML (what a run directory's `config.toml` holds).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a TrainConfig always serializes to TOML")
    }

    /// The model to build, for images with `in_channels` channels and `num_classes`
    /// classes.
    ///
    /// # Errors
    /// [`TrainError::InvalidConfig`] for an unknown model or variant.
    pub fn model_config(
        &self,
        in_channels: usize,
        num_classes: usize,
    ) -> Result<ModelConfig, TrainError> {
        let config = ModelConfig::parse(&self.model, &self.variant).map_err(|err| {
            let field = if self.model.parse::<crate::models::Arch>().is_err() {
                "model"
            } else {
                "variant"
            };
            let value = if field == "model" {
                &self.model
            } else {
                &self.variant
            };
            invalid(field, value, err.to_string())
        })?;
        Ok(config
            .with_in_channels(in_channels)
            .with_num_classes(num_classes))
    }

    /// The dataset format: the configured one, or the one detected in the directory.
    ///
    /// # Errors
    /// [`TrainError::InvalidConfig`] for an unknown kind; the data error when detection
    /// fails.
    pub fn dataset_kind(&self) -> Result<DatasetKind, TrainError> {
        match &self.data.kind {
            Some(kind) => kind
                .parse()
                .map_err(|err: crate::data::DataError| invalid("data.kind", kind, err.to_string())),
            None => Ok(DatasetKind::detect(&self.data.path)?),
        }
    }

    /// Checks every setting that can be checked without reading data.
    ///
    /// # Errors
    /// [`TrainError::InvalidConfig`] naming the first setting that cannot work.
    pub fn validate(&self) -> Result<(), TrainError> {
        self.model_config(1, 10)?;
        if let Some(kind) = &self.data.kind {
            kind.parse::<DatasetKind>()
                .map_err(|err| invalid("data.kind", kind, err.to_string()))?;
        }
        if self.epochs == 0 {
            return Err(invalid("epochs", 0, "train for at least 1 epoch"));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", 0, "a batch needs at least 1 image"));
        }
        if self.eval_batch_size == 0 {
            return Err(invalid(
                "eval_batch_size",
                0,
                "a batch needs at least 1 image",
            ));
        }
        if self.data.loader_threads == 0 {
            return Err(invalid("data.loader_threads", 0, "need at least 1"));
        }
        if self.micro_batches == 0 {
            return Err(invalid("micro_batches", 0, "need at least 1"));
        }
        if self.micro_batches > self.batch_size {
            return Err(invalid(
                "micro_batches",
                self.micro_batches,
                format!("more than the {} images of a batch", self.batch_size),
            ));
        }
        for (field, threads) in [
            ("data.loader_threads", self.data.loader_threads),
            ("threads", self.threads),
        ] {
            if threads > MAX_THREADS {
                return Err(invalid(field, threads, format!("at most {MAX_THREADS}")));
            }
        }
        for (field, value) in [
            ("data.train_per_class", self.data.train_per_class),
            ("data.test_per_class", self.data.test_per_class),
        ] {
            if value == Some(0) {
                return Err(invalid(field, 0, "keep at least 1 image per class"));
            }
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(invalid("optimizer.lr", o.lr, "must be a positive number"));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(invalid(
                "optimizer.momentum",
                o.momentum,
                "must be in [0, 1)",
            ));
        }
        if o.nesterov && o.kind == OptimizerKind::Sgd && o.momentum == 0.0 {
            return Err(invalid(
                "optimizer.nesterov",
                true,
                "Nesterov momentum needs optimizer.momentum > 0",
            ));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(invalid(
                "optimizer.weight_decay",
                o.weight_decay,
                "must be 0 or positive",
            ));
        }
        for beta in o.betas {
            if !(0.0..1.0).contains(&beta) {
                return Err(invalid(
                    "optimizer.betas",
                    format!("{:?}", o.betas),
                    "each must be in [0, 1)",
                ));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(invalid("optimizer.eps", o.eps, "must be positive"));
        }
        let s = &self.schedule;
        if s.kind == ScheduleKind::Step {
            if s.step_epochs == 0 {
                return Err(invalid("schedule.step_epochs", 0, "must be at least 1"));
            }
            if !(s.gamma.is_finite() && s.gamma > 0.0) {
                return Err(invalid("schedule.gamma", s.gamma, "must be positive"));
            }
        }
        if !(s.min_lr.is_finite() && s.min_lr >= 0.0 && s.min_lr <= o.lr) {
            return Err(invalid(
                "schedule.min_lr",
                s.min_lr,
                format!("must be in [0, optimizer.lr = {}]", o.lr),
            ));
        }
        if s.warmup_epochs >= self.epochs && s.warmup_epochs > 0 {
            return Err(invalid(
                "schedule.warmup_epochs",
                s.warmup_epochs,
                format!("must be fewer than the {} epochs", self.epochs),
            ));
        }
        Ok(())
    }
}
