//! CIFAR-10 and CIFAR-100 in their binary versions.
//!
//! Each file is a sequence of fixed-size records: the label byte(s), then a 32x32 RGB
//! image as three planes (red, green, blue) of 1024 row-major bytes.
//!
//! - CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_1.bin` ... `data_batch_5.bin` for
//!   training and `test_batch.bin`, records of 1 + 3072 bytes; labels 0..10; class names
//!   in `batches.meta.txt`.
//! - CIFAR-100 (`cifar-100-binary/`): `train.bin` and `test.bin`, records of 2 + 3072
//!   bytes (coarse label 0..20, then fine label 0..100); the fine labels are used; class
//!   names in `fine_label_names.txt`.
//!
//! The directory given may be the one holding the files or its parent (the directory
//! the official archive unpacks into).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::dataset::{read_name_list, InMemory};
use super::{DataError, ImageShape, Split};

/// Side of a CIFAR image.
pub const SIDE: usize = 32;
/// Bytes of one CIFAR image (3 planes of 32x32).
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;
/// Most bytes of one CIFAR file (the largest official one, CIFAR-100's `train.bin`,
/// holds 154 MB).
pub const MAX_FILE_BYTES: u64 = 1 << 32;

/// The two CIFAR variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// 10 classes, 1 label byte per record.
    Cifar10,
    /// 100 fine classes (20 coarse), 2 label bytes per record.
    Cifar100,
}

impl Variant {
    /// Label bytes before each image.
    pub fn label_bytes(self) -> usize {
        match self {
            Variant::Cifar10 => 1,
            Variant::Cifar100 => 2,
        }
    }

    /// Bytes of one record.
    pub fn record_bytes(self) -> usize {
        self.label_bytes() + IMAGE_BYTES
    }

    /// Number of classes (fine classes for CIFAR-100).
    pub fn num_classes(self) -> usize {
        match self {
            Variant::Cifar10 => 10,
            Variant::Cifar100 => 100,
        }
    }

    /// The sub-directory the official archive unpacks into.
    pub fn archive_dir(self) -> &'static str {
        match self {
            Variant::Cifar10 => "cifar-10-batches-bin",
            Variant::Cifar100 => "cifar-100-binary",
        }
    }

    /// The files of `split`, in order.
    pub fn files(self, split: Split) -> Vec<String> {
        match (self, split) {
            (Variant::Cifar10, Split::Train) => {
                (1..=5).map(|i| format!("data_batch_{i}.bin")).collect()
            }
            (Variant::Cifar10, Split::Test) => vec!["test_batch.bin".to_string()],
            (Variant::Cifar100, Split::Train) => vec!["train.bin".to_string()],
            (Variant::Cifar100, Split::Test) => vec!["test.bin".to_string()],
        }
    }

    fn names_file(self) -> &'static str {
        match self {
            Variant::Cifar10 => "batches.meta.txt",
            Variant::Cifar100 => "fine_label_names.txt",
        }
    }
}

/// The directory holding the files of `variant`: `dir` itself, or its archive
/// sub-directory when `dir` does not hold them.
pub fn resolve_dir(dir: &Path, variant: Variant) -> PathBuf {
    let first = &variant.files(Split::Test)[0];
    let nested = dir.join(variant.archive_dir());
    if !dir.join(first).is_file() && nested.join(first).is_file() {
        nested
    } else {
        dir.to_path_buf()
    }
}

/// Reads the `split` of a CIFAR dataset in `dir`.
pub(crate) fn read(dir: &Path, variant: Variant, split: Split) -> Result<InMemory, DataError> {
    let dir = resolve_dir(dir, variant);
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let names = variant.files(split);
    let expected = names.join(", ");
    for name in &names {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(DataError::MissingFile {
                dir: dir.clone(),
                what: match split {
                    Split::Train => "a CIFAR training file",
                    Split::Test => "the CIFAR test file",
                },
                expected: expected.clone(),
            });
        }
        read_file(&path, variant, &mut pixels, &mut labels)?;
    }
    let class_names = read_name_list(&dir.join(variant.names_file()))
        .filter(|names| names.len() == variant.num_classes());
    Ok(InMemory {
        shape: ImageShape::new(3, SIDE, SIDE),
        pixels,
        labels,
        num_classes: variant.num_classes(),
        class_names,
    })
}

/// Appends the records of one file: pixels converted from planes to interleaved RGB.
fn read_file(
    path: &Path,
    variant: Variant,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<(), DataError> {
    let io = |err| DataError::io(path, err);
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let record = variant.record_bytes();
    if size == 0 {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    if size % record as u64 != 0 {
        return Err(DataError::RecordSize {
            path: path.to_path_buf(),
            size,
            record: record as u64,
        });
    }
    if size > MAX_FILE_BYTES {
        return Err(DataError::BadHeader {
            path: path.to_path_buf(),
            reason: format!(
                "{size} bytes, more than the limit of {MAX_FILE_BYTES} bytes for one CIFAR file"
            ),
        });
    }
    // Exactly the size checked above, even if the file grows meanwhile.
    let mut bytes = Vec::new();
    file.take(size).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 != size {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: "the CIFAR records".to_string(),
            expected: size,
            found: bytes.len() as u64,
        });
    }
    let plane = SIDE * SIDE;
    let label_at = variant.label_bytes() - 1;
    pixels.reserve(bytes.len() / record * IMAGE_BYTES);
    for (index, chunk) in bytes.chunks_exact(record).enumerate() {
        if variant == Variant::Cifar100 && chunk[0] >= 20 {
            return Err(DataError::LabelOutOfRange {
                path: path.to_path_buf(),
                index,
                label: chunk[0] as u32,
                num_classes: 20,
            });
        }
        let label = chunk[label_at] as u32;
        if label as usize >= variant.num_classes() {
            return Err(DataError::LabelOutOfRange {
                path: path.to_path_buf(),
                index,
                label,
                num_classes: variant.num_classes(),
            });
        }
        labels.push(label);
        let planes = &chunk[variant.label_bytes()..];
        let (red, rest) = planes.split_at(plane);
        let (green, blue) = rest.split_at(plane);
        for ((&r, &g), &b) in red.iter().zip(green).zip(blue) {
            pixels.extend_from_slice(&[r, g, b]);
        }
    }
    Ok(())
}
