//! The `aws` target: the provider-neutral requests mapped onto AWS through
//! `ferry-aws`.
//!
//! | request | AWS |
//! |---|---|
//! | `volume.restore` | an EBS snapshot written through the EBS direct APIs (`path` is its id) |
//! | `volume.create` | an empty gp3 volume |
//! | `instance.launch` | an image registered from the first restored snapshot (or `image`), the others as data volumes, an instance type from `cpus`/`memory` through the `sizes` table, in the subnet and security group of `network` |
//! | `network.create` | a VPC, subnets spread over the region's zones (or all in `zone`), a security group with the ingress rules, a route table with no route out |
//! | `loadbalancer.create` | an ELBv2 load balancer (ALB for http listeners, NLB for tcp/udp; internal unless `internal: false`) in one subnet per zone of `network` with its security group, a target group per listener with the health check, the `targets` registered, a listener forwarding to it |
//! | `dns.switch` | Route 53: every record set of the name and type replaced, in one atomic change, by the values, an alias to a load balancer, or a PRIMARY/SECONDARY failover pair whose primary has a health check; a TXT marker beside it remembers what was replaced, and the undo puts that back |
//! | `database.restore` | an RDS instance restored from a DB snapshot or to a point in time of `source`, class `instance_class` or the smallest in `db_sizes` with `cpus`/`memory`, in a DB subnet group of `network` with its security groups; the undo deletes it without a final snapshot |
//!
//! Settings (`targets: {aws: {type: aws, ...}}`): `region` and `endpoint`
//! (else the SDK's chain: `AWS_REGION`, `AWS_ENDPOINT_URL`), `zone`,
//! `sizes` (`{TYPE: {cpus: N, memory: MiB}}`, replacing the built-in table),
//! `db_sizes` (`{CLASS: {cpus: N, memory: MiB}}`, the same for DB instance
//! classes) and `images` (`{FAMILY: AMI}`, for `instance.launch`'s `image`).
//! Everything made is tagged with the run and the step (DNS records, which
//! take no tags, through their marker), so an undo, a drill's teardown, or
//! `ferry_aws::run::teardown` after a crash finds it.

use super::TargetPrices;
use super::{
    BalancerKind, CreatedLoadBalancer, CreatedNetwork, CreatedVolume, DatabaseRestore,
    DatabaseSource, Databases, DiskFormat, DiskSize, Dns, DnsRecord, DnsTarget, Endpoint, Health,
    InstanceLaunch, Instances, LaunchedInstance, LoadBalancerCreate, LoadBalancers, NetworkCreate,
    Networks, Placement, Planned, PlannedResource, Probe, RestoredDatabase, RestoredVolume, StepCx,
    SwitchedRecord, Target, TargetAction, TargetResult, VolumeCreate, VolumeRestore, Volumes, gib,
    planned_shape,
};
use crate::step::{ActionError, Call, CancelOnDrop, Ctx, disk_index, file_stem};
use async_trait::async_trait;
use ferry_aws::ebs::{EbsSink, Opened};
use ferry_aws::{Aws, AwsConfig};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SETTINGS: &[&str] = &["region", "endpoint", "zone", "sizes", "db_sizes", "images"];

/// How long a load balancer may take to become active, and a DNS change to
/// reach every Route 53 server.
const LB_WAIT: Duration = Duration::from_secs(600);
const DNS_WAIT: Duration = Duration::from_secs(600);
/// How long deleting a database may take.
const DB_DELETE_WAIT: Duration = Duration::from_secs(3600);

/// The `aws` target. Clients are made once per region and endpoint.
#[derive(Default)]
pub struct AwsTarget {
    clients: Mutex<HashMap<AwsConfig, Aws>>,
    keys: Option<(String, String)>,
}

impl AwsTarget {
    /// A target that signs with these keys instead of the standard chain
    /// (tests against a local stand-in for AWS).
    pub fn with_keys(id: &str, secret: &str) -> AwsTarget {
        AwsTarget {
            clients: Mutex::default(),
            keys: Some((id.to_owned(), secret.to_owned())),
        }
    }

