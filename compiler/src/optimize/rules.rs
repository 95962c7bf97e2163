//! The rule library: algebraic identities and the scalar-factor rules that move an
//! update's per-element multiplications and divisions onto its scalars, each
//! checking types through the analysis before it applies.

use super::analysis::{class_type, IrGraph, TypeAnalysis};
use super::language::IrNode;
use crate::ir::{Op, Scalar};
use egg::{
    rewrite as rw, Applier, Id, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var,
};

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

fn var(name: &str) -> Var {
    name.parse().expect("pattern variables are written `?name`")
}

/// Condition: pattern variable `v` is a uniform constant `value`.
fn equals(v: &'static str, value: f64) -> impl Fn(&mut IrGraph, Id, &Subst) -> bool {
    move |eg, _, subst| constant_of(eg, subst[var(v)]) == Some(value)
}

/// Condition: pattern variable `v` has the matched class's own type, so replacing the
/// class by it changes no shape (`x + 0` with a broadcast zero does).
fn keeps_type(v: &'static str) -> impl Fn(&mut IrGraph, Id, &Subst) -> bool {
    move |eg, class, subst| {
        let ty = &eg[subst[var(v)]].data.ty;
        ty.is_some() && *ty == eg[class].data.ty
    }
}

fn large(v: &'static str) -> impl Fn(&mut IrGraph, Id, &Subst) -> bool {
    move |eg, _, subst| is_large(eg, subst[var(v)])
}

fn scalar(v: &'static str) -> impl Fn(&mut IrGraph, Id, &Subst) -> bool {
    move |eg, _, subst| is_scalar(eg, subst[var(v)])
}

/// Both conditions.
fn both(
    a: impl Fn(&mut IrGraph, Id, &Subst) -> bool,
    b: impl Fn(&mut IrGraph, Id, &Subst) -> bool,
) -> impl Fn(&mut IrGraph, Id, &Subst) -> bool {
    move |eg, class, subst| a(eg, class, subst) && b(eg, class, subst)
}

/// The identities with no attributes to read, as egg patterns: adding zero,
/// multiplying or dividing by one, double negation, and the stop-gradient, which has
/// done its work once autodiff has run (training graphs are optimised after it).
fn pattern_rules() -> Vec<Rewrite<IrNode, TypeAnalysis>> {
    vec![
        rw!("add-zero"; "(add ?a ?z)" => "?a" if equals("?z", 0.0) if keeps_type("?a")),
        rw!("add-zero:left"; "(add ?z ?a)" => "?a" if equals("?z", 0.0) if keeps_type("?a")),
        rw!("add-zero:sub"; "(sub ?a ?z)" => "?a" if equals("?z", 0.0) if keeps_type("?a")),
        rw!("mul-one"; "(mul ?a ?o)" => "?a" if equals("?o", 1.0) if keeps_type("?a")),
        rw!("mul-one:left"; "(mul ?o ?a)" => "?a" if equals("?o", 1.0) if keeps_type("?a")),
        rw!("mul-one:div"; "(div ?a ?o)" => "?a" if equals("?o", 1.0) if keeps_type("?a")),
        rw!("neg-neg"; "(neg (neg ?x))" => "?x"),
        rw!("stop-gradient"; "(stop_gradient ?x)" => "?x"),
    ]
}

/// Rules that move multiplications and divisions off the elements of a large tensor
/// onto the scalars it is scaled by: what AdamW's update spends per element on its
/// clipping coefficient, moment rates and bias corrections. Each is exact in real
/// arithmetic for finite scalars (a zero scalar gives the same zeros, infinities
/// and NaNs on both sides); in floating point the results round differently, and an
/// intermediate such as `a * k` can overflow or underflow where the original's
/// `a / d` does not. A rule with operands either way round is written once per
/// order, its name suffixed after a colon.
pub(super) fn scalar_factor_rules() -> Vec<Rewrite<IrNode, TypeAnalysis>> {
    let scalars = |s, t| both(scalar(s), scalar(t));
    vec![
        // (x * s) * t = x * (s * t). Where `x * s` is read elsewhere too (a clipped
        // gradient squared for the second moment), it stays, and the rewrite only
        // trades one multiply for another: one more scalar node, no element work.
        rw!("collect-scalar-factors"; "(mul (mul ?x ?s) ?t)" => "(mul ?x (mul ?s ?t))"
            if large("?x") if scalars("?s", "?t")),
        rw!("collect-scalar-factors:ts"; "(mul ?t (mul ?x ?s))" => "(mul ?x (mul ?s ?t))"
            if large("?x") if scalars("?s", "?t")),
        rw!("collect-scalar-factors:sx"; "(mul (mul ?s ?x) ?t)" => "(mul ?x (mul ?s ?t))"
            if large("?x") if scalars("?s", "?t")),
        rw!("collect-scalar-factors:tsx"; "(mul ?t (mul ?s ?x))" => "(mul ?x (mul ?s ?t))"
            if large("?x") if scalars("?s", "?t")),
        // (a / d) * k = (a * k) / d.
        rw!("scale-numerator"; "(mul (div ?a ?d) ?k)" => "(div (mul ?a ?k) ?d)"
            if large("?a") if scalar("?k")),
        rw!("scale-numerator:k"; "(mul ?k (div ?a ?d))" => "(div (mul ?a ?k) ?d)"
            if large("?a") if scalar("?k")),
        // b / r + e = (b + e * r) / r: Adam's denominator sqrt(v) / sqrt(bc2) + eps.
        rw!("common-denominator"; "(add (div ?b ?r) ?e)" => "(div (add ?b (mul ?e ?r)) ?r)"
            if large("?b") if scalars("?r", "?e")),
        // a / (b / r) = (a * r) / b.
        rw!("divide-by-quotient"; "(div ?a (div ?b ?r))" => "(div (mul ?a ?r) ?b)"
            if large("?a") if both(large("?b"), scalar("?r"))),
    ]
}

/// The rule library. Each rule states the identity it uses.
pub fn rules() -> Vec<Rewrite<IrNode, TypeAnalysis>> {
    let mut rules = vec![
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
    rules.extend(pattern_rules());
    rules.extend(scalar_factor_rules());
    rules
}
