//! Training graphs: for each schedule task, one IR graph that computes the forward
//! pass, the task's losses, the gradients (by `autodiff`), global-norm clipping and the
//! AdamW update of every parameter the task touches. The optimizer is IR so later
//! stages rewrite and fuse it like the rest; the runtime only feeds batches and the
//! scheduled scalars, and swaps the updated tensors in.
//!
//! AdamW follows PyTorch exactly, including its per-parameter step counters: a
//! parameter that a task does not touch is not in that task's graph, so neither it nor
//! its moments nor its step change (as when its `.grad` is `None` in PyTorch).

use crate::autodiff::append_gradients;
use crate::ir::{
    BinaryOp, BuildGraph, DType, Graph, GraphBuilder, GraphError, NodeId, Shape, UnaryOp,
};
use crate::lower::{ParamInfo, Program};
use crate::outputs;
use crate::spec::{DecaySchedule, GradClip, LrSchedule, Optimizer, Schedule, Span};
use serde::{Deserialize, Serialize};

/// Graph inputs the runtime feeds besides the batch: scalars of the graph's dtype.
pub const LR_INPUT: &str = "optimizer.lr";
pub const WEIGHT_DECAY_INPUT: &str = "optimizer.weight_decay";

/// Optimizer state names of parameter `p`.
pub fn first_moment(p: &str) -> String {
    format!("adamw.m.{p}")
}
pub fn second_moment(p: &str) -> String {
    format!("adamw.v.{p}")
}
pub fn step_count(p: &str) -> String {
    format!("adamw.step.{p}")
}

/// Whether a state name is optimizer state (a moment or step count), not a parameter.
pub fn is_optimizer_state(name: &str) -> bool {
    name.starts_with("adamw.")
}
pub use crate::outputs::{gradient, updated};

/// One schedule task's training graph.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainingTask {
    /// `image_to_text`, or `joint` for a joint schedule.
    pub name: String,
    /// The directions whose losses this task sums.
    pub directions: Vec<String>,
    /// Parameters this task updates.
    pub updates: Vec<String>,
    pub graph: Graph,
}

/// The training graphs of `program`, one per schedule task, in the schedule's order:
/// what a backend runs. The raw gradients are intermediates, freed once clipping and
/// the update have read them.
pub fn training_tasks(program: &Program) -> Result<Vec<TrainingTask>, GraphError> {
    build_tasks(program, false)
}

/// `training_tasks` whose graphs also output each raw (unclipped) gradient as
/// `grad.<param>`, to check them against an oracle.
pub fn training_tasks_with_gradients(program: &Program) -> Result<Vec<TrainingTask>, GraphError> {
    build_tasks(program, true)
}

fn build_tasks(program: &Program, gradients: bool) -> Result<Vec<TrainingTask>, GraphError> {
    let groups: Vec<(String, Vec<String>)> = match program.schedule {
        Schedule::Joint => vec![(
            "joint".into(),
            program.directions.iter().map(|d| d.name.clone()).collect(),
        )],
        _ => program
            .directions
            .iter()
            .map(|d| (d.name.clone(), vec![d.name.clone()]))
            .collect(),
    };
    groups
        .into_iter()
        .map(|(name, directions)| build_task(program, &name, &directions, gradients))
        .collect()
}

