//! altc's runtime: executing compiled programs. It owns backends (the reference
//! interpreter, and cubecl devices running `altc_kernels`: wgpu, CUDA), paired datasets
//! (loading, batching, the planted generator), the training loop over the schedule's
//! tasks, checkpoints, and retrieval.
//!
//! It reads lowered programs and training graphs from `altc_compiler` and never parses
//! RON specs.

pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod retrieval;
pub mod synth;
pub mod training;

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over
/// `path`, so readers see the old file or the new one, never a torn one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
