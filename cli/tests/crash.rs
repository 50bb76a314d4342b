//! Crash safety of `versatile train`: killed (SIGKILL) at random moments and resumed, a
//! run ends bit-identical to an uninterrupted one; a checkpoint write that fails (a full
//! disk) stops it with a clear error and leaves the last checkpoint intact.
#![cfg(unix)]

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use burn::store::burn_pack;
use burn::tensor::Device;
use common::{repo_file, scratch, text, versatile_in};
use versatile::data::derive_seed;
use versatile::train::checkpoint::{load_checkpoint, POINTER};

/// `versatile train` of a small run into `output`: LeNet-5 (spatial) on 100 images of the
/// shipped sample, 10 steps an epoch, one compute thread (bit-reproducible), a checkpoint
/// after every step.
fn train_args(output: &str, epochs: usize, extra: &[&str]) -> Vec<String> {
    let sample = repo_file("data/fashion-mnist-sample");
    let mut args: Vec<String> = [
        "train",
        "--model",
        "lenet5",
        "--variant",
        "spatial",
        "--data",
        sample.to_str().unwrap(),
        "--train-per-class",
        "10",
        "--test-per-class",
        "5",
        "--batch-size",
        "10",
        "--threads",
        "1",
        "--seed",
        "7",
        "--checkpoint-every",
        "1",
        "--output",
        output,
        "--epochs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(epochs.to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_ok(args: &[String], cwd: &Path) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = versatile_in(&args, cwd);
    assert!(
        out.status.success(),
        "versatile {args:?}: {}",
        text(&out.stderr)
    );
}

/// The files of a directory, by name, with their contents.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(entry.path()).unwrap())
        })
        .collect()
}

/// Temporaries of unfinished writes in a run directory (`.NAME.tmp-PID-N`).
fn temporaries(run: &Path) -> Vec<PathBuf> {
    [run.to_path_buf(), run.join("checkpoints")]
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with('.') && name.contains(".tmp-")
        })
        .collect()
}

/// The step of the checkpoint `checkpoint.json` names (`None` before the first), after
/// loading all of it.
fn latest_step(run: &Path) -> Option<u64> {
    if !run.join(POINTER).exists() {
        return None;
    }
    let checkpoint = load_checkpoint(run, &Device::flex())
        .unwrap_or_else(|err| panic!("the latest checkpoint does not load: {err}"));
    Some(checkpoint.state.global_step)
}

/// A number in [0, 1) drawn from the seeded stream `i`.
fn uniform(seed: u64, i: u64) -> f64 {
    (derive_seed(&[seed, i]) >> 11) as f64 / (1u64 << 53) as f64
}

/// Starts `versatile ARGS` in `cwd`, its output into `log`.
fn spawn(args: &[String], cwd: &Path, log: &Path) -> std::process::Child {
    let log = File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_versatile"))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start versatile")
}

/// How a run ended: its final model's tensors and its metrics without the timings.
fn outcome(run: &Path) -> (BTreeMap<String, Vec<u8>>, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(run.join("metrics.json")).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let metrics = rows
        .into_iter()
        .map(|mut row| {
            for timing in ["train_seconds", "eval_seconds", "images_per_second"] {
                row.as_object_mut().unwrap().remove(timing);
            }
            row
        })
        .collect();
    (stored_tensors(&run.join("model.bpk")), metrics)
}

/// The tensors of a burnpack file as bytes, by name, and its metadata (the parameter ids
/// it also holds are drawn at random by each process).
fn stored_tensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let reader = burn_pack::Reader::from_file(path).unwrap();
    let mut stored: BTreeMap<String, Vec<u8>> = reader
        .metadata()
        .iter()
        .map(|(key, value)| (format!("metadata {key}"), value.as_bytes().to_vec()))
        .collect();
    for tensor in reader.into_tensors().unwrap() {
        let (name, dtype, shape, _, bytes) = tensor.into_parts().unwrap();
        let mut data = format!("{dtype:?} {shape:?} ").into_bytes();
        data.extend_from_slice(&bytes);
        stored.insert(name, data);
    }
    stored
}

