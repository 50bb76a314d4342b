//! Batch normalisation in training on `Flex` as backend operations with their own
//! `Autodiff` backward: the batch's statistics, then the normalisation (optionally with
//! the ReLU after it, or with a residual block's add and ReLU), each one pass of the NCHW
//! kernels in [`crate::kernels::norm`]. burn's generic training batch norm transposes the
//! activation to channel-major for each reduction, forward and backward (its layout
//! copies were the largest single item of a `vgg_small` training step), and a separate
//! ReLU (and add) costs a pass and an activation more each way.
//!
//! A batch norm, its ReLU and the max pooling after them run as one operation too, which
//! writes only the pooled activation (burn's max pooling, its indices and the
//! full-size activation it reads were a tenth of a `vgg_small` step).
//!
//! [`batch_norm_train`], [`batch_norm_relu_train`], [`batch_norm_add_relu_train`] and
//! [`batch_norm_relu_max_pool_train`] are what the models call; they update the module's running statistics as burn's
//! `BatchNorm` does, so records and checkpoints are unchanged.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::nn::pool::MaxPool2d;
use burn::nn::BatchNorm;
use burn::tensor::activation::relu;
use burn::tensor::{DType, Tensor};

use super::fused::{contiguous, flex_tensor, is_flex, values};
use super::geometry::{symmetric_padding, window_out};
use crate::kernels::norm::{self as kernels, NormShape, PoolSources};
use crate::kernels::pool::Pool2d;

