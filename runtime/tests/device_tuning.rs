//! Tunable kernels: every candidate of every tunable family computes what the
//! reference does (matmuls plain, transposed, two with one epilogue sharing an
//! operand, and summed over the batch; grouped expert matmuls with empty experts, and
//! their weight gradient;
//! reductions plain, with a fused prologue and with a fused epilogue; fused
//! elementwise chains, alone and over several tensors), and tuning picks one of the
//! candidates and gives the fallback's results.

use altc_compiler::ir::{
    BinaryOp, BuildGraph, CompareOp, DType, Graph, GraphBuilder, NodeId, Op, ReduceOp, UnaryOp,
};
use altc_compiler::reference::{run, EvalContext, Tensor, TensorMap};
use altc_kernels::{
    Candidate, ElementwiseStrategy, EpilogueMatmul, ExpertGradStrategy, ReduceStrategy,
};
use altc_runtime::backend::{Backend, TuningMode};
use std::collections::BTreeMap;

mod common;

/// A graph input fed random values of this file's stream family.
fn input(g: &mut Graph, feeds: &mut TensorMap, name: &str, shape: &[usize], stream: u64) -> NodeId {
    common::random_input(g, feeds, name, shape, (13, stream))
}

/// A kernel of every tunable form, with extents that are no tile or cube multiple.
/// `draw` picks the random inputs, so each run's results differ from the last.
fn tunable_graph(draw: u64) -> (Graph, TensorMap) {
    let mut g = Graph::new("tunables");
    let mut feeds = TensorMap::new();
    let x = input(&mut g, &mut feeds, "x", &[3, 19, 17], 1 + 16 * draw);
    let w = input(&mut g, &mut feeds, "w", &[17, 21], 2 + 16 * draw);
    let bias = input(&mut g, &mut feeds, "bias", &[21], 3 + 16 * draw);
    let wt = input(&mut g, &mut feeds, "wt", &[21, 17], 4 + 16 * draw);
    let dy = input(&mut g, &mut feeds, "dy", &[3, 19, 21], 5 + 16 * draw);
    let w2 = input(&mut g, &mut feeds, "w2", &[17, 21], 6 + 16 * draw);
    let push = |g: &mut Graph, op: Op, operands: &[NodeId]| g.push(op, operands, "test").unwrap();
    let mm = |ta, tb| Op::MatMul {
        transpose_a: ta,
        transpose_b: tb,
    };
    let plain = push(&mut g, mm(false, false), &[x, w]);
    let transposed = push(&mut g, mm(false, true), &[x, wt]);
    let product = push(&mut g, mm(false, false), &[x, w]);
    let biased = push(&mut g, Op::Binary(BinaryOp::Add), &[product, bias]);
    let activated = push(&mut g, Op::Unary(UnaryOp::Relu), &[biased]);
    // A second projection of `x` with the same epilogue: both run as one kernel.
    let product2 = push(&mut g, mm(false, false), &[x, w2]);
    let biased2 = push(&mut g, Op::Binary(BinaryOp::Add), &[product2, bias]);
    let activated2 = push(&mut g, Op::Unary(UnaryOp::Relu), &[biased2]);
    let batched = push(&mut g, mm(true, false), &[x, dy]);
    let summed = push(&mut g, Op::reduce(ReduceOp::Sum, &[0], false), &[batched]);
    // A fused chain written out, and one that only feeds a reduction (its prologue).
    let exp = push(&mut g, Op::Unary(UnaryOp::Exp), &[x]);
    let chain = push(&mut g, Op::Binary(BinaryOp::Mul), &[exp, x]);
    // One program over two tensors of different sizes: a multi-tensor kernel.
    let damped: Vec<NodeId> = [w, bias]
        .into_iter()
        .map(|t| {
            let tanh = push(&mut g, Op::Unary(UnaryOp::Tanh), &[t]);
            push(&mut g, Op::Binary(BinaryOp::Sub), &[tanh, t])
        })
        .collect();
    // Chains whose inputs are whole vectors of 4 or one value, alone and over two
    // tensors: the vectorised candidate reads them in vectors.
    let v = input(&mut g, &mut feeds, "v", &[3, 4, 20], 10 + 16 * draw);
    let scale = input(&mut g, &mut feeds, "scale", &[], 11 + 16 * draw);
    let one = push(
        &mut g,
        Op::Constant {
            value: altc_compiler::ir::Scalar(1.0),
            dtype: DType::F32,
            shape: altc_compiler::ir::Shape::scalar(),
        },
        &[],
    );
    let unary = |g: &mut Graph, op, x| g.push(Op::Unary(op), &[x], "test").unwrap();
    let binary = |g: &mut Graph, op, a, b| g.push(Op::Binary(op), &[a, b], "test").unwrap();
    let scaled = binary(&mut g, BinaryOp::Mul, v, scale);
    let squashed = unary(&mut g, UnaryOp::Tanh, scaled);
    let gate = unary(&mut g, UnaryOp::Sigmoid, v);
    let larger = binary(&mut g, BinaryOp::Max, squashed, gate);
    let smaller = binary(&mut g, BinaryOp::Min, squashed, gate);
    let gelu = unary(&mut g, UnaryOp::Gelu, v);
    let sum = binary(&mut g, BinaryOp::Add, larger, gelu);
    let magnitude = unary(&mut g, UnaryOp::Abs, v);
    let root = unary(&mut g, UnaryOp::Sqrt, magnitude);
    let denominator = binary(&mut g, BinaryOp::Add, root, one);
    let ratio = binary(&mut g, BinaryOp::Div, sum, denominator);
    let positive = g
        .push(Op::Compare(CompareOp::Gt), &[v, smaller], "test")
        .unwrap();
    let relu = unary(&mut g, UnaryOp::Relu, scaled);
    let vector_chain = g.push(Op::Where, &[positive, ratio, relu], "test").unwrap();
    let u = input(&mut g, &mut feeds, "u", &[8, 12], 12 + 16 * draw);
    let t = input(&mut g, &mut feeds, "t", &[20], 13 + 16 * draw);
    let stepped: Vec<NodeId> = [u, t]
        .into_iter()
        .map(|x| {
            let exp = unary(&mut g, UnaryOp::Exp, x);
            let step = binary(&mut g, BinaryOp::Mul, exp, scale);
            binary(&mut g, BinaryOp::Sub, x, step)
        })
        .collect();
    // A row sum with its elementwise epilogue: x / sum(x) over rows of 17.
    let row_sum = push(&mut g, Op::reduce(ReduceOp::Sum, &[2], true), &[x]);
    let normalised = push(&mut g, Op::Binary(BinaryOp::Div), &[x, row_sum]);
    let square = push(&mut g, Op::Binary(BinaryOp::Mul), &[dy, dy]);
    let row_max = push(&mut g, Op::reduce(ReduceOp::Max, &[2], false), &[square]);
    let column_sums = push(&mut g, Op::reduce(ReduceOp::Sum, &[0, 1], false), &[x]);
    let mean = push(&mut g, Op::reduce(ReduceOp::Mean, &[0, 1, 2], false), &[dy]);
    // Grouped expert matmuls, 37 tokens x 2 slots over 5 experts of which 1 and 4
    // receive nothing.
    let routing: Vec<f64> = (0..74u64)
        .map(|i| [3.0, 0.0, 2.0, 3.0][(i % 4) as usize])
        .collect();
    feeds.insert(
        "index".into(),
        Tensor::from_f64(DType::I32, &[37, 2], routing),
    );
    let index = GraphBuilder::new(&mut g, "test")
        .input("index", DType::I32, [37, 2].into_iter().collect())
        .unwrap();
    let tokens = input(&mut g, &mut feeds, "tokens", &[37, 19], 6 + 16 * draw);
    let experts_w = input(&mut g, &mut feeds, "experts_w", &[5, 19, 21], 7 + 16 * draw);
    let experts_b = input(&mut g, &mut feeds, "experts_b", &[5, 21], 8 + 16 * draw);
    let slots = input(&mut g, &mut feeds, "slots", &[37, 2, 21], 9 + 16 * draw);
    let order = push(&mut g, Op::ExpertOrder { experts: 5 }, &[index]);
    let offsets = push(&mut g, Op::ExpertOffsets { experts: 5 }, &[index]);
    let expert_out = push(
        &mut g,
        Op::ExpertMatMul {
            transpose_w: false,
            bias: true,
        },
        &[tokens, experts_w, experts_b, order, offsets],
    );
    let expert_back = push(
        &mut g,
        Op::ExpertMatMul {
            transpose_w: true,
            bias: false,
        },
        &[slots, experts_w, order, offsets],
    );
    // Their weight gradient: per expert, the sum over its assignments of the token
    // row's outer product with the slot's output gradient.
    let expert_grad = push(
        &mut g,
        Op::ExpertWeightGrad,
        &[tokens, slots, order, offsets],
    );
    for (name, id) in [
        ("expert", expert_out),
        ("expert_grad", expert_grad),
        ("expert_transposed", expert_back),
        ("plain", plain),
        ("transposed", transposed),
        ("epilogue", activated),
        ("epilogue_shared_operand", activated2),
        ("summed", summed),
        ("chain", chain),
        ("normalised", normalised),
        ("damped_w", damped[0]),
        ("damped_bias", damped[1]),
        ("vector_chain", vector_chain),
        ("stepped_u", stepped[0]),
        ("stepped_t", stepped[1]),
        ("row_max", row_max),
        ("column_sums", column_sums),
        ("mean", mean),
    ] {
        g.set_output(name, id).unwrap();
    }
    (g, feeds)
}

