//! Decoded 8-bit images and their shapes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The shape of one image as a network sees it: `[channels, height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageShape {
    /// Channels: 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl ImageShape {
    /// A shape from its channels, height and width.
    pub const fn new(channels: usize, height: usize, width: usize) -> Self {
        ImageShape {
            channels,
            height,
            width,
        }
    }

    /// `[channels, height, width]`, the trailing dimensions of a `[N, C, H, W]` batch.
    pub const fn dims(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }

    /// Number of values of one image: `channels * height * width`.
    pub const fn num_elements(&self) -> usize {
        self.channels * self.height * self.width
    }
}

impl fmt::Display for ImageShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// An 8-bit image in row-major, channel-interleaved (HWC) order, as decoders produce.
///
/// Transforms work on these; only the last step turns one into normalised `f32` values in
/// CHW order (see [`Transform::write_normalized`](super::Transform::write_normalized)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    shape: ImageShape,
    pixels: Vec<u8>,
}

impl Image {
    /// An image from its shape and `height * width * channels` interleaved bytes, or
    /// `None` when the number of bytes does not match the shape or the channels are
    /// neither 1 nor 3.
    pub fn new(shape: ImageShape, pixels: Vec<u8>) -> Option<Self> {
        let valid = matches!(shape.channels, 1 | 3) && pixels.len() == shape.num_elements();
        valid.then_some(Image { shape, pixels })
    }

    /// An image of zeros.
    ///
    /// # Panics
    /// If the channels are neither 1 nor 3.
    pub fn zeros(shape: ImageShape) -> Self {
        assert!(
            matches!(shape.channels, 1 | 3),
            "images have 1 or 3 channels, not {}",
            shape.channels
        );
        Image {
            shape,
            pixels: vec![0; shape.num_elements()],
        }
    }

    /// The image's shape.
    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.shape.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.shape.height
    }

    /// Channels per pixel.
    pub fn channels(&self) -> usize {
        self.shape.channels
    }

    /// The interleaved bytes, row after row.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// The pixel value at (`row`, `col`) of `channel`.
    ///
    /// # Panics
    /// If the coordinates are outside the image.
    pub fn get(&self, row: usize, col: usize, channel: usize) -> u8 {
        assert!(row < self.height() && col < self.width() && channel < self.channels());
        self.pixels[(row * self.shape.width + col) * self.shape.channels + channel]
    }

    /// The interleaved bytes, owned.
    pub fn into_pixels(self) -> Vec<u8> {
        self.pixels
    }

    pub(crate) fn pixels_mut(&mut self) -> &mut [u8] {
        &mut self.pixels
    }
}
