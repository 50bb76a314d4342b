//! Compiled inference on the CPU: a model of the zoo built once, for one input shape,
//! into a list of kernel calls on buffers planned ahead, then run many times.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use versatile::infer::InferencePlan;
//! use versatile::models::ModelConfig;
//!
//! let model = ModelConfig::parse("vgg16_bn", "spatial")?.init(&Device::flex())?;
//! let mut plan = InferencePlan::compile(&model, [1, 3, 224, 224])?;
//! let image = vec![0.0f32; 3 * 224 * 224];
//! let logits = plan.run(&image)?; // [1, 1000]
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What compiling does, against the module forward:
//! - batch norm (eval statistics) goes into the preceding convolution: into a dense
//!   layer's weight and bias; into a versatile layer's output write as a per-channel
//!   scale and shift (one primary filter serves several output channels, each with its
//!   own scale, so the scale cannot go into the shared weight);
//! - ReLU, and ResNet's residual add + ReLU, happen in the convolution's output write
//!   ([`Epilogue`]); dropout is gone;
//! - weights are laid out once for their kernel ([`PackedWeight`]); linear layers run as
//!   1×1 convolutions (the streaming kernel for the large ones, as `fc6`);
//! - activations live in a few buffers allocated once, reused across layers and runs:
//!   each buffer is handed to the next layer once the values in it are read for the
//!   last time;
//! - where every layer allows it (ResNets and VGGs: no channel windows or groups) and the
//!   CPU has the kernels, activations are channels-last (`[batch, height, width,
//!   channels]`, the input converted once; poolings as steps of their own; a linear
//!   layer on a flattened map, or a dense kernel as large as its map, as VGG's `fc6`,
//!   with its weight's columns in channels-last order) and the convolutions run on
//!   [`NhwcConv`]: each output
//!   position's input pixels are read in place, and a versatile layer's crops are
//!   written from the running sums of its rings. `VERSATILE_LAYOUT=nchw` in the
//!   environment keeps the channels-first layout (for comparisons);
//! - channels-last 3 × 3 convolutions of stride 1 with at least 32 input channels, 64
//!   filters and 64 output positions (dense, or a versatile layer's 3 × 3 and 1 × 1
//!   crops) run by Winograd's F(2 × 2, 3 × 3) ([`WinogradConv`]): 16 multiplies per
//!   2 × 2 outputs where direct convolution does 36.
//!   `VERSATILE_WINOGRAD=0` in the environment keeps them direct (for comparisons).

mod error;

use std::collections::hash_map::{Entry, HashMap};

use burn::module::Module;
use burn::nn::pool::{AdaptiveAvgPool2d, AvgPool2d, MaxPool2d};
use burn::nn::{BatchNorm, Dropout, Linear, PaddingConfig2d};
use burn::tensor::{Tensor, TensorData};

pub use error::InferError;

use crate::kernels::alloc::LineAligned;
use crate::kernels::nhwc::NhwcConv;
use crate::kernels::pool::{self, Pool2d};
use crate::kernels::winograd::WinogradConv;
use crate::kernels::{self, ConvPlan, Epilogue, PackedWeight};
use crate::layer::{dense_conv_plan, symmetric_padding, window_out};
use crate::models::{ConvLayer, Forward, ImageClassifier, Model};

/// An activation of the plan: the caller's input, or one computed by a step.
type Value = usize;
/// The caller's input.
const INPUT: Value = 0;

/// A `[batch, channels, height, width]` shape.
type Shape = [usize; 4];

/// A convolution with its output write.
#[derive(Debug)]
struct Conv {
    plan: ConvPlan,
    /// `[m, depth, kh, kw]` until [`Builder::finish`] lays it out.
    weight: Vec<f32>,
    /// The weight for the channels-first pass.
    packed: Option<PackedWeight<f32>>,
    /// The convolution on channels-last activations (the plan's layout where it is set).
    channels_last: Option<ChannelsLast>,
    /// Whether the batch norm folds into the weight (dense layers).
    dense: bool,
    scale: Option<Vec<f32>>,
    shift: Option<Vec<f32>>,
    relu: bool,
    /// The 2 x 2 max pooling that follows, where it runs in the write.
    pool: Option<Pool2d>,
}

/// A convolution on channels-last activations.
#[derive(Debug)]
enum ChannelsLast {
    Direct(NhwcConv),
    Winograd(WinogradConv),
}

impl ChannelsLast {
    /// `plan` with its weight laid out: by Winograd's F(2 × 2, 3 × 3) where it computes
    /// the plan (and the environment does not say `VERSATILE_WINOGRAD=0`), else direct;
    /// `None` where this CPU has no channels-last kernels or the plan has channel windows
    /// or groups.
    fn new(plan: &ConvPlan, weight: &[f32]) -> Option<Self> {
        let winograd = crate::kernels::winograd::enabled();
        match winograd.then(|| WinogradConv::new(plan, weight)).flatten() {
            Some(conv) => Some(Self::Winograd(conv)),
            None => NhwcConv::new(plan, weight).map(Self::Direct),
        }
    }

    /// `out = epilogue(conv(x))`, all channels-last.
    fn forward(&self, x: &[f32], epilogue: &Epilogue<'_, f32>, out: &mut [f32]) {
        match self {
            Self::Direct(conv) => conv.forward(x, epilogue, out),
            Self::Winograd(conv) => conv.forward(x, epilogue, out),
        }
    }

