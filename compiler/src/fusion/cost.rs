//! Planned cost of running a graph under a fusion plan, at concrete symbol values:
//! kernel launches, bytes moved (every kernel reads its inputs and writes its outputs
//! once) and peak memory under liveness-based reuse (a buffer is freed after the last
//! step that reads it or a view of it; views and leaves allocate nothing new). These are the numbers
//! `altc compile --explain` reports; the device runtime frees buffers on the same
//! schedule.

use super::plan::FusionPlan;
use crate::ir::{Dim, Graph, NodeId, Op, Shape};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanCost {
    pub launches: usize,
    pub bytes_moved: u64,
    /// Largest total size of intermediates alive at once (parameters, inputs and
    /// optimizer state are resident and not counted).
    pub peak_bytes: u64,
}

/// Bytes of one element in a device buffer: every value is held in a 4-byte word
/// (f32 values, and i32 indices and 0/1 masks at the same width).
pub const DEVICE_ELEMENT_BYTES: u64 = 4;

pub(super) fn extent(d: &Dim, symbols: &BTreeMap<String, usize>) -> u64 {
    d.extent_or_assumed(symbols) as u64
}

pub(super) fn elements(shape: &Shape, symbols: &BTreeMap<String, usize>) -> u64 {
    shape.dims().iter().map(|d| extent(d, symbols)).product()
}

pub(super) fn bytes(graph: &Graph, id: NodeId, symbols: &BTreeMap<String, usize>) -> u64 {
    elements(&graph.node(id).ty.shape, symbols) * DEVICE_ELEMENT_BYTES
}

/// Floating-point operations of the graph's matmuls (dense and grouped expert ones),
/// counting a multiply-add as two: the work a matmul rate is judged against.
pub fn matmul_flops(graph: &Graph, symbols: &BTreeMap<String, usize>) -> u64 {
    let live = crate::ir::live_nodes(graph);
    graph
        .node_ids()
        .filter(|id| live[id.index()])
        .map(|id| node_flops(graph, id, symbols))
        .sum()
}

/// `matmul_flops` of one node: zero unless it is a matmul.
pub(super) fn node_flops(graph: &Graph, id: NodeId, symbols: &BTreeMap<String, usize>) -> u64 {
    let last = |id: NodeId| {
        let dims = graph.node(id).ty.shape.dims();
        dims.last().map_or(1, |d| extent(d, symbols))
    };
    let out = elements(&graph.node(id).ty.shape, symbols);
    let operands = graph.operands(id);
    2 * match &graph.node(id).op {
        Op::MatMul { transpose_a, .. } => {
            let a = &graph.node(operands[0]).ty.shape;
            let contracted = &a.dims()[a.rank() - if *transpose_a { 2 } else { 1 }];
            out * extent(contracted, symbols)
        }
        Op::ExpertMatMul { .. } => out * last(operands[0]),
        Op::ExpertWeightGrad => {
            elements(&graph.node(operands[2]).ty.shape, symbols)
                * last(operands[0])
                * last(operands[1])
        }
        _ => 0,
    }
}

/// Bytes a launching step reads: each operand from outside the step once, constants
/// (inlined into the kernel) not at all.
pub(super) fn step_reads(
    graph: &Graph,
    nodes: &[NodeId],
    pos: usize,
    step_of: &[usize],
    symbols: &BTreeMap<String, usize>,
) -> u64 {
    let mut read = std::collections::BTreeSet::new();
    for &id in nodes {
        for o in graph.operands(id) {
            if step_of[o.index()] != pos && !matches!(graph.node(o).op, Op::Constant { .. }) {
                read.insert(o);
            }
        }
    }
    read.iter().map(|&o| bytes(graph, o, symbols)).sum()
}

/// Bytes of the graph's leaves, its inputs and parameters (with optimizer state),
/// which stay resident while it runs and which `PlanCost::peak_bytes` leaves out.
pub fn leaf_bytes(graph: &Graph, symbols: &BTreeMap<String, usize>) -> u64 {
    graph
        .inputs()
        .chain(graph.parameters())
        .map(|(_, id)| bytes(graph, id, symbols))
        .sum()
}

