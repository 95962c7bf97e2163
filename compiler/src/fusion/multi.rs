//! Multi-tensor kernels: reductions of one kind, and groups computing one program
//! on different tensors (each parameter's AdamW update), merged into one launch.

use super::plan::ReductionKind;
use super::plan::{FusionGroup, FusionPlan, MultiGroup, MultiReduce, ReduceSegment, Step};
use crate::ir::{Graph, NodeId, Op};

impl FusionPlan {
    /// Gathers reductions of the same kind into `MultiReduce` steps of at most
    /// `max_inputs` tensors. A batch runs where its
    /// last member ran: every member's input exists by then, and each member joins only
    /// while that position is before the first reader of any member's result.
    pub(super) fn fold_multi_reduces(
        &mut self,
        graph: &Graph,
        users: &[Vec<NodeId>],
        max_inputs: usize,
    ) {
        let position = self.positions(graph);
        struct Batch {
            kind: ReductionKind,
            members: Vec<(usize, ReduceSegment)>,
            first_use: usize,
        }
        let mut open: Vec<Batch> = Vec::new();
        let mut batches: Vec<Batch> = Vec::new();
        for (pos, step) in self.schedule.iter().enumerate() {
            let Some((kind, segment)) = batchable_reduction(graph, &self.groups, step) else {
                continue;
            };
            let first_use = users[segment.reduce.index()]
                .iter()
                .map(|u| position[u.index()])
                .min()
                .unwrap_or(usize::MAX);
            let same = open.iter().position(|b| b.kind == kind);
            if let Some(i) = same {
                let batch = &mut open[i];
                if batch.members.len() < max_inputs && pos < batch.first_use {
                    batch.members.push((pos, segment));
                    batch.first_use = batch.first_use.min(first_use);
                    continue;
                }
                batches.push(open.swap_remove(i));
            }
            open.push(Batch {
                kind,
                members: vec![(pos, segment)],
                first_use,
            });
        }
        batches.extend(open);
        let first = self.multi_reduces.len();
        let batches = self.merge_steps(
            batches,
            |b| b.members.iter().map(|&(pos, _)| pos).collect(),
            |i| Step::MultiReduce(first + i),
        );
        self.multi_reduces
            .extend(batches.into_iter().map(|batch| MultiReduce {
                op: batch.kind.op,
                prologue: batch.kind.prologue,
                whole: batch.kind.layout.is_none(),
                segments: batch.members.into_iter().map(|(_, s)| s).collect(),
            }));
    }

    /// Replaces each batch of more than one step (`positions` of its members) by one
    /// step at the last position listed, `step(i)` for the `i`th batch kept, and
    /// drops the others; returns the batches kept.
    pub(super) fn merge_steps<B>(
        &mut self,
        batches: Vec<B>,
        positions: impl Fn(&B) -> Vec<usize>,
        step: impl Fn(usize) -> Step,
    ) -> Vec<B> {
        let kept: Vec<B> = batches
            .into_iter()
            .filter(|b| positions(b).len() > 1)
            .collect();
        let mut removed = vec![false; self.schedule.len()];
        for (i, batch) in kept.iter().enumerate() {
            let members = positions(batch);
            let last = *members.last().expect("a batch has members");
            for &pos in &members {
                removed[pos] = pos != last;
            }
            self.schedule[last] = step(i);
        }
        let mut pos = 0;
        self.schedule.retain(|_| {
            pos += 1;
            !removed[pos - 1]
        });
        kept
    }
}

/// The values from outside a group that its program loads, in load order: each
/// member's operands in turn, first occurrence only; constants are inlined, not loaded.
pub fn group_inputs(graph: &Graph, group: &FusionGroup) -> Vec<NodeId> {
    let mut inputs = Vec::new();
    for &m in &group.nodes {
        for o in graph.operands(m) {
            let loaded = !group.nodes.contains(&o)
                && !matches!(graph.node(o).op, Op::Constant { .. })
                && !inputs.contains(&o);
            if loaded {
                inputs.push(o);
            }
        }
    }
    inputs
}

