//! The example stack end to end with real QEMU VMs (software emulation): the
//! shop's two disks (scripts/make-stack) are backed up, the disaster takes
//! the originals, and `ferry drill runbooks/mini-shop.yaml` rebuilds both tiers on
//! an isolated network, verifies disks, pages and the web tier's reads from
//! the database, tears everything down, and reports RTO and RPO.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;

#[test]
fn drill_rebuilds_the_example_shop_verifies_it_and_tears_it_down() {
    let Some(stack) = stack() else { return };
    let env = Env::new();
    env.init();
    let home = env.path("home");
    // The sources: copies of the shop's disks, backed up, then lost.
    for (src, img) in [("shop-web", "web-data.img"), ("shop-db", "db-data.img")] {
        let disk = env.path(img);
        std::fs::copy(stack.join(img), &disk).unwrap();
        env.backup(src, &[&disk]);
        std::fs::remove_file(&disk).unwrap();
    }
    let runbook = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks/mini-shop.yaml");
    let guest = format!("guest={}", stack.join("guest").display());
    let html = env.path("drill.html");
    let junit = env.path("drill.xml");
    let out = env
        .cmd()
        .env("FERRY_HOME", &home)
        .env_remove("FERRY_STATE")
        .args([
            "--json",
            "drill",
            runbook.to_str().unwrap(),
            "--param",
            &guest,
            "--id",
            "shop1",
        ])
        .args([
            "--report",
            html.to_str().unwrap(),
            "--report",
            junit.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let rep: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", stderr(&out)));
    assert!(out.status.success(), "{rep:#}\n{}", stderr(&out));
    assert_eq!(rep["status"], "succeeded");
    assert_eq!(
        rep["checks_passed"], 5,
        "two disks, the db, the page and the orders: {rep:#}"
    );
    assert_eq!(rep["checks_failed"], 0);
    assert!(rep["left_behind"].as_array().unwrap().is_empty());
    // Every restore used the latest point and reports its RPO against the objective.
    let points = rep["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for p in points {
        assert!(p["rpo_secs"].as_f64().unwrap() > 0.0);
        assert_eq!(p["met"], true, "{p}");
    }
    // The critical path's waits and durations add up to the RTO.
    let rto = rep["rto_secs"].as_f64().unwrap();
    let sum: f64 = rep["critical_path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["wait_secs"].as_f64().unwrap() + c["duration_secs"].as_f64().unwrap())
        .sum();
    assert!(
        (sum - rto).abs() < 0.002,
        "critical path {sum} vs RTO {rto}"
    );
    let waits: f64 = rep["critical_path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["wait_secs"].as_f64().unwrap())
        .sum();
    assert!(waits < 0.5, "scheduling took {waits} s of the RTO");
    assert_eq!(rep["rto_met"], true);
    // The VMs are gone and the work directory is empty.
    assert_eq!(qemu_processes_named("shop1"), 0);
    let left: Vec<_> = std::fs::read_dir(home.join("work/shop1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".raw") || n.ends_with(".qcow2"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Reports for people and CI systems.
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("RTO") && page.contains("shop-page"));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"10\" failures=\"0\""), "{xml}");
    // The drill proved both points: they are the last known good ones.
    let verified = String::from_utf8(
        env.cmd()
            .env("FERRY_HOME", &home)
            .args(["--json", "verified"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let verified: serde_json::Value = serde_json::from_str(&verified).unwrap();
    let mut sources: Vec<&str> = verified
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["source"].as_str().unwrap())
        .collect();
    sources.sort_unstable();
    assert_eq!(sources, ["shop-db", "shop-web"]);

    // A point that does not hold the expected data fails the drill, which still tears down.
    let out = env
        .cmd()
        .env("FERRY_HOME", &home)
        .args([
            "--json",
            "drill",
            runbook.to_str().unwrap(),
            "--param",
            &guest,
            "--param",
            "marker=v2",
            "--param",
            "check_deadline=5s",
            "--id",
            "shop2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["status"], "failed");
    let failed: Vec<&str> = rep["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "failed")
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["db-answers"], "{rep:#}");
    assert!(rep["rto_secs"].is_null());
    assert_eq!(
        qemu_processes_named("shop2"),
        0,
        "a failed drill tears down too"
    );
}
