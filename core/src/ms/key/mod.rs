//! The MS's threshold key: one ed25519 key for the life of the cluster, its secret shared among the
//! committee of each epoch and moved to the next committee at every epoch change
//! (docs/DESIGN.md §3, "The threshold key").
//!
//! Goals: a configuration signed by `t` (= `2f_ms+1`) members of its committee checks with one
//! ed25519 verification under the same key whatever its epoch; no `f_ms` members of one committee,
//! with whatever old shares they kept, hold `t` shares of any epoch's sharing once the correct
//! members of that epoch erased theirs; every correct member of a new committee ends with a valid
//! share however `f_ms` dealers and `f_ms` receivers behave; a dealer that cheats is excluded with
//! evidence that anyone can check.
//!
//! How. A round moves the secret from the *dealers* (the old committee; at genesis, the first
//! committee dealing fresh randomness) to the *receivers* (the new committee). Each dealer
//! publishes one [`Deal`]: Feldman commitments to a random polynomial of degree `t-1` whose
//! constant term is its share (at genesis, a fresh secret with a proof that it knows it), and each
//! receiver's evaluation sealed under a Diffie–Hellman key with that receiver's seal key. Deals
//! and [`Complaint`]s are operations of the MS's agreement, so every member applies the same
//! [`KeyOp`]s in the same order to its [`Transcript`]; nothing is sent privately, so no dealer can
//! withhold a sub-share from one receiver, and two different deals of one dealer cannot both count
//! (the first in the order does). A receiver whose sub-share does not match the commitments
//! publishes the Diffie–Hellman key with a proof that it is the right one: everyone then opens the
//! sub-share, sees it is wrong, and the dealer is disproven. The qualified dealers are the first
//! `t` (of the old sharing's threshold) in the order that no complaint disproved; each receiver's
//! share is their sub-shares weighted by the Lagrange weights of their abscissas (at genesis,
//! summed), and the new public commitments are the same weighted sums of the dealers'
//! commitments, so the key (their constant term) is unchanged and every member's verifying share
//! is public. A complaint that arrives late only moves the qualified set to the next dealer;
//! every receiver recomputes its share from the deals in the log, so a late one loses nothing.
//! A dealer erases its old share once its deal is in the order ([`Holder`]).
//!
//! Signing is FROST's two rounds over these shares ([`sign`]): the aggregate is an ordinary
//! ed25519 signature.
//!
//! Non-goals here: carrying the operations through the agreement and deciding when a round
//! starts (the MS's role does that), the seal keys' distribution (a receiver's seal key is part
//! of its identity), and randomness (the driver passes a cryptographic generator).

mod math;
mod member;
pub mod sign;

pub use member::{key_round, KeyMember, KeyState};

use crate::config::Epoch;
use crate::crypto::NodeId;
use curve25519::edwards::EdwardsPoint;
use curve25519::scalar::Scalar;
use math::{abscissa, bytes, point, scalar};
use rand_core06::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use zeroize::Zeroize;

/// A compressed edwards25519 point as sent.
pub type PointBytes = [u8; 32];

/// A zero-knowledge proof: challenge and response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub c: [u8; 32],
    pub z: [u8; 32],
}

pub use crate::config::PublicShares;

impl PublicShares {
    /// The MS's public key: an ordinary ed25519 key.
    pub fn group_key(&self) -> PointBytes {
        self.commitments[0]
    }

    /// How many shares sign.
    pub fn threshold(&self) -> usize {
        self.commitments.len()
    }

    pub fn position(&self, member: &NodeId) -> Option<usize> {
        self.members.iter().position(|m| m == member)
    }

    /// The public image of the share of the member at `position`.
    pub fn verifying_share(&self, position: usize) -> Option<PointBytes> {
        let points = self.points()?;
        Some(bytes(&self.verifying_point(&points, position)))
    }

    /// Every member's verifying share, in committee order (the commitments decoded once).
    pub fn verifying_shares(&self) -> Option<Vec<PointBytes>> {
        let points = self.points()?;
        Some(
            (0..self.members.len())
                .map(|i| bytes(&self.verifying_point(&points, i)))
                .collect(),
        )
    }

