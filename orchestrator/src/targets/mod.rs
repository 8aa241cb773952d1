//! The `Target` seam: where a runbook rebuilds. A target offers resources
//! (volumes, instances, networks, load balancers, DNS records, databases),
//! each as a trait with typed, provider-neutral requests parsed once from a
//! step's inputs. Implementing a resource means implementing all of its
//! operations (the compiler checks it), and a target claims exactly the
//! catalog actions of the resources it offers: the [`Registry`] turns a claim
//! that is missing into a validation error naming the target and the action.
//!
//! Every operation is idempotent under its step's key ([`StepCx::key`]): a
//! try after a crash adopts what the interrupted try made instead of making
//! it twice, and a delete of something already gone succeeds.

pub mod aws;
mod backup;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod libvirt;
pub mod local;
pub mod local_net;

use crate::step::{ActionError, Call, Ctx, Outputs};
use async_trait::async_trait;
use ferry_engine::Diagnostic;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub type TargetResult<T> = Result<T, ActionError>;

/// A target as the runbook places it: its name in `targets:` and the
/// settings written there (`region`, `mapping`, ...), which its type checked
/// at validation ([`Target::check_settings`]).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub name: String,
    pub settings: serde_json::Map<String, Value>,
}

impl Placement {
    pub fn of(t: &ferry_engine::runbook::Target) -> Placement {
        Placement {
            name: t.name.clone(),
            settings: t.settings.clone(),
        }
    }

    /// A string setting.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.settings.get(key).and_then(Value::as_str)
    }
}

/// A target bound to where a runbook placed it: what a step runs on.
#[derive(Clone)]
pub struct Bound {
    pub target: Arc<dyn Target>,
    pub place: Arc<Placement>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.place.name, self.target.kind())
    }
}

/// One step's try as a target sees it: the run, where the runbook placed the
/// target, and the node and idempotency key that name what the step creates.
#[derive(Debug, Clone)]
pub struct StepCx {
    pub run: Arc<Ctx>,
    pub place: Arc<Placement>,
    /// The node's id (`db`, `disk[1]`), unique in the run.
    pub node: String,
    /// `RUN/NODE`: the same for every try of the step, and for its undo.
    pub key: String,
}

/// The catalog actions a target implements, by resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TargetAction {
    VolumeRestore,
    VolumeCreate,
    VolumeBackup,
    InstanceLaunch,
    InstanceStop,
    NetworkCreate,
    LoadBalancerCreate,
    DnsSwitch,
    DatabaseRestore,
}

/// The kinds of resource a target may offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Volumes,
    /// Recovery points taken where the stack runs (failback, cutover).
    Backups,
    Instances,
    Networks,
    LoadBalancers,
    Dns,
    Databases,
}

impl TargetAction {
    pub const ALL: &[TargetAction] = &[
        TargetAction::VolumeRestore,
        TargetAction::VolumeCreate,
        TargetAction::VolumeBackup,
        TargetAction::InstanceLaunch,
        TargetAction::InstanceStop,
        TargetAction::NetworkCreate,
        TargetAction::LoadBalancerCreate,
        TargetAction::DnsSwitch,
        TargetAction::DatabaseRestore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TargetAction::VolumeRestore => "volume.restore",
            TargetAction::VolumeCreate => "volume.create",
            TargetAction::VolumeBackup => "volume.backup",
            TargetAction::InstanceLaunch => "instance.launch",
            TargetAction::InstanceStop => "instance.stop",
            TargetAction::NetworkCreate => "network.create",
            TargetAction::LoadBalancerCreate => "loadbalancer.create",
            TargetAction::DnsSwitch => "dns.switch",
            TargetAction::DatabaseRestore => "database.restore",
        }
    }

    pub fn from_name(name: &str) -> Option<TargetAction> {
        TargetAction::ALL.iter().copied().find(|a| a.name() == name)
    }

    pub fn resource(self) -> Resource {
        match self {
            TargetAction::VolumeRestore | TargetAction::VolumeCreate => Resource::Volumes,
            TargetAction::VolumeBackup => Resource::Backups,
            TargetAction::InstanceLaunch | TargetAction::InstanceStop => Resource::Instances,
            TargetAction::NetworkCreate => Resource::Networks,
            TargetAction::LoadBalancerCreate => Resource::LoadBalancers,
            TargetAction::DnsSwitch => Resource::Dns,
            TargetAction::DatabaseRestore => Resource::Databases,
        }
    }
}

