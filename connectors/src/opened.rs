//! What opening a repository location gives: the store, its multipart API,
//! its versioned side and its unfinished writes. Shared by `store` (which picks the kind of
//! location) and the modules that open one kind (`s3`), so that neither
//! imports the other.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::multipart::MultipartStore;
use object_store::prefix::PrefixStore;

/// What a location opens to.
pub struct Opened {
    /// The store every request goes to.
    pub inner: Arc<dyn ObjectStore>,
    /// Its multipart API, where it has one (S3, Azure, GCS): the same store.
    pub parts: Option<Arc<dyn MultipartStore>>,
    /// Versions and Object Lock (S3).
    pub versioned: Option<Arc<dyn ferry_agent::store::Versioned>>,
    /// Where unfinished writes leave files the listing hides (directories).
    pub leftovers: Option<Arc<dyn ferry_agent::store::Leftovers>>,
}

/// `store` under `prefix` (none when empty), as a store and as its
/// multipart API, both naming objects the same way.
pub fn with_parts<S: ObjectStore + MultipartStore>(
    store: S,
    prefix: &str,
) -> (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>) {
    if prefix.is_empty() {
        let s = Arc::new(store);
        (s.clone(), s)
    } else {
        let s = Arc::new(PrefixStore::new(store, prefix));
        (s.clone(), s)
    }
}
