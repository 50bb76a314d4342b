//! Plain (non-residual) networks: a stack of feature layers, adaptive average pooling,
//! an optional `fc6` convolution (the authors' VGG), and a fully connected classifier.
//! VGG, AlexNet and LeNet-5 are all tables of this one shape.

use burn::module::Module;
use burn::nn::pool::AdaptiveAvgPool2d;
use burn::tensor::{Device, Tensor};

use super::error::ModelError;
use super::forward::{infallible, Modules};
use super::layers::{
    adaptive_pool, init_features, trace_adaptive_pool, trace_features, trace_head, Chw, ConvLayer,
    ConvSpec, FeatureLayer, FeatureSpec, HeadLayer, HeadSpec, Trace, TraceError,
};
use super::ModelConfig;

/// The description of a [`ConvNet`], layer by layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvNetPlan {
    /// Feature layers, named `features.i`.
    pub features: Vec<FeatureSpec>,
    /// Output size of the adaptive average pooling (`avgpool`).
    pub avgpool: [usize; 2],
    /// A convolution after the pooling (the authors' VGG `fc6`), if any.
    pub fc6: Option<ConvSpec>,
    /// Classifier layers on the flattened features, named `classifier.i`.
    pub classifier: Vec<HeadSpec>,
}

impl ConvNetPlan {
    /// Traces every layer for one image of shape `input`; returns the output features.
    pub(crate) fn trace(&self, input: Chw, trace: &mut Trace) -> Result<usize, TraceError> {
        let shape = trace_features("features", &self.features, input, trace)?;
        let mut shape = trace_adaptive_pool("avgpool", self.avgpool, shape, trace);
        if let Some(fc6) = &self.fc6 {
            shape = fc6.trace("fc6", shape, trace)?;
        }
        let features = shape.iter().product();
        trace.free("flatten", "Flatten", String::new(), vec![features]);
        trace_head("classifier", &self.classifier, features, trace)
    }

    /// Builds the network.
    pub fn init(&self, config: ModelConfig, device: &Device) -> Result<ConvNet, ModelError> {
        Ok(ConvNet {
            features: init_features("features", &self.features, device)?,
            avgpool: adaptive_pool(self.avgpool),
            fc6: self
                .fc6
                .as_ref()
                .map(|fc6| fc6.init("fc6", device))
                .transpose()?,
            classifier: self.classifier.iter().map(|l| l.init(device)).collect(),
            config,
        })
    }
}

/// A plain convolutional network (VGG, AlexNet, LeNet-5), built from a [`ConvNetPlan`].
///
/// Record keys follow torchvision and the authors' code: `features.N`, `fc6`,
/// `classifier.N` (plus burn's enum variant names, which burn-store can skip).
#[derive(Module, Debug)]
pub struct ConvNet {
    /// Feature layers.
    pub features: Vec<FeatureLayer>,
    /// Adaptive average pooling.
    pub avgpool: AdaptiveAvgPool2d,
    /// The authors' `fc6` convolution (VGG ImageNet form).
    pub fc6: Option<ConvLayer>,
    /// Classifier layers.
    pub classifier: Vec<HeadLayer>,
    /// What the network was built from.
    #[module(skip)]
    pub config: ModelConfig,
}

impl ConvNet {
    /// Logits for a batch of images, without checking the input first.
    ///
    /// # Shapes
    /// - `input`: `[batch, in_channels, height, width]`
    /// - output: `[batch, num_classes]`
    pub fn forward_unchecked(&self, input: Tensor<4>) -> Tensor<2> {
        infallible(self.walk(&mut Modules, input.into()))
    }
}
