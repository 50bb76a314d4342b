//! The training loop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, RunState, FORMAT, RNG_SCHEME};
use super::config::{DeviceChoice, TrainConfig};
use super::distributed::{self, Collective};
use super::error::TrainError;
use super::metrics::{write_metrics, EpochMetrics, Tally};
use super::optim::build_optimizer;
use super::progress::{Observer, StepProgress};
use super::schedule::LrSchedule;
use crate::checkpoint::{CheckpointMeta, Preprocess};
use crate::data::{
    derive_seed, share, Batch, Dataset, DatasetKind, HostBatch, Loader, LoaderConfig, Position,
    Split, Step, Transform,
};
use crate::fsutil;
use crate::infer::PlanCache;
use crate::layer::fused::is_flex;
use crate::models::{ImageClassifier, Model, ModelConfig};

/// burn's CPU generator is one per process: whoever seeds it and then draws from it
/// holds this lock, so trainers in the same process (tests, the demo) stay reproducible.
/// Code that draws from it without the lock (`Tensor::random`, a module's `init`) while a
/// run initializes or steps changes that run's draws.
static RNG: Mutex<()> = Mutex::new(());

/// The model a training run starts from: `config` built for `device` with the generator
/// seeded from `seed` (a run's `seed` setting), every parameter
/// initialized now (burn initializes parameters lazily, at first use, which would draw
/// from whatever the generator holds then).
///
/// The weights are drawn on the host (flex's generator, with or without autodiff as
/// `device` is) and then moved to `device`: each backend has a generator of its own, so
/// drawing on the device would give a seed different weights on a GPU than on the CPU.
pub fn initial_model(
    config: &ModelConfig,
    device: &Device,
    seed: u64,
) -> Result<Model, TrainError> {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    let host = match device.is_autodiff() {
        true => Device::flex().autodiff(),
        false => Device::flex(),
    };
    let _guard = RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    host.seed(derive_seed(&[seed, INIT]));
    let model = config.init(&host)?;
    model.visit(&mut Touch);
    Ok(match is_flex(device) {
        true => model,
        false => model.fork(device),
    })
}

/// Domain tag of the model initialization seed.
const INIT: u64 = 0x494e_4954;
/// Domain tag of the per-step device seeds.
const STEP: u64 = 0x5354_4550;

/// The device of `choice` (without autodiff).
///
/// # Errors
/// [`TrainError::Device`] for a GPU backend this build was compiled without.
pub fn device(choice: DeviceChoice) -> Result<Device, TrainError> {
    let missing = |feature: &str| {
        TrainError::Device {
        device: choice.to_string(),
        reason: format!(
            "this build has no {feature} backend; rebuild with `cargo build --release --features {feature}`"
        ),
    }
    };
    match choice {
        DeviceChoice::Cpu => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda => Ok(Device::cuda(0)),
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda => Err(missing("cuda")),
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(not(feature = "wgpu"))]
        DeviceChoice::Wgpu => Err(missing("wgpu")),
    }
}

/// Sizes the global rayon pool that burn's CPU backend (and this project's kernels) run
/// on. `0` leaves it as it is. Returns the pool's size.
///
/// # Errors
/// [`TrainError::InvalidConfig`] when the pool was already started with another size
/// (rayon's global pool is built once per process).
pub fn init_threads(threads: usize) -> Result<usize, TrainError> {
    if threads > 0 {
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .is_ok();
        let current = rayon::current_num_threads();
        if !built && current != threads {
            return Err(TrainError::InvalidConfig {
                field: "threads",
                value: threads.to_string(),
                reason: format!("the process's thread pool already runs {current} threads"),
            });
        }
    }
    Ok(rayon::current_num_threads())
}

/// The gradients of `loss` with respect to `model`'s parameters.
///
/// The backward runs on one of the pool's threads: its kernels' parallel passes then start
/// there and the other threads steal their tasks, where from a thread outside the pool
/// every pass would be handed over to the pool and waited for (resnet18 spatial 900, 891 ->
/// 930, 987 images/s, dense 629, 661 -> 683, 689; 2 threads). The forward stays on the
/// caller's thread: on a pool thread too it measured level. Under the command-line tool's
/// malloc settings ([`crate::kernels::alloc::retain_freed_memory`]) the process has one
/// arena, so the two threads do not each keep their own freed blocks.
fn gradients(loss: Tensor<1>, model: &Model) -> GradientsParams {
    rayon::scope(|_| GradientsParams::from_grads(loss.backward(), model))
}

/// The training and test loaders of a configuration.
///
/// # Errors
/// Data errors (missing or corrupt files), [`TrainError::InvalidConfig`] for an unknown
/// format.
pub fn open_data(config: &TrainConfig) -> Result<(Loader, Loader), TrainError> {
    let kind = config.dataset_kind()?;
    let train = open_split(kind, config, Split::Train, config.data.train_per_class)?;
    let test = open_split(kind, config, Split::Test, config.data.test_per_class)?;
    let train = Loader::new(
        train,
        Transform::standard(kind, config.data.augment),
        LoaderConfig::new(config.batch_size)
            .with_seed(config.seed)
            .with_threads(config.data.loader_threads),
    )?;
    let test = Loader::new(
        test,
        Transform::standard(kind, false),
        LoaderConfig::new(config.eval_batch_size)
            .with_shuffle(false)
            .with_threads(config.data.loader_threads),
    )?;
    Ok((train, test))
}