    fn config(&self, place: &Placement) -> AwsConfig {
        AwsConfig {
            region: place.str("region").map(str::to_owned),
            endpoint: place.str("endpoint").map(str::to_owned),
            static_keys: self.keys.clone(),
        }
    }
}

/// Drops what it holds on a blocking thread: for values that own a Tokio
/// runtime (a repository's store), which panics if dropped on an async
/// worker.
struct DropBlocking<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Drop for DropBlocking<T> {
    fn drop(&mut self) {
        if let Some(v) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => drop(h.spawn_blocking(move || drop(v))),
                Err(_) => drop(v),
            }
        }
    }
}

fn fail(e: ferry_aws::Error) -> ActionError {
    if e.retry() {
        ActionError::transient(e.to_string())
    } else {
        ActionError::permanent(e.to_string())
    }
}

/// `{TYPE: {cpus: N, memory: MiB}}`.
fn sizes(settings: &Map<String, Value>) -> Result<Option<ferry_aws::ec2::Sizes>, String> {
    size_table(settings, "sizes", "instance types")
}

/// `setting` as a `{NAME: {cpus: N, memory: MiB}}` table (`sizes`,
/// `db_sizes`).
fn size_table(
    settings: &Map<String, Value>,
    setting: &str,
    what: &str,
) -> Result<Option<ferry_aws::ec2::Sizes>, String> {
    let Some(v) = settings.get(setting) else {
        return Ok(None);
    };
    let Some(m) = v.as_object() else {
        return Err(format!(
            "`{setting}` must map {what} to {{cpus: N, memory: MiB}}"
        ));
    };
    m.iter()
        .map(|(t, spec)| {
            let n = |k: &str| {
                spec.get(k)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n > 0)
            };
            match (n("cpus"), n("memory")) {
                (Some(c), Some(mem)) => Ok((t.clone(), c, mem)),
                _ => Err(format!(
                    "`{setting}.{t}` must be {{cpus: N, memory: MiB}} with whole numbers above 0"
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

impl AwsTarget {
    async fn aws(&self, place: &Placement) -> TargetResult<Aws> {
        let cfg = self.config(place);
        if let Some(a) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cfg)
        {
            return Ok(a.clone());
        }
        let a = Aws::connect(&cfg).await.map_err(fail)?;
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cfg, a.clone());
        Ok(a)
    }

    async fn zone(&self, aws: &Aws, place: &Placement) -> TargetResult<String> {
        match place.str("zone") {
            Some(z) => Ok(z.to_owned()),
            None => ferry_aws::ec2::first_zone(aws).await.map_err(fail),
        }
    }
}

#[async_trait]
impl Target for AwsTarget {
    fn kind(&self) -> &'static str {
        "aws"
    }
    fn volumes(&self) -> Option<&dyn Volumes> {
        Some(self)
    }
    fn instances(&self) -> Option<&dyn Instances> {
        Some(self)
    }
    fn networks(&self) -> Option<&dyn Networks> {
        Some(self)
    }
    fn load_balancers(&self) -> Option<&dyn LoadBalancers> {
        Some(self)
    }
    fn dns(&self) -> Option<&dyn Dns> {
        Some(self)
    }
    fn databases(&self) -> Option<&dyn Databases> {
        Some(self)
    }
    fn settings(&self) -> &'static [&'static str] {
        SETTINGS
    }
    fn check_settings(&self, settings: &Map<String, Value>) -> Vec<String> {
        let mut out = Vec::new();
        for k in settings.keys() {
            if !SETTINGS.contains(&k.as_str()) {
                out.push(format!(
                    "target type `aws` takes no setting `{k}`; it takes: {}",
                    SETTINGS.join(", ")
                ));
            }
        }
        for k in ["region", "endpoint", "zone"] {
            if settings.get(k).is_some_and(|v| !v.is_string()) {
                out.push(format!("`{k}` must be a string"));
            }
        }
        if let Some(e) = settings.get("endpoint").and_then(Value::as_str)
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            out.push(format!(
                "`endpoint` {e:?} must be an http:// or https:// URL"
            ));
        }
        if let Err(e) = sizes(settings) {
            out.push(e);
        }
        if let Err(e) = size_table(settings, "db_sizes", "DB instance classes") {
            out.push(e);
        }
        if let Some(m) = settings.get("db_sizes").and_then(Value::as_object)
            && let Some(bad) = m.keys().find(|k| !k.starts_with("db."))
        {
            out.push(format!(
                "`db_sizes.{bad}` is not a DB instance class (they start with `db.`, e.g. db.t3.medium)"
            ));
        }
        if let Some(v) = settings.get("images")
            && !v
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string))
        {
            out.push("`images` must map image families to AMI ids".into());
        }
        out
    }

    /// Prices read from the table's `aws` entry: `instance_hour` by
    /// instance type and DB instance class, and the units
    /// `ebs_direct_put_per_1000`, `snapshot_gb_month`, `gp3_gb_month`,
    /// `alb_hour`, `nlb_hour`, `health_check_month`.
    fn forecast(
        &self,
        place: &Placement,
        action: TargetAction,
        call: &Call,
        disk: Option<&DiskSize>,
        prices: &TargetPrices,
    ) -> Planned {
        let per_hour =
            |gb_month: &str, gib: u64| gib as f64 * prices.unit(gb_month) / super::HOURS_PER_MONTH;
        match action {
            TargetAction::VolumeRestore => {
                let Some(d) = disk else {
                    return Planned {
                        resources: vec![PlannedResource {
                            kind: "EBS snapshot".into(),
                            detail: "size unknown until the repository is read (-r)".into(),
                            ..PlannedResource::default()
                        }],
                        secs: 60.0,
                        once_cost: 0.0,
                    };
                };
                let g = gib(d.size);
                // At least one put per 512 KiB block holding data.
                let puts = d.data_bytes.div_ceil(ferry_aws::ebs::BLOCK);
                Planned {
                    resources: vec![
                        PlannedResource {
                            kind: "EBS snapshot".into(),
                            detail: format!("{g} GiB, {puts} PutSnapshotBlock"),
                            hourly: per_hour("snapshot_gb_month", g),
                            monthly_standby: 0.0,
                        },
                        PlannedResource {
                            kind: "EBS gp3 volume".into(),
                            detail: format!("{g} GiB, made from the snapshot at launch"),
                            hourly: per_hour("gp3_gb_month", g),
                            monthly_standby: 0.0,
                        },
                    ],
                    secs: 60.0,
                    once_cost: puts as f64 / 1000.0 * prices.unit("ebs_direct_put_per_1000"),
                }
            }
            TargetAction::VolumeCreate => {
                let g = VolumeCreate::parse(call).map_or(1, |v| gib(v.size_bytes));
                Planned {
                    resources: vec![PlannedResource {
                        kind: "EBS gp3 volume".into(),
                        detail: format!("{g} GiB, empty"),
                        hourly: per_hour("gp3_gb_month", g),
                        monthly_standby: 0.0,
                    }],
                    secs: 10.0,
                    once_cost: 0.0,
                }
            }
            TargetAction::InstanceLaunch => {
                let (cpus, mem) = planned_shape(call);
                let table = sizes(&place.settings)
                    .ok()
                    .flatten()
                    .unwrap_or_else(ferry_aws::ec2::default_sizes);
                let kind = call
                    .str("instance_type")
                    .filter(|t| !t.is_empty())
                    .or_else(|| {
                        ferry_aws::ec2::pick_instance_type(&table, cpus, mem).map(str::to_owned)
                    });
                let (detail, hourly) = match &kind {
                    Some(k) => (
                        format!("{k} (asked: {cpus} vCPU, {mem} MiB)"),
                        prices.instance_hour(k),
                    ),
                    None => (
                        format!("no type in the sizes table has {cpus} vCPU and {mem} MiB"),
                        0.0,
                    ),
                };
                Planned {
                    resources: vec![PlannedResource {
                        kind: "EC2 instance".into(),
                        detail,
                        hourly,
                        monthly_standby: 0.0,
                    }],
                    secs: prices.boot_secs,
                    once_cost: 0.0,
                }
            }
            TargetAction::NetworkCreate => Planned {
                resources: vec![PlannedResource {
                    kind: "VPC".into(),
                    detail: format!(
                        "{}, {} subnet(s), a security group, a route table with no route out",
                        call.str("cidr").unwrap_or_default(),
                        call.list("subnets").len()
                    ),
                    ..PlannedResource::default()
                }],
                secs: 10.0,
                once_cost: 0.0,
            },
            TargetAction::InstanceStop => Planned {
                secs: 30.0,
                ..Planned::default()
            },
            // Not offered here: validation refuses it first.
            TargetAction::VolumeBackup => Planned::default(),
            TargetAction::LoadBalancerCreate => {
                let nlb = call.str("kind").as_deref() == Some("nlb")
                    || call
                        .list("listeners")
                        .iter()
                        .all(|l| !l.trim().starts_with("http"));
                let (kind, unit) = if nlb {
                    ("NLB", "nlb_hour")
                } else {
                    ("ALB", "alb_hour")
                };
                Planned {
                    resources: vec![PlannedResource {
                        kind: format!("ELBv2 {kind}"),
                        detail: format!(
                            "listeners {}; capacity units not counted",
                            call.list("listeners").join(", ")
                        ),
                        hourly: prices.unit(unit),
                        monthly_standby: 0.0,
                    }],
                    // Provisioning until active.
                    secs: 180.0,
                    once_cost: 0.0,
                }
            }
            TargetAction::DnsSwitch => {
                let failover = !call.map("failover").is_empty();
                let mut resources = vec![PlannedResource {
                    kind: "Route 53 record".into(),
                    detail: format!(
                        "{} in {}",
                        call.str("name").unwrap_or_default(),
                        call.str("zone").unwrap_or_default()
                    ),
                    ..PlannedResource::default()
                }];
                if failover {
                    // A failover pair's health check runs for as long as
                    // the pair stands by.
                    resources.push(PlannedResource {
                        kind: "Route 53 health check".into(),
                        detail: "the failover pair's primary".into(),
                        hourly: prices.unit("health_check_month") / super::HOURS_PER_MONTH,
                        monthly_standby: prices.unit("health_check_month"),
                    });
                }
                Planned {
                    resources,
                    // Until the change is INSYNC.
                    secs: 60.0,
                    once_cost: 0.0,
                }
            }
            TargetAction::DatabaseRestore => {
                let (cpus, mem) = planned_shape(call);
                let table = size_table(&place.settings, "db_sizes", "DB instance classes")
                    .ok()
                    .flatten()
                    .unwrap_or_else(ferry_aws::rds::default_classes);
                let class = call
                    .str("instance_class")
                    .filter(|c| !c.is_empty())
                    .or_else(|| {
                        ferry_aws::ec2::pick_instance_type(&table, cpus, mem).map(str::to_owned)
                    });
                Planned {
                    resources: vec![PlannedResource {
                        kind: "RDS instance".into(),
                        detail: format!(
                            "{} {}",
                            call.str("engine").unwrap_or_default(),
                            class.as_deref().unwrap_or("(no class fits)")
                        ),
                        hourly: class.as_deref().map_or(0.0, |c| prices.instance_hour(c)),
                        monthly_standby: 0.0,
                    }],
                    // An RDS restore takes minutes to tens of minutes.
                    secs: 900.0,
                    once_cost: 0.0,
                }
            }
        }
    }

    async fn health(&self, _run: &Ctx, place: &Placement) -> Health {
        let mut probes = Vec::new();
        match self.aws(place).await {
            Err(e) => probes.push(Probe {
                what: "credentials and region".into(),
                ok: false,
                detail: e.message,
            }),
            Ok(aws) => {
                probes.push(Probe {
                    what: "credentials and region".into(),
                    ok: true,
                    detail: format!("{} at {}", aws.region, aws.endpoint),
                });
                let mut results = ferry_aws::ec2::health(&aws).await;
                results.push((
                    "ELBv2 load balancers".to_owned(),
                    ferry_aws::elb::health(&aws).await,
                ));
                results.push((
                    "Route 53 zones".to_owned(),
                    ferry_aws::route53::health(&aws).await,
                ));
                results.push((
                    "RDS databases".to_owned(),
                    ferry_aws::rds::health(&aws).await,
                ));
                for (what, r) in results {
                    probes.push(match r {
                        Ok(detail) => Probe {
                            what,
                            ok: true,
                            detail,
                        },
                        Err(e) => Probe {
                            what,
                            ok: false,
                            detail: e.to_string(),
                        },
                    });
                }
            }
        }
        Health {
            target: "aws".into(),
            ok: probes.iter().all(|p| p.ok),
            probes,
        }
    }
}

