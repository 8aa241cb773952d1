//! Repository locks: who is using the repository right now.
//!
//! Every operation that reads the index or the packs (backup, restore, check,
//! prune) writes a lock object `locks/<random>` before it loads anything, keeps it
//! fresh while it runs, and removes it when done. Locks do not exclude each other
//! except for prune against prune: what they give prune is the set of operations
//! that may still hold an old view of the index, so that prune deletes nothing
//! such an operation could still use (see `prune.rs` and the concurrency table in
//! ARCHITECTURE.md).
//!
//! A lock is stale, and ignored, when it has not been refreshed for
//! [`STALE_AFTER`], or when it names a process on this host that no longer runs
//! (a `kill -9`). An operation whose lock could not be refreshed for longer than
//! [`STALE_AFTER`] − [`REFRESH_EVERY`] refuses to commit anything.
//!
//! ```text
//! locks/<hex>   Envelope(kind Lock) || Sealed<JSON LockInfo>
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::{MasterKey, random_hex};
use crate::error::{Error, Result};
use crate::format::{self, Kind};
use crate::repo::Repository;
use crate::store::Store;

/// A lock not refreshed for this long belongs to a dead or cut-off process.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// How often a running operation refreshes its lock.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
/// How far ahead of this host's clock a lock's refresh time may be and still be
/// believed. Beyond it (a host whose clock runs fast, or a forged lock) the time
/// the store last wrote the lock counts instead, so such a lock goes stale when
/// its writer stops, like any other (see ARCHITECTURE.md, Concurrency).
pub const MAX_FUTURE: Duration = Duration::from_secs(10 * 60);
/// The largest lock object readers accept: its JSON is about 150 bytes.
pub const MAX_LOCK_OBJECT: u64 = 64 << 10;

/// What a lock says about its holder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockInfo {
    /// `backup`, `restore`, `check`, `prune`, ...
    pub operation: String,
    /// Only one `exclusive` lock (prune) may be live at a time.
    pub exclusive: bool,
    pub host: String,
    pub pid: u32,
    pub created: DateTime<Utc>,
    pub refreshed: DateTime<Utc>,
    /// When the store last wrote the lock, by the store's clock: set by [`list`]
    /// for a lock whose `refreshed` is more than [`MAX_FUTURE`] ahead.
    #[serde(skip)]
    pub stored: Option<DateTime<Utc>>,
}

impl LockInfo {
    /// Whether the refresh time is too far ahead of `now` to be believed.
    fn dated_ahead(&self, now: DateTime<Utc>) -> bool {
        self.refreshed
            .signed_duration_since(now)
            .to_std()
            .is_ok_and(|ahead| ahead > MAX_FUTURE)
    }

    /// When the holder last showed it was alive: its refresh time, or the
    /// store's time of its last write when the refresh time is from the future.
    fn last_seen(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.dated_ahead(now) {
            self.stored
        } else {
            Some(self.refreshed)
        }
    }

    /// Whether the holder is certainly gone: not refreshed for too long, or a
    /// process of this host that has exited. A lock from the future whose store
    /// time is unknown is kept live: nothing is deleted on a guess.
    pub fn is_stale(&self, now: DateTime<Utc>) -> bool {
        if self.host == hostname() && !process_alive(self.pid) {
            return true;
        }
        self.last_seen(now).is_some_and(|seen| {
            now.signed_duration_since(seen)
                .to_std()
                .is_ok_and(|age| age > STALE_AFTER)
        })
    }

