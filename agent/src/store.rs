//! A synchronous face on an `object_store` store, with request accounting.
//!
//! The data plane runs its CPU stages on plain threads; this wrapper owns a small
//! tokio runtime and blocks on each request, so IO threads overlap CPU threads
//! without the pipeline itself being async.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};

/// Requests and bytes, for summaries and cost accounting.
#[derive(Debug, Default)]
pub struct Counters {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub lists: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Requests {
    pub puts: u64,
    pub gets: u64,
    pub lists: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// An object store plus the runtime that drives it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    rt: Arc<tokio::runtime::Runtime>,
    location: String,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.location)
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
            rt: Arc::new(rt),
            location: location.into(),
            counters: Arc::default(),
        }
    }

    /// An in-memory store, for tests.
    pub fn memory() -> Self {
        Store::new(Arc::new(object_store::memory::InMemory::new()), "memory:")
    }

    /// Where the repository lives, as the user named it.
    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn requests(&self) -> Requests {
        let c = &self.counters;
        Requests {
            puts: c.puts.load(Ordering::Relaxed),
            gets: c.gets.load(Ordering::Relaxed),
            lists: c.lists.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
        }
    }

    pub fn get(&self, name: &str) -> Result<Bytes> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(name);
        let bytes = self
            .rt
            .block_on(async { self.inner.get(&path).await?.bytes().await })
            .map_err(|e| Error::store(name, e))?;
        self.counters
            .bytes_down
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    pub fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(name);
        let want = range.end - range.start;
        let bytes = self
            .rt
            .block_on(self.inner.get_range(&path, range.clone()))
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => Error::Missing {
                    object: name.to_string(),
                },
                e => Error::corrupt(
                    name,
                    format!(
                        "cannot read bytes {}..{}: {e} (truncated?)",
                        range.start, range.end
                    ),
                ),
            })?;
        if bytes.len() as u64 != want {
            return Err(Error::corrupt(
                name,
                format!(
                    "asked for bytes {}..{}, got {} bytes (truncated?)",
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

    /// Write a whole object. Stores make a put atomic: readers see all or nothing.
    pub fn put(&self, name: &str, data: Bytes) -> Result<()> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_up
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let path = Path::from(name);
        self.rt
            .block_on(self.inner.put(&path, PutPayload::from_bytes(data)))
            .map_err(|e| Error::store(name, e))?;
        Ok(())
    }

    /// Whether an object exists.
    pub fn exists(&self, name: &str) -> Result<bool> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(name);
        match self.rt.block_on(self.inner.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::store(name, e)),
        }
    }

    /// Every object under `prefix`, with its size.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let path = Path::from(prefix);
        let metas: Vec<_> = self
            .rt
            .block_on(self.inner.list(Some(&path)).try_collect())
            .map_err(|e| Error::store(prefix, e))?;
        let mut out: Vec<_> = metas
            .into_iter()
            .map(|m| (m.location.to_string(), m.size))
            .collect();
        out.sort();
        Ok(out)
    }
}
