//! Elementwise kernels over strided views: unary maps (and plain copies, which
//! materialise transposes, broadcasts and slices), binary maps with broadcasting,
//! comparisons, selection, fills and iotas.

use cubecl::prelude::*;

/// Unary maps. `Identity` copies, `Trunc` converts to whole numbers (a cast to an
/// integer type), `NonZero` to 0/1 (a cast to bool).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryKind {
    Identity,
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Square,
    Tanh,
    Sigmoid,
    Relu,
    Erf,
    Gelu,
    Silu,
    Trunc,
    NonZero,
}

/// Binary maps; comparisons yield 0 or 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryKind {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

/// Offset of linear index `pos` within the shape at `meta[shape_at..]` and the
/// strides at `meta[strides_at..]`.
#[cube]
pub(crate) fn offset_in(
    pos: u32,
    meta: &Array<u32>,
    shape_at: u32,
    strides_at: u32,
    #[comptime] rank: usize,
) -> u32 {
    let mut rem = pos;
    let mut offset = 0u32;
    #[unroll]
    for i in 0..rank {
        let axis = rank - 1 - i;
        let dim = meta[shape_at as usize + axis];
        let coord = rem % dim;
        rem /= dim;
        offset += coord * meta[strides_at as usize + axis];
    }
    offset
}

/// Offset of the element at linear output position `pos` in a view: `meta` holds the
/// output shape at `0..rank` and this view's strides at `strides_at..strides_at+rank`.
#[cube]
pub(crate) fn view_offset(
    pos: u32,
    meta: &Array<u32>,
    strides_at: u32,
    #[comptime] rank: usize,
) -> u32 {
    offset_in(pos, meta, 0, strides_at, rank)
}

#[cube]
pub(crate) fn apply_unary<F: Float>(x: F, #[comptime] op: UnaryKind) -> F {
    match op {
        UnaryKind::Identity => x,
        UnaryKind::Neg => -x,
        UnaryKind::Abs => F::abs(x),
        UnaryKind::Exp => F::exp(x),
        UnaryKind::Log => F::ln(x),
        UnaryKind::Sqrt => F::sqrt(x),
        UnaryKind::Rsqrt => F::new(1.0) / F::sqrt(x),
        UnaryKind::Recip => F::new(1.0) / x,
        UnaryKind::Square => x * x,
        UnaryKind::Tanh => F::tanh(x),
        UnaryKind::Sigmoid => F::new(1.0) / (F::new(1.0) + F::exp(-x)),
        // NaN propagates as in the reference: max(NaN, 0) must stay NaN.
        UnaryKind::Relu => select(x < F::new(0.0), F::new(0.0), x),
        UnaryKind::Erf => F::erf(x),
        UnaryKind::Gelu => {
            F::new(0.5) * x * (F::new(1.0) + F::erf(x * F::new(core::f32::consts::FRAC_1_SQRT_2)))
        }
        UnaryKind::Silu => x / (F::new(1.0) + F::exp(-x)),
        UnaryKind::Trunc => F::trunc(x),
        UnaryKind::NonZero => select(x != F::new(0.0), F::new(1.0), F::new(0.0)),
    }
}

/// Whether `a` and `b` are unordered, i.e. one of them is NaN. Written as two
/// comparisons because the shader compilers fold `x != x` away.
#[cube]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub(crate) fn unordered<F: Float>(a: F, b: F) -> bool {
    !(a <= b) && !(a > b)
}

