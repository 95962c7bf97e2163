//! The rule library: algebraic identities and the scalar-factor rules that move an
//! update's per-element multiplications and divisions onto its scalars, each
//! checking types through the analysis before it applies.

use super::analysis::{class_type, IrGraph, TypeAnalysis};
use super::language::IrNode;
use crate::ir::{BinaryOp, Op, Scalar, UnaryOp};
use egg::{Applier, Id, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol};

/// What a rule puts in a class: one of its existing classes, or a new node over
/// further replacements (built bottom-up).
pub(super) enum Replacement {
    Existing(Id),
    New(Op, Vec<Replacement>),
}

/// A new node `op` over existing classes.
pub(super) fn over(op: Op, children: &[Id]) -> Replacement {
    Replacement::New(
        op,
        children.iter().map(|&c| Replacement::Existing(c)).collect(),
    )
}

/// Adds what `replacement` describes to the e-graph; its class.
pub(super) fn add_replacement(egraph: &mut IrGraph, replacement: Replacement) -> Id {
    match replacement {
        Replacement::Existing(id) => id,
        Replacement::New(op, children) => {
            let children = children
                .into_iter()
                .map(|c| add_replacement(egraph, c))
                .collect();
            egraph.add(IrNode { op, children })
        }
    }
}

/// A rule looks at one node of a class (with the whole e-graph for its operands'
/// contents) and may offer an equivalent.
pub(super) type RuleFn = fn(&IrGraph, Id, &IrNode) -> Option<Replacement>;

/// Runs a `RuleFn` as an egg searcher and applier: the searcher finds classes where it
/// offers something; the applier adds what it offers and unions it in.
pub(super) struct NodeRule(RuleFn);

impl Searcher<IrNode, TypeAnalysis> for NodeRule {
    fn search_eclass_with_limit(
        &self,
        egraph: &IrGraph,
        eclass: Id,
        _limit: usize,
    ) -> Option<SearchMatches<'_, IrNode>> {
        let class = &egraph[eclass];
        class
            .nodes
            .iter()
            .any(|n| (self.0)(egraph, eclass, n).is_some())
            .then(|| SearchMatches {
                eclass,
                substs: vec![Subst::default()],
                ast: None,
            })
    }

    fn vars(&self) -> Vec<egg::Var> {
        Vec::new()
    }
}

impl Applier<IrNode, TypeAnalysis> for NodeRule {
    fn apply_one(
        &self,
        egraph: &mut IrGraph,
        eclass: Id,
        _subst: &Subst,
        _ast: Option<&PatternAst<IrNode>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let offers: Vec<Replacement> = egraph[eclass]
            .nodes
            .iter()
            .filter_map(|n| (self.0)(egraph, eclass, n))
            .collect();
        let want = egraph[eclass].data.ty.clone();
        let mut changed = Vec::new();
        for offer in offers {
            let id = add_replacement(egraph, offer);
            // The type check every rewrite must pass before it is applied.
            if egraph[id].data.ty.is_some()
                && egraph[id].data.ty == want
                && egraph.union(eclass, id)
            {
                changed.push(id);
            }
        }
        changed
    }
}

pub(super) fn rule(name: &str, f: RuleFn) -> Rewrite<IrNode, TypeAnalysis> {
    Rewrite::new(name, NodeRule(f), NodeRule(f)).expect("rules use no pattern variables")
}

pub(super) fn constant_of(egraph: &IrGraph, id: Id) -> Option<f64> {
    egraph[id].data.constant
}

/// The first node of class `id` that `pick` accepts.
pub(super) fn find_in<T>(
    egraph: &IrGraph,
    id: Id,
    pick: impl Fn(&IrNode) -> Option<T>,
) -> Option<T> {
    egraph[id].nodes.iter().find_map(pick)
}

/// Whether class `id` is a scalar.
pub(super) fn is_scalar(egraph: &IrGraph, id: Id) -> bool {
    class_type(egraph, id).is_some_and(|t| t.shape.rank() == 0)
}

/// Whether class `id` is a tensor whose kernel reads the scalars it needs from a
/// kernel of their own (`fusion::scalars_stay_apart`). Work moved from such a tensor
/// into its scalars leaves every one of its elements; on a smaller tensor, whose
/// kernel recomputes its scalars in every element, it would only add work.
pub(super) fn is_large(egraph: &IrGraph, id: Id) -> bool {
    class_type(egraph, id).is_some_and(|t| crate::fusion::scalars_stay_apart(&t.shape))
}

