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

use crate::ir::{live_nodes, Dim, Graph, NodeId, Op, ReduceOp, Shape, UnaryOp};
use petgraph::Direction;
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
fn kernel_shape<'g>(shapes: impl Iterator<Item = &'g Shape>) -> Option<&'g Shape> {
    shapes.max_by_key(|s| (s.rank(), s.dims().last() != Some(&Dim::Fixed(1))))
}

/// Whether nodes can share one kernel's shape: all of the largest shape among them,
/// besides scalars, and values one per row of it (neither dropout nor an iota).
fn one_shape(graph: &Graph, nodes: &BTreeSet<usize>) -> bool {
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
struct ReductionKind {
    op: ReduceOp,
    prologue: Vec<UnaryOp>,
    layout: Option<(Shape, Vec<usize>, bool)>,
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
    member_of: Vec<Option<usize>>,
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
            Step::Node(id) if graph.node(id).op.launches_kernel() => {
                graph.node(id).op.family()
            }
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

/// Plans the fusion groups of `graph` for a device with `limits`: no group reads more
/// than `limits.max_inputs` distinct values from outside, and no multi-tensor kernel
/// binds more than `limits.max_bindings` buffers.
pub fn plan(graph: &Graph, limits: KernelLimits) -> FusionPlan {
    let max_inputs = limits.max_inputs;
    let n = graph.len();
    let live = live_nodes(graph);
    let order: Vec<NodeId> = graph
        .creation_order()
        .unwrap_or_default()
        .into_iter()
        .filter(|id| live[id.index()])
        .collect();
    let mut position = vec![0usize; n];
    for (pos, id) in order.iter().enumerate() {
        position[id.index()] = pos;
    }
    let users: Vec<Vec<NodeId>> = (0..n)
        .map(|i| {
            graph
                .dag()
                .neighbors_directed(NodeId::new(i), Direction::Outgoing)
                .filter(|u| live[u.index()])
                .collect()
        })
        .collect();
    let is_constant = |o: NodeId| matches!(graph.node(o).op, Op::Constant { .. });

    // Groups are identified by a representative; members and external inputs live there.
    let mut group: Vec<Option<usize>> = vec![None; n];
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut inputs: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    for &id in &order {
        let node = graph.node(id);
        if !node.op.is_elementwise() {
            continue;
        }
        let me = id.index();
        group[me] = Some(me);
        members[me] = vec![me];
        inputs[me] = graph
            .operands(id)
            .iter()
            .filter(|&&o| !is_constant(o))
            .map(|o| o.index())
            .collect();
        for o in graph.operands(id) {
            let Some(p) = group[o.index()] else { continue };
            let g = group[me].expect("just grouped");
            // A group of scalars, or of values one per row of the consumer's shape
            // (a norm's statistics), joins the consumer: each element recomputes
            // them, which costs registers, not a launch. Not dropout or an iota, whose
            // values depend on the element's position in their own shape. Scalars
            // stay their own kernel for a consumer too large to recompute them.
            let small_consumer = !scalars_stay_apart(&node.ty.shape);
            let rides_along = members[p].iter().all(|&m| {
                let member = graph.node(NodeId::new(m));
                let shape = &member.ty.shape;
                ((shape.rank() == 0 && small_consumer) || is_row_of(shape, &node.ty.shape))
                    && !matches!(member.op, Op::Dropout { .. } | Op::Iota { .. })
            });
            if p == g || (graph.node(o).ty.shape != node.ty.shape && !rides_along) {
                continue;
            }
            let merged_members: BTreeSet<usize> =
                members[p].iter().chain(&members[g]).copied().collect();
            if !one_shape(graph, &merged_members) {
                continue;
            }
            let merged_inputs: BTreeSet<usize> = inputs[p]
                .union(&inputs[g])
                .filter(|i| !merged_members.contains(i))
                .copied()
                .collect();
            let cycle = creates_cycle(
                &members[p],
                &merged_members,
                position[id.index()],
                &users,
                &position,
                &group,
                &members,
            );
            if merged_inputs.len() > max_inputs || cycle {
                continue;
            }
            // Fold group `p` into `g`.
            let moved = std::mem::take(&mut members[p]);
            for &m in &moved {
                group[m] = Some(g);
            }
            members[g].extend(moved);
            inputs[g] = merged_inputs;
            inputs[p].clear();
        }
    }

    let outputs_of_graph: BTreeSet<usize> =
        graph.outputs().iter().map(|(_, o)| o.index()).collect();
    sink_into_readers(
        graph,
        &order,
        &users,
        &outputs_of_graph,
        max_inputs,
        Grouping {
            group: &mut group,
            members: &mut members,
            inputs: &mut inputs,
        },
    );
    let mut groups = Vec::new();
    let mut member_of = vec![None; n];
    let mut index_of_rep = vec![None; n];
    for &id in &order {
        let Some(rep) = group[id.index()] else {
            continue;
        };
        let gi = *index_of_rep[rep].get_or_insert_with(|| {
            groups.push(FusionGroup {
                nodes: Vec::new(),
                outputs: Vec::new(),
            });
            groups.len() - 1
        });
        groups[gi].nodes.push(id);
        member_of[id.index()] = Some(gi);
    }
    for g in &mut groups {
        let inside: BTreeSet<usize> = g.nodes.iter().map(|m| m.index()).collect();
        g.outputs = g
            .nodes
            .iter()
            .copied()
            .filter(|m| {
                outputs_of_graph.contains(&m.index())
                    || users[m.index()]
                        .iter()
                        .any(|u| !inside.contains(&u.index()))
            })
            .collect();
    }
    let mut schedule = schedule(graph, &order, &groups, &member_of);
    if schedule.len()
        != order.len() - groups.iter().map(|g| g.nodes.len()).sum::<usize>() + groups.len()
    {
        // Grouping is built to be acyclic; should it ever not be, run unfused rather
        // than drop work.
        return FusionPlan::unfused(graph);
    }
    fold_prologues(
        graph,
        &groups,
        &member_of,
        &users,
        &outputs_of_graph,
        &mut schedule,
    );
    fold_epilogues(
        graph,
        &groups,
        &member_of,
        &users,
        &outputs_of_graph,
        &mut schedule,
    );
    fold_batch_sums(graph, &users, &outputs_of_graph, &mut schedule);
    let mut plan = FusionPlan {
        groups,
        schedule,
        multi_reduces: Vec::new(),
        multi_groups: Vec::new(),
        reduce_epilogues: Vec::new(),
        multi_matmuls: Vec::new(),
        member_of,
    };
    plan.fold_reduce_epilogues(graph, &users, &outputs_of_graph, limits.max_bindings);
    plan.fold_multi_reduces(graph, &users, max_inputs);
    plan.fold_multi_groups(graph, &users, limits.max_bindings);
    plan.fold_multi_matmuls(graph, &users, limits.max_bindings);
    plan
}

/// The planner's groups while they form, indexed by a representative node: each
/// node's group, each group's members and the values it reads from outside.
struct Grouping<'a> {
    group: &'a mut [Option<usize>],
    members: &'a mut [Vec<usize>],
    inputs: &'a mut [BTreeSet<usize>],
}

/// Moves work that a group computes only for a later group into that later group.
///
/// Merging producers into consumers can pull a backward-pass value into the forward
/// group whose values it reads (autodiff's `2 * centred` for a norm's variance): it
/// is then written in the forward pass and held until backward reads it. When such
/// a member, with the members that only it needs, reads nothing of its group that is
/// not written anyway, the group that reads it computes it instead: nothing more is
/// written, and the value is never held.
fn sink_into_readers(
    graph: &Graph,
    order: &[NodeId],
    users: &[Vec<NodeId>],
    graph_outputs: &BTreeSet<usize>,
    max_inputs: usize,
    grouping: Grouping,
) {
    let Grouping {
        group,
        members,
        inputs,
    } = grouping;
    let is_constant = |o: NodeId| matches!(graph.node(o).op, Op::Constant { .. });
    for &m in order.iter().rev() {
        let (Some(a), false) = (group[m.index()], graph_outputs.contains(&m.index())) else {
            continue;
        };
        // The one other group that reads `m`, at `m`'s own shape.
        let readers: BTreeSet<Option<usize>> =
            users[m.index()].iter().map(|u| group[u.index()]).collect();
        let [Some(b)] = readers.into_iter().collect::<Vec<_>>()[..] else {
            continue;
        };
        let same_shape = users[m.index()]
            .iter()
            .all(|u| graph.node(*u).ty.shape == graph.node(m).ty.shape);
        if b == a || !same_shape || matches!(graph.node(m).op, Op::Dropout { .. }) {
            continue;
        }
        // `m` and the members of `a` that only it (transitively) needs.
        let mut moving = vec![m];
        let mut at = 0;
        let mut feasible = true;
        while at < moving.len() && feasible {
            for o in graph.operands(moving[at]) {
                if group[o.index()] != Some(a) || moving.contains(&o) {
                    continue;
                }
                let written_anyway = graph_outputs.contains(&o.index())
                    || users[o.index()].iter().any(|u| group[u.index()] != Some(a));
                if written_anyway {
                    continue;
                }
                // Read only inside `a`: it moves too if only moving members read it;
                // otherwise it would have to be written for `b`, which costs more.
                let only_for_moving = users[o.index()].iter().all(|u| moving.contains(u));
                if !only_for_moving || matches!(graph.node(o).op, Op::Dropout { .. }) {
                    feasible = false;
                    break;
                }
                moving.push(o);
            }
            at += 1;
        }
        if !feasible {
            continue;
        }
        let moved: BTreeSet<usize> = moving.iter().map(|x| x.index()).collect();
        let b_members: BTreeSet<usize> = members[b].iter().copied().chain(moved.clone()).collect();
        let b_inputs: BTreeSet<usize> = inputs[b]
            .iter()
            .copied()
            .chain(
                moving
                    .iter()
                    .flat_map(|&x| graph.operands(x))
                    .filter(|&o| !is_constant(o))
                    .map(|o| o.index()),
            )
            .filter(|i| !b_members.contains(i))
            .collect();
        if b_inputs.len() > max_inputs || !one_shape(graph, &b_members) {
            continue;
        }
        for &x in &moved {
            group[x] = Some(b);
        }
        members[a].retain(|x| !moved.contains(x));
        members[b].extend(&moved);
        inputs[b] = b_inputs;
        // What `a` still computes reads the same values as before, less `m`'s.
        let a_members: BTreeSet<usize> = members[a].iter().copied().collect();
        inputs[a] = members[a]
            .iter()
            .flat_map(|&x| graph.operands(NodeId::new(x)))
            .filter(|&o| !is_constant(o) && !a_members.contains(&o.index()))
            .map(|o| o.index())
            .collect();
    }
}

/// Whether joining the producer group (`producer`) to a consumer group makes a cycle:
/// some user of a producer member outside the merged group leads back into it. Other
/// groups count as units (a group runs once all its inputs exist, so reaching any
/// member reaches the users of all its members). Paths are followed only up to the
/// consumer's position, past which nothing reaches it.
#[allow(clippy::too_many_arguments)]
fn creates_cycle(
    producer: &[usize],
    merged: &BTreeSet<usize>,
    limit: usize,
    users: &[Vec<NodeId>],
    position: &[usize],
    group: &[Option<usize>],
    members: &[Vec<usize>],
) -> bool {
    let mut stack: Vec<usize> = producer
        .iter()
        .flat_map(|&m| users[m].iter().map(|u| u.index()))
        .filter(|u| !merged.contains(u))
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(x) = stack.pop() {
        if position[x] > limit || !seen.insert(x) {
            continue;
        }
        let unit: Vec<usize> = match group[x] {
            Some(r) if !merged.contains(&x) => members[r].clone(),
            _ => vec![x],
        };
        for m in unit {
            seen.insert(m);
            for u in &users[m] {
                if merged.contains(&u.index()) {
                    return true;
                }
                stack.push(u.index());
            }
        }
    }
    false
}

/// Turns a group that only feeds one reduction into that reduction's prologue: the
/// group's step disappears and the reduction's step evaluates it. The reduction
/// already comes after the group, and nothing else reads the group's output.
fn fold_prologues(
    graph: &Graph,
    groups: &[FusionGroup],
    member_of: &[Option<usize>],
    users: &[Vec<NodeId>],
    graph_outputs: &BTreeSet<usize>,
    schedule: &mut Vec<Step>,
) {
    let mut absorbed = vec![false; groups.len()];
    for step in schedule.iter_mut() {
        let Step::Node(r) = *step else { continue };
        if !matches!(graph.node(r).op, Op::Reduce { .. }) {
            continue;
        }
        let operand = graph.operands(r)[0];
        let Some(g) = member_of[operand.index()] else {
            continue;
        };
        // The kernel reduces over the group's shape.
        let only_output = groups[g].outputs == [operand]
            && &graph.node(operand).ty.shape == groups[g].shape(graph);
        let only_reader =
            users[operand.index()] == [r] && !graph_outputs.contains(&operand.index());
        if only_output && only_reader && !absorbed[g] {
            absorbed[g] = true;
            *step = Step::GroupReduce {
                group: g,
                reduce: r,
            };
        }
    }
    schedule.retain(|s| !matches!(s, Step::Group(g) if absorbed[*g]));
}

/// Turns a group into the epilogue of a matmul whose product (of the group's shape)
/// only that group reads: the matmul's own step disappears and the group's step
/// computes the product first. The matmul's operands come before the group already.
fn fold_epilogues(
    graph: &Graph,
    groups: &[FusionGroup],
    member_of: &[Option<usize>],
    users: &[Vec<NodeId>],
    graph_outputs: &BTreeSet<usize>,
    schedule: &mut Vec<Step>,
) {
    let mut folded = Vec::new();
    for step in schedule.iter_mut() {
        let Step::Group(g) = *step else { continue };
        // The matmul kernel writes every output at the product's shape.
        if groups[g].carries_scalars(graph) || groups[g].carries_rows(graph) {
            continue;
        }
        let shape = groups[g].shape(graph);
        let candidate = groups[g]
            .nodes
            .iter()
            .flat_map(|&m| graph.operands(m))
            .find(|&o| {
                matches!(graph.node(o).op, Op::MatMul { .. })
                    && &graph.node(o).ty.shape == shape
                    && !graph_outputs.contains(&o.index())
                    && users[o.index()]
                        .iter()
                        .all(|u| member_of[u.index()] == Some(g))
            });
        if let Some(matmul) = candidate {
            folded.push(matmul);
            *step = Step::MatmulGroup { matmul, group: g };
        }
    }
    schedule.retain(|s| !matches!(s, Step::Node(id) if folded.contains(id)));
}

/// Turns each batched matmul read only by a sum over all its batch dimensions into
/// one `MatmulSum` step at the sum's place (its operands are ready by then, as they
/// were for the matmul).
fn fold_batch_sums(
    graph: &Graph,
    users: &[Vec<NodeId>],
    graph_outputs: &BTreeSet<usize>,
    schedule: &mut Vec<Step>,
) {
    let mut folded = Vec::new();
    for step in schedule.iter_mut() {
        let Step::Node(reduce) = *step else { continue };
        let Op::Reduce {
            op: ReduceOp::Sum,
            axes,
            keep_dims: false,
        } = &graph.node(reduce).op
        else {
            continue;
        };
        let matmul = graph.operands(reduce)[0];
        let batch_rank = graph.node(matmul).ty.shape.rank().saturating_sub(2);
        let mut sorted = axes.clone();
        sorted.sort_unstable();
        if matches!(graph.node(matmul).op, Op::MatMul { .. })
            && batch_rank > 0
            && sorted == (0..batch_rank).collect::<Vec<_>>()
            && !graph_outputs.contains(&matmul.index())
            && users[matmul.index()] == [reduce]
        {
            folded.push(matmul);
            *step = Step::MatmulSum { matmul, reduce };
        }
    }
    schedule.retain(|s| !matches!(s, Step::Node(id) if folded.contains(id)));
}

impl FusionPlan {
    /// Turns each plain reduction over the last axis whose result only one group of
    /// the operand's shape reads (through at most the views that restore and
    /// broadcast the reduced axes) into a `ReduceGroup` step at the group's place:
    /// the operand exists by then, and nothing else waits on the reduction.
    fn fold_reduce_epilogues(
        &mut self,
        graph: &Graph,
        users: &[Vec<NodeId>],
        graph_outputs: &BTreeSet<usize>,
        max_bindings: usize,
    ) {
        let position = self.positions(graph);
        let mut folded = Vec::new();
        for step in &self.schedule {
            let Step::Node(reduce) = *step else { continue };
            let Op::Reduce { axes, .. } = &graph.node(reduce).op else {
                continue;
            };
            let operand = &graph.node(graph.operands(reduce)[0]).ty.shape;
            let rank = operand.rank();
            // Rows along the last axis: a whole-tensor reduction would be one row,
            // one cube's work.
            if rank < 2 || axes != &[rank - 1] {
                continue;
            }
            // The reduction's shape with its reduced axes kept as 1s.
            let row_shape = Shape(
                operand
                    .dims()
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        if axes.contains(&i) {
                            crate::ir::Dim::Fixed(1)
                        } else {
                            d.clone()
                        }
                    })
                    .collect(),
            );
            let sole_user = |id: NodeId| -> Option<NodeId> {
                match users[id.index()].as_slice() {
                    [u] if !graph_outputs.contains(&id.index()) => Some(*u),
                    _ => None,
                }
            };
            let mut via = Vec::new();
            let mut read_as = reduce;
            let mut reader = sole_user(reduce);
            while let Some(u) = reader {
                // Views that keep each row's value: a reshape or stop-gradient to the
                // kept shape, and a broadcast of that shape over the rows.
                let from = &graph.node(read_as).ty.shape;
                let view = match &graph.node(u).op {
                    Op::Reshape { .. } | Op::StopGradient => graph.node(u).ty.shape == row_shape,
                    Op::BroadcastTo { .. } => {
                        from == &row_shape && &graph.node(u).ty.shape == operand
                    }
                    _ => false,
                };
                if !view || via.len() == 2 {
                    break;
                }
                via.push(u);
                read_as = u;
                reader = sole_user(u);
            }
            let readable = [&row_shape, operand].contains(&&graph.node(read_as).ty.shape);
            // The epilogue: the first group of the operand's shape that reads the
            // reduction and is not yet another reduction's epilogue.
            let Some(g) = users[read_as.index()]
                .iter()
                .filter_map(|u| {
                    let g = self.member_of[u.index()]?;
                    let fits = self.schedule.contains(&Step::Group(g))
                        && !folded.iter().any(|f: &ReduceEpilogue| f.group == g)
                        && self.groups[g].shape(graph) == operand
                        && !self.groups[g].carries_scalars(graph);
                    fits.then_some(g)
                })
                .min_by_key(|&g| position[self.groups[g].nodes[0].index()])
            else {
                continue;
            };
            // Other readers of the reduction itself are served by writing it too;
            // readers of a view of it would need the view built, so none may exist.
            let outside = |id: NodeId| {
                graph_outputs.contains(&id.index())
                    || users[id.index()]
                        .iter()
                        .any(|u| self.member_of[u.index()] != Some(g))
            };
            let write_reduced = via.is_empty() && outside(reduce);
            let served = via.is_empty() || !outside(read_as);
            // The reduction now runs at the group's place: whoever else reads it must
            // come later.
            let at = position[self.groups[g].nodes[0].index()];
            let in_time = users[reduce.index()]
                .iter()
                .filter(|u| !via.contains(u) && self.member_of[u.index()] != Some(g))
                .all(|u| position[u.index()] > at);
            // The kernel binds the reduced operand, the group's inputs and outputs,
            // the reduced values if written, a top-k's two results and its metadata.
            let group = &self.groups[g];
            let bindings = 2
                + group_inputs(graph, group).len()
                + group.outputs.len()
                + usize::from(write_reduced);
            if readable && served && in_time && bindings <= max_bindings {
                let top_k = self
                    .row_top_k(graph, users, g)
                    .filter(|_| bindings + 2 <= max_bindings);
                folded.push(ReduceEpilogue {
                    reduce,
                    via,
                    group: g,
                    write_reduced,
                    top_k,
                });
            }
        }
        for fused in folded {
            let at = self
                .schedule
                .iter()
                .position(|s| *s == Step::Group(fused.group))
                .expect("the group runs alone");
            self.schedule[at] = Step::ReduceGroup(self.reduce_epilogues.len());
            let absorbed: Vec<NodeId> = fused
                .top_k
                .iter()
                .flat_map(|t| [Some(t.top), t.gather])
                .flatten()
                .chain([fused.reduce])
                .chain(fused.via.iter().copied())
                .collect();
            self.schedule
                .retain(|s| !matches!(s, Step::Node(id) if absorbed.contains(id)));
            self.reduce_epilogues.push(fused);
        }
    }

    /// A top-k over the rows of an output of group `g` (of the group's shape) that the
    /// group's kernel can take as it writes them, and the gather of the chosen values
    /// if the graph takes one. Both read only what the kernel computes, so they move
    /// to its step.
    fn row_top_k(&self, graph: &Graph, users: &[Vec<NodeId>], g: usize) -> Option<EpilogueTopK> {
        // Each unit keeps its row's best k in registers.
        const MOST: usize = 16;
        let group = &self.groups[g];
        let shape = group.shape(graph);
        let last = shape.rank().checked_sub(1)?;
        group.outputs.iter().find_map(|&values| {
            if &graph.node(values).ty.shape != shape {
                return None;
            }
            let top = users[values.index()]
                .iter()
                .copied()
                .find(|&u| matches!(graph.node(u).op, Op::TopK { k } if k <= MOST))?;
            let gather = users[values.index()].iter().copied().find(|&u| {
                matches!(graph.node(u).op, Op::Gather { axis } if axis == last)
                    && graph.operands(u) == [values, top]
            });
            Some(EpilogueTopK {
                values,
                top,
                gather,
            })
        })
    }
}

