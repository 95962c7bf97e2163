//! Loading a model as every command takes it: a spec (`.ron`) or a compiled
//! artifact (`.altc`), lowered in the form a run asks for.

use altc_compiler::artifact::Artifact;
use altc_compiler::lower::{lower_loaded, LowerOptions, MoeDispatch};
use altc_compiler::spec;
use anyhow::Result;
use std::path::Path;

/// A model as loaded: its program and the spec it was lowered from.
pub(crate) struct LoadedModel {
    pub program: altc_compiler::lower::Program,
    /// The spec's path as the user gave it, and its text.
    pub source_path: String,
    pub source_text: String,
}

impl LoadedModel {
    /// The model as an artifact, to keep beside a run.
    pub fn artifact(&self) -> Artifact {
        Artifact::new(&self.source_path, &self.source_text, self.program.clone())
    }
}

/// Loads a model from a spec (`.ron`) or a compiled artifact (`.altc`). An artifact
/// compiled with another MoE form is lowered again from the spec text it carries,
/// which reading it checked against its graphs.
pub(crate) fn load_model(path: &Path, options: LowerOptions) -> Result<LoadedModel> {
    if path.extension().is_some_and(|e| e == "altc") {
        let artifact = Artifact::read(path)?;
        let program = if artifact.program.moe == options.moe {
            artifact.program
        } else {
            lower_loaded(&artifact.embedded_spec(path)?, options)?
        };
        return Ok(LoadedModel {
            program,
            source_path: artifact.source_path,
            source_text: artifact.source_text,
        });
    }
    let (loaded, source_text) = spec::load_with_text(path)?;
    Ok(LoadedModel {
        program: lower_loaded(&loaded, options)?,
        source_path: path.display().to_string(),
        source_text,
    })
}

pub(crate) fn load_program(
    path: &Path,
    options: LowerOptions,
) -> Result<altc_compiler::lower::Program> {
    Ok(load_model(path, options)?.program)
}

/// Lowering for a run: sparse MoE dispatch when optimising, the authors' dense form
/// for the `--no-opt` baseline.
pub(crate) fn lower_options(no_opt: bool) -> LowerOptions {
    LowerOptions {
        moe: if no_opt {
            MoeDispatch::Dense
        } else {
            MoeDispatch::Sparse
        },
        ..LowerOptions::default()
    }
}
