//! Where altc's outputs go and what they must not touch: the default run directory,
//! the identity of a dataset (so a resumed run trains on the same data), and the rule
//! that an output never replaces one of the command's inputs.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
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

impl DataIdentity {
    /// Reads `path` once to hash it; the path is kept absolute, so a run can be
    /// resumed or evaluated from another working directory.
    pub fn of(path: &Path) -> Result<DataIdentity> {
        let path = &path
            .canonicalize()
            .with_context(|| format!("reading {}", path.display()))?;
        let mut file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = file
                .read(&mut buffer)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            bytes += n as u64;
        }
        let sha256 = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(DataIdentity {
            path: path.to_path_buf(),
            bytes,
            sha256,
        })
    }

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