/// A reduction as a multi-tensor segment, with what it must share with the others
/// of its batch; `None` if it cannot be one (its prologue is not a chain of unary ops
/// from one value).
fn batchable_reduction(
    graph: &Graph,
    groups: &[FusionGroup],
    step: &Step,
) -> Option<(ReductionKind, ReduceSegment)> {
    let (reduce, prologue_group) = match *step {
        Step::Node(r) => (r, None),
        Step::GroupReduce { group, reduce } => (reduce, Some(group)),
        _ => return None,
    };
    let Op::Reduce {
        op,
        axes,
        keep_dims,
    } = &graph.node(reduce).op
    else {
        return None;
    };
    let operand = graph.operands(reduce)[0];
    let mut axes = axes.clone();
    axes.sort_unstable();
    let mut prologue = Vec::new();
    let mut source = operand;
    if let Some(g) = prologue_group {
        for (i, &m) in groups[g].nodes.iter().enumerate() {
            let Op::Unary(u) = graph.node(m).op else {
                return None;
            };
            let from = graph.operands(m)[0];
            match i {
                0 => source = from,
                _ if from != groups[g].nodes[i - 1] => return None,
                _ => {}
            }
            prologue.push(u);
        }
    }
    // The kernel reads its tensors contiguously: a layout view or a constant (one
    // value broadcast) would need a copy first.
    if matches!(
        graph.node(source).op,
        Op::Transpose { .. }
            | Op::BroadcastTo { .. }
            | Op::Slice { .. }
            | Op::Reshape { .. }
            | Op::Constant { .. }
    ) {
        return None;
    }
    let shape = &graph.node(operand).ty.shape;
    let whole = axes.len() == shape.rank();
    let kind = ReductionKind {
        op: *op,
        prologue,
        layout: (!whole).then(|| (shape.clone(), axes, *keep_dims)),
    };
    let segment = ReduceSegment {
        reduce,
        prologue_group,
        source,
    };
    Some((kind, segment))
}

