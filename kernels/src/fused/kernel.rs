//! Fused elementwise kernels: one launch evaluates a whole group of elementwise ops.
//! The group's op list is comptime data, so each distinct group compiles once into
//! straight-line code over registers; operands are loaded through their own strided
//! (broadcast) views, and only the group's outputs are written.

use crate::device::u32s;
use crate::elementwise::ops::{apply_binary, apply_unary, shape_extent, view_at, ViewsMeta};
use crate::elementwise::ops::{BinaryKind, UnaryKind};
use crate::reduce::kernel::ReduceKind;
use crate::reduce::kernel::{
    combine, combine_lanes, kept_offset, reduce_identity, reduce_position, reduced_offset,
    reduced_stride, ReduceMeta,
};
use cubecl::prelude::*;

/// One step of a fused program; operands name earlier registers (one per step).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FusedOp {
    /// Reads input `index` through its view.
    Load {
        input: usize,
    },
    /// The value a matmul computed for this element (the program is its epilogue).
    Accumulator,
    /// The element's coordinate along `axis` of the program's shape.
    Iota {
        axis: usize,
    },
    /// An f32 constant, stored as its bits so the program stays `Eq + Hash`.
    Constant {
        bits: u32,
    },
    Unary {
        op: UnaryKind,
        a: usize,
    },
    Binary {
        op: BinaryKind,
        a: usize,
        b: usize,
    },
    /// `c != 0 ? a : b`.
    Select {
        c: usize,
        a: usize,
        b: usize,
    },
    /// Inverted dropout of register `a` with the Philox stream `stream`, keyed by the
    /// element's position in the group's shape.
    Dropout {
        a: usize,
        rate_bits: u32,
        stream: u32,
    },
}

/// A fused program: its steps, and which registers are written to the outputs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FusedProgram {
    pub ops: Vec<FusedOp>,
    pub outputs: Vec<usize>,
    pub rank: usize,
    pub inputs: usize,
    /// Outputs (indices into `outputs`) that are scalars computed alongside the
    /// program's shape, such as an optimizer's step count: written once, by element
    /// 0, into a one-element buffer.
    pub scalar_outputs: Vec<usize>,
    /// Outputs (indices into `outputs`) holding one value per row of the program's
    /// shape (its last axis), such as a norm's statistics computed alongside the
    /// elements that read them: written by each row's first element.
    pub row_outputs: Vec<usize>,
    /// In a multi-tensor launch, inputs `0..shared_inputs` are the same buffers for
    /// every tensor and bound once; the others are bound per tensor. Zero otherwise.
    pub shared_inputs: usize,
}

impl FusedProgram {
    /// The empty epilogue: a matmul writes its product.
    pub fn product() -> FusedProgram {
        FusedProgram {
            outputs: vec![0],
            ..FusedProgram::default()
        }
    }

    /// Elements output `o` holds when the program runs over `elements` in `rows`
    /// rows: one for a scalar, one per row for a row output, every element else.
    pub(crate) fn output_len(&self, o: usize, elements: usize, rows: usize) -> usize {
        if self.scalar_outputs.contains(&o) {
            1
        } else if self.row_outputs.contains(&o) {
            rows.max(1)
        } else {
            elements.max(1)
        }
    }

    /// The binding (index into the kernel's input sequence) of `input` when the
    /// program runs for tensor `segment` of a multi-tensor launch.
    pub(crate) fn binding(&self, input: usize, segment: usize) -> usize {
        if input < self.shared_inputs {
            input
        } else {
            input + segment * (self.inputs - self.shared_inputs)
        }
    }
}

