//! `altc data synth`, `altc run` and `altc eval`: training and evaluation as a user
//! runs them, with a progress bar, checkpoints in a run directory, and recalls.

use crate::{emit, load_program, lower_options};
use altc_compiler::artifact::Artifact;
use altc_compiler::lower::{LowerOptions, Program};
use altc_compiler::optimize::{optimize, Limits};
use altc_compiler::spec::Precision;
use altc_compiler::train::training_tasks;
use altc_runtime::backend::{Backend, ReferenceBackend};
use altc_runtime::checkpoint::Checkpoint;
use altc_runtime::data::Dataset;
use altc_runtime::device::DeviceChoice;
use altc_runtime::retrieval::{recalls, Recall};
use altc_runtime::synth::{write_planted, SynthOptions};
use altc_runtime::training::{checkpoint_path, state_shapes, StepReport, TrainOptions, Trainer};
use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write a planted paired dataset for a model's modalities (see README: datasets).
    Synth {
        /// The model (`.ron` or `.altc`) whose modalities the data feeds.
        model: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value_t = 4096)]
        pairs: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Shared latent factors per pair.
        #[arg(long, default_value_t = 8)]
        latent: usize,
        /// Scale of the additive noise.
        #[arg(long, default_value_t = 0.1)]
        noise: f64,
        /// Scale of the per-token variation of the latents.
        #[arg(long, default_value_t = 0.5)]
        token_variation: f64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when a driver is found, else wgpu.
    Auto,
    Cuda,
    Wgpu,
    /// The reference interpreter (CPU, plain Rust).
    Reference,
}

#[derive(Args)]
pub struct RunArgs {
    /// The model: a spec (`.ron`) or a compiled artifact (`.altc`).
    model: PathBuf,
    /// The paired dataset (safetensors).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Total steps [default: the spec's training duration].
    #[arg(long)]
    steps: Option<usize>,
    /// [default: the spec's batch size]
    #[arg(long)]
    batch_size: Option<usize>,
    /// [default: the spec's seed]
    #[arg(long)]
    seed: Option<u64>,
    /// Pairs held out for the recalls.
    #[arg(long, default_value_t = 512)]
    held_out: usize,
    /// Write a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// The run directory [default: runs/<model name>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the run directory's checkpoint.
    #[arg(long)]
    resume: bool,
    /// One kernel per op, no fusion: the unoptimised baseline.
    #[arg(long)]
    no_opt: bool,
    /// Ignore the tuning cache: every kernel runs its untuned fallback.
    #[arg(long)]
    untuned: bool,
    #[command(flatten)]
    cache: crate::tune::TuneCacheArgs,
}

#[derive(Args)]
pub struct EvalArgs {
    /// The run directory (holds `model.altc`, `run.ron`, `checkpoint.safetensors`).
    run_dir: PathBuf,
    /// The paired dataset [default: the one the run trained on].
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// One kernel per op, no fusion.
    #[arg(long)]
    no_opt: bool,
}

/// The settings of a run, kept in its directory so `eval` and `--resume` agree with it.
#[derive(Serialize, Deserialize)]
struct RunRecord {
    data: PathBuf,
    seed: u64,
    batch_size: usize,
    held_out: usize,
    steps: usize,
}

pub fn data(command: DataCommand) -> Result<()> {
    let DataCommand::Synth {
        model,
        output,
        pairs,
        seed,
        latent,
        noise,
        token_variation,
    } = command;
    let program = load_program(&model, LowerOptions::default())?;
    let options = SynthOptions {
        pairs,
        seed,
        latent,
        noise,
        token_variation,
        ..SynthOptions::default()
    };
    write_planted(&output, &program, options)?;
    let sides: Vec<String> = program
        .modalities
        .iter()
        .map(|m| format!("{} [{pairs}, {}, {}]", m.name, m.tokens, m.input_width))
        .collect();
    emit(&format!(
        "wrote {} ({pairs} pairs: {})\n",
        output.display(),
        sides.join(", ")
    ))
}

/// Opens the backend `device` names, saying which one it is.
pub(crate) fn open_backend(
    device: Device,
    precision: Precision,
    fuse: bool,
) -> Result<Box<dyn Backend>> {
    let choice = match device {
        Device::Reference => return Ok(Box::new(ReferenceBackend::default())),
        Device::Auto => DeviceChoice::Auto,
        Device::Cuda => DeviceChoice::Cuda,
        Device::Wgpu => DeviceChoice::Wgpu,
    };
    Ok(altc_runtime::device::open(choice, precision, fuse)?)
}

