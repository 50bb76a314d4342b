//! `versatile train`: train a model of the zoo on a dataset, resume a run, or time
//! training steps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use clap::Args;
use versatile::train::{
    Collective, DeviceChoice, Observer, OptimizerKind, Outcome, ProgressBars, ResumeOverrides,
    ScheduleKind, Silent, Summary, TrainConfig, TrainError, Trainer,
};

use super::{memory, plot, UsageError};

/// Arguments of `versatile train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// TOML configuration file (see the library's `train::config`); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its latest checkpoint (its settings are kept;
    /// --epochs may extend it; --threads, --loader-threads, --checkpoint-every and
    /// --micro-batches may change, and so may the number of MPI ranks).
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
    resume: Option<PathBuf>,
    #[command(flatten)]
    settings: TrainFlags,
    /// Time N training steps (after 3 warm-up steps) phase by phase and print the
    /// throughput; trains no run and writes nothing.
    #[arg(long, value_name = "N")]
    bench_steps: Option<usize>,
    /// With --bench-steps: print one JSON object.
    #[arg(long, requires = "bench_steps")]
    json: bool,
    /// Under mpirun (a build with the `mpi` feature): end the run when one collective
    /// operation waits longer than this for the other ranks (a rank that hangs); 0: wait
    /// forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    collective_timeout: f64,
}

/// Settings that override the configuration file (or the defaults).
#[derive(Debug, Clone, Args, Default)]
pub struct TrainFlags {
    /// Model name (see `versatile models`) [default: vgg_small].
    #[arg(long)]
    pub model: Option<String>,
    /// Variant: dense, spatial, spatial+channel[:...] [default: dense].
    #[arg(long)]
    pub variant: Option<String>,
    /// Dataset directory [default: data/fashion-mnist-sample].
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Dataset format: idx, cifar10, cifar100, imagefolder [default: detected].
    #[arg(long)]
    pub kind: Option<String>,
    /// Keep only the first N training images of each class.
    #[arg(long, value_name = "N")]
    pub train_per_class: Option<usize>,
    /// Keep only the first N test images of each class.
    #[arg(long, value_name = "N")]
    pub test_per_class: Option<usize>,
    /// No random augmentation of the training images.
    #[arg(long)]
    pub no_augment: bool,
    /// Threads decoding and augmenting images [default: 1].
    #[arg(long, value_name = "N")]
    pub loader_threads: Option<usize>,
    /// Epochs [default: 30].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size [default: 128].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Evaluation batch size [default: 256].
    #[arg(long)]
    pub eval_batch_size: Option<usize>,
    /// Optimizer: sgd, adam, adamw [default: sgd].
    #[arg(long, value_parser = parse::<OptimizerKind>)]
    pub optimizer: Option<OptimizerKind>,
    /// Peak learning rate [default: 0.1].
    #[arg(long)]
    pub lr: Option<f64>,
    /// SGD momentum [default: 0.9].
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Nesterov momentum: true or false [default: true].
    #[arg(long, value_name = "BOOL")]
    pub nesterov: Option<bool>,
    /// Weight decay [default: 5e-4].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Learning-rate schedule: constant, step, cosine [default: cosine].
    #[arg(long, value_parser = parse::<ScheduleKind>)]
    pub schedule: Option<ScheduleKind>,
    /// Step schedule: epochs between decays [default: 40].
    #[arg(long, value_name = "N")]
    pub step_epochs: Option<usize>,
    /// Step schedule: decay factor [default: 0.1].
    #[arg(long)]
    pub gamma: Option<f64>,
    /// Cosine schedule: final learning rate [default: 0].
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Linear warm-up epochs [default: 0].
    #[arg(long, value_name = "N")]
    pub warmup_epochs: Option<usize>,
    /// Seed [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Compute threads (0: one per core) [default: 0].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also write a checkpoint every N optimizer steps within an epoch (0: only at the
    /// end of each epoch) [default: 0].
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
    /// Split every batch (under MPI: every rank's share) into N micro-batches with
    /// accumulated gradients [default: 1].
    #[arg(long, value_name = "N")]
    pub micro_batches: Option<usize>,
    /// Run directory [default: runs/MODEL-VARIANT].
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Device: cpu, cuda, wgpu (GPU ones need the cargo feature of that name).
    #[arg(long, value_parser = parse::<DeviceChoice>)]
    pub device: Option<DeviceChoice>,
}

