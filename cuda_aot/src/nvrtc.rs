//! NVRTC, found without a CUDA installation, and what it reports of a kernel.
//!
//! The library is loaded through cudarc, as cubecl-cuda loads it. cudarc looks it up
//! by name; a library altc finds elsewhere (the wheels `scripts/setup.sh` unpacks, a
//! toolkit, `ALTC_NVRTC`) is opened by its path first, and the dynamic loader then
//! answers cudarc's lookup of its soname with the library already loaded. Kernels are
//! compiled to a cubin for the real architecture with `--ptxas-options=-v`, so NVRTC
//! runs ptxas itself and its log carries registers, spills and shared memory: nothing
//! but libnvrtc and the CUDA headers is needed.

use crate::target::CudaTarget;
use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;
use thiserror::Error;

#[derive(Debug, Error, Clone)]
pub enum NvrtcError {
    #[error(
        "libnvrtc (NVRTC 12) was not found (looked in: {looked}). It needs no GPU or driver: \
         install the PyPI wheels `nvidia-cuda-nvrtc-cu12` and `nvidia-cuda-runtime-cu12` \
         (`bash scripts/setup.sh` unpacks them into {cache}) or a CUDA 12 toolkit, or set \
         ALTC_NVRTC to libnvrtc.so.12"
    )]
    LibraryMissing { looked: String, cache: String },
    #[error(
        "the CUDA headers (cuda_bf16.h, from the PyPI wheel `nvidia-cuda-runtime-cu12` or a \
         CUDA toolkit) were not found (looked in: {looked}); set ALTC_CUDA_INCLUDE to their folder"
    )]
    HeadersMissing { looked: String },
}

/// A loaded NVRTC and the CUDA headers kernels include.
#[derive(Debug, Clone)]
pub struct Nvrtc {
    pub library: String,
    pub include: PathBuf,
    pub version: (i32, i32),
}

/// Where `scripts/setup.sh` unpacks the NVRTC and CUDA runtime wheels.
pub fn wheel_cache() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("altc").join("cuda")
}

/// Folders a CUDA installation may be in, most specific first.
fn cuda_roots() -> Vec<PathBuf> {
    let mut roots = vec![wheel_cache().join("nvidia")];
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(p) = std::env::var_os(var) {
            roots.push(PathBuf::from(p));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

fn library_candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(p) = std::env::var_os("ALTC_NVRTC").map(PathBuf::from) {
        paths.push(if p.is_dir() {
            p.join("libnvrtc.so.12")
        } else {
            p
        });
    }
    for root in cuda_roots() {
        paths.push(root.join("cuda_nvrtc/lib/libnvrtc.so.12"));
        paths.push(root.join("lib64/libnvrtc.so.12"));
    }
    paths
}

fn include_candidates() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::env::var_os("ALTC_CUDA_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    for root in cuda_roots() {
        paths.push(root.join("cuda_runtime/include"));
        paths.push(root.join("include"));
    }
    paths
}

fn listed(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

impl Nvrtc {
    /// Finds and loads NVRTC and the headers, once per process.
    pub fn load() -> Result<&'static Nvrtc, NvrtcError> {
        static LOADED: OnceLock<Result<Nvrtc, NvrtcError>> = OnceLock::new();
        LOADED
            .get_or_init(Nvrtc::find)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn find() -> Result<Nvrtc, NvrtcError> {
        let candidates = library_candidates();
        let mut library = None;
        for path in candidates.iter().filter(|p| p.is_file()) {
            // SAFETY: loading libnvrtc runs no initialisers with preconditions; the
            // handle is kept for the process's life, so cudarc's symbols stay valid.
            if let Ok(lib) = unsafe { libloading::Library::new(path) } {
                std::mem::forget(lib);
                library = Some(path.display().to_string());
                break;
            }
        }
        // SAFETY: a lookup by name, as cudarc itself does before its first call.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(NvrtcError::LibraryMissing {
                looked: format!("{}, and the loader's search path", listed(&candidates)),
                cache: wheel_cache().display().to_string(),
            });
        }
        let library = library.unwrap_or_else(|| "libnvrtc.so.12 on the loader's path".into());
        let headers = include_candidates();
        let include = headers
            .iter()
            .find(|p| p.join("cuda_bf16.h").is_file())
            .cloned()
            .ok_or_else(|| NvrtcError::HeadersMissing {
                looked: listed(&headers),
            })?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-parameters, as nvrtcVersion documents.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        Ok(Nvrtc {
            library,
            include,
            version: (major, minor),
        })
    }

    /// The NVRTC options cubecl-cuda compiles with for `target`, and ptxas's report.
    pub fn options(&self, target: CudaTarget) -> Vec<String> {
        vec![
            format!("--gpu-architecture={}", target.name()),
            format!("--include-path={}", self.include.display()),
            "-lineinfo".into(),
            "--ptxas-options=-v".into(),
        ]
    }

    /// Compiles CUDA C++ for `target`: ptxas's report, or NVRTC's log on failure.
    pub fn compile(&self, source: &str, target: CudaTarget) -> Result<PtxasReport, String> {
        use cudarc::nvrtc::result;
        let source = CString::new(source).map_err(|e| format!("source: {e}"))?;
        let program = result::create_program(&source, None).map_err(|e| format!("{e:?}"))?;
        let options = self.options(target);
        // SAFETY: `program` is live until destroyed below; the log is copied out.
        unsafe {
            let compiled = result::compile_program(program, &options);
            let log = result::get_program_log(program)
                .map(|raw| CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned())
                .unwrap_or_default();
            let _ = result::destroy_program(program);
            match compiled {
                Ok(()) => Ok(PtxasReport::parse(&log)),
                Err(e) => Err(format!("{e:?}\n{log}")),
            }
        }
    }
}

/// The first error of an NVRTC log (`kernel.cu(12): error: ...`).
pub fn first_error(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("error"))
        .or_else(|| log.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .trim()
}

/// What ptxas says of a compiled entry point.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PtxasReport {
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_frame: u32,
    pub static_shared: u32,
    pub barriers: u32,
}

impl PtxasReport {
    /// Reads ptxas's `-v` lines; each kernel has one entry point.
    pub fn parse(log: &str) -> PtxasReport {
        let number_before = |line: &str, what: &str| -> Option<u32> {
            let at = line.find(what)?;
            line[..at].split_whitespace().last()?.parse().ok()
        };
        let mut r = PtxasReport::default();
        for line in log.lines().filter(|l| l.starts_with("ptxas")) {
            let fields = [
                ("registers", &mut r.registers),
                ("bytes smem", &mut r.static_shared),
                ("barriers", &mut r.barriers),
                ("bytes stack frame", &mut r.stack_frame),
                ("bytes spill stores", &mut r.spill_stores),
                ("bytes spill loads", &mut r.spill_loads),
            ];
            for (what, field) in fields {
                if let Some(n) = number_before(line, what) {
                    *field = n;
                }
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_lines_give_registers_spills_and_shared_memory() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
            ptxas info    : Function properties for k\n\
            ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem\n";
        assert_eq!(
            PtxasReport::parse(log),
            PtxasReport {
                registers: 40,
                spill_stores: 4,
                spill_loads: 12,
                stack_frame: 8,
                static_shared: 2048,
                barriers: 1,
            }
        );
    }

    #[test]
    fn the_first_error_line_is_quoted() {
        let log = "k.cu(3): warning: unused\nk.cu(9): error: identifier \"s\" is undefined\n";
        assert_eq!(
            first_error(log),
            "k.cu(9): error: identifier \"s\" is undefined"
        );
    }
}
