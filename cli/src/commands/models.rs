//! `versatile models`: the models of the zoo and their variants.

use anyhow::Result;
use clap::Args;
use versatile::models::{models, Variant};

/// Arguments of `versatile models`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Print one JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `versatile models`.
pub fn run(args: &ModelsArgs) -> Result<()> {
    let list = models();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let width = list.iter().map(|m| m.name.len()).max().unwrap_or(4);
    println!(
        "{:<width$}  {:>9}  {:>7}  {:>3}  description",
        "name", "input", "classes", "min"
    );
    for model in &list {
        let [c, h, w] = model.default_input;
        println!(
            "{:<width$}  {:>9}  {:>7}  {:>3}  {}",
            model.name,
            format!("{c}x{h}x{w}"),
            model.num_classes,
            model.min_input,
            model.description
        );
    }
    println!();
    println!(
        "Custom small VGGs: vgg:TABLE or vgg_bn:TABLE, e.g. vgg_bn:32-32-M-64-64-M-128-128-M."
    );
    println!(
        "With the authors' fc6 head at width HIDDEN: vgg_fc6:HIDDEN:TABLE or vgg_bn_fc6:HIDDEN:TABLE, e.g. vgg_fc6:64:16-M-32-M."
    );
    println!("'min' is the smallest square input side the model takes.");
    println!();
    println!("Variants (every model):");
    let labels = Variant::all().map(|v| v.to_string());
    let meanings = [
        "plain Conv2d everywhere",
        "spatial versatile filters on every conv with a kernel > 1x1 (ResNet: Versatile-v1)",
        "plus channel versatile filters on every conv, 1x1 included (ResNet: Versatile-v2)",
    ];
    for (label, meaning) in labels.iter().zip(meanings) {
        println!("  {label:<16} {meaning}");
    }
    println!(
        "  spatial+channel takes options: spatial+channel:delta=N|ratio=R,g=N|windows=N,mode=shared|sliding,max_kernel=K"
    );
    println!("  (default delta=1,g=1,mode=shared: n_c = 2; a layer with too few input channels gets the largest delta that fits)");
    Ok(())
}