fn open_split(
    kind: DatasetKind,
    config: &TrainConfig,
    split: Split,
    per_class: Option<usize>,
) -> Result<Dataset, TrainError> {
    let dataset = Dataset::open(kind, &config.data.path, split)?;
    Ok(match per_class {
        Some(n) => dataset.subset(&dataset.first_per_class(n))?,
        None => dataset,
    })
}

/// Loss, top-1 and top-5 of `model` on every batch of `loader` (evaluation mode: batch
/// norm uses its running statistics). `device` is where the batches go: the model's
/// device, without autodiff. On the CPU the batches run through compiled inference
/// plans ([`crate::infer`]), elsewhere through the module's forward.
///
/// # Errors
/// Data errors while loading.
pub fn evaluate(model: &Model, loader: &Loader, device: &Device) -> Result<Tally, TrainError> {
    let model = model.valid();
    let mut plans = is_flex(device).then(|| PlanCache::new(&model));
    let loss = CrossEntropyLossConfig::new().init(device);
    let mut tally = Tally::default();
    for batch in loader.epoch(0, device)? {
        let batch = batch?;
        if batch.indices.is_empty() {
            // This rank's share of a batch smaller than the number of ranks.
            continue;
        }
        let labels = batch_labels(&batch);
        let logits = match plans.as_mut() {
            Some(plans) => plans.forward(batch.images)?,
            None => model.forward_unchecked(batch.images),
        };
        let value: f32 = loss.forward(logits.clone(), batch.labels).into_scalar();
        tally.add_batch(value, &logits_vec(logits), &labels);
    }
    Ok(tally)
}

fn batch_labels(batch: &Batch) -> Vec<u32> {
    batch
        .labels
        .clone()
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .expect("labels are integers")
        .into_iter()
        .map(|l| l as u32)
        .collect()
}

fn logits_vec(logits: burn::tensor::Tensor<2>) -> Vec<f32> {
    logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("logits are floats")
}

/// How a call to [`Trainer::run`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every epoch was trained.
    Finished(Summary),
    /// Stopped on request (Ctrl-C) after saving a checkpoint there.
    Stopped {
        /// The next batch a resume trains on.
        next: Position,
        /// The checkpoint written.
        checkpoint: PathBuf,
    },
}

/// The figures of a finished run (`summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Model name.
    pub model: String,
    /// Variant.
    pub variant: String,
    /// Parameters (batch norm included, running statistics not).
    pub params: u64,
    /// Parameters of the convolutions (weights and biases).
    pub conv_params: u64,
    /// Multiply-adds per image as the paper counts them.
    pub macs_paper: u64,
    /// Multiply-adds per image with nested evaluation (this project's kernel).
    pub macs_nested: u64,
    /// Epochs trained.
    pub epochs: usize,
    /// Final validation loss.
    pub val_loss: f64,
    /// Final validation top-1 accuracy.
    pub val_top1: f64,
    /// Final validation top-5 accuracy.
    pub val_top5: f64,
    /// Best validation top-1 over the epochs, and its epoch (from 1).
    pub best_val_top1: (f64, usize),
    /// Training seconds over all epochs (evaluation excluded).
    pub train_seconds: f64,
    /// Evaluation seconds over all epochs.
    pub eval_seconds: f64,
    /// Mean training seconds per epoch.
    pub seconds_per_epoch: f64,
    /// Mean training images per second.
    pub images_per_second: f64,
    /// Compute threads.
    pub threads: usize,
    /// Device.
    pub device: String,
}

/// Phase timings of [`Trainer::bench`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Timed steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Training images per second over the timed steps.
    pub images_per_second: f64,
    /// Mean milliseconds per step waiting for the next batch.
    pub data_ms: f64,
    /// Mean milliseconds per step of the forward pass and the loss.
    pub forward_ms: f64,
    /// Mean milliseconds per step of the backward pass.
    pub backward_ms: f64,
    /// Mean milliseconds per step of the optimizer update.
    pub optimizer_ms: f64,
    /// Mean milliseconds per step of reading the loss and logits back.
    pub metrics_ms: f64,
    /// Compute threads (of each rank).
    pub threads: usize,
    /// Processes (MPI ranks) sharing every batch.
    #[serde(default = "one")]
    pub ranks: usize,
    /// Micro-batches per rank and step.
    #[serde(default = "one")]
    pub micro_batches: usize,
    /// Mean milliseconds per step exchanging the step's metrics: the first exchange of a
    /// step, so it includes waiting for the slowest rank.
    #[serde(default)]
    pub comm_wait_ms: f64,
    /// Mean milliseconds per step in the all-reduce of the gradients (the ranks have
    /// just met, so this is the transfer and the sums).
    #[serde(default)]
    pub allreduce_ms: f64,
    /// Bytes each rank contributes to the all-reduces of one step.
    #[serde(default)]
    pub allreduce_bytes: u64,
}

