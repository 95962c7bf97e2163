//! Paired datasets in safetensors: for each modality `m`, `m.tokens` `[N, L, d]` and,
//! when padded, `m.mask` `[N, L]` (1 = real token), all f32, row `i` of every tensor
//! being pair `i`; metadata [`HELD_OUT_KEY`] may fix the held-out split as the last
//! pairs. Batching, seeded per-epoch shuffling and a seeded (or fixed) held-out split.

use altc_compiler::ir::DType;
use altc_compiler::lower::{ModalityInfo, Program};
use altc_compiler::reference::{Tensor, TensorMap};
use altc_compiler::rng;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable safetensors file: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("{path}: the model needs tensor `{name}` ({expected}) for modality `{modality}`, which the dataset lacks (it has: {present})")]
    Missing {
        path: PathBuf,
        name: String,
        modality: String,
        expected: String,
        present: String,
    },
    #[error("{path}: tensor `{name}` is {got}, but the model expects {expected}")]
    Shape {
        path: PathBuf,
        name: String,
        got: String,
        expected: String,
    },
    #[error("{path}: tensor `{name}` holds {dtype:?}, but datasets hold F32")]
    DType {
        path: PathBuf,
        name: String,
        dtype: safetensors::Dtype,
    },
    #[error("{path}: tensor `{name}` holds {value} at pair {pair}, position {position}; datasets must hold finite values")]
    NonFinite {
        path: PathBuf,
        name: String,
        pair: usize,
        position: usize,
        value: f32,
    },
    #[error("{path}: mask `{name}` holds {value} at pair {pair}, token {token}; masks hold 0 (padding) or 1 (a real token)")]
    MaskValue {
        path: PathBuf,
        name: String,
        pair: usize,
        token: usize,
        value: f32,
    },
    #[error("{path}: mask `{name}` marks no token of pair {pair} as real; every item needs at least one token")]
    EmptyMask {
        path: PathBuf,
        name: String,
        pair: usize,
    },
    #[error("{path}: {what} take {gib:.1} GiB to generate, more than this machine's {memory_gib:.1} GiB of memory; write fewer pairs")]
    TooLarge {
        path: PathBuf,
        what: String,
        gib: f64,
        memory_gib: f64,
    },
    #[error("{path}: {held_out} held-out pairs out of {pairs}; hold out 1 to {} (at most half the pairs)", pairs / 2)]
    HeldOut {
        path: PathBuf,
        held_out: usize,
        pairs: usize,
    },
    #[error("{path}: the dataset fixes its held-out split as its last {fixed} pairs, so {held_out} cannot be held out; leave --held-out out")]
    FixedSplit {
        path: PathBuf,
        fixed: usize,
        held_out: usize,
    },
    #[error("{path}: metadata `{HELD_OUT_KEY}` is `{value}`, not a count of pairs from 1 to half the dataset's {pairs}")]
    HeldOutMetadata {
        path: PathBuf,
        value: String,
        pairs: usize,
    },
    #[error("{path}: the dataset holds no pairs")]
    Empty { path: PathBuf },
    #[error("{path}: {pairs} pairs leave {train} for training, fewer than one batch of {batch}")]
    TooSmall {
        path: PathBuf,
        pairs: usize,
        train: usize,
        batch: usize,
    },
}

/// The metadata key of a dataset's fixed held-out split: its value is a count, the
/// last that many pairs being held out.
pub const HELD_OUT_KEY: &str = "altc.held_out";

