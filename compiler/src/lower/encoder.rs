//! Encoders: the layers of a modality's encoder (inside a model) or of a pretrained
//! encoder on its own (`altc embed --encoder`), from token ids or float features to
//! tokens or one pooled vector.

use super::builder::{Builder, Result};
use super::params::{Init, ParamKind, ParamTable};
use super::{batch_shape, LowerError};
use crate::ir::{BuildGraph, DType, Dim, Graph, NodeId, Op, Shape};
use crate::outputs::EMBEDDING;
use crate::spec::{Activation, Encoder, EncoderSpec, Layer, NormPlacement};

/// The input of a text encoder: `[B, L]` token ids.
pub const IDS: &str = "ids";
/// The input of a feature encoder: `[B, L, input_width]`.
pub const TOKENS: &str = "tokens";
/// `[B, L]`, 1 for a real token and 0 for padding.
pub const MASK: &str = "mask";

/// A pretrained encoder lowered on its own for one sequence length.
#[derive(Clone, Debug)]
pub struct EncoderProgram {
    pub name: String,
    pub dtype: DType,
    /// Tokens per item the graph takes.
    pub length: usize,
    pub params: ParamTable,
    /// Inputs `ids` (or `tokens`) and `mask`; output `embedding`, `[B, width]` when
    /// the encoder pools, `[B, tokens, width]` otherwise.
    pub graph: Graph,
}

/// Lowers `spec` for inputs of `length` tokens (at most the spec's maximum): one
/// graph, `encoder`, over a parameter table named as in the spec's weight map
/// (`layers.4.attention.query.weight`).
pub fn lower_encoder(
    spec: &EncoderSpec,
    length: usize,
    dtype: DType,
) -> std::result::Result<EncoderProgram, LowerError> {
    let mut params = ParamTable::default();
    let mut streams = 0;
    let mut b = Builder::new("encoder", &mut params, &mut streams, dtype);
    let run = EncoderRun {
        inputs: "",
        params: "",
        path: "encoder",
        tokens: length,
        padded: true,
        width: spec.width,
    };
    let (x, _) = run.lower(&mut b, &spec.encoder)?;
    let dims = b.ty(x).dims().to_vec();
    let out = if dims[1] == Dim::Fixed(1) {
        b.at("encoder", |b| {
            b.reshape(x, Shape(vec![dims[0].clone(), dims[2].clone()]))
        })?
    } else {
        x
    };
    b.graph.set_output(EMBEDDING, out)?;
    let graph = b.graph;
    let frozen = spec.encoder.is_frozen();
    for p in params.iter_mut() {
        p.trainable = !frozen;
        p.decay = false;
    }
    Ok(EncoderProgram {
        name: spec.name.clone(),
        dtype,
        length,
        params,
        graph,
    })
}

/// Where one encoder's nodes and names go.
pub(super) struct EncoderRun<'a> {
    /// Prefix of its input names (`text.` in a model).
    pub inputs: &'a str,
    /// Prefix of its parameter names (`encoders.text.` in a model).
    pub params: &'a str,
    /// Its spec path, for errors.
    pub path: &'a str,
    pub tokens: usize,
    pub padded: bool,
    /// Width of precomputed tokens.
    pub width: usize,
}

impl EncoderRun<'_> {
    /// The encoder's inputs through its layers: tokens (or pooled tokens) and the
    /// mask that still applies to them.
    pub fn lower(&self, b: &mut Builder, encoder: &Encoder) -> Result<(NodeId, Option<NodeId>)> {
        let tokens = self.tokens;
        let mut mask = if self.padded {
            Some(b.float_input(&format!("{}{MASK}", self.inputs), batch_shape(&[tokens]))?)
        } else {
            None
        };
        let (mut x, mut width, layers) = match encoder {
            Encoder::Precomputed => {
                let x = b.float_input(
                    &format!("{}{TOKENS}", self.inputs),
                    batch_shape(&[tokens, self.width]),
                )?;
                return Ok((x, mask));
            }
            Encoder::Graph {
                input_width,
                layers,
                ..
            } => {
                let x = b.float_input(
                    &format!("{}{TOKENS}", self.inputs),
                    batch_shape(&[tokens, *input_width]),
                )?;
                (x, *input_width, &layers[..])
            }
            Encoder::Text { layers, .. } => {
                let Some(Layer::TokenEmbedding { vocab, width }) = layers.first() else {
                    unreachable!("validated: a text encoder starts with TokenEmbedding")
                };
                let ids = b.input(
                    &format!("{}{IDS}", self.inputs),
                    DType::I32,
                    batch_shape(&[tokens]),
                )?;
                let x = b.at(&format!("{}.layers[0]", self.path), |b| {
                    let prefix = format!("{}layers.0", self.params);
                    let table = embedding_table(b, &prefix, *vocab, *width)?;
                    embed_tokens(b, ids, table)
                })?;
                (x, *width, &layers[1..])
            }
        };
        // A text encoder's TokenEmbedding (layer 0) ran above; indices stay the spec's.
        let skipped = usize::from(matches!(encoder, Encoder::Text { .. }));
        for (i, layer) in layers.iter().enumerate() {
            let li = i + skipped;
            let prefix = format!("{}layers.{li}", self.params);
            let lpath = format!("{}.layers[{li}]", self.path);
            (x, width, mask) =
                b.at(&lpath, |b| layer_forward(b, layer, &prefix, x, width, mask))?;
        }
        Ok((x, mask))
    }
}