impl FusionPlan {
    /// Gathers reductions of the same kind into `MultiReduce` steps of at most
    /// `max_inputs` tensors. A batch runs where its
    /// last member ran: every member's input exists by then, and each member joins only
    /// while that position is before the first reader of any member's result.
    fn fold_multi_reduces(&mut self, graph: &Graph, users: &[Vec<NodeId>], max_inputs: usize) {
        let position = self.positions(graph);
        struct Batch {
            kind: ReductionKind,
            members: Vec<(usize, ReduceSegment)>,
            first_use: usize,
        }
        let mut open: Vec<Batch> = Vec::new();
        let mut batches: Vec<Batch> = Vec::new();
        for (pos, step) in self.schedule.iter().enumerate() {
            let Some((kind, segment)) = batchable_reduction(graph, &self.groups, step) else {
                continue;
            };
            let first_use = users[segment.reduce.index()]
                .iter()
                .map(|u| position[u.index()])
                .min()
                .unwrap_or(usize::MAX);
            let same = open.iter().position(|b| b.kind == kind);
            if let Some(i) = same {
                let batch = &mut open[i];
                if batch.members.len() < max_inputs && pos < batch.first_use {
                    batch.members.push((pos, segment));
                    batch.first_use = batch.first_use.min(first_use);
                    continue;
                }
                batches.push(open.swap_remove(i));
            }
            open.push(Batch {
                kind,
                members: vec![(pos, segment)],
                first_use,
            });
        }
        batches.extend(open);
        let first = self.multi_reduces.len();
        let batches = self.merge_steps(
            batches,
            |b| b.members.iter().map(|&(pos, _)| pos).collect(),
            |i| Step::MultiReduce(first + i),
        );
        self.multi_reduces
            .extend(batches.into_iter().map(|batch| MultiReduce {
                op: batch.kind.op,
                prologue: batch.kind.prologue,
                whole: batch.kind.layout.is_none(),
                segments: batch.members.into_iter().map(|(_, s)| s).collect(),
            }));
    }

