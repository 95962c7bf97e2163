//! Training on the reference backend as a user relies on it: the planted data is
//! learnable, resuming reproduces an uninterrupted run bit for bit, bad checkpoints
//! and datasets are named, and a NaN stops the run at the node that produced it.

use altc_compiler::ir::DType;
use altc_compiler::lower::{lower, LowerOptions, Program};
use altc_compiler::spec;
use altc_compiler::train::{training_tasks, TrainingTask};
use altc_runtime::backend::ReferenceBackend;
use altc_runtime::checkpoint::{Checkpoint, CheckpointError};
use altc_runtime::data::{write_f32_safetensors, DataError, Dataset};
use altc_runtime::synth::{write_planted, SynthOptions};
use altc_runtime::training::{
    checkpoint_path, state_shapes, StepReport, TrainError, TrainOptions, Trainer,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tiny() -> Program {
    let loaded = spec::parse(
        include_str!("../../models/alt_moe_tiny.ron"),
        "alt_moe_tiny.ron",
    )
    .unwrap();
    lower(&loaded.spec, LowerOptions::default()).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("altc-runtime-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn planted(dir: &Path, program: &Program, pairs: usize) -> PathBuf {
    let path = dir.join("pairs.safetensors");
    write_planted(
        &path,
        program,
        SynthOptions {
            pairs,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    path
}

fn options(run_dir: &Path, steps: usize) -> TrainOptions {
    TrainOptions {
        steps: Some(steps),
        schedule_steps: None,
        batch_size: 16,
        seed: 0,
        held_out: 64,
        checkpoint_every: 0,
        run_dir: run_dir.to_path_buf(),
        resume: false,
    }
}

fn train(
    program: &Program,
    tasks: &[TrainingTask],
    data: &Path,
    opts: TrainOptions,
    steps: usize,
) -> (Vec<StepReport>, Trainer<'static>) {
    // Leak the borrowed program and tasks: each test builds a handful, and the trainer
    // outliving this helper keeps the tests short.
    let program: &'static Program = Box::leak(Box::new(program.clone()));
    let tasks: &'static [TrainingTask] = Box::leak(tasks.to_vec().into_boxed_slice());
    let mut trainer = Trainer::new(
        program,
        tasks,
        Dataset::load(data, program).unwrap(),
        opts,
        Box::new(ReferenceBackend::default()),
    )
    .unwrap();
    let reports = (0..steps).map(|_| trainer.step().unwrap()).collect();
    (reports, trainer)
}

#[test]
fn tiny_model_learns_the_planted_pairs_in_both_directions() {
    let program = tiny();
    let tasks = training_tasks(&program).unwrap();
    let dir = scratch("learn");
    let data = planted(&dir, &program, 2048);
    let mut opts = options(&dir, 200);
    opts.batch_size = 32;
    opts.held_out = 256;
    let (reports, mut trainer) = train(&program, &tasks, &data, opts, 200);
    assert_eq!(reports[0].task, "image_to_text");
    assert_eq!(
        reports[1].task, "text_to_image",
        "the default schedule alternates"
    );
    let recalls = trainer.recalls().unwrap();
    assert_eq!(recalls.len(), 2);
    let chance = 1.0 / 256.0;
    for r in &recalls {
        let r1 = r.at[0].1;
        assert!(
            r1 > 10.0 * chance,
            "{}: R@1 {r1} is not far above chance {chance}",
            r.direction
        );
        assert!(r.at[2].1 >= r1, "R@10 >= R@1");
    }
}

#[test]
fn resuming_after_an_interruption_reproduces_every_later_loss_bit_for_bit() {
    let program = tiny();
    let tasks = training_tasks(&program).unwrap();
    let dir = scratch("resume");
    let data = planted(&dir, &program, 256);
    let (uninterrupted, _) = train(&program, &tasks, &data, options(&dir.join("a"), 8), 8);

    let mut first = options(&dir.join("b"), 8);
    first.checkpoint_every = 3;
    // "Kill" after step 4: the last checkpoint is the one written after step 3.
    let (before, killed) = train(&program, &tasks, &data, first.clone(), 4);
    drop(killed);
    let resumed_opts = TrainOptions {
        resume: true,
        ..first
    };
    let (after, resumed) = train(&program, &tasks, &data, resumed_opts, 5);
    assert_eq!(resumed.step_index(), 8);
    assert_eq!(&before[..3], &uninterrupted[..3]);
    for (a, b) in after.iter().zip(&uninterrupted[3..]) {
        assert_eq!(a.step, b.step);
        for ((na, va), (nb, vb)) in a.losses.iter().zip(&b.losses) {
            assert_eq!(na, nb);
            assert_eq!(
                va.to_bits(),
                vb.to_bits(),
                "step {} {na}: resumed {va} vs uninterrupted {vb}",
                a.step
            );
        }
        assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits());
    }
}

fn saved_checkpoint(dir: &Path) -> (Program, PathBuf) {
    let program = tiny();
    let tasks = training_tasks(&program).unwrap();
    let data = planted(dir, &program, 128);
    let (_, mut trainer) = train(&program, &tasks, &data, options(dir, 2), 2);
    trainer.save_checkpoint().unwrap();
    (program, checkpoint_path(dir))
}

fn load(program: &Program, path: &Path) -> Result<Checkpoint, CheckpointError> {
    Checkpoint::load(path, &program.model, &state_shapes(program), DType::F32)
}

#[test]
fn checkpoint_round_trips_and_bad_files_are_named() {
    let dir = scratch("ckpt");
    let (program, path) = saved_checkpoint(&dir);
    let ckpt = load(&program, &path).unwrap();
    assert_eq!(ckpt.step, 2);

    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let err = load(&program, &truncated)
        .err()
        .expect("a truncated checkpoint is refused");
    assert!(matches!(err, CheckpointError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains("truncated.safetensors"), "{err}");

    let foreign = dir.join("foreign.safetensors");
    write_f32_safetensors(
        &foreign,
        &[("w".into(), vec![2], vec![1.0, 2.0])],
        HashMap::new(),
    )
    .unwrap();
    let err = load(&program, &foreign)
        .err()
        .expect("a foreign file is refused");
    assert!(matches!(err, CheckpointError::Foreign { .. }), "{err}");

    // The same checkpoint read for a model whose input projection is wider.
    let mut wider = program.clone();
    let p = wider
        .params
        .iter_mut()
        .find(|p| p.name == "directions.image_to_text.input_projection.weight")
        .unwrap();
    p.shape = vec![16, 17];
    let err = load(&wider, &path)
        .err()
        .expect("a wrong-shape tensor is refused");
    let text = err.to_string();
    assert!(
        text.contains("`directions.image_to_text.input_projection.weight`")
            && text.contains("[16, 17]"),
        "{text}"
    );
}

#[test]
fn a_dataset_that_does_not_fit_the_model_names_the_tensor() {
    let program = tiny();
    let dir = scratch("data");
    let path = dir.join("narrow.safetensors");
    let tensors = vec![
        (
            "text.tokens".to_string(),
            vec![4, 6, 23],
            vec![0.0; 4 * 6 * 23],
        ),
        ("text.mask".to_string(), vec![4, 6], vec![1.0; 24]),
        (
            "image.tokens".to_string(),
            vec![4, 5, 12],
            vec![0.0; 4 * 5 * 12],
        ),
    ];
    write_f32_safetensors(&path, &tensors, HashMap::new()).unwrap();
    let err = Dataset::load(&path, &program)
        .err()
        .expect("a narrow dataset is refused");
    assert!(matches!(err, DataError::Shape { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("`text.tokens` is [4, 6, 23], but the model expects [4, 6, 24]"),
        "{err}"
    );

    let without_mask = vec![
        (
            "text.tokens".to_string(),
            vec![4, 6, 24],
            vec![0.0; 4 * 6 * 24],
        ),
        (
            "image.tokens".to_string(),
            vec![4, 5, 12],
            vec![0.0; 4 * 5 * 12],
        ),
    ];
    write_f32_safetensors(&path, &without_mask, HashMap::new()).unwrap();
    let err = Dataset::load(&path, &program)
        .err()
        .expect("a dataset without masks is refused");
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("needs tensor `text.mask` ([N, 6]) for modality `text`"),
        "{err}"
    );
}

#[test]
fn a_nan_stops_the_run_at_its_node_and_keeps_the_last_good_checkpoint() {
    let program = tiny();
    let tasks = training_tasks(&program).unwrap();
    let dir = scratch("nan");
    let data = planted(&dir, &program, 128);
    let mut opts = options(&dir, 50);
    opts.checkpoint_every = 1;
    let (_, mut trainer) = train(&program, &tasks, &data, opts.clone(), 1);
    let good = std::fs::read(checkpoint_path(&dir)).unwrap();

    // Poison the image tokens in a copy of the data with the largest finite value
    // (NaN itself is refused when the data loads): the image encoder overflows.
    let bad_data = dir.join("poisoned.safetensors");
    let clean = Dataset::load(&data, &program).unwrap();
    let all: Vec<usize> = (0..clean.pairs).collect();
    let batch = clean.batch(&all, DType::F32);
    let mut tensors = Vec::new();
    for name in ["text.tokens", "text.mask", "image.tokens"] {
        let t = &batch[name];
        let mut v: Vec<f32> = t.to_f64().iter().map(|&x| x as f32).collect();
        if name == "image.tokens" {
            v.iter_mut().for_each(|x| *x = f32::MAX);
        }
        tensors.push((name.to_string(), t.shape.clone(), v));
    }
    write_f32_safetensors(&bad_data, &tensors, HashMap::new()).unwrap();
    let program_ref: &'static Program = Box::leak(Box::new(program.clone()));
    let tasks_ref: &'static [TrainingTask] = Box::leak(tasks.clone().into_boxed_slice());
    // A fresh run on the poisoned data stops at its first step, before any
    // checkpoint: it says so instead of promising one.
    let on_poisoned_data = |options: TrainOptions| {
        let data = Dataset::load(&bad_data, program_ref).unwrap();
        let reference = Box::new(ReferenceBackend::default());
        Trainer::new(program_ref, tasks_ref, data, options, reference).unwrap()
    };
    let fresh = TrainOptions {
        run_dir: dir.join("fresh"),
        ..opts.clone()
    };
    let err = on_poisoned_data(fresh)
        .step()
        .expect_err("NaN data must stop the run");
    assert!(
        err.to_string()
            .contains("no checkpoint was written before it"),
        "{err}"
    );
    let resumed = TrainOptions {
        resume: true,
        ..opts
    };
    let err = on_poisoned_data(resumed)
        .step()
        .expect_err("NaN data must stop the run");
    let TrainError::NonFinite(bad) = &err else {
        panic!("expected a non-finite error, got {err}");
    };
    let (step, task, origin) = (&bad.step, &bad.task, &bad.origin);
    assert_eq!(*step, 1);
    assert_eq!(task, "text_to_image");
    assert!(
        origin.starts_with("modalities[1]"),
        "the image encoder is where NaN first appears: {err}"
    );
    assert!(
        err.to_string().contains("the checkpoint of step 1 is kept"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(checkpoint_path(&dir)).unwrap(),
        good,
        "the good checkpoint was overwritten"
    );
    assert!(trainer.step().is_ok(), "the clean run goes on");
}
