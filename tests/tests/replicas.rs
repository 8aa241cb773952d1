//! Replicated repositories across three real stores: a directory, S3 (moto,
//! with Object Lock) and Azure Blob (Azurite). One replica fails or serves
//! garbage, processes are killed with SIGKILL, and every replica must end up
//! restoring every point on its own.

mod common;

use std::time::Duration;

use common::servers::{Azurite, Moto};
use common::{Env, Rng, make_image, same_content, scatter_writes, utc_now};

const MIB: u64 = 1 << 20;

struct Three {
    env: Env,
    _moto: Moto,
    _az: Azurite,
    s3: String,
    az: String,
}

/// A repository with its first replica in a directory, the second in an S3
/// bucket with Object Lock, the third in an Azure container; quorum 2.
fn three() -> Option<Three> {
    let moto = Moto::start()?;
    let az = Azurite::start()?;
    moto.create_bucket("rep-s3", true);
    az.create_container("rep-az");
    let mut vars = moto.env();
    vars.extend(az.env());
    // A replica that fails gives up after two tries, so tests stay short.
    vars.push(("FERRY_STORE_ATTEMPTS".into(), "2".into()));
    let mut env = Env::at("", vars);
    env.location = env.repo.display().to_string();
    let (s3, azl) = ("s3://rep-s3/r".to_string(), "az://rep-az/r".to_string());
    let out = env.ok(&[
        "init",
        "--replica",
        &s3,
        "--replica",
        &azl,
        "--write-quorum",
        "2",
        "--object-lock",
        "governance",
        "--lock-days",
        "1",
    ]);
    assert!(
        out.contains("3 replicas; a write succeeds when 2 hold it"),
        "{out}"
    );
    // Object Lock only where the store has it.
    assert!(
        out.contains("s3://rep-s3/r (Object Lock GOVERNANCE, 1 days)"),
        "{out}"
    );
    assert!(!out.contains("az://rep-az/r (Object Lock"), "{out}");
    Some(Three {
        env,
        _moto: moto,
        _az: az,
        s3,
        az: azl,
    })
}

/// Each replica's id, by location, as `check` reports them.
fn replica_ids(env: &Env) -> Vec<(String, String)> {
    let check = env.json_allow_fail(&["check"]);
    check["replicas"]["replicas"]
        .as_array()
        .expect("replicas in check")
        .iter()
        .map(|r| {
            (
                r["location"].as_str().expect("location").to_string(),
                r["id"].as_str().expect("id").to_string(),
            )
        })
        .collect()
}

/// Every replica alone checks clean and restores every point to `want`.
fn each_replica_restores(env: &Env, points: &[(String, std::path::PathBuf)]) {
    for (location, id) in replica_ids(env) {
        let check = env.json(&["--read-replica", &id, "check", "--read-data"]);
        assert_eq!(check["ok"], true, "replica {location} alone: {check}");
        for (point, want) in points {
            let out = env.path(&format!("alone-{id}-{}.img", &point[..8]));
            env.ok(&[
                "--read-replica",
                &id,
                "restore",
                point,
                "--to",
                out.to_str().expect("utf-8 path"),
            ]);
            assert!(
                same_content(&out, want),
                "point {point} from replica {location} alone differs"
            );
            std::fs::remove_file(&out).expect("remove");
        }
    }
}

