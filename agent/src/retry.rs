//! The one retry decision of the data plane: [`Retry`], the typed causes
//! connectors put in a store error's chain ([`ServerAnswer`], [`NoAnswer`],
//! [`ShortBody`], [`TimedOut`]), and [`retry_of`], which reads them. Below
//! both `error` and `store`, which use it.

use std::time::Duration;

/// Whether trying the same thing again may succeed: the one retry decision of
/// the data plane. The store's retry loop and the callers above it (the
/// orchestrator's error classes) ask this, never the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The store or the network failed for a while (a 5xx or 429 answer, no
    /// answer, a reset, a timeout, a body cut short): the same request may succeed
    /// after a pause.
    Transient,
    /// The same request gets the same answer (not found, access denied, a full
    /// disk, damaged data, bad input): fix the cause first.
    Never,
}

/// A store's answer with an HTTP status that object_store passes on as its
/// catch-all `Generic` error (throttling, server errors). Connectors put it in
/// the error's cause chain so that [`retry_of`] decides by the status, not the text.
#[derive(Debug, thiserror::Error)]
#[error("{store} answered HTTP {status}{}", if code.is_empty() { String::new() } else { format!(" {code}") })]
pub struct ServerAnswer {
    /// Which service answered (`S3`, `Azure`, `GCS`, `faults`).
    pub store: &'static str,
    pub status: u16,
    /// The service's error code when it gave one (`SlowDown`, `InternalError`).
    pub code: String,
}

/// A request that got no complete answer: the connection failed, was reset or
/// timed out, or the body was cut off. Connectors wrap transport errors in it.
#[derive(Debug, thiserror::Error)]
#[error("no complete answer from {store}")]
pub struct NoAnswer {
    pub store: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// A response body shorter than its headers announced.
#[derive(Debug, thiserror::Error)]
#[error("{object}: short response body: expected {want} bytes, got {got}")]
pub struct ShortBody {
    pub object: String,
    pub want: u64,
    pub got: u64,
}

/// A request that took longer than the store's retry policy allows.
#[derive(Debug, thiserror::Error)]
#[error("{object}: no answer within {after:?} (timeout)")]
pub struct TimedOut {
    pub object: String,
    pub after: Duration,
}

/// Whether a store error is worth another try: by the error's variant, and for
/// object_store's catch-all `Generic` by the typed causes in its chain
/// ([`ServerAnswer`], [`NoAnswer`], [`ShortBody`], [`TimedOut`], an I/O error's
/// kind), never by message text and never by `Generic` alone: a `Generic` error
/// with none of those causes is not retried.
pub fn retry_of(e: &object_store::Error) -> Retry {
    use object_store::Error as E;
    match e {
        E::Generic { source, .. } => retry_of_cause(source.as_ref()),
        // A task of the store's own runtime died or was cancelled.
        E::JoinError { .. } => Retry::Transient,
        E::NotFound { .. }
        | E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::AlreadyExists { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::NotImplemented { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::UnknownConfigurationKey { .. } => Retry::Never,
        // object_store's error is `#[non_exhaustive]`: a variant added upstream is
        // not retried until it is judged here.
        _ => Retry::Never,
    }
}

/// The first typed cause in the chain that says something decides.
fn retry_of_cause(e: &(dyn std::error::Error + 'static)) -> Retry {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(a) = err.downcast_ref::<ServerAnswer>() {
            return match a.status {
                // Request timeout, throttling, and server errors but "not
                // implemented" (501) and "version not supported" (505).
                408 | 429 | 500 | 502..=504 | 506..=599 => Retry::Transient,
                _ => Retry::Never,
            };
        }
        if err.is::<NoAnswer>() || err.is::<ShortBody>() || err.is::<TimedOut>() {
            return Retry::Transient;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return match io.kind() {
                K::ConnectionReset
                | K::ConnectionAborted
                | K::ConnectionRefused
                | K::NotConnected
                | K::BrokenPipe
                | K::TimedOut
                | K::Interrupted
                | K::WouldBlock
                | K::UnexpectedEof => Retry::Transient,
                _ => Retry::Never,
            };
        }
        cur = err.source();
    }
    Retry::Never
}
