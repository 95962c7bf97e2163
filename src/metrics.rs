//! A run's metrics as JSON lines (`metrics.jsonl` in its run directory): one line a
//! training step (its task, loss terms, learning rate, weight decay, gradient norm and
//! wall time) and one line each time held-out recalls are measured. Appended and
//! flushed as the run goes, so a killed run keeps what it measured; a resumed run
//! drops the lines past its checkpoint, which it is about to redo.

use altc_runtime::retrieval::Recall;
use altc_runtime::training::StepReport;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Metric {
    /// A training step; `step` counts the steps done with it (1 for the first).
    Step {
        step: usize,
        task: String,
        /// `loss` and every `loss.<term>`.
        losses: BTreeMap<String, f64>,
        lr: f64,
        weight_decay: f64,
        /// Before clipping; absent where the step has no gradient norm (JSON has no
        /// NaN).
        grad_norm: Option<f64>,
        /// Seconds since this process started training (a resumed run counts from
        /// its resume).
        seconds: f64,
    },
    /// Held-out recalls after `step` steps, per direction: `[R@1, R@5, R@10]` as
    /// fractions, over `queries` queries.
    Recall {
        step: usize,
        queries: usize,
        recalls: BTreeMap<String, [f64; 3]>,
    },
}

impl Metric {
    pub fn step(&self) -> usize {
        match self {
            Metric::Step { step, .. } | Metric::Recall { step, .. } => *step,
        }
    }

    pub fn from_report(report: &StepReport, seconds: f64) -> Metric {
        Metric::Step {
            step: report.step + 1,
            task: report.task.clone(),
            losses: report.losses.iter().cloned().collect(),
            lr: report.lr,
            weight_decay: report.weight_decay,
            grad_norm: report.grad_norm.is_finite().then_some(report.grad_norm),
            seconds,
        }
    }

    pub fn from_recalls(step: usize, recalls: &[Recall]) -> Metric {
        Metric::Recall {
            step,
            queries: recalls.first().map_or(0, |r| r.queries),
            recalls: recalls
                .iter()
                .map(|r| (r.direction.clone(), r.at.map(|(_, v)| v)))
                .collect(),
        }
    }
}

/// The appending writer of a run's `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// A fresh log in `run_dir`, replacing any earlier one.
    pub fn create(run_dir: &Path) -> Result<MetricsLog> {
        let path = run_dir.join(METRICS_FILE);
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(MetricsLog { path, file })
    }

    /// The log of a run resumed from its checkpoint after `step` steps: the lines up
    /// to that step kept (rewritten atomically), those past it and a last line a
    /// kill cut short dropped. Any other line that is not a metric stops the resume,
    /// named, rather than being dropped.
    pub fn resume(run_dir: &Path, step: usize) -> Result<MetricsLog> {
        let path = run_dir.join(METRICS_FILE);
        let kept: Vec<Metric> = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (metrics, skipped) = parse_lines(&text);
                let last = text.lines().count();
                if let Some(line) = skipped.iter().find(|&&l| l != last) {
                    bail!(
                        "{}:{line}: not a metric line (edited, or written by a newer altc?); move the file aside to resume",
                        path.display()
                    );
                }
                metrics.into_iter().filter(|m| m.step() <= step).collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut text = String::new();
        for metric in &kept {
            text.push_str(&serde_json::to_string(metric)?);
            text.push('\n');
        }
        altc_runtime::atomic_write(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsLog { path, file })
    }

    pub fn append(&mut self, metric: &Metric) -> Result<()> {
        let mut line = serde_json::to_string(metric)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The metrics of `text`, and the line numbers of lines that are not metrics: a last
/// line cut short by a kill, or lines of a newer altc.
pub fn parse_lines(text: &str) -> (Vec<Metric>, Vec<usize>) {
    let mut metrics = Vec::new();
    let mut skipped = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Metric>(line) {
            Ok(m) => metrics.push(m),
            Err(_) => skipped.push(i + 1),
        }
    }
    (metrics, skipped)
}

/// The metrics of the run in `run_dir`, with a note on stderr for each line skipped.
pub fn read_metrics(run_dir: &Path) -> Result<Vec<Metric>> {
    let path = run_dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (runs write it as they train; is this a run directory?)",
            path.display()
        )
    })?;
    let (metrics, skipped) = parse_lines(&text);
    for line in skipped {
        eprintln!(
            "note: {}:{line} is not a metric line; skipped",
            path.display()
        );
    }
    Ok(metrics)
}
