//! Fused kernels against the unfused device path and the reference interpreter, on
//! random elementwise graphs: broadcasting leaves, values used many times, dropout,
//! and reductions in between that split groups. Tolerance 1e-5 + 1e-4 relative.

use altc_compiler::fusion::KernelLimits;
use altc_compiler::ir::{
    BinaryOp, CompareOp, DType, Graph, NodeId, Op, ReduceOp, Scalar, Shape, UnaryOp,
};
use altc_compiler::reference::{run, EvalContext, Tensor, TensorMap};
use altc_compiler::rng;
use altc_runtime::backend::Backend;

mod common;
use common::{each_device, input, open_present, random_input, uniform};

/// On every device present: the fused backend and the unfused one (`--no-opt`).
fn fused_and_unfused() -> Vec<(Box<dyn Backend>, Box<dyn Backend>)> {
    each_device(true)
        .into_iter()
        .filter_map(|(choice, fused)| open_present(choice, false).map(|unfused| (fused, unfused)))
        .collect()
}

/// Runs `g` on the fused and the unfused device and checks every output against the
/// reference interpreter (1e-5 + 1e-4 relative).
fn every_output_matches_the_reference(
    g: &Graph,
    feeds: &TensorMap,
    devices: [&mut Box<dyn Backend>; 2],
) {
    let ctx = EvalContext { seed: 1, step: 0 };
    let want = run(g, feeds, &TensorMap::new(), ctx).unwrap();
    for (label, device) in ["fused", "unfused"].into_iter().zip(devices) {
        let got = device.run(g, feeds, ctx).unwrap();
        for (name, w) in &want {
            assert_eq!(got[name].shape, w.shape, "{label} {name}");
            for (a, b) in got[name].to_f64().iter().zip(w.to_f64()) {
                assert!(
                    (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                    "{label} {name}: {a} vs {b}"
                );
            }
        }
    }
}

struct Draw {
    stream: u64,
    next: u64,
}

impl Draw {
    fn pick(&mut self, n: usize) -> usize {
        self.next += 1;
        ((rng::uniform(17, 0, self.stream, self.next) * n as f64) as usize).min(n - 1)
    }
}

/// A random graph over inputs `a [4, 5]`, `b [5]`, `c [4, 1]` with several outputs.
fn random_graph(seed: u64) -> Graph {
    let mut d = Draw {
        stream: seed,
        next: 0,
    };
    let mut g = Graph::new(format!("random-{seed}"));
    let mut nodes: Vec<NodeId> = Vec::new();
    for (name, shape) in [("a", &[4, 5][..]), ("b", &[5]), ("c", &[4, 1])] {
        nodes.push(input(&mut g, name, shape));
    }
    nodes.push(
        g.push(
            Op::Constant {
                value: Scalar(0.5),
                dtype: DType::F32,
                shape: Shape::scalar(),
            },
            &[],
            "test",
        )
        .unwrap(),
    );
    let unary = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Square,
        UnaryOp::Gelu,
        UnaryOp::Silu,
        UnaryOp::Relu,
    ];
    let binary = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Max,
        BinaryOp::Min,
    ];
    for _ in 0..18 {
        let x = nodes[d.pick(nodes.len())];
        let y = nodes[d.pick(nodes.len())];
        let node = match d.pick(6) {
            0 | 1 => g.push(Op::Unary(unary[d.pick(unary.len())]), &[x], "test"),
            2 | 3 => g.push(Op::Binary(binary[d.pick(binary.len())]), &[x, y], "test"),
            4 => {
                let c = g.push(Op::Compare(CompareOp::Gt), &[x, y], "test").unwrap();
                g.push(Op::Where, &[c, x, y], "test")
            }
            _ => {
                let rank = g.node(x).ty.shape.rank();
                if rank == 2 && d.pick(2) == 0 {
                    g.push(Op::reduce(ReduceOp::Sum, &[1], true), &[x], "test")
                } else {
                    g.push(
                        Op::Dropout {
                            rate: Scalar(0.25),
                            stream: d.pick(1000) as u64,
                        },
                        &[x],
                        "test",
                    )
                }
            }
        };
        if let Ok(id) = node {
            nodes.push(id);
        }
    }
    let last = nodes.len();
    for (i, &id) in nodes[last - 3..].iter().enumerate() {
        g.set_output(format!("y{i}"), id).unwrap();
    }
    g.set_output("mid", nodes[last / 2]).unwrap();
    g
}

