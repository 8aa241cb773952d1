//! Agentless protection of running QEMU/KVM VMs through QMP: per cycle, one
//! atomic cut (a new dirty bitmap, the current one frozen, and a point-in-time
//! view of the disk started, in one `transaction`), the view exported read-only
//! over NBD with the frozen bitmap, an incremental of the dirty extents, the
//! point committed, and only then the old bitmap dropped.
//!
//! The point-in-time view is a fleecing image: `blockdev-backup sync=none` into
//! a temporary qcow2 whose backing is the disk, so the guest keeps running and
//! the old content of every block it overwrites is copied aside first.
//!
//! The chain is checked, never assumed: each point records the bitmap that
//! started at its instant (`tracking`), and the next cycle uses a change map
//! only if that bitmap and every later one are still on the disk and
//! consistent. Otherwise (QEMU restarted or crashed, a bitmap removed) it reads
//! the whole disk and says why. A cycle that fails after the cut keeps its
//! bitmaps, and the next one merges them, so no write is ever lost.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tracing::{info, warn};

use ferry_agent::backup::{BackupOptions, DiskSpec, Summary};
use ferry_agent::progress::Progress;
use ferry_agent::repo::Repository;
use ferry_agent::source::{BlockSource, ChangeMap};
use ferry_agent::{Error, Result};

use crate::nbd::{Addr, NbdSource, NbdUrl};

