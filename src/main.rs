//! `altc`: the command line of the altc compiler. This file holds the commands and
//! their dispatch; each command's work lives in its own module (`compile`,
//! `training`, `serving`, `bench`, `tune`, `cuda_check`), beside the shared argument
//! types (`devices`), model loading (`model`), output paths (`files`) and reports
//! (`console`).

use crate::compile::{check, compile, inspect};
use crate::model::{load_program, lower_options};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod bench;
mod compile;
mod console;
mod cuda_check;
mod devices;
mod encoders;
mod files;
mod metrics;
mod model;
mod plot;
mod serving;
mod training;
mod tune;
mod workloads;

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
    /// Validate a model spec and print its modules, parameter counts and shapes; or
    /// an encoder spec (`EncoderSpec(...)`), its weights and tokenizer checked too.
    Check {
        /// The model or encoder spec (`.ron`).
        spec: PathBuf,
    },
    /// Write the encoder spec (RON) of a Hugging Face model folder, with the map
    /// from its checkpoint's tensors to the spec's parameters (BERT family).
    Import(encoders::ImportArgs),
    /// Lower a model spec and write the compiled artifact.
    Compile {
        /// The model spec (`.ron`).
        spec: PathBuf,
        /// Where to write the artifact [default: the spec's name with `.altc`; with
        /// --explain or --cuda-arch, no artifact unless this names one].
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
    /// Datasets: `altc data synth` writes a planted paired dataset; `altc data text`
    /// one from text (through a pretrained encoder) and vector or token stores.
    Data {
        #[command(subcommand)]
        command: training::DataCommand,
    },
    /// Train a model (`.ron` or compiled `.altc`) on a paired dataset.
    Run(training::RunArgs),
    /// Recompute the held-out recalls of a run from its checkpoint.
    Eval(training::EvalArgs),
    /// Draw a run's metrics (`metrics.jsonl`) as PNG: loss terms, gradient norm and
    /// learning rate (`loss.png`), held-out recalls (`recall.png`).
    Plot(plot::PlotArgs),
    /// Embed one side of a dataset, or raw text with a pretrained encoder, into a
    /// safetensors vector store.
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
        } => {
            // Explaining or checking is reading: it writes an artifact only when asked.
            let inspecting = explain || cuda_arch.is_some();
            let output = output.or_else(|| (!inspecting).then(|| spec.with_extension("altc")));
            compile(&spec, output, explain.then_some(bindings as usize), json).and_then(|()| {
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
            })
        }
        Command::Inspect {
            artifact,
            dot,
            graphs,
        } => inspect(&artifact, dot, &graphs),
        Command::Import(args) => encoders::import(args),
        Command::Data { command } => training::data(command),
        Command::Run(args) => training::run(args),
        Command::Eval(args) => training::eval(args),
        Command::Plot(args) => plot::plot(args),
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
