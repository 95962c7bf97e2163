//! altc's compiler: everything between a RON model file and what a device runs.
//!
//! It owns the spec language (`spec`: parsing, validation, located errors), the graph
//! IR (`ir`: primitive ops, shapes, checking), lowering of specs to IR programs
//! (`lower`), reverse-mode autodiff (`autodiff`) and training graphs with the
//! optimizer (`train`), the names of graph outputs (`outputs`), the e-graph optimiser (`optimize`), the pipeline from a
//! program to the graphs a device runs (`pipeline`), fusion planning and its
//! planned cost (`fusion`), the reference interpreter that is every later
//! stage's oracle (`reference`), and the versioned artifact `altc compile` writes
//! (`artifact`). It never talks to a device: kernels and the runtime live in their
//! own crates.

pub mod artifact;
pub mod autodiff;
pub mod fusion;
pub mod ir;
pub mod lower;

pub mod optimize;
pub mod outputs;
pub mod pipeline;
pub mod reference;
pub mod rng;
pub mod spec;
pub mod summary;
pub mod train;
