//! Element types, dimensions and shapes of IR tensors.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type of an IR tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    F32,
    F64,
    I32,
    Bool,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 => 8,
            DType::Bool => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::Bool => "bool",
        })
    }
}

/// One dimension: a number known at compile time, or a symbol (the batch size `B`)
/// bound when the graph runs.
///
/// Symbols are deliberately not an algebra: a reshape may regroup fixed dimensions
/// around a symbol but never merge a symbol with anything, which is all the Alt-MoE
/// lowering needs and keeps shape checking exact.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Dim {
    Fixed(usize),
    Sym(String),
}

impl Dim {
    /// The extent the planner and the e-graph's cost model assume for a symbol whose
    /// value they are not given: a typical batch, so that batch-sized values weigh
    /// more than most fixed-size ones.
    pub const ASSUMED_SYMBOL_EXTENT: usize = 64;

    /// The extent with `symbols` bound, or the assumed extent for a symbol they do
    /// not bind.
    pub fn extent_or_assumed(&self, symbols: &std::collections::BTreeMap<String, usize>) -> usize {
        match self {
            Dim::Fixed(n) => *n,
            Dim::Sym(s) => symbols
                .get(s)
                .copied()
                .unwrap_or(Self::ASSUMED_SYMBOL_EXTENT),
        }
    }

    /// The extent, or the assumed one for a symbol.
    pub fn assumed_extent(&self) -> usize {
        self.extent_or_assumed(&std::collections::BTreeMap::new())
    }

    pub fn sym(name: &str) -> Dim {
        Dim::Sym(name.to_string())
    }

    pub fn fixed(self: &Dim) -> Option<usize> {
        match self {
            Dim::Fixed(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }

    pub fn is_one(&self) -> bool {
        *self == Dim::Fixed(1)
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::Fixed(n)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Dim {
        Dim::sym(s)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// A shape: dimensions outermost first (row-major).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    /// Product of the fixed dimensions, and the symbols in order of appearance.
    pub fn split_symbols(&self) -> (usize, Vec<&str>) {
        let mut fixed = 1usize;
        let mut symbols = Vec::new();
        for d in &self.0 {
            match d {
                Dim::Fixed(n) => fixed *= n,
                Dim::Sym(s) => symbols.push(s.as_str()),
            }
        }
        (fixed, symbols)
    }

    /// Element count when every dimension is fixed.
    pub fn fixed_numel(&self) -> Option<usize> {
        self.0.iter().map(Dim::fixed).product()
    }
}

impl<D: Into<Dim>> FromIterator<D> for Shape {
    fn from_iter<I: IntoIterator<Item = D>>(iter: I) -> Shape {
        Shape(iter.into_iter().map(Into::into).collect())
    }
}

/// Builds a shape from a list of dimensions: `shape!["B", 5, 16]`.
#[macro_export]
macro_rules! shape {
    ($($d:expr),* $(,)?) => {
        $crate::ir::Shape(vec![$($crate::ir::Dim::from($d)),*])
    };
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// The type of an IR value: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}
