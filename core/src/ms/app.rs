//! The Membership Service application a committee member runs on top of the agreement
//! (docs/DESIGN.md §3): the decided batches executed in order by the epoch's [`Membership`], the application
//! digest chained through them, the seed the next committee is drawn from, and the replay of an
//! epoch from its start (after a restart, or when a member takes up a stable checkpoint's
//! batches from others).
//!
//! Goals: one implementation for the node and the agreement simulator, so that what the
//! simulator proves is what a node does: equal digests after a sequence number mean equal
//! histories (a hash chain through every batch), and every correct member draws the next
//! committee from the same seed, fixed by the agreed batch that ends the epoch and unknown before
//! it is decided.
//!
//! Non-goals: ordering (the agreement's), persistence (the driver keeps the batches with the
//! agreement's durable state and replays them with [`App::replay`]).
//!
//! Fault model: a batch's requests come from anyone the agreement admitted; a payload that is not
//! an operation, or an operation the membership refuses, is skipped alike at every correct member.

use super::membership::{Executed, Membership, MsOp};
use super::pbft::{batch_digest, Digest, Request, SeqNo};
use crate::config::{Configuration, Epoch};

/// Most batches kept per epoch for members that catch up (epochs are short; a bound all the same).
/// Digests are kept for every batch.
pub const MAX_BATCHES: usize = 100_000;

/// The seed the MS draws the next committee from: BLAKE3 of the decided batch's digest and its
/// sequence number (the same at every correct member, unknown before the batch is decided).
pub fn ms_seed(seq: SeqNo, requests: &[Request]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("dbqsfs 2026-11 ms seed");
    h.update(&seq.to_le_bytes());
    h.update(&batch_digest(requests));
    *h.finalize().as_bytes()
}

/// The application digest after batch `seq`: a hash chain through every executed batch.
pub fn chain_digest(prev: &Digest, seq: SeqNo, requests: &[Request]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(prev);
    h.update(&seq.to_le_bytes());
    for r in requests {
        h.update(&r.digest());
    }
    *h.finalize().as_bytes()
}

/// The epoch an operation is for, if it names one.
pub fn op_epoch(op: &MsOp) -> Option<Epoch> {
    match op {
        MsOp::Join { epoch, .. }
        | MsOp::Leave { epoch }
        | MsOp::Probe { epoch, .. }
        | MsOp::Misbehaviour { epoch, .. }
        | MsOp::EndEpoch { epoch }
        | MsOp::Key { epoch, .. } => Some(*epoch),
    }
}

/// Where the epoch ended: the batch, the request's place in it, and the next configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub seq: SeqNo,
    pub index: usize,
    pub config: Configuration,
}

/// What one request of an executed batch did (requests whose payload is not an operation are
/// left out).
#[derive(Clone, Debug)]
pub struct Outcome {
    pub index: usize,
    pub op: MsOp,
    pub executed: Executed,
}

/// A batch handed to [`App::execute`] out of order: the application executed `executed` so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("batch {seq} decided out of order: {executed} executed")]
pub struct OutOfOrder {
    pub seq: SeqNo,
    pub executed: SeqNo,
}

/// The MS application of one epoch at one committee member.
#[derive(Clone, Debug)]
pub struct App {
    start: Membership,
    membership: Membership,
    batches: Vec<Vec<Request>>,
    digests: Vec<Digest>,
    ended: Option<Ended>,
}

impl App {
    /// The application at the start of the epoch whose membership is `start`.
    pub fn new(start: Membership) -> App {
        App {
            membership: start.clone(),
            start,
            batches: Vec::new(),
            digests: Vec::new(),
            ended: None,
        }
    }

    /// The application after executing `batches` (sequence numbers 1, 2, ...) from `start`.
    pub fn replay(start: Membership, batches: &[Vec<Request>]) -> App {
        let mut app = App::new(start);
        for (i, batch) in batches.iter().enumerate() {
            let _ = app.execute(i as SeqNo + 1, batch);
        }
        app
    }

    /// The application as it was after batch `seq` (replayed from the epoch's start). `None` if
    /// the batches up to `seq` are not all kept.
    pub fn prefix(&self, seq: SeqNo) -> Option<App> {
        let batches = self.batches.get(..seq as usize)?;
        Some(App::replay(self.start.clone(), batches))
    }

    /// Executes batch `seq`, which must be the next one. Returns what each operation did; the
    /// first epoch end of the application is kept ([`App::ended`]).
    pub fn execute(
        &mut self,
        seq: SeqNo,
        requests: &[Request],
    ) -> Result<Vec<Outcome>, OutOfOrder> {
        let executed = self.executed();
        if seq != executed + 1 {
            return Err(OutOfOrder { seq, executed });
        }
        self.digests
            .push(chain_digest(&self.digest(), seq, requests));
        if self.batches.len() < MAX_BATCHES {
            self.batches.push(requests.to_vec());
        }
        let seed = ms_seed(seq, requests);
        let mut outcomes = Vec::new();
        for (index, r) in requests.iter().enumerate() {
            let Ok(op) = postcard::from_bytes::<MsOp>(&r.payload) else {
                continue;
            };
            let executed = self.membership.execute(&r.client, op.clone(), &seed);
            if let (Executed::EpochEnded(next), None) = (&executed, &self.ended) {
                self.ended = Some(Ended {
                    seq,
                    index,
                    config: (**next).clone(),
                });
            }
            outcomes.push(Outcome {
                index,
                op,
                executed,
            });
        }
        Ok(outcomes)
    }

    /// Batches executed.
    pub fn executed(&self) -> SeqNo {
        self.digests.len() as SeqNo
    }

    /// The application digest after the last batch executed (zeros before the first).
    pub fn digest(&self) -> Digest {
        self.digests.last().copied().unwrap_or([0; 32])
    }

    /// The digest after batch `seq`, if executed.
    pub fn digest_at(&self, seq: SeqNo) -> Option<Digest> {
        let i = usize::try_from(seq).ok()?.checked_sub(1)?;
        self.digests.get(i).copied()
    }

    /// The batches kept (all executed ones, up to [`MAX_BATCHES`]).
    pub fn batches(&self) -> &[Vec<Request>] {
        &self.batches
    }

    /// The membership state now.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The membership state at the epoch's start.
    pub fn start(&self) -> &Membership {
        &self.start
    }

    /// Where the epoch ended, once it has.
    pub fn ended(&self) -> Option<&Ended> {
        self.ended.as_ref()
    }
}