    /// Replaces each batch of more than one step (`positions` of its members) by one
    /// step at the last position listed, `step(i)` for the `i`th batch kept, and
    /// drops the others; returns the batches kept.
    fn merge_steps<B>(
        &mut self,
        batches: Vec<B>,
        positions: impl Fn(&B) -> Vec<usize>,
        step: impl Fn(usize) -> Step,
    ) -> Vec<B> {
        let kept: Vec<B> = batches
            .into_iter()
            .filter(|b| positions(b).len() > 1)
            .collect();
        let mut removed = vec![false; self.schedule.len()];
        for (i, batch) in kept.iter().enumerate() {
            let members = positions(batch);
            let last = *members.last().expect("a batch has members");
            for &pos in &members {
                removed[pos] = pos != last;
            }
            self.schedule[last] = step(i);
        }
        let mut pos = 0;
        self.schedule.retain(|_| {
            pos += 1;
            !removed[pos - 1]
        });
        kept
    }
}

/// The values from outside a group that its program loads, in load order: each
/// member's operands in turn, first occurrence only; constants are inlined, not loaded.
pub fn group_inputs(graph: &Graph, group: &FusionGroup) -> Vec<NodeId> {
    let mut inputs = Vec::new();
    for &m in &group.nodes {
        for o in graph.operands(m) {
            let loaded = !group.nodes.contains(&o)
                && !matches!(graph.node(o).op, Op::Constant { .. })
                && !inputs.contains(&o);
            if loaded {
                inputs.push(o);
            }
        }
    }
    inputs
}