/// An image or disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    fn parse(call: &Call) -> TargetResult<DiskFormat> {
        match call.str("format").as_deref() {
            None | Some("raw") => Ok(DiskFormat::Raw),
            Some("qcow2") => Ok(DiskFormat::Qcow2),
            Some(other) => Err(ActionError::permanent(format!(
                "format `{other}`: use raw or qcow2"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// `volume.restore`: one disk of a recovery point as a new volume.
#[derive(Clone, Debug)]
pub struct VolumeRestore {
    /// An id, `SOURCE@latest` or `SOURCE@TIME`.
    pub point: String,
    /// Which disk of the point (its only one when `None`).
    pub disk: Option<String>,
    pub format: DiskFormat,
    /// The repository, when not the run's.
    pub repo: Option<String>,
    /// An existing disk to bring to the point in place (a delta restore),
    /// instead of a new volume.
    pub to: Option<String>,
    /// With `to`: a point `to` is known to hold.
    pub base: Option<String>,
}

impl VolumeRestore {
    pub fn parse(call: &Call) -> TargetResult<VolumeRestore> {
        let to = call.str("to").filter(|d| !d.is_empty());
        let base = call.str("base").filter(|d| !d.is_empty());
        if base.is_some() && to.is_none() {
            return Err(ActionError::permanent(
                "`base` says what an existing disk holds; give that disk as `to`",
            ));
        }
        let format = DiskFormat::parse(call)?;
        if to.is_some() && format != DiskFormat::Raw {
            return Err(ActionError::permanent(
                "`to` restores onto an existing raw disk in place; `format` cannot change it",
            ));
        }
        Ok(VolumeRestore {
            point: call.need("point")?,
            disk: call.str("disk").filter(|d| !d.is_empty()),
            format,
            repo: call.str("repo").filter(|r| !r.is_empty()),
            to,
            base,
        })
    }
}

/// `volume.backup`: a recovery point of a disk where the stack runs.
#[derive(Clone, Debug)]
pub struct VolumeBackup {
    pub source: String,
    /// The disk (an image file on the file targets).
    pub path: String,
    /// The QMP socket of the running VM that has `path` open.
    pub qmp: Option<String>,
    /// Pause the VM before the cut and leave it paused.
    pub pause: bool,
    /// The disk's name in the point.
    pub disk: Option<String>,
    pub repo: Option<String>,
}

impl VolumeBackup {
    pub fn parse(call: &Call) -> TargetResult<VolumeBackup> {
        let source = call.need("source")?;
        if source.contains(['@', '/']) {
            return Err(ActionError::permanent(format!(
                "`source` {source:?} is a source name, without `@` or `/`"
            )));
        }
        let qmp = call.str("qmp").filter(|q| !q.is_empty());
        let pause = call.bool("pause").unwrap_or(false);
        if pause && qmp.is_none() {
            return Err(ActionError::permanent(
                "`pause` pauses the VM the disk belongs to; give its QMP socket as `qmp`",
            ));
        }
        Ok(VolumeBackup {
            source,
            path: call.need("path")?,
            qmp,
            pause,
            disk: call.str("disk").filter(|d| !d.is_empty()),
            repo: call.str("repo").filter(|r| !r.is_empty()),
        })
    }
}

/// What `volume.backup` made.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct BackedUpVolume {
    pub point: String,
    pub source: String,
    pub disk: String,
    pub point_time: String,
    pub parent: Option<String>,
    pub mode: String,
    pub bytes_read: u64,
    pub new_bytes: u64,
    pub paused: bool,
}

/// What `volume.restore` made.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RestoredVolume {
    /// Where the volume is (a path, a volume id).
    pub path: String,
    pub format: DiskFormat,
    pub point: String,
    pub source: String,
    pub disk: String,
    pub point_time: String,
    pub rpo_secs: f64,
    pub size: u64,
    /// In place (`to`): bytes written to the existing disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
    /// With `base`: bytes the two points share, neither read nor written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_skipped: Option<u64>,
}

/// `volume.create`: an empty volume.
#[derive(Clone, Debug)]
pub struct VolumeCreate {
    pub size_bytes: u64,
    pub format: DiskFormat,
}

impl VolumeCreate {
    pub fn parse(call: &Call) -> TargetResult<VolumeCreate> {
        let size = call.need("size")?;
        let size_bytes = parse_size(&size).ok_or_else(|| {
            ActionError::permanent(format!("`size` {size:?} is not a size (e.g. 64M, 2G)"))
        })?;
        Ok(VolumeCreate {
            size_bytes,
            format: DiskFormat::parse(call)?,
        })
    }
}

/// `64M`, `2G`, `512K`, `1T`, or bytes; binary units, as `qemu-img` reads them.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift).filter(|&b| b > 0)
}

/// What `volume.create` made.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedVolume {
    pub path: String,
    pub format: DiskFormat,
}

/// `instance.launch`: a machine with volumes, booted from a kernel (local),
/// an image, or its first volume.
#[derive(Clone, Debug)]
pub struct InstanceLaunch {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    /// Kernel command line additions.
    pub append: Option<String>,
    /// Volumes, attached in order.
    pub disks: Vec<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Guest TCP ports to reach from outside.
    pub ports: Vec<u16>,
    /// `GUEST_IP:PORT` -> `HOST:PORT`: the only outside addresses the guest may reach.
    pub links: Vec<(String, String)>,
    /// No network beyond `links` (default: in drills).
    pub isolated: Option<bool>,
    /// Text on the console that means the guest is up.
    pub ready: Option<String>,
    pub ready_timeout: Duration,
    /// An image to boot instead of the first disk (cloud targets).
    pub image: Option<String>,
    /// The provider's size, overriding `cpus`/`memory_mib`.
    pub instance_type: Option<String>,
    /// A `network.create` output `id` to join.
    pub network: Option<String>,
    pub user_data: Option<String>,
}

impl InstanceLaunch {
    pub fn parse(call: &Call) -> TargetResult<InstanceLaunch> {
        let whole = |name: &str, default: i64, max: i64| -> TargetResult<u32> {
            let v = call.int(name, default)?;
            if !(1..=max).contains(&v) {
                return Err(ActionError::permanent(format!(
                    "`{name}` must be between 1 and {max}, not {v}"
                )));
            }
            Ok(v as u32)
        };
        let ports = call
            .list("ports")
            .iter()
            .map(|p| {
                p.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| {
                        ActionError::permanent(format!("port `{p}` is not a TCP port number"))
                    })
            })
            .collect::<TargetResult<Vec<u16>>>()?;
        let links = call
            .map("links")
            .into_iter()
            .map(|(guest, host)| {
                if !guest.contains(':') || !host.contains(':') {
                    return Err(ActionError::permanent(format!(
                        "link `{guest}: {host}`: write GUEST_IP:PORT: HOST:PORT"
                    )));
                }
                Ok((guest, host))
            })
            .collect::<TargetResult<Vec<_>>>()?;
        let opt = |name: &str| call.str(name).filter(|s| !s.is_empty());
        Ok(InstanceLaunch {
            kernel: opt("kernel"),
            initrd: call.str("initrd").filter(|s| !s.is_empty()),
            append: call.str("append").filter(|s| !s.is_empty()),
            disks: call.list("disks"),
            memory_mib: whole("memory", 256, 1 << 20)?,
            cpus: whole("cpus", 1, 1024)?,
            ports,
            links,
            isolated: call.bool("isolated"),
            ready: call.str("ready").filter(|s| !s.is_empty()),
            ready_timeout: call.duration("ready_timeout", Duration::from_secs(180))?,
            image: opt("image"),
            instance_type: opt("instance_type"),
            network: opt("network"),
            user_data: opt("user_data"),
        })
    }
}