/// Bitmaps Ferry manages are named `ferry-<generation>`.
pub const BITMAP_PREFIX: &str = "ferry-";
const QMP_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong talking to QEMU over QMP. Reported to the data plane as the
/// source disk failing ([`Error::Source`] naming the socket), with this as its
/// cause.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error(
        "cannot connect to QMP at {}: {source}; is the VM running with -qmp unix:{},server=on,wait=off?",
        sock.display(),
        sock.display()
    )]
    Connect {
        sock: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP at {}: {doing}: {source}", sock.display())]
    Io {
        sock: PathBuf,
        doing: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP at {}: bad JSON from the VM: {source}", sock.display())]
    Json {
        sock: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP at {}: {command} failed: {desc}", sock.display())]
    Command {
        sock: PathBuf,
        command: String,
        desc: String,
    },
    /// The VM answered something Ferry cannot use (no greeting, no such node,
    /// no event in time).
    #[error("QMP at {}: {detail}", sock.display())]
    Unexpected { sock: PathBuf, detail: String },
}

impl QmpError {
    fn sock(&self) -> &Path {
        match self {
            QmpError::Connect { sock, .. }
            | QmpError::Io { sock, .. }
            | QmpError::Json { sock, .. }
            | QmpError::Command { sock, .. }
            | QmpError::Unexpected { sock, .. } => sock,
        }
    }
}

impl From<QmpError> for Error {
    fn from(e: QmpError) -> Error {
        Error::Source {
            path: e.sock().to_path_buf(),
            source: std::io::Error::other(e),
        }
    }
}

fn qmp_err(sock: &Path, detail: impl std::fmt::Display) -> Error {
    QmpError::Unexpected {
        sock: sock.to_path_buf(),
        detail: detail.to_string(),
    }
    .into()
}

fn qmp_io(sock: &Path, doing: &str, source: std::io::Error) -> Error {
    QmpError::Io {
        sock: sock.to_path_buf(),
        doing: doing.to_string(),
        source,
    }
    .into()
}

/// A QMP connection (JSON lines over a unix socket).
pub struct Qmp {
    sock: PathBuf,
    rd: BufReader<UnixStream>,
    wr: UnixStream,
    /// Events received while waiting for command replies.
    events: Vec<Value>,
}

impl Qmp {
    pub fn connect(sock: &Path) -> Result<Qmp> {
        let s = UnixStream::connect(sock).map_err(|source| QmpError::Connect {
            sock: sock.to_path_buf(),
            source,
        })?;
        s.set_read_timeout(Some(QMP_TIMEOUT))
            .map_err(|e| qmp_io(sock, "setting a timeout", e))?;
        let wr = s
            .try_clone()
            .map_err(|e| qmp_io(sock, "cloning the socket", e))?;
        let mut q = Qmp {
            sock: sock.to_path_buf(),
            rd: BufReader::new(s),
            wr,
            events: Vec::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_err(sock, "no QMP greeting"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .rd
            .read_line(&mut line)
            .map_err(|e| qmp_io(&self.sock, "reading", e))?;
        if n == 0 {
            return Err(qmp_err(
                &self.sock,
                "the VM closed the connection (did QEMU exit?)",
            ));
        }
        serde_json::from_str(&line).map_err(|source| {
            QmpError::Json {
                sock: self.sock.clone(),
                source,
            }
            .into()
        })
    }

    /// Run a command; its `return` value, or its error as an error.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let msg = json!({"execute": cmd, "arguments": args});
        let mut line = msg.to_string();
        line.push('\n');
        self.wr
            .write_all(line.as_bytes())
            .map_err(|e| qmp_io(&self.sock, cmd, e))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(QmpError::Command {
                    sock: self.sock.clone(),
                    command: cmd.to_string(),
                    desc: desc.to_string(),
                }
                .into());
            }
        }
    }

    /// Wait for an event whose `data` matches `key = value`.
    pub fn wait_event(
        &mut self,
        name: &str,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && e["data"][key].as_str() == Some(value))
            {
                self.events.remove(i);
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(qmp_err(&self.sock, format!("no {name} event for {value}")));
            }
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Remove an NBD export and wait until QEMU has let go of it.
    fn remove_export(&mut self, id: &str) {
        if self
            .execute("block-export-del", json!({"id": id, "mode": "hard"}))
            .is_ok()
        {
            let _ = self.wait_event("BLOCK_EXPORT_DELETED", "id", id, Duration::from_secs(30));
        }
    }

    /// Cancel a block job and wait until it is gone.
    fn cancel_job(&mut self, job: &str) {
        if self
            .execute("block-job-cancel", json!({"device": job, "force": true}))
            .is_ok()
        {
            let _ = self.wait_event(
                "BLOCK_JOB_CANCELLED",
                "device",
                job,
                Duration::from_secs(30),
            );
        }
    }

    /// The dirty bitmaps of a block node.
    pub fn bitmaps(&mut self, node: &str) -> Result<Vec<Bitmap>> {
        let nodes = self.execute("query-named-block-nodes", json!({"flat": true}))?;
        let n = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == node))
            .ok_or_else(|| {
                qmp_err(
                    &self.sock,
                    format!("the VM has no block node named {node:?}; see query-named-block-nodes"),
                )
            })?;
        Ok(n["dirty-bitmaps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| Bitmap {
                        name: b["name"].as_str().unwrap_or_default().to_string(),
                        recording: b["recording"].as_bool().unwrap_or(false),
                        inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                        count: b["count"].as_u64().unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The size of a block node.
    pub fn node_size(&mut self, node: &str) -> Result<u64> {
        let nodes = self.execute("query-named-block-nodes", json!({"flat": true}))?;
        nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == node))
            .and_then(|n| n["image"]["virtual-size"].as_u64())
            .ok_or_else(|| qmp_err(&self.sock, format!("no size for node {node:?}")))
    }

    /// The format driver of a block node (`qcow2`, `raw`, ...).
    pub fn node_driver(&mut self, node: &str) -> Result<String> {
        let nodes = self.execute("query-named-block-nodes", json!({"flat": true}))?;
        nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == node))
            .and_then(|n| n["drv"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| qmp_err(&self.sock, format!("no driver for node {node:?}")))
    }
}

#[derive(Debug, Clone)]
pub struct Bitmap {
    pub name: String,
    pub recording: bool,
    pub inconsistent: bool,
    /// Dirty bytes.
    pub count: u64,
}

fn generation(name: &str) -> Option<u64> {
    name.strip_prefix(BITMAP_PREFIX)?.parse().ok()
}

/// One disk of a VM to protect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    /// The block node of the disk (`-blockdev ...,node-name=NODE`).
    pub node: String,
    /// The disk's name in the points.
    pub name: String,
}

/// A running VM to protect: every disk listed is cut at the same instant, in
/// one QMP `transaction`, and committed in one point (a consistency group).
#[derive(Debug, Clone)]
pub struct LiveVm {
    /// The QMP socket of the running VM.
    pub qmp: PathBuf,
    /// The disks, in the order the points list them.
    pub disks: Vec<VmDisk>,
    /// Where fleecing images and the NBD socket go (a local directory).
    pub work_dir: PathBuf,
}

