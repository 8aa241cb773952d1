//! Replicated repositories: one repository kept whole in several object stores
//! (a directory, S3 in one cloud, Azure Blob in another), so that its data
//! outlives the loss of any store short of the write quorum.
//!
//! The protocol (ARCHITECTURE.md, Concurrency, has its failure cases):
//!
//! - **Writes** go to every replica at once, each through its own retrying
//!   [`Store`], and succeed when [`ReplicaConfig::write_quorum`] replicas hold
//!   the object. A slower replica keeps its copy going in the background, within
//!   a backlog of [`BACKLOG_BYTES`]; what it fails to store, or what would not fit
//!   its backlog, is noted as missed.
//! - **Missed objects are recorded** in the other replicas as
//!   `replicas/missing/<replica id>/<random>` (sealed, [`MissingRecord`]) before
//!   the next recovery point is written, when a process settles at its end, and
//!   whenever a thousand names are waiting. A process killed in between leaves
//!   its last misses unrecorded: `repair` and `check` therefore also compare the
//!   replicas' listings, and the records are what makes repair and reporting
//!   cheap, not what makes them correct.
//! - **Reads** go to the healthy replica that has answered fastest and fall over
//!   to the next one on an error, a timeout, a missing object, an object whose
//!   bytes do not hash to its name, or (through [`ReplicaSet::avoid`], which
//!   [`Store::recover_original`] calls) a blob that does not authenticate; the
//!   replica that failed is noted as missing that object, so repair rewrites it.
//! - **Listings** are the union of the replicas that answer. Every committed
//!   object is on at least `write_quorum` replicas, so a listing that `n -
//!   write_quorum + 1` replicas answered sees every one of them.
//! - **Deletes** (forget, prune, locks) go to every replica, and fail when one
//!   cannot take them: prune refuses to start without every replica
//!   ([`ReplicaSet::require_all`]), so it condemns and deletes only what is
//!   unreferenced in the union of all replicas.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::{MasterKey, random_hex};
use crate::error::{Error, Result, Retry};
use crate::format::{self, Kind};
use crate::store::{LockPolicy, Replicas, Requests, Store, content_hash};

/// The most replicas a repository may have.
pub const MAX_REPLICAS: usize = 7;
/// Uploads in flight per replica.
pub const WRITERS_PER_REPLICA: usize = 4;
/// Bytes a replica may have queued behind the quorum before further objects
/// are recorded as missed instead of queued (memory stays bounded when one
/// replica is slow or down).
pub const BACKLOG_BYTES: u64 = 128 << 20;
/// Where the records of missed objects live.
pub const RECORDS: &str = "replicas/missing/";
/// The largest record read.
pub const MAX_RECORD_OBJECT: u64 = 4 << 20;
/// Names per record object (about 80 bytes each).
const NAMES_PER_RECORD: usize = 20_000;
/// Missed names waiting before they are recorded without waiting for a point.
const RECORD_EVERY: usize = 1_000;
/// How long a replica that failed is read from last.
const SICK_FOR: Duration = Duration::from_secs(30);
/// What a repair copies and compares: everything but locks and its own records.
pub const REPLICATED_PREFIXES: [&str; 6] =
    ["config", "keys/", "packs/", "index/", "points/", "trash/"];

/// One replica of a repository, as its config records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    /// 8 random bytes in hex: names the replica in records and reports.
    pub id: String,
    /// Where it lives, as `ferry init` was given it (directories made absolute).
    pub location: String,
    /// Object Lock retention of every object written to it (replicas without
    /// Object Lock have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockPolicy>,
}

/// The replica set of a repository, recorded in the config of every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Replicas that must hold an object before a write succeeds.
    pub write_quorum: usize,
    pub replicas: Vec<ReplicaSpec>,
}

impl ReplicaConfig {
    pub fn validate(&self) -> Result<()> {
        let n = self.replicas.len();
        if !(2..=MAX_REPLICAS).contains(&n) {
            return Err(Error::InvalidInput(format!(
                "a replicated repository has 2 to {MAX_REPLICAS} replicas, not {n}"
            )));
        }
        if !(1..=n).contains(&self.write_quorum) {
            return Err(Error::InvalidInput(format!(
                "the write quorum must be from 1 to the number of replicas ({n}), not {}",
                self.write_quorum
            )));
        }
        let ids: BTreeSet<&str> = self.replicas.iter().map(|r| r.id.as_str()).collect();
        let locations: BTreeSet<&str> = self.replicas.iter().map(|r| r.location.as_str()).collect();
        if ids.len() != n || locations.len() != n {
            return Err(Error::InvalidInput(
                "every replica must have its own id and location".into(),
            ));
        }
        if self
            .replicas
            .iter()
            .any(|r| r.id.len() != 16 || !r.id.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(Error::InvalidInput("a replica id is 16 hex digits".into()));
        }
        Ok(())
    }

    /// The smallest number of replicas whose listings together see every
    /// object that reached the quorum.
    pub fn listing_quorum(&self) -> usize {
        self.replicas.len() - self.write_quorum + 1
    }
}

/// What a record says: objects one replica lacks (or held damaged) that the
/// others have.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingRecord {
    pub replica: String,
    pub created: DateTime<Utc>,
    /// Objects it failed to store, or had not stored yet when the writer ended.
    pub objects: Vec<String>,
    /// Objects it served with bytes that did not match their name or did not
    /// authenticate: repair rewrites them even though the listing shows them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<String>,
}

/// Seal a record: envelope (kind 8) then the JSON under the data key, with the
/// header as AAD, like locks and prune records.
pub fn encode_record(key: &MasterKey, record: &MissingRecord) -> Vec<u8> {
    let header = format::header(Kind::Replica);
    let mut out = header.to_vec();
    key.seal_into(
        &header,
        &serde_json::to_vec(record).expect("record serialises"),
        &mut out,
    );
    out
}

