//! Each kernel family of `altc_kernels` on its own, on the wgpu runtime (Mesa lavapipe
//! on a CPU-only machine): fused elementwise chains, reductions (plain and with a
//! fused prologue), matmuls (plain and with a bias + GELU epilogue; each form side by
//! side), the grouped
//! expert GEMM of sparse MoE dispatch, an AdamW update as one fused program (per
//! tensor, scalar and in vectors of four, and over many tensors in multi-tensor
//! launches), the router's softmax and
//! top-k (as separate kernels, and as two reduction-epilogue kernels), and top-k for
//! routing and for retrieval. Each family runs at the tiny model's sizes
//! and at the paper's (`models/alt_moe.ron`: h = 2048, E = 12, k = 4, batch 128,
//! encoder widths 4096 and 1024, 257 image tokens).
//!
//! Every measured iteration launches the kernel(s) and waits for the device
//! (`client.sync()`), so a time is the kernels' own plus one synchronisation; the
//! inputs are uploaded once, outside the timed loop.

use altc_kernels::{
    BinaryKind, Candidate, ElementwiseStrategy, EpilogueMatmul, ExpertGradStrategy, ExpertMatmul,
    FusedOp, FusedProgram, Kernels, MatmulOperands, MatmulStrategy, ReduceKind, RowTopK, Segment,
    TuningMode, UnaryKind, View,
};
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use cubecl::server::Handle;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use cubecl::Runtime;
use std::sync::OnceLock;
use std::time::Duration;

/// The tiny model: batch 32, up to 6 tokens, hidden 16, 4 experts, top-2.
const TINY_TOKENS: usize = 32 * 6;
const TINY_HIDDEN: usize = 16;
const TINY_EXPERTS: usize = 4;
const TINY_TOP_K: usize = 2;
/// The paper: batch 128, 257 image tokens, hidden 2048, 12 experts, top-4.
const PAPER_BATCH: usize = 128;
const PAPER_TOKENS: usize = PAPER_BATCH * 257;
/// Token activations of a whole paper batch, `[128 * 257, 2048]` f32 (269 MB), exceed
/// the largest buffer lavapipe binds (128 MiB): activation-sized cases use a quarter
/// batch, 32 pairs of 257 tokens (67 MB).
const PAPER_SLICE_TOKENS: usize = 32 * 257;
const PAPER_HIDDEN: usize = 2048;
const PAPER_EXPERTS: usize = 12;
const PAPER_TOP_K: usize = 4;
const TEXT_WIDTH: usize = 4096;
const IMAGE_WIDTH: usize = 1024;

type Device = Kernels<WgpuRuntime>;

/// The wgpu device, opened once; `None` (said once) when there is none.
fn device() -> Option<&'static Device> {
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
fn forced(name: String) -> Option<&'static Device> {
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
fn vector_device() -> Option<&'static Device> {
    let vectorised = ElementwiseStrategy::ALL
        .iter()
        .find(|s| s.vector > 1)
        .expect("a vectorised elementwise candidate");
    forced(vectorised.name())
}

fn sync(k: &Device) {
    cubecl::future::block_on(k.client().sync()).expect("device synchronisation");
}

