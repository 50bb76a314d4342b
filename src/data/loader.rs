//! The batch loader: shuffling, decoding and augmenting on worker threads, prefetching.
//!
//! # Determinism
//!
//! Everything random is a pure function of the loader's seed:
//!
//! - the order of epoch `e` is a Fisher–Yates shuffle driven by a generator seeded with
//!   `derive_seed(&[seed, SHUFFLE, e])`;
//! - the augmentation of sample `i` in epoch `e` uses the seed
//!   [`sample_seed(seed, e, i)`](sample_seed), whichever thread runs it.
//!
//! So for a fixed seed the batches do not depend on the number of threads, on
//! prefetching, or on where iteration started: [`Loader::resume`] from a [`Position`]
//! yields exactly the batches an uninterrupted run would have seen from there. A training
//! checkpoint only needs the [`Position`] to continue (no generator state).
//!
//! # Threads
//!
//! Iterating an epoch starts one producer thread that assembles batches in order and
//! keeps up to `prefetch` of them ready in a bounded channel; with `threads > 1` the
//! samples of each batch are decoded and augmented in parallel on a pool of `threads`
//! workers owned by the loader (separate from any pool the compute backend uses).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use burn::config::Config;
use burn::tensor::{Device, Int, Tensor, TensorData};
use chacha20::ChaCha8Rng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{DataError, Dataset, ImageShape, Transform};

/// Domain tag of the per-epoch shuffle seeds.
const SHUFFLE: u64 = 0x5348_5546_464c_4521;
/// Domain tag of the per-sample augmentation seeds.
const AUGMENT: u64 = 0x4155_474d_454e_5421;

/// SplitMix64's output function: a bijective 64-bit mixer.
const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seed derived from `parts` (order matters), well mixed even for nearby inputs.
pub fn derive_seed(parts: &[u64]) -> u64 {
    parts.iter().fold(0, |hash, &part| splitmix64(hash ^ part))
}

/// The augmentation seed of sample `index` (in the dataset) during `epoch`.
pub fn sample_seed(seed: u64, epoch: usize, index: usize) -> u64 {
    derive_seed(&[seed, AUGMENT, epoch as u64, index as u64])
}

/// Settings of a [`Loader`].
#[derive(Config, Debug)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Visit the samples in a new random order every epoch.
    #[config(default = true)]
    pub shuffle: bool,
    /// Leave out the last batch of an epoch when it is smaller than `batch_size`.
    #[config(default = false)]
    pub drop_last: bool,
    /// Seed of the shuffles and augmentations.
    #[config(default = 0)]
    pub seed: u64,
    /// Threads decoding and augmenting the samples of a batch (1: the producer thread
    /// alone).
    #[config(default = 1)]
    pub threads: usize,
    /// Batches prepared ahead of the one being consumed.
    #[config(default = 2)]
    pub prefetch: usize,
    /// Which share of every batch this loader yields (see [`share`]): data-parallel
    /// training gives rank `r` of `n` the share `r` of `n`. 0 with `share_count` 1: the
    /// whole batch.
    #[config(default = 0)]
    pub share_index: usize,
    /// How many shares every batch is cut into (1: the whole batch).
    #[config(default = 1)]
    pub share_count: usize,
}

/// The contiguous share `part` of `parts` of `0..len`: `part * len / parts` up to
/// `(part + 1) * len / parts`. The shares cover `0..len` in order without overlap and
/// differ in size by at most one; a share is empty when `len < parts`.
pub fn share(len: usize, part: usize, parts: usize) -> std::ops::Range<usize> {
    debug_assert!(part < parts);
    (part * len / parts)..((part + 1) * len / parts)
}

/// Where a run stands in its stream of batches: batch `batch` of epoch `epoch` (both
/// from 0) is the next one to load. Saved in checkpoints; [`Loader::resume`] continues
/// from it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub struct Position {
    /// Epoch, from 0.
    pub epoch: usize,
    /// Batch within the epoch, from 0.
    pub batch: usize,
}

impl Position {
    /// Batch `batch` of epoch `epoch`.
    pub const fn new(epoch: usize, batch: usize) -> Self {
        Position { epoch, batch }
    }

    /// The start of epoch `epoch`.
    pub const fn epoch_start(epoch: usize) -> Self {
        Position { epoch, batch: 0 }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} batch {}", self.epoch, self.batch)
    }
}

