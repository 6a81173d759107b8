//! The MS state machine: what the committee's agreed operations mean (docs/DESIGN.md §3).
//!
//! Every correct committee member executes the same operations in the same order (the agreement
//! guarantees it), and [`Membership::execute`] is deterministic, so every correct member computes the
//! same next configuration. Operations:
//! - `Join`: a node with an admission certificate (the operator's admission key over its public key)
//!   appears in the next configuration. This is the Sybil defence.
//! - `Leave`: submitted by the leaving node itself; it disappears from the next configuration.
//! - `Probe`: a watcher's current verdict about a member it watches (responsive or not; the watchers
//!   of a member are the `3f+1` that precede it on the ring, [`super::probe`]). A member is evicted
//!   at the end of the epoch only when at least `f+1` of its watchers currently report it
//!   unresponsive, so its `f` faulty watchers can neither evict it alive nor keep it dead.
//! - `Misbehaviour`: agreement evidence (two conflicting statements signed by one committee member);
//!   the guilty member is evicted at the end of the epoch.
//! - `Key`: a deal or a complaint of the round that moves the MS's threshold key to this epoch's
//!   committee (`super::key`): from the committee of the epoch before (whose sharing the
//!   configuration carries), or, when the configuration carries no key yet, the generation of the
//!   key among this committee. Every member applies them in order to the same
//!   [`Transcript`].
//! - `EndEpoch`: a committee member's epoch timer expired. When `f_ms+1` distinct members asked
//!   (so at least one correct member's timer did) and the key has moved to this committee (its
//!   round has its qualified deals, so this committee can sign), the epoch ends: the next configuration is members +
//!   joins − leaves − guilty − evicted (never below `3f+1` members), with a committee drawn
//!   pseudo-randomly from a seed the driver supplies from the agreed batch (unknown before the epoch
//!   ended), certified by the old committee ([`CertificateCollector`]), and carrying the public
//!   side of this committee's sharing of the key.
//!
//! Non-goals here: ordering (the agreement), probing itself and timers (every member's
//! [`super::probe::Prober`], run by its [`super::node::MsNode`]).
//! Fault model: up to `f_ms` committee members are Byzantine and may submit any operation; every
//! operation is checked against its submitter's authority before it has an effect.

use crate::config::{Certificate, CertifiedConfig, Configuration, Epoch, Member};
use crate::crypto::{Domain, Keypair, NodeId, PublicKey, Signature};
use crate::ms::key::{key_round, KeyOp, Transcript};
use crate::ms::pbft::{Committee, Evidence};
use crate::ms::probe;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The operator's admission key's signature over a node's public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionCert {
    pub node: PublicKey,
    pub sig: Signature,
}

impl AdmissionCert {
    /// The certificate that admits `node`, signed with the cluster's admission key.
    pub fn sign(admission: &Keypair, node: &PublicKey) -> AdmissionCert {
        AdmissionCert {
            node: *node,
            sig: admission.sign(Domain::Admission, &node.0),
        }
    }

    pub fn verify(&self, admission_key: &PublicKey) -> bool {
        admission_key
            .verify(Domain::Admission, &self.node.0, &self.sig)
            .is_ok()
    }
}

/// An operation of the MS: the payload of an agreement request, authenticated by its submitter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MsOp {
    /// Submitted by the joining node, for the epoch it believes current (a join of another epoch
    /// is ignored, so an old request replayed later has no effect: the node resubmits).
    Join {
        epoch: Epoch,
        member: Member,
        cert: AdmissionCert,
    },
    /// Submitted by the node that leaves, for the epoch it believes current (replay-safe likewise).
    Leave {
        epoch: Epoch,
    },
    /// A committee member's current verdict about `target` in `epoch`.
    Probe {
        epoch: Epoch,
        target: NodeId,
        responsive: bool,
    },
    Misbehaviour {
        epoch: Epoch,
        evidence: Evidence,
    },
    /// The submitter's timer for `epoch` expired.
    EndEpoch {
        epoch: Epoch,
    },
    /// A deal or complaint of the round that moves the MS key to `epoch`'s committee.
    Key {
        epoch: Epoch,
        op: Box<KeyOp>,
    },
}