/// What `instance.launch` made.
#[derive(Clone, Debug, Serialize)]
pub struct LaunchedInstance {
    pub name: String,
    pub pid: Option<i32>,
    /// Guest port -> `HOST:PORT` where it is reached.
    pub ports: BTreeMap<String, String>,
    /// The first of `ports`.
    pub addr: Option<String>,
    pub console: Option<String>,
    /// Its address on the `network` it joined, where other instances of
    /// the network reach it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    /// Its QMP socket, where the target has one (local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qmp: Option<String>,
}

/// `network.create`: a private network with subnets and firewall rules.
#[derive(Clone, Debug)]
pub struct NetworkCreate {
    pub cidr: String,
    pub subnets: Vec<String>,
    /// `PROTO/PORT [from CIDR]` rules that let traffic in.
    pub ingress: Vec<String>,
}

impl NetworkCreate {
    pub fn parse(call: &Call) -> TargetResult<NetworkCreate> {
        let cidr = call.need("cidr")?;
        let valid = |c: &str| {
            c.split_once('/').is_some_and(|(ip, bits)| {
                ip.parse::<std::net::Ipv4Addr>().is_ok()
                    && bits.parse::<u8>().is_ok_and(|b| (8..=28).contains(&b))
            })
        };
        for c in std::iter::once(&cidr).chain(call.list("subnets").iter()) {
            if !valid(c) {
                return Err(ActionError::permanent(format!(
                    "`{c}` is not an IPv4 range like 10.42.0.0/16 (prefix /8 to /28)"
                )));
            }
        }
        Ok(NetworkCreate {
            cidr,
            subnets: call.list("subnets"),
            ingress: call.list("ingress"),
        })
    }
}

/// What `network.create` made.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedNetwork {
    pub id: String,
    pub subnets: Vec<String>,
    pub security_group: String,
}

/// The catalog's word on an input's shape and on how the inputs go
/// together, applied to the rendered inputs of one try: the same checks
/// `ferry validate` made on literal values, now on every value.
fn check_shape(call: &Call) -> TargetResult<()> {
    let Some(action) = ferry_engine::catalog::action(&call.uses) else {
        return Ok(());
    };
    let given = |name: &str| match call.inputs.get(name) {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    let mut problems = action.check_rules(given);
    for input in action.inputs {
        if let Some(v) = call.inputs.get(input.name).filter(|_| given(input.name))
            && let Err(e) = ferry_engine::catalog::check_format(input.format, v)
        {
            problems.push(format!("input `{}`: {e}", input.name));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ActionError::permanent(problems.join("; ")))
    }
}

/// A protocol and port (and a path for HTTP probes), as the catalog parses
/// `http:80` and `http:8080/healthz`.
pub type Endpoint = ferry_engine::catalog::Endpoint;

/// Application (layer 7, HTTP) or network (layer 4, TCP/UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BalancerKind {
    Alb,
    Nlb,
}

impl BalancerKind {
    pub fn name(self) -> &'static str {
        match self {
            BalancerKind::Alb => "alb",
            BalancerKind::Nlb => "nlb",
        }
    }
}

/// `loadbalancer.create`: a load balancer in a network, forwarding each
/// listener to the targets.
#[derive(Clone, Debug)]
pub struct LoadBalancerCreate {
    /// `http:80`, `tcp:3306`: at least one.
    pub listeners: Vec<Endpoint>,
    /// Instances (names from `instance.launch`) behind it.
    pub targets: Vec<String>,
    /// The port the targets listen on (each listener's own when `None`).
    pub target_port: Option<u16>,
    pub health_check: Option<Endpoint>,
    /// A `network.create` output `id`.
    pub network: String,
    pub kind: BalancerKind,
    /// Reachable only inside the network.
    pub internal: bool,
}

impl LoadBalancerCreate {
    pub fn parse(call: &Call) -> TargetResult<LoadBalancerCreate> {
        check_shape(call)?;
        let listeners = call
            .list("listeners")
            .iter()
            .map(|l| ferry_engine::catalog::parse_listener(l).map_err(ActionError::permanent))
            .collect::<TargetResult<Vec<_>>>()?;
        if listeners.is_empty() {
            return Err(ActionError::permanent(
                "input `listeners` is empty: give at least one, e.g. [\"http:80\"]",
            ));
        }
        let layer7 = listeners.iter().all(|l| l.protocol == "http");
        let layer4 = listeners.iter().all(|l| l.protocol != "http");
        let kind = match call.str("kind").map(|k| k.to_ascii_lowercase()).as_deref() {
            Some("alb") if layer7 => BalancerKind::Alb,
            Some("nlb") if layer4 => BalancerKind::Nlb,
            Some(k @ ("alb" | "nlb")) => {
                return Err(ActionError::permanent(format!(
                    "`kind: {k}` does not fit listeners {}: an alb listens on http, an nlb on tcp or udp",
                    call.list("listeners").join(", ")
                )));
            }
            Some(other) if !other.is_empty() => {
                return Err(ActionError::permanent(format!(
                    "`kind` `{other}`: use alb or nlb"
                )));
            }
            _ if layer7 => BalancerKind::Alb,
            _ if layer4 => BalancerKind::Nlb,
            _ => {
                return Err(ActionError::permanent(format!(
                    "listeners {} mix http with tcp/udp: one load balancer is an alb (http) or an nlb (tcp, udp); make two steps",
                    call.list("listeners").join(", ")
                )));
            }
        };
        let target_port = match call.int("target_port", 0)? {
            0 => None,
            p => Some(u16::try_from(p).ok().filter(|&p| p > 0).ok_or_else(|| {
                ActionError::permanent(format!("`target_port` {p} is not a TCP port number"))
            })?),
        };
        let health_check = call
            .str("health_check")
            .filter(|s| !s.trim().is_empty())
            .map(|h| ferry_engine::catalog::parse_probe(&h).map_err(ActionError::permanent))
            .transpose()?;
        Ok(LoadBalancerCreate {
            listeners,
            targets: call
                .list("targets")
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect(),
            target_port,
            health_check,
            network: call.need("network")?,
            kind,
            internal: call.bool("internal").unwrap_or(true),
        })
    }
}

