//! Enrollment, the device inventory and the protection loop of `ferry-agent`.
//!
//! The loop, each interval: poll the policy (a server that cannot be reached
//! is not a reason to stop protecting: the cached policy is used), cut the
//! policy's devices into one recovery point, apply retention, push the
//! status. A server that refuses the agent's credential (it was revoked)
//! stops the agent: that is how an operator takes a machine out of the fleet.
//!
//! Change tracking, per device: a device-mapper device (an LVM volume) with a
//! `[[dm_era]]` entry in the agent's config runs in [`Mode::DmEra`] (see
//! [`crate::era`]): the cut is a dm-snapshot taken with an era checkpoint,
//! and only the blocks the era target saw written since the last point are
//! read. Every other device runs in [`Mode::Scan`]: each cycle reads it
//! (skipping holes of image files) and stores only chunks the repository does
//! not have, finding unchanged ones by id, as `ferry backup` does. Each
//! device's status says which mode it runs in and why.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use chrono::Utc;
use tracing::{info, warn};

use ferry_agent::Repository;
use ferry_agent::backup::{BackupOptions, DiskSpec};
use ferry_agent::progress::Progress;
use ferry_agent::source::{BlockSource, ChangeMap, FileSource};

use crate::config::{self, Config};
use crate::era::{self, Tracked};
use crate::wire::{
    AgentStatus, ApiError, Device, DeviceStatus, EnrollRequest, Enrolled, GROUP_WAIT_MS, GroupCut,
    Mode, Policy,
};

/// How long one request to the server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// What a group cut may take beyond the server's wait: the agent holds its
/// writes for the whole request, so it gives up soon after the server would.
const CUT_MARGIN: Duration = Duration::from_secs(3);

/// Why the server would not talk to the agent.
#[derive(Debug)]
pub enum ServerError {
    /// The server refused the agent's credential or token (401/403): revoked,
    /// expired or unknown. Retrying cannot help.
    Refused(String),
    /// Anything else (unreachable, a 5xx, a bad answer): try again later.
    Other(anyhow::Error),
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Refused(m) => f.write_str(m),
            ServerError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// The server refused the agent's credential: it was revoked (or the config
/// holds another server's). The agent stops; only a new enrollment brings it
/// back.
#[derive(Debug)]
pub struct Stopped(pub String);

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server refused this agent ({}): it was revoked or its credential is wrong; enroll again with a new token",
            self.0
        )
    }
}

impl std::error::Error for Stopped {}

/// A connection to `ferry serve`.
pub struct Client {
    http: reqwest::blocking::Client,
    server: String,
    credential: Option<String>,
}

impl Client {
    pub fn new(server: &str, ca_cert: Option<&Path>, credential: Option<String>) -> Result<Client> {
        let server = server.trim_end_matches('/').to_string();
        if !(server.starts_with("https://") || server.starts_with("http://")) {
            bail!("--server {server:?}: expected http(s)://HOST:PORT");
        }
        let mut b = reqwest::blocking::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ferry-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", ca.display()))?;
            b = b.add_root_certificate(cert);
        }
        Ok(Client {
            http: b.build().context(
                "cannot set up HTTPS: install the system's CA certificates (package ca-certificates), or give the server's CA with --ca-cert",
            )?,
            server,
            credential,
        })
    }

    /// Sends a request; a success's response, or what the server said.
    fn send(
        &self,
        req: reqwest::blocking::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::blocking::Response, ServerError> {
        let req = match &self.credential {
            Some(c) => req.bearer_auth(c),
            None => req,
        };
        let resp = req.send().map_err(|e| {
            ServerError::Other(anyhow!("{what}: cannot reach {}: {e}", self.server))
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let msg = resp
            .json::<ApiError>()
            .map(|e| e.error)
            .unwrap_or_else(|_| status.to_string());
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            Err(ServerError::Refused(format!("{what}: {msg}")))
        } else {
            Err(ServerError::Other(anyhow!("{what}: {status}: {msg}")))
        }
    }

    fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::blocking::RequestBuilder,
        what: &str,
    ) -> Result<T, ServerError> {
        self.send(req, what)?
            .json()
            .map_err(|e| ServerError::Other(anyhow!("{what}: the server's answer: {e}")))
    }

    pub fn enroll(&self, req: &EnrollRequest) -> Result<Enrolled, ServerError> {
        let url = format!("{}/api/agents/enroll", self.server);
        self.call(self.http.post(url).json(req), "enrollment")
    }

    pub fn policy(&self) -> Result<Policy, ServerError> {
        let url = format!("{}/api/agent/policy", self.server);
        self.call(self.http.get(url), "policy")
    }

    /// Waits with the rest of the agent's consistency group (the agent holds
    /// its writes meanwhile); the round, once every member arrived or the
    /// server stopped waiting.
    pub fn cut(&self) -> Result<GroupCut, ServerError> {
        let url = format!("{}/api/agent/cut", self.server);
        let req = self
            .http
            .post(url)
            .json(&serde_json::json!({}))
            .timeout(Duration::from_millis(GROUP_WAIT_MS) + CUT_MARGIN);
        self.call(req, "group cut")
    }

    pub fn push(&self, status: &AgentStatus) -> Result<(), ServerError> {
        let url = format!("{}/api/agent/status", self.server);
        self.send(self.http.post(url).json(status), "status")
            .map(drop)
    }
}

