//! The dense form of a model, for runtimes that know only `Conv2d`: every `VConv2d`
//! replaced by the `Conv2d` of its unfolded weights (SPEC section 1), and that model
//! written as safetensors in torchvision's keys and layouts.
//!
//! # What a PyTorch consumer gets
//!
//! [`export_dense_safetensors`] writes the dense model with [`KeyLayout::Torchvision`]:
//!
//! - ResNet-18/34/50: exactly torchvision's state dict (`conv1.weight`, `bn1.weight`,
//!   `bn1.bias`, `bn1.running_mean`, `bn1.running_var`, `bn1.num_batches_tracked`,
//!   `layerX.Y.convZ.weight`, `layerX.Y.downsample.0/1.*`, `fc.weight` `[classes, 512·e]`,
//!   `fc.bias`), so `torchvision.models.resnet18(num_classes=K)` loads it with
//!   `load_state_dict(safetensors.torch.load_file(path))`.
//! - VGG, ImageNet form (`vgg16`, `vgg16_bn`, ...): the authors' `fc6` (a 7×7
//!   convolution on the 7×7 pooled map, output 1×1) is the same function as torchvision's
//!   first classifier layer `Linear(512·7·7, 4096)` on the flattened map, so the file holds
//!   it as `classifier.0.weight` `[4096, 25088]` (the convolution's weight flattened in
//!   `(c, y, x)` order, as `torch.flatten` orders the map) and the other two linear
//!   layers as `classifier.3` and `classifier.6`: torchvision's `vgg16()` /
//!   `vgg16_bn()` takes the file as it is and computes the same logits.
//! - Other VGG forms (small forms, custom tables, the small `fc6` head) keep the zoo's
//!   torchvision-style names (`features.N.*`, `fc6.*`, `classifier.N.*`); torchvision has
//!   no such model, and a consumer builds the matching `nn.Sequential`.
//! - AlexNet and LeNet-5: the zoo's names (`features.N`, `classifier.N`), PyTorch layouts.
//!
//! # Grouped layers
//!
//! A grouped versatile layer's dense form emits its output channels in the dense order
//! ([`crate::layer::VConv2d::dense_order`]), not the block layout, and the layers after
//! it expect the block layout. The zoo's models never group their convolutions, so the
//! order is the identity everywhere; a grouped layer is refused with
//! [`CheckpointError::Unsupported`] rather than exported with permuted channels.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{bridge, ModuleSnapshot};
use burn::tensor::Device;

use crate::models::{ConvLayer, ImageClassifier, Model, ModelConfig};

use super::error::CheckpointError;
use super::format::{self, Format};
use super::keys::{self, KeyLayout};
use super::walk;
use super::{check_class_names, metadata_entries, CheckpointMeta};

/// The dense twin of `model` with the same function: every `VConv2d` replaced by the
/// plain `Conv2d` of its unfolded weights, every other tensor copied. Its configuration
/// is [`ModelConfig::dense_twin`](crate::models::ModelConfig::dense_twin).
///
/// The twin is built afresh and shares no state with `model` (a clone would share
/// batch norm's running statistics, which burn keeps behind a shared handle).
pub fn to_dense(model: &Model) -> Result<Model, CheckpointError> {
    let mut dense_tensors: BTreeMap<String, PackTensor> = BTreeMap::new();
    for (name, conv) in walk::convs(model) {
        let ConvLayer::Versatile(vconv) = conv else {
            continue;
        };
        let (conv, order) = vconv.to_conv2d();
        if order.iter().enumerate().any(|(k, &c)| k != c) {
            return Err(CheckpointError::Unsupported(format!(
                "layer {name} is grouped ({} groups): its dense form permutes the output \
                 channels, which the layers after it do not expect",
                vconv.geometry().groups
            )));
        }
        let weight = format!("{name}.weight");
        dense_tensors.insert(
            weight.clone(),
            bridge::from_tensor(&conv.weight.val(), weight, None),
        );
        if let Some(bias) = &conv.bias {
            let key = format!("{name}.bias");
            dense_tensors.insert(key.clone(), bridge::from_tensor(&bias.val(), key, None));
        }
    }
    let tensors: Vec<PackTensor> = model
        .collect(None, None, true)
        .into_iter()
        .map(|t| dense_tensors.remove(&t.name).unwrap_or(t))
        .collect();
    rebuild(model, &model.config().dense_twin(), tensors)
}

/// A copy of `model` that shares nothing with it: new modules of its configuration
/// with its tensors. (A module's clone shares its batch-norm running statistics, which
/// the ONNX exporter moves to its capture device in place.)
pub fn detached_copy(model: &Model) -> Result<Model, CheckpointError> {
    rebuild(model, model.config(), model.collect(None, None, true))
}

/// New modules of `config`, on `model`'s device, holding `tensors`.
fn rebuild(
    model: &Model,
    config: &ModelConfig,
    tensors: Vec<PackTensor>,
) -> Result<Model, CheckpointError> {
    let device = model
        .devices()
        .into_iter()
        .next()
        .unwrap_or_else(Device::flex);
    let mut rebuilt = config
        .init(&device)
        .map_err(|err| CheckpointError::Unsupported(err.to_string()))?;
    let result = rebuilt.apply(tensors, None, None, true);
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        return Err(CheckpointError::Unsupported(format!(
            "{} ({}) does not take the model's tensors: errors {:?}, missing {:?}, unused {:?}",
            config.name(),
            config.variant,
            result
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            result.missing,
            result.unused
        )));
    }
    Ok(rebuilt)
}

/// Writes the dense form of `model` as safetensors with torchvision's keys and layouts
/// (see the [module docs](self)); the metadata describes the dense twin, so
/// [`load_model`](super::load_model) reads the file back as a dense model. Class names
/// and preprocessing come from `meta` when given.
pub fn export_dense_safetensors(
    model: &Model,
    meta: Option<&CheckpointMeta>,
    path: impl AsRef<Path>,
) -> Result<(), CheckpointError> {
    let path = path.as_ref();
    Format::of(path, &[Format::Safetensors], ".safetensors")?;
    let dense = to_dense(model)?;
    let mut dense_meta = match meta {
        Some(meta) => meta.clone(),
        None => CheckpointMeta::new(model.config().clone()),
    };
    dense_meta.config = dense.config().clone();
    check_class_names(&dense_meta)?;
    let layout = KeyLayout::Torchvision;
    let metadata = metadata_entries(&dense_meta, layout)?;
    format::write(
        path,
        Format::Safetensors,
        keys::collect(&dense, layout),
        &metadata,
    )
}
