//! Probing (docs/DESIGN.md §3), delegated to the members: every member watches the `3f+1` members
//! that follow it on the ring ([`watched`]; all the others in a ring of `3f+2` or fewer), so each
//! member is watched by the `3f+1` that precede it, a window of the ring like a replica group, with
//! at most `f` faulty members among them. A watcher challenges each member it watches every
//! `probe_ms` with a fresh nonce that the member must sign, and submits a verdict to the MS when it
//! changes: unresponsive after `evict_after_probes` failed probes in a row, responsive again after
//! one answer. The MS counts only verdicts from a target's watchers ([`watches`]) and evicts at
//! [`eviction_reports`] (`f+1`) of them, so the `f` faulty watchers of a member can neither evict
//! it alive nor keep it dead. Each member sends `3f+1` challenges per period whatever the size of
//! the ring, and the committee receives only changes of verdict: probing 100,000 members costs the
//! committee what the failures cost, not what the membership does.
//!
//! Goals: a dead member is evicted even when an epoch holds fewer probe rounds than
//! `evict_after_probes` (failures and verdicts carry over into the next epoch's prober for targets
//! still watched, and a member still unresponsive is reported again at once, since the new epoch's
//! membership starts with every member responsive); an answer proves the member holds its key now
//! (the signature binds the epoch, the nonce and the prober, so it cannot be replayed to another
//! prober or round); a round finds the last probe unanswered counts it failed, so failures accrue
//! at one per round.
//!
//! Non-goals: sending, timeouts and randomness (the driver's: it draws the nonces and reports
//! each probe's answer, or `None` when it failed or timed out, [`probe_timeout_ms`]).
//!
//! Fault model: a probed member may answer garbage, another's signature, an old answer, or
//! nothing; only a valid signature over this round's challenge counts.

use crate::config::{Configuration, Epoch};
use crate::crypto::{Domain, NodeId, PublicKey, Signature};
use std::collections::BTreeMap;

/// The body a member signs to answer a probe: it binds the prober, so an answer cannot be
/// replayed to another prober.
pub fn probe_body(epoch: Epoch, nonce: &[u8; 32], prober: &NodeId) -> Vec<u8> {
    let mut b = Vec::with_capacity(72);
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend_from_slice(nonce);
    b.extend_from_slice(&prober.0);
    b
}

/// How many members each member watches: `3f+1`, or all the others in a smaller ring.
pub fn watch_count(config: &Configuration) -> usize {
    config
        .quorum()
        .group_size()
        .min(config.members.len().saturating_sub(1))
}

/// The members `me` watches: the [`watch_count`] that follow it on the ring (empty if `me` is not
/// a member).
pub fn watched(config: &Configuration, me: &NodeId) -> Vec<NodeId> {
    let n = config.members.len();
    let Ok(at) = config.members.binary_search_by(|m| m.id.cmp(me)) else {
        return Vec::new();
    };
    (1..=watch_count(config))
        .map(|k| config.members[(at + k) % n].id)
        .collect()
}

/// Whether `watcher` watches `target` in `config`: `target` is among the [`watch_count`] members
/// after `watcher` on the ring.
pub fn watches(config: &Configuration, watcher: &NodeId, target: &NodeId) -> bool {
    let n = config.members.len();
    let position = |id: &NodeId| config.members.binary_search_by(|m| m.id.cmp(id)).ok();
    match (position(watcher), position(target)) {
        (Some(w), Some(t)) if w != t => (t + n - w) % n <= watch_count(config),
        _ => false,
    }
}

/// How many of a member's watchers must report it unresponsive to evict it: `f+1`, so at least
/// one is correct.
pub fn eviction_reports(config: &Configuration) -> usize {
    config.quorum().one_correct()
}

/// How long a probe of `config`'s epoch may take before it counts as failed: within the period
/// (so that it is answered or failed before the next round), at least 200 ms, at most 5 s.
pub fn probe_timeout_ms(config: &Configuration) -> u64 {
    (config.params.probe_ms.saturating_mul(4) / 5).clamp(200, 5_000)
}

