//! The arguments every device command shares: which device, and where tuned
//! kernels live; opening the backend they name.

use altc_compiler::spec::Precision;
use altc_runtime::backend::{Backend, BackendError, ReferenceBackend, TuningMode};
use altc_runtime::device::DeviceChoice;
use altc_runtime::tuning::Manifest;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

/// Where to run.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when a driver is found; else wgpu, except that `run`, `eval`, `embed`
    /// and `retrieve` take the reference interpreter for a small model (under
    /// 1,000,000 parameters) when the only Vulkan device is a CPU (Mesa
    /// lavapipe), where the interpreter is faster.
    Auto,
    /// An NVIDIA GPU through CUDA.
    Cuda,
    /// A Vulkan device through wgpu (lavapipe on a machine without a GPU).
    Wgpu,
    /// The reference interpreter (CPU, plain Rust).
    Reference,
}

/// Below this many parameters, a step is too small for lavapipe's per-kernel cost
/// to pay off: `altc run` of the tiny model for 100 steps took 1.4 s on the
/// interpreter, 4.5 s on lavapipe with tuned kernels and 13.5 s untuned (2 cores).
pub(crate) const SMALL_MODEL_PARAMETERS: usize = 1_000_000;

/// Opens the backend `device` names and says on stderr which one it is (and, for
/// `auto`, why). `parameters` is the model's size where the interpreter may serve
/// `auto` (`None`: a device with kernels is needed, as for tuning).
pub(crate) fn open_backend(
    device: Device,
    precision: Precision,
    fuse: bool,
    parameters: Option<usize>,
) -> Result<Box<dyn Backend>> {
    let open = |choice| altc_runtime::device::open(choice, precision, fuse);
    let (backend, why): (Box<dyn Backend>, Option<String>) = match device {
        Device::Reference => (Box::new(ReferenceBackend::default()), None),
        Device::Cuda => (open(DeviceChoice::Cuda)?, None),
        Device::Wgpu => (open(DeviceChoice::Wgpu)?, None),
        Device::Auto => {
            let (backend, why) = open_auto(parameters, open)?;
            (backend, Some(why))
        }
    };
    match why {
        Some(why) => eprintln!("device: {} (auto: {why})", backend.describe()),
        None => eprintln!("device: {}", backend.describe()),
    }
    Ok(backend)
}

/// Opens the backend to run `program` on (training, evaluation, serving): its
/// precision, and its size for `auto`'s choice.
pub(crate) fn open_backend_for(
    device: Device,
    program: &altc_compiler::lower::Program,
    fuse: bool,
) -> Result<Box<dyn Backend>> {
    let parameters = Some(program.params.total_count());
    open_backend(device, program.training.precision, fuse, parameters)
}

/// Opens what `--device auto` runs on, and says why.
fn open_auto(
    parameters: Option<usize>,
    open: impl Fn(DeviceChoice) -> Result<Box<dyn Backend>, BackendError>,
) -> Result<(Box<dyn Backend>, String)> {
    use altc_runtime::device::{cuda_driver_present, vulkan_is_cpu_only};
    let no_cuda = if cuda_driver_present() {
        match open(DeviceChoice::Cuda) {
            Ok(cuda) => return Ok((cuda, "a CUDA driver is present".into())),
            Err(e) => format!("CUDA did not open ({e})"),
        }
    } else {
        "no CUDA driver".to_string()
    };
    // Only a small model asks whether wgpu would run on the CPU.
    if let Some(n) = parameters.filter(|&n| n < SMALL_MODEL_PARAMETERS) {
        if let Some(cpu) = vulkan_is_cpu_only() {
            let why = format!(
                "{no_cuda}, and the only Vulkan device is the CPU ({cpu}): a model of {} parameters runs faster on the interpreter; --device wgpu runs it there",
                altc_compiler::summary::thousands(n)
            );
            return Ok((Box::new(ReferenceBackend::default()), why));
        }
    }
    let wgpu =
        open(DeviceChoice::Wgpu).map_err(|e| anyhow::anyhow!("no device: {no_cuda}; {e}"))?;
    Ok((wgpu, format!("{no_cuda}; wgpu (Vulkan) is next")))
}

/// Where tuned choices live: cubecl's autotune cache and altc's manifest.
#[derive(Args, Clone)]
pub struct TuneCacheArgs {
    /// The tuning cache directory [default: $XDG_CACHE_HOME/altc/tune, or
    /// ~/.cache/altc/tune].
    #[arg(long, env = "ALTC_TUNE_CACHE")]
    pub tune_cache: Option<PathBuf>,
}

impl TuneCacheArgs {
    pub fn dir(&self) -> PathBuf {
        self.tune_cache.clone().unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir);
            base.join("altc").join("tune")
        })
    }

    /// Points cubecl's persistent autotune cache at this directory; must run before
    /// any device is opened (cubecl reads its configuration once).
    pub fn configure_cubecl(&self) -> Result<PathBuf> {
        use cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
        let dir = self.dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the tuning cache {}", dir.display()))?;
        let mut config = CubeClRuntimeConfig::default();
        config.autotune.cache = CacheConfig::File(dir.clone());
        CubeClRuntimeConfig::set(config);
        Ok(dir)
    }
}

/// Switches `backend` to the kernels tuned for it in `dir`, printing why any cached
/// choice is not used; returns how many tuned kernels it will use.
pub fn use_tuned_kernels(backend: &mut dyn Backend, dir: &Path) -> Result<usize> {
    let Some(scope) = backend.tuning_scope() else {
        return Ok(0);
    };
    let manifest = Manifest::load(dir)?;
    let found = manifest.lookup(&scope, altc_runtime::backend::candidates);
    for note in &found.notes {
        eprintln!("note: {note}");
    }
    let count = found.keys.len();
    if count > 0 {
        eprintln!("using {count} tuned kernels from {}", dir.display());
        backend.set_tuning(TuningMode::Cached(found.keys));
    }
    Ok(count)
}
