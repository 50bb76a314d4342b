//! Helpers shared by the integration tests (checkpoints, exports, data).

#![allow(dead_code, unused_imports)]

pub mod png;
mod scratch;

pub use scratch::{scratch, Scratch};

use burn::store::{bridge, ModuleSnapshot};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use safetensors::SafeTensors;
use versatile::models::{Model, ModelConfig};

/// The small network in the authors' layout (`tests/data/torch/README.md`).
pub const AUTHORS_PTH: &str = "tests/data/torch/small_vgg_authors_layout.pth";
/// Its input and the logits it gives.
pub const AUTHORS_IO: &str = "tests/data/torch/small_vgg_authors_layout.io.safetensors";

/// That network in the zoo: VConv2d 1->16 (spatial), 16->32 (delta 1, g 1), fc6
/// 32->64 7x7 (spatial), Linear 64->64, Linear 64->10, on 1x28x28 images.
pub fn authors_small_vgg() -> ModelConfig {
    ModelConfig::parse("vgg_fc6:64:16-M-32-M", "spatial+channel:max_kernel=3")
        .unwrap()
        .with_in_channels(1)
        .with_num_classes(10)
}

/// The recorded input `x` [2, 1, 28, 28] and `logits` [2, 10].
pub fn authors_io(device: &Device) -> (Tensor<4>, Vec<f32>) {
    let bytes = std::fs::read(AUTHORS_IO).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let read = |name: &str| {
        let view = file.tensor(name).unwrap();
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (values, view.shape().to_vec())
    };
    let (x, shape) = read("x");
    assert_eq!(shape, [2, 1, 28, 28]);
    let (logits, shape) = read("logits");
    assert_eq!(shape, [2, 10]);
    let x = Tensor::from_data(TensorData::new(x, [2, 1, 28, 28]), device);
    (x, logits)
}

/// The model `name` under `variant`.
pub fn config(name: &str, variant: &str) -> ModelConfig {
    ModelConfig::parse(name, variant).unwrap_or_else(|err| panic!("{name} {variant}: {err}"))
}

/// A model whose every tensor, batch-norm statistics included, holds deterministic
/// pseudo-random values (variances positive, weights scaled by their fan-in), so a
/// swapped, skipped or mistranslated tensor changes the outputs.
pub fn random_model(config: &ModelConfig, device: &Device) -> Model {
    let mut model = config.init(device).unwrap();
    let tensors = model
        .collect(None, None, false)
        .into_iter()
        .enumerate()
        .map(|(k, t)| {
            let n: usize = t.shape.iter().product();
            let positive = t.name.ends_with("running_var");
            let scale = if t.shape.len() >= 2 {
                1.5 / (t.shape[1..].iter().product::<usize>() as f32).sqrt()
            } else {
                0.5
            };
            let values: Vec<f32> = (0..n)
                .map(|i| {
                    let u = ((i * 2_654_435_761 + k * 97) % 10_007) as f32 / 10_007.0;
                    if positive {
                        0.5 + u
                    } else {
                        scale * (2.0 * u - 1.0)
                    }
                })
                .collect();
            bridge::from_data(
                TensorData::new(values, t.shape.clone()),
                t.name.clone(),
                None,
            )
        })
        .collect();
    let result = model.apply(tensors, None, None, false);
    assert!(result.errors.is_empty() && result.missing.is_empty());
    model
}

/// A random batch `[batch, in_channels, side, side]`.
pub fn input(config: &ModelConfig, batch: usize, side: usize, device: &Device) -> Tensor<4> {
    Tensor::random(
        [batch, config.in_channels, side, side],
        Distribution::Normal(0.0, 1.0),
        device,
    )
}

/// A tensor's values.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// `max |a - b| / max |b|`.
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    diff / scale.max(1e-30)
}
