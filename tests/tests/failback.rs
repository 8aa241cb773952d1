//! Failback and migration cutover of the example stack end to end, with real
//! QEMU VMs (software emulation): the machines that serve are protected
//! where they run (`ferry protect` over their QMP sockets), a runbook pauses
//! them and takes their final incrementals (`volume.backup`), brings the
//! changes to the other side (in place onto the original disks for a
//! failback, onto new volumes for a cutover), starts and verifies the stack,
//! and reports the downtime.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn runbook(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../runbooks")
        .join(name)
        .display()
        .to_string()
}

/// Rolls back the named runs when a test ends, passed or not: a failing
/// assertion must not leave its VMs running (a finished rollback is a no-op).
struct RollBack<'a>(&'a Env, &'static [&'static str]);

impl Drop for RollBack<'_> {
    fn drop(&mut self) {
        for run in self.1.iter().rev() {
            let _ = self.0.cmd().args(["rollback", run]).output();
        }
    }
}

/// `ferry --json run runbooks/NAME --param P... --id ID` with the test's
/// home: whether it succeeded, and its report.
fn run_runbook(env: &Env, name: &str, params: &[String], id: &str) -> (bool, Value) {
    let mut cmd = env.cmd();
    cmd.args(["--json", "run", &runbook(name)]);
    for p in params {
        cmd.args(["--param", p]);
    }
    let out = cmd.args(["--id", id]).output().unwrap();
    let rep: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("ferry run {name}: {}", stderr(&out)));
    (out.status.success(), rep)
}

