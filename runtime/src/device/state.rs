//! The device backend's state: parameters and optimizer state resident on the
//! device, the values of a run, the plan cache, and profiling; the `Backend`
//! interface the training loop drives.

use crate::backend::{
    Backend, BackendError, Bytes, Ceilings, FitError, KernelTiming, TunedKernel, TuningMode,
};
use altc_compiler::fusion::{FusionPlan, KernelDescription, KernelLimits};
use altc_compiler::ir::{DType, Graph};
use altc_compiler::reference::{EvalContext, Tensor, TensorMap};
use altc_kernels::{Kernels, View, ELEMENT_BYTES};
use cubecl::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// A value on the device: a (possibly strided) view and its logical shape.
#[derive(Clone)]
pub(super) struct Value {
    pub(super) view: View,
    pub(super) shape: Vec<usize>,
}

impl Value {
    pub(super) fn contiguous(handle: cubecl::server::Handle, shape: Vec<usize>) -> Value {
        Value {
            view: View::contiguous(handle, &shape),
            shape,
        }
    }

    /// The value as rows of its last dimension: (row count, row width).
    pub(super) fn rows_and_width(&self) -> (usize, usize) {
        let width = *self.shape.last().expect("rank checked by inference");
        let n = self.shape.iter().product::<usize>();
        (n / width.max(1), width)
    }

    pub(super) fn is_contiguous(&self) -> bool {
        self.view.offset == 0
            && self.view.strides == altc_kernels::contiguous_strides(&self.shape)
            && self.view.len == self.shape.iter().product::<usize>()
    }
}

pub struct DeviceBackend<R: Runtime> {
    pub(super) kernels: Kernels<R>,
    pub(super) name: &'static str,
    pub(super) state: HashMap<String, Value>,
    pub(super) staged: Vec<(String, Value)>,
    /// Round matmul operands to bf16 (f32 accumulation): mixed precision.
    pub(super) bf16_matmuls: bool,
    /// Run fusion groups as single kernels (off: one kernel per op, the baseline).
    pub(super) fuse: bool,
    /// Kernel launches of the last run.
    pub(super) launches: usize,
    /// Per-kernel timings of the last run, when profiling.
    pub(super) profile: Option<Vec<KernelTiming>>,
    /// The device and driver, for the tuning scope.
    pub(super) identity: String,
    /// Plans made so far, by graph fingerprint and fusion on or off: a training
    /// run executes the same few graphs every step, and planning one takes a few
    /// milliseconds.
    pub(super) plans: HashMap<(u64, bool), std::sync::Arc<FusionPlan>>,
    /// `Backend::memory_peak` of the last profiled run.
    pub(super) memory_peak: Option<u64>,
    /// Told before each kernel step of a run what it launches (see `observe_steps`).
    pub(super) step_observer: Option<StepObserver>,
    /// The machine's memory, when the device computes in it (lavapipe).
    pub(super) host_memory: Option<u64>,
    /// Graphs (fingerprint, fusion, symbols) already found to fit the device.
    pub(super) fitted: std::collections::HashSet<(u64, bool, BTreeMap<String, usize>)>,
}

pub(super) type StepObserver = Box<dyn FnMut(&str, Option<&KernelDescription>) + Send>;

/// Where a run's leaves come from: host tensors uploaded by the run, or buffers of
/// the given shapes left as the device allocates them (a run that only has to
/// launch its kernels, as the CUDA check's recording device does).
#[derive(Clone, Copy)]
pub(super) enum Leaves<'a> {
    Host(&'a TensorMap),
    Shapes(&'a BTreeMap<String, Vec<usize>>),
}

impl Leaves<'_> {
    pub(super) fn shape(&self, name: &str) -> Option<&[usize]> {
        match self {
            Leaves::Host(inputs) => inputs.get(name).map(|t| t.shape.as_slice()),
            Leaves::Shapes(shapes) => shapes.get(name).map(Vec::as_slice),
        }
    }
}

impl<R: Runtime> DeviceBackend<R> {
    pub fn new(client: ComputeClient<R>, name: &'static str, bf16_matmuls: bool) -> Self {
        DeviceBackend {
            kernels: Kernels::new(client),
            name,
            state: HashMap::new(),
            staged: Vec::new(),
            bf16_matmuls,
            fuse: true,
            launches: 0,
            profile: None,
            identity: name.to_string(),
            plans: HashMap::new(),
            memory_peak: None,
            step_observer: None,
            host_memory: None,
            fitted: Default::default(),
        }
    }

    /// Calls `observer` with the graph's name and each kernel step's description
    /// before the step launches (`None`: the copies of outputs after the last step),
    /// and synchronises the device after each step, so that every launch of a step
    /// has reached the device before the observer hears of the next one.
    pub fn observe_steps(
        mut self,
        observer: impl FnMut(&str, Option<&KernelDescription>) + Send + 'static,
    ) -> Self {
        self.step_observer = Some(Box::new(observer));
        self
    }

