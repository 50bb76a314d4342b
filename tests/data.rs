//! The data layer on small files written here (IDX, CIFAR, ImageFolder; valid and
//! corrupt), the transforms, the loader's determinism and resume, the shipped
//! Fashion-MNIST sample, and the real Fashion-MNIST when installed.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use flate2::write::GzEncoder;
use flate2::Compression;
use tempfile::TempDir;
use versatile::data::folder::MAX_IMAGE_SIDE;
use versatile::data::share;
use versatile::data::{
    DataError, Dataset, DatasetKind, HostBatch, Image, ImageShape, Loader, LoaderConfig, Normalize,
    Position, Split, Step, Transform, IDX_CLASS_NAMES,
};

use crate::support;

// ---------------------------------------------------------------------------------------
// File writers (independent of the library's own writer)
// ---------------------------------------------------------------------------------------

fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Pixel `p` of image `i` of a synthetic IDX set: distinct across images and positions.
fn synthetic_pixel(i: usize, p: usize) -> u8 {
    ((i * 31 + p * 7) % 251) as u8
}

/// Writes an IDX pair for `split` into `dir`: `count` images of `rows x cols`,
/// labels `i % classes`.
fn write_idx(dir: &Path, prefix: &str, count: usize, rows: usize, cols: usize, gz: bool) {
    let classes = 10;
    let pixels: Vec<u8> = (0..count)
        .flat_map(|i| (0..rows * cols).map(move |p| synthetic_pixel(i, p)))
        .collect();
    let labels: Vec<u8> = (0..count).map(|i| (i % classes) as u8).collect();
    let images = idx_bytes(0x803, &[count as u32, rows as u32, cols as u32], &pixels);
    let labels = idx_bytes(0x801, &[count as u32], &labels);
    let (images, labels, ext) = if gz {
        (gzip(&images), gzip(&labels), ".gz")
    } else {
        (images, labels, "")
    };
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte{ext}")), images).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")), labels).unwrap();
}

fn idx_dir(count: usize, gz: bool) -> TempDir {
    let dir = TempDir::new().unwrap();
    write_idx(dir.path(), "train", count, 28, 28, gz);
    write_idx(dir.path(), "t10k", count / 2, 28, 28, gz);
    dir
}

fn open_err(kind: DatasetKind, path: &Path, split: Split) -> DataError {
    Dataset::open(kind, path, split).expect_err("opening should fail")
}

// ---------------------------------------------------------------------------------------
// IDX
// ---------------------------------------------------------------------------------------

#[test]
fn idx_raw_and_gzip_read_the_same_samples() {
    for gz in [false, true] {
        let dir = TempDir::new().unwrap();
        write_idx(dir.path(), "train", 23, 5, 4, gz);
        write_idx(dir.path(), "t10k", 7, 5, 4, gz);
        let train = Dataset::open(DatasetKind::Idx, dir.path(), Split::Train).unwrap();
        let test = Dataset::open(DatasetKind::Idx, dir.path(), Split::Test).unwrap();
        assert_eq!((train.len(), test.len()), (23, 7));
        assert_eq!(train.image_shape(), Some(ImageShape::new(1, 5, 4)));
        assert_eq!(train.channels(), 1);
        assert_eq!(train.num_classes(), 10);
        assert_eq!(test.num_classes(), 7, "labels 0..6: max + 1");
        for i in [0, 13, 22] {
            let image = train.image(i).unwrap();
            assert_eq!(image.shape(), ImageShape::new(1, 5, 4));
            for p in 0..20 {
                assert_eq!(image.get(p / 4, p % 4, 0), synthetic_pixel(i, p));
            }
            assert_eq!(train.labels()[i], (i % 10) as u32);
        }
        assert!(matches!(
            train.image(23),
            Err(DataError::IndexOutOfRange { index: 23, len: 23 })
        ));
        assert_eq!(DatasetKind::detect(dir.path()).unwrap(), DatasetKind::Idx);
    }
}

#[test]
fn idx_class_names_file_declares_the_classes() {
    let dir = TempDir::new().unwrap();
    write_idx(dir.path(), "train", 23, 5, 4, true);
    write_idx(dir.path(), "t10k", 7, 5, 4, true);
    let names: Vec<String> = (0..10).map(|i| format!("class name {i}")).collect();
    std::fs::write(dir.path().join(IDX_CLASS_NAMES), names.join("\n") + "\n\n").unwrap();
    // Both splits take the names, the test split although its labels stop at 6.
    for (split, len) in [(Split::Train, 23), (Split::Test, 7)] {
        let data = Dataset::open(DatasetKind::Idx, dir.path(), split).unwrap();
        assert_eq!(data.len(), len);
        assert_eq!(data.num_classes(), 10);
        assert_eq!(data.class_names(), Some(names.as_slice()));
    }
    // Fewer names than the labels need: the first label beyond them is named.
    std::fs::write(dir.path().join(IDX_CLASS_NAMES), "a\nb\nc\n").unwrap();
    match open_err(DatasetKind::Idx, dir.path(), Split::Train) {
        DataError::LabelOutOfRange {
            index,
            label,
            num_classes,
            ..
        } => assert_eq!((index, label, num_classes), (3, 3, 3)),
        other => panic!("expected LabelOutOfRange, got {other}"),
    }
    // Without the file there are no names and the labels decide the class count.
    std::fs::remove_file(dir.path().join(IDX_CLASS_NAMES)).unwrap();
    let data = Dataset::open(DatasetKind::Idx, dir.path(), Split::Test).unwrap();
    assert_eq!((data.num_classes(), data.class_names()), (7, None));
}

#[test]
fn idx_accepts_the_dotted_file_names() {
    let dir = TempDir::new().unwrap();
    write_idx(dir.path(), "train", 4, 2, 2, false);
    std::fs::rename(
        dir.path().join("train-images-idx3-ubyte"),
        dir.path().join("train-images.idx3-ubyte"),
    )
    .unwrap();
    let train = Dataset::open(DatasetKind::Idx, dir.path(), Split::Train).unwrap();
    assert_eq!(train.len(), 4);
}

