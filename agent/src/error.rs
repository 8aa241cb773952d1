//! The data plane's error type: one variant per meaning, so callers (and the CLI's
//! exit codes) decide by kind, never by parsing messages.

use std::path::PathBuf;

/// Everything that can go wrong in the data plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No repository at the given location.
    #[error("no Ferry repository at {location}: create one with `ferry -r {location} init`")]
    NoRepository { location: String },

    /// A repository already exists where `init` was asked to create one.
    #[error("a repository already exists at {location}; nothing was changed")]
    AlreadyExists { location: String },

    /// No key of the repository opens with the given password. `skipped` names
    /// the key files that could not even be tried, with why.
    #[error(
        "wrong password for the repository at {location}: none of its {keys} key(s) opens with it; check FERRY_PASSWORD or --password-file{}",
        skipped_keys(skipped)
    )]
    WrongPassword {
        location: String,
        keys: usize,
        skipped: Vec<String>,
    },

    /// The password opens a key file, but the config does not authenticate under
    /// the key it holds: the config was damaged (or replaced), not the password.
    #[error(
        "the config of the repository at {location} is damaged: the password opens {keys} of its key files, but the config fails authentication under the key they hold; nothing was changed: copy `config` back from another replica of the repository, or on a versioned bucket run `ferry -r {location} undelete` to put back its first version"
    )]
    DamagedConfig { location: String, keys: usize },

    /// An object was written by a format version this build does not read.
    #[error(
        "{object} has format version {found}, but this ferry reads versions 1 to {supported}; upgrade ferry to read this repository"
    )]
    UnsupportedVersion {
        object: String,
        found: u8,
        supported: u8,
    },

    /// An object read back from storage is damaged.
    #[error("{object} is damaged: {detail}")]
    Corrupt { object: String, detail: String },

    /// An object that must exist is missing.
    #[error("{object} is missing from the repository")]
    Missing { object: String },

    /// A chunk needed by a restore is damaged or missing.
    #[error(
        "chunk {chunk} (disk {disk}, offset {offset}) cannot be restored: {detail}; run `ferry check --read-data` to see every damaged point"
    )]
    DamagedChunk {
        chunk: String,
        disk: String,
        offset: u64,
        detail: String,
    },

    /// The user asked for something that cannot be done as asked.
    #[error("{0}")]
    InvalidInput(String),

    /// A source disk could not be read.
    #[error("cannot read disk {path}: {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A source disk changed size while it was being backed up.
    #[error(
        "disk {path} changed size during the backup (from {before} to {after} bytes); nothing was committed; run the backup again once the disk is stable"
    )]
    SourceChanged {
        path: PathBuf,
        before: u64,
        after: u64,
    },

    /// Writing a restore target failed.
    #[error("cannot write {path}: {source}")]
    Target {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The index could not use its temporary files on local disk.
    #[error(
        "cannot use Ferry's temporary files (index runs, packs) in {}: {source}; free space there or set FERRY_SPILL_DIR to a private directory with room",
        path.display()
    )]
    Spill {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The object store failed.
    #[error("object store error on {object}: {source}")]
    Store {
        object: String,
        #[source]
        source: object_store::Error,
    },

    /// A restore target path holds something a restore must not write through.
    #[error(
        "{} is not a partial restore file this user created: {detail}; it may have been planted to redirect the restored disk: nothing was written through it; look at it, remove it, and restore again", path.display()
    )]
    UnsafeTarget { path: PathBuf, detail: String },

    /// The store did not answer, or kept failing, through every try: the network,
    /// the endpoint or the service is down (not a refusal: those are `Store`).
    #[error(
        "cannot reach the object store at {location} for {object} after {attempts} tries: {source}; check the endpoint, the network and that the service is up, then run this again"
    )]
    Unreachable {
        location: String,
        object: String,
        attempts: u32,
        // Boxed: it keeps `Error` (and every `Result`) small.
        #[source]
        source: Box<object_store::Error>,
    },

    /// A write reached fewer replicas than the repository's write quorum.
    #[error(
        "{object} cannot reach the {needed} replicas the repository's write quorum needs ({stored} had stored it when the others failed): {detail}; nothing that depends on it was committed: bring a replica back (or check its credentials) and run this again"
    )]
    Quorum {
        object: String,
        stored: usize,
        needed: usize,
        detail: String,
    },

    /// The store refused to delete an object version that is under Object Lock.
    #[error("{object} is under Object Lock{}; it stays until then ({source})", until.map(|u| format!(" until {}", u.format("%Y-%m-%d %H:%M UTC"))).unwrap_or_default())]
    Locked {
        object: String,
        until: Option<chrono::DateTime<chrono::Utc>>,
        #[source]
        source: object_store::Error,
    },

    /// The caller cancelled the operation (a timeout, a cancelled run).
    #[error("{operation} was cancelled; {kept}")]
    Cancelled { operation: String, kept: String },

    /// A recovery point reference matched nothing (or too much).
    #[error("{0}")]
    PointNotFound(String),
}

pub use crate::retry::Retry;

impl Error {
    /// Whether retrying may help. Exhaustive on purpose, with no catch-all arm: a
    /// new variant does not compile until someone decides.
    pub fn retry(&self) -> Retry {
        match self {
            Error::Store { source, .. } => crate::retry::retry_of(source),
            Error::Unreachable { source, .. } => crate::retry::retry_of(source),
            // A replica may come back: the next try may reach the quorum.
            Error::Quorum { .. } => Retry::Transient,
            // Another process may finish what it is doing (a lock, a racing prune)
            // but not without the user: these are answers, not hiccups.
            Error::NoRepository { .. }
            | Error::AlreadyExists { .. }
            | Error::WrongPassword { .. }
            | Error::UnsupportedVersion { .. }
            | Error::Corrupt { .. }
            | Error::Missing { .. }
            | Error::DamagedChunk { .. }
            | Error::InvalidInput(_)
            | Error::Source { .. }
            | Error::SourceChanged { .. }
            | Error::Target { .. }
            | Error::Spill { .. }
            | Error::Locked { .. }
            | Error::Cancelled { .. }
            | Error::DamagedConfig { .. }
            | Error::UnsafeTarget { .. }
            | Error::PointNotFound(_) => Retry::Never,
        }
    }

    /// True when the error is the user's input (exit code 2), false for a failed operation (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::NoRepository { .. }
                | Error::AlreadyExists { .. }
                | Error::WrongPassword { .. }
                | Error::InvalidInput(_)
                | Error::PointNotFound(_)
                | Error::Source { .. }
        )
    }

    pub(crate) fn corrupt(object: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn store(object: impl Into<String>, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => Error::Missing {
                object: object.into(),
            },
            source => Error::Store {
                object: object.into(),
                source,
            },
        }
    }
}

fn skipped_keys(skipped: &[String]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    format!(
        " ({} could not be tried: {})",
        skipped.len(),
        skipped.join("; ")
    )
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
