//! Finding and opening a device: CUDA when a driver answers, else wgpu (Vulkan),
//! and what each device reports of itself for `altc doctor`.

use super::state::DeviceBackend;
use crate::backend::{Backend, BackendError};
use altc_compiler::spec::Precision;
use cubecl::prelude::*;

/// Which device to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when a driver is found, else wgpu.
    Auto,
    Cuda,
    Wgpu,
}

/// Opens the chosen device, or says plainly why it cannot. With `Precision::Bf16`,
/// CUDA runs matmuls on bf16 operands with f32 accumulation while parameters,
/// optimizer state and every other op stay f32 (autocast); wgpu (lavapipe has no
/// bf16) computes in f32.
///
/// `fuse: false` runs one kernel per op: the unoptimised baseline (`--no-opt`).
pub fn open(
    choice: DeviceChoice,
    precision: Precision,
    fuse: bool,
) -> Result<Box<dyn Backend>, BackendError> {
    let bf16 = precision == Precision::Bf16;
    match choice {
        DeviceChoice::Cuda => open_cuda(bf16, fuse),
        DeviceChoice::Wgpu => open_wgpu(fuse),
        DeviceChoice::Auto => open_cuda(bf16, fuse).or_else(|cuda| {
            open_wgpu(fuse)
                .map_err(|wgpu| BackendError::Unavailable(format!("no device: {cuda}; {wgpu}")))
        }),
    }
}

/// Creating a client panics inside the driver bindings when no device exists; probe
/// it on a quiet panic hook so a missing device is an error, not a crash.
pub(super) fn probe<T>(
    what: &str,
    make: impl FnOnce() -> T + std::panic::UnwindSafe,
) -> Result<T, BackendError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(make);
    std::panic::set_hook(hook);
    result.map_err(|e| {
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let why = why.lines().next().unwrap_or("").to_string();
        BackendError::Unavailable(format!("{what} is not available ({why})"))
    })
}

pub(super) fn open_cuda(bf16_matmuls: bool, fuse: bool) -> Result<Box<dyn Backend>, BackendError> {
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    // The driver bindings fail on another thread without a useful message when there
    // is no driver at all, so look for the kernel driver first.
    if !cuda_driver_present() {
        return Err(BackendError::Unavailable(
            "CUDA is not available (no NVIDIA driver: /proc/driver/nvidia/version is missing)"
                .into(),
        ));
    }
    let client = probe("CUDA", || CudaRuntime::client(&CudaDevice::default()))?;
    let driver = std::fs::read_to_string("/proc/driver/nvidia/version").unwrap_or_default();
    let identity = format!("cuda {}", driver.lines().next().unwrap_or("unknown driver"));
    Ok(Box::new(
        DeviceBackend::<CudaRuntime>::new(client, "cuda", bf16_matmuls)
            .fused(fuse)
            .identified_as(identity),
    ))
}

pub(super) fn open_wgpu(fuse: bool) -> Result<Box<dyn Backend>, BackendError> {
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    let adapters = vulkan_adapter_infos();
    let client = probe("wgpu (Vulkan)", || {
        WgpuRuntime::client(&WgpuDevice::default())
    })?;
    Ok(Box::new(
        DeviceBackend::<WgpuRuntime>::new(client, "wgpu", false)
            .fused(fuse)
            .in_host_memory(cpu_only(&adapters).and_then(|_| crate::host::host_memory_bytes()))
            .identified_as(format!("wgpu {}", describe_adapters(&adapters))),
    ))
}

/// The Vulkan adapters present: what cubecl's default wgpu device is chosen from.
/// Listing them is the first use of Vulkan, so Mesa's runtime directory is set first.
fn vulkan_adapter_infos() -> Vec<wgpu::AdapterInfo> {
    crate::host::ensure_runtime_dir();
    let instance = wgpu::Instance::default();
    let adapters = cubecl::future::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
    adapters.iter().map(|a| a.get_info()).collect()
}

