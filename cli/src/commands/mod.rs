//! One module per subcommand.

pub mod bench;
pub mod demo;
pub mod eval;
pub mod export;
mod files;
pub mod import;
pub mod inspect;
pub mod layer;
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
