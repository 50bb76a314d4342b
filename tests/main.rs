//! The library's integration tests, one module per file of `tests/`, built as one binary
//! (`autotests = false` in `Cargo.toml`): every test binary links all of burn, so one
//! binary instead of twelve saves CI minutes of linking and a gigabyte of disk.
//!
//! Tests share the process: none of them changes process-wide state (environment
//! variables, the working directory, rayon's global pool); those that need a thread
//! count build a pool of their own, and scratch directories are unique per test. The
//! tests that need the sequence of burn's process-wide generator (`tests/train.rs`,
//! `tests/gpu.rs`) are binaries of their own.

mod common;
mod support;

mod checkpoint;
mod data;
mod dense_conv;
mod determinism;
mod export;
mod fused;
mod golden;
mod infer;
mod layer;
mod models;
mod predict;
mod torch_import;
