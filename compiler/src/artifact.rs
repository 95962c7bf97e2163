//! The compiled artifact `altc compile` writes and `altc run`/`altc inspect` read: a
//! versioned RON document holding the lowered program (graphs, parameter table,
//! modality inputs, schedule and optimiser settings) and the spec text it came from.
//! RON keeps it inspectable with a text editor; the header is checked before the body
//! so an artifact from another format version is refused with a clear message.

use crate::lower::Program;
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

    /// Reads and checks an artifact: header, format version, then every graph's types.
    pub fn read(path: &Path) -> Result<Artifact, ArtifactError> {
        let bytes = std::fs::read(path).map_err(|source| ArtifactError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| ArtifactError::NotAnArtifact {
            path: path.to_path_buf(),
            detail: "the file is not text".into(),
        })?;
        let header: Header = match ron::Options::default().from_str(&text) {
            Ok(h) => h,
            // The header leads the file: if it is there, the damage is further on.
            Err(e) if text[..text.len().min(200)].contains(&format!("format: \"{FORMAT}\"")) => {
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
        Ok(artifact)
    }
}

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
