//! altc's kernels: cubecl kernels for every IR op family, written once and generic
//! over the cubecl runtime (`wgpu` in CI, `cuda` on a GPU).
//!
//! The crate knows nothing of RON specs or of the graph compiler: callers pass device
//! buffers, shapes and strides. Every buffer holds `F` (f32 today) in row-major
//! order; integer and boolean values (top-k indices, comparison results) are carried
//! exactly as `F` (0/1 for booleans, small whole numbers for indices). Operands are
//! read through strided views, so broadcasting (stride 0), transposition and slicing
//! cost no copies before an op. No kernel assumes a plane size: work is spread over
//! cubes of a fixed size and tiles are sized independently of `PLANE_DIM`.
//!
//! Tunable families (matmul, also several sharing an operand in one launch; grouped
//! expert matmul; reductions; fused elementwise, and multi-tensor elementwise: one
//! fused program over many tensors in one launch, each also in vectors of four
//! elements where layouts allow) offer candidate configurations to cubecl's autotuner
//! (`tune`); which one runs is the caller's `TuningMode`.

mod autotune;
mod ceilings;
mod device;
mod elementwise;
mod experts;
mod families;
mod fused;
mod index;
mod matmul;
mod random;
mod reduce;
mod view;

pub use autotune::{Candidate, KernelKey, TunedKernel, TuningMode};
pub use ceilings::Ceilings;
pub use device::{Kernels, ELEMENT_BYTES};
pub use elementwise::ops::{BinaryKind, UnaryKind};
pub use experts::{ExpertGradStrategy, ExpertMatmul};
pub use families::{candidates, TUNABLE_FAMILIES};
pub use fused::kernel::{FusedOp, FusedProgram, RowTopK};
pub use fused::launch::{ElementwiseStrategy, Segment};
pub use matmul::kernel::OperandLayout;
pub use matmul::launch::{EpilogueMatmul, MatmulOperands, MatmulStrategy};
pub use reduce::kernel::ReduceKind;
pub use reduce::launch::ReduceStrategy;
pub use view::{contiguous_strides, View};
