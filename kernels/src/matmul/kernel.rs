//! Batched matrix multiply: shared-memory tiles of `TILE x TILE`, one cube per output
//! tile and batch entry. Operands are strided views, so transposed operands and
//! broadcast batch dimensions (stride 0) need no copies.

use crate::elementwise::ops::{unordered, ViewsMeta};
use crate::fused::kernel::{run_program, FusedProgram};
use cubecl::prelude::*;

/// Tile edge; a cube is `TILE x TILE` units, whatever the plane size.
pub const TILE: u32 = 16;

/// Rounds an f32 to the nearest bf16 (ties to even) and back, so products see
/// exactly bf16 operands while accumulation stays in f32 (as tensor cores do). NaN
/// stays NaN.
#[cube]
pub(crate) fn round_to_bf16<F: Float>(x: F) -> F {
    let bits = u32::reinterpret(x);
    let keep_high = 0xffff_0000u32;
    let bias = 0x7fffu32;
    let rounded = (bits + bias + ((bits >> 16) & 1)) & keep_high;
    select(unordered::<F>(x, x), x, F::reinterpret(rounded))
}

/// Where a matmul kernel finds its operands: `members` matmuls of one shape in one
/// launch, each with its own `a` and `b` unless one side is shared. Bound as the
/// shared operand first (if any), then each member's own operands in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OperandLayout {
    pub members: usize,
    pub shared_a: bool,
    pub shared_b: bool,
}

impl OperandLayout {
    /// One matmul reading `a` and `b`.
    pub const SINGLE: OperandLayout = OperandLayout {
        members: 1,
        shared_a: false,
        shared_b: false,
    };

    /// Operand buffers bound.
    pub fn bindings(&self) -> usize {
        let shared = usize::from(self.shared_a || self.shared_b);
        shared + self.members * (2 - shared)
    }

    /// The binding of member `m`'s left operand.
    pub fn a(&self, m: usize) -> usize {
        match (self.shared_a, self.shared_b) {
            (true, _) => 0,
            (false, true) => 1 + m,
            (false, false) => 2 * m,
        }
    }

    /// The binding of member `m`'s right operand.
    pub fn b(&self, m: usize) -> usize {
        match (self.shared_a, self.shared_b) {
            (_, true) => 0,
            (true, false) => 1 + m,
            (false, false) => 2 * m + 1,
        }
    }
}

/// One member's metadata in a matmul kernel. The layout lives here only: `words`
/// writes it on the host; `MatmulDims::read`, `batch_extent` and `batch_strides` read
/// it in the kernel. In order: the output's batch shape, a's and b's strides along
/// it (`batch_rank` words each, 0 where an operand broadcasts), then `dims`.
pub(crate) struct MatmulMeta {
    pub batch: Vec<u32>,
    pub a_batch_strides: Vec<u32>,
    pub b_batch_strides: Vec<u32>,
    pub dims: MatmulDims,
}

/// A member's sizes, row and column strides (as read: transposes applied) and
/// offsets.
#[derive(CubeType, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MatmulDims {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub a_row: u32,
    pub a_col: u32,
    pub b_row: u32,
    pub b_col: u32,
    pub a_offset: u32,
    pub b_offset: u32,
}

impl MatmulMeta {
    const DIMS_WORDS: usize = 9;

    pub fn words(&self) -> Vec<u32> {
        let d = &self.dims;
        let mut words = self.batch.clone();
        words.extend(&self.a_batch_strides);
        words.extend(&self.b_batch_strides);
        words.extend([
            d.m, d.n, d.k, d.a_row, d.a_col, d.b_row, d.b_col, d.a_offset, d.b_offset,
        ]);
        debug_assert_eq!(words.len(), matmul_meta_len(self.batch.len()));
        words
    }
}

/// Metadata words per member of a matmul kernel.
pub(crate) fn matmul_meta_len(batch_rank: usize) -> usize {
    3 * batch_rank + MatmulMeta::DIMS_WORDS
}

#[cube]
impl MatmulDims {
    /// The dims of the member whose metadata starts at `at`.
    pub fn read(meta: &Array<u32>, at: u32, #[comptime] batch_rank: usize) -> MatmulDims {
        let tail = at as usize + comptime!(3 * batch_rank);
        MatmulDims {
            m: meta[tail],
            n: meta[tail + 1],
            k: meta[tail + 2],
            a_row: meta[tail + 3],
            a_col: meta[tail + 4],
            b_row: meta[tail + 5],
            b_col: meta[tail + 6],
            a_offset: meta[tail + 7],
            b_offset: meta[tail + 8],
        }
    }
}

