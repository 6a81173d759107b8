//! The node's state-transfer worker (docs/DESIGN.md §4 "State transfer"): one tokio task that drives the
//! core's sans-IO [`Transfer`] machines into every epoch the node installed and is not ready in.
//!
//! Goals:
//! - [`TransferWorker::epochs_installed`] is the one hook: whoever installs configurations calls it
//!   after persisting them. The worker starts a transfer into each new epoch `e` (from the group of
//!   `e-1`, `was_ready` = the replica was ready in `e-1`). When the node starts it resumes every
//!   epoch it is not ready in, skipping the units persisted as done ([`Transfer::skip`]).
//! - Requests go out over the node's QUIC endpoint (requests to itself are served locally):
//!   at most `max_requests` in flight, `max_requests_per_peer` per source, none while
//!   `max_pending_writes` fetched objects wait for the disk, optionally under a bandwidth cap. So
//!   fetched data held in memory stays bounded whatever the size of the transfer. Transfers yield
//!   to clients: while the node serves client requests ([`TransferWorker::client_request`]) the
//!   rate is capped at `rate_under_load`, and it runs uncapped when there are none. A source whose
//!   request fails in transport, or that answers nothing for 3 s while asked, gets nothing for a
//!   while (1 s, doubling to 16 s) and what waits for it is dropped, so a dead or silent source
//!   holds up nothing: the machines ask elsewhere.
//! - Durability before announcement: every object is written on the blocking pool (the store
//!   fsyncs); a unit's [`TransferOutput::UnitDone`] waits for every write issued before it, is
//!   persisted ([`DiskStore::add_transfer_done`]) and only then made readable
//!   (`Replica::arc_ready`); a complete transfer is saved ready ([`DiskStore::save_ready`]) before
//!   `Replica::transfer_complete`. A failed write abandons the run, which restarts later from what
//!   is persisted (2 s, doubling up to 60 s while failures go on; logged once). A content block
//!   that does not fit above the store's reserve does not fail the run: it is recorded as deferred
//!   (`Replica::defer`) and fetched by `deferred` once space is back, so a full node still
//!   becomes ready and lists what it holds, and no other node's transfer waits on it.
//! - Progress per epoch and unit (objects and bytes done of those known so far, rate) for
//!   `dbqsfs status` ([`TransferWorker::status`]) and the progress bar
//!   ([`TransferWorker::subscribe`]); milestones and periodic progress in the log.
//!
//! - Garbage collection ([`dbqsfs_core::dbqs::gc`]): once the node is ready in an epoch `e` (its
//!   transfer into `e` completed, or at start for every epoch it is ready in), a [`Gc`] asks the new
//!   groups of the arcs lost on entering `e` whether they hold them (at most `max_requests` such
//!   questions in flight; the machine asks again with backoff); on [`GcOutput::Delete`] the replica
//!   deletes on the blocking pool (`Replica::note_collected` under the write lock, then
//!   `Replica::delete_collected_page`, which re-checks responsibility, 32 objects at a time under
//!   the read lock, so requests are served meanwhile; it pauses between pages while clients are
//!   served) and the arc is then persisted collected ([`DiskStore::add_gc_collected`]), restored
//!   into the replica at start. A failed deletion is retried.
//! - On-demand fetch ([`TransferWorker::fetch_now`]): a read that hit an object not yet transferred
//!   has the running transfer of its epoch fetch it ahead of its unit (its requests go before the
//!   queued ones and outside the rate cap); its
//!   [`TransferOutput::UnitDone`] for [`RingArc::single`] makes it readable (`Replica::object_ready`).
//!   At most [`MAX_FETCH_REQUESTS`] requests wait for the worker; duplicates are ignored.
//!
//! Non-goals: protocol decisions (the core's).
//!
//! Fault model: sources may lie, stall, vanish or answer garbage. The core verifies every object
//! and claim; the worker bounds every request in time and the requests in number, and treats any
//! failure of a request as no answer (the core asks again, elsewhere). Nothing received panics.

mod collector;
mod deferred;
mod scheduler;
mod view;
mod worker;

pub use view::{gc_line, show_progress, status_lines};

