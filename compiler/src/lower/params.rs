//! The program's parameter table: every weight with its shape, initialisation,
//! trainability and weight-decay membership.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Init {
    Zeros,
    Ones,
    Constant(f64),
    /// `U(-bound, bound)` (PyTorch's default for linear layers: `1/sqrt(fan_in)`).
    Uniform {
        bound: f64,
    },
    Normal {
        std: f64,
    },
}

/// What a parameter is, for weight-decay rules and summaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind {
    Weight,
    Bias,
    Norm,
    Embedding,
    Scalar,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamInfo {
    /// Dotted name, e.g. `directions.image_to_text.input_projection.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    pub init: Init,
    pub trainable: bool,
    pub decay: bool,
    /// The spec path that declared it.
    pub origin: String,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The module it belongs to: its name without the last component.
    pub fn module(&self) -> &str {
        self.name.rsplit_once('.').map_or("", |(m, _)| m)
    }
}

/// Parameters in the order they were first used.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ParamTable {
    params: Vec<ParamInfo>,
}

impl ParamTable {
    /// Adds a parameter unless it exists; a parameter is shared by every graph that
    /// names it, so a second use with another shape is a lowering bug.
    pub fn register(
        &mut self,
        name: &str,
        shape: &[usize],
        kind: ParamKind,
        init: Init,
        origin: &str,
    ) {
        if let Some(p) = self.params.iter().find(|p| p.name == name) {
            assert_eq!(p.shape, shape, "parameter `{name}` used with two shapes");
            return;
        }
        self.params.push(ParamInfo {
            name: name.to_string(),
            shape: shape.to_vec(),
            kind,
            init,
            trainable: true,
            decay: true,
            origin: origin.to_string(),
        });
    }

    pub fn iter(&self) -> impl Iterator<Item = &ParamInfo> {
        self.params.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut ParamInfo> {
        self.params.iter_mut()
    }

    pub fn get(&self, name: &str) -> Option<&ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn trainable_count(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(ParamInfo::numel)
            .sum()
    }

    pub fn total_count(&self) -> usize {
        self.params.iter().map(ParamInfo::numel).sum()
    }
}
