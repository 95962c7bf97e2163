//! The training loop on the reference backend: picks each step's task from the
//! schedule, feeds a batch and the scheduled learning rate and weight decay to that
//! task's training graph, swaps the updated tensors in, stops at the first non-finite
//! value with the node that produced it, and writes checkpoints.

use crate::backend::{Backend, BackendError};
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::data::{DataError, Dataset, Split};
use crate::host::{host_memory_bytes, GIB};
use crate::retrieval::{recalls, Recall};
use altc_compiler::ir::{Graph, Op};
use altc_compiler::lower::Program;
use altc_compiler::outputs::{Output, GRAD_NORM};
use altc_compiler::reference::{evaluate, EvalContext, EvalError, Tensor, TensorMap};
use altc_compiler::spec::{Duration, Optimizer, MAX_BATCH, MAX_STEPS};
use altc_compiler::train::{
    first_moment, learning_rate, second_moment, step_count, task_at, warmup_steps, weight_decay,
    RunLength, TrainingTask, LR_INPUT, WEIGHT_DECAY_INPUT,
};
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("step {step} ({task}): {source}")]
    Eval {
        step: usize,
        task: String,
        #[source]
        source: EvalError,
    },
    #[error(transparent)]
    NonFinite(Box<NonFiniteStep>),
    #[error("step {step} ({task}): {source}")]
    Backend {
        step: usize,
        task: String,
        #[source]
        source: BackendError,
    },
    #[error("{0}")]
    Config(String),
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The step the run stops at; `None` takes the spec's duration.
    pub steps: Option<usize>,
    /// The steps the learning-rate and weight-decay schedules span; `None`: the
    /// run's own length. A resumed run keeps the span it started with, so a run
    /// extended past it continues at its schedules' final values instead of
    /// restarting them.
    pub schedule_steps: Option<usize>,
    pub batch_size: usize,
    pub seed: u64,
    /// Pairs held out for retrieval metrics.
    pub held_out: usize,
    pub checkpoint_every: usize,
    pub run_dir: PathBuf,
    pub resume: bool,
}

/// A step that produced a non-finite loss or update: where the first non-finite
/// value appeared, and what the run directory keeps.
#[derive(Debug, Error)]
#[error("step {step}, direction {task}: {what} is not finite; the first non-finite value is node {node} (`{op}`, from {origin}); {kept}")]
pub struct NonFiniteStep {
    pub step: usize,
    pub task: String,
    pub what: String,
    pub node: usize,
    pub op: String,
    pub origin: String,
    pub kept: KeptCheckpoint,
}

/// The checkpoint a stopped run leaves to go back to: the step of the last one
/// written or resumed from, or none yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptCheckpoint(pub Option<usize>);

impl std::fmt::Display for KeptCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(step) => write!(f, "the checkpoint of step {step} is kept"),
            None => write!(f, "no checkpoint was written before it"),
        }
    }
}

/// What one step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    pub step: usize,
    pub task: String,
    /// `loss` and every `loss.<term>` output, in name order.
    pub losses: Vec<(String, f64)>,
    pub lr: f64,
    pub weight_decay: f64,
    pub grad_norm: f64,
}

pub struct Trainer<'p> {
    program: &'p Program,
    tasks: &'p [TrainingTask],
    data: Dataset,
    split: Split,
    backend: Box<dyn Backend>,
    step: usize,
    /// What the schedules span.
    run: RunLength,
    /// The step the run stops at.
    stop_at: usize,
    /// The step of the last checkpoint written or resumed from.
    last_checkpoint: Option<usize>,
    options: TrainOptions,
}

