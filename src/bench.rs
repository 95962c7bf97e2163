//! `altc bench`: times the compiled training step of every direction and the
//! inference path on a device, optimised against the `--no-opt` baseline in the same
//! run, next to the planned work and the device's measured ceilings.

use crate::console::emit;
use crate::devices::{open_backend, Device};
use crate::model::{load_program, lower_options};
use crate::workloads::timed_graphs;
use altc_compiler::fusion::cost::DEVICE_ELEMENT_BYTES;
use altc_compiler::fusion::cost::{matmul_flops, plan_cost};
use altc_compiler::fusion::{plan, FusionPlan};
use altc_compiler::ir::Graph;
use altc_compiler::lower::BATCH;
use altc_compiler::reference::{EvalContext, TensorMap};
use altc_runtime::backend::{Backend, Ceilings};
use altc_runtime::training::initial_state;
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// The model: a spec (`.ron`) or a compiled artifact (`.altc`); or an encoder
    /// spec, timed on batches of --lengths tokens.
    model: PathBuf,
    /// Where to run: auto, cuda, wgpu or reference (`--help` says how auto chooses).
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Batch size, 1 to 65,536 [default: the spec's; 64 for an encoder].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=altc_compiler::spec::MAX_BATCH as u64))]
    batch_size: Option<u64>,
    /// Timed runs per measurement, after the warm-up: 1 to 10,000.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    repeats: u64,
    /// Untimed runs first (compilation of kernels, allocation): 0 to 1,000.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    warmup: u64,
    /// Print the results as JSON (to compare across commits) instead of a table.
    #[arg(long)]
    json: bool,
    /// With an encoder spec: the sequence lengths to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32,128")]
    lengths: Vec<usize>,
    /// With an encoder spec: the variants to time, comma-separated, of `tuned`,
    /// `untuned` and `no-opt`.
    #[arg(long, value_delimiter = ',', default_value = "tuned,untuned,no-opt", value_parser = ["tuned", "untuned", "no-opt"])]
    variants: Vec<String>,
    #[command(flatten)]
    cache: crate::devices::TuneCacheArgs,
}

/// One timed graph under one configuration.
#[derive(Serialize)]
struct Measurement {
    graph: String,
    /// `tuned` (optimised plan, kernels from the tuning cache), `untuned` (the
    /// same plan, every kernel its untuned fallback) or `no-opt`.
    variant: String,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    kernel_launches: Option<usize>,
    planned_bytes: u64,
    /// The plan's peak intermediates, and the graph's inputs (uploaded by the run).
    planned_peak_bytes: u64,
    input_bytes: u64,
    /// What the device's allocator held at most above the run's start, in the
    /// profiled run: inputs and intermediates (`None` on the reference interpreter).
    measured_peak_bytes: Option<u64>,
    matmul_flops: u64,
    achieved_gb_per_s: f64,
    achieved_tflop_per_s: f64,
    /// Fractions of the measured ceilings.
    copy_fraction: Option<f64>,
    matmul_fraction: Option<f64>,
    /// Every kernel of one further, profiled run, in launch order (empty on the
    /// reference interpreter).
    kernels: Vec<KernelReport>,
}

/// One kernel of a profiled run, timed from launch to completion with the device
/// synchronised after each kernel (so the sum exceeds the pipelined step time).
#[derive(Serialize)]
struct KernelReport {
    family: String,
    label: String,
    ms: f64,
}

#[derive(Serialize)]
struct CeilingReport {
    copy_gb_per_s: f64,
    copy_elements: usize,
    matmul_tflop_per_s: f64,
    matmul_size: usize,
}

#[derive(Serialize)]
struct BenchReport {
    model: String,
    device: String,
    batch_size: usize,
    repeats: usize,
    warmup: usize,
    /// Kernels the `tuned` variant ran with a tuned choice (0: no `tuned` variant).
    tuned_kernels: usize,
    ceilings: Option<CeilingReport>,
    measurements: Vec<Measurement>,
}