fn one() -> usize {
    1
}

/// A training run: model, optimizer, data and where the run stands.
pub struct Trainer {
    run_dir: PathBuf,
    device: Device,
    model: Option<Model>,
    optimizer: ModuleOptimizer,
    loss: CrossEntropyLoss,
    train: Loader,
    test: Loader,
    schedule: LrSchedule,
    state: RunState,
    /// The ranks of a data-parallel run (none: this process alone).
    group: Option<Arc<dyn Collective>>,
    /// Whether the ranks agreed, at the last step, to stop.
    stop_agreed: bool,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("run_dir", &self.run_dir)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// What a resumed run may change (see [`Trainer::resume_with`]); `None` keeps the run's
/// own setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResumeOverrides {
    /// Total epochs of the run.
    pub epochs: Option<usize>,
    /// Compute threads (0: one per core).
    pub threads: Option<usize>,
    /// Data loader threads.
    pub loader_threads: Option<usize>,
    /// Steps between checkpoints within an epoch (0: at epoch ends only).
    pub checkpoint_every: Option<usize>,
    /// Micro-batches per batch (or per rank's share of it); changes only the order of
    /// floating-point sums and the batch-norm statistics within a step.
    pub micro_batches: Option<usize>,
}

impl Trainer {
    /// A fresh run of `config` in `config.output`.
    ///
    /// # Errors
    /// [`TrainError::InvalidConfig`] for bad settings or an output directory that already
    /// holds a run; data and model errors.
    pub fn new(config: TrainConfig) -> Result<Self, TrainError> {
        config.validate()?;
        let run_dir = config.output.clone();
        if run_dir.join(checkpoint::POINTER).exists() {
            return Err(TrainError::InvalidConfig {
                field: "output",
                value: run_dir.display().to_string(),
                reason: "it holds a run already: continue it with --resume, or choose another output directory".into(),
            });
        }
        init_threads(config.threads)?;
        let (train, test) = open_data(&config)?;
        let [c, h, w] = train.sample_shape().dims();
        let model_config = config.model_config(c, train.num_classes())?;
        model_config.cost_report([h, w])?;
        let base = device(config.device)?;
        let device = base.autodiff();
        let model = initial_model(&model_config, &device, config.seed)?;
        let optimizer = build_optimizer(&config.optimizer);
        let state = RunState {
            format: FORMAT,
            config: config.clone(),
            model: model_config,
            next: Position::default(),
            global_step: 0,
            history: Vec::new(),
            partial: Tally::default(),
            partial_seconds: 0.0,
            rng: RNG_SCHEME.into(),
        };
        Ok(Self::assemble(
            run_dir, device, model, optimizer, train, test, state,
        ))
    }

    /// Continues the run in `run_dir` from its latest checkpoint. `epochs` extends (or
    /// shortens) the run; the learning-rate schedule follows the new length.
    ///
    /// # Errors
    /// [`TrainError::Checkpoint`] when there is nothing to resume; data and record errors.
    pub fn resume(run_dir: &Path, epochs: Option<usize>) -> Result<Self, TrainError> {
        Self::resume_with(
            run_dir,
            ResumeOverrides {
                epochs,
                ..ResumeOverrides::default()
            },
        )
    }

    /// [`resume`](Trainer::resume) with the settings a continuation may change: the
    /// length of the run, the threads it runs on (compute threads change only the
    /// order of floating-point sums, loader threads nothing at all) and how often it
    /// saves.
    ///
    /// # Errors
    /// As [`resume`](Trainer::resume), and a thread count the process cannot take.
    pub fn resume_with(run_dir: &Path, overrides: ResumeOverrides) -> Result<Self, TrainError> {
        let pointer = run_dir.join(checkpoint::POINTER);
        if !pointer.is_file() {
            return Err(TrainError::Checkpoint {
                path: run_dir.to_path_buf(),
                reason: "no checkpoint to resume from (no checkpoint.json)".into(),
            });
        }
        let state_path = checkpoint::latest_checkpoint(run_dir)?.join("state.json");
        let text = std::fs::read_to_string(&state_path).map_err(TrainError::io(&state_path))?;
        let peek: RunState = serde_json::from_str(&text).map_err(|err| TrainError::Checkpoint {
            path: state_path.clone(),
            reason: err.to_string(),
        })?;
        let mut config = peek.config.clone();
        if let Some(epochs) = overrides.epochs {
            config.epochs = epochs;
        }
        if let Some(threads) = overrides.threads {
            config.threads = threads;
        }
        if let Some(threads) = overrides.loader_threads {
            config.data.loader_threads = threads;
        }
        if let Some(every) = overrides.checkpoint_every {
            config.checkpoint_every = every;
        }
        if let Some(micro) = overrides.micro_batches {
            config.micro_batches = micro;
        }
        config.output = run_dir.to_path_buf();
        config.validate()?;
        init_threads(config.threads)?;
        let device = device(config.device)?.autodiff();
        let loaded = checkpoint::load_checkpoint(run_dir, &device)?;
        let (train, test) = open_data(&config)?;
        let optimizer = build_optimizer(&config.optimizer).load_record(loaded.optimizer);
        let mut state = loaded.state;
        state.config = config;
        Ok(Self::assemble(
            run_dir.to_path_buf(),
            device,
            loaded.model,
            optimizer,
            train,
            test,
            state,
        ))
    }

