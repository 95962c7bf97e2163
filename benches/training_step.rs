//! One training step of the tiny model (batch 32, alternating directions) on each
//! backend present, optimised (sparse MoE dispatch, e-graph rewrites, fusion) with
//! tuned and with untuned kernels, and `--no-opt` (the authors' dense experts, op by
//! op), as `altc run` executes them.

use altc_compiler::lower::{lower, LowerOptions, MoeDispatch, Program};
use altc_compiler::pipeline::training_steps;
use altc_compiler::spec;
use altc_compiler::spec::Precision;
use altc_compiler::train::TrainingTask;
use altc_runtime::backend::{Backend, ReferenceBackend, TuningMode};
use altc_runtime::data::Dataset;
use altc_runtime::device::{open, DeviceChoice};
use altc_runtime::synth::{write_planted, SynthOptions};
use altc_runtime::training::{TrainOptions, Trainer};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn tiny_training_step(c: &mut Criterion) {
    let loaded = spec::parse(
        include_str!("../models/alt_moe_tiny.ron"),
        "alt_moe_tiny.ron",
    )
    .expect("valid");
    let program = lower(&loaded.spec, LowerOptions::default()).expect("lowers");
    let dense = lower(
        &loaded.spec,
        LowerOptions {
            moe: MoeDispatch::Dense,
            ..LowerOptions::default()
        },
    )
    .expect("lowers");
    let steps = |program, optimise| -> Vec<TrainingTask> {
        training_steps(program, optimise)
            .expect("training graphs")
            .into_iter()
            .map(|compiled| compiled.task)
            .collect()
    };
    let tasks = steps(&program, false);
    let baseline = steps(&dense, false);
    // What `altc run` executes by default: e-graph rewrites, then fusion on the device.
    let optimised = steps(&program, true);
    let dir = std::env::temp_dir().join(format!("altc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let data = dir.join("pairs.safetensors");
    write_planted(
        &data,
        &program,
        SynthOptions {
            pairs: 1024,
            ..SynthOptions::default()
        },
    )
    .expect("planted data");

    type Variant<'a> = (String, Box<dyn Backend>, &'a [TrainingTask], &'a Program);
    let mut backends: Vec<Variant> = vec![(
        "reference".into(),
        Box::new(ReferenceBackend::default()),
        &tasks,
        &program,
    )];
    for (name, choice) in [("wgpu", DeviceChoice::Wgpu), ("cuda", DeviceChoice::Cuda)] {
        for (variant, opt) in [("tuned", true), ("optimised", true), ("no-opt", false)] {
            match open(choice, Precision::F32, opt) {
                Ok(mut b) => {
                    if variant == "tuned" {
                        b.set_tuning(TuningMode::Tune);
                    }
                    backends.push((
                        format!("{name}-{variant}"),
                        b,
                        if opt { &optimised } else { &baseline },
                        if opt { &program } else { &dense },
                    ))
                }
                Err(e) => eprintln!("not benchmarking {name}: {e}"),
            }
        }
    }
    let mut group = c.benchmark_group("tiny_training_step");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    for (name, backend, tasks, program) in backends {
        let options = TrainOptions {
            steps: Some(1_000_000),
            schedule_steps: None,
            batch_size: 32,
            seed: 0,
            held_out: 64,
            checkpoint_every: 0,
            run_dir: dir.clone(),
            resume: false,
        };
        let mut trainer = Trainer::new(
            program,
            tasks,
            Dataset::load(&data, program).expect("data"),
            options,
            backend,
        )
        .expect("trainer");
        if name.ends_with("-tuned") {
            // Tune every kernel of both directions' steps before timing anything.
            for _ in 0..2 {
                trainer.step().expect("step");
            }
        }
        group.bench_function(format!("{name}/batch32"), |b| {
            b.iter(|| trainer.step().expect("step"))
        });
        if let Some(launches) = trainer.backend().kernel_launches() {
            eprintln!("{name}: {launches} kernel launches per step");
        }
    }
    group.finish();
}

criterion_group!(benches, tiny_training_step);
criterion_main!(benches);