/// `(tensor, scalar)` when `n` multiplies a large tensor by a scalar, either way round.
pub(super) fn scaled(egraph: &IrGraph, n: &IrNode) -> Option<(Id, Id)> {
    match (&n.op, n.children.as_slice()) {
        (Op::Binary(BinaryOp::Mul), &[a, b]) if is_large(egraph, a) && is_scalar(egraph, b) => {
            Some((a, b))
        }
        (Op::Binary(BinaryOp::Mul), &[a, b]) if is_scalar(egraph, a) && is_large(egraph, b) => {
            Some((b, a))
        }
        _ => None,
    }
}

/// `(tensor, scalar)` when `n` divides a large tensor by a scalar.
pub(super) fn divided(egraph: &IrGraph, n: &IrNode) -> Option<(Id, Id)> {
    match (&n.op, n.children.as_slice()) {
        (Op::Binary(BinaryOp::Div), &[b, r]) if is_large(egraph, b) && is_scalar(egraph, r) => {
            Some((b, r))
        }
        _ => None,
    }
}

pub(super) const MUL: Op = Op::Binary(BinaryOp::Mul);
pub(super) const DIV: Op = Op::Binary(BinaryOp::Div);

/// Rules that move multiplications and divisions off the elements of a large tensor
/// onto the scalars it is scaled by: what AdamW's update spends per element on its
/// clipping coefficient, moment rates and bias corrections. Each is exact in real
/// arithmetic for finite scalars (a zero scalar gives the same zeros, infinities
/// and NaNs on both sides); in floating point the results round differently, and an
/// intermediate such as `a * k` can overflow or underflow where the original's
/// `a / d` does not.
pub(super) fn scalar_factor_rules() -> Vec<Rewrite<IrNode, TypeAnalysis>> {
    vec![
        // (x * s) * t = x * (s * t). Where `x * s` is read elsewhere too (a clipped
        // gradient squared for the second moment), it stays, and the rewrite only
        // trades one multiply for another: one more scalar node, no element work.
        rule("collect-scalar-factors", |eg, _, n| {
            let (y, t) = scaled(eg, n)?;
            find_in(eg, y, |m| {
                let (x, s) = scaled(eg, m)?;
                Some(Replacement::New(
                    MUL,
                    vec![Replacement::Existing(x), over(MUL, &[s, t])],
                ))
            })
        }),
        // (a / d) * k = (a * k) / d.
        rule("scale-numerator", |eg, _, n| {
            let (q, k) = scaled(eg, n)?;
            find_in(eg, q, |m| match (&m.op, m.children.as_slice()) {
                (Op::Binary(BinaryOp::Div), &[a, d]) if is_large(eg, a) => Some(Replacement::New(
                    DIV,
                    vec![over(MUL, &[a, k]), Replacement::Existing(d)],
                )),
                _ => None,
            })
        }),
        // b / r + e = (b + e * r) / r: Adam's denominator sqrt(v) / sqrt(bc2) + eps.
        rule("common-denominator", |eg, _, n| {
            match (&n.op, n.children.as_slice()) {
                (Op::Binary(BinaryOp::Add), &[q, e]) if is_large(eg, q) && is_scalar(eg, e) => {
                    find_in(eg, q, |m| {
                        let (b, r) = divided(eg, m)?;
                        let sum = Replacement::New(
                            Op::Binary(BinaryOp::Add),
                            vec![Replacement::Existing(b), over(MUL, &[e, r])],
                        );
                        Some(Replacement::New(DIV, vec![sum, Replacement::Existing(r)]))
                    })
                }
                _ => None,
            }
        }),
        // a / (b / r) = (a * r) / b.
        rule("divide-by-quotient", |eg, _, n| {
            match (&n.op, n.children.as_slice()) {
                (Op::Binary(BinaryOp::Div), &[a, d]) if is_large(eg, a) => find_in(eg, d, |m| {
                    let (b, r) = divided(eg, m)?;
                    Some(Replacement::New(
                        DIV,
                        vec![over(MUL, &[a, r]), Replacement::Existing(b)],
                    ))
                }),
                _ => None,
            }
        }),
    ]
}

