//! Folds of a group into the kernel beside it: into the reduction or matmul it
//! feeds (a prologue), after a reduction or matmul (an epilogue, softmax's and a
//! router's top-k among them), and a weight gradient's batch sum into its matmul.

use super::multi::group_inputs;
use super::plan::{EpilogueTopK, FusionGroup, FusionPlan, ReduceEpilogue, Step};
use crate::ir::{Graph, NodeId, Op, ReduceOp, Shape};
use std::collections::BTreeSet;

/// What the folds of a fresh plan read: the graph, its groups with each node's group,
/// each node's readers and the nodes the graph outputs.
#[derive(Clone, Copy)]
pub(super) struct FoldSite<'a> {
    pub graph: &'a Graph,
    pub groups: &'a [FusionGroup],
    pub member_of: &'a [Option<usize>],
    pub users: &'a [Vec<NodeId>],
    pub graph_outputs: &'a BTreeSet<usize>,
}

/// Turns a group that only feeds one reduction into that reduction's prologue: the
/// group's step disappears and the reduction's step evaluates it. The reduction
/// already comes after the group, and nothing else reads the group's output.
pub(super) fn fold_prologues(at: &FoldSite, schedule: &mut Vec<Step>) {
    let mut absorbed = vec![false; at.groups.len()];
    for step in schedule.iter_mut() {
        let Step::Node(r) = *step else { continue };
        if !matches!(at.graph.node(r).op, Op::Reduce { .. }) {
            continue;
        }
        let operand = at.graph.operands(r)[0];
        let Some(g) = at.member_of[operand.index()] else {
            continue;
        };
        // The kernel reduces over the group's shape.
        let only_output = at.groups[g].outputs == [operand]
            && &at.graph.node(operand).ty.shape == at.groups[g].shape(at.graph);
        let only_reader =
            at.users[operand.index()] == [r] && !at.graph_outputs.contains(&operand.index());
        if only_output && only_reader && !absorbed[g] {
            absorbed[g] = true;
            *step = Step::GroupReduce {
                group: g,
                reduce: r,
            };
        }
    }
    schedule.retain(|s| !matches!(s, Step::Group(g) if absorbed[*g]));
}

/// Turns a group into the epilogue of a matmul whose product (of the group's shape)
/// only that group reads: the matmul's own step disappears and the group's step
/// computes the product first. The matmul's operands come before the group already.
pub(super) fn fold_epilogues(at: &FoldSite, schedule: &mut Vec<Step>) {
    let mut folded = Vec::new();
    for step in schedule.iter_mut() {
        let Step::Group(g) = *step else { continue };
        // The matmul kernel writes every output at the product's shape.
        if at.groups[g].carries_scalars(at.graph) || at.groups[g].carries_rows(at.graph) {
            continue;
        }
        let shape = at.groups[g].shape(at.graph);
        let candidate = at.groups[g]
            .nodes
            .iter()
            .flat_map(|&m| at.graph.operands(m))
            .find(|&o| {
                matches!(at.graph.node(o).op, Op::MatMul { .. })
                    && &at.graph.node(o).ty.shape == shape
                    && !at.graph_outputs.contains(&o.index())
                    && at.users[o.index()]
                        .iter()
                        .all(|u| at.member_of[u.index()] == Some(g))
            });
        if let Some(matmul) = candidate {
            folded.push(matmul);
            *step = Step::MatmulGroup { matmul, group: g };
        }
    }
    schedule.retain(|s| !matches!(s, Step::Node(id) if folded.contains(id)));
}

/// Turns each batched matmul read only by a sum over all its batch dimensions into
/// one `MatmulSum` step at the sum's place (its operands are ready by then, as they
/// were for the matmul).
pub(super) fn fold_batch_sums(at: &FoldSite, schedule: &mut Vec<Step>) {
    let mut folded = Vec::new();
    for step in schedule.iter_mut() {
        let Step::Node(reduce) = *step else { continue };
        let Op::Reduce {
            op: ReduceOp::Sum,
            axes,
            keep_dims: false,
        } = &at.graph.node(reduce).op
        else {
            continue;
        };
        let matmul = at.graph.operands(reduce)[0];
        let batch_rank = at.graph.node(matmul).ty.shape.rank().saturating_sub(2);
        let mut sorted = axes.clone();
        sorted.sort_unstable();
        if matches!(at.graph.node(matmul).op, Op::MatMul { .. })
            && batch_rank > 0
            && sorted == (0..batch_rank).collect::<Vec<_>>()
            && !at.graph_outputs.contains(&matmul.index())
            && at.users[matmul.index()] == [reduce]
        {
            folded.push(matmul);
            *step = Step::MatmulSum { matmul, reduce };
        }
    }
    schedule.retain(|s| !matches!(s, Step::Node(id) if folded.contains(id)));
}

