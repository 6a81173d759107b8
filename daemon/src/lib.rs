//! `dbqsfs-daemon`: the node process and the command-line tool of dbqsfs.
//!
//! Goals: run the core's sans-IO state machines over real disks ([`store`]) and real QUIC
//! ([`node`], [`client`]), with no protocol decisions of their own.
//! [`volume`] connects the filesystem (`dbqsfs-fs`) to dBQS: its `Backend` over [`client`] and
//! the volume lease; the `dbqsfs` commands live in the binary (`cmd/`).
//! Non-goals: membership changes and state transfer (later issues), POSIX logic (`dbqsfs-fs`).

pub mod blocks;
pub mod client;
pub mod control;
pub mod epochs;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod files;
pub mod identity;
pub mod metrics;
pub mod ms;
pub mod node;
pub mod store;
pub mod transfer;
pub mod volume;
