//! `versatile layer`: geometry and costs of one layer.

use anyhow::Result;
use burn::nn::PaddingConfig2d;
use clap::Args;
use serde_json::json;
use versatile::cost;
use versatile::layer::{ChannelMode, VConv2dConfig};

use super::UsageError;

/// Arguments of `versatile layer`.
#[derive(Debug, Args)]
pub struct LayerArgs {
    /// Input channels c.
    #[arg(long = "in", value_name = "C")]
    in_channels: usize,
    /// Output channels n.
    #[arg(long = "out", value_name = "N")]
    out_channels: usize,
    /// Kernel side d (square kernels).
    #[arg(long, value_name = "D")]
    kernel: usize,
    /// Input size, HxW (or one number for a square input).
    #[arg(long, value_name = "HxW", value_parser = parse_hw)]
    input: [usize; 2],
    /// Stride.
    #[arg(long, default_value_t = 1)]
    stride: usize,
    /// Padding: a number, `same`, `valid`, or `top,left,bottom,right`.
    #[arg(long, default_value = "0", value_parser = parse_padding)]
    padding: PaddingConfig2d,
    /// Dilation.
    #[arg(long, default_value_t = 1)]
    dilation: usize,
    /// Groups (spatial-only versatile filters).
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// Channel offset range delta (0 = spatial only).
    #[arg(long, default_value_t = 0)]
    delta: usize,
    /// Channel stride g of the channel windows.
    #[arg(long, default_value_t = 1)]
    g: usize,
    /// Channel mode: shared or sliding.
    #[arg(long, default_value = "shared")]
    mode: ChannelMode,
    /// No bias.
    #[arg(long)]
    no_bias: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Parses `HxW` (or one number for a square) into `[height, width]`.
pub(crate) fn parse_hw(text: &str) -> Result<[usize; 2], String> {
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("'{text}' is not HxW (e.g. 224x224)"))
    };
    match text.split_once(['x', 'X']) {
        Some((h, w)) => Ok([parse(h)?, parse(w)?]),
        None => parse(text).map(|v| [v, v]),
    }
}

fn parse_padding(text: &str) -> Result<PaddingConfig2d, String> {
    match text {
        "same" => return Ok(PaddingConfig2d::Same),
        "valid" => return Ok(PaddingConfig2d::Valid),
        _ => {}
    }
    let values: Result<Vec<usize>, _> = text.split(',').map(|v| v.trim().parse()).collect();
    match values.as_deref() {
        Ok([p]) => Ok(PaddingConfig2d::Explicit(*p, *p, *p, *p)),
        Ok([t, l, b, r]) => Ok(PaddingConfig2d::Explicit(*t, *l, *b, *r)),
        _ => Err(format!(
            "'{text}' is not a padding: use a number, 'same', 'valid' or 'top,left,bottom,right'"
        )),
    }
}

/// Runs `versatile layer`.
pub fn run(args: &LayerArgs) -> Result<()> {
    let config = VConv2dConfig::new([args.in_channels, args.out_channels], [args.kernel; 2])
        .with_stride([args.stride; 2])
        .with_dilation([args.dilation; 2])
        .with_padding(args.padding.clone())
        .with_groups(args.groups)
        .with_bias(!args.no_bias)
        .with_delta(args.delta)
        .with_g(args.g)
        .with_channel_mode(args.mode);
    let geometry = config.geometry().map_err(UsageError::from_display)?;
    let [height, width] = args.input;
    let pads = geometry.resolve_padding(&config.padding, height, width);
    let [out_h, out_w] = geometry
        .output_size(height, width, pads)
        .map_err(UsageError::from_display)?;
    let bias = !args.no_bias;
    let layer = cost::vconv2d(&geometry, bias, [out_h, out_w]);
    let dense_params = cost::dense_twin_params(&geometry, bias);

    if args.json {
        let report = json!({
            "in_channels": geometry.in_channels,
            "out_channels": geometry.out_channels,
            "kernel": geometry.kernel,
            "s": geometry.s,
            "n_c": geometry.n_c,
            "primary": geometry.primary,
            "c_hat": geometry.c_hat,
            "weight_shape": geometry.weight_shape(),
            "padding": [pads[0].0, pads[1].0, pads[0].1, pads[1].1],
            "out_h": out_h,
            "out_w": out_w,
            "params": layer.params,
            "dense_params": dense_params,
            "bytes": layer.param_bytes(),
            "dense_bytes": dense_params * cost::BYTES_PER_VALUE,
            "macs_dense": layer.macs_dense,
            "macs_paper": layer.macs_paper,
            "macs_nested": layer.macs_nested,
            "dense_order_is_identity": geometry.groups == 1,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }

    let g = &geometry;
    println!(
        "VConv2d {} -> {}, kernel {}x{}, stride {}, dilation {}, groups {}, delta {}, g {}, {} mode",
        g.in_channels, g.out_channels, g.kernel, g.kernel, args.stride, args.dilation,
        g.groups, g.delta, g.g, g.mode
    );
    println!(
        "input {height}x{width}, padding (top, left, bottom, right) = ({}, {}, {}, {}), output {out_h}x{out_w}",
        pads[0].0, pads[1].0, pads[0].1, pads[1].1
    );
    println!();
    let rows = [
        ("spatial secondary filters s", g.s.to_string()),
        ("channel windows n_c", g.n_c.to_string()),
        ("primary filters m", g.primary.to_string()),
        ("primary depth c_hat", g.c_hat.to_string()),
        ("weight shape", format!("{:?}", g.weight_shape())),
    ];
    for (name, value) in rows {
        println!("  {name:<30} {value:>16}");
    }
    println!();
    println!(
        "  {:<30} {:>16} {:>16} {:>8}",
        "", "versatile", "dense Conv2d", "ratio"
    );
    let ratio = |a: u64, b: u64| format!("{:.3}", a as f64 / b.max(1) as f64);
    let table = [
        ("parameters (bias included)", layer.params, dense_params),
        (
            "bytes (float32)",
            layer.param_bytes(),
            dense_params * cost::BYTES_PER_VALUE,
        ),
        ("MACs, paper count", layer.macs_paper, layer.macs_dense),
        (
            "MACs, nested evaluation",
            layer.macs_nested,
            layer.macs_dense,
        ),
    ];
    for (name, ours, dense) in table {
        println!(
            "  {name:<30} {ours:>16} {dense:>16} {:>8}",
            ratio(ours, dense)
        );
    }
    println!();
    println!(
        "MACs are multiply-adds for one image (FLOPs = 2 x MACs), bias additions not counted."
    );
    Ok(())
}
