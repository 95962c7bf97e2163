//! The `Kernels` handle on one cubecl client: uploads, reads, the tuning policy,
//! buffers, and the grid and argument helpers every family's launch uses.

use crate::autotune::{TunedKernel, Tuning, TuningMode};
use crate::elementwise::ops::{copy_kernel, fill_kernel, iota_kernel, ViewsMeta};
use crate::view::View;
use cubecl::prelude::*;
use cubecl::server::Handle;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Units per cube for one-dimensional launches.
pub(crate) const CUBE_SIZE: u32 = 256;
/// The largest cube count along one grid dimension every backend accepts.
pub(crate) const MAX_GRID: u32 = 65_535;

/// Every kernel launch altc needs, on one client. Buffers hold f32.
pub struct Kernels<R: Runtime> {
    pub(crate) client: ComputeClient<R>,
    /// Immutable buffers by content: a training step launches the same kernels on the
    /// same shapes with the same constants every step, so each is uploaded once.
    uploads: std::sync::Mutex<std::collections::HashMap<Vec<u32>, Handle>>,
    pub(crate) tuning: Tuning,
    /// Kernels launched beyond one per call (a candidate that runs a matmul's
    /// epilogue as kernels of their own), until taken.
    pub(crate) extra_launches: Arc<AtomicUsize>,
}

pub(crate) fn u32s(values: impl IntoIterator<Item = usize>) -> Vec<u32> {
    values
        .into_iter()
        .map(|v| u32::try_from(v).expect("tensor extents and strides fit in 32 bits"))
        .collect()
}

/// One extent, stride or count as a metadata word.
pub(crate) fn word(value: usize) -> u32 {
    u32s([value])[0]
}

/// Bytes of one buffer element: the kernels are instantiated for f32, and indices
/// and masks are held in f32 words too.
pub const ELEMENT_BYTES: usize = std::mem::size_of::<f32>();

/// New device buffers of `sizes` f32 elements each, as (handle, elements).
pub(crate) fn empty_buffers<R: Runtime>(
    client: &ComputeClient<R>,
    sizes: impl IntoIterator<Item = usize>,
) -> Vec<(Handle, usize)> {
    sizes
        .into_iter()
        .map(|len| (client.empty(len * ELEMENT_BYTES), len))
        .collect()
}

/// Buffers as a kernel's sequence of arrays of any element type: (handle, scalar
/// elements).
pub(crate) fn buffer_sequence<R: Runtime, T: LaunchArg<RuntimeArg<R> = ArrayArg<R>>>(
    buffers: impl IntoIterator<Item = (Handle, usize)>,
) -> SequenceArg<R, T> {
    let mut sequence = SequenceArg::new();
    for (handle, len) in buffers {
        sequence.push(unsafe { ArrayArg::from_raw_parts(handle, len.max(1)) });
    }
    sequence
}

/// A buffer `(handle, elements)` as a kernel's array argument.
pub(crate) fn buffer_arg<R: Runtime>((handle, len): &(Handle, usize)) -> ArrayArg<R> {
    unsafe { ArrayArg::from_raw_parts(handle.clone(), (*len).max(1)) }
}

/// Tiles of `edge` needed to cover `extent`, at least one (a launch is never empty).
pub(crate) fn tiles_of(extent: usize, edge: u32) -> u32 {
    word(extent).div_ceil(edge).max(1)
}

pub(crate) fn grid(units: usize) -> (CubeCount, CubeDim) {
    grid_of(units, CUBE_SIZE)
}

/// A one-dimensional launch of `units` units in cubes of `cube`.
pub(crate) fn grid_of(units: usize, cube: u32) -> (CubeCount, CubeDim) {
    let cubes = word(units).div_ceil(cube).max(1);
    let x = cubes.min(MAX_GRID);
    (
        CubeCount::Static(x, cubes.div_ceil(x), 1),
        CubeDim::new_1d(cube),
    )
}

