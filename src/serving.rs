//! `altc embed`, `altc retrieve` and `altc doctor`: vector pre-storage, real-time
//! retrieval on the device, and what altc sees of this machine.

use crate::console::emit;
use crate::devices::{open_backend_for, Device};
use altc_compiler::artifact::Artifact;
use altc_runtime::checkpoint::Checkpoint;
use altc_runtime::data::{write_f32_safetensors, Dataset};
use altc_runtime::retrieval::{embed, rank};
use altc_runtime::training::{checkpoint_path, state_shapes};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Side {
    /// The target side of a direction, through its key graph: what retrieval stores.
    Key,
    /// The source side, through the direction's query graph.
    Query,
}

#[derive(Args)]
pub struct EmbedArgs {
    /// The run directory (holds `model.altc` and `checkpoint.safetensors`); not with
    /// --encoder.
    #[arg(required_unless_present = "encoder", conflicts_with = "encoder")]
    run_dir: Option<PathBuf>,
    /// The paired dataset (safetensors) whose items to embed: every pair's target
    /// side with `--side key`, its source side with `--side query`.
    #[arg(long, required_unless_present = "encoder", conflicts_with = "encoder")]
    data: Option<PathBuf>,
    /// The direction, e.g. `image_to_text`.
    #[arg(long, required_unless_present = "encoder", conflicts_with = "encoder")]
    direction: Option<String>,
    /// `key`: the direction's target side, what `retrieve` searches; `query`: its
    /// source side.
    #[arg(long, value_enum, default_value_t = Side::Key)]
    side: Side,
    /// A pretrained text encoder spec (`altc import` writes one): embed the raw text
    /// of --text with it instead of a run's model.
    #[arg(long, requires = "text")]
    encoder: Option<PathBuf>,
    /// With --encoder: the items, one a line, or JSON lines (`.jsonl`) with the text
    /// in --field.
    #[arg(long, requires = "encoder")]
    text: Option<PathBuf>,
    /// With --text JSON lines: the field holding each item's text.
    #[arg(long, default_value = "text")]
    field: String,
    /// With --text JSON lines: the field holding each item's id (its line number
    /// where absent; plain text items are named by their line numbers).
    #[arg(long, default_value = "id")]
    id_field: String,
    /// With --encoder: items per batch, 1 to 4,096; each batch is padded to a
    /// power-of-two length over its longest item.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch_size: u64,
    /// With --encoder: run the encoder's graph as lowered, without the e-graph
    /// optimiser or fusion (the baseline).
    #[arg(long)]
    no_opt: bool,
    /// Where to write the vector store (safetensors); never one of the inputs.
    #[arg(short, long)]
    output: PathBuf,
    /// Where to run: auto, cuda, wgpu or reference (`--help` says how auto chooses).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    #[command(flatten)]
    cache: crate::devices::TuneCacheArgs,
}

#[derive(Args)]
pub struct RetrieveArgs {
    /// The run directory (holds `model.altc` and `checkpoint.safetensors`).
    run_dir: PathBuf,
    /// A vector store written by `altc embed --side key`.
    #[arg(long)]
    store: PathBuf,
    /// The dataset whose pairs the store holds; its first `--queries` pairs are queried.
    #[arg(long)]
    data: PathBuf,
    /// Pairs to query, 1 to the store's size [default: all].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    queries: Option<u64>,
    /// Items ranked per query, 1 to the store's size; R@k is shown for k up to it
    /// [default: 10, or the store's size if smaller].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    k: Option<u64>,
    /// Where to run: auto, cuda, wgpu or reference (`--help` says how auto chooses).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Untimed runs first, which compile the kernels (a serving process pays that
    /// once, not per query).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    warmup: u64,
    /// Timed runs, 1 to 1,000; the median is reported, with the spread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    repeats: u64,
}

struct Loaded {
    program: altc_compiler::lower::Program,
    backend: Box<dyn altc_runtime::backend::Backend>,
}

fn load_run(run_dir: &Path, device: Device) -> Result<Loaded> {
    let program = Artifact::read(&run_dir.join("model.altc"))?.program;
    let ckpt = Checkpoint::load(
        &checkpoint_path(run_dir),
        &program.model,
        &state_shapes(&program),
        program.dtype,
    )?;
    let mut backend = open_backend_for(device, &program, true)?;
    backend.load_state(&ckpt.state)?;
    Ok(Loaded { program, backend })
}

