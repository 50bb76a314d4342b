//! burn optimizers set up with PyTorch's semantics, and SGD with momentum as one pass per
//! parameter on the CPU.
//!
//! burn's defaults differ from PyTorch's in ways that change training: SGD momentum
//! dampening is 0.1 (PyTorch: 0) and Adam's epsilon 1e-5 (PyTorch: 1e-8). Every setting is
//! passed explicitly here.
//!
//! burn's `Sgd` runs weight decay, momentum, Nesterov and the update as separate tensor
//! operations, a pass over the parameter and an allocation each (20–50 ms of a `resnet18`
//! step). [`FusedSgd`] computes the same operations in the same order in one pass per
//! parameter, in place, on f32 `Flex` tensors (the same bits as burn's `Sgd`), and as
//! tensor operations elsewhere; its state records as burn's does (`momentum.velocity` per
//! parameter), so checkpoints written with either load in both.

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Dispatch, Flex};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{
    join_path, AdamConfig, AdamWConfig, LearningRate, ModuleOptimizer, Optimizer, RecordState,
    SgdConfig, StateSink, StateSource,
};
use burn::tensor::{DType, Device, Tensor};

use super::config::{OptimizerKind, OptimizerSettings};
use crate::kernels::optim::SgdStep;
use crate::layer::fused::{contiguous, is_flex, values};

/// The SGD step as a backend operation (on `Flex`; the optimizer works on the parameters'
/// values, outside autodiff).
#[backend_extension(Flex)]
pub trait SgdBackend: burn::backend::Backend {
    /// `step` applied to `weight` and `velocity` for the gradient `grad` (all of one
    /// shape): the new weight and velocity.
    fn sgd_step(
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: FloatTensor<Self>,
        step: SgdStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

impl SgdBackend for Flex {
    fn sgd_step(
        weight: FlexTensor,
        grad: FlexTensor,
        velocity: FlexTensor,
        step: SgdStep,
    ) -> (FlexTensor, FlexTensor) {
        let len = weight.layout().shape().num_elements();
        // In place where the tensor owns its values alone (`storage_mut` copies them
        // first where they are shared).
        let owned = |t: FlexTensor| match t.as_slice::<f32>() {
            Some(_) => t,
            None => t.to_contiguous(),
        };
        let (mut weight, mut velocity) = (owned(weight), owned(velocity));
        let grad = contiguous::<f32>(&grad);
        step.apply(
            &mut weight.storage_mut::<f32>()[..len],
            &mut velocity.storage_mut::<f32>()[..len],
            values(&grad),
        );
        (weight, velocity)
    }
}

/// SGD with momentum (dampening 0), optional Nesterov and weight decay: burn's `Sgd`
/// with dampening 0, operation for operation, in one pass per parameter on `Flex`.
#[derive(Debug, Clone)]
pub struct FusedSgd {
    momentum: f64,
    weight_decay: f32,
    nesterov: bool,
}

/// A parameter's state under [`FusedSgd`]: its velocity.
#[derive(Clone)]
pub struct SgdVelocity<const D: usize> {
    velocity: Tensor<D>,
}

/// Where burn's `Sgd` records the velocity: `{parameter}.momentum.velocity`.
const MOMENTUM: &str = "momentum";
const VELOCITY: &str = "velocity";

impl<const D: usize> RecordState for SgdVelocity<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        let path = join_path(prefix, MOMENTUM);
        out.push_tensor(&path, VELOCITY, self.velocity.clone().into_data());
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let data = src.take_tensor(&join_path(prefix, MOMENTUM), VELOCITY)?;
        Some(SgdVelocity {
            velocity: Tensor::from_data(data, device),
        })
    }
}

impl Optimizer for FusedSgd {
    type State<const D: usize> = SgdVelocity<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<SgdVelocity<D>>,
    ) -> (Tensor<D>, Option<SgdVelocity<D>>) {
        let step = SgdStep {
            lr: lr as f32,
            momentum: self.momentum as f32,
            weight_decay: self.weight_decay,
            nesterov: self.nesterov,
            first: state.is_none(),
        };
        // The first step's velocity is the gradient (the kernel writes it over this).
        let velocity = state.map_or_else(|| grad.clone(), |state| state.velocity);
        let device = tensor.device();
        let fused = is_flex(&device)
            && !device.is_autodiff()
            && [&tensor, &grad, &velocity]
                .iter()
                .all(|t| t.dtype() == DType::F32 && t.dims() == tensor.dims());
        let (tensor, velocity) = if fused {
            let (weight, velocity) = <Dispatch as SgdBackend>::sgd_step(
                tensor.into_dispatch(),
                grad.into_dispatch(),
                velocity.into_dispatch(),
                step,
            );
            (
                Tensor::from_dispatch(weight),
                Tensor::from_dispatch(velocity),
            )
        } else {
            sgd_tensor_step(step, tensor, grad, velocity)
        };
        (tensor, Some(SgdVelocity { velocity }))
    }

    fn to_device<const D: usize>(state: SgdVelocity<D>, device: &Device) -> SgdVelocity<D> {
        SgdVelocity {
            velocity: state.velocity.to_device(device),
        }
    }
}

