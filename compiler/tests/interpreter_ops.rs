//! The reference interpreter, op by op, against values worked out by hand (the
//! arithmetic is in the comments). Where an op computes in floats, it is checked in
//! both `f32` and `f64`. Comparisons are exact wherever every intermediate value is
//! exactly representable (small integers, halves, quarters); transcendental results
//! are compared with a stated tolerance.

use altc_compiler::ir::{
    BinaryOp, BuildGraph, CompareOp, DType, Dim, Graph, GraphBuilder, NodeId, Op, ReduceOp, Scalar,
    Shape, UnaryOp,
};
use altc_compiler::reference::{run, EvalContext, EvalError, Tensor, TensorMap};
use altc_compiler::{rng, shape};

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

const FLOATS: [DType; 2] = [DType::F32, DType::F64];

/// Tolerances for results that are not exact: a few ulps of f64, and about 8 ulps
/// of f32 around 1.
const TOL_F64: f64 = 1e-14;
const TOL_F32: f64 = 1e-6;

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => TOL_F32,
        _ => TOL_F64,
    }
}

/// A float tensor of `dtype` (values are written as f64 and must be exact in f32 when
/// the test compares exactly).
fn ft(dtype: DType, shape: &[usize], values: &[f64]) -> Tensor {
    Tensor::from_f64(dtype, shape, values.to_vec())
}

fn concrete(shape: &[usize]) -> Shape {
    Shape(shape.iter().map(|&d| Dim::Fixed(d)).collect())
}

fn input(g: &mut Graph, name: &str, dtype: DType, shape: Shape) -> NodeId {
    GraphBuilder::new(g, format!("inputs.{name}"))
        .input(name, dtype, shape)
        .unwrap()
}

/// Builds `op(x0, x1, ...)` with one `Input` per tensor (named `x0`, `x1`, ... and
/// typed by the tensor's concrete shape) and runs it.
fn try_run_op(op: Op, inputs: Vec<Tensor>, ctx: EvalContext) -> Result<Tensor, EvalError> {
    let mut g = Graph::new("one_op");
    let mut ids = Vec::new();
    let mut feed = TensorMap::new();
    for (i, t) in inputs.into_iter().enumerate() {
        let name = format!("x{i}");
        ids.push(input(&mut g, &name, t.dtype(), concrete(&t.shape)));
        feed.insert(name, t);
    }
    let y = g.push(op, &ids, "op under test").unwrap();
    g.set_output("y", y).unwrap();
    let mut out = run(&g, &feed, &TensorMap::new(), ctx)?;
    Ok(out.remove("y").expect("the output is named y"))
}

fn run_op_ctx(op: Op, inputs: Vec<Tensor>, ctx: EvalContext) -> Tensor {
    let desc = op.mnemonic();
    try_run_op(op, inputs, ctx).unwrap_or_else(|e| panic!("`{desc}` failed: {e}"))
}

fn run_op(op: Op, inputs: Vec<Tensor>) -> Tensor {
    run_op_ctx(op, inputs, EvalContext::default())
}

/// Asserts a float result: element type, shape and values to within `tol`.
fn assert_close(got: &Tensor, dtype: DType, shape: &[usize], want: &[f64], tol: f64) {
    assert_eq!(got.dtype(), dtype, "element type of {got}");
    assert_eq!(got.shape, shape, "shape of {got}");
    let v = got.to_f64();
    assert_eq!(v.len(), want.len());
    for (i, (g, w)) in v.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{dtype} element {i}: got {g}, want {w} (tolerance {tol}); whole result {got}"
        );
    }
}

/// Asserts a result exactly: element type, shape and values.
fn assert_exact(got: &Tensor, dtype: DType, shape: &[usize], want: &[f64]) {
    assert_eq!(got.dtype(), dtype, "element type of {got}");
    assert_eq!(got.shape, shape, "shape of {got}");
    assert_eq!(got.to_f64(), want, "values of {got}");
}

fn assert_i32(got: &Tensor, shape: &[usize], want: &[i32]) {
    assert_eq!(got.shape, shape, "shape of {got}");
    assert_eq!(got.as_i32(), Some(want), "values of {got}");
}

fn assert_bool(got: &Tensor, shape: &[usize], want: &[bool]) {
    assert_eq!(got.shape, shape, "shape of {got}");
    assert_eq!(got, &Tensor::bool(shape, want.to_vec()));
}

// ---------------------------------------------------------------------------------
// Unary
// ---------------------------------------------------------------------------------

fn check_unary(u: UnaryOp, x: &[f64], want: &[f64], exact: bool) {
    for dtype in FLOATS {
        let got = run_op(Op::Unary(u), vec![ft(dtype, &[x.len()], x)]);
        if exact {
            assert_exact(&got, dtype, &[x.len()], want);
        } else {
            assert_close(&got, dtype, &[x.len()], want, tol(dtype));
        }
    }
}

#[test]
fn unary_exact_ops() {
    check_unary(UnaryOp::Neg, &[-2.0, 0.0, 1.5], &[2.0, 0.0, -1.5], true);
    check_unary(UnaryOp::Abs, &[-2.0, 0.0, 1.5], &[2.0, 0.0, 1.5], true);
    // sqrt(4) = 2, sqrt(2.25) = 1.5, sqrt(0) = 0
    check_unary(UnaryOp::Sqrt, &[4.0, 2.25, 0.0], &[2.0, 1.5, 0.0], true);
    // 1/sqrt(4) = 0.5, 1/sqrt(0.25) = 2, 1/sqrt(16) = 0.25
    check_unary(UnaryOp::Rsqrt, &[4.0, 0.25, 16.0], &[0.5, 2.0, 0.25], true);
    check_unary(UnaryOp::Recip, &[2.0, -4.0, 0.5], &[0.5, -0.25, 2.0], true);
    // 3^2 = 9, (-1.5)^2 = 2.25
    check_unary(UnaryOp::Square, &[3.0, -1.5, 0.0], &[9.0, 2.25, 0.0], true);
    check_unary(UnaryOp::Relu, &[-1.0, 0.0, 2.5], &[0.0, 0.0, 2.5], true);
}

#[test]
fn unary_transcendental_ops() {
    // e^0 = 1, e^1 = e, e^-1 = 1/e
    check_unary(
        UnaryOp::Exp,
        &[0.0, 1.0, -1.0],
        &[1.0, std::f64::consts::E, 0.36787944117144233],
        false,
    );
    // ln 1 = 0, ln e = 1, ln 0.5 = -ln 2
    check_unary(
        UnaryOp::Log,
        &[1.0, std::f64::consts::E, 0.5],
        &[0.0, 1.0, -std::f64::consts::LN_2],
        false,
    );
    check_unary(
        UnaryOp::Tanh,
        &[0.0, 1.0, -0.5],
        &[0.0, 0.7615941559557649, -0.46211715726000974],
        false,
    );
    // sigmoid(0) = 1/2, sigmoid(2) = 1/(1+e^-2), sigmoid(-1) = 1/(1+e)
    check_unary(
        UnaryOp::Sigmoid,
        &[0.0, 2.0, -1.0],
        &[0.5, 0.8807970779778823, 0.2689414213699951],
        false,
    );
    // gelu(x) = x * Phi(x): Phi(1) = 0.8413447460685429, Phi(-1) = 1 - Phi(1),
    // Phi(2) = 0.9772498680518208, so gelu(2) = 1.9544997361036416.
    check_unary(
        UnaryOp::Gelu,
        &[0.0, 1.0, -1.0, 2.0],
        &[
            0.0,
            0.8413447460685429,
            -0.15865525393145707,
            1.9544997361036416,
        ],
        false,
    );
    // erf(0) = 0, erf(1) = 0.8427007929497149 (A&S table 7.1), erf is odd.
    check_unary(
        UnaryOp::Erf,
        &[0.0, 1.0, -1.0],
        &[0.0, 0.8427007929497149, -0.8427007929497149],
        false,
    );
    // silu(x) = x * sigmoid(x): silu(1) = sigmoid(1), silu(-1) = -sigmoid(-1)
    check_unary(
        UnaryOp::Silu,
        &[0.0, 1.0, -1.0],
        &[0.0, 0.7310585786300049, -0.2689414213699951],
        false,
    );
}

