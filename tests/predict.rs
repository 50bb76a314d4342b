//! Predictions from image files: the preprocessing (channel order, grey to RGB,
//! resize and centre crop, normalisation) against inputs built by hand, and the ranking.

use std::path::{Path, PathBuf};

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use image::{GrayImage, Luma, Rgb, RgbImage};
use versatile::checkpoint::predict::{load_image, predict, Preprocess};
use versatile::checkpoint::{CheckpointError, CheckpointMeta};
use versatile::data::{Dataset, DatasetKind, Loader, LoaderConfig, Position, Split, Transform};
use versatile::models::{ImageClassifier, Model};

use crate::support;
use support::{config, random_model, scratch, values};

/// An RGB image whose three channels differ everywhere, so a swapped channel or axis
/// changes the input.
fn rgb(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([
            (x * 255 / width) as u8,
            (y * 255 / height) as u8,
            ((x * 7 + y * 13) % 256) as u8,
        ])
    })
}

/// The probabilities `model` gives one `[C, H, W]` input, by hand.
fn probabilities(model: &Model, chw: Vec<f32>, device: &Device) -> Vec<f32> {
    let c = model.config().in_channels;
    let side = ((chw.len() / c) as f64).sqrt() as usize;
    let x = Tensor::<4>::from_data(TensorData::new(chw, [1, c, side, side]), device);
    values(softmax(model.forward(x), 1))
}

fn top(probabilities: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]));
    order.truncate(k);
    order
}

/// Asserts `got` and `expected` agree to float rounding (the transform scales by
/// `1 / 255` where the expectations divide by 255).
fn assert_close(got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len());
    for (i, (a, b)) in got.iter().zip(expected).enumerate() {
        assert!((a - b).abs() < 1e-6, "value {i}: {a} against {b}");
    }
}

fn save(dir: &Path, name: &str, image: impl FnOnce(&Path)) -> PathBuf {
    let path = dir.join(name);
    image(&path);
    path
}

#[test]
fn an_image_of_the_input_size_is_the_input_planar_and_scaled() {
    let device = Device::flex();
    let dir = scratch("predict-exact");
    let config = config("vgg:8-M-16", "spatial"); // RGB, 32x32, 10 classes
    let model = random_model(&config, &device);
    let image = rgb(32, 32);
    let path = save(&dir, "exact.png", |p| image.save(p).unwrap());

    // By hand: channel c of pixel (x, y) at [c, y, x], divided by 255.
    let mut chw = vec![0f32; 3 * 32 * 32];
    for (x, y, pixel) in image.enumerate_pixels() {
        for c in 0..3 {
            chw[c * 1024 + y as usize * 32 + x as usize] = pixel[c] as f32 / 255.0;
        }
    }
    let preprocess = Preprocess::for_config(&config);
    assert_close(&load_image(&path, &preprocess, 3).unwrap(), &chw);

    let expected = probabilities(&model, chw, &device);
    let meta = CheckpointMeta::new(config.clone());
    let predictions = predict(&model, &meta, &[path.clone(), path], 5, &device).unwrap();
    assert_eq!(predictions.len(), 2);
    let got: Vec<usize> = predictions[0].top.iter().map(|s| s.class).collect();
    assert_eq!(got, top(&expected, 5));
    for score in &predictions[0].top {
        assert!((score.probability - expected[score.class]).abs() < 1e-6);
        assert_eq!(score.name, None);
    }
    assert!(predictions[0]
        .top
        .windows(2)
        .all(|w| w[0].probability >= w[1].probability));
}

#[test]
fn grey_and_rgb_images_become_the_models_channels() {
    let dir = scratch("predict-channels");
    let grey = GrayImage::from_fn(28, 28, |x, y| Luma([((x * 9 + y * 3) % 256) as u8]));
    let grey_path = save(&dir, "grey.png", |p| grey.save(p).unwrap());
    let as_values: Vec<f32> = grey.pixels().map(|p| p[0] as f32 / 255.0).collect();

    // A grey image to an RGB model: the same plane three times.
    let preprocess = Preprocess {
        input_size: [28, 28],
        resize: 28,
        mean: vec![0.0; 3],
        std: vec![1.0; 3],
    };
    let loaded = load_image(&grey_path, &preprocess, 3).unwrap();
    assert_close(
        &loaded,
        &[as_values.clone(), as_values.clone(), as_values.clone()].concat(),
    );

    // An RGB image to a grey model: one plane, the image's luma.
    let colour = rgb(28, 28);
    let colour_path = save(&dir, "colour.png", |p| colour.save(p).unwrap());
    let luma = image::DynamicImage::ImageRgb8(colour).to_luma8();
    let grey_preprocess = Preprocess {
        mean: vec![0.0],
        std: vec![1.0],
        ..preprocess.clone()
    };
    let loaded = load_image(&colour_path, &grey_preprocess, 1).unwrap();
    let expected: Vec<f32> = luma.pixels().map(|p| p[0] as f32 / 255.0).collect();
    assert_close(&loaded, &expected);

    // Normalisation: (value - mean) / std per channel.
    let normalised = Preprocess {
        mean: vec![0.5],
        std: vec![0.25],
        ..grey_preprocess
    };
    let loaded = load_image(&grey_path, &normalised, 1).unwrap();
    for (got, raw) in loaded.iter().zip(&as_values) {
        assert!((got - (raw - 0.5) / 0.25).abs() < 1e-6);
    }
}

