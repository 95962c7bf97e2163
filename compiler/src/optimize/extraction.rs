//! Extraction: the cheapest node per class under a cost of launches, bytes written
//! and FLOPs, chosen for the DAG (each shared class counted once) and kept acyclic.

use super::analysis::{class_type, IrGraph};
use super::language::IrNode;
use crate::ir::{Op, TensorType};
use egg::{CostFunction, Id};
use std::collections::HashMap;

/// What running one node costs, in element-equivalents of memory traffic: a kernel
/// launch is worth `LAUNCH` elements moved (on a GPU a launch costs about what moving
/// tens of kilobytes does), plus the elements it writes, plus its multiply-adds at
/// `FLOPS_PER_ELEMENT` (a matmul is bound by arithmetic long before memory). Leaves
/// and layout views cost a little, never nothing, so a cycle of free views can never
/// look cheapest.
pub(super) fn node_cost(egraph: &IrGraph, enode: &IrNode) -> f64 {
    const LAUNCH: f64 = 4096.0;
    const FLOPS_PER_ELEMENT: f64 = 64.0;
    if !enode.op.launches_kernel() {
        return 1e-3;
    }
    let elements = |ty: Option<&TensorType>| {
        ty.map_or(1.0, |t| {
            t.shape
                .dims()
                .iter()
                .map(|d| d.assumed_extent() as f64)
                .product::<f64>()
        })
    };
    let out = crate::ir::infer(
        &enode.op,
        &enode
            .children
            .iter()
            .filter_map(|&c| class_type(egraph, c))
            .collect::<Vec<_>>(),
    )
    .ok();
    let written = elements(out.as_ref());
    let flops = match (&enode.op, enode.children.as_slice()) {
        (Op::MatMul { transpose_a, .. }, [a, _]) => {
            let contracted = class_type(egraph, *a).and_then(|t| {
                let dims = t.shape.dims();
                let k = if *transpose_a {
                    dims.len().checked_sub(2)?
                } else {
                    dims.len() - 1
                };
                Some(dims[k].assumed_extent() as f64)
            });
            2.0 * written * contracted.unwrap_or(1.0)
        }
        _ => 0.0,
    };
    LAUNCH + written + flops / FLOPS_PER_ELEMENT
}

/// `node_cost` summed over the tree, for egg's own extractor (the fallback).
pub(super) struct TreeCost<'a> {
    pub(super) egraph: &'a IrGraph,
}

impl CostFunction<IrNode> for TreeCost<'_> {
    type Cost = f64;

    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &IrNode, mut costs: C) -> f64 {
        let own = node_cost(self.egraph, enode);
        enode.children.iter().fold(own, |acc, c| acc + costs(*c))
    }
}

/// Whether the chosen nodes reachable from `roots` form no cycle (and every class
/// met has a choice).
pub(super) fn acyclic(egraph: &IrGraph, chosen: &HashMap<Id, IrNode>, roots: &[Id]) -> bool {
    // 1: on the current path, 2: done.
    let mut state: HashMap<Id, u8> = HashMap::new();
    let mut stack: Vec<(Id, usize)> = Vec::new();
    for &root in roots {
        if state.contains_key(&root) {
            continue;
        }
        stack.push((root, 0));
        state.insert(root, 1);
        while let Some((class, next)) = stack.pop() {
            let Some(node) = chosen.get(&class) else {
                return false;
            };
            if let Some(&child) = node.children.get(next) {
                stack.push((class, next + 1));
                let child = egraph.find(child);
                match state.get(&child) {
                    Some(1) => return false,
                    Some(_) => {}
                    None => {
                        state.insert(child, 1);
                        stack.push((child, 0));
                    }
                }
            } else {
                state.insert(class, 2);
            }
        }
    }
    true
}

/// DAG-aware extraction: the cost of choosing a node is its own cost plus that of
/// every distinct class it depends on, each counted once however many paths lead to
/// it, so a subgraph shared by several users is paid for once (egg's own extractor
/// sums over the tree and would count it per use). Greedy to a fixpoint: each class
/// keeps its cheapest node and that node's set of dependencies, as a bitset.
pub(super) fn extract_dag(egraph: &IrGraph) -> HashMap<Id, IrNode> {
    let classes: Vec<Id> = egraph.classes().map(|c| c.id).collect();
    let index: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let words = classes.len().div_ceil(64);
    struct Choice {
        node: IrNode,
        own: f64,
        deps: Vec<u64>,
    }
    let mut best: Vec<Option<Choice>> = (0..classes.len()).map(|_| None).collect();
    let total = |deps: &[u64], best: &[Option<Choice>]| -> f64 {
        let mut sum = 0.0;
        for (w, &bits) in deps.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                let i = w * 64 + b.trailing_zeros() as usize;
                sum += best[i].as_ref().map_or(0.0, |c| c.own);
                b &= b - 1;
            }
        }
        sum
    };
    // Each pass can only lower costs; a few settle any graph altc builds, and the
    // bound keeps a pathological e-graph from taking long.
    const PASSES: usize = 32;
    for _ in 0..PASSES {
        let mut changed = false;
        for (i, &class) in classes.iter().enumerate() {
            for node in &egraph[class].nodes {
                let mut deps = vec![0u64; words];
                let mut ready = true;
                for c in &node.children {
                    let j = index[&egraph.find(*c)];
                    let Some(child) = &best[j] else {
                        ready = false;
                        break;
                    };
                    for (d, s) in deps.iter_mut().zip(&child.deps) {
                        *d |= s;
                    }
                    deps[j / 64] |= 1 << (j % 64);
                }
                // A node that needs its own class (a cycle) is never chosen.
                if !ready || deps[i / 64] & (1 << (i % 64)) != 0 {
                    continue;
                }
                let own = node_cost(egraph, node);
                let cost = own + total(&deps, &best);
                let current = best[i].as_ref().map(|c| c.own + total(&c.deps, &best));
                if current.is_none_or(|c| cost < c - 1e-9) {
                    best[i] = Some(Choice {
                        node: node.clone(),
                        own,
                        deps,
                    });
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    classes
        .into_iter()
        .zip(best)
        .filter_map(|(c, choice)| choice.map(|choice| (c, choice.node)))
        .collect()
}
