//! PBFT agreement for the MS committee, as a sans-IO state machine.
//!
//! Goals: a committee of `n = 3f+1` members orders opaque, client-signed requests into numbered
//! batches. Safety: no two correct members decide different batches at one sequence number, and
//! every correct member executes the same requests in the same order, each request at most once,
//! while at most `f` members are Byzantine, whatever the network does. Liveness: once the network
//! delivers messages within the timeouts, every request submitted to a correct member is executed
//! by every correct member (a faulty or slow primary is replaced by a view change).
//!
//! Non-goals: the meaning of requests (the MS state machine on top), persistence (a driver that
//! restarts a member must restore its state first; a member that forgets what it signed is
//! Byzantine), fairness among clients beyond arrival order, and resisting denial of service by
//! floods of validly signed requests (bounded by [`Options::max_pending`] and [`msg::MAX_CLIENTS`]:
//! the MS admits clients above this layer).
//!
//! Fault model: up to `f` members may do anything except forge other members' or clients'
//! signatures: equivocate (two pre-prepares for one slot: returned as [`Evidence`]), withhold
//! messages, replay old ones, send garbage. Two commit certificates for different batches at one
//! sequence number would prove that more than `f` members are faulty; they are returned as
//! evidence too. Every message is decoded by [`crate::wire::decode`]; every statement's signature
//! and every index is checked before use; nothing from the network panics. Messages of another
//! epoch, from non-members, of other views or outside the window are refused with a typed
//! [`Rejected`].
//!
//! # The protocol (Castro and Liskov, OSDI 1999, with signatures)
//!
//! - Normal case. The primary of view `v` is `committee[v mod n]`. It assigns the next sequence
//!   number to a batch of up to [`Options::max_batch`] pending requests (a batch is formed whenever
//!   fewer than [`Options::pipeline`] of its batches are unexecuted, so requests accumulate while
//!   earlier batches run) and broadcasts a signed PRE-PREPARE with the batch. A backup accepts it
//!   if it is for its view, inside the window, from the primary, and the first for that slot; it
//!   broadcasts a signed PREPARE. A member is *prepared* with the pre-prepare and `2f` matching
//!   prepares of other members (`2f+1` statements), then broadcasts a signed COMMIT; it has
//!   *committed* with `2f+1` matching commits. Batches execute strictly in sequence order.
//! - Requests. A request is submitted to any member, which checks its signature and forwards it to
//!   every member (the primary batches it; the others watch it, so that a primary that ignores it is
//!   suspected by all). Requests still pending after half the request timeout are sent again.
//!   Execution skips a request whose client `seq` is not above the last one executed for that
//!   client, so duplicates and replays are never executed twice. Client counters start at 1, and
//!   a client has one request outstanding at a time (as in PBFT): a request overtaken by a later
//!   one of the same client is never executed.
//! - Checkpoints. After executing a multiple of [`Options::checkpoint_interval`] the member emits
//!   [`Output::Checkpoint`]; the driver answers with [`Agreement::checkpoint_digest`]. The member
//!   signs a CHECKPOINT of [`msg::state_digest`] (application digest and duplicate table). With
//!   `2f+1` matching checkpoints the checkpoint is *stable*: the low water mark moves to it and the
//!   log below it is discarded. Messages are accepted only for sequence numbers in
//!   `(low, low + window]`.
//! - Catching up. Every [`Options::tick_ms`] each member broadcasts an unsigned STATUS and resends
//!   its messages for slots it has not committed and its checkpoints that are not yet stable. A
//!   member that learns a peer is ahead sends FETCH; the peer answers with decided batches and their
//!   commit certificates (self-certifying), and, when the fetcher is behind the stable checkpoint,
//!   the state there (duplicate table and application digest, proved by the checkpoint): the member
//!   emits [`Output::InstallState`] and the driver fetches the application state that hashes to
//!   that digest. A member whose status shows an older stable checkpoint is sent the newer proof.
//! - View change. A member that waits for execution longer than the request timeout (doubled at
//!   each consecutive view change), or that holds proof that the primary equivocated, stops
//!   accepting messages of its view and broadcasts a signed VIEW-CHANGE for `v+1` with its stable
//!   checkpoint proof and its prepared certificates above it (each: the pre-prepare and `2f`
//!   prepares, all signed, with the batch attached). A member that sees `f+1` view changes for
//!   higher views joins the smallest of them; once `2f+1` members are changing to its target view
//!   or a later one, a member gives the new primary a (doubling) timeout before moving on to the
//!   next view. The new primary, with `2f+1` view changes for its view, computes the re-issued
//!   pre-prepares (PBFT's O set, [`msg::reissue`]): for each sequence number above the highest
//!   stable checkpoint, the batch of the prepared certificate of the highest view, or the null
//!   batch; it broadcasts a signed NEW-VIEW with the view changes and those pre-prepares. Backups
//!   check every view change and recompute the O set before they accept it, and never accept a
//!   NEW-VIEW below the view they asked to change to. Decided batches fetched with their commit
//!   certificates are executed whatever the view.
//!
//! Drive it with [`Agreement::submit`], [`Agreement::handle_message`],
//! [`Agreement::handle_timeout`] (at [`Agreement::next_timeout`]) and
//! [`Agreement::checkpoint_digest`]; take [`Output`]s with [`Agreement::poll_output`], in order.

pub mod msg;

use crate::config::Epoch;
use crate::crypto::{Keypair, NodeId, PublicKey};
use crate::quorum::{Tally, Vote};
use crate::wire::{decode, encode_msg, MAX_MESSAGE};
pub use msg::{
    batch_digest, AgreementMessage, Checkpoint, Commit, Committee, DecidedProof, Digest, Evidence,
    NewView, PrePrepare, Prepare, PreparedCert, Rejected, Request, RequestKey, SeqNo, SetupError,
    Signed, SignedStatement, StableProof, StateSnapshot, View, ViewChange, MAX_CLIENTS,
    MAX_PAYLOAD,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Deliberate protocol breakages for proving that the agreement simulator's checkers catch real
/// bugs.
#[cfg(feature = "mutants")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mutant {
    #[default]
    None,
    /// Prepared with `f+1` statements (the pre-prepare and `f` prepares) instead of `2f+1`.
    PrepareQuorumF,
    /// A NEW-VIEW is accepted without checking the view changes' prepared certificates or
    /// recomputing the re-issued pre-prepares.
    SkipViewChangeProof,
}

/// Tuning of the protocol. Every member of a committee must use the same values.
#[derive(Clone, Debug)]
pub struct Options {
    /// The epoch this committee runs: carried in every envelope and every signed statement.
    pub epoch: Epoch,
    /// Most requests in one pre-prepare.
    pub max_batch: usize,
    /// A checkpoint every this many sequence numbers.
    pub checkpoint_interval: u64,
    /// Width of the window of sequence numbers above the stable checkpoint (a multiple of the
    /// checkpoint interval, at least two intervals).
    pub window: u64,
    /// The primary keeps at most this many of its batches unexecuted.
    pub pipeline: u64,
    /// How long a member waits for progress before it suspects the primary (doubled at each
    /// consecutive view change).
    pub request_timeout_ms: u64,
    /// Period of status messages and retransmissions.
    pub tick_ms: u64,
    /// Most requests held waiting to be ordered.
    pub max_pending: usize,
    #[cfg(feature = "mutants")]
    pub mutant: Mutant,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            epoch: 0,
            max_batch: 8,
            checkpoint_interval: 8,
            window: 16,
            pipeline: 4,
            request_timeout_ms: 1_000,
            tick_ms: 250,
            max_pending: 1024,
            #[cfg(feature = "mutants")]
            mutant: Mutant::None,
        }
    }
}

