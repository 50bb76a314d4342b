//! ResNet-18/34/50 as torchvision builds them (ResNet v1.5: the bottleneck's stride on
//! its 3×3 convolution), every convolution switchable by [`Variant`]:
//!
//! - `spatial` is the paper's **Versatile-v1**: spatial versatile filters on every
//!   convolution with a kernel larger than 1×1, the 7×7 stem included (s = 4);
//! - `spatial+channel` (default `delta=1,g=1`) is **Versatile-v2**: channel versatile
//!   filters with `n_c = 2` on every convolution as well, 1×1 and downsampling
//!   convolutions included.
//!
//! Stem: Conv 7×7/2 p3 → 64 (no bias), BN, ReLU, MaxPool 3/2 p1; four stages of blocks
//! (64, 128, 256, 512 planes; stride 2 from the second stage on); adaptive average
//! pooling to 1×1; Linear to the classes. Initialization as torchvision: Kaiming-normal
//! fan-out convolutions, batch norm weight 1 bias 0, PyTorch's default for the linear
//! layer.

use burn::module::Module;
use burn::nn::pool::{AdaptiveAvgPool2d, MaxPool2d};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, Relu};
use burn::tensor::{Device, Tensor};

use super::error::ModelError;
use super::forward::{infallible, Modules};
use super::layers::{
    adaptive_pool, init_features, trace_adaptive_pool, trace_features, Chw, ConvLayer, ConvSpec,
    FeatureLayer, FeatureSpec, HeadSpec, LinearSpec, PoolSpec, Trace, TraceError,
};
use super::variant::Variant;
use super::ModelConfig;

/// The ResNet depths of the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResNetDepth {
    /// ResNet-18 (basic blocks 2, 2, 2, 2).
    R18,
    /// ResNet-34 (basic blocks 3, 4, 6, 3).
    R34,
    /// ResNet-50 (bottleneck blocks 3, 4, 6, 3).
    R50,
}

impl ResNetDepth {
    /// Blocks per stage.
    pub fn blocks(self) -> [usize; 4] {
        match self {
            ResNetDepth::R18 => [2, 2, 2, 2],
            ResNetDepth::R34 | ResNetDepth::R50 => [3, 4, 6, 3],
        }
    }

    /// Whether the blocks are bottlenecks (1×1, 3×3, 1×1, expansion 4).
    pub fn bottleneck(self) -> bool {
        self == ResNetDepth::R50
    }

    /// Output channels of a block per plane.
    pub fn expansion(self) -> usize {
        if self.bottleneck() {
            4
        } else {
            1
        }
    }

    /// The number in the name (18, 34, 50).
    pub fn layers(self) -> usize {
        match self {
            ResNetDepth::R18 => 18,
            ResNetDepth::R34 => 34,
            ResNetDepth::R50 => 50,
        }
    }
}

/// Planes of the four stages.
const PLANES: [usize; 4] = [64, 128, 256, 512];
/// Stem width.
const STEM: usize = 64;

/// One residual block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockPlan {
    /// First convolution (3×3 basic, 1×1 bottleneck).
    pub conv1: ConvSpec,
    /// Second convolution (3×3).
    pub conv2: ConvSpec,
    /// Third convolution (1×1, bottleneck only).
    pub conv3: Option<ConvSpec>,
    /// The shortcut's 1×1 convolution, when the shape changes.
    pub downsample: Option<ConvSpec>,
}

impl BlockPlan {
    fn downsample_specs(&self) -> Vec<FeatureSpec> {
        self.downsample
            .iter()
            .flat_map(|conv| {
                [
                    FeatureSpec::Conv(*conv),
                    FeatureSpec::BatchNorm(conv.out_channels),
                ]
            })
            .collect()
    }

