//! Sparse MoE dispatch: grouping token-and-slot assignments by expert, and the grouped
//! expert matmuls over those groups.
//!
//! Assignments are sorted by expert once (a stable counting sort in one cube), so a
//! tile of 16 sorted assignments spans few experts: the grouped matmul loads each
//! expert's weight tile once per tile of rows and every row accumulates only with its
//! own expert's weights. Rows are gathered from the token activations while loading
//! (a token feeds all of its slots), and results are written straight back to the
//! assignment's place, so nothing is permuted in memory. Experts that receive no
//! assignment cost nothing; one that receives all of them is just a long run.

use crate::autotune::{bucket, Candidate, KernelKey, LaunchRecord, TunableLaunch};
use crate::device::{buffer_arg, tiles_of, word, Kernels, ELEMENT_BYTES};
use crate::matmul::kernel::{accumulate_outer, operand_value, round_to_bf16, zeroed_block, TILE};
use crate::matmul::launch::MatmulStrategy;
use crate::view::View;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::tune::LocalTuner;

/// The expert owning sorted position `p`: the last `e` whose run starts at or before
/// `p` (empty experts share their start with the next one, which wins).
#[cube]
fn expert_at<F: Float>(offsets: &Array<F>, p: u32, #[comptime] experts: u32) -> u32 {
    let mut e = 0u32;
    for i in 1..experts {
        if u32::cast_from(offsets[i as usize]) <= p {
            e = i;
        }
    }
    e
}

/// The cube's tile of assignment rows: launches fold row tiles past CUDA's 65,535
/// cubes in y into z (`row_tile_grid`), as a batch of 1,024 paper-scale sequences
/// has a million assignments.
#[cube]
fn row_tile() -> u32 {
    CUBE_POS_Z * CUBE_COUNT_Y + CUBE_POS_Y
}

/// The (y, z) cube counts covering `tiles` row tiles, y within CUDA's 65,535.
fn row_tile_grid(tiles: u32) -> (u32, u32) {
    const MAX_Y: u32 = 65_535;
    let z = tiles.div_ceil(MAX_Y).max(1);
    (tiles.div_ceil(z), z)
}

/// One cube of `lanes` units groups `n` assignments (expert ids in `index`): each lane
/// counts its contiguous chunk per expert, lane 0 turns the counts into start
/// positions (expert-major, lane-minor, so the sort is stable), and with `write_order`
/// each lane then places its chunk's assignment ids. `offsets` gets each expert's start
/// and finally `n`. Ids outside the pool are skipped (the reference reports them).
#[cube(launch_unchecked)]
pub(crate) fn expert_groups_kernel<F: Float>(
    index: &Array<F>,
    order: &mut Array<F>,
    offsets: &mut Array<F>,
    n: u32,
    #[comptime] experts: u32,
    #[comptime] lanes: u32,
    #[comptime] write_order: bool,
) {
    let mut counts = SharedMemory::<u32>::new(comptime!((lanes * experts) as usize));
    let lane = UNIT_POS_X;
    #[allow(clippy::manual_div_ceil)]
    let chunk = (n + lanes - 1) / lanes;
    let start = lane * chunk;
    let end = select(start + chunk < n, start + chunk, n);
    for e in 0..experts {
        counts[(lane * experts + e) as usize] = 0u32;
    }
    for a in start..end {
        let e = u32::cast_from(index[a as usize]);
        if e < experts {
            counts[(lane * experts + e) as usize] += 1u32;
        }
    }
    sync_cube();
    if lane == 0 {
        let mut base = 0u32;
        for e in 0..experts {
            offsets[e as usize] = F::cast_from(base);
            for l in 0..lanes {
                let c = counts[(l * experts + e) as usize];
                counts[(l * experts + e) as usize] = base;
                base += c;
            }
        }
        offsets[experts as usize] = F::cast_from(base);
    }
    sync_cube();
    if comptime![write_order] {
        for a in start..end {
            let e = u32::cast_from(index[a as usize]);
            if e < experts {
                let slot = (lane * experts + e) as usize;
                let p = counts[slot];
                order[p as usize] = F::cast_from(a);
                counts[slot] = p + 1;
            }
        }
    }
}

