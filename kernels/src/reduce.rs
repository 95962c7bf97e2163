//! Reductions over any set of axes of a strided view: one unit per output element
//! walks the reduced elements in order, so results are deterministic.

pub(crate) use crate::elementwise::offset_in;
use crate::elementwise::unordered;
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

/// `meta`: kept shape (`kept` dims), kept strides, reduced shape (`reduced` dims),
/// reduced strides, x offset, number of reduced elements.
#[cube(launch_unchecked)]
pub(crate) fn reduce_kernel<F: Float>(
    x: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] kept: usize,
    #[comptime] reduced: usize,
    #[comptime] op: ReduceKind,
) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let tail = 2 * kept + 2 * reduced;
        let base = offset_in(pos as u32, meta, 0, kept as u32, kept) + meta[tail];
        let count = meta[tail + 1];
        let mut acc = reduce_identity::<F>(op);
        for r in 0..count {
            let v = x[(base
                + offset_in(
                    r,
                    meta,
                    2 * kept as u32,
                    (2 * kept + reduced) as u32,
                    reduced,
                )) as usize];
            acc = combine::<F>(acc, v, op);
        }
        let result = match op {
            ReduceKind::Mean => acc / F::cast_from(count),
            _ => acc,
        };
        out[pos] = result;
    }
}
