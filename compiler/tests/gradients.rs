//! Gradient checks of the reverse-mode autodiff (`autodiff::append_gradients`) against
//! central finite differences, in f64 on the reference interpreter.
//!
//! Every op check builds the op from differentiable leaves (`Parameter` nodes in f64,
//! so they can be perturbed) and non-differentiable leaves (indices, conditions: plain
//! `Input` nodes), reduces the op's output to a generic scalar `L = sum(y * R)` with
//! `R` a fixed random tensor of the output's shape (a parameter that is not
//! differentiated), appends the gradients of `L` and compares every element of every
//! gradient with `(L(x + eps) - L(x - eps)) / (2 eps)`, `eps = 1e-6`.
//!
//! Inputs are drawn from a deterministic counter-based stream and kept away from the
//! places where the functions are not differentiable (abs and relu at 0, ties of max
//! and min, the boundaries of `where`, logarithms of non-positive values, near-ties of
//! top-k). As a guard, every finite difference also checks that no discrete value of
//! the graph (any `bool` or `i32` node: comparisons, top-k indices) changed under the
//! perturbation, so a kink hit by accident is reported as such rather than as a wrong
//! gradient.
//!
//! The last tests check the whole tiny Alt-MoE model, each direction's loss graph with
//! dropout active, against finite differences of its `loss` output.

use altc_compiler::autodiff::append_gradients;
use altc_compiler::ir::{
    BinaryOp, BuildGraph, CompareOp, DType, Dim, Graph, GraphBuilder, NodeId, Op, ReduceOp, Scalar,
    Shape, UnaryOp,
};
use altc_compiler::lower::{lower, LowerOptions, Mode, MoeDispatch, Program};
use altc_compiler::reference::{
    evaluate, initial_parameters, run, Data, EvalContext, Tensor, TensorMap,
};
use altc_compiler::{rng, shape, spec};
use std::collections::{BTreeMap, BTreeSet};

// ---------------------------------------------------------------------------------
// Finite differences
// ---------------------------------------------------------------------------------

/// Step of the central differences.
const EPS: f64 = 1e-6;

/// Op checks: `|analytic - numeric| <= OP_ABS + OP_REL * |numeric|`.
const OP_ABS: f64 = 1e-7;
const OP_REL: f64 = 1e-6;

/// Whole-model checks: `|analytic - numeric| <= MODEL_ABS + MODEL_REL * |numeric|`.
const MODEL_ABS: f64 = 1e-8;
const MODEL_REL: f64 = 1e-6;

/// The seed of every random draw of this file (leaf values, `R`, model inputs).
const SEED: u64 = 0x9e37;

/// `n` uniform draws in `[lo, hi)` from `stream`.
fn uniform_in(stream: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| lo + (hi - lo) * rng::uniform(SEED, 0, stream, i))
        .collect()
}

/// `n` draws whose magnitude is uniform in `[lo, hi)`, with a random sign.
fn signed_in(stream: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let m = lo + (hi - lo) * rng::uniform(SEED, 0, stream, 2 * i);
            if rng::uniform(SEED, 0, stream, 2 * i + 1) < 0.5 {
                -m
            } else {
                m
            }
        })
        .collect()
}

fn concrete(shape: &[usize]) -> Shape {
    Shape(shape.iter().map(|&d| Dim::Fixed(d)).collect())
}

/// Row-major coordinates of element `linear` of `shape`, for messages.
fn coords(shape: &[usize], mut linear: usize) -> Vec<usize> {
    let mut c = vec![0; shape.len()];
    for axis in (0..shape.len()).rev() {
        c[axis] = linear % shape[axis];
        linear /= shape[axis];
    }
    c
}

fn f64_data_mut(t: &mut Tensor) -> &mut Vec<f64> {
    match &mut t.data {
        Data::F64(v) => v,
        other => panic!("differentiable leaves are f64, got {other:?}"),
    }
}

/// A forward graph with a scalar `loss` node, and what running it needs; evaluates the
/// loss at perturbed parameters and checks that no discrete value changes.
struct Objective<'a> {
    graph: &'a Graph,
    inputs: &'a TensorMap,
    ctx: EvalContext,
    loss: NodeId,
    /// The `bool`/`i32` nodes, with their values at the unperturbed parameters.
    discrete: Vec<(NodeId, Tensor)>,
}

impl<'a> Objective<'a> {
    fn new(
        graph: &'a Graph,
        inputs: &'a TensorMap,
        params: &TensorMap,
        ctx: EvalContext,
        loss: NodeId,
    ) -> Objective<'a> {
        let eval = evaluate(graph, inputs, params, ctx)
            .unwrap_or_else(|e| panic!("graph `{}` does not run: {e}", graph.name));
        let discrete = graph
            .node_ids()
            .filter(|&id| matches!(graph.node(id).ty.dtype, DType::Bool | DType::I32))
            .map(|id| (id, eval.value(id).clone()))
            .collect();
        Objective {
            graph,
            inputs,
            ctx,
            loss,
            discrete,
        }
    }

    /// The loss at `params`, or a description of the discrete value that changed.
    fn loss_at(&self, params: &TensorMap) -> Result<f64, String> {
        let eval = evaluate(self.graph, self.inputs, params, self.ctx)
            .unwrap_or_else(|e| panic!("graph `{}` does not run: {e}", self.graph.name));
        for (id, before) in &self.discrete {
            if eval.value(*id) != before {
                let node = self.graph.node(*id);
                return Err(format!(
                    "the perturbation changes discrete node {} (`{}`, from {})",
                    id.index(),
                    node.op.mnemonic(),
                    node.origin
                ));
            }
        }
        Ok(eval
            .value(self.loss)
            .scalar()
            .expect("the loss is a scalar"))
    }

    /// `(L(x + eps) - L(x - eps)) / (2 eps)` for element `i` of parameter `name`;
    /// `params` is restored before returning.
    fn central_difference(
        &self,
        params: &mut TensorMap,
        name: &str,
        i: usize,
    ) -> Result<f64, String> {
        let x = f64_data_mut(params.get_mut(name).expect("the parameter exists"))[i];
        let mut at = |v: f64| {
            f64_data_mut(params.get_mut(name).expect("the parameter exists"))[i] = v;
            self.loss_at(params)
        };
        let plus = at(x + EPS);
        let minus = at(x - EPS);
        f64_data_mut(params.get_mut(name).expect("the parameter exists"))[i] = x;
        Ok((plus? - minus?) / (2.0 * EPS))
    }
}

/// One mismatch, for the failure report.
struct Mismatch {
    param: String,
    index: usize,
    coords: Vec<usize>,
    analytic: f64,
    numeric: Result<f64, String>,
}

fn report(what: &str, failures: &[Mismatch], abs: f64, rel: f64) {
    if failures.is_empty() {
        return;
    }
    let lines: Vec<String> = failures
        .iter()
        .take(40)
        .map(|f| match &f.numeric {
            Ok(n) => format!(
                "  parameter `{}` element {} {:?}: analytic {:.12e}, numeric {:.12e} \
                 (difference {:.3e}, tolerance {:.3e})",
                f.param,
                f.index,
                f.coords,
                f.analytic,
                n,
                (f.analytic - n).abs(),
                abs + rel * n.abs()
            ),
            Err(why) => format!(
                "  parameter `{}` element {} {:?}: analytic {:.12e}, no finite difference: {why}",
                f.param, f.index, f.coords, f.analytic
            ),
        })
        .collect();
    panic!(
        "{what}: {} gradient element(s) disagree with central differences \
         (eps {EPS:e}):\n{}",
        failures.len(),
        lines.join("\n")
    );
}