#[test]
fn fused_random_elementwise_graphs_match_unfused_and_reference() {
    for (mut fused, mut unfused) in fused_and_unfused() {
        let feeds = TensorMap::from([
            ("a".to_string(), uniform(&[4, 5], 3, 1)),
            ("b".to_string(), uniform(&[5], 3, 2)),
            ("c".to_string(), uniform(&[4, 1], 3, 3)),
        ]);
        let ctx = EvalContext { seed: 9, step: 4 };
        let mut fewer = 0;
        for seed in 0..24 {
            let g = random_graph(seed);
            let want = run(&g, &feeds, &TensorMap::new(), ctx).unwrap();
            let got_fused = fused.run(&g, &feeds, ctx).unwrap();
            let fused_launches = fused.kernel_launches().unwrap();
            let got_unfused = unfused.run(&g, &feeds, ctx).unwrap();
            if fused_launches < unfused.kernel_launches().unwrap() {
                fewer += 1;
            }
            for (name, w) in &want {
                for (label, got) in [("fused", &got_fused), ("unfused", &got_unfused)] {
                    let gv = got[name].to_f64();
                    for (i, (a, b)) in gv.iter().zip(w.to_f64()).enumerate() {
                        let ok =
                            (a - b).abs() <= 1e-5 + 1e-4 * b.abs() || (a.is_nan() && b.is_nan());
                        assert!(
                            ok,
                            "graph {seed} output {name}[{i}] {label}: {a} vs reference {b}"
                        );
                    }
                }
            }
        }
        assert!(
            fewer >= 20,
            "fusion saved launches in only {fewer} of 24 graphs"
        );
    }
}

/// Weight gradients: a batched `aᵀ b` summed over every batch dimension runs as one
/// kernel that accumulates across the batch, with a broadcast operand and with the
/// second operand transposed, and matches the reference.
#[test]
fn batch_summed_matmuls_run_as_one_kernel_and_match_reference() {
    for (mut fused, mut unfused) in fused_and_unfused() {
        let mut g = Graph::new("weight-gradients");
        // Activations [3, 2, 19, 17] and output gradients [3, 2, 19, 21]: K = 19 and the
        // 17 x 21 result are not tile multiples.
        let x = input(&mut g, "x", &[3, 2, 19, 17]);
        let dy = input(&mut g, "dy", &[3, 2, 19, 21]);
        let shared = input(&mut g, "shared", &[21, 19]);
        let sum_batch = |g: &mut Graph, a: NodeId, b: NodeId, transpose_b: bool| {
            let product = g
                .push(
                    Op::MatMul {
                        transpose_a: true,
                        transpose_b,
                    },
                    &[a, b],
                    "test",
                )
                .unwrap();
            g.push(
                Op::reduce(ReduceOp::Sum, &[0, 1], false),
                &[product],
                "test",
            )
            .unwrap()
        };
        let dw = sum_batch(&mut g, x, dy, false);
        let dw_shared = sum_batch(&mut g, x, shared, true);
        g.set_output("dw", dw).unwrap();
        g.set_output("dw_shared", dw_shared).unwrap();
        let plan = altc_compiler::fusion::plan(&g, KernelLimits::default());
        let sums = plan
            .schedule
            .iter()
            .filter(|s| matches!(s, altc_compiler::fusion::Step::MatmulSum { .. }))
            .count();
        assert_eq!(sums, 2, "both weight gradients fold into one kernel each");

        let feeds = TensorMap::from([
            ("x".to_string(), uniform(&[3, 2, 19, 17], 5, 1)),
            ("dy".to_string(), uniform(&[3, 2, 19, 21], 5, 2)),
            ("shared".to_string(), uniform(&[21, 19], 5, 3)),
        ]);
        let ctx = EvalContext { seed: 1, step: 0 };
        let want = run(&g, &feeds, &TensorMap::new(), ctx).unwrap();
        let got_fused = fused.run(&g, &feeds, ctx).unwrap();
        assert_eq!(fused.kernel_launches(), Some(2));
        let got_unfused = unfused.run(&g, &feeds, ctx).unwrap();
        assert_eq!(unfused.kernel_launches(), Some(4));
        for (name, w) in &want {
            assert_eq!(got_fused[name].shape, w.shape, "{name}");
            for (label, got) in [("fused", &got_fused), ("unfused", &got_unfused)] {
                for (i, (a, b)) in got[name].to_f64().iter().zip(w.to_f64()).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 + 1e-4 * b.abs(),
                        "{name}[{i}] {label}: {a} vs reference {b}"
                    );
                }
            }
        }
    }
}

/// An optimizer's bias correction of a moment `m` of `shape`: the step count and the
/// correction are scalars computed from a scalar input.
fn bias_correction(shape: &[usize]) -> Graph {
    let mut g = Graph::new("bias-correction");
    let constant = |g: &mut Graph, v: f64| {
        g.push(
            Op::Constant {
                value: Scalar(v),
                dtype: DType::F32,
                shape: Shape::scalar(),
            },
            &[],
            "test",
        )
        .unwrap()
    };
    let step = input(&mut g, "step", &[]);
    let m = input(&mut g, "m", shape);
    let one = constant(&mut g, 1.0);
    let beta = constant(&mut g, 0.9);
    let bin = |g: &mut Graph, op: BinaryOp, a: NodeId, b: NodeId| {
        g.push(Op::Binary(op), &[a, b], "test").unwrap()
    };
    let next = bin(&mut g, BinaryOp::Add, step, one);
    let power = bin(&mut g, BinaryOp::Pow, beta, next);
    let correction = bin(&mut g, BinaryOp::Sub, one, power);
    let corrected = bin(&mut g, BinaryOp::Div, m, correction);
    g.set_output("new.step", next).unwrap();
    g.set_output("m_hat", corrected).unwrap();
    g
}

