//! Shape and element-type inference for every IR op: the exact type each op yields
//! from well-formed operands, and the error (variant and message) for operands that
//! do not fit. Inference is exercised directly through `ir::infer`, and once through
//! `Graph::push` to show that errors name the node's origin.

use altc_compiler::ir::{
    infer, BinaryOp, BuildGraph, CompareOp, DType, Graph, GraphBuilder, GraphError, Op, ReduceOp,
    Scalar, Shape, TensorType, TypeError, UnaryOp,
};
use altc_compiler::shape;

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn ty(dtype: DType, shape: Shape) -> TensorType {
    TensorType::new(dtype, shape)
}

fn f32t(shape: Shape) -> TensorType {
    ty(DType::F32, shape)
}

fn f64t(shape: Shape) -> TensorType {
    ty(DType::F64, shape)
}

fn i32t(shape: Shape) -> TensorType {
    ty(DType::I32, shape)
}

fn boolt(shape: Shape) -> TensorType {
    ty(DType::Bool, shape)
}

/// The type `op` yields on `operands`; panics with the error otherwise.
fn ok(op: Op, operands: &[&TensorType]) -> TensorType {
    infer(&op, operands).unwrap_or_else(|e| panic!("`{op}` on {operands:?} should infer, got: {e}"))
}

fn err(op: Op, operands: &[&TensorType]) -> TypeError {
    match infer(&op, operands) {
        Ok(t) => panic!("`{op}` on {operands:?} should fail, but inferred {t}"),
        Err(e) => e,
    }
}

/// Asserts a `TypeError::Shape` for `op` whose message contains every one of `needles`;
/// returns the full message.
fn shape_err(op: Op, operands: &[&TensorType], needles: &[&str]) -> String {
    let mnemonic = op.mnemonic();
    let e = err(op, operands);
    let TypeError::Shape { op: named, .. } = &e else {
        panic!("expected a shape error, got {e:?}");
    };
    assert_eq!(named, &mnemonic, "the error names the op");
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} should mention {n:?}");
    }
    msg
}

/// Asserts a `TypeError::DType` whose `expected` contains `expected` and whose `got`
/// lists exactly the operand types `got`; returns the full message.
fn dtype_err(op: Op, operands: &[&TensorType], expected: &str, got: &str) -> String {
    let mnemonic = op.mnemonic();
    let e = err(op, operands);
    let TypeError::DType {
        op: named,
        expected: exp,
        got: g,
    } = &e
    else {
        panic!("expected a dtype error, got {e:?}");
    };
    assert_eq!(named, &mnemonic);
    assert!(
        exp.contains(expected),
        "expected {exp:?} to mention {expected:?}"
    );
    assert_eq!(g, got);
    let msg = e.to_string();
    assert!(
        msg.contains(got),
        "message {msg:?} should list the operand types {got:?}"
    );
    msg
}

fn arity_err(op: Op, operands: &[&TensorType], expected: &str) {
    let mnemonic = op.mnemonic();
    let n = operands.len();
    let e = err(op, operands);
    assert_eq!(
        e,
        TypeError::Arity {
            op: mnemonic.clone(),
            expected: expected.to_string(),
            got: n,
        }
    );
    assert_eq!(
        e.to_string(),
        format!("`{mnemonic}` takes {expected} operand(s), got {n}")
    );
}

// ---------------------------------------------------------------------------------
// Arity, for every op
// ---------------------------------------------------------------------------------

#[test]
fn every_op_rejects_the_wrong_number_of_operands() {
    let x = f32t(shape![2, 3]);
    let leaves = [
        Op::Input {
            name: "x".into(),
            dtype: DType::F32,
            shape: shape![2, 3],
        },
        Op::Parameter {
            name: "w".into(),
            dtype: DType::F32,
            shape: shape![2, 3],
        },
        Op::Constant {
            value: Scalar(0.0),
            dtype: DType::F32,
            shape: shape![2, 3],
        },
        Op::Iota {
            axis: 0,
            dtype: DType::I32,
            shape: shape![2, 3],
        },
    ];
    for op in leaves {
        arity_err(op, &[&x], "0");
    }
    let unary = [
        Op::Unary(UnaryOp::Exp),
        Op::Cast { dtype: DType::F64 },
        Op::reduce(ReduceOp::Sum, &[0], false),
        Op::Transpose { perm: vec![1, 0] },
        Op::Reshape { shape: shape![6] },
        Op::BroadcastTo {
            shape: shape![2, 3],
        },
        Op::Slice {
            axis: 0,
            start: 0,
            end: 1,
        },
        Op::TopK { k: 1 },
        Op::Dropout {
            rate: Scalar(0.1),
            stream: 0,
        },
    ];
    for op in unary {
        arity_err(op.clone(), &[], "1");
        arity_err(op, &[&x, &x], "1");
    }
    let binary = [
        Op::Binary(BinaryOp::Add),
        Op::Compare(CompareOp::Lt),
        Op::matmul(false, false),
        Op::Gather { axis: 0 },
        Op::ScatterAdd {
            axis: 0,
            shape: shape![2, 3],
        },
    ];
    for op in binary {
        arity_err(op.clone(), &[&x], "2");
        arity_err(op, &[&x, &x, &x], "2");
    }
    arity_err(Op::Where, &[&x, &x], "3");
    arity_err(Op::Where, &[&x, &x, &x, &x], "3");
    // Concat takes any number of operands but at least one.
    arity_err(Op::Concat { axis: 0 }, &[], "at least 1");
}

// ---------------------------------------------------------------------------------
// Leaves: Input, Parameter, Constant, Iota
// ---------------------------------------------------------------------------------