/// This unit's element of `x`'s tile `t`: its assignment's row at column
/// `t * TILE + UNIT_POS_X`, or 0 past the row's end or for a unit without an
/// assignment.
#[cube]
fn x_tile_value<F: Float>(
    x: &Array<F>,
    valid: bool,
    x_row: u32,
    k: u32,
    t: u32,
    #[comptime] bf16_operands: bool,
) -> F {
    let xk = t * TILE + UNIT_POS_X;
    let x_ok = valid && xk < k;
    let mut value = select(
        x_ok,
        x[select(x_ok, x_row * k + xk, 0) as usize],
        F::new(0.0),
    );
    if comptime![bf16_operands] {
        value = round_to_bf16::<F>(value);
    }
    value
}

/// The grouped expert matmul's metadata. The layout lives here only: `words` writes
/// it on the host and `read` reads it in the kernel, field by field in this order.
#[derive(CubeType, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GroupedMeta {
    /// Assignments: rows of the output.
    pub assignments: u32,
    pub k: u32,
    pub m: u32,
    /// Assignments per row of `x`.
    pub fan: u32,
    /// The weights' strides along expert, K and M, and their offset.
    pub w_expert: u32,
    pub w_k: u32,
    pub w_m: u32,
    pub w_offset: u32,
    /// The bias's strides along expert and M, and its offset.
    pub bias_expert: u32,
    pub bias_m: u32,
    pub bias_offset: u32,
}

impl GroupedMeta {
    pub fn words(&self) -> Vec<u32> {
        vec![
            self.assignments,
            self.k,
            self.m,
            self.fan,
            self.w_expert,
            self.w_k,
            self.w_m,
            self.w_offset,
            self.bias_expert,
            self.bias_m,
            self.bias_offset,
        ]
    }
}

#[cube]
impl GroupedMeta {
    pub fn read(meta: &Array<u32>) -> GroupedMeta {
        GroupedMeta {
            assignments: meta[0],
            k: meta[1],
            m: meta[2],
            fan: meta[3],
            w_expert: meta[4],
            w_k: meta[5],
            w_m: meta[6],
            w_offset: meta[7],
            bias_expert: meta[8],
            bias_m: meta[9],
            bias_offset: meta[10],
        }
    }
}

/// The expert weight gradient's metadata, written by `words` and read by `read`.
#[derive(CubeType, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GradMeta {
    pub k: u32,
    pub m: u32,
    /// Assignments per row of `a` and of `b`.
    pub fan_a: u32,
    pub fan_b: u32,
}

impl GradMeta {
    pub fn words(&self) -> Vec<u32> {
        vec![self.k, self.m, self.fan_a, self.fan_b]
    }
}

#[cube]
impl GradMeta {
    pub fn read(meta: &Array<u32>) -> GradMeta {
        GradMeta {
            k: meta[0],
            m: meta[1],
            fan_a: meta[2],
            fan_b: meta[3],
        }
    }
}

