//! dm-era change tracking under a device-mapper device, and a dm-snapshot
//! that gives each cycle a stable view to read.
//!
//! Once a device (`NAME`, say the LVM volume `vg0-data`) is tracked, the
//! stack is:
//!
//! ```text
//! NAME             linear → ferry-era-NAME            (between cycles)
//!                  snapshot-origin ferry-era-NAME     (while a cycle reads)
//! ferry-era-NAME   era METADATA ferry-orig-NAME BLOCK (uuid FERRY-ERA-<instance>)
//! ferry-orig-NAME  NAME's original table
//! ferry-snap-NAME  snapshot ferry-era-NAME COW N 8    (while a cycle reads)
//! ```
//!
//! Inserting the era target is live: NAME is suspended (its file system
//! frozen), its table swapped, and resumed; nothing above NAME notices. The
//! cut of a cycle is one more suspension of every tracked device of the
//! policy at once, during which each era target is checkpointed (the writes
//! before the cut close their era), its metadata snapshotted (so
//! `era_invalidate` can read it while the target runs), and a
//! non-persistent dm-snapshot created, so the cycle reads the instant of the
//! cut while writes go on. After the read the snapshot goes away.
//!
//! The chain of trust lives in the repository, not in a local file: each
//! point records `dm-era:<instance>:<era>`, the era that began at its cut.
//! The next cycle reads only the blocks written since that era, and only when
//! the era target that runs now is the same instance. After a reboot (the
//! device-mapper table is gone, writes made before the agent put the target
//! back were tracked by nothing) or anything else that breaks the chain, the
//! instance differs and the cycle reads the whole device once; the
//! repository stores only the chunks that changed. A kill of the agent
//! leaves the target in the kernel: the next cycle reads the blocks written
//! since the last committed point, and a cut the kill interrupted is undone.
//!
//! Device-mapper is driven by ioctls from the agent's process ([`crate::dm`]);
//! the era metadata is read by `era_invalidate` (from
//! thin-provisioning-tools). Devices are named by `MAJOR:MINOR` and read
//! through `/dev/dm-N`, which the kernel's devtmpfs makes whether or not
//! udev runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use tracing::{info, warn};

use crate::config::EraConfig;
use crate::dm;

/// The era block when the config does not say: the data plane's chunk.
pub const DEFAULT_BLOCK_KIB: u32 = 64;
/// The smallest metadata device taken (a few thousand 4 KiB blocks: enough
/// for about 4 TiB at 64 KiB era blocks).
const MIN_METADATA_BYTES: u64 = 4 << 20;
const UUID_PREFIX: &str = "FERRY-ERA-";

/// A block device's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl DevNum {
    /// The block device at `path`.
    pub fn of(path: &Path) -> Result<DevNum> {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
        let m = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
        if !m.file_type().is_block_device() {
            bail!("{} is not a block device", path.display());
        }
        let rdev = m.rdev();
        Ok(DevNum {
            major: rustix::fs::major(rdev),
            minor: rustix::fs::minor(rdev),
        })
    }

    fn parse(s: &str) -> Option<DevNum> {
        let (a, b) = s.split_once(':')?;
        Some(DevNum {
            major: a.parse().ok()?,
            minor: b.parse().ok()?,
        })
    }

    fn sys(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(format!("/sys/dev/block/{self}/{file}"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Its device-mapper name, if it is a device-mapper device.
    pub fn dm_name(&self) -> Option<String> {
        self.sys("dm/name")
    }

    fn dm_uuid(&self) -> Option<String> {
        self.sys("dm/uuid")
    }

    /// Size in 512-byte sectors.
    fn sectors(&self) -> Result<u64> {
        self.sys("size")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("cannot read the size of block device {self}"))
    }

    /// The kernel's node for it (`/dev/dm-3`), which devtmpfs makes.
    pub fn node(&self) -> Result<PathBuf> {
        let link = std::fs::read_link(format!("/sys/dev/block/{self}"))
            .with_context(|| format!("block device {self} is not in /sys/dev/block"))?;
        let name = link
            .file_name()
            .ok_or_else(|| anyhow!("block device {self}: no name"))?;
        Ok(Path::new("/dev").join(name))
    }
}

/// The device-mapper device named `name`, if there is one.
fn find(name: &str) -> Option<DevNum> {
    let rd = std::fs::read_dir("/sys/block").ok()?;
    rd.flatten().find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("dm/name")).ok()?;
        if n.trim() != name {
            return None;
        }
        let dev = std::fs::read_to_string(e.path().join("dev")).ok()?;
        DevNum::parse(dev.trim())
    })
}

fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!("{prog} is not installed: {}", tools_hint())
            } else {
                anyhow!("cannot run {prog}: {e}")
            }
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: String = err.trim().chars().take(500).collect();
        bail!("{prog} {} failed ({}): {err}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tools_hint() -> &'static str {
    "dm-era tracking needs era_invalidate (package thin-provisioning-tools)"
}

/// Whether what dm-era tracking needs is missing: device-mapper's control
/// node, and `era_invalidate` on the PATH.
pub fn tools_missing() -> Option<String> {
    if !Path::new(dm::CONTROL).exists() {
        return Some(format!(
            "{} is missing: load the dm_mod module",
            dm::CONTROL
        ));
    }
    let t = "era_invalidate";
    let found = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(d.join(t))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    (!found).then(|| format!("{t} is not installed: {}", tools_hint()))
}

/// One line of a device-mapper table, without its start and length.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableLine {
    target: String,
    args: Vec<String>,
}

fn table(name: &str) -> Result<Vec<TableLine>> {
    let text = dm::table(name)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace().skip(2);
            let target = w
                .next()
                .ok_or_else(|| anyhow!("device-mapper table of {name}: cannot read {l:?}"))?;
            Ok(TableLine {
                target: target.to_string(),
                args: w.map(str::to_string).collect(),
            })
        })
        .collect()
}

/// A device whose writes a dm-era target tracks.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// The device the machine uses (e.g. `vg0-data`).
    pub name: String,
    sectors: u64,
    era_name: String,
    era_dev: DevNum,
    /// Random, made when the era target was inserted: a point's tracking names
    /// it, so a target inserted again (after a reboot) is never mistaken for
    /// the one that tracked the chain.
    pub instance: String,
    /// Era block in bytes.
    pub block: u64,
    metadata: PathBuf,
    cow: DevNum,
    /// The era target was put under the device by this call.
    pub inserted: bool,
}

impl Tracked {
    /// Puts a dm-era target under the configured device, live, unless one is
    /// there already (then it is adopted, and a cut an interrupted agent left
    /// behind is undone).
    pub fn attach(cfg: &EraConfig) -> Result<Tracked> {
        let (mut t, meta_dev) = Tracked::configured(cfg)?;
        if t.adopt()? {
            return Ok(t);
        }
        t.insert(meta_dev)?;
        Ok(t)
    }

    /// The configured device with the agent's layers under it, if they are
    /// there (nothing is inserted).
    pub fn existing(cfg: &EraConfig) -> Result<Option<Tracked>> {
        let (mut t, _) = Tracked::configured(cfg)?;
        Ok(t.adopt()?.then_some(t))
    }