/// This machine's id: `/etc/machine-id`, else a random one kept beside the config.
pub fn machine_id(config: &Path) -> Result<String> {
    if let Ok(s) = std::fs::read_to_string("/etc/machine-id")
        && !s.trim().is_empty()
    {
        return Ok(s.trim().to_string());
    }
    let mut p = config.as_os_str().to_owned();
    p.push(".machine-id");
    let p = PathBuf::from(p);
    if let Ok(s) = std::fs::read_to_string(&p) {
        return Ok(s.trim().to_string());
    }
    let id = ferry_agent::crypto::random_hex(16);
    config::write_private(&p, id.as_bytes())?;
    Ok(id)
}

/// The machine's whole disks (`/sys/block`, without loop, RAM, optical and
/// floppy devices), then the paths given, each with its size.
pub fn devices(extra: &[PathBuf]) -> Result<Vec<Device>> {
    let mut out = Vec::new();
    if extra.is_empty()
        && let Ok(rd) = std::fs::read_dir("/sys/block")
    {
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                !["loop", "ram", "zram", "sr", "fd"]
                    .iter()
                    .any(|p| n.starts_with(p))
            })
            .collect();
        names.sort();
        for n in names {
            let sectors = std::fs::read_to_string(format!("/sys/block/{n}/size"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if sectors > 0 {
                out.push(Device {
                    path: format!("/dev/{n}"),
                    size: sectors * 512,
                });
            }
        }
    }
    for p in extra {
        let src = ferry_agent::source::FileSource::open(p)
            .with_context(|| format!("--device {}", p.display()))?;
        use ferry_agent::source::BlockSource as _;
        out.push(Device {
            path: p.display().to_string(),
            size: src.size()?,
        });
    }
    Ok(out)
}

/// How a device's changes are found, and why, before a cycle tries.
pub fn mode_of(cfg: &Config, path: &Path) -> (Mode, String) {
    use std::os::unix::fs::FileTypeExt as _;
    let Ok(meta) = std::fs::metadata(path) else {
        return (Mode::Scan, format!("{} cannot be examined", path.display()));
    };
    if meta.file_type().is_file() {
        return (
            Mode::Scan,
            "an image file: no device-mapper under it, so each cycle reads it and finds unchanged chunks by id"
                .into(),
        );
    }
    if meta.file_type().is_block_device() {
        let is_dm = crate::era::DevNum::of(path).is_ok_and(|d| d.dm_name().is_some());
        if is_dm && let Some(e) = cfg.era_for(&path.to_string_lossy()) {
            if let Some(why) = crate::era::tools_missing() {
                return (
                    Mode::Scan,
                    format!(
                        "a device-mapper device configured for dm-era, but {why}: each cycle reads it whole"
                    ),
                );
            }
            return (
                Mode::DmEra,
                format!(
                    "dm-era under the device at {} KiB blocks (metadata {}), read through a dm-snapshot: each cycle reads only the blocks written since the last point",
                    e.block_kib.unwrap_or(crate::era::DEFAULT_BLOCK_KIB),
                    e.metadata.display()
                ),
            );
        }
        if is_dm {
            return (
                Mode::Scan,
                "a device-mapper device without a [[dm_era]] entry in the agent's config (it needs a metadata and a copy-on-write device): each cycle reads it whole and finds unchanged chunks by id"
                    .into(),
            );
        }
        return (
            Mode::Scan,
            "not on device-mapper (no dm-era possible): each cycle reads it whole and finds unchanged chunks by id"
                .into(),
        );
    }
    (Mode::Scan, "neither a block device nor a file".into())
}

