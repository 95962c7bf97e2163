//! Elementwise kernels over strided views: unary maps (and plain copies, which
//! materialise transposes, broadcasts and slices), binary maps with broadcasting,
//! comparisons, selection, fills and iotas.

use crate::device::u32s;
use crate::view::View;
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

/// The metadata of a kernel over views broadcast to one shape. The layout lives here
/// only: `words` writes it on the host; `view_at`, `view_stride`, `view_offset` and
/// `shape_extent` read it in the kernel. From where it starts: the shape (`rank` words), each view's strides (`rank`
/// words each), then each view's offset, `len` words in all; a kernel that needs more
/// puts its own words after them.
pub(crate) struct ViewsMeta;

impl ViewsMeta {
    /// The layout of `shape` and views given as (strides, offset).
    pub fn words<'a>(
        shape: &[usize],
        views: impl Iterator<Item = (&'a [usize], usize)> + Clone,
    ) -> Vec<u32> {
        let mut words = u32s(shape.iter().copied());
        for (strides, _) in views.clone() {
            words.extend(u32s(strides.iter().copied()));
        }
        words.extend(u32s(views.map(|(_, offset)| offset)));
        words
    }

    /// The layout of `shape` and `views`.
    pub fn of_views<'a>(
        shape: &[usize],
        views: impl Iterator<Item = &'a View> + Clone,
    ) -> Vec<u32> {
        Self::words(shape, views.map(|v| (v.strides.as_slice(), v.offset)))
    }

    pub const fn len(rank: usize, views: usize) -> usize {
        (1 + views) * rank + views
    }

    pub const fn strides_at(rank: usize, view: usize) -> usize {
        (1 + view) * rank
    }

    pub const fn offset_at(rank: usize, views: usize, view: usize) -> usize {
        (1 + views) * rank + view
    }
}

/// Where view `view` (of `views`) holds the element at linear position `pos` of the
/// shape, for the `ViewsMeta` starting at `at`.
#[cube]
pub(crate) fn view_at(
    pos: u32,
    meta: &Array<u32>,
    at: u32,
    #[comptime] rank: usize,
    #[comptime] views: usize,
    #[comptime] view: usize,
) -> u32 {
    let strides = at + comptime!(ViewsMeta::strides_at(rank, view)) as u32;
    offset_in(pos, meta, at, strides, rank) + view_offset(meta, at, rank, views, view)
}

/// View `view`'s stride along `axis`, for the `ViewsMeta` starting at `at`.
#[cube]
pub(crate) fn view_stride(
    meta: &Array<u32>,
    at: u32,
    axis: u32,
    #[comptime] rank: usize,
    #[comptime] view: usize,
) -> u32 {
    meta[at as usize + comptime!(ViewsMeta::strides_at(rank, view)) + axis as usize]
}

/// View `view`'s offset (of `views`), for the `ViewsMeta` starting at `at`.
#[cube]
pub(crate) fn view_offset(
    meta: &Array<u32>,
    at: u32,
    #[comptime] rank: usize,
    #[comptime] views: usize,
    #[comptime] view: usize,
) -> u32 {
    meta[at as usize + comptime!(ViewsMeta::offset_at(rank, views, view))]
}

/// Extent `axis` of the shape of the `ViewsMeta` starting at `at`.
#[cube]
pub(crate) fn shape_extent(meta: &Array<u32>, at: u32, axis: usize) -> u32 {
    meta[at as usize + axis]
}

/// `op` on one value: `unary_lanes` on a one-lane vector.
#[cube]
pub(crate) fn apply_unary<F: Float>(x: F, #[comptime] op: UnaryKind) -> F {
    F::cast_from(unary_lanes::<F, Const<1>>(Vector::new(x), op))
}

/// What each unary op computes, once for every path: on `N` lanes at a time for
/// the vector kernels, and on one lane (`apply_unary`) for the others.
#[cube]
pub(crate) fn unary_lanes<F: Float, N: Size>(
    x: Vector<F, N>,
    #[comptime] op: UnaryKind,
) -> Vector<F, N> {
    let one = Vector::<F, N>::new(F::new(1.0));
    let zero = Vector::<F, N>::new(F::new(0.0));
    // cubecl-cpp 0.10 writes `-x` on a vector as `-float_4`, which NVRTC rejects
    // ("no operator "-" matches these operands ... -const float_4"): negate by
    // multiplying with -1, which is exact (signed zeros and NaN included).
    let minus_one = Vector::<F, N>::new(F::new(-1.0));
    match op {
        UnaryKind::Identity => x,
        UnaryKind::Neg => minus_one * x,
        UnaryKind::Abs => x.abs(),
        UnaryKind::Exp => x.exp(),
        UnaryKind::Log => x.ln(),
        UnaryKind::Sqrt => x.sqrt(),
        UnaryKind::Rsqrt => one / x.sqrt(),
        UnaryKind::Recip => one / x,
        UnaryKind::Square => x * x,
        UnaryKind::Tanh => x.tanh(),
        UnaryKind::Sigmoid => one / (one + (minus_one * x).exp()),
        // NaN propagates as in the reference: max(NaN, 0) must stay NaN.
        UnaryKind::Relu => select_many(x.less_than(zero), zero, x),
        UnaryKind::Erf => x.erf(),
        UnaryKind::Gelu => {
            let half = Vector::<F, N>::new(F::new(0.5));
            let scale = Vector::<F, N>::new(F::new(core::f32::consts::FRAC_1_SQRT_2));
            half * x * (one + (x * scale).erf())
        }
        UnaryKind::Silu => x / (one + (minus_one * x).exp()),
        UnaryKind::Trunc => x.trunc(),
        UnaryKind::NonZero => select_many(x.not_equal(zero), one, zero),
    }
}

