//! Classifying image files with a model: decode (PNG, JPEG), convert to grey or RGB by
//! the model's input channels, resize the shorter side, crop the centre, normalise,
//! and rank the classes by softmax probability.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::folder::decode_image;
use crate::data::{DataError, Normalize, Transform};
use crate::infer::InferencePlan;
use crate::layer::fused::is_flex;
use crate::models::{ImageClassifier, Model, ModelConfig, MAX_INPUT_SIDE};

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

    /// The transform it describes: torchvision's evaluation transform
    /// ([`Transform::resize_center_crop`]), the one `eval` applies too.
    ///
    /// # Errors
    /// [`CheckpointError::Unsupported`] for sizes of 0 or above
    /// [`MAX_IMAGE_SIDE`](crate::data::folder::MAX_IMAGE_SIDE), or a normalisation that
    /// cannot work.
    pub fn transform(&self) -> Result<Transform, CheckpointError> {
        Normalize::new(self.mean.clone(), self.std.clone())
            .and_then(|normalize| {
                Transform::resize_center_crop(self.resize, self.input_size, normalize)
            })
            .map_err(|err| CheckpointError::Unsupported(format!("preprocessing: {err}")))
    }

    /// Checks the sizes (at most [`MAX_INPUT_SIDE`], the crop within the resized image)
    /// and the normalisation against a model with `channels` input channels: what a
    /// checkpoint's description must satisfy to be loaded.
    pub fn check_sizes(&self, channels: usize) -> Result<(), CheckpointError> {
        let bad = |what: String| {
            Err(CheckpointError::Unsupported(format!(
                "preprocessing: {what}"
            )))
        };
        let [h, w] = self.input_size;
        if h == 0 || w == 0 {
            return bad(format!("input size {h}x{w} is empty"));
        }
        if h.max(w).max(self.resize) > MAX_INPUT_SIDE {
            return bad(format!(
                "input size {h}x{w} after resizing to {}: sides above {MAX_INPUT_SIDE}",
                self.resize
            ));
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
        self.transform().map(|_| ())
    }

    /// Checks the settings against a model with `channels` input channels, which
    /// images must have (1: grey, 3: RGB).
    pub fn validate(&self, channels: usize) -> Result<(), CheckpointError> {
        self.check_sizes(channels)?;
        if channels != 1 && channels != 3 {
            return Err(CheckpointError::Unsupported(format!(
                "preprocessing: images have 1 (grey) or 3 (RGB) channels, the model takes \
                 {channels}"
            )));
        }
        Ok(())
    }
}

/// Reads one image as a model input `[channels, height, width]` (row-major values):
/// decoded as grey or RGB by `channels`, then [`Preprocess::transform`].
pub fn load_image(
    path: impl AsRef<Path>,
    preprocess: &Preprocess,
    channels: usize,
) -> Result<Vec<f32>, CheckpointError> {
    let path = path.as_ref();
    preprocess.validate(channels)?;
    let image_error = |err: DataError| CheckpointError::Image {
        path: path.to_path_buf(),
        detail: match err {
            DataError::Io { source, .. } => source.to_string(),
            DataError::Decode { source, .. } => source.to_string(),
            DataError::BadHeader { reason, .. } => reason,
            other => other.to_string(),
        },
    };
    let image = decode_image(path, channels).map_err(image_error)?;
    let (_, values) = preprocess
        .transform()?
        .to_chw(image, 0)
        .map_err(image_error)?;
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

/// The softmax of one row of logits (in f64, so large logits do not overflow).
fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let exp: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|&e| (e / sum) as f32).collect()
}

/// Classifies `images` with `model`: the `top_k` most probable classes of each (on the
/// CPU through a compiled [`InferencePlan`], elsewhere through the module's forward).
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
    preprocess.validate(channels)?;
    let [h, w] = preprocess.input_size;
    let mut values = Vec::with_capacity(images.len() * channels * h * w);
    for image in images {
        values.extend(load_image(image, &preprocess, channels)?);
    }
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let shape = [images.len(), channels, h, w];
    let logits = if is_flex(device) {
        // The compiled plan (batch norm folded, fused writes) on the CPU.
        let mut plan = InferencePlan::compile(model, shape)
            .map_err(|err| CheckpointError::Unsupported(err.to_string()))?;
        plan.run(&values)
            .map_err(|err| CheckpointError::Unsupported(err.to_string()))?
            .to_vec()
    } else {
        let input = Tensor::<4>::from_data(TensorData::new(values, shape), device);
        model
            .try_forward(input)
            .map_err(|err| CheckpointError::Unsupported(err.to_string()))?
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|err| CheckpointError::Unsupported(format!("{err:?}")))?
    };
    let classes = config.num_classes;
    let probabilities: Vec<f32> = logits.chunks(classes).flat_map(softmax).collect();
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
