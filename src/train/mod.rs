//! Training on real data: a custom loop with PyTorch-equivalent optimizers, schedules
//! computed per iteration, exact resume, metrics files and atomic checkpoints.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use versatile::train::{Outcome, ProgressBars, TrainConfig, Trainer};
//!
//! let mut config = TrainConfig::default(); // vgg_small, dense, the shipped sample
//! config.variant = "spatial".into();
//! config.epochs = 3;
//! config.output = "runs/spatial".into();
//! let mut trainer = Trainer::new(config)?;
//! let stop = AtomicBool::new(false); // set it (e.g. from a Ctrl-C handler) to stop
//! if let Outcome::Finished(summary) = trainer.run(&mut ProgressBars::new("spatial"), &stop)? {
//!     println!("top-1 {:.2}%", 100.0 * summary.val_top1);
//! }
//! // Later, or after a Ctrl-C: Trainer::resume("runs/spatial".as_ref(), None)?.run(...)
//! # Ok::<(), versatile::train::TrainError>(())
//! ```
//!
//! - [`TrainConfig`]: every setting, from TOML or code ([`config`]).
//! - [`build_optimizer`]: SGD (momentum, Nesterov, weight decay; dampening 0) and
//!   Adam/AdamW with PyTorch's semantics and defaults.
//! - [`LrSchedule`]: step, cosine and linear warm-up from (epoch, iteration).
//! - [`Trainer`]: the loop; per-epoch `metrics.csv`/`metrics.json`, checkpoints
//!   ([`checkpoint`]) every epoch and on request, NaN/inf detection.
//! - [`evaluate`]: loss, top-1 and top-5 of a model on a loader.
//! - [`distributed`]: data-parallel training over N processes ([`Collective`];
//!   [`MpiGroup`](distributed) with the cargo feature `mpi`, for `mpirun -np N`), and
//!   micro-batches with accumulated gradients (`micro_batches`).

pub mod checkpoint;
pub mod config;
pub mod distributed;
mod error;
pub mod metrics;
mod optim;
pub mod progress;
mod schedule;
mod trainer;

pub use checkpoint::{
    is_checkpoint_model, load_checkpoint_model, load_trained_checkpoint, load_trained_model,
    model_file, save_final_model, RunState,
};
pub use config::{
    DataSettings, DeviceChoice, OptimizerKind, OptimizerSettings, ScheduleKind, ScheduleSettings,
    TrainConfig,
};
#[cfg(feature = "mpi")]
pub use distributed::MpiGroup;
pub use distributed::{launched_by_mpirun, Collective};
pub use error::TrainError;
pub use metrics::{EpochMetrics, Tally};
pub use optim::{build_optimizer, FusedSgd, SgdBackend, SgdVelocity};
pub use progress::{Observer, ProgressBars, Silent, StepProgress};
pub use schedule::LrSchedule;
pub use trainer::{
    device, evaluate, init_threads, initial_model, model_costs, open_data, BenchReport, Outcome,
    ResumeOverrides, Summary, Trainer,
};
