//! The next configuration certified under the MS key: the ending epoch's committee signs its hash
//! with FROST's two rounds over its shares (`super::key::sign`), so that anyone checks the
//! certificate with one ed25519 verification under the key the configuration before carries.
//! Freshness certificates ("this configuration is current at `t`") are signed the same way by
//! the configuration's own committee, one signing per time.
//!
//! How. Signing goes in *attempts*; attempt `a` has one aggregator, fixed by `a` and the hash, so
//! every member knows it without talking. Within an attempt the aggregator runs *sessions* in the
//! manner of ROAST (Ruffing et al., CCS 2022): each member sends it a commitment to fresh nonces;
//! once `2f_ms+1` members not proven cheaters are ready (hold an unused commitment there), the
//! aggregator starts a session with them (a signing package) and they sign; each signature share
//! comes with the signer's next commitment, so a signer that answers is ready again at once,
//! while one that never answers stays in its session and is never picked again. A correct
//! aggregator therefore finishes after at most `f_ms+1` sessions however the `f_ms` faulty
//! members behave. A member signs at most one package per commitment, so a nonce is never used
//! twice, whatever the aggregator does. The certificate goes to every member (and is sent again
//! while the role lives). An aggregator whose session does not aggregate sends the package and
//! the shares, each signed by its sender over the package's digest, to everyone: any member
//! checks it and holds the members whose shares are wrong as cheaters, and nobody can frame a
//! correct member with it. A member that waits too long moves to the next attempt, and so to the
//! next aggregator: `f_ms` faulty aggregators cost `f_ms` attempts.
//!
//! Non-goals: the certificate of a configuration whose predecessor carries no key (the
//! committee's signatures, `super::shares::NextConfig`); randomness (nonces are drawn from a
//! fresh secret the driver passes, never derived from what a restart could repeat).
//!
//! Fault model: every message may come from a Byzantine member: wrong pieces are dropped, and
//! the aggregate is checked before it is kept or sent.

use super::key::sign::{self, SignatureShare, SigningCommitments, SigningNonces, SigningPackage};
use super::key::{KeyShare, XofRng};
use super::wire::{MsMessage, SignStep};
use crate::config::{Certificate, CertifiedConfig, ConfigHash, Configuration, Epoch, Freshness};
use crate::crypto::{Domain, Keypair, NodeId, Signature};
use std::collections::{BTreeMap, BTreeSet};

/// How long a member waits in one attempt before the next.
pub const ATTEMPT_MS: u64 = 3_000;
/// How often a member that holds the certificate sends it again to the others.
const DONE_RESEND_MS: u64 = 2_000;
/// Attempts a member aggregates at once (the newest), and attempts it keeps nonces for.
const KEPT_ATTEMPTS: u32 = 4;
/// Unused commitments a signer keeps per attempt.
const NONCES_PER_ATTEMPT: usize = 4;

/// What the driver must do.
#[derive(Clone, Debug)]
pub enum SignOut {
    Send { to: Vec<NodeId>, msg: MsMessage },
    Certified(CertifiedConfig),
    Fresh(Freshness),
}

/// What a signing round certifies under the MS key.
#[derive(Clone, Debug)]
enum Target {
    /// The next configuration, signed by the committee of the one before.
    Next {
        prev: Configuration,
        next: Configuration,
    },
    /// That `config` is current at `time_ms`, signed by its own committee.
    Fresh { config: Configuration, time_ms: u64 },
}

impl Target {
    /// The configuration whose committee signs.
    fn signers(&self) -> &Configuration {
        match self {
            Target::Next { prev, .. } => prev,
            Target::Fresh { config, .. } => config,
        }
    }

    /// The epoch the round's messages name: the next configuration's, or the fresh one's.
    fn epoch(&self) -> Epoch {
        match self {
            Target::Next { next, .. } => next.epoch,
            Target::Fresh { config, .. } => config.epoch,
        }
    }