/// What executing an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Executed {
    Accepted,
    /// The operation had no effect, and why (not an error: Byzantine submitters are expected).
    Ignored(&'static str),
    /// The epoch ended: this is the next configuration, to be certified by the old committee.
    EpochEnded(Box<Configuration>),
}

/// The membership state of one epoch, at one committee member.
#[derive(Clone, Debug)]
pub struct Membership {
    config: Configuration,
    admission_key: PublicKey,
    max_batch: usize,
    joins: BTreeMap<NodeId, Member>,
    leaves: BTreeSet<NodeId>,
    /// target → its watchers that currently report it unresponsive.
    unresponsive: BTreeMap<NodeId, BTreeSet<NodeId>>,
    guilty: BTreeSet<NodeId>,
    end_votes: BTreeSet<NodeId>,
    /// The round that moves the MS key to this committee (`None` if the configuration cannot
    /// make one: a member's key is no valid seal key, which a join would have refused).
    key: Option<Transcript>,
    /// The round of the epoch before, once this state moved on from it (its receivers compute
    /// their shares from it).
    key_before: Option<Box<Transcript>>,
}

/// A summary of what the next epoch will change, for `dbqsfs status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub joins: Vec<NodeId>,
    pub leaves: Vec<NodeId>,
    /// Members with at least one unresponsive report, and how many.
    pub suspected: Vec<(NodeId, usize)>,
    pub guilty: Vec<NodeId>,
    pub end_votes: usize,
    /// The key's round: dealers whose deals count so far, of how many needed.
    pub key_dealt: usize,
    pub key_needed: usize,
}

impl Membership {
    /// The state at the start of `config`'s epoch. `max_batch` is the agreement's batch limit (to
    /// check evidence made of certificates).
    pub fn new(config: Configuration, admission_key: PublicKey, max_batch: usize) -> Membership {
        let key = Transcript::new(key_round(&config)).ok();
        Membership {
            key,
            key_before: None,
            config,
            admission_key,
            max_batch,
            joins: BTreeMap::new(),
            leaves: BTreeSet::new(),
            unresponsive: BTreeMap::new(),
            guilty: BTreeSet::new(),
            end_votes: BTreeSet::new(),
        }
    }

    pub fn config(&self) -> &Configuration {
        &self.config
    }

    pub fn pending(&self) -> Pending {
        Pending {
            joins: self.joins.keys().copied().collect(),
            leaves: self.leaves.iter().copied().collect(),
            suspected: self
                .unresponsive
                .iter()
                .filter(|(_, r)| !r.is_empty())
                .map(|(t, r)| (*t, r.len()))
                .collect(),
            guilty: self.guilty.iter().copied().collect(),
            end_votes: self.end_votes.len(),
            key_dealt: self
                .key
                .as_ref()
                .map_or(0, |k| k.dealt().len().saturating_sub(k.disproven().len())),
            key_needed: self.key.as_ref().map_or(0, |k| k.round().needed()),
        }
    }

    /// The round that moves the MS key to this epoch's committee, with what was ordered of it.
    pub fn key(&self) -> Option<&Transcript> {
        self.key.as_ref()
    }

    /// The round of `epoch`'s key, this epoch's or (once the epoch ended) the one before.
    pub fn key_of(&self, epoch: Epoch) -> Option<&Transcript> {
        [self.key.as_ref(), self.key_before.as_deref()]
            .into_iter()
            .flatten()
            .find(|k| k.round().epoch == epoch)
    }

    fn in_committee(&self, id: &NodeId) -> bool {
        self.config.committee.contains(id)
    }