pub fn embed_command(args: EmbedArgs) -> Result<()> {
    let tune_cache = args.cache.configure_cubecl()?;
    if let (Some(encoder), Some(text)) = (&args.encoder, &args.text) {
        return crate::encoders::embed_text(crate::encoders::TextEmbedRequest {
            run: crate::encoders::EncoderRun {
                encoder,
                batch_size: args.batch_size as usize,
                optimise: !args.no_opt,
                device: args.device,
                tune_cache: &tune_cache,
                output: altc_runtime::encoding::EncoderOutput::Pooled,
            },
            text,
            field: &args.field,
            id_field: &args.id_field,
            output: &args.output,
        });
    }
    let (Some(run_dir), Some(data), Some(direction)) = (&args.run_dir, &args.data, &args.direction)
    else {
        bail!("embed needs a run directory with --data and --direction, or --encoder with --text");
    };
    let model = run_dir.join("model.altc");
    let checkpoint = checkpoint_path(run_dir);
    crate::files::refuse_overwrite(
        &args.output,
        &[
            ("--data", data),
            ("model", &model),
            ("checkpoint", &checkpoint),
        ],
    )?;
    let Loaded {
        program,
        mut backend,
    } = load_run(run_dir, args.device)?;
    crate::devices::use_tuned_kernels(backend.as_mut(), &tune_cache)?;
    let Some(d) = program.directions.iter().find(|d| &d.name == direction) else {
        let known: Vec<&str> = program.directions.iter().map(|d| d.name.as_str()).collect();
        bail!(
            "no direction `{direction}` (directions: {})",
            known.join(", ")
        );
    };
    let (graph, modality) = match args.side {
        Side::Key => (d.key_graph.clone(), d.target.clone()),
        Side::Query => (d.query_graph.clone(), d.source.clone()),
    };
    let graph = graph.context("this model has no contrastive loss, so no retrieval embeddings")?;
    let data = Dataset::load(data, &program)?;
    let pairs: Vec<usize> = (0..data.pairs).collect();
    let start = Instant::now();
    let (vectors, width) = embed(&program, backend.as_mut(), &data, &pairs, &graph)?;
    let vectors: Vec<f32> = vectors.into_iter().map(|v| v as f32).collect();
    let seconds = start.elapsed().as_secs_f64();
    let metadata = HashMap::from([
        ("altc.store".to_string(), "1".to_string()),
        ("model".to_string(), program.model.clone()),
        ("direction".to_string(), d.name.clone()),
        (
            "side".to_string(),
            if args.side == Side::Key {
                "key"
            } else {
                "query"
            }
            .to_string(),
        ),
        ("modality".to_string(), modality.clone()),
        ("graph".to_string(), graph.clone()),
    ]);
    write_f32_safetensors(
        &args.output,
        &[("embeddings".to_string(), vec![data.pairs, width], vectors)],
        metadata,
    )?;
    emit(&format!(
        "embedded {} {modality} items with `{graph}` -> {} ([{}, {width}], {:.0} items/s)\n",
        data.pairs,
        args.output.display(),
        data.pairs,
        data.pairs as f64 / seconds.max(1e-9)
    ))
}

/// A vector store as `altc embed` writes it.
pub(crate) struct Store {
    pub vectors: Vec<f32>,
    pub rows: usize,
    pub width: usize,
    pub meta: HashMap<String, String>,
}

/// Reads a vector store and checks its layout: `embeddings` `[rows, width]` of
/// finite f32 values, with at least one row and one column.
pub(crate) fn read_store(path: &Path) -> Result<Store> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a vector store: {e}", path.display()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("altc.store").map(String::as_str) != Some("1") {
        bail!(
            "{}: not an altc vector store (no `altc.store` metadata)",
            path.display()
        );
    }
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let view = st
        .tensor("embeddings")
        .map_err(|_| anyhow::anyhow!("{}: tensor `embeddings` is missing", path.display()))?;
    let &[rows, width] = view.shape() else {
        bail!(
            "{}: `embeddings` is {:?}, not [items, width]",
            path.display(),
            view.shape()
        );
    };
    if rows == 0 || width == 0 || view.dtype() != safetensors::Dtype::F32 {
        bail!(
            "{}: `embeddings` is {:?}{:?}; a store holds at least one F32 vector of width 1 or more",
            path.display(),
            view.dtype(),
            view.shape()
        );
    }
    let vectors: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(i) = vectors.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: `embeddings` holds {} at item {}, column {}; a store holds finite vectors",
            path.display(),
            vectors[i],
            i / width,
            i % width
        );
    }
    Ok(Store {
        vectors,
        rows,
        width,
        meta,
    })
}