pub fn decode_record(key: &MasterKey, name: &str, bytes: &[u8]) -> Result<MissingRecord> {
    let body = format::split(name, Kind::Replica, bytes)?;
    let json = key
        .open(format::aad(bytes), body)
        .ok_or_else(|| Error::corrupt(name, "replica record does not authenticate"))?;
    serde_json::from_slice(&json).map_err(|e| Error::corrupt(name, e.to_string()))
}

#[derive(Debug, Default)]
struct Health {
    /// Smoothed time of a successful request, in milliseconds.
    latency_ms: Option<f64>,
    sick_since: Option<Instant>,
    last_error: Option<String>,
}

#[derive(Debug)]
struct Replica {
    spec: ReplicaSpec,
    store: Store,
    /// Why it is not used at all (its config is not this repository's).
    refused: Option<String>,
    health: Mutex<Health>,
    /// Bytes queued for it and not yet stored.
    backlog: AtomicU64,
    /// Names queued for it and not yet stored.
    in_flight: Mutex<BTreeSet<String>>,
}

impl Replica {
    fn went_well(&self, took: Duration) {
        let ms = took.as_secs_f64() * 1e3;
        let mut h = self.health.lock().expect("replica health");
        h.latency_ms = Some(match h.latency_ms {
            Some(old) => old * 0.8 + ms * 0.2,
            None => ms,
        });
        h.sick_since = None;
    }

    fn went_wrong(&self, e: &Error) {
        let mut h = self.health.lock().expect("replica health");
        if matches!(e, Error::Unreachable { .. }) || e.retry() == Retry::Transient {
            h.sick_since = Some(Instant::now());
        }
        h.last_error = Some(e.to_string());
    }

    /// (sick, latency) for ordering reads: healthy and fast first.
    fn rank(&self) -> (bool, u64) {
        let h = self.health.lock().expect("replica health");
        let sick = h.sick_since.is_some_and(|t| t.elapsed() < SICK_FOR);
        (sick, h.latency_ms.map_or(0, |ms| (ms * 1e3) as u64))
    }
}

struct Job {
    name: String,
    data: Bytes,
    ticket: Arc<Ticket>,
}

#[derive(Default)]
struct Ticket {
    state: Mutex<TicketState>,
    done: Condvar,
}

#[derive(Default)]
struct TicketState {
    stored: usize,
    failed: usize,
    errors: Vec<String>,
}

impl Ticket {
    fn finish(&self, outcome: std::result::Result<(), String>) {
        let mut st = self.state.lock().expect("ticket");
        match outcome {
            Ok(()) => st.stored += 1,
            Err(e) => {
                st.failed += 1;
                st.errors.push(e);
            }
        }
        self.done.notify_all();
    }
}

/// One replica's state, as `check` and `repair` report it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaState {
    pub id: String,
    pub location: String,
    /// Whether its listing answered.
    pub reachable: bool,
    pub error: Option<String>,
    /// Objects the other replicas hold that it lacks or holds with another size.
    pub missing: usize,
    /// Objects records list for it (some may have landed since: a writer that
    /// ends records what is still in flight).
    pub recorded: usize,
    /// Objects records say it served damaged.
    pub recorded_damaged: usize,
    /// Objects copied to it by this repair, and their bytes.
    pub copied: usize,
    pub copied_bytes: u64,
    /// Objects it could not be given (no replica had a sound copy, or the put failed).
    pub failed: usize,
    /// Objects `--read-data` found damaged on it.
    pub damaged: usize,
}

/// What `repair` (or its dry run for `check`) found and did.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub write_quorum: usize,
    pub replicas: Vec<ReplicaState>,
    /// Record objects read, and removed once their replica held everything in them.
    pub records: usize,
    pub records_removed: usize,
    /// Objects compared across the replicas.
    pub objects: usize,
}

impl RepairReport {
    /// Every replica answered and holds everything.
    pub fn in_sync(&self) -> bool {
        self.replicas.iter().all(|r| {
            r.reachable
                && r.missing == 0
                && r.failed == 0
                && r.damaged == 0
                && r.recorded_damaged == 0
        })
    }
}

/// Options of [`ReplicaSet::repair`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RepairOptions {
    /// Report only; copy nothing, remove no record.
    pub dry_run: bool,
    /// Read every content-addressed object on every replica and check it
    /// against its name (what `check --read-data` does for one store).
    pub read_data: bool,
}

/// The replicas of one repository behind one [`Store`].
pub struct ReplicaSet {
    config: ReplicaConfig,
    replicas: Vec<Arc<Replica>>,
    writers: Vec<OnceLock<crossbeam_channel::Sender<Job>>>,
    key: MasterKey,
    /// Per replica, objects it missed and not yet recorded.
    missed: Arc<Mutex<Vec<BTreeSet<String>>>>,
    /// Per replica, objects it served damaged and not yet recorded.
    damaged: Mutex<Vec<BTreeSet<String>>>,
    /// Objects whose reads must avoid some replicas (they served damage).
    avoided: Mutex<HashMap<String, BTreeSet<usize>>>,
    /// Opened with one replica alone: reads only.
    alone: Option<usize>,
    /// How long each write waited for its quorum, in microseconds (the first
    /// [`LATENCY_SAMPLES`]).
    waits: Mutex<Vec<u64>>,
}

/// Write latencies kept for [`ReplicaSet::write_stats`].
const LATENCY_SAMPLES: usize = 1 << 16;

/// What writes to the replicas cost, for a backup's summary.
#[derive(Debug, Clone, Serialize)]
pub struct WriteStats {
    pub write_quorum: usize,
    /// Writes that waited for the quorum (objects, locks included).
    pub writes: usize,
    /// How long a write waited for its quorum, in milliseconds.
    pub wait_p50_ms: f64,
    pub wait_p99_ms: f64,
    pub wait_max_ms: f64,
    /// Per replica: bytes still being written to it in the background.
    pub behind: Vec<(String, u64)>,
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .replicas
            .iter()
            .map(|r| r.spec.location.as_str())
            .collect();
        write!(
            f,
            "ReplicaSet({names:?}, quorum {})",
            self.config.write_quorum
        )
    }
}

