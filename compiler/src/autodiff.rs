//! Reverse-mode automatic differentiation as an IR-to-IR transform: the gradient of a
//! scalar output with respect to chosen nodes is appended to the same graph as more
//! primitive ops, so the backward pass goes through the same rewrites, fusion and
//! kernels as the forward pass.
//!
//! Non-differentiable values get no gradient: indices (`TopK`, `Iota`), comparisons,
//! casts to integers. Routing therefore differentiates through the kept gate
//! probabilities (`Gather` of the softmax at the top-k indices) and never through the
//! choice of experts. `Dropout`'s adjoint is dropout of the upstream gradient with the
//! same stream, so it reuses the forward mask exactly.

use crate::ir::{
    BinaryOp, BuildGraph, CompareOp, Dim, Graph, GraphError, NodeId, Op, ReduceOp, Shape, UnaryOp,
};
use petgraph::Direction;
use std::collections::HashMap;

/// Appends to `graph` the gradient of the scalar `loss` with respect to each node of
/// `wrt`; `None` where the loss does not depend on it.
pub fn append_gradients(
    graph: &mut Graph,
    loss: NodeId,
    wrt: &[NodeId],
) -> Result<Vec<Option<NodeId>>, GraphError> {
    let order = graph.topo_order()?;
    let n = graph.len();
    let mut from_wrt = vec![false; n];
    for &w in wrt {
        from_wrt[w.index()] = true;
    }
    for &id in &order {
        if graph.operands(id).iter().any(|o| from_wrt[o.index()]) {
            from_wrt[id.index()] = true;
        }
    }
    let mut to_loss = vec![false; n];
    to_loss[loss.index()] = true;
    for &id in order.iter().rev() {
        if graph
            .dag()
            .neighbors_directed(id, Direction::Outgoing)
            .any(|user| to_loss[user.index()])
        {
            to_loss[id.index()] = true;
        }
    }

    let mut bw = Backward {
        graph,
        origin: String::new(),
    };
    let loss_ty = bw.graph.node(loss).ty.clone();
    bw.origin = format!("{} (backward)", bw.graph.node(loss).origin);
    let seed = bw.constant(1.0, loss_ty.dtype, loss_ty.shape)?;
    let mut adjoint: HashMap<NodeId, NodeId> = HashMap::from([(loss, seed)]);
    for &id in order.iter().rev() {
        let Some(&g) = adjoint.get(&id) else {
            continue;
        };
        if !(from_wrt[id.index()] && to_loss[id.index()]) {
            continue;
        }
        let operands = bw.graph.operands(id);
        bw.origin = format!("{} (backward)", bw.graph.node(id).origin);
        let contributions = bw.vjp(id, &operands, g)?;
        for (operand, grad) in operands.iter().zip(contributions) {
            let Some(grad) = grad else { continue };
            if !from_wrt[operand.index()] {
                continue;
            }
            let total = match adjoint.get(operand) {
                Some(&prev) => bw.binary(BinaryOp::Add, prev, grad)?,
                None => grad,
            };
            adjoint.insert(*operand, total);
        }
    }
    Ok(wrt.iter().map(|w| adjoint.get(w).copied()).collect())
}

struct Backward<'g> {
    graph: &'g mut Graph,
    origin: String,
}

