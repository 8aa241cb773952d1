//! Continuous protection as a library service: each live VM gets a
//! protection cycle ([`qemu::cycle`], all its disks cut together) every interval, retention after each
//! committed point, and a status (lag, backlog, throughput, last error) kept
//! current. Front ends (`ferry protect`, a daemon) watch it through the
//! [`Update`] stream and the [`Status`] snapshot, and stop it by cancelling.
//! A failed cycle is reported and retried at the next interval; protection
//! never stops on its own.

use crate::qemu::{self, LiveVm};
use chrono::{DateTime, Utc};
use ferry_agent::Repository;
use ferry_agent::retention::Policy;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// One protected VM: the source it is recorded as, and its disks.
#[derive(Clone, Debug)]
pub struct Protected {
    pub source: String,
    pub vm: LiveVm,
}

/// What the service runs.
#[derive(Debug)]
pub struct Options {
    pub vms: Vec<Protected>,
    /// Between the starts of two cycles of a VM.
    pub interval: Duration,
    /// Stop after this many cycles per VM.
    pub cycles: Option<u64>,
    /// Stop at this instant.
    pub deadline: Option<Instant>,
    /// A shell command run while each view is exported, once per disk
    /// (FERRY_NBD_URL, FERRY_SOURCE, FERRY_DISK and FERRY_CYCLE set).
    pub hook: Option<String>,
    /// Retention applied to the source after each committed point.
    pub retention: Policy,
    /// Cut every VM at one instant each interval ([`qemu::cut_together`]:
    /// all paused, all cut, all resumed), for the machines of one
    /// application; each VM still makes its own point.
    pub together: bool,
}

/// The state of one source, as a status file or an API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SourceStatus {
    pub source: String,
    pub last_point: Option<String>,
    /// The instant the newest committed point captured.
    pub last_cut: Option<DateTime<Utc>>,
    /// Now minus `last_cut`, in seconds: the current RPO.
    pub lag_secs: Option<f64>,
    /// Bytes the guest wrote since `last_cut` (the recording bitmap's count at commit).
    pub backlog_bytes: u64,
    /// Bytes read per second of cycle, and the last cycle's time.
    pub throughput_bytes_per_sec: f64,
    pub last_cycle_secs: f64,
    pub last_mode: Option<String>,
    pub cycles_ok: u64,
    pub cycles_failed: u64,
    pub last_error: Option<String>,
    /// How often the reporter promises a new status (an agent: its
    /// interval); readers call it silent after three. None: every 2 s.
    pub report_every_secs: Option<f64>,
}

/// The status of every source, updated as cycles end.
#[derive(Debug, Default)]
pub struct Status(Mutex<Vec<SourceStatus>>);

impl Status {
    /// A copy, with each lag measured now.
    pub fn snapshot(&self) -> Vec<SourceStatus> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let now = Utc::now();
        for s in &mut v {
            s.lag_secs = s
                .last_cut
                .map(|c| (now - c).num_milliseconds() as f64 / 1000.0);
        }
        v
    }
}

/// What happened, as it happens.
#[derive(Debug, Clone)]
pub enum Update {
    /// A point was committed.
    Protected {
        source: String,
        cycle: u64,
        point: String,
        cut: DateTime<Utc>,
        mode: String,
        lag_secs: f64,
        backlog_bytes: u64,
        cycle_secs: f64,
        bytes_read: u64,
        /// Bytes the change map marked (None for a full read).
        changed_bytes: Option<u64>,
        stored_bytes: u64,
        /// With `together`: how long the VMs were paused for the cut, and
        /// the first cut to the last (seconds).
        group_pause_secs: Option<f64>,
        group_skew_secs: Option<f64>,
    },
    /// A cycle failed; the next one catches up.
    Failed {
        source: String,
        cycle: u64,
        error: String,
    },
}

