//! The orchestrator from the user's side, on real state databases: runs and
//! drills killed with SIGKILL at every event boundary and in the middle of
//! steps resume without running a finished step again or creating anything
//! twice (SQLite and the PostgreSQL server on this machine); approvals,
//! cancel and rollback from other processes; check.sql against PostgreSQL and
//! MariaDB; the HTTP API with its event stream; broken runbooks.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A scratch FERRY_HOME (SQLite state unless `state` is set) and a work area.
struct Orch {
    env: Env,
    state: Option<String>,
}

impl Orch {
    fn new() -> Orch {
        Orch {
            env: Env::new(),
            state: None,
        }
    }

    fn home(&self) -> PathBuf {
        self.env.path("home")
    }

    fn cmd(&self) -> Command {
        let mut c = self.env.cmd();
        c.env("FERRY_HOME", self.home())
            .env_remove("FERRY_STATE")
            .env_remove("FERRY_CRASH_AT_EVENT");
        if let Some(s) = &self.state {
            c.env("FERRY_STATE", s);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferry {args:?}: {:?}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.env.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn report(&self, run: &str) -> serde_json::Value {
        self.json(&["report", run])
    }
}

/// A ledger line per execution: `ran STEP KEY`; `created KEY` only when the
/// resource (a file named after the idempotency key) did not exist yet.
const LEDGER_STEP: &str = r#"
    uses: command.run
    with:
      run: |
        set -e
        echo "ran $FERRY_STEP $FERRY_IDEMPOTENCY_KEY" >> "$LEDGER"
        f="$RES/$(echo "$FERRY_IDEMPOTENCY_KEY" | tr '/[]' '___')"
        if [ ! -e "$f" ]; then
          : > "$f.tmp" && mv "$f.tmp" "$f"
          echo "created $FERRY_IDEMPOTENCY_KEY" >> "$LEDGER"
        fi
      env: { LEDGER: "${{ params.ledger }}", RES: "${{ params.res }}" }
    undo:
      uses: command.run
      with:
        run: rm -f "$RES/$(echo "$FERRY_IDEMPOTENCY_KEY" | tr '/[]' '___')"; echo "undone $FERRY_STEP" >> "$LEDGER"
        env: { LEDGER: "${{ params.ledger }}", RES: "${{ params.res }}" }
"#;

fn crash_runbook() -> String {
    let mut rb = String::from(
        "name: crashy\nparams:\n  ledger: { type: string }\n  res: { type: string }\ntargets:\n  local: { type: local, parallelism: 2 }\nsteps:\n",
    );
    for (id, needs) in [
        ("net", ""),
        ("disk-a", "net"),
        ("disk-b", "net"),
        ("vm", "[disk-a, disk-b]"),
    ] {
        rb.push_str(&format!("  - id: {id}\n"));
        if !needs.is_empty() {
            rb.push_str(&format!("    needs: {needs}\n"));
        }
        rb.push_str(LEDGER_STEP.trim_start_matches('\n'));
    }
    rb.push_str("  - id: vol\n    uses: volume.create\n    needs: vm\n    with: { size: 1M }\n");
    rb.push_str("  - id: pause\n    uses: wait\n    needs: vol\n    with: { duration: 50ms }\n");
    rb.push_str("  - id: probe\n    uses: check.command\n    needs: [pause, vol]\n    with: { run: [test, -s, \"${{ steps.vol.outputs.path }}\"] }\n");
    rb
}

fn ledger(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn count(lines: &[String], prefix: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in lines {
        if let Some(rest) = l.strip_prefix(prefix) {
            *m.entry(rest.split_whitespace().next().unwrap_or("").to_owned())
                .or_insert(0) += 1;
        }
    }
    m
}

/// Kills the orchestrator right after event N (FERRY_CRASH_AT_EVENT, a
/// SIGKILL to itself), for every N the run has, then resumes; checks that the
/// run ends as an uninterrupted one does, nothing ran twice, nothing was
/// created twice, and a drill leaves nothing behind.
fn crash_at_every_event(o: &Orch, mode: &str) {
    let rb = o.write("crashy.yaml", &crash_runbook());
    let rb = rb.to_str().unwrap();
    // An uninterrupted run first: how many events it writes.
    let base = o.env.path("base");
    std::fs::create_dir_all(&base).unwrap();
    let ledger0 = base.join("ledger");
    let p = |l: &Path, r: &Path| {
        vec![
            format!("ledger={}", l.display()),
            format!("res={}", r.display()),
        ]
    };
    let args0 = p(&ledger0, &base);
    let mut a = vec![mode, rb, "--id", "base"];
    for x in &args0 {
        a.extend(["--param", x]);
    }
    o.ok(&a);
    let total = o.report("base")["steps"].as_array().unwrap().len();
    assert_eq!(total, 7);
    assert_eq!(o.json(&["runs"])[0]["status"], "succeeded");
    let mut n = 1;
    loop {
        let dir = o.env.path(&format!("k{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let led = dir.join("ledger");
        let args = p(&led, &dir);
        let id = format!("{mode}-k{n}");
        let mut a = vec![mode, rb, "--id", &id];
        for x in &args {
            a.extend(["--param", x]);
        }
        let out = o
            .cmd()
            .env("FERRY_CRASH_AT_EVENT", n.to_string())
            .args(&a)
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        if out.status.signal() != Some(9) {
            // The run ended before event n: every boundary was covered.
            assert!(out.status.success(), "{}", stderr(&out));
            assert!(n > 15, "only {n} events?");
            break;
        }
        let runs = o.json(&["runs", "--limit", "1"]);
        assert_eq!(runs[0]["status"], "running", "killed at event {n}");
        // Steps the log shows finished must never run again; steps it shows
        // running may run again (they were interrupted), but create nothing twice.
        let before = o.report(&id);
        let finished: Vec<String> = before["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "succeeded")
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();
        let out = o.run(&["resume", &id]);
        assert!(
            out.status.success(),
            "resume after a kill at event {n}: {}",
            stderr(&out)
        );
        let r = o.report(&id);
        assert_eq!(r["status"], "succeeded", "kill at event {n}: {r}");
        let lines = ledger(&led);
        let ran = count(&lines, "ran ");
        let created = count(&lines, "created ");
        for step in ["net", "disk-a", "disk-b", "vm"] {
            let times = ran.get(step).copied().unwrap_or(0);
            if finished.iter().any(|f| f == step) {
                assert_eq!(
                    times, 1,
                    "kill at event {n}: {step} had finished, then ran again\n{lines:?}"
                );
            } else {
                assert!(
                    (1..=2).contains(&times),
                    "kill at event {n}: {step} ran {times} times\n{lines:?}"
                );
            }
        }
        assert_eq!(created.len(), 4, "kill at event {n}: {lines:?}");
        assert!(
            created.values().all(|&c| c == 1),
            "kill at event {n}: created twice: {lines:?}"
        );
        for s in r["steps"].as_array().unwrap() {
            assert_eq!(s["status"], "succeeded", "kill at event {n}: {s}");
            assert!(
                s["attempts"].as_u64().unwrap() <= 1,
                "kill at event {n}: {s}"
            );
        }
        let work = o.home().join("work").join(&id);
        if mode == "drill" {
            assert_eq!(
                count(&lines, "undone ").len(),
                4,
                "kill at event {n}: {lines:?}"
            );
            let left: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .filter(|f| f != "ledger")
                .collect();
            assert!(left.is_empty(), "kill at event {n}: drill left {left:?}");
            let images: Vec<_> = std::fs::read_dir(&work)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert!(
                images.is_empty(),
                "kill at event {n}: drill left {images:?} in its work dir"
            );
        } else {
            assert!(work.join("vol.raw").exists());
        }
        n += 1;
    }
}

#[test]
fn runs_killed_at_every_event_resume_without_repeating_steps_sqlite() {
    let o = Orch::new();
    crash_at_every_event(&o, "run");
}

#[test]
fn drills_killed_at_every_event_still_tear_everything_down_sqlite() {
    let o = Orch::new();
    crash_at_every_event(&o, "drill");
}

/// A fresh database on the PostgreSQL server of this machine, dropped after.
struct PgDb {
    name: String,
}

impl PgDb {
    fn create() -> Option<PgDb> {
        let name = format!(
            "ferry_test_{}_{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() % 100_000
        );
        let ok = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
                &format!("CREATE DATABASE {name}"),
            ])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI must reach PostgreSQL on 127.0.0.1:5432"
            );
            eprintln!("skipped: no PostgreSQL on 127.0.0.1:5432");
            return None;
        }
        Some(PgDb { name })
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .status();
    }
}

#[test]
fn runs_killed_at_every_event_resume_without_repeating_steps_postgres() {
    let Some(db) = PgDb::create() else { return };
    let mut o = Orch::new();
    o.state = Some(db.url());
    crash_at_every_event(&o, "run");
    assert!(
        !o.home().join("state.db").exists(),
        "the state went to PostgreSQL, not SQLite"
    );
}

#[test]
fn drills_killed_at_every_event_still_tear_everything_down_postgres() {
    let Some(db) = PgDb::create() else { return };
    let mut o = Orch::new();
    o.state = Some(db.url());
    crash_at_every_event(&o, "drill");
}

/// SIGKILL at random moments, in the middle of steps, again and again until
/// the run is through: resources are created once, and the run succeeds.
#[test]
fn runs_killed_in_the_middle_of_steps_resume_and_create_nothing_twice() {
    let o = Orch::new();
    let slow = crash_runbook().replace("        set -e\n", "        set -e\n        sleep 0.3\n");
    let rb = o.write("slow.yaml", &slow);
    let led = o.env.path("ledger");
    let res = o.env.path("res");
    std::fs::create_dir_all(&res).unwrap();
    let l = format!("ledger={}", led.display());
    let r = format!("res={}", res.display());
    let mut rng = Rng(7);
    let mut kills = 0;
    let mut first = true;
    loop {
        let mut c = o.cmd();
        if first {
            c.args([
                "run",
                rb.to_str().unwrap(),
                "--id",
                "mid",
                "--param",
                &l,
                "--param",
                &r,
            ]);
        } else {
            c.args(["resume", "mid"]);
        }
        first = false;
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let wait = Duration::from_millis(150 + rng.below(500));
        let start = Instant::now();
        let done = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if start.elapsed() >= wait {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        match done {
            Some(st) => {
                assert!(st.success());
                break;
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                assert!(kills < 60, "never finished");
            }
        }
    }
    assert!(kills >= 2, "the test should kill mid-run ({kills})");
    let rep = o.report("mid");
    assert_eq!(rep["status"], "succeeded");
    let lines = ledger(&led);
    let created = count(&lines, "created ");
    assert_eq!(created.len(), 4, "{lines:?}");
    assert!(
        created.values().all(|&c| c == 1),
        "created twice: {lines:?}"
    );
    eprintln!("{kills} kills; ledger: {lines:?}");
}

/// Waits until step 1 (`go`) of a run waits for approval.
fn wait_for_gate(o: &Orch, run: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = o.run(&["--json", "report", run]);
        if out.status.success() {
            let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if rep["steps"][1]["status"] == "waiting" {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{run} never reached the gate: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A run that makes a disk, waits at the approval gate `go` (whose extra
/// keys are `gate`), then runs `after`.
struct Gate {
    rb: std::path::PathBuf,
    led: std::path::PathBuf,
    res: std::path::PathBuf,
}

impl Gate {
    fn new(o: &Orch, gate: &str) -> Gate {
        let rb = o.write(
            "gate.yaml",
            &format!(
                "name: gate\nparams:\n  ledger: {{ type: string }}\n  res: {{ type: string }}\nsteps:\n  - id: disk\n{}  - id: go\n    uses: approval\n    needs: disk\n{gate}  - id: after\n    uses: noop\n    needs: go\n",
                LEDGER_STEP.trim_start_matches('\n')
            ),
        );
        let res = o.env.path("res");
        std::fs::create_dir_all(&res).unwrap();
        Gate {
            rb,
            led: o.env.path("ledger"),
            res,
        }
    }

    /// Starts run `id` in the background and returns once it waits at the gate.
    fn start(&self, o: &Orch, id: &str, stderr: Stdio) -> std::process::Child {
        let child = o
            .cmd()
            .args(["run", self.rb.to_str().unwrap(), "--id", id])
            .arg("--param")
            .arg(format!("ledger={}", self.led.display()))
            .arg("--param")
            .arg(format!("res={}", self.res.display()))
            .stderr(stderr)
            .spawn()
            .unwrap();
        wait_for_gate(o, id);
        child
    }
}

#[test]
fn approval_cancel_and_rollback_from_other_processes() {
    let o = Orch::new();
    let gate = Gate::new(&o, "    with: { message: cut over? }\n");
    let (led, res) = (gate.led.clone(), gate.res.clone());
    // Runs in the background, waits at the gate.
    let mut runner = gate.start(&o, "g1", Stdio::piped());
    let out = o.run(&["approve", "g1", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no step `nope`"), "{}", stderr(&out));
    o.ok(&["approve", "g1", "go"]);
    let st = runner.wait().unwrap();
    assert!(st.success());
    let rep = o.report("g1");
    assert_eq!(rep["status"], "succeeded");
    assert_eq!(rep["steps"][1]["status"], "succeeded");
    assert_eq!(
        std::fs::read_dir(&res).unwrap().count(),
        1,
        "the disk exists after a run"
    );
    // Roll the finished run back from another process: undo runs here.
    o.ok(&["rollback", "g1"]);
    assert_eq!(o.report("g1")["status"], "rolled_back");
    assert_eq!(
        std::fs::read_dir(&res).unwrap().count(),
        0,
        "rollback removed the disk"
    );
    assert_eq!(count(&ledger(&led), "undone ").get("disk"), Some(&1));

    // Cancel a run waiting at the gate: it stops, and `ferry rollback` cleans up.
    let mut runner = gate.start(&o, "g2", Stdio::null());
    o.ok(&["cancel", "g2"]);
    let st = runner.wait().unwrap();
    assert!(!st.success(), "a cancelled run exits 1");
    let rep = o.report("g2");
    assert_eq!(rep["status"], "cancelled");
    assert_eq!(
        rep["steps"][2]["status"], "pending",
        "nothing after the gate ran"
    );
    assert_eq!(
        std::fs::read_dir(&res).unwrap().count(),
        1,
        "a cancelled run keeps what it made"
    );
    o.ok(&["rollback", "g2"]);
    assert_eq!(std::fs::read_dir(&res).unwrap().count(), 0);
    let out = o.run(&["cancel", "g2"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn an_unanswered_approval_times_out_and_rolls_back() {
    let o = Orch::new();
    let gate = Gate::new(&o, "    timeout: 1500ms\n");
    let res = gate.res.clone();
    // Killed while it waits at the gate: the deadline counts from when the
    // approval was asked, not from when a process resumes the run.
    let mut runner = gate.start(&o, "a1", Stdio::null());
    runner.kill().unwrap();
    runner.wait().unwrap();
    std::thread::sleep(Duration::from_millis(1600));
    let resumed = Instant::now();
    let out = o.cmd().args(["--json", "resume", "a1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        resumed.elapsed() < Duration::from_millis(1500),
        "the gate's deadline had passed already; resume waited {:?}",
        resumed.elapsed()
    );
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["status"], "failed", "{rep}");
    let go = &rep["steps"][1];
    assert!(
        go["error"]
            .as_str()
            .unwrap()
            .contains("nobody approved it within its timeout (1.5 s)"),
        "{go}"
    );
    assert_eq!(rep["steps"][2]["status"], "pending");
    assert_eq!(rep["steps"][0]["undo"], "undone", "{rep}");
    assert_eq!(std::fs::read_dir(&res).unwrap().count(), 0);
}

#[test]
fn failed_steps_retry_then_roll_back_and_plan_predicts_from_history() {
    let o = Orch::new();
    let counter = o.env.path("tries");
    let rb = o.write(
        "flaky.yaml",
        &format!(
            "name: flaky\nobjectives: {{ rto: 1m }}\non_failure: rollback\nparams:\n  fail: {{ type: boolean, default: false }}\nsteps:\n  - id: vol\n    uses: volume.create\n    with: {{ size: 1M }}\n  - id: flaky\n    uses: command.run\n    needs: vol\n    retry: {{ attempts: 3, backoff: 100ms }}\n    with:\n      run: echo x >> {c}; [ $(wc -l < {c}) -ge 2 ] || exit 75\n  - id: last\n    uses: command.run\n    needs: flaky\n    if: ${{{{ params.fail }}}}\n    with: {{ run: exit 3 }}\n",
            c = counter.display()
        ),
    );
    let rb = rb.to_str().unwrap();
    // Planning before any run predicts from the target's figures (no
    // history) and creates no state.
    let first = o.json(&["plan", rb]);
    assert_eq!(first["history_runs"], 0, "{first}");
    assert!(
        first["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["basis"] == "default"),
        "{first}"
    );
    assert!(
        !o.home().join("state.db").exists(),
        "plan created the state"
    );
    let out = o.json(&["run", rb, "--id", "f1"]);
    assert_eq!(out["status"], "succeeded");
    // The report sets what planning predicted against what was measured.
    let f = &out["forecast"];
    assert!(f["predicted_rto_secs"].as_f64().is_some(), "{out}");
    assert_eq!(f["measured_rto_secs"], out["rto_secs"], "{out}");
    assert_eq!(f["currency"], "USD", "{out}");
    let flaky = &out["steps"][1];
    assert_eq!(
        flaky["attempts"], 2,
        "exit 75 is transient and retried: {flaky}"
    );
    assert_eq!(out["steps"][2]["status"], "skipped");
    // A permanent failure rolls back what the run created.
    std::fs::remove_file(&counter).unwrap();
    let outp = o
        .cmd()
        .args(["--json", "run", rb, "--id", "f2", "--param", "fail=true"])
        .output()
        .unwrap();
    assert_eq!(outp.status.code(), Some(1));
    let rep: serde_json::Value = serde_json::from_slice(&outp.stdout).unwrap();
    assert_eq!(rep["status"], "failed");
    assert_eq!(rep["steps"][2]["status"], "failed");
    assert!(
        rep["steps"][2]["error"]
            .as_str()
            .unwrap()
            .contains("exited with 3"),
        "{rep}"
    );
    assert_eq!(rep["steps"][0]["undo"], "undone");
    assert!(!o.home().join("work/f2/vol.raw").exists());
    // Plan: waves and a prediction from the successful run; touches nothing.
    let plan = o.json(&["plan", rb]);
    assert_eq!(plan["waves"].as_array().unwrap().len(), 3);
    assert!(plan["predicted_rto_secs"].as_f64().unwrap() > 0.0, "{plan}");
    // Learnt from the one run that succeeded (f2 failed), step by step.
    assert_eq!(plan["history_runs"], 1, "{plan}");
    let vol = &plan["steps"][0];
    assert_eq!(
        (&vol["id"], &vol["basis"]),
        (&"vol".into(), &"history".into()),
        "{plan}"
    );
    assert_eq!(
        o.json(&["runs"]).as_array().unwrap().len(),
        2,
        "plan created no run"
    );
    let bad = o.run(&["plan", rb, "--param", "fial=true"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("did you mean `fail`"),
        "{}",
        stderr(&bad)
    );
}

/// Files a volume step left in a run's work directory.
fn volume_files(o: &Orch, run: &str) -> Vec<String> {
    std::fs::read_dir(o.home().join("work").join(run))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vol."))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn restores_stop_promptly_when_their_step_times_out_or_the_run_is_cancelled() {
    // 192 MiB that does not compress: 24 pack reads of 8 MiB. Every read of
    // pack data takes 2 s (FERRY_FAULTS range-latency), so a whole restore
    // needs at least 6 rounds of 4 parallel reads: 12 s.
    let o = Orch::new();
    o.env.init();
    let img = o.env.path("disk.img");
    {
        let mut data = vec![0u8; 192 << 20];
        Rng(0x5eed).fill(&mut data);
        std::fs::write(&img, &data).unwrap();
    }
    o.env.backup("web", &[&img]);
    std::fs::remove_file(&img).unwrap();
    const LATENCY_S: f64 = 2.0;
    let slow = |c: &mut Command| {
        c.env("FERRY_FAULTS", format!("range-latency={LATENCY_S}s"));
    };

    // A step timeout stops the restore thread, and the rollback that follows
    // waits for it before removing the partial image.
    let rb = o.write(
        "slow.yaml",
        "name: slow\nsteps:\n  - id: vol\n    uses: volume.restore\n    timeout: 3s\n    with: { point: web@latest }\n",
    );
    let started = Instant::now();
    let mut c = o.cmd();
    slow(&mut c);
    let out = c
        .args(["--json", "run", rb.to_str().unwrap(), "--id", "t1"])
        .output()
        .unwrap();
    let took = started.elapsed().as_secs_f64();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["status"], "failed", "{rep}");
    let vol = &rep["steps"][0];
    assert!(
        vol["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 3 s"),
        "{vol}"
    );
    assert_eq!(vol["undo"], "undone", "{vol}");
    // The 3 s timeout, at most one pack read in flight per thread, the
    // repository's opening: well under the 12 s a restore left running needs.
    assert!(
        took < 3.0 + 2.0 * LATENCY_S + 3.0,
        "the run took {took:.1} s to end after its restore timed out"
    );
    assert_eq!(volume_files(&o, "t1"), Vec::<String>::new());

    // `ferry cancel` from another process while the restore writes: the run
    // ends at once and keeps the partial image for a rollback (or a resume).
    let rb = o.write(
        "cancel.yaml",
        "name: cancel\nsteps:\n  - id: vol\n    uses: volume.restore\n    with: { point: web@latest }\n",
    );
    let mut c = o.cmd();
    slow(&mut c);
    let mut runner = c
        .args(["run", rb.to_str().unwrap(), "--id", "c1"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !volume_files(&o, "c1")
        .iter()
        .any(|n| n.ends_with(".ferry-partial"))
    {
        assert!(Instant::now() < deadline, "the restore never began writing");
        std::thread::sleep(Duration::from_millis(50));
    }
    let cancelled = Instant::now();
    o.ok(&["cancel", "c1"]);
    let st = runner.wait().unwrap();
    let took = cancelled.elapsed().as_secs_f64();
    assert!(!st.success());
    assert!(
        took < 2.0 * LATENCY_S + 2.0,
        "the run took {took:.1} s to end after `ferry cancel`"
    );
    let rep = o.report("c1");
    assert_eq!(rep["status"], "cancelled");
    assert!(
        rep["steps"][0]["error"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{rep}"
    );
    assert_eq!(volume_files(&o, "c1"), ["vol.raw.ferry-partial"]);
    o.ok(&["rollback", "c1"]);
    assert_eq!(volume_files(&o, "c1"), Vec::<String>::new());
}

#[test]
fn broken_runbooks_are_refused_with_every_problem_and_its_position() {
    let o = Orch::new();
    let rb = o.write(
        "broken.yaml",
        "name: broken\nsteps:\n  - id: a\n    uses: volume.restor\n  - id: b\n    uses: noop\n    needs: [c]\n  - id: c\n    uses: noop\n    needs: b\n",
    );
    for cmd in ["validate", "plan", "run", "drill"] {
        let out = o.run(&[cmd, rb.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = stderr(&out);
        assert!(
            err.contains("broken.yaml:4:11: error: unknown action `volume.restor`"),
            "{cmd}: {err}"
        );
        assert!(err.contains("did you mean `volume.restore`?"), "{err}");
        assert!(err.contains("steps form a cycle: b → c → b"), "{err}");
    }
    assert!(
        o.json(&["runs"]).as_array().unwrap().is_empty(),
        "nothing was started"
    );
    let schema: serde_json::Value = serde_json::from_str(&o.ok(&["schema"])).unwrap();
    assert!(
        schema["properties"]["steps"]["items"]["properties"]["uses"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "check.sql")
    );
    // Every example runbook validates through the command too.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks");
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "yaml") {
            o.ok(&["validate", e.path().to_str().unwrap()]);
        }
    }
}

#[test]
fn check_sql_against_postgres_and_mariadb_and_checks_fail_by_their_deadline() {
    let o = Orch::new();
    let closed = common::servers::free_port();
    let rb = o.write(
        "sql.yaml",
        &format!(
            "name: sql\nsteps:\n  - id: pg\n    uses: check.sql\n    with: {{ url: 'postgres://postgres@127.0.0.1:5432/postgres', query: 'SELECT 40 + 2', expect: '42', deadline: 20s }}\n  - id: maria\n    uses: check.sql\n    with: {{ url: 'mysql://root@127.0.0.1:3306/test', query: \"SELECT CONCAT('mar', 'ia')\", expect: maria, deadline: 20s }}\n  - id: tcp\n    uses: check.tcp\n    needs: [pg, maria]\n    with: {{ address: '127.0.0.1:5432', deadline: 5s }}\n  - id: wrong\n    uses: check.sql\n    needs: tcp\n    with: {{ url: 'postgres://postgres@127.0.0.1:5432/postgres', query: 'SELECT 1', expect: '2', deadline: 2s, interval: 500ms }}\n  - id: closed\n    uses: check.tcp\n    needs: tcp\n    with: {{ address: '127.0.0.1:{closed}', deadline: 2s, interval: 500ms }}\n"
        ),
    );
    let out = o
        .cmd()
        .args(["--json", "run", rb.to_str().unwrap()])
        .output()
        .unwrap();
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let step = |id: &str| {
        rep["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(step("pg")["status"], "succeeded", "{rep}");
    assert_eq!(step("maria")["status"], "succeeded", "{rep}");
    assert_eq!(step("tcp")["status"], "succeeded");
    assert_eq!(step("wrong")["status"], "failed");
    assert!(
        step("wrong")["error"]
            .as_str()
            .unwrap()
            .contains("returned `1`, expected `2`"),
        "{rep}"
    );
    assert!(
        step("wrong")["error"]
            .as_str()
            .unwrap()
            .contains("did not pass within 2s"),
        "{rep}"
    );
    assert!(
        step("closed")["error"]
            .as_str()
            .unwrap()
            .contains("connect 127.0.0.1"),
        "{rep}"
    );
    assert_eq!(rep["checks_passed"], 3);
    assert_eq!(rep["checks_failed"], 2);
}

/// `ferry serve`, killed by PID on drop.
struct Server {
    child: std::process::Child,
    url: String,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_api_runs_drills_streams_their_events_and_documents_itself() {
    let o = Orch::new();
    let mut child = o
        .cmd()
        .args(["--json", "serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    let url = info["url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "binds loopback by default: {url}"
    );
    let token = std::fs::read_to_string(o.home().join("api-token")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(o.home().join("api-token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let srv = Server { child, url, token };
    let auth = format!("Authorization: Bearer {}", srv.token);

    let (code, _) = curl(&[&format!("{}/api/runs", srv.url)]);
    assert_eq!(code, 401, "no token, no API");
    let (code, _) = curl(&[
        "-H",
        "Authorization: Bearer wrong-token-wrong-token-wrong",
        &format!("{}/api/runs", srv.url),
    ]);
    assert_eq!(code, 401);
    let (code, _) = curl(&[&format!("{}/api/health", srv.url)]);
    assert_eq!(code, 200);

    let runbook = "name: api\nsteps:\n  - id: disk\n    uses: volume.create\n    with: { size: 1M }\n  - id: pause\n    uses: wait\n    needs: disk\n    with: { duration: 1s }\n  - id: probe\n    uses: check.command\n    needs: pause\n    with: { run: [test, -f, \"${{ steps.disk.outputs.path }}\"] }\n";
    let body = serde_json::json!({"runbook": runbook, "mode": "drill"}).to_string();
    let (code, resp) = curl(&[
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        &format!("{}/api/runs", srv.url),
    ]);
    assert_eq!(code, 202, "{resp}");
    let run: serde_json::Value = serde_json::from_str(&resp).unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    // The live stream: every event, in order, ending with the run's end.
    let (code, sse) = curl(&[
        "-N",
        "-H",
        &auth,
        &format!("{}/api/runs/{id}/stream", srv.url),
    ]);
    assert_eq!(code, 200);
    let kinds: Vec<&str> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"step_started"), "{sse}");
    assert_eq!(kinds.last(), Some(&"run_finished"), "{sse}");
    assert!(
        kinds.contains(&"undo_succeeded"),
        "the drill tore down: {kinds:?}"
    );
    let (_, rep) = curl(&["-H", &auth, &format!("{}/api/runs/{id}", srv.url)]);
    let rep: serde_json::Value = serde_json::from_str(&rep).unwrap();
    assert_eq!(rep["status"], "succeeded");
    let (code, junit) = curl(&[
        "-H",
        &auth,
        &format!("{}/api/runs/{id}/report?format=junit", srv.url),
    ]);
    assert_eq!(code, 200);
    assert!(
        junit.contains("<testsuite name=\"drill api\" tests=\"3\" failures=\"0\""),
        "{junit}"
    );
    // Bad input: diagnostics with positions, and no run.
    let bad = serde_json::json!({"runbook": "name: x\nsteps:\n  - id: a\n    uses: nope\n", "mode": "run"}).to_string();
    let (code, resp) = curl(&[
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        &bad,
        &format!("{}/api/runs", srv.url),
    ]);
    assert_eq!(code, 422, "a runbook with problems is unprocessable");
    assert!(
        resp.contains("api.yaml:4:11: error: unknown action `nope`"),
        "{resp}"
    );
    // The OpenAPI document served equals `ferry openapi` and the committed docs/openapi.json.
    let (code, served) = curl(&["-H", &auth, &format!("{}/api/openapi.json", srv.url)]);
    assert_eq!(code, 200);
    let printed = o.ok(&["openapi"]);
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json"))
            .unwrap();
    let v: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert_eq!(
        v,
        serde_json::from_str::<serde_json::Value>(&printed).unwrap()
    );
    assert_eq!(
        v,
        serde_json::from_str::<serde_json::Value>(&committed).unwrap(),
        "docs/openapi.json is stale: ferry openapi > docs/openapi.json"
    );
    for path in [
        "/api/runs",
        "/api/runs/{id}/stream",
        "/api/runs/{id}/approve",
        "/api/plan",
    ] {
        assert!(v["paths"].get(path).is_some(), "{path} undocumented");
    }
}

/// Several processes opening a new state at the same moment (a runner and
/// the commands watching it) wait for each other's set-up instead of failing.
#[test]
fn processes_opening_a_new_state_at_once_all_succeed() {
    let o = Orch::new();
    let children: Vec<_> = (0..6)
        .map(|_| {
            o.cmd()
                .args(["runs"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

/// Runbook commands see an allow-listed environment: none of Ferry's secrets
/// (the repository password, its file, the API token) nor anything else of
/// the orchestrator's environment; a secret value a command prints is
/// redacted before it is stored; a runbook may read only the secrets it
/// declares.
#[test]
fn runbook_commands_never_see_or_store_ferrys_secrets() {
    let o = Orch::new();
    let pwfile = o.write("pw", "correct-horse-battery");
    let rb = o.write(
        "env.yaml",
        "name: env\non_failure: stop\nsteps:\n  - id: env\n    uses: command.run\n    with: { run: \"env >&2; exit 3\" }\n  - id: leak\n    uses: command.run\n    with: { run: \"echo the password is correct-horse-battery >&2; exit 3\" }\n",
    );
    let out = o
        .cmd()
        .env("FERRY_PASSWORD_FILE", &pwfile)
        .env("FERRY_API_TOKEN", "api-token-0123456789abcdef")
        .env("AWS_SECRET_ACCESS_KEY", "aws-secret-value-123")
        .args(["run", rb.to_str().unwrap(), "--id", "envrun", "-q"])
        .output()
        .unwrap();
    // Both steps fail on purpose: their stderr is in the stored error.
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report = o.report("envrun");
    let steps = report["steps"].as_array().unwrap();
    let stdout = |id: &str| {
        steps
            .iter()
            .find(|s| s["id"] == id)
            .and_then(|s| s["error"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let env = stdout("env");
    assert!(env.contains("FERRY_RUN_ID=envrun"), "{env}");
    for secret in [
        "FERRY_PASSWORD_FILE",
        "FERRY_API_TOKEN",
        "api-token-0123456789abcdef",
        "AWS_SECRET_ACCESS_KEY",
        "aws-secret-value-123",
        "FERRY_HOME",
    ] {
        assert!(!env.contains(secret), "a command saw {secret}:\n{env}");
    }
    let leak = stdout("leak");
    assert_eq!(
        leak, "exited with 3 (wanted 0): the password is ***",
        "stored output is redacted"
    );
    let log = o.ok(&["--json", "report", "envrun"]);
    assert!(!log.contains("correct-horse-battery"));

    // check.sql may read only a declared secret, never Ferry's own.
    let undeclared = o.write(
        "sql.yaml",
        "name: sql\nsteps:\n  - id: db\n    uses: check.sql\n    with: { url: \"postgres://u@127.0.0.1/db\", query: \"select 1\", expect: \"1\", password_env: FERRY_PASSWORD }\n",
    );
    let out = o.run(&["validate", undeclared.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(
            "reads the environment variable `FERRY_PASSWORD`, which `secrets` does not declare"
        ),
        "{}",
        stderr(&out)
    );
    let ferrys = o.write(
        "sql2.yaml",
        "name: sql\nsecrets: [FERRY_PASSWORD]\nsteps:\n  - id: db\n    uses: noop\n",
    );
    let out = o.run(&["validate", ferrys.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("one of Ferry's own variables"),
        "{}",
        stderr(&out)
    );
}

/// Users and tokens made on the command line act over HTTP with their
/// roles: a viewer's token reads and is refused a drill (403 naming the
/// role it needs); an operator logs in with a password, gets a session
/// cookie and starts a drill with the session's CSRF token; the audit log
/// names both; and `ferry user remove` ends the operator's access at once.
#[test]
fn users_and_tokens_from_the_command_line_act_with_their_roles_over_http() {
    let o = Orch::new();
    let pwfile = o.env.path("pw");
    std::fs::write(&pwfile, "operator passphrase 1\n").unwrap();
    let short = o.env.path("short");
    std::fs::write(&short, "short\n").unwrap();
    let out = o.run(&[
        "user",
        "add",
        "ann",
        "--role",
        "operator",
        "--password-file",
        short.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("at least 12"), "{}", stderr(&out));
    for (name, role) in [("ann", "operator"), ("vic", "viewer")] {
        let out = o.run(&[
            "user",
            "add",
            name,
            "--role",
            role,
            "--password-file",
            pwfile.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = o.run(&[
        "user",
        "add",
        "ann",
        "--role",
        "admin",
        "--password-file",
        pwfile.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an existing user: {}",
        stderr(&out)
    );
    let out = o.run(&["--json", "user", "list"]);
    let users: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(users.as_array().unwrap().len(), 2, "{users}");
    assert_eq!(users[0]["name"], "ann");
    assert_eq!(users[0]["role"], "operator");
    let out = o.run(&[
        "--json",
        "token",
        "create",
        "--user",
        "vic",
        "--expires",
        "30d",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let tok: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vic_token = tok["token"].as_str().unwrap().to_owned();
    assert!(vic_token.starts_with("ferry_"), "{tok}");
    let out = o.run(&["token", "create", "--user", "nobody"]);
    assert_eq!(out.status.code(), Some(2));

    let mut child = o
        .cmd()
        .args(["--json", "serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    let srv = Server {
        child,
        url: info["url"].as_str().unwrap().to_owned(),
        token: std::fs::read_to_string(o.home().join("api-token")).unwrap(),
    };
    let vic = format!("Authorization: Bearer {vic_token}");
    let (code, me) = curl(&["-H", &vic, &format!("{}/api/me", srv.url)]);
    assert_eq!(code, 200, "{me}");
    assert!(me.contains("\"role\":\"viewer\""), "{me}");
    let drill = serde_json::json!({"runbook": "name: t\nsteps:\n  - id: w\n    uses: wait\n    with: { duration: 1s }\n", "mode": "drill"}).to_string();
    let (code, body) = curl(&[
        "-H",
        &vic,
        "-H",
        "Content-Type: application/json",
        "-d",
        &drill,
        &format!("{}/api/runs", srv.url),
    ]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("operator"), "{body}");

    // The operator logs in; the cookie jar keeps the session.
    let jar = o.env.path("jar");
    let login = serde_json::json!({"name": "ann", "password": "operator passphrase 1"}).to_string();
    let (code, me) = curl(&[
        "-c",
        jar.to_str().unwrap(),
        "-H",
        "Content-Type: application/json",
        "-d",
        &login,
        &format!("{}/api/login", srv.url),
    ]);
    assert_eq!(code, 200, "{me}");
    let me: serde_json::Value = serde_json::from_str(&me).unwrap();
    let csrf = format!("X-CSRF-Token: {}", me["csrf_token"].as_str().unwrap());
    let cookies = [
        "-b",
        jar.to_str().unwrap(),
        "-H",
        "Content-Type: application/json",
    ];
    let (code, _) = curl(
        &[
            &cookies[..],
            &["-d", &drill, &format!("{}/api/runs", srv.url)],
        ]
        .concat(),
    );
    assert_eq!(code, 403, "no CSRF token");
    let (code, run) = curl(
        &[
            &cookies[..],
            &["-H", &csrf, "-d", &drill, &format!("{}/api/runs", srv.url)],
        ]
        .concat(),
    );
    assert_eq!(code, 202, "{run}");
    let run: serde_json::Value = serde_json::from_str(&run).unwrap();
    let id = run["id"].as_str().unwrap();

    let admin = format!("Authorization: Bearer {}", srv.token.trim());
    let (code, audit) = curl(&["-H", &admin, &format!("{}/api/audit", srv.url)]);
    assert_eq!(code, 200, "{audit}");
    let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
    let has = |actor: &str, action: &str, subject: &str| {
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == actor && e["action"] == action && e["subject"] == subject)
    };
    assert!(has("ann", "login", "ann"), "{audit}");
    assert!(has("ann", "run.start", id), "{audit}");
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "user.add"
                && e["subject"] == "vic"
                && e["actor"].as_str().unwrap().ends_with("(cli)")),
        "{audit}"
    );

    // Removing a user ends their session at once.
    let out = o.run(&["user", "remove", "ann"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, _) = curl(&["-b", jar.to_str().unwrap(), &format!("{}/api/me", srv.url)]);
    assert_eq!(code, 401);
}

#[test]
fn serve_speaks_https_with_secure_cookies_and_mutual_tls_when_asked() {
    let o = Orch::new();
    let pki = o.env.path("pki");
    make_pki(&pki);
    let file = |name: &str| pki.join(name).display().to_string();
    let pw = o.env.path("pw");
    std::fs::write(&pw, "a long enough password 42\n").unwrap();
    o.ok(&[
        "user",
        "add",
        "ada",
        "--role",
        "admin",
        "--password-file",
        pw.to_str().unwrap(),
    ]);

    // Credentials that cannot be read stop the server before it listens,
    // naming the file.
    let out = o.run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &file("missing.pem"),
        "--tls-key",
        &file("server-key.pem"),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("missing.pem"), "{}", stderr(&out));
    let out = o.run(&["serve", "--tls-cert", &file("server-cert.pem")]);
    assert_eq!(out.status.code(), Some(2), "--tls-cert needs --tls-key");

    let srv = serve(
        o.cmd(),
        &[
            "--tls-cert".as_ref(),
            file("server-cert.pem").as_ref(),
            "--tls-key".as_ref(),
            file("server-key.pem").as_ref(),
        ],
    );
    assert!(srv.url.starts_with("https://127.0.0.1:"), "{}", srv.url);
    let health = format!("{}/api/health", srv.url);
    let ca = file("ca-cert.pem");
    assert_eq!(curl(&["--cacert", &ca, &health]).0, 200);
    // A client that does not trust the certificate, and plain HTTP, get nothing.
    assert_eq!(curl(&[&health]).0, 0);
    assert_eq!(curl(&[&health.replace("https://", "http://")]).0, 0);
    // The console's session cookie is Secure over the server's own TLS.
    let (code, headers) = curl(&[
        "--cacert",
        &ca,
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"name":"ada","password":"a long enough password 42"}"#,
        &format!("{}/api/login", srv.url),
    ]);
    assert_eq!(code, 200, "{headers}");
    let cookie = headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {headers}"));
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    drop(srv);

    // With a client CA, only clients holding a certificate it signed get in.
    let srv = serve(
        o.cmd(),
        &[
            "--tls-cert".as_ref(),
            file("server-cert.pem").as_ref(),
            "--tls-key".as_ref(),
            file("server-key.pem").as_ref(),
            "--tls-client-ca".as_ref(),
            ca.as_ref(),
        ],
    );
    let health = format!("{}/api/health", srv.url);
    assert_eq!(curl(&["--cacert", &ca, &health]).0, 0);
    let (code, _) = curl(&[
        "--cacert",
        &ca,
        "--cert",
        &file("client-cert.pem"),
        "--key",
        &file("client-key.pem"),
        &health,
    ]);
    assert_eq!(code, 200);
}

#[test]
fn schedules_are_managed_from_the_command_line() {
    let o = Orch::new();
    let out = o.ok(&[
        "schedule",
        "add",
        "sunday-drill",
        "--cron",
        "0 3 * * 0",
        "--drill",
        "shop.yaml",
    ]);
    assert!(out.contains("next ") && out.contains("03:00 UTC"), "{out}");
    o.ok(&[
        "schedule",
        "add",
        "checks",
        "--cron",
        "*/30 * * * *",
        "--check",
        "--read-data",
    ]);
    let list = o.json(&["schedule", "list"]);
    assert_eq!(list[0]["name"], "checks");
    assert_eq!(
        list[0]["job"],
        serde_json::json!({"check": {"read_data": true}})
    );
    assert_eq!(
        list[1]["job"],
        serde_json::json!({"drill": {"path": "shop.yaml"}})
    );
    let next =
        chrono::DateTime::from_timestamp_millis(list[1]["next_ms"].as_i64().unwrap()).unwrap();
    assert_eq!(
        chrono::Datelike::weekday(&next),
        chrono::Weekday::Sun,
        "fires on a Sunday (UTC): {next}"
    );

    // Mistakes are named, with what to do, and change nothing.
    for (args, want) in [
        (vec!["--cron", "0 3 * *", "--check"], "five fields"),
        (vec!["--cron", "0 25 * * *", "--check"], "cron"),
        (vec!["--cron", "0 3 * * *"], "--drill"),
        (
            vec!["--cron", "0 3 * * *", "--drill", "../etc/x.yaml"],
            "no path",
        ),
    ] {
        let mut a = vec!["schedule", "add", "bad"];
        a.extend(args);
        let out = o.run(&a);
        assert_eq!(out.status.code(), Some(2), "{a:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{a:?}: {}", stderr(&out));
    }
    let out = o.run(&[
        "schedule",
        "add",
        "checks",
        "--cron",
        "* * * * *",
        "--check",
    ]);
    assert!(stderr(&out).contains("exists"), "{}", stderr(&out));
    assert_eq!(o.json(&["schedule", "list"]).as_array().unwrap().len(), 2);

    o.ok(&["schedule", "remove", "checks"]);
    let out = o.run(&["schedule", "remove", "checks"]);
    assert!(!out.status.success() && stderr(&out).contains("no schedule named checks"));
}

#[test]
fn a_bad_alert_route_file_stops_the_server_before_it_listens() {
    let o = Orch::new();
    let books = o.env.path("books");
    std::fs::create_dir_all(&books).unwrap();
    let routes = o.env.path("routes.yaml");
    std::fs::write(&routes, "routes:\n  - match: {}\n    runbook: a.yaml\n").unwrap();
    let (b, r) = (books.to_str().unwrap(), routes.to_str().unwrap());
    let out = o.run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--runbooks",
        b,
        "--alert-routes",
        r,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("routes.yaml") && stderr(&out).contains("matches every alert"),
        "{}",
        stderr(&out)
    );
    // Routes name runbooks of the directory: without one they mean nothing.
    let out = o.run(&["serve", "--alert-routes", r]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--runbooks"), "{}", stderr(&out));
}

#[test]
fn the_report_measures_the_downtime_a_runbook_names_against_its_objective() {
    let o = Orch::new();
    let rb = o.write(
        "down.yaml",
        "name: down\nobjectives: { downtime: 10s }\ndowntime: { from: stop, to: [back, db-back] }\nsteps:\n  - id: before\n    uses: wait\n    with: { duration: 400ms }\n  - id: stop\n    uses: wait\n    needs: before\n    with: { duration: 300ms }\n  - id: back\n    uses: command.run\n    needs: stop\n    with: { run: \"sleep 0.2; exit ${CODE:-0}\", env: { CODE: \"${{ params.code }}\" } }\n  - id: db-back\n    uses: noop\n    needs: stop\nparams:\n  code: \"0\"\n",
    );
    let rb = rb.to_str().unwrap();
    let rep = o.json(&["run", rb, "--id", "d1"]);
    let down = rep["downtime_secs"].as_f64().unwrap();
    let rto = rep["rto_secs"].as_f64().unwrap();
    // From the start of `stop` to the end of the later of `back` and
    // `db-back`: the 300 ms wait and the 200 ms command, not what came before.
    assert!(
        (0.5..rto - 0.35).contains(&down),
        "downtime {down}, RTO {rto}"
    );
    assert_eq!(rep["downtime_objective_secs"], 10.0);
    assert_eq!(rep["downtime_met"], true);
    assert!(o.ok(&["report", "d1"]).contains("downtime"));
    let junit = o.ok(&["report", "d1", "--format", "junit"]);
    assert!(junit.contains("downtime objective"), "{junit}");

    // The service never proven back: no downtime, the objective missed.
    let out = o.run(&["--json", "run", rb, "--id", "d2", "--param", "code=1"]);
    assert_eq!(out.status.code(), Some(1));
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(rep.get("downtime_secs").is_none(), "{rep:#}");
    assert_eq!(rep["downtime_met"], false);
    let junit = o.ok(&["report", "d2", "--format", "junit"]);
    assert!(
        junit.contains("the service was never proven back"),
        "{junit}"
    );
}
