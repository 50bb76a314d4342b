//! CIFAR-10 and CIFAR-100 binary files, through the dataset that reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use versatile::data::{Dataset, DatasetKind, Split};

fuzz_target!(|data: &[u8]| {
    let cifar10 = versatile_fuzz::write("cifar/test_batch.bin", data);
    versatile_fuzz::write("cifar/test.bin", data);
    let dir = cifar10.parent().expect("a directory");
    for kind in [DatasetKind::Cifar10, DatasetKind::Cifar100] {
        if let Ok(dataset) = Dataset::open(kind, dir, Split::Test) {
            let last = dataset.len() - 1;
            let image = dataset.image(last).expect("every sample has an image");
            assert_eq!(image.pixels().len(), 3 * 32 * 32);
            assert!(dataset.labels().iter().all(|&l| (l as usize) < dataset.num_classes()));
        }
    }
});
