//! `altc check`, `altc compile` (with `--explain`) and `altc inspect`: the front end
//! as a user drives it, and the fusion plan explained.

use crate::console::emit;
use crate::files;
use crate::model::lower_options;
use altc_compiler::artifact::Artifact;
use altc_compiler::ir::to_dot;
use altc_compiler::lower::{lower_loaded, LowerOptions};
use altc_compiler::pipeline::{training_steps, Optimised};
use altc_compiler::{spec, summary};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub(crate) fn check(path: &Path) -> Result<()> {
    let (text, file) = (
        std::fs::read_to_string(path).map_err(|source| spec::SpecError::Io {
            file: path.display().to_string(),
            source,
        })?,
        path.display().to_string(),
    );
    if spec::is_encoder_spec(&text) {
        return crate::encoders::check_encoder(path, &text);
    }
    let loaded = spec::parse(&text, &file)?;
    let program = lower_loaded(&loaded, LowerOptions::default())?;
    emit(&format!(
        "{}{}: ok\n",
        summary::program_summary(&program),
        path.display()
    ))
}

/// `explain`: print the fusion plan for a device binding that many buffers per kernel.
/// `json`: stdout is kept for a JSON report, so the summary line goes to stderr.
/// Lowers the spec at `path`; writes the artifact to `output` when there is one.
pub(crate) fn compile(
    path: &Path,
    output: Option<PathBuf>,
    explain: Option<usize>,
    json: bool,
) -> Result<()> {
    let (loaded, text) = spec::load_with_text(path)?;
    let program = lower_loaded(&loaded, LowerOptions::default())?;
    let artifact = Artifact::new(&path.display().to_string(), &text, program);
    if let Some(output) = &output {
        files::refuse_overwrite(output, &[("spec", path)])?;
        artifact.write(output)?;
    }
    let nodes: usize = artifact.program.graphs.iter().map(|g| g.len()).sum();
    if let Some(bindings) = explain {
        let baseline = lower_loaded(&loaded, lower_options(true))?;
        emit(&explain_fusion(&artifact.program, &baseline, bindings)?)?;
    }
    let written = match &output {
        Some(output) => format!("-> {}", output.display()),
        None => "(no artifact written: -o writes one)".into(),
    };
    let line = format!(
        "compiled {} {written} ({} graphs, {} nodes, {} trainable parameters)\n",
        path.display(),
        artifact.program.graphs.len(),
        nodes,
        summary::thousands(artifact.program.params.trainable_count())
    );
    if json {
        eprint!("{line}");
        Ok(())
    } else {
        emit(&line)
    }
}

pub(crate) fn inspect(path: &Path, dot: bool, only: &[String]) -> Result<()> {
    let artifact = Artifact::read(path)?;
    let program = &artifact.program;
    for name in only {
        if program.graph(name).is_none() {
            let known: Vec<&str> = program.graphs.iter().map(|g| g.name.as_str()).collect();
            bail!(
                "{}: no graph `{name}` (graphs: {})",
                path.display(),
                known.join(", ")
            );
        }
    }
    let selected: Vec<_> = program
        .graphs
        .iter()
        .filter(|g| only.is_empty() || only.contains(&g.name))
        .collect();
    if dot {
        return emit(&to_dot(&selected));
    }
    emit(&format!(
        "{}: {} v{}, written by altc {}, compiled from {}\n\n{}\n{}",
        path.display(),
        artifact.format,
        artifact.version,
        artifact.altc_version,
        artifact.source_path,
        summary::program_summary(program),
        summary::graph_summary(program)
    ))
}

