//! Host side: launching each kernel family on a cubecl client, with the metadata
//! layouts the kernels expect.

use crate::elementwise::{
    binary_kernel, copy_kernel, fill_kernel, iota_kernel, select_kernel, unary_kernel,
};
use crate::fused::{
    fused_kernel, fused_reduce_kernel, multi_fused_kernel, reduce_epilogue_kernel, FusedOp,
    FusedProgram, RowTopK,
};
use crate::index::{gather_kernel, scatter_add_kernel, top_k_kernel};
use crate::matmul::{matmul_kernel, OperandLayout, TILE};
use crate::random::dropout_kernel;
use crate::reduce::{multi_reduce_kernel, reduce_kernel};
use crate::tune::{
    bucket, Candidate, KernelKey, TunableLaunch, TunedKernel, Tuning, TuningMode, ELEMENTWISE,
    ELEMENTWISE_TUNER, MATMUL, MATMUL_TUNER, MULTI_ELEMENTWISE, MULTI_ELEMENTWISE_TUNER, REDUCE,
    REDUCE_TUNER,
};
use crate::vector::{vector_fused_kernel, VectorProgram};
use crate::{BinaryKind, ReduceKind, UnaryKind};
use cubecl::prelude::*;
use cubecl::server::Handle;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Units per cube for one-dimensional launches.
const CUBE_SIZE: u32 = 256;
/// The largest cube count along one grid dimension every backend accepts.
const MAX_GRID: u32 = 65_535;

/// A strided view of a device buffer: element `c` of the logical tensor is at
/// `offset + sum(c[i] * strides[i])`. A broadcast dimension has stride 0.
#[derive(Clone, Debug)]
pub struct View {
    pub handle: Handle,
    /// Elements in the buffer.
    pub len: usize,
    pub offset: usize,
    pub strides: Vec<usize>,
}

impl View {
    /// A contiguous row-major view of `shape`.
    pub fn contiguous(handle: Handle, shape: &[usize]) -> View {
        View {
            handle,
            len: shape.iter().product(),
            offset: 0,
            strides: contiguous_strides(shape),
        }
    }
}

pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The operands of a batched matmul `[..., M, K] x [..., K, N]`: batch dimensions
/// broadcast to `out_batch`; a transposed operand swaps its last two dimensions. With
/// `bf16_operands` the operands are rounded to bf16 as they are loaded and products
/// accumulate in f32 (autocast semantics).
pub struct MatmulOperands<'a> {
    pub a: &'a View,
    pub a_shape: &'a [usize],
    pub transpose_a: bool,
    pub b: &'a View,
    pub b_shape: &'a [usize],
    pub transpose_b: bool,
    pub out_batch: &'a [usize],
    pub bf16_operands: bool,
}

/// A configuration of the matmul kernel: the tuning candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulStrategy {
    /// `TILE x TILE` cubes staging operand tiles in shared memory.
    Tiled,
    /// Tiled, with each tile's global reads issued while the previous tile is
    /// multiplied (two stages; for grouped expert matmuls, the rows' reads).
    Pipelined,
    /// No shared memory or barriers: each unit reads its row and column directly;
    /// cubes of `edge x edge` units.
    Direct { edge: u32 },
    /// Direct reads, each unit computing `block x block` outputs (register blocking:
    /// `2 * block` loads feed `block * block` multiply-adds). Dense matmuls space
    /// rows and columns `edge` apart; grouped expert matmuls take `block` consecutive
    /// sorted assignments, which mostly share an expert.
    Blocked { edge: u32, block: u32 },
}

impl Candidate for MatmulStrategy {
    const ALL: &'static [MatmulStrategy] = &[
        MatmulStrategy::Tiled,
        MatmulStrategy::Pipelined,
        MatmulStrategy::Direct { edge: 16 },
        MatmulStrategy::Direct { edge: 8 },
        MatmulStrategy::Blocked { edge: 8, block: 2 },
        MatmulStrategy::Blocked { edge: 8, block: 4 },
    ];

    fn name(&self) -> String {
        match self {
            MatmulStrategy::Tiled => format!("tiled-{TILE}x{TILE}"),
            MatmulStrategy::Pipelined => format!("tiled-{TILE}x{TILE}-2stage"),
            MatmulStrategy::Direct { edge } => format!("direct-{edge}x{edge}"),
            MatmulStrategy::Blocked { edge, block } => {
                format!("direct-{edge}x{edge}-block-{block}x{block}")
            }
        }
    }
}

impl MatmulStrategy {
    /// Units along each side of a cube.
    pub(crate) fn edge(&self) -> u32 {
        match self {
            MatmulStrategy::Tiled | MatmulStrategy::Pipelined => TILE,
            MatmulStrategy::Direct { edge } | MatmulStrategy::Blocked { edge, .. } => *edge,
        }
    }

    /// Outputs each unit computes along a side.
    pub(crate) fn block(&self) -> u32 {
        match self {
            MatmulStrategy::Blocked { block, .. } => *block,
            _ => 1,
        }
    }
}

/// A dense matmul candidate: the kernel's form, and whether an epilogue runs inside
/// it (`fused`) or as a fused elementwise kernel of its own over the written product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpilogueMatmul {
    pub form: MatmulStrategy,
    pub fused: bool,
}

impl Candidate for EpilogueMatmul {
    const ALL: &'static [EpilogueMatmul] = &[
        EpilogueMatmul {
            form: MatmulStrategy::Tiled,
            fused: true,
        },
        EpilogueMatmul {
            form: MatmulStrategy::Pipelined,
            fused: true,
        },
        EpilogueMatmul {
            form: MatmulStrategy::Direct { edge: 16 },
            fused: true,
        },
        EpilogueMatmul {
            form: MatmulStrategy::Direct { edge: 8 },
            fused: true,
        },
        EpilogueMatmul {
            form: MatmulStrategy::Blocked { edge: 8, block: 2 },
            fused: true,
        },
        EpilogueMatmul {
            form: MatmulStrategy::Blocked { edge: 8, block: 4 },
            fused: true,
        },
        EpilogueMatmul {
            form: MatmulStrategy::Tiled,
            fused: false,
        },
        EpilogueMatmul {
            form: MatmulStrategy::Direct { edge: 8 },
            fused: false,
        },
    ];

    fn name(&self) -> String {
        if self.fused {
            self.form.name()
        } else {
            format!("{}+epilogue-kernel", self.form.name())
        }
    }
}

/// Everything one matmul launch needs, owned, so the tuner can replay it with each
/// candidate. Buffers are `(handle, elements)`.
#[derive(Clone)]
struct MatmulLaunch<R: Runtime> {
    client: ComputeClient<R>,
    /// The operand buffers, bound as `layout` says.
    operands: Vec<(Handle, usize)>,
    layout: OperandLayout,
    /// The epilogue's inputs as the kernel binds them (shared ones once).
    inputs: Vec<(Handle, usize)>,
    /// Each member's epilogue inputs in full, for the candidate that runs the
    /// epilogue as kernels of their own.
    member_inputs: Vec<Vec<(Handle, usize)>>,
    meta: (Handle, usize),
    epilogue_meta: (Handle, usize),
    /// Each member's epilogue metadata as a kernel of its own, reading the product as
    /// its last input.
    apart_meta: Vec<(Handle, usize)>,
    /// `(M, N, output batch entries)` of each member.
    extent: (usize, usize, usize),
    /// The epilogue's dropout seed (low, high) and step.
    seed: (u32, u32, u32),
    batch_rank: usize,
    sum_batch: bool,
    bf16_operands: bool,
    epilogue: FusedProgram,
    key: KernelKey,
    ran: Arc<Mutex<Option<EpilogueMatmul>>>,
    /// `Kernels::extra_launches`.
    extra_launches: Arc<AtomicUsize>,
}

impl<R: Runtime> TunableLaunch for MatmulLaunch<R> {
    type With = EpilogueMatmul;

