//! safetensors checkpoints: inspected, loaded, and imported as PyTorch-convention
//! weights into the small model.
#![no_main]

use burn::tensor::Device;
use libfuzzer_sys::fuzz_target;
use versatile::checkpoint::import::import_state_dict;
use versatile::checkpoint::{inspect, load_checkpoint};

fuzz_target!(|data: &[u8]| {
    let path = versatile_fuzz::write("checkpoint.safetensors", data);
    let device = Device::flex();
    let _ = inspect(&path);
    let _ = load_checkpoint(&path, &device);
    let _ = import_state_dict(&path, &versatile_fuzz::small_model(), &device);
});
