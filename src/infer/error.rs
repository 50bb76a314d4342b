//! Why a model cannot be compiled or run.

use thiserror::Error;

use crate::kernels::PlanError;
use crate::layer::VConvShapeError;
use crate::models::ModelError;

/// An error of [`InferencePlan`](super::InferencePlan).
#[derive(Debug, Error)]
pub enum InferError {
    /// The model does not take the input shape, or is invalid.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A versatile layer does not take its input.
    #[error(transparent)]
    Layer(#[from] VConvShapeError),
    /// A convolution's kernel plan is invalid.
    #[error("kernel plan: {0}")]
    Plan(#[from] PlanError),
    /// A layer setting the compiled plan does not implement.
    #[error("not supported by the inference plan: {0}")]
    Unsupported(String),
    /// The input slice has the wrong length.
    #[error("the plan was compiled for inputs {expected:?} ({} values); got {got} values", expected.iter().product::<usize>())]
    Input {
        /// The compiled input shape.
        expected: [usize; 4],
        /// Values given.
        got: usize,
    },
    /// The input tensor has the wrong shape.
    #[error("the plan was compiled for inputs {expected:?}; got {got:?}")]
    Shape {
        /// The compiled input shape.
        expected: [usize; 4],
        /// The shape given.
        got: [usize; 4],
    },
}
