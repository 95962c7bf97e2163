//! Facts about a whole graph that every later stage needs: which nodes some output
//! depends on, and which node's buffer holds each value.

use super::graph::{Graph, NodeId};

/// Nodes some output depends on; the rest (values autodiff built that nothing reads)
/// never need to run.
pub fn live_nodes(graph: &Graph) -> Vec<bool> {
    let mut live = vec![false; graph.len()];
    let mut stack: Vec<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    while let Some(id) = stack.pop() {
        if !std::mem::replace(&mut live[id.index()], true) {
            stack.extend(graph.operands(id));
        }
    }
    live
}

/// The node whose device buffer holds each node's value: itself, or for a view
/// (transpose, broadcast, slice, reshape, stop-gradient) its source's. A buffer lives
/// until the last reader of any view of it.
pub fn buffer_roots(graph: &Graph) -> Vec<NodeId> {
    let mut root: Vec<NodeId> = (0..graph.len()).map(NodeId::new).collect();
    for id in graph.creation_order().unwrap_or_default() {
        if graph.node(id).op.is_view() {
            root[id.index()] = root[graph.operands(id)[0].index()];
        }
    }
    root
}
