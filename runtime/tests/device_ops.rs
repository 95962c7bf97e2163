//! Differential tests: every op family on the wgpu device (lavapipe in CI) against
//! the reference interpreter, on random inputs and awkward shapes (sizes that are not
//! multiples of any tile or plane, size 1, experts that receive no tokens). Tolerance:
//! |device - reference| <= 1e-5 + 1e-4 |reference| (f32 on both sides; transcendental
//! functions differ in their last bits between libm and the GPU's).

use altc_compiler::ir::{
    BinaryOp, BuildGraph, CompareOp, DType, Graph, GraphBuilder, NodeId, Op, ReduceOp, Scalar,
    Shape, UnaryOp,
};
use altc_compiler::reference::{run, EvalContext, Tensor, TensorMap};
use altc_compiler::spec::Precision;
use altc_compiler::{rng, shape};
use altc_runtime::backend::Backend;
use altc_runtime::device::{open, DeviceChoice};
mod common;
use common::on_each_device;

fn random(shape: &[usize], stream: u64, lo: f64, hi: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::f32(
        shape,
        (0..n)
            .map(|i| (lo + (hi - lo) * rng::uniform(11, 0, stream, i as u64)) as f32)
            .collect(),
    )
}

/// Builds a graph with one input per tensor (`x0`, `x1`, ...), applies `build`, and
/// compares the device with the reference on output `y`.
fn check(name: &str, inputs: Vec<Tensor>, build: impl FnOnce(&mut Graph, &[NodeId]) -> NodeId) {
    let mut g = Graph::new(name);
    let mut feeds = TensorMap::new();
    let mut leaves = Vec::new();
    for (i, t) in inputs.into_iter().enumerate() {
        let shape: Shape = t.shape.iter().copied().collect();
        leaves.push(
            GraphBuilder::new(&mut g, "test")
                .input(&format!("x{i}"), t.dtype(), shape)
                .unwrap(),
        );
        feeds.insert(format!("x{i}"), t);
    }
    let y = build(&mut g, &leaves);
    g.set_output("y", y).unwrap();
    let ctx = EvalContext { seed: 5, step: 9 };
    let want = run(&g, &feeds, &TensorMap::new(), ctx).unwrap()["y"].clone();
    on_each_device(|device| {
        let got = device.run(&g, &feeds, ctx).unwrap()["y"].clone();
        let on = device.describe();
        assert_eq!(got.shape, want.shape, "{name} on {on}: shape");
        for (i, (a, b)) in got.to_f64().iter().zip(want.to_f64()).enumerate() {
            let ok = (a - b).abs() <= 1e-5 + 1e-4 * b.abs() || (a.is_nan() && b.is_nan());
            assert!(ok, "{name}[{i}] on {on}: device {a}, reference {b}");
        }
    });
}

fn push(g: &mut Graph, op: Op, operands: &[NodeId]) -> NodeId {
    g.push(op, operands, "test").unwrap()
}

#[test]
fn unary_ops_match() {
    let ops = UnaryOp::ALL;
    for op in ops {
        let positive = matches!(
            op,
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip
        );
        let (lo, hi) = if positive { (0.1, 3.0) } else { (-3.0, 3.0) };
        check(
            &format!("{op:?}"),
            vec![random(&[3, 37], 1, lo, hi)],
            |g, x| push(g, Op::Unary(op), &[x[0]]),
        );
    }
}

