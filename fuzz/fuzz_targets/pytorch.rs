//! PyTorch state dicts (`torch.save` zip archives and legacy pickles): inspected and
//! imported into the small model.
#![no_main]

use burn::tensor::Device;
use libfuzzer_sys::fuzz_target;
use versatile::checkpoint::import::import_state_dict;
use versatile::checkpoint::inspect;

fuzz_target!(|data: &[u8]| {
    let path = versatile_fuzz::write("state_dict.pth", data);
    let _ = inspect(&path);
    let _ = import_state_dict(&path, &versatile_fuzz::small_model(), &Device::flex());
});
