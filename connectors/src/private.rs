//! A directory repository whose objects only their owner can read, and that a
//! power loss cannot take back once a write has returned.
//!
//! `object_store`'s local store creates files with the process umask (usually
//! 0644), offers no way to choose a mode, and calls `fsync` only when built
//! `with_fsync(true)` (off by default, and off in Ferry until 85eaa7d): a pack
//! sat in the page cache for up to half a minute, so a power loss right after
//! `ferry backup` reported success could leave a point whose packs were never
//! on disk. [`PrivateDir`] therefore writes whole objects itself:
//!
//! 1. a staging file next to the object (`NAME#DIGITS`, which the local store's
//!    listing skips), created 0600 and never readable by anyone else;
//! 2. the payload, then `fdatasync`;
//! 3. a rename over the object, so readers see all or nothing;
//! 4. `fsync` of the directory that holds the name. The first time a process
//!    writes into a directory, the directories above it up to the repository
//!    are synced too, whoever created them (they are made 0700).
//!
//! Objects written in parts (64 MiB and more, and packs over 16 MiB, which
//! `Store::put_file` sends in parts), copies and writes with a
//! condition go through the local store, built `with_fsync(true)` so that it
//! syncs before it renames; they are then made private and synced again for
//! the mode. `store::open` creates a new repository directory 0700.
//!
//! Deletes are not synced. Journaling filesystems (ext4, XFS) bring metadata
//! changes to disk in the order they were made, so a power loss can take back
//! only the last ones: a point `forget` removed may come back, but not once the
//! packs a later prune deleted for it are gone. On a filesystem without that
//! order this is not guaranteed.
//!
//! A filesystem that cannot sync a directory (`EINVAL`, as some FUSE and
//! network filesystems answer) is written without that sync, as SQLite does.

use std::collections::HashSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt as _, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    UploadPart,
};

/// The mode of every object Ferry writes to a directory repository.
pub const FILE_MODE: u32 = 0o600;
/// The mode of a repository directory Ferry creates.
pub const DIR_MODE: u32 = 0o700;

/// A [`LocalFileSystem`] whose objects are private and on disk once written.
#[derive(Debug)]
pub struct PrivateDir {
    inner: LocalFileSystem,
    /// The repository directory; the syncs after a write stop here.
    root: PathBuf,
    /// Directories whose entries up to `root` this process has synced.
    durable: Arc<Mutex<HashSet<PathBuf>>>,
}

impl PrivateDir {
    /// `inner` serves the directory `root`; it is made to sync its own writes.
    pub fn new(inner: LocalFileSystem, root: impl Into<PathBuf>) -> Self {
        PrivateDir {
            inner: inner.with_fsync(true),
            root: root.into(),
            durable: Arc::default(),
        }
    }

    fn file(&self, location: &Path) -> object_store::Result<PathBuf> {
        self.inner.path_to_filesystem(location)
    }
}

/// After the local store wrote and synced `file` by itself: private, with the
/// new mode on disk too (`fdatasync` would leave it behind).
async fn settle(file: PathBuf) -> object_store::Result<()> {
    blocking(move || {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(FILE_MODE))
            .map_err(|e| failed("make private (mode 0600)", &file, e))?;
        File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(|e| failed("sync", &file, e))
    })
    .await
}

