//! Roofline lower bounds of a plan on a CUDA target: each kernel takes at least its
//! matmul FLOPs at the target's dense bf16 peak or its bytes at the HBM bandwidth,
//! whichever is longer. Peaks are datasheet constants of the target's reference GPU:
//! the figures are bounds, never measurements.

use crate::target::CudaTarget;
use altc_compiler::fusion::cost::step_work;
use altc_compiler::fusion::FusionPlan;
use altc_compiler::ir::Graph;
use serde::Serialize;
use std::collections::BTreeMap;

/// One kernel's bound.
#[derive(Clone, Debug, Serialize)]
pub struct KernelBound {
    pub family: String,
    pub label: String,
    pub origin: String,
    pub flops: u64,
    pub bytes: u64,
    pub bound_us: f64,
    /// Whether the bytes (not the FLOPs) set the bound.
    pub memory_bound: bool,
}

/// The bound of one graph's plan.
#[derive(Clone, Debug, Serialize)]
pub struct GraphBound {
    pub graph: String,
    pub target: String,
    pub gpu: String,
    pub kernels: Vec<KernelBound>,
    /// The sum of the kernels' bounds.
    pub total_us: f64,
    /// The graph's FLOPs at peak, as if every byte were free.
    pub ideal_us: f64,
    pub flops: u64,
    pub bytes: u64,
}

impl GraphBound {
    /// The bound by kernel family, largest first: (family, kernels, microseconds).
    pub fn by_family(&self) -> Vec<(String, usize, f64)> {
        let mut families: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
        for k in &self.kernels {
            let entry = families.entry(&k.family).or_default();
            entry.0 += 1;
            entry.1 += k.bound_us;
        }
        let mut families: Vec<(String, usize, f64)> = families
            .into_iter()
            .map(|(f, (n, us))| (f.to_string(), n, us))
            .collect();
        families.sort_by(|a, b| b.2.total_cmp(&a.2));
        families
    }
}

/// The bound of `graph` under `plan` on `target`, symbols bound to `symbols`.
pub fn graph_bound(
    graph: &Graph,
    plan: &FusionPlan,
    symbols: &BTreeMap<String, usize>,
    target: CudaTarget,
) -> GraphBound {
    let hw = target.hardware();
    let flop_rate = hw.bf16_dense_tflops * 1e12;
    let byte_rate = hw.hbm_gb_per_s * 1e9;
    let kernels: Vec<KernelBound> = step_work(graph, plan, symbols)
        .into_iter()
        .map(|work| {
            let kernel = plan
                .kernel(graph, &plan.schedule[work.step])
                .expect("a launching step has a kernel");
            let compute = work.flops as f64 / flop_rate;
            let memory = work.bytes as f64 / byte_rate;
            KernelBound {
                family: kernel.family.to_string(),
                label: kernel.label,
                origin: kernel.origin,
                flops: work.flops,
                bytes: work.bytes,
                bound_us: compute.max(memory) * 1e6,
                memory_bound: memory >= compute,
            }
        })
        .collect();
    let flops: u64 = kernels.iter().map(|k| k.flops).sum();
    GraphBound {
        graph: graph.name.clone(),
        target: target.name(),
        gpu: hw.gpu.to_string(),
        total_us: kernels.iter().map(|k| k.bound_us).sum(),
        ideal_us: flops as f64 / flop_rate * 1e6,
        flops,
        bytes: kernels.iter().map(|k| k.bytes).sum(),
        kernels,
    }
}