/// The adapters with their drivers, for the tuning scope.
fn describe_adapters(adapters: &[wgpu::AdapterInfo]) -> String {
    let names: Vec<String> = adapters
        .iter()
        .map(|info| format!("{} {} {}", info.name, info.driver, info.driver_info))
        .collect();
    if names.is_empty() {
        "unknown adapter".into()
    } else {
        names.join("; ")
    }
}

/// The first adapter's name when every one runs on the CPU.
fn cpu_only(adapters: &[wgpu::AdapterInfo]) -> Option<String> {
    let all_cpu = !adapters.is_empty()
        && adapters
            .iter()
            .all(|i| i.device_type == wgpu::DeviceType::Cpu);
    all_cpu.then(|| adapters[0].name.clone())
}

/// Whether CUDA has a driver here (what `DeviceChoice::Auto` tries first).
pub fn cuda_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
}

/// The name of the Vulkan device when every one present runs on the CPU (Mesa's
/// lavapipe), so that wgpu would compute in host memory on the CPU; `None` when
/// a GPU is among them or there is none.
pub fn vulkan_is_cpu_only() -> Option<String> {
    cpu_only(&vulkan_adapter_infos())
}

/// What one client reports: plane sizes, shared memory, element types.
pub(super) fn client_report<R: Runtime>(client: &ComputeClient<R>) -> String {
    let props = client.properties();
    let hw = &props.hardware;
    let dtypes: Vec<&str> = [
        ("f32", f32::as_type_native_unchecked()),
        ("f16", half::f16::as_type_native_unchecked()),
        ("bf16", half::bf16::as_type_native_unchecked()),
        ("f64", f64::as_type_native_unchecked()),
    ]
    .into_iter()
    .filter(|(_, t)| props.supports_type(*t))
    .map(|(name, _)| name)
    .collect();
    format!(
        "  plane size {}..{}, shared memory {} KiB per cube, up to {} units per cube, {} buffers per kernel, {} per buffer\n  element types: {}\n",
        hw.plane_size_min,
        hw.plane_size_max,
        hw.max_shared_memory_size / 1024,
        hw.max_units_per_cube,
        hw.max_bindings,
        crate::backend::Bytes(props.memory.max_page_size),
        dtypes.join(", ")
    )
}

/// A report of every cubecl device altc can see, and why the others are missing.
pub fn describe_devices() -> String {
    crate::host::ensure_runtime_dir();
    let mut out = String::new();
    match std::fs::read_to_string("/proc/driver/nvidia/version") {
        Ok(version) => {
            out.push_str(&format!(
                "cuda: NVIDIA driver: {}\n",
                version.lines().next().unwrap_or("").trim()
            ));
            use cubecl::cuda::{CudaDevice, CudaRuntime};
            match probe("CUDA", || CudaRuntime::client(&CudaDevice::default())) {
                Ok(client) => {
                    out.push_str("  client: ok (NVRTC compiles kernels at first use)\n");
                    out.push_str(&client_report(&client));
                }
                Err(e) => out.push_str(&format!("  {e}\n")),
            }
        }
        Err(_) => out.push_str(
            "cuda: not available (no NVIDIA driver: /proc/driver/nvidia/version is missing)\n",
        ),
    }
    use cubecl::wgpu::{init_setup, AutoGraphicsApi, RuntimeOptions, WgpuDevice, WgpuRuntime};
    match probe("wgpu", || {
        init_setup::<AutoGraphicsApi>(&WgpuDevice::default(), RuntimeOptions::default())
    }) {
        Ok(setup) => {
            let info = setup.adapter.get_info();
            out.push_str(&format!(
                "wgpu: {} ({:?}, {:?}), driver {} {}\n",
                info.name, info.backend, info.device_type, info.driver, info.driver_info
            ));
            let client = WgpuRuntime::client(&WgpuDevice::default());
            out.push_str(&client_report(&client));
        }
        Err(e) => out.push_str(&format!(
            "wgpu: {e}; on Debian install mesa-vulkan-drivers and libvulkan1 (scripts/setup.sh)\n"
        )),
    }
    out
}
