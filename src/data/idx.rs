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
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::{Compression, GzBuilder};

use super::folder::MAX_IMAGE_SIDE;
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

/// Most bytes of values one IDX file may hold (uncompressed): far above any dataset in
/// the format (EMNIST's largest file holds 0.55 GB), and a bound on what a crafted
/// header or a gzip bomb can make the reader hold.
pub const MAX_IDX_BYTES: u64 = 1 << 32;

/// The gzip magic bytes.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// An IDX file being read: raw, or decompressed as it is read.
struct IdxReader {
    path: PathBuf,
    reader: Box<dyn Read>,
    gzip: bool,
    /// The file's size on disk.
    file_size: u64,
}

impl IdxReader {
    fn open(path: &Path) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|err| DataError::io(path, err))?;
        let file_size = file
            .metadata()
            .map_err(|err| DataError::io(path, err))?
            .len();
        let mut file = BufReader::new(file);
        let gzip = file
            .fill_buf()
            .map_err(|err| DataError::io(path, err))?
            .starts_with(&GZIP_MAGIC);
        let reader: Box<dyn Read> = if gzip {
            Box::new(MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        Ok(IdxReader {
            path: path.to_path_buf(),
            reader,
            gzip,
            file_size,
        })
    }

    fn error(&self, err: std::io::Error) -> DataError {
        if !self.gzip {
            return DataError::io(&self.path, err);
        }
        DataError::Gzip {
            path: self.path.clone(),
            reason: match err.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    "the compressed stream ends early (truncated file?)".to_string()
                }
                _ => err.to_string(),
            },
        }
    }

    /// Up to `len` more bytes: fewer only where the data ends.
    fn read_up_to(&mut self, len: u64) -> Result<Vec<u8>, DataError> {
        // Grown as the data arrives, never reserved from `len`: a header may promise
        // more than the file holds.
        let mut bytes = Vec::new();
        match (&mut self.reader).take(len).read_to_end(&mut bytes) {
            Ok(_) => Ok(bytes),
            Err(err) => Err(self.error(err)),
        }
    }

    /// Counts the bytes left, up to [`MAX_IDX_BYTES`], holding none of them; reading
    /// a gzip stream to its end also checks its checksum.
    fn count_rest(&mut self) -> Result<u64, DataError> {
        match std::io::copy(
            &mut (&mut self.reader).take(MAX_IDX_BYTES),
            &mut std::io::sink(),
        ) {
            Ok(count) => Ok(count),
            Err(err) => Err(self.error(err)),
        }
    }

    /// What a short or long file is measured in: its size on disk, or its
    /// decompressed size.
    fn what(&self, what: String) -> String {
        if self.gzip {
            format!("{what} (decompressed)")
        } else {
            what
        }
    }
}

/// Reads an IDX file of unsigned bytes: its header (checking the magic number, and the
/// dimensions with `check_dims`, which says what is wrong), then exactly the values the
/// header promises. A file that ends early or goes on after them is refused, as is a
/// header promising more than [`MAX_IDX_BYTES`]; a raw file's size is checked before
/// its values are read.
fn read_idx(
    path: &Path,
    magic: u32,
    what: &'static str,
    file_kind: &'static str,
    check_dims: impl Fn(&[usize]) -> Option<String>,
) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let mut file = IdxReader::open(path)?;
    let ndim = (magic & 0xff) as usize;
    let header_len = 4 + 4 * ndim as u64;
    let head = file.read_up_to(header_len)?;
    if head.len() < 4 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: file.what("the IDX magic number".to_string()),
            expected: 4,
            found: head.len() as u64,
        });
    }
    let word = |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let found = word(0);
    if found != magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            found,
            expected: magic,
            what,
        });
    }
    if (head.len() as u64) < header_len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: file.what(format!("the IDX header ({ndim} dimensions)")),
            expected: header_len,
            found: head.len() as u64,
        });
    }
    let dims: Vec<usize> = (0..ndim).map(|d| word(4 + 4 * d) as usize).collect();
    if let Some(reason) = check_dims(&dims) {
        return Err(DataError::BadHeader {
            path: path.to_path_buf(),
            reason,
        });
    }
    let shape = dims
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x");
    let values = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&values| values <= MAX_IDX_BYTES)
        .ok_or_else(|| DataError::BadHeader {
            path: path.to_path_buf(),
            reason: format!("{shape} values, more than the limit of {MAX_IDX_BYTES} bytes"),
        })?;
    let expected = header_len + values;
    let values_what = file.what(format!("the header and {shape} values"));
    let short = |found: u64| DataError::Truncated {
        path: path.to_path_buf(),
        what: values_what.clone(),
        expected,
        found,
    };
    let long = |found: u64| DataError::TrailingBytes {
        path: path.to_path_buf(),
        what: file_kind,
        expected,
        found,
    };
    if !file.gzip && file.file_size < expected {
        return Err(short(file.file_size));
    }
    if !file.gzip && file.file_size > expected {
        return Err(long(file.file_size));
    }
    let data = file.read_up_to(values)?;
    if (data.len() as u64) < values {
        return Err(short(header_len + data.len() as u64));
    }
    let rest = file.count_rest()?;
    if rest > 0 {
        return Err(long(expected + rest));
    }
    Ok((dims, data))
}

/// Reads an IDX image file (`[n, rows, cols]` unsigned bytes), raw or gzip.
pub fn read_images(path: &Path) -> Result<IdxImages, DataError> {
    let (dims, pixels) = read_idx(
        path,
        IMAGES_MAGIC,
        "unsigned bytes, 3 dimensions: images",
        "IDX image file",
        |dims| {
            let (rows, cols) = (dims[1], dims[2]);
            (rows == 0 || cols == 0 || rows.max(cols) > MAX_IMAGE_SIDE).then(|| {
                format!("images of {rows}x{cols} pixels (sides from 1 to {MAX_IMAGE_SIDE})")
            })
        },
    )?;
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    Ok(IdxImages {
        shape: ImageShape::new(1, rows, cols),
        count,
        pixels,
    })
}

/// Reads an IDX label file (`[n]` unsigned bytes), raw or gzip.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let (_, labels) = read_idx(
        path,
        LABELS_MAGIC,
        "unsigned bytes, 1 dimension: labels",
        "IDX label file",
        |_| None,
    )?;
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
    if image == 0 || !pixels.len().is_multiple_of(image) {
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
