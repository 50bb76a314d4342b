//! Cost accounting per layer (SPEC section 2): parameters, bytes and multiply-adds
//! counted three ways.
//!
//! Conventions, stated once for every report built on this module:
//! - multiply-adds (MACs) are for batch 1; FLOPs = 2 × MACs;
//! - bias additions are not counted as MACs, bias values are counted as parameters;
//! - `macs_dense` is what the dense layer of the same shape costs, `macs_paper` counts
//!   every secondary filter separately (the paper's count), `macs_nested` is the nested
//!   evaluation of this project (all crops of a primary for the price of the largest);
//!   for layers that are not versatile the three are equal;
//! - batch norm costs one multiply-add per output element (its affine map at inference,
//!   foldable into the preceding convolution); pooling and activations cost none;
//! - bytes are float32 parameter bytes; batch-norm running statistics are buffers,
//!   reported apart from parameters.

use std::ops::{Add, AddAssign};

use serde::Serialize;

use crate::layer::Geometry;

/// Bytes per stored value (float32).
pub const BYTES_PER_VALUE: u64 = 4;

/// Cost of one layer (or a sum of layers) for one image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LayerCost {
    /// Trainable parameters, bias included.
    pub params: u64,
    /// Non-trainable stored values (batch-norm running mean and variance).
    pub buffers: u64,
    /// Multiply-adds of the equivalent dense layer.
    pub macs_dense: u64,
    /// Multiply-adds as the paper counts them (each secondary filter separately).
    pub macs_paper: u64,
    /// Multiply-adds of the nested evaluation.
    pub macs_nested: u64,
}

impl LayerCost {
    /// A layer whose three MAC counts agree (any non-versatile layer).
    pub fn uniform(params: u64, buffers: u64, macs: u64) -> Self {
        Self {
            params,
            buffers,
            macs_dense: macs,
            macs_paper: macs,
            macs_nested: macs,
        }
    }

    /// Float32 bytes of the parameters.
    pub fn param_bytes(&self) -> u64 {
        self.params * BYTES_PER_VALUE
    }

    /// Float32 bytes of everything a checkpoint stores (parameters and buffers).
    pub fn stored_bytes(&self) -> u64 {
        (self.params + self.buffers) * BYTES_PER_VALUE
    }
}

impl Add for LayerCost {
    type Output = Self;

    fn add(self, rhs: Self) -> Self {
        Self {
            params: self.params + rhs.params,
            buffers: self.buffers + rhs.buffers,
            macs_dense: self.macs_dense + rhs.macs_dense,
            macs_paper: self.macs_paper + rhs.macs_paper,
            macs_nested: self.macs_nested + rhs.macs_nested,
        }
    }
}

impl AddAssign for LayerCost {
    fn add_assign(&mut self, rhs: Self) {
        *self = *self + rhs;
    }
}

impl std::iter::Sum for LayerCost {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), Add::add)
    }
}

/// Cost of a versatile layer with output `out_h x out_w`.
pub fn vconv2d(geometry: &Geometry, bias: bool, out_hw: [usize; 2]) -> LayerCost {
    let g = geometry;
    let pixels = (out_hw[0] * out_hw[1]) as u64;
    let area = (g.kernel * g.kernel) as u64;
    let weight: u64 = g.weight_shape().iter().map(|&v| v as u64).product();
    let bias_params = if bias { g.out_channels as u64 } else { 0 };
    let depth = g.c_hat as u64;

    // Paper: every emitted channel is a separate (d-2i)^2 filter over c_hat channels.
    let paper: u64 = (0..g.out_channels)
        .map(|k| g.crop_area(g.source(k).crop) as u64)
        .sum::<u64>()
        * depth;
    // Nested: every (window, primary) pair costs its widest emitted crop once.
    let nested: u64 = (0..g.n_c)
        .flat_map(|j| (0..g.primary).map(move |p| (j, p)))
        .filter_map(|(j, p)| g.widest_emitted_crop(j, p))
        .map(|i| g.crop_area(i) as u64)
        .sum::<u64>()
        * depth;
    let dense = g.out_channels as u64 * (g.in_channels / g.groups) as u64 * area;

    LayerCost {
        params: weight + bias_params,
        buffers: 0,
        macs_dense: dense * pixels,
        macs_paper: paper * pixels,
        macs_nested: nested * pixels,
    }
}

