//! How a file names and lays out a model's tensors ([`KeyLayout`]), and the strict load:
//! the file's tensors are brought to the model's layout, compared key by key with what
//! the model holds, and applied only when every key fits.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    bridge, BurnToPyTorchAdapter, ModuleAdapter, ModuleContext, ModuleSnapshot,
    PyTorchToBurnAdapter,
};
use burn::tensor::{Bool, DType, Int, Shape, Tensor, TensorData};

use crate::models::{Arch, ConvLayer, ImageClassifier, Model, VggHead};

use super::error::{CheckpointError, KeyMismatch, KeyReport, TensorSpec};
use super::format::Format;
use super::walk;

/// How a file names and lays out a model's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyLayout {
    /// burn's own: module paths with enum variant names
    /// (`ConvNet.features.0.Conv.Versatile.weight`), linear weights `[in, out]`, batch
    /// norm `gamma`/`beta`. What `BurnpackStore` and `Module::load_from` read back.
    Burn,
    /// PyTorch's, as the authors' code and torchvision name things: `features.0.weight`,
    /// `fc6.weight`, `classifier.2.weight`, `layer1.0.conv1.weight`, linear weights
    /// `[out, in]`, batch norm `weight`/`bias`/`running_mean`/`running_var`. Versatile
    /// weights are the primary filters `[m, depth, d, d]`; on import the authors'
    /// `[m, c, d, d]` (shared mode, last `delta` input channels unused) is also taken.
    Torch,
    /// [`Torch`](Self::Torch) with torchvision's own VGG classifier (the authors' `fc6`
    /// 7×7 convolution as the equivalent `classifier.0` Linear `[4096, 512*7*7]`,
    /// `classifier.3`, `classifier.6`) and batch norm's `num_batches_tracked`, so
    /// torchvision's `load_state_dict` takes the file as it is. Dense models only.
    Torchvision,
}

impl KeyLayout {
    /// The name written in a file's metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyLayout::Burn => "burn",
            KeyLayout::Torch => "torch",
            KeyLayout::Torchvision => "torchvision",
        }
    }
}

impl fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyLayout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "burn" => Ok(KeyLayout::Burn),
            "torch" => Ok(KeyLayout::Torch),
            "torchvision" => Ok(KeyLayout::Torchvision),
            other => Err(format!(
                "unknown key layout '{other}' (expected burn, torch or torchvision)"
            )),
        }
    }
}

/// Converts between burn's and PyTorch's layouts as burn-store's adapters do (batch
/// norm `gamma`/`beta` <-> `weight`/`bias`, linear weights transposed), with a blocked
/// transpose: burn-store's element-by-element one takes seconds on a VGG's classifier.
#[derive(Clone)]
struct TorchAdapter {
    /// `true` for burn -> PyTorch, `false` for PyTorch -> burn.
    to_torch: bool,
}

impl TorchAdapter {
    fn inner(&self) -> Box<dyn ModuleAdapter> {
        if self.to_torch {
            Box::new(BurnToPyTorchAdapter)
        } else {
            Box::new(PyTorchToBurnAdapter)
        }
    }
}

/// Tile side of the blocked transpose.
const TILE: usize = 32;

/// `[rows, cols]` row-major elements of `size` bytes, transposed to `[cols, rows]`.
fn transposed_bytes(bytes: &[u8], rows: usize, cols: usize, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    let (from, to) = ((r * cols + c) * size, (c * rows + r) * size);
                    out[to..to + size].copy_from_slice(&bytes[from..from + size]);
                }
            }
        }
    }
    out
}

impl ModuleAdapter for TorchAdapter {
    fn adapt(&self, tensor: PackTensor, ctx: ModuleContext<'_>) -> PackTensor {
        let linear_weight = ctx.module_type() == Some("Struct:Linear")
            && tensor.name.rsplit('.').next() == Some("weight")
            && tensor.shape.len() == 2
            && tensor.dtype.is_float();
        if !linear_weight {
            return self.inner().adapt(tensor, ctx);
        }
        let (rows, cols) = (tensor.shape[0], tensor.shape[1]);
        let name = tensor.name.clone();
        let dtype = tensor.dtype;
        bridge::map_data(
            tensor,
            name,
            dtype,
            Shape::from([cols, rows]),
            move |data| {
                let bytes = transposed_bytes(data.as_bytes(), rows, cols, dtype.size());
                TensorData::from_bytes_vec(bytes, vec![cols, rows], dtype)
            },
        )
    }