    fn assemble(
        run_dir: PathBuf,
        device: Device,
        model: Model,
        optimizer: ModuleOptimizer,
        train: Loader,
        test: Loader,
        state: RunState,
    ) -> Self {
        let schedule = LrSchedule::new(
            state.config.schedule.clone(),
            state.config.optimizer.lr,
            state.config.epochs,
            train.batches_per_epoch(),
        );
        Trainer {
            loss: CrossEntropyLossConfig::new().init(&device),
            run_dir,
            device,
            model: Some(model),
            optimizer,
            train,
            test,
            schedule,
            state,
            group: None,
            stop_agreed: false,
        }
    }

    /// Makes this trainer rank `group.rank()` of a data-parallel run over `group`: each
    /// rank trains and evaluates on its share of every batch, gradients and metrics are
    /// summed over the ranks, batch-norm statistics averaged before evaluations and
    /// checkpoints, and only rank 0 writes files. Every rank must build its trainer from
    /// the same configuration (or resume the same checkpoint) and call this; with one
    /// rank nothing changes.
    ///
    /// # Errors
    /// [`TrainError::Distributed`] when the ranks' settings, positions or weights
    /// differ; data errors.
    pub fn distributed(mut self, group: Arc<dyn Collective>) -> Result<Self, TrainError> {
        let (rank, size) = (group.rank(), group.size());
        if size <= 1 {
            return Ok(self);
        }
        // Settings a rank may choose for itself do not count.
        let mut config = self.state.config.clone();
        config.threads = 0;
        config.data.loader_threads = 1;
        config.micro_batches = 1;
        let settings = format!(
            "{}\n{:?} {} {}",
            config.to_toml(),
            self.state.next,
            self.state.global_step,
            self.state.history.len()
        );
        let hashes = group.gather_u64(
            "comparing the settings",
            distributed::checksum_bytes(settings.as_bytes()),
        );
        if let Some(other) = hashes.iter().position(|&h| h != hashes[0]) {
            return Err(TrainError::Distributed {
                reason: format!(
                    "rank {other} runs other settings or resumes another position than rank 0 (rank {rank} checked): every rank must get the same command line and see the same run directory"
                ),
            });
        }
        let mut values = distributed::flatten(self.model(), true);
        values.extend(distributed::flatten(self.model(), false));
        let hashes = group.gather_u64("comparing the weights", distributed::checksum(&values));
        if let Some(other) = hashes.iter().position(|&h| h != hashes[0]) {
            return Err(TrainError::Distributed {
                reason: format!(
                    "rank {other} starts from other weights than rank 0 (rank {rank} checked): another build, or a run directory that differs between the hosts"
                ),
            });
        }
        self.train = self.train.with_share(rank, size)?;
        self.test = self.test.with_share(rank, size)?;
        self.group = Some(group);
        Ok(self)
    }

    /// Whether this process writes the run's files: rank 0, or a process alone.
    pub fn is_root(&self) -> bool {
        self.group.as_ref().is_none_or(|g| g.rank() == 0)
    }

    /// Whether a step is the plain one: one process, one micro-batch.
    fn plain(&self) -> bool {
        self.group.is_none() && self.state.config.micro_batches == 1
    }

    /// Whether to stop now: this process's request, or under MPI what the ranks agreed
    /// at the last step.
    fn stop_now(&self, stop: &AtomicBool) -> bool {
        if self.group.is_some() {
            self.stop_agreed
        } else {
            stop.load(Ordering::Relaxed)
        }
    }

    /// Images in the whole batch at `position` (the last one of an epoch may be short).
    fn global_batch_len(&self, position: Position) -> usize {
        let size = self.state.config.batch_size;
        (self.train.samples_per_epoch() - position.batch * size).min(size)
    }

    /// Averages the batch-norm running statistics over the ranks (nothing alone).
    fn sync_buffers(&mut self) {
        let Some(group) = self.group.clone() else {
            return;
        };
        let model = self
            .model
            .take()
            .expect("the model is in place between steps");
        let mut values = distributed::flatten(&model, false);
        group.sum_f32("averaging the batch-norm statistics", &mut values);
        let n = group.size() as f32;
        values.iter_mut().for_each(|v| *v /= n);
        self.model = Some(distributed::set_buffers(model, &values));
    }