#[test]
fn leaves_yield_their_declared_type() {
    assert_eq!(
        ok(
            Op::Input {
                name: "tokens".into(),
                dtype: DType::F32,
                shape: shape!["B", 5, 16],
            },
            &[]
        ),
        f32t(shape!["B", 5, 16])
    );
    assert_eq!(
        ok(
            Op::Parameter {
                name: "w_up".into(),
                dtype: DType::F64,
                shape: shape![16, 64],
            },
            &[]
        ),
        f64t(shape![16, 64])
    );
    assert_eq!(
        ok(
            Op::Constant {
                value: Scalar(-0.5),
                dtype: DType::F32,
                shape: shape!["B", 1],
            },
            &[]
        ),
        f32t(shape!["B", 1])
    );
    // A scalar constant.
    assert_eq!(
        ok(
            Op::Constant {
                value: Scalar(2.0),
                dtype: DType::I32,
                shape: Shape::scalar(),
            },
            &[]
        ),
        i32t(shape![])
    );
}

#[test]
fn iota_yields_its_declared_type_and_checks_its_axis() {
    assert_eq!(
        ok(
            Op::Iota {
                axis: 1,
                dtype: DType::I32,
                shape: shape!["B", 4],
            },
            &[]
        ),
        i32t(shape!["B", 4])
    );
    assert_eq!(
        ok(
            Op::Iota {
                axis: 0,
                dtype: DType::F32,
                shape: shape![3],
            },
            &[]
        ),
        f32t(shape![3])
    );
    shape_err(
        Op::Iota {
            axis: 2,
            dtype: DType::I32,
            shape: shape!["B", 4],
        },
        &[],
        &["axis 2 is out of range for rank 2"],
    );
    // A scalar has no axis at all.
    shape_err(
        Op::Iota {
            axis: 0,
            dtype: DType::I32,
            shape: Shape::scalar(),
        },
        &[],
        &["axis 0 is out of range for rank 0"],
    );
}

// ---------------------------------------------------------------------------------
// Elementwise: Unary, Binary, Compare, Where, Cast, Dropout
// ---------------------------------------------------------------------------------

#[test]
fn unary_ops_keep_the_float_type() {
    for u in UnaryOp::ALL {
        let x32 = f32t(shape!["B", 3]);
        let x64 = f64t(shape![]);
        assert_eq!(ok(Op::Unary(u), &[&x32]), x32, "{u:?} on f32");
        assert_eq!(ok(Op::Unary(u), &[&x64]), x64, "{u:?} on f64");
    }
}

#[test]
fn unary_ops_reject_non_floats() {
    let msg = dtype_err(
        Op::Unary(UnaryOp::Exp),
        &[&i32t(shape![2, 3])],
        "floating-point",
        "i32[2, 3]",
    );
    assert_eq!(msg, "`exp` needs floating-point operands, got i32[2, 3]");
    dtype_err(
        Op::Unary(UnaryOp::Relu),
        &[&boolt(shape!["B"])],
        "floating-point",
        "bool[B]",
    );
}

#[test]
fn binary_ops_broadcast_numpy_style() {
    for b in BinaryOp::ALL {
        // [2, 3] with [3]: the vector is repeated for every row.
        assert_eq!(
            ok(Op::Binary(b), &[&f32t(shape![2, 3]), &f32t(shape![3])]),
            f32t(shape![2, 3]),
            "{b:?}"
        );
    }
    let bin = Op::Binary(BinaryOp::Mul);
    // [2, 1] with [1, 3]: both stretch.
    assert_eq!(
        ok(bin.clone(), &[&f64t(shape![2, 1]), &f64t(shape![1, 3])]),
        f64t(shape![2, 3])
    );
    // Ranks align on the right; a symbol stays, a fixed 1 stretches to a symbol.
    assert_eq!(
        ok(
            bin.clone(),
            &[&f32t(shape!["B", 1, 4]), &f32t(shape![5, 1])]
        ),
        f32t(shape!["B", 5, 4])
    );
    assert_eq!(
        ok(bin.clone(), &[&f32t(shape![1, 4]), &f32t(shape!["B", 4])]),
        f32t(shape!["B", 4])
    );
    // A scalar broadcasts against anything.
    assert_eq!(
        ok(bin.clone(), &[&f32t(shape![]), &f32t(shape!["B", 2])]),
        f32t(shape!["B", 2])
    );
    assert_eq!(
        ok(bin, &[&f32t(shape!["B", 2]), &f32t(shape!["B", 2])]),
        f32t(shape!["B", 2])
    );
}

#[test]
fn binary_ops_reject_shapes_that_do_not_broadcast() {
    let msg = shape_err(
        Op::Binary(BinaryOp::Add),
        &[&f32t(shape![2, 3]), &f32t(shape![2])],
        &["[2, 3]", "[2]"],
    );
    assert_eq!(msg, "`add`: shapes [2, 3] and [2] do not broadcast");
    // A symbol never stretches, and two different symbols never meet.
    shape_err(
        Op::Binary(BinaryOp::Sub),
        &[&f32t(shape!["B", 4]), &f32t(shape![4, 4])],
        &["shapes [B, 4] and [4, 4] do not broadcast"],
    );
    shape_err(
        Op::Binary(BinaryOp::Max),
        &[&f32t(shape!["B"]), &f32t(shape!["T"])],
        &["shapes [B] and [T] do not broadcast"],
    );
}

#[test]
fn binary_ops_need_one_float_element_type() {
    let msg = dtype_err(
        Op::Binary(BinaryOp::Add),
        &[&f32t(shape![2]), &f64t(shape![2])],
        "one element type",
        "f32[2], f64[2]",
    );
    assert_eq!(
        msg,
        "`add` needs operands of one element type operands, got f32[2], f64[2]"
    );
    dtype_err(
        Op::Binary(BinaryOp::Pow),
        &[&i32t(shape![2]), &i32t(shape![2])],
        "floating-point",
        "i32[2], i32[2]",
    );
}

