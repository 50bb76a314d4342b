//! The versatile layer: its geometry, its dense form and the burn module.

pub mod dense;
mod error;
mod geometry;
mod vconv2d;

pub use error::{VConvConfigError, VConvShapeError};
pub use geometry::{ChannelMode, ChannelSource, Geometry, GeometrySpec, PaddingPairs};
pub use vconv2d::{authors_initializer, VConv2d, VConv2dConfig};
