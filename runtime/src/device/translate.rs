//! Translating IR into the kernels' terms: fused programs from fusion groups, matmul
//! operands, and the kernels' op kinds from IR ops.

use super::state::{DeviceBackend, Value};
use altc_compiler::fusion::{self, FusionGroup};
use altc_compiler::ir::{BinaryOp, CompareOp, DType, Graph, NodeId, Op, ReduceOp, UnaryOp};
use altc_kernels::{BinaryKind, FusedOp, FusedProgram, ReduceKind, UnaryKind, View};
use cubecl::prelude::*;
use std::collections::HashMap;

impl<R: Runtime> DeviceBackend<R> {
    /// The fused program of a group and the views of its external inputs, broadcast
    /// to the group's shape; constants are inlined.
    pub(super) fn group_program(
        &self,
        graph: &Graph,
        group: &FusionGroup,
        values: &[Option<Value>],
        shape: &[usize],
        accumulator: Option<NodeId>,
    ) -> (FusedProgram, Vec<View>) {
        let mut program = FusedProgram {
            rank: shape.len(),
            ..FusedProgram::default()
        };
        let mut register: HashMap<NodeId, usize> = HashMap::new();
        let mut inputs: Vec<View> = Vec::new();
        for &member in &group.nodes {
            let mut regs = Vec::new();
            for o in graph.operands(member) {
                let r = match register.get(&o) {
                    Some(&r) => r,
                    None => {
                        let op = match &graph.node(o).op {
                            _ if Some(o) == accumulator => FusedOp::Accumulator,
                            Op::Constant { value, .. } => FusedOp::Constant {
                                bits: (value.0 as f32).to_bits(),
                            },
                            _ => {
                                let value = values[o.index()]
                                    .as_ref()
                                    .expect("external operands are evaluated first");
                                inputs.push(self.view_as(value, shape));
                                FusedOp::Load {
                                    input: inputs.len() - 1,
                                }
                            }
                        };
                        program.ops.push(op);
                        register.insert(o, program.ops.len() - 1);
                        program.ops.len() - 1
                    }
                };
                regs.push(r);
            }
            let op = match &graph.node(member).op {
                Op::Unary(u) => FusedOp::Unary {
                    op: unary_kind(*u),
                    a: regs[0],
                },
                Op::Binary(b) => FusedOp::Binary {
                    op: binary_kind(*b),
                    a: regs[0],
                    b: regs[1],
                },
                Op::Compare(c) => FusedOp::Binary {
                    op: compare_kind(*c),
                    a: regs[0],
                    b: regs[1],
                },
                Op::Where => FusedOp::Select {
                    c: regs[0],
                    a: regs[1],
                    b: regs[2],
                },
                Op::Cast { dtype } => FusedOp::Unary {
                    op: cast_kind(*dtype),
                    a: regs[0],
                },
                Op::Iota { axis, .. } => FusedOp::Iota { axis: *axis },
                Op::Dropout { rate, stream } => FusedOp::Dropout {
                    a: regs[0],
                    rate_bits: (rate.0 as f32).to_bits(),
                    stream: *stream as u32,
                },
                other => unreachable!("the planner fuses only elementwise ops, not {other}"),
            };
            program.ops.push(op);
            register.insert(member, program.ops.len() - 1);
        }
        program.outputs = group.outputs.iter().map(|o| register[o]).collect();
        if !shape.is_empty() {
            program.scalar_outputs = (0..group.outputs.len())
                .filter(|&o| graph.node(group.outputs[o]).ty.shape.rank() == 0)
                .collect();
            let group_shape = group.shape(graph);
            program.row_outputs = (0..group.outputs.len())
                .filter(|&o| fusion::is_row_of(&graph.node(group.outputs[o]).ty.shape, group_shape))
                .collect();
        }
        program.inputs = inputs.len();
        (program, inputs)
    }

    /// The shape of output `o` of a group's `program` run over `shape`: a scalar, one
    /// value per row, or `shape`.
    pub(super) fn output_shape(program: &FusedProgram, o: usize, shape: &[usize]) -> Vec<usize> {
        if program.scalar_outputs.contains(&o) {
            Vec::new()
        } else if program.row_outputs.contains(&o) {
            let mut rows = shape.to_vec();
            if let Some(last) = rows.last_mut() {
                *last = 1;
            }
            rows
        } else {
            shape.to_vec()
        }
    }
}