// ---------------------------------------------------------------------------------
// The op checker
// ---------------------------------------------------------------------------------

/// Stream of the loss weights `R`.
const R_STREAM: u64 = 999;

/// A graph under construction for one op check.
struct OpCheck {
    what: String,
    graph: Graph,
    inputs: TensorMap,
    params: TensorMap,
    /// The differentiable leaves, by name.
    diff: Vec<(String, NodeId)>,
    ctx: EvalContext,
    /// Next draw stream for a leaf.
    stream: u64,
}

impl OpCheck {
    fn new(what: impl Into<String>) -> OpCheck {
        OpCheck {
            what: what.into(),
            graph: Graph::new("gradient_check"),
            inputs: TensorMap::new(),
            params: TensorMap::new(),
            diff: Vec::new(),
            ctx: EvalContext::default(),
            stream: 1,
        }
    }

    fn next_stream(&mut self) -> u64 {
        self.stream += 1;
        self.stream
    }

    /// A differentiable f64 leaf of IR shape `shape` bound to `value`.
    fn leaf_shaped(&mut self, name: &str, shape: Shape, value: Tensor) -> NodeId {
        assert_eq!(value.dtype(), DType::F64);
        let id = GraphBuilder::new(&mut self.graph, format!("leaves.{name}"))
            .parameter(name, DType::F64, shape)
            .unwrap();
        self.params.insert(name.into(), value);
        self.diff.push((name.into(), id));
        id
    }

    /// A differentiable f64 leaf with the given values.
    fn leaf(&mut self, name: &str, shape: &[usize], values: Vec<f64>) -> NodeId {
        self.leaf_shaped(name, concrete(shape), Tensor::f64(shape, values))
    }

    /// A differentiable f64 leaf uniform in `[lo, hi)`.
    fn uniform(&mut self, name: &str, shape: &[usize], lo: f64, hi: f64) -> NodeId {
        let s = self.next_stream();
        let n = shape.iter().product();
        self.leaf(name, shape, uniform_in(s, n, lo, hi))
    }

    /// A differentiable f64 leaf with magnitudes in `[lo, hi)` and random signs.
    fn signed(&mut self, name: &str, shape: &[usize], lo: f64, hi: f64) -> NodeId {
        let s = self.next_stream();
        let n = shape.iter().product();
        self.leaf(name, shape, signed_in(s, n, lo, hi))
    }

    /// A non-differentiable leaf (an `Input`): indices, conditions.
    fn fixed(&mut self, name: &str, value: Tensor) -> NodeId {
        let id = GraphBuilder::new(&mut self.graph, format!("inputs.{name}"))
            .input(name, value.dtype(), concrete(&value.shape))
            .unwrap();
        self.inputs.insert(name.into(), value);
        id
    }

    fn op(&mut self, op: Op, operands: &[NodeId]) -> NodeId {
        let what = self.what.clone();
        self.graph
            .push(op, operands, "op under test")
            .unwrap_or_else(|e| panic!("{what}: cannot build the op: {e}"))
    }

    /// Values of the leaves, by name.
    fn value(&self, name: &str) -> Vec<f64> {
        self.params[name].to_f64()
    }

    /// Checks the gradients of `sum(out * R)` w.r.t. every differentiable leaf against
    /// central differences; returns the analytic gradients by leaf name.
    fn check(mut self, out: NodeId) -> BTreeMap<String, Vec<f64>> {
        let what = self.what.clone();
        let ty = self.graph.node(out).ty.clone();
        assert_eq!(ty.dtype, DType::F64, "{what}: the op yields {ty}");
        let probe = evaluate(&self.graph, &self.inputs, &self.params, self.ctx)
            .unwrap_or_else(|e| panic!("{what}: the forward graph does not run: {e}"));
        let out_shape = probe.value(out).shape.clone();
        let n: usize = out_shape.iter().product();
        let r = GraphBuilder::new(&mut self.graph, "loss weights")
            .parameter("R", DType::F64, ty.shape.clone())
            .unwrap();
        self.params.insert(
            "R".into(),
            Tensor::f64(&out_shape, uniform_in(R_STREAM, n, -1.0, 1.0)),
        );
        let weighted = self
            .graph
            .push(Op::Binary(BinaryOp::Mul), &[out, r], "loss")
            .unwrap();
        let loss = if ty.shape.rank() == 0 {
            weighted
        } else {
            let axes = (0..ty.shape.rank()).collect();
            self.graph
                .push(
                    Op::Reduce {
                        op: ReduceOp::Sum,
                        axes,
                        keep_dims: false,
                    },
                    &[weighted],
                    "loss",
                )
                .unwrap()
        };
        self.graph.set_output("loss", loss).unwrap();
        let forward = self.graph.clone();

        let wrt: Vec<NodeId> = self.diff.iter().map(|(_, id)| *id).collect();
        let grads = append_gradients(&mut self.graph, loss, &wrt)
            .unwrap_or_else(|e| panic!("{what}: append_gradients failed: {e}"));
        for ((name, _), g) in self.diff.iter().zip(&grads) {
            let g = g.unwrap_or_else(|| panic!("{what}: no gradient for leaf `{name}`"));
            self.graph.set_output(format!("grad.{name}"), g).unwrap();
        }
        let outputs = run(&self.graph, &self.inputs, &self.params, self.ctx)
            .unwrap_or_else(|e| panic!("{what}: the gradient graph does not run: {e}"));

        let objective = Objective::new(&forward, &self.inputs, &self.params, self.ctx, loss);
        assert_eq!(
            outputs["loss"].scalar(),
            objective.loss_at(&self.params).ok(),
            "{what}: appending gradients changed the loss"
        );
        let mut params = self.params.clone();
        let mut failures = Vec::new();
        let mut analytic = BTreeMap::new();
        for (name, _) in &self.diff {
            let g = &outputs[&format!("grad.{name}")];
            let shape = &self.params[name].shape;
            assert_eq!(
                (&g.shape, g.dtype()),
                (shape, DType::F64),
                "{what}: the gradient of `{name}` has the wrong type"
            );
            let g = g.to_f64();
            for (i, &a) in g.iter().enumerate() {
                let numeric = objective.central_difference(&mut params, name, i);
                let ok = matches!(numeric, Ok(n) if (a - n).abs() <= OP_ABS + OP_REL * n.abs());
                if !ok {
                    failures.push(Mismatch {
                        param: name.clone(),
                        index: i,
                        coords: coords(shape, i),
                        analytic: a,
                        numeric,
                    });
                }
            }
            analytic.insert(name.clone(), g);
        }
        report(&format!("op {what}"), &failures, OP_ABS, OP_REL);
        analytic
    }
}

/// The smallest distance between any two values (to keep max/min/top-k away from ties).
fn min_gap(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min)
}

fn i32s(shape: &[usize], v: &[i32]) -> Tensor {
    Tensor::i32(shape, v.to_vec())
}

/// Runs `c.check(out)` expecting it to fail; returns the panic message.
fn check_fails(c: OpCheck, out: NodeId) -> String {
    let what = c.what.clone();
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.check(out)))
        .err()
        .unwrap_or_else(|| panic!("{what}: the checker accepted a gradient it should reject"));
    err.downcast_ref::<String>()
        .cloned()
        .unwrap_or_else(|| "non-string panic".into())
}

