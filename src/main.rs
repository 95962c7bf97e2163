//! `altc`: the command line of the altc compiler.

use altc_compiler::artifact::Artifact;
use altc_compiler::ir::to_dot;
use altc_compiler::lower::{lower_loaded, LowerOptions, MoeDispatch};
use altc_compiler::{spec, summary};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod bench;
mod cuda_check;
mod files;
mod serving;
mod training;
mod tune;

#[derive(Parser)]
#[command(
    name = "altc",
    version,
    about = "Compiles Alt-MoE model specs (RON) into fused GPU kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a model spec and print its modules, parameter counts and shapes.
    Check {
        /// The model spec (`.ron`).
        spec: PathBuf,
    },
    /// Lower a model spec and write the compiled artifact.
    Compile {
        /// The model spec (`.ron`).
        spec: PathBuf,
        /// Where to write the artifact [default: the spec's name with `.altc`].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print the fusion groups of every training graph and their planned cost
        /// (launches, bytes moved, peak memory) against running op by op.
        #[arg(long)]
        explain: bool,
        /// Plan `--explain` for a device that binds this many buffers per kernel
        /// (`altc doctor` shows it; 31 is Mesa lavapipe's, CUDA binds 1024).
        #[arg(long, default_value_t = 31, value_parser = clap::value_parser!(u32).range(4..))]
        bindings: u32,
        /// Compile every kernel the plan can launch (untuned and under every tuning
        /// candidate) for these NVIDIA architectures with NVRTC, without a GPU:
        /// `sm_80`, `sm_90a`, or a comma-separated list. Prints each kernel's
        /// registers, spills, shared memory and occupancy, and the plan's roofline
        /// bound; fails if any kernel or launch would fail on such a GPU.
        #[arg(long, value_name = "ARCHS", value_parser = parse_cuda_archs)]
        cuda_arch: Option<CudaTargets>,
        /// With `--cuda-arch`: the batch size to launch at, 1 to 65,536 [default: the
        /// spec's].
        #[arg(long, requires = "cuda_arch", value_parser = clap::value_parser!(u64).range(1..=altc_compiler::spec::MAX_BATCH as u64))]
        batch_size: Option<u64>,
        /// With `--cuda-arch`: check the `--no-opt` plan (one kernel per op, dense MoE).
        #[arg(long, requires = "cuda_arch")]
        no_opt: bool,
        /// With `--cuda-arch`: print the check as JSON.
        #[arg(long, requires = "cuda_arch")]
        json: bool,
    },
    /// Summarise a compiled artifact, or render its graphs as Graphviz.
    Inspect {
        /// The compiled artifact (`.altc`).
        artifact: PathBuf,
        /// Print Graphviz (dot) instead of the summary.
        #[arg(long)]
        dot: bool,
        /// Only these graphs (repeatable), e.g. `--graph image_to_text.loss`.
        #[arg(long = "graph", value_name = "NAME")]
        graphs: Vec<String>,
    },
    /// Datasets: `altc data synth` writes a planted paired dataset.
    Data {
        #[command(subcommand)]
        command: training::DataCommand,
    },
    /// Train a model (`.ron` or compiled `.altc`) on a paired dataset.
    Run(training::RunArgs),
    /// Recompute the held-out recalls of a run from its checkpoint.
    Eval(training::EvalArgs),
    /// Embed one side of a dataset into a safetensors vector store.
    Embed(serving::EmbedArgs),
    /// Rank a vector store for a batch of queries on the device; recalls and queries/s.
    Retrieve(serving::RetrieveArgs),
    /// Print the devices altc sees: drivers, Vulkan device, plane sizes, element types.
    Doctor,
    /// Time each direction's training step and the embedding graphs on a device,
    /// tuned, untuned and --no-opt in the same run, with planned bytes, achieved
    /// GB/s and GFLOP/s, the device's measured copy and matmul ceilings, and
    /// per-kernel times.
    Bench(bench::BenchArgs),
    /// Tune every tunable kernel of the model's plan on this device (cubecl
    /// autotune) and keep the winners in the tuning cache for run and bench.
    Tune(tune::TuneArgs),
}

