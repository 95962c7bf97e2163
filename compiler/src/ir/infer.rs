//! Type inference: the result type of an op from its operands' types, or the reason
//! the operands do not fit.

use super::{DType, Dim, Op, Shape, TensorType};
use thiserror::Error;

/// Why an op cannot take the operands it was given.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TypeError {
    #[error("`{op}` takes {expected} operand(s), got {got}")]
    Arity {
        op: String,
        expected: String,
        got: usize,
    },
    #[error("`{op}` needs {expected} operands, got {got}")]
    DType {
        op: String,
        expected: String,
        got: String,
    },
    #[error("`{op}`: {detail}")]
    Shape { op: String, detail: String },
}

fn shape_err(op: &Op, detail: impl Into<String>) -> TypeError {
    TypeError::Shape {
        op: op.mnemonic(),
        detail: detail.into(),
    }
}

fn dtype_err(op: &Op, expected: &str, got: &[&TensorType]) -> TypeError {
    TypeError::DType {
        op: op.mnemonic(),
        expected: expected.into(),
        got: got
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// NumPy broadcasting of two shapes: align on the right; equal dims stay, a fixed 1
/// stretches to the other.
pub fn broadcast_shapes(a: &Shape, b: &Shape) -> Option<Shape> {
    let rank = a.rank().max(b.rank());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = (i + a.rank()).checked_sub(rank).map(|j| &a.0[j]);
        let db = (i + b.rank()).checked_sub(rank).map(|j| &b.0[j]);
        out.push(match (da, db) {
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (Some(x), Some(y)) if x == y => x.clone(),
            (Some(x), Some(y)) if x.is_one() => y.clone(),
            (Some(x), Some(y)) if y.is_one() => x.clone(),
            _ => return None,
        });
    }
    Some(Shape(out))
}

fn same_dtype(op: &Op, operands: &[&TensorType]) -> Result<DType, TypeError> {
    let first = operands[0].dtype;
    if operands.iter().any(|t| t.dtype != first) {
        return Err(dtype_err(op, "operands of one element type", operands));
    }
    Ok(first)
}

fn float_dtype(op: &Op, operands: &[&TensorType]) -> Result<DType, TypeError> {
    let d = same_dtype(op, operands)?;
    if !d.is_float() {
        return Err(dtype_err(op, "floating-point", operands));
    }
    Ok(d)
}

fn check_axis(op: &Op, axis: usize, rank: usize) -> Result<(), TypeError> {
    if axis >= rank {
        return Err(shape_err(
            op,
            format!("axis {axis} is out of range for rank {rank}"),
        ));
    }
    Ok(())
}

/// Infers the type of `op` applied to `operands`.
pub fn infer(op: &Op, operands: &[&TensorType]) -> Result<TensorType, TypeError> {
    match op.arity() {
        Some(n) if n != operands.len() => {
            return Err(TypeError::Arity {
                op: op.mnemonic(),
                expected: n.to_string(),
                got: operands.len(),
            })
        }
        None if operands.is_empty() => {
            return Err(TypeError::Arity {
                op: op.mnemonic(),
                expected: "at least 1".into(),
                got: 0,
            })
        }
        _ => {}
    }
    let ty = |dtype, shape| Ok(TensorType::new(dtype, shape));
    match op {
        Op::Input { dtype, shape, .. }
        | Op::Parameter { dtype, shape, .. }
        | Op::Constant { dtype, shape, .. } => ty(*dtype, shape.clone()),
        Op::Iota { axis, dtype, shape } => {
            check_axis(op, *axis, shape.rank())?;
            ty(*dtype, shape.clone())
        }
        Op::Unary(_) => ty(float_dtype(op, operands)?, operands[0].shape.clone()),
        Op::Dropout { rate, .. } => {
            if !(0.0..1.0).contains(&rate.0) {
                return Err(shape_err(op, format!("rate {} is not in [0, 1)", rate.0)));
            }
            ty(float_dtype(op, operands)?, operands[0].shape.clone())
        }
        Op::Binary(_) => {
            let d = float_dtype(op, operands)?;
            let s = broadcast_operands(op, operands)?;
            ty(d, s)
        }
        Op::Compare(_) => {
            same_dtype(op, operands)?;
            let s = broadcast_operands(op, operands)?;
            ty(DType::Bool, s)
        }
        Op::Where => {
            if operands[0].dtype != DType::Bool {
                return Err(dtype_err(op, "a bool condition", operands));
            }
            let d = same_dtype(op, &operands[1..])?;
            let s = broadcast_shapes(&operands[0].shape, &operands[1].shape)
                .and_then(|s| broadcast_shapes(&s, &operands[2].shape))
                .ok_or_else(|| {
                    shape_err(
                        op,
                        format!(
                            "shapes {}, {} and {} do not broadcast",
                            operands[0].shape, operands[1].shape, operands[2].shape
                        ),
                    )
                })?;
            ty(d, s)
        }
        Op::Cast { dtype } => ty(*dtype, operands[0].shape.clone()),
        Op::Reduce {
            axes, keep_dims, ..
        } => {
            let x = operands[0];
            let d = float_dtype(op, operands)?;
            for (i, a) in axes.iter().enumerate() {
                check_axis(op, *a, x.shape.rank())?;
                if axes[..i].contains(a) {
                    return Err(shape_err(op, format!("axis {a} is listed twice")));
                }
            }
            let dims = x
                .shape
                .0
                .iter()
                .enumerate()
                .filter_map(|(i, dim)| match (axes.contains(&i), keep_dims) {
                    (false, _) => Some(dim.clone()),
                    (true, true) => Some(Dim::Fixed(1)),
                    (true, false) => None,
                })
                .collect();
            ty(d, Shape(dims))
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => infer_matmul(op, operands, *transpose_a, *transpose_b),
        Op::Transpose { perm } => {
            let x = operands[0];
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            if sorted != (0..x.shape.rank()).collect::<Vec<_>>() {
                return Err(shape_err(
                    op,
                    format!(
                        "{perm:?} is not a permutation of the {} axes",
                        x.shape.rank()
                    ),
                ));
            }
            ty(
                x.dtype,
                Shape(perm.iter().map(|&p| x.shape.0[p].clone()).collect()),
            )
        }
        Op::StopGradient => Ok(operands[0].clone()),
        Op::Reshape { shape } => {
            let x = operands[0];
            let (from_n, mut from_syms) = x.shape.split_symbols();
            let (to_n, mut to_syms) = shape.split_symbols();
            from_syms.sort_unstable();
            to_syms.sort_unstable();
            if from_n != to_n || from_syms != to_syms {
                return Err(shape_err(
                    op,
                    format!(
                        "cannot reshape {} to {}: the element counts differ (symbolic \
                         dimensions must be kept as they are)",
                        x.shape, shape
                    ),
                ));
            }
            ty(x.dtype, shape.clone())
        }
        Op::BroadcastTo { shape } => {
            let x = operands[0];
            match broadcast_shapes(&x.shape, shape) {
                Some(s) if &s == shape => ty(x.dtype, shape.clone()),
                _ => Err(shape_err(
                    op,
                    format!("{} does not broadcast to {}", x.shape, shape),
                )),
            }
        }
        Op::Slice { axis, start, end } => {
            let x = operands[0];
            check_axis(op, *axis, x.shape.rank())?;
            let Dim::Fixed(n) = x.shape.0[*axis] else {
                return Err(shape_err(
                    op,
                    format!("cannot slice the symbolic dimension {}", x.shape.0[*axis]),
                ));
            };
            if start > end || *end > n {
                return Err(shape_err(
                    op,
                    format!("range {start}..{end} does not fit a dimension of {n}"),
                ));
            }
            let mut dims = x.shape.0.clone();
            dims[*axis] = Dim::Fixed(end - start);
            ty(x.dtype, Shape(dims))
        }
        Op::Concat { axis } => {
            let d = same_dtype(op, operands)?;
            let first = &operands[0].shape;
            check_axis(op, *axis, first.rank())?;
            let mut total = 0;
            for t in operands {
                let fits = t.shape.rank() == first.rank()
                    && (0..first.rank()).all(|i| i == *axis || t.shape.0[i] == first.0[i]);
                if !fits {
                    return Err(shape_err(
                        op,
                        format!("{} and {} differ outside axis {axis}", first, t.shape),
                    ));
                }
                match &t.shape.0[*axis] {
                    Dim::Fixed(n) => total += n,
                    Dim::Sym(s) => {
                        return Err(shape_err(
                            op,
                            format!("cannot concatenate along the symbolic dimension {s}"),
                        ))
                    }
                }
            }
            let mut dims = first.0.clone();
            dims[*axis] = Dim::Fixed(total);
            ty(d, Shape(dims))
        }
        Op::Gather { axis } => {
            let (x, index) = (operands[0], operands[1]);
            if index.dtype != DType::I32 {
                return Err(dtype_err(op, "an i32 index", operands));
            }
            check_axis(op, *axis, x.shape.rank())?;
            gathered_dims_fit(op, *axis, &x.shape, &index.shape)?;
            ty(x.dtype, index.shape.clone())
        }
        Op::ScatterAdd { axis, shape } => {
            let (index, src) = (operands[0], operands[1]);
            if index.dtype != DType::I32 || !src.dtype.is_float() {
                return Err(dtype_err(op, "an i32 index and a float source", operands));
            }
            if index.shape != src.shape {
                return Err(shape_err(
                    op,
                    format!(
                        "index {} and source {} must have one shape",
                        index.shape, src.shape
                    ),
                ));
            }
            check_axis(op, *axis, shape.rank())?;
            indexed_dims_fit(op, *axis, shape, &index.shape)?;
            ty(src.dtype, shape.clone())
        }
        Op::TopK { k } => {
            let x = operands[0];
            float_dtype(op, operands)?;
            let Some(last) = x.shape.0.last() else {
                return Err(shape_err(op, "needs at least one axis"));
            };
            match last {
                Dim::Fixed(n) if *k >= 1 && k <= n => {}
                _ => {
                    return Err(shape_err(
                        op,
                        format!("k = {k} must be between 1 and the last dimension ({last})"),
                    ))
                }
            }
            let mut dims = x.shape.0.clone();
            *dims.last_mut().expect("checked above") = Dim::Fixed(*k);
            ty(DType::I32, Shape(dims))
        }
        Op::ExpertOrder { experts } | Op::ExpertOffsets { experts } => {
            let index = operands[0];
            if index.dtype != DType::I32 {
                return Err(dtype_err(op, "an i32 expert index", operands));
            }
            match op {
                _ if *experts == 0 => Err(shape_err(op, "needs at least one expert")),
                Op::ExpertOffsets { .. } => ty(DType::I32, Shape(vec![Dim::Fixed(experts + 1)])),
                _ => ty(DType::I32, index.shape.clone()),
            }
        }
        Op::ExpertMatMul { transpose_w, bias } => {
            let (x, w) = (operands[0], operands[1]);
            let (order, offsets) = expert_groups(op, &operands[operands.len() - 2..])?;
            let d = float_dtype(op, &operands[..operands.len() - 2])?;
            let experts = Dim::Fixed(offsets - 1);
            let (k, m) = match (w.shape.0.as_slice(), transpose_w) {
                ([e, k, m], false) if *e == experts => (k, m),
                ([e, m, k], true) if *e == experts => (k, m),
                _ => {
                    return Err(shape_err(
                        op,
                        format!("weights {} must be [{experts}, K, M]", w.shape),
                    ))
                }
            };
            assignment_rows(op, &x.shape, order)?;
            if x.shape.0.last() != Some(k) {
                return Err(shape_err(
                    op,
                    format!("rows {} do not fit weights {} (K = {k})", x.shape, w.shape),
                ));
            }
            if *bias && operands[2].shape.0 != [experts.clone(), m.clone()] {
                return Err(shape_err(
                    op,
                    format!("bias {} must be [{experts}, {m}]", operands[2].shape),
                ));
            }
            let mut dims = order.0.clone();
            dims.push(m.clone());
            ty(d, Shape(dims))
        }
        Op::ExpertWeightGrad => {
            let (a, b) = (operands[0], operands[1]);
            let (order, offsets) = expert_groups(op, &operands[2..])?;
            let d = float_dtype(op, &operands[..2])?;
            assignment_rows(op, &a.shape, order)?;
            assignment_rows(op, &b.shape, order)?;
            let last = |s: &Shape| s.0.last().cloned().expect("rank checked");
            ty(
                d,
                Shape(vec![
                    Dim::Fixed(offsets - 1),
                    last(&a.shape),
                    last(&b.shape),
                ]),
            )
        }
    }
}

/// The `(order, offsets)` operands of a grouped expert op: `order`'s shape and the
/// offsets' length (experts + 1).
fn expert_groups<'a>(op: &Op, groups: &[&'a TensorType]) -> Result<(&'a Shape, usize), TypeError> {
    let (order, offsets) = (groups[0], groups[1]);
    if order.dtype != DType::I32 || offsets.dtype != DType::I32 {
        return Err(dtype_err(op, "i32 expert order and offsets", groups));
    }
    match offsets.shape.0.as_slice() {
        [Dim::Fixed(n)] if *n >= 2 => Ok((&order.shape, *n)),
        _ => Err(shape_err(
            op,
            format!("expert offsets {} must be [experts + 1]", offsets.shape),
        )),
    }
}

