//! The messages of the agreement protocol: one closed enum ([`AgreementMessage`]), the signed
//! statements it carries, and the checks that turn untrusted statements into trusted ones.
//!
//! Every protocol statement is a [`Signed`] body: the signer's index in the committee, the body, and
//! an ed25519 signature in [`Domain::Agreement`] over `kind ‖ epoch ‖ postcard(body)`. The kind byte
//! keeps a prepare from being replayed as a commit; the epoch keeps a statement of one committee
//! from being replayed to the next. Because statements are signed, certificates (a pre-prepare with
//! its prepares, a quorum of commits or checkpoints, a quorum of view changes) can be forwarded and
//! checked by anyone who knows the committee.
//!
//! Requests are signed by their clients over `client ‖ seq ‖ payload` (no epoch: a request not yet
//! ordered when the committee changes is re-submitted as is to the next one).
//!
//! All checks here are pure functions of the statement, the [`Committee`] and the epoch, so a
//! backup checking a NEW-VIEW and an auditor checking [`Evidence`] run the same code.

use crate::config::Epoch;
use crate::crypto::{Domain, Keypair, NodeId, PublicKey, Signature};
use crate::quorum::Quorum;
use crate::wire::Protocol;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// A view number. The primary of view `v` is `committee[v mod n]`.
pub type View = u64;
/// A sequence number assigned by a primary to a batch. The first batch is 1; 0 is the genesis
/// checkpoint.
pub type SeqNo = u64;
/// A BLAKE3 digest.
pub type Digest = [u8; 32];

/// Largest request payload, in bytes.
pub const MAX_PAYLOAD: usize = 4096;
/// Most clients the duplicate table remembers; requests of further clients are not executed (see
/// the module documentation of [`super`]).
pub const MAX_CLIENTS: usize = 8192;

