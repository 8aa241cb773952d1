//! A repository: its config, keys, and access to its objects.
//!
//! ```text
//! config            Envelope(kind Config) || Sealed<JSON Config>   written last by init
//! keys/<hex>        Envelope(kind Key)    || JSON KeyFile          one per password
//! packs/<xx>/<hex>  see pack.rs
//! index/<hex>       see index.rs
//! points/<hex>      see point.rs
//! ```

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::chunker::Chunker;
use crate::crypto::{KdfParams, KeyFile, MasterKey, random_hex};
use crate::error::{Error, Result};
use crate::format::{self, Kind};
use crate::pack;
use crate::point::{self, Point};
use crate::replica::{ReplicaConfig, ReplicaSet, ReplicaSpec};
use crate::store::{LockPolicy, Store};
use std::sync::Arc;

/// Settings fixed when the repository is created.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub id: String,
    pub created: DateTime<Utc>,
    pub chunker: Chunker,
    /// zstd level for chunks (1..=19).
    pub compression_level: i32,
    /// Object Lock retention given to every object written (S3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockPolicy>,
    /// The replicas of a replicated repository (each with its own lock), the
    /// same in every replica's config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaConfig>,
    /// Where packs are cut, in bytes ([`pack::MIN_PACK_SIZE`] to
    /// [`pack::MAX_PACK_SIZE`]). Left out when it is the default, so that a
    /// repository made without `--pack-size` opens in builds that predate it.
    #[serde(
        default = "default_pack_size",
        skip_serializing_if = "is_default_pack_size"
    )]
    pub pack_size: u64,
}

fn default_pack_size() -> u64 {
    pack::DEFAULT_PACK_SIZE as u64
}

fn is_default_pack_size(size: &u64) -> bool {
    *size == default_pack_size()
}

/// Whether `size` is a pack size a repository may have.
fn check_pack_size(size: u64) -> std::result::Result<(), String> {
    let (min, max) = (pack::MIN_PACK_SIZE as u64, pack::MAX_PACK_SIZE as u64);
    if (min..=max).contains(&size) {
        Ok(())
    } else {
        Err(format!(
            "a pack size of {size} bytes is outside {} to {} MiB",
            min >> 20,
            max >> 20
        ))
    }
}

/// Options for `init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub chunker: Chunker,
    pub compression_level: i32,
    pub kdf: KdfParams,
    pub lock: Option<LockPolicy>,
    /// More replicas beside the store `init` is given (which is the first).
    pub replicas: Vec<Store>,
    /// Replicas that must hold an object before a write succeeds (a majority
    /// when `None`).
    pub write_quorum: Option<usize>,
    /// Where packs are cut (bytes).
    pub pack_size: u64,
}

impl InitOptions {
    /// Whether these options make a repository (checked by
    /// [`Repository::init`]; callers may check before creating anything).
    pub fn validate(&self) -> Result<()> {
        self.chunker.validate()?;
        if !(1..=19).contains(&self.compression_level) {
            return Err(Error::InvalidInput(format!(
                "compression level {} must be from 1 to 19",
                self.compression_level
            )));
        }
        check_pack_size(self.pack_size).map_err(Error::InvalidInput)
    }
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunker: Chunker::default(),
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            kdf: KdfParams::default(),
            lock: None,
            replicas: Vec::new(),
            write_quorum: None,
            pack_size: default_pack_size(),
        }
    }
}

/// zstd level 2: on the benchmark image, level 3 stores 2% less but costs 25% more
/// CPU, and zstd is two thirds of a full backup's CPU (docs/performance.md).
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 2;

/// An open, unlocked repository.
#[derive(Debug, Clone)]
pub struct Repository {
    pub(crate) store: Store,
    pub(crate) key: MasterKey,
    pub(crate) config: Config,
    /// Points already read and verified: a point is never rewritten, so a
    /// long-lived process (`ferry protect`) reads each one once.
    points_read: std::sync::Arc<std::sync::Mutex<PointCache>>,
    /// The index of the last backup, which the next one builds on (see
    /// [`crate::index::Kept`]); shared by clones.
    pub(crate) kept_index: std::sync::Arc<std::sync::Mutex<Option<crate::index::Kept>>>,
    /// Chunks recently stored or read by incrementals through a change map, which
    /// the next one compares its changed regions with (see `backup::Parent`).
    pub(crate) recent: std::sync::Arc<std::sync::Mutex<crate::cache::ChunkCache>>,
    /// Bytes that incrementals through a change map may still read whole to
    /// compact fragmented segments (see `backup::COMPACT_SHARE`); carried from
    /// one backup of a long-lived process to the next.
    pub(crate) compaction_credit: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Chunk lists resolved by `load_list_parts`, by id (a list's content is
    /// fixed by its id), so that a chain of delta lists is applied once, not
    /// once per point that reaches it.
    pub(crate) lists_resolved: std::sync::Arc<std::sync::Mutex<ListCache>>,
    /// Key files skipped by `open`, with why.
    warnings: Vec<String>,
    /// The key file that opened it (`keys/<hex>`), or that `init` wrote.
    pub(crate) key_name: String,
}

/// Points already read, up to [`POINT_CACHE_BYTES`] of chunk list ids: a point
/// that passed its size bound may still be large, and a process must not keep
/// an unbounded number of them.
#[derive(Debug, Default)]
struct PointCache {
    points: std::collections::HashMap<String, Point>,
    bytes: usize,
}

/// What the points a repository remembers may weigh (2 million list ids, 128 TiB
/// of disks); points beyond it are read again when asked for.
const POINT_CACHE_BYTES: usize = 64 << 20;

impl PointCache {
    fn weight(p: &Point) -> usize {
        1024 + p.lists.iter().map(|l| 32 * l.len() + 256).sum::<usize>()
    }

