//! Finding the MiniLM model folder that `scripts/setup.sh` fetches, and reading the
//! golden sentences, ids and vectors `scripts/golden_minilm.py` wrote; shared by the
//! runtime suites and the command-line suites.

use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

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

/// What sentence-transformers made of the golden sentences, in file order.
pub struct Golden {
    pub sentences: Vec<String>,
    /// Each sentence's token ids, special tokens included.
    pub ids: Vec<Vec<u32>>,
    /// Each sentence's normalised embedding.
    pub vectors: Vec<Vec<f32>>,
}

/// Reads `minilm_sentences.jsonl` and `minilm_golden.safetensors` from `dir`
/// (`runtime/tests/golden`).
pub fn golden_in(dir: &Path) -> Golden {
    let sentences = std::fs::read_to_string(dir.join("minilm_sentences.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["text"].as_str().unwrap().to_string()
        })
        .collect::<Vec<_>>();
    let bytes = std::fs::read(dir.join("minilm_golden.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let words = |name: &str| -> Vec<[u8; 4]> {
        let t = file.tensor(name).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|b| [b[0], b[1], b[2], b[3]])
            .collect()
    };
    let lengths: Vec<usize> = words("lengths")
        .into_iter()
        .map(|b| i32::from_le_bytes(b) as usize)
        .collect();
    let all_ids: Vec<u32> = words("ids")
        .into_iter()
        .map(|b| i32::from_le_bytes(b) as u32)
        .collect();
    let stride = all_ids.len() / sentences.len();
    let ids = lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| all_ids[i * stride..i * stride + n].to_vec())
        .collect();
    let floats: Vec<f32> = words("embedding")
        .into_iter()
        .map(f32::from_le_bytes)
        .collect();
    let width = floats.len() / sentences.len();
    let vectors = floats.chunks(width).map(<[f32]>::to_vec).collect();
    Golden {
        sentences,
        ids,
        vectors,
    }
}
