//! Where altc's outputs go and what they must not touch: the default run directory,
//! the identity of a dataset (so a resumed run trains on the same data), and the rule
//! that an output never replaces one of the command's inputs.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// `runs/<model>`, with the model's name reduced to characters that cannot leave
/// `runs/` (no separators, no leading dots), so a spec named `../../x` stays inside.
pub fn default_run_dir(model: &str) -> PathBuf {
    let safe: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let safe = safe.trim_start_matches('.');
    PathBuf::from("runs").join(if safe.is_empty() { "model" } else { safe })
}

/// What identifies a dataset file: where it was, how long it is and its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// A dataset file read once: its identity and the bytes it was hashed from, which
/// the dataset is then parsed from, so a run reads its data a single time.
pub struct DataFile {
    pub identity: DataIdentity,
    pub bytes: Vec<u8>,
}

impl DataFile {
    /// Reads `path`; the identity keeps the path absolute, so a run can be resumed or
    /// evaluated from another working directory.
    pub fn read(path: &Path) -> Result<DataFile> {
        let path = path
            .canonicalize()
            .with_context(|| format!("reading {}", path.display()))?;
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let sha256 = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(DataFile {
            identity: DataIdentity {
                path,
                bytes: bytes.len() as u64,
                sha256,
            },
            bytes,
        })
    }
}

impl DataIdentity {
    /// Whether the two name the same contents (the path may have moved).
    pub fn same_contents(&self, other: &DataIdentity) -> bool {
        self.bytes == other.bytes && self.sha256 == other.sha256
    }
}

/// Fails if `output` is the same file as any of `inputs` (`(what, path)`): an output
/// written there would replace an input before, or while, it is read.
pub fn refuse_overwrite(output: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    for (what, input) in inputs {
        if same_file(output, input) {
            bail!(
                "{}: this output is also the command's {what}; writing it would replace the input. Choose another output path",
                output.display()
            );
        }
    }
    Ok(())
}

/// Whether `a` and `b` name one existing file (through links or different spellings).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        match (a.canonicalize(), b.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_name_cannot_lead_out_of_runs() {
        for (name, dir) in [
            ("../../x", "runs/_.._x"),
            ("/abs/x", "runs/_abs_x"),
            ("..", "runs/model"),
            ("alt_moe_tiny", "runs/alt_moe_tiny"),
        ] {
            assert_eq!(default_run_dir(name), PathBuf::from(dir), "{name}");
        }
    }

    #[test]
    fn an_output_naming_an_input_is_refused_through_another_spelling() {
        let dir = std::env::temp_dir().join(format!("altc-files-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let input = dir.join("data.safetensors");
        std::fs::write(&input, b"pairs").unwrap();
        let respelled = dir.join("sub/../data.safetensors");
        let err = refuse_overwrite(&respelled, &[("--data", &input)]).unwrap_err();
        assert!(
            err.to_string().contains("also the command's --data"),
            "{err}"
        );
        assert!(refuse_overwrite(&dir.join("other"), &[("--data", &input)]).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
