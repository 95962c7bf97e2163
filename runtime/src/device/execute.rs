//! Executing a plan: binding a run's leaves, walking the schedule step by step,
//! freeing each buffer after its last reader, and evaluating the ops that run on
//! their own.

use super::state::{DeviceBackend, Leaves, Value};
use super::translate::{binary_kind, cast_kind, compare_kind, reduce_kind, unary_kind};
use crate::backend::{BackendError, Bytes, FitError, KernelTiming};
use altc_compiler::fusion::{self, FusionPlan, Step};
use altc_compiler::ir::{Dim, Graph, NodeId, Op, Shape};
use altc_compiler::outputs::Output;
use altc_compiler::reference::{EvalContext, Tensor};
use altc_kernels::{ExpertMatmul, Kernels, RowTopK, UnaryKind, View, ELEMENT_BYTES};
use cubecl::prelude::*;
use std::collections::BTreeMap;

impl<R: Runtime> DeviceBackend<R> {
    pub(super) fn eval(
        &self,
        graph: &Graph,
        id: NodeId,
        x: &[&Value],
        shape: Vec<usize>,
        ctx: EvalContext,
    ) -> Value {
        let node = graph.node(id);
        let k = &self.kernels;
        let contiguous = |h| Value::contiguous(h, shape.clone());
        match &node.op {
            Op::Input { .. } | Op::Parameter { .. } => {
                unreachable!("leaves are bound before evaluation")
            }
            Op::Constant { value, .. } => {
                // One element, read everywhere through stride 0.
                let handle = k.constant(value.0 as f32);
                Value {
                    view: View {
                        handle,
                        len: 1,
                        offset: 0,
                        strides: vec![0; shape.len()],
                    },
                    shape,
                }
            }
            Op::Iota { axis, .. } => contiguous(k.iota(&shape, *axis)),
            Op::Unary(u) => contiguous(k.unary(unary_kind(*u), &x[0].view, &shape)),
            Op::Cast { dtype } => contiguous(k.unary(cast_kind(*dtype), &x[0].view, &shape)),
            Op::Binary(b) => contiguous(k.binary(
                binary_kind(*b),
                &self.view_as(x[0], &shape),
                &self.view_as(x[1], &shape),
                &shape,
            )),
            Op::Compare(c) => contiguous(k.binary(
                compare_kind(*c),
                &self.view_as(x[0], &shape),
                &self.view_as(x[1], &shape),
                &shape,
            )),
            Op::Where => contiguous(k.select(
                &self.view_as(x[0], &shape),
                &self.view_as(x[1], &shape),
                &self.view_as(x[2], &shape),
                &shape,
            )),
            Op::Reduce { op, axes, .. } => {
                contiguous(k.reduce(reduce_kind(*op), &x[0].view, &x[0].shape, axes))
            }
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => {
                let batch = &shape[..shape.len() - 2];
                contiguous(k.matmul(&self.matmul_of(
                    (x[0], x[1]),
                    (*transpose_a, *transpose_b),
                    batch,
                )))
            }
            Op::Transpose { perm } => Value {
                view: View {
                    strides: perm.iter().map(|&p| x[0].view.strides[p]).collect(),
                    ..x[0].view.clone()
                },
                shape,
            },
            Op::StopGradient => x[0].clone(),
            Op::Reshape { .. } => {
                let base = self.materialise(x[0]);
                Value {
                    view: View::contiguous(base.view.handle, &shape),
                    shape,
                }
            }
            Op::BroadcastTo { .. } => Value {
                view: self.view_as(x[0], &shape),
                shape,
            },
            Op::Slice { axis, start, .. } => {
                let mut view = x[0].view.clone();
                view.offset += start * view.strides[*axis];
                Value { view, shape }
            }
            Op::Concat { axis } => {
                let n: usize = shape.iter().product();
                let out = k.buffer(n);
                let strides = altc_kernels::contiguous_strides(&shape);
                let mut at = 0;
                for part in x {
                    k.copy_into(
                        &part.view,
                        &part.shape,
                        &out,
                        n,
                        at * strides[*axis],
                        &strides,
                    );
                    at += part.shape[*axis];
                }
                contiguous(out)
            }
            Op::Gather { axis } => {
                // Data of extent 1 off the axis is read broadcast over the index.
                let mut data_shape = shape.clone();
                data_shape[*axis] = x[0].shape[*axis];
                let data = self.view_as(x[0], &data_shape);
                contiguous(k.gather(&data, &x[1].view, *axis, &shape))
            }
            Op::ScatterAdd { axis, .. } => {
                contiguous(k.scatter_add(&x[0].view, &x[1].view, *axis, x[0].shape[*axis], &shape))
            }
            Op::TopK { k: kk } => {
                let input = self.materialise(x[0]);
                let n = *input.shape.last().expect("top-k operands have an axis");
                let rows = input.shape.iter().product::<usize>() / n.max(1);
                contiguous(k.top_k(&input.view.handle, rows, n, *kk))
            }
            Op::Dropout { rate, stream } => {
                let input = self.materialise(x[0]);
                let n = shape.iter().product();
                contiguous(k.dropout(&input.view.handle, n, rate.0, ctx.seed, ctx.step, *stream))
            }
            Op::ExpertOrder { experts } | Op::ExpertOffsets { experts } => {
                let index = self.materialise(x[0]);
                let n = index.shape.iter().product();
                contiguous(match node.op {
                    Op::ExpertOrder { .. } => k.expert_order(&index.view.handle, n, *experts),
                    _ => k.expert_offsets(&index.view.handle, n, *experts),
                })
            }
            Op::ExpertMatMul { transpose_w, bias } => {
                let rows = self.materialise(x[0]);
                let (order, offsets) = (x[x.len() - 2], x[x.len() - 1]);
                let (order, offsets) = (self.materialise(order), self.materialise(offsets));
                let count = |v: &Value| v.shape.iter().product::<usize>();
                let (row_count, width) = rows.rows_and_width();
                contiguous(k.expert_matmul(&ExpertMatmul {
                    x: &rows.view.handle,
                    rows: row_count,
                    k: width,
                    w: &x[1].view,
                    transpose_w: *transpose_w,
                    m: *shape.last().expect("rank checked by inference"),
                    bias: bias.then(|| &x[2].view),
                    order: &order.view.handle,
                    offsets: &offsets.view.handle,
                    assignments: count(&order),
                    experts: count(&offsets) - 1,
                    bf16_operands: self.bf16_matmuls,
                }))
            }
            Op::ExpertWeightGrad => {
                let (a, b) = (self.materialise(x[0]), self.materialise(x[1]));
                let (order, offsets) = (self.materialise(x[2]), self.materialise(x[3]));
                let ((a_rows, ka), (b_rows, mb)) = (a.rows_and_width(), b.rows_and_width());
                contiguous(k.expert_weight_grad(
                    (&a.view.handle, a_rows, ka),
                    (&b.view.handle, b_rows, mb),
                    &order.view.handle,
                    &offsets.view.handle,
                    order.shape.iter().product(),
                    shape[0],
                    self.bf16_matmuls,
                ))
            }
        }
    }
}

