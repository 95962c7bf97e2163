//! The e-graph analysis: every class's type, and its value when it is a uniform
//! constant, so rules can check types before they rewrite.

use super::language::IrNode;
use crate::ir::{Op, ReduceOp, TensorType};
use crate::reference;
use egg::{Analysis, DidMerge, EGraph, Id};

/// What the analysis knows of a class: its type, and its value if every element of it
/// is one known number.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassInfo {
    pub ty: Option<TensorType>,
    pub constant: Option<f64>,
}

#[derive(Default)]
pub struct TypeAnalysis;

impl Analysis<IrNode> for TypeAnalysis {
    type Data = ClassInfo;

    fn make(egraph: &mut EGraph<IrNode, Self>, enode: &IrNode) -> ClassInfo {
        let children: Vec<&ClassInfo> = enode.children.iter().map(|c| &egraph[*c].data).collect();
        let types: Option<Vec<&TensorType>> = children.iter().map(|c| c.ty.as_ref()).collect();
        let ty = types.and_then(|t| crate::ir::infer(&enode.op, &t).ok());
        let constant = match (&enode.op, children.as_slice()) {
            (Op::Constant { value, .. }, _) => Some(value.0),
            (Op::Unary(u), [a]) => a.constant.map(|x| reference::unary_scalar(*u, x)),
            (Op::Binary(b), [a, c]) => a
                .constant
                .zip(c.constant)
                .map(|(x, y)| reference::binary_scalar(*b, x, y)),
            (
                Op::BroadcastTo { .. }
                | Op::Reshape { .. }
                | Op::Transpose { .. }
                | Op::StopGradient,
                [a],
            ) => a.constant,
            // A reduction of one repeated value: the value, or for a sum the value
            // times the count when the reduced extents are known (autodiff counts the
            // elements of a mean as a sum of ones).
            (Op::Reduce { op, axes, .. }, [a]) => a.constant.and_then(|c| match op {
                ReduceOp::Sum => {
                    let dims = a.ty.as_ref()?.shape.dims().to_vec();
                    let count: Option<usize> = axes.iter().map(|&i| dims[i].fixed()).product();
                    count.map(|n| c * n as f64)
                }
                ReduceOp::Mean | ReduceOp::Max | ReduceOp::Min => Some(c),
            }),
            _ => None,
        };
        ClassInfo {
            ty,
            constant: constant.filter(|v| v.is_finite()),
        }
    }

    fn merge(&mut self, a: &mut ClassInfo, b: ClassInfo) -> DidMerge {
        let mut changed = false;
        if a.constant.is_none() && b.constant.is_some() {
            a.constant = b.constant;
            changed = true;
        }
        if a.ty.is_none() && b.ty.is_some() {
            a.ty = b.ty;
            changed = true;
        }
        DidMerge(changed, true)
    }
}

pub(super) type IrGraph = EGraph<IrNode, TypeAnalysis>;

/// The type the analysis knows for class `id`.
pub(super) fn class_type(egraph: &IrGraph, id: Id) -> Option<&TensorType> {
    egraph[id].data.ty.as_ref()
}