/// The extent of batch axis `axis` of the member whose metadata starts at `at`.
#[cube]
fn batch_extent(meta: &Array<u32>, at: u32, axis: usize) -> u32 {
    meta[at as usize + axis]
}

/// a's and b's strides along batch axis `axis` of the member at `at`.
#[cube]
fn batch_strides(
    meta: &Array<u32>,
    at: u32,
    axis: usize,
    #[comptime] batch_rank: usize,
) -> (u32, u32) {
    let a = meta[at as usize + batch_rank + axis];
    let b = meta[at as usize + 2 * batch_rank + axis];
    (a, b)
}

/// `x[at]`, rounded to bf16 when `bf16` (autocast operands).
#[cube]
pub(crate) fn operand_value<F: Float>(x: &Array<F>, at: u32, #[comptime] bf16: bool) -> F {
    let mut value = x[at as usize];
    if comptime![bf16] {
        value = round_to_bf16::<F>(value);
    }
    value
}

/// A unit's `block x block` accumulators, zeroed.
#[cube]
pub(crate) fn zeroed_block<F: Float>(#[comptime] block: u32) -> Array<F> {
    let mut acc = Array::<F>::new(comptime!((block * block) as usize));
    #[unroll]
    for i in 0..block * block {
        acc[i as usize] = F::new(0.0);
    }
    acc
}

/// `acc[i * block + j] += a[i] * b[j]`: one step of a register-blocked product.
#[cube]
pub(crate) fn accumulate_outer<F: Float>(
    acc: &mut Array<F>,
    a: &Array<F>,
    b: &Array<F>,
    #[comptime] block: u32,
) {
    #[unroll]
    for i in 0..block {
        #[unroll]
        for j in 0..block {
            acc[(i * block + j) as usize] += a[i as usize] * b[j as usize];
        }
    }
}

/// Batch entries a unit's product sums over: all of them with `sum_batch`, else
/// one. `meta` from `at` as in `matmul_kernel`.
#[cube]
fn summed_entries(
    meta: &Array<u32>,
    at: u32,
    #[comptime] batch_rank: usize,
    #[comptime] sum_batch: bool,
) -> u32 {
    let mut entries = 1u32;
    if comptime![sum_batch] {
        #[unroll]
        for i in 0..batch_rank {
            entries *= batch_extent(meta, at, i);
        }
    }
    entries
}

/// Where batch entry `entry` of one member's operands starts in `a` and in `b`;
/// `meta` from `at` as in `matmul_kernel`.
#[cube]
fn batch_bases(
    meta: &Array<u32>,
    at: u32,
    entry: u32,
    #[comptime] batch_rank: usize,
) -> (u32, u32) {
    let dims = MatmulDims::read(meta, at, batch_rank);
    let mut rem = entry;
    let mut a_base = dims.a_offset;
    let mut b_base = dims.b_offset;
    #[unroll]
    for i in 0..batch_rank {
        let axis = batch_rank - 1 - i;
        let dim = batch_extent(meta, at, axis);
        let coord = rem % dim;
        rem /= dim;
        let (a_stride, b_stride) = batch_strides(meta, at, axis, batch_rank);
        a_base += coord * a_stride;
        b_base += coord * b_stride;
    }
    (a_base, b_base)
}

