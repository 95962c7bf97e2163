//! `altc import`: a Hugging Face model folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`, and sentence-transformers' pooling files when present) becomes
//! an [`EncoderSpec`] with its weight map. The BERT family only, for now.

use super::{Activation, Encoder, EncoderSpec, Layer, NormPlacement, Pooling, Weights};
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("{path}: `{key}` is missing or not {expected}")]
    Field {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
    #[error("{path}: architecture {found} is not supported; altc import reads the BERT family (BertModel, BertForMaskedLM, ... with model_type \"bert\")")]
    Architecture { path: PathBuf, found: String },
    #[error("{path}: {key} is {found}; altc's BERT supports {supported}")]
    Unsupported {
        path: PathBuf,
        key: &'static str,
        found: String,
        supported: &'static str,
    },
    #[error("{path}: not a safetensors file (truncated or corrupt?): {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("{path}: no tensor ends with `embeddings.word_embeddings.weight`, so this is not a BERT checkpoint")]
    NoEmbeddings { path: PathBuf },
}

/// What the files of a model folder are called.
const CONFIG: &str = "config.json";
const WEIGHTS: &str = "model.safetensors";
const TOKENIZER: &str = "tokenizer.json";

/// Reads the model folder `dir` and returns its encoder spec; paths in it are
/// written relative to `relative_to` (the output file's folder) when they can be.
pub fn import_hugging_face(dir: &Path, relative_to: &Path) -> Result<EncoderSpec, ImportError> {
    let config_path = dir.join(CONFIG);
    let config = read_json(&config_path)?;
    check_architecture(&config_path, &config)?;
    let number = |key: &str| -> Result<usize, ImportError> {
        config
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| ImportError::Field {
                path: config_path.clone(),
                key: key.into(),
                expected: "a whole number",
            })
    };
    let hidden = number("hidden_size")?;
    let layers_count = number("num_hidden_layers")?;
    let heads = number("num_attention_heads")?;
    let intermediate = number("intermediate_size")?;
    let vocab = number("vocab_size")?;
    let positions = number("max_position_embeddings")?;
    let types = number("type_vocab_size")?;
    let eps = config
        .get("layer_norm_eps")
        .and_then(Value::as_f64)
        .unwrap_or(1e-12);
    let activation = match config.get("hidden_act").and_then(Value::as_str) {
        Some("gelu") | None => Activation::Gelu,
        Some("relu") => Activation::Relu,
        Some("silu") | Some("swish") => Activation::Silu,
        Some(other) => {
            return Err(ImportError::Unsupported {
                path: config_path,
                key: "hidden_act",
                found: format!("\"{other}\""),
                supported: "\"gelu\" (exact erf), \"relu\" and \"silu\"",
            })
        }
    };
    if let Some(kind) = config
        .get("position_embedding_type")
        .and_then(Value::as_str)
    {
        if kind != "absolute" {
            return Err(ImportError::Unsupported {
                path: config_path,
                key: "position_embedding_type",
                found: format!("\"{kind}\""),
                supported: "\"absolute\"",
            });
        }
    }

    let weights_path = dir.join(WEIGHTS);
    let prefix = tensor_prefix(&weights_path)?;
    let max_length = sentence_max_length(dir).unwrap_or(positions).min(positions);
    let (pooling, normalize) = sentence_pooling(dir)?;

    let mut tensors = BTreeMap::new();
    let mut map = |file: String, param: String| {
        tensors.insert(format!("{prefix}{file}"), param);
    };
    let mut layers = vec![
        Layer::TokenEmbedding {
            vocab,
            width: hidden,
        },
        Layer::PositionEmbedding { positions },
        Layer::TokenTypeEmbedding { types },
        Layer::LayerNorm { eps },
    ];
    map(
        "embeddings.word_embeddings.weight".into(),
        "layers.0.table".into(),
    );
    map(
        "embeddings.position_embeddings.weight".into(),
        "layers.1.table".into(),
    );
    map(
        "embeddings.token_type_embeddings.weight".into(),
        "layers.2.table".into(),
    );
    map(
        "embeddings.LayerNorm.weight".into(),
        "layers.3.norm.gamma".into(),
    );
    map(
        "embeddings.LayerNorm.bias".into(),
        "layers.3.norm.beta".into(),
    );
    for i in 0..layers_count {
        let at = layers.len();
        let hf = format!("encoder.layer.{i}");
        let ours = format!("layers.{at}");
        let linears = [
            ("attention.self.query", "attention.query"),
            ("attention.self.key", "attention.key"),
            ("attention.self.value", "attention.value"),
            ("attention.output.dense", "attention.output"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
        ];
        for (theirs, mine) in linears {
            for part in ["weight", "bias"] {
                map(
                    format!("{hf}.{theirs}.{part}"),
                    format!("{ours}.{mine}.{part}"),
                );
            }
        }
        let norms = [
            ("attention.output.LayerNorm", "attention_norm"),
            ("output.LayerNorm", "mlp_norm"),
        ];
        for (theirs, mine) in norms {
            map(
                format!("{hf}.{theirs}.weight"),
                format!("{ours}.{mine}.gamma"),
            );
            map(format!("{hf}.{theirs}.bias"), format!("{ours}.{mine}.beta"));
        }
        layers.push(Layer::Block {
            heads,
            intermediate,
            norm: NormPlacement::Post,
            eps,
            activation,
            layer_scale: None,
        });
    }
    layers.push(Layer::TokenPool(pooling));
    if normalize {
        layers.push(Layer::Normalize);
    }
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "encoder".into());
    Ok(EncoderSpec {
        name,
        width: hidden,
        encoder: Encoder::Text {
            tokenizer: relative(&dir.join(TOKENIZER), relative_to),
            max_length,
            frozen: true,
            layers,
            weights: Some(Weights {
                file: relative(&weights_path, relative_to),
                tensors,
            }),
        },
    })
}