fn build_task(
    program: &Program,
    name: &str,
    directions: &[String],
    gradient_outputs: bool,
) -> Result<TrainingTask, GraphError> {
    let mut graph = Graph::new(format!("{name}.train"));
    let mut total: Option<NodeId> = None;
    let joint = directions.len() > 1;
    for dir in directions {
        let info = program
            .directions
            .iter()
            .find(|d| &d.name == dir)
            .expect("task directions exist");
        let loss_graph = program
            .graph(&info.loss_graph)
            .expect("every direction has a loss graph");
        let map = graph.absorb(loss_graph)?;
        for (out, id) in loss_graph.outputs() {
            let label = if joint {
                outputs::in_direction(dir, out)
            } else {
                out.clone()
            };
            graph.set_output(label, map[id.index()])?;
        }
        let loss = map[loss_graph
            .output(outputs::LOSS)
            .expect("loss graphs output `loss`")
            .index()];
        total = Some(match total {
            None => loss,
            Some(t) => GraphBuilder::new(&mut graph, "schedule").add(t, loss)?,
        });
    }
    let total = total.expect("a task has at least one direction");
    if joint {
        graph.set_output(outputs::LOSS, total)?;
    }
    let trainable: Vec<(&ParamInfo, NodeId)> = graph
        .parameters()
        .filter_map(|(n, id)| {
            program
                .params
                .get(n)
                .filter(|p| p.trainable)
                .map(|p| (p, id))
        })
        .collect();
    let wrt: Vec<NodeId> = trainable.iter().map(|(_, id)| *id).collect();
    let grads = append_gradients(&mut graph, total, &wrt)?;
    let with_grads: Vec<(&ParamInfo, NodeId, NodeId)> = trainable
        .iter()
        .zip(grads)
        .filter_map(|((p, id), g)| g.map(|g| (*p, *id, g)))
        .collect();
    if gradient_outputs {
        for (p, _, g) in &with_grads {
            graph.set_output(gradient(&p.name), *g)?;
        }
    }
    let mut opt = OptimizerBuilder::new(&mut graph, program.dtype);
    opt.step(&program.optimizer, &with_grads)?;
    Ok(TrainingTask {
        name: name.to_string(),
        directions: directions.to_vec(),
        updates: with_grads.iter().map(|(p, _, _)| p.name.clone()).collect(),
        graph,
    })
}

/// The optimizer step alone, as a training graph ends: global-norm clipping, then
/// AdamW of every parameter in `params`, each gradient the graph input
/// `grad.<name>`. For testing and benchmarking the update apart from a model.
pub fn optimizer_step(
    optimizer: &Optimizer,
    params: &[ParamInfo],
    dtype: DType,
) -> Result<Graph, GraphError> {
    let mut graph = Graph::new("optimizer_step");
    let mut opt = OptimizerBuilder::new(&mut graph, dtype);
    let mut with_grads = Vec::with_capacity(params.len());
    for p in params {
        let param = opt.state(&p.name, &p.shape)?;
        let grad = opt.input(&gradient(&p.name), dtype, p.shape.iter().copied().collect())?;
        with_grads.push((p, param, grad));
    }
    opt.step(optimizer, &with_grads)?;
    Ok(graph)
}

struct OptimizerBuilder<'g> {
    graph: &'g mut Graph,
    dtype: DType,
    origin: String,
}

