//! The e-graph optimiser: optimised graphs compute what the originals compute (the
//! tiny model's training graphs, and random graphs built to give every rule something
//! to do), saturation ends within its limits, and the rules fire.

use altc_compiler::ir::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, Scalar, Shape, UnaryOp};
use altc_compiler::lower::{lower, LowerOptions, Mode};
use altc_compiler::optimize::{optimize, Limits};
use altc_compiler::reference::{initial_parameters, run, EvalContext, Tensor, TensorMap};
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
            let mask = (0..b * m.tokens)
                .map(|i| {
                    if i % m.tokens <= i / m.tokens {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            inputs.insert(
                format!("{}.mask", m.name),
                Tensor::f64(&[b, m.tokens], mask),
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
    let x = g
        .push(
            Op::Input {
                name: "x".into(),
                dtype: DType::F64,
                shape: shape![3, 4],
            },
            &[],
            "t",
        )
        .unwrap();
    let y = g
        .push(
            Op::Input {
                name: "y".into(),
                dtype: DType::F64,
                shape: shape![4],
            },
            &[],
            "t",
        )
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
                g.push(
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        axes: vec![0, 1],
                        keep_dims: false,
                    },
                    &[twice],
                    "t",
                )
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