/// Runs `bias_correction(shape)` fused and unfused: it matches the reference, the
/// new step count is written once, and the fused run takes `launches` kernels.
fn bias_correction_matches_the_reference(shape: &[usize], launches: usize) {
    for (mut fused, mut unfused) in fused_and_unfused() {
        let g = bias_correction(shape);
        let plan = altc_compiler::fusion::plan(&g, KernelLimits::default());
        assert_eq!(plan.launches(&g), launches, "{shape:?}");
        let feeds = TensorMap::from([
            ("step".to_string(), Tensor::f32(&[], vec![6.0])),
            ("m".to_string(), uniform(shape, 9, 1)),
        ]);
        let ctx = EvalContext { seed: 1, step: 0 };
        let want = run(&g, &feeds, &TensorMap::new(), ctx).unwrap();
        for (label, device) in [("fused", &mut fused), ("unfused", &mut unfused)] {
            let got = device.run(&g, &feeds, ctx).unwrap();
            for (a, b) in got["m_hat"].to_f64().iter().zip(want["m_hat"].to_f64()) {
                assert!(
                    (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                    "{label}: {a} vs {b}"
                );
            }
            // `new.` outputs stay on the device as state; commit and read them back.
            device.commit();
            let state = device.read_state();
            assert_eq!(state["step"].shape, Vec::<usize>::new(), "{label}");
            assert_eq!(state["step"].to_f64(), vec![7.0], "{label}");
        }
        assert_eq!(fused.kernel_launches(), Some(launches));
    }
}

/// A small tensor's update recomputes the scalars in every element: one kernel
/// computes both and writes the new count once.
#[test]
fn scalar_chains_run_inside_a_small_tensor_kernel_that_reads_them() {
    bias_correction_matches_the_reference(&[37, 5], 1);
}

/// A large tensor's update reads the scalars from a kernel of their own, which writes
/// the new count; the tensor kernel is then plain elementwise work.
#[test]
fn scalar_chains_of_a_large_tensor_run_apart() {
    bias_correction_matches_the_reference(&[256, 257], 2);
}

/// Squared norms of several tensors (gradient clipping) and whole-tensor maxima run
/// as one multi-tensor kernel per op, with a strided source; column sums of
/// same-shaped tensors (bias gradients) share one too; all match the reference.
#[test]
fn reductions_of_the_same_kind_share_one_kernel() {
    for (mut fused, mut unfused) in fused_and_unfused() {
        let mut g = Graph::new("norms");
        let shapes: [&[usize]; 4] = [&[37, 5], &[5], &[3, 7, 300], &[1]];
        let mut feeds = TensorMap::new();
        let mut terms = Vec::new();
        let mut maxima = Vec::new();
        for (i, shape) in shapes.iter().enumerate() {
            let mut x = random_input(&mut g, &mut feeds, &format!("g{i}"), shape, (21, i as u64));
            if shape.len() == 2 {
                // A transposed view stays out of the batches: their kernel reads
                // contiguously.
                x = g
                    .push(Op::Transpose { perm: vec![1, 0] }, &[x], "test")
                    .unwrap();
            }
            let all: Vec<usize> = (0..shape.len()).collect();
            let square = g.push(Op::Unary(UnaryOp::Square), &[x], "test").unwrap();
            let reduce = |op| Op::Reduce {
                op,
                axes: all.clone(),
                keep_dims: false,
            };
            terms.push(g.push(reduce(ReduceOp::Sum), &[square], "test").unwrap());
            maxima.push(g.push(reduce(ReduceOp::Max), &[x], "test").unwrap());
        }
        let mut columns = Vec::new();
        for i in 0..3u64 {
            let dy = random_input(&mut g, &mut feeds, &format!("dy{i}"), &[6, 50, 7], (22, i));
            let sum = Op::reduce(ReduceOp::Sum, &[2, 0], false);
            columns.push(g.push(sum, &[dy], "test").unwrap());
        }
        let add = |g: &mut Graph, a, b| g.push(Op::Binary(BinaryOp::Add), &[a, b], "test").unwrap();
        let total = |g: &mut Graph, parts: &[NodeId]| {
            parts[1..].iter().fold(parts[0], |acc, &t| add(g, acc, t))
        };
        let norm = total(&mut g, &terms);
        let largest = total(&mut g, &maxima);
        let column_total = total(&mut g, &columns);
        g.set_output("squared_norm", norm).unwrap();
        g.set_output("sum_of_maxima", largest).unwrap();
        g.set_output("column_total", column_total).unwrap();
        let plan = altc_compiler::fusion::plan(&g, KernelLimits::default());
        let mut sizes: Vec<usize> = plan
            .multi_reduces
            .iter()
            .map(|m| m.segments.len())
            .collect();
        sizes.sort_unstable();
        assert_eq!(
            sizes,
            [3, 3, 3],
            "one batch per kind, the strided tensor apart"
        );

        let ctx = EvalContext { seed: 1, step: 0 };
        let want = run(&g, &feeds, &TensorMap::new(), ctx).unwrap();
        for (label, device) in [("fused", &mut fused), ("unfused", &mut unfused)] {
            let got = device.run(&g, &feeds, ctx).unwrap();
            for name in ["squared_norm", "sum_of_maxima", "column_total"] {
                assert_eq!(got[name].shape, want[name].shape, "{label} {name}");
                for (a, b) in got[name].to_f64().iter().zip(want[name].to_f64()) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{label} {name}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// Optimizer-style updates of tensors of many sizes (a one-element tensor, ragged
/// lengths, one past a cube) with a shared learning rate and per-tensor step counts
/// run as one multi-tensor kernel; a tensor whose gradient is a transposed view stays
/// out; all match the reference and the unfused path.
#[test]
fn updates_of_many_tensors_share_one_kernel() {
    for (mut fused, mut unfused) in fused_and_unfused() {
        let mut g = Graph::new("multi-tensor-updates");
        let mut feeds = TensorMap::new();
        let lr = random_input(&mut g, &mut feeds, "lr", &[], (31, 0));
        let one = g
            .push(
                Op::Constant {
                    value: Scalar(1.0),
                    dtype: DType::F32,
                    shape: Shape::scalar(),
                },
                &[],
                "test",
            )
            .unwrap();
        let shapes: [&[usize]; 6] = [&[1], &[5], &[7, 3], &[2, 3, 43], &[257], &[7, 3]];
        for (i, shape) in shapes.iter().enumerate() {
            let salt = (32, i as u64);
            let p = random_input(&mut g, &mut feeds, &format!("p{i}"), shape, salt);
            let mut grad = if i == 5 {
                // The last gradient is a transposed view: not readable flat.
                let t = random_input(&mut g, &mut feeds, &format!("g{i}"), &[3, 7], salt);
                g.push(Op::Transpose { perm: vec![1, 0] }, &[t], "test")
                    .unwrap()
            } else {
                random_input(&mut g, &mut feeds, &format!("g{i}"), shape, salt)
            };
            let step = input(&mut g, &format!("s{i}"), &[]);
            feeds.insert(format!("s{i}"), Tensor::f32(&[], vec![i as f32]));
            let bin = |g: &mut Graph, op, a, b| g.push(Op::Binary(op), &[a, b], "test").unwrap();
            let next = bin(&mut g, BinaryOp::Add, step, one);
            let scale = bin(&mut g, BinaryOp::Div, lr, next);
            grad = g.push(Op::Unary(UnaryOp::Tanh), &[grad], "test").unwrap();
            let delta = bin(&mut g, BinaryOp::Mul, grad, scale);
            let updated = bin(&mut g, BinaryOp::Sub, p, delta);
            g.set_output(format!("p{i}"), updated).unwrap();
            g.set_output(format!("s{i}"), next).unwrap();
        }
        let plan = altc_compiler::fusion::plan(&g, KernelLimits::default());
        let batched: Vec<usize> = plan.multi_groups.iter().map(|m| m.groups.len()).collect();
        assert_eq!(
            batched,
            [5],
            "five tensors in one kernel, the transposed one apart"
        );
        assert_eq!(
            plan.multi_groups[0].shared.len(),
            1,
            "the learning rate is bound once"
        );

        every_output_matches_the_reference(&g, &feeds, [&mut fused, &mut unfused]);
        assert_eq!(
            fused.kernel_launches(),
            Some(2),
            "one batch and the transposed tensor"
        );
    }
}

/// A softmax over rows of 37 (not a cube multiple) is two kernels: the row maximum
/// with `exp(x - max)` as its epilogue, the row sum with the division. A gradient-like
/// row sum, reshaped and broadcast back over its rows before an elementwise use, is
/// one kernel too; a strided (transposed) operand is read in place. All match the
/// reference and the unfused path.
#[test]
fn row_reductions_run_with_their_elementwise_epilogue() {
    for (mut fused, mut unfused) in fused_and_unfused() {
        let mut g = Graph::new("row-epilogues");
        let mut feeds = TensorMap::new();
        let x = random_input(&mut g, &mut feeds, "x", &[3, 5, 37], (41, 0));
        let push =
            |g: &mut Graph, op: Op, operands: &[NodeId]| g.push(op, operands, "test").unwrap();
        let row = |op, keep_dims| Op::Reduce {
            op,
            axes: vec![2],
            keep_dims,
        };
        let max = push(&mut g, row(ReduceOp::Max, true), &[x]);
        let shifted = push(&mut g, Op::Binary(BinaryOp::Sub), &[x, max]);
        let e = push(&mut g, Op::Unary(UnaryOp::Exp), &[shifted]);
        let sum = push(&mut g, row(ReduceOp::Sum, true), &[e]);
        let softmax = push(&mut g, Op::Binary(BinaryOp::Div), &[e, sum]);
        g.set_output("softmax", softmax).unwrap();

        let t = random_input(&mut g, &mut feeds, "t", &[3, 37, 5], (41, 1));
        let dy = push(
            &mut g,
            Op::Transpose {
                perm: vec![0, 2, 1],
            },
            &[t],
        );
        let rows = push(&mut g, row(ReduceOp::Mean, false), &[dy]);
        let kept = push(
            &mut g,
            Op::Reshape {
                shape: [3, 5, 1].into_iter().collect(),
            },
            &[rows],
        );
        let spread = push(
            &mut g,
            Op::BroadcastTo {
                shape: [3, 5, 37].into_iter().collect(),
            },
            &[kept],
        );
        let centred = push(&mut g, Op::Binary(BinaryOp::Sub), &[dy, spread]);
        let scaled = push(&mut g, Op::Binary(BinaryOp::Mul), &[centred, x]);
        g.set_output("centred", scaled).unwrap();

        let plan = altc_compiler::fusion::plan(&g, KernelLimits::default());
        assert_eq!(plan.reduce_epilogues.len(), 3, "{:?}", plan.schedule);
        assert_eq!(plan.launches(&g), 3);

        every_output_matches_the_reference(&g, &feeds, [&mut fused, &mut unfused]);
        assert_eq!(fused.kernel_launches(), Some(3));
    }
}

/// LayerNorm over rows of 19: its per-row statistics (variance + eps, its inverse
/// square root) ride along the elementwise work that reads them, so the whole norm
/// is two kernels, each a row reduction with its epilogue. The inverse, also an
/// output (as autodiff saves it), is written once per row. A group that only reads
/// a row input writes its row values the same way. All match the reference.
#[test]
fn row_statistics_ride_along_the_elements_that_read_them() {
    for (mut fused, mut unfused) in fused_and_unfused() {
        let mut g = Graph::new("layer-norm");
        let mut feeds = TensorMap::new();
        let x = random_input(&mut g, &mut feeds, "x", &[3, 5, 19], (43, 0));
        let gamma = random_input(&mut g, &mut feeds, "gamma", &[19], (43, 1));
        let push =
            |g: &mut Graph, op: Op, operands: &[NodeId]| g.push(op, operands, "test").unwrap();
        let mean_of = |g: &mut Graph, v: NodeId| {
            g.push(Op::reduce(ReduceOp::Mean, &[2], true), &[v], "test")
                .unwrap()
        };
        let eps = push(
            &mut g,
            Op::Constant {
                value: Scalar(1e-5),
                dtype: DType::F32,
                shape: Shape::scalar(),
            },
            &[],
        );
        let mean = mean_of(&mut g, x);
        let centred = push(&mut g, Op::Binary(BinaryOp::Sub), &[x, mean]);
        let squared = push(&mut g, Op::Unary(UnaryOp::Square), &[centred]);
        let var = mean_of(&mut g, squared);
        let shifted = push(&mut g, Op::Binary(BinaryOp::Add), &[var, eps]);
        let inv = push(&mut g, Op::Unary(UnaryOp::Rsqrt), &[shifted]);
        let normed = push(&mut g, Op::Binary(BinaryOp::Mul), &[centred, inv]);
        let scaled = push(&mut g, Op::Binary(BinaryOp::Mul), &[normed, gamma]);
        g.set_output("y", scaled).unwrap();
        g.set_output("inv", inv).unwrap();

        let r = random_input(&mut g, &mut feeds, "r", &[3, 5, 1], (43, 2));
        let doubled = push(&mut g, Op::Binary(BinaryOp::Add), &[r, r]);
        let spread = push(&mut g, Op::Binary(BinaryOp::Mul), &[x, doubled]);
        g.set_output("doubled", doubled).unwrap();
        g.set_output("spread", spread).unwrap();

        let plan = altc_compiler::fusion::plan(&g, KernelLimits::default());
        assert_eq!(plan.reduce_epilogues.len(), 2, "{:?}", plan.schedule);
        assert_eq!(
            plan.launches(&g),
            3,
            "two for the norm, one for the row input"
        );

        every_output_matches_the_reference(&g, &feeds, [&mut fused, &mut unfused]);
        assert_eq!(fused.kernel_launches(), Some(3));
    }
}

/// A router: softmax over 6 experts, its top-3 and their probabilities. The shift is
/// a stop-gradient maximum, as lowered. The row sum is also read by a later step (as
/// the softmax's backward reads it), so the kernel writes it too. Rows with tied
/// logits check that ties go to the lower expert. Three kernels become two: the
/// maximum with `exp(x - max)`, then the sum with the division, the top-k and the
/// gather. All match the reference and the unfused path.
#[test]
fn a_router_is_its_softmax_kernels_with_the_top_k_inside() {
    for (mut fused, mut unfused) in fused_and_unfused() {
        let mut g = Graph::new("router");
        let mut feeds = TensorMap::new();
        let mut logits = uniform(&[4, 7, 6], 47, 0);
        if let altc_compiler::reference::Data::F32(v) = &mut logits.data {
            // Row 0: experts 1, 3 and 4 tie for the largest; row 1: all equal.
            v[..6].copy_from_slice(&[0.1, 0.9, -0.3, 0.9, 0.9, 0.2]);
            v[6..12].fill(0.25);
        }
        feeds.insert("logits".into(), logits);
        let x = input(&mut g, "logits", &[4, 7, 6]);
        let push =
            |g: &mut Graph, op: Op, operands: &[NodeId]| g.push(op, operands, "test").unwrap();
        let row = |op| Op::Reduce {
            op,
            axes: vec![2],
            keep_dims: true,
        };
        let max = push(&mut g, row(ReduceOp::Max), &[x]);
        let shift = push(&mut g, Op::StopGradient, &[max]);
        let shifted = push(&mut g, Op::Binary(BinaryOp::Sub), &[x, shift]);
        let e = push(&mut g, Op::Unary(UnaryOp::Exp), &[shifted]);
        let sum = push(&mut g, row(ReduceOp::Sum), &[e]);
        let probs = push(&mut g, Op::Binary(BinaryOp::Div), &[e, sum]);
        let top = push(&mut g, Op::TopK { k: 3 }, &[probs]);
        let kept = push(&mut g, Op::Gather { axis: 2 }, &[probs, top]);
        let later = push(&mut g, Op::Unary(UnaryOp::Log), &[sum]);
        for (name, id) in [
            ("probs", probs),
            ("top", top),
            ("kept", kept),
            ("log_sum", later),
        ] {
            g.set_output(name, id).unwrap();
        }

        let plan = altc_compiler::fusion::plan(&g, KernelLimits::default());
        let fused_top_k = plan.reduce_epilogues.iter().filter(|f| f.top_k.is_some());
        assert_eq!(fused_top_k.count(), 1, "{:?}", plan.schedule);
        assert!(plan.reduce_epilogues.iter().any(|f| f.write_reduced));

        let want = run(&g, &feeds, &TensorMap::new(), EvalContext::default()).unwrap();
        assert_eq!(want["top"].to_f64()[..6], [1.0, 3.0, 4.0, 0.0, 1.0, 2.0]);
        every_output_matches_the_reference(&g, &feeds, [&mut fused, &mut unfused]);
        assert_eq!(fused.kernel_launches(), Some(3), "two kernels and the log");
    }
}

/// Iotas are computed from each element's position inside the group that reads them:
/// a diagonal mask over `[5, 7]` (as InfoNCE builds its targets) and a coordinate
/// along the middle axis of `[2, 3, 4]` each take one kernel and no index buffer.
#[test]
fn iotas_join_the_group_that_reads_them() {
    for (mut fused, mut unfused) in fused_and_unfused() {
        let mut g = Graph::new("iotas");
        let mut feeds = TensorMap::new();
        let x = random_input(&mut g, &mut feeds, "x", &[5, 7], (53, 0));
        let y = random_input(&mut g, &mut feeds, "y", &[2, 3, 4], (53, 1));
        let push =
            |g: &mut Graph, op: Op, operands: &[NodeId]| g.push(op, operands, "test").unwrap();
        let iota = |g: &mut Graph, shape: &[usize], axis| {
            let op = Op::Iota {
                axis,
                dtype: DType::I32,
                shape: shape.iter().copied().collect(),
            };
            g.push(op, &[], "test").unwrap()
        };
        let rows = iota(&mut g, &[5, 7], 0);
        let columns = iota(&mut g, &[5, 7], 1);
        let diagonal = push(&mut g, Op::Compare(CompareOp::Eq), &[rows, columns]);
        let mask = push(&mut g, Op::Cast { dtype: DType::F32 }, &[diagonal]);
        let masked = push(&mut g, Op::Binary(BinaryOp::Mul), &[mask, x]);
        let middle = iota(&mut g, &[2, 3, 4], 1);
        let index = push(&mut g, Op::Cast { dtype: DType::F32 }, &[middle]);
        let scaled = push(&mut g, Op::Binary(BinaryOp::Mul), &[index, y]);
        g.set_output("masked", masked).unwrap();
        g.set_output("scaled", scaled).unwrap();

        let plan = altc_compiler::fusion::plan(&g, KernelLimits::default());
        assert_eq!(plan.launches(&g), 2, "{:?}", plan.schedule);
        every_output_matches_the_reference(&g, &feeds, [&mut fused, &mut unfused]);
        assert_eq!(fused.kernel_launches(), Some(2));
    }
}

/// A row sum broadcast the NumPy way, right-aligned, varies along the rows instead of
/// across them (`[6]` over `[6, 6]`): not a row's value, so it is no epilogue, and
/// the result still matches the reference.
#[test]
fn a_row_sum_broadcast_across_the_rows_is_not_an_epilogue() {
    for (mut fused, mut unfused) in fused_and_unfused() {
        let mut g = Graph::new("crosswise");
        let mut feeds = TensorMap::new();
        let x = random_input(&mut g, &mut feeds, "x", &[6, 6], (59, 0));
        let push =
            |g: &mut Graph, op: Op, operands: &[NodeId]| g.push(op, operands, "test").unwrap();
        let sums = push(&mut g, Op::reduce(ReduceOp::Sum, &[1], false), &[x]);
        let spread = push(
            &mut g,
            Op::BroadcastTo {
                shape: [6, 6].into_iter().collect(),
            },
            &[sums],
        );
        let scaled = push(&mut g, Op::Binary(BinaryOp::Mul), &[spread, x]);
        g.set_output("scaled", scaled).unwrap();
        let plan = altc_compiler::fusion::plan(&g, KernelLimits::default());
        assert!(plan.reduce_epilogues.is_empty(), "{:?}", plan.schedule);
        every_output_matches_the_reference(&g, &feeds, [&mut fused, &mut unfused]);
    }
}

/// Matmuls that share an operand run as one kernel: the query, key and value
/// projections of one input with their biases, their three weight gradients summed
/// over the batch, and one weight applied to two inputs. A projection with another
/// epilogue stays on its own. Extents are no tile multiples; every result matches the
/// reference.
#[test]
fn matmuls_sharing_an_operand_run_as_one_kernel() {
    use altc_compiler::fusion::{SharedOperand, Step};
    for (mut fused, mut unfused) in fused_and_unfused() {
        let mut g = Graph::new("projections");
        let mut feeds = TensorMap::new();
        let mut next = 0;
        let mut leaf = |g: &mut Graph, name: &str, shape: &[usize]| {
            next += 1;
            random_input(g, &mut feeds, name, shape, (23, next))
        };
        let x = leaf(&mut g, "x", &[2, 7, 19]);
        let push =
            |g: &mut Graph, op: Op, operands: &[NodeId]| g.push(op, operands, "test").unwrap();
        let matmul = |transpose_a| Op::MatMul {
            transpose_a,
            transpose_b: false,
        };
        for name in ["query", "key", "value"] {
            let w = leaf(&mut g, &format!("{name}.weight"), &[19, 21]);
            let b = leaf(&mut g, &format!("{name}.bias"), &[21]);
            let product = push(&mut g, matmul(false), &[x, w]);
            let projected = push(&mut g, Op::Binary(BinaryOp::Add), &[product, b]);
            g.set_output(name, projected).unwrap();
            let dy = leaf(&mut g, &format!("{name}.grad"), &[2, 7, 21]);
            let batched = push(&mut g, matmul(true), &[x, dy]);
            let summed = push(&mut g, Op::reduce(ReduceOp::Sum, &[0], false), &[batched]);
            g.set_output(format!("{name}.weight_grad"), summed).unwrap();
        }
        let w_scaled = leaf(&mut g, "scaled.weight", &[19, 21]);
        let product = push(&mut g, matmul(false), &[x, w_scaled]);
        let scaled = push(&mut g, Op::Binary(BinaryOp::Mul), &[product, product]);
        g.set_output("scaled", scaled).unwrap();
        let router = leaf(&mut g, "router", &[19, 5]);
        for branch in ["left", "right"] {
            let input = leaf(&mut g, branch, &[2, 7, 19]);
            let logits = push(&mut g, matmul(false), &[input, router]);
            g.set_output(format!("{branch}.logits"), logits).unwrap();
        }

        let plan = altc_compiler::fusion::plan(&g, KernelLimits::default());
        let mut batches: Vec<(usize, SharedOperand, &str)> = plan
            .multi_matmuls
            .iter()
            .map(|batch| {
                let kind = match batch.members[0] {
                    Step::Node(_) => "plain",
                    Step::MatmulGroup { .. } => "epilogue",
                    Step::MatmulSum { .. } => "summed",
                    _ => "other",
                };
                (batch.members.len(), batch.shared, kind)
            })
            .collect();
        batches.sort_by_key(|b| b.2);
        assert_eq!(
            batches,
            [
                (3, SharedOperand::Left, "epilogue"),
                (2, SharedOperand::Right, "plain"),
                (3, SharedOperand::Left, "summed"),
            ]
        );
        assert_eq!(
            plan.launches(&g),
            4,
            "three merged launches and the squared one"
        );
        every_output_matches_the_reference(&g, &feeds, [&mut fused, &mut unfused]);
        fused
            .run(&g, &feeds, EvalContext { seed: 1, step: 0 })
            .unwrap();
        assert_eq!(fused.kernel_launches(), Some(4));
    }
}

/// The optimizer step alone (clipping, then AdamW) over large and small parameters,
/// optimised and fused as `altc` compiles it: the large updates collect their scalar
/// factors and read their bias corrections from a scalar kernel, the small ones
/// recompute them. Every new parameter, moment and step count, and the gradient
/// norm, match the reference running the step as built.
#[test]
fn an_optimizer_step_matches_the_reference_at_every_size() {
    use altc_compiler::lower::{Init, ParamInfo, ParamKind};
    use altc_compiler::train;
    for (mut fused, _) in fused_and_unfused() {
        let loaded = altc_compiler::spec::parse(
            include_str!("../../models/alt_moe_tiny.ron"),
            "alt_moe_tiny.ron",
        )
        .unwrap();
        let sizes: [(&[usize], bool); 4] = [
            (&[256, 257], true),
            (&[65536], false),
            (&[16, 16], true),
            (&[300], false),
        ];
        let params: Vec<ParamInfo> = sizes
            .iter()
            .enumerate()
            .map(|(i, (shape, decay))| ParamInfo {
                name: format!("p{i}"),
                shape: shape.to_vec(),
                kind: ParamKind::Weight,
                init: Init::Zeros,
                trainable: true,
                decay: *decay,
                origin: "test".into(),
            })
            .collect();
        let graph = train::optimizer_step(&loaded.spec.optimizer, &params, DType::F32).unwrap();
        let (optimised, report) =
            altc_compiler::optimize::optimize(&graph, altc_compiler::optimize::Limits::default())
                .unwrap();
        assert!(report.fired.contains_key("collect-scalar-factors"));
        // The plan: large updates carry no scalars, small ones recompute theirs.
        let plan = altc_compiler::fusion::plan(&optimised, KernelLimits::default());
        for p in &params {
            let update = optimised.output(&train::updated(&p.name)).unwrap();
            let group = plan.group_of(update).expect("an update is a fused group");
            let large = p.numel() >= altc_compiler::fusion::SCALARS_APART_FROM;
            assert_eq!(group.carries_scalars(&optimised), !large, "{}", p.name);
        }

        let mut state = TensorMap::new();
        let mut feeds = TensorMap::from([
            (train::LR_INPUT.to_string(), Tensor::f32(&[], vec![1.5e-3])),
            (
                train::WEIGHT_DECAY_INPUT.to_string(),
                Tensor::f32(&[], vec![0.05]),
            ),
        ]);
        // Moments as after a few steps: second moments bounded away from zero, so the
        // update stays well conditioned in f32.
        let scaled = |t: Tensor, scale: f64, shift: f64| {
            let values = t
                .to_f64()
                .iter()
                .map(|v| (v * scale + shift) as f32)
                .collect();
            Tensor::f32(&t.shape, values)
        };
        for (i, p) in params.iter().enumerate() {
            let s = 4 * i as u64;
            state.insert(p.name.clone(), uniform(&p.shape, 41, s));
            let m = uniform(&p.shape, 41, s + 1);
            state.insert(train::first_moment(&p.name), scaled(m, 0.01, 0.0));
            let v = uniform(&p.shape, 41, s + 2);
            state.insert(train::second_moment(&p.name), scaled(v, 4e-5, 6e-5));
            state.insert(
                train::step_count(&p.name),
                Tensor::f32(&[], vec![i as f32 + 2.0]),
            );
            let grad = uniform(&p.shape, 41, s + 3);
            feeds.insert(train::gradient(&p.name), scaled(grad, 0.02, 0.0));
        }
        let ctx = EvalContext { seed: 1, step: 0 };
        let want = run(&graph, &feeds, &state, ctx).unwrap();
        fused.load_state(&state).unwrap();
        let got = fused.run(&optimised, &feeds, ctx).unwrap();
        fused.commit();
        let updated = fused.read_state();
        for (name, w) in &want {
            let g = match name.strip_prefix("new.") {
                Some(state_name) => &updated[state_name],
                None => &got[name],
            };
            assert_eq!(g.shape, w.shape, "{name}");
            // A parameter moves by about lr per step, far less than its value: compare
            // the moves, to the f32 rounding of the values they come from.
            let parameter = params.iter().any(|p| format!("new.{}", p.name) == *name);
            let (g, w) = if parameter {
                let old = state[&name["new.".len()..]].to_f64();
                let moved = |t: &Tensor| -> Vec<f64> {
                    t.to_f64().iter().zip(&old).map(|(n, o)| o - n).collect()
                };
                (moved(g), moved(w))
            } else {
                (g.to_f64(), w.to_f64())
            };
            let (floor, relative) = if parameter {
                (2.5e-7, 1e-3)
            } else {
                (1e-8, 1e-4)
            };
            for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                assert!(
                    (a - b).abs() <= floor + relative * b.abs(),
                    "{name}[{i}]: device {a}, reference {b}"
                );
            }
        }
    }
}
