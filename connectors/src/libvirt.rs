//! A libvirt host, reached through `virsh`: storage pools and volumes,
//! isolated networks, domains, and pull-mode backups through checkpoints (the
//! agentless source of VMs libvirt manages). It knows nothing of runbooks; the
//! `libvirt` target builds on it.
//!
//! Why `virsh` and not libvirt's C library: the `ferry` binary then runs, and
//! links, on machines without libvirt; only the hosts that use this connector
//! need `libvirt-clients`. Every call is one `virsh -q -c URI ...` process with
//! an explicit argument vector (never a shell), `LC_ALL=C` (so messages can be
//! classified), bounded output, and a timeout after which the process is
//! killed. Failures name the command, the URI and what virsh printed, plus
//! the next step.
//!
//! Everything Ferry creates can be found again after a crash, from libvirt
//! alone:
//! - domains carry a `<metadata>` element in Ferry's namespace ([`METADATA_NS`])
//!   with the run and the step that made them;
//! - volumes and networks have names that start with [`Tag::prefix`]
//!   (`ferry-RUN_`), since libvirt 9 keeps no metadata for them.
//!
//! [`Connection::list_tagged`] and [`Connection::teardown`] use exactly that.
//! Storage pools are the host's configuration (where a target puts disks),
//! not a run's objects: [`Connection::ensure_dir_pool`] makes sure one exists,
//! and teardown leaves pools alone.
//!
//! Every create is idempotent under the caller's name (a domain that already
//! exists is adopted and started, a network that exists is checked and
//! started, a volume is uploaded again), and every delete treats "already
//! gone" as done, so a step can always be retried and undone.
//!
//! Files libvirt hands to QEMU (volumes, kernels, initrds) must be reachable by
//! the user QEMU runs as (`libvirt-qemu` on Debian): every directory above them
//! must be searchable by that user.

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use ferry_agent::Retry;
use quick_xml::events::Event;
use tracing::{debug, info, warn};

use crate::nbd::{Addr, NbdUrl};

/// The connection URI used unless the caller gives one.
pub const DEFAULT_URI: &str = "qemu:///system";
/// The XML namespace of the `<metadata>` element Ferry puts in its domains.
pub const METADATA_NS: &str = "http://ferry.invalid/xmlns/libvirt/1";
/// The element (in [`METADATA_NS`]) that carries a domain's run and step.
const METADATA_ELEMENT: &str = "tag";
/// What every name of a volume or network Ferry creates starts with.
pub const NAME_PREFIX: &str = "ferry-";
/// The most virsh may print on stdout (a domain's or the host's XML is far
/// smaller); more is an error, not a memory problem.
const MAX_STDOUT: usize = 8 << 20;
/// The most of virsh's stderr kept for error messages.
const MAX_STDERR: usize = 64 << 10;
/// The PCI slot of a domain's user-mode interface: the first after the host
/// bridge and the ISA bridge, so the guest sees it first.
const USER_NIC_SLOT: u8 = 0x02;
/// The PCI slot of a domain's first disk; the others follow (at most 26,
/// up to slot `0x1c`).
const FIRST_DISK_SLOT: u8 = 0x03;
/// The PCI slots of a domain's network interfaces, after every disk.
const NETWORK_SLOTS: [u8; 3] = [0x1d, 0x1e, 0x1f];
/// How fast an upload is assumed to go at worst, to scale its timeout.
const UPLOAD_BYTES_PER_SEC: u64 = 20 << 20;

/// What went wrong on a libvirt host. Every variant that comes from a virsh
/// call names the command and the URI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot run {}: {source}; install libvirt-clients (Debian: `apt-get install libvirt-clients`, or scripts/setup-libvirt) or give the path to virsh",
        virsh.display()
    )]
    NoVirsh {
        virsh: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "`{command}`: cannot reach libvirt at {uri}: {stderr}; is libvirtd running? Start it with `/usr/sbin/virtlogd -d; /usr/sbin/libvirtd -d` (or `service libvirtd start`), and check that this user may use {uri} (root, or a member of the group libvirt)"
    )]
    Unreachable {
        command: String,
        uri: String,
        stderr: String,
    },
    /// The object the command names does not exist.
    #[error("`{command}` at {uri}: {stderr}")]
    NotFound {
        command: String,
        uri: String,
        stderr: String,
    },
    /// libvirt is busy with the same object (another job holds its lock).
    #[error(
        "`{command}` at {uri}: {stderr}; another operation holds the object, try again when it has finished"
    )]
    Busy {
        command: String,
        uri: String,
        stderr: String,
    },
    /// virsh refused or failed; `hint` is the next step when Ferry knows one.
    #[error("`{command}` at {uri} failed: {stderr}{}", hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    Failed {
        command: String,
        uri: String,
        stderr: String,
        hint: Option<String>,
    },
    #[error(
        "`{command}` at {uri} did not finish within {} s and was stopped; does libvirtd answer? (`virsh -c {uri} list`)",
        after.as_secs()
    )]
    Timeout {
        command: String,
        uri: String,
        after: Duration,
    },
    #[error("`{command}` at {uri}: {doing}: {source}")]
    Io {
        command: String,
        uri: String,
        doing: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` at {uri} printed more than {limit} bytes; Ferry stopped reading it")]
    TooMuchOutput {
        command: String,
        uri: String,
        limit: usize,
    },
    /// virsh succeeded but printed something Ferry cannot use.
    #[error("`{command}` at {uri}: unexpected output: {detail}")]
    Unexpected {
        command: String,
        uri: String,
        detail: String,
    },
    /// An object of that name exists and is not what the caller asked for.
    #[error("{what} already exists at {uri} and differs: {detail}; {next}")]
    Conflict {
        uri: String,
        what: String,
        detail: String,
        next: String,
    },
    /// The caller's input cannot work (a bad name, a range outside its CIDR).
    #[error("{0}")]
    Invalid(String),
    #[error("{doing} {}: {source}", path.display())]
    File {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "libvirt at {uri} cannot run QEMU guests (its capabilities have no domain type 'qemu'); install qemu-system-x86 (scripts/setup-vm) and restart libvirtd"
    )]
    NoQemu { uri: String },
}

/// The connector's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether trying again may help. Exhaustive on purpose: a new variant must
    /// decide.
    pub fn retry(&self) -> Retry {
        match self {
            Error::Unreachable { .. }
            | Error::Busy { .. }
            | Error::Timeout { .. }
            | Error::Io { .. } => Retry::Transient,
            Error::NoVirsh { .. }
            | Error::NotFound { .. }
            | Error::Failed { .. }
            | Error::TooMuchOutput { .. }
            | Error::Unexpected { .. }
            | Error::Conflict { .. }
            | Error::Invalid(_)
            | Error::File { .. }
            | Error::NoQemu { .. } => Retry::Never,
        }
    }

    /// Whether the object a command named does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// Whether virsh failed saying `what` (messages are read with `LC_ALL=C`).
    fn says(&self, what: &str) -> bool {
        match self {
            Error::Failed { stderr, .. }
            | Error::NotFound { stderr, .. }
            | Error::Busy { stderr, .. } => stderr.contains(what),
            _ => false,
        }
    }

    /// The same failure with a next step, when it is a plain failure.
    fn with_hint(self, next: &str) -> Error {
        match self {
            Error::Failed {
                command,
                uri,
                stderr,
                hint: None,
            } => Error::Failed {
                command,
                uri,
                stderr,
                hint: Some(next.to_string()),
            },
            e => e,
        }
    }
}

/// Which run and step an object belongs to. Run ids are letters, digits and
/// `-` (the orchestrator's `YYYYMMDD-HHMMSS-xxxxxx`), so the name prefix
/// `ferry-RUN_` of one run never starts another run's prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    run: String,
    step: String,
}

impl Tag {
    /// A tag for objects of `run` made by `step`.
    pub fn new(run: &str, step: &str) -> Result<Tag> {
        check_run(run)?;
        if step.is_empty()
            || step.len() > 64
            || step.starts_with('.')
            || !step
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(Error::Invalid(format!(
                "step {step:?} cannot tag a libvirt object: use 1 to 64 letters, digits, -, _ and ., not starting with ."
            )));
        }
        Ok(Tag {
            run: run.to_string(),
            step: step.to_string(),
        })
    }

    pub fn run(&self) -> &str {
        &self.run
    }

    pub fn step(&self) -> &str {
        &self.step
    }

    /// What the names of this run's volumes and networks start with.
    pub fn prefix(&self) -> String {
        run_prefix(&self.run)
    }

    /// The libvirt name of this run's object called `name`.
    pub fn object_name(&self, name: &str) -> Result<String> {
        check_name("name", name)?;
        Ok(format!("{}{name}", self.prefix()))
    }
}

fn run_prefix(run: &str) -> String {
    format!("{NAME_PREFIX}{run}_")
}

fn check_run(run: &str) -> Result<()> {
    if run.is_empty()
        || run.len() > 64
        || !run.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(Error::Invalid(format!(
            "run id {run:?} cannot tag libvirt objects: use 1 to 64 letters, digits and -"
        )));
    }
    Ok(())
}

/// Names Ferry gives libvirt: letters, digits, `.`, `_` and `-`, not starting
/// with `-` or `.`, so they are never options, paths or XML.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} {name:?} is not a valid libvirt name for Ferry: use up to 100 letters, digits, ., _ and -, not starting with . or -"
        )))
    }
}

/// A disk image's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to reach a libvirt host.
#[derive(Debug, Clone)]
pub struct Options {
    /// The connection URI (`qemu:///system`, `qemu+ssh://host/system`, ...).
    pub uri: String,
    /// The virsh program.
    pub virsh: PathBuf,
    /// How long one virsh call may take (uploads get more, by size).
    pub timeout: Duration,
    /// The user QEMU runs as (`user` in /etc/libvirt/qemu.conf): pull-mode
    /// backup sockets are created in a directory it owns.
    pub qemu_user: String,
    /// Where private directories for backup sockets are made (this machine
    /// must be the libvirt host for pull-mode backups).
    pub scratch_dir: PathBuf,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            uri: DEFAULT_URI.to_string(),
            virsh: PathBuf::from("virsh"),
            timeout: Duration::from_secs(60),
            qemu_user: "libvirt-qemu".to_string(),
            scratch_dir: std::env::temp_dir(),
        }
    }
}

