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

use std::convert::Infallible;

use burn::nn::pool::{AdaptiveAvgPool2d, AvgPool2d, MaxPool2d};
use burn::nn::{BatchNorm, Dropout, Linear};
use burn::tensor::module::avg_pool2d;
use burn::tensor::ops::AvgPoolOptions;
use burn::tensor::{Device, Tensor};
use burn_onnx::export::{AxisSpec, InputSpec, OnnxExporter};

use crate::models::forward::infallible;
use crate::models::{ConvLayer, Forward, ImageClassifier, Model, ModelConfig, Modules};

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

/// The dense model's forward pass in the operations ONNX receives: the model's own walk
/// ([`Model::walk`]) through its burn modules, with each convolution a plain `Conv2d`
/// (not the project's kernel, which the exporter cannot see) and adaptive pooling in
/// operations the exporter lowers.
struct Export;

impl Forward for Export {
    type Map = Tensor<4>;
    type Vector = Tensor<2>;
    type Error = Infallible;

    fn conv(&mut self, layer: &ConvLayer, x: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        match layer {
            ConvLayer::Dense(conv) => Ok(conv.forward(x)),
            ConvLayer::Versatile(_) => unreachable!("the export model is dense"),
        }
    }

    fn batch_norm(&mut self, norm: &BatchNorm, x: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        Modules.batch_norm(norm, x)
    }

    fn relu(&mut self, x: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        Modules.relu(x)
    }

    fn max_pool(&mut self, pool: &MaxPool2d, x: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        Modules.max_pool(pool, x)
    }

    fn avg_pool(&mut self, pool: &AvgPool2d, x: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        Modules.avg_pool(pool, x)
    }

    fn adaptive_avg_pool(
        &mut self,
        pool: &AdaptiveAvgPool2d,
        x: Tensor<4>,
    ) -> Result<Tensor<4>, Infallible> {
        let size = pool.output_size;
        let [_, _, h, w] = x.dims();
        Ok(if [h, w] == size {
            x
        } else if size == [1, 1] {
            burn::tensor::module::adaptive_avg_pool2d(x, size)
        } else {
            let kernel = [h / size[0], w / size[1]];
            avg_pool2d(x, AvgPoolOptions::new(kernel))
        })
    }

    fn add_relu(&mut self, x: Tensor<4>, shortcut: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        Modules.add_relu(x, shortcut)
    }

    fn flatten(&mut self, x: Tensor<4>) -> Result<Tensor<2>, Infallible> {
        Modules.flatten(x)
    }

    fn linear(&mut self, linear: &Linear, x: Tensor<2>) -> Result<Tensor<2>, Infallible> {
        Modules.linear(linear, x)
    }

    fn relu_vector(&mut self, x: Tensor<2>) -> Result<Tensor<2>, Infallible> {
        Modules.relu_vector(x)
    }

    fn dropout(&mut self, dropout: &Dropout, x: Tensor<2>) -> Result<Tensor<2>, Infallible> {
        Modules.dropout(dropout, x)
    }
}

fn export_forward(model: &Model, x: Tensor<4>) -> Tensor<2> {
    infallible(model.walk(&mut Export, x))
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
