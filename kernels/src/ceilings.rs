//! The device's measured ceilings: copy bandwidth and matmul rate, what benchmarks
//! judge achieved rates against.

use crate::autotune::Candidate;
use crate::device::{Kernels, ELEMENT_BYTES};
use crate::elementwise::ops::UnaryKind;
use crate::fused::kernel::FusedProgram;
use crate::matmul::kernel::OperandLayout;
use crate::matmul::launch::{EpilogueMatmul, MatmulOperands};
use crate::view::View;
use cubecl::prelude::*;

/// What the device sustains, measured: the ceilings kernel efficiency is judged by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ceilings {
    /// A strided-copy kernel over `copy_elements` f32 (read + write), in GB/s.
    pub copy_gb_per_s: f64,
    pub copy_elements: usize,
    /// altc's fastest dense matmul form on `matmul_size`^3, in TFLOP/s (f32).
    pub matmul_tflop_per_s: f64,
    pub matmul_size: usize,
}

impl<R: Runtime> Kernels<R> {
    /// Waits until every launched kernel has finished.
    pub fn sync(&self) {
        cubecl::future::block_on(self.client.sync()).expect("device synchronisation");
    }

    /// Best of `repeats` timed runs of `launch`, each synchronised, after one warm-up.
    fn best_seconds(&self, repeats: usize, launch: impl Fn()) -> f64 {
        launch();
        self.sync();
        (0..repeats.max(1))
            .map(|_| {
                let started = std::time::Instant::now();
                launch();
                self.sync();
                started.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Measures the copy bandwidth and the matmul rate at the given sizes.
    pub fn measure_ceilings(&self, copy_elements: usize, matmul_size: usize) -> Ceilings {
        let data = self.fill(1.0, copy_elements);
        let view = View::contiguous(data, &[copy_elements]);
        let copy = self.best_seconds(5, || {
            self.unary(UnaryKind::Identity, &view, &[copy_elements]);
        });
        let n = matmul_size;
        let a = View::contiguous(self.fill(0.5, n * n), &[n, n]);
        let mm = MatmulOperands {
            a: &a,
            a_shape: &[n, n],
            transpose_a: false,
            b: &a,
            b_shape: &[n, n],
            transpose_b: false,
            out_batch: &[],
            bf16_operands: false,
        };
        // The fastest of the dense matmul's forms.
        let product = FusedProgram::product();
        let launch = self.matmul_launch(
            std::slice::from_ref(&mm),
            OperandLayout::SINGLE,
            &product,
            &[Vec::new()],
            false,
            (0, 0),
        );
        let matmul = EpilogueMatmul::ALL
            .iter()
            .filter(|c| c.fused)
            .map(|c| {
                self.best_seconds(3, || {
                    launch.launch_kernel(c.form, &product, &[]);
                })
            })
            .fold(f64::INFINITY, f64::min);
        Ceilings {
            copy_gb_per_s: (2 * ELEMENT_BYTES * copy_elements) as f64 / copy / 1e9,
            copy_elements,
            matmul_tflop_per_s: 2.0 * (n * n * n) as f64 / matmul / 1e12,
            matmul_size: n,
        }
    }
}
