//! One way to add nodes to a graph. Lowering, autodiff and the optimizer build
//! through `BuildGraph`, each adding only what it knows (parameters with their
//! initialisation, adjoints, optimizer state); `GraphBuilder` serves everyone else.

use super::{BinaryOp, CompareOp, DType, Graph, GraphError, NodeId, Op, ReduceOp, Scalar};
use super::{Shape, UnaryOp};

/// Adds typed, checked nodes to a graph, each attributed to the builder's current
/// origin (the spec path or stage it comes from).
pub trait BuildGraph {
    fn graph(&self) -> &Graph;
    fn graph_mut(&mut self) -> &mut Graph;
    /// The origin new nodes are attributed to.
    fn origin(&self) -> &str;

    fn push(&mut self, op: Op, operands: &[NodeId]) -> Result<NodeId, GraphError> {
        let origin = self.origin().to_string();
        self.graph_mut().push(op, operands, origin)
    }

    fn shape_of(&self, id: NodeId) -> &Shape {
        &self.graph().node(id).ty.shape
    }

    fn dtype_of(&self, id: NodeId) -> DType {
        self.graph().node(id).ty.dtype
    }

    fn input(&mut self, name: &str, dtype: DType, shape: Shape) -> Result<NodeId, GraphError> {
        let name = name.into();
        self.push(Op::Input { name, dtype, shape }, &[])
    }

    fn parameter(&mut self, name: &str, dtype: DType, shape: Shape) -> Result<NodeId, GraphError> {
        let name = name.into();
        self.push(Op::Parameter { name, dtype, shape }, &[])
    }

    fn constant(&mut self, value: f64, dtype: DType, shape: Shape) -> Result<NodeId, GraphError> {
        let value = Scalar(value);
        self.push(
            Op::Constant {
                value,
                dtype,
                shape,
            },
            &[],
        )
    }

    fn unary(&mut self, op: UnaryOp, x: NodeId) -> Result<NodeId, GraphError> {
        self.push(Op::Unary(op), &[x])
    }

    fn binary(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> Result<NodeId, GraphError> {
        self.push(Op::Binary(op), &[a, b])
    }

    fn add(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, GraphError> {
        self.binary(BinaryOp::Add, a, b)
    }

    fn sub(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, GraphError> {
        self.binary(BinaryOp::Sub, a, b)
    }

    fn mul(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, GraphError> {
        self.binary(BinaryOp::Mul, a, b)
    }

    fn div(&mut self, a: NodeId, b: NodeId) -> Result<NodeId, GraphError> {
        self.binary(BinaryOp::Div, a, b)
    }

    fn compare(&mut self, op: CompareOp, a: NodeId, b: NodeId) -> Result<NodeId, GraphError> {
        self.push(Op::Compare(op), &[a, b])
    }

    /// `cond ? a : b` elementwise.
    fn select(&mut self, cond: NodeId, a: NodeId, b: NodeId) -> Result<NodeId, GraphError> {
        self.push(Op::Where, &[cond, a, b])
    }

    fn cast(&mut self, x: NodeId, dtype: DType) -> Result<NodeId, GraphError> {
        self.push(Op::Cast { dtype }, &[x])
    }

    fn reduce(
        &mut self,
        op: ReduceOp,
        x: NodeId,
        axes: &[usize],
        keep_dims: bool,
    ) -> Result<NodeId, GraphError> {
        let axes = axes.to_vec();
        self.push(
            Op::Reduce {
                op,
                axes,
                keep_dims,
            },
            &[x],
        )
    }

    /// The sum of every element of `x`, as a scalar.
    fn sum_all(&mut self, x: NodeId) -> Result<NodeId, GraphError> {
        let axes: Vec<usize> = (0..self.shape_of(x).rank()).collect();
        self.reduce(ReduceOp::Sum, x, &axes, false)
    }

    fn matmul(
        &mut self,
        a: NodeId,
        b: NodeId,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Result<NodeId, GraphError> {
        let op = Op::MatMul {
            transpose_a,
            transpose_b,
        };
        self.push(op, &[a, b])
    }

    fn reshape(&mut self, x: NodeId, shape: Shape) -> Result<NodeId, GraphError> {
        self.push(Op::Reshape { shape }, &[x])
    }

    fn transpose(&mut self, x: NodeId, perm: &[usize]) -> Result<NodeId, GraphError> {
        let perm = perm.to_vec();
        self.push(Op::Transpose { perm }, &[x])
    }
}

/// A graph and the origin its new nodes get, for code that adds nodes to a graph it
/// holds (tests, the runtime's small graphs, the training-task assembly).
pub struct GraphBuilder<'g> {
    pub graph: &'g mut Graph,
    pub origin: String,
}

impl<'g> GraphBuilder<'g> {
    pub fn new(graph: &'g mut Graph, origin: impl Into<String>) -> GraphBuilder<'g> {
        GraphBuilder {
            graph,
            origin: origin.into(),
        }
    }

    /// Attributes the nodes added from now on to `origin`.
    pub fn at(&mut self, origin: impl Into<String>) -> &mut Self {
        self.origin = origin.into();
        self
    }
}

/// Implements `BuildGraph` for a builder type with a `graph` field (a `Graph` or a
/// `&mut Graph`) and an `origin: String` field.
#[macro_export]
macro_rules! build_graph_from_fields {
    ($builder:ty) => {
        impl $crate::ir::BuildGraph for $builder {
            fn graph(&self) -> &$crate::ir::Graph {
                &self.graph
            }

            fn graph_mut(&mut self) -> &mut $crate::ir::Graph {
                &mut self.graph
            }

            fn origin(&self) -> &str {
                &self.origin
            }
        }
    };
}

build_graph_from_fields!(GraphBuilder<'_>);
