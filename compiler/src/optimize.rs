//! E-graph optimisation with `egg`: a graph becomes an e-graph over the IR's own ops,
//! an analysis carries each class's type (and its value when it is a uniform
//! constant), a rule library rewrites it until saturation or a limit, and extraction
//! rebuilds one graph choosing the cheapest node per class under a cost of launches,
//! bytes written and FLOPs, counting each shared class once (DAG-aware). Shared
//! subexpressions stay shared (each class is built once), and hash-consing merges
//! duplicates, which is common-subexpression elimination for free.
//!
//! Every rule checks types through the analysis before it applies, so an ill-typed
//! rewrite is never added; extraction re-infers every node's type as it rebuilds.

use crate::ir::{BinaryOp, Graph, GraphError, NodeId, Op, ReduceOp, Scalar, TensorType, UnaryOp};
use crate::reference;
use egg::{
    Analysis, Applier, CostFunction, DidMerge, EGraph, Extractor, Id, Language, PatternAst,
    Rewrite, Runner, SearchMatches, Searcher, Subst, Symbol,
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// An IR op as an e-node: the op with its attributes, and its operands' classes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IrNode {
    pub op: Op,
    pub children: Vec<Id>,
}

impl Language for IrNode {
    type Discriminant = Op;

    fn discriminant(&self) -> Op {
        self.op.clone()
    }

    fn matches(&self, other: &Self) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

/// What the analysis knows of a class: its type, and its value if every element of it
/// is one known number.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassInfo {
    pub ty: Option<TensorType>,
    pub constant: Option<f64>,
}

#[derive(Default)]
pub struct TypeAnalysis;

impl Analysis<IrNode> for TypeAnalysis {
    type Data = ClassInfo;

    fn make(egraph: &mut EGraph<IrNode, Self>, enode: &IrNode) -> ClassInfo {
        let children: Vec<&ClassInfo> = enode.children.iter().map(|c| &egraph[*c].data).collect();
        let types: Option<Vec<&TensorType>> = children.iter().map(|c| c.ty.as_ref()).collect();
        let ty = types.and_then(|t| crate::ir::infer(&enode.op, &t).ok());
        let constant = match (&enode.op, children.as_slice()) {
            (Op::Constant { value, .. }, _) => Some(value.0),
            (Op::Unary(u), [a]) => a.constant.map(|x| reference::unary_scalar(*u, x)),
            (Op::Binary(b), [a, c]) => a
                .constant
                .zip(c.constant)
                .map(|(x, y)| reference::binary_scalar(*b, x, y)),
            (
                Op::BroadcastTo { .. }
                | Op::Reshape { .. }
                | Op::Transpose { .. }
                | Op::StopGradient,
                [a],
            ) => a.constant,
            // A reduction of one repeated value: the value, or for a sum the value
            // times the count when the reduced extents are known (autodiff counts the
            // elements of a mean as a sum of ones).
            (Op::Reduce { op, axes, .. }, [a]) => a.constant.and_then(|c| match op {
                ReduceOp::Sum => {
                    let dims = a.ty.as_ref()?.shape.dims().to_vec();
                    let count: Option<usize> = axes.iter().map(|&i| dims[i].fixed()).product();
                    count.map(|n| c * n as f64)
                }
                ReduceOp::Mean | ReduceOp::Max | ReduceOp::Min => Some(c),
            }),
            _ => None,
        };
        ClassInfo {
            ty,
            constant: constant.filter(|v| v.is_finite()),
        }
    }

    fn merge(&mut self, a: &mut ClassInfo, b: ClassInfo) -> DidMerge {
        let mut changed = false;
        if a.constant.is_none() && b.constant.is_some() {
            a.constant = b.constant;
            changed = true;
        }
        if a.ty.is_none() && b.ty.is_some() {
            a.ty = b.ty;
            changed = true;
        }
        DidMerge(changed, true)
    }
}

type IrGraph = EGraph<IrNode, TypeAnalysis>;

