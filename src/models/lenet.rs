//! LeNet-5 in its common modern form (ReLU and max pooling), for 28×28 and 32×32 images.
//!
//! Features: Conv 5×5 p2 → 6, ReLU, MaxPool 2, Conv 5×5 → 16, ReLU, MaxPool 2; adaptive
//! average pooling to 5×5 (the identity at 28×28, so 32×32 and larger inputs work too);
//! classifier Linear 400→120, ReLU, Linear 120→84, ReLU, Linear 84→classes. PyTorch's
//! default initialization. Under `spatial` both 5×5 convolutions are versatile (s = 3).

use super::convnet::ConvNetPlan;
use super::layers::{ConvSpec, FeatureSpec, HeadSpec, Init, LinearSpec, PoolSpec};
use super::variant::Variant;

/// Adaptive pooling output side.
const POOLED: usize = 5;

/// The layer plan of LeNet-5.
pub fn plan(variant: &Variant, in_channels: usize, num_classes: usize) -> ConvNetPlan {
    let conv = |c, n, padding| {
        FeatureSpec::Conv(
            ConvSpec::new(c, n, 5, variant)
                .with_padding(padding)
                .with_init(Init::TorchDefault),
        )
    };
    let pool = || FeatureSpec::MaxPool(PoolSpec::new(2, 2));
    let linear = |d_input, d_output| HeadSpec::Linear(LinearSpec::torch_default(d_input, d_output));
    ConvNetPlan {
        features: vec![
            conv(in_channels, 6, 2),
            FeatureSpec::Relu,
            pool(),
            conv(6, 16, 0),
            FeatureSpec::Relu,
            pool(),
        ],
        avgpool: [POOLED, POOLED],
        fc6: None,
        classifier: vec![
            linear(16 * POOLED * POOLED, 120),
            HeadSpec::Relu,
            linear(120, 84),
            HeadSpec::Relu,
            linear(84, num_classes),
        ],
    }
}
