//! The compiled artifact `altc compile` writes and `altc run`/`altc inspect` read: a
//! versioned RON document holding the lowered program (graphs, parameter table,
//! modality inputs, schedule and optimiser settings) and the spec text it came from.
//! RON keeps it inspectable with a text editor; the header is checked before the body
//! so an artifact from another format version is refused with a clear message.

use crate::lower::{lower_loaded, LowerOptions, Program};
use crate::spec::{LoadedSpec, SpecError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Names the file type in the header.
pub const FORMAT: &str = "altc-artifact";
/// Bumped whenever the layout of `Artifact` or the IR changes incompatibly.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Serialize, Deserialize)]
pub struct Artifact {
    pub format: String,
    pub version: u32,
    /// The altc that wrote it.
    pub altc_version: String,
    /// The spec file it was compiled from, as given on the command line.
    pub source_path: String,
    /// The spec text, so an artifact explains itself without its source.
    pub source_text: String,
    pub program: Program,
}

/// Just the header fields, read first.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

#[derive(Debug, Error)]
pub enum ArtifactError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an altc artifact ({detail})")]
    NotAnArtifact { path: PathBuf, detail: String },
    #[error("{path}: artifact format version {found}, but this altc reads version {supported}; recompile it with `altc compile`")]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}:{line}:{col}: corrupt artifact: {message}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{path}: graph `{graph}` is inconsistent: {source}")]
    Graph {
        path: PathBuf,
        graph: String,
        #[source]
        source: Box<crate::ir::GraphError>,
    },
    #[error("{path}: the spec it embeds is invalid: {source}")]
    EmbeddedSpec {
        path: PathBuf,
        #[source]
        source: Box<SpecError>,
    },
    #[error("{path}: the spec it embeds does not describe its graphs ({detail}); the artifact was edited or damaged: recompile it with `altc compile`")]
    Inconsistent { path: PathBuf, detail: String },
}

impl Artifact {
    pub fn new(source_path: &str, source_text: &str, program: Program) -> Artifact {
        Artifact {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            altc_version: env!("CARGO_PKG_VERSION").into(),
            source_path: source_path.into(),
            source_text: source_text.into(),
            program,
        }
    }

    /// Writes the artifact atomically: to a temporary file beside `path`, then renamed
    /// over it, so a failed write never leaves a truncated artifact behind.
    pub fn write(&self, path: &Path) -> Result<(), ArtifactError> {
        let io = |source| ArtifactError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text =
            ron::ser::to_string_pretty(self, ron::ser::PrettyConfig::new().struct_names(false))
                .expect("every artifact value is representable in RON");
        atomic_write(path, text.as_bytes()).map_err(io)
    }

    /// Reads and checks an artifact: header, format version, every graph's types, and
    /// that the spec it embeds lowers to exactly its program, so the graphs, the
    /// tables the runtime reads beside them and the spec text can all be trusted.
    pub fn read(path: &Path) -> Result<Artifact, ArtifactError> {
        let bytes = std::fs::read(path).map_err(|source| ArtifactError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Artifact::from_bytes(bytes, path)
    }

    /// [`Artifact::read`] on bytes already read; `path` names them in errors.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Artifact, ArtifactError> {
        let text = String::from_utf8(bytes).map_err(|_| ArtifactError::NotAnArtifact {
            path: path.to_path_buf(),
            detail: "the file is not text".into(),
        })?;
        let header: Header = match ron::Options::default().from_str(&text) {
            Ok(h) => h,
            // The header leads the file: if it is there, the damage is further on.
            Err(e) if header_in_first_bytes(&text, 200) => {
                return Err(ArtifactError::Corrupt {
                    path: path.to_path_buf(),
                    line: e.position.line,
                    col: e.position.col,
                    message: e.code.to_string(),
                })
            }
            Err(e) => {
                return Err(ArtifactError::NotAnArtifact {
                    path: path.to_path_buf(),
                    detail: format!("no readable header: {}", e.code),
                })
            }
        };
        if header.format != FORMAT {
            return Err(ArtifactError::NotAnArtifact {
                path: path.to_path_buf(),
                detail: format!("format is `{}`", header.format),
            });
        }
        if header.version != FORMAT_VERSION {
            return Err(ArtifactError::Version {
                path: path.to_path_buf(),
                found: header.version,
                supported: FORMAT_VERSION,
            });
        }
        let artifact: Artifact =
            ron::Options::default()
                .from_str(&text)
                .map_err(|e| ArtifactError::Corrupt {
                    path: path.to_path_buf(),
                    line: e.position.line,
                    col: e.position.col,
                    message: e.code.to_string(),
                })?;
        for graph in &artifact.program.graphs {
            graph.validate().map_err(|source| ArtifactError::Graph {
                path: path.to_path_buf(),
                graph: graph.name.clone(),
                source: Box::new(source),
            })?;
        }
        artifact.check_consistency(path)?;
        Ok(artifact)
    }

