//! Engine overhead (`cargo bench -p ferry-engine`): planning a 1,000-step
//! runbook (parse, validate, expand, DAG, waves) and the engine's own cost per
//! step when driving it with no-op actions (decide + apply, no IO).
//! Targets: planning under 100 ms; scheduling under 1 ms per step (the
//! executor's share with SQLite is measured by bench/engine.sh).

#![allow(clippy::unwrap_used)]

use ferry_engine::{Action, Engine, Event, Mode};
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
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