    /// Sums a tally over the ranks (nothing alone).
    fn reduce_tally(&self, tally: Tally) -> Tally {
        let Some(group) = &self.group else {
            return tally;
        };
        let mut values = [
            tally.images as f64,
            tally.loss_sum,
            tally.top1 as f64,
            tally.top5 as f64,
        ];
        group.sum_f64("summing the evaluation", &mut values);
        Tally {
            images: values[0] as u64,
            loss_sum: values[1],
            top1: values[2] as u64,
            top5: values[3] as u64,
        }
    }

    /// The model as it stands.
    pub fn model(&self) -> &Model {
        self.model
            .as_ref()
            .expect("the model is in place between steps")
    }

    /// Where the run stands.
    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The training loader.
    pub fn train_loader(&self) -> &Loader {
        &self.train
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// The model's forward pass with the process-wide generator (dropout) seeded from
    /// `seed`: seeded and drawn under the lock, so trainers in the same process cannot
    /// interleave.
    fn seeded_forward(&self, model: &Model, images: Tensor<4>, seed: &[u64]) -> Tensor<2> {
        let _guard = RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.device.seed(derive_seed(seed));
        model.forward_unchecked(images)
    }

    /// One optimizer step on `batch` at position (`epoch`, `index`): returns the batch's
    /// mean loss and its logits, or stops on a non-finite loss.
    fn step(
        &mut self,
        batch: Batch,
        lr: f64,
        timings: Option<&mut [f64; 4]>,
    ) -> Result<(f32, Vec<f32>), TrainError> {
        let Position {
            epoch,
            batch: index,
        } = batch.position;
        let t0 = Instant::now();
        let model = self
            .model
            .take()
            .expect("the model is in place between steps");
        let seed = [self.state.config.seed, STEP, epoch as u64, index as u64];
        let logits = self.seeded_forward(&model, batch.images, &seed);
        let loss = self.loss.forward(logits.clone(), batch.labels);
        let value: f32 = loss.clone().into_scalar();
        let t1 = Instant::now();
        if !value.is_finite() {
            self.model = Some(model);
            return Err(TrainError::NonFinite {
                epoch,
                batch: index,
                loss: value,
                lr,
                kept: self.kept_checkpoint(),
            });
        }
        let grads = gradients(loss, &model);
        let t2 = Instant::now();
        self.model = Some(self.optimizer.step(lr, model, grads));
        let t3 = Instant::now();
        let logits = logits_vec(logits.detach());
        let t4 = Instant::now();
        if let Some(t) = timings {
            t[0] += (t1 - t0).as_secs_f64();
            t[1] += (t2 - t1).as_secs_f64();
            t[2] += (t3 - t2).as_secs_f64();
            t[3] += (t4 - t3).as_secs_f64();
        }
        Ok((value, logits))
    }

    /// One optimizer step on this rank's share `host` of a batch, in micro-batches, with
    /// the gradients (and the step's metrics) summed over the ranks: see
    /// [`distributed`]. Returns the tally of the whole batch.
    /// `timings`: forward, backward, optimizer, metrics, metrics exchange and gradient
    /// all-reduce seconds added.
    fn step_shared(
        &mut self,
        host: HostBatch,
        lr: f64,
        stop: bool,
        mut timings: Option<&mut [f64; 6]>,
    ) -> Result<Tally, TrainError> {
        let Position {
            epoch,
            batch: index,
        } = host.position;
        let global = self.global_batch_len(host.position) as f32;
        let (rank, ranks) = self.group.as_ref().map_or((0, 1), |g| (g.rank(), g.size()));
        let micro = self.state.config.micro_batches;
        let model = self
            .model
            .take()
            .expect("the model is in place between steps");
        let mut flat = vec![0f32; distributed::trainable_len(&model)];
        let mut local = Tally::default();
        let mut bad = None;
        let add = |t: &mut Option<&mut [f64; 6]>, i: usize, since: Instant| {
            if let Some(t) = t.as_deref_mut() {
                t[i] += since.elapsed().as_secs_f64();
            }
        };
        for m in 0..micro {
            let range = share(host.len(), m, micro);
            if range.is_empty() {
                continue;
            }
            let piece = host.slice(range);
            let n = piece.len();
            let labels = piece.labels.clone();
            let batch = piece.to_device(&self.device);
            let t0 = Instant::now();
            // Seeded by the piece's place in the whole batch, whatever the ranks.
            let seed = [
                self.state.config.seed,
                STEP,
                epoch as u64,
                index as u64,
                (rank * micro + m) as u64,
                (ranks * micro) as u64,
            ];
            let logits = self.seeded_forward(&model, batch.images, &seed);
            let loss = self.loss.forward(logits.clone(), batch.labels);
            let value: f32 = loss.clone().into_scalar();
            add(&mut timings, 0, t0);
            let t1 = Instant::now();
            local.add_batch(value, &logits_vec(logits.detach()), &labels);
            add(&mut timings, 3, t1);
            if !value.is_finite() {
                bad.get_or_insert(value);
                continue;
            }
            let t2 = Instant::now();
            let grads = gradients(loss, &model);
            distributed::accumulate_grads(&model, &grads, n as f32 / global, &mut flat);
            add(&mut timings, 1, t2);
        }
        let t3 = Instant::now();
        let mut tally = local;
        let mut stop_votes = 0.0;
        let mut bad_votes = 0.0;
        if let Some(group) = &self.group {
            let mut stats = [
                local.images as f64,
                local.loss_sum,
                local.top1 as f64,
                local.top5 as f64,
                f64::from(u8::from(stop)),
                f64::from(u8::from(bad.is_some())),
            ];
            group.sum_f64("summing the step's metrics", &mut stats);
            tally = Tally {
                images: stats[0] as u64,
                loss_sum: stats[1],
                top1: stats[2] as u64,
                top5: stats[3] as u64,
            };
            stop_votes = stats[4];
            bad_votes = stats[5];
        }
        add(&mut timings, 4, t3);
        if bad.is_some() || bad_votes > 0.0 {
            self.model = Some(model);
            return Err(TrainError::NonFinite {
                epoch,
                batch: index,
                loss: bad.unwrap_or(f32::NAN),
                lr,
                kept: self.kept_checkpoint(),
            });
        }
        let t5 = Instant::now();
        if let Some(group) = &self.group {
            group.sum_f32("summing the gradients", &mut flat);
            self.stop_agreed = stop_votes > 0.0;
        }
        add(&mut timings, 5, t5);
        let t4 = Instant::now();
        let grads =
            distributed::grads_from_flat(&model, &flat, &self.device.clone().without_autodiff());
        self.model = Some(self.optimizer.step(lr, model, grads));
        add(&mut timings, 2, t4);
        Ok(tally)
    }

    /// Bytes each rank contributes to the all-reduces of one step.
    fn allreduce_bytes(&self) -> u64 {
        (4 * distributed::trainable_len(self.model()) + 6 * 8) as u64
    }

    /// Trains until the configured number of epochs, evaluating and checkpointing after
    /// each (and every `checkpoint_every` steps); returns early (after a checkpoint) when
    /// `stop` becomes true. Temporaries that a killed run left in the run directory are
    /// removed first.
    ///
    /// # Errors
    /// [`TrainError::NonFinite`] when the loss stops being finite and
    /// [`TrainError::SaveFailed`] when a checkpoint cannot be written (the last
    /// checkpoint stays the latest); data, record and I/O errors.
    pub fn run(
        &mut self,
        observer: &mut dyn Observer,
        stop: &AtomicBool,
    ) -> Result<Outcome, TrainError> {
        let epochs = self.state.config.epochs;
        let batches = self.train.batches_per_epoch();
        let dir = &self.run_dir;
        let root = self.is_root();
        if root {
            std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
            checkpoint::remove_stale_temporaries(dir)?;
            let config_path = dir.join("config.toml");
            fsutil::write_atomic(&config_path, self.state.config.to_toml().as_bytes())
                .map_err(TrainError::io(&config_path))?;
        }
        if root && !self.state.history.is_empty() {
            // A run killed between a checkpoint and its metrics: the files follow the
            // checkpoint resumed from.
            write_metrics(&self.run_dir, &self.state.history)?;
        }
        observer.run_started(&self.state, batches);
        while self.state.next.epoch < epochs {
            let start = self.state.next;
            let epoch = start.epoch;
            observer.epoch_started(epoch, start.batch, batches);
            let mut tally = self.state.partial;
            let mut seconds = self.state.partial_seconds;
            let mut lr = self.schedule.lr(epoch, start.batch);
            let mut loader = self.train.resume_host(start)?;
            let mut clock = Instant::now();
            loop {
                // Once the epoch's last batch has trained, the stop waits for its
                // evaluation and checkpoint (below): a checkpoint between the two would
                // resume into the next epoch with this one's tally and no metrics.
                if self.stop_now(stop) && self.state.next.epoch == epoch {
                    drop(loader);
                    seconds += clock.elapsed().as_secs_f64();
                    self.state.partial = tally;
                    self.state.partial_seconds = seconds;
                    let checkpoint = self.save()?;
                    return Ok(self.stopped(observer, checkpoint));
                }
                let Some(batch) = loader.next() else { break };
                let batch = batch?;
                let (position, next) = (batch.position, batch.next);
                lr = self.schedule.lr(epoch, position.batch);
                if let Some(group) = &self.group {
                    distributed::inject_fault(group.rank(), self.state.global_step + 1);
                }
                if self.plain() {
                    let labels = batch.labels.clone();
                    let (loss, logits) = self.step(batch.to_device(&self.device), lr, None)?;
                    tally.add_batch(loss, &logits, &labels);
                } else {
                    let step = self.step_shared(batch, lr, stop.load(Ordering::Relaxed), None)?;
                    tally.merge(&step);
                }
                self.state.next = next;
                self.state.global_step += 1;
                let elapsed = seconds + clock.elapsed().as_secs_f64();
                observer.batch_done(&StepProgress {
                    epoch,
                    batch: position.batch,
                    batches,
                    loss: tally.loss(),
                    top1: tally.top1(),
                    images_per_second: tally.images as f64 / elapsed.max(1e-9),
                    lr,
                });
                let every = self.state.config.checkpoint_every as u64;
                // Not after the epoch's last batch: its checkpoint follows the evaluation.
                if every > 0 && self.state.global_step.is_multiple_of(every) && next.epoch == epoch
                {
                    seconds += clock.elapsed().as_secs_f64();
                    self.state.partial = tally;
                    self.state.partial_seconds = seconds;
                    self.save()?;
                    clock = Instant::now();
                }
            }
            seconds += clock.elapsed().as_secs_f64();
            observer.evaluating(epoch);
            clock = Instant::now();
            let eval_device = self.device.clone().without_autodiff();
            self.sync_buffers();
            let val = evaluate(self.model(), &self.test, &eval_device)?;
            let val = self.reduce_tally(val);
            let eval_seconds = clock.elapsed().as_secs_f64();
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                train_loss: tally.loss(),
                train_top1: tally.top1(),
                train_top5: tally.top5(),
                val_loss: val.loss(),
                val_top1: val.top1(),
                val_top5: val.top5(),
                lr,
                train_seconds: seconds,
                eval_seconds,
                images_per_second: tally.images as f64 / seconds.max(1e-9),
            };
            self.state.history.push(metrics.clone());
            self.state.partial = Tally::default();
            self.state.partial_seconds = 0.0;
            let checkpoint = self.save()?;
            if root {
                write_metrics(&self.run_dir, &self.state.history)?;
            }
            observer.epoch_done(&metrics);
            if self.stop_now(stop) && self.state.next.epoch < epochs {
                return Ok(self.stopped(observer, checkpoint));
            }
        }
        let summary = self.summary()?;
        if !root {
            return Ok(Outcome::Finished(summary));
        }
        checkpoint::save_final_model(&self.run_dir, self.model(), &self.final_model_meta())?;
        let json = serde_json::to_string_pretty(&summary).expect("summary serializes");
        let summary_path = self.run_dir.join("summary.json");
        fsutil::write_atomic(&summary_path, json.as_bytes())
            .map_err(TrainError::io(&summary_path))?;
        Ok(Outcome::Finished(summary))
    }

