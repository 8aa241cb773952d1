//! The HTTP API against its contract: schemathesis (installed by
//! scripts/setup-servers) generates requests from `docs/openapi.json` and
//! sends them to a live `ferry serve`, with every check on but
//! positive-data acceptance (the runbooks it invents are not valid runbooks,
//! and the server is right to refuse them). It fails on a server error, a
//! status or content type the document does not list, or a body that does
//! not match its schema, so the document and the server cannot drift.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn schemathesis() -> Option<PathBuf> {
    let tools = std::env::var("FERRY_TOOLS").unwrap_or_else(|_| "/var/tmp/ferry-tools".into());
    let bin = Path::new(&tools).join("schemathesis/bin/schemathesis");
    if bin.exists() {
        return Some(bin);
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "CI must have schemathesis (scripts/setup-servers installs it)"
    );
    eprintln!(
        "skipped: {} is missing (run scripts/setup-servers)",
        bin.display()
    );
    None
}

#[test]
fn the_live_api_keeps_its_openapi_contract() {
    let Some(st) = schemathesis() else { return };
    let home = tempfile::tempdir().unwrap();
    // A repository with a point and a runbook directory, so the console's
    // views answer from real data rather than "not configured".
    let repo = home.path().join("repo");
    let books = home.path().join("runbooks");
    std::fs::create_dir(&books).unwrap();
    std::fs::write(
        books.join("disk.yaml"),
        "name: disk\nobjectives: { rpo: 1h }\nsteps:\n  - id: d\n    uses: volume.restore\n    with: { point: web@latest }\n",
    )
    .unwrap();
    let disk = home.path().join("web.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let ferry = |args: &[&str]| {
        let out = Command::new(common::ferry_bin())
            .args(args)
            .env("FERRY_HOME", home.path())
            .env("FERRY_REPO", &repo)
            .env("FERRY_PASSWORD", "contract test passphrase")
            .env_remove("FERRY_STATE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ferry(&["init"]);
    ferry(&["backup", "--source", "web", disk.to_str().unwrap()]);
    let mut cmd = Command::new(common::ferry_bin());
    cmd.env("FERRY_HOME", home.path())
        .env("FERRY_REPO", &repo)
        .env("FERRY_PASSWORD", "contract test passphrase")
        .env_remove("FERRY_STATE")
        .env_remove("FERRY_API_TOKEN");
    let server = common::serve(cmd, &["--runbooks".as_ref(), books.as_os_str()]);
    let url = server.url.clone();
    let token = std::fs::read_to_string(home.path().join("api-token")).unwrap();
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let out = Command::new(st)
        .arg("run")
        .arg(&doc)
        .args(["--url", &url])
        .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--max-examples", "40", "--seed", "7480"])
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(home.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    // The summary, for the log of a passing run too.
    let summary: Vec<&str> = report
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect();
    eprintln!("{}", summary.join("\n"));
    assert!(
        out.status.success(),
        "schemathesis found the API off its contract:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("passed"),
        "schemathesis ran no test case:\n{report}"
    );
}