/// Evaluates every step of `program` for the element at linear position `pos` of the
/// group's shape; returns the registers. `meta` holds, from `meta_at`, the group's
/// shape, each input's strides and each input's offset. `segment` is the tensor of a
/// multi-tensor launch (0 otherwise), which picks the input buffers.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_program<F: Float>(
    inputs: &Sequence<Array<F>>,
    meta: &Array<u32>,
    meta_at: u32,
    #[comptime] segment: usize,
    pos: u32,
    accumulator: F,
    seed_lo: u32,
    seed_hi: u32,
    rng_step: u32,
    #[comptime] program: FusedProgram,
) -> Sequence<F> {
    let rank = comptime!(program.rank);
    let n_inputs = comptime!(program.inputs);
    let mut regs = Sequence::<F>::new();
    #[unroll]
    for step in 0usize..comptime!(program.ops.len()) {
        let op = comptime!(program.ops[step].clone());
        let value = match op {
            FusedOp::Load { input } => {
                let at = view_at(pos, meta, meta_at, rank, n_inputs, input);
                let source = inputs.index(comptime!(program.binding(input, segment)));
                source[at as usize]
            }
            FusedOp::Accumulator => accumulator,
            FusedOp::Iota { axis } => {
                // Peel coordinates off the last axis until `axis`.
                let mut rem = pos;
                #[unroll]
                for d in 0..comptime!(rank - 1 - axis) {
                    rem /= shape_extent(meta, meta_at, comptime!(rank - 1 - d));
                }
                F::cast_from(rem % shape_extent(meta, meta_at, axis))
            }
            FusedOp::Constant { bits } => F::new(comptime!(f32::from_bits(bits))),
            FusedOp::Unary { op, a } => apply_unary::<F>(*regs.index(a), op),
            FusedOp::Binary { op, a, b } => apply_binary::<F>(*regs.index(a), *regs.index(b), op),
            FusedOp::Select { c, a, b } => select(
                *regs.index(c) != F::new(0.0),
                *regs.index(a),
                *regs.index(b),
            ),
            FusedOp::Dropout {
                a,
                rate_bits,
                stream,
            } => {
                let rate = comptime!(f32::from_bits(rate_bits));
                let keep = crate::random::keeps::<F>(
                    pos,
                    seed_lo,
                    seed_hi,
                    rng_step,
                    stream,
                    F::new(rate),
                );
                select(
                    keep,
                    *regs.index(a) * F::new(comptime!(1.0 / (1.0 - rate))),
                    F::new(0.0),
                )
            }
        };
        regs.push(value);
    }
    regs
}

/// Writes the registers a program outputs for the element at `pos`, which lies in
/// row `row` (its first element when `row_start`): scalar outputs by element 0, row
/// outputs by each row's first element, the others at `pos`. Output `o` is bound at
/// `first + o` (a multi-tensor launch binds each tensor's outputs in turn).
#[cube]
fn write_outputs<F: Float>(
    outputs: &mut Sequence<Array<F>>,
    regs: &Sequence<F>,
    pos: u32,
    row: u32,
    row_start: bool,
    #[comptime] first: usize,
    #[comptime] program: FusedProgram,
) {
    #[unroll]
    for o in 0usize..comptime!(program.outputs.len()) {
        let out = outputs.index_mut(comptime!(first + o));
        let value = *regs.index(comptime!(program.outputs[o]));
        if comptime![program.scalar_outputs.contains(&o)] {
            if pos == 0 {
                out[0] = value;
            }
        } else if comptime![program.row_outputs.contains(&o)] {
            if row_start {
                out[row as usize] = value;
            }
        } else {
            out[pos as usize] = value;
        }
    }
}

/// `meta`: the group's shape, each input's strides, each input's offset. The dropout
/// key (seed, step) comes as scalars, so the metadata is the same every step. Each
/// unit computes `per_unit` elements, one per pass over the grid.
#[cube(launch_unchecked)]
pub(crate) fn fused_kernel<F: Float>(
    inputs: &Sequence<Array<F>>,
    outputs: &mut Sequence<Array<F>>,
    meta: &Array<u32>,
    seed_lo: u32,
    seed_hi: u32,
    rng_step: u32,
    #[comptime] program: FusedProgram,
    #[comptime] per_unit: u32,
) {
    let mut len = 1u32;
    #[unroll]
    for d in 0..program.rank {
        len *= shape_extent(meta, 0u32, d);
    }
    #[unroll]
    for i in 0..per_unit {
        // Consecutive units touch consecutive elements in each pass.
        let pos = i * CUBE_COUNT as u32 * CUBE_DIM + ABSOLUTE_POS as u32;
        if pos < len {
            let regs = run_program::<F>(
                inputs,
                meta,
                0u32,
                0usize,
                pos,
                F::new(0.0),
                seed_lo,
                seed_hi,
                rng_step,
                program.clone(),
            );
            // Rows are the last axis; a program without row outputs needs none.
            let mut row_len = 1u32;
            if comptime![!program.row_outputs.is_empty()] {
                row_len = shape_extent(meta, 0u32, comptime!(program.rank - 1));
            }
            let row = pos / row_len;
            write_outputs::<F>(
                outputs,
                &regs,
                pos,
                row,
                row * row_len == pos,
                0usize,
                program.clone(),
            );
        }
    }
}