#[async_trait]
impl Volumes for AwsTarget {
    /// Writes the point's disk into an EBS snapshot (resuming an
    /// interrupted try from its journal in the work directory), and waits
    /// until the snapshot is complete.
    async fn restore(&self, cx: &StepCx, req: VolumeRestore) -> TargetResult<RestoredVolume> {
        if req.to.is_some() {
            return Err(ActionError::permanent(
                "`to` (restoring onto an existing disk in place) is offered by the local and libvirt targets; on aws a point becomes a new EBS snapshot",
            ));
        }
        let aws = self.aws(&cx.place).await?;
        let ctx = cx.run.clone();
        let dir = ctx.work_dir.join(format!("{}.ebs", file_stem(&cx.node)));
        crate::fsutil::create_private_dir(&dir)
            .map_err(|e| ActionError::permanent(format!("{}: {e}", dir.display())))?;
        let (ctx2, req2) = (ctx.clone(), req.clone());
        let (repo, point, disk) = tokio::task::spawn_blocking(move || {
            let repo = ctx2.open_repo_at(req2.repo.as_deref())?;
            let point = repo.resolve(&req2.point).map_err(ActionError::from)?;
            let disk = disk_index(&point, req2.disk.as_deref())?;
            Ok::<_, ActionError>((repo, point, disk))
        })
        .await
        .map_err(|e| ActionError::transient(format!("restore task: {e}")))??;
        // The repository's store owns a runtime, which may not be dropped on
        // an async worker: on every way out of here (a snapshot found
        // complete, an error), it goes on a blocking thread.
        let mut repo = DropBlocking(Some(repo));
        let meta = point.meta.disks[disk].clone();
        let description = format!(
            "Ferry: {} disk {} ({})",
            point.meta.source, meta.name, cx.key
        );
        let snapshot_id = match EbsSink::open(&aws, &cx.key, meta.size, &description, &dir)
            .await
            .map_err(fail)?
        {
            Opened::Complete(id) => id,
            Opened::Writer(sink) => {
                let id = sink.snapshot_id().to_owned();
                let progress = Arc::new(ferry_agent::progress::Progress::default());
                let _stop = CancelOnDrop(progress.clone());
                let (point2, progress2) = (point.clone(), progress.clone());
                let repo = repo.0.take();
                tokio::task::spawn_blocking(move || {
                    let repo = repo.ok_or_else(|| ActionError::permanent("no repository"))?;
                    ferry_agent::restore::restore_into(&repo, &point2, disk, &sink, &progress2)
                        .map_err(ActionError::from)
                })
                .await
                .map_err(|e| ActionError::transient(format!("restore task: {e}")))??;
                id
            }
        };
        ferry_aws::ebs::wait_completed(&aws, &snapshot_id, Duration::from_secs(1800))
            .await
            .map_err(fail)?;
        Ok(RestoredVolume {
            path: snapshot_id,
            format: DiskFormat::Raw,
            point: point.id.clone(),
            source: point.meta.source.clone(),
            disk: meta.name.clone(),
            point_time: point.meta.time.to_rfc3339(),
            rpo_secs: (ctx.started_ms - point.meta.time.timestamp_millis()) as f64 / 1000.0,
            size: meta.size,
            bytes_written: None,
            bytes_skipped: None,
        })
    }

