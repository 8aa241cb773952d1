//! The example runbook (runbooks/shop.yaml, provider-neutral) drilled on
//! `--target aws` against moto, killed with SIGKILL after every event of
//! its log (every step boundary, start and end, and every undo) and
//! resumed: each drill ends as an uninterrupted one does, creates nothing
//! twice, and leaves nothing tagged with its run.
//!
//! moto's instances do not boot, so the checks that need the VMs up are
//! switched off (`verify=false`); everything the drill builds (two EBS
//! snapshots through EBS direct, an isolated VPC, an image, two instances
//! with a user data pointing the web tier at the database's address) is made
//! and torn down for real.

// Helpers here unwrap like the tests do: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod common;

use common::servers::{AWS_KEY_ID, AWS_REGION, AWS_SECRET, Moto, s3_python};
use common::*;
use std::path::Path;

/// What moto holds for a run: `(every instance ever launched, what is
/// still there)`.
fn in_moto(moto: &Moto, run: &str) -> (usize, Vec<String>) {
    let script = format!(
        r#"
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name='{AWS_REGION}',
                   aws_access_key_id='{AWS_KEY_ID}', aws_secret_access_key='{AWS_SECRET}')
f = [{{'Name': 'tag:ferry:run', 'Values': [sys.argv[2]]}}]
launched, left = 0, []
for r in ec2.describe_instances(Filters=f)['Reservations']:
    for i in r['Instances']:
        launched += 1
        if i['State']['Name'] != 'terminated':
            left.append(i['InstanceId'])
left += [s['SnapshotId'] for s in ec2.describe_snapshots(OwnerIds=['self'], Filters=f)['Snapshots']]
left += [v['VolumeId'] for v in ec2.describe_volumes(Filters=f)['Volumes']]
left += [i['ImageId'] for i in ec2.describe_images(Owners=['self'], Filters=f)['Images']]
left += [v['VpcId'] for v in ec2.describe_vpcs(Filters=f)['Vpcs']]
left += [g['GroupId'] for g in ec2.describe_security_groups(Filters=f)['SecurityGroups']]
print(json.dumps([launched, left]))
"#
    );
    let out = s3_python(&moto.endpoint, &script, &[&moto.endpoint, run]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (
        v[0].as_u64().unwrap() as usize,
        v[1].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect(),
    )
}

#[test]
fn the_example_drills_on_aws_and_resumes_after_a_kill_at_every_event() {
    let Some(moto) = Moto::start() else { return };
    let e = moto_env(&moto);
    e.init();
    for (src, seed) in [("shop-db", 1), ("shop-web", 2)] {
        let img = e.path(&format!("{src}.img"));
        make_image(&img, 6 << 20, seed);
        e.backup(src, &[&img]);
    }
    let rb = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks/shop.yaml");
    let rb = rb.to_str().unwrap();
    let drill = |id: &str, crash: Option<usize>| {
        let mut c = e.cmd();
        if let Some(n) = crash {
            c.env("FERRY_CRASH_AT_EVENT", n.to_string());
        }
        c.args([
            "--json",
            "drill",
            rb,
            "--target",
            "aws",
            "--param",
            "verify=false",
            "--id",
            id,
        ])
        .output()
        .unwrap()
    };
    // Uninterrupted first.
    let out = drill("aws-base", None);
    assert!(out.status.success(), "{}", stderr(&out));
    let base: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(base["status"], "succeeded", "{base:#}");
    assert!(
        base["left_behind"].as_array().unwrap().is_empty(),
        "{base:#}"
    );
    let (launched, left) = in_moto(&moto, "aws-base");
    assert_eq!(launched, 2, "the db and the web instance");
    assert!(left.is_empty(), "the drill left {left:?}");
    let steps = |r: &serde_json::Value| -> Vec<(String, String)> {
        r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().to_owned(),
                    s["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let mut n = 1;
    loop {
        let id = format!("aws-k{n}");
        let out = drill(&id, Some(n));
        use std::os::unix::process::ExitStatusExt;
        if out.status.signal() != Some(9) {
            // The drill ended before event n: every boundary was covered.
            assert!(out.status.success(), "{}", stderr(&out));
            assert!(n > 20, "only {n} events?");
            break;
        }
        let out = e.run(&["--json", "resume", &id]);
        assert!(
            out.status.success(),
            "resume after a kill at event {n}: {}",
            stderr(&out)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["status"], "succeeded", "kill at event {n}: {r:#}");
        assert_eq!(steps(&r), steps(&base), "kill at event {n}");
        assert!(
            r["left_behind"].as_array().unwrap().is_empty(),
            "kill at event {n}: {r:#}"
        );
        let (launched, left) = in_moto(&moto, &id);
        assert_eq!(
            launched, 2,
            "kill at event {n}: an instance was launched twice"
        );
        assert!(
            left.is_empty(),
            "kill at event {n}: the drill left {left:?}"
        );
        n += 1;
    }
}
