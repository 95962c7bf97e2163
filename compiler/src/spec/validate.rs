//! Semantic rules a parsed spec must satisfy before it is lowered. Each rule names
//! the offending spec path and what would be valid; the first broken rule is reported.

use super::{
    DecaySchedule, Duration, Encoder, EncoderSpec, ExpertPool, GateInput, GradClip, Layer, Loaded,
    LoadedSpec, LossKind, LrSchedule, Optimizer, Schedule, Span, SpecError, Temperature,
};
use std::collections::BTreeSet;

type Check = Result<(), SpecError>;

/// Upper bounds on the spec's sizes. Together they keep every derived size
/// representable in 64 bits: the largest tensor a plan can hold (attention scores
/// `[batch, heads, tokens, tokens]`, 2^60 elements, or the dense MoE's per-example
/// weight gradient `[batch, experts, hidden, hidden]`, 2^58) and the parameter count.
/// Whether such a model fits a machine is checked where memory is allocated.
pub const MAX_WIDTH: usize = 1 << 16;
pub const MAX_TOKENS: usize = 1 << 14;
pub const MAX_EXPERTS: usize = 1 << 10;
pub const MAX_BATCH: usize = 1 << 16;
/// Steps, epochs and steps per task.
pub const MAX_STEPS: usize = 1 << 32;

pub fn validate(s: &LoadedSpec) -> Check {
    let spec = &s.spec;
    if spec.name.trim().is_empty() {
        return Err(s.invalid("name", "the model needs a name", "any non-empty string"));
    }
    modalities(s)?;
    connector(s)?;
    losses(s)?;
    directions(s)?;
    schedule(s)?;
    optimizer(s)?;
    training(s)
}

fn unique<'a, T>(
    s: &Loaded<T>,
    what: &str,
    path: &str,
    names: impl Iterator<Item = &'a str>,
) -> Check {
    let mut seen = BTreeSet::new();
    for (i, name) in names.enumerate() {
        if name.trim().is_empty() {
            return Err(s.invalid(
                &format!("{path}[{i}].name"),
                format!("{what} names cannot be empty"),
                "",
            ));
        }
        if !seen.insert(name) {
            return Err(s.invalid(
                &format!("{path}[{i}].name"),
                format!("{what} `{name}` is declared twice"),
                format!("{what} names must be unique"),
            ));
        }
    }
    Ok(())
}

/// A size from 1 to `max`.
fn size<T>(s: &Loaded<T>, path: &str, value: usize, max: usize, what: &str) -> Check {
    if value == 0 || value > max {
        return Err(s.invalid(
            path,
            format!("{what} is {value}"),
            format!(
                "a whole number from 1 to {}",
                crate::summary::thousands(max)
            ),
        ));
    }
    Ok(())
}

/// A width or hidden size.
fn width<T>(s: &Loaded<T>, path: &str, value: usize, what: &str) -> Check {
    size(s, path, value, MAX_WIDTH, what)
}

fn positive_real<T>(s: &Loaded<T>, path: &str, value: f64, what: &str) -> Check {
    if !(value.is_finite() && value > 0.0) {
        return Err(s.invalid(
            path,
            format!("{what} is {value}"),
            "a finite number above 0",
        ));
    }
    Ok(())
}

fn in_unit<T>(s: &Loaded<T>, path: &str, value: f64, what: &str, upper_inclusive: bool) -> Check {
    let ok = value >= 0.0
        && if upper_inclusive {
            value <= 1.0
        } else {
            value < 1.0
        };
    if !ok {
        let range = if upper_inclusive {
            "0 to 1"
        } else {
            "at least 0 and below 1"
        };
        return Err(s.invalid(
            path,
            format!("{what} is {value}"),
            format!("a number from {range}"),
        ));
    }
    Ok(())
}

fn names(list: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = list.map(|n| format!("`{n}`")).collect();
    if v.is_empty() {
        "none are declared".into()
    } else {
        format!("valid: {}", v.join(", "))
    }
}