/// What each binary op computes (comparisons give 1 or 0), on `N` lanes at a time;
/// `apply_binary` is its one-lane form.
#[cube]
pub(crate) fn binary_lanes<F: Float, N: Size>(
    a: Vector<F, N>,
    b: Vector<F, N>,
    #[comptime] op: BinaryKind,
) -> Vector<F, N> {
    let one = Vector::<F, N>::new(F::new(1.0));
    let zero = Vector::<F, N>::new(F::new(0.0));
    // Lanes where `a` and `b` compare at all (neither is NaN), as 1 or 0, summed
    // from two comparisons because shader compilers fold `x != x` away.
    let ordered =
        select_many(a.less_equal(b), one, zero) + select_many(a.greater_than(b), one, zero);
    match op {
        BinaryKind::Add => a + b,
        BinaryKind::Sub => a - b,
        BinaryKind::Mul => a * b,
        BinaryKind::Div => a / b,
        // NaN-propagating, as in the reference interpreter.
        BinaryKind::Max => select_many(
            ordered.not_equal(zero),
            select_many(a.greater_than(b), a, b),
            a + b,
        ),
        BinaryKind::Min => select_many(
            ordered.not_equal(zero),
            select_many(a.less_than(b), a, b),
            a + b,
        ),
        BinaryKind::Pow => a.powf(b),
        BinaryKind::Lt => select_many(a.less_than(b), one, zero),
        BinaryKind::Le => select_many(a.less_equal(b), one, zero),
        BinaryKind::Gt => select_many(a.greater_than(b), one, zero),
        BinaryKind::Ge => select_many(a.greater_equal(b), one, zero),
        BinaryKind::Eq => select_many(a.equal(b), one, zero),
        BinaryKind::Ne => select_many(a.not_equal(b), one, zero),
    }
}

/// Whether `a` and `b` are unordered, i.e. one of them is NaN. Written as two
/// comparisons because the shader compilers fold `x != x` away.
#[cube]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub(crate) fn unordered<F: Float>(a: F, b: F) -> bool {
    !(a <= b) && !(a > b)
}

/// `op` on one pair of values: `binary_lanes` on one-lane vectors.
#[cube]
pub(crate) fn apply_binary<F: Float>(a: F, b: F, #[comptime] op: BinaryKind) -> F {
    F::cast_from(binary_lanes::<F, Const<1>>(
        Vector::new(a),
        Vector::new(b),
        op,
    ))
}

/// `out[i] = op(x[view(i)])`. `meta`: the `ViewsMeta` of out's shape and x.
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
        let at = view_at(pos as u32, meta, 0u32, rank, 1usize, 0usize);
        out[pos] = apply_unary::<F>(x[at as usize], op);
    }
}

/// `out[i] = op(a[view(i)], b[view(i)])`. `meta`: the `ViewsMeta` of out's shape, a
/// and b.
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
        let ia = view_at(pos as u32, meta, 0u32, rank, 2usize, 0usize);
        let ib = view_at(pos as u32, meta, 0u32, rank, 2usize, 1usize);
        out[pos] = apply_binary::<F>(a[ia as usize], b[ib as usize], op);
    }
}

/// `out[i] = cond[view(i)] != 0 ? a[view(i)] : b[view(i)]`. `meta`: the `ViewsMeta` of
/// out's shape, cond, a and b.
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
        let ic = view_at(pos as u32, meta, 0u32, rank, 3usize, 0usize);
        let ia = view_at(pos as u32, meta, 0u32, rank, 3usize, 1usize);
        let ib = view_at(pos as u32, meta, 0u32, rank, 3usize, 2usize);
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
/// view into a region of a larger buffer (concatenation). `meta`: the `ViewsMeta` of
/// the copied shape, x and the region of out.
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
        let from = view_at(pos, meta, 0u32, rank, 2usize, 0usize);
        let to = view_at(pos, meta, 0u32, rank, 2usize, 1usize);
        out[to as usize] = x[from as usize];
    }
}