#[test]
fn binary_and_compare_ops_broadcast() {
    let ops = BinaryOp::ALL;
    for op in ops {
        let a = random(&[5, 1, 7], 2, 0.5, 2.0);
        let b = random(&[3, 1], 3, 0.5, 2.0);
        check(&format!("{op:?}"), vec![a, b], |g, x| {
            push(g, Op::Binary(op), &[x[0], x[1]])
        });
    }
    for op in CompareOp::ALL {
        let a = Tensor::f32(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b = Tensor::f32(&[3], vec![2.0, 2.0, 7.0]);
        check(&format!("{op:?}"), vec![a, b], |g, x| {
            let c = push(g, Op::Compare(op), &[x[0], x[1]]);
            push(g, Op::Cast { dtype: DType::F32 }, &[c])
        });
    }
}

#[test]
fn where_cast_constant_and_iota() {
    let c = random(&[4, 9], 4, -1.0, 1.0);
    let a = random(&[9], 5, -1.0, 1.0);
    let b = random(&[4, 1], 6, -1.0, 1.0);
    check("where", vec![c, a, b], |g, x| {
        let zero = push(
            g,
            Op::Constant {
                value: Scalar(0.0),
                dtype: DType::F32,
                shape: Shape::scalar(),
            },
            &[],
        );
        let cond = push(g, Op::Compare(CompareOp::Gt), &[x[0], zero]);
        push(g, Op::Where, &[cond, x[1], x[2]])
    });
    check(
        "cast to i32 and back",
        vec![random(&[17], 7, -4.0, 4.0)],
        |g, x| {
            let i = push(g, Op::Cast { dtype: DType::I32 }, &[x[0]]);
            push(g, Op::Cast { dtype: DType::F32 }, &[i])
        },
    );
    check(
        "iota plus constant",
        vec![random(&["B".len() + 2, 3], 8, 0.0, 1.0)],
        |g, x| {
            let iota = push(
                g,
                Op::Iota {
                    axis: 0,
                    dtype: DType::F32,
                    shape: shape![3, 3],
                },
                &[],
            );
            let two = push(
                g,
                Op::Constant {
                    value: Scalar(2.0),
                    dtype: DType::F32,
                    shape: shape![3, 3],
                },
                &[],
            );
            let s = push(g, Op::Binary(BinaryOp::Mul), &[iota, two]);
            push(g, Op::Binary(BinaryOp::Add), &[s, x[0]])
        },
    );
}

#[test]
fn reductions_over_one_and_several_axes() {
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
        for (axes, keep) in [
            (vec![1], false),
            (vec![0, 2], true),
            (vec![0, 1, 2], false),
            (vec![2], true),
        ] {
            check(
                &format!("{op:?} {axes:?}"),
                vec![random(&[3, 35, 1], 9, -2.0, 2.0)],
                |g, x| {
                    push(
                        g,
                        Op::Reduce {
                            op,
                            axes: axes.clone(),
                            keep_dims: keep,
                        },
                        &[x[0]],
                    )
                },
            );
        }
    }
}

#[test]
fn matmul_with_transposes_and_broadcast_batches() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = if ta {
            random(&[2, 19, 17], 10, -1.0, 1.0)
        } else {
            random(&[2, 17, 19], 10, -1.0, 1.0)
        };
        let b = if tb {
            random(&[3, 1, 5, 19], 11, -1.0, 1.0)
        } else {
            random(&[3, 1, 19, 5], 11, -1.0, 1.0)
        };
        check(&format!("matmul ta={ta} tb={tb}"), vec![a, b], |g, x| {
            push(
                g,
                Op::MatMul {
                    transpose_a: ta,
                    transpose_b: tb,
                },
                &[x[0], x[1]],
            )
        });
    }
    check(
        "matmul 1x1",
        vec![
            random(&[1, 1], 12, -1.0, 1.0),
            random(&[1, 1], 13, -1.0, 1.0),
        ],
        |g, x| push(g, Op::matmul(false, false), &[x[0], x[1]]),
    );
}

