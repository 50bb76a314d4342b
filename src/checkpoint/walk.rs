//! The convolutions of a zoo model by their key prefix (`features.3`, `fc6`,
//! `layer2.0.downsample.0`, ...).

use crate::models::{ConvLayer, FeatureLayer, Model};

/// Every convolution of `model` with its key prefix, in model order.
pub(crate) fn convs(model: &Model) -> Vec<(String, &ConvLayer)> {
    let mut out = Vec::new();
    fn features<'a>(
        prefix: &str,
        layers: &'a [FeatureLayer],
        out: &mut Vec<(String, &'a ConvLayer)>,
    ) {
        for (i, layer) in layers.iter().enumerate() {
            if let FeatureLayer::Conv(conv) = layer {
                out.push((format!("{prefix}.{i}"), conv));
            }
        }
    }
    match model {
        Model::ConvNet(net) => {
            features("features", &net.features, &mut out);
            if let Some(fc6) = &net.fc6 {
                out.push(("fc6".to_string(), fc6));
            }
        }
        Model::ResNet(net) => {
            out.push(("conv1".to_string(), &net.conv1));
            let stages = [&net.layer1, &net.layer2, &net.layer3, &net.layer4];
            for (s, blocks) in stages.into_iter().enumerate() {
                for (b, block) in blocks.iter().enumerate() {
                    let name = format!("layer{}.{b}", s + 1);
                    out.push((format!("{name}.conv1"), &block.conv1));
                    out.push((format!("{name}.conv2"), &block.conv2));
                    if let Some(conv3) = &block.conv3 {
                        out.push((format!("{name}.conv3"), conv3));
                    }
                    features(&format!("{name}.downsample"), &block.downsample, &mut out);
                }
            }
        }
    }
    out
}
