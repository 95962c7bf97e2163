//! The IR as an e-graph language: each op with its attributes is an e-node over
//! its operands' classes.

use crate::ir::{BinaryOp, Op, UnaryOp};
use egg::{FromOp, Id, Language};

/// An IR op as an e-node: the op with its attributes, and its operands' classes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IrNode {
    pub op: Op,
    pub children: Vec<Id>,
}

impl Language for IrNode {
    type Discriminant = Op;

    fn discriminant(&self) -> Op {
        self.op.clone()
    }

    fn matches(&self, other: &Self) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

/// The ops a rule's pattern may name: those with no attributes, spelled as their
/// mnemonic (`add`, `mul`, `neg`, `stop_gradient`, ...). Ops with attributes
/// (transposes, reshapes, constants) are matched by the custom rules instead.
const PATTERN_OPS: &[Op] = &[
    Op::Binary(BinaryOp::Add),
    Op::Binary(BinaryOp::Sub),
    Op::Binary(BinaryOp::Mul),
    Op::Binary(BinaryOp::Div),
    Op::Binary(BinaryOp::Max),
    Op::Binary(BinaryOp::Min),
    Op::Unary(UnaryOp::Neg),
    Op::StopGradient,
    Op::Where,
];

/// A pattern named an op that `PATTERN_OPS` does not hold.
#[derive(Debug)]
pub struct UnknownPatternOp(pub String);

impl FromOp for IrNode {
    type Error = UnknownPatternOp;

    fn from_op(op: &str, children: Vec<Id>) -> Result<Self, Self::Error> {
        PATTERN_OPS
            .iter()
            .find(|o| o.mnemonic() == op)
            .map(|o| IrNode {
                op: o.clone(),
                children,
            })
            .ok_or_else(|| UnknownPatternOp(op.to_string()))
    }
}
