//! The matmul family: a tiled or direct batched matmul with transposed operands,
//! broadcast batches and a fused elementwise epilogue (`kernel`), and its host-side
//! launch with the tunable strategies (`launch`).

pub(crate) mod kernel;
pub(crate) mod launch;