    /// The description the final model is saved with: its configuration, the dataset's
    /// class names when it has them, and the evaluation transform as preprocessing.
    fn final_model_meta(&self) -> CheckpointMeta {
        let mut meta = CheckpointMeta::new(self.state.model.clone())
            .with_preprocess(preprocess_of(&self.test));
        if let Some(names) = self.test.dataset().class_names() {
            if names.len() == self.state.model.num_classes {
                meta = meta.with_class_names(names.to_vec());
            }
        }
        meta
    }

    /// The outcome of a stop on request, after `checkpoint` was written; tells `observer`.
    fn stopped(&self, observer: &mut dyn Observer, checkpoint: PathBuf) -> Outcome {
        observer.message(&format!(
            "stopped at {}; checkpoint {}",
            self.state.next,
            checkpoint.display()
        ));
        Outcome::Stopped {
            next: self.state.next,
            checkpoint,
        }
    }

    /// Writes a checkpoint of where the run stands (rank 0 alone, after the batch-norm
    /// statistics are averaged over the ranks; the other ranks return the run directory).
    fn save(&mut self) -> Result<PathBuf, TrainError> {
        self.sync_buffers();
        let saved = if self.is_root() {
            checkpoint::save_checkpoint(&self.run_dir, self.model(), &self.optimizer, &self.state)
                .map_err(|error| TrainError::SaveFailed {
                error: Box::new(error),
                kept: self.kept_checkpoint(),
            })?
        } else {
            self.run_dir.clone()
        };
        if let Some(group) = &self.group {
            // No rank goes on before the checkpoint is complete: a rank that fails
            // later leaves this one to resume from.
            group.gather_u64("waiting for rank 0's checkpoint", 0);
        }
        Ok(saved)
    }

