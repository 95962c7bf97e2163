//! The compiler's pipeline in one place: a lowered program's training tasks, each
//! task's graph optimised by the e-graph (or left as lowered, the `--no-opt`
//! baseline). `altc run`, `bench`, `tune`, `compile --explain`, the CUDA check and
//! the benchmarks all take their training graphs from here; a device plans fusion
//! on what it returns.

use crate::ir::GraphError;
use crate::lower::Program;
use crate::optimize::{optimize, Limits, OptimizeReport};
use crate::train::{training_tasks, TrainingTask};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PipelineError {
    #[error("building the training graphs: {0}")]
    Build(#[source] GraphError),
    #[error("optimising {graph}: {source}")]
    Optimise {
        graph: String,
        #[source]
        source: GraphError,
    },
}

/// A training task as it leaves the compiler, with what the optimiser did to it.
pub struct CompiledTask {
    pub task: TrainingTask,
    /// `None` for the `--no-opt` baseline.
    pub optimised: Option<Optimised>,
}

/// What optimising one task's graph did, and how long it took.
pub struct Optimised {
    pub report: OptimizeReport,
    pub seconds: Duration,
}

/// The program's training tasks, their graphs optimised when `optimise`.
pub fn training_steps(
    program: &Program,
    optimise: bool,
) -> Result<Vec<CompiledTask>, PipelineError> {
    let tasks = training_tasks(program).map_err(PipelineError::Build)?;
    tasks
        .into_iter()
        .map(|mut task| {
            if !optimise {
                return Ok(CompiledTask {
                    task,
                    optimised: None,
                });
            }
            let started = Instant::now();
            let (graph, report) = optimize(&task.graph, Limits::default()).map_err(|source| {
                PipelineError::Optimise {
                    graph: task.graph.name.clone(),
                    source,
                }
            })?;
            task.graph = graph;
            Ok(CompiledTask {
                task,
                optimised: Some(Optimised {
                    report,
                    seconds: started.elapsed(),
                }),
            })
        })
        .collect()
}
