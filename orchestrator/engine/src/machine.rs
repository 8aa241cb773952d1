//! The engine: a pure state machine over a run's append-only event log.
//!
//! [`Engine::apply`] folds one event into the state; [`Engine::decide`] says
//! what should happen next. The executor performs each [`Action`], appends the
//! event that records it, and applies it. Nothing here reads a clock, does IO
//! or draws a random number, so replaying the log rebuilds the state exactly.

use crate::expr::{self, Scope, Seg};
use crate::plan::Plan;
use crate::runbook::{ErrorClass, OnFailure};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A failover, migration cutover or failback: what it builds stays.
    Run,
    /// Build, verify, tear everything down.
    Drill,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Succeeded,
    Failed,
    Cancelled,
    RolledBack,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::RolledBack => "rolled_back",
        }
    }
}

/// One entry of a run's event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A try of a step begins (after `delay_ms` of backoff). `key` is the
    /// idempotency key every try of the step shares.
    StepStarted {
        step: String,
        attempt: u32,
        delay_ms: u64,
        key: String,
    },
    StepSucceeded {
        step: String,
        outputs: Map<String, Value>,
    },
    StepFailed {
        step: String,
        attempt: u32,
        error: String,
        class: ErrorClass,
    },
    StepSkipped {
        step: String,
        reason: String,
    },
    ApprovalRequested {
        step: String,
    },
    Approved {
        step: String,
        by: String,
    },
    CancelRequested {
        by: String,
    },
    RollbackRequested {
        by: String,
    },
    UndoStarted {
        step: String,
    },
    UndoSucceeded {
        step: String,
    },
    UndoFailed {
        step: String,
        error: String,
    },
    RunFinished {
        status: RunStatus,
    },
}

