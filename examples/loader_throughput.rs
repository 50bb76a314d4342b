//! Measures the loader's throughput: images/s of reading, augmenting (pad-crop 2 + flip),
//! normalising and batching Fashion-MNIST into tensors on the flex device, with no
//! training step consuming them.
//!
//! ```text
//! cargo run --release --example loader_throughput -- \
//!     [DATA=/usr/share/datasets/fashion-mnist] [THREADS=2] [BATCH=128] [EPOCHS=3]
//! ```

use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::Device;
use versatile::data::{Dataset, DatasetKind, Loader, LoaderConfig, Split, Transform};

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let data = args
        .first()
        .map_or("/usr/share/datasets/fashion-mnist", String::as_str);
    let threads: usize = args.get(1).map_or(Ok(2), |s| s.parse())?;
    let batch: usize = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let epochs: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;

    let start = Instant::now();
    let train = Dataset::open(DatasetKind::Idx, data, Split::Train)?;
    println!(
        "opened {} training images in {:.2?}",
        train.len(),
        start.elapsed()
    );
    let loader = Loader::new(
        train,
        Transform::standard(DatasetKind::Idx, true),
        LoaderConfig::new(batch).with_seed(1).with_threads(threads),
    )?;
    let device = Device::flex();
    for epoch in 0..epochs {
        let start = Instant::now();
        let mut images = 0;
        let mut checksum = 0f64;
        for batch in loader.epoch(epoch, &device)? {
            let batch = batch?;
            images += batch.indices.len();
            // Touch the data so nothing is optimised away.
            checksum += batch.labels.dims()[0] as f64;
        }
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "epoch {epoch}: {images} images in {seconds:.3} s = {:.0} images/s \
             (threads {threads}, batch {batch}, check {checksum})",
            images as f64 / seconds
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
