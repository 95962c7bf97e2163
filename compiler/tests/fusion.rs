//! The fusion planner on the tiny model's training graphs: every node runs exactly
//! once, every step's inputs come before it, groups hold same-shape elementwise ops
//! within the binding budget, and fusing needs fewer launches than running op by op.

use altc_compiler::fusion::{
    group_inputs, is_row_of, plan, FusionPlan, KernelLimits, SharedOperand, Step,
};
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

/// An f32 graph input `name` of `shape`.
fn input(g: &mut Graph, name: &str, shape: &[usize]) -> altc_compiler::ir::NodeId {
    g.push(
        altc_compiler::ir::Op::Input {
            name: name.into(),
            dtype: altc_compiler::ir::DType::F32,
            shape: shape.iter().copied().collect(),
        },
        &[],
        "test",
    )
    .unwrap()
}

/// Bytes of one of `two_products`' results.
const PRODUCT_BYTES: u64 = 256 * 256 * 4;

/// Two `[256, 256]` products, of inputs `a` and then `b` with one weight `w`.
fn two_products(g: &mut Graph) -> (altc_compiler::ir::NodeId, altc_compiler::ir::NodeId) {
    let matmul = altc_compiler::ir::Op::matmul(false, false);
    let (a, b, w) = (
        input(g, "a", &[256, 8]),
        input(g, "b", &[256, 8]),
        input(g, "w", &[8, 256]),
    );
    let first = g.push(matmul.clone(), &[a, w], "test").unwrap();
    let second = g.push(matmul, &[b, w], "test").unwrap();
    (first, second)
}

/// `op` of `x` over all of its `rank` axes.
fn reduce_all(
    g: &mut Graph,
    op: altc_compiler::ir::ReduceOp,
    x: altc_compiler::ir::NodeId,
    rank: usize,
) -> altc_compiler::ir::NodeId {
    let reduce = altc_compiler::ir::Op::Reduce {
        op,
        axes: (0..rank).collect(),
        keep_dims: false,
    };
    g.push(reduce, &[x], "test").unwrap()
}

