//! Graphviz rendering of IR graphs.

use super::{Graph, Op};
use petgraph::dot::{Config, Dot};
use std::fmt::Write;

/// Renders `graphs` as one Graphviz digraph with a cluster per graph. Inputs are
/// drawn as ellipses, parameters as boxes with a grey fill, outputs in bold.
pub fn to_dot(graphs: &[&Graph]) -> String {
    let mut out = String::from(
        "digraph altc {\n  rankdir=TB;\n  node [fontname=\"monospace\", fontsize=10];\n",
    );
    for (gi, graph) in graphs.iter().enumerate() {
        let dag = graph.dag();
        let body = format!(
            "{:?}",
            Dot::with_attr_getters(
                dag,
                &[
                    Config::GraphContentOnly,
                    Config::EdgeNoLabel,
                    Config::NodeNoLabel
                ],
                &|_, _| String::new(),
                &|_, (id, node)| {
                    let is_output = graph.outputs().iter().any(|(_, o)| *o == id);
                    let style = match node.op {
                        Op::Input { .. } => "shape=ellipse",
                        Op::Parameter { .. } => "shape=box, style=filled, fillcolor=\"#e8e8e8\"",
                        _ => "shape=box",
                    };
                    let outputs: Vec<&str> = graph
                        .outputs()
                        .iter()
                        .filter(|(_, o)| *o == id)
                        .map(|(n, _)| n.as_str())
                        .collect();
                    // `\n` is DOT's line break: only the names are escaped.
                    let extra = if is_output {
                        format!("\\n=> {}", escape(&outputs.join(", ")))
                    } else {
                        String::new()
                    };
                    format!(
                        "label=\"{}\\n{}{}\", {}{}",
                        escape(&node.op.mnemonic()),
                        node.ty,
                        extra,
                        style,
                        if is_output { ", penwidth=2" } else { "" }
                    )
                },
            )
        );
        let _ = writeln!(
            out,
            "  subgraph cluster_{gi} {{\n    label=\"{}\";",
            escape(&graph.name)
        );
        // Node ids must be unique across clusters: prefix them with the graph number.
        for line in body.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let _ = writeln!(out, "    {}", prefix_ids(line, gi));
        }
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// petgraph numbers nodes `0`, `1`, ...; rewrite a leading `N [` or `N -> M [` so that
/// graphs in one file do not share node ids.
fn prefix_ids(line: &str, graph: usize) -> String {
    let (head, rest) = line.split_at(line.find('[').unwrap_or(line.len()));
    let head = head
        .split("->")
        .map(|id| format!("g{graph}_{}", id.trim()))
        .collect::<Vec<_>>()
        .join(" -> ");
    format!("{head} {rest}")
}