/// `out[a] = x[a / fan] @ w[e(a)] (+ bias[e(a)])` for the assignments at sorted
/// positions `row_tile() * TILE ..` and output columns `CUBE_POS_X * TILE ..`. `x` is
/// contiguous `[rows, K]`, `out` contiguous `[assignments, M]`. `meta`: a
/// `GroupedMeta`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn expert_matmul_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    bias: &Array<F>,
    order: &Array<F>,
    offsets: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] experts: u32,
    #[comptime] has_bias: bool,
    #[comptime] bf16_operands: bool,
    #[comptime] direct: bool,
    #[comptime] pipelined: bool,
    #[comptime] block: u32,
) {
    if comptime![block > 1] {
        expert_matmul_block::<F>(
            x,
            w,
            bias,
            order,
            offsets,
            out,
            meta,
            experts,
            has_bias,
            bf16_operands,
            block,
        );
        terminate!();
    }
    let tile = comptime!(TILE as usize);
    let mut x_tile = SharedMemory::<F>::new(tile * tile);
    let mut w_tile = SharedMemory::<F>::new(tile * tile);
    let lay = GroupedMeta::read(meta);
    let (n, k, m, fan) = (lay.assignments, lay.k, lay.m, lay.fan);
    let (w_se, w_sk, w_sm, w_off) = (lay.w_expert, lay.w_k, lay.w_m, lay.w_offset);
    let tx = UNIT_POS_X;
    let ty = UNIT_POS_Y;
    let first = row_tile() * CUBE_DIM_Y;
    let p = first + ty;
    let col = CUBE_POS_X * CUBE_DIM_X + tx;
    let valid = p < n;
    let assignment = u32::cast_from(order[select(valid, p, 0) as usize]);
    let own_expert = expert_at::<F>(offsets, select(valid, p, 0), experts);
    let x_row = assignment / fan;
    let mut acc = F::new(0.0);
    if comptime![direct] {
        // Each unit reads its row and its expert's column directly: no shared
        // memory, no barriers.
        if valid && col < m {
            for kk in 0..k {
                let x_value = operand_value::<F>(x, x_row * k + kk, bf16_operands);
                let w_at = w_off + own_expert * w_se + kk * w_sk + col * w_sm;
                acc += x_value * operand_value::<F>(w, w_at, bf16_operands);
            }
        }
    } else {
        let last = select(first + TILE <= n, first + TILE, n) - 1;
        let first_expert = expert_at::<F>(offsets, first, experts);
        let last_expert = expert_at::<F>(offsets, last, experts);
        #[allow(clippy::manual_div_ceil)]
        let k_tiles = (k + TILE - 1) / TILE;
        // With `pipelined`, the next tile's row values are read from global memory
        // while this tile is multiplied with each expert's weights (two stages).
        let mut x_next = F::new(0.0);
        if comptime![pipelined] {
            x_next = x_tile_value::<F>(x, valid, x_row, k, 0, bf16_operands);
        }
        for t in 0..k_tiles {
            if comptime![!pipelined] {
                x_next = x_tile_value::<F>(x, valid, x_row, k, t, bf16_operands);
            }
            x_tile[(ty * TILE + tx) as usize] = x_next;
            if comptime![pipelined] {
                x_next = x_tile_value::<F>(x, valid, x_row, k, t + 1, bf16_operands);
            }
            let wk = t * TILE + ty;
            let w_ok = wk < k && col < m;
            for e in first_expert..last_expert + 1 {
                let at = w_off + e * w_se + wk * w_sk + col * w_sm;
                let mut w_value = select(w_ok, w[select(w_ok, at, 0) as usize], F::new(0.0));
                if comptime![bf16_operands] {
                    w_value = round_to_bf16::<F>(w_value);
                }
                w_tile[(ty * TILE + tx) as usize] = w_value;
                sync_cube();
                if own_expert == e {
                    #[unroll]
                    for i in 0..tile {
                        acc += x_tile[ty as usize * tile + i] * w_tile[i * tile + tx as usize];
                    }
                }
                sync_cube();
            }
        }
    }
    if valid && col < m {
        if comptime![has_bias] {
            acc +=
                bias[(lay.bias_offset + own_expert * lay.bias_expert + col * lay.bias_m) as usize];
        }
        out[(assignment * m + col) as usize] = acc;
    }
}