#[test]
fn comparisons_yield_bool_for_any_matching_element_type() {
    for cmp in CompareOp::ALL {
        assert_eq!(
            ok(Op::Compare(cmp), &[&f32t(shape![2, 3]), &f32t(shape![3])]),
            boolt(shape![2, 3]),
            "{cmp:?}"
        );
    }
    assert_eq!(
        ok(
            Op::Compare(CompareOp::Eq),
            &[&i32t(shape!["B", 1]), &i32t(shape![1, 8])]
        ),
        boolt(shape!["B", 8])
    );
    assert_eq!(
        ok(
            Op::Compare(CompareOp::Ne),
            &[&boolt(shape![4]), &boolt(shape![])]
        ),
        boolt(shape![4])
    );
}

#[test]
fn comparisons_reject_mixed_types_and_non_broadcasting_shapes() {
    dtype_err(
        Op::Compare(CompareOp::Lt),
        &[&f32t(shape![3]), &i32t(shape![3])],
        "one element type",
        "f32[3], i32[3]",
    );
    shape_err(
        Op::Compare(CompareOp::Ge),
        &[&f32t(shape![3, 2]), &f32t(shape![3])],
        &["`ge`: shapes [3, 2] and [3] do not broadcast"],
    );
}

#[test]
fn where_broadcasts_its_three_operands() {
    assert_eq!(
        ok(
            Op::Where,
            &[&boolt(shape![2, 1]), &f32t(shape![1, 3]), &f32t(shape![])]
        ),
        f32t(shape![2, 3])
    );
    assert_eq!(
        ok(
            Op::Where,
            &[
                &boolt(shape!["B", 4]),
                &i32t(shape!["B", 4]),
                &i32t(shape![4])
            ]
        ),
        i32t(shape!["B", 4])
    );
}

#[test]
fn where_needs_a_bool_condition_and_matching_branches() {
    dtype_err(
        Op::Where,
        &[&f32t(shape![2]), &f32t(shape![2]), &f32t(shape![2])],
        "a bool condition",
        "f32[2], f32[2], f32[2]",
    );
    // The branch check lists the branches only.
    dtype_err(
        Op::Where,
        &[&boolt(shape![2]), &f32t(shape![2]), &f64t(shape![2])],
        "one element type",
        "f32[2], f64[2]",
    );
    let msg = shape_err(
        Op::Where,
        &[&boolt(shape![2]), &f32t(shape![3]), &f32t(shape![1])],
        &["[2]", "[3]", "[1]"],
    );
    assert_eq!(msg, "`where`: shapes [2], [3] and [1] do not broadcast");
    // Condition and first branch fit, the second does not.
    shape_err(
        Op::Where,
        &[&boolt(shape![2, 1]), &f32t(shape![3]), &f32t(shape![4])],
        &["shapes [2, 1], [3] and [4] do not broadcast"],
    );
}

#[test]
fn cast_changes_only_the_element_type() {
    assert_eq!(
        ok(Op::Cast { dtype: DType::I32 }, &[&f32t(shape!["B", 2])]),
        i32t(shape!["B", 2])
    );
    assert_eq!(
        ok(Op::Cast { dtype: DType::F64 }, &[&boolt(shape![3])]),
        f64t(shape![3])
    );
    assert_eq!(
        ok(Op::Cast { dtype: DType::F32 }, &[&f32t(shape![])]),
        f32t(shape![])
    );
    assert_eq!(
        ok(Op::Cast { dtype: DType::Bool }, &[&i32t(shape![7, 1])]),
        boolt(shape![7, 1])
    );
}

#[test]
fn dropout_keeps_the_float_type_and_rejects_non_floats() {
    let op = Op::Dropout {
        rate: Scalar(0.1),
        stream: 3,
    };
    assert_eq!(
        ok(op.clone(), &[&f32t(shape!["B", 5, 16])]),
        f32t(shape!["B", 5, 16])
    );
    assert_eq!(ok(op.clone(), &[&f64t(shape![4])]), f64t(shape![4]));
    let msg = dtype_err(op, &[&i32t(shape![4])], "floating-point", "i32[4]");
    assert_eq!(
        msg,
        "`dropout p=0.1` needs floating-point operands, got i32[4]"
    );
}

// ---------------------------------------------------------------------------------
// Reduce
// ---------------------------------------------------------------------------------

#[test]
fn reduce_drops_or_keeps_the_reduced_axes() {
    let x = f32t(shape![2, 3, 4]);
    for r in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
        assert_eq!(
            ok(Op::reduce(r, &[1], false), &[&x]),
            f32t(shape![2, 4]),
            "{r:?}"
        );
        assert_eq!(
            ok(Op::reduce(r, &[1], true), &[&x]),
            f32t(shape![2, 1, 4]),
            "{r:?}"
        );
    }
    // Several axes, in any order.
    assert_eq!(
        ok(Op::reduce(ReduceOp::Sum, &[0, 2], false), &[&x]),
        f32t(shape![3])
    );
    assert_eq!(
        ok(Op::reduce(ReduceOp::Sum, &[2, 0], true), &[&x]),
        f32t(shape![1, 3, 1])
    );
    // Every axis: a scalar, or all ones.
    assert_eq!(
        ok(Op::reduce(ReduceOp::Mean, &[0, 1, 2], false), &[&x]),
        f32t(shape![])
    );
    assert_eq!(
        ok(Op::reduce(ReduceOp::Mean, &[0, 1, 2], true), &[&x]),
        f32t(shape![1, 1, 1])
    );
    // No axis: unchanged.
    assert_eq!(ok(Op::reduce(ReduceOp::Max, &[], false), &[&x]), x);
    // Symbolic dimensions survive, and may themselves be reduced.
    let xb = f64t(shape!["B", 5, 16]);
    assert_eq!(
        ok(Op::reduce(ReduceOp::Mean, &[2], true), &[&xb]),
        f64t(shape!["B", 5, 1])
    );
    assert_eq!(
        ok(Op::reduce(ReduceOp::Sum, &[0], false), &[&xb]),
        f64t(shape![5, 16])
    );
}

