//! The nested evaluation as a burn backend extension, with its own `Autodiff` backward,
//! and the switch that picks it or the dense form: on `Flex` the nested-ring CPU kernels
//! ([`crate::kernels`]), on burn's CubeCL backends (feature `cube`, which `wgpu` and
//! `cuda` turn on) the `#[cube]` kernels of the `gpu` module.
//!
//! One operation, [`NestedConvBackend::nested_conv2d`], covers the versatile layer and
//! dense convolutions alike: what it computes is described by its [`ConvPlan`]. Each
//! backend supplies its forward pass and gradients ([`NestedKernels`]); the `Autodiff`
//! node that calls them is written once for all of them.

use std::borrow::Cow;

use std::cell::Cell;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
#[cfg(feature = "cube")]
use burn::backend::Cube;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, DispatchDevice, Flex};
use burn::tensor::{DType, Device, Tensor, TensorData};

use super::pin::PinGuard;
use crate::kernels::{self, ConvPlan, Needs, Real};

/// Which implementation a layer's forward pass (and its backward) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ForwardPath {
    /// The fused kernel where it runs (see [`nested_supported`]), the dense form
    /// elsewhere; [`pin_auto_path`] can pin it.
    #[default]
    Auto,
    /// The fused nested kernel (CPU or GPU); an input it cannot take is an error.
    Fused,
    /// The dense form: unfolded weight and burn's `conv2d` (every backend).
    DenseForm,
}

impl std::fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForwardPath::Auto => "auto",
            ForwardPath::Fused => "fused",
            ForwardPath::DenseForm => "dense_form",
        })
    }
}

thread_local! {
    static AUTO_PIN: Cell<ForwardPath> = const { Cell::new(ForwardPath::Auto) };
}

/// Pins what [`ForwardPath::Auto`] means for every layer run on the calling thread until
/// the returned guard is dropped (`ForwardPath::Auto`: the default choice). For tests and
/// benchmarks that compare the two paths on whole models; being per thread, tests
/// running in parallel do not see each other's pins.
pub fn pin_auto_path(path: ForwardPath) -> PinGuard<ForwardPath> {
    PinGuard::set(&AUTO_PIN, path)
}

/// What [`ForwardPath::Auto`] stands for on the calling thread: `Fused`, `DenseForm`,
/// or `Auto` (no pin: the fused kernel where it runs).
pub fn auto_path() -> ForwardPath {
    AUTO_PIN.with(Cell::get)
}

/// Whether the fused kernel can run on these tensors: all on a `Flex` device (plain or
/// autodiff) and all f32 or all f64.
pub fn fused_supported(input: &Tensor<4>, weight: &Tensor<4>, bias: Option<&Tensor<1>>) -> bool {
    let dtype = input.dtype();
    is_flex(&input.device())
        && matches!(dtype, DType::F32 | DType::F64)
        && weight.dtype() == dtype
        && bias.is_none_or(|b| b.dtype() == dtype)
}

/// Whether the versatile layer's nested kernel can run on these tensors: the CPU kernel
/// ([`fused_supported`]), or, in a build with the `cube` feature, the GPU kernel on a
/// CubeCL device (wgpu, cuda) with all-f32 tensors.
pub fn nested_supported(input: &Tensor<4>, weight: &Tensor<4>, bias: Option<&Tensor<1>>) -> bool {
    fused_supported(input, weight, bias) || gpu_supported(input, weight, bias)
}

#[cfg(feature = "cube")]
fn gpu_supported(input: &Tensor<4>, weight: &Tensor<4>, bias: Option<&Tensor<1>>) -> bool {
    super::gpu::is_cube(&input.device())
        && input.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32)
}

#[cfg(not(feature = "cube"))]
fn gpu_supported(_: &Tensor<4>, _: &Tensor<4>, _: Option<&Tensor<1>>) -> bool {
    false
}