    /// Bytes of the laid-out weight.
    fn weight_bytes(&self) -> usize {
        match self {
            Self::Direct(conv) => conv.weight_bytes(),
            Self::Winograd(conv) => conv.weight_bytes(),
        }
    }
}

/// What a step computes.
#[derive(Debug)]
enum Op {
    Conv(Box<Conv>),
    MaxPool(Pool2d),
    AvgPool(Pool2d),
    AdaptiveAvg {
        input: Shape,
        output: [usize; 2],
    },
    /// `relu?(x * scale[c] + shift[c])` (a batch norm or ReLU no convolution took).
    Affine {
        shape: Shape,
        scale: Vec<f32>,
        shift: Vec<f32>,
        relu: bool,
    },
}

/// One step: `output = op(input)` (plus `residual` in a convolution's write).
#[derive(Debug)]
struct Step {
    op: Op,
    input: Value,
    residual: Option<Value>,
    output: Value,
}

impl Step {
    /// What the step computes, in a few words (`conv 64->128 3x3/1 112x112`).
    fn name(&self) -> String {
        match &self.op {
            Op::Conv(conv) => {
                let plan = &conv.plan;
                let [_, cin, h, w] = plan.input_shape();
                let [kh, kw] = plan.kernel();
                let [sh, _] = plan.stride();
                let rings = plan.rings_count();
                let versatile = if rings > 1 || plan.n_c() > 1 {
                    format!(" ({rings} rings, {} windows)", plan.windows().len())
                } else {
                    String::new()
                };
                let pool = if conv.pool.is_some() {
                    " + 2x2 max pool"
                } else {
                    ""
                };
                let winograd = if matches!(conv.channels_last, Some(ChannelsLast::Winograd(_))) {
                    " by F(2x2,3x3)"
                } else {
                    ""
                };
                format!(
                    "conv {cin}->{} {kh}x{kw}/{sh} {h}x{w}{versatile}{pool}{winograd}",
                    plan.out_channels()
                )
            }
            Op::MaxPool(_) => "max pool".into(),
            Op::AvgPool(_) => "average pool".into(),
            Op::AdaptiveAvg { .. } => "adaptive average pool".into(),
            Op::Affine { .. } => "scale and shift".into(),
        }
    }
}

/// One step of a [profiled](InferencePlan::profile) plan.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTime {
    /// What the step computes (`conv 64->128 3x3/1 112x112`, `max pool`).
    pub name: String,
    /// Its multiply-adds (zero for steps other than convolutions and linear layers).
    pub macs: u64,
    /// Its median time over the runs, in seconds.
    pub seconds: f64,
}

/// A model compiled for one input shape (see the [module docs](self)).
#[derive(Debug)]
pub struct InferencePlan {
    input: Shape,
    classes: usize,
    /// Where the activations become channels-last, if they do (see the [module
    /// docs](self)).
    switch: Option<Switch>,
    /// The value converted at the switch, channels-last.
    staged: Vec<f32>,
    steps: Vec<Step>,
    /// The buffer of each value (`None` for the input).
    placement: Vec<Option<usize>>,
    buffers: Vec<LineAligned>,
    output: Value,
}

/// Compiled plans of one model, one per input shape it is given (a data set's last
/// batch is usually smaller).
#[derive(Debug)]
pub struct PlanCache<'a> {
    model: &'a Model,
    plans: HashMap<Shape, InferencePlan>,
}

impl<'a> PlanCache<'a> {
    /// No plan yet.
    pub fn new(model: &'a Model) -> Self {
        Self {
            model,
            plans: HashMap::new(),
        }
    }

    /// The logits `[batch, classes]` of `input`, through the plan of its shape (compiled
    /// on first use).
    pub fn forward(&mut self, input: Tensor<4>) -> Result<Tensor<2>, InferError> {
        let shape = input.dims();
        let plan = match self.plans.entry(shape) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(InferencePlan::compile(self.model, shape)?),
        };
        plan.forward(input)
    }
}

/// A tensor's values as f32.
fn values<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>, InferError> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|err| InferError::Unsupported(format!("reading a parameter: {err:?}")))
}

fn symmetric(padding: &PaddingConfig2d, what: &str) -> Result<[usize; 2], InferError> {
    symmetric_padding(padding).ok_or_else(|| {
        InferError::Unsupported(format!(
            "{what} with padding {padding:?} (symmetric explicit padding only)"
        ))
    })
}

/// Builds the steps of a plan.
struct Builder {
    batch: usize,
    /// Each value's shape.
    shapes: Vec<Shape>,
    steps: Vec<Step>,
}

impl Builder {
    fn value(&mut self, shape: Shape) -> Value {
        self.shapes.push(shape);
        self.shapes.len() - 1
    }

    fn push(&mut self, op: Op, input: Value, output: Shape) -> Value {
        let output = self.value(output);
        self.steps.push(Step {
            op,
            input,
            residual: None,
            output,
        });
        output
    }

    /// The convolution step that produced `x`, when `x` is the latest value.
    fn producer(&mut self, x: Value) -> Option<&mut Step> {
        self.steps.last_mut().filter(|step| step.output == x)
    }