    fn key(&self) -> &KernelKey {
        &self.key
    }

    fn ran(&self) -> &Arc<Mutex<Option<EpilogueMatmul>>> {
        &self.ran
    }

    fn launch(&self, with: EpilogueMatmul) -> Vec<Handle> {
        if with.fused || self.epilogue.ops.is_empty() {
            return self.launch_kernel(with.form, &self.epilogue, &self.inputs);
        }
        // The products first, then each member's epilogue reading its product as one
        // more input.
        let products = self.launch_kernel(with.form, &FusedProgram::product(), &[]);
        // One epilogue kernel per member after the product's.
        self.extra_launches
            .fetch_add(self.layout.members, Ordering::Relaxed);
        let mut program = FusedProgram {
            shared_inputs: 0,
            ..self.epilogue.clone()
        };
        for op in &mut program.ops {
            if *op == FusedOp::Accumulator {
                *op = FusedOp::Load {
                    input: program.inputs,
                };
            }
        }
        program.inputs += 1;
        let n = self.len();
        let (count, dim) = grid(n);
        let mut outputs = Vec::new();
        for ((product, inputs), meta) in products
            .into_iter()
            .zip(&self.member_inputs)
            .zip(&self.apart_meta)
        {
            let inputs: Vec<(Handle, usize)> =
                inputs.iter().cloned().chain([(product, n)]).collect();
            let written: Vec<Handle> = program
                .outputs
                .iter()
                .map(|_| self.client.empty(n * 4))
                .collect();
            unsafe {
                fused_kernel::launch_unchecked::<f32, R>(
                    &self.client,
                    count.clone(),
                    dim,
                    buffer_sequence(inputs),
                    buffer_sequence(written.iter().map(|o| (o.clone(), n))),
                    buffer_arg(meta),
                    self.seed.0,
                    self.seed.1,
                    self.seed.2,
                    program.clone(),
                    1,
                )
            };
            outputs.extend(written);
        }
        outputs
    }
}

impl<R: Runtime> MatmulLaunch<R> {
    /// Elements of each member's result.
    fn len(&self) -> usize {
        let (m, n, batches) = self.extent;
        (batches * m * n).max(1)
    }

    /// The matmul kernel in `form`, running `epilogue` (with `inputs`) in registers;
    /// returns each member's outputs in turn.
    fn launch_kernel(
        &self,
        form: MatmulStrategy,
        epilogue: &FusedProgram,
        inputs: &[(Handle, usize)],
    ) -> Vec<Handle> {
        let (m, n, batches) = self.extent;
        let len = self.len();
        let outputs: Vec<Handle> = (0..self.layout.members * epilogue.outputs.len().max(1))
            .map(|_| self.client.empty(len * 4))
            .collect();
        if batches == 0 || m == 0 || n == 0 {
            // An empty product: nothing to compute.
            return outputs;
        }
        let edge = form.edge();
        let span = edge * form.block();
        let count = CubeCount::Static(
            tiles_of(n, span),
            tiles_of(m, span),
            u32s([batches * self.layout.members])[0],
        );
        unsafe {
            matmul_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                CubeDim::new_2d(edge, edge),
                buffer_sequence(self.operands.iter().cloned()),
                buffer_sequence(inputs.iter().cloned()),
                buffer_sequence(outputs.iter().map(|o| (o.clone(), len))),
                buffer_arg(&self.meta),
                buffer_arg(&self.epilogue_meta),
                self.seed.0,
                self.seed.1,
                self.seed.2,
                self.layout,
                self.batch_rank,
                self.sum_batch,
                matches!(
                    form,
                    MatmulStrategy::Direct { .. } | MatmulStrategy::Blocked { .. }
                ),
                form == MatmulStrategy::Pipelined,
                form.block(),
                self.bf16_operands,
                epilogue.clone(),
            )
        };
        outputs
    }
}

/// How a fused elementwise kernel spreads its elements: units per cube, elements per
/// unit, and the vector width of each access (the tuning candidates). A vectorised
/// candidate runs as its scalar form where the inputs' layouts do not allow vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElementwiseStrategy {
    pub cube: u32,
    pub per_unit: u32,
    pub vector: u32,
}

impl Candidate for ElementwiseStrategy {
    const ALL: &'static [ElementwiseStrategy] = &[
        ElementwiseStrategy {
            cube: CUBE_SIZE,
            per_unit: 1,
            vector: 1,
        },
        ElementwiseStrategy {
            cube: 64,
            per_unit: 1,
            vector: 1,
        },
        ElementwiseStrategy {
            cube: CUBE_SIZE,
            per_unit: 4,
            vector: 1,
        },
        ElementwiseStrategy {
            cube: CUBE_SIZE,
            per_unit: 1,
            vector: VECTOR_WIDTH as u32,
        },
    ];

    fn name(&self) -> String {
        if self.vector > 1 {
            format!("cube-{}-vector-{}", self.cube, self.vector)
        } else {
            format!("cube-{}x{}-per-unit", self.cube, self.per_unit)
        }
    }
}

/// Elements per access of the vectorised elementwise candidate: four f32 make one
/// 128-bit load or store.
const VECTOR_WIDTH: usize = 4;

/// A fused program's launch in vectors of `VECTOR_WIDTH` elements, prepared when
/// every input is contiguous from a vector boundary or one value.
#[derive(Clone)]
struct VectorLaunch {
    program: VectorProgram,
    vectors: Vec<(Handle, usize)>,
    scalars: Vec<(Handle, usize)>,
    meta: (Handle, usize),
    /// Each tensor's element count.
    lens: Vec<usize>,
}

impl VectorLaunch {
    /// Runs the program with cubes of `cube` units; returns each tensor's outputs in
    /// turn.
    fn launch<R: Runtime>(&self, client: &ComputeClient<R>, cube: u32) -> Vec<Handle> {
        let n_outputs = self.program.program.outputs.len();
        let outputs = empty_buffers(
            client,
            self.lens
                .iter()
                .flat_map(|&len| std::iter::repeat_n(len, n_outputs)),
        );
        let total: usize = self.lens.iter().sum::<usize>() / VECTOR_WIDTH;
        let (count, dim) = grid_of(total, cube);
        unsafe {
            vector_fused_kernel::launch_unchecked::<f32, R>(
                client,
                count,
                dim,
                VECTOR_WIDTH,
                buffer_sequence(self.vectors.iter().cloned()),
                buffer_sequence(self.scalars.iter().cloned()),
                buffer_sequence(outputs.iter().cloned()),
                buffer_arg(&self.meta),
                self.program.clone(),
                self.lens.len(),
            )
        };
        outputs.into_iter().map(|(h, _)| h).collect()
    }
}

/// What an elementwise kernel's tuning key says of its vectorised candidate: where
/// vectors are impossible the candidate runs the scalar form, so a choice tuned
/// there must not decide for launches that can use vectors.
fn vector_tag(vectorised: &Option<VectorLaunch>) -> &'static str {
    if vectorised.is_some() {
        " vectorisable"
    } else {
        ""
    }
}

