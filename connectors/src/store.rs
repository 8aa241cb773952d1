//! Opening a repository's object store from what the user typed: a directory
//! path, `file://`, `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`,
//! `az://CONTAINER/PREFIX`, or `memory:` for tests.
//!
//! Credentials never appear in the location: S3 takes them from the AWS SDK's
//! default chain, GCS from `GOOGLE_*` variables (service account file or
//! application default credentials), Azure from `AZURE_STORAGE_*` variables.
//!
//! `FERRY_FAULTS` wraps the store in a fault injector (see [`crate::faults`]);
//! `FERRY_STORE_TIMEOUT` (seconds) and `FERRY_STORE_ATTEMPTS` tune retries.

use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

use ferry_agent::store::RetryPolicy;
use ferry_agent::{Error, Result, Store};
use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;

use crate::faults::{FaultSpec, Faulty};
use crate::opened::{Opened, with_parts};

/// Open the store a repository location names. `create` makes a missing directory.
pub fn open(location: &str, create: bool) -> Result<Store> {
    let Opened {
        mut inner,
        mut parts,
        versioned,
        leftovers,
    } = open_inner(location, create)?;
    if let Some(spec) = fault_spec(location)? {
        tracing::warn!(?spec, location, "injecting store faults (FERRY_FAULTS)");
        let mut faulty = Faulty::new(inner, spec);
        if let Some(p) = parts {
            faulty = faulty.with_parts(p);
        }
        let faulty = Arc::new(faulty);
        parts = faulty
            .has_parts()
            .then(|| faulty.clone() as Arc<dyn MultipartStore>);
        inner = faulty;
    }
    let mut store = Store::new(inner, location)
        .with_retry(retry_policy()?)
        // The other replicas of a replicated repository, as its config names them.
        .with_opener(Arc::new(|location: &str| open(location, false)));
    if let Some(p) = parts {
        store = store.with_parts(p);
    }
    if let Some(v) = versioned {
        store = store.with_versioned(v);
    }
    if let Some(l) = leftovers {
        store = store.with_leftovers(l);
    }
    Ok(store)
}

/// The `FERRY_FAULTS` spec that applies to `location`, if any: the last of
/// its `;`-separated specs whose `at=` is in the location, or has none.
fn fault_spec(location: &str) -> Result<Option<FaultSpec>> {
    let Ok(specs) = std::env::var("FERRY_FAULTS") else {
        return Ok(None);
    };
    let mut chosen = None;
    for spec in specs.split(';').filter(|s| !s.trim().is_empty()) {
        let spec = FaultSpec::parse(spec).map_err(Error::InvalidInput)?;
        if spec
            .at
            .as_ref()
            .is_none_or(|at| location.contains(at.as_str()))
        {
            chosen = Some(spec);
        }
    }
    Ok(chosen)
}

fn retry_policy() -> Result<RetryPolicy> {
    let mut p = RetryPolicy::default();
    if let Ok(v) = std::env::var("FERRY_STORE_TIMEOUT") {
        let secs: f64 = v.parse().ok().filter(|s| *s > 0.0).ok_or_else(|| {
            Error::InvalidInput(format!(
                "FERRY_STORE_TIMEOUT={v:?} is not a number of seconds"
            ))
        })?;
        p.timeout = std::time::Duration::from_secs_f64(secs);
    }
    if let Ok(v) = std::env::var("FERRY_STORE_ATTEMPTS") {
        p.attempts = v.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
            Error::InvalidInput(format!(
                "FERRY_STORE_ATTEMPTS={v:?} is not a count of at least 1"
            ))
        })?;
    }
    Ok(p)
}

fn bucket_and_prefix<'a>(location: &'a str, scheme: &str) -> Result<(&'a str, &'a str)> {
    let rest = &location[scheme.len()..];
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{location}: no bucket or container named; write {scheme}NAME/PREFIX"
        )));
    }
    Ok((bucket, prefix.trim_matches('/')))
}