    fn conv_step(
        &mut self,
        layer: &ConvLayer,
        x: Value,
        shape: Shape,
    ) -> Result<(Value, Shape), InferError> {
        let (plan, weight, bias, dense) = match layer {
            ConvLayer::Dense(conv) => {
                let plan = dense_conv_plan(conv, shape).ok_or_else(|| {
                    InferError::Unsupported(format!(
                        "a dense convolution of weight {:?} on an input {shape:?}",
                        conv.weight.dims()
                    ))
                })?;
                (
                    plan,
                    conv.weight.val(),
                    conv.bias.as_ref().map(|b| b.val()),
                    true,
                )
            }
            ConvLayer::Versatile(conv) => {
                let pads = conv.check_input(&shape)?;
                let plan = conv.geometry().plan(shape, pads)?;
                (
                    plan,
                    conv.weight.val(),
                    conv.bias.as_ref().map(|b| b.val()),
                    false,
                )
            }
        };
        let out_shape = plan.output_shape();
        let conv = Conv {
            weight: values(weight)?,
            shift: bias.map(values).transpose()?,
            plan,
            packed: None,
            channels_last: None,
            dense,
            scale: None,
            relu: false,
            pool: None,
        };
        Ok((self.push(Op::Conv(Box::new(conv)), x, out_shape), out_shape))
    }

    /// A linear layer on `[batch, features]` (stored as `[batch, features, 1, 1]`), as a
    /// dense 1×1 convolution.
    fn linear_step(
        &mut self,
        linear: &Linear,
        x: Value,
        features: usize,
    ) -> Result<(Value, usize), InferError> {
        let [d_input, d_output] = linear.weight.dims();
        if d_input != features {
            return Err(InferError::Unsupported(format!(
                "a linear layer of {d_input} inputs after {features} features"
            )));
        }
        let input = [self.batch, features, 1, 1];
        let plan = ConvPlan::dense(input, d_output, [1, 1], [1, 1], [1, 1], 1, [(0, 0), (0, 0)])?;
        // burn keeps the weight as [d_input, d_output]; the kernel wants [d_output, d_input].
        let stored = values(linear.weight.val())?;
        let mut weight = vec![0.0; stored.len()];
        for (i, row) in stored.chunks_exact(d_output).enumerate() {
            for (o, &v) in row.iter().enumerate() {
                weight[o * d_input + i] = v;
            }
        }
        let conv = Conv {
            weight,
            shift: linear.bias.as_ref().map(|b| values(b.val())).transpose()?,
            plan,
            packed: None,
            channels_last: None,
            dense: true,
            scale: None,
            relu: false,
            pool: None,
        };
        Ok((
            self.push(Op::Conv(Box::new(conv)), x, [self.batch, d_output, 1, 1]),
            d_output,
        ))
    }

    /// Batch norm with its running statistics: into the convolution that produced `x`
    /// when there is one, else a step of its own.
    fn norm_step(&mut self, norm: &BatchNorm, x: Value, shape: Shape) -> Result<Value, InferError> {
        let gamma = values(norm.gamma.val())?;
        let beta = values(norm.beta.val())?;
        let mean = values(norm.running_mean.value())?;
        let var = values(norm.running_var.value())?;
        if gamma.len() != shape[1] {
            return Err(InferError::Unsupported(format!(
                "a batch norm of {} channels on {} channels",
                gamma.len(),
                shape[1]
            )));
        }
        // y = (x - mean) / sqrt(var + eps) * gamma + beta = x * scale + (beta - mean * scale)
        let scale: Vec<f64> = gamma
            .iter()
            .zip(&var)
            .map(|(&g, &v)| g as f64 / (v as f64 + norm.epsilon).sqrt())
            .collect();
        if let Some(Step {
            op: Op::Conv(conv),
            residual: None,
            ..
        }) = self.producer(x)
        {
            if conv.scale.is_none() && !conv.relu {
                let bias = conv.shift.take();
                let shift = (0..scale.len())
                    .map(|c| {
                        let b = bias.as_ref().map_or(0.0, |b| b[c] as f64);
                        ((b - mean[c] as f64) * scale[c] + beta[c] as f64) as f32
                    })
                    .collect();
                conv.shift = Some(shift);
                conv.scale = Some(scale.iter().map(|&s| s as f32).collect());
                return Ok(x);
            }
        }
        let shift = (0..scale.len())
            .map(|c| (beta[c] as f64 - mean[c] as f64 * scale[c]) as f32)
            .collect();
        let op = Op::Affine {
            shape,
            scale: scale.iter().map(|&s| s as f32).collect(),
            shift,
            relu: false,
        };
        Ok(self.push(op, x, shape))
    }

    /// ReLU: into the write of the step that produced `x` when it can, else a step.
    fn relu_step(&mut self, x: Value, shape: Shape) -> Value {
        match self.producer(x) {
            Some(Step {
                op: Op::Conv(conv), ..
            }) if !conv.relu => {
                conv.relu = true;
                return x;
            }
            Some(Step {
                op: Op::Affine { relu, .. },
                ..
            }) if !*relu => {
                *relu = true;
                return x;
            }
            _ => {}
        }
        let op = Op::Affine {
            shape,
            scale: vec![1.0; shape[1]],
            shift: vec![0.0; shape[1]],
            relu: true,
        };
        self.push(op, x, shape)
    }

    /// A pooling step: `op` makes the step from the window it is given.
    fn pool(
        &mut self,
        kind: &str,
        op: fn(Pool2d) -> Op,
        x: Value,
        shape: Shape,
        window: PoolWindow,
    ) -> Result<(Value, Shape), InferError> {
        let pool = pooling(kind, shape, window)?;
        let out_shape = [shape[0], shape[1], pool.output[0], pool.output[1]];
        Ok((self.push(op(pool), x, out_shape), out_shape))
    }

