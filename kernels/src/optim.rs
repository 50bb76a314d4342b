//! Optimizer updates on plain slices: one pass per parameter that reads the weight, its
//! gradient and its state once and writes the weight and the state in place. burn's
//! generic optimizers run each term of an update as a tensor operation of its own, each
//! a pass over the parameter and a new allocation (about a tenth of a `resnet18` step).

use rayon::prelude::*;

/// One step of SGD with momentum, as `torch.optim.SGD` with dampening 0 and burn's `Sgd`
/// with dampening 0 compute it, operation for operation (so the bits agree):
/// `g = w * weight_decay + grad` (without weight decay, `g = grad`);
/// `v = g` on the first step, else `v = g + v * momentum`;
/// `w = w - (nesterov ? v * momentum + g : v) * lr`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    /// The learning rate.
    pub lr: f32,
    /// The momentum factor.
    pub momentum: f32,
    /// The L2 penalty added to the gradient (0: none).
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Whether the velocity holds nothing yet (the parameter's first step).
    pub first: bool,
}

/// Values per parallel task: enough work that scheduling a task costs nothing beside it.
const CHUNK: usize = 1 << 14;

impl SgdStep {
    /// Applies the step to `weight` and `velocity` in place for the gradient `grad`.
    ///
    /// # Panics
    /// If the three slices differ in length.
    pub fn apply(&self, weight: &mut [f32], velocity: &mut [f32], grad: &[f32]) {
        assert_eq!(weight.len(), grad.len(), "sgd step: gradient length");
        assert_eq!(weight.len(), velocity.len(), "sgd step: velocity length");
        // The flags are constants of the loop (one of eight compiled versions), so it is
        // straight-line vector code; tested per element, it was scalar with a branch per
        // flag and value (about 6 % of a `resnet18` step).
        let run = match (self.weight_decay != 0.0, self.first, self.nesterov) {
            (false, false, false) => chunk_step::<false, false, false>,
            (false, false, true) => chunk_step::<false, false, true>,
            (false, true, false) => chunk_step::<false, true, false>,
            (false, true, true) => chunk_step::<false, true, true>,
            (true, false, false) => chunk_step::<true, false, false>,
            (true, false, true) => chunk_step::<true, false, true>,
            (true, true, false) => chunk_step::<true, true, false>,
            (true, true, true) => chunk_step::<true, true, true>,
        };
        let step = *self;
        weight
            .par_chunks_mut(CHUNK)
            .zip(velocity.par_chunks_mut(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|((weight, velocity), grad)| run(step, weight, velocity, grad));
    }
}

/// [`SgdStep::apply`] on one chunk, its flags (weight decay, first step, Nesterov) fixed.
fn chunk_step<const DECAY: bool, const FIRST: bool, const NESTEROV: bool>(
    step: SgdStep,
    weight: &mut [f32],
    velocity: &mut [f32],
    grad: &[f32],
) {
    let SgdStep {
        lr,
        momentum,
        weight_decay,
        ..
    } = step;
    for ((w, v), &g) in weight.iter_mut().zip(velocity).zip(grad) {
        let g = if DECAY { *w * weight_decay + g } else { g };
        // burn's `grad * (1 - dampening) + velocity * momentum`, dampening 0.
        *v = if FIRST { g } else { g * 1.0 + *v * momentum };
        let delta = if NESTEROV { *v * momentum + g } else { *v };
        *w -= delta * lr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The step against the formulas written out in f32 for one value, over three steps
    /// (the first included) with and without Nesterov and weight decay, on more values
    /// than one task takes.
    #[test]
    fn steps_follow_the_formulas() {
        let len = 3 * CHUNK + 5;
        for (nesterov, weight_decay) in [(false, 0.0), (true, 0.0), (false, 1e-2), (true, 5e-4)] {
            let mut weight: Vec<f32> = (0..len).map(|i| (i % 97) as f32 * 0.01 - 0.4).collect();
            let mut velocity = vec![f32::NAN; len];
            let (mut w1, mut v1) = (weight[len - 1], 0.0f32);
            for k in 0..3 {
                let grad: Vec<f32> = (0..len)
                    .map(|i| ((i * 7 + k) % 13) as f32 * 0.1 - 0.6)
                    .collect();
                let step = SgdStep {
                    lr: 0.05,
                    momentum: 0.9,
                    weight_decay,
                    nesterov,
                    first: k == 0,
                };
                step.apply(&mut weight, &mut velocity, &grad);
                let g = if weight_decay != 0.0 {
                    w1 * weight_decay + grad[len - 1]
                } else {
                    grad[len - 1]
                };
                v1 = if k == 0 { g } else { g + v1 * 0.9 };
                w1 -= if nesterov { v1 * 0.9 + g } else { v1 } * 0.05;
                assert_eq!(weight[len - 1].to_bits(), w1.to_bits(), "step {k}");
                assert_eq!(velocity[len - 1].to_bits(), v1.to_bits(), "step {k}");
            }
            assert!(weight.iter().chain(&velocity).all(|v| v.is_finite()));
        }
    }
}
