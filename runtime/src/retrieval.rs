//! Cross-modal retrieval metrics: embed the held-out queries with a direction's query
//! graph and the held-out targets with the target's key graph, rank targets by cosine
//! similarity (both sides are normalised by the graphs) and report Recall@K.

use crate::backend::{Backend, BackendError};
use crate::data::Dataset;
use altc_compiler::lower::Program;
use altc_compiler::outputs::EMBEDDING;
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
    let mut out = Vec::new();
    for d in &program.directions {
        let (Some(query), Some(key)) = (&d.query_graph, &d.key_graph) else {
            continue;
        };
        let (q, width) = embed(program, backend, data, pairs, query)?;
        let (k, _) = embed(program, backend, data, pairs, key)?;
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

/// Pairs embedded per graph run.
const EMBED_CHUNK: usize = 512;

/// Runs `graph` (a query or key graph) over `pairs` in chunks and returns the
/// embeddings row by row, `[pairs.len(), width]`, and the width.
pub fn embed(
    program: &Program,
    backend: &mut dyn Backend,
    data: &Dataset,
    pairs: &[usize],
    graph: &str,
) -> Result<(Vec<f64>, usize), BackendError> {
    let g = program
        .graph(graph)
        .ok_or_else(|| BackendError::Unavailable(format!("the model has no graph `{graph}`")))?;
    let mut out = Vec::new();
    let mut width = 0;
    for chunk in pairs.chunks(EMBED_CHUNK) {
        let batch = data.batch(chunk, program.dtype);
        let e = &backend.run(g, &batch, EvalContext::default())?[EMBEDDING];
        width = e.shape[1];
        let values = e.to_f64();
        // A NaN compares false with everything, so it would rank as a perfect match.
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(BackendError::NonFiniteEmbedding {
                graph: graph.into(),
                pair: chunk[i / width.max(1)],
            });
        }
        out.extend(values);
    }
    Ok((out, width))
}

/// The `k` stored rows most similar to each query (dot products of normalised
/// embeddings, i.e. cosine similarity), best first, computed on `backend` by an IR
/// graph: a matmul against the transposed store, then top-k.
pub fn rank(
    backend: &mut dyn Backend,
    queries: &[f32],
    store: &[f32],
    width: usize,
    k: usize,
) -> Result<Vec<Vec<usize>>, BackendError> {
    use altc_compiler::reference::{Tensor, TensorMap};
    let (q, n) = (queries.len() / width, store.len() / width);
    let k = k.min(n);
    let g = ranking_graph(width, n, k)
        .map_err(|e| BackendError::Unavailable(format!("building the ranking graph: {e}")))?;
    let mut inputs = TensorMap::new();
    inputs.insert("queries".into(), Tensor::f32(&[q, width], queries.to_vec()));
    inputs.insert("store".into(), Tensor::f32(&[n, width], store.to_vec()));
    let top = &backend.run(&g, &inputs, EvalContext::default())?["top"];
    Ok(top
        .to_f64()
        .chunks(k.max(1))
        .map(|row| row.iter().map(|&i| i as usize).collect())
        .collect())
}

/// The ranking graph: `queries` (`[Q, width]`, any Q) against a `store` of `rows`
/// embeddings, output `top` (`[Q, k]` row indices, best first).
pub fn ranking_graph(
    width: usize,
    rows: usize,
    k: usize,
) -> Result<altc_compiler::ir::Graph, altc_compiler::ir::GraphError> {
    use altc_compiler::ir::{BuildGraph, DType, Dim, Graph, GraphBuilder, Op, Shape};
    let mut g = Graph::new("retrieve");
    let mut b = GraphBuilder::new(&mut g, "retrieve");
    let queries = b.input(
        "queries",
        DType::F32,
        Shape(vec![Dim::sym("Q"), Dim::Fixed(width)]),
    )?;
    // The store's size is fixed for the graph: top-k needs a known extent.
    let store = b.input("store", DType::F32, [rows, width].into_iter().collect())?;
    let scores = b.matmul(queries, store, false, true)?;
    let top = b.push(Op::TopK { k }, &[scores])?;
    g.set_output("top", top)?;
    Ok(g)
}