#[test]
fn reduce_rejects_bad_axes_and_non_floats() {
    let x = f32t(shape![2, 3, 4]);
    let msg = shape_err(
        Op::reduce(ReduceOp::Sum, &[1, 1], false),
        &[&x],
        &["axis 1 is listed twice"],
    );
    assert_eq!(msg, "`reduce_sum [1, 1]`: axis 1 is listed twice");
    shape_err(
        Op::reduce(ReduceOp::Max, &[0, 2, 0], true),
        &[&x],
        &["axis 0 is listed twice"],
    );
    shape_err(
        Op::reduce(ReduceOp::Mean, &[3], false),
        &[&x],
        &["axis 3 is out of range for rank 3"],
    );
    dtype_err(
        Op::reduce(ReduceOp::Sum, &[0], false),
        &[&i32t(shape![4])],
        "floating-point",
        "i32[4]",
    );
}

// ---------------------------------------------------------------------------------
// MatMul
// ---------------------------------------------------------------------------------

#[test]
fn matmul_contracts_the_inner_dimension() {
    let cases = [
        // (transpose_a, transpose_b, a, b)
        (false, false, shape![2, 3], shape![3, 4]),
        (true, false, shape![3, 2], shape![3, 4]),
        (false, true, shape![2, 3], shape![4, 3]),
        (true, true, shape![3, 2], shape![4, 3]),
    ];
    for (ta, tb, a, b) in cases {
        assert_eq!(
            ok(Op::matmul(ta, tb), &[&f32t(a.clone()), &f32t(b.clone())]),
            f32t(shape![2, 4]),
            "{a} x {b} with transpose_a={ta} transpose_b={tb}"
        );
    }
    // Symbolic rows and a symbolic contraction are fine when the symbols agree.
    assert_eq!(
        ok(
            Op::matmul(false, false),
            &[&f64t(shape!["B", 16]), &f64t(shape![16, 64])]
        ),
        f64t(shape!["B", 64])
    );
    assert_eq!(
        ok(
            Op::matmul(true, false),
            &[&f32t(shape!["B", 16]), &f32t(shape!["B", 8])]
        ),
        f32t(shape![16, 8])
    );
}

#[test]
fn matmul_broadcasts_batch_dimensions() {
    // Every token against every expert: [B, L, h] x [E, 1, h, k] -> [E, B, L, k].
    assert_eq!(
        ok(
            Op::matmul(false, false),
            &[&f32t(shape!["B", 5, 16]), &f32t(shape![4, 1, 16, 32])]
        ),
        f32t(shape![4, "B", 5, 32])
    );
    // One weight matrix for a whole batch.
    assert_eq!(
        ok(
            Op::matmul(false, false),
            &[&f32t(shape![7, 2, 3]), &f32t(shape![3, 4])]
        ),
        f32t(shape![7, 2, 4])
    );
    // Both sides batched, one side stretched, and transposed.
    assert_eq!(
        ok(
            Op::matmul(false, true),
            &[&f64t(shape!["B", 1, 2, 3]), &f64t(shape![6, 4, 3])]
        ),
        f64t(shape!["B", 6, 2, 4])
    );
}

#[test]
fn matmul_rejects_mismatched_inner_dimensions() {
    let msg = shape_err(
        Op::matmul(false, false),
        &[&f32t(shape![2, 3]), &f32t(shape![4, 5])],
        &["[2, 3]", "[4, 5]", "3", "4"],
    );
    assert_eq!(
        msg,
        "`matmul`: inner dimensions differ: [2, 3] x [4, 5] (contracting 3 with 4)"
    );
    // The same operands fit once `a` is transposed... but not `b`.
    shape_err(
        Op::matmul(false, true),
        &[&f32t(shape![2, 3]), &f32t(shape![3, 4])],
        &["`matmul bT`", "contracting 3 with 4"],
    );
    shape_err(
        Op::matmul(true, false),
        &[&f32t(shape![2, 3]), &f32t(shape![3, 4])],
        &["`matmul aT`", "contracting 2 with 3"],
    );
    // Different symbols never contract.
    shape_err(
        Op::matmul(false, false),
        &[&f32t(shape![2, "B"]), &f32t(shape!["T", 3])],
        &["contracting B with T"],
    );
}

#[test]
fn matmul_rejects_low_rank_unbroadcastable_batches_and_mixed_types() {
    let msg = shape_err(
        Op::matmul(false, false),
        &[&f32t(shape![3]), &f32t(shape![3, 4])],
        &["rank 2 or more", "[3]", "[3, 4]"],
    );
    assert_eq!(
        msg,
        "`matmul`: operands need rank 2 or more, got [3] and [3, 4]"
    );
    shape_err(
        Op::matmul(false, false),
        &[&f32t(shape![2, 3, 4]), &f32t(shape![5, 4, 6])],
        &["batch dimensions [2] and [5] do not broadcast"],
    );
    shape_err(
        Op::matmul(false, false),
        &[&f32t(shape!["B", 3, 4]), &f32t(shape![2, 4, 6])],
        &["batch dimensions [B] and [2] do not broadcast"],
    );
    dtype_err(
        Op::matmul(false, false),
        &[&f32t(shape![2, 3]), &f64t(shape![3, 4])],
        "one element type",
        "f32[2, 3], f64[3, 4]",
    );
    dtype_err(
        Op::matmul(false, false),
        &[&i32t(shape![2, 3]), &i32t(shape![3, 4])],
        "floating-point",
        "i32[2, 3], i32[3, 4]",
    );
}

