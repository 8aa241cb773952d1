//! The `aws` target and `ferry restore --to ebs://` against moto: EC2 and the
//! EBS direct APIs spoken by the real AWS SDK over HTTP to a local server.
//! (moto's known gaps: instances do not boot, so nothing here checks a
//! guest; TESTING.md lists the rest.)

mod common;

use common::servers::{AWS_KEY_ID, AWS_REGION, AWS_SECRET, Moto, s3_python};
use common::{Env, make_image};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs Python with `ec2` and `ebs` boto3 clients for `moto` at hand.
fn aws_python(moto: &Moto, script: &str, args: &[&str]) -> String {
    let prelude = format!(
        "kw = dict(endpoint_url='{ep}', aws_access_key_id='{AWS_KEY_ID}', aws_secret_access_key='{AWS_SECRET}', region_name='{AWS_REGION}')\n\
         ec2 = boto3.client('ec2', **kw)\n\
         ebs = boto3.client('ebs', **kw)\n",
        ep = moto.endpoint
    );
    let script: String = common_dedent(script);
    s3_python(&moto.endpoint, &format!("{prelude}{script}"), args)
}

fn common_dedent(s: &str) -> String {
    let indent = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    s.lines()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes snapshot `id` to `out` through `ListSnapshotBlocks` and
/// `GetSnapshotBlock` (boto3, not Ferry's reader), `size` bytes long.
fn read_back(moto: &Moto, id: &str, size: u64, out: &Path) {
    aws_python(
        moto,
        r#"
        snap, size, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        blocks, token = [], None
        while True:
            kw2 = dict(SnapshotId=snap)
            if token:
                kw2['NextToken'] = token
            page = ebs.list_snapshot_blocks(**kw2)
            blocks += page.get('Blocks', [])
            token = page.get('NextToken')
            if not token:
                break
        with open(path, 'wb') as f:
            f.truncate(size)
            for b in blocks:
                r = ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=b['BlockIndex'], BlockToken=b['BlockToken'])
                data = r['BlockData'].read()
                off = b['BlockIndex'] * 524288
                if off < size:
                    f.seek(off)
                    f.write(data[:size - off])
        print(len(blocks))
        "#,
        &[id, &size.to_string(), &out.display().to_string()],
    );
}

fn env_for(moto: &Moto) -> Env {
    let mut e = Env::new();
    e.vars = moto.env();
    e.vars.push((
        "FERRY_HOME".into(),
        e.dir.path().join("home").display().to_string(),
    ));
    e
}

fn nonzero_blocks(path: &Path) -> u64 {
    let data = std::fs::read(path).expect("read the image");
    data.chunks(512 * 1024)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
}

