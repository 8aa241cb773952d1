//! Ferry's data plane: block sources, chunking, encryption, packs, indexes,
//! recovery points, backup, restore and check.
//!
//! Architecture invariant: this crate never holds cloud control-plane credentials;
//! it only reads sources and reads and writes its repository.

pub mod backup;
mod cache;
pub mod check;
pub mod chunker;
#[cfg(test)]
mod compat;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod copy;
pub mod crypto;
pub mod error;
pub mod format;
pub mod index;
pub mod instant;
pub mod keys;
pub mod lock;
pub mod pack;
pub mod point;
pub mod progress;
pub mod prune;
pub mod replica;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod retry;
pub mod sink;
pub mod source;
pub mod spill;
pub mod stats;
pub mod store;
pub mod table;
#[cfg(test)]
mod testing;
pub mod tier;
pub mod undelete;

pub use error::{Error, Result, Retry};
pub use repo::Repository;
pub use store::Store;
