//! `altc import`: a Hugging Face model folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`, and sentence-transformers' pooling files when present) becomes
//! an [`EncoderSpec`] with its weight map. The BERT family only, for now.

use super::{Activation, Encoder, EncoderSpec, Layer, NormPlacement, Pooling, Weights};
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

    let tokenizer_path = dir.join(TOKENIZER);
    if !tokenizer_path.is_file() {
        return Err(ImportError::Read {
            path: tokenizer_path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "a text encoder needs its tokenizer.json",
            ),
        });
    }
    let weights_path = dir.join(WEIGHTS);
    let prefix = tensor_prefix(&weights_path)?;
    let max_length = sentence_max_length(dir).unwrap_or(positions).min(positions);
    let (pooling, normalize) = sentence_pipeline(dir)?;

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
            tokenizer: relative(&tokenizer_path, relative_to),
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

/// The prefix the checkpoint puts before BERT's own names (`bert.` in task models),
/// from the file's header alone (a checkpoint can be gigabytes).
fn tensor_prefix(path: &Path) -> Result<String, ImportError> {
    use std::io::Read;
    let read_err = |source| ImportError::Read {
        path: path.into(),
        source,
    };
    let corrupt = |reason: String| ImportError::Weights {
        path: path.into(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(read_err)?;
    let length = u64::from_le_bytes(length);
    let size = file.metadata().map_err(read_err)?.len();
    if length > size.saturating_sub(8) || length > 100 << 20 {
        return Err(corrupt(format!(
            "its header claims {length} bytes of a {size}-byte file"
        )));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header).map_err(read_err)?;
    let header: Value =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("its header: {e}")))?;
    let names = header
        .as_object()
        .ok_or_else(|| corrupt("its header is not a JSON object".into()))?;
    let suffix = "embeddings.word_embeddings.weight";
    names
        .keys()
        .find_map(|name| name.strip_suffix(suffix).map(str::to_string))
        .ok_or_else(|| ImportError::NoEmbeddings { path: path.into() })
}

/// sentence-transformers' maximum sequence length, when the folder has one.
fn sentence_max_length(dir: &Path) -> Option<usize> {
    let config = read_json(&dir.join("sentence_bert_config.json")).ok()?;
    config.get("max_seq_length")?.as_u64().map(|v| v as usize)
}

/// sentence-transformers' pipeline (`modules.json`): its pooling and whether it
/// normalises. A module altc does not run (a `Dense` projection, say) is refused
/// rather than dropped; a plain BERT folder gets mean pooling over the mask.
fn sentence_pipeline(dir: &Path) -> Result<(Pooling, bool), ImportError> {
    let modules_path = dir.join("modules.json");
    let modules = match read_json(&modules_path) {
        Err(ImportError::Read { .. }) => return Ok((Pooling::MaskedMean, false)),
        other => other?,
    };
    let list = modules.as_array().ok_or_else(|| ImportError::Field {
        path: modules_path.clone(),
        key: "(the whole file)".into(),
        expected: "a list of modules",
    })?;
    let mut pooling = Pooling::MaskedMean;
    let mut normalize = false;
    for module in list {
        let kind = module.get("type").and_then(Value::as_str).unwrap_or("");
        let folder = module.get("path").and_then(Value::as_str).unwrap_or("");
        match kind.rsplit('.').next() {
            Some("Transformer") => {}
            Some("Pooling") => pooling = pooling_mode(&dir.join(folder).join(CONFIG))?,
            Some("Normalize") => normalize = true,
            _ => {
                return Err(ImportError::Unsupported {
                    path: modules_path,
                    key: "a module",
                    found: format!("\"{kind}\""),
                    supported: "Transformer, Pooling and Normalize",
                })
            }
        }
    }
    Ok((pooling, normalize))
}

/// A sentence-transformers pooling config's mode: mean over the mask or the first
/// token.
fn pooling_mode(path: &Path) -> Result<Pooling, ImportError> {
    let c = read_json(path)?;
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
        ["pooling_mode_mean_tokens"] => Ok(Pooling::MaskedMean),
        ["pooling_mode_cls_token"] => Ok(Pooling::First),
        _ => Err(ImportError::Unsupported {
            path: path.into(),
            key: "the pooling",
            found: format!("{modes:?}"),
            supported: "one of pooling_mode_mean_tokens and pooling_mode_cls_token",
        }),
    }
}

/// `path` relative to the folder `base` when `base` holds it; otherwise `path` made
/// absolute.
fn relative(path: &Path, base: &Path) -> String {
    let resolve = |p: &Path| {
        p.canonicalize()
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let (full, base) = (resolve(path), resolve(base));
    full.strip_prefix(&base)
        .unwrap_or(&full)
        .display()
        .to_string()
}
