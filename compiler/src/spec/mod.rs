//! The model spec language: RON files parsed through serde, then validated. Every
//! error names the file and a line:column; semantic errors also name the spec path
//! (`connector.router.top_k`) and say what would be valid.

mod import;
mod model;
mod source_map;
mod validate;

pub use import::{import_hugging_face, ImportError};
pub use model::*;
pub use source_map::{Position, SourceMap};
pub use validate::{MAX_BATCH, MAX_EXPERTS, MAX_STEPS, MAX_TOKENS, MAX_WIDTH};

use std::fmt;
use std::path::Path;

/// A spec that could not be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{position}: syntax error: {message}")]
    Syntax {
        file: String,
        position: Position,
        message: String,
    },
    #[error("{}", .0)]
    Invalid(Box<Invalid>),
}

/// A semantic error: the value at `path` breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub file: String,
    pub position: Option<Position>,
    pub path: String,
    pub message: String,
    /// What would be valid instead.
    pub hint: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(f, "{}:{p}: ", self.file)?,
            None => write!(f, "{}: ", self.file)?,
        }
        write!(f, "{}: {}", self.path, self.message)?;
        if !self.hint.is_empty() {
            write!(f, " ({})", self.hint)?;
        }
        Ok(())
    }
}

impl SpecError {
    /// The spec path of a semantic error.
    pub fn path(&self) -> Option<&str> {
        match self {
            SpecError::Invalid(i) => Some(&i.path),
            _ => None,
        }
    }

    pub fn position(&self) -> Option<Position> {
        match self {
            SpecError::Syntax { position, .. } => Some(*position),
            SpecError::Invalid(i) => i.position,
            SpecError::Io { .. } => None,
        }
    }
}

/// A parsed and validated spec file with the text it came from, for locating later
/// errors.
#[derive(Debug)]
pub struct Loaded<T> {
    pub file: String,
    pub spec: T,
    pub source_map: SourceMap,
}

/// A model spec file.
pub type LoadedSpec = Loaded<ModelSpec>;
/// A pretrained-encoder file (`altc import` writes them).
pub type LoadedEncoder = Loaded<EncoderSpec>;

impl<T> Loaded<T> {
    /// A semantic error at `path`, located in this spec's file.
    pub fn invalid(
        &self,
        path: &str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> SpecError {
        SpecError::Invalid(Box::new(Invalid {
            file: self.file.clone(),
            position: self.source_map.locate(path),
            path: path.to_string(),
            message: message.into(),
            hint: hint.into(),
        }))
    }
}

/// Reads, parses and validates the spec at `path`.
pub fn load(path: &Path) -> Result<LoadedSpec, SpecError> {
    load_with_text(path).map(|(loaded, _)| loaded)
}

/// [`load`], also returning the text read, for callers that keep it (an artifact
/// embeds its spec) without reading the file twice.
pub fn load_with_text(path: &Path) -> Result<(LoadedSpec, String), SpecError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
        file: file.clone(),
        source,
    })?;
    Ok((parse(&src, &file)?, src))
}

/// Parses and validates spec text; `file` names it in errors.
pub fn parse(src: &str, file: &str) -> Result<LoadedSpec, SpecError> {
    let loaded = parse_ron(src, file)?;
    validate::validate(&loaded)?;
    Ok(loaded)
}

/// Reads, parses and validates the pretrained-encoder file at `path`.
pub fn load_encoder(path: &Path) -> Result<LoadedEncoder, SpecError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
        file: file.clone(),
        source,
    })?;
    parse_encoder(&src, &file)
}

/// Parses and validates pretrained-encoder text; `file` names it in errors.
pub fn parse_encoder(src: &str, file: &str) -> Result<LoadedEncoder, SpecError> {
    let loaded = parse_ron(src, file)?;
    validate::validate_encoder(&loaded)?;
    Ok(loaded)
}

/// Which kind of spec a file's text holds, by the struct name it opens with
/// (`EncoderSpec(...)`); anything else is read as a model.
pub fn is_encoder_spec(src: &str) -> bool {
    let mut rest = src;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, r)| r);
        } else if let Some(after) = rest.strip_prefix("#![") {
            rest = after.split_once(']').map_or("", |(_, r)| r);
        } else {
            break;
        }
    }
    rest.strip_prefix("EncoderSpec")
        .is_some_and(|r| r.trim_start().starts_with('('))
}

fn parse_ron<T: serde::de::DeserializeOwned>(
    src: &str,
    file: &str,
) -> Result<Loaded<T>, SpecError> {
    let spec: T = ron::Options::default()
        .from_str(src)
        .map_err(|e| SpecError::Syntax {
            file: file.to_string(),
            position: Position {
                line: e.position.line,
                col: e.position.col,
            },
            message: e.code.to_string(),
        })?;
    Ok(Loaded {
        file: file.to_string(),
        spec,
        source_map: SourceMap::build(src),
    })
}

/// Prints an encoder spec as RON that `parse_encoder` reads back to the same spec,
/// its struct name first so `altc check` knows it.
pub fn encoder_to_ron(spec: &EncoderSpec) -> String {
    let config = ron::ser::PrettyConfig::new()
        .struct_names(true)
        .indentor("    ".to_string());
    ron::ser::to_string_pretty(spec, config).expect("every spec value is representable in RON")
}

/// Prints a spec as RON that `parse` reads back to the same spec.
pub fn to_ron(spec: &ModelSpec) -> String {
    let config = ron::ser::PrettyConfig::new()
        .struct_names(false)
        .indentor("    ".to_string());
    ron::ser::to_string_pretty(spec, config).expect("every spec value is representable in RON")
}