#[cube]
pub(crate) fn apply_binary<F: Float>(a: F, b: F, #[comptime] op: BinaryKind) -> F {
    let one = F::new(1.0);
    let zero = F::new(0.0);
    match op {
        BinaryKind::Add => a + b,
        BinaryKind::Sub => a - b,
        BinaryKind::Mul => a * b,
        BinaryKind::Div => a / b,
        // NaN-propagating max/min, as in the reference interpreter: a comparison that
        // is neither <= nor > is unordered, i.e. one side is NaN (and `x != x` is
        // folded away by the shader compilers).
        BinaryKind::Max => select(unordered::<F>(a, b), a + b, select(a > b, a, b)),
        BinaryKind::Min => select(unordered::<F>(a, b), a + b, select(a < b, a, b)),
        BinaryKind::Pow => F::powf(a, b),
        BinaryKind::Lt => select(a < b, one, zero),
        BinaryKind::Le => select(a <= b, one, zero),
        BinaryKind::Gt => select(a > b, one, zero),
        BinaryKind::Ge => select(a >= b, one, zero),
        BinaryKind::Eq => select(a == b, one, zero),
        BinaryKind::Ne => select(a != b, one, zero),
    }
}

/// `out[i] = op(x[view(i)])`. `meta`: out shape, x strides, x offset.
#[cube(launch_unchecked)]
pub(crate) fn unary_kernel<F: Float>(
    x: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] rank: usize,
    #[comptime] op: UnaryKind,
) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let at = view_offset(pos as u32, meta, rank as u32, rank) + meta[2 * rank];
        out[pos] = apply_unary::<F>(x[at as usize], op);
    }
}

/// `out[i] = op(a[view(i)], b[view(i)])`. `meta`: out shape, a strides, b strides,
/// a offset, b offset.
#[cube(launch_unchecked)]
pub(crate) fn binary_kernel<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] rank: usize,
    #[comptime] op: BinaryKind,
) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let ia = view_offset(pos as u32, meta, rank as u32, rank) + meta[3 * rank];
        let ib = view_offset(pos as u32, meta, 2 * rank as u32, rank) + meta[3 * rank + 1];
        out[pos] = apply_binary::<F>(a[ia as usize], b[ib as usize], op);
    }
}

/// `out[i] = cond[view(i)] != 0 ? a[view(i)] : b[view(i)]`. `meta`: out shape, the
/// three operands' strides, then their offsets.
#[cube(launch_unchecked)]
pub(crate) fn select_kernel<F: Float>(
    cond: &Array<F>,
    a: &Array<F>,
    b: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] rank: usize,
) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let ic = view_offset(pos as u32, meta, rank as u32, rank) + meta[4 * rank];
        let ia = view_offset(pos as u32, meta, 2 * rank as u32, rank) + meta[4 * rank + 1];
        let ib = view_offset(pos as u32, meta, 3 * rank as u32, rank) + meta[4 * rank + 2];
        out[pos] = select(
            cond[ic as usize] != F::new(0.0),
            a[ia as usize],
            b[ib as usize],
        );
    }
}

/// `out[i] = value`.
#[cube(launch_unchecked)]
pub(crate) fn fill_kernel<F: Float + CubeElement>(out: &mut Array<F>, value: F) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        out[pos] = value;
    }
}

/// `out[i] = coordinate of i along the axis`: `(i / inner) % size`.
#[cube(launch_unchecked)]
pub(crate) fn iota_kernel<F: Float>(out: &mut Array<F>, inner: u32, size: u32) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        out[pos] = F::cast_from((pos as u32 / inner) % size);
    }
}

/// `out[dst(c)] = x[src(c)]` for every coordinate `c` of the copied shape: writes a
/// view into a region of a larger buffer (concatenation). `meta`: shape, x strides,
/// out strides, x offset, out offset.
#[cube(launch_unchecked)]
pub(crate) fn copy_kernel<F: Float>(
    x: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    count: u32,
    #[comptime] rank: usize,
) {
    let pos = ABSOLUTE_POS as u32;
    if pos < count {
        let from = view_offset(pos, meta, rank as u32, rank) + meta[3 * rank];
        let to = view_offset(pos, meta, 2 * rank as u32, rank) + meta[3 * rank + 1];
        out[to as usize] = x[from as usize];
    }
}