#[test]
fn the_checker_rejects_wrong_gradients_and_kinks() {
    // Relu at its kink: the convention gives 0, the central difference 1/2 (times R).
    let mut c = OpCheck::new("Relu at 0");
    let x = c.leaf("x", &[2], vec![0.0, 1.0]);
    let y = c.op(Op::Unary(UnaryOp::Relu), &[x]);
    let msg = check_fails(c, y);
    assert!(
        msg.contains("op Relu at 0: 1 gradient element(s) disagree")
            && msg.contains("parameter `x` element 0 [0]: analytic 0.0"),
        "{msg}"
    );
    // A comparison exactly at its threshold flips under the perturbation: reported as
    // such, not as a wrong gradient.
    let mut c = OpCheck::new("Where at its boundary");
    let x = c.leaf("x", &[2], vec![0.5, 1.0]);
    let half = c.op(
        Op::Constant {
            value: Scalar(0.5),
            dtype: DType::F64,
            shape: Shape::scalar(),
        },
        &[],
    );
    let big = c.op(Op::Compare(CompareOp::Gt), &[x, half]);
    let neg = c.op(Op::Unary(UnaryOp::Neg), &[x]);
    let y = c.op(Op::Where, &[big, x, neg]);
    let msg = check_fails(c, y);
    assert!(
        msg.contains("element 0 [0]") && msg.contains("changes discrete node"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------
// Elementwise ops
// ---------------------------------------------------------------------------------

#[test]
fn unary_ops() {
    for u in UnaryOp::ALL {
        for shape in [&[2usize, 3][..], &[4], &[]] {
            let mut c = OpCheck::new(format!("{u:?} on {shape:?}"));
            let x = match u {
                // Positive domains, away from 0 where the derivative blows up.
                UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt => c.uniform("x", shape, 0.3, 2.5),
                // Kinks (abs, relu) and the pole (recip) at 0: both signs, |x| >= 0.2.
                UnaryOp::Abs | UnaryOp::Relu | UnaryOp::Recip => c.signed("x", shape, 0.2, 2.0),
                _ => c.uniform("x", shape, -2.0, 2.0),
            };
            let y = c.op(Op::Unary(u), &[x]);
            c.check(y);
        }
    }
}

/// Operand shapes: equal, a row vector, a column against a row, scalars on either side.
const BROADCASTS: [(&[usize], &[usize]); 6] = [
    (&[2, 3], &[2, 3]),
    (&[2, 3], &[3]),
    (&[2, 1], &[1, 3]),
    (&[], &[2, 3]),
    (&[2, 3], &[]),
    (&[3], &[2, 2, 3]),
];

/// The pairs `(a, b)` of elements that meet in a broadcast binary op.
fn broadcast_pairs(a: &[f64], sa: &[usize], b: &[f64], sb: &[usize]) -> Vec<(f64, f64)> {
    let rank = sa.len().max(sb.len());
    let pad = |s: &[usize]| {
        let mut p = vec![1; rank - s.len()];
        p.extend_from_slice(s);
        p
    };
    let (pa, pb) = (pad(sa), pad(sb));
    let out: Vec<usize> = pa.iter().zip(&pb).map(|(x, y)| *x.max(y)).collect();
    let flat = |s: &[usize], c: &[usize]| {
        c.iter()
            .zip(s)
            .fold(0, |acc, (&ci, &d)| acc * d + if d == 1 { 0 } else { ci })
    };
    let n: usize = out.iter().product();
    (0..n)
        .map(|i| {
            let c = coords(&out, i);
            (a[flat(&pa, &c)], b[flat(&pb, &c)])
        })
        .collect()
}

#[test]
fn binary_ops_with_broadcasting() {
    for op in BinaryOp::ALL {
        for (sa, sb) in BROADCASTS {
            let mut c = OpCheck::new(format!("{op:?} of {sa:?} with {sb:?}"));
            let (a, b) = match op {
                // a^b with a > 0 (the gradient w.r.t. b takes ln a).
                BinaryOp::Pow => (c.uniform("a", sa, 0.4, 2.0), c.uniform("b", sb, -1.5, 2.0)),
                BinaryOp::Div => (c.uniform("a", sa, -2.0, 2.0), c.signed("b", sb, 0.4, 2.0)),
                _ => (c.uniform("a", sa, -2.0, 2.0), c.uniform("b", sb, -2.0, 2.0)),
            };
            if matches!(op, BinaryOp::Max | BinaryOp::Min) {
                // No ties between the elements that meet, and both sides win somewhere.
                let pairs = broadcast_pairs(&c.value("a"), sa, &c.value("b"), sb);
                let gap = pairs
                    .iter()
                    .map(|(x, y)| (x - y).abs())
                    .fold(f64::INFINITY, f64::min);
                assert!(gap > 1e-3, "{}: operands nearly tie (gap {gap})", c.what);
                assert!(pairs.iter().any(|(x, y)| x > y) && pairs.iter().any(|(x, y)| x < y));
            }
            let y = c.op(Op::Binary(op), &[a, b]);
            c.check(y);
        }
    }
}

#[test]
fn binary_op_with_the_same_operand_twice() {
    // x * x and x / x: both operand slots accumulate into one adjoint.
    for op in [BinaryOp::Mul, BinaryOp::Div, BinaryOp::Sub, BinaryOp::Pow] {
        let mut c = OpCheck::new(format!("{op:?} of x with itself"));
        let x = c.uniform("x", &[2, 3], 0.5, 2.0);
        let y = c.op(Op::Binary(op), &[x, x]);
        c.check(y);
    }
}

#[test]
fn where_sends_the_gradient_to_the_chosen_branch() {
    let cond = [true, false, true, false, false, true];
    // Condition [2, 3], branches [3] and [2, 1].
    let mut c = OpCheck::new("Where([2,3], [3], [2,1])");
    let k = c.fixed("cond", Tensor::bool(&[2, 3], cond.to_vec()));
    let a = c.uniform("a", &[3], -2.0, 2.0);
    let b = c.uniform("b", &[2, 1], -2.0, 2.0);
    let y = c.op(Op::Where, &[k, a, b]);
    let grads = c.check(y);
    // Column 1 is never chosen from `a`, so it gets nothing.
    assert_eq!(grads["a"][1], 0.0);

    // Condition [3] broadcast over rows, branches [2, 3] and a scalar.
    let mut c = OpCheck::new("Where([3], [2,3], [])");
    let k = c.fixed("cond", Tensor::bool(&[3], vec![false, true, true]));
    let a = c.uniform("a", &[2, 3], -2.0, 2.0);
    let b = c.uniform("b", &[], -2.0, 2.0);
    let y = c.op(Op::Where, &[k, a, b]);
    let grads = c.check(y);
    assert_eq!((grads["a"][0], grads["a"][3]), (0.0, 0.0));

    // A condition computed from a differentiable value: the gradient flows through the
    // branches only.
    let mut c = OpCheck::new("Where(x > 0, x^2, -x)");
    let x = c.signed("x", &[2, 3], 0.2, 2.0);
    let zero = c.op(
        Op::Constant {
            value: Scalar(0.0),
            dtype: DType::F64,
            shape: Shape::scalar(),
        },
        &[],
    );
    let pos = c.op(Op::Compare(CompareOp::Gt), &[x, zero]);
    let sq = c.op(Op::Unary(UnaryOp::Square), &[x]);
    let neg = c.op(Op::Unary(UnaryOp::Neg), &[x]);
    let y = c.op(Op::Where, &[pos, sq, neg]);
    c.check(y);
}

#[test]
fn cast_between_floats_is_the_identity() {
    let mut c = OpCheck::new("Cast f64 -> f64");
    let x = c.uniform("x", &[2, 3], -2.0, 2.0);
    let y = c.op(Op::Cast { dtype: DType::F64 }, &[x]);
    let sq = c.op(Op::Unary(UnaryOp::Square), &[y]);
    c.check(sq);
}

// ---------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------

#[test]
fn reductions_over_one_and_several_axes() {
    let ops = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min];
    let axes_list: [&[usize]; 6] = [&[0], &[1], &[2], &[0, 2], &[2, 0], &[0, 1, 2]];
    for op in ops {
        for axes in axes_list {
            for keep_dims in [false, true] {
                let mut c =
                    OpCheck::new(format!("Reduce {op:?} over {axes:?} keep_dims={keep_dims}"));
                let x = c.uniform("x", &[2, 3, 4], -2.0, 2.0);
                // Max and Min need distinct values: one element attains each extremum.
                let gap = min_gap(&c.value("x"));
                assert!(gap > 1e-4, "{}: values nearly tie (gap {gap})", c.what);
                let y = c.op(Op::reduce(op, axes, keep_dims), &[x]);
                c.check(y);
            }
        }
    }
}

#[test]
fn reduce_max_splits_the_gradient_among_ties() {
    // Not a finite-difference check (max is not differentiable at a tie): the stated
    // convention is an even split among the elements that attain the extremum.
    let mut g = Graph::new("ties");
    let x = GraphBuilder::new(&mut g, "x")
        .parameter("x", DType::F64, shape![2, 3])
        .unwrap();
    let m = g
        .push(Op::reduce(ReduceOp::Max, &[1], false), &[x], "max")
        .unwrap();
    let l = g
        .push(Op::reduce(ReduceOp::Sum, &[0], false), &[m], "sum")
        .unwrap();
    let grads = append_gradients(&mut g, l, &[x]).unwrap();
    g.set_output("grad", grads[0].unwrap()).unwrap();
    let params = TensorMap::from([(
        "x".to_string(),
        Tensor::f64(&[2, 3], vec![1.0, 3.0, 3.0, 2.0, -1.0, 0.5]),
    )]);
    let out = run(&g, &TensorMap::new(), &params, EvalContext::default()).unwrap();
    assert_eq!(out["grad"].to_f64(), [0.0, 0.5, 0.5, 1.0, 0.0, 0.0]);
}

// ---------------------------------------------------------------------------------
// Matrix products and data movement
// ---------------------------------------------------------------------------------

#[test]
fn matmul_with_every_transpose_combination() {
    for ta in [false, true] {
        for tb in [false, true] {
            let (m, k, n) = (3, 4, 5);
            let sa = if ta { [k, m] } else { [m, k] };
            let sb = if tb { [n, k] } else { [k, n] };
            let mut c = OpCheck::new(format!("MatMul {sa:?} x {sb:?} ta={ta} tb={tb}"));
            let a = c.uniform("a", &sa, -1.0, 1.0);
            let b = c.uniform("b", &sb, -1.0, 1.0);
            let y = c.op(
                Op::MatMul {
                    transpose_a: ta,
                    transpose_b: tb,
                },
                &[a, b],
            );
            c.check(y);
        }
    }
}

#[test]
fn matmul_with_batch_broadcasting() {
    // [2, 3, 4] x [5, 1, 4, 6] -> [5, 2, 3, 6], with every transpose combination.
    for ta in [false, true] {
        for tb in [false, true] {
            let sa: &[usize] = if ta { &[2, 4, 3] } else { &[2, 3, 4] };
            let sb: &[usize] = if tb { &[5, 1, 6, 4] } else { &[5, 1, 4, 6] };
            let mut c = OpCheck::new(format!("MatMul {sa:?} x {sb:?} ta={ta} tb={tb}"));
            let a = c.uniform("a", sa, -1.0, 1.0);
            let b = c.uniform("b", sb, -1.0, 1.0);
            let y = c.op(
                Op::MatMul {
                    transpose_a: ta,
                    transpose_b: tb,
                },
                &[a, b],
            );
            assert_eq!(c.graph.node(y).ty.shape, shape![5, 2, 3, 6]);
            c.check(y);
        }
    }
    // A batched left operand against a shared matrix (a linear layer), and the reverse.
    let mut c = OpCheck::new("MatMul [2, 3, 4] x [4, 2]");
    let a = c.uniform("a", &[2, 3, 4], -1.0, 1.0);
    let b = c.uniform("b", &[4, 2], -1.0, 1.0);
    let y = c.op(Op::matmul(false, false), &[a, b]);
    c.check(y);
    let mut c = OpCheck::new("MatMul [3, 4] x [2, 4, 2]");
    let a = c.uniform("a", &[3, 4], -1.0, 1.0);
    let b = c.uniform("b", &[2, 4, 2], -1.0, 1.0);
    let y = c.op(Op::matmul(false, false), &[a, b]);
    c.check(y);
}

#[test]
fn transpose() {
    for perm in [vec![1, 0, 2], vec![2, 0, 1], vec![1, 2, 0], vec![0, 1, 2]] {
        let mut c = OpCheck::new(format!("Transpose {perm:?}"));
        let x = c.uniform("x", &[2, 3, 4], -1.0, 1.0);
        let y = c.op(Op::Transpose { perm }, &[x]);
        c.check(y);
    }
}

#[test]
fn reshape() {
    for to in [shape![6, 4], shape![4, 3, 2], shape![24], shape![2, 1, 12]] {
        let mut c = OpCheck::new(format!("Reshape [2, 3, 4] -> {to}"));
        let x = c.uniform("x", &[2, 3, 4], -1.0, 1.0);
        let y = c.op(Op::Reshape { shape: to }, &[x]);
        c.check(y);
    }
}

#[test]
fn broadcast_to() {
    let cases: [(&[usize], Shape); 5] = [
        (&[3], shape![2, 3]),
        (&[2, 1], shape![2, 4]),
        (&[1, 3], shape![4, 2, 3]),
        (&[], shape![2, 3]),
        (&[2, 3], shape![2, 3]),
    ];
    for (from, to) in cases {
        let mut c = OpCheck::new(format!("BroadcastTo {from:?} -> {to}"));
        let x = c.uniform("x", from, -1.0, 1.0);
        let y = c.op(Op::BroadcastTo { shape: to }, &[x]);
        c.check(y);
    }
}

#[test]
fn slice() {
    // Both ends inside, only one end inside, the whole range; along either axis.
    let cases = [
        (1, 1, 4),
        (1, 0, 2),
        (1, 3, 5),
        (1, 0, 5),
        (0, 1, 2),
        (0, 0, 3),
        (1, 2, 3),
    ];
    for (axis, start, end) in cases {
        let mut c = OpCheck::new(format!("Slice axis={axis} {start}..{end} of [3, 5]"));
        let x = c.uniform("x", &[3, 5], -1.0, 1.0);
        let y = c.op(Op::Slice { axis, start, end }, &[x]);
        let grads = c.check(y);
        // Elements outside the slice get exactly zero.
        for (i, g) in grads["x"].iter().enumerate() {
            let at = coords(&[3, 5], i)[axis];
            if at < start || at >= end {
                assert_eq!(*g, 0.0, "Slice axis={axis} {start}..{end}: element {i}");
            }
        }
    }
}

#[test]
fn concat_of_three_operands() {
    for axis in [0, 1] {
        let mut c = OpCheck::new(format!("Concat axis={axis}"));
        let shapes: [[usize; 2]; 3] = if axis == 1 {
            [[2, 1], [2, 3], [2, 2]]
        } else {
            [[1, 3], [3, 3], [2, 3]]
        };
        let a = c.uniform("a", &shapes[0], -1.0, 1.0);
        let b = c.uniform("b", &shapes[1], -1.0, 1.0);
        let d = c.uniform("d", &shapes[2], -1.0, 1.0);
        let y = c.op(Op::Concat { axis }, &[a, b, d]);
        c.check(y);
    }
    // One operand used twice.
    let mut c = OpCheck::new("Concat [x, y, x]");
    let x = c.uniform("x", &[2, 2], -1.0, 1.0);
    let z = c.uniform("z", &[2, 1], -1.0, 1.0);
    let y = c.op(Op::Concat { axis: 1 }, &[x, z, x]);
    c.check(y);
}

// ---------------------------------------------------------------------------------
// Indexing, routing, dropout
// ---------------------------------------------------------------------------------

#[test]
fn gather_scatters_the_gradient_back() {
    // Axis 0: rows 2 and 0 are taken twice, row 1 once per column at most.
    let mut c = OpCheck::new("Gather axis=0 [3, 4] with [5, 4] indices");
    let x = c.uniform("x", &[3, 4], -1.0, 1.0);
    let idx = c.fixed(
        "index",
        i32s(
            &[5, 4],
            &[2, 0, 0, 1, 2, 2, 0, 1, 0, 2, 2, 2, 1, 0, 2, 0, 2, 2, 0, 0],
        ),
    );
    let y = c.op(Op::Gather { axis: 0 }, &[x, idx]);
    c.check(y);

    // Axis 1, with a column never taken (it must get zero).
    let mut c = OpCheck::new("Gather axis=1 [2, 4] with [2, 6] indices");
    let x = c.uniform("x", &[2, 4], -1.0, 1.0);
    let idx = c.fixed(
        "index",
        i32s(&[2, 6], &[3, 3, 0, 1, 3, 0, 1, 1, 1, 0, 3, 0]),
    );
    let y = c.op(Op::Gather { axis: 1 }, &[x, idx]);
    let grads = c.check(y);
    assert_eq!((grads["x"][2], grads["x"][6]), (0.0, 0.0));
}

#[test]
fn scatter_add_sends_the_gradient_to_the_source() {
    let mut c = OpCheck::new("ScatterAdd axis=1 [2, 5] into [2, 3]");
    let idx = c.fixed("index", i32s(&[2, 5], &[0, 2, 0, 0, 1, 2, 2, 1, 2, 0]));
    let src = c.uniform("src", &[2, 5], -1.0, 1.0);
    let y = c.op(
        Op::ScatterAdd {
            axis: 1,
            shape: shape![2, 3],
        },
        &[idx, src],
    );
    c.check(y);

    let mut c = OpCheck::new("ScatterAdd axis=0 [4, 2] into [3, 2]");
    let idx = c.fixed("index", i32s(&[4, 2], &[1, 1, 1, 0, 2, 1, 1, 2]));
    let src = c.uniform("src", &[4, 2], -1.0, 1.0);
    let y = c.op(
        Op::ScatterAdd {
            axis: 0,
            shape: shape![3, 2],
        },
        &[idx, src],
    );
    c.check(y);
}

/// Rows of 5 well-separated values (gaps >= 0.3) in a scrambled order, so the top-k
/// choice cannot flip under a perturbation of 1e-6.
fn separated_rows(rows: usize) -> Vec<f64> {
    let perms = [[3, 0, 4, 1, 2], [1, 4, 2, 0, 3], [0, 2, 1, 3, 4]];
    let noise = uniform_in(77, rows * 5, 0.0, 0.1);
    (0..rows * 5)
        .map(|i| -1.0 + 0.4 * perms[(i / 5) % 3][i % 5] as f64 + noise[i])
        .collect()
}

#[test]
fn top_k_then_gather_differentiates_the_kept_values_only() {
    let mut c = OpCheck::new("Gather(x, TopK k=2 (x))");
    let x = c.leaf("x", &[3, 5], separated_rows(3));
    let top = c.op(Op::TopK { k: 2 }, &[x]);
    let kept = c.op(Op::Gather { axis: 1 }, &[x, top]);
    let grads = c.check(kept);
    // Exactly the two largest of each row get a gradient.
    let x = separated_rows(3);
    for row in 0..3 {
        let vals = &x[row * 5..row * 5 + 5];
        let mut sorted = vals.to_vec();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        for j in 0..5 {
            let g = grads["x"][row * 5 + j];
            if vals[j] >= sorted[1] {
                assert_ne!(g, 0.0, "row {row} column {j} is kept");
            } else {
                assert_eq!(g, 0.0, "row {row} column {j} is not kept");
            }
        }
    }

    // The router's form: softmax-like weights at the top-k, scattered into a dense gate
    // that weights a second differentiable tensor.
    let mut c = OpCheck::new("ScatterAdd(TopK(x), exp(Gather(x, TopK(x)))) * w");
    let x = c.leaf("x", &[3, 5], separated_rows(3));
    let w = c.uniform("w", &[3, 5], -1.0, 1.0);
    let top = c.op(Op::TopK { k: 3 }, &[x]);
    let kept = c.op(Op::Gather { axis: 1 }, &[x, top]);
    let kept = c.op(Op::Unary(UnaryOp::Exp), &[kept]);
    let gate = c.op(
        Op::ScatterAdd {
            axis: 1,
            shape: shape![3, 5],
        },
        &[top, kept],
    );
    let y = c.op(Op::Binary(BinaryOp::Mul), &[gate, w]);
    let grads = c.check(y);
    // w gets the gate (zero off the top-k), x only at its top-k.
    let zeros_x = grads["x"].iter().filter(|&&g| g == 0.0).count();
    let zeros_w = grads["w"].iter().filter(|&&g| g == 0.0).count();
    assert_eq!((zeros_x, zeros_w), (6, 6));
}

/// Expert ids `[2, 3, 2]` (tokens x slots) over 4 experts: expert 2 gets none, expert
/// 1 the most; the grouping ops sort them.
fn expert_routing(c: &mut OpCheck) -> (NodeId, NodeId) {
    let top = c.fixed(
        "top",
        i32s(&[2, 3, 2], &[1, 0, 3, 1, 1, 0, 0, 1, 1, 3, 3, 1]),
    );
    let order = c.op(Op::ExpertOrder { experts: 4 }, &[top]);
    let offsets = c.op(Op::ExpertOffsets { experts: 4 }, &[top]);
    (order, offsets)
}

#[test]
fn grouped_expert_matmul_differentiates_rows_weights_and_bias() {
    // Token rows [2, 3, K=3] fan out to both slots; weights [4, 3, 5], bias [4, 5].
    let mut c = OpCheck::new("ExpertMatMul +bias, token rows fanned out to 2 slots");
    let (order, offsets) = expert_routing(&mut c);
    let x = c.uniform("x", &[2, 3, 3], -1.0, 1.0);
    let w = c.uniform("w", &[4, 3, 5], -1.0, 1.0);
    let b = c.uniform("b", &[4, 5], -1.0, 1.0);
    let op = Op::ExpertMatMul {
        transpose_w: false,
        bias: true,
    };
    let y = c.op(op, &[x, w, b, order, offsets]);
    let grads = c.check(y);
    // Expert 2 receives no token, so its weights and bias get no gradient.
    assert!(grads["w"][30..45].iter().all(|&g| g == 0.0));
    assert!(grads["b"][10..15].iter().all(|&g| g == 0.0));

    // One row per assignment, weights used transposed ([4, 5, 3]).
    let mut c = OpCheck::new("ExpertMatMul wT, one row per assignment");
    let (order, offsets) = expert_routing(&mut c);
    let x = c.uniform("x", &[2, 3, 2, 3], -1.0, 1.0);
    let w = c.uniform("w", &[4, 5, 3], -1.0, 1.0);
    let op = Op::ExpertMatMul {
        transpose_w: true,
        bias: false,
    };
    let y = c.op(op, &[x, w, order, offsets]);
    c.check(y);
}

#[test]
fn expert_weight_grad_differentiates_both_row_operands() {
    let mut c = OpCheck::new("ExpertWeightGrad of token rows and assignment rows");
    let (order, offsets) = expert_routing(&mut c);
    let a = c.uniform("a", &[2, 3, 3], -1.0, 1.0);
    let b = c.uniform("b", &[2, 3, 2, 4], -1.0, 1.0);
    let y = c.op(Op::ExpertWeightGrad, &[a, b, order, offsets]);
    c.check(y);
}

#[test]
fn dropout_reuses_the_forward_mask() {
    let ctx = EvalContext { seed: 11, step: 2 };
    let mut c = OpCheck::new("Dropout rate=0.3");
    c.ctx = ctx;
    let x = c.uniform("x", &[4, 5], -1.0, 1.0);
    let y = c.op(
        Op::Dropout {
            rate: Scalar(0.3),
            stream: 5,
        },
        &[x],
    );
    let grads = c.check(y);
    let dropped = (0..20)
        .filter(|&i| !rng::dropout_keeps(0.3, ctx.seed, ctx.step, 5, i as u64))
        .collect::<Vec<_>>();
    assert!(
        !dropped.is_empty() && dropped.len() < 20,
        "the mask drops some, not all"
    );
    for (i, g) in grads["x"].iter().enumerate() {
        assert_eq!(*g == 0.0, dropped.contains(&i), "element {i}");
    }

    // Dropout inside a chain, with the same stream in another step.
    let mut c = OpCheck::new("tanh(Dropout(x * w))");
    c.ctx = EvalContext { seed: 11, step: 3 };
    let x = c.uniform("x", &[3, 4], -1.0, 1.0);
    let w = c.uniform("w", &[4], -1.0, 1.0);
    let xw = c.op(Op::Binary(BinaryOp::Mul), &[x, w]);
    let d = c.op(
        Op::Dropout {
            rate: Scalar(0.3),
            stream: 5,
        },
        &[xw],
    );
    let y = c.op(Op::Unary(UnaryOp::Tanh), &[d]);
    c.check(y);
}

// ---------------------------------------------------------------------------------
// Symbolic batch
// ---------------------------------------------------------------------------------

/// A `[B, 3]` leaf bound to a `[4, 3]` tensor.
fn batch_leaf(c: &mut OpCheck) -> NodeId {
    let s = c.next_stream();
    let t = Tensor::f64(&[4, 3], uniform_in(s, 12, -2.0, 2.0));
    c.leaf_shaped("x", shape!["B", 3], t)
}

#[test]
fn symbolic_batch_reductions() {
    let cases: [(ReduceOp, &[usize], bool); 8] = [
        (ReduceOp::Mean, &[0], false),
        (ReduceOp::Mean, &[0], true),
        (ReduceOp::Mean, &[0, 1], false),
        (ReduceOp::Mean, &[1], false),
        (ReduceOp::Mean, &[1], true),
        (ReduceOp::Sum, &[0], false),
        (ReduceOp::Max, &[0], true),
        (ReduceOp::Min, &[0, 1], false),
    ];
    for (op, axes, keep_dims) in cases {
        let mut c = OpCheck::new(format!(
            "Reduce {op:?} over {axes:?} keep_dims={keep_dims} of [B, 3]"
        ));
        let x = batch_leaf(&mut c);
        let y = c.op(Op::reduce(op, axes, keep_dims), &[x]);
        c.check(y);
    }
}

#[test]
fn symbolic_batch_broadcasting_and_matmul() {
    // [B, 3] * [3] and [B, 3] + [1, 3]: the gradients of the shared operands sum over B.
    for other in [&[3usize][..], &[1, 3]] {
        for op in [BinaryOp::Mul, BinaryOp::Add] {
            let mut c = OpCheck::new(format!("{op:?} of [B, 3] with {other:?}"));
            let x = batch_leaf(&mut c);
            let w = c.uniform("w", other, -1.0, 1.0);
            let y = c.op(Op::Binary(op), &[x, w]);
            c.check(y);
        }
    }
    let mut c = OpCheck::new("MatMul [B, 3] x [3, 2]");
    let x = batch_leaf(&mut c);
    let w = c.uniform("w", &[3, 2], -1.0, 1.0);
    let y = c.op(Op::matmul(false, false), &[x, w]);
    c.check(y);
    // The layer-norm pattern over a batch: x - mean(x, axis 0).
    let mut c = OpCheck::new("x - Mean(x over B) for [B, 3]");
    let x = batch_leaf(&mut c);
    let m = c.op(Op::reduce(ReduceOp::Mean, &[0], true), &[x]);
    let centred = c.op(Op::Binary(BinaryOp::Sub), &[x, m]);
    let y = c.op(Op::Unary(UnaryOp::Square), &[centred]);
    c.check(y);
}

// ---------------------------------------------------------------------------------
// What gets no gradient
// ---------------------------------------------------------------------------------

fn param(g: &mut Graph, name: &str, s: Shape) -> NodeId {
    GraphBuilder::new(g, name)
        .parameter(name, DType::F64, s)
        .unwrap()
}

fn sum_all(g: &mut Graph, x: NodeId) -> NodeId {
    let rank = g.node(x).ty.shape.rank();
    g.push(
        Op::reduce(ReduceOp::Sum, &(0..rank).collect::<Vec<_>>(), false),
        &[x],
        "loss",
    )
    .unwrap()
}

#[test]
fn non_differentiable_operands_get_no_gradient() {
    let mut g = Graph::new("no_gradient");
    let x = param(&mut g, "x", shape![2, 5]);
    let unused = param(&mut g, "unused", shape![3]);
    let idx = GraphBuilder::new(&mut g, "index")
        .input("index", DType::I32, shape![2, 2])
        .unwrap();
    // Gather(x, index) + ScatterAdd(TopK(y), ones) + Where(z > 0, 1, -1) + cast(cast(u)).
    let gathered = g.push(Op::Gather { axis: 1 }, &[x, idx], "gather").unwrap();
    let y = param(&mut g, "y", shape![2, 5]);
    let top = g.push(Op::TopK { k: 2 }, &[y], "top").unwrap();
    let ones = g
        .push(
            Op::Constant {
                value: Scalar(1.0),
                dtype: DType::F64,
                shape: shape![2, 2],
            },
            &[],
            "ones",
        )
        .unwrap();
    let routed = g
        .push(
            Op::ScatterAdd {
                axis: 1,
                shape: shape![2, 5],
            },
            &[top, ones],
            "scatter",
        )
        .unwrap();
    let z = param(&mut g, "z", shape![2, 5]);
    let zero = g
        .push(
            Op::Constant {
                value: Scalar(0.0),
                dtype: DType::F64,
                shape: Shape::scalar(),
            },
            &[],
            "zero",
        )
        .unwrap();
    let minus = g
        .push(
            Op::Constant {
                value: Scalar(-1.0),
                dtype: DType::F64,
                shape: Shape::scalar(),
            },
            &[],
            "minus",
        )
        .unwrap();
    let pos = g
        .push(Op::Compare(CompareOp::Gt), &[z, zero], "pos")
        .unwrap();
    let one = g
        .push(
            Op::Constant {
                value: Scalar(1.0),
                dtype: DType::F64,
                shape: Shape::scalar(),
            },
            &[],
            "one",
        )
        .unwrap();
    let sign = g.push(Op::Where, &[pos, one, minus], "sign").unwrap();
    let u = param(&mut g, "u", shape![2, 2]);
    let ui = g
        .push(Op::Cast { dtype: DType::I32 }, &[u], "to int")
        .unwrap();
    let uf = g
        .push(Op::Cast { dtype: DType::F64 }, &[ui], "to float")
        .unwrap();

    let mut loss = sum_all(&mut g, gathered);
    for term in [routed, sign, uf] {
        let s = sum_all(&mut g, term);
        loss = g
            .push(Op::Binary(BinaryOp::Add), &[loss, s], "loss")
            .unwrap();
    }

    let grads = append_gradients(&mut g, loss, &[x, unused, idx, y, top, z, pos, u, ui]).unwrap();
    let names = ["x", "unused", "index", "y", "top", "z", "pos", "u", "ui"];
    let got: Vec<(&str, bool)> = names
        .iter()
        .copied()
        .zip(grads.iter().map(Option::is_some))
        .collect();
    assert_eq!(
        got,
        [
            ("x", true),
            ("unused", false),
            ("index", false),
            ("y", false),
            ("top", false),
            ("z", false),
            ("pos", false),
            ("u", false),
            ("ui", false),
        ],
        "which nodes get a gradient"
    );
}

// ---------------------------------------------------------------------------------
// The whole tiny model
// ---------------------------------------------------------------------------------

fn tiny_program(moe: MoeDispatch) -> Program {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/alt_moe_tiny.ron");
    let loaded = spec::load(&path).unwrap_or_else(|e| panic!("{e}"));
    lower(
        &loaded.spec,
        LowerOptions {
            dtype: DType::F64,
            mode: Mode::Train,
            moe,
        },
    )
    .unwrap_or_else(|e| panic!("lowering the tiny model: {e}"))
}

/// A batch of 4: uniform tokens in [-1, 1), padded modalities with lengths 6, 3, 1, 4
/// (capped at the modality's maximum).
fn tiny_batch(program: &Program) -> TensorMap {
    let batch = 4;
    let lengths = [6, 3, 1, 4];
    let mut inputs = TensorMap::new();
    for (mi, m) in program.modalities.iter().enumerate() {
        let n = batch * m.tokens * m.input_width;
        inputs.insert(
            format!("{}.tokens", m.name),
            Tensor::f64(
                &[batch, m.tokens, m.input_width],
                uniform_in(500 + mi as u64, n, -1.0, 1.0),
            ),
        );
        if m.padded {
            inputs.insert(
                format!("{}.mask", m.name),
                Tensor::prefix_mask(DType::F64, m.tokens, &lengths[..batch]),
            );
        }
    }
    inputs
}

/// The elements of a parameter of `n` elements checked by finite differences: the
/// first, one in the middle, the last and one drawn at random.
fn checked_elements(n: usize, draw: u64) -> Vec<usize> {
    let random = (rng::uniform(SEED, 0, 4242, draw) * n as f64) as usize;
    let set: BTreeSet<usize> = [0, n / 2, n - 1, random.min(n - 1)].into_iter().collect();
    set.into_iter().collect()
}

fn check_direction(direction: &str, moe: MoeDispatch) {
    let program = tiny_program(moe);
    let info = program
        .directions
        .iter()
        .find(|d| d.name == direction)
        .expect("the tiny model has this direction");
    let forward = program
        .graph(&info.loss_graph)
        .expect("every direction has a loss graph")
        .clone();
    let loss = forward.output("loss").expect("loss graphs output `loss`");
    let inputs = tiny_batch(&program);
    let mut params = initial_parameters(&program.params, DType::F64, 5);
    // Dropout is active: the masks are fixed by (seed, step), so L is a deterministic
    // function of the parameters.
    let ctx = EvalContext { seed: 3, step: 7 };
    assert!(
        forward
            .node_ids()
            .any(|id| matches!(forward.node(id).op, Op::Dropout { .. })),
        "lowered for training, the graph has dropout"
    );

    // Every trainable parameter node of this graph; a parameter used at several sites
    // (the shared gate and experts, once per branch) has one node per use, and its
    // gradient is the sum over them.
    let mut by_name: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
    for (name, id) in forward.parameters() {
        let p = program
            .params
            .get(name)
            .unwrap_or_else(|| panic!("parameter `{name}` is in the table"));
        if p.trainable {
            by_name.entry(name.to_string()).or_default().push(id);
        }
    }
    let in_graph: BTreeSet<&str> = forward.parameters().map(|(n, _)| n).collect();
    let other_prefix: Vec<String> = program
        .directions
        .iter()
        .filter(|d| d.name != direction)
        .map(|d| format!("directions.{}.", d.name))
        .collect();
    assert!(
        in_graph
            .iter()
            .all(|n| !other_prefix.iter().any(|p| n.starts_with(p.as_str()))),
        "{direction}: the loss graph reads another direction's parameters"
    );
    assert!(
        by_name.len() > 10,
        "{direction}: only {} parameters",
        by_name.len()
    );

    check_model_gradients(
        &format!("tiny model, {direction} loss"),
        &forward,
        loss,
        &inputs,
        &mut params,
        ctx,
        &by_name,
    );
}

/// Checks the gradients of `loss` for every use of every parameter in `by_name`
/// against central differences at a few elements of each parameter.
fn check_model_gradients(
    what: &str,
    forward: &Graph,
    loss: NodeId,
    inputs: &TensorMap,
    params: &mut TensorMap,
    ctx: EvalContext,
    by_name: &BTreeMap<String, Vec<NodeId>>,
) {
    let mut graph = forward.clone();
    let wrt: Vec<NodeId> = by_name.values().flatten().copied().collect();
    let grads = append_gradients(&mut graph, loss, &wrt)
        .unwrap_or_else(|e| panic!("{what}: append_gradients failed: {e}"));
    let mut k = 0;
    for (name, ids) in by_name {
        for (site, _) in ids.iter().enumerate() {
            let g = grads[k].unwrap_or_else(|| {
                panic!("{what}: no gradient for use {site} of trainable parameter `{name}`")
            });
            graph.set_output(format!("grad.{name}.{site}"), g).unwrap();
            k += 1;
        }
    }
    let outputs = run(&graph, inputs, params, ctx)
        .unwrap_or_else(|e| panic!("{what}: the gradient graph does not run: {e}"));

    let objective = Objective::new(forward, inputs, params, ctx, loss);
    let l0 = objective.loss_at(params).unwrap();
    assert!(l0.is_finite(), "{what}: loss {l0}");
    assert_eq!(
        outputs["loss"].scalar(),
        Some(l0),
        "{what}: appending gradients changed the loss"
    );

    let mut failures = Vec::new();
    let mut checked = 0;
    for (pi, (name, ids)) in by_name.iter().enumerate() {
        let shape = params[name].shape.clone();
        let mut total = vec![0.0; params[name].len()];
        for site in 0..ids.len() {
            let g = &outputs[&format!("grad.{name}.{site}")];
            assert_eq!(g.shape, shape, "{what}: shape of the gradient of `{name}`");
            for (t, v) in total.iter_mut().zip(g.to_f64()) {
                *t += v;
            }
        }
        for i in checked_elements(total.len(), pi as u64) {
            let numeric = objective.central_difference(params, name, i);
            checked += 1;
            let ok =
                matches!(numeric, Ok(n) if (total[i] - n).abs() <= MODEL_ABS + MODEL_REL * n.abs());
            if !ok {
                failures.push(Mismatch {
                    param: name.clone(),
                    index: i,
                    coords: coords(&shape, i),
                    analytic: total[i],
                    numeric,
                });
            }
        }
    }
    assert!(checked >= 3 * by_name.len());
    report(what, &failures, MODEL_ABS, MODEL_REL);
}

#[test]
fn tiny_model_image_to_text_gradients() {
    check_direction("image_to_text", MoeDispatch::Sparse);
    check_direction("image_to_text", MoeDispatch::Dense);
}

#[test]
fn tiny_model_text_to_image_gradients() {
    check_direction("text_to_image", MoeDispatch::Sparse);
    check_direction("text_to_image", MoeDispatch::Dense);
}

#[test]
fn tiny_model_directions_are_the_expected_ones() {
    let program = tiny_program(MoeDispatch::Sparse);
    let names: Vec<&str> = program.directions.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["image_to_text", "text_to_image"]);
}

// ---------------------------------------------------------------------------------
// A tiny random BERT, unfrozen
// ---------------------------------------------------------------------------------

/// A text encoder with every pretrained-encoder layer: token, class-token, position
/// and token-type embeddings, a post-LN block (BERT) and a pre-LN block with
/// LayerScale (DINOv2), masked-mean pooling and normalisation; width 8, 2 heads.
fn tiny_bert() -> spec::EncoderSpec {
    use spec::{Activation, Encoder, Layer, NormPlacement, Pooling};
    let block = |norm, layer_scale| Layer::Block {
        heads: 2,
        intermediate: 12,
        norm,
        eps: 1e-12,
        activation: Activation::Gelu,
        layer_scale,
    };
    spec::EncoderSpec {
        name: "tiny-bert".into(),
        width: 8,
        encoder: Encoder::Text {
            tokenizer: "unused.json".into(),
            max_length: 6,
            frozen: false,
            layers: vec![
                Layer::TokenEmbedding {
                    vocab: 11,
                    width: 8,
                },
                Layer::ClassToken,
                Layer::PositionEmbedding { positions: 8 },
                Layer::TokenTypeEmbedding { types: 2 },
                Layer::LayerNorm { eps: 1e-12 },
                block(NormPlacement::Post, None),
                block(NormPlacement::Pre, Some(0.5)),
                Layer::TokenPool(Pooling::MaskedMean),
                Layer::Normalize,
            ],
            weights: None,
        },
    }
}

#[test]
fn tiny_random_bert_gradients() {
    use altc_compiler::lower::lower_encoder;
    let (batch, length, width) = (3, 5, 8);
    let program = lower_encoder(&tiny_bert(), length, DType::F64).unwrap();
    let mut forward = program.graph.clone();
    let embedding = forward
        .output("embedding")
        .expect("encoders output `embedding`");
    // L = sum(embedding * R), R fixed.
    let r_shape = Shape(vec![Dim::sym("B"), Dim::Fixed(width)]);
    let loss = {
        let mut b = GraphBuilder::new(&mut forward, "test");
        let r = b.input("r", DType::F64, r_shape).unwrap();
        let weighted = b.mul(embedding, r).unwrap();
        b.sum_all(weighted).unwrap()
    };
    forward.set_output("loss", loss).unwrap();

    // Ids repeat within and across items, so the table's gradient sums several uses.
    let ids = [3, 7, 3, 1, 9, 10, 0, 4, 4, 4, 2, 5, 8, 5, 6];
    let mut inputs = TensorMap::new();
    inputs.insert("ids".into(), i32s(&[batch, length], &ids));
    inputs.insert(
        "mask".into(),
        Tensor::prefix_mask(DType::F64, length, &[5, 2, 3]),
    );
    inputs.insert(
        "r".into(),
        Tensor::f64(&[batch, width], signed_in(77, batch * width, 0.2, 1.0)),
    );
    let mut params = initial_parameters(&program.params, DType::F64, 5);
    let mut by_name: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
    for (name, id) in forward.parameters() {
        assert!(
            program.params.get(name).unwrap().trainable,
            "`{name}` is unfrozen"
        );
        by_name.entry(name.to_string()).or_default().push(id);
    }
    assert!(by_name.contains_key("layers.0.table") && by_name.contains_key("layers.6.mlp_scale"));
    check_model_gradients(
        "tiny random BERT",
        &forward,
        loss,
        &inputs,
        &mut params,
        EvalContext::default(),
        &by_name,
    );
}

#[test]
fn gather_from_a_table_broadcast_over_the_batch() {
    // A [1, 4, 3] table looked up by [2, 5, 3] indices: the gradient sums over the batch.
    let mut c = OpCheck::new("Gather axis=1 [1, 4, 3] with [2, 5, 3] indices");
    let table = c.uniform("table", &[1, 4, 3], -1.0, 1.0);
    let rows = [2, 0, 0, 3, 2, 1, 1, 2, 0, 2];
    let index: Vec<i32> = rows.iter().flat_map(|&r| [r; 3]).collect();
    let idx = c.fixed("index", i32s(&[2, 5, 3], &index));
    let y = c.op(Op::Gather { axis: 1 }, &[table, idx]);
    c.check(y);
}

/// The tiny model with its image encoder frozen and a BERT block added to it.
fn tiny_with_frozen_block_encoder() -> Program {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/alt_moe_tiny.ron");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches("frozen: false").count(), 1);
    let text = text.replace("frozen: false", "frozen: true").replace(
        "layers: [",
        "layers: [Block(heads: 2, intermediate: 8, norm: Post), ",
    );
    let loaded = spec::parse(&text, "tiny-frozen.ron").unwrap_or_else(|e| panic!("{e}"));
    lower(&loaded.spec, LowerOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_frozen_encoder_gets_no_gradient_no_optimizer_state_and_no_backward_nodes() {
    use altc_compiler::train::training_tasks_with_gradients;
    let program = tiny_with_frozen_block_encoder();
    let encoder: Vec<&str> = program
        .params
        .iter()
        .filter(|p| p.name.starts_with("encoders.image."))
        .map(|p| p.name.as_str())
        .collect();
    assert!(encoder
        .iter()
        .any(|n| n.contains(".attention.query.weight")));
    assert!(program
        .params
        .iter()
        .all(|p| p.trainable != p.name.starts_with("encoders.image.")));
    for task in training_tasks_with_gradients(&program).unwrap() {
        assert!(
            task.updates.iter().all(|u| !u.starts_with("encoders.")),
            "{}: updates an encoder parameter",
            task.name
        );
        for (name, _) in task.graph.outputs() {
            assert!(
                !name.contains("encoders.image."),
                "{}: outputs `{name}` for a frozen encoder",
                task.name
            );
        }
        let backward = task
            .graph
            .node_ids()
            .map(|id| &task.graph.node(id).origin)
            .filter(|o| o.contains("encoder") && o.ends_with("(backward)"))
            .count();
        assert_eq!(backward, 0, "{}: backward nodes for the encoder", task.name);
    }
}
