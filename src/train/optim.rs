//! burn optimizers set up with PyTorch's semantics.
//!
//! burn's defaults differ from PyTorch's in ways that change training: SGD momentum
//! dampening is 0.1 (PyTorch: 0) and Adam's epsilon 1e-5 (PyTorch: 1e-8). Every setting is
//! passed explicitly here.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, SgdConfig};

use super::config::{OptimizerKind, OptimizerSettings};

/// The optimizer of `settings`:
///
/// - SGD: `v = momentum * v + g` (dampening 0), `g' = g + momentum * v` with Nesterov,
///   else `v`; weight decay adds `wd * w` to the gradient first (`torch.optim.SGD`).
/// - Adam: weight decay added to the gradient (`torch.optim.Adam`), bias-corrected
///   moments, epsilon outside the square root.
/// - AdamW: `w *= 1 - lr * wd` before the Adam update (`torch.optim.AdamW`).
pub fn build_optimizer(settings: &OptimizerSettings) -> ModuleOptimizer {
    let decay =
        (settings.weight_decay > 0.0).then(|| WeightDecayConfig::new(settings.weight_decay as f32));
    let [beta_1, beta_2] = settings.betas;
    match settings.kind {
        OptimizerKind::Sgd => {
            let momentum = (settings.momentum > 0.0).then(|| {
                MomentumConfig::new()
                    .with_momentum(settings.momentum)
                    .with_dampening(0.0)
                    .with_nesterov(settings.nesterov)
            });
            SgdConfig::new()
                .with_momentum(momentum)
                .with_weight_decay(decay)
                .init()
        }
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
