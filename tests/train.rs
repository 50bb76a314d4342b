//! The training loop on real Fashion-MNIST images (the shipped sample): learning, exact
//! resume, NaN handling, configuration files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use tempfile::TempDir;
use versatile::data::Position;
use versatile::models::{ImageClassifier, Model};
use versatile::train::{
    checkpoint, EpochMetrics, Observer, Outcome, ScheduleKind, Silent, StepProgress, TrainConfig,
    TrainError, Trainer,
};

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-sample")
}

/// A small run on the shipped sample: `per_class` training images of each class.
fn small_config(dir: &Path, variant: &str, per_class: usize, batch: usize) -> TrainConfig {
    let mut config = TrainConfig {
        variant: variant.into(),
        epochs: 2,
        batch_size: batch,
        eval_batch_size: 100,
        output: dir.to_path_buf(),
        seed: 7,
        ..TrainConfig::default()
    };
    config.data.path = sample();
    config.data.train_per_class = Some(per_class);
    config.data.test_per_class = Some(5);
    config.optimizer.lr = 0.05;
    config
}

/// Every float parameter of a model, in module order.
fn weights(model: &Model) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data();
            self.0
                .extend(data.try_to_vec::<f32>().expect("f32 parameters"));
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

fn finished(outcome: Outcome) -> versatile::train::Summary {
    match outcome {
        Outcome::Finished(summary) => summary,
        other => panic!("expected a finished run, got {other:?}"),
    }
}

#[test]
fn loss_decreases_on_real_fashion_mnist() {
    let dir = TempDir::new().unwrap();
    // 100 images (10 per class), 4 steps per epoch, no augmentation: the mean training
    // loss of the 4th epoch is well below the first's (ln 10 = 2.30 at the start).
    let mut config = small_config(dir.path(), "spatial", 10, 25);
    config.epochs = 4;
    config.data.augment = false;
    let mut trainer = Trainer::new(config).unwrap();
    let summary = finished(trainer.run(&mut Silent, &AtomicBool::new(false)).unwrap());
    let history = &trainer.state().history;
    assert_eq!(history.len(), 4);
    let (first, last) = (history[0].train_loss, history[3].train_loss);
    assert!(first > 1.9, "first epoch loss {first}");
    assert!(last < 0.8 * first, "loss went {first} -> {last}");
    assert!(history[3].train_top1 > history[0].train_top1);
    assert_eq!(summary.epochs, 4);
    // The run directory has the metrics, the final model and its configuration.
    for file in [
        "metrics.csv",
        "metrics.json",
        "summary.json",
        "model.bpk",
        "config.toml",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    // The final model is a checkpoint that describes itself: the model, and the
    // evaluation transform of 28x28 grey images as its preprocessing.
    let saved =
        versatile::checkpoint::load_checkpoint(dir.path().join("model.bpk"), &Device::flex())
            .unwrap();
    assert_eq!(&saved.meta.config, trainer.model().config());
    let preprocess = saved.meta.preprocess();
    assert_eq!(preprocess.input_size, [28, 28]);
    assert_eq!((preprocess.mean.len(), preprocess.std.len()), (1, 1));
    // ... and the sample's class names (data/fashion-mnist-sample/classes.txt), for predict.
    let names = saved
        .meta
        .class_names
        .expect("class names from classes.txt");
    assert_eq!((names.len(), names[9].as_str()), (10, "Ankle boot"));
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.starts_with("epoch,train_loss,train_top1,train_top5,val_loss,val_top1,val_top5,lr"));
}

/// Raises the stop flag after batch `at.1` of epoch `at.0` has trained, and notes which
/// checkpoint is the latest after every batch.
struct StopAt {
    at: (usize, usize),
    flag: &'static AtomicBool,
    run_dir: PathBuf,
    latest: Vec<Option<String>>,
}

impl StopAt {
    fn new(at: (usize, usize), flag: &'static AtomicBool, run_dir: &Path) -> Self {
        StopAt {
            at,
            flag,
            run_dir: run_dir.to_path_buf(),
            latest: Vec::new(),
        }
    }
}

