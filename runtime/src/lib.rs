//! altc's runtime: device selection (`cuda` | `wgpu` | the reference interpreter),
//! buffers allocated from a compiled plan, launching the kernels of each schedule
//! task, data loading, checkpoints, metrics and retrieval.
//!
//! It reads compiled artifacts (`altc_compiler::artifact`) and never parses RON specs.
//! Device execution arrives with the runtime issue; today the reference interpreter in
//! `altc_compiler::reference` is the only backend.