    fn verifying_point(&self, points: &[EdwardsPoint], position: usize) -> EdwardsPoint {
        math::evaluate_in_exponent(points, &abscissa(position))
    }

    fn points(&self) -> Option<Vec<EdwardsPoint>> {
        self.commitments.iter().map(point).collect()
    }
}

/// One round: the secret of `old` (or, at genesis, a fresh one) moves from `dealers` to
/// `receivers`, each named with its seal key, as a sharing of threshold `threshold`.
#[derive(Clone, Debug)]
pub struct Round {
    pub epoch: Epoch,
    pub dealers: Vec<NodeId>,
    pub old: Option<PublicShares>,
    pub receivers: Vec<(NodeId, PointBytes)>,
    pub threshold: usize,
}

impl Round {
    /// How many qualified deals make the new sharing: the old sharing's threshold (that many
    /// shares interpolate its secret); at genesis the new threshold (so at least `f+1` of the
    /// deals summed are correct, and the secret is random and unknown to the faulty).
    pub fn needed(&self) -> usize {
        self.old
            .as_ref()
            .map_or(self.threshold, PublicShares::threshold)
    }

    /// The shape every round must have: a threshold between 1 and the receivers, enough dealers
    /// for the old threshold, nobody named twice.
    fn check(&self) -> Result<(), KeyError> {
        if self.threshold == 0 || self.threshold > self.receivers.len() || self.dealers.is_empty() {
            return Err(KeyError::BadRound("threshold out of range"));
        }
        if self.needed() > self.dealers.len() {
            return Err(KeyError::BadRound("fewer dealers than the old threshold"));
        }
        let distinct = |ids: Vec<&NodeId>| ids.iter().collect::<BTreeSet<_>>().len() == ids.len();
        if !distinct(self.dealers.iter().collect())
            || !distinct(self.receivers.iter().map(|(r, _)| r).collect())
        {
            return Err(KeyError::BadRound("a member is named twice"));
        }
        Ok(())
    }

    fn dealer(&self, who: &NodeId) -> Result<usize, KeyError> {
        self.dealers
            .iter()
            .position(|d| d == who)
            .ok_or(KeyError::NotDealer)
    }

    fn receiver(&self, who: &NodeId) -> Result<usize, KeyError> {
        self.receivers
            .iter()
            .position(|(r, _)| r == who)
            .ok_or(KeyError::NotReceiver)
    }

    fn knowledge_binding(&self, dealer: usize) -> Vec<u8> {
        let mut b = self.epoch.to_le_bytes().to_vec();
        b.extend_from_slice(&self.dealers[dealer].0);
        b
    }

    fn same_log_binding(&self, dealer: usize, receiver: usize) -> Vec<u8> {
        let mut b = self.epoch.to_le_bytes().to_vec();
        b.extend_from_slice(&self.dealers[dealer].0);
        b.extend_from_slice(&self.receivers[receiver].0 .0);
        b
    }
}

/// A dealer's public contribution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deal {
    /// Commitments to the coefficients of the dealer's polynomial, `threshold` of them.
    pub commitments: Vec<PointBytes>,
    /// `r·G` for the dealer's one-time Diffie–Hellman secret `r`.
    pub ephemeral: PointBytes,
    /// Each receiver's evaluation plus its seal mask, in the receivers' order.
    pub sealed: Vec<[u8; 32]>,
    /// At genesis: a proof that the dealer knows its constant term.
    pub proof: Option<Proof>,
}

/// A receiver's proof that its sub-share from `against` is wrong: the Diffie–Hellman key that
/// opens it, with a proof that it is `seal secret · ephemeral`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complaint {
    pub against: NodeId,
    pub shared: PointBytes,
    pub proof: Proof,
}

