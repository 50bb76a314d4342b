//! Model names: parsing, printing, and the list of everything the zoo builds.
//!
//! | name | model |
//! |---|---|
//! | `vgg11`, `vgg13`, `vgg16`, `vgg19` (+ `_bn`) | VGG, configs A/B/D/E, the authors' ImageNet form |
//! | `vgg11_small` ... `vgg19_bn_small` | the same tables, small-input form (28×28, 32×32) |
//! | `vgg_small` | the small VGG 32-32-M-64-64-M-128-128-M with batch norm |
//! | `vgg:TABLE`, `vgg_bn:TABLE` | any table in the small form, e.g. `vgg_bn:32-32-M-64-64-M` |
//! | `vgg_fc6:HIDDEN:TABLE`, `vgg_bn_fc6:HIDDEN:TABLE` | any table with the authors' `fc6` head at width HIDDEN, e.g. `vgg_fc6:64:16-M-32-M` |
//! | `resnet18`, `resnet34`, `resnet50` | ResNet (torchvision v1.5) |
//! | `alexnet` | AlexNet (torchvision) |
//! | `lenet5` | LeNet-5 |

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::ModelError;
use super::resnet::ResNetDepth;
use super::variant::Variant;
use super::vgg::{VggArch, VggHead, VggTable};
use super::ModelConfig;

/// An architecture of the zoo, before its variant, classes and input channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Arch {
    /// A VGG.
    Vgg(VggArch),
    /// A ResNet.
    ResNet(ResNetDepth),
    /// AlexNet.
    AlexNet,
    /// LeNet-5.
    LeNet5,
}

/// The lettered VGG tables with their depths.
const VGG_TABLES: [(usize, VggTable); 4] = [
    (11, VggTable::A),
    (13, VggTable::B),
    (16, VggTable::D),
    (19, VggTable::E),
];

impl Arch {
    /// Every named architecture of the zoo (custom VGG tables aside).
    pub fn all() -> Vec<Arch> {
        let mut all = Vec::new();
        for head in [VggHead::ImageNet, VggHead::Small] {
            for (_, table) in VGG_TABLES {
                for batch_norm in [false, true] {
                    all.push(Arch::Vgg(VggArch {
                        table: table.clone(),
                        batch_norm,
                        head,
                    }));
                }
            }
        }
        all.push(Arch::Vgg(VggArch {
            table: VggTable::Small,
            batch_norm: true,
            head: VggHead::Small,
        }));
        all.extend([ResNetDepth::R18, ResNetDepth::R34, ResNetDepth::R50].map(Arch::ResNet));
        all.extend([Arch::AlexNet, Arch::LeNet5]);
        all
    }

    /// Classes of the data set the architecture is made for (ImageNet: 1000, small
    /// inputs: 10).
    pub fn default_classes(&self) -> usize {
        match self {
            Arch::Vgg(vgg) if vgg.head != VggHead::ImageNet => 10,
            Arch::LeNet5 => 10,
            _ => 1000,
        }
    }

    /// Input channels of the data set it is made for (LeNet-5: 1, others: 3).
    pub fn default_in_channels(&self) -> usize {
        match self {
            Arch::LeNet5 => 1,
            _ => 3,
        }
    }

    /// The usual input side (224 for ImageNet models, 32 for small VGGs, 28 for LeNet-5).
    pub fn default_input(&self) -> usize {
        match self {
            Arch::Vgg(vgg) if vgg.head == VggHead::Small => 32,
            Arch::Vgg(vgg) if matches!(vgg.head, VggHead::Fc6 { .. }) => 28,
            Arch::LeNet5 => 28,
            _ => 224,
        }
    }

