//! Launching reductions: alone, with a fused prologue or epilogue, or many tensors
//! in one launch, with their tunable strategies and layouts.

use crate::autotune::{bucket, Candidate, KernelKey, LaunchRecord, TunableLaunch};
use crate::device::{
    buffer_arg, buffer_sequence, empty_buffers, grid, grid_of, u32s, word, Kernels, CUBE_SIZE,
    ELEMENT_BYTES, MAX_GRID,
};
use crate::elementwise::ops::UnaryKind;
use crate::elementwise::ops::ViewsMeta;
use crate::fused::kernel::{fused_reduce_kernel, reduce_epilogue_kernel, FusedProgram, RowTopK};
use crate::reduce::kernel::{multi_reduce_kernel, reduce_kernel, ReduceKind, ReduceMeta};
use crate::view::{contiguous_strides, View};
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::tune::LocalTuner;

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
pub(crate) enum ReduceSource {
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
pub(crate) struct ReduceLaunch<R: Runtime> {
    client: ComputeClient<R>,
    source: ReduceSource,
    meta: (Handle, usize),
    /// Output elements.
    n: usize,
    kept: usize,
    reduced: usize,
    op: ReduceKind,
    record: LaunchRecord<ReduceStrategy>,
}

impl<R: Runtime> TunableLaunch for ReduceLaunch<R> {
    type With = ReduceStrategy;

    fn record(&self) -> &LaunchRecord<ReduceStrategy> {
        &self.record
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
                let cubes = word(n);
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
            let out = client.empty(n * ELEMENT_BYTES);
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

/// How a reduction of `shape` (read through `strides`) over `axes` walks its operand.
pub(crate) struct ReductionLayout {
    /// The `ReduceMeta` every reduce kernel reads first.
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
        let meta = ReduceMeta::words(shape, strides, &kept, &reduced);
        ReductionLayout {
            meta,
            outputs: kept.iter().map(|&a| shape[a]).product(),
            count: reduced.iter().map(|&a| shape[a]).product(),
            kept: kept.len(),
            reduced: reduced.len(),
        }
    }
}

impl<R: Runtime> Kernels<R> {
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
        let mut meta = ViewsMeta::of_views(shape, inputs.iter());
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
        let mut meta = ViewsMeta::of_views(shape, inputs.iter());
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
        let launch = ReduceLaunch {
            client: self.client.clone(),
            source,
            meta: self.upload_once(meta),
            n,
            kept: layout.kept,
            reduced: layout.reduced,
            op,
            record: LaunchRecord::new(KernelKey {
                family: REDUCE.into(),
                signature: format!("out{} count{} {op:?} {fused}", bucket(n), bucket(count)),
            }),
        };
        self.tuning.launch(&REDUCE_TUNER, &self.client, launch)
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
                buffer_arg(&self.upload_once(meta)),
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
}

/// The family's name in kernel keys, and its tuner.
pub(crate) const REDUCE: &str = "reduce";
pub(crate) static REDUCE_TUNER: LocalTuner<KernelKey, String> =
    LocalTuner::new(concat!("altc_kernels::tune", "-reduce")); // named as before the move: cubecl keys its cache files by it
