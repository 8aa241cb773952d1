//! The executor: drives one run. It folds the run's stored log into an
//! [`Engine`], asks it what to do, records each decision in the log *before*
//! acting on it, runs the actions, and records their results. After a crash,
//! starting again replays the log and re-runs the tries that had no result,
//! under the same idempotency keys.

use crate::actions;
use crate::context::Password;
use crate::state::{Command, RunRow, State, Stored, Verified};
use crate::step::{ActionError, Call, Ctx, Outputs};
use crate::targets::{Bound, Placement, Registry};
use anyhow::{Context, Result};
use ferry_engine::machine::Phase;
use ferry_engine::runbook::ErrorClass;
use ferry_engine::{Action, Engine, Event, Mode, RunStatus};
use futures::FutureExt;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `HOST:PID:NONCE`, one runner as a run's owner: two runners in one process
/// (the API server) are two owners, so only one of them can hold a run.
pub fn owner_id() -> String {
    format!(
        "{}:{}:{}",
        crate::sys::hostname(),
        std::process::id(),
        crate::sys::random_hex(4)
    )
}

/// Whether `owner` names a process on this host that no longer runs.
pub fn owner_is_dead(owner: &str) -> bool {
    let mut parts = owner.split(':');
    let (host, pid) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    host == crate::sys::hostname() && pid.parse::<i32>().is_ok_and(|p| !crate::sys::pid_alive(p))
}

/// Builds the engine for a stored run: re-validates its runbook text and
/// replays its log.
pub fn rebuild(run: &RunRow, log: &[Stored]) -> Result<Engine> {
    let mut rb = ferry_engine::parse(&run.file, &run.source).map_err(|d| {
        anyhow::anyhow!(
            "the stored runbook of run {} no longer validates:\n{d}",
            run.id
        )
    })?;
    if let Some(target) = &run.target {
        rb.retarget(target)
            .map_err(|e| anyhow::anyhow!("run {}: {e}", run.id))?;
    }
    let plan =
        ferry_engine::plan(rb, &run.params).map_err(|e| anyhow::anyhow!("run {}: {e}", run.id))?;
    let mode = if run.mode == "drill" {
        Mode::Drill
    } else {
        Mode::Run
    };
    let mut info = Map::new();
    info.insert("id".into(), Value::String(run.id.clone()));
    info.insert("mode".into(), Value::String(run.mode.clone()));
    info.insert("work_dir".into(), Value::String(run.work_dir.clone()));
    // Where the steps that name no target run: a provider-neutral runbook
    // may leave out what one kind of target cannot do (`if:`).
    if let Some(t) = run
        .target
        .as_deref()
        .and_then(|name| plan.runbook.targets.iter().find(|t| t.name == name))
        .or_else(|| plan.runbook.targets.first())
    {
        info.insert("target".into(), Value::String(t.name.clone()));
        info.insert("target_type".into(), Value::String(t.kind.clone()));
    }
    let mut engine = Engine::new(Arc::new(plan), mode, info);
    for s in log {
        engine
            .apply(&s.event)
            .with_context(|| format!("event {} of run {}", s.seq, run.id))?;
    }
    Ok(engine)
}

/// How the executor reports progress.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// One line per event on stderr.
    pub lines: bool,
}

enum Done {
    Step {
        node: usize,
        attempt: u32,
        result: Result<Outputs, ActionError>,
    },
    Undo {
        node: usize,
        result: Result<(), String>,
    },
}

pub struct Runner {
    state: State,
    run: RunRow,
    engine: Engine,
    ctx: Arc<Ctx>,
    /// The target of each of the runbook's `targets`, by index.
    targets: Vec<Bound>,
    next_seq: i64,
    owner: String,
    out: Output,
    tasks: JoinSet<Done>,
    running: HashMap<usize, tokio::task::AbortHandle>,
    /// Events applied to the engine but not yet in the log: results wait
    /// here for the decisions they lead to, so both go in one commit.
    staged: Vec<Event>,
    /// When each approval gate with a `timeout` gives up (ms since the epoch).
    gates: HashMap<usize, i64>,
    crash_at: Option<i64>,
}

