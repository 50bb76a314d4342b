//! `versatile plot`: learning curves (loss and top-1 accuracy per epoch) of one or more
//! runs, as SVG and PNG, from their `metrics.json`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;
use versatile::train::metrics::read_metrics;
use versatile::train::{EpochMetrics, TrainConfig};

use super::UsageError;

/// Arguments of `versatile plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run directories (with metrics.json). One run: RUN_DIR/curves.{svg,png}; several:
    /// one comparison chart.
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// Output path without extension for a comparison [default: compare, beside the first
    /// run directory].
    #[arg(long, value_name = "PATH")]
    output: Option<PathBuf>,
}

/// Runs `versatile plot`.
pub fn run(args: &PlotArgs) -> Result<()> {
    let written = if let [run] = args.runs.as_slice() {
        write_run_plots(run)?
    } else {
        let mut runs = Vec::new();
        for dir in &args.runs {
            runs.push((run_label(dir), load(dir)?));
        }
        let stem = args.output.clone().unwrap_or_else(|| {
            args.runs[0]
                .parent()
                .unwrap_or(Path::new("."))
                .join("compare")
        });
        write_plots(&runs, &stem)?
    };
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn load(dir: &Path) -> Result<Vec<EpochMetrics>> {
    let metrics = read_metrics(dir).map_err(UsageError::from_display)?;
    if metrics.is_empty() {
        return Err(UsageError::from_display(format!(
            "{}: metrics.json lists no epoch yet",
            dir.display()
        )));
    }
    Ok(metrics)
}

/// The variant of a run (from its config.toml), else the directory name.
fn run_label(dir: &Path) -> String {
    TrainConfig::from_toml_file(dir.join("config.toml"))
        .map(|config| config.variant)
        .unwrap_or_else(|_| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string())
        })
}

/// Writes `RUN_DIR/curves.svg` and `curves.png` from the run's metrics (nothing when no
/// epoch has finished).
pub fn write_run_plots(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let metrics = read_metrics(run_dir).unwrap_or_default();
    if metrics.is_empty() {
        return Ok(Vec::new());
    }
    write_plots(&[(run_label(run_dir), metrics)], &run_dir.join("curves"))
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

const SIZE: (u32, u32) = (1100, 450);

/// Writes `STEM.svg` and `STEM.png` (when a TrueType font for the labels is found): loss (left) and
/// top-1 accuracy (right) per epoch, training dashed and validation solid, one colour
/// per run.
pub fn write_plots(runs: &[(String, Vec<EpochMetrics>)], stem: &Path) -> Result<Vec<PathBuf>> {
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if !font_registered() {
        eprintln!(
            "warning: no TrueType font found for the chart labels (set VERSATILE_FONT to a .ttf file); no plot written"
        );
        return Ok(Vec::new());
    }
    let svg = stem.with_extension("svg");
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        draw(&root, runs)?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", svg.display()))?;
    }
    let png = stem.with_extension("png");
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        draw(&root, runs)?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", png.display()))?;
    }
    let written = vec![svg, png];
    Ok(written)
}

/// Registers a sans-serif font for the PNG backend, once: `$VERSATILE_FONT`, else the
/// usual DejaVu/Liberation locations.
fn font_registered() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let candidates = std::env::var_os("VERSATILE_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(
                [
                    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                    "/usr/share/fonts/TTF/DejaVuSans.ttf",
                    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                    "/Library/Fonts/Arial.ttf",
                    "C:\\Windows\\Fonts\\arial.ttf",
                ]
                .map(PathBuf::from),
            );
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[(String, Vec<EpochMetrics>)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the chart: {e:?}");
    root.fill(&WHITE).map_err(fail)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    let epochs = runs
        .iter()
        .map(|(_, m)| m.last().map_or(1, |e| e.epoch))
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let max_loss = runs
        .iter()
        .flat_map(|(_, m)| m.iter().flat_map(|e| [e.train_loss, e.val_loss]))
        .filter(|v| v.is_finite())
        .fold(0.1f64, f64::max)
        * 1.05;
    let min_acc = runs
        .iter()
        .flat_map(|(_, m)| m.iter().flat_map(|e| [e.train_top1, e.val_top1]))
        .fold(1.0f64, f64::min);
    let acc_floor = ((min_acc * 100.0 - 2.0) / 5.0).floor().max(0.0) * 5.0;

    type Pick = fn(&EpochMetrics) -> f64;
    type Panel<'a, DB> = (
        &'a DrawingArea<DB, Shift>,
        &'static str,
        &'static str,
        std::ops::Range<f64>,
        Pick,
        Pick,
    );
    let panels: [Panel<DB>; 2] = [
        (
            &left,
            "Loss",
            "cross-entropy",
            0.0..max_loss,
            |e| e.train_loss,
            |e| e.val_loss,
        ),
        (
            &right,
            "Top-1 accuracy",
            "top-1 (%)",
            acc_floor..100.0,
            |e| 100.0 * e.train_top1,
            |e| 100.0 * e.val_top1,
        ),
    ];
    for (area, title, y_desc, y_range, train, val) in panels {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(1.0..epochs, y_range)
            .map_err(fail)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(y_desc)
            .x_labels((epochs as usize).min(12))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(fail)?;
        for (i, (label, metrics)) in runs.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points = |pick: Pick| -> Vec<(f64, f64)> {
                metrics.iter().map(|e| (e.epoch as f64, pick(e))).collect()
            };
            chart
                .draw_series(DashedLineSeries::new(
                    points(train),
                    6,
                    4,
                    color.stroke_width(2),
                ))
                .map_err(fail)?
                .label(format!("{label} train"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 10, y)], color.stroke_width(2))
                });
            chart
                .draw_series(LineSeries::new(points(val), color.stroke_width(3)))
                .map_err(fail)?
                .label(format!("{label} test"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart
                .draw_series(
                    points(val)
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(fail)?;
        }
        chart
            .configure_series_labels()
            .position(if title == "Loss" {
                SeriesLabelPosition::UpperRight
            } else {
                SeriesLabelPosition::LowerRight
            })
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(fail)?;
    }
    Ok(())
}