impl Observer for StopAt {
    fn batch_done(&mut self, p: &StepProgress) {
        let latest = checkpoint::latest_checkpoint(&self.run_dir).ok();
        self.latest
            .push(latest.map(|dir| dir.file_name().unwrap().to_string_lossy().into_owned()));
        if (p.epoch, p.batch) == self.at {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

/// The spatial run of 2 epochs of 3 steps with augmentation (seeded per sample) the
/// resume tests stop and continue, trained straight through.
fn straight_run(dir: &Path) -> Trainer {
    let mut straight = Trainer::new(small_config(dir, "spatial", 9, 30)).unwrap();
    finished(straight.run(&mut Silent, &AtomicBool::new(false)).unwrap());
    straight
}

/// Runs `config` with `observer` until it stops, expecting `next` as the position it
/// stopped at, then continues it in a fresh trainer to the end; returns the checkpoint
/// written at the stop and the resumed trainer.
fn stop_and_resume(
    config: TrainConfig,
    observer: &mut StopAt,
    next: Position,
) -> (PathBuf, Trainer) {
    let dir = config.output.clone();
    let mut first = Trainer::new(config).unwrap();
    let flag = observer.flag;
    let checkpoint = match first.run(observer, flag).unwrap() {
        Outcome::Stopped {
            next: at,
            checkpoint,
        } => {
            assert_eq!(at, next);
            checkpoint
        }
        other => panic!("expected a stop, got {other:?}"),
    };
    drop(first);
    let mut resumed = Trainer::resume(&dir, None).unwrap();
    assert_eq!(resumed.state().next, next);
    finished(resumed.run(&mut Silent, &AtomicBool::new(false)).unwrap());
    (checkpoint, resumed)
}

/// Two runs ended with the same weights, metrics and step count.
fn assert_same_run(straight: &Trainer, resumed: &Trainer) {
    let (a, b) = (weights(straight.model()), weights(resumed.model()));
    assert_eq!(a.len(), b.len());
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert_eq!(max_diff, 0.0, "weights differ by up to {max_diff}");
    let strip = |h: &[EpochMetrics]| -> Vec<(usize, f64, f64, f64, f64)> {
        h.iter()
            .map(|m| (m.epoch, m.train_loss, m.train_top1, m.val_loss, m.val_top1))
            .collect()
    };
    assert_eq!(
        strip(&straight.state().history),
        strip(&resumed.state().history)
    );
    assert_eq!(straight.state().global_step, resumed.state().global_step);
}

#[test]
fn a_run_is_bit_identical_for_a_given_thread_count() {
    // Each thread count in a pool of its own (not the process-wide one): the same run
    // twice gives the same weights, bit for bit, at 1, 2, 3, 8 and 16 threads.
    for threads in [1, 2, 3, 8, 16] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let run = || {
            let dir = TempDir::new().unwrap();
            let mut config = small_config(dir.path(), "spatial+channel", 4, 20);
            config.epochs = 1;
            pool.install(|| {
                let mut trainer = Trainer::new(config).unwrap();
                finished(trainer.run(&mut Silent, &AtomicBool::new(false)).unwrap());
                weights(trainer.model())
            })
        };
        let bits = |w: Vec<f32>| w.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let (a, b) = (bits(run()), bits(run()));
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(
            differing, 0,
            "{threads} threads: {differing} weights differ"
        );
    }
}

#[test]
fn resume_continues_exactly_where_the_run_stopped() {
    let straight_dir = TempDir::new().unwrap();
    let resumed_dir = TempDir::new().unwrap();
    let straight = straight_run(straight_dir.path());
    // Stopped in the middle of epoch 2 (after its first step), then resumed from the
    // checkpoint in a fresh trainer.
    static STOP: AtomicBool = AtomicBool::new(false);
    let config = small_config(resumed_dir.path(), "spatial", 9, 30);
    let mut observer = StopAt::new((1, 0), &STOP, resumed_dir.path());
    let (_, resumed) = stop_and_resume(config, &mut observer, Position::new(1, 1));
    assert_same_run(&straight, &resumed);
}

#[test]
fn a_stop_after_an_epochs_last_step_waits_for_its_evaluation() {
    let straight_dir = TempDir::new().unwrap();
    let resumed_dir = TempDir::new().unwrap();
    let straight = straight_run(straight_dir.path());
    // Stopped after the last step of epoch 1: the epoch is evaluated and its metrics
    // kept before the run stops at the start of epoch 2.
    static STOP: AtomicBool = AtomicBool::new(false);
    let config = small_config(resumed_dir.path(), "spatial", 9, 30);
    let mut observer = StopAt::new((0, 2), &STOP, resumed_dir.path());
    let (_, resumed) = stop_and_resume(config, &mut observer, Position::epoch_start(1));
    assert_same_run(&straight, &resumed);
}

#[test]
fn checkpoints_every_n_steps_do_not_change_the_run() {
    let straight_dir = TempDir::new().unwrap();
    let resumed_dir = TempDir::new().unwrap();
    let straight = straight_run(straight_dir.path());
    // A checkpoint every 2 steps (and at each epoch's end, 3 steps), stopped after step 4,
    // which a periodic checkpoint has just saved: the stop saves that step again under
    // another name rather than over the latest checkpoint.
    static STOP: AtomicBool = AtomicBool::new(false);
    let mut config = small_config(resumed_dir.path(), "spatial", 9, 30);
    config.checkpoint_every = 2;
    let mut observer = StopAt::new((1, 0), &STOP, resumed_dir.path());
    let (stopped_at, resumed) = stop_and_resume(config, &mut observer, Position::new(1, 1));
    let step = |n: u64| Some(format!("step-{n:09}"));
    // The latest checkpoint as each of steps 1 to 4 finished (before that step's own).
    assert_eq!(observer.latest, [None, None, step(2), step(3)]);
    assert_eq!(
        stopped_at.file_name().unwrap().to_string_lossy(),
        "step-000000004-1"
    );
    assert_same_run(&straight, &resumed);
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = TempDir::new().unwrap();
    // A sane first epoch, then a learning rate of 0.05 * 1e30: the weights blow up.
    let mut config = small_config(dir.path(), "dense", 6, 30);
    config.epochs = 3;
    config.schedule.kind = ScheduleKind::Step;
    config.schedule.step_epochs = 1;
    config.schedule.gamma = 1e30;
    let mut trainer = Trainer::new(config).unwrap();
    let err = trainer
        .run(&mut Silent, &AtomicBool::new(false))
        .unwrap_err();
    let TrainError::NonFinite { epoch, lr, .. } = &err else {
        panic!("expected a non-finite loss error, got {err}");
    };
    assert!(*epoch >= 1, "stopped in epoch {epoch}");
    assert!(*lr > 1e20);
    let message = err.to_string();
    assert!(message.contains("last good checkpoint"), "{message}");
    // The checkpoint of the end of epoch 1 is still the latest, and it resumes.
    let metrics = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 1 + epoch, "{metrics}");
    let resumed = Trainer::resume(dir.path(), None).unwrap();
    assert_eq!(resumed.state().next, Position::epoch_start(*epoch));
    assert!(weights(resumed.model()).iter().all(|w| w.is_finite()));
}

#[test]
fn toml_config_parses_and_bad_settings_are_named() {
    let text = r#"
        model = "vgg_small"
        variant = "spatial+channel:delta=2"
        epochs = 12
        seed = 3

        [data]
        path = "/data/fmnist"
        train_per_class = 100

        [optimizer]
        kind = "adamw"
        lr = 1e-3
        weight_decay = 0.05

        [schedule]
        kind = "step"
        step_epochs = 4
        gamma = 0.5
        warmup_epochs = 1
    "#;
    let config = TrainConfig::from_toml_str(text, "run.toml").unwrap();
    config.validate().unwrap();
    assert_eq!(config.variant, "spatial+channel:delta=2");
    assert_eq!(config.epochs, 12);
    assert_eq!(config.data.train_per_class, Some(100));
    assert_eq!(config.optimizer.lr, 1e-3);
    // Unset keys keep PyTorch's defaults.
    assert_eq!(config.optimizer.eps, 1e-8);
    assert_eq!(config.optimizer.betas, [0.9, 0.999]);
    assert_eq!(config.schedule.step_epochs, 4);
    assert_eq!(config.batch_size, 128);
    // It round-trips through the run directory's config.toml.
    assert_eq!(
        TrainConfig::from_toml_str(&config.to_toml(), "x").unwrap(),
        config
    );

    // The shipped recipe file (RESULTS.md) is valid.
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/fashion-mnist-vgg_small.toml");
    let recipe = TrainConfig::from_toml_file(&shipped).unwrap();
    recipe.validate().unwrap();
    assert_eq!(
        (
            recipe.epochs,
            recipe.optimizer.lr,
            recipe.schedule.warmup_epochs
        ),
        (12, 0.1, 1)
    );

    // A file far longer than any configuration is refused before it is parsed.
    let dir = TempDir::new().unwrap();
    let long = dir.path().join("long.toml");
    std::fs::write(
        &long,
        format!("epochs = 3\n{}", "# comment\n".repeat(120_000)),
    )
    .unwrap();
    let err = TrainConfig::from_toml_file(&long).unwrap_err();
    assert!(matches!(err, TrainError::ConfigFile { .. }), "{err}");
    assert!(
        err.to_string().contains("longer than 1048576 bytes"),
        "{err}"
    );

    // Syntax, unknown keys and wrong types: the file and the key are named.
    for (bad, needle) in [
        ("epochs = ", "run.toml"),
        ("epoch = 3", "epoch"),
        ("[optimizer]\nlearning_rate = 0.1", "learning_rate"),
        ("batch_size = \"big\"", "batch_size"),
        ("[optimizer]\nkind = \"rmsprop\"", "rmsprop"),
    ] {
        let err = TrainConfig::from_toml_str(bad, "run.toml").unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, TrainError::ConfigFile { .. }), "{message}");
        assert!(message.contains(needle), "{bad:?}: {message}");
    }

    // Settings that parse but cannot work.
    let check = |edit: &dyn Fn(&mut TrainConfig), field: &str| {
        let mut config = TrainConfig::default();
        edit(&mut config);
        match config.validate() {
            Err(TrainError::InvalidConfig { field: got, .. }) => assert_eq!(got, field),
            other => panic!("{field}: expected an invalid-config error, got {other:?}"),
        }
    };
    check(&|c| c.epochs = 0, "epochs");
    check(&|c| c.batch_size = 0, "batch_size");
    check(&|c| c.model = "vgg_tiny".into(), "model");
    check(&|c| c.variant = "sparse".into(), "variant");
    check(&|c| c.optimizer.lr = f64::NAN, "optimizer.lr");
    check(&|c| c.optimizer.lr = -0.1, "optimizer.lr");
    check(&|c| c.optimizer.momentum = 1.5, "optimizer.momentum");
    check(
        &|c| {
            c.optimizer.momentum = 0.0;
            c.optimizer.nesterov = true;
        },
        "optimizer.nesterov",
    );
    check(&|c| c.schedule.warmup_epochs = 30, "schedule.warmup_epochs");
    check(&|c| c.data.kind = Some("jpeg".into()), "data.kind");
    check(&|c| c.threads = 1 << 30, "threads");
    check(&|c| c.data.loader_threads = 1 << 30, "data.loader_threads");
    check(&|c| c.model = "vgg:100000-M".into(), "model");
    // A learning rate above 1 is fine (burn's own cosine scheduler refuses it).
    let mut config = TrainConfig::default();
    config.optimizer.lr = 2.0;
    config.validate().unwrap();
}