#[test]
fn restore_into_ebs_matches_the_point_byte_for_byte_and_sends_no_zero_block() {
    let Some(moto) = Moto::start() else { return };
    let e = env_for(&moto);
    e.init();
    // Random, text, zeros and a hole, 4 MiB each, then a tail that ends
    // inside a 512 KiB block.
    let img = e.path("disk.img");
    let size = (16 << 20) + 100 * 1024;
    make_image(&img, size, 7);
    let point = e.backup("web", &[&img])["point"]
        .as_str()
        .unwrap()
        .to_owned();

    let out = e.json(&["restore", &point, "--to", "ebs://"]);
    let snap = out["snapshot_id"].as_str().expect("snapshot_id").to_owned();
    assert!(snap.starts_with("snap-"), "{out}");
    let want_put = nonzero_blocks(&img);
    assert_eq!(out["blocks_put"], want_put, "{out}");
    assert_eq!(
        out["blocks_zero"],
        size.div_ceil(512 * 1024) - want_put,
        "{out}"
    );
    assert!(out["blocks_zero"].as_u64().unwrap() >= 16, "{out}");

    let back = e.path("back.img");
    read_back(&moto, &snap, size, &back);
    assert!(
        common::same_content(&img, &back),
        "the snapshot read back with GetSnapshotBlock differs from the disk"
    );
    let state = aws_python(
        &moto,
        "print(ec2.describe_snapshots(SnapshotIds=[sys.argv[1]])['Snapshots'][0]['State'])",
        &[&snap],
    );
    assert_eq!(state.trim(), "completed");

    // The same restore again answers with the same snapshot, sending nothing.
    let again = e.json(&["restore", &point, "--to", "ebs://"]);
    assert_eq!(again["snapshot_id"], snap.as_str(), "{again}");
    assert_eq!(again["already_complete"], true, "{again}");

    // A malformed target is refused before anything is made.
    let out = e.run(&["restore", &point, "--to", "ebs://?bogus=1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("unknown option `bogus`"),
        "{}",
        common::stderr(&out)
    );
}

#[test]
fn a_killed_ebs_restore_resumes_into_the_same_snapshot_without_duplicates() {
    let Some(moto) = Moto::start() else { return };
    let e = env_for(&moto);
    e.init();
    let img = e.path("big.img");
    // All random: every block is put, which takes long enough to kill.
    let size = 48u64 << 20;
    {
        let f = std::fs::File::create(&img).unwrap();
        let mut rng = common::Rng(99);
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..48 {
            rng.fill(&mut buf);
            std::os::unix::fs::FileExt::write_all_at(&f, &buf, i << 20).unwrap();
        }
    }
    let point = e.backup("db", &[&img])["point"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut child = e
        .cmd()
        .args(["--json", "restore", &point, "--to", "ebs://"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let home = e.dir.path().join("home").join("ebs");
    let journal = || -> Option<String> {
        let dir = std::fs::read_dir(&home).ok()?.flatten().next()?.path();
        std::fs::read_to_string(dir.join("ebs.journal")).ok()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let killed_after = loop {
        let puts = journal().map_or(0, |j| j.lines().filter(|l| l.starts_with("put ")).count());
        if puts >= 8 {
            child.kill().unwrap();
            child.wait().unwrap();
            break puts;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the restore ended ({status}) before it could be killed mid-upload");
        }
        assert!(Instant::now() < deadline, "the restore made no progress");
        std::thread::sleep(Duration::from_millis(5));
    };
    let text = journal().unwrap();
    let first_snap = text.split(' ').nth(2).unwrap().to_owned();
    // Never completed: on AWS it stays `pending`, from which no volume can
    // be made (moto's EC2 calls every EBS-direct snapshot `completed` at
    // once, so the journal is what shows it here).
    assert!(!text.contains("complet"), "{text}");

    let out = e.json(&["restore", &point, "--to", "ebs://"]);
    assert_eq!(out["snapshot_id"], first_snap.as_str(), "{out}");
    let resumed = out["blocks_resumed"].as_u64().unwrap();
    assert!(
        resumed >= killed_after as u64,
        "resumed {resumed} blocks, the killed try had put {killed_after}: {out}"
    );
    assert_eq!(
        out["blocks_put"].as_u64().unwrap() + resumed,
        96,
        "every block is put exactly once across both tries: {out}"
    );
    // One snapshot carries a Ferry key: the resumed try made no second one.
    let all = aws_python(
        &moto,
        "print(sum(1 for s in ec2.describe_snapshots(OwnerIds=['self'])['Snapshots'] if any(t['Key'] == 'ferry:key' for t in s.get('Tags', []))))",
        &[],
    );
    assert_eq!(all.trim(), "1", "a resumed restore made a second snapshot");
    let back = e.path("back.img");
    read_back(&moto, &first_snap, size, &back);
    assert!(common::same_content(&img, &back));
}

fn run_ctx(dir: &Path, run: &str, drill: bool) -> Arc<ferry_orchestrator::step::Ctx> {
    Arc::new(ferry_orchestrator::step::Ctx {
        run_id: run.into(),
        work_dir: dir.to_path_buf(),
        drill,
        started_ms: 0,
        repo: None,
        password: None,
        secrets: Vec::new(),
    })
}

fn place(moto: &Moto) -> ferry_orchestrator::targets::Placement {
    let mut p = ferry_orchestrator::targets::Placement {
        name: "aws".into(),
        ..Default::default()
    };
    p.settings.insert("region".into(), AWS_REGION.into());
    p.settings
        .insert("endpoint".into(), moto.endpoint.clone().into());
    p
}

#[test]
fn the_aws_target_conforms_and_a_crashed_run_is_torn_down_by_its_tag() {
    use ferry_orchestrator::targets::{InstanceLaunch, aws::AwsTarget, conformance};
    let Some(moto) = Moto::start() else { return };
    let ami = aws_python(
        &moto,
        "print(sorted(i['ImageId'] for i in ec2.describe_images(Owners=['amazon'])['Images'])[0])",
        &[],
    )
    .trim()
    .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = ferry_aws::AwsConfig {
        region: Some(AWS_REGION.into()),
        endpoint: Some(moto.endpoint.clone()),
        static_keys: Some((AWS_KEY_ID.into(), AWS_SECRET.into())),
    };
    let aws = rt.block_on(ferry_aws::Aws::connect(&cfg)).unwrap();
    let inventory: conformance::Inventory = {
        let aws = aws.clone();
        Arc::new(move || {
            let aws = aws.clone();
            Box::pin(async move {
                ferry_aws::ec2::list_run(&aws, "conformance")
                    .await
                    .expect("list the run's resources")
            })
        })
    };
    let launch = InstanceLaunch {
        kernel: None,
        initrd: None,
        append: None,
        disks: Vec::new(),
        memory_mib: 1024,
        cpus: 1,
        ports: vec![80],
        links: Vec::new(),
        isolated: Some(false),
        ready: None,
        ready_timeout: Duration::from_secs(60),
        image: Some(ami.clone()),
        instance_type: None,
        network: None,
        user_data: Some("#!/bin/sh\necho hello\n".into()),
    };
    rt.block_on(conformance::run(conformance::Setup {
        target: Arc::new(AwsTarget::with_keys(AWS_KEY_ID, AWS_SECRET)),
        run: run_ctx(dir.path(), "conformance", false),
        place: place(&moto),
        launch: Some(launch.clone()),
        inventory: Some(inventory),
    }));

    // A run that made a network, a volume and an instance, then died: its
    // tag finds all of it, and teardown leaves nothing.
    use ferry_orchestrator::targets::{NetworkCreate, StepCx, Target, VolumeCreate};
    let target = AwsTarget::with_keys(AWS_KEY_ID, AWS_SECRET);
    let run = run_ctx(dir.path(), "crashed-run", true);
    let cx = |node: &str| StepCx {
        run: run.clone(),
        place: Arc::new(place(&moto)),
        node: node.into(),
        key: format!("crashed-run/{node}"),
    };
    rt.block_on(async {
        let net = target
            .networks()
            .unwrap()
            .create(
                &cx("net"),
                NetworkCreate {
                    cidr: "10.9.0.0/16".into(),
                    subnets: Vec::new(),
                    ingress: vec!["tcp/80".into()],
                },
            )
            .await
            .unwrap();
        target
            .volumes()
            .unwrap()
            .create(
                &cx("scratch"),
                VolumeCreate {
                    size_bytes: 1 << 30,
                    format: ferry_orchestrator::targets::DiskFormat::Raw,
                },
            )
            .await
            .unwrap();
        // In a drill an instance must join a network of its own.
        let err = target
            .instances()
            .unwrap()
            .launch(&cx("vm-nowhere"), launch.clone())
            .await
            .unwrap_err();
        assert!(err.message.contains("needs `network`"), "{}", err.message);
        let mut l = launch.clone();
        l.network = Some(net.id.clone());
        let vm = target
            .instances()
            .unwrap()
            .launch(&cx("vm"), l)
            .await
            .unwrap();
        assert!(vm.name.starts_with("i-"), "{vm:?}");
        let left = ferry_aws::ec2::list_run(&aws, "crashed-run").await.unwrap();
        assert!(left.iter().any(|l| l.starts_with("instance ")), "{left:?}");
        assert!(left.iter().any(|l| l.starts_with("vpc ")), "{left:?}");
        assert!(left.iter().any(|l| l.starts_with("volume ")), "{left:?}");
        ferry_aws::ec2::teardown(&aws, "crashed-run").await.unwrap();
        let left = ferry_aws::ec2::list_run(&aws, "crashed-run").await.unwrap();
        assert!(left.is_empty(), "teardown left {left:?}");
        // Twice is fine.
        ferry_aws::ec2::teardown(&aws, "crashed-run").await.unwrap();
    });
}

#[test]
fn a_drill_on_aws_rebuilds_from_a_point_and_leaves_nothing_tagged_with_its_run() {
    let Some(moto) = Moto::start() else { return };
    let e = env_for(&moto);
    e.init();
    let img = e.path("boot.img");
    make_image(&img, 8 << 20, 3);
    e.backup("web", &[&img]);
    let rb = e.path("stack.yaml");
    std::fs::write(
        &rb,
        r#"
version: 1
name: aws-stack
targets:
  local: { type: local }
  aws: { type: aws, sizes: { t3.small: { cpus: 2, memory: 2048 }, t3.large: { cpus: 2, memory: 8192 } } }
steps:
  - id: net
    uses: network.create
    target: aws
    with: { cidr: 10.42.0.0/16, subnets: [10.42.1.0/24], ingress: ["tcp/80"] }
  - id: disk
    uses: volume.restore
    with: { point: web@latest }
  - id: vm
    uses: instance.launch
    needs: [net, disk]
    with:
      disks: ["${{ steps.disk.outputs.path }}"]
      network: ${{ steps.net.outputs.id }}
      memory: 1024
      cpus: 1
      ports: [80]
  - id: sized
    uses: check.command
    needs: vm
    with:
      run: ["sh", "-c", "case \"$0\" in i-*) exit 0;; *) exit 1;; esac", "${{ steps.vm.outputs.name }}"]
"#,
    )
    .unwrap();
    let rb = rb.display().to_string();
    // The same file validates and plans for both targets (the network step
    // names its target; the others move with --target).
    e.ok(&["validate", &rb]);
    for t in ["local", "aws"] {
        let plan = e.ok(&["plan", &rb, "--target", t]);
        assert!(plan.contains("vm"), "{plan}");
    }
    let out = e.run(&["plan", &rb, "--target", "gcp"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        common::stderr(&out).contains("no target `gcp`"),
        "{}",
        common::stderr(&out)
    );
    let out = e.run(&[
        "--json",
        "drill",
        &rb,
        "--target",
        "aws",
        "--id",
        "drill-aws-1",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success(),
        "drill failed: {}\n{report}",
        common::stderr(&out)
    );
    let left = aws_python(
        &moto,
        r#"
        run = sys.argv[1]
        f = [{'Name': 'tag:ferry:run', 'Values': [run]}]
        left = []
        for r in ec2.describe_instances(Filters=f)['Reservations']:
            left += [i['InstanceId'] for i in r['Instances'] if i['State']['Name'] != 'terminated']
        left += [s['SnapshotId'] for s in ec2.describe_snapshots(OwnerIds=['self'], Filters=f)['Snapshots']]
        left += [v['VolumeId'] for v in ec2.describe_volumes(Filters=f)['Volumes']]
        left += [i['ImageId'] for i in ec2.describe_images(Owners=['self'], Filters=f)['Images']]
        left += [v['VpcId'] for v in ec2.describe_vpcs(Filters=f)['Vpcs']]
        print(json.dumps(left))
        "#,
        &["drill-aws-1"],
    );
    assert_eq!(
        left.trim(),
        "[]",
        "the drill left resources tagged with its run"
    );
}
