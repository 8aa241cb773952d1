//! `ferry protect`: a front end over `ferry_connectors::protect`, the
//! continuous protection service. Every interval, each VM gets one cycle
//! (see `ferry_connectors::qemu`) that cuts all its disks at one instant; a status
//! file, rewritten every second, says for each source its lag (RPO: the age of
//! the newest committed point's instant), the backlog (bytes written since that
//! instant, from the recording bitmap) and the throughput. A failed cycle is
//! logged and retried at the next interval; protection never stops on its own.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use chrono::Utc;
use clap::Args;
use tracing::warn;

use ferry_connectors::protect;
use ferry_connectors::qemu::{LiveVm, VmDisk};

use super::output::bytes;
use crate::context::Context;
use crate::error::Error;

#[derive(Debug, Args)]
pub struct ProtectArgs {
    /// A VM disk to protect: NAME=QMP_SOCKET[,node=NODE][,disk=DISK]. NODE is the disk's
    /// block node (default disk0); DISK its name in the points (default NODE).
    /// Repeat with the same NAME and socket for each disk of a VM: its disks
    /// are cut in one transaction and kept in one point.
    #[arg(long = "vm", required = true, value_name = "SPEC")]
    pub vms: Vec<String>,
    /// Time between the starts of two cycles of a VM (e.g. 1s, 30s, 5m).
    #[arg(long, default_value = "60s")]
    pub interval: String,
    /// Stop after this many cycles per VM (default: run until stopped).
    #[arg(long)]
    pub cycles: Option<u64>,
    /// Stop after this long (e.g. 5m).
    #[arg(long)]
    pub duration: Option<String>,
    /// Keep a machine-readable status here (JSON, rewritten every second).
    #[arg(long)]
    pub status: Option<PathBuf>,
    /// Where fleecing images and export sockets go.
    #[arg(long, default_value = "/var/tmp/ferry-protect")]
    pub work_dir: PathBuf,
    /// Run this shell command while each point-in-time view is exported (once per
    /// disk), with FERRY_NBD_URL, FERRY_SOURCE, FERRY_DISK and FERRY_CYCLE set
    /// (e.g. to verify or copy it).
    #[arg(long)]
    pub hook: Option<String>,
    /// Cut every VM at one instant each interval (the machines of one
    /// application): all are paused, cut and resumed together, and each
    /// cycle reports the pause and the skew between the first cut and the
    /// last. Each VM still makes its own point.
    #[arg(long)]
    pub together: bool,
    /// Retention, applied to the source after every cycle (e.g. --keep-within 1h --keep-hourly 24).
    #[command(flatten)]
    pub keep: super::repo::KeepArgs,
}

/// A positive duration, read as runbook durations are (one parser for
/// both): `500ms`, `1s`, `5m` or `5min` (minutes), `2h`, `1d`, or seconds.
fn parse_duration(s: &str) -> Result<Duration> {
    let ms = ferry_engine::catalog::parse_duration_ms(s).ok_or_else(|| {
        Error::usage(format!(
            "{s:?} is not a duration; write e.g. 500ms, 1s, 5m (minutes), 2h, 1d"
        ))
    })?;
    if ms == 0 {
        return Err(Error::usage(format!("{s:?} must be positive")).into());
    }
    Ok(Duration::from_millis(ms))
}

/// One `--vm` entry: a disk of a VM.
struct Entry {
    name: String,
    qmp: PathBuf,
    disk: VmDisk,
}

fn parse_vm(spec: &str) -> Result<Entry> {
    let bad = || {
        Error::Usage(format!(
            "--vm {spec:?}: expected NAME=QMP_SOCKET[,node=NODE][,disk=DISK]"
        ))
    };
    let (name, rest) = spec.split_once('=').ok_or_else(bad)?;
    let mut parts = rest.split(',');
    let sock = parts.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
    let (mut node, mut disk) = ("disk0".to_string(), None);
    for p in parts {
        match p.split_once('=') {
            Some(("node", v)) if !v.is_empty() => node = v.to_string(),
            Some(("disk", v)) if !v.is_empty() => disk = Some(v.to_string()),
            _ => return Err(bad().into()),
        }
    }
    if name.is_empty() || name.contains(['@', '/']) {
        return Err(bad().into());
    }
    Ok(Entry {
        name: name.to_string(),
        qmp: PathBuf::from(sock),
        disk: VmDisk {
            name: disk.unwrap_or_else(|| node.clone()),
            node,
        },
    })
}