/// A device's name in the points: its path's last part (`/dev/vdb` → `vdb`).
pub fn disk_name(path: &str) -> String {
    Path::new(path).file_name().map_or_else(
        || path.replace('/', "_"),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Enrolls this machine and writes the config. Refuses to replace an existing
/// config (the machine would get a second identity) unless `force`.
pub fn enroll(
    config_path: &Path,
    server: &str,
    token: &str,
    ca_cert: Option<PathBuf>,
    password_file: Option<PathBuf>,
    extra: &[PathBuf],
    force: bool,
) -> Result<Enrolled> {
    if config_path.exists() && !force {
        bail!(
            "{} exists: this machine is enrolled already; pass --force to enroll it again (the old identity stays on the server until revoked)",
            config_path.display()
        );
    }
    let client = Client::new(server, ca_cert.as_deref(), None)?;
    let req = EnrollRequest {
        token: token.to_string(),
        hostname: ferry_agent::crypto::hostname(),
        machine_id: machine_id(config_path)?,
        devices: devices(extra)?,
    };
    let enrolled = client.enroll(&req).map_err(|e| anyhow!("{e}"))?;
    Config {
        server: client.server.clone(),
        agent_id: enrolled.agent_id.clone(),
        credential: enrolled.credential.clone(),
        ca_cert,
        password_file,
        pre_cut: None,
        post_cut: None,
        dm_era: Vec::new(),
    }
    .save(config_path)?;
    Config::save_policy(config_path, &enrolled.policy)?;
    Ok(enrolled)
}

/// What the loop runs until.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Stop after this many cycles (default: until revoked or stopped).
    pub cycles: Option<u64>,
}

/// The repository the last cycles used, kept open between cycles.
struct OpenRepo {
    location: String,
    repo: Repository,
}

/// Runs the agent until revoked, `opts.cycles` are done or `stop` is set.
/// Returns the last status.
pub fn run(config_path: &Path, opts: &RunOptions, stop: &AtomicBool) -> Result<AgentStatus> {
    let cfg = Config::load(config_path)?;
    let client = Client::new(
        &cfg.server,
        cfg.ca_cert.as_deref(),
        Some(cfg.credential.clone()),
    )?;
    let mut status = AgentStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let mut policy = Config::load_policy(config_path);
    let mut repo: Option<OpenRepo> = None;
    let mut eras = Eras::default();
    let mut n = 0u64;
    loop {
        let started = Instant::now();
        match client.policy() {
            Ok(p) => {
                if policy.as_ref() != Some(&p) {
                    info!(source = %p.source, devices = ?p.devices, interval_secs = p.interval_secs, "policy");
                    if let Err(e) = Config::save_policy(config_path, &p) {
                        warn!(error = %e, "the policy is not cached");
                    }
                    policy = Some(p);
                }
            }
            Err(ServerError::Refused(m)) => return Err(Stopped(m).into()),
            Err(e) => {
                warn!(error = %e, "the server cannot be reached; protecting with the last policy")
            }
        }
        let interval = policy.as_ref().map_or(Duration::from_secs(10), |p| {
            Duration::from_secs(p.interval_secs.max(1))
        });
        let grouped = policy.as_ref().is_some_and(|p| p.group.is_some());
        if grouped {
            // A group's members start their cycles at the same wall-clock
            // instants, so they reach the barrier together.
            if !sleep_until(Instant::now() + until_aligned(interval), stop) {
                return Ok(status);
            }
        }
        let started = if grouped { Instant::now() } else { started };
        if let Some(p) = &policy {
            n += 1;
            cycle(&cfg, &client, p, &mut repo, &mut eras, &mut status, started);
            match client.push(&status) {
                Ok(()) => {}
                Err(ServerError::Refused(m)) => return Err(Stopped(m).into()),
                Err(e) => warn!(error = %e, "status not pushed"),
            }
        }
        if opts.cycles.is_some_and(|c| n >= c) {
            return Ok(status);
        }
        if !grouped && !sleep_until(started + interval, stop) {
            return Ok(status);
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(status);
        }
    }
}

/// Sleeps until `until`, waking every 100 ms to see whether the agent is
/// asked to stop; false if it is.
fn sleep_until(until: Instant, stop: &AtomicBool) -> bool {
    while let Some(rest) = until.checked_duration_since(Instant::now()) {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(rest.min(Duration::from_millis(100)));
    }
    true
}

/// From now to the next multiple of `interval` since the Unix epoch: where
/// every member of a group starts its cycle, whatever its clock's offset
/// from the others' (the barrier makes the cut exact; this only makes the
/// wait for it short).
fn until_aligned(interval: Duration) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let every = interval.as_millis().max(1);
    Duration::from_millis((every - now % every) as u64)
}