    /// The entry checked (tools, devices, sizes) and its names, before
    /// anything is looked up or changed; with the metadata device.
    fn configured(cfg: &EraConfig) -> Result<(Tracked, DevNum)> {
        if let Some(why) = tools_missing() {
            bail!("{why}");
        }
        let dev = DevNum::of(&cfg.device)?;
        let name = dev.dm_name().ok_or_else(|| {
            anyhow!(
                "{} is not a device-mapper device: dm-era can only go under one (an LVM volume, say)",
                cfg.device.display()
            )
        })?;
        if name.starts_with("ferry-") {
            bail!(
                "{} is one of the agent's own layers ({name}); name the device the machine uses",
                cfg.device.display()
            );
        }
        let block_kib = cfg.block_kib.unwrap_or(DEFAULT_BLOCK_KIB);
        if !block_kib.is_power_of_two() || !(4..=1024).contains(&block_kib) {
            bail!("block_kib = {block_kib}: give a power of two from 4 to 1024");
        }
        let meta_dev = DevNum::of(&cfg.metadata).context("the era metadata device")?;
        let cow = DevNum::of(&cfg.cow).context("the copy-on-write device")?;
        if meta_dev == dev || cow == dev || meta_dev == cow {
            bail!(
                "{}: the device, its era metadata device and its copy-on-write device must be three different devices",
                cfg.device.display()
            );
        }
        let meta_bytes = meta_dev.sectors()? * 512;
        if meta_bytes < MIN_METADATA_BYTES {
            bail!(
                "the era metadata device {} holds {meta_bytes} bytes: give it at least {} MiB",
                cfg.metadata.display(),
                MIN_METADATA_BYTES >> 20
            );
        }
        let t = Tracked {
            era_name: format!("ferry-era-{name}"),
            name,
            sectors: dev.sectors()?,
            era_dev: dev,
            instance: String::new(),
            block: u64::from(block_kib) * 1024,
            metadata: cfg.metadata.clone(),
            cow,
            inserted: false,
        };
        Ok((t, meta_dev))
    }

    /// Sends a message to the era target (`checkpoint`, ...).
    fn message(&self, msg: &str) -> Result<()> {
        dm::message(&self.era_name, msg)
    }

    /// Removes the agent's layers that exist, topmost first.
    fn remove_layers(&self) -> Result<()> {
        for n in [self.snap_name(), self.era_name.clone(), self.orig_name()] {
            if find(&n).is_some() {
                dm::remove(&n)?;
            }
        }
        Ok(())
    }

    fn orig_name(&self) -> String {
        format!("ferry-orig-{}", self.name)
    }

    fn snap_name(&self) -> String {
        format!("ferry-snap-{}", self.name)
    }

    fn linear(&self) -> String {
        format!("0 {} linear {} 0", self.sectors, self.era_dev)
    }

    /// Takes over an era target already under the device. False when there
    /// is none.
    fn adopt(&mut self) -> Result<bool> {
        let Some(era_dev) = find(&self.era_name) else {
            return Ok(false);
        };
        let Some(instance) = era_dev
            .dm_uuid()
            .and_then(|u| u.strip_prefix(UUID_PREFIX).map(str::to_string))
        else {
            bail!(
                "a device named {} exists but is not the agent's: remove it or rename the device",
                self.era_name
            );
        };
        let lines = table(&self.name)?;
        let [line] = lines.as_slice() else {
            return Ok(false);
        };
        let above = DevNum::parse(line.args.first().map_or("", String::as_str));
        if above != Some(era_dev) {
            return Ok(false);
        }
        self.era_dev = era_dev;
        self.instance = instance;
        // The era block is the target's, whatever the config says now.
        if let Some(b) = table(&self.era_name)?
            .first()
            .and_then(|l| l.args.get(2))
            .and_then(|s| s.parse::<u64>().ok())
        {
            self.block = b * 512;
        }
        match line.target.as_str() {
            "linear" => {}
            "snapshot-origin" => {
                warn!(device = %self.name, "undoing a cut an interrupted agent left behind");
                let mut s = Suspended::new();
                s.suspend(&self.name, true)?;
                dm::load(&self.name, &self.linear())?;
                s.resume_all()?;
            }
            other => bail!(
                "{} maps to the agent's era target through an unexpected `{other}` target: repair the table by hand",
                self.name
            ),
        }
        if find(&self.snap_name()).is_some() {
            dm::remove(&self.snap_name())?;
        }
        // A metadata snapshot an interrupted cycle held.
        if self.status()?.1 {
            self.message("drop_metadata_snap")?;
        }
        Ok(true)
    }