fn read_json(path: &Path) -> Result<Value, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ImportError::Json {
        path: path.into(),
        reason: e.to_string(),
    })
}

fn check_architecture(path: &Path, config: &Value) -> Result<(), ImportError> {
    let architectures: Vec<&str> = config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = config.get("model_type").and_then(Value::as_str);
    let bert = model_type.is_none_or(|t| t == "bert")
        && !architectures.is_empty()
        && architectures.iter().all(|a| a.starts_with("Bert"));
    if !bert {
        let found = if architectures.is_empty() {
            format!("(none listed; model_type {model_type:?})")
        } else {
            architectures
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(ImportError::Architecture {
            path: path.into(),
            found,
        });
    }
    Ok(())
}

/// The prefix the checkpoint puts before BERT's own names (`bert.` in task models).
fn tensor_prefix(path: &Path) -> Result<String, ImportError> {
    let bytes = std::fs::read(path).map_err(|source| ImportError::Read {
        path: path.into(),
        source,
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| ImportError::Weights {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let suffix = "embeddings.word_embeddings.weight";
    header
        .tensors()
        .keys()
        .find_map(|name| name.strip_suffix(suffix).map(str::to_string))
        .ok_or_else(|| ImportError::NoEmbeddings { path: path.into() })
}

/// sentence-transformers' maximum sequence length, when the folder has one.
fn sentence_max_length(dir: &Path) -> Option<usize> {
    let config = read_json(&dir.join("sentence_bert_config.json")).ok()?;
    config.get("max_seq_length")?.as_u64().map(|v| v as usize)
}

/// sentence-transformers' pooling and whether it normalises; mean pooling over the
/// mask without normalising for a plain BERT folder.
fn sentence_pooling(dir: &Path) -> Result<(Pooling, bool), ImportError> {
    let path = dir.join("1_Pooling/config.json");
    let pooling = match read_json(&path) {
        Err(ImportError::Read { .. }) => Pooling::MaskedMean,
        Err(e) => return Err(e),
        Ok(c) => {
            let on = |key: &str| c.get(key).and_then(Value::as_bool) == Some(true);
            let modes: Vec<&str> = [
                "pooling_mode_cls_token",
                "pooling_mode_mean_tokens",
                "pooling_mode_max_tokens",
                "pooling_mode_mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens",
                "pooling_mode_lasttoken",
            ]
            .into_iter()
            .filter(|k| on(k))
            .collect();
            match modes[..] {
                ["pooling_mode_mean_tokens"] => Pooling::MaskedMean,
                ["pooling_mode_cls_token"] => Pooling::First,
                _ => {
                    return Err(ImportError::Unsupported {
                        path,
                        key: "the pooling",
                        found: format!("{modes:?}"),
                        supported: "one of pooling_mode_mean_tokens and pooling_mode_cls_token",
                    })
                }
            }
        }
    };
    let normalize = read_json(&dir.join("modules.json")).ok().is_some_and(|m| {
        m.as_array().is_some_and(|modules| {
            modules.iter().any(|module| {
                module.get("type").and_then(Value::as_str)
                    == Some("sentence_transformers.models.Normalize")
            })
        })
    });
    Ok((pooling, normalize))
}

/// `path` relative to the folder `base`, when both resolve and one holds the other;
/// otherwise `path` made absolute.
fn relative(path: &Path, base: &Path) -> String {
    let full = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
    full.strip_prefix(&base)
        .unwrap_or(&full)
        .display()
        .to_string()
}
