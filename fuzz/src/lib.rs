//! What the fuzz targets share: the tiny model's lowered program, which the dataset
//! and checkpoint loaders check their input against.

use altc_compiler::lower::{lower_loaded, LowerOptions, Program};
use altc_compiler::spec;
use std::sync::OnceLock;

const TINY_SPEC: &str = include_str!("../../models/alt_moe_tiny.ron");

/// `models/alt_moe_tiny.ron` lowered with the default options, built once per process
/// so each fuzz input pays only for the loader under test.
pub fn tiny_program() -> &'static Program {
    static PROGRAM: OnceLock<Program> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let loaded = spec::parse(TINY_SPEC, "models/alt_moe_tiny.ron")
            .expect("the tiny model spec is valid");
        lower_loaded(&loaded, LowerOptions::default()).expect("the tiny model lowers")
    })
}
