//! The versatile layer: its geometry, its dense form and the burn module; and the
//! training batch norm the models run beside it on the CPU ([`norm`]).

mod conv;
pub mod dense;
mod error;
pub mod fused;
mod geometry;
#[cfg(feature = "cube")]
mod gpu;
pub mod norm;
mod pin;
mod vconv2d;

pub use conv::{
    conv2d_forward, conv2d_forward_measured, conv_path_for, dense_conv_plan, pin_conv_path,
    ConvPath,
};
pub use error::{VConvConfigError, VConvShapeError};
pub use fused::{pin_auto_path, ForwardPath};
pub(crate) use geometry::{symmetric_padding, window_out};
pub use geometry::{ChannelMode, ChannelSource, Geometry, GeometrySpec, PaddingPairs};
pub use norm::{
    batch_norm_add_relu_train, batch_norm_relu_max_pool_train, batch_norm_relu_train,
    batch_norm_train, Activation,
};
pub use pin::PinGuard;
pub use vconv2d::{authors_initializer, VConv2d, VConv2dConfig};
