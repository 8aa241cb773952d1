//! The example application (scripts/make-app --bootable: Debian guests with
//! MariaDB, nginx and PHP) drilled on the local target with the
//! provider-neutral runbooks/shop.yaml: both root disks backed up, the stack
//! rebuilt on a `network.create` network, each disk's own bootloader booted,
//! the orders proven in the database (check.sql) and through the web tier
//! (which finds the database through the user data), then torn down. The same
//! file validates and plans for every target, and the report sets the
//! forecast against what was measured. The same file then drills on a
//! libvirt host.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use ferry_connectors::libvirt::Connection;
use ferry_orchestrator::targets::libvirt::DEFAULT_POOL;

fn runbook() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks/shop.yaml")
}

/// The bootable images, built once per machine (cached by make-app).
fn images() -> Option<PathBuf> {
    let have = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64 && command -v busybox"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !have || !root {
        eprintln!("skipped: needs root and QEMU (scripts/setup-vm) to build and boot the app");
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root with QEMU"
        );
        return None;
    }
    let dir = PathBuf::from("/var/tmp/ferry-tools/app");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-app");
    let st = Command::new("bash")
        .arg(&script)
        .arg("--bootable")
        .arg(&dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "scripts/make-app failed");
    Some(dir)
}

/// Both root disks backed up as sources `shop-web` and `shop-db`, then lost.
fn back_up_both_tiers(env: &Env, images: &Path) {
    for (src, img) in [("shop-web", "web-boot.img"), ("shop-db", "db-boot.img")] {
        let disk = env.path(img);
        let st = Command::new("cp")
            .arg("--sparse=always")
            .arg(images.join(img))
            .arg(&disk)
            .status()
            .unwrap();
        assert!(st.success());
        env.backup(src, &[&disk]);
        std::fs::remove_file(&disk).unwrap();
    }
}

#[test]
fn the_neutral_runbook_validates_and_plans_on_every_target() {
    let env = Env::new();
    env.init();
    let rb = runbook();
    let rb = rb.to_str().unwrap();
    let out = env.ok(&["validate", rb]);
    assert!(out.contains("ok"), "{out}");
    for (target, kind, instance) in [
        ("local", "local", "QEMU VM"),
        ("aws", "aws", "EC2 instance"),
        ("libvirt", "libvirt", ""),
    ] {
        let plan = env.json(&["plan", rb, "--target", target]);
        assert_eq!(plan["target"], target, "{plan}");
        assert_eq!(plan["target_type"], kind, "{plan}");
        let steps = plan["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 8, "{plan}");
        assert!(steps.iter().all(|s| s["target"] == target), "{plan}");
        if !instance.is_empty() {
            let web = steps.iter().find(|s| s["id"] == "web").unwrap();
            assert_eq!(web["resources"][0]["kind"], instance, "{plan}");
        }
        assert!(plan["predicted_rto_secs"].as_f64().unwrap() > 0.0, "{plan}");
        // The repository holds no point yet: the restores say so, by name.
        let restore = steps.iter().find(|s| s["id"] == "db-volume").unwrap();
        assert!(
            restore["point"]["error"]
                .as_str()
                .unwrap()
                .contains("shop-db"),
            "{plan}"
        );
    }
    // The instance on aws is sized from cpus/memory through the size table.
    let plan = env.json(&["plan", rb, "--target", "aws"]);
    let db = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "db")
        .unwrap();
    assert!(
        db["resources"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("t3.micro"),
        "{db}"
    );
    assert!(
        plan["running_hourly_cost"].as_f64().unwrap() > 0.0,
        "{plan}"
    );
}

#[test]
fn the_example_app_drills_on_the_local_target_with_the_neutral_runbook() {
    let Some(images) = images() else { return };
    let env = Env::new();
    env.init();
    let home = env.path("home");
    back_up_both_tiers(&env, &images);
    let rb = runbook();
    let rb = rb.to_str().unwrap();
    // With the repository: restores are sized from the points.
    let plan = env.json(&["plan", rb]);
    let db_volume = &plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "db-volume")
        .unwrap()
        .clone();
    assert_eq!(db_volume["basis"], "table_throughput", "{plan}");
    assert!(
        db_volume["point"]["size"].as_u64().unwrap() >= 1 << 30,
        "{plan}"
    );
    assert!(plan["standby_month_cost"].as_f64().unwrap() > 0.0, "{plan}");
    let out = env
        .cmd()
        .env("FERRY_HOME", &home)
        .env_remove("FERRY_STATE")
        .env("SHOP_DB_PASSWORD", "orders-reader-2026")
        .args(["--json", "drill", rb, "--id", "app1"])
        .output()
        .unwrap();
    let rep: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", stderr(&out)));
    assert!(out.status.success(), "{rep:#}\n{}", stderr(&out));
    assert_eq!(rep["status"], "succeeded", "{rep:#}");
    assert_eq!(
        rep["checks_passed"], 3,
        "orders in the database, the shop page, the orders page: {rep:#}"
    );
    assert!(rep["left_behind"].as_array().unwrap().is_empty(), "{rep:#}");
    let rto = rep["rto_secs"].as_f64().unwrap();
    eprintln!("the example app's drill on local: RTO {rto:.1} s");
    // Predicted against measured.
    let f = &rep["forecast"];
    assert_eq!(f["measured_rto_secs"].as_f64(), Some(rto), "{rep:#}");
    assert!(f["predicted_rto_secs"].as_f64().unwrap() > 0.0, "{rep:#}");
    // Both VMs are gone and nothing of the network is left.
    assert_eq!(qemu_processes_named("app1"), 0);
    assert!(
        !home.join("work/app1/net.net").exists(),
        "the network was not torn down"
    );
    // A second plan learns from the drill.
    let plan = env
        .cmd()
        .env("FERRY_HOME", &home)
        .env_remove("FERRY_STATE")
        .args(["--json", "plan", rb])
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["history_runs"], 1, "{plan}");
    let db_volume = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "db-volume")
        .unwrap();
    assert_eq!(db_volume["basis"], "measured_throughput", "{plan}");
}

