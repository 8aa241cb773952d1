//! A synchronous face on an `object_store` store: bounded retries with backoff,
//! timeouts, short-read detection, request accounting, and (where the store has
//! them) versioning and Object Lock retention.
//!
//! The data plane runs its CPU stages on plain threads; this wrapper owns a small
//! tokio runtime and blocks on each request, so IO threads overlap CPU threads
//! without the pipeline itself being async.
//!
//! Retries: every request is retried on transient failures (server errors,
//! throttling, resets, timeouts, short bodies) up to [`RetryPolicy::attempts`]
//! times with exponential backoff and full jitter. Retrying a put is safe because
//! every object Ferry writes is either content-addressed or written once under a
//! fresh random name: a put that landed but whose answer was lost is repeated with
//! the same bytes. Permanent failures (not found, access denied, a full disk, an
//! object shorter than asked for) are not retried.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use futures::future::BoxFuture;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, GetOptions, GetRange, MultipartId, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, WriteMultipart,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, Retry};
pub use crate::retry::{NoAnswer, ServerAnswer, ShortBody, TimedOut, retry_of};

/// Objects at least this large are uploaded in parts, but for packs: a pack
/// built in memory (at most `pack::IN_MEMORY_PACK`) is one PUT, one request;
/// larger packs are built in files and go up in parts through
/// [`Store::put_file`]. Either way the object appears whole or not at all.
pub const MULTIPART_THRESHOLD: usize = 64 << 20;
/// Part size of multipart uploads.
pub const PART_SIZE: usize = 16 << 20;
/// Parts of one [`Store::put_file`] upload in flight at once. A backup has two
/// uploaders, so at most four parts (64 MiB) are in memory: what four packs
/// of the default 16 MiB held before packs were spilled to files.
pub const FILE_PARTS_IN_FLIGHT: usize = 2;
/// The largest piece of a put's payload. A directory store writes each piece
/// with one `write` call; on the project's machines (Linux 6.18, ext4 with
/// large folios, a VM whose free memory goes back to its host) writes of 1 MiB
/// and more cost the kernel four to six times the CPU of writes of 256 KiB and
/// less (`dd` of 1.2 GB: 2.1 to 3.0 s of system time at 1 and 4 MiB, 0.47 to
/// 0.49 s at 256 KiB and 64 KiB), and a pack went down in one write. Splitting copies
/// nothing: the pieces are slices of the same buffer, and an HTTP store sends
/// them as one body.
pub const WRITE_PIECE: usize = 256 << 10;

/// A request to `object` that did not finish within `after`: transient.
fn timed_out(object: &str, after: Duration) -> object_store::Error {
    object_store::Error::Generic {
        store: "ferry",
        source: Box::new(TimedOut {
            object: object.to_string(),
            after,
        }),
    }
}

/// `data` as a payload of pieces of at most [`WRITE_PIECE`] bytes.
fn payload(data: &Bytes) -> PutPayload {
    (0..data.len())
        .step_by(WRITE_PIECE)
        .map(|at| data.slice(at..(at + WRITE_PIECE).min(data.len())))
        .collect()
}

/// Versions of one object read, newest first, looking for its original.
const MAX_VERSIONS_TRIED: usize = 8;

/// Requests and bytes, for summaries and cost accounting.
#[derive(Debug, Default)]
pub struct Counters {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub lists: AtomicU64,
    pub deletes: AtomicU64,
    pub retries: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Requests {
    pub puts: u64,
    pub gets: u64,
    pub lists: u64,
    pub deletes: u64,
    /// Requests that failed transiently and were sent again (not counted above).
    pub retries: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// How requests are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Tries per request, the first included.
    pub attempts: u32,
    /// Backoff before the second try; doubles each time, with full jitter.
    pub base: Duration,
    /// Largest backoff.
    pub max: Duration,
    /// One request taking longer than this fails (and is retried).
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base: Duration::from_millis(50),
            max: Duration::from_secs(5),
            timeout: Duration::from_secs(120),
        }
    }
}

/// Object Lock modes, as S3 names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LockMode {
    /// Users with a special permission may shorten or remove the retention.
    Governance,
    /// Nobody, the account root included, can delete a version before it expires.
    Compliance,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }
}

/// The retention of one object version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub mode: LockMode,
    pub until: DateTime<Utc>,
}

/// One version of an object in a versioned bucket.
#[derive(Debug, Clone)]
pub struct ObjectVersion {
    pub name: String,
    pub version: String,
    pub delete_marker: bool,
    pub latest: bool,
    pub size: u64,
    pub modified: DateTime<Utc>,
}

/// Features only some stores have (S3 and compatibles): versions and Object Lock.
/// Implemented in `ferry-connectors` with the AWS SDK; names are relative to the
/// repository, like every other name in this module.
pub trait Versioned: Send + Sync + std::fmt::Debug {
    /// Whether the bucket has Object Lock enabled.
    fn lock_enabled(&self) -> BoxFuture<'_, Result<bool, object_store::Error>>;
    /// Write an object with a retention date.
    fn put_retained<'a>(
        &'a self,
        name: &'a str,
        data: Bytes,
        retention: Retention,
        storage_class: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), object_store::Error>>;
    /// Start a multipart upload of an object that will carry a retention
    /// date once completed (for packs too large for one request). Its parts
    /// follow S3's rules: every part but the last at least 5 MiB.
    fn put_retained_parts<'a>(
        &'a self,
        name: &'a str,
        retention: Retention,
        storage_class: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Arc<dyn PartedUpload>, object_store::Error>>;
    /// The retention of the current version, if it has one.
    fn retention<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Retention>, object_store::Error>>;
    /// Set a later retention date on the current version.
    fn extend<'a>(
        &'a self,
        name: &'a str,
        retention: Retention,
    ) -> BoxFuture<'a, Result<(), object_store::Error>>;
    /// Every version and delete marker under a prefix, sorted by name and, per
    /// name, newest first (the current one first).
    fn versions<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ObjectVersion>, object_store::Error>>;
    /// Remove one version for good (refused while it is locked).
    fn delete_version<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<(), object_store::Error>>;
    /// Rewrite an object in place in another storage class (keeping its bytes),
    /// with `retention` when the repository locks its objects.
    fn set_storage_class<'a>(
        &'a self,
        name: &'a str,
        class: &'a str,
        retention: Option<Retention>,
    ) -> BoxFuture<'a, Result<(), object_store::Error>>;
    /// Read one version.
    fn get_version<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
    ) -> BoxFuture<'a, Result<Bytes, object_store::Error>>;
    /// Read a byte range of one version. The default reads the whole version;
    /// stores that can should ask for the range only.
    fn get_version_range<'a>(
        &'a self,
        name: &'a str,
        version: &'a str,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, object_store::Error>> {
        Box::pin(async move {
            let all = self.get_version(name, version).await?;
            let (a, b) = (range.start as usize, range.end as usize);
            if b > all.len() || a > b {
                return Err(object_store::Error::Generic {
                    store: "ferry",
                    source: format!(
                        "{name} version {version}: asked for bytes {a}..{b} of {}",
                        all.len()
                    )
                    .into(),
                });
            }
            Ok(all.slice(a..b))
        })
    }
}

/// A multipart upload whose parts the caller numbers, from 0, so that a part
/// that failed is sent again alone and not the whole object. Sending a part
/// again under its number replaces what an earlier try left.
pub trait PartedUpload: Send + Sync {
    /// Send part `index`; every part but the last is [`PART_SIZE`].
    fn put_part(
        &self,
        index: usize,
        data: PutPayload,
    ) -> BoxFuture<'_, Result<PartId, object_store::Error>>;
    /// Join the parts into the object: `parts[i]` is what sending part `i`
    /// gave. The object appears only now, whole.
    fn complete(&self, parts: Vec<PartId>) -> BoxFuture<'_, Result<(), object_store::Error>>;
    /// Drop the upload and the parts sent (they are billed until then).
    fn abort(&self) -> BoxFuture<'_, Result<(), object_store::Error>>;
}

/// A [`PartedUpload`] through a store's own multipart API (S3, Azure, GCS).
struct StoreUpload {
    store: Arc<dyn MultipartStore>,
    path: Path,
    id: MultipartId,
}

impl PartedUpload for StoreUpload {
    fn put_part(
        &self,
        index: usize,
        data: PutPayload,
    ) -> BoxFuture<'_, Result<PartId, object_store::Error>> {
        self.store.put_part(&self.path, &self.id, index, data)
    }

    fn complete(&self, parts: Vec<PartId>) -> BoxFuture<'_, Result<(), object_store::Error>> {
        Box::pin(async move {
            self.store
                .complete_multipart(&self.path, &self.id, parts)
                .await
                .map(|_| ())
        })
    }

    fn abort(&self) -> BoxFuture<'_, Result<(), object_store::Error>> {
        self.store.abort_multipart(&self.path, &self.id)
    }
}