/// What `loadbalancer.create` made.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedLoadBalancer {
    pub id: String,
    pub dns_name: String,
    /// `DNS_NAME:PORT` of the first listener.
    pub addr: String,
    pub kind: BalancerKind,
    pub target_groups: Vec<String>,
    /// The DNS zone `dns_name` lives in (for alias records).
    pub zone_id: String,
}

/// Where `dns.switch` points a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsTarget {
    Values(Vec<String>),
    /// A load balancer's `dns_name`.
    Alias(String),
    /// A failover pair: the primary is served while `health_check` passes.
    Failover {
        primary: String,
        secondary: String,
        health_check: Endpoint,
    },
}

/// `dns.switch`: a DNS record to point at the rebuilt stack.
#[derive(Clone, Debug)]
pub struct DnsRecord {
    /// A hosted zone's name or id.
    pub zone: String,
    pub name: String,
    /// `A`, `CNAME`, ...; inferred from the values when `None`.
    pub kind: Option<String>,
    pub target: DnsTarget,
    pub ttl: u32,
}

impl DnsRecord {
    pub fn parse(call: &Call) -> TargetResult<DnsRecord> {
        check_shape(call)?;
        let values = call.list("values");
        let alias = call.str("alias").filter(|a| !a.trim().is_empty());
        let failover = call.map("failover");
        let target = match (values.is_empty(), alias, failover.is_empty()) {
            (false, None, true) => DnsTarget::Values(values),
            (true, Some(a), true) => DnsTarget::Alias(a.trim().to_owned()),
            (true, None, false) => {
                let get = |k: &str| {
                    failover
                        .iter()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| v.trim().to_owned())
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| {
                            ActionError::permanent(format!(
                                "input `failover` needs `{k}` (e.g. {{primary: 203.0.113.10, secondary: ${{{{ steps.lb.outputs.dns_name }}}}, health_check: http:80/healthz}})"
                            ))
                        })
                };
                DnsTarget::Failover {
                    primary: get("primary")?,
                    secondary: get("secondary")?,
                    health_check: ferry_engine::catalog::parse_probe(&get("health_check")?)
                        .map_err(ActionError::permanent)?,
                }
            }
            _ => {
                return Err(ActionError::permanent(
                    "`dns.switch` needs exactly one of `values`, `alias`, `failover`",
                ));
            }
        };
        let ttl = call.int("ttl", 60)?;
        let ttl = u32::try_from(ttl)
            .ok()
            .filter(|t| (1..=604_800).contains(t))
            .ok_or_else(|| {
                ActionError::permanent(format!("`ttl` must be 1 to 604800 seconds, not {ttl}"))
            })?;
        Ok(DnsRecord {
            zone: call.need("zone")?,
            name: call.need("name")?,
            kind: call
                .str("type")
                .map(|t| t.trim().to_ascii_uppercase())
                .filter(|t| !t.is_empty()),
            target,
            ttl,
        })
    }
}

/// What `dns.switch` did.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchedRecord {
    pub record: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub values: Vec<String>,
    pub zone_id: String,
    pub change_id: String,
    pub health_check: Option<String>,
}

/// Where `database.restore` takes its data from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseSource {
    Snapshot(String),
    /// `source` restored to `time` (RFC 3339), or to its latest restorable
    /// time when `None`.
    PointInTime {
        source: String,
        time: Option<String>,
    },
}

/// `database.restore`: a managed database from a snapshot or a point in time.
#[derive(Clone, Debug)]
pub struct DatabaseRestore {
    pub engine: String,
    pub from: DatabaseSource,
    /// The provider's size, overriding `cpus`/`memory_mib`.
    pub instance_class: Option<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    /// A `network.create` output `id`.
    pub network: Option<String>,
    pub port: Option<u16>,
    pub ready_timeout: Duration,
}

