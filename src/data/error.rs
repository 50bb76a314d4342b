//! Errors of the data layer: missing, corrupt or truncated files, and invalid settings.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong while opening, decoding, transforming or batching data.
///
/// Every variant about a file names the file (or directory) and says what was expected
/// and what was found, so the message alone tells a user what is wrong.
#[derive(Debug, Error)]
pub enum DataError {
    /// The dataset directory (or a split directory inside it) does not exist.
    #[error("dataset directory not found: {path}")]
    MissingDir {
        /// The directory that was looked for.
        path: PathBuf,
    },
    /// A file the dataset needs is not in its directory.
    #[error("{what} not found in {dir} (expected {expected})")]
    MissingFile {
        /// The directory searched.
        dir: PathBuf,
        /// What the file holds, e.g. "training images".
        what: &'static str,
        /// The file names accepted, e.g. "train-images-idx3-ubyte[.gz]".
        expected: String,
    },
    /// An operating-system error while reading or writing a file.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A gzip stream that cannot be decompressed.
    #[error("{path}: corrupt gzip data: {reason}")]
    Gzip {
        /// The file.
        path: PathBuf,
        /// What the decompressor reported.
        reason: String,
    },
    /// An IDX file whose magic number is not the one expected.
    #[error("{path}: bad IDX magic number 0x{found:08x}, expected 0x{expected:08x} ({what})")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first four bytes of the file, big endian.
        found: u32,
        /// The magic number of the expected kind of file.
        expected: u32,
        /// The expected kind of file, e.g. "unsigned bytes, 3 dimensions".
        what: &'static str,
    },
    /// A header that is well-formed but describes something unusable.
    #[error("{path}: invalid header: {reason}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the numbers.
        reason: String,
    },
    /// A file shorter than its header (or format) says.
    #[error("{path} is truncated: {what} needs {expected} bytes, the file holds {found}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What part of the file is short, e.g. "header" or "60000 images of 28x28".
        what: String,
        /// Bytes needed.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// A file longer than its header says: it is not what it claims to be.
    #[error("{path}: {found} bytes where the header describes {expected}; the file is not a valid {what}")]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// What the file should be, e.g. "IDX image file".
        what: &'static str,
        /// Bytes the header accounts for.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// Image and label files that do not describe the same number of samples.
    #[error("{images} holds {num_images} images but {labels} holds {num_labels} labels")]
    CountMismatch {
        /// The image file.
        images: PathBuf,
        /// Its number of images.
        num_images: usize,
        /// The label file.
        labels: PathBuf,
        /// Its number of labels.
        num_labels: usize,
    },
    /// A label outside the classes of the format.
    #[error("{path}: label {label} of sample {index} is out of range (the format has {num_classes} classes)")]
    LabelOutOfRange {
        /// The file.
        path: PathBuf,
        /// The sample's index in the file.
        index: usize,
        /// The label found.
        label: u32,
        /// The number of classes of the format.
        num_classes: usize,
    },
    /// A CIFAR file whose size is not a whole number of records.
    #[error("{path}: {size} bytes is not a whole number of {record}-byte CIFAR records ({records} records and {rest} bytes)", records = size / record, rest = size % record)]
    RecordSize {
        /// The file.
        path: PathBuf,
        /// The file's size in bytes.
        size: u64,
        /// The size of one record.
        record: u64,
    },
    /// An image file that cannot be decoded.
    #[error("{path}: cannot decode image: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder reported.
        #[source]
        source: image::ImageError,
    },
    /// An ImageFolder split directory with no class sub-directories.
    #[error("{path}: no class directories (expected {path}/<class>/<image>.jpg|png)")]
    NoClasses {
        /// The split directory.
        path: PathBuf,
    },
    /// A class directory that holds no image with a supported extension.
    #[error("{path}: class directory holds no image (.jpg, .jpeg or .png)")]
    EmptyClass {
        /// The class directory.
        path: PathBuf,
    },
    /// A validation class that the training split does not have.
    #[error(
        "{path}: class {class:?} is not one of the {num_classes} classes of the training split"
    )]
    UnknownClass {
        /// The class directory.
        path: PathBuf,
        /// Its name.
        class: String,
        /// The number of training classes.
        num_classes: usize,
    },
    /// A dataset (or subset) without any sample.
    #[error("{path}: the dataset holds no sample")]
    Empty {
        /// The dataset's files.
        path: PathBuf,
    },
    /// A dataset kind name that is not known.
    #[error("unknown dataset kind {0:?} (expected idx, mnist, fashion-mnist, cifar10, cifar100 or imagefolder)")]
    UnknownKind(String),
    /// A directory whose contents match no dataset format.
    #[error("{path}: cannot tell the dataset format (no IDX, CIFAR or ImageFolder files found)")]
    UnknownFormat {
        /// The directory.
        path: PathBuf,
    },
    /// A sample index past the end of the dataset.
    #[error("sample index {index} is out of range for a dataset of {len} samples")]
    IndexOutOfRange {
        /// The index asked for.
        index: usize,
        /// The number of samples.
        len: usize,
    },
    /// A transform whose parameters cannot work.
    #[error("invalid transform: {0}")]
    InvalidTransform(String),
    /// A loader whose settings cannot work.
    #[error("invalid loader configuration: {0}")]
    InvalidConfig(String),
    /// Samples of a batch that do not have the shape the loader expects.
    #[error("sample {index} is {found} after the transform but the batch expects {expected}")]
    ShapeMismatch {
        /// The sample's index in the dataset.
        index: usize,
        /// The shape of every sample of a batch.
        expected: super::ImageShape,
        /// The sample's shape.
        found: super::ImageShape,
    },
    /// A resume position past the end of an epoch.
    #[error("batch {batch} is out of range: an epoch has {batches} batches")]
    PositionOutOfRange {
        /// The batch asked for.
        batch: usize,
        /// Batches per epoch.
        batches: usize,
    },
    /// A worker thread that could not be started.
    #[error("cannot start a data loader thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A loader thread that stopped before its epoch was complete (a bug: please report).
    #[error("a data loader thread stopped unexpectedly: {0}")]
    WorkerFailed(String),
    /// An operation the dataset's storage does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl DataError {
    /// An [`DataError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
