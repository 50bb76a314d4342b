//! Data-parallel training under `mpirun` (2 ranks over TCP) against one process: the
//! same weights as one process accumulating the same micro-batches, resuming with
//! another number of ranks, and the faults (a rank that dies, a rank that hangs, an
//! error on a rank). Needs OpenMPI's `mpirun` (the cargo feature `mpi`).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use burn::tensor::Device;
use common::{repo_file, scratch, text};
use versatile::train::distributed::{flatten, FAULT_VARIABLE};
use versatile::train::load_trained_model;

/// A tiny run: 200 training images in 7 batches of 32 (the last one of 8), 100 test
/// images, one thread per process.
fn run_args(output: &str) -> Vec<String> {
    let data = repo_file("data/fashion-mnist-sample");
    [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--train-per-class",
        "20",
        "--test-per-class",
        "10",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--eval-batch-size",
        "50",
        "--threads",
        "1",
        "--output",
        output,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `mpirun -np 2 versatile ARGS` over TCP in `cwd`, with `env` set.
///
/// Each run keeps its session directory under `cwd`: by default every `mpirun` of the
/// user shares `/tmp/ompi.HOST.UID`, which one run removes when it ends while another,
/// started beside it by a parallel test, is creating its own inside it ("mkdir ...
/// File exists", and that run fails in `orte_init`).
fn mpirun(args: &[String], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let session = cwd.join("ompi-session");
    std::fs::create_dir_all(&session).expect("create the MPI session directory");
    Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "2",
            "--mca",
            "btl",
            "tcp,self",
            "--mca",
            "pml",
            "ob1",
            "--mca",
            "orte_tmpdir_base",
        ])
        .arg(&session)
        .arg(env!("CARGO_BIN_EXE_versatile"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .output()
        .expect("run mpirun (OpenMPI: apt-get install openmpi-bin libopenmpi-dev)")
}

/// `versatile ARGS` alone in `cwd`.
fn alone(args: &[String], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_versatile"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run versatile")
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The trainable parameters of a run's final model, in visit order.
fn weights(run: &Path) -> Vec<f32> {
    let (model, _) = load_trained_model(&run.join("model.bpk"), &Device::flex().autodiff())
        .expect("load the final model");
    let values = flatten(&model, true);
    assert!(!values.is_empty(), "no trainable parameters found");
    values
}

/// The largest difference between two weight vectors, relative to the larger magnitude
/// (plus a floor of 1e-3 for values near 0).
fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (x.abs().max(y.abs()) + 1e-3))
        .fold(0.0, f32::max)
}

/// Float-summation tolerance after a few SGD steps.
const TOLERANCE: f32 = 1e-4;

fn metrics(run: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("metrics.json")).expect("metrics.json");
    serde_json::from_str(&text).expect("metrics.json parses")
}

fn next_position(run: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(run.join("checkpoint.json")).expect("checkpoint.json");
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    (
        value["next"]["epoch"].as_u64().unwrap(),
        value["next"]["batch"].as_u64().unwrap(),
    )
}

#[test]
fn two_ranks_train_as_one_process_with_two_micro_batches() {
    let dir = scratch("mpi-equivalence");
    let out = mpirun(&run_args("ranks"), &dir, &[]);
    assert_ok(&out, "2 ranks");
    // Rank 0 alone reports.
    let stdout = text(&out.stdout);
    assert_eq!(stdout.matches("after 1 epochs").count(), 1, "{stdout}");

    let mut args = run_args("micro");
    args.extend(["--micro-batches".into(), "2".into()]);
    assert_ok(&alone(&args, &dir), "1 process, 2 micro-batches");
    let ranks = weights(&dir.join("ranks"));
    let micro = weights(&dir.join("micro"));
    let difference = max_difference(&ranks, &micro);
    eprintln!("largest relative weight difference: {difference}");
    assert!(difference <= TOLERANCE, "weights differ by {difference}");

    // The same images and losses were seen: the training loss of the epoch agrees.
    let (a, b) = (metrics(&dir.join("ranks")), metrics(&dir.join("micro")));
    let loss = |m: &serde_json::Value| m[0]["train_loss"].as_f64().unwrap();
    assert!((loss(&a) - loss(&b)).abs() < 1e-4, "{a} vs {b}");
    // Evaluation was split over the ranks and summed: all 100 test images counted, so
    // the accuracy is a multiple of 1%.
    let top1 = a[0]["val_top1"].as_f64().unwrap() * 100.0;
    assert!((top1 - top1.round()).abs() < 1e-9, "{top1}");

    // And the accumulation changes something against one whole batch (batch norm
    // normalises each micro-batch on its own), so the comparison above is not vacuous.
    assert_ok(&alone(&run_args("whole"), &dir), "1 process, whole batches");
    let whole = weights(&dir.join("whole"));
    assert!(max_difference(&whole, &micro) > TOLERANCE);
}

