//! The fused elementwise family: programs of elementwise ops compiled from op lists
//! (`kernel`), their vector form (`vector`), and the launches of one tensor or many
//! with their tunable strategies (`launch`).

pub(crate) mod kernel;
pub(crate) mod launch;
pub(crate) mod vector;
