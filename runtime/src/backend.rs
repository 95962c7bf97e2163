//! Backends execute IR graphs over resident training state. The reference backend
//! keeps state on the host and runs the interpreter; cubecl backends keep parameters
//! and optimizer state on the device and move only batches, scalars and metrics.

use altc_compiler::ir::Graph;
use altc_compiler::outputs::Output;
use altc_compiler::reference::{run, EvalContext, EvalError, Tensor, TensorMap};
pub use altc_kernels::{candidates, Ceilings, KernelKey, TunedKernel, TuningMode};
use std::collections::BTreeMap;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("graph `{graph}`: state tensor `{name}` is not on the device")]
    MissingState { graph: String, name: String },
    #[error("graph `{graph}` needs input `{name}`, which was not given")]
    MissingInput { graph: String, name: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("graph `{graph}` embedded pair {pair} as a non-finite vector, so no ranking of it means anything")]
    NonFiniteEmbedding { graph: String, pair: usize },
    #[error(
        "graph `{graph}`: node {node} ({origin}) would be a tensor of {elements} elements, \
         past the 4,294,967,295 that altc's kernels index (32-bit): use a smaller batch"
    )]
    TooLarge {
        graph: String,
        node: usize,
        origin: String,
        elements: u64,
    },
    #[error(transparent)]
    DoesNotFit(Box<FitError>),
}

impl From<FitError> for BackendError {
    fn from(e: FitError) -> Self {
        BackendError::DoesNotFit(Box::new(e))
    }
}

/// A tensor bytes the device cannot hold in one buffer, or a run whose memory the
/// machine cannot hold, found before anything is allocated for it.
#[derive(Debug, Error)]
pub enum FitError {
    #[error(
        "{what} is a {shape:?} tensor of {size}, larger than the {limit} one buffer may \
         hold on {device}: {advice}"
    )]
    Buffer {
        what: String,
        /// What would make it fit.
        advice: &'static str,
        shape: Vec<usize>,
        size: Bytes,
        limit: Bytes,
        device: String,
    },
    #[error(
        "graph `{graph}` needs {needed} at its peak (intermediates {peak} and resident \
         tensors {resident}), more than this machine's {memory}, which {device} computes \
         in: use a smaller --batch-size, or a GPU (--device cuda)"
    )]
    Memory {
        graph: String,
        needed: Bytes,
        peak: Bytes,
        resident: Bytes,
        memory: Bytes,
        device: String,
    },
}

impl FitError {
    /// For a tensor whose size the batch sets.
    pub const SMALLER_BATCH: &'static str = "use a smaller --batch-size, or another device \
         (--device cuda on an NVIDIA GPU, --device reference on the CPU)";
    /// For a tensor of the model itself.
    pub const OTHER_DEVICE: &'static str = "run the model on another device (--device cuda \
         on an NVIDIA GPU, --device reference on the CPU), or make it smaller";
}

/// A byte count shown in MiB or GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = self.0 as f64 / (1u64 << 20) as f64;
        if mib >= 1024.0 {
            write!(f, "{:.1} GiB", mib / 1024.0)
        } else {
            write!(f, "{mib:.1} MiB")
        }
    }
}

/// One kernel of a profiled run: what it is and how long it took, launch to
/// completion.
#[derive(Clone, Debug)]
pub struct KernelTiming {
    pub family: &'static str,
    pub label: String,
    pub seconds: f64,
}

/// Where graphs run.
pub trait Backend: Send {
    /// A line saying what this is (`reference`, `wgpu: llvmpipe ...`).
    fn describe(&self) -> String;

    /// Replaces the resident state (parameters and optimizer tensors); refuses state
    /// the device cannot hold, before uploading any of it.
    fn load_state(&mut self, state: &TensorMap) -> Result<(), BackendError>;

    /// Copies the resident state to the host (for checkpoints).
    fn read_state(&mut self) -> TensorMap;

    /// Runs `graph`: `Parameter` leaves read the resident state, `Input` leaves the
    /// given host tensors. Outputs named `new.<x>` are staged to replace state `<x>`
    /// (see `commit`) and stay where the state lives; `grad.<x>` outputs stay there
    /// too; every other output comes back to the host.
    fn run(
        &mut self,
        graph: &Graph,
        inputs: &TensorMap,
        ctx: EvalContext,
    ) -> Result<BTreeMap<String, Tensor>, BackendError>;

    /// Applies the updates staged by the last `run`; a run whose results were
    /// rejected (a NaN) is simply not committed.
    fn commit(&mut self);

    /// The most bytes one buffer may hold (`None`: no device limit).
    fn max_buffer_bytes(&self) -> Option<u64> {
        None
    }

    /// Kernel launches of the last `run`, on backends that launch kernels.
    fn kernel_launches(&self) -> Option<usize> {
        None
    }

    /// What one kernel may bind on this backend's device, as its fusion plans assume
    /// (`None` on backends without kernels).
    fn kernel_limits(&self) -> Option<altc_compiler::fusion::KernelLimits> {
        None
    }

    /// Switches per-kernel profiling: each kernel of later runs is timed to completion
    /// (the device is synchronised after it), which slows the runs down. Backends
    /// without kernels ignore it.
    fn set_profiling(&mut self, on: bool) {
        let _ = on;
    }

    /// The kernels of the last profiled run, in launch order.
    fn kernel_profile(&self) -> Vec<KernelTiming> {
        Vec::new()
    }

    /// The most device memory the last profiled run held at once above what was in
    /// use when it started (its inputs and intermediates), as the device's allocator
    /// counts it after each kernel; `None` on backends without a device.
    fn memory_peak(&self) -> Option<u64> {
        None
    }

    /// Sets how tunable kernels choose their configuration. Backends without
    /// tunable kernels ignore it.
    fn set_tuning(&mut self, mode: TuningMode) {
        let _ = mode;
    }

    /// What tuned choices are valid for: device, driver and altc version, as one
    /// file-name-safe string (`None`: nothing to tune).
    fn tuning_scope(&self) -> Option<String> {
        None
    }

    /// The tuning decisions made so far, one per kernel key.
    fn tuned_kernels(&self) -> Vec<TunedKernel> {
        Vec::new()
    }

    /// Measures the device's copy bandwidth and matmul rate (`None`: not a device).
    fn measure_ceilings(&self, copy_elements: usize, matmul_size: usize) -> Option<Ceilings> {
        let _ = (copy_elements, matmul_size);
        None
    }
}

/// The reference interpreter over host state.
#[derive(Default)]
pub struct ReferenceBackend {
    state: TensorMap,
    staged: TensorMap,
}

impl Backend for ReferenceBackend {
    fn describe(&self) -> String {
        "reference interpreter (CPU, plain Rust)".into()
    }

    fn load_state(&mut self, state: &TensorMap) -> Result<(), BackendError> {
        self.state = state.clone();
        Ok(())
    }

    fn read_state(&mut self) -> TensorMap {
        self.state.clone()
    }

    fn run(
        &mut self,
        graph: &Graph,
        inputs: &TensorMap,
        ctx: EvalContext,
    ) -> Result<BTreeMap<String, Tensor>, BackendError> {
        let outputs = run(graph, inputs, &self.state, ctx)?;
        let mut host = BTreeMap::new();
        for (name, value) in outputs {
            match Output::parse(&name) {
                Output::Updated(target) => {
                    self.staged.insert(target.to_string(), value);
                }
                Output::Gradient(_) => {}
                _ => {
                    host.insert(name, value);
                }
            }
        }
        Ok(host)
    }

    fn commit(&mut self) {
        self.state.extend(std::mem::take(&mut self.staged));
    }
}
