//! The spec language: what users write in a `.ron` model file.
//!
//! Every struct rejects unknown fields and every enum is externally tagged
//! (`Shared`, `Fixed(257)`, `SmoothL1(beta: 1.0)`), so a typo is an error with a
//! location rather than a silently ignored setting. Fields with a sensible default
//! (the authors' setting) may be left out.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A whole Alt-MoE model: modalities and their encoders, the directions to align,
/// the shared MoE connector, the losses, the schedule and the optimisation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub modalities: Vec<Modality>,
    pub directions: Vec<Direction>,
    pub connector: Connector,
    pub losses: Vec<Loss>,
    #[serde(default)]
    pub schedule: Schedule,
    pub optimizer: Optimizer,
    pub training: Training,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Modality {
    pub name: String,
    /// Width of the encoder's output tokens (the latent space the connector reads
    /// and, as a target, regresses onto).
    pub width: usize,
    pub tokens: Tokens,
    pub encoder: Encoder,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tokens {
    /// Every example has exactly this many tokens (ViT patches + CLS).
    Fixed(usize),
    /// Up to `max` tokens; a `[B, max]` mask (1 = real token) says which are real.
    Padded { max: usize },
}

impl Tokens {
    pub fn count(self) -> usize {
        match self {
            Tokens::Fixed(n) | Tokens::Padded { max: n } => n,
        }
    }

    pub fn is_padded(self) -> bool {
        matches!(self, Tokens::Padded { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Encoder {
    /// Encoder outputs are computed once and read from data files ("vector
    /// pre-storage"): the model sees `[B, tokens, width]` directly.
    Precomputed,
    /// An encoder built from layers over raw features of `input_width`. Frozen
    /// encoders run forward only; their weights get no gradient and no update.
    Graph {
        input_width: usize,
        #[serde(default = "yes")]
        frozen: bool,
        layers: Vec<Layer>,
        /// Pretrained values for the layers' parameters; without it they are
        /// initialised from the seed.
        #[serde(default)]
        weights: Option<Weights>,
    },
    /// A transformer over token ids from raw text: input `<modality>.ids` (`[B, L]`)
    /// with its mask, L at most `max_length`. The first layer must be a
    /// `TokenEmbedding`.
    Text {
        /// A Hugging Face `tokenizer.json`, relative to the spec's folder.
        tokenizer: String,
        /// Tokens per item, special tokens included; longer items are cut (and
        /// counted).
        max_length: usize,
        #[serde(default = "yes")]
        frozen: bool,
        layers: Vec<Layer>,
        #[serde(default)]
        weights: Option<Weights>,
    },
}

impl Encoder {
    /// The layers and pretrained weights of a built encoder (`None` for precomputed
    /// latents).
    pub fn layers(&self) -> Option<(&[Layer], Option<&Weights>)> {
        match self {
            Encoder::Precomputed => None,
            Encoder::Graph {
                layers, weights, ..
            }
            | Encoder::Text {
                layers, weights, ..
            } => Some((layers, weights.as_ref())),
        }
    }

    pub fn is_frozen(&self) -> bool {
        match self {
            Encoder::Precomputed => true,
            Encoder::Graph { frozen, .. } | Encoder::Text { frozen, .. } => *frozen,
        }
    }
}

/// Pretrained parameter values from a safetensors file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    /// The safetensors file, relative to the spec's folder.
    pub file: String,
    /// A map from the file's tensor names to the encoder's parameter paths
    /// (`"encoder.layer.0.attention.self.query.weight": "layers.4.attention.query.weight"`).
    /// Every parameter of the encoder must be mapped; tensors of the file left out
    /// are ignored.
    pub tensors: BTreeMap<String, String>,
}

/// A pretrained encoder on its own, as `altc import` writes it: what `altc embed
/// --encoder` and `altc data text` run. Only text encoders can be files of their own
/// for now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderSpec {
    pub name: String,
    /// Width of the vectors (or tokens) it produces.
    pub width: usize,
    pub encoder: Encoder,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Layer {
    /// `x W + b` to `width`.
    Linear {
        width: usize,
        #[serde(default = "yes")]
        bias: bool,
    },
    /// `Linear(hidden) -> activation -> Linear(width)`, optionally added to its input
    /// (then `width` must equal the input width).
    Mlp {
        hidden: usize,
        width: usize,
        #[serde(default)]
        activation: Activation,
        #[serde(default)]
        residual: bool,
    },
    /// LayerNorm over the feature axis with learned scale and shift.
    LayerNorm {
        #[serde(default = "layer_norm_eps")]
        eps: f64,
    },
    /// Pre-norm multi-head self-attention block: `x + Wo . MHA(LN(x))`, padding
    /// tokens masked out of the keys.
    SelfAttention { heads: usize },
    /// Pools the tokens to one (`[B, L, d] -> [B, 1, d]`).
    TokenPool(Pooling),
    /// Token ids to vectors: row `id` of a learned `[vocab, width]` table.
    TokenEmbedding { vocab: usize, width: usize },
    /// Learned absolute positions: row `i` of a `[positions, width]` table added to
    /// token `i`.
    PositionEmbedding { positions: usize },
    /// Learned segment embeddings; single-segment input adds row 0 to every token.
    TokenTypeEmbedding { types: usize },
    /// A learned class token put before the tokens (ViT, DINOv2); it is never
    /// padding.
    ClassToken,
    /// One transformer encoder block: multi-head self-attention over the unmasked
    /// tokens, then an MLP of `intermediate` hidden width, each with biases and a
    /// residual. Its linear weights are stored `[out, in]`, as PyTorch's `nn.Linear`
    /// stores them.
    Block {
        heads: usize,
        intermediate: usize,
        #[serde(default)]
        norm: NormPlacement,
        #[serde(default = "layer_norm_eps")]
        eps: f64,
        #[serde(default)]
        activation: Activation,
        /// LayerScale: each residual branch scaled per feature by a learned vector
        /// started at this value (DINOv2); off when absent.
        #[serde(default)]
        layer_scale: Option<f64>,
    },
    /// L2 normalisation of each token (of the pooled vector after `TokenPool`).
    Normalize,
}

/// Where a block's LayerNorms sit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormPlacement {
    /// `x = LN(x + f(x))` for each sub-layer (BERT).
    #[default]
    Post,
    /// `x = x + f(LN(x))` for each sub-layer (ViT, DINOv2).
    Pre,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    #[default]
    Gelu,
    Relu,
    Silu,
    Tanh,
    Identity,
}

/// How token sequences become one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pooling {
    /// Mean over real tokens only (the correct default).
    #[default]
    MaskedMean,
    /// Mean over all positions, padding included (the authors' code).
    Mean,
    /// The first token (CLS).
    First,
}

/// One direction `source -> target` trained by the shared connector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Direction {
    pub name: String,
    pub source: String,
    pub target: String,
    /// Output width of each branch's head in this direction, by branch name: a
    /// regression head must produce the target modality's width, a contrastive head
    /// the target projection's width.
    pub heads: BTreeMap<String, usize>,
}

/// The MoE connector shared by every direction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connector {
    /// Hidden width `h` of the shared latent space.
    pub hidden: usize,
    /// A learned `[1, 1, d_source]` embedding added to the source tokens per direction.
    #[serde(default = "yes")]
    pub direction_embedding: bool,
    #[serde(default)]
    pub input_projection: InputProjection,
    pub router: Router,
    pub experts: Experts,
    pub branches: Vec<Branch>,
    #[serde(default)]
    pub branch_output: BranchOutput,
    pub target_projection: TargetProjection,
    #[serde(default)]
    pub pooling: Pooling,
}