    fn max_pool_step(
        &mut self,
        pool: &MaxPool2d,
        x: Value,
        shape: Shape,
    ) -> Result<(Value, Shape), InferError> {
        if pool.dilation != [1, 1] {
            return Err(InferError::Unsupported("a dilated max pool".into()));
        }
        let window = PoolWindow {
            kernel: pool.kernel_size,
            stride: pool.stride,
            padding: symmetric(&pool.padding, "a max pool")?,
            ceil: pool.ceil_mode,
        };
        // VGG's 2 x 2 pooling (whole blocks, the kernel's floor-mode output) after a
        // convolution whose pass can pool as it writes.
        let pool = pooling("max pool", shape, window)?;
        let in_write = pool.pairs() && pool.output == [shape[2] / 2, shape[3] / 2];
        let out_shape = [shape[0], shape[1], pool.output[0], pool.output[1]];
        if let Some(Step {
            op: Op::Conv(conv),
            residual: None,
            ..
        }) = self.producer(x)
        {
            if in_write && conv.pool.is_none() && conv.plan.pools_in_write() {
                conv.pool = Some(pool);
                self.shapes[x] = out_shape;
                return Ok((x, out_shape));
            }
        }
        Ok((self.push(Op::MaxPool(pool), x, out_shape), out_shape))
    }

    fn avg_pool_step(
        &mut self,
        pool: &AvgPool2d,
        x: Value,
        shape: Shape,
    ) -> Result<(Value, Shape), InferError> {
        if !pool.count_include_pad {
            return Err(InferError::Unsupported(
                "an average pool that does not count its padding".into(),
            ));
        }
        let window = PoolWindow {
            kernel: pool.kernel_size,
            stride: pool.stride,
            padding: symmetric(&pool.padding, "an average pool")?,
            ceil: pool.ceil_mode,
        };
        self.pool("average pool", Op::AvgPool, x, shape, window)
    }

    fn adaptive_step(
        &mut self,
        pool: &AdaptiveAvgPool2d,
        x: Value,
        shape: Shape,
    ) -> (Value, Shape) {
        let output = pool.output_size;
        if [shape[2], shape[3]] == output {
            // Each window is one value: the identity.
            return (x, shape);
        }
        let out_shape = [shape[0], shape[1], output[0], output[1]];
        let op = Op::AdaptiveAvg {
            input: shape,
            output,
        };
        (self.push(op, x, out_shape), out_shape)
    }

    /// Where the plan switches to channels-last activations, if it can: the first
    /// convolution of 16 input channels or more, or a dense one, whose input is small
    /// enough to convert ([`MAX_CONVERTED_PER_IMAGE`]) (a versatile first
    /// layer of an image network, a few channels over a large map, runs faster
    /// channels-first: ResNet-50's spatial 7 x 7 stem 0.56-0.60 ms against 1.25-1.30;
    /// dense, 1.19-1.25 against 1.14-1.16), with the value it reads, which is converted
    /// there. From the switch on, every step must run channels-last (every convolution
    /// on [`NhwcConv`] reading its input as it was produced, or on a 1 x 1 map, where
    /// both layouts are one, a linear layer after a flattened map included; pools with a
    /// channels-last version) and read no value from before it but the converted one;
    /// the output must be 1 x 1. [`Self::go_channels_last`] then rewrites the steps.
    fn channels_last_from(&self, output: Value) -> Option<Switch> {
        let step = self.steps.iter().position(|step| match &step.op {
            Op::Conv(conv) => {
                let [_, channels, h, w] = self.shapes[step.input];
                (conv.plan.input_shape()[1] >= 16 || conv.plan.rings_count() == 1)
                    && channels * h * w <= MAX_CONVERTED_PER_IMAGE
            }
            _ => false,
        })?;
        self.switch_at(step, output)
    }

    /// The switch at `step` (see [`Self::channels_last_from`]), where every later step
    /// can run channels-last.
    fn switch_at(&self, step: usize, output: Value) -> Option<Switch> {
        let value = self.steps[step].input;
        let [_, _, h, w] = self.shapes[output];
        // Values made before the switch (the input too, where steps come before it).
        let mut before = vec![false; self.shapes.len()];
        before[INPUT] = step > 0;
        for earlier in &self.steps[..step] {
            before[earlier.output] = true;
        }
        let fits = self.steps[step..].iter().all(|step| {
            let reads_after = std::iter::once(step.input)
                .chain(step.residual)
                .all(|v| v == value || !before[v]);
            reads_after
                && match &step.op {
                    Op::Conv(conv) => {
                        let as_produced = conv.plan.input_shape() == self.shapes[step.input];
                        (as_produced && NhwcConv::supports(&conv.plan)) || on_one_pixel(&conv.plan)
                    }
                    Op::MaxPool(_) | Op::Affine { .. } => true,
                    Op::AdaptiveAvg { output, .. } => *output == [1, 1],
                    Op::AvgPool(_) => false,
                }
        });
        (fits && h * w == 1 && !before[output]).then_some(Switch {
            step,
            value,
            shape: self.shapes[value],
        })
    }

