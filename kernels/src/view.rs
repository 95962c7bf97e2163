//! Strided views of device buffers: how every kernel reads its operands, so that
//! broadcasting, transposition and slicing cost no copies.

use cubecl::server::Handle;

/// A strided view of a device buffer: element `c` of the logical tensor is at
/// `offset + sum(c[i] * strides[i])`. A broadcast dimension has stride 0.
#[derive(Clone, Debug)]
pub struct View {
    pub handle: Handle,
    /// Elements in the buffer.
    pub len: usize,
    pub offset: usize,
    pub strides: Vec<usize>,
}

impl View {
    /// The whole buffer as a kernel argument (strides and offset travel as metadata).
    pub(crate) fn buffer_arg<R: cubecl::Runtime>(&self) -> cubecl::prelude::ArrayArg<R> {
        crate::device::buffer_arg(&(self.handle.clone(), self.len))
    }

    /// A contiguous row-major view of `shape`.
    pub fn contiguous(handle: Handle, shape: &[usize]) -> View {
        View {
            handle,
            len: shape.iter().product(),
            offset: 0,
            strides: contiguous_strides(shape),
        }
    }
}

pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}