/// Whether a buffer of `elements` f32 fits the device's largest buffer; says so when not.
fn fits(k: &Device, elements: usize, case: &str) -> bool {
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
fn values(len: usize, seed: u64) -> Vec<f32> {
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

fn upload(k: &Device, shape: &[usize], seed: u64) -> View {
    let n = shape.iter().product();
    View::contiguous(k.upload(&values(n, seed)), shape)
}

/// A fused program under construction: each push returns the new register.
struct Program(FusedProgram);

impl Program {
    fn new(rank: usize, inputs: usize) -> Program {
        Program(FusedProgram {
            rank,
            inputs,
            ..FusedProgram::default()
        })
    }

    fn push(&mut self, op: FusedOp) -> usize {
        self.0.ops.push(op);
        self.0.ops.len() - 1
    }

    fn load(&mut self, input: usize) -> usize {
        self.push(FusedOp::Load { input })
    }

    fn constant(&mut self, value: f32) -> usize {
        self.push(FusedOp::Constant {
            bits: value.to_bits(),
        })
    }

    fn unary(&mut self, op: UnaryKind, a: usize) -> usize {
        self.push(FusedOp::Unary { op, a })
    }

    fn binary(&mut self, op: BinaryKind, a: usize, b: usize) -> usize {
        self.push(FusedOp::Binary { op, a, b })
    }

    fn finish(mut self, outputs: &[usize]) -> FusedProgram {
        self.0.outputs = outputs.to_vec();
        self.0
    }
}

/// `0.5 t (1 + tanh(sqrt(2/pi) (t + 0.044715 t^3)))`: GELU (tanh form) of register `t`.
fn gelu_tanh(p: &mut Program, t: usize) -> usize {
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
fn bias_gelu_program() -> FusedProgram {
    let mut p = Program::new(2, 2);
    let x = p.load(0);
    let b = p.load(1);
    let t = p.binary(BinaryKind::Add, x, b);
    let y = gelu_tanh(&mut p, t);
    p.finish(&[y])
}

/// `a @ w` of `shapes` (`[m, k]` and `[k, n]`): no transposes, no batch, f32.
fn plain_product<'a>(a: &'a View, w: &'a View, shapes: &'a [[usize; 2]; 2]) -> MatmulOperands<'a> {
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
fn broadcast_rows(v: &View) -> View {
    View {
        strides: vec![0, 1],
        ..v.clone()
    }
}

/// A `[rows]` vector read as `[rows, width]` (stride 0 over the width).
fn broadcast_cols(v: &View) -> View {
    View {
        strides: vec![1, 0],
        ..v.clone()
    }
}

/// Criterion's defaults would take hours at paper scale on lavapipe: ten samples,
/// short warm-up and measurement (slow cases fall back to flat sampling, one
/// iteration per sample).
fn configure<M: criterion::measurement::Measurement>(group: &mut BenchmarkGroup<'_, M>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

fn fused_elementwise(c: &mut Criterion) {
    let Some(k) = device() else { return };
    let program = bias_gelu_program();
    let mut group = c.benchmark_group("fused_elementwise");
    configure(&mut group);
    for (name, rows, width) in [
        ("tiny", TINY_TOKENS, TINY_HIDDEN),
        ("paper", PAPER_SLICE_TOKENS, PAPER_HIDDEN),
    ] {
        if !fits(k, rows * width, &format!("fused_elementwise/{name}")) {
            continue;
        }
        let x = upload(k, &[rows, width], 1);
        let bias = upload(k, &[width], 2);
        let inputs = [x, broadcast_rows(&bias)];
        let shape = [rows, width];
        // x read and y written once; the bias is one row.
        group.throughput(Throughput::Bytes((4 * (2 * rows * width + width)) as u64));
        group.bench_function(format!("bias_gelu/{name}/{rows}x{width}"), |b| {
            b.iter(|| {
                let out = k.fused(&program, &inputs, &shape, 0, 0);
                sync(k);
                out
            })
        });
    }
    group.finish();
}

fn reductions(c: &mut Criterion) {
    let Some(k) = device() else { return };
    // exp(x - max), reduced by sum: a softmax denominator with its prologue fused.
    let mut p = Program::new(2, 2);
    let x = p.load(0);
    let m = p.load(1);
    let d = p.binary(BinaryKind::Sub, x, m);
    let e = p.unary(UnaryKind::Exp, d);
    let softmax_prologue = p.finish(&[e]);
    let mut group = c.benchmark_group("reductions");
    configure(&mut group);
    for (name, rows, width) in [
        ("tiny", TINY_TOKENS, TINY_HIDDEN),
        ("paper", PAPER_SLICE_TOKENS, PAPER_HIDDEN),
    ] {
        if !fits(k, rows * width, &format!("reductions/{name}")) {
            continue;
        }
        let shape = [rows, width];
        let x = upload(k, &shape, 3);
        let row_max = View::contiguous(k.reduce(ReduceKind::Max, &x, &shape, &[1]), &[rows]);
        group.throughput(Throughput::Bytes((4 * (rows * width + rows)) as u64));
        for (op_name, op) in [("sum", ReduceKind::Sum), ("max", ReduceKind::Max)] {
            group.bench_function(format!("row_{op_name}/{name}/{rows}x{width}"), |b| {
                b.iter(|| {
                    let out = k.reduce(op, &x, &shape, &[1]);
                    sync(k);
                    out
                })
            });
        }
        let inputs = [x.clone(), broadcast_cols(&row_max)];
        group.throughput(Throughput::Bytes((4 * (rows * width + 2 * rows)) as u64));
        group.bench_function(format!("sum_exp_x_minus_max/{name}/{rows}x{width}"), |b| {
            b.iter(|| {
                let out = k.fused_reduce(
                    &softmax_prologue,
                    &inputs,
                    &shape,
                    ReduceKind::Sum,
                    &[1],
                    0,
                    0,
                );
                sync(k);
                out
            })
        });
    }
    group.finish();
}

fn matmul(c: &mut Criterion) {
    let Some(k) = device() else { return };
    // The product plus a `[n]` bias, then GELU: a linear layer's epilogue.
    let mut p = Program::new(2, 1);
    let acc = p.push(FusedOp::Accumulator);
    let bias = p.load(0);
    let t = p.binary(BinaryKind::Add, acc, bias);
    let y = p.unary(UnaryKind::Gelu, t);
    let epilogue = p.finish(&[y]);
    let mut group = c.benchmark_group("matmul");
    configure(&mut group);
    // The last field: whether to also run the bias + GELU epilogue variant. The text
    // projection (5 s a launch here) runs plain only, to keep the suite short.
    for (name, m, kk, n, with_epilogue) in [
        // Tiny: the text input projection (24 -> 16) over every token, and an expert.
        ("tiny/input_projection", TINY_TOKENS, 24, TINY_HIDDEN, true),
        ("tiny/expert", TINY_TOKENS, TINY_HIDDEN, TINY_HIDDEN, true),
        // Paper, one row per pair of the batch: both input projections and an expert.
        (
            "paper/text_projection",
            PAPER_BATCH,
            TEXT_WIDTH,
            PAPER_HIDDEN,
            false,
        ),
        (
            "paper/image_projection",
            PAPER_BATCH,
            IMAGE_WIDTH,
            PAPER_HIDDEN,
            true,
        ),
        (
            "paper/expert",
            PAPER_BATCH,
            PAPER_HIDDEN,
            PAPER_HIDDEN,
            true,
        ),
    ] {
        if !fits(
            k,
            (m * kk).max(kk * n).max(m * n),
            &format!("matmul/{name}"),
        ) {
            continue;
        }
        let a = upload(k, &[m, kk], 4);
        let w = upload(k, &[kk, n], 5);
        let bias = upload(k, &[n], 6);
        let inputs = [broadcast_rows(&bias)];
        let shapes = [[m, kk], [kk, n]];
        let mm = plain_product(&a, &w, &shapes);
        // Elements are floating-point operations: the rate reads as FLOP/s.
        group.throughput(Throughput::Elements((2 * m * kk * n) as u64));
        group.bench_function(format!("{name}/{m}x{kk}x{n}"), |b| {
            b.iter(|| {
                let out = k.matmul(&mm);
                sync(k);
                out
            })
        });
        if !with_epilogue {
            continue;
        }
        group.bench_function(format!("{name}/{m}x{kk}x{n}/bias_gelu"), |b| {
            b.iter(|| {
                let out = k.matmul_with_epilogue(&mm, &epilogue, &inputs, 0, 0);
                sync(k);
                out
            })
        });
    }
    group.finish();
}

/// The dense matmul's forms side by side: the tiled fallback, direct reads, and
/// direct reads with each unit computing 2x2 or 4x4 outputs (register blocking).
fn matmul_forms(c: &mut Criterion) {
    let Some(k) = device() else { return };
    let mut group = c.benchmark_group("matmul_forms");
    configure(&mut group);
    for (name, m, kk, n) in [
        ("tiny/expert", TINY_TOKENS, TINY_HIDDEN, TINY_HIDDEN),
        (
            "paper/image_projection",
            PAPER_BATCH,
            IMAGE_WIDTH,
            PAPER_HIDDEN,
        ),
    ] {
        let a = upload(k, &[m, kk], 4);
        let w = upload(k, &[kk, n], 5);
        let shapes = [[m, kk], [kk, n]];
        let mm = plain_product(&a, &w, &shapes);
        group.throughput(Throughput::Elements((2 * m * kk * n) as u64));
        let forms = EpilogueMatmul::ALL.iter().filter(|c| {
            c.fused
                && matches!(
                    c.form,
                    MatmulStrategy::Tiled
                        | MatmulStrategy::Direct { edge: 8 }
                        | MatmulStrategy::Blocked { .. }
                )
        });
        for form in forms {
            let Some(kernels) = forced(form.name()) else {
                return;
            };
            group.bench_function(format!("{name}/{m}x{kk}x{n}/{}", form.name()), |b| {
                b.iter(|| {
                    let out = kernels.matmul(&mm);
                    sync(kernels);
                    out
                })
            });
        }
    }
    group.finish();
}

/// Each token's `top_k` expert ids, flattened: how the router spreads assignments.
fn routing(kind: &str, tokens: usize, experts: usize, top_k: usize) -> Vec<f32> {
    (0..tokens)
        .flat_map(|t| {
            (0..top_k).map(move |s| match kind {
                // Every expert gets the same share, a token's experts are distinct.
                "balanced" => (t * top_k + s) % experts,
                // Only the first half of the pool is used, unevenly (a window sliding
                // over a few start positions); the other experts receive nothing.
                "skewed" => s + t % (experts / 2).saturating_sub(top_k).saturating_add(1),
                // Every assignment goes to expert 0.
                _ => 0,
            } as f32)
        })
        .collect()
}

fn grouped_expert_gemm(c: &mut Criterion) {
    let Some(k) = device() else { return };
    let mut group = c.benchmark_group("grouped_expert_gemm");
    configure(&mut group);
    for (name, tokens, h, m, experts, top_k) in [
        (
            "tiny",
            TINY_TOKENS,
            TINY_HIDDEN,
            TINY_HIDDEN,
            TINY_EXPERTS,
            TINY_TOP_K,
        ),
        // One token per pair of a 32-pair slice: 128 assignments over 12 experts of
        // width 2048. The whole `[12, 2048, 2048]` weight (201 MB) exceeds lavapipe's
        // largest buffer, so this is one of the two column halves of an expert layer.
        (
            "paper",
            32,
            PAPER_HIDDEN,
            PAPER_HIDDEN / 2,
            PAPER_EXPERTS,
            PAPER_TOP_K,
        ),
    ] {
        if !fits(k, experts * h * m, &format!("grouped_expert_gemm/{name}")) {
            continue;
        }
        let x = k.upload(&values(tokens * h, 7));
        let w = upload(k, &[experts, h, m], 8);
        let bias = upload(k, &[experts, m], 9);
        let assignments = tokens * top_k;
        // Elements are floating-point operations: the rate reads as FLOP/s.
        group.throughput(Throughput::Elements((2 * assignments * h * m) as u64));
        for kind in ["balanced", "skewed", "all_to_one"] {
            let index: Handle = k.upload(&routing(kind, tokens, experts, top_k));
            let grouped = |kernels: &Device| {
                let order = kernels.expert_order(&index, assignments, experts);
                let offsets = kernels.expert_offsets(&index, assignments, experts);
                let out = kernels.expert_matmul(&ExpertMatmul {
                    x: &x,
                    rows: tokens,
                    k: h,
                    w: &w,
                    transpose_w: false,
                    m,
                    bias: Some(&bias),
                    order: &order,
                    offsets: &offsets,
                    assignments,
                    experts,
                    bf16_operands: false,
                });
                sync(kernels);
                out
            };
            let case = format!("{name}/{kind}/{tokens}x{top_k}_of_{experts}/{h}x{m}");
            group.bench_function(&case, |b| b.iter(|| grouped(k)));
            // At paper scale, the direct forms side by side with the fallback above.
            if name != "paper" || kind == "skewed" {
                continue;
            }
            let forms = MatmulStrategy::ALL.iter().filter(|f| {
                matches!(
                    f,
                    MatmulStrategy::Direct { edge: 8 } | MatmulStrategy::Blocked { .. }
                )
            });
            for form in forms {
                let Some(kernels) = forced(form.name()) else {
                    break;
                };
                group.bench_function(format!("{case}/{}", form.name()), |b| {
                    b.iter(|| grouped(kernels))
                });
            }
            // The expert weight gradient of the same routing, `[experts, h, m]`: per
            // expert, the sum over its assignments of the token row's outer product
            // with the assignment's output gradient; each form forced.
            let grads = k.upload(&values(assignments * m, 10));
            let order = k.expert_order(&index, assignments, experts);
            let offsets = k.expert_offsets(&index, assignments, experts);
            for form in ExpertGradStrategy::ALL {
                let Some(kernels) = forced(form.name()) else {
                    break;
                };
                group.bench_function(format!("{case}/weight_grad/{}", form.name()), |b| {
                    b.iter(|| {
                        let out = kernels.expert_weight_grad(
                            (&x, tokens, h),
                            (&grads, assignments, m),
                            &order,
                            &offsets,
                            assignments,
                            experts,
                            false,
                        );
                        sync(kernels);
                        out
                    })
                });
            }
        }
    }
    group.finish();
}

/// The AdamW constants of the spec, shared by every AdamW program below.
const ADAM_BETAS: (f32, f32) = (0.9, 0.999);
const ADAM_EPS: f32 = 1e-8;

/// AdamW for one parameter tensor as one fused program. Inputs: m, v, param, grad;
/// outputs: new m, new v, new param. Step 10 of a run with the spec's betas and eps
/// and the paper's peak learning rate and final weight decay.
fn adamw_program() -> FusedProgram {
    let ((beta1, beta2), eps, lr, wd, step) = (ADAM_BETAS, ADAM_EPS, 1.5e-3f32, 0.2f32, 10);
    let mut p = Program::new(1, 4);
    let m = p.load(0);
    let v = p.load(1);
    let param = p.load(2);
    let g = p.load(3);
    let m_new = moment(&mut p, m, g, beta1);
    let g2 = p.unary(UnaryKind::Square, g);
    let v_new = moment(&mut p, v, g2, beta2);
    // Bias-corrected moments, then p' = p - lr (m^ / (sqrt(v^) + eps) + wd p).
    let c1 = p.constant(1.0 / (1.0 - beta1.powi(step)));
    let c2 = p.constant(1.0 / (1.0 - beta2.powi(step)));
    let m_hat = p.binary(BinaryKind::Mul, m_new, c1);
    let v_hat = p.binary(BinaryKind::Mul, v_new, c2);
    let root = p.unary(UnaryKind::Sqrt, v_hat);
    let eps = p.constant(eps);
    let denom = p.binary(BinaryKind::Add, root, eps);
    let ratio = p.binary(BinaryKind::Div, m_hat, denom);
    let wd = p.constant(wd);
    let decay = p.binary(BinaryKind::Mul, wd, param);
    let update = p.binary(BinaryKind::Add, ratio, decay);
    let lr = p.constant(lr);
    let scaled = p.binary(BinaryKind::Mul, lr, update);
    let param_new = p.binary(BinaryKind::Sub, param, scaled);
    p.finish(&[m_new, v_new, param_new])
}

fn adamw_update(c: &mut Criterion) {
    let Some(k) = device() else { return };
    let program = adamw_program();
    let mut group = c.benchmark_group("adamw_update");
    configure(&mut group);
    for (name, len, launches) in [
        // Tiny: the expert pool's w1, [4, 16, 16].
        (
            "tiny/experts.w1",
            TINY_EXPERTS * TINY_HIDDEN * TINY_HIDDEN,
            1,
        ),
        // Paper: the text input projection's weight, [4096, 2048], and the expert
        // pool's w1, [12, 2048, 2048], whose 201 MB exceed lavapipe's largest buffer:
        // it is updated in two launches of six experts.
        ("paper/text_projection.weight", TEXT_WIDTH * PAPER_HIDDEN, 1),
        (
            "paper/experts.w1",
            PAPER_EXPERTS * PAPER_HIDDEN * PAPER_HIDDEN,
            2,
        ),
    ] {
        let part = len / launches;
        if !fits(k, part, &format!("adamw_update/{name}")) {
            continue;
        }
        let parts: Vec<Vec<View>> = (0..launches as u64)
            .map(|l| {
                (0..4u64)
                    .map(|s| upload(k, &[part], 10 + 4 * l + s))
                    .collect()
            })
            .collect();
        // Four tensors read, three written.
        group.throughput(Throughput::Bytes((4 * 7 * len) as u64));
        // The fallback form, then four elements per access.
        for (suffix, kernels) in [("", k), ("/vector4", vector_device().unwrap_or(k))] {
            group.bench_function(format!("{name}/{len}{suffix}"), |b| {
                b.iter(|| {
                    let out: Vec<Vec<Handle>> = parts
                        .iter()
                        .map(|inputs| kernels.fused(&program, inputs, &[part], 0, 0))
                        .collect();
                    sync(kernels);
                    out
                })
            });
        }
    }
    group.finish();
}

/// The decayed, clipped AdamW update of one large parameter as altc planned it
/// before large tensors read their scalars from a kernel of their own: each element
/// recomputes the step count and bias corrections (two powers, a root and a
/// division) and the new step count is a scalar output. Inputs: param, grad, m, v,
/// then the scalars step, lr, weight decay and clipping coefficient; outputs: new
/// param, m, v and step count. The same 24 ops `altc compile --explain` listed.
fn adamw_scalars_per_element() -> FusedProgram {
    let (beta1, beta2) = ADAM_BETAS;
    let mut p = Program::new(1, 8);
    let [param, g, m, v, step, lr, wd, coef] = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| p.load(i));
    let one = p.constant(1.0);
    let lr_wd = p.binary(BinaryKind::Mul, lr, wd);
    let keep = p.binary(BinaryKind::Sub, one, lr_wd);
    let decayed = p.binary(BinaryKind::Mul, param, keep);
    let clipped = p.binary(BinaryKind::Mul, g, coef);
    let m_new = moment(&mut p, m, clipped, beta1);
    let g2 = p.unary(UnaryKind::Square, clipped);
    let v_new = moment(&mut p, v, g2, beta2);
    let BiasCorrection {
        step: t,
        step_size,
        root_bc2,
    } = bias_correction(&mut p, step, lr, one);
    let root_v = p.unary(UnaryKind::Sqrt, v_new);
    let scaled_root = p.binary(BinaryKind::Div, root_v, root_bc2);
    let eps = p.constant(ADAM_EPS);
    let denom = p.binary(BinaryKind::Add, scaled_root, eps);
    let ratio = p.binary(BinaryKind::Div, m_new, denom);
    let delta = p.binary(BinaryKind::Mul, ratio, step_size);
    let param_new = p.binary(BinaryKind::Sub, decayed, delta);
    let mut program = p.finish(&[param_new, m_new, v_new, t]);
    program.scalar_outputs = vec![3];
    program
}

/// Registers of AdamW's step count and bias corrections.
struct BiasCorrection {
    /// The new step count `t = step + 1`.
    step: usize,
    /// `lr / (1 - beta1^t)`.
    step_size: usize,
    /// `sqrt(1 - beta2^t)`.
    root_bc2: usize,
}

/// AdamW's step count and bias corrections from registers `step`, `lr` and `one`.
fn bias_correction(p: &mut Program, step: usize, lr: usize, one: usize) -> BiasCorrection {
    let t = p.binary(BinaryKind::Add, step, one);
    let mut correction = |beta: f32| {
        let b = p.constant(beta);
        let power = p.binary(BinaryKind::Pow, b, t);
        p.binary(BinaryKind::Sub, one, power)
    };
    let bc1 = correction(ADAM_BETAS.0);
    let bc2 = correction(ADAM_BETAS.1);
    let step_size = p.binary(BinaryKind::Div, lr, bc1);
    let root_bc2 = p.unary(UnaryKind::Sqrt, bc2);
    BiasCorrection {
        step: t,
        step_size,
        root_bc2,
    }
}

/// `state * beta + value * (1 - beta)`: a moment's update.
fn moment(p: &mut Program, state: usize, value: usize, beta: f32) -> usize {
    let b = p.constant(beta);
    let rest = p.constant(1.0 - beta);
    let kept = p.binary(BinaryKind::Mul, state, b);
    let new = p.binary(BinaryKind::Mul, value, rest);
    p.binary(BinaryKind::Add, kept, new)
}

/// The scalars of the update as planned now, computed once: inputs step, lr, weight
/// decay, clipping coefficient; outputs the new step count, `keep = 1 - lr wd`, the
/// clipped first-moment rate `coef (1 - beta1)`, the collected step factor
/// `sqrt(bc2) lr / bc1` and the denominator's `eps sqrt(bc2)`.
fn adamw_scalars() -> FusedProgram {
    let mut p = Program::new(0, 4);
    let [step, lr, wd, coef] = [0, 1, 2, 3].map(|i| p.load(i));
    let one = p.constant(1.0);
    let lr_wd = p.binary(BinaryKind::Mul, lr, wd);
    let keep = p.binary(BinaryKind::Sub, one, lr_wd);
    let rest1 = p.constant(1.0 - ADAM_BETAS.0);
    let clipped_rate = p.binary(BinaryKind::Mul, coef, rest1);
    let BiasCorrection {
        step: t,
        step_size,
        root_bc2,
    } = bias_correction(&mut p, step, lr, one);
    let step_factor = p.binary(BinaryKind::Mul, root_bc2, step_size);
    let eps = p.constant(ADAM_EPS);
    let scaled_eps = p.binary(BinaryKind::Mul, eps, root_bc2);
    p.finish(&[t, keep, clipped_rate, step_factor, scaled_eps])
}

/// The elementwise part of the update as planned now, its scalar factors collected
/// by the e-graph: 14 ops, no scalar outputs, so it may run in vectors. Inputs:
/// param, grad, m, v, then `keep`, the clipping coefficient, `coef (1 - beta1)`, the
/// step factor and the scaled eps; outputs new param, m and v.
fn adamw_elements() -> FusedProgram {
    let (beta1, beta2) = ADAM_BETAS;
    let mut p = Program::new(1, 9);
    let [param, g, m, v, keep, coef, clipped_rate, step_factor, scaled_eps] =
        [0, 1, 2, 3, 4, 5, 6, 7, 8].map(|i| p.load(i));
    let decayed = p.binary(BinaryKind::Mul, param, keep);
    let b1 = p.constant(beta1);
    let m_kept = p.binary(BinaryKind::Mul, m, b1);
    let m_added = p.binary(BinaryKind::Mul, g, clipped_rate);
    let m_new = p.binary(BinaryKind::Add, m_kept, m_added);
    let clipped = p.binary(BinaryKind::Mul, g, coef);
    let g2 = p.unary(UnaryKind::Square, clipped);
    let v_new = moment(&mut p, v, g2, beta2);
    let root_v = p.unary(UnaryKind::Sqrt, v_new);
    let denom = p.binary(BinaryKind::Add, root_v, scaled_eps);
    let numerator = p.binary(BinaryKind::Mul, m_new, step_factor);
    let delta = p.binary(BinaryKind::Div, numerator, denom);
    let param_new = p.binary(BinaryKind::Sub, decayed, delta);
    p.finish(&[param_new, m_new, v_new])
}

/// The update of the paper's text projection weight (`[4096, 2048]`) in the forms
/// the planner chooses between: every element recomputing the scalars, against the
/// scalars computed by one small kernel and the collected elementwise program (its
/// fallback form, then four elements per access).
fn adamw_as_compiled(c: &mut Criterion) {
    let Some(k) = device() else { return };
    let len = TEXT_WIDTH * PAPER_HIDDEN;
    let name = format!("adamw_update/paper/text_projection.weight/{len}/as_compiled");
    if !fits(k, len, &name) {
        return;
    }
    let mut group = c.benchmark_group("adamw_update");
    configure(&mut group);
    // param, grad, m and v; the second moment is never negative.
    let tensors: Vec<View> = (0..4u64)
        .map(|s| {
            let mut data = values(len, 60 + s);
            if s == 3 {
                data.iter_mut().for_each(|x| *x = x.abs());
            }
            View::contiguous(k.upload(&data), &[len])
        })
        .collect();
    // step 9, lr, weight decay, a clipping coefficient below 1.
    let scalar_values = [9.0f32, 1.5e-3, 0.2, 0.7];
    let scalars: Vec<View> = scalar_values
        .iter()
        .map(|v| View::contiguous(k.upload(&[*v]), &[]))
        .collect();
    let spread = |v: &View| View {
        strides: vec![0],
        ..v.clone()
    };
    group.throughput(Throughput::Bytes((4 * 7 * len) as u64));
    let per_element = adamw_scalars_per_element();
    let per_element_inputs: Vec<View> = tensors
        .iter()
        .cloned()
        .chain(scalars.iter().map(spread))
        .collect();
    group.bench_function(
        "paper/text_projection.weight/as_compiled/scalars_per_element",
        |b| {
            b.iter(|| {
                let out = k.fused(&per_element, &per_element_inputs, &[len], 0, 0);
                sync(k);
                out
            })
        },
    );
    let (scalar_program, elements) = (adamw_scalars(), adamw_elements());
    let scalars_apart = |kernels: &Device| {
        let computed = kernels.fused(&scalar_program, &scalars, &[], 0, 0);
        // keep, coef, coef (1 - beta1), step factor, scaled eps.
        let factors = [
            &computed[1],
            &scalars[3].handle,
            &computed[2],
            &computed[3],
            &computed[4],
        ]
        .map(|h| View {
            handle: h.clone(),
            len: 1,
            offset: 0,
            strides: vec![0],
        });
        let inputs: Vec<View> = tensors.iter().cloned().chain(factors).collect();
        kernels.fused(&elements, &inputs, &[len], 0, 0)
    };
    // Both forms compute the same update (to f32 rounding), or the comparison is void.
    let before = k.fused(&per_element, &per_element_inputs, &[len], 0, 0);
    let after = scalars_apart(k);
    for (output, (a, b)) in before.iter().zip(&after).enumerate() {
        let (a, b) = (k.read(a.clone(), len), k.read(b.clone(), len));
        let agree = a
            .iter()
            .zip(&b)
            .all(|(x, y)| (x - y).abs() <= 1e-3 * y.abs().max(1e-3));
        assert!(agree, "output {output}: the two forms of the update differ");
    }
    for (suffix, kernels) in [("", k), ("/vector4", vector_device().unwrap_or(k))] {
        group.bench_function(
            format!("paper/text_projection.weight/as_compiled/scalars_apart{suffix}"),
            |b| {
                b.iter(|| {
                    let out = scalars_apart(kernels);
                    sync(kernels);
                    out
                })
            },
        );
    }
    group.finish();
}

/// Sizes of the tiny model's trainable tensors that one training step updates (a
/// representative mix: weights, biases, norms, embeddings, the expert pool).
const TINY_PARAMETER_SIZES: [usize; 12] = [384, 16, 256, 16, 1024, 64, 1024, 64, 16, 16, 256, 24];

/// AdamW over every tiny parameter: one fused launch per tensor, against
/// multi-tensor launches of as many tensors as the device's bindings allow.
fn adamw_all_parameters(c: &mut Criterion) {
    let Some(k) = device() else { return };
    let program = adamw_program();
    let mut group = c.benchmark_group("adamw_update");
    configure(&mut group);
    let tensors: Vec<(usize, Vec<View>)> = TINY_PARAMETER_SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let inputs = (0..4u64)
                .map(|s| upload(k, &[len], 40 + 4 * i as u64 + s))
                .collect();
            (len, inputs)
        })
        .collect();
    let total: usize = TINY_PARAMETER_SIZES.iter().sum();
    group.throughput(Throughput::Bytes((4 * 7 * total) as u64));
    let label = format!("tiny/all_parameters/{}_tensors", tensors.len());
    group.bench_function(format!("{label}/per_tensor"), |b| {
        b.iter(|| {
            let out: Vec<Vec<Handle>> = tensors
                .iter()
                .map(|(len, inputs)| k.fused(&program, inputs, &[*len], 0, 0))
                .collect();
            sync(k);
            out
        })
    });
    // Each tensor binds 4 inputs and 3 outputs; one binding is the metadata and one is
    // left for cubecl's own.
    let bindings = k.client().properties().hardware.max_bindings as usize;
    let per_launch = (bindings.saturating_sub(2) / 7).max(1);
    let segments: Vec<Segment> = tensors
        .iter()
        .map(|(len, inputs)| Segment {
            len: *len,
            inputs: inputs.clone(),
        })
        .collect();
    group.bench_function(format!("{label}/multi_tensor"), |b| {
        b.iter(|| {
            let out: Vec<Vec<Vec<Handle>>> = segments
                .chunks(per_launch)
                .map(|chunk| k.multi_fused(&program, &[], chunk))
                .collect();
            sync(k);
            out
        })
    });
    group.finish();
}

