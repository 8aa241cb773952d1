//! The web console at scale (`cargo bench -p ferry-orchestrator --bench
//! console`): 100 sources with 100 recovery points each (10,000 points), 1,000
//! finished drills of 10 runbooks, a runbook directory restoring every
//! source. A `ferry serve` router (API and console) is started in-process and
//! Chromium, driven by playwright-core (`bench/console.js`), loads each view
//! `ROUNDS` times; it reports the median time from navigation to the view
//! drawn with its data, the bytes each view transfers, and the live latency:
//! from an approval sent to the API to the run page showing the gate passed.
//!
//! Targets (issue 15): every view drawn under 300 ms, under 300 KB per page,
//! live updates under 250 ms. Needs `scripts/setup-browser`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_orchestrator::api::{self, AppState};
use ferry_orchestrator::context::{Context, Password, PasswordSource};
use ferry_orchestrator::control::{self, NewRun};
use ferry_orchestrator::exec::Output;
use ferry_orchestrator::state::State;
use ferry_orchestrator::targets::Registry;
use std::path::Path;
use std::time::Instant;

/// Sources, points per source and drills: the full fixture, or a tenth of
/// each with `CONSOLE_SCALE=small` (quick to build while working on a view;
/// the figures in docs/performance.md are from the full one).
fn scale() -> (usize, usize, usize) {
    match std::env::var("CONSOLE_SCALE").as_deref() {
        Ok("small") => (10, 10, 100),
        _ => (100, 100, 1000),
    }
}
const PASSWORD: &str = "bench console password 1";

fn points(repo_dir: &Path, pw: &[u8], work: &Path) {
    let (sources, points, _) = scale();
    let store = ferry_connectors::store::open(repo_dir.to_str().unwrap(), true).unwrap();
    let repo = ferry_agent::Repository::init(store, pw, Default::default()).unwrap();
    let now = chrono::Utc::now();
    // One content for every point: what the console shows is the points'
    // metadata, and a backup that stores nothing new keeps the fixture
    // quick (each backup loads the whole index: see the data-plane issue).
    let disk = work.join("disk");
    let data: Vec<u8> = (0..256u32 << 10)
        .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 13) as u8)
        .collect();
    std::fs::write(&disk, &data).unwrap();
    for s in 0..sources {
        for p in 0..points {
            let opts = ferry_agent::backup::BackupOptions {
                source: format!("vm-{s:03}"),
                disks: vec![ferry_agent::backup::DiskSpec {
                    name: "disk0".into(),
                    path: disk.clone(),
                }],
                consistency: None,
                time: Some(now - chrono::Duration::minutes(((points - p) * 15) as i64)),
                group: None,
            };
            ferry_agent::backup::backup(&repo, &opts, &Default::default()).unwrap();
        }
        if s % 10 == 9 {
            eprintln!("  {} points", (s + 1) * points);
        }
    }
}

fn runbook(n: usize) -> String {
    let mut s = format!("name: app-{n}\nobjectives: {{ rto: 10m, rpo: 1h }}\nsteps:\n");
    for k in 0..10 {
        let src = n * 10 + k;
        s.push_str(&format!(
            "  - id: disk-{k}\n    uses: volume.restore\n    with: {{ point: vm-{src:03}@latest }}\n"
        ));
    }
    s.push_str("  - id: ready\n    uses: noop\n    needs: [disk-0, disk-1]\n");
    s
}

const QUICK: &str = "name: app-{N}\nobjectives: { rto: 10m }\nsteps:\n  - id: a\n    uses: noop\n  - id: b\n    uses: noop\n    needs: a\n  - id: c\n    uses: wait\n    needs: b\n    with: { duration: 1ms }\n";

fn main() {
    let driver = std::path::PathBuf::from(
        std::env::var("FERRY_TOOLS").unwrap_or_else(|_| "/var/tmp/ferry-tools".into()),
    )
    .join("playwright/node_modules");
    if !driver.join("playwright-core").is_dir() {
        eprintln!("console bench skipped: run scripts/setup-browser first");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (repo_dir, books, work) = (
        dir.path().join("repo"),
        dir.path().join("runbooks"),
        dir.path().join("work"),
    );
    std::fs::create_dir_all(&books).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let pw = PASSWORD.as_bytes().to_vec();
    let (sources, points, runs) = scale();
    let t = Instant::now();
    self::points(&repo_dir, &pw, &work);
    eprintln!(
        "{} points written in {:.1} s",
        sources * points,
        t.elapsed().as_secs_f64()
    );
    for n in 0..sources / 10 {
        std::fs::write(books.join(format!("app-{n}.yaml")), runbook(n)).unwrap();
    }
    std::fs::write(
        books.join("gate.yaml"),
        "name: gate\nsteps:\n  - id: go\n    uses: approval\n  - id: after\n    uses: noop\n    needs: go\n",
    )
    .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = rt.block_on(async {
        let state = State::open(&format!(
            "sqlite://{}",
            dir.path().join("state.db").display()
        ))
        .await
        .unwrap();
        let hash = ferry_orchestrator::auth::hash_password(PASSWORD).unwrap();
        state.add_user("bench", "operator", &hash, 0).await.unwrap();
        let ctx = Context::new(
            None,
            PasswordSource::Unavailable,
            None,
            dir.path().to_path_buf(),
        );
        let registry = Registry::builtin();
        let t = Instant::now();
        for i in 0..runs {
            let run = control::create_run(
                &state,
                &ctx,
                &registry,
                NewRun {
                    file: "quick.yaml".into(),
                    text: QUICK.replace("{N}", &(i % 10).to_string()),
                    git_commit: None,
                    params: Default::default(),
                    target: None,
                    mode: ferry_engine::Mode::Drill,
                    id: None,
                    work_dir: Some(work.join(format!("run-{i}"))),
                },
            )
            .await
            .unwrap();
            control::drive(&state, run, None, None, &registry, Output { lines: false })
                .await
                .unwrap();
        }
        eprintln!("{runs} drills run in {:.1} s", t.elapsed().as_secs_f64());
        let app = AppState::new(
            state,
            Some(repo_dir.display().to_string()),
            Some(Password::new(pw.clone())),
            "bench-server-token-0123456789".into(),
            dir.path().to_path_buf(),
            Some(books.clone()),
        );
        // As `ferry serve` does at start, before anyone signs in.
        let took = app.inventory.warm().await;
        eprintln!("repository read at start in {:.1} s", took.as_secs_f64());
        let router = api::router(app).merge(ferry_web::router());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
            .unwrap();
        });
        format!("http://{addr}")
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/console.js");
    let out = std::process::Command::new("node")
        .arg(script)
        .env("NODE_PATH", &driver)
        .env("URL", &url)
        .env("USER_NAME", "bench")
        .env("PASSWORD", PASSWORD)
        .env("SOURCE", format!("vm-{:03}", sources * 42 / 100))
        .env("RUNBOOK", format!("app-{}.yaml", sources / 30))
        .output()
        .unwrap();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "bench/console.js failed");
    drop(rt);
}
