//! The `libvirt` target against a real libvirt 9 host (`qemu:///system`,
//! QEMU 10 under TCG): the shared `Target` conformance suite with a launch of
//! scripts/make-guest's web guest, a crashed run torn down by its tag, and a
//! drill through the real `ferry` binary (a point of a guest's data disk
//! restored into a pool, an isolated network, the guest booted on both, HTTP
//! and TCP checks) that leaves nothing tagged with its run.
//!
//! Two VM boots in all: the conformance launch (its second try adopts the
//! first) and the drill's instance. common::libvirt starts virtlogd and
//! libvirtd when they are not running and stops the ones it started; the
//! tests skip without root or libvirt (and fail under CI).

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Env;
use common::libvirt::{Libvirtd, guest};
use ferry_connectors::libvirt::Connection;
use ferry_orchestrator::step::Ctx;
use ferry_orchestrator::targets::libvirt::LibvirtTarget;
use ferry_orchestrator::targets::{
    DiskFormat, InstanceLaunch, NetworkCreate, Placement, StepCx, Target, VolumeCreate, conformance,
};

/// A scratch directory QEMU's user can traverse (it holds the pool).
fn scratch() -> tempfile::TempDir {
    let d =
        tempfile::tempdir_in(std::env::var("FERRY_TEST_TMP").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    d
}

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Tears a run down and removes its pool even when the test fails half-way.
struct Cleanup {
    lv: Connection,
    runs: Vec<String>,
    pool: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for run in &self.runs {
            if let Err(e) = self.lv.teardown(run) {
                eprintln!("cleanup of run {run}: {e}");
            }
        }
        if let Err(e) = self.lv.remove_pool(&self.pool) {
            eprintln!("cleanup of pool {}: {e}", self.pool);
        }
    }
}

fn place(pool: &str, dir: &Path) -> Placement {
    let mut p = Placement {
        name: "kvm".into(),
        ..Default::default()
    };
    p.settings.insert("pool".into(), pool.into());
    p.settings
        .insert("path".into(), dir.display().to_string().into());
    p
}

fn run_ctx(dir: &Path, run: &str) -> Arc<Ctx> {
    Arc::new(Ctx {
        run_id: run.into(),
        work_dir: dir.to_path_buf(),
        drill: true,
        started_ms: 0,
        repo: None,
        password: None,
        secrets: Vec::new(),
    })
}

/// What libvirt holds for `run`, as `KIND NAME` lines.
fn inventory_of(lv: &Connection, run: &str) -> Vec<String> {
    let t = lv.list_tagged(run).expect("list the run's objects");
    t.domains
        .iter()
        .map(|d| format!("domain {d}"))
        .chain(t.networks.iter().map(|n| format!("network {n}")))
        .chain(t.volumes.iter().map(|(p, v)| format!("volume {p}/{v}")))
        .collect()
}