/// What a rule puts in a class: one of its existing classes, or a new node over
/// further replacements (built bottom-up).
enum Replacement {
    Existing(Id),
    New(Op, Vec<Replacement>),
}

/// A new node `op` over existing classes.
fn over(op: Op, children: &[Id]) -> Replacement {
    Replacement::New(
        op,
        children.iter().map(|&c| Replacement::Existing(c)).collect(),
    )
}

/// Adds what `replacement` describes to the e-graph; its class.
fn add_replacement(egraph: &mut IrGraph, replacement: Replacement) -> Id {
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
type RuleFn = fn(&IrGraph, Id, &IrNode) -> Option<Replacement>;

/// Runs a `RuleFn` as an egg searcher and applier: the searcher finds classes where it
/// offers something; the applier adds what it offers and unions it in.
struct NodeRule(RuleFn);

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

fn rule(name: &str, f: RuleFn) -> Rewrite<IrNode, TypeAnalysis> {
    Rewrite::new(name, NodeRule(f), NodeRule(f)).expect("rules use no pattern variables")
}

fn constant_of(egraph: &IrGraph, id: Id) -> Option<f64> {
    egraph[id].data.constant
}

/// The first node of class `id` that `pick` accepts.
fn find_in<T>(egraph: &IrGraph, id: Id, pick: impl Fn(&IrNode) -> Option<T>) -> Option<T> {
    egraph[id].nodes.iter().find_map(pick)
}

/// The type the analysis knows for class `id`.
fn class_type(egraph: &IrGraph, id: Id) -> Option<&TensorType> {
    egraph[id].data.ty.as_ref()
}

/// Whether class `id` is a scalar.
fn is_scalar(egraph: &IrGraph, id: Id) -> bool {
    class_type(egraph, id).is_some_and(|t| t.shape.rank() == 0)
}

/// Whether class `id` is a tensor whose kernel reads the scalars it needs from a
/// kernel of their own (`fusion::scalars_stay_apart`). Work moved from such a tensor
/// into its scalars leaves every one of its elements; on a smaller tensor, whose
/// kernel recomputes its scalars in every element, it would only add work.
fn is_large(egraph: &IrGraph, id: Id) -> bool {
    class_type(egraph, id).is_some_and(|t| crate::fusion::scalars_stay_apart(&t.shape))
}

/// `(tensor, scalar)` when `n` multiplies a large tensor by a scalar, either way round.
fn scaled(egraph: &IrGraph, n: &IrNode) -> Option<(Id, Id)> {
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
fn divided(egraph: &IrGraph, n: &IrNode) -> Option<(Id, Id)> {
    match (&n.op, n.children.as_slice()) {
        (Op::Binary(BinaryOp::Div), &[b, r]) if is_large(egraph, b) && is_scalar(egraph, r) => {
            Some((b, r))
        }
        _ => None,
    }
}

const MUL: Op = Op::Binary(BinaryOp::Mul);
const DIV: Op = Op::Binary(BinaryOp::Div);

/// Rules that move multiplications and divisions off the elements of a large tensor
/// onto the scalars it is scaled by: what AdamW's update spends per element on its
/// clipping coefficient, moment rates and bias corrections. Each is exact in real
/// arithmetic for finite scalars (a zero scalar gives the same zeros, infinities
/// and NaNs on both sides); in floating point the results round differently, and an
/// intermediate such as `a * k` can overflow or underflow where the original's
/// `a / d` does not.
fn scalar_factor_rules() -> Vec<Rewrite<IrNode, TypeAnalysis>> {
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

/// What running one node costs, in element-equivalents of memory traffic: a kernel
/// launch is worth `LAUNCH` elements moved (on a GPU a launch costs about what moving
/// tens of kilobytes does), plus the elements it writes, plus its multiply-adds at
/// `FLOPS_PER_ELEMENT` (a matmul is bound by arithmetic long before memory). Leaves
/// and layout views cost a little, never nothing, so a cycle of free views can never
/// look cheapest.
fn node_cost(egraph: &IrGraph, enode: &IrNode) -> f64 {
    const LAUNCH: f64 = 4096.0;
    const FLOPS_PER_ELEMENT: f64 = 64.0;
    if !enode.op.launches_kernel() {
        return 1e-3;
    }
    let elements = |ty: Option<&TensorType>| {
        ty.map_or(1.0, |t| {
            t.shape
                .dims()
                .iter()
                .map(|d| d.fixed().unwrap_or(64) as f64)
                .product::<f64>()
        })
    };
    let out = crate::ir::infer(
        &enode.op,
        &enode
            .children
            .iter()
            .filter_map(|&c| class_type(egraph, c))
            .collect::<Vec<_>>(),
    )
    .ok();
    let written = elements(out.as_ref());
    let flops = match (&enode.op, enode.children.as_slice()) {
        (Op::MatMul { transpose_a, .. }, [a, _]) => {
            let contracted = class_type(egraph, *a).and_then(|t| {
                let dims = t.shape.dims();
                let k = if *transpose_a {
                    dims.len().checked_sub(2)?
                } else {
                    dims.len() - 1
                };
                Some(dims[k].fixed().unwrap_or(64) as f64)
            });
            2.0 * written * contracted.unwrap_or(1.0)
        }
        _ => 0.0,
    };
    LAUNCH + written + flops / FLOPS_PER_ELEMENT
}

/// `node_cost` summed over the tree, for egg's own extractor (the fallback).
struct TreeCost<'a> {
    egraph: &'a IrGraph,
}

impl CostFunction<IrNode> for TreeCost<'_> {
    type Cost = f64;

    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &IrNode, mut costs: C) -> f64 {
        let own = node_cost(self.egraph, enode);
        enode.children.iter().fold(own, |acc, c| acc + costs(*c))
    }
}