/// Renumbers `program`'s loads so that the inputs at positions `shared` (the same
/// for every tensor of a multi-tensor launch, bound once) come first; returns the
/// positions in their new order.
pub(super) fn shared_inputs_first(program: &mut FusedProgram, shared: &[usize]) -> Vec<usize> {
    let order: Vec<usize> = shared
        .iter()
        .copied()
        .chain((0..program.inputs).filter(|p| !shared.contains(p)))
        .collect();
    for op in &mut program.ops {
        if let FusedOp::Load { input } = op {
            *input = order
                .iter()
                .position(|p| p == input)
                .expect("every input is placed");
        }
    }
    program.shared_inputs = shared.len();
    order
}

/// A planned matmul's operand values and transpose flags.
pub(super) fn matmul_operands(
    graph: &Graph,
    matmul: NodeId,
    values: &[Option<Value>],
) -> (Value, Value, (bool, bool)) {
    let Op::MatMul {
        transpose_a,
        transpose_b,
    } = graph.node(matmul).op
    else {
        unreachable!("the planner folds only matmuls into matmul steps")
    };
    let operand = |i: usize| {
        values[graph.operands(matmul)[i].index()]
            .clone()
            .expect("operands come first")
    };
    (operand(0), operand(1), (transpose_a, transpose_b))
}

pub(super) fn cast_kind(dtype: DType) -> UnaryKind {
    match dtype {
        DType::I32 => UnaryKind::Trunc,
        DType::Bool => UnaryKind::NonZero,
        DType::F32 | DType::F64 => UnaryKind::Identity,
    }
}

pub(super) fn unary_kind(u: UnaryOp) -> UnaryKind {
    match u {
        UnaryOp::Neg => UnaryKind::Neg,
        UnaryOp::Abs => UnaryKind::Abs,
        UnaryOp::Exp => UnaryKind::Exp,
        UnaryOp::Log => UnaryKind::Log,
        UnaryOp::Sqrt => UnaryKind::Sqrt,
        UnaryOp::Rsqrt => UnaryKind::Rsqrt,
        UnaryOp::Recip => UnaryKind::Recip,
        UnaryOp::Square => UnaryKind::Square,
        UnaryOp::Tanh => UnaryKind::Tanh,
        UnaryOp::Sigmoid => UnaryKind::Sigmoid,
        UnaryOp::Relu => UnaryKind::Relu,
        UnaryOp::Erf => UnaryKind::Erf,
        UnaryOp::Gelu => UnaryKind::Gelu,
        UnaryOp::Silu => UnaryKind::Silu,
    }
}

pub(super) fn binary_kind(b: BinaryOp) -> BinaryKind {
    match b {
        BinaryOp::Add => BinaryKind::Add,
        BinaryOp::Sub => BinaryKind::Sub,
        BinaryOp::Mul => BinaryKind::Mul,
        BinaryOp::Div => BinaryKind::Div,
        BinaryOp::Max => BinaryKind::Max,
        BinaryOp::Min => BinaryKind::Min,
        BinaryOp::Pow => BinaryKind::Pow,
    }
}

pub(super) fn compare_kind(c: CompareOp) -> BinaryKind {
    match c {
        CompareOp::Lt => BinaryKind::Lt,
        CompareOp::Le => BinaryKind::Le,
        CompareOp::Gt => BinaryKind::Gt,
        CompareOp::Ge => BinaryKind::Ge,
        CompareOp::Eq => BinaryKind::Eq,
        CompareOp::Ne => BinaryKind::Ne,
    }
}

pub(super) fn reduce_kind(r: ReduceOp) -> ReduceKind {
    match r {
        ReduceOp::Sum => ReduceKind::Sum,
        ReduceOp::Mean => ReduceKind::Mean,
        ReduceOp::Max => ReduceKind::Max,
        ReduceOp::Min => ReduceKind::Min,
    }
}
