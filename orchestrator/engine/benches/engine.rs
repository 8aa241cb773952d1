//! Engine overhead (`cargo bench -p ferry-engine`): planning a 1,000-step
//! runbook (parse, validate, expand, DAG, waves) and the engine's own cost per
//! step when driving it with no-op actions (decide + apply, no IO).
//! Targets: planning under 100 ms; scheduling under 1 ms per step (the
//! executor's share with SQLite is measured by bench/engine.sh).
//! Hostile runbooks (issue 13), with the engine's limits lifted so the
//! algorithms themselves are measured: 1 MB runbooks and two 6,000-item
//! `for_each` steps validate and plan in under 2 s and 200 MB.

#![allow(clippy::unwrap_used)]

use ferry_engine::{Action, Engine, Event, Limits, Mode};
use std::sync::Arc;
use std::time::Instant;

/// 1,000 steps: 10 lanes of 100 chained steps each, reading an output of the
/// step before, fanning into one final step.
fn runbook(steps: usize) -> String {
    let lanes = 10;
    let per = steps / lanes;
    let mut s = String::from(
        "name: big\nparams:\n  tag: { type: string, default: x }\ntargets:\n  local: { type: local, parallelism: 16 }\nsteps:\n",
    );
    for l in 0..lanes {
        for i in 0..per {
            s.push_str(&format!("  - id: s{l}-{i}\n    uses: noop\n"));
            if i > 0 {
                s.push_str(&format!(
                    "    needs: s{l}-{}\n    with: {{ outputs: {{ v: \"${{{{ steps.s{l}-{}.outputs.v }}}}-${{{{ params.tag }}}}\" }} }}\n",
                    i - 1,
                    i - 1
                ));
            } else {
                s.push_str("    with: { outputs: { v: \"0\" } }\n");
            }
        }
    }
    s
}

const UNLIMITED: Limits = Limits {
    max_bytes: usize::MAX,
    max_depth: 64,
    max_steps: usize::MAX,
    max_for_each_items: usize::MAX,
    max_dependencies: usize::MAX,
    max_diagnostics: 100,
};

/// 1 MB: each step needs the one before; with `reads`, it also reads an
/// output of the step two before (upstream through another step).
fn chain(bytes: usize, reads: bool) -> String {
    let mut s = String::from("name: chain\nsteps:\n  - id: s0\n    uses: noop\n");
    let mut i: usize = 1;
    while s.len() < bytes {
        if reads {
            s.push_str(&format!(
                "  - id: s{i}\n    uses: noop\n    needs: s{}\n    with: {{ outputs: {{ v: \"${{{{ steps.s{}.outputs.v }}}}\" }} }}\n",
                i - 1,
                i.saturating_sub(2)
            ));
        } else {
            s.push_str(&format!(
                "  - {{id: s{i}, uses: noop, needs: s{}}}\n",
                i - 1
            ));
        }
        i += 1;
    }
    s
}

/// 1 MB of steps that each need a step that does not exist.
fn unknown_needs(bytes: usize) -> String {
    let mut s = String::from("name: unknown\nsteps:\n");
    let mut i = 0;
    while s.len() < bytes {
        s.push_str(&format!(
            "  - id: step-{i:06}\n    uses: noop\n    needs: stpe-{i:06}\n"
        ));
        i += 1;
    }
    s
}

fn for_each_pair(items: usize) -> String {
    let list: Vec<String> = (0..items).map(|i| i.to_string()).collect();
    format!(
        "name: fan\nsteps:\n  - id: a\n    uses: noop\n    for_each: [{l}]\n  - id: b\n    uses: noop\n    needs: a\n    for_each: [{l}]\n",
        l = list.join(", ")
    )
}

/// Peak resident memory in MB since the last reset (Linux; 0 elsewhere).
fn peak_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn hostile(name: &str, text: &str) {
    // Resets the peak to the current resident size (Linux 4.0+).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = peak_mb();
    let t = Instant::now();
    let outcome = match ferry_engine::parse_with("hostile.yaml", text, &UNLIMITED) {
        Ok(rb) => match ferry_engine::plan::plan_with(rb, &Default::default(), &UNLIMITED) {
            Ok(p) => {
                let e = Engine::new(Arc::new(p), Mode::Run, serde_json::Map::new());
                format!(
                    "planned, {} nodes, {} first actions",
                    e.plan().nodes.len(),
                    e.decide().len()
                )
            }
            Err(e) => format!("plan refused: {e}"),
        },
        Err(d) => format!("{} diagnostics", d.0.len()),
    };
    println!(
        "{name} ({:.2} MB): validate + plan {:.0} ms, peak memory +{:.0} MB ({outcome}), target < 2000 ms and 200 MB",
        text.len() as f64 / 1e6,
        t.elapsed().as_secs_f64() * 1000.0,
        peak_mb() - before
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    hostile("needs chain", &chain(1 << 20, false));
    hostile("needs chain reading outputs", &chain(1 << 20, true));
    hostile("unknown needs", &unknown_needs(1 << 20));
    hostile("6,000 x 6,000 for_each", &for_each_pair(6_000));

    let text = runbook(1000);
    let mut plan_ms = Vec::new();
    let mut plan = None;
    for _ in 0..15 {
        let t = Instant::now();
        let rb = ferry_engine::parse("big.yaml", &text).unwrap();
        let p = ferry_engine::plan(rb, &Default::default()).unwrap();
        plan_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        plan = Some(p);
    }
    let plan = Arc::new(plan.unwrap());
    println!(
        "plan 1000 steps: median {:.1} ms (min {:.1}), target < 100 ms",
        median(plan_ms.clone()),
        plan_ms.iter().copied().fold(f64::MAX, f64::min)
    );

    let mut per_step = Vec::new();
    for _ in 0..5 {
        let mut e = Engine::new(plan.clone(), Mode::Run, serde_json::Map::new());
        let t = Instant::now();
        let mut steps = 0;
        loop {
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
                        // The executor renders the inputs when it starts the step.
                        let outputs = e.inputs(node).unwrap();
                        e.apply(&Event::StepStarted {
                            step: step.clone(),
                            attempt,
                            delay_ms,
                            key: e.key(node),
                        })
                        .unwrap();
                        started.push((step, outputs));
                    }
                    Action::Finish { status } => e.apply(&Event::RunFinished { status }).unwrap(),
                    other => panic!("{other:?}"),
                }
            }
            for (step, inputs) in started {
                let outputs = inputs
                    .get("outputs")
                    .and_then(|o| o.as_object())
                    .cloned()
                    .unwrap_or_default();
                e.apply(&Event::StepSucceeded { step, outputs }).unwrap();
                steps += 1;
            }
        }
        assert_eq!(steps, 1000);
        per_step.push(t.elapsed().as_secs_f64() * 1000.0 / steps as f64);
    }
    println!(
        "engine per step (decide + apply + render inputs, no IO): median {:.4} ms, target < 1 ms",
        median(per_step)
    );
}
