//! A validated runbook bound to its params: `for_each` expanded, the DAG
//! built, and the waves it will run in.

use crate::expr::{self, Scope, Seg};
use crate::limits::Limits;
use crate::runbook::Runbook;
use serde::Serialize;
use serde_json::{Map, Value};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::ops::Range;

/// One unit of work: a step, or one item of a `for_each` step.
#[derive(Clone, Debug, Serialize)]
pub struct Node {
    /// `ID`, or `ID[N]` for item N of a `for_each`.
    pub id: String,
    /// Index into the runbook's steps.
    pub step: usize,
    /// `(index, value)` of a `for_each` item.
    pub each: Option<(usize, Value)>,
}

/// A runbook bound to its params and expanded.
///
/// Dependencies are kept per step, not per node: every item of a step
/// needs every item of the steps it needs, so a 6,000-item `for_each` that
/// needs another 6,000-item `for_each` is one edge here, where a list per
/// node held 36 million (4 GB). [`Plan::deps`] and [`Plan::dependents`]
/// give the nodes when they are wanted.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub runbook: Runbook,
    pub params: Map<String, Value>,
    pub nodes: Vec<Node>,
    /// The nodes of each runbook step (consecutive; empty for a `for_each`
    /// over an empty list).
    pub step_nodes: Vec<Range<usize>>,
    /// Nodes grouped by depth: everything in wave N needs only waves before it.
    pub waves: Vec<Vec<usize>>,
    /// Nodes in an order where every node comes after what it needs.
    pub order: Vec<usize>,
    /// For each step, the steps that need it.
    #[serde(skip)]
    step_dependents: Vec<Vec<usize>>,
    #[serde(skip)]
    step_index: HashMap<String, usize>,
}

/// Binds params (`--param k=v` as text) and expands the runbook within the
/// default [`Limits`].
pub fn plan(rb: Runbook, given: &BTreeMap<String, String>) -> Result<Plan, String> {
    plan_with(rb, given, &Limits::default())
}

/// Binds params (`--param k=v` as text) and expands the runbook, refusing a
/// plan larger than `limits` allow. Errors name every param that is missing
/// or malformed.
pub fn plan_with(
    rb: Runbook,
    given: &BTreeMap<String, String>,
    limits: &Limits,
) -> Result<Plan, String> {
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
    let mut step_nodes: Vec<Range<usize>> = Vec::with_capacity(rb.steps.len());
    let too_many = |n: usize| {
        format!(
            "the plan has more than {} steps after for_each is expanded ({n} so far); \
             split the runbook or run it for fewer items",
            limits.max_steps
        )
    };
    for (si, step) in rb.steps.iter().enumerate() {
        let items = match &step.for_each {
            None => None,
            Some(v) => match expr::render(v, &scope) {
                Ok(Value::Array(a)) if a.len() > limits.max_for_each_items => {
                    problems.push(format!(
                        "step `{}`: for_each gave {} items, more than the limit of {}",
                        step.id,
                        a.len(),
                        limits.max_for_each_items
                    ));
                    Some(Vec::new())
                }
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
        let start = nodes.len();
        match items {
            None => nodes.push(Node {
                id: step.id.clone(),
                step: si,
                each: None,
            }),
            Some(items) => {
                if start + items.len() > limits.max_steps {
                    return Err(too_many(start + items.len()));
                }
                for (i, v) in items.into_iter().enumerate() {
                    nodes.push(Node {
                        id: format!("{}[{i}]", step.id),
                        step: si,
                        each: Some((i, v)),
                    });
                }
            }
        }
        if nodes.len() > limits.max_steps {
            return Err(too_many(nodes.len()));
        }
        step_nodes.push(start..nodes.len());
    }
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    // A step needs the nodes of the steps it needs; a step with no nodes (a
    // for_each over nothing) holds nothing back.
    let needs: Vec<Vec<usize>> = rb
        .steps
        .iter()
        .map(|s| {
            s.needs
                .iter()
                .copied()
                .filter(|&d| d < step_nodes.len() && !step_nodes[d].is_empty())
                .collect()
        })
        .collect();
    let dependencies: u128 = needs
        .iter()
        .enumerate()
        .map(|(s, ns)| {
            step_nodes[s].len() as u128
                * ns.iter()
                    .map(|&d| step_nodes[d].len() as u128)
                    .sum::<u128>()
        })
        .sum();
    if dependencies > limits.max_dependencies as u128 {
        return Err(format!(
            "the plan has {dependencies} dependencies between expanded steps, more than the \
             limit of {}; a for_each step that needs another for_each step depends on each \
             of its items",
            limits.max_dependencies
        ));
    }
    let mut step_dependents: Vec<Vec<usize>> = vec![Vec::new(); rb.steps.len()];
    for (s, ns) in needs.iter().enumerate() {
        if step_nodes[s].is_empty() {
            continue;
        }
        for &d in ns {
            step_dependents[d].push(s);
        }
    }
    // Kahn's algorithm over steps, taking the earliest step in file order
    // first, so runs start steps in the order the runbook lists them. Every
    // node of a step becomes ready at once, so this is the node order.
    let live: Vec<usize> = (0..rb.steps.len())
        .filter(|&s| !step_nodes[s].is_empty())
        .collect();
    let mut indegree: Vec<usize> = needs.iter().map(Vec::len).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = live
        .iter()
        .copied()
        .filter(|&s| indegree[s] == 0)
        .map(Reverse)
        .collect();
    let mut depth = vec![0usize; rb.steps.len()];
    let mut order = Vec::with_capacity(nodes.len());
    let mut done = 0;
    while let Some(Reverse(s)) = ready.pop() {
        done += 1;
        depth[s] = needs[s].iter().map(|&d| depth[d] + 1).max().unwrap_or(0);
        order.extend(step_nodes[s].clone());
        for &d in &step_dependents[s] {
            indegree[d] -= 1;
            if indegree[d] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    if done < live.len() {
        return Err("the steps form a cycle".into());
    }
    let mut waves: Vec<Vec<usize>> =
        vec![Vec::new(); live.iter().map(|&s| depth[s] + 1).max().unwrap_or(0)];
    for &s in &live {
        waves[depth[s]].extend(step_nodes[s].clone());
    }
    let step_index = rb
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();
    Ok(Plan {
        runbook: rb,
        params,
        nodes,
        step_nodes,
        waves,
        order,
        step_dependents,
        step_index,
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

    /// The runbook step with this id.
    pub fn step_named(&self, id: &str) -> Option<usize> {
        self.step_index.get(id).copied()
    }

    /// The steps whose nodes `node` needs (each needs all of their nodes).
    pub fn step_deps(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        self.runbook.steps[self.nodes[node].step]
            .needs
            .iter()
            .copied()
            .filter(|&s| !self.step_nodes[s].is_empty())
    }

    /// The nodes `node` needs: every item of every step its step needs.
    pub fn deps(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        self.step_deps(node)
            .flat_map(|s| self.step_nodes[s].clone())
    }

    /// The steps that need the step of `node`.
    pub fn step_dependents(&self, node: usize) -> &[usize] {
        &self.step_dependents[self.nodes[node].step]
    }

    /// The nodes that need `node`.
    pub fn dependents(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        self.step_dependents(node)
            .iter()
            .flat_map(|&s| self.step_nodes[s].clone())
    }

    pub fn step_of(&self, node: usize) -> &crate::runbook::Step {
        &self.runbook.steps[self.nodes[node].step]
    }
}
