//! Connectors: how Ferry reaches the outside world: object stores by URL
//! (local directories, S3 and compatibles, GCS, Azure Blob) and a fault injector,
//! NBD, running QEMU VMs over QMP, and libvirt hosts through virsh.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod faults;
pub mod http;
pub mod libvirt;
pub mod nbd;
pub(crate) mod opened;
pub mod private;
pub mod protect;
pub mod qemu;
pub mod s3;
pub mod store;
