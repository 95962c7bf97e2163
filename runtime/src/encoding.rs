//! Pretrained encoders at run time: their weights read from safetensors through the
//! spec's name map (every tensor checked before anything runs), and raw text embedded
//! in batches of similar length, each length bucket lowered, optimised and planned
//! once.

use crate::backend::{Backend, BackendError};
use crate::text::{TextTokenizer, Tokenized, TokenizerError};
use altc_compiler::ir::DType;
use altc_compiler::lower::{lower_encoder, EncoderProgram, LowerError, ParamTable, IDS, MASK};
use altc_compiler::optimize::{optimize, Limits};
use altc_compiler::outputs::EMBEDDING;
use altc_compiler::reference::{EvalContext, Tensor, TensorMap};
use altc_compiler::spec::{Encoder, EncoderSpec, Layer, Weights};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum WeightsError {
    #[error("{path}: cannot read the weights: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a safetensors file (truncated or corrupt?): {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: tensor `{tensor}` (for parameter `{param}`) is not in the file")]
    Missing {
        path: PathBuf,
        tensor: String,
        param: String,
    },
    #[error("{path}: tensor `{tensor}` is {found:?}, but parameter `{param}` is {expected:?}")]
    Shape {
        path: PathBuf,
        tensor: String,
        param: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}` (for parameter `{param}`) is {found:?}; altc reads F32 or F64 weights")]
    DType {
        path: PathBuf,
        tensor: String,
        param: String,
        found: Dtype,
    },
    #[error("{path}: tensor `{tensor}` is mapped to `{param}`, which the encoder does not have (its parameters: {known})")]
    UnknownParam {
        path: PathBuf,
        tensor: String,
        param: String,
        known: String,
    },
    #[error("{path}: no tensor is mapped to parameter{} {}", if .params.len() == 1 { "" } else { "s" }, .params.join(", "))]
    Unmapped { path: PathBuf, params: Vec<String> },
    #[error("{path}: tensor `{tensor}` holds a non-finite value ({value}) at element {at}")]
    NonFinite {
        path: PathBuf,
        tensor: String,
        value: f64,
        at: usize,
    },
}

/// Every parameter of `params` from `weights.file` (relative paths taken from
/// `base`), as `dtype` tensors. Checks presence, shape, dtype and finiteness of every
/// mapped tensor, and that every parameter is mapped, before returning any.
pub fn load_weights(
    weights: &Weights,
    base: &Path,
    params: &ParamTable,
    dtype: DType,
) -> Result<TensorMap, WeightsError> {
    let path = base.join(&weights.file);
    let bytes = std::fs::read(&path).map_err(|source| WeightsError::Read {
        path: path.clone(),
        source,
    })?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| WeightsError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let expected: HashMap<&str, &[usize]> = params
        .iter()
        .map(|p| (p.name.as_str(), p.shape.as_slice()))
        .collect();
    let mut state = TensorMap::new();
    for (tensor, param) in &weights.tensors {
        let Some(&shape) = expected.get(param.as_str()) else {
            let known: BTreeSet<&str> = expected.keys().copied().collect();
            return Err(WeightsError::UnknownParam {
                path,
                tensor: tensor.clone(),
                param: param.clone(),
                known: known.into_iter().collect::<Vec<_>>().join(", "),
            });
        };
        let view = file.tensor(tensor).map_err(|_| WeightsError::Missing {
            path: path.clone(),
            tensor: tensor.clone(),
            param: param.clone(),
        })?;
        if view.shape() != shape {
            return Err(WeightsError::Shape {
                path,
                tensor: tensor.clone(),
                param: param.clone(),
                found: view.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            found => {
                return Err(WeightsError::DType {
                    path,
                    tensor: tensor.clone(),
                    param: param.clone(),
                    found,
                })
            }
        };
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(WeightsError::NonFinite {
                path,
                tensor: tensor.clone(),
                value: values[at],
                at,
            });
        }
        state.insert(param.clone(), Tensor::from_f64(dtype, shape, values));
    }
    let unmapped: Vec<String> = params
        .iter()
        .filter(|p| !state.contains_key(&p.name))
        .map(|p| format!("`{}`", p.name))
        .collect();
    if !unmapped.is_empty() {
        return Err(WeightsError::Unmapped {
            path,
            params: unmapped,
        });
    }
    Ok(state)
}

#[derive(Debug, Error)]
pub enum EncodeError {
    #[error("{0} has no tokenizer: `altc embed --text` takes a text encoder (encoder: Text(...))")]
    NotText(String),
    #[error("{0} has no pretrained weights (weights: ...), so its vectors would be random")]
    NoWeights(String),
    #[error(
        "{0} does not pool its tokens to one vector per item: end its layers with TokenPool(...)"
    )]
    NotPooled(String),
    #[error("{0}: token output keeps the text's tokens and their mask, but a ClassToken layer adds a token of its own; embed pooled vectors instead")]
    ClassTokenInTokens(String),
    #[error("{name}: its tokens come before TokenPool, but layers after it hold weights ({params}) that token output would drop")]
    WeightsAfterPool { name: String, params: String },
    #[error("{path}: the tokenizer makes ids up to {tokens} (added tokens included), but the encoder's TokenEmbedding has {vocab} rows; a larger id would read past the table")]
    Vocabulary {
        path: PathBuf,
        tokens: usize,
        vocab: usize,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("lowering the encoder: {0}")]
    Lower(#[from] LowerError),
    #[error("optimising the encoder: {0}")]
    Optimise(altc_compiler::ir::GraphError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// The tokenizer of the text encoder `spec` (its path relative to `base`), checked to
/// make no id past the encoder's embedding table.
pub fn load_tokenizer(spec: &EncoderSpec, base: &Path) -> Result<TextTokenizer, EncodeError> {
    let Encoder::Text {
        tokenizer,
        max_length,
        layers,
        ..
    } = &spec.encoder
    else {
        return Err(EncodeError::NotText(spec.name.clone()));
    };
    let tokenizer = TextTokenizer::load(&base.join(tokenizer), *max_length)?;
    if let Some(Layer::TokenEmbedding { vocab, .. }) = layers.first() {
        if tokenizer.vocab_size() > *vocab {
            return Err(EncodeError::Vocabulary {
                path: tokenizer.path().to_path_buf(),
                tokens: tokenizer.vocab_size(),
                vocab: *vocab,
            });
        }
    }
    Ok(tokenizer)
}

/// Bucket lengths: powers of two from 8, so a batch is padded to at most twice its
/// longest item and a corpus compiles a handful of graphs; never past `max`.
pub fn bucket_length(length: usize, max: usize) -> usize {
    length.max(8).next_power_of_two().min(max)
}

/// What an encoder gives for each item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderOutput {
    /// Its pooled vector (normalised where the spec says so): one per item.
    Pooled,
    /// The tokens of its last layer before `TokenPool`, with a mask of the real ones:
    /// what a model's padded `Precomputed` modality trains on.
    Tokens,
}

/// What an encoder run produced, in input order: `[items, tokens_per_item, width]`
/// values, with `mask` `[items, tokens_per_item]` (1 = a real token) for token output.
#[derive(Clone, Debug)]
pub struct Embedded {
    pub vectors: Vec<f32>,
    pub width: usize,
    /// 1 for pooled output; for tokens, the longest item's length (shorter items
    /// padded with zeros, masked out).
    pub tokens_per_item: usize,
    pub mask: Option<Vec<f32>>,
    /// Items cut to the maximum length.
    pub truncated: usize,
    /// Real tokens over all items, special tokens included.
    pub tokens: usize,
    /// Kernel launches of the last batch, on backends that launch kernels.
    pub launches: Option<usize>,
    /// Length buckets whose batches were cut to fit the device, with the batch size
    /// that fit.
    pub cut_batches: BTreeMap<usize, usize>,
}

/// A text encoder ready to run: its tokenizer, weights, and one lowered program per
/// length bucket.
pub struct TextEncoder {
    spec: EncoderSpec,
    tokenizer: TextTokenizer,
    state: TensorMap,
    dtype: DType,
    optimise: bool,
    output: EncoderOutput,
    programs: BTreeMap<usize, EncoderProgram>,
}

/// `spec` cut before its first `TokenPool`, so its graph outputs tokens; refused
/// where the layers cut hold weights (they would be silently dropped).
fn token_output_spec(spec: &EncoderSpec, max_length: usize) -> Result<EncoderSpec, EncodeError> {
    let mut tokens = spec.clone();
    if let Encoder::Text { layers, .. } = &mut tokens.encoder {
        if let Some(pool) = layers.iter().position(|l| matches!(l, Layer::TokenPool(_))) {
            layers.truncate(pool);
        }
        // A class token adds a row the mask of the item's text tokens does not cover.
        if layers.iter().any(|l| matches!(l, Layer::ClassToken)) {
            return Err(EncodeError::ClassTokenInTokens(spec.name.clone()));
        }
    }
    let full = lower_encoder(spec, max_length, DType::F32)?;
    let kept = lower_encoder(&tokens, max_length, DType::F32)?;
    let dropped: Vec<&str> = full
        .params
        .iter()
        .map(|p| p.name.as_str())
        .filter(|name| kept.params.get(name).is_none())
        .collect();
    if !dropped.is_empty() {
        return Err(EncodeError::WeightsAfterPool {
            name: spec.name.clone(),
            params: dropped.join(", "),
        });
    }
    Ok(tokens)
}

impl TextEncoder {
    /// Reads the tokenizer and weights `spec` names (paths relative to `base`, the
    /// spec's folder) for graphs in `dtype` giving `output`, optimised by the e-graph
    /// when `optimise`.
    pub fn open(
        spec: &EncoderSpec,
        base: &Path,
        dtype: DType,
        optimise: bool,
        output: EncoderOutput,
    ) -> Result<TextEncoder, EncodeError> {
        let tokenizer = load_tokenizer(spec, base)?;
        let Encoder::Text {
            max_length,
            weights,
            ..
        } = &spec.encoder
        else {
            unreachable!("load_tokenizer takes text encoders only")
        };
        let weights = weights
            .as_ref()
            .ok_or_else(|| EncodeError::NoWeights(spec.name.clone()))?;
        let spec = match output {
            EncoderOutput::Pooled => spec.clone(),
            EncoderOutput::Tokens => token_output_spec(spec, *max_length)?,
        };
        // The parameter table does not depend on the length: tables are sliced in
        // the graph.
        let program = lower_encoder(&spec, *max_length, dtype)?;
        let embedding = program
            .graph
            .output(EMBEDDING)
            .expect("encoders output `embedding`");
        if output == EncoderOutput::Pooled && program.graph.node(embedding).ty.shape.rank() != 2 {
            return Err(EncodeError::NotPooled(spec.name.clone()));
        }
        let state = load_weights(weights, base, &program.params, dtype)?;
        Ok(TextEncoder {
            spec,
            tokenizer,
            state,
            dtype,
            optimise,
            output,
            programs: BTreeMap::new(),
        })
    }

    pub fn parameters(&self) -> usize {
        self.state.values().map(Tensor::len).sum()
    }

    pub fn max_length(&self) -> usize {
        self.tokenizer.max_length()
    }

    /// Tokens `text` becomes, special tokens included, after truncation.
    pub fn token_count(&self, text: &str) -> Result<usize, EncodeError> {
        Ok(self.tokenizer.encode(&[text])?.row_length(0))
    }

    /// The weights, for `Backend::load_state`.
    pub fn state(&self) -> &TensorMap {
        &self.state
    }

    /// The graph for inputs of `length` tokens, lowered (and optimised) on first use.
    pub fn program(&mut self, length: usize) -> Result<&EncoderProgram, EncodeError> {
        if !self.programs.contains_key(&length) {
            let mut program = lower_encoder(&self.spec, length, self.dtype)?;
            if self.optimise {
                let (graph, _) =
                    optimize(&program.graph, Limits::default()).map_err(EncodeError::Optimise)?;
                program.graph = graph;
            }
            self.programs.insert(length, program);
        }
        Ok(&self.programs[&length])
    }

    /// Embeds `items` on `backend` (whose state must be [`TextEncoder::state`]): items
    /// of one length bucket together, up to `batch` at a time, fewer where a batch
    /// would not fit the device. `progress` hears the items done so far.
    pub fn embed(
        &mut self,
        backend: &mut dyn Backend,
        items: &[&str],
        batch: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Embedded, EncodeError> {
        let tokenized = self.tokenizer.encode(items)?;
        let lengths: Vec<usize> = (0..tokenized.rows)
            .map(|r| tokenized.row_length(r))
            .collect();
        let mut buckets: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (item, &length) in lengths.iter().enumerate() {
            let key = bucket_length(length, self.max_length());
            buckets.entry(key).or_default().push(item);
        }
        let width = self.spec.width;
        let per_item = match self.output {
            EncoderOutput::Pooled => 1,
            EncoderOutput::Tokens => lengths.iter().copied().max().unwrap_or(1),
        };
        let mut vectors = vec![0f32; items.len() * per_item * width];
        let mask = (self.output == EncoderOutput::Tokens).then(|| {
            let mut mask = vec![0f32; items.len() * per_item];
            for (item, &length) in lengths.iter().enumerate() {
                mask[item * per_item..item * per_item + length].fill(1.0);
            }
            mask
        });
        let mut launches = None;
        let mut cut_batches = BTreeMap::new();
        let mut done = 0;
        // Longest first, so a batch that does not fit shows early.
        for (&length, members) in buckets.iter().rev() {
            let mut size = batch.max(1);
            let mut rest = &members[..];
            while !rest.is_empty() {
                let chunk = &rest[..size.min(rest.len())];
                let values = match self.run_batch(backend, &tokenized, chunk, length) {
                    Err(EncodeError::Backend(BackendError::DoesNotFit(_))) if size > 1 => {
                        size /= 2;
                        cut_batches.insert(length, size);
                        continue;
                    }
                    result => result?,
                };
                launches = backend.kernel_launches();
                // A pooled batch is [chunk, width]; a token batch [chunk, length,
                // width], of which an item keeps its real tokens.
                let rows = match self.output {
                    EncoderOutput::Pooled => 1,
                    EncoderOutput::Tokens => length,
                };
                for (r, &item) in chunk.iter().enumerate() {
                    let real = match self.output {
                        EncoderOutput::Pooled => width,
                        EncoderOutput::Tokens => lengths[item] * width,
                    };
                    let from = &values[r * rows * width..][..real];
                    let to = &mut vectors[item * per_item * width..][..real];
                    for (t, f) in to.iter_mut().zip(from) {
                        *t = *f as f32;
                    }
                }
                rest = &rest[chunk.len()..];
                done += chunk.len();
                progress(done);
            }
        }
        Ok(Embedded {
            vectors,
            width,
            tokens_per_item: per_item,
            mask,
            truncated: tokenized.truncated,
            tokens: lengths.iter().sum(),
            launches,
            cut_batches,
        })
    }

    /// One batch of `chunk`'s items padded to `length`: their vectors, row-major.
    fn run_batch(
        &mut self,
        backend: &mut dyn Backend,
        tokenized: &Tokenized,
        chunk: &[usize],
        length: usize,
    ) -> Result<Vec<f64>, EncodeError> {
        let dtype = self.dtype;
        let mut ids = vec![0i32; chunk.len() * length];
        let mut mask = vec![0f64; chunk.len() * length];
        for (r, &item) in chunk.iter().enumerate() {
            for (t, id) in tokenized.row(item).into_iter().enumerate() {
                ids[r * length + t] = id as i32;
                mask[r * length + t] = 1.0;
            }
        }
        let inputs = TensorMap::from([
            (IDS.to_string(), Tensor::i32(&[chunk.len(), length], ids)),
            (
                MASK.to_string(),
                Tensor::from_f64(dtype, &[chunk.len(), length], mask),
            ),
        ]);
        let graph = &self.program(length)?.graph;
        let out = backend.run(graph, &inputs, EvalContext::default())?;
        Ok(out[EMBEDDING].to_f64())
    }
}
