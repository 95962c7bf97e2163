//! The reference interpreter on the tiny model's loss graphs: the op-by-op CPU
//! baseline every compiled path is measured against.

use altc_compiler::ir::DType;
use altc_compiler::lower::{lower, LowerOptions, Mode};
use altc_compiler::reference::{initial_parameters, run, EvalContext, Tensor, TensorMap};
use altc_compiler::spec;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn tiny_forward(c: &mut Criterion) {
    let loaded = spec::parse(
        include_str!("../models/alt_moe_tiny.ron"),
        "alt_moe_tiny.ron",
    )
    .expect("the tiny model is valid");
    let program = lower(
        &loaded.spec,
        LowerOptions {
            dtype: DType::F32,
            mode: Mode::Eval,
            ..LowerOptions::default()
        },
    )
    .expect("the tiny model lowers");
    let params = initial_parameters(&program.params, DType::F32, 0);
    let batch = 32;
    let mut inputs = TensorMap::new();
    for m in &program.modalities {
        let n = batch * m.tokens * m.input_width;
        let tokens = (0..n)
            .map(|i| ((i * 7919) % 1000) as f64 / 500.0 - 1.0)
            .collect();
        inputs.insert(
            format!("{}.tokens", m.name),
            Tensor::from_f64(DType::F32, &[batch, m.tokens, m.input_width], tokens),
        );
        if m.padded {
            inputs.insert(
                format!("{}.mask", m.name),
                Tensor::from_f64(DType::F32, &[batch, m.tokens], vec![1.0; batch * m.tokens]),
            );
        }
    }
    let mut group = c.benchmark_group("reference_forward");
    group.throughput(Throughput::Elements(batch as u64));
    for d in &program.directions {
        let graph = program.graph(&d.loss_graph).expect("loss graph");
        group.bench_function(format!("tiny/{}/batch{batch}", d.loss_graph), |b| {
            b.iter(|| run(graph, &inputs, &params, EvalContext::default()).expect("runs"))
        });
    }
    group.finish();
}

criterion_group!(benches, tiny_forward);
criterion_main!(benches);