/// A batch in host memory: normalised `f32` images in `[N, C, H, W]` order and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// Where this batch is in the stream.
    pub position: Position,
    /// Where the stream continues after it (the next epoch's start after the last batch).
    pub next: Position,
    /// `[N, C, H, W]`.
    pub shape: [usize; 4],
    /// `N * C * H * W` values.
    pub images: Vec<f32>,
    /// The class of each image.
    pub labels: Vec<u32>,
    /// The dataset index of each image.
    pub indices: Vec<usize>,
}

impl HostBatch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no image (a share of a batch smaller than the number of
    /// shares).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images `range` of the batch (same positions).
    ///
    /// # Panics
    /// When `range` is not within the batch.
    pub fn slice(&self, range: std::ops::Range<usize>) -> HostBatch {
        let sample: usize = self.shape[1..].iter().product();
        HostBatch {
            position: self.position,
            next: self.next,
            shape: [range.len(), self.shape[1], self.shape[2], self.shape[3]],
            images: self.images[range.start * sample..range.end * sample].to_vec(),
            labels: self.labels[range.clone()].to_vec(),
            indices: self.indices[range].to_vec(),
        }
    }

    /// Moves the batch onto `device` as tensors.
    pub fn to_device(self, device: &Device) -> Batch {
        let n = self.labels.len();
        let labels: Vec<i64> = self.labels.iter().map(|&l| l as i64).collect();
        Batch {
            images: Tensor::from_data(TensorData::new(self.images, self.shape), device),
            labels: Tensor::from_data(TensorData::new(labels, [n]), device),
            position: self.position,
            next: self.next,
            indices: self.indices,
        }
    }
}

/// A batch on a device: what a training step consumes.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Normalised images, `[N, C, H, W]`.
    pub images: Tensor<4>,
    /// Class indices, `[N]`.
    pub labels: Tensor<1, Int>,
    /// Where this batch is in the stream.
    pub position: Position,
    /// Where the stream continues after it: the position to save in a checkpoint
    /// written after this batch's step.
    pub next: Position,
    /// The dataset index of each image.
    pub indices: Vec<usize>,
}

/// What the producer thread shares with the loader.
#[derive(Debug)]
struct Inner {
    dataset: Arc<Dataset>,
    transform: Transform,
    config: LoaderConfig,
    shape: ImageShape,
    samples_per_epoch: usize,
    batches_per_epoch: usize,
    pool: Option<rayon::ThreadPool>,
}

/// Batches of a [`Dataset`] through a [`Transform`], epoch after epoch.
///
/// ```no_run
/// use burn::tensor::Device;
/// use versatile::data::{Dataset, DatasetKind, Loader, LoaderConfig, Split, Transform};
/// # fn main() -> Result<(), versatile::data::DataError> {
/// let device = Device::flex();
/// let train = Dataset::open(DatasetKind::Idx, "data/fashion-mnist-sample", Split::Train)?;
/// let loader = Loader::new(
///     train,
///     Transform::standard(DatasetKind::Idx, true),
///     LoaderConfig::new(128).with_seed(42).with_threads(2),
/// )?;
/// for epoch in 0..2 {
///     for batch in loader.epoch(epoch, &device)? {
///         let batch = batch?; // images [128, 1, 28, 28], labels [128]
///         // ... one training step; a checkpoint saves `batch.next` ...
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