/// A libvirt host.
#[derive(Debug, Clone)]
pub struct Connection {
    opts: Options,
}

/// What a health check saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub uri: String,
    /// Every storage pool, active or not.
    pub pools: Vec<String>,
    /// Every network, active or not.
    pub networks: Vec<String>,
}

/// A volume in a storage pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub pool: String,
    pub name: String,
    /// Its file on the host, what a domain's disk points at.
    pub path: PathBuf,
}

/// An IPv4 network in CIDR notation, `10.77.0.0/24`, with a prefix of 8 to
/// 30 and no host bits set (parse it from a string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    pub fn network(self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    fn mask(self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// Whether `ip` is a host address of this network (not the network or
    /// broadcast address).
    pub fn is_host(self, ip: Ipv4Addr) -> bool {
        let (ip, net, mask) = (u32::from(ip), u32::from(self.network), self.mask());
        ip & mask == net && ip != net && ip != net | !mask
    }

    /// The first host address, which the host side of the network takes.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }
}

impl FromStr for Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Cidr> {
        let bad = |why: &str| {
            Error::Invalid(format!(
                "{s:?} is not an IPv4 CIDR like 10.77.0.0/24: {why}"
            ))
        };
        let (ip, prefix) = s.split_once('/').ok_or_else(|| bad("no /PREFIX"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad("bad address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("bad prefix"))?;
        if !(8..=30).contains(&prefix) {
            return Err(bad("the prefix must be 8 to 30"));
        }
        let cidr = Cidr {
            network: ip,
            prefix,
        };
        if u32::from(ip) & !cidr.mask() != 0 {
            return Err(bad("host bits are set; give the network address"));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// An isolated network: a bridge with no `<forward>`, so nothing routes out
/// of it, and no DNS forwarding either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// The caller's name; libvirt's is [`Tag::object_name`] of it.
    pub name: String,
    pub cidr: Cidr,
    /// The addresses DHCP hands out, first and last; none, no DHCP.
    pub dhcp: Option<(Ipv4Addr, Ipv4Addr)>,
}

/// A network Ferry made or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// libvirt's name (with the run prefix).
    pub name: String,
    /// False when it was there already (and matched).
    pub created: bool,
}

/// One disk of a domain: `vda`, `vdb`, ... in order, on virtio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// A volume's path ([`Volume::path`]) or any image file QEMU can reach.
    pub path: PathBuf,
    pub format: Format,
}

/// How a domain boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// From its first disk.
    Disk,
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// A TCP port of the host's loopback forwarded to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// On 127.0.0.1 of the host.
    pub host: u16,
    pub guest: u16,
}

/// A domain's network interface.
///
/// The guest sees a user-mode interface first (it is the one a guest that
/// configures only its first interface, `eth0`, sets up) and the network
/// interfaces after it, in order. Every PCI slot is fixed, so the order holds
/// whatever the number of disks: the user-mode interface at slot 2, disks
/// from slot 3 (`vda` first), network interfaces at `0x1d` to `0x1f`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nic {
    /// Attached to a libvirt network (libvirt's name, [`Network::name`]),
    /// with the MAC address given ([`mac_for`], so that the guest can tell
    /// the interface apart and an address can be reserved for it before the
    /// domain exists) or, without one, the address libvirt picks.
    Network {
        network: String,
        mac: Option<String>,
    },
    /// QEMU user-mode networking, restricted (the guest reaches nothing
    /// outside), with forwards from the host's loopback.
    User { forwards: Vec<PortForward> },
}

/// A domain to define and start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub disks: Vec<Disk>,
    pub boot: Boot,
    /// At most one [`Nic::User`] and three [`Nic::Network`]; none, no network.
    pub nics: Vec<Nic>,
    /// The serial console is written here (by virtlogd, so its directory
    /// needs no access for QEMU's user).
    pub serial_log: PathBuf,
    /// Entries of QEMU's firmware configuration (`opt/...` names and their
    /// text), which the guest reads under `/sys/firmware/qemu_fw_cfg`: what
    /// a cloud's metadata service would tell it (its address, user data).
    /// They are in the domain's definition, which only libvirt's
    /// administrators read.
    pub fw_cfg: Vec<(String, String)>,
}

/// An address held on a network for one interface: a DHCP host entry, so
/// that libvirt, which makes one update of a network at a time, is what
/// keeps two guests from holding the same address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub ip: Ipv4Addr,
    /// The prefix of the network's addresses (what the guest's netmask is).
    pub prefix: u8,
}

/// The MAC address Ferry gives `domain`'s interface on `network`: the same
/// for the same pair (a retried launch finds the address it reserved, even
/// when the crash came before the domain was defined), in QEMU's locally
/// administered range `52:54:00`. FNV-1a: stable across builds, unlike the
/// standard library's hasher.
pub fn mac_for(domain: &str, network: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in domain.bytes().chain([b'/']).chain(network.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn check_mac(mac: &str) -> Result<()> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{mac:?} is not a MAC address like 52:54:00:12:34:56"
        )))
    }
}

/// A firmware configuration name QEMU takes: `opt/` and at most 55 bytes.
fn check_fw_cfg_name(name: &str) -> Result<()> {
    let ok = name.starts_with("opt/")
        && name.len() <= 55
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "firmware configuration name {name:?}: use opt/ then letters, digits, /, ., _ and -, 55 bytes at most"
        )))
    }
}

/// What a network's definition says about its addresses: its first IPv4
/// `<ip>` with a DHCP range, and the host entries of that range.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DhcpPool {
    host: Ipv4Addr,
    prefix: u8,
    first: Ipv4Addr,
    last: Ipv4Addr,
    /// `(mac, ip)` of every DHCP host entry.
    hosts: Vec<(String, Ipv4Addr)>,
}

fn dhcp_pool(xml: &str) -> std::result::Result<Option<DhcpPool>, String> {
    let Some(range) = elements(xml, &["network", "ip", "dhcp", "range"])?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let addr = |e: &Element, k: &str| -> std::result::Result<Ipv4Addr, String> {
        e.attr(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("<{k}> is not an IPv4 address"))
    };
    let (first, last) = (addr(&range, "start")?, addr(&range, "end")?);
    let mut ips = Vec::new();
    for ip in elements(xml, &["network", "ip"])? {
        if ip.attr("family").is_some_and(|f| f != "ipv4") {
            continue;
        }
        let host = addr(&ip, "address")?;
        let prefix = match (ip.attr("prefix"), ip.attr("netmask")) {
            (Some(p), _) => p.parse::<u8>().map_err(|e| e.to_string())?,
            (None, Some(m)) => {
                let m: Ipv4Addr = m.parse().map_err(|_| "bad netmask".to_string())?;
                u32::from(m).leading_ones() as u8
            }
            (None, None) => 24,
        };
        ips.push((host, prefix));
    }
    // The <ip> whose addresses hold the range.
    let Some(&(host, prefix)) = ips.iter().find(|(host, prefix)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
        u32::from(*host) & mask == u32::from(first) & mask
    }) else {
        return Ok(None);
    };
    let hosts = elements(xml, &["network", "ip", "dhcp", "host"])?
        .iter()
        .filter_map(|h| {
            Some((
                h.attr("mac")?.to_ascii_lowercase(),
                h.attr("ip")?.parse().ok()?,
            ))
        })
        .collect();
    Ok(Some(DhcpPool {
        host,
        prefix,
        first,
        last,
        hosts,
    }))
}

/// A domain Ferry started or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    /// True when a domain of that name existed and was taken over (and started
    /// if it was not running) instead of defined.
    pub adopted: bool,
}

/// Objects of one run, as libvirt has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tagged {
    pub domains: Vec<String>,
    pub networks: Vec<String>,
    /// `(pool, volume)`, in active pools.
    pub volumes: Vec<(String, String)>,
}

impl Tagged {
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty() && self.networks.is_empty() && self.volumes.is_empty()
    }
}

/// A running pull-mode backup job: an NBD export of one disk at the instant
/// it began, served by QEMU on a unix socket in a private directory. End it
/// with [`Connection::backup_end`]; the directory goes when this is dropped.
#[derive(Debug)]
pub struct PullBackup {
    pub domain: String,
    pub disk: String,
    /// The checkpoint this backup created: the next incremental starts from it.
    pub checkpoint: String,
    /// The export; for an incremental, its `bitmap` names the dirty bitmap
    /// (so [`crate::nbd::NbdSource`] reads the change map from it).
    pub url: NbdUrl,
    dir: tempfile::TempDir,
}

impl PullBackup {
    /// The meta context of the blocks changed since the previous checkpoint
    /// (`qemu:dirty-bitmap:backup-vda`), for an incremental.
    pub fn bitmap_context(&self) -> Option<String> {
        self.url.bitmap_context()
    }