#[test]
fn unary_ops_keep_the_shape() {
    let x = ft(DType::F32, &[2, 1, 2], &[1.0, -2.0, 3.0, -4.0]);
    let got = run_op(Op::Unary(UnaryOp::Abs), vec![x]);
    assert_exact(&got, DType::F32, &[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
}

// ---------------------------------------------------------------------------------
// Binary, Compare, Where, Cast
// ---------------------------------------------------------------------------------

#[test]
fn binary_ops_broadcast_a_row_vector() {
    // a = [[1, 2, 3], [4, 5, 6]], b = [2, 4, 0.5] repeated for each row.
    let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [2.0, 4.0, 0.5];
    let cases: [(BinaryOp, [f64; 6]); 6] = [
        (BinaryOp::Add, [3.0, 6.0, 3.5, 6.0, 9.0, 6.5]),
        (BinaryOp::Sub, [-1.0, -2.0, 2.5, 2.0, 1.0, 5.5]),
        (BinaryOp::Mul, [2.0, 8.0, 1.5, 8.0, 20.0, 3.0]),
        (BinaryOp::Div, [0.5, 0.5, 6.0, 2.0, 1.25, 12.0]),
        (BinaryOp::Max, [2.0, 4.0, 3.0, 4.0, 5.0, 6.0]),
        (BinaryOp::Min, [1.0, 2.0, 0.5, 2.0, 4.0, 0.5]),
    ];
    for dtype in FLOATS {
        for (op, want) in cases {
            let got = run_op(
                Op::Binary(op),
                vec![ft(dtype, &[2, 3], &a), ft(dtype, &[3], &b)],
            );
            assert_exact(&got, dtype, &[2, 3], &want);
        }
        // Pow: 1^2, 2^4, 3^0.5, 4^2, 5^4, 6^0.5
        let got = run_op(
            Op::Binary(BinaryOp::Pow),
            vec![ft(dtype, &[2, 3], &a), ft(dtype, &[3], &b)],
        );
        assert_close(
            &got,
            dtype,
            &[2, 3],
            &[
                1.0,
                16.0,
                1.7320508075688772,
                16.0,
                625.0,
                2.449489742783178,
            ],
            tol(dtype),
        );
    }
}

#[test]
fn binary_ops_broadcast_a_column_against_a_row() {
    // a = [[1], [2]] (2x1), b = [[10, 20, 30]] (1x3): an outer sum / product.
    for dtype in FLOATS {
        let a = || ft(dtype, &[2, 1], &[1.0, 2.0]);
        let b = || ft(dtype, &[1, 3], &[10.0, 20.0, 30.0]);
        let sum = run_op(Op::Binary(BinaryOp::Add), vec![a(), b()]);
        assert_exact(&sum, dtype, &[2, 3], &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
        let prod = run_op(Op::Binary(BinaryOp::Mul), vec![a(), b()]);
        assert_exact(&prod, dtype, &[2, 3], &[10.0, 20.0, 30.0, 20.0, 40.0, 60.0]);
        // The broadcast side may also come first: b - a.
        let diff = run_op(Op::Binary(BinaryOp::Sub), vec![b(), a()]);
        assert_exact(&diff, dtype, &[2, 3], &[9.0, 19.0, 29.0, 8.0, 18.0, 28.0]);
        // A scalar against a matrix.
        let half = run_op(Op::Binary(BinaryOp::Div), vec![b(), ft(dtype, &[], &[2.0])]);
        assert_exact(&half, dtype, &[1, 3], &[5.0, 10.0, 15.0]);
    }
}

#[test]
fn comparisons_yield_bools() {
    // a = [[1, 2, 3], [4, 5, 6]] against b = [2, 2, 5] on each row.
    let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [2.0, 2.0, 5.0];
    const T: bool = true;
    const F: bool = false;
    let cases = [
        (CompareOp::Lt, [T, F, T, F, F, F]),
        (CompareOp::Le, [T, T, T, F, F, F]),
        (CompareOp::Gt, [F, F, F, T, T, T]),
        (CompareOp::Ge, [F, T, F, T, T, T]),
        (CompareOp::Eq, [F, T, F, F, F, F]),
        (CompareOp::Ne, [T, F, T, T, T, T]),
    ];
    for dtype in [DType::F32, DType::F64, DType::I32] {
        for (cmp, want) in cases {
            let got = run_op(
                Op::Compare(cmp),
                vec![ft(dtype, &[2, 3], &a), ft(dtype, &[3], &b)],
            );
            assert_eq!(got.dtype(), DType::Bool);
            assert_bool(&got, &[2, 3], &want);
        }
    }
    // [2, 1] against [1, 3]: x < y for x in {1, 3}, y in {0, 2, 4}.
    let got = run_op(
        Op::Compare(CompareOp::Lt),
        vec![
            Tensor::i32(&[2, 1], vec![1, 3]),
            Tensor::i32(&[1, 3], vec![0, 2, 4]),
        ],
    );
    assert_bool(&got, &[2, 3], &[F, T, T, F, F, T]);
}

#[test]
fn where_selects_with_broadcasting() {
    // cond = [[true], [false]], a = [[1, 2, 3]], b = -1 (a scalar)
    for dtype in FLOATS {
        let got = run_op(
            Op::Where,
            vec![
                Tensor::bool(&[2, 1], vec![true, false]),
                ft(dtype, &[1, 3], &[1.0, 2.0, 3.0]),
                ft(dtype, &[], &[-1.0]),
            ],
        );
        assert_exact(&got, dtype, &[2, 3], &[1.0, 2.0, 3.0, -1.0, -1.0, -1.0]);
    }
    // Elementwise condition with i32 branches.
    let got = run_op(
        Op::Where,
        vec![
            Tensor::bool(&[4], vec![true, false, false, true]),
            Tensor::i32(&[4], vec![1, 2, 3, 4]),
            Tensor::i32(&[4], vec![10, 20, 30, 40]),
        ],
    );
    assert_i32(&got, &[4], &[1, 20, 30, 4]);
    // Bool branches.
    let got = run_op(
        Op::Where,
        vec![
            Tensor::bool(&[2], vec![true, false]),
            Tensor::bool(&[2], vec![false, false]),
            Tensor::bool(&[2], vec![true, true]),
        ],
    );
    assert_bool(&got, &[2], &[false, true]);
}

#[test]
fn cast_float_to_i32_truncates_towards_zero() {
    for dtype in FLOATS {
        let x = ft(dtype, &[6], &[2.7, -2.7, 0.5, -0.5, 3.0, -0.0]);
        let got = run_op(Op::Cast { dtype: DType::I32 }, vec![x]);
        assert_i32(&got, &[6], &[2, -2, 0, 0, 3, 0]);
    }
}

#[test]
fn cast_between_bools_ints_and_floats() {
    // bool -> float: true is 1, false is 0.
    for dtype in FLOATS {
        let got = run_op(
            Op::Cast { dtype },
            vec![Tensor::bool(&[3], vec![true, false, true])],
        );
        assert_exact(&got, dtype, &[3], &[1.0, 0.0, 1.0]);
    }
    // i32 -> f32 is exact for small integers.
    let got = run_op(
        Op::Cast { dtype: DType::F32 },
        vec![Tensor::i32(&[3], vec![3, -1, 0])],
    );
    assert_exact(&got, DType::F32, &[3], &[3.0, -1.0, 0.0]);
    // float and i32 -> bool: anything but zero is true (-0.0 is zero).
    let got = run_op(
        Op::Cast { dtype: DType::Bool },
        vec![Tensor::f32(&[4], vec![0.0, -0.0, 2.0, -0.5])],
    );
    assert_bool(&got, &[4], &[false, false, true, true]);
    let got = run_op(
        Op::Cast { dtype: DType::Bool },
        vec![Tensor::i32(&[3], vec![0, 7, -1])],
    );
    assert_bool(&got, &[3], &[false, true, true]);
    // f64 -> f32 rounds to nearest; f32 -> f64 is exact.
    let got = run_op(
        Op::Cast { dtype: DType::F32 },
        vec![Tensor::f64(&[2], vec![0.1, 1.0 + 1e-12])],
    );
    assert_eq!(got, Tensor::f32(&[2], vec![0.1f32, 1.0f32]));
    let got = run_op(
        Op::Cast { dtype: DType::F64 },
        vec![Tensor::f32(&[1], vec![0.1f32])],
    );
    assert_eq!(got, Tensor::f64(&[1], vec![0.1f32 as f64]));
}

// ---------------------------------------------------------------------------------
// Reduce
// ---------------------------------------------------------------------------------

#[test]
fn reduce_over_one_axis() {
    // x = [[1, 2, 3], [4, 5, 6]]
    let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    for dtype in FLOATS {
        let r = |op, axes: &[usize], keep| {
            run_op(Op::reduce(op, axes, keep), vec![ft(dtype, &[2, 3], &x)])
        };
        // Row sums 1+2+3 = 6, 4+5+6 = 15; column sums 1+4, 2+5, 3+6.
        assert_exact(&r(ReduceOp::Sum, &[1], false), dtype, &[2], &[6.0, 15.0]);
        assert_exact(&r(ReduceOp::Sum, &[1], true), dtype, &[2, 1], &[6.0, 15.0]);
        assert_exact(
            &r(ReduceOp::Sum, &[0], false),
            dtype,
            &[3],
            &[5.0, 7.0, 9.0],
        );
        assert_exact(
            &r(ReduceOp::Sum, &[0], true),
            dtype,
            &[1, 3],
            &[5.0, 7.0, 9.0],
        );
        // Means 6/3, 15/3 and 5/2, 7/2, 9/2.
        assert_exact(&r(ReduceOp::Mean, &[1], false), dtype, &[2], &[2.0, 5.0]);
        assert_exact(
            &r(ReduceOp::Mean, &[0], true),
            dtype,
            &[1, 3],
            &[2.5, 3.5, 4.5],
        );
        assert_exact(&r(ReduceOp::Max, &[1], false), dtype, &[2], &[3.0, 6.0]);
        assert_exact(
            &r(ReduceOp::Max, &[0], true),
            dtype,
            &[1, 3],
            &[4.0, 5.0, 6.0],
        );
        assert_exact(&r(ReduceOp::Min, &[1], true), dtype, &[2, 1], &[1.0, 4.0]);
        assert_exact(
            &r(ReduceOp::Min, &[0], false),
            dtype,
            &[3],
            &[1.0, 2.0, 3.0],
        );
    }
}

#[test]
fn reduce_max_and_min_start_from_the_data() {
    // All-negative maxima and all-positive minima: the result is an element, not 0.
    for dtype in FLOATS {
        let got = run_op(
            Op::reduce(ReduceOp::Max, &[0], false),
            vec![ft(dtype, &[3], &[-3.0, -1.0, -2.0])],
        );
        assert_exact(&got, dtype, &[], &[-1.0]);
        let got = run_op(
            Op::reduce(ReduceOp::Min, &[0], false),
            vec![ft(dtype, &[3], &[3.0, 7.0, 2.0])],
        );
        assert_exact(&got, dtype, &[], &[2.0]);
    }
}

#[test]
fn reduce_over_several_axes() {
    // x[i][j][k] = 6i + 2j + k + 1, shape [2, 3, 2]:
    // [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 10], [11, 12]]]
    let x: Vec<f64> = (1..=12).map(f64::from).collect();
    for dtype in FLOATS {
        let r = |op, axes: &[usize], keep| {
            run_op(Op::reduce(op, axes, keep), vec![ft(dtype, &[2, 3, 2], &x)])
        };
        // Over i and k, per j: 1+2+7+8 = 18, 3+4+9+10 = 26, 5+6+11+12 = 34.
        assert_exact(
            &r(ReduceOp::Sum, &[0, 2], false),
            dtype,
            &[3],
            &[18.0, 26.0, 34.0],
        );
        assert_exact(
            &r(ReduceOp::Sum, &[2, 0], true),
            dtype,
            &[1, 3, 1],
            &[18.0, 26.0, 34.0],
        );
        // The same sums over 4 elements each.
        assert_exact(
            &r(ReduceOp::Mean, &[0, 2], false),
            dtype,
            &[3],
            &[4.5, 6.5, 8.5],
        );
        // Over j and k, per i: max 6 and 12, min 1 and 7.
        assert_exact(&r(ReduceOp::Max, &[1, 2], false), dtype, &[2], &[6.0, 12.0]);
        assert_exact(
            &r(ReduceOp::Min, &[1, 2], true),
            dtype,
            &[2, 1, 1],
            &[1.0, 7.0],
        );
        // Over i and j, per k: max(1,3,5,7,9,11) = 11, max(2,...,12) = 12.
        assert_exact(
            &r(ReduceOp::Max, &[0, 1], false),
            dtype,
            &[2],
            &[11.0, 12.0],
        );
        assert_exact(&r(ReduceOp::Min, &[0, 1], false), dtype, &[2], &[1.0, 2.0]);
        // Everything: 1 + ... + 12 = 78, mean 78 / 12 = 6.5.
        assert_exact(&r(ReduceOp::Sum, &[0, 1, 2], false), dtype, &[], &[78.0]);
        assert_exact(
            &r(ReduceOp::Mean, &[0, 1, 2], true),
            dtype,
            &[1, 1, 1],
            &[6.5],
        );
        // No axes: the identity.
        assert_exact(&r(ReduceOp::Mean, &[], false), dtype, &[2, 3, 2], &x);
    }
}

// ---------------------------------------------------------------------------------
// MatMul
// ---------------------------------------------------------------------------------

// A = [[1, 2, 3], [4, 5, 6]], B = [[7, 8], [9, 10], [11, 12]]:
// AB = [[1*7 + 2*9 + 3*11, 1*8 + 2*10 + 3*12],   = [[ 58,  64],
//       [4*7 + 5*9 + 6*11, 4*8 + 5*10 + 6*12]]      [139, 154]]
const A: [f64; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
const A_T: [f64; 6] = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]; // A transposed, [3, 2]
const B: [f64; 6] = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
const B_T: [f64; 6] = [7.0, 9.0, 11.0, 8.0, 10.0, 12.0]; // B transposed, [2, 3]
const AB: [f64; 4] = [58.0, 64.0, 139.0, 154.0];

#[test]
fn matmul_2d() {
    for dtype in FLOATS {
        let got = run_op(
            Op::matmul(false, false),
            vec![ft(dtype, &[2, 3], &A), ft(dtype, &[3, 2], &B)],
        );
        assert_exact(&got, dtype, &[2, 2], &AB);
        // B A = [[7+32, 14+40, 21+48], [9+40, 18+50, 27+60], [11+48, 22+60, 33+72]]
        let got = run_op(
            Op::matmul(false, false),
            vec![ft(dtype, &[3, 2], &B), ft(dtype, &[2, 3], &A)],
        );
        assert_exact(
            &got,
            dtype,
            &[3, 3],
            &[39.0, 54.0, 69.0, 49.0, 68.0, 87.0, 59.0, 82.0, 105.0],
        );
    }
}

#[test]
fn matmul_with_transposed_operands() {
    for dtype in FLOATS {
        // A stored transposed: (A^T)^T B = AB.
        let got = run_op(
            Op::matmul(true, false),
            vec![ft(dtype, &[3, 2], &A_T), ft(dtype, &[3, 2], &B)],
        );
        assert_exact(&got, dtype, &[2, 2], &AB);
        // B stored transposed: A (B^T)^T = AB.
        let got = run_op(
            Op::matmul(false, true),
            vec![ft(dtype, &[2, 3], &A), ft(dtype, &[2, 3], &B_T)],
        );
        assert_exact(&got, dtype, &[2, 2], &AB);
        // Both.
        let got = run_op(
            Op::matmul(true, true),
            vec![ft(dtype, &[3, 2], &A_T), ft(dtype, &[2, 3], &B_T)],
        );
        assert_exact(&got, dtype, &[2, 2], &AB);
        // A A^T with the same tensor on both sides: [[1+4+9, 4+10+18], [.., 16+25+36]].
        let got = run_op(
            Op::matmul(false, true),
            vec![ft(dtype, &[2, 3], &A), ft(dtype, &[2, 3], &A)],
        );
        assert_exact(&got, dtype, &[2, 2], &[14.0, 32.0, 32.0, 77.0]);
    }
}

#[test]
fn matmul_batched_with_a_shared_right_operand() {
    // a[0] = I, a[1] = [[0, 1], [1, 0]] (swaps rows); b = [[1, 2], [3, 4]] for both.
    for dtype in FLOATS {
        let got = run_op(
            Op::matmul(false, false),
            vec![
                ft(dtype, &[2, 2, 2], &[1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]),
                ft(dtype, &[2, 2], &[1.0, 2.0, 3.0, 4.0]),
            ],
        );
        assert_exact(
            &got,
            dtype,
            &[2, 2, 2],
            &[1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 1.0, 2.0],
        );
    }
}

#[test]
fn matmul_batched_tokens_against_experts() {
    // [B, L, h] x [E, 1, h, k] -> [E, B, L, k] with B = 2, L = 1, h = 2, E = 2, k = 1.
    // tokens: t0 = [1, 2], t1 = [3, 4]; experts: w0 = [5, 6]^T, w1 = [7, 8]^T.
    // out[e][b] = t_b . w_e:
    //   e0: 1*5 + 2*6 = 17, 3*5 + 4*6 = 39;  e1: 1*7 + 2*8 = 23, 3*7 + 4*8 = 53
    for dtype in FLOATS {
        let got = run_op(
            Op::matmul(false, false),
            vec![
                ft(dtype, &[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]),
                ft(dtype, &[2, 1, 2, 1], &[5.0, 6.0, 7.0, 8.0]),
            ],
        );
        assert_exact(&got, dtype, &[2, 2, 1, 1], &[17.0, 39.0, 23.0, 53.0]);
    }
}

#[test]
fn matmul_batched_on_both_sides_with_transpose() {
    // a: [2, 1, 2] = [[[1, 2]], [[3, 4]]]; b: [2, 2, 2] transposed per batch,
    // b[0] = [[1, 0], [0, 1]] -> b[0]^T = I; b[1] = [[1, 2], [3, 4]] -> b[1]^T = [[1, 3], [2, 4]].
    // out[0] = [1, 2] I = [1, 2]; out[1] = [3, 4] [[1, 3], [2, 4]] = [3+8, 9+16] = [11, 25].
    for dtype in FLOATS {
        let got = run_op(
            Op::matmul(false, true),
            vec![
                ft(dtype, &[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]),
                ft(dtype, &[2, 2, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 4.0]),
            ],
        );
        assert_exact(&got, dtype, &[2, 1, 2], &[1.0, 2.0, 11.0, 25.0]);
    }
}

// ---------------------------------------------------------------------------------
// Layout: Transpose, Reshape, BroadcastTo, Slice, Concat
// ---------------------------------------------------------------------------------

#[test]
fn transpose_3d() {
    // x[j][k][i] = 6j + 2k + i, shape [2, 3, 2], values 0..12.
    let x: Vec<f64> = (0..12).map(f64::from).collect();
    for dtype in FLOATS {
        // perm [2, 0, 1]: out[i][j][k] = x[j][k][i], shape [2, 2, 3].
        // i = 0: 0, 2, 4 | 6, 8, 10; i = 1: 1, 3, 5 | 7, 9, 11
        let got = run_op(
            Op::Transpose {
                perm: vec![2, 0, 1],
            },
            vec![ft(dtype, &[2, 3, 2], &x)],
        );
        assert_exact(
            &got,
            dtype,
            &[2, 2, 3],
            &[0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 1.0, 3.0, 5.0, 7.0, 9.0, 11.0],
        );
        // perm [1, 0, 2]: out[k][j][i] = x[j][k][i], shape [3, 2, 2].
        let got = run_op(
            Op::Transpose {
                perm: vec![1, 0, 2],
            },
            vec![ft(dtype, &[2, 3, 2], &x)],
        );
        assert_exact(
            &got,
            dtype,
            &[3, 2, 2],
            &[0.0, 1.0, 6.0, 7.0, 2.0, 3.0, 8.0, 9.0, 4.0, 5.0, 10.0, 11.0],
        );
    }
    // Any element type moves the same way.
    let got = run_op(
        Op::Transpose { perm: vec![1, 0] },
        vec![Tensor::i32(&[2, 3], vec![1, 2, 3, 4, 5, 6])],
    );
    assert_i32(&got, &[3, 2], &[1, 4, 2, 5, 3, 6]);
}

#[test]
fn reshape_keeps_row_major_order() {
    for dtype in FLOATS {
        let got = run_op(
            Op::Reshape {
                shape: shape![3, 2],
            },
            vec![ft(dtype, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])],
        );
        assert_exact(&got, dtype, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }
    let got = run_op(
        Op::Reshape {
            shape: shape![2, 1, 2],
        },
        vec![Tensor::bool(&[4], vec![true, false, false, true])],
    );
    assert_bool(&got, &[2, 1, 2], &[true, false, false, true]);
}

#[test]
fn broadcast_to_repeats_rows_and_columns() {
    for dtype in FLOATS {
        // [1, 2, 3] as every row of a [2, 3].
        let got = run_op(
            Op::BroadcastTo {
                shape: shape![2, 3],
            },
            vec![ft(dtype, &[3], &[1.0, 2.0, 3.0])],
        );
        assert_exact(&got, dtype, &[2, 3], &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        // [[1], [2]] as every column of a [2, 3].
        let got = run_op(
            Op::BroadcastTo {
                shape: shape![2, 3],
            },
            vec![ft(dtype, &[2, 1], &[1.0, 2.0])],
        );
        assert_exact(&got, dtype, &[2, 3], &[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
    }
    let got = run_op(
        Op::BroadcastTo {
            shape: shape![2, 2],
        },
        vec![Tensor::i32(&[], vec![7])],
    );
    assert_i32(&got, &[2, 2], &[7, 7, 7, 7]);
}

#[test]
fn slice_along_either_axis() {
    // x = [[0, 1, 2, 3], [4, 5, 6, 7]]
    let x: Vec<f64> = (0..8).map(f64::from).collect();
    for dtype in FLOATS {
        let got = run_op(
            Op::Slice {
                axis: 1,
                start: 1,
                end: 3,
            },
            vec![ft(dtype, &[2, 4], &x)],
        );
        assert_exact(&got, dtype, &[2, 2], &[1.0, 2.0, 5.0, 6.0]);
        let got = run_op(
            Op::Slice {
                axis: 0,
                start: 1,
                end: 2,
            },
            vec![ft(dtype, &[2, 4], &x)],
        );
        assert_exact(&got, dtype, &[1, 4], &[4.0, 5.0, 6.0, 7.0]);
        // An empty range.
        let got = run_op(
            Op::Slice {
                axis: 1,
                start: 2,
                end: 2,
            },
            vec![ft(dtype, &[2, 4], &x)],
        );
        assert_exact(&got, dtype, &[2, 0], &[]);
    }
    // The middle of three axes: x3[i][j][k] = 4i + 2j + k, shape [2, 2, 2]; keep j = 1.
    let got = run_op(
        Op::Slice {
            axis: 1,
            start: 1,
            end: 2,
        },
        vec![Tensor::i32(&[2, 2, 2], (0..8).collect())],
    );
    assert_i32(&got, &[2, 1, 2], &[2, 3, 6, 7]);
}

#[test]
fn concat_along_the_inner_axis() {
    for dtype in FLOATS {
        // [[1], [2]] ++ [[10, 20], [30, 40]] along axis 1.
        let got = run_op(
            Op::Concat { axis: 1 },
            vec![
                ft(dtype, &[2, 1], &[1.0, 2.0]),
                ft(dtype, &[2, 2], &[10.0, 20.0, 30.0, 40.0]),
            ],
        );
        assert_exact(&got, dtype, &[2, 3], &[1.0, 10.0, 20.0, 2.0, 30.0, 40.0]);
        // Three parts along axis 0.
        let got = run_op(
            Op::Concat { axis: 0 },
            vec![
                ft(dtype, &[1, 2], &[1.0, 2.0]),
                ft(dtype, &[2, 2], &[3.0, 4.0, 5.0, 6.0]),
                ft(dtype, &[1, 2], &[7.0, 8.0]),
            ],
        );
        assert_exact(
            &got,
            dtype,
            &[4, 2],
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        );
    }
    // i32, three parts along the last of three axes.
    let got = run_op(
        Op::Concat { axis: 2 },
        vec![
            Tensor::i32(&[2, 1, 1], vec![1, 2]),
            Tensor::i32(&[2, 1, 2], vec![3, 4, 5, 6]),
            Tensor::i32(&[2, 1, 1], vec![7, 8]),
        ],
    );
    assert_i32(&got, &[2, 1, 4], &[1, 3, 4, 7, 2, 5, 6, 8]);
}

// ---------------------------------------------------------------------------------
// Indexing: Gather, ScatterAdd, TopK
// ---------------------------------------------------------------------------------

#[test]
fn gather_along_the_last_axis() {
    // x = [[10, 20, 30], [40, 50, 60]]
    let x = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0];
    for dtype in FLOATS {
        // Row 0 picks columns 2, 0; row 1 picks 1, 1.
        let got = run_op(
            Op::Gather { axis: 1 },
            vec![
                ft(dtype, &[2, 3], &x),
                Tensor::i32(&[2, 2], vec![2, 0, 1, 1]),
            ],
        );
        assert_exact(&got, dtype, &[2, 2], &[30.0, 10.0, 50.0, 50.0]);
        // More picks than columns.
        let got = run_op(
            Op::Gather { axis: 1 },
            vec![
                ft(dtype, &[2, 3], &x),
                Tensor::i32(&[2, 4], vec![0, 0, 2, 1, 2, 2, 2, 0]),
            ],
        );
        assert_exact(
            &got,
            dtype,
            &[2, 4],
            &[10.0, 10.0, 30.0, 20.0, 60.0, 60.0, 60.0, 40.0],
        );
    }
}

#[test]
fn gather_along_the_first_axis() {
    // x = [[1, 2], [3, 4], [5, 6]]; out[0][j] = x[index[0][j]][j]:
    // x[2][0] = 5, x[0][1] = 2
    let got = run_op(
        Op::Gather { axis: 0 },
        vec![
            ft(DType::F64, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            Tensor::i32(&[1, 2], vec![2, 0]),
        ],
    );
    assert_exact(&got, DType::F64, &[1, 2], &[5.0, 2.0]);
}

#[test]
fn scatter_add_accumulates_duplicate_indices() {
    // Into zeros [2, 4] along axis 1:
    // row 0: index [0, 2, 0], src [1, 2, 4] -> out[0][0] = 1 + 4, out[0][2] = 2
    // row 1: index [3, 3, 3], src [1, 10, 100] -> out[1][3] = 111
    for dtype in FLOATS {
        let got = run_op(
            Op::ScatterAdd {
                axis: 1,
                shape: shape![2, 4],
            },
            vec![
                Tensor::i32(&[2, 3], vec![0, 2, 0, 3, 3, 3]),
                ft(dtype, &[2, 3], &[1.0, 2.0, 4.0, 1.0, 10.0, 100.0]),
            ],
        );
        assert_exact(
            &got,
            dtype,
            &[2, 4],
            &[5.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 111.0],
        );
    }
    // Along axis 0 (the adjoint of gather along axis 0): out[index[i][j]][j] += src[i][j].
    // index = [[1, 0], [1, 1]], src = [[1, 2], [3, 4]] ->
    // out[1][0] = 1 + 3 = 4, out[0][1] = 2, out[1][1] = 4
    let got = run_op(
        Op::ScatterAdd {
            axis: 0,
            shape: shape![3, 2],
        },
        vec![
            Tensor::i32(&[2, 2], vec![1, 0, 1, 1]),
            ft(DType::F32, &[2, 2], &[1.0, 2.0, 3.0, 4.0]),
        ],
    );
    assert_exact(&got, DType::F32, &[3, 2], &[0.0, 2.0, 4.0, 4.0, 0.0, 0.0]);
}

#[test]
fn top_k_breaks_ties_towards_the_lower_index() {
    // Row 0: [1, 3, 3, 2]; row 1: [5, 5, 5, 5] (all tied).
    let x = [1.0, 3.0, 3.0, 2.0, 5.0, 5.0, 5.0, 5.0];
    for dtype in FLOATS {
        let top = |k| run_op(Op::TopK { k }, vec![ft(dtype, &[2, 4], &x)]);
        assert_i32(&top(1), &[2, 1], &[1, 0]);
        assert_i32(&top(2), &[2, 2], &[1, 2, 0, 1]);
        assert_i32(&top(3), &[2, 3], &[1, 2, 3, 0, 1, 2]);
        // k = full width: a descending argsort.
        assert_i32(&top(4), &[2, 4], &[1, 2, 3, 0, 0, 1, 2, 3]);
    }
    // Negative values: [-1, -5, 0, -2] sorted descending is 0, -1, -2, -5.
    let got = run_op(
        Op::TopK { k: 4 },
        vec![ft(DType::F32, &[4], &[-1.0, -5.0, 0.0, -2.0])],
    );
    assert_eq!(got.dtype(), DType::I32);
    assert_i32(&got, &[4], &[2, 0, 3, 1]);
}

// ---------------------------------------------------------------------------------
// Sparse MoE dispatch: ExpertOrder, ExpertOffsets, ExpertMatMul, ExpertWeightGrad
// ---------------------------------------------------------------------------------

/// Two tokens with two slots each over 3 experts: token 0 -> experts (2, 0), token 1
/// -> (0, 2). Expert 1 receives nothing.
fn two_token_routing() -> Tensor {
    Tensor::i32(&[2, 2], vec![2, 0, 0, 2])
}

#[test]
fn assignments_group_stably_by_expert() {
    // Expert 0 owns assignments 1, 2 (in order), expert 1 none, expert 2 owns 0, 3.
    let order = run_op(Op::ExpertOrder { experts: 3 }, vec![two_token_routing()]);
    assert_i32(&order, &[2, 2], &[1, 2, 0, 3]);
    let offsets = run_op(Op::ExpertOffsets { experts: 3 }, vec![two_token_routing()]);
    assert_i32(&offsets, &[4], &[0, 2, 2, 4]);
    // An expert id beyond the pool is named, not wrapped.
    let e = try_run_op(
        Op::ExpertOffsets { experts: 2 },
        vec![two_token_routing()],
        EvalContext::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            EvalError::IndexOutOfRange {
                value: 2,
                size: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn grouped_expert_matmul_uses_each_assignments_expert() {
    // x rows (K = 2): token 0 = [1, 2], token 1 = [3, 4]. Expert e's weights [2, 1] are
    // [e + 1, 10 (e + 1)] and its bias is 100 e. So for an assignment of token t to
    // expert e: out = (e + 1) (x0 + 10 x1) + 100 e.
    //   token 0 (x0 + 10 x1 = 21): expert 2 -> 3 * 21 + 200 = 263, expert 0 -> 21.
    //   token 1 (= 43): expert 0 -> 43, expert 2 -> 3 * 43 + 200 = 329.
    let w = [1.0, 10.0, 2.0, 20.0, 3.0, 30.0];
    for dtype in FLOATS {
        let order = run_op(Op::ExpertOrder { experts: 3 }, vec![two_token_routing()]);
        let offsets = run_op(Op::ExpertOffsets { experts: 3 }, vec![two_token_routing()]);
        let got = run_op(
            Op::ExpertMatMul {
                transpose_w: false,
                bias: true,
            },
            vec![
                ft(dtype, &[2, 2], &[1.0, 2.0, 3.0, 4.0]),
                ft(dtype, &[3, 2, 1], &w),
                ft(dtype, &[3, 1], &[0.0, 100.0, 200.0]),
                order.clone(),
                offsets.clone(),
            ],
        );
        assert_exact(&got, dtype, &[2, 2, 1], &[263.0, 21.0, 43.0, 329.0]);

        // The weight gradient with the output rows as `b` = ones: each expert sums
        // the rows routed to it. Expert 0: [1, 2] + [3, 4]; expert 1: zeros; expert
        // 2: the same two tokens.
        let got = run_op(
            Op::ExpertWeightGrad,
            vec![
                ft(dtype, &[2, 2], &[1.0, 2.0, 3.0, 4.0]),
                ft(dtype, &[1], &[1.0]),
                order,
                offsets,
            ],
        );
        assert_exact(&got, dtype, &[3, 2, 1], &[4.0, 6.0, 0.0, 0.0, 4.0, 6.0]);
    }
}

// ---------------------------------------------------------------------------------
// Leaves with no operands: Iota, Constant (symbolic shapes bound by inputs)
// ---------------------------------------------------------------------------------

#[test]
fn iota_counts_along_its_axis() {
    let got = run_op(
        Op::Iota {
            axis: 0,
            dtype: DType::I32,
            shape: shape![2, 3],
        },
        vec![],
    );
    assert_i32(&got, &[2, 3], &[0, 0, 0, 1, 1, 1]);
    for dtype in FLOATS {
        let got = run_op(
            Op::Iota {
                axis: 1,
                dtype,
                shape: shape![2, 3],
            },
            vec![],
        );
        assert_exact(&got, dtype, &[2, 3], &[0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
    }
}

#[test]
fn constants_fill_their_shape() {
    for dtype in FLOATS {
        let got = run_op(
            Op::Constant {
                value: Scalar(-1.5),
                dtype,
                shape: shape![2, 2],
            },
            vec![],
        );
        assert_exact(&got, dtype, &[2, 2], &[-1.5; 4]);
    }
    // A scalar i32 constant; the value truncates like a cast.
    let got = run_op(
        Op::Constant {
            value: Scalar(3.9),
            dtype: DType::I32,
            shape: Shape::scalar(),
        },
        vec![],
    );
    assert_i32(&got, &[], &[3]);
    // f32 rounds the attribute to nearest.
    let got = run_op(
        Op::Constant {
            value: Scalar(0.1),
            dtype: DType::F32,
            shape: shape![1],
        },
        vec![],
    );
    assert_eq!(got, Tensor::f32(&[1], vec![0.1f32]));
}

#[test]
fn symbolic_shapes_resolve_from_the_batch_input() {
    // x: [B, 2] fed with B = 3. A constant [B, 1] and an iota [B, 2] take B = 3.
    for dtype in FLOATS {
        let mut g = Graph::new("batch");
        let x = input(&mut g, "x", dtype, shape!["B", 2]);
        let half = g
            .push(
                Op::Constant {
                    value: Scalar(0.5),
                    dtype,
                    shape: shape!["B", 1],
                },
                &[],
                "half",
            )
            .unwrap();
        let row = g
            .push(
                Op::Iota {
                    axis: 0,
                    dtype,
                    shape: shape!["B", 2],
                },
                &[],
                "row",
            )
            .unwrap();
        let sum = g
            .push(Op::Binary(BinaryOp::Add), &[x, half], "x + half")
            .unwrap();
        let flat = g
            .push(
                Op::Reshape {
                    shape: shape!["B", 2, 1],
                },
                &[sum],
                "flat",
            )
            .unwrap();
        let wide = g
            .push(
                Op::BroadcastTo {
                    shape: shape!["B", 2, 2],
                },
                &[flat],
                "wide",
            )
            .unwrap();
        g.set_output("half", half).unwrap();
        g.set_output("row", row).unwrap();
        g.set_output("sum", sum).unwrap();
        g.set_output("wide", wide).unwrap();
        let feed = TensorMap::from([(
            "x".to_string(),
            ft(dtype, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        )]);
        let out = run(&g, &feed, &TensorMap::new(), EvalContext::default()).unwrap();
        assert_exact(&out["half"], dtype, &[3, 1], &[0.5, 0.5, 0.5]);
        assert_exact(&out["row"], dtype, &[3, 2], &[0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        assert_exact(&out["sum"], dtype, &[3, 2], &[1.5, 2.5, 3.5, 4.5, 5.5, 6.5]);
        assert_exact(
            &out["wide"],
            dtype,
            &[3, 2, 2],
            &[1.5, 1.5, 2.5, 2.5, 3.5, 3.5, 4.5, 4.5, 5.5, 5.5, 6.5, 6.5],
        );
    }
}

#[test]
fn symbolic_scatter_add_resolves_its_shape() {
    // index/src [B, 1] with B = 2; scatter into [B, 3] along axis 1.
    let mut g = Graph::new("scatter");
    let index = input(&mut g, "index", DType::I32, shape!["B", 1]);
    let src = input(&mut g, "src", DType::F64, shape!["B", 1]);
    let y = g
        .push(
            Op::ScatterAdd {
                axis: 1,
                shape: shape!["B", 3],
            },
            &[index, src],
            "scatter",
        )
        .unwrap();
    g.set_output("y", y).unwrap();
    let feed = TensorMap::from([
        ("index".to_string(), Tensor::i32(&[2, 1], vec![2, 0])),
        ("src".to_string(), Tensor::f64(&[2, 1], vec![1.5, -2.0])),
    ]);
    let out = run(&g, &feed, &TensorMap::new(), EvalContext::default()).unwrap();
    assert_exact(
        &out["y"],
        DType::F64,
        &[2, 3],
        &[0.0, 0.0, 1.5, -2.0, 0.0, 0.0],
    );
}

// ---------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------

const SEED: u64 = 42;
const STEP: u64 = 7;
const STREAM: u64 = 3;

fn dropout(rate: f64, stream: u64) -> Op {
    Op::Dropout {
        rate: Scalar(rate),
        stream,
    }
}

fn ctx(seed: u64, step: u64) -> EvalContext {
    EvalContext { seed, step }
}

/// x = 1, 2, ..., 64 as a [4, 16] tensor: no zeros, so a zero output means dropped.
fn dropout_input(dtype: DType) -> Tensor {
    let v: Vec<f64> = (1..=64).map(f64::from).collect();
    ft(dtype, &[4, 16], &v)
}

#[test]
fn dropout_with_rate_zero_is_the_identity() {
    for dtype in FLOATS {
        let x = dropout_input(dtype);
        let got = run_op_ctx(dropout(0.0, STREAM), vec![x.clone()], ctx(SEED, STEP));
        assert_eq!(got, x, "scale 1/(1-0) = 1 and every draw in [0, 1) is >= 0");
    }
}

#[test]
fn dropout_scales_kept_values_and_zeroes_dropped_ones_by_the_philox_mask() {
    // rate 1/2: kept values double exactly (scale 1/(1 - 0.5) = 2).
    for dtype in FLOATS {
        let got = run_op_ctx(
            dropout(0.5, STREAM),
            vec![dropout_input(dtype)],
            ctx(SEED, STEP),
        );
        assert_eq!(got.dtype(), dtype);
        assert_eq!(got.shape, vec![4, 16]);
        let mut kept = 0;
        for (i, y) in got.to_f64().into_iter().enumerate() {
            let x = (i + 1) as f64;
            if rng::dropout_keeps(0.5, SEED, STEP, STREAM, i as u64) {
                assert_eq!(y, 2.0 * x, "element {i} is kept");
                kept += 1;
            } else {
                assert_eq!(y, 0.0, "element {i} is dropped");
            }
        }
        // Sanity: both outcomes occur (each has probability 2^-64 of not occurring).
        assert!(kept > 0 && kept < 64, "kept {kept} of 64");
    }
    // rate 1/4: kept values scale by 1/(1 - 0.25) = 4/3 (inexact: tolerance as stated).
    for dtype in FLOATS {
        let got = run_op_ctx(
            dropout(0.25, STREAM),
            vec![dropout_input(dtype)],
            ctx(SEED, STEP),
        );
        for (i, y) in got.to_f64().into_iter().enumerate() {
            let x = (i + 1) as f64;
            let want = if rng::dropout_keeps(0.25, SEED, STEP, STREAM, i as u64) {
                x * 4.0 / 3.0
            } else {
                0.0
            };
            assert!(
                (y - want).abs() <= tol(dtype) * want.abs().max(1.0),
                "{dtype} element {i}: got {y}, want {want}"
            );
        }
    }
}

/// Which elements the op kept, read back from its output (the input has no zeros).
fn kept_mask(rate: f64, stream: u64, c: EvalContext) -> Vec<bool> {
    run_op_ctx(dropout(rate, stream), vec![dropout_input(DType::F32)], c)
        .to_f64()
        .into_iter()
        .map(|y| y != 0.0)
        .collect()
}

#[test]
fn dropout_masks_are_the_same_in_f32_and_f64_and_depend_on_step_seed_and_stream() {
    let base = kept_mask(0.5, STREAM, ctx(SEED, STEP));
    let expected: Vec<bool> = (0..64)
        .map(|i| rng::dropout_keeps(0.5, SEED, STEP, STREAM, i))
        .collect();
    assert_eq!(base, expected);
    let f64_mask: Vec<bool> = run_op_ctx(
        dropout(0.5, STREAM),
        vec![dropout_input(DType::F64)],
        ctx(SEED, STEP),
    )
    .to_f64()
    .into_iter()
    .map(|y| y != 0.0)
    .collect();
    assert_eq!(f64_mask, base, "both precisions draw the same mask");
    // Rerunning is deterministic.
    assert_eq!(kept_mask(0.5, STREAM, ctx(SEED, STEP)), base);
    // Another step, seed or stream draws another mask (64 fair coins: a collision has
    // probability 2^-64).
    let next_step = kept_mask(0.5, STREAM, ctx(SEED, STEP + 1));
    assert_ne!(next_step, base);
    let expected_next: Vec<bool> = (0..64)
        .map(|i| rng::dropout_keeps(0.5, SEED, STEP + 1, STREAM, i))
        .collect();
    assert_eq!(next_step, expected_next);
    assert_ne!(kept_mask(0.5, STREAM, ctx(SEED + 1, STEP)), base);
    assert_ne!(kept_mask(0.5, STREAM + 1, ctx(SEED, STEP)), base);
}

// ---------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------

fn one_input_graph(shape: Shape) -> Graph {
    let mut g = Graph::new("g");
    let x = input(&mut g, "x", DType::F32, shape);
    let y = g.push(Op::Unary(UnaryOp::Neg), &[x], "negate").unwrap();
    g.set_output("y", y).unwrap();
    g
}

#[test]
fn a_missing_input_is_reported_by_name() {
    let g = one_input_graph(shape![2, 3]);
    let e = run(
        &g,
        &TensorMap::new(),
        &TensorMap::new(),
        EvalContext::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, EvalError::MissingInput { graph, name } if graph == "g" && name == "x"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "graph `g` needs input `x`, which was not given"
    );
}

#[test]
fn a_missing_parameter_is_reported_by_name() {
    let mut g = Graph::new("g");
    let w = GraphBuilder::new(&mut g, "params.w")
        .parameter("w", DType::F32, shape![2])
        .unwrap();
    g.set_output("w", w).unwrap();
    let e = run(
        &g,
        &TensorMap::new(),
        &TensorMap::new(),
        EvalContext::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, EvalError::MissingParameter { graph, name } if graph == "g" && name == "w"),
        "{e:?}"
    );
}

#[test]
fn a_missing_parameter_is_reported_as_a_parameter_when_one_map_serves_both() {
    // A graph with no inputs, run with one (empty) map passed as both the inputs and
    // the parameters: the missing `w` is a parameter, not an input.
    let mut g = Graph::new("g");
    let w = GraphBuilder::new(&mut g, "params.w")
        .parameter("w", DType::F32, shape![2])
        .unwrap();
    g.set_output("w", w).unwrap();
    let none = TensorMap::new();
    let e = run(&g, &none, &none, EvalContext::default()).unwrap_err();
    assert!(
        matches!(&e, EvalError::MissingParameter { graph, name } if graph == "g" && name == "w"),
        "a missing parameter reported as {e:?} ({e})"
    );
}

#[test]
fn inputs_of_the_wrong_shape_or_type_are_mismatches() {
    let g = one_input_graph(shape!["B", 3]);
    let feed = |t: Tensor| TensorMap::from([("x".to_string(), t)]);
    // Transposed shape: [3, 2] where [B, 3] is expected.
    let e = run(
        &g,
        &feed(Tensor::f32(&[3, 2], vec![0.0; 6])),
        &TensorMap::new(),
        EvalContext::default(),
    )
    .unwrap_err();
    match &e {
        EvalError::Mismatch {
            name,
            expected_dtype,
            expected,
            got_dtype,
            got,
        } => {
            assert_eq!(name, "x");
            assert_eq!(*expected_dtype, DType::F32);
            assert_eq!(expected, &shape!["B", 3]);
            assert_eq!(*got_dtype, DType::F32);
            assert_eq!(got, &vec![3, 2]);
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert_eq!(e.to_string(), "`x` should be f32[B, 3], got f32[3, 2]");
    // Wrong rank.
    let e = run(
        &g,
        &feed(Tensor::f32(&[3], vec![0.0; 3])),
        &TensorMap::new(),
        EvalContext::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, EvalError::Mismatch { got, .. } if got == &vec![3]),
        "{e:?}"
    );
    // Right shape, wrong element type.
    let e = run(
        &g,
        &feed(Tensor::f64(&[2, 3], vec![0.0; 6])),
        &TensorMap::new(),
        EvalContext::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            EvalError::Mismatch {
                got_dtype: DType::F64,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "`x` should be f32[B, 3], got f64[2, 3]");
}

#[test]
fn two_inputs_binding_the_batch_differently_conflict() {
    let mut g = Graph::new("g");
    let a = input(&mut g, "a", DType::F32, shape!["B", 2]);
    let b = input(&mut g, "b", DType::F32, shape!["B", 2]);
    let y = g.push(Op::Binary(BinaryOp::Add), &[a, b], "a + b").unwrap();
    g.set_output("y", y).unwrap();
    let feed = TensorMap::from([
        ("a".to_string(), Tensor::f32(&[3, 2], vec![0.0; 6])),
        ("b".to_string(), Tensor::f32(&[4, 2], vec![0.0; 8])),
    ]);
    let e = run(&g, &feed, &TensorMap::new(), EvalContext::default()).unwrap_err();
    // Whichever input binds B first, the other conflicts with it.
    let EvalError::SymbolConflict {
        name,
        symbol,
        bound,
        got,
    } = &e
    else {
        panic!("expected a symbol conflict, got {e:?}");
    };
    assert_eq!(symbol, "B");
    match name.as_str() {
        "b" => assert_eq!((*bound, *got), (3, 4)),
        "a" => assert_eq!((*bound, *got), (4, 3)),
        other => panic!("unexpected input {other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("symbol B") && msg.contains('3') && msg.contains('4'),
        "{msg}"
    );
}

#[test]
fn a_symbol_no_input_binds_is_reported_at_its_node() {
    let mut g = Graph::new("g");
    let c = g
        .push(
            Op::Constant {
                value: Scalar(1.0),
                dtype: DType::F32,
                shape: shape!["T", 2],
            },
            &[],
            "mask.ones",
        )
        .unwrap();
    g.set_output("c", c).unwrap();
    let e = run(
        &g,
        &TensorMap::new(),
        &TensorMap::new(),
        EvalContext::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, EvalError::UnboundSymbol { index: 0, origin, symbol } if origin == "mask.ones" && symbol == "T"),
        "{e:?}"
    );
}

#[test]
fn gather_index_out_of_range_names_the_node_origin() {
    let mut g = Graph::new("router");
    let x = input(&mut g, "x", DType::F32, shape![2, 3]);
    let idx = input(&mut g, "idx", DType::I32, shape![2, 1]);
    let y = g
        .push(
            Op::Gather { axis: 1 },
            &[x, idx],
            "layers[1].moe.route.gather",
        )
        .unwrap();
    g.set_output("y", y).unwrap();
    let feed = |i: Vec<i32>| {
        TensorMap::from([
            ("x".to_string(), Tensor::f32(&[2, 3], vec![0.0; 6])),
            ("idx".to_string(), Tensor::i32(&[2, 1], i)),
        ])
    };
    let e = run(
        &g,
        &feed(vec![0, 3]),
        &TensorMap::new(),
        EvalContext::default(),
    )
    .unwrap_err();
    match &e {
        EvalError::IndexOutOfRange {
            index,
            origin,
            value,
            size,
        } => {
            assert_eq!(*index, 2);
            assert_eq!(origin, "layers[1].moe.route.gather");
            assert_eq!(*value, 3);
            assert_eq!(*size, 3);
        }
        other => panic!("expected an index error, got {other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "node 2 (layers[1].moe.route.gather): index 3 is out of range for a dimension of 3"
    );
    // Negative indices are out of range too (no Python-style wrap-around).
    let e = run(
        &g,
        &feed(vec![-1, 0]),
        &TensorMap::new(),
        EvalContext::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            EvalError::IndexOutOfRange {
                value: -1,
                size: 3,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn scatter_add_index_out_of_range_names_the_node_origin() {
    let e = try_run_op(
        Op::ScatterAdd {
            axis: 1,
            shape: shape![1, 2],
        },
        vec![
            Tensor::i32(&[1, 2], vec![1, 2]),
            Tensor::f32(&[1, 2], vec![1.0, 1.0]),
        ],
        EvalContext::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, EvalError::IndexOutOfRange { origin, value: 2, size: 2, .. } if origin == "op under test"),
        "{e:?}"
    );
}

#[test]
fn nan_propagates_through_relu_max_min_and_max_reductions() {
    let nan_row = || Tensor::f64(&[3], vec![1.0, f64::NAN, -2.0]);
    let relu = run_op(Op::Unary(UnaryOp::Relu), vec![nan_row()]).to_f64();
    assert!(
        relu[1].is_nan() && relu[0] == 1.0 && relu[2] == 0.0,
        "{relu:?}"
    );
    let max = run_op(
        Op::Binary(BinaryOp::Max),
        vec![nan_row(), Tensor::f64(&[3], vec![0.0; 3])],
    )
    .to_f64();
    assert!(max[1].is_nan() && max[0] == 1.0 && max[2] == 0.0, "{max:?}");
    for op in [ReduceOp::Max, ReduceOp::Min] {
        let r = run_op(
            Op::Reduce {
                op,
                axes: vec![0],
                keep_dims: false,
            },
            vec![nan_row()],
        )
        .to_f64();
        assert!(r[0].is_nan(), "{op:?} reduction dropped a NaN: {r:?}");
    }
}
