//! Evaluation of IR graphs on host tensors, one op at a time, in topological order.

use super::experts::{self, AssignmentRows, ExpertGroups};
use super::tensor::{broadcast_strides, for_each_index, offset, strides, Data, Real, Tensor};
use crate::ir::{
    broadcast_shapes, BinaryOp, CompareOp, DType, Dim, Graph, GraphError, NodeId, Op, ReduceOp,
    Shape, UnaryOp,
};
use crate::rng;
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EvalError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("graph `{graph}` needs input `{name}`, which was not given")]
    MissingInput { graph: String, name: String },
    #[error("graph `{graph}` needs parameter `{name}`, which was not given")]
    MissingParameter { graph: String, name: String },
    #[error("`{name}` should be {expected_dtype}{expected}, got {got_dtype}{got:?}")]
    Mismatch {
        name: String,
        expected_dtype: DType,
        expected: Shape,
        got_dtype: DType,
        got: Vec<usize>,
    },
    #[error("`{name}` binds symbol {symbol} to {got}, but it is already {bound}")]
    SymbolConflict {
        name: String,
        symbol: String,
        bound: usize,
        got: usize,
    },
    #[error("node {index} ({origin}): symbol {symbol} is not bound by any input")]
    UnboundSymbol {
        index: usize,
        origin: String,
        symbol: String,
    },
    #[error("node {index} ({origin}): index {value} is out of range for a dimension of {size}")]
    IndexOutOfRange {
        index: usize,
        origin: String,
        value: i64,
        size: usize,
    },
}

/// Values that are not tensors but that a run needs: the key of the dropout streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalContext {
    pub seed: u64,
    pub step: u64,
}

/// Tensors by name: the inputs or parameters of a run.
pub type TensorMap = HashMap<String, Tensor>;

/// The value of every node of a run (indexed by node) and the bound symbols.
pub struct Evaluation {
    pub values: Vec<Tensor>,
    pub symbols: BTreeMap<String, usize>,
}

impl Evaluation {
    pub fn value(&self, id: NodeId) -> &Tensor {
        &self.values[id.index()]
    }
}

/// Runs `graph` and returns its named outputs.
pub fn run(
    graph: &Graph,
    inputs: &TensorMap,
    params: &TensorMap,
    ctx: EvalContext,
) -> Result<BTreeMap<String, Tensor>, EvalError> {
    let eval = evaluate(graph, inputs, params, ctx)?;
    Ok(graph
        .outputs()
        .iter()
        .map(|(name, id)| (name.clone(), eval.value(*id).clone()))
        .collect())
}

/// Runs `graph` keeping every node's value (for locating the first NaN, or debugging).
pub fn evaluate(
    graph: &Graph,
    inputs: &TensorMap,
    params: &TensorMap,
    ctx: EvalContext,
) -> Result<Evaluation, EvalError> {
    let order = graph.topo_order()?;
    let mut symbols = BTreeMap::new();
    // Bind symbols from every leaf before computing anything, so shape attributes of
    // later ops can be resolved whatever the node order.
    for &id in &order {
        let (name, is_input, dtype, shape) = match &graph.node(id).op {
            Op::Input { name, dtype, shape } => (name, true, dtype, shape),
            Op::Parameter { name, dtype, shape } => (name, false, dtype, shape),
            _ => continue,
        };
        let source = if is_input { inputs } else { params };
        let Some(t) = source.get(name) else {
            let (graph, name) = (graph.name.clone(), name.clone());
            return Err(if is_input {
                EvalError::MissingInput { graph, name }
            } else {
                EvalError::MissingParameter { graph, name }
            });
        };
        bind(name, *dtype, shape, t, &mut symbols)?;
    }
    let mut values: Vec<Option<Tensor>> = vec![None; graph.len()];
    for id in order {
        let node = graph.node(id);
        let operands: Vec<&Tensor> = graph
            .operands(id)
            .into_iter()
            .map(|o| {
                values[o.index()]
                    .as_ref()
                    .expect("operands come first in topological order")
            })
            .collect();
        let at = Site {
            index: id.index(),
            origin: &node.origin,
            symbols: &symbols,
        };
        let value = match &node.op {
            Op::Input { name, .. } => inputs[name].clone(),
            Op::Parameter { name, .. } => params[name].clone(),
            op => eval_op(op, &operands, &at, ctx)?,
        };
        values[id.index()] = Some(value);
    }
    Ok(Evaluation {
        values: values
            .into_iter()
            .map(|v| v.expect("every node evaluated"))
            .collect(),
        symbols,
    })
}