/// This unit's `block x block` elements of `a @ b` (rows `block` apart by the cube's
/// height, columns by its width) for batch entry `entry`, or with `sum_batch` summed
/// over every entry, row-major in the returned array. Operands are read directly:
/// `2 * block` loads feed `block * block` multiply-adds.
#[cube]
#[allow(clippy::too_many_arguments)]
fn product_block<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    meta: &Array<u32>,
    at: u32,
    entry: u32,
    #[comptime] batch_rank: usize,
    #[comptime] sum_batch: bool,
    #[comptime] block: u32,
    #[comptime] bf16_operands: bool,
) -> Array<F> {
    let dims = MatmulDims::read(meta, at, batch_rank);
    let (m, n, k) = (dims.m, dims.n, dims.k);
    let (a_rs, a_cs, b_rs, b_cs) = (dims.a_row, dims.a_col, dims.b_row, dims.b_col);
    let row0 = CUBE_POS_Y * CUBE_DIM_Y * block + UNIT_POS_Y;
    let col0 = CUBE_POS_X * CUBE_DIM_X * block + UNIT_POS_X;
    let mut acc = zeroed_block::<F>(block);
    let mut a_values = Array::<F>::new(comptime!(block as usize));
    let mut b_values = Array::<F>::new(comptime!(block as usize));
    let entries = summed_entries(meta, at, batch_rank, sum_batch);
    for pass in 0..entries {
        let mut this_entry = entry;
        if comptime![sum_batch] {
            this_entry = pass;
        }
        let (a_base, b_base) = batch_bases(meta, at, this_entry, batch_rank);
        for kk in 0..k {
            // Rows and columns past the matrix read element 0; they are never written.
            #[unroll]
            for i in 0..block {
                let row = row0 + i * CUBE_DIM_Y;
                let at = select(row < m, a_base + row * a_rs + kk * a_cs, 0);
                a_values[i as usize] = operand_value::<F>(a, at, bf16_operands);
                let col = col0 + i * CUBE_DIM_X;
                let at = select(col < n, b_base + kk * b_rs + col * b_cs, 0);
                b_values[i as usize] = operand_value::<F>(b, at, bf16_operands);
            }
            accumulate_outer::<F>(&mut acc, &a_values, &b_values, block);
        }
    }
    acc
}

/// Writes element `place` (row, column, batch entry) of member `member`'s product
/// `acc` of `extent` (M, N), through `epilogue` when it has one (`matmul_kernel`'s
/// layout; `seed` is the dropout key).
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_product<F: Float>(
    inputs: &Sequence<Array<F>>,
    outputs: &mut Sequence<Array<F>>,
    epilogue_meta: &Array<u32>,
    place: (u32, u32, u32),
    extent: (u32, u32),
    acc: F,
    seed: (u32, u32, u32),
    #[comptime] member: usize,
    #[comptime] epilogue: FusedProgram,
) {
    let (row, col, entry) = place;
    let (m, n) = extent;
    let (seed_lo, seed_hi, rng_step) = seed;
    let epilogue_len = comptime!(ViewsMeta::len(epilogue.rank, epilogue.inputs));
    let written = comptime!(epilogue.outputs.len().max(1));
    if row < m && col < n {
        let pos = entry * m * n + row * n + col;
        if comptime![epilogue.ops.is_empty()] {
            let out = outputs.index_mut(member);
            out[pos as usize] = acc;
        } else {
            let regs = run_program::<F>(
                inputs,
                epilogue_meta,
                comptime!(member * epilogue_len) as u32,
                member,
                pos,
                acc,
                seed_lo,
                seed_hi,
                rng_step,
                epilogue.clone(),
            );
            #[unroll]
            for o in 0usize..comptime!(epilogue.outputs.len()) {
                let out = outputs.index_mut(comptime!(member * written + o));
                out[pos as usize] = *regs.index(comptime!(epilogue.outputs[o]));
            }
        }
    }
}

/// This unit's element of K-tile `t` of operand `a` (its row, column `t * TILE + x`)
/// or, with `of_b`, of `b` (row `t * TILE + y`, its column), from the operand's batch
/// entry at `base`: zero outside the matrix, rounded to bf16 when `bf16` (autocast).
/// `meta` from `at` is one member's part of `matmul_kernel`'s.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_operand<F: Float>(
    x: &Array<F>,
    meta: &Array<u32>,
    at: u32,
    t: u32,
    base: u32,
    #[comptime] of_b: bool,
    #[comptime] batch_rank: usize,
    #[comptime] bf16: bool,
) -> F {
    let dims = MatmulDims::read(meta, at, batch_rank);
    let (m, n, k) = (dims.m, dims.n, dims.k);
    let row = CUBE_POS_Y * CUBE_DIM_Y + UNIT_POS_Y;
    let col = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    let (inside, at) = if comptime![of_b] {
        let bk = t * TILE + UNIT_POS_Y;
        (bk < k && col < n, base + bk * dims.b_row + col * dims.b_col)
    } else {
        let ak = t * TILE + UNIT_POS_X;
        (row < m && ak < k, base + row * dims.a_row + ak * dims.a_col)
    };
    let mut value = select(inside, x[select(inside, at, 0) as usize], F::new(0.0));
    if comptime![bf16] {
        value = round_to_bf16::<F>(value);
    }
    value
}