/// A multi-tensor launch's segment table, after its segments' own metadata: each
/// segment's first position in the launch's combined range, then the range's end.
/// `segment_table` writes it; `segment_range` and `range_end` read it.
pub(crate) fn segment_table(lens: impl IntoIterator<Item = usize>) -> Vec<u32> {
    let mut start = 0;
    let mut table = Vec::new();
    for len in lens {
        table.extend(u32s([start]));
        start += len;
    }
    table.extend(u32s([start]));
    table
}

/// Segment `s`'s positions, `start..end`, from the table at `table`.
#[cube]
pub(crate) fn segment_range(
    meta: &Array<u32>,
    #[comptime] table: usize,
    #[comptime] s: usize,
) -> (u32, u32) {
    (meta[table + s], meta[table + s + 1])
}

/// The end of the combined range, from the table at `table`.
#[cube]
pub(crate) fn range_end(
    meta: &Array<u32>,
    #[comptime] table: usize,
    #[comptime] segments: usize,
) -> u32 {
    meta[table + segments]
}

/// One fused program over several tensors ("segments") of different sizes in one
/// launch, each read and written flat: segment `s`'s inputs (past the shared ones)
/// and outputs are bound after those of the segments before it. `meta` holds, per
/// segment, the program metadata of a rank-1 program (its length, each input's stride,
/// 1 or 0, and offset), then each segment's first position in the launch's combined
/// range and the range's end.
#[cube(launch_unchecked)]
pub(crate) fn multi_fused_kernel<F: Float>(
    inputs: &Sequence<Array<F>>,
    outputs: &mut Sequence<Array<F>>,
    meta: &Array<u32>,
    #[comptime] program: FusedProgram,
    #[comptime] segments: usize,
    #[comptime] per_unit: u32,
) {
    let segment_meta = comptime!(ViewsMeta::len(1, program.inputs));
    let starts = comptime!(segments * segment_meta);
    let total = range_end(meta, starts, segments);
    let n_outputs = comptime!(program.outputs.len());
    #[unroll]
    for i in 0..per_unit {
        let pos = i * CUBE_COUNT as u32 * CUBE_DIM + ABSOLUTE_POS as u32;
        if pos < total {
            #[unroll]
            for s in 0usize..segments {
                let (start, end) = segment_range(meta, starts, s);
                if pos >= start && pos < end {
                    let local = pos - start;
                    let regs = run_program::<F>(
                        inputs,
                        meta,
                        comptime!(s * segment_meta) as u32,
                        s,
                        local,
                        F::new(0.0),
                        0u32,
                        0u32,
                        0u32,
                        program.clone(),
                    );
                    // Flat tensors: every element is a row of its own.
                    write_outputs::<F>(
                        outputs,
                        &regs,
                        local,
                        local,
                        true,
                        comptime!(s * n_outputs),
                        program.clone(),
                    );
                }
            }
        }
    }
}

