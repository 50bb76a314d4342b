//! What the end-to-end tests of the `versatile` binary share: running it, reading its
//! output, scratch directories.

// Each test target uses its own subset.
#![allow(dead_code, unused_imports)]

#[path = "../../../tests/support/scratch.rs"]
mod scratch;

#[path = "../../../tests/support/png.rs"]
pub mod png;

pub use scratch::scratch;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `versatile ARGS` in the current directory.
pub fn versatile(args: &[&str]) -> Output {
    versatile_in(args, Path::new("."))
}

/// Runs `versatile ARGS` in `cwd`.
pub fn versatile_in(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_versatile"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run versatile")
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = versatile(args);
    assert!(
        out.status.success(),
        "versatile {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs a command that must succeed and print one JSON object.
pub fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("one JSON object")
}

/// Runs a command that must fail with `code`; returns its stderr.
pub fn fails(args: &[&str], code: i32) -> String {
    let out = versatile(args);
    assert_eq!(out.status.code(), Some(code), "versatile {args:?}: {out:?}");
    text(&out.stderr)
}

/// A file of the repository, by its path from the repository root.
/// The model arguments of the authors' small network
/// (`tests/data/torch/small_vgg_authors_layout.pth`: 1x28x28 inputs, 10 classes).
pub const AUTHORS_MODEL: [&str; 8] = [
    "--model",
    "vgg_fc6:64:16-M-32-M",
    "--variant",
    "spatial+channel:max_kernel=3",
    "--in-channels",
    "1",
    "--classes",
    "10",
];

pub fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Runs `versatile ARGS` in `cwd` with its address space limited to `limit_mib` MiB
/// (`ulimit -v`): an allocation beyond it fails, so a command that would allocate on a
/// file's say-so aborts (a signal, no exit code) instead of being served.
pub fn versatile_limited(args: &[&str], cwd: &Path, limit_mib: u64) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("ulimit -v \"$1\" && shift && exec \"$@\"")
        .arg("sh")
        .arg((limit_mib * 1024).to_string())
        .arg(env!("CARGO_BIN_EXE_versatile"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run versatile under sh")
}
