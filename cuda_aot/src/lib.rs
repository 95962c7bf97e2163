//! altc's ahead-of-time CUDA check: every kernel a model's plans can launch,
//! compiled for NVIDIA GPUs with no GPU and no driver, only NVRTC.
//!
//! The plans run unchanged on `capture::CaptureRuntime`, a cubecl runtime with
//! cubecl-cuda's compiler and properties whose server records kernels instead of
//! launching them; each distinct kernel is then compiled by NVRTC (`nvrtc`), which
//! also runs ptxas for registers, spills and shared memory, and every launch is
//! checked against CUDA's limits. `roofline` bounds a plan's time on a target from
//! datasheet peaks. This crate owns the check and its report; it runs plans only
//! through `altc_runtime::device::DeviceBackend`, never on a real device.

pub mod capture;
pub mod nvrtc;
pub mod roofline;
pub mod target;

use altc_compiler::fusion::KernelDescription;
use altc_compiler::ir::{Graph, Op};
use altc_compiler::reference::EvalContext;
use altc_runtime::backend::{Backend, BackendError, TuningMode};
use altc_runtime::device::DeviceBackend;
use capture::{set_launch_context, CaptureRuntime, LaunchContext, Recording};
use nvrtc::{first_error, Nvrtc, PtxasReport};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use target::{
    occupancy, CudaTarget, MAX_GRID_X, MAX_GRID_YZ, MAX_THREADS_PER_BLOCK, SHARED_WITHOUT_OPT_IN,
};

/// Graphs to launch as one plan variant: fused (optimised) or one kernel per op, with
/// f32 or bf16 matmul operands, each graph with the shapes of its inputs.
pub struct Workload {
    /// Says what ran (`alt_moe_tiny optimised f32 batch 64`).
    pub name: String,
    pub fused: bool,
    pub bf16: bool,
    pub graphs: Vec<(Graph, BTreeMap<String, Vec<usize>>)>,
}

impl Workload {
    /// Every graph `program` runs on a device (`device_graphs`), at `batch`: the
    /// optimised plans when `fused`, else the program's graphs one kernel per op.
    pub fn of_program(
        program: &altc_compiler::lower::Program,
        fused: bool,
        bf16: bool,
        batch: usize,
    ) -> Result<Workload, altc_compiler::pipeline::PipelineError> {
        let graphs = altc_runtime::workload::device_graphs(program, fused)?
            .into_iter()
            .map(|graph| {
                let shapes = input_shapes(&graph, batch);
                (graph, shapes)
            })
            .collect();
        Ok(Workload {
            name: format!(
                "{} {}, {}, batch {batch}",
                program.model,
                if fused { "optimised" } else { "--no-opt" },
                if bf16 { "bf16" } else { "f32" },
            ),
            fused,
            bf16,
            graphs,
        })
    }
}

