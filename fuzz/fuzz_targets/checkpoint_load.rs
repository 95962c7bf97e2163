//! Fuzzes loading a training checkpoint (safetensors) for the tiny model.
#![no_main]

use altc_fuzz::tiny_program;
use altc_runtime::checkpoint::Checkpoint;
use altc_runtime::training::state_shapes;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let program = tiny_program();
    let _ = Checkpoint::from_bytes(
        data,
        Path::new("fuzz.safetensors"),
        &program.model,
        &state_shapes(program),
        program.dtype,
    );
});
