//! The e-graph optimiser: optimised graphs compute what the originals compute (the
//! tiny model's training graphs, and random graphs built to give every rule something
//! to do), saturation ends within its limits, and the rules fire.

use altc_compiler::ir::{
    BinaryOp, BuildGraph, DType, Graph, GraphBuilder, NodeId, Op, ReduceOp, Scalar, Shape, UnaryOp,
};
use altc_compiler::lower::{lower, Init, LowerOptions, Mode, ParamInfo, ParamKind};
use altc_compiler::optimize::{optimize, Limits};
use altc_compiler::reference::{initial_parameters, run, EvalContext, Tensor, TensorMap};
use altc_compiler::spec::{GradClip, Optimizer};
use altc_compiler::{rng, shape, spec, train};

fn close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.shape, b.shape, "{what}: shape");
    for (i, (x, y)) in a.to_f64().iter().zip(b.to_f64()).enumerate() {
        assert!(
            (x - y).abs() <= 1e-10 + 1e-9 * y.abs(),
            "{what}[{i}]: optimised {x}, original {y}"
        );
    }
}

#[test]
fn optimised_training_graphs_compute_the_same_step() {
    let loaded = spec::parse(
        include_str!("../../models/alt_moe_tiny.ron"),
        "alt_moe_tiny.ron",
    )
    .unwrap();
    let program = lower(
        &loaded.spec,
        LowerOptions {
            dtype: DType::F64,
            mode: Mode::Train,
            ..LowerOptions::default()
        },
    )
    .unwrap();
    let mut state = initial_parameters(&program.params, DType::F64, 2);
    for p in program.params.iter() {
        let zeros = || Tensor::f64(&p.shape, vec![0.0; p.numel()]);
        state.insert(train::first_moment(&p.name), zeros());
        state.insert(train::second_moment(&p.name), zeros());
        state.insert(train::step_count(&p.name), Tensor::f64(&[], vec![0.0]));
    }
    let b = 4;
    let mut inputs = TensorMap::new();
    for m in &program.modalities {
        let n = b * m.tokens * m.input_width;
        let values = (0..n)
            .map(|i| 2.0 * rng::uniform(1, 0, 5, i as u64) - 1.0)
            .collect();
        inputs.insert(
            format!("{}.tokens", m.name),
            Tensor::f64(&[b, m.tokens, m.input_width], values),
        );
        if m.padded {
            // Row i has i + 1 real tokens.
            let lengths: Vec<usize> = (1..=b).collect();
            inputs.insert(
                format!("{}.mask", m.name),
                Tensor::prefix_mask(DType::F64, m.tokens, &lengths),
            );
        }
    }
    inputs.insert(train::LR_INPUT.into(), Tensor::f64(&[], vec![1e-3]));
    inputs.insert(
        train::WEIGHT_DECAY_INPUT.into(),
        Tensor::f64(&[], vec![0.01]),
    );
    let ctx = EvalContext { seed: 4, step: 2 };
    for task in train::training_tasks(&program).unwrap() {
        let (optimised, report) = optimize(&task.graph, Limits::default()).unwrap();
        assert!(report.kernels_after <= report.kernels_before, "{report:?}");
        assert!(!report.fired.is_empty(), "no rule fired on {}", task.name);
        let want = run(&task.graph, &inputs, &state, ctx).unwrap();
        let got = run(&optimised, &inputs, &state, ctx).unwrap();
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        for (name, w) in &want {
            close(&got[name], w, &format!("{} {name}", task.name));
        }
        println!(
            "{}: {} -> {} kernels, fired {:?}",
            task.name, report.kernels_before, report.kernels_after, report.fired
        );
    }
}

