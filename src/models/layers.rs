//! The building blocks every model shares: a convolution that is dense or versatile by
//! [`Variant`], the plain layers around it, their descriptions ("specs") and how a spec
//! is traced into a [`LayerReport`] without allocating any weight.
//!
//! A model is described once by specs; the same specs build the burn modules
//! ([`ConvSpec::init`], [`FeatureSpec::init`], [`HeadSpec::init`]) and the cost report
//! (`trace`), so the two cannot disagree about a layer.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{
    AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, AvgPool2d, AvgPool2dConfig, MaxPool2d,
    MaxPool2dConfig,
};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Initializer, Linear, LinearConfig,
    PaddingConfig2d, Relu,
};
use burn::tensor::{Device, Tensor};

use crate::cost;
use crate::layer::{
    authors_initializer, conv2d_forward, conv2d_forward_measured, window_out, Activation, Geometry,
    VConv2d, VConv2dConfig,
};

use super::error::ModelError;
use super::report::{LayerReport, VersatileLayout};
use super::variant::{ChannelAmount, ConvKind, Variant};

/// A per-image feature map shape `[channels, height, width]`.
pub type Chw = [usize; 3];

/// How a layer's weights are drawn at initialization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// PyTorch's default for `Conv2d` / `Linear` (Kaiming-uniform, `a = sqrt(5)`, bias
    /// uniform in `±1/sqrt(fan_in)`): burn's default initializer.
    TorchDefault,
    /// Kaiming-normal with `mode='fan_out'` for ReLU, zero bias (torchvision's VGG and
    /// ResNet convolutions, the authors' script).
    KaimingFanOut,
    /// Normal(0, 0.01), zero bias (torchvision's VGG linear layers).
    Normal001,
}

impl Init {
    fn weight_initializer(self) -> Initializer {
        match self {
            Init::TorchDefault => Initializer::KaimingUniform {
                gain: 1.0 / 3.0f64.sqrt(),
                fan_out_only: false,
            },
            Init::KaimingFanOut => authors_initializer(),
            Init::Normal001 => Initializer::Normal {
                mean: 0.0,
                std: 0.01,
            },
        }
    }

    fn zero_bias(self) -> bool {
        !matches!(self, Init::TorchDefault)
    }
}

fn zeros_param(len: usize, device: &Device) -> Param<Tensor<1>> {
    Initializer::Zeros.init([len], device)
}

/// Where a layer failed while tracing shapes and costs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TraceError {
    /// The layer cannot take the feature map it gets.
    TooSmall {
        /// The layer's name.
        layer: String,
        /// What goes wrong.
        reason: String,
    },
    /// The model itself is invalid.
    Model(ModelError),
}

impl From<ModelError> for TraceError {
    fn from(err: ModelError) -> Self {
        TraceError::Model(err)
    }
}

/// The rows of a cost report as they are traced, with the notes layers raise.
#[derive(Debug, Default)]
pub(crate) struct Trace {
    pub rows: Vec<LayerReport>,
    pub notes: Vec<String>,
}

impl Trace {
    fn push(&mut self, row: LayerReport) {
        self.rows.push(row);
    }

    /// A row for a layer with no parameters and no multiply-adds.
    pub fn free(&mut self, name: &str, kind: &'static str, detail: String, output: Vec<usize>) {
        self.push(LayerReport::plain(
            name,
            kind,
            detail,
            output,
            cost::parameter_free(),
        ));
    }
}

type Traced<T> = Result<T, TraceError>;

fn too_small<T>(layer: &str, reason: String) -> Traced<T> {
    Err(TraceError::TooSmall {
        layer: layer.to_string(),
        reason,
    })
}

// ---------------------------------------------------------------------------------------
// Convolution
// ---------------------------------------------------------------------------------------

/// A square convolution of a model, dense or versatile as its variant says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel side.
    pub kernel: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// Dense or versatile, with the resolved channel settings.
    pub kind: ConvKind,
    /// The delta the variant asked for, when this layer had to take a smaller one.
    pub lowered_from: Option<usize>,
    /// Weight initialization.
    pub init: Init,
}