impl<'p> Trainer<'p> {
    /// A trainer at step 0 with freshly initialised parameters, or, with `resume`, at
    /// the run directory's checkpoint; the state lives on `backend` from here on.
    pub fn new(
        program: &'p Program,
        tasks: &'p [TrainingTask],
        data: Dataset,
        options: TrainOptions,
        mut backend: Box<dyn Backend>,
    ) -> Result<Self, TrainError> {
        let split = data.split(options.held_out, options.seed)?;
        let min_batch = min_batch_size(program);
        if options.batch_size < min_batch || options.batch_size > MAX_BATCH {
            return Err(TrainError::Config(format!(
                "a batch of {} pairs; this model needs {min_batch} to {MAX_BATCH}{}",
                options.batch_size,
                if min_batch > 1 {
                    " (its contrastive loss takes its negatives from the batch)"
                } else {
                    ""
                }
            )));
        }
        let per_epoch = split.steps_per_epoch(options.batch_size);
        if per_epoch == 0 {
            return Err(DataError::TooSmall {
                path: data.path.clone(),
                pairs: data.pairs,
                train: split.train.len(),
                batch: options.batch_size,
            }
            .into());
        }
        let total_steps = match (options.steps, program.training.duration) {
            (Some(n), _) | (None, Duration::Steps(n)) => n,
            (None, Duration::Epochs(e)) => e.checked_mul(per_epoch).ok_or_else(|| {
                TrainError::Config(format!(
                    "{e} epochs of {per_epoch} steps are more steps than this machine can count"
                ))
            })?,
        };
        if total_steps == 0 || total_steps > MAX_STEPS {
            return Err(TrainError::Config(format!(
                "a run of {total_steps} steps; runs take 1 to {MAX_STEPS} steps"
            )));
        }
        let run = RunLength {
            total_steps: options.schedule_steps.unwrap_or(total_steps),
            steps_per_epoch: per_epoch,
        };
        let Optimizer::AdamW { lr, .. } = &program.optimizer;
        let warmup = warmup_steps(lr, run);
        if options.steps.is_none() && warmup > total_steps as f64 {
            return Err(TrainError::Config(format!(
                "the learning rate warms up over {warmup:.0} steps, but training lasts {total_steps}: it would never reach its peak; shorten optimizer.lr.warmup or lengthen training.duration"
            )));
        }
        ensure_state_fits(program)?;
        let (state, step) = if options.resume {
            let ckpt = Checkpoint::load(
                &checkpoint_path(&options.run_dir),
                &program.model,
                &state_shapes(program),
                program.dtype,
            )?;
            if ckpt.seed != options.seed {
                return Err(TrainError::Config(format!(
                    "the checkpoint was trained with seed {}, not {}; resume with --seed {}",
                    ckpt.seed, options.seed, ckpt.seed
                )));
            }
            if ckpt.step > total_steps {
                return Err(TrainError::Config(format!(
                    "the run is at step {} already; resume it with --steps {} or more",
                    ckpt.step,
                    ckpt.step + 1
                )));
            }
            (ckpt.state, ckpt.step)
        } else {
            (initial_state(program, options.seed), 0)
        };
        backend
            .load_state(&state)
            .map_err(|source| TrainError::Backend {
                step,
                task: "loading the parameters".into(),
                source,
            })?;
        Ok(Trainer {
            program,
            tasks,
            data,
            split,
            backend,
            step,
            run,
            stop_at: total_steps,
            last_checkpoint: options.resume.then_some(step),
            options,
        })
    }

    pub fn step_index(&self) -> usize {
        self.step
    }

    /// The step the run stops at.
    pub fn total_steps(&self) -> usize {
        self.stop_at
    }

    /// The steps the schedules span (past them, they hold their final values).
    pub fn schedule_steps(&self) -> usize {
        self.run.total_steps
    }

    /// The learning rate and weight decay at `step`.
    pub fn schedules_at(&self, step: usize) -> (f64, f64) {
        let Optimizer::AdamW {
            lr,
            weight_decay: wd,
            ..
        } = &self.program.optimizer;
        (
            learning_rate(lr, step, self.run),
            weight_decay(wd, step, self.run),
        )
    }

    /// Steps the learning rate takes to reach its peak.
    pub fn warmup_steps(&self) -> f64 {
        let Optimizer::AdamW { lr, .. } = &self.program.optimizer;
        warmup_steps(lr, self.run)
    }

    /// The parameters and optimizer state, copied to the host.
    pub fn state(&mut self) -> TensorMap {
        self.backend.read_state()
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Runs one training step.
    pub fn step(&mut self) -> Result<StepReport, TrainError> {
        let step = self.step;
        let t = task_at(
            &self.program.schedule,
            self.tasks.len(),
            step,
            self.options.seed,
        );
        let (lr, wd) = self.schedules_at(step);
        let task = &self.tasks[t];
        let pairs = self
            .split
            .batch_at(step, self.options.batch_size, self.options.seed);
        let mut inputs = self.data.batch(&pairs, self.program.dtype);
        inputs.insert(
            LR_INPUT.into(),
            Tensor::from_f64(self.program.dtype, &[], vec![lr]),
        );
        inputs.insert(
            WEIGHT_DECAY_INPUT.into(),
            Tensor::from_f64(self.program.dtype, &[], vec![wd]),
        );
        let ctx = EvalContext {
            seed: self.options.seed,
            step: step as u64,
        };
        let backend_error = |source| TrainError::Backend {
            step,
            task: task.name.clone(),
            source,
        };
        let outputs = self
            .backend
            .run(&task.graph, &inputs, ctx)
            .map_err(backend_error)?;
        if let Some((name, _)) = outputs
            .iter()
            .find(|(_, t)| t.to_f64().iter().any(|v| !v.is_finite()))
        {
            // Nothing is committed; replay the step on the reference interpreter from
            // the untouched state to find the first node that went non-finite.
            let state = self.backend.read_state();
            let evaluation =
                evaluate(&task.graph, &inputs, &state, ctx).map_err(|source| TrainError::Eval {
                    step,
                    task: task.name.clone(),
                    source,
                })?;
            return Err(first_non_finite(
                &task.graph,
                &evaluation.values,
                (step, &task.name),
                name,
                KeptCheckpoint(self.last_checkpoint),
            ));
        }
        let scalar = |name: &str| {
            outputs
                .get(name)
                .and_then(Tensor::scalar)
                .unwrap_or(f64::NAN)
        };
        let losses = outputs
            .iter()
            .filter(|(n, _)| Output::parse(n) == Output::Loss)
            .map(|(n, t)| (n.clone(), t.scalar().unwrap_or(f64::NAN)))
            .collect();
        let report = StepReport {
            step,
            task: task.name.clone(),
            losses,
            lr,
            weight_decay: wd,
            grad_norm: scalar(GRAD_NORM),
        };
        self.backend.commit();
        self.step += 1;
        if self.options.checkpoint_every > 0
            && self.step.is_multiple_of(self.options.checkpoint_every)
        {
            self.save_checkpoint()?;
        }
        Ok(report)
    }

    pub fn save_checkpoint(&mut self) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.options.run_dir).map_err(|source| CheckpointError::Io {
            path: self.options.run_dir.clone(),
            source,
        })?;
        Checkpoint {
            model: self.program.model.clone(),
            step: self.step,
            seed: self.options.seed,
            state: self.backend.read_state(),
        }
        .save(&checkpoint_path(&self.options.run_dir))?;
        self.last_checkpoint = Some(self.step);
        Ok(())
    }

    /// Recall@1/5/10 on the held-out pairs.
    pub fn recalls(&mut self) -> Result<Vec<Recall>, TrainError> {
        recalls(
            self.program,
            self.backend.as_mut(),
            &self.data,
            &self.split.held_out,
        )
        .map_err(|source| TrainError::Backend {
            step: self.step,
            task: "retrieval".into(),
            source,
        })
    }
}