/// Whether `device` is the `Flex` CPU device, with or without autodiff.
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Runs the fused kernel described by `plan` on burn tensors (see [`nested_supported`]).
///
/// # Shapes
/// - `input`: `[batch, c, h, w]`, `weight`: `[m, depth, kh, kw]`, `bias`: `[n]`
/// - output: `[batch, n, out_h, out_w]`, channels in the plan's block layout
///
/// # Panics
/// If a tensor's shape differs from the plan's, or the tensors are on a device or of a
/// dtype no nested kernel takes (checked before any kernel runs).
pub fn nested_conv2d(
    input: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    plan: ConvPlan,
) -> Tensor<4> {
    nested_conv2d_measured(input, weight, bias, plan, false).0
}

/// [`nested_conv2d`], and where `batch_stats` asks for them and the kernels take them (f32
/// on `Flex`), the batch statistics of its output: `[2, n]`, each channel's mean
/// then its biased variance, as a training batch norm normalises with them. They are
/// taken tile by tile as the kernel writes the output
/// ([`kernels::forward_with_moments`]), so the batch norm after the convolution reads
/// no pass of its own over it; they carry no gradient (the batch norm's backward
/// differentiates through them).
///
/// # Panics
/// As [`nested_conv2d`].
pub fn nested_conv2d_measured(
    input: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    plan: ConvPlan,
    batch_stats: bool,
) -> (Tensor<4>, Option<Tensor<2>>) {
    assert_eq!(
        input.dims(),
        plan.input_shape(),
        "nested_conv2d: input shape"
    );
    assert_eq!(
        weight.dims(),
        plan.weight_shape(),
        "nested_conv2d: weight shape"
    );
    if let Some(b) = &bias {
        assert_eq!(b.dims(), [plan.out_channels()], "nested_conv2d: bias shape");
    }
    assert!(
        nested_supported(&input, &weight, bias.as_ref()),
        "nested_conv2d runs on a Flex device with all-f32 or all-f64 tensors, or on a GPU \
         (feature `cube`) with all-f32 tensors; got {:?} with input {:?}, weight {:?}",
        input.device(),
        input.dtype(),
        weight.dtype()
    );
    let measured = batch_stats
        && is_flex(&input.device())
        && input.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
    let (x, w) = (input.into_dispatch(), weight.into_dispatch());
    if measured {
        let (out, stats) = match bias {
            Some(b) => <Dispatch as NestedConvStatsBackend>::nested_conv2d_bias_stats(
                x,
                w,
                b.into_dispatch(),
                plan,
            ),
            None => <Dispatch as NestedConvStatsBackend>::nested_conv2d_stats(x, w, plan),
        };
        return (
            Tensor::from_dispatch(out),
            Some(Tensor::from_dispatch(stats)),
        );
    }
    let out = match bias {
        Some(b) => {
            <Dispatch as NestedConvBackend>::nested_conv2d_bias(x, w, b.into_dispatch(), plan)
        }
        None => <Dispatch as NestedConvBackend>::nested_conv2d(x, w, plan),
    };
    (Tensor::from_dispatch(out), None)
}