    /// Executes one agreed operation submitted by `submitter`. `seed` must be the same at every
    /// member and unknown before this point (the driver passes the digest of the agreed batch that
    /// carries the operation); it only matters when the epoch ends.
    pub fn execute(&mut self, submitter: &PublicKey, op: MsOp, seed: &[u8; 32]) -> Executed {
        let from = submitter.node_id();
        let epoch = self.config.epoch;
        match op {
            MsOp::Join {
                epoch: e,
                member,
                cert,
            } => {
                if e != epoch {
                    return Executed::Ignored("join for another epoch");
                }
                if !cert.verify(&self.admission_key) || cert.node != member.key {
                    return Executed::Ignored("admission certificate does not admit this key");
                }
                if member.id != member.key.node_id() {
                    return Executed::Ignored("member id is not the hash of its key");
                }
                if from != member.id {
                    return Executed::Ignored("a join must be submitted by the joining node");
                }
                if self.config.is_member(&member.id) {
                    return Executed::Ignored("already a member");
                }
                if !crate::ms::key::valid_seal(&member.key) {
                    return Executed::Ignored("the node's key is no valid seal key for the MS key");
                }
                self.joins.insert(member.id, member);
                Executed::Accepted
            }
            MsOp::Leave { epoch: e } => {
                if e != epoch {
                    return Executed::Ignored("leave for another epoch");
                }
                if self.joins.remove(&from).is_some() {
                    return Executed::Accepted;
                }
                if !self.config.is_member(&from) {
                    return Executed::Ignored("not a member");
                }
                self.leaves.insert(from);
                Executed::Accepted
            }
            MsOp::Probe {
                epoch: e,
                target,
                responsive,
            } => {
                if e != epoch {
                    return Executed::Ignored("probe report of another epoch");
                }
                if !self.config.is_member(&target) {
                    return Executed::Ignored("target is not a member");
                }
                if !probe::watches(&self.config, &from, &target) {
                    return Executed::Ignored("probe reports come from the target's watchers");
                }
                let reporters = self.unresponsive.entry(target).or_default();
                if responsive {
                    reporters.remove(&from);
                } else {
                    reporters.insert(from);
                }
                Executed::Accepted
            }
            MsOp::Misbehaviour { epoch: e, evidence } => {
                if e != epoch {
                    return Executed::Ignored("evidence of another epoch");
                }
                let keys: Vec<PublicKey> = self
                    .config
                    .committee
                    .iter()
                    .filter_map(|id| self.config.member(id))
                    .map(|m| m.key)
                    .collect();
                let Ok(committee) = Committee::new(keys) else {
                    return Executed::Ignored("no valid committee");
                };
                match evidence.verify(&committee, epoch, self.max_batch) {
                    Ok(Some(guilty)) => {
                        self.guilty.insert(guilty);
                        Executed::Accepted
                    }
                    Ok(None) => Executed::Ignored("evidence names no single member"),
                    Err(_) => Executed::Ignored("evidence does not verify"),
                }
            }
            MsOp::EndEpoch { epoch: e } => {
                if e != epoch {
                    return Executed::Ignored("end of another epoch");
                }
                if !self.in_committee(&from) {
                    return Executed::Ignored("only committee members end epochs");
                }
                self.end_votes.insert(from);
                self.end_if_due(seed)
            }
            MsOp::Key { epoch: e, op } => {
                if e != epoch {
                    return Executed::Ignored("key operation of another epoch's round");
                }
                let Some(key) = self.key.as_mut() else {
                    return Executed::Ignored("this configuration makes no round of the key");
                };
                if let Err(e) = key.apply(&from, &op) {
                    return Executed::Ignored(e.reason());
                }
                self.end_if_due(seed)
            }
        }
    }

    /// Ends the epoch if `f_ms+1` members asked and the key has moved to this committee.
    fn end_if_due(&mut self, seed: &[u8; 32]) -> Executed {
        if self.end_votes.len() < self.config.params.ms_quorum().one_correct()
            || self
                .key
                .as_ref()
                .is_some_and(|k| k.qualified_dealers().is_none())
        {
            return Executed::Accepted;
        }
        let next = self.next_configuration(seed);
        let ended = self.key.take().map(Box::new);
        *self = Membership::new(next.clone(), self.admission_key, self.max_batch);
        self.key_before = ended;
        Executed::EpochEnded(Box::new(next))
    }

