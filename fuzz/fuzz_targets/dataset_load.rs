//! Fuzzes loading a paired dataset (safetensors) for the tiny model.
#![no_main]

use altc_fuzz::tiny_program;
use altc_runtime::data::Dataset;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = Dataset::from_bytes(data, Path::new("fuzz.safetensors"), tiny_program());
});