crate::build_graph_from_fields!(OptimizerBuilder<'_>);

impl<'g> OptimizerBuilder<'g> {
    fn new(graph: &'g mut Graph, dtype: DType) -> OptimizerBuilder<'g> {
        let origin = "optimizer".into();
        OptimizerBuilder {
            graph,
            dtype,
            origin,
        }
    }

    fn scalar(&mut self, v: f64) -> Result<NodeId, GraphError> {
        let dtype = self.dtype;
        self.constant(v, dtype, Shape::scalar())
    }

    /// A graph input or parameter the whole optimizer shares, attributed to it rather
    /// than to the parameter being updated.
    fn shared(
        &mut self,
        make: impl FnOnce(&mut Self, DType) -> Result<NodeId, GraphError>,
    ) -> Result<NodeId, GraphError> {
        let saved = std::mem::replace(&mut self.origin, "optimizer".into());
        let dtype = self.dtype;
        let id = make(self, dtype);
        self.origin = saved;
        id
    }

    fn scalar_input(&mut self, name: &str) -> Result<NodeId, GraphError> {
        if let Some((_, id)) = self.graph.inputs().find(|(n, _)| *n == name) {
            return Ok(id);
        }
        self.shared(|s, dtype| s.input(name, dtype, Shape::scalar()))
    }

    fn state(&mut self, name: &str, shape: &[usize]) -> Result<NodeId, GraphError> {
        let shape = shape.iter().copied().collect();
        self.shared(|s, dtype| s.parameter(name, dtype, shape))
    }

    /// Clipping, then the AdamW update of each `(parameter, its node, its gradient)`.
    fn step(
        &mut self,
        optimizer: &Optimizer,
        with_grads: &[(&ParamInfo, NodeId, NodeId)],
    ) -> Result<(), GraphError> {
        let grads = self.clip(optimizer, with_grads)?;
        for ((p, id, _), g) in with_grads.iter().zip(grads) {
            self.adamw(optimizer, p, *id, g)?;
        }
        Ok(())
    }

    /// Scales every gradient by `min(1, c / (||g|| + 1e-6))`, `||g||` the global norm
    /// over all of them (PyTorch's `clip_grad_norm_`); outputs `grad_norm`.
    fn clip(
        &mut self,
        optimizer: &Optimizer,
        grads: &[(&ParamInfo, NodeId, NodeId)],
    ) -> Result<Vec<NodeId>, GraphError> {
        let Optimizer::AdamW { clip, .. } = optimizer;
        self.origin = "optimizer.clip".into();
        let mut total: Option<NodeId> = None;
        for (_, _, g) in grads {
            let sq = self.unary(UnaryOp::Square, *g)?;
            let sum = self.sum_all(sq)?;
            total = Some(match total {
                None => sum,
                Some(t) => self.binary(BinaryOp::Add, t, sum)?,
            });
        }
        let Some(total) = total else {
            return Ok(vec![]);
        };
        let norm = self.unary(UnaryOp::Sqrt, total)?;
        self.graph.set_output(outputs::GRAD_NORM, norm)?;
        let GradClip::GlobalNorm(max_norm) = clip else {
            return Ok(grads.iter().map(|(_, _, g)| *g).collect());
        };
        let eps = self.scalar(1e-6)?;
        let denom = self.binary(BinaryOp::Add, norm, eps)?;
        let max_norm = self.scalar(*max_norm)?;
        let coef = self.binary(BinaryOp::Div, max_norm, denom)?;
        let one = self.scalar(1.0)?;
        let coef = self.binary(BinaryOp::Min, coef, one)?;
        grads
            .iter()
            .map(|(_, _, g)| self.binary(BinaryOp::Mul, *g, coef))
            .collect()
    }

    /// PyTorch's AdamW step for one parameter: decoupled decay, then the bias-corrected
    /// Adam update `p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)`.
    fn adamw(
        &mut self,
        optimizer: &Optimizer,
        p: &ParamInfo,
        param: NodeId,
        g: NodeId,
    ) -> Result<(), GraphError> {
        let Optimizer::AdamW {
            betas: (b1, b2),
            eps,
            ..
        } = optimizer;
        self.origin = format!("optimizer (AdamW on {})", p.name);
        let lr = self.scalar_input(LR_INPUT)?;
        let m = self.state(&first_moment(&p.name), &p.shape)?;
        let v = self.state(&second_moment(&p.name), &p.shape)?;
        let step = self.state(&step_count(&p.name), &[])?;
        let one = self.scalar(1.0)?;
        let t = self.binary(BinaryOp::Add, step, one)?;
        // Decoupled weight decay: p *= 1 - lr * wd.
        let decayed = if p.decay {
            let wd = self.scalar_input(WEIGHT_DECAY_INPUT)?;
            let lr_wd = self.binary(BinaryOp::Mul, lr, wd)?;
            let keep = self.binary(BinaryOp::Sub, one, lr_wd)?;
            self.binary(BinaryOp::Mul, param, keep)?
        } else {
            param
        };
        let moment =
            |s: &mut Self, state: NodeId, value: NodeId, beta: f64| -> Result<NodeId, GraphError> {
                let b = s.scalar(beta)?;
                let rest = s.scalar(1.0 - beta)?;
                let kept = s.binary(BinaryOp::Mul, state, b)?;
                let new = s.binary(BinaryOp::Mul, value, rest)?;
                s.binary(BinaryOp::Add, kept, new)
            };
        let m_new = moment(self, m, g, *b1)?;
        let g2 = self.unary(UnaryOp::Square, g)?;
        let v_new = moment(self, v, g2, *b2)?;
        let correction = |s: &mut Self, beta: f64| -> Result<NodeId, GraphError> {
            let b = s.scalar(beta)?;
            let pow = s.binary(BinaryOp::Pow, b, t)?;
            s.binary(BinaryOp::Sub, one, pow)
        };
        let bc1 = correction(self, *b1)?;
        let bc2 = correction(self, *b2)?;
        let step_size = self.binary(BinaryOp::Div, lr, bc1)?;
        let root_v = self.unary(UnaryOp::Sqrt, v_new)?;
        let root_bc2 = self.unary(UnaryOp::Sqrt, bc2)?;
        let denom = self.binary(BinaryOp::Div, root_v, root_bc2)?;
        let eps = self.scalar(*eps)?;
        let denom = self.binary(BinaryOp::Add, denom, eps)?;
        let ratio = self.binary(BinaryOp::Div, m_new, denom)?;
        let delta = self.binary(BinaryOp::Mul, ratio, step_size)?;
        let p_new = self.binary(BinaryOp::Sub, decayed, delta)?;
        self.graph.set_output(updated(&p.name), p_new)?;
        self.graph
            .set_output(updated(&first_moment(&p.name)), m_new)?;
        self.graph
            .set_output(updated(&second_moment(&p.name)), v_new)?;
        self.graph.set_output(updated(&step_count(&p.name)), t)
    }
}

/// How long a run is, for the schedules: total steps and steps per epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLength {
    pub total_steps: usize,
    pub steps_per_epoch: usize,
}

impl RunLength {
    fn span_steps(&self, span: Span) -> f64 {
        match span {
            Span::Steps(n) => n as f64,
            Span::Epochs(e) => e * self.steps_per_epoch as f64,
            Span::Fraction(f) => f * self.total_steps as f64,
        }
    }
}

/// The length of the learning rate's warm-up in steps (0 for a constant rate).
pub fn warmup_steps(schedule: &LrSchedule, run: RunLength) -> f64 {
    match schedule {
        LrSchedule::Constant(_) => 0.0,
        LrSchedule::WarmupCosine { warmup, .. } => run.span_steps(*warmup),
    }
}

/// Learning rate at 0-based `step`: linear warm-up from `start` to `peak`, then cosine
/// to `final` at the last step.
pub fn learning_rate(schedule: &LrSchedule, step: usize, run: RunLength) -> f64 {
    match schedule {
        LrSchedule::Constant(lr) => *lr,
        LrSchedule::WarmupCosine {
            start,
            peak,
            end,
            warmup,
        } => {
            let warm = run.span_steps(*warmup);
            let s = step as f64;
            if s < warm {
                return start + (peak - start) * s / warm;
            }
            let rest = (run.total_steps as f64 - warm).max(1.0);
            let progress = ((s - warm) / rest).min(1.0);
            end + 0.5 * (peak - end) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// Weight decay at 0-based `step`: cosine from `start` to `final` over the run.
pub fn weight_decay(schedule: &DecaySchedule, step: usize, run: RunLength) -> f64 {
    match schedule {
        DecaySchedule::Constant(wd) => *wd,
        DecaySchedule::Cosine { start, end } => {
            let progress = (step as f64 / (run.total_steps as f64).max(1.0)).min(1.0);
            end + 0.5 * (start - end) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// Stream of the task-sampling draws, apart from dropout's and initialisation's.
const SAMPLE_STREAM: u64 = 1 << 30;

/// Which task (index into `training_tasks`) trains at 0-based `step`.
pub fn task_at(schedule: &Schedule, tasks: usize, step: usize, seed: u64) -> usize {
    match schedule {
        Schedule::Joint => 0,
        Schedule::Alternate { steps_per_task } => (step / steps_per_task) % tasks,
        Schedule::Sample { probabilities } => {
            let u = crate::rng::uniform(seed, step as u64, SAMPLE_STREAM, 0);
            let mut acc = 0.0;
            for (i, p) in probabilities.iter().enumerate() {
                acc += p;
                if u < acc {
                    return i;
                }
            }
            tasks - 1
        }
    }
}
