//! `altc compile --cuda-arch`: every kernel the model's plan can launch, compiled
//! for NVIDIA GPUs by NVRTC without a GPU, with each kernel's resources and the
//! plan's roofline bound on the target.

use crate::console::emit;
use altc_compiler::fusion::{plan, KernelLimits};
use altc_compiler::lower::Program;
use altc_compiler::spec::Precision;
use altc_cuda_aot::nvrtc::Nvrtc;
use altc_cuda_aot::roofline::{graph_bound, GraphBound};
use altc_cuda_aot::target::{CudaTarget, SHARED_WITHOUT_OPT_IN};
use altc_cuda_aot::{
    capture, check, every_tuning_choice, symbols, CheckReport, Failure, Workload, Worst,
};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt::Write as _;

/// What the check covers.
pub struct CudaCheck {
    pub targets: Vec<CudaTarget>,
    /// The optimised plan (what `altc run` launches), or one kernel per op.
    pub fused: bool,
    pub batch: usize,
    pub json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    model: &'a str,
    plan: &'a str,
    precision: &'a str,
    batch: usize,
    tuning_choices: usize,
    check: &'a CheckReport,
    refused: &'a [Failure],
    too_large: &'a [String],
    roofline: &'a [GraphBound],
}

pub fn cuda_check(program: &Program, options: &CudaCheck) -> Result<()> {
    let nvrtc = Nvrtc::load()?;
    let bf16 = program.training.precision == Precision::Bf16;
    let workload = Workload::of_program(program, options.fused, bf16, options.batch)
        .context("building the device graphs")?;
    let modes = every_tuning_choice();
    let names: Vec<String> = options.targets.iter().map(|t| t.name()).collect();
    eprintln!(
        "checking {} graphs ({}) for {} under {} tuning choices with NVRTC {}.{} ...",
        workload.graphs.len(),
        workload.name,
        names.join(", "),
        modes.len(),
        nvrtc.version.0,
        nvrtc.version.1
    );
    let started = std::time::Instant::now();
    let captured = capture(
        std::slice::from_ref(&workload),
        &options.targets,
        &modes,
        |what| eprintln!("  capturing {what}"),
    )?;
    eprintln!(
        "  compiling {} distinct kernels ({} launches) ...",
        captured.recording.kernels.len(),
        captured.recording.launches.len()
    );
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let report = check(&captured.recording, nvrtc, threads);
    eprintln!("  done in {:.1} s", started.elapsed().as_secs_f64());
    let limits = KernelLimits::for_bindings(1024);
    let mut bounds = Vec::new();
    for &target in &options.targets {
        for (graph, shapes) in &workload.graphs {
            let fusion = if options.fused {
                plan(graph, limits)
            } else {
                altc_compiler::fusion::FusionPlan::unfused(graph)
            };
            bounds.push(graph_bound(graph, &fusion, &symbols(graph, shapes), target));
        }
    }
    let failed = report.failed() || !captured.refused.is_empty();
    if options.json {
        let report = Report {
            model: &program.model,
            plan: if options.fused {
                "optimised"
            } else {
                "--no-opt"
            },
            precision: if bf16 { "bf16" } else { "f32" },
            batch: options.batch,
            tuning_choices: modes.len(),
            check: &report,
            refused: &captured.refused,
            too_large: &captured.too_large,
            roofline: &bounds,
        };
        emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        emit(&table(&report, &captured, &bounds, &names))?;
    }
    if failed {
        bail!(
            "{} kernels or launches fail for CUDA (listed above)",
            report.failures.len() + captured.refused.len()
        );
    }
    Ok(())
}