/// Checks that rows `[X..., K]` feed the assignments `order` (`X` a prefix of its
/// shape).
fn assignment_rows(op: &Op, rows: &Shape, order: &Shape) -> Result<(), TypeError> {
    let lead = rows
        .rank()
        .checked_sub(1)
        .ok_or_else(|| shape_err(op, "row operands need at least one axis"))?;
    if lead > order.rank() || rows.0[..lead] != order.0[..lead] {
        return Err(shape_err(
            op,
            format!("rows {rows} must lead with a prefix of the assignments {order}"),
        ));
    }
    Ok(())
}

/// Gather/scatter index tensors match the data tensor on every axis but the indexed one.
fn indexed_dims_fit(op: &Op, axis: usize, data: &Shape, index: &Shape) -> Result<(), TypeError> {
    let fits = data.rank() == index.rank()
        && (0..data.rank()).all(|i| i == axis || data.0[i] == index.0[i]);
    if !fits {
        return Err(shape_err(
            op,
            format!("index {index} must match data {data} on every axis but {axis}"),
        ));
    }
    Ok(())
}

/// A gather's data matches its index on every axis but `axis`, or has extent 1
/// there and is broadcast (a table looked up for every example of a batch).
fn gathered_dims_fit(op: &Op, axis: usize, data: &Shape, index: &Shape) -> Result<(), TypeError> {
    let fits = data.rank() == index.rank()
        && (0..data.rank())
            .all(|i| i == axis || data.0[i] == index.0[i] || data.0[i] == Dim::Fixed(1));
    if !fits {
        return Err(shape_err(
            op,
            format!("index {index} must match data {data} on every axis but {axis} (or data has extent 1 there)"),
        ));
    }
    Ok(())
}