/// `expert_matmul_kernel` with direct reads, each unit computing `block` consecutive
/// sorted assignments by `block` columns (`CUBE_DIM_X` apart). Where the unit's rows
/// all belong to one expert (the usual case: assignments are sorted by expert), `block`
/// weight loads feed `block * block` multiply-adds; rows of different experts each
/// read their own expert's weights.
#[cube]
#[allow(clippy::too_many_arguments)]
fn expert_matmul_block<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    bias: &Array<F>,
    order: &Array<F>,
    offsets: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] experts: u32,
    #[comptime] has_bias: bool,
    #[comptime] bf16_operands: bool,
    #[comptime] block: u32,
) {
    let lay = GroupedMeta::read(meta);
    let (n, k, m, fan) = (lay.assignments, lay.k, lay.m, lay.fan);
    let (w_se, w_sk, w_sm, w_off) = (lay.w_expert, lay.w_k, lay.w_m, lay.w_offset);
    let first = (row_tile() * CUBE_DIM_Y + UNIT_POS_Y) * block;
    let col0 = CUBE_POS_X * CUBE_DIM_X * block + UNIT_POS_X;
    let mut x_rows = Array::<u32>::new(comptime!(block as usize));
    let mut row_experts = Array::<u32>::new(comptime!(block as usize));
    let mut assignments = Array::<u32>::new(comptime!(block as usize));
    let mut acc = zeroed_block::<F>(block);
    let mut x_values = Array::<F>::new(comptime!(block as usize));
    let mut w_values = Array::<F>::new(comptime!(block as usize));
    let mut one_expert = true;
    #[unroll]
    for i in 0..block {
        let p = select(first + i < n, first + i, 0);
        let assignment = u32::cast_from(order[p as usize]);
        assignments[i as usize] = assignment;
        x_rows[i as usize] = assignment / fan;
        row_experts[i as usize] = expert_at::<F>(offsets, p, experts);
        // Rows past the end repeat row 0's expert and are never written.
        if first + i < n && row_experts[i as usize] != row_experts[0] {
            one_expert = false;
        }
    }
    for kk in 0..k {
        #[unroll]
        for i in 0..block {
            x_values[i as usize] =
                operand_value::<F>(x, x_rows[i as usize] * k + kk, bf16_operands);
        }
        if one_expert {
            #[unroll]
            for j in 0..block {
                let col = col0 + j * CUBE_DIM_X;
                let at = w_off + row_experts[0] * w_se + kk * w_sk + col * w_sm;
                w_values[j as usize] = operand_value::<F>(w, select(col < m, at, 0), bf16_operands);
            }
            accumulate_outer::<F>(&mut acc, &x_values, &w_values, block);
        } else {
            #[unroll]
            for i in 0..block {
                #[unroll]
                for j in 0..block {
                    let col = col0 + j * CUBE_DIM_X;
                    let at = w_off + row_experts[i as usize] * w_se + kk * w_sk + col * w_sm;
                    let value = operand_value::<F>(w, select(col < m, at, 0), bf16_operands);
                    acc[(i * block + j) as usize] += x_values[i as usize] * value;
                }
            }
        }
    }
    #[unroll]
    for i in 0..block {
        #[unroll]
        for j in 0..block {
            let col = col0 + j * CUBE_DIM_X;
            if first + i < n && col < m {
                let mut value = acc[(i * block + j) as usize];
                if comptime![has_bias] {
                    let e = row_experts[i as usize];
                    value +=
                        bias[(lay.bias_offset + e * lay.bias_expert + col * lay.bias_m) as usize];
                }
                out[(assignments[i as usize] * m + col) as usize] = value;
            }
        }
    }
}

/// `out[e] = sum over e's assignments a of A[a / fan_a]^T B[a / fan_b]` for expert
/// `CUBE_POS_Z`, rows `CUBE_POS_Y * TILE ..` of K and columns `CUBE_POS_X * TILE ..`
/// of M. `a` (`[rows_a, K]`) and `b` (`[rows_b, M]`) are contiguous, `out` is
/// contiguous `[E, K, M]`; an expert with no assignment gets zeros. `meta`: a
/// `GradMeta`.
#[cube(launch_unchecked)]
pub(crate) fn expert_weight_grad_kernel<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    order: &Array<F>,
    offsets: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] bf16_operands: bool,
    #[comptime] block: u32,
) {
    // A comptime branch, not `terminate!()` after the direct form: cubecl-cpp 0.10
    // still emits the code after `terminate!()` but drops its shared-memory
    // declarations, and NVRTC then fails with `identifier "shared_memory_55" is
    // undefined`.
    if comptime![block > 0] {
        expert_weight_grad_direct::<F>(a, b, order, offsets, out, meta, bf16_operands, block);
    } else {
        expert_weight_grad_tiled::<F>(a, b, order, offsets, out, meta, bf16_operands);
    }
}