    async fn create(&self, cx: &StepCx, req: VolumeCreate) -> TargetResult<CreatedVolume> {
        let aws = self.aws(&cx.place).await?;
        let zone = self.zone(&aws, &cx.place).await?;
        let gib = i32::try_from(req.size_bytes.div_ceil(1 << 30))
            .map_err(|_| ActionError::permanent("the volume is larger than EBS allows"))?;
        let id = ferry_aws::ec2::create_volume(&aws, &cx.key, gib, &zone)
            .await
            .map_err(fail)?;
        Ok(CreatedVolume {
            path: id,
            format: DiskFormat::Raw,
        })
    }

    async fn delete(&self, cx: &StepCx) -> TargetResult<()> {
        let aws = self.aws(&cx.place).await?;
        ferry_aws::ec2::delete_volumes(&aws, &cx.key)
            .await
            .map_err(fail)?;
        let dir = cx.run.work_dir.join(format!("{}.ebs", file_stem(&cx.node)));
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ActionError::permanent(format!("{}: {e}", dir.display())))
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Instances for AwsTarget {
    async fn launch(&self, cx: &StepCx, req: InstanceLaunch) -> TargetResult<LaunchedInstance> {
        if req.kernel.is_some() || req.initrd.is_some() {
            return Err(ActionError::permanent(
                "the aws target boots an image or the first restored disk, not a kernel: remove `kernel`/`initrd` or use `image`",
            ));
        }
        let aws = self.aws(&cx.place).await?;
        let table = sizes(&cx.place.settings)
            .map_err(ActionError::permanent)?
            .unwrap_or_else(ferry_aws::ec2::default_sizes);
        let instance_type = match &req.instance_type {
            Some(t) => t.clone(),
            None => ferry_aws::ec2::pick_instance_type(&table, req.cpus, req.memory_mib)
                .map(str::to_owned)
                .ok_or_else(|| {
                    ActionError::permanent(format!(
                        "no instance type in the `sizes` table has {} vCPUs and {} MiB",
                        req.cpus, req.memory_mib
                    ))
                })?,
        };
        let image = match &req.image {
            None => None,
            Some(i) if i.starts_with("ami-") => Some(i.clone()),
            Some(family) => Some(
                cx.place
                    .settings
                    .get("images")
                    .and_then(|m| m.get(family))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        ActionError::permanent(format!(
                            "image `{family}` is neither an AMI id nor in the target's `images` mapping"
                        ))
                    })?,
            ),
        };
        if let Some(d) = req.disks.iter().find(|d| !d.starts_with("snap-")) {
            return Err(ActionError::permanent(format!(
                "disk `{d}` is not an EBS snapshot: on aws, disks are volume.restore outputs (`path`)"
            )));
        }
        // A drill reaches nothing outside its own network: it must have one.
        let (subnet, groups) = match &req.network {
            Some(vpc) => {
                let (subnet, groups) = ferry_aws::ec2::network_parts(&aws, vpc)
                    .await
                    .map_err(fail)?;
                (Some(subnet), groups)
            }
            None if cx.run.drill || req.isolated == Some(true) => {
                return Err(ActionError::permanent(
                    "an isolated instance on aws needs `network` (a network.create output `id`): without one it would join the default VPC, which reaches the internet",
                ));
            }
            None => (None, Vec::new()),
        };
        let spec = ferry_aws::ec2::InstanceSpec {
            instance_type,
            image,
            snapshots: req.disks.clone(),
            subnet_id: subnet,
            security_group_ids: groups,
            user_data: req.user_data.clone(),
        };
        let i = ferry_aws::ec2::launch(&aws, &cx.key, &spec, req.ready_timeout)
            .await
            .map_err(fail)?;
        let ip = i.private_ip.clone().unwrap_or_default();
        let ports: BTreeMap<String, String> = req
            .ports
            .iter()
            .map(|p| (p.to_string(), format!("{ip}:{p}")))
            .collect();
        Ok(LaunchedInstance {
            name: i.instance_id,
            pid: None,
            addr: ports.values().next().cloned(),
            ports,
            console: None,
            private_ip: i.private_ip,
            qmp: None,
        })
    }

    async fn stop(&self, cx: &StepCx, name: &str) -> TargetResult<()> {
        let aws = self.aws(&cx.place).await?;
        if !name.starts_with("i-") {
            // Not an instance this target launched (nothing to stop).
            return Ok(());
        }
        ferry_aws::ec2::stop(&aws, name).await.map_err(fail)
    }

    async fn terminate(&self, cx: &StepCx) -> TargetResult<()> {
        let aws = self.aws(&cx.place).await?;
        ferry_aws::ec2::terminate(&aws, &cx.key).await.map_err(fail)
    }
}

