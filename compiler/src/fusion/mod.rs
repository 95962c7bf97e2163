//! Fusion planning: which nodes of a graph run together in one kernel, and in which
//! order the kernels run.
//!
//! The planner groups elementwise ops (unary, binary, compare, where, cast, dropout)
//! of one shape: a producer joins its consumer's group whenever that creates no cycle
//! between groups (no path from the producer's group to the consumer's through a
//! node outside both) and keeps the group's external inputs within what one kernel may
//! bind. A member whose value is used outside its group becomes one of the group's
//! outputs; every other intermediate lives in registers. Constants are folded into the
//! groups that read them. Matmuls, reductions, layout and index ops stay kernels of
//! their own. The plan's `schedule` orders groups and single ops topologically.
//!
//! Later passes fold steps together: a group into the reduction or matmul it feeds,
//! a weight gradient's batch sum into its matmul, reductions of the same kind into one
//! multi-tensor kernel, groups computing the same program on different tensors
//! (each parameter's AdamW update) into one multi-tensor elementwise kernel, and
//! matmuls of one shape that share an operand (the query, key and value projections
//! of one input) into one matmul kernel, where that does not raise the planned peak.
//!
//! `plan` holds the plan's types, `grouping` the first pass and the order of the
//! rest, `folds` the prologue, epilogue and batch-sum folds, `multi` the multi-tensor
//! kernels, `matmuls` the shared-operand matmuls, `schedule` the order of the steps,
//! and `cost` what a plan costs: launches, bytes moved and peak memory.

mod folds;
mod grouping;
mod matmuls;
mod multi;
mod plan;
mod schedule;

pub mod cost;

pub use grouping::plan;
pub use multi::group_inputs;
pub use plan::{
    is_row_of, scalars_stay_apart, EpilogueTopK, FusionGroup, FusionPlan, KernelDescription,
    KernelLimits, MultiGroup, MultiMatmul, MultiReduce, ReduceEpilogue, ReduceSegment,
    SharedOperand, Step, SCALARS_APART_FROM,
};
