//! Fused elementwise programs over vectors of consecutive elements (a tuning
//! candidate): each unit loads, computes and stores `N` elements at once, so memory
//! moves in wide accesses (128 bits for four f32). Only programs whose every input is
//! either contiguous with the program's elements or one value can run this way: no
//! positions (iotas, dropout), no epilogue accumulator, no row or scalar outputs.

use crate::elementwise::ops::{binary_lanes, unary_lanes};
use crate::fused::kernel::{range_end, segment_range, FusedOp, FusedProgram};
use cubecl::prelude::*;

/// A fused program as the vector kernel runs it: which inputs are one value
/// (`scalar`, bound as plain arrays) and which are read in vectors.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct VectorProgram {
    pub program: FusedProgram,
    pub scalar: Vec<bool>,
}

impl VectorProgram {
    /// Whether `program` has the form the vector kernel runs (its inputs' layouts
    /// are checked by the caller).
    pub fn runs(program: &FusedProgram) -> bool {
        program.scalar_outputs.is_empty()
            && program.row_outputs.is_empty()
            && program.ops.iter().all(|op| {
                !matches!(
                    op,
                    FusedOp::Iota { .. } | FusedOp::Dropout { .. } | FusedOp::Accumulator
                )
            })
    }

    /// The binding of `input` for tensor `segment`, among the inputs whose
    /// `scalar` flag is `of_scalars`: the shared ones first, then each tensor's own.
    pub fn binding(&self, input: usize, segment: usize, of_scalars: bool) -> usize {
        let shared = self.program.shared_inputs;
        let kind =
            |range: std::ops::Range<usize>| range.filter(|&i| self.scalar[i] == of_scalars).count();
        if input < shared {
            kind(0..input)
        } else {
            kind(0..shared) + segment * kind(shared..self.program.inputs) + kind(shared..input)
        }
    }
}

/// Evaluates `vp`'s program on vector `pos` of tensor `segment`; returns the
/// registers. `meta` from `meta_at` holds each input's offset: in vectors for
/// inputs read in vectors, in elements for one-value inputs.
#[cube]
fn run_vector_program<F: Float, N: Size>(
    vectors: &Sequence<Array<Vector<F, N>>>,
    scalars: &Sequence<Array<F>>,
    meta: &Array<u32>,
    meta_at: u32,
    #[comptime] segment: usize,
    pos: u32,
    #[comptime] vp: VectorProgram,
) -> Sequence<Vector<F, N>> {
    let mut regs = Sequence::<Vector<F, N>>::new();
    #[unroll]
    for step in 0usize..comptime!(vp.program.ops.len()) {
        let op = comptime!(vp.program.ops[step].clone());
        let value = match op {
            FusedOp::Load { input } => {
                let offset = meta[meta_at as usize + input];
                if comptime![vp.scalar[input]] {
                    let source = scalars.index(comptime!(vp.binding(input, segment, true)));
                    Vector::<F, N>::new(source[offset as usize])
                } else {
                    let source = vectors.index(comptime!(vp.binding(input, segment, false)));
                    source[(offset + pos) as usize]
                }
            }
            FusedOp::Constant { bits } => {
                Vector::<F, N>::new(F::new(comptime!(f32::from_bits(bits))))
            }
            FusedOp::Unary { op, a } => unary_lanes::<F, N>(*regs.index(a), op),
            FusedOp::Binary { op, a, b } => {
                binary_lanes::<F, N>(*regs.index(a), *regs.index(b), op)
            }
            FusedOp::Select { c, a, b } => select_many(
                regs.index(c).not_equal(Vector::<F, N>::new(F::new(0.0))),
                *regs.index(a),
                *regs.index(b),
            ),
            // `VectorProgram::runs` keeps positions and accumulators out.
            _ => Vector::<F, N>::new(F::new(0.0)),
        };
        regs.push(value);
    }
    regs
}

/// One fused program over `segments` tensors in vectors of `N` elements, a unit per
/// vector. `meta` holds, per tensor, each input's offset (see `run_vector_program`),
/// then each tensor's first vector in the launch's combined range and the range's
/// end. Outputs are bound per tensor, contiguous.
#[cube(launch_unchecked)]
pub(crate) fn vector_fused_kernel<F: Float, N: Size>(
    vectors: &Sequence<Array<Vector<F, N>>>,
    scalars: &Sequence<Array<F>>,
    outputs: &mut Sequence<Array<Vector<F, N>>>,
    meta: &Array<u32>,
    #[comptime] vp: VectorProgram,
    #[comptime] segments: usize,
) {
    let inputs = comptime!(vp.program.inputs);
    let starts = comptime!(segments * inputs);
    let total = range_end(meta, starts, segments);
    let n_outputs = comptime!(vp.program.outputs.len());
    let pos = ABSOLUTE_POS as u32;
    if pos < total {
        #[unroll]
        for s in 0usize..segments {
            let (start, end) = segment_range(meta, starts, s);
            if pos >= start && pos < end {
                let local = pos - start;
                let regs = run_vector_program::<F, N>(
                    vectors,
                    scalars,
                    meta,
                    comptime!(s * inputs) as u32,
                    s,
                    local,
                    vp.clone(),
                );
                #[unroll]
                for o in 0usize..n_outputs {
                    let out = outputs.index_mut(comptime!(s * n_outputs + o));
                    out[local as usize] = *regs.index(comptime!(vp.program.outputs[o]));
                }
            }
        }
    }
}
