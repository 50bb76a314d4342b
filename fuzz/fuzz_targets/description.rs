//! The model description in a checkpoint's metadata (JSON: architecture, variant,
//! classes, input channels, class names, preprocessing), in an otherwise valid file of
//! the small model: inspected, loaded, and used for a prediction.
#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::Device;
use libfuzzer_sys::fuzz_target;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use versatile::checkpoint::predict::predict;
use versatile::checkpoint::{inspect, load_checkpoint, save_model};

/// The small model's checkpoint and a 28x28 grey image, written once.
fn base() -> &'static (Vec<u8>, PathBuf) {
    static BASE: OnceLock<(Vec<u8>, PathBuf)> = OnceLock::new();
    BASE.get_or_init(|| {
        let model = versatile_fuzz::small_model()
            .init(&Device::flex())
            .expect("a valid model");
        let path = versatile_fuzz::scratch_dir().join("base.safetensors");
        save_model(&path, &model).expect("save the base checkpoint");
        let image = versatile_fuzz::scratch_dir().join("image.png");
        image::GrayImage::from_fn(28, 28, |x, y| image::Luma([(x * 9 + y) as u8]))
            .save(&image)
            .expect("save the image");
        (std::fs::read(path).expect("read it back"), image)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(description) = std::str::from_utf8(data) else {
        return;
    };
    let (bytes, image) = base();
    let file = SafeTensors::deserialize(bytes).expect("the base file is valid");
    let (_, header) = SafeTensors::read_metadata(bytes).expect("the base file is valid");
    let mut metadata: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
    metadata.insert("versatile.model".to_string(), description.to_string());
    let tensors: Vec<(String, TensorView)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name.to_string(), view))
        .collect();
    let path = versatile_fuzz::scratch_dir().join("described.safetensors");
    safetensors::serialize_to_file(tensors, Some(metadata), &path).expect("write the file");
    let device = Device::flex();
    let _ = inspect(&path);
    if let Ok(checkpoint) = load_checkpoint(&path, &device) {
        let _ = predict(
            &checkpoint.model,
            &checkpoint.meta,
            std::slice::from_ref(image),
            3,
            &device,
        );
    }
});
