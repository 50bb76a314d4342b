//! Image transforms: the standard augmentations of image classification, seeded.
//!
//! A [`Transform`] is a list of [`Step`]s applied to an 8-bit [`Image`], then a
//! [`Normalize`] that writes the result as `f32` values in CHW order. Every random draw
//! comes from a generator seeded by the `seed` given to [`Transform::apply`]; the
//! [`Loader`](super::Loader) derives that seed from (loader seed, epoch, sample index),
//! so augmentations are reproducible whatever the number of threads.
//!
//! The steps follow torchvision's definitions (parameter sampling, rounding of crop
//! offsets, zero padding); resizing is antialiased bilinear (the `image` crate's
//! triangle filter), close to but not bit-identical with PIL's.

use chacha20::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};

use super::folder::MAX_IMAGE_SIDE;
use super::{DataError, DatasetKind, Image, ImageShape};

/// One step of a [`Transform`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Step {
    /// torchvision's `RandomResizedCrop`: a crop of random area (a `scale` fraction of
    /// the image) and aspect ratio (log-uniform in `ratio`), resized to
    /// `height x width`; after 10 failed draws, a centre crop of the nearest valid ratio.
    RandomResizedCrop {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
        /// Range of the crop's area as a fraction of the image's (torchvision: 0.08..1).
        scale: (f32, f32),
        /// Range of the crop's width / height (torchvision: 3/4..4/3).
        ratio: (f32, f32),
    },
    /// torchvision's `Resize(shorter, max_size)`: scales the image so its shorter side
    /// is `shorter`, keeping the aspect ratio (the longer side is truncated), unless the
    /// longer side would exceed [`MAX_IMAGE_SIDE`]: then the longer side is that limit.
    Resize {
        /// Length of the shorter side after resizing.
        shorter: usize,
    },
    /// torchvision's `CenterCrop`: the centred `height x width` window, zero-padded where
    /// the image is smaller.
    CenterCrop {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
    /// torchvision's `RandomCrop(size, padding)` with `size` the input's own size: pad
    /// each side with `padding` zeros, then take a window of the input's size at a
    /// uniformly random offset.
    PadCrop {
        /// Zeros added on each side.
        padding: usize,
    },
    /// torchvision's `RandomHorizontalFlip(p)`: mirror left-right with `probability`.
    HorizontalFlip {
        /// Probability of flipping.
        probability: f32,
    },
}

impl Step {
    /// Whether the step draws random numbers.
    pub fn is_random(&self) -> bool {
        matches!(
            self,
            Step::RandomResizedCrop { .. } | Step::PadCrop { .. } | Step::HorizontalFlip { .. }
        )
    }