fn bind(
    name: &str,
    dtype: DType,
    shape: &Shape,
    t: &Tensor,
    symbols: &mut BTreeMap<String, usize>,
) -> Result<(), EvalError> {
    let mismatch = || EvalError::Mismatch {
        name: name.to_string(),
        expected_dtype: dtype,
        expected: shape.clone(),
        got_dtype: t.dtype(),
        got: t.shape.clone(),
    };
    if t.dtype() != dtype || t.shape.len() != shape.rank() {
        return Err(mismatch());
    }
    for (dim, &got) in shape.dims().iter().zip(&t.shape) {
        match dim {
            Dim::Fixed(n) if *n != got => return Err(mismatch()),
            Dim::Fixed(_) => {}
            Dim::Sym(s) => match symbols.get(s) {
                Some(&bound) if bound != got => {
                    return Err(EvalError::SymbolConflict {
                        name: name.to_string(),
                        symbol: s.clone(),
                        bound,
                        got,
                    })
                }
                Some(_) => {}
                None => {
                    symbols.insert(s.clone(), got);
                }
            },
        }
    }
    Ok(())
}

/// Where an op is evaluated: for error messages and resolving symbolic shapes.
struct Site<'a> {
    index: usize,
    origin: &'a str,
    symbols: &'a BTreeMap<String, usize>,
}

impl Site<'_> {
    fn resolve(&self, shape: &Shape) -> Result<Vec<usize>, EvalError> {
        shape
            .dims()
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Ok(*n),
                Dim::Sym(s) => {
                    self.symbols
                        .get(s)
                        .copied()
                        .ok_or_else(|| EvalError::UnboundSymbol {
                            index: self.index,
                            origin: self.origin.to_string(),
                            symbol: s.clone(),
                        })
                }
            })
            .collect()
    }

    fn group_error(&self, bad: experts::BadGroup) -> EvalError {
        self.index_error(bad.value, bad.size)
    }

    fn index_error(&self, value: i64, size: usize) -> EvalError {
        EvalError::IndexOutOfRange {
            index: self.index,
            origin: self.origin.to_string(),
            value,
            size,
        }
    }
}

fn c<T: Real>(v: f64) -> T {
    T::from_f64(v).expect("every f64 converts to a float type")
}

/// Applies `$body` to the float payload of `$t` (bound as `$v`) and rewraps the result.
macro_rules! float_map {
    ($t:expr, |$v:ident| $body:expr) => {
        match &$t.data {
            Data::F32($v) => Data::F32($body),
            Data::F64($v) => Data::F64($body),
            other => unreachable!("type inference admits only floats here, got {:?}", other),
        }
    };
}

/// Applies `$body` to any payload of `$t` (bound as `$v`) and rewraps the result.
macro_rules! any_map {
    ($t:expr, |$v:ident| $body:expr) => {
        match &$t.data {
            Data::F32($v) => Data::F32($body),
            Data::F64($v) => Data::F64($body),
            Data::I32($v) => Data::I32($body),
            Data::Bool($v) => Data::Bool($body),
        }
    };
}

