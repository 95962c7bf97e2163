//! Grouping: elementwise nodes of one shape join their readers' groups while no
//! cycle between groups forms and a kernel's inputs stay within its limit; then the
//! later passes run in order.

use super::folds::{fold_batch_sums, fold_epilogues, fold_prologues, FoldSite};
use super::plan::{is_row_of, one_shape, scalars_stay_apart};
use super::plan::{FusionGroup, FusionPlan, KernelLimits};
use super::schedule::schedule;
use crate::ir::{live_nodes, Graph, NodeId, Op};
use petgraph::Direction;
use std::collections::BTreeSet;

/// Plans the fusion groups of `graph` for a device with `limits`: no group reads more
/// than `limits.max_inputs` distinct values from outside, and no multi-tensor kernel
/// binds more than `limits.max_bindings` buffers.
pub fn plan(graph: &Graph, limits: KernelLimits) -> FusionPlan {
    let max_inputs = limits.max_inputs;
    let n = graph.len();
    let live = live_nodes(graph);
    let order: Vec<NodeId> = graph
        .creation_order()
        .unwrap_or_default()
        .into_iter()
        .filter(|id| live[id.index()])
        .collect();
    let mut position = vec![0usize; n];
    for (pos, id) in order.iter().enumerate() {
        position[id.index()] = pos;
    }
    let users: Vec<Vec<NodeId>> = (0..n)
        .map(|i| {
            graph
                .dag()
                .neighbors_directed(NodeId::new(i), Direction::Outgoing)
                .filter(|u| live[u.index()])
                .collect()
        })
        .collect();
    let is_constant = |o: NodeId| matches!(graph.node(o).op, Op::Constant { .. });

    // Groups are identified by a representative; members and external inputs live there.
    let mut group: Vec<Option<usize>> = vec![None; n];
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut inputs: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    for &id in &order {
        let node = graph.node(id);
        if !node.op.is_elementwise() {
            continue;
        }
        let me = id.index();
        group[me] = Some(me);
        members[me] = vec![me];
        inputs[me] = graph
            .operands(id)
            .iter()
            .filter(|&&o| !is_constant(o))
            .map(|o| o.index())
            .collect();
        for o in graph.operands(id) {
            let Some(p) = group[o.index()] else { continue };
            let g = group[me].expect("just grouped");
            // A group of scalars, or of values one per row of the consumer's shape
            // (a norm's statistics), joins the consumer: each element recomputes
            // them, which costs registers, not a launch. Not dropout or an iota, whose
            // values depend on the element's position in their own shape. Scalars
            // stay their own kernel for a consumer too large to recompute them.
            let small_consumer = !scalars_stay_apart(&node.ty.shape);
            let rides_along = members[p].iter().all(|&m| {
                let member = graph.node(NodeId::new(m));
                let shape = &member.ty.shape;
                ((shape.rank() == 0 && small_consumer) || is_row_of(shape, &node.ty.shape))
                    && !matches!(member.op, Op::Dropout { .. } | Op::Iota { .. })
            });
            if p == g || (graph.node(o).ty.shape != node.ty.shape && !rides_along) {
                continue;
            }
            let merged_members: BTreeSet<usize> =
                members[p].iter().chain(&members[g]).copied().collect();
            if !one_shape(graph, &merged_members) {
                continue;
            }
            let merged_inputs: BTreeSet<usize> = inputs[p]
                .union(&inputs[g])
                .filter(|i| !merged_members.contains(i))
                .copied()
                .collect();
            let cycle = creates_cycle(
                &members[p],
                &merged_members,
                position[id.index()],
                &users,
                &position,
                &group,
                &members,
            );
            if merged_inputs.len() > max_inputs || cycle {
                continue;
            }
            // Fold group `p` into `g`.
            let moved = std::mem::take(&mut members[p]);
            for &m in &moved {
                group[m] = Some(g);
            }
            members[g].extend(moved);
            inputs[g] = merged_inputs;
            inputs[p].clear();
        }
    }

    let outputs_of_graph: BTreeSet<usize> =
        graph.outputs().iter().map(|(_, o)| o.index()).collect();
    sink_into_readers(
        graph,
        &order,
        &users,
        &outputs_of_graph,
        max_inputs,
        Grouping {
            group: &mut group,
            members: &mut members,
            inputs: &mut inputs,
        },
    );
    let mut groups = Vec::new();
    let mut member_of = vec![None; n];
    let mut index_of_rep = vec![None; n];
    for &id in &order {
        let Some(rep) = group[id.index()] else {
            continue;
        };
        let gi = *index_of_rep[rep].get_or_insert_with(|| {
            groups.push(FusionGroup {
                nodes: Vec::new(),
                outputs: Vec::new(),
            });
            groups.len() - 1
        });
        groups[gi].nodes.push(id);
        member_of[id.index()] = Some(gi);
    }
    for g in &mut groups {
        let inside: BTreeSet<usize> = g.nodes.iter().map(|m| m.index()).collect();
        g.outputs = g
            .nodes
            .iter()
            .copied()
            .filter(|m| {
                outputs_of_graph.contains(&m.index())
                    || users[m.index()]
                        .iter()
                        .any(|u| !inside.contains(&u.index()))
            })
            .collect();
    }
    let mut schedule = schedule(graph, &order, &groups, &member_of);
    if schedule.len()
        != order.len() - groups.iter().map(|g| g.nodes.len()).sum::<usize>() + groups.len()
    {
        // Grouping is built to be acyclic; should it ever not be, run unfused rather
        // than drop work.
        return FusionPlan::unfused(graph);
    }
    let site = FoldSite {
        graph,
        groups: &groups,
        member_of: &member_of,
        users: &users,
        graph_outputs: &outputs_of_graph,
    };
    fold_prologues(&site, &mut schedule);
    fold_epilogues(&site, &mut schedule);
    fold_batch_sums(&site, &mut schedule);
    let mut plan = FusionPlan {
        groups,
        schedule,
        multi_reduces: Vec::new(),
        multi_groups: Vec::new(),
        reduce_epilogues: Vec::new(),
        multi_matmuls: Vec::new(),
        member_of,
    };
    plan.fold_reduce_epilogues(graph, &users, &outputs_of_graph, limits.max_bindings);
    plan.fold_multi_reduces(graph, &users, max_inputs);
    plan.fold_multi_groups(graph, &users, limits.max_bindings);
    plan.fold_multi_matmuls(graph, &users, limits.max_bindings);
    plan
}