/// Bytes a request takes on the wire beyond its payload, generously.
const REQUEST_OVERHEAD: usize = 160;
/// Bytes a signed vote (prepare, commit, checkpoint) takes on the wire, generously.
const SIGNED_VOTE: usize = 160;
/// The request timeout doubles at most this many times.
const MAX_BACKOFF: u32 = 4;
/// Most pending requests resent per tick.
const RESEND_PER_TICK: usize = 64;

impl Options {
    /// Checks the options for a committee of `n` members (as [`Agreement::new`] does): sane
    /// values, and the largest messages they allow fit the wire's limit.
    pub fn validate(&self, n: usize) -> Result<(), SetupError> {
        if self.max_batch == 0 {
            return Err(SetupError::Options("max_batch must be at least 1"));
        }
        if self.checkpoint_interval == 0 {
            return Err(SetupError::Options(
                "checkpoint_interval must be at least 1",
            ));
        }
        if self.window < 2 * self.checkpoint_interval
            || !self.window.is_multiple_of(self.checkpoint_interval)
        {
            return Err(SetupError::Options(
                "window must be a multiple of the checkpoint interval, at least two intervals",
            ));
        }
        if self.pipeline == 0 || self.pipeline > self.window {
            return Err(SetupError::Options("pipeline must be in 1..=window"));
        }
        if self.tick_ms == 0 || self.request_timeout_ms == 0 {
            return Err(SetupError::Options("timers must be positive"));
        }
        // The largest messages (a view change with its batches, a new view with its view changes
        // and batches, a fetch answer) must fit the wire's limit.
        let w = self.window as usize;
        let batches = w
            .saturating_mul(self.max_batch)
            .saturating_mul(MAX_PAYLOAD + REQUEST_OVERHEAD);
        let certs = n
            .saturating_mul(w)
            .saturating_mul(n + 1)
            .saturating_mul(SIGNED_VOTE);
        let clients = MAX_CLIENTS * 48;
        if batches.saturating_add(certs) + 64 * 1024 > MAX_MESSAGE
            || clients + n * SIGNED_VOTE > MAX_MESSAGE
        {
            return Err(SetupError::Options(
                "window × max_batch too large: messages would exceed the wire limit",
            ));
        }
        Ok(())
    }
}

/// What the driver should do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Write `state` to stable storage (replacing the previous one) before carrying out any
    /// later output: the messages after it carry statements that a restarted member must
    /// remember ([`Agreement::restore`] takes it back). Emitted after the local outputs of the
    /// same input, so the driver's application state at this point matches `state`.
    Persist { state: Vec<u8> },
    /// Send `bytes` to member `to`.
    Send { to: NodeId, bytes: Vec<u8> },
    /// Send `bytes` to every other member.
    Broadcast { bytes: Vec<u8> },
    /// Execute these requests as sequence number `seq` (the batch minus duplicates and replays;
    /// possibly empty). Emitted once per sequence number, in order.
    Decided { seq: SeqNo, requests: Vec<Request> },
    /// `seq` is a checkpoint: call [`Agreement::checkpoint_digest`] with the application's digest
    /// as it is after executing `seq` (before executing anything decided later).
    Checkpoint { seq: SeqNo },
    /// The member skipped to the stable checkpoint `seq`: replace the application state with the
    /// one (fetched from any member) whose digest is `app_digest`; later decisions follow it.
    InstallState { seq: SeqNo, app_digest: Digest },
    /// The member entered `view` (for logs).
    EnteredView { view: View },
    /// Members misbehaved; the proof is made of their signed statements.
    Evidence(Evidence),
}

/// Signed votes for one slot, each member counted once ([`Tally`]); a second, different vote is
/// returned with the first as evidence.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Serialize", deserialize = "T: Deserialize<'de>"))]
struct Votes<T> {
    tally: Tally<Digest>,
    signed: BTreeMap<NodeId, Signed<T>>,
}

impl<T> Default for Votes<T> {
    fn default() -> Self {
        Votes {
            tally: Tally::new(),
            signed: BTreeMap::new(),
        }
    }
}

trait Voted {
    fn digest(&self) -> Digest;
}
impl Voted for Prepare {
    fn digest(&self) -> Digest {
        self.digest
    }
}
impl Voted for Commit {
    fn digest(&self) -> Digest {
        self.digest
    }
}
impl Voted for Checkpoint {
    fn digest(&self) -> Digest {
        self.digest
    }
}

impl<T: Voted + Clone> Votes<T> {
    fn has(&self, who: &NodeId, digest: &Digest) -> bool {
        self.signed
            .get(who)
            .is_some_and(|s| s.body.digest() == *digest)
    }

    /// Adds a checked vote; `Err(first)` when `who` voted differently before.
    fn add(&mut self, who: NodeId, s: Signed<T>) -> Result<(), Box<Signed<T>>> {
        match self.tally.add(who, s.body.digest()) {
            Vote::New => {
                self.signed.insert(who, s);
                Ok(())
            }
            Vote::Duplicate => Ok(()),
            Vote::Conflict { .. } => Err(Box::new(self.signed[&who].clone())),
        }
    }

    fn count(&self, digest: &Digest) -> usize {
        self.tally.count(|d| d == digest)
    }

    fn matching(&self, digest: &Digest) -> Vec<Signed<T>> {
        self.signed
            .values()
            .filter(|s| s.body.digest() == *digest)
            .cloned()
            .collect()
    }

    fn digests(&self) -> BTreeSet<Digest> {
        self.tally.values().copied().collect()
    }
}

/// One sequence number in the current view.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Slot {
    pre_prepare: Option<(Signed<PrePrepare>, Vec<Request>)>,
    prepares: Votes<Prepare>,
    commits: Votes<Commit>,
    sent_prepare: Option<Signed<Prepare>>,
    sent_commit: Option<Signed<Commit>>,
    prepared: bool,
    committed: bool,
}

#[derive(Debug)]
struct Pending {
    req: Request,
    arrival: u64,
    last_sent: u64,
}

/// This member's own checkpoint at a sequence number: the duplicate table when it executed it, and
/// the digests once the driver supplied the application's.
#[derive(Debug, Serialize, Deserialize)]
struct OwnCheckpoint {
    clients: Vec<(PublicKey, u64)>,
    app: Option<Digest>,
    digest: Option<Digest>,
}

#[derive(Clone, Copy, Debug)]
struct PeerStatus {
    executed: SeqNo,
    stable: SeqNo,
}

/// Sizes of the log, for tests and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogSize {
    /// Sequence numbers with messages of the current view.
    pub slots: usize,
    /// Prepared certificates kept for view changes.
    pub prepared: usize,
    /// Decided batches kept with their commit certificates.
    pub decided: usize,
    /// Sequence numbers with checkpoint votes.
    pub checkpoints: usize,
    /// Lowest sequence number held in any of these (`None` if all are empty).
    pub lowest: Option<SeqNo>,
}

/// What a member must not forget across a restart: everything it signed and everything its
/// signatures depend on (its view, its votes and their slots, its prepared and decided
/// certificates, its checkpoints, view changes and the duplicate table that execution built). A
/// member restored from it ([`Agreement::restore`]) never signs two different statements for one
/// slot; a member that loses it is Byzantine. [`Output::Persist`] carries it, serialized, before
/// any message that depends on it.
#[derive(Debug, Serialize, Deserialize)]
struct Durable {
    /// The epoch of the committee (a state is never restored into another).
    epoch: Epoch,
    view: View,
    /// `Some(target)` while changing to view `target`.
    changing: Option<View>,
    backoff: u32,

    /// The last executed request seq of every client (the duplicate table).
    clients: BTreeMap<PublicKey, u64>,
    /// Requests in a pre-prepare of the current view.
    proposed: BTreeSet<RequestKey>,