use crate::control::{GcStatus, TransferStatus, UnitPhase, UnitStatus};
use crate::store::DiskStore;
use dbqsfs_core::config::{Configuration, Epoch};
use dbqsfs_core::crypto::{NodeId, ObjectId};
use dbqsfs_core::dbqs::gc::{lost, GcOptions};
use dbqsfs_core::dbqs::msg::{DbqsMessage, MAX_CONFIGS_PER_REPLY};
use dbqsfs_core::dbqs::replica::Replica;
use dbqsfs_core::dbqs::transfer::{
    plan, Arc as RingArc, Transfer, TransferMessage, TransferOptions as CoreOptions, TransferOutput,
};
use dbqsfs_core::object::PkBlock;
use dbqsfs_core::store::{Store, StoreError};
use dbqsfs_core::wire::{decode, encode_msg, Protocol, WIRE_VERSION};
use dbqsfs_net::{Endpoint, NetError};
use ed25519_dalek::VerifyingKey;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The replica as the node shares it (the same type as the node's).
pub type SharedReplica = Arc<RwLock<Replica<Arc<dyn Store + Send + Sync>>>>;

/// Tuning of the worker.
#[derive(Clone, Debug)]
pub struct TransferOptions {
    /// Requests in flight, over all sources.
    pub max_requests: usize,
    /// Requests in flight to one source.
    pub max_requests_per_peer: usize,
    /// Fetched objects waiting for (or in) a store write before no further request is sent.
    pub max_pending_writes: usize,
    /// Store writes running at once.
    pub max_concurrent_writes: usize,
    /// The core's retransmission interval (it backs off up to 16 times this while nothing moves).
    pub retransmit: Duration,
    /// Bound on one request, connection included.
    pub request_timeout: Duration,
    /// Cap on the bytes received per second, if any.
    pub rate_limit: Option<u64>,
    /// Cap on the bytes received per second while the node serves clients (a client request came
    /// in during the last [`CLIENTS_ACTIVE_FOR`]), if any: the transfer yields to client traffic
    /// and runs at full speed when there is none. The lower of the two caps applies.
    pub rate_under_load: Option<u64>,
    /// Delay before a run abandoned after a store failure starts again.
    pub retry_after_failure: Duration,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            max_requests: 32,
            max_requests_per_peer: 8,
            max_pending_writes: 16,
            max_concurrent_writes: 4,
            retransmit: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            rate_limit: None,
            rate_under_load: Some(DEFAULT_RATE_UNDER_LOAD),
            retry_after_failure: Duration::from_secs(2),
        }
    }
}

/// The default of [`TransferOptions::rate_under_load`], bytes/s: on the 2-core machine of
/// docs/BENCHMARKS.md ("State transfer when a node joins"), client writes that saturate it keep
/// about 90% of their throughput while a transfer runs at this rate, and a 1 GiB range still moves
/// in about 20 s.
pub const DEFAULT_RATE_UNDER_LOAD: u64 = 50_000_000;
/// How long after a client request the node counts as serving clients.
pub const CLIENTS_ACTIVE_FOR: Duration = Duration::from_secs(1);

/// Objects garbage collection deletes at a time (under the replica's read lock), and its pause
/// between such pages while the node serves clients: at most 320 deletions a second then.
const GC_PAGE: usize = 32;
const GC_PAUSE_UNDER_LOAD: Duration = Duration::from_millis(100);

/// Completed transfers kept in the status.
const KEEP_FINISHED: usize = 8;
/// Most public-key blocks written in one store transaction.
const PK_BATCH: usize = 256;
/// How often the status is republished while it changes, and progress logged.
const PUBLISH_EVERY: Duration = Duration::from_millis(200);
const LOG_EVERY: Duration = Duration::from_secs(10);
/// The longest wait before a transfer interrupted by store failures starts again.
const MAX_RETRY: Duration = Duration::from_secs(60);
/// On-demand fetch requests waiting for the worker.
pub const MAX_FETCH_REQUESTS: usize = 256;

/// Whether `bytes` claim to be a state-transfer message (by the envelope header; decoding decides).
pub fn is_transfer(bytes: &[u8]) -> bool {
    matches!(bytes, [v, p, ..] if *v == WIRE_VERSION && *p == TransferMessage::ID)
}

/// Whether `bytes` decode as a garbage-collection question ([`TransferMessage::HaveQuery`]): a node
/// that left asks it of the members that took its ranges over.
pub fn is_have_query(bytes: &[u8]) -> bool {
    matches!(
        decode::<TransferMessage>(bytes).map(|e| e.msg),
        Ok(TransferMessage::HaveQuery { .. })
    )
}

/// Serves a state-transfer request from `from` (blocking: the replica reads the store).
pub fn serve(replica: &SharedReplica, from: NodeId, request: &[u8]) -> Option<Vec<u8>> {
    replica
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .handle_transfer(from, request)
}