/// The router over `[tokens, experts]` logits: softmax, top-k and the chosen
/// probabilities, as the unfused plan runs them (max, exp(x - max), sum, divide,
/// top-k, gather: six kernels) and as two reduction-epilogue kernels (max with
/// exp(x - max); sum with the division, the top-k and the gather).
fn router(c: &mut Criterion) {
    let Some(k) = device() else { return };
    let mut group = c.benchmark_group("router");
    configure(&mut group);
    for (name, rows, experts, top_k) in [
        ("tiny", TINY_TOKENS, TINY_EXPERTS, TINY_TOP_K),
        ("paper", PAPER_TOKENS, PAPER_EXPERTS, PAPER_TOP_K),
    ] {
        if !fits(k, rows * experts, &format!("router/{name}")) {
            continue;
        }
        let shape = [rows, experts];
        let logits = upload(k, &shape, 51);
        let rows_view = |h: Handle| broadcast_cols(&View::contiguous(h, &[rows]));
        // exp(x - acc) and x / acc, reading x as input 0 and the row value as the
        // accumulator (fused) or as input 1 (separate).
        let row_program = |separate: bool, body: fn(&mut Program, usize, usize) -> usize| {
            let mut p = Program::new(2, 1 + usize::from(separate));
            let x = p.load(0);
            let acc = if separate {
                p.load(1)
            } else {
                p.push(FusedOp::Accumulator)
            };
            let out = body(&mut p, x, acc);
            p.finish(&[out])
        };
        let shifted_exp = |separate| {
            row_program(separate, |p, x, acc| {
                let d = p.binary(BinaryKind::Sub, x, acc);
                p.unary(UnaryKind::Exp, d)
            })
        };
        let divided =
            |separate| row_program(separate, |p, x, acc| p.binary(BinaryKind::Div, x, acc));
        group.throughput(Throughput::Elements(rows as u64));
        let (exp_apart, div_apart) = (shifted_exp(true), divided(true));
        group.bench_function(format!("{name}/{rows}x{experts}/k{top_k}/separate"), |b| {
            b.iter(|| {
                let max = k.reduce(ReduceKind::Max, &logits, &shape, &[1]);
                let e = k.fused(&exp_apart, &[logits.clone(), rows_view(max)], &shape, 0, 0);
                let e = View::contiguous(e[0].clone(), &shape);
                let sum = k.reduce(ReduceKind::Sum, &e, &shape, &[1]);
                let p = k.fused(&div_apart, &[e, rows_view(sum)], &shape, 0, 0);
                let top = k.top_k(&p[0], rows, experts, top_k);
                let probs = View::contiguous(p[0].clone(), &shape);
                let chosen = View::contiguous(top, &[rows, top_k]);
                let kept = k.gather(&probs, &chosen, 1, &[rows, top_k]);
                sync(k);
                kept
            })
        });
        let (exp_fused, div_fused) = (shifted_exp(false), divided(false));
        let with_top_k = RowTopK {
            output: 0,
            k: top_k,
        };
        group.bench_function(format!("{name}/{rows}x{experts}/k{top_k}/fused"), |b| {
            b.iter(|| {
                let none = RowTopK::default();
                let e = k.reduce_epilogue(
                    ReduceKind::Max,
                    &logits,
                    &exp_fused,
                    std::slice::from_ref(&logits),
                    &shape,
                    false,
                    none,
                    0,
                    0,
                );
                let e = View::contiguous(e[0].clone(), &shape);
                let out = k.reduce_epilogue(
                    ReduceKind::Sum,
                    &e,
                    &div_fused,
                    std::slice::from_ref(&e),
                    &shape,
                    false,
                    with_top_k,
                    0,
                    0,
                );
                sync(k);
                out
            })
        });
    }
    group.finish();
}