    /// The message signed, and what the round's messages name it by: the next configuration's
    /// hash, or the message's (each configuration hashed once).
    fn message_and_name(&self) -> (Vec<u8>, ConfigHash) {
        match self {
            Target::Next { next, .. } => {
                let hash = next.hash();
                (certificate_message(&hash), hash)
            }
            Target::Fresh { config, time_ms } => {
                let msg = freshness_message(config, *time_ms);
                let name = *blake3::hash(&msg).as_bytes();
                (msg, name)
            }
        }
    }
}

/// A signature share as received: its sender, the share, the sender's signature over it.
type SignedShare = (NodeId, Vec<u8>, Signature);

/// A session: a package and the shares that answered it.
struct Session {
    package: SigningPackage,
    bytes: Vec<u8>,
    shares: BTreeMap<sign::Identifier, SignedShare>,
}

/// An attempt this member aggregates.
#[derive(Default)]
struct Aggregation {
    /// Members holding an unused commitment here.
    ready: BTreeMap<NodeId, SigningCommitments>,
    sessions: Vec<Session>,
}

impl Aggregation {
    /// Whether `member` is in a session it has not answered.
    fn busy(&self, id: &sign::Identifier) -> bool {
        self.sessions
            .iter()
            .any(|s| s.package.signing_commitment(id).is_some() && !s.shares.contains_key(id))
    }
}

/// One committee member's part in certifying the next configuration under the MS key.
pub struct ThresholdSigning {
    node: Keypair,
    me: NodeId,
    target: Target,
    hash: ConfigHash,
    msg: Vec<u8>,
    share: KeyShare,
    attempt: u32,
    attempt_until: u64,
    /// This member's unused commitments, per attempt, with their nonces (dropped once used).
    nonces: BTreeMap<u32, Vec<(SigningNonces, SigningCommitments)>>,
    aggregating: BTreeMap<u32, Aggregation>,
    /// Members proven to have sent wrong signature shares.
    cheaters: BTreeSet<NodeId>,
    rng: XofRng,
    /// The aggregate signature, once it verified.
    done: Option<Signature>,
    resend_at: u64,
    /// The last package this member signed, and its attempt.
    last_package: Option<(u32, Vec<u8>)>,
    /// The latest time an input brought.
    now: u64,
}

/// The message every signature of this round signs: the configuration's hash in its domain.
pub fn certificate_message(hash: &ConfigHash) -> Vec<u8> {
    Domain::Configuration.message(hash)
}

/// The message a freshness certificate of `config` at `time_ms` signs.
pub fn freshness_message(config: &Configuration, time_ms: u64) -> Vec<u8> {
    Domain::Freshness.message(&Freshness::body(config.epoch, &config.hash(), time_ms))
}

/// What a signature share's sender signs with it: the share and the package it answers.
pub fn share_statement(epoch: Epoch, attempt: u32, package: &[u8], share: &[u8]) -> Vec<u8> {
    let mut b = b"dbqsfs 2026-12 frost share".to_vec();
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend_from_slice(&attempt.to_le_bytes());
    b.extend_from_slice(blake3::hash(package).as_bytes());
    b.extend_from_slice(share);
    b
}

impl ThresholdSigning {
    /// Starts certifying `next` (the successor of `prev`, whose committee this member is in)
    /// with `share` (of `prev`'s epoch). `seed` is a fresh secret for the nonces.
    pub fn start(
        node: Keypair,
        prev: Configuration,
        next: Configuration,
        share: KeyShare,
        seed: [u8; 32],
        now: u64,
    ) -> (ThresholdSigning, Vec<SignOut>) {
        Self::begin(node, Target::Next { prev, next }, share, seed, now)
    }

    /// Starts signing that `config` (whose committee this member is in) is current at
    /// `time_ms`, with `share` (of `config`'s epoch). `seed` is a fresh secret for the nonces.
    pub fn start_fresh(
        node: Keypair,
        config: Configuration,
        time_ms: u64,
        share: KeyShare,
        seed: [u8; 32],
        now: u64,
    ) -> (ThresholdSigning, Vec<SignOut>) {
        Self::begin(node, Target::Fresh { config, time_ms }, share, seed, now)
    }