/// Groups the `--vm` entries into VMs: entries with one NAME are the disks of
/// one VM, cut together. One QMP socket is one VM, so two names on one
/// socket, one name on two sockets, or one disk twice are refused: cycles of
/// one VM from two threads would tear down each other's exports.
fn group(specs: &[String], work_dir: &std::path::Path) -> Result<Vec<protect::Protected>> {
    let mut vms: Vec<protect::Protected> = Vec::new();
    for spec in specs {
        let e = parse_vm(spec)?;
        if let Some(other) = vms.iter().find(|v| v.vm.qmp == e.qmp && v.source != e.name) {
            return Err(Error::usage(format!(
                "--vm {spec:?}: the socket {} is already protected as {:?}; the disks of one VM take one NAME",
                e.qmp.display(),
                other.source
            ))
            .into());
        }
        match vms.iter_mut().find(|v| v.source == e.name) {
            Some(v) => {
                if v.vm.qmp != e.qmp {
                    return Err(Error::usage(format!(
                        "--vm {spec:?}: {:?} is already the VM at {}; one NAME is one VM",
                        e.name,
                        v.vm.qmp.display()
                    ))
                    .into());
                }
                if v.vm
                    .disks
                    .iter()
                    .any(|d| d.node == e.disk.node || d.name == e.disk.name)
                {
                    return Err(Error::usage(format!(
                        "--vm {spec:?}: {:?} already has node {} or disk {}; give each disk its own node= and disk=",
                        e.name, e.disk.node, e.disk.name
                    ))
                    .into());
                }
                v.vm.disks.push(e.disk);
            }
            None => vms.push(protect::Protected {
                vm: LiveVm {
                    qmp: e.qmp,
                    disks: vec![e.disk],
                    work_dir: work_dir.join(&e.name),
                },
                source: e.name,
            }),
        }
    }
    Ok(vms)
}

pub fn protect(ctx: &Context, a: &ProtectArgs) -> Result<ExitCode> {
    let interval = parse_duration(&a.interval)?;
    let deadline = a
        .duration
        .as_deref()
        .map(parse_duration)
        .transpose()?
        .map(|d| Instant::now() + d);
    let opts = protect::Options {
        vms: group(&a.vms, &a.work_dir)?,
        interval,
        cycles: a.cycles,
        deadline,
        hook: a.hook.clone(),
        retention: a.keep.policy()?,
        together: a.together,
    };
    // Not the store's cache of index objects: each backup builds on the index
    // the last one kept (`index::Kept`), and the repository remembers the points
    // it read, so keeping every index object's bytes would only grow memory.
    let repo = ctx.open_repo(false)?;
    let status = protect::Status::default();
    let cancel = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    // Bounded: a slow terminal slows the cycles rather than growing memory.
    let (tx, rx) = std::sync::mpsc::sync_channel::<protect::Update>(64);
    let final_status = std::thread::scope(|s| {
        if let Some(path) = &a.status {
            let (status, done) = (&status, &done);
            s.spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    write_status(path, &status.snapshot());
                    std::thread::sleep(Duration::from_secs(1));
                }
                write_status(path, &status.snapshot());
            });
        }
        {
            let (status, done) = (&status, &done);
            s.spawn(move || report_to_state(ctx, status, done));
        }
        s.spawn(|| {
            for u in rx {
                print_update(ctx, &u);
            }
        });
        let r = protect::run(&repo, &opts, &status, Some(&tx), &cancel);
        drop(tx);
        done.store(true, Ordering::Relaxed);
        r
    });
    let failed = final_status.iter().any(|s| s.cycles_ok == 0);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One line per cycle: JSON with `--json`, else a sentence.
fn print_update(ctx: &Context, u: &protect::Update) {
    match u {
        protect::Update::Protected {
            source,
            cycle,
            point,
            cut,
            mode,
            lag_secs,
            backlog_bytes,
            cycle_secs,
            bytes_read,
            changed_bytes,
            stored_bytes,
            group_pause_secs,
            group_skew_secs,
        } => {
            if ctx.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "source": source, "cycle": cycle, "point": point,
                        "cut": cut, "mode": mode, "lag_secs": lag_secs,
                        "backlog_bytes": backlog_bytes, "cycle_secs": cycle_secs,
                        "bytes_read": bytes_read,
                        "changed_bytes": changed_bytes,
                        "stored_bytes": stored_bytes,
                        "group_pause_secs": group_pause_secs,
                        "group_skew_secs": group_skew_secs,
                    })
                );
            } else if !ctx.quiet {
                let group = match (group_pause_secs, group_skew_secs) {
                    (Some(p), Some(k)) => format!(
                        ", cut with the group (paused {:.0} ms, skew {:.1} ms)",
                        p * 1000.0,
                        k * 1000.0
                    ),
                    _ => String::new(),
                };
                println!(
                    "{source} cycle {cycle}: point {} ({mode}), read {}, stored {}, {cycle_secs:.2} s, lag {lag_secs:.1} s{group}",
                    &point[..8.min(point.len())],
                    bytes(*bytes_read),
                    bytes(*stored_bytes),
                );
            }
        }
        protect::Update::Failed {
            source,
            cycle,
            error,
        } => {
            if ctx.json {
                println!(
                    "{}",
                    serde_json::json!({"source": source, "cycle": cycle, "error": error})
                );
            } else {
                eprintln!("{source} cycle {cycle} failed: {error}");
            }
        }
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

