//! Elementwise op semantics, written once for the scalar kernels and the fused and
//! vector programs (`ops`), and the single-op launches of the unfused baseline
//! (`launch`).

pub(crate) mod launch;
pub(crate) mod ops;
