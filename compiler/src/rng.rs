//! The counter-based random stream behind `Dropout`: Philox4x32-10 (Salmon et al.,
//! "Parallel random numbers: as easy as 1, 2, 3", SC'11), the generator cuRAND and
//! PyTorch use on GPUs. Every element's draw is a pure function of
//! (seed, step, stream, element index), so the reference interpreter and any GPU
//! kernel produce the same masks without sharing state.

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Ten rounds of Philox4x32 on `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = (PHILOX_M0 as u64) * (c[0] as u64);
        let p1 = (PHILOX_M1 as u64) * (c[2] as u64);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// The uniform draw in `[0, 1)` for one element: 24 random bits, so the value is
/// exact in `f32` as well as `f64`.
pub fn uniform(seed: u64, step: u64, stream: u64, index: u64) -> f64 {
    let counter = [
        index as u32,
        (index >> 32) as u32,
        step as u32,
        stream as u32,
    ];
    let key = [seed as u32, (seed >> 32) as u32];
    let bits = philox4x32_10(counter, key)[0] >> 8;
    bits as f64 / (1u32 << 24) as f64
}

/// A standard normal draw for one element, by Box-Muller from the element's two
/// uniforms `2 * index` and `2 * index + 1` (`1 - u` keeps the logarithm finite).
pub fn normal(seed: u64, step: u64, stream: u64, index: u64) -> f64 {
    let u1 = 1.0 - uniform(seed, step, stream, 2 * index);
    let u2 = uniform(seed, step, stream, 2 * index + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Whether dropout with probability `rate` keeps this element.
pub fn dropout_keeps(rate: f64, seed: u64, step: u64, stream: u64, index: u64) -> bool {
    uniform(seed, step, stream, index) >= rate
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors published with Random123 (`kat_vectors`, philox4x32_10).
    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn draws_are_uniform_and_depend_on_every_key_part() {
        let n = 20_000u64;
        let mean = (0..n).map(|i| uniform(7, 3, 11, i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean of uniform draws {mean}");
        let base = uniform(7, 3, 11, 5);
        assert_ne!(base, uniform(8, 3, 11, 5));
        assert_ne!(base, uniform(7, 4, 11, 5));
        assert_ne!(base, uniform(7, 3, 12, 5));
        assert_ne!(base, uniform(7, 3, 11, 6));
        assert_eq!(base, uniform(7, 3, 11, 5));
    }
}
