//! Undo deletions and overwrites on a versioned bucket.
//!
//! With Object Lock, someone holding the repository's credentials cannot remove a
//! locked version, but can still hide it: a plain DELETE adds a delete marker and
//! a PUT adds a newer version. Ferry writes every repository object exactly once,
//! so an object's first version is its true content. `undelete` finds every
//! object whose current version is not its first (a delete marker, or different
//! bytes) and writes the first version back as the current one, checking
//! content-addressed names (packs, index objects, points) against the bytes.
//! It needs no password: it works even when the attacker hid the config.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::store::{ObjectVersion, Store};

#[derive(Debug, Clone, Default, Serialize)]
pub struct UndeleteReport {
    pub objects: usize,
    /// Objects whose first version was put back.
    pub restored: Vec<String>,
    /// Objects hidden or overwritten whose first version is gone too.
    pub lost: Vec<String>,
    pub dry_run: bool,
}

/// Whether `bytes` is what the content-addressed `name` promises (true for names
/// that are not content-addressed).
fn matches_name(name: &str, bytes: &[u8]) -> bool {
    let hash = || blake3::hash(bytes).to_hex().to_string();
    if let Some(h) = name
        .strip_prefix("index/")
        .or_else(|| name.strip_prefix("points/"))
    {
        return h == hash();
    }
    if let Some(id) = crate::pack::parse_name(name) {
        return hex::encode(id) == hash();
    }
    true
}

pub fn undelete(store: &Store, dry_run: bool) -> Result<UndeleteReport> {
    let mut by_name: BTreeMap<String, Vec<ObjectVersion>> = BTreeMap::new();
    for v in store.versions("")? {
        by_name.entry(v.name.clone()).or_default().push(v);
    }
    let mut report = UndeleteReport {
        dry_run,
        ..UndeleteReport::default()
    };
    for (name, mut versions) in by_name {
        // Locks and prune records are Ferry's own bookkeeping, rewritten on purpose.
        if name.starts_with("locks/") || name.starts_with("trash/") {
            continue;
        }
        report.objects += 1;
        // Oldest first. Versions come newest first, and listings give
        // times to the second: a stable sort by time alone would keep an
        // attacker's overwrite made within the same second ahead of the
        // original, and take it for the first version.
        versions.reverse();
        versions.sort_by_key(|v| v.modified);
        let Some(latest) = versions.iter().find(|v| v.latest) else {
            continue;
        };
        let first = versions.iter().find(|v| !v.delete_marker);
        let Some(first) = first else {
            report.lost.push(name);
            continue;
        };
        if !latest.delete_marker && latest.version == first.version {
            continue;
        }
        if !latest.delete_marker {
            // A newer version with the same bytes (a retried put) is not an attack.
            let current = store.get_version(&name, &latest.version)?;
            let original = store.get_version(&name, &first.version)?;
            if current == original {
                continue;
            }
        }
        // The oldest version whose bytes match the name, in case the first one
        // was itself planted before the real object was written.
        let mut good = None;
        for v in versions.iter().filter(|v| !v.delete_marker) {
            let bytes = store.get_version(&name, &v.version)?;
            if matches_name(&name, &bytes) {
                good = Some(bytes);
                break;
            }
        }
        let Some(bytes) = good else {
            report.lost.push(name);
            continue;
        };
        if !dry_run {
            store.put(&name, bytes).map_err(|e| match e {
                Error::Store { .. } => Error::InvalidInput(format!(
                    "cannot write back {name}: {e}; check the credentials allow s3:PutObject"
                )),
                e => e,
            })?;
        }
        tracing::info!(object = %name, "put back the original version");
        report.restored.push(name);
    }
    Ok(report)
}
