//! `versatile summary`: a model's layers with their output shapes, parameters and
//! multiply-adds, totals, and the ratios against the dense variant of the same model.

use anyhow::Result;
use clap::Args;
use serde_json::json;
use versatile::cost::LayerCost;
use versatile::models::reference::{grouped, scaled};
use versatile::models::report::bytes;
use versatile::models::{reference, CostReport, CONVENTION};

use super::layer::parse_hw;
use super::{ratio, ModelArgs, UsageError};

/// Arguments of `versatile summary`.
#[derive(Debug, Args)]
pub struct SummaryArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Input size HxW (or one number); default: the model's usual size.
    #[arg(long, value_name = "HxW", value_parser = parse_hw)]
    input: Option<[usize; 2]>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn shape(dims: &[usize]) -> String {
    dims.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("x")
}

/// Runs `versatile summary`.
pub fn run(args: &SummaryArgs) -> Result<()> {
    let config = args.model.config()?;
    let side = config.arch.default_input();
    let input = args.input.unwrap_or([side, side]);
    let report = config
        .cost_report(input)
        .map_err(UsageError::from_display)?;
    let dense = config
        .dense_twin()
        .cost_report(input)
        .map_err(UsageError::from_display)?;
    let mut notes = report.notes.clone();
    notes.extend(reference::notes(&config, &report));

    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json_report(&report, &dense, &notes))?
        );
    } else {
        print_table(&report, &dense, &notes);
    }
    Ok(())
}

fn totals_json(report: &CostReport) -> serde_json::Value {
    let t = report.total();
    json!({
        "params": t.params,
        "buffers": t.buffers,
        "macs_dense": t.macs_dense,
        "macs_paper": t.macs_paper,
        "macs_nested": t.macs_nested,
        "flops_dense": 2 * t.macs_dense,
        "flops_paper": 2 * t.macs_paper,
        "flops_nested": 2 * t.macs_nested,
        "param_bytes": t.param_bytes(),
        "stored_bytes": t.stored_bytes(),
        "params_batch_norm": report.params_batch_norm(),
        "params_dense": report.params_dense(),
        "params_authors": report.params_authors(),
    })
}

fn json_report(report: &CostReport, dense: &CostReport, notes: &[String]) -> serde_json::Value {
    let (t, d) = (report.total(), dense.total());
    json!({
        "model": report.model,
        "variant": report.variant,
        "input": report.input,
        "num_classes": report.num_classes,
        "output": report.output(),
        "convention": CONVENTION,
        "layers": report.layers,
        "total": totals_json(report),
        "dense": totals_json(dense),
        "ratios": {
            "params": ratio(t.params, d.params),
            "param_bytes": ratio(t.param_bytes(), d.param_bytes()),
            "macs_paper": ratio(t.macs_paper, d.macs_dense),
            "macs_nested": ratio(t.macs_nested, d.macs_dense),
        },
        "notes": notes,
    })
}

fn print_table(report: &CostReport, dense: &CostReport, notes: &[String]) {
    let [c, h, w] = report.input;
    println!(
        "{} ({}), input {c}x{h}x{w}, {} classes",
        report.model, report.variant, report.num_classes
    );
    println!();
    let name_width = report
        .layers
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<name_width$}  {:<17}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}  settings",
        "layer", "type", "output", "params", "MACs dense", "MACs paper", "MACs nested"
    );
    for row in &report.layers {
        println!(
            "{:<name_width$}  {:<17}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}  {}",
            row.name,
            row.kind,
            shape(&row.output),
            grouped(row.cost.params),
            scaled(row.cost.macs_dense),
            scaled(row.cost.macs_paper),
            scaled(row.cost.macs_nested),
            row.detail
        );
    }
    let t = report.total();
    println!(
        "{:<name_width$}  {:<17}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}",
        "total",
        "",
        shape(report.output()),
        grouped(t.params),
        scaled(t.macs_dense),
        scaled(t.macs_paper),
        scaled(t.macs_nested),
    );
    println!();
    print_totals(report, dense);
    println!();
    println!("Convention: {CONVENTION}");
    if !notes.is_empty() {
        println!();
        println!("Notes:");
        for note in notes {
            println!("  - {note}");
        }
    }
}

fn print_totals(report: &CostReport, dense: &CostReport) {
    let (t, d): (LayerCost, LayerCost) = (report.total(), dense.total());
    let mb = |values: u64| {
        let b = bytes(values) as f64;
        format!("{:.2} MB ({:.2} MiB)", b / 1e6, b / (1u64 << 20) as f64)
    };
    println!(
        "{:<34}  {:>24}  {:>24}  {:>7}",
        "", report.variant, "dense twin", "ratio"
    );
    let rows: [(&str, String, String, Option<f64>); 9] = [
        (
            "parameters",
            format!("{} ({})", scaled(t.params), grouped(t.params)),
            format!("{} ({})", scaled(d.params), grouped(d.params)),
            Some(ratio(t.params, d.params)),
        ),
        (
            "  of which batch norm",
            grouped(report.params_batch_norm()),
            grouped(dense.params_batch_norm()),
            None,
        ),
        (
            "buffers (batch-norm statistics)",
            grouped(t.buffers),
            grouped(d.buffers),
            None,
        ),
        (
            "float32 parameters",
            mb(t.params),
            mb(d.params),
            Some(ratio(t.params, d.params)),
        ),
        (
            "MACs, paper count",
            scaled(t.macs_paper),
            scaled(d.macs_dense),
            Some(ratio(t.macs_paper, d.macs_dense)),
        ),
        (
            "MACs, nested evaluation",
            scaled(t.macs_nested),
            scaled(d.macs_dense),
            Some(ratio(t.macs_nested, d.macs_dense)),
        ),
        (
            "MACs, dense equivalent",
            scaled(t.macs_dense),
            scaled(d.macs_dense),
            Some(ratio(t.macs_dense, d.macs_dense)),
        ),
        (
            "FLOPs (2 x MACs), paper count",
            scaled(2 * t.macs_paper),
            scaled(2 * d.macs_dense),
            Some(ratio(t.macs_paper, d.macs_dense)),
        ),
        (
            "FLOPs (2 x MACs), nested",
            scaled(2 * t.macs_nested),
            scaled(2 * d.macs_dense),
            Some(ratio(t.macs_nested, d.macs_dense)),
        ),
    ];
    for (name, ours, theirs, r) in rows {
        let r = r.map_or(String::new(), |r| format!("{r:.3}"));
        println!("{name:<34}  {ours:>24}  {theirs:>24}  {r:>7}");
    }
}
