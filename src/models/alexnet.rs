//! AlexNet as torchvision builds it (the single-tower variant of "One weird trick"),
//! with PyTorch's default initialization (torchvision sets none of its own).
//!
//! Features: Conv 11×11/4 p2 → 64, ReLU, MaxPool 3/2, Conv 5×5 p2 → 192, ReLU,
//! MaxPool 3/2, Conv 3×3 p1 → 384, ReLU, Conv 3×3 p1 → 256, ReLU, Conv 3×3 p1 → 256,
//! ReLU, MaxPool 3/2; adaptive average pooling to 6×6; classifier Dropout,
//! Linear 9216→4096, ReLU, Dropout, Linear 4096→4096, ReLU, Linear 4096→classes.
//! Every convolution is versatile under a versatile variant (the 11×11 one has s = 6).

use super::convnet::ConvNetPlan;
use super::layers::{ConvSpec, FeatureSpec, HeadSpec, Init, LinearSpec, PoolSpec};
use super::variant::Variant;

/// `(out_channels, kernel, stride, padding, max pool after)` of each convolution.
const CONVS: [(usize, usize, usize, usize, bool); 5] = [
    (64, 11, 4, 2, true),
    (192, 5, 1, 2, true),
    (384, 3, 1, 1, false),
    (256, 3, 1, 1, false),
    (256, 3, 1, 1, true),
];
/// Adaptive pooling output side.
const POOLED: usize = 6;
/// Hidden width of the classifier.
const HIDDEN: usize = 4096;

/// The layer plan of AlexNet.
pub fn plan(variant: &Variant, in_channels: usize, num_classes: usize) -> ConvNetPlan {
    let mut features = Vec::new();
    let mut channels = in_channels;
    for (out, kernel, stride, padding, pool) in CONVS {
        features.push(FeatureSpec::Conv(
            ConvSpec::new(channels, out, kernel, variant)
                .with_stride(stride)
                .with_padding(padding)
                .with_init(Init::TorchDefault),
        ));
        features.push(FeatureSpec::Relu);
        if pool {
            features.push(FeatureSpec::MaxPool(PoolSpec::new(3, 2)));
        }
        channels = out;
    }
    let linear = |d_input, d_output| HeadSpec::Linear(LinearSpec::torch_default(d_input, d_output));
    ConvNetPlan {
        features,
        avgpool: [POOLED, POOLED],
        fc6: None,
        classifier: vec![
            HeadSpec::Dropout(0.5),
            linear(channels * POOLED * POOLED, HIDDEN),
            HeadSpec::Relu,
            HeadSpec::Dropout(0.5),
            linear(HIDDEN, HIDDEN),
            HeadSpec::Relu,
            linear(HIDDEN, num_classes),
        ],
    }
}