/// The training batch norm's steps as backend operations (on `Flex` and its `Autodiff`).
#[backend_extension(Flex, Autodiff)]
pub trait BatchNormBackend: burn::backend::Backend {
    /// The per-channel mean and biased variance of `x` `[batch, c, h, w]`, as `[2, c]`
    /// (means first). Carries no gradient: [`batch_norm_normalize`](Self::batch_norm_normalize)
    /// differentiates through the statistics.
    fn batch_norm_stats(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `(x - mean) / sqrt(var + epsilon) * gamma + beta`, then a ReLU when `relu`, with
    /// `stats` from [`batch_norm_stats`](Self::batch_norm_stats) of the same `x`; its
    /// gradient treats the statistics as functions of `x`.
    fn batch_norm_normalize(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> FloatTensor<Self>;

    /// `relu(batch_norm_normalize(x, gamma, beta, stats, epsilon) + residual)`: the end
    /// of a residual block; its gradient treats the statistics as functions of `x`.
    fn batch_norm_add_relu(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;

    /// `max_pool(relu(batch_norm_normalize(x, gamma, beta, stats, epsilon)))` with
    /// `pool`'s window (`pool.input` is `x`'s shape): a convolution block's end, written
    /// pooled; its gradient treats the statistics as functions of `x`.
    fn batch_norm_relu_max_pool(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        epsilon: f64,
        pool: Pool2d,
    ) -> FloatTensor<Self>;
}

fn norm_shape(x: &FlexTensor) -> NormShape {
    let dims = x.layout().shape();
    NormShape {
        batch: dims[0],
        channels: dims[1],
        plane: dims[2..].iter().product(),
    }
}

impl BatchNormBackend for Flex {
    fn batch_norm_stats(x: FlexTensor) -> FlexTensor {
        let shape = norm_shape(&x);
        let mut stats = vec![0.0; 2 * shape.channels];
        kernels::batch_stats(values(&contiguous::<f32>(&x)), shape, &mut stats);
        flex_tensor(stats, vec![2, shape.channels])
    }

    fn batch_norm_normalize(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        epsilon: f64,
        relu: bool,
    ) -> FlexTensor {
        NormalizeState::new(x, gamma, beta, stats, epsilon, relu).forward()
    }

    fn batch_norm_add_relu(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        residual: FlexTensor,
        epsilon: f64,
    ) -> FlexTensor {
        NormalizeState::new(x, gamma, beta, stats, epsilon, false).forward_add_relu(&contiguous::<
            f32,
        >(
            &residual
        ))
    }

    fn batch_norm_relu_max_pool(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        epsilon: f64,
        pool: Pool2d,
    ) -> FlexTensor {
        let norm = NormalizeState::new(x, gamma, beta, stats, epsilon, false);
        norm.forward_relu_max_pool(&pool).0
    }
}

/// The statistics' backward step: none (see [`BatchNormBackend::batch_norm_stats`]).
#[derive(Debug)]
struct StatsBackward;

impl<B: Backend> Backward<B, 1> for StatsBackward {
    type State = ();

    fn backward(self, _: Ops<(), 1>, _: &mut Gradients, _: &mut Checkpointer) {}
}

/// The normalisation's backward step; parents `[x, gamma, beta]`.
#[derive(Debug)]
struct NormalizeBackward;

/// A normalisation's inputs (contiguous f32) and settings: what its forward pass reads
/// and what its backward step keeps.
#[derive(Debug, Clone)]
struct NormalizeState {
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    stats: FlexTensor,
    epsilon: f64,
    relu: bool,
}

impl NormalizeState {
    fn new(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        epsilon: f64,
        relu: bool,
    ) -> Self {
        let contiguous = |t: FlexTensor| contiguous::<f32>(&t).into_owned();
        NormalizeState {
            x: contiguous(x),
            gamma: contiguous(gamma),
            beta: contiguous(beta),
            stats: contiguous(stats),
            epsilon,
            relu,
        }
    }

    fn shape(&self) -> NormShape {
        norm_shape(&self.x)
    }

    /// An activation of `x`'s shape from its values.
    fn activation(&self, values: Vec<f32>) -> FlexTensor {
        flex_tensor(values, self.x.layout().shape().to_vec())
    }

    /// `relu?(normalize(x))`.
    fn forward(&self) -> FlexTensor {
        let (x, gamma, beta, stats) = self.values();
        let out = kernels::normalize(x, gamma, beta, stats, self.epsilon, self.relu, self.shape());
        self.activation(out)
    }

    /// `relu(normalize(x) + residual)`.
    fn forward_add_relu(&self, residual: &FlexTensor) -> FlexTensor {
        assert_eq!(
            residual.layout().shape(),
            self.x.layout().shape(),
            "batch_norm_add_relu: the residual's shape differs from the input's"
        );
        let (x, gamma, beta, stats) = self.values();
        let out = kernels::normalize_add_relu(
            x,
            gamma,
            beta,
            stats,
            self.epsilon,
            values(residual),
            self.shape(),
        );
        self.activation(out)
    }

    /// `max_pool(relu(normalize(x)))`, and where each output came from (what
    /// [`Self::relu_max_pool_gradients`] needs).
    fn forward_relu_max_pool(&self, pool: &Pool2d) -> (FlexTensor, PoolSources) {
        assert_eq!(
            pool.input.to_vec(),
            self.x.layout().shape().to_vec(),
            "batch_norm_relu_max_pool: the window's input shape differs from the input's"
        );
        let (x, gamma, beta, stats) = self.values();
        let (out, sources) =
            kernels::normalize_relu_max_pool(x, gamma, beta, stats, self.epsilon, pool);
        let [batch, channels, _, _] = pool.input;
        let out = flex_tensor(out, vec![batch, channels, pool.output[0], pool.output[1]]);
        (out, sources)
    }

    /// The gradients of `x`, gamma and beta of [`Self::forward_relu_max_pool`] for its
    /// output gradient `grad` and the `sources` it gave.
    fn relu_max_pool_gradients(
        &self,
        grad: &FlexTensor,
        pool: &Pool2d,
        sources: &[u32],
    ) -> [FlexTensor; 3] {
        let shape = self.shape();
        let (x, gamma, _, stats) = self.values();
        let (mut dgamma, mut dbeta) = (vec![0.0; shape.channels], vec![0.0; shape.channels]);
        let dx = kernels::relu_max_pool_backward(
            x,
            values(&contiguous::<f32>(grad)),
            sources,
            gamma,
            stats,
            self.epsilon,
            pool,
            &mut dgamma,
            &mut dbeta,
        );
        let channels = vec![shape.channels];
        [
            self.activation(dx),
            flex_tensor(dgamma, channels.clone()),
            flex_tensor(dbeta, channels),
        ]
    }

    /// The values of `x`, gamma, beta and the statistics.
    fn values(&self) -> (&[f32], &[f32], &[f32], &[f32]) {
        (
            values(&self.x),
            values(&self.gamma),
            values(&self.beta),
            values(&self.stats),
        )
    }

    /// The gradients of `x`, gamma and beta for the output gradient `grad`.
    fn gradients(&self, grad: &FlexTensor) -> [FlexTensor; 3] {
        let shape = self.shape();
        let (x, gamma, beta, stats) = self.values();
        let (mut dgamma, mut dbeta) = (vec![0.0; shape.channels], vec![0.0; shape.channels]);
        let dx = kernels::normalize_backward(
            x,
            values(&contiguous::<f32>(grad)),
            gamma,
            beta,
            stats,
            self.epsilon,
            self.relu,
            shape,
            &mut dgamma,
            &mut dbeta,
        );
        let channels = vec![shape.channels];
        [
            self.activation(dx),
            flex_tensor(dgamma, channels.clone()),
            flex_tensor(dbeta, channels),
        ]
    }

    /// For [`Self::forward_add_relu`] and its output gradient `grad`: the gradient past
    /// the ReLU (the residual's, and the normalisation's output's).
    fn add_relu_passed(&self, grad: &FlexTensor, residual: &FlexTensor) -> FlexTensor {
        let (x, gamma, beta, stats) = self.values();
        let passed = kernels::add_relu_backward(
            x,
            values(&contiguous::<f32>(grad)),
            gamma,
            beta,
            stats,
            self.epsilon,
            values(residual),
            self.shape(),
        );
        self.activation(passed)
    }
}

/// Registers the gradient of each parent that has a node.
macro_rules! register {
    ($ops:expr, $values:expr, $grads:expr) => {
        for (parent, value) in $ops.parents.iter().zip($values) {
            if let Some(node) = parent {
                $grads.register::<Flex>(node.id, value);
            }
        }
    };
}

impl Backward<Flex, 3> for NormalizeBackward {
    type State = NormalizeState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let values = ops.state.gradients(&grad);
        register!(ops, values, grads);
    }
}

/// The backward step of [`BatchNormBackend::batch_norm_add_relu`]; parents `[x, gamma,
/// beta, residual]`.
#[derive(Debug)]
struct AddReluBackward;

impl Backward<Flex, 4> for AddReluBackward {
    /// The normalisation (without ReLU) and the residual (contiguous).
    type State = (NormalizeState, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (norm, residual) = &ops.state;
        let passed = norm.add_relu_passed(&grad, residual);
        let [dx, dgamma, dbeta] = norm.gradients(&passed);
        register!(ops, [dx, dgamma, dbeta, passed], grads);
    }
}

/// The backward step of [`BatchNormBackend::batch_norm_relu_max_pool`]; parents `[x,
/// gamma, beta]`.
#[derive(Debug)]
struct ReluMaxPoolBackward;

impl Backward<Flex, 3> for ReluMaxPoolBackward {
    /// The normalisation (without ReLU), the window and where each output came from.
    type State = (NormalizeState, Pool2d, PoolSources);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (norm, pool, sources) = &ops.state;
        register!(
            ops,
            norm.relu_max_pool_gradients(&grad, pool, sources),
            grads
        );
    }
}

impl NormalizeState {
    /// The state of a normalisation on the autodiff backend, from its inputs' values
    /// (after their nodes went to the operation's preparation).
    fn tracked<C: CheckpointStrategy>(
        x: FloatTensor<Autodiff<Flex, C>>,
        gamma: FloatTensor<Autodiff<Flex, C>>,
        beta: FloatTensor<Autodiff<Flex, C>>,
        stats: FloatTensor<Autodiff<Flex, C>>,
        epsilon: f64,
        relu: bool,
    ) -> Self {
        let [x, gamma, beta, stats] = [x, gamma, beta, stats].map(|t| t.into_primitive());
        NormalizeState::new(x, gamma, beta, stats, epsilon, relu)
    }
}

impl<C: CheckpointStrategy> BatchNormBackend for Autodiff<Flex, C> {
    fn batch_norm_stats(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let stats = Flex::batch_norm_stats(x.primitive().clone());
        StatsBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateless(stats)
    }