/// What the agreement orders for a round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyOp {
    Deal(Deal),
    Complaint(Complaint),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the round is malformed: {0}")]
    BadRound(&'static str),
    #[error("the sender is not a dealer of this round")]
    NotDealer,
    #[error("the sender is not a receiver of this round")]
    NotReceiver,
    #[error("this dealer already dealt in this round (the first deal counts)")]
    Duplicate,
    #[error("the deal is malformed: {0}")]
    Malformed(&'static str),
    #[error("the deal does not share the dealer's old share (its first commitment is not the dealer's verifying share)")]
    WrongConstant,
    #[error("a proof does not verify")]
    BadProof,
    #[error("the complaint names a dealer with no deal in this round")]
    NoSuchDeal,
    #[error("the complaint is false: the sub-share it opens is correct")]
    FalseComplaint,
    #[error("too few qualified deals yet ({have} of {needed})")]
    NotQualified { have: usize, needed: usize },
    #[error("the sub-share from dealer {0} does not match its commitments: complain")]
    BadSubShare(NodeId),
    #[error("no share for this sharing")]
    NoShare,
}

impl KeyError {
    /// Why, in a few static words (for an operation the MS ignores).
    pub fn reason(&self) -> &'static str {
        match self {
            KeyError::BadRound(why) | KeyError::Malformed(why) => why,
            KeyError::NotDealer => "key operation: the sender is not a dealer of this round",
            KeyError::NotReceiver => "key operation: the sender is not a receiver of this round",
            KeyError::Duplicate => "key operation: this dealer already dealt",
            KeyError::WrongConstant => "key operation: the deal does not share the dealer's share",
            KeyError::BadProof => "key operation: a proof does not verify",
            KeyError::NoSuchDeal => "key operation: a complaint about a dealer with no deal",
            KeyError::FalseComplaint => "key operation: a false complaint",
            KeyError::NotQualified { .. } => "key operation: the round is not qualified",
            KeyError::BadSubShare(_) => "key operation: a wrong sub-share",
            KeyError::NoShare => "key operation: no share",
        }
    }
}

/// The qualified deals of one round, for a receiver that missed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundDeals {
    pub epoch: Epoch,
    /// Whether the round generated the key (its shares are sums, not interpolations).
    pub generation: bool,
    /// Each qualified deal with its dealer's place among the round's dealers.
    pub deals: Vec<(u32, Deal)>,
}

/// The share of the receiver at `position` of the sharing `public` (the one a configuration
/// carries), opened from `deals` as someone who saw the round gives them: each sub-share
/// unsealed with `seal`, weighted as the round weighs it. Whoever sends the deals, the result is
/// kept only if it matches the receiver's public verifying share, so a lie is caught and the
/// deals are asked of someone else.
pub fn recover_share(
    public: &PublicShares,
    position: usize,
    seal: &SealKey,
    deals: &RoundDeals,
) -> Result<KeyShare, KeyError> {
    if deals.epoch != public.epoch || deals.deals.is_empty() || position >= public.members.len() {
        return Err(KeyError::Malformed("the deals are not of this sharing"));
    }
    let xs: Vec<Scalar> = deals
        .deals
        .iter()
        .map(|(d, _)| abscissa(*d as usize))
        .collect();
    let mut secret = Scalar::ZERO;
    for (i, (dealer, d)) in deals.deals.iter().enumerate() {
        let ephemeral = point(&d.ephemeral).ok_or(KeyError::Malformed("the ephemeral key"))?;
        let sealed = d
            .sealed
            .get(position)
            .and_then(scalar)
            .ok_or(KeyError::Malformed("a sealed sub-share"))?;
        let shared = ephemeral * seal.secret;
        let value = sealed - math::seal_mask(&shared, deals.epoch, *dealer as usize, position);
        let weight = if deals.generation {
            Scalar::ONE
        } else {
            math::lagrange_at_zero(&xs, i)
        };
        secret += weight * value;
    }
    let share = KeyShare {
        public: public.clone(),
        position,
        secret,
    };
    share.is_valid().then_some(share).ok_or(KeyError::Malformed(
        "the deals do not make this member's share",
    ))
}

/// A receiver's secret for opening its sealed sub-shares; its public half is announced with its
/// identity. The driver derives it from a secret seed (the node's key material).
pub struct SealKey {
    secret: Scalar,
}

impl SealKey {
    pub fn from_seed(seed: &[u8; 32]) -> SealKey {
        SealKey {
            secret: math::hash_to_scalar(math::SEAL_KEY_CONTEXT, &[seed]),
        }
    }