fn eval_op(op: &Op, x: &[&Tensor], at: &Site, ctx: EvalContext) -> Result<Tensor, EvalError> {
    Ok(match op {
        Op::Input { .. } | Op::Parameter { .. } => unreachable!("leaves are bound, not evaluated"),
        Op::Constant {
            value,
            dtype,
            shape,
        } => {
            let shape = at.resolve(shape)?;
            let n = shape.iter().product();
            Tensor::from_f64(*dtype, &shape, vec![value.0; n])
        }
        Op::Iota { axis, dtype, shape } => {
            let shape = at.resolve(shape)?;
            let mut v = Vec::with_capacity(shape.iter().product());
            for_each_index(&shape, |_, coords| v.push(coords[*axis] as f64));
            Tensor::from_f64(*dtype, &shape, v)
        }
        Op::Unary(u) => Tensor::new(
            x[0].shape.clone(),
            float_map!(x[0], |v| v.iter().map(|&a| unary(*u, a)).collect()),
        ),
        Op::Binary(b) => {
            let out = broadcast(&x[0].shape, &x[1].shape);
            let data = match (&x[0].data, &x[1].data) {
                (Data::F32(a), Data::F32(bv)) => Data::F32(zip_broadcast(
                    a,
                    &x[0].shape,
                    bv,
                    &x[1].shape,
                    &out,
                    |p, q| binary(*b, p, q),
                )),
                (Data::F64(a), Data::F64(bv)) => Data::F64(zip_broadcast(
                    a,
                    &x[0].shape,
                    bv,
                    &x[1].shape,
                    &out,
                    |p, q| binary(*b, p, q),
                )),
                _ => unreachable!("type inference admits only matching floats"),
            };
            Tensor::new(out, data)
        }
        Op::Compare(cmp) => {
            let out = broadcast(&x[0].shape, &x[1].shape);
            let (a, b) = (x[0].to_f64(), x[1].to_f64());
            Tensor::bool(
                &out,
                zip_broadcast(&a, &x[0].shape, &b, &x[1].shape, &out, |p, q| {
                    compare(*cmp, p, q)
                }),
            )
        }
        Op::Where => {
            let out = broadcast(&broadcast(&x[0].shape, &x[1].shape), &x[2].shape);
            let Data::Bool(cond) = &x[0].data else {
                unreachable!("type inference admits only bool conditions")
            };
            let cs = broadcast_strides(&x[0].shape, &out);
            let (as_, bs) = (
                broadcast_strides(&x[1].shape, &out),
                broadcast_strides(&x[2].shape, &out),
            );
            let pick = |i: &[usize]| cond[offset(i, &cs)];
            match (&x[1].data, &x[2].data) {
                (Data::F32(a), Data::F32(b)) => {
                    Tensor::f32(&out, select(&out, pick, a, &as_, b, &bs))
                }
                (Data::F64(a), Data::F64(b)) => {
                    Tensor::f64(&out, select(&out, pick, a, &as_, b, &bs))
                }
                (Data::I32(a), Data::I32(b)) => {
                    Tensor::i32(&out, select(&out, pick, a, &as_, b, &bs))
                }
                (Data::Bool(a), Data::Bool(b)) => {
                    Tensor::bool(&out, select(&out, pick, a, &as_, b, &bs))
                }
                _ => unreachable!("type inference admits only matching branches"),
            }
        }
        Op::Cast { dtype } => match (&x[0].data, dtype) {
            (Data::F32(v), DType::I32) => {
                Tensor::i32(&x[0].shape, v.iter().map(|&a| a as i32).collect())
            }
            (Data::F64(v), DType::I32) => {
                Tensor::i32(&x[0].shape, v.iter().map(|&a| a as i32).collect())
            }
            (Data::F32(v), DType::F64) => {
                Tensor::f64(&x[0].shape, v.iter().map(|&a| a as f64).collect())
            }
            _ => Tensor::from_f64(*dtype, &x[0].shape, x[0].to_f64()),
        },
        Op::Reduce {
            op,
            axes,
            keep_dims,
        } => {
            let (data, shape) = match &x[0].data {
                Data::F32(v) => {
                    let (r, s) = reduce(*op, v, &x[0].shape, axes, *keep_dims);
                    (Data::F32(r), s)
                }
                Data::F64(v) => {
                    let (r, s) = reduce(*op, v, &x[0].shape, axes, *keep_dims);
                    (Data::F64(r), s)
                }
                _ => unreachable!("type inference admits only floats"),
            };
            Tensor::new(shape, data)
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            let (a, b) = (x[0], x[1]);
            let (data, shape) = match (&a.data, &b.data) {
                (Data::F32(av), Data::F32(bv)) => {
                    let (r, s) = matmul(av, &a.shape, *transpose_a, bv, &b.shape, *transpose_b);
                    (Data::F32(r), s)
                }
                (Data::F64(av), Data::F64(bv)) => {
                    let (r, s) = matmul(av, &a.shape, *transpose_a, bv, &b.shape, *transpose_b);
                    (Data::F64(r), s)
                }
                _ => unreachable!("type inference admits only matching floats"),
            };
            Tensor::new(shape, data)
        }
        Op::Transpose { perm } => {
            let shape: Vec<usize> = perm.iter().map(|&p| x[0].shape[p]).collect();
            let src = strides(&x[0].shape);
            let moved: Vec<usize> = perm.iter().map(|&p| src[p]).collect();
            Tensor::new(
                shape.clone(),
                any_map!(x[0], |v| gather_strided(v, &shape, &moved)),
            )
        }
        Op::Reshape { shape } => Tensor::new(at.resolve(shape)?, x[0].data.clone()),
        Op::StopGradient => x[0].clone(),
        Op::BroadcastTo { shape } => {
            let shape = at.resolve(shape)?;
            let st = broadcast_strides(&x[0].shape, &shape);
            Tensor::new(
                shape.clone(),
                any_map!(x[0], |v| gather_strided(v, &shape, &st)),
            )
        }
        Op::Slice { axis, start, end } => {
            let mut shape = x[0].shape.clone();
            shape[*axis] = end - start;
            let st = strides(&x[0].shape);
            let base = start * st[*axis];
            Tensor::new(
                shape.clone(),
                any_map!(x[0], |v| {
                    let mut out = Vec::with_capacity(shape.iter().product());
                    for_each_index(&shape, |_, i| out.push(v[base + offset(i, &st)]));
                    out
                }),
            )
        }
        Op::Concat { axis } => {
            let mut shape = x[0].shape.clone();
            shape[*axis] = x.iter().map(|t| t.shape[*axis]).sum();
            concat_same_dtype(x, &shape, *axis)
        }
        Op::Gather { axis } => {
            let (src, index) = (x[0], x[1]);
            let idx = indices(index);
            // Data of extent 1 off the axis is broadcast over the index.
            let st: Vec<usize> = strides(&src.shape)
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    if i != *axis && src.shape[i] == 1 {
                        0
                    } else {
                        s
                    }
                })
                .collect();
            let size = src.shape[*axis];
            let mut offsets = Vec::with_capacity(idx.len());
            let mut bad = None;
            for_each_index(&index.shape, |linear, coords| {
                let i = idx[linear];
                if i < 0 || i as usize >= size {
                    bad.get_or_insert(i);
                    offsets.push(0);
                    return;
                }
                let o = offset(coords, &st) - coords[*axis] * st[*axis] + i as usize * st[*axis];
                offsets.push(o);
            });
            if let Some(i) = bad {
                return Err(at.index_error(i as i64, size));
            }
            Tensor::new(
                index.shape.clone(),
                any_map!(src, |v| offsets.iter().map(|&o| v[o]).collect()),
            )
        }
        Op::ScatterAdd { axis, shape } => {
            let shape = at.resolve(shape)?;
            let (index, src) = (x[0], x[1]);
            let idx = indices(index);
            let st = strides(&shape);
            let size = shape[*axis];
            let mut targets = Vec::with_capacity(idx.len());
            for_each_index(&index.shape, |linear, coords| {
                let i = idx[linear];
                targets.push((i >= 0 && (i as usize) < size).then(|| {
                    offset(coords, &st) - coords[*axis] * st[*axis] + i as usize * st[*axis]
                }));
            });
            if let Some(pos) = targets.iter().position(Option::is_none) {
                return Err(at.index_error(idx[pos] as i64, size));
            }
            let n = shape.iter().product();
            Tensor::new(
                shape,
                float_map!(src, |v| {
                    let mut out = vec![num_traits::zero(); n];
                    for (t, &s) in targets.iter().zip(v.iter()) {
                        let t = t.expect("checked above");
                        out[t] += s;
                    }
                    out
                }),
            )
        }
        Op::TopK { k } => {
            let values = x[0].to_f64();
            let n = *x[0].shape.last().expect("type inference admits rank >= 1");
            let mut out = Vec::with_capacity(values.len() / n.max(1) * k);
            for row in values.chunks(n.max(1)) {
                let mut order: Vec<usize> = (0..n).collect();
                // Stable sort: equal values keep ascending index order.
                order.sort_by(|&i, &j| {
                    row[j]
                        .partial_cmp(&row[i])
                        .unwrap_or(std::cmp::Ordering::Equal)
                });
                out.extend(order[..*k].iter().map(|&i| i as i32));
            }
            let mut shape = x[0].shape.clone();
            *shape.last_mut().expect("rank >= 1") = *k;
            Tensor::i32(&shape, out)
        }
        Op::Dropout { rate, stream } => Tensor::new(
            x[0].shape.clone(),
            float_map!(x[0], |v| dropout(v, rate.0, *stream, ctx)),
        ),
        Op::ExpertOrder { experts } => {
            let order =
                experts::expert_order(indices(x[0]), *experts).map_err(|b| at.group_error(b))?;
            Tensor::i32(&x[0].shape, order)
        }
        Op::ExpertOffsets { experts } => {
            let offsets =
                experts::expert_offsets(indices(x[0]), *experts).map_err(|b| at.group_error(b))?;
            Tensor::i32(&[experts + 1], offsets)
        }
        Op::ExpertMatMul { transpose_w, bias } => {
            let groups = expert_groups(x);
            let w = x[1];
            let m = w.shape[if *transpose_w { 1 } else { 2 }];
            let mut shape = x[x.len() - 2].shape.clone();
            shape.push(m);
            let b = bias.then(|| x[2]);
            let data = match (&x[0].data, &w.data, b.map(|b| &b.data)) {
                (Data::F32(xv), Data::F32(wv), Some(Data::F32(bv))) => experts::expert_matmul(
                    &rows_of(x[0], xv),
                    wv,
                    m,
                    *transpose_w,
                    Some(bv),
                    &groups,
                )
                .map(Data::F32),
                (Data::F32(xv), Data::F32(wv), None) => {
                    experts::expert_matmul(&rows_of(x[0], xv), wv, m, *transpose_w, None, &groups)
                        .map(Data::F32)
                }
                (Data::F64(xv), Data::F64(wv), Some(Data::F64(bv))) => experts::expert_matmul(
                    &rows_of(x[0], xv),
                    wv,
                    m,
                    *transpose_w,
                    Some(bv),
                    &groups,
                )
                .map(Data::F64),
                (Data::F64(xv), Data::F64(wv), None) => {
                    experts::expert_matmul(&rows_of(x[0], xv), wv, m, *transpose_w, None, &groups)
                        .map(Data::F64)
                }
                _ => unreachable!("type inference admits only matching floats"),
            };
            Tensor::new(shape, data.map_err(|b| at.group_error(b))?)
        }
        Op::ExpertWeightGrad => {
            let groups = expert_groups(x);
            let (a, b) = (x[0], x[1]);
            let shape = vec![
                groups.offsets.len() - 1,
                *a.shape.last().expect("rank >= 1"),
                *b.shape.last().expect("rank >= 1"),
            ];
            let data = match (&a.data, &b.data) {
                (Data::F32(av), Data::F32(bv)) => {
                    experts::expert_weight_grad(&rows_of(a, av), &rows_of(b, bv), &groups)
                        .map(Data::F32)
                }
                (Data::F64(av), Data::F64(bv)) => {
                    experts::expert_weight_grad(&rows_of(a, av), &rows_of(b, bv), &groups)
                        .map(Data::F64)
                }
                _ => unreachable!("type inference admits only matching floats"),
            };
            Tensor::new(shape, data.map_err(|b| at.group_error(b))?)
        }
    })
}

