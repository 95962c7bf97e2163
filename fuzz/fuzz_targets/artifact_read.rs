//! Fuzzes reading a compiled artifact: header, body, graph checks and the comparison
//! with the embedded spec lowered again.
#![no_main]

use altc_compiler::artifact::Artifact;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = Artifact::from_bytes(data.to_vec(), Path::new("fuzz.altc"));
});
