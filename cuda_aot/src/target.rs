//! The NVIDIA GPUs altc checks kernels for: compute capability, the limits a launch
//! must respect, what occupancy is computed from, and the peaks a roofline bound is
//! taken against.

use std::fmt;
use thiserror::Error;

/// One compilation target: a compute capability and a reference GPU of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CudaTarget {
    /// Compute capability times ten (80: sm_80, 90: sm_90a).
    pub version: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown CUDA architecture `{given}` (known: {})", known_names().join(", "))]
pub struct UnknownTarget {
    pub given: String,
}

fn known_names() -> Vec<String> {
    CudaTarget::ALL.iter().map(|t| t.name()).collect()
}

/// Published figures of a reference GPU for a target (datasheet values, dense, no
/// sparsity), and the per-SM resources that bound occupancy.
#[derive(Clone, Copy, Debug)]
pub struct Hardware {
    pub gpu: &'static str,
    pub bf16_dense_tflops: f64,
    pub hbm_gb_per_s: f64,
    pub sms: u32,
    pub registers_per_sm: u32,
    pub max_warps_per_sm: u32,
    pub max_blocks_per_sm: u32,
    /// Shared memory one SM holds, and the most one block may use once it opts in
    /// (cubecl-cuda opts in for every kernel that needs more than 48 KiB).
    pub shared_per_sm: u32,
    pub shared_per_block_opt_in: u32,
    /// Device memory, bytes.
    pub memory_bytes: u64,
}

/// Dynamic shared memory a block gets without opting in.
pub const SHARED_WITHOUT_OPT_IN: u32 = 48 * 1024;
/// Threads one block may have, and the largest grid in y and z.
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
pub const MAX_GRID_YZ: u32 = 65_535;
pub const MAX_GRID_X: u32 = i32::MAX as u32;

impl CudaTarget {
    pub const SM80: CudaTarget = CudaTarget { version: 80 };
    pub const SM90A: CudaTarget = CudaTarget { version: 90 };
    pub const ALL: [CudaTarget; 2] = [CudaTarget::SM80, CudaTarget::SM90A];

    /// Parses `sm_80`, `sm_90a` (also `sm_90`: cubecl-cuda compiles every 9.x GPU
    /// for `sm_90a`), or a comma-separated list of them.
    pub fn parse_list(text: &str) -> Result<Vec<CudaTarget>, UnknownTarget> {
        let mut targets = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let target = CudaTarget::ALL
                .into_iter()
                .find(|t| t.name() == part || (part == "sm_90" && *t == CudaTarget::SM90A))
                .ok_or_else(|| UnknownTarget { given: part.into() })?;
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        if targets.is_empty() {
            return Err(UnknownTarget { given: text.into() });
        }
        Ok(targets)
    }

    /// The architecture name NVRTC is given, as cubecl-cuda gives it.
    pub fn name(&self) -> String {
        if self.version >= 90 {
            format!("sm_{}a", self.version)
        } else {
            format!("sm_{}", self.version)
        }
    }

    pub fn hardware(&self) -> Hardware {
        match self.version {
            90 => Hardware {
                gpu: "H100 SXM",
                bf16_dense_tflops: 989.4,
                hbm_gb_per_s: 3350.0,
                sms: 132,
                registers_per_sm: 65_536,
                max_warps_per_sm: 64,
                max_blocks_per_sm: 32,
                shared_per_sm: 228 * 1024,
                shared_per_block_opt_in: 227 * 1024,
                memory_bytes: 80_000_000_000,
            },
            _ => Hardware {
                gpu: "A100 SXM 80GB",
                bf16_dense_tflops: 312.0,
                hbm_gb_per_s: 2039.0,
                sms: 108,
                registers_per_sm: 65_536,
                max_warps_per_sm: 64,
                max_blocks_per_sm: 32,
                shared_per_sm: 164 * 1024,
                shared_per_block_opt_in: 163 * 1024,
                memory_bytes: 80_000_000_000,
            },
        }
    }
}

impl fmt::Display for CudaTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Theoretical occupancy of a kernel: resident warps per SM over the SM's maximum,
/// as the CUDA occupancy calculator computes it from threads, registers and shared
/// memory per block (registers allocated per warp in units of 256, shared memory in
/// units of 128 bytes plus the 1 KiB the runtime reserves per block).
pub fn occupancy(hw: &Hardware, threads: u32, registers: u32, shared_bytes: u32) -> f64 {
    let warps = threads.div_ceil(32).max(1);
    let by_warps = hw.max_warps_per_sm / warps;
    let registers_per_warp = (registers.max(1) * 32).div_ceil(256) * 256;
    let by_registers = hw.registers_per_sm / (registers_per_warp * warps);
    let shared = shared_bytes.div_ceil(128) * 128 + 1024;
    let by_shared = hw.shared_per_sm / shared;
    let blocks = by_warps
        .min(by_registers)
        .min(by_shared)
        .min(hw.max_blocks_per_sm);
    f64::from(blocks * warps) / f64::from(hw.max_warps_per_sm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_lists_parse_and_say_what_is_known() {
        assert_eq!(
            CudaTarget::parse_list("sm_90a, sm_80").unwrap(),
            vec![CudaTarget::SM90A, CudaTarget::SM80]
        );
        assert_eq!(
            CudaTarget::parse_list("sm_90").unwrap(),
            vec![CudaTarget::SM90A]
        );
        let e = CudaTarget::parse_list("sm_75").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown CUDA architecture `sm_75` (known: sm_80, sm_90a)"
        );
    }

    #[test]
    fn occupancy_follows_the_tightest_resource() {
        let h100 = CudaTarget::SM90A.hardware();
        // 256 threads, 32 registers, no shared memory: 8 blocks of 8 warps fill the SM.
        assert_eq!(occupancy(&h100, 256, 32, 0), 1.0);
        // 128 registers per thread: 65,536 / (4,096 * 8) = 2 blocks, 16 of 64 warps.
        assert_eq!(occupancy(&h100, 256, 128, 0), 0.25);
        // 100 KiB of shared memory per block: two blocks fit in 228 KiB.
        assert_eq!(occupancy(&h100, 256, 32, 100 * 1024), 0.25);
        // A 64-thread block: 32 blocks at most, 64 warps.
        assert_eq!(occupancy(&h100, 64, 16, 0), 1.0);
    }
}
