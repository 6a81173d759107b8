//! Test harnesses of dbqsfs.
//!
//! - [`sim`]: the deterministic simulator. It drives the real `dbqsfs-core` state machines over a
//!   seeded, virtual-time network with loss, duplication, reordering, partitions and crashes, with
//!   named Byzantine adversaries, test-driven epoch changes, and checkers (linearizability of
//!   public-key blocks, integrity of content blocks, no lost write, liveness after faults heal).
//! - [`agreement_sim`]: the deterministic simulator of the MS agreement protocol (PBFT), with
//!   Byzantine committee members, safety checks after every step and liveness after healing.
//! - [`key_sim`]: the deterministic simulator of the MS's threshold key: key generation and
//!   redistribution to changing committees with Byzantine dealers, receivers and signers.
//! - [`harness`]: the virtual-time event queue and the faulty network both simulators run on.
//! - [`signed`]: the check that no correct committee member signs two things for one slot.
//! - [`rng`]: the one seeded PRNG every random choice of a run comes from.
//! - [`checker`]: the history checkers, usable on any recorded history.
//! - [`runner`]: the seed loop both simulators' command-line runners share.

pub mod agreement_sim;
pub mod checker;
pub mod harness;
pub mod key_sim;
pub mod rng;
pub mod runner;
pub mod signed;
pub mod sim;
