//! What no GPU could run is refused before anything launches, with the node named:
//! a buffer past 32-bit indexing. Runs on the capture device; needs no NVRTC.

use altc_compiler::ir::{
    BuildGraph, DType, Dim, Graph, GraphBuilder, Op, ReduceOp, Shape, UnaryOp,
};
use altc_compiler::reference::EvalContext;
use altc_cuda_aot::capture::{take_recording, CaptureRuntime};
use altc_cuda_aot::input_shapes;
use altc_cuda_aot::target::CudaTarget;
use altc_runtime::backend::BackendError;
use altc_runtime::device::DeviceBackend;

/// Row sums of `exp` of a `[B, 1, 65536]` input broadcast to `[B, rows, 65536]`,
/// run one kernel per op so that the `exp` is a buffer.
fn broadcast_exp(rows: usize) -> Graph {
    let mut g = Graph::new("huge");
    let x = GraphBuilder::new(&mut g, "inputs.x")
        .input(
            "x",
            DType::F32,
            Shape(vec![Dim::sym("B"), Dim::Fixed(1), Dim::Fixed(65_536)]),
        )
        .unwrap();
    let wide = Shape(vec![Dim::sym("B"), Dim::Fixed(rows), Dim::Fixed(65_536)]);
    let b = g
        .push(Op::BroadcastTo { shape: wide }, &[x], "spread")
        .unwrap();
    let e = g
        .push(Op::Unary(UnaryOp::Exp), &[b], "layers[3].exp")
        .unwrap();
    let sum = Op::reduce(ReduceOp::Sum, &[2], false);
    let y = g.push(sum, &[e], "layers[3].sum").unwrap();
    g.set_output("y", y).unwrap();
    g
}

#[test]
fn a_buffer_past_32_bit_indexing_is_refused_before_any_launch() {
    // 2^32 values: one past what a 32-bit index reaches.
    let graph = broadcast_exp(65_536);
    let client = CaptureRuntime::client_for(CudaTarget::SM90A);
    let mut backend = DeviceBackend::<CaptureRuntime>::new(client, "cuda", false).fused(false);
    let ctx = EvalContext { seed: 1, step: 0 };
    take_recording();
    let error = backend
        .run_uninitialised(&graph, &input_shapes(&graph, 1), ctx)
        .unwrap_err();
    match &error {
        BackendError::TooLarge {
            origin, elements, ..
        } => {
            assert_eq!(origin, "layers[3].exp");
            assert_eq!(*elements, 1 << 32);
        }
        other => panic!("not refused for its size: {other}"),
    }
    assert!(error.to_string().contains("use a smaller batch"), "{error}");
    assert!(take_recording().launches.is_empty(), "nothing launched");
    // Half as many rows fit, and launch.
    let half = broadcast_exp(32_768);
    backend
        .run_uninitialised(&half, &input_shapes(&half, 1), ctx)
        .expect("2^31 values are indexable");
    assert!(!take_recording().launches.is_empty());
}