    fn get_alternative_param_name(&self, param_name: &str, container_type: &str) -> Option<String> {
        self.inner()
            .get_alternative_param_name(param_name, container_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// The batch-norm step counter PyTorch keeps next to the running statistics.
const BATCHES_TRACKED: &str = "num_batches_tracked";

fn spec(tensor: &PackTensor) -> TensorSpec {
    TensorSpec {
        shape: tensor.shape.to_vec(),
        dtype: format!("{:?}", tensor.dtype),
    }
}

/// `true` for the authors' / torchvision's VGG ImageNet head (`fc6` on a 7×7 map).
fn imagenet_vgg(model: &Model) -> bool {
    matches!(&model.config().arch, Arch::Vgg(vgg) if vgg.head == VggHead::ImageNet)
}

/// Renames: ours -> torchvision's VGG classifier keys (besides `fc6`).
const TORCHVISION_CLASSIFIER: [(&str, &str); 2] = [
    ("classifier.2.", "classifier.3."),
    ("classifier.5.", "classifier.6."),
];

fn with_prefix_replaced(name: &str, from: &str, to: &str) -> Option<String> {
    name.strip_prefix(from).map(|rest| format!("{to}{rest}"))
}

/// The same tensor under another name.
fn renamed(mut tensor: PackTensor, name: String) -> PackTensor {
    tensor.name = name;
    tensor
}

/// A tensor with a new name and shape over the same bytes (row-major reshape).
fn reshaped(tensor: PackTensor, name: String, shape: Vec<usize>) -> PackTensor {
    let dtype = tensor.dtype;
    let target = shape.clone();
    bridge::map_data(tensor, name, dtype, Shape::from(shape), move |data| {
        TensorData::from_bytes_vec(data.as_bytes().to_vec(), target.clone(), dtype)
    })
}

/// Names, shapes and types of a module's tensors, without touching their values (a
/// freshly built model's weights are not even drawn): each entry is a tensor whose data
/// cannot be read, adapted exactly as [`ModuleSnapshot::collect`] adapts real ones.
struct ShapeCollector {
    tensors: Vec<PackTensor>,
    path: Vec<String>,
    containers: Vec<String>,
    adapter: Option<Box<dyn ModuleAdapter>>,
    skip_enum_variants: bool,
}

impl ShapeCollector {
    fn push(&mut self, path: String, shape: Shape, dtype: DType) {
        let tensor = bridge::deferred(path, dtype, shape, None, || {
            Err(burn::store::burn_pack::Error::ValidationError(
                "a shape-only tensor has no data".to_string(),
            ))
        });
        let tensor = match &self.adapter {
            Some(adapter) => adapter.adapt(tensor, ModuleContext::new(&self.containers)),
            None => tensor,
        };
        self.tensors.push(tensor);
    }

    fn param<const D: usize, K>(&mut self, param: &Param<Tensor<D, K>>, dtype: DType)
    where
        K: burn::tensor::kind::Basic,
        Tensor<D, K>: burn::module::Parameter,
    {
        let dtype = if param.is_initialized() {
            param.val().dtype()
        } else {
            dtype
        };
        self.push(self.path.join("."), param.lazy_shape(), dtype);
    }
}

impl ModuleVisitor for ShapeCollector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.containers.push(container_type.to_string());
        if !self.skip_enum_variants || !container_type.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.containers.pop();
        if !self.skip_enum_variants || !container_type.starts_with("Enum:") {
            self.path.pop();
        }
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let dtype = param.lazy_device().settings().float_dtype.into();
        self.param(param, dtype);
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
        let dtype = param.lazy_device().settings().int_dtype.into();
        self.param(param, dtype);
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, Bool>>) {
        let dtype = param.lazy_device().settings().bool_dtype.into();
        self.param(param, dtype);
    }

    fn visit_float_with_path<const D: usize>(
        &mut self,
        path: &[String],
        _id: ParamId,
        tensor: &Tensor<D>,
    ) {
        self.push(path.join("."), tensor.shape(), tensor.dtype());
    }

    fn visit_int_with_path<const D: usize>(
        &mut self,
        path: &[String],
        _id: ParamId,
        tensor: &Tensor<D, Int>,
    ) {
        self.push(path.join("."), tensor.shape(), tensor.dtype());
    }

    fn visit_bool_with_path<const D: usize>(
        &mut self,
        path: &[String],
        _id: ParamId,
        tensor: &Tensor<D, Bool>,
    ) {
        self.push(path.join("."), tensor.shape(), tensor.dtype());
    }
}

/// The model's tensors as a file of `layout` holds them (data read lazily from the
/// model when written).
pub(crate) fn collect(model: &Model, layout: KeyLayout) -> Vec<PackTensor> {
    gather(model, layout, false)
}

/// The names, shapes and types of the model's tensors in `layout`; reading their data
/// fails.
fn describe(model: &Model, layout: KeyLayout) -> Vec<PackTensor> {
    gather(model, layout, true)
}

fn gather(model: &Model, layout: KeyLayout, shapes_only: bool) -> Vec<PackTensor> {
    let base = |adapter: Option<Box<dyn ModuleAdapter>>, skip: bool| {
        if shapes_only {
            let mut collector = ShapeCollector {
                tensors: Vec::new(),
                path: Vec::new(),
                containers: Vec::new(),
                adapter,
                skip_enum_variants: skip,
            };
            model.visit(&mut collector);
            collector.tensors
        } else {
            model.collect(None, adapter, skip)
        }
    };
    let torch = || Some(Box::new(TorchAdapter { to_torch: true }) as Box<dyn ModuleAdapter>);
    match layout {
        KeyLayout::Burn => base(None, false),
        KeyLayout::Torch => base(torch(), true),
        KeyLayout::Torchvision => {
            let vgg = imagenet_vgg(model);
            let mut out = Vec::new();
            for tensor in base(torch(), true) {
                let name = tensor.name.clone();
                if let Some(bn) = name.strip_suffix(".running_mean") {
                    out.push(bridge::from_data(
                        TensorData::new(vec![0i64], Shape::from(Vec::<usize>::new())),
                        format!("{bn}.{BATCHES_TRACKED}"),
                        None,
                    ));
                }
                if vgg {
                    if let Some(rest) = name.strip_prefix("fc6.") {
                        let new = format!("classifier.0.{rest}");
                        let shape = tensor.shape.to_vec();
                        out.push(if shape.len() == 4 {
                            reshaped(tensor, new, vec![shape[0], shape[1..].iter().product()])
                        } else {
                            renamed(tensor, new)
                        });
                        continue;
                    }
                    if let Some(new) = TORCHVISION_CLASSIFIER
                        .iter()
                        .find_map(|(from, to)| with_prefix_replaced(&name, from, to))
                    {
                        out.push(renamed(tensor, new));
                        continue;
                    }
                }
                out.push(tensor);
            }
            out
        }
    }
}

/// What was adjusted while bringing a file to the model's layout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadNotes {
    /// Versatile weights given in the authors' `[m, c, d, d]` layout, whose unused last
    /// input channels were dropped.
    pub authors_weights: Vec<String>,
    /// PyTorch batch-norm step counters (`num_batches_tracked`), which burn does not keep.
    pub ignored_counters: usize,
    /// The file used torchvision's VGG classifier (`classifier.0/3/6`), mapped to `fc6`,
    /// `classifier.2`, `classifier.5`.
    pub torchvision_classifier: bool,
    /// Tensors converted to the model's float type (e.g. from F64), by key.
    pub converted: Vec<String>,
}

