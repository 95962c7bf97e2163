//! Launching one planned step: a fusion group, a multi-tensor group, a matmul with
//! its epilogue or several sharing an operand, through `altc_kernels`; and moving
//! values between host and device.

use super::execute::{concrete, shape_of};
use super::state::{DeviceBackend, Value};
use super::translate::{matmul_operands, shared_inputs_first};
use altc_compiler::fusion::{
    FusionGroup, FusionPlan, KernelLimits, MultiGroup, MultiMatmul, SharedOperand, Step,
};
use altc_compiler::ir::{DType, Graph, NodeId};
use altc_compiler::reference::{EvalContext, Tensor};
use altc_kernels::{FusedProgram, MatmulOperands, OperandLayout, Segment, UnaryKind, View};
use cubecl::prelude::*;
use std::collections::BTreeMap;

impl<R: Runtime> DeviceBackend<R> {
    /// Evaluates a fusion group with one fused kernel: external operands are loaded
    /// through views broadcast to the group's shape, constants are inlined.
    pub(super) fn eval_group(
        &self,
        graph: &Graph,
        group: &FusionGroup,
        values: &[Option<Value>],
        shape: Vec<usize>,
        ctx: EvalContext,
    ) -> Vec<Value> {
        let (program, inputs) = self.group_program(graph, group, values, &shape, None);
        self.kernels
            .fused(&program, &inputs, &shape, ctx.seed, ctx.step)
            .into_iter()
            .enumerate()
            .map(|(o, h)| Value::contiguous(h, Self::output_shape(&program, o, &shape)))
            .collect()
    }

    /// Runs the groups of a multi-tensor step in one kernel, each over its own tensors
    /// read flat; returns every group's outputs. Should the groups' programs differ
    /// after all, each runs as its own kernel instead.
    pub(super) fn eval_multi_group(
        &mut self,
        graph: &Graph,
        plan: &FusionPlan,
        batch: &MultiGroup,
        values: &[Option<Value>],
        symbols: &BTreeMap<String, usize>,
        ctx: EvalContext,
    ) -> Vec<(NodeId, Value)> {
        let shapes: Vec<Vec<usize>> = batch
            .groups
            .iter()
            .map(|&g| {
                concrete(plan.groups[g].shape(graph), symbols).expect("inputs bind every symbol")
            })
            .collect();
        let programs: Vec<FusedProgram> = batch
            .groups
            .iter()
            .zip(&shapes)
            .map(|(&g, shape)| {
                self.group_program(graph, &plan.groups[g], values, shape, None)
                    .0
            })
            .collect();
        let flat = |p: &FusedProgram| FusedProgram {
            rank: 1,
            ..p.clone()
        };
        let uniform = programs.iter().all(|p| flat(p) == flat(&programs[0]))
            && programs[0].inputs == batch.inputs[0].len();
        let mut produced = Vec::new();
        if !uniform {
            for (&g, shape) in batch.groups.iter().zip(&shapes) {
                let group = &plan.groups[g];
                self.launches += 1;
                let outputs = self.eval_group(graph, group, values, shape.clone(), ctx);
                produced.extend(group.outputs.iter().copied().zip(outputs));
            }
            return produced;
        }
        let mut program = flat(&programs[0]);
        let order = shared_inputs_first(&mut program, &batch.shared);
        let mut flat_view = |node: NodeId| -> View {
            let value = values[node.index()].as_ref().expect("operands come first");
            let one_value = value.shape.iter().product::<usize>() == 1;
            let value = if one_value
                || value.view.strides == altc_kernels::contiguous_strides(&value.shape)
            {
                value.clone()
            } else {
                self.launches += 1;
                self.materialise(value)
            };
            View {
                strides: vec![usize::from(!one_value)],
                ..value.view
            }
        };
        let shared: Vec<View> = batch
            .shared
            .iter()
            .map(|&p| flat_view(batch.inputs[0][p]))
            .collect();
        let segments: Vec<Segment> = batch
            .inputs
            .iter()
            .zip(&shapes)
            .map(|(inputs, shape)| Segment {
                len: shape.iter().product(),
                inputs: order[batch.shared.len()..]
                    .iter()
                    .map(|&p| flat_view(inputs[p]))
                    .collect(),
            })
            .collect();
        self.launches += 1;
        let outputs = self.kernels.multi_fused(&program, &shared, &segments);
        for ((&g, shape), handles) in batch.groups.iter().zip(&shapes).zip(outputs) {
            for (o, (&id, handle)) in plan.groups[g].outputs.iter().zip(handles).enumerate() {
                let shape = Self::output_shape(&program, o, shape);
                produced.push((id, Value::contiguous(handle, shape)));
            }
        }
        produced
    }