/// A write that never finished, which the store's listing does not show: the
/// staging file of a directory repository's put or upload whose process was
/// killed before its rename, or an object store's multipart upload never
/// completed nor aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The object it was writing, `/`-separated under the repository (for a
    /// staging file, the file's own name: `packs/ab/NAME#1234`).
    pub name: String,
    /// What the store needs besides the name to remove it: the upload's id on
    /// S3; `None` for a file.
    pub upload: Option<String>,
    /// The bytes it holds (an upload's parts so far).
    pub size: u64,
    /// Its last sign of life: a file's last write; an upload's latest part,
    /// else its start.
    pub modified: DateTime<Utc>,
}

/// A store whose unfinished writes stay behind, out of its listing: staging
/// files in directories, multipart uploads on S3. Prune removes those it
/// judges abandoned by their last sign of life and the repository's locks
/// (`prune::abandoned`).
pub trait Leftovers: Send + Sync + std::fmt::Debug {
    /// Every unfinished write of the repository's objects, whatever its age.
    /// Writes to names a repository never uses (another program's, in the same
    /// bucket) are not the repository's to list.
    fn leftovers(&self) -> BoxFuture<'_, Result<Vec<Leftover>, object_store::Error>>;
    /// Remove one that [`Leftovers::leftovers`] gave; gone already is done.
    fn remove_leftover<'a>(
        &'a self,
        leftover: &'a Leftover,
    ) -> BoxFuture<'a, Result<(), object_store::Error>>;
}

/// The directories a repository writes objects under, besides its `config`
/// (`docs/formats.md`, Objects in the store).
const REPOSITORY_DIRS: [&str; 7] = [
    "keys/",
    "packs/",
    "index/",
    "points/",
    "locks/",
    "trash/",
    "replicas/",
];

/// Whether a repository ever writes an object of this name: what
/// [`Leftovers`] may touch in a bucket it shares with others.
pub fn is_repository_name(name: &str) -> bool {
    name == "config"
        || REPOSITORY_DIRS
            .iter()
            .any(|d| name.strip_prefix(d).is_some_and(|rest| !rest.is_empty()))
}

/// Retention applied to every object a repository writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockPolicy {
    pub mode: LockMode,
    pub days: u32,
}

/// An object store plus the runtime that drives it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The same store's multipart API, where it has one: large objects then
    /// go up in numbered parts, each retried alone ([`Store::put_file`]).
    parts: Option<Arc<dyn MultipartStore>>,
    rt: Arc<tokio::runtime::Runtime>,
    location: String,
    counters: Arc<Counters>,
    retry: RetryPolicy,
    versioned: Option<Arc<dyn Versioned>>,
    lock: Option<LockPolicy>,
    storage_class: Option<String>,
    /// Index objects and points already fetched, by name, when a long-lived
    /// process asked for it: both are named by the hash of their bytes and
    /// never rewritten, so a copy stays true (a deleted one drops out of listings).
    immutable: Option<Arc<std::sync::Mutex<std::collections::HashMap<String, Bytes>>>>,
    /// Content-addressed objects whose current version is not their original
    /// (hidden by a delete marker or overwritten), with the version read instead
    /// (see [`Store::recover_original`]).
    pinned: Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    /// The replicas behind this store, for a replicated repository: every
    /// data method goes to them (see `replica.rs`).
    replicas: Option<Arc<dyn Replicas>>,
    /// Opens another store by location (the replicas a config names).
    opener: Option<Opener>,
    /// Read a replicated repository from this replica alone (id or location).
    read_replica: Option<String>,
    /// Where unfinished writes leave files the listing hides (directories).
    leftovers: Option<Arc<dyn Leftovers>>,
}

/// Where a replicated repository's store sends its data methods:
/// `replica::ReplicaSet`, above this module (the store names no replica type;
/// `replica::of` finds the set behind a store).
pub trait Replicas: Send + Sync {
    fn get(&self, name: &str) -> Result<Bytes>;
    fn get_bounded(&self, name: &str, max: u64) -> Result<Bytes>;
    fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes>;
    fn size(&self, name: &str) -> Result<Option<u64>>;
    fn modified(&self, name: &str) -> Result<Option<DateTime<Utc>>>;
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>>;
    fn list_modified(&self, prefix: &str) -> Result<Vec<(String, u64, DateTime<Utc>)>>;
    fn put(&self, name: &str, data: Bytes) -> Result<()>;
    fn delete(&self, name: &str) -> Result<()>;
    /// A blob read from `name` did not authenticate: read it elsewhere from
    /// now on; false when nowhere is left (see [`Store::recover_original`]).
    fn avoid(&self, name: &str) -> Result<bool>;
    /// Requests and bytes over every replica.
    fn requests(&self) -> Requests;
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Opens a store from a location as the user typed it.
pub type Opener = Arc<dyn Fn(&str) -> Result<Store> + Send + Sync>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.location)
    }
}

