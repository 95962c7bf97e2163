//! The graph IR: primitive tensor ops in a petgraph DAG, with element types and
//! shapes (symbolic batch) inferred and checked as nodes are added.

mod analysis;
mod build;
mod dot;
mod graph;
mod infer;
mod op;
mod types;

pub use analysis::{buffer_roots, live_nodes};
pub use build::{BuildGraph, GraphBuilder};
pub use dot::to_dot;
pub use graph::{Graph, GraphError, Node, NodeId};
pub use infer::{broadcast_shapes, infer, TypeError};
pub use op::{BinaryOp, CompareOp, Op, ReduceOp, Scalar, UnaryOp};
pub use types::{DType, Dim, Shape, TensorType};
