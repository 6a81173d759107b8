//! The node's state-transfer worker (DESIGN §4 "State transfer"): one tokio task that drives the
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
//!   (`Replica::defer`) and fetched by [`crate::deferred`] once space is back, so a full node still
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

use crate::control::{GcStatus, TransferStatus, UnitPhase, UnitStatus};
use crate::store::DiskStore;
use dbqsfs_core::config::{Configuration, Epoch};
use dbqsfs_core::crypto::{NodeId, ObjectId};
use dbqsfs_core::dbqs::gc::{lost, Gc, GcOptions, GcOutput};
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
/// How long nothing is sent to a source after a transport failure: doubling from the first to the
/// second while it stays unreachable.
const MIN_DOWN: Duration = Duration::from_secs(1);
const MAX_DOWN: Duration = Duration::from_secs(16);
/// The longest wait before a transfer interrupted by store failures starts again.
const MAX_RETRY: Duration = Duration::from_secs(60);
/// A source with requests in flight that has answered none of them for this long counts as
/// unreachable (its requests still run to their timeout; nothing more waits for it).
const SILENT_AFTER: Duration = Duration::from_secs(3);
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
        let opts = self
            .shared
            .opts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let worker = Worker {
            me: self.shared.me,
            store: self.shared.store.clone(),
            replica,
            endpoint,
            events: self.shared.events.clone(),
            status: self.shared.status.clone(),
            clock: Instant::now(),
            transfers: BTreeMap::new(),
            finished: VecDeque::new(),
            restart_at: BTreeMap::new(),
            failures: 0,
            done_arcs: done,
            queues: BTreeMap::new(),
            urgent: VecDeque::new(),
            draining_urgent: false,
            inflight: 0,
            inflight_peer: BTreeMap::new(),
            last_peer: None,
            down: BTreeMap::new(),
            heard: BTreeMap::new(),
            pending_writes: 0,
            write_slots: Arc::new(Semaphore::new(opts.max_concurrent_writes.max(1))),
            opts,
            tokens: 0.0,
            tokens_at: Instant::now(),
            // Until replies are seen, assume the largest (a first burst stays within the cap).
            reply_estimate: dbqsfs_core::object::MAX_BLOCK as f64,
            pushed: BTreeMap::new(),
            next_gen: 1,
            dirty: false,
            published_at: Instant::now(),
            logged_at: Instant::now(),
            gcs: BTreeMap::new(),
            gc_done: BTreeSet::new(),
            gc_inflight: 0,
            gc_retry: Vec::new(),
            handle: self.clone(),
        };
        // Blocks a full store deferred are brought in beside the transfers, and stop with them.
        let refetch = crate::deferred::run(
            self.shared.me,
            self.shared.store.clone(),
            worker.replica.clone(),
            worker.endpoint.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                () = worker.run(inbox) => {}
                () = refetch => {}
            }
        })
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

/// One transfer in progress.
struct Running {
    /// Distinguishes this run from an abandoned one of the same epoch (whose events are ignored).
    gen: u64,
    t: Transfer,
    /// The sources' addresses (members of the previous configuration).
    addrs: BTreeMap<NodeId, (SocketAddr, VerifyingKey)>,
    units: Vec<UnitStats>,
    started: Instant,
    /// A [`TransferOutput::Check`] is being answered: nothing else is fed to the machine.
    checking: bool,
    /// Replies that arrived meanwhile.
    backlog: VecDeque<(NodeId, Vec<u8>)>,
    /// Store writes: the next sequence number and those not finished.
    next_seq: u64,
    writes: BTreeSet<u64>,
    /// Announcements waiting for every write numbered below theirs.
    announce: VecDeque<(u64, TransferOutput)>,
    announcing: bool,
    /// Requests of this transfer waiting in the send queues.
    queued: usize,
    /// On-demand fetches asked during a check, applied after it.
    fetch_backlog: Vec<ObjectId>,
    /// Content blocks deferred for lack of space in this run.
    deferred: u64,
}

/// One garbage collection in progress.
struct GcRun {
    gen: u64,
    g: Gc,
    /// The new groups' addresses (members of the epoch and of the later ones it learned).
    addrs: BTreeMap<NodeId, (SocketAddr, VerifyingKey)>,
    /// Deletions issued and not yet carried out (retried on failure).
    deleting: usize,
    deleted: u64,
    started: Instant,
}

struct UnitStats {
    arc: RingArc,
    phase: UnitPhase,
    objects_total: u64,
    objects_done: u64,
    bytes_done: u64,
    fetched_objects: u64,
    fetched_bytes: u64,
    first_fetch: Option<Instant>,
    last_fetch: Option<Instant>,
}

impl UnitStats {
    fn status(&self) -> UnitStatus {
        let end = match self.phase {
            UnitPhase::Fetching => Some(Instant::now()),
            _ => self.last_fetch,
        };
        let rate = match (self.first_fetch, end) {
            (Some(a), Some(b)) if b > a => {
                (self.fetched_bytes as f64 / (b - a).as_secs_f64()) as u64
            }
            _ => 0,
        };
        UnitStatus {
            arc: self.arc,
            phase: self.phase,
            objects_done: self.objects_done,
            objects_total: self.objects_total,
            bytes_done: self.bytes_done,
            fetched_objects: self.fetched_objects,
            fetched_bytes: self.fetched_bytes,
            rate,
        }
    }
}

impl Running {
    fn unit_of(&mut self, id: &ObjectId) -> Option<&mut UnitStats> {
        self.units.iter_mut().find(|u| u.arc.contains(id))
    }

    fn status(&self, epoch: Epoch, complete: bool) -> TransferStatus {
        TransferStatus {
            epoch,
            complete,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            units: self.units.iter().map(UnitStats::status).collect(),
            rate_cap: None,
            yielding: false,
        }
    }
}

/// A store write.
enum Write {
    Content { id: ObjectId, data: Vec<u8> },
    Pk(Vec<PkBlock>),
}

