//! `altc data synth`, `altc run` and `altc eval`: training and evaluation as a user
//! runs them, with a progress bar, checkpoints in a run directory, and recalls.

use crate::console::emit;
use crate::devices::{open_backend_for, Device};
use crate::files::{self, DataFile, DataIdentity};
use crate::metrics::{Metric, MetricsLog};
use crate::model::{load_model, load_program, lower_options, LoadedModel};
use altc_compiler::artifact::{remove_stale_temporaries, Artifact};
use altc_compiler::lower::{lower_loaded, LowerOptions, Program};
use altc_compiler::pipeline::training_steps;
use altc_runtime::checkpoint::Checkpoint;
use altc_runtime::data::Dataset;
use altc_runtime::retrieval::{recalls, Recall};
use altc_runtime::synth::{write_planted, SynthOptions};
use altc_runtime::training::{checkpoint_path, state_shapes, StepReport, TrainOptions, Trainer};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write a planted paired dataset for a model's modalities (see README: datasets).
    Synth {
        /// The model (`.ron` or `.altc`) whose modalities the data feeds.
        model: PathBuf,
        /// Where to write the dataset (safetensors); never the model itself.
        #[arg(short, long)]
        output: PathBuf,
        /// Pairs to write: 2 to 16,777,216.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(2..=1 << 24))]
        pairs: u64,
        /// Seed of the random draws: the same seed writes the same file.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Shared latent factors per pair: 1 to 65,536.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1 << 16))]
        latent: u64,
        /// Scale of the additive noise: a finite number, 0 or more.
        #[arg(long, default_value_t = 0.1, value_parser = non_negative_finite)]
        noise: f64,
        /// Scale of the per-token variation of the latents: a finite number, 0 or more.
        #[arg(long, default_value_t = 0.5, value_parser = non_negative_finite)]
        token_variation: f64,
    },
    /// Write a paired dataset from raw text (through a pretrained encoder: pooled
    /// vectors, or its tokens with --tokens) and vector or token stores, one
    /// NAME=FILE per modality.
    Text(crate::encoders::DataTextArgs),
}

