//! The web console in a real browser: `ferry serve` with a repository (two
//! sources, a check on record), a runbook directory in git and three users;
//! Debian's Chromium, driven by playwright-core (tests/console/drive.js),
//! signs in as a viewer, an operator and an admin and does what each may.
//! Screenshots land in the target directory (`console-screens/`).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;

const PASSWORD: &str = "console test passphrase 7";

fn tools() -> PathBuf {
    PathBuf::from(std::env::var("FERRY_TOOLS").unwrap_or_else(|_| "/var/tmp/ferry-tools".into()))
}

/// Where screenshots go: beside the build, never in the clone.
fn screens() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
        |_| {
            ferry_bin()
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .to_path_buf()
        },
        PathBuf::from,
    );
    let dir = target.join("console-screens");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn viewers_operators_and_admins_use_the_console_in_chromium() {
    let driver = tools().join("playwright/node_modules");
    if !driver.join("playwright-core").is_dir()
        || !std::path::Path::new("/usr/bin/chromium").exists()
    {
        assert!(
            std::env::var("CI").is_err(),
            "scripts/setup-browser did not install Chromium and playwright-core"
        );
        eprintln!("skipped: run scripts/setup-browser for Chromium and playwright-core");
        return;
    }
    let env = Env::new();
    env.init();
    let home = env.path("home");
    let cmd = || {
        let mut c = env.cmd();
        c.env("FERRY_HOME", &home).env_remove("FERRY_STATE");
        c
    };
    let ok = |args: &[&str]| {
        let out = cmd().args(args).output().unwrap();
        assert!(out.status.success(), "ferry {args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // Two sources: web twice (the newest is what a drill restores), db once.
    let (web, db) = (env.path("web.img"), env.path("db.img"));
    make_image(&web, 4 << 20, 1);
    make_image(&db, 4 << 20, 2);
    env.backup("web", &[&web]);
    scatter_writes(&web, 20, 3);
    env.backup("web", &[&web]);
    env.backup("db", &[&db]);
    ok(&["check"]);

    let books = env.path("runbooks");
    std::fs::create_dir(&books).unwrap();
    std::fs::write(
        books.join("drill.yaml"),
        "name: web-drill\ndescription: Restore the web disk and prove it.\nobjectives: { rto: 10m, rpo: 1h }\n\
         steps:\n  - id: disk\n    uses: volume.restore\n    with: { point: web@latest }\n\
         \x20 - id: go\n    uses: approval\n    needs: disk\n\
         \x20 - id: probe\n    uses: check.disk\n    needs: go\n    with: { path: \"${{ steps.disk.outputs.path }}\", point: \"${{ steps.disk.outputs.point }}\" }\n",
    )
    .unwrap();
    std::fs::write(
        books.join("broken.yaml"),
        "name: broken\nsteps:\n  - id: a\n    uses: volume.restor\n",
    )
    .unwrap();
    for args in [
        &["init", "-q"][..],
        &["add", "."],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "runbooks",
        ],
    ] {
        assert!(
            Command::new("git")
                .arg("-C")
                .arg(&books)
                .args(args)
                .status()
                .unwrap()
                .success()
        );
    }

    let pwfile = env.path("user-pw");
    std::fs::write(&pwfile, format!("{PASSWORD}\n")).unwrap();
    for (name, role) in [("vera", "viewer"), ("omar", "operator"), ("ada", "admin")] {
        ok(&[
            "user",
            "add",
            name,
            "--role",
            role,
            "--password-file",
            pwfile.to_str().unwrap(),
        ]);
    }

    let server = serve(cmd(), &["--runbooks".as_ref(), books.as_os_str()]);
    let url = server.url.clone();
    // An agent enrolled, so the agents page has a row to show.
    let token = ok(&[
        "agent-token",
        "create",
        "--source",
        "db",
        "--device",
        db.to_str().unwrap(),
    ]);
    let agent_config = env.path("agent.toml");
    let enrolled = Command::new(ferry_bin().with_file_name("ferry-agent"))
        .arg("--config")
        .arg(&agent_config)
        .args(["enroll", "--server", &url, "--token", token.trim()])
        .output()
        .unwrap();
    assert!(enrolled.status.success(), "{}", stderr(&enrolled));

    let shots = screens();
    let out = Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/console/drive.js"))
        .env("NODE_PATH", &driver)
        .env("URL", &url)
        .env("PASSWORD", PASSWORD)
        .env("SHOTS", &shots)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "drive.js printed no JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && r.get("error").is_none(),
        "{}",
        serde_json::to_string_pretty(&r).unwrap()
    );
    eprintln!("console: {}", serde_json::to_string_pretty(&r).unwrap());

    // Offline: the page fetched nothing from anywhere else, and ran clean.
    assert_eq!(r["requests_elsewhere"], serde_json::json!([]), "{r}");
    assert_eq!(r["console_errors"], serde_json::json!([]), "{r}");

    let v = &r["viewer"];
    assert!(
        v["wrong_password"]
            .as_str()
            .unwrap()
            .contains("wrong name or password"),
        "{v}"
    );
    assert_eq!(
        v["nav"],
        serde_json::json!([
            "Protection",
            "Runbooks",
            "Runs",
            "Drill history",
            "Schedules",
            "Agents",
            "Repository"
        ])
    );
    let sources = v["sources"].as_array().unwrap();
    assert_eq!(
        sources
            .iter()
            .map(|s| s["source"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["db", "web"]
    );
    // Points of seconds ago against the drill runbook's 1 h RPO (web); db
    // has no runbook, so no objective.
    assert_eq!(sources[1]["gauge"], "ok", "{v}");
    assert_eq!(sources[0]["gauge"], "unknown", "{v}");
    assert_eq!(v["timeline_points"], 2);
    assert_eq!(v["timeline_verified"], 0);
    assert!(
        v["point_detail"].as_str().unwrap().contains("web.img"),
        "{v}"
    );
    assert!(
        v["broken_diagnostics"][0]
            .as_str()
            .unwrap()
            .contains("volume.restor"),
        "{v}"
    );
    assert_eq!(v["broken_highlighted"], serde_json::json!(["L4"]));
    assert_eq!(v["dag_nodes"], serde_json::json!(["disk", "go", "probe"]));
    assert_eq!(v["start_drill_button"], false);
    assert!(v["plan"].as_str().unwrap().contains("predicted RTO"), "{v}");
    assert!(
        v["repository"].as_str().unwrap().contains("no damage"),
        "{v}"
    );
    assert_eq!(v["forced_start"], 403);
    assert_eq!(v["no_csrf"], 403);

    let o = &r["operator"];
    assert_eq!(o["status"], "succeeded", "{o}");
    assert_eq!(
        o["steps"],
        serde_json::json!(["disk:succeeded", "go:succeeded", "probe:succeeded"])
    );
    assert!(
        o["gantt_bars_before"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("go:waiting")),
        "{o}"
    );
    assert!(o["export_links"].to_string().contains("format=junit"));
    assert!(o["drill_points"].as_u64().unwrap() >= 1);
    assert!(o["nav"].to_string().contains("Audit log") && !o["nav"].to_string().contains("Users"));

    let a = &r["admin"];
    assert_eq!(
        a["users_after"],
        serde_json::json!(["ada", "auditor", "omar", "vera"])
    );
    let audit = a["audit"].to_string();
    let run = o["run"].as_str().unwrap();
    for want in ["run.start", "run.approve", "user.add"] {
        assert!(audit.contains(want), "{want} not in {audit}");
    }
    assert!(audit.contains(run) && audit.contains("omar"), "{audit}");
    // The schedule added on the page is the server's.
    let sched = a["schedule"].as_str().unwrap();
    assert!(
        sched.contains("drill drill.yaml") && sched.contains("0 3 * * 0"),
        "{sched}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["--json", "schedule", "list"])).unwrap();
    assert_eq!(
        list[0]["job"],
        serde_json::json!({"drill": {"path": "drill.yaml"}}),
        "{list}"
    );
    assert!(audit.contains("schedule.add"), "{audit}");
    // The agent enrolled from the command line is listed; a token made on the
    // page is one `ferry-agent enroll` takes, for this server.
    assert_eq!(a["agents"].as_array().map(Vec::len), Some(1), "{a}");
    let enroll = a["enroll"].as_str().unwrap();
    assert!(
        enroll.starts_with(&format!(
            "ferry-agent enroll --server {url} --token fenroll_"
        )),
        "{enroll}"
    );
    assert!(audit.contains("agent-token.create"), "{audit}");
    assert_eq!(a["signed_out"], true);

    // Quality a user notices, on every page, wide and narrow, light and dark.
    let q = &r["quality"];
    assert_eq!(
        q["violations"],
        serde_json::json!([]),
        "accessibility: {}",
        serde_json::to_string_pretty(&q["violations"]).unwrap()
    );
    assert_eq!(
        q["overflow"],
        serde_json::json!([]),
        "pages wider than the window: {q}"
    );
    assert_eq!(
        q["keyboard_source"], "db",
        "Tab then Enter opens a source: {q}"
    );
    assert_eq!(q["keyboard_run"], run, "Tab then Enter opens a run: {q}");
    // Times read in the browser's zone (UTC+05:30 here), UTC on hover.
    let (text, title) = (
        q["time_text"].as_str().unwrap(),
        q["time_title"].as_str().unwrap(),
    );
    let parse = |s: &str| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap();
    assert!(title.ends_with(" UTC"), "{q}");
    assert_eq!(
        parse(text) - parse(title.trim_end_matches(" UTC")),
        chrono::Duration::minutes(330),
        "{q}"
    );

    // The drill the operator ran verified the web point it restored.
    let verified = ok(&["--json", "verified"]);
    assert!(verified.contains(run), "{verified}");
    for f in [
        "viewer-dashboard.png",
        "operator-run-finished.png",
        "admin-audit.png",
    ] {
        assert!(shots.join(f).metadata().unwrap().len() > 10_000, "{f}");
    }
}