impl FusionPlan {
    /// Turns each plain reduction over the last axis whose result only one group of
    /// the operand's shape reads (through at most the views that restore and
    /// broadcast the reduced axes) into a `ReduceGroup` step at the group's place:
    /// the operand exists by then, and nothing else waits on the reduction.
    pub(super) fn fold_reduce_epilogues(
        &mut self,
        graph: &Graph,
        users: &[Vec<NodeId>],
        graph_outputs: &BTreeSet<usize>,
        max_bindings: usize,
    ) {
        let position = self.positions(graph);
        let mut folded = Vec::new();
        for step in &self.schedule {
            let Step::Node(reduce) = *step else { continue };
            let Op::Reduce { axes, .. } = &graph.node(reduce).op else {
                continue;
            };
            let operand = &graph.node(graph.operands(reduce)[0]).ty.shape;
            let rank = operand.rank();
            // Rows along the last axis: a whole-tensor reduction would be one row,
            // one cube's work.
            if rank < 2 || axes != &[rank - 1] {
                continue;
            }
            // The reduction's shape with its reduced axes kept as 1s.
            let row_shape = Shape(
                operand
                    .dims()
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        if axes.contains(&i) {
                            crate::ir::Dim::Fixed(1)
                        } else {
                            d.clone()
                        }
                    })
                    .collect(),
            );
            let sole_user = |id: NodeId| -> Option<NodeId> {
                match users[id.index()].as_slice() {
                    [u] if !graph_outputs.contains(&id.index()) => Some(*u),
                    _ => None,
                }
            };
            let mut via = Vec::new();
            let mut read_as = reduce;
            let mut reader = sole_user(reduce);
            while let Some(u) = reader {
                // Views that keep each row's value: a reshape or stop-gradient to the
                // kept shape, and a broadcast of that shape over the rows.
                let from = &graph.node(read_as).ty.shape;
                let view = match &graph.node(u).op {
                    Op::Reshape { .. } | Op::StopGradient => graph.node(u).ty.shape == row_shape,
                    Op::BroadcastTo { .. } => {
                        from == &row_shape && &graph.node(u).ty.shape == operand
                    }
                    _ => false,
                };
                if !view || via.len() == 2 {
                    break;
                }
                via.push(u);
                read_as = u;
                reader = sole_user(u);
            }
            let readable = [&row_shape, operand].contains(&&graph.node(read_as).ty.shape);
            // The epilogue: the first group of the operand's shape that reads the
            // reduction and is not yet another reduction's epilogue.
            let Some(g) = users[read_as.index()]
                .iter()
                .filter_map(|u| {
                    let g = self.member_of[u.index()]?;
                    let fits = self.schedule.contains(&Step::Group(g))
                        && !folded.iter().any(|f: &ReduceEpilogue| f.group == g)
                        && self.groups[g].shape(graph) == operand
                        && !self.groups[g].carries_scalars(graph);
                    fits.then_some(g)
                })
                .min_by_key(|&g| position[self.groups[g].nodes[0].index()])
            else {
                continue;
            };
            // Other readers of the reduction itself are served by writing it too;
            // readers of a view of it would need the view built, so none may exist.
            let outside = |id: NodeId| {
                graph_outputs.contains(&id.index())
                    || users[id.index()]
                        .iter()
                        .any(|u| self.member_of[u.index()] != Some(g))
            };
            let write_reduced = via.is_empty() && outside(reduce);
            let served = via.is_empty() || !outside(read_as);
            // The reduction now runs at the group's place: whoever else reads it must
            // come later.
            let at = position[self.groups[g].nodes[0].index()];
            let in_time = users[reduce.index()]
                .iter()
                .filter(|u| !via.contains(u) && self.member_of[u.index()] != Some(g))
                .all(|u| position[u.index()] > at);
            // The kernel binds the reduced operand, the group's inputs and outputs,
            // the reduced values if written, a top-k's two results and its metadata.
            let group = &self.groups[g];
            let bindings = 2
                + group_inputs(graph, group).len()
                + group.outputs.len()
                + usize::from(write_reduced);
            if readable && served && in_time && bindings <= max_bindings {
                let top_k = self
                    .row_top_k(graph, users, g)
                    .filter(|_| bindings + 2 <= max_bindings);
                folded.push(ReduceEpilogue {
                    reduce,
                    via,
                    group: g,
                    write_reduced,
                    top_k,
                });
            }
        }
        for fused in folded {
            let at = self
                .schedule
                .iter()
                .position(|s| *s == Step::Group(fused.group))
                .expect("the group runs alone");
            self.schedule[at] = Step::ReduceGroup(self.reduce_epilogues.len());
            let absorbed: Vec<NodeId> = fused
                .top_k
                .iter()
                .flat_map(|t| [Some(t.top), t.gather])
                .flatten()
                .chain([fused.reduce])
                .chain(fused.via.iter().copied())
                .collect();
            self.schedule
                .retain(|s| !matches!(s, Step::Node(id) if absorbed.contains(id)));
            self.reduce_epilogues.push(fused);
        }
    }

    /// A top-k over the rows of an output of group `g` (of the group's shape) that the
    /// group's kernel can take as it writes them, and the gather of the chosen values
    /// if the graph takes one. Both read only what the kernel computes, so they move
    /// to its step.
    pub(super) fn row_top_k(
        &self,
        graph: &Graph,
        users: &[Vec<NodeId>],
        g: usize,
    ) -> Option<EpilogueTopK> {
        // Each unit keeps its row's best k in registers.
        const MOST: usize = 16;
        let group = &self.groups[g];
        let shape = group.shape(graph);
        let last = shape.rank().checked_sub(1)?;
        group.outputs.iter().find_map(|&values| {
            if &graph.node(values).ty.shape != shape {
                return None;
            }
            let top = users[values.index()]
                .iter()
                .copied()
                .find(|&u| matches!(graph.node(u).op, Op::TopK { k } if k <= MOST))?;
            let gather = users[values.index()].iter().copied().find(|&u| {
                matches!(graph.node(u).op, Op::Gather { axis } if axis == last)
                    && graph.operands(u) == [values, top]
            });
            Some(EpilogueTopK {
                values,
                top,
                gather,
            })
        })
    }
}