/// A reduction along the last axis followed by a fused program (its epilogue) over
/// the reduction's operand shape that reads each row's reduced value as its
/// accumulator: a unit, or a cube of `lanes`, per row reduces the row from `x`, then
/// evaluates the program on every element of that row (row outputs are written by
/// the row's first element). After the program's outputs come, with
/// `write_reduced`, the reduced values (when other kernels read them too), then with
/// `top_k` each row's top-k indices and values of one output (one unit per row). `meta` continues after the
/// program's part with the reduction's kept shape and strides, reduced shape and
/// strides (in `x`), `x`'s offset, the row length and the number of rows.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn reduce_epilogue_kernel<F: Float>(
    x: &Array<F>,
    inputs: &Sequence<Array<F>>,
    outputs: &mut Sequence<Array<F>>,
    meta: &Array<u32>,
    seed_lo: u32,
    seed_hi: u32,
    rng_step: u32,
    #[comptime] program: FusedProgram,
    #[comptime] kept: usize,
    #[comptime] op: ReduceKind,
    #[comptime] lanes: u32,
    #[comptime] write_reduced: bool,
    #[comptime] top_k: RowTopK,
) {
    let (row, lane) = reduce_position(lanes);
    let at = comptime!(ViewsMeta::len(program.rank, program.inputs)) as u32;
    // The row's best `top_k.k` values of one output and their indices, best first;
    // an index of `count` marks an empty slot.
    let k = comptime!(top_k.k.max(1));
    let mut best_v = Array::<F>::new(k);
    let mut best_i = Array::<u32>::new(k);
    // After the one-axis reduction's layout: x's offset, the count, the rows.
    let tail = at as usize + comptime!(ReduceMeta::len(kept, 1));
    let (offset, count, rows) = (meta[tail], meta[tail + 1], meta[tail + 2]);
    let step = reduced_stride(meta, at, kept, 1usize, 0usize);
    if row < rows {
        let base = offset + kept_offset(row, meta, at, kept);
        let mut acc = reduce_identity::<F>(op);
        let mut r = lane;
        while r < count {
            acc = combine::<F>(acc, x[(base + r * step) as usize], op);
            r += lanes;
        }
        acc = combine_lanes::<F>(acc, lanes, op);
        if comptime![op == ReduceKind::Mean] {
            acc /= F::cast_from(count);
        }
        let n_outputs = comptime!(program.outputs.len());
        // Two conditions: the comptime one decides whether the code exists at all.
        #[allow(clippy::collapsible_if)]
        if comptime![write_reduced] {
            if lane == 0 {
                let reduced = outputs.index_mut(n_outputs);
                reduced[row as usize] = acc;
            }
        }
        let mut r = lane;
        while r < count {
            let pos = row * count + r;
            let regs = run_program::<F>(
                inputs,
                meta,
                0u32,
                0usize,
                pos,
                acc,
                seed_lo,
                seed_hi,
                rng_step,
                program.clone(),
            );
            write_outputs::<F>(outputs, &regs, pos, row, r == 0, 0usize, program.clone());
            if comptime![top_k.k > 0] {
                // Insert into the sorted list; a later equal value never passes an
                // earlier one, so ties go to the lower index.
                if r == 0 {
                    for j in 0..k {
                        best_i[j] = count;
                    }
                }
                let mut v = *regs.index(comptime!(program.outputs[top_k.output]));
                let mut i = r;
                for j in 0..k {
                    if i != count && (best_i[j] == count || v > best_v[j]) {
                        let (held_v, held_i) = (best_v[j], best_i[j]);
                        best_v[j] = v;
                        best_i[j] = i;
                        v = held_v;
                        i = held_i;
                    }
                }
            }
            r += lanes;
        }
        if comptime![top_k.k > 0] {
            let first = comptime!(n_outputs + usize::from(write_reduced));
            for j in 0..k {
                let at = (row * k as u32 + j as u32) as usize;
                let indices = outputs.index_mut(first);
                indices[at] = F::cast_from(best_i[j]);
                let values = outputs.index_mut(comptime!(first + 1));
                values[at] = best_v[j];
            }
        }
    }
}

/// A top-k over the rows of one output of a reduction's epilogue, taken as the
/// epilogue computes them (the router: softmax, then its top-k, in one kernel). `k`
/// 0 for none. Needs one unit per row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RowTopK {
    pub output: usize,
    pub k: usize,
}

/// A reduction whose operand is a fused elementwise program (its prologue): each
/// reduced element is computed in registers and never written. The program has one
/// output; `meta` continues after the program's part with the kept shape and its
/// strides in the program's shape, the reduced shape and its strides, and the count.
#[cube(launch_unchecked)]
pub(crate) fn fused_reduce_kernel<F: Float>(
    inputs: &Sequence<Array<F>>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    seed_lo: u32,
    seed_hi: u32,
    rng_step: u32,
    #[comptime] program: FusedProgram,
    #[comptime] kept: usize,
    #[comptime] reduced: usize,
    #[comptime] op: ReduceKind,
    #[comptime] lanes: u32,
) {
    let (pos, lane) = reduce_position(lanes);
    if pos < out.len() as u32 {
        let at = comptime!(ViewsMeta::len(program.rank, program.inputs)) as u32;
        let base = kept_offset(pos, meta, at, kept);
        let count = meta[at as usize + comptime!(ReduceMeta::len(kept, reduced))];
        let output = comptime!(program.outputs[0]);
        let mut acc = reduce_identity::<F>(op);
        let mut r = lane;
        while r < count {
            let element = base + reduced_offset(r, meta, at, kept, reduced);
            let regs = run_program::<F>(
                inputs,
                meta,
                0u32,
                0usize,
                element,
                F::new(0.0),
                seed_lo,
                seed_hi,
                rng_step,
                program.clone(),
            );
            acc = combine::<F>(acc, *regs.index(output), op);
            r += lanes;
        }
        acc = combine_lanes::<F>(acc, lanes, op);
        if lane == 0 {
            out[pos as usize] = match op {
                ReduceKind::Mean => acc / F::cast_from(count),
                _ => acc,
            };
        }
    }
}