#[test]
fn layout_ops_transpose_reshape_broadcast_slice_concat() {
    check(
        "transpose then exp",
        vec![random(&[2, 3, 5], 14, -1.0, 1.0)],
        |g, x| {
            let t = push(
                g,
                Op::Transpose {
                    perm: vec![2, 0, 1],
                },
                &[x[0]],
            );
            push(g, Op::Unary(UnaryOp::Exp), &[t])
        },
    );
    check(
        "reshape of a transpose",
        vec![random(&[4, 6], 15, -1.0, 1.0)],
        |g, x| {
            let t = push(g, Op::Transpose { perm: vec![1, 0] }, &[x[0]]);
            push(
                g,
                Op::Reshape {
                    shape: shape![3, 2, 4],
                },
                &[t],
            )
        },
    );
    check("broadcast", vec![random(&[1, 5], 16, -1.0, 1.0)], |g, x| {
        push(
            g,
            Op::BroadcastTo {
                shape: shape![3, 5],
            },
            &[x[0]],
        )
    });
    check("slice", vec![random(&[4, 9], 17, -1.0, 1.0)], |g, x| {
        push(
            g,
            Op::Slice {
                axis: 1,
                start: 2,
                end: 7,
            },
            &[x[0]],
        )
    });
    check(
        "concat",
        vec![
            random(&[2, 3], 18, -1.0, 1.0),
            random(&[2, 1], 19, -1.0, 1.0),
            random(&[2, 4], 20, -1.0, 1.0),
        ],
        |g, x| push(g, Op::Concat { axis: 1 }, &[x[0], x[1], x[2]]),
    );
}

#[test]
fn routing_top_k_gather_scatter_with_empty_and_full_experts() {
    // 7 tokens over 5 experts, top-2: expert 4 never wins, expert 0 always does.
    let mut logits = random(&[7, 5], 21, -1.0, 0.0).to_f64();
    for t in 0..7 {
        logits[t * 5] = 3.0;
        logits[t * 5 + 4] = -5.0;
    }
    let logits = Tensor::f32(&[7, 5], logits.into_iter().map(|v| v as f32).collect());
    check("route", vec![logits], |g, x| {
        let top = push(g, Op::TopK { k: 2 }, &[x[0]]);
        let kept = push(g, Op::Gather { axis: 1 }, &[x[0], top]);
        push(
            g,
            Op::ScatterAdd {
                axis: 1,
                shape: shape![7, 5],
            },
            &[top, kept],
        )
    });
    check(
        "top-k with ties",
        vec![Tensor::f32(
            &[2, 4],
            vec![1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 2.0, 2.0],
        )],
        |g, x| {
            let top = push(g, Op::TopK { k: 3 }, &[x[0]]);
            push(g, Op::Cast { dtype: DType::F32 }, &[top])
        },
    );
}

/// Expert ids for `tokens` x `slots` assignments over 5 experts, drawn by `pick` from
/// a uniform number in [0, 1).
fn routing(tokens: usize, slots: usize, pick: impl Fn(f64) -> i32) -> Tensor {
    let ids = (0..tokens * slots)
        .map(|i| pick(rng::uniform(11, 0, 40, i as u64)))
        .collect();
    Tensor::i32(&[tokens, slots], ids)
}

#[test]
fn grouped_expert_matmuls_with_balanced_skewed_empty_and_full_experts() {
    // 37 tokens (not a multiple of the 16-row tile), K = 19, M = 21, 5 experts.
    let routings = [
        ("balanced", routing(37, 2, |u| (u * 5.0) as i32)),
        // Experts 1 and 4 get nothing, expert 3 most assignments.
        (
            "skewed",
            routing(37, 2, |u| {
                if u < 0.8 {
                    3
                } else if u < 0.9 {
                    0
                } else {
                    2
                }
            }),
        ),
        ("one expert takes all", routing(37, 1, |_| 2)),
    ];
    for (name, index) in routings {
        let slots = index.shape[1];
        let inputs = || {
            vec![
                index.clone(),
                random(&[37, 19], 41, -1.0, 1.0),
                random(&[5, 19, 21], 42, -1.0, 1.0),
                random(&[5, 21], 43, -1.0, 1.0),
                random(&[37, slots, 21], 44, -1.0, 1.0),
            ]
        };
        let groups = |g: &mut Graph, x: &[NodeId]| {
            let order = push(g, Op::ExpertOrder { experts: 5 }, &[x[0]]);
            let offsets = push(g, Op::ExpertOffsets { experts: 5 }, &[x[0]]);
            (order, offsets)
        };
        check(&format!("expert order, {name}"), inputs(), |g, x| {
            let (order, _) = groups(g, x);
            push(g, Op::Cast { dtype: DType::F32 }, &[order])
        });
        check(&format!("expert offsets, {name}"), inputs(), |g, x| {
            let (_, offsets) = groups(g, x);
            push(g, Op::Cast { dtype: DType::F32 }, &[offsets])
        });
        check(&format!("expert matmul +bias, {name}"), inputs(), |g, x| {
            let (order, offsets) = groups(g, x);
            let op = Op::ExpertMatMul {
                transpose_w: false,
                bias: true,
            };
            push(g, op, &[x[1], x[2], x[3], order, offsets])
        });
        check(&format!("expert matmul wT, {name}"), inputs(), |g, x| {
            let (order, offsets) = groups(g, x);
            let op = Op::ExpertMatMul {
                transpose_w: true,
                bias: false,
            };
            push(g, op, &[x[4], x[2], order, offsets])
        });
        check(&format!("expert weight grad, {name}"), inputs(), |g, x| {
            let (order, offsets) = groups(g, x);
            push(g, Op::ExpertWeightGrad, &[x[1], x[4], order, offsets])
        });
    }
}