/// A graph ready to time: what to run, its inputs, and its planned work.
struct Timed<'a> {
    graph: &'a Graph,
    inputs: &'a TensorMap,
    planned_bytes: u64,
    planned_peak_bytes: u64,
    flops: u64,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if crate::encoders::is_encoder_file(&args.model) {
        if args.json {
            anyhow::bail!("--json is not written for encoder specs yet; the table is on stdout");
        }
        let tune_cache = args.cache.configure_cubecl()?;
        let lengths = args.lengths.clone();
        return crate::encoders::bench_encoder(
            &args.model,
            &crate::encoders::EncoderBench {
                device: args.device,
                batch: args.batch_size.map_or(64, |b| b as usize),
                lengths: &lengths,
                variants: &args.variants,
                warmup: args.warmup as usize,
                repeats: args.repeats as usize,
                tune_cache: &tune_cache,
            },
        );
    }
    let optimised = load_program(&args.model, lower_options(false))?;
    let baseline = load_program(&args.model, lower_options(true))?;
    let batch = args
        .batch_size
        .map_or(optimised.training.batch_size, |b| b as usize);
    let (repeats, warmup) = (args.repeats as usize, args.warmup as usize);
    altc_runtime::training::ensure_state_fits(&optimised)?;
    let state = initial_state(&optimised, optimised.training.seed);

    let mut measurements = Vec::new();
    let mut device = String::new();
    let mut ceilings = None;
    let mut tuned_kernels = 0;
    let tune_dir = args.cache.configure_cubecl()?;
    for (variant, program, opt) in [
        ("tuned", &optimised, true),
        ("untuned", &optimised, true),
        ("no-opt", &baseline, false),
    ] {
        let mut backend = open_backend(args.device, program.training.precision, opt, None)?;
        if variant == "tuned" {
            tuned_kernels = crate::devices::use_tuned_kernels(backend.as_mut(), &tune_dir)?;
            if tuned_kernels == 0 {
                eprintln!(
                    "note: no tuned kernels for this device in {}: run `altc tune` first for a tuned column",
                    tune_dir.display()
                );
                continue;
            }
        }
        if ceilings.is_none() && opt {
            device = backend.describe();
            // Sizes that saturate the device without taking long on a CPU rasteriser.
            let (copy, matmul) = if device.starts_with("cuda") {
                (1 << 27, 4096)
            } else {
                (1 << 24, 512)
            };
            eprintln!("measuring the device's copy bandwidth and matmul rate ...");
            ceilings = backend.measure_ceilings(copy, matmul);
        }
        backend.load_state(&state)?;
        let graphs = timed_graphs(program, opt, batch)?;
        for (graph, inputs) in &graphs {
            // The plan the device runs: sized for its bindings.
            let fusion = if opt {
                plan(graph, backend.kernel_limits().unwrap_or_default())
            } else {
                FusionPlan::unfused(graph)
            };
            let symbols = bound_symbols(graph, inputs, batch);
            let cost = plan_cost(graph, &fusion, &symbols);
            let timed = Timed {
                graph,
                inputs,
                planned_bytes: cost.bytes_moved,
                planned_peak_bytes: cost.peak_bytes,
                flops: matmul_flops(graph, &symbols),
            };
            eprintln!("timing {} ({variant}) ...", graph.name);
            measurements.push(time_graph(
                backend.as_mut(),
                &timed,
                variant,
                &args,
                ceilings.as_ref(),
            )?);
        }
    }
    let report = BenchReport {
        model: optimised.model.clone(),
        device,
        batch_size: batch,
        repeats,
        warmup,
        tuned_kernels,
        ceilings: ceilings.map(|c| CeilingReport {
            copy_gb_per_s: c.copy_gb_per_s,
            copy_elements: c.copy_elements,
            matmul_tflop_per_s: c.matmul_tflop_per_s,
            matmul_size: c.matmul_size,
        }),
        measurements,
    };
    if args.json {
        let text = serde_json::to_string_pretty(&report).context("serialising the report")?;
        return emit(&format!("{text}\n"));
    }
    emit(&table(&report))
}