/// A group's program as text, so that equal signatures mean equal fused programs: the
/// same ops on the same registers, constants and loads in the same order, the same
/// outputs. `None` for a group a multi-tensor kernel cannot run, which reads every
/// tensor flat: one with dropout or an iota (both depend on the position in the
/// group's own shape), with a member or an input that is neither of the group's shape nor
/// one value, or with an input that is a transposed or broadcast view.
fn group_signature(graph: &Graph, group: &FusionGroup) -> Option<String> {
    program_signature(graph, group, None, true)
}

/// `group_signature`, for a program that reads `accumulator` (a matmul's product) from
/// registers; with `flat` false the program runs in its own shape (each input through
/// its own view), so anything it can run is accepted.
fn program_signature(
    graph: &Graph,
    group: &FusionGroup,
    accumulator: Option<NodeId>,
    flat: bool,
) -> Option<String> {
    use std::fmt::Write;
    let shape = group.shape(graph);
    let mut registers: Vec<NodeId> = Vec::new();
    let mut signature = String::new();
    for &m in &group.nodes {
        let node = graph.node(m);
        let flat_member = &node.ty.shape == shape || node.ty.shape.rank() == 0;
        let positional = matches!(node.op, Op::Dropout { .. } | Op::Iota { .. });
        if flat && (positional || !flat_member) {
            return None;
        }
        let mut operands = Vec::new();
        for o in graph.operands(m) {
            if let Some(r) = registers.iter().position(|&x| x == o) {
                operands.push(r);
                continue;
            }
            let source = graph.node(o);
            match &source.op {
                _ if Some(o) == accumulator => signature.push_str("accumulator;"),
                Op::Constant { value, .. } => write!(signature, "const {};", value.0).ok()?,
                _ if !flat => write!(signature, "load {};", source.ty).ok()?,
                Op::Transpose { .. } | Op::BroadcastTo { .. } => return None,
                _ if &source.ty.shape == shape || source.ty.shape.rank() == 0 => {
                    signature.push_str("load;")
                }
                _ => return None,
            }
            registers.push(o);
            operands.push(registers.len() - 1);
        }
        // Flat programs batch tensors of any size, so only scalar-or-not counts there.
        if flat {
            let scalar = node.ty.shape.rank() == 0;
            write!(signature, "{:?} {operands:?} {scalar};", node.op).ok()?;
        } else {
            write!(signature, "{:?} {operands:?} {};", node.op, node.ty).ok()?;
        }
        registers.push(m);
    }
    for o in &group.outputs {
        let r = registers.iter().position(|x| x == o)?;
        write!(signature, "out {r};").ok()?;
    }
    Some(signature)
}

