//! The variant switch shared by every model: dense, spatial or spatial + channel
//! versatile filters, and how it resolves for one convolution.
//!
//! # Syntax (`FromStr` / `Display`)
//!
//! ```text
//! dense
//! spatial
//! spatial+channel                      # delta=1,g=1,mode=shared (n_c = 2 everywhere)
//! spatial+channel:delta=2,g=1          # n_c = 3
//! spatial+channel:delta=4,windows=2    # g = delta / (windows - 1) = 4
//! spatial+channel:ratio=0.25,windows=2,mode=sliding
//! ```
//!
//! Options after `spatial+channel:` are `key=value` pairs separated by commas:
//! - `delta=N`: the channel offset range of every layer, or `ratio=R` (`0 <= R < 1`):
//!   `delta = floor(R * c)` for a layer with `c` input channels. Default `delta=1`.
//! - `g=N`: the channel stride between windows (`n_c = delta / g + 1`), or `windows=N`
//!   (`N >= 1`, alias `nc`): the number of windows `n_c`, so `g = delta / (N - 1)`.
//!   Default `g=1`.
//! - `mode=shared|sliding`: how windows share weights ([`ChannelMode`]). Default `shared`.
//! - `max_kernel=K`: channel windows only on convolutions whose kernel is at most
//!   `K×K`; larger kernels get spatial versatile filters only (e.g. `max_kernel=3`
//!   keeps a VGG's 7×7 `fc6` or a ResNet's 7×7 stem spatial-only). Default: every kernel.
//!
//! # Which layers
//! - `spatial` makes every convolution with a kernel larger than 1×1 versatile (delta 0);
//!   1×1 convolutions stay plain `Conv2d` (a 1×1 filter has no smaller crop).
//! - `spatial+channel` makes every convolution versatile, 1×1 included, with the
//!   channel windows above (spatial crops too where the kernel is larger than 1×1).
//! - Linear layers always stay dense.
//! - A layer whose input has too few channels for the requested delta gets the largest
//!   delta that fits (`delta < c`, a multiple of `g`, or of `windows - 1`); when none
//!   does (a 1-channel input, e.g. Fashion-MNIST's first conv) the layer is spatial
//!   only. The cost report shows the delta each layer got.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::layer::ChannelMode;

/// Which filters a model's convolutions use.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Variant {
    /// Plain `Conv2d` everywhere (the baseline).
    #[default]
    Dense,
    /// Spatial versatile filters on every convolution with a kernel larger than 1×1
    /// (the authors' VGG-16 example; ResNet "Versatile-v1").
    Spatial,
    /// Spatial and channel versatile filters on every convolution, 1×1 included
    /// (ResNet "Versatile-v2" with the default `delta=1,g=1`, i.e. `n_c = 2`).
    SpatialChannel(ChannelSettings),
}

/// The channel offset range of each layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum ChannelAmount {
    /// The same `delta` on every layer.
    Delta(usize),
    /// `delta = floor(ratio * c)` for a layer with `c` input channels.
    Ratio(f64),
}

/// How far apart the channel windows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelStep {
    /// A fixed channel stride `g` (`n_c = delta / g + 1`).
    G(usize),
    /// A fixed number of windows `n_c` (`g = delta / (n_c - 1)`).
    Windows(usize),
}

/// The channel settings of [`Variant::SpatialChannel`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChannelSettings {
    /// The channel offset range `delta`.
    pub amount: ChannelAmount,
    /// The window spacing.
    pub step: ChannelStep,
    /// Weight sharing between windows.
    pub mode: ChannelMode,
    /// Channel windows only on kernels up to this side (`None`: every kernel).
    #[serde(default)]
    pub max_kernel: Option<usize>,
}

impl Default for ChannelSettings {
    /// `delta=1,g=1,mode=shared`: two windows on every layer (the authors' first code
    /// and ResNet Versatile-v2).
    fn default() -> Self {
        Self {
            amount: ChannelAmount::Delta(1),
            step: ChannelStep::G(1),
            mode: ChannelMode::Shared,
            max_kernel: None,
        }
    }
}

/// What one convolution becomes under a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConvKind {
    /// A plain `Conv2d`.
    Dense,
    /// A `VConv2d` with these channel settings (`delta = 0`: spatial only).
    Versatile {
        /// Channel offset range.
        delta: usize,
        /// Channel stride.
        g: usize,
        /// Weight sharing between windows.
        mode: ChannelMode,
    },
}

impl Variant {
    /// The default `spatial+channel` variant (`delta=1,g=1,mode=shared`).
    pub fn spatial_channel() -> Self {
        Variant::SpatialChannel(ChannelSettings::default())
    }

    /// The three variant families with their default settings.
    pub fn all() -> [Variant; 3] {
        [Variant::Dense, Variant::Spatial, Variant::spatial_channel()]
    }

    /// `true` for the dense baseline.
    pub fn is_dense(&self) -> bool {
        matches!(self, Variant::Dense)
    }