/// What one cycle did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CycleReport {
    pub summary: Summary,
    /// When the point-in-time view of every disk was cut.
    pub cut: DateTime<Utc>,
    /// Incremental through the bitmap chain, or a full read and why (per
    /// disk, `NAME: MODE; ...`, when the VM has more than one).
    pub mode: String,
    /// Bytes written since the cut (the new bitmaps' counts) when the point committed.
    pub backlog_bytes: u64,
}

/// An NBD export of the point-in-time view, with the tracking bitmap recorded.
struct ViewSource {
    inner: NbdSource,
    tracking: String,
    use_changes: bool,
}

impl BlockSource for ViewSource {
    fn size(&self) -> Result<u64> {
        self.inner.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        self.inner.read_many(reqs)
    }
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        self.inner.data_ranges()
    }
    fn change_map(&self) -> Result<Option<ChangeMap>> {
        if self.use_changes {
            self.inner.change_map()
        } else {
            Ok(None)
        }
    }
    fn tracking(&self) -> Option<String> {
        Some(self.tracking.clone())
    }
}

/// Remove what a cycle killed half-way (`kill -9` of ferry) left in the VM: its
/// export, NBD server, backup job and fleecing node, and their files. Its
/// bitmaps stay: the next cut merges them, so no write is lost.
fn clean_up_stale(q: &mut Qmp, work_dir: &Path) -> Result<()> {
    let mine = |v: &Value, key: &str, prefix: &str| {
        v[key]
            .as_str()
            .filter(|s| s.starts_with(prefix))
            .map(str::to_string)
    };
    let exports = q.execute("query-block-exports", json!({}))?;
    let stale: Vec<String> = exports
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| mine(e, "id", "ferry-exp-"))
        .collect();
    for id in &stale {
        warn!(export = %id, "removing an export a killed cycle left");
        q.remove_export(id);
    }
    // The NBD server a killed cycle started, with or without exports (a
    // kill between nbd-server-start and the first export leaves none, and
    // every later start would fail with "already running"). Its socket in
    // the work directory, which only Ferry's cycles use, says it was ours.
    let own_socket = std::fs::read_dir(work_dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("nbd-"));
    if !stale.is_empty() || own_socket {
        let _ = q.execute("nbd-server-stop", json!({}));
    }
    let jobs = q.execute("query-block-jobs", json!({}))?;
    for job in jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| mine(j, "device", "ferry-job-"))
    {
        warn!(job = %job, "cancelling a backup job a killed cycle left");
        q.cancel_job(&job);
    }
    let nodes = q.execute("query-named-block-nodes", json!({"flat": true}))?;
    let mut fleeces: Vec<String> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| mine(n, "node-name", "ferry-fleece-"))
        .collect();
    fleeces.dedup();
    for n in fleeces {
        warn!(node = %n, "removing a fleecing node a killed cycle left");
        let _ = q.execute("blockdev-del", json!({"node-name": n}));
    }
    // A group cut killed while the VMs were paused: resume this one.
    let mark = work_dir.join(PAUSE_MARK);
    if mark.exists() {
        let running = q.execute("query-status", json!({}))?["running"] == json!(true);
        if !running {
            warn!("resuming a VM a killed group cut left paused");
            q.execute("cont", json!({}))?;
        }
        let _ = std::fs::remove_file(&mark);
    }
    // Fleecing images and sockets no node uses any more.
    if let Ok(entries) = std::fs::read_dir(work_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("fleece-") || name.starts_with("nbd-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Runs while the views are exported, once per disk, with the disk's name and
/// its view's NBD URL.
pub type Hook = dyn Fn(&str, &str) -> Result<()>;

/// How one disk takes part in a cycle, decided before the cut.
struct DiskPlan<'a> {
    disk: &'a VmDisk,
    /// Ferry's bitmaps on the node before the cut (dropped after the commit).
    ours: Vec<String>,
    /// The bitmap that starts at the cut and the point records as `tracking`.
    next: String,
    /// The bitmaps the change map is read from, oldest first, or why the
    /// disk is read whole.
    chain: std::result::Result<Vec<Bitmap>, String>,
    /// Bitmaps survive a restart of QEMU only in an image that can store
    /// them (qcow2); on a raw image they live in QEMU's memory, and a
    /// restarted QEMU means one full read.
    persistent: bool,
    size: u64,
    fleece_file: PathBuf,
    fleece_node: String,
    job: String,
    export_id: String,
}

impl DiskPlan<'_> {
    /// The cut's actions for this disk, the frozen bitmap and the mode.
    fn cut_actions(&self, actions: &mut Vec<Value>) -> (Option<String>, String) {
        let node = &self.disk.node;
        actions.push(json!({"type": "block-dirty-bitmap-add",
            "data": {"node": node, "name": self.next, "granularity": 4096, "persistent": self.persistent}}));
        match &self.chain {
            Ok(c) => {
                let cur = c.last().expect("a recording bitmap");
                actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": cur.name}}));
                let older: Vec<&str> = c[..c.len() - 1].iter().map(|b| b.name.as_str()).collect();
                if !older.is_empty() {
                    actions.push(json!({"type": "block-dirty-bitmap-merge",
                        "data": {"node": node, "target": cur.name, "bitmaps": older}}));
                }
                let mode = if older.is_empty() {
                    format!("incremental through bitmap {}", cur.name)
                } else {
                    format!(
                        "incremental through bitmap {} (with {} merged from interrupted cycles)",
                        cur.name,
                        older.join(", ")
                    )
                };
                (Some(cur.name.clone()), mode)
            }
            Err(why) => (None, format!("full read: {why}")),
        }
    }
}