impl DatabaseRestore {
    pub fn parse(call: &Call) -> TargetResult<DatabaseRestore> {
        check_shape(call)?;
        let opt = |name: &str| {
            call.str(name)
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        let from = match (opt("snapshot"), opt("point_in_time"), opt("source")) {
            (Some(snap), None, None) => DatabaseSource::Snapshot(snap),
            (None, Some(t), Some(source)) => DatabaseSource::PointInTime {
                source,
                time: (t != "latest").then_some(t),
            },
            _ => {
                return Err(ActionError::permanent(
                    "`database.restore` takes `snapshot`, or `source` with `point_in_time`",
                ));
            }
        };
        let whole = |name: &str, default: i64, max: i64| -> TargetResult<u32> {
            let v = call.int(name, default)?;
            if !(1..=max).contains(&v) {
                return Err(ActionError::permanent(format!(
                    "`{name}` must be between 1 and {max}, not {v}"
                )));
            }
            Ok(v as u32)
        };
        let port = match call.int("port", 0)? {
            0 => None,
            p => Some(u16::try_from(p).ok().filter(|&p| p > 0).ok_or_else(|| {
                ActionError::permanent(format!("`port` {p} is not a TCP port number"))
            })?),
        };
        Ok(DatabaseRestore {
            engine: call.need("engine")?,
            from,
            instance_class: opt("instance_class"),
            cpus: whole("cpus", 1, 1024)?,
            memory_mib: whole("memory", 1024, 1 << 22)?,
            network: opt("network"),
            port,
            ready_timeout: call.duration("ready_timeout", Duration::from_secs(3600))?,
        })
    }
}

/// What `database.restore` made.
#[derive(Clone, Debug, Serialize)]
pub struct RestoredDatabase {
    pub id: String,
    /// `ADDRESS:PORT`.
    pub endpoint: String,
    pub address: String,
    pub port: u16,
    pub engine: String,
    pub instance_class: String,
}

/// Volumes: restored from recovery points or created empty.
#[async_trait]
pub trait Volumes: Send + Sync {
    async fn restore(&self, cx: &StepCx, req: VolumeRestore) -> TargetResult<RestoredVolume>;
    async fn create(&self, cx: &StepCx, req: VolumeCreate) -> TargetResult<CreatedVolume>;
    /// Removes what `restore` or `create` made for this node (finished or
    /// partial); nothing there is success.
    async fn delete(&self, cx: &StepCx) -> TargetResult<()>;
}

/// Recovery points taken where the stack runs: after a failover the
/// recovered machines are protected where they run, and a failback or a
/// cutover takes their final incremental.
#[async_trait]
pub trait Backups: Send + Sync {
    /// Takes one point of the disk (an earlier try's finished point is
    /// returned again).
    async fn backup(&self, cx: &StepCx, req: VolumeBackup) -> TargetResult<BackedUpVolume>;
    /// Undoes what `backup` did to the machine (resumes a VM it paused);
    /// the point stays: it is data, not a resource of the run.
    async fn release(&self, cx: &StepCx) -> TargetResult<()>;
}

/// Instances (VMs).
#[async_trait]
pub trait Instances: Send + Sync {
    /// Boots the instance, or adopts the one an earlier try of the same
    /// step left running.
    async fn launch(&self, cx: &StepCx, req: InstanceLaunch) -> TargetResult<LaunchedInstance>;
    /// Stops the instance made by node `name` of this run; stopping one
    /// that is not running is success.
    async fn stop(&self, cx: &StepCx, name: &str) -> TargetResult<()>;
    /// Removes the instance this node launched; nothing there is success.
    async fn terminate(&self, cx: &StepCx) -> TargetResult<()>;
}

/// Networks: private, with inbound rules, routed nowhere else.
#[async_trait]
pub trait Networks: Send + Sync {
    /// Makes the network, or adopts what an earlier try of the step made.
    async fn create(&self, cx: &StepCx, req: NetworkCreate) -> TargetResult<CreatedNetwork>;
    /// Removes what `create` made for this node; nothing there is success.
    async fn delete(&self, cx: &StepCx) -> TargetResult<()>;
}

/// Load balancers in front of instances.
#[async_trait]
pub trait LoadBalancers: Send + Sync {
    /// Makes the load balancer, or adopts what an earlier try of the step
    /// made.
    async fn create(
        &self,
        cx: &StepCx,
        req: LoadBalancerCreate,
    ) -> TargetResult<CreatedLoadBalancer>;
    /// Removes what `create` made for this node; nothing there is success.
    async fn delete(&self, cx: &StepCx) -> TargetResult<()>;
}

/// DNS records pointed at the rebuilt stack.
#[async_trait]
pub trait Dns: Send + Sync {
    /// Points the record at its target (a second try changes nothing more).
    async fn switch(&self, cx: &StepCx, req: DnsRecord) -> TargetResult<SwitchedRecord>;
    /// Puts back what the record held before this node switched it;
    /// nothing switched (or already put back) is success.
    async fn restore(&self, cx: &StepCx) -> TargetResult<()>;
}

/// Managed databases.
#[async_trait]
pub trait Databases: Send + Sync {
    /// Restores the database, or adopts what an earlier try started.
    async fn restore(&self, cx: &StepCx, req: DatabaseRestore) -> TargetResult<RestoredDatabase>;
    /// Removes what `restore` made for this node; nothing there is success.
    async fn delete(&self, cx: &StepCx) -> TargetResult<()>;
}

/// What `health()` found: each probe it made and how it went.
#[derive(Clone, Debug, Serialize)]
pub struct Health {
    pub target: String,
    pub ok: bool,
    pub probes: Vec<Probe>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// Hours in a month, as providers bill monthly prices by the hour.
pub const HOURS_PER_MONTH: f64 = 730.0;

/// One target type's prices and the figures planning assumes where no run
/// has measured them.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TargetPrices {
    /// Where its resources sit, for egress: `aws`, `gcp`, `azure` or
    /// `onprem` (no egress is charged out of an on-premises repository).
    pub cloud: String,
    /// One instance per hour by instance type; `default` for the rest.
    #[serde(default)]
    pub instance_hour: BTreeMap<String, f64>,
    /// Unit prices the target type reads (see its module documentation).
    #[serde(default)]
    pub unit: BTreeMap<String, f64>,
    /// Restore throughput in bytes of disk per second, until a run on this
    /// target has measured one.
    pub restore_bytes_per_sec: f64,
    /// Seconds from launch to ready, until a run has measured them.
    pub boot_secs: f64,
}

impl TargetPrices {
    pub fn unit(&self, name: &str) -> f64 {
        self.unit.get(name).copied().unwrap_or(0.0)
    }

    pub fn instance_hour(&self, kind: &str) -> f64 {
        self.instance_hour
            .get(kind)
            .or_else(|| self.instance_hour.get("default"))
            .copied()
            .unwrap_or(0.0)
    }
}

/// The disk a `volume.restore` will write, as the repository tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSize {
    pub size: u64,
    /// Bytes that hold data (not zero).
    pub data_bytes: u64,
}

/// Something a step will make, and what it costs.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct PlannedResource {
    /// What it is (`EC2 instance`, `EBS snapshot`, `QEMU VM`).
    pub kind: String,
    /// Its size and shape (`t3.small: 2 vCPU, 2048 MiB`).
    pub detail: String,
    /// Per hour while it exists.
    pub hourly: f64,
    /// Per month that it must exist for a failover to work (standby).
    pub monthly_standby: f64,
}

/// What a target says of one step before it runs ([`Target::forecast`]).
#[derive(Clone, Debug, Default)]
pub struct Planned {
    pub resources: Vec<PlannedResource>,
    /// Seconds the step takes, where no earlier run has measured it.
    pub secs: f64,
    /// One-off charges (requests to the provider).
    pub once_cost: f64,
}

/// A place a runbook can rebuild in.
#[async_trait]
pub trait Target: Send + Sync {
    /// The `targets[].type` it is registered under.
    fn kind(&self) -> &'static str;