/// `expert_weight_grad_kernel` with shared-memory tiles: the cube stages `TILE`
/// assignments of `a` and `b` at a time and every unit sums its element over them.
#[cube]
fn expert_weight_grad_tiled<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    order: &Array<F>,
    offsets: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] bf16_operands: bool,
) {
    let tile = comptime!(TILE as usize);
    let mut a_tile = SharedMemory::<F>::new(tile * tile);
    let mut b_tile = SharedMemory::<F>::new(tile * tile);
    let lay = GradMeta::read(meta);
    let (k, m, fan_a, fan_b) = (lay.k, lay.m, lay.fan_a, lay.fan_b);
    let e = CUBE_POS_Z;
    let tx = UNIT_POS_X;
    let ty = UNIT_POS_Y;
    let row = CUBE_POS_Y * TILE + ty;
    let col = CUBE_POS_X * TILE + tx;
    // Loading: unit (ty, tx) brings assignment `start + ty` of the chunk, element tx of
    // this cube's K (for a) and M (for b) ranges.
    let a_col = CUBE_POS_Y * TILE + tx;
    let start = u32::cast_from(offsets[e as usize]);
    let end = u32::cast_from(offsets[e as usize + 1]);
    let mut acc = F::new(0.0);
    #[allow(clippy::manual_div_ceil)]
    let chunks = (end - start + TILE - 1) / TILE;
    for c in 0..chunks {
        let p = start + c * TILE + ty;
        let has = p < end;
        let assignment = u32::cast_from(order[select(has, p, 0) as usize]);
        let a_ok = has && a_col < k;
        let b_ok = has && col < m;
        let a_at = select(a_ok, (assignment / fan_a) * k + a_col, 0);
        let b_at = select(b_ok, (assignment / fan_b) * m + col, 0);
        let mut a_value = select(a_ok, a[a_at as usize], F::new(0.0));
        let mut b_value = select(b_ok, b[b_at as usize], F::new(0.0));
        if comptime![bf16_operands] {
            a_value = round_to_bf16::<F>(a_value);
            b_value = round_to_bf16::<F>(b_value);
        }
        a_tile[(ty * TILE + tx) as usize] = a_value;
        b_tile[(ty * TILE + tx) as usize] = b_value;
        sync_cube();
        #[unroll]
        for r in 0..tile {
            acc += a_tile[r * tile + ty as usize] * b_tile[r * tile + tx as usize];
        }
        sync_cube();
    }
    if row < k && col < m {
        out[((e * k + row) * m + col) as usize] = acc;
    }
}

/// `expert_weight_grad_kernel` with direct reads: each unit computes `block x block`
/// elements of its expert's `[K, M]` gradient (rows and columns `CUBE_DIM` apart),
/// walking the expert's assignments; `2 * block` loads feed `block * block`
/// multiply-adds, with no shared memory or barriers.
#[cube]
#[allow(clippy::too_many_arguments)]
fn expert_weight_grad_direct<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    order: &Array<F>,
    offsets: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    #[comptime] bf16_operands: bool,
    #[comptime] block: u32,
) {
    let lay = GradMeta::read(meta);
    let (k, m, fan_a, fan_b) = (lay.k, lay.m, lay.fan_a, lay.fan_b);
    let e = CUBE_POS_Z;
    let row0 = CUBE_POS_Y * CUBE_DIM_Y * block + UNIT_POS_Y;
    let col0 = CUBE_POS_X * CUBE_DIM_X * block + UNIT_POS_X;
    let start = u32::cast_from(offsets[e as usize]);
    let end = u32::cast_from(offsets[e as usize + 1]);
    let mut acc = zeroed_block::<F>(block);
    let mut a_values = Array::<F>::new(comptime!(block as usize));
    let mut b_values = Array::<F>::new(comptime!(block as usize));
    for p in start..end {
        let assignment = u32::cast_from(order[p as usize]);
        let a_base = (assignment / fan_a) * k;
        let b_base = (assignment / fan_b) * m;
        // Rows and columns past the gradient read element 0; they are never written.
        #[unroll]
        for i in 0..block {
            let row = row0 + i * CUBE_DIM_Y;
            a_values[i as usize] =
                operand_value::<F>(a, select(row < k, a_base + row, 0), bf16_operands);
            let col = col0 + i * CUBE_DIM_X;
            b_values[i as usize] =
                operand_value::<F>(b, select(col < m, b_base + col, 0), bf16_operands);
        }
        accumulate_outer::<F>(&mut acc, &a_values, &b_values, block);
    }
    #[unroll]
    for i in 0..block {
        #[unroll]
        for j in 0..block {
            let row = row0 + i * CUBE_DIM_Y;
            let col = col0 + j * CUBE_DIM_X;
            if row < k && col < m {
                out[((e * k + row) * m + col) as usize] = acc[(i * block + j) as usize];
            }
        }
    }
}

