//! Graph building blocks the lowering composes: linear layers, layer norm, softmax,
//! pooling, all as primitive IR ops, each node tagged with the spec path it came from.

use super::params::{Init, ParamKind, ParamTable};
use crate::ir::{
    BinaryOp, BuildGraph, CompareOp, DType, Dim, Graph, GraphError, NodeId, Op, ReduceOp, Scalar,
    Shape, UnaryOp,
};
use crate::spec::{Activation, Pooling};

/// The batch-size symbol every lowered graph is generic over.
pub const BATCH: &str = "B";

pub struct Builder<'p> {
    pub graph: Graph,
    pub params: &'p mut ParamTable,
    pub dtype: DType,
    /// The spec path new nodes are attributed to.
    pub origin: String,
    /// Dropout stream counter shared by every graph of a program, so no two dropout
    /// sites anywhere in it draw the same mask.
    streams: &'p mut u64,
}

crate::build_graph_from_fields!(Builder<'_>);

pub type Result<T> = std::result::Result<T, GraphError>;

/// How a projection's weight is stored.
#[derive(Clone, Copy)]
enum WeightLayout {
    /// `[in, out]`: `x W`.
    InOut,
    /// `[out, in]`, PyTorch's: `x W^T`.
    OutIn,
}

impl<'p> Builder<'p> {
    pub fn new(
        name: &str,
        params: &'p mut ParamTable,
        streams: &'p mut u64,
        dtype: DType,
    ) -> Builder<'p> {
        Builder {
            graph: Graph::new(name),
            params,
            dtype,
            origin: String::new(),
            streams,
        }
    }

    /// Runs `f` with new nodes attributed to `origin`.
    pub fn at<T>(&mut self, origin: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let saved = std::mem::replace(&mut self.origin, origin.to_string());
        let out = f(self);
        self.origin = saved;
        out
    }

    pub fn ty(&self, id: NodeId) -> &Shape {
        self.shape_of(id)
    }

    /// A graph input in the graph's float type.
    pub fn float_input(&mut self, name: &str, shape: Shape) -> Result<NodeId> {
        let dtype = self.dtype;
        self.input(name, dtype, shape)
    }

    /// A parameter node, registering the parameter on first use.
    pub fn param(
        &mut self,
        name: &str,
        shape: &[usize],
        kind: ParamKind,
        init: Init,
    ) -> Result<NodeId> {
        self.params.register(name, shape, kind, init, &self.origin);
        // One node per parameter however often it is used.
        if let Some((_, id)) = self.graph.parameters().find(|(n, _)| *n == name) {
            return Ok(id);
        }
        let dtype = self.dtype;
        self.parameter(name, dtype, shape.iter().copied().collect())
    }

    /// A learned `[1, 1, width]` embedding added to every token (normal, std 0.02).
    pub fn embedding(&mut self, name: &str, width: usize) -> Result<NodeId> {
        let init = Init::Normal { std: 0.02 };
        self.param(name, &[1, 1, width], ParamKind::Embedding, init)
    }

    /// A scalar constant in the graph's float type.
    pub fn scalar(&mut self, value: f64) -> Result<NodeId> {
        let dtype = self.dtype;
        self.constant(value, dtype, Shape::scalar())
    }

    pub fn scale(&mut self, x: NodeId, factor: f64) -> Result<NodeId> {
        let f = self.scalar(factor)?;
        self.mul(x, f)
    }

    pub fn last_axis(&self, x: NodeId) -> usize {
        self.ty(x).rank() - 1
    }

    pub fn activation(&mut self, act: Activation, x: NodeId) -> Result<NodeId> {
        let op = match act {
            Activation::Gelu => UnaryOp::Gelu,
            Activation::Relu => UnaryOp::Relu,
            Activation::Silu => UnaryOp::Silu,
            Activation::Tanh => UnaryOp::Tanh,
            Activation::Identity => return Ok(x),
        };
        self.unary(op, x)
    }

    /// `x W + b` over the last axis, with PyTorch's default initialisation.
    pub fn linear(
        &mut self,
        x: NodeId,
        prefix: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<NodeId> {
        self.projection(x, prefix, (inp, out), bias, WeightLayout::InOut)
    }

    /// `x W^T + b` over the last axis with `W` stored `[out, in]`, as PyTorch's
    /// `nn.Linear` stores it, so pretrained weights load as they are.
    pub fn dense(&mut self, x: NodeId, prefix: &str, inp: usize, out: usize) -> Result<NodeId> {
        self.projection(x, prefix, (inp, out), true, WeightLayout::OutIn)
    }

    /// `x` times `<prefix>.weight` stored in `layout`, plus `<prefix>.bias` when
    /// `bias`; both initialised `U(-1/sqrt(in), 1/sqrt(in))`, PyTorch's default.
    fn projection(
        &mut self,
        x: NodeId,
        prefix: &str,
        (inp, out): (usize, usize),
        bias: bool,
        layout: WeightLayout,
    ) -> Result<NodeId> {
        let bound = 1.0 / (inp as f64).sqrt();
        let (shape, transposed) = match layout {
            WeightLayout::InOut => ([inp, out], false),
            WeightLayout::OutIn => ([out, inp], true),
        };
        let w = self.param(
            &format!("{prefix}.weight"),
            &shape,
            ParamKind::Weight,
            Init::Uniform { bound },
        )?;
        let y = self.matmul(x, w, false, transposed)?;
        if !bias {
            return Ok(y);
        }
        let b = self.param(
            &format!("{prefix}.bias"),
            &[out],
            ParamKind::Bias,
            Init::Uniform { bound },
        )?;
        self.add(y, b)
    }

    /// LayerNorm over the last axis (biased variance, as PyTorch).
    pub fn layer_norm(
        &mut self,
        x: NodeId,
        prefix: &str,
        width: usize,
        eps: f64,
    ) -> Result<NodeId> {
        let axis = self.last_axis(x);
        let mean = self.reduce(ReduceOp::Mean, x, &[axis], true)?;
        let centred = self.sub(x, mean)?;
        let sq = self.unary(UnaryOp::Square, centred)?;
        let var = self.reduce(ReduceOp::Mean, sq, &[axis], true)?;
        let eps = self.scalar(eps)?;
        let var = self.add(var, eps)?;
        let inv = self.unary(UnaryOp::Rsqrt, var)?;
        let normed = self.mul(centred, inv)?;
        let gamma = self.param(
            &format!("{prefix}.gamma"),
            &[width],
            ParamKind::Norm,
            Init::Ones,
        )?;
        let beta = self.param(
            &format!("{prefix}.beta"),
            &[width],
            ParamKind::Norm,
            Init::Zeros,
        )?;
        let scaled = self.mul(normed, gamma)?;
        self.add(scaled, beta)
    }

    /// The row maximum a stable softmax or log-sum-exp shifts by. Both are exactly
    /// shift-invariant, so no gradient flows through it: backward skips the maximum's
    /// tie-splitting, and the maximum is read only by the shift.
    fn stable_shift(&mut self, x: NodeId, axis: usize) -> Result<NodeId> {
        let m = self.reduce(ReduceOp::Max, x, &[axis], true)?;
        self.push(Op::StopGradient, &[m])
    }

    /// `log(sum(exp(x)))` along `axis` (kept), shifted by the maximum for stability.
    pub fn log_sum_exp(&mut self, x: NodeId, axis: usize) -> Result<NodeId> {
        let m = self.stable_shift(x, axis)?;
        let shifted = self.sub(x, m)?;
        let e = self.unary(UnaryOp::Exp, shifted)?;
        let s = self.reduce(ReduceOp::Sum, e, &[axis], true)?;
        let l = self.unary(UnaryOp::Log, s)?;
        self.add(m, l)
    }

    pub fn softmax(&mut self, x: NodeId, axis: usize) -> Result<NodeId> {
        let m = self.stable_shift(x, axis)?;
        let shifted = self.sub(x, m)?;
        let e = self.unary(UnaryOp::Exp, shifted)?;
        let s = self.reduce(ReduceOp::Sum, e, &[axis], true)?;
        self.div(e, s)
    }

    pub fn log_softmax(&mut self, x: NodeId, axis: usize) -> Result<NodeId> {
        let lse = self.log_sum_exp(x, axis)?;
        self.sub(x, lse)
    }

    /// Pools `[B, L, d]` tokens to `[B, d]`; `mask` is `[B, L]` with 1 for real tokens.
    pub fn pool(&mut self, x: NodeId, mask: Option<NodeId>, pooling: Pooling) -> Result<NodeId> {
        let dims = self.ty(x).dims().to_vec();
        match (pooling, mask) {
            (Pooling::MaskedMean, Some(mask)) => {
                let m3 = self.reshape(
                    mask,
                    Shape(vec![dims[0].clone(), dims[1].clone(), Dim::Fixed(1)]),
                )?;
                let weighted = self.mul(x, m3)?;
                let total = self.reduce(ReduceOp::Sum, weighted, &[1], false)?;
                let count = self.reduce(ReduceOp::Sum, m3, &[1], false)?;
                let one = self.scalar(1.0)?;
                let count = self.binary(BinaryOp::Max, count, one)?;
                self.div(total, count)
            }
            (Pooling::MaskedMean | Pooling::Mean, _) => self.reduce(ReduceOp::Mean, x, &[1], false),
            (Pooling::First, _) => {
                let first = self.push(
                    Op::Slice {
                        axis: 1,
                        start: 0,
                        end: 1,
                    },
                    &[x],
                )?;
                self.reshape(first, Shape(vec![dims[0].clone(), dims[2].clone()]))
            }
        }
    }

    /// `x / max(||x||, 1e-12)` along the last axis (PyTorch's `F.normalize`).
    pub fn l2_normalize(&mut self, x: NodeId) -> Result<NodeId> {
        let axis = self.last_axis(x);
        let sq = self.unary(UnaryOp::Square, x)?;
        let ss = self.reduce(ReduceOp::Sum, sq, &[axis], true)?;
        let norm = self.unary(UnaryOp::Sqrt, ss)?;
        let eps = self.scalar(1e-12)?;
        let norm = self.binary(BinaryOp::Max, norm, eps)?;
        self.div(x, norm)
    }

    /// A `[B, B]` identity in the graph's float type.
    pub fn batch_identity(&mut self) -> Result<NodeId> {
        let shape = Shape(vec![Dim::sym(BATCH), Dim::sym(BATCH)]);
        let rows = self.push(
            Op::Iota {
                axis: 0,
                dtype: DType::I32,
                shape: shape.clone(),
            },
            &[],
        )?;
        let cols = self.push(
            Op::Iota {
                axis: 1,
                dtype: DType::I32,
                shape,
            },
            &[],
        )?;
        let eq = self.compare(CompareOp::Eq, rows, cols)?;
        let dtype = self.dtype;
        self.cast(eq, dtype)
    }

    /// Dropout with its own counter-based stream, or nothing when `rate` is 0 or the
    /// graph is for inference.
    pub fn dropout(&mut self, x: NodeId, rate: f64, train: bool) -> Result<NodeId> {
        if !train || rate == 0.0 {
            return Ok(x);
        }
        let stream = *self.streams;
        *self.streams += 1;
        self.push(
            Op::Dropout {
                rate: Scalar(rate),
                stream,
            },
            &[x],
        )
    }
}