/// The first `depth` input channels of a `[m, c, d, d]` weight.
fn narrowed(tensor: PackTensor, depth: usize) -> PackTensor {
    let shape = tensor.shape.to_vec();
    let (m, c, area) = (shape[0], shape[1], shape[2] * shape[3]);
    let dtype = tensor.dtype;
    let name = tensor.name.clone();
    let target = vec![m, depth, shape[2], shape[3]];
    let out_shape = target.clone();
    bridge::map_data(tensor, name, dtype, Shape::from(target), move |data| {
        let size = dtype.size();
        let bytes = data.as_bytes();
        let (row, keep) = (c * area * size, depth * area * size);
        let mut out = Vec::with_capacity(m * keep);
        for p in 0..m {
            out.extend_from_slice(&bytes[p * row..p * row + keep]);
        }
        TensorData::from_bytes_vec(out, out_shape.clone(), dtype)
    })
}

/// Brings a PyTorch-convention file (layout [`KeyLayout::Torch`] or
/// [`KeyLayout::Torchvision`]) to [`KeyLayout::Torch`] for `model`: drops batch-norm
/// step counters, maps torchvision's VGG classifier, cuts the authors' versatile weights
/// to their used channels.
fn from_torch_convention(
    model: &Model,
    tensors: Vec<PackTensor>,
    notes: &mut LoadNotes,
) -> Vec<PackTensor> {
    let mut by_name: BTreeMap<String, PackTensor> =
        tensors.into_iter().map(|t| (t.name.clone(), t)).collect();

    // Batch-norm step counters next to running statistics.
    let counters: Vec<String> = by_name
        .keys()
        .filter(|name| {
            name.strip_suffix(BATCHES_TRACKED)
                .is_some_and(|bn| by_name.contains_key(&format!("{bn}running_mean")))
        })
        .cloned()
        .collect();
    notes.ignored_counters = counters.len();
    for name in counters {
        by_name.remove(&name);
    }

    // torchvision's VGG classifier: Linear 0, 3, 6 for the authors' fc6, 2, 5.
    if imagenet_vgg(model)
        && !by_name.contains_key("fc6.weight")
        && by_name.contains_key("classifier.6.weight")
    {
        notes.torchvision_classifier = true;
        let fc6_shape = walk::convs(model)
            .into_iter()
            .find(|(name, _)| name == "fc6")
            .map(|(_, conv)| conv_weight_shape(conv));
        let names: Vec<String> = by_name.keys().cloned().collect();
        for name in names {
            let new_name = if let Some(rest) = name.strip_prefix("classifier.0.") {
                Some(format!("fc6.{rest}"))
            } else {
                TORCHVISION_CLASSIFIER
                    .iter()
                    .find_map(|(ours, theirs)| with_prefix_replaced(&name, theirs, ours))
            };
            let Some(new) = new_name else { continue };
            let tensor = by_name.remove(&name).expect("listed above");
            let tensor = match &fc6_shape {
                // The Linear [out, c*7*7] is the 7x7 convolution [out, c, 7, 7] flattened.
                Some(shape)
                    if new == "fc6.weight"
                        && tensor.shape.len() == 2
                        && tensor.shape[0] == shape[0]
                        && tensor.shape[1] == shape[1..].iter().product::<usize>() =>
                {
                    reshaped(tensor, new.clone(), shape.clone())
                }
                _ => renamed(tensor, new.clone()),
            };
            by_name.insert(new, tensor);
        }
    }

    // The authors' versatile weights [m, c, d, d]: keep the channels the layer uses.
    for (prefix, conv) in walk::convs(model) {
        let ConvLayer::Versatile(layer) = conv else {
            continue;
        };
        let key = format!("{prefix}.weight");
        let ours = layer.weight.lazy_shape().to_vec();
        let authors = layer.authors_weight_shape().to_vec();
        if ours == authors {
            continue;
        }
        if let Some(tensor) = by_name.get(&key) {
            if tensor.shape.to_vec() == authors {
                let tensor = by_name.remove(&key).expect("present");
                by_name.insert(key.clone(), narrowed(tensor, ours[1]));
                notes.authors_weights.push(key);
            }
        }
    }
    by_name.into_values().collect()
}