impl Runner {
    /// Claims the run (its owner must be this process, gone, or its lease
    /// expired) and rebuilds its state from the log.
    pub async fn claim(
        state: State,
        run: RunRow,
        repo: Option<String>,
        password: Option<Password>,
        registry: &Registry,
        out: Output,
    ) -> Result<Runner> {
        let owner = owner_id();
        let dead = run.owner.as_deref().filter(|o| owner_is_dead(o));
        if !state
            .claim(&run.id, &owner, now_ms(), LEASE_MS, dead)
            .await?
        {
            anyhow::bail!(
                "run {} is being run by {} (lease until {}); wait for it, or for the lease to run out",
                run.id,
                run.owner.as_deref().unwrap_or("another process"),
                run.lease_ms
                    .map(|l| chrono::DateTime::from_timestamp_millis(l)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default())
                    .unwrap_or_default()
            );
        }
        let log = state.events(&run.id).await?;
        let engine = rebuild(&run, &log)?;
        let targets = engine
            .plan()
            .runbook
            .targets
            .iter()
            .map(|t| {
                let target = registry.get(&t.kind).ok_or_else(|| {
                    anyhow::anyhow!(
                        "run {}: target `{}` has type `{}`, which this ferry does not have",
                        run.id,
                        t.name,
                        t.kind
                    )
                })?;
                Ok(Bound {
                    target,
                    place: Arc::new(Placement::of(t)),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Work volumes hold decrypted disks: private to this user.
        crate::fsutil::create_private_dir(std::path::Path::new(&run.work_dir))
            .with_context(|| format!("cannot create the work directory {}", run.work_dir))?;
        let ctx = Arc::new(Ctx {
            run_id: run.id.clone(),
            work_dir: run.work_dir.clone().into(),
            drill: run.mode == "drill",
            started_ms: run.created_ms,
            repo: repo.or_else(|| run.repo.clone()),
            password,
            secrets: engine
                .plan()
                .runbook
                .secrets
                .iter()
                .map(|name| {
                    let value = std::env::var_os(name)
                        .map(|v| v.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    (name.clone(), value)
                })
                .collect(),
        });
        let crash_at = std::env::var("FERRY_CRASH_AT_EVENT")
            .ok()
            .and_then(|s| s.parse().ok());
        let mut runner = Runner {
            state,
            next_seq: log.last().map_or(0, |s| s.seq + 1),
            run,
            engine,
            ctx,
            targets,
            owner,
            out,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            staged: Vec::new(),
            gates: HashMap::new(),
            crash_at,
        };
        for s in &log {
            runner.note_gate(s.at_ms, &s.event);
        }
        Ok(runner)
    }

    /// Applies events to the engine without persisting them yet. Nothing
    /// may act on them before [`Runner::record`] has written them: a crash
    /// before then loses them together with whatever they led to, and the
    /// tries they ended run again under the same keys.
    fn stage(&mut self, events: Vec<Event>) -> Result<()> {
        for e in events {
            self.engine
                .apply(&e)
                .map_err(|r| anyhow::anyhow!("run {}: {r}", self.run.id))?;
            self.staged.push(e);
        }
        Ok(())
    }

    /// Persists the staged events and `events` in one commit, and applies
    /// the new ones. Nothing acts on an event before it is in the log.
    async fn record(&mut self, events: Vec<Event>) -> Result<()> {
        self.stage(events)?;
        if self.staged.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(&mut self.staged);
        let at = now_ms();
        let batch: Vec<(i64, &Event)> = events.iter().map(|e| (at, e)).collect();
        self.state
            .append(&self.run.id, self.next_seq, &batch)
            .await?;
        for e in &events {
            self.say(at, e);
            self.note_gate(at, e);
        }
        self.next_seq += events.len() as i64;
        if let Some(n) = self.crash_at
            && self.next_seq >= n
        {
            // Test hook (FERRY_CRASH_AT_EVENT): die like kill -9 right
            // after the log reaches N events.
            crate::sys::kill_self();
        }
        Ok(())
    }

    /// Remembers when an approval gate asked at `at` times out, if its step
    /// has a `timeout`.
    fn note_gate(&mut self, at: i64, e: &Event) {
        if let Event::ApprovalRequested { step } = e
            && let Some(node) = self.engine.node(step)
            && let Some(t) = self.engine.plan().step_of(node).timeout_ms
        {
            self.gates.insert(
                node,
                at.saturating_add(i64::try_from(t).unwrap_or(i64::MAX)),
            );
        }
    }

    /// Fails the approval gates nobody answered in time.
    fn expire_gates(&mut self) -> Result<()> {
        let now = now_ms();
        let expired: Vec<usize> = self
            .gates
            .iter()
            .filter(|(_, deadline)| now >= **deadline)
            .map(|(node, _)| *node)
            .collect();
        let mut events = Vec::new();
        for node in expired {
            self.gates.remove(&node);
            if *self.engine.state(node) != ferry_engine::StepState::Waiting {
                continue;
            }
            let t = self.engine.plan().step_of(node).timeout_ms.unwrap_or(0);
            events.push(Event::StepFailed {
                step: self.engine.plan().nodes[node].id.clone(),
                attempt: 0,
                error: format!(
                    "nobody approved it within its timeout ({} s)",
                    t as f64 / 1000.0
                ),
                class: ErrorClass::Timeout,
            });
        }
        self.stage(events)
    }

    fn say(&self, at: i64, e: &Event) {
        if !self.out.lines {
            return;
        }
        let t = (at - self.run.created_ms) as f64 / 1000.0;
        let line = match e {
            Event::StepStarted {
                step,
                attempt,
                delay_ms,
                ..
            } => {
                let uses = self
                    .engine
                    .node(step)
                    .map(|n| self.engine.plan().step_of(n).uses.clone())
                    .unwrap_or_default();
                let retry = if *attempt > 1 {
                    format!(" (try {attempt}, after {:.1} s)", *delay_ms as f64 / 1000.0)
                } else {
                    String::new()
                };
                format!("start  {step} ({uses}){retry}")
            }
            Event::StepSucceeded { step, .. } => format!("ok     {step}"),
            Event::StepFailed {
                step, error, class, ..
            } => format!("FAILED {step} [{}]: {error}", class.name()),
            Event::StepSkipped { step, reason } => format!("skip   {step}: {reason}"),
            Event::ApprovalRequested { step } => format!(
                "WAIT   {step}: approve with `ferry approve {} {step}`",
                self.run.id
            ),
            Event::Approved { step, by } => format!("ok     {step} (approved by {by})"),
            Event::CancelRequested { by } => format!("cancel requested by {by}"),
            Event::RollbackRequested { by } => format!("rollback requested by {by}"),
            Event::UndoStarted { step } => format!("undo   {step}"),
            Event::UndoSucceeded { step } => format!("undone {step}"),
            Event::UndoFailed { step, error } => format!("UNDO FAILED {step}: {error}"),
            Event::RunFinished { status } => format!("run {} {}", self.run.id, status.name()),
        };
        eprintln!("{t:8.2}s  {line}");
    }

    /// Turns queued commands (approve, cancel, rollback) into events.
    async fn ingest(&mut self) -> Result<()> {
        for (id, cmd) in self.state.open_commands(&self.run.id).await? {
            let ev = match cmd {
                Command::Approve { step, by } => {
                    let waiting = self
                        .engine
                        .node(&step)
                        .is_some_and(|n| *self.engine.state(n) == ferry_engine::StepState::Waiting);
                    waiting.then_some(Event::Approved { step, by })
                }
                Command::Cancel { by } => Some(Event::CancelRequested { by }),
                Command::Rollback { by } => Some(Event::RollbackRequested { by }),
            };
            if let Some(ev) = ev {
                let stop = matches!(
                    ev,
                    Event::CancelRequested { .. } | Event::RollbackRequested { .. }
                );
                self.record(vec![ev]).await?;
                if stop {
                    self.abort_running().await?;
                }
            }
            self.state.command_done(&id, now_ms()).await?;
        }
        Ok(())
    }

    /// Stops every running try and records it as cancelled.
    async fn abort_running(&mut self) -> Result<()> {
        let nodes: Vec<usize> = self.running.keys().copied().collect();
        let mut events = Vec::new();
        for node in nodes {
            if let Some(h) = self.running.remove(&node) {
                h.abort();
            }
            if let ferry_engine::StepState::Running { attempt } = *self.engine.state(node) {
                events.push(Event::StepFailed {
                    step: self.engine.plan().nodes[node].id.clone(),
                    attempt,
                    error: "cancelled while running".into(),
                    class: ErrorClass::Cancelled,
                });
            }
        }
        self.record(events).await
    }

    fn spawn_step(&mut self, node: usize, attempt: u32, delay_ms: u64) {
        let plan = self.engine.plan().clone();
        let step = plan.step_of(node);
        let timeout = step.timeout_ms.map(Duration::from_millis);
        let inputs = self.engine.inputs(node);
        let call_base = (
            plan.nodes[node].id.clone(),
            self.engine.key(node),
            step.uses.clone(),
        );
        let ctx = self.ctx.clone();
        let target = self.targets[step.target].clone();
        let h = self.tasks.spawn(async move {
            if delay_ms > 0 {
                // (Never sleep(0): tokio's timer would still wait for its next 1 ms tick.)
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            let inputs = match inputs {
                Ok(i) => i,
                Err(e) => {
                    return Done::Step {
                        node,
                        attempt,
                        result: Err(ActionError::permanent(format!("inputs: {e}"))),
                    };
                }
            };
            let call = Call {
                node: call_base.0,
                key: call_base.1,
                uses: call_base.2,
                inputs,
            };
            // A panicking action fails its step instead of leaving it running forever.
            let fut = async move {
                std::panic::AssertUnwindSafe(actions::perform(ctx, target, call))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|p| {
                        Err(ActionError::permanent(format!(
                            "the action panicked: {}",
                            panic_text(&p)
                        )))
                    })
            };
            let result = match timeout {
                Some(t) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(ActionError {
                        class: ErrorClass::Timeout,
                        message: format!("timed out after {:.0} s", t.as_secs_f64()),
                    }),
                },
                None => fut.await,
            };
            Done::Step {
                node,
                attempt,
                result,
            }
        });
        self.running.insert(node, h);
    }

    fn spawn_undo(&mut self, node: usize) {
        let plan = self.engine.plan().clone();
        let uses = plan
            .step_of(node)
            .undo
            .as_ref()
            .map(|u| u.uses.clone())
            .unwrap_or_default();
        let inputs = self.engine.undo_inputs(node);
        let id = plan.nodes[node].id.clone();
        let key = self.engine.key(node);
        let ctx = self.ctx.clone();
        let target = self.targets[plan.step_of(node).target].clone();
        self.tasks.spawn(async move {
            let result = match inputs {
                Ok(inputs) => std::panic::AssertUnwindSafe(actions::undo(
                    ctx,
                    target,
                    Call {
                        node: id,
                        key,
                        uses,
                        inputs,
                    },
                ))
                .catch_unwind()
                .await
                .unwrap_or_else(|p| Err(format!("the undo panicked: {}", panic_text(&p)))),
                Err(e) => Err(format!("undo inputs: {e}")),
            };
            Done::Undo { node, result }
        });
    }

    /// Drives the run to its end. Returns how it ended.
    pub async fn drive(mut self) -> Result<(RunRow, RunStatus)> {
        for (node, attempt) in self.engine.interrupted() {
            if self.out.lines {
                eprintln!(
                    "resume {}: try {attempt} was interrupted; running it again (key {})",
                    self.engine.plan().nodes[node].id,
                    self.engine.key(node)
                );
            }
            self.spawn_step(node, attempt, 0);
        }
        for node in self.engine.interrupted_undos() {
            self.spawn_undo(node);
        }
        let mut last_renew = now_ms();
        let mut last_ingest = 0;
        loop {
            // Commands from other processes: checked every 100 ms at most, not
            // on every turn (a query per turn doubled the cost of a step).
            if now_ms() - last_ingest >= 100 {
                self.ingest().await?;
                last_ingest = now_ms();
            }
            if let Phase::Finished(_) = self.engine.phase() {
                // A rollback queued at the last moment still counts.
                self.record(Vec::new()).await?;
                self.ingest().await?;
                if let Phase::Finished(status) = self.engine.phase() {
                    return self.finish(status).await;
                }
                continue;
            }
            self.expire_gates()?;
            let actions = self.engine.decide();
            let mut events = Vec::new();
            let mut starts = Vec::new();
            let mut undos = Vec::new();
            for a in actions {
                let id = |n: usize| self.engine.plan().nodes[n].id.clone();
                match a {
                    Action::Start {
                        node,
                        attempt,
                        delay_ms,
                    } => {
                        events.push(Event::StepStarted {
                            step: id(node),
                            attempt,
                            delay_ms,
                            key: self.engine.key(node),
                        });
                        starts.push((node, attempt, delay_ms));
                    }
                    Action::Skip { node, reason } => events.push(Event::StepSkipped {
                        step: id(node),
                        reason,
                    }),
                    Action::Fail { node, error } => events.push(Event::StepFailed {
                        step: id(node),
                        attempt: 0,
                        error,
                        class: ErrorClass::Permanent,
                    }),
                    Action::RequestApproval { node } => {
                        events.push(Event::ApprovalRequested { step: id(node) })
                    }
                    Action::Undo { node } => {
                        events.push(Event::UndoStarted { step: id(node) });
                        undos.push(node);
                    }
                    Action::Finish { status } => events.push(Event::RunFinished { status }),
                }
            }
            let acted = !events.is_empty();
            // The results staged last turn and the decisions they led to:
            // one commit (a step of a chain costs one, not two).
            self.record(events).await?;
            for (node, attempt, delay) in starts {
                self.spawn_step(node, attempt, delay);
            }
            for node in undos {
                self.spawn_undo(node);
            }
            if acted {
                continue;
            }
            if now_ms() - last_renew > LEASE_MS / 3 {
                if !self
                    .state
                    .claim(&self.run.id, &self.owner, now_ms(), LEASE_MS, None)
                    .await?
                {
                    anyhow::bail!(
                        "lost the lease on run {}: another process took it over",
                        self.run.id
                    );
                }
                last_renew = now_ms();
            }
            // Until a task ends, this process queues a command (an approval
            // through the API), or the next poll for other processes' commands.
            let changed = self.state.changed();
            let done = if self.tasks.is_empty() {
                tokio::select! {
                    () = changed => {}
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                None
            } else {
                tokio::select! {
                    d = self.tasks.join_next() => d,
                    () = changed => None,
                    () = tokio::time::sleep(Duration::from_millis(200)) => None,
                }
            };
            let Some(first) = done else { continue };
            // Every result already in: one commit for all of them.
            let mut finished = vec![first];
            while let Some(more) = self.tasks.try_join_next() {
                finished.push(more);
            }
            let mut events = Vec::new();
            for done in finished {
                // An aborted task was recorded as cancelled already.
                if let Some(ev) = done.ok().and_then(|d| self.result_event(d)) {
                    events.push(ev);
                }
            }
            self.stage(events)?;
        }
    }

    /// The event that records a finished task, if it still matters.
    fn result_event(&mut self, done: Done) -> Option<Event> {
        Some(match done {
            Done::Step {
                node,
                attempt,
                result,
            } => {
                self.running.remove(&node);
                if !matches!(
                    self.engine.state(node),
                    ferry_engine::StepState::Running { .. }
                ) {
                    return None;
                }
                let step = self.engine.plan().nodes[node].id.clone();
                // Secrets never reach the log.
                match result {
                    Ok(outputs) => {
                        let mut v = serde_json::Value::Object(outputs);
                        self.ctx.scrub_value(&mut v);
                        let outputs = match v {
                            serde_json::Value::Object(m) => m,
                            _ => Map::new(),
                        };
                        Event::StepSucceeded { step, outputs }
                    }
                    Err(e) => Event::StepFailed {
                        step,
                        attempt,
                        error: self.ctx.scrub(&e.message),
                        class: e.class,
                    },
                }
            }
            Done::Undo { node, result } => {
                let step = self.engine.plan().nodes[node].id.clone();
                match result {
                    Ok(()) => Event::UndoSucceeded { step },
                    Err(error) => Event::UndoFailed {
                        step,
                        error: self.ctx.scrub(&error),
                    },
                }
            }
        })
    }

    async fn finish(self, status: RunStatus) -> Result<(RunRow, RunStatus)> {
        let at = now_ms();
        self.state.finish(&self.run.id, status.name(), at).await?;
        if self.run.mode == "drill" && status == RunStatus::Succeeded {
            // The drill proved these points: mark them last known good.
            for n in 0..self.engine.plan().nodes.len() {
                if self.engine.plan().step_of(n).uses != "volume.restore" {
                    continue;
                }
                let Some(o) = self.engine.outputs(n) else {
                    continue;
                };
                let get = |k: &str| {
                    o.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                let repo = self.ctx.repo.clone().unwrap_or_default();
                self.state
                    .mark_verified(&Verified {
                        repo: crate::redact::redact(&repo),
                        point: get("point"),
                        source: get("source"),
                        point_time: get("point_time"),
                        run_id: self.run.id.clone(),
                        at_ms: at,
                    })
                    .await?;
            }
        }
        let run = self.state.run(&self.run.id).await?.unwrap_or(self.run);
        Ok((run, status))
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// How long a run's lease lasts without renewal.
pub const LEASE_MS: i64 = 15_000;