#[test]
fn a_grouped_expert_matmul_with_more_row_tiles_than_a_grid_holds_in_y() {
    // 16 * 65,535 + 37 assignments: 65,537 tiles of 16 rows, past the 65,535 cubes
    // a grid may have in y on CUDA and Vulkan, so the launch folds them into z.
    let tokens = 16 * 65_535 + 37;
    let inputs = vec![
        routing(tokens, 1, |u| (u * 3.0) as i32),
        random(&[tokens, 2], 45, -1.0, 1.0),
        random(&[3, 2, 3], 46, -1.0, 1.0),
        random(&[3, 3], 47, -1.0, 1.0),
    ];
    check("expert matmul over 65,537 row tiles", inputs, |g, x| {
        let order = push(g, Op::ExpertOrder { experts: 3 }, &[x[0]]);
        let offsets = push(g, Op::ExpertOffsets { experts: 3 }, &[x[0]]);
        let op = Op::ExpertMatMul {
            transpose_w: false,
            bias: true,
        };
        push(g, op, &[x[1], x[2], x[3], order, offsets])
    });
}

#[test]
fn dropout_draws_the_reference_mask() {
    check("dropout", vec![random(&[3, 333], 22, 0.5, 1.5)], |g, x| {
        push(
            g,
            Op::Dropout {
                rate: Scalar(0.3),
                stream: 7,
            },
            &[x[0]],
        )
    });
}

#[test]
fn nan_propagates_through_max_min_relu_and_reductions() {
    let x = Tensor::f32(&[2, 3], vec![1.0, f32::NAN, -2.0, 0.5, 0.25, -1.0]);
    check("relu", vec![x.clone()], |g, x| {
        push(g, Op::Unary(UnaryOp::Relu), &[x[0]])
    });
    check(
        "max",
        vec![x.clone(), Tensor::f32(&[3], vec![0.0; 3])],
        |g, x| push(g, Op::Binary(BinaryOp::Max), &[x[0], x[1]]),
    );
    for op in [ReduceOp::Max, ReduceOp::Min, ReduceOp::Sum] {
        check(&format!("{op:?} with NaN"), vec![x.clone()], |g, x| {
            push(
                g,
                Op::Reduce {
                    op,
                    axes: vec![1],
                    keep_dims: false,
                },
                &[x[0]],
            )
        });
    }
}