fn indices(t: &Tensor) -> &[i32] {
    t.as_i32().expect("type inference admits only i32 indices")
}

/// The `(order, offsets)` operands that close every grouped expert op.
fn expert_groups<'a>(x: &[&'a Tensor]) -> ExpertGroups<'a> {
    ExpertGroups {
        order: indices(x[x.len() - 2]),
        offsets: indices(x[x.len() - 1]),
    }
}

fn rows_of<'a, T>(t: &Tensor, values: &'a [T]) -> AssignmentRows<'a, T> {
    let width = *t.shape.last().expect("rank >= 1");
    AssignmentRows {
        values,
        rows: values.len() / width.max(1),
        width,
    }
}

fn dropout<T: Real>(v: &[T], rate: f64, stream: u64, ctx: EvalContext) -> Vec<T> {
    let scale = c::<T>(1.0 / (1.0 - rate));
    v.iter()
        .enumerate()
        .map(|(i, &a)| {
            if rng::dropout_keeps(rate, ctx.seed, ctx.step, stream, i as u64) {
                a * scale
            } else {
                T::zero()
            }
        })
        .collect()
}

fn broadcast(a: &[usize], b: &[usize]) -> Vec<usize> {
    let to = |s: &[usize]| Shape(s.iter().map(|&d| Dim::Fixed(d)).collect());
    broadcast_shapes(&to(a), &to(b))
        .expect("type inference checked broadcasting")
        .dims()
        .iter()
        .map(|d| d.fixed().expect("concrete"))
        .collect()
}

