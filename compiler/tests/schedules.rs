//! The schedule (which direction trains at each step), the learning-rate and
//! weight-decay schedules, and the joint training graph.

use altc_compiler::ir::DType;
use altc_compiler::lower::{lower, LowerOptions, Mode};
use altc_compiler::reference::{initial_parameters, run, EvalContext, Tensor, TensorMap};
use altc_compiler::spec::{self, DecaySchedule, LrSchedule, Schedule, Span};
use altc_compiler::train::{
    first_moment, learning_rate, second_moment, step_count, task_at, training_tasks, weight_decay,
    RunLength, LR_INPUT, WEIGHT_DECAY_INPUT,
};

#[test]
fn alternate_cycles_through_the_directions_n_steps_each() {
    let one = Schedule::Alternate { steps_per_task: 1 };
    let picks: Vec<usize> = (0..6).map(|s| task_at(&one, 2, s, 0)).collect();
    assert_eq!(picks, [0, 1, 0, 1, 0, 1]);
    let three = Schedule::Alternate { steps_per_task: 2 };
    let picks: Vec<usize> = (0..9).map(|s| task_at(&three, 3, s, 0)).collect();
    assert_eq!(picks, [0, 0, 1, 1, 2, 2, 0, 0, 1]);
}

#[test]
fn sample_draws_directions_with_their_probabilities_reproducibly() {
    let schedule = Schedule::Sample {
        probabilities: vec![0.7, 0.2, 0.1],
    };
    let n = 20_000;
    let mut counts = [0usize; 3];
    for step in 0..n {
        counts[task_at(&schedule, 3, step, 5)] += 1;
    }
    for (c, p) in counts.iter().zip([0.7, 0.2, 0.1]) {
        let freq = *c as f64 / n as f64;
        assert!(
            (freq - p).abs() < 0.01,
            "frequency {freq} for probability {p}"
        );
    }
    let again: Vec<usize> = (0..50).map(|s| task_at(&schedule, 3, s, 5)).collect();
    let same: Vec<usize> = (0..50).map(|s| task_at(&schedule, 3, s, 5)).collect();
    let other_seed: Vec<usize> = (0..50).map(|s| task_at(&schedule, 3, s, 6)).collect();
    assert_eq!(again, same);
    assert_ne!(again, other_seed);
}

#[test]
fn warmup_then_cosine_learning_rate_and_cosine_weight_decay() {
    let run = RunLength {
        total_steps: 110,
        steps_per_epoch: 100,
    };
    let lr = LrSchedule::WarmupCosine {
        start: 1e-3,
        peak: 1.5e-3,
        end: 5.5e-6,
        warmup: Span::Epochs(0.1),
    };
    // Warm-up: 10 steps (0.1 epoch of 100 steps), linear from start to peak.
    assert_eq!(learning_rate(&lr, 0, run), 1e-3);
    assert!((learning_rate(&lr, 5, run) - 1.25e-3).abs() < 1e-15);
    assert_eq!(learning_rate(&lr, 10, run), 1.5e-3);
    // Cosine: halfway through the remaining 100 steps is the midpoint of peak and final.
    assert!((learning_rate(&lr, 60, run) - (1.5e-3 + 5.5e-6) / 2.0).abs() < 1e-15);
    assert!((learning_rate(&lr, 110, run) - 5.5e-6).abs() < 1e-18);
    let wd = DecaySchedule::Cosine {
        start: 0.005,
        end: 0.2,
    };
    assert!((weight_decay(&wd, 0, run) - 0.005).abs() < 1e-15);
    assert!((weight_decay(&wd, 55, run) - 0.1025).abs() < 1e-12);
    assert!((weight_decay(&wd, 110, run) - 0.2).abs() < 1e-12);
}

#[test]
fn joint_schedule_trains_every_direction_in_one_graph() {
    let text = include_str!("../../models/alt_moe_tiny.ron")
        .replace("schedule: Alternate(steps_per_task: 1)", "schedule: Joint");
    let loaded = spec::parse(&text, "joint.ron").unwrap();
    let program = lower(
        &loaded.spec,
        LowerOptions {
            dtype: DType::F64,
            mode: Mode::Eval,
            ..LowerOptions::default()
        },
    )
    .unwrap();
    let tasks = training_tasks(&program).unwrap();
    assert_eq!(tasks.len(), 1);
    let task = &tasks[0];
    assert_eq!(task.directions, ["image_to_text", "text_to_image"]);
    // Every parameter is used by one direction or the other, so all of them update.
    assert_eq!(task.updates.len(), program.params.len());

    let mut state = initial_parameters(&program.params, DType::F64, 1);
    for p in program.params.iter() {
        let zeros = || Tensor::f64(&p.shape, vec![0.0; p.numel()]);
        state.insert(first_moment(&p.name), zeros());
        state.insert(second_moment(&p.name), zeros());
        state.insert(step_count(&p.name), Tensor::f64(&[], vec![0.0]));
    }
    let mut inputs = TensorMap::new();
    let b = 3;
    for m in &program.modalities {
        let n = b * m.tokens * m.input_width;
        let values = (0..n).map(|i| ((i * 31) % 17) as f64 / 8.0 - 1.0).collect();
        inputs.insert(
            format!("{}.tokens", m.name),
            Tensor::f64(&[b, m.tokens, m.input_width], values),
        );
        if m.padded {
            inputs.insert(
                format!("{}.mask", m.name),
                Tensor::f64(&[b, m.tokens], vec![1.0; b * m.tokens]),
            );
        }
    }
    inputs.insert(LR_INPUT.into(), Tensor::f64(&[], vec![1e-3]));
    inputs.insert(WEIGHT_DECAY_INPUT.into(), Tensor::f64(&[], vec![0.0]));
    let joint = run(&task.graph, &inputs, &state, EvalContext::default()).unwrap();
    // The joint loss is the sum of the directions' losses, each as its own graph computes it.
    let mut sum = 0.0;
    for d in &program.directions {
        let alone = run(
            program.graph(&d.loss_graph).unwrap(),
            &inputs,
            &state,
            EvalContext::default(),
        )
        .unwrap();
        let own = alone["loss"].scalar().unwrap();
        assert_eq!(joint[&format!("{}.loss", d.name)].scalar().unwrap(), own);
        sum += own;
    }
    assert!((joint["loss"].scalar().unwrap() - sum).abs() < 1e-12);
}
