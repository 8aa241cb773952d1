//! A directory repository whose objects only their owner can read.
//!
//! `object_store`'s local store creates files with the process umask (usually
//! 0644) and offers no way to choose a mode. Key files are what an offline
//! password guess starts from, and the rest is the user's encrypted data, so
//! [`PrivateDir`] sets every object it writes to 0600 right after the write, and
//! `store::open` creates a new repository directory 0700, which also closes the
//! moment between the write and the `chmod`. Objects written in parts (64 MiB and
//! more) keep the umask's mode and rely on the directory.

use std::fmt;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// The mode of every object Ferry writes to a directory repository.
pub const FILE_MODE: u32 = 0o600;
/// The mode of a repository directory Ferry creates.
pub const DIR_MODE: u32 = 0o700;

/// A [`LocalFileSystem`] that makes each object it writes private.
#[derive(Debug)]
pub struct PrivateDir {
    inner: LocalFileSystem,
}

impl PrivateDir {
    pub fn new(inner: LocalFileSystem) -> Self {
        PrivateDir { inner }
    }

    fn restrict(&self, location: &Path) -> object_store::Result<()> {
        let file = self.inner.path_to_filesystem(location)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(FILE_MODE)).map_err(|e| {
            object_store::Error::Generic {
                store: "LocalFileSystem",
                source: format!("cannot make {} private (mode 0600): {e}", file.display()).into(),
            }
        })
    }
}

impl fmt::Display for PrivateDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Private({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for PrivateDir {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let r = self.inner.put_opts(location, payload, opts).await?;
        self.restrict(location)?;
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await?;
        self.restrict(to)
    }
}