/// The planner's groups while they form, indexed by a representative node: each
/// node's group, each group's members and the values it reads from outside.
pub(super) struct Grouping<'a> {
    group: &'a mut [Option<usize>],
    members: &'a mut [Vec<usize>],
    inputs: &'a mut [BTreeSet<usize>],
}

/// Moves work that a group computes only for a later group into that later group.
///
/// Merging producers into consumers can pull a backward-pass value into the forward
/// group whose values it reads (autodiff's `2 * centred` for a norm's variance): it
/// is then written in the forward pass and held until backward reads it. When such
/// a member, with the members that only it needs, reads nothing of its group that is
/// not written anyway, the group that reads it computes it instead: nothing more is
/// written, and the value is never held.
pub(super) fn sink_into_readers(
    graph: &Graph,
    order: &[NodeId],
    users: &[Vec<NodeId>],
    graph_outputs: &BTreeSet<usize>,
    max_inputs: usize,
    grouping: Grouping,
) {
    let Grouping {
        group,
        members,
        inputs,
    } = grouping;
    let is_constant = |o: NodeId| matches!(graph.node(o).op, Op::Constant { .. });
    for &m in order.iter().rev() {
        let (Some(a), false) = (group[m.index()], graph_outputs.contains(&m.index())) else {
            continue;
        };
        // The one other group that reads `m`, at `m`'s own shape.
        let readers: BTreeSet<Option<usize>> =
            users[m.index()].iter().map(|u| group[u.index()]).collect();
        let [Some(b)] = readers.into_iter().collect::<Vec<_>>()[..] else {
            continue;
        };
        let same_shape = users[m.index()]
            .iter()
            .all(|u| graph.node(*u).ty.shape == graph.node(m).ty.shape);
        if b == a || !same_shape || matches!(graph.node(m).op, Op::Dropout { .. }) {
            continue;
        }
        // `m` and the members of `a` that only it (transitively) needs.
        let mut moving = vec![m];
        let mut at = 0;
        let mut feasible = true;
        while at < moving.len() && feasible {
            for o in graph.operands(moving[at]) {
                if group[o.index()] != Some(a) || moving.contains(&o) {
                    continue;
                }
                let written_anyway = graph_outputs.contains(&o.index())
                    || users[o.index()].iter().any(|u| group[u.index()] != Some(a));
                if written_anyway {
                    continue;
                }
                // Read only inside `a`: it moves too if only moving members read it;
                // otherwise it would have to be written for `b`, which costs more.
                let only_for_moving = users[o.index()].iter().all(|u| moving.contains(u));
                if !only_for_moving || matches!(graph.node(o).op, Op::Dropout { .. }) {
                    feasible = false;
                    break;
                }
                moving.push(o);
            }
            at += 1;
        }
        if !feasible {
            continue;
        }
        let moved: BTreeSet<usize> = moving.iter().map(|x| x.index()).collect();
        let b_members: BTreeSet<usize> = members[b].iter().copied().chain(moved.clone()).collect();
        let b_inputs: BTreeSet<usize> = inputs[b]
            .iter()
            .copied()
            .chain(
                moving
                    .iter()
                    .flat_map(|&x| graph.operands(x))
                    .filter(|&o| !is_constant(o))
                    .map(|o| o.index()),
            )
            .filter(|i| !b_members.contains(i))
            .collect();
        if b_inputs.len() > max_inputs || !one_shape(graph, &b_members) {
            continue;
        }
        for &x in &moved {
            group[x] = Some(b);
        }
        members[a].retain(|x| !moved.contains(x));
        members[b].extend(&moved);
        inputs[b] = b_inputs;
        // What `a` still computes reads the same values as before, less `m`'s.
        let a_members: BTreeSet<usize> = members[a].iter().copied().collect();
        inputs[a] = members[a]
            .iter()
            .flat_map(|&x| graph.operands(NodeId::new(x)))
            .filter(|&o| !is_constant(o) && !a_members.contains(&o.index()))
            .map(|o| o.index())
            .collect();
    }
}

/// Whether joining the producer group (`producer`) to a consumer group makes a cycle:
/// some user of a producer member outside the merged group leads back into it. Other
/// groups count as units (a group runs once all its inputs exist, so reaching any
/// member reaches the users of all its members). Paths are followed only up to the
/// consumer's position, past which nothing reaches it.
#[allow(clippy::too_many_arguments)]
pub(super) fn creates_cycle(
    producer: &[usize],
    merged: &BTreeSet<usize>,
    limit: usize,
    users: &[Vec<NodeId>],
    position: &[usize],
    group: &[Option<usize>],
    members: &[Vec<usize>],
) -> bool {
    let mut stack: Vec<usize> = producer
        .iter()
        .flat_map(|&m| users[m].iter().map(|u| u.index()))
        .filter(|u| !merged.contains(u))
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(x) = stack.pop() {
        if position[x] > limit || !seen.insert(x) {
            continue;
        }
        let unit: Vec<usize> = match group[x] {
            Some(r) if !merged.contains(&x) => members[r].clone(),
            _ => vec![x],
        };
        for m in unit {
            seen.insert(m);
            for u in &users[m] {
                if merged.contains(&u.index()) {
                    return true;
                }
                stack.push(u.index());
            }
        }
    }
    false
}