struct Worker {
    me: NodeId,
    store: Arc<DiskStore>,
    replica: SharedReplica,
    endpoint: Endpoint,
    opts: TransferOptions,
    events: mpsc::UnboundedSender<Event>,
    status: watch::Sender<Vec<TransferStatus>>,
    /// Time zero of the core machines' clock.
    clock: Instant,
    transfers: BTreeMap<Epoch, Running>,
    finished: VecDeque<TransferStatus>,
    /// Abandoned runs start again at these times.
    restart_at: BTreeMap<Epoch, Instant>,
    /// Store failures since a transfer last completed (for the backoff of [`Worker::abandon`]).
    failures: u32,
    /// Arcs persisted as done, per epoch not complete.
    done_arcs: BTreeMap<Epoch, Vec<RingArc>>,
    /// Requests waiting to be sent, per destination: (epoch, run, bytes).
    queues: BTreeMap<NodeId, VecDeque<(Epoch, u64, Vec<u8>)>>,
    /// Requests of on-demand fetches (a read waits for them): sent before the queues, whatever
    /// the rate cap and the pending writes. At most [`MAX_FETCH_REQUESTS`] objects ask at once.
    urgent: VecDeque<(NodeId, Epoch, u64, Vec<u8>)>,
    /// Set while the outputs of an on-demand fetch are drained: their requests are urgent.
    draining_urgent: bool,
    /// Requests sent and not yet consumed (a reply held back counts until it is fed).
    inflight: usize,
    inflight_peer: BTreeMap<NodeId, usize>,
    last_peer: Option<NodeId>,
    /// Sources whose last request failed in transport: until when nothing is sent to them, and
    /// the backoff that set it.
    down: BTreeMap<NodeId, (Instant, Duration)>,
    /// When each source last answered (or, if it had nothing in flight, was sent a request).
    heard: BTreeMap<NodeId, Instant>,
    /// Writes issued and not finished, over all transfers.
    pending_writes: usize,
    write_slots: Arc<Semaphore>,
    /// Rate limit: a token bucket of bytes, and the expected size of a reply. Not `governor`:
    /// a reply's size is known only when it arrives, so a request reserves the estimate and the
    /// difference is settled later (the balance may go negative), and the rate switches with
    /// client load (`cap`) without losing the balance; governor's GCRA takes a known cost up
    /// front and a fixed quota.
    tokens: f64,
    tokens_at: Instant,
    reply_estimate: f64,
    /// When configurations were last pushed to a source that was behind.
    pushed: BTreeMap<NodeId, Instant>,
    next_gen: u64,
    dirty: bool,
    published_at: Instant,
    logged_at: Instant,
    /// Garbage collections running, and the epochs collected (or with nothing lost) in this process.
    gcs: BTreeMap<Epoch, GcRun>,
    gc_done: BTreeSet<Epoch>,
    /// Garbage-collection questions in flight (at most `max_requests`).
    gc_inflight: usize,
    /// Deletions that failed, to try again at these times.
    gc_retry: Vec<(Instant, Epoch, RingArc)>,
    handle: TransferWorker,
}