/// Units of the grouping cube: as many lanes as keep the per-lane counts within 16 KiB
/// of shared memory (what every backend offers).
fn grouping_lanes(experts: usize) -> u32 {
    assert!(
        (1..=4096).contains(&experts),
        "expert grouping supports 1 to 4096 experts, got {experts}"
    );
    (4096 / experts).clamp(1, 256) as u32
}

/// One grouped expert matmul launch, owned so the tuner can replay it with each
/// candidate (the dense matmul's: shared-memory tiles, or direct reads).
#[derive(Clone)]
struct ExpertLaunch<R: Runtime> {
    client: ComputeClient<R>,
    x: (Handle, usize),
    w: (Handle, usize),
    bias: (Handle, usize),
    order: (Handle, usize),
    offsets: (Handle, usize),
    meta: (Handle, usize),
    /// `(assignments, m)`.
    extent: (usize, usize),
    experts: u32,
    has_bias: bool,
    bf16_operands: bool,
    record: LaunchRecord<MatmulStrategy>,
}

impl<R: Runtime> TunableLaunch for ExpertLaunch<R> {
    type With = MatmulStrategy;

    fn record(&self) -> &LaunchRecord<MatmulStrategy> {
        &self.record
    }

    fn launch(&self, strategy: MatmulStrategy) -> Vec<Handle> {
        let (assignments, m) = self.extent;
        let out = self.client.empty(assignments * m * ELEMENT_BYTES);
        let edge = strategy.edge();
        let span = edge * strategy.block();
        unsafe {
            expert_matmul_kernel::launch_unchecked::<f32, R>(
                &self.client,
                {
                    let (y, z) = row_tile_grid(tiles_of(assignments, span));
                    CubeCount::Static(tiles_of(m, span), y, z)
                },
                CubeDim::new_2d(edge, edge),
                buffer_arg(&self.x),
                buffer_arg(&self.w),
                buffer_arg(&self.bias),
                buffer_arg(&self.order),
                buffer_arg(&self.offsets),
                ArrayArg::from_raw_parts(out.clone(), assignments * m),
                buffer_arg(&self.meta),
                self.experts,
                self.has_bias,
                self.bf16_operands,
                matches!(
                    strategy,
                    MatmulStrategy::Direct { .. } | MatmulStrategy::Blocked { .. }
                ),
                strategy == MatmulStrategy::Pipelined,
                strategy.block(),
            )
        };
        vec![out]
    }
}

/// How the expert weight gradient runs (the tuning candidates): shared-memory tiles,
/// or direct reads with each unit computing `block x block` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertGradStrategy {
    Tiled,
    Direct { block: u32 },
}

impl Candidate for ExpertGradStrategy {
    const ALL: &'static [ExpertGradStrategy] = &[
        ExpertGradStrategy::Tiled,
        ExpertGradStrategy::Direct { block: 1 },
        ExpertGradStrategy::Direct { block: 2 },
        ExpertGradStrategy::Direct { block: 4 },
    ];

    fn name(&self) -> String {
        match self {
            ExpertGradStrategy::Tiled => format!("tiled-{TILE}x{TILE}"),
            ExpertGradStrategy::Direct { block: 1 } => format!("direct-{GRAD_EDGE}x{GRAD_EDGE}"),
            ExpertGradStrategy::Direct { block } => {
                format!("direct-{GRAD_EDGE}x{GRAD_EDGE}-block-{block}x{block}")
            }
        }
    }
}

/// Units along each side of a direct weight-gradient cube.
const GRAD_EDGE: u32 = 8;