    /// One line about the architecture.
    pub fn description(&self) -> String {
        match self {
            Arch::Vgg(vgg) => {
                let bn = if vgg.batch_norm { " with batch norm" } else { "" };
                let name = match vgg.table {
                    VggTable::A | VggTable::B | VggTable::D | VggTable::E => {
                        format!("VGG-{}{bn}", vgg.table.depth())
                    }
                    _ => format!("VGG {}{bn}", vgg.table),
                };
                match vgg.head {
                    VggHead::ImageNet => format!(
                        "{name}, the authors' ImageNet form (fc6 as a versatile 7x7 conv)"
                    ),
                    VggHead::Small => format!(
                        "{name}, small-input form (ceil-mode pools, global average pooling, linear head)"
                    ),
                    VggHead::Fc6 { hidden } => format!(
                        "{name}, the authors' head at width {hidden} (fc6 as a versatile 7x7 conv)"
                    ),
                }
            }
            Arch::ResNet(depth) => format!(
                "ResNet-{} (torchvision v1.5); spatial = Versatile-v1, spatial+channel = Versatile-v2",
                depth.layers()
            ),
            Arch::AlexNet => "AlexNet (torchvision)".to_string(),
            Arch::LeNet5 => "LeNet-5 (ReLU, max pooling) for 28x28 / 32x32 images".to_string(),
        }
    }

    /// The comma-separated list of names, for error messages.
    pub fn known_names() -> String {
        Arch::all()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl FromStr for Arch {
    type Err = ModelError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let name = text.trim().to_ascii_lowercase();
        let unknown = || ModelError::UnknownModel {
            name: text.to_string(),
            known: Arch::known_names(),
        };
        if let Some((prefix, rest)) = name.split_once(':') {
            let (batch_norm, fc6) = match prefix {
                "vgg" => (false, false),
                "vgg_bn" => (true, false),
                "vgg_fc6" => (false, true),
                "vgg_bn_fc6" => (true, true),
                _ => return Err(unknown()),
            };
            let (head, table) = if fc6 {
                let bad = |reason: &str| ModelError::BadVggTable {
                    table: rest.to_string(),
                    reason: format!("{reason} (expected HIDDEN:TABLE, e.g. 64:16-M-32-M)"),
                };
                let (hidden, table) = rest.split_once(':').ok_or_else(|| bad("no hidden width"))?;
                let hidden = match hidden.trim().parse::<usize>() {
                    Ok(0) | Err(_) => {
                        return Err(bad(&format!("'{hidden}' is not a positive width")))
                    }
                    Ok(hidden) => hidden,
                };
                (VggHead::Fc6 { hidden }, table)
            } else {
                (VggHead::Small, rest)
            };
            return Ok(Arch::Vgg(VggArch {
                table: VggTable::parse(table)?,
                batch_norm,
                head,
            }));
        }
        match name.as_str() {
            "alexnet" => return Ok(Arch::AlexNet),
            "lenet5" | "lenet-5" | "lenet" => return Ok(Arch::LeNet5),
            "resnet18" => return Ok(Arch::ResNet(ResNetDepth::R18)),
            "resnet34" => return Ok(Arch::ResNet(ResNetDepth::R34)),
            "resnet50" => return Ok(Arch::ResNet(ResNetDepth::R50)),
            "vgg_small" => {
                return Ok(Arch::Vgg(VggArch {
                    table: VggTable::Small,
                    batch_norm: true,
                    head: VggHead::Small,
                }))
            }
            _ => {}
        }
        let rest = name.strip_prefix("vgg").ok_or_else(unknown)?;
        let (rest, head) = match rest.strip_suffix("_small") {
            Some(rest) => (rest, VggHead::Small),
            None => (rest, VggHead::ImageNet),
        };
        let (depth, batch_norm) = match rest.strip_suffix("_bn") {
            Some(depth) => (depth, true),
            None => (rest, false),
        };
        let table = VGG_TABLES
            .into_iter()
            .find(|(d, _)| d.to_string() == depth)
            .map(|(_, table)| table)
            .ok_or_else(unknown)?;
        Ok(Arch::Vgg(VggArch {
            table,
            batch_norm,
            head,
        }))
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::Vgg(vgg) => {
                let bn = if vgg.batch_norm { "_bn" } else { "" };
                match (&vgg.table, vgg.head) {
                    (table, VggHead::Fc6 { hidden }) => write!(f, "vgg{bn}_fc6:{hidden}:{table}"),
                    (VggTable::Small, VggHead::Small) if vgg.batch_norm => f.write_str("vgg_small"),
                    (VggTable::Small | VggTable::Custom(_), _) => {
                        write!(f, "vgg{bn}:{}", vgg.table)
                    }
                    (table, head) => {
                        let small = if head == VggHead::Small { "_small" } else { "" };
                        write!(f, "vgg{}{bn}{small}", table.depth())
                    }
                }
            }
            Arch::ResNet(depth) => write!(f, "resnet{}", depth.layers()),
            Arch::AlexNet => f.write_str("alexnet"),
            Arch::LeNet5 => f.write_str("lenet5"),
        }
    }
}