/// The fusion plan of every training graph at the spec's batch size, for a device
/// binding `bindings` buffers per kernel, against the `--no-opt` baseline
/// (`baseline`: dense experts, run op by op).
fn explain_fusion(
    program: &altc_compiler::lower::Program,
    baseline: &altc_compiler::lower::Program,
    bindings: usize,
) -> Result<String> {
    use altc_compiler::fusion::cost::{plan_cost, plan_cost_and_peak};
    use altc_compiler::fusion::{plan, FusionPlan, KernelLimits};
    use std::fmt::Write as _;
    let tasks = training_steps(program, true)?;
    let baseline_tasks = training_steps(baseline, false)?;
    let symbols = std::collections::BTreeMap::from([(
        altc_compiler::lower::BATCH.to_string(),
        program.training.batch_size,
    )]);
    let mut out = String::new();
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    for (compiled, base) in tasks.iter().zip(&baseline_tasks) {
        let optimised = &compiled.task.graph;
        let Some(Optimised { report, seconds }) = &compiled.optimised else {
            unreachable!("the pipeline optimised every task");
        };
        let _ = writeln!(
            out,
            "{}: e-graph {} nodes in {} classes after {} iterations ({}), {:.2} s",
            optimised.name,
            report.egraph_nodes,
            report.egraph_classes,
            report.iterations,
            report.stop,
            seconds.as_secs_f64()
        );
        let fired: Vec<String> = report
            .fired
            .iter()
            .map(|(r, n)| format!("{r} x{n}"))
            .collect();
        let _ = writeln!(
            out,
            "  rewrites: {}",
            if fired.is_empty() {
                "none".to_string()
            } else {
                fired.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "  kernel nodes: {} before, {} after (shared subgraphs counted once)",
            report.kernels_before, report.kernels_after
        );
        let g = optimised;
        let fused = plan(g, KernelLimits::for_bindings(bindings));
        let ((a, peak), b) = (
            plan_cost_and_peak(g, &fused, &symbols),
            plan_cost(
                &base.task.graph,
                &FusionPlan::unfused(&base.task.graph),
                &symbols,
            ),
        );
        let _ = writeln!(
            out,
            "{} ({} nodes, batch {}, {bindings} bindings per kernel):",
            g.name,
            g.len(),
            program.training.batch_size
        );
        let _ = writeln!(
            out,
            "  {:<22}{:>12}{:>14}{:>8}",
            "", "optimised", "--no-opt", "ratio"
        );
        let _ = writeln!(
            out,
            "  {:<22}{:>12}{:>14}{:>8.2}",
            "kernel launches",
            a.launches,
            b.launches,
            a.launches as f64 / b.launches as f64
        );
        let _ = writeln!(
            out,
            "  {:<22}{:>9.1} MiB{:>11.1} MiB{:>8.2}",
            "bytes moved",
            mb(a.bytes_moved),
            mb(b.bytes_moved),
            a.bytes_moved as f64 / b.bytes_moved as f64
        );
        let _ = writeln!(
            out,
            "  {:<22}{:>9.1} MiB{:>11.1} MiB{:>8.2}",
            "peak intermediates",
            mb(a.peak_bytes),
            mb(b.peak_bytes),
            a.peak_bytes as f64 / b.peak_bytes as f64
        );
        let shown: Vec<String> = peak
            .live
            .iter()
            .take(4)
            .map(|&(id, bytes)| {
                let node = g.node(id);
                format!("{} {} KiB ({})", node.ty, bytes / 1024, node.origin)
            })
            .collect();
        let _ = writeln!(
            out,
            "  peak at step {} of {}, {} values alive; the largest: {}",
            peak.step + 1,
            fused.schedule.len(),
            peak.live.len(),
            shown.join("; ")
        );
        let mut kernels: std::collections::BTreeMap<&str, usize> = Default::default();
        for kernel in fused.schedule.iter().filter_map(|s| fused.kernel(g, s)) {
            *kernels.entry(kernel.family).or_default() += 1;
        }
        let kinds: Vec<String> = kernels.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        let _ = writeln!(out, "  kernels: {}", kinds.join(", "));
        let _ = writeln!(out, "  {} fusion groups:", fused.groups.len());
        for (i, group) in fused.groups.iter().enumerate() {
            let ops: Vec<String> = group
                .nodes
                .iter()
                .map(|&n| g.node(n).op.mnemonic())
                .collect();
            let _ = writeln!(
                out,
                "    #{i} {} [{} out]: {}",
                group.shape(g),
                group.outputs.len(),
                ops.join(", ")
            );
        }
        if !fused.multi_groups.is_empty() {
            let _ = writeln!(
                out,
                "  {} multi-tensor kernels (one program over several tensors):",
                fused.multi_groups.len()
            );
        }
        for batch in &fused.multi_groups {
            let groups: Vec<String> = batch.groups.iter().map(|g| format!("#{g}")).collect();
            let _ = writeln!(
                out,
                "    groups {} ({} tensors, {} shared inputs bound once)",
                groups.join(" "),
                batch.groups.len(),
                batch.shared.len()
            );
        }
        if !fused.multi_matmuls.is_empty() {
            let _ = writeln!(
                out,
                "  {} matmul kernels sharing an operand (bound once):",
                fused.multi_matmuls.len()
            );
        }
        for batch in &fused.multi_matmuls {
            let matmuls = batch.matmuls();
            let side = match batch.shared {
                altc_compiler::fusion::SharedOperand::Left => 0,
                altc_compiler::fusion::SharedOperand::Right => 1,
            };
            let shared = g.node(g.operands(matmuls[0])[side]);
            let others: Vec<String> = matmuls
                .iter()
                .map(|&m| g.node(g.operands(m)[1 - side]).op.mnemonic())
                .collect();
            let _ = writeln!(
                out,
                "    {} matmuls -> {} each, {} operand {} ({}) with: {}",
                matmuls.len(),
                g.node(matmuls[0]).ty,
                if side == 0 { "left" } else { "right" },
                shared.ty,
                shared.origin,
                others.join("; ")
            );
        }
    }
    Ok(out)
}