#[test]
fn fresh_run_refuses_a_directory_holding_a_run_and_resume_needs_one() {
    let dir = TempDir::new().unwrap();
    let mut config = small_config(dir.path(), "dense", 3, 30);
    config.epochs = 1;
    finished(
        Trainer::new(config.clone())
            .unwrap()
            .run(&mut Silent, &AtomicBool::new(false))
            .unwrap(),
    );
    let err = Trainer::new(config).unwrap_err();
    assert!(
        matches!(
            err,
            TrainError::InvalidConfig {
                field: "output",
                ..
            }
        ),
        "{err}"
    );
    let empty = TempDir::new().unwrap();
    let err = Trainer::resume(empty.path(), None).unwrap_err();
    assert!(matches!(err, TrainError::Checkpoint { .. }), "{err}");
}

#[test]
fn micro_batches_accumulate_to_the_whole_batch_update() {
    // LeNet-5 has no batch norm (and no dropout), so a batch in 4 micro-batches with
    // accumulated gradients is the same update as the whole batch, up to the order of
    // floating-point sums. 100 images in batches of 30: the last batch (10) splits
    // unevenly, and micro-batches are weighted by their size.
    let run = |micro: usize| {
        let dir = TempDir::new().unwrap();
        let mut config = small_config(dir.path(), "dense", 10, 30);
        config.model = "lenet5".into();
        config.epochs = 1;
        config.micro_batches = micro;
        let mut trainer = Trainer::new(config).unwrap();
        finished(trainer.run(&mut Silent, &AtomicBool::new(false)).unwrap());
        (
            weights(trainer.model()),
            trainer.state().history[0].train_loss,
        )
    };
    let (whole, whole_loss) = run(1);
    let (micro, micro_loss) = run(4);
    assert_eq!(whole.len(), micro.len());
    let worst = whole
        .iter()
        .zip(&micro)
        .map(|(a, b)| (a - b).abs() / (a.abs().max(b.abs()) + 1e-3))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "weights differ by {worst}");
    assert!(
        whole != micro,
        "4 micro-batches summed in another order, yet bit-identical"
    );
    assert!((whole_loss - micro_loss).abs() < 1e-4);

    // More micro-batches than images in a batch is a configuration error.
    let dir = TempDir::new().unwrap();
    let mut config = small_config(dir.path(), "dense", 10, 30);
    config.micro_batches = 31;
    assert!(matches!(
        Trainer::new(config),
        Err(TrainError::InvalidConfig {
            field: "micro_batches",
            ..
        })
    ));
}
