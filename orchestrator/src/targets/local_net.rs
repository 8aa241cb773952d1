//! Networks on the local target. QEMU's user-mode network gives each VM a
//! private stack of its own; a `network.create` network joins them the way a
//! cloud subnet would, as far as the runbook can tell:
//!
//! - each VM on the network gets the next free address of the network's
//!   first subnet (from `.10`), as its DHCP address and in the settings the
//!   guest reads from QEMU's firmware configuration (`opt/ferry/net`:
//!   `address=IP/PREFIX`, `gateway=IP`), and reports it as `private_ip`;
//! - a VM reaches, at their addresses, the TCP ports of the members launched
//!   before it that the network's ingress rules let in from its address
//!   (QEMU `guestfwd`); the DAG orders launches, so a web tier launched after
//!   its database reaches it;
//! - nothing else: the network is `restrict=on`, routed nowhere.
//!
//! `WORK/NODE.net/` holds the request (`network.json`) and one file per
//! address handed out (`members/IP`, the VM's node and forwarded ports),
//! made with `O_EXCL` so that VMs launched at once never share an address.

use super::{CreatedNetwork, NetworkCreate, Networks, StepCx, TargetResult};
use crate::step::{ActionError, file_stem};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// What `network.create` asked for, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Recorded {
    cidr: String,
    subnets: Vec<String>,
    ingress: Vec<String>,
}

/// One member: the VM's node and its ports as forwarded on the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Member {
    node: String,
    #[serde(default)]
    ports: BTreeMap<String, String>,
}

/// An IPv4 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub net: Ipv4Addr,
    pub prefix: u8,
}

impl Range {
    pub fn parse(s: &str) -> Option<Range> {
        let (ip, bits) = s.split_once('/')?;
        let ip: Ipv4Addr = ip.trim().parse().ok()?;
        let prefix: u8 = bits.trim().parse().ok().filter(|&b| b <= 32)?;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        Some(Range {
            net: Ipv4Addr::from(u32::from(ip) & mask),
            prefix,
        })
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.net)
    }

    fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) + n)
    }

    fn size(&self) -> u32 {
        1u32.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0)
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// `tcp/PORT[-PORT] [from CIDR]`: what a network lets in. Local networks
/// carry TCP only (QEMU forwards TCP); other protocols are refused at
/// creation rather than silently dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rule {
    ports: (u16, u16),
    from: Option<Range>,
}

impl Rule {
    fn parse(s: &str) -> Result<Rule, String> {
        let mut words = s.split_whitespace();
        let what = words.next().unwrap_or_default();
        let from = match (words.next(), words.next(), words.next()) {
            (None, ..) => None,
            (Some("from"), Some(c), None) => Some(
                Range::parse(c)
                    .ok_or_else(|| format!("ingress `{s}`: `{c}` is not an IPv4 range"))?,
            ),
            _ => return Err(format!("ingress `{s}`: write PROTO/PORT [from CIDR]")),
        };
        let Some((proto, ports)) = what.split_once('/') else {
            return Err(format!(
                "ingress `{s}`: write PROTO/PORT [from CIDR], e.g. tcp/80"
            ));
        };
        if !proto.eq_ignore_ascii_case("tcp") {
            return Err(format!(
                "ingress `{s}`: the local target carries TCP only (QEMU user networking)"
            ));
        }
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|&p| p > 0);
        let ports = match ports.split_once('-') {
            Some((a, b)) => port(a).zip(port(b)).filter(|(a, b)| a <= b),
            None => port(ports).map(|p| (p, p)),
        }
        .ok_or_else(|| {
            format!("ingress `{s}`: `{ports}` is not a port or a range like 8000-8100")
        })?;
        Ok(Rule { ports, from })
    }

    fn lets_in(&self, from: Ipv4Addr, port: u16) -> bool {
        (self.ports.0..=self.ports.1).contains(&port) && self.from.is_none_or(|r| r.contains(from))
    }
}

