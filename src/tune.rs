//! `altc tune`: tunes every tunable kernel of a model's compiled plan on this device
//! with cubecl's autotuner, and records the winners in the tuning cache that `altc
//! run` and `altc bench` read.

use crate::bench::timed_graphs;
use crate::training::{open_backend, Device};
use crate::{emit, load_program, lower_options};
use altc_compiler::reference::EvalContext;
use altc_runtime::backend::{Backend, TuningMode};
use altc_runtime::tuning::Manifest;
use anyhow::{Context, Result};
use clap::Args;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where tuned choices live: cubecl's autotune cache and altc's manifest.
#[derive(Args, Clone)]
pub struct TuneCacheArgs {
    /// The tuning cache directory [default: $XDG_CACHE_HOME/altc/tune, or
    /// ~/.cache/altc/tune].
    #[arg(long, env = "ALTC_TUNE_CACHE")]
    pub tune_cache: Option<PathBuf>,
}

impl TuneCacheArgs {
    pub fn dir(&self) -> PathBuf {
        self.tune_cache.clone().unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir);
            base.join("altc").join("tune")
        })
    }

    /// Points cubecl's persistent autotune cache at this directory; must run before
    /// any device is opened (cubecl reads its configuration once).
    pub fn configure_cubecl(&self) -> Result<PathBuf> {
        use cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
        let dir = self.dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the tuning cache {}", dir.display()))?;
        let mut config = CubeClRuntimeConfig::default();
        config.autotune.cache = CacheConfig::File(dir.clone());
        CubeClRuntimeConfig::set(config);
        Ok(dir)
    }
}

/// Switches `backend` to the kernels tuned for it in `dir`, printing why any cached
/// choice is not used; returns how many tuned kernels it will use.
pub fn use_tuned_kernels(backend: &mut dyn Backend, dir: &Path) -> Result<usize> {
    let Some(scope) = backend.tuning_scope() else {
        return Ok(0);
    };
    let manifest = Manifest::load(dir)?;
    let found = manifest.lookup(&scope, altc_runtime::backend::candidates);
    for note in &found.notes {
        eprintln!("note: {note}");
    }
    let count = found.keys.len();
    if count > 0 {
        eprintln!("using {count} tuned kernels from {}", dir.display());
        backend.set_tuning(TuningMode::Cached(found.keys));
    }
    Ok(count)
}

#[derive(Args)]
pub struct TuneArgs {
    /// The model: a spec (`.ron`) or a compiled artifact (`.altc`).
    model: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Batch size to tune for [default: the spec's].
    #[arg(long)]
    batch_size: Option<usize>,
    #[command(flatten)]
    cache: TuneCacheArgs,
    /// Print the tuned kernels as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn tune(args: TuneArgs) -> Result<()> {
    let dir = args.cache.configure_cubecl()?;
    let program = load_program(&args.model, lower_options(false))?;
    let batch = args
        .batch_size
        .unwrap_or(program.training.batch_size)
        .max(1);
    let mut backend = open_backend(args.device, program.training.precision, true)?;
    let Some(scope) = backend.tuning_scope() else {
        anyhow::bail!(
            "{} has no tunable kernels; tune on a device (--device wgpu or cuda)",
            backend.describe()
        );
    };
    eprintln!("device: {}", backend.describe());
    eprintln!("tuning scope: {scope}");
    backend.set_tuning(TuningMode::Tune);
    let state = altc_runtime::training::initial_state(&program, program.training.seed);
    backend.load_state(&state);
    let graphs = timed_graphs(&program, true, batch)?;
    let mut reported = 0;
    for (i, (graph, inputs)) in graphs.iter().enumerate() {
        eprintln!("[{}/{}] {} ...", i + 1, graphs.len(), graph.name);
        backend
            .run(graph, inputs, EvalContext { seed: 1, step: 0 })
            .with_context(|| format!("running {} while tuning", graph.name))?;
        let decisions = backend.tuned_kernels();
        for d in &decisions[reported..] {
            eprintln!(
                "  {}: {} candidates tried, best {}",
                d.key,
                d.candidates.len(),
                d.winner
            );
        }
        reported = decisions.len();
    }
    let decisions = backend.tuned_kernels();
    Manifest::record(&dir, &scope, &decisions)?;
    eprintln!(
        "{} kernels tuned; recorded in {}",
        decisions.len(),
        dir.display()
    );
    if args.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "model": program.model,
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
    for d in &decisions {
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