#[test]
fn killed_at_random_moments_a_run_resumes_to_the_same_weights() {
    const KILLS: usize = 24;
    /// Kills of one run before it is let finish (so that every run ends).
    const KILLS_PER_RUN: usize = 8;
    const SEED: u64 = 0x4b49_4c4c;
    let dir = scratch("kill");
    let epochs = 3;
    let started = Instant::now();
    run_ok(&train_args("straight", epochs, &[]), &dir);
    let straight_time = started.elapsed();
    let straight = outcome(&dir.join("straight"));
    assert_eq!(straight.1.len(), epochs);

    // The same run, started and resumed after each kill until it finishes, and again in
    // a new directory until KILLS kills have landed. Each process is killed after a
    // delay drawn up to 60 % of the uninterrupted run's time (a resume has less to do,
    // and each run is killed a few times), so kills land anywhere: start-up, steps,
    // evaluations and checkpoint writes.
    let (mut kills, mut in_writes, mut resumes, mut runs, mut draws) = (0, 0, 0, 0, 0);
    while kills < KILLS {
        let name = format!("killed-{runs}");
        runs += 1;
        let run = dir.join(&name);
        let fresh = train_args(&name, epochs, &[]);
        let resume: Vec<String> = ["train", "--resume", &name]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut last_step = None;
        for attempt in 0.. {
            let args = if run.join(POINTER).exists() {
                resumes += 1;
                &resume
            } else {
                &fresh
            };
            if attempt == KILLS_PER_RUN {
                run_ok(args, &dir);
                break;
            }
            let log = dir.join(format!("{name}-{attempt}.log"));
            let mut child = spawn(args, &dir, &log);
            draws += 1;
            std::thread::sleep(straight_time.mul_f64(0.6 * uniform(SEED, draws)));
            child.kill().expect("send SIGKILL");
            let status: ExitStatus = child.wait().unwrap();
            if status.success() {
                break; // It finished before the kill.
            }
            assert_eq!(
                status.signal(),
                Some(9),
                "{name}, attempt {attempt} ({args:?}) failed on its own: {status}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            kills += 1;
            if !temporaries(&run).is_empty() {
                in_writes += 1;
            }
            // After every kill the latest checkpoint is complete, and not older than
            // the one before.
            let step = latest_step(&run);
            assert!(
                step >= last_step,
                "{name}: the latest checkpoint went from step {last_step:?} to {step:?}"
            );
            last_step = step;
        }
        let ended = outcome(&run);
        if ended != straight {
            // Say what differs and how each attempt ended: the scratch directory goes
            // with the panic, and this has only failed on clean CI machines.
            let tensors: Vec<&String> = straight
                .0
                .keys()
                .filter(|k| ended.0.get(*k) != straight.0.get(*k))
                .collect();
            let rows: Vec<usize> = (0..straight.1.len().max(ended.1.len()))
                .filter(|&i| straight.1.get(i) != ended.1.get(i))
                .collect();
            let mut logs = String::new();
            for attempt in 0..=KILLS_PER_RUN {
                let log = dir.join(format!("{name}-{attempt}.log"));
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let tail: Vec<&str> = text.lines().rev().take(6).collect();
                    logs += &format!("--- attempt {attempt}:\n{}\n", tail.join("\n"));
                }
            }
            panic!(
                "{name} ended unlike the uninterrupted run: tensors {tensors:?}, metrics rows \
                 {rows:?} ({:?} against {:?})\n{logs}",
                ended.1, straight.1
            );
        }
        assert!(temporaries(&run).is_empty(), "{:?}", temporaries(&run));
        let checkpoints = std::fs::read_dir(run.join("checkpoints")).unwrap().count();
        assert_eq!(checkpoints, 1, "older checkpoints are removed");
    }
    eprintln!(
        "{kills} kills in {runs} runs ({in_writes} left a write unfinished), {resumes} \
         resumes; uninterrupted run {straight_time:.2?}"
    );
}

#[test]
fn a_full_disk_stops_the_run_with_a_clear_error_and_keeps_the_last_checkpoint() {
    let dir = scratch("full-disk");
    let constant = ["--schedule", "constant"];
    run_ok(&train_args("straight", 2, &constant), &dir);
    // One epoch, then the run is extended by one under a file size limit below a model
    // file's size (a full disk as the trainer sees it: writes fail). SIGXFSZ is ignored
    // (`trap ''`, inherited across exec) so that the write returns EFBIG.
    run_ok(&train_args("run", 1, &constant), &dir);
    let run = dir.join("run");
    let latest = || {
        let pointer = std::fs::read_to_string(run.join(POINTER)).unwrap();
        let pointer: serde_json::Value = serde_json::from_str(&pointer).unwrap();
        run.join(pointer["checkpoint"].as_str().unwrap())
    };
    let kept = latest();
    let before = contents(&kept);
    assert!(
        before["model.bpk"].len() > 65_536,
        "the limit must stop a model file"
    );
    let out = Command::new("sh")
        .args([
            "-c",
            "trap '' XFSZ; exec prlimit --fsize=65536 \"$0\" \"$@\"",
        ])
        .arg(env!("CARGO_BIN_EXE_versatile"))
        .args(["train", "--resume", "run", "--epochs", "2"])
        .current_dir(&*dir)
        .output()
        .expect("run sh (prlimit is util-linux's)");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {stderr}", out.status);
    let kept_name = kept.file_name().unwrap().to_string_lossy().into_owned();
    for needle in [
        "model.bpk",
        "File too large",
        "training stopped without writing this checkpoint",
        kept_name.as_str(),
    ] {
        assert!(stderr.contains(needle), "no '{needle}' in: {stderr}");
    }
    assert_eq!(latest(), kept);
    assert!(contents(&kept) == before, "the last checkpoint changed");
    assert!(temporaries(&run).is_empty(), "{:?}", temporaries(&run));

    // With room again, the run resumes from it and ends as the uninterrupted one.
    let resume: Vec<String> = ["train", "--resume", "run", "--epochs", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    run_ok(&resume, &dir);
    let model = |run: &str| stored_tensors(&dir.join(run).join("model.bpk"));
    assert!(model("straight") == model("run"), "the final models differ");
}