/// Why a message, statement or request was refused. Nothing that comes from the network panics:
/// every refusal is one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("undecodable: {0}")]
    Undecodable(#[from] crate::wire::WireError),
    #[error("message of epoch {theirs}; this committee runs epoch {ours}")]
    OtherEpoch { ours: Epoch, theirs: Epoch },
    #[error("{0:?} is not a member of the committee")]
    NotAMember(NodeId),
    #[error("signer index {0} is not in the committee")]
    UnknownSigner(u32),
    #[error("the signature does not verify")]
    BadSignature,
    #[error("message of view {theirs} while in view {ours}")]
    OtherView { ours: View, theirs: View },
    #[error("a view change is in progress")]
    ChangingView,
    #[error("sequence number {seq} is outside the window ({low}, {high}]")]
    OutsideWindow { seq: SeqNo, low: SeqNo, high: SeqNo },
    #[error("the statement is not signed by the primary of its view")]
    NotPrimary,
    #[error("the primary does not send prepares")]
    PrepareFromPrimary,
    #[error("request {seq} of this client is not newer than the last executed one ({executed})")]
    AlreadyExecuted { seq: u64, executed: u64 },
    #[error("payload of {len} bytes exceeds {max}")]
    TooLarge { len: usize, max: usize },
    #[error("batch of {len} requests exceeds {max}")]
    BatchTooLarge { len: usize, max: usize },
    #[error("the batch does not hash to the signed digest")]
    DigestMismatch,
    #[error("the member signed a conflicting statement for the same slot (evidence returned)")]
    Conflicting,
    #[error("invalid certificate: {0}")]
    BadCertificate(&'static str),
    #[error("invalid view change: {0}")]
    BadViewChange(&'static str),
    #[error("invalid new view: {0}")]
    BadNewView(&'static str),
    #[error("invalid state snapshot: {0}")]
    BadState(&'static str),
    #[error("too many pending requests")]
    Busy,
    #[error("stale: {0}")]
    Stale(&'static str),
}

/// A client's request: opaque to the agreement, authenticated by the client's signature.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client: PublicKey,
    /// The client's own counter: a request whose `seq` is not above the last executed one of the
    /// same client is never executed (duplicates and replays).
    pub seq: u64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub sig: Signature,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Request({}#{}, {} bytes)",
            hex::encode(&self.client.0[..4]),
            self.seq,
            self.payload.len()
        )
    }
}

/// Identifies a request for duplicate detection: (client, client's seq).
pub type RequestKey = (PublicKey, u64);

impl Request {
    /// Signs `payload` as request `seq` of `client`.
    pub fn sign(client: &Keypair, seq: u64, payload: Vec<u8>) -> Request {
        let pk = client.public();
        let sig = client.sign(Domain::Agreement, &request_bytes(&pk, seq, &payload));
        Request {
            client: pk,
            seq,
            payload,
            sig,
        }
    }

    pub fn key(&self) -> RequestKey {
        (self.client, self.seq)
    }

    /// Checks the size limit and the client's signature.
    pub fn verify(&self) -> Result<(), Rejected> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(Rejected::TooLarge {
                len: self.payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        self.client
            .verify(
                Domain::Agreement,
                &request_bytes(&self.client, self.seq, &self.payload),
                &self.sig,
            )
            .map_err(|_| Rejected::BadSignature)
    }

    /// The digest of the request's exact bytes (signature included).
    pub fn digest(&self) -> Digest {
        let mut h = blake3::Hasher::new_derive_key("dbqsfs 2026-11 agreement request");
        h.update(&self.client.0);
        h.update(&self.seq.to_le_bytes());
        h.update(&(self.payload.len() as u64).to_le_bytes());
        h.update(&self.payload);
        h.update(&self.sig.0);
        *h.finalize().as_bytes()
    }
}

const KIND_REQUEST: u8 = 0;

fn request_bytes(client: &PublicKey, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(1 + 32 + 8 + payload.len());
    b.push(KIND_REQUEST);
    b.extend_from_slice(&client.0);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

/// The digest of a batch: what pre-prepares, prepares and commits sign. The empty batch is the
/// "null request" a new primary assigns to sequence numbers nobody prepared.
pub fn batch_digest(batch: &[Request]) -> Digest {
    let mut h = blake3::Hasher::new_derive_key("dbqsfs 2026-11 agreement batch");
    h.update(&(batch.len() as u64).to_le_bytes());
    for r in batch {
        h.update(&r.digest());
    }
    *h.finalize().as_bytes()
}

/// The state digest that checkpoints sign: the sequence number, the application's digest (supplied
/// by the driver) and the duplicate table (the last executed request of every client), which is
/// part of the replicated state.
pub fn state_digest(seq: SeqNo, app_digest: &Digest, clients: &[(PublicKey, u64)]) -> Digest {
    let mut h = blake3::Hasher::new_derive_key("dbqsfs 2026-11 agreement checkpoint");
    h.update(&seq.to_le_bytes());
    h.update(app_digest);
    h.update(&(clients.len() as u64).to_le_bytes());
    for (c, s) in clients {
        h.update(&c.0);
        h.update(&s.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// The digest of the genesis checkpoint (sequence number 0, nothing executed). It needs no proof.
pub fn genesis_digest() -> Digest {
    state_digest(0, &[0; 32], &[])
}

/// A body that members sign.
pub trait Statement: Serialize {
    /// Distinguishes the kinds of statements in the signed bytes.
    const KIND: u8;
}

/// A statement signed by the committee member at index `signer`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    pub signer: u32,
    pub body: T,
    pub sig: Signature,
}

fn statement_bytes<T: Statement>(epoch: Epoch, body: &T) -> Vec<u8> {
    let mut b = vec![T::KIND];
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend(postcard::to_stdvec(body).expect("in-memory statements always encode"));
    b
}

impl<T: Statement> Signed<T> {
    /// Signs `body` as member `signer` of the committee of `epoch`.
    pub fn sign(key: &Keypair, signer: u32, epoch: Epoch, body: T) -> Signed<T> {
        let sig = key.sign(Domain::Agreement, &statement_bytes(epoch, &body));
        Signed { signer, body, sig }
    }
}

/// PRE-PREPARE: the primary of `view` assigns `seq` to the batch with `digest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrePrepare {
    pub view: View,
    pub seq: SeqNo,
    pub digest: Digest,
}

/// PREPARE: a backup accepted the pre-prepare (`view`, `seq`, `digest`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub view: View,
    pub seq: SeqNo,
    pub digest: Digest,
}

/// COMMIT: a member holds a prepared certificate for (`view`, `seq`, `digest`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub view: View,
    pub seq: SeqNo,
    pub digest: Digest,
}

/// CHECKPOINT: after executing `seq`, the member's state digest ([`state_digest`]) is `digest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: SeqNo,
    pub digest: Digest,
}

/// VIEW-CHANGE: the member moves to `new_view`, with its stable checkpoint and the prepared
/// certificates it holds above it (for each sequence number, the one of the highest view).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    pub new_view: View,
    pub stable: StableProof,
    pub prepared: Vec<PreparedCert>,
}

/// NEW-VIEW: the primary of `view` starts it with `2f+1` view changes and the pre-prepares (the
/// "O set") computed from them, one per sequence number above their highest stable checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewView {
    pub view: View,
    pub view_changes: Vec<Signed<ViewChange>>,
    pub pre_prepares: Vec<Signed<PrePrepare>>,
}

impl Statement for PrePrepare {
    const KIND: u8 = 1;
}
impl Statement for Prepare {
    const KIND: u8 = 2;
}
impl Statement for Commit {
    const KIND: u8 = 3;
}
impl Statement for Checkpoint {
    const KIND: u8 = 4;
}
impl Statement for ViewChange {
    const KIND: u8 = 5;
}
impl Statement for NewView {
    const KIND: u8 = 6;
}

/// A stable checkpoint: `2f+1` members signed the same state digest at `seq`. Sequence number 0
/// is the genesis checkpoint, with [`genesis_digest`] and no signatures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StableProof {
    pub seq: SeqNo,
    pub digest: Digest,
    pub signatures: Vec<Signed<Checkpoint>>,
}

