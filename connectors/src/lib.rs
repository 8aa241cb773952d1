//! Connectors: how Ferry reaches the outside world. For now, object stores by URL.

pub mod store;
