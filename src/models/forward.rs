//! One description of each model's forward pass, walked by everything that runs or
//! translates it: burn's module forward ([`Modules`]), the compiled inference plan
//! (`crate::infer`) and the ONNX export (`crate::checkpoint::onnx`) each implement
//! [`Forward`], and the models call it layer by layer in [`Model::walk`].

use std::convert::Infallible;

use burn::nn::pool::{AdaptiveAvgPool2d, AvgPool2d, MaxPool2d};
use burn::nn::{BatchNorm, Dropout, Linear};
use burn::tensor::activation::relu;
use burn::tensor::Tensor;

use super::convnet::ConvNet;
use super::layers::{ConvLayer, FeatureLayer, HeadLayer};
use super::resnet::{Block, ResNet};
use super::Model;
use crate::layer::Activation;

/// What a model's forward pass is made of, on feature maps (`[batch, c, h, w]`) and
/// feature vectors (`[batch, features]`).
pub trait Forward {
    /// A feature map.
    type Map: Clone;
    /// A feature vector.
    type Vector;
    /// Why a step cannot be taken.
    type Error;

    /// A convolution, dense or versatile.
    fn conv(&mut self, layer: &ConvLayer, x: Self::Map) -> Result<Self::Map, Self::Error>;
    /// Batch norm (evaluation or training as the implementation decides).
    fn batch_norm(&mut self, norm: &BatchNorm, x: Self::Map) -> Result<Self::Map, Self::Error>;
    /// ReLU on a map.
    fn relu(&mut self, x: Self::Map) -> Result<Self::Map, Self::Error>;
    /// Batch norm then ReLU (one step where an implementation fuses them).
    fn batch_norm_relu(
        &mut self,
        norm: &BatchNorm,
        x: Self::Map,
    ) -> Result<Self::Map, Self::Error> {
        let y = self.batch_norm(norm, x)?;
        self.relu(y)
    }
    /// Batch norm, ReLU, then max pooling (one step where an implementation fuses them).
    fn batch_norm_relu_max_pool(
        &mut self,
        norm: &BatchNorm,
        pool: &MaxPool2d,
        x: Self::Map,
    ) -> Result<Self::Map, Self::Error> {
        let y = self.batch_norm_relu(norm, x)?;
        self.max_pool(pool, y)
    }
    /// Max pooling.
    fn max_pool(&mut self, pool: &MaxPool2d, x: Self::Map) -> Result<Self::Map, Self::Error>;
    /// Average pooling.
    fn avg_pool(&mut self, pool: &AvgPool2d, x: Self::Map) -> Result<Self::Map, Self::Error>;
    /// Adaptive average pooling.
    fn adaptive_avg_pool(
        &mut self,
        pool: &AdaptiveAvgPool2d,
        x: Self::Map,
    ) -> Result<Self::Map, Self::Error>;
    /// `relu(x + shortcut)`: the end of a residual block.
    fn add_relu(&mut self, x: Self::Map, shortcut: Self::Map) -> Result<Self::Map, Self::Error>;
    /// `relu(batch_norm(x) + shortcut)` (one step where an implementation fuses them).
    fn batch_norm_add_relu(
        &mut self,
        norm: &BatchNorm,
        x: Self::Map,
        shortcut: Self::Map,
    ) -> Result<Self::Map, Self::Error> {
        let y = self.batch_norm(norm, x)?;
        self.add_relu(y, shortcut)
    }
    /// `[batch, c, h, w]` to `[batch, c * h * w]`.
    fn flatten(&mut self, x: Self::Map) -> Result<Self::Vector, Self::Error>;
    /// A linear layer.
    fn linear(&mut self, linear: &Linear, x: Self::Vector) -> Result<Self::Vector, Self::Error>;
    /// ReLU on a vector.
    fn relu_vector(&mut self, x: Self::Vector) -> Result<Self::Vector, Self::Error>;
    /// Dropout.
    fn dropout(&mut self, dropout: &Dropout, x: Self::Vector) -> Result<Self::Vector, Self::Error>;
}

