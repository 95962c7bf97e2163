//! Kernel autotuning on cubecl's autotune machinery: each tunable kernel family has a
//! `TunableSet` of candidate configurations, the untuned fallback first, behind a
//! `LocalTuner` whose results cubecl keeps in its persistent cache, one file per
//! tuning scope (device, driver, altc version). What the kernels add on top is the
//! policy: tune on a miss (`altc tune`), use only what was tuned before (`altc run`),
//! or stay untuned, and a record of every decision for the caller's manifest.

use cubecl::server::Handle;
use cubecl::tune::{AutotuneKey, AutotuneOutput, LocalTuner, Tunable, TunableSet};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};

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
    /// Kernels of the family with a candidate of this name run it; the others run
    /// their fallback (tests, comparisons).
    Force(String),
}

/// One tuning decision: the kernel, its candidates in order (fallback first) and the
/// one that runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunedKernel {
    pub key: KernelKey,
    pub candidates: Vec<String>,
    pub winner: String,
    /// Candidates this process ran to decide: all of them when it measured, one
    /// when cubecl's cache already held the choice.
    #[serde(default)]
    pub tried: usize,
}

impl TunedKernel {
    /// Whether the choice was measured now rather than read from the cache.
    pub fn measured(&self) -> bool {
        self.tried > 1
    }
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

/// Kernel outputs as an autotune result.
pub(crate) struct Outputs(pub Vec<Handle>);

impl AutotuneOutput for Outputs {}

/// Rounds an extent up to a power of two, so nearby shapes share a tuned choice.
pub(crate) fn bucket(extent: usize) -> usize {
    extent.max(1).next_power_of_two()
}

/// A configuration a tunable kernel family can launch with.
pub trait Candidate: Copy + Send + Sync + 'static {
    /// The family's candidates, the untuned fallback first.
    const ALL: &'static [Self];
    fn name(&self) -> String;
}

/// One launch of a tunable kernel with everything it needs owned, so the tuner can
/// replay it with each candidate.
pub(crate) trait TunableLaunch: Clone + Send + Sync + 'static {
    type With: Candidate;
    fn record(&self) -> &LaunchRecord<Self::With>;
    fn launch(&self, with: Self::With) -> Vec<Handle>;

    fn key(&self) -> &KernelKey {
        &self.record().key
    }

    fn run(&self, with: Self::With) -> Vec<Handle> {
        *self.record().ran.lock().expect("candidate record") = Some(with);
        let mut tried = self.record().tried.lock().expect("candidate record");
        tried.insert(with.name());
        drop(tried);
        self.launch(with)
    }
}

/// A tunable launch's tuning key, and the candidate that ran it last (after tuning:
/// the winner), shared by the clones the tuner makes.
#[derive(Clone)]
pub(crate) struct LaunchRecord<S> {
    pub key: KernelKey,
    ran: Arc<Mutex<Option<S>>>,
    /// The candidates run so far, by name.
    tried: Arc<Mutex<HashSet<String>>>,
}

impl<S> LaunchRecord<S> {
    pub fn new(key: KernelKey) -> LaunchRecord<S> {
        LaunchRecord {
            key,
            ran: Arc::new(Mutex::new(None)),
            tried: Arc::default(),
        }
    }
}

/// A family's candidates as a cubecl tunable set keyed by the launch's key.
fn tunables<L: TunableLaunch>() -> TunableSet<KernelKey, L, Outputs> {
    L::With::ALL.iter().fold(
        TunableSet::new_cloning_inputs(|launch: &L| launch.key().clone()),
        |set, &with| {
            set.with(Tunable::new(
                &with.name(),
                move |launch: L| -> Result<Outputs, String> { Ok(Outputs(launch.run(with))) },
            ))
        },
    )
}

impl Tuning {
    /// Runs `launch` with the candidate the mode calls for: the fallback, a forced
    /// one, or cubecl's tuned choice (tuning first on a miss in `Tune` mode).
    pub(crate) fn launch<R: cubecl::Runtime, L: TunableLaunch>(
        &self,
        tuner: &'static LocalTuner<KernelKey, String>,
        client: &cubecl::prelude::ComputeClient<R>,
        launch: L,
    ) -> Vec<Handle> {
        let all = L::With::ALL;
        if let TuningMode::Force(name) = &self.mode {
            let forced = all.iter().find(|c| &c.name() == name).unwrap_or(&all[0]);
            return launch.run(*forced);
        }
        if !self.consults_tuner(launch.key()) {
            return launch.run(all[0]);
        }
        let set = tuner.init(tunables::<L>);
        let outputs = tuner.execute(&self.scope, client, set, launch.clone()).0;
        let winner = launch
            .record()
            .ran
            .lock()
            .expect("candidate record")
            .expect("the tuner ran a candidate");
        self.record(TunedKernel {
            key: launch.key().clone(),
            candidates: all.iter().map(Candidate::name).collect(),
            winner: winner.name(),
            tried: launch
                .record()
                .tried
                .lock()
                .expect("candidate record")
                .len(),
        });
        outputs
    }
}
