//! Finding the MiniLM model folder that `scripts/setup.sh` fetches; shared by the
//! runtime suites and the command-line suites.

use std::path::PathBuf;

/// The unpacked MiniLM model folder, or `None` (and a note) where setup has not
/// fetched it; CI, which runs the setup, requires it.
pub fn minilm() -> Option<PathBuf> {
    let dir = altc_runtime::text::minilm_dir();
    if dir.join("tokenizer.json").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} has no tokenizer.json: run scripts/setup.sh",
        dir.display()
    );
    eprintln!(
        "skipped: no MiniLM in {} (scripts/setup.sh fetches it)",
        dir.display()
    );
    None
}