    /// The URL as `ferry backup` takes it, `?bitmap=` included.
    pub fn source_url(&self) -> String {
        match &self.url.bitmap {
            Some(b) => format!("{}&bitmap={b}", self.url),
            None => self.url.to_string(),
        }
    }

    /// The private directory holding the socket and the scratch image.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Connection {
    pub fn new(opts: Options) -> Connection {
        Connection { opts }
    }

    /// `qemu:///system` with the default options.
    pub fn system() -> Connection {
        Connection::new(Options::default())
    }

    pub fn uri(&self) -> &str {
        &self.opts.uri
    }

    // ---- health ------------------------------------------------------------

    /// The calls real work makes, without side effects: connect, list pools
    /// and networks, and check that the host can run QEMU guests.
    pub fn health(&self) -> Result<Health> {
        let pools = lines(&self.virsh(["pool-list", "--all", "--name"])?);
        let networks = lines(&self.virsh(["net-list", "--all", "--name"])?);
        let caps = self.virsh(["capabilities"])?;
        let qemu = self
            .parse(
                &caps,
                "capabilities",
                &["capabilities", "guest", "arch", "domain"],
            )?
            .iter()
            .any(|e| e.attr("type") == Some("qemu"));
        if !qemu {
            return Err(Error::NoQemu {
                uri: self.opts.uri.clone(),
            });
        }
        Ok(Health {
            uri: self.opts.uri.clone(),
            pools,
            networks,
        })
    }

    // ---- storage -----------------------------------------------------------

    /// Make sure a `dir` pool called `name` exists at `path` and is active:
    /// define, build and start it if it is missing, start it if it is
    /// stopped. A pool of that name elsewhere is a conflict.
    pub fn ensure_dir_pool(&self, name: &str, path: &Path) -> Result<()> {
        check_name("pool", name)?;
        let target = path_str(path)?;
        if !path.is_absolute() {
            return Err(Error::Invalid(format!(
                "pool path {target:?} must be absolute"
            )));
        }
        match self.virsh(["pool-dumpxml", name]) {
            Ok(xml) => {
                let have = self.text(&xml, "pool-dumpxml", &["pool", "target", "path"])?;
                if have.as_deref() != Some(target) {
                    return Err(Error::Conflict {
                        uri: self.opts.uri.clone(),
                        what: format!("storage pool {name}"),
                        detail: format!("it is at {have:?}, not {target:?}"),
                        next: "choose another pool name, or give its path".into(),
                    });
                }
            }
            Err(e) if e.is_not_found() => {
                self.virsh(["pool-define-as", name, "dir", "--target", target])?;
                info!(pool = name, path = target, uri = %self.opts.uri, "storage pool defined");
            }
            Err(e) => return Err(e),
        }
        if !self.is_active(["pool-info", name])? {
            // Building a dir pool makes the directory (mode 0711); an existing
            // one is kept as it is.
            self.virsh(["pool-build", name])?;
            self.virsh(["pool-start", name])?;
        }
        Ok(())
    }

    /// Stop and undefine a storage pool, leaving its directory and files
    /// alone; true if it was there.
    pub fn remove_pool(&self, name: &str) -> Result<bool> {
        check_name("pool", name)?;
        match self.virsh(["pool-destroy", name]) {
            Ok(_) => {}
            Err(e) if e.is_not_found() || e.says("not active") => {}
            Err(e) => return Err(e),
        }
        gone_is_done(self.virsh(["pool-undefine", name]))
    }

    /// Upload an image file as the volume [`Tag::object_name`]`(name)` of
    /// `pool`. A volume of that name is replaced, so a retry after a crash
    /// half-way ends with the whole image. A qcow2 image must not refer to
    /// other files (backing file, external data file): QEMU would open them
    /// on the guest's behalf.
    pub fn upload_volume(
        &self,
        pool: &str,
        tag: &Tag,
        name: &str,
        image: &Path,
        format: Format,
    ) -> Result<Volume> {
        check_name("pool", pool)?;
        let vol = tag.object_name(name)?;
        let (len, capacity) = image_sizes(image, format)?;
        if let Err(e) = self.virsh(["vol-delete", "--pool", pool, &vol])
            && !e.is_not_found()
        {
            return Err(e);
        }
        let capacity = format!("{capacity}b");
        self.virsh([
            "vol-create-as",
            "--pool",
            pool,
            "--name",
            &vol,
            "--capacity",
            &capacity,
            // Sparse: the upload writes only the image's data.
            "--allocation",
            "0",
            "--format",
            format.as_str(),
        ])?;
        let timeout = self.opts.timeout + Duration::from_secs(len / UPLOAD_BYTES_PER_SEC);
        self.virsh_for(
            [
                OsStr::new("vol-upload"),
                OsStr::new("--sparse"),
                OsStr::new("--pool"),
                OsStr::new(pool),
                OsStr::new(&vol),
                image.as_os_str(),
            ],
            timeout,
        )?;
        // The pool learns the uploaded image's real allocation and format.
        self.virsh(["pool-refresh", pool])?;
        let path = self.volume_path(pool, &vol)?;
        info!(pool, volume = %vol, bytes = len, %format, "volume uploaded");
        Ok(Volume {
            pool: pool.to_string(),
            name: vol,
            path,
        })
    }