impl<R: Runtime> Kernels<R> {
    /// `program` in vectors over tensors of `shapes`, each reading its inputs through
    /// `views` (in program order, shared ones included); `None` where the program or
    /// a layout does not allow it.
    fn vector_launch(
        &self,
        program: &FusedProgram,
        tensors: &[(&[usize], Vec<&View>)],
    ) -> Option<VectorLaunch> {
        const W: usize = VECTOR_WIDTH;
        if !VectorProgram::runs(program) {
            return None;
        }
        // Each input of each tensor: `Some(true)` one value, `Some(false)` whole
        // vectors, `None` neither.
        let layout = |shape: &[usize], v: &View| -> Option<(bool, usize)> {
            let contiguous = contiguous_strides(shape);
            let spread = shape.iter().enumerate().filter(|&(_, &n)| n > 1);
            if spread.clone().all(|(d, _)| v.strides[d] == 0) {
                Some((true, v.offset))
            } else if spread.clone().all(|(d, _)| v.strides[d] == contiguous[d])
                && v.offset.is_multiple_of(W)
            {
                Some((false, v.offset / W))
            } else {
                None
            }
        };
        let mut scalar: Option<Vec<bool>> = None;
        let (mut vectors, mut scalars, mut meta, mut lens) = (vec![], vec![], vec![], vec![]);
        for (t, (shape, views)) in tensors.iter().enumerate() {
            let len: usize = shape.iter().product();
            if len == 0 || !len.is_multiple_of(W) {
                return None;
            }
            lens.push(len);
            let layouts: Vec<(bool, usize)> = views
                .iter()
                .map(|v| layout(shape, v))
                .collect::<Option<_>>()?;
            let flags: Vec<bool> = layouts.iter().map(|&(one, _)| one).collect();
            if *scalar.get_or_insert_with(|| flags.clone()) != flags {
                return None;
            }
            meta.extend(u32s(layouts.iter().map(|&(_, offset)| offset)));
            for (i, (view, &one)) in views.iter().zip(&flags).enumerate() {
                // Shared inputs are bound once, with the first tensor's.
                if i >= program.shared_inputs || t == 0 {
                    let buffer = (view.handle.clone(), view.len.max(1));
                    if one {
                        scalars.push(buffer)
                    } else {
                        vectors.push(buffer)
                    }
                }
            }
        }
        let mut start = 0;
        for &len in &lens {
            meta.extend(u32s([start]));
            start += len / W;
        }
        meta.extend(u32s([start]));
        let meta_len = meta.len();
        Some(VectorLaunch {
            program: VectorProgram {
                program: program.clone(),
                scalar: scalar?,
            },
            vectors,
            scalars,
            meta: (self.upload_once(meta), meta_len),
            lens,
        })
    }
}

#[derive(Clone)]
struct FusedLaunch<R: Runtime> {
    client: ComputeClient<R>,
    inputs: Vec<(Handle, usize)>,
    vectorised: Option<VectorLaunch>,
    meta: (Handle, usize),
    /// Elements (of the program's shape), and the extent of its last axis.
    n: usize,
    row_len: usize,
    seed: (u32, u32, u32),
    program: FusedProgram,
    key: KernelKey,
    ran: Arc<Mutex<Option<ElementwiseStrategy>>>,
}

impl<R: Runtime> TunableLaunch for FusedLaunch<R> {
    type With = ElementwiseStrategy;

    fn key(&self) -> &KernelKey {
        &self.key
    }

    fn ran(&self) -> &Arc<Mutex<Option<ElementwiseStrategy>>> {
        &self.ran
    }

    fn launch(&self, with: ElementwiseStrategy) -> Vec<Handle> {
        if let (true, Some(vectorised)) = (with.vector > 1, &self.vectorised) {
            return vectorised.launch(&self.client, with.cube);
        }
        let n = self.n;
        let rows = n / self.row_len.max(1);
        let outputs = empty_buffers(
            &self.client,
            (0..self.program.outputs.len()).map(|o| self.program.output_len(o, n, rows)),
        );
        let units = n.div_ceil(with.per_unit as usize);
        let (count, dim) = grid_of(units, with.cube);
        unsafe {
            fused_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                buffer_sequence(self.inputs.iter().cloned()),
                buffer_sequence(outputs.iter().cloned()),
                buffer_arg(&self.meta),
                self.seed.0,
                self.seed.1,
                self.seed.2,
                self.program.clone(),
                with.per_unit,
            )
        };
        outputs.into_iter().map(|(h, _)| h).collect()
    }
}

/// One tensor of a multi-tensor elementwise launch: its element count and the views
/// of its own (unshared) inputs, each flat: stride 1 (contiguous from its offset) or
/// 0 (one value).
#[derive(Clone, Debug)]
pub struct Segment {
    pub len: usize,
    pub inputs: Vec<View>,
}

#[derive(Clone)]
struct MultiFusedLaunch<R: Runtime> {
    client: ComputeClient<R>,
    inputs: Vec<(Handle, usize)>,
    vectorised: Option<VectorLaunch>,
    meta: (Handle, usize),
    /// Each segment's element count.
    lens: Vec<usize>,
    program: FusedProgram,
    key: KernelKey,
    ran: Arc<Mutex<Option<ElementwiseStrategy>>>,
}

impl<R: Runtime> TunableLaunch for MultiFusedLaunch<R> {
    type With = ElementwiseStrategy;

    fn key(&self) -> &KernelKey {
        &self.key
    }

    fn ran(&self) -> &Arc<Mutex<Option<ElementwiseStrategy>>> {
        &self.ran
    }

    fn launch(&self, with: ElementwiseStrategy) -> Vec<Handle> {
        if let (true, Some(vectorised)) = (with.vector > 1, &self.vectorised) {
            return vectorised.launch(&self.client, with.cube);
        }
        let program = &self.program;
        // Flat segments: every element is a row of its own.
        let outputs = empty_buffers(
            &self.client,
            self.lens.iter().flat_map(|&len| {
                (0..program.outputs.len()).map(move |o| program.output_len(o, len, len))
            }),
        );
        let total: usize = self.lens.iter().sum();
        let (count, dim) = grid_of(total.div_ceil(with.per_unit as usize), with.cube);
        unsafe {
            multi_fused_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                buffer_sequence(self.inputs.iter().cloned()),
                buffer_sequence(outputs.iter().cloned()),
                buffer_arg(&self.meta),
                program.clone(),
                self.lens.len(),
                with.per_unit,
            )
        };
        outputs.into_iter().map(|(h, _)| h).collect()
    }
}

/// How a reduction spreads its work: a unit per output element walking its elements,
/// or a cube of `lanes` units per output element (the tuning candidates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceStrategy {
    UnitPerOutput,
    CubePerOutput { lanes: u32 },
}

impl Candidate for ReduceStrategy {
    const ALL: &'static [ReduceStrategy] = &[
        ReduceStrategy::UnitPerOutput,
        ReduceStrategy::CubePerOutput { lanes: 64 },
        ReduceStrategy::CubePerOutput { lanes: 256 },
    ];

    fn name(&self) -> String {
        match self {
            ReduceStrategy::UnitPerOutput => "unit-per-output".into(),
            ReduceStrategy::CubePerOutput { lanes } => format!("cube-{lanes}-per-output"),
        }
    }
}

/// What a reduction reads: a strided buffer, or a fused elementwise prologue; or a
/// strided buffer reduced along its rows, each row then fed to a fused epilogue over
/// the buffer's `elements`, whose outputs the launch returns instead.
#[derive(Clone)]
enum ReduceSource {
    View((Handle, usize)),
    Prologue {
        inputs: Vec<(Handle, usize)>,
        program: FusedProgram,
        seed: (u32, u32, u32),
    },
    Epilogue {
        x: (Handle, usize),
        inputs: Vec<(Handle, usize)>,
        program: FusedProgram,
        seed: (u32, u32, u32),
        elements: usize,
        write_reduced: bool,
        top_k: RowTopK,
    },
}

#[derive(Clone)]
struct ReduceLaunch<R: Runtime> {
    client: ComputeClient<R>,
    source: ReduceSource,
    meta: (Handle, usize),
    /// Output elements.
    n: usize,
    kept: usize,
    reduced: usize,
    op: ReduceKind,
    key: KernelKey,
    ran: Arc<Mutex<Option<ReduceStrategy>>>,
}

impl<R: Runtime> TunableLaunch for ReduceLaunch<R> {
    type With = ReduceStrategy;

    fn key(&self) -> &KernelKey {
        &self.key
    }

    fn ran(&self) -> &Arc<Mutex<Option<ReduceStrategy>>> {
        &self.ran
    }