fn top_k(c: &mut Criterion, group_name: &str, cases: &[(&str, usize, usize, usize)]) {
    let Some(k) = device() else { return };
    let mut group = c.benchmark_group(group_name);
    configure(&mut group);
    for &(name, rows, n, kk) in cases {
        if !fits(k, rows * n, &format!("{group_name}/{name}")) {
            continue;
        }
        let scores = k.upload(&values(rows * n, 11));
        // Elements are rows ranked: tokens routed, or queries answered.
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_function(format!("{name}/{rows}x{n}/k{kk}"), |b| {
            b.iter(|| {
                let out = k.top_k(&scores, rows, n, kk);
                sync(k);
                out
            })
        });
    }
    group.finish();
}

fn top_k_routing(c: &mut Criterion) {
    top_k(
        c,
        "top_k_routing",
        &[
            ("tiny", TINY_TOKENS, TINY_EXPERTS, TINY_TOP_K),
            ("paper", PAPER_TOKENS, PAPER_EXPERTS, PAPER_TOP_K),
        ],
    );
}

fn retrieval_top_k(c: &mut Criterion) {
    top_k(
        c,
        "retrieval_top_k",
        &[
            ("1k", 1000, 1000, 10),
            // COCO-5K's size: every query against every stored item.
            ("5k", 5000, 5000, 10),
        ],
    );
}

criterion_group!(
    benches,
    fused_elementwise,
    reductions,
    matmul,
    matmul_forms,
    grouped_expert_gemm,
    adamw_update,
    adamw_as_compiled,
    adamw_all_parameters,
    router,
    top_k_routing,
    retrieval_top_k
);
criterion_main!(benches);