pub fn checkpoint_path(run_dir: &std::path::Path) -> PathBuf {
    run_dir.join("checkpoint.safetensors")
}

/// Names and shapes of everything a checkpoint holds: parameters and AdamW state.
pub fn state_shapes(program: &Program) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for p in program.params.iter() {
        out.push((p.name.clone(), p.shape.clone()));
        if p.trainable {
            out.push((first_moment(&p.name), p.shape.clone()));
            out.push((second_moment(&p.name), p.shape.clone()));
            out.push((step_count(&p.name), vec![]));
        }
    }
    out
}

/// The smallest batch a model trains on: a contrastive loss (any direction with
/// retrieval graphs) draws its negatives from the batch, so it needs two pairs.
pub fn min_batch_size(program: &Program) -> usize {
    if program.directions.iter().any(|d| d.key_graph.is_some()) {
        2
    } else {
        1
    }
}

/// Refuses a model whose parameters and AdamW state would not fit this machine's
/// memory, before anything is allocated.
pub fn ensure_state_fits(program: &Program) -> Result<(), TrainError> {
    let bytes = state_bytes(program);
    match host_memory_bytes() {
        Some(memory) if bytes > memory => Err(TrainError::Config(format!(
            "the parameters and AdamW state of `{}` take {:.1} GiB, more than this machine's {:.1} GiB of memory",
            program.model,
            bytes as f64 / GIB,
            memory as f64 / GIB
        ))),
        _ => Ok(()),
    }
}

/// Bytes of everything a checkpoint holds.
pub fn state_bytes(program: &Program) -> u64 {
    state_shapes(program)
        .iter()
        .map(|(_, shape)| {
            shape.iter().product::<usize>() as u64 * program.dtype.size_bytes() as u64
        })
        .sum()
}

/// Initial parameters from the seed, zero moments and step counts.
pub fn initial_state(program: &Program, seed: u64) -> TensorMap {
    let mut state =
        altc_compiler::reference::initial_parameters(&program.params, program.dtype, seed);
    for (name, shape) in state_shapes(program) {
        state.entry(name).or_insert_with_key(|_| {
            let n = shape.iter().product();
            Tensor::from_f64(program.dtype, &shape, vec![0.0; n])
        });
    }
    state
}

fn first_non_finite(
    graph: &Graph,
    values: &[Tensor],
    (step, task): (usize, &str),
    output: &str,
    kept: KeptCheckpoint,
) -> TrainError {
    let order = graph.topo_order().unwrap_or_default();
    let bad = order
        .into_iter()
        .find(|id| {
            !matches!(graph.node(*id).op, Op::Parameter { .. } | Op::Input { .. })
                && values[id.index()].to_f64().iter().any(|v| !v.is_finite())
        })
        .or_else(|| graph.output(output));
    let (node, op, origin) = match bad {
        Some(id) => (
            id.index(),
            graph.node(id).op.mnemonic(),
            graph.node(id).origin.clone(),
        ),
        None => (0, String::new(), String::new()),
    };
    let what = if matches!(Output::parse(output), Output::Updated(_)) {
        format!("the update {output}")
    } else {
        format!("`{output}`")
    };
    TrainError::NonFinite(Box::new(NonFiniteStep {
        step,
        task: task.into(),
        what,
        node,
        op,
        origin,
        kept,
    }))
}
