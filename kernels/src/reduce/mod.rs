//! The reduction family: reductions over any axes, a unit or a cube of lanes per
//! output (`kernel`), and their launches with fused prologues or epilogues and over
//! many tensors at once (`launch`).

pub(crate) mod kernel;
pub(crate) mod launch;