thread_local! {
    /// The set (by address), object and replica of this thread's last read, for
    /// [`ReplicaSet::avoid`].
    static SERVED: std::cell::RefCell<Option<(usize, String, usize)>> = const { std::cell::RefCell::new(None) };
}

/// Whether a missed object is worth recording: locks come and go, records are
/// about the others.
fn recordable(name: &str) -> bool {
    !name.starts_with("locks/") && !name.starts_with("replicas/")
}

/// A whole object's bytes are what its name says (for content-addressed names).
fn sound(name: &str, bytes: &[u8]) -> bool {
    content_hash(name).is_none_or(|h| blake3::hash(bytes).to_hex().as_str() == h)
}

impl ReplicaSet {
    /// Build the set from the opened stores, one per spec in order. `config` is
    /// the config object the repository was opened with: a replica holding
    /// another one is refused, an unreachable one is used when it answers.
    /// `alone` restricts reads to one replica (by id or location) and refuses writes.
    pub fn new(
        config: ReplicaConfig,
        stores: Vec<Store>,
        key: MasterKey,
        config_object: &Bytes,
        alone: Option<&str>,
    ) -> Result<ReplicaSet> {
        config.validate()?;
        assert_eq!(config.replicas.len(), stores.len(), "a store per replica");
        let alone = match alone {
            None => None,
            Some(which) => Some(
                config
                    .replicas
                    .iter()
                    .position(|r| r.id == which || r.location == which)
                    .ok_or_else(|| {
                        Error::InvalidInput(format!(
                            "{which} is not a replica of this repository; its replicas are {}",
                            config
                                .replicas
                                .iter()
                                .map(|r| format!("{} ({})", r.id, r.location))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?,
            ),
        };
        let refused: Vec<Option<String>> = std::thread::scope(|s| {
            let checks: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(i, st)| {
                    let skip = alone.is_some_and(|a| a != i);
                    s.spawn(move || {
                        if skip {
                            return None;
                        }
                        match st.get_bounded("config", format::MAX_CONFIG_OBJECT) {
                            Ok(b) if b == *config_object => None,
                            Ok(_) => Some(format!(
                                "{} holds another repository's config: it is not used; give it this repository's objects with `ferry repair` after moving them aside",
                                st.location()
                            )),
                            // Not there (yet) or unreachable: it is used, and repair fills it.
                            Err(_) => None,
                        }
                    })
                })
                .collect();
            checks
                .into_iter()
                .map(|h| h.join().expect("config check"))
                .collect()
        });
        let n = stores.len();
        let replicas = config
            .replicas
            .iter()
            .zip(stores)
            .zip(refused)
            .map(|((spec, store), refused)| {
                if let Some(why) = &refused {
                    tracing::warn!("{why}");
                }
                Arc::new(Replica {
                    spec: spec.clone(),
                    store: store.with_lock(spec.lock),
                    refused,
                    health: Mutex::default(),
                    backlog: AtomicU64::new(0),
                    in_flight: Mutex::default(),
                })
            })
            .collect();
        Ok(ReplicaSet {
            config,
            replicas,
            writers: (0..n).map(|_| OnceLock::new()).collect(),
            key,
            missed: Arc::new(Mutex::new(vec![BTreeSet::new(); n])),
            damaged: Mutex::new(vec![BTreeSet::new(); n]),
            avoided: Mutex::default(),
            alone,
            waits: Mutex::default(),
        })
    }

    /// Replicas reads may use, in order of preference for `name`.
    fn read_order(&self, name: &str) -> Vec<usize> {
        let avoided = self
            .avoided
            .lock()
            .expect("avoided replicas")
            .get(name)
            .cloned()
            .unwrap_or_default();
        let mut order: Vec<usize> = (0..self.replicas.len())
            .filter(|i| self.alone.is_none_or(|a| a == *i))
            .filter(|i| self.replicas[*i].refused.is_none() && !avoided.contains(i))
            .collect();
        order.sort_by_key(|i| self.replicas[*i].rank());
        order
    }

    fn note_missed(&self, i: usize, name: &str) {
        if recordable(name) {
            self.missed.lock().expect("missed objects")[i].insert(name.to_string());
        }
    }

    fn note_damaged(&self, i: usize, name: &str) {
        if recordable(name) {
            self.damaged.lock().expect("damaged objects")[i].insert(name.to_string());
        }
    }

    /// Read `name` from the best replica that has it and whose answer `sound`
    /// accepts, falling over to the others.
    fn read<T>(
        &self,
        name: &str,
        op: impl Fn(&Store) -> Result<T>,
        sound: impl Fn(&T) -> bool,
    ) -> Result<T> {
        // Replicas that lacked it (false) or served it damaged (true).
        let mut lacking: Vec<(usize, bool)> = Vec::new();
        let mut errors: Vec<Error> = Vec::new();
        for i in self.read_order(name) {
            let r = &self.replicas[i];
            let started = Instant::now();
            match op(&r.store) {
                Ok(v) if sound(&v) => {
                    r.went_well(started.elapsed());
                    let me = self as *const ReplicaSet as usize;
                    SERVED.with(|s| *s.borrow_mut() = Some((me, name.to_string(), i)));
                    // What the others lacked, they are given by repair.
                    for (j, damaged) in lacking {
                        if damaged {
                            self.note_damaged(j, name);
                        } else {
                            self.note_missed(j, name);
                        }
                    }
                    for e in &errors {
                        tracing::debug!(object = name, error = %e, "read from another replica");
                    }
                    return Ok(v);
                }
                Ok(_) => {
                    tracing::warn!(
                        object = name,
                        replica = %r.spec.location,
                        "{name} on replica {} does not match its name: read from another replica, and noted for repair",
                        r.spec.location
                    );
                    lacking.push((i, true));
                    errors.push(Error::corrupt(
                        name,
                        format!(
                            "on replica {}, the bytes do not match the name",
                            r.spec.location
                        ),
                    ));
                }
                Err(Error::Missing { .. }) => lacking.push((i, false)),
                Err(e) => {
                    r.went_wrong(&e);
                    if matches!(e, Error::Corrupt { .. }) {
                        lacking.push((i, true));
                    }
                    errors.push(e);
                }
            }
        }
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Err(Error::Missing {
                object: name.to_string(),
            }),
        }
    }

    /// What `op` says of `name` on the best replica that has it, or `None`
    /// when none has it.
    fn optional<T>(
        &self,
        name: &str,
        op: impl Fn(&Store) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let missing = || Error::Missing {
            object: name.to_string(),
        };
        match self.read(name, |s| op(s)?.ok_or_else(missing), |_| true) {
            Ok(v) => Ok(Some(v)),
            Err(Error::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Each replica's listing (`None` for one that did not answer, with why).
    fn listings<T: Send>(
        &self,
        op: impl Fn(&Store) -> Result<Vec<T>> + Sync,
    ) -> Vec<std::result::Result<Vec<T>, Error>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .replicas
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let op = &op;
                    let skip = r.refused.clone().or_else(|| {
                        self.alone
                            .is_some_and(|a| a != i)
                            .then(|| "not the replica read alone".to_string())
                    });
                    s.spawn(move || match skip {
                        Some(why) => Err(Error::InvalidInput(why)),
                        None => op(&r.store),
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("listing thread"))
                .collect()
        })
    }

    /// The union of what the replicas list, keyed by name.
    fn union<T: Clone + Send>(
        &self,
        prefix: &str,
        op: impl Fn(&Store) -> Result<Vec<T>> + Sync,
        name_of: impl Fn(&T) -> &str,
    ) -> Result<Vec<T>> {
        let mut answered = 0;
        let mut first_error = None;
        let mut all: BTreeMap<String, T> = BTreeMap::new();
        for (i, listing) in self.listings(op).into_iter().enumerate() {
            match listing {
                Ok(items) => {
                    answered += 1;
                    for item in items {
                        all.entry(name_of(&item).to_string()).or_insert(item);
                    }
                }
                Err(e) => {
                    if self.alone.is_none_or(|a| a == i) {
                        self.replicas[i].went_wrong(&e);
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        let needed = if self.alone.is_some() {
            1
        } else {
            self.config.listing_quorum()
        };
        if answered == 0 {
            return Err(first_error.unwrap_or_else(|| Error::Missing {
                object: prefix.to_string(),
            }));
        }
        if answered < needed {
            tracing::warn!(
                "only {answered} of {} replicas listed {prefix}: objects stored on the others alone are not seen ({})",
                self.replicas.len(),
                first_error.map(|e| e.to_string()).unwrap_or_default()
            );
        }
        Ok(all.into_values().collect())
    }

    /// Each replica's id, location and store, in the config's order.
    pub fn members(&self) -> impl Iterator<Item = (&str, &str, &Store)> {
        self.replicas
            .iter()
            .map(|r| (r.spec.id.as_str(), r.spec.location.as_str(), &r.store))
    }

    /// Every replica answers, or the operation (prune, forget) must not start.
    pub fn require_all(&self, operation: &str) -> Result<()> {
        if self.alone.is_some() {
            return Err(self.read_only(operation));
        }
        for (r, listing) in self
            .replicas
            .iter()
            .zip(self.listings(|s| s.list("config")))
        {
            if let Some(why) = &r.refused {
                return Err(Error::InvalidInput(format!(
                    "{operation} needs every replica: {why}"
                )));
            }
            if let Err(e) = listing {
                return Err(Error::InvalidInput(format!(
                    "{operation} needs every replica, and {} does not answer ({e}); bring it back, then run `ferry repair` and this again",
                    r.spec.location
                )));
            }
        }
        Ok(())
    }

    fn read_only(&self, operation: &str) -> Error {
        Error::InvalidInput(format!(
            "{operation} writes to the repository, and it was opened with one replica alone (--read-replica), for reading; run it without --read-replica"
        ))
    }

    fn writer(&self, i: usize) -> &crossbeam_channel::Sender<Job> {
        self.writers[i].get_or_init(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<Job>();
            for _ in 0..WRITERS_PER_REPLICA {
                let rx = rx.clone();
                let r = self.replicas[i].clone();
                let missed = self.missed.clone();
                std::thread::Builder::new()
                    .name(format!("ferry-replica-{}", &r.spec.id[..4]))
                    .spawn(move || {
                        for job in rx {
                            let started = Instant::now();
                            let len = job.data.len() as u64;
                            let outcome = r.store.put(&job.name, job.data);
                            r.backlog.fetch_sub(len, Ordering::Relaxed);
                            match outcome {
                                Ok(()) => {
                                    r.went_well(started.elapsed());
                                    r.in_flight.lock().expect("in flight").remove(&job.name);
                                    job.ticket.finish(Ok(()));
                                }
                                Err(e) => {
                                    r.went_wrong(&e);
                                    if recordable(&job.name) {
                                        missed.lock().expect("missed objects")[i]
                                            .insert(job.name.clone());
                                    }
                                    r.in_flight.lock().expect("in flight").remove(&job.name);
                                    job.ticket.finish(Err(format!("{}: {e}", r.spec.location)));
                                }
                            }
                        }
                    })
                    .expect("a replica writer thread starts");
            }
            tx
        })
    }

    /// What writes cost so far.
    pub fn write_stats(&self) -> WriteStats {
        let mut w = self.waits.lock().expect("write waits").clone();
        w.sort_unstable();
        let at = |q: f64| {
            if w.is_empty() {
                0.0
            } else {
                w[((w.len() - 1) as f64 * q).round() as usize] as f64 / 1e3
            }
        };
        WriteStats {
            write_quorum: self.config.write_quorum,
            writes: w.len(),
            wait_p50_ms: at(0.5),
            wait_p99_ms: at(0.99),
            wait_max_ms: at(1.0),
            behind: self
                .replicas
                .iter()
                .map(|r| (r.spec.location.clone(), r.backlog.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Wait up to `grace` for the replicas still writing in the background,
    /// then record what they have not stored yet (and everything missed) so
    /// that `repair` can give it to them; the writes go on meanwhile.
    pub fn settle(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline
            && self
                .replicas
                .iter()
                .any(|r| r.backlog.load(Ordering::Relaxed) > 0)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.record_missed(true);
    }

    /// Write records of what each replica missed to the replicas that have it.
    /// With `in_flight`, objects still being written count as missed.
    fn record_missed(&self, in_flight: bool) {
        if self.alone.is_some() {
            return;
        }
        for (i, r) in self.replicas.iter().enumerate() {
            let mut names: BTreeSet<String> =
                std::mem::take(&mut self.missed.lock().expect("missed objects")[i]);
            let damaged: BTreeSet<String> =
                std::mem::take(&mut self.damaged.lock().expect("damaged objects")[i]);
            if in_flight {
                names.extend(
                    r.in_flight
                        .lock()
                        .expect("in flight")
                        .iter()
                        .filter(|n| recordable(n))
                        .cloned(),
                );
            }
            if names.is_empty() && damaged.is_empty() {
                continue;
            }
            let tagged: Vec<(String, bool)> = names
                .into_iter()
                .map(|n| (n, false))
                .chain(damaged.into_iter().map(|n| (n, true)))
                .collect();
            for part in tagged.chunks(NAMES_PER_RECORD) {
                let record = MissingRecord {
                    replica: r.spec.id.clone(),
                    created: Utc::now(),
                    objects: part
                        .iter()
                        .filter(|(_, d)| !d)
                        .map(|(n, _)| n.clone())
                        .collect(),
                    damaged: part
                        .iter()
                        .filter(|(_, d)| *d)
                        .map(|(n, _)| n.clone())
                        .collect(),
                };
                let name = format!("{RECORDS}{}/{}", r.spec.id, random_hex(16));
                let bytes = Bytes::from(encode_record(&self.key, &record));
                let mut stored = 0;
                for (j, other) in self.replicas.iter().enumerate() {
                    if j != i
                        && other.refused.is_none()
                        && other.store.put(&name, bytes.clone()).is_ok()
                    {
                        stored += 1;
                    }
                }
                if stored == 0 {
                    // Nobody took the record: keep the names for the next try.
                    tracing::warn!(
                        "could not record the {} objects replica {} missed: `ferry repair` finds them by listing",
                        part.len(),
                        r.spec.location
                    );
                    for (n, d) in part {
                        if *d {
                            self.note_damaged(i, n);
                        } else {
                            self.note_missed(i, n);
                        }
                    }
                    break;
                }
                tracing::info!(
                    replica = %r.spec.location,
                    objects = part.len(),
                    "recorded the objects replica {} is missing, for `ferry repair`",
                    r.spec.location
                );
            }
        }
    }

    /// Compare the replicas and give each what it lacks from the others
    /// (see [`RepairOptions`]).
    pub fn repair(&self, opts: RepairOptions) -> Result<RepairReport> {
        if self.alone.is_some() && !opts.dry_run {
            return Err(self.read_only("repair"));
        }
        let n = self.replicas.len();
        // Each replica's objects, or why it did not answer.
        let mut held: Vec<std::result::Result<HashMap<String, u64>, String>> = (0..n)
            .map(|i| match &self.replicas[i].refused {
                Some(why) => Err(why.clone()),
                None => Ok(HashMap::new()),
            })
            .collect();
        for prefix in REPLICATED_PREFIXES {
            for (i, listing) in self.listings(|s| s.list(prefix)).into_iter().enumerate() {
                match (listing, &mut held[i]) {
                    (Ok(items), Ok(map)) => map.extend(items),
                    (Err(e), h @ Ok(_)) => *h = Err(e.to_string()),
                    _ => {}
                }
            }
        }
        // The size most replicas give an object is its size.
        let mut sizes: HashMap<&str, BTreeMap<u64, usize>> = HashMap::new();
        for map in held.iter().flatten() {
            for (name, size) in map {
                *sizes.entry(name).or_default().entry(*size).or_default() += 1;
            }
        }
        let size_of: HashMap<&str, u64> = sizes
            .iter()
            .map(|(name, counts)| {
                let best = counts
                    .iter()
                    .max_by_key(|(_, c)| **c)
                    .map(|(s, _)| *s)
                    .unwrap_or(0);
                (*name, best)
            })
            .collect();
        // Records, from every replica that answers.
        let mut records: Vec<(String, MissingRecord)> = Vec::new();
        for (name, _) in self.union(RECORDS, |s| s.list(RECORDS), |(n, _)| n)? {
            match self
                .get_bounded(&name, MAX_RECORD_OBJECT)
                .and_then(|b| decode_record(&self.key, &name, &b))
            {
                Ok(rec) => records.push((name, rec)),
                Err(Error::Missing { .. }) => {}
                Err(e) => {
                    tracing::warn!(record = %name, error = %e, "skipping a replica record that cannot be read; the listing comparison covers it")
                }
            }
        }
        let mut report = RepairReport {
            write_quorum: self.config.write_quorum,
            replicas: Vec::with_capacity(n),
            records: records.len(),
            records_removed: 0,
            objects: size_of.len(),
        };
        for (i, r) in self.replicas.iter().enumerate() {
            if self.alone.is_some_and(|a| a != i) {
                // Read alone: the others are not looked at.
                continue;
            }
            let mut state = ReplicaState {
                id: r.spec.id.clone(),
                location: r.spec.location.clone(),
                reachable: held[i].is_ok(),
                error: held[i].as_ref().err().cloned(),
                missing: 0,
                recorded: 0,
                recorded_damaged: 0,
                copied: 0,
                copied_bytes: 0,
                failed: 0,
                damaged: 0,
            };
            let Ok(map) = &held[i] else {
                report.replicas.push(state);
                continue;
            };
            let mine = || records.iter().filter(|(_, rec)| rec.replica == r.spec.id);
            let recorded: BTreeSet<&str> = mine()
                .flat_map(|(_, rec)| rec.objects.iter().chain(&rec.damaged).map(String::as_str))
                .filter(|name| size_of.contains_key(name))
                .collect();
            let recorded_damaged: BTreeSet<&str> = mine()
                .flat_map(|(_, rec)| rec.damaged.iter().map(String::as_str))
                .filter(|name| size_of.contains_key(name))
                .collect();
            state.recorded = recorded.len();
            state.recorded_damaged = recorded_damaged.len();
            // Lacking or of another size than most replicas hold.
            let mut wanted: BTreeSet<&str> = size_of
                .iter()
                .filter(|(name, size)| map.get(**name) != Some(size))
                .map(|(name, _)| *name)
                .collect();
            state.missing = wanted.len();
            // Damage the listing cannot see is rewritten too.
            wanted.extend(recorded_damaged.iter().copied());
            if opts.read_data {
                for name in map.keys().filter(|n| content_hash(n).is_some()) {
                    match r.store.get(name) {
                        Ok(b) if sound(name, &b) => {}
                        _ => {
                            state.damaged += 1;
                            wanted.insert(name.as_str());
                        }
                    }
                }
            }
            if opts.dry_run {
                report.replicas.push(state);
                continue;
            }
            // A few copies at once: each is a GET from one store and a PUT to another.
            let names: Vec<&str> = wanted.iter().copied().collect();
            let next = AtomicU64::new(0);
            let outcome: Mutex<(usize, u64, usize)> = Mutex::default();
            std::thread::scope(|sc| {
                for _ in 0..WRITERS_PER_REPLICA {
                    sc.spawn(|| {
                        while let Some(name) =
                            names.get(next.fetch_add(1, Ordering::Relaxed) as usize)
                        {
                            let copied = self.copy_to(i, name);
                            let mut o = outcome.lock().expect("repair outcome");
                            match copied {
                                Ok(bytes) => {
                                    o.0 += 1;
                                    o.1 += bytes;
                                }
                                Err(e) => {
                                    o.2 += 1;
                                    tracing::warn!(object = %name, replica = %r.spec.location, error = %e, "could not repair");
                                }
                            }
                        }
                    });
                }
            });
            let (copied, copied_bytes, failed) = outcome.into_inner().expect("repair outcome");
            state.copied = copied;
            state.copied_bytes = copied_bytes;
            state.failed = failed;
            if state.failed == 0 {
                // Everything its records list is there now: drop them everywhere.
                for (name, _) in records.iter().filter(|(_, rec)| rec.replica == r.spec.id) {
                    if self.delete(name).is_ok() {
                        report.records_removed += 1;
                    }
                }
                self.avoided
                    .lock()
                    .expect("avoided replicas")
                    .retain(|_, set| !set.contains(&i));
            }
            report.replicas.push(state);
        }
        Ok(report)
    }

    /// Read a sound copy of `name` from a replica other than `i` and store it on `i`.
    fn copy_to(&self, i: usize, name: &str) -> Result<u64> {
        let mut last = None;
        for j in self.read_order(name).into_iter().filter(|j| *j != i) {
            match self.replicas[j].store.get(name) {
                Ok(b) if sound(name, &b) => {
                    let len = b.len() as u64;
                    self.replicas[i].store.put(name, b)?;
                    return Ok(len);
                }
                Ok(_) => {
                    last = Some(Error::corrupt(
                        name,
                        format!(
                            "on replica {}, the bytes do not match the name",
                            self.replicas[j].spec.location
                        ),
                    ))
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Missing {
            object: format!("{name} (no other replica holds a sound copy)"),
        }))
    }
}

/// The replicas behind a [`Store`]: every data method of a replicated
/// repository's store comes here.
impl Replicas for ReplicaSet {
    fn get(&self, name: &str) -> Result<Bytes> {
        self.read(name, |s| s.get(name), |b| sound(name, b))
    }

    fn get_bounded(&self, name: &str, max: u64) -> Result<Bytes> {
        self.read(name, |s| s.get_bounded(name, max), |b| sound(name, b))
    }

    fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.read(name, |s| s.get_range(name, range.clone()), |_| true)
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        self.optional(name, |s| s.size(name))
    }

    fn modified(&self, name: &str) -> Result<Option<DateTime<Utc>>> {
        self.optional(name, |s| s.modified(name))
    }

    /// A blob read from `name` did not authenticate: read it from another
    /// replica from now on, and have repair rewrite this one's copy. False when
    /// no other replica is left to try. A versioned replica first tries its
    /// object's original version, as a single store does.
    fn avoid(&self, name: &str) -> Result<bool> {
        // The replica that served this thread's last read of `name`: other
        // threads may have moved reads of it elsewhere meanwhile, and blaming
        // the replica reads go to now would blame a sound one.
        let me = self as *const ReplicaSet as usize;
        let served = SERVED.with(|s| {
            s.borrow()
                .as_ref()
                .filter(|(set, n, _)| *set == me && n == name)
                .map(|(_, _, i)| *i)
        });
        let Some(i) = served.or_else(|| self.read_order(name).first().copied()) else {
            return Ok(false);
        };
        let already = self
            .avoided
            .lock()
            .expect("avoided replicas")
            .get(name)
            .is_some_and(|set| set.contains(&i));
        if already {
            return Ok(!self.read_order(name).is_empty());
        }
        if self.replicas[i].store.recover_original(name)? {
            return Ok(true);
        }
        tracing::warn!(
            object = name,
            "{name} on replica {} holds damaged data: read from another replica, and noted for repair",
            self.replicas[i].spec.location
        );
        self.avoided
            .lock()
            .expect("avoided replicas")
            .entry(name.to_string())
            .or_default()
            .insert(i);
        self.note_damaged(i, name);
        Ok(!self.read_order(name).is_empty())
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.union(prefix, |s| s.list(prefix), |(n, _)| n)
    }

    fn list_modified(&self, prefix: &str) -> Result<Vec<(String, u64, DateTime<Utc>)>> {
        self.union(prefix, |s| s.list_modified(prefix), |(n, _, _)| n)
    }

    /// Remove an object from every replica; fails naming a replica that could
    /// not. A lock is gone when one replica removed it (the others' copies
    /// are stale by the rules of `lock.rs` once its process has ended).
    fn delete(&self, name: &str) -> Result<()> {
        let lock = name.starts_with("locks/");
        if self.alone.is_some() && !lock {
            return Err(self.read_only("deleting objects"));
        }
        let mut first = None;
        let mut removed = 0;
        for (i, r) in self.replicas.iter().enumerate() {
            if r.refused.is_some() || self.alone.is_some_and(|a| a != i) {
                continue;
            }
            match r.store.delete(name) {
                Ok(()) => removed += 1,
                Err(e) => {
                    r.went_wrong(&e);
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            Some(_) if lock && removed > 0 => Ok(()),
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Store `data` under `name` on every replica; returns when the write
    /// quorum holds it. The others go on in the background.
    fn put(&self, name: &str, data: Bytes) -> Result<()> {
        // Locks need one replica: they only hold off prune, which needs every
        // replica anyway, and a restore from the one replica left must be able
        // to take one.
        let lock = name.starts_with("locks/");
        if self.alone.is_some() && !lock {
            return Err(self.read_only(&format!("writing {name}")));
        }
        if name.starts_with("points/") {
            // What the point's own objects missed is on record before the point is.
            self.record_missed(false);
        }
        let started = Instant::now();
        let ticket = Arc::new(Ticket::default());
        let targets: Vec<usize> = (0..self.replicas.len())
            .filter(|i| self.alone.is_none_or(|a| a == *i))
            .collect();
        let n = targets.len();
        for &i in &targets {
            let r = &self.replicas[i];
            let len = data.len() as u64;
            let queued = r.backlog.load(Ordering::Relaxed);
            let skip = match &r.refused {
                Some(why) => Some(why.clone()),
                None if queued > 0 && queued + len > BACKLOG_BYTES => Some(format!(
                    "{} is {} MiB behind the others; the object is recorded for repair",
                    r.spec.location,
                    queued >> 20
                )),
                None => None,
            };
            if let Some(why) = skip {
                self.note_missed(i, name);
                ticket.finish(Err(why));
                continue;
            }
            r.backlog.fetch_add(len, Ordering::Relaxed);
            r.in_flight
                .lock()
                .expect("in flight")
                .insert(name.to_string());
            let job = Job {
                name: name.to_string(),
                data: data.clone(),
                ticket: ticket.clone(),
            };
            if self.writer(i).send(job).is_err() {
                r.backlog.fetch_sub(len, Ordering::Relaxed);
                self.note_missed(i, name);
                ticket.finish(Err(format!("{}: its writers stopped", r.spec.location)));
            }
        }
        let quorum = if lock { 1 } else { self.config.write_quorum };
        let mut st = ticket.state.lock().expect("ticket");
        while st.stored < quorum && n - st.failed >= quorum {
            st = ticket.done.wait(st).expect("ticket");
        }
        let outcome = if st.stored >= quorum {
            Ok(())
        } else {
            Err(Error::Quorum {
                object: name.to_string(),
                stored: st.stored,
                needed: quorum,
                detail: st.errors.join("; "),
            })
        };
        drop(st);
        let mut waits = self.waits.lock().expect("write waits");
        if waits.len() < LATENCY_SAMPLES {
            waits.push(started.elapsed().as_micros() as u64);
        }
        drop(waits);
        if self
            .missed
            .lock()
            .expect("missed objects")
            .iter()
            .map(BTreeSet::len)
            .sum::<usize>()
            >= RECORD_EVERY
        {
            self.record_missed(false);
        }
        outcome
    }

    fn requests(&self) -> Requests {
        let mut sum = Requests::default();
        for r in &self.replicas {
            let q = r.store.requests();
            sum.puts += q.puts;
            sum.gets += q.gets;
            sum.lists += q.lists;
            sum.deletes += q.deletes;
            sum.retries += q.retries;
            sum.bytes_up += q.bytes_up;
            sum.bytes_down += q.bytes_down;
        }
        sum
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The replica set behind `store`, when its repository is replicated.
pub fn of(store: &Store) -> Option<&ReplicaSet> {
    store.replicated_by()?.as_any().downcast_ref()
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        // Best effort: what is known missed goes on record; what is still in
        // flight is found by the next repair's listing.
        self.record_missed(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KdfParams;
    use crate::progress::Progress;
    use crate::repo::{InitOptions, Repository};
    use crate::sink::MemSink;
    use crate::testing::backup_bytes;

    fn kdf() -> KdfParams {
        KdfParams {
            memory_kib: 64,
            iterations: 1,
            ..KdfParams::default()
        }
    }

    fn mem(name: &str) -> Store {
        Store::new(
            Arc::new(object_store::memory::InMemory::new()),
            format!("memory:{name}"),
        )
    }

    /// A store every request to which fails (its root is a file, not a directory).
    fn broken(location: &str, dir: &tempfile::TempDir) -> Store {
        let file = dir.path().join("not-a-directory");
        std::fs::write(&file, b"x").unwrap();
        let inner = object_store::local::LocalFileSystem::new_with_prefix(&file).unwrap();
        Store::new(Arc::new(inner), location)
    }

    struct Three {
        stores: Vec<Store>,
        dir: tempfile::TempDir,
    }

    impl Three {
        fn new() -> Three {
            let stores = vec![mem("a"), mem("b"), mem("c")];
            Repository::init(
                stores[0].clone(),
                b"pw",
                InitOptions {
                    kdf: kdf(),
                    replicas: vec![stores[1].clone(), stores[2].clone()],
                    write_quorum: Some(2),
                    ..InitOptions::default()
                },
            )
            .unwrap();
            Three {
                stores,
                dir: tempfile::tempdir().unwrap(),
            }
        }

        /// Open through replica a, with the replicas in `down` failing every
        /// request, and (with `alone`) reading one replica only.
        fn open(&self, down: &[usize], alone: Option<&str>) -> Repository {
            let stores = self.stores.clone();
            let down: Vec<usize> = down.to_vec();
            let broken_stores: Vec<Store> = (0..3)
                .map(|i| broken(stores[i].location(), &self.dir))
                .collect();
            let opener: crate::store::Opener = Arc::new(move |loc: &str| {
                let i = stores.iter().position(|s| s.location() == loc).unwrap();
                Ok(if down.contains(&i) {
                    broken_stores[i].clone()
                } else {
                    stores[i].clone()
                })
            });
            let first = self.stores[0]
                .clone()
                .with_opener(opener)
                .with_read_replica(alone.map(str::to_string));
            Repository::open(first, b"pw").unwrap()
        }
    }

    fn restore(repo: &Repository, point: &str, len: usize) -> Vec<u8> {
        let p = repo.load_point(point).unwrap();
        let sink = MemSink::new(len as u64);
        crate::restore::restore_into(repo, &p, 0, &sink, &Progress::default()).unwrap();
        sink.bytes()
    }

    fn data(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect()
    }

    #[test]
    fn a_failed_replica_is_recorded_and_repair_fills_it() {
        let t = Three::new();
        let disk = data(1, 3 << 20);
        let point = {
            let repo = t.open(&[2], None);
            let p = backup_bytes(&repo, &disk);
            // Repair cannot reach it yet: the records stay.
            let set = of(&repo.store).unwrap();
            let r = set.repair(RepairOptions::default()).unwrap();
            assert!(!r.replicas[2].reachable, "{r:?}");
            assert_eq!(r.records_removed, 0);
            p.id
        };
        // Replica c lacks what it missed, and the records on a and b say so.
        let repo = t.open(&[], None);
        let set = of(&repo.store).unwrap();
        let dry = set
            .repair(RepairOptions {
                dry_run: true,
                ..Default::default()
            })
            .unwrap();
        assert!(!dry.in_sync());
        assert!(dry.replicas[2].missing > 0, "{dry:?}");
        assert!(
            dry.replicas[2].recorded >= dry.replicas[2].missing,
            "{dry:?}"
        );
        assert_eq!((dry.replicas[0].missing, dry.replicas[1].missing), (0, 0));
        assert!(t.stores[2].list("points/").unwrap().is_empty());
        let done = set.repair(RepairOptions::default()).unwrap();
        assert_eq!(done.replicas[2].copied, dry.replicas[2].missing);
        assert!(done.records_removed > 0);
        let after = set
            .repair(RepairOptions {
                dry_run: true,
                read_data: true,
            })
            .unwrap();
        assert!(after.in_sync(), "{after:?}");
        assert_eq!(after.records, 0);
        // Each replica alone restores the point.
        for alone in ["memory:a", "memory:b", "memory:c"] {
            let repo = t.open(&[], Some(alone));
            assert_eq!(restore(&repo, &point, disk.len()), disk, "{alone}");
        }
    }

    #[test]
    fn without_the_quorum_a_backup_fails_and_commits_nothing() {
        let t = Three::new();
        let repo = t.open(&[1, 2], None);
        let err = crate::backup::backup_sources(
            &repo,
            &crate::testing::vm_backup(),
            &[&crate::source::MemSource(data(2, 1 << 20))],
            &Progress::default(),
        )
        .unwrap_err();
        // The store that works may or may not have answered when the two
        // that fail made the quorum impossible.
        assert!(
            matches!(
                err,
                Error::Quorum {
                    stored: 0 | 1,
                    needed: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.retry(), Retry::Transient);
        let repo = t.open(&[], None);
        assert!(repo.store.list("points/").unwrap().is_empty());
    }

    #[test]
    fn reads_fall_over_from_damage_and_repair_rewrites_it() {
        let t = Three::new();
        let disk = data(3, 2 << 20);
        let repo = t.open(&[], None);
        let point = backup_bytes(&repo, &disk).id;
        of(&repo.store).unwrap().settle(Duration::from_secs(5));
        // Rot every pack of replica a, keeping its size.
        for (name, _) in t.stores[0].list("packs/").unwrap() {
            let mut b = t.stores[0].get(&name).unwrap().to_vec();
            let mid = b.len() / 2;
            b[mid] ^= 0x5a;
            t.stores[0].put(&name, b.into()).unwrap();
        }
        let repo = t.open(&[], None);
        assert_eq!(restore(&repo, &point, disk.len()), disk);
        let set = of(&repo.store).unwrap();
        let found = set
            .repair(RepairOptions {
                dry_run: true,
                read_data: true,
            })
            .unwrap();
        let packs = t.stores[0].list("packs/").unwrap().len();
        assert_eq!(found.replicas[0].damaged, packs, "{found:?}");
        assert_eq!(found.replicas[0].missing, 0);
        set.repair(RepairOptions {
            dry_run: false,
            read_data: true,
        })
        .unwrap();
        let repo_a = t.open(&[], Some("memory:a"));
        assert_eq!(restore(&repo_a, &point, disk.len()), disk);
    }

    #[test]
    fn prune_and_forget_need_every_replica_and_alone_is_read_only() {
        let t = Three::new();
        let repo = t.open(&[], None);
        backup_bytes(&repo, &data(4, 1 << 20));
        let repo = t.open(&[2], None);
        let err = crate::prune::prune(&repo, Default::default()).unwrap_err();
        assert!(
            err.to_string().contains("prune needs every replica"),
            "{err}"
        );
        let alone = t.open(&[], Some("memory:b"));
        let err = alone
            .store
            .put("points/x", Bytes::from_static(b"x"))
            .unwrap_err();
        assert!(err.to_string().contains("--read-replica"), "{err}");
    }

    #[test]
    fn config_rules() {
        let spec = |id: &str, loc: &str| ReplicaSpec {
            id: id.into(),
            location: loc.into(),
            lock: None,
        };
        let ok = ReplicaConfig {
            write_quorum: 2,
            replicas: vec![
                spec("0011223344556677", "a"),
                spec("8899aabbccddeeff", "b"),
                spec("0123456789abcdef", "c"),
            ],
        };
        ok.validate().unwrap();
        assert_eq!(ok.listing_quorum(), 2);
        let mut bad = ok.clone();
        bad.write_quorum = 4;
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.replicas[1].location = "a".into();
        assert!(bad.validate().is_err());
        let mut bad = ok;
        bad.replicas.truncate(1);
        assert!(bad.validate().is_err());
    }
}
