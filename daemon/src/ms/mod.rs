//! The Membership Service as a node runs it (docs/DESIGN.md §3): the epoch follower on every node, and the
//! committee role on the members of the current epoch's committee.
//!
//! Goals:
//! - **One machine, one order.** The task drives the core's [`MsNode`]: the node's committee role
//!   in its epoch (the PBFT agreement, the MS application, freshness and certificate shares, the
//!   epoch timer), its probes of the members it watches on the ring, its submissions (joins from
//!   `dbqsfs node --join`, leaves from `dbqsfs leave`, its probe verdicts and the committee's
//!   reports: one at a time, resent until executed or their
//!   epoch is over), and its following of the epochs (configurations pushed along a tree of the
//!   newest configuration, pulled every [`MsOptions::pull`] from a random member among the
//!   healthiest, a failed pull retried elsewhere at once, or, for a node that is joining, pulled
//!   from the peer it was told to join through). It feeds the machine messages, answers,
//!   failures ([`PULL_TIMEOUT`]) and the clock, and carries out its outputs in the order given:
//!   persist, send, request, probe, install, learn freshness, log.
//! - **Verified before used.** Every configuration is verified against the chain from the genesis
//!   configuration, persisted, and only then used ([`Epochs::install`]).
//!
//! Non-goals: protocol decisions (the core makes them), state transfer (the transfer worker reacts
//! to installed epochs on its own). What the machine asks to persist (`Output::Persist`) is
//! written to the node's store before any action after it is carried out; restarted in the same
//! epoch, the role takes the agreement up again from it ([`Resume::Saved`]), so epochs go on
//! after a restart of any number of members. A member whose state cannot be read or written
//! sits that epoch's agreement out rather than risk signing twice.
//!
//! Fault model: every message comes from the network and is checked before use; a Byzantine peer
//! can delay or refuse, never forge: configurations and freshness certificates are self-certifying,
//! probe answers are signatures over our nonce, agreement messages are checked by the core.
use crate::epochs::{Epochs, Peer};
use crate::identity::Identity;
use crate::store::DiskStore;
use dbqsfs_core::config::{Epoch, Member};
use dbqsfs_core::crypto::{Domain, NodeId, PublicKey, Signature};
use dbqsfs_core::ms::delta::deltas_after;
use dbqsfs_core::ms::membership::{AdmissionCert, Executed, MsOp};
use dbqsfs_core::ms::node::{Event, MsNode, Options as NodeOptions, Output};
use dbqsfs_core::ms::pieces::ConfigHead;
pub use dbqsfs_core::ms::probe::probe_body;
use dbqsfs_core::ms::role::{Resume, Saved};
pub use dbqsfs_core::ms::tree::push_children;
pub use dbqsfs_core::ms::wire::{is_ms, MsMessage, MsStatus};
use dbqsfs_core::wire::{decode, encode_msg};
use dbqsfs_net::Endpoint;
use ed25519_dalek::VerifyingKey;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

mod serve;
mod task;

pub use serve::serve;
use task::Task;

/// How long a pull or batch fetch may take before it counts as failed.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(3);
/// Most configurations in one push or pull answer.
const MAX_CONFIGS: usize = 64;

/// Timing of the MS role that is local to a node (the protocol's own periods are in the
/// configuration's [`dbqsfs_core::config::Params`]).
#[derive(Clone, Debug)]
pub struct MsOptions {
    /// Period of pulls from a random member.
    pub pull: Duration,
    /// Resend an unexecuted submission after this long.
    pub resubmit: Duration,
    /// Period of the role's timer checks.
    pub tick: Duration,
    /// A peer to pull configurations from before this node is a member: (address, key).
    pub bootstrap: Option<(SocketAddr, VerifyingKey)>,
    /// Join the cluster with this admission certificate (until a configuration includes us).
    pub join: Option<AdmissionCert>,
    /// Test builds only: behave as a Byzantine committee member (withhold agreement messages, send
    /// garbage ones, never propose the end of an epoch, push forged configurations and freshness
    /// certificates to every member).
    #[cfg(feature = "fault-injection")]
    pub forge: bool,
}

impl Default for MsOptions {
    fn default() -> Self {
        MsOptions {
            pull: Duration::from_secs(2),
            resubmit: Duration::from_secs(2),
            tick: Duration::from_millis(50),
            bootstrap: None,
            join: None,
            #[cfg(feature = "fault-injection")]
            forge: false,
        }
    }
}

/// Inputs of the MS task.
pub enum Inbound {
    /// An agreement message from a peer.
    Agreement { from: NodeId, bytes: Vec<u8> },
    /// An MS message that needs the task's state; `reply` takes the answer, if any.
    Message {
        from: PublicKey,
        msg: MsMessage,
        reply: oneshot::Sender<Option<MsMessage>>,
    },
    /// The answer to a pull or a batch fetch we sent.
    Answer { from: NodeId, msg: MsMessage },
    /// A pull or batch fetch we sent to `from` failed: no connection, no answer in time, or an
    /// undecodable one.
    Failed { from: NodeId },
    /// A probe answer (or its failure): (target, nonce, answer).
    ProbeResult {
        target: NodeId,
        epoch: Epoch,
        nonce: [u8; 32],
        answer: Option<Signature>,
    },
}

/// What the MS task needs of its node: its identity, its store (for the agreement's durable
/// state) and its epochs.
pub struct MsContext {
    /// Who this node is.
    pub me: Arc<Identity>,
    pub store: Arc<DiskStore>,
    pub epochs: Arc<Epochs>,
}

/// A configuration's head and the encoding its pieces are cut from.
type Whole = Arc<(ConfigHead, Vec<u8>)>;

/// How many configurations asked for whole are kept encoded: nodes catching up from different
/// epochs ask for pieces of different configurations at once, and a configuration of 100,000
/// members takes tens of milliseconds to encode and hash.
const WHOLE_CACHED: usize = 4;

/// The handle through which the node feeds the MS task.
#[derive(Clone)]
pub struct MsHandle {
    tx: mpsc::Sender<Inbound>,
    shared: Arc<MsContext>,
    /// The configurations last asked for whole, with their heads (`serve`), least recently used
    /// out first.
    whole: Arc<std::sync::Mutex<lru::LruCache<Epoch, Whole>>>,
}

impl MsHandle {
    /// Feeds an input; drops it when the task is overloaded (every input is retransmitted by
    /// its sender or recomputed by a timer).
    pub fn offer(&self, input: Inbound) {
        if self.tx.try_send(input).is_err() {
            debug!("MS task busy: dropped an input");
        }
    }

    /// Sends `msg` to the task and waits for its answer.
    pub async fn ask(&self, from: PublicKey, msg: MsMessage) -> Option<MsMessage> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Inbound::Message { from, msg, reply })
            .ok()?;
        rx.await.ok().flatten()
    }
}

/// Starts the MS task of the node; abort the returned task to stop it (the node does at shutdown).
pub fn spawn(
    shared: Arc<MsContext>,
    endpoint: Endpoint,
    opts: MsOptions,
) -> (MsHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4096);
    let handle = MsHandle {
        tx: tx.clone(),
        shared: shared.clone(),
        whole: Arc::new(std::sync::Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(WHOLE_CACHED).expect("nonzero"),
        ))),
    };
    let task = Task::new(shared, endpoint, opts, tx);
    (handle, tokio::spawn(task.run(rx)))
}
