//! E-graph optimisation with `egg`: a graph becomes an e-graph over the IR's own ops,
//! an analysis carries each class's type (and its value when it is a uniform
//! constant), a rule library rewrites it until saturation or a limit, and extraction
//! rebuilds one graph choosing the cheapest node per class under a cost of launches,
//! bytes written and FLOPs, counting each shared class once (DAG-aware). Shared
//! subexpressions stay shared (each class is built once), and hash-consing merges
//! duplicates, which is common-subexpression elimination for free.
//!
//! Every rule checks types through the analysis before it applies, so an ill-typed
//! rewrite is never added; extraction re-infers every node's type as it rebuilds.

mod analysis;
mod extraction;
mod language;
mod rules;

use crate::ir::{Graph, GraphError, NodeId};
use analysis::IrGraph;
use egg::{Extractor, Id, Runner};
use extraction::{acyclic, extract_dag, TreeCost};
use language::IrNode;
pub use rules::rules;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Bounds that make saturation always end.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub iterations: usize,
    pub nodes: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            iterations: 8,
            nodes: 200_000,
            time: Duration::from_secs(2),
        }
    }
}

/// What an optimisation did.
#[derive(Clone, Debug, Default)]
pub struct OptimizeReport {
    /// Rule name and how many times it applied, over all iterations.
    pub fired: BTreeMap<String, usize>,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub iterations: usize,
    pub stop: String,
    /// Kernel-running nodes before and after (each class counted once).
    pub kernels_before: usize,
    pub kernels_after: usize,
}

/// Optimises `graph`: builds the e-graph, saturates within `limits`, extracts.
pub fn optimize(graph: &Graph, limits: Limits) -> Result<(Graph, OptimizeReport), GraphError> {
    let order = graph.topo_order()?;
    let mut egraph = IrGraph::default();
    let mut class_of: HashMap<NodeId, Id> = HashMap::new();
    let mut origin_of: HashMap<Id, String> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        let children = graph.operands(id).iter().map(|o| class_of[o]).collect();
        let class = egraph.add(IrNode {
            op: node.op.clone(),
            children,
        });
        class_of.insert(id, class);
        origin_of
            .entry(class)
            .or_insert_with(|| node.origin.clone());
    }
    let kernels_before = order
        .iter()
        .filter(|&&id| graph.node(id).op.launches_kernel())
        .count();
    let roots: Vec<(String, Id)> = graph
        .outputs()
        .iter()
        .map(|(n, id)| (n.clone(), class_of[id]))
        .collect();
    let runner = Runner::default()
        .with_egraph(egraph)
        .with_iter_limit(limits.iterations)
        .with_node_limit(limits.nodes)
        .with_time_limit(limits.time)
        .run(&rules());
    let mut report = OptimizeReport {
        egraph_nodes: runner.egraph.total_size(),
        egraph_classes: runner.egraph.number_of_classes(),
        iterations: runner.iterations.len(),
        stop: runner
            .stop_reason
            .as_ref()
            .map_or_else(|| "running".into(), |r| format!("{r:?}")),
        kernels_before,
        ..OptimizeReport::default()
    };
    for it in &runner.iterations {
        for (name, count) in &it.applied {
            // One identity written once per operand order counts under one name.
            let name = name.as_str();
            let identity = name.split_once(':').map_or(name, |(base, _)| base);
            *report.fired.entry(identity.to_string()).or_default() += count;
        }
    }
    let egraph = &runner.egraph;
    let origins: HashMap<Id, String> = origin_of
        .into_iter()
        .map(|(c, o)| (egraph.find(c), o))
        .collect();
    let root_classes: Vec<Id> = roots.iter().map(|(_, r)| egraph.find(*r)).collect();
    let chosen = Some(extract_dag(egraph))
        .filter(|chosen| acyclic(egraph, chosen, &root_classes))
        .unwrap_or_else(|| {
            // The greedy choices can in rare cases close a cycle through a class
            // that changed its choice after others counted on it; egg's tree-cost
            // extraction never does.
            let extractor = Extractor::new(egraph, TreeCost { egraph });
            egraph
                .classes()
                .map(|c| (c.id, extractor.find_best_node(c.id).clone()))
                .collect()
        });
    let mut out = Graph::new(graph.name.clone());
    let mut built: HashMap<Id, NodeId> = HashMap::new();
    for (name, root) in &roots {
        let id = build(
            egraph,
            &chosen,
            &origins,
            egraph.find(*root),
            &mut out,
            &mut built,
        )?;
        out.set_output(name.clone(), id)?;
    }
    report.kernels_after = out
        .node_ids()
        .filter(|&id| out.node(id).op.launches_kernel())
        .count();
    Ok((out, report))
}