#[test]
fn the_libvirt_target_conforms_and_a_crashed_run_is_torn_down_by_its_tag() {
    let Some(_daemons) = Libvirtd::get() else {
        return;
    };
    let started = Instant::now();
    let env = scratch();
    let Some((kernel, initrd)) = guest(env.path()) else {
        return;
    };
    let lv = Connection::system();
    let run = format!("t{}-conf", std::process::id());
    let crashed = format!("t{}-crashed", std::process::id());
    let pool = format!("ferrytest-{run}");
    let pool_dir = env.path().join("pool");
    let _cleanup = Cleanup {
        lv: lv.clone(),
        runs: vec![run.clone(), crashed.clone()],
        pool: pool.clone(),
    };
    let work = tempfile::tempdir().unwrap();
    let inventory: conformance::Inventory = {
        let (lv, run) = (lv.clone(), run.clone());
        Arc::new(move || {
            let (lv, run) = (lv.clone(), run.clone());
            Box::pin(async move {
                tokio::task::spawn_blocking(move || inventory_of(&lv, &run))
                    .await
                    .unwrap()
            })
        })
    };
    let launch = InstanceLaunch {
        kernel: Some(kernel.display().to_string()),
        initrd: Some(initrd.display().to_string()),
        append: Some("ferry.mode=web".into()),
        disks: Vec::new(),
        memory_mib: 128,
        cpus: 1,
        ports: vec![80],
        links: Vec::new(),
        isolated: Some(true),
        ready: Some("ferry-guest: web ready".into()),
        ready_timeout: Duration::from_secs(180),
        image: None,
        instance_type: None,
        network: None,
        user_data: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(conformance::run(conformance::Setup {
        target: Arc::new(LibvirtTarget),
        run: run_ctx(work.path(), &run),
        place: place(&pool, &pool_dir),
        launch: Some(launch),
        inventory: Some(inventory),
        load_balancer: None,
        dns: None,
        database: None,
    }));
    assert!(
        inventory_of(&lv, &run).is_empty(),
        "the suite's undos left {:?}",
        inventory_of(&lv, &run)
    );
    eprintln!("conformance: {:?}", started.elapsed());

    // A run that made a network and a volume, then died: its tag finds both,
    // and teardown leaves nothing.
    let ctx = run_ctx(work.path(), &crashed);
    let cx = |node: &str| StepCx {
        run: ctx.clone(),
        place: Arc::new(place(&pool, &pool_dir)),
        node: node.into(),
        key: format!("{crashed}/{node}"),
    };
    rt.block_on(async {
        let t = LibvirtTarget;
        let net = t
            .networks()
            .unwrap()
            .create(
                &cx("net"),
                NetworkCreate {
                    cidr: "10.213.61.0/24".into(),
                    subnets: Vec::new(),
                    ingress: vec!["tcp/80".into()],
                },
            )
            .await
            .unwrap();
        assert_eq!(net.subnets, ["10.213.61.0/24"]);
        // A typo in a rule is caught, though libvirt does not enforce rules.
        let e = t
            .networks()
            .unwrap()
            .create(
                &cx("bad"),
                NetworkCreate {
                    cidr: "10.213.62.0/24".into(),
                    subnets: vec!["10.213.99.0/24".into()],
                    ingress: Vec::new(),
                },
            )
            .await
            .unwrap_err();
        assert!(e.message.contains("not inside"), "{}", e.message);
        let v = t
            .volumes()
            .unwrap()
            .create(
                &cx("scratch[0]"),
                VolumeCreate {
                    size_bytes: 4 << 20,
                    format: DiskFormat::Qcow2,
                },
            )
            .await
            .unwrap();
        assert!(
            v.path
                .ends_with(&format!("ferry-{crashed}_scratch.0.qcow2")),
            "{v:?}"
        );
        // Nothing of the run is readable by other users.
        let mode = std::fs::metadata(&v.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", v.path);
    });
    let left = inventory_of(&lv, &crashed);
    assert_eq!(left.len(), 2, "{left:?}");
    lv.teardown(&crashed).unwrap();
    assert!(inventory_of(&lv, &crashed).is_empty());
    assert!(lv.teardown(&crashed).unwrap().is_empty());
    eprintln!("whole test: {:?}", started.elapsed());
}

#[test]
fn a_drill_on_libvirt_restores_boots_checks_and_leaves_nothing_tagged_with_its_run() {
    let Some(_daemons) = Libvirtd::get() else {
        return;
    };
    let started = Instant::now();
    let scratch = scratch();
    let Some((kernel, initrd)) = guest(scratch.path()) else {
        return;
    };
    let env = Env::new();
    env.init();
    let home = env.path("home");
    let run = format!("lvdrill-{}", std::process::id());
    let pool = format!("ferrytest-{run}");
    let pool_dir = scratch.path().join("pool");
    let lv = Connection::system();
    let _cleanup = Cleanup {
        lv: lv.clone(),
        runs: vec![run.clone()],
        pool: pool.clone(),
    };

    // The source: a guest's data disk (ext4 with the page it serves), backed
    // up, then lost.
    let marker = format!("restored by drill {run}");
    let www = env.path("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("index.html"), format!("<p>{marker}</p>\n")).unwrap();
    let disk = env.path("web-data.img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&www)
        .arg(&disk)
        .arg("16M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.backup("web", &[&disk]);
    std::fs::remove_file(&disk).unwrap();

    let rb = env.path("drill.yaml");
    std::fs::write(
        &rb,
        format!(
            r#"
version: 1
name: libvirt-drill
objectives: {{ rto: 10m }}
targets:
  kvm: {{ type: libvirt, pool: {pool}, path: {pool_dir} }}
steps:
  - id: net
    uses: network.create
    with: {{ cidr: 10.213.63.0/24, ingress: ["tcp/80"] }}
  - id: data
    uses: volume.restore
    with: {{ point: web@latest }}
  - id: web
    uses: instance.launch
    needs: [net, data]
    with:
      kernel: {kernel}
      initrd: {initrd}
      append: ferry.mode=web
      disks: ["${{{{ steps.data.outputs.path }}}}"]
      network: ${{{{ steps.net.outputs.id }}}}
      memory: 128
      ports: [80]
      ready: "ferry-guest: web ready"
    timeout: 5m
  - id: page
    uses: check.http
    needs: web
    with: {{ url: "http://${{{{ steps.web.outputs.addr }}}}/", contains: "{marker}", deadline: 1m }}
  - id: port
    uses: check.tcp
    needs: web
    with: {{ address: "${{{{ steps.web.outputs.addr }}}}", deadline: 1m }}
"#,
            pool_dir = pool_dir.display(),
            kernel = kernel.display(),
            initrd = initrd.display(),
        ),
    )
    .unwrap();
    let rb = rb.display().to_string();
    let out = env
        .cmd()
        .env("FERRY_HOME", &home)
        .env_remove("FERRY_STATE")
        .args(["--json", "drill", &rb, "--target", "kvm", "--id", &run])
        .output()
        .unwrap();
    let rep: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", common::stderr(&out)));
    assert!(
        out.status.success(),
        "drill failed: {rep:#}\n{}",
        common::stderr(&out)
    );
    assert_eq!(rep["status"], "succeeded", "{rep:#}");
    assert_eq!(rep["checks_passed"], 2, "{rep:#}");
    assert_eq!(rep["checks_failed"], 0, "{rep:#}");
    assert!(rep["left_behind"].as_array().unwrap().is_empty(), "{rep:#}");
    assert_eq!(rep["rto_met"], true, "{rep:#}");
    eprintln!("drill: {:?}", started.elapsed());

    // Nothing tagged with the run is left in libvirt, nor in the pool's directory.
    let prefix = format!("ferry-{run}_");
    assert!(
        lv.list_tagged(&run).unwrap().is_empty(),
        "{:?}",
        lv.list_tagged(&run)
    );
    let domains = virsh(&["list", "--all", "--name"]);
    assert!(!domains.contains(&prefix), "{domains}");
    let nets = virsh(&["net-list", "--all", "--name"]);
    assert!(!nets.contains(&prefix), "{nets}");
    let vols = virsh(&["vol-list", "--pool", &pool]);
    assert!(!vols.contains(&prefix), "{vols}");
    let files: Vec<_> = std::fs::read_dir(&pool_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(files.is_empty(), "{files:?}");
    // The drill proved the point.
    let verified: serde_json::Value = serde_json::from_slice(
        &env.cmd()
            .env("FERRY_HOME", &home)
            .args(["--json", "verified"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(verified[0]["source"], "web", "{verified}");
}
