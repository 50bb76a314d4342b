//! `VConv2dConfig` / `VConv2d`: a drop-in for burn's `Conv2dConfig` / `Conv2d` built
//! from versatile filters.

use burn::config::Config;
use burn::module::{Content, DisplaySettings, Module, ModuleDisplay, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{Initializer, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use super::dense;
use super::error::{VConvConfigError, VConvShapeError};
use super::fused::{self, ForwardPath};
use super::geometry::{ChannelMode, Geometry, GeometrySpec, PaddingPairs};

/// Configuration of a [versatile 2D convolution](VConv2d), created with
/// [`init`](VConv2dConfig::init) or [`try_init`](VConv2dConfig::try_init).
///
/// Mirrors burn's `Conv2dConfig` field for field, so a model switches by changing
/// `Conv2dConfig::new([c, n], [d, d])` to `VConv2dConfig::new([c, n], [d, d])`; the
/// versatile settings (`delta`, `g`, `channel_mode`) default to spatial-only filters.
#[derive(Config, Debug)]
pub struct VConv2dConfig {
    /// The number of channels `[in, out]`.
    pub channels: [usize; 2],
    /// The size of the kernel (square: `[d, d]`).
    pub kernel_size: [usize; 2],
    /// The stride of the convolution.
    #[config(default = "[1, 1]")]
    pub stride: [usize; 2],
    /// Spacing between kernel elements.
    #[config(default = "[1, 1]")]
    pub dilation: [usize; 2],
    /// Controls the connections between input and output channels (spatial-only
    /// versatile filters; the primary filter count must be divisible by it).
    #[config(default = "1")]
    pub groups: usize,
    /// The padding configuration, resolved exactly as burn's `Conv2d` does.
    #[config(default = "PaddingConfig2d::Valid")]
    pub padding: PaddingConfig2d,
    /// If bias should be added to the output (one value per output channel).
    #[config(default = true)]
    pub bias: bool,
    /// Channel offset range `delta` of the channel secondary filters (`0` = spatial only).
    #[config(default = 0)]
    pub delta: usize,
    /// Channel stride `g` between channel windows; must divide `delta`.
    #[config(default = 1)]
    pub g: usize,
    /// How channel windows share weights.
    #[config(default = "ChannelMode::Shared")]
    pub channel_mode: ChannelMode,
    /// Initializer of the weight and bias; the default is `Conv2d`'s. The authors'
    /// Kaiming-normal fan-out is [`authors_initializer`].
    #[config(default = "Initializer::KaimingUniform{gain:1.0/3.0f64.sqrt(),fan_out_only:false}")]
    pub initializer: Initializer,
}

/// The authors' initialization: Kaiming-normal with `mode='fan_out'` for ReLU networks
/// (`std = sqrt(2 / (m * d * d))`, `m` the primary filters), as in their VGG script.
/// Set their zero bias separately (`Initializer::Zeros` through a model's init).
pub fn authors_initializer() -> Initializer {
    Initializer::KaimingNormal {
        gain: std::f64::consts::SQRT_2,
        fan_out_only: true,
    }
}

/// Applies a versatile 2D convolution (SPEC section 1) over input tensors.
///
/// The trainable weight holds only the primary filters, `[m, depth, d, d]` with
/// `depth = c - delta` (shared), `c` (sliding) or `c / groups` (grouped); the output has
/// the shape of the dense `Conv2d` with the same settings, channels in the block layout
/// (crop outer, channel window inner, `m` primaries per block).
///
/// Should be created with [`VConv2dConfig`].
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct VConv2d {
    /// Primary filters, `[m, depth, d, d]`.
    pub weight: Param<Tensor<4>>,
    /// Bias, `[n]`, one value per output channel in the block layout.
    pub bias: Option<Param<Tensor<1>>>,
    /// The validated layout of the layer (read with [`VConv2d::geometry`]; private, so
    /// it always matches the weight it was built with).
    #[module(skip)]
    geometry: Geometry,
    /// The padding configuration.
    #[module(skip)]
    pub padding: PaddingConfig2d,
    /// Which implementation runs the forward and backward passes (default
    /// [`ForwardPath::Auto`]: the fused nested kernel on the CPU, the dense form
    /// elsewhere). Set with [`with_path`](VConv2d::with_path).
    #[module(skip)]
    pub path: ForwardPath,
}

impl VConv2dConfig {
    /// The validated geometry this configuration describes.
    pub fn geometry(&self) -> Result<Geometry, VConvConfigError> {
        Geometry::new(GeometrySpec {
            in_channels: self.channels[0],
            out_channels: self.channels[1],
            kernel_size: self.kernel_size,
            stride: self.stride,
            dilation: self.dilation,
            groups: self.groups,
            delta: self.delta,
            g: self.g,
            mode: self.channel_mode,
        })
    }

    /// Checks the configuration without allocating anything.
    pub fn validate(&self) -> Result<(), VConvConfigError> {
        self.geometry().map(|_| ())
    }

    /// Initializes a [`VConv2d`], or says why the configuration is invalid.
    pub fn try_init(&self, device: &Device) -> Result<VConv2d, VConvConfigError> {
        let geometry = self.geometry()?;
        let shape = geometry.weight_shape();
        let area = geometry.kernel * geometry.kernel;
        // Fans as PyTorch computes them on the authors' `[m, c, d, d]` weight.
        let fan_in = geometry.in_channels / geometry.groups * area;
        let fan_out = geometry.primary / geometry.groups * area;
        let weight = self
            .initializer
            .init_with(shape, Some(fan_in), Some(fan_out), device);
        let bias = self.bias.then(|| {
            self.initializer
                .init_with([geometry.out_channels], Some(fan_in), Some(fan_out), device)
        });
        Ok(VConv2d {
            weight,
            bias,
            geometry,
            padding: self.padding.clone(),
            path: ForwardPath::Auto,
        })
    }

    /// Initializes a [`VConv2d`].
    ///
    /// # Panics
    /// If the configuration is invalid, with the message of [`VConvConfigError`].
    pub fn init(&self, device: &Device) -> VConv2d {
        self.try_init(device)
            .unwrap_or_else(|err| panic!("invalid VConv2dConfig: {err}"))
    }
}

impl VConv2d {
    /// Applies the forward pass on the input tensor.
    ///
    /// # Shapes
    /// - `input`: `[batch_size, channels_in, height_in, width_in]`
    /// - `output`: `[batch_size, channels_out, height_out, width_out]`, the shape of the
    ///   dense `Conv2d` with the same settings
    ///
    /// # Panics
    /// If the input does not fit the layer (see [`try_forward`](Self::try_forward)).
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        self.forward_measured(input, false).0
    }

    /// [`forward`](Self::forward), with the batch statistics of the output as
    /// [`try_forward_measured`](Self::try_forward_measured) gives them.
    ///
    /// # Panics
    /// If the input does not fit the layer.
    pub fn forward_measured(
        &self,
        input: Tensor<4>,
        batch_stats: bool,
    ) -> (Tensor<4>, Option<Tensor<2>>) {
        self.try_forward_measured(input, batch_stats)
            .unwrap_or_else(|err| panic!("VConv2d forward: {err}"))
    }

    /// The forward pass, or an error when the input has the wrong channel count or is
    /// smaller than the (dilated) kernel after padding.
    pub fn try_forward(&self, input: Tensor<4>) -> Result<Tensor<4>, VConvShapeError> {
        Ok(self.try_forward_measured(input, false)?.0)
    }

    /// [`try_forward`](Self::try_forward), and the batch statistics of its output where
    /// `batch_stats` asks for them and the fused kernel takes them as it writes the
    /// output (see [`fused::nested_conv2d_measured`]); `None` elsewhere.
    ///
    /// # Shapes
    /// - `input`: `[batch_size, channels_in, height_in, width_in]`
    /// - output: as [`forward`](Self::forward); statistics `[2, channels_out]`
    pub fn try_forward_measured(
        &self,
        input: Tensor<4>,
        batch_stats: bool,
    ) -> Result<(Tensor<4>, Option<Tensor<2>>), VConvShapeError> {
        let dims = input.dims();
        let pads = self.check_input(&dims)?;
        let weight = self.weight.val();
        let bias = self.bias.as_ref().map(|b| b.val());
        self.check_parameters(&weight, bias.as_ref())?;
        let fused = self.fused_for(&input, &weight, bias.as_ref())?;
        Ok(if fused {
            let plan = self.geometry.plan(dims, pads)?;
            fused::nested_conv2d_measured(input, weight, bias, plan, batch_stats)
        } else {
            (
                dense::forward(input, weight, bias, &self.geometry, pads),
                None,
            )
        })
    }

    /// The path a forward pass on `input` takes: [`ForwardPath::Fused`] or
    /// [`ForwardPath::DenseForm`] (an error when the fused kernel is forced on tensors it
    /// cannot take).
    pub fn path_for(&self, input: &Tensor<4>) -> Result<ForwardPath, VConvShapeError> {
        let weight = self.weight.val();
        let bias = self.bias.as_ref().map(|b| b.val());
        Ok(match self.fused_for(input, &weight, bias.as_ref())? {
            true => ForwardPath::Fused,
            false => ForwardPath::DenseForm,
        })
    }

    /// Whether the fused kernel runs on these tensors, following [`VConv2d::path`] and the
    /// process-wide pin of [`ForwardPath::Auto`].
    fn fused_for(
        &self,
        input: &Tensor<4>,
        weight: &Tensor<4>,
        bias: Option<&Tensor<1>>,
    ) -> Result<bool, VConvShapeError> {
        let supported = fused::nested_supported(input, weight, bias);
        let path = match self.path {
            ForwardPath::Auto => fused::auto_path(),
            path => path,
        };
        match path {
            ForwardPath::Auto => Ok(supported),
            ForwardPath::Fused if supported => Ok(true),
            ForwardPath::Fused => Err(VConvShapeError::FusedUnavailable {
                device: format!("{:?}", input.device()),
                input_dtype: format!("{:?}", input.dtype()),
                weight_dtype: format!("{:?}", weight.dtype()),
            }),
            ForwardPath::DenseForm => Ok(false),
        }
    }

    /// The layer's geometry: channels, kernel, windows and the output channel layout.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Checks that the weight and bias (public, so replaceable) still have the shapes
    /// of the layer's geometry.
    fn check_parameters(
        &self,
        weight: &Tensor<4>,
        bias: Option<&Tensor<1>>,
    ) -> Result<(), VConvShapeError> {
        let expected = self.geometry.weight_shape();
        if weight.dims() != expected {
            return Err(VConvShapeError::Weight {
                what: "weight",
                expected: expected.to_vec(),
                got: weight.dims().to_vec(),
            });
        }
        if let Some(bias) = bias {
            if bias.dims() != [self.geometry.out_channels] {
                return Err(VConvShapeError::Weight {
                    what: "bias",
                    expected: vec![self.geometry.out_channels],
                    got: bias.dims().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// This layer with its forward path set (see [`ForwardPath`]).
    pub fn with_path(mut self, path: ForwardPath) -> Self {
        self.path = path;
        self
    }

    /// Checks an input shape `[batch, c, h, w]` and resolves the padding for it.
    pub fn check_input(&self, dims: &[usize; 4]) -> Result<PaddingPairs, VConvShapeError> {
        let [_, channels, height, width] = *dims;
        if channels != self.geometry.in_channels {
            return Err(VConvShapeError::InputChannels {
                expected: self.geometry.in_channels,
                got: channels,
            });
        }
        let pads = self.geometry.resolve_padding(&self.padding, height, width);
        self.geometry.output_size(height, width, pads)?;
        Ok(pads)
    }

    /// Output shape `[batch, n, out_h, out_w]` for an input shape.
    pub fn output_shape(&self, dims: [usize; 4]) -> Result<[usize; 4], VConvShapeError> {
        let pads = self.check_input(&dims)?;
        let [out_h, out_w] = self.geometry.output_size(dims[2], dims[3], pads)?;
        Ok([dims[0], self.geometry.out_channels, out_h, out_w])
    }

    /// The unfolded dense weight `[n, c / groups, d, d]`, rows in the dense order.
    /// Differentiable with respect to the primary weight.
    pub fn dense_weight(&self) -> Tensor<4> {
        dense::dense_weight(self.weight.val(), &self.geometry)
    }

    /// The dense output channel order: dense channel `k` is block-layout channel
    /// `order[k]` (the identity unless `groups > 1`).
    pub fn dense_order(&self) -> Vec<usize> {
        self.geometry.dense_order()
    }

    /// An equivalent plain `Conv2d` (the export form), with the dense channel order:
    /// `conv.forward(x)` channel `k` equals `self.forward(x)` channel `order[k]`.
    /// Its parameters are new leaves, detached from this layer's.
    pub fn to_conv2d(&self) -> (Conv2d, Vec<usize>) {
        let geometry = &self.geometry;
        let conv = Conv2d {
            weight: Param::from_tensor(self.dense_weight().detach()),
            bias: self
                .bias
                .as_ref()
                .map(|b| Param::from_tensor(dense::dense_bias(b.val(), geometry).detach())),
            stride: geometry.stride,
            kernel_size: [geometry.kernel, geometry.kernel],
            dilation: geometry.dilation,
            groups: geometry.groups,
            padding: self.padding.clone(),
        };
        (conv, self.dense_order())
    }

    /// Shape of the authors' checkpoint weight, `[m, c, d, d]` (`[m, c / groups, d, d]`
    /// for grouped layers).
    pub fn authors_weight_shape(&self) -> [usize; 4] {
        let g = &self.geometry;
        [g.primary, g.in_channels / g.groups, g.kernel, g.kernel]
    }

    /// Replaces the primary weight with one in the authors' layout `[m, c, d, d]`: in
    /// shared mode the last `delta` input channels are unused and ignored.
    pub fn load_authors_weight(mut self, weight: Tensor<4>) -> Result<Self, VConvShapeError> {
        let expected = self.authors_weight_shape();
        if weight.dims() != expected {
            return Err(VConvShapeError::Weight {
                what: "authors' VConv2d weight",
                expected: expected.to_vec(),
                got: weight.dims().to_vec(),
            });
        }
        let primary = weight.narrow(1, 0, self.geometry.weight_depth()).detach();
        self.weight = Param::from_tensor(primary);
        Ok(self)
    }
}

impl ModuleDisplay for VConv2d {
    fn custom_settings(&self) -> Option<DisplaySettings> {
        DisplaySettings::new()
            .with_new_line_after_attribute(false)
            .optional()
    }

    fn custom_content(&self, content: Content) -> Option<Content> {
        let g = &self.geometry;
        content
            .add("ch_in", &g.in_channels)
            .add("ch_out", &g.out_channels)
            .add("kernel_size", &format!("{:?}", [g.kernel, g.kernel]))
            .add("stride", &format!("{:?}", g.stride))
            .add("dilation", &format!("{:?}", g.dilation))
            .add("groups", &g.groups)
            .add("delta", &g.delta)
            .add("g", &g.g)
            .add("channel_mode", &g.mode.to_string())
            .add("primary", &g.primary)
            .add_debug_attribute("padding", &self.padding)
            .optional()
    }
}