fn zip_broadcast<A: Copy, B: Copy, O>(
    a: &[A],
    a_shape: &[usize],
    b: &[B],
    b_shape: &[usize],
    out: &[usize],
    f: impl Fn(A, B) -> O,
) -> Vec<O> {
    let (sa, sb) = (
        broadcast_strides(a_shape, out),
        broadcast_strides(b_shape, out),
    );
    let mut v = Vec::with_capacity(out.iter().product());
    for_each_index(out, |_, i| v.push(f(a[offset(i, &sa)], b[offset(i, &sb)])));
    v
}

fn select<E: Copy>(
    out: &[usize],
    pick: impl Fn(&[usize]) -> bool,
    a: &[E],
    sa: &[usize],
    b: &[E],
    sb: &[usize],
) -> Vec<E> {
    let mut v = Vec::with_capacity(out.iter().product());
    for_each_index(out, |_, i| {
        v.push(if pick(i) {
            a[offset(i, sa)]
        } else {
            b[offset(i, sb)]
        })
    });
    v
}

fn gather_strided<E: Copy>(v: &[E], shape: &[usize], st: &[usize]) -> Vec<E> {
    let mut out = Vec::with_capacity(shape.iter().product());
    for_each_index(shape, |_, i| out.push(v[offset(i, st)]));
    out
}