/// Per-direction `Linear(d_source -> h)` followed by an activation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputProjection {
    #[serde(default)]
    pub activation: Activation,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Router {
    #[serde(default)]
    pub gate: Gate,
    #[serde(default)]
    pub gate_input: GateInput,
    pub top_k: usize,
    /// Renormalise the kept top-k probabilities to sum to one (the authors do not).
    #[serde(default)]
    pub renormalize: bool,
    #[serde(default = "yes")]
    pub bias: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gate {
    /// One gate for every branch; branches differ by their task embeddings (code).
    #[default]
    Shared,
    /// A separate gate per branch, i.e. per loss (paper).
    PerBranch,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GateInput {
    /// The gate reads the branch's hidden tokens `z_b`.
    #[default]
    Hidden,
    /// The gate reads `[z_b ; e_modality]`, a learned embedding of the source
    /// modality of this `width` concatenated to every token (paper).
    HiddenWithModality { width: usize },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experts {
    pub count: usize,
    pub hidden: usize,
    #[serde(default)]
    pub activation: Activation,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub pool: ExpertPool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpertPool {
    /// One pool of `count` experts for every direction (code).
    #[default]
    Shared,
    /// `count` experts per modality (M x count in all); a direction routes over the
    /// pool of its source modality (paper).
    PerModality,
}

/// One branch through the shared router and experts; each loss reads one branch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    pub name: String,
    /// A learned `[1, 1, h]` embedding added to `z` so a shared gate can tell
    /// branches apart.
    #[serde(default = "yes")]
    pub task_embedding: bool,
}

/// `o = act(LayerNorm(MoE(z_b))) + z_b`, each piece optional.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchOutput {
    #[serde(default = "yes")]
    pub layer_norm: bool,
    #[serde(default)]
    pub activation: Activation,
    #[serde(default = "yes")]
    pub residual: bool,
}

impl Default for BranchOutput {
    fn default() -> Self {
        BranchOutput {
            layer_norm: true,
            activation: Activation::Gelu,
            residual: true,
        }
    }
}

/// `Linear(d_target -> width)` per target modality, for the contrastive loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetProjection {
    pub width: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Loss {
    pub name: String,
    /// The branch whose head output this loss reads.
    pub output: String,
    pub kind: LossKind,
    /// The term's weight `alpha` in the direction's total loss.
    pub weight: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LossKind {
    /// Huber loss between pooled prediction and pooled target tokens (code).
    SmoothL1 {
        #[serde(default = "one")]
        beta: f64,
    },
    /// Mean squared error between pooled prediction and pooled target (paper).
    SquaredL2,
    /// Symmetric InfoNCE over cosine similarities with in-batch negatives.
    InfoNce { temperature: Temperature },
}

impl LossKind {
    pub fn is_regression(&self) -> bool {
        !matches!(self, LossKind::InfoNce { .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Temperature {
    Fixed(f64),
    /// A learned scalar, stored as `log(tau)` and started at `init`.
    Learned {
        init: f64,
    },
}

/// Which direction each step trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// Cycle through the directions in order, `steps_per_task` steps each (AGD).
    Alternate {
        #[serde(default = "one_usize")]
        steps_per_task: usize,
    },
    /// Every step sums the losses of all directions (the paper's ablation).
    Joint,
    /// Each step draws one direction with these probabilities (seeded).
    Sample { probabilities: Vec<f64> },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Alternate { steps_per_task: 1 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Optimizer {
    AdamW {
        #[serde(default = "adam_betas")]
        betas: (f64, f64),
        #[serde(default = "adam_eps")]
        eps: f64,
        lr: LrSchedule,
        weight_decay: DecaySchedule,
        /// Parameters that get no weight decay.
        #[serde(default = "default_no_decay")]
        no_decay: Vec<NoDecay>,
        #[serde(default)]
        clip: GradClip,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    Constant(f64),
    /// Linear from `start` to `peak` over the warm-up, then cosine to `final`.
    WarmupCosine {
        start: f64,
        peak: f64,
        #[serde(rename = "final")]
        end: f64,
        warmup: Span,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DecaySchedule {
    Constant(f64),
    /// Cosine from `start` to `final` over the whole run.
    Cosine {
        start: f64,
        #[serde(rename = "final")]
        end: f64,
    },
}

/// A stretch of training measured in steps, epochs, or a fraction of the run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Span {
    Steps(usize),
    Epochs(f64),
    Fraction(f64),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoDecay {
    /// Every bias vector.
    Biases,
    /// Every parameter with one non-unit dimension or fewer (norms, embeddings).
    OneDimensional,
    /// Parameters whose name starts with this prefix.
    Prefix(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum GradClip {
    #[default]
    Off,
    GlobalNorm(f64),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    pub batch_size: usize,
    pub duration: Duration,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub precision: Precision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Duration {
    Steps(usize),
    Epochs(usize),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    #[default]
    F32,
    /// bf16 compute with f32 master weights and optimizer state.
    Bf16,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn layer_norm_eps() -> f64 {
    1e-5
}
fn adam_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn adam_eps() -> f64 {
    1e-8
}
fn default_no_decay() -> Vec<NoDecay> {
    vec![NoDecay::Biases, NoDecay::OneDimensional]
}