fn time_graph(
    backend: &mut dyn Backend,
    timed: &Timed,
    variant: &str,
    args: &BenchArgs,
    ceilings: Option<&Ceilings>,
) -> Result<Measurement> {
    let ctx = EvalContext { seed: 1, step: 0 };
    let name = &timed.graph.name;
    let (repeats, warmup) = (args.repeats as usize, args.warmup as usize);
    let mut seconds = Vec::with_capacity(repeats);
    for i in 0..warmup + repeats {
        // Outputs come back to the host, so each run is synchronised with the device.
        let started = Instant::now();
        backend
            .run(timed.graph, timed.inputs, ctx)
            .with_context(|| format!("running {name}"))?;
        if i >= warmup {
            seconds.push(started.elapsed().as_secs_f64());
        }
    }
    seconds.sort_by(f64::total_cmp);
    backend.set_profiling(true);
    let profiled = backend.run(timed.graph, timed.inputs, ctx);
    let profile = backend.kernel_profile();
    let measured_peak_bytes = backend.memory_peak();
    backend.set_profiling(false);
    profiled.with_context(|| format!("profiling {name}"))?;
    let kernels = profile
        .into_iter()
        .map(|k| KernelReport {
            family: k.family.to_string(),
            label: k.label,
            ms: k.seconds * 1e3,
        })
        .collect();
    let median = seconds[seconds.len() / 2];
    let gb_per_s = timed.planned_bytes as f64 / median / 1e9;
    let tflop_per_s = timed.flops as f64 / median / 1e12;
    Ok(Measurement {
        graph: name.clone(),
        variant: variant.to_string(),
        median_ms: median * 1e3,
        min_ms: seconds[0] * 1e3,
        max_ms: seconds[seconds.len() - 1] * 1e3,
        kernel_launches: backend.kernel_launches(),
        planned_bytes: timed.planned_bytes,
        planned_peak_bytes: timed.planned_peak_bytes,
        // Devices hold every value as f32.
        input_bytes: input_bytes(timed.graph, timed.inputs),
        measured_peak_bytes,
        matmul_flops: timed.flops,
        achieved_gb_per_s: gb_per_s,
        achieved_tflop_per_s: tflop_per_s,
        copy_fraction: ceilings.map(|c| gb_per_s / c.copy_gb_per_s),
        matmul_fraction: ceilings.map(|c| tflop_per_s / c.matmul_tflop_per_s),
        kernels,
    })
}

/// Bytes of the inputs a run of `graph` uploads (those some output needs), as f32.
fn input_bytes(graph: &Graph, inputs: &TensorMap) -> u64 {
    let live = altc_compiler::ir::live_nodes(graph);
    graph
        .inputs()
        .filter(|(_, id)| live[id.index()])
        .filter_map(|(name, _)| inputs.get(name))
        .map(|t| DEVICE_ELEMENT_BYTES * t.shape.iter().product::<usize>() as u64)
        .sum()
}

/// The graph's symbolic extents as `inputs` bind them (the batch, and the ranking's
/// store size), `BATCH` at `batch` besides.
fn bound_symbols(graph: &Graph, inputs: &TensorMap, batch: usize) -> BTreeMap<String, usize> {
    let mut symbols = BTreeMap::from([(BATCH.to_string(), batch)]);
    for (name, id) in graph.inputs() {
        let Some(tensor) = inputs.get(name) else {
            continue;
        };
        for (d, &n) in graph.node(id).ty.shape.dims().iter().zip(&tensor.shape) {
            if let altc_compiler::ir::Dim::Sym(s) = d {
                symbols.insert(s.clone(), n);
            }
        }
    }
    symbols
}