/// Whether an error, or any error it wraps, is a full disk.
pub fn is_storage_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && (io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether a read failed because the object sits in an archive class.
fn is_cold(e: &object_store::Error) -> bool {
    let text = e.to_string();
    text.contains("InvalidObjectState") || text.contains("BlobArchived")
}

fn cold(name: &str, e: &object_store::Error) -> Error {
    Error::InvalidInput(format!(
        "{name} is in an archive storage class and cannot be read until it is restored to a readable tier: on S3 run `aws s3api restore-object --key <prefix>/{name} --restore-request Days=7 ...` (Glacier takes minutes to hours), or move the packs back with `ferry tier --older-than ... --class STANDARD`; then run this again ({e})"
    ))
}

fn short_body(name: &str, want: u64, got: usize) -> object_store::Error {
    object_store::Error::Generic {
        store: "ferry",
        source: Box::new(ShortBody {
            object: name.to_string(),
            want,
            got: got as u64,
        }),
    }
}

impl Store {
    pub fn new(inner: Arc<dyn ObjectStore>, location: impl Into<String>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-io")
            .enable_all()
            .build()
            .expect("a tokio runtime can be built");
        Store {
            inner,
            parts: None,
            rt: Arc::new(rt),
            location: location.into(),
            counters: Arc::default(),
            retry: RetryPolicy::default(),
            versioned: None,
            lock: None,
            storage_class: None,
            immutable: None,
            pinned: Arc::default(),
            replicas: None,
            opener: None,
            read_replica: None,
            leftovers: None,
        }
    }

    /// The store of a replicated repository: `first` is one of its replicas,
    /// whose runtime it shares; every data method goes to the set.
    pub fn replicated(first: &Store, set: Arc<dyn Replicas>, location: impl Into<String>) -> Store {
        Store {
            inner: first.inner.clone(),
            parts: None,
            rt: first.rt.clone(),
            location: location.into(),
            counters: Arc::default(),
            retry: first.retry,
            versioned: None,
            lock: None,
            storage_class: None,
            immutable: first.immutable.clone(),
            pinned: Arc::default(),
            replicas: Some(set),
            opener: first.opener.clone(),
            read_replica: first.read_replica.clone(),
            // Each replica keeps its own; prune sweeps them one by one.
            leftovers: None,
        }
    }

    /// The replicas behind this store, when the repository is replicated
    /// (`replica::of` gives the set itself).
    pub fn replicated_by(&self) -> Option<&Arc<dyn Replicas>> {
        self.replicas.as_ref()
    }

    /// How to open the other replicas a repository's config names.
    pub fn with_opener(mut self, opener: Opener) -> Self {
        self.opener = Some(opener);
        self
    }

    pub fn opener(&self) -> Option<&Opener> {
        self.opener.as_ref()
    }

    /// Read a replicated repository from one replica alone (its id or location).
    pub fn with_read_replica(mut self, replica: Option<String>) -> Self {
        self.read_replica = replica;
        self
    }

    pub fn read_replica(&self) -> Option<&str> {
        self.read_replica.as_deref()
    }

    /// An in-memory store, for tests.
    pub fn memory() -> Self {
        Store::new(Arc::new(object_store::memory::InMemory::new()), "memory:")
    }

    /// Keep the index objects and points this store fetches (see `immutable`).
    pub fn with_immutable_cache(mut self) -> Self {
        self.immutable = Some(Arc::default());
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Give the store its versioning and Object Lock features.
    /// The store's multipart API (the same store as `inner`, whose paths
    /// it shares), for uploads whose parts are retried one by one.
    pub fn with_parts(mut self, parts: Arc<dyn MultipartStore>) -> Self {
        self.parts = Some(parts);
        self
    }

    /// Where this store's unfinished writes leave hidden files (see [`Leftovers`]).
    pub fn with_leftovers(mut self, l: Arc<dyn Leftovers>) -> Self {
        self.leftovers = Some(l);
        self
    }

    /// The unfinished writes this store keeps (see [`Leftovers`]); none where
    /// the store has no way to list them (GCS, Azure, memory) or is a set of
    /// replicas (ask each member).
    pub fn unfinished_writes(&self) -> Result<Vec<Leftover>> {
        let Some(l) = &self.leftovers else {
            return Ok(Vec::new());
        };
        let what = "unfinished writes";
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        self.retrying(what, || l.leftovers())
            .map_err(|e| self.failed(&format!("{what} in {}", self.location), e))
    }

    /// Remove one of [`Store::unfinished_writes`]; gone already is done.
    pub fn remove_unfinished(&self, leftover: &Leftover) -> Result<()> {
        let Some(l) = &self.leftovers else {
            return Ok(());
        };
        self.counters.deletes.fetch_add(1, Ordering::Relaxed);
        self.retrying(&leftover.name, || l.remove_leftover(leftover))
            .map_err(|e| self.failed(&leftover.name, e))
    }

    pub fn with_versioned(mut self, v: Arc<dyn Versioned>) -> Self {
        self.versioned = Some(v);
        self
    }

    /// Write every repository object (but `locks/` and `trash/`) with this retention.
    pub fn with_lock(mut self, lock: Option<LockPolicy>) -> Self {
        self.lock = lock;
        self
    }

    /// The storage class new packs are written in (provider names, e.g. `STANDARD_IA`).
    pub fn with_storage_class(mut self, class: Option<String>) -> Self {
        self.storage_class = class;
        self
    }

    pub fn versioned(&self) -> Option<&Arc<dyn Versioned>> {
        self.versioned.as_ref()
    }

    pub fn lock(&self) -> Option<LockPolicy> {
        self.lock
    }

    /// Run a future on the store's runtime (for connectors that set up clients).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Whether a read costs a network round trip: a cloud bucket, or a set of
    /// replicas (which may include one).
    pub fn is_remote(&self) -> bool {
        self.replicas.is_some()
            || ["s3://", "gs://", "az://", "azure://"]
                .iter()
                .any(|s| self.location.starts_with(s))
    }

    /// Where the repository lives, as the user named it.
    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn requests(&self) -> Requests {
        if let Some(set) = &self.replicas {
            return set.requests();
        }
        let c = &self.counters;
        Requests {
            puts: c.puts.load(Ordering::Relaxed),
            gets: c.gets.load(Ordering::Relaxed),
            lists: c.lists.load(Ordering::Relaxed),
            deletes: c.deletes.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
        }
    }

    /// The error of a request that failed for good: one that was still
    /// transient after every try means the store cannot be reached.
    fn failed(&self, object: &str, e: object_store::Error) -> Error {
        match retry_of(&e) {
            Retry::Transient => Error::Unreachable {
                location: self.location.clone(),
                object: object.to_string(),
                attempts: self.retry.attempts,
                source: Box::new(e),
            },
            Retry::Never => Error::store(object, e),
        }
    }

    /// Run `op` with the retry policy. `op` is called once per try.
    fn retrying<T, F, Fut>(&self, what: &str, op: F) -> Result<T, object_store::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        self.retrying_within(what, self.retry.timeout, op)
    }

    /// [`Store::retrying`] with `timeout` for each try.
    fn retrying_within<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        op: F,
    ) -> Result<T, object_store::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        self.rt
            .block_on(retry(self.retry, &self.counters, what, timeout, op))
    }

    pub fn get(&self, name: &str) -> Result<Bytes> {
        let cacheable = self
            .immutable
            .as_ref()
            .filter(|_| name.starts_with("index/") || name.starts_with("points/"));
        if let Some(c) = cacheable
            && let Some(b) = c.lock().expect("object cache").get(name)
        {
            return Ok(b.clone());
        }
        let bytes = match &self.replicas {
            Some(set) => set.get(name)?,
            None => self.get_through(name)?,
        };
        if let Some(c) = cacheable {
            c.lock()
                .expect("object cache")
                .insert(name.to_string(), bytes.clone());
        }
        Ok(bytes)
    }

    /// A whole object; on a versioned store, a content-addressed object whose
    /// current version is missing or does not hash to its name is read from its
    /// original version instead (see [`Store::recover_original`]).
    fn get_through(&self, name: &str) -> Result<Bytes> {
        if self.versioned.is_none() {
            return self.get_uncached(name);
        }
        if let Some(version) = self.pinned_version(name) {
            return self.get_version(name, &version);
        }
        let Some(hash) = content_hash(name) else {
            return self.get_uncached(name);
        };
        match self.get_uncached(name) {
            Ok(bytes) if blake3::hash(&bytes).to_hex().as_str() == hash => Ok(bytes),
            Ok(bytes) => {
                match self.original_version(name, &hash, "does not match its name (overwritten)")? {
                    Some((_, original)) => Ok(original),
                    None => Ok(bytes),
                }
            }
            Err(e @ Error::Missing { .. }) => match self.original_version(
                name,
                &hash,
                "is missing or hidden by a delete marker",
            )? {
                Some((_, original)) => Ok(original),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn pinned_version(&self, name: &str) -> Option<String> {
        self.pinned
            .lock()
            .expect("pinned versions")
            .get(name)
            .cloned()
    }

    /// Find the newest version of content-addressed `name` whose bytes hash to
    /// its name, pin it (later reads of `name` go to it) and warn; `None` when
    /// there is none, or the store cannot list versions (read-only credentials
    /// without `s3:ListBucketVersions`, a store without versioning).
    fn original_version(
        &self,
        name: &str,
        hash: &str,
        why: &str,
    ) -> Result<Option<(String, Bytes)>> {
        let mut versions: Vec<ObjectVersion> = match self.versions(name) {
            Ok(v) => v
                .into_iter()
                .filter(|v| v.name == name && !v.delete_marker)
                .collect(),
            Err(e) => {
                tracing::debug!(object = name, error = %e, "cannot list versions");
                return Ok(None);
            }
        };
        versions.sort_by(|a, b| b.modified.cmp(&a.modified).then(b.latest.cmp(&a.latest)));
        // Each try reads a whole version: an object with a long history planted
        // under a Ferry name costs at most this many reads.
        for v in versions.into_iter().take(MAX_VERSIONS_TRIED) {
            let bytes = match self.get_version(name, &v.version) {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(object = name, version = %v.version, error = %e, "cannot read a version");
                    continue;
                }
            };
            if blake3::hash(&bytes).to_hex().as_str() == hash {
                tracing::warn!(
                    object = name,
                    version = %v.version,
                    written = %v.modified,
                    "{name} {why}; reading its original version {} (written {}) instead. Someone with write access to the bucket changed it: run `ferry undelete` with write credentials to repair it, and review who can write to the bucket",
                    v.version,
                    v.modified.format("%Y-%m-%d %H:%M:%S UTC"),
                );
                self.pinned
                    .lock()
                    .expect("pinned versions")
                    .insert(name.to_string(), v.version.clone());
                return Ok(Some((v.version, bytes)));
            }
        }
        Ok(None)
    }

    /// After a read of content-addressed `name` failed authentication: on a
    /// versioned store, find its original version (the one whose bytes hash to
    /// its name; an older version that authenticates is the original, since the
    /// name is the hash of the bytes Ferry wrote) and read it from then on.
    /// True when reads of `name` go to its original version (found now or before).
    pub fn recover_original(&self, name: &str) -> Result<bool> {
        if let Some(set) = &self.replicas {
            // Another replica's copy, or this replica's original version.
            return set.avoid(name);
        }
        if self.versioned.is_none() {
            return Ok(false);
        }
        if self.pinned_version(name).is_some() {
            return Ok(true);
        }
        let Some(hash) = content_hash(name) else {
            return Ok(false);
        };
        Ok(self
            .original_version(name, &hash, "fails authentication (overwritten?)")?
            .is_some())
    }

    /// On a versioned store, points or index objects under `prefix` whose
    /// current version is a delete marker over an older version: Ferry removes
    /// every version when it deletes, so only someone else hid these.
    fn hidden(&self, prefix: &str) -> Vec<(String, u64)> {
        // Not packs/: every backup lists it to find unindexed packs, and a hidden
        // pack that an index lists is found by `recover_original` when it is read.
        if self.versioned.is_none() || !(prefix == "points/" || prefix == "index/") {
            return Vec::new();
        }
        let versions = match self.versions(prefix) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(prefix, error = %e, "cannot list versions");
                return Vec::new();
            }
        };
        let mut by_name: std::collections::BTreeMap<&str, Vec<&ObjectVersion>> = Default::default();
        for v in &versions {
            by_name.entry(v.name.as_str()).or_default().push(v);
        }
        by_name
            .into_iter()
            .filter(|(name, _)| content_hash(name).is_some())
            .filter(|(_, vs)| vs.iter().any(|v| v.latest && v.delete_marker))
            .filter_map(|(name, vs)| {
                vs.iter()
                    .filter(|v| !v.delete_marker)
                    .max_by_key(|v| v.modified)
                    .map(|v| (name.to_string(), v.size))
            })
            .collect()
    }

    fn get_uncached(&self, name: &str) -> Result<Bytes> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(name);
        let bytes = self
            .retrying(name, || async {
                let r = self.inner.get(&path).await?;
                let want = r.range.end - r.range.start;
                let bytes = r.bytes().await?;
                if bytes.len() as u64 != want {
                    return Err(short_body(name, want, bytes.len()));
                }
                Ok(bytes)
            })
            .map_err(|e| self.failed(name, e))?;
        self.counters
            .bytes_down
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Read a whole object of at most `max` bytes. The size the store states is
    /// checked before any of the body is read, and the body is collected only up
    /// to it, so a planted giant costs a refused request, not its size in memory.
    /// A larger object is damage named after it ([`Error::Corrupt`]).
    pub fn get_bounded(&self, name: &str, max: u64) -> Result<Bytes> {
        let cacheable = self
            .immutable
            .as_ref()
            .filter(|_| name.starts_with("index/") || name.starts_with("points/"));
        if let Some(c) = cacheable
            && let Some(b) = c.lock().expect("object cache").get(name)
        {
            return Ok(b.clone());
        }
        let bytes = match &self.replicas {
            Some(set) => set.get_bounded(name, max)?,
            None => self.bounded_through(name, max)?,
        };
        if let Some(c) = cacheable {
            c.lock()
                .expect("object cache")
                .insert(name.to_string(), bytes.clone());
        }
        Ok(bytes)
    }

    /// A bounded whole object; on a versioned store, a content-addressed one
    /// read through tampering exactly as `get` reads it (see `get_through`).
    fn bounded_through(&self, name: &str, max: u64) -> Result<Bytes> {
        Ok(match (self.versioned.is_some(), content_hash(name)) {
            (true, Some(hash)) => match self.pinned_version(name) {
                Some(version) => self.get_version(name, &version)?,
                None => match self.fetch_bounded(name, max) {
                    Ok(b) if blake3::hash(&b).to_hex().as_str() == hash => b,
                    Ok(b) => match self.original_version(
                        name,
                        &hash,
                        "does not match its name (overwritten)",
                    )? {
                        Some((_, original)) => original,
                        None => b,
                    },
                    Err(e @ (Error::Missing { .. } | Error::Corrupt { .. })) => {
                        match self.original_version(
                            name,
                            &hash,
                            "is missing, hidden by a delete marker or too large",
                        )? {
                            Some((_, original)) => original,
                            None => return Err(e),
                        }
                    }
                    Err(e) => return Err(e),
                },
            },
            _ => self.fetch_bounded(name, max)?,
        })
    }

    /// The bounded read itself: no cache, no read-through.
    fn fetch_bounded(&self, name: &str, max: u64) -> Result<Bytes> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(name);
        let fetched = self.retrying(name, || async {
            let r = self.inner.get(&path).await?;
            let want = r.range.end - r.range.start;
            if want > max {
                // Dropping the response leaves the body unread.
                return Ok(Err(want));
            }
            let mut body = bytes::BytesMut::with_capacity(want as usize);
            let mut stream = r.into_stream();
            while let Some(part) = stream.try_next().await? {
                if (body.len() + part.len()) as u64 > want {
                    return Err(short_body(name, want, body.len() + part.len()));
                }
                body.extend_from_slice(&part);
            }
            if body.len() as u64 != want {
                return Err(short_body(name, want, body.len()));
            }
            Ok(Ok(body.freeze()))
        });
        let bytes = match fetched {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(size)) => {
                return Err(Error::corrupt(
                    name,
                    format!(
                        "it is {size} bytes, more than the {max} bytes such an object may be, so it was not read; Ferry never writes one this large: restore it from another replica of the repository, or remove it"
                    ),
                ));
            }
            Err(e) => return Err(self.failed(name, e)),
        };
        self.counters
            .bytes_down
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// When the store last wrote an object, by the store's clock (not this
    /// host's), or `None` when there is no such object.
    pub fn modified(&self, name: &str) -> Result<Option<DateTime<Utc>>> {
        if let Some(set) = &self.replicas {
            return set.modified(name);
        }
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(name);
        match self.retrying(name, || self.inner.head(&path)) {
            Ok(meta) => Ok(Some(meta.last_modified)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed(name, e)),
        }
    }

    pub fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        if let Some(set) = &self.replicas {
            return set.get_range(name, range);
        }
        if self.versioned.is_some() {
            if let Some(version) = self.pinned_version(name) {
                return self.get_version_range(name, &version, range);
            }
            return match self.get_range_current(name, range.clone()) {
                Err(e @ Error::Missing { .. }) => match content_hash(name) {
                    Some(hash)
                        if self
                            .original_version(
                                name,
                                &hash,
                                "is missing or hidden by a delete marker",
                            )?
                            .is_some() =>
                    {
                        self.get_range(name, range)
                    }
                    _ => Err(e),
                },
                other => other,
            };
        }
        self.get_range_current(name, range)
    }

    fn get_range_current(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(name);
        let want = range.end - range.start;
        let fetched = self.retrying(name, || async {
            let opts = GetOptions {
                range: Some(GetRange::Bounded(range.clone())),
                ..GetOptions::default()
            };
            let r = self.inner.get_opts(&path, opts).await?;
            if r.meta.size < range.end {
                // The object itself is short: trying again will not help.
                return Ok(Err(r.meta.size));
            }
            let bytes = r.bytes().await?;
            if bytes.len() as u64 != want {
                return Err(short_body(name, want, bytes.len()));
            }
            Ok(Ok(bytes))
        });
        let bytes = match fetched {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(size)) => {
                return Err(Error::corrupt(
                    name,
                    format!(
                        "asked for bytes {}..{}, but the object has only {size} bytes (truncated?)",
                        range.start, range.end
                    ),
                ));
            }
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::Missing {
                    object: name.to_string(),
                });
            }
            Err(e) if is_cold(&e) => return Err(cold(name, &e)),
            Err(e) if retry_of(&e) == Retry::Never => {
                // Stores answer a range past the end with an error of their own.
                return Err(match self.size(name) {
                    Ok(Some(size)) if size < range.end => Error::corrupt(
                        name,
                        format!(
                            "asked for bytes {}..{}, but the object has only {size} bytes (truncated?)",
                            range.start, range.end
                        ),
                    ),
                    _ => self.failed(name, e),
                });
            }
            Err(e) => return Err(self.failed(name, e)),
        };
        self.counters
            .bytes_down
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Write a whole object. Stores make a put atomic: readers see all or nothing.
    /// In a repository with Object Lock, everything but `locks/` and `trash/` (Ferry's
    /// own bookkeeping, which it must be able to delete) is written with
    /// the repository's retention.
    pub fn put(&self, name: &str, data: Bytes) -> Result<()> {
        if let Some(set) = &self.replicas {
            return set.put(name, data);
        }
        self.put_inner(name, data).map_err(|e| match e {
            // A write cannot miss its object: the bucket or container is missing.
            Error::Missing { .. } => Error::InvalidInput(format!(
                "cannot write {name} to {}: the store answered \"not found\"; check that the bucket or container exists",
                self.location
            )),
            e => e,
        })
    }

    /// The versioned side and the retention a new object named `name` gets,
    /// when the repository locks its objects (all but `locks/`, `trash/` and
    /// `replicas/`, which Ferry must be able to delete).
    fn retention_for(&self, name: &str) -> Option<(&Arc<dyn Versioned>, Retention)> {
        let (Some(lock), Some(v)) = (self.lock, &self.versioned) else {
            return None;
        };
        if name.starts_with("locks/") || name.starts_with("trash/") || name.starts_with("replicas/")
        {
            return None;
        }
        let until = Utc::now() + chrono::Duration::days(i64::from(lock.days));
        Some((
            v,
            Retention {
                mode: lock.mode,
                until,
            },
        ))
    }

    fn put_inner(&self, name: &str, data: Bytes) -> Result<()> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_up
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let path = Path::from(name);
        let class = self
            .storage_class
            .as_deref()
            .filter(|_| name.starts_with("packs/"));
        if let Some((v, retention)) = self.retention_for(name) {
            return self
                .retrying(name, || {
                    v.put_retained(name, data.clone(), retention, class)
                })
                .map_err(|e| self.failed(name, e));
        }
        let mut attributes = Attributes::new();
        if let Some(class) = class {
            attributes.insert(Attribute::StorageClass, class.to_string().into());
        }
        self.retrying(name, || async {
            if data.len() >= MULTIPART_THRESHOLD && !name.starts_with("packs/") {
                let upload = self.inner.put_multipart(&path).await?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                w.put(data.clone());
                w.finish().await?;
            } else {
                let opts = PutOptions {
                    attributes: attributes.clone(),
                    ..PutOptions::default()
                };
                self.inner.put_opts(&path, payload(&data), opts).await?;
            }
            Ok(())
        })
        .map_err(|e| self.failed(name, e))
    }

    /// Write a whole object from the first `len` bytes of `file` (a spilled
    /// pack), atomic like [`Store::put`]. The object must be named by its
    /// content, like a pack: an upload whose completion was answered with an
    /// error counts as done when an object of `len` bytes is found under the
    /// name (the answer was lost).
    ///
    /// It is uploaded in parts of [`PART_SIZE`], read from the file as they
    /// go, at most [`FILE_PARTS_IN_FLIGHT`] at once, so memory stays near
    /// that and not the object's size. Every part and the two requests that
    /// open and complete the upload count as puts (retries are counted as
    /// retries). Where the store has a multipart API,
    /// or the repository locks its objects (the upload is then started with
    /// the retention, [`Versioned::put_retained_parts`], so the object is
    /// locked from the moment it appears), each part is retried alone, each
    /// try held to a single request's timeout; when a part or the completion
    /// fails for good, the upload is aborted. A store without one (a
    /// directory) sends the upload again whole. Objects of one part, and puts
    /// to replicated repositories (which send one payload to every replica),
    /// read the file whole.
    pub fn put_file(&self, name: &str, file: &std::fs::File, len: u64) -> Result<()> {
        let whole = len <= PART_SIZE as u64 || self.replicas.is_some();
        if whole {
            let data = read_part(file, name, 0, len as usize).map_err(|e| Error::Spill {
                path: crate::spill::spill_dir(),
                source: e,
            })?;
            return self.put(name, data);
        }
        let parts = len.div_ceil(PART_SIZE as u64);
        self.counters.puts.fetch_add(parts + 2, Ordering::Relaxed);
        self.counters.bytes_up.fetch_add(len, Ordering::Relaxed);
        let path = Path::from(name);
        let class = self
            .storage_class
            .as_deref()
            .filter(|_| name.starts_with("packs/"));
        let mut attributes = Attributes::new();
        if let Some(class) = class {
            attributes.insert(Attribute::StorageClass, class.to_string().into());
        }
        let opts = PutMultipartOptions {
            attributes,
            ..PutMultipartOptions::default()
        };
        // Taken once: every try keeps the date of the first.
        let retained = self.retention_for(name);
        if retained.is_none() && self.parts.is_none() {
            return self.put_file_again_whole(name, file, len, opts);
        }
        let upload: Arc<dyn PartedUpload> = self
            .retrying(name, || async {
                match (retained, &self.parts) {
                    (Some((v, retention)), _) => v.put_retained_parts(name, retention, class).await,
                    (None, Some(store)) => {
                        let id = store.create_multipart_opts(&path, opts.clone()).await?;
                        let upload: Arc<dyn PartedUpload> = Arc::new(StoreUpload {
                            store: store.clone(),
                            path: path.clone(),
                            id,
                        });
                        Ok(upload)
                    }
                    (None, None) => unreachable!("checked above"),
                }
            })
            .map_err(|e| self.failed(name, e))?;
        let sent = self.rt.block_on(async {
            let mut in_flight = tokio::task::JoinSet::new();
            let mut done: Vec<Option<PartId>> = vec![None; parts as usize];
            let mut next = 0usize;
            loop {
                if next < done.len() && in_flight.len() < FILE_PARTS_IN_FLIGHT {
                    let at = next as u64 * PART_SIZE as u64;
                    let data = read_part(file, name, at, PART_SIZE.min((len - at) as usize))
                        .map_err(|e| object_store::Error::Generic {
                            store: "ferry",
                            source: Box::new(e),
                        })?;
                    let (upload, counters) = (upload.clone(), self.counters.clone());
                    let (policy, what) = (self.retry, format!("{name} (part {})", next + 1));
                    let index = next;
                    in_flight.spawn(async move {
                        let sent = retry(policy, &counters, &what, policy.timeout, || {
                            upload.put_part(index, PutPayload::from(data.clone()))
                        })
                        .await;
                        (index, sent)
                    });
                    next += 1;
                    continue;
                }
                match in_flight.join_next().await {
                    Some(joined) => {
                        let (index, sent) =
                            joined.map_err(|source| object_store::Error::JoinError { source })?;
                        done[index] = Some(sent?);
                    }
                    None => break,
                }
            }
            let done: Vec<PartId> = done
                .into_iter()
                .map(|p| p.expect("every part sent"))
                .collect();
            let timeout = self.retry.timeout;
            retry(self.retry, &self.counters, name, timeout, || {
                upload.complete(done.clone())
            })
            .await
        });
        let Err(error) = sent else { return Ok(()) };
        // A completion whose answer was lost made the object; trying it again
        // finds no upload. The name is the content's: one of `len` bytes is it.
        if let Ok(Some(size)) = self.size(name)
            && size == len
        {
            tracing::debug!(object = name, %error, "the upload failed, but its object is there");
            return Ok(());
        }
        let timeout = self.retry.timeout;
        match self
            .rt
            .block_on(async { tokio::time::timeout(timeout, upload.abort()).await })
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(object = name, error = %e, "aborting the upload failed"),
            Err(_) => tracing::debug!(object = name, ?timeout, "aborting the upload timed out"),
        }
        Err(self.failed(name, error))
    }

    /// [`Store::put_file`] for a store without a multipart API of its own (a
    /// directory): `object_store` numbers the parts as they are sent, so a
    /// part that fails cannot be sent again alone; the upload is aborted and
    /// sent again whole, within a request's timeout for every round of parts
    /// in flight.
    fn put_file_again_whole(
        &self,
        name: &str,
        file: &std::fs::File,
        len: u64,
        opts: PutMultipartOptions,
    ) -> Result<()> {
        let path = Path::from(name);
        let parts = len.div_ceil(PART_SIZE as u64);
        let rounds = parts.div_ceil(FILE_PARTS_IN_FLIGHT as u64) + 1;
        let timeout = self.retry.timeout.saturating_mul(rounds as u32);
        // Parts that are not completed into an object are kept until the
        // upload is aborted: every failure and the timeout abort it.
        self.retrying_within(name, timeout + self.retry.timeout, || async {
            let mut upload = self.inner.put_multipart_opts(&path, opts.clone()).await?;
            let sent = tokio::time::timeout(timeout, async {
                let mut in_flight = tokio::task::JoinSet::new();
                let mut at = 0;
                while at < len || !in_flight.is_empty() {
                    if at < len && in_flight.len() < FILE_PARTS_IN_FLIGHT {
                        let part = read_part(file, name, at, PART_SIZE.min((len - at) as usize))
                            .map_err(|e| object_store::Error::Generic {
                                store: "ferry",
                                source: Box::new(e),
                            })?;
                        at += part.len() as u64;
                        in_flight.spawn(upload.put_part(PutPayload::from(part)));
                        continue;
                    }
                    if let Some(done) = in_flight.join_next().await {
                        done.map_err(|source| object_store::Error::JoinError { source })??;
                    }
                }
                upload.complete().await.map(|_| ())
            })
            .await;
            let error = match sent {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e,
                Err(_) => timed_out(name, timeout),
            };
            if let Err(e) = upload.abort().await {
                tracing::debug!(object = name, error = %e, "aborting the upload failed");
            }
            Err(error)
        })
        .map_err(|e| self.failed(name, e))
    }

    /// Whether an object exists.
    pub fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.size(name)?.is_some())
    }

    /// The size of an object, or `None` when there is none.
    pub fn size(&self, name: &str) -> Result<Option<u64>> {
        if let Some(set) = &self.replicas {
            return set.size(name);
        }
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(name);
        match self.retrying(name, || self.inner.head(&path)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed(name, e)),
        }
    }

    /// Every object under `prefix`, with its size.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        if let Some(set) = &self.replicas {
            return set.list(prefix);
        }
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(prefix);
        let metas: Vec<_> = self
            .retrying(prefix, || {
                self.inner.list(Some(&path)).try_collect::<Vec<_>>()
            })
            .map_err(|e| self.failed(prefix, e))?;
        let mut out: Vec<_> = metas
            .into_iter()
            .map(|m| (m.location.to_string(), m.size))
            .collect();
        let hidden = self.hidden(prefix);
        if !hidden.is_empty() {
            let listed: std::collections::HashSet<String> =
                out.iter().map(|(n, _)| n.clone()).collect();
            for (name, size) in hidden {
                if !listed.contains(&name) {
                    tracing::warn!(object = %name, "{name} is hidden by a delete marker; its original version is read instead (run `ferry undelete` with write credentials to repair the bucket)");
                    out.push((name, size));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every object under `prefix`, with its size and last modification time.
    pub fn list_modified(&self, prefix: &str) -> Result<Vec<(String, u64, DateTime<Utc>)>> {
        if let Some(set) = &self.replicas {
            return set.list_modified(prefix);
        }
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(prefix);
        let metas: Vec<_> = self
            .retrying(prefix, || {
                self.inner.list(Some(&path)).try_collect::<Vec<_>>()
            })
            .map_err(|e| self.failed(prefix, e))?;
        let mut out: Vec<_> = metas
            .into_iter()
            .map(|m| (m.location.to_string(), m.size, m.last_modified))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Remove an object for good. On a versioned store every version goes (a plain
    /// delete there would only hide it behind a delete marker); a version still
    /// under Object Lock is refused by the store and reported as [`Error::Locked`].
    /// Deleting what is already gone succeeds.
    pub fn delete(&self, name: &str) -> Result<()> {
        if let Some(set) = &self.replicas {
            return set.delete(name);
        }
        self.pinned.lock().expect("pinned versions").remove(name);
        if let Some(v) = &self.versioned {
            // Servers without versioning (some S3-compatibles) do not list
            // versions: a plain delete removes the object there.
            let versions = match self.versions(name) {
                Ok(versions) => versions,
                Err(Error::Store {
                    source: object_store::Error::NotImplemented { .. },
                    ..
                }) => return self.delete_plain(name),
                Err(e) => return Err(e),
            };
            for ver in versions.iter().filter(|ver| ver.name == name) {
                self.counters.deletes.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.retrying(name, || v.delete_version(&ver.name, &ver.version)) {
                    let until = self.retention(name).ok().flatten().map(|r| r.until);
                    return Err(Error::Locked {
                        object: name.to_string(),
                        until,
                        source: e,
                    });
                }
            }
            return Ok(());
        }
        self.delete_plain(name)
    }

    fn delete_plain(&self, name: &str) -> Result<()> {
        self.counters.deletes.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(name);
        match self.retrying(name, || self.inner.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed(name, e)),
        }
    }

    fn need_versioned(&self, what: &str) -> Result<&Arc<dyn Versioned>> {
        if self.replicas.is_some() {
            return Err(Error::InvalidInput(format!(
                "{what} acts on one store, and {} is a replicated repository: not available on replicated repositories yet",
                self.location
            )));
        }
        self.versioned.as_ref().ok_or_else(|| {
            Error::InvalidInput(format!(
                "{what} needs a store with versioning (an S3 bucket); {} has none",
                self.location
            ))
        })
    }

    /// Every version and delete marker under `prefix` (versioned stores only).
    pub fn versions(&self, prefix: &str) -> Result<Vec<ObjectVersion>> {
        let v = self.need_versioned("listing object versions")?;
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        self.retrying(prefix, || v.versions(prefix))
            .map_err(|e| self.failed(prefix, e))
    }

    /// Read one version of an object (versioned stores only).
    pub fn get_version(&self, name: &str, version: &str) -> Result<Bytes> {
        let v = self.need_versioned("reading an object version")?;
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let bytes = self
            .retrying(name, || v.get_version(name, version))
            .map_err(|e| self.failed(name, e))?;
        self.counters
            .bytes_down
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Read a byte range of one version (versioned stores only).
    pub fn get_version_range(&self, name: &str, version: &str, range: Range<u64>) -> Result<Bytes> {
        let v = self.need_versioned("reading an object version")?;
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let bytes = self
            .retrying(name, || v.get_version_range(name, version, range.clone()))
            .map_err(|e| self.failed(name, e))?;
        if bytes.len() as u64 != range.end - range.start {
            return Err(Error::corrupt(
                name,
                format!(
                    "version {version}: asked for bytes {}..{}, got {}",
                    range.start,
                    range.end,
                    bytes.len()
                ),
            ));
        }
        self.counters
            .bytes_down
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// The Object Lock retention of an object's current version, if any.
    pub fn retention(&self, name: &str) -> Result<Option<Retention>> {
        let Some(v) = &self.versioned else {
            return Ok(None);
        };
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        self.retrying(name, || v.retention(name))
            .map_err(|e| self.failed(name, e))
    }

    /// Move an object to another storage class (versioned stores only).
    pub fn set_storage_class(&self, name: &str, class: &str) -> Result<()> {
        let v = self.need_versioned("changing storage classes")?;
        let retention = self.lock.map(|l| Retention {
            mode: l.mode,
            until: Utc::now() + chrono::Duration::days(i64::from(l.days)),
        });
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.retrying(name, || v.set_storage_class(name, class, retention))
            .map_err(|e| self.failed(name, e))
    }

    /// Move an object's retention date later.
    pub fn extend_retention(&self, name: &str, retention: Retention) -> Result<()> {
        let v = self.need_versioned("extending retention")?;
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.retrying(name, || v.extend(name, retention))
            .map_err(|e| self.failed(name, e))
    }
}

/// The hash a content-addressed object's name promises (points, index objects
/// and packs are named by the BLAKE3 hash of their bytes), in hex.
pub(crate) fn content_hash(name: &str) -> Option<String> {
    let h = name
        .strip_prefix("points/")
        .or_else(|| name.strip_prefix("index/"))
        .or_else(|| {
            name.strip_prefix("packs/")
                .and_then(|r| r.split_once('/'))
                .map(|(_, h)| h)
        })?;
    (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then(|| h.to_ascii_lowercase())
}

/// A number in [0, 1) for backoff jitter; quality does not matter.
/// Run `op` until it succeeds, fails for good, or has had
/// [`RetryPolicy::attempts`] tries, each within `timeout`; a transient failure
/// is tried again after an exponential backoff with full jitter.
async fn retry<T, F, Fut>(
    policy: RetryPolicy,
    counters: &Counters,
    what: &str,
    timeout: Duration,
    mut op: F,
) -> Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, object_store::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = tokio::time::timeout(timeout, op())
            .await
            .unwrap_or_else(|_| Err(timed_out(what, timeout)));
        match result {
            Err(e) if attempt < policy.attempts && retry_of(&e) == Retry::Transient => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                let cap = policy
                    .base
                    .saturating_mul(1 << (attempt - 1).min(16))
                    .min(policy.max);
                let wait = cap.mul_f64(jitter());
                tracing::debug!(object = what, attempt, ?wait, error = %e, "retrying");
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

/// `n` bytes of a spilled object's `file` from `at`. A failure is not a
/// store's: it is never retried (kind `Other`).
fn read_part(file: &std::fs::File, name: &str, at: u64, n: usize) -> std::io::Result<Bytes> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; n];
    file.read_exact_at(&mut buf, at)
        .map_err(|e| std::io::Error::other(format!("reading the temporary file of {name}: {e}")))?;
    Ok(Bytes::from(buf))
}

fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::MultipartUpload;

    fn generic(source: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: Box::new(source),
        }
    }

    fn answer(status: u16) -> object_store::Error {
        generic(ServerAnswer {
            store: "test",
            status,
            code: String::new(),
        })
    }

    fn not_found() -> object_store::Error {
        object_store::Error::NotFound {
            path: "x".into(),
            source: "gone".into(),
        }
    }

    fn denied() -> object_store::Error {
        object_store::Error::PermissionDenied {
            path: "x".into(),
            source: "AccessDenied".into(),
        }
    }

    fn unauthenticated() -> object_store::Error {
        object_store::Error::Unauthenticated {
            path: "x".into(),
            source: "InvalidAccessKeyId".into(),
        }
    }

    /// A `Generic` error whose only trace of a 503 is its text.
    fn text_only() -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: "503 SlowDown: please reduce your request rate".into(),
        }
    }

    fn reset() -> object_store::Error {
        generic(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ))
    }

    fn disk_full() -> object_store::Error {
        generic(std::io::Error::new(std::io::ErrorKind::StorageFull, "full"))
    }

    #[test]
    fn a_payload_goes_in_pieces_that_share_its_buffer_and_read_back_whole() {
        let data = Bytes::from(
            (0..WRITE_PIECE * 2 + 1000)
                .map(|i| i as u8)
                .collect::<Vec<u8>>(),
        );
        let p = payload(&data);
        let lens: Vec<usize> = p.iter().map(Bytes::len).collect();
        assert_eq!(lens, vec![WRITE_PIECE, WRITE_PIECE, 1000]);
        // Slices of the one buffer, not copies.
        assert_eq!(p.iter().next().unwrap().as_ptr(), data.as_ptr());
        assert_eq!(payload(&Bytes::new()).content_length(), 0);
        assert_eq!(payload(&Bytes::from_static(b"small")).iter().count(), 1);
        let store = Store::memory();
        store.put("packs/00/x", data.clone()).unwrap();
        assert_eq!(store.get("packs/00/x").unwrap(), data);
    }

    #[test]
    fn retry_is_decided_by_type_not_text() {
        let store_err = |e| Error::Store {
            object: "packs/ab".into(),
            source: e,
        };
        for e in [answer(503), answer(500), answer(429), answer(408), reset()] {
            assert_eq!(store_err(e).retry(), Retry::Transient);
        }
        for e in [answer(400), answer(501), text_only(), disk_full()] {
            assert_eq!(store_err(e).retry(), Retry::Never);
        }
        // NotFound and refused credentials are answers, not hiccups.
        assert_eq!(Error::store("x", not_found()).retry(), Retry::Never);
        assert_eq!(Error::store("x", denied()).retry(), Retry::Never);
        assert_eq!(Error::store("x", unauthenticated()).retry(), Retry::Never);
        assert_eq!(Error::corrupt("x", "bad").retry(), Retry::Never);
        // Ferry's own causes.
        let short = generic(ShortBody {
            object: "x".into(),
            want: 10,
            got: 3,
        });
        assert_eq!(retry_of(&short), Retry::Transient);
    }

    /// An in-memory store whose multipart uploads fail their second part
    /// once (a 503) or, with `hang`, never finish it; aborts are counted.
    #[derive(Debug)]
    struct PartTrouble {
        inner: Arc<object_store::memory::InMemory>,
        hang: bool,
        failed_once: Arc<std::sync::atomic::AtomicBool>,
        aborts: Arc<AtomicU64>,
        /// Parts sent through the multipart API.
        sent: Arc<AtomicU64>,
    }

    impl std::fmt::Display for PartTrouble {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "PartTrouble")
        }
    }

    #[derive(Debug)]
    struct TroubledUpload {
        inner: Box<dyn MultipartUpload>,
        parts: u64,
        hang: bool,
        failed_once: Arc<std::sync::atomic::AtomicBool>,
        aborts: Arc<AtomicU64>,
    }

    #[async_trait::async_trait]
    impl MultipartUpload for TroubledUpload {
        fn put_part(&mut self, data: PutPayload) -> object_store::UploadPart {
            self.parts += 1;
            if self.parts == 2 {
                if self.hang {
                    return Box::pin(futures::future::pending());
                }
                if !self.failed_once.swap(true, Ordering::Relaxed) {
                    return Box::pin(async { Err(answer(503)) });
                }
            }
            self.inner.put_part(data)
        }
        async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
            self.inner.complete().await
        }
        async fn abort(&mut self) -> object_store::Result<()> {
            self.aborts.fetch_add(1, Ordering::Relaxed);
            self.inner.abort().await
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for PartTrouble {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            Ok(Box::new(TroubledUpload {
                inner: self.inner.put_multipart_opts(location, opts).await?,
                parts: 0,
                hang: self.hang,
                failed_once: self.failed_once.clone(),
                aborts: self.aborts.clone(),
            }))
        }
        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    #[test]
    fn a_file_upload_whose_part_fails_or_hangs_is_aborted_and_sent_again() {
        let len = 2 * PART_SIZE + 1000;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &data).unwrap();
        for hang in [false, true] {
            let inner = Arc::new(object_store::memory::InMemory::new());
            let aborts = Arc::new(AtomicU64::new(0));
            let troubled = PartTrouble {
                inner: inner.clone(),
                hang,
                failed_once: Arc::default(),
                aborts: aborts.clone(),
                sent: Arc::default(),
            };
            let store = Store::new(Arc::new(troubled), "troubled:").with_retry(RetryPolicy {
                attempts: 3,
                base: Duration::from_millis(1),
                max: Duration::from_millis(2),
                timeout: Duration::from_millis(300),
            });
            let r = store.put_file("packs/ab/big", &file, len as u64);
            if hang {
                // Every try hangs on its second part: each is aborted, and the
                // error says the request timed out.
                let e = r.unwrap_err();
                assert!(e.to_string().contains("packs/ab/big"), "{e}");
                assert_eq!(aborts.load(Ordering::Relaxed), 3);
                assert!(store.get("packs/ab/big").is_err());
            } else {
                r.unwrap();
                assert_eq!(aborts.load(Ordering::Relaxed), 1);
                assert_eq!(store.get("packs/ab/big").unwrap(), data);
                assert_eq!(store.requests().retries, 1);
            }
        }
    }

    /// The multipart API of [`PartTrouble`]: the second part fails once, or
    /// hangs every time.
    #[async_trait::async_trait]
    impl MultipartStore for PartTrouble {
        async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
            self.inner.create_multipart(path).await
        }
        async fn put_part(
            &self,
            path: &Path,
            id: &MultipartId,
            part_idx: usize,
            data: PutPayload,
        ) -> object_store::Result<PartId> {
            self.sent.fetch_add(1, Ordering::Relaxed);
            if part_idx == 1 {
                if self.hang {
                    return futures::future::pending().await;
                }
                if !self.failed_once.swap(true, Ordering::Relaxed) {
                    return Err(answer(503));
                }
            }
            self.inner.put_part(path, id, part_idx, data).await
        }
        async fn complete_multipart(
            &self,
            path: &Path,
            id: &MultipartId,
            parts: Vec<PartId>,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.complete_multipart(path, id, parts).await
        }
        async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
            self.aborts.fetch_add(1, Ordering::Relaxed);
            self.inner.abort_multipart(path, id).await
        }
    }

    #[test]
    fn a_part_that_fails_is_sent_again_alone_and_one_that_hangs_aborts_the_upload() {
        let len = 2 * PART_SIZE + 1000;
        let data: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &data).unwrap();
        for hang in [false, true] {
            let troubled = Arc::new(PartTrouble {
                inner: Arc::new(object_store::memory::InMemory::new()),
                hang,
                failed_once: Arc::default(),
                aborts: Arc::default(),
                sent: Arc::default(),
            });
            let store = Store::new(troubled.clone(), "troubled:")
                .with_parts(troubled.clone())
                .with_retry(RetryPolicy {
                    attempts: 3,
                    base: Duration::from_millis(1),
                    max: Duration::from_millis(2),
                    timeout: Duration::from_millis(300),
                });
            let r = store.put_file("packs/ab/big", &file, len as u64);
            let (sent, aborts) = (
                troubled.sent.load(Ordering::Relaxed),
                troubled.aborts.load(Ordering::Relaxed),
            );
            if hang {
                // The second part hangs on each of its three tries: the error
                // names the part, and the upload is aborted once.
                let e = r.unwrap_err().to_string();
                assert!(e.contains("packs/ab/big (part 2)"), "{e}");
                assert_eq!(aborts, 1);
                assert_eq!(store.requests().retries, 2);
                assert!(store.get("packs/ab/big").is_err());
            } else {
                // Three parts and the failed one again: not the whole upload.
                r.unwrap();
                assert_eq!(sent, 4);
                assert_eq!(aborts, 0);
                assert_eq!(store.requests().retries, 1);
                assert_eq!(store.get("packs/ab/big").unwrap(), data);
            }
        }
    }

    /// How many times the store's retry loop sends a request failing with `e`.
    fn tries(e: fn() -> object_store::Error) -> (u64, Error) {
        let store = Store::memory().with_retry(RetryPolicy {
            attempts: 4,
            base: Duration::from_millis(1),
            max: Duration::from_millis(2),
            timeout: Duration::from_secs(5),
        });
        let n = AtomicU64::new(0);
        let r = store.retrying("packs/ab", || {
            n.fetch_add(1, Ordering::Relaxed);
            async move { Err::<(), _>(e()) }
        });
        let err = store.failed("packs/ab", r.unwrap_err());
        (n.load(Ordering::Relaxed), err)
    }

    #[test]
    fn transient_failures_are_retried_and_permanent_ones_are_not() {
        let (n, err) = tries(|| answer(503));
        assert_eq!(n, 4);
        // Still failing after every try: the store cannot be reached, said so.
        assert!(
            matches!(err, Error::Unreachable { attempts: 4, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("memory:") && msg.contains("packs/ab"), "{msg}");
        assert!(msg.contains("check the endpoint"), "{msg}");
        assert_eq!(tries(reset).0, 4);
        assert_eq!(tries(not_found).0, 1);
        assert_eq!(tries(denied).0, 1);
        assert_eq!(tries(unauthenticated).0, 1);
        assert_eq!(tries(text_only).0, 1);
        assert!(matches!(tries(denied).1, Error::Store { .. }));
    }

    #[test]
    fn large_objects_go_up_in_parts_and_read_back_whole() {
        let store = Store::memory();
        let data: Bytes = (0..MULTIPART_THRESHOLD + 12345)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        store.put("big", data.clone()).unwrap();
        assert_eq!(store.get("big").unwrap(), data);
        assert_eq!(store.size("big").unwrap(), Some(data.len() as u64));
        let r = store.get_range("big", 100..200).unwrap();
        assert_eq!(&r[..], &data[100..200]);
    }

    #[test]
    fn range_past_the_end_is_a_truncated_object_not_a_retry_loop() {
        let store = Store::memory();
        store
            .put("small", Bytes::from_static(b"0123456789"))
            .unwrap();
        let err = store.get_range("small", 5..50).unwrap_err();
        assert!(err.to_string().contains("only 10 bytes"), "{err}");
        assert_eq!(store.requests().retries, 0);
        assert!(matches!(
            store.get_range("none", 0..1),
            Err(Error::Missing { .. })
        ));
    }

    #[test]
    fn a_bounded_get_refuses_an_object_over_its_bound_naming_it() {
        let store = Store::memory();
        store.put("config", Bytes::from(vec![7u8; 101])).unwrap();
        assert_eq!(store.get_bounded("config", 101).unwrap().len(), 101);
        let err = store.get_bounded("config", 100).unwrap_err();
        assert!(matches!(&err, Error::Corrupt { object, .. } if object == "config"));
        assert!(err.to_string().contains("101 bytes"), "{err}");
        assert_eq!(store.requests().retries, 0);
        assert!(matches!(
            store.get_bounded("none", 10),
            Err(Error::Missing { .. })
        ));
    }

    #[test]
    fn delete_is_idempotent_and_counted() {
        let store = Store::memory();
        store.put("a", Bytes::from_static(b"x")).unwrap();
        store.delete("a").unwrap();
        store.delete("a").unwrap();
        assert!(!store.exists("a").unwrap());
        assert_eq!(store.requests().deletes, 2);
    }

    #[test]
    fn the_immutable_cache_keeps_only_index_objects_and_points() {
        let store = Store::memory().with_immutable_cache();
        store.put("index/ab", Bytes::from_static(b"i")).unwrap();
        store.put("locks/cd", Bytes::from_static(b"one")).unwrap();
        for _ in 0..3 {
            assert_eq!(&store.get("index/ab").unwrap()[..], b"i");
        }
        assert_eq!(store.requests().gets, 1);
        assert_eq!(&store.get("locks/cd").unwrap()[..], b"one");
        store.put("locks/cd", Bytes::from_static(b"two")).unwrap();
        assert_eq!(&store.get("locks/cd").unwrap()[..], b"two");
        assert_eq!(store.requests().gets, 3);
        // Without the cache every get is a request.
        let plain = Store::memory();
        plain.put("index/ab", Bytes::from_static(b"i")).unwrap();
        plain.get("index/ab").unwrap();
        plain.get("index/ab").unwrap();
        assert_eq!(plain.requests().gets, 2);
    }

    /// Version history kept beside an in-memory store: the test records each
    /// write (Ferry's and the attacker's) as a version, as S3 would.
    #[derive(Debug, Default)]
    struct History(
        std::sync::Mutex<Vec<ObjectVersion>>,
        std::sync::Mutex<HashMap<String, Bytes>>,
    );

    use std::collections::HashMap;

    impl History {
        fn record(&self, name: &str, data: Option<Bytes>) {
            let mut vs = self.0.lock().unwrap();
            for v in vs.iter_mut().filter(|v| v.name == name) {
                v.latest = false;
            }
            let n = vs.len();
            let version = format!("v{n}");
            vs.push(ObjectVersion {
                name: name.to_string(),
                version: version.clone(),
                delete_marker: data.is_none(),
                latest: true,
                size: data.as_ref().map_or(0, |d| d.len() as u64),
                modified: Utc::now() + chrono::Duration::milliseconds(n as i64),
            });
            if let Some(d) = data {
                self.1.lock().unwrap().insert(version, d);
            }
        }
    }

    impl Versioned for History {
        fn lock_enabled(&self) -> BoxFuture<'_, Result<bool, object_store::Error>> {
            Box::pin(async { Ok(false) })
        }
        fn put_retained<'a>(
            &'a self,
            _: &'a str,
            _: Bytes,
            _: Retention,
            _: Option<&'a str>,
        ) -> BoxFuture<'a, Result<(), object_store::Error>> {
            unimplemented!()
        }
        fn put_retained_parts<'a>(
            &'a self,
            _: &'a str,
            _: Retention,
            _: Option<&'a str>,
        ) -> BoxFuture<'a, Result<Arc<dyn PartedUpload>, object_store::Error>> {
            unimplemented!()
        }
        fn retention<'a>(
            &'a self,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<Retention>, object_store::Error>> {
            Box::pin(async { Ok(None) })
        }
        fn extend<'a>(
            &'a self,
            _: &'a str,
            _: Retention,
        ) -> BoxFuture<'a, Result<(), object_store::Error>> {
            unimplemented!()
        }
        fn versions<'a>(
            &'a self,
            prefix: &'a str,
        ) -> BoxFuture<'a, Result<Vec<ObjectVersion>, object_store::Error>> {
            let out = self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|v| v.name.starts_with(prefix))
                .cloned()
                .collect();
            Box::pin(async move { Ok(out) })
        }
        fn delete_version<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<(), object_store::Error>> {
            Box::pin(async { Ok(()) })
        }
        fn set_storage_class<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: Option<Retention>,
        ) -> BoxFuture<'a, Result<(), object_store::Error>> {
            unimplemented!()
        }
        fn get_version<'a>(
            &'a self,
            name: &'a str,
            version: &'a str,
        ) -> BoxFuture<'a, Result<Bytes, object_store::Error>> {
            let got = self.1.lock().unwrap().get(version).cloned();
            Box::pin(async move {
                got.ok_or_else(|| object_store::Error::NotFound {
                    path: format!("{name}@{version}"),
                    source: "no such version".into(),
                })
            })
        }
    }

    #[test]
    fn reads_go_through_overwrites_and_delete_markers_to_the_original_version() {
        use crate::progress::Progress;
        let repo = crate::testing::memory_repo();
        let data: Vec<u8> = (0..(3u64 << 20))
            .map(|i| ((i * 2654435761) >> 11) as u8)
            .collect();
        let point = crate::testing::backup_bytes(&repo, &data);
        let history = Arc::new(History::default());
        for (name, _) in repo.store.list("").unwrap() {
            history.record(&name, Some(repo.store.get(&name).unwrap()));
        }
        // The attacker: every pack overwritten, the point deleted.
        let packs = repo.store.list("packs/").unwrap();
        for (name, _) in &packs {
            let junk = Bytes::from_static(b"encrypted by ransomware");
            repo.store.put(name, junk.clone()).unwrap();
            history.record(name, Some(junk));
        }
        let point_name = crate::point::object_name(&point.id);
        repo.store.delete(&point_name).unwrap();
        history.record(&point_name, None);

        // Without versions, the point is gone.
        let plain = crate::repo::Repository::open(repo.store.clone(), b"pw").unwrap();
        assert!(plain.point_ids().unwrap().is_empty());

        let store = repo.store.clone().with_versioned(history.clone());
        let repo = crate::repo::Repository::open(store, b"pw").unwrap();
        assert_eq!(repo.point_ids().unwrap(), vec![point.id.clone()]);
        let p = repo.load_point(&point.id).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vda");
        let opts = crate::restore::RestoreOptions {
            target: target.clone(),
            disk: None,
            overwrite: false,
            delta: false,
            base: None,
        };
        crate::restore::restore(&repo, &p, &opts, &Progress::default()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), data);
        let report = crate::check::check(
            &repo,
            crate::check::CheckOptions { read_data: true },
            &Progress::default(),
        )
        .unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.points, 1);
        // Read-only: the bucket still holds the attacker's bytes for `undelete`.
        for (name, _) in &packs {
            assert_eq!(
                &repo.store.get_uncached(name).unwrap()[..],
                b"encrypted by ransomware"
            );
        }
    }

    #[test]
    fn only_names_a_repository_writes_are_its_own() {
        for ours in [
            "config",
            "keys/0123",
            "packs/ab/abcdef",
            "index/ff",
            "points/p",
            "locks/l",
            "trash/t.waits",
            "replicas/missing/r/x",
        ] {
            assert!(is_repository_name(ours), "{ours}");
        }
        // Another program's, beside or under the repository's prefix.
        for theirs in [
            "",
            "config.bak",
            "configs/x",
            "packs/",
            "packsx/ab",
            "notes/draft",
            "backup/packs/ab",
        ] {
            assert!(!is_repository_name(theirs), "{theirs}");
        }
    }
}