    /// Which checkpoint a run that stops now leaves, in words.
    fn kept_checkpoint(&self) -> String {
        match checkpoint::latest_checkpoint(&self.run_dir) {
            Ok(dir) => format!("the last good checkpoint is {}", dir.display()),
            Err(_) => "no checkpoint had been written yet".into(),
        }
    }

    /// The summary of the run so far.
    ///
    /// # Errors
    /// [`TrainError::Checkpoint`] before the first epoch has finished.
    pub fn summary(&self) -> Result<Summary, TrainError> {
        summarize(
            &self.state,
            self.train.sample_shape().dims(),
            rayon::current_num_threads(),
        )
    }

    /// Times `steps` training steps (after `warmup` untimed ones) from the start of the
    /// current position, phase by phase; nothing is saved.
    ///
    /// It consumes the trainer: the steps update the parameters in place, as training
    /// does, and keeping a copy of the model to restore afterwards would hold a second
    /// set of parameters alive, making the first step copy every parameter and the
    /// step's measured memory grow by the model's size.
    ///
    /// # Errors
    /// Data errors; [`TrainError::NonFinite`].
    pub fn bench(mut self, warmup: usize, steps: usize) -> Result<BenchReport, TrainError> {
        let mut timings = [0.0f64; 6];
        let mut data = 0.0f64;
        let mut done = 0;
        let mut epoch = self.state.next.epoch;
        let mut wall = 0.0f64;
        'outer: loop {
            let mut loader = self.train.resume_host(Position::epoch_start(epoch))?;
            loop {
                let t0 = Instant::now();
                let Some(batch) = loader.next() else { break };
                let batch = batch?;
                let wait = t0.elapsed().as_secs_f64();
                let lr = self.schedule.lr(epoch, batch.position.batch);
                let timed = done >= warmup;
                let t1 = Instant::now();
                if self.plain() {
                    let mut four = [0.0f64; 4];
                    self.step(batch.to_device(&self.device), lr, Some(&mut four))?;
                    if timed {
                        timings.iter_mut().zip(four).for_each(|(t, f)| *t += f);
                    }
                } else {
                    self.step_shared(batch, lr, false, timed.then_some(&mut timings))?;
                }
                if timed {
                    data += wait;
                    wall += wait + t1.elapsed().as_secs_f64();
                }
                done += 1;
                if done >= warmup + steps {
                    break 'outer;
                }
            }
            epoch += 1;
        }
        let per_step = |t: f64| 1e3 * t / steps.max(1) as f64;
        Ok(BenchReport {
            steps,
            batch_size: self.state.config.batch_size,
            images_per_second: (steps * self.state.config.batch_size) as f64 / wall.max(1e-9),
            data_ms: per_step(data),
            forward_ms: per_step(timings[0]),
            backward_ms: per_step(timings[1]),
            optimizer_ms: per_step(timings[2]),
            metrics_ms: per_step(timings[3]),
            threads: rayon::current_num_threads(),
            ranks: self.group.as_ref().map_or(1, |g| g.size()),
            micro_batches: self.state.config.micro_batches,
            comm_wait_ms: per_step(timings[4]),
            allreduce_ms: per_step(timings[5]),
            allreduce_bytes: if self.group.is_some() {
                self.allreduce_bytes()
            } else {
                0
            },
        })
    }
}