fn assert_close(label: &str, got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) {
    for (name, w) in want {
        assert_eq!(got[name].shape, w.shape, "{label} {name}");
        for (i, (a, b)) in got[name].to_f64().iter().zip(w.to_f64()).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 + 1e-4 * b.abs(),
                "{label} {name}[{i}]: {a} vs {b}"
            );
        }
    }
}

/// Every device present (see `common::each_device`), with cubecl's tuning cache out
/// of the source tree.
fn devices() -> Vec<Box<dyn Backend>> {
    static CACHE: std::sync::Once = std::sync::Once::new();
    CACHE.call_once(|| {
        use cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
        let dir = std::env::temp_dir().join(format!("altc-tuning-test-{}", std::process::id()));
        let mut config = CubeClRuntimeConfig::default();
        config.autotune.cache = CacheConfig::File(dir);
        CubeClRuntimeConfig::set(config);
    });
    common::each_device(true)
        .into_iter()
        .map(|(_, device)| device)
        .collect()
}

#[test]
fn every_candidate_matches_the_reference_and_tuning_picks_one() {
    for mut device in devices() {
        let ctx = EvalContext { seed: 1, step: 0 };
        let names = EpilogueMatmul::ALL
            .iter()
            .map(Candidate::name)
            .chain(ExpertGradStrategy::ALL.iter().map(Candidate::name))
            .chain(ReduceStrategy::ALL.iter().map(Candidate::name))
            .chain(ElementwiseStrategy::ALL.iter().map(Candidate::name));
        // Fresh inputs per candidate: a kernel that failed to run cannot pass on a
        // buffer the previous candidate left with the same results.
        for (draw, name) in names.enumerate() {
            let (g, feeds) = tunable_graph(draw as u64 + 1);
            let want = run(&g, &feeds, &TensorMap::new(), ctx).unwrap();
            device.set_tuning(TuningMode::Force(name.clone()));
            let got = device.run(&g, &feeds, ctx).unwrap();
            assert_close(&name, &got, &want);
        }
        let (g, feeds) = tunable_graph(0);

        device.set_tuning(TuningMode::Untuned);
        let fallback = device.run(&g, &feeds, ctx).unwrap();
        assert!(
            device.tuned_kernels().is_empty(),
            "untuned runs tune nothing"
        );
        device.set_tuning(TuningMode::Tune);
        let tuned = device.run(&g, &feeds, ctx).unwrap();
        assert_close("tuned vs fallback", &tuned, &fallback);
        let decisions = device.tuned_kernels();
        let of = |family: &str| decisions.iter().filter(|d| d.key.family == family).count();
        // Plain and transposed share a shape bucket; the two with an epilogue (one
        // launch) and the batch sum differ.
        assert_eq!(of("matmul"), 3, "{decisions:?}");
        assert_eq!(of("reduce"), 4, "{decisions:?}");
        assert_eq!(of("fused elementwise"), 2, "{decisions:?}");
        assert_eq!(of("multi-tensor elementwise"), 2, "{decisions:?}");
        assert_eq!(of("grouped expert matmul"), 2, "{decisions:?}");
        assert_eq!(of("expert weight gradient"), 1, "{decisions:?}");
        for d in &decisions {
            assert_eq!(
                d.candidates,
                altc_kernels::candidates(&d.key.family),
                "{d:?}"
            );
            assert!(d.candidates.contains(&d.winner), "{d:?}");
        }
    }
}

