//! Host tensors for the reference interpreter: a concrete shape and row-major data.

use crate::ir::DType;
use num_traits::{Float, FromPrimitive, ToPrimitive};
use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
}

/// A dense row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Data) -> Tensor {
        let t = Tensor { shape, data };
        assert_eq!(
            t.len(),
            t.shape.iter().product::<usize>(),
            "tensor data does not fill its shape {:?}",
            t.shape
        );
        t
    }

    pub fn f32(shape: &[usize], values: Vec<f32>) -> Tensor {
        Tensor::new(shape.to_vec(), Data::F32(values))
    }

    pub fn f64(shape: &[usize], values: Vec<f64>) -> Tensor {
        Tensor::new(shape.to_vec(), Data::F64(values))
    }

    pub fn i32(shape: &[usize], values: Vec<i32>) -> Tensor {
        Tensor::new(shape.to_vec(), Data::I32(values))
    }

    pub fn bool(shape: &[usize], values: Vec<bool>) -> Tensor {
        Tensor::new(shape.to_vec(), Data::Bool(values))
    }

    /// A float tensor of `dtype` from `f64` values (rounded for `F32`).
    pub fn from_f64(dtype: DType, shape: &[usize], values: Vec<f64>) -> Tensor {
        match dtype {
            DType::F32 => Tensor::f32(shape, values.into_iter().map(|v| v as f32).collect()),
            DType::F64 => Tensor::f64(shape, values),
            DType::I32 => Tensor::i32(shape, values.into_iter().map(|v| v as i32).collect()),
            DType::Bool => Tensor::bool(shape, values.into_iter().map(|v| v != 0.0).collect()),
        }
    }

    /// A `[lengths.len(), tokens]` padding mask of `dtype`: row `i` marks its first
    /// `lengths[i]` tokens (at most `tokens`) as real with 1, the rest with 0.
    pub fn prefix_mask(dtype: DType, tokens: usize, lengths: &[usize]) -> Tensor {
        let values = lengths
            .iter()
            .flat_map(|&len| (0..tokens).map(move |t| if t < len { 1.0 } else { 0.0 }))
            .collect();
        Tensor::from_f64(dtype, &[lengths.len(), tokens], values)
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::I32(_) => DType::I32,
            Data::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element as `f64` (exact for all element types).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::F64(v) => v.clone(),
            Data::I32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::Bool(v) => v.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect(),
        }
    }

    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            Data::I32(v) => Some(v),
            _ => None,
        }
    }

    /// The single element of a one-element tensor, as `f64`.
    pub fn scalar(&self) -> Option<f64> {
        (self.len() == 1).then(|| self.to_f64()[0])
    }
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?} {:?}", self.dtype(), self.shape, self.to_f64())
    }
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides that read a tensor of `shape` as if broadcast to `out` (right-aligned;
/// stretched dimensions get stride 0).
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = strides(shape);
    let offset = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < offset || shape[i - offset] == 1 {
                0
            } else {
                own[i - offset]
            }
        })
        .collect()
}

/// Calls `f(linear_out, coords)` for every index of `shape` in row-major order.
pub fn for_each_index(shape: &[usize], mut f: impl FnMut(usize, &[usize])) {
    let n: usize = shape.iter().product();
    let mut coords = vec![0usize; shape.len()];
    for linear in 0..n {
        f(linear, &coords);
        for axis in (0..shape.len()).rev() {
            coords[axis] += 1;
            if coords[axis] < shape[axis] {
                break;
            }
            coords[axis] = 0;
        }
    }
}

pub fn offset(coords: &[usize], strides: &[usize]) -> usize {
    coords.iter().zip(strides).map(|(c, s)| c * s).sum()
}

/// Float element types the interpreter computes in.
pub trait Real: Float + FromPrimitive + ToPrimitive + Copy + 'static {
    fn erf(self) -> Self;
}

impl Real for f32 {
    fn erf(self) -> f32 {
        libm::erff(self)
    }
}

impl Real for f64 {
    fn erf(self) -> f64 {
        libm::erf(self)
    }
}
