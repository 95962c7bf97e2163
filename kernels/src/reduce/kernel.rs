//! Reductions over any set of axes of a strided view. With one lane, one unit per
//! output element walks the reduced elements in order; with `lanes` > 1 a cube per
//! output element splits them across its units and combines the partial results in a
//! fixed tree. Either way results are deterministic.

use crate::device::u32s;
use crate::elementwise::ops::offset_in;
use crate::elementwise::ops::UnaryKind;
use crate::elementwise::ops::{apply_unary, unordered};
use cubecl::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    Sum,
    Mean,
    Max,
    Min,
}

/// The value a reduction starts from.
#[cube]
pub(crate) fn reduce_identity<F: Float>(#[comptime] op: ReduceKind) -> F {
    match op {
        ReduceKind::Sum | ReduceKind::Mean => F::new(0.0),
        ReduceKind::Max => F::min_value(),
        ReduceKind::Min => F::max_value(),
    }
}

#[cube]
pub(crate) fn combine<F: Float>(acc: F, v: F, #[comptime] op: ReduceKind) -> F {
    match op {
        ReduceKind::Sum | ReduceKind::Mean => acc + v,
        // Unordered (one side NaN): `v + acc` is NaN, so NaN propagates as in the
        // reference.
        ReduceKind::Max => select(unordered::<F>(v, acc), v + acc, select(v > acc, v, acc)),
        ReduceKind::Min => select(unordered::<F>(v, acc), v + acc, select(v < acc, v, acc)),
    }
}

/// The output element this unit works on and its lane: with one lane each unit owns
/// an element; otherwise each cube does (the whole cube agrees on it).
#[cube]
pub(crate) fn reduce_position(#[comptime] lanes: u32) -> (u32, u32) {
    if comptime![lanes == 1] {
        (ABSOLUTE_POS as u32, 0u32)
    } else {
        (CUBE_POS as u32, UNIT_POS)
    }
}

/// Combines each lane's partial result across the cube (`lanes` a power of two, the
/// cube's size) in a fixed tree; every unit gets the total.
#[cube]
pub(crate) fn combine_lanes<F: Float>(
    acc: F,
    #[comptime] lanes: u32,
    #[comptime] op: ReduceKind,
) -> F {
    let mut total = acc;
    if comptime![lanes > 1] {
        let mut partial = SharedMemory::<F>::new(lanes as usize);
        partial[UNIT_POS as usize] = acc;
        sync_cube();
        // The cube's size is `lanes`; read at run time so the loop variable can change.
        let mut stride = CUBE_DIM / 2;
        while stride > 0 {
            if UNIT_POS < stride {
                partial[UNIT_POS as usize] = combine::<F>(
                    partial[UNIT_POS as usize],
                    partial[(UNIT_POS + stride) as usize],
                    op,
                );
            }
            sync_cube();
            stride /= 2;
        }
        total = partial[0];
    }
    total
}

/// A reduction's metadata, which every reduce kernel reads first (after a fused
/// program's `ViewsMeta` when it has one). The layout lives here only: `words` writes
/// it; `kept_offset`, `reduced_offset` and `reduced_stride` read it. From where it
/// starts: the kept axes' extents and their strides (`kept` words each), then the
/// reduced axes' extents and their strides (`reduced` words each); `len` words in all,
/// after which each kernel puts its own (offsets, counts).
pub(crate) struct ReduceMeta;

impl ReduceMeta {
    /// The layout of a reduction of `shape` (read through `strides`) keeping axes
    /// `kept` and reducing `reduced`.
    pub fn words(
        shape: &[usize],
        strides: &[usize],
        kept: &[usize],
        reduced: &[usize],
    ) -> Vec<u32> {
        let mut words = Vec::with_capacity(Self::len(kept.len(), reduced.len()));
        for axes in [kept, reduced] {
            words.extend(u32s(axes.iter().map(|&a| shape[a])));
            words.extend(u32s(axes.iter().map(|&a| strides[a])));
        }
        words
    }

    pub const fn len(kept: usize, reduced: usize) -> usize {
        2 * kept + 2 * reduced
    }
}

