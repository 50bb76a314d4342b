//! Datasets: the samples of one split of one format, with their labels.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::cifar::{self, Variant};
use super::{folder, idx, DataError, Image, ImageShape};

/// The on-disk formats the data layer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// IDX files: MNIST, Fashion-MNIST (grey, usually 28x28), raw or gzip.
    Idx,
    /// CIFAR-10 binary version (32x32 RGB, 10 classes).
    Cifar10,
    /// CIFAR-100 binary version (32x32 RGB, 100 fine classes).
    Cifar100,
    /// One directory per class under `train/` and `val/` (ImageNet layout; JPEG, PNG).
    ImageFolder,
}

impl DatasetKind {
    /// Every kind, in the order of the documentation.
    pub const ALL: [DatasetKind; 4] = [
        DatasetKind::Idx,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
        DatasetKind::ImageFolder,
    ];

    /// The canonical name, as [`FromStr`] reads it back.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Idx => "idx",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::ImageFolder => "imagefolder",
        }
    }

    /// Tells the format of the dataset in `dir` from the files it holds.
    ///
    /// IDX files are looked for first, then CIFAR-10, CIFAR-100 and ImageFolder's
    /// `train/`, `val/` or `test/` directories.
    pub fn detect(dir: impl AsRef<Path>) -> Result<DatasetKind, DataError> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(DataError::MissingDir {
                path: dir.to_path_buf(),
            });
        }
        let split_found = |check: &dyn Fn(Split) -> bool| check(Split::Train) || check(Split::Test);
        if split_found(&|split| idx::find_pair(dir, split).is_ok()) {
            return Ok(DatasetKind::Idx);
        }
        for (variant, kind) in [
            (Variant::Cifar10, DatasetKind::Cifar10),
            (Variant::Cifar100, DatasetKind::Cifar100),
        ] {
            let files_dir = cifar::resolve_dir(dir, variant);
            if split_found(&|split| files_dir.join(&variant.files(split)[0]).is_file()) {
                return Ok(kind);
            }
        }
        if ["train", "val", "test"]
            .iter()
            .any(|name| dir.join(name).is_dir())
        {
            return Ok(DatasetKind::ImageFolder);
        }
        Err(DataError::UnknownFormat {
            path: dir.to_path_buf(),
        })
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;

    /// Reads a kind: `idx` (also `mnist`, `fashion-mnist`), `cifar10` (`cifar-10`),
    /// `cifar100` (`cifar-100`), `imagefolder` (`image-folder`, `imagenet`); case and `_`
    /// versus `-` do not matter.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "idx" | "mnist" | "fashion-mnist" | "fashionmnist" => Ok(DatasetKind::Idx),
            "cifar10" | "cifar-10" => Ok(DatasetKind::Cifar10),
            "cifar100" | "cifar-100" => Ok(DatasetKind::Cifar100),
            "imagefolder" | "image-folder" | "imagenet" => Ok(DatasetKind::ImageFolder),
            _ => Err(DataError::UnknownKind(s.to_string())),
        }
    }
}

/// Which part of a dataset: the training samples or the held-out ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training samples (`train-*` IDX files, CIFAR training batches, `train/`).
    Train,
    /// Held-out samples (`t10k-*` IDX files, CIFAR test batch, `val/` or `test/`).
    Test,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// Fully decoded images held in memory (IDX and CIFAR files are small enough).
