//! Golden event logs: the event log is a declared format (every run stores
//! one, and readers must keep reading old logs). Logs of real past runs are
//! checked in under `tests/golden/` (the runbook, its log as JSON lines, the
//! run's row); every build must replay each of them and report it exactly as
//! the `.report.json` beside it says. `FERRY_BLESS=1` rewrites the reports
//! after a deliberate change (review the diff).

#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use ferry_orchestrator::state::{RunRow, Stored};
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn load(name: &str) -> (RunRow, Vec<Stored>, Vec<serde_json::Value>) {
    let dir = golden_dir();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{name}.run.json"))).unwrap(),
    )
    .unwrap();
    let source = std::fs::read_to_string(dir.join(format!("{name}.yaml"))).unwrap();
    let rb = ferry_engine::parse(&format!("{name}.yaml"), &source).unwrap();
    let s = |k: &str| meta[k].as_str().unwrap().to_owned();
    let run = RunRow {
        id: s("id"),
        runbook: rb.name.clone(),
        file: s("file"),
        source,
        params: serde_json::from_value(meta["params"].clone()).unwrap(),
        mode: s("mode"),
        status: s("status"),
        git_commit: None,
        repo: None,
        work_dir: s("work_dir"),
        created_ms: meta["created_ms"].as_i64().unwrap(),
        finished_ms: meta["finished_ms"].as_i64(),
        owner: None,
        lease_ms: None,
        target: None,
    };
    let mut log = Vec::new();
    let mut raw = Vec::new();
    for line in std::fs::read_to_string(dir.join(format!("{name}.jsonl")))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        log.push(Stored {
            seq: v["seq"].as_i64().unwrap(),
            at_ms: v["at_ms"].as_i64().unwrap(),
            event: serde_json::from_value(v["event"].clone())
                .unwrap_or_else(|e| panic!("{name}: event {} no longer reads: {e}", v["seq"])),
        });
        raw.push(v["event"].clone());
    }
    (run, log, raw)
}

#[test]
fn past_logs_replay_and_report_identically() {
    let mut names: Vec<String> = std::fs::read_dir(golden_dir())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.strip_suffix(".run.json").map(str::to_owned)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 2, "the golden logs are missing");
    let bless = std::env::var("FERRY_BLESS").is_ok_and(|v| v == "1");
    for name in names {
        let (run, log, raw) = load(&name);
        // The events written today are the bytes stored then.
        for (s, r) in log.iter().zip(&raw) {
            assert_eq!(
                &serde_json::to_value(&s.event).unwrap(),
                r,
                "{name}: event {} is written differently now",
                s.seq
            );
        }
        let engine = ferry_orchestrator::exec::rebuild(&run, &log)
            .unwrap_or_else(|e| panic!("{name}: the log no longer replays: {e:#}"));
        match engine.phase() {
            ferry_engine::machine::Phase::Finished(status) => {
                assert_eq!(status.name(), run.status, "{name}: replays to another end")
            }
            other => panic!("{name}: replays to an unfinished run ({other:?})"),
        }
        let report = ferry_orchestrator::report::build(&run, &log, &engine);
        let got = serde_json::to_string_pretty(&report).unwrap() + "\n";
        let path = golden_dir().join(format!("{name}.report.json"));
        if bless {
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "{} is missing: FERRY_BLESS=1 cargo test -p ferry-orchestrator --test golden",
                path.display()
            )
        });
        assert_eq!(
            got, want,
            "{name}: the report of a past run changed; if that is intended, FERRY_BLESS=1 and review the diff"
        );
        // The text report too: what a user reads of an old run.
        let text = ferry_orchestrator::report::text(&report);
        assert!(
            text.contains(&run.id) && text.contains(&run.status),
            "{text}"
        );
    }
}