fn concat_same_dtype(x: &[&Tensor], shape: &[usize], axis: usize) -> Tensor {
    let outer: usize = shape[..axis].iter().product();
    macro_rules! join {
        ($variant:ident) => {{
            let parts: Vec<(&Vec<_>, usize)> = x
                .iter()
                .map(|t| match &t.data {
                    Data::$variant(v) => (v, t.shape[axis..].iter().product()),
                    _ => unreachable!("type inference admits one element type"),
                })
                .collect();
            let mut out = Vec::with_capacity(shape.iter().product());
            for o in 0..outer {
                for (v, chunk) in &parts {
                    out.extend_from_slice(&v[o * chunk..(o + 1) * chunk]);
                }
            }
            Data::$variant(out)
        }};
    }
    let data = match x[0].data {
        Data::F32(_) => join!(F32),
        Data::F64(_) => join!(F64),
        Data::I32(_) => join!(I32),
        Data::Bool(_) => join!(Bool),
    };
    Tensor::new(shape.to_vec(), data)
}

/// `op` of one `f64` (the interpreter's own definition, reused for constant folding).
pub fn unary_scalar(op: UnaryOp, x: f64) -> f64 {
    unary(op, x)
}

/// `op` of two `f64`s (the interpreter's own definition, reused for constant folding).
pub fn binary_scalar(op: BinaryOp, a: f64, b: f64) -> f64 {
    binary(op, a, b)
}

pub(crate) fn unary<T: Real>(op: UnaryOp, x: T) -> T {
    let one = T::one();
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => one / x.sqrt(),
        UnaryOp::Recip => one / x,
        UnaryOp::Square => x * x,
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Erf => x.erf(),
        UnaryOp::Sigmoid => one / (one + (-x).exp()),
        // NaN must propagate (as in PyTorch) so the first bad node can be located.
        UnaryOp::Relu if x.is_nan() => x,
        UnaryOp::Relu => x.max(T::zero()),
        UnaryOp::Gelu => c::<T>(0.5) * x * (one + (x * c(std::f64::consts::FRAC_1_SQRT_2)).erf()),
        UnaryOp::Silu => x / (one + (-x).exp()),
    }
}