impl Worker {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn lock_replica(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, Replica<Arc<dyn Store + Send + Sync>>> {
        self.replica.read().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Event>) {
        self.start_missing();
        loop {
            self.fire_timers();
            self.pump();
            self.publish(false);
            let deadline = self.next_deadline();
            tokio::select! {
                ev = inbox.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Starts a transfer into every installed epoch that is neither ready, running nor waiting to
    /// restart.
    fn start_missing(&mut self) {
        let missing: Vec<Epoch> = {
            let r = self.lock_replica();
            (1..=r.epoch())
                .filter(|e| !r.ready_at(*e))
                .filter(|e| !self.transfers.contains_key(e) && !self.restart_at.contains_key(e))
                .collect()
        };
        for e in missing {
            self.start_transfer(e);
        }
        let ready: Vec<Epoch> = {
            let r = self.lock_replica();
            (1..=r.epoch()).filter(|e| r.ready_at(*e)).collect()
        };
        for e in ready {
            self.start_gc(e);
        }
        self.gc_learn();
    }

    /// Hands every running collection the configurations installed after its epoch, so that a
    /// later group can confirm what the first never will ([`Gc::learn`]), and asks them.
    fn gc_learn(&mut self) {
        let running: Vec<Epoch> = self.gcs.keys().copied().collect();
        for e in running {
            let later: Vec<Configuration> = {
                let r = self.lock_replica();
                let learned = self.gcs.get(&e).map_or(e, |run| run.g.learned());
                (learned + 1..=r.epoch())
                    .filter_map(|x| r.chain().get(x).map(|c| c.config.clone()))
                    .collect()
            };
            if later.is_empty() {
                continue;
            }
            if let Some(run) = self.gcs.get_mut(&e) {
                for config in &later {
                    run.g.learn(config);
                    run.addrs.extend(source_addrs(config));
                }
            }
            self.drain_gc(e);
        }
    }

    fn start_transfer(&mut self, e: Epoch) {
        let (prev, next, was_ready) = {
            let r = self.lock_replica();
            if r.ready_at(e) || self.transfers.contains_key(&e) {
                return;
            }
            let get = |x: Epoch| r.chain().get(x).map(|c| c.config.clone());
            (
                get(e.wrapping_sub(1)),
                get(e),
                r.ready_at(e.wrapping_sub(1)),
            )
        };
        let (Some(prev), Some(next)) = (prev, next) else {
            warn!(
                epoch = e,
                "cannot transfer into an epoch whose configurations are not both known"
            );
            return;
        };
        // The struct update is needed when core's `mutants` feature adds a field (workspace builds).
        #[allow(clippy::needless_update)]
        let core_opts = CoreOptions {
            retransmit_ms: self.opts.retransmit.as_millis().max(1) as u64,
            // Random, so late replies to an earlier run can never match a request of this one.
            first_request_id: random_u64(),
            ..CoreOptions::default()
        };
        let mut t = Transfer::new(&prev, &next, &self.me, was_ready, core_opts);
        let done = self.done_arcs.get(&e).cloned().unwrap_or_default();
        let mut resumed = 0;
        for arc in &done {
            resumed += t.skip(arc);
        }
        let units: Vec<UnitStats> = plan(&prev, &next, &self.me, was_ready)
            .into_iter()
            .map(|u| UnitStats {
                phase: if done.iter().any(|d| d.covers(&u.arc)) {
                    UnitPhase::Resumed
                } else {
                    UnitPhase::Listing
                },
                arc: u.arc,
                objects_total: 0,
                objects_done: 0,
                bytes_done: 0,
                fetched_objects: 0,
                fetched_bytes: 0,
                first_fetch: None,
                last_fetch: None,
            })
            .collect();
        let addrs = source_addrs(&prev);
        let gen = self.next_gen;
        self.next_gen += 1;
        info!(
            epoch = e,
            units = units.len(),
            resumed,
            was_ready,
            "state transfer started"
        );
        t.start(self.now_ms());
        self.transfers.insert(
            e,
            Running {
                gen,
                t,
                addrs,
                units,
                started: Instant::now(),
                checking: false,
                backlog: VecDeque::new(),
                next_seq: 0,
                writes: BTreeSet::new(),
                announce: VecDeque::new(),
                announcing: false,
                queued: 0,
                fetch_backlog: Vec::new(),
                deferred: 0,
            },
        );
        self.dirty = true;
        self.drain(e);
    }

    /// Abandons the run of `e` (a store failure); it starts again from what is persisted.
    /// Store failures in a row back off (doubling up to [`MAX_RETRY`]) and are logged as warnings
    /// once, then at debug level, until a transfer completes.
    fn abandon(&mut self, e: Epoch, why: &str) {
        if self.remove(e).is_some() {
            let n = self.failures;
            self.failures += 1;
            let retry_in = (self.opts.retry_after_failure * 2u32.pow(n.min(8))).min(MAX_RETRY);
            if n == 0 {
                warn!(
                    epoch = e,
                    why,
                    ?retry_in,
                    "state transfer interrupted; retrying with backoff"
                );
            } else {
                debug!(
                    epoch = e,
                    why,
                    ?retry_in,
                    failures = n + 1,
                    "state transfer interrupted again"
                );
            }
            self.restart_at.insert(e, Instant::now() + retry_in);
            self.dirty = true;
        }
    }

    /// Removes the run of `e`; the replies it held back no longer count as in flight.
    fn remove(&mut self, e: Epoch) -> Option<Running> {
        let r = self.transfers.remove(&e)?;
        self.inflight = self.inflight.saturating_sub(r.backlog.len());
        Some(r)
    }

    fn live(&self, e: Epoch, gen: u64) -> bool {
        self.transfers.get(&e).is_some_and(|r| r.gen == gen)
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Installed(epochs) => {
                debug!(?epochs, "configurations installed");
                self.start_missing();
            }
            Event::FetchNow { epoch, x } => {
                self.handle
                    .shared
                    .fetches
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(epoch, x));
                self.fetch_now(epoch, x);
            }
            Event::GcReply {
                epoch,
                gen,
                from,
                reply,
            } => {
                self.gc_inflight = self.gc_inflight.saturating_sub(1);
                let now = self.now_ms();
                if let (Some(bytes), Some(run)) =
                    (reply, self.gcs.get_mut(&epoch).filter(|run| run.gen == gen))
                {
                    run.g.handle_message(now, from, &bytes);
                    self.drain_gc(epoch);
                }
            }
            Event::GcDeleted { epoch, arc, result } => match result {
                Ok(n) => {
                    if let Some(run) = self.gcs.get_mut(&epoch) {
                        run.deleting = run.deleting.saturating_sub(1);
                        run.deleted += n as u64;
                    }
                    self.gc_publish(epoch, n as u64);
                    info!(epoch, objects = n, arc = %arc_name(&arc), "lost range collected");
                    self.gc_finish(epoch);
                }
                Err(e) => {
                    warn!(epoch, arc = %arc_name(&arc), error = %e, "deleting a lost range failed; trying again");
                    self.gc_retry.push((
                        Instant::now() + self.opts.retry_after_failure,
                        epoch,
                        arc,
                    ));
                }
            },
            Event::Reply {
                epoch,
                gen,
                to,
                reply,
                reserved,
                unreachable,
            } => {
                if let Some(n) = self.inflight_peer.get_mut(&to) {
                    *n = n.saturating_sub(1);
                }
                if !unreachable {
                    self.heard.insert(to, Instant::now());
                }
                if unreachable {
                    self.mark_down(to);
                } else if reply.is_some() {
                    self.down.remove(&to);
                }
                let got = reply.as_ref().map_or(0, Vec::len) as f64;
                self.tokens += reserved - got;
                if got > 0.0 {
                    self.reply_estimate = 0.9 * self.reply_estimate + 0.1 * got;
                }
                let Some(bytes) = reply else {
                    self.inflight = self.inflight.saturating_sub(1);
                    return;
                };
                self.maybe_push_configs(epoch, to, &bytes);
                if !self.live(epoch, gen) {
                    self.inflight = self.inflight.saturating_sub(1);
                    return;
                }
                let now = self.now_ms();
                let Some(r) = self.transfers.get_mut(&epoch) else {
                    return;
                };
                if r.checking {
                    r.backlog.push_back((to, bytes));
                    return;
                }
                self.inflight = self.inflight.saturating_sub(1);
                r.t.handle_message(now, to, &bytes);
                self.drain(epoch);
            }
            Event::Checked { epoch, gen, held } => {
                if !self.live(epoch, gen) {
                    return;
                }
                let held = match held {
                    Ok(h) => h,
                    Err(e) => return self.abandon(epoch, &format!("checking held blocks: {e}")),
                };
                if let Some(r) = self.transfers.get_mut(&epoch) {
                    for (id, len) in &held {
                        if let Some(u) = r.unit_of(id) {
                            u.objects_done += 1;
                            u.bytes_done += len;
                        }
                    }
                    let ids: Vec<ObjectId> = held.iter().map(|(id, _)| *id).collect();
                    r.t.held(&ids);
                    r.checking = false;
                    self.dirty = true;
                }
                self.drain(epoch);
                self.feed_backlog(epoch);
                let waiting = self
                    .transfers
                    .get_mut(&epoch)
                    .map(|r| std::mem::take(&mut r.fetch_backlog))
                    .unwrap_or_default();
                for x in waiting {
                    self.fetch_now(epoch, x);
                }
            }
            Event::Written {
                epoch,
                gen,
                seq,
                objects,
                fetched,
                result,
            } => {
                self.pending_writes = self.pending_writes.saturating_sub(1);
                if !self.live(epoch, gen) {
                    return;
                }
                let deferred = match result {
                    Ok(d) => d,
                    Err(e) => {
                        return self.abandon(epoch, &format!("storing a transferred object: {e}"))
                    }
                };
                if let Some(x) = deferred {
                    self.replica
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .defer(x);
                }
                if let Some(r) = self.transfers.get_mut(&epoch) {
                    if deferred.is_some() {
                        if r.deferred == 0 {
                            warn!(
                                epoch,
                                "store full: the transfer goes on without the content blocks that \
                                 do not fit; they are fetched once space is freed"
                            );
                        }
                        r.deferred += 1;
                    }
                    r.writes.remove(&seq);
                    let now = Instant::now();
                    for (id, len) in &objects {
                        if let Some(u) = r.unit_of(id) {
                            u.objects_done += 1;
                            u.bytes_done += len;
                            if fetched {
                                u.fetched_objects += 1;
                                u.fetched_bytes += len;
                                u.first_fetch.get_or_insert(now);
                                u.last_fetch = Some(now);
                            }
                        }
                    }
                    self.dirty = true;
                }
                self.try_announce(epoch);
            }
            Event::Announced {
                epoch,
                gen,
                what,
                result,
            } => {
                if !self.live(epoch, gen) {
                    return;
                }
                if let Err(e) = result {
                    return self.abandon(epoch, &format!("persisting progress: {e}"));
                }
                match what {
                    TransferOutput::UnitDone { arc, .. } => {
                        if !is_single(&arc) {
                            self.done_arcs.entry(epoch).or_default().push(arc);
                        }
                        if let Some(r) = self.transfers.get_mut(&epoch) {
                            r.announcing = false;
                            if let Some(u) = r.units.iter_mut().find(|u| u.arc == arc) {
                                if u.phase != UnitPhase::Resumed {
                                    u.phase = UnitPhase::Done;
                                }
                                // What was not stored was dropped: 2f+1 old replicas deny it.
                                u.objects_total = u.objects_done;
                                debug!(
                                    epoch,
                                    objects = u.objects_done,
                                    bytes = u.bytes_done,
                                    "transfer unit done"
                                );
                            }
                        }
                        self.dirty = true;
                        self.publish(true);
                        self.try_announce(epoch);
                    }
                    TransferOutput::Complete { .. } => self.complete(epoch),
                    TransferOutput::StoreRefs { .. } => {
                        if let Some(r) = self.transfers.get_mut(&epoch) {
                            r.announcing = false;
                        }
                        self.try_announce(epoch);
                    }
                    _ => {}
                }
            }
        }
    }

    fn complete(&mut self, epoch: Epoch) {
        let Some(r) = self.remove(epoch) else {
            return;
        };
        if self.failures > 1 {
            info!(epoch, "state transfer stores again after failures");
        }
        self.failures = 0;
        self.done_arcs.remove(&epoch);
        let status = r.status(epoch, true);
        let (objects, _, bytes, fetched) = status.totals();
        let secs = r.started.elapsed().as_secs_f64();
        info!(
            epoch,
            objects,
            bytes,
            fetched_bytes = fetched,
            secs = format!("{secs:.2}"),
            mb_per_s = format!("{:.1}", fetched as f64 / 1e6 / secs.max(1e-3)),
            "state transfer complete: ready in this epoch"
        );
        self.finished.retain(|s| s.epoch != epoch);
        self.finished.push_back(status);
        while self.finished.len() > KEEP_FINISHED {
            self.finished.pop_front();
        }
        self.dirty = true;
        self.publish(true);
        // Then collect what the node lost on entering this epoch.
        self.start_gc(epoch);
    }

    /// Has the running transfer into `epoch` fetch `x` ahead of its unit (after a check in
    /// progress).
    fn fetch_now(&mut self, epoch: Epoch, x: ObjectId) {
        let now = self.now_ms();
        let Some(r) = self.transfers.get_mut(&epoch) else {
            return;
        };
        if r.checking {
            if r.fetch_backlog.len() < MAX_FETCH_REQUESTS && !r.fetch_backlog.contains(&x) {
                r.fetch_backlog.push(x);
            }
            return;
        }
        if r.t.fetch_now(now, x) {
            debug!(epoch, object = %x.short(), "fetching an object on demand");
            self.draining_urgent = true;
            self.drain(epoch);
            self.draining_urgent = false;
        }
    }

    /// Starts the garbage collection of what the node lost on entering `e` (it is ready in `e`),
    /// unless it runs or is done; arcs collected already (before a restart) are skipped.
    fn start_gc(&mut self, e: Epoch) {
        if e == 0 || self.gcs.contains_key(&e) || self.gc_done.contains(&e) {
            return;
        }
        let (prev, next, collected) = {
            let r = self.lock_replica();
            if !r.ready_at(e) {
                return;
            }
            let get = |x: Epoch| r.chain().get(x).map(|c| c.config.clone());
            (get(e - 1), get(e), r.collected_in(e).to_vec())
        };
        let (Some(prev), Some(next)) = (prev, next) else {
            return;
        };
        #[allow(clippy::needless_update)]
        let opts = GcOptions {
            retransmit_ms: self.opts.retransmit.as_millis().max(1) as u64,
            first_request_id: random_u64(),
            ..GcOptions::default()
        };
        let mut g = Gc::new(&prev, &next, &self.me, &collected, opts);
        let (_, units) = g.progress();
        if units == 0 {
            self.gc_done.insert(e);
            return;
        }
        info!(
            epoch = e,
            arcs = units,
            "garbage collection of lost ranges started"
        );
        let gen = self.next_gen;
        self.next_gen += 1;
        g.start(self.now_ms());
        self.gcs.insert(
            e,
            GcRun {
                gen,
                g,
                addrs: source_addrs(&next),
                deleting: 0,
                deleted: 0,
                started: Instant::now(),
            },
        );
        self.gc_publish(e, 0);
        self.drain_gc(e);
    }

    /// Carries out what collection `e` asks: questions (dropped beyond the bound: the machine asks
    /// again), deletions on the blocking pool.
    fn drain_gc(&mut self, e: Epoch) {
        let mut outs = Vec::new();
        let gen = match self.gcs.get_mut(&e) {
            Some(run) => {
                while let Some(out) = run.g.poll_output() {
                    outs.push(out);
                }
                run.gen
            }
            None => return,
        };
        for out in outs {
            match out {
                GcOutput::Send { to, bytes } => {
                    if self.gc_inflight >= self.opts.max_requests.max(1) {
                        continue;
                    }
                    self.send_gc(e, gen, to, bytes);
                }
                GcOutput::Delete { epoch, arc } => {
                    if let Some(run) = self.gcs.get_mut(&e) {
                        run.deleting += 1;
                    }
                    self.delete_lost(epoch, arc);
                }
                GcOutput::Complete { .. } => {}
            }
        }
        self.gc_finish(e);
    }

    /// Ends collection `e` once its machine is complete and every deletion is carried out.
    fn gc_finish(&mut self, e: Epoch) {
        let Some(run) = self.gcs.get(&e) else { return };
        if !run.g.is_complete() || run.deleting > 0 {
            return;
        }
        if let Some(run) = self.gcs.remove(&e) {
            info!(
                epoch = e,
                objects_deleted = run.deleted,
                secs = format!("{:.2}", run.started.elapsed().as_secs_f64()),
                "garbage collection complete"
            );
        }
        self.gc_done.insert(e);
        if let Some(s) = self
            .handle
            .shared
            .gc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&e)
        {
            s.0 = false;
        }
    }

    /// Counts `deleted` objects for collection `e` in the status (and marks it running).
    fn gc_publish(&self, e: Epoch, deleted: u64) {
        let mut gc = self
            .handle
            .shared
            .gc
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let s = gc.entry(e).or_insert((true, 0));
        s.1 += deleted;
    }

    /// Deletes `arc`, lost on entering `epoch`, through the replica (which re-checks every object),
    /// then persists it collected; on the blocking pool.
    fn delete_lost(&self, epoch: Epoch, arc: RingArc) {
        let store = self.store.clone();
        let replica = self.replica.clone();
        let events = self.events.clone();
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || {
                // Recorded under the write lock (from then on the range is answered `Gone` and no
                // late transfer stores into it), deleted under the read lock, a page at a time:
                // requests are served while the files go, an install waits for one page at most,
                // and while clients are served the deletion pauses between pages.
                replica
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .note_collected(epoch, arc);
                let (mut deleted, mut after) = (0, None);
                loop {
                    let (page, next) = replica
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .delete_collected_page(epoch, arc, after, GC_PAGE)?;
                    deleted += page.len();
                    match next {
                        Some(n) => after = Some(n),
                        None => break,
                    }
                    if handle.clients_active() {
                        std::thread::sleep(GC_PAUSE_UNDER_LOAD);
                    }
                }
                store.add_gc_collected(epoch, arc)?;
                Ok(deleted)
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(format!("delete task: {e}"))));
            let _ = events.send(Event::GcDeleted { epoch, arc, result });
        });
    }

    fn send_gc(&mut self, epoch: Epoch, gen: u64, to: NodeId, bytes: Vec<u8>) {
        self.gc_inflight += 1;
        let events = self.events.clone();
        let reply = move |reply| Event::GcReply {
            epoch,
            gen,
            from: to,
            reply,
        };
        if to == self.me {
            let replica = self.replica.clone();
            let me = self.me;
            tokio::spawn(async move {
                let r = tokio::task::spawn_blocking(move || serve(&replica, me, &bytes))
                    .await
                    .ok()
                    .flatten();
                let _ = events.send(reply(r));
            });
            return;
        }
        let Some((addr, key)) = self.gcs.get(&epoch).and_then(|r| r.addrs.get(&to).copied()) else {
            let _ = events.send(reply(None));
            return;
        };
        let endpoint = self.endpoint.clone();
        let timeout = self.opts.request_timeout;
        tokio::spawn(async move {
            let r = match tokio::time::timeout(timeout, endpoint.request(addr, &key, &bytes)).await
            {
                Ok(Ok(r)) => Some(r),
                _ => None,
            };
            let _ = events.send(reply(r));
        });
    }

    /// Feeds the replies held back during a check, until the next check.
    fn feed_backlog(&mut self, e: Epoch) {
        loop {
            let now = self.now_ms();
            let Some(r) = self.transfers.get_mut(&e) else {
                return;
            };
            if r.checking {
                return;
            }
            let Some((from, bytes)) = r.backlog.pop_front() else {
                return;
            };
            self.inflight = self.inflight.saturating_sub(1);
            r.t.handle_message(now, from, &bytes);
            self.drain(e);
        }
    }

    /// Carries out what transfer `e` asks, in order, up to a check.
    fn drain(&mut self, e: Epoch) {
        let Some(r) = self.transfers.get_mut(&e) else {
            return;
        };
        let gen = r.gen;
        let mut outs = Vec::new();
        while !r.checking {
            let Some(out) = r.t.poll_output() else { break };
            if matches!(out, TransferOutput::Check { .. }) {
                r.checking = true;
            }
            outs.push(out);
        }
        let mut pk: Vec<PkBlock> = Vec::new();
        for out in outs {
            if !matches!(out, TransferOutput::StorePk { .. }) && !pk.is_empty() {
                self.write(e, gen, Write::Pk(std::mem::take(&mut pk)));
            }
            match out {
                TransferOutput::Send { to, bytes } => {
                    if self.is_down(&to) {
                        continue; // the machine asks again, elsewhere, at its next timeout
                    }
                    if self.draining_urgent {
                        self.urgent.push_back((to, e, gen, bytes));
                        continue;
                    }
                    if let Some(r) = self.transfers.get_mut(&e) {
                        r.queued += 1;
                    }
                    self.queues
                        .entry(to)
                        .or_default()
                        .push_back((e, gen, bytes));
                }
                TransferOutput::Check { ids, released } => self.check(e, gen, ids, released),
                TransferOutput::StoreContent { id, data } => {
                    self.write(e, gen, Write::Content { id, data })
                }
                TransferOutput::StorePk { block } => {
                    if let Some(u) = self
                        .transfers
                        .get_mut(&e)
                        .and_then(|r| r.unit_of(&block.id()))
                    {
                        u.objects_total += 1;
                    }
                    pk.push(block);
                    if pk.len() >= PK_BATCH {
                        self.write(e, gen, Write::Pk(std::mem::take(&mut pk)));
                    }
                }
                // Reference records go in order with the announcements: after every content
                // block of their unit is stored (so a released block is scheduled for deletion
                // once it is there), before the unit is done.
                out @ (TransferOutput::StoreRefs { .. }
                | TransferOutput::UnitDone { .. }
                | TransferOutput::Complete { .. }) => {
                    if let Some(r) = self.transfers.get_mut(&e) {
                        r.announce.push_back((r.next_seq, out));
                    }
                }
            }
        }
        if !pk.is_empty() {
            self.write(e, gen, Write::Pk(pk));
        }
        self.dirty = true;
        self.try_announce(e);
    }

    /// Answers a check from the store, on the blocking pool, by the block files' sizes
    /// ([`DiskStore::content_len`]): held blocks are not read. A node that stays responsible for a
    /// range holds most of it; reading and hashing all of it at every epoch change was about
    /// 1.4 GB per node in the transfer benchmark.
    fn check(&mut self, e: Epoch, gen: u64, ids: Vec<ObjectId>, released: BTreeSet<ObjectId>) {
        if let Some(r) = self.transfers.get_mut(&e) {
            if let Some(u) = ids.first().and_then(|id| r.unit_of(id)) {
                if u.phase == UnitPhase::Listing {
                    u.phase = UnitPhase::Fetching;
                }
            }
            for id in &ids {
                if let Some(u) = r.unit_of(id) {
                    u.objects_total += 1;
                }
            }
        }
        let store = self.store.clone();
        let replica = self.replica.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let held = tokio::task::spawn_blocking(move || {
                let mut held = Vec::new();
                for id in ids {
                    if let Some(len) = store.content_len(&id)? {
                        held.push((id, len));
                    } else if replica
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .transfer_skips(&id, released.contains(&id))?
                    {
                        // Deferred for lack of space (fetched by `deferred::refetch` once there
                        // is room), or deleted after its release: not fetched again.
                        held.push((id, 0));
                    }
                }
                Ok(held)
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(format!("check task: {e}"))));
            let _ = events.send(Event::Checked {
                epoch: e,
                gen,
                held,
            });
        });
    }

    /// Writes on the blocking pool, at most `max_concurrent_writes` at once.
    fn write(&mut self, e: Epoch, gen: u64, w: Write) {
        let Some(r) = self.transfers.get_mut(&e) else {
            return;
        };
        let seq = r.next_seq;
        r.next_seq += 1;
        r.writes.insert(seq);
        self.pending_writes += 1;
        let (objects, fetched) = match &w {
            Write::Content { id, data } => (vec![(*id, data.len() as u64)], true),
            Write::Pk(blocks) => (
                blocks
                    .iter()
                    .map(|b| (b.id(), (b.value.len() + b.label.len()) as u64))
                    .collect(),
                false,
            ),
        };
        let store = self.store.clone();
        let replica = self.replica.clone();
        let slots = self.write_slots.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            // The semaphore is never closed; without a permit the write still runs.
            let _permit = slots.acquire_owned().await.ok();
            let result = tokio::task::spawn_blocking(move || {
                // Under the replica's read lock, so no collection runs between the check and the
                // write: what a late transfer brings of a range collected since is not stored again.
                let r = replica.read().unwrap_or_else(|p| p.into_inner());
                match w {
                    Write::Content { id, data } => {
                        if !r.accepts_transferred(e, &id) {
                            return Ok(None);
                        }
                        match store.put_content(&id, &data) {
                            // A full store goes on without the block, and says so durably.
                            Err(StoreError::NoSpace) => {
                                store.add_deferred(&[id]).map(|()| Some(id))
                            }
                            other => other.map(|()| None),
                        }
                    }
                    Write::Pk(mut blocks) => {
                        blocks.retain(|b| r.accepts_transferred(e, &b.id()));
                        if blocks.is_empty() {
                            Ok(None)
                        } else {
                            store.put_pk_many(&blocks).map(|()| None)
                        }
                    }
                }
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(format!("write task: {e}"))));
            let _ = events.send(Event::Written {
                epoch: e,
                gen,
                seq,
                objects,
                fetched,
                result,
            });
        });
    }

    /// Persists and applies the next announcement of `e` once every write before it is durable.
    fn try_announce(&mut self, e: Epoch) {
        let Some(r) = self.transfers.get_mut(&e) else {
            return;
        };
        if r.announcing {
            return;
        }
        let Some((barrier, _)) = r.announce.front() else {
            return;
        };
        if r.writes.first().is_some_and(|first| first < barrier) {
            return;
        }
        let Some((_, what)) = r.announce.pop_front() else {
            return;
        };
        r.announcing = true;
        let gen = r.gen;
        let store = self.store.clone();
        let replica = self.replica.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let w = what.clone();
            let result = tokio::task::spawn_blocking(move || announce(&store, &replica, e, &w))
                .await
                .unwrap_or_else(|e| Err(StoreError::Io(format!("announce task: {e}"))));
            let _ = events.send(Event::Announced {
                epoch: e,
                gen,
                what,
                result,
            });
        });
    }

    /// Feeds due timers: the machines' retransmissions (only when none of their requests still
    /// waits to be sent, so a slow queue never snowballs), and abandoned runs' restarts.
    fn fire_timers(&mut self) {
        let now = Instant::now();
        let silent: Vec<NodeId> = self
            .silent_since()
            .filter(|(n, since)| now >= *since + SILENT_AFTER && !self.is_down(n))
            .map(|(n, _)| n)
            .collect();
        for n in silent {
            debug!(source = %n.short(), "source silent: treated as unreachable");
            self.mark_down(n);
        }
        let due: Vec<Epoch> = self
            .restart_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(e, _)| *e)
            .collect();
        for e in due {
            self.restart_at.remove(&e);
            self.start_transfer(e);
        }
        let now_ms = self.now_ms();
        let due: Vec<Epoch> = self
            .transfers
            .iter()
            .filter(|(_, r)| !r.checking && r.queued == 0)
            .filter(|(_, r)| r.t.next_timeout().is_some_and(|at| at <= now_ms))
            .map(|(e, _)| *e)
            .collect();
        for e in due {
            if let Some(r) = self.transfers.get_mut(&e) {
                r.t.handle_timeout(now_ms);
            }
            self.drain(e);
        }
        let due: Vec<Epoch> = self
            .gcs
            .iter()
            .filter(|(_, run)| run.g.next_timeout().is_some_and(|at| at <= now_ms))
            .map(|(e, _)| *e)
            .collect();
        for e in due {
            if let Some(run) = self.gcs.get_mut(&e) {
                run.g.handle_timeout(now_ms);
            }
            self.drain_gc(e);
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.gc_retry)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.gc_retry = later;
        for (_, e, arc) in due {
            self.delete_lost(e, arc);
        }
    }

    /// Sources with requests in flight, and since when they have answered nothing.
    fn silent_since(&self) -> impl Iterator<Item = (NodeId, Instant)> + '_ {
        self.inflight_peer
            .iter()
            .filter(|(n, busy)| **busy > 0 && **n != self.me)
            .filter_map(|(n, _)| self.heard.get(n).map(|t| (*n, *t)))
    }

    fn next_deadline(&self) -> Instant {
        let mut at = Instant::now() + Duration::from_secs(3600);
        for (n, since) in self.silent_since() {
            if !self.is_down(&n) {
                at = at.min(since + SILENT_AFTER);
            }
        }
        for r in self.transfers.values() {
            if !r.checking && r.queued == 0 {
                if let Some(ms) = r.t.next_timeout() {
                    at = at.min(self.clock + Duration::from_millis(ms));
                }
            }
        }
        for t in self.restart_at.values() {
            at = at.min(*t);
        }
        for run in self.gcs.values() {
            if let Some(ms) = run.g.next_timeout() {
                at = at.min(self.clock + Duration::from_millis(ms));
            }
        }
        for (t, _, _) in &self.gc_retry {
            at = at.min(*t);
        }
        if self.dirty {
            at = at.min(self.published_at + PUBLISH_EVERY);
        }
        if !self.transfers.is_empty() {
            at = at.min(self.logged_at + LOG_EVERY);
        }
        if let Some(rate) = self.rate_wait() {
            at = at.min(Instant::now() + rate);
        }
        at
    }

    /// The cap on the transfer's rate in force now, bytes/s, and whether it is the one under client
    /// load ([`TransferOptions::rate_under_load`]).
    fn cap(&self) -> Option<(u64, bool)> {
        let limit = self.opts.rate_limit;
        let busy = self
            .opts
            .rate_under_load
            .filter(|_| self.handle.clients_active());
        match (limit, busy) {
            (Some(l), Some(b)) if b < l => Some((b.max(1), true)),
            (Some(l), _) => Some((l.max(1), false)),
            (None, Some(b)) => Some((b.max(1), true)),
            (None, None) => None,
        }
    }

    /// Under a rate cap and with requests waiting: how long until the bucket allows the next one.
    fn rate_wait(&self) -> Option<Duration> {
        let rate = self.cap()?.0 as f64;
        if self.queues.values().all(VecDeque::is_empty) || self.tokens > 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(
            (-self.tokens / rate).clamp(0.001, 1.0),
        ))
    }

    /// Sends the urgent requests, then queued ones while the bounds allow, round-robin over
    /// destinations.
    fn pump(&mut self) {
        while let Some((to, epoch, gen, bytes)) = self.urgent.pop_front() {
            if self.is_down(&to) {
                continue; // the machine asks again, elsewhere, at its next timeout
            }
            let Some(r) = self.transfers.get_mut(&epoch).filter(|r| r.gen == gen) else {
                continue;
            };
            let dest = r.addrs.get(&to).copied();
            self.send(epoch, gen, to, dest, bytes);
        }
        loop {
            if self.inflight >= self.opts.max_requests.max(1)
                || self.pending_writes >= self.opts.max_pending_writes.max(1)
            {
                return;
            }
            let now = Instant::now();
            if let Some((rate, _)) = self.cap() {
                let burst = (rate as f64 / 10.0).max(self.reply_estimate);
                self.tokens =
                    (self.tokens + (now - self.tokens_at).as_secs_f64() * rate as f64).min(burst);
                self.tokens_at = now;
                if self.tokens <= 0.0 {
                    return;
                }
            } else {
                // No cap now: the bucket starts empty when one comes into force.
                self.tokens = 0.0;
                self.tokens_at = now;
            }
            let per_peer = self.opts.max_requests_per_peer.max(1);
            let ready = |n: &NodeId, q: &VecDeque<_>| {
                !q.is_empty() && self.inflight_peer.get(n).copied().unwrap_or(0) < per_peer
            };
            let after = self.last_peer;
            let pick = self
                .queues
                .iter()
                .filter(|(n, _)| after.is_none_or(|a| **n > a))
                .find(|(n, q)| ready(n, q))
                .or_else(|| self.queues.iter().find(|(n, q)| ready(n, q)))
                .map(|(n, _)| *n);
            let Some(to) = pick else {
                self.queues.retain(|_, q| !q.is_empty());
                return;
            };
            self.last_peer = Some(to);
            let Some((epoch, gen, bytes)) = self.queues.get_mut(&to).and_then(VecDeque::pop_front)
            else {
                continue;
            };
            let Some(r) = self.transfers.get_mut(&epoch).filter(|r| r.gen == gen) else {
                continue; // its run was abandoned
            };
            r.queued = r.queued.saturating_sub(1);
            let dest = r.addrs.get(&to).copied();
            self.send(epoch, gen, to, dest, bytes);
        }
    }

    fn send(
        &mut self,
        epoch: Epoch,
        gen: u64,
        to: NodeId,
        dest: Option<(SocketAddr, VerifyingKey)>,
        bytes: Vec<u8>,
    ) {
        // Charged to the bucket now, settled against the reply's size when it comes.
        let reserved = self.reply_estimate;
        self.tokens -= reserved;
        self.inflight += 1;
        let busy = self.inflight_peer.entry(to).or_default();
        if *busy == 0 {
            self.heard.insert(to, Instant::now());
        }
        *busy += 1;
        let events = self.events.clone();
        let reply = move |reply: Option<Vec<u8>>, unreachable| Event::Reply {
            epoch,
            gen,
            to,
            reply,
            reserved,
            unreachable,
        };
        if to == self.me {
            let replica = self.replica.clone();
            let me = self.me;
            tokio::spawn(async move {
                let r = tokio::task::spawn_blocking(move || serve(&replica, me, &bytes))
                    .await
                    .ok()
                    .flatten();
                let _ = events.send(reply(r, false));
            });
            return;
        }
        let Some((addr, key)) = dest else {
            debug!(to = %to.short(), "no usable address for a transfer source");
            let _ = events.send(reply(None, false));
            return;
        };
        let endpoint = self.endpoint.clone();
        let timeout = self.opts.request_timeout;
        tokio::spawn(async move {
            let (r, unreachable) =
                match tokio::time::timeout(timeout, endpoint.request(addr, &key, &bytes)).await {
                    Ok(Ok(r)) => (Some(r), false),
                    // Alive, but it answered nothing (it refused or failed this request).
                    Ok(Err(NetError::NoResponse)) => (None, false),
                    Ok(Err(e)) => {
                        debug!(to = %to.short(), %addr, error = %e, "transfer request failed");
                        (None, true)
                    }
                    Err(_) => {
                        debug!(to = %to.short(), %addr, "transfer request timed out");
                        (None, true)
                    }
                };
            let _ = events.send(reply(r, unreachable));
        });
    }

    fn is_down(&self, n: &NodeId) -> bool {
        self.down
            .get(n)
            .is_some_and(|(until, _)| Instant::now() < *until)
    }

    /// A request to `n` failed in transport: send it nothing for a while (doubling while it stays
    /// unreachable, up to [`MAX_DOWN`]), drop what waits for it, and tell the machines
    /// ([`Transfer::peer_failed`]), which ask elsewhere at once what waited on it, so that a dead or
    /// silent source holds up neither the queue nor the machines' retransmissions.
    fn mark_down(&mut self, n: NodeId) {
        let backoff = self
            .down
            .get(&n)
            .map_or(MIN_DOWN, |(_, b)| (*b * 2).min(MAX_DOWN));
        self.down.insert(n, (Instant::now() + backoff, backoff));
        let dropped = self.queues.remove(&n).unwrap_or_default();
        if !dropped.is_empty() {
            debug!(source = %n.short(), requests = dropped.len(), ?backoff, "source unreachable: requests to it dropped");
        }
        for (epoch, gen, _) in dropped {
            if let Some(r) = self.transfers.get_mut(&epoch).filter(|r| r.gen == gen) {
                r.queued = r.queued.saturating_sub(1);
            }
        }
        // The machines ask elsewhere now what waited on it, rather than at their next timeout.
        let now = self.now_ms();
        let epochs: Vec<Epoch> = self.transfers.keys().copied().collect();
        for e in epochs {
            // During a check the re-asks wait in the machine until `drain` may poll it again.
            if let Some(r) = self.transfers.get_mut(&e) {
                r.t.peer_failed(now, n);
            }
            self.drain(e);
        }
    }

    /// A source answered "not yet" from an older epoch: it has not installed the configuration
    /// the transfer is for, so push it the newer ones (at most once per retransmission interval).
    fn maybe_push_configs(&mut self, epoch: Epoch, to: NodeId, bytes: &[u8]) {
        if to == self.me || bytes.len() > 64 {
            return;
        }
        let Ok(env) = decode::<TransferMessage>(bytes) else {
            return;
        };
        if !matches!(env.msg, TransferMessage::NotYet { .. }) || env.epoch >= epoch {
            return;
        }
        let now = Instant::now();
        if self
            .pushed
            .get(&to)
            .is_some_and(|t| now < *t + self.opts.retransmit)
        {
            return;
        }
        self.pushed.insert(to, now);
        let Some(Some((addr, key))) = self
            .transfers
            .get(&epoch)
            .map(|r| r.addrs.get(&to).copied())
        else {
            return;
        };
        let (mine, configs) = {
            let r = self.lock_replica();
            (r.epoch(), r.chain().after(env.epoch, MAX_CONFIGS_PER_REPLY))
        };
        debug!(to = %to.short(), their_epoch = env.epoch, "pushing configurations to a source that is behind");
        let push = encode_msg(mine, DbqsMessage::PushConfigs { configs });
        let endpoint = self.endpoint.clone();
        let timeout = self.opts.request_timeout;
        tokio::spawn(async move {
            // One-way: the node answers nothing.
            let _ = tokio::time::timeout(timeout, endpoint.request(addr, &key, &push)).await;
        });
    }

    fn snapshot(&self) -> Vec<TransferStatus> {
        let cap = self.cap();
        self.transfers
            .iter()
            .map(|(e, r)| TransferStatus {
                rate_cap: cap.map(|(rate, _)| rate),
                yielding: cap.is_some_and(|(_, busy)| busy),
                ..r.status(*e, false)
            })
            .chain(self.finished.iter().rev().cloned())
            .collect()
    }

    /// Publishes the status (at most every [`PUBLISH_EVERY`] unless `now`), and logs progress
    /// every [`LOG_EVERY`] while transfers run.
    fn publish(&mut self, now: bool) {
        if self.dirty && (now || self.published_at.elapsed() >= PUBLISH_EVERY) {
            self.status.send_replace(self.snapshot());
            self.dirty = false;
            self.published_at = Instant::now();
        }
        if !self.transfers.is_empty() && self.logged_at.elapsed() >= LOG_EVERY {
            self.logged_at = Instant::now();
            for (e, r) in &self.transfers {
                let s = r.status(*e, false);
                let (objects, known, bytes, fetched) = s.totals();
                let (units_done, units) = s.units_done();
                info!(
                    epoch = e,
                    units = format!("{units_done}/{units}"),
                    objects = format!("{objects}/{known}"),
                    bytes,
                    mb_per_s = format!(
                        "{:.1}",
                        fetched as f64 / 1e6 / r.started.elapsed().as_secs_f64().max(1e-3)
                    ),
                    "state transfer in progress"
                );
            }
        }
    }
}

