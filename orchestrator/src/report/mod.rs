//! Run reports: the timeline of every step, RPO of each recovery point used,
//! RTO achieved against the runbook's objectives; as JSON, a self-contained
//! HTML page, or JUnit XML.

use crate::state::{RunRow, Stored};
use ferry_engine::{Engine, Event};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;

pub mod text;
pub use text::text;

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct StepReport {
    pub id: String,
    pub uses: String,
    pub check: bool,
    /// succeeded, failed, skipped, cancelled, waiting, running or pending.
    pub status: String,
    pub attempts: u32,
    /// Seconds from the start of the run.
    pub start_secs: Option<f64>,
    pub end_secs: Option<f64>,
    /// Time its last try ran (without backoff).
    pub duration_secs: Option<f64>,
    pub error: Option<String>,
    pub critical: bool,
    /// undone, undo_failed, or absent.
    pub undo: Option<String>,
    /// What the step returned (secrets already replaced by `***`): the
    /// instance's addresses, the volume's path, the point it made.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub outputs: Option<serde_json::Map<String, Value>>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PointReport {
    pub step: String,
    pub point: String,
    pub source: String,
    pub point_time: String,
    /// Age of the point when the run started.
    pub rpo_secs: f64,
    pub objective_secs: Option<f64>,
    pub met: Option<bool>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CriticalStep {
    pub id: String,
    /// From the end of what it waited for (or the run's start) to its start: scheduling and backoff.
    pub wait_secs: f64,
    pub duration_secs: f64,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Report {
    pub run: String,
    pub runbook: String,
    pub file: String,
    pub mode: String,
    pub status: String,
    pub git_commit: Option<String>,
    pub params: BTreeMap<String, String>,
    pub started: String,
    pub finished: Option<String>,
    /// From the start of the run to the end of its last step before teardown
    /// (every check passed); absent if the run did not get there.
    pub rto_secs: Option<f64>,
    pub rto_objective_secs: Option<f64>,
    pub rto_met: Option<bool>,
    /// The outage the runbook's `downtime:` names: from the first start of
    /// its `from` steps to the last end of its `to` steps; absent until every
    /// `to` step has passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_objective_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_met: Option<bool>,
    pub points: Vec<PointReport>,
    pub steps: Vec<StepReport>,
    /// The chain of steps that set the RTO: the sum of their waits and
    /// durations is the RTO.
    pub critical_path: Vec<CriticalStep>,
    pub teardown_secs: Option<f64>,
    /// What a rollback or teardown could not remove.
    pub left_behind: Vec<String>,
    pub checks_passed: usize,
    pub checks_failed: usize,
    /// What planning predicted when the run was created, against what it
    /// measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast: Option<crate::forecast::Measured>,
    /// The sequence number of the newest event of the run's log this report
    /// was built from (-1 for none): a client following
    /// `/api/runs/{id}/stream` applies only the events after it.
    pub last_seq: i64,
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

pub fn build(run: &RunRow, log: &[Stored], engine: &Engine) -> Report {
    let plan = engine.plan();
    let t0 = run.created_ms;
    let secs = |ms: i64| (ms - t0) as f64 / 1000.0;
    let n = plan.nodes.len();
    let mut start = vec![None::<i64>; n];
    let mut end = vec![None::<i64>; n];
    let mut undo_start = None::<i64>;
    let mut undo_end = None::<i64>;
    for s in log {
        let node = |id: &str| engine.node(id);
        match &s.event {
            Event::StepStarted { step, delay_ms, .. } => {
                if let Some(i) = node(step) {
                    start[i] = Some(s.at_ms + *delay_ms as i64);
                }
            }
            Event::StepSucceeded { step, .. }
            | Event::StepFailed { step, .. }
            | Event::Approved { step, .. } => {
                if let Some(i) = node(step) {
                    end[i] = Some(s.at_ms);
                }
            }
            Event::ApprovalRequested { step } => {
                if let Some(i) = node(step) {
                    start[i] = Some(s.at_ms);
                }
            }
            Event::UndoStarted { .. } => {
                undo_start.get_or_insert(s.at_ms);
            }
            Event::UndoSucceeded { .. } | Event::UndoFailed { .. } => undo_end = Some(s.at_ms),
            _ => {}
        }
    }
    let mut steps = Vec::new();
    let mut left_behind = Vec::new();
    let finished = matches!(engine.phase(), ferry_engine::machine::Phase::Finished(_));
    let (mut passed, mut failed) = (0, 0);
    for i in 0..n {
        let step = plan.step_of(i);
        let (status, error, attempts) = match engine.state(i) {
            ferry_engine::StepState::Pending => ("pending", None, 0),
            ferry_engine::StepState::Running { attempt } => ("running", None, *attempt),
            ferry_engine::StepState::RetryWait { attempt, .. } => ("retrying", None, *attempt),
            ferry_engine::StepState::Waiting => ("waiting", None, 0),
            ferry_engine::StepState::Succeeded => ("succeeded", None, 1),
            ferry_engine::StepState::Failed { error, class } => (
                if *class == ferry_engine::runbook::ErrorClass::Cancelled {
                    "cancelled"
                } else {
                    "failed"
                },
                Some(error.clone()),
                1,
            ),
            ferry_engine::StepState::Skipped { reason } => ("skipped", Some(reason.clone()), 0),
        };
        let attempts = log
            .iter()
            .filter_map(|s| match &s.event {
                Event::StepStarted {
                    step: id, attempt, ..
                } if *id == plan.nodes[i].id => Some(*attempt),
                _ => None,
            })
            .max()
            .unwrap_or(attempts.min(u32::from(start[i].is_some())));
        let check = step.action().check;
        if check {
            match status {
                "succeeded" => passed += 1,
                "failed" => failed += 1,
                _ => {}
            }
        }
        let undo = match engine.undo_state(i) {
            ferry_engine::machine::UndoState::Done => Some("undone".to_owned()),
            ferry_engine::machine::UndoState::Failed => {
                left_behind.push(plan.nodes[i].id.clone());
                Some("undo_failed".to_owned())
            }
            ferry_engine::machine::UndoState::Running => {
                if finished {
                    left_behind.push(plan.nodes[i].id.clone());
                }
                Some("undoing".to_owned())
            }
            ferry_engine::machine::UndoState::NotStarted => {
                // Finished with something to undo that a drill or a rollback should have removed.
                let should = run.mode == "drill" || run.status == "rolled_back";
                if finished && should && engine.needs_undo(i) {
                    left_behind.push(plan.nodes[i].id.clone());
                }
                None
            }
        };
        steps.push(StepReport {
            id: plan.nodes[i].id.clone(),
            uses: step.uses.clone(),
            check,
            status: status.to_owned(),
            attempts,
            start_secs: start[i].map(secs),
            end_secs: end[i].map(secs),
            duration_secs: match (start[i], end[i]) {
                (Some(s), Some(e)) => Some((e - s).max(0) as f64 / 1000.0),
                _ => None,
            },
            error,
            critical: false,
            undo,
            outputs: engine.outputs(i).cloned(),
        });
    }
    // RTO: every step succeeded or was skipped; it ends with the last step's end.
    let all_ok = (0..n).all(|i| {
        matches!(
            engine.state(i),
            ferry_engine::StepState::Succeeded | ferry_engine::StepState::Skipped { .. }
        )
    });
    let last = (0..n).filter(|&i| end[i].is_some()).max_by_key(|&i| end[i]);
    let rto_ms = if all_ok {
        last.and_then(|i| end[i]).map(|e| e - t0)
    } else {
        None
    };
    // Critical path: back from the last step, through the dependency that ended last.
    let mut critical = Vec::new();
    if rto_ms.is_some() {
        let mut cur = last;
        while let Some(i) = cur {
            let prev = plan
                .deps(i)
                .filter(|&d| end[d].is_some())
                .max_by_key(|&d| end[d]);
            let from = prev.and_then(|d| end[d]).unwrap_or(t0);
            let (s, e) = (start[i].unwrap_or(from), end[i].unwrap_or(from));
            critical.push(CriticalStep {
                id: plan.nodes[i].id.clone(),
                wait_secs: (s - from) as f64 / 1000.0,
                duration_secs: (e - s) as f64 / 1000.0,
            });
            steps[i].critical = true;
            cur = prev;
        }
        critical.reverse();
    }
    let objectives = &plan.runbook.objectives;
    let points = (0..n)
        .filter(|&i| plan.step_of(i).uses == "volume.restore")
        .filter_map(|i| {
            let o = engine.outputs(i)?;
            let get = |k: &str| {
                o.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let rpo = o.get("rpo_secs").and_then(Value::as_f64).unwrap_or(0.0);
            Some(PointReport {
                step: plan.nodes[i].id.clone(),
                point: get("point"),
                source: get("source"),
                point_time: get("point_time"),
                rpo_secs: rpo,
                objective_secs: objectives.rpo_secs,
                met: objectives.rpo_secs.map(|o| rpo <= o),
            })
        })
        .collect();
    let rto_secs = rto_ms.map(|m| m as f64 / 1000.0);
    let downtime_secs = plan.runbook.downtime.as_ref().and_then(|d| {
        let of = |ids: &[String]| {
            (0..n)
                .filter(|&i| ids.contains(&plan.step_of(i).id))
                .collect::<Vec<_>>()
        };
        let down = of(&d.from).into_iter().filter_map(|i| start[i]).min()?;
        let to = of(&d.to);
        let back = to
            .iter()
            .all(|&i| matches!(engine.state(i), ferry_engine::StepState::Succeeded))
            .then(|| to.iter().filter_map(|&i| end[i]).max())??;
        Some((back - down).max(0) as f64 / 1000.0)
    });
    Report {
        downtime_secs,
        downtime_objective_secs: objectives.downtime_secs,
        downtime_met: match (downtime_secs, objectives.downtime_secs) {
            (Some(d), Some(o)) => Some(d <= o),
            (None, Some(_)) if finished => Some(false),
            _ => None,
        },
        run: run.id.clone(),
        runbook: run.runbook.clone(),
        file: run.file.clone(),
        mode: run.mode.clone(),
        status: run.status.clone(),
        git_commit: run.git_commit.clone(),
        params: run.params.clone(),
        started: iso(t0),
        finished: run.finished_ms.map(iso),
        rto_secs,
        rto_objective_secs: objectives.rto_secs,
        rto_met: match (rto_secs, objectives.rto_secs) {
            (Some(r), Some(o)) => Some(r <= o),
            (None, Some(_)) => Some(false),
            _ => None,
        },
        points,
        steps,
        critical_path: critical,
        teardown_secs: match (undo_start, undo_end) {
            (Some(s), Some(e)) => Some((e - s) as f64 / 1000.0),
            _ => None,
        },
        left_behind,
        checks_passed: passed,
        checks_failed: failed,
        forecast: None,
        last_seq: log.last().map_or(-1, |s| s.seq),
    }
}

fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

fn fmt_secs(s: Option<f64>) -> String {
    s.map_or("–".into(), |s| format!("{s:.2} s"))
}

/// A self-contained HTML page: summary, objectives, the timeline drawn as SVG.
pub fn html(r: &Report) -> String {
    let mut h = String::new();
    let verdict = |m: Option<bool>| match m {
        Some(true) => "<b class=ok>met</b>",
        Some(false) => "<b class=bad>missed</b>",
        None => "no objective",
    };
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=utf-8><title>Ferry {mode} {run}</title><style>\
body{{font:14px system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}td,th{{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}}\
.ok{{color:#17803d}}.bad{{color:#b42318}}.muted{{color:#777}}svg text{{font:12px system-ui,sans-serif}}</style></head><body>\
<h1>{mode_t} of <code>{rb}</code>: <span class={cls}>{status}</span></h1>\
<p>Run <code>{run}</code> started {started}{commit}.</p>\
<table><tr><th>RTO</th><td>{rto}</td><td>objective {rto_o}</td><td>{rto_v}</td></tr>",
        mode = esc(&r.mode),
        mode_t = if r.mode == "drill" { "Drill" } else { "Run" },
        run = esc(&r.run),
        rb = esc(&r.runbook),
        cls = if r.status == "succeeded" { "ok" } else { "bad" },
        status = esc(&r.status),
        started = esc(&r.started),
        commit = r
            .git_commit
            .as_deref()
            .map(|c| format!(", runbook at git commit <code>{}</code>", esc(c)))
            .unwrap_or_default(),
        rto = fmt_secs(r.rto_secs),
        rto_o = fmt_secs(r.rto_objective_secs),
        rto_v = verdict(r.rto_met),
    );
    if r.downtime_secs.is_some() || r.downtime_objective_secs.is_some() {
        let _ = write!(
            h,
            "<tr><th>Downtime</th><td>{}</td><td>objective {}</td><td>{}</td><td class=muted>from the service stopped to the service proven back</td></tr>",
            fmt_secs(r.downtime_secs),
            fmt_secs(r.downtime_objective_secs),
            verdict(r.downtime_met)
        );
    }
    for p in &r.points {
        let _ = write!(
            h,
            "<tr><th>RPO</th><td>{} s</td><td>objective {}</td><td>{}</td><td>point <code>{}</code> of {} at {}</td></tr>",
            format_args!("{:.1}", p.rpo_secs),
            fmt_secs(p.objective_secs),
            verdict(p.met),
            esc(&p.point[..p.point.len().min(12)]),
            esc(&p.source),
            esc(&p.point_time)
        );
    }
    if let Some(f) = &r.forecast {
        let _ = write!(
            h,
            "<tr><th>Forecast</th><td>RTO {} predicted</td><td>drill cost {:.4} {} predicted, {:.4} measured</td><td class=muted>prices of {}</td></tr>",
            format_args!("{:.1} s", f.predicted_rto_secs),
            f.predicted_drill_cost,
            esc(&f.currency),
            f.measured_drill_cost,
            esc(&f.prices_date)
        );
    }
    let _ = write!(
        h,
        "</table><p>Checks: {} passed, {} failed. Teardown: {}.",
        r.checks_passed,
        r.checks_failed,
        fmt_secs(r.teardown_secs)
    );
    if !r.left_behind.is_empty() {
        let _ = write!(
            h,
            " <b class=bad>Left behind: {}</b>",
            esc(&r.left_behind.join(", "))
        );
    }
    h.push_str("</p><h2>Timeline</h2>");
    let total = r
        .steps
        .iter()
        .filter_map(|s| s.end_secs)
        .fold(r.rto_secs.unwrap_or(0.0), f64::max)
        .max(0.001);
    let (label_w, width, row) = (220.0, 720.0, 22.0);
    let height = row * r.steps.len() as f64 + 30.0;
    let _ = write!(
        h,
        "<svg width={} height={height} role=img aria-label=timeline>",
        label_w + width + 80.0
    );
    for (i, s) in r.steps.iter().enumerate() {
        let y = 10.0 + row * i as f64;
        let _ = write!(
            h,
            "<text x=0 y={}>{}{}</text>",
            y + 14.0,
            esc(&s.id),
            if s.critical { " ★" } else { "" }
        );
        if let (Some(a), Some(b)) = (s.start_secs, s.end_secs) {
            let x = label_w + a / total * width;
            let w = ((b - a) / total * width).max(1.5);
            let color = match s.status.as_str() {
                "succeeded" if s.check => "#2e90fa",
                "succeeded" => "#12b76a",
                "skipped" => "#98a2b3",
                _ => "#f04438",
            };
            let _ = write!(
                h,
                "<rect x={x:.1} y={y} width={w:.1} height=16 rx=3 fill={color}><title>{} {}: {:.2}–{:.2} s</title></rect><text x={:.1} y={}>{:.2} s</text>",
                esc(&s.id),
                esc(&s.status),
                a,
                b,
                x + w + 4.0,
                y + 13.0,
                b - a
            );
        }
    }
    if let Some(rto) = r.rto_secs {
        let x = label_w + rto / total * width;
        let _ = write!(
            h,
            "<line x1={x:.1} x2={x:.1} y1=0 y2={height} stroke=#b42318 stroke-dasharray=4></line><text x={:.1} y={} fill=#b42318>RTO {rto:.2} s</text>",
            x + 3.0,
            height - 4.0
        );
    }
    h.push_str("</svg><h2>Steps</h2><table><tr><th>step</th><th>action</th><th>status</th><th>tries</th><th>start</th><th>duration</th><th>undo</th><th>detail</th></tr>");
    for s in &r.steps {
        let _ = write!(
            h,
            "<tr><td>{}{}</td><td><code>{}</code></td><td class={}>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=muted>{}</td></tr>",
            esc(&s.id),
            if s.critical { " ★" } else { "" },
            esc(&s.uses),
            if s.status == "succeeded" { "ok" } else { "bad" },
            esc(&s.status),
            s.attempts,
            fmt_secs(s.start_secs),
            fmt_secs(s.duration_secs),
            esc(s.undo.as_deref().unwrap_or("")),
            esc(s.error.as_deref().unwrap_or(""))
        );
    }
    h.push_str("</table><h2>Critical path (★)</h2><table><tr><th>step</th><th>waited</th><th>ran</th></tr>");
    for c in &r.critical_path {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:.3} s</td><td>{:.3} s</td></tr>",
            esc(&c.id),
            c.wait_secs,
            c.duration_secs
        );
    }
    let sum: f64 = r
        .critical_path
        .iter()
        .map(|c| c.wait_secs + c.duration_secs)
        .sum();
    let _ = writeln!(
        h,
        "<tr><th>sum</th><th colspan=2>{sum:.3} s = RTO</th></tr></table></body></html>"
    );
    h
}

/// `s` with the characters XML 1.0 cannot hold at all (control characters
/// other than tab, newline and return) replaced by U+FFFD; quick-xml escapes
/// the rest.
fn xml_text(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => '\u{FFFD}',
            c => c,
        })
        .collect()
}

/// JUnit XML: one test case per step; failed steps are failures, skipped ones skipped.
pub fn junit(r: &Report) -> String {
    use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, Event as X};
    // A step that did not finish (pending, running, waiting) fails its case.
    let bad = |s: &StepReport| !matches!(s.status.as_str(), "succeeded" | "skipped");
    let rto_case = r.rto_objective_secs.is_some();
    let rto_failed = rto_case && r.rto_met != Some(true);
    let down_case = r.downtime_objective_secs.is_some();
    let down_failed = down_case && r.downtime_met != Some(true);
    let failures = r.steps.iter().filter(|s| bad(s)).count()
        + usize::from(rto_failed)
        + usize::from(down_failed);
    let skipped = r.steps.iter().filter(|s| s.status == "skipped").count();
    let time = r
        .rto_secs
        .or_else(|| r.steps.iter().filter_map(|s| s.end_secs).reduce(f64::max))
        .unwrap_or(0.0);
    let mut w = quick_xml::Writer::new_with_indent(Vec::new(), b' ', 2);
    // Writing into a Vec cannot fail; the results are ignored for that reason.
    let _ = w.write_event(X::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)));
    let _ = w.write_event(X::Start(
        BytesStart::new("testsuites").with_attributes([("name", "ferry")]),
    ));
    let suite_name = xml_text(&format!("{} {}", r.mode, r.runbook));
    let started = xml_text(&r.started);
    let _ = w.write_event(X::Start(
        BytesStart::new("testsuite").with_attributes([
            ("name", suite_name.as_str()),
            (
                "tests",
                (r.steps.len() + usize::from(rto_case) + usize::from(down_case))
                    .to_string()
                    .as_str(),
            ),
            ("failures", failures.to_string().as_str()),
            ("skipped", skipped.to_string().as_str()),
            ("time", format!("{time:.3}").as_str()),
            ("timestamp", started.as_str()),
        ]),
    ));
    let classname = xml_text(&r.runbook);
    let mut case = |name: String, secs: f64, outcome: Option<(&str, String)>| {
        let name = xml_text(&name);
        let start = BytesStart::new("testcase").with_attributes([
            ("classname", classname.as_str()),
            ("name", name.as_str()),
            ("time", format!("{secs:.3}").as_str()),
        ]);
        match outcome {
            None => {
                let _ = w.write_event(X::Empty(start));
            }
            Some((tag, message)) => {
                let message = xml_text(&message);
                let _ = w.write_event(X::Start(start));
                let _ = w.write_event(X::Empty(
                    BytesStart::new(tag).with_attributes([("message", message.as_str())]),
                ));
                let _ = w.write_event(X::End(BytesEnd::new("testcase")));
            }
        }
    };
    for s in &r.steps {
        let outcome = match s.status.as_str() {
            "succeeded" => None,
            "skipped" => Some((
                "skipped",
                s.error.clone().unwrap_or_else(|| "skipped".into()),
            )),
            other => Some((
                "failure",
                s.error
                    .clone()
                    .unwrap_or_else(|| format!("the step did not finish ({other})")),
            )),
        };
        case(
            format!("{} ({})", s.id, s.uses),
            s.duration_secs.unwrap_or(0.0),
            outcome,
        );
    }
    if let Some(obj) = r.rto_objective_secs {
        let outcome = match r.rto_secs {
            Some(rto) if rto <= obj => None,
            Some(rto) => Some(("failure", format!("RTO {rto:.1} s exceeds {obj:.1} s"))),
            None => Some(("failure", "the stack was never verified: no RTO".to_owned())),
        };
        case("RTO objective".into(), r.rto_secs.unwrap_or(0.0), outcome);
    }
    if let Some(obj) = r.downtime_objective_secs {
        let outcome = match r.downtime_secs {
            Some(d) if d <= obj => None,
            Some(d) => Some(("failure", format!("downtime {d:.1} s exceeds {obj:.1} s"))),
            None => Some((
                "failure",
                "the service was never proven back: no downtime".to_owned(),
            )),
        };
        case(
            "downtime objective".into(),
            r.downtime_secs.unwrap_or(0.0),
            outcome,
        );
    }
    let _ = w.write_event(X::End(BytesEnd::new("testsuite")));
    let _ = w.write_event(X::End(BytesEnd::new("testsuites")));
    let mut out = String::from_utf8_lossy(&w.into_inner()).into_owned();
    out.push('\n');
    out
}