    fn launch(&self, with: ReduceStrategy) -> Vec<Handle> {
        let n = self.n.max(1);
        // A top-k taken in an epilogue walks each row in one unit.
        let with = match &self.source {
            ReduceSource::Epilogue { top_k, .. } if top_k.k > 0 => ReduceStrategy::UnitPerOutput,
            _ => with,
        };
        let (count, dim, lanes) = match with {
            ReduceStrategy::UnitPerOutput => {
                let (count, dim) = grid_of(n, CUBE_SIZE);
                (count, dim, 1)
            }
            ReduceStrategy::CubePerOutput { lanes } => {
                let cubes = u32s([n])[0];
                let x = cubes.min(MAX_GRID);
                (
                    CubeCount::Static(x, cubes.div_ceil(x), 1),
                    CubeDim::new_1d(lanes),
                    lanes,
                )
            }
        };
        let meta = buffer_arg(&self.meta);
        let single = |client: &ComputeClient<R>| {
            let out = client.empty(n * 4);
            (out.clone(), unsafe { ArrayArg::from_raw_parts(out, n) })
        };
        match &self.source {
            ReduceSource::View((x, len)) => {
                let (out, output) = single(&self.client);
                unsafe {
                    reduce_kernel::launch_unchecked::<f32, R>(
                        &self.client,
                        count,
                        dim,
                        buffer_arg(&(x.clone(), *len)),
                        output,
                        meta,
                        self.kept,
                        self.reduced,
                        self.op,
                        lanes,
                    )
                };
                vec![out]
            }
            ReduceSource::Prologue {
                inputs,
                program,
                seed,
            } => {
                let (out, output) = single(&self.client);
                unsafe {
                    fused_reduce_kernel::launch_unchecked::<f32, R>(
                        &self.client,
                        count,
                        dim,
                        buffer_sequence(inputs.iter().cloned()),
                        output,
                        meta,
                        seed.0,
                        seed.1,
                        seed.2,
                        program.clone(),
                        self.kept,
                        self.reduced,
                        self.op,
                        lanes,
                    )
                };
                vec![out]
            }
            ReduceSource::Epilogue {
                x,
                inputs,
                program,
                seed,
                elements,
                write_reduced,
                top_k,
            } => {
                let mut sizes: Vec<usize> = (0..program.outputs.len())
                    .map(|o| program.output_len(o, *elements, n))
                    .collect();
                if *write_reduced {
                    sizes.push(n);
                }
                if top_k.k > 0 {
                    sizes.extend([n * top_k.k, n * top_k.k]);
                }
                let outputs = empty_buffers(&self.client, sizes);
                unsafe {
                    reduce_epilogue_kernel::launch_unchecked::<f32, R>(
                        &self.client,
                        count,
                        dim,
                        buffer_arg(x),
                        buffer_sequence(inputs.iter().cloned()),
                        buffer_sequence(outputs.iter().cloned()),
                        meta,
                        seed.0,
                        seed.1,
                        seed.2,
                        program.clone(),
                        self.kept,
                        self.op,
                        lanes,
                        *write_reduced,
                        *top_k,
                    )
                };
                outputs.into_iter().map(|(h, _)| h).collect()
            }
        }
    }
}

/// Every kernel launch altc needs, on one client. Buffers hold f32.
pub struct Kernels<R: Runtime> {
    client: ComputeClient<R>,
    /// Immutable buffers by content: a training step launches the same kernels on the
    /// same shapes with the same constants every step, so each is uploaded once.
    uploads: std::sync::Mutex<std::collections::HashMap<Vec<u32>, Handle>>,
    tuning: Tuning,
    /// Kernels launched beyond one per call (a candidate that runs a matmul's
    /// epilogue as kernels of their own), until taken.
    extra_launches: Arc<AtomicUsize>,
}

pub(crate) fn u32s(values: impl IntoIterator<Item = usize>) -> Vec<u32> {
    values
        .into_iter()
        .map(|v| u32::try_from(v).expect("tensor extents and strides fit in 32 bits"))
        .collect()
}

/// The program part of a fused kernel's metadata: the program's shape, then each
/// input's strides, then each input's offset.
fn program_meta(shape: &[usize], inputs: &[View]) -> Vec<u32> {
    program_meta_of(
        shape,
        inputs.iter().map(|v| (v.strides.as_slice(), v.offset)),
    )
}

/// `program_meta` from each input's (strides, offset).
fn program_meta_of<'a>(
    shape: &[usize],
    layouts: impl Iterator<Item = (&'a [usize], usize)> + Clone,
) -> Vec<u32> {
    let mut meta = u32s(shape.iter().copied());
    for (strides, _) in layouts.clone() {
        meta.extend(u32s(strides.iter().copied()));
    }
    meta.extend(u32s(layouts.map(|(_, offset)| offset)));
    meta
}

/// New device buffers of `sizes` f32 elements each, as (handle, elements).
fn empty_buffers<R: Runtime>(
    client: &ComputeClient<R>,
    sizes: impl IntoIterator<Item = usize>,
) -> Vec<(Handle, usize)> {
    sizes
        .into_iter()
        .map(|len| (client.empty(len * 4), len))
        .collect()
}

/// Buffers as a kernel's sequence of arrays of any element type: (handle, scalar
/// elements).
fn buffer_sequence<R: Runtime, T: LaunchArg<RuntimeArg<R> = ArrayArg<R>>>(
    buffers: impl IntoIterator<Item = (Handle, usize)>,
) -> SequenceArg<R, T> {
    let mut sequence = SequenceArg::new();
    for (handle, len) in buffers {
        sequence.push(unsafe { ArrayArg::from_raw_parts(handle, len.max(1)) });
    }
    sequence
}

/// One matmul's part of `matmul_kernel`'s metadata, with its `M`, `N`, `K` and the
/// product's batch entries (one when `sum_batch`).
fn matmul_meta(mm: &MatmulOperands, sum_batch: bool) -> (Vec<u32>, usize, usize, usize, usize) {
    let (a, b) = (mm.a, mm.b);
    let (a_shape, b_shape, out_batch) = (mm.a_shape, mm.b_shape, mm.out_batch);
    let (ra, rb) = (a_shape.len(), b_shape.len());
    let (m, k) = if mm.transpose_a {
        (a_shape[ra - 1], a_shape[ra - 2])
    } else {
        (a_shape[ra - 2], a_shape[ra - 1])
    };
    let n = if mm.transpose_b {
        b_shape[rb - 2]
    } else {
        b_shape[rb - 1]
    };
    let (a_row, a_col) = (a.strides[ra - 2], a.strides[ra - 1]);
    let (b_row, b_col) = (b.strides[rb - 2], b.strides[rb - 1]);
    let (a_rs, a_cs) = if mm.transpose_a {
        (a_col, a_row)
    } else {
        (a_row, a_col)
    };
    let (b_rs, b_cs) = if mm.transpose_b {
        (b_col, b_row)
    } else {
        (b_row, b_col)
    };
    let batch_strides = |shape: &[usize], strides: &[usize]| -> Vec<usize> {
        let own = shape.len() - 2;
        let lead = out_batch.len() - own;
        (0..out_batch.len())
            .map(|i| {
                if i < lead || shape[i - lead] == 1 {
                    0
                } else {
                    strides[i - lead]
                }
            })
            .collect()
    };
    // Output tiles: one per batch entry, or one for all when summing.
    let batches: usize = if sum_batch {
        1
    } else {
        out_batch.iter().product()
    };
    let mut meta = u32s(out_batch.iter().copied());
    meta.extend(u32s(batch_strides(a_shape, &a.strides)));
    meta.extend(u32s(batch_strides(b_shape, &b.strides)));
    meta.extend(u32s([m, n, k, a_rs, a_cs, b_rs, b_cs, a.offset, b.offset]));
    (meta, m, n, k, batches)
}

/// How a reduction of `shape` (read through `strides`) over `axes` walks its operand.
struct ReductionLayout {
    /// The kept axes' extents and strides, then the reduced axes' (the layout every
    /// reduce kernel reads first).
    meta: Vec<u32>,
    /// Output elements, and reduced elements per output.
    outputs: usize,
    count: usize,
    /// Numbers of kept and of reduced axes.
    kept: usize,
    reduced: usize,
}