crate::build_graph_from_fields!(Backward<'_>);

impl Backward<'_> {
    fn shape(&self, id: NodeId) -> Shape {
        self.shape_of(id).clone()
    }

    /// A scalar constant in `like`'s element type.
    fn scalar(&mut self, value: f64, like: NodeId) -> Result<NodeId, GraphError> {
        let dtype = self.dtype_of(like);
        self.constant(value, dtype, Shape::scalar())
    }

    fn scale(&mut self, x: NodeId, factor: f64) -> Result<NodeId, GraphError> {
        let f = self.scalar(factor, x)?;
        self.mul(x, f)
    }

    /// Sums a broadcast gradient back down to `target` (the adjoint of broadcasting).
    fn sum_to(&mut self, g: NodeId, target: &Shape) -> Result<NodeId, GraphError> {
        let mut x = g;
        let rank = self.shape(x).rank();
        if rank > target.rank() {
            let leading: Vec<usize> = (0..rank - target.rank()).collect();
            x = self.reduce(ReduceOp::Sum, x, &leading, false)?;
        }
        let shape = self.shape(x);
        let stretched: Vec<usize> = (0..target.rank())
            .filter(|&i| target.0[i].is_one() && !shape.0[i].is_one())
            .collect();
        if !stretched.is_empty() {
            x = self.reduce(ReduceOp::Sum, x, &stretched, true)?;
        }
        if &self.shape(x) != target {
            x = self.reshape(x, target.clone())?;
        }
        Ok(x)
    }

    /// The gradient contribution to each operand of `id` given its adjoint `g`.
    fn vjp(
        &mut self,
        id: NodeId,
        operands: &[NodeId],
        g: NodeId,
    ) -> Result<Vec<Option<NodeId>>, GraphError> {
        let op = self.graph.node(id).op.clone();
        let y = id;
        Ok(match op {
            Op::Input { .. } | Op::Parameter { .. } | Op::Constant { .. } | Op::Iota { .. } => {
                vec![]
            }
            Op::Compare(_) | Op::TopK { .. } | Op::StopGradient => vec![None; operands.len()],
            Op::Unary(u) => vec![Some(self.unary_vjp(u, operands[0], y, g)?)],
            Op::Binary(b) => {
                let (ga, gb) = self.binary_vjp(b, operands[0], operands[1], y, g)?;
                let (sa, sb) = (self.shape(operands[0]), self.shape(operands[1]));
                vec![Some(self.sum_to(ga, &sa)?), Some(self.sum_to(gb, &sb)?)]
            }
            Op::Where => {
                let zero = self.scalar(0.0, g)?;
                let ga = self.select(operands[0], g, zero)?;
                let gb = self.select(operands[0], zero, g)?;
                let (sa, sb) = (self.shape(operands[1]), self.shape(operands[2]));
                vec![
                    None,
                    Some(self.sum_to(ga, &sa)?),
                    Some(self.sum_to(gb, &sb)?),
                ]
            }
            Op::Cast { dtype } => {
                let from = self.dtype_of(operands[0]);
                if dtype.is_float() && from.is_float() {
                    vec![Some(self.cast(g, from)?)]
                } else {
                    vec![None]
                }
            }
            Op::Reduce {
                op,
                axes,
                keep_dims,
            } => vec![Some(self.reduce_vjp(
                op,
                &axes,
                keep_dims,
                operands[0],
                y,
                g,
            )?)],
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => {
                let (a, b) = (operands[0], operands[1]);
                let (ga, gb) = match (transpose_a, transpose_b) {
                    (false, false) => (
                        self.matmul(g, b, false, true)?,
                        self.matmul(a, g, true, false)?,
                    ),
                    (false, true) => (
                        self.matmul(g, b, false, false)?,
                        self.matmul(g, a, true, false)?,
                    ),
                    (true, false) => (
                        self.matmul(b, g, false, true)?,
                        self.matmul(a, g, false, false)?,
                    ),
                    (true, true) => (
                        self.matmul(b, g, true, true)?,
                        self.matmul(g, a, true, true)?,
                    ),
                };
                let (sa, sb) = (self.shape(a), self.shape(b));
                vec![Some(self.sum_to(ga, &sa)?), Some(self.sum_to(gb, &sb)?)]
            }
            Op::Transpose { perm } => {
                let mut inverse = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inverse[p] = i;
                }
                vec![Some(self.transpose(g, &inverse)?)]
            }
            Op::Reshape { .. } => {
                let shape = self.shape(operands[0]);
                vec![Some(self.reshape(g, shape)?)]
            }
            Op::BroadcastTo { .. } => {
                let shape = self.shape(operands[0]);
                vec![Some(self.sum_to(g, &shape)?)]
            }
            Op::Slice { axis, start, end } => {
                let shape = self.shape(operands[0]);
                let size = shape.0[axis]
                    .fixed()
                    .expect("slices are along fixed dimensions");
                let mut parts = Vec::new();
                for (from, to) in [(0, start), (end, size)] {
                    if to > from {
                        let mut pad = shape.clone();
                        pad.0[axis] = Dim::Fixed(to - from);
                        parts.push(self.constant(0.0, self.dtype_of(g), pad)?);
                    }
                }
                let grad = match parts.len() {
                    0 => g,
                    _ => {
                        let mut pieces = Vec::new();
                        if start > 0 {
                            pieces.push(parts.remove(0));
                        }
                        pieces.push(g);
                        pieces.extend(parts);
                        self.push(Op::Concat { axis }, &pieces)?
                    }
                };
                vec![Some(grad)]
            }
            Op::Concat { axis } => {
                let mut offset = 0;
                let mut grads = Vec::new();
                for &o in operands {
                    let size = self.shape(o).0[axis]
                        .fixed()
                        .expect("concatenation is along fixed dimensions");
                    grads.push(Some(self.push(
                        Op::Slice {
                            axis,
                            start: offset,
                            end: offset + size,
                        },
                        &[g],
                    )?));
                    offset += size;
                }
                grads
            }
            Op::Gather { axis } => {
                let data = self.shape(operands[0]);
                // Scatter over the index's extents, then sum what the data broadcast.
                // For a table looked up over a batch this scatters into
                // `[B, vocab, width]` first: fine at test sizes, a cost to remove
                // before training text encoders at scale.
                let mut full = self.shape(operands[1]);
                full.0[axis] = data.0[axis].clone();
                let scattered = self.push(
                    Op::ScatterAdd {
                        axis,
                        shape: full.clone(),
                    },
                    &[operands[1], g],
                )?;
                let broadcast: Vec<usize> = (0..data.rank())
                    .filter(|&i| data.0[i] != full.0[i])
                    .collect();
                let grad = if broadcast.is_empty() {
                    scattered
                } else {
                    self.reduce(ReduceOp::Sum, scattered, &broadcast, true)?
                };
                vec![Some(grad), None]
            }
            Op::ScatterAdd { axis, .. } => vec![
                None,
                Some(self.push(Op::Gather { axis }, &[g, operands[0]])?),
            ],
            Op::Dropout { rate, stream } => {
                vec![Some(self.push(Op::Dropout { rate, stream }, &[g])?)]
            }
            Op::ExpertOrder { .. } | Op::ExpertOffsets { .. } => vec![None],
            Op::ExpertMatMul { transpose_w, bias } => {
                let (x, w) = (operands[0], operands[1]);
                let groups = &operands[operands.len() - 2..];
                let gx = self.expert_matmul(g, w, !transpose_w, groups)?;
                let gx = self.sum_slots(gx, x)?;
                let gw = if transpose_w {
                    self.expert_weight_grad(g, x, groups)?
                } else {
                    self.expert_weight_grad(x, g, groups)?
                };
                let mut grads = vec![Some(gx), Some(gw)];
                if bias {
                    // The bias is a weight applied to a constant 1 feature.
                    let one = self.constant(1.0, self.dtype_of(g), Shape(vec![Dim::Fixed(1)]))?;
                    let gb = self.expert_weight_grad(one, g, groups)?;
                    let shape = self.shape(operands[2]);
                    grads.push(Some(self.push(Op::Reshape { shape }, &[gb])?));
                }
                grads.extend([None, None]);
                grads
            }
            Op::ExpertWeightGrad => {
                let (a, b) = (operands[0], operands[1]);
                let groups = &operands[2..];
                let ga = self.expert_matmul(b, g, true, groups)?;
                let gb = self.expert_matmul(a, g, false, groups)?;
                vec![
                    Some(self.sum_slots(ga, a)?),
                    Some(self.sum_slots(gb, b)?),
                    None,
                    None,
                ]
            }
        })
    }

    fn expert_matmul(
        &mut self,
        x: NodeId,
        w: NodeId,
        transpose_w: bool,
        groups: &[NodeId],
    ) -> Result<NodeId, GraphError> {
        self.push(
            Op::ExpertMatMul {
                transpose_w,
                bias: false,
            },
            &[x, w, groups[0], groups[1]],
        )
    }

    fn expert_weight_grad(
        &mut self,
        a: NodeId,
        b: NodeId,
        groups: &[NodeId],
    ) -> Result<NodeId, GraphError> {
        self.push(Op::ExpertWeightGrad, &[a, b, groups[0], groups[1]])
    }

    /// Sums a per-assignment gradient `[A..., W]` over the slots its rows `[X..., W]`
    /// fanned out to (the adjoint of a row feeding several assignments).
    fn sum_slots(&mut self, g: NodeId, rows: NodeId) -> Result<NodeId, GraphError> {
        let (full, lead) = (self.shape(g).rank() - 1, self.shape(rows).rank() - 1);
        if full == lead {
            return Ok(g);
        }
        self.reduce(ReduceOp::Sum, g, &(lead..full).collect::<Vec<_>>(), false)
    }

    fn unary_vjp(
        &mut self,
        u: UnaryOp,
        x: NodeId,
        y: NodeId,
        g: NodeId,
    ) -> Result<NodeId, GraphError> {
        let dydx = match u {
            UnaryOp::Neg => return self.unary(UnaryOp::Neg, g),
            UnaryOp::Abs => {
                // sign(x), with 0 at 0 (PyTorch's convention).
                let zero = self.scalar(0.0, x)?;
                let (one, minus) = (self.scalar(1.0, x)?, self.scalar(-1.0, x)?);
                let pos = self.compare(CompareOp::Gt, x, zero)?;
                let neg = self.compare(CompareOp::Lt, x, zero)?;
                let inner = self.select(neg, minus, zero)?;
                self.select(pos, one, inner)?
            }
            UnaryOp::Exp => y,
            UnaryOp::Log => return self.binary(BinaryOp::Div, g, x),
            UnaryOp::Sqrt => {
                let half = self.scale(g, 0.5)?;
                return self.binary(BinaryOp::Div, half, y);
            }
            UnaryOp::Rsqrt => {
                // d/dx x^-1/2 = -1/2 x^-3/2 = -1/2 * y / x
                let q = self.binary(BinaryOp::Div, y, x)?;
                self.scale(q, -0.5)?
            }
            UnaryOp::Recip => {
                let sq = self.unary(UnaryOp::Square, y)?;
                self.unary(UnaryOp::Neg, sq)?
            }
            UnaryOp::Square => self.scale(x, 2.0)?,
            UnaryOp::Tanh => {
                let sq = self.unary(UnaryOp::Square, y)?;
                let one = self.scalar(1.0, y)?;
                self.binary(BinaryOp::Sub, one, sq)?
            }
            UnaryOp::Sigmoid => {
                let one = self.scalar(1.0, y)?;
                let rest = self.binary(BinaryOp::Sub, one, y)?;
                self.mul(y, rest)?
            }
            UnaryOp::Relu => {
                let zero = self.scalar(0.0, x)?;
                let pos = self.compare(CompareOp::Gt, x, zero)?;
                return self.select(pos, g, zero);
            }
            UnaryOp::Erf => {
                // 2/sqrt(pi) * exp(-x^2)
                let sq = self.unary(UnaryOp::Square, x)?;
                let neg = self.unary(UnaryOp::Neg, sq)?;
                let e = self.unary(UnaryOp::Exp, neg)?;
                self.scale(e, std::f64::consts::FRAC_2_SQRT_PI)?
            }
            UnaryOp::Gelu => {
                // Phi(x) + x * phi(x), Phi the normal CDF and phi its density.
                let scaled = self.scale(x, std::f64::consts::FRAC_1_SQRT_2)?;
                let erf = self.unary(UnaryOp::Erf, scaled)?;
                let one = self.scalar(1.0, x)?;
                let cdf = self.binary(BinaryOp::Add, one, erf)?;
                let cdf = self.scale(cdf, 0.5)?;
                let sq = self.unary(UnaryOp::Square, x)?;
                let expo = self.scale(sq, -0.5)?;
                let density = self.unary(UnaryOp::Exp, expo)?;
                let density = self.scale(density, 1.0 / (2.0 * std::f64::consts::PI).sqrt())?;
                let x_density = self.mul(x, density)?;
                self.binary(BinaryOp::Add, cdf, x_density)?
            }
            UnaryOp::Silu => {
                // s * (1 + x * (1 - s)), s = sigmoid(x)
                let s = self.unary(UnaryOp::Sigmoid, x)?;
                let one = self.scalar(1.0, x)?;
                let rest = self.binary(BinaryOp::Sub, one, s)?;
                let xr = self.mul(x, rest)?;
                let inner = self.binary(BinaryOp::Add, one, xr)?;
                self.mul(s, inner)?
            }
        };
        self.mul(g, dydx)
    }

    fn binary_vjp(
        &mut self,
        op: BinaryOp,
        a: NodeId,
        b: NodeId,
        y: NodeId,
        g: NodeId,
    ) -> Result<(NodeId, NodeId), GraphError> {
        Ok(match op {
            BinaryOp::Add => (g, g),
            BinaryOp::Sub => (g, self.unary(UnaryOp::Neg, g)?),
            BinaryOp::Mul => (self.mul(g, b)?, self.mul(g, a)?),
            BinaryOp::Div => {
                let ga = self.binary(BinaryOp::Div, g, b)?;
                let gy = self.mul(ga, y)?;
                (ga, self.unary(UnaryOp::Neg, gy)?)
            }
            BinaryOp::Max | BinaryOp::Min => {
                // Ties send the gradient to `a`.
                let cmp = if op == BinaryOp::Max {
                    CompareOp::Ge
                } else {
                    CompareOp::Le
                };
                let picks_a = self.compare(cmp, a, b)?;
                let zero = self.scalar(0.0, g)?;
                (
                    self.select(picks_a, g, zero)?,
                    self.select(picks_a, zero, g)?,
                )
            }
            BinaryOp::Pow => {
                // d/da a^b = b a^(b-1); d/db a^b = a^b ln a
                let one = self.scalar(1.0, b)?;
                let bm1 = self.binary(BinaryOp::Sub, b, one)?;
                let p = self.binary(BinaryOp::Pow, a, bm1)?;
                let da = self.mul(b, p)?;
                let ln = self.unary(UnaryOp::Log, a)?;
                let db = self.mul(y, ln)?;
                (self.mul(g, da)?, self.mul(g, db)?)
            }
        })
    }

    fn reduce_vjp(
        &mut self,
        op: ReduceOp,
        axes: &[usize],
        keep_dims: bool,
        x: NodeId,
        y: NodeId,
        g: NodeId,
    ) -> Result<NodeId, GraphError> {
        let x_shape = self.shape(x);
        let kept = Shape(
            x_shape
                .0
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    if axes.contains(&i) {
                        Dim::Fixed(1)
                    } else {
                        d.clone()
                    }
                })
                .collect(),
        );
        let restore = |bw: &mut Self, v: NodeId| -> Result<NodeId, GraphError> {
            if keep_dims {
                Ok(v)
            } else {
                bw.push(
                    Op::Reshape {
                        shape: kept.clone(),
                    },
                    &[v],
                )
            }
        };
        let gk = restore(self, g)?;
        let dtype = self.dtype_of(x);
        match op {
            ReduceOp::Sum => self.push(Op::BroadcastTo { shape: x_shape }, &[gk]),
            ReduceOp::Mean => {
                // Divide by the number of reduced elements, which may involve the batch
                // symbol: count them as a sum of ones so it resolves at run time.
                let ones = self.constant(1.0, dtype, x_shape.clone())?;
                let count = self.reduce(ReduceOp::Sum, ones, axes, true)?;
                let per = self.binary(BinaryOp::Div, gk, count)?;
                self.push(Op::BroadcastTo { shape: x_shape }, &[per])
            }
            ReduceOp::Max | ReduceOp::Min => {
                // Split the gradient evenly among the elements that attain the extremum.
                let yk = restore(self, y)?;
                let hit = self.compare(CompareOp::Eq, x, yk)?;
                let mask = self.cast(hit, dtype)?;
                let ties = self.reduce(ReduceOp::Sum, mask, axes, true)?;
                let per = self.binary(BinaryOp::Div, gk, ties)?;
                self.mul(mask, per)
            }
        }
    }
}
