//! What every kernel-family benchmark shares: the model sizes, the device (opened
//! once, forced to a candidate, or in vectors), inputs, fused-program builders and
//! the measurement settings.

use altc_kernels::{
    BinaryKind, Candidate, ElementwiseStrategy, FusedOp, FusedProgram, Kernels, MatmulOperands,
    TuningMode, UnaryKind, View,
};
use criterion::BenchmarkGroup;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use cubecl::Runtime;
use std::sync::OnceLock;
use std::time::Duration;

/// The tiny model: batch 32, up to 6 tokens, hidden 16, 4 experts, top-2.
pub(crate) const TINY_TOKENS: usize = 32 * 6;
pub(crate) const TINY_HIDDEN: usize = 16;
pub(crate) const TINY_EXPERTS: usize = 4;
pub(crate) const TINY_TOP_K: usize = 2;
/// The paper: batch 128, 257 image tokens, hidden 2048, 12 experts, top-4.
pub(crate) const PAPER_BATCH: usize = 128;
pub(crate) const PAPER_TOKENS: usize = PAPER_BATCH * 257;
/// Token activations of a whole paper batch, `[128 * 257, 2048]` f32 (269 MB), exceed
/// the largest buffer lavapipe binds (128 MiB): activation-sized cases use a quarter
/// batch, 32 pairs of 257 tokens (67 MB).
pub(crate) const PAPER_SLICE_TOKENS: usize = 32 * 257;
pub(crate) const PAPER_HIDDEN: usize = 2048;
pub(crate) const PAPER_EXPERTS: usize = 12;
pub(crate) const PAPER_TOP_K: usize = 4;
pub(crate) const TEXT_WIDTH: usize = 4096;
pub(crate) const IMAGE_WIDTH: usize = 1024;

pub(crate) type Device = Kernels<WgpuRuntime>;

