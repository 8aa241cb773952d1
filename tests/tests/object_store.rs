//! Repositories in object storage, against real servers on loopback: moto (S3
//! with versioning and Object Lock) and Azurite (Azure Blob). Includes the
//! ransomware test: an attacker holding the repository's credentials (and its
//! password) tries to destroy the recovery points; every one still restores.

mod common;

use common::servers::{Azurite, Moto};
use common::{
    Env, Reaped, make_image, random_image, run_child, same_content, scatter_writes, stderr, utc_now,
};

const MIB: u64 = 1 << 20;

fn points(env: &Env) -> Vec<serde_json::Value> {
    env.json(&["points"]).as_array().expect("array").clone()
}

#[test]
fn s3_repository_round_trip_with_requests_and_stats() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("ferry-plain", false);
    let env = Env::at("s3://ferry-plain/dr/site-a", moto.env());
    let disk = env.path("disk.img");
    make_image(&disk, 24 * MIB, 11);

    env.ok(&["init"]);
    // Everything lands under the prefix, nothing beside it.
    let keys = moto.python("print(json.dumps([o['Key'] for o in s3.list_objects_v2(Bucket='ferry-plain').get('Contents', [])]))");
    let keys: Vec<String> = serde_json::from_str(&keys).unwrap();
    assert!(keys.iter().all(|k| k.starts_with("dr/site-a/")), "{keys:?}");
    assert!(keys.iter().any(|k| k == "dr/site-a/config"), "{keys:?}");

    let full = env.backup("vm", &[&disk]);
    let req = &full["requests"];
    assert!(req["puts"].as_u64().unwrap() >= 3, "{req}");
    assert!(req["bytes_up"].as_u64().unwrap() > 4 * MIB, "{req}");
    scatter_writes(&disk, 20, 5);
    let incr = env.backup("vm", &[&disk]);
    assert!(
        incr["requests"]["bytes_up"].as_u64().unwrap()
            < full["requests"]["bytes_up"].as_u64().unwrap() / 4,
        "an incremental uploads far less than the full: {incr}"
    );

    let out = env.path("restored.img");
    let r = env.json(&["restore", "vm@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&disk, &out));
    assert!(r["requests"]["gets"].as_u64().unwrap() > 0);
    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");

    let stats = env.json(&["stats"]);
    assert_eq!(stats["points"], 2);
    assert_eq!(stats["logical_bytes"], 2 * 24 * MIB);
    let stored = stats["pack_bytes"].as_u64().unwrap();
    assert!(stored > 0 && stored < 24 * MIB, "{stats}");
    assert!(stats["monthly_storage_cost"].as_f64().unwrap() > 0.0);
    let packs = stats["objects"]["packs"][0].as_u64().unwrap();
    // Large packs (128 MiB in object storage): a handful of objects, not one per chunk.
    assert!(packs <= 4, "{stats}");

    // A price table the user edits changes the estimate.
    let prices = env.path("prices.json");
    let mut table: serde_json::Value =
        serde_json::from_str(&env.ok(&["stats", "--print-prices"])).unwrap();
    table["storage_gb_month"]["default"] = serde_json::json!(0.046);
    std::fs::write(&prices, table.to_string()).unwrap();
    let doubled = env.json(&["stats", "--prices", prices.to_str().unwrap()]);
    let ratio = doubled["monthly_storage_cost"].as_f64().unwrap()
        / stats["monthly_storage_cost"].as_f64().unwrap();
    assert!((ratio - 2.0).abs() < 0.05, "{ratio}");
    std::fs::write(&prices, "{\"name\": 3}").unwrap();
    let bad = env.run(&["stats", "--prices", prices.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("price table"), "{}", stderr(&bad));
}

#[test]
fn object_storage_gets_large_packs_built_in_files_and_sent_in_parts() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("ferry-large", false);
    let env = Env::at("s3://ferry-large/repo", moto.env());
    // 36 MiB of random data (a quarter of the segments), text, zeros, holes.
    let disk = env.path("disk.img");
    make_image(&disk, 144 * MIB, 17);
    let spill = env.path("spill");
    std::fs::create_dir(&spill).unwrap();

    // Object storage gets 128 MiB packs unless told otherwise.
    let config = env.json(&["init"]);
    assert_eq!(config["pack_size"], 128 * MIB, "{config}");

    let o = env
        .cmd()
        .env("FERRY_SPILL_DIR", &spill)
        .args(["--json", "backup", "--source", "vm", disk.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let full: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(full["packs_written"], 1, "{full}");
    // One pack of over two 16 MiB parts: opened, three parts, completed; then
    // the index and the point (and the lock).
    let puts = full["requests"]["puts"].as_u64().unwrap();
    assert!(puts >= 7, "{full}");
    // The pack's file was unnamed: nothing is left behind.
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0);
    let packs = moto.python(
        "print(json.dumps([o['Size'] for o in s3.list_objects_v2(Bucket='ferry-large', Prefix='repo/packs/').get('Contents', [])]))",
    );
    let packs: Vec<u64> = serde_json::from_str(&packs).unwrap();
    assert_eq!(packs.len(), 1, "{packs:?}");
    assert!(packs[0] > 32 * MIB, "{packs:?}");

    let out = env.path("restored.img");
    env.json(&["restore", "vm@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&disk, &out));
    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");

    // A spill directory that is not there (a minimal guest has no /var/tmp):
    // packs are built in memory, with a warning naming the directory.
    let other = env.path("other.img");
    make_image(&other, 80 * MIB, 19);
    let o = env
        .cmd()
        .env("FERRY_SPILL_DIR", "/nonexistent/ferry-spill")
        .args(["backup", "--source", "other", other.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/ferry-spill"),
        "{}",
        stderr(&o)
    );
    let out = env.path("other-restored.img");
    env.json(&["restore", "other@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&other, &out));
}

#[test]
fn unreachable_endpoint_and_missing_bucket_are_clear_errors() {
    let Some(moto) = Moto::start() else { return };
    let mut vars = moto.env();
    // Nothing listens on port 9 of loopback.
    for (k, v) in vars.iter_mut() {
        if k == "AWS_ENDPOINT_URL" {
            *v = "http://127.0.0.1:9".into();
        }
    }
    vars.push(("FERRY_STORE_ATTEMPTS".into(), "2".into()));
    let env = Env::at("s3://nowhere-bucket/x", vars);
    let out = env.run(&["points"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    // It names what it could not reach (the repository and the endpoint), and
    // what to do next.
    assert!(err.contains("s3://nowhere-bucket/x"), "{err}");
    assert!(err.contains("127.0.0.1:9"), "{err}");
    assert!(err.contains("check the endpoint"), "{err}");
    assert!(err.contains("after 2 tries"), "{err}");
    assert!(!err.contains("testing"), "credentials leak: {err}");

    let env = Env::at("s3://no-such-bucket/x", moto.env());
    let out = env.run(&["init"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("no-such-bucket") || stderr(&out).contains("NoSuchBucket"),
        "{}",
        stderr(&out)
    );
}

/// A repository with Object Lock gets large packs too: each goes up as a
/// multipart upload started with the retention, so it is locked from the
/// moment it appears, and no upload is left open.
#[test]
fn locked_large_packs_go_up_in_parts_with_their_retention() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("ferry-locked-large", true);
    let env = Env::at("s3://ferry-locked-large/r", moto.env());
    let disk = env.path("disk.img");
    make_image(&disk, 144 * MIB, 23);
    let config = env.json(&["init", "--object-lock", "governance", "--lock-days", "3"]);
    assert_eq!(config["pack_size"], 128 * MIB, "{config}");
    let full = env.backup("vm", &[&disk]);
    assert_eq!(full["packs_written"], 1, "{full}");
    assert!(full["requests"]["puts"].as_u64().unwrap() >= 7, "{full}");

    let found = moto.python(
        r#"
        import datetime
        now = datetime.datetime.now(datetime.timezone.utc)
        out = []
        for o in s3.list_objects_v2(Bucket='ferry-locked-large', Prefix='r/packs/')['Contents']:
            h = s3.head_object(Bucket='ferry-locked-large', Key=o['Key'])
            days = (h['ObjectLockRetainUntilDate'] - now).total_seconds() / 86400
            out.append([o['Size'], h.get('ObjectLockMode'), round(days, 2)])
        open_uploads = len(s3.list_multipart_uploads(Bucket='ferry-locked-large').get('Uploads', []))
        print(json.dumps({'packs': out, 'open_uploads': open_uploads}))
        "#,
    );
    let found: serde_json::Value = serde_json::from_str(&found).unwrap();
    let packs = found["packs"].as_array().unwrap();
    assert_eq!(packs.len(), 1, "{found}");
    assert!(packs[0][0].as_u64().unwrap() > 32 * MIB, "{found}");
    assert_eq!(packs[0][1], "GOVERNANCE", "{found}");
    let days = packs[0][2].as_f64().unwrap();
    assert!((2.9..=3.01).contains(&days), "{found}");
    assert_eq!(found["open_uploads"], 0, "{found}");

    let out = env.path("restored.img");
    env.json(&["restore", "vm@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&disk, &out));
    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
}

#[test]
fn object_lock_needs_a_lock_enabled_bucket() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("no-lock", false);
    let env = Env::at("s3://no-lock/r", moto.env());
    let out = env.run(&["init", "--object-lock", "compliance"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Object Lock"), "{}", stderr(&out));
    // Nothing was written.
    let keys = moto.python("print(s3.list_objects_v2(Bucket='no-lock').get('KeyCount', 0))");
    assert_eq!(keys.trim(), "0");
}

/// The attack: someone holding the agent's S3 credentials and the repository
/// password runs forget and prune, deletes every object, deletes specific
/// versions, and overwrites packs, points and the config with garbage.
#[test]
fn immutable_points_survive_an_attacker_with_the_credentials() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("ferry-locked", true);
    let env = Env::at("s3://ferry-locked/prod", moto.env());
    let disk = env.path("disk.img");
    make_image(&disk, 20 * MIB, 21);
    let out = env.ok(&["init", "--object-lock", "compliance", "--lock-days", "2"]);
    assert!(out.contains("COMPLIANCE"), "{out}");
    env.backup("db", &[&disk]);
    let first = env.path("first.img");
    std::fs::copy(&disk, &first).unwrap();
    scatter_writes(&disk, 30, 9);
    env.backup("db", &[&disk]);
    let before = points(&env);
    assert_eq!(before.len(), 2);

    // Every object Ferry wrote carries the retention (locks are not kept).
    let heads = moto.python(
        r#"
        out = {}
        for o in s3.list_objects_v2(Bucket='ferry-locked', Prefix='prod/')['Contents']:
            h = s3.head_object(Bucket='ferry-locked', Key=o['Key'])
            out[o['Key']] = [h.get('ObjectLockMode'), str(h.get('ObjectLockRetainUntilDate'))]
        print(json.dumps(out))
        "#,
    );
    let heads: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&heads).unwrap();
    assert!(heads.keys().any(|k| k.starts_with("prod/packs/")));
    for (k, v) in &heads {
        assert!(!k.starts_with("prod/locks/"), "a lock was left behind: {k}");
        assert_eq!(v[0], "COMPLIANCE", "{k} is not locked: {v}");
    }

    // A pack written long ago that today's points still use must not fall out
    // of its lock: prune extends retentions that have less than half a period left.
    let pack = heads
        .keys()
        .find(|k| k.starts_with("prod/packs/"))
        .unwrap()
        .clone();
    moto.python_args(
        r#"
        import datetime
        until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        s3.put_object_retention(Bucket='ferry-locked', Key=sys.argv[1],
            Retention={'Mode': 'COMPLIANCE', 'RetainUntilDate': until})
        "#,
        &[&pack],
    );
    let p = env.json(&["prune"]);
    assert!(p["extended"].as_u64().unwrap() >= 1, "{p}");
    let hours_left = moto.python_args(
        r#"
        import datetime
        h = s3.head_object(Bucket='ferry-locked', Key=sys.argv[1])
        left = h['ObjectLockRetainUntilDate'] - datetime.datetime.now(datetime.timezone.utc)
        print(int(left.total_seconds() // 3600))
        "#,
        &[&pack],
    );
    assert!(
        hours_left.trim().parse::<i64>().unwrap() >= 47,
        "retention not extended: {hours_left}"
    );

    // 1. With Ferry itself: forget everything but the newest, and prune.
    let f = env.json(&["forget", "--keep-last", "1"]);
    assert_eq!(f["removed"], 0, "{f}");
    assert_eq!(f["locked"], 1, "{f}");
    let p = env.json(&["prune"]);
    assert_eq!(p["deleted_packs"], 0, "{p}");
    assert_eq!(points(&env).len(), 2, "a locked point was forgotten");

    // 2. Raw API: delete specific versions (refused), then hide everything
    //    behind delete markers and overwrite packs, points and config.
    let refused = moto.python(
        r#"
        refused = 0
        for v in s3.list_object_versions(Bucket='ferry-locked', Prefix='prod/').get('Versions', []):
            if v['Key'].startswith('prod/locks/'):
                continue
            try:
                s3.delete_object(Bucket='ferry-locked', Key=v['Key'], VersionId=v['VersionId'])
            except Exception as e:
                refused += 1
        keys = [o['Key'] for o in s3.list_objects_v2(Bucket='ferry-locked', Prefix='prod/')['Contents']]
        for k in keys:
            if '/packs/' in k or '/points/' in k or k.endswith('/config'):
                s3.put_object(Bucket='ferry-locked', Key=k, Body=b'encrypted by ransomware')
            else:
                s3.delete_object(Bucket='ferry-locked', Key=k)
        print(refused)
        "#,
    );
    assert!(refused.trim().parse::<u32>().unwrap() >= 5, "{refused}");
    let gone = env.run(&["points"]);
    assert_ne!(
        gone.status.code(),
        Some(0),
        "the attack did not even hide the data"
    );

    // 3. Recovery: put back the original versions, then every point restores.
    let u = env.json(&["undelete"]);
    assert!(u["restored"].as_array().unwrap().len() >= 5, "{u}");
    assert_eq!(u["lost"].as_array().unwrap().len(), 0, "{u}");
    let after = points(&env);
    assert_eq!(after.len(), 2);
    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    let ids: Vec<&str> = before.iter().map(|p| p["id"].as_str().unwrap()).collect();
    for (id, want) in ids.iter().zip([&first, &disk]) {
        let out = env.path(&format!("r-{id}.img"));
        env.ok(&["restore", id, "--to", out.to_str().unwrap()]);
        assert!(same_content(want, &out), "point {id} does not restore");
    }
}

#[test]
fn azure_blob_repository_round_trip() {
    let Some(az) = Azurite::start() else { return };
    az.create_container("ferry");
    let env = Env::at("az://ferry/backups", az.env());
    let disk = env.path("disk.img");
    make_image(&disk, 12 * MIB, 31);
    env.ok(&["init"]);
    env.backup("vm", &[&disk]);
    scatter_writes(&disk, 10, 3);
    env.backup("vm", &[&disk]);
    let out = env.path("restored.img");
    env.ok(&["restore", "vm@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&disk, &out));
    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    let names = az.python(
        "print(json.dumps([b.name for b in service.get_container_client('ferry').list_blobs()]))",
    );
    assert!(names.contains("backups/config"), "{names}");
}

/// Packs only older points use move to a colder class; recent points stay hot,
/// and reading an archived pack says what it needs.
#[test]
fn older_packs_move_to_colder_storage_classes() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("ferry-tiers", false);
    let env = Env::at("s3://ferry-tiers/r", moto.env());
    let disk = env.path("disk.img");
    make_image(&disk, 16 * MIB, 51);
    env.ok(&["init"]);
    let old = env.backup("vm", &[&disk])["point"]
        .as_str()
        .unwrap()
        .to_string();
    let old_image = env.path("old.img");
    std::fs::copy(&disk, &old_image).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let cutoff = utc_now();
    std::thread::sleep(std::time::Duration::from_secs(2));
    make_image(&disk, 16 * MIB, 52); // all new data: the new point shares no pack
    env.backup("vm", &[&disk]);

    let dry = env.json(&[
        "tier",
        "--before",
        &cutoff,
        "--class",
        "GLACIER",
        "--dry-run",
    ]);
    assert!(dry["packs"].as_u64().unwrap() >= 1, "{dry}");
    let moved = env.json(&["tier", "--before", &cutoff, "--class", "GLACIER"]);
    assert_eq!(moved["packs"], dry["packs"], "{moved}");
    let classes = moto.storage_classes("ferry-tiers", "r/packs/");
    let cold = classes.values().filter(|c| *c == "GLACIER").count();
    assert_eq!(cold as u64, moved["packs"].as_u64().unwrap(), "{classes:?}");
    assert!(
        classes.values().any(|c| *c == "STANDARD"),
        "recent packs must stay hot: {classes:?}"
    );

    // The recent point restores; the old one explains what its packs need.
    let out = env.path("new.img");
    env.ok(&["restore", "vm@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&disk, &out));
    let out = env.path("old-restored.img");
    let r = env.run(&["restore", &old, "--to", out.to_str().unwrap()]);
    assert_ne!(r.status.code(), Some(0));
    let err = stderr(&r);
    assert!(
        err.contains("archive storage class") && err.contains("restore-object"),
        "{err}"
    );
    assert!(
        !out.exists(),
        "an unverified image was left under the final name"
    );
    let bad = env.run(&["tier", "--older-than", "3s", "--class", "glacier"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// Prune under Object Lock: what is still locked stays, and a prune after the
/// retention ran out removes it. (moto lets a test shorten a COMPLIANCE
/// retention, which AWS would refuse; that stands in for waiting days.)
#[test]
fn prune_leaves_locked_objects_and_a_later_prune_removes_them() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("ferry-gc-locked", true);
    let env = Env::at("s3://ferry-gc-locked/r", moto.env());
    let a = env.path("a.img");
    let b = env.path("b.img");
    make_image(&a, 12 * MIB, 61);
    make_image(&b, 12 * MIB, 62);
    env.ok(&["init", "--object-lock", "compliance", "--lock-days", "1"]);
    let pa = env.backup("a", &[&a])["point"]
        .as_str()
        .unwrap()
        .to_string();
    env.backup("b", &[&b]);
    let expire = |prefix: &str| {
        moto.python_args(
            r#"
            import datetime
            until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
            for o in s3.list_objects_v2(Bucket='ferry-gc-locked', Prefix=sys.argv[1]).get('Contents', []):
                s3.put_object_retention(Bucket='ferry-gc-locked', Key=o['Key'],
                    Retention={'Mode': 'COMPLIANCE', 'RetainUntilDate': until})
            "#,
            &[prefix],
        );
        std::thread::sleep(std::time::Duration::from_secs(3));
    };
    // The point is locked: forget keeps it and says so.
    let f = env.json(&["forget", &pa]);
    assert_eq!(f["locked"], 1, "{f}");
    expire(&format!("r/points/{pa}"));
    let f = env.json(&["forget", &pa]);
    assert_eq!(f["removed"], 1, "{f}");

    // Its packs are condemned but locked: left, and the record kept.
    let p = env.json(&["prune"]);
    assert!(p["condemned_packs"].as_u64().unwrap() >= 1, "{p}");
    assert_eq!(p["deleted_packs"], 0, "{p}");
    assert!(p["locked_packs"].as_u64().unwrap() >= 1, "{p}");
    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["ok"], true, "{c}");

    // Once their retention has run out, the next prune deletes them, and the
    // index objects the first prune replaced.
    expire("r/index/");
    expire("r/packs/");
    let p = env.json(&["prune"]);
    assert!(p["deleted_packs"].as_u64().unwrap() >= 1, "{p}");
    assert_eq!(p["locked_packs"], 0, "{p}");
    let trash = moto.python(
        "print(s3.list_objects_v2(Bucket='ferry-gc-locked', Prefix='r/trash/').get('KeyCount', 0))",
    );
    assert_eq!(trash.trim(), "0");
    let c = env.json(&["check", "--read-data"]);
    assert_eq!(c["ok"], true, "{c}");
    let out = env.path("b-restored.img");
    env.ok(&["restore", "b@latest", "--to", out.to_str().unwrap()]);
    assert!(same_content(&b, &out));
}

/// Issue 13 item 19: on a versioned bucket, an attacker with write access (and
/// no password) overwrites a pack and hides a point behind a delete marker.
/// Restore and check read the original versions with the same credentials,
/// say so naming the object and the version, and leave the bucket to `undelete`.
#[test]
fn restore_and_check_read_through_overwrites_and_delete_markers() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("ferry-versioned", false);
    moto.python(
        "s3.put_bucket_versioning(Bucket='ferry-versioned', VersioningConfiguration={'Status': 'Enabled'})",
    );
    let env = Env::at("s3://ferry-versioned/r", moto.env());
    env.init();
    let disk = env.path("disk.img");
    make_image(&disk, 12 * MIB, 7);
    let first = env.backup("db", &[&disk]);
    let first_id = first["point"].as_str().unwrap().to_string();
    let first_copy = env.path("first.img");
    std::fs::copy(&disk, &first_copy).unwrap();
    scatter_writes(&disk, 20, 3);
    env.backup("db", &[&disk]);

    // The attacker's own writes: every pack overwritten, the first point deleted.
    let attacked = moto.python_args(
        r#"
        keys = [o['Key'] for o in s3.list_objects_v2(Bucket='ferry-versioned', Prefix='r/packs/')['Contents']]
        for k in keys:
            s3.put_object(Bucket='ferry-versioned', Key=k, Body=b'encrypted by ransomware' * 1000)
        s3.delete_object(Bucket='ferry-versioned', Key='r/points/' + sys.argv[1])
        print(keys[0][len('r/'):])
        "#,
        &[&first_id],
    );
    let pack = attacked.trim().to_string();

    let out = env.path("restored.img");
    let r = env.run(&["restore", &first_id, "--to", out.to_str().unwrap()]);
    let err = stderr(&r);
    assert!(r.status.success(), "restore failed: {err}");
    assert!(same_content(&first_copy, &out), "the restored disk differs");
    let point_name = format!("points/{first_id}");
    assert!(
        err.contains(&point_name) && err.contains("delete marker"),
        "restore did not say it read a hidden point: {err}"
    );

    let c = env.run(&["--json", "check", "--read-data"]);
    let cerr = stderr(&c);
    let report: serde_json::Value = serde_json::from_slice(&c.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}\n{cerr}");
    assert_eq!(report["points"], 2, "{report}");
    assert!(
        cerr.contains(&pack) && cerr.contains("original version"),
        "check did not name the overwritten pack: {cerr}"
    );
    // The bucket itself is unchanged: repairing it is `undelete`'s job.
    let current = moto.python_args(
        "print(s3.get_object(Bucket='ferry-versioned', Key='r/' + sys.argv[1])['Body'].read()[:9].decode())",
        &[&pack],
    );
    assert_eq!(current.trim(), "encrypted");
    let u = env.json(&["undelete"]);
    assert!(u["restored"].as_array().unwrap().len() >= 2, "{u}");
}

/// Every upload in parts open in `bucket`, as (key, bytes of its parts).
fn open_uploads(moto: &Moto, bucket: &str) -> Vec<(String, u64)> {
    let out = moto.python_args(
        r#"
        out = []
        for u in s3.list_multipart_uploads(Bucket=sys.argv[1]).get('Uploads', []):
            parts = s3.list_parts(Bucket=sys.argv[1], Key=u['Key'], UploadId=u['UploadId']).get('Parts', [])
            out.append([u['Key'], sum(p['Size'] for p in parts)])
        print(json.dumps(sorted(out)))
        "#,
        &[bucket],
    );
    serde_json::from_str(&out).expect("a JSON list of uploads")
}

/// A backup killed mid-upload leaves an upload in parts open, whose parts S3
/// keeps (and bills) until someone aborts it. Prune leaves it while it could
/// still be a live writer's, aborts it once it is abandoned, reports its
/// bytes, and never touches another program's uploads in the same bucket.
#[test]
fn prune_aborts_the_uploads_a_killed_backup_left_open() {
    let Some(moto) = Moto::start() else { return };
    let bucket = "ferry-unfinished";
    moto.create_bucket(bucket, false);
    let env = Env::at(&format!("s3://{bucket}/repo"), moto.env());
    env.init();
    // Another program's uploads: one beside the repository, one under its
    // prefix with a name no repository writes.
    moto.python_args(
        r#"
        for key in ['other-app/big.bin', 'repo/notes/draft']:
            u = s3.create_multipart_upload(Bucket=sys.argv[1], Key=key)
            s3.upload_part(Bucket=sys.argv[1], Key=key, UploadId=u['UploadId'],
                           PartNumber=1, Body=b'x' * 1024)
        "#,
        &[bucket],
    );
    let others = vec![
        ("other-app/big.bin".to_string(), 1024),
        ("repo/notes/draft".to_string(), 1024),
    ];

    // 96 MiB of random data: one pack, sent in six 16 MiB parts. Kill the
    // backup once a part has landed.
    let disk = env.path("disk.img");
    random_image(&disk, 96 * MIB, 23);
    let spill = env.path("spill");
    std::fs::create_dir(&spill).unwrap();
    let mut backup = Reaped(
        env.cmd()
            .env("FERRY_SPILL_DIR", &spill)
            .args(["backup", "--source", "vm", disk.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let seen = moto.python_args(
        r#"
        import time
        deadline = time.time() + 300
        while time.time() < deadline:
            for u in s3.list_multipart_uploads(Bucket=sys.argv[1], Prefix='repo/packs/').get('Uploads', []):
                if s3.list_parts(Bucket=sys.argv[1], Key=u['Key'], UploadId=u['UploadId']).get('Parts'):
                    print(u['Key'])
                    sys.exit(0)
            time.sleep(0.02)
        print('none')
        "#,
        &[bucket],
    );
    backup.0.kill().unwrap();
    let status = backup.0.wait().unwrap();
    assert!(
        seen.trim().starts_with("repo/packs/"),
        "no upload of a pack was seen with a part (backup: {status}): {seen}"
    );
    // Parts the killed process had sent settle.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let all = open_uploads(&moto, bucket);
    let killed: Vec<(String, u64)> = all
        .iter()
        .filter(|(k, _)| k.starts_with("repo/packs/"))
        .cloned()
        .collect();
    assert!(!killed.is_empty(), "{all:?}");
    assert_eq!(all.len(), killed.len() + others.len(), "{all:?}");

    // The library's prune, in a child process that has moto's credentials in
    // its environment: while another operation holds a live lock, the upload
    // could be its writer's and stays; once none does and half an hour has
    // passed, it is aborted. (moto dates every upload 2010-11-10, before the
    // repository existed: prune does not believe such a time and goes by the
    // locks alone; on AWS the age decides.)
    let out = run_child("child_prune_while_locked_and_after", |c| moto.apply(c));
    let report = |tag: &str| -> serde_json::Value {
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} in {out}"));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{tag}{line}: {e}"))
    };
    let bytes: u64 = killed.iter().map(|(_, b)| b).sum();
    let locked = report("LOCKED ");
    assert_eq!(locked["unfinished_writes"], 0, "{locked}");
    assert_eq!(report("AFTER LOCKED ")["open"], killed.len(), "{out}");
    let (dry, done) = (report("DRY "), report("DONE "));
    assert_eq!(dry["unfinished_writes"], killed.len(), "{dry}");
    assert_eq!(report("AFTER DRY ")["open"], killed.len(), "{out}");
    assert_eq!(done["unfinished_writes"], killed.len(), "{done}");
    // The parts' bytes, where the server's ListParts answer can be read: AWS's
    // can; moto 5.2's names its root `ListPartsResponse`, which the SDK
    // refuses, and prune then counts the upload as 0 bytes (and warns).
    for r in [&dry, &done] {
        let counted = r["unfinished_bytes"].as_u64().unwrap();
        assert!(
            counted == bytes || counted == 0,
            "{r}: {bytes} bytes in parts"
        );
    }
    assert_eq!(report("AFTER DONE ")["open"], 0, "{out}");
    // The other program's uploads are still open.
    assert_eq!(open_uploads(&moto, bucket), others);

    // The repository is whole: the next backup completes and restores.
    env.backup("vm", &[&disk]);
    let check = env.json(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    let restored = env.path("restored.img");
    env.ok(&["restore", "vm@latest", "--to", restored.to_str().unwrap()]);
    assert!(same_content(&disk, &restored));
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0);
}

#[test]
#[ignore = "run by prune_aborts_the_uploads_a_killed_backup_left_open with moto's environment"]
fn child_prune_while_locked_and_after() {
    use ferry_agent::prune::{INVALID_PACK_GRACE, PruneOptions, prune_at};
    let store = ferry_connectors::store::open("s3://ferry-unfinished/repo", false).unwrap();
    let repo = ferry_agent::Repository::open(store, b"correct horse").unwrap();
    let open = |repo: &ferry_agent::Repository| serde_json::json!({"open": repo.store().unfinished_writes().unwrap().len()});
    let print = |tag: &str, r: &ferry_agent::prune::PruneReport| {
        println!("{tag} {}", serde_json::to_string(r).unwrap());
    };
    // Each report on a line of its own (the test harness's own line ends here).
    println!();
    // A backup running elsewhere.
    let lock = ferry_agent::lock::Lock::acquire(&repo, "backup", false).unwrap();
    let r = prune_at(&repo, PruneOptions::default(), chrono::Utc::now()).unwrap();
    print("LOCKED", &r);
    println!("AFTER LOCKED {}", open(&repo));
    drop(lock);

    let later = chrono::Utc::now() + INVALID_PACK_GRACE + chrono::TimeDelta::minutes(1);
    let dry = PruneOptions {
        dry_run: true,
        ..PruneOptions::default()
    };
    print("DRY", &prune_at(&repo, dry, later).unwrap());
    println!("AFTER DRY {}", open(&repo));
    print(
        "DONE",
        &prune_at(&repo, PruneOptions::default(), later).unwrap(),
    );
    println!("AFTER DONE {}", open(&repo));
}
