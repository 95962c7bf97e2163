//! The plan's types: fusion groups, the steps of a schedule, the multi-tensor and
//! epilogue kernels folded from them, and what a plan answers about itself (the
//! nodes and outputs of a step, its kernel, launches, order).

use crate::ir::{live_nodes, Dim, Graph, NodeId, Op, ReduceOp, Shape, UnaryOp};
use std::collections::BTreeSet;

/// A group of elementwise nodes evaluated by one kernel; `nodes` are in topological
/// order, `outputs` are the members whose values leave the group. Members share one
/// shape, except scalars computed from scalars (an optimizer's step count and bias
/// corrections), which every element of a small kernel recomputes in registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FusionGroup {
    pub nodes: Vec<NodeId>,
    pub outputs: Vec<NodeId>,
}

impl FusionGroup {
    /// The shape the group's kernel runs over: its members' shape, or a scalar's when
    /// every member is one. (Members with one value per row have the same rank and 1
    /// as their last extent.)
    pub fn shape<'g>(&self, graph: &'g Graph) -> &'g Shape {
        kernel_shape(self.nodes.iter().map(|&n| &graph.node(n).ty.shape))
            .expect("a group has members")
    }

    /// Whether some member holds one value per row of the group's shape (a norm's
    /// row statistic riding along the elementwise work that reads it).
    pub fn carries_rows(&self, graph: &Graph) -> bool {
        let shape = self.shape(graph);
        self.nodes
            .iter()
            .any(|&n| is_row_of(&graph.node(n).ty.shape, shape))
    }

    /// Whether some member is a scalar riding along a larger shape.
    pub fn carries_scalars(&self, graph: &Graph) -> bool {
        self.shape(graph).rank() > 0
            && self
                .nodes
                .iter()
                .any(|&n| graph.node(n).ty.shape.rank() == 0)
    }
}

/// The shape a kernel over values of `shapes` runs over: the highest rank, and among
/// those a shape whose last extent is not 1 (values one per row have the same rank).
pub(super) fn kernel_shape<'g>(shapes: impl Iterator<Item = &'g Shape>) -> Option<&'g Shape> {
    shapes.max_by_key(|s| (s.rank(), s.dims().last() != Some(&Dim::Fixed(1))))
}

/// Whether nodes can share one kernel's shape: all of the largest shape among them,
/// besides scalars, and values one per row of it (neither dropout nor an iota).
pub(super) fn one_shape(graph: &Graph, nodes: &BTreeSet<usize>) -> bool {
    let shape_of = |n: usize| &graph.node(NodeId::new(n)).ty.shape;
    let Some(full) = kernel_shape(nodes.iter().map(|&n| shape_of(n))) else {
        return true;
    };
    nodes.iter().all(|&n| {
        let shape = shape_of(n);
        let positional = matches!(
            graph.node(NodeId::new(n)).op,
            Op::Dropout { .. } | Op::Iota { .. }
        );
        shape == full || !positional && (shape.rank() == 0 || is_row_of(shape, full))
    })
}

/// Elements from which a kernel reads scalars computed by a kernel of their own
/// instead of recomputing them in every element. The optimizer's update is the case:
/// its step count and bias corrections (two powers, a root and a division from the
/// step count) make the new step count a scalar output of the update, which keeps
/// the update out of the vector form. Computed apart (the scalar kernels of all large
/// parameters batch into one multi-tensor launch), they leave the update a plain
/// elementwise program that tuning can run in vectors: 2.9x faster on lavapipe at
/// paper scale. In the scalar fallback form the recomputation was not what the update
/// cost, and the extra launch is not paid back (`benches/README.md`). Below this size
/// a second launch costs more than any saving. Symbolic extents count as one:
/// activations stay as they were.
pub const SCALARS_APART_FROM: usize = 1 << 16;

/// Whether scalars that a kernel over `shape` reads run in a kernel of their own.
pub fn scalars_stay_apart(shape: &Shape) -> bool {
    let fixed: usize = shape.dims().iter().filter_map(|d| d.fixed()).product();
    fixed >= SCALARS_APART_FROM
}

/// Whether `small` holds one value per row of `shape`: the same extents, but 1 along
/// the last axis where `shape` has more.
pub fn is_row_of(small: &Shape, shape: &Shape) -> bool {
    let rank = shape.rank();
    rank > 0
        && small.rank() == rank
        && small.dims()[..rank - 1] == shape.dims()[..rank - 1]
        && small.dims()[rank - 1] == Dim::Fixed(1)
        && shape.dims()[rank - 1] != Dim::Fixed(1)
}