fn parse<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

impl TrainFlags {
    /// Applies the flags that were given to `config`.
    pub fn apply(&self, config: &mut TrainConfig) {
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),+ $(,)?) => {
                $(if let Some(value) = &self.$flag { config.$($field).+ = value.clone().into(); })+
            };
        }
        set!(
            model => model, variant => variant, data => data.path, epochs => epochs,
            batch_size => batch_size, eval_batch_size => eval_batch_size,
            optimizer => optimizer.kind, lr => optimizer.lr, momentum => optimizer.momentum,
            nesterov => optimizer.nesterov, weight_decay => optimizer.weight_decay,
            schedule => schedule.kind, step_epochs => schedule.step_epochs,
            gamma => schedule.gamma, min_lr => schedule.min_lr,
            warmup_epochs => schedule.warmup_epochs, seed => seed, threads => threads,
            output => output, device => device, loader_threads => data.loader_threads,
            checkpoint_every => checkpoint_every, micro_batches => micro_batches,
        );
        if let Some(kind) = &self.kind {
            config.data.kind = Some(kind.clone());
        }
        if self.train_per_class.is_some() {
            config.data.train_per_class = self.train_per_class;
        }
        if self.test_per_class.is_some() {
            config.data.test_per_class = self.test_per_class;
        }
        if self.no_augment {
            config.data.augment = false;
        }
    }
}

/// The process's stop flag, raised by Ctrl-C (the handler is installed once).
pub fn stop_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = Arc::clone(&flag);
        let installed = ctrlc::set_handler(move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: exiting without saving");
                std::process::exit(130);
            }
            eprintln!("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)");
        });
        if let Err(err) = installed {
            eprintln!("warning: cannot install the Ctrl-C handler: {err}");
        }
        flag
    })
    .clone()
}

/// A training error as the CLI reports it: usage errors exit with code 2.
pub fn train_error(err: TrainError) -> anyhow::Error {
    if err.is_usage() {
        UsageError::from_display(err)
    } else {
        anyhow::Error::new(err)
    }
}

/// The configuration of `versatile train` from the file and flags.
fn build_config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut config = match &args.config {
        Some(path) => TrainConfig::from_toml_file(path).map_err(train_error)?,
        None => TrainConfig::default(),
    };
    args.settings.apply(&mut config);
    let output_given = args.settings.output.is_some()
        || (args.config.is_some() && config.output != TrainConfig::default().output);
    if !output_given {
        let variant: String = config
            .variant
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '+' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        config.output = PathBuf::from("runs").join(format!("{}-{variant}", config.model));
    }
    config.validate().map_err(train_error)?;
    Ok(config)
}

/// Prints a finished run's summary.
pub fn print_summary(run_dir: &Path, summary: &Summary) {
    println!();
    println!(
        "{} ({}) after {} epochs: test top-1 {:.2}%, top-5 {:.2}%, loss {:.4} (best top-1 {:.2}% at epoch {})",
        summary.model,
        summary.variant,
        summary.epochs,
        100.0 * summary.val_top1,
        100.0 * summary.val_top5,
        summary.val_loss,
        100.0 * summary.best_val_top1.0,
        summary.best_val_top1.1
    );
    println!(
        "{} parameters ({} in convolutions), {:.2} M MACs per image (paper count); {:.1} s per epoch, {:.0} images/s on {} thread(s)",
        summary.params,
        summary.conv_params,
        summary.macs_paper as f64 / 1e6,
        summary.seconds_per_epoch,
        summary.images_per_second,
        summary.threads
    );
    println!(
        "run directory {}: metrics.csv, metrics.json, summary.json, curves.png/svg, model.bpk",
        run_dir.display()
    );
}