    /// Runs `graph` with every `Input` leaf and every parameter the state lacks
    /// bound to a device buffer of its shape whose contents are whatever the device
    /// holds: for launching a plan's kernels without data. `input_shapes` binds the
    /// symbolic extents. Outputs come back as with `run`.
    pub fn run_uninitialised(
        &mut self,
        graph: &Graph,
        input_shapes: &BTreeMap<String, Vec<usize>>,
        ctx: EvalContext,
    ) -> Result<BTreeMap<String, Tensor>, BackendError> {
        self.execute(graph, Leaves::Shapes(input_shapes), ctx)
    }

    /// A device that computes in the machine's memory (a CPU Vulkan device): its
    /// runs must fit in `memory` bytes.
    pub fn in_host_memory(mut self, memory: Option<u64>) -> Self {
        self.host_memory = memory;
        self
    }

    /// The most bytes one buffer may hold on this device.
    pub(super) fn buffer_limit(&self) -> u64 {
        self.kernels.client().properties().memory.max_page_size
    }

    /// Names the device and driver the tuning scope is for.
    pub fn identified_as(mut self, identity: String) -> Self {
        self.identity = identity;
        self
    }

    /// Whether to run fusion groups as single kernels; off runs one kernel per op
    /// (`--no-opt`, the baseline).
    pub fn fused(mut self, fuse: bool) -> Self {
        self.fuse = fuse;
        self
    }
}

impl<R: Runtime> Backend for DeviceBackend<R> {
    fn describe(&self) -> String {
        let mut text = self.name.to_string();
        if self.bf16_matmuls {
            text.push_str(", bf16 matmuls with f32 master weights");
        }
        if !self.fuse {
            text.push_str(", unfused (--no-opt)");
        }
        text
    }

    fn load_state(&mut self, state: &TensorMap) -> Result<(), BackendError> {
        let limit = self.buffer_limit();
        // Parameters before their optimizer state, by name: the same tensor is named
        // every time.
        let mut names: Vec<&String> = state.keys().collect();
        names.sort_by_key(|n| (altc_compiler::train::is_optimizer_state(n), n.as_str()));
        for name in names {
            let t = &state[name];
            let bytes = t.shape.iter().product::<usize>() as u64 * ELEMENT_BYTES as u64;
            if bytes > limit {
                return Err(FitError::Buffer {
                    what: format!("state tensor `{name}`"),
                    advice: FitError::OTHER_DEVICE,
                    shape: t.shape.clone(),
                    size: Bytes(bytes),
                    limit: Bytes(limit),
                    device: self.identity.clone(),
                }
                .into());
            }
        }
        self.state = state
            .iter()
            .map(|(n, t)| (n.clone(), self.upload(t)))
            .collect();
        Ok(())
    }

    fn max_buffer_bytes(&self) -> Option<u64> {
        Some(self.buffer_limit())
    }

    fn read_state(&mut self) -> TensorMap {
        self.state
            .iter()
            .map(|(n, v)| (n.clone(), self.download(v, DType::F32)))
            .collect()
    }

    fn run(
        &mut self,
        graph: &Graph,
        inputs: &TensorMap,
        ctx: EvalContext,
    ) -> Result<BTreeMap<String, Tensor>, BackendError> {
        self.execute(graph, Leaves::Host(inputs), ctx)
    }

    fn commit(&mut self) {
        self.state.extend(std::mem::take(&mut self.staged));
    }

    fn measure_ceilings(&self, copy_elements: usize, matmul_size: usize) -> Option<Ceilings> {
        Some(self.kernels.measure_ceilings(copy_elements, matmul_size))
    }

    fn kernel_launches(&self) -> Option<usize> {
        Some(self.launches)
    }

    fn kernel_limits(&self) -> Option<KernelLimits> {
        Some(self.limits())
    }

    fn set_tuning(&mut self, mode: TuningMode) {
        let scope = self.tuning_scope().expect("devices have a tuning scope");
        self.kernels.set_tuning(mode, scope);
    }

    fn tuning_scope(&self) -> Option<String> {
        let hw = &self.kernels.client().properties().hardware;
        let text = format!(
            "altc-{} {} {} units{} plane{}-{}",
            env!("CARGO_PKG_VERSION"),
            self.identity,
            hw.max_units_per_cube,
            if self.bf16_matmuls { " bf16" } else { "" },
            hw.plane_size_min,
            hw.plane_size_max
        );
        // cubecl names a cache file after the scope.
        let safe: String = text
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Some(safe)
    }

    fn tuned_kernels(&self) -> Vec<TunedKernel> {
        self.kernels.tuned_kernels()
    }

    fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Vec::new);
    }

    fn memory_peak(&self) -> Option<u64> {
        self.memory_peak
    }

    fn kernel_profile(&self) -> Vec<KernelTiming> {
        self.profile.clone().unwrap_or_default()
    }
}
