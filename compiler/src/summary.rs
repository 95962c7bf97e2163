//! Human-readable reports of a lowered program: what `altc check` and `altc inspect`
//! print.

use crate::lower::{ParamInfo, Program};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Digits grouped by thousands: `140,617,740`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn shape(p: &ParamInfo) -> String {
    let dims: Vec<String> = p.shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

fn settings<T: serde::Serialize>(value: &T) -> String {
    ron::ser::to_string(value).expect("settings are representable in RON")
}

/// The model report: modalities, directions, losses, schedule and optimiser, every
/// module with its parameter count and shapes, and the totals.
pub fn program_summary(p: &Program) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model `{}`: {} modalities, {} directions, batch size symbolic (B), {}",
        p.model,
        p.modalities.len(),
        p.directions.len(),
        p.dtype
    );
    let _ = writeln!(out, "\nmodalities");
    for m in &p.modalities {
        let tokens = if m.padded {
            format!("up to {} tokens (masked)", m.tokens)
        } else {
            format!("{} tokens", m.tokens)
        };
        let prefix = format!("encoders.{}.", m.name);
        let encoder_params: Vec<&ParamInfo> = p
            .params
            .iter()
            .filter(|q| q.name.starts_with(&prefix))
            .collect();
        let encoder = if encoder_params.is_empty() && m.input_width == m.width {
            "precomputed".to_string()
        } else {
            let count: usize = encoder_params.iter().map(|q| q.numel()).sum();
            let frozen = encoder_params.iter().any(|q| !q.trainable);
            format!(
                "graph encoder {} -> {}, {} params{}",
                m.input_width,
                m.width,
                thousands(count),
                if frozen { ", frozen" } else { "" }
            )
        };
        let _ = writeln!(
            out,
            "  {:<12} width {:<6} {:<28} {encoder}",
            m.name, m.width, tokens
        );
    }
    let _ = writeln!(out, "\ndirections");
    for d in &p.directions {
        let _ = writeln!(out, "  {:<16} {} -> {}", d.name, d.source, d.target);
    }
    let _ = writeln!(out, "\nlosses (weight)");
    for (name, weight) in &p.losses {
        let _ = writeln!(out, "  {name:<16} {weight}");
    }
    let _ = writeln!(out, "\nschedule   {}", settings(&p.schedule));
    let _ = writeln!(out, "optimizer  {}", settings(&p.optimizer));
    let _ = writeln!(out, "training   {}", settings(&p.training));

    let _ = writeln!(out, "\nmodules{:>49}  shapes", "params");
    let mut modules: Vec<(&str, Vec<&ParamInfo>)> = Vec::new();
    for q in p.params.iter() {
        match modules.iter_mut().find(|(m, _)| *m == q.module()) {
            Some((_, list)) => list.push(q),
            None => modules.push((q.module(), vec![q])),
        }
    }
    for (module, params) in &modules {
        let count: usize = params.iter().map(|q| q.numel()).sum();
        let shapes: Vec<String> = params
            .iter()
            .map(|q| {
                format!(
                    "{} {}",
                    q.name.rsplit('.').next().unwrap_or(&q.name),
                    shape(q)
                )
            })
            .collect();
        let frozen = if params.iter().all(|q| !q.trainable) {
            " (frozen)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {module:<42}{:>14}  {}{frozen}",
            thousands(count),
            shapes.join(", ")
        );
    }
    let trainable = p.params.trainable_count();
    let frozen = p.params.total_count() - trainable;
    let _ = writeln!(
        out,
        "\ntrainable parameters: {} ({} tensors; frozen: {})",
        thousands(trainable),
        p.params.iter().filter(|q| q.trainable).count(),
        thousands(frozen)
    );
    out
}

/// One line per graph: node count, inputs, outputs and the op mix.
pub fn graph_summary(p: &Program) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graphs");
    for g in &p.graphs {
        let inputs: Vec<String> = g
            .inputs()
            .map(|(name, id)| format!("{name} {}", g.node(id).ty))
            .collect();
        let outputs: Vec<String> = g
            .outputs()
            .iter()
            .map(|(name, id)| format!("{name} {}", g.node(*id).ty))
            .collect();
        let mut ops: BTreeMap<&'static str, usize> = BTreeMap::new();
        for id in g.node_ids() {
            *ops.entry(g.node(id).op.family()).or_default() += 1;
        }
        let mix: Vec<String> = ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "  {} ({} nodes)", g.name, g.len());
        let _ = writeln!(out, "    inputs:  {}", inputs.join(", "));
        let _ = writeln!(out, "    outputs: {}", outputs.join(", "));
        let _ = writeln!(out, "    ops:     {}", mix.join(", "));
    }
    out
}
