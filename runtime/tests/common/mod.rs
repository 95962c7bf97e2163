//! Helpers the device test files share: the devices a body runs on, random inputs
//! and graph leaves.
#![allow(dead_code)] // each suite uses its own part of these helpers

mod minilm;
#[allow(unused_imports)] // only the text-encoder suites look for MiniLM
pub use minilm::{minilm, Golden};

/// The MiniLM golden set (`runtime/tests/golden`).
pub fn golden() -> Golden {
    minilm::golden_in(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"))
}

use altc_compiler::ir::{BuildGraph, DType, Graph, GraphBuilder, NodeId};
use altc_compiler::reference::{Tensor, TensorMap};
use altc_compiler::rng;
use altc_compiler::spec::Precision;
use altc_runtime::backend::Backend;
use altc_runtime::device::{open, DeviceChoice};
use std::sync::Mutex;

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
    GraphBuilder::new(g, "test")
        .input(name, DType::F32, shape.iter().copied().collect())
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

/// The device kinds every device suite runs on.
const DEVICES: [DeviceChoice; 2] = [DeviceChoice::Wgpu, DeviceChoice::Cuda];

/// Opens `choice`, running fusion groups as one kernel each when `fuse`. A device
/// that is not here is skipped with the reason printed, unless `ALTC_TEST_DEVICE`
/// names it (`scripts/gpu_checks.sh` sets `cuda`): then its absence fails the test.
pub fn open_present(choice: DeviceChoice, fuse: bool) -> Option<Box<dyn Backend>> {
    let required = std::env::var("ALTC_TEST_DEVICE")
        .is_ok_and(|d| d.eq_ignore_ascii_case(&format!("{choice:?}")));
    match open(choice, Precision::F32, fuse) {
        Ok(device) => Some(device),
        Err(e) if required => panic!("ALTC_TEST_DEVICE asks for {choice:?}: {e}"),
        Err(e) => {
            eprintln!("skipping {choice:?}: {e}");
            None
        }
    }
}

/// Every device present, freshly opened (see `open_present`).
pub fn each_device(fuse: bool) -> Vec<(DeviceChoice, Box<dyn Backend>)> {
    DEVICES
        .into_iter()
        .filter_map(|choice| open_present(choice, fuse).map(|d| (choice, d)))
        .collect()
}

/// One fused device of each kind for the whole test file (opening one per test is
/// slow on lavapipe); `None` inside means it is not here.
static OPENED: [Mutex<Slot>; 2] = [Mutex::new(None), Mutex::new(None)];

/// A device kind not opened yet (`None`), or opened: present or not.
type Slot = Option<Option<Box<dyn Backend>>>;

/// Runs `body` on every device present, each opened once per test file.
pub fn on_each_device(mut body: impl FnMut(&mut dyn Backend)) {
    for (slot, choice) in OPENED.iter().zip(DEVICES) {
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(device) = guard.get_or_insert_with(|| open_present(choice, true)) {
            body(device.as_mut());
        }
    }
}
