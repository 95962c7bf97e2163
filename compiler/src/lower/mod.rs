//! Lowering: a validated `ModelSpec` becomes a `Program` of IR graphs over one shared
//! parameter table. After this point nothing reads the spec's model structure; the
//! program carries the settings the runtime needs (schedule, optimizer, training).
//!
//! Graphs, per direction `d: x -> y`:
//! - `d.loss`: both modalities' tokens in, every loss term (`loss.<name>`) and their
//!   weighted sum (`loss`) out. Dropout sites are present when lowered for training.
//! - `d.query` (when a contrastive loss exists): source tokens in, the pooled,
//!   normalised query embedding out.
//!
//! and per target modality `y` of a contrastive loss, `y.key`: target tokens in, the
//! pooled, normalised target-side embedding out (what retrieval stores).
//!
//! The MoE lowers to sparse dispatch by default: each token's top-k assignments are
//! grouped by expert and run through grouped expert matmuls. `MoeDispatch::Dense` gives
//! the authors' form instead, every expert on every token weighted by a dense gate
//! (zero outside the top-k); it is the `--no-opt` baseline. Both are the function in
//! `altmoe.md`.

mod builder;
mod encoder;
mod params;

pub use builder::BATCH;
pub use encoder::{lower_encoder, EncoderProgram, IDS, MASK, TOKENS};
pub use params::{Init, ParamInfo, ParamKind, ParamTable};

use crate::ir::{BuildGraph, DType, Dim, Graph, GraphError, NodeId, Op, ReduceOp, Shape, UnaryOp};
use crate::outputs;
use crate::spec::{
    Direction, Encoder, ExpertPool as ExpertPoolKind, Gate, GateInput, LossKind, ModelSpec,
    NoDecay, Optimizer, Schedule, Temperature, Training,
};
use builder::Builder;
use encoder::EncoderRun;
use serde::{Deserialize, Serialize};

/// Whether graphs are lowered for training (dropout active) or inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// How the MoE runs its experts. Both compute the function in `altmoe.md`; they
/// differ in work and in how dropout masks are laid out over the expert activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoeDispatch {
    /// The authors' form: every expert on every token, weighted by a dense gate that
    /// is zero outside the top-k (E/k times the expert work of `Sparse`).
    Dense,
    /// Each token's k kept experts only: assignments grouped by expert
    /// (`ExpertOrder`, `ExpertOffsets`) feed grouped expert matmuls.
    Sparse,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowerOptions {
    pub dtype: DType,
    pub mode: Mode,
    pub moe: MoeDispatch,
}

impl Default for LowerOptions {
    fn default() -> Self {
        LowerOptions {
            dtype: DType::F32,
            mode: Mode::Train,
            moe: MoeDispatch::Sparse,
        }
    }
}

/// A modality as the runtime sees it: the inputs it feeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModalityInfo {
    pub name: String,
    /// Input `<name>.tokens`: `[B, tokens, input_width]`.
    pub tokens: usize,
    pub input_width: usize,
    /// Width after the encoder.
    pub width: usize,
    /// Whether input `<name>.mask` (`[B, tokens]`, 1 = real token) exists.
    pub padded: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DirectionInfo {
    pub name: String,
    pub source: String,
    pub target: String,
    pub loss_graph: String,
    pub query_graph: Option<String>,
    pub key_graph: Option<String>,
}

/// Everything lowering produces.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Program {
    pub model: String,
    pub dtype: DType,
    /// The form the MoE was lowered to.
    pub moe: MoeDispatch,
    pub modalities: Vec<ModalityInfo>,
    pub directions: Vec<DirectionInfo>,
    /// Loss term names with their weights, in spec order.
    pub losses: Vec<(String, f64)>,
    pub params: ParamTable,
    pub graphs: Vec<Graph>,
    pub schedule: Schedule,
    pub optimizer: Optimizer,
    pub training: Training,
}

impl Program {
    pub fn graph(&self, name: &str) -> Option<&Graph> {
        self.graphs.iter().find(|g| g.name == name)
    }
}

/// A graph that could not be built; `origin` is the spec path responsible.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct LowerError {
    pub origin: String,
    #[source]
    pub source: GraphError,
}

impl From<GraphError> for LowerError {
    fn from(source: GraphError) -> Self {
        let origin = match &source {
            GraphError::Type { origin, .. } => origin.clone(),
            _ => String::new(),
        };
        LowerError { origin, source }
    }
}