    /// Rewrites the steps from `switch` on for channels-last activations: a convolution
    /// that pools in its write writes the whole map and a max-pooling step follows (the
    /// channels-last pass has no pooling write), and a linear layer that reads a
    /// flattened map takes its weight's columns in the map's channels-last order.
    fn go_channels_last(&mut self, switch: &Switch) {
        let mut index = switch.step;
        while index < self.steps.len() {
            let input_shape = self.shapes[self.steps[index].input];
            if let Op::Conv(conv) = &mut self.steps[index].op {
                if reads_whole_map(&conv.plan) {
                    // The same products as a linear layer on the flattened map, which the
                    // channels-first pass streams (VGG's `fc6`: 14.8 ms against 19.4 on
                    // `NhwcConv`, batch 1).
                    let [batch, channels, h, w] = input_shape;
                    conv.plan = ConvPlan::dense(
                        [batch, channels * h * w, 1, 1],
                        conv.plan.out_channels(),
                        [1, 1],
                        [1, 1],
                        [1, 1],
                        1,
                        [(0, 0); 2],
                    )
                    .expect("a 1 x 1 plan of a valid plan's sizes");
                }
                let plan_input = conv.plan.input_shape();
                if plan_input != input_shape {
                    // A flattened `[channels, h, w]` map: columns from `(c, y, x)` to
                    // `(y, x, c)` order.
                    let [_, channels, h, w] = input_shape;
                    let mut by_channel = vec![0.0; plan_input[1]];
                    for row in conv.weight.chunks_exact_mut(by_channel.len()) {
                        by_channel.copy_from_slice(row);
                        for (c, plane) in by_channel.chunks_exact(h * w).enumerate() {
                            for (pixel, &v) in plane.iter().enumerate() {
                                row[pixel * channels + c] = v;
                            }
                        }
                    }
                }
                if let Some(pool) = conv.pool.take() {
                    let written = self.value(pool.input);
                    let pooled = std::mem::replace(&mut self.steps[index].output, written);
                    index += 1;
                    self.steps.insert(
                        index,
                        Step {
                            op: Op::MaxPool(pool),
                            input: written,
                            residual: None,
                            output: pooled,
                        },
                    );
                }
            }
            index += 1;
        }
    }

    /// Folds the dense layers' batch-norm scale into their weights and lays every weight
    /// out for its pass: channels-last from step `channels_last_from` on, channels-first
    /// before.
    fn finish(&mut self, channels_last_from: Option<usize>) {
        for (index, step) in self.steps.iter_mut().enumerate() {
            let channels_last = channels_last_from.is_some_and(|from| index >= from);
            if let Op::Conv(conv) = &mut step.op {
                if conv.dense {
                    if let Some(scale) = conv.scale.take() {
                        let per_channel = conv.weight.len() / scale.len().max(1);
                        for (row, &s) in conv.weight.chunks_exact_mut(per_channel).zip(&scale) {
                            row.iter_mut().for_each(|w| *w *= s);
                        }
                    }
                }
                if channels_last && !on_one_pixel(&conv.plan) {
                    conv.channels_last = ChannelsLast::new(&conv.plan, &conv.weight);
                } else {
                    conv.packed = Some(PackedWeight::new(&conv.plan, &conv.weight));
                }
                conv.weight = Vec::new();
            }
        }
    }
}

/// The most values per image the plan converts to channels-last at its switch. The
/// conversion of VGG-16's 64 x 224 x 224 map took about 3 ms, and its next layer (spatial,
/// 32 primaries, narrower than the channels-last pass's panels) ran slower channels-last
/// too; switching at the next convolution, after the pooling, gains both.
const MAX_CONVERTED_PER_IMAGE: usize = 1 << 20;

/// Whether `plan` maps a 1 x 1 map to a 1 x 1 map (a linear layer), where channels-first
/// and channels-last are the same values in the same order: the channels-first pass runs
/// it in either layout (it streams a large weight, as VGG's `fc6`).
fn on_one_pixel(plan: &ConvPlan) -> bool {
    let [_, _, h, w] = plan.input_shape();
    let [_, _, oh, ow] = plan.output_shape();
    [h, w, oh, ow] == [1, 1, 1, 1]
}

/// Whether `plan` is a dense convolution whose one output pixel reads the whole input
/// map (no padding): a linear layer on the flattened map.
fn reads_whole_map(plan: &ConvPlan) -> bool {
    let [_, channels, h, w] = plan.input_shape();
    let [_, _, oh, ow] = plan.output_shape();
    plan.rings_count() == 1
        && plan.n_c() == 1
        && plan.windows().len() == 1
        && plan.weight_shape()[1] == channels
        && plan.kernel() == [h, w]
        && plan.padding_begin() == [0, 0]
        && plan.dilation() == [1, 1]
        && [oh, ow] == [1, 1]
}

/// Where a plan switches to channels-last activations.
#[derive(Debug, Clone, Copy)]
struct Switch {
    /// The first step that runs channels-last.
    step: usize,
    /// The value it reads, converted before it runs.
    value: Value,
    /// That value's shape.
    shape: Shape,
}

/// Whether the environment asks for channels-first plans (`VERSATILE_LAYOUT=nchw`).
fn channels_first_asked() -> bool {
    std::env::var_os("VERSATILE_LAYOUT").is_some_and(|v| v == "nchw")
}

impl Forward for Builder {
    type Map = (Value, Shape);
    type Vector = (Value, usize);
    type Error = InferError;

