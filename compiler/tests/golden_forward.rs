//! The tiny Alt-MoE model's forward pass against an independent NumPy oracle.
//!
//! `scripts/golden_forward.py` implements the model straight from its math, in f64,
//! and writes `tests/golden/tiny_forward.safetensors`: the inputs (`input/…`), every
//! parameter (`param/…`) and the outputs of the loss, query and key graphs
//! (`output/<graph>/<output>`). Here altc lowers `models/alt_moe_tiny.ron`, binds the
//! same inputs and parameters, runs every graph on the reference interpreter and
//! compares. Regenerate the goldens with `python3 scripts/golden_forward.py` (see
//! `scripts/README.md`).

mod common;

use altc_compiler::ir::{DType, Graph, Op};
use altc_compiler::lower::{MoeDispatch, Program};
use altc_compiler::reference::{run, EvalContext, TensorMap};
use common::{read_golden, tiny_program, Array};
use std::collections::BTreeMap;

/// The golden file, split by prefix.
struct Golden {
    inputs: BTreeMap<String, Array>,
    params: BTreeMap<String, Array>,
    /// (graph, output) -> expected value.
    outputs: BTreeMap<(String, String), Array>,
}

fn load_golden() -> Golden {
    let mut golden = Golden {
        inputs: BTreeMap::new(),
        params: BTreeMap::new(),
        outputs: BTreeMap::new(),
    };
    for (name, array) in read_golden("tiny_forward.safetensors", "scripts/golden_forward.py") {
        if let Some(input) = name.strip_prefix("input/") {
            golden.inputs.insert(input.to_string(), array);
        } else if let Some(param) = name.strip_prefix("param/") {
            golden.params.insert(param.to_string(), array);
        } else if let Some(output) = name.strip_prefix("output/") {
            let (graph, output) = output
                .split_once('/')
                .unwrap_or_else(|| panic!("golden output `{name}` is not output/<graph>/<output>"));
            golden
                .outputs
                .insert((graph.to_string(), output.to_string()), array);
        } else {
            panic!("golden tensor `{name}` is neither input/, param/ nor output/");
        }
    }
    golden
}

/// The graph's inputs from the golden file, each in the dtype the graph declares
/// (so a mask declared as a float or a bool is bound either way).
fn bind_inputs(graph: &Graph, golden: &Golden) -> TensorMap {
    graph
        .inputs()
        .map(|(name, id)| {
            let Op::Input { dtype, .. } = &graph.node(id).op else {
                unreachable!("Graph::inputs yields Input nodes")
            };
            let array = golden.inputs.get(name).unwrap_or_else(|| {
                panic!(
                    "graph `{}` needs input `{name}`, which the golden file lacks",
                    graph.name
                )
            });
            (name.to_string(), array.to_tensor(*dtype))
        })
        .collect()
}

fn bind_params(program: &Program, golden: &Golden) -> TensorMap {
    golden
        .params
        .iter()
        .map(|(name, array)| (name.clone(), array.to_tensor(program.dtype)))
        .collect()
}

/// Runs every graph the golden file has outputs for and checks each output within
/// `|a - b| <= rel * max(1, |b|)`, reporting every mismatch at once.
fn assert_matches_oracle(dtype: DType, moe: MoeDispatch, rel: f64) {
    let golden = load_golden();
    let program = tiny_program(dtype, moe);
    let params = bind_params(&program, &golden);

    let mut by_graph: BTreeMap<&str, Vec<(&str, &Array)>> = BTreeMap::new();
    for ((graph, output), expected) in &golden.outputs {
        by_graph.entry(graph).or_default().push((output, expected));
    }
    assert!(!by_graph.is_empty(), "the golden file has no outputs");

    let mut failures = Vec::new();
    let mut compared = 0;
    let mut worst = 0.0f64; // largest |a - b| / max(1, |b|) seen
    for (graph_name, expected_outputs) in by_graph {
        let graph = program.graph(graph_name).unwrap_or_else(|| {
            let names: Vec<&str> = program.graphs.iter().map(|g| g.name.as_str()).collect();
            panic!("the program has no graph `{graph_name}` (it has {names:?})")
        });
        let inputs = bind_inputs(graph, &golden);
        let outputs = run(graph, &inputs, &params, EvalContext::default())
            .unwrap_or_else(|e| panic!("running `{graph_name}` in {dtype:?}: {e}"));
        for (output, expected) in expected_outputs {
            let Some(actual) = outputs.get(output) else {
                failures.push(format!(
                    "{graph_name}/{output}: the graph has no such output (it has {:?})",
                    outputs.keys().collect::<Vec<_>>()
                ));
                continue;
            };
            assert_eq!(
                actual.dtype(),
                dtype,
                "{graph_name}/{output} should be {dtype:?}"
            );
            if actual.shape != expected.shape {
                failures.push(format!(
                    "{graph_name}/{output}: shape {:?}, oracle {:?}",
                    actual.shape, expected.shape
                ));
                continue;
            }
            for (i, (a, b)) in actual.to_f64().iter().zip(&expected.values).enumerate() {
                compared += 1;
                let tolerance = rel * b.abs().max(1.0);
                worst = worst.max((a - b).abs() / b.abs().max(1.0));
                let within = (a - b).abs() <= tolerance; // false for NaN, as it should be
                if !within {
                    failures.push(format!(
                        "{graph_name}/{output}[{i}]: altc {a:.17e}, numpy {b:.17e} \
                         (|diff| {:.3e} > {tolerance:.1e})",
                        (a - b).abs()
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "alt_moe_tiny in {dtype:?} differs from the NumPy oracle in {} of {compared} values:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    println!("alt_moe_tiny in {dtype:?}: {compared} values within {rel:e}, worst {worst:.3e}");
}

#[test]
fn golden_parameters_are_exactly_the_program_parameters() {
    let golden = load_golden();
    let program = tiny_program(DType::F64, MoeDispatch::Sparse);
    let ours: BTreeMap<String, Vec<usize>> = program
        .params
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    let theirs: BTreeMap<String, Vec<usize>> = golden
        .params
        .iter()
        .map(|(name, a)| (name.clone(), a.shape.clone()))
        .collect();
    let only_program: Vec<_> = ours
        .iter()
        .filter(|(n, s)| theirs.get(*n) != Some(s))
        .collect();
    let only_golden: Vec<_> = theirs
        .iter()
        .filter(|(n, s)| ours.get(*n) != Some(s))
        .collect();
    assert!(
        only_program.is_empty() && only_golden.is_empty(),
        "parameters differ between the program and the golden file \
         (regenerate with `python3 scripts/golden_forward.py` after updating it):\n  \
         program only or other shape: {only_program:?}\n  \
         golden only or other shape: {only_golden:?}"
    );
    let golden_count: usize = golden.params.values().map(|a| a.values.len()).sum();
    assert_eq!(
        golden_count, 7380,
        "the tiny model has 7380 trainable parameters"
    );
    assert_eq!(program.params.trainable_count(), golden_count);
}

// The oracle computes the authors' dense experts; sparse dispatch must give the same
// function (only the order of the k-term sums differs).
#[test]
fn tiny_forward_matches_numpy_oracle_in_f64() {
    assert_matches_oracle(DType::F64, MoeDispatch::Dense, 1e-9);
    assert_matches_oracle(DType::F64, MoeDispatch::Sparse, 1e-9);
}

#[test]
fn tiny_forward_matches_numpy_oracle_in_f32() {
    assert_matches_oracle(DType::F32, MoeDispatch::Dense, 1e-4);
    assert_matches_oracle(DType::F32, MoeDispatch::Sparse, 1e-4);
}