pub fn lower(spec: &ModelSpec, options: LowerOptions) -> Result<Program, LowerError> {
    let mut lowering = Lowering {
        spec,
        options,
        params: ParamTable::default(),
        streams: 0,
    };
    let mut graphs = Vec::new();
    let mut directions = Vec::new();
    let contrastive = spec
        .losses
        .iter()
        .find(|l| matches!(l.kind, LossKind::InfoNce { .. }));
    for (i, dir) in spec.directions.iter().enumerate() {
        graphs.push(lowering.loss_graph(i, dir)?);
        let mut info = DirectionInfo {
            name: dir.name.clone(),
            source: dir.source.clone(),
            target: dir.target.clone(),
            loss_graph: format!("{}.loss", dir.name),
            query_graph: None,
            key_graph: None,
        };
        if let Some(loss) = contrastive {
            graphs.push(lowering.query_graph(i, dir, &loss.output)?);
            info.query_graph = Some(format!("{}.query", dir.name));
            let key = format!("{}.key", dir.target);
            if !graphs.iter().any(|g| g.name == key) {
                graphs.push(lowering.key_graph(&dir.target)?);
            }
            info.key_graph = Some(key);
        }
        directions.push(info);
    }
    lowering.mark_trainable_and_decay();
    Ok(Program {
        model: spec.name.clone(),
        dtype: options.dtype,
        moe: options.moe,
        modalities: spec
            .modalities
            .iter()
            .map(|m| ModalityInfo {
                name: m.name.clone(),
                tokens: m.tokens.count(),
                input_width: match &m.encoder {
                    Encoder::Precomputed => m.width,
                    Encoder::Graph { input_width, .. } => *input_width,
                    Encoder::Text { .. } => unreachable!("validated: models take no raw text"),
                },
                width: m.width,
                padded: m.tokens.is_padded(),
            })
            .collect(),
        directions,
        losses: spec
            .losses
            .iter()
            .map(|l| (l.name.clone(), l.weight))
            .collect(),
        params: lowering.params,
        graphs,
        schedule: spec.schedule.clone(),
        optimizer: spec.optimizer.clone(),
        training: spec.training.clone(),
    })
}

struct Lowering<'s> {
    spec: &'s ModelSpec,
    options: LowerOptions,
    params: ParamTable,
    streams: u64,
}

/// Encoded tokens of one modality: `[B, L, width]` and the `[B, L]` mask if padded.
struct Encoded {
    tokens: NodeId,
    mask: Option<NodeId>,
}