impl ConvSpec {
    /// A `kernel × kernel` convolution `in_channels -> out_channels` under `variant`
    /// (stride 1, no padding, bias, Kaiming-normal fan-out initialization).
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize, variant: &Variant) -> Self {
        let kind = variant.conv_kind(in_channels, kernel);
        let got = match kind {
            ConvKind::Versatile { delta, .. } => delta,
            ConvKind::Dense => 0,
        };
        let lowered_from = match variant {
            // A kernel above `max_kernel` is spatial only by choice, not for lack of room.
            Variant::SpatialChannel(settings)
                if settings.max_kernel.is_none_or(|max| kernel <= max) =>
            {
                match settings.amount {
                    ChannelAmount::Delta(requested) if requested > got => Some(requested),
                    _ => None,
                }
            }
            _ => None,
        };
        Self {
            in_channels,
            out_channels,
            kernel,
            stride: 1,
            padding: 0,
            bias: true,
            kind,
            lowered_from,
            init: Init::KaimingFanOut,
        }
    }

    /// Sets the stride.
    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }

    /// Sets the padding.
    pub fn with_padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }

    /// Sets whether the layer has a bias.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Sets the initialization.
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }

    fn padding_config(&self) -> PaddingConfig2d {
        let p = self.padding;
        PaddingConfig2d::Explicit(p, p, p, p)
    }

    /// The versatile layer's configuration (`None` for a dense layer).
    pub fn vconv_config(&self) -> Option<VConv2dConfig> {
        match self.kind {
            ConvKind::Dense => None,
            ConvKind::Versatile { delta, g, mode } => Some(
                VConv2dConfig::new([self.in_channels, self.out_channels], [self.kernel; 2])
                    .with_stride([self.stride; 2])
                    .with_padding(self.padding_config())
                    .with_bias(self.bias)
                    .with_delta(delta)
                    .with_g(g)
                    .with_channel_mode(mode)
                    .with_initializer(self.init.weight_initializer()),
            ),
        }
    }

    /// The versatile geometry (`None` for a dense layer), or why it is invalid.
    pub fn geometry(&self, name: &str) -> Result<Option<Geometry>, ModelError> {
        self.vconv_config()
            .map(|config| {
                config.geometry().map_err(|source| ModelError::Layer {
                    layer: name.to_string(),
                    source,
                })
            })
            .transpose()
    }

    /// Builds the layer.
    pub fn init(&self, name: &str, device: &Device) -> Result<ConvLayer, ModelError> {
        let zero_bias = self.init.zero_bias();
        match self.vconv_config() {
            None => {
                let mut conv =
                    Conv2dConfig::new([self.in_channels, self.out_channels], [self.kernel; 2])
                        .with_stride([self.stride; 2])
                        .with_padding(self.padding_config())
                        .with_bias(self.bias)
                        .with_initializer(self.init.weight_initializer())
                        .init(device);
                if zero_bias && conv.bias.is_some() {
                    conv.bias = Some(zeros_param(self.out_channels, device));
                }
                Ok(ConvLayer::Dense(conv))
            }
            Some(config) => {
                let mut conv = config
                    .try_init(device)
                    .map_err(|source| ModelError::Layer {
                        layer: name.to_string(),
                        source,
                    })?;
                if zero_bias && conv.bias.is_some() {
                    conv.bias = Some(zeros_param(self.out_channels, device));
                }
                Ok(ConvLayer::Versatile(conv))
            }
        }
    }

    /// Output shape for an input shape, or why the input does not fit.
    pub(crate) fn output(&self, name: &str, input: Chw) -> Traced<Chw> {
        let [c, h, w] = input;
        if c != self.in_channels {
            // Only reachable through a bug in a model table: channels are chained.
            return too_small(
                name,
                format!("gets {c} channels, expects {}", self.in_channels),
            );
        }
        let out = |size| window_out(size, self.kernel, self.stride, self.padding, false);
        match (out(h), out(w)) {
            (Some(oh), Some(ow)) => Ok([self.out_channels, oh, ow]),
            _ => too_small(
                name,
                format!(
                    "(a {k}x{k} convolution, padding {p}) gets a {h}x{w} map, smaller than its kernel",
                    k = self.kernel,
                    p = self.padding
                ),
            ),
        }
    }

    /// Traces the layer: one report row, the output shape.
    pub(crate) fn trace(&self, name: &str, input: Chw, trace: &mut Trace) -> Traced<Chw> {
        let output = self.output(name, input)?;
        let out_hw = [output[1], output[2]];
        let k = self.kernel;
        let base = format!(
            "{}->{} {k}x{k} s{} p{}{}",
            self.in_channels,
            self.out_channels,
            self.stride,
            self.padding,
            if self.bias { "" } else { " no-bias" }
        );
        let row = match self.geometry(name)? {
            None => LayerReport::plain(
                name,
                "Conv2d",
                base,
                output.to_vec(),
                cost::conv2d(
                    [self.in_channels, self.out_channels],
                    [k, k],
                    1,
                    self.bias,
                    out_hw,
                ),
            ),
            Some(geometry) => {
                let g = &geometry;
                let detail = if g.delta == 0 {
                    format!("{base}, s={} m={}", g.s, g.primary)
                } else {
                    format!(
                        "{base}, s={} n_c={} (delta {}, g {}, {}) m={}",
                        g.s, g.n_c, g.delta, g.g, g.mode, g.primary
                    )
                };
                LayerReport {
                    name: name.to_string(),
                    kind: "VConv2d",
                    detail,
                    output: output.to_vec(),
                    cost: cost::vconv2d(g, self.bias, out_hw),
                    params_dense: cost::dense_twin_params(g, self.bias),
                    params_authors: cost::authors_allocation_params(g, self.bias),
                    versatile: Some(VersatileLayout::from(g)),
                }
            }
        };
        if let Some(requested) = self.lowered_from {
            let got = match self.kind {
                ConvKind::Versatile { delta, .. } => delta,
                ConvKind::Dense => 0,
            };
            trace.notes.push(format!(
                "{name}: {} input channel(s) leave room for delta = {got} only (asked {requested}){}",
                self.in_channels,
                if got == 0 { ", so its channel windows are off" } else { "" }
            ));
        }
        trace.push(row);
        Ok(output)
    }
}