/// This unit's element of the product `a @ b` for batch entry `entry` (or, with
/// `sum_batch`, summed over every batch entry); `meta` from `at` as in
/// `matmul_kernel`. The forms are `matmul_kernel`'s.
#[cube]
#[allow(clippy::too_many_arguments)]
fn product_element<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    meta: &Array<u32>,
    at: u32,
    entry: u32,
    #[comptime] batch_rank: usize,
    #[comptime] sum_batch: bool,
    #[comptime] direct: bool,
    #[comptime] pipelined: bool,
    #[comptime] bf16_operands: bool,
) -> F {
    let tile = comptime!(TILE as usize);
    let mut a_tile = SharedMemory::<F>::new(tile * tile);
    let mut b_tile = SharedMemory::<F>::new(tile * tile);
    let dims = MatmulDims::read(meta, at, batch_rank);
    let (m, n, k) = (dims.m, dims.n, dims.k);
    let (a_rs, a_cs, b_rs, b_cs) = (dims.a_row, dims.a_col, dims.b_row, dims.b_col);

    let tx = UNIT_POS_X;
    let ty = UNIT_POS_Y;
    let row = CUBE_POS_Y * CUBE_DIM_Y + ty;
    let col = CUBE_POS_X * CUBE_DIM_X + tx;
    let mut acc = F::new(0.0);
    // `div_ceil` is not part of the kernel language.
    #[allow(clippy::manual_div_ceil)]
    let tiles = (k + TILE - 1) / TILE;
    let entries = summed_entries(meta, at, batch_rank, sum_batch);
    for pass in 0..entries {
        // Which batch entry this pass computes, and where its operands start.
        let mut rem = entry;
        if comptime![sum_batch] {
            rem = pass;
        }
        let (a_base, b_base) = batch_bases(meta, at, rem, batch_rank);
        if comptime![direct] {
            if row < m && col < n {
                for kk in 0..k {
                    let a_value =
                        operand_value::<F>(a, a_base + row * a_rs + kk * a_cs, bf16_operands);
                    let b_value =
                        operand_value::<F>(b, b_base + kk * b_rs + col * b_cs, bf16_operands);
                    acc += a_value * b_value;
                }
            }
        } else {
            // With `pipelined`, the next tile's operands are read from global memory
            // into registers while this tile is multiplied (two stages).
            let mut a_next = F::new(0.0);
            let mut b_next = F::new(0.0);
            if comptime![pipelined] {
                a_next =
                    tile_operand::<F>(a, meta, at, 0, a_base, false, batch_rank, bf16_operands);
                b_next = tile_operand::<F>(b, meta, at, 0, b_base, true, batch_rank, bf16_operands);
            }
            for t in 0..tiles {
                if comptime![!pipelined] {
                    a_next =
                        tile_operand::<F>(a, meta, at, t, a_base, false, batch_rank, bf16_operands);
                    b_next =
                        tile_operand::<F>(b, meta, at, t, b_base, true, batch_rank, bf16_operands);
                }
                a_tile[(ty * TILE + tx) as usize] = a_next;
                b_tile[(ty * TILE + tx) as usize] = b_next;
                sync_cube();
                if comptime![pipelined] {
                    let next = t + 1;
                    a_next = tile_operand::<F>(
                        a,
                        meta,
                        at,
                        next,
                        a_base,
                        false,
                        batch_rank,
                        bf16_operands,
                    );
                    b_next = tile_operand::<F>(
                        b,
                        meta,
                        at,
                        next,
                        b_base,
                        true,
                        batch_rank,
                        bf16_operands,
                    );
                }
                #[unroll]
                for i in 0..tile {
                    acc += a_tile[ty as usize * tile + i] * b_tile[i * tile + tx as usize];
                }
                sync_cube();
            }
        }
    }
    acc
}