#[async_trait]
impl Networks for AwsTarget {
    async fn create(&self, cx: &StepCx, req: NetworkCreate) -> TargetResult<CreatedNetwork> {
        let aws = self.aws(&cx.place).await?;
        let ingress = req
            .ingress
            .iter()
            .map(|r| ferry_aws::ec2::Ingress::parse(r).map_err(fail))
            .collect::<TargetResult<Vec<_>>>()?;
        let spec = ferry_aws::ec2::NetworkSpec {
            cidr: req.cidr,
            subnets: req.subnets,
            ingress,
            zone: cx.place.str("zone").map(str::to_owned),
        };
        let n = ferry_aws::ec2::create_network(&aws, &cx.key, &spec)
            .await
            .map_err(fail)?;
        Ok(CreatedNetwork {
            id: n.vpc_id,
            subnets: n.subnet_ids,
            security_group: n.security_group_id,
        })
    }

    async fn delete(&self, cx: &StepCx) -> TargetResult<()> {
        let aws = self.aws(&cx.place).await?;
        ferry_aws::ec2::delete_network(&aws, &cx.key)
            .await
            .map_err(fail)
    }
}

fn probe(e: &Endpoint) -> ferry_aws::elb::Probe {
    ferry_aws::elb::Probe {
        protocol: e.protocol.clone(),
        port: Some(e.port),
        path: e.path.clone(),
    }
}

