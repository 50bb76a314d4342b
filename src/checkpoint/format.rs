//! The three file formats on disk: reading them into named tensors with their
//! metadata, writing named tensors out, and telling a wrong, truncated or damaged file
//! apart before any weight is touched.
//!
//! - **burnpack** (`.bpk`, burn's native format): a 10-byte header (magic `NRUB`,
//!   version, metadata length), CBOR metadata (tensor descriptors and string
//!   key/values), then the tensor data, each tensor aligned to 256 bytes.
//! - **safetensors** (`.safetensors`): an 8-byte little-endian header length, a JSON
//!   header (tensor descriptors, `__metadata__` string key/values), then the packed
//!   tensor data.
//! - **PyTorch** (`.pth`, `.pt`, read only): `torch.save`'s zip archive of a pickled
//!   state dict (or the legacy pickle format), read in pure Rust by burn-store's reader.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use burn::store::burn_pack::{self, Tensor as PackTensor};
use burn::store::{bridge, pytorch_reader};
use burn::tensor::{BoolStore, Bytes, DType};
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorView};

use super::error::CheckpointError;
use crate::fsutil;

/// A checkpoint file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// burn's native format (`.bpk`).
    Burnpack,
    /// safetensors (`.safetensors`).
    Safetensors,
    /// A PyTorch `torch.save` file (`.pth`, `.pt`), read only.
    Pytorch,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Burnpack => "burnpack",
            Format::Safetensors => "safetensors",
            Format::Pytorch => "PyTorch",
        })
    }
}

impl Format {
    /// The format a file name's extension names (`.bpk`, `.safetensors`, `.pth`/`.pt`).
    pub fn from_extension(path: &Path) -> Option<Format> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "bpk" => Some(Format::Burnpack),
            "safetensors" => Some(Format::Safetensors),
            "pth" | "pt" => Some(Format::Pytorch),
            _ => None,
        }
    }

    /// The format of `path` among `allowed`, or an [`CheckpointError::UnknownFormat`]
    /// that lists them (`expected` in words).
    pub(crate) fn of(
        path: &Path,
        allowed: &[Format],
        expected: &'static str,
    ) -> Result<Format, CheckpointError> {
        Format::from_extension(path)
            .filter(|format| allowed.contains(format))
            .ok_or_else(|| CheckpointError::UnknownFormat {
                path: path.to_path_buf(),
                extension: path
                    .extension()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                expected,
            })
    }
}

/// A file read into memory: its tensors (data read lazily where the format allows) and
/// its string metadata.
pub(crate) struct RawFile {
    /// String key/values of the header (empty for PyTorch files).
    pub metadata: BTreeMap<String, String>,
    /// The tensors, by name.
    pub tensors: Vec<PackTensor>,
    /// Bytes on disk.
    pub file_size: u64,
}

impl RawFile {
    /// Values in all tensors (the shapes' products; each reader has checked them
    /// against the bytes the file holds).
    pub fn values(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum()
    }
}

fn io(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io {
        path,
        action,
        source,
    }
}

/// `bytes` as text for error messages: printable ASCII as is, the rest as hex.
fn show_bytes(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "nothing (the file is empty)".to_string();
    }
    if bytes.iter().all(|b| b.is_ascii_graphic()) {
        format!("'{}'", String::from_utf8_lossy(bytes))
    } else {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes {}", hex.join(" "))
    }
}

/// The first `n` bytes of a file (fewer if it is shorter) and its length.
fn head(path: &Path, n: usize) -> Result<(Vec<u8>, u64), CheckpointError> {
    let mut file = File::open(path).map_err(io(path, "open"))?;
    let len = file.metadata().map_err(io(path, "read"))?.len();
    let mut bytes = Vec::with_capacity(n);
    (&mut file)
        .take(n as u64)
        .read_to_end(&mut bytes)
        .map_err(io(path, "read"))?;
    Ok((bytes, len))
}

/// Reads a file of a known format.
pub(crate) fn read(path: &Path, format: Format) -> Result<RawFile, CheckpointError> {
    match format {
        Format::Burnpack => read_burnpack(path),
        Format::Safetensors => read_safetensors(path),
        Format::Pytorch => read_pytorch(path),
    }
}