/// `layout.members` matmuls of one shape, their operands bound as `layout` says. Per
/// member, `meta` holds a `MatmulMeta` (`matmul_meta_len` words). Each result is
/// contiguous `[batch..., M, N]`; cubes along z are each member's batch entries in
/// turn.
///
/// With `direct` each unit reads its row of `a` and column of `b` straight from
/// global memory: no shared memory and no barriers, and any cube shape (cheap where
/// barriers are dear, as on CPU rasterisers, or where K is small). Otherwise cubes are
/// `TILE x TILE` and stage operand tiles in shared memory.
///
/// With `pipelined` (tiled only), each tile's global reads are issued before the
/// previous tile is multiplied, so memory latency overlaps the arithmetic.
///
/// With `block` over 1 (direct reads) each unit computes `block x block` outputs
/// (register blocking), and a cube covers `block` times its size along each side.
///
/// With `sum_batch` each member has one batch entry and each cube sums its tile over
/// every batch entry (a weight gradient summed over the batch): the batched product
/// is never written and no reduction kernel follows.
///
/// With an empty `epilogue` member `m`'s product is written to `outputs[m]`.
/// Otherwise the epilogue (a fused elementwise program over the product's shape,
/// whose `Accumulator` is the product) runs on each element in registers and writes
/// its outputs, member by member; `inputs` are bound as for a multi-tensor launch
/// (`epilogue.shared_inputs` once, the rest per member) and `epilogue_meta` holds
/// each member's program metadata in turn.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_kernel<F: Float>(
    operands: &Sequence<Array<F>>,
    inputs: &Sequence<Array<F>>,
    outputs: &mut Sequence<Array<F>>,
    meta: &Array<u32>,
    epilogue_meta: &Array<u32>,
    seed_lo: u32,
    seed_hi: u32,
    rng_step: u32,
    #[comptime] layout: OperandLayout,
    #[comptime] batch_rank: usize,
    #[comptime] sum_batch: bool,
    #[comptime] direct: bool,
    #[comptime] pipelined: bool,
    #[comptime] block: u32,
    #[comptime] bf16_operands: bool,
    #[comptime] epilogue: FusedProgram,
) {
    let dims = MatmulDims::read(meta, 0, batch_rank);
    let (m, n) = (dims.m, dims.n);
    let mut entries = 1u32;
    if comptime![!sum_batch] {
        #[unroll]
        for i in 0..batch_rank {
            entries *= batch_extent(meta, 0, i);
        }
    }
    let member = CUBE_POS_Z / entries;
    let entry = CUBE_POS_Z % entries;
    let meta_len = comptime!(matmul_meta_len(batch_rank));
    let seed = (seed_lo, seed_hi, rng_step);
    #[unroll]
    for s in 0usize..comptime!(layout.members) {
        if member == s as u32 {
            let a = operands.index(comptime!(layout.a(s)));
            let b = operands.index(comptime!(layout.b(s)));
            let at = comptime!(s * meta_len) as u32;
            if comptime![block > 1] {
                let acc = product_block::<F>(
                    a,
                    b,
                    meta,
                    at,
                    entry,
                    batch_rank,
                    sum_batch,
                    block,
                    bf16_operands,
                );
                let row0 = CUBE_POS_Y * CUBE_DIM_Y * block + UNIT_POS_Y;
                let col0 = CUBE_POS_X * CUBE_DIM_X * block + UNIT_POS_X;
                #[unroll]
                for i in 0..block {
                    #[unroll]
                    for j in 0..block {
                        let place = (row0 + i * CUBE_DIM_Y, col0 + j * CUBE_DIM_X, entry);
                        let value = acc[(i * block + j) as usize];
                        write_product::<F>(
                            inputs,
                            outputs,
                            epilogue_meta,
                            place,
                            (m, n),
                            value,
                            seed,
                            s,
                            epilogue.clone(),
                        );
                    }
                }
            } else {
                let acc = product_element::<F>(
                    a,
                    b,
                    meta,
                    at,
                    entry,
                    batch_rank,
                    sum_batch,
                    direct,
                    pipelined,
                    bf16_operands,
                );
                let row = CUBE_POS_Y * CUBE_DIM_Y + UNIT_POS_Y;
                let col = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
                write_product::<F>(
                    inputs,
                    outputs,
                    epilogue_meta,
                    (row, col, entry),
                    (m, n),
                    acc,
                    seed,
                    s,
                    epilogue.clone(),
                );
            }
        }
    }
}
