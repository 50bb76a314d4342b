//! VGG as data: torchvision's configuration letters (and any custom table), with the
//! authors' ImageNet head or a small-input head.
//!
//! - ImageNet form (`vgg11` ... `vgg19_bn`): the table's 3×3 convolutions (padding 1,
//!   batch norm after each for `_bn`), 2×2 max pools, adaptive average pooling to 7×7
//!   (torchvision; the identity at 224×224), then the authors' `fc6`: a 7×7 convolution
//!   512 → 4096 with padding 0 on the 7×7 map (versatile like every other convolution),
//!   and the classifier ReLU, Dropout, Linear 4096→4096, ReLU, Dropout,
//!   Linear 4096→classes (the authors' `classifier.0` ... `classifier.5`).
//! - Small form (`vgg16_small`, `vgg_small`, `vgg_bn:TABLE`, ...): the table, max pools
//!   in ceil mode (so 28×28 inputs pass five pools: 28, 14, 7, 4, 2, 1; even sizes are
//!   unaffected), global average pooling and one linear layer to the classes.
//! - Small authors' form (`vgg_fc6:HIDDEN:TABLE`, `vgg_bn_fc6:HIDDEN:TABLE`): the
//!   ImageNet form's head at a small width, for small inputs (e.g. two pools on 28×28
//!   images leave the 7×7 map `fc6` expects): max pools in floor mode, adaptive average
//!   pooling to 7×7, `fc6` a 7×7 convolution to `HIDDEN` channels (padding 0), then the
//!   classifier ReLU, Linear HIDDEN→HIDDEN, ReLU, Dropout, Linear HIDDEN→classes
//!   (`classifier.1` and `classifier.4`). The keys are those of the small network in the
//!   authors' layout that `tests/data/torch/` holds.
//!
//! Initialization as torchvision and the authors: Kaiming-normal (fan-out) convolutions
//! with zero bias, batch norm weight 1 and bias 0, linear layers Normal(0, 0.01) with
//! zero bias.

use std::fmt;

use super::convnet::ConvNetPlan;
use super::error::ModelError;
use super::layers::{ConvSpec, FeatureSpec, HeadSpec, Init, LinearSpec, PoolSpec};
use super::variant::Variant;
use super::{at_most, MAX_CHANNELS, MAX_VGG_ENTRIES};

/// One entry of a VGG table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VggItem {
    /// A 3×3 convolution (padding 1) with this many output channels, then [batch norm]
    /// and ReLU.
    Conv(usize),
    /// A 2×2 max pool with stride 2 (`M` in torchvision's tables).
    Pool,
}

use VggItem::{Conv as C, Pool as M};

/// Configuration A (VGG-11).
#[rustfmt::skip]
pub const CONFIG_A: &[VggItem] = &[
    C(64), M, C(128), M, C(256), C(256), M, C(512), C(512), M, C(512), C(512), M,
];
/// Configuration B (VGG-13).
#[rustfmt::skip]
pub const CONFIG_B: &[VggItem] = &[
    C(64), C(64), M, C(128), C(128), M, C(256), C(256), M, C(512), C(512), M,
    C(512), C(512), M,
];
/// Configuration D (VGG-16).
#[rustfmt::skip]
pub const CONFIG_D: &[VggItem] = &[
    C(64), C(64), M, C(128), C(128), M, C(256), C(256), C(256), M,
    C(512), C(512), C(512), M, C(512), C(512), C(512), M,
];
/// Configuration E (VGG-19).
#[rustfmt::skip]
pub const CONFIG_E: &[VggItem] = &[
    C(64), C(64), M, C(128), C(128), M, C(256), C(256), C(256), C(256), M,
    C(512), C(512), C(512), C(512), M, C(512), C(512), C(512), C(512), M,
];
/// The small VGG of the training issue: 32-32-M-64-64-M-128-128-M.
#[rustfmt::skip]
pub const CONFIG_SMALL: &[VggItem] = &[
    C(32), C(32), M, C(64), C(64), M, C(128), C(128), M,
];

/// Which table a VGG uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VggTable {
    /// Configuration A (VGG-11).
    A,
    /// Configuration B (VGG-13).
    B,
    /// Configuration D (VGG-16).
    D,
    /// Configuration E (VGG-19).
    E,
    /// [`CONFIG_SMALL`].
    Small,
    /// Any table, e.g. parsed from `32-32-M-64-64-M`.
    Custom(Vec<VggItem>),
}

impl VggTable {
    /// The table's entries.
    pub fn items(&self) -> &[VggItem] {
        match self {
            VggTable::A => CONFIG_A,
            VggTable::B => CONFIG_B,
            VggTable::D => CONFIG_D,
            VggTable::E => CONFIG_E,
            VggTable::Small => CONFIG_SMALL,
            VggTable::Custom(items) => items,
        }
    }

    /// Weight layers of the ImageNet form (convolutions + 3), as in "VGG-16".
    pub fn depth(&self) -> usize {
        self.items()
            .iter()
            .filter(|item| matches!(item, VggItem::Conv(_)))
            .count()
            + 3
    }