    /// The embedded spec, parsed and validated; errors name the artifact and, as the
    /// file, the spec it came from as embedded there (not the file on disk, which
    /// may have changed since).
    pub fn embedded_spec(&self, path: &Path) -> Result<LoadedSpec, ArtifactError> {
        let file = format!("{} (embedded in {})", self.source_path, path.display());
        crate::spec::parse(&self.source_text, &file).map_err(|source| ArtifactError::EmbeddedSpec {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Lowers the embedded spec as the program was lowered and compares the two, so
    /// an edit to either side (a renamed graph, a changed width in the text) is
    /// refused here rather than trusted by whoever reads one of them.
    fn check_consistency(&self, path: &Path) -> Result<(), ArtifactError> {
        let loaded = self.embedded_spec(path)?;
        let options = LowerOptions {
            dtype: self.program.dtype,
            moe: self.program.moe,
            ..LowerOptions::default()
        };
        let lowered =
            lower_loaded(&loaded, options).map_err(|source| ArtifactError::EmbeddedSpec {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        match first_difference(&self.program, &lowered) {
            None => Ok(()),
            Some(detail) => Err(ArtifactError::Inconsistent {
                path: path.to_path_buf(),
                detail,
            }),
        }
    }
}

/// Whether the header's format field lies within the first `limit` bytes of `text`.
/// The search runs over bytes because byte `limit` may fall inside a character, where
/// slicing the `str` would panic.
fn header_in_first_bytes(text: &str, limit: usize) -> bool {
    let field = format!("format: \"{FORMAT}\"");
    text.as_bytes()[..text.len().min(limit)]
        .windows(field.len())
        .any(|window| window == field.as_bytes())
}

/// Where `stored` and `lowered` first differ, in words; `None` when they are equal.
fn first_difference(stored: &Program, lowered: &Program) -> Option<String> {
    let text = |value: &dyn erased::Ron| value.ron();
    let names = |p: &Program| p.graphs.iter().map(|g| g.name.clone()).collect::<Vec<_>>();
    if names(stored) != names(lowered) {
        return Some(format!(
            "it holds graphs [{}], the spec lowers to [{}]",
            names(stored).join(", "),
            names(lowered).join(", ")
        ));
    }
    for (a, b) in stored.graphs.iter().zip(&lowered.graphs) {
        if text(a) != text(b) {
            return Some(format!("graph `{}` differs", a.name));
        }
    }
    let fields: [(&str, &dyn erased::Ron, &dyn erased::Ron); 9] = [
        ("model name", &stored.model, &lowered.model),
        ("modalities", &stored.modalities, &lowered.modalities),
        ("directions", &stored.directions, &lowered.directions),
        ("losses", &stored.losses, &lowered.losses),
        ("parameter table", &stored.params, &lowered.params),
        ("schedule", &stored.schedule, &lowered.schedule),
        ("optimizer", &stored.optimizer, &lowered.optimizer),
        ("training settings", &stored.training, &lowered.training),
        ("element type", &stored.dtype, &lowered.dtype),
    ];
    fields
        .into_iter()
        .find(|(_, a, b)| text(*a) != text(*b))
        .map(|(what, _, _)| format!("its {what} differs"))
}

/// Values compared by their RON text: every part of a program serialises, and its
/// floats print in a form that reads back to the same bits.
mod erased {
    pub trait Ron {
        fn ron(&self) -> String;
    }

    impl<T: serde::Serialize> Ron for T {
        fn ron(&self) -> String {
            ron::to_string(self).expect("every program value is representable in RON")
        }
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over
/// `path`, so readers see the old file or the new one, never a torn one. Temporary
/// files of `path` that a killed writer left behind are removed first.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_stale_temporaries(&dir, Some(&name));
    let tmp = dir.join(format!(".{name}{TEMPORARY_INFIX}{}", std::process::id()));
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

/// Temporary files are `.<name>.tmp-<pid>`.
const TEMPORARY_INFIX: &str = ".tmp-";

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Removes the temporary files in `dir` (of the file `only`, or of any file) whose
/// writer is no longer running, and returns their paths. A writer killed between
/// creating its temporary file and renaming it leaves one behind; a live writer's
/// file is left alone.
pub fn remove_stale_temporaries(dir: &Path, only: Option<&str>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(stem) = file_name.to_str().and_then(|n| n.strip_prefix('.')) else {
            continue;
        };
        let Some((name, pid)) = stem.rsplit_once(TEMPORARY_INFIX) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if only.is_some_and(|o| o != name) || process_is_running(pid) {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// Whether process `pid` is running; where the system cannot say, it is assumed to be.
fn process_is_running(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}