#[test]
fn bf16_matmuls_round_operands_and_accumulate_in_f32() {
    use altc_runtime::device::DeviceBackend;
    use cubecl::prelude::Runtime;
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    // lavapipe has no bf16 hardware, but the autocast kernel only rounds f32 operands to
    // bf16, so it runs (and is checked) on wgpu exactly as it would on CUDA.
    if open(DeviceChoice::Wgpu, Precision::F32, true).is_err() {
        eprintln!("skipping: wgpu is not available");
        return;
    }
    let mut device = DeviceBackend::<WgpuRuntime>::new(
        WgpuRuntime::client(&WgpuDevice::default()),
        "wgpu",
        true,
    );
    let (a, b) = (
        random(&[2, 19, 23], 30, -2.0, 2.0),
        random(&[23, 7], 31, -2.0, 2.0),
    );
    let mut g = Graph::new("autocast");
    let xa = push(
        &mut g,
        Op::Input {
            name: "a".into(),
            dtype: DType::F32,
            shape: shape![2, 19, 23],
        },
        &[],
    );
    let xb = push(
        &mut g,
        Op::Input {
            name: "b".into(),
            dtype: DType::F32,
            shape: shape![23, 7],
        },
        &[],
    );
    let y = push(&mut g, Op::matmul(false, false), &[xa, xb]);
    g.set_output("y", y).unwrap();
    let to_bf16 = |t: &Tensor| {
        Tensor::f32(
            &t.shape,
            t.to_f64()
                .iter()
                .map(|&v| half::bf16::from_f32(v as f32).to_f32())
                .collect(),
        )
    };
    let feeds =
        |a: Tensor, b: Tensor| TensorMap::from([("a".to_string(), a), ("b".to_string(), b)]);
    let got = device
        .run(&g, &feeds(a.clone(), b.clone()), EvalContext::default())
        .unwrap()["y"]
        .to_f64();
    let rounded = run(
        &g,
        &feeds(to_bf16(&a), to_bf16(&b)),
        &TensorMap::new(),
        EvalContext::default(),
    )
    .unwrap()["y"]
        .to_f64();
    let exact =
        run(&g, &feeds(a, b), &TensorMap::new(), EvalContext::default()).unwrap()["y"].to_f64();
    let mut max_rounding_effect = 0.0f64;
    for ((g, r), e) in got.iter().zip(&rounded).zip(&exact) {
        assert!(
            (g - r).abs() <= 1e-5 + 1e-5 * r.abs(),
            "autocast {g} vs bf16 operands on the reference {r}"
        );
        max_rounding_effect = max_rounding_effect.max((r - e).abs());
    }
    assert!(
        max_rounding_effect > 1e-4,
        "bf16 rounding must be visible against f32, got {max_rounding_effect}"
    );
}

#[test]
fn a_buffer_past_the_device_limit_is_refused_before_anything_runs() {
    use altc_runtime::backend::{BackendError, FitError};
    on_each_device(|device| {
        let limit = device
            .max_buffer_bytes()
            .expect("devices have a buffer limit");
        // One value broadcast (a view, no buffer) and exponentiated: the result is
        // the only buffer, one element past the limit.
        let n = (limit / 4 + 1) as usize;
        let mut g = Graph::new("too-big");
        let mut b = GraphBuilder::new(&mut g, "test");
        let x = b.input("x", DType::F32, shape![1]).unwrap();
        let wide = b
            .push(
                Op::BroadcastTo {
                    shape: [n].into_iter().collect(),
                },
                &[x],
            )
            .unwrap();
        let y = b.unary(UnaryOp::Exp, wide).unwrap();
        g.set_output("y", y).unwrap();
        let feeds = TensorMap::from([("x".to_string(), Tensor::f32(&[1], vec![0.5]))]);
        let e = device
            .run(&g, &feeds, EvalContext::default())
            .expect_err("a buffer past the limit must be refused");
        match &e {
            // Past 32-bit indexing first where the device allows such buffers.
            BackendError::TooLarge { .. } => assert!(n as u64 > u64::from(u32::MAX), "{e}"),
            BackendError::DoesNotFit(fit) => {
                let FitError::Buffer { shape, .. } = fit.as_ref() else {
                    panic!("expected the buffer named, got {fit}");
                };
                assert_eq!(shape, &vec![n]);
                let text = e.to_string();
                assert!(
                    text.contains("graph `too-big`") && text.contains("`exp`"),
                    "{text}"
                );
                assert!(text.contains("another device"), "{text}");
            }
            other => panic!("expected a refusal naming the tensor, got {other}"),
        }
        // The device is still usable afterwards.
        let mut small = Graph::new("small");
        let mut b = GraphBuilder::new(&mut small, "test");
        let x = b.input("x", DType::F32, shape![1]).unwrap();
        let y = b.unary(UnaryOp::Exp, x).unwrap();
        small.set_output("y", y).unwrap();
        assert!(device.run(&small, &feeds, EvalContext::default()).is_ok());
    });
}
