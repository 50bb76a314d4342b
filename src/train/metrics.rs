//! Loss and top-k accuracy, per batch and per epoch, and the run's metrics files.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::TrainError;
use crate::fsutil::write_atomic;

/// Counts of correct predictions and summed loss over some images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Images seen.
    pub images: u64,
    /// Sum over the images of their cross-entropy loss.
    pub loss_sum: f64,
    /// Images whose class has the highest logit.
    pub top1: u64,
    /// Images whose class is among the 5 highest logits.
    pub top5: u64,
}

impl Tally {
    /// Adds a batch: its mean loss and its logits (`[n, classes]`, row-major) with labels.
    pub fn add_batch(&mut self, mean_loss: f32, logits: &[f32], labels: &[u32]) {
        let n = labels.len();
        if n == 0 {
            return;
        }
        let classes = logits.len() / n;
        let (top1, top5) = top_k_hits(logits, labels, classes);
        self.images += n as u64;
        self.loss_sum += mean_loss as f64 * n as f64;
        self.top1 += top1;
        self.top5 += top5;
    }

    /// Merges another tally.
    pub fn merge(&mut self, other: &Tally) {
        self.images += other.images;
        self.loss_sum += other.loss_sum;
        self.top1 += other.top1;
        self.top5 += other.top5;
    }

    /// Mean loss (0 when empty).
    pub fn loss(&self) -> f64 {
        ratio(self.loss_sum, self.images)
    }

    /// Top-1 accuracy in `[0, 1]`.
    pub fn top1(&self) -> f64 {
        ratio(self.top1 as f64, self.images)
    }

    /// Top-5 accuracy in `[0, 1]` (1 when there are 5 classes or fewer).
    pub fn top5(&self) -> f64 {
        ratio(self.top5 as f64, self.images)
    }
}

fn ratio(sum: f64, count: u64) -> f64 {
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

/// How many rows of `logits` (`[n, classes]`) rank their label first, and among the
/// first five. A label's rank is the number of classes with a strictly higher logit, so
/// ties count in the label's favour; a NaN logit never ranks first.
pub fn top_k_hits(logits: &[f32], labels: &[u32], classes: usize) -> (u64, u64) {
    let (mut top1, mut top5) = (0, 0);
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        let target = row[label as usize];
        if target.is_nan() {
            continue;
        }
        let rank = row.iter().filter(|&&v| v > target).count();
        top1 += u64::from(rank == 0);
        top5 += u64::from(rank < 5);
    }
    (top1, top5)
}

/// The figures of one finished epoch: a row of `metrics.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean training loss over the epoch (training mode, augmented images).
    pub train_loss: f64,
    /// Training top-1 accuracy.
    pub train_top1: f64,
    /// Training top-5 accuracy.
    pub train_top5: f64,
    /// Validation loss.
    pub val_loss: f64,
    /// Validation top-1 accuracy.
    pub val_top1: f64,
    /// Validation top-5 accuracy.
    pub val_top5: f64,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Seconds of training steps in the epoch (without the evaluation).
    pub train_seconds: f64,
    /// Seconds of the evaluation.
    pub eval_seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
}

/// The column names of `metrics.csv`.
pub const CSV_HEADER: &str = "epoch,train_loss,train_top1,train_top5,val_loss,val_top1,val_top5,lr,train_seconds,eval_seconds,images_per_second";

impl EpochMetrics {
    fn csv_row(&self) -> String {
        format!(
            "{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6e},{:.3},{:.3},{:.1}",
            self.epoch,
            self.train_loss,
            self.train_top1,
            self.train_top5,
            self.val_loss,
            self.val_top1,
            self.val_top5,
            self.lr,
            self.train_seconds,
            self.eval_seconds,
            self.images_per_second
        )
    }
}

/// Writes `metrics.csv` and `metrics.json` in `dir` (atomically, whole).
pub fn write_metrics(dir: &Path, history: &[EpochMetrics]) -> Result<(), TrainError> {
    let mut csv = String::from(CSV_HEADER);
    csv.push('\n');
    for row in history {
        csv.push_str(&row.csv_row());
        csv.push('\n');
    }
    let json = serde_json::to_string_pretty(history).expect("metrics serialize to JSON");
    for (name, contents) in [("metrics.csv", csv), ("metrics.json", json)] {
        let path = dir.join(name);
        write_atomic(&path, contents.as_bytes()).map_err(TrainError::io(&path))?;
    }
    Ok(())
}

/// Reads the per-epoch metrics of a run directory (`metrics.json`).
///
/// # Errors
/// [`TrainError::Io`] when the file is missing; [`TrainError::Checkpoint`] when it is not
/// a list of epoch records.
pub fn read_metrics(dir: &Path) -> Result<Vec<EpochMetrics>, TrainError> {
    let path = dir.join("metrics.json");
    let text = std::fs::read_to_string(&path).map_err(TrainError::io(&path))?;
    serde_json::from_str(&text).map_err(|err| TrainError::Checkpoint {
        path,
        reason: format!("not a metrics file: {err}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_counts_ranks_with_ties_for_the_label() {
        // 6 classes; row 0: label 2 is the largest; row 1: label 0 ranks 5th (4 above);
        // row 2: label 5 ranks 6th; row 3: tie with the label counts as first.
        let logits = [
            0.1, 0.2, 0.9, 0.0, 0.0, 0.0, //
            0.5, 0.9, 0.8, 0.7, 0.6, 0.1, //
            0.5, 0.9, 0.8, 0.7, 0.6, 0.1, //
            1.0, 1.0, 0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(top_k_hits(&logits, &[2, 0, 5, 1], 6), (2, 3));
    }

    #[test]
    fn tally_means_weight_batches_by_size() {
        let mut t = Tally::default();
        t.add_batch(1.0, &[1.0, 0.0], &[0]);
        t.add_batch(4.0, &[0.0, 1.0, 0.0, 1.0, 0.0, 1.0], &[0, 1, 1]);
        assert_eq!(t.images, 4);
        assert!((t.loss() - 13.0 / 4.0).abs() < 1e-12);
        assert!((t.top1() - 0.75).abs() < 1e-12);
        assert!((t.top5() - 1.0).abs() < 1e-12);
    }
}
