//! A validated runbook bound to its params: `for_each` expanded, the DAG
//! built (petgraph), and the waves it will run in.

use crate::expr::{self, Scope, Seg};
use crate::runbook::Runbook;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// One unit of work: a step, or one item of a `for_each` step.
#[derive(Clone, Debug, Serialize)]
pub struct Node {
    /// `ID`, or `ID[N]` for item N of a `for_each`.
    pub id: String,
    /// Index into the runbook's steps.
    pub step: usize,
    /// `(index, value)` of a `for_each` item.
    pub each: Option<(usize, Value)>,
    /// Nodes this one needs (every item of a needed `for_each` step).
    pub deps: Vec<usize>,
    /// Nodes that need this one.
    pub dependents: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub runbook: Runbook,
    pub params: Map<String, Value>,
    pub nodes: Vec<Node>,
    /// Nodes grouped by depth: everything in wave N needs only waves before it.
    pub waves: Vec<Vec<usize>>,
    /// Nodes in an order where every node comes after what it needs.
    pub order: Vec<usize>,
    #[serde(skip)]
    pub graph: DiGraph<usize, ()>,
}

/// Binds params (`--param k=v` as text) and expands the runbook.
/// Errors name every param that is missing or malformed.
pub fn plan(rb: Runbook, given: &BTreeMap<String, String>) -> Result<Plan, String> {
    let mut problems = Vec::new();
    let mut params = Map::new();
    for k in given.keys() {
        if !rb.params.iter().any(|p| &p.name == k) {
            let known: Vec<&str> = rb.params.iter().map(|p| p.name.as_str()).collect();
            problems.push(match crate::diag::suggest(k, known.iter().copied()) {
                Some(s) => {
                    format!("--param {k}: the runbook has no param `{k}` (did you mean `{s}`?)")
                }
                None => format!(
                    "--param {k}: the runbook has no param `{k}` (it has: {})",
                    known.join(", ")
                ),
            });
        }
    }
    for p in &rb.params {
        let v = match (given.get(&p.name), &p.default) {
            (Some(text), _) => p.ty.coerce(&Value::String(text.clone())),
            (None, Some(d)) => Ok(d.clone()),
            (None, None) => Err(format!(
                "is required (a {}); pass --param {}=VALUE",
                p.ty.name(),
                p.name
            )),
        };
        match v {
            Ok(v) => {
                params.insert(p.name.clone(), v);
            }
            Err(e) => problems.push(format!("param `{}` {}", p.name, e.trim_start_matches('`'))),
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    let scope = ParamScope(&params);
    // Expand for_each.
    let mut nodes: Vec<Node> = Vec::new();
    let mut of_step: Vec<Vec<usize>> = Vec::new();
    for (si, step) in rb.steps.iter().enumerate() {
        let items = match &step.for_each {
            None => None,
            Some(v) => match expr::render(v, &scope) {
                Ok(Value::Array(a)) => Some(a),
                Ok(other) => {
                    problems.push(format!(
                        "step `{}`: for_each gave `{other}`, not a list",
                        step.id
                    ));
                    Some(Vec::new())
                }
                Err(e) => {
                    problems.push(format!("step `{}`: for_each: {e}", step.id));
                    Some(Vec::new())
                }
            },
        };
        let mut mine = Vec::new();
        match items {
            None => {
                mine.push(nodes.len());
                nodes.push(Node {
                    id: step.id.clone(),
                    step: si,
                    each: None,
                    deps: Vec::new(),
                    dependents: Vec::new(),
                });
            }
            Some(items) => {
                for (i, v) in items.into_iter().enumerate() {
                    mine.push(nodes.len());
                    nodes.push(Node {
                        id: format!("{}[{i}]", step.id),
                        step: si,
                        each: Some((i, v)),
                        deps: Vec::new(),
                        dependents: Vec::new(),
                    });
                }
            }
        }
        of_step.push(mine);
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    let mut graph = DiGraph::<usize, ()>::with_capacity(nodes.len(), nodes.len());
    let idx: Vec<NodeIndex> = (0..nodes.len()).map(|i| graph.add_node(i)).collect();
    for n in 0..nodes.len() {
        let step = &rb.steps[nodes[n].step];
        let deps: Vec<usize> = step
            .needs
            .iter()
            .flat_map(|&s| of_step[s].iter().copied())
            .collect();
        for &d in &deps {
            graph.add_edge(idx[d], idx[n], ());
            nodes[d].dependents.push(n);
        }
        nodes[n].deps = deps;
    }
    if petgraph::algo::is_cyclic_directed(&graph) {
        return Err("the steps form a cycle".into());
    }
    // Kahn's algorithm, taking the earliest node in file order first, so runs
    // start steps in the order the runbook lists them.
    let mut indegree: Vec<usize> = nodes.iter().map(|n| n.deps.len()).collect();
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = (0..nodes.len())
        .filter(|&n| indegree[n] == 0)
        .map(std::cmp::Reverse)
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(std::cmp::Reverse(n)) = ready.pop() {
        order.push(n);
        for &d in &nodes[n].dependents {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push(std::cmp::Reverse(d));
            }
        }
    }
    let mut depth = vec![0usize; nodes.len()];
    for &n in &order {
        depth[n] = nodes[n]
            .deps
            .iter()
            .map(|&d| depth[d] + 1)
            .max()
            .unwrap_or(0);
    }
    let mut waves: Vec<Vec<usize>> = vec![Vec::new(); depth.iter().max().map_or(0, |d| d + 1)];
    for (n, &d) in depth.iter().enumerate() {
        waves[d].push(n);
    }
    Ok(Plan {
        runbook: rb,
        params,
        nodes,
        waves,
        order,
        graph,
    })
}

struct ParamScope<'a>(&'a Map<String, Value>);

impl Scope for ParamScope<'_> {
    fn get(&self, path: &[Seg]) -> Option<Value> {
        match path.first() {
            Some(Seg::Key(k)) if k == "params" => {
                expr::walk(&Value::Object(self.0.clone()), &path[1..]).cloned()
            }
            _ => None,
        }
    }
}

impl Plan {
    pub fn node(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    pub fn step_of(&self, node: usize) -> &crate::runbook::Step {
        &self.runbook.steps[self.nodes[node].step]
    }
}