impl StableProof {
    pub fn genesis() -> StableProof {
        StableProof {
            seq: 0,
            digest: genesis_digest(),
            signatures: Vec::new(),
        }
    }
}

/// A prepared certificate: the primary's pre-prepare and `2f` matching prepares of other members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedCert {
    pub pre_prepare: Signed<PrePrepare>,
    pub prepares: Vec<Signed<Prepare>>,
}

/// A decided batch with its commit certificate (`2f+1` matching commits): self-certifying, so a
/// member that missed the protocol messages executes it on this proof alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecidedProof {
    pub view: View,
    pub seq: SeqNo,
    pub batch: Vec<Request>,
    pub commits: Vec<Signed<Commit>>,
}

/// The replicated state at a stable checkpoint, for a member that fell behind it: the application
/// digest (the driver fetches the application state that hashes to it) and the duplicate table,
/// proved by the stable checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub stable: StableProof,
    pub app_digest: Digest,
    /// Sorted by client, no duplicates.
    pub clients: Vec<(PublicKey, u64)>,
}

/// Every message of the agreement protocol. The sender's epoch travels in the envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgreementMessage {
    /// A client request, forwarded by the member it was submitted to.
    Request(Request),
    PrePrepare {
        pre_prepare: Signed<PrePrepare>,
        batch: Vec<Request>,
    },
    Prepare(Signed<Prepare>),
    Commit(Signed<Commit>),
    Checkpoint(Signed<Checkpoint>),
    /// `batches[i]` is the batch of `view_change.body.prepared[i]` (not signed: checked by digest).
    ViewChange {
        view_change: Signed<ViewChange>,
        batches: Vec<Vec<Request>>,
    },
    /// `batches[i]` is the batch of `new_view.body.pre_prepares[i]`.
    NewView {
        new_view: Signed<NewView>,
        batches: Vec<Vec<Request>>,
    },
    /// Sent to every member each tick: a hint (unsigned) that lets peers notice they are behind.
    Status {
        view: View,
        changing: bool,
        executed: SeqNo,
        stable: SeqNo,
    },
    /// "Send me what you decided after `after`."
    Fetch {
        after: SeqNo,
    },
    /// The sender's stable checkpoint, for a member whose status or fetch shows an older one (it
    /// may have executed that far without seeing the checkpoint become stable).
    StableCheckpoint(StableProof),
    /// Answer to a fetch from behind the sender's stable checkpoint.
    State(StateSnapshot),
    /// Answer to a fetch: decided batches in sequence order.
    Decided(Vec<DecidedProof>),
}

impl Protocol for AgreementMessage {
    const ID: u8 = 2;
}

/// A signed statement that can be half of an equivocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignedStatement {
    PrePrepare(Signed<PrePrepare>),
    Prepare(Signed<Prepare>),
    Commit(Signed<Commit>),
    Checkpoint(Signed<Checkpoint>),
}

impl SignedStatement {
    pub fn signer(&self) -> u32 {
        match self {
            SignedStatement::PrePrepare(s) => s.signer,
            SignedStatement::Prepare(s) => s.signer,
            SignedStatement::Commit(s) => s.signer,
            SignedStatement::Checkpoint(s) => s.signer,
        }
    }