    fn volumes(&self) -> Option<&dyn Volumes> {
        None
    }
    fn backups(&self) -> Option<&dyn Backups> {
        None
    }
    fn instances(&self) -> Option<&dyn Instances> {
        None
    }
    fn networks(&self) -> Option<&dyn Networks> {
        None
    }
    fn load_balancers(&self) -> Option<&dyn LoadBalancers> {
        None
    }
    fn dns(&self) -> Option<&dyn Dns> {
        None
    }
    fn databases(&self) -> Option<&dyn Databases> {
        None
    }

    /// The settings a runbook may give this type in `targets:` besides
    /// `type` and `parallelism`.
    fn settings(&self) -> &'static [&'static str] {
        &[]
    }

    /// Problems with the settings a runbook gives this target, found at
    /// validation (unknown keys by default; a type checks values too).
    fn check_settings(&self, settings: &serde_json::Map<String, Value>) -> Vec<String> {
        let known = self.settings();
        settings
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .map(|k| {
                if known.is_empty() {
                    format!("target type `{}` takes no setting `{k}`", self.kind())
                } else {
                    format!(
                        "target type `{}` takes no setting `{k}`; it takes: {}",
                        self.kind(),
                        known.join(", ")
                    )
                }
            })
            .collect()
    }

    /// Makes the same calls real work makes (tools found, credentials
    /// accepted, places writable), with no side effects.
    async fn health(&self, run: &Ctx, place: &Placement) -> Health;

    /// What a step of `action` will make here, how long it takes where no
    /// run has measured it, and what it costs at `prices`: for `ferry plan`,
    /// with no calls to the provider. `call` holds the inputs planning can
    /// know (those that depend on other steps' outputs are absent); `disk`
    /// is the point's disk for `volume.restore`, when the repository was
    /// read.
    fn forecast(
        &self,
        place: &Placement,
        action: TargetAction,
        call: &Call,
        disk: Option<&DiskSize>,
        prices: &TargetPrices,
    ) -> Planned {
        let _ = (place, call, disk);
        Planned {
            resources: Vec::new(),
            secs: match action.resource() {
                Resource::Instances if action == TargetAction::InstanceLaunch => prices.boot_secs,
                _ => 1.0,
            },
            once_cost: 0.0,
        }
    }
}

/// What `instance.launch` asks for in vCPUs and MiB, as far as planning
/// knows it (the defaults otherwise).
pub fn planned_shape(call: &Call) -> (u32, u32) {
    let n = |k: &str, d: i64| {
        call.int(k, d)
            .ok()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| v > 0)
    };
    (n("cpus", 1).unwrap_or(1), n("memory", 256).unwrap_or(256))
}

/// Whole GiB, rounded up (how clouds size volumes).
pub fn gib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 30)
}

/// Whether `target` offers `resource`.
pub fn offers(target: &dyn Target, resource: Resource) -> bool {
    match resource {
        Resource::Volumes => target.volumes().is_some(),
        Resource::Backups => target.backups().is_some(),
        Resource::Instances => target.instances().is_some(),
        Resource::Networks => target.networks().is_some(),
        Resource::LoadBalancers => target.load_balancers().is_some(),
        Resource::Dns => target.dns().is_some(),
        Resource::Databases => target.databases().is_some(),
    }
}

/// The catalog actions `target` implements.
pub fn actions_of(target: &dyn Target) -> Vec<TargetAction> {
    TargetAction::ALL
        .iter()
        .copied()
        .filter(|a| offers(target, a.resource()))
        .collect()
}

fn unsupported(target: &dyn Target, action: TargetAction) -> ActionError {
    ActionError::permanent(format!(
        "target type `{}` does not implement `{}`",
        target.kind(),
        action.name()
    ))
}

/// Runs one try of a target action: parses its typed request from the
/// step's inputs and calls the target.
pub async fn perform(
    target: &dyn Target,
    action: TargetAction,
    cx: &StepCx,
    call: &Call,
) -> TargetResult<Outputs> {
    let no = || unsupported(target, action);
    match action {
        TargetAction::VolumeRestore => {
            let req = VolumeRestore::parse(call)?;
            outputs(target.volumes().ok_or_else(no)?.restore(cx, req).await?)
        }
        TargetAction::VolumeCreate => {
            let req = VolumeCreate::parse(call)?;
            outputs(target.volumes().ok_or_else(no)?.create(cx, req).await?)
        }
        TargetAction::VolumeBackup => {
            let req = VolumeBackup::parse(call)?;
            outputs(target.backups().ok_or_else(no)?.backup(cx, req).await?)
        }
        TargetAction::InstanceLaunch => {
            let req = InstanceLaunch::parse(call)?;
            outputs(target.instances().ok_or_else(no)?.launch(cx, req).await?)
        }
        TargetAction::InstanceStop => {
            let name = call.need("name")?;
            target.instances().ok_or_else(no)?.stop(cx, &name).await?;
            Ok(Outputs::new())
        }
        TargetAction::NetworkCreate => {
            let req = NetworkCreate::parse(call)?;
            outputs(target.networks().ok_or_else(no)?.create(cx, req).await?)
        }
        TargetAction::LoadBalancerCreate => {
            let req = LoadBalancerCreate::parse(call)?;
            outputs(
                target
                    .load_balancers()
                    .ok_or_else(no)?
                    .create(cx, req)
                    .await?,
            )
        }
        TargetAction::DnsSwitch => {
            let req = DnsRecord::parse(call)?;
            outputs(target.dns().ok_or_else(no)?.switch(cx, req).await?)
        }
        TargetAction::DatabaseRestore => {
            let req = DatabaseRestore::parse(call)?;
            outputs(target.databases().ok_or_else(no)?.restore(cx, req).await?)
        }
    }
}

/// The built-in undo of a target action: what removes what it made, found
/// by the step's key alone (an undo sees no inputs).
pub async fn undo(target: &dyn Target, action: TargetAction, cx: &StepCx) -> TargetResult<()> {
    let no = || unsupported(target, action);
    match action {
        TargetAction::VolumeRestore | TargetAction::VolumeCreate => {
            target.volumes().ok_or_else(no)?.delete(cx).await
        }
        TargetAction::VolumeBackup => target.backups().ok_or_else(no)?.release(cx).await,
        TargetAction::InstanceLaunch => target.instances().ok_or_else(no)?.terminate(cx).await,
        TargetAction::NetworkCreate => target.networks().ok_or_else(no)?.delete(cx).await,
        TargetAction::LoadBalancerCreate => {
            target.load_balancers().ok_or_else(no)?.delete(cx).await
        }
        TargetAction::DnsSwitch => target.dns().ok_or_else(no)?.restore(cx).await,
        TargetAction::DatabaseRestore => target.databases().ok_or_else(no)?.delete(cx).await,
        // Stopping creates nothing; the engine gives it no undo.
        TargetAction::InstanceStop => Ok(()),
    }
}