/// Whether the bitmaps on a disk continue the chain its latest point recorded
/// (`tracked`): the bitmaps to read the change map from, or why not.
fn chain_of(
    ours: &[Bitmap],
    has_parent: bool,
    tracked: Option<&str>,
) -> std::result::Result<Vec<Bitmap>, String> {
    let t = match tracked {
        None if !has_parent => return Err("first point of this source".into()),
        None => return Err("the latest point recorded no bitmap for this disk".into()),
        Some(t) => t,
    };
    let g = generation(t)
        .ok_or_else(|| format!("the latest point's tracker {t:?} is not a ferry bitmap"))?;
    let mut chain: Vec<Bitmap> = ours
        .iter()
        .filter(|b| generation(&b.name).is_some_and(|x| x >= g))
        .cloned()
        .collect();
    chain.sort_by_key(|b| generation(&b.name));
    if chain.first().is_none_or(|b| b.name != t) {
        Err(format!(
            "bitmap {t} is gone (QEMU restarted or crashed since the latest point?)"
        ))
    } else if let Some(b) = chain.iter().find(|b| b.inconsistent) {
        Err(format!(
            "bitmap {} is inconsistent (QEMU stopped without saving it)",
            b.name
        ))
    } else if chain.last().is_some_and(|b| !b.recording) {
        Err("no bitmap is recording writes".into())
    } else {
        Ok(chain)
    }
}

/// A disk at the cut: the bitmap frozen for its change map (none for a full
/// read), and the mode in words.
type Frozen = (Option<String>, String);

/// One protection cycle of a VM, in three steps so that several VMs can be
/// cut at one instant ([`cut_together`]): [`prepare`] (the fleecing images
/// attached, nothing frozen yet), [`Cycle::cut`] (the transaction), and
/// [`Cycle::finish`] (export, backup, commit). Whatever it set up in the VM
/// is torn down when it is dropped, however it ends; the bitmaps stay unless
/// the point was committed.
pub struct Cycle<'a> {
    source: String,
    vm: &'a LiveVm,
    q: Qmp,
    plans: Vec<DiskPlan<'a>>,
    sock: PathBuf,
    /// Fleecing nodes attached (the first N plans').
    attached: usize,
    /// The cut's instant, and per disk the frozen bitmap and the mode.
    cut: Option<(DateTime<Utc>, Vec<Frozen>)>,
    server: bool,
    exports: Vec<String>,
}

