//! `altc plot RUN`: a run's `metrics.jsonl` drawn as PNG with plotters: `loss.png`
//! (each loss term per task, the gradient norm and the learning rate against the
//! step) and `recall.png` (held-out R@1/5/10 per direction against the step).

use crate::console::emit;
use crate::metrics::{read_metrics, Metric};
use anyhow::{bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct PlotArgs {
    /// The run directory (holds `metrics.jsonl`, which `altc run` writes).
    run_dir: PathBuf,
    /// Where to write `loss.png` and `recall.png` [default: the run directory].
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Smoothing of the loss curves: the weight of the past in an exponential moving
    /// average, 0 (none) to below 1. The raw values are drawn faintly beneath.
    #[arg(long, default_value_t = 0.9, value_parser = smoothing)]
    smoothing: f64,
}

fn smoothing(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not in [0, 1)")),
        Err(e) => Err(e.to_string()),
    }
}

/// Where altc looks for a TrueType font for the plots' text, in order (`ALTC_FONT`
/// first).
const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
];

/// Registers a TrueType font as plotters' `sans-serif` (read at run time, so no font
/// library is linked).
fn register_font() -> Result<()> {
    if let Some(font) = std::env::var_os("ALTC_FONT") {
        if !Path::new(&font).is_file() {
            bail!(
                "ALTC_FONT={}: no such font file",
                Path::new(&font).display()
            );
        }
    }
    let candidates: Vec<PathBuf> = std::env::var_os("ALTC_FONT")
        .map(PathBuf::from)
        .into_iter()
        .chain(FONT_PATHS.iter().map(PathBuf::from))
        .collect();
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        bail!(
            "altc plot needs a TrueType font for its labels and found none (looked in {}): install one (Debian: fonts-dejavu-core) or set ALTC_FONT to a .ttf file",
            FONT_PATHS.join(", ")
        );
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{}: not a TrueType font plotters can read", path.display()))
}

/// Line colours, distinct on white (blue, red, green, purple, orange, brown).
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
];

/// Named curves in the order they were first seen.
#[derive(Default)]
struct Curves(Vec<(String, Vec<(f64, f64)>)>);

impl Curves {
    fn entry(&mut self, name: &str) -> &mut Vec<(f64, f64)> {
        let i = match self.0.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                self.0.push((name.to_string(), Vec::new()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }
}

/// The exponential moving average of `points` with weight `past` on the history.
fn smoothed(points: &[(f64, f64)], past: f64) -> Vec<(f64, f64)> {
    let mut average = None;
    points
        .iter()
        .map(|&(x, y)| {
            let a = average.map_or(y, |a: f64| past * a + (1.0 - past) * y);
            average = Some(a);
            (x, a)
        })
        .collect()
}

pub fn plot(args: PlotArgs) -> Result<()> {
    let metrics = read_metrics(&args.run_dir)?;
    let out = args.out.clone().unwrap_or_else(|| args.run_dir.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut losses: BTreeMap<String, Curves> = BTreeMap::new();
    let mut grad_norm = Curves::default();
    let mut lr = Curves::default();
    let mut recalls: BTreeMap<String, Curves> = BTreeMap::new();
    let mut queries = 0;
    for metric in &metrics {
        match metric {
            Metric::Step {
                step,
                task,
                losses: terms,
                lr: rate,
                grad_norm: norm,
                ..
            } => {
                let x = *step as f64;
                for (term, value) in terms {
                    losses
                        .entry(term.clone())
                        .or_default()
                        .entry(task)
                        .push((x, *value));
                }
                if let Some(norm) = norm {
                    grad_norm.entry(task).push((x, *norm));
                }
                lr.entry("learning rate").push((x, *rate));
            }
            Metric::Recall {
                step,
                queries: q,
                recalls: at,
            } => {
                queries = *q;
                for (direction, values) in at {
                    for (k, value) in [1, 5, 10].iter().zip(values) {
                        recalls
                            .entry(direction.clone())
                            .or_default()
                            .entry(&format!("R@{k}"))
                            .push((*step as f64, 100.0 * value));
                    }
                }
            }
        }
    }
    if losses.is_empty() {
        bail!(
            "{}: no training steps recorded yet",
            args.run_dir.join(crate::metrics::METRICS_FILE).display()
        );
    }
    register_font()?;
    let mut panels: Vec<(String, Curves, bool)> = losses
        .into_iter()
        .map(|(term, curves)| (term, curves, true))
        .collect();
    panels.push(("gradient norm (before clipping)".into(), grad_norm, true));
    panels.push(("learning rate".into(), lr, false));
    let loss_png = out.join("loss.png");
    draw_panels(&loss_png, &panels, args.smoothing, "value")?;
    let mut written = vec![loss_png.display().to_string()];
    if !recalls.is_empty() {
        let panels: Vec<(String, Curves, bool)> = recalls
            .into_iter()
            .map(|(direction, curves)| {
                (
                    format!("{direction}: held-out recall, {queries} queries (%)"),
                    curves,
                    false,
                )
            })
            .collect();
        let recall_png = out.join("recall.png");
        draw_panels(&recall_png, &panels, 0.0, "%")?;
        written.push(recall_png.display().to_string());
    }
    emit(&format!(
        "plotted {} metric lines of {} -> {}\n",
        metrics.len(),
        args.run_dir.display(),
        written.join(", ")
    ))
}

/// One PNG of `panels` (title, curves, whether to smooth), two panels a row.
fn draw_panels(
    path: &Path,
    panels: &[(String, Curves, bool)],
    smoothing: f64,
    unit: &str,
) -> Result<()> {
    let columns = panels.len().min(2);
    let rows = panels.len().div_ceil(2);
    let size = (560 * columns as u32, 380 * rows as u32);
    let drawing_error =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| drawing_error(&e))?;
    let areas = root.split_evenly((rows, columns));
    for ((title, curves, smooth), area) in panels.iter().zip(&areas) {
        let points = curves.0.iter().flat_map(|(_, line)| line);
        let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in points.filter(|(_, y)| y.is_finite()) {
            x_max = x_max.max(x);
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
        if !y_min.is_finite() {
            (y_min, y_max) = (0.0, 1.0);
        }
        let pad = ((y_max - y_min) * 0.05).max(1e-12);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x_max, (y_min - pad)..(y_max + pad))
            .map_err(|e| drawing_error(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(unit)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| drawing_error(&e))?;
        for (i, (name, line)) in curves.0.iter().enumerate() {
            let color = COLOURS[i % COLOURS.len()].to_rgba();
            let finite: Vec<(f64, f64)> = line
                .iter()
                .copied()
                .filter(|(_, y)| y.is_finite())
                .collect();
            let shown = if *smooth && smoothing > 0.0 {
                chart
                    .draw_series(LineSeries::new(finite.clone(), color.mix(0.25)))
                    .map_err(|e| drawing_error(&e))?;
                smoothed(&finite, smoothing)
            } else {
                finite
            };
            chart
                .draw_series(LineSeries::new(shown, color.stroke_width(2)))
                .map_err(|e| drawing_error(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| drawing_error(&e))?;
    }
    root.present().map_err(|e| drawing_error(&e))?;
    Ok(())
}
