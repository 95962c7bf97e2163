//! The primitive operations of the IR. Every spec construct lowers to these; later
//! stages (autodiff, rewrites, fusion, kernels) only ever see this set.

use super::{DType, Shape};
use serde::{Deserialize, Serialize};
use std::fmt;

/// An `f64` attribute compared and hashed by its bits, so ops stay `Eq + Hash`
/// (needed to put them in an e-graph and to key compiled kernels).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Scalar(pub f64);

impl PartialEq for Scalar {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for Scalar {}
impl PartialOrd for Scalar {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scalar {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.to_bits().cmp(&other.0.to_bits())
    }
}
impl std::hash::Hash for Scalar {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Square,
    Tanh,
    Sigmoid,
    Relu,
    /// The error function (GELU's derivative needs it).
    Erf,
    /// Exact GELU, `x * Phi(x)` with the normal CDF through `erf` (PyTorch's default).
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 14] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Square,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Erf,
        UnaryOp::Gelu,
        UnaryOp::Silu,
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 7] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CompareOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CompareOp {
    pub const ALL: [CompareOp; 6] = [
        CompareOp::Lt,
        CompareOp::Le,
        CompareOp::Gt,
        CompareOp::Ge,
        CompareOp::Eq,
        CompareOp::Ne,
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
}

/// One IR operation. Operands are the node's incoming edges, ordered by slot; the
/// comment on each variant names them. Ops whose result type is not determined by
/// their operands (`Constant`, `Iota`, `Cast`, `Reshape`, `BroadcastTo`,
/// `ScatterAdd`) carry it as an attribute.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Op {
    /// A batch tensor fed by the runtime. No operands.
    Input {
        name: String,
        dtype: DType,
        shape: Shape,
    },
    /// A named weight from the program's parameter table. No operands.
    Parameter {
        name: String,
        dtype: DType,
        shape: Shape,
    },
    /// A tensor filled with one value. No operands.
    Constant {
        value: Scalar,
        dtype: DType,
        shape: Shape,
    },
    /// A tensor whose elements are their own index along `axis`. No operands.
    Iota {
        axis: usize,
        dtype: DType,
        shape: Shape,
    },
    /// `(x)`.
    Unary(UnaryOp),
    /// `(a, b)` with NumPy broadcasting.
    Binary(BinaryOp),
    /// `(a, b)` with NumPy broadcasting; yields `Bool`.
    Compare(CompareOp),
    /// `(condition, a, b)` with NumPy broadcasting.
    Where,
    /// `(x)` converted to `dtype`.
    Cast { dtype: DType },
    /// `(x)` reduced over `axes`.
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keep_dims: bool,
    },
    /// `(a, b)`: `[..., M, K] x [..., K, N] -> [..., M, N]`, batch dimensions broadcast;
    /// a transposed operand swaps its last two dimensions first.
    MatMul {
        transpose_a: bool,
        transpose_b: bool,
    },
    /// `(x)` with dimensions permuted: result dim `i` is operand dim `perm[i]`.
    Transpose { perm: Vec<usize> },
    /// `(x)` reinterpreted row-major with the same elements.
    Reshape { shape: Shape },
    /// `(x)` unchanged, but autodiff passes no gradient through it: the shift of a
    /// stable softmax or log-sum-exp, whose gradient is exactly zero.
    StopGradient,
    /// `(x)` expanded to `shape` by NumPy broadcasting rules.
    BroadcastTo { shape: Shape },
    /// `(x)` restricted to `start..end` along `axis`.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// `(x0, x1, ...)` joined along `axis`.
    Concat { axis: usize },
    /// `(x, index)`: `out[.., i, ..] = x[.., index[.., i, ..], ..]` along `axis`
    /// (PyTorch `gather`); the result has the index's shape.
    Gather { axis: usize },
    /// `(index, src)`: zeros of `shape`, then `out[.., index[.., j, ..], ..] += src[.., j, ..]`
    /// along `axis` (the adjoint of `Gather`).
    ScatterAdd { axis: usize, shape: Shape },
    /// `(x)`: indices (`I32`) of the `k` largest elements along the last axis, largest
    /// first, ties broken towards the lower index. Values are `Gather(x, TopK(x))`, so
    /// gradients reach the kept values and never the indices.
    TopK { k: usize },
    /// `(x)`: inverted dropout with keep probability `1 - rate`. The mask comes from a
    /// counter-based generator keyed by (seed, step, `stream`, element), so any backend
    /// reproduces it exactly.
    Dropout { rate: Scalar, stream: u64 },
    /// `(index)`: the flat positions of `index` (an `I32` tensor of ids of `experts`
    /// experts, one per token-and-slot assignment) sorted stably by expert, in `index`'s
    /// shape. With `ExpertOffsets` it groups the assignments by expert for the grouped
    /// matmuls.
    ExpertOrder { experts: usize },
    /// `(index)`: `[experts + 1]` `I32`, where each expert's run of assignments starts in
    /// `ExpertOrder(index)`; the last entry is the number of assignments.
    ExpertOffsets { experts: usize },
    /// `(x, w, [bias,] order, offsets)`: the grouped expert matmul of sparse dispatch.
    /// Assignments have `order`'s shape `[A..., ]`; `x` is `[X..., K]` with `X` a prefix
    /// of `A`, so assignment `a` reads row `x[a / (|A| / |X|)]` (a token's row feeds all
    /// of its slots). `out[a] = x[row(a)] @ w[e(a)] (+ bias[e(a)])` with `w` `[E, K, M]`
    /// (`[E, M, K]` used transposed) and `bias` `[E, M]`; the result is `[A..., M]`.
    ExpertMatMul { transpose_w: bool, bias: bool },
    /// `(a, b, order, offsets)`: per expert `e`, the sum over its assignments of
    /// `a[row(a)]^T b[row(b)]`, `[E, K, M]` for `a` `[Xa..., K]` and `b` `[Xb..., M]`
    /// (rows as in `ExpertMatMul`): the weight gradient of the grouped matmul.
    ExpertWeightGrad,
}

