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
use crate::point::{self, Point};
use crate::store::{LockPolicy, Store};

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
}

/// Options for `init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub chunker: Chunker,
    pub compression_level: i32,
    pub kdf: KdfParams,
    pub lock: Option<LockPolicy>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunker: Chunker::default(),
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            kdf: KdfParams::default(),
            lock: None,
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
    points_read: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Point>>>,
}

impl Repository {
    /// Create a repository. Keys go first and the config last, so a crash leaves
    /// either nothing usable or a complete repository.
    pub fn init(store: Store, password: &[u8], opts: InitOptions) -> Result<Repository> {
        opts.chunker.validate()?;
        if !(1..=19).contains(&opts.compression_level) {
            return Err(Error::InvalidInput(format!(
                "compression level {} must be from 1 to 19",
                opts.compression_level
            )));
        }
        if store.exists("config")? {
            return Err(Error::AlreadyExists {
                location: store.location().to_string(),
            });
        }
        if let Some(lock) = opts.lock {
            if lock.days == 0 {
                return Err(Error::InvalidInput(
                    "an Object Lock retention must be at least 1 day".into(),
                ));
            }
            let enabled = match store.versioned() {
                Some(v) => store
                    .block_on(v.lock_enabled())
                    .map_err(|e| Error::store("bucket lock configuration", e))?,
                None => false,
            };
            if !enabled {
                return Err(Error::InvalidInput(format!(
                    "{} cannot keep immutable recovery points: its bucket does not have S3 Object Lock enabled; create the bucket with Object Lock (aws s3api create-bucket --object-lock-enabled-for-bucket) or init without --object-lock",
                    store.location()
                )));
            }
        }
        let store = store.with_lock(opts.lock);
        let key = MasterKey::generate();
        let key_file = key.wrap(password, opts.kdf)?;
        let mut obj = format::header(Kind::Key).to_vec();
        obj.extend_from_slice(&serde_json::to_vec_pretty(&key_file).expect("key file serialises"));
        store.put(&format!("keys/{}", random_hex(16)), obj.into())?;
        let config = Config {
            id: random_hex(16),
            created: Utc::now(),
            chunker: opts.chunker,
            compression_level: opts.compression_level,
            lock: opts.lock,
        };
        let header = format::header(Kind::Config);
        let mut obj = header.to_vec();
        key.seal_into(
            &header,
            &serde_json::to_vec(&config).expect("config serialises"),
            &mut obj,
        );
        store.put("config", obj.into())?;
        Ok(Repository {
            store,
            key,
            config,
            points_read: Default::default(),
        })
    }

    /// Open a repository with a password.
    pub fn open(store: Store, password: &[u8]) -> Result<Repository> {
        let config_obj = match store.get("config") {
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
        // Try every key: a key left by an interrupted `init` may open with the same
        // password yet hold another secret, and one unreadable key file must not
        // lock the user out when another one opens.
        let mut unreadable = Vec::new();
        for (name, _) in &keys {
            let file = match store.get(name).and_then(|bytes| {
                let body = format::split(name, Kind::Key, &bytes)?;
                serde_json::from_slice::<KeyFile>(body)
                    .map_err(|e| Error::corrupt(name, format!("key file: {e}")))
            }) {
                Ok(f) => f,
                Err(e) => {
                    unreadable.push(e);
                    continue;
                }
            };
            let Some(key) = MasterKey::unwrap(&file, password)? else {
                continue;
            };
            let Some(json) = key.open(&format::header(Kind::Config), sealed) else {
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
            if config.lock.is_some() && store.versioned().is_none() {
                tracing::warn!(
                    "the repository was created with Object Lock, but {} has no Object Lock; new objects are not locked",
                    store.location()
                );
            }
            let store = store.with_lock(config.lock);
            return Ok(Repository {
                store,
                key,
                config,
                points_read: Default::default(),
            });
        }
        if let Some(e) = unreadable.into_iter().next() {
            tracing::warn!(error = %e, "a key file is unreadable");
        }
        Err(Error::WrongPassword {
            location: store.location().to_string(),
            keys: keys.len(),
        })
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
        if let Some(p) = self.points_read.lock().expect("point cache").get(id) {
            return Ok(p.clone());
        }
        let bytes = self.store.get(&point::object_name(id))?;
        if blake3::hash(&bytes).to_hex().as_str() != id {
            return Err(Error::corrupt(
                point::object_name(id),
                "content does not match its name",
            ));
        }
        let p = point::decode(&self.key, id, &bytes)?;
        self.points_read
            .lock()
            .expect("point cache")
            .insert(id.to_string(), p.clone());
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
        let loc = index.get(id).ok_or_else(|| Error::Missing {
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
        let entry = crate::pack::BlobEntry {
            id: *id,
            offset: loc.offset,
            length: loc.length,
            raw_len: loc.raw_len,
        };
        crate::pack::ChunkOpener::default()
            .open(&self.key, &entry, &sealed)
            .map(<[u8]>::to_vec)
            .map_err(|d| Error::corrupt(what, format!("in {pack_name}: {d}")))
    }

    /// Load a chunk list that describes `span` bytes, through the index.
    pub fn load_list(
        &self,
        index: &crate::index::Index,
        id: &point::ListId,
        span: u64,
    ) -> Result<Vec<point::Extent>> {
        let what = format!("chunk list {}", &id.to_hex()[..16]);
        let body = self.read_blob(index, id, &what)?;
        point::decode_list_body(&what, &body, span)
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

    /// Resolve `ID`, an unambiguous id prefix, `SOURCE@latest` or `SOURCE@TIME`
    /// (the newest point at or before TIME, RFC 3339 or `YYYY-MM-DD[ HH:MM[:SS]]` UTC).
    pub fn resolve(&self, reference: &str) -> Result<Point> {
        if let Some((source, when)) = reference.split_once('@') {
            let (points, _) = self.points()?;
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
                "{reference:?} is not a recovery point: give an id (at least 4 hex digits), SOURCE@latest or SOURCE@TIME"
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