    /// Puts a new era target under the device: its original table moves to
    /// `ferry-orig-NAME`, the era target goes on that, and the device maps
    /// onto the era target.
    fn insert(&mut self, meta_dev: DevNum) -> Result<()> {
        let started = Instant::now();
        // Layers a failed insertion left behind: the device does not use them.
        self.remove_layers()?;
        let original = dm::table(&self.name)?;
        if original.trim().is_empty() {
            bail!("{} has no table (not active?)", self.name);
        }
        // A zeroed superblock makes the era target format new metadata.
        wipe_superblock(&self.metadata)?;
        self.instance = ferry_agent::crypto::random_hex(8);
        let orig = self.orig_name();
        dm::create(&orig, None, &original)?;
        let orig_dev = find(&orig).ok_or_else(|| anyhow!("{orig} was created but is not there"))?;
        let uuid = format!("{UUID_PREFIX}{}", self.instance);
        let era_table = format!(
            "0 {} era {meta_dev} {orig_dev} {}",
            self.sectors,
            self.block / 512
        );
        if let Err(e) = dm::create(&self.era_name, Some(&uuid), &era_table) {
            let _ = self.remove_layers();
            return Err(e);
        }
        self.era_dev = find(&self.era_name)
            .ok_or_else(|| anyhow!("{} was created but is not there", self.era_name))?;
        let mut s = Suspended::new();
        let swapped = s
            .suspend(&self.name, false)
            .and_then(|()| dm::load(&self.name, &self.linear()))
            .and_then(|()| s.resume_all());
        if let Err(e) = swapped {
            // Back to the original table before the layers go.
            let _ = dm::load(&self.name, &original);
            drop(s);
            let _ = self.remove_layers();
            return Err(e.context(format!("putting dm-era under {}", self.name)));
        }
        self.inserted = true;
        info!(device = %self.name, instance = %self.instance, block = self.block, secs = started.elapsed().as_secs_f64(), "dm-era inserted live");
        Ok(())
    }

    /// The tracking token a point records for writes from era `era` on.
    pub fn token(&self, era: u64) -> String {
        format!("dm-era:{}:{era}", self.instance)
    }

    /// The era a point's tracking token says its successor reads from, when
    /// the token is this target's.
    pub fn since(&self, token: &str) -> Option<u64> {
        let rest = token.strip_prefix("dm-era:")?;
        let (inst, era) = rest.split_once(':')?;
        (inst == self.instance).then(|| era.parse().ok())?
    }

    fn status(&self) -> Result<(u64, bool)> {
        // "0 SECTORS era <meta block> <used>/<total> <current era> <held root|->"
        let s = dm::status(&self.era_name)?;
        let w: Vec<&str> = s.split_whitespace().collect();
        let era = w
            .get(5)
            .and_then(|e| e.parse().ok())
            .ok_or_else(|| anyhow!("{}: cannot read the era from {s:?}", self.era_name))?;
        Ok((era, w.get(6).is_some_and(|h| *h != "-")))
    }

    /// The byte ranges written in era `since` or later, by the metadata
    /// snapshot the cut took; the snapshot is dropped.
    pub fn written_since(&self, since: u64) -> Result<Vec<(u64, u64)>> {
        let meta = self.metadata.display().to_string();
        let out = run(
            "era_invalidate",
            &[
                "--metadata-snapshot",
                "--written-since",
                &since.to_string(),
                &meta,
            ],
        );
        let dropped = self.message("drop_metadata_snap");
        let blocks = parse_blocks(&out?)?;
        dropped?;
        let size = self.sectors * 512;
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(blocks.len());
        for (b, e) in blocks {
            let (start, end) = (b * self.block, (e * self.block).min(size));
            if start >= end {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => ranges.push((start, end)),
            }
        }
        Ok(ranges)
    }

