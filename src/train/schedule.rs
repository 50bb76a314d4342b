//! The learning rate as a pure function of the position in the run.
//!
//! burn's schedulers keep their own step counter and its cosine annealing refuses an
//! initial rate above 1; here the rate of every step is computed from (epoch, iteration),
//! so a resumed run lands on the same curve and any peak rate works.

use super::config::{ScheduleKind, ScheduleSettings};

/// A learning-rate schedule over a run of `epochs` epochs of `iters_per_epoch` steps.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    settings: ScheduleSettings,
    base_lr: f64,
    epochs: usize,
    iters_per_epoch: usize,
}

impl LrSchedule {
    /// The schedule of `settings` with peak rate `base_lr`.
    pub fn new(
        settings: ScheduleSettings,
        base_lr: f64,
        epochs: usize,
        iters_per_epoch: usize,
    ) -> Self {
        LrSchedule {
            settings,
            base_lr,
            epochs,
            iters_per_epoch: iters_per_epoch.max(1),
        }
    }

    /// Steps of the linear warm-up.
    pub fn warmup_iters(&self) -> usize {
        self.settings.warmup_epochs * self.iters_per_epoch
    }

    /// The learning rate of iteration `iteration` (from 0) of epoch `epoch` (from 0).
    ///
    /// - warm-up (the first `warmup_epochs` epochs): `lr * (k + 1) / W` at global step
    ///   `k < W`;
    /// - constant: `lr`;
    /// - step: `lr * gamma^(epoch / step_epochs)` (by whole epochs, as the authors);
    /// - cosine: `min + (lr - min) * (1 + cos(pi * p)) / 2`, `p` the fraction of the
    ///   post-warm-up steps done, updated every iteration.
    pub fn lr(&self, epoch: usize, iteration: usize) -> f64 {
        let step = epoch * self.iters_per_epoch + iteration;
        let warmup = self.warmup_iters();
        if step < warmup {
            return self.base_lr * (step + 1) as f64 / warmup as f64;
        }
        let s = &self.settings;
        match s.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Step => {
                let decays = (epoch / s.step_epochs.max(1)) as i32;
                self.base_lr * s.gamma.powi(decays)
            }
            ScheduleKind::Cosine => {
                let total = (self.epochs * self.iters_per_epoch).saturating_sub(warmup);
                let progress = if total == 0 {
                    1.0
                } else {
                    ((step - warmup) as f64 / total as f64).min(1.0)
                };
                s.min_lr
                    + (self.base_lr - s.min_lr)
                        * 0.5
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(kind: ScheduleKind, warmup_epochs: usize) -> ScheduleSettings {
        ScheduleSettings {
            kind,
            warmup_epochs,
            ..ScheduleSettings::default()
        }
    }

    #[test]
    fn step_decays_by_gamma_every_step_epochs() {
        let s = LrSchedule::new(
            ScheduleSettings {
                step_epochs: 40,
                ..settings(ScheduleKind::Step, 0)
            },
            0.1,
            130,
            10,
        );
        assert_eq!(s.lr(0, 0), 0.1);
        assert_eq!(s.lr(39, 9), 0.1);
        assert!((s.lr(40, 0) - 0.01).abs() < 1e-15);
        assert!((s.lr(129, 9) - 1e-4).abs() < 1e-15);
    }

    #[test]
    fn cosine_goes_from_peak_to_min_and_accepts_lr_above_one() {
        let s = LrSchedule::new(settings(ScheduleKind::Cosine, 0), 2.5, 4, 5);
        assert_eq!(s.lr(0, 0), 2.5);
        // Halfway through: (1 + cos(pi/2)) / 2 = 1/2.
        assert!((s.lr(2, 0) - 1.25).abs() < 1e-12);
        assert!(s.lr(3, 4) > 0.0 && s.lr(3, 4) < 0.05);
        // Strictly decreasing.
        let all: Vec<f64> = (0..4)
            .flat_map(|e| (0..5).map(move |i| (e, i)))
            .map(|(e, i)| s.lr(e, i))
            .collect();
        assert!(all.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn warmup_is_linear_then_the_schedule_starts_at_the_peak() {
        let s = LrSchedule::new(settings(ScheduleKind::Cosine, 1), 0.4, 5, 4);
        assert!((s.lr(0, 0) - 0.1).abs() < 1e-12);
        assert!((s.lr(0, 3) - 0.4).abs() < 1e-12);
        assert!((s.lr(1, 0) - 0.4).abs() < 1e-12);
    }
}
