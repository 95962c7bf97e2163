//! Replays the committed corpora of every fuzz target (`fuzz/corpus/<target>`: specs,
//! artifacts, datasets and checkpoints) through the calls those targets make, so every
//! input the fuzzers kept, crashes they found included, is checked in CI without
//! cargo-fuzz.

use altc_compiler::artifact::Artifact;
use altc_compiler::lower::{lower_loaded, LowerOptions, Program};
use altc_compiler::{spec, summary};
use altc_runtime::checkpoint::Checkpoint;
use altc_runtime::data::Dataset;
use altc_runtime::training::state_shapes;
use std::path::{Path, PathBuf};

/// The model the fuzz targets load their inputs for.
fn tiny_program() -> Program {
    let loaded = spec::parse(
        include_str!("../models/alt_moe_tiny.ron"),
        "models/alt_moe_tiny.ron",
    )
    .expect("the tiny model spec is valid");
    lower_loaded(&loaded, LowerOptions::default()).expect("the tiny model lowers")
}

/// The files of `fuzz/corpus/<target>`, sorted. A missing or empty folder fails the
/// test, so it cannot pass by replaying nothing.
fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read fuzz corpus {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "fuzz corpus {} is empty", dir.display());
    files
}

/// Names the input being replayed when it panics; the panic itself is not caught, so
/// it still fails the test.
struct Replaying<'a>(&'a Path);

impl Drop for Replaying<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the panic came from fuzz input {}", self.0.display());
        }
    }
}

/// Runs `check` on the bytes of every file of the target's corpus.
fn replay(target: &str, check: impl Fn(&[u8])) {
    for path in corpus_files(target) {
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let _replaying = Replaying(&path);
        check(&bytes);
    }
}

#[test]
fn spec_lower_corpus_never_panics() {
    replay("spec_lower", |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        let Ok(loaded) = spec::parse(text, "fuzz.ron") else {
            return;
        };
        if let Ok(program) = lower_loaded(&loaded, LowerOptions::default()) {
            summary::program_summary(&program);
        }
    });
}

#[test]
fn artifact_read_corpus_never_panics() {
    replay("artifact_read", |bytes| {
        let _ = Artifact::from_bytes(bytes.to_vec(), Path::new("fuzz.altc"));
    });
}

#[test]
fn dataset_load_corpus_never_panics() {
    let program = tiny_program();
    replay("dataset_load", |bytes| {
        let _ = Dataset::from_bytes(bytes, Path::new("fuzz.safetensors"), &program);
    });
}

#[test]
fn checkpoint_load_corpus_never_panics() {
    let program = tiny_program();
    let expected = state_shapes(&program);
    replay("checkpoint_load", |bytes| {
        let _ = Checkpoint::from_bytes(
            bytes,
            Path::new("fuzz.safetensors"),
            &program.model,
            &expected,
            program.dtype,
        );
    });
}