/// Makes an announcement durable, then applies it to the replica.
fn announce(
    store: &DiskStore,
    replica: &SharedReplica,
    into: Epoch,
    what: &TransferOutput,
) -> Result<(), StoreError> {
    match what {
        TransferOutput::StoreRefs { refs } => {
            // Under the read lock, as a content write: nothing of a range collected since.
            let r = replica.read().unwrap_or_else(|p| p.into_inner());
            let wanted: Vec<_> = refs
                .iter()
                .filter(|(id, _)| r.accepts_transferred(into, id))
                .cloned()
                .collect();
            r.merge_transferred_refs(&wanted)?;
        }
        TransferOutput::UnitDone { epoch, arc } if is_single(arc) => {
            // An object fetched on demand: not persisted (after a restart a read fetches it again).
            replica
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .object_ready(*epoch, &ObjectId(arc.end));
        }
        TransferOutput::UnitDone { epoch, arc } => {
            store.add_transfer_done(*epoch, *arc)?;
            replica
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .arc_ready(*epoch, *arc);
        }
        TransferOutput::Complete { epoch } => {
            {
                // Under the lock, so two completions cannot save over each other.
                let mut r = replica.write().unwrap_or_else(|p| p.into_inner());
                let mut ready: Vec<Epoch> = (0..=r.epoch()).filter(|e| r.ready_at(*e)).collect();
                ready.push(*epoch);
                ready.sort_unstable();
                ready.dedup();
                store.save_ready(&ready)?;
                r.transfer_complete(*epoch);
            }
            if let Err(e) = store.clear_transfer_done(*epoch) {
                debug!(epoch, error = %e, "could not clear the per-arc progress of a complete transfer");
            }
        }
        _ => {}
    }
    Ok(())
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

/// Whether `arc` holds exactly one object (an on-demand unit).
fn is_single(arc: &RingArc) -> bool {
    *arc == RingArc::single(&ObjectId(arc.end))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn arc_name(arc: &RingArc) -> String {
    let hex = |b: &[u8; 32]| {
        b[..4]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    format!("{}…–{}…", hex(&arc.start), hex(&arc.end))
}

/// Lines describing a node's transfers (as its status reports them, untrusted), for `dbqsfs
/// status`: one per transfer in progress and for the newest completed, and one per unit of a
/// transfer in progress.
pub fn status_lines(transfers: &[TransferStatus]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut completed = 0;
    for t in transfers {
        // Running ones, and the newest completed (the status lists those newest first).
        if t.complete {
            completed += 1;
            if completed > 1 {
                continue;
            }
        }
        let (objects, known, bytes, fetched) = t.totals();
        let (units_done, units) = t.units_done();
        let secs = (t.elapsed_ms as f64 / 1e3).max(1e-3);
        if t.complete {
            lines.push(format!(
                "transfer into epoch {}: complete in {secs:.1} s: {units} units, {objects} objects, \
                 {:.1} MB ({:.1} MB fetched, {:.1} MB/s)",
                t.epoch,
                mb(bytes),
                mb(fetched),
                mb(fetched) / secs
            ));
            continue;
        }
        let cap = match (t.rate_cap, t.yielding) {
            (Some(c), true) => format!(" (capped at {:.1} MB/s while clients are served)", mb(c)),
            (Some(c), false) => format!(" (capped at {:.1} MB/s)", mb(c)),
            (None, _) => String::new(),
        };
        lines.push(format!(
            "transfer into epoch {}: {units_done}/{units} units done, {objects}/{known} objects known \
             so far, {:.1} MB held, {:.1} MB fetched at {:.1} MB/s{cap}, {secs:.0} s",
            t.epoch,
            mb(bytes),
            mb(fetched),
            mb(fetched) / secs
        ));
        for u in &t.units {
            let phase = match u.phase {
                UnitPhase::Listing => "listing",
                UnitPhase::Fetching => "fetching",
                UnitPhase::Done => "done",
                UnitPhase::Resumed => "done before restart",
            };
            lines.push(format!(
                "  {} {phase}: {}/{} objects, {:.1} MB ({:.1} MB fetched, {:.1} MB/s)",
                arc_name(&u.arc),
                u.objects_done,
                u.objects_total,
                mb(u.bytes_done),
                mb(u.fetched_bytes),
                mb(u.rate)
            ));
        }
    }
    lines
}

/// One line summing up a node's garbage collection (as its status reports it, untrusted), for
/// `dbqsfs status`; `None` if the node never lost a range.
pub fn gc_line(gc: &[GcStatus]) -> Option<String> {
    if gc.is_empty() {
        return None;
    }
    let (mut lost, mut collected, mut deleted) = (0u64, 0u64, 0u64);
    for g in gc {
        lost = lost.saturating_add(g.arcs_lost);
        collected = collected.saturating_add(g.arcs_collected.min(g.arcs_lost));
        deleted = deleted.saturating_add(g.objects_deleted);
    }
    let running = gc.iter().any(|g| g.running && !g.complete());
    Some(format!(
        "garbage collection: {collected}/{lost} lost arcs collected, {} pending{}, {deleted} objects \
         deleted by this process",
        lost - collected,
        if running { " (running)" } else { "" }
    ))
}

/// Shows the transfers in progress as a progress bar on stderr (for a node run on a terminal)
/// until `rx`'s worker is gone.
pub async fn show_progress(mut rx: watch::Receiver<Vec<TransferStatus>>) {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let mut bar: Option<ProgressBar> = None;
    while rx.changed().await.is_ok() {
        let transfers: Vec<TransferStatus> = rx
            .borrow_and_update()
            .iter()
            .filter(|t| !t.complete)
            .cloned()
            .collect();
        if transfers.is_empty() {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            continue;
        }
        let (mut objects, mut known, mut bytes, mut fetched) = (0u64, 0u64, 0u64, 0u64);
        let (mut units_done, mut units, mut secs) = (0, 0, 0f64);
        for t in &transfers {
            let (o, k, b, f) = t.totals();
            objects += o;
            known += k;
            bytes += b;
            fetched += f;
            let (d, n) = t.units_done();
            units_done += d;
            units += n;
            secs = secs.max(t.elapsed_ms as f64 / 1e3);
        }
        let b = bar.get_or_insert_with(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(4));
            if let Ok(style) =
                ProgressStyle::with_template("transfer {msg} [{bar:30}] {pos}/{len} objects")
            {
                b.set_style(style);
            }
            b
        });
        let epochs: Vec<String> = transfers.iter().map(|t| t.epoch.to_string()).collect();
        // Nothing known while listing: an empty bar, not a full one.
        b.set_length(known.max(objects).max(1));
        b.set_position(objects);
        b.set_message(format!(
            "into epoch {}: units {units_done}/{units}, {:.1} MB, {:.1} MB/s",
            epochs.join(","),
            mb(bytes),
            mb(fetched) / secs.max(1e-3)
        ));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