    /// Create the empty volume [`Tag::object_name`]`(name)` of `pool`
    /// (sparse, `capacity` bytes), or find the one already there under that
    /// name (an earlier try), whatever its size.
    pub fn create_volume(
        &self,
        pool: &str,
        tag: &Tag,
        name: &str,
        capacity: u64,
        format: Format,
    ) -> Result<Volume> {
        check_name("pool", pool)?;
        let vol = tag.object_name(name)?;
        match self.volume_path(pool, &vol) {
            Ok(path) => {
                return Ok(Volume {
                    pool: pool.to_string(),
                    name: vol,
                    path,
                });
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let capacity = format!("{capacity}b");
        self.virsh([
            "vol-create-as",
            "--pool",
            pool,
            "--name",
            &vol,
            "--capacity",
            &capacity,
            "--allocation",
            "0",
            "--format",
            format.as_str(),
        ])?;
        let path = self.volume_path(pool, &vol)?;
        info!(pool, volume = %vol, %format, "empty volume created");
        Ok(Volume {
            pool: pool.to_string(),
            name: vol,
            path,
        })
    }

    /// The directory of storage pool `name`; None if there is no such pool.
    pub fn pool_path(&self, name: &str) -> Result<Option<PathBuf>> {
        check_name("pool", name)?;
        match self.virsh(["pool-dumpxml", name]) {
            Ok(xml) => Ok(self
                .text(&xml, "pool-dumpxml", &["pool", "target", "path"])?
                .map(PathBuf::from)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Make libvirt look at an active pool's directory again, so that files
    /// written there without libvirt (a restore) are volumes it lists.
    pub fn refresh_pool(&self, name: &str) -> Result<()> {
        check_name("pool", name)?;
        self.virsh(["pool-refresh", name]).map(drop)
    }

    /// The file of volume `name` (libvirt's name) in `pool`.
    pub fn volume_path(&self, pool: &str, name: &str) -> Result<PathBuf> {
        check_name("pool", pool)?;
        check_name("volume", name)?;
        let out = self.virsh(["vol-path", "--pool", pool, name])?;
        let path = out.trim();
        if path.is_empty() {
            return Err(self.unexpected("vol-path", "an empty path"));
        }
        Ok(PathBuf::from(path))
    }

    /// Delete volume `name` (libvirt's name) of `pool`; true if it was there.
    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<bool> {
        check_name("pool", pool)?;
        check_name("volume", name)?;
        gone_is_done(self.virsh(["vol-delete", "--pool", pool, name]))
    }

    // ---- networks ----------------------------------------------------------

    /// Create (define and start) an isolated network, or check and start the
    /// one already there under that name.
    pub fn create_network(&self, tag: &Tag, spec: &NetworkSpec) -> Result<Network> {
        let name = tag.object_name(&spec.name)?;
        let gateway = spec.cidr.gateway();
        if let Some((first, last)) = spec.dhcp
            && (!spec.cidr.is_host(first)
                || !spec.cidr.is_host(last)
                || u32::from(first) > u32::from(last)
                || (u32::from(first)..=u32::from(last)).contains(&u32::from(gateway)))
        {
            return Err(Error::Invalid(format!(
                "DHCP range {first}-{last} must be host addresses of {} in order, without the gateway {gateway}",
                spec.cidr
            )));
        }
        let created = match self.virsh(["net-dumpxml", &name]) {
            Ok(xml) => {
                self.check_network(&name, &xml, spec)?;
                false
            }
            Err(e) if e.is_not_found() => {
                let xml = network_xml(&name, spec);
                let file = xml_file(&xml)?;
                self.virsh([OsStr::new("net-define"), file.path().as_os_str()])?;
                true
            }
            Err(e) => return Err(e),
        };
        if !self.is_active(["net-info", &name])? {
            self.virsh(["net-start", &name]).map_err(|e| {
                e.with_hint(
                    "another network or interface may use the same addresses: choose another CIDR",
                )
            })?;
        }
        if created {
            info!(network = %name, cidr = %spec.cidr, "isolated network created");
        }
        Ok(Network { name, created })
    }

    /// An existing network is taken over only if it is isolated and has the
    /// addresses asked for.
    fn check_network(&self, name: &str, xml: &str, spec: &NetworkSpec) -> Result<()> {
        let conflict = |detail: String| Error::Conflict {
            uri: self.opts.uri.clone(),
            what: format!("network {name}"),
            detail,
            next: "delete it (net-destroy, net-undefine) or choose another name".into(),
        };
        if !self
            .parse(xml, "net-dumpxml", &["network", "forward"])?
            .is_empty()
        {
            return Err(conflict(
                "it forwards traffic out (it has <forward>)".into(),
            ));
        }
        let ips = self.parse(xml, "net-dumpxml", &["network", "ip"])?;
        let want = spec.cidr.gateway().to_string();
        let matches = ips.iter().any(|ip| {
            ip.attr("address") == Some(want.as_str())
                && (ip.attr("prefix") == Some(spec.cidr.prefix.to_string().as_str())
                    || ip
                        .attr("netmask")
                        .and_then(|m| m.parse::<Ipv4Addr>().ok())
                        .is_some_and(|m| u32::from(m) == spec.cidr.mask()))
        });
        if !matches {
            return Err(conflict(format!(
                "its addresses are not {want}/{}",
                spec.cidr.prefix
            )));
        }
        Ok(())
    }

    /// Whether network `name` (libvirt's name) is isolated: it has no
    /// `<forward>`, so nothing on it reaches beyond the host.
    pub fn network_is_isolated(&self, name: &str) -> Result<bool> {
        check_name("network", name)?;
        let xml = self.virsh(["net-dumpxml", name])?;
        Ok(self
            .parse(&xml, "net-dumpxml", &["network", "forward"])?
            .is_empty())
    }

    /// Stop and undefine network `name` (libvirt's name); true if it was there.
    pub fn delete_network(&self, name: &str) -> Result<bool> {
        check_name("network", name)?;
        match self.virsh(["net-destroy", name]) {
            Ok(_) => {}
            Err(e) if e.is_not_found() || e.says("is not active") => {}
            Err(e) => return Err(e),
        }
        gone_is_done(self.virsh(["net-undefine", name]))
    }

    /// Reserves an address of network `network` (libvirt's name) for the
    /// interface with MAC `mac`: a DHCP host entry, added to the running
    /// network and its definition. The address `mac` already holds comes
    /// back again (a retried launch). Addresses are taken in order from the
    /// network's DHCP range, skipping entries and leases. None when the
    /// network hands out no addresses (no `<dhcp>` range).
    pub fn reserve_address(&self, network: &str, mac: &str) -> Result<Option<Reserved>> {
        check_name("network", network)?;
        check_mac(mac)?;
        let mac = mac.to_ascii_lowercase();
        // Another launch may take the address between the read and the
        // update; libvirt refuses the second entry and the next is tried.
        for _ in 0..16 {
            let xml = self.virsh(["net-dumpxml", network])?;
            let Some(pool) = dhcp_pool(&xml)
                .map_err(|e| self.unexpected("net-dumpxml", format!("bad XML: {e}")))?
            else {
                return Ok(None);
            };
            if let Some((_, ip)) = pool.hosts.iter().find(|(m, _)| *m == mac) {
                return Ok(Some(Reserved {
                    ip: *ip,
                    prefix: pool.prefix,
                }));
            }
            let leased = self.leased(network)?;
            let taken = |ip: u32| {
                ip == u32::from(pool.host)
                    || pool.hosts.iter().any(|(_, h)| u32::from(*h) == ip)
                    || leased.iter().any(|l| u32::from(*l) == ip)
            };
            let Some(ip) = (u32::from(pool.first)..=u32::from(pool.last)).find(|&ip| !taken(ip))
            else {
                return Err(Error::Conflict {
                    uri: self.opts.uri.clone(),
                    what: format!("network {network}"),
                    detail: format!(
                        "every address of its DHCP range {}-{} is held",
                        pool.first, pool.last
                    ),
                    next: "make the range larger or remove guests from the network".into(),
                });
            };
            let ip = Ipv4Addr::from(ip);
            let entry = format!("<host mac='{mac}' ip='{ip}'/>");
            match self.update_network(network, "add-last", &entry) {
                Ok(()) => {
                    info!(network, %mac, %ip, "address reserved");
                    return Ok(Some(Reserved {
                        ip,
                        prefix: pool.prefix,
                    }));
                }
                Err(e) if e.says("existing dhcp host entry") => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Busy {
            command: format!("virsh net-update {network}"),
            uri: self.opts.uri.clone(),
            stderr: "every address tried was taken by another launch at the same moment".into(),
        })
    }

    /// Removes the address reserved for `mac` on `network`; false if there
    /// was none (or no such network).
    pub fn release_address(&self, network: &str, mac: &str) -> Result<bool> {
        check_name("network", network)?;
        check_mac(mac)?;
        let mac = mac.to_ascii_lowercase();
        let xml = match self.virsh(["net-dumpxml", network]) {
            Ok(x) => x,
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e),
        };
        let pool =
            dhcp_pool(&xml).map_err(|e| self.unexpected("net-dumpxml", format!("bad XML: {e}")))?;
        let Some((_, ip)) = pool
            .as_ref()
            .and_then(|p| p.hosts.iter().find(|(m, _)| *m == mac))
        else {
            return Ok(false);
        };
        let entry = format!("<host mac='{mac}' ip='{ip}'/>");
        match self.update_network(network, "delete", &entry) {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() || e.says("couldn't locate") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `virsh net-update NETWORK COMMAND ip-dhcp-host XML`, on the running
    /// network too when it runs.
    fn update_network(&self, network: &str, command: &str, entry: &str) -> Result<()> {
        let mut args = vec![
            "net-update",
            network,
            command,
            "ip-dhcp-host",
            entry,
            "--config",
        ];
        if self.is_active(["net-info", network])? {
            args.push("--live");
        }
        self.virsh(args).map(drop)
    }

    /// The addresses network `network`'s DHCP server has leased.
    fn leased(&self, network: &str) -> Result<Vec<Ipv4Addr>> {
        let out = self.virsh(["net-dhcp-leases", network])?;
        Ok(out
            .split_whitespace()
            .filter_map(|w| w.split_once('/')?.0.parse().ok())
            .collect())
    }

    /// The `(network, mac)` of each of a domain's network interfaces, as its
    /// definition has them.
    fn domain_nics(&self, name: &str) -> Result<Vec<(String, String)>> {
        let xml = self.virsh(["dumpxml", "--inactive", name])?;
        let bad = |e: String| self.unexpected("dumpxml", format!("bad XML: {e}"));
        let nets = elements(&xml, &["domain", "devices", "interface", "source"]).map_err(bad)?;
        let macs = elements(&xml, &["domain", "devices", "interface", "mac"]).map_err(bad)?;
        Ok(nets
            .iter()
            .zip(&macs)
            .filter_map(|(n, m)| {
                Some((n.attr("network")?.to_owned(), m.attr("address")?.to_owned()))
            })
            .collect())
    }

    // ---- domains -----------------------------------------------------------

    /// Define and start a domain, or adopt the one already there under that
    /// name (started or resumed if it is not running).
    pub fn define_and_start(&self, tag: &Tag, spec: &DomainSpec) -> Result<Domain> {
        check_name("domain", &spec.name)?;
        let name = spec.name.as_str();
        match self.domain_state(name) {
            Ok(state) => {
                match self.tag_of(name)? {
                    Some(t) if t == *tag => {}
                    other => warn!(
                        domain = name,
                        existing = ?other,
                        wanted = ?tag,
                        "adopting a domain that another run or step made, or not Ferry"
                    ),
                }
                self.bring_up(name, &state)?;
                info!(domain = name, was = %state, "domain adopted");
                return Ok(Domain {
                    name: name.to_string(),
                    adopted: true,
                });
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let xml = domain_xml(tag, spec)?;
        let file = xml_file(&xml)?;
        self.virsh([OsStr::new("define"), file.path().as_os_str()])?;
        match self.virsh(["start", name]) {
            Ok(_) => {}
            Err(e) if e.says("already active") => {}
            Err(e) => return Err(e),
        }
        info!(
            domain = name,
            run = tag.run(),
            step = tag.step(),
            "domain defined and started"
        );
        Ok(Domain {
            name: name.to_string(),
            adopted: false,
        })
    }

    fn bring_up(&self, name: &str, state: &str) -> Result<()> {
        let r = match state {
            "running" => return Ok(()),
            "paused" => self.virsh(["resume", name]),
            "pmsuspended" => self.virsh(["dompmwakeup", name]),
            // "shut off", "crashed"; "in shutdown" fails below with libvirt's
            // own words.
            _ => self.virsh(["start", name]),
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.says("already active") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The loopback ports forwarded into a domain's user-mode interface, as
    /// its definition has them (what a retried launch reports again).
    pub fn port_forwards(&self, name: &str) -> Result<Vec<PortForward>> {
        check_name("domain", name)?;
        let xml = self.virsh(["dumpxml", "--inactive", name])?;
        forwards_in(&xml).map_err(|e| self.unexpected("dumpxml", format!("bad XML: {e}")))
    }

    /// The domain's state as virsh words it (`running`, `shut off`, ...).
    pub fn domain_state(&self, name: &str) -> Result<String> {
        check_name("domain", name)?;
        Ok(self.virsh(["domstate", name])?.trim().to_string())
    }

    /// Stop a domain at once (pull the plug); true if it was running.
    pub fn stop(&self, name: &str) -> Result<bool> {
        check_name("domain", name)?;
        match self.virsh(["destroy", name]) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() || e.says("not running") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Remove a domain's definition with its NVRAM, checkpoint and snapshot
    /// metadata (its disks stay); true if it was there. A running domain
    /// keeps running until stopped: call [`Connection::stop`] first.
    pub fn undefine(&self, name: &str) -> Result<bool> {
        check_name("domain", name)?;
        gone_is_done(self.virsh([
            "undefine",
            name,
            "--nvram",
            "--checkpoints-metadata",
            "--snapshots-metadata",
            "--managed-save",
        ]))
    }

    /// [`Connection::stop`] then [`Connection::undefine`], and the addresses
    /// reserved for its interfaces released; true if it was there.
    pub fn delete_domain(&self, name: &str) -> Result<bool> {
        check_name("domain", name)?;
        let nics = match self.domain_nics(name) {
            Ok(n) => n,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e),
        };
        let stopped = self.stop(name)?;
        let undefined = self.undefine(name)?;
        for (network, mac) in nics {
            if check_mac(&mac).is_ok() && check_name("network", &network).is_ok() {
                self.release_address(&network, &mac)?;
            }
        }
        Ok(undefined || stopped)
    }

    /// The run and step in a domain's Ferry metadata; None if it has none.
    pub fn tag_of(&self, domain: &str) -> Result<Option<Tag>> {
        check_name("domain", domain)?;
        let xml = match self.virsh(["metadata", domain, "--uri", METADATA_NS]) {
            Ok(xml) => xml,
            Err(e) if e.is_not_found() || e.says("not present") => return Ok(None),
            Err(e) => return Err(e),
        };
        let el = self.parse(&xml, "metadata", &[METADATA_ELEMENT])?;
        let Some(el) = el.first() else {
            return Ok(None);
        };
        match (el.attr("run"), el.attr("step")) {
            (Some(run), Some(step)) => Tag::new(run, step).map(Some).or(Ok(None)),
            _ => Ok(None),
        }
    }

    // ---- runs --------------------------------------------------------------

    /// Every object of `run` libvirt has: domains by their metadata, networks
    /// and volumes (in active pools) by their name prefix.
    pub fn list_tagged(&self, run: &str) -> Result<Tagged> {
        check_run(run)?;
        let prefix = run_prefix(run);
        let mut out = Tagged::default();
        for dom in lines(&self.virsh(["list", "--all", "--name"])?) {
            if check_name("domain", &dom).is_err() {
                continue; // not a name Ferry gives
            }
            match self.tag_of(&dom) {
                Ok(Some(t)) if t.run() == run => out.domains.push(dom),
                Ok(_) => {}
                // Gone between the listing and the question.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        out.networks = lines(&self.virsh(["net-list", "--all", "--name"])?)
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        for pool in lines(&self.virsh(["pool-list", "--name"])?) {
            // Files written into a pool's directory without libvirt (a
            // restore, perhaps cut short by a crash) are volumes only once
            // the pool is refreshed.
            // A pool that cannot be refreshed (its storage is down) is still
            // listed as libvirt last saw it: teardown must not stop there.
            match self.refresh_pool(&pool) {
                Ok(()) => {}
                Err(e) if e.is_not_found() || e.says("not active") => continue,
                Err(e) => {
                    warn!(pool = %pool, error = %e, "cannot refresh a storage pool; listing what libvirt last saw")
                }
            }
            let vols = match self.virsh(["vol-list", "--pool", &pool]) {
                Ok(v) => v,
                Err(e) if e.is_not_found() || e.says("not active") => continue,
                Err(e) => return Err(e),
            };
            for line in vols.lines() {
                // " NAME   PATH" (no header with -q); Ferry's names have no spaces.
                if let Some(vol) = line.split_whitespace().next()
                    && vol.starts_with(&prefix)
                {
                    out.volumes.push((pool.clone(), vol.to_string()));
                }
            }
        }
        Ok(out)
    }

    /// Remove every object of `run`: domains (stopped and undefined), then
    /// networks, then volumes. Goes on past a failure and returns the first
    /// one; what was removed is returned otherwise.
    pub fn teardown(&self, run: &str) -> Result<Tagged> {
        let found = self.list_tagged(run)?;
        let mut first_err = None;
        let mut keep = |r: Result<bool>| {
            if let Err(e) = r {
                warn!(error = %e, "teardown goes on past a failure");
                first_err.get_or_insert(e);
            }
        };
        for d in &found.domains {
            keep(self.delete_domain(d));
        }
        for n in &found.networks {
            keep(self.delete_network(n));
        }
        for (pool, vol) in &found.volumes {
            keep(self.delete_volume(pool, vol));
        }
        match first_err {
            Some(e) => Err(e),
            None => {
                info!(
                    run,
                    domains = found.domains.len(),
                    networks = found.networks.len(),
                    volumes = found.volumes.len(),
                    "run torn down"
                );
                Ok(found)
            }
        }
    }

    // ---- pull-mode backup --------------------------------------------------

    /// Start a pull-mode backup of `disk` (its target name, `vda`) of a
    /// running domain, creating checkpoint `checkpoint` at the same instant.
    /// With `incremental_from`, the export carries the dirty bitmap of the
    /// blocks written since that checkpoint. QEMU serves the export on a unix
    /// socket in a new directory owned by its user (mode 0710, the group
    /// being this process's), so only root, QEMU and this group reach it; the
    /// scratch image of the job is kept there too.
    pub fn backup_begin(
        &self,
        domain: &str,
        disk: &str,
        checkpoint: &str,
        incremental_from: Option<&str>,
    ) -> Result<PullBackup> {
        check_name("domain", domain)?;
        check_name("disk", disk)?;
        check_name("checkpoint", checkpoint)?;
        if let Some(prev) = incremental_from {
            check_name("checkpoint", prev)?;
        }
        let disks = self.disk_targets(domain)?;
        if !disks.iter().any(|d| d == disk) {
            return Err(Error::Invalid(format!(
                "domain {domain} has no disk {disk} (it has {})",
                disks.join(", ")
            )));
        }
        let dir = self.socket_dir()?;
        let socket = dir.path().join("backup.sock");
        let scratch = dir.path().join(format!("scratch-{disk}.qcow2"));
        let bitmap = format!("backup-{disk}");
        let backup_xml = backup_xml(&disks, disk, &socket, &scratch, &bitmap, incremental_from)?;
        let checkpoint_xml = checkpoint_xml(&disks, disk, checkpoint);
        let bf = xml_file(&backup_xml)?;
        let cf = xml_file(&checkpoint_xml)?;
        self.virsh([
            OsStr::new("backup-begin"),
            OsStr::new(domain),
            OsStr::new("--backupxml"),
            bf.path().as_os_str(),
            OsStr::new("--checkpointxml"),
            cf.path().as_os_str(),
        ])
        .map_err(|e| {
            if e.says("already exists") {
                e.with_hint("that checkpoint exists: name a new one, or delete it with `virsh checkpoint-delete DOMAIN NAME`")
            } else if e.says("job") {
                e.with_hint("a job is already running on the domain: end a backup with backup_end (`virsh domjobabort DOMAIN`)")
            } else {
                e
            }
        })?;
        info!(domain, disk, checkpoint, incremental_from, socket = %socket.display(), "pull-mode backup started");
        Ok(PullBackup {
            domain: domain.to_string(),
            disk: disk.to_string(),
            checkpoint: checkpoint.to_string(),
            url: NbdUrl {
                addr: Addr::Unix(socket),
                export: disk.to_string(),
                bitmap: incremental_from.map(|_| bitmap),
            },
            dir,
        })
    }

    /// End a pull-mode backup job (the checkpoint it made stays).
    pub fn backup_end(&self, backup: PullBackup) -> Result<()> {
        self.abort_job(&backup.domain)?;
        debug!(domain = %backup.domain, dir = %backup.dir().display(), "backup directory removed");
        Ok(())
    }

    /// End whatever job runs on a domain (`domjobabort`), for a backup whose
    /// [`PullBackup`] was lost in a crash; no job, or no domain, is done.
    pub fn abort_job(&self, domain: &str) -> Result<()> {
        check_name("domain", domain)?;
        match self.virsh(["domjobabort", domain]) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() || e.says("no job") || e.says("not running") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The domain's checkpoints, oldest first.
    pub fn checkpoints(&self, domain: &str) -> Result<Vec<String>> {
        check_name("domain", domain)?;
        Ok(lines(&self.virsh([
            "checkpoint-list",
            domain,
            "--name",
            "--topological",
        ])?))
    }

    /// Delete a checkpoint (its bitmaps merge into its parent's); true if it
    /// was there.
    pub fn delete_checkpoint(&self, domain: &str, checkpoint: &str) -> Result<bool> {
        check_name("domain", domain)?;
        check_name("checkpoint", checkpoint)?;
        gone_is_done(self.virsh(["checkpoint-delete", domain, checkpoint]))
    }

    /// The target names (`vda`, ...) of a domain's disks, in order.
    fn disk_targets(&self, domain: &str) -> Result<Vec<String>> {
        let out = self.virsh(["domblklist", domain, "--details"])?;
        // " file   disk   vda   /path" (no header with -q).
        Ok(out
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3 && f[1] == "disk").then(|| f[2].to_string())
            })
            .collect())
    }

    /// A new directory for a backup socket, owned by QEMU's user with this
    /// process's group, mode 0710.
    fn socket_dir(&self) -> Result<tempfile::TempDir> {
        let (uid, _) = user_ids(&self.opts.qemu_user)?;
        let dir = tempfile::Builder::new()
            .prefix("ferry-backup-")
            .tempdir_in(&self.opts.scratch_dir)
            .map_err(|source| Error::File {
                doing: "cannot make a backup socket directory in",
                path: self.opts.scratch_dir.clone(),
                source,
            })?;
        let path = dir.path();
        let fail = |source| Error::File {
            doing: "cannot hand the backup socket directory to QEMU's user:",
            path: path.to_path_buf(),
            source,
        };
        let gid = fs::metadata(path).map_err(fail)?.gid();
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(fail)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o710)).map_err(fail)?;
        Ok(dir)
    }

    // ---- running virsh -----------------------------------------------------

    fn virsh<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.virsh_for(args, self.opts.timeout)
    }

    /// Run `virsh -q -c URI ARGS...` and return its stdout.
    fn virsh_for<I, S>(&self, args: I, timeout: Duration) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<S> = args.into_iter().collect();
        let command = std::iter::once("virsh".to_string())
            .chain(
                args.iter()
                    .map(|a| a.as_ref().to_string_lossy().into_owned()),
            )
            .collect::<Vec<_>>()
            .join(" ");
        let uri = &self.opts.uri;
        let io_err = |doing, source| Error::Io {
            command: command.clone(),
            uri: uri.clone(),
            doing,
            source,
        };
        let started = Instant::now();
        let mut child = Command::new(&self.opts.virsh)
            .arg("-q")
            .arg("-c")
            .arg(uri)
            .args(&args)
            .env("LC_ALL", "C")
            .env_remove("LANGUAGE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::NoVirsh {
                virsh: self.opts.virsh.clone(),
                source,
            })?;
        let out = child.stdout.take().map(|s| spawn_reader(s, MAX_STDOUT));
        let err = child.stderr.take().map(|s| spawn_reader(s, MAX_STDERR));
        let status = wait_for(&mut child, timeout).map_err(|e| io_err("waiting for virsh", e))?;
        let (stdout, over) = join_reader(out).map_err(|e| io_err("reading its output", e))?;
        let (stderr, _) = join_reader(err).map_err(|e| io_err("reading its errors", e))?;
        let Some(status) = status else {
            return Err(Error::Timeout {
                command,
                uri: uri.clone(),
                after: timeout,
            });
        };
        debug!(%command, ms = started.elapsed().as_millis() as u64, %status, "virsh");
        if !status.success() {
            return Err(classify(command, uri, status, &stderr));
        }
        if over {
            return Err(Error::TooMuchOutput {
                command,
                uri: uri.clone(),
                limit: MAX_STDOUT,
            });
        }
        String::from_utf8(stdout).map_err(|_| Error::Unexpected {
            command,
            uri: uri.clone(),
            detail: "output that is not UTF-8".into(),
        })
    }

    /// Whether `pool-info` says `State: running` or `net-info` says `Active: yes`.
    fn is_active(&self, args: [&str; 2]) -> Result<bool> {
        let out = self.virsh(args)?;
        for line in out.lines() {
            match line.split_once(':').map(|(k, v)| (k.trim(), v.trim())) {
                Some(("Active", v)) => return Ok(v == "yes"),
                Some(("State", v)) => return Ok(v == "running"),
                _ => {}
            }
        }
        Err(self.unexpected(args[0], "neither State: nor Active:"))
    }

    fn unexpected(&self, command: &str, detail: impl Into<String>) -> Error {
        Error::Unexpected {
            command: format!("virsh {command}"),
            uri: self.opts.uri.clone(),
            detail: detail.into(),
        }
    }

    fn parse(&self, xml: &str, command: &str, path: &[&str]) -> Result<Vec<Element>> {
        elements(xml, path).map_err(|e| self.unexpected(command, format!("bad XML: {e}")))
    }

    fn text(&self, xml: &str, command: &str, path: &[&str]) -> Result<Option<String>> {
        Ok(self
            .parse(xml, command, path)?
            .into_iter()
            .next()
            .map(|e| e.text))
    }
}

/// Turn a failed virsh call into an error by what libvirt said.
fn classify(command: String, uri: &str, status: ExitStatus, stderr: &[u8]) -> Error {
    let text = String::from_utf8_lossy(stderr);
    // "error: failed to get domain 'x'\nerror: Domain not found: ..." → one line.
    let mut stderr = text
        .lines()
        .map(|l| l.trim().trim_start_matches("error: ").trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if stderr.is_empty() {
        stderr = format!("virsh exited with {status} and printed nothing");
    }
    let uri = uri.to_string();
    let has = |s: &str| stderr.contains(s);
    if has("failed to connect to the hypervisor") || has("Failed to connect socket") {
        Error::Unreachable {
            command,
            uri,
            stderr,
        }
    } else if has(" not found: ")
        || has("no domain with matching")
        || has("no network with matching")
        || has("no storage")
        // virsh says no more than this when a domain name is unknown.
        || has("failed to get domain")
    {
        Error::NotFound {
            command,
            uri,
            stderr,
        }
    } else if has("cannot acquire state change lock") || has("Timed out during operation") {
        Error::Busy {
            command,
            uri,
            stderr,
        }
    } else {
        let hint = if has("authentication") || has("Permission denied") || has("access denied") {
            Some("run as root or as a member of the group libvirt".to_string())
        } else {
            None
        };
        Error::Failed {
            command,
            uri,
            stderr,
            hint,
        }
    }
}

/// A delete's result: done (true), or already gone (false).
fn gone_is_done(r: Result<String>) -> Result<bool> {
    match r {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Non-empty trimmed lines.
fn lines(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| {
        Error::Invalid(format!(
            "{} is not UTF-8; libvirt needs paths it can put in XML",
            path.display()
        ))
    })
}

/// A thread reading a pipe: at most `cap` bytes kept, and whether there was more.
type Reader = std::thread::JoinHandle<io::Result<(Vec<u8>, bool)>>;

fn spawn_reader(mut r: impl Read + Send + 'static, cap: usize) -> Reader {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        (&mut r).take(cap as u64 + 1).read_to_end(&mut buf)?;
        let over = buf.len() > cap;
        if over {
            buf.truncate(cap);
            // Keep draining so virsh never blocks on a full pipe.
            io::copy(&mut r, &mut io::sink())?;
        }
        Ok((buf, over))
    })
}

fn join_reader(h: Option<Reader>) -> io::Result<(Vec<u8>, bool)> {
    match h {
        None => Ok((Vec::new(), false)),
        Some(h) => h
            .join()
            .map_err(|_| io::Error::other("the reader thread panicked"))?,
    }
}

/// Wait for the child up to `timeout`; past it, kill it (by its PID) and
/// return None.
fn wait_for(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            // Already exited in between is fine; wait() reaps either way.
            let _ = child.kill();
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// An image's length and the capacity of the volume that holds it (a qcow2's
/// virtual size). qcow2 images that refer to other files are refused.
fn image_sizes(image: &Path, format: Format) -> Result<(u64, u64)> {
    let file_err = |doing, source| Error::File {
        doing,
        path: image.to_path_buf(),
        source,
    };
    let mut f = fs::File::open(image).map_err(|e| file_err("cannot open the image", e))?;
    let len = f
        .metadata()
        .map_err(|e| file_err("cannot read the size of", e))?
        .len();
    match format {
        Format::Raw => Ok((len, len)),
        Format::Qcow2 => {
            let mut h = [0u8; 104];
            f.read_exact(&mut h)
                .map_err(|e| file_err("cannot read the qcow2 header of", e))?;
            let qcow = Qcow2Header::parse(&h).map_err(|why| {
                Error::Invalid(format!(
                    "{} is not a usable qcow2 image: {why}",
                    image.display()
                ))
            })?;
            Ok((len, qcow.size))
        }
    }
}

/// The fields of a qcow2 header Ferry checks (QEMU's docs/interop/qcow2.txt).
struct Qcow2Header {
    size: u64,
}

impl Qcow2Header {
    fn parse(h: &[u8; 104]) -> std::result::Result<Qcow2Header, String> {
        let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
        if h[..4] != *b"QFI\xfb" {
            return Err("no qcow2 magic".into());
        }
        let version = be32(4);
        if version != 2 && version != 3 {
            return Err(format!("qcow2 version {version}"));
        }
        if be64(8) != 0 {
            return Err(
                "it has a backing file; give a self-contained image (qemu-img convert)".into(),
            );
        }
        // Incompatible feature bit 2: an external data file.
        if version == 3 && be64(72) & 4 != 0 {
            return Err("it keeps its data in an external file; give a self-contained image (qemu-img convert)".into());
        }
        Ok(Qcow2Header { size: be64(24) })
    }
}

/// The numeric uid and gid of a user, from /etc/passwd.
fn user_ids(user: &str) -> Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(|source| Error::File {
        doing: "cannot read",
        path: PathBuf::from("/etc/passwd"),
        source,
    })?;
    passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        })
        .flatten()
        .next()
        .ok_or_else(|| {
            Error::Invalid(format!(
                "there is no user {user:?} for QEMU's backup sockets; is libvirt-daemon-system installed? Otherwise give the `user` of /etc/libvirt/qemu.conf as the QEMU user"
            ))
        })
}

/// A private temporary file holding XML for virsh to read.
fn xml_file(xml: &str) -> Result<tempfile::NamedTempFile> {
    let mut f = tempfile::Builder::new()
        .prefix("ferry-virsh-")
        .suffix(".xml")
        .tempfile()
        .map_err(|source| Error::File {
            doing: "cannot make a temporary file in",
            path: std::env::temp_dir(),
            source,
        })?;
    f.write_all(xml.as_bytes()).map_err(|source| Error::File {
        doing: "cannot write",
        path: f.path().to_path_buf(),
        source,
    })?;
    Ok(f)
}

// ---- XML ---------------------------------------------------------------------

fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(s)
}

fn network_xml(name: &str, spec: &NetworkSpec) -> String {
    let mut x = String::new();
    x.push_str("<network>\n");
    x.push_str(&format!("  <name>{}</name>\n", esc(name)));
    // No <forward>: an isolated network. DNS off: dnsmasq would otherwise
    // forward the guests' queries to the host's resolvers.
    x.push_str("  <bridge stp='on' delay='0'/>\n  <dns enable='no'/>\n");
    x.push_str(&format!(
        "  <ip address='{}' prefix='{}'>\n",
        spec.cidr.gateway(),
        spec.cidr.prefix
    ));
    if let Some((first, last)) = spec.dhcp {
        x.push_str(&format!(
            "    <dhcp><range start='{first}' end='{last}'/></dhcp>\n"
        ));
    }
    x.push_str("  </ip>\n</network>\n");
    x
}

fn domain_xml(tag: &Tag, spec: &DomainSpec) -> Result<String> {
    if spec.disks.len() > 26 {
        return Err(Error::Invalid(format!(
            "domain {}: {} disks; at most 26 (vda to vdz)",
            spec.name,
            spec.disks.len()
        )));
    }
    if spec.memory_mib == 0 || spec.vcpus == 0 {
        return Err(Error::Invalid(format!(
            "domain {}: memory and vCPUs must not be 0",
            spec.name
        )));
    }
    let users: Vec<&[PortForward]> = spec
        .nics
        .iter()
        .filter_map(|n| match n {
            Nic::User { forwards } => Some(forwards.as_slice()),
            Nic::Network { .. } => None,
        })
        .collect();
    let networks: Vec<(&str, Option<&str>)> = spec
        .nics
        .iter()
        .filter_map(|n| match n {
            Nic::Network { network, mac } => Some((network.as_str(), mac.as_deref())),
            Nic::User { .. } => None,
        })
        .collect();
    if users.len() > 1 || networks.len() > NETWORK_SLOTS.len() {
        return Err(Error::Invalid(format!(
            "domain {}: at most one user-mode interface and {} network interfaces",
            spec.name,
            NETWORK_SLOTS.len()
        )));
    }
    let user = !users.is_empty();
    let mut x = String::new();
    if user {
        x.push_str(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n",
        );
    } else {
        x.push_str("<domain type='qemu'>\n");
    }
    x.push_str(&format!("  <name>{}</name>\n", esc(&spec.name)));
    x.push_str(&format!(
        "  <metadata><ferry:{METADATA_ELEMENT} xmlns:ferry='{METADATA_NS}' run='{}' step='{}'/></metadata>\n",
        esc(tag.run()),
        esc(tag.step())
    ));
    x.push_str(&format!(
        "  <memory unit='MiB'>{}</memory>\n  <vcpu>{}</vcpu>\n",
        spec.memory_mib, spec.vcpus
    ));
    if !spec.fw_cfg.is_empty() {
        x.push_str("  <sysinfo type='fwcfg'>\n");
        for (name, text) in &spec.fw_cfg {
            check_fw_cfg_name(name)?;
            x.push_str(&format!(
                "    <entry name='{}'>{}</entry>\n",
                esc(name),
                esc(text)
            ));
        }
        x.push_str("  </sysinfo>\n");
    }
    x.push_str("  <os>\n    <type arch='x86_64'>hvm</type>\n");
    match &spec.boot {
        Boot::Disk => x.push_str("    <boot dev='hd'/>\n"),
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            x.push_str(&format!(
                "    <kernel>{}</kernel>\n",
                esc(path_str(kernel)?)
            ));
            if let Some(i) = initrd {
                x.push_str(&format!("    <initrd>{}</initrd>\n", esc(path_str(i)?)));
            }
            x.push_str(&format!("    <cmdline>{}</cmdline>\n", esc(cmdline)));
        }
    }
    x.push_str("  </os>\n");
    // libvirt 9 passes -no-acpi unless ACPI is asked for, and QEMU 10 no longer
    // knows that option.
    x.push_str("  <features><acpi/></features>\n");
    // Under TCG, the emulated CPU with every feature QEMU has (-cpu max).
    x.push_str("  <cpu mode='maximum'/>\n  <clock offset='utc'/>\n");
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    for (i, d) in spec.disks.iter().enumerate() {
        let dev = format!("vd{}", char::from(b'a' + i as u8));
        x.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}'/>\n      <source file='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n      <address type='pci' domain='0x0000' bus='0x00' slot='{:#04x}' function='0x0'/>\n    </disk>\n",
            d.format,
            esc(path_str(&d.path)?),
            FIRST_DISK_SLOT + i as u8
        ));
    }
    for (&(net, mac), slot) in networks.iter().zip(&NETWORK_SLOTS) {
        check_name("network", net)?;
        let mac = match mac {
            Some(m) => {
                check_mac(m)?;
                format!("      <mac address='{}'/>\n", m.to_ascii_lowercase())
            }
            None => String::new(),
        };
        // Fixed slots (see [`Nic`]): libvirt does not know of the user-mode
        // interface QEMU adds, so every device gets its slot from Ferry.
        x.push_str(&format!(
            "    <interface type='network'>\n{mac}      <source network='{}'/>\n      <model type='virtio'/>\n      <rom enabled='no'/>\n      <address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='0x0'/>\n    </interface>\n",
            esc(net)
        ));
    }
    x.push_str(&format!(
        "    <serial type='file'>\n      <source path='{}' append='off'/>\n      <target port='0'/>\n    </serial>\n",
        esc(path_str(&spec.serial_log)?)
    ));
    x.push_str("    <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n");
    x.push_str("  </devices>\n");
    if let Some(forwards) = users.first() {
        // libvirt 9 forwards ports of user-mode interfaces only with passt;
        // QEMU's own slirp does it with hostfwd, bound to loopback here.
        // `restrict=on` keeps the guest from reaching anything outside.
        let mut netdev = "user,id=ferryuser0,restrict=on".to_string();
        for f in forwards.iter() {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
        }
        x.push_str("  <qemu:commandline>\n");
        for arg in [
            "-netdev",
            &netdev,
            "-device",
            &format!("virtio-net-pci,netdev=ferryuser0,romfile=,addr={USER_NIC_SLOT:#04x}"),
        ] {
            x.push_str(&format!("    <qemu:arg value='{}'/>\n", esc(arg)));
        }
        x.push_str("  </qemu:commandline>\n");
    }
    x.push_str("</domain>\n");
    Ok(x)
}

