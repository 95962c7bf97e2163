//! Index kernels: gather and scatter-add along an axis (PyTorch semantics), and top-k
//! indices along the last axis. Indices travel as whole numbers in `F`.

use cubecl::prelude::*;

/// Coordinate of linear `pos` along `axis` of the shape at `meta[0..rank]`, and the
/// offset of `pos` in the strides at `meta[strides_at..]` with that axis left out.
#[cube]
fn split_axis(
    pos: u32,
    meta: &Array<u32>,
    strides_at: u32,
    axis: u32,
    #[comptime] rank: usize,
) -> (u32, u32) {
    let mut rem = pos;
    let mut offset = 0u32;
    let mut along = 0u32;
    #[unroll]
    for i in 0..rank {
        let a = rank - 1 - i;
        let dim = meta[a];
        let coord = rem % dim;
        rem /= dim;
        if a as u32 == axis {
            along = coord;
        } else {
            offset += coord * meta[strides_at as usize + a];
        }
    }
    (along, offset)
}

/// `out[c] = x[c with c[axis] = index[c]]`. `meta`: out (= index) shape, index
/// strides, x strides, axis, index offset, x offset.
#[cube(launch_unchecked)]
pub(crate) fn gather_kernel<F: Float>(
    x: &Array<F>,
    index: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] rank: usize,
) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let axis = meta[3 * rank];
        let (along, index_rest) = split_axis(pos as u32, meta, rank as u32, axis, rank);
        let at = index_rest + along * meta[rank + axis as usize] + meta[3 * rank + 1];
        let i = u32::cast_from(index[at as usize]);
        let (_unused, x_rest) = split_axis(pos as u32, meta, 2 * rank as u32, axis, rank);
        out[pos] = x[(x_rest + i * meta[2 * rank + axis as usize] + meta[3 * rank + 2]) as usize];
    }
}

/// `out[c] = sum over j of src[c with c[axis] = j] where index[c with c[axis] = j] ==
/// c[axis]`: each output element gathers its contributions, so duplicates add up
/// deterministically without atomics. `meta`: out shape, index strides, src strides,
/// axis, extent of the index along the axis, index offset, src offset.
#[cube(launch_unchecked)]
pub(crate) fn scatter_add_kernel<F: Float>(
    index: &Array<F>,
    src: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] rank: usize,
) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let axis = meta[3 * rank];
        let extent = meta[3 * rank + 1];
        let (target, index_rest) = split_axis(pos as u32, meta, rank as u32, axis, rank);
        let (_unused, src_rest) = split_axis(pos as u32, meta, 2 * rank as u32, axis, rank);
        let index_step = meta[rank + axis as usize];
        let src_step = meta[2 * rank + axis as usize];
        let mut acc = F::new(0.0);
        for j in 0..extent {
            let i =
                u32::cast_from(index[(index_rest + j * index_step + meta[3 * rank + 2]) as usize]);
            if i == target {
                acc += src[(src_rest + j * src_step + meta[3 * rank + 3]) as usize];
            }
        }
        out[pos] = acc;
    }
}

/// Indices of the `k` largest of each contiguous row of `n`, largest first, ties to
/// the lower index: each pick is the best element ordered after the previous pick.
#[cube(launch_unchecked)]
pub(crate) fn top_k_kernel<F: Float>(x: &Array<F>, out: &mut Array<F>, n: u32, k: u32) {
    let row = ABSOLUTE_POS as u32;
    if row * k < out.len() as u32 {
        let mut prev_v = F::new(0.0);
        let mut prev_i = 0u32;
        for t in 0..k {
            let mut best_v = F::new(0.0);
            let mut best_i = n;
            for i in 0..n {
                let v = x[(row * n + i) as usize];
                let after = t == 0 || v < prev_v || (v == prev_v && i > prev_i);
                if after && (best_i == n || v > best_v) {
                    best_v = v;
                    best_i = i;
                }
            }
            out[(row * k + t) as usize] = F::cast_from(best_i);
            prev_v = best_v;
            prev_i = best_i;
        }
    }
}