/// What one kernel of a plan does at concrete symbol values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepWork {
    /// Its position in the plan's schedule.
    pub step: usize,
    /// Bytes it reads and writes, as `plan_cost` counts them.
    pub bytes: u64,
    /// Matmul floating-point operations (a multiply-add is two).
    pub flops: u64,
}

/// The work of every kernel `plan` launches, in schedule order.
pub fn step_work(
    graph: &Graph,
    plan: &FusionPlan,
    symbols: &BTreeMap<String, usize>,
) -> Vec<StepWork> {
    let step_of = plan.positions(graph);
    let mut work = Vec::new();
    for (pos, step) in plan.schedule.iter().enumerate() {
        if !step.launches(graph) {
            continue;
        }
        let nodes = plan.step_nodes(step);
        let written: u64 = plan
            .step_outputs(graph, step)
            .iter()
            .map(|&id| bytes(graph, id, symbols))
            .sum();
        work.push(StepWork {
            step: pos,
            bytes: step_reads(graph, &nodes, pos, &step_of, symbols) + written,
            flops: nodes.iter().map(|&id| node_flops(graph, id, symbols)).sum(),
        });
    }
    work
}

/// The planned cost of `graph` under `plan` with symbols bound to `symbols`.
pub fn plan_cost(graph: &Graph, plan: &FusionPlan, symbols: &BTreeMap<String, usize>) -> PlanCost {
    plan_cost_and_peak(graph, plan, symbols).0
}

/// Where planned memory peaks: the step, and the values alive there (largest first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peak {
    pub step: usize,
    pub live: Vec<(NodeId, u64)>,
}

/// `plan_cost`, and what is alive at its peak.
pub fn plan_cost_and_peak(
    graph: &Graph,
    plan: &FusionPlan,
    symbols: &BTreeMap<String, usize>,
) -> (PlanCost, Peak) {
    let steps: Vec<Vec<NodeId>> = plan.schedule.iter().map(|s| plan.step_nodes(s)).collect();
    let step_of = plan.positions(graph);
    // A buffer lives until the last step that reads it or any view of it.
    let root = crate::ir::buffer_roots(graph);
    let mut last_read = vec![None; graph.len()];
    for (pos, nodes) in steps.iter().enumerate() {
        for &id in nodes {
            for o in graph.operands(id) {
                if step_of[o.index()] != pos {
                    let buffer = root[o.index()].index();
                    last_read[buffer] = last_read[buffer].max(Some(pos));
                }
            }
        }
    }
    let mut is_output = vec![false; graph.len()];
    for (_, o) in graph.outputs() {
        is_output[root[o.index()].index()] = true;
    }
    let mut cost = PlanCost::default();
    let mut peak = Peak::default();
    let mut live: BTreeMap<NodeId, u64> = BTreeMap::new();
    let mut live_bytes: u64 = 0;
    let mut frees: Vec<Vec<NodeId>> = vec![Vec::new(); steps.len()];
    for (pos, (step, nodes)) in plan.schedule.iter().zip(&steps).enumerate() {
        // What this step writes: a group's outputs, or the node itself if it is a kernel.
        let written = plan.step_outputs(graph, step);
        if step.launches(graph) {
            cost.launches += 1;
            cost.bytes_moved += step_reads(graph, nodes, pos, &step_of, symbols);
        }
        for &id in &written {
            let b = bytes(graph, id, symbols);
            cost.bytes_moved += b;
            live_bytes += b;
            live.insert(id, b);
            match last_read[id.index()] {
                Some(at) if !is_output[id.index()] => frees[at].push(id),
                _ => {}
            }
        }
        if live_bytes > cost.peak_bytes {
            cost.peak_bytes = live_bytes;
            peak.step = pos;
            peak.live = live.iter().map(|(&id, &b)| (id, b)).collect();
        }
        for id in &frees[pos] {
            live_bytes -= live.remove(id).unwrap_or(0);
        }
    }
    peak.live.sort_by_key(|&(id, b)| (std::cmp::Reverse(b), id));
    (cost, peak)
}