/// Writes tensors and metadata in `format` (burnpack or safetensors), replacing the
/// file only once the new one is complete.
pub(crate) fn write(
    path: &Path,
    format: Format,
    tensors: Vec<PackTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    match format {
        Format::Burnpack => write_burnpack(path, tensors, metadata),
        Format::Safetensors => write_safetensors(path, tensors, metadata),
        Format::Pytorch => Err(CheckpointError::Unsupported(format!(
            "{}: writing PyTorch files is not supported; save as .bpk or .safetensors \
             (export --to dense-safetensors gives torchvision's keys and layouts)",
            path.display()
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// burnpack
// ---------------------------------------------------------------------------------------

/// How a burnpack file starts: the magic number `NRUB` (`0x4255524E` little-endian).
fn burnpack_magic() -> [u8; 4] {
    burn_pack::MAGIC_NUMBER.to_le_bytes()
}

fn read_burnpack(path: &Path) -> Result<RawFile, CheckpointError> {
    let format = Format::Burnpack;
    let header_size = burn_pack::HEADER_SIZE;
    let (head, len) = head(path, header_size)?;
    let magic = burnpack_magic();
    let prefix = head.len().min(magic.len());
    if head[..prefix] != magic[..prefix] || head.is_empty() {
        return Err(CheckpointError::WrongMagic {
            path: path.to_path_buf(),
            format,
            expected: show_bytes(&magic),
            found: show_bytes(&head[..head.len().min(8)]),
        });
    }
    if head.len() < header_size {
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            format,
            detail: format!("{len} bytes, shorter than the {header_size}-byte header"),
        });
    }
    let metadata_size = u32::from_le_bytes([head[6], head[7], head[8], head[9]]) as u64;
    if header_size as u64 + metadata_size > len {
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            format,
            detail: format!(
                "the header announces {metadata_size} bytes of metadata after its {header_size} \
                 bytes, but the file has {len} bytes"
            ),
        });
    }
    let reader =
        burn_pack::Reader::from_file_exact(path).map_err(|err| burnpack_error(path, err, len))?;
    let metadata = reader.metadata().clone();
    let tensors = reader
        .into_tensors()
        .map_err(|err| burnpack_error(path, err, len))?;
    Ok(RawFile {
        metadata,
        tensors,
        file_size: len,
    })
}

fn burnpack_error(path: &Path, err: burn_pack::Error, len: u64) -> CheckpointError {
    let format = Format::Burnpack;
    let path = path.to_path_buf();
    match err {
        burn_pack::Error::InvalidMagicNumber => CheckpointError::WrongMagic {
            path,
            format,
            expected: show_bytes(&burnpack_magic()),
            found: "something else".to_string(),
        },
        burn_pack::Error::ValidationError(detail) if detail.contains("truncated") => {
            CheckpointError::Truncated {
                path,
                format,
                detail,
            }
        }
        burn_pack::Error::InvalidHeader => CheckpointError::Truncated {
            path,
            format,
            detail: format!("{len} bytes end inside the header"),
        },
        other => CheckpointError::Corrupt {
            path,
            format,
            detail: other.to_string(),
        },
    }
}

fn write_burnpack(
    path: &Path,
    tensors: Vec<PackTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    let mut writer = burn_pack::Writer::new(tensors);
    for (key, value) in metadata {
        writer = writer.with_metadata(key, value);
    }
    let writer = writer.auto_extension(false).overwrite(true);
    fsutil::write_atomic_with(path, |temp| {
        writer
            .write_to_file_in_place(temp)
            .map_err(|err| std::io::Error::other(err.to_string()))
    })
    .map_err(io(path, "write"))
}

// ---------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------

fn read_safetensors(path: &Path) -> Result<RawFile, CheckpointError> {
    let format = Format::Safetensors;
    let (head, len) = head(path, 9)?;
    let expected = "an 8-byte little-endian header length and then '{'";
    if head.len() < 8 {
        return Err(if head.is_empty() {
            CheckpointError::WrongMagic {
                path: path.to_path_buf(),
                format,
                expected: expected.to_string(),
                found: show_bytes(&head),
            }
        } else {
            CheckpointError::Truncated {
                path: path.to_path_buf(),
                format,
                detail: format!("{len} bytes, shorter than the 8-byte header length"),
            }
        });
    }
    let header_len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if head.len() > 8 && head[8] != b'{' {
        return Err(CheckpointError::WrongMagic {
            path: path.to_path_buf(),
            format,
            expected: expected.to_string(),
            found: show_bytes(&head),
        });
    }
    if header_len > len.saturating_sub(8) {
        // A length beyond the file's own size is a cut file when the JSON header starts
        // where it should; anything else was rejected above.
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            format,
            detail: format!(
                "the header announces {header_len} bytes of JSON after its 8 bytes, but the \
                 file has {len} bytes"
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(io(path, "read"))?;
    let corrupt = |err: SafeTensorError| safetensors_error(path, err, len);
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    let archive = SafeTensors::deserialize(&bytes).map_err(corrupt)?;
    let mut tensors = Vec::new();
    for (name, view) in archive.tensors() {
        let dtype = burn_dtype(view.dtype()).ok_or_else(|| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            format,
            detail: format!(
                "tensor '{name}' has the unsupported type {:?}",
                view.dtype()
            ),
        })?;
        tensors.push(PackTensor::new(
            name.clone(),
            dtype,
            view.shape().to_vec(),
            None,
            Bytes::from_bytes_vec(view.data().to_vec()),
        ));
    }
    Ok(RawFile {
        metadata,
        tensors,
        file_size: len,
    })
}

fn safetensors_error(path: &Path, err: SafeTensorError, len: u64) -> CheckpointError {
    let format = Format::Safetensors;
    let path = path.to_path_buf();
    match err {
        SafeTensorError::MetadataIncompleteBuffer => CheckpointError::Truncated {
            path,
            format,
            detail: format!(
                "the tensors its header describes do not end where the file ({len} bytes) does"
            ),
        },
        other => CheckpointError::Corrupt {
            path,
            format,
            detail: other.to_string(),
        },
    }
}

fn burn_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U64 => DType::U64,
        Dtype::U32 => DType::U32,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool(BoolStore::Native),
        _ => return None,
    })
}