    fn begin(
        node: Keypair,
        target: Target,
        share: KeyShare,
        seed: [u8; 32],
        now: u64,
    ) -> (ThresholdSigning, Vec<SignOut>) {
        let (msg, hash) = target.message_and_name();
        let mut s = ThresholdSigning {
            me: node.node_id(),
            node,
            msg,
            hash,
            target,
            share,
            attempt: 0,
            attempt_until: now.saturating_add(ATTEMPT_MS),
            nonces: BTreeMap::new(),
            aggregating: BTreeMap::new(),
            cheaters: BTreeSet::new(),
            rng: XofRng::new(&seed, b"dbqsfs 2026-12 frost nonces"),
            done: None,
            resend_at: u64::MAX,
            last_package: None,
            now,
        };
        let out = s.commit();
        (s, out)
    }

    /// The certificate, once this member holds it (certifying a configuration).
    pub fn done(&self) -> Option<CertifiedConfig> {
        match (&self.target, self.done) {
            (Target::Next { next, .. }, Some(sig)) => Some(CertifiedConfig {
                config: next.clone(),
                cert: Certificate {
                    signatures: Vec::new(),
                    threshold: Some(sig),
                },
            }),
            _ => None,
        }
    }

    /// The freshness certificate, once this member holds it (signing freshness).
    pub fn freshness(&self) -> Option<Freshness> {
        match (&self.target, self.done) {
            (Target::Fresh { config, time_ms }, Some(sig)) => {
                Some(Freshness::under_key(config, *time_ms, sig))
            }
            _ => None,
        }
    }

    /// The members this one holds proven to have sent wrong signature shares.
    pub fn cheaters(&self) -> &BTreeSet<NodeId> {
        &self.cheaters
    }

    /// The package this member signed in `attempt`, if that was the last one it signed.
    pub fn last_package(&self, attempt: u32) -> Option<Vec<u8>> {
        self.last_package
            .as_ref()
            .filter(|(a, _)| *a == attempt)
            .map(|(_, p)| p.clone())
    }

    pub fn next_timer(&self) -> u64 {
        if self.done.is_some() {
            self.resend_at
        } else {
            self.attempt_until
        }
    }

    fn epoch(&self) -> Epoch {
        self.target.epoch()
    }

    fn members(&self) -> &[NodeId] {
        &self.share.public.members
    }

    fn others(&self) -> Vec<NodeId> {
        self.members()
            .iter()
            .filter(|m| **m != self.me)
            .copied()
            .collect()
    }

    fn position(&self, member: &NodeId) -> Option<usize> {
        self.members().iter().position(|m| m == member)
    }

    /// The hash of the configuration being certified.
    pub fn hash(&self) -> ConfigHash {
        self.hash
    }

    /// The aggregator of `attempt`.
    pub fn aggregator(&self, attempt: u32) -> NodeId {
        let n = self.members().len();
        self.members()[(attempt as usize + self.hash[0] as usize) % n]
    }

    fn send(&self, to: NodeId, attempt: u32, step: SignStep) -> SignOut {
        SignOut::Send {
            to: vec![to],
            msg: MsMessage::KeySign {
                epoch: self.epoch(),
                hash: self.hash,
                attempt,
                step,
            },
        }
    }

    /// A fresh commitment of this member for `attempt` (its nonces kept), serialized.
    fn fresh_commitment(&mut self, attempt: u32) -> Option<Vec<u8>> {
        let (nonces, commitments) = sign::commit(&self.share, &mut self.rng);
        let kept = self.nonces.entry(attempt).or_default();
        if kept.len() >= NONCES_PER_ATTEMPT {
            kept.remove(0);
        }
        kept.push((nonces, commitments));
        self.nonces
            .retain(|a, _| a.saturating_add(KEPT_ATTEMPTS) > attempt);
        commitments.serialize().ok()
    }