/// The shapes of `graph`'s inputs with every symbolic extent at `batch`.
pub fn input_shapes(graph: &Graph, batch: usize) -> BTreeMap<String, Vec<usize>> {
    graph
        .node_ids()
        .filter_map(|id| match &graph.node(id).op {
            Op::Input { name, shape, .. } => Some((
                name.clone(),
                shape
                    .dims()
                    .iter()
                    .map(|d| d.fixed().unwrap_or(batch))
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

/// The symbolic extents of `graph` as its input shapes bind them.
pub fn symbols(graph: &Graph, shapes: &BTreeMap<String, Vec<usize>>) -> BTreeMap<String, usize> {
    let mut symbols = BTreeMap::new();
    for (name, id) in graph.inputs() {
        let Some(shape) = shapes.get(name) else {
            continue;
        };
        for (d, &n) in graph.node(id).ty.shape.dims().iter().zip(shape) {
            if let altc_compiler::ir::Dim::Sym(s) = d {
                symbols.insert(s.clone(), n);
            }
        }
    }
    symbols
}

/// The untuned plan, then every candidate of every tunable family forced in turn:
/// every configuration `altc tune` may choose.
pub fn every_tuning_choice() -> Vec<TuningMode> {
    let names: std::collections::BTreeSet<String> = altc_kernels::TUNABLE_FAMILIES
        .iter()
        .flat_map(|family| altc_kernels::candidates(family))
        .collect();
    std::iter::once(TuningMode::Untuned)
        .chain(names.into_iter().map(TuningMode::Force))
        .collect()
}

fn mode_name(mode: &TuningMode) -> String {
    match mode {
        TuningMode::Force(name) => format!("forced {name}"),
        _ => "untuned".into(),
    }
}

/// What a capture recorded, and the graphs it could not launch.
#[derive(Debug, Default)]
pub struct Captured {
    pub recording: Recording,
    /// Graphs the device refused to launch (a tensor past 32-bit indexing), as
    /// failures of the check.
    pub refused: Vec<Failure>,
    /// Graphs left out because their plan needs more memory than the target's
    /// reference GPU has: they cannot run there whatever their kernels.
    pub too_large: Vec<String>,
}

/// Bytes a run of `graph` holds at its plan's peak: leaves, parameters and optimizer
/// state resident, plus the plan's peak intermediates.
fn footprint(graph: &Graph, fused: bool, shapes: &BTreeMap<String, Vec<usize>>) -> u64 {
    use altc_compiler::fusion::{plan, FusionPlan, KernelLimits};
    let symbols = symbols(graph, shapes);
    let fusion = if fused {
        plan(graph, KernelLimits::for_bindings(1024))
    } else {
        FusionPlan::unfused(graph)
    };
    altc_compiler::fusion::cost::plan_cost(graph, &fusion, &symbols).peak_bytes
        + altc_compiler::fusion::cost::leaf_bytes(graph, &symbols)
}

/// Runs every workload under every tuning mode on each target's capture device
/// and returns what was launched.
pub fn capture(
    workloads: &[Workload],
    targets: &[CudaTarget],
    modes: &[TuningMode],
    mut progress: impl FnMut(&str),
) -> Result<Captured, BackendError> {
    capture::take_recording();
    let mut refused = Vec::new();
    let mut too_large = Vec::new();
    let ctx = EvalContext { seed: 1, step: 0 };
    for &target in targets {
        let client = CaptureRuntime::client_for(target);
        for workload in workloads {
            progress(&format!("{target}: {}", workload.name));
            // One backend per workload, so each graph is planned once for all modes.
            let running = Arc::new(std::sync::Mutex::new(String::new()));
            let prefix = running.clone();
            let observed = move |graph: &str, kernel: Option<&KernelDescription>| {
                let prefix = prefix.lock().unwrap_or_else(|e| e.into_inner());
                set_launch_context(LaunchContext {
                    workload: format!("{prefix}: {graph}"),
                    family: kernel.map_or("output copy", |k| k.family).to_string(),
                    node: kernel.map(|k| k.node.index()),
                    origin: kernel.map(|k| k.origin.clone()).unwrap_or_default(),
                })
            };
            let mut backend =
                DeviceBackend::<CaptureRuntime>::new(client.clone(), "cuda", workload.bf16)
                    .fused(workload.fused)
                    .observe_steps(observed);
            let memory = target.hardware().memory_bytes;
            let mut runnable = Vec::new();
            for (graph, shapes) in &workload.graphs {
                let bytes = footprint(graph, workload.fused, shapes);
                if bytes > memory {
                    too_large.push(format!(
                        "{target}: {}: {} needs {:.1} GB at its peak, more than the {} has ({:.0} GB)",
                        workload.name,
                        graph.name,
                        bytes as f64 / 1e9,
                        target.hardware().gpu,
                        memory as f64 / 1e9
                    ));
                } else {
                    runnable.push((graph, shapes));
                }
            }
            for (i, mode) in modes.iter().enumerate() {
                *running.lock().unwrap_or_else(|e| e.into_inner()) =
                    format!("{}, {}", workload.name, mode_name(mode));
                backend.set_tuning(mode.clone());
                let mut kept = Vec::new();
                for (graph, shapes) in runnable {
                    match backend.run_uninitialised(graph, shapes, ctx) {
                        Ok(_) => kept.push((graph, shapes)),
                        // Refused before anything launched, whatever the mode.
                        Err(BackendError::TooLarge {
                            node,
                            origin,
                            elements,
                            ..
                        }) => {
                            debug_assert_eq!(i, 0, "a refusal does not depend on the mode");
                            refused.push(Failure {
                                target: target.name(),
                                kernel: String::new(),
                                family: String::new(),
                                origin,
                                node: Some(node),
                                workload: format!("{}: {}", workload.name, graph.name),
                                error: format!(
                                    "a tensor of {elements} elements: altc's kernels index in 32 bits"
                                ),
                            });
                        }
                        Err(e) => return Err(e),
                    }
                }
                runnable = kept;
            }
        }
    }
    Ok(Captured {
        recording: capture::take_recording(),
        refused,
        too_large,
    })
}

/// One distinct kernel on one target, compiled.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    pub target: String,
    /// The plan's kernel family and the kernel's Rust type.
    pub family: String,
    pub kernel: String,
    /// The spec path and graph node of its first launch, and what that ran.
    pub origin: String,
    pub node: Option<usize>,
    pub workload: String,
    pub launches: usize,
    pub threads: u32,
    pub largest_grid: Option<(u32, u32, u32)>,
    pub ptxas: Option<PtxasReport>,
    pub dynamic_shared: usize,
    /// Theoretical occupancy on the target's reference GPU.
    pub occupancy: Option<f64>,
    pub ok: bool,
}

/// A kernel that does not compile, or a launch CUDA would refuse.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub target: String,
    pub kernel: String,
    pub family: String,
    pub origin: String,
    pub node: Option<usize>,
    pub workload: String,
    pub error: String,
}

/// The check's result over a recording.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub nvrtc: String,
    pub kernels: Vec<KernelRow>,
    pub failures: Vec<Failure>,
    pub launches: usize,
}

impl CheckReport {
    pub fn failed(&self) -> bool {
        !self.failures.is_empty()
    }
}

/// The short name of a kernel type (`FusedKernel` of `altc_kernels::fused::FusedKernel<..>`).
fn short_type(type_name: &str) -> String {
    let path = type_name.split('<').next().unwrap_or(type_name);
    path.rsplit("::").next().unwrap_or(path).to_string()
}

/// Compiles every recorded kernel with NVRTC (on `threads` threads) and checks every
/// launch against CUDA's limits.
pub fn check(recording: &Recording, nvrtc: &Nvrtc, threads: usize) -> CheckReport {
    let compiled = compile_all(recording, nvrtc, threads.max(1));
    let mut launches_of: Vec<Vec<&capture::Launch>> = vec![Vec::new(); recording.kernels.len()];
    for launch in &recording.launches {
        launches_of[launch.kernel].push(launch);
    }
    let mut kernels = Vec::new();
    let mut failures = Vec::new();
    for ((kernel, result), launches) in recording.kernels.iter().zip(compiled).zip(&launches_of) {
        let first: Arc<LaunchContext> = launches
            .first()
            .map(|l| l.context.clone())
            .unwrap_or_default();
        let hw = kernel.target.hardware();
        let (dx, dy, dz) = kernel.cube_dim;
        let threads = dx * dy * dz;
        let fail = |context: &LaunchContext, error: String| Failure {
            target: kernel.target.name(),
            kernel: short_type(&kernel.type_name),
            family: context.family.clone(),
            origin: context.origin.clone(),
            node: context.node,
            workload: context.workload.clone(),
            error,
        };
        let before = failures.len();
        if let Err(log) = &result {
            failures.push(fail(&first, first_error(log).to_string()));
        }
        if let Some(v) = &kernel.validation {
            failures.push(fail(&first, format!("cubecl-cuda refuses it: {v}")));
        }
        let static_shared = result.as_ref().map_or(0, |r| r.static_shared) as usize;
        let shared = static_shared + kernel.dynamic_shared;
        if threads > MAX_THREADS_PER_BLOCK {
            failures.push(fail(
                &first,
                format!("{threads} threads per block (CUDA allows {MAX_THREADS_PER_BLOCK})"),
            ));
        }
        if shared > hw.shared_per_block_opt_in as usize {
            failures.push(fail(
                &first,
                format!(
                    "{shared} bytes of shared memory per block ({} allows {} with opt-in)",
                    hw.gpu, hw.shared_per_block_opt_in
                ),
            ));
        }
        // Grids are checked launch by launch; one failure per kernel says enough.
        let refused = launches.iter().find_map(|l| {
            let (x, y, z) = l.cube_count?;
            let why = if x == 0 || y == 0 || z == 0 {
                format!("an empty grid ({x}, {y}, {z}): CUDA refuses a zero grid dimension")
            } else if x > MAX_GRID_X || y > MAX_GRID_YZ || z > MAX_GRID_YZ {
                format!("grid ({x}, {y}, {z}) exceeds CUDA's ({MAX_GRID_X}, {MAX_GRID_YZ}, {MAX_GRID_YZ})")
            } else {
                return None;
            };
            Some((l, why))
        });
        if let Some((launch, why)) = refused {
            failures.push(fail(&launch.context, why));
        }
        let largest_grid = launches
            .iter()
            .filter_map(|l| l.cube_count)
            .max_by_key(|&(x, y, z)| u64::from(x) * u64::from(y) * u64::from(z));
        let ptxas = result.ok();
        kernels.push(KernelRow {
            target: kernel.target.name(),
            family: first.family.clone(),
            kernel: short_type(&kernel.type_name),
            origin: first.origin.clone(),
            node: first.node,
            workload: first.workload.clone(),
            launches: launches.len(),
            threads,
            largest_grid,
            occupancy: ptxas
                .as_ref()
                .map(|r| occupancy(&hw, threads, r.registers, shared as u32)),
            ptxas,
            dynamic_shared: kernel.dynamic_shared,
            ok: failures.len() == before,
        });
    }
    CheckReport {
        nvrtc: format!(
            "NVRTC {}.{} ({})",
            nvrtc.version.0, nvrtc.version.1, nvrtc.library
        ),
        kernels,
        failures,
        launches: recording.launches.len(),
    }
}

/// NVRTC over every recorded kernel, `threads` at a time, in recording order.
fn compile_all(
    recording: &Recording,
    nvrtc: &Nvrtc,
    threads: usize,
) -> Vec<Result<PtxasReport, String>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let kernels = &recording.kernels;
    let mut results: Vec<Option<Result<PtxasReport, String>>> = vec![None; kernels.len()];
    let done = std::sync::Mutex::new(&mut results);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(kernel) = kernels.get(i) else {
                    break;
                };
                let result = match &kernel.source {
                    Ok(source) => nvrtc.compile(source, kernel.target),
                    Err(why) => Err(format!("cubecl-cpp could not write CUDA: {why}")),
                };
                done.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every kernel compiled"))
        .collect()
}

/// The most any of some kernels uses of each resource: what a summary reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Worst {
    pub registers: u32,
    /// Spill stores and loads, bytes.
    pub spilled: u32,
    pub static_shared: u32,
    pub dynamic_shared: usize,
    /// Kernels above `SHARED_WITHOUT_OPT_IN` of dynamic shared memory: they launch
    /// only because cubecl-cuda raises their limit
    /// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
    pub above_opt_in: usize,
}

impl Worst {
    pub fn of<'a>(kernels: impl IntoIterator<Item = &'a KernelRow>) -> Worst {
        let mut worst = Worst::default();
        for k in kernels {
            let p = k.ptxas.clone().unwrap_or_default();
            worst.registers = worst.registers.max(p.registers);
            worst.spilled = worst.spilled.max(p.spill_stores + p.spill_loads);
            worst.static_shared = worst.static_shared.max(p.static_shared);
            worst.dynamic_shared = worst.dynamic_shared.max(k.dynamic_shared);
            worst.above_opt_in += usize::from(k.dynamic_shared > SHARED_WITHOUT_OPT_IN as usize);
        }
        worst
    }
}