/// A finite number, 0 or more.
fn non_negative_finite(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number, 0 or more")),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Args)]
pub struct RunArgs {
    /// The model: a spec (`.ron`) or a compiled artifact (`.altc`).
    model: PathBuf,
    /// The paired dataset (safetensors) [default with --resume: the run's].
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Where to run: auto, cuda, wgpu or reference (`--help` says how auto chooses).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// The step to stop at, 1 to 4,294,967,296 [default: the spec's training
    /// duration; with --resume, the run's]. A fresh run's learning-rate and
    /// weight-decay schedules span these steps. A resumed run keeps the span it
    /// started with: resumed past it, the extra steps run at the schedules' final
    /// values (a finished cosine stays at its end rate instead of rising again).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=altc_compiler::spec::MAX_STEPS as u64))]
    steps: Option<u64>,
    /// Pairs per step: 2 to 65,536 for a model with a contrastive loss, else 1 to
    /// 65,536 [default: the spec's batch size].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=altc_compiler::spec::MAX_BATCH as u64))]
    batch_size: Option<u64>,
    /// Seed of initialisation, data order, task draws and dropout [default: the
    /// spec's seed].
    #[arg(long)]
    seed: Option<u64>,
    /// Pairs held out for the recalls: 1 to half the dataset [default: the
    /// dataset's fixed split (its last pairs) if it has one, else 512 by a split
    /// seeded with the run's seed].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    held_out: Option<u64>,
    /// Write a checkpoint every this many steps, and at the end (0: only at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Measure held-out recalls every this many steps, into `metrics.jsonl` (0: only
    /// at the end).
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    /// The run directory [default: runs/<model name>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in the run directory from its checkpoint, with its data,
    /// seed, batch size, held-out split and schedules (given again, they must
    /// match). A run killed before its first checkpoint starts again from step 0.
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Start afresh in a run directory that holds another run, deleting its
    /// checkpoint, record and model.
    #[arg(long)]
    force: bool,
    /// One kernel per op, no fusion: the unoptimised baseline.
    #[arg(long)]
    no_opt: bool,
    /// Ignore the tuning cache: every kernel runs its untuned fallback.
    #[arg(long)]
    untuned: bool,
    #[command(flatten)]
    cache: crate::devices::TuneCacheArgs,
}

#[derive(Args)]
pub struct EvalArgs {
    /// The run directory (holds `model.altc`, `run.ron`, `checkpoint.safetensors`).
    run_dir: PathBuf,
    /// The paired dataset [default: the one the run trained on].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where to run: auto, cuda, wgpu or reference (`--help` says how auto chooses).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// One kernel per op, no fusion.
    #[arg(long)]
    no_opt: bool,
}

/// The settings of a run, kept in its directory so `eval` and `--resume` agree with it.
#[derive(Serialize, Deserialize)]
struct RunRecord {
    data: DataIdentity,
    seed: u64,
    batch_size: usize,
    held_out: usize,
    /// The step the run stops at.
    steps: usize,
    /// The steps its schedules span: its first length, kept when it is extended
    /// (0 in records from before altc kept it: the same as `steps`).
    #[serde(default)]
    schedule_steps: usize,
}

const DEFAULT_HELD_OUT: usize = 512;

/// What a run directory holds of a run.
const RUN_FILES: [&str; 4] = [
    "run.ron",
    "model.altc",
    "checkpoint.safetensors",
    crate::metrics::METRICS_FILE,
];

impl RunRecord {
    fn read(run_dir: &Path) -> Result<RunRecord> {
        let path = run_dir.join("run.ron");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        ron::from_str(&text).with_context(|| {
            format!(
                "{}: unreadable run record (written by an older altc? start afresh with --force)",
                path.display()
            )
        })
    }

    fn write(&self, run_dir: &Path) -> Result<()> {
        let path = run_dir.join("run.ron");
        let pretty =
            ron::ser::to_string_pretty(self, ron::ser::PrettyConfig::new().struct_names(false))?;
        altc_runtime::atomic_write(&path, pretty.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Checks what a resumed run was given against what the run trained with, and
    /// names every difference.
    fn check_resume(&self, args: &RunArgs, data: &DataIdentity) -> Result<()> {
        let mut differences = Vec::new();
        if !self.data.same_contents(data) {
            differences.push(format!(
                "--data {} ({} bytes, SHA-256 {}) is not the dataset the run trained on, {} ({} bytes, SHA-256 {})",
                data.path.display(),
                data.bytes,
                short(&data.sha256),
                self.data.path.display(),
                self.data.bytes,
                short(&self.data.sha256)
            ));
        }
        let given = [
            ("--seed", args.seed, self.seed),
            ("--batch-size", args.batch_size, self.batch_size as u64),
            ("--held-out", args.held_out, self.held_out as u64),
        ];
        for (flag, given, recorded) in given {
            if let Some(value) = given.filter(|v| *v != recorded) {
                differences.push(format!("{flag} {value}, but the run used {recorded}"));
            }
        }
        if differences.is_empty() {
            return Ok(());
        }
        bail!(
            "cannot resume: {}; leave them out to resume with the run's own, or start a new run in another --out",
            differences.join("; ")
        )
    }
}

/// Refuses to resume with a model other than the one the run trained, which its
/// directory keeps: a checkpoint of the same shapes would load and train on silently.
fn check_same_model(run_dir: &Path, model: &LoadedModel) -> Result<()> {
    let kept = run_dir.join("model.altc");
    if !kept.exists() {
        return Ok(());
    }
    // Lowered in this run's form (`--no-opt` or not), so only the model can differ.
    let options = LowerOptions {
        dtype: model.program.dtype,
        moe: model.program.moe,
        ..LowerOptions::default()
    };
    let trained = lower_loaded(&Artifact::read(&kept)?.embedded_spec(&kept)?, options)?;
    let text = |p: &Program| ron::to_string(p).unwrap_or_default();
    if text(&trained) != text(&model.program) {
        bail!(
            "cannot resume: {} is not the model this run trained ({}); resume with that artifact",
            model.source_path,
            kept.display()
        );
    }
    Ok(())
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

pub fn data(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Text(args) => crate::encoders::data_text(args),
        DataCommand::Synth {
            model,
            output,
            pairs,
            seed,
            latent,
            noise,
            token_variation,
        } => synth_data(model, output, pairs, seed, latent, noise, token_variation),
    }
}

/// `altc data synth`.
fn synth_data(
    model: PathBuf,
    output: PathBuf,
    pairs: u64,
    seed: u64,
    latent: u64,
    noise: f64,
    token_variation: f64,
) -> Result<()> {
    files::refuse_overwrite(&output, &[("model", &model)])?;
    let program = load_program(&model, LowerOptions::default())?;
    let (pairs, latent) = (pairs as usize, latent as usize);
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

pub fn run(args: RunArgs) -> Result<()> {
    let model = load_model(&args.model, lower_options(args.no_opt))?;
    let program = &model.program;
    let tuned = !args.no_opt && !args.untuned && !matches!(args.device, Device::Reference);
    let tune_dir = if tuned {
        Some(args.cache.configure_cubecl()?)
    } else {
        None
    };
    let mut backend = open_backend_for(args.device, program, !args.no_opt)?;
    if let Some(dir) = &tune_dir {
        crate::devices::use_tuned_kernels(backend.as_mut(), dir)?;
    }
    let run_dir = args
        .out
        .clone()
        .unwrap_or_else(|| files::default_run_dir(&program.model));
    for stale in remove_stale_temporaries(&run_dir, None) {
        eprintln!(
            "removed {}, left by a write that was killed",
            stale.display()
        );
    }
    let checkpoint = checkpoint_path(&run_dir);
    let (record, data_file, resume_from_checkpoint) = if args.resume {
        let record = RunRecord::read(&run_dir)
            .with_context(|| format!("--resume: {} holds no run to resume", run_dir.display()))?;
        let data_path = args
            .data
            .clone()
            .unwrap_or_else(|| record.data.path.clone());
        let data = DataFile::read(&data_path)?;
        record.check_resume(&args, &data.identity)?;
        check_same_model(&run_dir, &model)?;
        let has_checkpoint = checkpoint.exists();
        if !has_checkpoint {
            eprintln!(
                "{} has no checkpoint yet (the run stopped before its first): starting it again from step 0",
                run_dir.display()
            );
        }
        let record = RunRecord {
            data: data.identity.clone(),
            ..record
        };
        (record, data, has_checkpoint)
    } else {
        let held: Vec<&str> = RUN_FILES
            .into_iter()
            .filter(|f| run_dir.join(f).exists())
            .collect();
        if !held.is_empty() && !args.force {
            bail!(
                "{} already holds a run ({}): continue it with --resume, start afresh there with --force (deleting it), or choose another --out",
                run_dir.display(),
                held.join(", ")
            );
        }
        let data_path = args
            .data
            .clone()
            .context("--data is needed to start a run")?;
        let data = DataFile::read(&data_path)?;
        let record = RunRecord {
            data: data.identity.clone(),
            seed: args.seed.unwrap_or(program.training.seed),
            batch_size: args
                .batch_size
                .map_or(program.training.batch_size, |b| b as usize),
            held_out: args.held_out.map_or(DEFAULT_HELD_OUT, |h| h as usize),
            steps: 0,
            schedule_steps: 0,
        };
        (record, data, false)
    };
    let data = Dataset::from_bytes(&data_file.bytes, &record.data.path, program)?;
    drop(data_file);
    // A dataset that fixes its held-out pairs decides a fresh run's split.
    let record = match (args.resume, args.held_out, data.fixed_held_out) {
        (false, None, Some(fixed)) => RunRecord {
            held_out: fixed,
            ..record
        },
        _ => record,
    };
    let mut tasks = Vec::new();
    for compiled in training_steps(program, !args.no_opt)? {
        if let Some(done) = &compiled.optimised {
            eprintln!(
                "optimised {}: {} -> {} kernels ({} rewrites, e-graph {} nodes)",
                compiled.task.graph.name,
                done.report.kernels_before,
                done.report.kernels_after,
                done.report.fired.values().sum::<usize>(),
                done.report.egraph_nodes
            );
        }
        tasks.push(compiled.task);
    }
    // A resumed run keeps its length unless told otherwise, and its schedules' span
    // always.
    let resumed_length = (args.resume && record.steps > 0).then_some(record.steps);
    // Only a run that goes on from a checkpoint keeps its span: one restarted from
    // step 0 plans its schedules afresh.
    let schedule_steps =
        resumed_length
            .filter(|_| resume_from_checkpoint)
            .map(|steps| match record.schedule_steps {
                0 => steps,
                span => span,
            });
    let options = TrainOptions {
        steps: args.steps.map(|s| s as usize).or(resumed_length),
        schedule_steps,
        batch_size: record.batch_size,
        seed: record.seed,
        held_out: record.held_out,
        // Checkpoints are written below, after the step's metrics: a kill between the
        // two then costs a redone step, never a step missing from metrics.jsonl.
        checkpoint_every: 0,
        run_dir: run_dir.clone(),
        resume: resume_from_checkpoint,
    };
    let mut trainer = Trainer::new(program, &tasks, data, options, backend)?;
    if args.steps.is_some() && trainer.warmup_steps() > trainer.total_steps() as f64 {
        eprintln!(
            "note: the learning rate warms up over {:.0} steps, longer than this run's {}: it never reaches its peak",
            trainer.warmup_steps(),
            trainer.total_steps()
        );
    }
    // --force deletes the old run only now, once the new one has passed every check.
    if args.force {
        for file in RUN_FILES {
            let path = run_dir.join(file);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("--force: removing {}", path.display()))?;
            }
        }
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    // The record first: a run killed before its model is kept can still be resumed
    // (from step 0, writing the model then).
    let record = RunRecord {
        steps: trainer.total_steps(),
        schedule_steps: trainer.schedule_steps(),
        ..record
    };
    if args.resume {
        say_where_resumed(&trainer);
    }
    record.write(&run_dir)?;
    let kept = run_dir.join("model.altc");
    if !kept.exists() {
        // The run directory keeps the compiled model so `eval` needs nothing else.
        model.artifact().write(&kept)?;
    }

    let total = trainer.total_steps();
    let first = trainer.step_index() as u64;
    let bar = ProgressBar::new(total as u64).with_position(first);
    // Rate and time left count this process's steps only, not the ones a resumed run
    // starts after (indicatif's estimator would count those as just done).
    let started = std::time::Instant::now();
    let rate = move |state: &ProgressState| {
        state.pos().saturating_sub(first) as f64 / started.elapsed().as_secs_f64().max(1e-9)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{left}, {rate}] {msg}",
        )
        .expect("valid template")
        .with_key(
            "rate",
            move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.1} steps/s", rate(state));
            },
        )
        .with_key(
            "left",
            move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let per_second = rate(state);
                let left = state.len().unwrap_or(0).saturating_sub(state.pos());
                match (per_second > 0.0).then(|| left as f64 / per_second) {
                    Some(seconds) => {
                        let s = seconds.round() as u64;
                        let _ = write!(w, "{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
                    }
                    None => {
                        let _ = write!(w, "--:--:--");
                    }
                }
            },
        ),
    );
    let mut metrics = if resume_from_checkpoint {
        MetricsLog::resume(&run_dir, trainer.step_index())?
    } else {
        MetricsLog::create(&run_dir)?
    };
    let eval_every = args.eval_every as usize;
    let checkpoint_every = args.checkpoint_every as usize;
    let mut last: Option<StepReport> = None;
    let mut final_recalls = None;
    while trainer.step_index() < total {
        let report = trainer.step()?;
        metrics.append(&Metric::from_report(
            &report,
            started.elapsed().as_secs_f64(),
        ))?;
        bar.set_message(describe(&report));
        bar.inc(1);
        last = Some(report);
        let done = trainer.step_index();
        if done == total || (eval_every > 0 && done % eval_every == 0) {
            let recalls = trainer.recalls()?;
            metrics.append(&Metric::from_recalls(done, &recalls))?;
            final_recalls = Some(recalls);
        }
        if checkpoint_every > 0 && done % checkpoint_every == 0 && done < total {
            trainer.save_checkpoint()?;
        }
    }
    bar.finish();
    trainer.save_checkpoint()?;
    let final_recalls = match final_recalls {
        Some(r) => r,
        None => trainer.recalls()?,
    };
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
    text.push_str(&format!(
        "metrics: {}\n",
        run_dir.join(crate::metrics::METRICS_FILE).display()
    ));
    text.push_str(&recall_table(&final_recalls));
    emit(&text)
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let record = RunRecord::read(&args.run_dir)?;
    let program: Program = Artifact::read(&args.run_dir.join("model.altc"))?.program;
    let other_data = args.data.is_some();
    let data = match args.data {
        Some(path) => {
            eprintln!(
                "evaluating on {}, not the run's {}",
                path.display(),
                record.data.path.display()
            );
            Dataset::load(&path, &program)?
        }
        None => {
            let file = DataFile::read(&record.data.path)?;
            if !file.identity.same_contents(&record.data) {
                bail!(
                    "{}: the dataset changed since the run trained on it, so its held-out pairs are not the run's; name the data to evaluate on with --data",
                    record.data.path.display()
                );
            }
            Dataset::from_bytes(&file.bytes, &record.data.path, &program)?
        }
    };
    let ckpt = Checkpoint::load(
        &checkpoint_path(&args.run_dir),
        &program.model,
        &state_shapes(&program),
        program.dtype,
    )?;
    // Another dataset that fixes its own split is evaluated on that split.
    let held_out = match (other_data, data.fixed_held_out) {
        (true, Some(fixed)) => fixed,
        _ => record.held_out,
    };
    let split = data.split(held_out, record.seed)?;
    let mut backend = open_backend_for(args.device, &program, !args.no_opt)?;
    backend.load_state(&ckpt.state)?;
    let r =
        recalls(&program, backend.as_mut(), &data, &split.held_out).context("computing recalls")?;
    emit(&format!(
        "checkpoint at step {} of {}\n{}",
        ckpt.step,
        record.steps,
        recall_table(&r)
    ))
}

/// Says where a resumed run picks up, and how its schedules go on.
fn say_where_resumed(trainer: &Trainer) {
    let (at, total, span) = (
        trainer.step_index(),
        trainer.total_steps(),
        trainer.schedule_steps(),
    );
    let (lr, _) = trainer.schedules_at(at);
    eprintln!("resuming at step {at} of {total} (learning rate {lr:.3e})");
    if total > span {
        let (end, _) = trainer.schedules_at(span);
        eprintln!(
            "its schedules span the first {span} steps, so steps {} to {total} run at their final values (learning rate {end:.3e}); to train {total} steps on one full schedule, start a new run",
            span.max(at) + 1,
        );
    }
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
