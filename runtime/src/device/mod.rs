//! cubecl devices: choosing one, and executing IR graphs on it op by op with the
//! kernels of `altc_kernels`. Layout ops (transpose, broadcast, slice, reshape of a
//! contiguous buffer) become strided views and launch nothing; every other op is one
//! kernel launch. Intermediate buffers are released after their last use.
//!
//! `open` finds and opens devices, `state` holds what lives on one and implements
//! `Backend`, `execute` walks a plan, `kernels` launches its steps, and `translate`
//! turns IR into the kernels' programs and kinds.

mod execute;
mod kernels;
mod open;
mod state;
mod translate;

pub use open::{cuda_driver_present, describe_devices, open, vulkan_is_cpu_only, DeviceChoice};
pub use state::DeviceBackend;

// The planner's byte counts (peak, bytes moved) and the buffers the kernels allocate
// describe the same 4-byte words.
const _: () = assert!(
    altc_kernels::ELEMENT_BYTES as u64 == altc_compiler::fusion::cost::DEVICE_ELEMENT_BYTES
);
