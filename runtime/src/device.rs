//! cubecl devices: choosing one, and executing IR graphs on it op by op with the
//! kernels of `altc_kernels`. Layout ops (transpose, broadcast, slice, reshape of a
//! contiguous buffer) become strided views and launch nothing; every other op is one
//! kernel launch. Intermediate buffers are released after their last use.

use crate::backend::{Backend, BackendError, Ceilings, KernelTiming, TunedKernel, TuningMode};
use altc_compiler::fusion::{
    self, FusionGroup, FusionPlan, KernelDescription, KernelLimits, MultiGroup, MultiMatmul,
    SharedOperand, Step,
};
use altc_compiler::ir::{
    BinaryOp, CompareOp, DType, Dim, Graph, NodeId, Op, ReduceOp, Shape, UnaryOp,
};
use altc_compiler::reference::{EvalContext, Tensor, TensorMap};
use altc_compiler::spec::Precision;
use altc_kernels::{
    BinaryKind, ExpertMatmul, FusedOp, FusedProgram, Kernels, MatmulOperands, OperandLayout,
    ReduceKind, RowTopK, Segment, UnaryKind, View,
};
use cubecl::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// Which device to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when a driver is found, else wgpu.
    Auto,
    Cuda,
    Wgpu,
}

/// Opens the chosen device, or says plainly why it cannot. With `Precision::Bf16`,
/// CUDA runs matmuls on bf16 operands with f32 accumulation while parameters,
/// optimizer state and every other op stay f32 (autocast); wgpu (lavapipe has no
/// bf16) computes in f32.
///
/// `fuse: false` runs one kernel per op: the unoptimised baseline (`--no-opt`).
pub fn open(
    choice: DeviceChoice,
    precision: Precision,
    fuse: bool,
) -> Result<Box<dyn Backend>, BackendError> {
    let bf16 = precision == Precision::Bf16;
    match choice {
        DeviceChoice::Cuda => open_cuda(bf16, fuse),
        DeviceChoice::Wgpu => open_wgpu(fuse),
        DeviceChoice::Auto => open_cuda(bf16, fuse).or_else(|cuda| {
            open_wgpu(fuse)
                .map_err(|wgpu| BackendError::Unavailable(format!("no device: {cuda}; {wgpu}")))
        }),
    }
}

/// Creating a client panics inside the driver bindings when no device exists; probe
/// it on a quiet panic hook so a missing device is an error, not a crash.
fn probe<T>(
    what: &str,
    make: impl FnOnce() -> T + std::panic::UnwindSafe,
) -> Result<T, BackendError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(make);
    std::panic::set_hook(hook);
    result.map_err(|e| {
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let why = why.lines().next().unwrap_or("").to_string();
        BackendError::Unavailable(format!("{what} is not available ({why})"))
    })
}

fn open_cuda(bf16_matmuls: bool, fuse: bool) -> Result<Box<dyn Backend>, BackendError> {
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    // The driver bindings fail on another thread without a useful message when there
    // is no driver at all, so look for the kernel driver first.
    if !std::path::Path::new("/proc/driver/nvidia/version").exists() {
        return Err(BackendError::Unavailable(
            "CUDA is not available (no NVIDIA driver: /proc/driver/nvidia/version is missing)"
                .into(),
        ));
    }
    let client = probe("CUDA", || CudaRuntime::client(&CudaDevice::default()))?;
    let driver = std::fs::read_to_string("/proc/driver/nvidia/version").unwrap_or_default();
    let identity = format!("cuda {}", driver.lines().next().unwrap_or("unknown driver"));
    Ok(Box::new(
        DeviceBackend::<CudaRuntime>::new(client, "cuda", bf16_matmuls)
            .fused(fuse)
            .identified_as(identity),
    ))
}

fn open_wgpu(fuse: bool) -> Result<Box<dyn Backend>, BackendError> {
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    let client = probe("wgpu (Vulkan)", || {
        WgpuRuntime::client(&WgpuDevice::default())
    })?;
    Ok(Box::new(
        DeviceBackend::<WgpuRuntime>::new(client, "wgpu", false)
            .fused(fuse)
            .identified_as(format!("wgpu {}", vulkan_adapters())),
    ))
}

/// The Vulkan adapters present, with their drivers: what cubecl's default wgpu
/// device is chosen from.
fn vulkan_adapters() -> String {
    let instance = wgpu::Instance::default();
    let adapters = cubecl::future::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
    let names: Vec<String> = adapters
        .iter()
        .map(|a| {
            let info = a.get_info();
            format!("{} {} {}", info.name, info.driver, info.driver_info)
        })
        .collect();
    if names.is_empty() {
        "unknown adapter".into()
    } else {
        names.join("; ")
    }
}

/// A value on the device: a (possibly strided) view and its logical shape.
#[derive(Clone)]
struct Value {
    view: View,
    shape: Vec<usize>,
}

impl Value {
    fn contiguous(handle: cubecl::server::Handle, shape: Vec<usize>) -> Value {
        Value {
            view: View::contiguous(handle, &shape),
            shape,
        }
    }

    /// The value as rows of its last dimension: (row count, row width).
    fn rows_and_width(&self) -> (usize, usize) {
        let width = *self.shape.last().expect("rank checked by inference");
        let n = self.shape.iter().product::<usize>();
        (n / width.max(1), width)
    }

    fn is_contiguous(&self) -> bool {
        self.view.offset == 0
            && self.view.strides == altc_kernels::contiguous_strides(&self.shape)
            && self.view.len == self.shape.iter().product::<usize>()
    }
}

