//! Raw text to token ids for a text encoder: a Hugging Face `tokenizer.json` read with
//! the `tokenizers` crate (no network), a maximum length that counts the special
//! tokens, and padding to the longest item of a batch. Truncation is counted, never
//! silent.

use std::path::{Path, PathBuf};
use thiserror::Error;
use tokenizers::{PostProcessor, Tokenizer, TruncationParams};

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("{path}: cannot read the tokenizer: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a tokenizer.json that Hugging Face tokenizers can load: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: a maximum length of {max_length} tokens cannot hold the {special} special tokens every item gets")]
    TooShort {
        path: PathBuf,
        max_length: usize,
        special: usize,
    },
    #[error("{path}: item {item} could not be tokenized: {reason}")]
    Encode {
        path: PathBuf,
        item: usize,
        reason: String,
    },
}

/// A tokenizer with the maximum length a text encoder takes.
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    max_length: usize,
}

/// A batch of items as token ids and their mask, `[rows, length]` row-major, padded
/// to the batch's longest item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    /// 1 for a real token, 0 for padding.
    pub mask: Vec<u8>,
    pub rows: usize,
    pub length: usize,
    /// Items cut to the maximum length.
    pub truncated: usize,
}

impl Tokenized {
    /// Row `row`'s real tokens, special tokens included.
    pub fn row_length(&self, row: usize) -> usize {
        let at = row * self.length;
        self.mask[at..at + self.length]
            .iter()
            .filter(|&&m| m == 1)
            .count()
    }

    /// Row `row`'s real token ids.
    pub fn row(&self, row: usize) -> Vec<u32> {
        let at = row * self.length;
        (at..at + self.length)
            .filter(|&i| self.mask[i] == 1)
            .map(|i| self.ids[i])
            .collect()
    }
}

impl TextTokenizer {
    /// Reads `path` (a `tokenizer.json`) for items of at most `max_length` tokens,
    /// special tokens included. The file's own truncation and padding settings are
    /// replaced by these.
    pub fn load(path: &Path, max_length: usize) -> Result<TextTokenizer, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let corrupt = |reason: String| TokenizerError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut inner = Tokenizer::from_bytes(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let special = inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_length <= special {
            return Err(TokenizerError::TooShort {
                path: path.to_path_buf(),
                max_length,
                special,
            });
        }
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| corrupt(e.to_string()))?;
        // Batches are padded here, to their longest item.
        inner.with_padding(None);
        Ok(TextTokenizer {
            inner,
            path: path.to_path_buf(),
            max_length,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Ids this tokenizer can produce: its vocabulary with added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids and masks of `items`, with special tokens.
    pub fn encode(&self, items: &[&str]) -> Result<Tokenized, TokenizerError> {
        let mut rows = Vec::with_capacity(items.len());
        for (item, text) in items.iter().enumerate() {
            let encoding = self
                .inner
                .encode(*text, true)
                .map_err(|e| TokenizerError::Encode {
                    path: self.path.clone(),
                    item,
                    reason: e.to_string(),
                })?;
            rows.push(encoding);
        }
        let truncated = rows
            .iter()
            .filter(|e| !e.get_overflowing().is_empty())
            .count();
        let length = rows.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let mut ids = vec![0; rows.len() * length];
        let mut mask = vec![0; rows.len() * length];
        for (r, encoding) in rows.iter().enumerate() {
            for (i, &id) in encoding.get_ids().iter().enumerate() {
                ids[r * length + i] = id;
                mask[r * length + i] = 1;
            }
        }
        Ok(Tokenized {
            ids,
            mask,
            rows: rows.len(),
            length,
            truncated,
        })
    }
}

/// Where `scripts/setup.sh` unpacks sentence-transformers' all-MiniLM-L6-v2 (the
/// text encoder the tests and the README use): `$ALTC_MINILM`, else
/// `$XDG_CACHE_HOME/altc/minilm`, else `~/.cache/altc/minilm`.
pub fn minilm_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ALTC_MINILM") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("altc").join("minilm")
}