impl Op {
    pub fn reduce(op: ReduceOp, axes: &[usize], keep_dims: bool) -> Op {
        let axes = axes.to_vec();
        Op::Reduce {
            op,
            axes,
            keep_dims,
        }
    }

    pub fn matmul(transpose_a: bool, transpose_b: bool) -> Op {
        Op::MatMul {
            transpose_a,
            transpose_b,
        }
    }

    /// Leaves: values bound from outside the graph's kernels.
    pub fn is_leaf(&self) -> bool {
        matches!(
            self,
            Op::Input { .. } | Op::Parameter { .. } | Op::Constant { .. }
        )
    }

    /// Layout ops and stop-gradients: a device reads their source's buffer through
    /// other strides or extents instead of copying it.
    pub fn is_view(&self) -> bool {
        matches!(
            self,
            Op::Transpose { .. }
                | Op::BroadcastTo { .. }
                | Op::Slice { .. }
                | Op::Reshape { .. }
                | Op::StopGradient
        )
    }

    /// Whether the op runs as a kernel on a device (leaves are bound, views are not
    /// computed).
    pub fn launches_kernel(&self) -> bool {
        !self.is_leaf() && !self.is_view()
    }

    /// Elementwise ops, which can share a kernel with others of their shape (an iota
    /// is computed from each element's position, so it joins the kernel that reads
    /// it instead of filling a buffer).
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Iota { .. }
                | Op::Unary(_)
                | Op::Binary(_)
                | Op::Compare(_)
                | Op::Where
                | Op::Cast { .. }
                | Op::Dropout { .. }
        )
    }

    /// The op's family in summaries and kernel listings.
    pub fn family(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Parameter { .. } => "param",
            Op::Constant { .. } | Op::Iota { .. } => "const",
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Cast { .. } => {
                "elementwise"
            }
            Op::Reduce { .. } => "reduce",
            Op::MatMul { .. } => "matmul",
            Op::Transpose { .. }
            | Op::Reshape { .. }
            | Op::StopGradient
            | Op::BroadcastTo { .. }
            | Op::Slice { .. }
            | Op::Concat { .. } => "layout",
            Op::Gather { .. } | Op::ScatterAdd { .. } => "gather/scatter",
            Op::TopK { .. } => "top_k",
            Op::Dropout { .. } => "dropout",
            Op::ExpertOrder { .. } | Op::ExpertOffsets { .. } => "expert grouping",
            Op::ExpertMatMul { .. } | Op::ExpertWeightGrad => "grouped expert matmul",
        }
    }

    /// Short name for listings, Graphviz and error messages.
    pub fn mnemonic(&self) -> String {
        match self {
            Op::Input { name, .. } => format!("input {name}"),
            Op::Parameter { name, .. } => format!("param {name}"),
            Op::Constant { value, .. } => format!("const {}", value.0),
            Op::Iota { axis, .. } => format!("iota axis={axis}"),
            Op::Unary(u) => format!("{u:?}").to_lowercase(),
            Op::Binary(b) => format!("{b:?}").to_lowercase(),
            Op::Compare(c) => format!("{c:?}").to_lowercase(),
            Op::Where => "where".into(),
            Op::Cast { dtype } => format!("cast {dtype}"),
            Op::Reduce {
                op,
                axes,
                keep_dims,
            } => {
                let keep = if *keep_dims { " keep" } else { "" };
                format!("reduce_{} {axes:?}{keep}", format!("{op:?}").to_lowercase())
            }
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => format!(
                "matmul{}{}",
                if *transpose_a { " aT" } else { "" },
                if *transpose_b { " bT" } else { "" }
            ),
            Op::Transpose { perm } => format!("transpose {perm:?}"),
            Op::Reshape { shape } => format!("reshape {shape}"),
            Op::StopGradient => "stop_gradient".into(),
            Op::BroadcastTo { shape } => format!("broadcast {shape}"),
            Op::Slice { axis, start, end } => format!("slice axis={axis} {start}..{end}"),
            Op::Concat { axis } => format!("concat axis={axis}"),
            Op::Gather { axis } => format!("gather axis={axis}"),
            Op::ScatterAdd { axis, .. } => format!("scatter_add axis={axis}"),
            Op::TopK { k } => format!("top_k k={k}"),
            Op::Dropout { rate, .. } => format!("dropout p={}", rate.0),
            Op::ExpertOrder { experts } => format!("expert_order E={experts}"),
            Op::ExpertOffsets { experts } => format!("expert_offsets E={experts}"),
            Op::ExpertMatMul { transpose_w, bias } => format!(
                "expert_matmul{}{}",
                if *transpose_w { " wT" } else { "" },
                if *bias { " +bias" } else { "" }
            ),
            Op::ExpertWeightGrad => "expert_weight_grad".into(),
        }
    }

    /// Number of operands the op takes (`None`: any number of at least one).
    pub fn arity(&self) -> Option<usize> {
        Some(match self {
            Op::Input { .. } | Op::Parameter { .. } | Op::Constant { .. } | Op::Iota { .. } => 0,
            Op::Unary(_)
            | Op::Cast { .. }
            | Op::Reduce { .. }
            | Op::Transpose { .. }
            | Op::Reshape { .. }
            | Op::StopGradient
            | Op::BroadcastTo { .. }
            | Op::Slice { .. }
            | Op::TopK { .. }
            | Op::Dropout { .. }
            | Op::ExpertOrder { .. }
            | Op::ExpertOffsets { .. } => 1,
            Op::Binary(_)
            | Op::Compare(_)
            | Op::MatMul { .. }
            | Op::Gather { .. }
            | Op::ScatterAdd { .. } => 2,
            Op::Where => 3,
            Op::ExpertWeightGrad => 4,
            Op::ExpertMatMul { bias, .. } => 4 + usize::from(*bias),
            Op::Concat { .. } => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.mnemonic())
    }
}