/// The fused convolution that also returns its output's batch statistics, as a backend
/// operation on `Flex` (f32) and its `Autodiff`.
#[backend_extension(Flex, Autodiff)]
pub trait NestedConvStatsBackend: burn::backend::Backend {
    /// [`NestedConvBackend::nested_conv2d`] of f32 tensors, and the per-channel mean and
    /// biased variance of its output as `[2, n]` (means first), which carry no gradient.
    fn nested_conv2d_stats(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        plan: ConvPlan,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// [`nested_conv2d_stats`](Self::nested_conv2d_stats) plus a bias `[n]`.
    fn nested_conv2d_bias_stats(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        plan: ConvPlan,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// The convolution and its output's statistics on flex tensors (f32).
fn flex_forward_stats(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    plan: &ConvPlan,
) -> (FlexTensor, FlexTensor) {
    let all_f32 = [Some(x), Some(weight), bias]
        .into_iter()
        .flatten()
        .all(|t| t.dtype() == DType::F32);
    assert!(all_f32, "nested_conv2d_stats: f32 tensors only");
    let (out, moments) = with_conv_values::<f32, _>(x, weight, bias, |x, w, b| {
        kernels::forward_with_moments(plan, x, w, b)
    });
    let mut stats = vec![0.0; 2 * moments.len()];
    kernels::norm::stats_from_moments(&moments, &mut stats);
    (
        flex_tensor(out, plan.output_shape().to_vec()),
        flex_tensor(stats, vec![2, moments.len()]),
    )
}

impl NestedConvStatsBackend for Flex {
    fn nested_conv2d_stats(
        x: FlexTensor,
        weight: FlexTensor,
        plan: ConvPlan,
    ) -> (FlexTensor, FlexTensor) {
        flex_forward_stats(&x, &weight, None, &plan)
    }

    fn nested_conv2d_bias_stats(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        plan: ConvPlan,
    ) -> (FlexTensor, FlexTensor) {
        flex_forward_stats(&x, &weight, Some(&bias), &plan)
    }
}

/// A float tensor of `Flex` under `Autodiff`.
type AutodiffFlexTensor<C> = FloatTensor<Autodiff<Flex, C>>;

/// The preparation of the convolution's autodiff node on `Flex`, with `N` parents.
type FlexConvPrep<C, const N: usize> =
    OpsKind<NestedConvBackward, Flex, (FlexTensor, FlexTensor, ConvPlan), C, N>;

/// The measured convolution on the autodiff backend, once `prep` holds its parents
/// (`[x, weight, bias?]`): the output is the convolution's node, with its backward; the
/// statistics are a constant.
fn measured_node<C: CheckpointStrategy, const N: usize>(
    prep: FlexConvPrep<C, N>,
    x: AutodiffFlexTensor<C>,
    weight: AutodiffFlexTensor<C>,
    bias: Option<AutodiffFlexTensor<C>>,
    plan: ConvPlan,
) -> (AutodiffFlexTensor<C>, AutodiffFlexTensor<C>) {
    let bias = bias.map(|b| b.into_primitive());
    let (out, stats) = match prep {
        OpsKind::Tracked(prep) => {
            let (x, w) = (x.into_primitive(), weight.into_primitive());
            let (out, stats) = flex_forward_stats(&x, &w, bias.as_ref(), &plan);
            (prep.finish((x, w, plan), out), stats)
        }
        OpsKind::UnTracked(prep) => {
            let (out, stats) =
                flex_forward_stats(x.primitive(), weight.primitive(), bias.as_ref(), &plan);
            (prep.finish(out), stats)
        }
    };
    (out, AutodiffFlexTensor::<C>::new(stats))
}

impl<C: CheckpointStrategy> NestedConvStatsBackend for Autodiff<Flex, C> {
    fn nested_conv2d_stats(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        plan: ConvPlan,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let prep = NestedConvBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful();
        measured_node(prep, x, weight, None, plan)
    }

    fn nested_conv2d_bias_stats(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        plan: ConvPlan,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let prep = NestedConvBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful();
        measured_node(prep, x, weight, Some(bias), plan)
    }
}

/// The fused convolution as a backend operation (implemented on `Flex`, `Cube` with the
/// `cube` feature, and `Autodiff` of each).
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub trait NestedConvBackend: burn::backend::Backend {
    /// The nested convolution of `plan` without bias: input `[batch, c, h, w]`, weight
    /// `[m, depth, kh, kw]`, output `[batch, n, out_h, out_w]`.
    fn nested_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        plan: ConvPlan,
    ) -> FloatTensor<Self>;

    /// [`nested_conv2d`](Self::nested_conv2d) plus a bias `[n]`.
    fn nested_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        plan: ConvPlan,
    ) -> FloatTensor<Self>;
}

/// The float types the fused kernel takes from flex tensors.
pub(crate) trait FlexReal: Real + burn::tensor::Element {
    /// The tensor's values when it is contiguous and of this type.
    fn slice(tensor: &FlexTensor) -> Option<&[Self]>;
}

impl FlexReal for f32 {
    fn slice(tensor: &FlexTensor) -> Option<&[Self]> {
        tensor.as_slice::<f32>()
    }
}

impl FlexReal for f64 {
    fn slice(tensor: &FlexTensor) -> Option<&[Self]> {
        tensor.as_slice::<f64>()
    }
}

/// `tensor` itself when its values of type `T` are contiguous, else a contiguous copy;
/// read it with [`values`].
pub(crate) fn contiguous<T: FlexReal>(tensor: &FlexTensor) -> Cow<'_, FlexTensor> {
    match T::slice(tensor) {
        Some(_) => Cow::Borrowed(tensor),
        None => Cow::Owned(tensor.to_contiguous()),
    }
}