impl<R: Runtime> Kernels<R> {
    pub fn new(client: ComputeClient<R>) -> Self {
        Kernels {
            client,
            uploads: Default::default(),
            tuning: Tuning::default(),
            extra_launches: Default::default(),
        }
    }

    /// Kernels launched beyond one per call since the last time this was asked: what
    /// a caller counting one launch per call must add.
    pub fn take_extra_launches(&self) -> usize {
        self.extra_launches.swap(0, Ordering::Relaxed)
    }

    /// Sets how tunable kernels choose their configuration; `scope` names the device,
    /// driver and altc version the cached choices belong to.
    pub fn set_tuning(&mut self, mode: TuningMode, scope: String) {
        self.tuning = Tuning {
            mode,
            scope,
            decisions: Default::default(),
        };
    }

    pub(crate) fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// The tuning decisions made so far (tuned now or read from the cache), one per
    /// kernel key.
    pub fn tuned_kernels(&self) -> Vec<TunedKernel> {
        self.tuning.decisions.lock().expect("tuning record").clone()
    }

    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }

    pub fn upload(&self, values: &[f32]) -> Handle {
        if values.is_empty() {
            return self.client.empty(4);
        }
        self.client.create_from_slice(f32::as_bytes(values))
    }

    pub fn read(&self, handle: Handle, len: usize) -> Vec<f32> {
        if len == 0 {
            return Vec::new();
        }
        let bytes = self
            .client
            .read_one(handle)
            .expect("reading a device buffer");
        f32::from_bytes(&bytes)[..len].to_vec()
    }

    pub(crate) fn alloc(&self, len: usize) -> Handle {
        self.client.empty(len.max(1) * ELEMENT_BYTES)
    }

    /// A one-element buffer holding `value`, uploaded once per value.
    pub fn constant(&self, value: f32) -> Handle {
        self.upload_once(vec![value.to_bits()]).0
    }

    /// An immutable buffer of these words and its length in words, uploaded once
    /// per content (metadata, and the bits of constants: equal contents may share
    /// one buffer).
    pub(crate) fn upload_once(&self, values: Vec<u32>) -> (Handle, usize) {
        let values = if values.is_empty() { vec![0] } else { values };
        let len = values.len();
        let mut cache = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        let handle = cache
            .entry(values)
            .or_insert_with_key(|v| self.client.create_from_slice(u32::as_bytes(v)))
            .clone();
        (handle, len)
    }

    /// Allocates an uninitialised buffer of `len` elements (filled by `copy_into`).
    pub fn buffer(&self, len: usize) -> Handle {
        self.alloc(len)
    }

    /// Copies `x` (logical `shape`) into `out` at `out_offset` with `out_strides`.
    pub fn copy_into(
        &self,
        x: &View,
        shape: &[usize],
        out: &Handle,
        out_len: usize,
        out_offset: usize,
        out_strides: &[usize],
    ) {
        let n: usize = shape.iter().product();
        if n == 0 {
            return;
        }
        let views = [(x.strides.as_slice(), x.offset), (out_strides, out_offset)];
        let meta = ViewsMeta::words(shape, views.into_iter());
        let (count, dim) = grid(n);
        unsafe {
            copy_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                x.buffer_arg(),
                ArrayArg::from_raw_parts(out.clone(), out_len.max(1)),
                buffer_arg(&self.upload_once(meta)),
                word(n),
                shape.len(),
            )
        };
    }

    pub fn fill(&self, value: f32, len: usize) -> Handle {
        let out = self.alloc(len);
        let (count, dim) = grid(len);
        unsafe {
            fill_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(out.clone(), len),
                value,
            )
        };
        out
    }

    /// Each element's coordinate along `axis` of `shape`.
    pub fn iota(&self, shape: &[usize], axis: usize) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let inner: usize = shape[axis + 1..].iter().product();
        let (count, dim) = grid(n);
        let [inner, size] = [inner, shape[axis]].map(word);
        unsafe {
            iota_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(out.clone(), n),
                inner,
                size,
            )
        };
        out
    }
}
