//! The fusion planner on the tiny model's training graphs: every node runs exactly
//! once, every step's inputs come before it, groups hold same-shape elementwise ops
//! within the binding budget, and fusing needs fewer launches than running op by op.

use altc_compiler::fusion::{is_fusible, plan, FusionPlan};
use altc_compiler::ir::Graph;
use altc_compiler::lower::{lower, LowerOptions};
use altc_compiler::{spec, train};

fn training_graphs() -> Vec<Graph> {
    let loaded = spec::parse(
        include_str!("../../models/alt_moe_tiny.ron"),
        "alt_moe_tiny.ron",
    )
    .unwrap();
    let program = lower(&loaded.spec, LowerOptions::default()).unwrap();
    train::training_tasks(&program)
        .unwrap()
        .into_iter()
        .map(|t| t.graph)
        .collect()
}

fn check_plan(graph: &Graph, plan: &FusionPlan, max_inputs: usize) {
    let mut done = vec![false; graph.len()];
    for step in &plan.schedule {
        let nodes = plan.step_nodes(step);
        for &id in &nodes {
            for o in graph.operands(id) {
                assert!(
                    done[o.index()] || nodes.contains(&o),
                    "{}: node {} runs before its operand {}",
                    graph.name,
                    id.index(),
                    o.index()
                );
            }
        }
        for id in nodes {
            assert!(!done[id.index()], "node {} runs twice", id.index());
            done[id.index()] = true;
        }
    }
    let live = altc_compiler::fusion::live_nodes(graph);
    for (i, (&d, &l)) in done.iter().zip(&live).enumerate() {
        assert_eq!(d, l, "{}: node {i} runs iff an output needs it", graph.name);
    }
    for g in &plan.groups {
        let shape = g.shape(graph);
        let mut external = std::collections::BTreeSet::new();
        for &m in &g.nodes {
            assert!(is_fusible(&graph.node(m).op));
            let own = &graph.node(m).ty.shape;
            assert!(
                own == shape || own.rank() == 0,
                "a group has one shape, besides scalars riding along"
            );
            for o in graph.operands(m) {
                let constant = matches!(graph.node(o).op, altc_compiler::ir::Op::Constant { .. });
                if !g.nodes.contains(&o) && !constant {
                    external.insert(o);
                }
            }
        }
        assert!(
            external.len() <= max_inputs,
            "a group reads {} values",
            external.len()
        );
        assert!(!g.outputs.is_empty(), "a group produces something");
    }
}

#[test]
fn fusion_plans_of_the_training_graphs_are_complete_ordered_and_bounded() {
    for graph in training_graphs() {
        for max_inputs in [2, 4, 16] {
            let plan = plan(&graph, max_inputs);
            check_plan(&graph, &plan, max_inputs);
        }
    }
}

#[test]
fn fusion_needs_fewer_launches_than_op_by_op() {
    for graph in training_graphs() {
        let fused = plan(&graph, 16).launches(&graph);
        let unfused = FusionPlan::unfused(&graph).launches(&graph);
        println!("{}: {fused} launches fused, {unfused} op by op", graph.name);
        assert!(fused < unfused);
    }
}