    /// What a convolution with `in_channels` inputs and a `kernel × kernel` kernel
    /// becomes under this variant (see the [module docs](self) for the rules).
    pub fn conv_kind(&self, in_channels: usize, kernel: usize) -> ConvKind {
        let spatial = kernel > 1;
        match self {
            Variant::Dense => ConvKind::Dense,
            Variant::Spatial if spatial => ConvKind::Versatile {
                delta: 0,
                g: 1,
                mode: ChannelMode::Shared,
            },
            Variant::Spatial => ConvKind::Dense,
            Variant::SpatialChannel(settings) => {
                let (delta, g) = match settings.max_kernel {
                    Some(max) if kernel > max => (0, 1),
                    _ => settings.resolve(in_channels),
                };
                if delta == 0 && !spatial {
                    ConvKind::Dense
                } else {
                    ConvKind::Versatile {
                        delta,
                        g,
                        mode: settings.mode,
                    }
                }
            }
        }
    }
}

impl ChannelSettings {
    /// `(delta, g)` for a layer with `c` input channels: the requested delta, lowered to
    /// the largest value below `c` that the window spacing divides (0 when none fits).
    pub fn resolve(&self, in_channels: usize) -> (usize, usize) {
        let requested = match self.amount {
            ChannelAmount::Delta(delta) => delta,
            ChannelAmount::Ratio(ratio) => (ratio * in_channels as f64).floor() as usize,
        };
        let unit = match self.step {
            ChannelStep::G(g) => g,
            ChannelStep::Windows(windows) => windows.saturating_sub(1),
        };
        if unit == 0 {
            return (0, 1);
        }
        let delta = requested.min(in_channels.saturating_sub(1)) / unit * unit;
        if delta == 0 {
            return (0, 1);
        }
        let g = match self.step {
            ChannelStep::G(g) => g,
            ChannelStep::Windows(windows) => delta / (windows - 1),
        };
        (delta, g)
    }
}

/// A variant string that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VariantParseError {
    /// Not one of the variant families.
    #[error("unknown variant '{0}': expected dense, spatial or spatial+channel[:key=value,...]")]
    UnknownFamily(String),
    /// Options given to a family that takes none.
    #[error("variant '{0}' takes no options (only spatial+channel does)")]
    UnexpectedOptions(String),
    /// An option that is not `key=value`.
    #[error("'{0}' is not a key=value option (keys: delta, ratio, g, windows, mode, max_kernel)")]
    NotKeyValue(String),
    /// An unknown option key.
    #[error("unknown option '{0}' (keys: delta, ratio, g, windows, mode, max_kernel)")]
    UnknownKey(String),
    /// A value that does not parse or is out of range.
    #[error("invalid value '{value}' for {key}: {reason}")]
    BadValue {
        /// The option.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Two options that exclude each other, or one given twice.
    #[error("options {0} and {1} cannot be combined")]
    Conflict(String, String),
}

impl FromStr for Variant {
    type Err = VariantParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (family, options) = match text.split_once(':') {
            Some((family, options)) => (family, Some(options)),
            None => (text, None),
        };
        let family = family.to_ascii_lowercase();
        match (family.as_str(), options) {
            ("dense", None) => Ok(Variant::Dense),
            ("spatial", None) => Ok(Variant::Spatial),
            ("dense" | "spatial", Some(_)) => Err(VariantParseError::UnexpectedOptions(family)),
            ("spatial+channel", options) => {
                parse_channel_options(options.unwrap_or("")).map(Variant::SpatialChannel)
            }
            _ => Err(VariantParseError::UnknownFamily(text.to_string())),
        }
    }
}