/// The nodes that hold a buffer of their own in a run: the leaves, and what each
/// step writes.
fn buffers<'a>(graph: &'a Graph, plan: &'a FusionPlan) -> impl Iterator<Item = NodeId> + 'a {
    let leaves = graph.inputs().chain(graph.parameters()).map(|(_, id)| id);
    let written = plan
        .schedule
        .iter()
        .flat_map(move |step| plan.step_outputs(graph, step));
    leaves.chain(written)
}

/// The concrete shape of node `id` once the inputs bound every symbol.
pub(super) fn shape_of(graph: &Graph, id: NodeId, symbols: &BTreeMap<String, usize>) -> Vec<usize> {
    concrete(&graph.node(id).ty.shape, symbols).expect("inputs bind every symbol")
}

pub(super) fn concrete(shape: &Shape, symbols: &BTreeMap<String, usize>) -> Option<Vec<usize>> {
    shape
        .dims()
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Some(*n),
            Dim::Sym(s) => symbols.get(s).copied(),
        })
        .collect()
}

impl<R: Runtime> DeviceBackend<R> {
    /// Refuses, before anything is allocated, a run whose buffers this device cannot
    /// hold: one past 32-bit indexing, one past the device's largest buffer, or (on a
    /// device computing in host memory) a planned peak past the machine's memory.
    /// Each graph is checked once per binding of its symbols.
    fn check_fits(
        &mut self,
        graph: &Graph,
        plan: &FusionPlan,
        symbols: &BTreeMap<String, usize>,
    ) -> Result<(), BackendError> {
        let key = (graph.fingerprint(), self.fuse, symbols.clone());
        if self.fitted.contains(&key) {
            return Ok(());
        }
        let limit = self.buffer_limit();
        // One pass: a buffer past 32-bit indexing is refused as such wherever it
        // stands; the first buffer past the device's largest is refused after.
        let mut too_big = None;
        for id in buffers(graph, plan) {
            let Some(shape) = concrete(&graph.node(id).ty.shape, symbols) else {
                continue;
            };
            // A buffer must be indexable in 32 bits, as the kernels index it; a product
            // summed inside its matmul, or a view, is no buffer and may be larger.
            let elements = shape.iter().map(|&d| d as u64).product::<u64>();
            if elements > u64::from(u32::MAX) {
                return Err(BackendError::TooLarge {
                    graph: graph.name.clone(),
                    node: id.index(),
                    origin: graph.node(id).origin.clone(),
                    elements,
                });
            }
            let bytes = elements * ELEMENT_BYTES as u64;
            if bytes > limit && too_big.is_none() {
                too_big = Some((id, shape, bytes));
            }
        }
        if let Some((id, shape, bytes)) = too_big {
            let node = graph.node(id);
            let batch_sized = node.ty.shape.dims().iter().any(|d| d.fixed().is_none());
            return Err(FitError::Buffer {
                advice: if batch_sized {
                    FitError::SMALLER_BATCH
                } else {
                    FitError::OTHER_DEVICE
                },
                what: format!(
                    "graph `{}`: node {} (`{}`, from {})",
                    graph.name,
                    id.index(),
                    node.op.mnemonic(),
                    node.origin
                ),
                shape,
                size: Bytes(bytes),
                limit: Bytes(limit),
                device: self.identity.clone(),
            }
            .into());
        }
        if let Some(memory) = self.host_memory {
            let peak = fusion::cost::plan_cost(graph, plan, symbols).peak_bytes;
            let resident = fusion::cost::leaf_bytes(graph, symbols);
            if peak + resident > memory {
                return Err(FitError::Memory {
                    graph: graph.name.clone(),
                    needed: Bytes(peak + resident),
                    peak: Bytes(peak),
                    resident: Bytes(resident),
                    memory: Bytes(memory),
                    device: self.identity.clone(),
                }
                .into());
            }
        }
        self.fitted.insert(key);
        Ok(())
    }

