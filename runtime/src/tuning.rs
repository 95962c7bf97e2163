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
        let mut stale = Vec::new();
        for k in &entry.kernels {
            if k.candidates == candidates(&k.key.family) {
                found.keys.insert(k.key.clone());
            } else {
                stale.push(format!("`{}`", k.key));
            }
        }
        if !stale.is_empty() {
            let shown = stale.len().min(3);
            let more = if stale.len() > shown {
                format!(" and {} more", stale.len() - shown)
            } else {
                String::new()
            };
            found.notes.push(format!(
                "ignoring {} stale tunings whose candidates changed since they were tuned ({}{more}); run `altc tune` again",
                stale.len(),
                stale[..shown].join(", ")
            ));
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuned(family: &str, signature: &str, candidates: &[&str]) -> TunedKernel {
        TunedKernel {
            key: KernelKey {
                family: family.into(),
                signature: signature.into(),
            },
            candidates: candidates.iter().map(|c| c.to_string()).collect(),
            winner: candidates[0].to_string(),
            tried: candidates.len(),
        }
    }

    #[test]
    fn a_run_uses_only_its_own_scope_and_todays_candidates() {
        let dir = std::env::temp_dir().join(format!("altc-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join(MANIFEST));
        let today = |family: &str| match family {
            "matmul" => vec!["a".to_string(), "b".to_string()],
            _ => Vec::new(),
        };
        Manifest::record(&dir, "here", &[tuned("matmul", "m8", &["a", "b"])]).unwrap();
        Manifest::record(&dir, "here", &[tuned("matmul", "m16", &["a"])]).unwrap();
        Manifest::record(&dir, "elsewhere", &[tuned("matmul", "m8", &["a", "b"])]).unwrap();
        // Re-tuning a key replaces its entry rather than adding a second one.
        let manifest =
            Manifest::record(&dir, "here", &[tuned("matmul", "m8", &["a", "b"])]).unwrap();
        assert_eq!(manifest.scopes[0].kernels.len(), 2);

        let found = Manifest::load(&dir).unwrap().lookup("here", today);
        assert_eq!(found.keys.len(), 1, "only the m8 entry is current");
        assert!(found.keys.iter().all(|k| k.signature == "m8"));
        assert!(
            found.notes.iter().any(|n| n.contains("elsewhere")),
            "{:?}",
            found.notes
        );
        assert!(
            found.notes.iter().any(|n| n.contains("1 stale")),
            "{:?}",
            found.notes
        );

        let foreign = Manifest::load(&dir).unwrap().lookup("new device", today);
        assert!(foreign.keys.is_empty());

        std::fs::write(dir.join(MANIFEST), "{ not json").unwrap();
        let err = Manifest::load(&dir).unwrap_err().to_string();
        assert!(err.contains(MANIFEST) && err.contains("not valid"), "{err}");
    }
}