#[test]
fn idx_missing_directory_and_files_are_named() {
    let missing = Path::new("/nonexistent/versatile-data");
    let err = open_err(DatasetKind::Idx, missing, Split::Train);
    assert!(
        matches!(&err, DataError::MissingDir { path } if path == missing),
        "{err}"
    );
    assert!(err.to_string().contains("/nonexistent/versatile-data"));

    let dir = TempDir::new().unwrap();
    write_idx(dir.path(), "train", 4, 2, 2, true);
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Test);
    assert!(
        matches!(
            &err,
            DataError::MissingFile {
                what: "test images",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("t10k-images-idx3-ubyte"), "{err}");
    std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte.gz")).unwrap();
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    assert!(
        matches!(
            &err,
            DataError::MissingFile {
                what: "training labels",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn idx_wrong_magic_is_reported_with_both_numbers() {
    let dir = TempDir::new().unwrap();
    write_idx(dir.path(), "train", 4, 2, 2, false);
    // A label file where the images should be.
    let labels = std::fs::read(dir.path().join("train-labels-idx1-ubyte")).unwrap();
    let images = dir.path().join("train-images-idx3-ubyte");
    std::fs::write(&images, labels).unwrap();
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    match &err {
        DataError::BadMagic {
            path,
            found,
            expected,
            ..
        } => {
            assert_eq!(path, &images);
            assert_eq!((*found, *expected), (0x801, 0x803));
        }
        other => panic!("expected BadMagic, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("0x00000801") && message.contains("0x00000803"),
        "{message}"
    );
    assert!(message.contains("train-images-idx3-ubyte"), "{message}");
}

#[test]
fn idx_truncated_and_oversized_files_are_rejected() {
    let dir = TempDir::new().unwrap();
    write_idx(dir.path(), "train", 4, 3, 3, false);
    let path = dir.path().join("train-images-idx3-ubyte");
    let full = std::fs::read(&path).unwrap();
    assert_eq!(full.len(), 16 + 36);

    std::fs::write(&path, &full[..full.len() - 5]).unwrap();
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    assert!(
        matches!(&err, DataError::Truncated { path: p, expected: 52, found: 47, .. } if p == &path),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");

    std::fs::write(&path, &full[..10]).unwrap();
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    assert!(
        matches!(
            &err,
            DataError::Truncated {
                expected: 16,
                found: 10,
                ..
            }
        ),
        "{err}"
    );

    let mut longer = full.clone();
    longer.extend_from_slice(&[0; 9]);
    std::fs::write(&path, &longer).unwrap();
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    assert!(
        matches!(
            &err,
            DataError::TrailingBytes {
                expected: 52,
                found: 61,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn idx_truncated_and_corrupt_gzip_are_rejected() {
    let dir = TempDir::new().unwrap();
    write_idx(dir.path(), "train", 50, 28, 28, true);
    let path = dir.path().join("train-images-idx3-ubyte.gz");
    let full = std::fs::read(&path).unwrap();

    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    assert!(
        matches!(&err, DataError::Gzip { path: p, .. } if p == &path),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");

    let mut corrupt = full.clone();
    let middle = corrupt.len() / 2;
    for byte in &mut corrupt[middle..middle + 16] {
        *byte ^= 0x5a;
    }
    std::fs::write(&path, &corrupt).unwrap();
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    assert!(matches!(&err, DataError::Gzip { .. }), "{err}");
}

#[test]
fn idx_gzip_holding_more_or_less_than_its_header_is_rejected() {
    let dir = TempDir::new().unwrap();
    write_idx(dir.path(), "train", 3, 4, 4, true);
    let path = dir.path().join("train-images-idx3-ubyte.gz");
    let pixels: Vec<u8> = (0..48).map(|p| p as u8).collect();

    // 8 MiB of zeros after the values, compressed to a few KiB: read no further than
    // counting them.
    let mut long = idx_bytes(0x803, &[3, 4, 4], &pixels);
    long.resize(long.len() + (8 << 20), 0);
    std::fs::write(&path, gzip(&long)).unwrap();
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    assert!(
        matches!(&err, DataError::TrailingBytes { expected: 64, found, .. } if *found == 64 + (8 << 20)),
        "{err}"
    );

    // A header promising 4 x 10^9 images of 1 pixel, a stream of 48: refused once the
    // stream ends, without reserving what the header promised.
    let short = idx_bytes(0x803, &[4_000_000_000, 1, 1], &pixels);
    std::fs::write(&path, gzip(&short)).unwrap();
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    assert!(
        matches!(
            &err,
            DataError::Truncated {
                expected: 4_000_000_016,
                found: 64,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("(decompressed)"), "{err}");

    // Beyond the limit on what one file may hold, and images too large to transform:
    // refused from the header alone.
    for dims in [[u32::MAX, 2, 1], [1, 1, 100_000]] {
        std::fs::write(&path, gzip(&idx_bytes(0x803, &dims, &[]))).unwrap();
        let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
        assert!(
            matches!(&err, DataError::BadHeader { .. }),
            "{dims:?}: {err}"
        );
    }
}

#[test]
fn idx_image_and_label_counts_must_agree() {
    let dir = TempDir::new().unwrap();
    write_idx(dir.path(), "train", 6, 2, 2, true);
    let labels = idx_bytes(0x801, &[5], &[0, 1, 2, 3, 4]);
    std::fs::write(dir.path().join("train-labels-idx1-ubyte.gz"), gzip(&labels)).unwrap();
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    assert!(
        matches!(
            &err,
            DataError::CountMismatch {
                num_images: 6,
                num_labels: 5,
                ..
            }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("6 images") && message.contains("5 labels"),
        "{message}"
    );
}

#[test]
fn idx_empty_file_is_rejected() {
    let dir = TempDir::new().unwrap();
    write_idx(dir.path(), "train", 0, 2, 2, false);
    let err = open_err(DatasetKind::Idx, dir.path(), Split::Train);
    assert!(matches!(&err, DataError::Empty { .. }), "{err}");
}

#[test]
fn idx_writer_round_trips() {
    let source = idx_dir(30, false);
    let train = Dataset::open(DatasetKind::Idx, source.path(), Split::Train).unwrap();
    let subset = train.subset(&[3, 1, 4, 1, 5]).unwrap();
    let out = TempDir::new().unwrap();
    subset.write_idx(out.path()).unwrap();
    let back = Dataset::open(DatasetKind::Idx, out.path(), Split::Train).unwrap();
    assert_eq!(back.len(), 5);
    assert_eq!(back.labels(), &[3, 1, 4, 1, 5]);
    for (k, &i) in [3usize, 1, 4, 1, 5].iter().enumerate() {
        assert_eq!(back.image(k).unwrap(), train.image(i).unwrap());
    }
    // The writer's output is byte-for-byte reproducible.
    let again = TempDir::new().unwrap();
    subset.write_idx(again.path()).unwrap();
    for name in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"] {
        assert_eq!(
            std::fs::read(out.path().join(name)).unwrap(),
            std::fs::read(again.path().join(name)).unwrap()
        );
    }
}

// ---------------------------------------------------------------------------------------
// CIFAR
// ---------------------------------------------------------------------------------------

/// A CIFAR record: label bytes then the three colour planes; pixel (r, c) of plane k
/// holds `(seed + 3 * (r * 32 + c) + k) % 256`.
fn cifar_record(labels: &[u8], seed: usize) -> Vec<u8> {
    let mut out = labels.to_vec();
    for k in 0..3 {
        for p in 0..1024 {
            out.push(((seed + 3 * p + k) % 256) as u8);
        }
    }
    out
}

fn write_cifar10(dir: &Path) {
    for b in 1..=5 {
        let bytes: Vec<u8> = (0..2)
            .flat_map(|r| cifar_record(&[((b * 2 + r) % 10) as u8], b * 10 + r))
            .collect();
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    let test: Vec<u8> = (0..3)
        .flat_map(|r| cifar_record(&[9 - r as u8], 100 + r))
        .collect();
    std::fs::write(dir.join("test_batch.bin"), test).unwrap();
    let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
    std::fs::write(dir.join("batches.meta.txt"), names).unwrap();
}

#[test]
fn cifar10_reads_planes_as_rgb_pixels() {
    let root = TempDir::new().unwrap();
    // The archive's own sub-directory, found from its parent.
    let dir = root.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&dir).unwrap();
    write_cifar10(&dir);
    assert_eq!(
        DatasetKind::detect(root.path()).unwrap(),
        DatasetKind::Cifar10
    );
    let train = Dataset::open(DatasetKind::Cifar10, root.path(), Split::Train).unwrap();
    let test = Dataset::open(DatasetKind::Cifar10, root.path(), Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (10, 3));
    assert_eq!(train.image_shape(), Some(ImageShape::new(3, 32, 32)));
    assert_eq!(train.num_classes(), 10);
    assert_eq!(train.class_names().unwrap()[3], "cat");
    // Sample 5 is record 1 of data_batch_3.
    assert_eq!(train.labels()[5], 7);
    let image = train.image(5).unwrap();
    for (r, c) in [(0, 0), (5, 17), (31, 31)] {
        for k in 0..3 {
            assert_eq!(
                image.get(r, c, k),
                ((31 + 3 * (r * 32 + c) + k) % 256) as u8
            );
        }
    }
    assert_eq!(test.labels(), &[9, 8, 7]);
}

#[test]
fn cifar100_uses_fine_labels_and_checks_ranges() {
    let dir = TempDir::new().unwrap();
    let train: Vec<u8> = [(3u8, 42u8), (19, 99), (0, 0)]
        .iter()
        .enumerate()
        .flat_map(|(i, &(coarse, fine))| cifar_record(&[coarse, fine], i))
        .collect();
    std::fs::write(dir.path().join("train.bin"), &train).unwrap();
    std::fs::write(dir.path().join("test.bin"), cifar_record(&[1, 7], 9)).unwrap();
    assert_eq!(
        DatasetKind::detect(dir.path()).unwrap(),
        DatasetKind::Cifar100
    );
    let set = Dataset::open(DatasetKind::Cifar100, dir.path(), Split::Train).unwrap();
    assert_eq!(set.labels(), &[42, 99, 0]);
    assert_eq!(set.num_classes(), 100);
    assert_eq!(set.image(1).unwrap().get(0, 0, 2), 3);

    let bad: Vec<u8> = cifar_record(&[2, 100], 0);
    std::fs::write(dir.path().join("test.bin"), bad).unwrap();
    let err = open_err(DatasetKind::Cifar100, dir.path(), Split::Test);
    assert!(
        matches!(
            &err,
            DataError::LabelOutOfRange {
                label: 100,
                num_classes: 100,
                index: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("test.bin"), "{err}");
}

#[test]
fn cifar_size_and_missing_files_are_reported() {
    let dir = TempDir::new().unwrap();
    write_cifar10(dir.path());
    let path = dir.path().join("data_batch_2.bin");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = open_err(DatasetKind::Cifar10, dir.path(), Split::Train);
    assert!(
        matches!(&err, DataError::RecordSize { path: p, size: 6046, record: 3073 } if p == &path),
        "{err}"
    );
    assert!(err.to_string().contains("data_batch_2.bin"), "{err}");

    std::fs::remove_file(&path).unwrap();
    let err = open_err(DatasetKind::Cifar10, dir.path(), Split::Train);
    assert!(matches!(&err, DataError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("data_batch_2.bin"), "{err}");
    // The test split does not need the training files.
    assert_eq!(
        Dataset::open(DatasetKind::Cifar10, dir.path(), Split::Test)
            .unwrap()
            .len(),
        3
    );
    // CIFAR-100 files are not there.
    let err = open_err(DatasetKind::Cifar100, dir.path(), Split::Train);
    assert!(matches!(&err, DataError::MissingFile { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------
// ImageFolder
// ---------------------------------------------------------------------------------------

/// An RGB image whose pixel (x, y) is (x * 10, y * 10, 200).
fn gradient(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 10) as u8, 200])
    })
}

/// `root/train/{dog,cat}` and `root/val/{cat,dog}` with PNG (RGB and grey) and JPEG.
fn write_folder(root: &Path) {
    for (split, count) in [("train", 3), ("val", 1)] {
        for class in ["dog", "cat"] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..count {
                gradient(20 + i, 12)
                    .save(dir.join(format!("img{i}.png")))
                    .unwrap();
            }
            std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
        }
    }
    let cat = root.join("train/cat");
    gradient(16, 16).save(cat.join("photo.JPG")).unwrap();
    image::GrayImage::from_pixel(8, 6, image::Luma([77]))
        .save(cat.join("grey.png"))
        .unwrap();
    std::fs::create_dir_all(cat.join("more")).unwrap();
    gradient(9, 9).save(cat.join("more/deep.jpeg")).unwrap();
}

#[test]
fn image_folder_sorts_classes_and_decodes_png_and_jpeg() {
    let root = TempDir::new().unwrap();
    write_folder(root.path());
    assert_eq!(
        DatasetKind::detect(root.path()).unwrap(),
        DatasetKind::ImageFolder
    );
    let train = Dataset::open(DatasetKind::ImageFolder, root.path(), Split::Train).unwrap();
    assert_eq!(train.class_names().unwrap(), &["cat", "dog"]);
    assert_eq!(train.num_classes(), 2);
    assert_eq!(train.image_shape(), None);
    assert_eq!(train.channels(), 3);
    // cat: grey.png img0..2.png photo.JPG, then more/deep.jpeg; dog: img0..2.png.
    let names: Vec<String> = (0..train.len())
        .map(|i| {
            let path = train.path(i).unwrap();
            path.strip_prefix(root.path().join("train"))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "cat/grey.png",
            "cat/img0.png",
            "cat/img1.png",
            "cat/img2.png",
            "cat/photo.JPG",
            "cat/more/deep.jpeg",
            "dog/img0.png",
            "dog/img1.png",
            "dog/img2.png",
        ]
    );
    assert_eq!(train.labels(), &[0, 0, 0, 0, 0, 0, 1, 1, 1]);

    let png = train.image(2).unwrap();
    assert_eq!(png.shape(), ImageShape::new(3, 12, 21));
    assert_eq!(
        [png.get(3, 5, 0), png.get(3, 5, 1), png.get(3, 5, 2)],
        [50, 30, 200]
    );
    let grey = train.image(0).unwrap();
    assert_eq!(grey.shape(), ImageShape::new(3, 6, 8));
    assert_eq!(
        [grey.get(2, 2, 0), grey.get(2, 2, 1), grey.get(2, 2, 2)],
        [77, 77, 77]
    );
    let jpeg = train.image(4).unwrap();
    assert_eq!(jpeg.shape(), ImageShape::new(3, 16, 16));
    assert!(
        (jpeg.get(8, 8, 2) as i32 - 200).abs() <= 8,
        "JPEG is lossy, not wrong"
    );

    let val = Dataset::open(DatasetKind::ImageFolder, root.path(), Split::Test).unwrap();
    assert_eq!(val.labels(), &[0, 1]);
}

#[test]
fn image_folder_errors_name_the_directory_or_file() {
    let root = TempDir::new().unwrap();
    write_folder(root.path());

    // An undecodable image: opening (a listing) works, decoding it fails.
    let broken = root.path().join("train/dog/img1.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    let train = Dataset::open(DatasetKind::ImageFolder, root.path(), Split::Train).unwrap();
    let err = train.image(7).unwrap_err();
    assert!(
        matches!(&err, DataError::Decode { path, .. } if path == &broken),
        "{err}"
    );
    assert!(err.to_string().contains("img1.png"), "{err}");

    // The loader reports it and ends the epoch.
    let loader = Loader::new(
        train,
        Transform::imagenet_eval(8, 8),
        LoaderConfig::new(4).with_shuffle(false).with_threads(2),
    )
    .unwrap();
    let results: Vec<_> = loader.resume_host(Position::default()).unwrap().collect();
    assert_eq!(
        results.len(),
        2,
        "batch 0 fine, batch 1 holds the broken file"
    );
    assert!(results[0].is_ok());
    assert!(matches!(&results[1], Err(DataError::Decode { path, .. }) if path == &broken));

    // A class unknown to the training split.
    std::fs::create_dir_all(root.path().join("val/bird")).unwrap();
    gradient(4, 4)
        .save(root.path().join("val/bird/b.png"))
        .unwrap();
    let err = open_err(DatasetKind::ImageFolder, root.path(), Split::Test);
    assert!(
        matches!(&err, DataError::UnknownClass { class, num_classes: 2, .. } if class == "bird"),
        "{err}"
    );

    // An empty class directory.
    std::fs::create_dir_all(root.path().join("train/eel")).unwrap();
    let err = open_err(DatasetKind::ImageFolder, root.path(), Split::Train);
    assert!(
        matches!(&err, DataError::EmptyClass { path } if path.ends_with("train/eel")),
        "{err}"
    );

    // A missing split directory.
    let other = TempDir::new().unwrap();
    std::fs::create_dir_all(other.path().join("train/a")).unwrap();
    gradient(4, 4)
        .save(other.path().join("train/a/x.png"))
        .unwrap();
    let err = open_err(DatasetKind::ImageFolder, other.path(), Split::Test);
    assert!(
        matches!(&err, DataError::MissingDir { path } if path.ends_with("val")),
        "{err}"
    );
    // A split without class directories.
    std::fs::create_dir_all(other.path().join("val")).unwrap();
    let err = open_err(DatasetKind::ImageFolder, other.path(), Split::Test);
    assert!(matches!(&err, DataError::NoClasses { .. }), "{err}");
}

#[test]
fn images_beyond_the_size_limit_are_refused_from_their_header() {
    let root = TempDir::new().unwrap();
    write_folder(root.path());
    // img1.png's header patched to announce 100000 x 12 pixels: refused before any
    // pixel is decoded, with both numbers and the limit.
    let patched = root.path().join("train/dog/img1.png");
    let png = std::fs::read(&patched).unwrap();
    std::fs::write(&patched, support::png::with_size(&png, 100_000, 12)).unwrap();
    let train = Dataset::open(DatasetKind::ImageFolder, root.path(), Split::Train).unwrap();
    let err = train.image(7).unwrap_err();
    assert!(
        matches!(&err, DataError::BadHeader { path, .. } if path == &patched),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!(
            "image of 100000x12 pixels, above the limit of {MAX_IMAGE_SIDE}"
        )),
        "{err}"
    );
}

#[test]
fn resizing_caps_the_longer_side_at_the_size_limit() {
    // A 1 x 16000 strip resized to a shorter side of 256 would be 256 x 4,096,000:
    // torchvision's max_size rule keeps the longer side at the limit instead.
    let strip = Image::zeros(ImageShape::new(1, 1, 16_000));
    let resize = Transform::new(vec![Step::Resize { shorter: 256 }], Normalize::unit(1)).unwrap();
    assert_eq!(
        resize.apply(strip, 0).shape(),
        ImageShape::new(1, 1, MAX_IMAGE_SIDE)
    );
    let tall = Image::zeros(ImageShape::new(3, 8_000, 100));
    let resize = Transform::new(vec![Step::Resize { shorter: 300 }], Normalize::unit(3)).unwrap();
    // 300 x 24000 capped: the longer side 16384, the shorter 300 * 16384 / 24000 = 204.
    assert_eq!(
        resize.apply(tall, 0).shape(),
        ImageShape::new(3, MAX_IMAGE_SIDE, 204)
    );
}

#[test]
fn unknown_kinds_and_formats_are_errors() {
    assert_eq!(
        "Fashion_MNIST".parse::<DatasetKind>().unwrap(),
        DatasetKind::Idx
    );
    assert_eq!(
        "cifar-100".parse::<DatasetKind>().unwrap(),
        DatasetKind::Cifar100
    );
    for kind in DatasetKind::ALL {
        assert_eq!(kind.name().parse::<DatasetKind>().unwrap(), kind);
    }
    let err = "svhn".parse::<DatasetKind>().unwrap_err();
    assert!(matches!(&err, DataError::UnknownKind(name) if name == "svhn"));
    let empty = TempDir::new().unwrap();
    let err = DatasetKind::detect(empty.path()).unwrap_err();
    assert!(matches!(err, DataError::UnknownFormat { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------
// Transforms
// ---------------------------------------------------------------------------------------

/// A grey image whose pixels are all distinct and non-zero.
fn ramp(height: usize, width: usize) -> Image {
    let pixels = (0..height * width).map(|p| (p % 255 + 1) as u8).collect();
    Image::new(ImageShape::new(1, height, width), pixels).unwrap()
}

#[test]
fn pad_crop_is_a_shifted_window_with_zero_border() {
    let input = ramp(10, 10);
    let transform = Transform::new(vec![Step::PadCrop { padding: 2 }], Normalize::unit(1)).unwrap();
    let mut shifts = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let out = transform.apply(input.clone(), seed);
        assert_eq!(out.shape(), input.shape());
        // Find the shift from an interior pixel, then check every pixel against it.
        let value = out.get(5, 5, 0) as isize - 1;
        let (dy, dx) = (value / 10 - 5, value % 10 - 5);
        assert!(dy.abs() <= 2 && dx.abs() <= 2);
        for r in 0..10isize {
            for c in 0..10isize {
                let (y, x) = (r + dy, c + dx);
                let expected = if (0..10).contains(&y) && (0..10).contains(&x) {
                    input.get(y as usize, x as usize, 0)
                } else {
                    0
                };
                assert_eq!(out.get(r as usize, c as usize, 0), expected);
            }
        }
        shifts.insert((dy, dx));
        assert_eq!(
            transform.apply(input.clone(), seed),
            out,
            "same seed, same crop"
        );
    }
    assert_eq!(shifts.len(), 25, "every offset in [-2, 2]^2 occurs");
}

#[test]
fn flip_mirrors_rows_with_its_probability() {
    let input = Image::new(ImageShape::new(3, 2, 3), (1..=18).collect::<Vec<u8>>()).unwrap();
    let always = Transform::new(
        vec![Step::HorizontalFlip { probability: 1.0 }],
        Normalize::unit(3),
    )
    .unwrap();
    let out = always.apply(input.clone(), 1);
    for r in 0..2 {
        for c in 0..3 {
            for k in 0..3 {
                assert_eq!(out.get(r, c, k), input.get(r, 2 - c, k));
            }
        }
    }
    let never = Transform::new(
        vec![Step::HorizontalFlip { probability: 0.0 }],
        Normalize::unit(3),
    )
    .unwrap();
    assert_eq!(never.apply(input.clone(), 1), input);
    let half = Transform::new(
        vec![Step::HorizontalFlip { probability: 0.5 }],
        Normalize::unit(3),
    )
    .unwrap();
    let flipped = (0..1000)
        .filter(|&s| half.apply(input.clone(), s) != input)
        .count();
    assert!((400..600).contains(&flipped), "{flipped} flips in 1000");
}

#[test]
fn center_crop_rounds_like_torchvision_and_pads() {
    let input = ramp(5, 8);
    let crop = Transform::new(
        vec![Step::CenterCrop {
            height: 2,
            width: 3,
        }],
        Normalize::unit(1),
    )
    .unwrap();
    let out = crop.apply(input.clone(), 0);
    // top = round(1.5) = 2 (half to even), left = round(2.5) = 2.
    assert_eq!(out.shape(), ImageShape::new(1, 2, 3));
    assert_eq!(out.get(0, 0, 0), input.get(2, 2, 0));
    assert_eq!(out.get(1, 2, 0), input.get(3, 4, 0));

    let small = ramp(2, 2);
    let pad = Transform::new(
        vec![Step::CenterCrop {
            height: 4,
            width: 4,
        }],
        Normalize::unit(1),
    )
    .unwrap();
    let out = pad.apply(small.clone(), 0);
    for r in 0..4 {
        for c in 0..4 {
            let inside = (1..3).contains(&r) && (1..3).contains(&c);
            let expected = if inside {
                small.get(r - 1, c - 1, 0)
            } else {
                0
            };
            assert_eq!(out.get(r, c, 0), expected, "({r}, {c})");
        }
    }
}

#[test]
fn resize_and_random_resized_crop_have_fixed_shapes() {
    let eval = Transform::imagenet_eval(16, 12);
    let input = Image::new(ImageShape::new(3, 30, 50), gradient(50, 30).into_raw()).unwrap();
    assert_eq!(
        eval.output_shape(Some(input.shape()), 3),
        Some(ImageShape::new(3, 12, 12))
    );
    let resize = Transform::new(vec![Step::Resize { shorter: 15 }], Normalize::imagenet()).unwrap();
    assert_eq!(
        resize.apply(input.clone(), 0).shape(),
        ImageShape::new(3, 15, 25)
    );
    assert_eq!(
        resize.output_shape(Some(input.shape()), 3),
        Some(ImageShape::new(3, 15, 25))
    );
    assert_eq!(resize.output_shape(None, 3), None);

    let train = Transform::imagenet_train(10);
    let mut outputs = std::collections::HashSet::new();
    for seed in 0..20 {
        let out = train.apply(input.clone(), seed);
        assert_eq!(out.shape(), ImageShape::new(3, 10, 10));
        assert_eq!(train.apply(input.clone(), seed), out);
        outputs.insert(out.into_pixels());
    }
    assert!(outputs.len() > 15, "crops vary with the seed");

    // A constant image stays constant through crops and resizing.
    let flat = Image::new(ImageShape::new(3, 30, 50), vec![90; 30 * 50 * 3]).unwrap();
    for seed in 0..5 {
        let out = train.apply(flat.clone(), seed);
        assert!(out.pixels().iter().all(|&p| p == 90));
    }
}

#[test]
fn normalisation_writes_chw_values() {
    let image = Image::new(ImageShape::new(3, 1, 2), vec![0, 51, 255, 102, 153, 204]).unwrap();
    let transform = Transform::new(
        Vec::new(),
        Normalize::new(vec![0.5, 0.0, 1.0], vec![0.5, 1.0, 0.25]).unwrap(),
    )
    .unwrap();
    let (shape, values) = transform.to_chw(image, 0).unwrap();
    assert_eq!(shape.dims(), [3, 1, 2]);
    let expected = [
        (0.0 - 0.5) / 0.5,
        (102.0 / 255.0 - 0.5) / 0.5,
        51.0 / 255.0,
        153.0 / 255.0,
        (1.0 - 1.0) / 0.25,
        (204.0 / 255.0 - 1.0) / 0.25,
    ];
    for (v, e) in values.iter().zip(expected) {
        assert!((v - e).abs() < 1e-6, "{values:?}");
    }
    let grey = Image::zeros(ImageShape::new(1, 2, 2));
    let err = transform.to_chw(grey, 0).unwrap_err();
    assert!(matches!(err, DataError::InvalidTransform(_)), "{err}");
}

#[test]
fn invalid_transforms_are_rejected() {
    let cases = [
        Step::RandomResizedCrop {
            height: 0,
            width: 4,
            scale: (0.08, 1.0),
            ratio: (0.75, 1.33),
        },
        Step::RandomResizedCrop {
            height: 4,
            width: 4,
            scale: (0.5, 0.1),
            ratio: (0.75, 1.33),
        },
        Step::RandomResizedCrop {
            height: 4,
            width: 4,
            scale: (0.1, 1.0),
            ratio: (0.0, 1.0),
        },
        Step::HorizontalFlip { probability: 1.5 },
        Step::Resize { shorter: 0 },
        Step::CenterCrop {
            height: 3,
            width: 0,
        },
        // Sizes a crafted or mistaken setting could ask for, above MAX_IMAGE_SIDE.
        Step::Resize { shorter: 100_000 },
        Step::CenterCrop {
            height: 3,
            width: usize::MAX,
        },
        Step::RandomResizedCrop {
            height: 1 << 20,
            width: 4,
            scale: (0.08, 1.0),
            ratio: (0.75, 1.33),
        },
        Step::PadCrop { padding: 1 << 40 },
    ];
    for step in cases {
        let err = Transform::new(vec![step.clone()], Normalize::unit(1)).unwrap_err();
        assert!(
            matches!(err, DataError::InvalidTransform(_)),
            "{step:?}: {err}"
        );
    }
    assert!(Normalize::new(vec![0.5], vec![0.0]).is_err());
    assert!(Normalize::new(vec![0.5, 0.5], vec![1.0]).is_err());
    // Serialised transforms are checked when read back.
    let json = r#"{"steps":[{"HorizontalFlip":{"probability":2.0}}],"normalize":{"mean":[0.0],"std":[1.0]}}"#;
    assert!(serde_json::from_str::<Transform>(json).is_err());
    let good = Transform::standard(DatasetKind::Cifar10, true);
    let back: Transform = serde_json::from_str(&serde_json::to_string(&good).unwrap()).unwrap();
    assert_eq!(back, good);
}

// ---------------------------------------------------------------------------------------
// Loader
// ---------------------------------------------------------------------------------------

fn epoch_batches(loader: &Loader, position: Position) -> Vec<HostBatch> {
    loader
        .resume_host(position)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn idx_loader(dir: &Path, threads: usize, seed: u64, batch: usize) -> Loader {
    let train = Dataset::open(DatasetKind::Idx, dir, Split::Train).unwrap();
    Loader::new(
        train,
        Transform::standard(DatasetKind::Idx, true),
        LoaderConfig::new(batch)
            .with_seed(seed)
            .with_threads(threads),
    )
    .unwrap()
}

#[test]
fn loader_is_deterministic_whatever_the_threads() {
    let dir = idx_dir(300, false);
    let reference = idx_loader(dir.path(), 1, 7, 32);
    assert_eq!(reference.batches_per_epoch(), 10);
    assert_eq!(reference.sample_shape(), ImageShape::new(1, 28, 28));
    for epoch in 0..2 {
        let expected = epoch_batches(&reference, Position::epoch_start(epoch));
        assert_eq!(expected.len(), 10);
        assert_eq!(expected[9].shape, [300 - 9 * 32, 1, 28, 28]);
        for threads in [2, 3] {
            let loader = idx_loader(dir.path(), threads, 7, 32);
            assert_eq!(
                epoch_batches(&loader, Position::epoch_start(epoch)),
                expected,
                "{threads} threads, epoch {epoch}"
            );
        }
        // Each epoch visits every sample once, labels following their samples.
        let mut seen: Vec<usize> = expected.iter().flat_map(|b| b.indices.clone()).collect();
        for batch in &expected {
            for (label, index) in batch.labels.iter().zip(&batch.indices) {
                assert_eq!(*label as usize, index % 10);
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..300).collect::<Vec<_>>());
    }
    let e0 = epoch_batches(&reference, Position::epoch_start(0));
    let e1 = epoch_batches(&reference, Position::epoch_start(1));
    assert_ne!(e0[0].indices, e1[0].indices, "a new order every epoch");
    let other_seed = idx_loader(dir.path(), 1, 8, 32);
    assert_ne!(
        epoch_batches(&other_seed, Position::epoch_start(0))[0].indices,
        e0[0].indices
    );
}

#[test]
fn loader_augments_and_normalises_each_sample_from_its_seed() {
    let dir = idx_dir(40, true);
    let loader = idx_loader(dir.path(), 2, 3, 16);
    let dataset = Dataset::open(DatasetKind::Idx, dir.path(), Split::Train).unwrap();
    let transform = Transform::standard(DatasetKind::Idx, true);
    let batch = loader.load(Position::new(1, 2)).unwrap();
    assert_eq!(batch.shape, [8, 1, 28, 28]);
    assert_eq!(batch.next, Position::epoch_start(2));
    for (k, &index) in batch.indices.iter().enumerate() {
        let seed = versatile::data::sample_seed(3, 1, index);
        let (_, values) = transform
            .to_chw(dataset.image(index).unwrap(), seed)
            .unwrap();
        assert_eq!(&batch.images[k * 784..(k + 1) * 784], values.as_slice());
    }
    // The same samples are augmented differently in another epoch.
    let changed = batch
        .indices
        .iter()
        .enumerate()
        .filter(|&(k, &index)| {
            let seed = versatile::data::sample_seed(3, 0, index);
            let (_, values) = transform
                .to_chw(dataset.image(index).unwrap(), seed)
                .unwrap();
            batch.images[k * 784..(k + 1) * 784] != values[..]
        })
        .count();
    assert!(
        changed >= 4,
        "only {changed} of 8 samples changed between epochs"
    );
}

#[test]
fn loader_resumes_exactly_where_it_stopped() {
    let dir = idx_dir(200, false);
    let loader = idx_loader(dir.path(), 2, 11, 24);
    let full = epoch_batches(&loader, Position::epoch_start(3));
    assert_eq!(full.len(), 9);
    for (i, batch) in full.iter().enumerate() {
        assert_eq!(batch.position, Position::new(3, i));
        let next = loader.next_position(batch.position);
        assert_eq!(batch.next, next);
    }
    assert_eq!(full[8].next, Position::epoch_start(4));
    // Stop after a few batches (dropping the iterator), then resume from the saved position.
    let mut iter = loader.resume_host(Position::epoch_start(3)).unwrap();
    let saved = (0..4)
        .map(|_| iter.next().unwrap().unwrap())
        .last()
        .unwrap()
        .next;
    drop(iter);
    // A fresh loader (as after a restart) with the same settings.
    let restarted = idx_loader(dir.path(), 1, 11, 24);
    let tail = epoch_batches(&restarted, saved);
    assert_eq!(tail.as_slice(), &full[4..]);
    assert!(epoch_batches(&loader, Position::new(3, 9)).is_empty());
    let err = loader.resume_host(Position::new(3, 10)).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::PositionOutOfRange {
                batch: 10,
                batches: 9
            }
        ),
        "{err}"
    );
    assert!(loader.load(Position::new(0, 9)).is_err());
}

#[test]
fn loader_gives_tensors_on_the_device() {
    let dir = idx_dir(20, false);
    let train = Dataset::open(DatasetKind::Idx, dir.path(), Split::Train).unwrap();
    let loader = Loader::new(
        train,
        Transform::standard(DatasetKind::Idx, false),
        LoaderConfig::new(8)
            .with_shuffle(false)
            .with_drop_last(true),
    )
    .unwrap();
    assert_eq!(
        (loader.batches_per_epoch(), loader.samples_per_epoch()),
        (2, 16)
    );
    let device = Device::flex();
    let batches: Vec<_> = loader
        .epoch(0, &device)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(batches.len(), 2);
    let batch = &batches[1];
    assert_eq!(batch.images.dims(), [8, 1, 28, 28]);
    assert_eq!(batch.labels.dims(), [8]);
    assert_eq!(batch.indices, (8..16).collect::<Vec<_>>());
    let labels: Vec<i64> = batch
        .labels
        .to_data()
        .convert::<i64>()
        .try_into_vec()
        .unwrap();
    assert_eq!(labels, [8, 9, 0, 1, 2, 3, 4, 5]);
    let images: Vec<f32> = batch
        .images
        .to_data()
        .convert::<f32>()
        .try_into_vec()
        .unwrap();
    let norm = Normalize::fashion_mnist();
    let expected = (synthetic_pixel(8, 0) as f32 / 255.0 - norm.mean[0]) / norm.std[0];
    assert!((images[0] - expected).abs() < 1e-5);
}

#[test]
fn loader_rejects_settings_that_cannot_work() {
    let dir = idx_dir(10, false);
    let open = || Dataset::open(DatasetKind::Idx, dir.path(), Split::Train).unwrap();
    let standard = || Transform::standard(DatasetKind::Idx, true);
    let cases = [
        (LoaderConfig::new(0), "batch size 0"),
        (LoaderConfig::new(4).with_threads(0), "0 threads"),
        (LoaderConfig::new(11).with_drop_last(true), "make no batch"),
    ];
    for (config, text) in cases {
        let err = Loader::new(open(), standard(), config).unwrap_err();
        assert!(
            matches!(&err, DataError::InvalidConfig(m) if m.contains(text)),
            "{err}"
        );
    }
    let rgb = Transform::standard(DatasetKind::Cifar10, true);
    let err = Loader::new(open(), rgb, LoaderConfig::new(4)).unwrap_err();
    assert!(matches!(err, DataError::InvalidTransform(_)), "{err}");

    let root = TempDir::new().unwrap();
    write_folder(root.path());
    let folder = Dataset::open(DatasetKind::ImageFolder, root.path(), Split::Train).unwrap();
    let no_crop = Transform::new(vec![Step::Resize { shorter: 8 }], Normalize::imagenet()).unwrap();
    let err = Loader::new(folder.clone(), no_crop, LoaderConfig::new(2)).unwrap_err();
    assert!(
        matches!(&err, DataError::InvalidConfig(m) if m.contains("crop")),
        "{err}"
    );
    // With a crop, ImageFolder batches are fine.
    let loader = Loader::new(
        folder,
        Transform::imagenet_train(8),
        LoaderConfig::new(4).with_threads(2),
    )
    .unwrap();
    let batches = epoch_batches(&loader, Position::default());
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[2].shape, [1, 3, 8, 8]);
}

// ---------------------------------------------------------------------------------------
// Fashion-MNIST: the shipped sample and the real set
// ---------------------------------------------------------------------------------------

fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-sample")
}

const REAL: &str = "/usr/share/datasets/fashion-mnist";

#[test]
fn shipped_sample_is_a_balanced_subset_of_fashion_mnist() {
    let dir = sample_dir();
    let train = Dataset::open(DatasetKind::Idx, &dir, Split::Train).unwrap();
    let test = Dataset::open(DatasetKind::Idx, &dir, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (6000, 1000));
    for (set, per_class) in [(&train, 600), (&test, 100)] {
        assert_eq!(set.num_classes(), 10);
        assert_eq!(set.image_shape(), Some(ImageShape::new(1, 28, 28)));
        let mut counts = [0; 10];
        for &label in set.labels() {
            counts[label as usize] += 1;
        }
        assert_eq!(counts, [per_class; 10]);
    }
    if !Path::new(REAL).is_dir() {
        println!("note: {REAL} absent (apt install dataset-fashion-mnist); not comparing the sample with it");
        return;
    }
    // The first 600 (100) images of each class of the real files, in file order.
    for (split, sample, per_class) in [(Split::Train, &train, 600), (Split::Test, &test, 100)] {
        let real = Dataset::open(DatasetKind::Idx, REAL, split).unwrap();
        let picked = real.first_per_class(per_class);
        assert_eq!(picked.len(), sample.len());
        for (k, &i) in picked.iter().enumerate() {
            assert_eq!(sample.labels()[k], real.labels()[i]);
            assert_eq!(sample.image(k).unwrap(), real.image(i).unwrap());
        }
    }
}

#[test]
fn real_fashion_mnist_when_installed() {
    if !Path::new(REAL).is_dir() {
        println!("note: {REAL} absent (apt install dataset-fashion-mnist); skipping");
        return;
    }
    let train = Dataset::open(DatasetKind::Idx, REAL, Split::Train).unwrap();
    let test = Dataset::open(DatasetKind::Idx, REAL, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(train.image_shape(), Some(ImageShape::new(1, 28, 28)));
    assert_eq!((train.num_classes(), test.num_classes()), (10, 10));
    let mut counts = [0; 10];
    for &label in train.labels() {
        counts[label as usize] += 1;
    }
    assert_eq!(counts, [6000; 10]);
    // The normalisation constants used for IDX are Fashion-MNIST's own.
    let (mean, std) = train.pixel_stats().unwrap();
    let norm = Normalize::fashion_mnist();
    assert!((mean[0] - norm.mean[0]).abs() < 1e-3, "mean {mean:?}");
    assert!((std[0] - norm.std[0]).abs() < 1e-3, "std {std:?}");
}

#[test]
fn shares_of_a_batch_cover_it_in_order() {
    // The shares split any length into contiguous runs, in order, sizes within one.
    for len in [0, 1, 7, 32, 33] {
        for parts in [1, 2, 3, 8] {
            let ranges: Vec<_> = (0..parts).map(|p| share(len, p, parts)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[parts - 1].end, len);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
            }
            let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{len} in {parts}: {sizes:?}");
        }
    }
    // Loaders with shares 0..3 of every batch give, put together, the batches of the
    // whole loader (images, labels, positions), the short last batch included.
    let dir = idx_dir(100, false);
    let whole = idx_loader(dir.path(), 1, 3, 32);
    let expected = epoch_batches(&whole, Position::epoch_start(1));
    let parts: Vec<Vec<HostBatch>> = (0..3)
        .map(|i| epoch_batches(&whole.with_share(i, 3).unwrap(), Position::epoch_start(1)))
        .collect();
    for (b, batch) in expected.iter().enumerate() {
        let mut images = Vec::new();
        let mut indices = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let piece = &part[b];
            assert_eq!(piece.position, batch.position);
            assert_eq!(piece.next, batch.next);
            assert_eq!(piece.len(), share(batch.len(), i, 3).len());
            assert_eq!(*piece, batch.slice(share(batch.len(), i, 3)));
            images.extend_from_slice(&piece.images);
            indices.extend_from_slice(&piece.indices);
        }
        assert_eq!(images, batch.images);
        assert_eq!(indices, batch.indices);
    }
    assert!(matches!(
        whole.with_share(3, 3),
        Err(DataError::InvalidConfig(_))
    ));
}