/// Parameters of the dense `Conv2d` a versatile layer replaces (bias included).
pub fn dense_twin_params(geometry: &Geometry, bias: bool) -> u64 {
    let g = geometry;
    conv2d(
        [g.in_channels, g.out_channels],
        [g.kernel, g.kernel],
        g.groups,
        bias,
        [1, 1],
    )
    .params
}

/// Parameters as the authors' code allocates them: a `[m, c / groups, d, d]` weight
/// (all `c` input channels, the last `delta` unused in shared mode) plus the bias. What
/// their checkpoints, and parameter counts taken from their code, hold.
pub fn authors_allocation_params(geometry: &Geometry, bias: bool) -> u64 {
    let g = geometry;
    let weight = (g.primary * (g.in_channels / g.groups) * g.kernel * g.kernel) as u64;
    weight + if bias { g.out_channels as u64 } else { 0 }
}

/// Cost of a dense `Conv2d` (`channels = [in, out]`) with output `out_h x out_w`.
pub fn conv2d(
    channels: [usize; 2],
    kernel_size: [usize; 2],
    groups: usize,
    bias: bool,
    out_hw: [usize; 2],
) -> LayerCost {
    let weight = (channels[1] * channels[0] / groups * kernel_size[0] * kernel_size[1]) as u64;
    let bias_params = if bias { channels[1] as u64 } else { 0 };
    LayerCost::uniform(
        weight + bias_params,
        0,
        weight * (out_hw[0] * out_hw[1]) as u64,
    )
}

/// Cost of a `Linear` layer on one vector.
pub fn linear(d_input: usize, d_output: usize, bias: bool) -> LayerCost {
    let weight = (d_input * d_output) as u64;
    let bias_params = if bias { d_output as u64 } else { 0 };
    LayerCost::uniform(weight + bias_params, 0, weight)
}

/// Cost of a 2D batch norm over `channels` maps of `h x w`: scale and shift are
/// parameters, running mean and variance are buffers.
pub fn batch_norm2d(channels: usize, hw: [usize; 2]) -> LayerCost {
    let c = channels as u64;
    LayerCost::uniform(2 * c, 2 * c, c * (hw[0] * hw[1]) as u64)
}

/// Cost of a pooling layer or an activation: nothing stored, no multiply-adds.
pub fn parameter_free() -> LayerCost {
    LayerCost::default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{ChannelMode, GeometrySpec};

    fn geometry(c: usize, n: usize, d: usize, delta: usize) -> Geometry {
        Geometry::new(GeometrySpec {
            in_channels: c,
            out_channels: n,
            kernel_size: [d, d],
            stride: [1, 1],
            dilation: [1, 1],
            groups: 1,
            delta,
            g: 1,
            mode: ChannelMode::Shared,
        })
        .unwrap()
    }

    #[test]
    fn worked_ratios_of_the_spec() {
        // Per primary filter and input channel: dense / paper / nested.
        for (d, dense, paper, nested) in [
            (3usize, 18, 10, 9),
            (5, 75, 35, 25),
            (7, 196, 84, 49),
            (11, 726, 286, 121),
        ] {
            let s = d.div_ceil(2);
            let cost = vconv2d(&geometry(1, s, d, 0), false, [1, 1]);
            assert_eq!(
                (cost.macs_dense, cost.macs_paper, cost.macs_nested),
                (dense, paper, nested),
                "d = {d}"
            );
        }
    }

    #[test]
    fn closed_forms_when_blocks_are_full() {
        let g = geometry(64, 128, 3, 1);
        let cost = vconv2d(&g, true, [7, 5]);
        let (m, n_c, c_hat) = (g.primary as u64, g.n_c as u64, g.c_hat as u64);
        assert_eq!(cost.params, m * c_hat * 9 + 128);
        assert_eq!(cost.macs_paper, 35 * m * n_c * c_hat * (9 + 1));
        assert_eq!(cost.macs_nested, 35 * m * n_c * c_hat * 9);
        assert_eq!(cost.macs_dense, 35 * 128 * 64 * 9);
        assert_eq!(dense_twin_params(&g, true), 128 * 64 * 9 + 128);
    }

    #[test]
    fn cut_blocks_count_only_emitted_channels() {
        // n = 10 of 3 * 4: crops 0 and 1 full, crop 2 (1x1) keeps 2 primaries.
        let cost = vconv2d(&geometry(4, 10, 5, 0), false, [1, 1]);
        assert_eq!(cost.macs_paper, 4 * (4 * 25 + 4 * 9 + 2));
        assert_eq!(cost.macs_nested, 4 * 4 * 25);
    }
}