pub(crate) fn binary<T: Real>(op: BinaryOp, a: T, b: T) -> T {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max | BinaryOp::Min if a.is_nan() || b.is_nan() => T::nan(),
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::Pow => a.powf(b),
    }
}

fn compare(op: CompareOp, a: f64, b: f64) -> bool {
    match op {
        CompareOp::Lt => a < b,
        CompareOp::Le => a <= b,
        CompareOp::Gt => a > b,
        CompareOp::Ge => a >= b,
        CompareOp::Eq => a == b,
        CompareOp::Ne => a != b,
    }
}

fn reduce<T: Real>(
    op: ReduceOp,
    v: &[T],
    shape: &[usize],
    axes: &[usize],
    keep: bool,
) -> (Vec<T>, Vec<usize>) {
    let kept_shape: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    let out_strides = broadcast_strides(&kept_shape, shape);
    let n_out: usize = kept_shape.iter().product();
    let init = match op {
        ReduceOp::Sum | ReduceOp::Mean => T::zero(),
        ReduceOp::Max => T::neg_infinity(),
        ReduceOp::Min => T::infinity(),
    };
    let mut acc = vec![init; n_out];
    for_each_index(shape, |linear, i| {
        let o = offset(i, &out_strides);
        let x = v[linear];
        acc[o] = match op {
            ReduceOp::Sum | ReduceOp::Mean => acc[o] + x,
            ReduceOp::Max | ReduceOp::Min if x.is_nan() || acc[o].is_nan() => T::nan(),
            ReduceOp::Max => acc[o].max(x),
            ReduceOp::Min => acc[o].min(x),
        };
    });
    if op == ReduceOp::Mean {
        let count: usize = axes.iter().map(|&a| shape[a]).product();
        let count = c::<T>(count as f64);
        acc.iter_mut().for_each(|a| *a = *a / count);
    }
    let out_shape = if keep {
        kept_shape
    } else {
        shape
            .iter()
            .enumerate()
            .filter(|(i, _)| !axes.contains(i))
            .map(|(_, &d)| d)
            .collect()
    };
    (acc, out_shape)
}

fn matmul<T: Real>(
    a: &[T],
    a_shape: &[usize],
    ta: bool,
    b: &[T],
    b_shape: &[usize],
    tb: bool,
) -> (Vec<T>, Vec<usize>) {
    let (ra, rb) = (a_shape.len(), b_shape.len());
    let (m, k) = if ta {
        (a_shape[ra - 1], a_shape[ra - 2])
    } else {
        (a_shape[ra - 2], a_shape[ra - 1])
    };
    let n = if tb { b_shape[rb - 2] } else { b_shape[rb - 1] };
    let batch = broadcast(&a_shape[..ra - 2], &b_shape[..rb - 2]);
    // Batch strides in units of whole matrices; a broadcast batch dim has stride 0.
    let a_batch: Vec<usize> = a_shape[..ra - 2].to_vec();
    let b_batch: Vec<usize> = b_shape[..rb - 2].to_vec();
    let sa = broadcast_strides(&a_batch, &batch);
    let sb = broadcast_strides(&b_batch, &batch);
    let (a_mat, b_mat) = (m * k, k * n);
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    let mut out = Vec::with_capacity(out_shape.iter().product());
    for_each_index(&batch, |_, bi| {
        let ao = offset(bi, &sa) * a_mat;
        let bo = offset(bi, &sb) * b_mat;
        for i in 0..m {
            for j in 0..n {
                let mut acc = T::zero();
                for p in 0..k {
                    let x = if ta {
                        a[ao + p * m + i]
                    } else {
                        a[ao + i * k + p]
                    };
                    let y = if tb {
                        b[bo + j * k + p]
                    } else {
                        b[bo + p * n + j]
                    };
                    acc = acc + x * y;
                }
                out.push(acc);
            }
        }
    });
    (out, out_shape)
}