/// Runs protection until every VM has had its cycles, the deadline
/// passes, or `cancel` is set (checked between cycles and while waiting for
/// the next one, at least every 100 ms). Updates go to `updates` (bounded: a
/// slow reader slows the cycles, it does not grow memory; a reader that went
/// away is ignored). Returns the final status of each source.
pub fn run(
    repo: &Repository,
    opts: &Options,
    status: &Status,
    updates: Option<&mpsc::SyncSender<Update>>,
    cancel: &AtomicBool,
) -> Vec<SourceStatus> {
    *status.0.lock().unwrap_or_else(|e| e.into_inner()) = opts
        .vms
        .iter()
        .map(|d| SourceStatus {
            source: d.source.clone(),
            ..Default::default()
        })
        .collect();
    let stopped = |n: u64| {
        cancel.load(Ordering::Relaxed)
            || opts.cycles.is_some_and(|c| n >= c)
            || opts.deadline.is_some_and(|d| Instant::now() >= d)
    };
    // Wait for the next interval, but notice a cancel promptly.
    let pace = |started: Instant| {
        while let Some(rest) = opts.interval.checked_sub(started.elapsed()) {
            if cancel.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(rest.min(Duration::from_millis(100)));
        }
    };
    let send = |u: Update| {
        if let Some(tx) = updates {
            let _ = tx.send(u);
        }
    };
    if opts.together {
        let mut n = 0u64;
        while !stopped(n) {
            n += 1;
            let started = Instant::now();
            group_round(repo, opts, n, started, status, &send);
            pace(started);
        }
        return status.snapshot();
    }
    std::thread::scope(|s| {
        for (i, vm) in opts.vms.iter().enumerate() {
            let (send, pace) = (&send, &pace);
            s.spawn(move || {
                let mut n = 0u64;
                while !stopped(n) {
                    n += 1;
                    let started = Instant::now();
                    send(one_cycle(
                        repo,
                        opts,
                        i,
                        Round { n, started },
                        status,
                        None,
                        |h| qemu::cycle(repo, &vm.source, &vm.vm, h),
                    ));
                    pace(started);
                }
            });
        }
    });
    status.snapshot()
}

/// One round of a group: every VM prepared, all cut at one instant, then
/// each finished on its own thread. A VM that cannot be prepared or cut
/// fails its cycle; the others go on.
fn group_round(
    repo: &Repository,
    opts: &Options,
    n: u64,
    started: Instant,
    status: &Status,
    send: &(dyn Fn(Update) + Sync),
) {
    let mut cycles = Vec::new();
    let mut which = Vec::new();
    for (i, vm) in opts.vms.iter().enumerate() {
        match qemu::prepare(repo, &vm.source, &vm.vm) {
            Ok(c) => {
                cycles.push(c);
                which.push(i);
            }
            Err(e) => send(one_cycle(
                repo,
                opts,
                i,
                Round { n, started },
                status,
                None,
                |_| Err(e),
            )),
        }
    }
    let (cuts, group) = qemu::cut_together(&mut cycles);
    if let Some(g) = group {
        info!(
            round = n,
            paused_ms = g.paused.as_secs_f64() * 1000.0,
            skew_ms = g.skew.as_secs_f64() * 1000.0,
            "cut together"
        );
    }
    std::thread::scope(|s| {
        for ((c, cut), i) in cycles.into_iter().zip(cuts).zip(which) {
            s.spawn(move || {
                send(one_cycle(
                    repo,
                    opts,
                    i,
                    Round { n, started },
                    status,
                    group,
                    |h| {
                        cut?;
                        c.finish(repo, h)
                    },
                ));
            });
        }
    });
}

/// Which cycle of a VM, and when it started.
#[derive(Clone, Copy)]
struct Round {
    n: u64,
    started: Instant,
}