    /// The seal key of a node: its ed25519 secret scalar, so its public half is the node's public
    /// key and needs no announcing. Using one key for signatures and for these Diffie–Hellman
    /// keys is sound here (Thormarker, "On using the same key pair for Ed25519 and an X25519
    /// based KEM", 2021, proves the pairing secure): ed25519 signing never uses the scalar as a
    /// nonce, points from others are checked to be in the prime-order subgroup, and the only
    /// Diffie–Hellman value the node ever reveals is the one a complaint needs, for a deal
    /// ordered in the agreement (far too few for a static Diffie–Hellman attack).
    pub fn of_node(key: &crate::crypto::Keypair) -> SealKey {
        SealKey {
            secret: Scalar::from_bytes_mod_order(*key.scalar_bytes()),
        }
    }

    pub fn public(&self) -> PointBytes {
        bytes(&EdwardsPoint::mul_base(&self.secret))
    }
}

/// Whether a node's public key can be its seal key (a point of the prime-order subgroup, not of
/// small order): the MS refuses to admit a node whose key cannot be.
pub fn valid_seal(key: &crate::crypto::PublicKey) -> bool {
    point(&key.0).is_some()
}

/// A deterministic cryptographic generator: BLAKE3's extendable output keyed by a secret. A node
/// draws its deals and complaints from one keyed by its secret and the round, so a node that
/// restarts deals again exactly what it dealt (never two different deals of one round).
pub struct XofRng(blake3::OutputReader);

impl XofRng {
    /// The generator of `secret` for `purpose`.
    pub fn new(secret: &[u8; 32], purpose: &[u8]) -> XofRng {
        let mut h = blake3::Hasher::new_keyed(secret);
        h.update(purpose);
        XofRng(h.finalize_xof())
    }

    /// The generator a node draws from for `what` (about `about`) in the round of `epoch`.
    pub fn of_node(key: &crate::crypto::Keypair, what: &str, epoch: Epoch, about: &[u8]) -> XofRng {
        let mut purpose = b"dbqsfs 2026-12 ms key: ".to_vec();
        purpose.extend_from_slice(what.as_bytes());
        purpose.extend_from_slice(&epoch.to_le_bytes());
        purpose.extend_from_slice(about);
        XofRng::new(&key.scalar_bytes(), &purpose)
    }
}