impl Lowering<'_> {
    fn builder(&mut self, name: &str) -> Builder<'_> {
        Builder::new(
            name,
            &mut self.params,
            &mut self.streams,
            self.options.dtype,
        )
    }

    fn loss_graph(&mut self, index: usize, dir: &Direction) -> Result<Graph, LowerError> {
        let spec = self.spec;
        let options = self.options;
        let name = format!("{}.loss", dir.name);
        let mut b = self.builder(&name);
        let src = encode(&mut b, spec, lower_index(spec, &dir.source))?;
        let tgt = encode(&mut b, spec, lower_index(spec, &dir.target))?;
        let z = connector_input(&mut b, spec, index, dir, &src)?;
        let mut total: Option<NodeId> = None;
        for (li, loss) in spec.losses.iter().enumerate() {
            let path = format!("losses[{li}]");
            let head = branch_head(&mut b, spec, index, dir, &loss.output, z, options)?;
            let term = b.at(&path, |b| match &loss.kind {
                LossKind::SmoothL1 { .. } | LossKind::SquaredL2 => {
                    let pred = b.pool(head, src.mask, spec.connector.pooling)?;
                    let target = b.pool(tgt.tokens, tgt.mask, spec.connector.pooling)?;
                    regression(b, &loss.kind, pred, target)
                }
                LossKind::InfoNce { temperature } => {
                    let q = b.pool(head, src.mask, spec.connector.pooling)?;
                    let k = target_side(b, spec, &dir.target, &tgt)?;
                    info_nce(b, q, k, *temperature, &loss.name)
                }
            })?;
            b.graph.set_output(outputs::loss_term(&loss.name), term)?;
            let weighted = b.at(&path, |b| b.scale(term, loss.weight))?;
            total = Some(match total {
                None => weighted,
                Some(t) => b.at("losses", |b| b.add(t, weighted))?,
            });
        }
        let total = total.expect("validated: at least one loss");
        b.graph.set_output(outputs::LOSS, total)?;
        Ok(b.graph)
    }

    fn query_graph(
        &mut self,
        index: usize,
        dir: &Direction,
        branch: &str,
    ) -> Result<Graph, LowerError> {
        let spec = self.spec;
        let eval = LowerOptions {
            mode: Mode::Eval,
            ..self.options
        };
        let name = format!("{}.query", dir.name);
        let mut b = self.builder(&name);
        let src = encode(&mut b, spec, lower_index(spec, &dir.source))?;
        let z = connector_input(&mut b, spec, index, dir, &src)?;
        let head = branch_head(&mut b, spec, index, dir, branch, z, eval)?;
        let q = b.at("connector.pooling", |b| {
            let q = b.pool(head, src.mask, spec.connector.pooling)?;
            b.l2_normalize(q)
        })?;
        b.graph.set_output(outputs::EMBEDDING, q)?;
        Ok(b.graph)
    }

    fn key_graph(&mut self, modality: &str) -> Result<Graph, LowerError> {
        let spec = self.spec;
        let name = format!("{modality}.key");
        let mut b = self.builder(&name);
        let tgt = encode(&mut b, spec, lower_index(spec, modality))?;
        let k = target_side(&mut b, spec, modality, &tgt)?;
        let k = b.at("connector.target_projection", |b| b.l2_normalize(k))?;
        b.graph.set_output(outputs::EMBEDDING, k)?;
        Ok(b.graph)
    }

    fn mark_trainable_and_decay(&mut self) {
        let frozen: Vec<String> = self
            .spec
            .modalities
            .iter()
            .filter(|m| m.encoder.is_frozen())
            .map(|m| format!("encoders.{}.", m.name))
            .collect();
        let Optimizer::AdamW { no_decay, .. } = &self.spec.optimizer;
        for p in self.params.iter_mut() {
            p.trainable = !frozen.iter().any(|f| p.name.starts_with(f.as_str()));
            let one_dimensional = p.shape.iter().filter(|&&d| d != 1).count() <= 1;
            p.decay = p.trainable
                && !no_decay.iter().any(|rule| match rule {
                    NoDecay::Biases => p.kind == ParamKind::Bias,
                    NoDecay::OneDimensional => one_dimensional,
                    NoDecay::Prefix(prefix) => p.name.starts_with(prefix.as_str()),
                });
        }
    }
}

fn lower_index(spec: &ModelSpec, name: &str) -> usize {
    spec.modalities
        .iter()
        .position(|m| m.name == name)
        .expect("validated: directions name existing modalities")
}

fn batch_shape(rest: &[usize]) -> Shape {
    let mut dims = vec![Dim::sym(BATCH)];
    dims.extend(rest.iter().map(|&d| Dim::Fixed(d)));
    Shape(dims)
}

/// The modality's input tokens through its encoder.
fn encode(b: &mut Builder, spec: &ModelSpec, mi: usize) -> Result<Encoded, GraphError> {
    let m = &spec.modalities[mi];
    let path = format!("modalities[{mi}]");
    let tokens = m.tokens.count();
    b.at(&path, |b| {
        let run = EncoderRun {
            inputs: &format!("{}.", m.name),
            params: &format!("encoders.{}.", m.name),
            path: &format!("{path}.encoder"),
            tokens,
            padded: m.tokens.is_padded(),
            width: m.width,
        };
        let (tokens, mask) = run.lower(b, &m.encoder)?;
        Ok(Encoded { tokens, mask })
    })
}

/// `z = act(Linear_d(e_x + d_emb))`: the source tokens in the connector's space.
fn connector_input(
    b: &mut Builder,
    spec: &ModelSpec,
    index: usize,
    dir: &Direction,
    src: &Encoded,
) -> Result<NodeId, GraphError> {
    let width = spec.modalities[lower_index(spec, &dir.source)].width;
    let h = spec.connector.hidden;
    let prefix = format!("directions.{}", dir.name);
    let mut x = src.tokens;
    if spec.connector.direction_embedding {
        x = b.at(&format!("directions[{index}]"), |b| {
            let e = b.embedding(&format!("{prefix}.embedding"), width)?;
            b.add(x, e)
        })?;
    }
    b.at("connector.input_projection", |b| {
        let z = b.linear(x, &format!("{prefix}.input_projection"), width, h, true)?;
        b.activation(spec.connector.input_projection.activation, z)
    })
}

