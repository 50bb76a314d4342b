//! IDX files, the format of MNIST and Fashion-MNIST, raw or gzip-compressed.
//!
//! An IDX file is a big-endian header — two zero bytes, a type code (`0x08`: unsigned
//! bytes), the number of dimensions, then each dimension as a `u32` — followed by the
//! values. Image files have 3 dimensions `[n, rows, cols]` (magic `0x00000803`), label
//! files 1 dimension `[n]` (magic `0x00000801`). Gzip is recognised by its magic bytes,
//! whatever the file name.
//!
//! A dataset is a directory holding `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each optionally ending in
//! `.gz` (the `train-images.idx3-ubyte` spelling is accepted too).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::{Compression, GzBuilder};

use super::{DataError, ImageShape, Split};

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The images of one IDX image file: `count` grey images of `shape`, row-major.
#[derive(Debug, Clone)]
pub struct IdxImages {
    /// Shape of every image (1 channel).
    pub shape: ImageShape,
    /// Number of images.
    pub count: usize,
    /// `count * rows * cols` bytes.
    pub pixels: Vec<u8>,
}

/// The file name stem of a split: `train` or `t10k`.
pub fn split_prefix(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Test => "t10k",
    }
}

/// The images and labels files of `split` in `dir`: `(images, labels)`.
pub fn find_pair(dir: &Path, split: Split) -> Result<(PathBuf, PathBuf), DataError> {
    let prefix = split_prefix(split);
    let what = match split {
        Split::Train => ("training images", "training labels"),
        Split::Test => ("test images", "test labels"),
    };
    let images = find_file(dir, prefix, "images", 3, what.0)?;
    let labels = find_file(dir, prefix, "labels", 1, what.1)?;
    Ok((images, labels))
}

fn find_file(
    dir: &Path,
    prefix: &str,
    part: &str,
    ndim: u8,
    what: &'static str,
) -> Result<PathBuf, DataError> {
    let dash = format!("{prefix}-{part}-idx{ndim}-ubyte");
    let dot = format!("{prefix}-{part}.idx{ndim}-ubyte");
    [
        format!("{dash}.gz"),
        dash.clone(),
        format!("{dot}.gz"),
        dot.clone(),
    ]
    .into_iter()
    .map(|name| dir.join(name))
    .find(|path| path.is_file())
    .ok_or_else(|| DataError::MissingFile {
        dir: dir.to_path_buf(),
        what,
        expected: format!("{dash}[.gz] or {dot}[.gz]"),
    })
}

/// The bytes of `path`, decompressed when they start with the gzip magic bytes.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|err| DataError::io(path, err))?;
    if raw.len() < 2 || raw[0] != 0x1f || raw[1] != 0x8b {
        return Ok(raw);
    }
    // The gzip trailer holds the uncompressed size modulo 2^32: a capacity hint only.
    let hint = raw
        .len()
        .checked_sub(4)
        .map(|at| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]) as usize)
        .unwrap_or(0)
        .min(1 << 30);
    let mut out = Vec::with_capacity(hint);
    MultiGzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .map_err(|err| DataError::Gzip {
            path: path.to_path_buf(),
            reason: match err.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    "the compressed stream ends early (truncated file?)".to_string()
                }
                _ => err.to_string(),
            },
        })?;
    Ok(out)
}

/// Reads the header of an IDX file of unsigned bytes: its dimensions and the offset of
/// the data, after checking the magic number and that the data is exactly there.
fn parse_header(
    path: &Path,
    bytes: &[u8],
    magic: u32,
    what: &'static str,
    file_kind: &'static str,
) -> Result<(Vec<usize>, usize), DataError> {
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < 4 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: "the IDX magic number".to_string(),
            expected: 4,
            found: bytes.len() as u64,
        });
    }
    let found = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            found,
            expected: magic,
            what,
        });
    }
    if bytes.len() < header {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: format!("the IDX header ({ndim} dimensions)"),
            expected: header as u64,
            found: bytes.len() as u64,
        });
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            let at = 4 + 4 * d;
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
        })
        .collect();
    let values = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::BadHeader {
            path: path.to_path_buf(),
            reason: format!("dimensions {dims:?} overflow"),
        })?;
    let expected = header as u64 + values as u64;
    let len = bytes.len() as u64;
    if len < expected {
        let shape = dims
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: format!("the header and {shape} values"),
            expected,
            found: len,
        });
    }
    if len > expected {
        return Err(DataError::TrailingBytes {
            path: path.to_path_buf(),
            what: file_kind,
            expected,
            found: len,
        });
    }
    Ok((dims, header))
}

/// Reads an IDX image file (`[n, rows, cols]` unsigned bytes), raw or gzip.
pub fn read_images(path: &Path) -> Result<IdxImages, DataError> {
    let bytes = read_maybe_gz(path)?;
    let (dims, header) = parse_header(
        path,
        &bytes,
        IMAGES_MAGIC,
        "unsigned bytes, 3 dimensions: images",
        "IDX image file",
    )?;
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(DataError::BadHeader {
            path: path.to_path_buf(),
            reason: format!("images of {rows}x{cols} pixels"),
        });
    }
    let mut pixels = bytes;
    pixels.drain(..header);
    Ok(IdxImages {
        shape: ImageShape::new(1, rows, cols),
        count,
        pixels,
    })
}

/// Reads an IDX label file (`[n]` unsigned bytes), raw or gzip.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = read_maybe_gz(path)?;
    let (_, header) = parse_header(
        path,
        &bytes,
        LABELS_MAGIC,
        "unsigned bytes, 1 dimension: labels",
        "IDX label file",
    )?;
    let mut labels = bytes;
    labels.drain(..header);
    Ok(labels)
}

/// Writes `bytes` to `path`, gzip-compressed (best compression, no time stamp, so the
/// output is reproducible) when the name ends in `.gz`.
fn write_maybe_gz(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let file = File::create(path).map_err(|err| DataError::io(path, err))?;
    let gz = path.extension().is_some_and(|ext| ext == "gz");
    let result = if gz {
        let mut encoder = GzBuilder::new().write(BufWriter::new(file), Compression::best());
        encoder
            .write_all(bytes)
            .and_then(|()| encoder.finish())
            .and_then(|mut out| out.flush())
    } else {
        let mut out = BufWriter::new(file);
        out.write_all(bytes).and_then(|()| out.flush())
    };
    result.map_err(|err| DataError::io(path, err))
}

fn header(magic: u32, dims: &[usize]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out
}

/// Writes `count` grey images of `rows x cols` as an IDX image file (gzip when `path`
/// ends in `.gz`).
pub fn write_images(path: &Path, rows: usize, cols: usize, pixels: &[u8]) -> Result<(), DataError> {
    let image = rows * cols;
    if image == 0 || pixels.len() % image != 0 {
        return Err(DataError::InvalidConfig(format!(
            "{} bytes are not a whole number of {rows}x{cols} images",
            pixels.len()
        )));
    }
    let mut bytes = header(IMAGES_MAGIC, &[pixels.len() / image, rows, cols]);
    bytes.extend_from_slice(pixels);
    write_maybe_gz(path, &bytes)
}

/// Writes labels as an IDX label file (gzip when `path` ends in `.gz`).
pub fn write_labels(path: &Path, labels: &[u8]) -> Result<(), DataError> {
    let mut bytes = header(LABELS_MAGIC, &[labels.len()]);
    bytes.extend_from_slice(labels);
    write_maybe_gz(path, &bytes)
}
