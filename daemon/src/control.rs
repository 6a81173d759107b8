//! The daemon's own small protocol, beside dBQS: node status for `dbqsfs status`, with the node's
//! state transfers in progress.
//!
//! Goals: one closed enum, carried in the core's versioned [`dbqsfs_core::wire::Envelope`] under its
//! own protocol tag, so a node tells it apart from dBQS messages by the envelope header and decodes
//! it with the same hardened decoder. Non-goals: anything the protocol decides on; status answers
//! are informational and untrusted.

use dbqsfs_core::config::Epoch;
use dbqsfs_core::dbqs::transfer::Arc;
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
        /// State transfers running, then the last few completed ones (by this process).
        transfers: Vec<TransferStatus>,
        /// Garbage collection of the ranges lost on entering each epoch that lost some.
        gc: Vec<GcStatus>,
        /// Free space of the node's store.
        space: SpaceStatus,
    },
}

/// Free space of a node's store, and what it could not store for lack of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceStatus {
    /// Bytes free on the store's filesystem (0 if unknown).
    pub free: u64,
    /// Size of the store's filesystem (0 if unknown).
    pub size: u64,
    /// Free space kept for metadata: new content blocks are refused below it.
    pub reserve: u64,
    /// Content blocks deferred for lack of space (stored once space is back).
    pub deferred: u64,
    /// Whether the store refuses new content blocks (its last one did not fit above the reserve).
    pub full: bool,
}

/// Garbage collection of what a node lost on entering one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcStatus {
    pub epoch: Epoch,
    /// Arcs lost on entering `epoch` (from the configurations), and those collected (deleted once
    /// `2f+1` of their new group held them; persisted, so across restarts).
    pub arcs_lost: u64,
    pub arcs_collected: u64,
    /// Whether a collection of the rest is running in this process.
    pub running: bool,
    /// Objects deleted by this process.
    pub objects_deleted: u64,
}

impl GcStatus {
    pub fn complete(&self) -> bool {
        self.arcs_collected >= self.arcs_lost
    }
}

/// One state transfer of a node: into `epoch`, by units of the ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatus {
    pub epoch: Epoch,
    /// Complete: everything is stored and the node is ready in `epoch`.
    pub complete: bool,
    /// Milliseconds since this transfer started (or resumed) in this process; at completion, how
    /// long it took.
    pub elapsed_ms: u64,
    pub units: Vec<UnitStatus>,
    /// The cap on the transfer's rate (bytes/s) in force when the status was taken, if any.
    pub rate_cap: Option<u64>,
    /// That cap is the one while clients are served: the transfer yields to client traffic.
    pub yielding: bool,
}

/// Progress of one unit (an arc of the ring with one set of sources).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitStatus {
    pub arc: Arc,
    pub phase: UnitPhase,
    /// Objects of the unit held (found held, or fetched and stored durably), of those known so far
    /// (`objects_total` is 0 while the unit is being listed).
    pub objects_done: u64,
    pub objects_total: u64,
    /// Bytes of the objects held.
    pub bytes_done: u64,
    /// Objects and bytes fetched from sources and stored in this run (not found held).
    pub fetched_objects: u64,
    pub fetched_bytes: u64,
    /// Bytes per second fetched and stored, over the unit's fetching so far.
    pub rate: u64,
}

/// Where a unit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnitPhase {
    /// Waiting for 2f+1 complete listings from the old group.
    Listing,
    /// Fetching and storing the listed objects not held.
    Fetching,
    /// Every object is stored; reads of the arc may be answered.
    Done,
    /// Done before this process started (persisted progress of an interrupted transfer).
    Resumed,
}

impl TransferStatus {
    /// (objects done, objects known, bytes done, bytes fetched) over all units.
    pub fn totals(&self) -> (u64, u64, u64, u64) {
        self.units.iter().fold((0, 0, 0, 0), |(a, b, c, d), u| {
            // Saturating: a status is untrusted input to whoever prints it.
            (
                a.saturating_add(u.objects_done),
                b.saturating_add(u.objects_total),
                c.saturating_add(u.bytes_done),
                d.saturating_add(u.fetched_bytes),
            )
        })
    }

    /// Units done (in this run or before it) and units in all.
    pub fn units_done(&self) -> (usize, usize) {
        let done = self
            .units
            .iter()
            .filter(|u| matches!(u.phase, UnitPhase::Done | UnitPhase::Resumed))
            .count();
        (done, self.units.len())
    }
}

impl Protocol for ControlMessage {
    const ID: u8 = 0x40;
}

/// Whether `bytes` claim to be a control message (by the envelope header; decoding decides).
pub fn is_control(bytes: &[u8]) -> bool {
    matches!(bytes, [v, p, ..] if *v == WIRE_VERSION && *p == ControlMessage::ID)
}

/// A node's state as `status` and the metrics show it.
pub struct StatusParts {
    pub epoch: u64,
    pub ready: bool,
    pub gc: Vec<GcStatus>,
    pub space: SpaceStatus,
    pub stored_bytes: u64,
    pub transfers: Vec<TransferStatus>,
    pub members: usize,
}