    fn insert(&mut self, p: &Point) {
        let w = Self::weight(p);
        if self.bytes + w <= POINT_CACHE_BYTES && !self.points.contains_key(&p.id) {
            self.bytes += w;
            self.points.insert(p.id.clone(), p.clone());
        }
    }
}

/// What the chunks an incremental compares with may weigh: 64 MiB, or
/// `FERRY_RECENT_CHUNKS_MIB` (0 turns the cache off).
const RECENT_CHUNKS_BYTES: usize = 64 << 20;

fn recent_chunks() -> std::sync::Arc<std::sync::Mutex<crate::cache::ChunkCache>> {
    let budget = std::env::var("FERRY_RECENT_CHUNKS_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(RECENT_CHUNKS_BYTES, |m| m << 20);
    std::sync::Arc::new(std::sync::Mutex::new(crate::cache::ChunkCache::new(budget)))
}

/// A chunk list as loaded: its extents; for a delta list the lists it is built
/// on, which must stay as long as it does, and how many deltas deep it is.
#[derive(Debug, Clone)]
pub struct ListParts {
    pub bases: Vec<point::ListId>,
    /// 0 for a full list.
    pub depth: u32,
    pub extents: Vec<point::Extent>,
}

/// Resolved chunk lists kept by a repository: 64 MiB of extents.
pub(crate) type ListCache = crate::cache::Fifo<(u64, ListParts)>;

pub(crate) fn list_cache() -> std::sync::Arc<std::sync::Mutex<ListCache>> {
    std::sync::Arc::new(std::sync::Mutex::new(ListCache::weighed(
        64 << 20,
        |(_, p)| p.extents.len() * std::mem::size_of::<point::Extent>() + p.bases.len() * 32 + 64,
    )))
}

impl Repository {
    /// Create a repository. Keys go first and the config last, so a crash leaves
    /// either nothing usable or a complete repository.
    pub fn init(store: Store, password: &[u8], opts: InitOptions) -> Result<Repository> {
        opts.validate()?;
        let mut stores = vec![store];
        stores.extend(opts.replicas);
        for st in &stores {
            if st.exists("config")? {
                return Err(Error::AlreadyExists {
                    location: st.location().to_string(),
                });
            }
        }
        if let Some(lock) = opts.lock
            && lock.days == 0
        {
            return Err(Error::InvalidInput(
                "an Object Lock retention must be at least 1 day".into(),
            ));
        }
        // Object Lock where the store has it; a single store must have it.
        let mut locks = Vec::with_capacity(stores.len());
        for st in &stores {
            let enabled = match (opts.lock, st.versioned()) {
                (Some(_), Some(v)) => st
                    .block_on(v.lock_enabled())
                    .map_err(|e| Error::store("bucket lock configuration", e))?,
                _ => false,
            };
            locks.push(opts.lock.filter(|_| enabled));
        }
        if opts.lock.is_some() && locks.iter().all(Option::is_none) {
            return Err(Error::InvalidInput(format!(
                "{} cannot keep immutable recovery points: its bucket does not have S3 Object Lock enabled; create the bucket with Object Lock (aws s3api create-bucket --object-lock-enabled-for-bucket) or init without --object-lock",
                stores
                    .iter()
                    .map(Store::location)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let replicas = if stores.len() > 1 {
            let n = stores.len();
            let rc = ReplicaConfig {
                write_quorum: opts.write_quorum.unwrap_or(n / 2 + 1),
                replicas: stores
                    .iter()
                    .zip(&locks)
                    .map(|(st, lock)| ReplicaSpec {
                        id: random_hex(8),
                        location: st.location().to_string(),
                        lock: *lock,
                    })
                    .collect(),
            };
            rc.validate()?;
            Some(rc)
        } else {
            if opts.write_quorum.is_some_and(|q| q != 1) {
                return Err(Error::InvalidInput(
                    "a write quorum needs replicas (--replica)".into(),
                ));
            }
            None
        };
        let stores: Vec<Store> = stores
            .into_iter()
            .zip(&locks)
            .map(|(st, lock)| st.with_lock(*lock))
            .collect();
        let key = MasterKey::generate();
        let key_file = key.wrap(password, opts.kdf)?;
        let key_name = format!("keys/{}", random_hex(16));
        let key_obj = key_file_object(&key_file);
        // Keys on every replica first, then the config on every replica.
        for st in &stores {
            st.put(&key_name, key_obj.clone())?;
        }
        let config = Config {
            id: random_hex(16),
            created: Utc::now(),
            chunker: opts.chunker,
            compression_level: opts.compression_level,
            lock: if replicas.is_some() { None } else { locks[0] },
            replicas,
            pack_size: opts.pack_size,
        };
        let header = format::header(Kind::Config);
        let mut obj = header.to_vec();
        key.seal_into(
            &header,
            &serde_json::to_vec(&config).expect("config serialises"),
            &mut obj,
        );
        let config_obj = Bytes::from(obj);
        for st in &stores {
            st.put("config", config_obj.clone())?;
        }
        let store = match &config.replicas {
            Some(rc) => {
                let first = stores[0].clone();
                let location = first.location().to_string();
                let set = ReplicaSet::new(rc.clone(), stores, key.clone(), &config_obj, None)?;
                Store::replicated(&first, Arc::new(set), location)
            }
            None => stores.into_iter().next().expect("one store"),
        };
        Ok(Repository {
            store,
            key,
            config,
            points_read: Default::default(),
            kept_index: Default::default(),
            compaction_credit: Default::default(),
            lists_resolved: list_cache(),
            recent: recent_chunks(),
            warnings: Vec::new(),
            key_name,
        })
    }

    /// Open a repository with a password.
    ///
    /// Every key file is read (each at most [`MAX_KEY_FILE`] bytes) and checked
    /// before any key derivation; one that is damaged, planted or asks for more
    /// Argon2id work than Ferry writes is skipped with a warning naming it
    /// ([`Repository::warnings`]), and the others are tried, cheapest first, so
    /// one bad key file locks nobody out and costs little.
    pub fn open(store: Store, password: &[u8]) -> Result<Repository> {
        let config_obj = match store.get_bounded("config", MAX_CONFIG_OBJECT) {
            Ok(b) => b,
            Err(Error::Missing { .. }) => {
                return Err(Error::NoRepository {
                    location: store.location().to_string(),
                });
            }
            Err(e) => return Err(e),
        };
        // The version is checked before any password work.
        let sealed = format::split("config", Kind::Config, &config_obj)?;
        let keys = store.list("keys/")?;
        let mut skipped: Vec<Error> = Vec::new();
        let mut files = Vec::new();
        for (name, _) in &keys {
            match read_key_file(&store, name) {
                Ok(f) => files.push((name, f)),
                Err(Error::Missing { .. }) => {} // removed since the listing
                Err(e) => skipped.push(e),
            }
        }
        // The usual parameters first: a planted key file asking for more work
        // is tried only when no cheaper one opens.
        files.sort_by_key(|(_, f)| f.kdf.work());
        // Try every key: a key left by an interrupted `init` may open with the
        // same password yet hold another secret.
        let mut opened = 0;
        for (name, file) in &files {
            let key = match MasterKey::unwrap(file, password) {
                Ok(Some(key)) => key,
                Ok(None) => continue,
                Err(e) => {
                    skipped.push(relabel(e, name));
                    continue;
                }
            };
            opened += 1;
            let Some(json) = key.open(format::aad(&config_obj), sealed) else {
                continue; // a key that opens but is not this config's
            };
            let config: Config = serde_json::from_slice(&json)
                .map_err(|e| Error::corrupt("config", e.to_string()))?;
            config
                .chunker
                .validate()
                .map_err(|e| Error::corrupt("config", e.to_string()))?;
            if !(1..=19).contains(&config.compression_level) {
                return Err(Error::corrupt(
                    "config",
                    format!(
                        "compression level {} out of range",
                        config.compression_level
                    ),
                ));
            }
            check_pack_size(config.pack_size).map_err(|e| Error::corrupt("config", e))?;
            if config.lock.is_some() && store.versioned().is_none() {
                tracing::warn!(
                    "the repository was created with Object Lock, but {} has no Object Lock; new objects are not locked",
                    store.location()
                );
            }
            let warnings = warn_skipped(&skipped);
            let store = match &config.replicas {
                Some(rc) => open_replicas(&store, rc, &key, &config_obj)?,
                None => store.with_lock(config.lock),
            };
            return Ok(Repository {
                store,
                key,
                config,
                points_read: Default::default(),
                kept_index: Default::default(),
                compaction_credit: Default::default(),
                lists_resolved: list_cache(),
                recent: recent_chunks(),
                warnings,
                key_name: (*name).clone(),
            });
        }
        warn_skipped(&skipped);
        if opened > 0 {
            return Err(Error::DamagedConfig {
                location: store.location().to_string(),
                keys: opened,
            });
        }
        // A store that failed is not a wrong password.
        if let Some(i) = skipped
            .iter()
            .position(|e| matches!(e, Error::Store { .. }))
        {
            return Err(skipped.swap_remove(i));
        }
        Err(Error::WrongPassword {
            location: store.location().to_string(),
            keys: keys.len(),
            skipped: skipped.iter().map(ToString::to_string).collect(),
        })
    }

    /// Key files that could not be used when the repository was opened, each
    /// named with the reason (also logged as warnings): show them to the user,
    /// who should remove a planted one or restore a damaged one.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn key(&self) -> &MasterKey {
        &self.key
    }

    /// The ids of every recovery point.
    pub fn point_ids(&self) -> Result<Vec<String>> {
        Ok(self
            .store
            .list("points/")?
            .into_iter()
            .filter_map(|(n, _)| n.strip_prefix("points/").map(str::to_string))
            .collect())
    }

    /// Load one point by its full id.
    pub fn load_point(&self, id: &str) -> Result<Point> {
        if let Some(p) = self.points_read.lock().expect("point cache").points.get(id) {
            return Ok(p.clone());
        }
        let bytes = self
            .store
            .get_bounded(&point::object_name(id), point::MAX_POINT_OBJECT)?;
        if blake3::hash(&bytes).to_hex().as_str() != id {
            return Err(Error::corrupt(
                point::object_name(id),
                "content does not match its name",
            ));
        }
        let p = point::decode(&self.key, id, &bytes)?;
        self.points_read.lock().expect("point cache").insert(&p);
        Ok(p)
    }

    /// Read one stored blob (a chunk or a chunk list) through the index, verified
    /// against its id. `what` names it in errors.
    pub fn read_blob(
        &self,
        index: &crate::index::Index,
        id: &crate::crypto::ChunkId,
        what: &str,
    ) -> Result<Vec<u8>> {
        let loc = index.get(id)?.ok_or_else(|| Error::Missing {
            object: format!("{what} (no pack holds it)"),
        })?;
        let (pack_id, _) = index.pack(loc.pack);
        let pack_name = crate::pack::object_name(&pack_id);
        match self.read_blob_at(&loc, id, &pack_name, what) {
            // An overwritten pack on a versioned store: read its original version.
            Err(e) if self.store.recover_original(&pack_name)? => {
                tracing::debug!(error = %e, "read again from the original version");
                self.read_blob_at(&loc, id, &pack_name, what)
            }
            other => other,
        }
    }

    fn read_blob_at(
        &self,
        loc: &crate::index::Location,
        id: &crate::crypto::ChunkId,
        pack_name: &str,
        what: &str,
    ) -> Result<Vec<u8>> {
        let sealed = self
            .store
            .get_range(
                pack_name,
                loc.offset as u64..loc.offset as u64 + loc.length as u64,
            )
            .map_err(|e| Error::corrupt(what, format!("{e}")))?;
        let entry = loc.entry(*id);
        crate::pack::ChunkOpener::default()
            .open(&self.key, &entry, &sealed)
            .map(<[u8]>::to_vec)
            .map_err(|d| Error::corrupt(what, format!("in {pack_name}: {d}")))
    }

    /// Load a chunk list that describes `span` bytes, through the index: its
    /// extents, a delta list's applied to its base.
    pub fn load_list(
        &self,
        index: &crate::index::Index,
        id: &point::ListId,
        span: u64,
    ) -> Result<Vec<point::Extent>> {
        Ok(self.load_list_parts(&[index], id, span)?.extents)
    }

    /// Load a chunk list through the first of `indexes` that holds each blob:
    /// a delta list is applied to the lists it is built on, down to a full one.
    pub fn load_list_parts(
        &self,
        indexes: &[&crate::index::Index],
        id: &point::ListId,
        span: u64,
    ) -> Result<ListParts> {
        let broken = |at: &point::ListId, want: u32| {
            Error::corrupt(
                format!("chunk list {}", &id.to_hex()[..16]),
                format!(
                    "its chain of delta lists breaks at chunk list {}, which is not {want} deltas above a full list",
                    &at.to_hex()[..16],
                ),
            )
        };
        let cached = |at: &point::ListId| -> Option<std::sync::Arc<(u64, ListParts)>> {
            self.lists_resolved.lock().expect("list cache").get(at)
        };
        // Down the chain to a full list, or to a list resolved before (the
        // parent of a point's list usually is: points are read in order).
        let mut chain = Vec::new();
        let mut at = *id;
        let mut want: Option<u32> = None;
        let floor: ListParts = loop {
            if let Some(hit) = cached(&at) {
                let (hit_span, parts) = &*hit;
                if *hit_span != span || want.is_some_and(|d| d != parts.depth) {
                    return Err(broken(&at, want.unwrap_or(0)));
                }
                // The list itself must still be one the index knows.
                if at == *id && Self::holder(indexes, id)?.is_none() {
                    return Err(Error::Missing {
                        object: format!("chunk list {} (no pack holds it)", &id.to_hex()[..16]),
                    });
                }
                break parts.clone();
            }
            match self.list_body(indexes, &at, span)? {
                point::ListBody::Full(extents) if want.is_none_or(|d| d == 0) => {
                    break ListParts {
                        bases: Vec::new(),
                        depth: 0,
                        extents,
                    };
                }
                point::ListBody::Delta {
                    base,
                    depth,
                    patches,
                } if want.is_none_or(|d| d == depth) => {
                    chain.push((at, patches));
                    want = Some(depth - 1);
                    at = base;
                }
                _ => return Err(broken(&at, want.unwrap_or(0))),
            }
        };
        if chain.is_empty() {
            self.remember_list(*id, span, &floor);
            return Ok(floor);
        }
        // The lists below: each delta of the chain but the top, the floor, and
        // what the floor is built on.
        let mut bases: Vec<point::ListId> = chain.iter().skip(1).map(|(id, _)| *id).collect();
        bases.push(at);
        bases.extend(floor.bases.iter().copied());
        let mut parts = ListParts {
            bases: Vec::new(),
            depth: floor.depth,
            extents: floor.extents,
        };
        for (k, (lid, patches)) in chain.into_iter().enumerate().rev() {
            parts.extents = point::apply_patches(&parts.extents, patches);
            parts.depth += 1;
            // Each body is bounded, but patches could multiply extents: what
            // they make must fit a full list's body, as backup ensures.
            let len = point::list_body_len(&parts.extents);
            if len > point::MAX_LIST_BODY {
                return Err(Error::corrupt(
                    format!("chunk list {}", &id.to_hex()[..16]),
                    format!(
                        "its deltas make a list of {len} bytes, more than the {} a chunk list can hold",
                        point::MAX_LIST_BODY
                    ),
                ));
            }
            parts.bases = bases[k..].to_vec();
            self.remember_list(lid, span, &parts);
        }
        Ok(parts)
    }

    /// The first of `indexes` that holds `id`.
    fn holder<'a>(
        indexes: &[&'a crate::index::Index],
        id: &point::ListId,
    ) -> Result<Option<&'a crate::index::Index>> {
        for i in indexes {
            if i.contains(id)? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Keep a resolved list for the next chain that reaches it.
    fn remember_list(&self, id: point::ListId, span: u64, parts: &ListParts) {
        self.lists_resolved
            .lock()
            .expect("list cache")
            .insert(id, std::sync::Arc::new((span, parts.clone())));
    }

    fn list_body(
        &self,
        indexes: &[&crate::index::Index],
        id: &point::ListId,
        span: u64,
    ) -> Result<point::ListBody> {
        let what = format!("chunk list {}", &id.to_hex()[..16]);
        let Some(index) = Self::holder(indexes, id)?.or(indexes.first().copied()) else {
            return Err(Error::Missing {
                object: format!("{what} (no pack holds it)"),
            });
        };
        // Refused before it is read and decompressed: a blob may be 4 MiB, a
        // chunk list never more than `MAX_LIST_BODY`.
        if let Some(loc) = index.get(id)?
            && loc.raw_len as usize > point::MAX_LIST_BODY
        {
            return Err(Error::corrupt(
                what,
                format!(
                    "the index gives it {} bytes, more than the {} a chunk list can hold",
                    loc.raw_len,
                    point::MAX_LIST_BODY
                ),
            ));
        }
        let body = self.read_blob(index, id, &what)?;
        point::decode_list(&what, &body, span)
    }

    /// Every readable point, oldest first, and the errors of the unreadable ones.
    pub fn points(&self) -> Result<(Vec<Point>, Vec<Error>)> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for id in self.point_ids()? {
            match self.load_point(&id) {
                Ok(p) => ok.push(p),
                Err(Error::Missing { .. }) => {}
                Err(e @ (Error::Corrupt { .. } | Error::UnsupportedVersion { .. })) => bad.push(e),
                Err(e) => return Err(e),
            }
        }
        ok.sort_by(|a, b| a.meta.time.cmp(&b.meta.time).then(a.id.cmp(&b.id)));
        Ok((ok, bad))
    }

    /// Resolve `ID`, an unambiguous id prefix, `SOURCE@latest`, `SOURCE@TIME`
    /// (the newest point at or before TIME, RFC 3339 or `YYYY-MM-DD[ HH:MM[:SS]]` UTC)
    /// or `SOURCE@group-latest`: the newest point of a complete coordinated
    /// cut (see [`crate::point::GroupCut`]) that every member of the group has
    /// a point of, so that each member's `@group-latest` names the same cut.
    pub fn resolve(&self, reference: &str) -> Result<Point> {
        if let Some((source, when)) = reference.split_once('@') {
            let (points, _) = self.points()?;
            if when == GROUP_LATEST {
                return group_latest(&points, source).cloned().ok_or_else(|| {
                    Error::PointNotFound(format!(
                        "source {source:?} has no point of a complete group cut that every member of its group has a point of; `ferry points --source {source}` shows each point's group"
                    ))
                });
            }
            let mut of_source = points.into_iter().filter(|p| p.meta.source == source);
            let found = if when == "latest" {
                of_source.next_back()
            } else {
                let t = parse_time(when)?;
                of_source.rfind(|p| p.meta.time <= t)
            };
            return found.ok_or_else(|| {
                Error::PointNotFound(format!(
                    "no recovery point of source {source:?} matches {when:?}; list them with `ferry points --source {source}`"
                ))
            });
        }
        if reference.len() < 4 || !reference.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::PointNotFound(format!(
                "{reference:?} is not a recovery point: give an id (at least 4 hex digits), SOURCE@latest, SOURCE@TIME or SOURCE@group-latest"
            )));
        }
        let reference = reference.to_ascii_lowercase();
        let matches: Vec<_> = self
            .point_ids()?
            .into_iter()
            .filter(|id| id.starts_with(&reference))
            .collect();
        match matches.as_slice() {
            [id] => self.load_point(id),
            [] => Err(Error::PointNotFound(format!(
                "no recovery point with id {reference}; list them with `ferry points`"
            ))),
            _ => Err(Error::PointNotFound(format!(
                "{} recovery points start with {reference}; give more digits",
                matches.len()
            ))),
        }
    }

    pub(crate) fn put_object(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.store.put(name, Bytes::from(bytes))
    }

    /// Put a finished pack's bytes under its name, from memory or from its
    /// file (closed, so gone, once written).
    pub(crate) fn put_pack(&self, name: &str, body: crate::pack::PackBody) -> Result<()> {
        match body {
            crate::pack::PackBody::Memory(bytes) => self.store.put(name, Bytes::from(bytes)),
            crate::pack::PackBody::File { file, len } => self.store.put_file(name, &file, len),
        }
    }
}

/// `SOURCE@group-latest`: see [`Repository::resolve`].
pub const GROUP_LATEST: &str = "group-latest";

/// The newest of `points` (sorted by time) of `source` taken in a complete
/// group cut that every member of the group has a point of.
pub fn group_latest<'a>(points: &'a [Point], source: &str) -> Option<&'a Point> {
    let in_round = |src: &str, g: &crate::point::GroupCut| {
        points.iter().any(|q| {
            q.meta.source == src
                && q.meta
                    .group
                    .as_ref()
                    .is_some_and(|h| h.name == g.name && h.round == g.round)
        })
    };
    points.iter().rev().find(|p| {
        p.meta.source == source
            && p.meta
                .group
                .as_ref()
                .is_some_and(|g| g.complete() && g.members.iter().all(|m| in_round(m, g)))
    })
}

/// The largest `config` object accepted (defined with the envelope, which
/// the replica layer reads too).
pub use crate::format::MAX_CONFIG_OBJECT;

/// The store of a replicated repository opened through `store`, one of its
/// replicas: the others are opened by the locations the config records.
fn open_replicas(
    store: &Store,
    rc: &ReplicaConfig,
    key: &MasterKey,
    config_obj: &Bytes,
) -> Result<Store> {
    rc.validate()
        .map_err(|e| Error::corrupt("config", e.to_string()))?;
    let mut stores = Vec::with_capacity(rc.replicas.len());
    for spec in &rc.replicas {
        if same_place(&spec.location, store.location()) {
            stores.push(store.clone());
            continue;
        }
        let opener = store.opener().ok_or_else(|| {
            Error::InvalidInput(format!(
                "the repository at {} is replicated, and this program cannot open its replica {}",
                store.location(),
                spec.location
            ))
        })?;
        stores.push(opener(&spec.location)?);
    }
    let set = ReplicaSet::new(
        rc.clone(),
        stores,
        key.clone(),
        config_obj,
        store.read_replica(),
    )?;
    Ok(Store::replicated(store, Arc::new(set), store.location()))
}

/// Whether two locations name the same store (directories by their real path).
fn same_place(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    if a.contains("://") || b.contains("://") || a.contains(':') && !a.starts_with('/') {
        return false;
    }
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
/// The largest key file accepted: its JSON is about 500 bytes.
pub const MAX_KEY_FILE: u64 = 64 << 10;

/// A key file as stored: its envelope, then its JSON.
pub(crate) fn key_file_object(file: &KeyFile) -> Bytes {
    let mut obj = format::header(Kind::Key).to_vec();
    obj.extend_from_slice(&serde_json::to_vec_pretty(file).expect("key file serialises"));
    Bytes::from(obj)
}

/// Read, parse and check one key file, naming it in every error.
pub(crate) fn read_key_file(store: &Store, name: &str) -> Result<KeyFile> {
    let bytes = store.get_bounded(name, MAX_KEY_FILE)?;
    let body = format::split(name, Kind::Key, &bytes)?;
    let file: KeyFile =
        serde_json::from_slice(body).map_err(|e| Error::corrupt(name, format!("key file: {e}")))?;
    file.check(name)?;
    Ok(file)
}

/// Errors about "key file" in general made to name the key file.
fn relabel(e: Error, name: &str) -> Error {
    match e {
        Error::Corrupt { detail, .. } => Error::corrupt(name, detail),
        e => e,
    }
}

/// Log the key files that could not be used; returns their messages.
fn warn_skipped(skipped: &[Error]) -> Vec<String> {
    skipped
        .iter()
        .map(|e| {
            tracing::warn!(error = %e, "a key file of the repository cannot be used; it was skipped");
            format!("skipped a key file: {e}")
        })
        .collect()
}

/// Parse RFC 3339 or `YYYY-MM-DD[ HH:MM[:SS]]` (UTC).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        // A bare date means the end of that day.
        return Ok(d.and_hms_opt(23, 59, 59).expect("valid time").and_utc());
    }
    Err(Error::InvalidInput(format!(
        "cannot read {s:?} as a time: use RFC 3339 (2026-11-23T10:00:00Z) or YYYY-MM-DD[ HH:MM[:SS]] in UTC"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{backup_bytes, memory_repo};

    /// A key file object around `kdf`, wrapping nothing that opens.
    fn key_object(kdf: KdfParams) -> Bytes {
        let file = KeyFile {
            kdf: KdfParams {
                salt: "00".repeat(32),
                ..kdf
            },
            wrapped: "00".repeat(92),
            created: Utc::now(),
            host: "planted".into(),
        };
        let mut obj = format::header(Kind::Key).to_vec();
        obj.extend_from_slice(&serde_json::to_vec(&file).unwrap());
        obj.into()
    }

    #[test]
    fn an_oversized_config_is_refused_naming_it_without_reading_it() {
        let store = memory_repo().store().clone();
        store
            .put(
                "config",
                Bytes::from(vec![0u8; MAX_CONFIG_OBJECT as usize + 1]),
            )
            .unwrap();
        let err = Repository::open(store.clone(), b"pw").unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { object, .. } if object == "config"),
            "{err}"
        );
        assert!(err.to_string().contains("not read"), "{err}");
        assert_eq!(store.requests().bytes_down, 0);
    }

    #[test]
    fn bad_key_files_are_skipped_by_name_and_the_good_one_opens() {
        let store = memory_repo().store().clone();
        // Listed before the good key file (names sort), as an attacker would.
        store
            .put(
                "keys/0-damaged",
                Bytes::from_static(b"FERY\x02\x01\x00\x00{not json"),
            )
            .unwrap();
        let huge = KdfParams {
            memory_kib: 1024 * 1024,
            iterations: 64,
            ..KdfParams::default()
        };
        store.put("keys/1-huge", key_object(huge)).unwrap();
        store
            .put(
                "keys/2-giant",
                Bytes::from(vec![b' '; MAX_KEY_FILE as usize + 1]),
            )
            .unwrap();
        let started = std::time::Instant::now();
        let repo = Repository::open(store.clone(), b"pw").unwrap();
        // The huge parameters were refused, not derived (that takes 1 GiB and ~20 s).
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let warnings = repo.warnings();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        for (w, name) in warnings
            .iter()
            .zip(["keys/0-damaged", "keys/1-huge", "keys/2-giant"])
        {
            assert!(w.contains(name), "{w}");
        }
        assert!(
            warnings[1].contains("exceed what Ferry writes"),
            "{}",
            warnings[1]
        );
        // With a wrong password the error still names what could not be tried.
        let err = Repository::open(store, b"wrong").unwrap_err();
        assert!(matches!(err, Error::WrongPassword { .. }), "{err}");
        assert!(err.to_string().contains("keys/1-huge"), "{err}");
    }

    #[test]
    fn a_key_file_with_costly_parameters_is_tried_after_the_usual_ones() {
        let store = memory_repo().store().clone();
        // Within the bounds, but costing about a second and 256 MiB if tried.
        let costly = KdfParams {
            memory_kib: crate::crypto::MAX_KDF_MEMORY_KIB,
            iterations: 3,
            ..KdfParams::default()
        };
        store.put("keys/0-costly", key_object(costly)).unwrap();
        let started = std::time::Instant::now();
        let repo = Repository::open(store, b"pw").unwrap();
        assert!(repo.warnings().is_empty());
        assert!(
            started.elapsed() < std::time::Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn packs_are_cut_at_the_repository_pack_size_which_it_keeps() {
        let mut data = vec![0u8; 24 << 20];
        crate::testing::noise(&mut data, 7);
        let packs = |repo: &Repository| {
            let mut sizes: Vec<u64> = repo
                .store()
                .list("packs/")
                .unwrap()
                .into_iter()
                .map(|(_, size)| size)
                .collect();
            sizes.sort_unstable();
            sizes
        };
        let default = crate::testing::memory_repo();
        crate::testing::backup_bytes(&default, &data);
        assert_eq!(packs(&default).len(), 2, "{:?}", packs(&default));

        let fresh = Store::memory();
        let small = Repository::init(
            fresh.clone(),
            b"pw",
            InitOptions {
                pack_size: pack::MIN_PACK_SIZE as u64,
                ..crate::testing::cheap_init()
            },
        )
        .unwrap();
        let point = crate::testing::backup_bytes(&small, &data);
        let sizes = packs(&small);
        assert!(sizes.len() >= 6, "{sizes:?}");
        let one_chunk = (64 << 10) + 4096;
        assert!(
            sizes
                .iter()
                .all(|&s| s <= pack::MIN_PACK_SIZE as u64 + one_chunk),
            "{sizes:?}"
        );
        // The size is the repository's: it comes back when it is opened, and
        // prune's repacked packs are cut at it too.
        let reopened = Repository::open(fresh, b"pw").unwrap();
        assert_eq!(reopened.config().pack_size, pack::MIN_PACK_SIZE as u64);
        let mut changed = data.clone();
        for block in changed.chunks_mut(128 << 10) {
            block[..64 << 10].fill(1);
        }
        let second = crate::testing::backup_bytes(&reopened, &changed);
        crate::prune::forget(&reopened, &Default::default(), None, &[point.id], false).unwrap();
        let report = crate::testing::prune_all(&reopened);
        assert!(report.repacked_packs >= 6, "{report:?}");
        let sizes = packs(&reopened);
        assert!(
            sizes
                .iter()
                .all(|&s| s <= pack::MIN_PACK_SIZE as u64 + one_chunk),
            "{sizes:?}"
        );
        assert_eq!(
            crate::testing::restore_bytes(&reopened, &second.id),
            changed
        );
        // The default is left out of the config, which older builds then read.
        let json = serde_json::to_string(default.config()).unwrap();
        assert!(!json.contains("pack_size"), "{json}");
        assert!(
            serde_json::to_string(reopened.config())
                .unwrap()
                .contains("pack_size")
        );
    }

    #[test]
    fn a_pack_size_out_of_range_is_refused_at_init_naming_the_range() {
        for size in [1u64 << 20, 256 << 20] {
            let err = Repository::init(
                Store::memory(),
                b"pw",
                InitOptions {
                    pack_size: size,
                    ..crate::testing::cheap_init()
                },
            )
            .unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{err}");
            assert!(err.to_string().contains("4 to 128 MiB"), "{err}");
        }
    }

    #[test]
    fn a_damaged_config_is_not_reported_as_a_wrong_password() {
        let store = memory_repo().store().clone();
        let mut config = store.get("config").unwrap().to_vec();
        let last = config.len() - 20;
        config[last] ^= 1;
        store.put("config", config.into()).unwrap();
        let err = Repository::open(store.clone(), b"pw").unwrap_err();
        assert!(matches!(err, Error::DamagedConfig { keys: 1, .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("config") && text.contains("damaged"),
            "{text}"
        );
        assert!(
            text.contains("another replica") && text.contains("undelete"),
            "{text}"
        );
        assert!(!err.is_usage());
        // A wrong password is still a wrong password.
        assert!(matches!(
            Repository::open(store, b"not the password"),
            Err(Error::WrongPassword { .. })
        ));
    }

    #[test]
    fn a_sealed_point_bomb_is_refused_naming_it() {
        let repo = memory_repo();
        let good = backup_bytes(&repo, &[1u8; 4096]);
        // Sealed with the repository's key, as a password holder could: a disk
        // claimed so large that its list ids (all the same, so they compress to
        // almost nothing) exceed what a point may hold.
        let lists = point::MAX_POINT_BODY / 32 + 1;
        let mut meta = good.meta.clone();
        meta.disks[0].size = lists as u64 * point::LIST_SPAN;
        let (id, obj) = point::encode(&repo.key, &meta, &[vec![good.lists[0][0]; lists]]);
        assert!(obj.len() < 1 << 20, "a bomb: {} bytes", obj.len());
        repo.put_object(&point::object_name(&id), obj).unwrap();
        let err = repo.load_point(&id).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { object, .. } if *object == point::object_name(&id)),
            "{err}"
        );
        assert!(err.to_string().contains("at most"), "{err}");
        let (ok, bad) = repo.points().unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(bad.len(), 1);
    }

    #[test]
    fn an_oversized_point_object_is_refused_without_reading_it() {
        let repo = memory_repo();
        let id = "ab".repeat(32);
        repo.store
            .put(
                &point::object_name(&id),
                Bytes::from(vec![0u8; point::MAX_POINT_OBJECT as usize + 1]),
            )
            .unwrap();
        let before = repo.store.requests().bytes_down;
        let err = repo.load_point(&id).unwrap_err();
        assert!(err.to_string().contains(&format!("points/{id}")), "{err}");
        assert!(err.to_string().contains("not read"), "{err}");
        assert_eq!(repo.store.requests().bytes_down, before);
    }

    #[test]
    fn the_point_cache_keeps_what_its_budget_allows() {
        let repo = memory_repo();
        let good = backup_bytes(&repo, &[1u8; 4096]);
        let mut cache = PointCache::default();
        // Three points of 24 MiB of list ids each: the third does not fit.
        for i in 0..3 {
            let mut p = good.clone();
            p.id = format!("{i}");
            p.lists = vec![vec![good.lists[0][0]; 3 << 18]];
            cache.insert(&p);
        }
        assert_eq!(cache.points.len(), 2);
        assert!(cache.bytes <= POINT_CACHE_BYTES);
    }
}