// ---------------------------------------------------------------------------------
// Transpose, Reshape, BroadcastTo
// ---------------------------------------------------------------------------------

#[test]
fn transpose_permutes_dimensions() {
    // Result dim i is operand dim perm[i].
    assert_eq!(
        ok(
            Op::Transpose {
                perm: vec![2, 0, 1]
            },
            &[&f32t(shape!["B", 5, 16])]
        ),
        f32t(shape![16, "B", 5])
    );
    assert_eq!(
        ok(Op::Transpose { perm: vec![1, 0] }, &[&i32t(shape![2, 3])]),
        i32t(shape![3, 2])
    );
    assert_eq!(
        ok(Op::Transpose { perm: vec![0] }, &[&boolt(shape![4])]),
        boolt(shape![4])
    );
    assert_eq!(
        ok(Op::Transpose { perm: vec![] }, &[&f64t(shape![])]),
        f64t(shape![])
    );
}

#[test]
fn transpose_rejects_what_is_not_a_permutation() {
    let x = f32t(shape![2, 3, 4]);
    let msg = shape_err(
        Op::Transpose {
            perm: vec![0, 0, 1],
        },
        &[&x],
        &["[0, 0, 1]", "3 axes"],
    );
    assert_eq!(
        msg,
        "`transpose [0, 0, 1]`: [0, 0, 1] is not a permutation of the 3 axes"
    );
    shape_err(
        Op::Transpose { perm: vec![1, 0] },
        &[&x],
        &["[1, 0] is not a permutation of the 3 axes"],
    );
    shape_err(
        Op::Transpose {
            perm: vec![0, 1, 3],
        },
        &[&x],
        &["[0, 1, 3] is not a permutation of the 3 axes"],
    );
    shape_err(
        Op::Transpose {
            perm: vec![3, 2, 1, 0],
        },
        &[&x],
        &["[3, 2, 1, 0] is not a permutation of the 3 axes"],
    );
}

#[test]
fn reshape_regroups_fixed_dimensions_and_keeps_symbols() {
    assert_eq!(
        ok(
            Op::Reshape {
                shape: shape![6, 4]
            },
            &[&f32t(shape![2, 3, 4])]
        ),
        f32t(shape![6, 4])
    );
    assert_eq!(
        ok(Op::Reshape { shape: shape![24] }, &[&i32t(shape![2, 3, 4])]),
        i32t(shape![24])
    );
    // Splitting heads around the batch symbol.
    assert_eq!(
        ok(
            Op::Reshape {
                shape: shape!["B", 5, 4, 4]
            },
            &[&f32t(shape!["B", 5, 16])]
        ),
        f32t(shape!["B", 5, 4, 4])
    );
    // Merging fixed dims next to the symbol.
    assert_eq!(
        ok(
            Op::Reshape {
                shape: shape!["B", 80]
            },
            &[&f64t(shape!["B", 5, 16])]
        ),
        f64t(shape!["B", 80])
    );
    // Adding and removing unit dimensions.
    assert_eq!(
        ok(
            Op::Reshape {
                shape: shape!["B", 1, 16]
            },
            &[&f32t(shape!["B", 16])]
        ),
        f32t(shape!["B", 1, 16])
    );
    assert_eq!(
        ok(Op::Reshape { shape: shape![] }, &[&f32t(shape![1, 1])]),
        f32t(shape![])
    );
}

#[test]
fn reshape_rejects_changed_counts_and_merged_symbols() {
    let msg = shape_err(
        Op::Reshape { shape: shape![7] },
        &[&f32t(shape![2, 3])],
        &["[2, 3]", "[7]"],
    );
    assert_eq!(
        msg,
        "`reshape [7]`: cannot reshape [2, 3] to [7]: the element counts differ \
         (symbolic dimensions must be kept as they are)"
    );
    // Merging the batch symbol with a fixed dim (B x 5 -> one dim) is not expressible
    // as a product, so any new symbol or dropping B must fail.
    shape_err(
        Op::Reshape {
            shape: shape!["N", 16],
        },
        &[&f32t(shape!["B", 5, 16])],
        &["cannot reshape [B, 5, 16] to [N, 16]"],
    );
    shape_err(
        Op::Reshape { shape: shape![80] },
        &[&f32t(shape!["B", 5, 16])],
        &["cannot reshape [B, 5, 16] to [80]"],
    );
    shape_err(
        Op::Reshape {
            shape: shape!["B", 5, 16],
        },
        &[&f32t(shape![4, 5, 16])],
        &["cannot reshape [4, 5, 16] to [B, 5, 16]"],
    );
    // A symbol may not be duplicated either.
    shape_err(
        Op::Reshape {
            shape: shape!["B", "B", 4],
        },
        &[&f32t(shape!["B", 4])],
        &["cannot reshape [B, 4] to [B, B, 4]"],
    );
}

