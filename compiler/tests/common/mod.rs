//! What the golden-file tests share: reading an f64 safetensors golden file and
//! lowering the tiny model the scripts implement.

use altc_compiler::ir::DType;
use altc_compiler::lower::{lower, LowerOptions, Mode, MoeDispatch, Program};
use altc_compiler::reference::Tensor;
use altc_compiler::spec;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// An f64 tensor read from a golden file.
#[derive(Clone, Debug)]
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl Array {
    pub fn to_tensor(&self, dtype: DType) -> Tensor {
        Tensor::from_f64(dtype, &self.shape, self.values.clone())
    }

    #[allow(dead_code)] // used by the training goldens only
    pub fn scalar(&self) -> f64 {
        assert!(self.shape.is_empty(), "expected a 0-d golden scalar");
        self.values[0]
    }
}

/// Every tensor of `tests/golden/<file>` by its full name; `script` regenerates it.
pub fn read_golden(file: &str, script: &str) -> BTreeMap<String, Array> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e} (regenerate it with `python3 {script}`)",
            path.display()
        )
    });
    let tensors = SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{} is not a safetensors file: {e}", path.display()));
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(
                view.dtype(),
                Dtype::F64,
                "golden tensor `{name}` should be F64"
            );
            let values = view
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let shape = view.shape().to_vec();
            (name, Array { shape, values })
        })
        .collect()
}

/// `models/alt_moe_tiny.ron` lowered in `dtype`, eval mode (no dropout), as the
/// scripts compute it, with the MoE in the `moe` form.
pub fn tiny_program(dtype: DType, moe: MoeDispatch) -> Program {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/alt_moe_tiny.ron");
    let loaded = spec::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    lower(
        &loaded.spec,
        LowerOptions {
            dtype,
            mode: Mode::Eval,
            moe,
        },
    )
    .unwrap_or_else(|e| panic!("lowering alt_moe_tiny in {dtype:?}: {e}"))
}
