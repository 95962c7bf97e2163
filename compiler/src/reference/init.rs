//! Initial parameter values drawn from each parameter's `Init`, reproducibly: every
//! element's draw is the Philox stream keyed by (seed, parameter index, element), so
//! values do not depend on the order parameters are created in.

use super::Tensor;
use crate::ir::DType;
use crate::lower::{Init, ParamTable};
use crate::rng;
use std::collections::HashMap;

/// Stream ids for parameter initialisation sit far above dropout's.
const INIT_STREAM_BASE: u64 = 1 << 31;

pub fn initial_parameters(params: &ParamTable, dtype: DType, seed: u64) -> HashMap<String, Tensor> {
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let stream = INIT_STREAM_BASE + i as u64;
            let n = p.numel();
            let draw = |k: u64| rng::uniform(seed, 0, stream, k);
            let values: Vec<f64> = (0..n as u64)
                .map(|k| match p.init {
                    Init::Zeros => 0.0,
                    Init::Ones => 1.0,
                    Init::Constant(v) => v,
                    Init::Uniform { bound } => (2.0 * draw(k) - 1.0) * bound,
                    Init::Normal { std } => std * rng::normal(seed, 0, stream, k),
                })
                .collect();
            (p.name.clone(), Tensor::from_f64(dtype, &p.shape, values))
        })
        .collect()
}