    /// This member's commitment for the current attempt, to its aggregator.
    fn commit(&mut self) -> Vec<SignOut> {
        let attempt = self.attempt;
        let Some(bytes) = self.fresh_commitment(attempt) else {
            return Vec::new();
        };
        let to = self.aggregator(attempt);
        if to == self.me {
            return self.on_commit(self.me, attempt, &bytes);
        }
        vec![self.send(to, attempt, SignStep::Commit(bytes))]
    }

    /// The clock: the next attempt when this one took too long; the certificate sent again.
    pub fn on_timer(&mut self, now: u64) -> Vec<SignOut> {
        self.now = self.now.max(now);
        if let Some(sig) = self.done {
            if now < self.resend_at {
                return Vec::new();
            }
            self.resend_at = now.saturating_add(DONE_RESEND_MS);
            return vec![self.done_message(sig)];
        }
        if now < self.attempt_until {
            return Vec::new();
        }
        self.attempt += 1;
        self.attempt_until = now.saturating_add(ATTEMPT_MS);
        self.commit()
    }

    fn done_message(&self, sig: Signature) -> SignOut {
        SignOut::Send {
            to: self.others(),
            msg: MsMessage::KeySign {
                epoch: self.epoch(),
                hash: self.hash,
                attempt: self.attempt,
                step: SignStep::Done(sig),
            },
        }
    }

    /// A signing message from committee member `from`.
    pub fn on_step(
        &mut self,
        now: u64,
        from: NodeId,
        attempt: u32,
        step: SignStep,
    ) -> Vec<SignOut> {
        self.now = self.now.max(now);
        if self.done.is_some() || self.position(&from).is_none() {
            return Vec::new();
        }
        match step {
            SignStep::Commit(bytes) => self.on_commit(from, attempt, &bytes),
            SignStep::Package { session, package } => {
                self.on_package(from, attempt, session, &package)
            }
            SignStep::Share {
                session,
                share,
                sig,
                next,
            } => self.on_share(from, attempt, session, share, sig, &next),
            SignStep::Cheaters { package, shares } => {
                self.on_cheaters(attempt, &package, &shares);
                Vec::new()
            }
            SignStep::Done(sig) => self.finish(sig),
        }
    }

    /// A commitment from `from` for an attempt this member aggregates: `from` is ready there
    /// (unless it sits in a session it has not answered, or is a proven cheater).
    fn on_commit(&mut self, from: NodeId, attempt: u32, bytes: &[u8]) -> Vec<SignOut> {
        if self.aggregator(attempt) != self.me || self.cheaters.contains(&from) {
            return Vec::new();
        }
        let (Ok(commitments), Some(position)) =
            (SigningCommitments::deserialize(bytes), self.position(&from))
        else {
            return Vec::new();
        };
        if !self.aggregating.contains_key(&attempt) {
            let newest = self.aggregating.keys().next_back().copied().unwrap_or(0);
            if attempt.saturating_add(KEPT_ATTEMPTS) <= newest {
                return Vec::new();
            }
            self.aggregating
                .retain(|a, _| a.saturating_add(KEPT_ATTEMPTS) > attempt);
        }
        let agg = self.aggregating.entry(attempt).or_default();
        if agg.busy(&sign::identifier(position)) {
            return Vec::new();
        }
        agg.ready.insert(from, commitments);
        self.try_session(attempt)
    }