    fn trace(&self, name: &str, input: Chw, trace: &mut Trace) -> Result<Chw, TraceError> {
        let mut main = vec![
            FeatureSpec::Conv(self.conv1),
            FeatureSpec::BatchNorm(self.conv1.out_channels),
            FeatureSpec::Relu,
            FeatureSpec::Conv(self.conv2),
            FeatureSpec::BatchNorm(self.conv2.out_channels),
        ];
        let mut names = vec!["conv1", "bn1", "relu", "conv2", "bn2"];
        if let Some(conv3) = self.conv3 {
            main.extend([
                FeatureSpec::Relu,
                FeatureSpec::Conv(conv3),
                FeatureSpec::BatchNorm(conv3.out_channels),
            ]);
            names.extend(["relu", "conv3", "bn3"]);
        }
        let mut shape = input;
        for (spec, layer) in main.iter().zip(names) {
            shape = spec.trace(&format!("{name}.{layer}"), shape, trace)?;
        }
        let shortcut = trace_features(
            &format!("{name}.downsample"),
            &self.downsample_specs(),
            input,
            trace,
        )?;
        if shortcut != shape {
            return Err(TraceError::TooSmall {
                layer: format!("{name}.add"),
                reason: format!("adds a {shortcut:?} shortcut to a {shape:?} path"),
            });
        }
        trace.free(
            &format!("{name}.add"),
            "Add+ReLU",
            "residual".to_string(),
            shape.to_vec(),
        );
        Ok(shape)
    }

    fn init(&self, name: &str, device: &Device) -> Result<Block, ModelError> {
        let bn = |conv: &ConvSpec| BatchNormConfig::new(conv.out_channels).init(device);
        Ok(Block {
            conv1: self.conv1.init(&format!("{name}.conv1"), device)?,
            bn1: bn(&self.conv1),
            conv2: self.conv2.init(&format!("{name}.conv2"), device)?,
            bn2: bn(&self.conv2),
            conv3: self
                .conv3
                .map(|conv| conv.init(&format!("{name}.conv3"), device))
                .transpose()?,
            bn3: self.conv3.as_ref().map(bn),
            downsample: init_features(
                &format!("{name}.downsample"),
                &self.downsample_specs(),
                device,
            )?,
            relu: Relu::new(),
        })
    }
}

/// The description of a [`ResNet`], layer by layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetPlan {
    /// The 7×7 stem convolution.
    pub conv1: ConvSpec,
    /// The stem's max pool.
    pub maxpool: PoolSpec,
    /// The four stages.
    pub stages: [Vec<BlockPlan>; 4],
    /// The classifier.
    pub fc: LinearSpec,
}

impl ResNetPlan {
    /// The plan of a ResNet of `depth` for `variant`, `in_channels` and `num_classes`.
    pub fn new(
        depth: ResNetDepth,
        variant: &Variant,
        in_channels: usize,
        num_classes: usize,
    ) -> Self {
        let conv = |c, n, k| ConvSpec::new(c, n, k, variant).with_bias(false);
        let expansion = depth.expansion();
        let mut inplanes = STEM;
        let stages = std::array::from_fn(|stage| {
            let planes = PLANES[stage];
            let out = planes * expansion;
            (0..depth.blocks()[stage])
                .map(|block| {
                    let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                    let downsample = (stride != 1 || inplanes != out)
                        .then(|| conv(inplanes, out, 1).with_stride(stride));
                    let plan = if depth.bottleneck() {
                        BlockPlan {
                            conv1: conv(inplanes, planes, 1),
                            conv2: conv(planes, planes, 3).with_stride(stride).with_padding(1),
                            conv3: Some(conv(planes, out, 1)),
                            downsample,
                        }
                    } else {
                        BlockPlan {
                            conv1: conv(inplanes, planes, 3)
                                .with_stride(stride)
                                .with_padding(1),
                            conv2: conv(planes, planes, 3).with_padding(1),
                            conv3: None,
                            downsample,
                        }
                    };
                    inplanes = out;
                    plan
                })
                .collect()
        });
        Self {
            conv1: conv(in_channels, STEM, 7).with_stride(2).with_padding(3),
            maxpool: PoolSpec::new(3, 2).with_padding(1),
            stages,
            fc: LinearSpec::torch_default(PLANES[3] * expansion, num_classes),
        }
    }

