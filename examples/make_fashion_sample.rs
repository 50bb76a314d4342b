//! Writes the Fashion-MNIST sample shipped in `data/fashion-mnist-sample/`.
//!
//! ```text
//! cargo run --release --example make_fashion_sample -- \
//!     [SOURCE=/usr/share/datasets/fashion-mnist] [OUT=data/fashion-mnist-sample] \
//!     [TRAIN_PER_CLASS=600] [TEST_PER_CLASS=100]
//! ```
//!
//! It keeps the first `TRAIN_PER_CLASS` training images and the first `TEST_PER_CLASS`
//! test images of each class, in file order, and writes them as gzip IDX files with the
//! original names. No randomness: the output is byte-for-byte reproducible.

use std::path::PathBuf;
use std::process::ExitCode;

use versatile::data::{Dataset, DatasetKind, Split};

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let source = PathBuf::from(
        args.first()
            .map_or("/usr/share/datasets/fashion-mnist", String::as_str),
    );
    let out = PathBuf::from(
        args.get(1)
            .map_or("data/fashion-mnist-sample", String::as_str),
    );
    let train_per_class: usize = args.get(2).map_or(Ok(600), |s| s.parse())?;
    let test_per_class: usize = args.get(3).map_or(Ok(100), |s| s.parse())?;
    for (split, per_class) in [
        (Split::Train, train_per_class),
        (Split::Test, test_per_class),
    ] {
        let full = Dataset::open(DatasetKind::Idx, &source, split)?;
        let picked = full.first_per_class(per_class);
        let sample = full.subset(&picked)?;
        sample.write_idx(&out)?;
        println!(
            "{split}: {} of {} images ({per_class} per class) -> {}",
            sample.len(),
            full.len(),
            out.display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