    /// Starts a session of `attempt` if enough members not proven cheaters are ready.
    fn try_session(&mut self, attempt: u32) -> Vec<SignOut> {
        let threshold = self.share.public.threshold();
        let n = self.members().len();
        let cheaters = self.cheaters.clone();
        let positions: BTreeMap<NodeId, usize> = self
            .members()
            .iter()
            .enumerate()
            .map(|(p, m)| (*m, p))
            .collect();
        let Some(agg) = self.aggregating.get_mut(&attempt) else {
            return Vec::new();
        };
        agg.ready.retain(|m, _| !cheaters.contains(m));
        if agg.ready.len() < threshold || agg.sessions.len() >= n {
            return Vec::new();
        }
        let chosen: Vec<NodeId> = agg.ready.keys().take(threshold).copied().collect();
        let mut commitments = BTreeMap::new();
        for m in &chosen {
            if let (Some(c), Some(p)) = (agg.ready.remove(m), positions.get(m)) {
                commitments.insert(sign::identifier(*p), c);
            }
        }
        let package = SigningPackage::new(commitments, &self.msg);
        let Ok(bytes) = package.serialize() else {
            return Vec::new();
        };
        let session = agg.sessions.len() as u32;
        agg.sessions.push(Session {
            package,
            bytes: bytes.clone(),
            shares: BTreeMap::new(),
        });
        let mut out = Vec::new();
        for m in chosen {
            let step = SignStep::Package {
                session,
                package: bytes.clone(),
            };
            if m == self.me {
                out.extend(self.on_package(self.me, attempt, session, &bytes));
            } else {
                out.push(self.send(m, attempt, step));
            }
        }
        out
    }

    /// A package from the aggregator of `attempt`: signed if it holds an unused commitment of
    /// this member (which is then spent), answered with the share and a fresh commitment.
    fn on_package(
        &mut self,
        from: NodeId,
        attempt: u32,
        session: u32,
        bytes: &[u8],
    ) -> Vec<SignOut> {
        if from != self.aggregator(attempt) {
            return Vec::new();
        }
        let Ok(package) = SigningPackage::deserialize(bytes) else {
            return Vec::new();
        };
        let mine = sign::identifier(self.share.position);
        let Some(theirs) = package.signing_commitment(&mine) else {
            return Vec::new();
        };
        if package.message() != &self.msg {
            return Vec::new();
        }
        let Some(kept) = self.nonces.get_mut(&attempt) else {
            return Vec::new();
        };
        let Some(i) = kept.iter().position(|(_, c)| *c == theirs) else {
            return Vec::new();
        };
        // A nonce signs one package, whatever the outcome.
        let (nonces, _) = kept.remove(i);
        let Ok(share) = sign::sign(&self.share, &package, &nonces) else {
            return Vec::new();
        };
        drop(nonces);
        self.last_package = Some((attempt, bytes.to_vec()));
        let share = share.serialize();
        let sig = self.node.sign(
            Domain::KeySign,
            &share_statement(self.epoch(), attempt, bytes, &share),
        );
        let next = self.fresh_commitment(attempt).unwrap_or_default();
        if from == self.me {
            return self.on_share(self.me, attempt, session, share, sig, &next);
        }
        vec![self.send(
            from,
            attempt,
            SignStep::Share {
                session,
                share,
                sig,
                next,
            },
        )]
    }