/// One branch through router, experts and output block, then its head for `dir`.
fn branch_head(
    b: &mut Builder,
    spec: &ModelSpec,
    index: usize,
    dir: &Direction,
    branch: &str,
    z: NodeId,
    options: LowerOptions,
) -> Result<NodeId, GraphError> {
    let (train, moe) = (options.mode == Mode::Train, options.moe);
    let c = &spec.connector;
    let bi = c
        .branches
        .iter()
        .position(|br| br.name == branch)
        .expect("validated: losses read existing branches");
    let h = c.hidden;
    let zb = b.at(&format!("connector.branches[{bi}]"), |b| {
        if !c.branches[bi].task_embedding {
            return Ok(z);
        }
        let t = b.embedding(&format!("branches.{branch}.task_embedding"), h)?;
        b.add(z, t)
    })?;
    let routing = b.at("connector.router", |b| route(b, spec, dir, branch, zb))?;
    let mixed = b.at("connector.experts", |b| {
        let pool = ExpertPool::declare(b, spec, dir)?;
        match moe {
            MoeDispatch::Dense => pool.dense(b, spec, zb, &routing, train),
            MoeDispatch::Sparse => pool.sparse(b, spec, zb, &routing, train),
        }
    })?;
    let out = b.at("connector.branch_output", |b| {
        let mut o = mixed;
        if c.branch_output.layer_norm {
            o = b.layer_norm(o, &format!("branches.{branch}.layer_norm"), h, 1e-5)?;
        }
        o = b.activation(c.branch_output.activation, o)?;
        if c.branch_output.residual {
            o = b.add(o, zb)?;
        }
        Ok(o)
    })?;
    let width = dir.heads[branch];
    b.at(&format!("directions[{index}].heads.{branch}"), |b| {
        b.linear(
            out,
            &format!("directions.{}.heads.{branch}", dir.name),
            h,
            width,
            true,
        )
    })
}

/// Each token's top-k experts and their (unrenormalised unless asked) probabilities.
struct Routing {
    /// `[B, L, k]` expert ids, most probable first.
    top: NodeId,
    /// `[B, L, k]` gate weights.
    kept: NodeId,
}

/// Routes each token: softmax over the experts, then its top-k.
fn route(
    b: &mut Builder,
    spec: &ModelSpec,
    dir: &Direction,
    branch: &str,
    zb: NodeId,
) -> Result<Routing, GraphError> {
    let r = &spec.connector.router;
    let h = spec.connector.hidden;
    let experts = spec.connector.experts.count;
    let (input, in_width) = match r.gate_input {
        GateInput::Hidden => (zb, h),
        GateInput::HiddenWithModality { width } => {
            let e = b.embedding(&format!("router.modality_embedding.{}", dir.source), width)?;
            let dims = b.ty(zb).dims().to_vec();
            let shape = Shape(vec![dims[0].clone(), dims[1].clone(), Dim::Fixed(width)]);
            let e = b.push(Op::BroadcastTo { shape }, &[e])?;
            (b.push(Op::Concat { axis: 2 }, &[zb, e])?, h + width)
        }
    };
    let prefix = match r.gate {
        Gate::Shared => "router.gate".to_string(),
        Gate::PerBranch => format!("router.{branch}.gate"),
    };
    let logits = b.linear(input, &prefix, in_width, experts, r.bias)?;
    let probs = b.softmax(logits, 2)?;
    let top = b.push(Op::TopK { k: r.top_k }, &[probs])?;
    let mut kept = b.push(Op::Gather { axis: 2 }, &[probs, top])?;
    if r.renormalize {
        let sum = b.reduce(ReduceOp::Sum, kept, &[2], true)?;
        kept = b.div(kept, sum)?;
    }
    Ok(Routing { top, kept })
}

/// The expert pool's parameters, as `[E, ...]` stacks shared by both dispatch forms
/// (so checkpoints move freely between them).
struct ExpertPool {
    w1: NodeId,
    b1: NodeId,
    w2: NodeId,
    b2: NodeId,
}