/// The `hostfwd=tcp:127.0.0.1:HOST-:GUEST` forwards in a domain's QEMU
/// arguments (the user-mode interface [`domain_xml`] writes).
fn forwards_in(xml: &str) -> std::result::Result<Vec<PortForward>, String> {
    let mut out = Vec::new();
    for arg in elements(xml, &["domain", "commandline", "arg"])? {
        let Some(value) = arg.attr("value") else {
            continue;
        };
        for part in value.split(',') {
            let Some(rule) = part.strip_prefix("hostfwd=tcp:127.0.0.1:") else {
                continue;
            };
            let parsed = rule
                .split_once("-:")
                .and_then(|(h, g)| Some((h.parse().ok()?, g.parse().ok()?)));
            match parsed {
                Some((host, guest)) => out.push(PortForward { host, guest }),
                None => return Err(format!("a port forward Ferry cannot read: {part}")),
            }
        }
    }
    Ok(out)
}

fn checkpoint_xml(disks: &[String], disk: &str, name: &str) -> String {
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n",
        esc(name)
    );
    for d in disks {
        let how = if d == disk { "bitmap" } else { "no" };
        x.push_str(&format!(
            "    <disk name='{}' checkpoint='{how}'/>\n",
            esc(d)
        ));
    }
    x.push_str("  </disks>\n</domaincheckpoint>\n");
    x
}