/// Random graphs over `x [3, 4]` and `y [4]` that mix the identities the rules know
/// (adding zero, multiplying by one, double negation, transposes and reshapes that
/// undo each other, constant arithmetic, duplicates) into ordinary arithmetic.
fn random_graph(seed: u64) -> Graph {
    let mut g = Graph::new(format!("random-{seed}"));
    let mut k = 0u64;
    let mut pick = |n: usize| {
        k += 1;
        ((rng::uniform(seed, 1, 77, k) * n as f64) as usize).min(n - 1)
    };
    let x = GraphBuilder::new(&mut g, "t")
        .input("x", DType::F64, shape![3, 4])
        .unwrap();
    let y = GraphBuilder::new(&mut g, "t")
        .input("y", DType::F64, shape![4])
        .unwrap();
    let constant = |g: &mut Graph, v: f64| {
        g.push(
            Op::Constant {
                value: Scalar(v),
                dtype: DType::F64,
                shape: Shape::scalar(),
            },
            &[],
            "t",
        )
        .unwrap()
    };
    let mut pool: Vec<NodeId> = vec![x];
    for _ in 0..14 {
        let a = pool[pick(pool.len())];
        let next = match pick(9) {
            0 => {
                let z = constant(&mut g, 0.0);
                g.push(Op::Binary(BinaryOp::Add), &[a, z], "t")
            }
            1 => {
                let one = constant(&mut g, 1.0);
                g.push(Op::Binary(BinaryOp::Mul), &[one, a], "t")
            }
            2 => {
                let n = g.push(Op::Unary(UnaryOp::Neg), &[a], "t").unwrap();
                g.push(Op::Unary(UnaryOp::Neg), &[n], "t")
            }
            3 => {
                let t = g
                    .push(Op::Transpose { perm: vec![1, 0] }, &[a], "t")
                    .unwrap();
                g.push(Op::Transpose { perm: vec![1, 0] }, &[t], "t")
            }
            4 => {
                let r = g
                    .push(
                        Op::Reshape {
                            shape: shape![2, 6],
                        },
                        &[a],
                        "t",
                    )
                    .unwrap();
                g.push(
                    Op::Reshape {
                        shape: shape![3, 4],
                    },
                    &[r],
                    "t",
                )
            }
            5 => {
                let two = constant(&mut g, 2.0);
                let three = constant(&mut g, 3.0);
                let c = g
                    .push(Op::Binary(BinaryOp::Mul), &[two, three], "t")
                    .unwrap();
                g.push(Op::Binary(BinaryOp::Sub), &[a, c], "t")
            }
            6 => g.push(Op::Binary(BinaryOp::Mul), &[a, y], "t"),
            7 => {
                // Broadcast twice, then average the copies away.
                let once = g
                    .push(
                        Op::BroadcastTo {
                            shape: shape![2, 3, 4],
                        },
                        &[a],
                        "t",
                    )
                    .unwrap();
                let twice = g
                    .push(
                        Op::BroadcastTo {
                            shape: shape![5, 2, 3, 4],
                        },
                        &[once],
                        "t",
                    )
                    .unwrap();
                g.push(Op::reduce(ReduceOp::Mean, &[0, 1], false), &[twice], "t")
            }
            _ => g.push(Op::Unary(UnaryOp::Tanh), &[a], "t"),
        };
        pool.push(next.unwrap());
    }
    let last = pool.len();
    g.set_output("out", pool[last - 1]).unwrap();
    g.set_output("mid", pool[last / 2]).unwrap();
    g
}

#[test]
fn random_graphs_keep_their_values_and_lose_their_redundancy() {
    let inputs = TensorMap::from([
        (
            "x".to_string(),
            Tensor::f64(&[3, 4], (0..12).map(|i| (i as f64 - 5.5) / 4.0).collect()),
        ),
        (
            "y".to_string(),
            Tensor::f64(&[4], vec![0.5, -1.5, 2.0, 0.25]),
        ),
    ]);
    let mut shrank = 0;
    for seed in 0..40 {
        let g = random_graph(seed);
        let (o, report) = optimize(&g, Limits::default()).unwrap();
        let (want, got) = (
            run(&g, &inputs, &TensorMap::new(), EvalContext::default()).unwrap(),
            run(&o, &inputs, &TensorMap::new(), EvalContext::default()).unwrap(),
        );
        for (name, w) in &want {
            close(&got[name], w, &format!("graph {seed} {name}"));
        }
        if report.kernels_after < report.kernels_before {
            shrank += 1;
        }
    }
    assert!(
        shrank >= 35,
        "the rules removed work from only {shrank} of 40 graphs"
    );
}

#[test]
fn saturation_stops_at_its_limits() {
    let g = random_graph(3);
    let tight = Limits {
        iterations: 1,
        nodes: 10_000,
        time: std::time::Duration::from_secs(1),
    };
    let (_, report) = optimize(&g, tight).unwrap();
    assert!(report.iterations <= 2, "{report:?}");
}

