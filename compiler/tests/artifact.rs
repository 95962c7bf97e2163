//! The compiled artifact: written atomically, read back identically, and refused with
//! a clear message when it is from another version, truncated or not an artifact.

use altc_compiler::artifact::{Artifact, ArtifactError, FORMAT_VERSION};
use altc_compiler::lower::{lower, LowerOptions};
use altc_compiler::spec;
use std::path::{Path, PathBuf};

const TINY: &str = include_str!("../../models/alt_moe_tiny.ron");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("altc-artifact-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn tiny_artifact() -> Artifact {
    let loaded = spec::parse(TINY, "alt_moe_tiny.ron").unwrap();
    let program = lower(&loaded.spec, LowerOptions::default()).unwrap();
    Artifact::new("alt_moe_tiny.ron", TINY, program)
}

fn write(path: &Path) -> Artifact {
    let a = tiny_artifact();
    a.write(path).unwrap();
    a
}

#[test]
fn artifact_reads_back_what_was_written() {
    let path = scratch("roundtrip.altc");
    let written = write(&path);
    let read = Artifact::read(&path).unwrap();
    assert_eq!(read.version, FORMAT_VERSION);
    assert_eq!(read.source_text, TINY);
    assert_eq!(read.program.params, written.program.params);
    assert_eq!(read.program.graphs.len(), written.program.graphs.len());
    for (a, b) in read.program.graphs.iter().zip(&written.program.graphs) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.len(), b.len());
        assert_eq!(a.outputs(), b.outputs());
        for id in a.node_ids() {
            assert_eq!(a.node(id), b.node(id));
            assert_eq!(a.operands(id), b.operands(id));
        }
    }
}

#[test]
fn another_format_version_is_refused_with_advice() {
    let path = scratch("future.altc");
    write(&path);
    let text = std::fs::read_to_string(&path).unwrap();
    let future = text.replacen(&format!("version: {FORMAT_VERSION},"), "version: 99,", 1);
    std::fs::write(&path, future).unwrap();
    let err = Artifact::read(&path).unwrap_err();
    assert!(
        matches!(err, ArtifactError::Version { found: 99, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("recompile it with `altc compile`"),
        "{err}"
    );
}

#[test]
fn truncated_artifact_is_corrupt_with_a_location() {
    let path = scratch("truncated.altc");
    write(&path);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let err = Artifact::read(&path).unwrap_err();
    assert!(matches!(err, ArtifactError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_spec_is_not_an_artifact() {
    let path = scratch("spec.altc");
    std::fs::write(&path, TINY).unwrap();
    let err = Artifact::read(&path).unwrap_err();
    assert!(matches!(err, ArtifactError::NotAnArtifact { .. }), "{err}");
}

#[test]
fn a_tampered_graph_is_caught_by_type_checking() {
    let path = scratch("tampered.altc");
    write(&path);
    let text = std::fs::read_to_string(&path).unwrap();
    // Give the first graph's image input a wrong width; its users no longer type-check.
    let tampered = text.replacen("Fixed(12)", "Fixed(13)", 1);
    assert_ne!(tampered, text);
    std::fs::write(&path, tampered).unwrap();
    let err = Artifact::read(&path).unwrap_err();
    assert!(matches!(err, ArtifactError::Graph { .. }), "{err}");
}

#[test]
fn a_failed_write_leaves_the_previous_artifact_intact() {
    // Its own directory: other tests write (and briefly hold temporaries) beside theirs.
    let dir = scratch("isolated");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kept.altc");
    write(&path);
    let before = std::fs::read(&path).unwrap();
    // Writing into a directory that does not exist fails before touching `path`.
    let err = tiny_artifact()
        .write(&scratch("missing-dir").join("x.altc"))
        .unwrap_err();
    assert!(matches!(err, ArtifactError::Io { .. }));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
}