    fn conv(
        &mut self,
        layer: &ConvLayer,
        (x, shape): (Value, Shape),
    ) -> Result<(Value, Shape), InferError> {
        self.conv_step(layer, x, shape)
    }

    fn batch_norm(
        &mut self,
        norm: &BatchNorm,
        (x, shape): (Value, Shape),
    ) -> Result<(Value, Shape), InferError> {
        Ok((self.norm_step(norm, x, shape)?, shape))
    }

    fn relu(&mut self, (x, shape): (Value, Shape)) -> Result<(Value, Shape), InferError> {
        Ok((self.relu_step(x, shape), shape))
    }

    fn max_pool(
        &mut self,
        pool: &MaxPool2d,
        (x, shape): (Value, Shape),
    ) -> Result<(Value, Shape), InferError> {
        self.max_pool_step(pool, x, shape)
    }

    fn avg_pool(
        &mut self,
        pool: &AvgPool2d,
        (x, shape): (Value, Shape),
    ) -> Result<(Value, Shape), InferError> {
        self.avg_pool_step(pool, x, shape)
    }

    fn adaptive_avg_pool(
        &mut self,
        pool: &AdaptiveAvgPool2d,
        (x, shape): (Value, Shape),
    ) -> Result<(Value, Shape), InferError> {
        Ok(self.adaptive_step(pool, x, shape))
    }

    /// The residual add and its ReLU go into the write of the convolution that ends the
    /// main path (the walk computes the shortcut first).
    fn add_relu(
        &mut self,
        (x, shape): (Value, Shape),
        (shortcut, shortcut_shape): (Value, Shape),
    ) -> Result<(Value, Shape), InferError> {
        if shortcut_shape != shape {
            return Err(InferError::Unsupported(format!(
                "a residual block adding a {shortcut_shape:?} shortcut to a {shape:?} path"
            )));
        }
        let step = self
            .producer(x)
            .filter(|step| matches!(step.op, Op::Conv(_)) && step.residual.is_none())
            .ok_or_else(|| {
                InferError::Unsupported(
                    "a residual block whose path does not end in a convolution".into(),
                )
            })?;
        step.residual = Some(shortcut);
        if let Op::Conv(conv) = &mut step.op {
            conv.relu = true;
        }
        Ok((x, shape))
    }

    /// Flattening `[batch, c, h, w]` is free: the values are already in that order.
    fn flatten(&mut self, (x, shape): (Value, Shape)) -> Result<(Value, usize), InferError> {
        Ok((x, shape[1] * shape[2] * shape[3]))
    }

    fn linear(
        &mut self,
        linear: &Linear,
        (x, features): (Value, usize),
    ) -> Result<(Value, usize), InferError> {
        self.linear_step(linear, x, features)
    }

    fn relu_vector(&mut self, (x, features): (Value, usize)) -> Result<(Value, usize), InferError> {
        Ok((self.relu_step(x, [self.batch, features, 1, 1]), features))
    }

    /// Dropout is the identity in evaluation.
    fn dropout(&mut self, _: &Dropout, x: (Value, usize)) -> Result<(Value, usize), InferError> {
        Ok(x)
    }
}

/// The pooling of `window` on a `shape` map (`kind` names it in the error for a window
/// that leaves no output).
fn pooling(kind: &str, shape: Shape, window: PoolWindow) -> Result<Pool2d, InferError> {
    let PoolWindow {
        kernel,
        stride,
        padding,
        ceil,
    } = window;
    let out = |axis: usize| {
        window_out(
            shape[2 + axis],
            kernel[axis],
            stride[axis],
            padding[axis],
            ceil,
        )
        .filter(|&size| size > 0)
    };
    let (Some(oh), Some(ow)) = (out(0), out(1)) else {
        return Err(InferError::Unsupported(format!(
            "a {kind} of {kernel:?} on a {}x{} map",
            shape[2], shape[3]
        )));
    };
    Ok(Pool2d {
        input: shape,
        output: [oh, ow],
        kernel,
        stride,
        padding,
    })
}

/// A pooling window's settings.
struct PoolWindow {
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    ceil: bool,
}

/// Hands each value a buffer: a free one (the smallest that holds it, else the largest,
/// grown) or a new one; a buffer is free again after the step that reads its value for
/// the last time. Returns each value's buffer and the buffers' sizes.
fn place(lens: &[usize], steps: &[Step], output: Value) -> (Vec<Option<usize>>, Vec<usize>) {
    let mut last_use = vec![0; lens.len()];
    for (i, step) in steps.iter().enumerate() {
        last_use[step.input] = i;
        if let Some(r) = step.residual {
            last_use[r] = i;
        }
    }
    last_use[output] = usize::MAX;
    let mut placement = vec![None; lens.len()];
    let mut sizes: Vec<usize> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let need = lens[step.output];
        let fits = free
            .iter()
            .enumerate()
            .filter(|(_, &b)| sizes[b] >= need)
            .min_by_key(|(_, &b)| sizes[b])
            .or_else(|| free.iter().enumerate().max_by_key(|(_, &b)| sizes[b]))
            .map(|(at, _)| at);
        let buffer = match fits {
            Some(at) => free.swap_remove(at),
            None => {
                sizes.push(0);
                sizes.len() - 1
            }
        };
        sizes[buffer] = sizes[buffer].max(need);
        placement[step.output] = Some(buffer);
        for value in std::iter::once(step.input).chain(step.residual) {
            if last_use[value] == i {
                if let Some(b) = placement[value] {
                    if !free.contains(&b) {
                        free.push(b);
                    }
                }
            }
        }
    }
    (placement, sizes)
}

