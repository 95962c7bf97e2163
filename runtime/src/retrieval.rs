//! Cross-modal retrieval metrics: embed the held-out queries with a direction's query
//! graph and the held-out targets with the target's key graph, rank targets by cosine
//! similarity (both sides are normalised by the graphs) and report Recall@K.

use crate::backend::{Backend, BackendError};
use crate::data::Dataset;
use altc_compiler::lower::Program;
use altc_compiler::reference::EvalContext;

/// Recall@1/5/10 of one direction, as fractions.
#[derive(Clone, Debug, PartialEq)]
pub struct Recall {
    pub direction: String,
    pub queries: usize,
    pub at: [(usize, f64); 3],
}

/// Recall@1/5/10 for every direction with query and key graphs, on `pairs`.
pub fn recalls(
    program: &Program,
    backend: &mut dyn Backend,
    data: &Dataset,
    pairs: &[usize],
) -> Result<Vec<Recall>, BackendError> {
    let batch = data.batch(pairs, program.dtype);
    let mut out = Vec::new();
    for d in &program.directions {
        let (Some(query), Some(key)) = (&d.query_graph, &d.key_graph) else {
            continue;
        };
        let mut embed = |graph: &str| -> Result<(Vec<f64>, usize), BackendError> {
            let g = program.graph(graph).expect("direction graphs exist");
            let e = &backend.run(g, &batch, EvalContext::default())?["embedding"];
            Ok((e.to_f64(), e.shape[1]))
        };
        let (q, width) = embed(query)?;
        let (k, _) = embed(key)?;
        let n = pairs.len();
        let mut hits = [0usize; 3];
        let ks = [1, 5, 10];
        for i in 0..n {
            let score = |j: usize| -> f64 {
                (0..width)
                    .map(|c| q[i * width + c] * k[j * width + c])
                    .sum()
            };
            let own = score(i);
            // Rank of the true target: how many others score at least as high (ties
            // count against the query, so identical embeddings cannot look perfect).
            let rank = (0..n).filter(|&j| j != i && score(j) >= own).count();
            for (h, &kk) in hits.iter_mut().zip(&ks) {
                if rank < kk {
                    *h += 1;
                }
            }
        }
        out.push(Recall {
            direction: d.name.clone(),
            queries: n,
            at: [0, 1, 2].map(|i| (ks[i], hits[i] as f64 / n.max(1) as f64)),
        });
    }
    Ok(out)
}
