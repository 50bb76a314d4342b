//! The nested-ring CPU kernels ([`crate::kernels`]) as a burn backend extension on
//! `Flex`, with its own `Autodiff` backward, and the switch that picks it or the dense
//! form.
//!
//! One operation, [`NestedConvBackend::nested_conv2d`], covers the versatile layer and
//! dense convolutions alike: what it computes is described by its [`ConvPlan`].

use std::cell::Cell;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Dispatch, DispatchDevice, Flex};
use burn::tensor::{DType, Device, Tensor, TensorData};

use super::pin::PinGuard;
use crate::kernels::{self, ConvPlan, Needs, Real};

/// Which implementation a layer's forward pass (and its backward) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ForwardPath {
    /// The fused kernel where it runs (a `Flex` device, plain or autodiff, with f32 or
    /// f64 tensors), the dense form elsewhere; [`pin_auto_path`] can pin it.
    #[default]
    Auto,
    /// The fused nested-ring kernel; an input it cannot take is an error.
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

/// Whether `device` is the `Flex` CPU device, with or without autodiff.
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Runs the fused kernel described by `plan` on burn tensors (see [`fused_supported`]).
///
/// # Shapes
/// - `input`: `[batch, c, h, w]`, `weight`: `[m, depth, kh, kw]`, `bias`: `[n]`
/// - output: `[batch, n, out_h, out_w]`, channels in the plan's block layout
///
/// # Panics
/// If a tensor's shape differs from the plan's, or the tensors are not all f32 or all
/// f64 on a `Flex` device (checked before any kernel runs).
pub fn nested_conv2d(
    input: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    plan: ConvPlan,
) -> Tensor<4> {
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
        fused_supported(&input, &weight, bias.as_ref()),
        "nested_conv2d runs on a Flex device with all-f32 or all-f64 tensors; got {:?} with \
         input {:?}, weight {:?}",
        input.device(),
        input.dtype(),
        weight.dtype()
    );
    let (x, w) = (input.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => {
            <Dispatch as NestedConvBackend>::nested_conv2d_bias(x, w, b.into_dispatch(), plan)
        }
        None => <Dispatch as NestedConvBackend>::nested_conv2d(x, w, plan),
    })
}

/// The fused convolution as a backend operation (implemented on `Flex` and
/// `Autodiff<Flex>`).
#[backend_extension(Flex, Autodiff)]
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
trait FlexReal: Real + burn::tensor::Element {
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

/// A flex tensor's values as a contiguous slice (copied only if it is a strided view).
fn with_values<T: FlexReal, R>(tensor: &FlexTensor, f: impl FnOnce(&[T]) -> R) -> R {
    match T::slice(tensor) {
        Some(values) => f(values),
        None => {
            let contiguous = tensor.to_contiguous();
            f(T::slice(&contiguous).expect("a contiguous tensor of the checked dtype"))
        }
    }
}

fn flex_tensor<T: burn::tensor::Element>(values: Vec<T>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn forward_typed<T: FlexReal>(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    plan: &ConvPlan,
) -> FlexTensor {
    let out = with_values::<T, _>(x, |x| {
        with_values::<T, _>(weight, |w| match bias {
            Some(b) => with_values::<T, _>(b, |b| kernels::forward(plan, x, w, Some(b))),
            None => kernels::forward(plan, x, w, None),
        })
    });
    flex_tensor(out, plan.output_shape().to_vec())
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

impl NestedConvBackend for Flex {
    fn nested_conv2d(x: FlexTensor, weight: FlexTensor, plan: ConvPlan) -> FlexTensor {
        flex_forward(&x, &weight, None, &plan)
    }

    fn nested_conv2d_bias(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        plan: ConvPlan,
    ) -> FlexTensor {
        flex_forward(&x, &weight, Some(&bias), &plan)
    }
}

/// Backward step of [`NestedConvBackend::nested_conv2d`]; parents `[x, weight, bias?]`.
#[derive(Debug)]
struct NestedConvBackward;

impl<const N: usize> Backward<Flex, N> for NestedConvBackward {
    type State = (FlexTensor, FlexTensor, ConvPlan);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, weight, plan) = ops.state;
        let parent = |i: usize| ops.parents.get(i).and_then(|p| p.as_ref());
        let needs = Needs {
            x: parent(0).is_some(),
            weight: parent(1).is_some(),
            bias: parent(2).is_some(),
        };
        let (dx, dw, db) = flex_backward(&x, &weight, &grad, &plan, needs);
        for (i, value) in [dx, dw, db].into_iter().enumerate() {
            if let (Some(node), Some(value)) = (parent(i), value) {
                grads.register::<Flex>(node.id, value);
            }
        }
    }
}

impl<C: CheckpointStrategy> NestedConvBackend for Autodiff<Flex, C> {
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
                let out = flex_forward(&x, &w, None, &plan);
                prep.finish((x, w, plan), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(flex_forward(x.primitive(), weight.primitive(), None, &plan))
            }
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
                let out = flex_forward(&x, &w, Some(bias.primitive()), &plan);
                prep.finish((x, w, plan), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(flex_forward(
                x.primitive(),
                weight.primitive(),
                Some(bias.primitive()),
                &plan,
            )),
        }
    }
}