impl Loader {
    /// A loader of `dataset` through `transform` with `config`.
    ///
    /// # Errors
    /// [`DataError::InvalidConfig`] for a zero batch size or thread count, a dataset
    /// smaller than one batch with `drop_last`, or a transform whose outputs vary in
    /// size (ImageFolder needs a crop to a fixed size); [`DataError::InvalidTransform`]
    /// when the normalisation's channels differ from the dataset's;
    /// [`DataError::Thread`] when the worker threads cannot start.
    pub fn new(
        dataset: impl Into<Arc<Dataset>>,
        transform: Transform,
        config: LoaderConfig,
    ) -> Result<Self, DataError> {
        let dataset = dataset.into();
        if config.batch_size == 0 {
            return Err(DataError::InvalidConfig("batch size 0".into()));
        }
        if config.threads == 0 {
            return Err(DataError::InvalidConfig(
                "0 threads (need at least 1)".into(),
            ));
        }
        if config.share_index >= config.share_count {
            return Err(DataError::InvalidConfig(format!(
                "share {} of {} (shares count from 0)",
                config.share_index, config.share_count
            )));
        }
        let channels = dataset.channels();
        if transform.normalize().channels() != channels {
            return Err(DataError::InvalidTransform(format!(
                "normalisation for {} channels on a dataset of {channels}-channel images",
                transform.normalize().channels()
            )));
        }
        let shape = transform
            .output_shape(dataset.image_shape(), channels)
            .ok_or_else(|| {
                DataError::InvalidConfig(
                    "the transform gives images of varying sizes; batches need a crop to a fixed size (e.g. CenterCrop)".into(),
                )
            })?;
        let len = dataset.len();
        let (samples_per_epoch, batches_per_epoch) = if config.drop_last {
            let batches = len / config.batch_size;
            (batches * config.batch_size, batches)
        } else {
            (len, len.div_ceil(config.batch_size))
        };
        if batches_per_epoch == 0 {
            return Err(DataError::InvalidConfig(format!(
                "{len} samples make no batch of {} with drop_last",
                config.batch_size
            )));
        }
        let pool = if config.threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(config.threads)
                    .thread_name(|i| format!("versatile-data-{i}"))
                    .build()
                    .map_err(|err| DataError::Thread(std::io::Error::other(err)))?,
            )
        } else {
            None
        };
        Ok(Loader {
            inner: Arc::new(Inner {
                dataset,
                transform,
                config,
                shape,
                samples_per_epoch,
                batches_per_epoch,
                pool,
            }),
        })
    }

    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.inner.dataset
    }

    /// The transform.
    pub fn transform(&self) -> &Transform {
        &self.inner.transform
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.inner.config
    }

    /// The same loader (dataset, transform, settings) yielding share `index` of `count`
    /// of every batch (see [`share`]); positions and batch counts stay those of the
    /// whole batches.
    ///
    /// # Errors
    /// As [`Loader::new`], and `index >= count`.
    pub fn with_share(&self, index: usize, count: usize) -> Result<Loader, DataError> {
        let config = self
            .inner
            .config
            .clone()
            .with_share_index(index)
            .with_share_count(count);
        Loader::new(
            Arc::clone(&self.inner.dataset),
            self.inner.transform.clone(),
            config,
        )
    }

    /// The shape of every image of a batch, `[C, H, W]`: a network's input shape.
    pub fn sample_shape(&self) -> ImageShape {
        self.inner.shape
    }

    /// Number of classes of the dataset.
    pub fn num_classes(&self) -> usize {
        self.inner.dataset.num_classes()
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.inner.batches_per_epoch
    }

    /// Samples per epoch (fewer than the dataset's with `drop_last`).
    pub fn samples_per_epoch(&self) -> usize {
        self.inner.samples_per_epoch
    }

    /// The position that follows `position`.
    pub fn next_position(&self, position: Position) -> Position {
        if position.batch + 1 >= self.inner.batches_per_epoch {
            Position::epoch_start(position.epoch + 1)
        } else {
            Position::new(position.epoch, position.batch + 1)
        }
    }

    /// The order in which epoch `epoch` visits the dataset's samples.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        self.inner.order(epoch)
    }

    /// Loads the batch at `position` on the calling thread (its samples on the worker
    /// pool): the same batch iteration gives there.
    ///
    /// # Errors
    /// [`DataError::PositionOutOfRange`], or the error of a sample that cannot be read.
    pub fn load(&self, position: Position) -> Result<HostBatch, DataError> {
        self.check(position, false)?;
        self.inner.load(&self.inner.order(position.epoch), position)
    }

    fn check(&self, position: Position, allow_end: bool) -> Result<(), DataError> {
        let batches = self.inner.batches_per_epoch;
        if position.batch > batches || (position.batch == batches && !allow_end) {
            return Err(DataError::PositionOutOfRange {
                batch: position.batch,
                batches,
            });
        }
        Ok(())
    }

    /// The batches of epoch `epoch`, on `device`.
    ///
    /// # Errors
    /// [`DataError::Thread`] when the producer thread cannot start.
    pub fn epoch(&self, epoch: usize, device: &Device) -> Result<Batches, DataError> {
        self.resume(Position::epoch_start(epoch), device)
    }

    /// The batches of `position.epoch` from `position.batch` on, on `device`: exactly
    /// those an uninterrupted iteration of the epoch gives from there. A batch index equal
    /// to [`Loader::batches_per_epoch`] gives no batch.
    ///
    /// # Errors
    /// [`DataError::PositionOutOfRange`] past the end of the epoch; [`DataError::Thread`].
    pub fn resume(&self, position: Position, device: &Device) -> Result<Batches, DataError> {
        Ok(Batches {
            inner: self.resume_host(position)?,
            device: device.clone(),
        })
    }

    /// As [`Loader::resume`], with the batches left in host memory.
    ///
    /// # Errors
    /// As [`Loader::resume`].
    pub fn resume_host(&self, position: Position) -> Result<HostBatches, DataError> {
        self.check(position, true)?;
        let inner = Arc::clone(&self.inner);
        let (sender, receiver) = mpsc::sync_channel(inner.config.prefetch);
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let remaining = inner.batches_per_epoch - position.batch;
        let handle = std::thread::Builder::new()
            .name("versatile-loader".into())
            .spawn(move || {
                let order = inner.order(position.epoch);
                for batch in position.batch..inner.batches_per_epoch {
                    if stop_flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let result = inner.load(&order, Position::new(position.epoch, batch));
                    let failed = result.is_err();
                    if sender.send(result).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(DataError::Thread)?;
        Ok(HostBatches {
            receiver: Some(receiver),
            handle: Some(handle),
            stop,
            remaining,
        })
    }
}

impl Inner {
    fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            let seed = derive_seed(&[self.config.seed, SHUFFLE, epoch as u64]);
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        }
        order
    }

    fn load(&self, order: &[usize], position: Position) -> Result<HostBatch, DataError> {
        let size = self.config.batch_size;
        let start = position.batch * size;
        let end = (start + size).min(self.samples_per_epoch);
        let part = share(
            end - start,
            self.config.share_index,
            self.config.share_count,
        );
        let indices = order[start + part.start..start + part.end].to_vec();
        let sample = self.shape.num_elements();
        let mut images = vec![0f32; indices.len() * sample];
        let fill = |(slot, &index): (&mut [f32], &usize)| -> Result<(), DataError> {
            let image = self.dataset.image(index)?;
            let seed = sample_seed(self.config.seed, position.epoch, index);
            let image = self.transform.apply(image, seed);
            if image.shape() != self.shape {
                return Err(DataError::ShapeMismatch {
                    index,
                    expected: self.shape,
                    found: image.shape(),
                });
            }
            self.transform.write_normalized(&image, slot)
        };
        let results: Vec<Result<(), DataError>> = match &self.pool {
            Some(pool) => pool.install(|| {
                images
                    .par_chunks_mut(sample)
                    .zip(indices.par_iter())
                    .with_min_len(4)
                    .map(fill)
                    .collect()
            }),
            None => images
                .chunks_mut(sample)
                .zip(indices.iter())
                .map(fill)
                .collect(),
        };
        // The first failing sample in batch order, whatever the threads did.
        results.into_iter().collect::<Result<(), _>>()?;
        let labels = indices.iter().map(|&i| self.dataset.labels()[i]).collect();
        let next = if position.batch + 1 >= self.batches_per_epoch {
            Position::epoch_start(position.epoch + 1)
        } else {
            Position::new(position.epoch, position.batch + 1)
        };
        Ok(HostBatch {
            position,
            next,
            shape: [
                indices.len(),
                self.shape.channels,
                self.shape.height,
                self.shape.width,
            ],
            images,
            labels,
            indices,
        })
    }
}