impl FeatureLayer {
    /// This layer's step of a forward pass.
    pub fn walk<F: Forward>(&self, f: &mut F, x: F::Map) -> Result<F::Map, F::Error> {
        match self {
            FeatureLayer::Conv(conv) => f.conv(conv, x),
            FeatureLayer::BatchNorm(norm) => f.batch_norm(norm, x),
            FeatureLayer::Relu(_) => f.relu(x),
            FeatureLayer::MaxPool(pool) => f.max_pool(pool, x),
            FeatureLayer::AvgPool(pool) => f.avg_pool(pool, x),
        }
    }
}

impl HeadLayer {
    /// This layer's step of a forward pass.
    pub fn walk<F: Forward>(&self, f: &mut F, x: F::Vector) -> Result<F::Vector, F::Error> {
        match self {
            HeadLayer::Linear(linear) => f.linear(linear, x),
            HeadLayer::Relu(_) => f.relu_vector(x),
            HeadLayer::Dropout(dropout) => f.dropout(dropout, x),
        }
    }
}

impl ConvNet {
    /// The forward pass: features (a batch norm followed by a ReLU as one
    /// [`Forward::batch_norm_relu`], or with the max pooling after them as one
    /// [`Forward::batch_norm_relu_max_pool`]), adaptive pooling, `fc6`, flatten,
    /// classifier.
    pub fn walk<F: Forward>(&self, f: &mut F, mut x: F::Map) -> Result<F::Vector, F::Error> {
        use FeatureLayer::{BatchNorm, MaxPool, Relu};
        let mut rest = self.features.as_slice();
        while let Some((layer, tail)) = rest.split_first() {
            (x, rest) = match (layer, tail) {
                (BatchNorm(norm), [Relu(_), MaxPool(pool), tail @ ..]) => {
                    (f.batch_norm_relu_max_pool(norm, pool, x)?, tail)
                }
                (BatchNorm(norm), [Relu(_), tail @ ..]) => (f.batch_norm_relu(norm, x)?, tail),
                _ => (layer.walk(f, x)?, tail),
            };
        }
        x = f.adaptive_avg_pool(&self.avgpool, x)?;
        if let Some(fc6) = &self.fc6 {
            x = f.conv(fc6, x)?;
        }
        let mut y = f.flatten(x)?;
        for layer in &self.classifier {
            y = layer.walk(f, y)?;
        }
        Ok(y)
    }
}

impl Block {
    /// `relu(main(x) + shortcut(x))`, the shortcut first (so that a fused
    /// implementation has it before the main path's last convolution).
    pub fn walk<F: Forward>(&self, f: &mut F, x: F::Map) -> Result<F::Map, F::Error> {
        let mut shortcut = x.clone();
        for layer in &self.downsample {
            shortcut = layer.walk(f, shortcut)?;
        }
        let mut y = f.conv(&self.conv1, x)?;
        y = f.batch_norm_relu(&self.bn1, y)?;
        y = f.conv(&self.conv2, y)?;
        let last_norm = match (&self.conv3, &self.bn3) {
            (Some(conv3), Some(bn3)) => {
                y = f.batch_norm_relu(&self.bn2, y)?;
                y = f.conv(conv3, y)?;
                bn3
            }
            _ => &self.bn2,
        };
        f.batch_norm_add_relu(last_norm, y, shortcut)
    }
}

impl ResNet {
    /// The forward pass: stem, the four stages, global pooling, classifier.
    pub fn walk<F: Forward>(&self, f: &mut F, x: F::Map) -> Result<F::Vector, F::Error> {
        let mut x = f.conv(&self.conv1, x)?;
        x = f.batch_norm_relu_max_pool(&self.bn1, &self.maxpool, x)?;
        for block in self
            .layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
        {
            x = block.walk(f, x)?;
        }
        x = f.adaptive_avg_pool(&self.avgpool, x)?;
        let y = f.flatten(x)?;
        f.linear(&self.fc, y)
    }
}