/// Where output `pos`'s reduced elements start, for the `ReduceMeta` at `at`.
#[cube]
pub(crate) fn kept_offset(pos: u32, meta: &Array<u32>, at: u32, #[comptime] kept: usize) -> u32 {
    offset_in(pos, meta, at, at + kept as u32, kept)
}

/// Where reduced element `r` lies from its output's start, for the `ReduceMeta` at `at`.
#[cube]
pub(crate) fn reduced_offset(
    r: u32,
    meta: &Array<u32>,
    at: u32,
    #[comptime] kept: usize,
    #[comptime] reduced: usize,
) -> u32 {
    let extents = at + comptime!(2 * kept) as u32;
    offset_in(r, meta, extents, extents + reduced as u32, reduced)
}

/// The stride of reduced axis `axis`, for the `ReduceMeta` at `at`.
#[cube]
pub(crate) fn reduced_stride(
    meta: &Array<u32>,
    at: u32,
    #[comptime] kept: usize,
    #[comptime] reduced: usize,
    #[comptime] axis: usize,
) -> u32 {
    meta[at as usize + comptime!(2 * kept + reduced + axis)]
}

/// `meta`: a `ReduceMeta`, then x's offset and the number of reduced elements.
#[cube(launch_unchecked)]
pub(crate) fn reduce_kernel<F: Float>(
    x: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] kept: usize,
    #[comptime] reduced: usize,
    #[comptime] op: ReduceKind,
    #[comptime] lanes: u32,
) {
    let (pos, lane) = reduce_position(lanes);
    if pos < out.len() as u32 {
        let tail = comptime!(ReduceMeta::len(kept, reduced));
        let (offset, count) = (meta[tail], meta[tail + 1]);
        let base = kept_offset(pos, meta, 0u32, kept) + offset;
        let mut acc = reduce_identity::<F>(op);
        let mut r = lane;
        while r < count {
            let v = x[(base + reduced_offset(r, meta, 0u32, kept, reduced)) as usize];
            acc = combine::<F>(acc, v, op);
            r += lanes;
        }
        acc = combine_lanes::<F>(acc, lanes, op);
        let result = match op {
            ReduceKind::Mean => acc / F::cast_from(count),
            _ => acc,
        };
        if lane == 0 {
            out[pos as usize] = result;
        }
    }
}

/// The same reduction over `segments` contiguous buffers (after the unary
/// `prologue`, such as squares for gradient norms), in one kernel: output element `o`
/// of segment `s` lands at `out[s * outputs + o]`. `meta`: a `ReduceMeta` (shared: the
/// buffers have one shape, or are each reduced whole as one flat axis), the outputs
/// per segment, each segment's count of reduced elements, then each segment's offset
/// in its buffer. With one lane a unit computes an output; otherwise a cube of
/// `lanes`.
#[cube(launch_unchecked)]
// The kernel language has no iterators: comptime lists are walked by index.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
pub(crate) fn multi_reduce_kernel<F: Float>(
    inputs: &Sequence<Array<F>>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] prologue: Vec<UnaryKind>,
    #[comptime] segments: usize,
    #[comptime] kept: usize,
    #[comptime] reduced: usize,
    #[comptime] op: ReduceKind,
    #[comptime] lanes: u32,
) {
    let (pos, lane) = reduce_position(lanes);
    let tail = comptime!(ReduceMeta::len(kept, reduced));
    let outputs = meta[tail];
    if pos < outputs * segments as u32 {
        let segment = pos / outputs;
        let (counts, offsets) = (tail + 1, tail + 1 + segments);
        let count = meta[counts + segment as usize];
        let base = meta[offsets + segment as usize] + kept_offset(pos % outputs, meta, 0u32, kept);
        let mut acc = reduce_identity::<F>(op);
        #[unroll]
        for s in 0..segments {
            if segment == s as u32 {
                let x = inputs.index(s);
                let mut r = lane;
                while r < count {
                    let at = base + reduced_offset(r, meta, 0u32, kept, reduced);
                    let mut v = x[at as usize];
                    #[unroll]
                    for p in 0..comptime!(prologue.len()) {
                        v = apply_unary::<F>(v, comptime!(prologue[p]));
                    }
                    acc = combine::<F>(acc, v, op);
                    r += lanes;
                }
            }
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