    /// The configuration of the next epoch.
    fn next_configuration(&self, seed: &[u8; 32]) -> Configuration {
        let c = &self.config;
        let floor = c
            .quorum()
            .group_size()
            .max(c.params.ms_quorum().group_size());
        let evicted = self
            .unresponsive
            .iter()
            .filter(|(_, r)| r.len() >= probe::eviction_reports(c))
            .map(|(t, _)| *t);
        // Removals in order of gravity; never below the floor (what is left waits for a later
        // epoch). Joins of members already in replace their records.
        let new = self
            .joins
            .keys()
            .filter(|id| c.member(id).is_none())
            .count();
        let mut count = c.members.len() + new;
        let mut removed = BTreeSet::new();
        for id in self
            .guilty
            .iter()
            .chain(self.leaves.iter())
            .chain(evicted.collect::<Vec<_>>().iter())
        {
            if count <= floor {
                break;
            }
            let present = c.member(id).is_some() || self.joins.contains_key(id);
            if present && removed.insert(*id) {
                count -= 1;
            }
        }
        // One walk of the sorted members beside the sorted joins.
        let mut members = Vec::with_capacity(count);
        let mut joins = self.joins.values().peekable();
        for m in &c.members {
            while let Some(j) = joins.next_if(|j| j.id < m.id) {
                members.push(j.clone());
            }
            let m = joins.next_if(|j| j.id == m.id).unwrap_or(m);
            members.push(m.clone());
        }
        members.extend(joins.cloned());
        members.retain(|m| !removed.contains(&m.id));
        let hash = c.hash();
        let committee = draw_committee(&members, c.params.ms_quorum().group_size(), &hash, seed);
        Configuration {
            epoch: c.epoch + 1,
            params: c.params.clone(),
            members,
            committee,
            prev: Some(hash),
            key: self.key.as_ref().and_then(|k| k.public().ok()),
        }
    }
}

/// The committee drawn from `members`: the `size` members whose BLAKE3(config hash ‖ seed ‖ id) is
/// smallest, sorted by id.
fn draw_committee(
    members: &[Member],
    size: usize,
    config_hash: &[u8; 32],
    seed: &[u8; 32],
) -> Vec<NodeId> {
    use blake3::hazmat::{hash_derive_key_context, HasherExt};
    let context = hash_derive_key_context("dbqsfs 2026-11 committee draw");
    let mut ranked: Vec<([u8; 32], NodeId)> = members
        .iter()
        .map(|m| {
            let mut h = blake3::Hasher::new_from_context_key(&context);
            h.update(config_hash);
            h.update(seed);
            h.update(&m.id.0);
            (*h.finalize().as_bytes(), m.id)
        })
        .collect();
    if ranked.len() > size && size > 0 {
        ranked.select_nth_unstable(size - 1);
        ranked.truncate(size);
    }
    let mut committee: Vec<NodeId> = ranked.into_iter().take(size).map(|(_, id)| id).collect();
    committee.sort();
    committee
}

/// Collects the old committee's signatures over the next configuration until `2f_ms+1` verify.
#[derive(Clone, Debug)]
pub struct CertificateCollector {
    prev: Configuration,
    next: Configuration,
    hash: [u8; 32],
    signatures: BTreeMap<NodeId, Signature>,
}

impl CertificateCollector {
    /// Collects signatures of `prev`'s committee over `next`.
    pub fn new(prev: Configuration, next: Configuration) -> CertificateCollector {
        let hash = next.hash();
        CertificateCollector {
            prev,
            next,
            hash,
            signatures: BTreeMap::new(),
        }
    }

    /// This member's signature over the next configuration.
    pub fn sign(&self, me: &Keypair) -> Signature {
        me.sign(Domain::Configuration, &self.hash)
    }

    /// Adds `signer`'s signature if it is a member of the old committee and it verifies; returns
    /// the certified configuration once `2f_ms+1` have.
    pub fn add(&mut self, signer: NodeId, sig: Signature) -> Option<CertifiedConfig> {
        if !self.prev.committee.contains(&signer) || self.signatures.contains_key(&signer) {
            return None;
        }
        let key = self.prev.member(&signer)?.key;
        if key.verify(Domain::Configuration, &self.hash, &sig).is_err() {
            return None;
        }
        self.signatures.insert(signer, sig);
        (self.signatures.len() >= self.prev.params.ms_quorum().quorum()).then(|| CertifiedConfig {
            config: self.next.clone(),
            cert: Certificate {
                signatures: self.signatures.iter().map(|(id, s)| (*id, *s)).collect(),
                threshold: None,
            },
        })
    }
}
