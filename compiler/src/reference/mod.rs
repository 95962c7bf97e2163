//! The reference interpreter: plain Rust on the CPU, f32 and f64, deterministic. It
//! runs any IR graph one op at a time and is the oracle that rewritten graphs, fused
//! kernels and devices are compared with, so it favours being obviously right over
//! being fast.

mod eval;
mod experts;
mod init;
mod tensor;

pub use eval::{
    binary_scalar, evaluate, run, unary_scalar, EvalContext, EvalError, Evaluation, TensorMap,
};
pub use init::initial_parameters;
pub use tensor::{Data, Real, Tensor};
