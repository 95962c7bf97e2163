//! Launching fused elementwise programs, one tensor or many in one launch, in the
//! scalar or the vector form, with their tunable strategies.

use crate::autotune::{bucket, Candidate, KernelKey, LaunchRecord, TunableLaunch};
use crate::device::{
    buffer_arg, buffer_sequence, empty_buffers, grid_of, u32s, Kernels, CUBE_SIZE,
};
use crate::elementwise::ops::ViewsMeta;
use crate::fused::kernel::{fused_kernel, multi_fused_kernel, segment_table, FusedProgram};
use crate::fused::vector::{vector_fused_kernel, VectorProgram};
use crate::view::{contiguous_strides, View};
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::tune::LocalTuner;

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
pub(crate) const VECTOR_WIDTH: usize = 4;

/// A fused program's launch in vectors of `VECTOR_WIDTH` elements, prepared when
/// every input is contiguous from a vector boundary or one value.
#[derive(Clone)]
pub(crate) struct VectorLaunch {
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
pub(crate) fn vector_tag(vectorised: &Option<VectorLaunch>) -> &'static str {
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
        meta.extend(segment_table(lens.iter().map(|&len| len / W)));
        Some(VectorLaunch {
            program: VectorProgram {
                program: program.clone(),
                scalar: scalar?,
            },
            vectors,
            scalars,
            meta: self.upload_once(meta),
            lens,
        })
    }
}

/// What a fused elementwise launch runs over when it runs element by element: one
/// tensor (its element count, its last axis's extent, and the dropout seed and
/// step), or several flat tensors in one launch (each one's element count).
#[derive(Clone)]
enum Extent {
    Tensor {
        n: usize,
        row_len: usize,
        seed: (u32, u32, u32),
    },
    Segments(Vec<usize>),
}

#[derive(Clone)]
pub(crate) struct FusedLaunch<R: Runtime> {
    client: ComputeClient<R>,
    inputs: Vec<(Handle, usize)>,
    vectorised: Option<VectorLaunch>,
    meta: (Handle, usize),
    extent: Extent,
    program: FusedProgram,
    record: LaunchRecord<ElementwiseStrategy>,
}

impl<R: Runtime> TunableLaunch for FusedLaunch<R> {
    type With = ElementwiseStrategy;

    fn record(&self) -> &LaunchRecord<ElementwiseStrategy> {
        &self.record
    }

    fn launch(&self, with: ElementwiseStrategy) -> Vec<Handle> {
        if let (true, Some(vectorised)) = (with.vector > 1, &self.vectorised) {
            return vectorised.launch(&self.client, with.cube);
        }
        let program = &self.program;
        let (inputs, meta) = (&self.inputs, &self.meta);
        let outputs = match &self.extent {
            Extent::Tensor { n, row_len, seed } => {
                let (n, rows) = (*n, n / (*row_len).max(1));
                let outputs = empty_buffers(
                    &self.client,
                    (0..program.outputs.len()).map(|o| program.output_len(o, n, rows)),
                );
                let (count, dim) = grid_of(n.div_ceil(with.per_unit as usize), with.cube);
                unsafe {
                    fused_kernel::launch_unchecked::<f32, R>(
                        &self.client,
                        count,
                        dim,
                        buffer_sequence(inputs.iter().cloned()),
                        buffer_sequence(outputs.iter().cloned()),
                        buffer_arg(meta),
                        seed.0,
                        seed.1,
                        seed.2,
                        program.clone(),
                        with.per_unit,
                    )
                };
                outputs
            }
            Extent::Segments(lens) => {
                // Flat segments: every element is a row of its own.
                let outputs = empty_buffers(
                    &self.client,
                    lens.iter().flat_map(|&len| {
                        (0..program.outputs.len()).map(move |o| program.output_len(o, len, len))
                    }),
                );
                let total: usize = lens.iter().sum();
                let (count, dim) = grid_of(total.div_ceil(with.per_unit as usize), with.cube);
                unsafe {
                    multi_fused_kernel::launch_unchecked::<f32, R>(
                        &self.client,
                        count,
                        dim,
                        buffer_sequence(inputs.iter().cloned()),
                        buffer_sequence(outputs.iter().cloned()),
                        buffer_arg(meta),
                        program.clone(),
                        lens.len(),
                        with.per_unit,
                    )
                };
                outputs
            }
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

impl<R: Runtime> Kernels<R> {
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
        let meta = ViewsMeta::of_views(shape, inputs.iter());
        let vectorised = self.vector_launch(program, &[(shape, inputs.iter().collect())]);
        let launch = FusedLaunch {
            client: self.client.clone(),
            inputs: inputs.iter().map(|v| (v.handle.clone(), v.len)).collect(),
            meta: self.upload_once(meta),
            extent: Extent::Tensor {
                n,
                row_len: shape.last().copied().unwrap_or(1),
                seed: (seed as u32, (seed >> 32) as u32, step as u32),
            },
            record: LaunchRecord::new(KernelKey {
                family: ELEMENTWISE.into(),
                signature: format!(
                    "n{} ops{} in{} out{}{}",
                    bucket(n),
                    program.ops.len(),
                    program.inputs,
                    program.outputs.len(),
                    vector_tag(&vectorised)
                ),
            }),
            vectorised,
            program: program.clone(),
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
            meta.extend(ViewsMeta::of_views(&[segment.len], views.iter()));
            inputs.extend(segment.inputs.iter().map(|v| (v.handle.clone(), v.len)));
        }
        meta.extend(segment_table(segments.iter().map(|s| s.len)));
        let total: usize = segments.iter().map(|s| s.len).sum();
        let shapes: Vec<[usize; 1]> = segments.iter().map(|s| [s.len]).collect();
        let tensors: Vec<(&[usize], Vec<&View>)> = segments
            .iter()
            .zip(&shapes)
            .map(|(segment, shape)| (&shape[..], shared.iter().chain(&segment.inputs).collect()))
            .collect();
        let vectorised = self.vector_launch(program, &tensors);
        let launch = FusedLaunch {
            client: self.client.clone(),
            inputs,
            meta: self.upload_once(meta),
            extent: Extent::Segments(segments.iter().map(|s| s.len).collect()),
            record: LaunchRecord::new(KernelKey {
                family: MULTI_ELEMENTWISE.into(),
                signature: format!(
                    "n{} tensors{} ops{} in{} out{}{}",
                    bucket(total),
                    segments.len(),
                    program.ops.len(),
                    program.inputs,
                    program.outputs.len(),
                    vector_tag(&vectorised)
                ),
            }),
            vectorised,
            program: program.clone(),
        };
        let outputs = self
            .tuning
            .launch(&MULTI_ELEMENTWISE_TUNER, &self.client, launch);
        outputs
            .chunks(program.outputs.len().max(1))
            .map(<[Handle]>::to_vec)
            .collect()
    }
}

/// The family's name in kernel keys, and its tuner.
pub(crate) const ELEMENTWISE: &str = "fused elementwise";
pub(crate) static ELEMENTWISE_TUNER: LocalTuner<KernelKey, String> =
    LocalTuner::new(concat!("altc_kernels::tune", "-elementwise")); // named as before the move: cubecl keys its cache files by it
/// The family's name in kernel keys, and its tuner.
pub(crate) const MULTI_ELEMENTWISE: &str = "multi-tensor elementwise";
pub(crate) static MULTI_ELEMENTWISE_TUNER: LocalTuner<KernelKey, String> =
    LocalTuner::new(concat!("altc_kernels::tune", "-multi-elementwise")); // named as before the move: cubecl keys its cache files by it