impl Model {
    /// The model's forward pass through `f`.
    pub fn walk<F: Forward>(&self, f: &mut F, x: F::Map) -> Result<F::Vector, F::Error> {
        match self {
            Model::ConvNet(net) => net.walk(f, x),
            Model::ResNet(net) => net.walk(f, x),
        }
    }
}

/// The forward pass through the burn modules themselves (training or evaluation as
/// burn's batch norm and dropout decide from the device and their state; a training
/// batch norm on the CPU runs [`crate::layer::batch_norm_train`]'s kernels, with the
/// batch statistics the convolution before it took as it wrote its output, on an
/// autodiff device).
#[derive(Debug, Clone, Copy, Default)]
pub struct Modules;

impl Forward for Modules {
    type Map = Activation;
    type Vector = Tensor<2>;
    type Error = Infallible;

    fn conv(&mut self, layer: &ConvLayer, x: Activation) -> Result<Activation, Infallible> {
        let x = x.values;
        Ok(if x.device().is_autodiff() {
            layer.forward_measured(x)
        } else {
            layer.forward(x).into()
        })
    }

    fn batch_norm(&mut self, norm: &BatchNorm, x: Activation) -> Result<Activation, Infallible> {
        Ok(crate::layer::batch_norm_train(norm, x).into())
    }

    fn batch_norm_relu(
        &mut self,
        norm: &BatchNorm,
        x: Activation,
    ) -> Result<Activation, Infallible> {
        Ok(crate::layer::batch_norm_relu_train(norm, x).into())
    }

    fn batch_norm_relu_max_pool(
        &mut self,
        norm: &BatchNorm,
        pool: &MaxPool2d,
        x: Activation,
    ) -> Result<Activation, Infallible> {
        Ok(crate::layer::batch_norm_relu_max_pool_train(norm, pool, x).into())
    }

    fn relu(&mut self, x: Activation) -> Result<Activation, Infallible> {
        Ok(relu(x.values).into())
    }

    fn max_pool(&mut self, pool: &MaxPool2d, x: Activation) -> Result<Activation, Infallible> {
        Ok(pool.forward(x.values).into())
    }

    fn avg_pool(&mut self, pool: &AvgPool2d, x: Activation) -> Result<Activation, Infallible> {
        Ok(pool.forward(x.values).into())
    }

    fn adaptive_avg_pool(
        &mut self,
        pool: &AdaptiveAvgPool2d,
        x: Activation,
    ) -> Result<Activation, Infallible> {
        Ok(pool.forward(x.values).into())
    }

    fn add_relu(&mut self, x: Activation, shortcut: Activation) -> Result<Activation, Infallible> {
        Ok(relu(x.values + shortcut.values).into())
    }

    fn batch_norm_add_relu(
        &mut self,
        norm: &BatchNorm,
        x: Activation,
        shortcut: Activation,
    ) -> Result<Activation, Infallible> {
        Ok(crate::layer::batch_norm_add_relu_train(norm, x, shortcut.values).into())
    }

    fn flatten(&mut self, x: Activation) -> Result<Tensor<2>, Infallible> {
        Ok(x.values.flatten::<2>(1, 3))
    }

    fn linear(&mut self, linear: &Linear, x: Tensor<2>) -> Result<Tensor<2>, Infallible> {
        Ok(linear.forward(x))
    }

    fn relu_vector(&mut self, x: Tensor<2>) -> Result<Tensor<2>, Infallible> {
        Ok(relu(x))
    }

    fn dropout(&mut self, dropout: &Dropout, x: Tensor<2>) -> Result<Tensor<2>, Infallible> {
        Ok(dropout.forward(x))
    }
}

/// The value of a walk that cannot fail.
pub(crate) fn infallible<T>(result: Result<T, Infallible>) -> T {
    match result {
        Ok(value) => value,
        Err(never) => match never {},
    }
}
