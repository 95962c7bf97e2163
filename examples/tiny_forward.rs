//! A newcomer's tour of altc's front end: load the tiny Alt-MoE spec, lower it to IR,
//! initialise its parameters, feed a random batch and run every direction's loss
//! graph on the reference interpreter.
//!
//! Run with `cargo run --release --example tiny_forward`.

use altc_compiler::ir::DType;
use altc_compiler::lower::{lower_loaded, LowerOptions, Mode};
use altc_compiler::reference::{initial_parameters, run, EvalContext, Tensor, TensorMap};
use altc_compiler::{rng, spec};

fn main() -> anyhow::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/alt_moe_tiny.ron");
    let loaded = spec::load(&path)?;
    let options = LowerOptions {
        dtype: DType::F32,
        mode: Mode::Eval,
        ..LowerOptions::default()
    };
    let program = lower_loaded(&loaded, options)?;
    let params = initial_parameters(&program.params, DType::F32, 0);
    let batch = 8;

    // A random batch: uniform tokens, and padded modalities with lengths 1..=max.
    let mut inputs = TensorMap::new();
    for (mi, m) in program.modalities.iter().enumerate() {
        let n = batch * m.tokens * m.input_width;
        let tokens = (0..n)
            .map(|i| 2.0 * rng::uniform(1, 0, mi as u64, i as u64) - 1.0)
            .collect();
        inputs.insert(
            format!("{}.tokens", m.name),
            Tensor::from_f64(DType::F32, &[batch, m.tokens, m.input_width], tokens),
        );
        if m.padded {
            // Row i has (i mod tokens) + 1 real tokens.
            let lengths: Vec<usize> = (0..batch).map(|i| i % m.tokens + 1).collect();
            inputs.insert(
                format!("{}.mask", m.name),
                Tensor::prefix_mask(DType::F32, m.tokens, &lengths),
            );
        }
    }

    println!(
        "{}: {} trainable parameters",
        program.model,
        program.params.trainable_count()
    );
    for direction in &program.directions {
        let graph = program
            .graph(&direction.loss_graph)
            .expect("every direction has a loss graph");
        let outputs = run(graph, &inputs, &params, EvalContext::default())?;
        let terms: Vec<String> = outputs
            .iter()
            .map(|(name, t)| format!("{name} = {:.5}", t.scalar().unwrap_or(f64::NAN)))
            .collect();
        println!(
            "  {:<14} ({} nodes): {}",
            direction.name,
            graph.len(),
            terms.join(", ")
        );
    }
    Ok(())
}
