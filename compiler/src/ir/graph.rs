//! The IR graph: a petgraph DAG of typed primitive ops. Edges run from operand to
//! user and carry the operand's slot.

use super::{infer, Op, TensorType, TypeError};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub type NodeId = NodeIndex<u32>;

/// One op in a graph with its inferred type and where it came from (the spec path
/// that lowered to it), so that later failures can name their origin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    pub origin: String,
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum GraphError {
    #[error("node {index} ({origin}): {source}")]
    Type {
        index: usize,
        origin: String,
        #[source]
        source: Box<TypeError>,
    },
    #[error("graph `{graph}` has a cycle through node {index}")]
    Cycle { graph: String, index: usize },
    #[error("graph `{graph}`: node {index} is not in the graph")]
    UnknownNode { graph: String, index: usize },
    #[error("graph `{graph}` already has an output named `{name}`")]
    DuplicateOutput { graph: String, name: String },
    #[error("graph `{graph}`: node {index} records type {recorded} but its op yields {inferred}")]
    StaleType {
        graph: String,
        index: usize,
        recorded: String,
        inferred: String,
    },
}

/// A typed DAG of IR ops with named outputs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    dag: DiGraph<Node, u32>,
    outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            dag: DiGraph::new(),
            outputs: Vec::new(),
        }
    }

    /// Appends `op` applied to `operands`, inferring and checking its type.
    pub fn push(
        &mut self,
        op: Op,
        operands: &[NodeId],
        origin: impl Into<String>,
    ) -> Result<NodeId, GraphError> {
        let origin = origin.into();
        for &o in operands {
            if o.index() >= self.dag.node_count() {
                return Err(GraphError::UnknownNode {
                    graph: self.name.clone(),
                    index: o.index(),
                });
            }
        }
        let types: Vec<&TensorType> = operands.iter().map(|&o| &self.dag[o].ty).collect();
        let ty = infer(&op, &types).map_err(|source| GraphError::Type {
            index: self.dag.node_count(),
            origin: origin.clone(),
            source: Box::new(source),
        })?;
        let id = self.dag.add_node(Node { op, ty, origin });
        for (slot, &o) in operands.iter().enumerate() {
            self.dag.add_edge(o, id, slot as u32);
        }
        Ok(id)
    }

    pub fn set_output(&mut self, name: impl Into<String>, id: NodeId) -> Result<(), GraphError> {
        let name = name.into();
        if self.outputs.iter().any(|(n, _)| *n == name) {
            return Err(GraphError::DuplicateOutput {
                graph: self.name.clone(),
                name,
            });
        }
        self.outputs.push((name, id));
        Ok(())
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.dag[id]
    }

    pub fn len(&self) -> usize {
        self.dag.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.dag.node_count() == 0
    }

    /// Operands of `id`, in slot order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(u32, NodeId)> = self
            .dag
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        edges.sort_unstable_by_key(|(slot, _)| *slot);
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// A structural hash: graphs with the same name, nodes (op, type, operands in
    /// order) and outputs hash alike, so what was planned for one serves the other.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.name.hash(&mut h);
        for id in self.dag.node_indices() {
            let node = &self.dag[id];
            node.op.hash(&mut h);
            node.ty.hash(&mut h);
            for o in self.operands(id) {
                o.index().hash(&mut h);
            }
        }
        for (name, id) in &self.outputs {
            name.hash(&mut h);
            id.index().hash(&mut h);
        }
        h.finish()
    }

    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.dag.node_indices()
    }

    /// Nodes in an order where every operand comes before its users, and otherwise in
    /// the order they were created (Kahn's algorithm, the lowest ready index first).
    /// Graphs are built as programs are written: each loss's backward pass, then the
    /// clipping norms, then each parameter's update. Following that order keeps
    /// what one part computes together, so schedules built from it free activations
    /// early and can batch the same work on different tensors.
    pub fn creation_order(&self) -> Result<Vec<NodeId>, GraphError> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut waiting: Vec<usize> = self
            .dag
            .node_indices()
            .map(|id| self.dag.neighbors_directed(id, Direction::Incoming).count())
            .collect();
        let mut ready: BinaryHeap<Reverse<usize>> = waiting
            .iter()
            .enumerate()
            .filter(|(_, &n)| n == 0)
            .map(|(i, _)| Reverse(i))
            .collect();
        let mut order = Vec::with_capacity(waiting.len());
        while let Some(Reverse(i)) = ready.pop() {
            let id = NodeId::new(i);
            order.push(id);
            for user in self.dag.neighbors_directed(id, Direction::Outgoing) {
                waiting[user.index()] -= 1;
                if waiting[user.index()] == 0 {
                    ready.push(Reverse(user.index()));
                }
            }
        }
        if order.len() < waiting.len() {
            // Whatever is still waiting lies on a cycle; name it as `toposort` does.
            return self.topo_order();
        }
        Ok(order)
    }

    /// Nodes in an order where every operand comes before its users.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, GraphError> {
        petgraph::algo::toposort(&self.dag, None).map_err(|cycle| GraphError::Cycle {
            graph: self.name.clone(),
            index: cycle.node_id().index(),
        })
    }

    /// The `Input` nodes: name, node.
    pub fn inputs(&self) -> impl Iterator<Item = (&str, NodeId)> + '_ {
        self.dag
            .node_indices()
            .filter_map(|id| match &self.dag[id].op {
                Op::Input { name, .. } => Some((name.as_str(), id)),
                _ => None,
            })
    }

    /// The `Parameter` nodes: name, node.
    pub fn parameters(&self) -> impl Iterator<Item = (&str, NodeId)> + '_ {
        self.dag
            .node_indices()
            .filter_map(|id| match &self.dag[id].op {
                Op::Parameter { name, .. } => Some((name.as_str(), id)),
                _ => None,
            })
    }

    /// Re-checks a graph that did not come from `push` (one read from an artifact):
    /// acyclic, outputs present, every recorded type what its op yields.
    pub fn validate(&self) -> Result<(), GraphError> {
        for id in self.topo_order()? {
            let operands = self.operands(id);
            let types: Vec<&TensorType> = operands.iter().map(|&o| &self.dag[o].ty).collect();
            let node = &self.dag[id];
            let inferred = infer(&node.op, &types).map_err(|source| GraphError::Type {
                index: id.index(),
                origin: node.origin.clone(),
                source: Box::new(source),
            })?;
            if inferred != node.ty {
                return Err(GraphError::StaleType {
                    graph: self.name.clone(),
                    index: id.index(),
                    recorded: node.ty.to_string(),
                    inferred: inferred.to_string(),
                });
            }
        }
        for (_, id) in &self.outputs {
            if id.index() >= self.dag.node_count() {
                return Err(GraphError::UnknownNode {
                    graph: self.name.clone(),
                    index: id.index(),
                });
            }
        }
        Ok(())
    }

    /// Copies every node of `other` into this graph, sharing leaves: an `Input` or
    /// `Parameter` whose name already exists here is reused rather than duplicated.
    /// Returns where each node of `other` landed.
    pub fn absorb(&mut self, other: &Graph) -> Result<Vec<NodeId>, GraphError> {
        let mut leaves: std::collections::HashMap<(bool, String), NodeId> = self
            .inputs()
            .map(|(n, id)| ((true, n.to_string()), id))
            .chain(
                self.parameters()
                    .map(|(n, id)| ((false, n.to_string()), id)),
            )
            .collect();
        let mut map = vec![NodeId::end(); other.len()];
        for id in other.topo_order()? {
            let node = other.node(id);
            let leaf = match &node.op {
                Op::Input { name, .. } => Some((true, name.clone())),
                Op::Parameter { name, .. } => Some((false, name.clone())),
                _ => None,
            };
            if let Some(&existing) = leaf.as_ref().and_then(|k| leaves.get(k)) {
                map[id.index()] = existing;
                continue;
            }
            let operands: Vec<NodeId> = other.operands(id).iter().map(|o| map[o.index()]).collect();
            let new = self.push(node.op.clone(), &operands, node.origin.clone())?;
            if let Some(key) = leaf {
                leaves.insert(key, new);
            }
            map[id.index()] = new;
        }
        Ok(map)
    }

    /// The underlying petgraph, for analyses and Graphviz.
    pub fn dag(&self) -> &DiGraph<Node, u32> {
        &self.dag
    }
}