    /// What one kernel may bind on this device, as plans for it assume.
    pub(super) fn limits(&self) -> KernelLimits {
        let bindings = self.kernels.client().properties().hardware.max_bindings as usize;
        KernelLimits::for_bindings(bindings)
    }

    /// One matmul step on its own: a plain matmul, one with an epilogue or one
    /// summed over the batch. Returns the values it writes.
    pub(super) fn eval_matmul(
        &self,
        graph: &Graph,
        plan: &FusionPlan,
        step: Step,
        values: &[Option<Value>],
        symbols: &BTreeMap<String, usize>,
        ctx: EvalContext,
    ) -> Vec<(NodeId, Value)> {
        let (Step::Node(matmul)
        | Step::MatmulGroup { matmul, .. }
        | Step::MatmulSum { matmul, .. }) = step
        else {
            unreachable!("not a matmul step: {step:?}")
        };
        let product = shape_of(graph, matmul, symbols);
        let (a, b, transposes) = matmul_operands(graph, matmul, values);
        let mm = self.matmul_of((&a, &b), transposes, &product[..product.len() - 2]);
        match step {
            Step::MatmulGroup { group, .. } => {
                let group = &plan.groups[group];
                let (program, views) =
                    self.group_program(graph, group, values, &product, Some(matmul));
                let outputs = self
                    .kernels
                    .matmul_with_epilogue(&mm, &program, &views, ctx.seed, ctx.step);
                group
                    .outputs
                    .iter()
                    .zip(outputs)
                    .map(|(&id, handle)| (id, Value::contiguous(handle, product.clone())))
                    .collect()
            }
            Step::MatmulSum { reduce, .. } => {
                let handle = self.kernels.matmul_batch_sum(&mm);
                let summed = product[product.len() - 2..].to_vec();
                vec![(reduce, Value::contiguous(handle, summed))]
            }
            _ => vec![(matmul, Value::contiguous(self.kernels.matmul(&mm), product))],
        }
    }