fn modalities(s: &LoadedSpec) -> Check {
    let spec = &s.spec;
    if spec.modalities.is_empty() {
        return Err(s.invalid(
            "modalities",
            "no modalities are declared",
            "declare at least two",
        ));
    }
    unique(
        s,
        "modality",
        "modalities",
        spec.modalities.iter().map(|m| m.name.as_str()),
    )?;
    for (i, m) in spec.modalities.iter().enumerate() {
        let path = format!("modalities[{i}]");
        width(s, &format!("{path}.width"), m.width, "the width")?;
        size(
            s,
            &format!("{path}.tokens"),
            m.tokens.count(),
            MAX_TOKENS,
            "the token count",
        )?;
        if let Encoder::Text { .. } = m.encoder {
            return Err(s.invalid(
                &format!("{path}.encoder"),
                "a model cannot take raw text yet: `altc run` feeds encoders float tokens",
                "embed the text with `altc embed --encoder` and train on the vectors with encoder: Precomputed",
            ));
        }
        if let Encoder::Graph {
            weights: Some(_), ..
        } = m.encoder
        {
            return Err(s.invalid(
                &format!("{path}.encoder.weights"),
                "`altc run` does not load pretrained weights into a model's encoder yet",
                "embed with the pretrained encoder (`altc embed --encoder`) and train on the vectors with encoder: Precomputed",
            ));
        }
        let owner = format!("modality `{}`", m.name);
        encoder(
            s,
            &format!("{path}.encoder"),
            &owner,
            &m.encoder,
            m.width,
            m.tokens.count(),
        )?;
    }
    Ok(())
}

/// Checks a pretrained-encoder file: its name, its encoder and its weight map.
pub fn validate_encoder(s: &Loaded<EncoderSpec>) -> Check {
    let spec = &s.spec;
    if spec.name.trim().is_empty() {
        return Err(s.invalid("name", "the encoder needs a name", "any non-empty string"));
    }
    width(s, "width", spec.width, "the width")?;
    let Encoder::Text { max_length, .. } = &spec.encoder else {
        return Err(s.invalid(
            "encoder",
            "only text encoders can be files of their own for now (altc runs them with `embed --text`)",
            "encoder: Text(tokenizer: ..., max_length: ..., layers: [...])",
        ));
    };
    let tokens = *max_length;
    encoder(s, "encoder", "the file", &spec.encoder, spec.width, tokens)
}

/// The ids a text encoder reads travel to the device as whole numbers in `f32`,
/// exact below 2^24.
const MAX_VOCAB: usize = 1 << 24;

