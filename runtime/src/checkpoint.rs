//! Checkpoints in safetensors: every parameter and AdamW state tensor under its own
//! name, and in the metadata the model, the next step and the seed. The data order,
//! task sampling and dropout masks are all counter-based functions of (seed, step), so
//! these are the whole RNG state: a resumed run reproduces an uninterrupted one bit for
//! bit. Writes are atomic (temporary file, then rename).

use altc_compiler::ir::DType;
use altc_compiler::reference::{Data, Tensor, TensorMap};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

const FORMAT_KEY: &str = "altc.checkpoint";
const FORMAT_VERSION: &str = "1";

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: truncated or not a safetensors file ({detail})")]
    Unreadable { path: PathBuf, detail: String },
    #[error("{path}: not an altc checkpoint (no `{FORMAT_KEY}` metadata)")]
    Foreign { path: PathBuf },
    #[error("{path}: checkpoint of model `{found}`, but this run is model `{expected}`")]
    OtherModel {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: metadata `{key}` is missing or unreadable")]
    Metadata { path: PathBuf, key: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` holds {value} at index {index}; a checkpoint holds finite values only (altc never saves a non-finite state), so the file was damaged or written by something else")]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
        value: f64,
    },
    #[error("{path}: tensor `{name}` is {got}, but the model expects {expected}")]
    WrongTensor {
        path: PathBuf,
        name: String,
        got: String,
        expected: String,
    },
}

/// What a checkpoint holds.
pub struct Checkpoint {
    pub model: String,
    /// The next step to run (= steps completed).
    pub step: usize,
    pub seed: u64,
    pub state: TensorMap,
}

impl Checkpoint {
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let mut names: Vec<&String> = self.state.keys().collect();
        names.sort();
        let bytes: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = names
            .iter()
            .map(|name| {
                let t = &self.state[*name];
                let (dtype, data) = match &t.data {
                    Data::F32(v) => (
                        safetensors::Dtype::F32,
                        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    ),
                    Data::F64(v) => (
                        safetensors::Dtype::F64,
                        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    ),
                    other => unreachable!("training state is floating point, got {other:?}"),
                };
                ((*name).clone(), dtype, t.shape.clone(), data)
            })
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.clone(),
                    TensorView::new(*d, s.clone(), b).expect("shape matches data"),
                )
            })
            .collect();
        let metadata = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT_VERSION.to_string()),
            ("model".to_string(), self.model.clone()),
            ("step".to_string(), self.step.to_string()),
            ("seed".to_string(), self.seed.to_string()),
        ]);
        let serialized = safetensors::serialize(views, Some(metadata)).map_err(|e| {
            CheckpointError::Unreadable {
                path: path.into(),
                detail: e.to_string(),
            }
        })?;
        crate::atomic_write(path, &serialized).map_err(|source| CheckpointError::Io {
            path: path.into(),
            source,
        })
    }

    /// Loads a checkpoint of `model`, checking that every tensor of `expected` (name,
    /// shape) is present with that shape and element type.
    pub fn load(
        path: &Path,
        model: &str,
        expected: &[(String, Vec<usize>)],
        dtype: DType,
    ) -> Result<Checkpoint, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
            path: path.into(),
            source,
        })?;
        Checkpoint::from_bytes(&bytes, path, model, expected, dtype)
    }

    /// [`Checkpoint::load`] on bytes already read; `path` names them in errors.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        model: &str,
        expected: &[(String, Vec<usize>)],
        dtype: DType,
    ) -> Result<Checkpoint, CheckpointError> {
        let (_, meta) =
            SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Unreadable {
                path: path.into(),
                detail: e.to_string(),
            })?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Unreadable {
            path: path.into(),
            detail: e.to_string(),
        })?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT_VERSION) {
            return Err(CheckpointError::Foreign { path: path.into() });
        }
        let found = meta.get("model").cloned().unwrap_or_default();
        if found != model {
            return Err(CheckpointError::OtherModel {
                path: path.into(),
                found,
                expected: model.into(),
            });
        }
        let number = |key: &str| -> Result<u64, CheckpointError> {
            meta.get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| CheckpointError::Metadata {
                    path: path.into(),
                    key: key.into(),
                })
        };
        let (step, seed) = (number("step")? as usize, number("seed")?);
        let mut state = TensorMap::new();
        for (name, shape) in expected {
            let view = st
                .tensor(name)
                .map_err(|_| CheckpointError::MissingTensor {
                    path: path.into(),
                    name: name.clone(),
                })?;
            let want_dtype = match dtype {
                DType::F64 => safetensors::Dtype::F64,
                _ => safetensors::Dtype::F32,
            };
            if view.shape() != shape.as_slice() || view.dtype() != want_dtype {
                return Err(CheckpointError::WrongTensor {
                    path: path.into(),
                    name: name.clone(),
                    got: format!("{:?}{:?}", view.dtype(), view.shape()),
                    expected: format!("{want_dtype:?}{shape:?}"),
                });
            }
            let data = match dtype {
                DType::F64 => Data::F64(
                    view.data()
                        .chunks_exact(8)
                        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .collect(),
                ),
                _ => Data::F32(
                    view.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                        .collect(),
                ),
            };
            let tensor = Tensor::new(shape.clone(), data);
            if let Some((index, value)) = tensor
                .to_f64()
                .into_iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite())
            {
                return Err(CheckpointError::NonFinite {
                    path: path.into(),
                    name: name.clone(),
                    index,
                    value,
                });
            }
            state.insert(name.clone(), tensor);
        }
        Ok(Checkpoint {
            model: model.into(),
            step,
            seed,
            state,
        })
    }
}