/// One expert weight-gradient launch, owned so the tuner can replay it.
#[derive(Clone)]
struct ExpertGradLaunch<R: Runtime> {
    client: ComputeClient<R>,
    a: (Handle, usize),
    b: (Handle, usize),
    order: (Handle, usize),
    offsets: (Handle, usize),
    meta: (Handle, usize),
    /// `(experts, k, m)`.
    extent: (usize, usize, usize),
    bf16_operands: bool,
    record: LaunchRecord<ExpertGradStrategy>,
}

impl<R: Runtime> TunableLaunch for ExpertGradLaunch<R> {
    type With = ExpertGradStrategy;

    fn record(&self) -> &LaunchRecord<ExpertGradStrategy> {
        &self.record
    }

    fn launch(&self, strategy: ExpertGradStrategy) -> Vec<Handle> {
        let (experts, k, m) = self.extent;
        let out = self.client.empty((experts * k * m).max(1) * ELEMENT_BYTES);
        let (edge, block) = match strategy {
            ExpertGradStrategy::Tiled => (TILE, 0),
            ExpertGradStrategy::Direct { block } => (GRAD_EDGE, block),
        };
        let span = edge * block.max(1);
        unsafe {
            expert_weight_grad_kernel::launch_unchecked::<f32, R>(
                &self.client,
                CubeCount::Static(tiles_of(m, span), tiles_of(k, span), word(experts)),
                CubeDim::new_2d(edge, edge),
                buffer_arg(&self.a),
                buffer_arg(&self.b),
                buffer_arg(&self.order),
                buffer_arg(&self.offsets),
                ArrayArg::from_raw_parts(out.clone(), (experts * k * m).max(1)),
                buffer_arg(&self.meta),
                self.bf16_operands,
                block,
            )
        };
        vec![out]
    }
}

/// A grouped expert matmul's operands; see `Op::ExpertMatMul` in the compiler.
pub struct ExpertMatmul<'a> {
    /// Contiguous `[rows, k]`; assignment `a` reads row `a / (assignments / rows)`.
    pub x: &'a Handle,
    pub rows: usize,
    pub k: usize,
    /// `[E, k, m]`, or `[E, m, k]` when `transpose_w`.
    pub w: &'a View,
    pub transpose_w: bool,
    pub m: usize,
    /// `[E, m]`.
    pub bias: Option<&'a View>,
    pub order: &'a Handle,
    pub offsets: &'a Handle,
    pub assignments: usize,
    pub experts: usize,
    pub bf16_operands: bool,
}

impl<R: Runtime> Kernels<R> {
    fn expert_groups(&self, index: &Handle, n: usize, experts: usize, order: bool) -> Handle {
        let out_order = self.alloc(if order { n } else { 1 });
        let offsets = self.alloc(experts + 1);
        let lanes = grouping_lanes(experts);
        unsafe {
            expert_groups_kernel::launch_unchecked::<f32, R>(
                self.client(),
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(lanes),
                ArrayArg::from_raw_parts(index.clone(), n.max(1)),
                ArrayArg::from_raw_parts(out_order.clone(), n.max(1)),
                ArrayArg::from_raw_parts(offsets.clone(), experts + 1),
                word(n),
                word(experts),
                lanes,
                order,
            )
        };
        if order {
            out_order
        } else {
            offsets
        }
    }

    /// The `n` contiguous expert ids' positions sorted stably by expert.
    pub fn expert_order(&self, index: &Handle, n: usize, experts: usize) -> Handle {
        self.expert_groups(index, n, experts, true)
    }

    /// Where each expert's run starts in the expert order, then `n`.
    pub fn expert_offsets(&self, index: &Handle, n: usize, experts: usize) -> Handle {
        self.expert_groups(index, n, experts, false)
    }

