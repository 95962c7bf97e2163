//! altc's compiler: everything between a RON model file and a compiled artifact.
//!
//! It owns the spec language (`spec`: parsing, validation, located errors), the graph
//! IR (`ir`: primitive ops, shapes, checking), lowering of specs to IR programs
//! (`lower`), the reference interpreter that is every later stage's oracle
//! (`reference`), and the versioned artifact `altc compile` writes (`artifact`).
//! It never talks to a device: kernels and the runtime live in their own crates.

pub mod artifact;
pub mod autodiff;
pub mod fusion;
pub mod ir;
pub mod lower;
pub mod memory;
pub mod optimize;
pub mod reference;
pub mod rng;
pub mod spec;
pub mod summary;
pub mod train;