/// Writes `payload` to `file` as described in the module's documentation.
fn write_durably(
    file: &std::path::Path,
    payload: &PutPayload,
    root: &std::path::Path,
    durable: &Mutex<HashSet<PathBuf>>,
) -> object_store::Result<()> {
    let dir = file
        .parent()
        .ok_or_else(|| failed("write", file, io::Error::other("no parent directory")))?;
    let known = durable.lock().map(|d| d.contains(dir)).unwrap_or(false);
    if !known {
        create_dirs(dir)?;
        // Whoever made them, their entries must be on disk before an object
        // in them is said to be.
        let mut at = dir;
        while at != root {
            match at.parent() {
                Some(parent) if parent.starts_with(root) => {
                    sync_dir(parent)?;
                    at = parent;
                }
                _ => break,
            }
        }
    }
    let (staged, mut f) = stage(file)?;
    let written = payload
        .iter()
        .try_for_each(|piece| f.write_all(piece))
        .and_then(|()| f.sync_data())
        .map_err(|e| failed("write", &staged, e))
        .and_then(|()| {
            drop(f);
            std::fs::rename(&staged, file).map_err(|e| failed("rename to", file, e))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    sync_dir(dir)?;
    if !known && let Ok(mut d) = durable.lock() {
        d.insert(dir.to_path_buf());
    }
    Ok(())
}

/// Creates the missing directories up to `dir`, 0700.
fn create_dirs(dir: &std::path::Path) -> object_store::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        match std::fs::symlink_metadata(d) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(d);
                at = d.parent();
            }
            Err(e) => return Err(failed("look at", d, e)),
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(d) {
            // Another writer made it first.
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(failed("create directory", d, e)),
        }
    }
    Ok(())
}

/// A new staging file for `file`, 0600 from its creation.
fn stage(file: &std::path::Path) -> object_store::Result<(PathBuf, File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        // `NAME#DIGITS`: the local store's listing skips such names.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut name = file.as_os_str().to_owned();
        name.push(format!("#{}{n}", std::process::id()));
        let staged = PathBuf::from(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&staged)
        {
            Ok(f) => return Ok((staged, f)),
            // Left by a process with our PID that died: take the next number.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(failed("create", &staged, e)),
        }
    }
}

fn sync_dir(dir: &std::path::Path) -> object_store::Result<()> {
    ferry_agent::sink::sync_dir(dir).map_err(|e| failed("sync directory", dir, e))
}

/// A file operation that failed; the `io::Error` stays the source, so that a
/// full disk is still recognised as one.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {}: {source}", path.display())]
struct FsError {
    what: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn failed(what: &'static str, path: &std::path::Path, source: io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalFileSystem",
        source: Box::new(FsError {
            what,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Runs file IO off the async workers, as the local store does.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> object_store::Result<T> + Send + 'static,
) -> object_store::Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            })?,
        Err(_) => f(),
    }
}

/// Whether `file_name` is a staging file's: `NAME#DIGITS`, as this module and
/// the local store's uploads in parts name them (and its listing hides).
fn is_staged(file_name: &str) -> bool {
    file_name
        .split_once('#')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl ferry_agent::store::Leftovers for PrivateDir {
    fn leftovers(&self) -> BoxFuture<'_, object_store::Result<Vec<ferry_agent::store::Leftover>>> {
        futures::future::ready(self.staging_files()).boxed()
    }

    fn remove_leftover<'a>(
        &'a self,
        leftover: &'a ferry_agent::store::Leftover,
    ) -> BoxFuture<'a, object_store::Result<()>> {
        futures::future::ready(self.remove_staging_file(&leftover.name)).boxed()
    }
}