/// An encoder's layers: each fits the width and token count before it, and the last
/// produces the declared `declared` width.
fn encoder<T>(
    s: &Loaded<T>,
    path: &str,
    owner: &str,
    encoder: &Encoder,
    declared: usize,
    tokens: usize,
) -> Check {
    let (mut current, layers, weights) = match encoder {
        Encoder::Precomputed => return Ok(()),
        Encoder::Graph {
            input_width,
            layers,
            weights,
            ..
        } => {
            width(
                s,
                &format!("{path}.input_width"),
                *input_width,
                "the input width",
            )?;
            (*input_width, layers, weights)
        }
        Encoder::Text {
            tokenizer,
            max_length,
            layers,
            weights,
            ..
        } => {
            if tokenizer.trim().is_empty() {
                return Err(s.invalid(
                    &format!("{path}.tokenizer"),
                    "the tokenizer path is empty",
                    "a tokenizer.json, relative to this file's folder",
                ));
            }
            size(
                s,
                &format!("{path}.max_length"),
                *max_length,
                MAX_TOKENS,
                "the maximum length",
            )?;
            let Some(Layer::TokenEmbedding { width: w, .. }) = layers.first() else {
                return Err(s.invalid(
                    &format!("{path}.layers"),
                    "a text encoder reads token ids, so its first layer must embed them",
                    "start the layers with TokenEmbedding(vocab: ..., width: ...)",
                ));
            };
            (*w, layers, weights)
        }
    };
    let mut tokens = tokens;
    for (li, layer) in layers.iter().enumerate() {
        let lpath = format!("{path}.layers[{li}]");
        match layer {
            Layer::Linear { width: w, .. } => {
                width(s, &format!("{lpath}.width"), *w, "the width")?;
                current = *w;
            }
            Layer::Mlp {
                hidden,
                width: w,
                residual,
                ..
            } => {
                width(s, &format!("{lpath}.hidden"), *hidden, "the hidden width")?;
                width(s, &format!("{lpath}.width"), *w, "the width")?;
                if *residual && *w != current {
                    return Err(s.invalid(
                        &format!("{lpath}.width"),
                        format!("a residual MLP must keep its input width {current}, but this one produces {w}"),
                        format!("width: {current}, or residual: false"),
                    ));
                }
                current = *w;
            }
            Layer::LayerNorm { eps } => positive_real(s, &format!("{lpath}.eps"), *eps, "eps")?,
            Layer::SelfAttention { heads } => {
                heads_divide(s, &format!("{lpath}.heads"), *heads, current)?
            }
            Layer::TokenPool(_) => tokens = 1,
            Layer::TokenEmbedding { vocab, width: w } => {
                if li != 0 || !matches!(encoder, Encoder::Text { .. }) {
                    return Err(s.invalid(
                        &lpath,
                        "TokenEmbedding reads token ids, which only a text encoder's first layer sees",
                        "use it as the first layer of encoder: Text(...)",
                    ));
                }
                size(
                    s,
                    &format!("{lpath}.vocab"),
                    *vocab,
                    MAX_VOCAB,
                    "the vocabulary size",
                )?;
                width(s, &format!("{lpath}.width"), *w, "the width")?;
            }
            Layer::PositionEmbedding { positions } => {
                if *positions < tokens {
                    return Err(s.invalid(
                        &format!("{lpath}.positions"),
                        format!("{positions} positions cannot cover the {tokens} tokens that reach this layer"),
                        format!("positions: {tokens} or more, or a shorter maximum length"),
                    ));
                }
            }
            Layer::TokenTypeEmbedding { types } => size(
                s,
                &format!("{lpath}.types"),
                *types,
                MAX_VOCAB,
                "the number of token types",
            )?,
            Layer::ClassToken => tokens += 1,
            Layer::Block {
                heads,
                intermediate,
                eps,
                layer_scale,
                ..
            } => {
                heads_divide(s, &format!("{lpath}.heads"), *heads, current)?;
                width(
                    s,
                    &format!("{lpath}.intermediate"),
                    *intermediate,
                    "the intermediate width",
                )?;
                positive_real(s, &format!("{lpath}.eps"), *eps, "eps")?;
                if let Some(scale) = *layer_scale {
                    positive_real(
                        s,
                        &format!("{lpath}.layer_scale"),
                        scale,
                        "the LayerScale start",
                    )?;
                }
            }
            Layer::Normalize => {}
        }
    }
    if current != declared {
        return Err(s.invalid(
            &format!("{path}.layers"),
            format!("the encoder produces width {current}, but {owner} declares width {declared}"),
            format!("end the layers at width {declared}, or declare width: {current}"),
        ));
    }
    if let Some(weights) = weights {
        if weights.file.trim().is_empty() {
            return Err(s.invalid(
                &format!("{path}.weights.file"),
                "the weights file path is empty",
                "a safetensors file, relative to this file's folder",
            ));
        }
        let mut seen = BTreeSet::new();
        for param in weights.tensors.values() {
            if !seen.insert(param) {
                return Err(s.invalid(
                    &format!("{path}.weights.tensors"),
                    format!("parameter `{param}` is mapped from two tensors"),
                    "map each parameter from one tensor of the file",
                ));
            }
        }
    }
    Ok(())
}

