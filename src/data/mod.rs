//! Image classification data from local files: datasets, transforms and a batch loader.
//!
//! - [`Dataset`] reads one split of a dataset in one of the [`DatasetKind`] formats:
//!   [IDX](idx) (MNIST, Fashion-MNIST; raw or gzip), [CIFAR-10/100](cifar) binary, and
//!   [ImageFolder](folder) (ImageNet layout, JPEG and PNG, decoded lazily). Missing,
//!   corrupt or truncated files give a [`DataError`] naming the file and the problem.
//! - [`Transform`] applies the standard augmentations ([`Step`]: random-resized crop,
//!   resize, centre crop, pad-and-crop, horizontal flip), then a per-channel
//!   [`Normalize`]; [`Transform::standard`] picks the usual ones per format.
//! - [`Loader`] shuffles, decodes and augments on worker threads with prefetching, and
//!   yields [`Batch`]es of `[N, C, H, W]` `f32` images and `[N]` integer labels on a
//!   burn [`Device`](burn::tensor::Device); its output depends only on its seed (not on
//!   the threads) and can resume from any [`Position`].
//!
//! Training uses it like this:
//!
//! ```no_run
//! use burn::tensor::Device;
//! use versatile::data::{Dataset, DatasetKind, Loader, LoaderConfig, Position, Split, Transform};
//! # fn main() -> Result<(), versatile::data::DataError> {
//! let device = Device::flex();
//! let path = "data/fashion-mnist-sample";
//! let kind = DatasetKind::detect(path)?; // or DatasetKind::Idx, "cifar10".parse()?, ...
//! let train = Loader::new(
//!     Dataset::open(kind, path, Split::Train)?,
//!     Transform::standard(kind, true),
//!     LoaderConfig::new(128).with_seed(1).with_threads(2),
//! )?;
//! let test = Loader::new(
//!     Dataset::open(kind, path, Split::Test)?,
//!     Transform::standard(kind, false),
//!     LoaderConfig::new(256).with_shuffle(false),
//! )?;
//! let [c, h, w] = train.sample_shape().dims(); // the network's input: 1x28x28
//! let classes = train.num_classes(); // 10
//!
//! let start = Position::default(); // or the position saved in a checkpoint
//! for epoch in start.epoch..10 {
//!     let from = if epoch == start.epoch { start } else { Position::epoch_start(epoch) };
//!     for batch in train.resume(from, &device)? {
//!         let batch = batch?;
//!         // step on batch.images / batch.labels; checkpoints store batch.next
//!     }
//!     for batch in test.epoch(0, &device)? {
//!         let batch = batch?;
//!         // evaluate
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod cifar;
mod dataset;
mod error;
pub mod folder;
pub mod idx;
mod loader;
mod raster;
mod transform;

pub use dataset::{Dataset, DatasetKind, Split, IDX_CLASS_NAMES};
pub use error::DataError;
pub use loader::{
    derive_seed, sample_seed, share, Batch, Batches, HostBatch, HostBatches, Loader, LoaderConfig,
    Position,
};
pub use raster::{Image, ImageShape};
pub use transform::{Normalize, Step, Transform};