pub struct DeviceBackend<R: Runtime> {
    kernels: Kernels<R>,
    name: &'static str,
    state: HashMap<String, Value>,
    staged: Vec<(String, Value)>,
    /// Round matmul operands to bf16 (f32 accumulation): mixed precision.
    bf16_matmuls: bool,
    /// Run fusion groups as single kernels (off: one kernel per op, the baseline).
    fuse: bool,
    /// Kernel launches of the last run.
    launches: usize,
    /// Per-kernel timings of the last run, when profiling.
    profile: Option<Vec<KernelTiming>>,
    /// The device and driver, for the tuning scope.
    identity: String,
    /// Plans made so far, by graph fingerprint and fusion on or off: a training
    /// run executes the same few graphs every step, and planning one takes a few
    /// milliseconds.
    plans: HashMap<(u64, bool), std::sync::Arc<FusionPlan>>,
    /// `Backend::memory_peak` of the last profiled run.
    memory_peak: Option<u64>,
    /// Told before each kernel step of a run what it launches (see `observe_steps`).
    step_observer: Option<StepObserver>,
}

type StepObserver = Box<dyn FnMut(&str, Option<&KernelDescription>) + Send>;

/// Where a run's leaves come from: host tensors uploaded by the run, or buffers of
/// the given shapes left as the device allocates them (a run that only has to
/// launch its kernels, as the CUDA check's recording device does).
#[derive(Clone, Copy)]
enum Leaves<'a> {
    Host(&'a TensorMap),
    Shapes(&'a BTreeMap<String, Vec<usize>>),
}

impl Leaves<'_> {
    fn shape(&self, name: &str) -> Option<&[usize]> {
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

    /// Evaluates a fusion group with one fused kernel: external operands are loaded
    /// through views broadcast to the group's shape, constants are inlined.
    /// Evaluates a fusion group with one fused kernel.
    fn eval_group(
        &self,
        graph: &Graph,
        group: &FusionGroup,
        values: &[Option<Value>],
        shape: Vec<usize>,
        ctx: EvalContext,
    ) -> Vec<Value> {
        let (program, inputs) = self.group_program(graph, group, values, &shape, None);
        self.kernels
            .fused(&program, &inputs, &shape, ctx.seed, ctx.step)
            .into_iter()
            .enumerate()
            .map(|(o, h)| Value::contiguous(h, Self::output_shape(&program, o, &shape)))
            .collect()
    }

    /// Runs the groups of a multi-tensor step in one kernel, each over its own tensors
    /// read flat; returns every group's outputs. Should the groups' programs differ
    /// after all, each runs as its own kernel instead.
    fn eval_multi_group(
        &mut self,
        graph: &Graph,
        plan: &FusionPlan,
        batch: &MultiGroup,
        values: &[Option<Value>],
        symbols: &BTreeMap<String, usize>,
        ctx: EvalContext,
    ) -> Vec<(NodeId, Value)> {
        let shapes: Vec<Vec<usize>> = batch
            .groups
            .iter()
            .map(|&g| {
                concrete(plan.groups[g].shape(graph), symbols).expect("inputs bind every symbol")
            })
            .collect();
        let programs: Vec<FusedProgram> = batch
            .groups
            .iter()
            .zip(&shapes)
            .map(|(&g, shape)| {
                self.group_program(graph, &plan.groups[g], values, shape, None)
                    .0
            })
            .collect();
        let flat = |p: &FusedProgram| FusedProgram {
            rank: 1,
            ..p.clone()
        };
        let uniform = programs.iter().all(|p| flat(p) == flat(&programs[0]))
            && programs[0].inputs == batch.inputs[0].len();
        let mut produced = Vec::new();
        if !uniform {
            for (&g, shape) in batch.groups.iter().zip(&shapes) {
                let group = &plan.groups[g];
                self.launches += 1;
                let outputs = self.eval_group(graph, group, values, shape.clone(), ctx);
                produced.extend(group.outputs.iter().copied().zip(outputs));
            }
            return produced;
        }
        let mut program = flat(&programs[0]);
        let order = shared_inputs_first(&mut program, &batch.shared);
        let mut flat_view = |node: NodeId| -> View {
            let value = values[node.index()].as_ref().expect("operands come first");
            let one_value = value.shape.iter().product::<usize>() == 1;
            let value = if one_value
                || value.view.strides == altc_kernels::contiguous_strides(&value.shape)
            {
                value.clone()
            } else {
                self.launches += 1;
                self.materialise(value)
            };
            View {
                strides: vec![usize::from(!one_value)],
                ..value.view
            }
        };
        let shared: Vec<View> = batch
            .shared
            .iter()
            .map(|&p| flat_view(batch.inputs[0][p]))
            .collect();
        let segments: Vec<Segment> = batch
            .inputs
            .iter()
            .zip(&shapes)
            .map(|(inputs, shape)| Segment {
                len: shape.iter().product(),
                inputs: order[batch.shared.len()..]
                    .iter()
                    .map(|&p| flat_view(inputs[p]))
                    .collect(),
            })
            .collect();
        self.launches += 1;
        let outputs = self.kernels.multi_fused(&program, &shared, &segments);
        for ((&g, shape), handles) in batch.groups.iter().zip(&shapes).zip(outputs) {
            for (o, (&id, handle)) in plan.groups[g].outputs.iter().zip(handles).enumerate() {
                let shape = Self::output_shape(&program, o, shape);
                produced.push((id, Value::contiguous(handle, shape)));
            }
        }
        produced
    }

    /// What one kernel may bind on this device, as plans for it assume.
    fn limits(&self) -> KernelLimits {
        let bindings = self.kernels.client().properties().hardware.max_bindings as usize;
        KernelLimits::for_bindings(bindings)
    }

    /// One matmul step on its own: a plain matmul, one with an epilogue or one
    /// summed over the batch. Returns the values it writes.
    fn eval_matmul(
        &self,
        graph: &Graph,
        plan: &FusionPlan,
        step: Step,
        values: &[Option<Value>],
        symbols: &BTreeMap<String, usize>,
        ctx: EvalContext,
    ) -> Vec<(NodeId, Value)> {
        let (Step::Node(matmul)
        | Step::MatmulGroup { matmul, .. }
        | Step::MatmulSum { matmul, .. }) = step
        else {
            unreachable!("not a matmul step: {step:?}")
        };
        let product = shape_of(graph, matmul, symbols);
        let (a, b, transposes) = matmul_operands(graph, matmul, values);
        let mm = self.matmul_of((&a, &b), transposes, &product[..product.len() - 2]);
        match step {
            Step::MatmulGroup { group, .. } => {
                let group = &plan.groups[group];
                let (program, views) =
                    self.group_program(graph, group, values, &product, Some(matmul));
                let outputs = self
                    .kernels
                    .matmul_with_epilogue(&mm, &program, &views, ctx.seed, ctx.step);
                group
                    .outputs
                    .iter()
                    .zip(outputs)
                    .map(|(&id, handle)| (id, Value::contiguous(handle, product.clone())))
                    .collect()
            }
            Step::MatmulSum { reduce, .. } => {
                let handle = self.kernels.matmul_batch_sum(&mm);
                let summed = product[product.len() - 2..].to_vec();
                vec![(reduce, Value::contiguous(handle, summed))]
            }
            _ => vec![(matmul, Value::contiguous(self.kernels.matmul(&mm), product))],
        }
    }

    /// Matmuls sharing an operand in one launch; each on its own should their
    /// epilogue programs come out different.
    fn eval_multi_matmul(
        &mut self,
        graph: &Graph,
        plan: &FusionPlan,
        batch: &MultiMatmul,
        values: &[Option<Value>],
        symbols: &BTreeMap<String, usize>,
        ctx: EvalContext,
    ) -> Vec<(NodeId, Value)> {
        let matmuls = batch.matmuls();
        let product = shape_of(graph, matmuls[0], symbols);
        let (programs, views): (Vec<FusedProgram>, Vec<Vec<View>>) = batch
            .members
            .iter()
            .map(|step| match *step {
                Step::MatmulGroup { matmul, group } => {
                    self.group_program(graph, &plan.groups[group], values, &product, Some(matmul))
                }
                _ => (FusedProgram::product(), Vec::new()),
            })
            .unzip();
        if programs.iter().any(|p| *p != programs[0]) {
            let mut produced = Vec::new();
            for &step in &batch.members {
                self.launches += 1;
                produced.extend(self.eval_matmul(graph, plan, step, values, symbols, ctx));
            }
            return produced;
        }
        let mut program = programs[0].clone();
        let order = shared_inputs_first(&mut program, &batch.epilogue_shared);
        let views: Vec<Vec<View>> = views
            .iter()
            .map(|member| order.iter().map(|&p| member[p].clone()).collect())
            .collect();
        let operands: Vec<(Value, Value, (bool, bool))> = matmuls
            .iter()
            .map(|&m| matmul_operands(graph, m, values))
            .collect();
        let out_batch = &product[..product.len() - 2];
        let members: Vec<MatmulOperands> = operands
            .iter()
            .map(|(a, b, transposes)| self.matmul_of((a, b), *transposes, out_batch))
            .collect();
        let layout = OperandLayout {
            members: members.len(),
            shared_a: batch.shared == SharedOperand::Left,
            shared_b: batch.shared == SharedOperand::Right,
        };
        let sum_batch = matches!(batch.members[0], Step::MatmulSum { .. });
        self.launches += 1;
        let outputs = self.kernels.multi_matmul(
            &members, layout, &program, &views, sum_batch, ctx.seed, ctx.step,
        );
        let mut produced = Vec::new();
        for (&step, handles) in batch.members.iter().zip(outputs) {
            let written: Vec<(NodeId, Vec<usize>)> = match step {
                Step::MatmulGroup { group, .. } => plan.groups[group]
                    .outputs
                    .iter()
                    .map(|&id| (id, product.clone()))
                    .collect(),
                Step::MatmulSum { reduce, .. } => {
                    vec![(reduce, product[product.len() - 2..].to_vec())]
                }
                Step::Node(matmul) => vec![(matmul, product.clone())],
                _ => unreachable!("a multi-matmul holds matmul steps"),
            };
            for ((id, shape), handle) in written.into_iter().zip(handles) {
                produced.push((id, Value::contiguous(handle, shape)));
            }
        }
        produced
    }

    /// The fused program of a group and the views of its external inputs, broadcast
    /// to the group's shape; constants are inlined.
    fn group_program(
        &self,
        graph: &Graph,
        group: &FusionGroup,
        values: &[Option<Value>],
        shape: &[usize],
        accumulator: Option<NodeId>,
    ) -> (FusedProgram, Vec<View>) {
        let mut program = FusedProgram {
            rank: shape.len(),
            ..FusedProgram::default()
        };
        let mut register: HashMap<NodeId, usize> = HashMap::new();
        let mut inputs: Vec<View> = Vec::new();
        for &member in &group.nodes {
            let mut regs = Vec::new();
            for o in graph.operands(member) {
                let r = match register.get(&o) {
                    Some(&r) => r,
                    None => {
                        let op = match &graph.node(o).op {
                            _ if Some(o) == accumulator => FusedOp::Accumulator,
                            Op::Constant { value, .. } => FusedOp::Constant {
                                bits: (value.0 as f32).to_bits(),
                            },
                            _ => {
                                let value = values[o.index()]
                                    .as_ref()
                                    .expect("external operands are evaluated first");
                                inputs.push(self.view_as(value, shape));
                                FusedOp::Load {
                                    input: inputs.len() - 1,
                                }
                            }
                        };
                        program.ops.push(op);
                        register.insert(o, program.ops.len() - 1);
                        program.ops.len() - 1
                    }
                };
                regs.push(r);
            }
            let op = match &graph.node(member).op {
                Op::Unary(u) => FusedOp::Unary {
                    op: unary_kind(*u),
                    a: regs[0],
                },
                Op::Binary(b) => FusedOp::Binary {
                    op: binary_kind(*b),
                    a: regs[0],
                    b: regs[1],
                },
                Op::Compare(c) => FusedOp::Binary {
                    op: compare_kind(*c),
                    a: regs[0],
                    b: regs[1],
                },
                Op::Where => FusedOp::Select {
                    c: regs[0],
                    a: regs[1],
                    b: regs[2],
                },
                Op::Cast { dtype } => FusedOp::Unary {
                    op: cast_kind(*dtype),
                    a: regs[0],
                },
                Op::Iota { axis, .. } => FusedOp::Iota { axis: *axis },
                Op::Dropout { rate, stream } => FusedOp::Dropout {
                    a: regs[0],
                    rate_bits: (rate.0 as f32).to_bits(),
                    stream: *stream as u32,
                },
                other => unreachable!("the planner fuses only elementwise ops, not {other}"),
            };
            program.ops.push(op);
            register.insert(member, program.ops.len() - 1);
        }
        program.outputs = group.outputs.iter().map(|o| register[o]).collect();
        if !shape.is_empty() {
            program.scalar_outputs = (0..group.outputs.len())
                .filter(|&o| graph.node(group.outputs[o]).ty.shape.rank() == 0)
                .collect();
            let group_shape = group.shape(graph);
            program.row_outputs = (0..group.outputs.len())
                .filter(|&o| fusion::is_row_of(&graph.node(group.outputs[o]).ty.shape, group_shape))
                .collect();
        }
        program.inputs = inputs.len();
        (program, inputs)
    }

    /// The shape of output `o` of a group's `program` run over `shape`: a scalar, one
    /// value per row, or `shape`.
    fn output_shape(program: &FusedProgram, o: usize, shape: &[usize]) -> Vec<usize> {
        if program.scalar_outputs.contains(&o) {
            Vec::new()
        } else if program.row_outputs.contains(&o) {
            let mut rows = shape.to_vec();
            if let Some(last) = rows.last_mut() {
                *last = 1;
            }
            rows
        } else {
            shape.to_vec()
        }
    }

    /// The kernel's view of a matmul of `a` and `b` (each transposed or not) with
    /// output batch dimensions `out_batch`, in this backend's precision.
    fn matmul_of<'v>(
        &self,
        (a, b): (&'v Value, &'v Value),
        (transpose_a, transpose_b): (bool, bool),
        out_batch: &'v [usize],
    ) -> MatmulOperands<'v> {
        MatmulOperands {
            a: &a.view,
            a_shape: &a.shape,
            transpose_a,
            b: &b.view,
            b_shape: &b.shape,
            transpose_b,
            out_batch,
            bf16_operands: self.bf16_matmuls,
        }
    }

    fn uninitialised(&self, shape: Vec<usize>) -> Value {
        Value::contiguous(self.kernels.buffer(shape.iter().product()), shape)
    }

    fn upload(&self, t: &Tensor) -> Value {
        let values: Vec<f32> = t.to_f64().iter().map(|&v| v as f32).collect();
        Value::contiguous(self.kernels.upload(&values), t.shape.clone())
    }

    fn download(&self, v: &Value, dtype: DType) -> Tensor {
        let v = self.materialise(v);
        let n = v.shape.iter().product();
        let data = self.kernels.read(v.view.handle.clone(), n);
        Tensor::from_f64(dtype, &v.shape, data.into_iter().map(f64::from).collect())
    }

    fn materialise(&self, v: &Value) -> Value {
        if v.is_contiguous() {
            return v.clone();
        }
        Value::contiguous(
            self.kernels.unary(UnaryKind::Identity, &v.view, &v.shape),
            v.shape.clone(),
        )
    }

    fn view_as(&self, v: &Value, shape: &[usize]) -> View {
        // Broadcast `v` to `shape`: right-align, stretched dimensions get stride 0.
        let lead = shape.len() - v.shape.len();
        let strides = (0..shape.len())
            .map(|i| {
                if i < lead || v.shape[i - lead] == 1 {
                    0
                } else {
                    v.view.strides[i - lead]
                }
            })
            .collect();
        View {
            strides,
            ..v.view.clone()
        }
    }

    fn eval(
        &self,
        graph: &Graph,
        id: NodeId,
        x: &[&Value],
        shape: Vec<usize>,
        ctx: EvalContext,
    ) -> Value {
        let node = graph.node(id);
        let k = &self.kernels;
        let contiguous = |h| Value::contiguous(h, shape.clone());
        match &node.op {
            Op::Input { .. } | Op::Parameter { .. } => {
                unreachable!("leaves are bound before evaluation")
            }
            Op::Constant { value, .. } => {
                // One element, read everywhere through stride 0.
                let handle = k.constant(value.0 as f32);
                Value {
                    view: View {
                        handle,
                        len: 1,
                        offset: 0,
                        strides: vec![0; shape.len()],
                    },
                    shape,
                }
            }
            Op::Iota { axis, .. } => contiguous(k.iota(&shape, *axis)),
            Op::Unary(u) => contiguous(k.unary(unary_kind(*u), &x[0].view, &shape)),
            Op::Cast { dtype } => contiguous(k.unary(cast_kind(*dtype), &x[0].view, &shape)),
            Op::Binary(b) => contiguous(k.binary(
                binary_kind(*b),
                &self.view_as(x[0], &shape),
                &self.view_as(x[1], &shape),
                &shape,
            )),
            Op::Compare(c) => contiguous(k.binary(
                compare_kind(*c),
                &self.view_as(x[0], &shape),
                &self.view_as(x[1], &shape),
                &shape,
            )),
            Op::Where => contiguous(k.select(
                &self.view_as(x[0], &shape),
                &self.view_as(x[1], &shape),
                &self.view_as(x[2], &shape),
                &shape,
            )),
            Op::Reduce { op, axes, .. } => {
                contiguous(k.reduce(reduce_kind(*op), &x[0].view, &x[0].shape, axes))
            }
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => {
                let batch = &shape[..shape.len() - 2];
                contiguous(k.matmul(&self.matmul_of(
                    (x[0], x[1]),
                    (*transpose_a, *transpose_b),
                    batch,
                )))
            }
            Op::Transpose { perm } => Value {
                view: View {
                    strides: perm.iter().map(|&p| x[0].view.strides[p]).collect(),
                    ..x[0].view.clone()
                },
                shape,
            },
            Op::StopGradient => x[0].clone(),
            Op::Reshape { .. } => {
                let base = self.materialise(x[0]);
                Value {
                    view: View::contiguous(base.view.handle, &shape),
                    shape,
                }
            }
            Op::BroadcastTo { .. } => Value {
                view: self.view_as(x[0], &shape),
                shape,
            },
            Op::Slice { axis, start, .. } => {
                let mut view = x[0].view.clone();
                view.offset += start * view.strides[*axis];
                Value { view, shape }
            }
            Op::Concat { axis } => {
                let n: usize = shape.iter().product();
                let out = k.buffer(n);
                let strides = altc_kernels::contiguous_strides(&shape);
                let mut at = 0;
                for part in x {
                    k.copy_into(
                        &part.view,
                        &part.shape,
                        &out,
                        n,
                        at * strides[*axis],
                        &strides,
                    );
                    at += part.shape[*axis];
                }
                contiguous(out)
            }
            Op::Gather { axis } => contiguous(k.gather(&x[0].view, &x[1].view, *axis, &shape)),
            Op::ScatterAdd { axis, .. } => {
                contiguous(k.scatter_add(&x[0].view, &x[1].view, *axis, x[0].shape[*axis], &shape))
            }
            Op::TopK { k: kk } => {
                let input = self.materialise(x[0]);
                let n = *input.shape.last().expect("top-k operands have an axis");
                let rows = input.shape.iter().product::<usize>() / n.max(1);
                contiguous(k.top_k(&input.view.handle, rows, n, *kk))
            }
            Op::Dropout { rate, stream } => {
                let input = self.materialise(x[0]);
                let n = shape.iter().product();
                contiguous(k.dropout(&input.view.handle, n, rate.0, ctx.seed, ctx.step, *stream))
            }
            Op::ExpertOrder { experts } | Op::ExpertOffsets { experts } => {
                let index = self.materialise(x[0]);
                let n = index.shape.iter().product();
                contiguous(match node.op {
                    Op::ExpertOrder { .. } => k.expert_order(&index.view.handle, n, *experts),
                    _ => k.expert_offsets(&index.view.handle, n, *experts),
                })
            }
            Op::ExpertMatMul { transpose_w, bias } => {
                let rows = self.materialise(x[0]);
                let (order, offsets) = (x[x.len() - 2], x[x.len() - 1]);
                let (order, offsets) = (self.materialise(order), self.materialise(offsets));
                let count = |v: &Value| v.shape.iter().product::<usize>();
                let (row_count, width) = rows.rows_and_width();
                contiguous(k.expert_matmul(&ExpertMatmul {
                    x: &rows.view.handle,
                    rows: row_count,
                    k: width,
                    w: &x[1].view,
                    transpose_w: *transpose_w,
                    m: *shape.last().expect("rank checked by inference"),
                    bias: bias.then(|| &x[2].view),
                    order: &order.view.handle,
                    offsets: &offsets.view.handle,
                    assignments: count(&order),
                    experts: count(&offsets) - 1,
                    bf16_operands: self.bf16_matmuls,
                }))
            }
            Op::ExpertWeightGrad => {
                let (a, b) = (self.materialise(x[0]), self.materialise(x[1]));
                let (order, offsets) = (self.materialise(x[2]), self.materialise(x[3]));
                let ((a_rows, ka), (b_rows, mb)) = (a.rows_and_width(), b.rows_and_width());
                contiguous(k.expert_weight_grad(
                    (&a.view.handle, a_rows, ka),
                    (&b.view.handle, b_rows, mb),
                    &order.view.handle,
                    &offsets.view.handle,
                    order.shape.iter().product(),
                    shape[0],
                    self.bf16_matmuls,
                ))
            }
        }
    }
}

