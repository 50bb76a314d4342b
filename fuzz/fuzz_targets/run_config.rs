//! TOML run configurations: parsed, validated, written back as TOML and read again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use versatile::train::TrainConfig;

fuzz_target!(|data: &[u8]| {
    let path = versatile_fuzz::write("run.toml", data);
    let Ok(config) = TrainConfig::from_toml_file(&path) else {
        return;
    };
    let _ = config.validate();
    let _ = config.model_config(3, 10);
    let written = config.to_toml();
    TrainConfig::from_toml_str(&written, &path).expect("what to_toml writes reads back");
});