/// A parameter of `shape` to update, with or without weight decay.
fn parameter(name: &str, shape: &[usize], decay: bool) -> ParamInfo {
    ParamInfo {
        name: name.into(),
        shape: shape.to_vec(),
        kind: ParamKind::Weight,
        init: Init::Zeros,
        trainable: true,
        decay,
        origin: "test".into(),
    }
}

/// Values in `[lo, hi)` for a tensor of `shape`, drawn from `stream`.
fn drawn(shape: &[usize], stream: u64, lo: f64, hi: f64) -> Tensor {
    let n = shape.iter().product::<usize>();
    let values = (0..n)
        .map(|i| lo + (hi - lo) * rng::uniform(9, 0, stream, i as u64))
        .collect();
    Tensor::f64(shape, values)
}

/// The optimizer step alone over large and small parameters, with and without
/// clipping: the scalar-factor rules rewrite the large updates (moving work from
/// their elements onto their scalars), and every new parameter and moment is what
/// the step as built computes.
#[test]
fn optimised_optimizer_steps_compute_the_same_update() {
    let loaded = spec::parse(
        include_str!("../../models/alt_moe_tiny.ron"),
        "alt_moe_tiny.ron",
    )
    .unwrap();
    let params = [
        parameter("large", &[256, 256], true),
        parameter("wide", &[128, 1024], true),
        parameter("large_bias", &[65536], false),
        parameter("small", &[16, 16], true),
        parameter("small_bias", &[300], false),
    ];
    let mut state = TensorMap::new();
    let mut inputs = TensorMap::from([
        (train::LR_INPUT.to_string(), Tensor::f64(&[], vec![1.5e-3])),
        (
            train::WEIGHT_DECAY_INPUT.to_string(),
            Tensor::f64(&[], vec![0.05]),
        ),
    ]);
    for (i, p) in params.iter().enumerate() {
        let s = 10 * i as u64;
        state.insert(p.name.clone(), drawn(&p.shape, s, -0.5, 0.5));
        state.insert(
            train::first_moment(&p.name),
            drawn(&p.shape, s + 1, -0.01, 0.01),
        );
        state.insert(
            train::second_moment(&p.name),
            drawn(&p.shape, s + 2, 0.0, 1e-4),
        );
        state.insert(
            train::step_count(&p.name),
            Tensor::f64(&[], vec![i as f64 + 2.0]),
        );
        inputs.insert(
            train::gradient(&p.name),
            drawn(&p.shape, s + 3, -0.02, 0.02),
        );
    }
    for clip in [GradClip::GlobalNorm(1.0), GradClip::Off] {
        let Optimizer::AdamW {
            betas,
            eps,
            lr,
            weight_decay,
            no_decay,
            ..
        } = loaded.spec.optimizer.clone();
        let optimizer = Optimizer::AdamW {
            betas,
            eps,
            lr,
            weight_decay,
            no_decay,
            clip,
        };
        let graph = train::optimizer_step(&optimizer, &params, DType::F64).unwrap();
        let (optimised, report) = optimize(&graph, Limits::default()).unwrap();
        for rule in [
            "collect-scalar-factors",
            "common-denominator",
            "divide-by-quotient",
            "scale-numerator",
        ] {
            assert!(
                report.fired.contains_key(rule),
                "{rule} did not fire with {clip:?}: {:?}",
                report.fired
            );
        }
        let ctx = EvalContext::default();
        let want = run(&graph, &inputs, &state, ctx).unwrap();
        let got = run(&optimised, &inputs, &state, ctx).unwrap();
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        for (name, w) in &want {
            close(&got[name], w, &format!("{clip:?} {name}"));
        }
        for p in &params {
            let output = train::updated(&p.name);
            let (before, after) = (tensor_ops(&graph, &output), tensor_ops(&optimised, &output));
            if p.numel() >= 1 << 16 {
                assert_eq!(after.0 + 1, before.0, "{output}: one division fewer");
            } else {
                assert_eq!(after, before, "{output}: a small update keeps its ops");
            }
        }
    }
}

/// Over the nodes output `name` depends on, the elementwise ops on tensors (not
/// scalars): `(divisions, all of them)`.
fn tensor_ops(graph: &Graph, name: &str) -> (usize, usize) {
    let mut seen = std::collections::BTreeSet::new();
    let mut stack = vec![graph.output(name).unwrap()];
    let (mut divisions, mut all) = (0, 0);
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let node = graph.node(id);
        if node.ty.shape.rank() > 0 && matches!(node.op, Op::Unary(_) | Op::Binary(_)) {
            all += 1;
            divisions += usize::from(node.op == Op::Binary(BinaryOp::Div));
        }
        stack.extend(graph.operands(id));
    }
    (divisions, all)
}

