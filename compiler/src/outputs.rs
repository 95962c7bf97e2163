//! The names of graph outputs, built and parsed in one place: lowering names losses,
//! training graphs name updates, gradients and the gradient norm, and the runtime
//! reads them back through `Output::parse` instead of matching strings itself.

/// A loss graph's total loss; also a joint task's sum over its directions.
pub const LOSS: &str = "loss";
/// A training graph's global gradient norm (before clipping).
pub const GRAD_NORM: &str = "grad_norm";
/// A query or key graph's normalised embedding.
pub const EMBEDDING: &str = "embedding";

const UPDATED: &str = "new.";
const GRADIENT: &str = "grad.";

/// The output carrying loss term `term` (unweighted).
pub fn loss_term(term: &str) -> String {
    format!("{LOSS}.{term}")
}

/// The output carrying the new value of a parameter or state tensor `name`.
pub fn updated(name: &str) -> String {
    format!("{UPDATED}{name}")
}

/// The output carrying a parameter's raw (unclipped) gradient.
pub fn gradient(param: &str) -> String {
    format!("{GRADIENT}{param}")
}

/// A loss graph's output `output` as a joint task names it: under its direction.
pub fn in_direction(direction: &str, output: &str) -> String {
    format!("{direction}.{output}")
}

/// What an output of a training or loss graph is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output<'a> {
    /// The new value of the named parameter or state tensor, swapped in when a step
    /// commits.
    Updated(&'a str),
    /// The named parameter's raw gradient, kept only for checks against an oracle.
    Gradient(&'a str),
    /// The total loss or one of its terms, alone or under a joint task's direction.
    Loss,
    /// The global gradient norm.
    GradNorm,
    /// Anything else (an embedding, a metric).
    Other,
}

impl<'a> Output<'a> {
    pub fn parse(name: &'a str) -> Output<'a> {
        if let Some(target) = name.strip_prefix(UPDATED) {
            return Output::Updated(target);
        }
        if let Some(param) = name.strip_prefix(GRADIENT) {
            return Output::Gradient(param);
        }
        if name == GRAD_NORM {
            return Output::GradNorm;
        }
        let is_loss =
            |n: &str| n == LOSS || n.strip_prefix(LOSS).is_some_and(|t| t.starts_with('.'));
        let in_direction = name.split_once('.').is_some_and(|(_, rest)| is_loss(rest));
        if is_loss(name) || in_direction {
            Output::Loss
        } else {
            Output::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_built_here_parses_back_to_its_kind() {
        assert_eq!(
            Output::parse(&updated("experts.w1")),
            Output::Updated("experts.w1")
        );
        assert_eq!(
            Output::parse(&gradient("router.gate.weight")),
            Output::Gradient("router.gate.weight")
        );
        assert_eq!(Output::parse(GRAD_NORM), Output::GradNorm);
        for loss in [
            LOSS.to_string(),
            loss_term("contrastive"),
            in_direction("image_to_text", LOSS),
            in_direction("image_to_text", &loss_term("regression")),
        ] {
            assert_eq!(Output::parse(&loss), Output::Loss, "{loss}");
        }
        for other in [
            "embedding",
            "lossy",
            "image_to_text.lossy",
            "image_to_text.embedding",
        ] {
            assert_eq!(Output::parse(other), Output::Other, "{other}");
        }
    }
}