/// The vectorised elementwise candidate keeps the reference's NaN semantics: max,
/// min and relu of a NaN are NaN, lane by lane, whichever operand holds it.
#[test]
fn vectorised_kernels_propagate_nan_like_the_reference() {
    for mut device in devices() {
        let vectorised = ElementwiseStrategy::ALL
            .iter()
            .find(|s| s.vector > 1)
            .expect("a vectorised candidate");
        device.set_tuning(TuningMode::Force(vectorised.name()));
        let mut g = Graph::new("vector-nan");
        let mut feeds = TensorMap::new();
        let nan = f32::NAN;
        let x: Vec<f32> = vec![
            1.0, nan, -2.0, 0.5, 0.25, -1.0, nan, 3.0, -0.5, 2.0, nan, nan, 0.0, -3.0, 1.5, -0.25,
        ];
        let y: Vec<f32> = vec![
            nan, 0.0, 1.0, nan, -1.0, 2.0, 0.5, nan, 0.0, -2.0, 1.0, nan, nan, 4.0, -1.5, 0.25,
        ];
        let mut leaf = |g: &mut Graph, name: &str, values: Vec<f32>| {
            feeds.insert(name.to_string(), Tensor::f32(&[4, 4], values));
            GraphBuilder::new(g, "test")
                .input(name, DType::F32, [4, 4].into_iter().collect())
                .unwrap()
        };
        let (a, b) = (leaf(&mut g, "x", x), leaf(&mut g, "y", y));
        let push =
            |g: &mut Graph, op: Op, operands: &[NodeId]| g.push(op, operands, "test").unwrap();
        let larger = push(&mut g, Op::Binary(BinaryOp::Max), &[a, b]);
        let smaller = push(&mut g, Op::Binary(BinaryOp::Min), &[a, b]);
        let relu = push(&mut g, Op::Unary(UnaryOp::Relu), &[a]);
        for (name, id) in [("max", larger), ("min", smaller), ("relu", relu)] {
            g.set_output(name, id).unwrap();
        }
        let ctx = EvalContext { seed: 1, step: 0 };
        let want = run(&g, &feeds, &TensorMap::new(), ctx).unwrap();
        let got = device.run(&g, &feeds, ctx).unwrap();
        for (name, w) in &want {
            for (i, (a, b)) in got[name].to_f64().iter().zip(w.to_f64()).enumerate() {
                assert!(
                    a.is_nan() == b.is_nan() && (a.is_nan() || a == &b),
                    "{name}[{i}]: vectorised {a}, reference {b}"
                );
            }
        }
    }
}