fn parse_channel_options(options: &str) -> Result<ChannelSettings, VariantParseError> {
    let mut settings = ChannelSettings::default();
    // Which key set the amount / the step / the mode, to refuse conflicting options.
    let mut amount_key: Option<&'static str> = None;
    let mut step_key: Option<&'static str> = None;
    let mut mode_key: Option<&'static str> = None;
    let mut kernel_key: Option<&'static str> = None;
    let claim = |slot: &mut Option<&'static str>, name: &'static str| match slot.replace(name) {
        Some(previous) => Err(VariantParseError::Conflict(
            previous.to_string(),
            name.to_string(),
        )),
        None => Ok(()),
    };
    for option in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| VariantParseError::NotKeyValue(option.to_string()))?;
        let (key, value) = (key.trim(), value.trim());
        let bad = |reason: &str| VariantParseError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let integer = || {
            value
                .parse::<usize>()
                .map_err(|_| bad("not a whole number"))
        };
        let positive = || match integer()? {
            0 => Err(bad("must be at least 1")),
            v => Ok(v),
        };
        match key {
            "delta" => {
                claim(&mut amount_key, "delta")?;
                settings.amount = ChannelAmount::Delta(integer()?);
            }
            "ratio" => {
                claim(&mut amount_key, "ratio")?;
                let ratio: f64 = value.parse().map_err(|_| bad("not a number"))?;
                if !(0.0..1.0).contains(&ratio) {
                    return Err(bad("must be in [0, 1)"));
                }
                settings.amount = ChannelAmount::Ratio(ratio);
            }
            "g" => {
                claim(&mut step_key, "g")?;
                settings.step = ChannelStep::G(positive()?);
            }
            "windows" | "nc" | "n_c" => {
                claim(&mut step_key, "windows")?;
                settings.step = ChannelStep::Windows(positive()?);
            }
            "mode" => {
                claim(&mut mode_key, "mode")?;
                settings.mode = value.parse().map_err(|err: String| bad(&err))?;
            }
            "max_kernel" => {
                claim(&mut kernel_key, "max_kernel")?;
                settings.max_kernel = Some(positive()?);
            }
            other => return Err(VariantParseError::UnknownKey(other.to_string())),
        }
    }
    Ok(settings)
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Variant::Dense => f.write_str("dense"),
            Variant::Spatial => f.write_str("spatial"),
            Variant::SpatialChannel(settings) if *settings == ChannelSettings::default() => {
                f.write_str("spatial+channel")
            }
            Variant::SpatialChannel(settings) => {
                f.write_str("spatial+channel:")?;
                match settings.amount {
                    ChannelAmount::Delta(delta) => write!(f, "delta={delta}")?,
                    ChannelAmount::Ratio(ratio) => write!(f, "ratio={ratio}")?,
                }
                match settings.step {
                    ChannelStep::G(g) => write!(f, ",g={g}")?,
                    ChannelStep::Windows(windows) => write!(f, ",windows={windows}")?,
                }
                write!(f, ",mode={}", settings.mode)?;
                match settings.max_kernel {
                    Some(max) => write!(f, ",max_kernel={max}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl From<Variant> for String {
    fn from(variant: Variant) -> String {
        variant.to_string()
    }
}

impl TryFrom<String> for Variant {
    type Error = VariantParseError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        for text in [
            "dense",
            "spatial",
            "spatial+channel",
            "spatial+channel:delta=2,g=1,mode=shared",
            "spatial+channel:delta=4,windows=2,mode=sliding",
            "spatial+channel:ratio=0.25,g=2,mode=shared",
            "spatial+channel:delta=1,g=1,mode=shared,max_kernel=3",
        ] {
            let variant: Variant = text.parse().unwrap();
            assert_eq!(variant.to_string(), text);
        }
        let variant: Variant = "spatial+channel:mode=sliding".parse().unwrap();
        assert_eq!(
            variant,
            Variant::SpatialChannel(ChannelSettings {
                mode: ChannelMode::Sliding,
                ..ChannelSettings::default()
            })
        );
    }

    #[test]
    fn rejects_bad_text() {
        for (text, expected) in [
            ("sparse", "unknown variant"),
            ("spatial:delta=1", "takes no options"),
            ("spatial+channel:delta", "key=value"),
            ("spatial+channel:depth=2", "unknown option"),
            ("spatial+channel:delta=-1", "whole number"),
            ("spatial+channel:ratio=1.5", "[0, 1)"),
            ("spatial+channel:g=0", "at least 1"),
            ("spatial+channel:delta=2,ratio=0.5", "cannot be combined"),
            ("spatial+channel:g=2,windows=2", "cannot be combined"),
            ("spatial+channel:mode=diagonal", "unknown channel mode"),
            ("spatial+channel:max_kernel=0", "at least 1"),
        ] {
            let err = text.parse::<Variant>().unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn resolves_per_layer() {
        let v = Variant::spatial_channel();
        let versatile = |delta, g| ConvKind::Versatile {
            delta,
            g,
            mode: ChannelMode::Shared,
        };
        assert_eq!(v.conv_kind(64, 1), versatile(1, 1));
        assert_eq!(v.conv_kind(3, 7), versatile(1, 1));
        // A 1-channel input leaves no room for a second window: spatial only.
        assert_eq!(v.conv_kind(1, 5), versatile(0, 1));
        assert_eq!(Variant::Spatial.conv_kind(64, 1), ConvKind::Dense);
        assert_eq!(Variant::Spatial.conv_kind(64, 3), versatile(0, 1));
        assert_eq!(Variant::Dense.conv_kind(64, 3), ConvKind::Dense);

        let ratio: Variant = "spatial+channel:ratio=0.5,windows=3".parse().unwrap();
        // floor(0.5 * 64) = 32, a multiple of windows - 1 = 2: g = 16.
        assert_eq!(ratio.conv_kind(64, 3), versatile(32, 16));
        // floor(0.5 * 3) = 1, lowered to a multiple of 2: none fits, spatial only.
        assert_eq!(ratio.conv_kind(3, 3), versatile(0, 1));
        // ... and a 1x1 layer with no windows stays dense.
        assert_eq!(ratio.conv_kind(3, 1), ConvKind::Dense);

        let big: Variant = "spatial+channel:delta=8,g=2".parse().unwrap();
        assert_eq!(big.conv_kind(4, 3), versatile(2, 2));

        // Channel windows up to 3x3 kernels: a 7x7 layer is spatial only.
        let small: Variant = "spatial+channel:max_kernel=3".parse().unwrap();
        assert_eq!(small.conv_kind(32, 3), versatile(1, 1));
        assert_eq!(small.conv_kind(32, 1), versatile(1, 1));
        assert_eq!(small.conv_kind(32, 7), versatile(0, 1));
    }
}
