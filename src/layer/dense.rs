//! The dense form of a versatile layer (SPEC section 1, "unfolded" weights).
//!
//! Built from the primary weight with differentiable tensor operations only (slice, pad,
//! concatenate, select), so it runs on every backend, gradients reach the primary weight
//! for free, and the same dense weight is what an export hands to other runtimes.

use burn::tensor::module::conv2d;
use burn::tensor::ops::{ConvOptions, PadMode};
use burn::tensor::{Int, Tensor, TensorData};

use super::geometry::{Geometry, PaddingPairs};

/// The primary weight with everything outside crop `i` set to zero (`[m, depth, d, d]`).
fn masked_to_crop(weight: Tensor<4>, geometry: &Geometry, crop: usize) -> Tensor<4> {
    if crop == 0 {
        return weight;
    }
    let d = geometry.kernel;
    weight
        .narrow(2, crop, d - 2 * crop)
        .narrow(3, crop, d - 2 * crop)
        .pad(
            [(0, 0), (0, 0), (crop, crop), (crop, crop)],
            PadMode::Constant(0.0),
        )
}

/// Rows of channel window `j` in the dense weight: the window's filter placed at input
/// channels `[j*g, j*g + c_hat)` of a `c`-deep weight, zeros elsewhere.
fn placed_in_window(weight: Tensor<4>, geometry: &Geometry, window: usize) -> Tensor<4> {
    if geometry.delta == 0 {
        // No channel windows: depth is already c (or c / groups).
        return weight;
    }
    let offset = geometry.window_input_offset(window);
    let filter = weight.narrow(1, geometry.window_weight_offset(window), geometry.c_hat);
    filter.pad(
        [(0, 0), (offset, geometry.delta - offset), (0, 0), (0, 0)],
        PadMode::Constant(0.0),
    )
}

/// Unfolds the primary weight `[m, depth, d, d]` into the equivalent dense weight
/// `[n, c / groups, d, d]`, rows in the dense order of [`Geometry::dense_order`].
pub fn dense_weight(weight: Tensor<4>, geometry: &Geometry) -> Tensor<4> {
    let mut blocks = Vec::with_capacity(geometry.blocks());
    for crop in 0..geometry.s {
        let masked = masked_to_crop(weight.clone(), geometry, crop);
        for window in 0..geometry.n_c {
            blocks.push(placed_in_window(masked.clone(), geometry, window));
        }
    }
    let block_layout = Tensor::cat(blocks, 0).narrow(0, 0, geometry.out_channels);
    let device = block_layout.device();
    reorder(block_layout, 0, dense_order_indices(geometry, &device))
}

/// The bias in dense order (the identity unless `groups > 1`).
pub fn dense_bias(bias: Tensor<1>, geometry: &Geometry) -> Tensor<1> {
    let device = bias.device();
    reorder(bias, 0, dense_order_indices(geometry, &device))
}

/// `Some(order)` as an index tensor when the dense order is not the identity.
fn dense_order_indices(
    geometry: &Geometry,
    device: &burn::tensor::Device,
) -> Option<Tensor<1, Int>> {
    (geometry.groups > 1).then(|| index_tensor(&geometry.dense_order(), device))
}

/// Inverse of the dense order: block-layout channel `k` is dense channel `inverse[k]`.
fn block_order_indices(
    geometry: &Geometry,
    device: &burn::tensor::Device,
) -> Option<Tensor<1, Int>> {
    (geometry.groups > 1).then(|| {
        let order = geometry.dense_order();
        let mut inverse = vec![0; order.len()];
        for (dense, &block) in order.iter().enumerate() {
            inverse[block] = dense;
        }
        index_tensor(&inverse, device)
    })
}

fn index_tensor(indices: &[usize], device: &burn::tensor::Device) -> Tensor<1, Int> {
    let values: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(values, [indices.len()]), device)
}

/// `tensor` with its entries along `dim` picked by `indices`, untouched for `None`.
fn reorder<const D: usize>(
    tensor: Tensor<D>,
    dim: usize,
    indices: Option<Tensor<1, Int>>,
) -> Tensor<D> {
    match indices {
        Some(indices) => tensor.select(dim, indices),
        None => tensor,
    }
}

/// The layer's forward pass through its dense form: unfold the weight, run burn's
/// `conv2d`, and bring grouped outputs back to the block layout.
///
/// # Shapes
/// - `input`: `[batch, c, h, w]`, `weight`: `[m, depth, d, d]`, `bias`: `[n]`
/// - output: `[batch, n, out_h, out_w]`, block layout
pub fn forward(
    input: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    geometry: &Geometry,
    pads: PaddingPairs,
) -> Tensor<4> {
    let device = input.device();
    let options =
        ConvOptions::new_with_padding(geometry.stride, pads, geometry.dilation, geometry.groups);
    let output = conv2d(
        input,
        dense_weight(weight, geometry),
        bias.map(|b| dense_bias(b, geometry)),
        options,
    );
    reorder(output, 1, block_order_indices(geometry, &device))
}