impl ExpertPool {
    fn declare(b: &mut Builder, spec: &ModelSpec, dir: &Direction) -> Result<Self, GraphError> {
        let ex = &spec.connector.experts;
        let (h, e, eh) = (spec.connector.hidden, ex.count, ex.hidden);
        let prefix = match ex.pool {
            ExpertPoolKind::Shared => "experts".to_string(),
            ExpertPoolKind::PerModality => format!("experts.{}", dir.source),
        };
        let b1_bound = 1.0 / (h as f64).sqrt();
        let b2_bound = 1.0 / (eh as f64).sqrt();
        let mut param = |name: &str, shape: &[usize], kind, bound| {
            b.param(
                &format!("{prefix}.{name}"),
                shape,
                kind,
                Init::Uniform { bound },
            )
        };
        Ok(ExpertPool {
            w1: param("w1", &[e, h, eh], ParamKind::Weight, b1_bound)?,
            b1: param("b1", &[e, eh], ParamKind::Bias, b1_bound)?,
            w2: param("w2", &[e, eh, h], ParamKind::Weight, b2_bound)?,
            b2: param("b2", &[e, h], ParamKind::Bias, b2_bound)?,
        })
    }

    /// `sum_e gate[.., e] * Expert_e(z)` with every expert computed on every token and
    /// the gate scattered densely to `[B, L, E]` (zero outside the top-k).
    fn dense(
        &self,
        b: &mut Builder,
        spec: &ModelSpec,
        zb: NodeId,
        routing: &Routing,
        train: bool,
    ) -> Result<NodeId, GraphError> {
        let ex = &spec.connector.experts;
        let (h, e, eh) = (spec.connector.hidden, ex.count, ex.hidden);
        let dims = b.ty(zb).dims().to_vec();
        let (bsym, tokens) = (dims[0].clone(), dims[1].clone());
        let fixed = |v: &[usize]| Shape(v.iter().map(|&d| Dim::Fixed(d)).collect());
        let gate_shape = Shape(vec![bsym.clone(), tokens.clone(), Dim::Fixed(e)]);
        let gate = b.push(
            Op::ScatterAdd {
                axis: 2,
                shape: gate_shape,
            },
            &[routing.top, routing.kept],
        )?;
        // [B, L, h] x [E, 1, h, eh] -> [E, B, L, eh]: batch dims [B] and [E, 1] broadcast.
        let w1 = b.reshape(self.w1, fixed(&[e, 1, h, eh]))?;
        let b1 = b.reshape(self.b1, fixed(&[e, 1, 1, eh]))?;
        let hidden = b.matmul(zb, w1, false, false)?;
        let hidden = b.add(hidden, b1)?;
        let hidden = b.activation(ex.activation, hidden)?;
        let hidden = b.dropout(hidden, ex.dropout, train)?;
        let w2 = b.reshape(self.w2, fixed(&[e, 1, eh, h]))?;
        let b2 = b.reshape(self.b2, fixed(&[e, 1, 1, h]))?;
        let out = b.matmul(hidden, w2, false, false)?;
        let out = b.add(out, b2)?;
        let out = b.dropout(out, ex.dropout, train)?;
        // gate [B, L, E] -> [E, B, L, 1], weight each expert's output, sum over experts.
        let g = b.transpose(gate, &[2, 0, 1])?;
        let g = b.reshape(g, Shape(vec![Dim::Fixed(e), bsym, tokens, Dim::Fixed(1)]))?;
        let weighted = b.mul(out, g)?;
        b.reduce(ReduceOp::Sum, weighted, &[0], false)
    }

    /// `sum_j kept[.., j] * Expert_top[j](z)` over each token's k kept experts only:
    /// the `[B, L, k]` assignments are grouped by expert once and both expert layers
    /// run as grouped matmuls over `[B, L, k, ..]` activations.
    fn sparse(
        &self,
        b: &mut Builder,
        spec: &ModelSpec,
        zb: NodeId,
        routing: &Routing,
        train: bool,
    ) -> Result<NodeId, GraphError> {
        let ex = &spec.connector.experts;
        let grouped = Op::ExpertMatMul {
            transpose_w: false,
            bias: true,
        };
        let order = b.push(Op::ExpertOrder { experts: ex.count }, &[routing.top])?;
        let offsets = b.push(Op::ExpertOffsets { experts: ex.count }, &[routing.top])?;
        let hidden = b.push(grouped.clone(), &[zb, self.w1, self.b1, order, offsets])?;
        let hidden = b.activation(ex.activation, hidden)?;
        let hidden = b.dropout(hidden, ex.dropout, train)?;
        let out = b.push(grouped, &[hidden, self.w2, self.b2, order, offsets])?;
        let out = b.dropout(out, ex.dropout, train)?;
        let mut gate_shape = b.ty(routing.kept).clone();
        gate_shape.0.push(Dim::Fixed(1));
        let g = b.reshape(routing.kept, gate_shape)?;
        let weighted = b.mul(out, g)?;
        b.reduce(ReduceOp::Sum, weighted, &[2], false)
    }
}

