//! What the fuzz targets share: a scratch directory per process for the files the
//! parsers read (they take paths), and the small model the checkpoint targets load into.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use versatile::models::ModelConfig;

/// This process's scratch directory (in memory where `/dev/shm` exists), created once.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("versatile-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        dir
    })
}

/// Writes `bytes` to `name` (a path relative to the scratch directory, whose parents
/// are created) and returns its path.
pub fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create a scratch sub-directory");
    }
    std::fs::write(&path, bytes).expect("write a scratch file");
    path
}

/// The model the checkpoint seeds hold: a VGG of one spatial-versatile 4-channel
/// convolution with batch norm, on grey 28x28 images, 10 classes (under a hundred
/// values, so files stay small).
pub fn small_model() -> ModelConfig {
    ModelConfig::parse("vgg_bn:4-M", "spatial")
        .expect("a valid model")
        .with_in_channels(1)
        .with_num_classes(10)
}