/// One step of a fused schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A node on its own (leaves, layout views, non-elementwise kernels).
    Node(NodeId),
    /// A fusion group, by index.
    Group(usize),
    /// A reduction whose operand is a group's only output, used by nothing else: the
    /// group runs as the reduction's prologue in the same kernel and its values are
    /// never written.
    GroupReduce { group: usize, reduce: NodeId },
    /// A matmul whose product only a group reads: the group runs as the matmul's
    /// epilogue in the same kernel and the product is never written.
    MatmulGroup { matmul: NodeId, group: usize },
    /// A reduction with a group as its epilogue in one kernel, by index into
    /// `FusionPlan::reduce_epilogues`.
    ReduceGroup(usize),
    /// A batched matmul whose product only a sum over all its batch dimensions reads
    /// (a weight gradient): one kernel accumulates over the batch and writes the sum.
    MatmulSum { matmul: NodeId, reduce: NodeId },
    /// The same reduction of several tensors in one kernel, by index into
    /// `FusionPlan::multi_reduces` (bias gradients, squared gradient norms).
    MultiReduce(usize),
    /// Groups with one program over tensors of different sizes in one kernel, by
    /// index into `FusionPlan::multi_groups` (the AdamW updates of the parameters).
    MultiGroup(usize),
    /// Matmuls of one shape that share an operand in one kernel, by index into
    /// `FusionPlan::multi_matmuls` (the query, key and value projections of one input).
    MultiMatmul(usize),
}

impl Step {
    /// Whether the step launches a kernel on a device: every fused step does; a
    /// single node unless it is a leaf or a view.
    pub fn launches(&self, graph: &Graph) -> bool {
        match self {
            Step::Node(id) => graph.node(*id).op.launches_kernel(),
            _ => true,
        }
    }
}

/// What one kernel may bind on the target device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLimits {
    /// Values from outside one fusion group may read.
    pub max_inputs: usize,
    /// Buffers one kernel may bind in all: inputs, outputs and its metadata.
    pub max_bindings: usize,
}

impl KernelLimits {
    /// Fused inputs are capped below the device's limit so kernels stay small.
    const MAX_FUSED_INPUTS: usize = 16;
    /// Multi-tensor kernels unroll their program once per tensor: bound the code size.
    const MAX_BINDINGS: usize = 256;

    /// The limits for a device that binds `bindings` buffers per kernel, leaving room
    /// for a group's outputs and metadata, and for the one buffer cubecl may add (its
    /// scalars and sizes).
    pub fn for_bindings(bindings: usize) -> KernelLimits {
        KernelLimits {
            max_inputs: bindings.saturating_sub(4).clamp(2, Self::MAX_FUSED_INPUTS),
            max_bindings: bindings.saturating_sub(1).clamp(4, Self::MAX_BINDINGS),
        }
    }
}

impl Default for KernelLimits {
    /// A Vulkan device with 31 bindings per kernel, as Mesa's lavapipe: the plan
    /// `altc compile --explain` reports.
    fn default() -> Self {
        KernelLimits::for_bindings(31)
    }
}

/// Fusion groups evaluating the same program, each over its own tensors, as one
/// kernel. `inputs[i]` are group `groups[i]`'s external values in program order;
/// positions in `shared` read the same value in every group (bound once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultiGroup {
    pub groups: Vec<usize>,
    pub inputs: Vec<Vec<NodeId>>,
    pub shared: Vec<usize>,
}

/// A reduction over the last axis of its operand whose result only a group of
/// the operand's shape reads, directly or through the layout views in `via` (a
/// reshape restoring the reduced axes, a broadcast): one kernel reduces each row and
/// runs the group on that row's elements, the reduced value in a register (a
/// softmax's division by its row sum, a gradient's broadcast row sum). The
/// reduction is never written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReduceEpilogue {
    pub reduce: NodeId,
    pub via: Vec<NodeId>,
    pub group: usize,
    /// Whether the reduction's values are written too, as other steps read them (a
    /// softmax's row sums, which its backward reads).
    pub write_reduced: bool,
    /// A top-k of the group's rows taken in the same kernel (a router's choice of
    /// experts from its softmax).
    pub top_k: Option<EpilogueTopK>,
}

/// `top = TopK(values)` over the last axis of a group output, and the chosen values
/// `gather = Gather(values, top)` if the graph takes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpilogueTopK {
    pub values: NodeId,
    pub top: NodeId,
    pub gather: Option<NodeId>,
}

impl ReduceEpilogue {
    /// The value the group reads in place of the reduction: the last view, or the
    /// reduction itself.
    pub fn read_as(&self) -> NodeId {
        self.via.last().copied().unwrap_or(self.reduce)
    }
}

/// Reductions sharing an op, a unary prologue, an operand shape and axes, run as one
/// kernel over several tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultiReduce {
    pub op: ReduceOp,
    pub prologue: Vec<UnaryOp>,
    /// Each tensor reduced over all its axes (then shapes may differ); otherwise all
    /// share the first reduction's operand shape and axes.
    pub whole: bool,
    pub segments: Vec<ReduceSegment>,
}