#[test]
fn a_rank_that_dies_ends_the_run_and_one_process_resumes_it() {
    let dir = scratch("mpi-dies");
    let mut args = run_args("run");
    args.extend(["--checkpoint-every".into(), "2".into()]);
    let out = mpirun(&args, &dir, &[(FAULT_VARIABLE, "exit@1:5")]);
    assert!(!out.status.success(), "the run went on without rank 1");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("rank 1"), "{stderr}");
    // Steps 1-4 were trained, the last checkpoint after step 4.
    assert_eq!(next_position(&dir.join("run")), (0, 4));

    // Resumed by one process with two micro-batches: the same data from batch 4 on,
    // and the weights of an uninterrupted run on 2 ranks.
    let resume: Vec<String> = ["train", "--resume", "run", "--micro-batches", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_ok(&alone(&resume, &dir), "resume on 1 process");
    assert_ok(
        &mpirun(&run_args("straight"), &dir, &[]),
        "2 ranks straight",
    );
    let difference = max_difference(&weights(&dir.join("run")), &weights(&dir.join("straight")));
    eprintln!("largest relative weight difference: {difference}");
    assert!(difference <= TOLERANCE, "weights differ by {difference}");
    let (a, b) = (metrics(&dir.join("run")), metrics(&dir.join("straight")));
    let loss = |m: &serde_json::Value| m[0]["train_loss"].as_f64().unwrap();
    assert!((loss(&a) - loss(&b)).abs() < 1e-4, "{a} vs {b}");
}

#[test]
fn a_rank_that_hangs_is_named_and_the_run_resumes_on_two_ranks() {
    let dir = scratch("mpi-hangs");
    let mut args = run_args("run");
    args.extend([
        "--checkpoint-every".into(),
        "3".into(),
        "--collective-timeout".into(),
        "10".into(),
    ]);
    let out = mpirun(&args, &dir, &[(FAULT_VARIABLE, "hang@1:5")]);
    assert!(!out.status.success(), "the run went on without rank 1");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("rank 0 of 2") && stderr.contains("waiting for rank 1"),
        "{stderr}"
    );
    assert_eq!(next_position(&dir.join("run")), (0, 3));

    let resume: Vec<String> = ["train", "--resume", "run", "--threads", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_ok(&mpirun(&resume, &dir, &[]), "resume on 2 ranks");
    let history = metrics(&dir.join("run"));
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
}

#[test]
fn an_error_on_the_ranks_names_them_and_ends_the_job() {
    let dir = scratch("mpi-error");
    let args: Vec<String> = ["train", "--resume", "no-such-run"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = mpirun(&args, &dir, &[]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("error: rank ")
            && stderr.contains("of 2: ")
            && stderr.contains("no-such-run"),
        "{stderr}"
    );
}

#[test]
fn bench_steps_under_two_ranks_reports_the_all_reduce() {
    let dir = scratch("mpi-bench");
    let mut args = run_args("bench");
    args.extend(["--bench-steps".into(), "2".into(), "--json".into()]);
    let out = mpirun(&args, &dir, &[]);
    assert_ok(&out, "bench on 2 ranks");
    let report: serde_json::Value =
        serde_json::from_str(&text(&out.stdout)).expect("one JSON object, from rank 0 alone");
    assert_eq!(report["ranks"], 2);
    assert_eq!(report["batch_size"], 32);
    // 4 bytes per trainable parameter and 6 step figures of 8 bytes.
    let bytes = report["allreduce_bytes"].as_u64().unwrap();
    assert_eq!((bytes - 48) % 4, 0);
    assert!(bytes > 4 * 100_000, "{report}");
}
