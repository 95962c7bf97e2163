//! The schedule: a topological order of the plan's steps that frees large values
//! before it makes new ones.

use super::cost::bytes;
use super::plan::{FusionGroup, Step};
use crate::ir::{Graph, NodeId};
use std::collections::{BTreeMap, BTreeSet};

/// Topological order of groups and single nodes, chosen to keep memory low: among
/// the steps whose inputs exist, one that frees memory (is the last to read a value)
/// runs first, else the one that writes least, the earliest in `order` on a tie. A
/// training step's backward pass then consumes saved activations as soon as it can
/// instead of starting on other work.
pub(super) fn schedule(
    graph: &Graph,
    order: &[NodeId],
    groups: &[FusionGroup],
    member_of: &[Option<usize>],
) -> Vec<Step> {
    let step_of = |id: NodeId| member_of[id.index()].map_or(Step::Node(id), Step::Group);
    let key = |s: Step| match s {
        Step::Node(id) => id.index(),
        Step::Group(g) => graph.len() + g,
        Step::GroupReduce { .. }
        | Step::MatmulGroup { .. }
        | Step::MatmulSum { .. }
        | Step::MultiReduce(_)
        | Step::MultiGroup(_)
        | Step::MultiMatmul(_)
        | Step::ReduceGroup(_) => {
            unreachable!("prologues and epilogues are folded after scheduling")
        }
    };
    let total = graph.len() + groups.len();
    let mut indegree = vec![0usize; total];
    let mut successors: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); total];
    let mut first_position = vec![usize::MAX; total];
    let mut step_by_key: Vec<Option<Step>> = vec![None; total];
    // Buffers each step reads from other steps (a view's is its source's), and how
    // many steps read each buffer.
    let root = crate::ir::buffer_roots(graph);
    let mut reads: Vec<BTreeSet<NodeId>> = vec![BTreeSet::new(); total];
    let mut readers = vec![0usize; graph.len()];
    let mut written: Vec<BTreeSet<NodeId>> = vec![BTreeSet::new(); total];
    for (pos, &id) in order.iter().enumerate() {
        let s = step_of(id);
        let k = key(s);
        step_by_key[k] = Some(s);
        first_position[k] = first_position[k].min(pos);
        for o in graph.operands(id) {
            let from = key(step_of(o));
            if from != k {
                if successors[from].insert(k) {
                    indegree[k] += 1;
                }
                let buffer = root[o.index()];
                if reads[k].insert(buffer) {
                    readers[buffer.index()] += 1;
                }
                written[from].insert(o);
            }
        }
    }
    let graph_outputs: BTreeSet<NodeId> = graph.outputs().iter().map(|(_, o)| *o).collect();
    for &o in &graph_outputs {
        written[key(step_of(o))].insert(o);
    }
    // Buffers that outputs (or views that are outputs) keep to the end.
    let kept: BTreeSet<NodeId> = graph_outputs.iter().map(|o| root[o.index()]).collect();
    // Bytes a value holds; leaves are resident and views alias their source.
    let size = |id: NodeId| -> i64 {
        if !graph.node(id).op.launches_kernel() {
            return 0;
        }
        // No batch is bound while planning: batch-sized values weigh as an assumed
        // batch, so they dominate whatever the batch turns out to be.
        bytes(graph, id, &BTreeMap::new()) as i64
    };
    // The order of preference among ready steps: steps that free memory, those that
    // free more first; then those that write least.
    let preference = |k: usize, readers: &[usize]| -> (bool, i64, i64) {
        let writes: i64 = written[k].iter().map(|&v| size(v)).sum();
        let frees: i64 = reads[k]
            .iter()
            .filter(|o| readers[o.index()] == 1 && !kept.contains(o))
            .map(|&o| size(o))
            .sum();
        (frees == 0, -frees, writes)
    };
    let mut ready: Vec<usize> = (0..total)
        .filter(|&k| step_by_key[k].is_some() && indegree[k] == 0)
        .collect();
    let mut out = Vec::with_capacity(total);
    while !ready.is_empty() {
        let at = (0..ready.len())
            .min_by_key(|&i| (preference(ready[i], &readers), first_position[ready[i]]))
            .expect("a step is ready");
        let k = ready.swap_remove(at);
        out.push(step_by_key[k].expect("scheduled keys exist"));
        for o in &reads[k] {
            readers[o.index()] -= 1;
        }
        for &s in &successors[k] {
            indegree[s] -= 1;
            if indegree[s] == 0 {
                ready.push(s);
            }
        }
    }
    out
}
