//! dbqsfs-fs: the POSIX filesystem of dbqsfs and its FUSE mapping.
//!
//! Goals: a POSIX filesystem whose state lives entirely in dBQS: inodes and directory buckets as
//! owner-signed, versioned records, file contents as immutable content-addressed chunks. A fresh
//! mount over the same backend sees everything a previous mount made durable.
//!
//! Layers:
//! - [`backend`]: the storage interface (`Backend`) and an in-memory implementation for tests.
//! - [`crypt`]: encryption at rest, a `Backend` wrapper the rest of the crate never sees.
//! - [`layout`]: record labels and value encodings on the backend.
//! - `gc`: the writer's collector, which releases what the volume no longer reaches;
//!   [`snapshot`]: named committed states, kept whole by the collector while they exist.
//! - [`volume`]: `Volume`, all POSIX logic on inode numbers, with no FUSE types (so it is tested
//!   without a mount); directories in `dir`, file contents and caches in `file`.
//! - [`fuse`]: a thin fuser adapter over `Volume`, and `mount`.
//! - [`error`]: `FsError` and the single backend-error → errno mapping.
//!
//! Non-goals (for now): several read-write mounts of one volume (the daemon's volume lease keeps
//! to one; read-only volumes follow the head with `Volume::refresh`), garbage collection of
//! records (chunks are collected), POSIX ACLs and file locks beyond the kernel's local ones.

pub mod backend;
mod commit;
pub mod crypt;
mod dir;
pub mod error;
mod file;
pub mod fuse;
mod gc;
mod image;
pub mod layout;
pub mod mounts;
pub mod quota;
pub mod snapshot;
pub mod volume;

pub use backend::{Backend, BackendError, Capacity, ChunkId, Failure, MemBackend, Record};
pub use error::{backend_errno, FsError, FsResult};
pub use fuse::{mount, MountError, MountHandle, MountOptions};
pub use layout::{FileKind, Timestamp};
pub use volume::{
    Attr, Cred, DirListEntry, GcStats, SetAttr, StatFs, TimeSet, Volume, VolumeConfig,
};