/// A group's program as text, so that equal signatures mean equal fused programs: the
/// same ops on the same registers, constants and loads in the same order, the same
/// outputs. `None` for a group a multi-tensor kernel cannot run, which reads every
/// tensor flat: one with dropout or an iota (both depend on the position in the
/// group's own shape), with a member or an input that is neither of the group's shape nor
/// one value, or with an input that is a transposed or broadcast view.
pub(super) fn group_signature(graph: &Graph, group: &FusionGroup) -> Option<String> {
    program_signature(graph, group, None, true)
}

/// `group_signature`, for a program that reads `accumulator` (a matmul's product) from
/// registers; with `flat` false the program runs in its own shape (each input through
/// its own view), so anything it can run is accepted.
pub(super) fn program_signature(
    graph: &Graph,
    group: &FusionGroup,
    accumulator: Option<NodeId>,
    flat: bool,
) -> Option<String> {
    use std::fmt::Write;
    let shape = group.shape(graph);
    let mut registers: Vec<NodeId> = Vec::new();
    let mut signature = String::new();
    for &m in &group.nodes {
        let node = graph.node(m);
        let flat_member = &node.ty.shape == shape || node.ty.shape.rank() == 0;
        let positional = matches!(node.op, Op::Dropout { .. } | Op::Iota { .. });
        if flat && (positional || !flat_member) {
            return None;
        }
        let mut operands = Vec::new();
        for o in graph.operands(m) {
            if let Some(r) = registers.iter().position(|&x| x == o) {
                operands.push(r);
                continue;
            }
            let source = graph.node(o);
            match &source.op {
                _ if Some(o) == accumulator => signature.push_str("accumulator;"),
                Op::Constant { value, .. } => write!(signature, "const {};", value.0).ok()?,
                _ if !flat => write!(signature, "load {};", source.ty).ok()?,
                Op::Transpose { .. } | Op::BroadcastTo { .. } => return None,
                _ if &source.ty.shape == shape || source.ty.shape.rank() == 0 => {
                    signature.push_str("load;")
                }
                _ => return None,
            }
            registers.push(o);
            operands.push(registers.len() - 1);
        }
        // Flat programs batch tensors of any size, so only scalar-or-not counts there.
        if flat {
            let scalar = node.ty.shape.rank() == 0;
            write!(signature, "{:?} {operands:?} {scalar};", node.op).ok()?;
        } else {
            write!(signature, "{:?} {operands:?} {};", node.op, node.ty).ok()?;
        }
        registers.push(m);
    }
    for o in &group.outputs {
        let r = registers.iter().position(|x| x == o)?;
        write!(signature, "out {r};").ok()?;
    }
    Some(signature)
}

/// The input positions at which every group of a batch reads the same value.
pub(super) fn shared_positions(inputs: &[Vec<NodeId>]) -> Vec<usize> {
    (0..inputs[0].len())
        .filter(|&p| inputs.iter().all(|i| i[p] == inputs[0][p]))
        .collect()
}

/// Buffers a multi-tensor kernel over groups reading `inputs` binds: shared inputs
/// once, the others and each group's `outputs` per group, and the metadata.
pub(super) fn multi_group_bindings(inputs: &[Vec<NodeId>], outputs: usize) -> usize {
    let shared = shared_positions(inputs).len();
    1 + shared + inputs.len() * (inputs[0].len() - shared + outputs)
}