fn table(report: &BenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} on {}, batch {}, median of {} runs after {} warm-up",
        report.model, report.device, report.batch_size, report.repeats, report.warmup
    );
    if let Some(c) = &report.ceilings {
        let _ = writeln!(
            out,
            "measured ceilings: copy {:.1} GB/s ({} f32), matmul {:.1} GFLOP/s ({}^3 f32)",
            c.copy_gb_per_s,
            c.copy_elements,
            c.matmul_tflop_per_s * 1e3,
            c.matmul_size
        );
    }
    let _ = writeln!(
        out,
        "\n{:<24}{:<11}{:>11}{:>19}{:>10}{:>12}{:>9}{:>7}{:>10}{:>7}",
        "graph",
        "variant",
        "median",
        "min..max",
        "launches",
        "planned",
        "GB/s",
        "%copy",
        "GFLOP/s",
        "%mm"
    );
    for m in &report.measurements {
        let pct = |f: Option<f64>| f.map_or("-".to_string(), |f| format!("{:.1}", 100.0 * f));
        let _ = writeln!(
            out,
            "{:<24}{:<11}{:>8.2} ms{:>10.2}..{:<7.2}{:>10}{:>8.1} MB{:>9.2}{:>7}{:>10.2}{:>7}",
            m.graph,
            m.variant,
            m.median_ms,
            m.min_ms,
            m.max_ms,
            m.kernel_launches.map_or("-".into(), |n| n.to_string()),
            m.planned_bytes as f64 / 1e6,
            m.achieved_gb_per_s,
            pct(m.copy_fraction),
            m.achieved_tflop_per_s * 1e3,
            pct(m.matmul_fraction),
        );
    }
    let _ = writeln!(
        out,
        "\ntime by kernel family in one profiled run (each kernel synchronised; --json lists every kernel):"
    );
    for m in report.measurements.iter().filter(|m| !m.kernels.is_empty()) {
        let mut families: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
        for k in &m.kernels {
            let entry = families.entry(&k.family).or_default();
            entry.0 += 1;
            entry.1 += k.ms;
        }
        let mut families: Vec<_> = families.into_iter().collect();
        families.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let parts: Vec<String> = families
            .iter()
            .map(|(f, (n, ms))| format!("{f} x{n} {ms:.1} ms"))
            .collect();
        let _ = writeln!(out, "  {} ({}): {}", m.graph, m.variant, parts.join(", "));
    }
    let _ = writeln!(
        out,
        "\ndevice memory at peak in the profiled run (the allocator's bytes in use above the run's start, after each kernel) against the plan (peak intermediates + inputs):"
    );
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for m in &report.measurements {
        let Some(measured) = m.measured_peak_bytes else {
            continue;
        };
        let planned = m.planned_peak_bytes + m.input_bytes;
        let _ = writeln!(
            out,
            "  {:<22}{:<10}{:>9.2} MiB measured{:>9.2} MiB planned ({:.2} + {:.2})",
            m.graph,
            m.variant,
            mib(measured),
            mib(planned),
            mib(m.planned_peak_bytes),
            mib(m.input_bytes),
        );
    }
    let _ = writeln!(
        out,
        "\nspeed-ups (median time of the slower over the faster's):"
    );
    let _ = writeln!(
        out,
        "  {:<24}{:>20}{:>16}{:>20}",
        "graph", "untuned/no-opt", "tuned/no-opt", "tuned/untuned"
    );
    let median = |graph: &str, variant: &str| {
        report
            .measurements
            .iter()
            .find(|m| m.graph == graph && m.variant == variant)
            .map(|m| m.median_ms)
    };
    let ratio = |slow: Option<f64>, fast: Option<f64>| match (slow, fast) {
        (Some(s), Some(f)) => format!("{:.2}x", s / f),
        _ => "-".into(),
    };
    for m in report
        .measurements
        .iter()
        .filter(|m| m.variant == "untuned")
    {
        let (tuned, untuned, baseline) = (
            median(&m.graph, "tuned"),
            Some(m.median_ms),
            median(&m.graph, "no-opt"),
        );
        let _ = writeln!(
            out,
            "  {:<24}{:>20}{:>16}{:>20}",
            m.graph,
            ratio(baseline, untuned),
            ratio(baseline, tuned),
            ratio(untuned, tuned)
        );
    }
    out
}