/// What reductions must share to run as one `MultiReduce`: the op and prologue, and
/// the operand's shape and the axes unless each tensor is reduced whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ReductionKind {
    pub(super) op: ReduceOp,
    pub(super) prologue: Vec<UnaryOp>,
    pub(super) layout: Option<(Shape, Vec<usize>, bool)>,
}

/// One tensor of a `MultiReduce`: the reduction, the group it absorbed as its
/// prologue (if any), and the value it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReduceSegment {
    pub reduce: NodeId,
    pub prologue_group: Option<usize>,
    pub source: NodeId,
}

/// Which operand the matmuls of a `MultiMatmul` have in common.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedOperand {
    /// The left operand: one input projected by several weights.
    Left,
    /// The right operand: one weight applied to several inputs.
    Right,
}

/// Matmuls with equal shapes, equal epilogue programs and one operand in common, run
/// as one kernel: the shared operand is bound once and each matmul's product tiles
/// are further cubes of the same launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultiMatmul {
    /// Each matmul's own step, all of one kind: `Node` (a plain matmul),
    /// `MatmulGroup` or `MatmulSum`.
    pub members: Vec<Step>,
    pub shared: SharedOperand,
    /// Epilogue input positions (as `group_inputs` orders them, less the product) at
    /// which every member reads the same value, bound once (a bias, a scale).
    pub epilogue_shared: Vec<usize>,
}

impl MultiMatmul {
    /// The matmul node of each member.
    pub fn matmuls(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .map(|step| match *step {
                Step::Node(id)
                | Step::MatmulGroup { matmul: id, .. }
                | Step::MatmulSum { matmul: id, .. } => id,
                ref other => unreachable!("a multi-matmul holds matmul steps, not {other:?}"),
            })
            .collect()
    }
}

/// What one planned kernel is: its family (`fused elementwise`, `matmul`, ...) and a
/// label with its ops, result type and the spec construct it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelDescription {
    pub family: &'static str,
    pub label: String,
    /// The node whose value the kernel exists to produce, and where in the spec it
    /// comes from.
    pub node: NodeId,
    pub origin: String,
}

#[derive(Clone, Debug, Default)]
pub struct FusionPlan {
    pub groups: Vec<FusionGroup>,
    /// Every node exactly once, as a member of a group or on its own, in an order
    /// where all inputs of a step come before it.
    pub schedule: Vec<Step>,
    pub multi_reduces: Vec<MultiReduce>,
    pub multi_groups: Vec<MultiGroup>,
    pub reduce_epilogues: Vec<ReduceEpilogue>,
    pub multi_matmuls: Vec<MultiMatmul>,
    pub(super) member_of: Vec<Option<usize>>,
}

impl FusionPlan {
    pub fn group_of(&self, id: NodeId) -> Option<&FusionGroup> {
        self.member_of
            .get(id.index())
            .copied()
            .flatten()
            .map(|g| &self.groups[g])
    }

    /// The nodes one step evaluates.
    pub fn step_nodes(&self, step: &Step) -> Vec<NodeId> {
        match step {
            Step::Node(id) => vec![*id],
            Step::Group(g) => self.groups[*g].nodes.clone(),
            Step::GroupReduce { group, reduce } => {
                let mut nodes = self.groups[*group].nodes.clone();
                nodes.push(*reduce);
                nodes
            }
            Step::MatmulGroup { matmul, group } => {
                let mut nodes = vec![*matmul];
                nodes.extend(&self.groups[*group].nodes);
                nodes
            }
            Step::MatmulSum { matmul, reduce } => vec![*matmul, *reduce],
            Step::MultiReduce(i) => self.multi_reduces[*i]
                .segments
                .iter()
                .flat_map(|s| {
                    let prologue = s.prologue_group.map(|g| self.groups[g].nodes.clone());
                    prologue.unwrap_or_default().into_iter().chain([s.reduce])
                })
                .collect(),
            Step::MultiGroup(i) => self.multi_groups[*i]
                .groups
                .iter()
                .flat_map(|&g| self.groups[g].nodes.clone())
                .collect(),
            Step::ReduceGroup(i) => {
                let fused = &self.reduce_epilogues[*i];
                let mut nodes = vec![fused.reduce];
                nodes.extend(&fused.via);
                nodes.extend(&self.groups[fused.group].nodes);
                if let Some(t) = &fused.top_k {
                    nodes.push(t.top);
                    nodes.extend(t.gather);
                }
                nodes
            }
            Step::MultiMatmul(i) => self.multi_matmuls[*i]
                .members
                .iter()
                .flat_map(|m| self.step_nodes(m))
                .collect(),
        }
    }