#[test]
fn larger_images_are_resized_on_the_shorter_side_and_centre_cropped() {
    let dir = scratch("predict-crop");
    // 40 wide, 20 high: the shorter side goes to 10, so 20x10, then the centre 10x10.
    // Columns are constant, so the crop shows which columns were kept.
    let image = GrayImage::from_fn(40, 20, |x, _| Luma([(x * 6) as u8]));
    let path = save(&dir, "wide.png", |p| image.save(p).unwrap());
    let preprocess = Preprocess {
        input_size: [10, 10],
        resize: 10,
        mean: vec![0.0],
        std: vec![1.0],
    };
    let loaded = load_image(&path, &preprocess, 1).unwrap();
    assert_eq!(loaded.len(), 100);
    // Resized column j of 20 covers source columns 2j, 2j+1; the crop keeps j = 5..15,
    // whose values rise from about (10.5 * 6) / 255 to (29.5 * 6) / 255.
    let first_row = &loaded[..10];
    assert!(first_row.windows(2).all(|w| w[0] < w[1]), "{first_row:?}");
    assert!(
        (first_row[0] - 10.5 * 6.0 / 255.0).abs() < 0.02,
        "{first_row:?}"
    );
    assert!(
        (first_row[9] - 28.5 * 6.0 / 255.0).abs() < 0.02,
        "{first_row:?}"
    );
    // Every row the same.
    assert!(loaded.chunks(10).all(|row| row == first_row));
}

#[test]
fn class_names_label_the_predictions() {
    let device = Device::flex();
    let dir = scratch("predict-names");
    let config = config("lenet5", "spatial"); // grey, 28x28
    let model = random_model(&config, &device);
    let path = save(&dir, "digit.png", |p| {
        GrayImage::from_fn(28, 28, |x, y| Luma([((x + y) * 4) as u8]))
            .save(p)
            .unwrap()
    });
    let names: Vec<String> = (0..10).map(|i| format!("digit {i}")).collect();
    let meta = CheckpointMeta::new(config).with_class_names(names);
    let predictions = predict(&model, &meta, &[path], 3, &device).unwrap();
    let top = &predictions[0].top;
    assert_eq!(top.len(), 3);
    for score in top {
        assert_eq!(
            score.name.as_deref(),
            Some(format!("digit {}", score.class).as_str())
        );
    }
}

#[test]
fn unreadable_images_and_bad_settings_are_errors() {
    let dir = scratch("predict-errors");
    let text = dir.join("notes.png");
    std::fs::write(&text, "not an image").unwrap();
    let preprocess = Preprocess {
        input_size: [28, 28],
        resize: 28,
        mean: vec![0.0],
        std: vec![1.0],
    };
    let err = load_image(&text, &preprocess, 1).unwrap_err();
    assert!(matches!(err, CheckpointError::Image { .. }), "{err:?}");
    let err = load_image(dir.join("missing.png"), &preprocess, 1).unwrap_err();
    assert!(matches!(err, CheckpointError::Image { .. }), "{err:?}");
    let err = load_image(&text, &preprocess, 3).unwrap_err();
    assert!(
        err.to_string()
            .contains("1 means and 1 deviations for 3 input channels"),
        "{err}"
    );
    let small = Preprocess {
        resize: 20,
        ..preprocess
    };
    let err = load_image(&text, &small, 1).unwrap_err();
    assert!(
        err.to_string().contains("too little for a 28x28 crop"),
        "{err}"
    );
}

#[test]
fn predict_and_eval_see_identical_pixels() {
    let dir = scratch("predict-eval");
    // Sizes where rounding matters: 257 -> 256 scales 301 to 299.8 (torchvision keeps
    // 299), and the crop offset (299 - 224) / 2 = 37.5 rounds to 38.
    let sizes = [(301, 257), (257, 301), (224, 224), (500, 240)];
    let class_dir = dir.join("val").join("things");
    std::fs::create_dir_all(&class_dir).unwrap();
    std::fs::create_dir_all(dir.join("train").join("things")).unwrap();
    let paths: Vec<PathBuf> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(width, height))| {
            save(&class_dir, &format!("{i}.png"), |p| {
                rgb(width, height).save(p).unwrap()
            })
        })
        .collect();
    // eval's view: the ImageFolder evaluation transform through the loader.
    let kind = DatasetKind::ImageFolder;
    let dataset = Dataset::open(kind, &*dir, Split::Test).unwrap();
    let loader = Loader::new(
        dataset,
        Transform::standard(kind, false),
        LoaderConfig::new(sizes.len()).with_shuffle(false),
    )
    .unwrap();
    let batch = loader.load(Position::new(0, 0)).unwrap();
    assert_eq!(batch.shape, [sizes.len(), 3, 224, 224]);
    // predict's view: a 224x224 RGB model's default preprocessing.
    let preprocess = Preprocess::for_config(&config("resnet18", "spatial"));
    let plane = 3 * 224 * 224;
    for (i, path) in paths.iter().enumerate() {
        let index = batch.indices[i];
        let predicted = load_image(&paths[index], &preprocess, 3).unwrap();
        assert_eq!(
            predicted,
            &batch.images[i * plane..(i + 1) * plane],
            "{} ({:?})",
            path.display(),
            sizes[index]
        );
    }
}