/// The batches of one epoch in host memory, prepared on a producer thread.
///
/// Yields `Err` once for a sample that cannot be read, then ends. Dropping it stops the
/// producer.
#[derive(Debug)]
pub struct HostBatches {
    receiver: Option<Receiver<Result<HostBatch, DataError>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    remaining: usize,
}

impl Iterator for HostBatches {
    type Item = Result<HostBatch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver.as_ref()?.recv() {
            Ok(item) => {
                match &item {
                    Ok(_) => self.remaining -= 1,
                    Err(_) => self.remaining = 0,
                }
                Some(item)
            }
            Err(_) => {
                // The producer has finished: after the last batch or an error, unless it
                // panicked; an epoch must never end short silently.
                self.receiver = None;
                let missing = std::mem::take(&mut self.remaining);
                match self.handle.take().map(JoinHandle::join) {
                    Some(Err(payload)) => Some(Err(DataError::WorkerFailed(panic_message(
                        payload.as_ref(),
                    )))),
                    _ if missing > 0 => Some(Err(DataError::WorkerFailed(format!(
                        "{missing} batches of the epoch were not produced"
                    )))),
                    _ => None,
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining))
    }
}

/// The message of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic without a message".to_string())
}

impl Drop for HostBatches {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver makes a pending send fail, so the producer exits.
        self.receiver.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The batches of one epoch on a device: what [`Loader::epoch`] and [`Loader::resume`]
/// give.
#[derive(Debug)]
pub struct Batches {
    inner: HostBatches,
    device: Device,
}

impl Batches {
    /// Batches left in the epoch (fewer if an error ends it).
    pub fn remaining(&self) -> usize {
        self.inner.remaining
    }
}

impl Iterator for Batches {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner
            .next()
            .map(|item| item.map(|batch| batch.to_device(&self.device)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}
