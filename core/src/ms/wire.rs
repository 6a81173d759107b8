//! The Membership Service's messages between nodes (and from `dbqsfs` commands), beside the
//! agreement's own ([`super::pbft::AgreementMessage`]): submissions, probes, certificate and
//! freshness shares, configuration pushes (as deltas) and pulls, batch logs for a member catching up, status.
//!
//! Fault model: every field comes from the network; receivers check signatures and epochs before
//! use (configurations and freshness certificates are self-certifying).

use super::delta::CertifiedDelta;
use super::key::RoundDeals;
use super::membership::Pending;
use super::pbft::{Request, SeqNo, View};
use super::pieces::ConfigHead;
use crate::config::{CertifiedConfig, ConfigHash, Epoch, Freshness};
use crate::crypto::{NodeId, Signature};
use crate::wire::{Protocol, WIRE_VERSION};
use serde::{Deserialize, Serialize};

/// What a peer is to the node it sends to, by its authenticated key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A member of the node's current configuration.
    Member,
    /// A client key listed in the node's settings.
    Client,
    /// The node's own key (its `dbqsfs` commands).
    Myself,
    /// Anyone else: a node that is joining, a member that was removed, or a stranger.
    Stranger,
}

/// Whether `peer` may send `msg` (`Err`: the refusal's reason). Members and the node itself may
/// send anything but a node is asked to leave only by its own key; clients may ask for the
/// status and the configurations; anyone else may only learn the configurations and submit (what
/// a stranger's submission may ask is checked again by the committee: only a join).
pub fn permitted(msg: &MsMessage, peer: Peer) -> Result<(), &'static str> {
    match (msg, peer) {
        (MsMessage::Leave, Peer::Myself) => Ok(()),
        (MsMessage::Leave, _) => Err("only the node's own key may ask it to leave"),
        (_, Peer::Member | Peer::Myself) => Ok(()),
        (
            MsMessage::StatusRequest
            | MsMessage::ChainAfter { .. }
            | MsMessage::HeadAsk { .. }
            | MsMessage::PieceAsk { .. },
            Peer::Client,
        ) => Ok(()),
        (
            MsMessage::ChainAfter { .. }
            | MsMessage::DeltasAfter { .. }
            | MsMessage::HeadAsk { .. }
            | MsMessage::PieceAsk { .. }
            | MsMessage::Submit(_),
            _,
        ) => Ok(()),
        _ => Err("not a member of this cluster"),
    }
}

/// Messages of the MS between nodes (and from `dbqsfs` commands), beside the agreement's own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MsMessage {
    /// A signed MS operation for the committee. Any member may send one; a stranger only a join.
    Submit(Request),
    /// A prober's challenge: sign `nonce` for `epoch`.
    Challenge {
        epoch: Epoch,
        nonce: [u8; 32],
    },
    /// The answer: the member's signature over [`crate::ms::probe::probe_body`].
    ChallengeAnswer {
        sig: Signature,
    },
    /// A committee member's signature over the next configuration (of epoch `epoch`, hash `hash`).
    ConfigShare {
        epoch: Epoch,
        hash: ConfigHash,
        sig: Signature,
    },
    /// A committee member's freshness share: epoch `epoch` (hash `config`) is current at `time_ms`.
    FreshShare {
        epoch: Epoch,
        config: ConfigHash,
        time_ms: u64,
        sig: Signature,
    },
    /// Certified configurations (oldest first), and the newest freshness certificate known.
    Push {
        configs: Vec<CertifiedConfig>,
        freshness: Option<Freshness>,
    },
    /// Asks for the configurations after `epoch` (a pull).
    ChainAfter {
        epoch: Epoch,
    },
    /// The answer to [`MsMessage::ChainAfter`]: what fits in one message, and the newest epoch
    /// the answerer holds (an asker that got no configuration while a newer one exists fetches
    /// it whole, in pieces).
    Chain {
        configs: Vec<CertifiedConfig>,
        freshness: Option<Freshness>,
        newest: Epoch,
    },
    /// Asks a committee member for the batches it executed in `epoch` up to `upto` (catching up
    /// after the agreement skipped to a stable checkpoint).
    Batches {
        epoch: Epoch,
        upto: SeqNo,
    },
    /// The answer to [`MsMessage::Batches`]: batches 1..=upto.
    BatchLog {
        batches: Vec<Vec<Request>>,
    },
    /// Asks for the node's view of the MS (for `dbqsfs status`).
    StatusRequest,
    Status(Box<MsStatus>),
    /// Sent by `dbqsfs leave` with the node's own key: leave the cluster.
    Leave,
    /// The answer to [`MsMessage::Leave`]: whether the node is still a member of `epoch`.
    Leaving {
        epoch: Epoch,
        member: bool,
    },
    /// A refusal, with the reason.
    Refused {
        reason: String,
    },
    /// Certified configurations as deltas, each against the epoch before (oldest first), and the
    /// newest freshness certificate known: what pushes down the tree carry. A node that does not
    /// hold the epoch before the first pulls whole configurations instead.
    PushDeltas {
        deltas: Vec<CertifiedDelta>,
        freshness: Option<Freshness>,
    },
    /// Asks for the configurations after `epoch`, which the asker holds, as deltas (a node's
    /// periodic pull and a joining node's pull from its bootstrap peer; clients ask
    /// [`MsMessage::ChainAfter`]).
    DeltasAfter {
        epoch: Epoch,
    },
    /// The answer to [`MsMessage::DeltasAfter`] (oldest first, what fits in one message), the
    /// newest freshness certificate known, and the newest epoch the answerer holds.
    Deltas {
        deltas: Vec<CertifiedDelta>,
        freshness: Option<Freshness>,
        newest: Epoch,
    },
    /// Asks for the head of the configuration of `epoch` (to fetch it in pieces: a configuration
    /// too large for a [`MsMessage::Chain`] answer, or one a node asks for whole).
    HeadAsk {
        epoch: Epoch,
    },
    /// The answer to [`MsMessage::HeadAsk`].
    Head(Box<ConfigHead>),
    /// Asks for piece `index` of the configuration of `epoch` whose hash is `hash`.
    PieceAsk {
        epoch: Epoch,
        hash: ConfigHash,
        index: u32,
    },
    /// The answer to [`MsMessage::PieceAsk`].
    Piece {
        index: u32,
        bytes: Vec<u8>,
    },
    /// Asks for the qualified deals of the MS key's round of `epoch` (a receiver that missed it).
    KeyRoundAsk {
        epoch: Epoch,
    },
    /// The answer to [`MsMessage::KeyRoundAsk`] (`None`: not held).
    KeyRound(Option<Box<RoundDeals>>),
    /// A step of certifying the configuration of `epoch` (hash `hash`) under the MS key, in
    /// attempt `attempt` ([`super::threshold`]).
    KeySign {
        epoch: Epoch,
        hash: ConfigHash,
        attempt: u32,
        step: SignStep,
    },
    /// To a node from a committee member of `epoch`: its requests up to `seq` were executed (or
    /// are void). A node outside the committee learns so from `f_ms+1` members (at least one
    /// correct), then sends its next operation.
    Executed {
        epoch: Epoch,
        seq: u64,
    },
}