#[test]
fn broadcast_to_expands_by_numpy_rules() {
    assert_eq!(
        ok(
            Op::BroadcastTo {
                shape: shape![2, 3]
            },
            &[&f32t(shape![3])]
        ),
        f32t(shape![2, 3])
    );
    assert_eq!(
        ok(
            Op::BroadcastTo {
                shape: shape!["B", 4]
            },
            &[&i32t(shape!["B", 1])]
        ),
        i32t(shape!["B", 4])
    );
    assert_eq!(
        ok(
            Op::BroadcastTo {
                shape: shape!["B", 5, 16]
            },
            &[&f64t(shape![])]
        ),
        f64t(shape!["B", 5, 16])
    );
    assert_eq!(
        ok(
            Op::BroadcastTo {
                shape: shape![2, 3]
            },
            &[&boolt(shape![2, 3])]
        ),
        boolt(shape![2, 3])
    );
}

#[test]
fn broadcast_to_rejects_shrinking_and_mismatched_targets() {
    let msg = shape_err(
        Op::BroadcastTo { shape: shape![3] },
        &[&f32t(shape![2, 3])],
        &["[2, 3]", "[3]"],
    );
    assert_eq!(msg, "`broadcast [3]`: [2, 3] does not broadcast to [3]");
    shape_err(
        Op::BroadcastTo {
            shape: shape![4, 3],
        },
        &[&f32t(shape![2, 3])],
        &["[2, 3] does not broadcast to [4, 3]"],
    );
    // The operand's symbol cannot become a fixed size, nor stretch.
    shape_err(
        Op::BroadcastTo { shape: shape![4] },
        &[&f32t(shape!["B"])],
        &["[B] does not broadcast to [4]"],
    );
    // The target's size-1 dim cannot absorb the operand's larger dim.
    shape_err(
        Op::BroadcastTo {
            shape: shape![2, 1],
        },
        &[&f32t(shape![2, 3])],
        &["[2, 3] does not broadcast to [2, 1]"],
    );
}

// ---------------------------------------------------------------------------------
// Slice, Concat
// ---------------------------------------------------------------------------------

fn slice(axis: usize, start: usize, end: usize) -> Op {
    Op::Slice { axis, start, end }
}

#[test]
fn slice_narrows_one_fixed_axis() {
    let x = f32t(shape!["B", 10]);
    assert_eq!(ok(slice(1, 3, 7), &[&x]), f32t(shape!["B", 4]));
    assert_eq!(ok(slice(1, 0, 10), &[&x]), x);
    assert_eq!(ok(slice(1, 5, 5), &[&x]), f32t(shape!["B", 0]));
    assert_eq!(
        ok(slice(0, 1, 2), &[&i32t(shape![3, "B"])]),
        i32t(shape![1, "B"])
    );
}

#[test]
fn slice_rejects_bad_ranges_symbolic_dims_and_bad_axes() {
    let x = f32t(shape!["B", 10]);
    let msg = shape_err(slice(1, 3, 11), &[&x], &["3..11", "10"]);
    assert_eq!(
        msg,
        "`slice axis=1 3..11`: range 3..11 does not fit a dimension of 10"
    );
    shape_err(
        slice(1, 7, 3),
        &[&x],
        &["range 7..3 does not fit a dimension of 10"],
    );
    shape_err(
        slice(1, 11, 11),
        &[&x],
        &["range 11..11 does not fit a dimension of 10"],
    );
    shape_err(
        slice(0, 0, 1),
        &[&x],
        &["cannot slice the symbolic dimension B"],
    );
    shape_err(
        slice(2, 0, 1),
        &[&x],
        &["axis 2 is out of range for rank 2"],
    );
}

#[test]
fn concat_sums_the_joined_axis() {
    let a = f32t(shape!["B", 2]);
    let b = f32t(shape!["B", 3]);
    let c = f32t(shape!["B", 1]);
    assert_eq!(
        ok(Op::Concat { axis: 1 }, &[&a, &b, &c]),
        f32t(shape!["B", 6])
    );
    assert_eq!(ok(Op::Concat { axis: 1 }, &[&a]), a);
    assert_eq!(
        ok(
            Op::Concat { axis: 0 },
            &[&i32t(shape![2, 4]), &i32t(shape![5, 4])]
        ),
        i32t(shape![7, 4])
    );
}

#[test]
fn concat_rejects_symbolic_axes_mismatches_and_mixed_types() {
    let msg = shape_err(
        Op::Concat { axis: 0 },
        &[&f32t(shape!["B", 2]), &f32t(shape!["B", 2])],
        &["symbolic", "B"],
    );
    assert_eq!(
        msg,
        "`concat axis=0`: cannot concatenate along the symbolic dimension B"
    );
    let msg = shape_err(
        Op::Concat { axis: 1 },
        &[&f32t(shape!["B", 2]), &f32t(shape![4, 3])],
        &["[B, 2]", "[4, 3]"],
    );
    assert_eq!(
        msg,
        "`concat axis=1`: [B, 2] and [4, 3] differ outside axis 1"
    );
    shape_err(
        Op::Concat { axis: 0 },
        &[&f32t(shape![2, 3]), &f32t(shape![3])],
        &["[2, 3] and [3] differ outside axis 0"],
    );
    shape_err(
        Op::Concat { axis: 2 },
        &[&f32t(shape![2, 3]), &f32t(shape![2, 3])],
        &["axis 2 is out of range for rank 2"],
    );
    dtype_err(
        Op::Concat { axis: 0 },
        &[&f32t(shape![2]), &f64t(shape![2]), &f32t(shape![2])],
        "one element type",
        "f32[2], f64[2], f32[2]",
    );
}

// ---------------------------------------------------------------------------------
// Gather, ScatterAdd, TopK
// ---------------------------------------------------------------------------------