/// Random graphs over two positive `[256, 256]` tensors and one `[4, 256, 256]` that
/// broadcasts against them (all large enough for the scalar-factor rules) and three
/// positive scalars, built from the products, quotients and sums those rules
/// rewrite, scalars on either side. Positive values
/// and no subtraction keep every result well conditioned, so rounding stays small.
fn random_scaled_graph(seed: u64) -> Graph {
    let mut g = Graph::new(format!("scaled-{seed}"));
    let mut k = 0u64;
    let mut pick = |n: usize| {
        k += 1;
        ((rng::uniform(seed, 2, 78, k) * n as f64) as usize).min(n - 1)
    };
    let leaf = |g: &mut Graph, name: &str, shape: Shape| {
        GraphBuilder::new(g, "t")
            .input(name, DType::F64, shape)
            .unwrap()
    };
    let tensors = [
        leaf(&mut g, "a", shape![256, 256]),
        leaf(&mut g, "b", shape![256, 256]),
        leaf(&mut g, "c", shape![4, 256, 256]),
    ];
    let scalars = [
        leaf(&mut g, "r", Shape::scalar()),
        leaf(&mut g, "s", Shape::scalar()),
        leaf(&mut g, "t", Shape::scalar()),
    ];
    let bin = |g: &mut Graph, op: BinaryOp, x: NodeId, y: NodeId| {
        g.push(Op::Binary(op), &[x, y], "t").unwrap()
    };
    let mut pool: Vec<NodeId> = tensors.to_vec();
    for _ in 0..12 {
        let (x, y) = (pool[pick(pool.len())], pool[pick(pool.len())]);
        let (r, s) = (scalars[pick(3)], scalars[pick(3)]);
        let next = match pick(6) {
            0 => {
                let xr = bin(&mut g, BinaryOp::Mul, x, r);
                bin(&mut g, BinaryOp::Mul, s, xr)
            }
            1 => {
                let q = bin(&mut g, BinaryOp::Div, x, y);
                bin(&mut g, BinaryOp::Mul, q, s)
            }
            2 => {
                let q = bin(&mut g, BinaryOp::Div, y, r);
                let d = bin(&mut g, BinaryOp::Add, q, s);
                bin(&mut g, BinaryOp::Div, x, d)
            }
            3 => {
                let q = bin(&mut g, BinaryOp::Div, y, r);
                bin(&mut g, BinaryOp::Div, x, q)
            }
            4 => g.push(Op::Unary(UnaryOp::Sqrt), &[x], "t").unwrap(),
            _ => bin(&mut g, BinaryOp::Add, x, y),
        };
        pool.push(next);
    }
    let last = pool.len();
    g.set_output("out", pool[last - 1]).unwrap();
    g.set_output("mid", pool[last / 2]).unwrap();
    g
}

#[test]
fn random_scaled_graphs_keep_their_values() {
    let mut inputs = TensorMap::from([
        ("a".to_string(), drawn(&[256, 256], 1, 0.5, 1.5)),
        ("b".to_string(), drawn(&[256, 256], 2, 0.5, 1.5)),
        ("c".to_string(), drawn(&[4, 256, 256], 3, 0.5, 1.5)),
    ]);
    for (name, value) in [("r", 0.7), ("s", 1.3), ("t", 0.05)] {
        inputs.insert(name.into(), Tensor::f64(&[], vec![value]));
    }
    let mut fired = std::collections::BTreeMap::new();
    for seed in 0..24 {
        let g = random_scaled_graph(seed);
        let (o, report) = optimize(&g, Limits::default()).unwrap();
        let ctx = EvalContext::default();
        let want = run(&g, &inputs, &TensorMap::new(), ctx).unwrap();
        let got = run(&o, &inputs, &TensorMap::new(), ctx).unwrap();
        for (name, w) in &want {
            close(&got[name], w, &format!("graph {seed} {name}"));
        }
        for (rule, n) in report.fired {
            *fired.entry(rule).or_insert(0) += n;
        }
    }
    for rule in [
        "collect-scalar-factors",
        "common-denominator",
        "divide-by-quotient",
        "scale-numerator",
    ] {
        assert!(fired.contains_key(rule), "{rule} never fired: {fired:?}");
    }
}