/// Prepares a cycle of `vm` as `source`: connects, removes what a killed
/// cycle left, decides per disk whether its bitmap chain continues the
/// latest point, and attaches a fleecing image to every disk.
pub fn prepare<'a>(repo: &Repository, source: &str, vm: &'a LiveVm) -> Result<Cycle<'a>> {
    if vm.disks.is_empty() {
        return Err(Error::InvalidInput(format!("{source}: no disk to protect")));
    }
    for (i, d) in vm.disks.iter().enumerate() {
        if let Some(o) = vm.disks[..i]
            .iter()
            .find(|o| o.node == d.node || o.name == d.name)
        {
            return Err(Error::InvalidInput(format!(
                "{source}: disks {:?} (node {}) and {:?} (node {}) clash; give each disk its own node and name",
                o.name, o.node, d.name, d.node
            )));
        }
    }
    let mut q = Qmp::connect(&vm.qmp)?;
    clean_up_stale(&mut q, &vm.work_dir)?;

    // Does each disk's bitmap chain continue the latest point of this source?
    let parent = repo
        .points()?
        .0
        .into_iter()
        .rfind(|p| p.meta.source == source);
    std::fs::create_dir_all(&vm.work_dir).map_err(|e| Error::Target {
        path: vm.work_dir.clone(),
        source: e,
    })?;
    let pid = std::process::id();
    let mut plans = Vec::with_capacity(vm.disks.len());
    for (i, disk) in vm.disks.iter().enumerate() {
        let bitmaps = q.bitmaps(&disk.node)?;
        let ours: Vec<Bitmap> = bitmaps
            .into_iter()
            .filter(|b| generation(&b.name).is_some())
            .collect();
        let next_gen = ours
            .iter()
            .filter_map(|b| generation(&b.name))
            .max()
            .map_or(1, |g| g + 1);
        let tracked = parent.as_ref().and_then(|p| {
            p.meta
                .disks
                .iter()
                .find(|d| d.name == disk.name)
                .and_then(|d| d.tracking.clone())
        });
        let chain = chain_of(&ours, parent.is_some(), tracked.as_deref());
        let tag = format!("{pid}-{next_gen}-{i}");
        plans.push(DiskPlan {
            disk,
            ours: ours.into_iter().map(|b| b.name).collect(),
            next: format!("{BITMAP_PREFIX}{next_gen}"),
            chain,
            persistent: q.node_driver(&disk.node)? == "qcow2",
            size: q.node_size(&disk.node)?,
            fleece_file: vm.work_dir.join(format!("fleece-{tag}.qcow2")),
            fleece_node: format!("ferry-fleece-{tag}"),
            job: format!("ferry-job-{tag}"),
            export_id: format!("ferry-exp-{tag}"),
        });
    }
    let sock = vm
        .work_dir
        .join(format!("nbd-{pid}-{}.sock", plans[0].next));
    let mut c = Cycle {
        source: source.to_owned(),
        vm,
        q,
        plans,
        sock,
        attached: 0,
        cut: None,
        server: false,
        exports: Vec::new(),
    };
    for i in 0..c.plans.len() {
        let p = &c.plans[i];
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p.fleece_file)
            .arg(p.size.to_string())
            .status()
            .map_err(|e| qmp_io(&vm.qmp, "running qemu-img create", e))?;
        if !status.success() {
            return Err(qmp_err(
                &vm.qmp,
                "qemu-img create of the fleecing image failed",
            ));
        }
        let args =
            // The fleecing image lives for one cycle: never flush it to disk
            // (flushes stall the guest's writes; bench/protect.sh).
            json!({"driver": "qcow2", "node-name": p.fleece_node, "discard": "unmap",
                   "cache": {"no-flush": true},
                   "file": {"driver": "file", "filename": p.fleece_file},
                   "backing": p.disk.node});
        c.q.execute("blockdev-add", args)?;
        c.attached = i + 1;
    }
    Ok(c)
}