fn check_plan(graph: &Graph, plan: &FusionPlan, limits: KernelLimits) {
    let max_inputs = limits.max_inputs;
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
    let live = altc_compiler::ir::live_nodes(graph);
    for (i, (&d, &l)) in done.iter().zip(&live).enumerate() {
        assert_eq!(d, l, "{}: node {i} runs iff an output needs it", graph.name);
    }
    for g in &plan.groups {
        let shape = g.shape(graph);
        let mut external = std::collections::BTreeSet::new();
        for &m in &g.nodes {
            assert!(graph.node(m).op.is_elementwise());
            let own = &graph.node(m).ty.shape;
            assert!(
                own == shape || own.rank() == 0 || is_row_of(own, shape),
                "a group has one shape, besides scalars and row values riding along"
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
    for (i, fused) in plan.reduce_epilogues.iter().enumerate() {
        assert!(plan.schedule.contains(&Step::ReduceGroup(i)));
        let operand = &graph.node(graph.operands(fused.reduce)[0]).ty.shape;
        assert_eq!(plan.groups[fused.group].shape(graph), operand);
        let readers = graph
            .node_ids()
            .filter(|&n| graph.operands(n).contains(&fused.read_as()));
        for reader in readers {
            assert!(
                fused.write_reduced || plan.groups[fused.group].nodes.contains(&reader),
                "only the epilogue reads a reduction that is not written"
            );
        }
    }
    for (i, batch) in plan.multi_groups.iter().enumerate() {
        assert!(batch.groups.len() > 1, "a multi-tensor kernel has tensors");
        assert!(plan.schedule.contains(&Step::MultiGroup(i)));
        let first = &plan.groups[batch.groups[0]];
        let ops = |g: &altc_compiler::fusion::FusionGroup| -> Vec<String> {
            g.nodes
                .iter()
                .map(|&n| format!("{:?}", graph.node(n).op))
                .collect()
        };
        let mut buffers = 1 + batch.shared.len();
        for (&g, inputs) in batch.groups.iter().zip(&batch.inputs) {
            let group = &plan.groups[g];
            assert_eq!(ops(group), ops(first), "one program for every tensor");
            assert_eq!(&group_inputs(graph, group), inputs);
            buffers += inputs.len() - batch.shared.len() + group.outputs.len();
            for &p in &batch.shared {
                assert_eq!(inputs[p], batch.inputs[0][p], "a shared input is one value");
            }
        }
        assert!(
            buffers <= limits.max_bindings,
            "a multi-tensor kernel binds {buffers} buffers"
        );
    }
    for (i, batch) in plan.multi_matmuls.iter().enumerate() {
        assert!(batch.members.len() > 1, "a multi-matmul has matmuls");
        assert!(plan.schedule.contains(&Step::MultiMatmul(i)));
        let matmuls = batch.matmuls();
        let side = match batch.shared {
            SharedOperand::Left => 0,
            SharedOperand::Right => 1,
        };
        let shared = graph.operands(matmuls[0])[side];
        for &m in &matmuls {
            assert_eq!(graph.operands(m)[side], shared, "one operand in common");
            assert_eq!(graph.node(m).ty, graph.node(matmuls[0]).ty, "one shape");
            assert_eq!(graph.node(m).op, graph.node(matmuls[0]).op, "one transpose");
        }
        assert_eq!(
            std::mem::discriminant(&batch.members[0]),
            std::mem::discriminant(batch.members.last().unwrap()),
            "one kind of matmul step"
        );
    }
}

#[test]
fn fusion_plans_of_the_training_graphs_are_complete_ordered_and_bounded() {
    for graph in training_graphs() {
        for bindings in [6, 8, 31, 1024] {
            let limits = KernelLimits::for_bindings(bindings);
            let plan = plan(&graph, limits);
            check_plan(&graph, &plan, limits);
        }
    }
}

#[test]
fn fusion_needs_fewer_launches_than_op_by_op() {
    for graph in training_graphs() {
        let fused = plan(&graph, KernelLimits::default()).launches(&graph);
        let unfused = FusionPlan::unfused(&graph).launches(&graph);
        println!("{}: {fused} launches fused, {unfused} op by op", graph.name);
        assert!(fused < unfused);
    }
}

/// The query, key and value projections of the image encoder's trained layer read
/// one input: they run as one kernel with their bias epilogues, and so do their
/// weight gradients, summed over the batch.
#[test]
fn the_attention_projections_share_one_launch() {
    let graph = training_graphs()
        .into_iter()
        .find(|g| g.name == "text_to_image.train")
        .unwrap();
    let plan = plan(&graph, KernelLimits::default());
    let weights = |batch: &altc_compiler::fusion::MultiMatmul, side: usize| -> Vec<String> {
        let mut names: Vec<String> = batch
            .matmuls()
            .iter()
            .map(|&m| graph.node(graph.operands(m)[side]).op.mnemonic())
            .collect();
        names.sort();
        names
    };
    let forward = plan
        .multi_matmuls
        .iter()
        .find(|b| matches!(b.members[0], Step::MatmulGroup { .. }) && b.members.len() == 3)
        .expect("the projections share a kernel");
    assert_eq!(forward.shared, SharedOperand::Left);
    assert_eq!(
        weights(forward, 1),
        [
            "param encoders.image.layers.1.key.weight",
            "param encoders.image.layers.1.query.weight",
            "param encoders.image.layers.1.value.weight"
        ]
    );
    let gradients = plan
        .multi_matmuls
        .iter()
        .find(|b| matches!(b.members[0], Step::MatmulSum { .. }) && b.members.len() == 3)
        .expect("the weight gradients share a kernel");
    let forward_input = graph.operands(forward.matmuls()[0])[0];
    assert_eq!(graph.operands(gradients.matmuls()[0])[0], forward_input);
}

/// The AdamW updates of the parameters (one group each, two programs: with and
/// without weight decay) run as multi-tensor kernels: all of them in a few launches
/// where a kernel may bind many buffers, and more, smaller batches where it may not.
#[test]
fn parameter_updates_share_multi_tensor_kernels() {
    for graph in training_graphs() {
        let updated: std::collections::BTreeSet<_> = graph
            .outputs()
            .iter()
            .filter(|(name, _)| name.starts_with("new."))
            .map(|(_, id)| *id)
            .collect();
        // Multi-tensor kernels that update parameters, and how many tensors each.
        let updates = |limits| -> Vec<usize> {
            let plan = plan(&graph, limits);
            plan.multi_groups
                .iter()
                .filter(|m| {
                    m.groups
                        .iter()
                        .any(|&g| plan.groups[g].outputs.iter().any(|o| updated.contains(o)))
                })
                .map(|m| m.groups.len())
                .collect()
        };
        let wide = updates(KernelLimits::for_bindings(1024));
        let narrow = updates(KernelLimits::for_bindings(31));
        println!(
            "{}: updates in {wide:?} (1024 bindings), {narrow:?} (31)",
            graph.name
        );
        assert!(
            wide.iter().sum::<usize>() >= 30,
            "every parameter's update is batched"
        );
        assert!(
            wide.len() <= 3,
            "a few launches update every parameter: {wide:?}"
        );
        assert!(narrow.len() > wide.len(), "31 bindings split the batches");
    }
}

/// Two large products written before either is reduced (as a graph built layer by
/// layer may be): the schedule reduces each product as soon as it exists, so only
/// one is ever alive, where running in creation order holds both. The products share
/// `w`, but one kernel for both would hold both, so the planner keeps them apart.
#[test]
fn the_schedule_frees_large_values_before_making_more() {
    use altc_compiler::fusion::cost::plan_cost;
    use altc_compiler::ir::{BinaryOp, Op, ReduceOp};
    let mut g = Graph::new("two-products");
    let (first, second) = two_products(&mut g);
    // Different reductions, so that they do not share one multi-tensor kernel.
    let s1 = reduce_all(&mut g, ReduceOp::Sum, first, 2);
    let s2 = reduce_all(&mut g, ReduceOp::Max, second, 2);
    let both = g
        .push(Op::Binary(BinaryOp::Add), &[s1, s2], "test")
        .unwrap();
    g.set_output("total", both).unwrap();
    let symbols = Default::default();
    let product = PRODUCT_BYTES;
    let fused = plan_cost(&g, &plan(&g, KernelLimits::default()), &symbols);
    let in_order = plan_cost(&g, &FusionPlan::unfused(&g), &symbols);
    assert!(
        in_order.peak_bytes >= 2 * product,
        "creation order holds both"
    );
    assert!(
        fused.peak_bytes < 2 * product,
        "the planned peak {} holds one product at a time",
        fused.peak_bytes
    );
}

/// A value a later group needs (a backward term such as `2 * centred`), computed from
/// a value its producing group writes anyway, is computed by the group that reads it
/// instead: it is never written or held between the two.
#[test]
fn work_for_a_later_group_moves_into_it() {
    use altc_compiler::ir::{BinaryOp, DType, Op, ReduceOp, Scalar, Shape};
    let mut g = Graph::new("late-term");
    let mut push =
        |op: Op, operands: &[altc_compiler::ir::NodeId]| g.push(op, operands, "test").unwrap();
    let input = |name: &str| Op::Input {
        name: name.into(),
        dtype: DType::F32,
        shape: [64, 64].into_iter().collect(),
    };
    let constant = |v: f64| Op::Constant {
        value: Scalar(v),
        dtype: DType::F32,
        shape: Shape::scalar(),
    };
    let (x, w) = (push(input("x"), &[]), push(input("w"), &[]));
    let (one, two) = (push(constant(1.0), &[]), push(constant(2.0), &[]));
    let centred = push(Op::Binary(BinaryOp::Sub), &[x, one]);
    let late_term = push(Op::Binary(BinaryOp::Mul), &[centred, two]);
    let sum = Op::reduce(ReduceOp::Sum, &[0, 1], false);
    let total = push(sum, &[centred]);
    let product = push(Op::matmul(false, false), &[x, w]);
    let late = push(Op::Binary(BinaryOp::Mul), &[late_term, product]);
    g.set_output("total", total).unwrap();
    g.set_output("late", late).unwrap();

    let plan = plan(&g, KernelLimits::default());
    let group_of = |id| plan.group_of(id).map(|group| group.nodes.clone());
    assert_eq!(group_of(late_term), group_of(late), "{:?}", plan.groups);
    let written: Vec<_> = plan
        .schedule
        .iter()
        .flat_map(|s| plan.step_outputs(&g, s))
        .collect();
    assert!(
        written.contains(&centred),
        "the centred value is written for the sum"
    );
    assert!(
        !written.contains(&late_term),
        "the late term is never written"
    );
}

/// A view (here a reshape) shares its source's buffer, so the source lives until
/// the view's last reader: a product read through a view after a second product
/// exists means both are alive at once, and the planned peak says so.
#[test]
fn a_view_keeps_its_source_alive() {
    use altc_compiler::fusion::cost::plan_cost;
    use altc_compiler::ir::{BinaryOp, Op, ReduceOp};
    let mut g = Graph::new("viewed-product");
    let (first, second) = two_products(&mut g);
    let flat = g
        .push(
            Op::Reshape {
                shape: [256 * 256].into_iter().collect(),
            },
            &[first],
            "test",
        )
        .unwrap();
    let second_sum = reduce_all(&mut g, ReduceOp::Sum, second, 2);
    // The view is read only once the second product's sum exists.
    let scaled = g
        .push(Op::Binary(BinaryOp::Mul), &[flat, second_sum], "test")
        .unwrap();
    let total = reduce_all(&mut g, ReduceOp::Sum, scaled, 1);
    g.set_output("total", total).unwrap();
    let product = PRODUCT_BYTES;
    let cost = plan_cost(&g, &plan(&g, KernelLimits::default()), &Default::default());
    assert!(
        cost.peak_bytes >= 2 * product,
        "the first product lives through its view: planned peak {}",
        cost.peak_bytes
    );
}

/// The tiny model with experts 1024 wide, so that each expert weight holds 65,536
/// values: the size from which scalars are computed apart.
fn wide_expert_training_graph() -> Graph {
    let source = include_str!("../../models/alt_moe_tiny.ron").replace(
        "experts: (count: 4, hidden: 16,",
        "experts: (count: 4, hidden: 1024,",
    );
    let loaded = spec::parse(&source, "alt_moe_wide_experts.ron").unwrap();
    let program = lower(&loaded.spec, LowerOptions::default()).unwrap();
    train::training_tasks(&program).unwrap().remove(0).graph
}

/// The AdamW step of a large parameter reads its bias corrections from a scalar
/// kernel, which also writes the new step count, so the update itself carries no
/// scalars; a small parameter's update recomputes them in every element.
#[test]
fn large_updates_read_their_bias_corrections_from_a_scalar_kernel() {
    let graph = wide_expert_training_graph();
    let limits = KernelLimits::default();
    let plan = plan(&graph, limits);
    check_plan(&graph, &plan, limits);
    let writer = |output: &str| {
        let id = graph.output(output).unwrap();
        plan.group_of(id)
            .unwrap_or_else(|| panic!("a group writes {output}"))
    };
    let (large, small) = ("experts.w1", "experts.b1");
    let update = writer(&format!("new.{large}"));
    assert!(update.shape(&graph).fixed_numel() >= Some(1 << 16));
    assert!(!update.carries_scalars(&graph), "{:?}", update.nodes);
    let step = writer(&format!("new.adamw.step.{large}"));
    assert_eq!(step.shape(&graph).rank(), 0);
    let small_update = writer(&format!("new.{small}"));
    assert!(small_update.carries_scalars(&graph));
    assert_eq!(
        writer(&format!("new.adamw.step.{small}")).nodes,
        small_update.nodes
    );
}
