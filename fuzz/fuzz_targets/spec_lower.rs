//! Fuzzes the spec language end to end: parse and validate RON text, lower it, and
//! summarise the program. Errors are expected; a panic, hang or runaway allocation is
//! a bug.
#![no_main]

use altc_compiler::lower::{lower_loaded, LowerOptions};
use altc_compiler::{spec, summary};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Specs are text; other bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(loaded) = spec::parse(text, "fuzz.ron") else {
        return;
    };
    if let Ok(program) = lower_loaded(&loaded, LowerOptions::default()) {
        summary::program_summary(&program);
    }
});
