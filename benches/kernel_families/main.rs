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

mod adamw;
mod support;

use adamw::{adamw_all_parameters, adamw_as_compiled, adamw_update};
use altc_kernels::{
    BinaryKind, Candidate, EpilogueMatmul, ExpertGradStrategy, ExpertMatmul, FusedOp,
    MatmulStrategy, ReduceKind, RowTopK, UnaryKind, View,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cubecl::server::Handle;
use support::{
    bias_gelu_program, broadcast_cols, broadcast_rows, configure, device, fits, forced,
    plain_product, sync, upload, values, Device, Program, IMAGE_WIDTH, PAPER_BATCH, PAPER_EXPERTS,
    PAPER_HIDDEN, PAPER_SLICE_TOKENS, PAPER_TOKENS, PAPER_TOP_K, TEXT_WIDTH, TINY_EXPERTS,
    TINY_HIDDEN, TINY_TOKENS, TINY_TOP_K,
};

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