/// A planned matmul's operand values and transpose flags.
/// Renumbers `program`'s loads so that the inputs at positions `shared` (the same
/// for every tensor of a multi-tensor launch, bound once) come first; returns the
/// positions in their new order.
fn shared_inputs_first(program: &mut FusedProgram, shared: &[usize]) -> Vec<usize> {
    let order: Vec<usize> = shared
        .iter()
        .copied()
        .chain((0..program.inputs).filter(|p| !shared.contains(p)))
        .collect();
    for op in &mut program.ops {
        if let FusedOp::Load { input } = op {
            *input = order
                .iter()
                .position(|p| p == input)
                .expect("every input is placed");
        }
    }
    program.shared_inputs = shared.len();
    order
}

fn matmul_operands(
    graph: &Graph,
    matmul: NodeId,
    values: &[Option<Value>],
) -> (Value, Value, (bool, bool)) {
    let Op::MatMul {
        transpose_a,
        transpose_b,
    } = graph.node(matmul).op
    else {
        unreachable!("the planner folds only matmuls into matmul steps")
    };
    let operand = |i: usize| {
        values[graph.operands(matmul)[i].index()]
            .clone()
            .expect("operands come first")
    };
    (operand(0), operand(1), (transpose_a, transpose_b))
}

/// Checks, before anything launches, that every buffer the plan reads or writes can
/// be indexed in 32 bits as the kernels do; a product summed inside its matmul, or a
/// view, is no buffer and may be larger.
fn indexable(
    graph: &Graph,
    plan: &FusionPlan,
    symbols: &BTreeMap<String, usize>,
) -> Result<(), BackendError> {
    let leaves = graph.inputs().chain(graph.parameters()).map(|(_, id)| id);
    let written = plan
        .schedule
        .iter()
        .flat_map(|step| plan.step_outputs(graph, step));
    for id in leaves.chain(written) {
        let elements = concrete(&graph.node(id).ty.shape, symbols)
            .map_or(0, |dims| dims.iter().map(|&d| d as u64).product::<u64>());
        if elements > u64::from(u32::MAX) {
            return Err(BackendError::TooLarge {
                graph: graph.name.clone(),
                node: id.index(),
                origin: graph.node(id).origin.clone(),
                elements,
            });
        }
    }
    Ok(())
}

