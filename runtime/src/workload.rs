//! The graphs a model launches on a device: each training task's step (optimised,
//! or as lowered for the `--no-opt` baseline), the query and key embedding graphs,
//! and a ranking of queries against a store of embeddings. `altc bench`, `altc tune`
//! and the CUDA check all run this list.

use crate::retrieval::ranking_graph;
use altc_compiler::ir::Graph;
use altc_compiler::lower::Program;
use altc_compiler::pipeline::{training_steps, PipelineError};

/// Stored embeddings and neighbours per query of the ranking graph.
pub const RANKING_STORE: usize = 4096;
pub const RANKING_K: usize = 10;

/// Every graph `program` runs on a device, training steps first.
pub fn device_graphs(program: &Program, optimise: bool) -> Result<Vec<Graph>, PipelineError> {
    let mut graphs: Vec<Graph> = training_steps(program, optimise)?
        .into_iter()
        .map(|compiled| compiled.task.graph)
        .collect();
    let mut width = None;
    for info in &program.directions {
        for name in [&info.query_graph, &info.key_graph].into_iter().flatten() {
            let graph = program
                .graph(name)
                .expect("lowered with the program")
                .clone();
            if let Some(e) = graph.output(altc_compiler::outputs::EMBEDDING) {
                width = graph.node(e).ty.shape.dims().last().and_then(|d| d.fixed());
            }
            graphs.push(graph);
        }
    }
    // Ranking a batch of queries against a store, as `altc retrieve` does.
    if let Some(width) = width {
        graphs.push(ranking_graph(width, RANKING_STORE, RANKING_K).map_err(PipelineError::Build)?);
    }
    Ok(graphs)
}
