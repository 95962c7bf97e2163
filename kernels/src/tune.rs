//! Kernel autotuning on cubecl's autotune machinery: each tunable kernel family has a
//! `TunableSet` of candidate configurations, the untuned fallback first, behind a
//! `LocalTuner` whose results cubecl keeps in its persistent cache, one file per
//! tuning scope (device, driver, altc version). What the kernels add on top is the
//! policy: tune on a miss (`altc tune`), use only what was tuned before (`altc run`),
//! or stay untuned, and a record of every decision for the caller's manifest.

use cubecl::tune::{AutotuneKey, AutotuneOutput, LocalTuner};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;

/// What identifies a tuning problem: the kernel family and its shape bucket and
/// comptime signature. Launches with equal keys share one tuned choice.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelKey {
    pub family: String,
    pub signature: String,
}

impl AutotuneKey for KernelKey {}

impl fmt::Display for KernelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family, self.signature)
    }
}

/// How tunable kernels pick their configuration.
#[derive(Clone, Debug, Default)]
pub enum TuningMode {
    /// Every kernel runs its fallback configuration (the first candidate).
    #[default]
    Untuned,
    /// A kernel whose key has no cached choice is tuned on its first launch: every
    /// candidate is benchmarked on the launch's own operands and the fastest kept.
    Tune,
    /// Kernels whose key is listed run the choice cached by an earlier tuning; all
    /// others run their fallback. Nothing is tuned.
    Cached(HashSet<KernelKey>),
    /// Every tunable kernel runs the named candidate (tests, comparisons).
    Force(String),
}

/// One tuning decision: the kernel, its candidates in order (fallback first) and the
/// one that runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunedKernel {
    pub key: KernelKey,
    pub candidates: Vec<String>,
    pub winner: String,
}

/// Tuning policy and decisions of one `Kernels`.
#[derive(Default)]
pub(crate) struct Tuning {
    pub mode: TuningMode,
    /// The tuning scope: names cubecl's cache file, so choices made on another
    /// device, driver or altc version are never looked up.
    pub scope: String,
    /// Decisions of this process, one per key, in the order they were made.
    pub decisions: std::sync::Mutex<Vec<TunedKernel>>,
}

impl Tuning {
    /// Whether launches with `key` go through the tuner (tuning or cache lookup).
    pub fn consults_tuner(&self, key: &KernelKey) -> bool {
        match &self.mode {
            TuningMode::Tune => true,
            TuningMode::Cached(keys) => keys.contains(key),
            TuningMode::Untuned | TuningMode::Force(_) => false,
        }
    }

    pub fn record(&self, decision: TunedKernel) {
        let mut decisions = self.decisions.lock().expect("tuning record");
        if !decisions.iter().any(|d| d.key == decision.key) {
            decisions.push(decision);
        }
    }
}

/// The tuner of the matmul family (plain, with an epilogue, summed over the batch).
pub(crate) static MATMUL_TUNER: LocalTuner<KernelKey, String> =
    LocalTuner::new(concat!(module_path!(), "-matmul"));

/// Kernel outputs as an autotune result.
pub(crate) struct Outputs(pub Vec<cubecl::server::Handle>);

impl AutotuneOutput for Outputs {}

/// Rounds an extent up to a power of two, so nearby shapes share a tuned choice.
pub(crate) fn bucket(extent: usize) -> usize {
    extent.max(1).next_power_of_two()
}

/// The candidate names of a tunable kernel family, fallback first (empty for a family
/// that is not tunable).
pub fn candidates(family: &str) -> Vec<String> {
    match family {
        "matmul" => crate::launch::MatmulStrategy::CANDIDATES
            .iter()
            .map(|c| c.name())
            .collect(),
        _ => Vec::new(),
    }
}