    /// (kind, view, seq): two statements of one signer for the same slot must carry the same digest.
    fn slot(&self) -> (u8, View, SeqNo) {
        match self {
            SignedStatement::PrePrepare(s) => (PrePrepare::KIND, s.body.view, s.body.seq),
            SignedStatement::Prepare(s) => (Prepare::KIND, s.body.view, s.body.seq),
            SignedStatement::Commit(s) => (Commit::KIND, s.body.view, s.body.seq),
            SignedStatement::Checkpoint(s) => (Checkpoint::KIND, 0, s.body.seq),
        }
    }

    fn digest(&self) -> Digest {
        match self {
            SignedStatement::PrePrepare(s) => s.body.digest,
            SignedStatement::Prepare(s) => s.body.digest,
            SignedStatement::Commit(s) => s.body.digest,
            SignedStatement::Checkpoint(s) => s.body.digest,
        }
    }

    fn verify(&self, committee: &Committee, epoch: Epoch) -> Result<NodeId, Rejected> {
        match self {
            SignedStatement::PrePrepare(s) => committee.verify(epoch, s),
            SignedStatement::Prepare(s) => committee.verify(epoch, s),
            SignedStatement::Commit(s) => committee.verify(epoch, s),
            SignedStatement::Checkpoint(s) => committee.verify(epoch, s),
        }
    }
}

/// Proof that members misbehaved, made of statements they signed. The protocol returns evidence
/// instead of overwriting what it saw first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Evidence {
    /// One member signed two different digests for one slot: two pre-prepares for one view and
    /// sequence number (an equivocating primary), two prepares, two commits, or two checkpoints.
    Equivocation {
        first: SignedStatement,
        second: SignedStatement,
    },
    /// Two commit certificates for different batches at one sequence number. No correct member
    /// ever sees this while at most `f` members are faulty: more than `f` are.
    ConflictingCommits {
        first: DecidedProof,
        second: DecidedProof,
    },
}

impl Evidence {
    /// Checks the evidence against the committee of `epoch`; for an equivocation, returns the
    /// guilty member. Anyone holding the committee can run this (for example the MS, before
    /// evicting the member).
    pub fn verify(
        &self,
        committee: &Committee,
        epoch: Epoch,
        max_batch: usize,
    ) -> Result<Option<NodeId>, Rejected> {
        match self {
            Evidence::Equivocation { first, second } => {
                if first.signer() != second.signer()
                    || first.slot() != second.slot()
                    || first.digest() == second.digest()
                {
                    return Err(Rejected::BadCertificate("statements do not conflict"));
                }
                let a = first.verify(committee, epoch)?;
                second.verify(committee, epoch)?;
                Ok(Some(a))
            }
            Evidence::ConflictingCommits { first, second } => {
                if first.seq != second.seq {
                    return Err(Rejected::BadCertificate("different sequence numbers"));
                }
                let a = committee.check_decided(epoch, first, max_batch)?;
                let b = committee.check_decided(epoch, second, max_batch)?;
                if a == b {
                    return Err(Rejected::BadCertificate("the same batch"));
                }
                Ok(None)
            }
        }
    }
}

/// The committee of one epoch: `n = 3f+1` members in a fixed order (index = position), the
/// thresholds, and every check of a signed statement or certificate.
#[derive(Clone, Debug)]
pub struct Committee {
    keys: Vec<PublicKey>,
    ids: Vec<NodeId>,
    quorum: Quorum,
}

/// Why a committee or options were refused at construction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    #[error("a committee of {0} members is not 3f+1")]
    NotThreeFPlusOne(usize),
    #[error("the committee names a key twice")]
    DuplicateMember,
    #[error("this node is not in the committee")]
    NotInCommittee,
    #[error("invalid options: {0}")]
    Options(&'static str),
    #[error("the persisted agreement state is unreadable or of another epoch")]
    BadState,
}