/// Runs `versatile train`: under mpirun (in a build with the `mpi` feature) as one rank
/// of a data-parallel run.
pub fn run(args: &TrainArgs) -> Result<()> {
    #[cfg(feature = "mpi")]
    if versatile::train::launched_by_mpirun() {
        return run_mpi(args);
    }
    train(args, None)
}

/// `versatile train` as one rank of `mpirun -np N`: errors end every rank, naming this
/// one.
#[cfg(feature = "mpi")]
fn run_mpi(args: &TrainArgs) -> Result<()> {
    use std::time::Duration;
    use versatile::train::MpiGroup;
    if !(args.collective_timeout.is_finite() && args.collective_timeout >= 0.0) {
        return Err(UsageError::from_display(
            "--collective-timeout must be a number of seconds, 0 or more",
        ));
    }
    let timeout =
        (args.collective_timeout > 0.0).then(|| Duration::from_secs_f64(args.collective_timeout));
    let group = Arc::new(
        MpiGroup::init(timeout).ok_or_else(|| anyhow::anyhow!("MPI is initialized already"))?,
    );
    let mut args = args.clone();
    if group.size() > 1 && args.settings.threads.is_none() {
        // The cores of the host, shared among its ranks.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        args.settings.threads = Some((cores / group.local_size()).max(1));
    }
    let shared: Arc<dyn Collective> = group.clone();
    match train(&args, Some(shared)) {
        Ok(()) => Ok(()),
        Err(err) => {
            let code = if err.downcast_ref::<UsageError>().is_some() {
                2
            } else {
                1
            };
            group.abort(&format!("{err:#}"), code)
        }
    }
}

/// Trains (or benches) alone or as one rank of `group`.
fn train(args: &TrainArgs, group: Option<Arc<dyn Collective>>) -> Result<()> {
    let root = group.as_ref().is_none_or(|g| g.rank() == 0);
    let trainer = match &args.resume {
        Some(dir) => {
            if has_other_flags(&args.settings) {
                return Err(UsageError::from_display(
                    "--resume keeps the run's settings; only --epochs, --threads, --loader-threads, --checkpoint-every and --micro-batches may change",
                ));
            }
            let overrides = ResumeOverrides {
                epochs: args.settings.epochs,
                threads: args.settings.threads,
                loader_threads: args.settings.loader_threads,
                checkpoint_every: args.settings.checkpoint_every,
                micro_batches: args.settings.micro_batches,
            };
            Trainer::resume_with(dir, overrides).map_err(train_error)?
        }
        None => {
            let config = build_config(args)?;
            if let Some(steps) = args.bench_steps {
                return bench(config, steps, args.json, group);
            }
            Trainer::new(config).map_err(train_error)?
        }
    };
    let mut trainer = match group {
        Some(group) => trainer.distributed(group).map_err(train_error)?,
        None => trainer,
    };
    let run_dir = trainer.run_dir().to_path_buf();
    if root {
        append_command(&run_dir)?;
    }
    let label = trainer.state().model.variant.to_string();
    let stop = stop_flag();
    let mut observer: Box<dyn Observer> = if root {
        Box::new(ProgressBars::new(label))
    } else {
        Box::new(Silent)
    };
    let outcome = trainer.run(observer.as_mut(), &stop).map_err(train_error)?;
    if !root {
        return Ok(());
    }
    plot::write_run_plots(&run_dir).context("writing the learning curves")?;
    match outcome {
        Outcome::Finished(summary) => print_summary(&run_dir, &summary),
        Outcome::Stopped { .. } => {
            println!(
                "continue with: versatile train --resume {}",
                run_dir.display()
            );
        }
    }
    Ok(())
}