#[async_trait]
impl LoadBalancers for AwsTarget {
    async fn create(
        &self,
        cx: &StepCx,
        req: LoadBalancerCreate,
    ) -> TargetResult<CreatedLoadBalancer> {
        let aws = self.aws(&cx.place).await?;
        let network = ferry_aws::ec2::layout(&aws, &req.network)
            .await
            .map_err(fail)?;
        let spec = ferry_aws::elb::Spec {
            kind: match req.kind {
                BalancerKind::Alb => ferry_aws::elb::Kind::Application,
                BalancerKind::Nlb => ferry_aws::elb::Kind::Network,
            },
            internal: req.internal,
            listeners: req
                .listeners
                .iter()
                .map(|l| ferry_aws::elb::Listener {
                    protocol: l.protocol.clone(),
                    port: l.port,
                })
                .collect(),
            targets: req.targets.clone(),
            target_port: req.target_port,
            health: req.health_check.as_ref().map(probe),
            network,
        };
        let lb = ferry_aws::elb::create(&aws, &cx.key, &spec, LB_WAIT)
            .await
            .map_err(fail)?;
        let first = req.listeners.first().map_or(0, |l| l.port);
        Ok(CreatedLoadBalancer {
            id: lb.arn,
            addr: format!("{}:{first}", lb.dns_name),
            dns_name: lb.dns_name,
            kind: req.kind,
            target_groups: lb.target_groups,
            zone_id: lb.zone_id,
        })
    }