/// A matmul whose tuned form runs its epilogue as a kernel of its own launches two
/// kernels for its one planned step, and the device counts both.
#[test]
fn an_epilogue_run_apart_counts_as_its_own_launch() {
    for mut device in devices() {
        let apart = EpilogueMatmul::ALL
            .iter()
            .find(|c| !c.fused)
            .expect("a candidate with the epilogue apart");
        let mut g = Graph::new("epilogue-apart");
        let mut feeds = TensorMap::new();
        let x = input(&mut g, &mut feeds, "x", &[3, 19, 17], 90);
        let w = input(&mut g, &mut feeds, "w", &[17, 21], 91);
        let bias = input(&mut g, &mut feeds, "bias", &[21], 92);
        let push =
            |g: &mut Graph, op: Op, operands: &[NodeId]| g.push(op, operands, "test").unwrap();
        let product = push(&mut g, Op::matmul(false, false), &[x, w]);
        let biased = push(&mut g, Op::Binary(BinaryOp::Add), &[product, bias]);
        let activated = push(&mut g, Op::Unary(UnaryOp::Relu), &[biased]);
        g.set_output("y", activated).unwrap();
        let ctx = EvalContext { seed: 1, step: 0 };
        let want = run(&g, &feeds, &TensorMap::new(), ctx).unwrap();
        device.set_tuning(TuningMode::Untuned);
        device.run(&g, &feeds, ctx).unwrap();
        assert_eq!(device.kernel_launches(), Some(1), "one planned kernel");
        device.set_tuning(TuningMode::Force(apart.name()));
        let got = device.run(&g, &feeds, ctx).unwrap();
        assert_close(&apart.name(), &got, &want);
        assert_eq!(
            device.kernel_launches(),
            Some(2),
            "the product, then the epilogue"
        );
    }
}