/// The values of a contiguous tensor of type `T` (one [`contiguous`] returned).
pub(crate) fn values<T: FlexReal>(tensor: &FlexTensor) -> &[T] {
    T::slice(tensor).expect("a contiguous tensor of the checked dtype")
}

/// A flex tensor's values as a contiguous slice (copied only if it is a strided view).
pub(super) fn with_values<T: FlexReal, R>(tensor: &FlexTensor, f: impl FnOnce(&[T]) -> R) -> R {
    f(values(&contiguous::<T>(tensor)))
}

pub(super) fn flex_tensor<T: burn::tensor::Element>(
    values: Vec<T>,
    shape: Vec<usize>,
) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn forward_typed<T: FlexReal>(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    plan: &ConvPlan,
) -> FlexTensor {
    let out = with_conv_values::<T, _>(x, weight, bias, |x, w, b| kernels::forward(plan, x, w, b));
    flex_tensor(out, plan.output_shape().to_vec())
}

/// `f(x, weight, bias)` on the values of a convolution's flex tensors (copied only where
/// one is a strided view).
fn with_conv_values<T: FlexReal, R>(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    f: impl FnOnce(&[T], &[T], Option<&[T]>) -> R,
) -> R {
    with_values::<T, _>(x, |x| {
        with_values::<T, _>(weight, |w| match bias {
            Some(b) => with_values::<T, _>(b, |b| f(x, w, Some(b))),
            None => f(x, w, None),
        })
    })
}

fn flex_forward(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    plan: &ConvPlan,
) -> FlexTensor {
    match x.dtype() {
        DType::F32 => forward_typed::<f32>(x, weight, bias, plan),
        DType::F64 => forward_typed::<f64>(x, weight, bias, plan),
        other => panic!("nested_conv2d: unsupported dtype {other:?} (f32 or f64)"),
    }
}

/// The three gradients as flex tensors, each when asked for.
type FlexGradients = (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>);

fn backward_typed<T: FlexReal>(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    plan: &ConvPlan,
    needs: Needs,
) -> FlexGradients {
    let grads = with_values::<T, _>(x, |x| {
        with_values::<T, _>(weight, |w| {
            with_values::<T, _>(grad, |g| kernels::backward(plan, x, w, g, needs))
        })
    });
    (
        grads.x.map(|v| flex_tensor(v, plan.input_shape().to_vec())),
        grads
            .weight
            .map(|v| flex_tensor(v, plan.weight_shape().to_vec())),
        grads
            .bias
            .map(|v| flex_tensor(v, vec![plan.out_channels()])),
    )
}

fn flex_backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    plan: &ConvPlan,
    needs: Needs,
) -> FlexGradients {
    match x.dtype() {
        DType::F32 => backward_typed::<f32>(x, weight, grad, plan, needs),
        DType::F64 => backward_typed::<f64>(x, weight, grad, plan, needs),
        other => panic!("nested_conv2d backward: unsupported dtype {other:?} (f32 or f64)"),
    }
}

/// The nested convolution's forward pass and gradients on one backend's own tensors:
/// what [`NestedConvBackend`] and its `Autodiff` backward call.
pub trait NestedKernels: Backend {
    /// The convolution of `plan`, with `bias` when given.
    fn nested_forward(
        x: &FloatTensor<Self>,
        weight: &FloatTensor<Self>,
        bias: Option<&FloatTensor<Self>>,
        plan: &ConvPlan,
    ) -> FloatTensor<Self>;

