//! Tunable kernels: every matmul candidate computes what the reference does (plain,
//! transposed, broadcast batches, with an epilogue, summed over the batch), and tuning
//! picks one of the candidates and gives the fallback's results.

use altc_compiler::ir::{BinaryOp, DType, Graph, NodeId, Op, ReduceOp, UnaryOp};
use altc_compiler::reference::{run, EvalContext, Tensor, TensorMap};
use altc_compiler::rng;
use altc_compiler::spec::Precision;
use altc_kernels::MatmulStrategy;
use altc_runtime::backend::{Backend, TuningMode};
use altc_runtime::device::{open, DeviceChoice};
use std::collections::BTreeMap;

fn input(g: &mut Graph, feeds: &mut TensorMap, name: &str, shape: &[usize], stream: u64) -> NodeId {
    let n = shape.iter().product();
    feeds.insert(
        name.to_string(),
        Tensor::f32(
            shape,
            (0..n)
                .map(|i| (2.0 * rng::uniform(13, 0, stream, i as u64) - 1.0) as f32)
                .collect(),
        ),
    );
    g.push(
        Op::Input {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.iter().copied().collect(),
        },
        &[],
        "test",
    )
    .unwrap()
}

/// Matmuls of every planned form, with extents that are no tile multiple.
fn matmul_graph() -> (Graph, TensorMap) {
    let mut g = Graph::new("matmuls");
    let mut feeds = TensorMap::new();
    let x = input(&mut g, &mut feeds, "x", &[3, 19, 17], 1);
    let w = input(&mut g, &mut feeds, "w", &[17, 21], 2);
    let bias = input(&mut g, &mut feeds, "bias", &[21], 3);
    let wt = input(&mut g, &mut feeds, "wt", &[21, 17], 4);
    let dy = input(&mut g, &mut feeds, "dy", &[3, 19, 21], 5);
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
    let batched = push(&mut g, mm(true, false), &[x, dy]);
    let summed = push(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Sum,
            axes: vec![0],
            keep_dims: false,
        },
        &[batched],
    );
    for (name, id) in [
        ("plain", plain),
        ("transposed", transposed),
        ("epilogue", activated),
        ("summed", summed),
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

fn device() -> Option<Box<dyn Backend>> {
    // Tuning writes cubecl's persistent cache; keep it out of the source tree.
    static CACHE: std::sync::Once = std::sync::Once::new();
    CACHE.call_once(|| {
        use cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
        let dir = std::env::temp_dir().join(format!("altc-tuning-test-{}", std::process::id()));
        let mut config = CubeClRuntimeConfig::default();
        config.autotune.cache = CacheConfig::File(dir);
        CubeClRuntimeConfig::set(config);
    });
    match open(DeviceChoice::Wgpu, Precision::F32, true) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

#[test]
fn every_matmul_candidate_matches_the_reference_and_tuning_picks_one() {
    let Some(mut device) = device() else { return };
    let (g, feeds) = matmul_graph();
    let ctx = EvalContext { seed: 1, step: 0 };
    let want = run(&g, &feeds, &TensorMap::new(), ctx).unwrap();
    for candidate in MatmulStrategy::CANDIDATES {
        device.set_tuning(TuningMode::Force(candidate.name()));
        let got = device.run(&g, &feeds, ctx).unwrap();
        assert_close(&candidate.name(), &got, &want);
    }

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
    // Plain and transposed share a shape bucket; the epilogue and the batch sum differ.
    assert_eq!(decisions.len(), 3, "{decisions:?}");
    for d in &decisions {
        assert_eq!(d.key.family, "matmul");
        assert_eq!(
            d.candidates[0],
            MatmulStrategy::Tiled.name(),
            "fallback first"
        );
        assert!(d.candidates.contains(&d.winner), "{d:?}");
    }
}
