//! The model zoo: the networks of the paper and the authors' code, each with a
//! [`Variant`] switch (dense, spatial, spatial + channel versatile filters), and their
//! per-layer cost reports.
//!
//! Build any model by name, variant, classes and input channels:
//!
//! ```no_run
//! use burn::tensor::{Device, Tensor};
//! use versatile::models::{ImageClassifier, ModelConfig};
//!
//! let device = Device::flex();
//! let config = ModelConfig::parse("vgg_small", "spatial")?
//!     .with_in_channels(1)
//!     .with_num_classes(10);
//! let report = config.cost_report([28, 28])?; // no weights allocated
//! println!("{} parameters", report.total().params);
//! let model = config.init(&device)?;
//! let logits = model.try_forward(Tensor::<4>::zeros([8, 1, 28, 28], &device))?; // [8, 10]
//! # Ok::<(), versatile::models::ModelError>(())
//! ```
//!
//! Every model is described once by specs (the `plan`); the same specs build the burn
//! modules and trace the cost report, so the report describes exactly the module that
//! runs. Its forward pass is described once too, as a walk over its layers
//! ([`forward`]) that burn's modules, the compiled inference plan (`crate::infer`) and
//! the ONNX export each follow. Names are listed by [`models()`]; the variant syntax is in [`variant`].

mod alexnet;
mod convnet;
mod error;
pub mod forward;
pub mod layers;
mod lenet;
pub mod reference;
mod registry;
pub mod report;
pub mod resnet;
pub mod variant;
pub mod vgg;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use convnet::{ConvNet, ConvNetPlan};
pub use error::ModelError;
pub use forward::{Forward, Modules};
pub use layers::{ConvLayer, ConvSpec, FeatureLayer, HeadLayer};
pub use registry::{models, Arch, ModelInfo};
pub use report::{CostReport, LayerReport, CONVENTION};
pub use resnet::{ResNet, ResNetDepth, ResNetPlan};
pub use variant::{ChannelAmount, ChannelSettings, ChannelStep, ConvKind, Variant};
pub use vgg::{VggArch, VggHead, VggItem, VggTable};

use layers::{Trace, TraceError};

/// Largest input side searched for a model's minimum input, and the largest input side
/// a checkpoint's preprocessing may ask for.
pub const MAX_INPUT_SIDE: usize = 4096;

/// Most channels of any layer (input, convolution, hidden width): far above the zoo's
/// widest (4096), low enough that a description read from a file cannot ask for layers
/// no machine holds.
pub const MAX_CHANNELS: usize = 1 << 16;
/// Most output classes (ImageNet-21k has 21,841).
pub const MAX_CLASSES: usize = 1 << 20;
/// Most entries (convolutions and pools) of a VGG table (VGG-19 has 21).
pub const MAX_VGG_ENTRIES: usize = 256;

/// [`ModelError::TooLarge`] when `value` exceeds `max`.
pub(crate) fn at_most(what: &'static str, value: usize, max: usize) -> Result<(), ModelError> {
    if value > max {
        return Err(ModelError::TooLarge { what, value, max });
    }
    Ok(())
}

/// What to build: an architecture, its variant, the number of classes and input
/// channels. Serializes as `{"arch": "vgg16_bn", "variant": "spatial", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Arch,
    /// Dense or versatile.
    pub variant: Variant,
    /// Output classes.
    pub num_classes: usize,
    /// Input channels (1 for Fashion-MNIST, 3 for RGB).
    pub in_channels: usize,
}

/// A model's layer plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// VGG, AlexNet, LeNet-5.
    ConvNet(ConvNetPlan),
    /// ResNet.
    ResNet(ResNetPlan),
}

impl ModelConfig {
    /// `arch` under `variant`, with the architecture's default classes and input
    /// channels.
    pub fn new(arch: Arch, variant: Variant) -> Self {
        Self {
            num_classes: arch.default_classes(),
            in_channels: arch.default_in_channels(),
            arch,
            variant,
        }
    }

    /// Parses a model name and a variant (see [`models()`] and [`variant`]).
    pub fn parse(name: &str, variant: &str) -> Result<Self, ModelError> {
        Ok(Self::new(name.parse()?, variant.parse()?))
    }

    /// Sets the number of classes.
    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    /// Sets the number of input channels.
    pub fn with_in_channels(mut self, in_channels: usize) -> Self {
        self.in_channels = in_channels;
        self
    }

    /// The same model with dense convolutions.
    pub fn dense_twin(&self) -> Self {
        Self {
            variant: Variant::Dense,
            ..self.clone()
        }
    }

    /// The model's name, e.g. `vgg16_bn`.
    pub fn name(&self) -> String {
        self.arch.to_string()
    }

    /// The layer plan, or why the settings are invalid (zero or beyond the limits
    /// [`MAX_CLASSES`], [`MAX_CHANNELS`], [`MAX_VGG_ENTRIES`]).
    pub fn plan(&self) -> Result<Plan, ModelError> {
        if self.num_classes == 0 {
            return Err(ModelError::Zero {
                what: "num_classes",
            });
        }
        if self.in_channels == 0 {
            return Err(ModelError::Zero {
                what: "in_channels",
            });
        }
        at_most("num_classes", self.num_classes, MAX_CLASSES)?;
        at_most("in_channels", self.in_channels, MAX_CHANNELS)?;
        if let Arch::Vgg(vgg) = &self.arch {
            vgg.check_limits()?;
        }
        let (v, c, k) = (&self.variant, self.in_channels, self.num_classes);
        Ok(match &self.arch {
            Arch::Vgg(vgg) => Plan::ConvNet(vgg.plan(v, c, k)),
            Arch::AlexNet => Plan::ConvNet(alexnet::plan(v, c, k)),
            Arch::LeNet5 => Plan::ConvNet(lenet::plan(v, c, k)),
            Arch::ResNet(depth) => Plan::ResNet(ResNetPlan::new(*depth, v, c, k)),
        })
    }