fn outputs(v: impl Serialize) -> TargetResult<Outputs> {
    match serde_json::to_value(v) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ActionError::permanent(format!(
            "a target returned {other} instead of outputs"
        ))),
        Err(e) => Err(ActionError::permanent(format!(
            "a target's outputs cannot be recorded: {e}"
        ))),
    }
}

/// The targets this build has, by `targets[].type`.
#[derive(Clone)]
pub struct Registry {
    targets: BTreeMap<&'static str, Arc<dyn Target>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.targets.keys()).finish()
    }
}

impl Default for Registry {
    fn default() -> Registry {
        Registry::builtin()
    }
}

impl Registry {
    /// Every target type this build has.
    pub fn builtin() -> Registry {
        let mut r = Registry {
            targets: BTreeMap::new(),
        };
        r.register(Arc::new(local::Local));
        r.register(Arc::new(aws::AwsTarget::default()));
        r.register(Arc::new(libvirt::LibvirtTarget));
        r
    }

    pub fn register(&mut self, t: Arc<dyn Target>) {
        self.targets.insert(t.kind(), t);
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Target>> {
        self.targets.get(kind).cloned()
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        self.targets.keys().copied().collect()
    }

    /// [`Registry::check`] for every choice of `--target`: a runbook that
    /// names several targets must work on each of them. A problem that
    /// shows only with some choice says which.
    pub fn check_every_target(&self, rb: &ferry_engine::Runbook) -> Vec<Diagnostic> {
        let mut out = self.check(rb);
        if rb.targets.len() < 2 {
            return out;
        }
        for t in &rb.targets {
            let mut other = rb.clone();
            if other.retarget(&t.name).is_err() {
                continue;
            }
            for mut d in self.check(&other) {
                if out
                    .iter()
                    .any(|o| o.message == d.message && o.line == d.line)
                {
                    continue;
                }
                d.message = format!("with --target {}: {}", t.name, d.message);
                out.push(d);
            }
        }
        out
    }

    /// What validation cannot see from the runbook alone: every target type
    /// exists, and every step's target implements the step's action.
    pub fn check(&self, rb: &ferry_engine::Runbook) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for t in &rb.targets {
            let diag = |message: String, hint: Option<String>| Diagnostic {
                file: rb.file.clone(),
                line: t.line,
                column: t.column,
                message,
                hint,
            };
            let Some(target) = self.get(&t.kind) else {
                out.push(diag(
                    format!(
                        "target `{}` has type `{}`, which this build does not have",
                        t.name, t.kind
                    ),
                    Some(format!("this build has: {}", self.kinds().join(", "))),
                ));
                continue;
            };
            for message in target.check_settings(&t.settings) {
                out.push(diag(format!("target `{}`: {message}", t.name), None));
            }
        }
        for step in &rb.steps {
            let Some(action) = TargetAction::from_name(&step.uses) else {
                continue;
            };
            let Some(t) = rb.targets.get(step.target) else {
                continue;
            };
            let diag = |message: String, hint: String| Diagnostic {
                file: rb.file.clone(),
                line: step.line,
                column: step.column,
                message,
                hint: Some(hint),
            };
            match self.get(&t.kind) {
                // Reported once, at the target.
                None => {}
                Some(target) if !offers(target.as_ref(), action.resource()) => out.push(diag(
                    format!(
                        "step `{}` uses `{}` on target `{}` (type `{}`), which does not implement it",
                        step.id,
                        action.name(),
                        t.name,
                        t.kind
                    ),
                    format!(
                        "`{}` implements: {}",
                        t.kind,
                        actions_of(target.as_ref())
                            .iter()
                            .map(|a| a.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
                Some(_) => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalog_action_has_a_home() {
        // Each catalog action is a target action, a check, or one the
        // executor runs itself; a new catalog action must be placed.
        for a in ferry_engine::catalog::ACTIONS {
            let placed = TargetAction::from_name(a.name).is_some()
                || crate::actions::Builtin::from_name(a.name).is_some()
                || crate::checks::Check::from_name(a.name).is_some();
            assert!(placed, "catalog action `{}` has no implementation", a.name);
        }
        for a in TargetAction::ALL {
            assert!(
                ferry_engine::catalog::action(a.name()).is_some(),
                "`{}` is not in the catalog",
                a.name()
            );
        }
    }

    #[test]
    fn targets_implement_what_they_claim() {
        let r = Registry::builtin();
        let local = r.get("local").unwrap();
        assert_eq!(
            actions_of(local.as_ref()),
            vec![
                TargetAction::VolumeRestore,
                TargetAction::VolumeCreate,
                TargetAction::VolumeBackup,
                TargetAction::InstanceLaunch,
                TargetAction::InstanceStop,
                TargetAction::NetworkCreate,
            ]
        );
        // Points where the stack runs (volume.backup) are taken on local only.
        let but_backup = |all: Vec<TargetAction>| -> Vec<TargetAction> {
            all.into_iter()
                .filter(|a| *a != TargetAction::VolumeBackup)
                .collect()
        };
        let aws = r.get("aws").unwrap();
        assert_eq!(
            actions_of(aws.as_ref()),
            but_backup(TargetAction::ALL.to_vec())
        );
        // libvirt offers what local does.
        let libvirt = r.get("libvirt").unwrap();
        assert_eq!(
            actions_of(libvirt.as_ref()),
            but_backup(actions_of(local.as_ref()))
        );
        assert_eq!(r.kinds(), ["aws", "libvirt", "local"]);
    }

    fn call(uses: &str, inputs: serde_json::Value) -> Call {
        Call {
            node: "n".into(),
            key: "run/n".into(),
            uses: uses.into(),
            inputs: inputs.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn load_balancer_requests_are_parsed_once_with_errors_naming_the_input() {
        use serde_json::json;
        let lb = LoadBalancerCreate::parse(&call(
            "loadbalancer.create",
            json!({"listeners": ["http:80", "HTTP:8080"], "network": "vpc-1", "targets": ["i-1"], "health_check": "http:8080/healthz"}),
        ))
        .unwrap();
        assert_eq!(lb.kind, BalancerKind::Alb);
        assert!(lb.internal);
        assert_eq!(lb.listeners[1].port, 8080);
        assert_eq!(lb.health_check.unwrap().path.as_deref(), Some("/healthz"));
        let nlb = LoadBalancerCreate::parse(&call(
            "loadbalancer.create",
            json!({"listeners": "tcp:3306", "network": "vpc-1", "internal": false}),
        ))
        .unwrap();
        assert_eq!((nlb.kind, nlb.internal), (BalancerKind::Nlb, false));
        for (inputs, says) in [
            (
                json!({"listeners": ["http:80", "tcp:22"], "network": "v"}),
                "mix http",
            ),
            (
                json!({"listeners": ["tcp:22"], "network": "v", "kind": "alb"}),
                "`kind: alb`",
            ),
            (
                json!({"listeners": ["smtp:25"], "network": "v"}),
                "input `listeners`",
            ),
            (
                json!({"listeners": ["http:80"], "network": "v", "health_check": "udp:53"}),
                "input `health_check`",
            ),
            (
                json!({"listeners": ["http:80"], "network": "v", "target_port": 70000}),
                "`target_port`",
            ),
            (json!({"listeners": ["http:80"]}), "input `network`"),
        ] {
            let e = LoadBalancerCreate::parse(&call("loadbalancer.create", inputs.clone()))
                .unwrap_err()
                .message;
            assert!(e.contains(says), "{inputs}: {e}");
        }
    }

    #[test]
    fn dns_and_database_requests_are_parsed_once() {
        use serde_json::json;
        let d = DnsRecord::parse(&call(
            "dns.switch",
            json!({"zone": "example.com", "name": "www", "failover": {"primary": "203.0.113.1", "secondary": "lb.example", "health_check": "http:80/up"}}),
        ))
        .unwrap();
        assert_eq!(d.ttl, 60);
        assert!(
            matches!(d.target, DnsTarget::Failover { ref secondary, .. } if secondary == "lb.example")
        );
        for (inputs, says) in [
            (json!({"zone": "z", "name": "n"}), "needs one of"),
            (
                json!({"zone": "z", "name": "n", "values": ["1.2.3.4"], "alias": "x"}),
                "takes only one of",
            ),
            (
                json!({"zone": "z", "name": "n", "failover": {"primary": "a"}}),
                "needs `secondary`",
            ),
            (
                json!({"zone": "z", "name": "n", "values": ["1.2.3.4"], "type": "BOGUS"}),
                "input `type`",
            ),
            (
                json!({"zone": "z", "name": "n", "values": ["1.2.3.4"], "ttl": 0}),
                "`ttl`",
            ),
        ] {
            let e = DnsRecord::parse(&call("dns.switch", inputs.clone()))
                .unwrap_err()
                .message;
            assert!(e.contains(says), "{inputs}: {e}");
        }
        let db = DatabaseRestore::parse(&call(
            "database.restore",
            json!({"engine": "postgres", "source": "prod", "point_in_time": "latest"}),
        ))
        .unwrap();
        assert_eq!(
            db.from,
            DatabaseSource::PointInTime {
                source: "prod".into(),
                time: None
            }
        );
        assert_eq!((db.cpus, db.memory_mib), (1, 1024));
        for (inputs, says) in [
            (json!({"engine": "mysql"}), "needs one of"),
            (
                json!({"engine": "mysql", "point_in_time": "latest"}),
                "`point_in_time` needs `source`",
            ),
            (
                json!({"engine": "mysql", "snapshot": "s", "source": "x"}),
                "`source` needs `point_in_time`",
            ),
            (
                json!({"engine": "mysql", "source": "x", "point_in_time": "yesterday"}),
                "input `point_in_time`",
            ),
            (json!({"snapshot": "s"}), "input `engine`"),
        ] {
            let e = DatabaseRestore::parse(&call("database.restore", inputs.clone()))
                .unwrap_err()
                .message;
            assert!(e.contains(says), "{inputs}: {e}");
        }
    }

    /// A target that offers volumes only, to see validation name what is missing.
    struct VolumesOnly;

    #[async_trait]
    impl Target for VolumesOnly {
        fn kind(&self) -> &'static str {
            "volumes-only"
        }
        fn volumes(&self) -> Option<&dyn Volumes> {
            local::Local
                .volumes()
                .map(|_| &local::Local as &dyn Volumes)
        }
        async fn health(&self, _run: &Ctx, _place: &Placement) -> Health {
            Health {
                target: self.kind().into(),
                ok: true,
                probes: Vec::new(),
            }
        }
    }

    #[test]
    fn validation_names_the_target_and_the_action_it_lacks() {
        let mut r = Registry::builtin();
        r.register(Arc::new(VolumesOnly));
        let text = "version: 1\nname: t\ntargets:\n  small:\n    type: local\nsteps:\n  - id: vm\n    uses: instance.launch\n    target: small\n    with: {kernel: /k}\n";
        let mut rb = ferry_engine::parse("t.yaml", text).unwrap();
        assert!(r.check(&rb).is_empty());
        rb.targets[0].kind = "volumes-only".into();
        let d = r.check(&rb);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].message.contains("`instance.launch`") && d[0].message.contains("volumes-only"),
            "{}",
            d[0].message
        );
        assert_eq!(
            (d[0].line, d[0].column),
            (rb.steps[0].line, rb.steps[0].column)
        );
        rb.targets[0].kind = "nowhere".into();
        assert!(r.check(&rb)[0].message.contains("does not have"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("x"), None);
    }
}