    /// A signature share for a session this member aggregates (with the signer's next
    /// commitment): the session aggregates once every signer answered, or yields evidence.
    fn on_share(
        &mut self,
        from: NodeId,
        attempt: u32,
        session: u32,
        share: Vec<u8>,
        sig: Signature,
        next: &[u8],
    ) -> Vec<SignOut> {
        let (Some(position), Some(key)) = (
            self.position(&from),
            self.target.signers().member(&from).map(|m| m.key),
        ) else {
            return Vec::new();
        };
        let epoch = self.epoch();
        let public = self.share.public.clone();
        let id = sign::identifier(position);
        let outcome = {
            let Some(s) = self
                .aggregating
                .get_mut(&attempt)
                .and_then(|a| a.sessions.get_mut(session as usize))
            else {
                return Vec::new();
            };
            let statement = share_statement(epoch, attempt, &s.bytes, &share);
            if s.package.signing_commitment(&id).is_none()
                || s.shares.contains_key(&id)
                || key.verify(Domain::KeySign, &statement, &sig).is_err()
            {
                return Vec::new();
            }
            s.shares.insert(id, (from, share, sig));
            if s.shares.len() < s.package.signing_commitments().len() {
                None
            } else {
                let parsed: Option<BTreeMap<_, _>> = s
                    .shares
                    .iter()
                    .map(|(id, (_, b, _))| SignatureShare::deserialize(b).ok().map(|x| (*id, x)))
                    .collect();
                let result = match parsed {
                    Some(parsed) => sign::aggregate(&public, &s.package, &parsed),
                    None => Err(sign::AggregateError::Malformed("a share".into())),
                };
                Some((
                    result,
                    s.bytes.clone(),
                    s.shares.values().cloned().collect::<Vec<_>>(),
                ))
            }
        };
        let mut out = Vec::new();
        match outcome {
            None => {}
            Some((Ok(sig), _, _)) => return self.finish(Signature(sig)),
            Some((Err(_), package, shares)) => {
                // Evidence for everyone: the package and every signed share.
                self.on_cheaters(attempt, &package, &shares);
                out.push(SignOut::Send {
                    to: self.others(),
                    msg: MsMessage::KeySign {
                        epoch,
                        hash: self.hash,
                        attempt,
                        step: SignStep::Cheaters { package, shares },
                    },
                });
            }
        }
        // The signer is ready again with its next commitment.
        out.extend(self.on_commit(from, attempt, next));
        out.extend(self.try_session(attempt));
        out
    }

    /// Evidence of wrong signature shares: counted only if every share is signed by its sender
    /// over this package, and the shares do not aggregate because of those members.
    fn on_cheaters(&mut self, attempt: u32, package: &[u8], shares: &[SignedShare]) {
        let Ok(p) = SigningPackage::deserialize(package) else {
            return;
        };
        if p.message() != &self.msg {
            return;
        }
        let mut parsed = BTreeMap::new();
        for (from, share, sig) in shares {
            let (Some(position), Some(key)) = (
                self.position(from),
                self.target.signers().member(from).map(|m| m.key),
            ) else {
                return;
            };
            let statement = share_statement(self.epoch(), attempt, package, share);
            if key.verify(Domain::KeySign, &statement, sig).is_err() {
                return;
            }
            match SignatureShare::deserialize(share) {
                Ok(s) => {
                    parsed.insert(sign::identifier(position), s);
                }
                // A signed share that does not even parse convicts its sender.
                Err(_) => {
                    self.cheaters.insert(*from);
                    return;
                }
            }
        }
        if let Err(sign::AggregateError::Culprits(c)) =
            sign::aggregate(&self.share.public, &p, &parsed)
        {
            let named: Vec<NodeId> = c
                .into_iter()
                .filter(|m| {
                    self.position(m)
                        .is_some_and(|pos| parsed.contains_key(&sign::identifier(pos)))
                })
                .collect();
            self.cheaters.extend(named);
        }
    }

    /// The aggregate signature (from this member or another): kept if it verifies.
    fn finish(&mut self, sig: Signature) -> Vec<SignOut> {
        if self.done.is_some() {
            return Vec::new();
        }
        let result = match &self.target {
            Target::Next { prev, next } => {
                let cc = CertifiedConfig {
                    config: next.clone(),
                    cert: Certificate {
                        signatures: Vec::new(),
                        threshold: Some(sig),
                    },
                };
                match cc.verify_successor(prev) {
                    Ok(()) => SignOut::Certified(cc),
                    Err(_) => return Vec::new(),
                }
            }
            Target::Fresh { config, time_ms } => {
                let fresh = Freshness::under_key(config, *time_ms, sig);
                match fresh.verify(config) {
                    Ok(()) => SignOut::Fresh(fresh),
                    Err(_) => return Vec::new(),
                }
            }
        };
        self.done = Some(sig);
        self.nonces.clear();
        self.aggregating.clear();
        self.resend_at = self.now.saturating_add(DONE_RESEND_MS);
        vec![self.done_message(sig), result]
    }
}
