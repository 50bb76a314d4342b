//! `versatile`: the command-line tool of the versatile library.

mod commands;

use std::alloc::System;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use versatile::kernels::alloc::{retain_freed_memory, CountingAllocator};

/// The system allocator, counting heap bytes for the memory reports; `main` first tunes
/// it to keep freed memory ([`retain_freed_memory`]).
#[global_allocator]
static ALLOCATOR: CountingAllocator<System> = CountingAllocator(System);

/// Convolutional networks from versatile filters: geometry, costs, training and export.
#[derive(Debug, Parser)]
#[command(name = "versatile", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The geometry and costs of one versatile layer.
    Layer(commands::layer::LayerArgs),
    /// A model's layers with output shapes, parameters and multiply-adds, against its dense twin.
    Summary(commands::summary::SummaryArgs),
    /// The models of the zoo and their variants.
    Models(commands::models::ModelsArgs),
    /// What a checkpoint file holds and its size against its dense twin's.
    Inspect(commands::inspect::InspectArgs),
    /// A checkpoint's model as a plain dense model: safetensors (torchvision layout) or ONNX.
    Export(commands::export::ExportArgs),
    /// PyTorch weights (authors' VConv2d layout or torchvision) into a checkpoint.
    Import(commands::import::ImportArgs),
    /// The most probable classes of images under a checkpoint's model.
    Predict(commands::predict::PredictArgs),
    /// Time the fused versatile layer, its dense form and burn's conv2d on the CPU.
    Bench(commands::bench::BenchArgs),
    /// Train a model on a dataset (or resume a run, or time training steps).
    Train(Box<commands::train::TrainArgs>),
    /// Loss, top-1 and top-5 of a trained model on a dataset.
    Eval(commands::eval::EvalArgs),
    /// Learning curves (SVG and PNG) of one or more runs.
    Plot(commands::plot::PlotArgs),
    /// Train the small VGG dense and spatial-versatile on real Fashion-MNIST and compare them.
    Demo(commands::demo::DemoArgs),
}

/// Exit code for invalid arguments or configurations (as clap uses for usage errors).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    // Off glibc the system allocator keeps its own policy.
    let _ = retain_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Layer(args) => commands::layer::run(&args),
        Command::Summary(args) => commands::summary::run(&args),
        Command::Models(args) => commands::models::run(&args),
        Command::Inspect(args) => commands::inspect::run(&args),
        Command::Export(args) => commands::export::run(&args),
        Command::Import(args) => commands::import::run(&args),
        Command::Predict(args) => commands::predict::run(&args),
        Command::Bench(args) => commands::bench::run(&args),
        Command::Train(args) => commands::train::run(&args),
        Command::Eval(args) => commands::eval::run(&args),
        Command::Plot(args) => commands::plot::run(&args),
        Command::Demo(args) => commands::demo::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            match err.downcast_ref::<commands::UsageError>() {
                Some(_) => ExitCode::from(EXIT_USAGE),
                None => ExitCode::FAILURE,
            }
        }
    }
}