/// The input positions at which every group of a batch reads the same value.
fn shared_positions(inputs: &[Vec<NodeId>]) -> Vec<usize> {
    (0..inputs[0].len())
        .filter(|&p| inputs.iter().all(|i| i[p] == inputs[0][p]))
        .collect()
}

/// Buffers a multi-tensor kernel over groups reading `inputs` binds: shared inputs
/// once, the others and each group's `outputs` per group, and the metadata.
fn multi_group_bindings(inputs: &[Vec<NodeId>], outputs: usize) -> usize {
    let shared = shared_positions(inputs).len();
    1 + shared + inputs.len() * (inputs[0].len() - shared + outputs)
}

impl FusionPlan {
    /// Gathers groups with equal programs into `MultiGroup` steps, as
    /// `fold_multi_reduces` does reductions: a batch runs where its last member ran,
    /// and a group joins only before the first reader of any member's outputs and
    /// while the kernel's buffers fit `max_bindings`.
    fn fold_multi_groups(&mut self, graph: &Graph, users: &[Vec<NodeId>], max_bindings: usize) {
        let position = self.positions(graph);
        struct Batch {
            signature: String,
            members: Vec<(usize, usize)>,
            inputs: Vec<Vec<NodeId>>,
            first_use: usize,
        }
        let mut open: Vec<Batch> = Vec::new();
        let mut batches: Vec<Batch> = Vec::new();
        for (pos, step) in self.schedule.iter().enumerate() {
            let Step::Group(g) = *step else { continue };
            let group = &self.groups[g];
            let Some(signature) = group_signature(graph, group) else {
                continue;
            };
            let inputs = group_inputs(graph, group);
            let first_use = group
                .outputs
                .iter()
                .flat_map(|o| &users[o.index()])
                .filter(|u| self.member_of[u.index()] != Some(g))
                .map(|u| position[u.index()])
                .min()
                .unwrap_or(usize::MAX);
            if let Some(i) = open.iter().position(|b| b.signature == signature) {
                let batch = &mut open[i];
                let mut joined = batch.inputs.clone();
                joined.push(inputs.clone());
                let fits = multi_group_bindings(&joined, group.outputs.len()) <= max_bindings;
                if fits && pos < batch.first_use {
                    batch.members.push((pos, g));
                    batch.inputs = joined;
                    batch.first_use = batch.first_use.min(first_use);
                    continue;
                }
                batches.push(open.swap_remove(i));
            }
            open.push(Batch {
                signature,
                members: vec![(pos, g)],
                inputs: vec![inputs],
                first_use,
            });
        }
        batches.extend(open);
        let first = self.multi_groups.len();
        let batches = self.merge_steps(
            batches,
            |b| b.members.iter().map(|&(pos, _)| pos).collect(),
            |i| Step::MultiGroup(first + i),
        );
        self.multi_groups
            .extend(batches.into_iter().map(|batch| MultiGroup {
                groups: batch.members.iter().map(|&(_, g)| g).collect(),
                shared: shared_positions(&batch.inputs),
                inputs: batch.inputs,
            }));
    }
}

/// Matmuls `fold_multi_matmuls` may run as one kernel.
struct MatmulBatch {
    signature: String,
    /// The first member's operands.
    operands: (NodeId, NodeId),
    /// Which operand the members share, once there are two.
    shared: Option<SharedOperand>,
    members: Vec<(usize, Step)>,
    epilogue_inputs: Vec<Vec<NodeId>>,
    outputs: usize,
    /// The last position at which a member's input is computed, and the first
    /// at which a member's result is read.
    ready: usize,
    first_use: usize,
}

impl MatmulBatch {
    /// The earliest member position strictly between `ready` and `first_use`.
    fn anchor(&self, ready: usize, first_use: usize, pos: usize) -> Option<usize> {
        self.members
            .iter()
            .map(|&(p, _)| p)
            .chain([pos])
            .filter(|&p| ready < p && p < first_use)
            .min()
    }
}

