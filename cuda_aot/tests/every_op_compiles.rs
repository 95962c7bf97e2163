//! Every elementwise op the kernels know compiles for CUDA in every form a fused
//! program can take (each candidate of the fused elementwise family, vectors of four
//! among them), not only the ops today's models happen to use. Needs NVRTC.

use altc_cuda_aot::capture::{take_recording, CaptureRuntime};
use altc_cuda_aot::target::CudaTarget;
use altc_cuda_aot::{check, every_tuning_choice};
use altc_kernels::{BinaryKind, FusedOp, FusedProgram, Kernels, UnaryKind, View};

mod common;
use common::nvrtc;

const UNARY: [UnaryKind; 17] = [
    UnaryKind::Identity,
    UnaryKind::Neg,
    UnaryKind::Abs,
    UnaryKind::Exp,
    UnaryKind::Log,
    UnaryKind::Sqrt,
    UnaryKind::Rsqrt,
    UnaryKind::Recip,
    UnaryKind::Square,
    UnaryKind::Tanh,
    UnaryKind::Sigmoid,
    UnaryKind::Relu,
    UnaryKind::Erf,
    UnaryKind::Gelu,
    UnaryKind::Silu,
    UnaryKind::Trunc,
    UnaryKind::NonZero,
];

const BINARY: [BinaryKind; 13] = [
    BinaryKind::Add,
    BinaryKind::Sub,
    BinaryKind::Mul,
    BinaryKind::Div,
    BinaryKind::Max,
    BinaryKind::Min,
    BinaryKind::Pow,
    BinaryKind::Lt,
    BinaryKind::Le,
    BinaryKind::Gt,
    BinaryKind::Ge,
    BinaryKind::Eq,
    BinaryKind::Ne,
];

/// One program chaining every unary op, then every binary op against the second
/// input, then a select: contiguous inputs, so the vector form applies.
fn every_op() -> FusedProgram {
    let mut ops = vec![FusedOp::Load { input: 0 }, FusedOp::Load { input: 1 }];
    for op in UNARY {
        let a = ops.len() - 1;
        ops.push(FusedOp::Unary { op, a });
    }
    for op in BINARY {
        let a = ops.len() - 1;
        ops.push(FusedOp::Binary { op, a, b: 1 });
    }
    let last = ops.len() - 1;
    ops.push(FusedOp::Select {
        c: 0,
        a: last,
        b: 1,
    });
    FusedProgram {
        outputs: vec![ops.len() - 1],
        ops,
        rank: 1,
        inputs: 2,
        ..FusedProgram::default()
    }
}

#[test]
fn every_unary_and_binary_op_compiles_in_every_fused_form() {
    let Some(nvrtc) = nvrtc() else { return };
    take_recording();
    let n = 4096;
    for target in CudaTarget::ALL {
        let mut kernels = Kernels::new(CaptureRuntime::client_for(target));
        for mode in every_tuning_choice() {
            kernels.set_tuning(mode, "capture".into());
            let inputs: Vec<View> = (0..2)
                .map(|_| View::contiguous(kernels.buffer(n), &[n]))
                .collect();
            kernels.fused(&every_op(), &inputs, &[n], 1, 0);
        }
        kernels.sync();
    }
    let recording = take_recording();
    let vectorised = recording
        .kernels
        .iter()
        .filter(|k| k.source.as_ref().is_ok_and(|s| s.contains("float_4")))
        .count();
    assert!(vectorised > 0, "a vector-4 form was compiled");
    let report = check(&recording, nvrtc, 2);
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
}