/// The handle of a node's transfer worker. Cheap to clone.
#[derive(Clone)]
pub struct TransferWorker {
    shared: Arc<Shared>,
}

struct Shared {
    me: NodeId,
    store: Arc<DiskStore>,
    opts: Mutex<TransferOptions>,
    events: mpsc::UnboundedSender<Event>,
    /// Taken by [`TransferWorker::start`].
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    status: watch::Sender<Vec<TransferStatus>>,
    /// On-demand fetches requested and not yet taken by the worker.
    fetches: Mutex<BTreeSet<(Epoch, ObjectId)>>,
    /// Garbage collection in this process, per epoch: (running, objects deleted).
    gc: Mutex<BTreeMap<Epoch, (bool, u64)>>,
    /// Time zero of `client_seen`.
    born: std::time::Instant,
    /// When a client request last came in: milliseconds since `born`, plus 1 (0: never).
    client_seen: AtomicU64,
}

impl std::fmt::Debug for TransferWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferWorker")
            .field("me", &self.shared.me.short())
            .finish_non_exhaustive()
    }
}

impl TransferWorker {
    /// The worker of node `me` over `store`; it runs once [`TransferWorker::start`]ed. Installs
    /// reported before that are kept and handled at start.
    pub fn new(me: NodeId, store: Arc<DiskStore>, opts: TransferOptions) -> TransferWorker {
        let (events, inbox) = mpsc::unbounded_channel();
        let (status, _) = watch::channel(Vec::new());
        TransferWorker {
            shared: Arc::new(Shared {
                me,
                store,
                opts: Mutex::new(opts),
                events,
                inbox: Mutex::new(Some(inbox)),
                status,
                fetches: Mutex::new(BTreeSet::new()),
                gc: Mutex::new(BTreeMap::new()),
                born: std::time::Instant::now(),
                client_seen: AtomicU64::new(0),
            }),
        }
    }

    /// Replaces the options (before [`TransferWorker::start`]; a running worker keeps its own).
    pub fn set_options(&self, opts: TransferOptions) {
        *self.shared.opts.lock().unwrap_or_else(|p| p.into_inner()) = opts;
    }

    /// The hook: the node installed (and persisted) the configurations of `epochs`. Starts their
    /// transfers, and those of any other installed epoch the node is not ready in. Never blocks.
    pub fn epochs_installed(&self, epochs: &[Epoch]) {
        if !epochs.is_empty() {
            let _ = self.shared.events.send(Event::Installed(epochs.to_vec()));
        }
    }

    /// The node received a request from a client: for [`CLIENTS_ACTIVE_FOR`], transfers keep to
    /// [`TransferOptions::rate_under_load`]. One atomic store; never blocks.
    pub fn client_request(&self) {
        let ms = self.shared.born.elapsed().as_millis() as u64 + 1;
        self.shared.client_seen.store(ms, Ordering::Relaxed);
    }

    /// Whether a client request came in during the last [`CLIENTS_ACTIVE_FOR`].
    fn clients_active(&self) -> bool {
        let seen = self.shared.client_seen.load(Ordering::Relaxed);
        seen != 0
            && self.shared.born.elapsed().as_millis() as u64 + 1
                < seen + CLIENTS_ACTIVE_FOR.as_millis() as u64
    }

    /// A read of `x` in `epoch` hit an object not transferred yet: has the running transfer into
    /// `epoch` fetch it ahead of its unit. Never blocks; a duplicate of a waiting request, or one
    /// beyond [`MAX_FETCH_REQUESTS`] waiting, is ignored (the client's retry asks again).
    pub fn fetch_now(&self, epoch: Epoch, x: ObjectId) {
        let mut waiting = self
            .shared
            .fetches
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if waiting.len() >= MAX_FETCH_REQUESTS || !waiting.insert((epoch, x)) {
            return;
        }
        if self
            .shared
            .events
            .send(Event::FetchNow { epoch, x })
            .is_err()
        {
            waiting.remove(&(epoch, x));
        }
    }

    /// Garbage collection of every epoch on entering which the node lost ranges: arcs lost and
    /// collected (from the replica, so across restarts), and this process's work.
    pub fn gc_status<S: Store>(&self, replica: &Replica<S>) -> Vec<GcStatus> {
        let me = self.shared.me;
        let local = self
            .shared
            .gc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let chain = replica.chain();
        (1..=replica.epoch())
            .filter_map(|e| {
                let prev = &chain.get(e - 1)?.config;
                let next = &chain.get(e)?.config;
                let arcs = lost(prev, next, &me);
                if arcs.is_empty() {
                    return None;
                }
                let collected = replica.collected_in(e);
                let (running, deleted) = local.get(&e).copied().unwrap_or((false, 0));
                Some(GcStatus {
                    epoch: e,
                    arcs_lost: arcs.len() as u64,
                    arcs_collected: arcs.iter().filter(|l| collected.contains(&l.arc)).count()
                        as u64,
                    running,
                    objects_deleted: deleted,
                })
            })
            .collect()
    }

