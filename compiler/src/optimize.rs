//! E-graph optimisation with `egg`: a graph becomes an e-graph over the IR's own ops,
//! an analysis carries each class's type (and its value when it is a uniform
//! constant), a rule library rewrites it until saturation or a limit, and extraction
//! rebuilds one graph choosing the cheapest node per class. Shared subexpressions stay
//! shared (each class is built once), and hash-consing merges duplicates, which is
//! common-subexpression elimination for free.
//!
//! Every rule checks types through the analysis before it applies, so an ill-typed
//! rewrite is never added; extraction re-infers every node's type as it rebuilds.

use crate::ir::{BinaryOp, Graph, GraphError, NodeId, Op, Scalar, TensorType, UnaryOp};
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
            (Op::BroadcastTo { .. } | Op::Reshape { .. } | Op::Transpose { .. }, [a]) => a.constant,
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

/// What a rule puts in a class: one of its existing classes, or a new node.
enum Replacement {
    Existing(Id),
    New(IrNode),
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
            let id = match offer {
                Replacement::Existing(id) => id,
                Replacement::New(node) => egraph.add(node),
            };
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

/// The rule library. Each rule states the identity it uses.
pub fn rules() -> Vec<Rewrite<IrNode, TypeAnalysis>> {
    vec![
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
                                Replacement::New(IrNode {
                                    op: Op::Transpose { perm: composed },
                                    children: vec![*y],
                                })
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
                        (Op::Reshape { .. }, [y]) => Some(Replacement::New(IrNode {
                            op: Op::Reshape {
                                shape: shape.clone(),
                            },
                            children: vec![*y],
                        })),
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
        // An elementwise op on uniform constants is a constant.
        rule("fold-constants", |eg, class, n| {
            let known = n.children.iter().all(|c| constant_of(eg, *c).is_some());
            let elementwise = matches!(n.op, Op::Unary(_) | Op::Binary(_));
            let value = eg[class].data.constant?;
            let ty = eg[class].data.ty.clone()?;
            (known && elementwise && !n.children.is_empty()).then(|| {
                Replacement::New(IrNode {
                    op: Op::Constant {
                        value: Scalar(value),
                        dtype: ty.dtype,
                        shape: ty.shape,
                    },
                    children: vec![],
                })
            })
        }),
    ]
}

/// Cost of one node for extraction: kernels cost their output's size in elements
/// (a proxy for bytes moved), plus a launch; leaves, constants and layout views cost
/// a little, never nothing, so a cycle of free views can never look cheapest.
struct RunCost<'a> {
    egraph: &'a IrGraph,
}

impl CostFunction<IrNode> for RunCost<'_> {
    type Cost = f64;

    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &IrNode, mut costs: C) -> f64 {
        let own = if crate::fusion::launches_kernel(&enode.op) {
            let elements = self
                .egraph
                .lookup(enode.clone())
                .and_then(|c| self.egraph[c].data.ty.as_ref())
                .map_or(1.0, |t| {
                    t.shape
                        .dims()
                        .iter()
                        .map(|d| d.fixed().unwrap_or(64) as f64)
                        .product::<f64>()
                });
            1.0 + elements
        } else {
            1e-3
        };
        enode.children.iter().fold(own, |acc, c| acc + costs(*c))
    }
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
        .filter(|&&id| crate::fusion::launches_kernel(&graph.node(id).op))
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
    let extractor = Extractor::new(egraph, RunCost { egraph });
    let mut out = Graph::new(graph.name.clone());
    let mut built: HashMap<Id, NodeId> = HashMap::new();
    for (name, root) in &roots {
        let id = build(
            egraph,
            &extractor,
            &origins,
            egraph.find(*root),
            &mut out,
            &mut built,
        )?;
        out.set_output(name.clone(), id)?;
    }
    report.kernels_after = out
        .node_ids()
        .filter(|&id| crate::fusion::launches_kernel(&out.node(id).op))
        .count();
    Ok((out, report))
}

/// Builds class `class` into `out` (once; later uses share it).
fn build(
    egraph: &IrGraph,
    extractor: &Extractor<RunCost, IrNode, TypeAnalysis>,
    origins: &HashMap<Id, String>,
    class: Id,
    out: &mut Graph,
    built: &mut HashMap<Id, NodeId>,
) -> Result<NodeId, GraphError> {
    if let Some(&id) = built.get(&class) {
        return Ok(id);
    }
    let node = extractor.find_best_node(class).clone();
    let mut operands = Vec::with_capacity(node.children.len());
    for c in &node.children {
        operands.push(build(
            egraph,
            extractor,
            origins,
            egraph.find(*c),
            out,
            built,
        )?);
    }
    let origin = origins
        .get(&class)
        .cloned()
        .unwrap_or_else(|| "optimizer".into());
    let id = out.push(node.op, &operands, origin)?;
    built.insert(class, id);
    Ok(id)
}