    fn batch_norm_normalize(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> FloatTensor<Self> {
        let prep = NormalizeBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let state = NormalizeState::tracked::<C>(x, gamma, beta, stats, epsilon, relu);
        let out = state.forward();
        match prep {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn batch_norm_add_relu(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let prep = AddReluBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node(), residual.node()])
            .compute_bound()
            .stateful();
        let norm = NormalizeState::tracked::<C>(x, gamma, beta, stats, epsilon, false);
        let residual = contiguous::<f32>(&residual.into_primitive()).into_owned();
        let out = norm.forward_add_relu(&residual);
        match prep {
            OpsKind::Tracked(prep) => prep.finish((norm, residual), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn batch_norm_relu_max_pool(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        epsilon: f64,
        pool: Pool2d,
    ) -> FloatTensor<Self> {
        let prep = ReluMaxPoolBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let norm = NormalizeState::tracked::<C>(x, gamma, beta, stats, epsilon, false);
        let (out, sources) = norm.forward_relu_max_pool(&pool);
        match prep {
            OpsKind::Tracked(prep) => prep.finish((norm, pool, sources), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// Whether [`batch_norm_train`] runs its own kernels on `x` (f32 on `Flex`, with
/// autodiff or without); elsewhere it is burn's batch norm.
pub fn batch_norm_kernels_run(x: &Tensor<4>) -> bool {
    is_flex(&x.device()) && x.dtype() == DType::F32
}

/// A feature map `[batch, c, h, w]`, with its batch statistics (`[2, c]`: each channel's
/// mean, then its biased variance) where the convolution that wrote it took them
/// ([`super::fused::nested_conv2d_measured`]): a training batch norm then uses them
/// instead of a pass of its own over the map.
#[derive(Debug, Clone)]
pub struct Activation {
    /// The map.
    pub values: Tensor<4>,
    /// Its batch statistics, where they were taken with it.
    pub batch_stats: Option<Tensor<2>>,
}

impl From<Tensor<4>> for Activation {
    fn from(values: Tensor<4>) -> Self {
        Self {
            values,
            batch_stats: None,
        }
    }
}

/// `norm`'s forward pass, as burn's `BatchNorm::forward` computes it (training with the
/// batch's statistics, updating the running ones, on an autodiff device when the module
/// is in training; the running statistics otherwise), on the kernels of this module for
/// f32 on `Flex` in training and on burn's batch norm elsewhere.
///
/// # Shapes
/// - `x`: `[batch, channels, h, w]`; output: the same.
pub fn batch_norm_train(norm: &BatchNorm, x: impl Into<Activation>) -> Tensor<4> {
    normalize(norm, x, Then::Nothing)
}

/// `relu(batch_norm_train(norm, x))`, with the ReLU in the normalisation's write (and
/// its mask in the normalisation's backward passes) where the kernels of this module run.
///
/// # Shapes
/// - `x`: `[batch, channels, h, w]`; output: the same.
pub fn batch_norm_relu_train(norm: &BatchNorm, x: impl Into<Activation>) -> Tensor<4> {
    normalize(norm, x, Then::Relu)
}

/// `relu(batch_norm_train(norm, x) + residual)`, the end of a residual block, as one
/// pass where the kernels of this module run.
///
/// # Shapes
/// - `x`, `residual`: `[batch, channels, h, w]`; output: the same.
pub fn batch_norm_add_relu_train(
    norm: &BatchNorm,
    x: impl Into<Activation>,
    residual: Tensor<4>,
) -> Tensor<4> {
    normalize(norm, x, Then::AddRelu(Box::new(residual)))
}

/// `pool(relu(batch_norm_train(norm, x)))`, a convolution block's end, as one pass that
/// writes only the pooled activation where the kernels of this module run (and `pool`
/// has no dilation and the same padding on both sides of each axis); the gradient goes
/// to each window's maximum, as burn's max pooling sends it.
///
/// # Shapes
/// - `x`: `[batch, channels, h, w]`; output: `[batch, channels, out_h, out_w]`, as
///   `pool` gives them.
pub fn batch_norm_relu_max_pool_train(
    norm: &BatchNorm,
    pool: &MaxPool2d,
    x: impl Into<Activation>,
) -> Tensor<4> {
    normalize(norm, x, Then::ReluMaxPool(pool))
}

/// What follows the normalisation, in the same operation.
enum Then<'a> {
    Nothing,
    Relu,
    AddRelu(Box<Tensor<4>>),
    ReluMaxPool(&'a MaxPool2d),
}

/// What the kernels of this module run after the normalisation of `x`.
enum Fused {
    Normalize { relu: bool },
    AddRelu(Box<Tensor<4>>),
    ReluMaxPool(Pool2d),
}

impl Then<'_> {
    /// What the kernels run for this on `x`, or `self` back where they cannot.
    fn fused(self, x: &Tensor<4>) -> Result<Fused, Self> {
        match self {
            Then::Nothing => Ok(Fused::Normalize { relu: false }),
            Then::Relu => Ok(Fused::Normalize { relu: true }),
            Then::AddRelu(residual)
                if residual.dims() == x.dims() && residual.dtype() == DType::F32 =>
            {
                Ok(Fused::AddRelu(residual))
            }
            Then::ReluMaxPool(pool) => match max_pool_window(pool, x.dims()) {
                Some(window) => Ok(Fused::ReluMaxPool(window)),
                None => Err(self),
            },
            other => Err(other),
        }
    }

    /// This after `y`, as burn's modules compute it.
    fn after(self, y: Tensor<4>) -> Tensor<4> {
        match self {
            Then::Nothing => y,
            Then::Relu => relu(y),
            Then::AddRelu(residual) => relu(y + *residual),
            Then::ReluMaxPool(pool) => pool.forward(relu(y)),
        }
    }
}

/// `pool`'s window on an input of shape `dims`, where the kernels run it: no dilation,
/// the same padding on both sides of each axis (at most half the window, as burn
/// requires), a non-empty output; `None` otherwise.
fn max_pool_window(pool: &MaxPool2d, dims: [usize; 4]) -> Option<Pool2d> {
    let padding = symmetric_padding(&pool.padding)?;
    let (kernel, stride) = (pool.kernel_size, pool.stride);
    let fits =
        |axis: usize| kernel[axis] > 0 && stride[axis] > 0 && 2 * padding[axis] <= kernel[axis];
    if pool.dilation != [1, 1] || !fits(0) || !fits(1) {
        return None;
    }
    let out = |axis: usize| {
        window_out(
            dims[2 + axis],
            kernel[axis],
            stride[axis],
            padding[axis],
            pool.ceil_mode,
        )
        .filter(|&size| size > 0)
    };
    Some(Pool2d {
        input: dims,
        output: [out(0)?, out(1)?],
        kernel,
        stride,
        padding,
    })
}

fn normalize(norm: &BatchNorm, x: impl Into<Activation>, then: Then) -> Tensor<4> {
    let Activation {
        values: x,
        batch_stats,
    } = x.into();
    let device = x.device();
    let training = device.is_autodiff() && norm.training.is_enabled();
    let fused = if training && batch_norm_kernels_run(&x) && norm.gamma.val().dtype() == DType::F32
    {
        then.fused(&x)
    } else {
        Err(then)
    };
    let fused = match fused {
        Ok(fused) => fused,
        Err(then) => return then.after(norm.forward(x)),
    };
    let channels = x.dims()[1];
    let stats = batch_stats
        .filter(|stats| stats.dims() == [2, channels])
        .unwrap_or_else(|| {
            Tensor::from_dispatch(<Dispatch as BatchNormBackend>::batch_norm_stats(
                x.clone().detach().into_dispatch(),
            ))
        });
    let (gamma, beta) = (
        norm.gamma.val().into_dispatch(),
        norm.beta.val().into_dispatch(),
    );
    let (x, stats_in) = (x.into_dispatch(), stats.clone().into_dispatch());
    let out = Tensor::<4>::from_dispatch(match fused {
        Fused::Normalize { relu } => <Dispatch as BatchNormBackend>::batch_norm_normalize(
            x,
            gamma,
            beta,
            stats_in,
            norm.epsilon,
            relu,
        ),
        Fused::AddRelu(residual) => <Dispatch as BatchNormBackend>::batch_norm_add_relu(
            x,
            gamma,
            beta,
            stats_in,
            (*residual).into_dispatch(),
            norm.epsilon,
        ),
        Fused::ReluMaxPool(pool) => <Dispatch as BatchNormBackend>::batch_norm_relu_max_pool(
            x,
            gamma,
            beta,
            stats_in,
            norm.epsilon,
            pool,
        ),
    });
    let [mean, variance] = [0, 1].map(|row| stats.clone().narrow(0, row, 1).reshape([channels]));
    let momentum = norm.momentum;
    let update = |running: Tensor<1>, batch: Tensor<1>| {
        running
            .to_device(&device)
            .mul_scalar(1.0 - momentum)
            .add(batch.mul_scalar(momentum))
            .detach()
    };
    norm.running_mean
        .update(update(norm.running_mean.value_sync(), mean));
    norm.running_var
        .update(update(norm.running_var.value_sync(), variance));
    out
}