fn backup_xml(
    disks: &[String],
    disk: &str,
    socket: &Path,
    scratch: &Path,
    bitmap: &str,
    incremental_from: Option<&str>,
) -> Result<String> {
    let mut x = "<domainbackup mode='pull'>\n".to_string();
    if let Some(prev) = incremental_from {
        x.push_str(&format!("  <incremental>{}</incremental>\n", esc(prev)));
    }
    x.push_str(&format!(
        "  <server transport='unix' socket='{}'/>\n  <disks>\n",
        esc(path_str(socket)?)
    ));
    for d in disks {
        if d == disk {
            x.push_str(&format!(
                "    <disk name='{0}' backup='yes' type='file' exportname='{0}' exportbitmap='{1}'>\n      <scratch file='{2}'/>\n    </disk>\n",
                esc(d),
                esc(bitmap),
                esc(path_str(scratch)?)
            ));
        } else {
            x.push_str(&format!("    <disk name='{}' backup='no'/>\n", esc(d)));
        }
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    Ok(x)
}

/// An element found by [`elements`]: its attributes and its text.
#[derive(Debug, Default)]
struct Element {
    attrs: Vec<(String, String)>,
    text: String,
}

impl Element {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every element at `path` (local names from the root down; a path of one
/// name matches the root only), with its attributes and direct text.
fn elements(xml: &str, path: &[&str]) -> std::result::Result<Vec<Element>, String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<String> = Vec::new();
    let mut found = Vec::new();
    // Index in `found` of the element whose text is being collected.
    let mut open: Option<usize> = None;
    let at_path =
        |stack: &[String]| stack.len() == path.len() && stack.iter().zip(path).all(|(a, b)| a == b);
    loop {
        let ev = reader.read_event().map_err(|e| e.to_string())?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                stack.push(name);
                if at_path(&stack) {
                    let mut el = Element::default();
                    for a in e.attributes() {
                        let a = a.map_err(|e| e.to_string())?;
                        let k = String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned();
                        let v = a
                            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .map_err(|e| e.to_string())?
                            .into_owned();
                        el.attrs.push((k, v));
                    }
                    found.push(el);
                    open = matches!(ev, Event::Start(_)).then_some(found.len() - 1);
                }
                if matches!(ev, Event::Empty(_)) {
                    stack.pop();
                }
            }
            Event::End(_) => {
                if at_path(&stack) {
                    open = None;
                }
                stack.pop();
            }
            Event::Text(ref t) => {
                if let (Some(i), true) = (open, stack.len() == path.len()) {
                    found[i]
                        .text
                        .push_str(&t.decode().map_err(|e| e.to_string())?);
                }
            }
            Event::GeneralRef(ref r) => {
                if let (Some(i), true) = (open, stack.len() == path.len()) {
                    let raw = format!("&{};", r.decode().map_err(|e| e.to_string())?);
                    let s = quick_xml::escape::unescape(&raw).map_err(|e| e.to_string())?;
                    found[i].text.push_str(&s);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c: Cidr = "10.77.0.0/24".parse().unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 77, 0, 1));
        assert!(c.is_host(Ipv4Addr::new(10, 77, 0, 254)));
        assert!(!c.is_host(Ipv4Addr::new(10, 77, 0, 255)));
        assert!(!c.is_host(Ipv4Addr::new(10, 77, 0, 0)));
        assert!(!c.is_host(Ipv4Addr::new(10, 78, 0, 9)));
        assert_eq!(c.to_string(), "10.77.0.0/24");
        for bad in [
            "10.77.0.1/24",
            "10.77.0.0",
            "10.77.0.0/31",
            "x/24",
            "10.0.0.0/4",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_tags() {
        let t = Tag::new("20250101-120000-abcdef", "boot_web").unwrap();
        assert_eq!(t.prefix(), "ferry-20250101-120000-abcdef_");
        assert_eq!(
            t.object_name("disk0").unwrap(),
            "ferry-20250101-120000-abcdef_disk0"
        );
        for bad in ["", "-x", ".x", "a b", "a/b", "a'b", "a<b"] {
            assert!(t.object_name(bad).is_err(), "{bad:?}");
        }
        // for_each items of a step tag their objects as `step.N`.
        assert!(Tag::new("run", "disk.1").is_ok());
        assert!(Tag::new("run", ".x").is_err());
        // A run id with _ could make one run's prefix another's.
        assert!(Tag::new("a_b", "s").is_err());
        assert!(Tag::new("run", "a b").is_err());
    }

    #[test]
    fn xml_paths() {
        let xml =
            r#"<pool type='dir'><name>p</name><target><path>/var/a&amp;b</path></target></pool>"#;
        let t = elements(xml, &["pool", "target", "path"]).unwrap();
        assert_eq!(t[0].text, "/var/a&b");
        let caps = "<capabilities><guest><arch name='x86_64'><domain type='qemu'/><domain type='kvm'/></arch></guest></capabilities>";
        let d = elements(caps, &["capabilities", "guest", "arch", "domain"]).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].attr("type"), Some("qemu"));
        let meta = "<ferry:tag xmlns:ferry=\"http://ferry.invalid/xmlns/libvirt/1\" run=\"r-1\" step=\"s\"/>\n";
        let m = elements(meta, &["tag"]).unwrap();
        assert_eq!(m[0].attr("run"), Some("r-1"));
        assert!(elements("<a><b></a>", &["a"]).is_err());
    }

    #[test]
    fn domain_xml_is_escaped_and_has_the_workarounds() {
        let t = Tag::new("r1", "s1").unwrap();
        let spec = DomainSpec {
            name: "web".into(),
            memory_mib: 256,
            vcpus: 1,
            disks: vec![Disk {
                path: "/p/a'<b>.qcow2".into(),
                format: Format::Qcow2,
            }],
            boot: Boot::Kernel {
                kernel: "/k".into(),
                initrd: None,
                cmdline: "console=ttyS0 x=\"&\"".into(),
            },
            nics: vec![
                Nic::Network {
                    network: "ferry-r1_lan".into(),
                    mac: Some(mac_for("web", "ferry-r1_lan")),
                },
                Nic::User {
                    forwards: vec![PortForward {
                        host: 8080,
                        guest: 80,
                    }],
                },
            ],
            serial_log: "/log".into(),
            fw_cfg: vec![("opt/ferry/user-data".into(), "a=<1>\nb=2\n".into())],
        };
        let x = domain_xml(&t, &spec).unwrap();
        // The firmware configuration, escaped, and read back as written.
        let fw = elements(&x, &["domain", "sysinfo", "entry"]).unwrap();
        assert_eq!(fw[0].attr("name"), Some("opt/ferry/user-data"));
        assert_eq!(fw[0].text, "a=<1>\nb=2\n");
        let mac = elements(&x, &["domain", "devices", "interface", "mac"]).unwrap();
        assert_eq!(
            mac[0].attr("address"),
            Some(mac_for("web", "ferry-r1_lan").as_str())
        );
        let mut bad = spec.clone();
        bad.fw_cfg = vec![("etc/ferry".into(), String::new())];
        assert!(
            domain_xml(&t, &bad).is_err(),
            "QEMU's own names are refused"
        );
        assert!(x.contains("<features><acpi/></features>"));
        assert!(x.contains("/p/a&apos;&lt;b&gt;.qcow2"));
        assert!(x.contains("x=&quot;&amp;&quot;"));
        assert!(x.contains("hostfwd=tcp:127.0.0.1:8080-:80"));
        assert!(x.contains("<source network='ferry-r1_lan'/>"));
        assert!(x.contains("slot='0x1d'"), "{x}");
        assert!(x.contains("slot='0x03'"), "{x}");
        assert!(x.contains("romfile=,addr=0x02"), "{x}");
        // What it wrote, it reads back.
        assert_eq!(
            forwards_in(&x).unwrap(),
            vec![PortForward {
                host: 8080,
                guest: 80
            }]
        );
        // What Ferry wrote, it reads back.
        let src = elements(&x, &["domain", "devices", "disk", "source"]).unwrap();
        assert_eq!(src[0].attr("file"), Some("/p/a'<b>.qcow2"));
        let tag = elements(&x, &["domain", "metadata", "tag"]).unwrap();
        assert_eq!(tag[0].attr("run"), Some("r1"));
    }

    #[test]
    fn macs_are_stable_and_addresses_are_read_from_the_network() {
        let m = mac_for("ferry-r1_web", "ferry-r1_net");
        assert_eq!(m, mac_for("ferry-r1_web", "ferry-r1_net"));
        assert_ne!(m, mac_for("ferry-r1_db", "ferry-r1_net"));
        assert!(m.starts_with("52:54:00:") && check_mac(&m).is_ok(), "{m}");
        assert!(check_mac("52:54:00:zz:00:00").is_err());
        let xml = "<network><name>n</name><ip address='10.42.0.1' prefix='16'><dhcp>\
            <range start='10.42.1.1' end='10.42.1.254'/>\
            <host mac='52:54:00:AA:bb:cc' ip='10.42.1.1'/></dhcp></ip></network>";
        let p = dhcp_pool(xml).unwrap().unwrap();
        assert_eq!((p.host, p.prefix), (Ipv4Addr::new(10, 42, 0, 1), 16));
        assert_eq!(p.first, Ipv4Addr::new(10, 42, 1, 1));
        assert_eq!(
            p.hosts,
            vec![("52:54:00:aa:bb:cc".into(), Ipv4Addr::new(10, 42, 1, 1))]
        );
        let netmask = "<network><ip address='192.168.122.1' netmask='255.255.255.0'><dhcp>\
            <range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>";
        assert_eq!(dhcp_pool(netmask).unwrap().unwrap().prefix, 24);
        assert_eq!(
            dhcp_pool("<network><ip address='10.0.0.1' prefix='24'/></network>").unwrap(),
            None,
            "no DHCP, no addresses to hand out"
        );
    }

    #[test]
    fn qcow2_headers() {
        let mut h = [0u8; 104];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[7] = 3;
        h[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
        assert_eq!(Qcow2Header::parse(&h).unwrap().size, 64 << 20);
        let mut backing = h;
        backing[15] = 200;
        assert!(Qcow2Header::parse(&backing).is_err());
        let mut data_file = h;
        data_file[79] = 4;
        assert!(Qcow2Header::parse(&data_file).is_err());
        assert!(Qcow2Header::parse(&[0u8; 104]).is_err());
    }

    #[test]
    fn classification() {
        let st = std::process::Command::new("false").status().unwrap();
        let c = |s: &str| classify("virsh x".into(), "qemu:///system", st, s.as_bytes());
        assert!(c("error: failed to get domain 'x'\nerror: Domain not found: no domain with matching name 'x'\n").is_not_found());
        assert!(matches!(
            c(
                "error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory"
            ),
            Error::Unreachable { .. }
        ));
        let e = c(
            "error: Failed to destroy domain 'x'\nerror: Requested operation is not valid: domain is not running",
        );
        assert!(e.says("not running") && !e.is_not_found());
        assert_eq!(e.retry(), Retry::Never);
        assert!(
            e.to_string()
                .contains("Failed to destroy domain 'x'; Requested operation")
        );
    }
}