    /// The transfers running, then the last few completed.
    pub fn status(&self) -> Vec<TransferStatus> {
        self.shared.status.borrow().clone()
    }

    /// Follows [`TransferWorker::status`] as it changes.
    pub fn subscribe(&self) -> watch::Receiver<Vec<TransferStatus>> {
        self.shared.status.subscribe()
    }

    /// Restores the readiness persisted by earlier runs into `replica`, then spawns the worker,
    /// which resumes every installed epoch the node is not ready in. Call once, before serving;
    /// a second call returns a task that does nothing.
    pub fn start(&self, endpoint: Endpoint, replica: SharedReplica) -> JoinHandle<()> {
        let inbox = self
            .shared
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(inbox) = inbox else {
            warn!("the transfer worker was started twice");
            return tokio::spawn(async {});
        };
        let store = &self.shared.store;
        let ready = store.load_ready().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the epochs this node is ready in");
            None
        });
        let mut done = store.load_transfer_done().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read persisted transfer progress; transfers start over");
            BTreeMap::new()
        });
        {
            let mut r = replica.write().unwrap_or_else(|p| p.into_inner());
            for e in ready.unwrap_or_default() {
                if e <= r.epoch() && !r.ready_at(e) {
                    r.transfer_complete(e);
                }
            }
            done.retain(|e, _| !r.ready_at(*e));
            match store.load_gc_collected() {
                Ok(collected) => {
                    for (e, arcs) in collected {
                        for arc in arcs {
                            r.note_collected(e, arc);
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the arcs garbage-collected; they are collected again")
                }
            }
        }
        worker::spawn(self.clone(), endpoint, replica, inbox, done)
    }
}

enum Event {
    Installed(Vec<Epoch>),
    /// [`TransferWorker::fetch_now`].
    FetchNow {
        epoch: Epoch,
        x: ObjectId,
    },
    /// The answer to a garbage-collection question (`None`: failed or timed out).
    GcReply {
        epoch: Epoch,
        gen: u64,
        from: NodeId,
        reply: Option<Vec<u8>>,
    },
    /// A deletion of a lost arc: the objects deleted, or why not.
    GcDeleted {
        epoch: Epoch,
        arc: RingArc,
        result: Result<usize, StoreError>,
    },
    /// The answer to a request (`None`: failed or timed out).
    Reply {
        epoch: Epoch,
        gen: u64,
        to: NodeId,
        reply: Option<Vec<u8>>,
        /// Bytes the rate limiter reserved for it.
        reserved: f64,
        /// The transport failed (no connection, or no answer in time), as opposed to an answer of
        /// nothing.
        unreachable: bool,
    },
    /// The answer to a [`TransferOutput::Check`]: the ids held, with their sizes.
    Checked {
        epoch: Epoch,
        gen: u64,
        held: Result<Vec<(ObjectId, u64)>, StoreError>,
    },
    Written {
        epoch: Epoch,
        gen: u64,
        seq: u64,
        objects: Vec<(ObjectId, u64)>,
        fetched: bool,
        /// `Some(id)`: content block `id` did not fit above the store's reserve and was recorded
        /// as deferred instead ([`Replica::defer`]).
        result: Result<Option<ObjectId>, StoreError>,
    },
    Announced {
        epoch: Epoch,
        gen: u64,
        what: TransferOutput,
        result: Result<(), StoreError>,
    },
}

/// The members' addresses and keys; a member whose address or key does not parse is left out (its
/// requests then fail like those to an unreachable node).
pub(crate) fn source_addrs(config: &Configuration) -> BTreeMap<NodeId, (SocketAddr, VerifyingKey)> {
    let mut addrs = BTreeMap::new();
    for m in &config.members {
        match (
            m.addr.parse::<SocketAddr>(),
            VerifyingKey::from_bytes(&m.key.0),
        ) {
            (Ok(addr), Ok(key)) => {
                addrs.insert(m.id, (addr, key));
            }
            _ => warn!(member = %m.id.short(), addr = %m.addr, "member address or key unusable"),
        }
    }
    addrs
}

pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}
