//! altc's kernels: cubecl kernels for every IR op family (fused elementwise chains,
//! reductions, matmul, the MoE route/dispatch/grouped GEMM, losses, the optimizer),
//! written once and generic over the cubecl runtime (`wgpu` in CI, `cuda` on a GPU).
//!
//! This crate knows nothing of RON specs or of the graph compiler: it receives op
//! lists and shapes and launches kernels. It pins `cubecl = "=0.10.0"` (see
//! `platform.md`); the kernels themselves arrive with the runtime issue, and until
//! then the crate only compiles the cubecl stack so the build and CI are real.