/// The width of the `embedding` output of `graph`.
fn embedding_width(program: &altc_compiler::lower::Program, graph: &str) -> Option<usize> {
    let g = program.graph(graph)?;
    match g
        .node(g.output(altc_compiler::outputs::EMBEDDING)?)
        .ty
        .shape
        .0
        .last()?
    {
        altc_compiler::ir::Dim::Fixed(w) => Some(*w),
        altc_compiler::ir::Dim::Sym(_) => None,
    }
}

pub fn retrieve_command(args: RetrieveArgs) -> Result<()> {
    let Store {
        vectors: store,
        rows: n,
        width,
        meta,
    } = read_store(&args.store)?;
    let Loaded {
        program,
        mut backend,
    } = load_run(&args.run_dir, args.device)?;
    let field = |key: &str| meta.get(key).cloned().unwrap_or_default();
    if field("model") != program.model || field("side") != "key" {
        bail!(
            "{}: the store holds {} vectors of model `{}`; embed the key side of this run's model `{}`",
            args.store.display(),
            field("side"),
            field("model"),
            program.model
        );
    }
    let direction = field("direction");
    let Some(d) = program.directions.iter().find(|d| d.name == direction) else {
        let known: Vec<&str> = program.directions.iter().map(|d| d.name.as_str()).collect();
        bail!(
            "{}: the store's direction `{direction}` is not one of this model's ({})",
            args.store.display(),
            known.join(", ")
        );
    };
    let query_graph = d
        .query_graph
        .clone()
        .context("the direction has no query graph")?;
    let expected = embedding_width(&program, &query_graph)
        .context("the query graph has no embedding output")?;
    if width != expected {
        bail!(
            "{}: the store's vectors have width {width}, but `{query_graph}` embeds queries at width {expected}; embed the store again with this run",
            args.store.display()
        );
    }
    let data = Dataset::load(&args.data, &program)?;
    if data.pairs != n {
        bail!("{} holds {} pairs but the store {} vectors: queries are matched to stored items by pair index", args.data.display(), data.pairs, n);
    }
    let asked = args.queries.map_or(n, |q| q as usize);
    if asked > n {
        bail!("--queries {asked}, but the store holds {n} items (valid: 1 to {n})");
    }
    let k = args.k.map_or(n.min(10), |k| k as usize);
    if k > n {
        bail!("--k {k}, but the store holds {n} items (valid: 1 to {n})");
    }
    let queries: Vec<usize> = (0..asked).collect();
    let mut times = Vec::new();
    let mut ranked = Vec::new();
    for run in 0..args.warmup + args.repeats {
        let start = Instant::now();
        let (q, _) = embed(&program, backend.as_mut(), &data, &queries, &query_graph)?;
        let q: Vec<f32> = q.into_iter().map(|v| v as f32).collect();
        ranked = Vec::with_capacity(queries.len());
        for chunk in q.chunks(256 * width) {
            ranked.extend(rank(backend.as_mut(), chunk, &store, width, k)?);
        }
        if run >= args.warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    let timing = if times.len() > 1 {
        format!(
            "median of {} runs after {} warm-up, {:.3} to {:.3} s",
            times.len(),
            args.warmup,
            times[0],
            times[times.len() - 1]
        )
    } else if args.warmup > 0 {
        format!("one run after {} warm-up", args.warmup)
    } else {
        "one run, compiling its kernels included".to_string()
    };
    // R@k for the k the ranking reaches; a recall past it would count misses.
    let recall = |at: usize| {
        (at <= k).then(|| {
            100.0
                * ranked
                    .iter()
                    .enumerate()
                    .filter(|(i, top)| top.iter().take(at).any(|j| j == i))
                    .count() as f64
                / queries.len() as f64
        })
    };
    let shown = |at: usize| match recall(at) {
        Some(r) => format!("R@{at} {r:.1}%"),
        None => format!("R@{at} -"),
    };
    emit(&format!(
        "{direction}: {} queries against {n} stored items on {}\n  {}  {}  {}  (chance R@1 {:.2}%)\n  {:.0} queries/s, {:.2} ms a query ({:.3} s for the batch: embedding the queries, scoring and top-{k} on the backend; {timing})\n",
        queries.len(),
        backend.describe(),
        shown(1),
        shown(5),
        shown(10),
        100.0 / n as f64,
        queries.len() as f64 / seconds.max(1e-9),
        1e3 * seconds / queries.len() as f64,
        seconds,
    ))
}

pub fn doctor() -> Result<()> {
    let mut out = format!("altc {}\n", env!("CARGO_PKG_VERSION"));
    out.push_str("reference: available (CPU interpreter; f32, f64)\n");
    out.push_str(&altc_runtime::device::describe_devices());
    emit(&out)
}
