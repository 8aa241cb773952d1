use super::*;
use crate::runbook::ErrorClass;
use proptest::prelude::*;

fn engine(yaml: &str, mode: Mode) -> Engine {
    let rb = crate::parse("t.yaml", yaml).unwrap_or_else(|d| panic!("{d}"));
    let plan = crate::plan(rb, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut run = Map::new();
    run.insert("id".into(), Value::String("r1".into()));
    Engine::new(Arc::new(plan), mode, run)
}

/// Drives the engine like the executor does, with `outcome` deciding each
/// try: `Ok(outputs)` or `Err(class)`. Returns the log.
fn drive(
    e: &mut Engine,
    mut outcome: impl FnMut(&str, u32) -> Result<Map<String, Value>, ErrorClass>,
) -> Vec<Event> {
    let mut log = Vec::new();
    let push = |e: &mut Engine, ev: Event, log: &mut Vec<Event>| {
        e.apply(&ev).unwrap_or_else(|r| panic!("{r}"));
        log.push(ev);
    };
    for _ in 0..10_000 {
        let actions = e.decide();
        if actions.is_empty() {
            break;
        }
        let mut started = Vec::new();
        for a in actions {
            match a {
                Action::Start {
                    node,
                    attempt,
                    delay_ms,
                } => {
                    let step = e.plan().nodes[node].id.clone();
                    let key = e.key(node);
                    push(
                        e,
                        Event::StepStarted {
                            step: step.clone(),
                            attempt,
                            delay_ms,
                            key,
                        },
                        &mut log,
                    );
                    started.push((step, attempt));
                }
                Action::Skip { node, reason } => {
                    let step = e.plan().nodes[node].id.clone();
                    push(e, Event::StepSkipped { step, reason }, &mut log);
                }
                Action::Fail { node, error } => {
                    let step = e.plan().nodes[node].id.clone();
                    push(
                        e,
                        Event::StepFailed {
                            step,
                            attempt: 0,
                            error,
                            class: ErrorClass::Permanent,
                        },
                        &mut log,
                    );
                }
                Action::RequestApproval { node } => {
                    let step = e.plan().nodes[node].id.clone();
                    push(e, Event::ApprovalRequested { step }, &mut log);
                }
                Action::Undo { node } => {
                    let step = e.plan().nodes[node].id.clone();
                    push(e, Event::UndoStarted { step: step.clone() }, &mut log);
                    push(e, Event::UndoSucceeded { step }, &mut log);
                }
                Action::Finish { status } => push(e, Event::RunFinished { status }, &mut log),
            }
        }
        for (step, attempt) in started {
            let ev = match outcome(&step, attempt) {
                Ok(outputs) => Event::StepSucceeded { step, outputs },
                Err(class) => Event::StepFailed {
                    step,
                    attempt,
                    error: "boom".into(),
                    class,
                },
            };
            push(e, ev, &mut log);
        }
    }
    log
}

const STACK: &str = r#"
name: stack
params:
  db: { type: boolean, default: true }
targets:
  local: { type: local, parallelism: 2 }
steps:
  - id: web-disk
    uses: volume.create
    with: { size: 1M }
  - id: db-disk
    uses: volume.create
    with: { size: 1M }
  - id: extra-disk
    uses: volume.create
    with: { size: 1M }
  - id: web
    uses: instance.launch
    needs: [web-disk]
    with: { kernel: k, disks: ["${{ steps.web-disk.outputs.path }}"] }
  - id: db
    uses: instance.launch
    if: ${{ params.db }}
    needs: [db-disk]
    with: { kernel: k }
  - id: check
    uses: check.tcp
    needs: [web, db]
    with: { address: "${{ steps.web.outputs.addr }}" }
"#;

fn ok(step: &str, _: u32) -> Result<Map<String, Value>, ErrorClass> {
    let mut m = Map::new();
    m.insert("path".into(), Value::String(format!("/x/{step}")));
    m.insert("addr".into(), Value::String("127.0.0.1:1".into()));
    Ok(m)
}

fn starts(log: &[Event]) -> Vec<&str> {
    log.iter()
        .filter_map(|e| {
            if let Event::StepStarted { step, .. } = e {
                Some(step.as_str())
            } else {
                None
            }
        })
        .collect()
}

fn undos(log: &[Event]) -> Vec<&str> {
    log.iter()
        .filter_map(|e| {
            if let Event::UndoStarted { step } = e {
                Some(step.as_str())
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn runs_in_dependency_order_within_the_parallelism_limit_and_keeps_resources() {
    let mut e = engine(STACK, Mode::Run);
    let first = e.decide();
    assert_eq!(
        first
            .iter()
            .filter(|a| matches!(a, Action::Start { .. }))
            .count(),
        2,
        "{first:?}"
    );
    let log = drive(&mut e, ok);
    assert_eq!(
        starts(&log),
        ["web-disk", "db-disk", "extra-disk", "web", "db", "check"]
    );
    assert!(undos(&log).is_empty());
    assert_eq!(e.phase(), Phase::Finished(RunStatus::Succeeded));
    assert_eq!(
        e.inputs(e.node("web").unwrap_or(0))
            .ok()
            .and_then(|m| m.get("disks").cloned()),
        Some(serde_json::json!(["/x/web-disk"]))
    );
}

#[test]
fn a_drill_tears_down_in_reverse_dependency_order() {
    let mut e = engine(STACK, Mode::Drill);
    let log = drive(&mut e, ok);
    let u = undos(&log);
    assert_eq!(u.len(), 5, "{u:?}");
    let pos = |s: &str| u.iter().position(|x| *x == s).unwrap_or(usize::MAX);
    assert!(
        pos("web") < pos("web-disk") && pos("db") < pos("db-disk"),
        "{u:?}"
    );
    assert_eq!(e.phase(), Phase::Finished(RunStatus::Succeeded));
}

#[test]
fn transient_failures_retry_with_backoff_and_permanent_ones_roll_back() {
    let yaml = r#"
name: r
steps:
  - id: disk
    uses: volume.create
    with: { size: 1M }
  - id: flaky
    uses: check.tcp
    needs: disk
    retry: { attempts: 4, backoff: 1s, max_backoff: 3s }
    with: { address: x }
  - id: broken
    uses: volume.create
    needs: flaky
    retry: 3
    with: { size: 1M }
  - id: never
    uses: noop
    needs: broken
"#;
    let mut e = engine(yaml, Mode::Run);
    let log = drive(&mut e, |step, attempt| match step {
        "flaky" if attempt < 4 => Err(ErrorClass::Transient),
        "broken" => Err(ErrorClass::Permanent),
        s => ok(s, attempt),
    });
    let delays: Vec<u64> = log
        .iter()
        .filter_map(|e| match e {
            Event::StepStarted { step, delay_ms, .. } if step == "flaky" => Some(*delay_ms),
            _ => None,
        })
        .collect();
    // Exponential (1 s, 2 s, then capped at 3 s), each with equal jitter:
    // between half the ceiling and all of it.
    assert_eq!(delays.len(), 4);
    assert_eq!(delays[0], 0);
    for (d, ceiling) in delays[1..].iter().zip([1000, 2000, 3000]) {
        assert!(
            (ceiling / 2..=ceiling).contains(d),
            "delay {d} ms outside {}..={ceiling}",
            ceiling / 2
        );
    }
    assert_eq!(
        starts(&log).iter().filter(|s| **s == "broken").count(),
        1,
        "permanent errors are not retried"
    );
    assert!(!starts(&log).contains(&"never"));
    // broken tried and failed: its undo runs (it may have created something), then disk's.
    assert_eq!(undos(&log), ["broken", "disk"]);
    assert_eq!(e.phase(), Phase::Finished(RunStatus::Failed));
}

#[test]
fn skipped_steps_skip_their_dependents_and_stop_leaves_resources() {
    let yaml = STACK
        .replace("default: true", "default: false")
        .replace("name: stack", "name: stack\non_failure: stop");
    let mut e = engine(&yaml, Mode::Run);
    let log = drive(&mut e, ok);
    assert!(!starts(&log).contains(&"db") && !starts(&log).contains(&"check"));
    assert!(
        matches!(e.state(e.node("check").unwrap_or(0)), StepState::Skipped { reason } if reason.contains("`db`"))
    );
    assert_eq!(e.phase(), Phase::Finished(RunStatus::Succeeded));

    let mut e = engine(&yaml, Mode::Run);
    let log = drive(&mut e, |s, a| {
        if s == "web" {
            Err(ErrorClass::Permanent)
        } else {
            ok(s, a)
        }
    });
    assert!(undos(&log).is_empty(), "on_failure: stop leaves everything");
    assert_eq!(e.phase(), Phase::Finished(RunStatus::Failed));
    // An operator rolls it back later.
    e.apply(&Event::RollbackRequested { by: "op".into() })
        .unwrap_or_default();
    let log = drive(&mut e, ok);
    assert_eq!(undos(&log).len(), 4, "{log:?}");
    assert_eq!(e.phase(), Phase::Finished(RunStatus::RolledBack));
}

#[test]
fn approval_gates_wait_and_cancel_stops_new_work() {
    let yaml = r#"
name: gate
steps:
  - id: disk
    uses: volume.create
    with: { size: 1M }
  - id: go
    uses: approval
    needs: disk
  - id: after
    uses: noop
    needs: go
"#;
    let mut e = engine(yaml, Mode::Run);
    let log = drive(&mut e, ok);
    assert_eq!(starts(&log), ["disk"]);
    assert_eq!(e.state(1), &StepState::Waiting);
    assert!(e.decide().is_empty(), "nothing to do until approved");
    e.apply(&Event::Approved {
        step: "go".into(),
        by: "alice".into(),
    })
    .unwrap_or_default();
    let log = drive(&mut e, ok);
    assert_eq!(starts(&log), ["after"]);
    assert_eq!(e.phase(), Phase::Finished(RunStatus::Succeeded));

    let mut e = engine(yaml, Mode::Drill);
    drive(&mut e, ok);
    e.apply(&Event::CancelRequested { by: "bob".into() })
        .unwrap_or_default();
    let log = drive(&mut e, ok);
    assert_eq!(undos(&log), ["disk"], "a cancelled drill still tears down");
    assert_eq!(e.phase(), Phase::Finished(RunStatus::Cancelled));
}

#[test]
fn for_each_expands_and_outputs_collect_as_lists() {
    let yaml = r#"
name: fan
params:
  disks: { type: list, default: [a, b, c] }
steps:
  - id: disk
    uses: volume.create
    for_each: ${{ params.disks }}
    with: { size: "${{ each.value }}" }
  - id: all
    uses: noop
    needs: disk
    with: { outputs: { paths: "${{ steps.disk.outputs.path }}" } }
"#;
    let mut e = engine(yaml, Mode::Run);
    assert_eq!(e.plan().waves.len(), 2);
    assert_eq!(e.plan().waves[0].len(), 3);
    drive(&mut e, ok);
    let all = e.node("all").unwrap_or(0);
    assert_eq!(
        e.inputs(all).ok().and_then(|m| m.get("outputs").cloned()),
        Some(serde_json::json!({"paths": ["/x/disk[0]", "/x/disk[1]", "/x/disk[2]"]}))
    );
    assert_eq!(
        e.inputs(e.node("disk[1]").unwrap_or(0))
            .ok()
            .and_then(|m| m.get("size").cloned()),
        Some(serde_json::json!("b"))
    );
}

#[test]
fn out_of_place_events_are_rejected() {
    let mut e = engine(STACK, Mode::Run);
    assert!(
        e.apply(&Event::StepSucceeded {
            step: "web".into(),
            outputs: Map::new()
        })
        .is_err()
    );
    assert!(
        e.apply(&Event::StepStarted {
            step: "nope".into(),
            attempt: 1,
            delay_ms: 0,
            key: String::new()
        })
        .is_err()
    );
    assert!(
        e.apply(&Event::UndoSucceeded { step: "web".into() })
            .is_err()
    );
}

proptest! {
    /// Replaying any log on a fresh engine gives the same state, and every
    /// run ends with everything it created undone unless it succeeded as a run.
    #[test]
    fn replay_rebuilds_the_same_state(fails in proptest::collection::vec(0u8..4, 12), drill in any::<bool>()) {
        let mode = if drill { Mode::Drill } else { Mode::Run };
        let mut e = engine(STACK, mode);
        let mut n = 0;
        let log = drive(&mut e, |s, a| {
            n += 1;
            match fails[n % fails.len()] {
                0 => Err(ErrorClass::Transient),
                1 if n % 5 == 0 => Err(ErrorClass::Permanent),
                _ => ok(s, a),
            }
        });
        let mut again = engine(STACK, mode);
        for ev in &log {
            again.apply(ev).unwrap_or_else(|r| panic!("{r}"));
        }
        prop_assert_eq!(again.phase(), e.phase());
        prop_assert!(matches!(e.phase(), Phase::Finished(_)));
        for i in 0..e.plan().nodes.len() {
            prop_assert_eq!(again.state(i), e.state(i));
            prop_assert_eq!(again.undo_state(i), e.undo_state(i));
        }
        if drill || e.phase() != Phase::Finished(RunStatus::Succeeded) {
            for i in 0..e.plan().nodes.len() {
                prop_assert!(!e.needs_undo(i), "{} left behind", e.plan().nodes[i].id);
            }
        }
        let json = serde_json::to_string(&log).unwrap_or_default();
        let back: Vec<Event> = serde_json::from_str(&json).unwrap_or_default();
        prop_assert_eq!(back, log);
    }
}

#[test]
fn a_cancel_during_rollback_still_finishes_the_rollback_and_failed_undos_fail_the_run() {
    let mut e = engine(STACK, Mode::Drill);
    // Everything up, then the teardown starts one undo...
    drive(&mut e, ok);
    let mut e = engine(STACK, Mode::Drill);
    let log = drive(&mut e, ok);
    let cut = log
        .iter()
        .position(|ev| matches!(ev, Event::UndoStarted { .. }))
        .unwrap_or(0);
    let mut e2 = engine(STACK, Mode::Drill);
    for ev in &log[..=cut] {
        e2.apply(ev).unwrap_or_else(|r| panic!("{r}"));
    }
    // ...and a cancel arrives while it runs: no finish until every undo ran.
    e2.apply(&Event::CancelRequested { by: "op".into() })
        .unwrap_or_default();
    assert!(
        !e2.decide()
            .iter()
            .any(|a| matches!(a, Action::Finish { .. }))
    );
    let Event::UndoStarted { step } = &log[cut] else {
        panic!()
    };
    e2.apply(&Event::UndoFailed {
        step: step.clone(),
        error: "busy".into(),
    })
    .unwrap_or_default();
    let rest = drive(&mut e2, ok);
    assert_eq!(undos(&rest).len(), 4, "{rest:?}");
    assert_eq!(
        e2.phase(),
        Phase::Finished(RunStatus::Failed),
        "a failed undo is never a success"
    );
    // A rollback request retries the failed undo.
    e2.apply(&Event::RollbackRequested { by: "op".into() })
        .unwrap_or_default();
    let again = drive(&mut e2, ok);
    assert_eq!(undos(&again), [step.as_str()]);
    assert_eq!(e2.phase(), Phase::Finished(RunStatus::RolledBack));
}

#[test]
fn a_final_failure_ends_waiting_retries_and_unevaluable_conditions_are_not_retried() {
    let yaml = r#"
name: r
steps:
  - id: a
    uses: volume.create
    retry: { attempts: 5, backoff: 1s }
    with: { size: 1M }
  - id: b
    uses: noop
  - id: c
    uses: noop
    if: ${{ steps.b.outputs.nope == 1 }}
    needs: b
    retry: { attempts: 3, on: any }
"#;
    let mut e = engine(yaml, Mode::Run);
    let log = drive(&mut e, |s, a| match s {
        "a" if a == 1 => Err(ErrorClass::Transient),
        "b" => Err(ErrorClass::Permanent),
        s => ok(s, a),
    });
    assert!(
        matches!(e.state(0), StepState::Failed { .. }),
        "{:?}",
        e.state(0)
    );
    assert_eq!(undos(&log), ["a"], "the earlier try of a is undone too");

    let mut e = engine(yaml, Mode::Run);
    drive(&mut e, ok);
    assert!(
        matches!(e.state(2), StepState::Failed { error, .. } if error.contains("`if:")),
        "{:?}",
        e.state(2)
    );
}

#[test]
fn steps_failing_together_retry_at_spread_out_instants() {
    // 50 items of one for_each fail at once against one flaky endpoint:
    // their retries must not all hit it again in the same instant.
    let keys: Vec<String> = (0..50).map(|i| format!("r1/call[{i}]")).collect();
    let delays: Vec<u64> = keys.iter().map(|k| jittered(4000, k, 2)).collect();
    assert!(
        delays.iter().all(|d| (2000..=4000).contains(d)),
        "{delays:?}"
    );
    let mut distinct = delays.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() >= 40,
        "only {} distinct delays",
        distinct.len()
    );
    let spread = distinct.last().unwrap() - distinct.first().unwrap();
    assert!(spread >= 1000, "delays within {spread} ms of each other");
    // Replaying a log gives the same delay for the same step and try.
    assert_eq!(jittered(4000, &keys[7], 2), delays[7]);
    assert_eq!(jittered(0, &keys[7], 2), 0);
}