#[test]
fn gather_yields_the_index_shape_with_the_data_type() {
    // Pick 2 of 8 experts per token.
    assert_eq!(
        ok(
            Op::Gather { axis: 1 },
            &[&f32t(shape!["B", 8]), &i32t(shape!["B", 2])]
        ),
        f32t(shape!["B", 2])
    );
    // The index may be longer than the data along the gathered axis.
    assert_eq!(
        ok(
            Op::Gather { axis: 0 },
            &[&f64t(shape![5, 3]), &i32t(shape![7, 3])]
        ),
        f64t(shape![7, 3])
    );
    assert_eq!(
        ok(
            Op::Gather { axis: 0 },
            &[&i32t(shape![5]), &i32t(shape![2])]
        ),
        i32t(shape![2])
    );
}

#[test]
fn gather_rejects_non_i32_indices_mismatched_dims_and_bad_axes() {
    let msg = dtype_err(
        Op::Gather { axis: 1 },
        &[&f32t(shape![4, 8]), &f32t(shape![4, 2])],
        "an i32 index",
        "f32[4, 8], f32[4, 2]",
    );
    assert_eq!(
        msg,
        "`gather axis=1` needs an i32 index operands, got f32[4, 8], f32[4, 2]"
    );
    let msg = shape_err(
        Op::Gather { axis: 1 },
        &[&f32t(shape![4, 8]), &i32t(shape![3, 2])],
        &["[3, 2]", "[4, 8]"],
    );
    assert_eq!(
        msg,
        "`gather axis=1`: index [3, 2] must match data [4, 8] on every axis but 1 (or data has extent 1 there)"
    );
    shape_err(
        Op::Gather { axis: 1 },
        &[&f32t(shape!["B", 8]), &i32t(shape![2])],
        &["index [2] must match data [B, 8] on every axis but 1"],
    );
    shape_err(
        Op::Gather { axis: 2 },
        &[&f32t(shape![4, 8]), &i32t(shape![4, 2])],
        &["axis 2 is out of range for rank 2"],
    );
}

#[test]
fn scatter_add_yields_its_declared_shape_with_the_source_type() {
    assert_eq!(
        ok(
            Op::ScatterAdd {
                axis: 1,
                shape: shape!["B", 8]
            },
            &[&i32t(shape!["B", 2]), &f32t(shape!["B", 2])]
        ),
        f32t(shape!["B", 8])
    );
    assert_eq!(
        ok(
            Op::ScatterAdd {
                axis: 0,
                shape: shape![3, 4]
            },
            &[&i32t(shape![6, 4]), &f64t(shape![6, 4])]
        ),
        f64t(shape![3, 4])
    );
}

#[test]
fn scatter_add_rejects_bad_types_shapes_and_axes() {
    let op = Op::ScatterAdd {
        axis: 1,
        shape: shape![4, 8],
    };
    dtype_err(
        op.clone(),
        &[&f32t(shape![4, 2]), &f32t(shape![4, 2])],
        "an i32 index and a float source",
        "f32[4, 2], f32[4, 2]",
    );
    dtype_err(
        op.clone(),
        &[&i32t(shape![4, 2]), &i32t(shape![4, 2])],
        "an i32 index and a float source",
        "i32[4, 2], i32[4, 2]",
    );
    let msg = shape_err(
        op.clone(),
        &[&i32t(shape![4, 2]), &f32t(shape![4, 3])],
        &["[4, 2]", "[4, 3]"],
    );
    assert_eq!(
        msg,
        "`scatter_add axis=1`: index [4, 2] and source [4, 3] must have one shape"
    );
    shape_err(
        op,
        &[&i32t(shape![3, 2]), &f32t(shape![3, 2])],
        &["index [3, 2] must match data [4, 8] on every axis but 1"],
    );
    shape_err(
        Op::ScatterAdd {
            axis: 2,
            shape: shape![4, 8],
        },
        &[&i32t(shape![4, 2]), &f32t(shape![4, 2])],
        &["axis 2 is out of range for rank 2"],
    );
}

#[test]
fn top_k_yields_i32_indices_of_width_k() {
    let x = f32t(shape!["B", 8]);
    assert_eq!(ok(Op::TopK { k: 2 }, &[&x]), i32t(shape!["B", 2]));
    assert_eq!(ok(Op::TopK { k: 1 }, &[&x]), i32t(shape!["B", 1]));
    assert_eq!(ok(Op::TopK { k: 8 }, &[&x]), i32t(shape!["B", 8]));
    assert_eq!(
        ok(Op::TopK { k: 3 }, &[&f64t(shape![2, 5, 4])]),
        i32t(shape![2, 5, 3])
    );
}

#[test]
fn top_k_rejects_k_outside_the_last_dimension() {
    let x = f32t(shape!["B", 8]);
    let msg = shape_err(Op::TopK { k: 9 }, &[&x], &["k = 9", "(8)"]);
    assert_eq!(
        msg,
        "`top_k k=9`: k = 9 must be between 1 and the last dimension (8)"
    );
    shape_err(
        Op::TopK { k: 0 },
        &[&x],
        &["k = 0 must be between 1 and the last dimension (8)"],
    );
    // A symbolic last dimension has no known width.
    shape_err(
        Op::TopK { k: 1 },
        &[&f32t(shape![4, "B"])],
        &["k = 1 must be between 1 and the last dimension (B)"],
    );
    shape_err(
        Op::TopK { k: 1 },
        &[&f32t(shape![])],
        &["needs at least one axis"],
    );
    dtype_err(
        Op::TopK { k: 1 },
        &[&i32t(shape![4])],
        "floating-point",
        "i32[4]",
    );
}

// ---------------------------------------------------------------------------------
// Through the graph
// ---------------------------------------------------------------------------------

