//! altc's runtime: executing compiled programs. It owns backends (the reference
//! interpreter, and cubecl devices running `altc_kernels`: wgpu, CUDA), paired datasets
//! (loading, batching, the planted generator), the training loop over the schedule's
//! tasks, checkpoints, and retrieval.
//!
//! It reads lowered programs and training graphs from `altc_compiler` and never parses
//! RON specs.

pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod retrieval;
pub mod synth;
pub mod training;

pub use altc_compiler::artifact::atomic_write;