/// Whether the chosen nodes reachable from `roots` form no cycle (and every class
/// met has a choice).
fn acyclic(egraph: &IrGraph, chosen: &HashMap<Id, IrNode>, roots: &[Id]) -> bool {
    // 1: on the current path, 2: done.
    let mut state: HashMap<Id, u8> = HashMap::new();
    let mut stack: Vec<(Id, usize)> = Vec::new();
    for &root in roots {
        if state.contains_key(&root) {
            continue;
        }
        stack.push((root, 0));
        state.insert(root, 1);
        while let Some((class, next)) = stack.pop() {
            let Some(node) = chosen.get(&class) else {
                return false;
            };
            if let Some(&child) = node.children.get(next) {
                stack.push((class, next + 1));
                let child = egraph.find(child);
                match state.get(&child) {
                    Some(1) => return false,
                    Some(_) => {}
                    None => {
                        state.insert(child, 1);
                        stack.push((child, 0));
                    }
                }
            } else {
                state.insert(class, 2);
            }
        }
    }
    true
}

/// DAG-aware extraction: the cost of choosing a node is its own cost plus that of
/// every distinct class it depends on, each counted once however many paths lead to
/// it, so a subgraph shared by several users is paid for once (egg's own extractor
/// sums over the tree and would count it per use). Greedy to a fixpoint: each class
/// keeps its cheapest node and that node's set of dependencies, as a bitset.
fn extract_dag(egraph: &IrGraph) -> HashMap<Id, IrNode> {
    let classes: Vec<Id> = egraph.classes().map(|c| c.id).collect();
    let index: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let words = classes.len().div_ceil(64);
    struct Choice {
        node: IrNode,
        own: f64,
        deps: Vec<u64>,
    }
    let mut best: Vec<Option<Choice>> = (0..classes.len()).map(|_| None).collect();
    let total = |deps: &[u64], best: &[Option<Choice>]| -> f64 {
        let mut sum = 0.0;
        for (w, &bits) in deps.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                let i = w * 64 + b.trailing_zeros() as usize;
                sum += best[i].as_ref().map_or(0.0, |c| c.own);
                b &= b - 1;
            }
        }
        sum
    };
    // Each pass can only lower costs; a few settle any graph altc builds, and the
    // bound keeps a pathological e-graph from taking long.
    const PASSES: usize = 32;
    for _ in 0..PASSES {
        let mut changed = false;
        for (i, &class) in classes.iter().enumerate() {
            for node in &egraph[class].nodes {
                let mut deps = vec![0u64; words];
                let mut ready = true;
                for c in &node.children {
                    let j = index[&egraph.find(*c)];
                    let Some(child) = &best[j] else {
                        ready = false;
                        break;
                    };
                    for (d, s) in deps.iter_mut().zip(&child.deps) {
                        *d |= s;
                    }
                    deps[j / 64] |= 1 << (j % 64);
                }
                // A node that needs its own class (a cycle) is never chosen.
                if !ready || deps[i / 64] & (1 << (i % 64)) != 0 {
                    continue;
                }
                let own = node_cost(egraph, node);
                let cost = own + total(&deps, &best);
                let current = best[i].as_ref().map(|c| c.own + total(&c.deps, &best));
                if current.is_none_or(|c| cost < c - 1e-9) {
                    best[i] = Some(Choice {
                        node: node.clone(),
                        own,
                        deps,
                    });
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    classes
        .into_iter()
        .zip(best)
        .filter_map(|(c, choice)| choice.map(|choice| (c, choice.node)))
        .collect()
}

/// Bounds that make saturation always end.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub iterations: usize,
    pub nodes: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            iterations: 8,
            nodes: 200_000,
            time: Duration::from_secs(2),
        }
    }
}