    /// The values one step writes (what stays in registers is not written).
    pub fn step_outputs(&self, graph: &Graph, step: &Step) -> Vec<NodeId> {
        match step {
            Step::Group(g) | Step::MatmulGroup { group: g, .. } => self.groups[*g].outputs.clone(),
            Step::ReduceGroup(i) => {
                let fused = &self.reduce_epilogues[*i];
                let mut written = self.groups[fused.group].outputs.clone();
                if fused.write_reduced {
                    written.push(fused.reduce);
                }
                if let Some(t) = &fused.top_k {
                    written.push(t.top);
                    written.extend(t.gather);
                }
                written
            }
            Step::GroupReduce { reduce, .. } | Step::MatmulSum { reduce, .. } => vec![*reduce],
            Step::MultiReduce(i) => self.multi_reduces[*i]
                .segments
                .iter()
                .map(|s| s.reduce)
                .collect(),
            Step::MultiGroup(i) => self.multi_groups[*i]
                .groups
                .iter()
                .flat_map(|&g| self.groups[g].outputs.clone())
                .collect(),
            Step::MultiMatmul(i) => self.multi_matmuls[*i]
                .members
                .iter()
                .flat_map(|m| self.step_outputs(graph, m))
                .collect(),
            Step::Node(id) if graph.node(*id).op.launches_kernel() => vec![*id],
            Step::Node(_) => Vec::new(),
        }
    }

    /// Each node's step in the schedule (`usize::MAX` for nodes that never run).
    pub fn positions(&self, graph: &Graph) -> Vec<usize> {
        let mut position = vec![usize::MAX; graph.len()];
        for (pos, step) in self.schedule.iter().enumerate() {
            for id in self.step_nodes(step) {
                position[id.index()] = pos;
            }
        }
        position
    }

    /// Whether every step's operands are computed by an earlier step (or by itself).
    pub fn is_ordered(&self, graph: &Graph) -> bool {
        let position = self.positions(graph);
        self.schedule.iter().enumerate().all(|(pos, step)| {
            self.step_nodes(step)
                .iter()
                .flat_map(|&id| graph.operands(id))
                .all(|o| position[o.index()] <= pos)
        })
    }

    /// Kernel launches of one run of the planned graph on a device, where leaves and
    /// layout ops (views) launch nothing.
    pub fn launches(&self, graph: &Graph) -> usize {
        self.schedule.iter().filter(|s| s.launches(graph)).count()
    }

    /// The kernel one step launches, for listings and profiles; `None` for steps that
    /// launch nothing (leaves, views).
    pub fn kernel(&self, graph: &Graph, step: &Step) -> Option<KernelDescription> {
        let family = match *step {
            Step::Node(id) if graph.node(id).op.launches_kernel() => graph.node(id).op.family(),
            Step::Node(_) => return None,
            Step::Group(_) => "fused elementwise",
            Step::GroupReduce { .. } => "reduce with fused prologue",
            Step::MatmulGroup { .. } => "matmul with fused epilogue",
            Step::MatmulSum { .. } => "matmul summed over the batch",
            Step::MultiReduce(_) => "multi-tensor reduce",
            Step::MultiGroup(_) => "multi-tensor elementwise",
            Step::ReduceGroup(_) => "reduce with fused epilogue",
            Step::MultiMatmul(_) => "matmuls sharing an operand",
        };
        let nodes = self.step_nodes(step);
        // The last node is the one whose value the kernel exists to produce.
        let anchor_id = *nodes.last().expect("a step evaluates a node");
        let anchor = graph.node(anchor_id);
        const SHOWN: usize = 6;
        let mut ops: Vec<String> = nodes
            .iter()
            .take(SHOWN)
            .map(|&n| graph.node(n).op.mnemonic())
            .collect();
        if nodes.len() > SHOWN {
            ops.push(format!("+{} more", nodes.len() - SHOWN));
        }
        Some(KernelDescription {
            family,
            label: format!("{} -> {} ({})", ops.join(", "), anchor.ty, anchor.origin),
            node: anchor_id,
            origin: anchor.origin.clone(),
        })
    }

    /// The unfused plan: every node on its own, in topological order.
    pub fn unfused(graph: &Graph) -> FusionPlan {
        let live = live_nodes(graph);
        FusionPlan {
            groups: Vec::new(),
            schedule: graph
                .creation_order()
                .unwrap_or_default()
                .into_iter()
                .filter(|id| live[id.index()])
                .map(Step::Node)
                .collect(),
            multi_reduces: Vec::new(),
            multi_groups: Vec::new(),
            reduce_epilogues: Vec::new(),
            multi_matmuls: Vec::new(),
            member_of: vec![None; graph.len()],
        }
    }
}
