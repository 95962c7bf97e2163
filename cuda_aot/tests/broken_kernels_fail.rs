//! The check catches what would fail on a GPU: a kernel whose CUDA does not compile
//! (an undeclared shared array, as cubecl-cpp once wrote after `terminate!()`) and a
//! launch past CUDA's grid limits. Needs NVRTC, as `every_kernel_compiles.rs`.

use altc_cuda_aot::capture::{take_recording, CaptureRuntime};
use altc_cuda_aot::target::CudaTarget;
use cubecl::prelude::*;

mod common;
use common::nvrtc;

/// Reverses 32 values through shared memory.
#[cube(launch_unchecked)]
fn reverse_through_shared(values: &mut Array<f32>) {
    let mut tile = SharedMemory::<f32>::new(32usize);
    tile[UNIT_POS as usize] = values[UNIT_POS as usize];
    sync_cube();
    values[UNIT_POS as usize] = tile[(31 - UNIT_POS) as usize];
}

/// Launches the kernel on the sm_90a capture device with `cubes_y` cubes in y.
fn launch(cubes_y: u32) {
    let client = CaptureRuntime::client_for(CudaTarget::SM90A);
    let values = client.empty(32 * 4);
    unsafe {
        reverse_through_shared::launch_unchecked::<CaptureRuntime>(
            &client,
            CubeCount::Static(1, cubes_y, 1),
            CubeDim::new_1d(32),
            ArrayArg::from_raw_parts(values, 32),
        );
    }
    client.flush().expect("the capture device flushes");
    cubecl::future::block_on(client.sync()).expect("the capture device syncs");
}

#[test]
fn an_undeclared_shared_array_and_a_too_tall_grid_fail_the_check() {
    let Some(nvrtc) = nvrtc() else { return };
    // One test, so the two captures do not share the recorder.
    take_recording();
    launch(1);
    let sound = take_recording();
    assert_eq!(sound.kernels.len(), 1);
    let report = altc_cuda_aot::check(&sound, nvrtc, 1);
    assert!(
        !report.failed(),
        "the sound kernel compiles: {:?}",
        report.failures
    );
    assert!(report.kernels[0].ptxas.as_ref().unwrap().barriers >= 1);

    // The same kernel with its shared array's declaration removed.
    let mut broken = sound;
    let source = broken.kernels[0].source.clone().unwrap();
    let declaration = source
        .lines()
        .find(|l| l.contains("shared_memory_") && l.contains('='))
        .expect("the shared array is declared");
    broken.kernels[0].source = Ok(source.replace(declaration, ""));
    let report = altc_cuda_aot::check(&broken, nvrtc, 1);
    assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
    let error = &report.failures[0].error;
    assert!(
        error.contains("is undefined"),
        "NVRTC's first error: {error}"
    );

    launch(70_000);
    let tall = take_recording();
    let report = altc_cuda_aot::check(&tall, nvrtc, 1);
    assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
    assert!(
        report.failures[0].error.contains("exceeds CUDA's"),
        "{}",
        report.failures[0].error
    );
}