/// A learned `[rows, width]` table, `<prefix>.table` (normal, std 0.02).
fn embedding_table(b: &mut Builder, prefix: &str, rows: usize, width: usize) -> Result<NodeId> {
    b.param(
        &format!("{prefix}.table"),
        &[rows, width],
        ParamKind::Embedding,
        Init::Normal { std: 0.02 },
    )
}

/// `x` plus the first `count` rows of the `[rows, width]` table at `prefix`,
/// broadcast over the batch (row `i` to token `i`, or one row to every token).
fn add_first_rows(
    b: &mut Builder,
    x: NodeId,
    prefix: &str,
    rows: usize,
    width: usize,
    count: usize,
) -> Result<NodeId> {
    let table = embedding_table(b, prefix, rows, width)?;
    let first = b.push(
        Op::Slice {
            axis: 0,
            start: 0,
            end: count,
        },
        &[table],
    )?;
    b.add(x, first)
}

/// Rows `ids` (`[B, L]`, `I32`) of `table` (`[vocab, width]`): one gather along the
/// vocabulary, the table broadcast over the batch and the ids over the width.
fn embed_tokens(b: &mut Builder, ids: NodeId, table: NodeId) -> Result<NodeId> {
    let dims = b.ty(ids).dims().to_vec();
    let table_dims = b.ty(table).dims().to_vec();
    let table = b.reshape(
        table,
        Shape(vec![
            Dim::Fixed(1),
            table_dims[0].clone(),
            table_dims[1].clone(),
        ]),
    )?;
    let index = b.reshape(
        ids,
        Shape(vec![dims[0].clone(), dims[1].clone(), Dim::Fixed(1)]),
    )?;
    let shape = Shape(vec![
        dims[0].clone(),
        dims[1].clone(),
        table_dims[1].clone(),
    ]);
    let index = b.push(Op::BroadcastTo { shape }, &[index])?;
    b.push(Op::Gather { axis: 1 }, &[table, index])
}

fn layer_forward(
    b: &mut Builder,
    layer: &Layer,
    prefix: &str,
    x: NodeId,
    width: usize,
    mask: Option<NodeId>,
) -> Result<(NodeId, usize, Option<NodeId>)> {
    let tokens = b.ty(x).dims()[1].fixed().expect("token counts are fixed");
    Ok(match layer {
        Layer::Linear { width: out, bias } => {
            (b.linear(x, prefix, width, *out, *bias)?, *out, mask)
        }
        Layer::Mlp {
            hidden,
            width: out,
            activation,
            residual,
        } => {
            let h = b.linear(x, &format!("{prefix}.fc1"), width, *hidden, true)?;
            let h = b.activation(*activation, h)?;
            let mut y = b.linear(h, &format!("{prefix}.fc2"), *hidden, *out, true)?;
            if *residual {
                y = b.add(y, x)?;
            }
            (y, *out, mask)
        }
        Layer::LayerNorm { eps } => (
            b.layer_norm(x, &format!("{prefix}.norm"), width, *eps)?,
            width,
            mask,
        ),
        Layer::SelfAttention { heads } => {
            let normed = b.layer_norm(x, &format!("{prefix}.norm"), width, 1e-5)?;
            let mut project = |b: &mut Builder, x: NodeId, name: &str| {
                b.linear(x, &format!("{prefix}.{name}"), width, width, true)
            };
            let out = attention(b, normed, width, *heads, mask, &mut project)?;
            (b.add(x, out)?, width, mask)
        }
        Layer::TokenPool(pooling) => {
            let pooled = b.pool(x, mask, *pooling)?;
            (b.reshape(pooled, batch_shape(&[1, width]))?, width, None)
        }
        Layer::TokenEmbedding { .. } => {
            unreachable!("validated: only a text encoder's first layer embeds ids")
        }
        Layer::PositionEmbedding { positions } => (
            add_first_rows(b, x, prefix, *positions, width, tokens)?,
            width,
            mask,
        ),
        // One segment: every token is of type 0.
        Layer::TokenTypeEmbedding { types } => {
            (add_first_rows(b, x, prefix, *types, width, 1)?, width, mask)
        }
        Layer::ClassToken => {
            let token = b.param(
                &format!("{prefix}.token"),
                &[1, 1, width],
                ParamKind::Embedding,
                Init::Normal { std: 0.02 },
            )?;
            let token = b.push(
                Op::BroadcastTo {
                    shape: batch_shape(&[1, width]),
                },
                &[token],
            )?;
            let x = b.push(Op::Concat { axis: 1 }, &[token, x])?;
            let mask = match mask {
                Some(m) => {
                    let dtype = b.dtype;
                    let real = b.constant(1.0, dtype, batch_shape(&[1]))?;
                    Some(b.push(Op::Concat { axis: 1 }, &[real, m])?)
                }
                None => None,
            };
            (x, width, mask)
        }
        Layer::Block {
            heads,
            intermediate,
            norm,
            eps,
            activation,
            layer_scale,
        } => {
            let block = BlockShape {
                heads: *heads,
                intermediate: *intermediate,
                pre: *norm == NormPlacement::Pre,
                eps: *eps,
                activation: *activation,
                layer_scale: *layer_scale,
            };
            (
                transformer_block(b, &block, prefix, x, width, mask)?,
                width,
                mask,
            )
        }
        Layer::Normalize => (b.l2_normalize(x)?, width, mask),
    })
}