    /// Runs `graph` over `leaves` (see `Backend::run`).
    pub(super) fn execute(
        &mut self,
        graph: &Graph,
        leaves: Leaves,
        ctx: EvalContext,
    ) -> Result<BTreeMap<String, Tensor>, BackendError> {
        // A graph with a cycle cannot run (checked before anything is uploaded).
        graph
            .topo_order()
            .map_err(altc_compiler::reference::EvalError::from)?;
        let mut symbols = BTreeMap::new();
        for (name, id) in graph.inputs() {
            let shape = leaves
                .shape(name)
                .ok_or_else(|| BackendError::MissingInput {
                    graph: graph.name.clone(),
                    name: name.into(),
                })?;
            for (d, &n) in graph.node(id).ty.shape.dims().iter().zip(shape) {
                if let Dim::Sym(s) = d {
                    symbols.insert(s.clone(), n);
                }
            }
        }
        let limits = self.limits();
        let fuse = self.fuse;
        let plan = self
            .plans
            .entry((graph.fingerprint(), fuse))
            .or_insert_with(|| {
                std::sync::Arc::new(if fuse {
                    fusion::plan(graph, limits)
                } else {
                    FusionPlan::unfused(graph)
                })
            })
            .clone();
        self.check_fits(graph, &plan, &symbols)?;
        // Release each value after the last step that reads it.
        let step_at = plan.positions(graph);
        let mut last_use = vec![0usize; graph.len()];
        let mut reads: Vec<Vec<NodeId>> = vec![Vec::new(); plan.schedule.len()];
        let scheduled = plan.schedule.iter().flat_map(|step| plan.step_nodes(step));
        for id in scheduled {
            for o in graph.operands(id) {
                let at = step_at[id.index()];
                last_use[o.index()] = last_use[o.index()].max(at);
                reads[at].push(o);
            }
        }
        let kept: Vec<bool> = (0..graph.len())
            .map(|i| graph.outputs().iter().any(|(_, o)| o.index() == i))
            .collect();
        self.launches = 0;
        self.kernels.take_extra_launches();
        if let Some(profile) = &mut self.profile {
            profile.clear();
        }
        let in_use = |k: &Kernels<R>| k.client().memory_usage().ok().map(|u| u.bytes_in_use);
        let memory_start = self
            .profile
            .is_some()
            .then(|| in_use(&self.kernels))
            .flatten();
        self.memory_peak = memory_start.map(|_| 0);
        let mut values: Vec<Option<Value>> = vec![None; graph.len()];
        for (pos, step) in plan.schedule.iter().enumerate() {
            let kernel = plan.kernel(graph, step);
            if let (Some(observe), Some(kernel)) = (&mut self.step_observer, &kernel) {
                observe(&graph.name, Some(kernel));
            }
            let started = std::time::Instant::now();
            match *step {
                Step::Group(g) => {
                    let group = &plan.groups[g];
                    let shape =
                        concrete(group.shape(graph), &symbols).expect("inputs bind every symbol");
                    self.launches += 1;
                    let outputs = self.eval_group(graph, group, &values, shape, ctx);
                    for (id, value) in group.outputs.iter().zip(outputs) {
                        values[id.index()] = Some(value);
                    }
                }
                Step::MatmulGroup { .. } | Step::MatmulSum { .. } => {
                    self.launches += 1;
                    for (id, value) in self.eval_matmul(graph, &plan, *step, &values, &symbols, ctx)
                    {
                        values[id.index()] = Some(value);
                    }
                }
                Step::MultiMatmul(i) => {
                    let batch = &plan.multi_matmuls[i];
                    for (id, value) in
                        self.eval_multi_matmul(graph, &plan, batch, &values, &symbols, ctx)
                    {
                        values[id.index()] = Some(value);
                    }
                }
                Step::MultiReduce(i) => {
                    let batch = &plan.multi_reduces[i];
                    let mut sources = Vec::new();
                    for segment in &batch.segments {
                        let value = values[segment.source.index()]
                            .as_ref()
                            .expect("operands come first");
                        // The kernel reads each source contiguously from its offset
                        // (another batch's slice is read in place); anything else is
                        // copied out first.
                        let value = if value.view.strides
                            == altc_kernels::contiguous_strides(&value.shape)
                        {
                            value.clone()
                        } else {
                            self.launches += 1;
                            self.materialise(value)
                        };
                        sources.push((value.view, value.shape));
                    }
                    let first = batch.segments[0].reduce;
                    let Op::Reduce { axes, .. } = &graph.node(first).op else {
                        unreachable!("multi-tensor steps hold reductions")
                    };
                    let prologue: Vec<UnaryKind> =
                        batch.prologue.iter().map(|&u| unary_kind(u)).collect();
                    self.launches += 1;
                    let axes = (!batch.whole).then_some(axes.as_slice());
                    let handle =
                        self.kernels
                            .multi_reduce(&prologue, &sources, axes, reduce_kind(batch.op));
                    // Each result is a contiguous slice of the batch's output.
                    let total = batch.segments.len();
                    for (at, segment) in batch.segments.iter().enumerate() {
                        let shape = shape_of(graph, segment.reduce, &symbols);
                        let per_segment: usize = shape.iter().product();
                        values[segment.reduce.index()] = Some(Value {
                            view: View {
                                handle: handle.clone(),
                                len: per_segment * total,
                                offset: at * per_segment,
                                strides: altc_kernels::contiguous_strides(&shape),
                            },
                            shape,
                        });
                    }
                }
                Step::ReduceGroup(i) => {
                    let fused = &plan.reduce_epilogues[i];
                    let group = &plan.groups[fused.group];
                    let shape =
                        concrete(group.shape(graph), &symbols).expect("inputs bind every symbol");
                    let Op::Reduce { op, .. } = &graph.node(fused.reduce).op else {
                        unreachable!("the planner gives epilogues only to reductions")
                    };
                    let x = values[graph.operands(fused.reduce)[0].index()]
                        .as_ref()
                        .expect("operands come first");
                    self.launches += 1;
                    let (program, views) =
                        self.group_program(graph, group, &values, &shape, Some(fused.read_as()));
                    let top_k = fused
                        .top_k
                        .as_ref()
                        .map_or(RowTopK::default(), |t| RowTopK {
                            output: group
                                .outputs
                                .iter()
                                .position(|&o| o == t.values)
                                .expect("the top-k reads a group output"),
                            k: *shape_of(graph, t.top, &symbols)
                                .last()
                                .expect("top-k keeps the rank"),
                        });
                    let mut outputs = self
                        .kernels
                        .reduce_epilogue(
                            reduce_kind(*op),
                            &x.view,
                            &program,
                            &views,
                            &shape,
                            fused.write_reduced,
                            top_k,
                            ctx.seed,
                            ctx.step,
                        )
                        .into_iter();
                    for (o, id) in group.outputs.iter().enumerate() {
                        let handle = outputs.next().expect("one buffer per output");
                        let shape = Self::output_shape(&program, o, &shape);
                        values[id.index()] = Some(Value::contiguous(handle, shape));
                    }
                    if fused.write_reduced {
                        let reduced = outputs.next().expect("the reduced values follow");
                        let shape = shape_of(graph, fused.reduce, &symbols);
                        values[fused.reduce.index()] = Some(Value::contiguous(reduced, shape));
                    }
                    if let Some(t) = &fused.top_k {
                        let chosen = shape_of(graph, t.top, &symbols);
                        let (indices, kept) = (outputs.next(), outputs.next());
                        let indices = indices.expect("the top-k indices follow the outputs");
                        values[t.top.index()] = Some(Value::contiguous(indices, chosen.clone()));
                        if let Some(gather) = t.gather {
                            let kept = kept.expect("the chosen values follow the indices");
                            values[gather.index()] = Some(Value::contiguous(kept, chosen));
                        }
                    }
                }
                Step::MultiGroup(i) => {
                    let batch = &plan.multi_groups[i];
                    for (id, value) in
                        self.eval_multi_group(graph, &plan, batch, &values, &symbols, ctx)
                    {
                        values[id.index()] = Some(value);
                    }
                }
                Step::GroupReduce { group, reduce } => {
                    let group = &plan.groups[group];
                    let shape =
                        concrete(group.shape(graph), &symbols).expect("inputs bind every symbol");
                    let Op::Reduce { op, axes, .. } = &graph.node(reduce).op else {
                        unreachable!("the planner folds prologues only into reductions")
                    };
                    let out_shape = shape_of(graph, reduce, &symbols);
                    self.launches += 1;
                    let (program, views) = self.group_program(graph, group, &values, &shape, None);
                    let handle = self.kernels.fused_reduce(
                        &program,
                        &views,
                        &shape,
                        reduce_kind(*op),
                        axes,
                        ctx.seed,
                        ctx.step,
                    );
                    values[reduce.index()] = Some(Value::contiguous(handle, out_shape));
                }
                Step::Node(id) => {
                    let node = graph.node(id);
                    let value = match (&node.op, leaves) {
                        (Op::Input { name, .. }, Leaves::Host(inputs)) => {
                            self.upload(&inputs[name])
                        }
                        (Op::Input { name, .. }, Leaves::Shapes(shapes)) => {
                            self.uninitialised(shapes[name].clone())
                        }
                        (Op::Parameter { name, .. }, _) if self.state.contains_key(name) => {
                            self.state[name].clone()
                        }
                        (Op::Parameter { .. }, Leaves::Shapes(_)) => self.uninitialised(
                            concrete(&node.ty.shape, &symbols).expect("inputs bind every symbol"),
                        ),
                        (Op::Parameter { name, .. }, Leaves::Host(_)) => {
                            return Err(BackendError::MissingState {
                                graph: graph.name.clone(),
                                name: name.clone(),
                            });
                        }
                        _ => {
                            let operands: Vec<&Value> = graph
                                .operands(id)
                                .iter()
                                .map(|o| values[o.index()].as_ref().expect("operands come first"))
                                .collect();
                            let shape = concrete(&node.ty.shape, &symbols)
                                .expect("inputs bind every symbol");
                            if node.op.launches_kernel() {
                                self.launches += 1;
                            }
                            self.eval(graph, id, &operands, shape, ctx)
                        }
                    };
                    values[id.index()] = Some(value);
                }
            }
            if self.step_observer.is_some() {
                self.kernels.sync();
            }
            if let (Some(profile), Some(kernel)) = (&mut self.profile, kernel) {
                self.kernels.sync();
                profile.push(KernelTiming {
                    family: kernel.family,
                    label: kernel.label,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            // After the step's kernel and before its frees, as the plan counts.
            if let (Some(start), Some(peak)) = (memory_start, &mut self.memory_peak) {
                if let Some(now) = in_use(&self.kernels) {
                    *peak = (*peak).max(now.saturating_sub(start));
                }
            }
            for &o in &reads[pos] {
                if last_use[o.index()] == pos && !kept[o.index()] {
                    values[o.index()] = None;
                }
            }
        }
        // Candidates that split a step into several kernels say how many more.
        self.launches += self.kernels.take_extra_launches();
        if let Some(observe) = &mut self.step_observer {
            observe(&graph.name, None);
        }
        let mut host = BTreeMap::new();
        let mut updates = Vec::new();
        for (name, id) in graph.outputs() {
            let value = values[id.index()].clone().expect("outputs are kept");
            match Output::parse(name) {
                Output::Updated(target) => {
                    updates.push((target.to_string(), self.materialise(&value)))
                }
                Output::Gradient(_) => {}
                _ => {
                    host.insert(
                        name.clone(),
                        self.download(&value, graph.node(*id).ty.dtype),
                    );
                }
            }
        }
        self.staged = updates;
        Ok(host)
    }
}
