//! ONNX export of a model through burn-onnx's exporter (opset 18, weights embedded), in
//! its dense form (the default) or its versatile form ([`OnnxForm`]).
//!
//! The exporter records one forward pass on burn's capture device, so it sees only
//! burn's own operations: the model is first turned into its dense form
//! ([`to_dense`]) and traced through plain `Conv2d`, batch norm,
//! pooling, ReLU and `Linear`, which every ONNX runtime runs. The batch axis is
//! symbolic (`batch`); height and width are fixed at export.
//!
//! The versatile form keeps each layer's primary weight as the one initializer and
//! traces the authors' computation from it: slices of the weight (the centre crops and
//! channel windows) feeding one smaller convolution per secondary filter block, their
//! outputs concatenated. A runtime then stores what the compact checkpoint stores and
//! runs the paper's multiply-adds.
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
use burn::tensor::module::{avg_pool2d, conv2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_onnx::export::{AxisSpec, InputSpec, OnnxExporter};

use crate::layer::{dense, VConv2d};
use crate::models::forward::infallible;
use crate::models::{ConvLayer, Forward, ImageClassifier, Model, ModelConfig, Modules};

use super::error::CheckpointError;
use super::export::{detached_copy, to_dense};

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
struct Export {
    form: OnnxForm,
}

impl Forward for Export {
    type Map = Tensor<4>;
    type Vector = Tensor<2>;
    type Error = Infallible;

    fn conv(&mut self, layer: &ConvLayer, x: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        match (layer, self.form) {
            (ConvLayer::Dense(conv), _) => Ok(conv.forward(x)),
            (ConvLayer::Versatile(conv), OnnxForm::Versatile) => Ok(versatile_conv(conv, x)),
            (ConvLayer::Versatile(_), OnnxForm::Dense) => {
                unreachable!("the dense form's model is made dense before the export")
            }
        }
    }

    fn batch_norm(&mut self, norm: &BatchNorm, x: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        Ok(Modules.batch_norm(norm, x.into())?.values)
    }

    fn relu(&mut self, x: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        Ok(Modules.relu(x.into())?.values)
    }

    fn max_pool(&mut self, pool: &MaxPool2d, x: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        Ok(Modules.max_pool(pool, x.into())?.values)
    }

    fn avg_pool(&mut self, pool: &AvgPool2d, x: Tensor<4>) -> Result<Tensor<4>, Infallible> {
        Ok(Modules.avg_pool(pool, x.into())?.values)
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
        Ok(Modules.add_relu(x.into(), shortcut.into())?.values)
    }

    fn flatten(&mut self, x: Tensor<4>) -> Result<Tensor<2>, Infallible> {
        Modules.flatten(x.into())
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

/// A versatile layer in the authors' form, in operations ONNX keeps: per crop, the
/// primary weight's centre (a slice of the one stored weight) as a smaller convolution
/// with the padding reduced to match (the input cut where the padding does not reach),
/// per channel window a slice of the input; the outputs concatenated in the block
/// layout. Grouped layers take the dense form derived in the graph (slices, pads and a
/// concatenation of the stored weight), which keeps the file compact too.
fn versatile_conv(layer: &VConv2d, x: Tensor<4>) -> Tensor<4> {
    let g = layer.geometry();
    let dims = x.dims();
    let pads = layer
        .check_input(&dims)
        .expect("the input was checked against the model before the export");
    let weight = layer.weight.val();
    let bias = layer.bias.as_ref().map(|b| b.val());
    if g.groups > 1 {
        return dense::forward(x, weight, bias, g, pads);
    }
    let d = g.kernel;
    let mut outputs = Vec::with_capacity(g.blocks());
    for crop in 0..g.s {
        let side = d - 2 * crop;
        let crop_weight = weight.clone().narrow(2, crop, side).narrow(3, crop, side);
        let mut input = x.clone();
        let mut crop_pads = pads;
        for axis in 0..2 {
            let shrink = crop * g.dilation[axis];
            let (low, high) = pads[axis];
            let (cut_low, cut_high) = (shrink.saturating_sub(low), shrink.saturating_sub(high));
            crop_pads[axis] = (low.saturating_sub(shrink), high.saturating_sub(shrink));
            if cut_low + cut_high > 0 {
                let size = dims[2 + axis];
                input = pick(input, 2 + axis, cut_low, size - cut_low - cut_high);
            }
        }
        let options = ConvOptions::new_with_padding(g.stride, crop_pads, g.dilation, 1);
        for window in 0..g.n_c {
            let first = (crop * g.n_c + window) * g.primary;
            if first >= g.out_channels {
                break;
            }
            let rows = g.primary.min(g.out_channels - first);
            let mut w = crop_weight.clone().narrow(0, 0, rows);
            let mut xw = input.clone();
            if g.delta > 0 {
                w = w.narrow(1, g.window_weight_offset(window), g.c_hat);
                xw = pick(xw, 1, g.window_input_offset(window), g.c_hat);
            }
            let b = bias.clone().map(|b| b.narrow(0, first, rows));
            outputs.push(conv2d(xw, w, b, options.clone()));
        }
    }
    Tensor::cat(outputs, 1)
}

/// `len` entries of `x` along `dim` from `start`, as a gather: a slice would carry the
/// batch axis's bounds, which the exporter cannot keep symbolic.
fn pick(x: Tensor<4>, dim: usize, start: usize, len: usize) -> Tensor<4> {
    let indices: Vec<i64> = (start..start + len).map(|i| i as i64).collect();
    let indices = Tensor::<1, Int>::from_data(TensorData::new(indices, [len]), &x.device());
    x.select(dim, indices)
}

/// Which form of a model an ONNX export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnnxForm {
    /// Every versatile layer unfolded into its dense `Conv`: what any runtime runs at
    /// the dense model's cost.
    #[default]
    Dense,
    /// Each primary weight stored once, the secondary filters derived in the graph
    /// (slices of it) and run as the authors' smaller convolutions: the compact
    /// checkpoint's size and the paper's multiply-adds.
    Versatile,
}

fn export_forward(model: &Model, x: Tensor<4>, form: OnnxForm) -> Tensor<2> {
    infallible(model.walk(&mut Export { form }, x))
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
    export_onnx_as(model, input_hw, path, OnnxForm::Dense)
}

/// [`export_onnx`] in the given form (see [`OnnxForm`]).
pub fn export_onnx_as(
    model: &Model,
    input_hw: [usize; 2],
    path: impl AsRef<Path>,
    form: OnnxForm,
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
    // A model of its own: the exporter moves it to its capture device, batch-norm
    // running statistics (shared by clones) in place.
    let exported = match form {
        OnnxForm::Dense => to_dense(model)?,
        OnnxForm::Versatile => detached_copy(model)?,
    };
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
        .export_dynamic(&exported, sample, validation, &specs, |m: &Model, x| {
            export_forward(m, x, form)
        })
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