    /// The gradients `(input, weight, bias)` for the output gradient `grad`, each when
    /// `needs` asks for it.
    #[allow(clippy::type_complexity)]
    fn nested_backward(
        x: &FloatTensor<Self>,
        weight: &FloatTensor<Self>,
        grad: &FloatTensor<Self>,
        plan: &ConvPlan,
        needs: Needs,
    ) -> (
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    );
}

impl NestedKernels for Flex {
    fn nested_forward(
        x: &FlexTensor,
        weight: &FlexTensor,
        bias: Option<&FlexTensor>,
        plan: &ConvPlan,
    ) -> FlexTensor {
        flex_forward(x, weight, bias, plan)
    }

    fn nested_backward(
        x: &FlexTensor,
        weight: &FlexTensor,
        grad: &FlexTensor,
        plan: &ConvPlan,
        needs: Needs,
    ) -> FlexGradients {
        flex_backward(x, weight, grad, plan, needs)
    }
}

#[cfg(feature = "cube")]
impl NestedKernels for Cube {
    fn nested_forward(
        x: &FloatTensor<Self>,
        weight: &FloatTensor<Self>,
        bias: Option<&FloatTensor<Self>>,
        plan: &ConvPlan,
    ) -> FloatTensor<Self> {
        super::gpu::forward(x, weight, bias, plan)
    }

    fn nested_backward(
        x: &FloatTensor<Self>,
        weight: &FloatTensor<Self>,
        grad: &FloatTensor<Self>,
        plan: &ConvPlan,
        needs: Needs,
    ) -> super::gpu::CubeGradients {
        super::gpu::backward(x, weight, grad, plan, needs)
    }
}

impl<B: NestedKernels> NestedConvBackend for B {
    fn nested_conv2d(x: FloatTensor<B>, weight: FloatTensor<B>, plan: ConvPlan) -> FloatTensor<B> {
        B::nested_forward(&x, &weight, None, &plan)
    }

    fn nested_conv2d_bias(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: FloatTensor<B>,
        plan: ConvPlan,
    ) -> FloatTensor<B> {
        B::nested_forward(&x, &weight, Some(&bias), &plan)
    }
}

/// Backward step of [`NestedConvBackend::nested_conv2d`]; parents `[x, weight, bias?]`.
#[derive(Debug)]
struct NestedConvBackward;

impl<B: NestedKernels, const N: usize> Backward<B, N> for NestedConvBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, ConvPlan);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, plan) = ops.state;
        let parent = |i: usize| ops.parents.get(i).and_then(|p| p.as_ref());
        let needs = Needs {
            x: parent(0).is_some(),
            weight: parent(1).is_some(),
            bias: parent(2).is_some(),
        };
        let (dx, dw, db) = B::nested_backward(&x, &weight, &grad, &plan, needs);
        for (i, value) in [dx, dw, db].into_iter().enumerate() {
            if let (Some(node), Some(value)) = (parent(i), value) {
                grads.register::<B>(node.id, value);
            }
        }
    }
}

impl<B: NestedKernels, C: CheckpointStrategy> NestedConvBackend for Autodiff<B, C> {
    fn nested_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        plan: ConvPlan,
    ) -> FloatTensor<Self> {
        match NestedConvBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (x.into_primitive(), weight.into_primitive());
                let out = B::nested_forward(&x, &w, None, &plan);
                prep.finish((x, w, plan), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::nested_forward(
                x.primitive(),
                weight.primitive(),
                None,
                &plan,
            )),
        }
    }

    fn nested_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        plan: ConvPlan,
    ) -> FloatTensor<Self> {
        match NestedConvBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (x.into_primitive(), weight.into_primitive());
                let out = B::nested_forward(&x, &w, Some(bias.primitive()), &plan);
                prep.finish((x, w, plan), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::nested_forward(
                x.primitive(),
                weight.primitive(),
                Some(bias.primitive()),
                &plan,
            )),
        }
    }
}