pub fn run(args: RunArgs) -> Result<()> {
    let program = load_program(&args.model, lower_options(args.no_opt))?;
    let tuned = !args.no_opt && !args.untuned && !matches!(args.device, Device::Reference);
    let tune_dir = if tuned {
        Some(args.cache.configure_cubecl()?)
    } else {
        None
    };
    let mut backend = open_backend(args.device, program.training.precision, !args.no_opt)?;
    eprintln!("device: {}", backend.describe());
    if let Some(dir) = &tune_dir {
        crate::tune::use_tuned_kernels(backend.as_mut(), dir)?;
    }
    let run_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&program.model));
    let record_path = run_dir.join("run.ron");
    let record = if args.resume {
        let text = std::fs::read_to_string(&record_path)
            .with_context(|| format!("--resume: reading {}", record_path.display()))?;
        let r: RunRecord = ron::from_str(&text)
            .with_context(|| format!("{}: unreadable run record", record_path.display()))?;
        r
    } else {
        RunRecord {
            data: args.data.clone(),
            seed: args.seed.unwrap_or(program.training.seed),
            batch_size: args.batch_size.unwrap_or(program.training.batch_size),
            held_out: args.held_out,
            steps: 0,
        }
    };
    let data = Dataset::load(&args.data, &program)?;
    let mut tasks = training_tasks(&program).context("building the training graphs")?;
    if !args.no_opt {
        for task in &mut tasks {
            let (graph, report) = optimize(&task.graph, Limits::default())
                .with_context(|| format!("optimising {}", task.graph.name))?;
            eprintln!(
                "optimised {}: {} -> {} kernels ({} rewrites, e-graph {} nodes)",
                task.graph.name,
                report.kernels_before,
                report.kernels_after,
                report.fired.values().sum::<usize>(),
                report.egraph_nodes
            );
            task.graph = graph;
        }
    }
    let options = TrainOptions {
        // A resumed run keeps its length (and so its schedules) unless told otherwise.
        steps: args
            .steps
            .or((args.resume && record.steps > 0).then_some(record.steps)),
        batch_size: record.batch_size,
        seed: record.seed,
        held_out: record.held_out,
        checkpoint_every: args.checkpoint_every,
        run_dir: run_dir.clone(),
        resume: args.resume,
    };
    let mut trainer = Trainer::new(&program, &tasks, data, options, backend)?;
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    if !args.resume {
        // The run directory keeps the compiled model so `eval` needs nothing else.
        let kept = run_dir.join("model.altc");
        if args.model.extension().is_some_and(|e| e == "altc") {
            std::fs::copy(&args.model, &kept).with_context(|| {
                format!("copying {} to {}", args.model.display(), kept.display())
            })?;
        } else {
            let text = std::fs::read_to_string(&args.model)
                .with_context(|| format!("re-reading {}", args.model.display()))?;
            Artifact::new(&args.model.display().to_string(), &text, program.clone())
                .write(&kept)?;
        }
    }
    let record = RunRecord {
        steps: trainer.total_steps(),
        ..record
    };
    let pretty =
        ron::ser::to_string_pretty(&record, ron::ser::PrettyConfig::new().struct_names(false))?;
    altc_runtime::atomic_write(&record_path, pretty.as_bytes())
        .with_context(|| format!("writing {}", record_path.display()))?;

    let total = trainer.total_steps();
    let bar = ProgressBar::new(total as u64).with_position(trainer.step_index() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
        )
        .expect("valid template"),
    );
    let mut last: Option<StepReport> = None;
    while trainer.step_index() < total {
        let report = trainer.step()?;
        bar.set_message(describe(&report));
        bar.inc(1);
        last = Some(report);
    }
    bar.finish();
    trainer.save_checkpoint()?;
    let mut text = String::new();
    if let Some(r) = last {
        text.push_str(&format!("final step {}: {}\n", r.step, describe(&r)));
    }
    if let Some(launches) = trainer.backend().kernel_launches() {
        text.push_str(&format!(
            "device: {}, {launches} kernel launches in the last step\n",
            trainer.backend().describe()
        ));
    }
    text.push_str(&format!(
        "checkpoint: {}\n",
        checkpoint_path(&run_dir).display()
    ));
    text.push_str(&recall_table(&trainer.recalls()?));
    emit(&text)
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let record_path = args.run_dir.join("run.ron");
    let text = std::fs::read_to_string(&record_path)
        .with_context(|| format!("reading {}", record_path.display()))?;
    let record: RunRecord = ron::from_str(&text)
        .with_context(|| format!("{}: unreadable run record", record_path.display()))?;
    let program: Program = Artifact::read(&args.run_dir.join("model.altc"))?.program;
    let data_path = args.data.unwrap_or(record.data);
    let data = Dataset::load(&data_path, &program)?;
    let ckpt = Checkpoint::load(
        &checkpoint_path(&args.run_dir),
        &program.model,
        &state_shapes(&program),
        program.dtype,
    )?;
    let split = data.split(record.held_out.min(data.pairs / 2), record.seed);
    let mut backend = open_backend(args.device, program.training.precision, !args.no_opt)?;
    backend.load_state(&ckpt.state);
    let r =
        recalls(&program, backend.as_mut(), &data, &split.held_out).context("computing recalls")?;
    emit(&format!(
        "checkpoint at step {} of {}\n{}",
        ckpt.step,
        record.steps,
        recall_table(&r)
    ))
}

fn describe(r: &StepReport) -> String {
    let terms: Vec<String> = r
        .losses
        .iter()
        .map(|(n, v)| format!("{n} {v:.4}"))
        .collect();
    format!(
        "{} | {} | lr {:.2e} | |g| {:.3}",
        r.task,
        terms.join(" "),
        r.lr,
        r.grad_norm
    )
}

fn recall_table(recalls: &[Recall]) -> String {
    let mut out = String::from("held-out retrieval (cosine)    R@1     R@5    R@10\n");
    for r in recalls {
        let [a, b, c] = r.at.map(|(_, v)| 100.0 * v);
        out.push_str(&format!(
            "  {:<16} {:>5} queries {a:6.1}% {b:6.1}% {c:6.1}%\n",
            r.direction, r.queries
        ));
    }
    if let Some(r) = recalls.first() {
        out.push_str(&format!(
            "  (chance R@1 = {:.2}%)\n",
            100.0 / r.queries.max(1) as f64
        ));
    }
    out
}