    async fn delete(&self, cx: &StepCx) -> TargetResult<()> {
        let aws = self.aws(&cx.place).await?;
        ferry_aws::elb::delete(&aws, &cx.key).await.map_err(fail)
    }
}

#[async_trait]
impl Dns for AwsTarget {
    async fn switch(&self, cx: &StepCx, req: DnsRecord) -> TargetResult<SwitchedRecord> {
        let aws = self.aws(&cx.place).await?;
        let target = match req.target {
            DnsTarget::Values(v) => ferry_aws::route53::Target::Values(v),
            DnsTarget::Alias(a) => ferry_aws::route53::Target::Alias(a),
            DnsTarget::Failover {
                primary,
                secondary,
                health_check,
            } => ferry_aws::route53::Target::Failover {
                primary,
                secondary,
                probe: probe(&health_check),
            },
        };
        let spec = ferry_aws::route53::Spec {
            zone: req.zone,
            name: req.name,
            kind: req.kind,
            ttl: i64::from(req.ttl),
            target,
        };
        let s = ferry_aws::route53::switch(&aws, &cx.key, &spec, DNS_WAIT)
            .await
            .map_err(fail)?;
        Ok(SwitchedRecord {
            record: s.record,
            kind: s.kind,
            values: s.values,
            zone_id: s.zone_id,
            change_id: s.change_id,
            health_check: s.health_check,
        })
    }

