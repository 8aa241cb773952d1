//! Backups the control plane makes itself (scheduled ones, `Job::Backup`),
//! and how a disk named as `ferry backup` names it is opened: an image file
//! or block device by path, or an NBD export by URL. (`ebs://` snapshots are
//! opened by `ferry backup` itself: a snapshot id names one instant, so a
//! schedule of one makes no sense.)

use ferry_agent::backup::{BackupOptions, DiskSpec, Summary};
use ferry_agent::source::{BlockSource, FileSource};
use ferry_connectors::nbd::{NbdSource, NbdUrl};
use std::path::PathBuf;

/// Opens disk `i` of a backup: an NBD URL (named after its export) or a
/// path (named after its file).
pub fn open_disk(d: &str, i: usize) -> ferry_agent::Result<(DiskSpec, Box<dyn BlockSource>)> {
    if NbdUrl::is_nbd(d) {
        let url = NbdUrl::parse(d).map_err(ferry_agent::Error::InvalidInput)?;
        let name = match url.export.rsplit('/').next() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("disk{i}"),
        };
        let src = NbdSource::open(&url)?;
        Ok((
            DiskSpec {
                name,
                path: PathBuf::from(url.to_string()),
            },
            Box::new(src),
        ))
    } else {
        let spec = DiskSpec::from_path(d);
        let src = FileSource::open(&spec.path)?;
        Ok((spec, Box::new(src)))
    }
}

/// A source name the control plane accepts from a request: what a point may
/// be called (no `@` or `/`), at most 128 characters, nothing unprintable.
pub fn check_source(s: &str) -> crate::error::Result<()> {
    if s.is_empty() || s.len() > 128 || s.contains(['@', '/']) || s.chars().any(char::is_control) {
        return Err(crate::error::Error::usage(format!(
            "source {s:?}: 1 to 128 characters, without '@' or '/'"
        )));
    }
    Ok(())
}

/// Why a scheduled backup could never read `d`, if it could not: the server
/// resolves nothing against a working directory, so paths are absolute.
pub fn disk_problem(d: &str) -> Option<String> {
    if NbdUrl::is_nbd(d) {
        NbdUrl::parse(d).err()
    } else if !d.starts_with('/') {
        Some(format!(
            "{d:?}: give an absolute path to an image file or device, or an nbd:// URL"
        ))
    } else {
        None
    }
}

/// One backup of `disks` into `repo` as `source`.
pub fn backup(
    repo: &ferry_agent::Repository,
    source: &str,
    disks: &[String],
) -> ferry_agent::Result<Summary> {
    let mut specs = Vec::with_capacity(disks.len());
    let mut sources = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter().enumerate() {
        let (spec, src) = open_disk(d, i)?;
        specs.push(spec);
        sources.push(src);
    }
    let opts = BackupOptions {
        source: source.to_owned(),
        disks: specs,
        consistency: None,
        time: None,
        group: None,
    };
    let refs: Vec<&dyn BlockSource> = sources.iter().map(AsRef::as_ref).collect();
    ferry_agent::backup::backup_sources(repo, &opts, &refs, &Default::default())
}
