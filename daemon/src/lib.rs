//! `dbqsfs-daemon`: the node process and the command-line tool of dbqsfs.
//!
//! Goals: run the core's sans-IO state machines over real disks ([`store`]) and real QUIC
//! ([`node`], [`client`]), with no protocol decisions of their own.
//! Non-goals: membership changes and state transfer (later issues), the filesystem (`dbqsfs-fs`).

pub mod blocks;
pub mod client;
pub mod control;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod files;
pub mod node;
pub mod store;
pub mod volume;