/// What an optimisation did.
#[derive(Clone, Debug, Default)]
pub struct OptimizeReport {
    /// Rule name and how many times it applied, over all iterations.
    pub fired: BTreeMap<String, usize>,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub iterations: usize,
    pub stop: String,
    /// Kernel-running nodes before and after (each class counted once).
    pub kernels_before: usize,
    pub kernels_after: usize,
}

/// Optimises `graph`: builds the e-graph, saturates within `limits`, extracts.
pub fn optimize(graph: &Graph, limits: Limits) -> Result<(Graph, OptimizeReport), GraphError> {
    let order = graph.topo_order()?;
    let mut egraph = IrGraph::default();
    let mut class_of: HashMap<NodeId, Id> = HashMap::new();
    let mut origin_of: HashMap<Id, String> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        let children = graph.operands(id).iter().map(|o| class_of[o]).collect();
        let class = egraph.add(IrNode {
            op: node.op.clone(),
            children,
        });
        class_of.insert(id, class);
        origin_of
            .entry(class)
            .or_insert_with(|| node.origin.clone());
    }
    let kernels_before = order
        .iter()
        .filter(|&&id| graph.node(id).op.launches_kernel())
        .count();
    let roots: Vec<(String, Id)> = graph
        .outputs()
        .iter()
        .map(|(n, id)| (n.clone(), class_of[id]))
        .collect();
    let runner = Runner::default()
        .with_egraph(egraph)
        .with_iter_limit(limits.iterations)
        .with_node_limit(limits.nodes)
        .with_time_limit(limits.time)
        .run(&rules());
    let mut report = OptimizeReport {
        egraph_nodes: runner.egraph.total_size(),
        egraph_classes: runner.egraph.number_of_classes(),
        iterations: runner.iterations.len(),
        stop: runner
            .stop_reason
            .as_ref()
            .map_or_else(|| "running".into(), |r| format!("{r:?}")),
        kernels_before,
        ..OptimizeReport::default()
    };
    for it in &runner.iterations {
        for (name, count) in &it.applied {
            *report.fired.entry(name.to_string()).or_default() += count;
        }
    }
    let egraph = &runner.egraph;
    let origins: HashMap<Id, String> = origin_of
        .into_iter()
        .map(|(c, o)| (egraph.find(c), o))
        .collect();
    let root_classes: Vec<Id> = roots.iter().map(|(_, r)| egraph.find(*r)).collect();
    let chosen = Some(extract_dag(egraph))
        .filter(|chosen| acyclic(egraph, chosen, &root_classes))
        .unwrap_or_else(|| {
            // The greedy choices can in rare cases close a cycle through a class
            // that changed its choice after others counted on it; egg's tree-cost
            // extraction never does.
            let extractor = Extractor::new(egraph, TreeCost { egraph });
            egraph
                .classes()
                .map(|c| (c.id, extractor.find_best_node(c.id).clone()))
                .collect()
        });
    let mut out = Graph::new(graph.name.clone());
    let mut built: HashMap<Id, NodeId> = HashMap::new();
    for (name, root) in &roots {
        let id = build(
            egraph,
            &chosen,
            &origins,
            egraph.find(*root),
            &mut out,
            &mut built,
        )?;
        out.set_output(name.clone(), id)?;
    }
    report.kernels_after = out
        .node_ids()
        .filter(|&id| out.node(id).op.launches_kernel())
        .count();
    Ok((out, report))
}