/// A loaded paired dataset.
pub struct Dataset {
    pub path: PathBuf,
    pub pairs: usize,
    /// The held-out pairs the file fixes (its last ones), if it fixes them.
    pub fixed_held_out: Option<usize>,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn tensor_names(m: &ModalityInfo) -> Vec<(String, Vec<usize>)> {
    let mut names = vec![(format!("{}.tokens", m.name), vec![m.tokens, m.input_width])];
    if m.padded {
        names.push((format!("{}.mask", m.name), vec![m.tokens]));
    }
    names
}

impl Dataset {
    /// Reads `path` and checks it against the model's modalities.
    pub fn load(path: &Path, program: &Program) -> Result<Dataset, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.into(),
            source,
        })?;
        Dataset::from_bytes(&bytes, path, program)
    }

    /// [`Dataset::load`] on bytes already read; `path` names them in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path, program: &Program) -> Result<Dataset, DataError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| DataError::Format {
            path: path.into(),
            detail: e.to_string(),
        })?;
        let mut tensors = HashMap::new();
        let mut pairs: Option<usize> = None;
        for m in &program.modalities {
            for (name, row_shape) in tensor_names(m) {
                let view = st.tensor(&name).map_err(|_| {
                    let mut present: Vec<String> =
                        st.names().into_iter().map(|n| n.to_string()).collect();
                    present.sort();
                    DataError::Missing {
                        path: path.into(),
                        name: name.clone(),
                        modality: m.name.clone(),
                        expected: format!("[N, {}]", dims(&row_shape)),
                        present: present.join(", "),
                    }
                })?;
                let shape = view.shape().to_vec();
                let n = pairs.unwrap_or(shape.first().copied().unwrap_or(0));
                let mut expected = vec![n];
                expected.extend(&row_shape);
                if shape != expected {
                    return Err(DataError::Shape {
                        path: path.into(),
                        name,
                        got: format!("[{}]", dims(&shape)),
                        expected: format!("[{}]", dims(&expected)),
                    });
                }
                pairs = Some(n);
                let values = f32_values(path, &name, &view)?;
                let row = row_shape.iter().product::<usize>().max(1);
                if name.ends_with(".mask") {
                    check_mask(path, &name, &values, row)?;
                } else {
                    check_finite(path, &name, &values, row)?;
                }
                tensors.insert(name.clone(), (shape, values));
            }
        }
        let fixed_held_out = fixed_held_out(bytes, path, pairs.unwrap_or(0))?;
        match pairs {
            Some(pairs) if pairs > 0 => Ok(Dataset {
                path: path.into(),
                pairs,
                fixed_held_out,
                tensors,
            }),
            _ => Err(DataError::Empty { path: path.into() }),
        }
    }

    /// A seeded split: the first `held_out` of a fixed permutation is held out; or,
    /// where the file fixes its split, its last pairs (then `held_out` must be their
    /// count). At least one pair and at most half of them can be.
    pub fn split(&self, held_out: usize, seed: u64) -> Result<Split, DataError> {
        if held_out == 0 || held_out > self.pairs / 2 {
            return Err(DataError::HeldOut {
                path: self.path.clone(),
                held_out,
                pairs: self.pairs,
            });
        }
        if let Some(fixed) = self.fixed_held_out {
            if fixed != held_out {
                return Err(DataError::FixedSplit {
                    path: self.path.clone(),
                    fixed,
                    held_out,
                });
            }
            let first = self.pairs - fixed;
            return Ok(Split {
                held_out: (first..self.pairs).collect(),
                train: (0..first).collect(),
            });
        }
        let order = permutation(self.pairs, seed, u64::MAX);
        Ok(Split {
            held_out: order[..held_out].to_vec(),
            train: order[held_out..].to_vec(),
        })
    }

    /// The batch of these pairs, as graph inputs of `dtype`.
    pub fn batch(&self, indices: &[usize], dtype: DType) -> TensorMap {
        self.tensors
            .iter()
            .map(|(name, (shape, values))| {
                let row: usize = shape[1..].iter().product();
                let mut data = Vec::with_capacity(indices.len() * row);
                for &i in indices {
                    data.extend(values[i * row..(i + 1) * row].iter().map(|&v| v as f64));
                }
                let mut batch_shape = vec![indices.len()];
                batch_shape.extend(&shape[1..]);
                (name.clone(), Tensor::from_f64(dtype, &batch_shape, data))
            })
            .collect()
    }
}