impl PrivateDir {
    /// Every staging file under the repository: what a write killed before its
    /// rename (or an upload in parts never completed nor aborted) left.
    fn staging_files(&self) -> object_store::Result<Vec<ferry_agent::store::Leftover>> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                // Removed meanwhile (a prune's or a user's delete).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(failed("list", &dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| failed("list", &dir, e))?;
                let path = entry.path();
                // Links are neither followed nor removed.
                let meta = match std::fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(failed("look at", &path, e)),
                };
                if meta.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let staged = entry.file_name().to_str().is_some_and(is_staged);
                if !meta.is_file() || !staged {
                    continue;
                }
                let Some(name) = path.strip_prefix(&self.root).ok().and_then(|p| p.to_str()) else {
                    continue;
                };
                out.push(ferry_agent::store::Leftover {
                    name: name.to_string(),
                    upload: None,
                    size: meta.len(),
                    modified: meta
                        .modified()
                        .map(chrono::DateTime::<chrono::Utc>::from)
                        .map_err(|e| failed("look at", &path, e))?,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Remove the staging file `name`, and nothing that is not one.
    fn remove_staging_file(&self, name: &str) -> object_store::Result<()> {
        let rel = std::path::Path::new(name);
        let inside = rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        let staged = rel
            .file_name()
            .and_then(|f| f.to_str())
            .is_some_and(is_staged);
        let path = self.root.join(rel);
        if !inside || !staged {
            return Err(failed(
                "remove",
                &path,
                io::Error::other("not a staging file under the repository"),
            ));
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(failed(
                    "remove",
                    &path,
                    io::Error::other("not a regular file"),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(failed("look at", &path, e)),
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(failed("remove", &path, e)),
        }
    }
}

/// An upload in parts that is made private and synced once complete.
#[derive(Debug)]
struct SettledUpload {
    inner: Box<dyn MultipartUpload>,
    file: PathBuf,
}

#[async_trait]
impl MultipartUpload for SettledUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let r = self.inner.complete().await?;
        settle(self.file.clone()).await?;
        Ok(r)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
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
        let file = self.file(location)?;
        if !matches!(opts.mode, PutMode::Overwrite) || !opts.attributes.is_empty() {
            // What only the local store knows how to do (or to refuse).
            let r = self.inner.put_opts(location, payload, opts).await?;
            settle(file).await?;
            return Ok(r);
        }
        let (root, durable) = (self.root.clone(), self.durable.clone());
        blocking(move || write_durably(&file, &payload, &root, &durable)).await?;
        let meta = self.inner.head(location).await?;
        Ok(PutResult {
            e_tag: meta.e_tag,
            version: None,
            extensions: Default::default(),
        })
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(SettledUpload {
            inner,
            file: self.file(location)?,
        }))
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
        settle(self.file(to)?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt as _;
    use object_store::WriteMultipart;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn open(dir: &std::path::Path) -> PrivateDir {
        let root = dir.canonicalize().unwrap();
        PrivateDir::new(LocalFileSystem::new_with_prefix(&root).unwrap(), root)
    }

    fn staged_left(dir: &std::path::Path) -> Vec<PathBuf> {
        let mut left = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                } else if p.to_string_lossy().contains('#') {
                    left.push(p);
                }
            }
        }
        left
    }

    #[tokio::test]
    async fn an_object_lands_whole_and_private_in_new_private_directories() {
        let dir = tempfile::tempdir().unwrap();
        // A repository directory the user made, readable by all.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let store = open(dir.path());
        let path = Path::from("packs/ab/abcdef");
        let payload =
            PutPayload::from_iter([Bytes::from(vec![1u8; 1000]), Bytes::from(vec![2u8; 10])]);
        store.put(&path, payload).await.unwrap();
        let file = dir.path().join("packs/ab/abcdef");
        let mut want = vec![1u8; 1000];
        want.extend([2u8; 10]);
        assert_eq!(std::fs::read(&file).unwrap(), want);
        assert_eq!(mode(&file), FILE_MODE);
        assert_eq!(mode(&dir.path().join("packs")), DIR_MODE);
        assert_eq!(mode(&dir.path().join("packs/ab")), DIR_MODE);
        assert!(staged_left(dir.path()).is_empty());

        // A write over it replaces it; readers never see a mix.
        store
            .put(&path, Bytes::from_static(b"new").into())
            .await
            .unwrap();
        assert_eq!(
            store.get(&path).await.unwrap().bytes().await.unwrap(),
            "new"
        );

        // What a write killed half-way leaves is not an object.
        std::fs::write(dir.path().join("packs/ab/abcdef#4242"), b"half").unwrap();
        let listed: Vec<_> = store
            .list(Some(&Path::from("packs")))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(listed, vec!["packs/ab/abcdef".to_string()]);
    }

    #[tokio::test]
    async fn objects_written_in_parts_or_copied_are_private_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let big = Path::from("index/big");
        let upload = store.put_multipart(&big).await.unwrap();
        let mut w = WriteMultipart::new_with_chunk_size(upload, 1000);
        w.put(Bytes::from(vec![7u8; 2500]));
        w.finish().await.unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("index/big")).unwrap(),
            vec![7u8; 2500]
        );
        assert_eq!(mode(&dir.path().join("index/big")), FILE_MODE);

        store.copy(&big, &Path::from("index/copy")).await.unwrap();
        assert_eq!(mode(&dir.path().join("index/copy")), FILE_MODE);
    }

    #[tokio::test]
    async fn a_write_that_fails_names_the_file_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // A directory where the object should go: the rename cannot replace it.
        std::fs::create_dir_all(dir.path().join("points/p1/inner")).unwrap();
        let err = store
            .put(&Path::from("points/p1"), Bytes::from_static(b"x").into())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot rename to") && err.contains("points/p1"),
            "{err}"
        );
        assert!(staged_left(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn unfinished_writes_are_found_and_removed_and_nothing_else_is() {
        use ferry_agent::store::Leftovers as _;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .put(
                &Path::from("packs/ab/abcdef"),
                Bytes::from_static(b"pack").into(),
            )
            .await
            .unwrap();
        // Left by a put killed before its rename, and by an upload in parts
        // the local store never completed.
        std::fs::write(dir.path().join("packs/ab/abcdef#123457"), vec![1u8; 300]).unwrap();
        std::fs::create_dir_all(dir.path().join("index")).unwrap();
        std::fs::write(dir.path().join("index/big#7"), vec![2u8; 20]).unwrap();
        // Listed objects whose names merely hold a `#`, a directory named like
        // a staging file, and a link named like one whose target is the
        // user's: none of them is a leftover.
        std::fs::write(dir.path().join("packs/ab/x#note"), b"listed").unwrap();
        std::fs::create_dir_all(dir.path().join("packs/cd#9")).unwrap();
        let precious = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(precious.path(), b"the user's").unwrap();
        std::os::unix::fs::symlink(precious.path(), dir.path().join("packs/ab/link#1")).unwrap();

        let found = store.leftovers().await.unwrap();
        let names: Vec<_> = found.iter().map(|l| (l.name.as_str(), l.size)).collect();
        assert_eq!(
            names,
            [("index/big#7", 20), ("packs/ab/abcdef#123457", 300)]
        );
        let age = chrono::Utc::now() - found[0].modified;
        assert!(age.num_seconds().abs() < 60, "modified {age} ago");

        // Nothing but a staging file under the repository is removed, whatever it is asked.
        for bad in [
            "../outside#1",
            "/etc/passwd#1",
            "packs/ab/abcdef",
            "packs/ab/link#1",
            "packs/cd#9",
        ] {
            let bad = ferry_agent::store::Leftover {
                name: bad.to_string(),
                upload: None,
                size: 0,
                modified: chrono::Utc::now(),
            };
            assert!(
                store.remove_leftover(&bad).await.is_err(),
                "{bad:?} was accepted"
            );
        }
        assert_eq!(std::fs::read(precious.path()).unwrap(), b"the user's");
        for l in &found {
            store.remove_leftover(l).await.unwrap();
            // Gone already is done: two prunes may race.
            store.remove_leftover(l).await.unwrap();
        }
        assert!(store.leftovers().await.unwrap().is_empty());
        assert_eq!(
            std::fs::read(dir.path().join("packs/ab/abcdef")).unwrap(),
            b"pack"
        );
        assert!(dir.path().join("packs/ab/x#note").exists());
        assert!(
            dir.path()
                .join("packs/ab/link#1")
                .symlink_metadata()
                .is_ok()
        );
    }
}
