//! The orchestrator's one error type, and the single place that decides what
//! each error means at the edges: the process exit code and the HTTP status.
//!
//! Library code returns [`Error`]; command bodies may wrap it in `anyhow`
//! with context, and [`exit_code`] looks through that wrapping.

use ferry_engine::Diagnostics;

/// What went wrong, by meaning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What the user asked for cannot be done as asked (a flag, a param, a
    /// path). Exit code 2, HTTP 400.
    #[error("{0}")]
    Usage(String),
    /// A runbook has problems; every one of them, with its position.
    /// Exit code 2, HTTP 422.
    #[error("{0}")]
    Invalid(Diagnostics),
    /// Something named does not exist (a run, a step). Exit code 2, HTTP 404.
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the current state (approving a step that is
    /// not waiting, cancelling a finished run). Exit code 2, HTTP 409.
    #[error("{0}")]
    Conflict(String),
    /// A request is larger or costlier than this server accepts. Exit code 2,
    /// HTTP 413.
    #[error("{0}")]
    TooLarge(String),
    /// No identity, or a wrong one (a bad password, token or session).
    /// Exit code 2, HTTP 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// The identity's role does not allow this. Exit code 2, HTTP 403.
    #[error("{0}")]
    Forbidden(String),
    /// Too many tries (failed logins); the seconds to wait. Exit code 2,
    /// HTTP 429.
    #[error("{0}")]
    TooMany(String, u64),
    /// Something this server needs is not set up (no repository given to
    /// `ferry serve`): the operator's to fix, said plainly. Exit code 1, HTTP
    /// 503.
    #[error("{0}")]
    Unavailable(String),
    /// The repository or the data plane said no.
    #[error(transparent)]
    Repository(#[from] ferry_agent::Error),
    /// Anything else: the state database, the file system, a bug. Exit code
    /// 1, HTTP 500 (with the details in the server's log, not in the body).
    #[error(transparent)]
    Internal(anyhow::Error),
}

/// An `anyhow` error becomes the typed error it carries, if it carries one
/// (so a `NotFound` wrapped with context is still a 404), else `Internal`.
impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Error {
        if e.downcast_ref::<Error>().is_some() {
            return match e.downcast::<Error>() {
                Ok(inner) => inner,
                Err(e) => Error::Internal(e),
            };
        }
        if e.downcast_ref::<ferry_agent::Error>().is_some() {
            return match e.downcast::<ferry_agent::Error>() {
                Ok(inner) => Error::Repository(inner),
                Err(e) => Error::Internal(e),
            };
        }
        Error::Internal(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn usage(m: impl Into<String>) -> Error {
        Error::Usage(m.into())
    }

    pub fn not_found(m: impl Into<String>) -> Error {
        Error::NotFound(m.into())
    }

    pub fn conflict(m: impl Into<String>) -> Error {
        Error::Conflict(m.into())
    }

    /// The process exit code: 2 for the user's input, 1 for a failed operation.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_)
            | Error::Invalid(_)
            | Error::NotFound(_)
            | Error::Conflict(_)
            | Error::TooLarge(_)
            | Error::Unauthenticated(_)
            | Error::Forbidden(_)
            | Error::TooMany(..) => 2,
            Error::Repository(e) if e.is_usage() => 2,
            Error::Repository(_) | Error::Internal(_) | Error::Unavailable(_) => 1,
        }
    }

    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::Usage(_) => 400,
            Error::Invalid(_) => 422,
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::TooLarge(_) => 413,
            Error::Unauthenticated(_) => 401,
            Error::Forbidden(_) => 403,
            Error::TooMany(..) => 429,
            // The repository cannot be read as configured on the server:
            // the server's configuration, not the client's request.
            Error::Repository(_) => 502,
            Error::Unavailable(_) => 503,
            Error::Internal(_) => 500,
        }
    }
}

/// Whether another try of a step could help, for each data-plane error.
/// Written out variant by variant: a new variant does not compile until
/// someone decides its class here.
pub fn class_of(e: &ferry_agent::Error) -> ferry_engine::runbook::ErrorClass {
    use ferry_agent::Error as E;
    use ferry_engine::runbook::ErrorClass::{Cancelled, Permanent, Transient};
    match e {
        // The input or the repository's configuration is wrong; the same
        // try gives the same answer.
        E::NoRepository { .. }
        | E::AlreadyExists { .. }
        | E::WrongPassword { .. }
        | E::UnsupportedVersion { .. }
        | E::InvalidInput(_)
        | E::PointNotFound(_)
        | E::Source { .. } => Permanent,
        // Damage does not heal by itself (`ferry check`, another replica).
        E::Corrupt { .. } | E::DamagedChunk { .. } | E::DamagedConfig { .. } => Permanent,
        // Something not ours sits where a restore writes: a person must look.
        E::UnsafeTarget { .. } => Permanent,
        // An object not visible yet, a lock held, a source or target that
        // changed under us, a full target disk: another try may find it
        // better.
        // A store's answer: the data plane's own retry policy decides.
        E::Store { .. } | E::Unreachable { .. } | E::Quorum { .. } => match e.retry() {
            ferry_agent::error::Retry::Transient => Transient,
            ferry_agent::error::Retry::Never => Permanent,
        },
        // A full local disk under the index's temporary files too.
        E::Missing { .. }
        | E::Locked { .. }
        | E::SourceChanged { .. }
        | E::Target { .. }
        | E::Spill { .. } => Transient,
        E::Cancelled { .. } => Cancelled,
    }
}

/// The exit code for an error that reached `main`, looking through `anyhow`
/// context to the typed error underneath.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(fe) = cause.downcast_ref::<Error>() {
            return fe.exit_code();
        }
        if let Some(ae) = cause.downcast_ref::<ferry_agent::Error>() {
            return if ae.is_usage() { 2 } else { 1 };
        }
    }
    1
}

/// An error and its causes on one line: `a: b: c` (a cause whose text is
/// already there, as `#[error(transparent)]` and `{0}` repeat it, is left out).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_text = c.to_string();
        if !s.contains(&c_text) {
            s.push_str(": ");
            s.push_str(&c_text);
        }
        cur = c.source();
    }
    s
}

/// [`chain`] of an `anyhow` error.
pub fn anyhow_chain(e: &anyhow::Error) -> String {
    chain(e.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_look_through_context() {
        let e = anyhow::Error::from(Error::not_found("no run x")).context("approving");
        assert_eq!(exit_code(&e), 2);
        let e = anyhow::anyhow!("disk full").context("writing the state");
        assert_eq!(exit_code(&e), 1);
        let e = anyhow::Error::from(Error::Internal(anyhow::anyhow!("bug")));
        assert_eq!(exit_code(&e), 1, "an internal failure is not bad input");
        let typed = Error::from(anyhow::Error::from(Error::not_found("x")).context("finding"));
        assert_eq!(typed.http_status(), 404);
    }

    #[test]
    fn chains_do_not_repeat_transparent_causes() {
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(anyhow_chain(&e), "outer: inner");
    }
}
