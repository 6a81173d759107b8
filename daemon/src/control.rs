//! The daemon's own small protocol, beside dBQS: node status for `dbqsfs status`.
//!
//! Goals: one closed enum, carried in the core's versioned [`dbqsfs_core::wire::Envelope`] under its
//! own protocol tag, so a node tells it apart from dBQS messages by the envelope header and decodes
//! it with the same hardened decoder. Non-goals: anything the protocol decides on; status answers
//! are informational and untrusted.

use dbqsfs_core::config::Epoch;
use dbqsfs_core::wire::{Protocol, WIRE_VERSION};
use serde::{Deserialize, Serialize};

/// Messages of the control protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// Asks a node for its status.
    StatusRequest,
    /// A node's status.
    Status {
        epoch: Epoch,
        /// Bytes of content blocks held.
        stored_bytes: u64,
        /// Objects (content and public-key blocks) held.
        objects: u64,
        /// Whether the node's state transfer into `epoch` is complete.
        ready: bool,
    },
}

impl Protocol for ControlMessage {
    const ID: u8 = 0x40;
}

/// Whether `bytes` claim to be a control message (by the envelope header; decoding decides).
pub fn is_control(bytes: &[u8]) -> bool {
    matches!(bytes, [v, p, ..] if *v == WIRE_VERSION && *p == ControlMessage::ID)
}