    /// Parses a table such as `32-32-M-64-64-M` (`-` or `,` between entries).
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::BadVggTable {
            table: text.to_string(),
            reason,
        };
        let items = text
            .split(['-', ','])
            .map(str::trim)
            .map(|entry| match entry {
                "M" | "m" => Ok(VggItem::Pool),
                _ => match entry.parse::<usize>() {
                    Ok(0) => Err(bad("a convolution needs at least 1 channel".into())),
                    Ok(channels) => Ok(VggItem::Conv(channels)),
                    Err(_) => Err(bad(format!("'{entry}' is neither a channel count nor M"))),
                },
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !items.iter().any(|item| matches!(item, VggItem::Conv(_))) {
            return Err(bad("it has no convolution".into()));
        }
        let table = VggTable::Custom(items);
        table.check_limits().map_err(|err| bad(err.to_string()))?;
        Ok(table)
    }

    /// Checks the number of entries ([`MAX_VGG_ENTRIES`]) and the width of every
    /// convolution ([`MAX_CHANNELS`]).
    pub fn check_limits(&self) -> Result<(), ModelError> {
        let items = self.items();
        at_most(
            "the number of VGG table entries",
            items.len(),
            MAX_VGG_ENTRIES,
        )?;
        for item in items {
            if let VggItem::Conv(channels) = *item {
                at_most("a VGG convolution's channels", channels, MAX_CHANNELS)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for VggTable {
    /// The table as `32-32-M-64-64-M`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self
            .items()
            .iter()
            .map(|item| match item {
                VggItem::Conv(channels) => channels.to_string(),
                VggItem::Pool => "M".to_string(),
            })
            .collect();
        f.write_str(&entries.join("-"))
    }
}

/// What follows a VGG's feature layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VggHead {
    /// Adaptive pool to 7×7, `fc6` as a 7×7 convolution, two linear layers.
    ImageNet,
    /// Global average pooling and one linear layer (pools in ceil mode).
    Small,
    /// The ImageNet head at width `hidden`: adaptive pool to 7×7, `fc6` a 7×7
    /// convolution to `hidden` channels, ReLU, Linear, ReLU, Dropout, Linear.
    Fc6 {
        /// Output channels of `fc6` and width of the hidden linear layer.
        hidden: usize,
    },
}

/// A VGG architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VggArch {
    /// Its table.
    pub table: VggTable,
    /// Batch norm after every convolution.
    pub batch_norm: bool,
    /// Its head.
    pub head: VggHead,
}

/// Hidden width of the ImageNet head (fc6 and fc7).
const HIDDEN: usize = 4096;
/// Dropout probability of the ImageNet head.
const DROPOUT: f64 = 0.5;

impl VggArch {
    /// Checks the table and the hidden width against the limits of the zoo.
    pub fn check_limits(&self) -> Result<(), ModelError> {
        self.table.check_limits()?;
        if let VggHead::Fc6 { hidden } = self.head {
            at_most("the fc6 hidden width", hidden, MAX_CHANNELS)?;
        }
        Ok(())
    }

    /// The layer plan for `variant`, `in_channels` and `num_classes`.
    pub fn plan(&self, variant: &Variant, in_channels: usize, num_classes: usize) -> ConvNetPlan {
        let small = self.head == VggHead::Small;
        let mut features = Vec::new();
        let mut channels = in_channels;
        for item in self.table.items() {
            match *item {
                VggItem::Conv(out) => {
                    features.push(FeatureSpec::Conv(
                        ConvSpec::new(channels, out, 3, variant).with_padding(1),
                    ));
                    if self.batch_norm {
                        features.push(FeatureSpec::BatchNorm(out));
                    }
                    features.push(FeatureSpec::Relu);
                    channels = out;
                }
                VggItem::Pool => {
                    features.push(FeatureSpec::MaxPool(PoolSpec::new(2, 2).with_ceil(small)))
                }
            }
        }
        let linear = |d_input, d_output| {
            HeadSpec::Linear(LinearSpec {
                d_input,
                d_output,
                init: Init::Normal001,
            })
        };
        match self.head {
            VggHead::ImageNet => ConvNetPlan {
                features,
                avgpool: [7, 7],
                fc6: Some(ConvSpec::new(channels, HIDDEN, 7, variant)),
                classifier: vec![
                    HeadSpec::Relu,
                    HeadSpec::Dropout(DROPOUT),
                    linear(HIDDEN, HIDDEN),
                    HeadSpec::Relu,
                    HeadSpec::Dropout(DROPOUT),
                    linear(HIDDEN, num_classes),
                ],
            },
            VggHead::Small => ConvNetPlan {
                features,
                avgpool: [1, 1],
                fc6: None,
                classifier: vec![linear(channels, num_classes)],
            },
            VggHead::Fc6 { hidden } => ConvNetPlan {
                features,
                avgpool: [7, 7],
                fc6: Some(ConvSpec::new(channels, hidden, 7, variant)),
                classifier: vec![
                    HeadSpec::Relu,
                    linear(hidden, hidden),
                    HeadSpec::Relu,
                    HeadSpec::Dropout(DROPOUT),
                    linear(hidden, num_classes),
                ],
            },
        }
    }
}
