//! Launching single elementwise ops: the unfused baseline's kernels.

use crate::device::{buffer_arg, grid, Kernels};
use crate::elementwise::ops::{
    binary_kernel, select_kernel, unary_kernel, BinaryKind, UnaryKind, ViewsMeta,
};
use crate::view::View;
use cubecl::prelude::*;
use cubecl::server::Handle;

impl<R: Runtime> Kernels<R> {
    /// `op` of every element of `x` (read through its view) into a new `shape` buffer.
    pub fn unary(&self, op: UnaryKind, x: &View, shape: &[usize]) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let meta = ViewsMeta::of_views(shape, [x].into_iter());
        let (count, dim) = grid(n);
        unsafe {
            unary_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                x.buffer_arg(),
                ArrayArg::from_raw_parts(out.clone(), n),
                buffer_arg(&self.upload_once(meta)),
                shape.len(),
                op,
            )
        };
        out
    }

    pub fn binary(&self, op: BinaryKind, a: &View, b: &View, shape: &[usize]) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let meta = ViewsMeta::of_views(shape, [a, b].into_iter());
        let (count, dim) = grid(n);
        unsafe {
            binary_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                a.buffer_arg(),
                b.buffer_arg(),
                ArrayArg::from_raw_parts(out.clone(), n),
                buffer_arg(&self.upload_once(meta)),
                shape.len(),
                op,
            )
        };
        out
    }

    pub fn select(&self, cond: &View, a: &View, b: &View, shape: &[usize]) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let meta = ViewsMeta::of_views(shape, [cond, a, b].into_iter());
        let (count, dim) = grid(n);
        unsafe {
            select_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                cond.buffer_arg(),
                a.buffer_arg(),
                b.buffer_arg(),
                ArrayArg::from_raw_parts(out.clone(), n),
                buffer_arg(&self.upload_once(meta)),
                shape.len(),
            )
        };
        out
    }
}