/// Builds class `class` into `out` (once; later uses share it).
fn build(
    egraph: &IrGraph,
    chosen: &HashMap<Id, IrNode>,
    origins: &HashMap<Id, String>,
    class: Id,
    out: &mut Graph,
    built: &mut HashMap<Id, NodeId>,
) -> Result<NodeId, GraphError> {
    if let Some(&id) = built.get(&class) {
        return Ok(id);
    }
    let node = chosen[&class].clone();
    let mut operands = Vec::with_capacity(node.children.len());
    for c in &node.children {
        operands.push(build(egraph, chosen, origins, egraph.find(*c), out, built)?);
    }
    let origin = origins
        .get(&class)
        .cloned()
        .unwrap_or_else(|| "optimizer".into());
    let id = out.push(node.op, &operands, origin)?;
    built.insert(class, id);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::DType;
    use crate::shape;

    fn input(egraph: &mut IrGraph, name: &str, shape: crate::ir::Shape) -> Id {
        egraph.add(IrNode {
            op: Op::Input {
                name: name.into(),
                dtype: DType::F32,
                shape,
            },
            children: vec![],
        })
    }

    fn unary(egraph: &mut IrGraph, op: UnaryOp, x: Id) -> Id {
        egraph.add(IrNode {
            op: Op::Unary(op),
            children: vec![x],
        })
    }

    fn matmul(egraph: &mut IrGraph, a: Id, b: Id) -> Id {
        egraph.add(IrNode {
            op: Op::MatMul {
                transpose_a: false,
                transpose_b: false,
            },
            children: vec![a, b],
        })
    }

    fn binary(egraph: &mut IrGraph, op: BinaryOp, a: Id, b: Id) -> Id {
        egraph.add(IrNode {
            op: Op::Binary(op),
            children: vec![a, b],
        })
    }

    /// A class with two equal nodes: one reads a product through two paths, the other
    /// reads a costlier product (three times the contraction) through one. Summed over
    /// the tree the first pays for its product twice and loses; counted once, as it
    /// runs once, it wins.
    #[test]
    fn extraction_counts_a_shared_subgraph_once() {
        let mut egraph = IrGraph::default();
        let x = input(&mut egraph, "x", shape![256, 64]);
        let w = input(&mut egraph, "w", shape![64, 256]);
        let shared = matmul(&mut egraph, x, w);
        let tanh = unary(&mut egraph, UnaryOp::Tanh, shared);
        let exp = unary(&mut egraph, UnaryOp::Exp, shared);
        let twice = binary(&mut egraph, BinaryOp::Add, tanh, exp);
        let u = input(&mut egraph, "u", shape![256, 192]);
        let v = input(&mut egraph, "v", shape![192, 256]);
        let larger = matmul(&mut egraph, u, v);
        let once = unary(&mut egraph, UnaryOp::Tanh, larger);
        egraph.union(twice, once);
        egraph.rebuild();
        let chosen = extract_dag(&egraph);
        let pick = &chosen[&egraph.find(twice)];
        assert_eq!(pick.op, Op::Binary(BinaryOp::Add), "{pick:?}");
    }
}