/// The weight shape of a convolution, dense or versatile (without drawing the weights).
fn conv_weight_shape(conv: &ConvLayer) -> Vec<usize> {
    match conv {
        ConvLayer::Dense(conv) => conv.weight.lazy_shape().to_vec(),
        ConvLayer::Versatile(conv) => conv.weight.lazy_shape().to_vec(),
    }
}

/// Casts a float tensor to `dtype`.
fn cast(tensor: PackTensor, dtype: DType) -> PackTensor {
    let name = tensor.name.clone();
    let shape = tensor.shape.clone();
    bridge::map_data(tensor, name, dtype, shape, move |data| {
        data.convert_dtype(dtype)
    })
}

/// Compares the file's tensors (already in `layout`) with the model's, key by key.
/// Float tensors of another float type are converted; anything else that differs is
/// reported.
fn check(
    model: &Model,
    layout: KeyLayout,
    tensors: Vec<PackTensor>,
    notes: &mut LoadNotes,
) -> Result<Vec<PackTensor>, KeyReport> {
    let expected: BTreeMap<String, PackTensor> = describe(model, layout)
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let mut report = KeyReport::default();
    let mut found: BTreeMap<String, PackTensor> = BTreeMap::new();
    for tensor in tensors {
        found.insert(tensor.name.clone(), tensor);
    }
    let mut ready = Vec::with_capacity(found.len());
    for (key, want) in &expected {
        match found.remove(key) {
            None => report.missing.push((key.clone(), spec(want))),
            Some(have) => {
                let same_shape = have.shape == want.shape;
                let floats = have.dtype.is_float() && want.dtype.is_float();
                if !same_shape || !(have.dtype == want.dtype || floats) {
                    report.mismatched.push(KeyMismatch {
                        key: key.clone(),
                        expected: spec(want),
                        found: spec(&have),
                    });
                } else if have.dtype != want.dtype {
                    notes.converted.push(key.clone());
                    ready.push(cast(have, want.dtype));
                } else {
                    ready.push(have);
                }
            }
        }
    }
    report.unexpected = found
        .into_iter()
        .map(|(key, tensor)| (key, spec(&tensor)))
        .collect();
    if report.is_empty() {
        Ok(ready)
    } else {
        Err(report)
    }
}

