//! Classifying image files with a model: decode (PNG, JPEG), convert to grey or RGB by
//! the model's input channels, resize the shorter side, crop the centre, normalise,
//! and rank the classes by softmax probability.

use std::path::{Path, PathBuf};

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use image::imageops::FilterType;
use serde::{Deserialize, Serialize};

use crate::models::{ImageClassifier, Model, ModelConfig};

use super::error::CheckpointError;
use super::CheckpointMeta;

/// ImageNet's per-channel mean of RGB values in `[0, 1]` (torchvision's).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation (torchvision's).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How an image becomes a model input: resize so the shorter side is `resize`, crop
/// the centre `input_size`, scale to `[0, 1]`, subtract `mean`, divide by `std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// The model's input `[height, width]`.
    pub input_size: [usize; 2],
    /// The shorter side after resizing, before the centre crop (at least the larger
    /// side of `input_size`).
    pub resize: usize,
    /// Per-channel mean, one value per input channel.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, one value per input channel.
    pub std: Vec<f32>,
}

impl Preprocess {
    /// The default for a model: torchvision's ImageNet validation transform (resize 256,
    /// centre crop 224, ImageNet mean and deviation) for RGB models made for 224×224
    /// inputs; otherwise the model's usual input side, no crop margin, values in `[0, 1]`.
    pub fn for_config(config: &ModelConfig) -> Self {
        let side = config.arch.default_input();
        let channels = config.in_channels;
        if side == 224 && channels == 3 {
            Self {
                input_size: [224, 224],
                resize: 256,
                mean: IMAGENET_MEAN.to_vec(),
                std: IMAGENET_STD.to_vec(),
            }
        } else {
            Self {
                input_size: [side, side],
                resize: side,
                mean: vec![0.0; channels],
                std: vec![1.0; channels],
            }
        }
    }

    /// Checks the settings against a model with `channels` input channels.
    pub fn validate(&self, channels: usize) -> Result<(), CheckpointError> {
        let bad = |what: String| {
            Err(CheckpointError::Unsupported(format!(
                "preprocessing: {what}"
            )))
        };
        let [h, w] = self.input_size;
        if h == 0 || w == 0 {
            return bad(format!("input size {h}x{w} is empty"));
        }
        if self.resize < h.max(w) {
            return bad(format!(
                "resizing the shorter side to {} leaves too little for a {h}x{w} crop",
                self.resize
            ));
        }
        if self.mean.len() != channels || self.std.len() != channels {
            return bad(format!(
                "{} means and {} deviations for {channels} input channels",
                self.mean.len(),
                self.std.len()
            ));
        }
        if self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return bad(format!("deviations must be positive, got {:?}", self.std));
        }
        if channels != 1 && channels != 3 {
            return bad(format!(
                "images have 1 (grey) or 3 (RGB) channels, the model takes {channels}"
            ));
        }
        Ok(())
    }
}

/// Reads one image as a model input `[channels, height, width]` (row-major values).
pub fn load_image(
    path: impl AsRef<Path>,
    preprocess: &Preprocess,
    channels: usize,
) -> Result<Vec<f32>, CheckpointError> {
    let path = path.as_ref();
    preprocess.validate(channels)?;
    let image = image::open(path).map_err(|err| CheckpointError::Image {
        path: path.to_path_buf(),
        detail: err.to_string(),
    })?;
    let (width, height) = (image.width() as usize, image.height() as usize);
    if width == 0 || height == 0 {
        return Err(CheckpointError::Image {
            path: path.to_path_buf(),
            detail: "the image is empty".to_string(),
        });
    }
    let resize = preprocess.resize;
    let (new_w, new_h) = if width <= height {
        (resize, (height * resize + width / 2) / width)
    } else {
        ((width * resize + height / 2) / height, resize)
    };
    let resized = image.resize_exact(new_w as u32, new_h as u32, FilterType::Triangle);
    let [crop_h, crop_w] = preprocess.input_size;
    let (left, top) = ((new_w - crop_w) / 2, (new_h - crop_h) / 2);
    let cropped = resized.crop_imm(left as u32, top as u32, crop_w as u32, crop_h as u32);
    let pixels: Vec<u8> = if channels == 1 {
        cropped.to_luma8().into_raw()
    } else {
        cropped.to_rgb8().into_raw()
    };
    // Interleaved HWC bytes to planar CHW values.
    let area = crop_h * crop_w;
    let mut values = vec![0.0f32; channels * area];
    for (i, &byte) in pixels.iter().enumerate() {
        let (pixel, channel) = (i / channels, i % channels);
        let value = byte as f32 / 255.0;
        values[channel * area + pixel] =
            (value - preprocess.mean[channel]) / preprocess.std[channel];
    }
    Ok(values)
}

/// The ranked classes for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The image.
    pub image: PathBuf,
    /// The best classes, most probable first.
    pub top: Vec<ClassScore>,
}

/// One class and its probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    /// The class index (model output).
    pub class: usize,
    /// Its name, when the checkpoint carries class names.
    pub name: Option<String>,
    /// Its softmax probability.
    pub probability: f32,
}

/// Classifies `images` with `model`: the `top_k` most probable classes of each.
pub fn predict(
    model: &Model,
    meta: &CheckpointMeta,
    images: &[PathBuf],
    top_k: usize,
    device: &Device,
) -> Result<Vec<Prediction>, CheckpointError> {
    let config = model.config();
    let preprocess = meta.preprocess();
    let channels = config.in_channels;
    let [h, w] = preprocess.input_size;
    let mut values = Vec::with_capacity(images.len() * channels * h * w);
    for image in images {
        values.extend(load_image(image, &preprocess, channels)?);
    }
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let input = Tensor::<4>::from_data(
        TensorData::new(values, [images.len(), channels, h, w]),
        device,
    );
    let logits = model
        .try_forward(input)
        .map_err(|err| CheckpointError::Unsupported(err.to_string()))?;
    let probabilities = softmax(logits, 1)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|err| CheckpointError::Unsupported(format!("{err:?}")))?;
    let classes = config.num_classes;
    Ok(images
        .iter()
        .zip(probabilities.chunks(classes))
        .map(|(image, row)| {
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            Prediction {
                image: image.clone(),
                top: order
                    .into_iter()
                    .take(top_k)
                    .map(|class| ClassScore {
                        class,
                        name: meta
                            .class_names
                            .as_ref()
                            .and_then(|names| names.get(class).cloned()),
                        probability: row[class],
                    })
                    .collect(),
            }
        })
        .collect())
}