impl ReductionLayout {
    fn of(shape: &[usize], strides: &[usize], axes: &[usize]) -> ReductionLayout {
        let (reduced, kept): (Vec<usize>, Vec<usize>) =
            (0..shape.len()).partition(|a| axes.contains(a));
        let mut meta = u32s(kept.iter().map(|&a| shape[a]));
        meta.extend(u32s(kept.iter().map(|&a| strides[a])));
        meta.extend(u32s(reduced.iter().map(|&a| shape[a])));
        meta.extend(u32s(reduced.iter().map(|&a| strides[a])));
        ReductionLayout {
            meta,
            outputs: kept.iter().map(|&a| shape[a]).product(),
            count: reduced.iter().map(|&a| shape[a]).product(),
            kept: kept.len(),
            reduced: reduced.len(),
        }
    }
}

/// A buffer `(handle, elements)` as a kernel's array argument.
pub(crate) fn buffer_arg<R: Runtime>((handle, len): &(Handle, usize)) -> ArrayArg<R> {
    unsafe { ArrayArg::from_raw_parts(handle.clone(), (*len).max(1)) }
}

/// Tiles of `edge` needed to cover `extent`, at least one (a launch is never empty).
pub(crate) fn tiles_of(extent: usize, edge: u32) -> u32 {
    u32s([extent])[0].div_ceil(edge).max(1)
}

fn grid(units: usize) -> (CubeCount, CubeDim) {
    grid_of(units, CUBE_SIZE)
}

/// A one-dimensional launch of `units` units in cubes of `cube`.
fn grid_of(units: usize, cube: u32) -> (CubeCount, CubeDim) {
    let cubes = u32s([units])[0].div_ceil(cube).max(1);
    let x = cubes.min(MAX_GRID);
    (
        CubeCount::Static(x, cubes.div_ceil(x), 1),
        CubeDim::new_1d(cube),
    )
}

impl<R: Runtime> Kernels<R> {
    pub fn new(client: ComputeClient<R>) -> Self {
        Kernels {
            client,
            uploads: Default::default(),
            tuning: Tuning::default(),
            extra_launches: Default::default(),
        }
    }

    /// Kernels launched beyond one per call since the last time this was asked: what
    /// a caller counting one launch per call must add.
    pub fn take_extra_launches(&self) -> usize {
        self.extra_launches.swap(0, Ordering::Relaxed)
    }

    /// Sets how tunable kernels choose their configuration; `scope` names the device,
    /// driver and altc version the cached choices belong to.
    pub fn set_tuning(&mut self, mode: TuningMode, scope: String) {
        self.tuning = Tuning {
            mode,
            scope,
            decisions: Default::default(),
        };
    }

