//! Errors of the versatile layer: invalid configurations and inputs that do not fit.

use thiserror::Error;

/// A `VConv2dConfig` that cannot describe a versatile layer.
///
/// Every variant names the offending setting and its numbers, so the message alone
/// tells a user what to change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VConvConfigError {
    /// A channel count is zero.
    #[error(
        "channels must be positive, got in_channels = {in_channels}, out_channels = {out_channels}"
    )]
    ZeroChannels {
        /// Input channels `c`.
        in_channels: usize,
        /// Output channels `n`.
        out_channels: usize,
    },
    /// The kernel has a zero side.
    #[error("kernel size must be positive, got {height}x{width}")]
    ZeroKernel {
        /// Kernel height.
        height: usize,
        /// Kernel width.
        width: usize,
    },
    /// Versatile filters crop square kernels.
    #[error("versatile filters need a square kernel, got {height}x{width}")]
    NonSquareKernel {
        /// Kernel height.
        height: usize,
        /// Kernel width.
        width: usize,
    },
    /// A stride is zero.
    #[error("stride must be positive, got {0:?}")]
    ZeroStride([usize; 2]),
    /// A dilation is zero.
    #[error("dilation must be positive, got {0:?}")]
    ZeroDilation([usize; 2]),
    /// `groups` is zero.
    #[error("groups must be positive, got 0")]
    ZeroGroups,
    /// `delta` must leave at least one channel for the primary filter.
    #[error("delta = {delta} must be smaller than in_channels = {in_channels} (0 <= delta < c)")]
    DeltaTooLarge {
        /// The channel offset range.
        delta: usize,
        /// Input channels `c`.
        in_channels: usize,
    },
    /// The channel stride is zero.
    #[error("g (the channel stride) must be positive, got 0")]
    ZeroG,
    /// The channel windows must tile `delta` exactly.
    #[error("g = {g} must divide delta = {delta}")]
    GDoesNotDivideDelta {
        /// Channel stride.
        g: usize,
        /// Channel offset range.
        delta: usize,
    },
    /// Grouped convolution needs the input channels split evenly.
    #[error("in_channels = {in_channels} is not divisible by groups = {groups}")]
    InChannelsNotDivisibleByGroups {
        /// Input channels `c`.
        in_channels: usize,
        /// Groups.
        groups: usize,
    },
    /// Grouped convolution needs the primary filters split evenly.
    #[error(
        "the number of primary filters m = ceil(out_channels / (s * n_c)) = {primary} is not divisible by groups = {groups}"
    )]
    PrimaryNotDivisibleByGroups {
        /// Primary filters `m`.
        primary: usize,
        /// Groups.
        groups: usize,
    },
    /// A grouped layer must emit all `s * m` channels, or its groups would differ in size.
    #[error(
        "with groups = {groups}, out_channels = {out_channels} must equal s * m = {s} * {primary} so every group has the same number of outputs"
    )]
    GroupsNeedFullBlocks {
        /// Groups.
        groups: usize,
        /// Output channels `n`.
        out_channels: usize,
        /// Spatial secondary filters per primary.
        s: usize,
        /// Primary filters.
        primary: usize,
    },
    /// Channel-versatile filters are defined across all input channels.
    #[error(
        "channel versatile filters (delta = {delta}) with groups = {groups} are not supported: use delta = 0 or groups = 1"
    )]
    ChannelWithGroups {
        /// Channel offset range.
        delta: usize,
        /// Groups.
        groups: usize,
    },
}

/// An input or weight whose shape does not fit the layer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VConvShapeError {
    /// The input has the wrong number of channels.
    #[error("input has {got} channels, the layer expects {expected}")]
    InputChannels {
        /// What the layer was built for.
        expected: usize,
        /// What the input has.
        got: usize,
    },
    /// The (padded) input is smaller than the dilated kernel.
    #[error(
        "input {height}x{width} with padding {padding:?} (top, bottom, left, right) is smaller than the kernel's extent {}x{} (kernel {kernel}, dilation {dilation:?})",
        extent[0],
        extent[1]
    )]
    InputTooSmall {
        /// Input height.
        height: usize,
        /// Input width.
        width: usize,
        /// Resolved padding `(top, bottom, left, right)`.
        padding: [usize; 4],
        /// Kernel side.
        kernel: usize,
        /// Dilation.
        dilation: [usize; 2],
        /// The dilated kernel's extent `dilation * (kernel - 1) + 1` per axis.
        extent: [usize; 2],
    },
    /// A weight tensor does not have the shape the layer needs.
    #[error("{what} has shape {got:?}, expected {expected:?}")]
    Weight {
        /// Which tensor.
        what: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Actual shape.
        got: Vec<usize>,
    },
    /// The fused kernel's plan refused the call (sizes beyond what it can address).
    #[error("the fused kernel cannot run this call: {0}")]
    Plan(#[from] crate::kernels::PlanError),
    /// The fused kernel was forced on tensors it cannot take.
    #[error(
        "the fused VConv2d kernel runs on the Flex device with f32 or f64 tensors; got {device} with input {input_dtype}, weight {weight_dtype} (use ForwardPath::Auto or DenseForm)"
    )]
    FusedUnavailable {
        /// The input's device.
        device: String,
        /// The input's dtype.
        input_dtype: String,
        /// The weight's dtype.
        weight_dtype: String,
    },
}
