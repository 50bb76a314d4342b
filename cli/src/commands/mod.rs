//! One module per subcommand.

pub mod bench;
mod bench_gpu;
pub mod demo;
pub mod eval;
pub mod export;
mod files;
pub mod import;
pub mod inspect;
pub mod layer;
mod memory;
pub mod models;
pub mod plot;
pub mod predict;
pub mod summary;
pub mod train;

/// An error in what the user asked for (exit code 2), as opposed to a failure while
/// doing it (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    /// Wraps any displayable error as a usage error.
    pub fn from_display(err: impl std::fmt::Display) -> anyhow::Error {
        anyhow::Error::new(UsageError(err.to_string()))
    }
}

/// `part / whole`, 0 for an empty whole.
pub(crate) fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The model a command works on: name, variant, classes and input channels.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Model name (see `versatile models`), e.g. vgg16, resnet50, vgg_bn:32-32-M-64-64-M,
    /// vgg_fc6:64:16-M-32-M.
    #[arg(long)]
    model: String,
    /// Variant: dense, spatial or spatial+channel[:delta=N|ratio=R,g=N|windows=N,mode=shared|sliding].
    #[arg(long, default_value = "dense")]
    variant: String,
    /// Number of classes; default: the model's (1000 for ImageNet models, 10 otherwise).
    #[arg(long, value_name = "K")]
    classes: Option<usize>,
    /// Input channels; default: the model's (3, or 1 for lenet5).
    #[arg(long, value_name = "C")]
    in_channels: Option<usize>,
}

impl ModelArgs {
    /// The model's configuration (a usage error for an unknown model or variant).
    pub fn config(&self) -> anyhow::Result<versatile::models::ModelConfig> {
        let mut config = versatile::models::ModelConfig::parse(&self.model, &self.variant)
            .map_err(UsageError::from_display)?;
        if let Some(classes) = self.classes {
            config = config.with_num_classes(classes);
        }
        if let Some(channels) = self.in_channels {
            config = config.with_in_channels(channels);
        }
        Ok(config)
    }
}