fn has_other_flags(flags: &TrainFlags) -> bool {
    let TrainFlags {
        model,
        variant,
        data,
        kind,
        train_per_class,
        test_per_class,
        no_augment,
        loader_threads: _,
        epochs: _,
        batch_size,
        eval_batch_size,
        optimizer,
        lr,
        momentum,
        nesterov,
        weight_decay,
        schedule,
        step_epochs,
        gamma,
        min_lr,
        warmup_epochs,
        seed,
        threads: _,
        checkpoint_every: _,
        micro_batches: _,
        output,
        device,
    } = flags;
    model.is_some()
        || variant.is_some()
        || data.is_some()
        || kind.is_some()
        || train_per_class.is_some()
        || test_per_class.is_some()
        || *no_augment
        || batch_size.is_some()
        || eval_batch_size.is_some()
        || optimizer.is_some()
        || lr.is_some()
        || momentum.is_some()
        || nesterov.is_some()
        || weight_decay.is_some()
        || schedule.is_some()
        || step_epochs.is_some()
        || gamma.is_some()
        || min_lr.is_some()
        || warmup_epochs.is_some()
        || seed.is_some()
        || output.is_some()
        || device.is_some()
}

/// Appends the command line to `RUN_DIR/commands.txt` (one line per start or resume).
fn append_command(run_dir: &Path) -> Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let line: Vec<String> = std::env::args().collect();
    let path = run_dir.join("commands.txt");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(file, "{}", line.join(" ")).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn bench(
    config: TrainConfig,
    steps: usize,
    json: bool,
    group: Option<Arc<dyn Collective>>,
) -> Result<()> {
    if steps == 0 {
        return Err(UsageError::from_display("--bench-steps must be at least 1"));
    }
    let root = group.as_ref().is_none_or(|g| g.rank() == 0);
    let mut trainer = Trainer::new(config).map_err(train_error)?;
    if let Some(group) = group {
        trainer = trainer.distributed(group).map_err(train_error)?;
    }
    let model = trainer.state().model.clone();
    let mark = memory::mark();
    let report = trainer.bench(3, steps).map_err(train_error)?;
    let used = mark.used();
    if !root {
        return Ok(());
    }
    if json {
        let mut value = serde_json::to_value(&report)?;
        value["model"] = model.name().into();
        value["variant"] = model.variant.to_string().into();
        value["memory"] = serde_json::to_value(used)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let step_ms = 1e3 * report.batch_size as f64 / report.images_per_second;
    println!(
        "{} ({}), batch {}, {} thread(s): {:.0} images/s ({:.1} ms per step over {} steps)",
        model.name(),
        model.variant,
        report.batch_size,
        report.threads,
        report.images_per_second,
        step_ms,
        report.steps
    );
    println!(
        "  per step: data wait {:.1} ms, forward + loss {:.1} ms, backward {:.1} ms, optimizer {:.1} ms, metrics {:.1} ms",
        report.data_ms, report.forward_ms, report.backward_ms, report.optimizer_ms, report.metrics_ms
    );
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    print!(
        "  memory: heap peak of a step {:.1} MiB above the model and data (optimizer state included)",
        mib(used.heap_peak_bytes as u64)
    );
    match used.rss_growth_bytes.zip(used.rss_peak_bytes) {
        Some((growth, peak)) => println!(
            "; resident set grew by {:.1} MiB (peak {:.1} MiB)",
            mib(growth),
            mib(peak)
        ),
        None => println!(),
    }
    if report.ranks > 1 || report.micro_batches > 1 {
        println!(
            "  {} rank(s) x {} micro-batch(es); per step: metrics exchange (waiting for the slowest rank) {:.1} ms, gradient all-reduce {:.1} ms ({} bytes per rank)",
            report.ranks,
            report.micro_batches,
            report.comm_wait_ms,
            report.allreduce_ms,
            report.allreduce_bytes
        );
    }
    Ok(())
}