/// Cost figures of a model for `[c, h, w]` inputs: (parameters, conv parameters, paper
/// MACs, nested MACs).
pub fn model_costs(
    model: &ModelConfig,
    hw: [usize; 2],
) -> Result<(u64, u64, u64, u64), TrainError> {
    let report = model.cost_report(hw)?;
    let total = report.total();
    let conv_params = report
        .layers
        .iter()
        .filter(|l| l.kind == "Conv2d" || l.kind == "VConv2d")
        .map(|l| l.cost.params)
        .sum();
    Ok((
        total.params,
        conv_params,
        total.macs_paper,
        total.macs_nested,
    ))
}

fn summarize(state: &RunState, chw: [usize; 3], threads: usize) -> Result<Summary, TrainError> {
    let last = state.history.last().ok_or_else(|| TrainError::Checkpoint {
        path: state.config.output.clone(),
        reason: "no epoch has finished yet".into(),
    })?;
    let (params, conv_params, macs_paper, macs_nested) =
        model_costs(&state.model, [chw[1], chw[2]])?;
    let best = state
        .history
        .iter()
        .map(|m| (m.val_top1, m.epoch))
        .fold((f64::MIN, 0), |a, b| if b.0 > a.0 { b } else { a });
    let train_seconds: f64 = state.history.iter().map(|m| m.train_seconds).sum();
    let eval_seconds: f64 = state.history.iter().map(|m| m.eval_seconds).sum();
    let images: f64 = state
        .history
        .iter()
        .map(|m| m.images_per_second * m.train_seconds)
        .sum();
    Ok(Summary {
        model: state.model.name(),
        variant: state.model.variant.to_string(),
        params,
        conv_params,
        macs_paper,
        macs_nested,
        epochs: state.history.len(),
        val_loss: last.val_loss,
        val_top1: last.val_top1,
        val_top5: last.val_top5,
        best_val_top1: best,
        train_seconds,
        eval_seconds,
        seconds_per_epoch: train_seconds / state.history.len() as f64,
        images_per_second: images / train_seconds.max(1e-9),
        threads,
        device: state.config.device.to_string(),
    })
}

/// How an image becomes an input of a model evaluated through `loader`: its transform's
/// resize and centre crop (or the images' own size) and normalisation.
fn preprocess_of(loader: &Loader) -> Preprocess {
    let shape = loader.sample_shape();
    let mut input_size = [shape.height, shape.width];
    let mut resize = None;
    for step in loader.transform().steps() {
        match *step {
            Step::Resize { shorter } => resize = Some(shorter),
            Step::CenterCrop { height, width } => input_size = [height, width],
            _ => {}
        }
    }
    let normalize = loader.transform().normalize();
    Preprocess {
        input_size,
        resize: resize.unwrap_or(input_size[0].max(input_size[1])),
        mean: normalize.mean.clone(),
        std: normalize.std.clone(),
    }
}