    fn trace(&self, plan: &Plan, height: usize, width: usize) -> Result<Trace, TraceError> {
        let mut trace = Trace::default();
        let input = [self.in_channels, height, width];
        match plan {
            Plan::ConvNet(plan) => plan.trace(input, &mut trace)?,
            Plan::ResNet(plan) => plan.trace(input, &mut trace)?,
        };
        Ok(trace)
    }

    /// The smallest square input side the model takes (`None` if none up to 4096).
    pub fn min_input(&self) -> Option<usize> {
        let plan = self.plan().ok()?;
        (1..=MAX_INPUT_SIDE).find(|&side| self.trace(&plan, side, side).is_ok())
    }

    /// The per-layer cost report for one `[height, width]` image.
    pub fn cost_report(&self, input_hw: [usize; 2]) -> Result<CostReport, ModelError> {
        let plan = self.plan()?;
        let [height, width] = input_hw;
        match self.trace(&plan, height, width) {
            Ok(trace) => Ok(CostReport {
                model: self.name(),
                variant: self.variant.to_string(),
                input: [self.in_channels, height, width],
                num_classes: self.num_classes,
                layers: trace.rows,
                notes: trace.notes,
            }),
            Err(TraceError::Model(err)) => Err(err),
            Err(TraceError::TooSmall { layer, reason }) => Err(ModelError::InputTooSmall {
                model: self.name(),
                height,
                width,
                layer,
                reason,
                min: self.min_input().unwrap_or(0),
            }),
        }
    }

    /// Checks that a batch of shape `[N, C, H, W]` fits the model.
    pub fn check_input(&self, dims: [usize; 4]) -> Result<(), ModelError> {
        let [_, channels, height, width] = dims;
        if channels != self.in_channels {
            return Err(ModelError::InputChannels {
                model: self.name(),
                expected: self.in_channels,
                got: channels,
            });
        }
        self.cost_report([height, width]).map(|_| ())
    }

    /// Builds the model with fresh weights (initialized as torchvision / the authors).
    pub fn init(&self, device: &Device) -> Result<Model, ModelError> {
        Ok(match self.plan()? {
            Plan::ConvNet(plan) => Model::ConvNet(plan.init(self.clone(), device)?),
            Plan::ResNet(plan) => Model::ResNet(plan.init(self.clone(), device)?),
        })
    }
}

/// What every model of the zoo offers: its configuration, a forward pass from images
/// to logits, and its cost report.
pub trait ImageClassifier {
    /// What the model was built from.
    fn config(&self) -> &ModelConfig;

    /// Logits for a batch of images, without checking the input first.
    ///
    /// # Shapes
    /// - `input`: `[batch, in_channels, height, width]`
    /// - output: `[batch, num_classes]`
    ///
    /// # Panics
    /// Somewhere inside burn if the input does not fit; use
    /// [`try_forward`](Self::try_forward) for a clear error.
    fn forward_unchecked(&self, input: Tensor<4>) -> Tensor<2>;

    /// Logits for a batch of images, or a [`ModelError`] when the input has the wrong
    /// number of channels or is smaller than the model takes.
    fn try_forward(&self, input: Tensor<4>) -> Result<Tensor<2>, ModelError> {
        self.config().check_input(input.dims())?;
        Ok(self.forward_unchecked(input))
    }

    /// Logits for a batch of images.
    ///
    /// # Panics
    /// With the [`ModelError`]'s message when the input does not fit.
    fn forward(&self, input: Tensor<4>) -> Tensor<2> {
        self.try_forward(input)
            .unwrap_or_else(|err| panic!("model forward: {err}"))
    }

    /// The per-layer cost report for one `[height, width]` image.
    fn cost_report(&self, input_hw: [usize; 2]) -> Result<CostReport, ModelError> {
        self.config().cost_report(input_hw)
    }
}

/// Any model of the zoo.
///
/// Record keys are those of the network inside (torchvision's and the authors'), with
/// burn's enum variant names in between (`ConvNet`, `Dense`, `Versatile`, `Conv`, ...),
/// which burn-store skips with its enum-variant option.
// A model is built once and moved rarely; boxing is not available to burn modules.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Model {
    /// VGG, AlexNet or LeNet-5.
    ConvNet(ConvNet),
    /// ResNet.
    ResNet(ResNet),
}

impl ImageClassifier for ConvNet {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward_unchecked(&self, input: Tensor<4>) -> Tensor<2> {
        ConvNet::forward_unchecked(self, input)
    }
}

impl ImageClassifier for ResNet {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward_unchecked(&self, input: Tensor<4>) -> Tensor<2> {
        ResNet::forward_unchecked(self, input)
    }
}

impl ImageClassifier for Model {
    fn config(&self) -> &ModelConfig {
        match self {
            Model::ConvNet(net) => &net.config,
            Model::ResNet(net) => &net.config,
        }
    }

    fn forward_unchecked(&self, input: Tensor<4>) -> Tensor<2> {
        match self {
            Model::ConvNet(net) => net.forward_unchecked(input),
            Model::ResNet(net) => net.forward_unchecked(input),
        }
    }
}