impl Cycle<'_> {
    /// The cut, one transaction for every disk: the next bitmaps start, the
    /// current ones freeze (with any leftovers of failed cycles merged into
    /// them), the views start. Returns its instant.
    pub fn cut(&mut self) -> Result<DateTime<Utc>> {
        let mut actions = Vec::new();
        let mut frozen = Vec::with_capacity(self.plans.len());
        for p in &self.plans {
            frozen.push(p.cut_actions(&mut actions));
        }
        for p in &self.plans {
            actions.push(json!({"type": "blockdev-backup",
                "data": {"job-id": p.job, "device": p.disk.node, "target": p.fleece_node, "sync": "none"}}));
        }
        self.q.execute("transaction", json!({"actions": actions}))?;
        let at = Utc::now();
        self.cut = Some((at, frozen));
        Ok(at)
    }

    /// Whether the VM runs (QMP `query-status`).
    fn running(&mut self) -> Result<bool> {
        Ok(self.q.execute("query-status", json!({}))?["running"] == json!(true))
    }

    /// Exports the views, backs them up into one point and commits it; the
    /// old bitmaps are dropped only then.
    pub fn finish(mut self, repo: &Repository, hook: Option<&Hook>) -> Result<CycleReport> {
        let (cut, frozen) = self
            .cut
            .clone()
            .ok_or_else(|| Error::InvalidInput("a cycle finished before its cut".into()))?;
        let source = self.source.clone();
        for (p, (f, mode)) in self.plans.iter().zip(&frozen) {
            if f.is_none() {
                warn!(source, disk = %p.disk.name, %mode, "reading the whole disk");
            }
        }
        self.q.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": self.sock}}}),
        )?;
        self.server = true;
        let mut srcs = Vec::with_capacity(self.plans.len());
        for (i, (f, _)) in frozen.iter().enumerate() {
            let p = &self.plans[i];
            let mut export = json!({"type": "nbd", "id": p.export_id, "node-name": p.fleece_node,
                                    "name": p.disk.name, "writable": false});
            if let Some(f) = f {
                export["bitmaps"] = json!([f]);
            }
            let (id, name, next) = (p.export_id.clone(), p.disk.name.clone(), p.next.clone());
            self.q.execute("block-export-add", export)?;
            self.exports.push(id);
            let url = NbdUrl {
                addr: Addr::Unix(self.sock.clone()),
                export: name.clone(),
                bitmap: f.clone(),
            };
            if let Some(h) = hook {
                h(&name, &url.to_string())?;
            }
            srcs.push(ViewSource {
                inner: NbdSource::open(&url)?,
                tracking: next,
                use_changes: f.is_some(),
            });
        }
        let opts = BackupOptions {
            source: source.clone(),
            disks: self
                .plans
                .iter()
                .map(|p| DiskSpec {
                    name: p.disk.name.clone(),
                    path: PathBuf::from(format!("qmp:{}#{}", self.vm.qmp.display(), p.disk.node)),
                })
                .collect(),
            consistency: None,
            time: Some(cut),
            group: None,
        };
        let refs: Vec<&dyn BlockSource> = srcs.iter().map(|s| s as &dyn BlockSource).collect();
        let summary =
            ferry_agent::backup::backup_sources(repo, &opts, &refs, &Progress::default())?;
        drop(srcs);
        let mut backlog = 0;
        for i in 0..self.plans.len() {
            let (node, next) = (self.plans[i].disk.node.clone(), self.plans[i].next.clone());
            backlog += self
                .q
                .bitmaps(&node)?
                .iter()
                .find(|b| b.name == next)
                .map_or(0, |b| b.count);
        }
        let mode = if self.plans.len() == 1 {
            frozen[0].1.clone()
        } else {
            self.plans
                .iter()
                .zip(&frozen)
                .map(|(p, (_, m))| format!("{}: {m}", p.disk.name))
                .collect::<Vec<_>>()
                .join("; ")
        };
        self.teardown();
        // Committed: every bitmap before the new ones may go.
        for i in 0..self.plans.len() {
            let node = self.plans[i].disk.node.clone();
            for name in self.plans[i].ours.clone() {
                if let Err(e) = self.q.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": node, "name": name}),
                ) {
                    warn!(bitmap = %name, error = %e, "could not drop an old bitmap; the next cycle drops it");
                }
            }
        }
        let report = CycleReport {
            summary,
            cut,
            mode,
            backlog_bytes: backlog,
        };
        info!(
            source,
            point = %report.summary.point,
            mode = %report.mode,
            read = report.summary.bytes_read,
            stored = report.summary.stored_bytes,
            "cycle committed"
        );
        Ok(report)
    }

    /// Removes the views (exports, server, jobs, fleecing nodes and files);
    /// idempotent.
    fn teardown(&mut self) {
        for id in std::mem::take(&mut self.exports) {
            self.q.remove_export(&id);
        }
        if std::mem::take(&mut self.server) {
            let _ = self.q.execute("nbd-server-stop", json!({}));
        }
        if self.cut.is_some() {
            for p in &self.plans {
                self.q.cancel_job(&p.job);
            }
        }
        for p in &self.plans[..std::mem::take(&mut self.attached)] {
            let _ = self
                .q
                .execute("blockdev-del", json!({"node-name": p.fleece_node}));
        }
        for p in &self.plans {
            let _ = std::fs::remove_file(&p.fleece_file);
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

impl Drop for Cycle<'_> {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Run one protection cycle of `vm` into `repo` as source `source`: every
/// disk of the VM is cut in the same QMP transaction and committed in one
/// point, so a write that spans disks is in the point on all of them or on
/// none. `hook` runs while the views are exported, before the backup reads them.
pub fn cycle(
    repo: &Repository,
    source: &str,
    vm: &LiveVm,
    hook: Option<&Hook>,
) -> Result<CycleReport> {
    let mut c = prepare(repo, source, vm)?;
    c.cut()?;
    c.finish(repo, hook)
}

/// How several VMs were cut together.
#[derive(Debug, Clone, Copy)]
pub struct GroupCut {
    /// How long the VMs were paused (first `stop` to last `cont`).
    pub paused: Duration,
    /// The first cut to the last.
    pub skew: Duration,
}

/// Cuts several prepared VMs at one instant: every running VM is paused
/// (QMP `stop`), each is cut, and every VM paused here is resumed, whatever
/// happened. No guest runs between the first cut and the last, so a write
/// one machine makes after hearing from another is never in the second's
/// point without the first's. A file in each VM's work directory marks it
/// paused by Ferry until it is resumed, so a cycle after a `kill -9` in the
/// window resumes it ([`prepare`] does). Returns each cut's result, in order.
pub fn cut_together(cycles: &mut [Cycle<'_>]) -> (Vec<Result<DateTime<Utc>>>, Option<GroupCut>) {
    let started = Instant::now();
    let mut paused = vec![false; cycles.len()];
    for (i, c) in cycles.iter_mut().enumerate() {
        match c.running() {
            Ok(true) => {
                let mark = c.vm.work_dir.join(PAUSE_MARK);
                if std::fs::write(&mark, std::process::id().to_string()).is_ok()
                    && c.q.execute("stop", json!({})).is_ok()
                {
                    paused[i] = true;
                } else {
                    let _ = std::fs::remove_file(&mark);
                }
            }
            Ok(false) => {}
            Err(e) => warn!(source = %c.source, error = %e, "cannot tell whether the VM runs"),
        }
    }
    // Tests widen the window between two cuts (FERRY_TEST_GROUP_CUT_GAP_MS)
    // to show that the pause, not luck, keeps the guests from moving on.
    let gap = std::env::var("FERRY_TEST_GROUP_CUT_GAP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let mut cuts = Vec::with_capacity(cycles.len());
    for (i, c) in cycles.iter_mut().enumerate() {
        if let Some(g) = gap.filter(|_| i > 0) {
            std::thread::sleep(g);
        }
        cuts.push(c.cut());
    }
    for (i, c) in cycles.iter_mut().enumerate() {
        if paused[i] {
            match c.q.execute("cont", json!({})) {
                Ok(_) => {
                    let _ = std::fs::remove_file(c.vm.work_dir.join(PAUSE_MARK));
                }
                Err(e) => {
                    warn!(source = %c.source, error = %e, "could not resume the VM; the next cycle tries again")
                }
            }
        }
    }
    let times: Vec<DateTime<Utc>> = cuts
        .iter()
        .filter_map(|c| c.as_ref().ok().copied())
        .collect();
    let group = match (times.iter().min(), times.iter().max()) {
        (Some(a), Some(b)) => Some(GroupCut {
            paused: started.elapsed(),
            skew: (*b - *a).to_std().unwrap_or_default(),
        }),
        _ => None,
    };
    (cuts, group)
}

/// Marks a VM that a group cut paused, until it resumes it.
const PAUSE_MARK: &str = "paused-by-ferry";