    pub(crate) fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// The tuning decisions made so far (tuned now or read from the cache), one per
    /// kernel key.
    pub fn tuned_kernels(&self) -> Vec<TunedKernel> {
        self.tuning.decisions.lock().expect("tuning record").clone()
    }

    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }

    pub fn upload(&self, values: &[f32]) -> Handle {
        if values.is_empty() {
            return self.client.empty(4);
        }
        self.client.create_from_slice(f32::as_bytes(values))
    }

    pub fn read(&self, handle: Handle, len: usize) -> Vec<f32> {
        if len == 0 {
            return Vec::new();
        }
        let bytes = self
            .client
            .read_one(handle)
            .expect("reading a device buffer");
        f32::from_bytes(&bytes)[..len].to_vec()
    }

    pub(crate) fn alloc(&self, len: usize) -> Handle {
        self.client.empty(len.max(1) * 4)
    }

    /// A one-element buffer holding `value`, uploaded once per value.
    pub fn constant(&self, value: f32) -> Handle {
        self.upload_once(vec![value.to_bits()])
    }

    /// An immutable buffer of these words, uploaded once per content (metadata, and
    /// the bits of constants: equal contents may share one buffer).
    pub(crate) fn upload_once(&self, values: Vec<u32>) -> Handle {
        let values = if values.is_empty() { vec![0] } else { values };
        let mut cache = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(values)
            .or_insert_with_key(|v| self.client.create_from_slice(u32::as_bytes(v)))
            .clone()
    }

    /// `op` of every element of `x` (read through its view) into a new `shape` buffer.
    pub fn unary(&self, op: UnaryKind, x: &View, shape: &[usize]) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let mut meta = u32s(shape.iter().copied());
        meta.extend(u32s(x.strides.iter().copied()));
        meta.extend(u32s([x.offset]));
        let (count, dim) = grid(n);
        unsafe {
            unary_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(x.handle.clone(), x.len.max(1)),
                ArrayArg::from_raw_parts(out.clone(), n),
                ArrayArg::from_raw_parts(self.upload_once(meta), 2 * shape.len() + 1),
                shape.len(),
                op,
            )
        };
        out
    }

    pub fn binary(&self, op: BinaryKind, a: &View, b: &View, shape: &[usize]) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let mut meta = u32s(shape.iter().copied());
        meta.extend(u32s(a.strides.iter().copied()));
        meta.extend(u32s(b.strides.iter().copied()));
        meta.extend(u32s([a.offset, b.offset]));
        let (count, dim) = grid(n);
        unsafe {
            binary_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(a.handle.clone(), a.len.max(1)),
                ArrayArg::from_raw_parts(b.handle.clone(), b.len.max(1)),
                ArrayArg::from_raw_parts(out.clone(), n),
                ArrayArg::from_raw_parts(self.upload_once(meta), 3 * shape.len() + 2),
                shape.len(),
                op,
            )
        };
        out
    }

    pub fn select(&self, cond: &View, a: &View, b: &View, shape: &[usize]) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let mut meta = u32s(shape.iter().copied());
        for v in [cond, a, b] {
            meta.extend(u32s(v.strides.iter().copied()));
        }
        meta.extend(u32s([cond.offset, a.offset, b.offset]));
        let (count, dim) = grid(n);
        unsafe {
            select_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(cond.handle.clone(), cond.len.max(1)),
                ArrayArg::from_raw_parts(a.handle.clone(), a.len.max(1)),
                ArrayArg::from_raw_parts(b.handle.clone(), b.len.max(1)),
                ArrayArg::from_raw_parts(out.clone(), n),
                ArrayArg::from_raw_parts(self.upload_once(meta), 4 * shape.len() + 3),
                shape.len(),
            )
        };
        out
    }

    /// Allocates an uninitialised buffer of `len` elements (filled by `copy_into`).
    pub fn buffer(&self, len: usize) -> Handle {
        self.alloc(len)
    }

    /// Copies `x` (logical `shape`) into `out` at `out_offset` with `out_strides`.
    pub fn copy_into(
        &self,
        x: &View,
        shape: &[usize],
        out: &Handle,
        out_len: usize,
        out_offset: usize,
        out_strides: &[usize],
    ) {
        let n: usize = shape.iter().product();
        if n == 0 {
            return;
        }
        let mut meta = u32s(shape.iter().copied());
        meta.extend(u32s(x.strides.iter().copied()));
        meta.extend(u32s(out_strides.iter().copied()));
        meta.extend(u32s([x.offset, out_offset]));
        let meta_len = meta.len();
        let (count, dim) = grid(n);
        unsafe {
            copy_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(x.handle.clone(), x.len.max(1)),
                ArrayArg::from_raw_parts(out.clone(), out_len.max(1)),
                ArrayArg::from_raw_parts(self.upload_once(meta), meta_len),
                u32s([n])[0],
                shape.len(),
            )
        };
    }

    /// Runs a fused elementwise `program` over `shape`: `inputs` are views already
    /// broadcast to `shape`; returns one contiguous buffer per program output. `seed`
    /// and `step` key the program's dropout streams.
    pub fn fused(
        &self,
        program: &FusedProgram,
        inputs: &[View],
        shape: &[usize],
        seed: u64,
        step: u64,
    ) -> Vec<Handle> {
        let n: usize = shape.iter().product();
        let meta = program_meta(shape, inputs);
        let meta_len = meta.len();
        let vectorised = self.vector_launch(program, &[(shape, inputs.iter().collect())]);
        let launch = FusedLaunch {
            client: self.client.clone(),
            inputs: inputs.iter().map(|v| (v.handle.clone(), v.len)).collect(),
            meta: (self.upload_once(meta), meta_len),
            n,
            row_len: shape.last().copied().unwrap_or(1),
            seed: (seed as u32, (seed >> 32) as u32, step as u32),
            key: KernelKey {
                family: ELEMENTWISE.into(),
                signature: format!(
                    "n{} ops{} in{} out{}{}",
                    bucket(n),
                    program.ops.len(),
                    program.inputs,
                    program.outputs.len(),
                    vector_tag(&vectorised)
                ),
            },
            vectorised,
            program: program.clone(),
            ran: Default::default(),
        };
        self.tuning.launch(&ELEMENTWISE_TUNER, &self.client, launch)
    }

    /// Runs one fused `program` of rank 1 over every segment in one launch (multi-tensor
    /// apply: the AdamW update of many parameters at once). `shared` are the views of
    /// inputs `0..program.shared_inputs`, the same for every segment. Returns each
    /// segment's outputs, one contiguous buffer per program output.
    pub fn multi_fused(
        &self,
        program: &FusedProgram,
        shared: &[View],
        segments: &[Segment],
    ) -> Vec<Vec<Handle>> {
        assert_eq!(program.rank, 1, "multi-tensor programs run flat");
        assert_eq!(program.shared_inputs, shared.len());
        let mut meta = Vec::new();
        let mut inputs: Vec<(Handle, usize)> =
            shared.iter().map(|v| (v.handle.clone(), v.len)).collect();
        for segment in segments {
            let views: Vec<View> = shared.iter().chain(&segment.inputs).cloned().collect();
            meta.extend(program_meta(&[segment.len], &views));
            inputs.extend(segment.inputs.iter().map(|v| (v.handle.clone(), v.len)));
        }
        let mut start = 0;
        for segment in segments {
            meta.extend(u32s([start]));
            start += segment.len;
        }
        meta.extend(u32s([start]));
        let meta_len = meta.len();
        let shapes: Vec<[usize; 1]> = segments.iter().map(|s| [s.len]).collect();
        let tensors: Vec<(&[usize], Vec<&View>)> = segments
            .iter()
            .zip(&shapes)
            .map(|(segment, shape)| (&shape[..], shared.iter().chain(&segment.inputs).collect()))
            .collect();
        let vectorised = self.vector_launch(program, &tensors);
        let launch = MultiFusedLaunch {
            client: self.client.clone(),
            inputs,
            meta: (self.upload_once(meta), meta_len),
            lens: segments.iter().map(|s| s.len).collect(),
            key: KernelKey {
                family: MULTI_ELEMENTWISE.into(),
                signature: format!(
                    "n{} tensors{} ops{} in{} out{}{}",
                    bucket(start),
                    segments.len(),
                    program.ops.len(),
                    program.inputs,
                    program.outputs.len(),
                    vector_tag(&vectorised)
                ),
            },
            vectorised,
            program: program.clone(),
            ran: Default::default(),
        };
        let outputs = self
            .tuning
            .launch(&MULTI_ELEMENTWISE_TUNER, &self.client, launch);
        outputs
            .chunks(program.outputs.len().max(1))
            .map(<[Handle]>::to_vec)
            .collect()
    }

    /// Reduces the single output of a fused `program` over `axes` of `shape` without
    /// writing the program's values: the reduction's prologue runs in registers.
    #[allow(clippy::too_many_arguments)]
    pub fn fused_reduce(
        &self,
        program: &FusedProgram,
        inputs: &[View],
        shape: &[usize],
        op: ReduceKind,
        axes: &[usize],
        seed: u64,
        step: u64,
    ) -> Handle {
        let layout = ReductionLayout::of(shape, &contiguous_strides(shape), axes);
        let mut meta = program_meta(shape, inputs);
        meta.extend(&layout.meta);
        meta.extend(u32s([layout.count]));
        let source = ReduceSource::Prologue {
            inputs: inputs.iter().map(|v| (v.handle.clone(), v.len)).collect(),
            program: program.clone(),
            seed: (seed as u32, (seed >> 32) as u32, step as u32),
        };
        self.launch_reduce(source, meta, &layout, op).remove(0)
    }

    /// Reduces `x` (of `shape`) along its last axis and runs the fused `program` (its
    /// epilogue) over `shape`, each element reading its row's reduced value as the
    /// accumulator; `inputs` are views broadcast to `shape`. The reduced values are
    /// written only with `write_reduced`. Returns one contiguous buffer per program
    /// output, then the reduced values if written, then, with `top_k`, each row's
    /// top-k indices (largest first, ties to the lower index) and values of output
    /// `top_k.output`.
    #[allow(clippy::too_many_arguments)]
    pub fn reduce_epilogue(
        &self,
        op: ReduceKind,
        x: &View,
        program: &FusedProgram,
        inputs: &[View],
        shape: &[usize],
        write_reduced: bool,
        top_k: RowTopK,
        seed: u64,
        step: u64,
    ) -> Vec<Handle> {
        let last = shape.len().checked_sub(1).expect("rows need an axis");
        let layout = ReductionLayout::of(shape, &x.strides, &[last]);
        let mut meta = program_meta(shape, inputs);
        meta.extend(&layout.meta);
        meta.extend(u32s([x.offset, layout.count, layout.outputs]));
        let source = ReduceSource::Epilogue {
            x: (x.handle.clone(), x.len),
            inputs: inputs.iter().map(|v| (v.handle.clone(), v.len)).collect(),
            program: program.clone(),
            seed: (seed as u32, (seed >> 32) as u32, step as u32),
            elements: shape.iter().product(),
            write_reduced,
            top_k,
        };
        self.launch_reduce(source, meta, &layout, op)
    }

    /// A reduction laid out as `layout`, through the tuner; returns the reduced values,
    /// or the outputs of an epilogue.
    fn launch_reduce(
        &self,
        source: ReduceSource,
        meta: Vec<u32>,
        layout: &ReductionLayout,
        op: ReduceKind,
    ) -> Vec<Handle> {
        let (n, count) = (layout.outputs, layout.count);
        let fused = match &source {
            ReduceSource::View(_) => "prologue0".to_string(),
            ReduceSource::Prologue { program, .. } => format!("prologue{}", program.ops.len()),
            ReduceSource::Epilogue { program, .. } => {
                format!("epilogue{}x{}", program.ops.len(), program.outputs.len())
            }
        };
        let meta_len = meta.len();
        let launch = ReduceLaunch {
            client: self.client.clone(),
            source,
            meta: (self.upload_once(meta), meta_len),
            n,
            kept: layout.kept,
            reduced: layout.reduced,
            op,
            key: KernelKey {
                family: REDUCE.into(),
                signature: format!("out{} count{} {op:?} {fused}", bucket(n), bucket(count)),
            },
            ran: Default::default(),
        };
        self.tuning.launch(&REDUCE_TUNER, &self.client, launch)
    }

    pub fn fill(&self, value: f32, len: usize) -> Handle {
        let out = self.alloc(len);
        let (count, dim) = grid(len);
        unsafe {
            fill_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(out.clone(), len),
                value,
            )
        };
        out
    }

    /// Each element's coordinate along `axis` of `shape`.
    pub fn iota(&self, shape: &[usize], axis: usize) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let inner: usize = shape[axis + 1..].iter().product();
        let (count, dim) = grid(n);
        let [inner, size] = [inner, shape[axis]].map(|v| u32s([v])[0]);
        unsafe {
            iota_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(out.clone(), n),
                inner,
                size,
            )
        };
        out
    }

    /// Reduces `x` (logical `shape`) over `axes`; the result is contiguous in the order
    /// of the kept axes.
    pub fn reduce(&self, op: ReduceKind, x: &View, shape: &[usize], axes: &[usize]) -> Handle {
        let layout = ReductionLayout::of(shape, &x.strides, axes);
        let mut meta = layout.meta.clone();
        meta.extend(u32s([x.offset, layout.count]));
        self.launch_reduce(
            ReduceSource::View((x.handle.clone(), x.len.max(1))),
            meta,
            &layout,
            op,
        )
        .remove(0)
    }

    /// Reduces each `(view, shape)` after the unary `prologue`, all in one kernel:
    /// over `axes` (`Some`: the tensors share one shape) or whole (`None`: shapes may
    /// differ). Each view must be contiguous from its offset. Returns the results one
    /// tensor after another, each contiguous in the order of the kept axes.
    pub fn multi_reduce(
        &self,
        prologue: &[UnaryKind],
        inputs: &[(View, Vec<usize>)],
        axes: Option<&[usize]>,
        op: ReduceKind,
    ) -> Handle {
        let elements = |shape: &[usize]| shape.iter().product::<usize>();
        let whole = axes.is_none();
        // A whole reduction reads each buffer as one flat axis of its own length.
        let largest = inputs.iter().map(|(_, s)| elements(s)).max().unwrap_or(1);
        let shape: Vec<usize> = if whole {
            vec![largest]
        } else {
            inputs[0].1.clone()
        };
        let layout = ReductionLayout::of(&shape, &contiguous_strides(&shape), axes.unwrap_or(&[0]));
        let outputs = layout.outputs;
        let total = outputs * inputs.len();
        let out = self.alloc(total);
        let mut meta = layout.meta.clone();
        meta.extend(u32s([outputs]));
        meta.extend(u32s(
            inputs.iter().map(|(_, s)| elements(s) / outputs.max(1)),
        ));
        meta.extend(u32s(inputs.iter().map(|(v, _)| v.offset)));
        let meta_len = meta.len();
        let count = layout.count;
        // Wide cubes only where each output has many elements to combine.
        let lanes = match count {
            4096.. => 256,
            256.. => 64,
            _ => 1,
        };
        let (cubes, dim) = if lanes == 1 {
            grid(total)
        } else {
            grid_of(total * lanes as usize, lanes)
        };
        unsafe {
            multi_reduce_kernel::launch_unchecked::<f32, R>(
                &self.client,
                cubes,
                dim,
                buffer_sequence(inputs.iter().map(|(v, _)| (v.handle.clone(), v.len))),
                ArrayArg::from_raw_parts(out.clone(), total.max(1)),
                ArrayArg::from_raw_parts(self.upload_once(meta), meta_len),
                prologue.to_vec(),
                inputs.len(),
                layout.kept,
                layout.reduced,
                op,
                lanes,
            )
        };
        out
    }

    /// `[..., M, K] x [..., K, N]`; see `MatmulOperands`.
    pub fn matmul(&self, mm: &MatmulOperands) -> Handle {
        self.product(mm, false)
    }

    /// `[..., M, K] x [..., K, N]` summed over the batch dimensions: `[M, N]`, in one
    /// kernel (weight gradients of a layer applied to every batch entry).
    pub fn matmul_batch_sum(&self, mm: &MatmulOperands) -> Handle {
        self.product(mm, true)
    }

    /// One matmul's product, written as it is or, with `sum_batch`, summed over the
    /// batch.
    fn product(&self, mm: &MatmulOperands, sum_batch: bool) -> Handle {
        self.launch_matmuls(
            std::slice::from_ref(mm),
            OperandLayout::SINGLE,
            &FusedProgram::product(),
            &[Vec::new()],
            sum_batch,
            (0, 0),
        )
        .into_iter()
        .next()
        .expect("one output")
    }

    /// A matmul whose product feeds `program` (an elementwise epilogue over the
    /// product's shape, reading it as `Accumulator`) inside the same kernel; returns
    /// the program's outputs. `inputs` are the program's other inputs, broadcast to
    /// the product's shape.
    pub fn matmul_with_epilogue(
        &self,
        mm: &MatmulOperands,
        program: &FusedProgram,
        inputs: &[View],
        seed: u64,
        step: u64,
    ) -> Vec<Handle> {
        self.launch_matmuls(
            std::slice::from_ref(mm),
            OperandLayout::SINGLE,
            program,
            &[inputs.to_vec()],
            false,
            (seed, step),
        )
    }

    /// Matmuls of one shape and one operand in common (`layout` says which; members'
    /// views of it must be the same) in one launch, each with `epilogue` (an empty one
    /// writes the product) reading its own `inputs` (the first
    /// `epilogue.shared_inputs` the same for all, bound once), or with `sum_batch`
    /// each summed over the batch. Returns each member's outputs.
    #[allow(clippy::too_many_arguments)]
    pub fn multi_matmul(
        &self,
        members: &[MatmulOperands],
        layout: OperandLayout,
        epilogue: &FusedProgram,
        inputs: &[Vec<View>],
        sum_batch: bool,
        seed: u64,
        step: u64,
    ) -> Vec<Vec<Handle>> {
        assert_eq!(layout.members, members.len());
        // Each member's batch entries are cubes along z, which a grid bounds.
        let entries: usize = if sum_batch {
            1
        } else {
            members[0].out_batch.iter().product()
        };
        if entries * members.len() > MAX_GRID as usize {
            return members
                .iter()
                .zip(inputs)
                .map(|(mm, views)| {
                    let single = FusedProgram {
                        shared_inputs: 0,
                        ..epilogue.clone()
                    };
                    self.launch_matmuls(
                        std::slice::from_ref(mm),
                        OperandLayout::SINGLE,
                        &single,
                        std::slice::from_ref(views),
                        sum_batch,
                        (seed, step),
                    )
                })
                .collect();
        }
        let outputs =
            self.launch_matmuls(members, layout, epilogue, inputs, sum_batch, (seed, step));
        outputs
            .chunks(epilogue.outputs.len().max(1))
            .map(<[Handle]>::to_vec)
            .collect()
    }

    /// `rng`: the epilogue's dropout seed and step.
    fn launch_matmuls(
        &self,
        members: &[MatmulOperands],
        layout: OperandLayout,
        epilogue: &FusedProgram,
        inputs: &[Vec<View>],
        sum_batch: bool,
        rng: (u64, u64),
    ) -> Vec<Handle> {
        let launch = self.matmul_launch(members, layout, epilogue, inputs, sum_batch, rng);
        self.tuning.launch(&MATMUL_TUNER, &self.client, launch)
    }

    /// The launch `launch_matmuls` tunes and runs.
    fn matmul_launch(
        &self,
        members: &[MatmulOperands],
        layout: OperandLayout,
        epilogue: &FusedProgram,
        inputs: &[Vec<View>],
        sum_batch: bool,
        (seed, step): (u64, u64),
    ) -> MatmulLaunch<R> {
        let mut meta = Vec::new();
        let mut extent = (0, 0, 0);
        let mut k = 0;
        for mm in members {
            let (member_meta, m, n, member_k, batches) = matmul_meta(mm, sum_batch);
            meta.extend(member_meta);
            (extent, k) = ((m, n, batches), member_k);
        }
        let (m, n, _) = extent;
        let mm = &members[0];
        let out_batch = mm.out_batch;
        let product_shape: Vec<usize> = out_batch.iter().copied().chain([m, n]).collect();
        let product_strides = contiguous_strides(&product_shape);
        let mut epilogue_meta = Vec::new();
        let mut apart_meta = Vec::new();
        for views in inputs {
            epilogue_meta.extend(program_meta(&product_shape, views));
            let apart = program_meta_of(
                &product_shape,
                views
                    .iter()
                    .map(|v| (v.strides.as_slice(), v.offset))
                    .chain([(product_strides.as_slice(), 0)]),
            );
            let apart_len = apart.len();
            apart_meta.push((self.upload_once(apart), apart_len));
        }
        let buffer = |v: &View| (v.handle.clone(), v.len.max(1));
        let operands: Vec<(Handle, usize)> = (0..layout.bindings())
            .map(|binding| {
                let at = (0..members.len())
                    .find_map(|s| {
                        if layout.a(s) == binding {
                            Some(members[s].a)
                        } else if layout.b(s) == binding {
                            Some(members[s].b)
                        } else {
                            None
                        }
                    })
                    .expect("the layout binds every operand");
                buffer(at)
            })
            .collect();
        let shared = epilogue.shared_inputs;
        let bound: Vec<(Handle, usize)> = inputs[0][..shared]
            .iter()
            .chain(inputs.iter().flat_map(|views| &views[shared..]))
            .map(buffer)
            .collect();
        let (meta_len, epilogue_len) = (meta.len(), epilogue_meta.len());
        MatmulLaunch {
            client: self.client.clone(),
            operands,
            layout,
            inputs: bound,
            member_inputs: inputs
                .iter()
                .map(|views| views.iter().map(buffer).collect())
                .collect(),
            meta: (self.upload_once(meta), meta_len),
            epilogue_meta: (self.upload_once(epilogue_meta), epilogue_len),
            apart_meta,
            extent,
            seed: (seed as u32, (seed >> 32) as u32, step as u32),
            batch_rank: out_batch.len(),
            sum_batch,
            bf16_operands: mm.bf16_operands,
            epilogue: epilogue.clone(),
            extra_launches: self.extra_launches.clone(),
            key: KernelKey {
                family: MATMUL.into(),
                signature: format!(
                    "m{} n{} k{} batch{}{}{} epilogue{}x{}{}",
                    bucket(m),
                    bucket(n),
                    bucket(k),
                    bucket(out_batch.iter().product()),
                    if sum_batch { " summed" } else { "" },
                    if mm.bf16_operands { " bf16" } else { "" },
                    epilogue.ops.len(),
                    epilogue.outputs.len(),
                    if members.len() > 1 {
                        format!(" matmuls{}", members.len())
                    } else {
                        String::new()
                    }
                ),
            },
            ran: Default::default(),
        }
    }

    /// PyTorch `gather` along `axis`; the result has the index's `shape`.
    pub fn gather(&self, x: &View, index: &View, axis: usize, shape: &[usize]) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let mut meta = u32s(shape.iter().copied());
        meta.extend(u32s(index.strides.iter().copied()));
        meta.extend(u32s(x.strides.iter().copied()));
        meta.extend(u32s([axis, index.offset, x.offset]));
        let meta_len = meta.len();
        let (count, dim) = grid(n);
        unsafe {
            gather_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(x.handle.clone(), x.len.max(1)),
                ArrayArg::from_raw_parts(index.handle.clone(), index.len.max(1)),
                ArrayArg::from_raw_parts(out.clone(), n),
                ArrayArg::from_raw_parts(self.upload_once(meta), meta_len),
                shape.len(),
            )
        };
        out
    }

    /// Zeros of `shape`, then `out[.., index[.., j, ..], ..] += src[.., j, ..]`;
    /// `extent` is the index's size along `axis`.
    pub fn scatter_add(
        &self,
        index: &View,
        src: &View,
        axis: usize,
        extent: usize,
        shape: &[usize],
    ) -> Handle {
        let n: usize = shape.iter().product();
        let out = self.alloc(n);
        let mut meta = u32s(shape.iter().copied());
        meta.extend(u32s(index.strides.iter().copied()));
        meta.extend(u32s(src.strides.iter().copied()));
        meta.extend(u32s([axis, extent, index.offset, src.offset]));
        let meta_len = meta.len();
        let (count, dim) = grid(n);
        unsafe {
            scatter_add_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(index.handle.clone(), index.len.max(1)),
                ArrayArg::from_raw_parts(src.handle.clone(), src.len.max(1)),
                ArrayArg::from_raw_parts(out.clone(), n),
                ArrayArg::from_raw_parts(self.upload_once(meta), meta_len),
                shape.len(),
            )
        };
        out
    }

    /// Indices of the `k` largest of each of `rows` contiguous rows of `n`.
    pub fn top_k(&self, x: &Handle, rows: usize, n: usize, k: usize) -> Handle {
        let out = self.alloc(rows * k);
        let (count, dim) = grid(rows);
        let [n32, k32] = [n, k].map(|v| u32s([v])[0]);
        unsafe {
            top_k_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(x.clone(), (rows * n).max(1)),
                ArrayArg::from_raw_parts(out.clone(), (rows * k).max(1)),
                n32,
                k32,
            )
        };
        out
    }

    /// Inverted dropout of contiguous `x` with the Philox stream of (seed, step, stream).
    pub fn dropout(
        &self,
        x: &Handle,
        len: usize,
        rate: f64,
        seed: u64,
        step: u64,
        stream: u64,
    ) -> Handle {
        let out = self.alloc(len);
        let (count, dim) = grid(len);
        unsafe {
            dropout_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(x.clone(), len.max(1)),
                ArrayArg::from_raw_parts(out.clone(), len),
                rate as f32,
                (1.0 / (1.0 - rate)) as f32,
                seed as u32,
                (seed >> 32) as u32,
                step as u32,
                stream as u32,
            )
        };
        out
    }
}