#[derive(Debug, Clone)]
pub(crate) struct InMemory {
    pub shape: ImageShape,
    /// `len * shape.num_elements()` bytes, each image interleaved (HWC).
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub num_classes: usize,
    pub class_names: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
enum Source {
    /// Decoded images, `shape` each, interleaved.
    Memory { shape: ImageShape, pixels: Vec<u8> },
    /// Image files decoded on demand.
    Files { paths: Vec<PathBuf> },
}

/// The samples of one split of a dataset: images (in memory or decoded on demand) with
/// their class labels.
///
/// ```no_run
/// use versatile::data::{Dataset, DatasetKind, Split};
/// # fn main() -> Result<(), versatile::data::DataError> {
/// let train = Dataset::open(DatasetKind::Idx, "data/fashion-mnist-sample", Split::Train)?;
/// assert_eq!(train.num_classes(), 10);
/// let image = train.image(0)?; // 1x28x28 bytes
/// let label = train.labels()[0];
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Dataset {
    kind: DatasetKind,
    split: Split,
    root: PathBuf,
    labels: Vec<u32>,
    num_classes: usize,
    class_names: Option<Vec<String>>,
    source: Source,
}

impl Dataset {
    /// Opens the `split` of the dataset of format `kind` in the directory `path`.
    ///
    /// IDX and CIFAR files are read, checked and decoded here, whole; ImageFolder
    /// directories are only listed (images are decoded by [`Dataset::image`]).
    ///
    /// # Errors
    /// A [`DataError`] naming the file and the problem for missing directories or
    /// files, unreadable, corrupt or truncated files, images and labels that disagree,
    /// labels out of range, empty datasets or classes.
    pub fn open(
        kind: DatasetKind,
        path: impl AsRef<Path>,
        split: Split,
    ) -> Result<Self, DataError> {
        let root = path.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(DataError::MissingDir { path: root });
        }
        let dataset = match kind {
            DatasetKind::Idx => {
                Self::from_memory(kind, split, root.clone(), open_idx(&root, split)?)
            }
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
                let variant = if kind == DatasetKind::Cifar10 {
                    Variant::Cifar10
                } else {
                    Variant::Cifar100
                };
                let data = cifar::read(&root, variant, split)?;
                Self::from_memory(kind, split, root.clone(), data)
            }
            DatasetKind::ImageFolder => {
                let found = folder::scan(&root, split)?;
                let (paths, labels) = found.samples.into_iter().unzip();
                Dataset {
                    kind,
                    split,
                    root: root.clone(),
                    labels,
                    num_classes: found.classes.len(),
                    class_names: Some(found.classes),
                    source: Source::Files { paths },
                }
            }
        };
        if dataset.is_empty() {
            return Err(DataError::Empty { path: root });
        }
        Ok(dataset)
    }

    /// Opens the `split` of the dataset in `path`, its format told by
    /// [`DatasetKind::detect`].
    pub fn open_detect(path: impl AsRef<Path>, split: Split) -> Result<Self, DataError> {
        let kind = DatasetKind::detect(path.as_ref())?;
        Self::open(kind, path, split)
    }

    fn from_memory(kind: DatasetKind, split: Split, root: PathBuf, data: InMemory) -> Self {
        Dataset {
            kind,
            split,
            root,
            labels: data.labels,
            num_classes: data.num_classes,
            class_names: data.class_names,
            source: Source::Memory {
                shape: data.shape,
                pixels: data.pixels,
            },
        }
    }

    /// The dataset's format.
    pub fn kind(&self) -> DatasetKind {
        self.kind
    }

    /// The split this dataset holds.
    pub fn split(&self) -> Split {
        self.split
    }

    /// The directory it was opened from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there is no sample (never, for a dataset from [`Dataset::open`]).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of classes: 10 for CIFAR-10, 100 for CIFAR-100, the training split's class
    /// directories for ImageFolder, and one more than the largest label for IDX files
    /// (which do not record it).
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Class names, where the files give them (CIFAR metadata, ImageFolder directories).
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }

    /// The label of every sample, in sample order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Channels of every image: 1 for IDX, 3 for CIFAR and ImageFolder (converted to RGB).
    pub fn channels(&self) -> usize {
        match &self.source {
            Source::Memory { shape, .. } => shape.channels,
            Source::Files { .. } => 3,
        }
    }

    /// The shape of every image when they all share one (IDX, CIFAR); `None` for
    /// ImageFolder, whose images keep their own sizes until a transform crops them.
    pub fn image_shape(&self) -> Option<ImageShape> {
        match &self.source {
            Source::Memory { shape, .. } => Some(*shape),
            Source::Files { .. } => None,
        }
    }

    /// The image of sample `index`, decoded (ImageFolder) or copied (in-memory formats).
    ///
    /// # Errors
    /// [`DataError::IndexOutOfRange`], or for ImageFolder a read or decode error naming
    /// the file.
    pub fn image(&self, index: usize) -> Result<Image, DataError> {
        if index >= self.len() {
            return Err(DataError::IndexOutOfRange {
                index,
                len: self.len(),
            });
        }
        match &self.source {
            Source::Memory { shape, pixels } => {
                let size = shape.num_elements();
                let bytes = pixels[index * size..(index + 1) * size].to_vec();
                Ok(Image::new(*shape, bytes).expect("slices have the image size"))
            }
            Source::Files { paths } => folder::decode(&paths[index]),
        }
    }

    /// The file of sample `index` for ImageFolder datasets.
    pub fn path(&self, index: usize) -> Option<&Path> {
        match &self.source {
            Source::Files { paths } => paths.get(index).map(PathBuf::as_path),
            Source::Memory { .. } => None,
        }
    }

    /// The dataset restricted to the samples `indices`, in that order (repeats allowed).
    /// Classes and class names stay those of the full dataset.
    ///
    /// # Errors
    /// [`DataError::IndexOutOfRange`] for an index past the end, [`DataError::Empty`] for
    /// no index.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset, DataError> {
        if indices.is_empty() {
            return Err(DataError::Empty {
                path: self.root.clone(),
            });
        }
        if let Some(&index) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(DataError::IndexOutOfRange {
                index,
                len: self.len(),
            });
        }
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        let source = match &self.source {
            Source::Memory { shape, pixels } => {
                let size = shape.num_elements();
                let mut picked = Vec::with_capacity(indices.len() * size);
                for &i in indices {
                    picked.extend_from_slice(&pixels[i * size..(i + 1) * size]);
                }
                Source::Memory {
                    shape: *shape,
                    pixels: picked,
                }
            }
            Source::Files { paths } => Source::Files {
                paths: indices.iter().map(|&i| paths[i].clone()).collect(),
            },
        };
        Ok(Dataset {
            labels,
            source,
            root: self.root.clone(),
            class_names: self.class_names.clone(),
            ..*self
        })
    }

    /// The indices of the first `per_class` samples of each class, in sample order: a
    /// class-balanced subset (classes with fewer samples give all they have).
    pub fn first_per_class(&self, per_class: usize) -> Vec<usize> {
        let mut taken = vec![0usize; self.num_classes];
        let mut picked = Vec::new();
        for (index, &label) in self.labels.iter().enumerate() {
            let count = &mut taken[label as usize];
            if *count < per_class {
                *count += 1;
                picked.push(index);
            }
        }
        picked
    }

    /// Per-channel mean and standard deviation of the pixel values scaled to `[0, 1]`,
    /// over every pixel of every sample: the statistics a normalisation uses.
    ///
    /// # Errors
    /// For ImageFolder (which would decode every image), [`DataError::Unsupported`].
    pub fn pixel_stats(&self) -> Result<(Vec<f32>, Vec<f32>), DataError> {
        let Source::Memory { shape, pixels } = &self.source else {
            return Err(DataError::Unsupported(
                "pixel statistics of an ImageFolder dataset (use the ImageNet ones)".into(),
            ));
        };
        let channels = shape.channels;
        let mut sum = vec![0f64; channels];
        let mut sum_sq = vec![0f64; channels];
        // Integer histograms keep the sums exact and fast.
        let mut histogram = vec![[0u64; 256]; channels];
        for pixel in pixels.chunks_exact(channels) {
            for (c, &value) in pixel.iter().enumerate() {
                histogram[c][value as usize] += 1;
            }
        }
        let count = (pixels.len() / channels) as f64;
        for c in 0..channels {
            for (value, &n) in histogram[c].iter().enumerate() {
                let x = value as f64 / 255.0;
                sum[c] += x * n as f64;
                sum_sq[c] += x * x * n as f64;
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
        let std = sum_sq
            .iter()
            .zip(&mean)
            .map(|(sq, m)| ((sq / count - m * m).max(0.0)).sqrt() as f32)
            .collect();
        Ok((mean.into_iter().map(|m| m as f32).collect(), std))
    }

    /// Writes a grey in-memory dataset as the gzip IDX pair of its split into `dir`
    /// (`train-images-idx3-ubyte.gz` and `train-labels-idx1-ubyte.gz`, or `t10k-*`),
    /// creating `dir` if needed. The output is byte-for-byte reproducible.
    ///
    /// # Errors
    /// [`DataError::Unsupported`] for RGB or ImageFolder datasets or labels above 255;
    /// [`DataError::Io`] when writing fails.
    pub fn write_idx(&self, dir: impl AsRef<Path>) -> Result<(), DataError> {
        let dir = dir.as_ref();
        let Source::Memory { shape, pixels } = &self.source else {
            return Err(DataError::Unsupported(
                "writing an ImageFolder dataset as IDX".into(),
            ));
        };
        if shape.channels != 1 {
            return Err(DataError::Unsupported(format!(
                "writing {}-channel images as IDX (grey only)",
                shape.channels
            )));
        }
        let labels = self
            .labels
            .iter()
            .map(|&l| u8::try_from(l))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| DataError::Unsupported("IDX labels above 255".into()))?;
        std::fs::create_dir_all(dir).map_err(|err| DataError::io(dir, err))?;
        let prefix = idx::split_prefix(self.split);
        idx::write_images(
            &dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
            shape.height,
            shape.width,
            pixels,
        )?;
        idx::write_labels(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), &labels)
    }
}

