//! Opening a repository's object store from what the user typed: a directory path,
//! a `file://` URL, or `memory:` for tests. Cloud URLs (`s3://`, `gs://`, `az://`)
//! are recognised and refused with a clear message until their connectors land.

use std::sync::Arc;

use ferry_agent::{Error, Result, Store};
use object_store::local::LocalFileSystem;

/// Open the store a repository location names. `create` makes a missing directory.
pub fn open(location: &str, create: bool) -> Result<Store> {
    if location == "memory:" {
        return Ok(Store::memory());
    }
    if let Some(scheme) = ["s3://", "gs://", "az://", "azure://", "http://", "https://"]
        .iter()
        .find(|s| location.starts_with(**s))
    {
        return Err(Error::InvalidInput(format!(
            "{scheme} repositories are not supported by this build yet; use a directory path"
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
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::InvalidInput(format!("cannot create repository directory {path}: {e}"))
        })?;
    }
    let fs = LocalFileSystem::new_with_prefix(dir)
        .map_err(|e| Error::InvalidInput(format!("cannot use {path} as a repository: {e}")))?;
    Ok(Store::new(Arc::new(fs), location))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_directory_is_no_repository_unless_creating() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("repo");
        let loc = p.to_str().unwrap();
        assert!(matches!(open(loc, false), Err(Error::NoRepository { .. })));
        assert!(open(loc, true).is_ok());
        assert!(p.is_dir());
        assert!(matches!(
            open("s3://b/p", false),
            Err(Error::InvalidInput(_))
        ));
    }
}
