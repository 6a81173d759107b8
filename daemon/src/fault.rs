//! Deliberately Byzantine node behaviours, compiled only with the `fault-injection` feature.
//!
//! Goals: let real-node tests run one node that lies in each of the ways the protocol must
//! survive, without touching the replica state machine: faults sit in the store under it
//! ([`FaultStore`]) or on the replies it sends ([`Distorter`]). Non-goals: being subtle; these
//! are blunt faults for tests, never for production builds.

use dbqsfs_core::crypto::ObjectId;
use dbqsfs_core::dbqs::msg::DbqsMessage;
use dbqsfs_core::dbqs::refs::RefRecord;
use dbqsfs_core::object::{PkBlock, Stamp};
use dbqsfs_core::store::{Store, StoreError};
use dbqsfs_core::wire::{decode, encode_msg};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// How a faulty node misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Serves content blocks with a flipped byte and public-key blocks with a forged value.
    Corrupt,
    /// Keeps the first version of each public-key block, claiming to store newer ones.
    Stale,
    /// Never answers.
    Silent,
    /// Answers every request with random bytes.
    Garbage,
    /// Acknowledges writes without storing anything.
    AckWithoutStore,
    /// Tells different requesters different things about the same object: on every other read
    /// (alternating by request and by requester key) it answers a public-key read with the oldest
    /// version it ever served of that block (validly signed: replicas cannot forge) and a content
    /// read with "not held".
    Equivocate,
    /// As a committee member: withholds its agreement messages and sends garbage ones, never
    /// proposes the end of an epoch, and pushes forged configurations and freshness certificates
    /// to every member (stores and answers dBQS honestly).
    ForgeConfigs,
}

/// A store that misbehaves as its [`Fault`] says.
pub struct FaultStore<S> {
    inner: S,
    fault: Fault,
}

impl<S> FaultStore<S> {
    pub fn new(inner: S, fault: Fault) -> Self {
        FaultStore { inner, fault }
    }
}

impl<S: Store> Store for FaultStore<S> {
    fn get_content(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError> {
        let data = self.inner.get_content(id)?;
        Ok(match (self.fault, data) {
            (Fault::Corrupt, Some(mut d)) => {
                match d.first_mut() {
                    Some(b) => *b ^= 0x5a,
                    None => d.push(0x5a),
                }
                Some(d)
            }
            (_, d) => d,
        })
    }

    fn put_content(&self, id: &ObjectId, data: &[u8]) -> Result<(), StoreError> {
        match self.fault {
            Fault::AckWithoutStore => Ok(()),
            _ => self.inner.put_content(id, data),
        }
    }

    fn get_pk(&self, id: &ObjectId) -> Result<Option<PkBlock>, StoreError> {
        let block = self.inner.get_pk(id)?;
        Ok(match (self.fault, block) {
            (Fault::Corrupt, Some(mut b)) => {
                b.version += 1_000;
                b.value.push(0x5a);
                Some(b)
            }
            (_, b) => b,
        })
    }

    fn put_pk_if_newer(&self, block: &PkBlock) -> Result<Stamp, StoreError> {
        match self.fault {
            Fault::AckWithoutStore => Ok(block.stamp()),
            Fault::Stale => match self.inner.get_pk(&block.id())? {
                Some(_) => Ok(block.stamp()),
                None => self.inner.put_pk_if_newer(block),
            },
            _ => self.inner.put_pk_if_newer(block),
        }
    }

    fn list(&self) -> Result<Vec<ObjectId>, StoreError> {
        self.inner.list()
    }

    fn list_range(
        &self,
        lo: Option<&ObjectId>,
        hi: &ObjectId,
        limit: usize,
    ) -> Result<Vec<ObjectId>, StoreError> {
        self.inner.list_range(lo, hi, limit)
    }

    fn delete(&self, id: &ObjectId) -> Result<(), StoreError> {
        self.inner.delete(id)
    }

    fn has_content(&self, id: &ObjectId) -> Result<bool, StoreError> {
        self.inner.has_content(id)
    }

    fn refs(&self, id: &ObjectId) -> Result<Vec<RefRecord>, StoreError> {
        self.inner.refs(id)
    }

    fn merge_refs(
        &self,
        id: &ObjectId,
        records: &[RefRecord],
    ) -> Result<Vec<RefRecord>, StoreError> {
        self.inner.merge_refs(id, records)
    }

    fn merge_refs_many(
        &self,
        items: &[(ObjectId, Vec<RefRecord>)],
    ) -> Result<Vec<Vec<RefRecord>>, StoreError> {
        self.inner.merge_refs_many(items)
    }

    fn drop_released(&self, id: &ObjectId) -> Result<bool, StoreError> {
        self.inner.drop_released(id)
    }

    fn released(&self) -> Result<Vec<ObjectId>, StoreError> {
        self.inner.released()
    }
}

/// What a faulty node does to its replies: [`Fault::Silent`] sends none, [`Fault::Garbage`]
/// random bytes, [`Fault::Equivocate`] alternates between the truth and old or missing values.
pub struct Distorter {
    fault: Option<Fault>,
    /// For equivocation: the oldest version served of each public-key block.
    oldest: Mutex<HashMap<ObjectId, PkBlock>>,
    turn: AtomicU64,
}

impl Distorter {
    pub fn new(fault: Option<Fault>) -> Distorter {
        Distorter {
            fault,
            oldest: Mutex::new(HashMap::new()),
            turn: AtomicU64::new(0),
        }
    }

    /// The reply a faulty node actually sends to `peer`.
    pub fn reply(&self, peer: &[u8; 32], reply: Option<Vec<u8>>) -> Option<Vec<u8>> {
        match self.fault {
            Some(Fault::Silent) => None,
            Some(Fault::Garbage) => Some(garbage()),
            Some(Fault::Equivocate) => reply.map(|r| self.equivocate(peer, r)),
            _ => reply,
        }
    }

    fn equivocate(&self, peer: &[u8; 32], reply: Vec<u8>) -> Vec<u8> {
        let Ok(env) = decode::<DbqsMessage>(&reply) else {
            return reply;
        };
        let lie = (self.turn.fetch_add(1, Ordering::Relaxed) + u64::from(peer[0])) % 2 == 1;
        let msg = match env.msg {
            DbqsMessage::Pk {
                rid,
                id,
                block: Some(b),
            } => {
                let mut oldest = self.oldest.lock().unwrap_or_else(|p| p.into_inner());
                let old = oldest.entry(id).or_insert_with(|| b.clone()).clone();
                let block = Some(if lie { old } else { b });
                DbqsMessage::Pk { rid, id, block }
            }
            DbqsMessage::Content {
                rid,
                id,
                data: Some(data),
            } => DbqsMessage::Content {
                rid,
                id,
                data: (!lie).then_some(data),
            },
            _ => return reply,
        };
        encode_msg(env.epoch, msg)
    }
}

fn garbage() -> Vec<u8> {
    let mut len = [0u8; 2];
    let _ = getrandom::fill(&mut len);
    let mut junk = vec![0u8; usize::from(u16::from_le_bytes(len)) % 4096];
    let _ = getrandom::fill(&mut junk);
    // Sometimes a well-formed header, so the decoder's deeper checks are exercised too.
    if junk.len() > 2 && len[0] % 2 == 0 {
        junk[0] = dbqsfs_core::wire::WIRE_VERSION;
        junk[1] = 1;
    }
    junk
}
