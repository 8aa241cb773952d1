//! Counters a long operation updates and a front end (progress bar, status API) reads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Progress of a backup, restore or check, in bytes.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes the operation will go through in all (0 until known).
    pub total: AtomicU64,
    /// Bytes gone through so far.
    pub done: AtomicU64,
    /// Set by whoever no longer wants the result (a timeout, a cancelled
    /// run); the operation stops at its next chunk with `Error::Cancelled`.
    pub cancel: AtomicBool,
}

impl Progress {
    pub fn add_total(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
    /// Asks the operation to stop as soon as it can.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}