/// The dm-era targets the agent set up or adopted, by device path: kept
/// between cycles (a cycle that fails forgets them, and the next adopts them
/// again from what the kernel holds).
type Eras = std::collections::HashMap<String, Tracked>;

/// One cycle: every device of the policy into one point; `status` updated.
fn cycle(
    cfg: &Config,
    client: &Client,
    p: &Policy,
    repo: &mut Option<OpenRepo>,
    known: &mut Eras,
    status: &mut AgentStatus,
    started: Instant,
) {
    let mut cut = Utc::now();
    status.devices = p
        .devices
        .iter()
        .map(|d| {
            let (mode, mode_reason) = mode_of(cfg, Path::new(d));
            DeviceStatus {
                path: d.clone(),
                disk: disk_name(d),
                mode: Some(mode),
                mode_reason,
                ..Default::default()
            }
        })
        .collect();
    status.pause_secs = None;
    status.group_cut = None;
    status.group_error = None;
    let mut group_cut = None;
    let mut group_error = None;
    let mut hook_error = None;
    let mut post_error = None;
    let r = (|| -> Result<ferry_agent::backup::Summary> {
        if p.devices.is_empty() {
            bail!("the policy names no device; set one on the server");
        }
        if repo.as_ref().is_none_or(|r| r.location != p.repository) {
            let store = ferry_connectors::store::open(&p.repository, false)
                .with_context(|| format!("repository {}", p.repository))?;
            let pw = config::repository_password(cfg)?;
            *repo = Some(OpenRepo {
                location: p.repository.clone(),
                repo: Repository::open(store, &pw)
                    .with_context(|| format!("repository {}", p.repository))?,
            });
        }
        let Some(r) = repo.as_ref() else {
            bail!("no repository");
        };
        // dm-era under the devices configured for it (inserted live the
        // first time, adopted afterwards). One that cannot be set up is read
        // whole this cycle rather than not protected.
        let mut tracked: Vec<Option<Tracked>> = Vec::with_capacity(p.devices.len());
        for (d, st) in p.devices.iter().zip(status.devices.iter_mut()) {
            let t = match cfg.era_for(d).filter(|_| st.mode == Some(Mode::DmEra)) {
                None => None,
                Some(_) if known.contains_key(d) => known.get(d).cloned(),
                Some(e) => match Tracked::attach(e) {
                    Ok(t) => {
                        let mut kept = t.clone();
                        kept.inserted = false;
                        known.insert(d.clone(), kept);
                        Some(t)
                    }
                    Err(e) => {
                        warn!(device = %d, error = %format!("{e:#}"), "dm-era cannot be set up: reading the device whole");
                        st.mode = Some(Mode::Scan);
                        st.mode_reason = format!(
                            "dm-era cannot be set up ({e:#}): this cycle reads the device whole"
                        );
                        None
                    }
                },
            };
            tracked.push(t);
        }
        // The application's hooks around the cut: a point is `app` only
        // when the pre hook succeeded; the post hook runs whenever it ran.
        let frozen = match &cfg.pre_cut {
            None => false,
            Some(cmd) => match hook(cmd, "pre_cut", &p.source, &[]) {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %e, "the point will not be application-consistent");
                    hook_error = Some(e);
                    false
                }
            },
        };
        let mut thaw = Thaw {
            cmd: cfg.post_cut.as_deref().filter(|_| cfg.pre_cut.is_some()),
            source: &p.source,
            views: Vec::new(),
            failed: &mut post_error,
        };
        let eras: Vec<Tracked> = tracked.iter().flatten().cloned().collect();
        // A consistency group's barrier, while this machine's writes are
        // held (its dm-era devices suspended, or its pre_cut hook's freeze):
        // no member lets writes go before every member holds them.
        let mut barrier = || {
            if p.group.is_some() {
                match client.cut() {
                    Ok(g) => group_cut = Some(g),
                    Err(e) => {
                        warn!(error = %e, "cutting without the group");
                        group_error = Some(format!("cut without the group: {e}"));
                    }
                }
            }
        };
        cut = Utc::now();
        let (cuts, pause) = if eras.is_empty() {
            barrier();
            (Vec::new(), None)
        } else {
            let (c, d) = era::cut(&eras, barrier)?;
            (c, Some(d))
        };
        let _uncut = Uncut(&eras);
        status.pause_secs = pause.map(|d| d.as_secs_f64());
        thaw.views = cuts.iter().map(|c| c.view.display().to_string()).collect();
        // When every device is held by a snapshot, the application may go on
        // at once: the read sees the instant of the cut.
        let thaw = if tracked.iter().all(Option::is_some) {
            drop(thaw);
            None
        } else {
            Some(thaw)
        };
        let parent = r
            .repo
            .points()?
            .0
            .into_iter()
            .rfind(|pt| pt.meta.source == p.source);
        let mut cuts = cuts.into_iter();
        let mut sources: Vec<Box<dyn BlockSource>> = Vec::with_capacity(p.devices.len());
        for ((d, t), st) in p
            .devices
            .iter()
            .zip(&tracked)
            .zip(status.devices.iter_mut())
        {
            let Some(t) = t else {
                sources.push(Box::new(FileSource::open(Path::new(d))?));
                continue;
            };
            let c = cuts.next().ok_or_else(|| anyhow!("no cut for {d}"))?;
            let view = FileSource::open(&c.view)?;
            let size = view.size()?;
            // The parent's token says from which era this read starts, if
            // the chain is unbroken.
            let token = parent.as_ref().and_then(|pt| {
                pt.meta
                    .disks
                    .iter()
                    .find(|m| m.name == st.disk && m.size == size)
                    .and_then(|m| m.tracking.clone())
            });
            let since = token.as_deref().and_then(|tok| t.since(tok));
            let changes = match (since, token) {
                (Some(since), Some(tok)) => {
                    let ranges = t.written_since(since)?;
                    st.changed_bytes = Some(ranges.iter().map(|(a, b)| b - a).sum());
                    Some(ChangeMap {
                        tracker: tok,
                        ranges,
                    })
                }
                _ => {
                    t.drop_metadata_snap();
                    let why = if t.inserted {
                        "the era target was just put under the device (first cycle, or the machine restarted): this cycle reads it whole"
                    } else {
                        "the last point was not tracked by this era target: this cycle reads the device whole"
                    };
                    st.mode_reason = format!("{}; {why}", st.mode_reason);
                    None
                }
            };
            sources.push(Box::new(EraView {
                file: view,
                changes,
                tracking: t.token(c.era),
            }));
        }
        let opts = BackupOptions {
            source: p.source.clone(),
            disks: p
                .devices
                .iter()
                .map(|d| DiskSpec {
                    name: disk_name(d),
                    path: PathBuf::from(d),
                })
                .collect(),
            consistency: frozen.then_some(ferry_agent::point::Consistency::App),
            time: Some(cut),
            group: group_cut.clone(),
        };
        let refs: Vec<&dyn BlockSource> = sources.iter().map(|s| s.as_ref()).collect();
        let summary =
            ferry_agent::backup::backup_sources(&r.repo, &opts, &refs, &Progress::default());
        drop(thaw);
        let summary = summary?;
        if let Some(k) = p.keep_last.filter(|k| *k > 0) {
            let keep = ferry_agent::retention::Policy {
                last: Some(k),
                ..Default::default()
            };
            if let Err(e) = ferry_agent::prune::forget(&r.repo, &keep, Some(&p.source), &[], false)
            {
                warn!(error = %e, "retention failed; points are kept");
            }
        }
        Ok(summary)
    })();
    let secs = started.elapsed().as_secs_f64();
    status.hook_error = hook_error.or(post_error);
    status.group_cut = group_cut;
    status.group_error = group_error;
    match r {
        Ok(s) => {
            let lag = (Utc::now() - cut).num_milliseconds() as f64 / 1000.0;
            info!(point = %s.point, read = s.bytes_read, stored = s.stored_bytes, lag_secs = lag, consistency = %s.consistency, "protected");
            status.cycles_ok += 1;
            status.last_point = Some(s.point.clone());
            status.last_cut = Some(cut);
            status.lag_secs = Some(lag);
            status.consistency = Some(s.consistency.to_string());
            status.last_cycle_secs = secs;
            status.throughput_bytes_per_sec = s.bytes_read as f64 / secs.max(1e-6);
            status.stored_bytes = s.stored_bytes;
            status.last_error = None;
            for (d, n) in status.devices.iter_mut().zip(&s.disk_bytes_read) {
                d.bytes_read = *n;
            }
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cycle failed; the next one catches up");
            known.clear();
            status.cycles_failed += 1;
            status.last_cycle_secs = secs;
            status.last_error = Some(format!("{e:#}"));
        }
    }
}

