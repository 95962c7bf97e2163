//! Dropout from the same counter-based Philox4x32-10 stream as the reference
//! interpreter (`altc_compiler::rng`), so both draw identical masks.

use crate::device::{grid, Kernels};
use cubecl::prelude::*;
use cubecl::server::Handle;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// High 32 bits of the 64-bit product, from 16-bit limbs (WGSL has no 64-bit ints).
#[cube]
fn mul_hi(a: u32, b: u32) -> u32 {
    let (a_lo, a_hi) = (a & 0xffff, a >> 16);
    let (b_lo, b_hi) = (b & 0xffff, b >> 16);
    let low = a_lo * b_lo;
    let mid1 = a_hi * b_lo + (low >> 16);
    let mid2 = a_lo * b_hi + (mid1 & 0xffff);
    a_hi * b_hi + (mid1 >> 16) + (mid2 >> 16)
}

/// First output word of Philox4x32-10 for counter `(c0, 0, c2, c3)` and key `(k0, k1)`.
#[cube]
fn philox_first(c0: u32, c2: u32, c3: u32, k0: u32, k1: u32) -> u32 {
    let mut x0 = c0;
    let mut x1 = 0u32;
    let mut x2 = c2;
    let mut x3 = c3;
    let mut key0 = k0;
    let mut key1 = k1;
    #[unroll]
    for round in 0..10u32 {
        if round > 0 {
            key0 += W0;
            key1 += W1;
        }
        let hi0 = mul_hi(M0, x0);
        let lo0 = M0 * x0;
        let hi1 = mul_hi(M1, x2);
        let lo1 = M1 * x2;
        let n0 = hi1 ^ x1 ^ key0;
        let n2 = hi0 ^ x3 ^ key1;
        x0 = n0;
        x1 = lo1;
        x2 = n2;
        x3 = lo0;
    }
    x0
}

/// Whether dropout with `rate` keeps element `index` of the stream (seed, step, stream).
#[cube]
pub(crate) fn keeps<F: Float>(
    index: u32,
    seed_lo: u32,
    seed_hi: u32,
    step: u32,
    stream: u32,
    rate: F,
) -> bool {
    let bits = philox_first(index, step, stream, seed_lo, seed_hi) >> 8;
    F::cast_from(bits) / F::new(16777216.0) >= rate
}

/// `out[i] = keep(i) ? x[i] * scale : 0` with `keep(i)` = the 24-bit uniform of element
/// `i` at or above `rate`. Elements are indexed below 2^32.
#[cube(launch_unchecked)]
pub(crate) fn dropout_kernel<F: Float + CubeElement>(
    x: &Array<F>,
    out: &mut Array<F>,
    rate: F,
    scale: F,
    seed_lo: u32,
    seed_hi: u32,
    step: u32,
    stream: u32,
) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let bits = philox_first(pos as u32, step, stream, seed_lo, seed_hi) >> 8;
        let u = F::cast_from(bits) / F::new(16777216.0);
        out[pos] = select(u >= rate, x[pos] * scale, F::new(0.0));
    }
}
impl<R: Runtime> Kernels<R> {
    /// Inverted dropout of contiguous `x` with the Philox stream of (seed, step, stream).
    pub fn dropout(
        &self,
        x: &Handle,
        len: usize,
        rate: f64,
        seed: u64,
        step: u64,
        stream: u64,
    ) -> Handle {
        let out = self.alloc(len);
        let (count, dim) = grid(len);
        unsafe {
            dropout_kernel::launch_unchecked::<f32, R>(
                &self.client,
                count,
                dim,
                ArrayArg::from_raw_parts(x.clone(), len.max(1)),
                ArrayArg::from_raw_parts(out.clone(), len),
                rate as f32,
                (1.0 / (1.0 - rate)) as f32,
                seed as u32,
                (seed >> 32) as u32,
                step as u32,
                stream as u32,
            )
        };
        out
    }
}