/// The steps of FROST signing between committee members ([`super::threshold`]); the FROST
/// values travel in their own serialization.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignStep {
    /// A signer's nonce commitments, to the attempt's aggregator.
    Commit(Vec<u8>),
    /// A session's signing package, from the aggregator to the signers in it.
    Package { session: u32, package: Vec<u8> },
    /// A signature share for a session, signed by its sender over the package's digest, with
    /// the sender's next commitment.
    Share {
        session: u32,
        share: Vec<u8>,
        sig: Signature,
        next: Vec<u8>,
    },
    /// The package and every signed share of an attempt that did not aggregate: evidence
    /// against the members whose shares are wrong.
    Cheaters {
        package: Vec<u8>,
        shares: Vec<(NodeId, Vec<u8>, Signature)>,
    },
    /// The aggregate signature: the certificate.
    Done(Signature),
}

impl Protocol for MsMessage {
    const ID: u8 = 0x41;
}

/// Whether `bytes` claim to be an MS message (by the envelope header; decoding decides).
pub fn is_ms(bytes: &[u8]) -> bool {
    matches!(bytes, [v, p, ..] if *v == WIRE_VERSION && *p == MsMessage::ID)
}

/// A node's view of the MS, for `dbqsfs status` (informational, unsigned).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsStatus {
    pub epoch: Epoch,
    pub config: ConfigHash,
    pub member: bool,
    pub committee: Vec<NodeId>,
    /// Whether this node runs the agreement of this epoch (a committee member not sitting out).
    pub in_agreement: bool,
    pub view: View,
    pub primary: Option<NodeId>,
    pub executed: SeqNo,
    /// This node's probes (committee members only): member, failed probes in a row, verdict.
    pub probes: Vec<(NodeId, u32, bool)>,
    /// What the next epoch changes, as this member's MS state has it.
    pub pending: Option<Pending>,
    /// Milliseconds since this node entered the epoch.
    pub epoch_age_ms: u64,
    /// Time of the newest freshness certificate this node holds.
    pub freshness_ms: Option<u64>,
    /// Whether the node asked to leave.
    pub leaving: bool,
    /// The last view change this node's agreement went through: (epoch, view entered).
    pub last_view_change: Option<(Epoch, View)>,
    /// Requests executed in this epoch (duplicates excluded), for benchmarks.
    pub requests_executed: u64,
    /// The MS key, once a configuration carries it.
    pub ms_key: Option<[u8; 32]>,
    /// The epochs whose sharing of the MS key this node holds a share of.
    pub key_shares: Vec<Epoch>,
}
