//! Launching matmuls: operands as views, the tunable strategies (tiled or direct,
//! register-blocked, epilogue fused or apart), several sharing an operand, and the
//! metadata the kernel reads.

use crate::autotune::{bucket, Candidate, KernelKey, LaunchRecord, TunableLaunch};
use crate::device::{
    buffer_arg, buffer_sequence, grid, tiles_of, u32s, word, Kernels, ELEMENT_BYTES, MAX_GRID,
};
use crate::elementwise::ops::ViewsMeta;
use crate::fused::kernel::{fused_kernel, FusedOp, FusedProgram};
use crate::matmul::kernel::{matmul_kernel, MatmulDims, MatmulMeta, OperandLayout, TILE};
use crate::view::{contiguous_strides, View};
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::tune::LocalTuner;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
pub(crate) struct MatmulLaunch<R: Runtime> {
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
    record: LaunchRecord<EpilogueMatmul>,
    /// `Kernels::extra_launches`.
    extra_launches: Arc<AtomicUsize>,
}

impl<R: Runtime> TunableLaunch for MatmulLaunch<R> {
    type With = EpilogueMatmul;

    fn record(&self) -> &LaunchRecord<EpilogueMatmul> {
        &self.record
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
                .map(|_| self.client.empty(n * ELEMENT_BYTES))
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
    pub(crate) fn launch_kernel(
        &self,
        form: MatmulStrategy,
        epilogue: &FusedProgram,
        inputs: &[(Handle, usize)],
    ) -> Vec<Handle> {
        let (m, n, batches) = self.extent;
        let len = self.len();
        let outputs: Vec<Handle> = (0..self.layout.members * epilogue.outputs.len().max(1))
            .map(|_| self.client.empty(len * ELEMENT_BYTES))
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
            word(batches * self.layout.members),
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

/// One matmul's part of `matmul_kernel`'s metadata, with its `M`, `N`, `K` and the
/// product's batch entries (one when `sum_batch`).
pub(crate) fn matmul_meta(
    mm: &MatmulOperands,
    sum_batch: bool,
) -> (Vec<u32>, usize, usize, usize, usize) {
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
    let meta = MatmulMeta {
        batch: u32s(out_batch.iter().copied()),
        a_batch_strides: u32s(batch_strides(a_shape, &a.strides)),
        b_batch_strides: u32s(batch_strides(b_shape, &b.strides)),
        dims: MatmulDims {
            m: word(m),
            n: word(n),
            k: word(k),
            a_row: word(a_rs),
            a_col: word(a_cs),
            b_row: word(b_rs),
            b_col: word(b_cs),
            a_offset: word(a.offset),
            b_offset: word(b.offset),
        },
    };
    (meta.words(), m, n, k, batches)
}

impl<R: Runtime> Kernels<R> {
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
    pub(crate) fn matmul_launch(
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
            epilogue_meta.extend(ViewsMeta::of_views(&product_shape, views.iter()));
            let apart = ViewsMeta::words(
                &product_shape,
                views
                    .iter()
                    .map(|v| (v.strides.as_slice(), v.offset))
                    .chain([(product_strides.as_slice(), 0)]),
            );
            apart_meta.push(self.upload_once(apart));
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
        MatmulLaunch {
            client: self.client.clone(),
            operands,
            layout,
            inputs: bound,
            member_inputs: inputs
                .iter()
                .map(|views| views.iter().map(buffer).collect())
                .collect(),
            meta: self.upload_once(meta),
            epilogue_meta: self.upload_once(epilogue_meta),
            apart_meta,
            extent,
            seed: (seed as u32, (seed >> 32) as u32, step as u32),
            batch_rank: out_batch.len(),
            sum_batch,
            bf16_operands: mm.bf16_operands,
            epilogue: epilogue.clone(),
            extra_launches: self.extra_launches.clone(),
            record: LaunchRecord::new(KernelKey {
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
            }),
        }
    }
}

/// The family's name in kernel keys, and its tuner.
pub(crate) const MATMUL: &str = "matmul";
pub(crate) static MATMUL_TUNER: LocalTuner<KernelKey, String> =
    LocalTuner::new(concat!("altc_kernels::tune", "-matmul")); // named as before the move: cubecl keys its cache files by it