fn open_inner(location: &str, create: bool) -> Result<Opened> {
    if location == "memory:" {
        let (inner, parts) = with_parts(object_store::memory::InMemory::new(), "");
        return Ok(Opened {
            inner,
            parts: Some(parts),
            versioned: None,
            leftovers: None,
        });
    }
    let cannot = |e: object_store::Error| {
        Error::InvalidInput(format!("cannot use {location} as a repository: {e}"))
    };
    if location.starts_with("s3://") {
        return crate::s3::open(location);
    }
    if location.starts_with("gs://") {
        let (bucket, prefix) = bucket_and_prefix(location, "gs://")?;
        let gcs = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(bucket)
            .with_retry(crate::http::no_retries())
            .with_http_connector(crate::http::TypedConnector { store: "GCS" })
            .build()
            .map_err(cannot)?;
        let (inner, parts) = with_parts(gcs, prefix);
        return Ok(Opened {
            inner,
            parts: Some(parts),
            versioned: None,
            leftovers: None,
        });
    }
    if let Some(scheme) = ["az://", "azure://"]
        .into_iter()
        .find(|s| location.starts_with(s))
    {
        let (container, prefix) = bucket_and_prefix(location, scheme)?;
        let az = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_container_name(container)
            .with_retry(crate::http::no_retries())
            .with_http_connector(crate::http::TypedConnector { store: "Azure" })
            .build()
            .map_err(cannot)?;
        let (inner, parts) = with_parts(az, prefix);
        return Ok(Opened {
            inner,
            parts: Some(parts),
            versioned: None,
            leftovers: None,
        });
    }
    if location.starts_with("http://") || location.starts_with("https://") {
        return Err(Error::InvalidInput(format!(
            "{location}: give the bucket as s3://BUCKET/PREFIX?endpoint=URL (or set AWS_ENDPOINT_URL) for S3-compatible servers"
        )));
    }
    let path = location.strip_prefix("file://").unwrap_or(location);
    if path.is_empty() {
        return Err(Error::InvalidInput(
            "no repository given: pass -r/--repo or set FERRY_REPO".into(),
        ));
    }
    let dir = std::path::Path::new(path);
    if !dir.exists() {
        if !create {
            return Err(Error::NoRepository {
                location: location.to_string(),
            });
        }
        // Private from the start: nobody else may list or read what goes in.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(crate::private::DIR_MODE)
            .create(dir)
            // Its name, too, must outlive a power loss.
            .and_then(|()| ferry_agent::sink::sync_dir(dir.parent().unwrap_or(dir)))
            .map_err(|e| {
                Error::InvalidInput(format!("cannot create repository directory {path}: {e}"))
            })?;
    }
    let fs = LocalFileSystem::new_with_prefix(dir).map_err(cannot)?;
    // As the local store names its files: absolute, without links.
    let root = dir.canonicalize().map_err(|e| {
        Error::InvalidInput(format!("cannot open repository directory {path}: {e}"))
    })?;
    let dir = Arc::new(crate::private::PrivateDir::new(fs, root));
    Ok(Opened {
        inner: dir.clone(),
        // `LocalFileSystem` has no multipart API: its uploads are sent again
        // whole (`Store::put_file`).
        parts: None,
        versioned: None,
        // Staging files of writes killed before their rename: prune sweeps them.
        leftovers: Some(dir),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_repository_keeps_its_key_file_and_objects_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A directory the user made, readable by all: the objects are still private.
        let loc = dir.path().to_str().unwrap();
        let kdf = ferry_agent::crypto::KdfParams {
            memory_kib: 64,
            iterations: 1,
            ..Default::default()
        };
        ferry_agent::Repository::init(
            open(loc, true).unwrap(),
            b"correct horse",
            ferry_agent::repo::InitOptions {
                kdf,
                ..Default::default()
            },
        )
        .unwrap();
        let keys: Vec<_> = std::fs::read_dir(dir.path().join("keys"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(keys.len(), 1);
        for file in keys.iter().chain([&dir.path().join("config")]) {
            let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
    }

    #[test]
    fn missing_directory_is_no_repository_unless_creating() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("repo");
        let loc = p.to_str().unwrap();
        assert!(matches!(open(loc, false), Err(Error::NoRepository { .. })));
        assert!(open(loc, true).is_ok());
        assert!(p.is_dir());
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o700);
        assert!(matches!(open("gs://", false), Err(Error::InvalidInput(_))));
        assert!(matches!(
            open("https://example.com/x", false),
            Err(Error::InvalidInput(_))
        ));
    }
}