    /// Matmuls sharing an operand in one launch; each on its own should their
    /// epilogue programs come out different.
    pub(super) fn eval_multi_matmul(
        &mut self,
        graph: &Graph,
        plan: &FusionPlan,
        batch: &MultiMatmul,
        values: &[Option<Value>],
        symbols: &BTreeMap<String, usize>,
        ctx: EvalContext,
    ) -> Vec<(NodeId, Value)> {
        let matmuls = batch.matmuls();
        let product = shape_of(graph, matmuls[0], symbols);
        let (programs, views): (Vec<FusedProgram>, Vec<Vec<View>>) = batch
            .members
            .iter()
            .map(|step| match *step {
                Step::MatmulGroup { matmul, group } => {
                    self.group_program(graph, &plan.groups[group], values, &product, Some(matmul))
                }
                _ => (FusedProgram::product(), Vec::new()),
            })
            .unzip();
        if programs.iter().any(|p| *p != programs[0]) {
            let mut produced = Vec::new();
            for &step in &batch.members {
                self.launches += 1;
                produced.extend(self.eval_matmul(graph, plan, step, values, symbols, ctx));
            }
            return produced;
        }
        let mut program = programs[0].clone();
        let order = shared_inputs_first(&mut program, &batch.epilogue_shared);
        let views: Vec<Vec<View>> = views
            .iter()
            .map(|member| order.iter().map(|&p| member[p].clone()).collect())
            .collect();
        let operands: Vec<(Value, Value, (bool, bool))> = matmuls
            .iter()
            .map(|&m| matmul_operands(graph, m, values))
            .collect();
        let out_batch = &product[..product.len() - 2];
        let members: Vec<MatmulOperands> = operands
            .iter()
            .map(|(a, b, transposes)| self.matmul_of((a, b), *transposes, out_batch))
            .collect();
        let layout = OperandLayout {
            members: members.len(),
            shared_a: batch.shared == SharedOperand::Left,
            shared_b: batch.shared == SharedOperand::Right,
        };
        let sum_batch = matches!(batch.members[0], Step::MatmulSum { .. });
        self.launches += 1;
        let outputs = self.kernels.multi_matmul(
            &members, layout, &program, &views, sum_batch, ctx.seed, ctx.step,
        );
        let mut produced = Vec::new();
        for (&step, handles) in batch.members.iter().zip(outputs) {
            let written: Vec<(NodeId, Vec<usize>)> = match step {
                Step::MatmulGroup { group, .. } => plan.groups[group]
                    .outputs
                    .iter()
                    .map(|&id| (id, product.clone()))
                    .collect(),
                Step::MatmulSum { reduce, .. } => {
                    vec![(reduce, product[product.len() - 2..].to_vec())]
                }
                Step::Node(matmul) => vec![(matmul, product.clone())],
                _ => unreachable!("a multi-matmul holds matmul steps"),
            };
            for ((id, shape), handle) in written.into_iter().zip(handles) {
                produced.push((id, Value::contiguous(handle, shape)));
            }
        }
        produced
    }

    /// The kernel's view of a matmul of `a` and `b` (each transposed or not) with
    /// output batch dimensions `out_batch`, in this backend's precision.
    pub(super) fn matmul_of<'v>(
        &self,
        (a, b): (&'v Value, &'v Value),
        (transpose_a, transpose_b): (bool, bool),
        out_batch: &'v [usize],
    ) -> MatmulOperands<'v> {
        MatmulOperands {
            a: &a.view,
            a_shape: &a.shape,
            transpose_a,
            b: &b.view,
            b_shape: &b.shape,
            transpose_b,
            out_batch,
            bf16_operands: self.bf16_matmuls,
        }
    }

    pub(super) fn uninitialised(&self, shape: Vec<usize>) -> Value {
        Value::contiguous(self.kernels.buffer(shape.iter().product()), shape)
    }

    pub(super) fn upload(&self, t: &Tensor) -> Value {
        let values: Vec<f32> = t.to_f64().iter().map(|&v| v as f32).collect();
        Value::contiguous(self.kernels.upload(&values), t.shape.clone())
    }

    pub(super) fn download(&self, v: &Value, dtype: DType) -> Tensor {
        let v = self.materialise(v);
        let n = v.shape.iter().product();
        let data = self.kernels.read(v.view.handle.clone(), n);
        Tensor::from_f64(dtype, &v.shape, data.into_iter().map(f64::from).collect())
    }

    pub(super) fn materialise(&self, v: &Value) -> Value {
        if v.is_contiguous() {
            return v.clone();
        }
        Value::contiguous(
            self.kernels.unary(UnaryKind::Identity, &v.view, &v.shape),
            v.shape.clone(),
        )
    }

    pub(super) fn view_as(&self, v: &Value, shape: &[usize]) -> View {
        // Broadcast `v` to `shape`: right-align, stretched dimensions get stride 0.
        let lead = shape.len() - v.shape.len();
        let strides = (0..shape.len())
            .map(|i| {
                if i < lead || v.shape[i - lead] == 1 {
                    0
                } else {
                    v.view.strides[i - lead]
                }
            })
            .collect();
        View {
            strides,
            ..v.view.clone()
        }
    }
}