impl InferencePlan {
    /// Compiles `model` (its eval forward: batch-norm running statistics, no dropout) for
    /// inputs of shape `[batch, channels, height, width]`.
    pub fn compile(model: &Model, input: Shape) -> Result<Self, InferError> {
        Self::compile_in(model, input, channels_first_asked())
    }

    /// [`compile`](Self::compile), its activations channels-first whatever the model
    /// (for comparisons of the two layouts).
    pub fn compile_channels_first(model: &Model, input: Shape) -> Result<Self, InferError> {
        Self::compile_in(model, input, true)
    }

    fn compile_in(model: &Model, input: Shape, channels_first: bool) -> Result<Self, InferError> {
        let config = model.config();
        config.check_input(input)?;
        if input[0] == 0 {
            return Err(InferError::Unsupported("a batch of 0 images".into()));
        }
        let model = model.valid();
        let mut builder = Builder {
            batch: input[0],
            shapes: vec![input],
            steps: Vec::new(),
        };
        let (output, _) = model.walk(&mut builder, (INPUT, input))?;
        let switch = if channels_first {
            None
        } else {
            builder.channels_last_from(output)
        };
        if let Some(switch) = &switch {
            builder.go_channels_last(switch);
        }
        builder.finish(switch.map(|s| s.step));
        let lens: Vec<usize> = builder.shapes.iter().map(|s| s.iter().product()).collect();
        let (placement, sizes) = place(&lens, &builder.steps, output);
        Ok(Self {
            input,
            classes: config.num_classes,
            switch,
            staged: Vec::new(),
            steps: builder.steps,
            placement,
            buffers: sizes.into_iter().map(LineAligned::zeros).collect(),
            output,
        })
    }

    /// The input shape the plan was compiled for.
    pub fn input_shape(&self) -> Shape {
        self.input
    }

    /// Multiply-adds of one run (convolutions and linear layers).
    pub fn macs(&self) -> u64 {
        self.convs().map(|conv| conv.plan.macs()).sum()
    }

    /// Bytes of the packed weights.
    pub fn weight_bytes(&self) -> usize {
        self.convs()
            .map(|conv| {
                conv.packed.as_ref().map_or(0, PackedWeight::bytes)
                    + conv
                        .channels_last
                        .as_ref()
                        .map_or(0, ChannelsLast::weight_bytes)
            })
            .sum()
    }

    /// Whether the activations become channels-last (`[batch, height, width,
    /// channels]`; see the [module docs](self)), else stay channels-first.
    pub fn channels_last(&self) -> bool {
        self.switch.is_some()
    }

    /// Bytes of the activation buffers (allocated once), the channels-last copy of the
    /// value converted at the switch included.
    pub fn activation_bytes(&self) -> usize {
        let staged: usize = self.switch.map_or(0, |s| s.shape.iter().product());
        self.buffers.iter().map(|b| b.len() * 4).sum::<usize>() + staged * 4
    }

    /// Number of kernel calls of one run.
    pub fn steps(&self) -> usize {
        self.steps.len()
    }

    fn convs(&self) -> impl Iterator<Item = &Conv> {
        self.steps.iter().filter_map(|step| match &step.op {
            Op::Conv(conv) => Some(&**conv),
            _ => None,
        })
    }

    /// The logits `[batch, classes]` (row-major) of a batch of images
    /// `[batch, channels, height, width]` (row-major), valid until the next run.
    pub fn run(&mut self, input: &[f32]) -> Result<&[f32], InferError> {
        let expected: usize = self.input.iter().product();
        if input.len() != expected {
            return Err(InferError::Input {
                expected: self.input,
                got: input.len(),
            });
        }
        self.run_steps(input, |_, _| {});
        let len = self.input[0] * self.classes;
        let buffer = self.placement[self.output].expect("the output has a buffer");
        Ok(&self.buffers[buffer].as_slice()[..len])
    }

    /// Runs the plan `runs` times on `input` and reports each step with its median
    /// time, in step order (where a run's time goes, layer by layer).
    pub fn profile(&mut self, input: &[f32], runs: usize) -> Result<Vec<StepTime>, InferError> {
        self.run(input)?;
        let mut times = vec![Vec::with_capacity(runs); self.steps.len()];
        for _ in 0..runs {
            self.run_steps(input, |step, seconds| times[step].push(seconds));
        }
        Ok(self
            .steps
            .iter()
            .zip(times)
            .map(|(step, mut seconds)| {
                seconds.sort_by(f64::total_cmp);
                StepTime {
                    name: step.name(),
                    macs: match &step.op {
                        Op::Conv(conv) => conv.plan.macs(),
                        _ => 0,
                    },
                    seconds: seconds.get(seconds.len() / 2).copied().unwrap_or(0.0),
                }
            })
            .collect())
    }