fn safetensors_dtype(dtype: DType) -> Option<Dtype> {
    Some(match dtype {
        DType::F64 => Dtype::F64,
        DType::F32 | DType::Flex32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U64 => Dtype::U64,
        DType::U32 => Dtype::U32,
        DType::U8 => Dtype::U8,
        DType::Bool(BoolStore::Native) => Dtype::BOOL,
        _ => return None,
    })
}

fn write_safetensors(
    path: &Path,
    tensors: Vec<PackTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    let write_err = |detail: String| CheckpointError::Io {
        path: path.to_path_buf(),
        action: "write",
        source: std::io::Error::other(detail),
    };
    let mut data = Vec::with_capacity(tensors.len());
    for tensor in tensors {
        let dtype = safetensors_dtype(tensor.dtype).ok_or_else(|| {
            CheckpointError::Unsupported(format!(
                "tensor '{}' has the type {:?}, which safetensors cannot hold",
                tensor.name, tensor.dtype
            ))
        })?;
        let name = tensor.name.clone();
        let shape = tensor.shape.to_vec();
        let bytes = tensor
            .into_bytes()
            .map_err(|err| write_err(format!("tensor '{name}': {err}")))?;
        data.push((name, dtype, shape, bytes));
    }
    let views = data
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|err| write_err(format!("tensor '{name}': {err}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata: HashMap<String, String> = metadata.clone().into_iter().collect();
    fsutil::write_atomic_with(path, |temp| {
        safetensors::serialize_to_file(views, Some(metadata), temp)
            .map_err(|err| std::io::Error::other(err.to_string()))
    })
    .map_err(io(path, "write"))
}

// ---------------------------------------------------------------------------------------
// PyTorch
// ---------------------------------------------------------------------------------------

/// The zip local-file signature `torch.save` files start with.
const ZIP_MAGIC: [u8; 4] = *b"PK\x03\x04";
/// The zip end-of-central-directory signature, near the end of every complete archive.
const ZIP_END: [u8; 4] = *b"PK\x05\x06";
/// The pickle protocol opcode legacy `torch.save` files start with.
const PICKLE_PROTO: u8 = 0x80;

/// `true` when the last bytes of the file hold a zip end-of-central-directory record
/// (at most 64 KiB of comment follow it).
fn has_zip_end(path: &Path, len: u64) -> Result<bool, CheckpointError> {
    let tail = len.min(22 + 65_535);
    let mut file = File::open(path).map_err(io(path, "open"))?;
    file.seek(SeekFrom::Start(len - tail))
        .map_err(io(path, "read"))?;
    let mut bytes = Vec::with_capacity(tail as usize);
    file.read_to_end(&mut bytes).map_err(io(path, "read"))?;
    Ok(bytes.windows(4).any(|w| w == ZIP_END))
}

fn read_pytorch(path: &Path) -> Result<RawFile, CheckpointError> {
    let format = Format::Pytorch;
    let (head, len) = head(path, 4)?;
    let zip = head == ZIP_MAGIC;
    if !zip && head.first() != Some(&PICKLE_PROTO) {
        return Err(CheckpointError::WrongMagic {
            path: path.to_path_buf(),
            format,
            expected: "a zip archive ('PK\\x03\\x04') or a pickle (byte 80)".to_string(),
            found: show_bytes(&head),
        });
    }
    if zip && !has_zip_end(path, len)? {
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            format,
            detail: format!(
                "its {len} bytes hold no zip end-of-central-directory record: the archive was cut"
            ),
        });
    }
    let reader = pytorch_reader::PytorchReader::new(path).map_err(|err| {
        let detail = err.to_string();
        if detail.contains("EOF") || detail.contains("eof") {
            CheckpointError::Truncated {
                path: path.to_path_buf(),
                format,
                detail,
            }
        } else {
            CheckpointError::Corrupt {
                path: path.to_path_buf(),
                format,
                detail,
            }
        }
    })?;
    let mut tensors: Vec<PackTensor> = reader
        .into_tensors()
        .into_values()
        .map(bridge::from_pytorch)
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    // A tensor is a view of a storage in the file; one that spans more bytes than the
    // whole file repeats its storage (a broadcast view), which a state dict has no use
    // for and which would materialize far more than the file holds.
    if let Some(tensor) = tensors.iter().find(|t| t.byte_len() as u64 > len) {
        return Err(CheckpointError::Corrupt {
            path: path.to_path_buf(),
            format,
            detail: format!(
                "tensor '{}' of shape {:?} spans {} bytes, more than the whole file ({len} \
                 bytes)",
                tensor.name,
                tensor.shape.to_vec(),
                tensor.byte_len()
            ),
        });
    }
    Ok(RawFile {
        metadata: BTreeMap::new(),
        tensors,
        file_size: len,
    })
}