    slots: BTreeMap<SeqNo, Slot>,
    /// The primary's next sequence number.
    next_seq: SeqNo,
    /// For each sequence number above the stable checkpoint: the prepared certificate of the
    /// highest view this member prepared in, with its batch.
    prepared: BTreeMap<SeqNo, (PreparedCert, Vec<Request>)>,
    /// Decided batches above the stable checkpoint (executed or waiting for a gap to fill).
    decided: BTreeMap<SeqNo, DecidedProof>,
    last_executed: SeqNo,

    /// The low water mark: the stable checkpoint.
    low: SeqNo,
    stable: StableProof,
    /// The application digest and duplicate table of the stable checkpoint, when this member has
    /// them (it can then serve the state).
    stable_state: Option<(Digest, Vec<(PublicKey, u64)>)>,
    own_checkpoints: BTreeMap<SeqNo, OwnCheckpoint>,
    checkpoint_votes: BTreeMap<SeqNo, Votes<Checkpoint>>,

    /// The latest checked view change of every member, with its batches.
    view_changes: BTreeMap<u32, (Signed<ViewChange>, Vec<Vec<Request>>)>,
    /// The NEW-VIEW that started the current view (none for view 0), to help members behind.
    new_view: Option<(Signed<NewView>, Vec<Vec<Request>>)>,
}

/// One committee member running the agreement.
pub struct Agreement {
    key: Keypair,
    me: u32,
    my_id: NodeId,
    committee: Committee,
    opts: Options,
    now: u64,

    /// The state a restart must keep; the rest of this struct is volatile (pending requests are
    /// resent by their clients, timers and peers' statuses start again).
    d: Durable,
    /// The hash of the durable state last handed out in [`Output::Persist`].
    persisted: Option<[u8; 32]>,

    pending: BTreeMap<RequestKey, Pending>,
    /// Pending requests in arrival order.
    arrivals: BTreeMap<u64, RequestKey>,
    next_arrival: u64,

    next_tick: u64,
    /// In the normal case: when to suspect the primary if nothing executes.
    progress_deadline: Option<u64>,
    /// `last_executed` when the progress deadline was last reset.
    progress_mark: SeqNo,
    /// While changing view, with `2f+1` view changes for the target: when to give up on it.
    new_view_deadline: Option<u64>,

    peers: Vec<Option<PeerStatus>>,
    fetch_cursor: usize,

    out: VecDeque<Output>,
}

impl Agreement {
    /// Member `me` of `committee` (in committee order: index `i` is the primary of views `i mod n`).
    pub fn new(
        me: Keypair,
        committee: Vec<PublicKey>,
        opts: Options,
    ) -> Result<Agreement, SetupError> {
        let committee = Committee::new(committee)?;
        let my_id = me.node_id();
        let my_index = committee
            .index_of(&my_id)
            .ok_or(SetupError::NotInCommittee)?;
        opts.validate(committee.len())?;
        let n = committee.len();
        Ok(Agreement {
            key: me,
            me: my_index,
            my_id,
            committee,
            now: 0,
            d: Durable {
                epoch: opts.epoch,
                view: 0,
                changing: None,
                backoff: 0,
                clients: BTreeMap::new(),
                proposed: BTreeSet::new(),
                slots: BTreeMap::new(),
                next_seq: 1,
                prepared: BTreeMap::new(),
                decided: BTreeMap::new(),
                last_executed: 0,
                low: 0,
                stable: StableProof::genesis(),
                stable_state: Some(([0; 32], Vec::new())),
                own_checkpoints: BTreeMap::new(),
                checkpoint_votes: BTreeMap::new(),
                view_changes: BTreeMap::new(),
                new_view: None,
            },
            persisted: None,
            pending: BTreeMap::new(),
            arrivals: BTreeMap::new(),
            next_arrival: 0,
            next_tick: 0,
            progress_deadline: None,
            progress_mark: 0,
            new_view_deadline: None,
            peers: vec![None; n],
            fetch_cursor: my_index as usize,
            out: VecDeque::new(),
            opts,
        })
    }

    /// A member restarted from the durable state it last persisted ([`Output::Persist`]), at time
    /// `now`: it is back in the view it was in (or changing to the view it asked for), with every
    /// statement it signed, and signs nothing that contradicts them. Its timers start again; its
    /// pending requests are gone (clients resend them). `committee` and `opts` must be those it
    /// ran with.
    pub fn restore(
        me: Keypair,
        committee: Vec<PublicKey>,
        opts: Options,
        state: &[u8],
        now: u64,
    ) -> Result<Agreement, SetupError> {
        let d: Durable = postcard::from_bytes(state).map_err(|_| SetupError::BadState)?;
        let mut a = Agreement::new(me, committee, opts)?;
        if d.epoch != a.opts.epoch {
            return Err(SetupError::BadState);
        }
        a.persisted = Some(*blake3::hash(state).as_bytes());
        a.progress_mark = d.last_executed;
        a.d = d;
        a.now = now;
        a.next_tick = now;
        if a.d.changing.is_some() {
            // Give the view it asked for one timeout before moving on, as if just started.
            a.new_view_deadline = Some(now.saturating_add(a.timeout()));
        }
        let mark = a.out.len();
        a.after_input();
        a.seal(mark);
        Ok(a)
    }

    // ---- accessors ----

    pub fn id(&self) -> NodeId {
        self.my_id
    }

    /// This member's index in the committee.
    pub fn index(&self) -> u32 {
        self.me
    }