    /// Runs every step on `input` (of the plan's length), reporting each step's index
    /// and seconds to `timed`.
    ///
    /// The steps run on one of the pool's threads, not the caller's: a kernel's parallel
    /// tasks then start on that thread and the other threads steal them, where a caller
    /// outside the pool would hand every layer's tasks over to the pool and sleep until
    /// they end (two thread wake-ups per parallel pass; ResNet-50 spatial at batch 1
    /// 37.5-38.1 -> 36.7-36.9 ms, 2 threads). The other threads poll for those tasks
    /// meanwhile instead of sleeping between passes
    /// ([`kernels::run_with_polling_threads`]; 31.8-32.3 -> 31.0-31.7 ms).
    fn run_steps(&mut self, input: &[f32], timed: impl FnMut(usize, f64) + Send) {
        kernels::run_with_polling_threads(|| self.run_steps_on_this_thread(input, timed));
    }

    /// [`run_steps`](Self::run_steps) on the calling thread.
    fn run_steps_on_this_thread(&mut self, input: &[f32], mut timed: impl FnMut(usize, f64)) {
        let mut staged = std::mem::take(&mut self.staged);
        for (index, step) in self.steps.iter().enumerate() {
            let start = std::time::Instant::now();
            let channels_last = self.switch.is_some_and(|s| index >= s.step);
            if let Some(switch) = self.switch.filter(|s| s.step == index) {
                let len: usize = switch.shape.iter().product();
                let source = value_of(&self.placement, &self.buffers, input, switch.value);
                kernels::nhwc::to_channels_last(&source[..len], switch.shape, &mut staged);
            }
            let out_buffer = self.placement[step.output].expect("every step output has a buffer");
            let mut out = std::mem::take(&mut self.buffers[out_buffer]);
            {
                let converted = self.switch.filter(|_| channels_last).map(|s| s.value);
                let read = |value: Value| {
                    if converted == Some(value) {
                        &staged[..]
                    } else {
                        value_of(&self.placement, &self.buffers, input, value)
                    }
                };
                let residual = step.residual.map(read);
                execute(
                    step,
                    channels_last,
                    read(step.input),
                    residual,
                    out.as_mut_slice(),
                );
            }
            self.buffers[out_buffer] = out;
            timed(index, start.elapsed().as_secs_f64());
        }
        self.staged = staged;
    }

    /// [`run`](Self::run) on a tensor: logits `[batch, classes]` on the input's device.
    pub fn forward(&mut self, input: Tensor<4>) -> Result<Tensor<2>, InferError> {
        let dims = input.dims();
        if dims != self.input {
            return Err(InferError::Shape {
                expected: self.input,
                got: dims,
            });
        }
        let device = input.device();
        let values = values(input)?;
        let batch = self.input[0];
        let classes = self.classes;
        let logits = self.run(&values)?.to_vec();
        Ok(Tensor::from_data(
            TensorData::new(logits, [batch, classes]),
            &device,
        ))
    }
}

/// The values of `value`: the caller's input, or its buffer.
fn value_of<'a>(
    placement: &[Option<usize>],
    buffers: &'a [LineAligned],
    input: &'a [f32],
    value: Value,
) -> &'a [f32] {
    match placement[value] {
        None => input,
        Some(b) => buffers[b].as_slice(),
    }
}

/// Runs one step into `out` (at least its output's length; the rest is left as it is),
/// on activations in the plan's layout.
fn execute(step: &Step, channels_last: bool, x: &[f32], residual: Option<&[f32]>, out: &mut [f32]) {
    match &step.op {
        Op::Conv(conv) => {
            let plan = &conv.plan;
            let x = &x[..plan.input_len()];
            let epilogue = Epilogue {
                scale: conv.scale.as_deref(),
                shift: conv.shift.as_deref(),
                residual: residual.map(|r| &r[..plan.output_len()]),
                relu: conv.relu,
                pool: conv.pool.is_some(),
            };
            let len = epilogue.output_len(plan);
            match (&conv.channels_last, &conv.packed) {
                (Some(nhwc), _) => nhwc.forward(x, &epilogue, &mut out[..len]),
                (None, Some(packed)) => {
                    kernels::forward_packed(plan, x, packed, &epilogue, &mut out[..len])
                }
                (None, None) => unreachable!("every weight is laid out at compile time"),
            }
        }
        Op::MaxPool(p) if channels_last => {
            pool::max_pool2d_channels_last(p, &x[..p.input_len()], &mut out[..p.output_len()])
        }
        Op::MaxPool(p) => pool::max_pool2d(p, &x[..p.input_len()], &mut out[..p.output_len()]),
        Op::AvgPool(p) => pool::avg_pool2d(p, &x[..p.input_len()], &mut out[..p.output_len()]),
        Op::AdaptiveAvg { input, output } => {
            let len = input[0] * input[1] * output[0] * output[1];
            let x = &x[..input.iter().product()];
            if channels_last {
                // Only to 1 x 1 (`fits_channels_last`).
                pool::global_avg_pool_channels_last(*input, x, &mut out[..len]);
            } else {
                pool::adaptive_avg_pool2d(*input, *output, x, &mut out[..len]);
            }
        }
        Op::Affine {
            shape,
            scale,
            shift,
            relu,
        } => {
            let plane = shape[2] * shape[3];
            let channels = shape[1].max(1);
            let len: usize = shape.iter().product();
            for (i, (dst, &v)) in out[..len].iter_mut().zip(&x[..len]).enumerate() {
                let c = if channels_last {
                    i % channels
                } else {
                    (i / plane.max(1)) % channels
                };
                let y = v * scale[c] + shift[c];
                *dst = if *relu && y <= 0.0 { 0.0 } else { y };
            }
        }
    }
}