    /// Checks the parameters: sizes from 1 to [`MAX_IMAGE_SIDE`], padding at most
    /// [`MAX_IMAGE_SIDE`], ranges and probabilities that can be drawn from.
    fn validate(&self) -> Result<(), DataError> {
        let bad = |reason: String| Err(DataError::InvalidTransform(reason));
        let sizes_ok = |sizes: &[usize]| sizes.iter().all(|&s| (1..=MAX_IMAGE_SIDE).contains(&s));
        match *self {
            Step::RandomResizedCrop {
                height,
                width,
                scale,
                ratio,
            } => {
                if !sizes_ok(&[height, width]) {
                    return bad(format!(
                        "RandomResizedCrop to {height}x{width} (sides from 1 to {MAX_IMAGE_SIDE})"
                    ));
                }
                if !(scale.0 > 0.0 && scale.0 <= scale.1 && scale.1.is_finite()) {
                    return bad(format!(
                        "RandomResizedCrop scale {scale:?} (need 0 < min <= max)"
                    ));
                }
                if !(ratio.0 > 0.0 && ratio.0 <= ratio.1 && ratio.1.is_finite()) {
                    return bad(format!(
                        "RandomResizedCrop ratio {ratio:?} (need 0 < min <= max)"
                    ));
                }
            }
            Step::Resize { shorter } if !sizes_ok(&[shorter]) => {
                return bad(format!(
                    "Resize to a shorter side of {shorter} (from 1 to {MAX_IMAGE_SIDE})"
                ));
            }
            Step::CenterCrop { height, width } if !sizes_ok(&[height, width]) => {
                return bad(format!(
                    "CenterCrop to {height}x{width} (sides from 1 to {MAX_IMAGE_SIDE})"
                ));
            }
            Step::PadCrop { padding } if padding > MAX_IMAGE_SIDE => {
                return bad(format!(
                    "PadCrop padding {padding} (at most {MAX_IMAGE_SIDE})"
                ));
            }
            Step::HorizontalFlip { probability } if !(0.0..=1.0).contains(&probability) => {
                return bad(format!(
                    "HorizontalFlip probability {probability} (need 0 <= p <= 1)"
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The shape after this step for an input of `shape` (`None`: it depends on the
    /// image).
    fn output_shape(&self, shape: Option<ImageShape>, channels: usize) -> Option<ImageShape> {
        match *self {
            Step::RandomResizedCrop { height, width, .. } | Step::CenterCrop { height, width } => {
                Some(ImageShape::new(channels, height, width))
            }
            Step::Resize { shorter } => shape.map(|s| {
                let (h, w) = resized_size(s.height, s.width, shorter);
                ImageShape::new(channels, h, w)
            }),
            Step::PadCrop { .. } | Step::HorizontalFlip { .. } => shape,
        }
    }

    fn apply(&self, image: Image, rng: &mut ChaCha8Rng) -> Image {
        match *self {
            Step::RandomResizedCrop {
                height,
                width,
                scale,
                ratio,
            } => {
                let (top, left, h, w) =
                    resized_crop_params(image.height(), image.width(), scale, ratio, rng);
                resize_region(image, top, left, h, w, height, width)
            }
            Step::Resize { shorter } => {
                let (h, w) = resized_size(image.height(), image.width(), shorter);
                let (ih, iw) = (image.height(), image.width());
                resize_region(image, 0, 0, ih, iw, h, w)
            }
            Step::CenterCrop { height, width } => {
                // torchvision: int(round((size - crop) / 2)), rounding half to even;
                // negative offsets pad.
                let top = ((image.height() as f64 - height as f64) / 2.0).round_ties_even();
                let left = ((image.width() as f64 - width as f64) / 2.0).round_ties_even();
                crop_padded(&image, top as isize, left as isize, height, width)
            }
            Step::PadCrop { padding } => {
                let top = rng.random_range(0..=2 * padding) as isize - padding as isize;
                let left = rng.random_range(0..=2 * padding) as isize - padding as isize;
                crop_padded(&image, top, left, image.height(), image.width())
            }
            Step::HorizontalFlip { probability } => {
                let mut image = image;
                if rng.random::<f32>() < probability {
                    flip_horizontal(&mut image);
                }
                image
            }
        }
    }
}

/// The steps of an evaluation transform: `Resize(resize)`, `CenterCrop(crop)`.
fn resize_center_crop(resize: usize, [height, width]: [usize; 2]) -> Vec<Step> {
    vec![
        Step::Resize { shorter: resize },
        Step::CenterCrop { height, width },
    ]
}

/// torchvision's `Resize(shorter, max_size=MAX_IMAGE_SIDE)` output size:
/// `(height, width)`. The longer side is capped at [`MAX_IMAGE_SIDE`] (the shorter one
/// then shrinks in proportion), so an image of extreme aspect ratio cannot grow without
/// bound.
fn resized_size(height: usize, width: usize, shorter: usize) -> (usize, usize) {
    let (short, long) = (height.min(width) as f64, height.max(width) as f64);
    let mut new_short = shorter;
    let mut new_long = (shorter as f64 * long / short) as usize;
    if new_long > MAX_IMAGE_SIDE {
        new_short = ((MAX_IMAGE_SIDE as f64 * new_short as f64 / new_long as f64) as usize).max(1);
        new_long = MAX_IMAGE_SIDE;
    }
    if height <= width {
        (new_short, new_long)
    } else {
        (new_long, new_short)
    }
}

/// torchvision's `RandomResizedCrop.get_params`: `(top, left, height, width)`.
fn resized_crop_params(
    height: usize,
    width: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut ChaCha8Rng,
) -> (usize, usize, usize, usize) {
    let area = (height * width) as f64;
    let log_ratio = ((ratio.0 as f64).ln(), (ratio.1 as f64).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0 as f64..=scale.1 as f64);
        let aspect = rng.random_range(log_ratio.0..=log_ratio.1).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    // Fallback: the whole image, cropped to the nearest allowed aspect ratio.
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < ratio.0 as f64 {
        ((width as f64 / ratio.0 as f64).round() as usize, width)
    } else if in_ratio > ratio.1 as f64 {
        (height, (height as f64 * ratio.1 as f64).round() as usize)
    } else {
        (height, width)
    };
    let (h, w) = (h.clamp(1, height), w.clamp(1, width));
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// The `h x w` region at (`top`, `left`) of `image`, resized to `out_h x out_w`
/// (antialiased bilinear).
fn resize_region(
    image: Image,
    top: usize,
    left: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> Image {
    if (h, w) == (out_h, out_w) {
        return crop_padded(&image, top as isize, left as isize, h, w);
    }
    let (iw, ih) = (image.width() as u32, image.height() as u32);
    let (x, y, cw, ch) = (left as u32, top as u32, w as u32, h as u32);
    let (ow, oh) = (out_w as u32, out_h as u32);
    let channels = image.channels();
    let pixels = image.into_pixels();
    let resized = match channels {
        1 => {
            let buffer = GrayImage::from_raw(iw, ih, pixels).expect("sizes agree");
            let view = imageops::crop_imm(&buffer, x, y, cw, ch);
            imageops::resize(&*view, ow, oh, FilterType::Triangle).into_raw()
        }
        _ => {
            let buffer = RgbImage::from_raw(iw, ih, pixels).expect("sizes agree");
            let view = imageops::crop_imm(&buffer, x, y, cw, ch);
            imageops::resize(&*view, ow, oh, FilterType::Triangle).into_raw()
        }
    };
    Image::new(ImageShape::new(channels, out_h, out_w), resized).expect("sizes agree")
}

/// The `h x w` window whose top-left corner is at (`top`, `left`) of `image`, where
/// coordinates outside the image read zero.
fn crop_padded(image: &Image, top: isize, left: isize, h: usize, w: usize) -> Image {
    let channels = image.channels();
    let (ih, iw) = (image.height() as isize, image.width() as isize);
    let mut out = Image::zeros(ImageShape::new(channels, h, w));
    // Columns of the window that fall inside the image.
    let col_start = (-left).clamp(0, w as isize) as usize;
    let col_end = (iw - left).clamp(0, w as isize) as usize;
    if col_start >= col_end {
        return out;
    }
    let src = image.pixels();
    let dst = out.pixels_mut();
    for row in 0..h {
        let y = top + row as isize;
        if y < 0 || y >= ih {
            continue;
        }
        let x0 = (left + col_start as isize) as usize;
        let from = (y as usize * iw as usize + x0) * channels;
        let len = (col_end - col_start) * channels;
        let to = (row * w + col_start) * channels;
        dst[to..to + len].copy_from_slice(&src[from..from + len]);
    }
    out
}

fn flip_horizontal(image: &mut Image) {
    let (w, c) = (image.width(), image.channels());
    for row in image.pixels_mut().chunks_exact_mut(w * c) {
        for x in 0..w / 2 {
            for k in 0..c {
                row.swap(x * c + k, (w - 1 - x) * c + k);
            }
        }
    }
}

/// Per-channel normalisation of pixel values scaled to `[0, 1]`: `(x - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    /// Mean of each channel.
    pub mean: Vec<f32>,
    /// Standard deviation of each channel.
    pub std: Vec<f32>,
}

impl Normalize {
    /// A normalisation from per-channel means and standard deviations.
    ///
    /// # Errors
    /// [`DataError::InvalidTransform`] when the lengths differ, are zero, or a standard
    /// deviation is not positive and finite.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Self, DataError> {
        let normalize = Normalize { mean, std };
        normalize.validate()?;
        Ok(normalize)
    }

    fn validate(&self) -> Result<(), DataError> {
        if self.mean.is_empty() || self.mean.len() != self.std.len() {
            return Err(DataError::InvalidTransform(format!(
                "normalisation with {} means and {} standard deviations",
                self.mean.len(),
                self.std.len()
            )));
        }
        if let Some(s) = self.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(DataError::InvalidTransform(format!(
                "normalisation standard deviation {s} (need > 0)"
            )));
        }
        if let Some(m) = self.mean.iter().find(|m| !m.is_finite()) {
            return Err(DataError::InvalidTransform(format!(
                "normalisation mean {m}"
            )));
        }
        Ok(())
    }

    /// Values scaled to `[0, 1]` only (mean 0, standard deviation 1), for `channels`.
    pub fn unit(channels: usize) -> Self {
        Normalize {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// Fashion-MNIST's training-set statistics (checked against the real data in the
    /// tests).
    pub fn fashion_mnist() -> Self {
        Normalize {
            mean: vec![0.2860],
            std: vec![0.3530],
        }
    }

    /// MNIST's training-set statistics.
    pub fn mnist() -> Self {
        Normalize {
            mean: vec![0.1307],
            std: vec![0.3081],
        }
    }

    /// CIFAR-10's training-set statistics (per-pixel standard deviation).
    pub fn cifar10() -> Self {
        Normalize {
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2470, 0.2435, 0.2616],
        }
    }

    /// CIFAR-100's training-set statistics (per-pixel standard deviation).
    pub fn cifar100() -> Self {
        Normalize {
            mean: vec![0.5071, 0.4865, 0.4409],
            std: vec![0.2673, 0.2564, 0.2762],
        }
    }

    /// ImageNet's statistics, as torchvision's models use them.
    pub fn imagenet() -> Self {
        Normalize {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }

    /// The statistics used by default for `kind`: Fashion-MNIST's for IDX files (the
    /// project's dataset; use [`Normalize::mnist`] or
    /// [`Dataset::pixel_stats`](super::Dataset::pixel_stats) for others), the CIFAR
    /// ones, ImageNet's for ImageFolder.
    pub fn for_kind(kind: DatasetKind) -> Self {
        match kind {
            DatasetKind::Idx => Normalize::fashion_mnist(),
            DatasetKind::Cifar10 => Normalize::cifar10(),
            DatasetKind::Cifar100 => Normalize::cifar100(),
            DatasetKind::ImageFolder => Normalize::imagenet(),
        }
    }

    /// Number of channels it normalises.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }
}

/// A list of [`Step`]s, then a [`Normalize`]: what turns a stored image into the values a
/// network reads.
///
/// ```
/// use versatile::data::{DatasetKind, Image, ImageShape, Transform};
/// let train = Transform::standard(DatasetKind::Idx, true); // pad-crop 2 + flip
/// let image = Image::zeros(ImageShape::new(1, 28, 28));
/// let (shape, values) = train.to_chw(image, 7).unwrap();
/// assert_eq!(shape, ImageShape::new(1, 28, 28));
/// assert_eq!(values.len(), 28 * 28);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TransformFields")]
pub struct Transform {
    steps: Vec<Step>,
    normalize: Normalize,
}

/// What a serialised [`Transform`] holds, checked by [`Transform::new`] when read back.
#[derive(Deserialize)]
struct TransformFields {
    steps: Vec<Step>,
    normalize: Normalize,
}

impl TryFrom<TransformFields> for Transform {
    type Error = DataError;

    fn try_from(fields: TransformFields) -> Result<Self, Self::Error> {
        Transform::new(fields.steps, fields.normalize)
    }
}

impl Transform {
    /// A transform from its steps and normalisation, after checking them.
    ///
    /// # Errors
    /// [`DataError::InvalidTransform`] naming the step or setting that cannot work.
    pub fn new(steps: Vec<Step>, normalize: Normalize) -> Result<Self, DataError> {
        for step in &steps {
            step.validate()?;
        }
        normalize.validate()?;
        Ok(Transform { steps, normalize })
    }

    /// The standard transform of `kind`, with (`augment`, for training) or without
    /// random augmentation, normalised by [`Normalize::for_kind`]:
    ///
    /// | kind        | training (`augment`)                        | evaluation                  |
    /// |-------------|---------------------------------------------|-----------------------------|
    /// | IDX         | pad 2 + random crop, horizontal flip        | none                        |
    /// | CIFAR       | pad 4 + random crop, horizontal flip        | none                        |
    /// | ImageFolder | RandomResizedCrop 224 (0.08..1, 3/4..4/3), flip | Resize 256 + CenterCrop 224 |
    pub fn standard(kind: DatasetKind, augment: bool) -> Self {
        let normalize = Normalize::for_kind(kind);
        match (kind, augment) {
            (DatasetKind::Idx, true) => Self::small_train(2, normalize),
            (DatasetKind::Cifar10 | DatasetKind::Cifar100, true) => Self::small_train(4, normalize),
            (DatasetKind::ImageFolder, true) => Self::imagenet_train(224),
            (DatasetKind::ImageFolder, false) => Self::imagenet_eval(256, 224),
            (_, false) => Transform {
                steps: Vec::new(),
                normalize,
            },
        }
    }

    /// Pad-and-crop by `padding` then a horizontal flip with probability 1/2: the usual
    /// training augmentation of 28x28 and 32x32 sets.
    pub fn small_train(padding: usize, normalize: Normalize) -> Self {
        Transform {
            steps: vec![
                Step::PadCrop { padding },
                Step::HorizontalFlip { probability: 0.5 },
            ],
            normalize,
        }
    }

    /// `RandomResizedCrop(size)` with torchvision's defaults and a flip with probability
    /// 1/2, ImageNet normalisation.
    pub fn imagenet_train(size: usize) -> Self {
        Transform {
            steps: vec![
                Step::RandomResizedCrop {
                    height: size.max(1),
                    width: size.max(1),
                    scale: (0.08, 1.0),
                    ratio: (3.0 / 4.0, 4.0 / 3.0),
                },
                Step::HorizontalFlip { probability: 0.5 },
            ],
            normalize: Normalize::imagenet(),
        }
    }

    /// `Resize(resize)` then `CenterCrop(crop)`, ImageNet normalisation.
    pub fn imagenet_eval(resize: usize, crop: usize) -> Self {
        Transform {
            steps: resize_center_crop(resize.max(1), [crop.max(1); 2]),
            normalize: Normalize::imagenet(),
        }
    }

    /// torchvision's evaluation transform: `Resize(resize)` (the shorter side), then
    /// `CenterCrop(crop)` (`[height, width]`), then `normalize`. What
    /// [`Preprocess`](crate::checkpoint::Preprocess) describes for predictions.
    ///
    /// # Errors
    /// As [`Transform::new`].
    pub fn resize_center_crop(
        resize: usize,
        crop: [usize; 2],
        normalize: Normalize,
    ) -> Result<Self, DataError> {
        Transform::new(resize_center_crop(resize, crop), normalize)
    }

    /// The steps.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The normalisation.
    pub fn normalize(&self) -> &Normalize {
        &self.normalize
    }

    /// Whether any step draws random numbers.
    pub fn is_random(&self) -> bool {
        self.steps.iter().any(Step::is_random)
    }

    /// The shape of every output for inputs of `input` (`None`: inputs of varying size)
    /// with `channels` channels, or `None` when outputs may differ in size (a dataset of
    /// varying sizes without a crop to a fixed size).
    pub fn output_shape(&self, input: Option<ImageShape>, channels: usize) -> Option<ImageShape> {
        self.steps
            .iter()
            .fold(input, |shape, step| step.output_shape(shape, channels))
    }

    /// Applies the steps to `image`, drawing random numbers from a generator seeded by
    /// `seed` (the same seed gives the same output).
    pub fn apply(&self, image: Image, seed: u64) -> Image {
        if self.steps.is_empty() {
            return image;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.steps
            .iter()
            .fold(image, |image, step| step.apply(image, &mut rng))
    }

    /// Writes `image` normalised into `out` as `f32` in CHW order.
    ///
    /// # Errors
    /// [`DataError::InvalidTransform`] when the image's channels differ from the
    /// normalisation's or `out` does not have the image's size.
    pub fn write_normalized(&self, image: &Image, out: &mut [f32]) -> Result<(), DataError> {
        let shape = image.shape();
        if shape.channels != self.normalize.channels() {
            return Err(DataError::InvalidTransform(format!(
                "normalisation for {} channels applied to a {shape} image",
                self.normalize.channels()
            )));
        }
        if out.len() != shape.num_elements() {
            return Err(DataError::InvalidTransform(format!(
                "output of {} values for a {shape} image",
                out.len()
            )));
        }
        let plane = shape.height * shape.width;
        let pixels = image.pixels();
        for (c, (&mean, &std)) in self
            .normalize
            .mean
            .iter()
            .zip(&self.normalize.std)
            .enumerate()
        {
            let scale = 1.0 / (255.0 * std);
            let bias = -mean / std;
            let dst = &mut out[c * plane..(c + 1) * plane];
            if shape.channels == 1 {
                for (d, &p) in dst.iter_mut().zip(pixels) {
                    *d = p as f32 * scale + bias;
                }
            } else {
                for (d, p) in dst.iter_mut().zip(pixels.chunks_exact(shape.channels)) {
                    *d = p[c] as f32 * scale + bias;
                }
            }
        }
        Ok(())
    }

    /// Applies the steps with `seed`, then normalises: the output's shape and its CHW
    /// values.
    ///
    /// # Errors
    /// As [`Transform::write_normalized`].
    pub fn to_chw(&self, image: Image, seed: u64) -> Result<(ImageShape, Vec<f32>), DataError> {
        let image = self.apply(image, seed);
        let mut out = vec![0.0; image.shape().num_elements()];
        self.write_normalized(&image, &mut out)?;
        Ok((image.shape(), out))
    }
}