fn table(
    report: &CheckReport,
    captured: &altc_cuda_aot::Captured,
    bounds: &[GraphBound],
    targets: &[String],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", report.nvrtc);
    let _ = writeln!(
        out,
        "\n{:<7}{:<29}{:<22}{:>8}{:>6}{:>13}{:>8}{:>9}{:>7}  origin",
        "target", "family", "kernel", "threads", "regs", "spills st/ld", "smem", "dynamic", "occ."
    );
    let mut rows: Vec<_> = report.kernels.iter().collect();
    rows.sort_by(|a, b| {
        (&a.target, &a.family, &a.origin, &a.kernel)
            .cmp(&(&b.target, &b.family, &b.origin, &b.kernel))
    });
    for k in rows {
        let p = k.ptxas.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<7}{:<29}{:<22}{:>8}{:>6}{:>13}{:>8}{:>9}{:>7}  {}{}",
            k.target,
            k.family,
            k.kernel,
            k.threads,
            p.registers,
            format!("{}/{}", p.spill_stores, p.spill_loads),
            p.static_shared,
            k.dynamic_shared,
            k.occupancy
                .map_or("-".into(), |o| format!("{:.0}%", 100.0 * o)),
            k.origin,
            if k.ok { "" } else { "  FAILED" },
        );
    }
    let _ = writeln!(out);
    for target in targets {
        let of: Vec<_> = report
            .kernels
            .iter()
            .filter(|k| &k.target == target)
            .collect();
        let worst = Worst::of(of.iter().copied());
        let failures = report
            .failures
            .iter()
            .filter(|f| &f.target == target)
            .count()
            + captured
                .refused
                .iter()
                .filter(|f| &f.target == target)
                .count();
        let _ = writeln!(
            out,
            "{target}: {} kernels, {failures} failures; most registers {}, most spilled {} bytes, most shared memory {} static + {} dynamic bytes ({} above the {} KiB a kernel gets without opt-in)",
            of.len(),
            worst.registers,
            worst.spilled,
            worst.static_shared,
            worst.dynamic_shared,
            worst.above_opt_in,
            SHARED_WITHOUT_OPT_IN / 1024,
        );
    }
    for line in &captured.too_large {
        let _ = writeln!(out, "left out (does not fit): {line}");
    }
    for f in report.failures.iter().chain(&captured.refused) {
        let _ = writeln!(
            out,
            "FAILED {} {} ({}), node {}, {}, in {}: {}",
            f.target,
            f.kernel,
            f.family,
            f.node.map_or("-".into(), |n| n.to_string()),
            f.origin,
            f.workload,
            f.error
        );
    }
    let _ = writeln!(
        out,
        "\nroofline lower bounds (a bound from datasheet peaks, not a measurement: each kernel at least its matmul FLOPs at the dense bf16 peak or its bytes at HBM bandwidth):"
    );
    for b in bounds {
        let _ = writeln!(
            out,
            "  {} {:<22} {:>4} kernels  bound {:>10.1} us  ideal FLOPs/peak {:>9.1} us  ({:.1}x)  on {}",
            b.target,
            b.graph,
            b.kernels.len(),
            b.total_us,
            b.ideal_us,
            if b.ideal_us > 0.0 { b.total_us / b.ideal_us } else { f64::INFINITY },
            b.gpu
        );
        let families: Vec<String> = b
            .by_family()
            .iter()
            .take(4)
            .map(|(family, n, us)| {
                format!(
                    "{family} x{n} {:.0}%",
                    100.0 * us / b.total_us.max(f64::MIN_POSITIVE)
                )
            })
            .collect();
        let _ = writeln!(out, "      by family: {}", families.join(", "));
        let mut top: Vec<_> = b.kernels.iter().collect();
        top.sort_by(|x, y| y.bound_us.total_cmp(&x.bound_us));
        for k in top.iter().take(3) {
            let _ = writeln!(
                out,
                "      {:>8.1} us {:>4.0}%  {} ({}-bound): {}",
                k.bound_us,
                100.0 * k.bound_us / b.total_us.max(f64::MIN_POSITIVE),
                k.family,
                if k.memory_bound { "memory" } else { "compute" },
                k.label
            );
        }
    }
    out
}