fn io(path: &Path, e: std::io::Error) -> ActionError {
    ActionError::permanent(format!("{}: {e}", path.display()))
}

/// The network's directory for a `network.create` output `id`: the id is
/// the directory's name in the run's work directory, never a path.
fn dir_of(cx: &StepCx, id: &str) -> TargetResult<PathBuf> {
    let plain = !id.is_empty()
        && id.ends_with(".net")
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if !plain {
        return Err(ActionError::permanent(format!(
            "network `{id}` is not a local network: give a network.create output `id`"
        )));
    }
    let dir = cx.run.work_dir.join(id);
    if !dir.join("network.json").exists() {
        return Err(ActionError::permanent(format!(
            "network `{id}` does not exist in this run (was its network.create step undone?)"
        )));
    }
    Ok(dir)
}

/// Where a VM joins a local network: its address and what it may reach.
#[derive(Debug, Clone)]
pub struct Joined {
    pub dir: PathBuf,
    pub ip: Ipv4Addr,
    pub subnet: Range,
    /// `PEER_IP:PORT` -> `127.0.0.1:HOSTPORT` of earlier members this VM may reach.
    pub peers: Vec<(String, String)>,
}

impl Joined {
    /// The QEMU `-netdev user` options that put the VM at its address.
    pub fn netdev(&self) -> String {
        format!(",net={},dhcpstart={}", self.subnet, self.ip)
    }

    /// What the guest reads from `opt/ferry/net`.
    pub fn guest_settings(&self) -> String {
        format!(
            "address={}/{}\ngateway={}\n",
            self.ip,
            self.subnet.prefix,
            self.subnet.host(2)
        )
    }

    /// Records the VM's forwarded ports, for members launched after it.
    pub fn record_ports(&self, node: &str, ports: &BTreeMap<String, String>) -> TargetResult<()> {
        let path = self.dir.join("members").join(self.ip.to_string());
        let m = Member {
            node: node.to_owned(),
            ports: ports.clone(),
        };
        let text = serde_json::to_vec(&m).unwrap_or_default();
        crate::fsutil::write_private(&path, &text).map_err(|e| io(&path, e))
    }
}

/// Gives `node` an address on network `id` (the one it had, on a later try)
/// and finds what it may reach.
pub fn join(cx: &StepCx, id: &str) -> TargetResult<Joined> {
    let dir = dir_of(cx, id)?;
    let path = dir.join("network.json");
    let rec: Recorded = std::fs::read(&path)
        .map_err(|e| io(&path, e))
        .and_then(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| ActionError::permanent(format!("{}: {e}", path.display())))
        })?;
    let subnet = rec.subnets.first().unwrap_or(&rec.cidr).as_str();
    let subnet = Range::parse(subnet).ok_or_else(|| {
        ActionError::permanent(format!("network {id}: `{subnet}` is not a range"))
    })?;
    let rules = rec
        .ingress
        .iter()
        .map(|r| Rule::parse(r).map_err(ActionError::permanent))
        .collect::<TargetResult<Vec<_>>>()?;
    let members = dir.join("members");
    let mut ip = None;
    let mut taken = Vec::new();
    // `.0` is the network, `.1`-`.3` QEMU's gateway and DNS; from `.10`.
    for n in 10..subnet.size().saturating_sub(1) {
        let candidate = subnet.host(n);
        let file = members.join(candidate.to_string());
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode_private()
            .open(&file)
        {
            Ok(mut f) => {
                let m = Member {
                    node: cx.node.clone(),
                    ports: BTreeMap::new(),
                };
                f.write_all(&serde_json::to_vec(&m).unwrap_or_default())
                    .map_err(|e| io(&file, e))?;
                ip = Some(candidate);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let held: Option<Member> = std::fs::read(&file)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                match held {
                    Some(m) if m.node == cx.node => {
                        ip = Some(candidate);
                        break;
                    }
                    Some(m) => taken.push((candidate, m)),
                    // Being written by a launch that started at the same instant.
                    None => {}
                }
            }
            Err(e) => return Err(io(&file, e)),
        }
    }
    let ip = ip.ok_or_else(|| {
        ActionError::permanent(format!("network {id}: no address left in {subnet}"))
    })?;
    // Members after ours in address order were handed out after ours, and
    // may still be booting: reach every member that recorded its ports.
    if let Ok(entries) = std::fs::read_dir(&members) {
        for e in entries.flatten() {
            let Some(peer) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if peer == ip || taken.iter().any(|(t, _)| *t == peer) {
                continue;
            }
            if let Some(m) = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<Member>(&b).ok())
            {
                taken.push((peer, m));
            }
        }
    }
    let mut peers = Vec::new();
    for (peer, m) in &taken {
        for (guest, host) in &m.ports {
            let Ok(port) = guest.parse::<u16>() else {
                continue;
            };
            if rules.iter().any(|r| r.lets_in(ip, port)) {
                peers.push((format!("{peer}:{port}"), host.clone()));
            }
        }
    }
    peers.sort();
    Ok(Joined {
        dir,
        ip,
        subnet,
        peers,
    })
}