/// Runs one cycle of VM `i` (`run`, given the hook) and records and reports it.
fn one_cycle(
    repo: &Repository,
    opts: &Options,
    i: usize,
    Round { n, started }: Round,
    status: &Status,
    group: Option<qemu::GroupCut>,
    run: impl FnOnce(Option<&qemu::Hook>) -> ferry_agent::Result<qemu::CycleReport>,
) -> Update {
    let vm = &opts.vms[i];
    let hook = opts.hook.as_ref().map(|cmd| {
        let (cmd, source) = (cmd.clone(), vm.source.clone());
        move |disk: &str, url: &str| -> ferry_agent::Result<()> {
            let st = std::process::Command::new("sh")
                .args(["-c", &cmd])
                .env("FERRY_NBD_URL", url)
                .env("FERRY_SOURCE", &source)
                .env("FERRY_DISK", disk)
                .env("FERRY_CYCLE", n.to_string())
                .status()
                .map_err(|e| ferry_agent::Error::InvalidInput(format!("--hook: {e}")))?;
            if st.success() {
                Ok(())
            } else {
                Err(ferry_agent::Error::InvalidInput(format!(
                    "--hook exited with {st}"
                )))
            }
        }
    });
    let hook_ref = hook.as_ref().map(|h| h as &qemu::Hook);
    let r = run(hook_ref);
    let secs = started.elapsed().as_secs_f64();
    {
        let mut st = status.0.lock().unwrap_or_else(|e| e.into_inner());
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
            info!(source = %vm.source, cycle = n, point = %rep.summary.point, mode = %rep.mode, lag_secs = lag, backlog_bytes = rep.backlog_bytes, "protected");
            if !opts.retention.is_empty()
                && let Err(e) =
                    ferry_agent::prune::forget(repo, &opts.retention, Some(&vm.source), &[], false)
            {
                warn!(source = %vm.source, error = %e, "retention failed; points are kept");
            }
            Update::Protected {
                source: vm.source.clone(),
                cycle: n,
                point: rep.summary.point.clone(),
                cut: rep.cut,
                mode: rep.mode.clone(),
                lag_secs: lag,
                backlog_bytes: rep.backlog_bytes,
                cycle_secs: secs,
                bytes_read: rep.summary.bytes_read,
                changed_bytes: rep.summary.changed_bytes,
                stored_bytes: rep.summary.stored_bytes,
                group_pause_secs: group.map(|g| g.paused.as_secs_f64()),
                group_skew_secs: group.map(|g| g.skew.as_secs_f64()),
            }
        }
        Err(e) => {
            warn!(source = %vm.source, cycle = n, error = %e, "cycle failed; the next one catches up");
            Update::Failed {
                source: vm.source.clone(),
                cycle: n,
                error: e.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Cancelling stops the service within its poll step, even in the middle
    /// of a long interval, and every failed cycle is reported and counted.
    #[test]
    fn a_cancel_stops_protection_promptly_and_failures_are_reported() {
        let repo = ferry_agent::Repository::init(
            ferry_agent::Store::memory(),
            b"password",
            ferry_agent::repo::InitOptions {
                kdf: ferry_agent::crypto::KdfParams {
                    memory_kib: 64,
                    iterations: 1,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            vms: vec![Protected {
                source: "gone".into(),
                vm: LiveVm {
                    qmp: dir.path().join("no-such.qmp"),
                    disks: vec![qemu::VmDisk {
                        node: "disk0".into(),
                        name: "vda".into(),
                    }],
                    work_dir: PathBuf::from(dir.path()),
                },
            }],
            interval: Duration::from_secs(3600),
            cycles: None,
            deadline: None,
            hook: None,
            retention: Policy::default(),
            together: false,
        };
        let status = Status::default();
        let cancel = AtomicBool::new(false);
        let (tx, rx) = mpsc::sync_channel(4);
        let started = Instant::now();
        let final_status = std::thread::scope(|s| {
            let h = s.spawn(|| run(&repo, &opts, &status, Some(&tx), &cancel));
            // The first cycle fails (no VM there) and is reported.
            match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                Update::Failed {
                    source,
                    cycle,
                    error,
                } => {
                    assert_eq!((source.as_str(), cycle), ("gone", 1));
                    assert!(error.contains("no-such.qmp"), "{error}");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(status.snapshot()[0].cycles_failed, 1);
            cancel.store(true, Ordering::Relaxed);
            h.join().unwrap()
        });
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "cancel waited for the interval: {:?}",
            started.elapsed()
        );
        assert_eq!(final_status[0].cycles_failed, 1);
        assert_eq!(final_status[0].cycles_ok, 0);
    }
}
