//! Reference semantics of sparse MoE dispatch: grouping token-and-slot assignments by
//! expert, and the grouped matmuls that read those groups. Written as plain loops over
//! experts and their assignments so the device's tiled kernels have an obvious oracle.

use super::tensor::Real;

/// Assignments grouped by expert: `order` lists assignment ids expert by expert, and
/// expert `e` owns `order[offsets[e]..offsets[e + 1]]`.
pub(super) struct ExpertGroups<'a> {
    pub order: &'a [i32],
    pub offsets: &'a [i32],
}

/// Why a grouping cannot be used: the offending value and the bound it broke.
pub(super) struct BadGroup {
    pub value: i64,
    pub size: usize,
}

/// Assignment ids sorted stably by expert id.
pub(super) fn expert_order(index: &[i32], experts: usize) -> Result<Vec<i32>, BadGroup> {
    if let Some(&bad) = index.iter().find(|&&e| e < 0 || e as usize >= experts) {
        return Err(BadGroup {
            value: bad.into(),
            size: experts,
        });
    }
    let mut order: Vec<i32> = (0..index.len() as i32).collect();
    order.sort_by_key(|&a| index[a as usize]);
    Ok(order)
}

/// Where each of `experts` runs starts in the expert order, then the assignment count.
pub(super) fn expert_offsets(index: &[i32], experts: usize) -> Result<Vec<i32>, BadGroup> {
    let mut counts = vec![0i32; experts];
    for &e in index {
        match usize::try_from(e).ok().filter(|&e| e < experts) {
            Some(e) => counts[e] += 1,
            None => {
                return Err(BadGroup {
                    value: e.into(),
                    size: experts,
                })
            }
        }
    }
    let mut offsets = Vec::with_capacity(experts + 1);
    let mut start = 0;
    offsets.push(0);
    for c in counts {
        start += c;
        offsets.push(start);
    }
    Ok(offsets)
}

impl ExpertGroups<'_> {
    /// `(expert, assignment)` pairs, expert by expert, after checking that the groups
    /// cover each of the `order.len()` assignments exactly once.
    fn assignments(&self) -> Result<Vec<(usize, usize)>, BadGroup> {
        let n = self.order.len();
        let last = *self
            .offsets
            .last()
            .expect("offsets have experts + 1 entries");
        if last as usize != n || self.offsets.windows(2).any(|w| w[0] > w[1] || w[0] < 0) {
            return Err(BadGroup {
                value: last.into(),
                size: n,
            });
        }
        let mut seen = vec![false; n];
        let mut pairs = Vec::with_capacity(n);
        for e in 0..self.offsets.len() - 1 {
            for &a in &self.order[self.offsets[e] as usize..self.offsets[e + 1] as usize] {
                match usize::try_from(a).ok().filter(|&a| a < n && !seen[a]) {
                    Some(a) => {
                        seen[a] = true;
                        pairs.push((e, a));
                    }
                    None => {
                        return Err(BadGroup {
                            value: a.into(),
                            size: n,
                        })
                    }
                }
            }
        }
        Ok(pairs)
    }
}

/// Rows `[rows, width]` read by assignments: assignment `a` reads row `a / fan`.
pub(super) struct AssignmentRows<'a, T> {
    pub values: &'a [T],
    pub rows: usize,
    pub width: usize,
}

impl<T: Copy> AssignmentRows<'_, T> {
    fn row(&self, assignment: usize, assignments: usize) -> &[T] {
        let r = assignment / (assignments / self.rows.max(1)).max(1);
        &self.values[r * self.width..(r + 1) * self.width]
    }
}

/// `out[a] = x[row(a)] @ w[e(a)] (+ bias[e(a)])`; `w` is `[E, K, M]`, or `[E, M, K]`
/// when `transpose_w`. Returns `[assignments, M]`.
pub(super) fn expert_matmul<T: Real>(
    x: &AssignmentRows<T>,
    w: &[T],
    m: usize,
    transpose_w: bool,
    bias: Option<&[T]>,
    groups: &ExpertGroups,
) -> Result<Vec<T>, BadGroup> {
    let n = groups.order.len();
    let k = x.width;
    let mut out = vec![T::zero(); n * m];
    for (e, a) in groups.assignments()? {
        let row = x.row(a, n);
        let we = &w[e * k * m..(e + 1) * k * m];
        for j in 0..m {
            let mut acc = bias.map_or(T::zero(), |b| b[e * m + j]);
            for (i, &xi) in row.iter().enumerate() {
                let wij = if transpose_w {
                    we[j * k + i]
                } else {
                    we[i * m + j]
                };
                acc = acc + xi * wij;
            }
            out[a * m + j] = acc;
        }
    }
    Ok(out)
}

/// `out[e] = sum over e's assignments of a[row(a)]^T b[row(b)]`, `[E, K, M]`.
pub(super) fn expert_weight_grad<T: Real>(
    a: &AssignmentRows<T>,
    b: &AssignmentRows<T>,
    groups: &ExpertGroups,
) -> Result<Vec<T>, BadGroup> {
    let n = groups.order.len();
    let (k, m) = (a.width, b.width);
    let experts = groups.offsets.len() - 1;
    let mut out = vec![T::zero(); experts * k * m];
    for (e, asg) in groups.assignments()? {
        let (ra, rb) = (a.row(asg, n), b.row(asg, n));
        let oe = &mut out[e * k * m..(e + 1) * k * m];
        for (i, &ai) in ra.iter().enumerate() {
            for (j, &bj) in rb.iter().enumerate() {
                oe[i * m + j] = oe[i * m + j] + ai * bj;
            }
        }
    }
    Ok(out)
}