/// The architectures one `--cuda-arch` names.
#[derive(Clone)]
struct CudaTargets(Vec<altc_cuda_aot::target::CudaTarget>);

fn parse_cuda_archs(text: &str) -> Result<CudaTargets, String> {
    altc_cuda_aot::target::CudaTarget::parse_list(text)
        .map(CudaTargets)
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { spec } => check(&spec),
        Command::Compile {
            spec,
            output,
            explain,
            bindings,
            cuda_arch,
            batch_size,
            no_opt,
            json,
        } => compile(&spec, output, explain.then_some(bindings as usize), json).and_then(|()| {
            let Some(CudaTargets(targets)) = cuda_arch else {
                return Ok(());
            };
            let program = load_program(&spec, lower_options(no_opt))?;
            let batch = batch_size.map_or(program.training.batch_size, |b| b as usize);
            let options = cuda_check::CudaCheck {
                targets,
                fused: !no_opt,
                batch,
                json,
            };
            cuda_check::cuda_check(&program, &options)
        }),
        Command::Inspect {
            artifact,
            dot,
            graphs,
        } => inspect(&artifact, dot, &graphs),
        Command::Data { command } => training::data(command),
        Command::Run(args) => training::run(args),
        Command::Eval(args) => training::eval(args),
        Command::Embed(args) => serving::embed_command(args),
        Command::Retrieve(args) => serving::retrieve_command(args),
        Command::Doctor => serving::doctor(),
        Command::Bench(args) => bench::bench(args),
        Command::Tune(args) => tune::tune(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = e.to_string();
            eprintln!("error: {message}");
            // Library errors already quote their cause; print only what is new.
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    eprintln!("  caused by: {cause}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// A model as loaded: its program and the spec it was lowered from.
pub(crate) struct LoadedModel {
    pub program: altc_compiler::lower::Program,
    /// The spec's path as the user gave it, and its text.
    pub source_path: String,
    pub source_text: String,
}

impl LoadedModel {
    /// The model as an artifact, to keep beside a run.
    pub fn artifact(&self) -> Artifact {
        Artifact::new(&self.source_path, &self.source_text, self.program.clone())
    }
}

/// Loads a model from a spec (`.ron`) or a compiled artifact (`.altc`). An artifact
/// compiled with another MoE form is lowered again from the spec text it carries,
/// which reading it checked against its graphs.
pub(crate) fn load_model(path: &Path, options: LowerOptions) -> Result<LoadedModel> {
    if path.extension().is_some_and(|e| e == "altc") {
        let artifact = Artifact::read(path)?;
        let program = if artifact.program.moe == options.moe {
            artifact.program
        } else {
            lower_loaded(&artifact.embedded_spec(path)?, options)?
        };
        return Ok(LoadedModel {
            program,
            source_path: artifact.source_path,
            source_text: artifact.source_text,
        });
    }
    let loaded = spec::load(path)?;
    let source_text =
        std::fs::read_to_string(path).with_context(|| format!("re-reading {}", path.display()))?;
    Ok(LoadedModel {
        program: lower_loaded(&loaded, options)?,
        source_path: path.display().to_string(),
        source_text,
    })
}

fn load_program(path: &Path, options: LowerOptions) -> Result<altc_compiler::lower::Program> {
    Ok(load_model(path, options)?.program)
}

/// Lowering for a run: sparse MoE dispatch when optimising, the authors' dense form
/// for the `--no-opt` baseline.
pub(crate) fn lower_options(no_opt: bool) -> LowerOptions {
    LowerOptions {
        moe: if no_opt {
            MoeDispatch::Dense
        } else {
            MoeDispatch::Sparse
        },
        ..LowerOptions::default()
    }
}

fn check(path: &Path) -> Result<()> {
    let loaded = spec::load(path)?;
    let program = lower_loaded(&loaded, LowerOptions::default())?;
    emit(&format!(
        "{}{}: ok\n",
        summary::program_summary(&program),
        path.display()
    ))
}

/// `explain`: print the fusion plan for a device binding that many buffers per kernel.
/// `json`: stdout is kept for a JSON report, so the summary line goes to stderr.
fn compile(path: &Path, output: Option<PathBuf>, explain: Option<usize>, json: bool) -> Result<()> {
    let loaded = spec::load(path)?;
    let program = lower_loaded(&loaded, LowerOptions::default())?;
    let output = output.unwrap_or_else(|| path.with_extension("altc"));
    files::refuse_overwrite(&output, &[("spec", path)])?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("re-reading {}", path.display()))?;
    let artifact = Artifact::new(&path.display().to_string(), &text, program);
    artifact.write(&output)?;
    let nodes: usize = artifact.program.graphs.iter().map(|g| g.len()).sum();
    if let Some(bindings) = explain {
        let baseline = lower_loaded(&loaded, lower_options(true))?;
        emit(&explain_fusion(&artifact.program, &baseline, bindings)?)?;
    }
    let line = format!(
        "compiled {} -> {} ({} graphs, {} nodes, {} trainable parameters)\n",
        path.display(),
        output.display(),
        artifact.program.graphs.len(),
        nodes,
        summary::thousands(artifact.program.params.trainable_count())
    );
    if json {
        eprint!("{line}");
        Ok(())
    } else {
        emit(&line)
    }
}

fn inspect(path: &Path, dot: bool, only: &[String]) -> Result<()> {
    let artifact = Artifact::read(path)?;
    let program = &artifact.program;
    for name in only {
        if program.graph(name).is_none() {
            let known: Vec<&str> = program.graphs.iter().map(|g| g.name.as_str()).collect();
            bail!(
                "{}: no graph `{name}` (graphs: {})",
                path.display(),
                known.join(", ")
            );
        }
    }
    let selected: Vec<_> = program
        .graphs
        .iter()
        .filter(|g| only.is_empty() || only.contains(&g.name))
        .collect();
    if dot {
        return emit(&to_dot(&selected));
    }
    emit(&format!(
        "{}: {} v{}, written by altc {}, compiled from {}\n\n{}\n{}",
        path.display(),
        artifact.format,
        artifact.version,
        artifact.altc_version,
        artifact.source_path,
        summary::program_summary(program),
        summary::graph_summary(program)
    ))
}

/// The fusion plan of every training graph at the spec's batch size, for a device
/// binding `bindings` buffers per kernel, against the `--no-opt` baseline
/// (`baseline`: dense experts, run op by op).
fn explain_fusion(
    program: &altc_compiler::lower::Program,
    baseline: &altc_compiler::lower::Program,
    bindings: usize,
) -> Result<String> {
    use altc_compiler::fusion::cost::{plan_cost, plan_cost_and_peak};
    use altc_compiler::fusion::{plan, FusionPlan, KernelLimits};
    use std::fmt::Write as _;
    let tasks =
        altc_compiler::train::training_tasks(program).context("building the training graphs")?;
    let baseline_tasks = altc_compiler::train::training_tasks(baseline)
        .context("building the baseline training graphs")?;
    let symbols = std::collections::BTreeMap::from([(
        altc_compiler::lower::BATCH.to_string(),
        program.training.batch_size,
    )]);
    let mut out = String::new();
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    for (task, base) in tasks.iter().zip(&baseline_tasks) {
        let original = &task.graph;
        let started = std::time::Instant::now();
        let (optimised, report) =
            altc_compiler::optimize::optimize(original, altc_compiler::optimize::Limits::default())
                .with_context(|| format!("optimising {}", original.name))?;
        let _ = writeln!(
            out,
            "{}: e-graph {} nodes in {} classes after {} iterations ({}), {:.2} s",
            original.name,
            report.egraph_nodes,
            report.egraph_classes,
            report.iterations,
            report.stop,
            started.elapsed().as_secs_f64()
        );
        let fired: Vec<String> = report
            .fired
            .iter()
            .map(|(r, n)| format!("{r} x{n}"))
            .collect();
        let _ = writeln!(
            out,
            "  rewrites: {}",
            if fired.is_empty() {
                "none".to_string()
            } else {
                fired.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "  kernel nodes: {} before, {} after (shared subgraphs counted once)",
            report.kernels_before, report.kernels_after
        );
        let g = &optimised;
        let fused = plan(g, KernelLimits::for_bindings(bindings));
        let ((a, peak), b) = (
            plan_cost_and_peak(g, &fused, &symbols),
            plan_cost(&base.graph, &FusionPlan::unfused(&base.graph), &symbols),
        );
        let _ = writeln!(
            out,
            "{} ({} nodes, batch {}, {bindings} bindings per kernel):",
            g.name,
            g.len(),
            program.training.batch_size
        );
        let _ = writeln!(
            out,
            "  {:<22}{:>12}{:>14}{:>8}",
            "", "optimised", "--no-opt", "ratio"
        );
        let _ = writeln!(
            out,
            "  {:<22}{:>12}{:>14}{:>8.2}",
            "kernel launches",
            a.launches,
            b.launches,
            a.launches as f64 / b.launches as f64
        );
        let _ = writeln!(
            out,
            "  {:<22}{:>9.1} MiB{:>11.1} MiB{:>8.2}",
            "bytes moved",
            mb(a.bytes_moved),
            mb(b.bytes_moved),
            a.bytes_moved as f64 / b.bytes_moved as f64
        );
        let _ = writeln!(
            out,
            "  {:<22}{:>9.1} MiB{:>11.1} MiB{:>8.2}",
            "peak intermediates",
            mb(a.peak_bytes),
            mb(b.peak_bytes),
            a.peak_bytes as f64 / b.peak_bytes as f64
        );
        let shown: Vec<String> = peak
            .live
            .iter()
            .take(4)
            .map(|&(id, bytes)| {
                let node = g.node(id);
                format!("{} {} KiB ({})", node.ty, bytes / 1024, node.origin)
            })
            .collect();
        let _ = writeln!(
            out,
            "  peak at step {} of {}, {} values alive; the largest: {}",
            peak.step + 1,
            fused.schedule.len(),
            peak.live.len(),
            shown.join("; ")
        );
        let mut kernels: std::collections::BTreeMap<&str, usize> = Default::default();
        for kernel in fused.schedule.iter().filter_map(|s| fused.kernel(g, s)) {
            *kernels.entry(kernel.family).or_default() += 1;
        }
        let kinds: Vec<String> = kernels.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        let _ = writeln!(out, "  kernels: {}", kinds.join(", "));
        let _ = writeln!(out, "  {} fusion groups:", fused.groups.len());
        for (i, group) in fused.groups.iter().enumerate() {
            let ops: Vec<String> = group
                .nodes
                .iter()
                .map(|&n| g.node(n).op.mnemonic())
                .collect();
            let _ = writeln!(
                out,
                "    #{i} {} [{} out]: {}",
                group.shape(g),
                group.outputs.len(),
                ops.join(", ")
            );
        }
        if !fused.multi_groups.is_empty() {
            let _ = writeln!(
                out,
                "  {} multi-tensor kernels (one program over several tensors):",
                fused.multi_groups.len()
            );
        }
        for batch in &fused.multi_groups {
            let groups: Vec<String> = batch.groups.iter().map(|g| format!("#{g}")).collect();
            let _ = writeln!(
                out,
                "    groups {} ({} tensors, {} shared inputs bound once)",
                groups.join(" "),
                batch.groups.len(),
                batch.shared.len()
            );
        }
        if !fused.multi_matmuls.is_empty() {
            let _ = writeln!(
                out,
                "  {} matmul kernels sharing an operand (bound once):",
                fused.multi_matmuls.len()
            );
        }
        for batch in &fused.multi_matmuls {
            let matmuls = batch.matmuls();
            let side = match batch.shared {
                altc_compiler::fusion::SharedOperand::Left => 0,
                altc_compiler::fusion::SharedOperand::Right => 1,
            };
            let shared = g.node(g.operands(matmuls[0])[side]);
            let others: Vec<String> = matmuls
                .iter()
                .map(|&m| g.node(g.operands(m)[1 - side]).op.mnemonic())
                .collect();
            let _ = writeln!(
                out,
                "    {} matmuls -> {} each, {} operand {} ({}) with: {}",
                matmuls.len(),
                g.node(matmuls[0]).ty,
                if side == 0 { "left" } else { "right" },
                shared.ty,
                shared.origin,
                others.join("; ")
            );
        }
    }
    Ok(out)
}

/// Writes a report to stdout; a reader that went away (`| head`) is not an error.
pub(crate) fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}
