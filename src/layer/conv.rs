//! The forward pass of plain dense `Conv2d` layers in this project's models.
//!
//! Every dense convolution of the model zoo goes through [`conv2d_forward`], so a faster
//! kernel for dense layers plugs in at one place: on the `Flex` device (f32 or f64) it
//! runs the nested-ring kernel with a single ring (forward and backward), elsewhere
//! burn's `conv2d`. [`pin_conv_path`] pins the choice for tests and benchmarks.

use std::cell::Cell;

use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::tensor::Tensor;

use super::fused;
use super::geometry::same_padding;
use super::pin::PinGuard;
use crate::kernels::ConvPlan;

/// Which implementation runs a dense `Conv2d` in [`conv2d_forward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ConvPath {
    /// The nested kernel where it runs (a `Flex` device with f32 or f64 tensors), burn's
    /// `conv2d` elsewhere.
    #[default]
    Auto,
    /// The nested kernel with one ring wherever it runs, burn's `conv2d` elsewhere.
    Nested,
    /// burn's `conv2d` always.
    Burn,
}

thread_local! {
    static CONV_PIN: Cell<ConvPath> = const { Cell::new(ConvPath::Auto) };
}

/// Pins the implementation of [`conv2d_forward`] on the calling thread until the
/// returned guard is dropped (`ConvPath::Auto`: the default choice). For tests and
/// benchmarks; being per thread, tests running in parallel do not see each other's pins.
pub fn pin_conv_path(path: ConvPath) -> PinGuard<ConvPath> {
    PinGuard::set(&CONV_PIN, path)
}

/// The implementation [`conv2d_forward`] uses on `input`: [`ConvPath::Nested`] or
/// [`ConvPath::Burn`].
pub fn conv_path_for(conv: &Conv2d, input: &Tensor<4>) -> ConvPath {
    let pinned = match CONV_PIN.with(Cell::get) {
        ConvPath::Burn => ConvPath::Burn,
        ConvPath::Auto | ConvPath::Nested => ConvPath::Nested,
    };
    let weight = conv.weight.val();
    let bias = conv.bias.as_ref().map(|b| b.val());
    if pinned == ConvPath::Nested
        && fused::fused_supported(input, &weight, bias.as_ref())
        && dense_conv_plan(conv, input.dims()).is_some()
    {
        ConvPath::Nested
    } else {
        ConvPath::Burn
    }
}

/// Forward pass of a dense `Conv2d`, through the fastest path available for the input's
/// device (see the module documentation); the same result as `conv.forward(input)`.
///
/// # Shapes
/// - `input`: `[batch, channels_in, height, width]`
/// - output: `[batch, channels_out, out_h, out_w]`
pub fn conv2d_forward(conv: &Conv2d, input: Tensor<4>) -> Tensor<4> {
    conv2d_forward_measured(conv, input, false).0
}

/// [`conv2d_forward`], and the batch statistics of its output where `batch_stats` asks
/// for them and the kernel takes them as it writes the output (see
/// [`fused::nested_conv2d_measured`]); `None` elsewhere.
///
/// # Shapes
/// - `input`: `[batch, channels_in, height, width]`
/// - output: `[batch, channels_out, out_h, out_w]`; statistics `[2, channels_out]`
pub fn conv2d_forward_measured(
    conv: &Conv2d,
    input: Tensor<4>,
    batch_stats: bool,
) -> (Tensor<4>, Option<Tensor<2>>) {
    if conv_path_for(conv, &input) == ConvPath::Burn {
        return (conv.forward(input), None);
    }
    let plan = dense_conv_plan(conv, input.dims()).expect("checked by conv_path_for");
    fused::nested_conv2d_measured(
        input,
        conv.weight.val(),
        conv.bias.as_ref().map(|b| b.val()),
        plan,
        batch_stats,
    )
}

/// The one-ring kernel plan of `conv` on an input of shape `dims`, or `None` when the input
/// does not fit it (burn's `conv2d` then reports the problem).
pub fn dense_conv_plan(conv: &Conv2d, dims: [usize; 4]) -> Option<ConvPlan> {
    let [_, channels, height, width] = dims;
    let [out_channels, depth, kh, kw] = conv.weight.dims();
    let groups = conv.groups;
    if groups == 0 || channels != depth * groups || out_channels % groups != 0 {
        return None;
    }
    let pads = match conv.padding {
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Same => [
            same_padding(kh, conv.stride[0], height),
            same_padding(kw, conv.stride[1], width),
        ],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
    };
    ConvPlan::dense(
        dims,
        out_channels,
        [kh, kw],
        conv.stride,
        conv.dilation,
        groups,
        pads,
    )
    .ok()
}