impl From<Arch> for String {
    fn from(arch: Arch) -> String {
        arch.to_string()
    }
}

impl TryFrom<String> for Arch {
    type Error = ModelError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

/// A model of the registry, for listings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// The name to build it by.
    pub name: String,
    /// One line about it.
    pub description: String,
    /// Default input `[C, H, W]`.
    pub default_input: [usize; 3],
    /// The smallest square input side it takes.
    pub min_input: usize,
    /// Default number of classes.
    pub num_classes: usize,
    /// The variants it supports, with what each means for it.
    pub variants: Vec<(String, String)>,
}

/// Every model of the zoo with its defaults and variants.
pub fn models() -> Vec<ModelInfo> {
    Arch::all()
        .into_iter()
        .map(|arch| {
            let config = ModelConfig::new(arch.clone(), Variant::Dense);
            let resnet = matches!(arch, Arch::ResNet(_));
            let variants = Variant::all()
                .into_iter()
                .map(|variant| {
                    let meaning = match (&variant, resnet) {
                        (Variant::Dense, _) => "plain Conv2d everywhere",
                        (Variant::Spatial, true) => {
                            "Versatile-v1: spatial versatile on every conv with d > 1, stem included"
                        }
                        (Variant::Spatial, false) => "spatial versatile on every conv with d > 1",
                        (Variant::SpatialChannel(_), true) => {
                            "Versatile-v2: plus channel versatile (n_c = 2) on every conv, 1x1 included"
                        }
                        (Variant::SpatialChannel(_), false) => {
                            "spatial + channel versatile (delta=1, g=1) on every conv"
                        }
                    };
                    (variant.to_string(), meaning.to_string())
                })
                .collect();
            ModelInfo {
                name: arch.to_string(),
                description: arch.description(),
                default_input: [
                    config.in_channels,
                    arch.default_input(),
                    arch.default_input(),
                ],
                min_input: config.min_input().unwrap_or(0),
                num_classes: config.num_classes,
                variants,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for arch in Arch::all() {
            let name = arch.to_string();
            assert_eq!(name.parse::<Arch>().unwrap(), arch, "{name}");
        }
        let custom: Arch = "vgg_bn:16-M-32".parse().unwrap();
        assert_eq!(custom.to_string(), "vgg_bn:16-M-32");
        let fc6: Arch = "vgg_fc6:64:16-M-32-M".parse().unwrap();
        assert_eq!(fc6.to_string(), "vgg_fc6:64:16-M-32-M");
        assert_eq!(fc6.default_input(), 28);
        assert_eq!("VGG16_BN".parse::<Arch>().unwrap().to_string(), "vgg16_bn");
    }

    #[test]
    fn bad_names_are_refused() {
        for (name, expected) in [
            ("vgg17", "unknown model"),
            ("resnet101", "unknown model"),
            ("vgg:32-x-M", "neither a channel count nor M"),
            ("vgg:M-M", "no convolution"),
            ("vgg:0-M", "at least 1 channel"),
            ("mlp:3", "unknown model"),
            ("vgg_fc6:x:16-M", "not a positive width"),
            ("vgg_fc6:0:16-M", "not a positive width"),
            ("vgg_bn_fc6:16", "no hidden width"),
        ] {
            let err = name.parse::<Arch>().unwrap_err().to_string();
            assert!(err.contains(expected), "{name}: {err}");
        }
    }
}
