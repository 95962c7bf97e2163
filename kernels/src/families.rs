//! The tunable kernel families by name: what `altc tune`, the tuning manifest and
//! the CUDA check enumerate. The only module that knows every family.

use crate::autotune::Candidate;
use crate::experts::{ExpertGradStrategy, EXPERT_GRAD, GROUPED_MATMUL};
use crate::fused::launch::{ElementwiseStrategy, ELEMENTWISE, MULTI_ELEMENTWISE};
use crate::matmul::launch::{EpilogueMatmul, MatmulStrategy, MATMUL};
use crate::reduce::launch::{ReduceStrategy, REDUCE};

/// The candidate names of a tunable kernel family, fallback first (empty for a family
/// that is not tunable).
pub fn candidates(family: &str) -> Vec<String> {
    fn names<C: Candidate>() -> Vec<String> {
        C::ALL.iter().map(Candidate::name).collect()
    }
    match family {
        MATMUL => names::<EpilogueMatmul>(),
        GROUPED_MATMUL => names::<MatmulStrategy>(),
        EXPERT_GRAD => names::<ExpertGradStrategy>(),
        REDUCE => names::<ReduceStrategy>(),
        ELEMENTWISE | MULTI_ELEMENTWISE => names::<ElementwiseStrategy>(),
        _ => Vec::new(),
    }
}

/// Every tunable family, as `candidates` and kernel keys name them.
pub const TUNABLE_FAMILIES: [&str; 6] = [
    MATMUL,
    GROUPED_MATMUL,
    EXPERT_GRAD,
    REDUCE,
    ELEMENTWISE,
    MULTI_ELEMENTWISE,
];
