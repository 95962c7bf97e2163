//! The tuning cache altc keeps beside cubecl's: cubecl's autotune cache holds each
//! kernel key's winning candidate (one file per tuning scope, under
//! `<dir>/autotune/`); altc's manifest (`<dir>/altc-tuning.json`) records, per
//! scope, which keys `altc tune` tuned and with which candidate list. A run uses a
//! cached choice only when its scope matches this device, driver and altc version and
//! its candidate list is today's; anything else is ignored with a note.

use altc_kernels::{KernelKey, TunedKernel};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const MANIFEST: &str = "altc-tuning.json";

#[derive(Debug, Error)]
pub enum TuningCacheError {
    #[error("reading the tuning manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the tuning manifest {path} is not valid ({source}); delete it or run `altc tune` again"
    )]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing the tuning manifest {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every scope tuned into one cache directory.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub scopes: Vec<ScopeEntry>,
}

/// What was tuned for one device, driver and altc version.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScopeEntry {
    pub scope: String,
    pub kernels: Vec<TunedKernel>,
}

/// The cached choices a run may use, and why others were left out.
#[derive(Debug, Default)]
pub struct CacheLookup {
    pub keys: HashSet<KernelKey>,
    pub notes: Vec<String>,
}

impl Manifest {
    /// The manifest in `dir`; an absent one is empty.
    pub fn load(dir: &Path) -> Result<Manifest, TuningCacheError> {
        let path = dir.join(MANIFEST);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|source| TuningCacheError::Parse { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(source) => Err(TuningCacheError::Read { path, source }),
        }
    }

    /// Adds (or replaces) the decisions of `scope` and writes the manifest atomically,
    /// so an interrupted write leaves the previous manifest whole.
    pub fn record(
        dir: &Path,
        scope: &str,
        decisions: &[TunedKernel],
    ) -> Result<Manifest, TuningCacheError> {
        let mut manifest = Manifest::load(dir)?;
        let entry = match manifest.scopes.iter_mut().find(|s| s.scope == scope) {
            Some(entry) => entry,
            None => {
                manifest.scopes.push(ScopeEntry {
                    scope: scope.to_string(),
                    kernels: Vec::new(),
                });
                manifest.scopes.last_mut().expect("just pushed")
            }
        };
        for d in decisions {
            entry.kernels.retain(|k| k.key != d.key);
            entry.kernels.push(d.clone());
        }
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(&manifest).expect("manifests serialise");
        crate::atomic_write(&path, text.as_bytes())
            .map_err(|source| TuningCacheError::Write { path, source })?;
        Ok(manifest)
    }

    /// The choices `scope` may use: entries of other scopes are foreign, entries
    /// whose candidate list differs from `candidates(family)` are stale.
    pub fn lookup(&self, scope: &str, candidates: impl Fn(&str) -> Vec<String>) -> CacheLookup {
        let mut found = CacheLookup::default();
        let foreign: Vec<&str> = self
            .scopes
            .iter()
            .filter(|s| s.scope != scope)
            .map(|s| s.scope.as_str())
            .collect();
        if !foreign.is_empty() {
            found.notes.push(format!(
                "ignoring tuned kernels for other devices, drivers or altc versions: {}",
                foreign.join(", ")
            ));
        }
        let Some(entry) = self.scopes.iter().find(|s| s.scope == scope) else {
            return found;
        };
        for k in &entry.kernels {
            if k.candidates == candidates(&k.key.family) {
                found.keys.insert(k.key.clone());
            } else {
                found.notes.push(format!(
                    "ignoring the stale tuning of `{}`: its candidates changed since it was tuned",
                    k.key
                ));
            }
        }
        found
    }
}
