//! `ferry-agent`: protection from inside a machine. It enrolls with
//! `ferry serve` using a one-time token, polls the policy the server keeps for
//! it (devices, interval, repository, retention), cuts the devices into a
//! recovery point every interval, and pushes its status. It holds a
//! repository password and the object store's credentials from its own
//! machine, never cloud control-plane credentials, and links no cloud SDK
//! but the object stores'.
//!
//! - [`wire`]: the protocol, shared with the server.
//! - [`config`]: the agent's config file, written by enrollment.
//! - [`daemon`]: enrollment, the device inventory and the protection loop.

pub mod config;
pub mod daemon;
pub mod dm;
pub mod era;
pub mod wire;
