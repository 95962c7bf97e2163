//! altc's runtime: executing compiled programs. It owns backends (the reference
//! interpreter, and cubecl devices running `altc_kernels`: wgpu, CUDA), paired datasets
//! (loading, batching, the planted generator), the training loop over the schedule's
//! tasks, checkpoints, retrieval, the tuning manifest beside cubecl's autotune
//! cache, text tokenization, and pretrained encoders (their weights, embedding raw
//! text).
//!
//! It reads lowered programs and training graphs from `altc_compiler` and never parses
//! RON specs.

pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod encoding;
pub mod host;
pub mod retrieval;
pub mod synth;
pub mod text;
pub mod training;
pub mod tuning;
pub mod workload;

pub use altc_compiler::artifact::atomic_write;