#[derive(Clone, Debug)]
struct Target {
    key: PublicKey,
    failures: u32,
    /// The verdict last reported (true: responsive).
    reported: bool,
    /// The verdict now.
    responsive: bool,
    outstanding: Option<[u8; 32]>,
}

/// A verdict to submit to the MS ([`crate::ms::membership::MsOp::Probe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub target: NodeId,
    pub responsive: bool,
}

/// One member's probing of the members it watches in one epoch.
#[derive(Clone, Debug)]
pub struct Prober {
    epoch: Epoch,
    me: NodeId,
    evict_after: u32,
    targets: BTreeMap<NodeId, Target>,
}

impl Prober {
    /// The prober of `me` for the members it watches in `config`, taking failures and verdicts
    /// over from the prober of the epoch before (`before`, if `me` probed in it) for those it
    /// still watches. Returns it with the verdicts to report at once: members still unresponsive
    /// (the new epoch's membership starts with every member responsive).
    pub fn new(
        config: &Configuration,
        me: NodeId,
        before: Option<&Prober>,
    ) -> (Prober, Vec<Verdict>) {
        let targets: BTreeMap<NodeId, Target> = watched(config, &me)
            .iter()
            .filter_map(|id| config.member(id))
            .map(|m| {
                let old = before.and_then(|b| b.targets.get(&m.id));
                let responsive = old.is_none_or(|t| t.responsive);
                let target = Target {
                    key: m.key,
                    failures: old.map_or(0, |t| t.failures),
                    responsive,
                    // Reported below when unresponsive.
                    reported: true,
                    outstanding: None,
                };
                (m.id, target)
            })
            .collect();
        let mut prober = Prober {
            epoch: config.epoch,
            me,
            evict_after: config.params.evict_after_probes,
            targets,
        };
        let again = prober
            .targets
            .iter_mut()
            .filter(|(_, t)| !t.responsive)
            .map(|(id, t)| {
                t.reported = false;
                Verdict {
                    target: *id,
                    responsive: false,
                }
            })
            .collect();
        (prober, again)
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// A probe round: the challenges to send, one per member whose last probe was answered or
    /// failed (`nonce` draws each challenge's nonce). A member whose last probe is still
    /// outstanding is not challenged again: that probe's failure comes first.
    pub fn round(&mut self, mut nonce: impl FnMut() -> [u8; 32]) -> Vec<(NodeId, [u8; 32])> {
        let mut out = Vec::new();
        for (id, t) in &mut self.targets {
            if t.outstanding.is_none() {
                let n = nonce();
                t.outstanding = Some(n);
                out.push((*id, n));
            }
        }
        out
    }

    /// The outcome of the probe of `target` with `nonce`: its answer, or `None` if the request
    /// failed or timed out. Returns the verdict to report if it changed. Answers to other rounds
    /// or of strangers are ignored.
    pub fn answered(
        &mut self,
        target: &NodeId,
        nonce: &[u8; 32],
        answer: Option<&Signature>,
    ) -> Option<Verdict> {
        let t = self.targets.get_mut(target)?;
        if t.outstanding.as_ref() != Some(nonce) {
            return None;
        }
        t.outstanding = None;
        let body = probe_body(self.epoch, nonce, &self.me);
        let ok = answer.is_some_and(|sig| t.key.verify(Domain::Probe, &body, sig).is_ok());
        if ok {
            t.failures = 0;
            t.responsive = true;
        } else {
            t.failures = t.failures.saturating_add(1);
            if t.failures >= self.evict_after {
                t.responsive = false;
            }
        }
        if t.responsive == t.reported {
            return None;
        }
        t.reported = t.responsive;
        Some(Verdict {
            target: *target,
            responsive: t.responsive,
        })
    }

    /// Each member's failures in a row and verdict now, for status.
    pub fn counts(&self) -> Vec<(NodeId, u32, bool)> {
        self.targets
            .iter()
            .map(|(id, t)| (*id, t.failures, t.responsive))
            .collect()
    }
}
