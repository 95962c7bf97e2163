//! `altc tune`: tunes every tunable kernel of a model's compiled plan on this device
//! with cubecl's autotuner, and records the winners in the tuning cache that `altc
//! run` and `altc bench` read.

use crate::console::emit;
use crate::devices::TuneCacheArgs;
use crate::devices::{open_backend, Device};
use crate::model::{load_program, lower_options};
use crate::workloads::timed_graphs;
use altc_compiler::reference::EvalContext;
use altc_runtime::backend::{TunedKernel, TuningMode};
use altc_runtime::tuning::Manifest;
use anyhow::{Context, Result};
use clap::Args;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TuneArgs {
    /// The model: a spec (`.ron`) or a compiled artifact (`.altc`); or an encoder
    /// spec, tuned on batches of --lengths tokens as `altc embed` runs them.
    model: PathBuf,
    /// Where to run: auto, cuda, wgpu or reference (`--help` says how auto chooses).
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Batch size to tune for [default: the spec's; 64 for an encoder].
    #[arg(long)]
    batch_size: Option<usize>,
    #[command(flatten)]
    cache: TuneCacheArgs,
    /// Print the tuned kernels as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// With an encoder spec: the sequence lengths to tune for, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32,128")]
    lengths: Vec<usize>,
}

pub fn tune(args: TuneArgs) -> Result<()> {
    let dir = args.cache.configure_cubecl()?;
    if crate::encoders::is_encoder_file(&args.model) {
        let batch = args.batch_size.unwrap_or(64).max(1);
        let (scope, decisions) =
            crate::encoders::tune_encoder(&args.model, args.device, batch, &args.lengths, &dir)?;
        return report(
            &args,
            &args.model.display().to_string(),
            &scope,
            &decisions,
            &dir,
        );
    }
    let program = load_program(&args.model, lower_options(false))?;
    let batch = args
        .batch_size
        .unwrap_or(program.training.batch_size)
        .max(1);
    let mut backend = open_backend(args.device, program.training.precision, true, None)?;
    let Some(scope) = backend.tuning_scope() else {
        anyhow::bail!(
            "{} has no tunable kernels; tune on a device (--device wgpu or cuda)",
            backend.describe()
        );
    };
    eprintln!("tuning scope: {scope}");
    backend.set_tuning(TuningMode::Tune);
    let state = altc_runtime::training::initial_state(&program, program.training.seed);
    backend.load_state(&state)?;
    let graphs = timed_graphs(&program, true, batch)?;
    let mut reported = 0;
    for (i, (graph, inputs)) in graphs.iter().enumerate() {
        eprintln!("[{}/{}] {} ...", i + 1, graphs.len(), graph.name);
        backend
            .run(graph, inputs, EvalContext { seed: 1, step: 0 })
            .with_context(|| format!("running {} while tuning", graph.name))?;
        let decisions = backend.tuned_kernels();
        for d in &decisions[reported..] {
            if d.measured() {
                eprintln!(
                    "  {}: {} of {} candidates measured, best {}",
                    d.key,
                    d.tried,
                    d.candidates.len(),
                    d.winner
                );
            } else {
                eprintln!("  {}: cached choice {}", d.key, d.winner);
            }
        }
        reported = decisions.len();
    }
    let decisions = backend.tuned_kernels();
    Manifest::record(&dir, &scope, &decisions)?;
    report(&args, &program.model, &scope, &decisions, &dir)
}

/// Says what was tuned: a count on stderr, the table (or JSON) on stdout.
fn report(
    args: &TuneArgs,
    model: &str,
    scope: &str,
    decisions: &[TunedKernel],
    dir: &Path,
) -> Result<()> {
    let measured = decisions.iter().filter(|d| d.measured()).count();
    eprintln!(
        "{} kernels: {measured} measured now, {} from the cache; recorded in {}",
        decisions.len(),
        decisions.len() - measured,
        dir.display()
    );
    if args.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "model": model,
            "scope": scope,
            "cache": dir,
            "kernels": decisions,
        }))
        .context("serialising the tuned kernels")?;
        return emit(&format!("{text}\n"));
    }
    let key_width = decisions
        .iter()
        .map(|d| d.key.to_string().len())
        .max()
        .unwrap_or(0)
        .max("kernel".len())
        + 2;
    let winner_width = decisions
        .iter()
        .map(|d| d.winner.len())
        .max()
        .unwrap_or(0)
        .max(6)
        + 2;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<key_width$}{:<winner_width$}candidates",
        "kernel", "winner"
    );
    for d in decisions {
        let _ = writeln!(
            out,
            "{:<key_width$}{:<winner_width$}{}",
            d.key.to_string(),
            d.winner,
            d.candidates.join(", ")
        );
    }
    emit(&out)
}