impl FusionPlan {
    /// Gathers groups with equal programs into `MultiGroup` steps, as
    /// `fold_multi_reduces` does reductions: a batch runs where its last member ran,
    /// and a group joins only before the first reader of any member's outputs and
    /// while the kernel's buffers fit `max_bindings`.
    pub(super) fn fold_multi_groups(
        &mut self,
        graph: &Graph,
        users: &[Vec<NodeId>],
        max_bindings: usize,
    ) {
        let position = self.positions(graph);
        struct Batch {
            signature: String,
            members: Vec<(usize, usize)>,
            inputs: Vec<Vec<NodeId>>,
            first_use: usize,
        }
        let mut open: Vec<Batch> = Vec::new();
        let mut batches: Vec<Batch> = Vec::new();
        for (pos, step) in self.schedule.iter().enumerate() {
            let Step::Group(g) = *step else { continue };
            let group = &self.groups[g];
            let Some(signature) = group_signature(graph, group) else {
                continue;
            };
            let inputs = group_inputs(graph, group);
            let first_use = group
                .outputs
                .iter()
                .flat_map(|o| &users[o.index()])
                .filter(|u| self.member_of[u.index()] != Some(g))
                .map(|u| position[u.index()])
                .min()
                .unwrap_or(usize::MAX);
            if let Some(i) = open.iter().position(|b| b.signature == signature) {
                let batch = &mut open[i];
                let mut joined = batch.inputs.clone();
                joined.push(inputs.clone());
                let fits = multi_group_bindings(&joined, group.outputs.len()) <= max_bindings;
                if fits && pos < batch.first_use {
                    batch.members.push((pos, g));
                    batch.inputs = joined;
                    batch.first_use = batch.first_use.min(first_use);
                    continue;
                }
                batches.push(open.swap_remove(i));
            }
            open.push(Batch {
                signature,
                members: vec![(pos, g)],
                inputs: vec![inputs],
                first_use,
            });
        }
        batches.extend(open);
        let first = self.multi_groups.len();
        let batches = self.merge_steps(
            batches,
            |b| b.members.iter().map(|&(pos, _)| pos).collect(),
            |i| Step::MultiGroup(first + i),
        );
        self.multi_groups
            .extend(batches.into_iter().map(|batch| MultiGroup {
                groups: batch.members.iter().map(|&(_, g)| g).collect(),
                shared: shared_positions(&batch.inputs),
                inputs: batch.inputs,
            }));
    }
}

/// A reduction as a multi-tensor segment, with what it must share with the others
/// of its batch; `None` if it cannot be one (its prologue is not a chain of unary ops
/// from one value).
fn batchable_reduction(
    graph: &Graph,
    groups: &[FusionGroup],
    step: &Step,
) -> Option<(ReductionKind, ReduceSegment)> {
    let (reduce, prologue_group) = match *step {
        Step::Node(r) => (r, None),
        Step::GroupReduce { group, reduce } => (reduce, Some(group)),
        _ => return None,
    };
    let Op::Reduce {
        op,
        axes,
        keep_dims,
    } = &graph.node(reduce).op
    else {
        return None;
    };
    let operand = graph.operands(reduce)[0];
    let mut axes = axes.clone();
    axes.sort_unstable();
    let mut prologue = Vec::new();
    let mut source = operand;
    if let Some(g) = prologue_group {
        for (i, &m) in groups[g].nodes.iter().enumerate() {
            let Op::Unary(u) = graph.node(m).op else {
                return None;
            };
            let from = graph.operands(m)[0];
            match i {
                0 => source = from,
                _ if from != groups[g].nodes[i - 1] => return None,
                _ => {}
            }
            prologue.push(u);
        }
    }
    // The kernel reads its tensors contiguously: a layout view or a constant (one
    // value broadcast) would need a copy first.
    if matches!(
        graph.node(source).op,
        Op::Transpose { .. }
            | Op::BroadcastTo { .. }
            | Op::Slice { .. }
            | Op::Reshape { .. }
            | Op::Constant { .. }
    ) {
        return None;
    }
    let shape = &graph.node(operand).ty.shape;
    let whole = axes.len() == shape.rank();
    let kind = ReductionKind {
        op: *op,
        prologue,
        layout: (!whole).then(|| (shape.clone(), axes, *keep_dims)),
    };
    let segment = ReduceSegment {
        reduce,
        prologue_group,
        source,
    };
    Some((kind, segment))
}
