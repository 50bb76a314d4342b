//! ImageFolder: one directory per class, as torchvision's `ImageFolder` and the ImageNet
//! layout use.
//!
//! ```text
//! root/train/<class>/<image>.jpg|jpeg|png
//! root/val/<class>/<image>.jpg|jpeg|png      (root/test/ is accepted when val/ is absent)
//! ```
//!
//! Classes are the sub-directories of `train/`, sorted by name (byte order), so class
//! `i` is the `i`-th name as in torchvision; a validation split uses the training split's
//! classes (it may lack some, but may not have others), so labels agree across splits.
//! Files are found recursively under each class directory and sorted as torchvision
//! sorts them (directories by path, then file names); extensions are matched without
//! regard to case; other files are ignored. Images are decoded lazily, one per sample,
//! and converted to 8-bit RGB whatever their colour type.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{DataError, Image, ImageShape, Split};

/// Extensions (lower case) of the images an ImageFolder dataset reads.
pub const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// How deep [`scan`] looks for images below a class directory.
const MAX_DEPTH: usize = 16;

/// The samples of one split: image paths with their class indices, and the class names.
#[derive(Debug, Clone)]
pub(crate) struct Folder {
    pub samples: Vec<(PathBuf, u32)>,
    pub classes: Vec<String>,
}

/// The directory of `split` under `root`: `train/`, or `val/` (`test/` when there is no
/// `val/`).
pub fn split_dir(root: &Path, split: Split) -> PathBuf {
    match split {
        Split::Train => root.join("train"),
        Split::Test => {
            let val = root.join("val");
            let test = root.join("test");
            if !val.is_dir() && test.is_dir() {
                test
            } else {
                val
            }
        }
    }
}

/// Sorted names of the sub-directories of `dir`.
fn class_dirs(dir: &Path) -> Result<Vec<String>, DataError> {
    if !dir.is_dir() {
        return Err(DataError::MissingDir {
            path: dir.to_path_buf(),
        });
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|err| DataError::io(dir, err))? {
        let entry = entry.map_err(|err| DataError::io(dir, err))?;
        if entry.path().is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(DataError::NoClasses {
            path: dir.to_path_buf(),
        });
    }
    Ok(names)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|ext| ext.to_str())
        .is_some_and(|ext| EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

/// Appends `(directory, sorted image files)` for `dir` and every directory below it.
fn walk(
    dir: &Path,
    depth: usize,
    out: &mut Vec<(OsString, Vec<PathBuf>)>,
) -> Result<(), DataError> {
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|err| DataError::io(dir, err))? {
        let path = entry.map_err(|err| DataError::io(dir, err))?.path();
        if path.is_dir() {
            subdirs.push(path);
        } else if is_image(&path) && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    out.push((dir.as_os_str().to_os_string(), files));
    if depth < MAX_DEPTH {
        for sub in subdirs {
            walk(&sub, depth + 1, out)?;
        }
    }
    Ok(())
}

/// Lists the samples of `split` under `root`.
pub(crate) fn scan(root: &Path, split: Split) -> Result<Folder, DataError> {
    if !root.is_dir() {
        return Err(DataError::MissingDir {
            path: root.to_path_buf(),
        });
    }
    let dir = split_dir(root, split);
    let train = split_dir(root, Split::Train);
    // Class indices come from the training split, so both splits agree on them.
    let classes = if split == Split::Test && !train.is_dir() {
        class_dirs(&dir)?
    } else {
        class_dirs(&train)?
    };
    let present = class_dirs(&dir)?;
    let mut samples = Vec::new();
    for name in &present {
        let class_dir = dir.join(name);
        let label = classes
            .binary_search(name)
            .map_err(|_| DataError::UnknownClass {
                path: class_dir.clone(),
                class: name.clone(),
                num_classes: classes.len(),
            })?;
        let mut found = Vec::new();
        walk(&class_dir, 0, &mut found)?;
        // As torchvision: directories in path order, then files by name.
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let before = samples.len();
        samples.extend(
            found
                .into_iter()
                .flat_map(|(_, files)| files)
                .map(|path| (path, label as u32)),
        );
        if samples.len() == before {
            return Err(DataError::EmptyClass { path: class_dir });
        }
    }
    Ok(Folder { samples, classes })
}

/// Most pixels on either side of an image this crate decodes (and of any image a
/// [`Transform`](super::Transform) step produces): larger images are refused from their
/// header, before any pixel is decoded.
pub const MAX_IMAGE_SIDE: usize = 16_384;

/// Most bytes a decoder may allocate for one image (an RGBA image of
/// [`MAX_IMAGE_SIDE`]² pixels).
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

/// Decodes the image at `path` (JPEG or PNG, told by its content) as 8-bit RGB.
pub fn decode(path: &Path) -> Result<Image, DataError> {
    decode_image(path, 3)
}

/// Decodes the image at `path` (JPEG or PNG, told by its content) as 8-bit grey
/// (`channels` 1, the image's luma) or RGB (`channels` 3). Its dimensions are read from
/// its header first: an empty image, or one with a side above [`MAX_IMAGE_SIDE`], is
/// refused before decoding, and the decoder may allocate at most [`MAX_DECODE_BYTES`].
pub fn decode_image(path: &Path, channels: usize) -> Result<Image, DataError> {
    let bad = |reason: String| DataError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    if !matches!(channels, 1 | 3) {
        return Err(DataError::Unsupported(format!(
            "decoding images to {channels} channels (1: grey, 3: RGB)"
        )));
    }
    // The header alone gives the dimensions (and allocates nothing); the decoder then
    // runs under limits.
    let reader = |limits: Option<image::Limits>| -> Result<image::ImageReader<_>, DataError> {
        let mut reader = image::ImageReader::open(path)
            .map_err(|err| DataError::io(path, err))?
            .with_guessed_format()
            .map_err(|err| DataError::io(path, err))?;
        match limits {
            Some(limits) => reader.limits(limits),
            None => reader.no_limits(),
        }
        Ok(reader)
    };
    let decode_error = |source| DataError::Decode {
        path: path.to_path_buf(),
        source,
    };
    let (width, height) = reader(None)?.into_dimensions().map_err(decode_error)?;
    if width == 0 || height == 0 {
        return Err(bad(format!("image of {width}x{height} pixels")));
    }
    if width as usize > MAX_IMAGE_SIDE || height as usize > MAX_IMAGE_SIDE {
        return Err(bad(format!(
            "image of {width}x{height} pixels, above the limit of {MAX_IMAGE_SIDE} pixels a side"
        )));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE as u32);
    limits.max_image_height = Some(MAX_IMAGE_SIDE as u32);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let decoded = reader(Some(limits))?.decode().map_err(decode_error)?;
    if (decoded.width(), decoded.height()) != (width, height) {
        return Err(bad(format!(
            "the header says {width}x{height} pixels, the decoder gave {}x{}",
            decoded.width(),
            decoded.height()
        )));
    }
    let shape = ImageShape::new(channels, height as usize, width as usize);
    let pixels = if channels == 1 {
        decoded.into_luma8().into_raw()
    } else {
        decoded.into_rgb8().into_raw()
    };
    Ok(Image::new(shape, pixels).expect("a decoded image holds its channels per pixel"))
}
