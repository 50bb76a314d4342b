//! ONNX export of a model's dense form through burn-onnx's exporter (opset 18, weights
//! embedded).
//!
//! The exporter records one forward pass on burn's capture device, so it sees only
//! burn's own operations: the model is first turned into its dense form
//! ([`to_dense`]) and traced through plain `Conv2d`, batch norm,
//! pooling, ReLU and `Linear`, which every ONNX runtime runs. The batch axis is
//! symbolic (`batch`); height and width are fixed at export.
//!
//! The exporter lowers adaptive average pooling only to a 1×1 output
//! (`GlobalAveragePool`); the VGG forms' 7×7 adaptive pooling is exported as what it
//! computes at the fixed input size: nothing when the map is already 7×7 (224×224
//! ImageNet inputs, 28×28 inputs of the small `fc6` head), an average pool when the map
//! is a multiple of 7, and refused otherwise.

use std::path::Path;

use burn::nn::conv::Conv2d;
use burn::tensor::module::avg_pool2d;
use burn::tensor::ops::AvgPoolOptions;
use burn::tensor::{Device, Tensor};
use burn_onnx::export::{AxisSpec, InputSpec, OnnxExporter};

use crate::models::resnet::Block;
use crate::models::{ConvLayer, FeatureLayer, ImageClassifier, Model, ModelConfig};

use super::error::CheckpointError;
use super::export::to_dense;

/// What [`export_onnx`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxExport {
    /// Input shape `[batch, channels, height, width]`; the batch axis is symbolic.
    pub input: [usize; 4],
    /// Output shape `[batch, classes]`.
    pub output: [usize; 2],
    /// Bytes written.
    pub bytes: u64,
}

fn dense(conv: &ConvLayer) -> &Conv2d {
    match conv {
        ConvLayer::Dense(conv) => conv,
        ConvLayer::Versatile(_) => unreachable!("the export model is dense"),
    }
}

fn features(layers: &[FeatureLayer], mut x: Tensor<4>) -> Tensor<4> {
    for layer in layers {
        x = match layer {
            FeatureLayer::Conv(conv) => dense(conv).forward(x),
            other => other.forward(x),
        };
    }
    x
}

fn block(block: &Block, input: Tensor<4>) -> Tensor<4> {
    let relu = &block.relu;
    let mut x = relu.forward(
        block
            .bn1
            .forward(dense(&block.conv1).forward(input.clone())),
    );
    x = block.bn2.forward(dense(&block.conv2).forward(x));
    if let (Some(conv3), Some(bn3)) = (&block.conv3, &block.bn3) {
        x = bn3.forward(dense(conv3).forward(relu.forward(x)));
    }
    let shortcut = features(&block.downsample, input);
    relu.forward(x + shortcut)
}

/// Adaptive average pooling to `size` in operations the exporter lowers.
fn adaptive_pool(x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    if [h, w] == size {
        x
    } else if size == [1, 1] {
        burn::tensor::module::adaptive_avg_pool2d(x, size)
    } else {
        let kernel = [h / size[0], w / size[1]];
        avg_pool2d(x, AvgPoolOptions::new(kernel))
    }
}

/// The dense model's forward pass in the operations ONNX receives: the zoo's forward,
/// with each convolution a plain `Conv2d` and adaptive pooling as above.
fn export_forward(model: &Model, x: Tensor<4>) -> Tensor<2> {
    match model {
        Model::ConvNet(net) => {
            let mut x = features(&net.features, x);
            x = adaptive_pool(x, net.avgpool.output_size);
            if let Some(fc6) = &net.fc6 {
                x = dense(fc6).forward(x);
            }
            let mut y = x.flatten::<2>(1, 3);
            for layer in &net.classifier {
                y = layer.forward(y);
            }
            y
        }
        Model::ResNet(net) => {
            let mut x = dense(&net.conv1).forward(x);
            x = net.maxpool.forward(net.relu.forward(net.bn1.forward(x)));
            for b in net
                .layer1
                .iter()
                .chain(&net.layer2)
                .chain(&net.layer3)
                .chain(&net.layer4)
            {
                x = block(b, x);
            }
            let x = net.avgpool.forward(x).flatten::<2>(1, 3);
            net.fc.forward(x)
        }
    }
}

/// Checks that the adaptive pooling of a VGG form can be exported at `input_hw`.
fn check_pooling(config: &ModelConfig, input_hw: [usize; 2]) -> Result<(), CheckpointError> {
    let report = config
        .cost_report(input_hw)
        .map_err(|err| CheckpointError::Unsupported(err.to_string()))?;
    let Some(at) = report.layers.iter().position(|row| row.name == "avgpool") else {
        return Ok(());
    };
    let before = match at {
        0 => vec![config.in_channels, input_hw[0], input_hw[1]],
        _ => report.layers[at - 1].output.clone(),
    };
    let after = &report.layers[at].output;
    let (map, size) = ([before[1], before[2]], [after[1], after[2]]);
    let fits = map == size || size == [1, 1] || (map[0] % size[0] == 0 && map[1] % size[1] == 0);
    if fits {
        Ok(())
    } else {
        Err(CheckpointError::Unsupported(format!(
            "at a {}x{} input, {} pools a {}x{} map adaptively to {}x{}, which the ONNX \
             exporter cannot express; export at an input whose map is a multiple of {}x{} \
             (224x224 for the ImageNet VGGs)",
            input_hw[0],
            input_hw[1],
            config.name(),
            map[0],
            map[1],
            size[0],
            size[1],
            size[0],
            size[1]
        )))
    }
}

/// Writes the dense form of `model` as an ONNX file (opset 18) taking
/// `[batch, in_channels, height, width]` images (`input_hw` = `[height, width]`, the
/// batch axis symbolic) and giving `[batch, classes]` logits.
pub fn export_onnx(
    model: &Model,
    input_hw: [usize; 2],
    path: impl AsRef<Path>,
) -> Result<OnnxExport, CheckpointError> {
    let path = path.as_ref();
    if path.extension().and_then(|e| e.to_str()) != Some("onnx") {
        return Err(CheckpointError::UnknownFormat {
            path: path.to_path_buf(),
            extension: path
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default(),
            expected: ".onnx",
        });
    }
    let config = model.config().clone();
    config
        .check_input([1, config.in_channels, input_hw[0], input_hw[1]])
        .map_err(|err| CheckpointError::Unsupported(err.to_string()))?;
    check_pooling(&config, input_hw)?;
    let dense = to_dense(model)?;
    let device = Device::flex();
    let [h, w] = input_hw;
    let sample = Tensor::<4>::zeros([1, config.in_channels, h, w], &device);
    let validation = Tensor::<4>::zeros([2, config.in_channels, h, w], &device);
    let specs = [InputSpec::new([
        AxisSpec::dynamic("batch"),
        AxisSpec::Static,
        AxisSpec::Static,
        AxisSpec::Static,
    ])];
    let onnx = OnnxExporter::new()
        .export_dynamic(&dense, sample, validation, &specs, export_forward)
        .map_err(|err| CheckpointError::Onnx(err.to_string()))?;
    let bytes = onnx.as_bytes().len() as u64;
    crate::fsutil::write_atomic(path, onnx.as_bytes()).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        action: "write",
        source,
    })?;
    Ok(OnnxExport {
        input: [1, config.in_channels, h, w],
        output: [1, config.num_classes],
        bytes,
    })
}
