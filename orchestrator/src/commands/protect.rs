//! `ferry protect`: continuous protection of running VMs through QMP. Every
//! interval, each VM gets one cycle (see `ferry_connectors::qemu`); a status
//! file, rewritten every second, says for each source its lag (RPO: the age of
//! the newest committed point's instant), the backlog (bytes written since that
//! instant, from the recording bitmap) and the throughput. A failed cycle is
//! logged and retried at the next interval; protection never stops on its own.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;
use tracing::{info, warn};

use ferry_connectors::qemu::{self, LiveDisk};

use super::output::bytes;
use crate::context::Context;
use crate::error::Error;

#[derive(Debug, Args)]
pub struct ProtectArgs {
    /// A VM to protect: NAME=QMP_SOCKET[,node=NODE][,disk=DISK]. NODE is the disk's
    /// block node (default disk0); DISK its name in the points (default NODE).
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
    /// Run this shell command while each point-in-time view is exported, with
    /// FERRY_NBD_URL, FERRY_SOURCE and FERRY_CYCLE set (e.g. to verify or copy it).
    #[arg(long)]
    pub hook: Option<String>,
    /// Retention, applied to the source after every cycle (e.g. --keep-within 1h --keep-hourly 24).
    #[command(flatten)]
    pub keep: super::repo::KeepArgs,
}

#[derive(Debug, Clone, Serialize, Default)]
struct SourceStatus {
    source: String,
    last_point: Option<String>,
    /// The instant the newest committed point captured.
    last_cut: Option<DateTime<Utc>>,
    /// Now minus `last_cut`, in seconds: the current RPO.
    lag_secs: Option<f64>,
    /// Bytes the guest wrote since `last_cut` (the recording bitmap's count at commit).
    backlog_bytes: u64,
    /// Bytes read per second of cycle, and the last cycle's time.
    throughput_bytes_per_sec: f64,
    last_cycle_secs: f64,
    last_mode: Option<String>,
    cycles_ok: u64,
    cycles_failed: u64,
    last_error: Option<String>,
}

/// A positive duration in humantime's grammar: `500ms`, `1s`, `5m` (minutes), `2h`, `1h 30m`.
fn parse_duration(s: &str) -> Result<Duration> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        Error::usage(format!(
            "{s:?} is not a duration ({e}); write e.g. 500ms, 1s, 5m (minutes), 2h"
        ))
    })?;
    if d.is_zero() {
        return Err(Error::usage(format!("{s:?} must be positive")).into());
    }
    Ok(d)
}

struct Vm {
    name: String,
    disk_name: String,
    disk: LiveDisk,
}

fn parse_vm(spec: &str, work_dir: &std::path::Path) -> Result<Vm> {
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
    Ok(Vm {
        name: name.to_string(),
        disk_name: disk.unwrap_or_else(|| node.clone()),
        disk: LiveDisk {
            qmp: PathBuf::from(sock),
            node,
            work_dir: work_dir.join(name),
        },
    })
}