/// A convolution that is a plain `Conv2d` or a `VConv2d`, by the model's variant.
#[derive(Module, Debug)]
pub enum ConvLayer {
    /// A dense convolution, run through [`conv2d_forward`].
    Dense(Conv2d),
    /// A versatile convolution.
    Versatile(VConv2d),
}

impl ConvLayer {
    /// Applies the convolution.
    ///
    /// # Shapes
    /// - `input`: `[batch, channels_in, height, width]`
    /// - output: `[batch, channels_out, out_h, out_w]`
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        match self {
            ConvLayer::Dense(conv) => conv2d_forward(conv, input),
            ConvLayer::Versatile(conv) => conv.forward(input),
        }
    }

    /// [`forward`](Self::forward), with the batch statistics of the output where the
    /// kernel takes them as it writes it (f32 on `Flex`; see
    /// [`crate::layer::fused::nested_conv2d_measured`]), for the training batch norm
    /// that follows.
    ///
    /// # Shapes
    /// - `input`: `[batch, channels_in, height, width]`
    /// - output: `[batch, channels_out, out_h, out_w]`, statistics `[2, channels_out]`
    pub fn forward_measured(&self, input: Tensor<4>) -> Activation {
        let (values, batch_stats) = match self {
            ConvLayer::Dense(conv) => conv2d_forward_measured(conv, input, true),
            ConvLayer::Versatile(conv) => conv.forward_measured(input, true),
        };
        Activation {
            values,
            batch_stats,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pooling
// ---------------------------------------------------------------------------------------

/// A square max or average pooling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpec {
    /// Window side.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding on every side.
    pub padding: usize,
    /// Ceiling instead of floor for the output size (PyTorch's `ceil_mode`).
    pub ceil: bool,
}

impl PoolSpec {
    /// A `kernel × kernel` window with stride `stride`, no padding, floor mode.
    pub fn new(kernel: usize, stride: usize) -> Self {
        Self {
            kernel,
            stride,
            padding: 0,
            ceil: false,
        }
    }

    /// Sets the padding.
    pub fn with_padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }

    /// Sets ceil mode.
    pub fn with_ceil(mut self, ceil: bool) -> Self {
        self.ceil = ceil;
        self
    }

    fn padding_config(&self) -> PaddingConfig2d {
        let p = self.padding;
        PaddingConfig2d::Explicit(p, p, p, p)
    }

    /// Builds a max pooling layer.
    pub fn max_pool(&self) -> MaxPool2d {
        MaxPool2dConfig::new([self.kernel; 2])
            .with_strides([self.stride; 2])
            .with_padding(self.padding_config())
            .with_ceil_mode(self.ceil)
            .init()
    }

    /// Builds an average pooling layer.
    pub fn avg_pool(&self) -> AvgPool2d {
        AvgPool2dConfig::new([self.kernel; 2])
            .with_strides([self.stride; 2])
            .with_padding(self.padding_config())
            .with_ceil_mode(self.ceil)
            .init()
    }

    fn detail(&self) -> String {
        format!(
            "{k}x{k} s{} p{}{}",
            self.stride,
            self.padding,
            if self.ceil { " ceil" } else { "" },
            k = self.kernel
        )
    }

    fn output(&self, name: &str, kind: &str, input: Chw) -> Traced<Chw> {
        let [c, h, w] = input;
        let out = |size| window_out(size, self.kernel, self.stride, self.padding, self.ceil);
        match (out(h), out(w)) {
            (Some(oh), Some(ow)) if oh > 0 && ow > 0 => Ok([c, oh, ow]),
            _ => too_small(
                name,
                format!(
                    "(a {k}x{k} {kind}, padding {p}) gets a {h}x{w} map, smaller than its window",
                    k = self.kernel,
                    p = self.padding
                ),
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Feature layers (4D) and head layers (2D)
// ---------------------------------------------------------------------------------------

/// A layer on feature maps `[N, C, H, W]`.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureSpec {
    /// A convolution.
    Conv(ConvSpec),
    /// Batch norm over this many channels (weight 1, bias 0 at initialization).
    BatchNorm(usize),
    /// ReLU.
    Relu,
    /// Max pooling.
    MaxPool(PoolSpec),
    /// Average pooling (padding counted, as PyTorch's default).
    AvgPool(PoolSpec),
}

/// A layer on feature maps `[N, C, H, W]`, built from a [`FeatureSpec`].
#[derive(Module, Debug)]
pub enum FeatureLayer {
    /// A convolution.
    Conv(ConvLayer),
    /// Batch norm.
    BatchNorm(BatchNorm),
    /// ReLU.
    Relu(Relu),
    /// Max pooling.
    MaxPool(MaxPool2d),
    /// Average pooling.
    AvgPool(AvgPool2d),
}

impl FeatureSpec {
    /// Builds the layer.
    pub fn init(&self, name: &str, device: &Device) -> Result<FeatureLayer, ModelError> {
        Ok(match self {
            FeatureSpec::Conv(conv) => FeatureLayer::Conv(conv.init(name, device)?),
            FeatureSpec::BatchNorm(channels) => {
                FeatureLayer::BatchNorm(BatchNormConfig::new(*channels).init(device))
            }
            FeatureSpec::Relu => FeatureLayer::Relu(Relu::new()),
            FeatureSpec::MaxPool(pool) => FeatureLayer::MaxPool(pool.max_pool()),
            FeatureSpec::AvgPool(pool) => FeatureLayer::AvgPool(pool.avg_pool()),
        })
    }

    /// Traces the layer: one report row, the output shape.
    pub(crate) fn trace(&self, name: &str, input: Chw, trace: &mut Trace) -> Traced<Chw> {
        match self {
            FeatureSpec::Conv(conv) => conv.trace(name, input, trace),
            FeatureSpec::BatchNorm(channels) => {
                let [_, h, w] = input;
                trace.push(LayerReport::plain(
                    name,
                    "BatchNorm2d",
                    channels.to_string(),
                    input.to_vec(),
                    cost::batch_norm2d(*channels, [h, w]),
                ));
                Ok(input)
            }
            FeatureSpec::Relu => {
                trace.free(name, "ReLU", String::new(), input.to_vec());
                Ok(input)
            }
            FeatureSpec::MaxPool(pool) => {
                let output = pool.output(name, "max pool", input)?;
                trace.free(name, "MaxPool2d", pool.detail(), output.to_vec());
                Ok(output)
            }
            FeatureSpec::AvgPool(pool) => {
                let output = pool.output(name, "average pool", input)?;
                trace.free(name, "AvgPool2d", pool.detail(), output.to_vec());
                Ok(output)
            }
        }
    }
}

/// A fully connected layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearSpec {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Initialization.
    pub init: Init,
}

impl LinearSpec {
    /// A `d_input -> d_output` layer with PyTorch's default `nn.Linear` initialisation.
    pub fn torch_default(d_input: usize, d_output: usize) -> Self {
        LinearSpec {
            d_input,
            d_output,
            init: Init::TorchDefault,
        }
    }

    /// Builds the layer.
    pub fn init(&self, device: &Device) -> Linear {
        let mut linear = LinearConfig::new(self.d_input, self.d_output)
            .with_initializer(self.init.weight_initializer())
            .init(device);
        if self.init.zero_bias() {
            linear.bias = Some(zeros_param(self.d_output, device));
        }
        linear
    }
}

/// A layer on feature vectors `[N, F]`.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadSpec {
    /// A linear layer (with bias).
    Linear(LinearSpec),
    /// ReLU.
    Relu,
    /// Dropout with this probability (active only while training).
    Dropout(f64),
}

/// A layer on feature vectors `[N, F]`, built from a [`HeadSpec`].
#[derive(Module, Debug)]
pub enum HeadLayer {
    /// A linear layer.
    Linear(Linear),
    /// ReLU.
    Relu(Relu),
    /// Dropout.
    Dropout(Dropout),
}

impl HeadSpec {
    /// Builds the layer.
    pub fn init(&self, device: &Device) -> HeadLayer {
        match self {
            HeadSpec::Linear(spec) => HeadLayer::Linear(spec.init(device)),
            HeadSpec::Relu => HeadLayer::Relu(Relu::new()),
            HeadSpec::Dropout(prob) => HeadLayer::Dropout(DropoutConfig::new(*prob).init()),
        }
    }

    /// Traces the layer on `features` inputs; returns the output features.
    pub(crate) fn trace(&self, name: &str, features: usize, trace: &mut Trace) -> Traced<usize> {
        match self {
            HeadSpec::Linear(spec) => {
                if spec.d_input != features {
                    return too_small(
                        name,
                        format!("gets {features} features, expects {}", spec.d_input),
                    );
                }
                trace.push(LayerReport::plain(
                    name,
                    "Linear",
                    format!("{}->{}", spec.d_input, spec.d_output),
                    vec![spec.d_output],
                    cost::linear(spec.d_input, spec.d_output, true),
                ));
                Ok(spec.d_output)
            }
            HeadSpec::Relu => {
                trace.free(name, "ReLU", String::new(), vec![features]);
                Ok(features)
            }
            HeadSpec::Dropout(prob) => {
                trace.free(name, "Dropout", format!("p={prob}"), vec![features]);
                Ok(features)
            }
        }
    }
}

/// Adaptive average pooling to `size`, as a traced row.
pub(crate) fn trace_adaptive_pool(
    name: &str,
    size: [usize; 2],
    input: Chw,
    trace: &mut Trace,
) -> Chw {
    let output = [input[0], size[0], size[1]];
    trace.free(
        name,
        "AdaptiveAvgPool2d",
        format!("{}x{}", size[0], size[1]),
        output.to_vec(),
    );
    output
}

/// Builds an adaptive average pooling layer.
pub(crate) fn adaptive_pool(size: [usize; 2]) -> AdaptiveAvgPool2d {
    AdaptiveAvgPool2dConfig::new(size).init()
}

/// Builds a sequence of feature layers named `prefix.i`.
pub(crate) fn init_features(
    prefix: &str,
    specs: &[FeatureSpec],
    device: &Device,
) -> Result<Vec<FeatureLayer>, ModelError> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| spec.init(&format!("{prefix}.{i}"), device))
        .collect()
}

/// Traces a sequence of feature layers named `prefix.i`.
pub(crate) fn trace_features(
    prefix: &str,
    specs: &[FeatureSpec],
    mut shape: Chw,
    trace: &mut Trace,
) -> Traced<Chw> {
    for (i, spec) in specs.iter().enumerate() {
        shape = spec.trace(&format!("{prefix}.{i}"), shape, trace)?;
    }
    Ok(shape)
}

/// Traces a sequence of head layers named `prefix.i`.
pub(crate) fn trace_head(
    prefix: &str,
    specs: &[HeadSpec],
    mut features: usize,
    trace: &mut Trace,
) -> Traced<usize> {
    for (i, spec) in specs.iter().enumerate() {
        features = spec.trace(&format!("{prefix}.{i}"), features, trace)?;
    }
    Ok(features)
}