#[test]
fn graph_push_records_inferred_types() {
    let mut g = Graph::new("ffn");
    let x = GraphBuilder::new(&mut g, "inputs.x")
        .input("x", DType::F32, shape!["B", 5, 16])
        .unwrap();
    let w = GraphBuilder::new(&mut g, "experts.w_up")
        .parameter("w", DType::F32, shape![4, 1, 16, 32])
        .unwrap();
    let y = g
        .push(Op::matmul(false, false), &[x, w], "experts.up")
        .unwrap();
    let node = g.node(y);
    assert_eq!(node.ty, f32t(shape![4, "B", 5, 32]));
    assert_eq!(node.origin, "experts.up");
    assert_eq!(g.operands(y), vec![x, w]);
}

#[test]
fn graph_push_errors_carry_the_node_origin() {
    let mut g = Graph::new("ffn");
    let x = GraphBuilder::new(&mut g, "inputs.x")
        .input("x", DType::F32, shape!["B", 16])
        .unwrap();
    let w = GraphBuilder::new(&mut g, "layers[0].ffn.w_up")
        .parameter("w", DType::F32, shape![32, 64])
        .unwrap();
    let e = g
        .push(Op::matmul(false, false), &[x, w], "layers[0].ffn.up")
        .unwrap_err();
    let GraphError::Type {
        index,
        origin,
        source,
    } = &e
    else {
        panic!("expected a type error, got {e:?}");
    };
    assert_eq!(*index, 2, "the index the node would have had");
    assert_eq!(origin, "layers[0].ffn.up");
    assert!(matches!(**source, TypeError::Shape { .. }), "{source:?}");
    assert_eq!(
        e.to_string(),
        "node 2 (layers[0].ffn.up): `matmul`: inner dimensions differ: [B, 16] x [32, 64] \
         (contracting 16 with 32)"
    );
    // The failed node was not added.
    assert_eq!(g.len(), 2);

    // Arity and dtype errors carry the origin the same way.
    let e = g
        .push(Op::Unary(UnaryOp::Gelu), &[x, w], "layers[0].ffn.act")
        .unwrap_err();
    assert!(matches!(
        &e,
        GraphError::Type { origin, source, .. }
            if origin == "layers[0].ffn.act" && matches!(**source, TypeError::Arity { .. })
    ));
    assert!(e.to_string().starts_with("node 2 (layers[0].ffn.act): "));
}

#[test]
fn dropout_rate_must_be_a_probability_below_one() {
    let x = TensorType::new(DType::F32, shape!["B", 4]);
    for rate in [1.0, 1.5, -0.1, f64::NAN] {
        let op = Op::Dropout {
            rate: Scalar(rate),
            stream: 0,
        };
        let err = infer(&op, &[&x]).unwrap_err();
        assert!(
            err.to_string().contains("is not in [0, 1)"),
            "rate {rate}: {err}"
        );
    }
}

#[test]
fn sparse_dispatch_ops_follow_the_assignments() {
    let top = i32t(shape!["B", 7, 2]);
    let order = ok(Op::ExpertOrder { experts: 4 }, &[&top]);
    assert_eq!(order, i32t(shape!["B", 7, 2]));
    let offsets = ok(Op::ExpertOffsets { experts: 4 }, &[&top]);
    assert_eq!(offsets, i32t(shape![5]));
    // Token rows fan out to their 2 slots; assignment rows map one to one.
    let tokens = f32t(shape!["B", 7, 16]);
    let grouped = Op::ExpertMatMul {
        transpose_w: false,
        bias: true,
    };
    let (w1, b1) = (f32t(shape![4, 16, 32]), f32t(shape![4, 32]));
    let hidden = ok(grouped.clone(), &[&tokens, &w1, &b1, &order, &offsets]);
    assert_eq!(hidden, f32t(shape!["B", 7, 2, 32]));
    let back = Op::ExpertMatMul {
        transpose_w: true,
        bias: false,
    };
    assert_eq!(
        ok(back, &[&hidden, &w1, &order, &offsets]),
        f32t(shape!["B", 7, 2, 16])
    );
    assert_eq!(
        ok(Op::ExpertWeightGrad, &[&tokens, &hidden, &order, &offsets]),
        f32t(shape![4, 16, 32])
    );
}

#[test]
fn sparse_dispatch_ops_reject_what_does_not_fit() {
    let top = i32t(shape!["B", 7, 2]);
    let order = i32t(shape!["B", 7, 2]);
    let offsets = i32t(shape![5]);
    let grouped = Op::ExpertMatMul {
        transpose_w: false,
        bias: true,
    };
    let tokens = f32t(shape!["B", 7, 16]);
    shape_err(
        grouped.clone(),
        &[
            &tokens,
            &f32t(shape![3, 16, 32]),
            &f32t(shape![4, 32]),
            &order,
            &offsets,
        ],
        &["weights [3, 16, 32] must be [4, K, M]"],
    );
    shape_err(
        grouped.clone(),
        &[
            &f32t(shape!["B", 7, 15]),
            &f32t(shape![4, 16, 32]),
            &f32t(shape![4, 32]),
            &order,
            &offsets,
        ],
        &["do not fit weights", "K = 16"],
    );
    shape_err(
        grouped.clone(),
        &[
            &tokens,
            &f32t(shape![4, 16, 32]),
            &f32t(shape![4, 31]),
            &order,
            &offsets,
        ],
        &["bias [4, 31] must be [4, 32]"],
    );
    shape_err(
        grouped,
        &[
            &f32t(shape![7, "B", 16]),
            &f32t(shape![4, 16, 32]),
            &f32t(shape![4, 32]),
            &order,
            &offsets,
        ],
        &["must lead with a prefix of the assignments"],
    );
    shape_err(
        Op::ExpertOffsets { experts: 0 },
        &[&top],
        &["needs at least one expert"],
    );
}