    /// `[assignments, m]`: each assignment's row times its expert's weights.
    pub fn expert_matmul(&self, op: &ExpertMatmul) -> Handle {
        if op.assignments == 0 {
            return self.alloc(0);
        }
        let s = &op.w.strides;
        let (sk, sm) = if op.transpose_w {
            (s[2], s[1])
        } else {
            (s[1], s[2])
        };
        let fan = op.assignments / op.rows.max(1);
        let bias = op.bias.unwrap_or(op.w);
        let meta = GroupedMeta {
            assignments: word(op.assignments),
            k: word(op.k),
            m: word(op.m),
            fan: word(fan),
            w_expert: word(s[0]),
            w_k: word(sk),
            w_m: word(sm),
            w_offset: word(op.w.offset),
            bias_expert: word(bias.strides[0]),
            bias_m: word(bias.strides[1]),
            bias_offset: word(bias.offset),
        }
        .words();
        let launch = ExpertLaunch {
            client: self.client().clone(),
            x: (op.x.clone(), (op.rows * op.k).max(1)),
            w: (op.w.handle.clone(), op.w.len.max(1)),
            bias: (bias.handle.clone(), bias.len.max(1)),
            order: (op.order.clone(), op.assignments),
            offsets: (op.offsets.clone(), op.experts + 1),
            meta: self.upload_once(meta),
            extent: (op.assignments, op.m),
            experts: word(op.experts),
            has_bias: op.bias.is_some(),
            bf16_operands: op.bf16_operands,
            record: LaunchRecord::new(KernelKey {
                family: GROUPED_MATMUL.into(),
                signature: format!(
                    "rows{} k{} m{} experts{}{}{}",
                    bucket(op.assignments),
                    bucket(op.k),
                    bucket(op.m),
                    op.experts,
                    if op.bias.is_some() { " bias" } else { "" },
                    if op.bf16_operands { " bf16" } else { "" }
                ),
            }),
        };
        self.tuning()
            .launch(&GROUPED_MATMUL_TUNER, self.client(), launch)
            .into_iter()
            .next()
            .expect("one output")
    }

    /// `[experts, k, m]`: per expert, the sum over its assignments of
    /// `a[row]^T b[row]`, with `a` contiguous `[a_rows, k]` and `b` `[b_rows, m]`.
    #[allow(clippy::too_many_arguments)]
    pub fn expert_weight_grad(
        &self,
        (a, a_rows, k): (&Handle, usize, usize),
        (b, b_rows, m): (&Handle, usize, usize),
        order: &Handle,
        offsets: &Handle,
        assignments: usize,
        experts: usize,
        bf16_operands: bool,
    ) -> Handle {
        let fan = |rows: usize| assignments / rows.max(1);
        let meta = GradMeta {
            k: word(k),
            m: word(m),
            fan_a: word(fan(a_rows).max(1)),
            fan_b: word(fan(b_rows).max(1)),
        }
        .words();
        let launch = ExpertGradLaunch {
            client: self.client().clone(),
            a: (a.clone(), (a_rows * k).max(1)),
            b: (b.clone(), (b_rows * m).max(1)),
            order: (order.clone(), assignments.max(1)),
            offsets: (offsets.clone(), experts + 1),
            meta: self.upload_once(meta),
            extent: (experts, k, m),
            bf16_operands,
            record: LaunchRecord::new(KernelKey {
                family: EXPERT_GRAD.into(),
                signature: format!(
                    "assignments{} k{} m{} experts{}{}",
                    bucket(assignments),
                    bucket(k),
                    bucket(m),
                    experts,
                    if bf16_operands { " bf16" } else { "" }
                ),
            }),
        };
        self.tuning()
            .launch(&EXPERT_GRAD_TUNER, self.client(), launch)
            .into_iter()
            .next()
            .expect("one output")
    }
}

/// The family's name in kernel keys, and its tuner.
pub(crate) const GROUPED_MATMUL: &str = "grouped expert matmul";
pub(crate) static GROUPED_MATMUL_TUNER: LocalTuner<KernelKey, String> =
    LocalTuner::new(concat!("altc_kernels::tune", "-grouped-matmul")); // named as before the move: cubecl keys its cache files by it
/// The family's name in kernel keys, and its tuner.
pub(crate) const EXPERT_GRAD: &str = "expert weight gradient";
pub(crate) static EXPERT_GRAD_TUNER: LocalTuner<KernelKey, String> =
    LocalTuner::new(concat!("altc_kernels::tune", "-expert-grad")); // named as before the move: cubecl keys its cache files by it