impl FusionPlan {
    /// Gathers matmuls that share an operand into `MultiMatmul` steps: members have
    /// the same kind of step, operand and product types, transposes and epilogue
    /// program. A batch runs at one of its members' positions that comes after every
    /// member's inputs exist and before any member's result is read (the first one, so
    /// the query, key and value projections run where the query's did), and its
    /// buffers fit `max_bindings`.
    fn fold_multi_matmuls(&mut self, graph: &Graph, users: &[Vec<NodeId>], max_bindings: usize) {
        let position = self.positions(graph);
        // A batch stays open: a later matmul may still run at an earlier member's place.
        let mut batches: Vec<MatmulBatch> = Vec::new();
        for (pos, &step) in self.schedule.iter().enumerate() {
            let Some((signature, matmul, epilogue_inputs)) = self.matmul_member(graph, &step)
            else {
                continue;
            };
            let (a, b) = match graph.operands(matmul)[..] {
                [a, b] => (a, b),
                _ => unreachable!("a matmul has two operands"),
            };
            let written = self.step_outputs(graph, &step);
            let first_use = written
                .iter()
                .flat_map(|o| &users[o.index()])
                .map(|u| position[u.index()])
                .filter(|&p| p != pos)
                .min()
                .unwrap_or(usize::MAX);
            let ready = [a, b]
                .iter()
                .chain(&epilogue_inputs)
                .map(|o| position[o.index()])
                .max()
                .unwrap_or(0);
            let joins = |batch: &MatmulBatch| -> Option<SharedOperand> {
                if batch.signature != signature {
                    return None;
                }
                let side = match batch.shared {
                    Some(side) => side,
                    None if a == batch.operands.0 => SharedOperand::Left,
                    None => SharedOperand::Right,
                };
                let shares = match side {
                    SharedOperand::Left => a == batch.operands.0,
                    SharedOperand::Right => b == batch.operands.1,
                };
                let (ready, first_use) = (batch.ready.max(ready), batch.first_use.min(first_use));
                (shares && batch.anchor(ready, first_use, pos).is_some()).then_some(side)
            };
            let fits = |batch: &MatmulBatch| {
                let mut joined = batch.epilogue_inputs.clone();
                joined.push(epilogue_inputs.clone());
                multi_matmul_bindings(&joined, batch.outputs) <= max_bindings
            };
            let joining = batches.iter_mut().find_map(|batch| {
                joins(batch)
                    .filter(|_| fits(batch))
                    .map(|side| (batch, side))
            });
            if let Some((batch, side)) = joining {
                batch.members.push((pos, step));
                batch.epilogue_inputs.push(epilogue_inputs);
                batch.shared = Some(side);
                batch.ready = batch.ready.max(ready);
                batch.first_use = batch.first_use.min(first_use);
                continue;
            }
            batches.push(MatmulBatch {
                signature,
                operands: (a, b),
                shared: None,
                members: vec![(pos, step)],
                epilogue_inputs: vec![epilogue_inputs],
                outputs: written.len(),
                ready,
                first_use,
            });
        }
        // A batch computes its members together, so their results may live longer
        // than they did apart: keep only batches that do not raise the planned peak,
        // at batch size 1 and at a large batch (where activations dominate).
        let mut kept: Vec<&MatmulBatch> = Vec::new();
        let bindings = peak_bindings(graph);
        let mut peaks = planned_peaks(graph, self, &bindings);
        for batch in batches.iter().filter(|b| b.members.len() > 1) {
            let mut trial: Vec<&MatmulBatch> = kept.clone();
            trial.push(batch);
            // Each batch was placed on the schedule before any merge; together, one
            // batch's anchor may move a member after a step of another that reads it.
            let merged = self.with_multi_matmuls(&trial);
            let trial_peaks = planned_peaks(graph, &merged, &bindings);
            if merged.is_ordered(graph) && trial_peaks.iter().zip(&peaks).all(|(t, p)| t <= p) {
                kept = trial;
                peaks = trial_peaks;
            }
        }
        *self = self.with_multi_matmuls(&kept);
    }

    /// This plan with `batches` (of matmul steps at this plan's positions) each run
    /// as one `MultiMatmul`.
    fn with_multi_matmuls(&self, batches: &[&MatmulBatch]) -> FusionPlan {
        let mut plan = self.clone();
        let first = plan.multi_matmuls.len();
        // `merge_steps` runs a batch where its last listed position was.
        let batches = plan.merge_steps(
            batches.to_vec(),
            |b| {
                let anchor = b
                    .anchor(b.ready, b.first_use, b.members[0].0)
                    .expect("members join only while the batch has a place");
                let others = b.members.iter().map(|&(p, _)| p).filter(|&p| p != anchor);
                others.chain([anchor]).collect()
            },
            |i| Step::MultiMatmul(first + i),
        );
        plan.multi_matmuls
            .extend(batches.into_iter().map(|batch| MultiMatmul {
                members: batch.members.iter().map(|&(_, step)| step).collect(),
                shared: batch.shared.expect("a kept batch has two members"),
                epilogue_shared: shared_positions(&batch.epilogue_inputs),
            }));
        plan
    }

    /// For a step that a `MultiMatmul` can hold: the signature its partners must
    /// match, its matmul, and its epilogue's inputs (less the product).
    fn matmul_member(&self, graph: &Graph, step: &Step) -> Option<(String, NodeId, Vec<NodeId>)> {
        let (kind, matmul, epilogue_inputs) = match *step {
            Step::Node(id) => ("plain".to_string(), id, Vec::new()),
            Step::MatmulGroup { matmul, group } => {
                let group = &self.groups[group];
                let program = program_signature(graph, group, Some(matmul), false)?;
                let inputs = group_inputs(graph, group)
                    .into_iter()
                    .filter(|&i| i != matmul)
                    .collect();
                (format!("epilogue {program}"), matmul, inputs)
            }
            Step::MatmulSum { matmul, reduce } => (
                format!("summed to {}", graph.node(reduce).ty),
                matmul,
                Vec::new(),
            ),
            _ => return None,
        };
        let node = graph.node(matmul);
        if !matches!(node.op, Op::MatMul { .. }) {
            return None;
        }
        let operands = graph.operands(matmul);
        let signature = format!(
            "{kind}; {:?} {} x {} -> {}",
            node.op,
            graph.node(operands[0]).ty,
            graph.node(operands[1]).ty,
            node.ty
        );
        Some((signature, matmul, epilogue_inputs))
    }
}