    /// The lock as a user needs it to decide: its name, operation, host, pid,
    /// times, and why it counts as live.
    pub fn describe(&self, name: &str, now: DateTime<Utc>) -> String {
        let time = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
        let ago = |t: DateTime<Utc>| {
            let m = now.signed_duration_since(t).num_minutes();
            if m >= 0 {
                format!("{m} min ago")
            } else {
                format!("{} min ahead of this host's clock", -m)
            }
        };
        let why = if self.dated_ahead(now) {
            match self.stored {
                Some(s) => format!(
                    "its refresh time {} is {}, which this host does not believe (a fast clock on {}, or a forged lock), so the store's last write of it counts: {} ({}); it is ignored once that is {} minutes old",
                    time(self.refreshed),
                    ago(self.refreshed),
                    self.host,
                    time(s),
                    ago(s),
                    STALE_AFTER.as_secs() / 60
                ),
                None => format!(
                    "its refresh time {} is {} and the store's time is unknown",
                    time(self.refreshed),
                    ago(self.refreshed)
                ),
            }
        } else {
            format!(
                "refreshed {} ({}); it is ignored once it has gone {} minutes without a refresh",
                time(self.refreshed),
                ago(self.refreshed),
                STALE_AFTER.as_secs() / 60
            )
        };
        format!(
            "{name} ({} on host {} pid {} since {}: {why})",
            self.operation,
            self.host,
            self.pid,
            time(self.created)
        )
    }
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn encode(key: &MasterKey, info: &LockInfo) -> Vec<u8> {
    let header = format::header(Kind::Lock);
    let mut out = header.to_vec();
    key.seal_into(
        &header,
        &serde_json::to_vec(info).expect("lock serialises"),
        &mut out,
    );
    out
}

fn decode(repo: &Repository, name: &str, bytes: &[u8]) -> Result<LockInfo> {
    let body = format::split(name, Kind::Lock, bytes)?;
    let json = repo
        .key
        .open(format::aad(bytes), body)
        .ok_or_else(|| Error::corrupt(name, "lock does not authenticate"))?;
    serde_json::from_slice(&json).map_err(|e| Error::corrupt(name, e.to_string()))
}

/// Every lock in the repository, stale or not, by object name. Locks that
/// vanish while being read (their holder finished) are skipped; unreadable ones
/// (damaged, planted, larger than [`MAX_LOCK_OBJECT`]) are returned as errors
/// so callers can be conservative, until the store has not rewritten them for
/// [`STALE_AFTER`]: a live holder rewrites its lock every [`REFRESH_EVERY`], so
/// such a lock has no live holder and is left out, with a warning.
/// A lock whose refresh time is from the future gets the store's time of its
/// last write (`LockInfo::stored`).
pub fn list(repo: &Repository) -> Result<Vec<(String, Result<LockInfo>)>> {
    let now = Utc::now();
    let mut out = Vec::new();
    for (name, _) in repo.store.list("locks/")? {
        let info = match repo.store.get_bounded(&name, MAX_LOCK_OBJECT) {
            Ok(bytes) => decode(repo, &name, &bytes),
            Err(Error::Missing { .. }) => continue,
            Err(e) => Err(e),
        };
        let info = match info {
            Ok(mut i) if i.dated_ahead(now) => {
                i.stored = match repo.store.modified(&name)? {
                    Some(t) => Some(t),
                    None => continue, // removed since the listing
                };
                Ok(i)
            }
            Err(e @ (Error::Corrupt { .. } | Error::UnsupportedVersion { .. })) => {
                match repo.store.modified(&name)? {
                    None => continue,
                    Some(t)
                        if now
                            .signed_duration_since(t)
                            .to_std()
                            .is_ok_and(|age| age > STALE_AFTER) =>
                    {
                        tracing::warn!(lock = %name, error = %e, "ignoring an unreadable lock nobody has written for 30 minutes; remove it");
                        continue;
                    }
                    Some(_) => Err(e),
                }
            }
            other => other,
        };
        out.push((name, info));
    }
    Ok(out)
}

/// A held lock. Dropping it stops the refresher and removes the lock object.
#[derive(Debug)]
pub struct Lock {
    name: String,
    store: Store,
    shared: Arc<Shared>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    /// Unix seconds of the last refresh the store confirmed.
    confirmed: AtomicI64,
    wake: (std::sync::Mutex<()>, std::sync::Condvar),
}

impl Lock {
    /// Write a lock for `operation`. With `exclusive`, fail if another live
    /// exclusive lock exists (two prunes never run at once).
    pub fn acquire(repo: &Repository, operation: &str, exclusive: bool) -> Result<Lock> {
        let now = Utc::now();
        let info = LockInfo {
            operation: operation.to_string(),
            exclusive,
            host: hostname(),
            pid: std::process::id(),
            created: now,
            refreshed: now,
            stored: None,
        };
        let name = format!("locks/{}", random_hex(16));
        repo.store.put(&name, encode(&repo.key, &info).into())?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            confirmed: AtomicI64::new(now.timestamp()),
            wake: Default::default(),
        });
        let mut lock = Lock {
            name: name.clone(),
            store: repo.store.clone(),
            shared: shared.clone(),
            refresher: None,
        };
        if exclusive {
            // Each prune writes its lock, then looks: one that sees another
            // live exclusive lock steps back. Two racing may both step back;
            // they never both go on.
            for (other, info) in list(repo)? {
                let Ok(other_info) = info else { continue };
                let now = Utc::now();
                if other != name && other_info.exclusive && !other_info.is_stale(now) {
                    return Err(Error::InvalidInput(format!(
                        "another {} holds the repository: lock {}; wait for it to finish, or remove the lock if that process is certainly gone",
                        other_info.operation,
                        other_info.describe(&other, now)
                    )));
                }
            }
        }
        let store = repo.store.clone();
        let key = repo.key.clone();
        let thread_name = name.clone();
        lock.refresher = Some(
            std::thread::Builder::new()
                .name("ferry-lock".into())
                .spawn(move || {
                    let mut info = info;
                    loop {
                        let (m, cv) = &shared.wake;
                        let guard = m.lock().unwrap_or_else(|p| p.into_inner());
                        let (_guard, _) = cv
                            .wait_timeout_while(guard, REFRESH_EVERY, |_| {
                                !shared.stop.load(Ordering::Relaxed)
                            })
                            .unwrap_or_else(|p| p.into_inner());
                        if shared.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        info.refreshed = Utc::now();
                        match store.put(&thread_name, encode(&key, &info).into()) {
                            Ok(()) => shared
                                .confirmed
                                .store(info.refreshed.timestamp(), Ordering::Relaxed),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot refresh the repository lock")
                            }
                        }
                    }
                })
                .map_err(|e| Error::InvalidInput(format!("cannot start a thread: {e}")))?,
        );
        Ok(lock)
    }

    /// The lock's object name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fail unless the lock is certainly still seen as live by others: called
    /// before committing anything that relies on what was read under it.
    pub fn ensure_fresh(&self) -> Result<()> {
        let confirmed = self.shared.confirmed.load(Ordering::Relaxed);
        let age = Utc::now().timestamp() - confirmed;
        if age as u64 + REFRESH_EVERY.as_secs() >= STALE_AFTER.as_secs() {
            return Err(Error::InvalidInput(format!(
                "the repository lock {} could not be refreshed for {age} s, so a concurrent prune may have removed data this operation relies on; nothing was committed: run it again",
                self.name
            )));
        }
        Ok(())
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.1.notify_all();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.stop();
        // A lock that cannot be removed now goes stale and is ignored later.
        if let Err(e) = self.store.delete(&self.name) {
            tracing::warn!(lock = %self.name, error = %e, "cannot remove the repository lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(host: &str, pid: u32, refreshed: DateTime<Utc>) -> LockInfo {
        LockInfo {
            operation: "backup".into(),
            exclusive: false,
            host: host.into(),
            pid,
            created: refreshed,
            refreshed,
            stored: None,
        }
    }

    #[test]
    fn a_lock_dated_ahead_goes_stale_when_the_store_stops_seeing_it_written() {
        let repo = crate::testing::memory_repo();
        let now = Utc::now();
        // A crashed host whose clock ran a day ahead.
        let future = info("fast-clock", 7, now + chrono::Duration::days(1));
        repo.store
            .put("locks/fast", encode(&repo.key, &future).into())
            .unwrap();
        let (name, read) = list(&repo).unwrap().pop().unwrap();
        let read = read.unwrap();
        assert_eq!(name, "locks/fast");
        let stored = read.stored.expect("the store's time of the lock");
        // Just written: its holder may be alive with a fast clock, so it is live...
        assert!(!read.is_stale(now));
        // ...until the store has not seen it rewritten for 30 minutes, although
        // it claims a refresh in the future.
        assert!(read.is_stale(stored + chrono::Duration::minutes(31)));
        // A small skew is believed as it is.
        let skewed = info("elsewhere", 1, now + chrono::Duration::minutes(5));
        assert!(!skewed.is_stale(now + chrono::Duration::minutes(34)));
        assert!(skewed.is_stale(now + chrono::Duration::minutes(36)));
        // What a blocked prune shows names the lock, its holder and why.
        let text = read.describe(&name, now);
        for part in [
            "locks/fast",
            "fast-clock",
            "pid 7",
            "ahead of this host's clock",
            "the store's last write",
        ] {
            assert!(text.contains(part), "{text}");
        }
    }

    #[test]
    fn a_refused_prune_names_the_lock_that_blocks_it_and_why() {
        let repo = crate::testing::memory_repo();
        let mut other = info("db-host", 4242, Utc::now());
        other.operation = "prune".into();
        other.exclusive = true;
        repo.store
            .put("locks/other", encode(&repo.key, &other).into())
            .unwrap();
        let err = Lock::acquire(&repo, "prune", true).unwrap_err();
        let text = err.to_string();
        for part in [
            "locks/other",
            "db-host",
            "pid 4242",
            "refreshed",
            "30 minutes",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
    }

    #[test]
    fn an_oversized_lock_is_refused_naming_it_without_reading_it() {
        let repo = crate::testing::memory_repo();
        repo.store
            .put(
                "locks/big",
                bytes::Bytes::from(vec![0u8; MAX_LOCK_OBJECT as usize + 1]),
            )
            .unwrap();
        let (name, read) = list(&repo).unwrap().pop().unwrap();
        assert_eq!(name, "locks/big");
        let err = read.unwrap_err();
        assert!(matches!(&err, Error::Corrupt { object, .. } if object == "locks/big"));
        assert!(err.to_string().contains("not read"), "{err}");
        assert_eq!(repo.store.requests().bytes_down, 0);
    }

    #[test]
    fn staleness_by_age_and_by_dead_local_process() {
        let now = Utc::now();
        assert!(!info("elsewhere", 1, now).is_stale(now));
        assert!(info("elsewhere", 1, now - chrono::Duration::minutes(31)).is_stale(now));
        assert!(!info(&hostname(), std::process::id(), now).is_stale(now));
        // pid_max is at most 2^22 on Linux: this pid cannot be running.
        assert!(info(&hostname(), (1 << 22) + 7, now).is_stale(now));
    }
}