fn infer_matmul(
    op: &Op,
    operands: &[&TensorType],
    transpose_a: bool,
    transpose_b: bool,
) -> Result<TensorType, TypeError> {
    let d = float_dtype(op, operands)?;
    let (a, b) = (&operands[0].shape, &operands[1].shape);
    if a.rank() < 2 || b.rank() < 2 {
        return Err(shape_err(
            op,
            format!("operands need rank 2 or more, got {a} and {b}"),
        ));
    }
    let mat = |s: &Shape, t: bool| {
        let r = s.rank();
        let (rows, cols) = (s.0[r - 2].clone(), s.0[r - 1].clone());
        if t {
            (cols, rows)
        } else {
            (rows, cols)
        }
    };
    let (m, ka) = mat(a, transpose_a);
    let (kb, n) = mat(b, transpose_b);
    if ka != kb {
        return Err(shape_err(
            op,
            format!("inner dimensions differ: {a} x {b} (contracting {ka} with {kb})"),
        ));
    }
    let batch_a = Shape(a.0[..a.rank() - 2].to_vec());
    let batch_b = Shape(b.0[..b.rank() - 2].to_vec());
    let mut batch = broadcast_shapes(&batch_a, &batch_b).ok_or_else(|| {
        shape_err(
            op,
            format!("batch dimensions {batch_a} and {batch_b} do not broadcast"),
        )
    })?;
    batch.0.push(m);
    batch.0.push(n);
    Ok(TensorType::new(d, batch))
}

/// The shape two operands broadcast to, or an error naming both.
fn broadcast_operands(op: &Op, operands: &[&TensorType]) -> Result<Shape, TypeError> {
    let (a, b) = (&operands[0].shape, &operands[1].shape);
    broadcast_shapes(a, b)
        .ok_or_else(|| shape_err(op, format!("shapes {a} and {b} do not broadcast")))
}