/// Builds class `class` into `out` (once; later uses share it).
fn build(
    egraph: &IrGraph,
    chosen: &HashMap<Id, IrNode>,
    origins: &HashMap<Id, String>,
    class: Id,
    out: &mut Graph,
    built: &mut HashMap<Id, NodeId>,
) -> Result<NodeId, GraphError> {
    if let Some(&id) = built.get(&class) {
        return Ok(id);
    }
    let node = chosen[&class].clone();
    let mut operands = Vec::with_capacity(node.children.len());
    for c in &node.children {
        operands.push(build(egraph, chosen, origins, egraph.find(*c), out, built)?);
    }
    let origin = origins
        .get(&class)
        .cloned()
        .unwrap_or_else(|| "optimizer".into());
    let id = out.push(node.op, &operands, origin)?;
    built.insert(class, id);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{BinaryOp, DType, Op, UnaryOp};
    use crate::shape;

    fn input(egraph: &mut IrGraph, name: &str, shape: crate::ir::Shape) -> Id {
        egraph.add(IrNode {
            op: Op::Input {
                name: name.into(),
                dtype: DType::F32,
                shape,
            },
            children: vec![],
        })
    }

    fn unary(egraph: &mut IrGraph, op: UnaryOp, x: Id) -> Id {
        egraph.add(IrNode {
            op: Op::Unary(op),
            children: vec![x],
        })
    }

    fn matmul(egraph: &mut IrGraph, a: Id, b: Id) -> Id {
        egraph.add(IrNode {
            op: Op::MatMul {
                transpose_a: false,
                transpose_b: false,
            },
            children: vec![a, b],
        })
    }

    fn binary(egraph: &mut IrGraph, op: BinaryOp, a: Id, b: Id) -> Id {
        egraph.add(IrNode {
            op: Op::Binary(op),
            children: vec![a, b],
        })
    }

    /// A class with two equal nodes: one reads a product through two paths, the other
    /// reads a costlier product (three times the contraction) through one. Summed over
    /// the tree the first pays for its product twice and loses; counted once, as it
    /// runs once, it wins.
    #[test]
    fn extraction_counts_a_shared_subgraph_once() {
        let mut egraph = IrGraph::default();
        let x = input(&mut egraph, "x", shape![256, 64]);
        let w = input(&mut egraph, "w", shape![64, 256]);
        let shared = matmul(&mut egraph, x, w);
        let tanh = unary(&mut egraph, UnaryOp::Tanh, shared);
        let exp = unary(&mut egraph, UnaryOp::Exp, shared);
        let twice = binary(&mut egraph, BinaryOp::Add, tanh, exp);
        let u = input(&mut egraph, "u", shape![256, 192]);
        let v = input(&mut egraph, "v", shape![192, 256]);
        let larger = matmul(&mut egraph, u, v);
        let once = unary(&mut egraph, UnaryOp::Tanh, larger);
        egraph.union(twice, once);
        egraph.rebuild();
        let chosen = extract_dag(&egraph);
        let pick = &chosen[&egraph.find(twice)];
        assert_eq!(pick.op, Op::Binary(BinaryOp::Add), "{pick:?}");
    }
}