pub fn protect(ctx: &Context, a: &ProtectArgs) -> Result<ExitCode> {
    let interval = parse_duration(&a.interval)?;
    let deadline = a
        .duration
        .as_deref()
        .map(parse_duration)
        .transpose()?
        .map(|d| Instant::now() + d);
    let vms: Vec<Vm> = a
        .vms
        .iter()
        .map(|s| parse_vm(s, &a.work_dir))
        .collect::<Result<_>>()?;
    let policy = a.keep.policy()?;
    let repo = ctx.open_repo(true)?;
    let status: Arc<Mutex<Vec<SourceStatus>>> = Arc::new(Mutex::new(
        vms.iter()
            .map(|v| SourceStatus {
                source: v.name.clone(),
                ..Default::default()
            })
            .collect(),
    ));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|s| -> Result<()> {
        if let Some(path) = &a.status {
            let (status, done) = (status.clone(), done.clone());
            s.spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    write_status(path, &status);
                    std::thread::sleep(Duration::from_secs(1));
                }
                write_status(path, &status);
            });
        }
        let mut handles = Vec::new();
        for (i, vm) in vms.iter().enumerate() {
            let (repo, status, policy) = (&repo, status.clone(), &policy);
            handles.push(s.spawn(move || {
                let mut n = 0u64;
                loop {
                    if a.cycles.is_some_and(|c| n >= c) || deadline.is_some_and(|d| Instant::now() >= d) {
                        return;
                    }
                    n += 1;
                    let started = Instant::now();
                    let hook = a.hook.as_ref().map(|cmd| {
                        let (cmd, source, cycle) = (cmd.clone(), vm.name.clone(), n);
                        move |url: &str| -> ferry_agent::Result<()> {
                            let st = std::process::Command::new("sh")
                                .args(["-c", &cmd])
                                .env("FERRY_NBD_URL", url)
                                .env("FERRY_SOURCE", &source)
                                .env("FERRY_CYCLE", cycle.to_string())
                                .status()
                                .map_err(|e| ferry_agent::Error::InvalidInput(format!("--hook: {e}")))?;
                            if st.success() {
                                Ok(())
                            } else {
                                Err(ferry_agent::Error::InvalidInput(format!("--hook exited with {st}")))
                            }
                        }
                    });
                    let hook_ref = hook.as_ref().map(|h| h as &qemu::Hook);
                    let r = qemu::cycle(repo, &vm.name, &vm.disk_name, &vm.disk, hook_ref);
                    let secs = started.elapsed().as_secs_f64();
                    {
                        let mut st = status.lock().expect("status");
                        let st = &mut st[i];
                        match &r {
                            Ok(rep) => {
                                st.last_point = Some(rep.summary.point.clone());
                                st.last_cut = Some(rep.cut);
                                st.backlog_bytes = rep.backlog_bytes;
                                st.throughput_bytes_per_sec = rep.summary.bytes_read as f64 / secs.max(1e-6);
                                st.last_cycle_secs = secs;
                                st.last_mode = Some(rep.mode.clone());
                                st.cycles_ok += 1;
                                st.last_error = None;
                            }
                            Err(e) => {
                                st.cycles_failed += 1;
                                st.last_error = Some(e.to_string());
                            }
                        }
                    }
                    match r {
                        Ok(rep) => {
                            let lag = (Utc::now() - rep.cut).num_milliseconds() as f64 / 1000.0;
                            info!(source = %vm.name, cycle = n, point = %rep.summary.point, mode = %rep.mode, lag_secs = lag, backlog_bytes = rep.backlog_bytes, "protected");
                            if ctx.json {
                                println!(
                                    "{}",
                                    serde_json::json!({
                                        "source": vm.name, "cycle": n, "point": rep.summary.point,
                                        "cut": rep.cut, "mode": rep.mode, "lag_secs": lag,
                                        "backlog_bytes": rep.backlog_bytes, "cycle_secs": secs,
                                        "bytes_read": rep.summary.bytes_read,
                                        "changed_bytes": rep.summary.changed_bytes,
                                        "stored_bytes": rep.summary.stored_bytes,
                                    })
                                );
                            } else if !ctx.quiet {
                                println!(
                                    "{} cycle {n}: point {} ({}), read {}, stored {}, {:.2} s, lag {:.1} s",
                                    vm.name,
                                    &rep.summary.point[..8],
                                    rep.mode,
                                    bytes(rep.summary.bytes_read),
                                    bytes(rep.summary.stored_bytes),
                                    secs,
                                    lag
                                );
                            }
                            if !policy.is_empty()
                                && let Err(e) = ferry_agent::prune::forget(repo, policy, Some(&vm.name), &[], false)
                            {
                                warn!(source = %vm.name, error = %e, "retention failed; points are kept");
                            }
                        }
                        Err(e) => {
                            warn!(source = %vm.name, cycle = n, error = %e, "cycle failed; the next one catches up");
                            if ctx.json {
                                println!("{}", serde_json::json!({"source": vm.name, "cycle": n, "error": e.to_string()}));
                            } else {
                                eprintln!("{} cycle {n} failed: {e}", vm.name);
                            }
                        }
                    }
                    use std::io::Write as _;
                    let _ = std::io::stdout().flush();
                    if let Some(rest) = interval.checked_sub(started.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
            }));
        }
        for h in handles {
            let _ = h.join();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    })?;
    let st = status.lock().expect("status");
    let failed = st.iter().any(|s| s.cycles_ok == 0);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn write_status(path: &std::path::Path, status: &Mutex<Vec<SourceStatus>>) {
    let mut v = status.lock().expect("status").clone();
    let now = Utc::now();
    for s in &mut v {
        s.lag_secs = s
            .last_cut
            .map(|c| (now - c).num_milliseconds() as f64 / 1000.0);
    }
    let body = serde_json::json!({"time": now, "sources": v});
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
        let vm = parse_vm("web=/run/q.sock,node=drive0", std::path::Path::new("/w")).unwrap();
        assert_eq!(
            (
                vm.name.as_str(),
                vm.disk.node.as_str(),
                vm.disk_name.as_str()
            ),
            ("web", "drive0", "drive0")
        );
        assert_eq!(vm.disk.work_dir, PathBuf::from("/w/web"));
        for bad in ["web", "web=", "a/b=/s", "web=/s,colour=red"] {
            assert!(parse_vm(bad, std::path::Path::new("/w")).is_err(), "{bad}");
        }
    }
}