    pub fn committee(&self) -> &Committee {
        &self.committee
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    pub fn view(&self) -> View {
        self.d.view
    }

    /// The view this member is changing to, if it is.
    pub fn changing_to(&self) -> Option<View> {
        self.d.changing
    }

    /// Whether this member is the primary of its view and not changing view.
    pub fn is_primary(&self) -> bool {
        self.d.changing.is_none() && self.committee.primary(self.d.view) == self.me
    }

    pub fn last_executed(&self) -> SeqNo {
        self.d.last_executed
    }

    /// The highest sequence number of `client`'s requests executed (0 if none): every request
    /// of it at or below is done or void.
    pub fn executed_for(&self, client: &PublicKey) -> SeqNo {
        self.d.clients.get(client).copied().unwrap_or(0)
    }

    /// The sequence number of the stable checkpoint (the low water mark).
    pub fn stable_checkpoint(&self) -> SeqNo {
        self.d.low
    }

    /// Requests waiting to be ordered.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    pub fn log_size(&self) -> LogSize {
        let lowest = [
            self.d.slots.keys().next(),
            self.d.prepared.keys().next(),
            self.d.decided.keys().next(),
            self.d.checkpoint_votes.keys().next(),
        ]
        .into_iter()
        .flatten()
        .min()
        .copied();
        LogSize {
            slots: self.d.slots.len(),
            prepared: self.d.prepared.len(),
            decided: self.d.decided.len(),
            checkpoints: self.d.checkpoint_votes.len(),
            lowest,
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest time at which [`Agreement::handle_timeout`] has work to do.
    pub fn next_timeout(&self) -> Option<u64> {
        [
            Some(self.next_tick),
            self.progress_deadline,
            self.new_view_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ---- inputs ----

    /// A client submits `req` to this member, which forwards it to every member.
    pub fn submit(&mut self, now: u64, req: Request) -> Result<(), Rejected> {
        let mark = self.out.len();
        self.now = self.now.max(now);
        let res = self.on_request(req, true);
        self.after_input();
        self.seal(mark);
        res
    }

    /// Handles bytes received from `from` (as authenticated by the transport).
    pub fn handle_message(&mut self, now: u64, from: NodeId, bytes: &[u8]) -> Result<(), Rejected> {
        let mark = self.out.len();
        self.now = self.now.max(now);
        let env = decode::<AgreementMessage>(bytes)?;
        if env.epoch != self.opts.epoch {
            return Err(Rejected::OtherEpoch {
                ours: self.opts.epoch,
                theirs: env.epoch,
            });
        }
        let from_index = self
            .committee
            .index_of(&from)
            .ok_or(Rejected::NotAMember(from))?;
        use AgreementMessage as M;
        let res = match env.msg {
            M::Request(r) => self.on_request(r, false),
            M::PrePrepare { pre_prepare, batch } => self.on_pre_prepare(pre_prepare, batch),
            M::Prepare(p) => self.on_prepare(p),
            M::Commit(c) => self.on_commit(c),
            M::Checkpoint(c) => self.on_checkpoint(c),
            M::ViewChange {
                view_change,
                batches,
            } => self.on_view_change(view_change, batches),
            M::NewView { new_view, batches } => self.on_new_view(new_view, batches),
            M::Status {
                view,
                changing: _,
                executed,
                stable,
            } => self.on_status(from_index, view, executed, stable),
            M::Fetch { after } => self.on_fetch(from_index, after),
            M::StableCheckpoint(proof) => self.on_stable_checkpoint(proof),
            M::State(s) => self.on_state(s),
            M::Decided(proofs) => self.on_decided(proofs),
        };
        self.after_input();
        self.seal(mark);
        res
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: u64) {
        let mark = self.out.len();
        self.now = self.now.max(now);
        if self.now >= self.next_tick {
            self.next_tick = self.now.saturating_add(self.opts.tick_ms);
            self.tick();
        }
        match self.d.changing {
            None => {
                if self.progress_deadline.is_some_and(|d| self.now >= d) {
                    self.start_view_change(self.d.view.saturating_add(1));
                }
            }
            Some(target) => {
                if self.new_view_deadline.is_some_and(|d| self.now >= d) {
                    self.new_view_deadline = None;
                    self.start_view_change(target.saturating_add(1));
                }
            }
        }
        self.after_input();
        self.seal(mark);
    }

    /// The driver's answer to [`Output::Checkpoint`]: the application's digest after executing
    /// `seq`. Unknown or repeated sequence numbers are ignored.
    pub fn checkpoint_digest(&mut self, seq: SeqNo, app_digest: Digest) {
        let mark = self.out.len();
        let Some(own) = self.d.own_checkpoints.get_mut(&seq) else {
            return;
        };
        if own.digest.is_some() {
            return;
        }
        let digest = msg::state_digest(seq, &app_digest, &own.clients);
        own.app = Some(app_digest);
        own.digest = Some(digest);
        let clients = own.clients.clone();
        if seq == self.d.low && self.d.stable.digest == digest && self.d.stable_state.is_none() {
            self.d.stable_state = Some((app_digest, clients));
        }
        if seq > self.d.low {
            let c = self.sign(Checkpoint { seq, digest });
            let _ = self
                .d
                .checkpoint_votes
                .entry(seq)
                .or_default()
                .add(self.my_id, c.clone());
            self.broadcast(AgreementMessage::Checkpoint(c));
            self.check_stable(seq);
        }
        self.after_input();
        self.seal(mark);
    }

    // ---- helpers ----

    fn f(&self) -> usize {
        self.committee.quorum().f()
    }

    fn quorum(&self) -> usize {
        self.committee.quorum().quorum()
    }

    /// Prepares of other members (besides the pre-prepare) that make a slot prepared.
    fn prepares_needed(&self) -> usize {
        #[cfg(feature = "mutants")]
        if self.opts.mutant == Mutant::PrepareQuorumF {
            return self.f();
        }
        2 * self.f()
    }

    fn skip_view_change_proof(&self) -> bool {
        #[cfg(feature = "mutants")]
        if self.opts.mutant == Mutant::SkipViewChangeProof {
            return true;
        }
        false
    }

    fn high(&self) -> SeqNo {
        self.d.low.saturating_add(self.opts.window)
    }

    fn timeout(&self) -> u64 {
        self.opts
            .request_timeout_ms
            .saturating_mul(1 << self.d.backoff.min(MAX_BACKOFF))
    }

    fn sign<T: msg::Statement>(&self, body: T) -> Signed<T> {
        Signed::sign(&self.key, self.me, self.opts.epoch, body)
    }

    fn broadcast(&mut self, m: AgreementMessage) {
        if self.committee.len() > 1 {
            let bytes = encode_msg(self.opts.epoch, m);
            self.out.push_back(Output::Broadcast { bytes });
        }
    }

    fn send(&mut self, to: u32, m: AgreementMessage) {
        if let Some(id) = self.committee.id(to) {
            if to != self.me {
                let bytes = encode_msg(self.opts.epoch, m);
                self.out.push_back(Output::Send { to: id, bytes });
            }
        }
    }

    fn evidence(&mut self, e: Evidence) {
        self.out.push_back(Output::Evidence(e));
    }

    fn check_view(&self, view: View) -> Result<(), Rejected> {
        if self.d.changing.is_some() {
            return Err(Rejected::ChangingView);
        }
        if view != self.d.view {
            return Err(Rejected::OtherView {
                ours: self.d.view,
                theirs: view,
            });
        }
        Ok(())
    }

    fn check_window(&self, seq: SeqNo) -> Result<(), Rejected> {
        if seq <= self.d.low || seq > self.high() {
            return Err(Rejected::OutsideWindow {
                seq,
                low: self.d.low,
                high: self.high(),
            });
        }
        Ok(())
    }

    fn signer_id(&self, signer: u32) -> Result<NodeId, Rejected> {
        self.committee
            .id(signer)
            .ok_or(Rejected::UnknownSigner(signer))
    }

    /// Checks a batch, skipping the signature check of requests identical to pending ones.
    fn check_batch(&self, batch: &[Request]) -> Result<Digest, Rejected> {
        if batch.len() > self.opts.max_batch {
            return Err(Rejected::BatchTooLarge {
                len: batch.len(),
                max: self.opts.max_batch,
            });
        }
        for r in batch {
            if self.pending.get(&r.key()).map(|p| &p.req) != Some(r) {
                r.verify()?;
            }
        }
        Ok(batch_digest(batch))
    }

    fn has_work(&self) -> bool {
        let next = self.d.last_executed.saturating_add(1);
        !self.pending.is_empty()
            || self
                .d
                .slots
                .range(next..)
                .any(|(_, s)| s.pre_prepare.is_some())
            || self.d.decided.range(next..).next().is_some()
    }

    /// Bookkeeping after every input: progress resets the view-change timer; the primary proposes;
    /// the timer runs while there is work.
    fn after_input(&mut self) {
        if self.d.last_executed > self.progress_mark {
            self.progress_mark = self.d.last_executed;
            self.progress_deadline = None;
            if self.d.changing.is_none() {
                self.d.backoff = 0;
            }
        }
        self.try_propose();
        if self.d.changing.is_none() {
            if self.has_work() {
                if self.progress_deadline.is_none() {
                    self.progress_deadline = Some(self.now.saturating_add(self.timeout()));
                }
            } else {
                self.progress_deadline = None;
            }
        }
    }

    /// Orders what one input produced for the driver: its local outputs first (decisions,
    /// checkpoints, evidence: the driver's state then matches the agreement's), then, when the
    /// input signed or learned anything a restart must keep, [`Output::Persist`] with the durable
    /// state, then the messages, which may leave only once that state is on disk.
    fn seal(&mut self, mark: usize) {
        let produced: Vec<Output> = self.out.drain(mark.min(self.out.len())..).collect();
        let (sends, local): (Vec<Output>, Vec<Output>) = produced
            .into_iter()
            .partition(|o| matches!(o, Output::Send { .. } | Output::Broadcast { .. }));
        self.out.extend(local);
        if sends.is_empty() {
            return;
        }
        let state = self.durable_state();
        let hash = *blake3::hash(&state).as_bytes();
        if self.persisted != Some(hash) {
            self.persisted = Some(hash);
            self.out.push_back(Output::Persist { state });
        }
        self.out.extend(sends);
    }

    /// The durable state, serialized (what [`Output::Persist`] carries).
    pub fn durable_state(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.d).expect("the durable state serializes")
    }

    // ---- requests ----

    fn on_request(&mut self, req: Request, submitted: bool) -> Result<(), Rejected> {
        let executed = self.d.clients.get(&req.client).copied().unwrap_or(0);
        if req.seq <= executed {
            return Err(Rejected::AlreadyExecuted {
                seq: req.seq,
                executed,
            });
        }
        let key = req.key();
        if let Some(p) = self.pending.get_mut(&key) {
            if submitted {
                // The client asks again: something may have been lost.
                p.last_sent = self.now;
                let r = p.req.clone();
                self.broadcast(AgreementMessage::Request(r));
            }
            return Ok(());
        }
        if self.pending.len() >= self.opts.max_pending {
            return Err(Rejected::Busy);
        }
        req.verify()?;
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.arrivals.insert(arrival, key);
        self.pending.insert(
            key,
            Pending {
                req: req.clone(),
                arrival,
                last_sent: self.now,
            },
        );
        if submitted {
            self.broadcast(AgreementMessage::Request(req));
        }
        Ok(())
    }

    fn remove_pending(&mut self, key: &RequestKey) {
        if let Some(p) = self.pending.remove(key) {
            self.arrivals.remove(&p.arrival);
        }
        self.d.proposed.remove(key);
    }

    /// Drops pending requests the duplicate table says are done.
    fn prune_pending(&mut self) {
        let done: Vec<RequestKey> = self
            .pending
            .keys()
            .filter(|(c, s)| self.d.clients.get(c).is_some_and(|e| s <= e))
            .copied()
            .collect();
        for k in done {
            self.remove_pending(&k);
        }
        let clients = &self.d.clients;
        self.d
            .proposed
            .retain(|(c, s)| clients.get(c).is_none_or(|e| s > e));
    }

    /// The primary assigns sequence numbers to batches of pending requests.
    fn try_propose(&mut self) {
        if !self.is_primary() {
            return;
        }
        while self.d.next_seq <= self.high()
            && self.d.next_seq <= self.d.last_executed.saturating_add(self.opts.pipeline)
        {
            let batch: Vec<Request> = self
                .arrivals
                .values()
                .filter(|k| !self.d.proposed.contains(k))
                .filter_map(|k| self.pending.get(k))
                .map(|p| p.req.clone())
                .take(self.opts.max_batch)
                .collect();
            if batch.is_empty() {
                return;
            }
            let seq = self.d.next_seq;
            self.d.next_seq = self.d.next_seq.saturating_add(1);
            let pp = self.sign(PrePrepare {
                view: self.d.view,
                seq,
                digest: batch_digest(&batch),
            });
            self.d.proposed.extend(batch.iter().map(|r| r.key()));
            self.d.slots.entry(seq).or_default().pre_prepare = Some((pp.clone(), batch.clone()));
            self.broadcast(AgreementMessage::PrePrepare {
                pre_prepare: pp,
                batch,
            });
            self.check_slot(seq);
        }
    }

    // ---- normal case ----

    fn on_pre_prepare(
        &mut self,
        pp: Signed<PrePrepare>,
        batch: Vec<Request>,
    ) -> Result<(), Rejected> {
        self.check_view(pp.body.view)?;
        self.check_window(pp.body.seq)?;
        if pp.signer != self.committee.primary(self.d.view) {
            return Err(Rejected::NotPrimary);
        }
        let seq = pp.body.seq;
        let held = self
            .d
            .slots
            .get(&seq)
            .and_then(|s| s.pre_prepare.as_ref())
            .map(|(p, _)| p.clone());
        if held
            .as_ref()
            .is_some_and(|h| h.body.digest == pp.body.digest)
        {
            return Ok(());
        }
        self.committee.verify(self.opts.epoch, &pp)?;
        if self.check_batch(&batch)? != pp.body.digest {
            return Err(Rejected::DigestMismatch);
        }
        if let Some(first) = held {
            // Two signed pre-prepares for one view and sequence number: the primary is faulty.
            self.evidence(Evidence::Equivocation {
                first: SignedStatement::PrePrepare(first),
                second: SignedStatement::PrePrepare(pp),
            });
            self.start_view_change(self.d.view.saturating_add(1));
            return Err(Rejected::Conflicting);
        }
        self.d.proposed.extend(batch.iter().map(|r| r.key()));
        self.d.slots.entry(seq).or_default().pre_prepare = Some((pp, batch));
        if self.committee.primary(self.d.view) != self.me {
            self.send_prepare(seq);
        }
        self.check_slot(seq);
        Ok(())
    }

    fn send_prepare(&mut self, seq: SeqNo) {
        let Some((pp, _)) = self.d.slots.get(&seq).and_then(|s| s.pre_prepare.as_ref()) else {
            return;
        };
        let p = self.sign(Prepare {
            view: self.d.view,
            seq,
            digest: pp.body.digest,
        });
        let slot = self.d.slots.entry(seq).or_default();
        let _ = slot.prepares.add(self.my_id, p.clone());
        slot.sent_prepare = Some(p.clone());
        self.broadcast(AgreementMessage::Prepare(p));
    }

    fn on_prepare(&mut self, p: Signed<Prepare>) -> Result<(), Rejected> {
        self.check_view(p.body.view)?;
        self.check_window(p.body.seq)?;
        let who = self.signer_id(p.signer)?;
        if p.signer == self.committee.primary(self.d.view) {
            return Err(Rejected::PrepareFromPrimary);
        }
        let seq = p.body.seq;
        if self
            .d
            .slots
            .get(&seq)
            .is_some_and(|s| s.prepares.has(&who, &p.body.digest))
        {
            return Ok(());
        }
        self.committee.verify(self.opts.epoch, &p)?;
        let added = self
            .d
            .slots
            .entry(seq)
            .or_default()
            .prepares
            .add(who, p.clone());
        if let Err(first) = added {
            self.evidence(Evidence::Equivocation {
                first: SignedStatement::Prepare(*first),
                second: SignedStatement::Prepare(p),
            });
            return Err(Rejected::Conflicting);
        }
        self.check_slot(seq);
        Ok(())
    }

    fn on_commit(&mut self, c: Signed<Commit>) -> Result<(), Rejected> {
        self.check_view(c.body.view)?;
        self.check_window(c.body.seq)?;
        let who = self.signer_id(c.signer)?;
        let seq = c.body.seq;
        if self
            .d
            .slots
            .get(&seq)
            .is_some_and(|s| s.commits.has(&who, &c.body.digest))
        {
            return Ok(());
        }
        self.committee.verify(self.opts.epoch, &c)?;
        let added = self
            .d
            .slots
            .entry(seq)
            .or_default()
            .commits
            .add(who, c.clone());
        if let Err(first) = added {
            self.evidence(Evidence::Equivocation {
                first: SignedStatement::Commit(*first),
                second: SignedStatement::Commit(c),
            });
            return Err(Rejected::Conflicting);
        }
        self.check_slot(seq);
        Ok(())
    }

    /// Moves a slot to prepared (and sends the commit) and to committed.
    fn check_slot(&mut self, seq: SeqNo) {
        let needed = self.prepares_needed();
        let quorum = self.quorum();
        let view = self.d.view;
        let Some(slot) = self.d.slots.get_mut(&seq) else {
            return;
        };
        let Some((pp, batch)) = slot.pre_prepare.clone() else {
            return;
        };
        let digest = pp.body.digest;
        if !slot.prepared && slot.prepares.count(&digest) >= needed {
            slot.prepared = true;
            let cert = PreparedCert {
                pre_prepare: pp.clone(),
                prepares: slot.prepares.matching(&digest),
            };
            self.d.prepared.insert(seq, (cert, batch.clone()));
            let c = self.sign(Commit { view, seq, digest });
            let slot = self.d.slots.entry(seq).or_default();
            let _ = slot.commits.add(self.my_id, c.clone());
            slot.sent_commit = Some(c.clone());
            self.broadcast(AgreementMessage::Commit(c));
        }
        let slot = self.d.slots.entry(seq).or_default();
        if slot.prepared && !slot.committed && slot.commits.count(&digest) >= quorum {
            slot.committed = true;
            let proof = DecidedProof {
                view,
                seq,
                batch,
                commits: slot.commits.matching(&digest),
            };
            self.on_committed(proof);
        }
    }

    /// A checked commit certificate for `proof.seq`: record it and execute what can be.
    fn on_committed(&mut self, proof: DecidedProof) {
        let seq = proof.seq;
        if seq <= self.d.low {
            return;
        }
        if let Some(held) = self.d.decided.get(&seq) {
            if batch_digest(&held.batch) != batch_digest(&proof.batch) {
                let first = held.clone();
                self.evidence(Evidence::ConflictingCommits {
                    first,
                    second: proof,
                });
            }
            return;
        }
        if seq <= self.d.last_executed {
            return; // skipped over by a state snapshot
        }
        self.d.decided.insert(seq, proof);
        self.execute_ready();
    }

    fn execute_ready(&mut self) {
        while let Some(proof) = self.d.decided.get(&self.d.last_executed.saturating_add(1)) {
            let seq = proof.seq;
            let batch = proof.batch.clone();
            let mut executed = Vec::new();
            for req in batch {
                let key = req.key();
                self.remove_pending(&key);
                let last = self.d.clients.get(&req.client).copied();
                if last.is_some_and(|l| req.seq <= l) || req.seq == 0 {
                    continue; // duplicate or replay
                }
                if last.is_none() && self.d.clients.len() >= MAX_CLIENTS {
                    continue; // the duplicate table is full: deterministic refusal
                }
                self.d.clients.insert(req.client, req.seq);
                executed.push(req);
            }
            self.prune_pending();
            self.d.last_executed = seq;
            self.out.push_back(Output::Decided {
                seq,
                requests: executed,
            });
            if seq.is_multiple_of(self.opts.checkpoint_interval) {
                let clients = self.d.clients.iter().map(|(c, s)| (*c, *s)).collect();
                self.d.own_checkpoints.insert(
                    seq,
                    OwnCheckpoint {
                        clients,
                        app: None,
                        digest: None,
                    },
                );
                self.out.push_back(Output::Checkpoint { seq });
            }
        }
    }

    // ---- checkpoints ----

    fn on_checkpoint(&mut self, c: Signed<Checkpoint>) -> Result<(), Rejected> {
        let seq = c.body.seq;
        if seq == 0 || !seq.is_multiple_of(self.opts.checkpoint_interval) {
            return Err(Rejected::BadCertificate("checkpoint off the interval"));
        }
        if seq <= self.d.low {
            return Err(Rejected::Stale("checkpoint not above the stable one"));
        }
        self.check_window(seq)?;
        let who = self.signer_id(c.signer)?;
        if self
            .d
            .checkpoint_votes
            .get(&seq)
            .is_some_and(|v| v.has(&who, &c.body.digest))
        {
            return Ok(());
        }
        self.committee.verify(self.opts.epoch, &c)?;
        let added = self
            .d
            .checkpoint_votes
            .entry(seq)
            .or_default()
            .add(who, c.clone());
        if let Err(first) = added {
            self.evidence(Evidence::Equivocation {
                first: SignedStatement::Checkpoint(*first),
                second: SignedStatement::Checkpoint(c),
            });
            return Err(Rejected::Conflicting);
        }
        self.check_stable(seq);
        Ok(())
    }

    fn check_stable(&mut self, seq: SeqNo) {
        let quorum = self.quorum();
        let Some(votes) = self.d.checkpoint_votes.get(&seq) else {
            return;
        };
        let Some(digest) = votes
            .digests()
            .into_iter()
            .find(|d| votes.count(d) >= quorum)
        else {
            return;
        };
        let proof = StableProof {
            seq,
            digest,
            signatures: votes.matching(&digest),
        };
        self.make_stable(proof);
    }

    /// Moves the low water mark to a checked stable checkpoint and truncates the log below it.
    fn make_stable(&mut self, proof: StableProof) {
        let seq = proof.seq;
        if seq <= self.d.low {
            return;
        }
        self.d.low = seq;
        self.d.stable_state =
            self.d
                .own_checkpoints
                .get(&seq)
                .and_then(|own| match (own.app, own.digest) {
                    (Some(app), Some(d)) if d == proof.digest => Some((app, own.clients.clone())),
                    _ => None,
                });
        self.d.stable = proof;
        self.d.slots.retain(|s, _| *s > seq);
        self.d.prepared.retain(|s, _| *s > seq);
        self.d.decided.retain(|s, _| *s > seq);
        self.d.checkpoint_votes.retain(|s, _| *s > seq);
        self.d.own_checkpoints.retain(|s, _| *s >= seq);
        self.d.next_seq = self.d.next_seq.max(seq.saturating_add(1));
        if self.d.last_executed < seq {
            self.fetch_behind();
        }
    }

    // ---- catching up ----

    fn on_status(
        &mut self,
        from: u32,
        view: View,
        executed: SeqNo,
        stable: SeqNo,
    ) -> Result<(), Rejected> {
        if let Some(p) = self.peers.get_mut(from as usize) {
            *p = Some(PeerStatus { executed, stable });
        }
        if view < self.d.view && self.d.changing.is_none() {
            self.send_new_view_to(from);
        }
        if stable < self.d.low {
            self.send(
                from,
                AgreementMessage::StableCheckpoint(self.d.stable.clone()),
            );
        }
        Ok(())
    }

    fn on_stable_checkpoint(&mut self, proof: StableProof) -> Result<(), Rejected> {
        if proof.seq <= self.d.low {
            return Ok(());
        }
        self.committee
            .check_stable(self.opts.epoch, &proof, self.opts.checkpoint_interval)?;
        self.make_stable(proof);
        Ok(())
    }

    /// Sends the NEW-VIEW of the current view to a member that is behind it.
    fn send_new_view_to(&mut self, to: u32) {
        if let Some((nv, batches)) = self.d.new_view.clone() {
            self.send(
                to,
                AgreementMessage::NewView {
                    new_view: nv,
                    batches,
                },
            );
        }
    }

    /// Asks a peer (one that says it is ahead, in turn) for what this member is missing.
    fn fetch_behind(&mut self) {
        let n = self.committee.len();
        if n < 2 {
            return;
        }
        let behind = self.d.last_executed;
        let ahead =
            |p: &Option<PeerStatus>| p.is_some_and(|p| p.executed > behind || p.stable > behind);
        let start = self.fetch_cursor;
        let pick = (1..=n)
            .map(|k| (start + k) % n)
            .filter(|&i| i != self.me as usize)
            .find(|&i| ahead(&self.peers[i]))
            .unwrap_or_else(|| {
                (1..=n)
                    .map(|k| (start + k) % n)
                    .find(|&i| i != self.me as usize)
                    .expect("n ≥ 2")
            });
        self.fetch_cursor = pick;
        self.send(pick as u32, AgreementMessage::Fetch { after: behind });
    }

    fn on_fetch(&mut self, from: u32, after: SeqNo) -> Result<(), Rejected> {
        if after < self.d.low {
            if let Some((app_digest, clients)) = self.d.stable_state.clone() {
                let snapshot = StateSnapshot {
                    stable: self.d.stable.clone(),
                    app_digest,
                    clients,
                };
                self.send(from, AgreementMessage::State(snapshot));
            }
        } else if self.d.low > 0 {
            // The fetcher has executed up to the stable checkpoint; it may not know it is stable
            // (its window would then refuse the batches that follow).
            self.send(
                from,
                AgreementMessage::StableCheckpoint(self.d.stable.clone()),
            );
        }
        let start = after.max(self.d.low).saturating_add(1);
        let proofs: Vec<DecidedProof> = self
            .d
            .decided
            .range(start..)
            .take(self.opts.window as usize)
            .map(|(_, p)| p.clone())
            .collect();
        if !proofs.is_empty() {
            self.send(from, AgreementMessage::Decided(proofs));
        }
        Ok(())
    }

    fn on_decided(&mut self, proofs: Vec<DecidedProof>) -> Result<(), Rejected> {
        let mut result = Ok(());
        for p in proofs {
            if p.seq <= self.d.last_executed
                || p.seq > self.high()
                || self.d.decided.contains_key(&p.seq)
            {
                continue;
            }
            match self
                .committee
                .check_decided(self.opts.epoch, &p, self.opts.max_batch)
            {
                Ok(_) => self.on_committed(p),
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        result
    }

    fn on_state(&mut self, s: StateSnapshot) -> Result<(), Rejected> {
        let seq = s.stable.seq;
        if seq <= self.d.last_executed {
            return Err(Rejected::Stale("state not newer than what was executed"));
        }
        self.committee
            .check_stable(self.opts.epoch, &s.stable, self.opts.checkpoint_interval)?;
        if s.clients.len() > MAX_CLIENTS || !s.clients.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(Rejected::BadState(
                "duplicate table not sorted or too large",
            ));
        }
        if msg::state_digest(seq, &s.app_digest, &s.clients) != s.stable.digest {
            return Err(Rejected::BadState(
                "state does not match the checkpoint digest",
            ));
        }
        self.d.last_executed = seq;
        self.d.clients = s.clients.iter().copied().collect();
        self.prune_pending();
        self.d.decided.retain(|x, _| *x > seq);
        self.out.push_back(Output::InstallState {
            seq,
            app_digest: s.app_digest,
        });
        if seq > self.d.low {
            self.make_stable(s.stable);
        }
        if seq == self.d.low && self.d.stable_state.is_none() {
            self.d.stable_state = Some((s.app_digest, s.clients));
        }
        self.execute_ready();
        Ok(())
    }

    // ---- timers ----

    fn tick(&mut self) {
        self.broadcast(AgreementMessage::Status {
            view: self.d.view,
            changing: self.d.changing.is_some(),
            executed: self.d.last_executed,
            stable: self.d.low,
        });
        if self.d.changing.is_some() {
            if let Some((vc, batches)) = self.d.view_changes.get(&self.me).cloned() {
                self.broadcast(AgreementMessage::ViewChange {
                    view_change: vc,
                    batches,
                });
            }
        } else {
            let primary = self.committee.primary(self.d.view) == self.me;
            let mut resend = Vec::new();
            for slot in self.d.slots.values() {
                if slot.committed {
                    continue;
                }
                if let (true, Some((pp, batch))) = (primary, &slot.pre_prepare) {
                    resend.push(AgreementMessage::PrePrepare {
                        pre_prepare: pp.clone(),
                        batch: batch.clone(),
                    });
                }
                if let Some(p) = &slot.sent_prepare {
                    resend.push(AgreementMessage::Prepare(p.clone()));
                }
                if let Some(c) = &slot.sent_commit {
                    resend.push(AgreementMessage::Commit(c.clone()));
                }
            }
            for m in resend {
                self.broadcast(m);
            }
        }
        // Own checkpoints not yet stable, so that every member's low water mark moves on.
        let own: Vec<Signed<Checkpoint>> = self
            .d
            .checkpoint_votes
            .values()
            .filter_map(|v| v.signed.get(&self.my_id).cloned())
            .collect();
        for c in own {
            self.broadcast(AgreementMessage::Checkpoint(c));
        }
        // Requests that still wait: to every member again.
        let half = self.opts.request_timeout_ms / 2;
        let now = self.now;
        let due: Vec<RequestKey> = self
            .arrivals
            .values()
            .filter(|k| !self.d.proposed.contains(k))
            .filter(|k| {
                self.pending
                    .get(k)
                    .is_some_and(|p| now >= p.last_sent.saturating_add(half))
            })
            .take(RESEND_PER_TICK)
            .copied()
            .collect();
        for k in due {
            if let Some(p) = self.pending.get_mut(&k) {
                p.last_sent = now;
                let r = p.req.clone();
                self.broadcast(AgreementMessage::Request(r));
            }
        }
        let behind = self.d.last_executed;
        if self
            .peers
            .iter()
            .flatten()
            .any(|p| p.executed > behind || p.stable > behind)
        {
            self.fetch_behind();
        }
    }

    // ---- view change ----

    fn start_view_change(&mut self, target: View) {
        if target <= self.d.view || self.d.changing.is_some_and(|t| target <= t) {
            return;
        }
        self.d.changing = Some(target);
        self.d.backoff = (self.d.backoff + 1).min(MAX_BACKOFF);
        self.progress_deadline = None;
        self.new_view_deadline = None;
        self.d.slots.clear();
        self.d.proposed.clear();
        let (certs, batches): (Vec<PreparedCert>, Vec<Vec<Request>>) =
            self.d.prepared.values().cloned().unzip();
        let vc = self.sign(ViewChange {
            new_view: target,
            stable: self.d.stable.clone(),
            prepared: certs,
        });
        self.d
            .view_changes
            .insert(self.me, (vc.clone(), batches.clone()));
        self.broadcast(AgreementMessage::ViewChange {
            view_change: vc,
            batches,
        });
        self.check_view_changes();
    }

    fn on_view_change(
        &mut self,
        vc: Signed<ViewChange>,
        batches: Vec<Vec<Request>>,
    ) -> Result<(), Rejected> {
        let target = vc.body.new_view;
        let signer = vc.signer;
        self.signer_id(signer)?;
        if target <= self.d.view {
            // The sender has not seen the view this member is in.
            if self.d.changing.is_none() {
                self.send_new_view_to(signer);
            }
            return Err(Rejected::Stale("view change to a view already reached"));
        }
        if self
            .d
            .view_changes
            .get(&signer)
            .is_some_and(|(held, _)| held.body.new_view >= target)
        {
            return Ok(());
        }
        self.committee.check_view_change(
            self.opts.epoch,
            &vc,
            self.opts.checkpoint_interval,
            self.opts.window,
            Some(self.prepares_needed()),
        )?;
        if batches.len() != vc.body.prepared.len() {
            return Err(Rejected::BadViewChange(
                "one batch per prepared certificate",
            ));
        }
        for (cert, batch) in vc.body.prepared.iter().zip(&batches) {
            if self.check_batch(batch)? != cert.pre_prepare.body.digest {
                return Err(Rejected::DigestMismatch);
            }
        }
        self.d.view_changes.insert(signer, (vc, batches));
        self.check_view_changes();
        Ok(())
    }

    /// The f+1 rule, the new-view timer, and the new primary's NEW-VIEW.
    fn check_view_changes(&mut self) {
        let current = self.d.changing.unwrap_or(self.d.view);
        let higher: Vec<View> = self
            .d
            .view_changes
            .iter()
            .filter(|(i, _)| **i != self.me)
            .map(|(_, (vc, _))| vc.body.new_view)
            .filter(|v| *v > current)
            .collect();
        if higher.len() > self.f() {
            // f+1 members want to leave: at least one correct one does.
            let lowest = *higher.iter().min().expect("non-empty");
            self.start_view_change(lowest);
            return;
        }
        let Some(target) = self.d.changing else {
            return;
        };
        // The timer runs once 2f+1 members are changing to this view or a later one (a member
        // that already moved further on still wants to leave this one); without such a quorum a
        // member waits, so a lonely member does not run ahead of the others.
        let leaving = self
            .d
            .view_changes
            .values()
            .filter(|(vc, _)| vc.body.new_view >= target)
            .count();
        if leaving >= self.quorum() && self.new_view_deadline.is_none() {
            self.new_view_deadline = Some(self.now.saturating_add(self.timeout()));
        }
        let exact = self
            .d
            .view_changes
            .values()
            .filter(|(vc, _)| vc.body.new_view == target)
            .count();
        if exact >= self.quorum() && self.committee.primary(target) == self.me {
            self.send_new_view(target);
        }
    }

    fn send_new_view(&mut self, target: View) {
        let chosen: Vec<(Signed<ViewChange>, Vec<Vec<Request>>)> = self
            .d
            .view_changes
            .values()
            .filter(|(vc, _)| vc.body.new_view == target)
            .take(self.quorum())
            .cloned()
            .collect();
        let refs: Vec<&Signed<ViewChange>> = chosen.iter().map(|(vc, _)| vc).collect();
        let o = msg::reissue(&refs, self.opts.window);
        let mut pre_prepares = Vec::with_capacity(o.slots.len());
        let mut batches = Vec::with_capacity(o.slots.len());
        for slot in &o.slots {
            let batch = match slot.source {
                Some((i, j)) => chosen[i].1[j].clone(),
                None => Vec::new(),
            };
            pre_prepares.push(self.sign(PrePrepare {
                view: target,
                seq: slot.seq,
                digest: slot.digest,
            }));
            batches.push(batch);
        }
        let nv = self.sign(NewView {
            view: target,
            view_changes: chosen.into_iter().map(|(vc, _)| vc).collect(),
            pre_prepares,
        });
        self.broadcast(AgreementMessage::NewView {
            new_view: nv.clone(),
            batches: batches.clone(),
        });
        self.enter_view(nv, batches, o.stable);
    }

    fn on_new_view(
        &mut self,
        nv: Signed<NewView>,
        batches: Vec<Vec<Request>>,
    ) -> Result<(), Rejected> {
        let t = nv.body.view;
        let acceptable = match self.d.changing {
            Some(target) => t >= target,
            None => t > self.d.view,
        };
        if !acceptable {
            return if t == self.d.view {
                Ok(())
            } else {
                Err(Rejected::Stale("new view not above the current one"))
            };
        }
        if nv.signer != self.committee.primary(t) {
            return Err(Rejected::NotPrimary);
        }
        self.committee.verify(self.opts.epoch, &nv)?;
        let skip = self.skip_view_change_proof();
        let needed = (!skip).then(|| self.prepares_needed());
        if nv.body.view_changes.len() > self.committee.len() {
            return Err(Rejected::BadNewView("more view changes than members"));
        }
        let mut signers = BTreeSet::new();
        for vc in &nv.body.view_changes {
            if vc.body.new_view != t {
                return Err(Rejected::BadNewView("a view change for another view"));
            }
            self.committee.check_view_change(
                self.opts.epoch,
                vc,
                self.opts.checkpoint_interval,
                self.opts.window,
                needed,
            )?;
            signers.insert(vc.signer);
        }
        if signers.len() < self.quorum() {
            return Err(Rejected::BadNewView("fewer than 2f+1 view changes"));
        }
        let refs: Vec<&Signed<ViewChange>> = nv.body.view_changes.iter().collect();
        let o = msg::reissue(&refs, self.opts.window);
        let pps = &nv.body.pre_prepares;
        if batches.len() != pps.len() {
            return Err(Rejected::BadNewView("one batch per pre-prepare"));
        }
        if skip {
            // Mutant: the primary's pre-prepares are taken as they come.
            let mut last = o.stable.seq;
            for pp in pps {
                if pp.body.seq <= last
                    || pp.body.seq > o.stable.seq.saturating_add(self.opts.window)
                {
                    return Err(Rejected::BadNewView("pre-prepares out of order"));
                }
                last = pp.body.seq;
            }
        } else {
            let same = pps.len() == o.slots.len()
                && pps
                    .iter()
                    .zip(&o.slots)
                    .all(|(pp, s)| pp.body.seq == s.seq && pp.body.digest == s.digest);
            if !same {
                return Err(Rejected::BadNewView(
                    "the pre-prepares are not the ones the view changes require",
                ));
            }
        }
        for (pp, batch) in pps.iter().zip(&batches) {
            if pp.signer != self.committee.primary(t) {
                return Err(Rejected::NotPrimary);
            }
            if pp.body.view != t {
                return Err(Rejected::BadNewView("a pre-prepare of another view"));
            }
            self.committee.verify(self.opts.epoch, pp)?;
            if self.check_batch(batch)? != pp.body.digest {
                return Err(Rejected::DigestMismatch);
            }
        }
        self.enter_view(nv, batches, o.stable);
        Ok(())
    }

    /// Starts view `nv.body.view` with the re-issued pre-prepares.
    fn enter_view(&mut self, nv: Signed<NewView>, batches: Vec<Vec<Request>>, stable: StableProof) {
        let t = nv.body.view;
        self.d.view = t;
        self.d.changing = None;
        self.new_view_deadline = None;
        self.progress_deadline = None;
        self.d.slots.clear();
        self.d.proposed.clear();
        self.d
            .view_changes
            .retain(|_, (vc, _)| vc.body.new_view > t);
        if stable.seq > self.d.low {
            self.make_stable(stable);
        }
        let reissued: Vec<(Signed<PrePrepare>, Vec<Request>)> = nv
            .body
            .pre_prepares
            .iter()
            .cloned()
            .zip(batches.iter().cloned())
            .collect();
        let top = reissued.last().map_or(0, |(pp, _)| pp.body.seq);
        self.d.next_seq = top.max(self.d.low).saturating_add(1);
        self.d.new_view = Some((nv, batches));
        let primary = self.committee.primary(t) == self.me;
        for (pp, batch) in reissued {
            let seq = pp.body.seq;
            if seq <= self.d.low || seq > self.high() {
                continue;
            }
            self.d.proposed.extend(batch.iter().map(|r| r.key()));
            self.d.slots.entry(seq).or_default().pre_prepare = Some((pp, batch));
            if !primary {
                self.send_prepare(seq);
            }
            self.check_slot(seq);
        }
        self.out.push_back(Output::EnteredView { view: t });
        if !primary {
            // Hand the new primary what is still waiting.
            let waiting: Vec<Request> = self
                .arrivals
                .values()
                .filter(|k| !self.d.proposed.contains(k))
                .filter_map(|k| self.pending.get(k))
                .map(|p| p.req.clone())
                .take(RESEND_PER_TICK)
                .collect();
            let to = self.committee.primary(t);
            for r in waiting {
                self.send(to, AgreementMessage::Request(r));
            }
        }
        if self.d.last_executed < self.d.low {
            self.fetch_behind();
        }
    }
}
