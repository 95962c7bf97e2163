//! The planted paired dataset: retrieval with a known ground truth that is not
//! trivially linear.
//!
//! Each pair `i` has shared latent factors `s_i ~ N(0, I_k)`. Every modality `m` has
//! its own fixed random two-layer map `f_m` (widths `k -> hidden -> d_m`, tanh in
//! between) and a learned-looking position embedding per token. Token `j` of pair `i`
//! is `f_m(s_i + tau * e_ij + p_mj) + sigma * n_ij` with per-token variation
//! `e_ij ~ N(0, I_k)` and noise `n_ij ~ N(0, I)`. Padded modalities draw a length per
//! pair uniformly from `ceil(max/2)..=max` and fill padding with pure noise, so a model
//! that ignores the mask is penalised. Pair `i`'s two sides share only `s_i`, so
//! matching them means inverting two different nonlinear maps.

use crate::data::{write_f32_safetensors, DataError};
use crate::host::{host_memory_bytes, GIB};
use altc_compiler::lower::Program;
use altc_compiler::rng;
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Copy, Debug)]
pub struct SynthOptions {
    pub pairs: usize,
    pub seed: u64,
    /// `k`, the number of shared latent factors.
    pub latent: usize,
    /// `tau`, the scale of per-token variation of the latents.
    pub token_variation: f64,
    /// `sigma`, the scale of the additive noise.
    pub noise: f64,
    /// Hidden width of each modality's random map.
    pub hidden: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            pairs: 4096,
            seed: 0,
            latent: 8,
            token_variation: 0.5,
            noise: 0.1,
            hidden: 32,
        }
    }
}

/// Draws from independent counter-based streams: `(seed, stream, index)`.
struct Draws {
    seed: u64,
}

impl Draws {
    fn uniform(&self, stream: u64, index: u64) -> f64 {
        rng::uniform(self.seed, stream >> 32, stream & 0xffff_ffff, index)
    }

    fn normal(&self, stream: u64, index: u64) -> f64 {
        rng::normal(self.seed, stream >> 32, stream & 0xffff_ffff, index)
    }

    fn normals(&self, stream: u64, n: usize, scale: f64) -> Vec<f64> {
        (0..n as u64)
            .map(|i| scale * self.normal(stream, i))
            .collect()
    }
}

/// Writes the planted dataset for `program`'s modalities to `path`.
pub fn write_planted(path: &Path, program: &Program, o: SynthOptions) -> Result<(), DataError> {
    let draws = Draws { seed: o.seed };
    let (n, k, h) = (o.pairs, o.latent, o.hidden);
    // The tensors in f32, their serialised copy, and the latents in f64.
    let per_pair: u64 = program
        .modalities
        .iter()
        .map(|m| (m.tokens * (m.input_width + 1)) as u64 * 4 * 2)
        .sum::<u64>()
        + k as u64 * 8;
    let needed = per_pair.saturating_mul(n as u64);
    if let Some(memory) = host_memory_bytes().filter(|&m| needed > m) {
        return Err(DataError::TooLarge {
            path: path.into(),
            what: format!("{n} pairs of `{}`", program.model),
            gib: needed as f64 / GIB,
            memory_gib: memory as f64 / GIB,
        });
    }
    let latents = draws.normals(1, n * k, 1.0);
    let mut tensors = Vec::new();
    for (mi, m) in program.modalities.iter().enumerate() {
        let base = 1000 * (mi as u64 + 1);
        let (l, d) = (m.tokens, m.input_width);
        let w1 = draws.normals(base + 1, k * h, 1.0 / (k as f64).sqrt());
        let w2 = draws.normals(base + 2, h * d, 1.0 / (h as f64).sqrt());
        let positions = draws.normals(base + 3, l * k, 0.5);
        let mut tokens = vec![0f32; n * l * d];
        let mut mask = vec![0f32; n * l];
        for i in 0..n {
            let length = if m.padded {
                let lo = l.div_ceil(2);
                lo + ((draws.uniform(base + 4, i as u64) * (l - lo + 1) as f64) as usize)
                    .min(l - lo)
            } else {
                l
            };
            for j in 0..l {
                let row = (i * l + j) as u64;
                let out = &mut tokens[(i * l + j) * d..(i * l + j + 1) * d];
                if j >= length {
                    for (c, v) in out.iter_mut().enumerate() {
                        *v = draws.normal(base + 5, row * d as u64 + c as u64) as f32;
                    }
                    continue;
                }
                mask[i * l + j] = 1.0;
                let z: Vec<f64> = (0..k)
                    .map(|c| {
                        latents[i * k + c]
                            + o.token_variation * draws.normal(base + 6, row * k as u64 + c as u64)
                            + positions[j * k + c]
                    })
                    .collect();
                let hidden: Vec<f64> = (0..h)
                    .map(|c| (0..k).map(|r| z[r] * w1[r * h + c]).sum::<f64>().tanh())
                    .collect();
                for (c, v) in out.iter_mut().enumerate() {
                    let clean: f64 = (0..h).map(|r| hidden[r] * w2[r * d + c]).sum();
                    *v = (clean + o.noise * draws.normal(base + 7, row * d as u64 + c as u64))
                        as f32;
                }
            }
        }
        tensors.push((format!("{}.tokens", m.name), vec![n, l, d], tokens));
        if m.padded {
            tensors.push((format!("{}.mask", m.name), vec![n, l], mask));
        }
    }
    let metadata = HashMap::from([
        ("altc.dataset".to_string(), "planted-1".to_string()),
        ("model".to_string(), program.model.clone()),
        ("pairs".to_string(), n.to_string()),
        ("seed".to_string(), o.seed.to_string()),
        ("latent".to_string(), k.to_string()),
        ("token_variation".to_string(), o.token_variation.to_string()),
        ("noise".to_string(), o.noise.to_string()),
        ("hidden".to_string(), h.to_string()),
    ]);
    write_f32_safetensors(path, &tensors, metadata)
}