#[test]
fn a_failing_replica_is_recorded_repaired_and_then_restores_alone() {
    let Some(t) = three() else { return };
    let env = &t.env;
    let disk = env.path("disk.img");
    make_image(&disk, 24 * MIB, 7);
    let mut points = Vec::new();

    // Azure fails every request: the quorum (directory and S3) takes the writes.
    let mut failing = Env::at(&env.location, env.vars.clone());
    failing.dir = tempfile::tempdir_in(env.dir.path()).unwrap();
    failing
        .vars
        .push(("FERRY_FAULTS".into(), "rate=1 kinds=error at=az://".into()));
    for round in 0..2 {
        if round > 0 {
            scatter_writes(&disk, 40, round);
        }
        let b = failing.backup("vm", &[&disk]);
        let snap = env.path(&format!("want-{round}.img"));
        std::fs::copy(&disk, &snap).unwrap();
        points.push((b["point"].as_str().unwrap().to_string(), snap));
    }

    // The points read back while Azure is down.
    let out = env.path("out.img");
    failing.ok(&["restore", &points[1].0, "--to", out.to_str().unwrap()]);
    assert!(same_content(&out, &points[1].1));
    std::fs::remove_file(&out).unwrap();

    // Check names the replica that is behind, with what its records list.
    let check = env.json_allow_fail(&["check"]);
    assert_eq!(check["ok"], false, "{check}");
    let states = check["replicas"]["replicas"].as_array().unwrap();
    let by = |loc: &str| {
        states
            .iter()
            .find(|r| r["location"] == loc)
            .unwrap()
            .clone()
    };
    let az = by(&t.az);
    assert!(az["missing"].as_u64().unwrap() > 0, "{az}");
    assert!(
        az["recorded"].as_u64().unwrap() >= az["missing"].as_u64().unwrap(),
        "every object Azure missed is on record: {az}"
    );
    assert!(
        check["replicas"]["records"].as_u64().unwrap() > 0,
        "{check}"
    );
    assert_eq!(by(&t.s3)["missing"], 0, "{check}");
    assert_eq!(by(&env.location)["missing"], 0, "{check}");
    let text = String::from_utf8(env.run(&["check"]).stdout).unwrap();
    assert!(text.contains(&format!("{}: BEHIND", t.az)), "{text}");

    // While Azure is down, prune refuses (it deletes from every replica).
    let prune = failing.run(&["prune"]);
    assert!(!prune.status.success());
    let err = common::stderr(&prune);
    assert!(
        err.contains("prune needs every replica") && err.contains("az://rep-az/r"),
        "{err}"
    );

    // Repair gives Azure what it lacks and removes the records.
    let rep = env.json(&["repair"]);
    let az = rep["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["location"] == t.az.as_str())
        .unwrap()
        .clone();
    assert!(az["copied"].as_u64().unwrap() > 0, "{rep}");
    assert_eq!(az["failed"], 0, "{rep}");
    assert!(rep["records_removed"].as_u64().unwrap() > 0, "{rep}");
    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    assert_eq!(check["replicas"]["records"], 0, "{check}");

    each_replica_restores(env, &points);

    // Two replicas down: the quorum cannot be met, the backup fails saying so,
    // and nothing is committed.
    // Opened through the S3 replica: any replica opens the set.
    let mut two_down = Env::at(&t.s3, env.vars.clone());
    two_down.dir = tempfile::tempdir_in(env.dir.path()).unwrap();
    // (The directory and Azure: S3's locked writes go through the AWS SDK,
    // which the fault injector does not wrap.)
    two_down.vars.push((
        "FERRY_FAULTS".into(),
        format!(
            "rate=1 kinds=error at=az://; rate=1 kinds=error at={}",
            env.location
        ),
    ));
    scatter_writes(&disk, 10, 9);
    let o = two_down.run(&["backup", "--source", "vm", disk.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(
        err.contains("cannot reach the 2 replicas the repository's write quorum needs"),
        "{err}"
    );
    let listed = env.json(&["points"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
}

#[test]
fn a_replica_serving_garbage_is_read_around_and_rewritten() {
    let Some(t) = three() else { return };
    let env = &t.env;
    let disk = env.path("disk.img");
    make_image(&disk, 16 * MIB, 11);
    let point = env.backup("vm", &[&disk])["point"]
        .as_str()
        .unwrap()
        .to_string();
    // Let the background writes land, then rot every pack of the directory
    // replica (the fastest, so the one reads go to first).
    assert_eq!(env.json(&["check"])["ok"], true);
    let packs = common::files_under(&env.repo.join("packs"));
    assert!(!packs.is_empty());
    for p in &packs {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap();
        let len = f.metadata().unwrap().len();
        let mut b = [0u8; 1];
        f.read_at(&mut b, len / 2).unwrap();
        f.write_at(&[b[0] ^ 0x5a], len / 2).unwrap();
    }
    // The restore reads around the damage, and notes it for repair.
    let out = env.path("out.img");
    env.ok(&["restore", &point, "--to", out.to_str().unwrap()]);
    assert!(same_content(&out, &disk));
    let check = env.json_allow_fail(&["check", "--read-data"]);
    assert_eq!(check["ok"], false, "{check}");
    let dir_state = check["replicas"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["location"] == env.location.as_str())
        .unwrap()
        .clone();
    assert_eq!(dir_state["damaged"], packs.len(), "{check}");
    // Repair rewrites the damaged packs from the others.
    let rep = env.json(&["repair", "--read-data"]);
    assert!(
        rep["replicas"][0]["copied"].as_u64().unwrap() >= packs.len() as u64,
        "{rep}"
    );
    assert_eq!(env.json(&["check", "--read-data"])["ok"], true);
    each_replica_restores(env, &[(point, disk.clone())]);
}

#[test]
fn kills_during_writes_and_repairs_leave_every_replica_valid() {
    let Some(t) = three() else { return };
    let env = &t.env;
    let disk = env.path("disk.img");
    make_image(&disk, 32 * MIB, 23);
    // Azure is slow, so kills land while it is behind the others.
    let mut slow = Env::at(&env.location, env.vars.clone());
    slow.dir = tempfile::tempdir_in(env.dir.path()).unwrap();
    slow.vars
        .push(("FERRY_FAULTS".into(), "put-latency=300ms at=az://".into()));
    let mut points: Vec<(String, std::path::PathBuf)> = Vec::new();
    let mut rng = Rng(0x5eed);
    for round in 0..6u64 {
        scatter_writes(&disk, 30, round + 100);
        // A backup killed at a random moment, then one that completes.
        common::kill_after(
            slow.cmd()
                .args(["backup", "--source", "vm", disk.to_str().unwrap()]),
            Duration::from_millis(100 + rng.below(1500)),
        );
        let b = slow.backup("vm", &[&disk]);
        let snap = env.path(&format!("want-{round}.img"));
        std::fs::copy(&disk, &snap).unwrap();
        points.push((b["point"].as_str().unwrap().to_string(), snap));
        // A repair killed at a random moment, every other round.
        if round % 2 == 0 {
            common::kill_after(
                env.cmd().arg("repair"),
                Duration::from_millis(50 + rng.below(800)),
            );
        }
        // Whatever was killed, the repository as a whole checks clean.
        let check = env.json_allow_fail(&["check"]);
        assert!(
            check["problems"].as_array().unwrap().is_empty()
                && check["damaged_points"].as_array().unwrap().is_empty(),
            "round {round}: {check}"
        );
    }
    let rep = env.json(&["repair"]);
    assert!(
        rep["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["failed"] == 0),
        "{rep}"
    );
    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    // The next repair has nothing to do.
    let again = env.json(&["repair", "--dry-run"]);
    assert!(
        again["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["missing"] == 0 && r["recorded"] == 0),
        "the last repair removed every record: {again}"
    );
    // The first, a middle and the last point from each replica alone.
    let pick = vec![points[0].clone(), points[3].clone(), points[5].clone()];
    each_replica_restores(env, &pick);
}

#[test]
fn tier_moves_old_packs_on_every_replica_that_has_storage_classes() {
    let Some(t) = three() else { return };
    let env = &t.env;
    let disk = env.path("disk.img");
    make_image(&disk, 8 * MIB, 31);
    let old = env.backup("vm", &[&disk])["point"]
        .as_str()
        .unwrap()
        .to_string();
    let old_image = env.path("old.img");
    std::fs::copy(&disk, &old_image).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let cutoff = utc_now();
    std::thread::sleep(Duration::from_secs(2));
    make_image(&disk, 8 * MIB, 32); // all new data: the new point shares no pack
    env.backup("vm", &[&disk]);
    assert_eq!(env.json(&["check"])["ok"], true);

    let moved = env.json(&["tier", "--before", &cutoff, "--class", "STANDARD_IA"]);
    let packs = moved["packs"].as_u64().unwrap();
    assert!(packs >= 1, "{moved}");
    let replicas = moved["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3, "{moved}");
    let of = |loc: &str| {
        replicas
            .iter()
            .find(|r| r["location"] == loc)
            .unwrap_or_else(|| panic!("no replica {loc}: {moved}"))
    };
    assert_eq!(of(&t.s3)["moved"], true, "{moved}");
    let dir = of(env.location.as_str());
    assert_eq!(dir["moved"], false, "{moved}");
    assert!(dir["why"].as_str().unwrap().contains("no storage classes"));
    // The S3 replica holds exactly the old point's packs in the new class.
    let classes = t._moto.storage_classes("rep-s3", "r/packs/");
    let cold = classes.values().filter(|c| *c == "STANDARD_IA").count() as u64;
    assert_eq!(cold, packs, "{classes:?}");
    assert!(classes.values().any(|c| *c == "STANDARD"), "{classes:?}");
    // Both points still restore from every replica, and the set is in sync.
    assert_eq!(env.json(&["check"])["ok"], true);
    each_replica_restores(
        env,
        &[(old, old_image), ("vm@latest".to_string(), disk.clone())],
    );
}