/// The optional file of class names in an IDX directory: one name per line, in label
/// order (IDX files carry no names; the shipped Fashion-MNIST sample has one).
pub const IDX_CLASS_NAMES: &str = "classes.txt";

/// Most bytes of a file of class names (ImageNet-21k's 21,841 names take about 0.5 MB).
const MAX_NAMES_BYTES: u64 = 16 << 20;

/// The lines of a text file of names, one per line (blank lines ignored); `None` when the
/// file cannot be read, is not UTF-8 or is longer than 16 MiB.
pub(crate) fn read_name_list(path: &Path) -> Option<Vec<String>> {
    let bytes = crate::limited::read_at_most(path, MAX_NAMES_BYTES).ok()??;
    let text = String::from_utf8(bytes).ok()?;
    Some(
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// Reads and cross-checks the IDX pair of `split` in `dir`, and the optional
/// [`IDX_CLASS_NAMES`] beside them: when present it declares the classes (a split may
/// lack the last ones), and a label beyond them is an error.
fn open_idx(dir: &Path, split: Split) -> Result<InMemory, DataError> {
    let (images_path, labels_path) = idx::find_pair(dir, split)?;
    let images = idx::read_images(&images_path)?;
    let labels = idx::read_labels(&labels_path)?;
    if images.count != labels.len() {
        return Err(DataError::CountMismatch {
            images: images_path,
            num_images: images.count,
            labels: labels_path,
            num_labels: labels.len(),
        });
    }
    let (num_classes, class_names) = match read_name_list(&dir.join(IDX_CLASS_NAMES)) {
        Some(names) if !names.is_empty() => {
            if let Some(index) = labels.iter().position(|&l| usize::from(l) >= names.len()) {
                return Err(DataError::LabelOutOfRange {
                    path: labels_path,
                    index,
                    label: u32::from(labels[index]),
                    num_classes: names.len(),
                });
            }
            (names.len(), Some(names))
        }
        _ => (labels.iter().max().map_or(0, |&max| max as usize + 1), None),
    };
    Ok(InMemory {
        shape: images.shape,
        pixels: images.pixels,
        labels: labels.into_iter().map(u32::from).collect(),
        num_classes,
        class_names,
    })
}