trait PrivateOpen {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateOpen for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

#[async_trait]
impl Networks for super::local::Local {
    /// Records the network in `WORK/NODE.net/`; a later try with the same
    /// request finds it and changes nothing.
    async fn create(&self, cx: &StepCx, req: NetworkCreate) -> TargetResult<CreatedNetwork> {
        for r in &req.ingress {
            Rule::parse(r).map_err(ActionError::permanent)?;
        }
        let id = format!("{}.net", file_stem(&cx.node));
        let dir = cx.run.work_dir.join(&id);
        let rec = Recorded {
            cidr: req.cidr.clone(),
            subnets: req.subnets.clone(),
            ingress: req.ingress.clone(),
        };
        let path = dir.join("network.json");
        let existing: Option<Recorded> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if existing.as_ref() != Some(&rec) {
            crate::fsutil::create_private_dir(&cx.run.work_dir)
                .map_err(|e| io(&cx.run.work_dir, e))?;
            crate::fsutil::create_private_dir(&dir).map_err(|e| io(&dir, e))?;
            crate::fsutil::create_private_dir(&dir.join("members")).map_err(|e| io(&dir, e))?;
            let text = serde_json::to_vec_pretty(&rec).unwrap_or_default();
            crate::fsutil::write_private(&path, &text).map_err(|e| io(&path, e))?;
        }
        Ok(CreatedNetwork {
            id: id.clone(),
            subnets: if req.subnets.is_empty() {
                vec![req.cidr]
            } else {
                req.subnets
            },
            security_group: id,
        })
    }

    async fn delete(&self, cx: &StepCx) -> TargetResult<()> {
        let dir = cx.run.work_dir.join(format!("{}.net", file_stem(&cx.node)));
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&dir, e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_ranges() {
        let r = Rule::parse("tcp/3306 from 10.42.1.0/24").expect("rule");
        assert!(r.lets_in("10.42.1.10".parse().expect("ip"), 3306));
        assert!(!r.lets_in("10.42.2.10".parse().expect("ip"), 3306));
        assert!(!r.lets_in("10.42.1.10".parse().expect("ip"), 80));
        let any = Rule::parse("tcp/8000-8100").expect("range");
        assert!(any.lets_in("192.0.2.1".parse().expect("ip"), 8050));
        assert!(Rule::parse("udp/53").unwrap_err().contains("TCP only"));
        assert!(Rule::parse("tcp/http").is_err());
        assert!(Rule::parse("tcp/80 to 10.0.0.0/8").is_err());
        let s = Range::parse("10.42.1.7/24").expect("range");
        assert_eq!(s.to_string(), "10.42.1.0/24");
        assert_eq!(s.host(10).to_string(), "10.42.1.10");
        assert_eq!(s.size(), 256);
    }
}