/// The concrete shape of node `id` once the inputs bound every symbol.
fn shape_of(graph: &Graph, id: NodeId, symbols: &BTreeMap<String, usize>) -> Vec<usize> {
    concrete(&graph.node(id).ty.shape, symbols).expect("inputs bind every symbol")
}

fn concrete(shape: &Shape, symbols: &BTreeMap<String, usize>) -> Option<Vec<usize>> {
    shape
        .dims()
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Some(*n),
            Dim::Sym(s) => symbols.get(s).copied(),
        })
        .collect()
}

impl<R: Runtime> DeviceBackend<R> {
    /// Runs `graph` over `leaves` (see `Backend::run`).
    fn execute(
        &mut self,
        graph: &Graph,
        leaves: Leaves,
        ctx: EvalContext,
    ) -> Result<BTreeMap<String, Tensor>, BackendError> {
        // A graph with a cycle cannot run (checked before anything is uploaded).
        graph
            .topo_order()
            .map_err(altc_compiler::reference::EvalError::from)?;
        let mut symbols = BTreeMap::new();
        for (name, id) in graph.inputs() {
            let shape = leaves
                .shape(name)
                .ok_or_else(|| BackendError::MissingInput {
                    graph: graph.name.clone(),
                    name: name.into(),
                })?;
            for (d, &n) in graph.node(id).ty.shape.dims().iter().zip(shape) {
                if let Dim::Sym(s) = d {
                    symbols.insert(s.clone(), n);
                }
            }
        }
        let limits = self.limits();
        let fuse = self.fuse;
        let plan = self
            .plans
            .entry((graph.fingerprint(), fuse))
            .or_insert_with(|| {
                std::sync::Arc::new(if fuse {
                    fusion::plan(graph, limits)
                } else {
                    FusionPlan::unfused(graph)
                })
            })
            .clone();
        indexable(graph, &plan, &symbols)?;
        // Release each value after the last step that reads it.
        let step_at = plan.positions(graph);
        let mut last_use = vec![0usize; graph.len()];
        let mut reads: Vec<Vec<NodeId>> = vec![Vec::new(); plan.schedule.len()];
        let scheduled = plan.schedule.iter().flat_map(|step| plan.step_nodes(step));
        for id in scheduled {
            for o in graph.operands(id) {
                let at = step_at[id.index()];
                last_use[o.index()] = last_use[o.index()].max(at);
                reads[at].push(o);
            }
        }
        let kept: Vec<bool> = (0..graph.len())
            .map(|i| graph.outputs().iter().any(|(_, o)| o.index() == i))
            .collect();
        self.launches = 0;
        self.kernels.take_extra_launches();
        if let Some(profile) = &mut self.profile {
            profile.clear();
        }
        let in_use = |k: &Kernels<R>| k.client().memory_usage().ok().map(|u| u.bytes_in_use);
        let memory_start = self
            .profile
            .is_some()
            .then(|| in_use(&self.kernels))
            .flatten();
        self.memory_peak = memory_start.map(|_| 0);
        let mut values: Vec<Option<Value>> = vec![None; graph.len()];
        for (pos, step) in plan.schedule.iter().enumerate() {
            let kernel = plan.kernel(graph, step);
            if let (Some(observe), Some(kernel)) = (&mut self.step_observer, &kernel) {
                observe(&graph.name, Some(kernel));
            }
            let started = std::time::Instant::now();
            match *step {
                Step::Group(g) => {
                    let group = &plan.groups[g];
                    let shape =
                        concrete(group.shape(graph), &symbols).expect("inputs bind every symbol");
                    self.launches += 1;
                    let outputs = self.eval_group(graph, group, &values, shape, ctx);
                    for (id, value) in group.outputs.iter().zip(outputs) {
                        values[id.index()] = Some(value);
                    }
                }
                Step::MatmulGroup { .. } | Step::MatmulSum { .. } => {
                    self.launches += 1;
                    for (id, value) in self.eval_matmul(graph, &plan, *step, &values, &symbols, ctx)
                    {
                        values[id.index()] = Some(value);
                    }
                }
                Step::MultiMatmul(i) => {
                    let batch = &plan.multi_matmuls[i];
                    for (id, value) in
                        self.eval_multi_matmul(graph, &plan, batch, &values, &symbols, ctx)
                    {
                        values[id.index()] = Some(value);
                    }
                }
                Step::MultiReduce(i) => {
                    let batch = &plan.multi_reduces[i];
                    let mut sources = Vec::new();
                    for segment in &batch.segments {
                        let value = values[segment.source.index()]
                            .as_ref()
                            .expect("operands come first");
                        // The kernel reads each source contiguously from its offset
                        // (another batch's slice is read in place); anything else is
                        // copied out first.
                        let value = if value.view.strides
                            == altc_kernels::contiguous_strides(&value.shape)
                        {
                            value.clone()
                        } else {
                            self.launches += 1;
                            self.materialise(value)
                        };
                        sources.push((value.view, value.shape));
                    }
                    let first = batch.segments[0].reduce;
                    let Op::Reduce { axes, .. } = &graph.node(first).op else {
                        unreachable!("multi-tensor steps hold reductions")
                    };
                    let prologue: Vec<UnaryKind> =
                        batch.prologue.iter().map(|&u| unary_kind(u)).collect();
                    self.launches += 1;
                    let axes = (!batch.whole).then_some(axes.as_slice());
                    let handle =
                        self.kernels
                            .multi_reduce(&prologue, &sources, axes, reduce_kind(batch.op));
                    // Each result is a contiguous slice of the batch's output.
                    let total = batch.segments.len();
                    for (at, segment) in batch.segments.iter().enumerate() {
                        let shape = shape_of(graph, segment.reduce, &symbols);
                        let per_segment: usize = shape.iter().product();
                        values[segment.reduce.index()] = Some(Value {
                            view: View {
                                handle: handle.clone(),
                                len: per_segment * total,
                                offset: at * per_segment,
                                strides: altc_kernels::contiguous_strides(&shape),
                            },
                            shape,
                        });
                    }
                }
                Step::ReduceGroup(i) => {
                    let fused = &plan.reduce_epilogues[i];
                    let group = &plan.groups[fused.group];
                    let shape =
                        concrete(group.shape(graph), &symbols).expect("inputs bind every symbol");
                    let Op::Reduce { op, .. } = &graph.node(fused.reduce).op else {
                        unreachable!("the planner gives epilogues only to reductions")
                    };
                    let x = values[graph.operands(fused.reduce)[0].index()]
                        .as_ref()
                        .expect("operands come first");
                    self.launches += 1;
                    let (program, views) =
                        self.group_program(graph, group, &values, &shape, Some(fused.read_as()));
                    let top_k = fused
                        .top_k
                        .as_ref()
                        .map_or(RowTopK::default(), |t| RowTopK {
                            output: group
                                .outputs
                                .iter()
                                .position(|&o| o == t.values)
                                .expect("the top-k reads a group output"),
                            k: *shape_of(graph, t.top, &symbols)
                                .last()
                                .expect("top-k keeps the rank"),
                        });
                    let mut outputs = self
                        .kernels
                        .reduce_epilogue(
                            reduce_kind(*op),
                            &x.view,
                            &program,
                            &views,
                            &shape,
                            fused.write_reduced,
                            top_k,
                            ctx.seed,
                            ctx.step,
                        )
                        .into_iter();
                    for (o, id) in group.outputs.iter().enumerate() {
                        let handle = outputs.next().expect("one buffer per output");
                        let shape = Self::output_shape(&program, o, &shape);
                        values[id.index()] = Some(Value::contiguous(handle, shape));
                    }
                    if fused.write_reduced {
                        let reduced = outputs.next().expect("the reduced values follow");
                        let shape = shape_of(graph, fused.reduce, &symbols);
                        values[fused.reduce.index()] = Some(Value::contiguous(reduced, shape));
                    }
                    if let Some(t) = &fused.top_k {
                        let chosen = shape_of(graph, t.top, &symbols);
                        let (indices, kept) = (outputs.next(), outputs.next());
                        let indices = indices.expect("the top-k indices follow the outputs");
                        values[t.top.index()] = Some(Value::contiguous(indices, chosen.clone()));
                        if let Some(gather) = t.gather {
                            let kept = kept.expect("the chosen values follow the indices");
                            values[gather.index()] = Some(Value::contiguous(kept, chosen));
                        }
                    }
                }
                Step::MultiGroup(i) => {
                    let batch = &plan.multi_groups[i];
                    for (id, value) in
                        self.eval_multi_group(graph, &plan, batch, &values, &symbols, ctx)
                    {
                        values[id.index()] = Some(value);
                    }
                }
                Step::GroupReduce { group, reduce } => {
                    let group = &plan.groups[group];
                    let shape =
                        concrete(group.shape(graph), &symbols).expect("inputs bind every symbol");
                    let Op::Reduce { op, axes, .. } = &graph.node(reduce).op else {
                        unreachable!("the planner folds prologues only into reductions")
                    };
                    let out_shape = shape_of(graph, reduce, &symbols);
                    self.launches += 1;
                    let (program, views) = self.group_program(graph, group, &values, &shape, None);
                    let handle = self.kernels.fused_reduce(
                        &program,
                        &views,
                        &shape,
                        reduce_kind(*op),
                        axes,
                        ctx.seed,
                        ctx.step,
                    );
                    values[reduce.index()] = Some(Value::contiguous(handle, out_shape));
                }
                Step::Node(id) => {
                    let node = graph.node(id);
                    let value = match (&node.op, leaves) {
                        (Op::Input { name, .. }, Leaves::Host(inputs)) => {
                            self.upload(&inputs[name])
                        }
                        (Op::Input { name, .. }, Leaves::Shapes(shapes)) => {
                            self.uninitialised(shapes[name].clone())
                        }
                        (Op::Parameter { name, .. }, _) if self.state.contains_key(name) => {
                            self.state[name].clone()
                        }
                        (Op::Parameter { .. }, Leaves::Shapes(_)) => self.uninitialised(
                            concrete(&node.ty.shape, &symbols).expect("inputs bind every symbol"),
                        ),
                        (Op::Parameter { name, .. }, Leaves::Host(_)) => {
                            return Err(BackendError::MissingState {
                                graph: graph.name.clone(),
                                name: name.clone(),
                            });
                        }
                        _ => {
                            let operands: Vec<&Value> = graph
                                .operands(id)
                                .iter()
                                .map(|o| values[o.index()].as_ref().expect("operands come first"))
                                .collect();
                            let shape = concrete(&node.ty.shape, &symbols)
                                .expect("inputs bind every symbol");
                            if node.op.launches_kernel() {
                                self.launches += 1;
                            }
                            self.eval(graph, id, &operands, shape, ctx)
                        }
                    };
                    values[id.index()] = Some(value);
                }
            }
            if self.step_observer.is_some() {
                self.kernels.sync();
            }
            if let (Some(profile), Some(kernel)) = (&mut self.profile, kernel) {
                self.kernels.sync();
                profile.push(KernelTiming {
                    family: kernel.family,
                    label: kernel.label,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            // After the step's kernel and before its frees, as the plan counts.
            if let (Some(start), Some(peak)) = (memory_start, &mut self.memory_peak) {
                if let Some(now) = in_use(&self.kernels) {
                    *peak = (*peak).max(now.saturating_sub(start));
                }
            }
            for &o in &reads[pos] {
                if last_use[o.index()] == pos && !kept[o.index()] {
                    values[o.index()] = None;
                }
            }
        }
        // Candidates that split a step into several kernels say how many more.
        self.launches += self.kernels.take_extra_launches();
        if let Some(observe) = &mut self.step_observer {
            observe(&graph.name, None);
        }
        let mut host = BTreeMap::new();
        let mut updates = Vec::new();
        for (name, id) in graph.outputs() {
            let value = values[id.index()].clone().expect("outputs are kept");
            match name.strip_prefix("new.") {
                Some(target) => updates.push((target.to_string(), self.materialise(&value))),
                None if name.starts_with("grad.") => {}
                None => {
                    host.insert(
                        name.clone(),
                        self.download(&value, graph.node(*id).ty.dtype),
                    );
                }
            }
        }
        self.staged = updates;
        Ok(host)
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

    fn load_state(&mut self, state: &TensorMap) {
        self.state = state
            .iter()
            .map(|(n, t)| (n.clone(), self.upload(t)))
            .collect();
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

fn cast_kind(dtype: DType) -> UnaryKind {
    match dtype {
        DType::I32 => UnaryKind::Trunc,
        DType::Bool => UnaryKind::NonZero,
        DType::F32 | DType::F64 => UnaryKind::Identity,
    }
}

fn unary_kind(u: UnaryOp) -> UnaryKind {
    match u {
        UnaryOp::Neg => UnaryKind::Neg,
        UnaryOp::Abs => UnaryKind::Abs,
        UnaryOp::Exp => UnaryKind::Exp,
        UnaryOp::Log => UnaryKind::Log,
        UnaryOp::Sqrt => UnaryKind::Sqrt,
        UnaryOp::Rsqrt => UnaryKind::Rsqrt,
        UnaryOp::Recip => UnaryKind::Recip,
        UnaryOp::Square => UnaryKind::Square,
        UnaryOp::Tanh => UnaryKind::Tanh,
        UnaryOp::Sigmoid => UnaryKind::Sigmoid,
        UnaryOp::Relu => UnaryKind::Relu,
        UnaryOp::Erf => UnaryKind::Erf,
        UnaryOp::Gelu => UnaryKind::Gelu,
        UnaryOp::Silu => UnaryKind::Silu,
    }
}

fn binary_kind(b: BinaryOp) -> BinaryKind {
    match b {
        BinaryOp::Add => BinaryKind::Add,
        BinaryOp::Sub => BinaryKind::Sub,
        BinaryOp::Mul => BinaryKind::Mul,
        BinaryOp::Div => BinaryKind::Div,
        BinaryOp::Max => BinaryKind::Max,
        BinaryOp::Min => BinaryKind::Min,
        BinaryOp::Pow => BinaryKind::Pow,
    }
}

fn compare_kind(c: CompareOp) -> BinaryKind {
    match c {
        CompareOp::Lt => BinaryKind::Lt,
        CompareOp::Le => BinaryKind::Le,
        CompareOp::Gt => BinaryKind::Gt,
        CompareOp::Ge => BinaryKind::Ge,
        CompareOp::Eq => BinaryKind::Eq,
        CompareOp::Ne => BinaryKind::Ne,
    }
}

fn reduce_kind(r: ReduceOp) -> ReduceKind {
    match r {
        ReduceOp::Sum => ReduceKind::Sum,
        ReduceOp::Mean => ReduceKind::Mean,
        ReduceOp::Max => ReduceKind::Max,
        ReduceOp::Min => ReduceKind::Min,
    }
}

/// What one client reports: plane sizes, shared memory, element types.
fn client_report<R: Runtime>(client: &ComputeClient<R>) -> String {
    let props = client.properties();
    let hw = &props.hardware;
    let dtypes: Vec<&str> = [
        ("f32", f32::as_type_native_unchecked()),
        ("f16", half::f16::as_type_native_unchecked()),
        ("bf16", half::bf16::as_type_native_unchecked()),
        ("f64", f64::as_type_native_unchecked()),
    ]
    .into_iter()
    .filter(|(_, t)| props.supports_type(*t))
    .map(|(name, _)| name)
    .collect();
    format!(
        "  plane size {}..{}, shared memory {} KiB per cube, up to {} units per cube, {} buffers per kernel\n  element types: {}\n",
        hw.plane_size_min,
        hw.plane_size_max,
        hw.max_shared_memory_size / 1024,
        hw.max_units_per_cube,
        hw.max_bindings,
        dtypes.join(", ")
    )
}

/// A report of every cubecl device altc can see, and why the others are missing.
pub fn describe_devices() -> String {
    let mut out = String::new();
    match std::fs::read_to_string("/proc/driver/nvidia/version") {
        Ok(version) => {
            out.push_str(&format!(
                "cuda: NVIDIA driver: {}\n",
                version.lines().next().unwrap_or("").trim()
            ));
            use cubecl::cuda::{CudaDevice, CudaRuntime};
            match probe("CUDA", || CudaRuntime::client(&CudaDevice::default())) {
                Ok(client) => {
                    out.push_str("  client: ok (NVRTC compiles kernels at first use)\n");
                    out.push_str(&client_report(&client));
                }
                Err(e) => out.push_str(&format!("  {e}\n")),
            }
        }
        Err(_) => out.push_str(
            "cuda: not available (no NVIDIA driver: /proc/driver/nvidia/version is missing)\n",
        ),
    }
    use cubecl::wgpu::{init_setup, AutoGraphicsApi, RuntimeOptions, WgpuDevice, WgpuRuntime};
    match probe("wgpu", || {
        init_setup::<AutoGraphicsApi>(&WgpuDevice::default(), RuntimeOptions::default())
    }) {
        Ok(setup) => {
            let info = setup.adapter.get_info();
            out.push_str(&format!(
                "wgpu: {} ({:?}, {:?}), driver {} {}\n",
                info.name, info.backend, info.device_type, info.driver, info.driver_info
            ));
            let client = WgpuRuntime::client(&WgpuDevice::default());
            out.push_str(&client_report(&client));
        }
        Err(e) => out.push_str(&format!(
            "wgpu: {e}; on Debian install mesa-vulkan-drivers and libvulkan1 (scripts/setup.sh)\n"
        )),
    }
    out
}
