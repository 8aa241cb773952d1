//! The `aws` target and `ferry restore --to ebs://` against moto: EC2, the
//! EBS direct APIs, ELBv2, Route 53 and RDS spoken by the real AWS SDK over
//! HTTP to a local server, and read back through boto3. (moto's known gaps:
//! instances do not boot, load-balancer targets are always healthy, RDS is
//! available at once; nothing here asserts on those. TESTING.md lists the
//! rest.)

mod common;

use common::servers::{AWS_KEY_ID, AWS_REGION, AWS_SECRET, Moto, s3_python};
use common::{make_image, moto_env};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs Python with `ec2` and `ebs` boto3 clients for `moto` at hand.
fn aws_python(moto: &Moto, script: &str, args: &[&str]) -> String {
    let prelude = format!(
        "kw = dict(endpoint_url='{ep}', aws_access_key_id='{AWS_KEY_ID}', aws_secret_access_key='{AWS_SECRET}', region_name='{AWS_REGION}')\n\
         ec2 = boto3.client('ec2', **kw)\n\
         ebs = boto3.client('ebs', **kw)\n\
         elb = boto3.client('elbv2', **kw)\n\
         r53 = boto3.client('route53', **kw)\n\
         rds = boto3.client('rds', **kw)\n",
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

fn nonzero_blocks(path: &Path) -> u64 {
    let data = std::fs::read(path).expect("read the image");
    data.chunks(512 * 1024)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
}

#[test]
fn restore_into_ebs_matches_the_point_byte_for_byte_and_sends_no_zero_block() {
    let Some(moto) = Moto::start() else { return };
    let e = moto_env(&moto);
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
    let e = moto_env(&moto);
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

/// What the tests need that a run does not make: an AMI, a hosted zone
/// `shop.example.` whose `www` points at the old site, and a PostgreSQL
/// instance `prod-db` with a snapshot `prod-db-nightly` to restore.
struct Fixtures {
    ami: String,
    zone_id: String,
}

fn fixtures(moto: &Moto) -> Fixtures {
    let out = aws_python(
        moto,
        r#"
        ami = sorted(i['ImageId'] for i in ec2.describe_images(Owners=['amazon'])['Images'])[0]
        zone = r53.create_hosted_zone(Name='shop.example.', CallerReference='ferry-tests')['HostedZone']['Id'].split('/')[-1]
        r53.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={'Changes': [{'Action': 'CREATE',
            'ResourceRecordSet': {'Name': 'www.shop.example.', 'Type': 'A', 'TTL': 300,
                                  'ResourceRecords': [{'Value': '198.51.100.7'}]}}]})
        rds.create_db_instance(DBInstanceIdentifier='prod-db', Engine='postgres', DBInstanceClass='db.t3.small',
                               AllocatedStorage=20, MasterUsername='shop', MasterUserPassword='not-a-secret-1',
                               BackupRetentionPeriod=7)
        rds.create_db_snapshot(DBInstanceIdentifier='prod-db', DBSnapshotIdentifier='prod-db-nightly')
        print(json.dumps({'ami': ami, 'zone': zone}))
        "#,
        &[],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("fixtures");
    Fixtures {
        ami: v["ami"].as_str().expect("an AMI").to_owned(),
        zone_id: v["zone"].as_str().expect("a zone id").to_owned(),
    }
}

/// The record sets of `www.shop.example.` and every `_ferry` marker, as
/// boto3 sees them (sorted JSON lines).
fn www_records(moto: &Moto, zone: &str) -> Vec<serde_json::Value> {
    let out = aws_python(
        moto,
        r#"
        sets = r53.list_resource_record_sets(HostedZoneId=sys.argv[1])['ResourceRecordSets']
        keep = [s for s in sets if s['Name'].startswith('www.') or s['Name'].startswith('_ferry')]
        print(json.dumps(keep))
        "#,
        &[zone],
    );
    serde_json::from_str(out.trim()).expect("record sets")
}

/// Everything tagged with run `run` that boto3 finds in EC2, ELBv2, RDS and
/// Route 53 (health checks by tag, markers by their `ferry:run=` text).
fn tagged_with(moto: &Moto, run: &str) -> String {
    aws_python(
        moto,
        r#"
        run = sys.argv[1]
        f = [{'Name': 'tag:ferry:run', 'Values': [run]}]
        def ours(tags):
            return any(t['Key'] == 'ferry:run' and t['Value'] == run for t in tags)
        left = []
        for r in ec2.describe_instances(Filters=f)['Reservations']:
            left += [i['InstanceId'] for i in r['Instances'] if i['State']['Name'] != 'terminated']
        left += [s['SnapshotId'] for s in ec2.describe_snapshots(OwnerIds=['self'], Filters=f)['Snapshots']]
        left += [v['VolumeId'] for v in ec2.describe_volumes(Filters=f)['Volumes']]
        left += [i['ImageId'] for i in ec2.describe_images(Owners=['self'], Filters=f)['Images']]
        left += [v['VpcId'] for v in ec2.describe_vpcs(Filters=f)['Vpcs']]
        arns = [l['LoadBalancerArn'] for l in elb.describe_load_balancers()['LoadBalancers']]
        arns += [t['TargetGroupArn'] for t in elb.describe_target_groups()['TargetGroups']]
        for i in range(0, len(arns), 20):
            for d in elb.describe_tags(ResourceArns=arns[i:i+20])['TagDescriptions']:
                if ours(d['Tags']):
                    left.append(d['ResourceArn'])
        for db in rds.describe_db_instances()['DBInstances']:
            if ours(rds.list_tags_for_resource(ResourceName=db['DBInstanceArn'])['TagList']):
                left.append(db['DBInstanceIdentifier'])
        for g in rds.describe_db_subnet_groups()['DBSubnetGroups']:
            if ours(rds.list_tags_for_resource(ResourceName=g['DBSubnetGroupArn'])['TagList']):
                left.append(g['DBSubnetGroupName'])
        for h in r53.list_health_checks()['HealthChecks']:
            tags = r53.list_tags_for_resource(ResourceType='healthcheck', ResourceId=h['Id'])['ResourceTagSet'].get('Tags', [])
            if ours(tags):
                left.append(h['Id'])
        for z in r53.list_hosted_zones()['HostedZones']:
            for s in r53.list_resource_record_sets(HostedZoneId=z['Id'])['ResourceRecordSets']:
                if any(('ferry:run=' + run) in r['Value'] for r in s.get('ResourceRecords', [])):
                    left.append(s['Name'])
        print(json.dumps(left))
        "#,
        &[run],
    )
    .trim()
    .to_owned()
}

#[test]
fn the_aws_target_conforms_and_a_crashed_run_is_torn_down_by_its_tag() {
    use ferry_orchestrator::targets::{
        BalancerKind, DatabaseRestore, DatabaseSource, DnsRecord, DnsTarget, Endpoint,
        InstanceLaunch, LoadBalancerCreate, aws::AwsTarget, conformance,
    };
    let Some(moto) = Moto::start() else { return };
    let fx = fixtures(&moto);
    let ami = fx.ami.clone();
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
                ferry_aws::run::list_run(&aws, "conformance")
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
    let http = |port: u16, path: Option<&str>| Endpoint {
        protocol: "http".into(),
        port,
        path: path.map(str::to_owned),
    };
    let load_balancer = LoadBalancerCreate {
        listeners: vec![http(80, None)],
        targets: Vec::new(),
        target_port: None,
        health_check: None,
        // The suite makes the network.
        network: String::new(),
        kind: BalancerKind::Alb,
        internal: true,
    };
    let dns = DnsRecord {
        zone: "shop.example".into(),
        name: "www".into(),
        kind: None,
        target: DnsTarget::Failover {
            primary: "198.51.100.7".into(),
            secondary: "192.0.2.80".into(),
            health_check: http(80, Some("/healthz")),
        },
        ttl: 60,
    };
    let database = DatabaseRestore {
        engine: "postgres".into(),
        from: DatabaseSource::Snapshot("prod-db-nightly".into()),
        instance_class: None,
        cpus: 1,
        memory_mib: 1024,
        network: None,
        port: None,
        ready_timeout: Duration::from_secs(60),
    };
    let www_before = www_records(&moto, &fx.zone_id);
    rt.block_on(conformance::run(conformance::Setup {
        target: Arc::new(AwsTarget::with_keys(AWS_KEY_ID, AWS_SECRET)),
        run: run_ctx(dir.path(), "conformance", false),
        place: place(&moto),
        launch: Some(launch.clone()),
        inventory: Some(inventory),
        load_balancer: Some(load_balancer.clone()),
        dns: Some(dns.clone()),
        database: Some(database.clone()),
    }));
    assert_eq!(
        www_records(&moto, &fx.zone_id),
        www_before,
        "the switched record is not back as it was"
    );

    // A run that made a network, a volume, an instance, a load balancer, a
    // failover pair and a database, then died: its tag finds all of it, and
    // teardown leaves nothing (and puts the switched name back).
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
                    subnets: vec!["10.9.1.0/24".into(), "10.9.2.0/24".into()],
                    ingress: vec!["tcp/80".into(), "tcp/5432".into()],
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
        let lb = target
            .load_balancers()
            .unwrap()
            .create(
                &cx("lb"),
                LoadBalancerCreate {
                    targets: vec![vm.name.clone()],
                    network: net.id.clone(),
                    ..load_balancer.clone()
                },
            )
            .await
            .unwrap();
        target
            .dns()
            .unwrap()
            .switch(
                &cx("dns"),
                DnsRecord {
                    target: DnsTarget::Failover {
                        primary: "198.51.100.7".into(),
                        secondary: lb.dns_name.clone(),
                        health_check: http(80, Some("/healthz")),
                    },
                    ..dns.clone()
                },
            )
            .await
            .unwrap();
        target
            .databases()
            .unwrap()
            .restore(
                &cx("db"),
                DatabaseRestore {
                    network: Some(net.id.clone()),
                    ..database.clone()
                },
            )
            .await
            .unwrap();
        let left = ferry_aws::run::list_run(&aws, "crashed-run").await.unwrap();
        for kind in [
            "instance ",
            "vpc ",
            "volume ",
            "loadbalancer ",
            "targetgroup ",
            "dnsrecord ",
            "healthcheck ",
            "database ",
            "dbsubnetgroup ",
        ] {
            assert!(
                left.iter().any(|l| l.starts_with(kind)),
                "no {kind}in {left:?}"
            );
        }
        assert_ne!(tagged_with(&moto, "crashed-run"), "[]");
        ferry_aws::run::teardown(&aws, "crashed-run").await.unwrap();
        let left = ferry_aws::run::list_run(&aws, "crashed-run").await.unwrap();
        assert!(left.is_empty(), "teardown left {left:?}");
        assert_eq!(
            tagged_with(&moto, "crashed-run"),
            "[]",
            "boto3 still finds resources tagged with the crashed run"
        );
        assert_eq!(
            www_records(&moto, &fx.zone_id),
            www_before,
            "teardown did not put the switched record back"
        );
        // Twice is fine.
        ferry_aws::run::teardown(&aws, "crashed-run").await.unwrap();
    });
}

/// What an operator sees in the account after each new action, read back
/// through boto3 (not Ferry's own reader), and after each undo.
#[test]
fn load_balancer_failover_record_and_restored_databases_are_what_aws_shows() {
    use ferry_orchestrator::targets::{
        BalancerKind, DatabaseRestore, DatabaseSource, DnsRecord, DnsTarget, Endpoint,
        InstanceLaunch, LoadBalancerCreate, NetworkCreate, StepCx, Target, aws::AwsTarget,
    };
    let Some(moto) = Moto::start() else { return };
    let fx = fixtures(&moto);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let target = AwsTarget::with_keys(AWS_KEY_ID, AWS_SECRET);
    let run = run_ctx(dir.path(), "stack-run", false);
    let cx = |node: &str| StepCx {
        run: run.clone(),
        place: Arc::new(place(&moto)),
        node: node.into(),
        key: format!("stack-run/{node}"),
    };
    let www_before = www_records(&moto, &fx.zone_id);
    rt.block_on(async {
        let net = target
            .networks()
            .unwrap()
            .create(
                &cx("net"),
                NetworkCreate {
                    cidr: "10.50.0.0/16".into(),
                    subnets: vec!["10.50.1.0/24".into(), "10.50.2.0/24".into()],
                    ingress: vec!["tcp/80".into(), "tcp/5432".into()],
                },
            )
            .await
            .unwrap();
        let vm = target
            .instances()
            .unwrap()
            .launch(
                &cx("web"),
                InstanceLaunch {
                    kernel: None,
                    initrd: None,
                    append: None,
                    disks: Vec::new(),
                    memory_mib: 1024,
                    cpus: 1,
                    ports: vec![80],
                    links: Vec::new(),
                    isolated: Some(true),
                    ready: None,
                    ready_timeout: Duration::from_secs(60),
                    image: Some(fx.ami.clone()),
                    instance_type: None,
                    network: Some(net.id.clone()),
                    user_data: None,
                },
            )
            .await
            .unwrap();

        // An ALB with an http listener forwarding to a target group that
        // probes /healthz and has the instance registered.
        let lb = target
            .load_balancers()
            .unwrap()
            .create(
                &cx("lb"),
                LoadBalancerCreate {
                    listeners: vec![Endpoint {
                        protocol: "http".into(),
                        port: 80,
                        path: None,
                    }],
                    targets: vec![vm.name.clone()],
                    target_port: Some(8080),
                    health_check: Some(Endpoint {
                        protocol: "http".into(),
                        port: 8080,
                        path: Some("/healthz".into()),
                    }),
                    network: net.id.clone(),
                    kind: BalancerKind::Alb,
                    internal: true,
                },
            )
            .await
            .unwrap();
        assert!(lb.addr.ends_with(":80"), "{lb:?}");
        let seen = aws_python(
            &moto,
            r#"
            lb = elb.describe_load_balancers(LoadBalancerArns=[sys.argv[1]])['LoadBalancers'][0]
            ls = elb.describe_listeners(LoadBalancerArn=lb['LoadBalancerArn'])['Listeners']
            tg = elb.describe_target_groups(TargetGroupArns=[sys.argv[2]])['TargetGroups'][0]
            th = elb.describe_target_health(TargetGroupArn=tg['TargetGroupArn'])['TargetHealthDescriptions']
            print(json.dumps({
                'type': lb['Type'], 'scheme': lb['Scheme'], 'vpc': lb['VpcId'], 'dns': lb['DNSName'],
                'zones': len(lb['AvailabilityZones']), 'groups': lb.get('SecurityGroups', []),
                'listeners': [(l['Protocol'], l['Port'], l['DefaultActions'][0]['Type'],
                               l['DefaultActions'][0]['TargetGroupArn']) for l in ls],
                'tg': [tg['Protocol'], tg['Port'], tg['HealthCheckProtocol'], tg['HealthCheckPort'],
                       tg['HealthCheckPath']],
                'targets': [(t['Target']['Id'], t['Target']['Port']) for t in th],
            }))
            "#,
            &[&lb.id, &lb.target_groups[0]],
        );
        let seen: serde_json::Value = serde_json::from_str(seen.trim()).unwrap();
        assert_eq!(seen["type"], "application", "{seen}");
        assert_eq!(seen["scheme"], "internal", "{seen}");
        assert_eq!(seen["vpc"], net.id.as_str(), "{seen}");
        assert_eq!(seen["dns"], lb.dns_name.as_str(), "{seen}");
        assert_eq!(seen["zones"], 2, "one subnet in each of two zones: {seen}");
        assert_eq!(seen["groups"], serde_json::json!([net.security_group]), "{seen}");
        assert_eq!(
            seen["listeners"],
            serde_json::json!([["HTTP", 80, "forward", lb.target_groups[0]]]),
            "{seen}"
        );
        assert_eq!(
            seen["tg"],
            serde_json::json!(["HTTP", 8080, "HTTP", "8080", "/healthz"]),
            "{seen}"
        );
        assert_eq!(seen["targets"], serde_json::json!([[vm.name, 8080]]), "{seen}");

        // `www` moves from the old site to a failover pair: the old address
        // stays primary behind a health check, the load balancer takes over
        // as secondary (an alias).
        let sw = target
            .dns()
            .unwrap()
            .switch(
                &cx("dns"),
                DnsRecord {
                    zone: "shop.example".into(),
                    name: "www".into(),
                    kind: None,
                    target: DnsTarget::Failover {
                        primary: "198.51.100.7".into(),
                        secondary: lb.dns_name.clone(),
                        health_check: Endpoint {
                            protocol: "http".into(),
                            port: 80,
                            path: Some("/healthz".into()),
                        },
                    },
                    ttl: 30,
                },
            )
            .await
            .unwrap();
        assert_eq!((sw.record.as_str(), sw.kind.as_str()), ("www.shop.example.", "A"));
        let hc = sw.health_check.clone().expect("a health check");
        let sets: Vec<serde_json::Value> = www_records(&moto, &fx.zone_id)
            .into_iter()
            .filter(|s| s["Name"] == "www.shop.example.")
            .collect();
        assert_eq!(sets.len(), 2, "the pair replaces the old plain record: {sets:?}");
        let side = |role: &str| {
            sets.iter()
                .find(|s| s["Failover"] == role)
                .unwrap_or_else(|| panic!("no {role} record in {sets:?}"))
                .clone()
        };
        let primary = side("PRIMARY");
        assert_eq!(primary["ResourceRecords"], serde_json::json!([{"Value": "198.51.100.7"}]));
        assert_eq!(primary["HealthCheckId"], hc.as_str(), "{primary}");
        let secondary = side("SECONDARY");
        assert_eq!(
            secondary["AliasTarget"]["DNSName"]
                .as_str()
                .unwrap()
                .trim_end_matches('.'),
            lb.dns_name.trim_end_matches('.'),
            "{secondary}"
        );
        let check = aws_python(
            &moto,
            "print(json.dumps(r53.get_health_check(HealthCheckId=sys.argv[1])['HealthCheck']['HealthCheckConfig']))",
            &[&hc],
        );
        let check: serde_json::Value = serde_json::from_str(check.trim()).unwrap();
        assert_eq!(check["Type"], "HTTP", "{check}");
        assert_eq!(check["IPAddress"], "198.51.100.7", "{check}");
        assert_eq!(check["ResourcePath"], "/healthz", "{check}");

        // Undo: the old record is back exactly, the pair, the marker and the
        // health check are gone.
        target.dns().unwrap().restore(&cx("dns")).await.unwrap();
        assert_eq!(www_records(&moto, &fx.zone_id), www_before);
        let checks = aws_python(&moto, "print(len(r53.list_health_checks()['HealthChecks']))", &[]);
        assert_eq!(checks.trim(), "0");

        // Databases: one from the nightly snapshot sized by cpus/memory, one
        // to the latest point in time of prod-db with a given class, both in
        // a subnet group of the network.
        let dbs = target.databases().unwrap();
        let restore = |from, class: Option<&str>| DatabaseRestore {
            engine: "postgres".into(),
            from,
            instance_class: class.map(str::to_owned),
            cpus: 2,
            memory_mib: 4096,
            network: Some(net.id.clone()),
            port: None,
            ready_timeout: Duration::from_secs(60),
        };
        let snap = dbs
            .restore(&cx("db"), restore(DatabaseSource::Snapshot("prod-db-nightly".into()), None))
            .await
            .unwrap();
        let pitr = dbs
            .restore(
                &cx("db-pitr"),
                restore(
                    DatabaseSource::PointInTime {
                        source: "prod-db".into(),
                        time: None,
                    },
                    Some("db.t3.large"),
                ),
            )
            .await
            .unwrap();
        assert!(snap.endpoint.ends_with(&format!(":{}", snap.port)), "{snap:?}");
        let seen = aws_python(
            &moto,
            r#"
            out = {}
            for id in sys.argv[1:]:
                d = rds.describe_db_instances(DBInstanceIdentifier=id)['DBInstances'][0]
                g = d['DBSubnetGroup']
                out[id] = [d['Engine'], d['DBInstanceClass'], d['DBInstanceStatus'], g['VpcId'],
                           len(g['Subnets']), d['Endpoint']['Address']]
            print(json.dumps(out))
            "#,
            &[&snap.id, &pitr.id],
        );
        let seen: serde_json::Value = serde_json::from_str(seen.trim()).unwrap();
        assert_eq!(
            seen[&snap.id],
            serde_json::json!(["postgres", "db.t3.medium", "available", net.id, 2, snap.address]),
            "{seen}"
        );
        assert_eq!(
            seen[&pitr.id],
            serde_json::json!(["postgres", "db.t3.large", "available", net.id, 2, pitr.address]),
            "{seen}"
        );
        // A restore that asks for another engine than the snapshot holds is
        // refused before anything is made.
        let err = dbs
            .restore(
                &cx("db-wrong"),
                DatabaseRestore {
                    engine: "mysql".into(),
                    ..restore(DatabaseSource::Snapshot("prod-db-nightly".into()), None)
                },
            )
            .await
            .unwrap_err();
        assert!(err.message.contains("holds a postgres database"), "{}", err.message);

        dbs.delete(&cx("db")).await.unwrap();
        dbs.delete(&cx("db-pitr")).await.unwrap();
        let left = aws_python(
            &moto,
            r#"
            print(json.dumps(sorted([d['DBInstanceIdentifier'] for d in rds.describe_db_instances()['DBInstances']]
                + [g['DBSubnetGroupName'] for g in rds.describe_db_subnet_groups()['DBSubnetGroups']])))
            "#,
            &[],
        );
        assert_eq!(left.trim(), r#"["prod-db"]"#, "the source is untouched, the copies are gone");

        target.load_balancers().unwrap().delete(&cx("lb")).await.unwrap();
        let left = aws_python(
            &moto,
            "print(len(elb.describe_load_balancers()['LoadBalancers']) + len(elb.describe_target_groups()['TargetGroups']))",
            &[],
        );
        assert_eq!(left.trim(), "0");
        target.instances().unwrap().terminate(&cx("web")).await.unwrap();
        target.networks().unwrap().delete(&cx("net")).await.unwrap();
    });
    assert_eq!(tagged_with(&moto, "stack-run"), "[]");
}

#[test]
fn a_drill_on_aws_rebuilds_from_a_point_and_leaves_nothing_tagged_with_its_run() {
    let Some(moto) = Moto::start() else { return };
    let fx = fixtures(&moto);
    let www_before = www_records(&moto, &fx.zone_id);
    let e = moto_env(&moto);
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
    with: { cidr: 10.42.0.0/16, subnets: [10.42.1.0/24, 10.42.2.0/24], ingress: ["tcp/80", "tcp/5432"] }
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
  - id: lb
    uses: loadbalancer.create
    target: aws
    needs: [net, vm]
    with:
      listeners: ["http:80"]
      network: ${{ steps.net.outputs.id }}
      targets: ["${{ steps.vm.outputs.name }}"]
      health_check: http:80/healthz
  - id: db
    uses: database.restore
    target: aws
    needs: net
    with:
      engine: postgres
      snapshot: prod-db-nightly
      network: ${{ steps.net.outputs.id }}
      memory: 2048
  - id: www
    uses: dns.switch
    target: aws
    needs: [lb, db]
    with:
      zone: shop.example
      name: www
      failover:
        primary: 198.51.100.7
        secondary: ${{ steps.lb.outputs.dns_name }}
        health_check: http:80/healthz
  - id: switched
    uses: check.command
    needs: www
    with:
      run: ["sh", "-c", "test \"$0\" = www.shop.example. && test -n \"$1\"", "${{ steps.www.outputs.record }}", "${{ steps.www.outputs.health_check }}"]
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
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["id"].as_str()).collect())
        .unwrap_or_default();
    for id in ["lb", "db", "www", "switched"] {
        assert!(
            steps.contains(&id),
            "step {id} is not in the report: {report}"
        );
    }
    assert_eq!(
        tagged_with(&moto, "drill-aws-1"),
        "[]",
        "the drill left resources tagged with its run"
    );
    assert_eq!(
        www_records(&moto, &fx.zone_id),
        www_before,
        "the drill's teardown did not put www back"
    );
}