/// [`SgdStep::apply`] as tensor operations, for devices without the kernel (burn's `Sgd`'s
/// operations with dampening 0).
fn sgd_tensor_step<const D: usize>(
    step: SgdStep,
    weight: Tensor<D>,
    grad: Tensor<D>,
    velocity: Tensor<D>,
) -> (Tensor<D>, Tensor<D>) {
    let grad = if step.weight_decay != 0.0 {
        weight.clone().mul_scalar(step.weight_decay).add(grad)
    } else {
        grad
    };
    let velocity = if step.first {
        grad.clone()
    } else {
        grad.clone()
            .mul_scalar(1.0)
            .add(velocity.mul_scalar(step.momentum))
    };
    let delta = if step.nesterov {
        velocity.clone().mul_scalar(step.momentum).add(grad)
    } else {
        velocity.clone()
    };
    (weight - delta.mul_scalar(step.lr), velocity)
}

/// The optimizer of `settings`:
///
/// - SGD: `v = momentum * v + g` (dampening 0), `g' = g + momentum * v` with Nesterov,
///   else `v`; weight decay adds `wd * w` to the gradient first (`torch.optim.SGD`); with
///   momentum, [`FusedSgd`].
/// - Adam: weight decay added to the gradient (`torch.optim.Adam`), bias-corrected
///   moments, epsilon outside the square root.
/// - AdamW: `w *= 1 - lr * wd` before the Adam update (`torch.optim.AdamW`).
pub fn build_optimizer(settings: &OptimizerSettings) -> ModuleOptimizer {
    let decay =
        (settings.weight_decay > 0.0).then(|| WeightDecayConfig::new(settings.weight_decay as f32));
    let [beta_1, beta_2] = settings.betas;
    match settings.kind {
        OptimizerKind::Sgd if settings.momentum > 0.0 => FusedSgd {
            momentum: settings.momentum,
            weight_decay: settings.weight_decay as f32,
            nesterov: settings.nesterov,
        }
        .into(),
        OptimizerKind::Sgd => SgdConfig::new().with_weight_decay(decay).init(),
        OptimizerKind::Adam => AdamConfig::new()
            .with_beta_1(beta_1 as f32)
            .with_beta_2(beta_2 as f32)
            .with_epsilon(settings.eps as f32)
            .with_weight_decay(decay)
            .init(),
        OptimizerKind::AdamW => AdamWConfig::new()
            .with_beta_1(beta_1 as f32)
            .with_beta_2(beta_2 as f32)
            .with_epsilon(settings.eps as f32)
            .with_weight_decay(settings.weight_decay as f32)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;

    /// A 1x1 linear layer without bias, weight `w`.
    fn scalar_layer(w: f32, device: &Device) -> Linear {
        let mut layer = LinearConfig::new(1, 1).with_bias(false).init(device);
        layer.weight =
            Param::from_tensor(Tensor::from_data(TensorData::new(vec![w], [1, 1]), device));
        layer
    }

    /// Runs steps of `settings` on `loss = w * x` (gradient `x`), returns w after each.
    fn run(settings: &OptimizerSettings, lr: f64, w0: f32, xs: &[f32]) -> Vec<f32> {
        let device = Device::flex().autodiff();
        let mut layer = scalar_layer(w0, &device);
        let mut optim = build_optimizer(settings);
        let mut out = Vec::new();
        for &x in xs {
            let input = Tensor::<2>::from_data(TensorData::new(vec![x], [1, 1]), &device);
            let loss = layer.forward(input).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &layer);
            layer = optim.step(lr, layer, grads);
            out.push(layer.weight.val().into_data().try_to_vec::<f32>().unwrap()[0]);
        }
        out
    }

    #[test]
    fn sgd_nesterov_weight_decay_matches_pytorch_formulas() {
        // torch.optim.SGD(momentum=0.9, nesterov=True, weight_decay=0.1, dampening=0).
        let settings = OptimizerSettings {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.1,
            ..OptimizerSettings::default()
        };
        let (lr, xs) = (0.5, [1.0f32, -2.0, 3.0]);
        let (mut w, mut v) = (2.0f64, 0.0f64);
        let mut expected = Vec::new();
        for (k, &x) in xs.iter().enumerate() {
            let g = x as f64 + 0.1 * w;
            v = if k == 0 { g } else { 0.9 * v + g };
            w -= lr * (g + 0.9 * v);
            expected.push(w);
        }
        let got = run(&settings, lr, 2.0, &xs);
        for (g, e) in got.iter().zip(&expected) {
            assert!((*g as f64 - e).abs() < 1e-5, "{got:?} vs {expected:?}");
        }
    }

    /// With momentum, [`FusedSgd`] (what `build_optimizer` gives) takes the same steps as
    /// burn's `Sgd` to the bit, and continues from burn's optimizer record as burn's does
    /// (a checkpoint written before it loads), with and without Nesterov and weight decay,
    /// on a layer larger than one kernel task.
    #[test]
    fn fused_sgd_steps_and_records_are_burns() {
        use burn::optim::momentum::MomentumConfig;

        let device = Device::flex().autodiff();
        for (nesterov, weight_decay) in [(true, 0.01), (false, 0.0)] {
            let settings = OptimizerSettings {
                kind: OptimizerKind::Sgd,
                momentum: 0.9,
                nesterov,
                weight_decay,
                ..OptimizerSettings::default()
            };
            let burns = || {
                SgdConfig::new()
                    .with_momentum(Some(
                        MomentumConfig::new()
                            .with_momentum(0.9)
                            .with_dampening(0.0)
                            .with_nesterov(nesterov),
                    ))
                    .with_weight_decay(
                        (weight_decay > 0.0).then(|| WeightDecayConfig::new(weight_decay as f32)),
                    )
                    .init()
            };
            let start = LinearConfig::new(300, 70).init(&device);
            let input = |k: usize| {
                let values = (0..4 * 300).map(|i| ((i * 31 + k * 7) % 17) as f32 * 0.1 - 0.8);
                Tensor::<2>::from_data(
                    TensorData::new(values.collect::<Vec<_>>(), [4, 300]),
                    &device,
                )
            };
            let step = |optim: &mut ModuleOptimizer, layer: Linear, k: usize| {
                let loss = (layer.forward(input(k)) * input(k).narrow(1, 0, 70)).sum();
                let grads = GradientsParams::from_grads(loss.backward(), &layer);
                optim.step(0.05, layer, grads)
            };
            let bits = |layer: &Linear| {
                let host = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
                let mut values = host(layer.weight.val().flatten(0, 1));
                values.extend(host(layer.bias.as_ref().unwrap().val()));
                values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let (mut ours, mut theirs) = (build_optimizer(&settings), burns());
            let (mut a, mut b) = (start.clone(), start.clone());
            for k in 0..3 {
                a = step(&mut ours, a, k);
                b = step(&mut theirs, b, k);
                assert!(
                    bits(&a) == bits(&b),
                    "step {k}, nesterov {nesterov}: weights differ"
                );
            }
            assert!(bits(&a) != bits(&start), "the steps moved nothing");
            // Burn's record read by ours, and ours by burn's: both continue alike.
            let mut resumed = build_optimizer(&settings).load_record(theirs.to_record());
            let mut back = burns().load_record(ours.to_record());
            let (c, d) = (
                step(&mut resumed, b.clone(), 3),
                step(&mut back, a.clone(), 3),
            );
            let b = step(&mut theirs, b, 3);
            assert!(
                bits(&c) == bits(&b),
                "resumed from burn's record: weights differ"
            );
            assert!(
                bits(&d) == bits(&b),
                "burn resumed from ours: weights differ"
            );
        }
    }

    #[test]
    fn adamw_matches_pytorch_formulas() {
        let settings = OptimizerSettings {
            kind: OptimizerKind::AdamW,
            weight_decay: 0.01,
            ..OptimizerSettings::default()
        };
        let (lr, xs) = (0.1, [1.0f32, -2.0, 3.0, 0.5]);
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (mut w, mut m, mut v) = (1.0f64, 0.0, 0.0);
        let mut expected = Vec::new();
        for (k, &x) in xs.iter().enumerate() {
            let t = (k + 1) as i32;
            let g = x as f64;
            w *= 1.0 - lr * 0.01;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let (mh, vh) = (m / (1.0 - b1.powi(t)), v / (1.0 - b2.powi(t)));
            w -= lr * mh / (vh.sqrt() + eps);
            expected.push(w);
        }
        let got = run(&settings, lr, 1.0, &xs);
        for (g, e) in got.iter().zip(&expected) {
            assert!((*g as f64 - e).abs() < 1e-5, "{got:?} vs {expected:?}");
        }
    }
}
