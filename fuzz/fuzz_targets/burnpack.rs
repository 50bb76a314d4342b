//! burnpack checkpoints (`.bpk`): inspected, then loaded.
#![no_main]

use burn::tensor::Device;
use libfuzzer_sys::fuzz_target;
use versatile::checkpoint::{inspect, load_checkpoint};

fuzz_target!(|data: &[u8]| {
    let path = versatile_fuzz::write("checkpoint.bpk", data);
    let _ = inspect(&path);
    let _ = load_checkpoint(&path, &Device::flex());
});