/// The wgpu device, opened once; `None` (said once) when there is none.
pub(crate) fn device() -> Option<&'static Device> {
    static DEVICE: OnceLock<Option<Device>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            // Creating a client panics inside the bindings when no adapter exists.
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let client = std::panic::catch_unwind(|| WgpuRuntime::client(&WgpuDevice::default()));
            std::panic::set_hook(hook);
            match client {
                Ok(client) => {
                    eprintln!(
                        "kernel families on wgpu (untuned kernels); largest buffer: {} MiB",
                        client.properties().memory.max_page_size >> 20
                    );
                    Some(Kernels::new(client))
                }
                Err(e) => {
                    let why = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    eprintln!(
                        "not benchmarking kernel families: wgpu is not available ({})",
                        why.lines().next().unwrap_or("")
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// The same device with every kernel that has a candidate called `name` forced to
/// it, for side-by-side cases; opened once per name.
pub(crate) fn forced(name: String) -> Option<&'static Device> {
    static DEVICES: OnceLock<std::sync::Mutex<Vec<(String, &'static Device)>>> = OnceLock::new();
    let mut devices = DEVICES.get_or_init(Default::default).lock().ok()?;
    if let Some((_, k)) = devices.iter().find(|(n, _)| *n == name) {
        return Some(k);
    }
    let mut k = Kernels::new(device()?.client().clone());
    k.set_tuning(TuningMode::Force(name.clone()), "kernel_families".into());
    let k: &'static Device = Box::leak(Box::new(k));
    devices.push((name, k));
    Some(k)
}

/// The device with elementwise kernels in vectors of four f32.
pub(crate) fn vector_device() -> Option<&'static Device> {
    let vectorised = ElementwiseStrategy::ALL
        .iter()
        .find(|s| s.vector > 1)
        .expect("a vectorised elementwise candidate");
    forced(vectorised.name())
}

pub(crate) fn sync(k: &Device) {
    cubecl::future::block_on(k.client().sync()).expect("device synchronisation");
}

/// Whether a buffer of `elements` f32 fits the device's largest buffer; says so when not.
pub(crate) fn fits(k: &Device, elements: usize, case: &str) -> bool {
    let largest = k.client().properties().memory.max_page_size;
    let bytes = 4 * elements as u64;
    if bytes > largest {
        eprintln!(
            "skipping {case}: a {} MB buffer exceeds the device's largest ({} MB)",
            bytes / 1_000_000,
            largest / 1_000_000
        );
    }
    bytes <= largest
}

/// Deterministic values in [-1, 1) (xorshift), so every run sees the same data.
pub(crate) fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub(crate) fn upload(k: &Device, shape: &[usize], seed: u64) -> View {
    let n = shape.iter().product();
    View::contiguous(k.upload(&values(n, seed)), shape)
}

/// A fused program under construction: each push returns the new register.
pub(crate) struct Program(FusedProgram);

impl Program {
    pub(crate) fn new(rank: usize, inputs: usize) -> Program {
        Program(FusedProgram {
            rank,
            inputs,
            ..FusedProgram::default()
        })
    }

    pub(crate) fn push(&mut self, op: FusedOp) -> usize {
        self.0.ops.push(op);
        self.0.ops.len() - 1
    }

    pub(crate) fn load(&mut self, input: usize) -> usize {
        self.push(FusedOp::Load { input })
    }

    pub(crate) fn constant(&mut self, value: f32) -> usize {
        self.push(FusedOp::Constant {
            bits: value.to_bits(),
        })
    }

    pub(crate) fn unary(&mut self, op: UnaryKind, a: usize) -> usize {
        self.push(FusedOp::Unary { op, a })
    }

    pub(crate) fn binary(&mut self, op: BinaryKind, a: usize, b: usize) -> usize {
        self.push(FusedOp::Binary { op, a, b })
    }

    pub(crate) fn finish(mut self, outputs: &[usize]) -> FusedProgram {
        self.0.outputs = outputs.to_vec();
        self.0
    }
}

/// `0.5 t (1 + tanh(sqrt(2/pi) (t + 0.044715 t^3)))`: GELU (tanh form) of register `t`.
pub(crate) fn gelu_tanh(p: &mut Program, t: usize) -> usize {
    let t2 = p.unary(UnaryKind::Square, t);
    let t3 = p.binary(BinaryKind::Mul, t2, t);
    let c = p.constant(0.044_715);
    let ct3 = p.binary(BinaryKind::Mul, c, t3);
    let inner = p.binary(BinaryKind::Add, t, ct3);
    let s = p.constant(0.797_884_6);
    let scaled = p.binary(BinaryKind::Mul, s, inner);
    let th = p.unary(UnaryKind::Tanh, scaled);
    let one = p.constant(1.0);
    let onep = p.binary(BinaryKind::Add, one, th);
    let half = p.constant(0.5);
    let ht = p.binary(BinaryKind::Mul, half, t);
    p.binary(BinaryKind::Mul, ht, onep)
}

/// Register a: input 0 (`[rows, width]`) plus input 1 (a `[width]` bias broadcast over
/// rows), then GELU: 10 arithmetic ops in one kernel.
pub(crate) fn bias_gelu_program() -> FusedProgram {
    let mut p = Program::new(2, 2);
    let x = p.load(0);
    let b = p.load(1);
    let t = p.binary(BinaryKind::Add, x, b);
    let y = gelu_tanh(&mut p, t);
    p.finish(&[y])
}

/// `a @ w` of `shapes` (`[m, k]` and `[k, n]`): no transposes, no batch, f32.
pub(crate) fn plain_product<'a>(
    a: &'a View,
    w: &'a View,
    shapes: &'a [[usize; 2]; 2],
) -> MatmulOperands<'a> {
    MatmulOperands {
        a,
        a_shape: &shapes[0],
        transpose_a: false,
        b: w,
        b_shape: &shapes[1],
        transpose_b: false,
        out_batch: &[],
        bf16_operands: false,
    }
}

/// A `[width]` vector read as `[rows, width]` (stride 0 over rows).
pub(crate) fn broadcast_rows(v: &View) -> View {
    View {
        strides: vec![0, 1],
        ..v.clone()
    }
}

/// A `[rows]` vector read as `[rows, width]` (stride 0 over the width).
pub(crate) fn broadcast_cols(v: &View) -> View {
    View {
        strides: vec![1, 0],
        ..v.clone()
    }
}

/// Criterion's defaults would take hours at paper scale on lavapipe: ten samples,
/// short warm-up and measurement (slow cases fall back to flat sampling, one
/// iteration per sample).
pub(crate) fn configure<M: criterion::measurement::Measurement>(group: &mut BenchmarkGroup<'_, M>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}
