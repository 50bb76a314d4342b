//! # versatile
//!
//! Convolutional networks built from *versatile filters* (Wang et al., "Learning
//! Versatile Filters for Efficient Convolutional Neural Networks", NeurIPS 2018) for
//! burn 0.22.
//!
//! [`VConv2d`] is a drop-in for burn's `Conv2d`: the same output shape
//! from a fraction of the parameters. Its exact definition is the dense form in
//! [`layer::dense`]; [`cost`] counts parameters and multiply-adds the three ways of
//! the specification. [`checkpoint`] saves and loads models, imports PyTorch weights and
//! exports the dense form (safetensors, ONNX).

#![warn(missing_docs)]

pub mod checkpoint;
pub mod cost;
pub mod data;
pub mod fsutil;
pub mod infer;
pub use versatile_kernels as kernels;
pub mod layer;
mod limited;
pub mod models;
pub mod train;

pub use layer::{ChannelMode, VConv2d, VConv2dConfig};
