//! dBQS: a Byzantine quorum system of content-hash and public-key blocks over epochs.
//!
//! Goals: atomic (linearizable) reads and writes of public-key blocks and integrity of content blocks
//! while at most `f` of the `3f+1` replicas of each group are Byzantine, under any message delay, loss,
//! duplication or reordering; operations of an older epoch never complete against a newer group, and
//! replies of different epochs are never combined.
//!
//! Non-goals here: deciding configurations (the Membership Service) and timing (the caller supplies
//! `now`).
//!
//! Fault model: replicas may lie, go silent, equivocate, replay, or send garbage; they cannot forge an
//! owner's signature or a BLAKE3 preimage. Clients that own a block are trusted for that block.
//!
//! - [`msg`]: the one closed message enum of the protocol.
//! - [`replica::Replica`]: serves requests over a [`crate::store::Store`] and applies the epoch rules.
//! - [`client::Client`]: the client operations as state machines.
//! - [`health::Health`]: whom a client asks first and how long it waits before asking another.
//! - [`transfer`]: state transfer between epochs: planning, messages, the transfer machine, on-demand
//!   fetch of one object.
//! - [`gc`]: garbage collection of the ranges a node lost, once their new group holds them.
//! - [`refs`]: owners' signed holds and releases of content blocks, and when a block may go.

pub mod client;
pub mod gc;
pub mod health;
pub mod msg;
pub mod refs;
pub mod replica;
pub mod transfer;

/// Deliberate protocol breakages for proving that the simulator's checkers catch real bugs.
#[cfg(feature = "mutants")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mutant {
    #[default]
    None,
    /// Reads return the highest version without writing it back.
    NoWriteBack,
    /// Clients complete operations with f+1 replies instead of 2f+1.
    SmallQuorum,
    /// Replicas store public-key blocks without checking the owner's signature.
    AcceptUnsigned,
    /// State transfer takes public-key blocks from one old replica instead of 2f+1.
    TransferFromOne,
    /// Replicas answer reads of objects they gained before their transfer completes.
    ServeBeforeTransfer,
    /// Old replicas delete a lost range after f+1 of its new group confirm holding it, not 2f+1.
    GcEarly,
    /// Replicas honour a release without checking the owner's signature.
    ReleaseUnsigned,
    /// State transfer hands over content blocks without their reference records.
    DropRefsInTransfer,
    /// Replicas delete a released block at once instead of after the grace period.
    DeleteWithoutGrace,
}
