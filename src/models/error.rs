//! Errors of the model zoo: unknown names, bad settings, inputs that do not fit.

use thiserror::Error;

use crate::layer::VConvConfigError;

use super::variant::VariantParseError;

/// Why a model cannot be built, or cannot take an input.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ModelError {
    /// The model name is not in the registry.
    #[error("unknown model '{name}'; known models: {known} (or vgg:TABLE / vgg_bn:TABLE)")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The registry's names, comma separated.
        known: String,
    },
    /// A custom VGG table that cannot be read.
    #[error("invalid VGG table '{table}': {reason} (example: 32-32-M-64-64-M-128-128-M)")]
    BadVggTable {
        /// The table as given.
        table: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The variant string does not parse.
    #[error(transparent)]
    Variant(#[from] VariantParseError),
    /// A size setting is zero.
    #[error("{what} must be positive, got 0")]
    Zero {
        /// Which setting (`num_classes`, `in_channels`).
        what: &'static str,
    },
    /// A size setting is beyond what any model of the zoo needs (a guard against
    /// descriptions read from files asking for absurd allocations).
    #[error("{what} is {value}, above the limit of {max}")]
    TooLarge {
        /// Which setting (`num_classes`, `in_channels`, `VGG table entries`, ...).
        what: &'static str,
        /// The value given.
        value: usize,
        /// The largest value allowed.
        max: usize,
    },
    /// A convolution of the model cannot be built as a versatile layer.
    #[error("layer {layer}: {source}")]
    Layer {
        /// The layer's name in the model (e.g. `features.0`).
        layer: String,
        /// The layer's configuration error.
        source: VConvConfigError,
    },
    /// The input does not have the model's number of channels.
    #[error("input has {got} channels, {model} was built for {expected}")]
    InputChannels {
        /// The model's name.
        model: String,
        /// Channels the model takes.
        expected: usize,
        /// Channels of the input.
        got: usize,
    },
    /// The input is smaller than the model can take.
    #[error(
        "input {height}x{width} is too small for {model}: {layer} {reason}; the smallest square input it takes is {min}x{min}"
    )]
    InputTooSmall {
        /// The model's name.
        model: String,
        /// Input height.
        height: usize,
        /// Input width.
        width: usize,
        /// The first layer that cannot run.
        layer: String,
        /// What goes wrong there.
        reason: String,
        /// The smallest square input size that passes.
        min: usize,
    },
}
