//! Matmuls of one shape that share an operand, merged into one launch where that
//! does not raise the planned peak memory.

use super::multi::{group_inputs, program_signature, shared_positions};
use super::plan::{FusionPlan, MultiMatmul, SharedOperand, Step};
use crate::ir::{Graph, NodeId, Op};

/// Matmuls `fold_multi_matmuls` may run as one kernel.
pub(super) struct MatmulBatch {
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
    pub(super) fn anchor(&self, ready: usize, first_use: usize, pos: usize) -> Option<usize> {
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
    pub(super) fn fold_multi_matmuls(
        &mut self,
        graph: &Graph,
        users: &[Vec<NodeId>],
        max_bindings: usize,
    ) {
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
    pub(super) fn with_multi_matmuls(&self, batches: &[&MatmulBatch]) -> FusionPlan {
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
    pub(super) fn matmul_member(
        &self,
        graph: &Graph,
        step: &Step,
    ) -> Option<(String, NodeId, Vec<NodeId>)> {
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
pub(super) fn planned_peaks(graph: &Graph, plan: &FusionPlan, bindings: &[Symbols; 2]) -> [u64; 2] {
    bindings
        .each_ref()
        .map(|symbols| super::cost::plan_cost(graph, plan, symbols).peak_bytes)
}

pub(super) type Symbols = std::collections::BTreeMap<String, usize>;

/// `planned_peaks`' symbol bindings: every batch symbol at 1, then at 1024.
pub(super) fn peak_bindings(graph: &Graph) -> [Symbols; 2] {
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
pub(super) fn multi_matmul_bindings(epilogue_inputs: &[Vec<NodeId>], outputs: usize) -> usize {
    let members = epilogue_inputs.len();
    let shared = shared_positions(epilogue_inputs).len();
    1 + members * (1 + epilogue_inputs[0].len() - shared + outputs) + shared + 2
}
