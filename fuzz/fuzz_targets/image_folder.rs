//! Image files (PNG, JPEG, told by their content) through an ImageFolder dataset and
//! the loader: decoding, then the evaluation and the training transforms.
#![no_main]

use libfuzzer_sys::fuzz_target;
use versatile::data::{Dataset, DatasetKind, Loader, LoaderConfig, Position, Split, Transform};

fuzz_target!(|data: &[u8]| {
    let image = versatile_fuzz::write("folder/val/class/image.png", data);
    let root = image.ancestors().nth(3).expect("the dataset root");
    let kind = DatasetKind::ImageFolder;
    let Ok(dataset) = Dataset::open(kind, root, Split::Test) else {
        return;
    };
    for transform in [
        Transform::standard(kind, false),
        Transform::imagenet_train(32),
    ] {
        let loader = Loader::new(dataset.clone(), transform, LoaderConfig::new(1))
            .expect("a valid loader");
        if let Ok(batch) = loader.load(Position::new(0, 0)) {
            let [n, c, h, w] = batch.shape;
            assert_eq!(batch.images.len(), n * c * h * w);
        }
    }
    let _ = versatile::data::folder::decode_image(&image, 1);
});
