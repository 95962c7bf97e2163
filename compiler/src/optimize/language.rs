//! The IR as an e-graph language: each op with its attributes is an e-node over
//! its operands' classes.

use crate::ir::Op;
use egg::{Id, Language};

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
