//! Helpers the device test files share: random inputs and graph leaves.

use altc_compiler::ir::{DType, Graph, NodeId, Op};
use altc_compiler::reference::{Tensor, TensorMap};
use altc_compiler::rng;

/// Values uniform in [-1, 1) for `shape`, from the rng stream `(salt, stream)`.
pub fn uniform(shape: &[usize], salt: u64, stream: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::f32(
        shape,
        (0..n)
            .map(|i| (2.0 * rng::uniform(salt, 0, stream, i as u64) - 1.0) as f32)
            .collect(),
    )
}

/// An f32 graph input `name` of `shape`.
pub fn input(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    g.push(
        Op::Input {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.iter().copied().collect(),
        },
        &[],
        "test",
    )
    .unwrap()
}

/// An f32 input `name` of `shape`, fed `uniform(shape, salt, stream)`.
pub fn random_input(
    g: &mut Graph,
    feeds: &mut TensorMap,
    name: &str,
    shape: &[usize],
    (salt, stream): (u64, u64),
) -> NodeId {
    feeds.insert(name.to_string(), uniform(shape, salt, stream));
    input(g, name, shape)
}