    async fn restore(&self, cx: &StepCx) -> TargetResult<()> {
        let aws = self.aws(&cx.place).await?;
        ferry_aws::route53::restore(&aws, &cx.key, DNS_WAIT)
            .await
            .map_err(fail)
    }
}

#[async_trait]
impl Databases for AwsTarget {
    async fn restore(&self, cx: &StepCx, req: DatabaseRestore) -> TargetResult<RestoredDatabase> {
        let aws = self.aws(&cx.place).await?;
        let instance_class = match &req.instance_class {
            Some(c) => c.clone(),
            None => {
                let table = size_table(&cx.place.settings, "db_sizes", "DB instance classes")
                    .map_err(ActionError::permanent)?
                    .unwrap_or_else(ferry_aws::rds::default_classes);
                ferry_aws::ec2::pick_instance_type(&table, req.cpus, req.memory_mib)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        ActionError::permanent(format!(
                            "no DB instance class in the `db_sizes` table has {} vCPUs and {} MiB: add one, or give `instance_class`",
                            req.cpus, req.memory_mib
                        ))
                    })?
            }
        };
        // A drill reaches nothing outside its own network: it must have one.
        let network = match &req.network {
            Some(vpc) => Some(ferry_aws::ec2::layout(&aws, vpc).await.map_err(fail)?),
            None if cx.run.drill => {
                return Err(ActionError::permanent(
                    "a database restored in a drill on aws needs `network` (a network.create output `id`): without one it would join the default VPC",
                ));
            }
            None => None,
        };
        let spec = ferry_aws::rds::Spec {
            engine: req.engine.clone(),
            source: match req.from {
                DatabaseSource::Snapshot(s) => ferry_aws::rds::Source::Snapshot(s),
                DatabaseSource::PointInTime { source, time } => {
                    ferry_aws::rds::Source::PointInTime {
                        instance: source,
                        time,
                    }
                }
            },
            instance_class,
            network,
            port: req.port,
        };
        let db = ferry_aws::rds::restore(&aws, &cx.key, &spec, req.ready_timeout)
            .await
            .map_err(fail)?;
        Ok(RestoredDatabase {
            endpoint: format!("{}:{}", db.address, db.port),
            id: db.id,
            address: db.address,
            port: db.port,
            engine: db.engine,
            instance_class: db.instance_class,
        })
    }

    async fn delete(&self, cx: &StepCx) -> TargetResult<()> {
        let aws = self.aws(&cx.place).await?;
        ferry_aws::rds::delete(&aws, &cx.key, DB_DELETE_WAIT)
            .await
            .map_err(fail)
    }
}