/// Training pairs and held-out pairs.
pub struct Split {
    pub train: Vec<usize>,
    pub held_out: Vec<usize>,
}

impl Split {
    pub fn steps_per_epoch(&self, batch: usize) -> usize {
        self.train.len() / batch
    }

    /// The pairs of 0-based training `step`: epochs visit the training pairs in a
    /// fresh seeded order each; a last partial batch is dropped.
    pub fn batch_at(&self, step: usize, batch: usize, seed: u64) -> Vec<usize> {
        let per_epoch = self.steps_per_epoch(batch).max(1);
        let epoch = step / per_epoch;
        let order = permutation(self.train.len(), seed, epoch as u64);
        let start = (step % per_epoch) * batch;
        order[start..start + batch]
            .iter()
            .map(|&i| self.train[i])
            .collect()
    }
}

/// Stream of the shuffling draws.
const SHUFFLE_STREAM: u64 = 1 << 29;

/// A Fisher-Yates permutation of `0..n` from the counter-based stream of `(seed, epoch)`.
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let u = rng::uniform(seed, epoch, SHUFFLE_STREAM, i as u64);
        let j = ((u * (i + 1) as f64) as usize).min(i);
        order.swap(i, j);
    }
    order
}

/// The held-out split the safetensors file `bytes` (read from `path`, `rows` rows)
/// fixes in its metadata ([`HELD_OUT_KEY`]): a count from 1 to half the rows.
pub fn fixed_held_out(bytes: &[u8], path: &Path, rows: usize) -> Result<Option<usize>, DataError> {
    let Some(value) = SafeTensors::read_metadata(bytes)
        .ok()
        .and_then(|(_, m)| m.metadata().clone())
        .and_then(|m| m.get(HELD_OUT_KEY).cloned())
    else {
        return Ok(None);
    };
    match value.parse::<usize>() {
        Ok(n) if n >= 1 && n <= rows / 2 => Ok(Some(n)),
        _ => Err(DataError::HeldOutMetadata {
            path: path.into(),
            value,
            pairs: rows,
        }),
    }
}

/// Every value finite: a NaN in the data would otherwise surface steps later as a
/// non-finite gradient, far from its cause.
pub fn check_finite(path: &Path, name: &str, values: &[f32], row: usize) -> Result<(), DataError> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(DataError::NonFinite {
            path: path.into(),
            name: name.into(),
            pair: i / row,
            position: i % row,
            value: values[i],
        }),
    }
}

/// Masks of 0 and 1 only, with at least one real token per item: the masked mean
/// of an item with none would divide by zero.
fn check_mask(path: &Path, name: &str, values: &[f32], tokens: usize) -> Result<(), DataError> {
    for (pair, mask) in values.chunks(tokens).enumerate() {
        if let Some(token) = mask.iter().position(|&v| v != 0.0 && v != 1.0) {
            return Err(DataError::MaskValue {
                path: path.into(),
                name: name.into(),
                pair,
                token,
                value: mask[token],
            });
        }
        if !mask.contains(&1.0) {
            return Err(DataError::EmptyMask {
                path: path.into(),
                name: name.into(),
                pair,
            });
        }
    }
    Ok(())
}

fn dims(shape: &[usize]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The values of an F32 tensor (any other dtype refused, named).
pub fn f32_values(path: &Path, name: &str, view: &TensorView) -> Result<Vec<f32>, DataError> {
    if view.dtype() != safetensors::Dtype::F32 {
        return Err(DataError::DType {
            path: path.into(),
            name: name.into(),
            dtype: view.dtype(),
        });
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Writes f32 tensors as safetensors atomically (temporary file, then rename).
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: HashMap<String, String>,
) -> Result<(), DataError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            let view = TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .expect("shape matches data");
            (name.clone(), view)
        })
        .collect();
    let serialized =
        safetensors::serialize(views, Some(metadata)).map_err(|e| DataError::Format {
            path: path.into(),
            detail: e.to_string(),
        })?;
    crate::atomic_write(path, &serialized).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })
}