/// Planned peak memory of `graph` under `plan` at each of `bindings`.
fn planned_peaks(graph: &Graph, plan: &FusionPlan, bindings: &[Symbols; 2]) -> [u64; 2] {
    bindings
        .each_ref()
        .map(|symbols| crate::memory::plan_cost(graph, plan, symbols).peak_bytes)
}

type Symbols = std::collections::BTreeMap<String, usize>;

/// `planned_peaks`' symbol bindings: every batch symbol at 1, then at 1024.
fn peak_bindings(graph: &Graph) -> [Symbols; 2] {
    let mut large = Symbols::new();
    for id in graph.node_ids() {
        for d in graph.node(id).ty.shape.dims() {
            if let crate::ir::Dim::Sym(s) = d {
                large.insert(s.clone(), 1024);
            }
        }
    }
    [Symbols::new(), large]
}

/// Buffers a multi-matmul kernel binds: the shared operand once, each member's other
/// operand, its epilogue inputs (shared ones once) and its `outputs`, and the
/// matmul's and the epilogue's metadata.
fn multi_matmul_bindings(epilogue_inputs: &[Vec<NodeId>], outputs: usize) -> usize {
    let members = epilogue_inputs.len();
    let shared = shared_positions(epilogue_inputs).len();
    1 + members * (1 + epilogue_inputs[0].len() - shared + outputs) + shared + 2
}

/// Topological order of groups and single nodes, chosen to keep memory low: among
/// the steps whose inputs exist, one that frees memory (is the last to read a value)
/// runs first, else the one that writes least, the earliest in `order` on a tie. A
/// training step's backward pass then consumes saved activations as soon as it can
/// instead of starting on other work.
fn schedule(
    graph: &Graph,
    order: &[NodeId],
    groups: &[FusionGroup],
    member_of: &[Option<usize>],
) -> Vec<Step> {
    let step_of = |id: NodeId| member_of[id.index()].map_or(Step::Node(id), Step::Group);
    let key = |s: Step| match s {
        Step::Node(id) => id.index(),
        Step::Group(g) => graph.len() + g,
        Step::GroupReduce { .. }
        | Step::MatmulGroup { .. }
        | Step::MatmulSum { .. }
        | Step::MultiReduce(_)
        | Step::MultiGroup(_)
        | Step::MultiMatmul(_)
        | Step::ReduceGroup(_) => {
            unreachable!("prologues and epilogues are folded after scheduling")
        }
    };
    let total = graph.len() + groups.len();
    let mut indegree = vec![0usize; total];
    let mut successors: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); total];
    let mut first_position = vec![usize::MAX; total];
    let mut step_by_key: Vec<Option<Step>> = vec![None; total];
    // Buffers each step reads from other steps (a view's is its source's), and how
    // many steps read each buffer.
    let root = crate::ir::buffer_roots(graph);
    let mut reads: Vec<BTreeSet<NodeId>> = vec![BTreeSet::new(); total];
    let mut readers = vec![0usize; graph.len()];
    let mut written: Vec<BTreeSet<NodeId>> = vec![BTreeSet::new(); total];
    for (pos, &id) in order.iter().enumerate() {
        let s = step_of(id);
        let k = key(s);
        step_by_key[k] = Some(s);
        first_position[k] = first_position[k].min(pos);
        for o in graph.operands(id) {
            let from = key(step_of(o));
            if from != k {
                if successors[from].insert(k) {
                    indegree[k] += 1;
                }
                let buffer = root[o.index()];
                if reads[k].insert(buffer) {
                    readers[buffer.index()] += 1;
                }
                written[from].insert(o);
            }
        }
    }
    let graph_outputs: BTreeSet<NodeId> = graph.outputs().iter().map(|(_, o)| *o).collect();
    for &o in &graph_outputs {
        written[key(step_of(o))].insert(o);
    }
    // Buffers that outputs (or views that are outputs) keep to the end.
    let kept: BTreeSet<NodeId> = graph_outputs.iter().map(|o| root[o.index()]).collect();
    // Bytes a value holds; leaves are resident and views alias their source.
    let size = |id: NodeId| -> i64 {
        let node = graph.node(id);
        if !node.op.launches_kernel() {
            return 0;
        }
        let elements: i64 = node
            .ty
            .shape
            .dims()
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n as i64,
                // Batch-sized values dominate whatever the batch is.
                Dim::Sym(_) => 64,
            })
            .product();
        4 * elements
    };
    // The order of preference among ready steps: steps that free memory, those that
    // free more first; then those that write least.
    let preference = |k: usize, readers: &[usize]| -> (bool, i64, i64) {
        let writes: i64 = written[k].iter().map(|&v| size(v)).sum();
        let frees: i64 = reads[k]
            .iter()
            .filter(|o| readers[o.index()] == 1 && !kept.contains(o))
            .map(|&o| size(o))
            .sum();
        (frees == 0, -frees, writes)
    };
    let mut ready: Vec<usize> = (0..total)
        .filter(|&k| step_by_key[k].is_some() && indegree[k] == 0)
        .collect();
    let mut out = Vec::with_capacity(total);
    while !ready.is_empty() {
        let at = (0..ready.len())
            .min_by_key(|&i| (preference(ready[i], &readers), first_position[ready[i]]))
            .expect("a step is ready");
        let k = ready.swap_remove(at);
        out.push(step_by_key[k].expect("scheduled keys exist"));
        for o in &reads[k] {
            readers[o.index()] -= 1;
        }
        for &s in &successors[k] {
            indegree[s] -= 1;
            if indegree[s] == 0 {
                ready.push(s);
            }
        }
    }
    out
}