/// How often the status reaches the state (`GET /api/sources`, `/metrics`).
const STATE_EVERY: Duration = Duration::from_secs(2);

/// Writes every source's status to the state every [`STATE_EVERY`] until
/// protection ends, then once more. The state is where the console and
/// `/metrics` read it; a state that cannot be opened or written is warned
/// about and never stops protection.
fn report_to_state(ctx: &Context, status: &protect::Status, done: &AtomicBool) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!(error = %e, "protection status not written to the state");
            return;
        }
    };
    let state = match rt.block_on(crate::state::State::open(&ctx.state_url)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "ferry: warning: protection status will not reach the state ({}): {}",
                crate::redact::redact(&ctx.state_url),
                crate::error::anyhow_chain(&e)
            );
            return;
        }
    };
    let repo = crate::inventory::repo_key(ctx.repo.as_deref().unwrap_or_default());
    let reporter = format!("{}:{}", crate::sys::hostname(), std::process::id());
    let mut warned = false;
    loop {
        let last = done.load(Ordering::Relaxed);
        let now = Utc::now().timestamp_millis();
        let rows: Vec<_> = status
            .snapshot()
            .into_iter()
            .map(|s| crate::state::health::ProtectionRow {
                source: s.source.clone(),
                repo: repo.clone(),
                reporter: reporter.clone(),
                updated_ms: now,
                status: serde_json::to_string(&s).unwrap_or_default(),
            })
            .collect();
        if let Err(e) = rt.block_on(state.put_protection(&rows))
            && !std::mem::replace(&mut warned, true)
        {
            warn!(error = %crate::error::anyhow_chain(&e), "protection status not written to the state");
        }
        if last {
            return;
        }
        let until = Instant::now() + STATE_EVERY;
        while Instant::now() < until && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn write_status(path: &std::path::Path, sources: &[protect::SourceStatus]) {
    let body = serde_json::json!({"time": Utc::now(), "sources": sources});
    let tmp = path.with_extension("tmp");
    let ok = std::fs::write(&tmp, body.to_string()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = ok.with_context(|| format!("writing {}", path.display())) {
        warn!(error = %e, "status not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_vm_specs() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(
            parse_duration("0s").is_err()
                && parse_duration("x").is_err()
                && parse_duration("3 fortnights later").is_err()
        );
        let w = std::path::Path::new("/w");
        let vms = group(&["web=/run/q.sock,node=drive0".into()], w).unwrap();
        assert_eq!(vms.len(), 1);
        let d = &vms[0].vm.disks[0];
        assert_eq!(
            (vms[0].source.as_str(), d.node.as_str(), d.name.as_str()),
            ("web", "drive0", "drive0")
        );
        assert_eq!(vms[0].vm.work_dir, PathBuf::from("/w/web"));
        for bad in ["web", "web=", "a/b=/s", "web=/s,colour=red"] {
            assert!(group(&[bad.into()], w).is_err(), "{bad}");
        }
        // The disks of one VM are one source, cut together.
        let vms = group(
            &[
                "db=/q.sock,node=disk0,disk=vda".into(),
                "web=/w.sock".into(),
                "db=/q.sock,node=disk1,disk=vdb".into(),
            ],
            w,
        )
        .unwrap();
        assert_eq!(vms.len(), 2);
        let names: Vec<&str> = vms[0].vm.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!((vms[0].source.as_str(), names), ("db", vec!["vda", "vdb"]));
        // One socket is one VM; one disk once.
        for clash in [
            ["db=/q.sock,node=disk0", "other=/q.sock,node=disk1"],
            ["db=/q.sock,node=disk0", "db=/elsewhere.sock,node=disk1"],
            ["db=/q.sock,node=disk0", "db=/q.sock,node=disk0,disk=x"],
            [
                "db=/q.sock,node=disk0,disk=a",
                "db=/q.sock,node=disk1,disk=a",
            ],
        ] {
            let e = group(&clash.map(String::from), w).unwrap_err().to_string();
            assert!(e.contains("--vm"), "{clash:?}: {e}");
        }
    }
}