/// A step's output in a report.
fn output(rep: &Value, step: &str, key: &str) -> Value {
    let s = rep["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == step)
        .unwrap_or_else(|| panic!("no step {step}: {rep:#}"));
    s["outputs"][key].clone()
}

fn out_str(rep: &Value, step: &str, key: &str) -> String {
    output(rep, step, key)
        .as_str()
        .unwrap_or_else(|| panic!("{step}.{key} is not text: {rep:#}"))
        .to_owned()
}

/// The original machines' disks, copied from the stack and backed up (as the
/// protection of the original site left them); the points' ids.
fn originals(env: &Env, stack: &Path) -> (PathBuf, PathBuf, String, String) {
    let mut ids = Vec::new();
    let mut disks = Vec::new();
    for (src, img) in [("shop-web", "web-data.img"), ("shop-db", "db-data.img")] {
        let disk = env.path(img);
        std::fs::copy(stack.join(img), &disk).unwrap();
        let s = env.backup(src, &[&disk]);
        ids.push(s["point"].as_str().unwrap().to_owned());
        disks.push(disk);
    }
    (
        disks[0].clone(),
        disks[1].clone(),
        ids[0].clone(),
        ids[1].clone(),
    )
}

/// Places an order with the database at `db` (`/cgi-bin/add`, synced to its disk).
fn order(db: &str, line: &str) {
    let (code, body) = curl(&[&format!("http://{db}/cgi-bin/add?orders&{line}")]);
    assert_eq!(code, 200, "{body}");
}

/// Whether anything answers HTTP at `addr` within 3 s (a paused VM does not).
fn answers(addr: &str) -> bool {
    let out = Command::new("curl")
        .args(["-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{addr}/cgi-bin/get?orders"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "200"
}

/// `ferry protect --cycles 1` of the two VMs a run launched, under the
/// original sources and disk names: protection where they run.
fn protect(env: &Env, rep: &Value) -> Value {
    let web = format!("shop-web={},disk=web-data.img", out_str(rep, "web", "qmp"));
    let db = format!("shop-db={},disk=db-data.img", out_str(rep, "db", "qmp"));
    let status = env.path("protect.json");
    let work = env.path("protect");
    env.ok(&[
        "protect",
        "--vm",
        &web,
        "--vm",
        &db,
        "--cycles",
        "1",
        "--work-dir",
        work.to_str().unwrap(),
        "--status",
        status.to_str().unwrap(),
    ]);
    serde_json::from_str(&std::fs::read_to_string(status).unwrap()).unwrap()
}

/// A file's content inside an ext4 image (debugfs reads it without mounting).
fn file_in_image(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn failback_brings_the_orders_taken_after_a_failover_home_in_place() {
    let Some(stack) = stack() else { return };
    let env = Env::new();
    env.init();
    let guest = format!("guest={}", stack.join("guest").display());
    let (web_disk, db_disk, web_orig, db_orig) = originals(&env, &stack);
    let _cleanup = RollBack(&env, &["fo", "fb"]);

    // The disaster: the shop fails over (a run, not a drill: it stays up).
    let (ok, fo) = run_runbook(&env, "mini-shop.yaml", std::slice::from_ref(&guest), "fo");
    assert!(ok, "{fo:#}");
    let recovered_db = out_str(&fo, "db", "addr");
    let recovered_web = out_str(&fo, "web", "addr");

    // The recovered shop takes orders, is protected where it runs, and takes more.
    order(&recovered_db, "order-2001-recovered");
    let p = protect(&env, &fo);
    assert!(p.to_string().contains("shop-db"), "{p:#}");
    order(&recovered_db, "order-2002-late");
    let (code, page) = curl(&[&format!("http://{recovered_web}/cgi-bin/orders")]);
    assert_eq!(code, 200);
    assert!(page.contains("order-2002-late"), "{page}");

    // Failback: the final incrementals, in place onto the original disks.
    let params = [
        format!("recovered_web_qmp={}", out_str(&fo, "web", "qmp")),
        format!("recovered_web_disk={}", out_str(&fo, "web-volume", "path")),
        format!("recovered_db_qmp={}", out_str(&fo, "db", "qmp")),
        format!("recovered_db_disk={}", out_str(&fo, "db-volume", "path")),
        format!("web_disk={}", web_disk.display()),
        format!("db_disk={}", db_disk.display()),
        format!("web_base={web_orig}"),
        format!("db_base={db_orig}"),
        guest.clone(),
        "expect=order-2002-late".to_owned(),
    ];
    let (ok, fb) = run_runbook(&env, "mini-shop-failback.yaml", &params, "fb");
    assert!(ok, "{fb:#}");
    assert_eq!(fb["status"], "succeeded");

    // The final incrementals paused the recovered machines and read only
    // what changed since protection's cycle (its bitmaps).
    for step in ["web-final", "db-final"] {
        assert_eq!(output(&fb, step, "paused"), true, "{fb:#}");
        let mode = out_str(&fb, step, "mode");
        assert!(mode.contains("incremental"), "{step}: {mode}");
    }
    assert!(!answers(&recovered_db), "the recovered database is paused");
    let final_db = out_str(&fb, "db-final", "point");
    assert!(
        output(&fb, "db-final", "parent").is_string(),
        "the final incremental continues protection's point: {fb:#}"
    );

    // The original disks were brought to the final points in place: a few
    // blocks written, what the original points share skipped.
    for (step, disk) in [("db-home", &db_disk), ("web-home", &web_disk)] {
        assert_eq!(out_str(&fb, step, "path"), disk.display().to_string());
        let written = output(&fb, step, "bytes_written").as_u64().unwrap();
        let skipped = output(&fb, step, "bytes_skipped").as_u64().unwrap();
        assert!(written < 8 << 20, "{step} wrote {written} bytes of 32 MiB");
        assert!(skipped > 0, "{step}: the base saved nothing");
    }
    assert!(
        output(&fb, "db-home", "bytes_written").as_u64().unwrap() > 0,
        "the orders changed the database's disk"
    );
    assert_eq!(out_str(&fb, "db-home", "point"), final_db);

    // Home serves the orders taken while away, and the report says how long
    // the shop was down.
    let home_web = out_str(&fb, "web", "addr");
    let (code, page) = curl(&[&format!("http://{home_web}/cgi-bin/orders")]);
    assert_eq!(code, 200);
    assert!(
        page.contains("order-2001-recovered") && page.contains("order-2002-late"),
        "{page}"
    );
    let down = fb["downtime_secs"].as_f64().unwrap();
    let rto = fb["rto_secs"].as_f64().unwrap();
    assert!(down > 0.0 && down <= rto, "downtime {down} s, RTO {rto} s");
    assert_eq!(fb["downtime_met"], true);
    let text = env.ok(&["report", "fb"]);
    assert!(text.contains("downtime"), "{text}");

    // Done: the home machines keep running until stopped; the failback's own
    // rollback would resume the recovered ones, so stop both runs' machines.
    env.ok(&["rollback", "fb"]);
    assert!(
        answers(&recovered_db),
        "rolling the failback back resumes the recovered database"
    );
    env.ok(&["rollback", "fo"]);
    assert_eq!(qemu_processes_named("fo"), 0);
    assert_eq!(qemu_processes_named("fb"), 0);
    // The original disk, with no VM on it, holds the orders.
    let orders = file_in_image(&db_disk, "/records/orders");
    assert!(orders.contains("order-2002-late"), "{orders}");
}

#[test]
fn cutover_pauses_the_source_carries_its_last_write_and_reports_the_downtime() {
    let Some(stack) = stack() else { return };
    let env = Env::new();
    env.init();
    let guest = format!("guest={}", stack.join("guest").display());
    originals(&env, &stack);
    let _cleanup = RollBack(&env, &["src", "cut"]);

    // The source site: the shop running (here on this machine's QEMU).
    let (ok, src) = run_runbook(&env, "mini-shop.yaml", std::slice::from_ref(&guest), "src");
    assert!(ok, "{src:#}");
    let source_db = out_str(&src, "db", "addr");
    // Initial sync and incrementals while it serves, then its last order.
    protect(&env, &src);
    order(&source_db, "order-3001-last");

    let params = [
        format!("source_web_qmp={}", out_str(&src, "web", "qmp")),
        format!("source_web_disk={}", out_str(&src, "web-volume", "path")),
        format!("source_db_qmp={}", out_str(&src, "db", "qmp")),
        format!("source_db_disk={}", out_str(&src, "db-volume", "path")),
        guest.clone(),
        "expect=order-3001-last".to_owned(),
    ];
    let (ok, cut) = run_runbook(&env, "mini-shop-cutover.yaml", &params, "cut");
    assert!(ok, "{cut:#}");
    assert_eq!(cut["checks_failed"], 0);
    let mode = out_str(&cut, "db-final", "mode");
    assert!(mode.contains("incremental"), "{mode}");
    // Only what the last order changed was read from the source's disk.
    let read = output(&cut, "db-final", "bytes_read").as_u64().unwrap();
    assert!(read < 4 << 20, "read {read} bytes of 32 MiB");
    assert!(
        !answers(&source_db),
        "the source is paused after the cutover"
    );
    let down = cut["downtime_secs"].as_f64().unwrap();
    assert!(down > 0.0, "{cut:#}");
    assert_eq!(cut["downtime_met"], true);
    let target_web = out_str(&cut, "web", "addr");
    let (code, page) = curl(&[&format!("http://{target_web}/cgi-bin/orders")]);
    assert_eq!(code, 200);
    assert!(page.contains("order-3001-last"), "{page}");

    // Rolling the cutover back removes the target and resumes the source.
    env.ok(&["rollback", "cut"]);
    assert_eq!(qemu_processes_named("cut"), 0);
    assert!(answers(&source_db), "the source serves again");
    env.ok(&["rollback", "src"]);
    assert_eq!(qemu_processes_named("src"), 0);
}
