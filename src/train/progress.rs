//! Reporting a run as it goes: the [`Observer`] hooks and a terminal progress bar.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::checkpoint::RunState;
use super::metrics::EpochMetrics;

/// Where the run stands after a training step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress {
    /// Epoch, from 0.
    pub epoch: usize,
    /// The batch just trained, from 0.
    pub batch: usize,
    /// Batches per epoch.
    pub batches: usize,
    /// Mean training loss of the epoch so far.
    pub loss: f64,
    /// Training top-1 accuracy of the epoch so far.
    pub top1: f64,
    /// Training images per second in the epoch so far.
    pub images_per_second: f64,
    /// Learning rate of the step.
    pub lr: f64,
}

/// Hooks the training loop calls; every method does nothing by default.
pub trait Observer {
    /// Before the first step of this call to `run`.
    fn run_started(&mut self, _state: &RunState, _batches_per_epoch: usize) {}
    /// At the start (or resumed middle) of an epoch.
    fn epoch_started(&mut self, _epoch: usize, _first_batch: usize, _batches: usize) {}
    /// After each training step.
    fn batch_done(&mut self, _progress: &StepProgress) {}
    /// Before the end-of-epoch evaluation.
    fn evaluating(&mut self, _epoch: usize) {}
    /// After the evaluation of an epoch.
    fn epoch_done(&mut self, _metrics: &EpochMetrics) {}
    /// A note for the user.
    fn message(&mut self, _text: &str) {}
}

/// An observer that reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {}

/// A progress bar per epoch (loss, accuracy, images/s, learning rate, ETA) and a line per
/// finished epoch, on standard error. Without a terminal (a log file), a plain line every
/// tenth of an epoch replaces the bar.
#[derive(Debug)]
pub struct ProgressBars {
    label: String,
    epochs: usize,
    bar: Option<ProgressBar>,
    terminal: bool,
}

impl ProgressBars {
    /// Bars prefixed with `label` (e.g. the model's variant).
    pub fn new(label: impl Into<String>) -> Self {
        ProgressBars {
            label: label.into(),
            epochs: 0,
            bar: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn print(&self, line: &str) {
        match &self.bar {
            Some(bar) if self.terminal => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }
}

/// A learning rate in 4 significant digits, scientific outside [1e-3, 1e3).
fn rate(lr: f64) -> String {
    if lr != 0.0 && !(1e-3..1e3).contains(&lr.abs()) {
        format!("{lr:.3e}")
    } else {
        format!("{lr:.4}")
    }
}

fn percent(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

impl Observer for ProgressBars {
    fn run_started(&mut self, state: &RunState, _batches: usize) {
        self.epochs = state.config.epochs;
    }

    fn epoch_started(&mut self, epoch: usize, first_batch: usize, batches: usize) {
        let bar = ProgressBar::with_draw_target(
            Some(batches as u64),
            if self.terminal {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:25.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!(
            "{} epoch {}/{}",
            self.label,
            epoch + 1,
            self.epochs
        ));
        bar.set_position(first_batch as u64);
        bar.reset_eta();
        bar.enable_steady_tick(Duration::from_millis(500));
        self.bar = Some(bar);
    }

    fn batch_done(&mut self, p: &StepProgress) {
        let msg = format!(
            "loss {:.4} acc {} {:.0} img/s lr {}",
            p.loss,
            percent(p.top1),
            p.images_per_second,
            rate(p.lr)
        );
        if let Some(bar) = &self.bar {
            bar.set_position((p.batch + 1) as u64);
            bar.set_message(msg.clone());
            if !self.terminal {
                let tenth = (p.batches / 10).max(1);
                if (p.batch + 1).is_multiple_of(tenth) && p.batch + 1 < p.batches {
                    let eta = bar.eta().as_secs();
                    eprintln!(
                        "{} epoch {}/{} batch {}/{} {msg} ETA {}:{:02}",
                        self.label,
                        p.epoch + 1,
                        self.epochs,
                        p.batch + 1,
                        p.batches,
                        eta / 60,
                        eta % 60
                    );
                }
            }
        }
    }

    fn evaluating(&mut self, _epoch: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message("evaluating...");
        }
    }

    fn epoch_done(&mut self, m: &EpochMetrics) {
        let line = format!(
            "{} epoch {:>3}/{}: train loss {:.4} top-1 {} | val loss {:.4} top-1 {} top-5 {} | lr {} | {:.1} s ({:.0} img/s) + eval {:.1} s",
            self.label,
            m.epoch,
            self.epochs,
            m.train_loss,
            percent(m.train_top1),
            m.val_loss,
            percent(m.val_top1),
            percent(m.val_top5),
            rate(m.lr),
            m.train_seconds,
            m.images_per_second,
            m.eval_seconds
        );
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!("{line}");
    }

    fn message(&mut self, text: &str) {
        self.print(text);
    }
}