fn heads_divide<T>(s: &Loaded<T>, path: &str, heads: usize, width: usize) -> Check {
    size(s, path, heads, width, "the head count")?;
    if !width.is_multiple_of(heads) {
        return Err(s.invalid(
            path,
            format!("{heads} heads do not divide the width {width}"),
            format!("a divisor of {width}: {}", divisors(width)),
        ));
    }
    Ok(())
}

/// The divisors of `n` in increasing order, found up to its square root.
fn divisors(n: usize) -> String {
    let mut low = Vec::new();
    let mut high = Vec::new();
    let mut d = 1;
    while d * d <= n {
        if n.is_multiple_of(d) {
            low.push(d);
            if d * d != n {
                high.push(n / d);
            }
        }
        d += 1;
    }
    low.extend(high.into_iter().rev());
    low.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn connector(s: &LoadedSpec) -> Check {
    let c = &s.spec.connector;
    width(s, "connector.hidden", c.hidden, "the hidden width")?;
    size(
        s,
        "connector.experts.count",
        c.experts.count,
        MAX_EXPERTS,
        "the expert count",
    )?;
    width(
        s,
        "connector.experts.hidden",
        c.experts.hidden,
        "the expert hidden width",
    )?;
    in_unit(
        s,
        "connector.experts.dropout",
        c.experts.dropout,
        "the dropout rate",
        false,
    )?;
    width(
        s,
        "connector.target_projection.width",
        c.target_projection.width,
        "the width",
    )?;
    let experts = c.experts.count;
    let per = match c.experts.pool {
        ExpertPool::Shared => "",
        ExpertPool::PerModality => " per modality",
    };
    if c.router.top_k == 0 || c.router.top_k > experts {
        return Err(s.invalid(
            "connector.router.top_k",
            format!(
                "top_k = {} but the router chooses among {experts} experts{per}",
                c.router.top_k
            ),
            format!("valid: 1 to {experts}"),
        ));
    }
    if let GateInput::HiddenWithModality { width: embedding } = c.router.gate_input {
        width(
            s,
            "connector.router.gate_input.width",
            embedding,
            "the modality embedding width",
        )?;
    }
    if c.branches.is_empty() {
        return Err(s.invalid(
            "connector.branches",
            "no branches are declared",
            "declare one branch per loss output",
        ));
    }
    unique(
        s,
        "branch",
        "connector.branches",
        c.branches.iter().map(|b| b.name.as_str()),
    )
}

fn losses(s: &LoadedSpec) -> Check {
    let spec = &s.spec;
    if spec.losses.is_empty() {
        return Err(s.invalid(
            "losses",
            "no losses are declared",
            "declare at least one loss",
        ));
    }
    unique(
        s,
        "loss",
        "losses",
        spec.losses.iter().map(|l| l.name.as_str()),
    )?;
    let branches = || spec.connector.branches.iter().map(|b| b.name.clone());
    for (i, loss) in spec.losses.iter().enumerate() {
        let path = format!("losses[{i}]");
        if !spec
            .connector
            .branches
            .iter()
            .any(|b| b.name == loss.output)
        {
            return Err(s.invalid(
                &format!("{path}.output"),
                format!(
                    "loss `{}` reads output `{}`, which no branch produces",
                    loss.name, loss.output
                ),
                names(branches()),
            ));
        }
        if !(loss.weight.is_finite() && loss.weight >= 0.0) {
            return Err(s.invalid(
                &format!("{path}.weight"),
                format!("the weight is {}", loss.weight),
                "a finite number, 0 or more",
            ));
        }
        match &loss.kind {
            LossKind::SmoothL1 { beta } => {
                positive_real(s, &format!("{path}.kind.beta"), *beta, "beta")?
            }
            LossKind::SquaredL2 => {}
            LossKind::InfoNce {
                temperature: Temperature::Fixed(t) | Temperature::Learned { init: t },
            } => positive_real(
                s,
                &format!("{path}.kind.temperature"),
                *t,
                "the temperature",
            )?,
        }
    }
    if spec.losses.iter().all(|l| l.weight == 0.0) {
        return Err(s.invalid(
            "losses",
            "every loss has weight 0, so no step would train anything",
            "give at least one loss a weight above 0",
        ));
    }
    for (i, b) in spec.connector.branches.iter().enumerate() {
        if !spec.losses.iter().any(|l| l.output == b.name) {
            return Err(s.invalid(
                &format!("connector.branches[{i}].name"),
                format!(
                    "branch `{}` feeds no loss, so nothing would train it",
                    b.name
                ),
                "name it as some loss's `output`, or remove it",
            ));
        }
    }
    Ok(())
}

fn directions(s: &LoadedSpec) -> Check {
    let spec = &s.spec;
    if spec.directions.is_empty() {
        return Err(s.invalid(
            "directions",
            "no directions are declared",
            "declare at least one `source -> target` direction",
        ));
    }
    unique(
        s,
        "direction",
        "directions",
        spec.directions.iter().map(|d| d.name.as_str()),
    )?;
    let modality_names = || spec.modalities.iter().map(|m| m.name.clone());
    for (i, d) in spec.directions.iter().enumerate() {
        let path = format!("directions[{i}]");
        for (field, name) in [("source", &d.source), ("target", &d.target)] {
            if !spec.modalities.iter().any(|m| &m.name == name) {
                return Err(s.invalid(
                    &format!("{path}.{field}"),
                    format!("direction `{}` names unknown modality `{name}`", d.name),
                    names(modality_names()),
                ));
            }
        }
        if d.source == d.target {
            return Err(s.invalid(
                &format!("{path}.target"),
                format!("direction `{}` maps `{}` onto itself", d.name, d.source),
                "a different modality",
            ));
        }
        if let Some(other) = spec.directions[..i]
            .iter()
            .find(|o| o.source == d.source && o.target == d.target)
        {
            return Err(s.invalid(
                &format!("{path}.target"),
                format!(
                    "`{} -> {}` is already direction `{}`",
                    d.source, d.target, other.name
                ),
                "each source/target pair once",
            ));
        }
        let target = spec
            .modalities
            .iter()
            .find(|m| m.name == d.target)
            .expect("checked above");
        for key in d.heads.keys() {
            if !spec.connector.branches.iter().any(|b| &b.name == key) {
                return Err(s.invalid(
                    &format!("{path}.heads.{key}"),
                    format!("a head for `{key}`, which is not a branch"),
                    names(spec.connector.branches.iter().map(|b| b.name.clone())),
                ));
            }
        }
        for branch in &spec.connector.branches {
            let Some(&width) = d.heads.get(&branch.name) else {
                return Err(s.invalid(
                    &format!("{path}.heads"),
                    format!(
                        "direction `{}` has no head for branch `{}`",
                        d.name, branch.name
                    ),
                    format!("add \"{}\": <width>", branch.name),
                ));
            };
            for loss in spec.losses.iter().filter(|l| l.output == branch.name) {
                let (wanted, why) = if loss.kind.is_regression() {
                    (
                        target.width,
                        format!(
                            "loss `{}` regresses it onto modality `{}` of width {}",
                            loss.name, target.name, target.width
                        ),
                    )
                } else {
                    let w = spec.connector.target_projection.width;
                    (
                        w,
                        format!(
                            "loss `{}` compares it with the target projection of width {w}",
                            loss.name
                        ),
                    )
                };
                if width != wanted {
                    return Err(s.invalid(
                        &format!("{path}.heads.{}", branch.name),
                        format!(
                            "head `{}` of direction `{}` produces width {width}, but {why}",
                            branch.name, d.name
                        ),
                        format!("valid: {wanted}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn schedule(s: &LoadedSpec) -> Check {
    let n = s.spec.directions.len();
    match &s.spec.schedule {
        Schedule::Alternate { steps_per_task } => size(
            s,
            "schedule.steps_per_task",
            *steps_per_task,
            MAX_STEPS,
            "steps_per_task",
        ),
        Schedule::Joint => Ok(()),
        Schedule::Sample { probabilities } => {
            if probabilities.len() != n {
                return Err(s.invalid(
                    "schedule.probabilities",
                    format!("{} probabilities for {n} directions", probabilities.len()),
                    format!("one probability per direction, in the order of `directions` ({n})"),
                ));
            }
            for (i, p) in probabilities.iter().enumerate() {
                in_unit(
                    s,
                    &format!("schedule.probabilities[{i}]"),
                    *p,
                    "the probability",
                    true,
                )?;
            }
            let sum: f64 = probabilities.iter().sum();
            if (sum - 1.0).abs() > 1e-6 {
                return Err(s.invalid(
                    "schedule.probabilities",
                    format!("the probabilities sum to {sum}"),
                    "probabilities that sum to 1",
                ));
            }
            Ok(())
        }
    }
}

fn optimizer(s: &LoadedSpec) -> Check {
    let Optimizer::AdamW {
        betas,
        eps,
        lr,
        weight_decay,
        clip,
        ..
    } = &s.spec.optimizer;
    in_unit(s, "optimizer.betas.0", betas.0, "beta1", false)?;
    in_unit(s, "optimizer.betas.1", betas.1, "beta2", false)?;
    positive_real(s, "optimizer.eps", *eps, "eps")?;
    let non_negative = |path: &str, v: f64| -> Check {
        if v.is_finite() && v >= 0.0 {
            Ok(())
        } else {
            Err(s.invalid(
                path,
                format!("the value is {v}"),
                "a finite number, 0 or more",
            ))
        }
    };
    match lr {
        LrSchedule::Constant(v) => positive_real(s, "optimizer.lr", *v, "the learning rate")?,
        LrSchedule::WarmupCosine {
            start,
            peak,
            end,
            warmup,
        } => {
            non_negative("optimizer.lr.start", *start)?;
            positive_real(s, "optimizer.lr.peak", *peak, "the peak learning rate")?;
            non_negative("optimizer.lr.final", *end)?;
            match warmup {
                Span::Steps(n) if *n > MAX_STEPS => {
                    return Err(s.invalid(
                        "optimizer.lr.warmup",
                        format!("the warm-up is {n} steps"),
                        format!("at most {} steps", crate::summary::thousands(MAX_STEPS)),
                    ))
                }
                Span::Steps(_) => {}
                Span::Epochs(e) if *e > MAX_STEPS as f64 => {
                    return Err(s.invalid(
                        "optimizer.lr.warmup",
                        format!("the warm-up is {e} epochs"),
                        format!("at most {} epochs", crate::summary::thousands(MAX_STEPS)),
                    ))
                }
                Span::Epochs(e) => non_negative("optimizer.lr.warmup", *e)?,
                Span::Fraction(f) => {
                    in_unit(s, "optimizer.lr.warmup", *f, "the warm-up fraction", true)?
                }
            }
        }
    }
    match weight_decay {
        DecaySchedule::Constant(v) => non_negative("optimizer.weight_decay", *v)?,
        DecaySchedule::Cosine { start, end } => {
            non_negative("optimizer.weight_decay.start", *start)?;
            non_negative("optimizer.weight_decay.final", *end)?;
        }
    }
    if let GradClip::GlobalNorm(n) = clip {
        positive_real(s, "optimizer.clip", *n, "the clipping norm")?;
    }
    Ok(())
}

fn training(s: &LoadedSpec) -> Check {
    let t = &s.spec.training;
    if t.batch_size < 2 && s.spec.losses.iter().any(|l| !l.kind.is_regression()) {
        return Err(s.invalid(
            "training.batch_size",
            format!(
                "batch_size = {}, but a contrastive loss needs in-batch negatives",
                t.batch_size
            ),
            "valid: 2 or more",
        ));
    }
    size(
        s,
        "training.batch_size",
        t.batch_size,
        MAX_BATCH,
        "the batch size",
    )?;
    match t.duration {
        Duration::Steps(n) | Duration::Epochs(n) => {
            size(s, "training.duration", n, MAX_STEPS, "the duration")
        }
    }
}