/// The model's name and variant, for reports.
fn model_name(model: &Model) -> String {
    let config = model.config();
    format!("{} ({})", config.name(), config.variant)
}

/// Brings `tensors`, named and laid out as `layout` says, to the layout `model` applies
/// and compares them with the model's key by key, reading no data: the tensors ready to
/// apply and the layout they are in, or [`CheckpointError::Mismatch`] listing every key
/// that does not fit.
pub(crate) fn fit(
    model: &Model,
    tensors: Vec<PackTensor>,
    layout: KeyLayout,
    path: &Path,
) -> Result<(Vec<PackTensor>, KeyLayout, LoadNotes), CheckpointError> {
    let mut notes = LoadNotes::default();
    let (tensors, check_layout) = match layout {
        KeyLayout::Burn => (tensors, KeyLayout::Burn),
        KeyLayout::Torch | KeyLayout::Torchvision => (
            from_torch_convention(model, tensors, &mut notes),
            KeyLayout::Torch,
        ),
    };
    let tensors = check(model, check_layout, tensors, &mut notes).map_err(|report| {
        CheckpointError::Mismatch {
            path: path.to_path_buf(),
            model: model_name(model),
            report,
        }
    })?;
    Ok((tensors, check_layout, notes))
}

/// Loads `tensors`, named and laid out as `layout` says, into `model`: all of them or,
/// when any key does not fit, none ([`CheckpointError::Mismatch`] lists every one).
pub(crate) fn load(
    mut model: Model,
    tensors: Vec<PackTensor>,
    layout: KeyLayout,
    path: &Path,
    format: Format,
) -> Result<(Model, LoadNotes), CheckpointError> {
    let (tensors, check_layout, notes) = fit(&model, tensors, layout, path)?;
    let result = match check_layout {
        KeyLayout::Burn => model.apply(tensors, None, None, false),
        _ => model.apply(
            tensors,
            None,
            Some(Box::new(TorchAdapter { to_torch: false })),
            true,
        ),
    };
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        let errors: Vec<String> = result.errors.iter().map(ToString::to_string).collect();
        let missing: Vec<&str> = result.missing.iter().map(|(k, _)| k.as_str()).collect();
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            format,
            detail: format!(
                "loading into {} failed: errors {errors:?}, not loaded {missing:?}, unused {:?}",
                model_name(&model),
                result.unused
            ),
        });
    }
    Ok((model, notes))
}