/// Tears a libvirt run down even when the test fails half-way, and removes
/// the target's default pool if the test made it.
struct LibvirtCleanup {
    lv: Connection,
    run: String,
    remove_pool: bool,
}

impl Drop for LibvirtCleanup {
    fn drop(&mut self) {
        if let Err(e) = self.lv.teardown(&self.run) {
            eprintln!("cleanup of run {}: {e}", self.run);
        }
        if self.remove_pool
            && let Err(e) = self.lv.remove_pool(DEFAULT_POOL)
        {
            eprintln!("cleanup of pool {DEFAULT_POOL}: {e}");
        }
    }
}

/// The same runbook file, unchanged, on `--target libvirt` (its default
/// pool and `qemu:///system`): each tier a domain booted from its own
/// bootloader on an isolated libvirt network. The web tier's only way to
/// the database is that network (its other interface is restricted user
/// networking, which reaches nothing), at the address the target reserved
/// for the database's interface and handed to the web tier as user data:
/// the orders page passing proves `private_ip`, the address and the user
/// data all reached the guests.
#[test]
fn the_example_app_drills_on_libvirt_with_the_neutral_runbook() {
    let Some(images) = images() else { return };
    let Some(_daemons) = common::libvirt::Libvirtd::get() else {
        return;
    };
    let env = Env::new();
    env.init();
    let home = env.path("home");
    back_up_both_tiers(&env, &images);
    let lv = Connection::system();
    let run = format!("appvirt-{}", std::process::id());
    let _cleanup = LibvirtCleanup {
        lv: lv.clone(),
        run: run.clone(),
        remove_pool: lv.pool_path(DEFAULT_POOL).unwrap().is_none(),
    };
    let rb = runbook();
    let out = env
        .cmd()
        .env("FERRY_HOME", &home)
        .env_remove("FERRY_STATE")
        .env("SHOP_DB_PASSWORD", "orders-reader-2026")
        .arg("--json")
        .arg("drill")
        .arg(&rb)
        .args(["--target", "libvirt", "--id", &run])
        .output()
        .unwrap();
    let rep: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", stderr(&out)));
    assert!(out.status.success(), "{rep:#}\n{}", stderr(&out));
    assert_eq!(rep["status"], "succeeded", "{rep:#}");
    assert_eq!(
        rep["checks_passed"], 3,
        "orders in the database, the shop page, the orders page: {rep:#}"
    );
    assert!(rep["left_behind"].as_array().unwrap().is_empty(), "{rep:#}");
    let rto = rep["rto_secs"].as_f64().unwrap();
    let predicted = rep["forecast"]["predicted_rto_secs"].as_f64().unwrap();
    eprintln!("the example app's drill on libvirt: RTO {rto:.1} s (predicted {predicted:.1} s)");
    assert_eq!(
        rep["forecast"]["measured_rto_secs"].as_f64(),
        Some(rto),
        "{rep:#}"
    );
    // Nothing tagged with the run is left: domains, the network (and the
    // addresses reserved on it), the volumes.
    let left = lv.list_tagged(&run).unwrap();
    assert!(left.is_empty(), "{left:?}");
}
