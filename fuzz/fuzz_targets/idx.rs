//! IDX image and label files, raw or gzip (the gzip magic decides).
#![no_main]

use libfuzzer_sys::fuzz_target;
use versatile::data::idx;

fuzz_target!(|data: &[u8]| {
    let path = versatile_fuzz::write("file-idx-ubyte", data);
    if let Ok(images) = idx::read_images(&path) {
        assert_eq!(
            images.pixels.len(),
            images.count * images.shape.num_elements()
        );
    }
    let _ = idx::read_labels(&path);
});
