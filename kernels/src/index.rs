//! Index kernels: gather and scatter-add along an axis (PyTorch semantics), and top-k
//! indices along the last axis. Indices travel as whole numbers in `F`.

use crate::device::{buffer_arg, grid, u32s, word, Kernels};
use crate::elementwise::ops::{view_offset, view_stride, ViewsMeta};
use crate::view::View;
use cubecl::prelude::*;
use cubecl::server::Handle;

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

/// `out[c] = x[c with c[axis] = index[c]]`. `meta`: the `ViewsMeta` of out's (=
/// index's) shape, index and x, then the axis.
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
        let axis = meta[comptime!(ViewsMeta::len(rank, 2))];
        let index_strides = comptime!(ViewsMeta::strides_at(rank, 0)) as u32;
        let x_strides = comptime!(ViewsMeta::strides_at(rank, 1)) as u32;
        let (along, index_rest) = split_axis(pos as u32, meta, index_strides, axis, rank);
        let index_step = view_stride(meta, 0u32, axis, rank, 0usize);
        let at = index_rest + along * index_step + view_offset(meta, 0u32, rank, 2usize, 0usize);
        let i = u32::cast_from(index[at as usize]);
        let (_unused, x_rest) = split_axis(pos as u32, meta, x_strides, axis, rank);
        let x_step = view_stride(meta, 0u32, axis, rank, 1usize);
        out[pos] =
            x[(x_rest + i * x_step + view_offset(meta, 0u32, rank, 2usize, 1usize)) as usize];
    }
}

/// `out[c] = sum over j of src[c with c[axis] = j] where index[c with c[axis] = j] ==
/// c[axis]`: each output element gathers its contributions, so duplicates add up
/// deterministically without atomics. `meta`: the `ViewsMeta` of out's shape, index
/// and src, then the axis and the index's extent along it.
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
        let extras = comptime!(ViewsMeta::len(rank, 2));
        let (axis, extent) = (meta[extras], meta[extras + 1]);
        let index_strides = comptime!(ViewsMeta::strides_at(rank, 0)) as u32;
        let src_strides = comptime!(ViewsMeta::strides_at(rank, 1)) as u32;
        let (target, index_rest) = split_axis(pos as u32, meta, index_strides, axis, rank);
        let (_unused, src_rest) = split_axis(pos as u32, meta, src_strides, axis, rank);
        let index_step = view_stride(meta, 0u32, axis, rank, 0usize);
        let src_step = view_stride(meta, 0u32, axis, rank, 1usize);
        let index_base = index_rest + view_offset(meta, 0u32, rank, 2usize, 0usize);
        let src_base = src_rest + view_offset(meta, 0u32, rank, 2usize, 1usize);
        let mut acc = F::new(0.0);
        for j in 0..extent {
            let i = u32::cast_from(index[(index_base + j * index_step) as usize]);
            if i == target {
                acc += src[(src_base + j * src_step) as usize];
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
impl<R: Runtime> Kernels<R> {
    /// PyTorch `gather` along `axis`; the result has the index's `shape`.
    pub fn gather(&self, x: &View, index: &View, axis: usize, shape: &[usize]) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let mut meta = ViewsMeta::of_views(shape, [index, x].into_iter());
        meta.extend(u32s([axis]));
        let (count, dim) = grid(n);
        unsafe {
            gather_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                x.buffer_arg(),
                index.buffer_arg(),
                ArrayArg::from_raw_parts(out.clone(), n),
                buffer_arg(&self.upload_once(meta)),
                shape.len(),
            )
        };
        out
    }

    /// Zeros of `shape`, then `out[.., index[.., j, ..], ..] += src[.., j, ..]`;
    /// `extent` is the index's size along `axis`.
    pub fn scatter_add(
        &self,
        index: &View,
        src: &View,
        axis: usize,
        extent: usize,
        shape: &[usize],
    ) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let mut meta = ViewsMeta::of_views(shape, [index, src].into_iter());
        meta.extend(u32s([axis, extent]));
        let (count, dim) = grid(n);
        unsafe {
            scatter_add_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                index.buffer_arg(),
                src.buffer_arg(),
                ArrayArg::from_raw_parts(out.clone(), n),
                buffer_arg(&self.upload_once(meta)),
                shape.len(),
            )
        };
        out
    }

    /// Indices of the `k` largest of each of `rows` contiguous rows of `n`.
    pub fn top_k(&self, x: &Handle, rows: usize, n: usize, k: usize) -> Handle {
        let out = self.alloc(rows * k);
        let (count, dim) = grid(rows);
        let [n32, k32] = [n, k].map(word);
        unsafe {
            top_k_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(x.clone(), (rows * n).max(1)),
                ArrayArg::from_raw_parts(out.clone(), (rows * k).max(1)),
                n32,
                k32,
            )
        };
        out
    }
}
