//! The forward pass of plain dense `Conv2d` layers in this project's models.
//!
//! Every dense convolution of the model zoo goes through [`conv2d_forward`], so a faster
//! kernel for dense layers plugs in at one place.

use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

/// Forward pass of a dense `Conv2d`, through the fastest path available for the input's
/// device.
///
/// # Shapes
/// - `input`: `[batch, channels_in, height, width]`
/// - output: `[batch, channels_out, out_h, out_w]`
pub fn conv2d_forward(conv: &Conv2d, input: Tensor<4>) -> Tensor<4> {
    conv.forward(input)
}
