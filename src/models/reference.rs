//! The whole-network figures SPEC and the paper report, and notes on how this project's
//! count of the same network compares (why it differs where it does). The counts are
//! never adjusted to match: the notes explain.

use super::registry::Arch;
use super::report::{bytes, CostReport};
use super::resnet::ResNetDepth;
use super::variant::{ChannelAmount, ChannelSettings, ChannelStep, Variant};
use super::vgg::{VggHead, VggTable};
use super::ModelConfig;
use crate::layer::ChannelMode;

/// `value / 1e6` with two decimals and `M`.
pub fn millions(value: u64) -> String {
    format!("{:.2} M", value as f64 / 1e6)
}

/// `value / 1e9` with two decimals and `G`.
pub fn giga(value: u64) -> String {
    format!("{:.2} G", value as f64 / 1e9)
}

/// `value` with two decimals in the largest unit of G, M, k that keeps it at least 1.
pub fn scaled(value: u64) -> String {
    let v = value as f64;
    match value {
        0..=999 => value.to_string(),
        1_000..=999_999 => format!("{:.2} k", v / 1e3),
        1_000_000..=999_999_999 => format!("{:.2} M", v / 1e6),
        _ => format!("{:.2} G", v / 1e9),
    }
}

/// Float32 bytes of `values` in MiB (2^20 bytes), two decimals.
pub fn mib(values: u64) -> String {
    format!("{:.2} MiB", bytes(values) as f64 / (1u64 << 20) as f64)
}

/// Whether `config` at `report`'s input is the ImageNet setting the figures are for.
fn imagenet_setting(config: &ModelConfig, report: &CostReport) -> bool {
    report.input == [3, 224, 224] && config.num_classes == 1000
}

/// Notes comparing `report` (of `config`) with the published figures, when there are
/// any for this model; empty otherwise.
pub fn notes(config: &ModelConfig, report: &CostReport) -> Vec<String> {
    if !imagenet_setting(config, report) {
        return Vec::new();
    }
    match &config.arch {
        Arch::Vgg(vgg) if vgg.table == VggTable::D && vgg.head == VggHead::ImageNet => {
            vgg16_notes(config, report, vgg.batch_norm)
        }
        Arch::ResNet(ResNetDepth::R50) => resnet50_notes(config, report),
        _ => Vec::new(),
    }
}

fn vgg16_notes(config: &ModelConfig, report: &CostReport, batch_norm: bool) -> Vec<String> {
    let total = report.total();
    let ours = format!(
        "this report: {} parameters, {} MACs (paper count)",
        millions(total.params),
        giga(total.macs_paper)
    );
    let mut notes = match config.variant {
        Variant::Dense => vec![format!(
            "SPEC (VGG-16, 224x224, 1000 classes, dense): 138.36 M parameters, 15.47 G MACs; {ours}"
        )],
        Variant::Spatial => vec![format!(
            "SPEC (VGG-16, 224x224, 1000 classes, spatial versatile): 53.93 M parameters, 8.59 G MACs (paper count); {ours}"
        )],
        Variant::SpatialChannel(_) => vec![
            "SPEC gives no parameter or MAC figures for the spatial + channel VGG-16 (only its accuracy, 70.4 / 89.6)".to_string(),
        ],
    };
    if batch_norm {
        notes.push(format!(
            "SPEC's figures are for VGG-16 without batch norm; the batch norm here adds {} parameters ({} running statistics as buffers) and {} MACs",
            report.params_batch_norm(),
            total.buffers,
            giga(
                report
                    .layers
                    .iter()
                    .filter(|r| r.kind == "BatchNorm2d")
                    .map(|r| r.cost.macs_paper)
                    .sum()
            )
        ));
    }
    notes
}

fn resnet50_notes(config: &ModelConfig, report: &CostReport) -> Vec<String> {
    let total = report.total();
    let no_bn = report.params_without_batch_norm();
    let authors_no_bn = report.params_authors() - report.params_batch_norm();
    let (name, reported) = match config.variant {
        Variant::Dense => ("baseline", "97.2 MB, 4.1 G FLOPs"),
        Variant::Spatial => ("Versatile-v1", "75.6 MB, 3.2 G FLOPs"),
        Variant::SpatialChannel(_) => ("Versatile-v2", "41.7 MB (11.0 M parameters), 3.0 G FLOPs"),
    };
    let stored = if authors_no_bn == no_bn {
        String::new()
    } else {
        format!(
            "; this project stores only the c - delta channels used: {} without batch norm",
            mib(no_bn)
        )
    };
    let mut notes = vec![
        format!(
            "Reported for ResNet-50 {name} (224x224): {reported}; this report: {} parameters ({} incl. batch norm), {} MACs paper count, {} nested",
            millions(total.params),
            mib(total.params),
            giga(total.macs_paper),
            giga(total.macs_nested),
        ),
        format!(
            "The reported MB match float32 convolution + fc parameters without batch norm, in MiB, truncated to one decimal, counted as the authors' code allocates them (weight [m, c, d, d], unused delta channels included): here {}{stored}",
            mib(authors_no_bn),
        ),
        "The reported 'FLOPs' are multiply-adds (MACs) in this report's terms (dense ResNet-50: 4.1 G)".to_string(),
    ];
    if let Variant::SpatialChannel(_) = config.variant {
        notes.push(format!(
            "Versatile-v2 is n_c = 2 on every conv, 1x1 and downsampling included. Read as delta = g = 1 (the default spatial+channel, the authors' first code) it gives {} parameters (11.0 M) and {} without batch norm ({} as the authors allocate; 41.7 MB), but its MACs stay near v1's ({} paper count, {} nested) since c_hat = c - 1",
            grouped(total.params),
            mib(no_bn),
            mib(authors_no_bn),
            giga(total.macs_paper),
            giga(total.macs_nested),
        ));
        let alternative = ModelConfig {
            variant: Variant::SpatialChannel(ChannelSettings {
                amount: ChannelAmount::Ratio(1.0 / 16.0),
                step: ChannelStep::Windows(2),
                mode: ChannelMode::Shared,
                max_kernel: None,
            }),
            ..config.clone()
        };
        if let Ok(alt) = alternative.cost_report([224, 224]) {
            let alt_total = alt.total();
            notes.push(format!(
                "The reported 3.0 G fits another reading: delta = g = c/16 per layer (variant {}) gives {} MACs paper count; parameters counted as the authors' code allocates them do not depend on delta, so it also gives {} parameters and {} (11.0 M, 41.7 MB), while the c - delta channels actually used are {} parameters. The paper does not say which delta it used; the default here stays delta = 1",
                alternative.variant,
                giga(alt_total.macs_paper),
                grouped(alt.params_authors()),
                mib(alt.params_authors() - alt.params_batch_norm()),
                grouped(alt_total.params),
            ));
        }
    }
    notes
}

/// `1234567` as `1,234,567`.
pub fn grouped(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