/// The rule library. Each rule states the identity it uses.
pub fn rules() -> Vec<Rewrite<IrNode, TypeAnalysis>> {
    let mut rules = vec![
        // x + 0 = 0 + x = x, x - 0 = x (when x already has the result's shape).
        rule("add-zero", |eg, _, n| {
            match (&n.op, n.children.as_slice()) {
                (Op::Binary(BinaryOp::Add), [a, b]) if constant_of(eg, *b) == Some(0.0) => {
                    Some(Replacement::Existing(*a))
                }
                (Op::Binary(BinaryOp::Add), [a, b]) if constant_of(eg, *a) == Some(0.0) => {
                    Some(Replacement::Existing(*b))
                }
                (Op::Binary(BinaryOp::Sub), [a, b]) if constant_of(eg, *b) == Some(0.0) => {
                    Some(Replacement::Existing(*a))
                }
                _ => None,
            }
        }),
        // x * 1 = 1 * x = x / 1 = x.
        rule("mul-one", |eg, _, n| match (&n.op, n.children.as_slice()) {
            (Op::Binary(BinaryOp::Mul), [a, b]) if constant_of(eg, *b) == Some(1.0) => {
                Some(Replacement::Existing(*a))
            }
            (Op::Binary(BinaryOp::Mul), [a, b]) if constant_of(eg, *a) == Some(1.0) => {
                Some(Replacement::Existing(*b))
            }
            (Op::Binary(BinaryOp::Div), [a, b]) if constant_of(eg, *b) == Some(1.0) => {
                Some(Replacement::Existing(*a))
            }
            _ => None,
        }),
        // -(-x) = x.
        rule("neg-neg", |eg, _, n| match (&n.op, n.children.as_slice()) {
            (Op::Unary(UnaryOp::Neg), [x]) => {
                find_in(eg, *x, |m| match (&m.op, m.children.as_slice()) {
                    (Op::Unary(UnaryOp::Neg), [y]) => Some(Replacement::Existing(*y)),
                    _ => None,
                })
            }
            _ => None,
        }),
        // transpose(transpose(x, p), q) = transpose(x, p . q), or x when that is the identity.
        rule("transpose-transpose", |eg, _, n| {
            match (&n.op, n.children.as_slice()) {
                (Op::Transpose { perm: q }, [x]) => {
                    find_in(eg, *x, |m| match (&m.op, m.children.as_slice()) {
                        (Op::Transpose { perm: p }, [y]) => {
                            let composed: Vec<usize> = q.iter().map(|&i| p[i]).collect();
                            Some(if composed.iter().enumerate().all(|(i, &c)| i == c) {
                                Replacement::Existing(*y)
                            } else {
                                over(Op::Transpose { perm: composed }, &[*y])
                            })
                        }
                        _ => None,
                    })
                }
                _ => None,
            }
        }),
        // reshape(reshape(x)) = reshape(x); a reshape, broadcast or cast to the
        // operand's own type is the operand.
        rule("reshape-reshape", |eg, _, n| {
            match (&n.op, n.children.as_slice()) {
                (Op::Reshape { shape }, [x]) => {
                    find_in(eg, *x, |m| match (&m.op, m.children.as_slice()) {
                        (Op::Reshape { .. }, [y]) => Some(over(
                            Op::Reshape {
                                shape: shape.clone(),
                            },
                            &[*y],
                        )),
                        _ => None,
                    })
                }
                _ => None,
            }
        }),
        rule("identity-layout", |eg, class, n| {
            match (&n.op, n.children.as_slice()) {
                (Op::Reshape { .. } | Op::BroadcastTo { .. } | Op::Cast { .. }, [x])
                    if eg[*x].data.ty.is_some() && eg[*x].data.ty == eg[class].data.ty =>
                {
                    Some(Replacement::Existing(*x))
                }
                (Op::Transpose { perm }, [x]) if perm.iter().enumerate().all(|(i, &p)| i == p) => {
                    Some(Replacement::Existing(*x))
                }
                // Training graphs are optimised after autodiff, where a stop-gradient
                // has done its work and is the identity.
                (Op::StopGradient, [x]) => Some(Replacement::Existing(*x)),
                _ => None,
            }
        }),
        // broadcast(broadcast(x, s), t) = broadcast(x, t).
        rule("broadcast-broadcast", |eg, _, n| {
            match (&n.op, n.children.as_slice()) {
                (Op::BroadcastTo { shape }, [x]) => {
                    find_in(eg, *x, |m| match (&m.op, m.children.as_slice()) {
                        (Op::BroadcastTo { .. }, [y]) => Some(over(
                            Op::BroadcastTo {
                                shape: shape.clone(),
                            },
                            &[*y],
                        )),
                        _ => None,
                    })
                }
                _ => None,
            }
        }),
        // An elementwise op or a reduction on uniform constants is a constant.
        rule("fold-constants", |eg, class, n| {
            let known = n.children.iter().all(|c| constant_of(eg, *c).is_some());
            let elementwise = matches!(n.op, Op::Unary(_) | Op::Binary(_) | Op::Reduce { .. });
            let value = eg[class].data.constant?;
            let ty = eg[class].data.ty.clone()?;
            (known && elementwise && !n.children.is_empty()).then(|| {
                over(
                    Op::Constant {
                        value: Scalar(value),
                        dtype: ty.dtype,
                        shape: ty.shape,
                    },
                    &[],
                )
            })
        }),
    ];
    rules.extend(scalar_factor_rules());
    rules
}
