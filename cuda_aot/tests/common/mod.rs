//! What the CUDA check's tests share.

use altc_cuda_aot::nvrtc::Nvrtc;

/// NVRTC, or `None` with the reason printed; under CI (`CI=true`, which `.ci/run`
/// sets) a missing NVRTC fails the test instead.
pub fn nvrtc() -> Option<&'static Nvrtc> {
    match Nvrtc::load() {
        Ok(n) => Some(n),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and the CUDA check cannot run: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}
