//! The arguments every device command shares: which device, and where tuned
//! kernels live; opening the backend they name.

use altc_compiler::spec::Precision;
use altc_runtime::backend::{Backend, ReferenceBackend, TuningMode};
use altc_runtime::device::DeviceChoice;
use altc_runtime::tuning::Manifest;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when a driver is found, else wgpu.
    Auto,
    Cuda,
    Wgpu,
    /// The reference interpreter (CPU, plain Rust).
    Reference,
}

/// Opens the backend `device` names, saying which one it is.
pub(crate) fn open_backend(
    device: Device,
    precision: Precision,
    fuse: bool,
) -> Result<Box<dyn Backend>> {
    let choice = match device {
        Device::Reference => return Ok(Box::new(ReferenceBackend::default())),
        Device::Auto => DeviceChoice::Auto,
        Device::Cuda => DeviceChoice::Cuda,
        Device::Wgpu => DeviceChoice::Wgpu,
    };
    Ok(altc_runtime::device::open(choice, precision, fuse)?)
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