impl RngCore for XofRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.0.fill(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.0.fill(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill(dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core06::Error> {
        self.0.fill(dest);
        Ok(())
    }
}

impl CryptoRng for XofRng {}

impl Drop for SealKey {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

/// One member's share of one epoch's sharing. The scalar is private and wiped when dropped.
#[derive(Clone)]
pub struct KeyShare {
    pub public: PublicShares,
    pub position: usize,
    secret: Scalar,
}

impl KeyShare {
    pub fn epoch(&self) -> Epoch {
        self.public.epoch
    }

    /// Whether the secret matches the public verifying share of this member.
    pub fn is_valid(&self) -> bool {
        self.public.verifying_share(self.position)
            == Some(bytes(&EdwardsPoint::mul_base(&self.secret)))
    }

    /// The share as the node persists it (secret: keep it with the node's key).
    pub fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let stored = (&self.public, self.position as u32, self.secret.to_bytes());
        zeroize::Zeroizing::new(postcard::to_stdvec(&stored).expect("shares always encode"))
    }

    /// A share persisted by [`KeyShare::to_bytes`], checked against its verifying share.
    pub fn from_bytes(b: &[u8]) -> Result<KeyShare, KeyError> {
        let (public, position, secret): (PublicShares, u32, [u8; 32]) =
            postcard::from_bytes(b).map_err(|_| KeyError::Malformed("unreadable share"))?;
        let secret = scalar(&secret).ok_or(KeyError::Malformed("unreadable share"))?;
        let share = KeyShare {
            public,
            position: position as usize,
            secret,
        };
        share.is_valid().then_some(share).ok_or(KeyError::Malformed(
            "the share does not match its verifying share",
        ))
    }

    /// The share's scalar, for the simulator's model of what a coalition knows.
    #[cfg(feature = "mutants")]
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }
}

impl std::fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyShare")
            .field("epoch", &self.public.epoch)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl Drop for KeyShare {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

/// A dealer's deal for `round`: a sharing of `old` (its share of the sharing before), or at
/// genesis (`round.old == None`) of a fresh secret.
pub fn deal<R: RngCore + CryptoRng>(
    round: &Round,
    me: &NodeId,
    old: Option<&KeyShare>,
    rng: &mut R,
) -> Result<Deal, KeyError> {
    round.check()?;
    let dealer = round.dealer(me)?;
    let mut constant = match (&round.old, old) {
        (None, _) => math::random(rng),
        (Some(public), Some(share)) if share.public == *public => share.secret,
        (Some(_), _) => return Err(KeyError::NoShare),
    };
    let mut coefficients = vec![constant];
    coefficients.extend((1..round.threshold).map(|_| math::random(rng)));
    let commitments: Vec<EdwardsPoint> = coefficients.iter().map(EdwardsPoint::mul_base).collect();
    let mut r = math::random(rng);
    let mut sealed = Vec::with_capacity(round.receivers.len());
    for (j, (_, seal)) in round.receivers.iter().enumerate() {
        let seal = point(seal).ok_or(KeyError::BadRound("a receiver's seal key is not a point"))?;
        let value = math::evaluate(&coefficients, &abscissa(j));
        sealed.push((value + math::seal_mask(&(seal * r), round.epoch, dealer, j)).to_bytes());
    }
    let proof = round.old.is_none().then(|| {
        math::prove_knowledge(
            &round.knowledge_binding(dealer),
            &constant,
            &commitments[0],
            rng,
        )
    });
    let ephemeral = bytes(&EdwardsPoint::mul_base(&r));
    coefficients.zeroize();
    constant.zeroize();
    r.zeroize();
    Ok(Deal {
        commitments: commitments.iter().map(bytes).collect(),
        ephemeral,
        sealed,
        proof,
    })
}

/// A deal the transcript accepted, decoded.
#[derive(Clone, Debug)]
struct Accepted {
    dealer: usize,
    commitments: Vec<EdwardsPoint>,
    ephemeral: EdwardsPoint,
    sealed: Vec<Scalar>,
    /// The deal as it was ordered (what a receiver that missed the round is given).
    raw: Deal,
}

/// What applying an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Dealt(NodeId),
    /// The complaint proved the dealer's deal wrong: it is out of this round.
    Disproved(NodeId),
}

/// A round's ordered operations, as every member of the agreement holds them, and what follows
/// from them: the qualified deals, the new public shares, each receiver's share.
#[derive(Clone, Debug)]
pub struct Transcript {
    round: Round,
    seals: Vec<EdwardsPoint>,
    old: Option<Vec<EdwardsPoint>>,
    deals: Vec<Accepted>,
    disproven: BTreeSet<usize>,
    /// The public shares of the current qualified set, recomputed when an operation changes it.
    public: Option<PublicShares>,
}

impl Transcript {
    pub fn new(round: Round) -> Result<Transcript, KeyError> {
        round.check()?;
        let seals = round
            .receivers
            .iter()
            .map(|(_, s)| point(s))
            .collect::<Option<Vec<_>>>()
            .ok_or(KeyError::BadRound("a receiver's seal key is not a point"))?;
        let old = match &round.old {
            None => None,
            Some(public) => {
                if public.members != round.dealers {
                    return Err(KeyError::BadRound("the dealers are not the old committee"));
                }
                let points = public
                    .points()
                    .ok_or(KeyError::BadRound("the old commitments are not points"))?;
                Some(
                    (0..round.dealers.len())
                        .map(|i| public.verifying_point(&points, i))
                        .collect(),
                )
            }
        };
        Ok(Transcript {
            round,
            seals,
            old,
            deals: Vec::new(),
            disproven: BTreeSet::new(),
            public: None,
        })
    }

    pub fn round(&self) -> &Round {
        &self.round
    }

    /// Applies the next operation in the agreement's order, submitted by `from`. An error leaves
    /// the transcript as it was; an error about a complaint or a deal is evidence against `from`.
    pub fn apply(&mut self, from: &NodeId, op: &KeyOp) -> Result<Applied, KeyError> {
        let applied = match op {
            KeyOp::Deal(d) => self.apply_deal(from, d),
            KeyOp::Complaint(c) => self.apply_complaint(from, c),
        }?;
        self.public = self.compute_public();
        Ok(applied)
    }

    fn apply_deal(&mut self, from: &NodeId, d: &Deal) -> Result<Applied, KeyError> {
        let dealer = self.round.dealer(from)?;
        if self.deals.iter().any(|a| a.dealer == dealer) {
            return Err(KeyError::Duplicate);
        }
        if d.commitments.len() != self.round.threshold {
            return Err(KeyError::Malformed("wrong number of commitments"));
        }
        if d.sealed.len() != self.round.receivers.len() {
            return Err(KeyError::Malformed("wrong number of sealed sub-shares"));
        }
        let commitments = d
            .commitments
            .iter()
            .map(point)
            .collect::<Option<Vec<_>>>()
            .ok_or(KeyError::Malformed("a commitment is not a point"))?;
        let ephemeral = point(&d.ephemeral).ok_or(KeyError::Malformed("the ephemeral key"))?;
        let sealed = d
            .sealed
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()
            .ok_or(KeyError::Malformed("a sealed sub-share is not a scalar"))?;
        match (&self.old, &d.proof) {
            (Some(old), _) if old[dealer] != commitments[0] => return Err(KeyError::WrongConstant),
            (Some(_), _) => {}
            (None, Some(proof)) => {
                let binding = self.round.knowledge_binding(dealer);
                if !math::check_knowledge(&binding, &commitments[0], proof) {
                    return Err(KeyError::BadProof);
                }
            }
            (None, None) => return Err(KeyError::Malformed("no proof of knowledge at genesis")),
        }
        self.deals.push(Accepted {
            dealer,
            commitments,
            ephemeral,
            sealed,
            raw: d.clone(),
        });
        Ok(Applied::Dealt(*from))
    }

    fn apply_complaint(&mut self, from: &NodeId, c: &Complaint) -> Result<Applied, KeyError> {
        let receiver = self.round.receiver(from)?;
        let deal = self.deal_of(&c.against)?;
        let dealer = deal.dealer;
        let shared = point(&c.shared).ok_or(KeyError::BadProof)?;
        let binding = self.round.same_log_binding(dealer, receiver);
        if !math::check_same_log(
            &binding,
            &self.seals[receiver],
            &deal.ephemeral,
            &shared,
            &c.proof,
        ) {
            return Err(KeyError::BadProof);
        }
        if self.opens(deal, receiver, &shared).is_some() {
            return Err(KeyError::FalseComplaint);
        }
        self.disproven.insert(dealer);
        Ok(Applied::Disproved(c.against))
    }

    /// The sub-share of `receiver` in `deal` opened with the Diffie–Hellman key, if it matches
    /// the commitments.
    fn opens(&self, deal: &Accepted, receiver: usize, shared: &EdwardsPoint) -> Option<Scalar> {
        let mask = math::seal_mask(shared, self.round.epoch, deal.dealer, receiver);
        let value = deal.sealed[receiver] - mask;
        let expected = math::evaluate_in_exponent(&deal.commitments, &abscissa(receiver));
        (EdwardsPoint::mul_base(&value) == expected).then_some(value)
    }

    /// The dealers who dealt, in order.
    pub fn dealt(&self) -> Vec<NodeId> {
        self.deals
            .iter()
            .map(|a| self.round.dealers[a.dealer])
            .collect()
    }

    /// The dealers a complaint disproved.
    pub fn disproven(&self) -> Vec<NodeId> {
        self.disproven
            .iter()
            .map(|i| self.round.dealers[*i])
            .collect()
    }

    /// The first `needed` deals no complaint disproved, with their weights; `None` while fewer.
    fn qualified(&self) -> Option<(Vec<&Accepted>, Vec<Scalar>)> {
        let deals: Vec<&Accepted> = self
            .deals
            .iter()
            .filter(|a| !self.disproven.contains(&a.dealer))
            .take(self.round.needed())
            .collect();
        if deals.len() < self.round.needed() {
            return None;
        }
        let weights = if self.round.old.is_some() {
            let xs: Vec<Scalar> = deals.iter().map(|a| abscissa(a.dealer)).collect();
            (0..xs.len())
                .map(|i| math::lagrange_at_zero(&xs, i))
                .collect()
        } else {
            vec![Scalar::ONE; deals.len()]
        };
        Some((deals, weights))
    }

    /// The qualified deals with their dealers' places in the round, and whether the round
    /// generates the key: what a receiver that missed the round needs ([`recover_share`]).
    pub fn qualified_deals(&self) -> Option<RoundDeals> {
        let (deals, _) = self.qualified()?;
        Some(RoundDeals {
            epoch: self.round.epoch,
            generation: self.round.old.is_none(),
            deals: deals
                .iter()
                .map(|a| (a.dealer as u32, a.raw.clone()))
                .collect(),
        })
    }

    /// The qualified dealers, once there are enough.
    pub fn qualified_dealers(&self) -> Option<Vec<NodeId>> {
        let (deals, _) = self.qualified()?;
        Some(deals.iter().map(|a| self.round.dealers[a.dealer]).collect())
    }

    /// The new sharing's public side, once enough deals qualify. It changes only if a later
    /// complaint disproves a qualified dealer (the key never does).
    pub fn public(&self) -> Result<PublicShares, KeyError> {
        self.public.clone().ok_or_else(|| self.not_qualified())
    }

    fn compute_public(&self) -> Option<PublicShares> {
        let (deals, weights) = self.qualified()?;
        let commitments = (0..self.round.threshold)
            .map(|k| {
                let points: Vec<EdwardsPoint> = deals.iter().map(|a| a.commitments[k]).collect();
                bytes(&math::combine(&weights, &points))
            })
            .collect();
        Some(PublicShares {
            epoch: self.round.epoch,
            members: self.round.receivers.iter().map(|(r, _)| *r).collect(),
            commitments,
        })
    }

    fn not_qualified(&self) -> KeyError {
        KeyError::NotQualified {
            have: self.deals.len() - self.disproven.len(),
            needed: self.round.needed(),
        }
    }

    /// Opens `me`'s sub-share from `dealer`: `Ok(())` if it matches the commitments, otherwise
    /// the complaint that proves it does not.
    pub fn check<R: RngCore + CryptoRng>(
        &self,
        me: &NodeId,
        key: &SealKey,
        dealer: &NodeId,
        rng: &mut R,
    ) -> Result<Result<(), Complaint>, KeyError> {
        let receiver = self.round.receiver(me)?;
        let deal = self.deal_of(dealer)?;
        if self
            .opens(deal, receiver, &(deal.ephemeral * key.secret))
            .is_some()
        {
            return Ok(Ok(()));
        }
        Ok(Err(self.complaint(receiver, deal, key, rng)))
    }

    /// The accepted deal of `dealer`.
    fn deal_of(&self, dealer: &NodeId) -> Result<&Accepted, KeyError> {
        let d = self.round.dealer(dealer)?;
        self.deals
            .iter()
            .find(|a| a.dealer == d)
            .ok_or(KeyError::NoSuchDeal)
    }

    /// The complaint of `receiver` about its sub-share in `deal`: the Diffie–Hellman key that
    /// opens it and the proof that it is the right one.
    fn complaint<R: RngCore + CryptoRng>(
        &self,
        receiver: usize,
        deal: &Accepted,
        key: &SealKey,
        rng: &mut R,
    ) -> Complaint {
        let shared = deal.ephemeral * key.secret;
        let proof = math::prove_same_log(
            &self.round.same_log_binding(deal.dealer, receiver),
            &key.secret,
            &self.seals[receiver],
            &deal.ephemeral,
            &shared,
            rng,
        );
        Complaint {
            against: self.round.dealers[deal.dealer],
            shared: bytes(&shared),
            proof,
        }
    }

    /// `me`'s share of the new sharing, from the qualified deals. A sub-share that does not match
    /// its commitments is an error naming its dealer: complain ([`Transcript::check`]) and try
    /// again once the complaint is applied.
    pub fn share(&self, me: &NodeId, key: &SealKey) -> Result<KeyShare, KeyError> {
        self.share_checked(me, key, true)
    }

    /// The share computed without checking the sub-shares against their commitments: what the
    /// `reshare-unverified` mutant does.
    #[cfg(feature = "mutants")]
    pub fn share_unverified(&self, me: &NodeId, key: &SealKey) -> Result<KeyShare, KeyError> {
        self.share_checked(me, key, false)
    }

    fn share_checked(
        &self,
        me: &NodeId,
        key: &SealKey,
        verify: bool,
    ) -> Result<KeyShare, KeyError> {
        let receiver = self.round.receiver(me)?;
        let (deals, weights) = self.qualified().ok_or_else(|| self.not_qualified())?;
        let mut secret = Scalar::ZERO;
        for (deal, w) in deals.iter().zip(&weights) {
            let shared = deal.ephemeral * key.secret;
            let value = if verify {
                self.opens(deal, receiver, &shared)
                    .ok_or(KeyError::BadSubShare(self.round.dealers[deal.dealer]))?
            } else {
                deal.sealed[receiver]
                    - math::seal_mask(&shared, self.round.epoch, deal.dealer, receiver)
            };
            secret += w * value;
        }
        Ok(KeyShare {
            public: self.public()?,
            position: receiver,
            secret,
        })
    }
}

/// A complaint about `me`'s sub-share from `dealer` whether or not it is wrong, with a correct
/// proof: what a Byzantine receiver sends to have a correct dealer disproven, which the
/// transcript refuses as false (for the tests and the simulator's adversary).
pub fn false_complaint<R: RngCore + CryptoRng>(
    transcript: &Transcript,
    me: &NodeId,
    key: &SealKey,
    dealer: &NodeId,
    rng: &mut R,
) -> Result<Complaint, KeyError> {
    let receiver = transcript.round.receiver(me)?;
    let deal = transcript.deal_of(dealer)?;
    Ok(transcript.complaint(receiver, deal, key, rng))
}

/// `secret·G` for a share's scalar, for the simulator's model of what a coalition knows.
#[cfg(feature = "mutants")]
pub fn public_of_secret(secret: &[u8; 32]) -> PointBytes {
    bytes(&EdwardsPoint::mul_base(
        &scalar(secret).unwrap_or(Scalar::ZERO),
    ))
}

/// A member's shares over time: the one of each sharing it belongs to, the older erased as soon
/// as its deal to the next committee is in the agreement's order, each used only to sign for the
/// epoch it was made for.
#[derive(Default)]
pub struct Holder {
    shares: Vec<KeyShare>,
    /// The `keep-old-shares` mutant: never erase, and sign with whatever share is held.
    #[cfg(feature = "mutants")]
    pub keep_old_shares: bool,
}

impl Holder {
    pub fn install(&mut self, share: KeyShare) {
        self.shares.retain(|s| s.epoch() != share.epoch());
        self.shares.push(share);
        self.shares.sort_by_key(KeyShare::epoch);
    }

    /// The share to deal from in the round of `epoch` (the newest from before it).
    pub fn to_deal(&self, epoch: Epoch) -> Option<&KeyShare> {
        self.shares.iter().rev().find(|s| s.epoch() < epoch)
    }

    /// My deal for the round of `epoch` is in the order: the older shares have done their work.
    pub fn dealt(&mut self, epoch: Epoch) {
        #[cfg(feature = "mutants")]
        if self.keep_old_shares {
            return;
        }
        self.shares.retain(|s| s.epoch() >= epoch);
    }

    /// The share that signs for `epoch`, if I hold that epoch's.
    pub fn for_signing(&self, epoch: Epoch) -> Option<&KeyShare> {
        let exact = self.shares.iter().find(|s| s.epoch() == epoch);
        #[cfg(feature = "mutants")]
        if self.keep_old_shares {
            return exact.or(self.shares.last());
        }
        exact
    }

    /// The shares held, oldest first.
    pub fn held(&self) -> &[KeyShare] {
        &self.shares
    }
}