/// Multi-head scaled dot-product attention of `x` over its unmasked tokens, through
/// the `query`, `key`, `value` and `output` projections `project` makes.
fn attention(
    b: &mut Builder,
    x: NodeId,
    width: usize,
    heads: usize,
    mask: Option<NodeId>,
    project: &mut dyn FnMut(&mut Builder, NodeId, &str) -> Result<NodeId>,
) -> Result<NodeId> {
    let tokens = b.ty(x).dims()[1].fixed().expect("token counts are fixed");
    let head_width = width / heads;
    let mut split = |b: &mut Builder, name: &str| -> Result<NodeId> {
        let y = project(b, x, name)?;
        let y = b.reshape(y, batch_shape(&[tokens, heads, head_width]))?;
        b.transpose(y, &[0, 2, 1, 3])
    };
    let q = split(b, "query")?;
    let k = split(b, "key")?;
    let v = split(b, "value")?;
    let scores = b.matmul(q, k, false, true)?;
    let mut scores = b.scale(scores, 1.0 / (head_width as f64).sqrt())?;
    if let Some(mask) = mask {
        // Padding keys get a large negative bias: (mask - 1) * 1e9, shaped [B, 1, 1, L].
        let one = b.scalar(1.0)?;
        let off = b.sub(mask, one)?;
        let bias = b.scale(off, 1e9)?;
        let bias = b.reshape(bias, batch_shape(&[1, 1, tokens]))?;
        scores = b.add(scores, bias)?;
    }
    let probs = b.softmax(scores, 3)?;
    let attended = b.matmul(probs, v, false, false)?;
    let merged = b.transpose(attended, &[0, 2, 1, 3])?;
    let merged = b.reshape(merged, batch_shape(&[tokens, width]))?;
    project(b, merged, "output")
}

/// A `Layer::Block`'s settings.
struct BlockShape {
    heads: usize,
    intermediate: usize,
    /// LayerNorm before each branch (else after each residual sum).
    pre: bool,
    eps: f64,
    activation: Activation,
    layer_scale: Option<f64>,
}

/// Attention then MLP, each a residual branch with a LayerNorm after the sum
/// (`Post`) or before the branch (`Pre`), optionally scaled by LayerScale.
fn transformer_block(
    b: &mut Builder,
    block: &BlockShape,
    prefix: &str,
    x: NodeId,
    width: usize,
    mask: Option<NodeId>,
) -> Result<NodeId> {
    let eps = block.eps;
    let pre = block.pre;
    let attention_norm = format!("{prefix}.attention_norm");
    let mlp_norm = format!("{prefix}.mlp_norm");

    let input = if pre {
        b.layer_norm(x, &attention_norm, width, eps)?
    } else {
        x
    };
    let mut project = |b: &mut Builder, x: NodeId, name: &str| {
        b.dense(x, &format!("{prefix}.attention.{name}"), width, width)
    };
    let attended = attention(b, input, width, block.heads, mask, &mut project)?;
    let attended = layer_scale(
        b,
        block,
        &format!("{prefix}.attention_scale"),
        attended,
        width,
    )?;
    let mut x = b.add(x, attended)?;
    if !pre {
        x = b.layer_norm(x, &attention_norm, width, eps)?;
    }

    let input = if pre {
        b.layer_norm(x, &mlp_norm, width, eps)?
    } else {
        x
    };
    let h = b.dense(
        input,
        &format!("{prefix}.mlp.fc1"),
        width,
        block.intermediate,
    )?;
    let h = b.activation(block.activation, h)?;
    let h = b.dense(h, &format!("{prefix}.mlp.fc2"), block.intermediate, width)?;
    let h = layer_scale(b, block, &format!("{prefix}.mlp_scale"), h, width)?;
    let mut x = b.add(x, h)?;
    if !pre {
        x = b.layer_norm(x, &mlp_norm, width, eps)?;
    }
    Ok(x)
}

/// `x * gamma` per feature when the block has LayerScale, else `x`.
fn layer_scale(
    b: &mut Builder,
    block: &BlockShape,
    name: &str,
    x: NodeId,
    width: usize,
) -> Result<NodeId> {
    let Some(start) = block.layer_scale else {
        return Ok(x);
    };
    let gamma = b.param(name, &[width], ParamKind::Norm, Init::Constant(start))?;
    b.mul(x, gamma)
}