/// `Linear_y(e_y)` pooled: the target side of the contrastive loss.
fn target_side(
    b: &mut Builder,
    spec: &ModelSpec,
    modality: &str,
    tgt: &Encoded,
) -> Result<NodeId, GraphError> {
    let width = spec.modalities[lower_index(spec, modality)].width;
    let out = spec.connector.target_projection.width;
    b.at("connector.target_projection", |b| {
        let y = b.linear(
            tgt.tokens,
            &format!("target_projections.{modality}"),
            width,
            out,
            true,
        )?;
        b.pool(y, tgt.mask, spec.connector.pooling)
    })
}

/// SmoothL1 (Huber) or squared error between pooled `[B, d]` vectors, mean over all.
fn regression(
    b: &mut Builder,
    kind: &LossKind,
    pred: NodeId,
    target: NodeId,
) -> Result<NodeId, GraphError> {
    let d = b.sub(pred, target)?;
    let per_element = match kind {
        LossKind::SmoothL1 { beta } => {
            let ad = b.unary(UnaryOp::Abs, d)?;
            let beta_c = b.scalar(*beta)?;
            let small = b.push(Op::Compare(crate::ir::CompareOp::Lt), &[ad, beta_c])?;
            let sq = b.unary(UnaryOp::Square, d)?;
            let quadratic = b.scale(sq, 0.5 / beta)?;
            let half_beta = b.scalar(0.5 * beta)?;
            let linear = b.sub(ad, half_beta)?;
            b.push(Op::Where, &[small, quadratic, linear])?
        }
        LossKind::SquaredL2 => b.unary(UnaryOp::Square, d)?,
        LossKind::InfoNce { .. } => unreachable!("not a regression loss"),
    };
    b.reduce(ReduceOp::Mean, per_element, &[0, 1], false)
}

/// `0.5 * [CE(S/tau, diag) + CE(S^T/tau, diag)]` with `S` the cosine similarities of
/// the pooled queries and keys, `[B, B]`.
fn info_nce(
    b: &mut Builder,
    q: NodeId,
    k: NodeId,
    temperature: Temperature,
    loss: &str,
) -> Result<NodeId, GraphError> {
    let q = b.l2_normalize(q)?;
    let k = b.l2_normalize(k)?;
    let sim = b.matmul(q, k, false, true)?;
    let logits = match temperature {
        Temperature::Fixed(tau) => b.scale(sim, 1.0 / tau)?,
        Temperature::Learned { init } => {
            let log_tau = b.param(
                &format!("losses.{loss}.log_temperature"),
                &[1],
                ParamKind::Scalar,
                Init::Constant(init.ln()),
            )?;
            let neg = b.unary(UnaryOp::Neg, log_tau)?;
            let inv_tau = b.unary(UnaryOp::Exp, neg)?;
            b.mul(sim, inv_tau)?
        }
    };
    let eye = b.batch_identity()?;
    let ce = |b: &mut Builder, axis: usize| -> Result<NodeId, GraphError> {
        let lsm = b.log_softmax(logits, axis)?;
        let on_diag = b.mul(lsm, eye)?;
        let diag = b.reduce(ReduceOp::Sum, on_diag, &[1 - axis], false)?;
        let mean = b.reduce(ReduceOp::Mean, diag, &[0], false)?;
        b.unary(UnaryOp::Neg, mean)
    };
    let rows = ce(b, 1)?;
    let cols = ce(b, 0)?;
    let both = b.add(rows, cols)?;
    b.scale(both, 0.5)
}

/// Lowers a loaded spec, reporting a graph that cannot be built at the spec path and
/// line it came from.
pub fn lower_loaded(
    loaded: &crate::spec::LoadedSpec,
    options: LowerOptions,
) -> Result<Program, crate::spec::SpecError> {
    lower(&loaded.spec, options).map_err(|e| {
        let path = if e.origin.is_empty() {
            "connector"
        } else {
            e.origin.as_str()
        };
        loaded.invalid(
            path,
            format!("the lowered graph does not fit: {}", e.source),
            "",
        )
    })
}
