//! What `altc bench` and `altc tune` run: a model's device graphs with synthetic
//! inputs at a batch size.

use altc_compiler::ir::{Graph, Op};
use altc_compiler::lower::Program;
use altc_compiler::reference::{Tensor, TensorMap};
use altc_compiler::rng;
use altc_compiler::train::{LR_INPUT, WEIGHT_DECAY_INPUT};
use altc_runtime::workload::device_graphs;
use anyhow::{Context, Result};

/// What `altc bench` and `altc tune` run: every graph of `device_graphs` (training
/// steps optimised when `optimise`), each with synthetic inputs at `batch`.
pub(crate) fn timed_graphs(
    program: &Program,
    optimise: bool,
    batch: usize,
) -> Result<Vec<(Graph, TensorMap)>> {
    let graphs = device_graphs(program, optimise).context("building the device graphs")?;
    Ok(graphs
        .into_iter()
        .map(|graph| {
            let inputs = synthetic_inputs(&graph, batch);
            (graph, inputs)
        })
        .collect())
}

/// Inputs for one run at `batch`: uniform tokens in [-1, 1), full masks, and the
/// optimizer's scalars at typical values. Timing does not depend on the values.
fn synthetic_inputs(graph: &Graph, batch: usize) -> TensorMap {
    let mut inputs = TensorMap::new();
    for id in graph.node_ids() {
        let Op::Input { name, dtype, shape } = &graph.node(id).op else {
            continue;
        };
        let dims: Vec<usize> = shape
            .dims()
            .iter()
            .map(|d| d.fixed().unwrap_or(batch))
            .collect();
        let n: usize = dims.iter().product();
        let values: Vec<f64> = match name.as_str() {
            LR_INPUT => vec![1e-4],
            WEIGHT_DECAY_INPUT => vec![0.01],
            _ if name.ends_with(".mask") => vec![1.0; n],
            _ => (0..n as u64)
                .map(|i| 2.0 * rng::uniform(7, 0, id.index() as u64, i) - 1.0)
                .collect(),
        };
        inputs.insert(name.clone(), Tensor::from_f64(*dtype, &dims, values));
    }
    inputs
}