/// Ends the cuts of a cycle when dropped, whatever happened.
struct Uncut<'a>(&'a [Tracked]);

impl Drop for Uncut<'_> {
    fn drop(&mut self) {
        for t in self.0 {
            if let Err(e) = era::uncut(t) {
                warn!(device = %t.name, error = %format!("{e:#}"), "the cycle's snapshot could not be removed; the next cycle retries");
            }
        }
    }
}

/// A device as a dm-snapshot holds it at the cut, with the blocks its era
/// target saw written since the parent point.
struct EraView {
    file: FileSource,
    changes: Option<ChangeMap>,
    tracking: String,
}

impl BlockSource for EraView {
    fn size(&self) -> ferry_agent::Result<u64> {
        self.file.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> ferry_agent::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> ferry_agent::Result<()> {
        self.file.read_many(reqs)
    }
    fn change_map(&self) -> ferry_agent::Result<Option<ChangeMap>> {
        Ok(self.changes.clone())
    }
    fn tracking(&self) -> Option<String> {
        Some(self.tracking.clone())
    }
}

/// Runs a hook of the agent's config with `sh -c`, FERRY_SOURCE and
/// FERRY_HOOK set, and FERRY_VIEWS: the snapshots of the dm-era devices
/// (space-separated nodes) the cycle will read, for a post_cut hook that
/// wants to look at the instant of the cut (fsck it, copy it). Its failure
/// in words.
fn hook(cmd: &str, which: &str, source: &str, views: &[String]) -> std::result::Result<(), String> {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .env("FERRY_SOURCE", source)
        .env("FERRY_HOOK", which)
        .env("FERRY_VIEWS", views.join(" "))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{which}: cannot run sh: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: String = err.trim().chars().take(500).collect();
        Err(format!("{which} `{cmd}` exited with {}: {err}", out.status))
    }
}

/// Runs the post-cut hook when dropped: after the read, whatever happened.
struct Thaw<'a> {
    cmd: Option<&'a str>,
    source: &'a str,
    views: Vec<String>,
    failed: &'a mut Option<String>,
}

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        if let Some(cmd) = self.cmd
            && let Err(e) = hook(cmd, "post_cut", self.source, &self.views)
        {
            warn!(error = %e, "post_cut hook failed");
            *self.failed = Some(e);
        }
    }
}