    /// Drops the metadata snapshot the cut took, when the cycle reads the
    /// device whole and does not need it.
    pub fn drop_metadata_snap(&self) {
        if let Err(e) = self.message("drop_metadata_snap") {
            warn!(device = %self.name, error = %format!("{e:#}"), "the era metadata snapshot could not be dropped; the next cut retries");
        }
    }

    /// Removes the agent's layers and gives the device its original table
    /// back (before a resize or a deactivation by LVM).
    fn release(&self) -> Result<()> {
        let original = dm::table(&self.orig_name())?;
        let mut s = Suspended::new();
        s.suspend(&self.name, false)?;
        dm::load(&self.name, &original)?;
        s.resume_all()?;
        self.remove_layers()
    }
}

/// Takes the agent's layers out from under the configured device; false when
/// there were none.
pub fn release(cfg: &EraConfig) -> Result<bool> {
    match Tracked::existing(cfg)? {
        Some(t) => t.release().map(|()| true),
        None => Ok(false),
    }
}

/// Zeroes the first 4 KiB of a device.
fn wipe_superblock(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening the era metadata device {}", path.display()))?;
    f.write_all_at(&[0u8; 4096], 0)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("clearing the era metadata device {}", path.display()))
}

/// `era_invalidate`'s XML: `<block block="N"/>` and `<range begin="B"
/// end="E"/>` (end exclusive), as block ranges.
fn parse_blocks(xml: &str) -> Result<Vec<(u64, u64)>> {
    // `name="N"`, with or without spaces around the `=` (0.9.0 writes
    // `end = "1024"`).
    let attr = |tag: &str, name: &str| -> Result<u64> {
        let bad = || anyhow!("era_invalidate: no number {name} in {tag:?}");
        let mut rest = tag;
        loop {
            let at = rest.find(name).ok_or_else(bad)?;
            let before_ok = at == 0 || rest.as_bytes()[at - 1] == b' ';
            rest = &rest[at + name.len()..];
            let after = rest.trim_start();
            if before_ok && let Some(v) = after.strip_prefix('=') {
                let v = v.trim_start().strip_prefix('"').ok_or_else(bad)?;
                let end = v.find('"').ok_or_else(bad)?;
                return v[..end].parse().map_err(|_| bad());
            }
        }
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for tag in xml.split('<').skip(1) {
        let tag = tag.split('>').next().unwrap_or("");
        let (b, e) = if tag.starts_with("block ") {
            let b = attr(tag, "block")?;
            (b, b + 1)
        } else if tag.starts_with("range ") {
            (attr(tag, "begin")?, attr(tag, "end")?)
        } else {
            continue;
        };
        if e <= b {
            bail!("era_invalidate: empty range in {tag:?}");
        }
        out.push((b, e));
    }
    out.sort_unstable();
    // Merge overlaps and neighbours.
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
    for (b, e) in out {
        match merged.last_mut() {
            Some(last) if b <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((b, e)),
        }
    }
    Ok(merged)
}

/// Devices suspended by the agent; resumed when dropped, whatever happened,
/// so no error path leaves a machine's disk frozen.
struct Suspended {
    names: Vec<String>,
}

impl Suspended {
    fn new() -> Self {
        Suspended { names: Vec::new() }
    }

    /// Suspends `name`; `nolockfs` skips freezing the file system on it.
    fn suspend(&mut self, name: &str, nolockfs: bool) -> Result<()> {
        dm::suspend(name, nolockfs)?;
        self.names.push(name.to_string());
        Ok(())
    }

    fn resume_all(&mut self) -> Result<()> {
        let mut first = None;
        for n in std::mem::take(&mut self.names) {
            if let Err(e) = dm::resume(&n) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Suspended {
    fn drop(&mut self) {
        if let Err(e) = self.resume_all() {
            warn!(error = %format!("{e:#}"), "a device could not be resumed: resume it with `dmsetup resume NAME`");
        }
    }
}

/// The cut of one tracked device: the era that began at it, and the
/// snapshot holding the device as it was.
#[derive(Debug)]
pub struct Cut {
    /// The era current after the cut's metadata snapshot: the writes after
    /// the cut are in it or later ones.
    pub era: u64,
    /// The snapshot's node, to read.
    pub view: PathBuf,
}

/// Cuts every tracked device at one instant: all are suspended together
/// (file systems frozen), each era target checkpointed and its metadata
/// snapshotted, each device given a snapshot, `held` called (a consistency
/// group's barrier: every member holds its writes until all do), and all
/// resumed. Returns the cuts and how long the devices were suspended.
pub fn cut(devices: &[Tracked], held: impl FnOnce()) -> Result<(Vec<Cut>, Duration)> {
    let mut s = Suspended::new();
    for t in devices {
        s.suspend(&t.name, false)?;
    }
    let paused = Instant::now();
    let mut cuts = Vec::with_capacity(devices.len());
    let mut made: Vec<&Tracked> = Vec::new();
    let r = (|| -> Result<()> {
        for t in devices {
            t.message("checkpoint")?;
            // Taking the metadata snapshot starts an era of its own: the
            // writes after the cut are in the era current after it.
            t.message("take_metadata_snap")?;
            let (era, _) = t.status()?;
            let snap = t.snap_name();
            let table = format!("0 {} snapshot {} {} N 8", t.sectors, t.era_dev, t.cow);
            dm::create(&snap, None, &table)?;
            made.push(t);
            dm::load(
                &t.name,
                &format!("0 {} snapshot-origin {}", t.sectors, t.era_dev),
            )?;
            let view = find(&snap)
                .ok_or_else(|| anyhow!("{snap} was created but is not there"))?
                .node()?;
            cuts.push(Cut { era, view });
        }
        Ok(())
    })();
    if let Err(e) = r {
        // Back to the plain era mapping; the snapshots go once resumed.
        for t in &made {
            let _ = dm::load(&t.name, &t.linear());
        }
        drop(s);
        for t in made {
            let _ = dm::remove(&t.snap_name());
            let _ = t.message("drop_metadata_snap");
        }
        return Err(e.context("cutting the dm-era devices"));
    }
    held();
    s.resume_all()?;
    Ok((cuts, paused.elapsed()))
}

/// Ends a cut: the device maps straight onto its era target again and the
/// snapshot goes.
pub fn uncut(t: &Tracked) -> Result<()> {
    let mut s = Suspended::new();
    s.suspend(&t.name, true)?;
    dm::load(&t.name, &t.linear())?;
    s.resume_all()?;
    dm::remove(&t.snap_name())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn era_invalidate_output_becomes_block_ranges() {
        let xml = "<blocks>\n  <range begin=\"4\" end = \"8\"/>\n  <block block=\"0\"/>\n  <block block=\"8\"/>\n  <block block=\"20\"/>\n</blocks>\n";
        assert_eq!(parse_blocks(xml).unwrap(), vec![(0, 1), (4, 9), (20, 21)]);
        assert!(parse_blocks("<blocks>\n</blocks>\n").unwrap().is_empty());
        assert!(parse_blocks("<block block=\"x\"/>").is_err());
        assert!(parse_blocks("<range begin=\"5\" end=\"5\"/>").is_err());
    }

    #[test]
    fn a_token_names_its_instance() {
        let t = Tracked {
            name: "vg0-data".into(),
            sectors: 8,
            era_name: "ferry-era-vg0-data".into(),
            era_dev: DevNum { major: 1, minor: 2 },
            instance: "abcd".into(),
            block: 65536,
            metadata: PathBuf::from("/dev/null"),
            cow: DevNum { major: 1, minor: 3 },
            inserted: false,
        };
        assert_eq!(t.since(&t.token(7)), Some(7));
        assert_eq!(t.since("dm-era:other:7"), None);
        assert_eq!(t.since("qemu:dirty-bitmap:gen3"), None);
        assert_eq!(t.since("dm-era:abcd:x"), None);
    }
}
