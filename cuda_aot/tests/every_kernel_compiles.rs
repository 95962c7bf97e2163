//! Every kernel a shipped model can launch compiles for sm_80 and sm_90a: each model
//! in `models/`, optimised and `--no-opt`, every device graph, f32 and bf16 matmuls,
//! at the spec's batch and at 128 and 1,024, untuned and under every tuning candidate
//! forced in turn; launches are checked against CUDA's limits. Needs NVRTC (from
//! `scripts/setup.sh`); without it the test says why it skipped, and fails under CI.

use altc_compiler::lower::{lower_loaded, LowerOptions, MoeDispatch};
use altc_compiler::spec;
use altc_cuda_aot::nvrtc::Nvrtc;
use altc_cuda_aot::target::CudaTarget;
use altc_cuda_aot::{capture, check, every_tuning_choice, CheckReport, Workload};

/// NVRTC, or `None` with the reason printed; under CI a missing NVRTC fails.
fn nvrtc() -> Option<&'static Nvrtc> {
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

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn models() -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("models/")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .collect();
    paths.sort();
    paths
}

fn summary(report: &CheckReport) -> String {
    let worst =
        |f: fn(&altc_cuda_aot::KernelRow) -> u64| report.kernels.iter().map(f).max().unwrap_or(0);
    format!(
        "{} kernels, {} launches, {} failures; worst: {} registers, {} bytes spilled, {} bytes static + {} dynamic shared memory",
        report.kernels.len(),
        report.launches,
        report.failures.len(),
        worst(|k| k.ptxas.as_ref().map_or(0, |p| p.registers.into())),
        worst(|k| k.ptxas.as_ref().map_or(0, |p| (p.spill_stores + p.spill_loads).into())),
        worst(|k| k.ptxas.as_ref().map_or(0, |p| p.static_shared.into())),
        worst(|k| k.dynamic_shared as u64),
    )
}

#[test]
fn every_kernel_of_every_shipped_model_compiles_for_sm80_and_sm90a() {
    let Some(nvrtc) = nvrtc() else { return };
    let started = std::time::Instant::now();
    let modes = every_tuning_choice();
    let mut failures = Vec::new();
    let mut refused_baselines = 0;
    for path in models() {
        let loaded = spec::load(&path).expect("a shipped model parses");
        let mut workloads = Vec::new();
        for (fused, moe) in [(true, MoeDispatch::Sparse), (false, MoeDispatch::Dense)] {
            let options = LowerOptions {
                moe,
                ..LowerOptions::default()
            };
            let program = lower_loaded(&loaded, options).expect("a shipped model lowers");
            let mut batches = vec![program.training.batch_size, 128, 1024];
            batches.dedup();
            for batch in batches {
                for bf16 in [false, true] {
                    workloads.push(Workload::of_program(&program, fused, bf16, batch).unwrap());
                }
            }
        }
        let captured = capture(&workloads, &CudaTarget::ALL, &modes, |_| {}).unwrap();
        let report = check(&captured.recording, nvrtc, threads());
        println!("{}: {}", path.display(), summary(&report));
        for line in &captured.too_large {
            println!("  left out: {line}");
        }
        // The authors' dense form (`--no-opt`) at paper scale materialises tensors of
        // more than 2^32 elements (every expert's output for every token; a weight
        // gradient per batch element), which altc's 32-bit-indexed kernels refuse.
        // That is a known limit of the baseline, listed; anything else fails.
        for refusal in &captured.refused {
            println!(
                "  refused: {} {}: {}",
                refusal.target, refusal.workload, refusal.error
            );
        }
        let (baseline_refusals, other): (Vec<_>, Vec<_>) = captured
            .refused
            .into_iter()
            .partition(|r| r.workload.contains("--no-opt") && r.error.contains("32 bits"));
        refused_baselines += baseline_refusals.len();
        failures.extend(other);
        failures.extend(report.failures);
    }
    println!(
        "{} tuning choices; {refused_baselines} --no-opt graphs refused for 32-bit indexing; {} in {:.1} s",
        modes.len(),
        nvrtc.library,
        started.elapsed().as_secs_f64()
    );
    for f in &failures {
        println!(
            "FAILED {} {} ({}, node {:?}, {}) in {}: {}",
            f.target, f.kernel, f.family, f.node, f.origin, f.workload, f.error
        );
    }
    assert!(
        failures.is_empty(),
        "{} kernels or launches fail",
        failures.len()
    );
}