/// What the executor should do next.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Action {
    Start {
        node: usize,
        attempt: u32,
        delay_ms: u64,
    },
    Skip {
        node: usize,
        reason: String,
    },
    /// The step cannot start (its `if` did not evaluate); record it as failed.
    Fail {
        node: usize,
        error: String,
    },
    RequestApproval {
        node: usize,
    },
    Undo {
        node: usize,
    },
    Finish {
        status: RunStatus,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running { attempt: u32 },
    RetryWait { attempt: u32, delay_ms: u64 },
    Waiting,
    Succeeded,
    Failed { error: String, class: ErrorClass },
    Skipped { reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UndoState {
    NotStarted,
    Running,
    Done,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Running,
    /// No new steps; waiting for running ones, then rollback or finish.
    Stopping,
    RollingBack,
    Finished(RunStatus),
}

/// An event that does not fit the state: the log is not this run's, or it
/// was written by a different engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected(pub String);

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

#[derive(Clone, Debug)]
pub struct Engine {
    plan: Arc<Plan>,
    mode: Mode,
    run: Map<String, Value>,
    index: HashMap<String, usize>,
    states: Vec<StepState>,
    undo: Vec<UndoState>,
    tries: Vec<u32>,
    outputs: Vec<Option<Map<String, Value>>>,
    phase: Phase,
    cancelled: bool,
    rollback_requested: bool,
    failed: bool,
    /// Nodes in `Running`, per target.
    running: Vec<usize>,
}

impl Engine {
    /// `run` is what `${{ run.* }}` reads (id, mode, work_dir).
    pub fn new(plan: Arc<Plan>, mode: Mode, run: Map<String, Value>) -> Engine {
        let n = plan.nodes.len();
        let index = plan
            .nodes
            .iter()
            .enumerate()
            .map(|(i, x)| (x.id.clone(), i))
            .collect();
        let targets = plan.runbook.targets.len();
        Engine {
            plan,
            mode,
            run,
            index,
            states: vec![StepState::Pending; n],
            undo: vec![UndoState::NotStarted; n],
            tries: vec![0; n],
            outputs: vec![None; n],
            phase: Phase::Running,
            cancelled: false,
            rollback_requested: false,
            failed: false,
            running: vec![0; targets],
        }
    }

    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn state(&self, node: usize) -> &StepState {
        &self.states[node]
    }

    pub fn undo_state(&self, node: usize) -> UndoState {
        self.undo[node]
    }

    pub fn outputs(&self, node: usize) -> Option<&Map<String, Value>> {
        self.outputs[node].as_ref()
    }

    pub fn node(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Steps whose try started and has no result: after a crash the executor
    /// runs them again with the same idempotency key.
    pub fn interrupted(&self) -> Vec<(usize, u32)> {
        (0..self.states.len())
            .filter_map(|i| match self.states[i] {
                StepState::Running { attempt } => Some((i, attempt)),
                _ => None,
            })
            .collect()
    }

    /// Undos that started and have no result.
    pub fn interrupted_undos(&self) -> Vec<usize> {
        (0..self.undo.len())
            .filter(|&i| self.undo[i] == UndoState::Running)
            .collect()
    }

    /// The idempotency key of a node in a run.
    pub fn key(&self, node: usize) -> String {
        let run = self.run.get("id").and_then(Value::as_str).unwrap_or("run");
        format!("{run}/{}", self.plan.nodes[node].id)
    }

    fn find(&self, id: &str) -> Result<usize, Rejected> {
        self.index.get(id).copied().ok_or_else(|| {
            Rejected(format!(
                "event names step `{id}`, which the plan does not have"
            ))
        })
    }

    fn set_running(&mut self, node: usize, on: bool) {
        let t = self.plan.step_of(node).target;
        if on {
            self.running[t] += 1;
        } else {
            self.running[t] = self.running[t].saturating_sub(1);
        }
    }

    /// Folds one event into the state.
    pub fn apply(&mut self, ev: &Event) -> Result<(), Rejected> {
        if let Phase::Finished(_) = self.phase
            && !matches!(
                ev,
                Event::RollbackRequested { .. } | Event::CancelRequested { .. }
            )
        {
            return Err(Rejected(format!("{ev:?} after the run finished")));
        }
        match ev {
            Event::StepStarted { step, attempt, .. } => {
                let i = self.find(step)?;
                match self.states[i] {
                    StepState::Pending | StepState::RetryWait { .. } => {}
                    ref s => return Err(Rejected(format!("`{step}` started while {s:?}"))),
                }
                self.states[i] = StepState::Running { attempt: *attempt };
                self.tries[i] = *attempt;
                self.set_running(i, true);
            }
            Event::StepSucceeded { step, outputs } => {
                let i = self.find(step)?;
                match self.states[i] {
                    StepState::Running { .. } => self.set_running(i, false),
                    StepState::Waiting => {}
                    ref s => return Err(Rejected(format!("`{step}` succeeded while {s:?}"))),
                }
                self.states[i] = StepState::Succeeded;
                self.outputs[i] = Some(outputs.clone());
            }
            Event::StepFailed {
                step,
                attempt,
                error,
                class,
            } => {
                let i = self.find(step)?;
                match self.states[i] {
                    StepState::Running { .. } => self.set_running(i, false),
                    StepState::Pending | StepState::Waiting | StepState::RetryWait { .. } => {}
                    ref s => return Err(Rejected(format!("`{step}` failed while {s:?}"))),
                }
                let retry = &self.plan.step_of(i).retry;
                // Attempt 0 never ran (its `if` did not evaluate): not retried.
                if self.phase == Phase::Running
                    && *attempt > 0
                    && *attempt < retry.attempts
                    && retry.on.contains(class)
                {
                    let shift = (*attempt).saturating_sub(1).min(20);
                    let ceiling = retry
                        .backoff_ms
                        .saturating_mul(1u64 << shift)
                        .min(retry.max_backoff_ms);
                    let delay_ms = jittered(ceiling, &self.key(i), *attempt);
                    self.states[i] = StepState::RetryWait {
                        attempt: attempt + 1,
                        delay_ms,
                    };
                } else {
                    self.states[i] = StepState::Failed {
                        error: error.clone(),
                        class: *class,
                    };
                    if *class != ErrorClass::Cancelled {
                        self.failed = true;
                    }
                    if self.phase == Phase::Running {
                        self.phase = Phase::Stopping;
                    }
                    // Nothing starts any more: a step waiting to retry ends here
                    // (and the undo of its earlier tries runs).
                    for s in &mut self.states {
                        if matches!(s, StepState::RetryWait { .. }) {
                            *s = StepState::Failed {
                                error: "not retried: the run is stopping".into(),
                                class: ErrorClass::Cancelled,
                            };
                        }
                    }
                }
            }
            Event::StepSkipped { step, reason } => {
                let i = self.find(step)?;
                if self.states[i] != StepState::Pending {
                    return Err(Rejected(format!(
                        "`{step}` skipped while {:?}",
                        self.states[i]
                    )));
                }
                self.states[i] = StepState::Skipped {
                    reason: reason.clone(),
                };
            }
            Event::ApprovalRequested { step } => {
                let i = self.find(step)?;
                if self.states[i] != StepState::Pending {
                    return Err(Rejected(format!(
                        "approval of `{step}` requested while {:?}",
                        self.states[i]
                    )));
                }
                self.states[i] = StepState::Waiting;
            }
            Event::Approved { step, by } => {
                let i = self.find(step)?;
                if self.states[i] != StepState::Waiting {
                    return Err(Rejected(format!("`{step}` is not waiting for approval")));
                }
                let mut out = Map::new();
                out.insert("by".into(), Value::String(by.clone()));
                self.states[i] = StepState::Succeeded;
                self.outputs[i] = Some(out);
            }
            Event::CancelRequested { .. } => {
                if let Phase::Finished(_) = self.phase {
                    return Ok(());
                }
                self.cancelled = true;
                for s in &mut self.states {
                    if matches!(s, StepState::Waiting | StepState::RetryWait { .. }) {
                        *s = StepState::Failed {
                            error: "cancelled".into(),
                            class: ErrorClass::Cancelled,
                        };
                    }
                }
                if self.phase == Phase::Running {
                    self.phase = Phase::Stopping;
                }
            }
            Event::RollbackRequested { .. } => {
                self.rollback_requested = true;
                // Undos that failed get another go.
                for u in &mut self.undo {
                    if *u == UndoState::Failed {
                        *u = UndoState::NotStarted;
                    }
                }
                match self.phase {
                    Phase::Running => self.phase = Phase::Stopping,
                    Phase::Finished(_) => self.phase = Phase::Stopping,
                    _ => {}
                }
                for s in &mut self.states {
                    if matches!(s, StepState::Waiting | StepState::RetryWait { .. }) {
                        *s = StepState::Failed {
                            error: "rolled back".into(),
                            class: ErrorClass::Cancelled,
                        };
                    }
                }
            }
            Event::UndoStarted { step } => {
                let i = self.find(step)?;
                if self.undo[i] != UndoState::NotStarted {
                    return Err(Rejected(format!("undo of `{step}` started twice")));
                }
                self.undo[i] = UndoState::Running;
                self.phase = Phase::RollingBack;
            }
            Event::UndoSucceeded { step } | Event::UndoFailed { step, .. } => {
                let i = self.find(step)?;
                if self.undo[i] != UndoState::Running {
                    return Err(Rejected(format!("undo of `{step}` ended without starting")));
                }
                self.undo[i] = if matches!(ev, Event::UndoSucceeded { .. }) {
                    UndoState::Done
                } else {
                    UndoState::Failed
                };
            }
            Event::RunFinished { status } => self.phase = Phase::Finished(*status),
        }
        Ok(())
    }

    fn settled(&self, node: usize) -> bool {
        matches!(
            self.states[node],
            StepState::Succeeded | StepState::Skipped { .. }
        )
    }

    /// Whether a node's undo still has to run.
    pub fn needs_undo(&self, node: usize) -> bool {
        self.undo[node] == UndoState::NotStarted
            && self.plan.step_of(node).undo.is_some()
            && (self.states[node] == StepState::Succeeded
                || (matches!(self.states[node], StepState::Failed { .. }) && self.tries[node] > 0))
    }

    fn wants_rollback(&self) -> bool {
        // Once undos started, a cancel does not abandon them halfway.
        self.phase == Phase::RollingBack
            || self.undo.contains(&UndoState::Running)
            || self.rollback_requested
            || self.mode == Mode::Drill
            || (self.failed
                && !self.cancelled
                && self.plan.runbook.on_failure == OnFailure::Rollback)
    }

    fn final_status(&self) -> RunStatus {
        // An operator's rollback is the last word on a run, whatever it was.
        if self.undo.contains(&UndoState::Failed) {
            // Something the run made could not be removed: never a success.
            RunStatus::Failed
        } else if self.rollback_requested {
            RunStatus::RolledBack
        } else if self.failed {
            RunStatus::Failed
        } else if self.cancelled {
            RunStatus::Cancelled
        } else {
            RunStatus::Succeeded
        }
    }

    /// What should happen next. Every action returned must be recorded (as
    /// its event) before `decide` is called again.
    pub fn decide(&self) -> Vec<Action> {
        match self.phase {
            Phase::Finished(_) => Vec::new(),
            Phase::Running => {
                let actions = self.next_steps();
                if actions.is_empty()
                    && self.running.iter().all(|&r| r == 0)
                    && (0..self.states.len()).all(|i| self.settled(i))
                {
                    if self.wants_rollback() {
                        return self.finish_or_undo();
                    }
                    return vec![Action::Finish {
                        status: self.final_status(),
                    }];
                }
                actions
            }
            Phase::Stopping | Phase::RollingBack => {
                if self.running.iter().any(|&r| r > 0) {
                    return Vec::new();
                }
                if self.wants_rollback() {
                    self.finish_or_undo()
                } else {
                    vec![Action::Finish {
                        status: self.final_status(),
                    }]
                }
            }
        }
    }

    /// Whether every node of a step is settled, and its first skipped node.
    fn step_status(&self, step: usize) -> (bool, Option<usize>) {
        let nodes = self.plan.step_nodes[step].clone();
        let settled = nodes.clone().all(|d| self.settled(d));
        let skipped = nodes
            .into_iter()
            .find(|&d| matches!(self.states[d], StepState::Skipped { .. }));
        (settled, skipped)
    }

    fn next_steps(&self) -> Vec<Action> {
        let mut out = Vec::new();
        let mut busy = self.running.clone();
        // Per step, computed once per call: items of a for_each that needs
        // another for_each share what they wait for.
        let mut status: Vec<Option<(bool, Option<usize>)>> =
            vec![None; self.plan.runbook.steps.len()];
        for &i in &self.plan.order {
            let t = self.plan.step_of(i).target;
            match &self.states[i] {
                StepState::RetryWait { attempt, delay_ms }
                    if busy[t] < self.plan.runbook.targets[t].parallelism =>
                {
                    busy[t] += 1;
                    out.push(Action::Start {
                        node: i,
                        attempt: *attempt,
                        delay_ms: *delay_ms,
                    });
                }
                StepState::Pending => {
                    let mut settled = true;
                    let mut skipped = None;
                    for s in self.plan.step_deps(i) {
                        let (all, skip) = *status[s].get_or_insert_with(|| self.step_status(s));
                        settled &= all;
                        skipped = skipped.or(skip);
                    }
                    if !settled {
                        continue;
                    }
                    if let Some(d) = skipped {
                        out.push(Action::Skip {
                            node: i,
                            reason: format!("needs `{}`, which was skipped", self.plan.nodes[d].id),
                        });
                        continue;
                    }
                    let step = self.plan.step_of(i);
                    if let Some(cond) = &step.cond {
                        let text = cond.trim();
                        let inner = text
                            .strip_prefix("${{")
                            .and_then(|t| t.strip_suffix("}}"))
                            .unwrap_or(text);
                        match expr::parse_expr(inner)
                            .map_err(|(_, m)| m)
                            .and_then(|e| e.eval(&self.scope(i)))
                        {
                            Ok(v) if !expr::truthy(&v) => {
                                out.push(Action::Skip {
                                    node: i,
                                    reason: format!("`if: {text}` is false"),
                                });
                                continue;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                out.push(Action::Fail {
                                    node: i,
                                    error: format!("`if: {text}`: {e}"),
                                });
                                continue;
                            }
                        }
                    }
                    if step.action().approval {
                        out.push(Action::RequestApproval { node: i });
                    } else if busy[t] < self.plan.runbook.targets[t].parallelism {
                        busy[t] += 1;
                        out.push(Action::Start {
                            node: i,
                            attempt: 1,
                            delay_ms: 0,
                        });
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Undos whose dependents are all undone, in reverse dependency order;
    /// or the finish when nothing is left to undo.
    fn finish_or_undo(&self) -> Vec<Action> {
        // Per step: every node of it is clear. In reverse order every node
        // of a dependent step comes before any node of the step it needs.
        let mut step_clear = vec![true; self.plan.runbook.steps.len()];
        let mut out = Vec::new();
        let mut pending = false;
        for &i in self.plan.order.iter().rev() {
            let deps_clear = self.plan.step_dependents(i).iter().all(|&s| step_clear[s]);
            let mine_done = match self.undo[i] {
                UndoState::Done | UndoState::Failed => true,
                UndoState::Running => {
                    pending = true;
                    false
                }
                UndoState::NotStarted => {
                    if self.needs_undo(i) {
                        pending = true;
                        if deps_clear {
                            out.push(Action::Undo { node: i });
                        }
                        false
                    } else {
                        true
                    }
                }
            };
            // Node i and everything downstream of it need no more undo.
            let clear = deps_clear && mine_done;
            step_clear[self.plan.nodes[i].step] &= clear;
        }
        if !pending {
            return vec![Action::Finish {
                status: self.final_status(),
            }];
        }
        out
    }

    /// What templates of `node` can read.
    pub fn scope(&self, node: usize) -> EngineScope<'_> {
        EngineScope { engine: self, node }
    }

    /// The node's `with`, rendered.
    pub fn inputs(&self, node: usize) -> Result<Map<String, Value>, String> {
        let with = Value::Object(self.plan.step_of(node).with.clone());
        match expr::render(&with, &self.scope(node))? {
            Value::Object(m) => Ok(m),
            _ => Ok(Map::new()),
        }
    }

    /// The node's undo inputs, rendered (its own outputs are readable).
    pub fn undo_inputs(&self, node: usize) -> Result<Map<String, Value>, String> {
        let Some(undo) = &self.plan.step_of(node).undo else {
            return Ok(Map::new());
        };
        match expr::render(&Value::Object(undo.with.clone()), &self.scope(node))? {
            Value::Object(m) => Ok(m),
            _ => Ok(Map::new()),
        }
    }

    /// Every step's state, for status displays.
    pub fn states(&self) -> impl Iterator<Item = (&str, &StepState, UndoState)> {
        self.plan
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), &self.states[i], self.undo[i]))
    }
}

pub struct EngineScope<'a> {
    engine: &'a Engine,
    node: usize,
}

impl Scope for EngineScope<'_> {
    fn get(&self, path: &[Seg]) -> Option<Value> {
        let e = self.engine;
        let Some(Seg::Key(root)) = path.first() else {
            return None;
        };
        match root.as_str() {
            "params" => expr::walk(&Value::Object(e.plan.params.clone()), &path[1..]).cloned(),
            "run" => expr::walk(&Value::Object(e.run.clone()), &path[1..]).cloned(),
            "each" => {
                let (i, v) = e.plan.nodes[self.node].each.as_ref()?;
                match path.get(1) {
                    Some(Seg::Key(k)) if k == "index" => Some(Value::from(*i)),
                    Some(Seg::Key(k)) if k == "value" => expr::walk(v, &path[2..]).cloned(),
                    _ => None,
                }
            }
            "steps" => {
                let Some(Seg::Key(id)) = path.get(1) else {
                    return None;
                };
                let step = e.plan.step_named(id)?;
                if !matches!(path.get(2), Some(Seg::Key(k)) if k == "outputs") {
                    return None;
                }
                let nodes: Vec<usize> = e.plan.step_nodes[step].clone().collect();
                let out_of = |n: usize| e.outputs[n].clone().map(Value::Object);
                let whole = if e.plan.runbook.steps[step].for_each.is_some() {
                    Value::Array(
                        nodes
                            .iter()
                            .map(|&n| out_of(n).unwrap_or(Value::Null))
                            .collect(),
                    )
                } else {
                    out_of(*nodes.first()?)?
                };
                if e.plan.runbook.steps[step].for_each.is_some() {
                    // steps.ID.outputs.NAME over items: the list of each item's NAME.
                    // steps.ID.outputs.NAME[...]: NAME of each item, as a list, then indexed.
                    let Value::Array(items) = whole else {
                        return None;
                    };
                    let Some(name) = path.get(3) else {
                        return Some(Value::Array(items));
                    };
                    let picked: Vec<Value> = items
                        .iter()
                        .map(|it| {
                            expr::walk(it, std::slice::from_ref(name))
                                .cloned()
                                .unwrap_or(Value::Null)
                        })
                        .collect();
                    return expr::walk(&Value::Array(picked), &path[4..]).cloned();
                }
                expr::walk(&whole, &path[3..]).cloned()
            }
            _ => None,
        }
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;

/// A retry delay between half of `ceiling` and all of it ("equal jitter"),
/// so steps that failed together (one flaky endpoint, many for_each items)
/// do not all retry at the same instant. Drawn from the step's key and try
/// (FNV-1a), not a random source: replaying the log gives the same delay.
fn jittered(ceiling: u64, key: &str, attempt: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain(attempt.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let half = ceiling / 2;
    half + h % (ceiling - half + 1)
}
