//! Per-layer cost reports of a model at an input size, built on [`crate::cost`].
//!
//! Conventions are those of [`crate::cost`]: MACs are multiply-adds for one image
//! (FLOPs = 2 × MACs), bias additions are not counted, batch norm costs one multiply-add
//! per output element, pooling, activations, dropout and the residual additions cost
//! none; parameters include biases and batch-norm scale and shift; batch-norm running
//! statistics are buffers.

use serde::Serialize;

use crate::cost::{LayerCost, BYTES_PER_VALUE};
use crate::layer::{ChannelMode, Geometry};

/// The counting convention, in words, for reports and command output.
pub const CONVENTION: &str = "MACs are multiply-adds for one image; FLOPs = 2 x MACs. \
Bias additions are not counted; batch norm costs 1 MAC per output element; pooling, \
activations, dropout and residual additions cost none. 'dense' is the equivalent dense \
layer, 'paper' counts every secondary filter separately (the paper's count), 'nested' \
evaluates all crops of a primary filter for the price of the largest (this project's \
kernel). Parameters include biases and batch-norm scale/shift; batch-norm running \
statistics are buffers. Bytes are float32; MB = 10^6 bytes, MiB = 2^20 bytes.";

/// The layout of a versatile layer, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VersatileLayout {
    /// Input channels `c`.
    pub in_channels: usize,
    /// Kernel side `d`.
    pub kernel: usize,
    /// Spatial secondary filters per primary.
    pub s: usize,
    /// Channel windows per primary.
    pub n_c: usize,
    /// Channel offset range.
    pub delta: usize,
    /// Channel stride.
    pub g: usize,
    /// Primary filters.
    pub primary: usize,
    /// Depth of one window.
    pub c_hat: usize,
    /// Weight sharing between windows.
    pub mode: ChannelMode,
}

impl From<&Geometry> for VersatileLayout {
    fn from(g: &Geometry) -> Self {
        Self {
            in_channels: g.in_channels,
            kernel: g.kernel,
            s: g.s,
            n_c: g.n_c,
            delta: g.delta,
            g: g.g,
            primary: g.primary,
            c_hat: g.c_hat,
            mode: g.mode,
        }
    }
}

/// One row of a cost report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerReport {
    /// The layer's name in the model (`features.0`, `layer1.0.conv2`, ...).
    pub name: String,
    /// PyTorch-style layer type (`Conv2d`, `VConv2d`, `BatchNorm2d`, `Linear`, ...).
    pub kind: &'static str,
    /// Its settings in short.
    pub detail: String,
    /// Output shape for one image: `[C, H, W]` or `[F]`.
    pub output: Vec<usize>,
    /// Parameters, buffers and multiply-adds.
    #[serde(flatten)]
    pub cost: LayerCost,
    /// Parameters of the dense layer this one replaces (= `params` unless versatile).
    pub params_dense: u64,
    /// Parameters as the authors' code allocates them (= `params` unless versatile).
    pub params_authors: u64,
    /// The versatile layout, for versatile layers.
    pub versatile: Option<VersatileLayout>,
}

impl LayerReport {
    /// A row for a layer that is not versatile.
    pub fn plain(
        name: &str,
        kind: &'static str,
        detail: String,
        output: Vec<usize>,
        cost: LayerCost,
    ) -> Self {
        Self {
            name: name.to_string(),
            kind,
            detail,
            output,
            params_dense: cost.params,
            params_authors: cost.params,
            cost,
            versatile: None,
        }
    }
}

/// The cost of a whole model at one input size, layer by layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostReport {
    /// The model's name.
    pub model: String,
    /// The variant, as text.
    pub variant: String,
    /// Input shape for one image `[C, H, W]`.
    pub input: [usize; 3],
    /// Output classes.
    pub num_classes: usize,
    /// One row per layer, in execution order.
    pub layers: Vec<LayerReport>,
    /// Remarks on particular layers (e.g. a delta lowered to fit the input channels).
    pub notes: Vec<String>,
}

impl CostReport {
    /// The sum over all layers.
    pub fn total(&self) -> LayerCost {
        self.layers.iter().map(|row| row.cost).sum()
    }

    /// Parameters of the dense twin (every versatile layer replaced by its `Conv2d`).
    pub fn params_dense(&self) -> u64 {
        self.layers.iter().map(|row| row.params_dense).sum()
    }

    /// Parameters as the authors' code allocates them.
    pub fn params_authors(&self) -> u64 {
        self.layers.iter().map(|row| row.params_authors).sum()
    }

    /// Parameters outside batch-norm layers (convolutions and linear layers).
    pub fn params_without_batch_norm(&self) -> u64 {
        self.layers
            .iter()
            .filter(|row| row.kind != "BatchNorm2d")
            .map(|row| row.cost.params)
            .sum()
    }

    /// Parameters of the batch-norm layers.
    pub fn params_batch_norm(&self) -> u64 {
        self.total().params - self.params_without_batch_norm()
    }

    /// The final output shape for one image.
    pub fn output(&self) -> &[usize] {
        self.layers.last().map_or(&[], |row| row.output.as_slice())
    }

    /// Rows of versatile layers.
    pub fn versatile_layers(&self) -> impl Iterator<Item = &LayerReport> {
        self.layers.iter().filter(|row| row.versatile.is_some())
    }
}

/// Float32 bytes of `values` stored values.
pub fn bytes(values: u64) -> u64 {
    values * BYTES_PER_VALUE
}