    fn stem(&self) -> [FeatureSpec; 4] {
        [
            FeatureSpec::Conv(self.conv1),
            FeatureSpec::BatchNorm(self.conv1.out_channels),
            FeatureSpec::Relu,
            FeatureSpec::MaxPool(self.maxpool),
        ]
    }

    /// Traces every layer for one image of shape `input`; returns the output features.
    pub(crate) fn trace(&self, input: Chw, trace: &mut Trace) -> Result<usize, TraceError> {
        let mut shape = input;
        for (spec, name) in self.stem().iter().zip(["conv1", "bn1", "relu", "maxpool"]) {
            shape = spec.trace(name, shape, trace)?;
        }
        for (stage, blocks) in self.stages.iter().enumerate() {
            for (i, block) in blocks.iter().enumerate() {
                shape = block.trace(&format!("layer{}.{i}", stage + 1), shape, trace)?;
            }
        }
        let shape = trace_adaptive_pool("avgpool", [1, 1], shape, trace);
        let features = shape.iter().product();
        trace.free("flatten", "Flatten", String::new(), vec![features]);
        HeadSpec::Linear(self.fc).trace("fc", features, trace)
    }

    /// Builds the network.
    pub fn init(&self, config: ModelConfig, device: &Device) -> Result<ResNet, ModelError> {
        let stage = |i: usize| -> Result<Vec<Block>, ModelError> {
            self.stages[i]
                .iter()
                .enumerate()
                .map(|(b, block)| block.init(&format!("layer{}.{b}", i + 1), device))
                .collect()
        };
        Ok(ResNet {
            conv1: self.conv1.init("conv1", device)?,
            bn1: BatchNormConfig::new(self.conv1.out_channels).init(device),
            relu: Relu::new(),
            maxpool: self.maxpool.max_pool(),
            layer1: stage(0)?,
            layer2: stage(1)?,
            layer3: stage(2)?,
            layer4: stage(3)?,
            avgpool: adaptive_pool([1, 1]),
            fc: self.fc.init(device),
            config,
        })
    }
}

/// A residual block (basic or bottleneck); keys as torchvision's
/// (`conv1`, `bn1`, ..., `downsample.0`, `downsample.1`).
#[derive(Module, Debug)]
pub struct Block {
    /// First convolution.
    pub conv1: ConvLayer,
    /// Its batch norm.
    pub bn1: BatchNorm,
    /// Second convolution.
    pub conv2: ConvLayer,
    /// Its batch norm.
    pub bn2: BatchNorm,
    /// Third convolution (bottleneck).
    pub conv3: Option<ConvLayer>,
    /// Its batch norm (bottleneck).
    pub bn3: Option<BatchNorm>,
    /// The shortcut's convolution and batch norm, empty for the identity.
    pub downsample: Vec<FeatureLayer>,
    /// ReLU.
    pub relu: Relu,
}

/// ResNet-18/34/50, built from a [`ResNetPlan`]; keys as torchvision's.
#[derive(Module, Debug)]
pub struct ResNet {
    /// Stem convolution.
    pub conv1: ConvLayer,
    /// Stem batch norm.
    pub bn1: BatchNorm,
    /// ReLU.
    pub relu: Relu,
    /// Stem max pool.
    pub maxpool: MaxPool2d,
    /// Stage 1.
    pub layer1: Vec<Block>,
    /// Stage 2.
    pub layer2: Vec<Block>,
    /// Stage 3.
    pub layer3: Vec<Block>,
    /// Stage 4.
    pub layer4: Vec<Block>,
    /// Global average pooling.
    pub avgpool: AdaptiveAvgPool2d,
    /// Classifier.
    pub fc: Linear,
    /// What the network was built from.
    #[module(skip)]
    pub config: ModelConfig,
}

impl ResNet {
    /// Logits for a batch of images, without checking the input first.
    ///
    /// # Shapes
    /// - `input`: `[batch, in_channels, height, width]`
    /// - output: `[batch, num_classes]`
    pub fn forward_unchecked(&self, input: Tensor<4>) -> Tensor<2> {
        infallible(self.walk(&mut Modules, input.into()))
    }
}