/// What the device sustains, measured: the ceilings kernel efficiency is judged by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ceilings {
    /// A strided-copy kernel over `copy_elements` f32 (read + write), in GB/s.
    pub copy_gb_per_s: f64,
    pub copy_elements: usize,
    /// altc's fastest dense matmul form on `matmul_size`^3, in TFLOP/s (f32).
    pub matmul_tflop_per_s: f64,
    pub matmul_size: usize,
}

impl<R: Runtime> Kernels<R> {
    /// Waits until every launched kernel has finished.
    pub fn sync(&self) {
        cubecl::future::block_on(self.client.sync()).expect("device synchronisation");
    }

    /// Best of `repeats` timed runs of `launch`, each synchronised, after one warm-up.
    fn best_seconds(&self, repeats: usize, launch: impl Fn()) -> f64 {
        launch();
        self.sync();
        (0..repeats.max(1))
            .map(|_| {
                let started = std::time::Instant::now();
                launch();
                self.sync();
                started.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Measures the copy bandwidth and the matmul rate at the given sizes.
    pub fn measure_ceilings(&self, copy_elements: usize, matmul_size: usize) -> Ceilings {
        let data = self.fill(1.0, copy_elements);
        let view = View::contiguous(data, &[copy_elements]);
        let copy = self.best_seconds(5, || {
            self.unary(UnaryKind::Identity, &view, &[copy_elements]);
        });
        let n = matmul_size;
        let a = View::contiguous(self.fill(0.5, n * n), &[n, n]);
        let mm = MatmulOperands {
            a: &a,
            a_shape: &[n, n],
            transpose_a: false,
            b: &a,
            b_shape: &[n, n],
            transpose_b: false,
            out_batch: &[],
            bf16_operands: false,
        };
        // The fastest of the dense matmul's forms.
        let product = FusedProgram::product();
        let launch = self.matmul_launch(
            std::slice::from_ref(&mm),
            OperandLayout::SINGLE,
            &product,
            &[Vec::new()],
            false,
            (0, 0),
        );
        let matmul = EpilogueMatmul::ALL
            .iter()
            .filter(|c| c.fused)
            .map(|c| {
                self.best_seconds(3, || {
                    launch.launch_kernel(c.form, &product, &[]);
                })
            })
            .fold(f64::INFINITY, f64::min);
        Ceilings {
            copy_gb_per_s: (2 * 4 * copy_elements) as f64 / copy / 1e9,
            copy_elements,
            matmul_tflop_per_s: 2.0 * (n * n * n) as f64 / matmul / 1e12,
            matmul_size: n,
        }
    }
}