impl Committee {
    pub fn new(keys: Vec<PublicKey>) -> Result<Committee, SetupError> {
        let n = keys.len();
        if n == 0 || !(n - 1).is_multiple_of(3) {
            return Err(SetupError::NotThreeFPlusOne(n));
        }
        let ids: Vec<NodeId> = keys.iter().map(|k| k.node_id()).collect();
        if ids.iter().collect::<BTreeSet<_>>().len() != n {
            return Err(SetupError::DuplicateMember);
        }
        Ok(Committee {
            keys,
            ids,
            quorum: Quorum::new((n - 1) / 3),
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn quorum(&self) -> Quorum {
        self.quorum
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    pub fn ids(&self) -> &[NodeId] {
        &self.ids
    }

    /// The index of member `id`, if it is one.
    pub fn index_of(&self, id: &NodeId) -> Option<u32> {
        self.ids.iter().position(|m| m == id).map(|i| i as u32)
    }

    /// The member at `index`, bounds-checked.
    pub fn id(&self, index: u32) -> Option<NodeId> {
        self.ids.get(index as usize).copied()
    }

    /// The index of the primary of `view`.
    pub fn primary(&self, view: View) -> u32 {
        (view % self.keys.len() as u64) as u32
    }

    /// Checks the signer index and the signature; returns the signer.
    pub fn verify<T: Statement>(&self, epoch: Epoch, s: &Signed<T>) -> Result<NodeId, Rejected> {
        let key = self
            .keys
            .get(s.signer as usize)
            .ok_or(Rejected::UnknownSigner(s.signer))?;
        key.verify(Domain::Agreement, &statement_bytes(epoch, &s.body), &s.sig)
            .map_err(|_| Rejected::BadSignature)?;
        Ok(self.ids[s.signer as usize])
    }

    /// Checks a batch: at most `max_batch` requests, each validly signed; returns its digest.
    pub fn check_batch(&self, batch: &[Request], max_batch: usize) -> Result<Digest, Rejected> {
        if batch.len() > max_batch {
            return Err(Rejected::BatchTooLarge {
                len: batch.len(),
                max: max_batch,
            });
        }
        for r in batch {
            r.verify()?;
        }
        Ok(batch_digest(batch))
    }

    /// Checks a stable-checkpoint proof: genesis, or `2f+1` distinct members signing
    /// (`seq`, `digest`) at a multiple of `interval`.
    pub fn check_stable(
        &self,
        epoch: Epoch,
        proof: &StableProof,
        interval: u64,
    ) -> Result<(), Rejected> {
        if proof.seq == 0 {
            return if proof.digest == genesis_digest() && proof.signatures.is_empty() {
                Ok(())
            } else {
                Err(Rejected::BadCertificate("malformed genesis checkpoint"))
            };
        }
        if !proof.seq.is_multiple_of(interval) {
            return Err(Rejected::BadCertificate("checkpoint off the interval"));
        }
        let mut signers = BTreeSet::new();
        for s in &proof.signatures {
            if s.body.seq != proof.seq || s.body.digest != proof.digest {
                return Err(Rejected::BadCertificate("checkpoint signatures disagree"));
            }
            if signers.insert(s.signer) {
                self.verify(epoch, s)?;
            }
        }
        if signers.len() < self.quorum.quorum() {
            return Err(Rejected::BadCertificate("too few checkpoint signatures"));
        }
        Ok(())
    }

    /// Checks a prepared certificate: a pre-prepare signed by the primary of its view and at least
    /// `prepares_needed` matching prepares of distinct other members. Returns (view, seq, digest).
    pub fn check_prepared(
        &self,
        epoch: Epoch,
        cert: &PreparedCert,
        prepares_needed: usize,
    ) -> Result<(View, SeqNo, Digest), Rejected> {
        let pp = &cert.pre_prepare;
        let PrePrepare { view, seq, digest } = pp.body;
        if pp.signer != self.primary(view) {
            return Err(Rejected::NotPrimary);
        }
        self.verify(epoch, pp)?;
        let mut signers = BTreeSet::new();
        for p in &cert.prepares {
            if p.body.view != view || p.body.seq != seq || p.body.digest != digest {
                return Err(Rejected::BadCertificate(
                    "prepare does not match the pre-prepare",
                ));
            }
            if p.signer == pp.signer {
                return Err(Rejected::PrepareFromPrimary);
            }
            if signers.insert(p.signer) {
                self.verify(epoch, p)?;
            }
        }
        if signers.len() < prepares_needed {
            return Err(Rejected::BadCertificate("too few prepares"));
        }
        Ok((view, seq, digest))
    }

    /// Checks a decided batch: its requests, and `2f+1` distinct members' commits of its digest at
    /// its view and sequence number. Returns the batch digest.
    pub fn check_decided(
        &self,
        epoch: Epoch,
        proof: &DecidedProof,
        max_batch: usize,
    ) -> Result<Digest, Rejected> {
        let digest = self.check_batch(&proof.batch, max_batch)?;
        let mut signers = BTreeSet::new();
        for c in &proof.commits {
            if c.body.view != proof.view || c.body.seq != proof.seq || c.body.digest != digest {
                return Err(Rejected::BadCertificate("commit does not match the batch"));
            }
            if signers.insert(c.signer) {
                self.verify(epoch, c)?;
            }
        }
        if signers.len() < self.quorum.quorum() {
            return Err(Rejected::BadCertificate("too few commits"));
        }
        Ok(digest)
    }

    /// Checks a view change (signature, stable checkpoint, and — when `prepares_needed` is given —
    /// every prepared certificate: above the checkpoint, within the window, of a lower view, one per
    /// sequence number). Returns the signer.
    pub fn check_view_change(
        &self,
        epoch: Epoch,
        vc: &Signed<ViewChange>,
        interval: u64,
        window: u64,
        prepares_needed: Option<usize>,
    ) -> Result<NodeId, Rejected> {
        let who = self.verify(epoch, vc)?;
        let body = &vc.body;
        self.check_stable(epoch, &body.stable, interval)?;
        if body.prepared.len() as u64 > window {
            return Err(Rejected::BadViewChange("more certificates than the window"));
        }
        let Some(needed) = prepares_needed else {
            return Ok(who);
        };
        let mut last = body.stable.seq;
        for cert in &body.prepared {
            let (view, seq, _) = self.check_prepared(epoch, cert, needed)?;
            if seq <= last {
                return Err(Rejected::BadViewChange(
                    "certificates not above the checkpoint and in increasing order",
                ));
            }
            if seq > body.stable.seq.saturating_add(window) {
                return Err(Rejected::BadViewChange("certificate beyond the window"));
            }
            if view >= body.new_view {
                return Err(Rejected::BadViewChange("certificate of a later view"));
            }
            last = seq;
        }
        Ok(who)
    }
}

/// What a new primary must re-issue, computed from a set of view changes: the highest stable
/// checkpoint among them, and for every sequence number above it up to the highest prepared one,
/// the digest of the prepared certificate of the highest view (or the null batch). Each entry also
/// names where its batch is: (index of the view change, index of the certificate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reissue {
    pub stable: StableProof,
    pub slots: Vec<ReissueSlot>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReissueSlot {
    pub seq: SeqNo,
    pub digest: Digest,
    /// `None`: the null batch.
    pub source: Option<(usize, usize)>,
}

/// Computes the O set of PBFT from checked view changes. Certificates more than `window` above the
/// chosen checkpoint are ignored (checked view changes have none).
pub fn reissue(view_changes: &[&Signed<ViewChange>], window: u64) -> Reissue {
    let stable = view_changes
        .iter()
        .map(|vc| &vc.body.stable)
        .max_by_key(|s| s.seq)
        .cloned()
        .unwrap_or_else(StableProof::genesis);
    // seq → (view, digest, source) of the best certificate so far.
    let mut best: std::collections::BTreeMap<SeqNo, (View, Digest, (usize, usize))> =
        std::collections::BTreeMap::new();
    for (i, vc) in view_changes.iter().enumerate() {
        for (j, cert) in vc.body.prepared.iter().enumerate() {
            let PrePrepare { view, seq, digest } = cert.pre_prepare.body;
            if seq <= stable.seq || seq > stable.seq.saturating_add(window) {
                continue;
            }
            let better = match best.get(&seq) {
                None => true,
                // Ties of view with different digests cannot happen with at most f faults (two
                // prepared certificates of one view intersect in a correct member); the larger
                // digest wins so the choice is deterministic anyway.
                Some(&(v, d, _)) => (view, digest) > (v, d),
            };
            if better {
                best.insert(seq, (view, digest, (i, j)));
            }
        }
    }
    let top = best.keys().next_back().copied().unwrap_or(stable.seq);
    let null = batch_digest(&[]);
    let slots = (stable.seq.saturating_add(1)..=top)
        .map(|seq| match best.get(&seq) {
            Some(&(_, digest, source)) => ReissueSlot {
                seq,
                digest,
                source: Some(source),
            },
            None => ReissueSlot {
                seq,
                digest: null,
                source: None,
            },
        })
        .collect();
    Reissue { stable, slots }
}
