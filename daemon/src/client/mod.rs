//! [`DbqsClient`]: the async dBQS client over QUIC, driving the core's sans-IO [`Client`].
//!
//! Goals:
//! - One task owns the core client. Callers submit operations through a channel and await a
//!   oneshot per operation; every `Send` the core asks for becomes a spawned request on the
//!   transport whose response is fed back to the core; a timer wakes the core at `next_timeout`.
//! - Operations end in a typed [`ClientError`], never a hang: the core gives up after the
//!   operation timeout.
//! - Node status queries for `dbqsfs status` ([`DbqsClient::node_status`]).
//!
//! Non-goals: protocol decisions (quorums, retries and epochs are the core's), chunking of large
//! files (the CLI does it), caching.

use crate::control::{ControlMessage, GcStatus, SpaceStatus, TransferStatus};
use dbqsfs_core::config::{
    CertifiedConfig, ConfigChain, ConfigError, Configuration, Epoch, Freshness, Member,
};
use dbqsfs_core::crypto::{Keypair, NodeId, ObjectId};
use dbqsfs_core::dbqs::client::{
    Client, ClientOptions, ClientOutput, OpError, OpId, Operation, Outcome,
};
use dbqsfs_core::dbqs::msg::Reject;
use dbqsfs_core::dbqs::refs::RefRecord;
use dbqsfs_core::ms::pieces::PieceError;
use dbqsfs_core::ms::wire::{MsMessage, MsStatus};
use dbqsfs_core::object::{PkBlock, Stamp};
use dbqsfs_core::wire::{decode, encode_msg};
use dbqsfs_net::{local_bind_for, Endpoint, NetError, TransportOptions};
use ed25519_dalek::VerifyingKey;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

mod whole;
pub use whole::{fetch_whole, WHOLE_DEADLINE};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Op(#[from] OpError),
    #[error("the client's driver task has stopped")]
    Closed,
    #[error("transport: {0}")]
    Net(#[from] NetError),
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("the cluster has no members")]
    NoMembers,
    #[error("member address {0:?} is not an IP:port")]
    BadAddress(String),
    #[error("member key is not a valid ed25519 key")]
    BadMemberKey,
    #[error("the node's answer is not a status: {0}")]
    BadStatus(String),
    #[error("unexpected outcome {0:?}")]
    Unexpected(Box<Outcome>),
    #[error("whole configuration: {0}")]
    Whole(#[from] PieceError),
    #[error("whole configuration: no member gave a head of epoch {0} that verifies ({1}); the members may not hold that epoch yet, try again later")]
    NoHead(Epoch, String),
}

/// Options of a [`DbqsClient`].
#[derive(Clone, Debug)]
pub struct DbqsClientOptions {
    /// Resend unanswered requests after this long.
    pub retransmit: Duration,
    /// Give up on an operation after this long.
    pub op_timeout: Duration,
    pub transport: TransportOptions,
    /// Use a configuration only while holding a freshness certificate of it younger than the
    /// configuration's `freshness_ms` (docs/DESIGN.md §3); off only for tools that must work without an MS.
    pub freshness: bool,
}

impl Default for DbqsClientOptions {
    fn default() -> Self {
        DbqsClientOptions {
            retransmit: Duration::from_secs(2),
            op_timeout: Duration::from_secs(30),
            transport: TransportOptions {
                request_timeout: Duration::from_secs(10),
                connect_timeout: Duration::from_secs(3),
                ..TransportOptions::default()
            },
            freshness: true,
        }
    }
}

/// A node's answer to a status request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub epoch: u64,
    pub stored_bytes: u64,
    pub objects: u64,
    pub ready: bool,
    /// State transfers running, then the last few completed.
    pub transfers: Vec<TransferStatus>,
    /// Garbage collection of lost ranges, per epoch that lost some.
    pub gc: Vec<GcStatus>,
    /// Free space of the node's store.
    pub space: SpaceStatus,
}

/// What the driver task takes: operations, and configurations or freshness certificates learned
/// elsewhere.
enum Input {
    Op(Operation, oneshot::Sender<Outcome>),
    Learn(Vec<CertifiedConfig>, Option<Freshness>),
}

/// An async dBQS client. Cheap to clone; all clones share one driver task, which stops when the
/// last clone is dropped.
#[derive(Clone)]
pub struct DbqsClient {
    /// The client's own key, which holds what [`DbqsClient::put_content`] stores.
    owner: Owner,
    submit: mpsc::Sender<Input>,
    endpoint: Endpoint,
    /// The newest verified configurations the driver knows.
    chain: Arc<Mutex<ConfigChain>>,
    /// Requests sent and not answered yet (an operation completes with a quorum; the rest of
    /// its group may still be on the way).
    in_flight: tokio::sync::watch::Sender<usize>,
}

fn member_addr(m: &Member) -> Result<(SocketAddr, VerifyingKey), ClientError> {
    let addr = m
        .addr
        .parse()
        .map_err(|_| ClientError::BadAddress(m.addr.clone()))?;
    let key = VerifyingKey::from_bytes(&m.key.0).map_err(|_| ClientError::BadMemberKey)?;
    Ok((addr, key))
}

impl DbqsClient {
    /// A client with key `key` that trusts `genesis` (and verifies any newer configuration
    /// against it). Must be called inside a tokio runtime.
    pub fn connect(
        genesis: CertifiedConfig,
        key: Keypair,
        opts: DbqsClientOptions,
    ) -> Result<DbqsClient, ClientError> {
        let chain = ConfigChain::new(genesis)?;
        let first = chain
            .config()
            .members
            .first()
            .ok_or(ClientError::NoMembers)?;
        let (addr, _) = member_addr(first)?;
        let endpoint = Endpoint::client(
            local_bind_for(addr),
            key.dalek().clone(),
            opts.transport.clone(),
        )?;
        let owner = Owner::new(key.clone());
        let lease = opts.freshness.then_some(chain.config().params.freshness_ms);
        // The struct update is needed when core's `mutants` feature adds a field (workspace builds).
        #[allow(clippy::needless_update)]
        let core = Client::new(
            key.node_id(),
            chain.clone(),
            ClientOptions {
                retransmit_ms: opts.retransmit.as_millis() as u64,
                op_timeout_ms: Some(opts.op_timeout.as_millis() as u64),
                // A fresh random start, so late replies to an earlier run of this client (same key)
                // can never match a request of this one.
                first_request_id: random_u64(),
                freshness_lease_ms: lease,
                ..ClientOptions::default()
            },
        );
        let (tx, rx) = mpsc::channel(256);
        let chain = Arc::new(Mutex::new(chain));
        let in_flight = tokio::sync::watch::Sender::new(0);
        tokio::spawn(drive(
            core,
            endpoint.clone(),
            rx,
            chain.clone(),
            in_flight.clone(),
        ));
        Ok(DbqsClient {
            owner,
            submit: tx,
            endpoint,
            chain,
            in_flight,
        })
    }

    /// Waits, at most `max`, until every request sent has been answered or failed: operations
    /// complete with a quorum of their group, and a process that exits right after would cut
    /// off the requests to the rest (a command line tool calls this before it exits, so that
    /// every replica it can reach learns, say, a release).
    pub async fn settle(&self, max: Duration) {
        let mut rx = self.in_flight.subscribe();
        let _ = tokio::time::timeout(max, rx.wait_for(|n| *n == 0)).await;
    }

    /// The newest verified configurations the client knows.
    pub fn chain(&self) -> ConfigChain {
        self.chain.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the members of the newest known configuration for newer configurations (verified
    /// from genesis before use) until one answers; returns the newest chain. Also learns the
    /// freshest freshness certificate offered. A configuration too large for an answer is
    /// fetched whole, in pieces ([`fetch_whole`]).
    pub async fn refresh(&self) -> ConfigChain {
        let mut chain = self.chain();
        let mut freshest: Option<Freshness> = None;
        // Members of each newer configuration learned are asked in turn (bounded).
        for _ in 0..8 {
            let before = chain.epoch();
            let answers = ask_chain(&self.endpoint, chain.config(), before).await;
            let newest = answers.iter().map(|a| a.2).max().unwrap_or(before);
            for (configs, freshness, _) in answers {
                let _ = chain.extend(configs);
                if let Some(f) = freshness {
                    if freshest
                        .as_ref()
                        .is_none_or(|c| (f.epoch, f.time_ms) > (c.epoch, c.time_ms))
                    {
                        freshest = Some(f);
                    }
                }
            }
            if chain.epoch() == before {
                // An answer holds what fits in one message: a configuration too large for it
                // comes whole, in pieces, when a member says it holds a newer epoch (unverified:
                // only a reason to try, once a round).
                if newest <= before {
                    break;
                }
                match fetch_whole(&self.endpoint, chain.config(), |_, _| {}).await {
                    Ok(cc) => {
                        let _ = chain.extend(vec![cc]);
                    }
                    Err(e) => {
                        debug!(epoch = before + 1, error = %e, "whole configuration not fetched");
                        break;
                    }
                }
            }
        }
        let newer = chain.after(self.chain().epoch(), usize::MAX);
        let _ = self.submit.send(Input::Learn(newer, freshest)).await;
        *self.chain.lock().unwrap_or_else(|p| p.into_inner()) = chain.clone();
        chain
    }

    /// Asks member `m` for its view of the Membership Service.
    pub async fn ms_status(&self, m: &Member) -> Result<MsStatus, ClientError> {
        let (addr, key) = member_addr(m)?;
        let req = encode_msg(self.chain().epoch(), MsMessage::StatusRequest);
        let resp = self.endpoint.request(addr, &key, &req).await?;
        match decode::<MsMessage>(&resp)
            .map_err(|e| ClientError::BadStatus(e.to_string()))?
            .msg
        {
            MsMessage::Status(s) => Ok(*s),
            other => Err(ClientError::BadStatus(format!("{other:?}"))),
        }
    }

    async fn run(&self, op: Operation) -> Result<Outcome, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.submit
            .send(Input::Op(op, tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        match rx.await.map_err(|_| ClientError::Closed)? {
            Outcome::Failed(e) => Err(e.into()),
            other => Ok(other),
        }
    }

    /// The client's own key as an owner of blocks.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// Stores a content block (at most [`dbqsfs_core::object::MAX_BLOCK`] bytes) held by the
    /// client's own key; returns its id.
    pub async fn put_content(&self, data: Vec<u8>) -> Result<ObjectId, ClientError> {
        self.put_as(&self.owner, data).await
    }

    /// Stores a content block held by `owner` (its signed hold, numbered by `owner`); returns
    /// its id. A put that meets a newer release of the same owner (its numbering went back, say
    /// a clock on another host) jumps the numbering ahead and puts again.
    pub async fn put_as(&self, owner: &Owner, data: Vec<u8>) -> Result<ObjectId, ClientError> {
        let id = dbqsfs_core::object::content_id(&data);
        let mut tries = 0;
        loop {
            let hold = RefRecord::hold(&owner.key, id, owner.next());
            let op = Operation::PutContent {
                data: data.clone(),
                hold,
            };
            match self.run(op).await {
                Ok(Outcome::ContentStored { id }) => return Ok(id),
                Ok(other) => return Err(ClientError::Unexpected(Box::new(other))),
                Err(ClientError::Op(OpError::Refused(Reject::Superseded))) if tries < 3 => {
                    tries += 1;
                    owner.jump();
                    warn!(block = %id.short(), "a put met a newer release of the same owner: numbering ahead");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Releases `owner`'s hold on content block `id` at a quorum of its group: once every owner
    /// released a block, its replicas delete it after their grace period.
    pub async fn release_as(&self, owner: &Owner, id: ObjectId) -> Result<(), ClientError> {
        let record = RefRecord::release(&owner.key, id, owner.next());
        match self.run(Operation::Reference { record }).await? {
            Outcome::RefStored { .. } => Ok(()),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Sends a reference record as it is: forged, replayed or in another's name. A Byzantine
    /// client, for tests; built only with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    pub async fn send_reference(&self, record: RefRecord) -> Result<(), ClientError> {
        match self.run(Operation::Reference { record }).await? {
            Outcome::RefStored { .. } => Ok(()),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// The verified bytes of content block `id`; `None` when a quorum says it is absent.
    pub async fn get_content(&self, id: ObjectId) -> Result<Option<Vec<u8>>, ClientError> {
        match self.run(Operation::GetContent { id }).await? {
            Outcome::Content { data, .. } => Ok(data),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Writes `value` to `owner`'s public-key block `label`; `version: None` writes the version
    /// after the highest one found.
    pub async fn put_pk(
        &self,
        owner: &Keypair,
        label: &[u8],
        value: Vec<u8>,
        version: Option<u64>,
    ) -> Result<Stamp, ClientError> {
        let op = Operation::PutPk {
            owner: Box::new(owner.clone()),
            label: label.to_vec(),
            value,
            version,
        };
        match self.run(op).await? {
            Outcome::PkStored { stamp } => Ok(stamp),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// The latest value of public-key block `id` (atomic read).
    pub async fn get_pk(&self, id: ObjectId) -> Result<Option<PkBlock>, ClientError> {
        match self.run(Operation::GetPk { id }).await? {
            Outcome::Pk { block } => Ok(block),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Asks member `m` for its status (one request, bounded by the transport's timeouts).
    pub async fn node_status(&self, m: &Member) -> Result<NodeStatus, ClientError> {
        let (addr, key) = member_addr(m)?;
        let req = encode_msg(self.chain().epoch(), ControlMessage::StatusRequest);
        let resp = self.endpoint.request(addr, &key, &req).await?;
        match decode::<ControlMessage>(&resp)
            .map_err(|e| ClientError::BadStatus(e.to_string()))?
            .msg
        {
            ControlMessage::Status {
                epoch,
                stored_bytes,
                objects,
                ready,
                transfers,
                gc,
                space,
            } => Ok(NodeStatus {
                epoch,
                stored_bytes,
                objects,
                ready,
                transfers,
                gc,
                space,
            }),
            other => Err(ClientError::BadStatus(format!("{other:?}"))),
        }
    }
}

/// The driver task: owns the core client.
/// A key that holds the content blocks it stores (`dbqs::refs`), and the numbering of its holds
/// and releases: each later hold or release of one block needs a higher number. Clones share the
/// numbering.
#[derive(Clone)]
pub struct Owner {
    key: Keypair,
    seq: Arc<std::sync::atomic::AtomicU64>,
}

impl Owner {
    /// Numbers from the time now in microseconds, counting up: a later process of the same key
    /// orders after this one as long as the clocks it runs on do not go back (if one does, the
    /// replicas say so and [`DbqsClient::put_as`] jumps ahead).
    pub fn new(key: Keypair) -> Owner {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Owner {
            key,
            seq: Arc::new(std::sync::atomic::AtomicU64::new(micros)),
        }
    }

    pub fn key(&self) -> &Keypair {
        &self.key
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// About twelve days of microseconds ahead: past any clock skew between hosts.
    fn jump(&self) {
        self.seq
            .fetch_add(1 << 40, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Counts a request out of [`DbqsClient::settle`]'s count when its task ends, however it ends.
struct InFlight(tokio::sync::watch::Sender<usize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

async fn drive(
    mut core: Client,
    endpoint: Endpoint,
    mut submissions: mpsc::Receiver<Input>,
    latest: Arc<Mutex<ConfigChain>>,
    in_flight: tokio::sync::watch::Sender<usize>,
) {
    // The core's clock is wall-clock milliseconds (freshness certificates carry wall-clock time),
    // advanced monotonically from the start.
    let start = Instant::now();
    let start_ms = unix_ms();
    let now = move || start_ms + start.elapsed().as_millis() as u64;
    // Freshness: fetched at once when the core asks, and ahead of expiry in the background.
    let (learn_tx, mut learned) =
        mpsc::unbounded_channel::<(Vec<CertifiedConfig>, Option<Freshness>)>();
    let refresh_every =
        Duration::from_millis((core.config().params.freshness_ms / 4).clamp(200, 2_000));
    let mut next_refresh = Instant::now();
    let mut refreshing = false;
    // Answers, and `None` for a request that failed in transport.
    let (resp_tx, mut responses) = mpsc::unbounded_channel::<(NodeId, Option<Vec<u8>>)>();
    let mut waiting: HashMap<OpId, oneshot::Sender<Outcome>> = HashMap::new();
    // Misbehaviour seen per replica since it was last logged, and when that was.
    let mut misbehaved: HashMap<NodeId, (u64, Option<Instant>)> = HashMap::new();
    let mut open = true;
    loop {
        while let Some(out) = core.poll_output() {
            match out {
                ClientOutput::Send { to, bytes } => {
                    let Some(m) = core.config().member(&to) else {
                        debug!(to = %to.short(), "send to an unknown member skipped");
                        continue;
                    };
                    let (addr, key) = match member_addr(m) {
                        Ok(x) => x,
                        Err(e) => {
                            warn!(to = %to.short(), error = %e, "member unreachable by configuration");
                            continue;
                        }
                    };
                    let endpoint = endpoint.clone();
                    let resp_tx = resp_tx.clone();
                    in_flight.send_modify(|n| *n += 1);
                    let done = InFlight(in_flight.clone());
                    tokio::spawn(async move {
                        let _done = done;
                        match endpoint.request_shared(addr, &key, bytes).await {
                            Ok(resp) => {
                                let _ = resp_tx.send((to, Some(resp)));
                            }
                            // The expected answer to one-way configuration pushes.
                            Err(NetError::NoResponse) => {}
                            Err(e) => {
                                debug!(to = %to.short(), %addr, error = %e, "request failed");
                                let _ = resp_tx.send((to, None));
                            }
                        }
                    });
                }
                ClientOutput::Done { op, outcome } => {
                    if let Some(tx) = waiting.remove(&op) {
                        let _ = tx.send(outcome);
                    }
                }
                ClientOutput::Misbehaviour { from, what } => {
                    crate::metrics::misbehaviour(what);
                    // Once per replica every 10 s, with a count: a lying replica answers every
                    // request, and a line each would flood the log.
                    let (count, last) = misbehaved.entry(from).or_insert((0, None));
                    *count += 1;
                    if last.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
                        warn!(node = %from.short(), what, times = *count, "replica misbehaved");
                        *count = 0;
                        *last = Some(Instant::now());
                    }
                }
                ClientOutput::EpochChanged { epoch } => {
                    info!(epoch, "client moved to a new epoch");
                    *latest.lock().unwrap_or_else(|p| p.into_inner()) = core.chain().clone();
                }
                ClientOutput::NeedFreshness { epoch } => {
                    debug!(epoch, "operations wait for a freshness certificate");
                    next_refresh = Instant::now();
                }
            }
        }
        if !open && waiting.is_empty() {
            break;
        }
        if core.config().params.freshness_ms > 0 && !refreshing && Instant::now() >= next_refresh {
            refreshing = true;
            next_refresh = Instant::now() + refresh_every;
            let endpoint = endpoint.clone();
            let config = core.config().clone();
            let tx = learn_tx.clone();
            tokio::spawn(async move {
                let answers = ask_chain(&endpoint, &config, config.epoch).await;
                let mut configs = Vec::new();
                let mut fresh = None;
                let mut newest = config.epoch;
                for (c, f, n) in answers {
                    if c.len() > configs.len() {
                        configs = c;
                    }
                    fresh = fresh.or(f);
                    newest = newest.max(n);
                }
                if configs.is_empty() && newest > config.epoch {
                    // Too large for an answer: the next configuration comes whole, in pieces.
                    match fetch_whole(&endpoint, &config, |_, _| {}).await {
                        Ok(cc) => configs.push(cc),
                        Err(e) => debug!(error = %e, "whole configuration not fetched"),
                    }
                }
                let _ = tx.send((configs, fresh));
            });
        }
        let deadline = core
            .next_timeout()
            .map(|t| start + Duration::from_millis(t.saturating_sub(start_ms)));
        tokio::select! {
            sub = submissions.recv(), if open => match sub {
                Some(Input::Op(op, tx)) => {
                    let id = core.submit(now(), op);
                    waiting.insert(id, tx);
                }
                Some(Input::Learn(configs, fresh)) => learn(&mut core, now(), configs, fresh, &latest),
                None => open = false,
            },
            Some((configs, fresh)) = learned.recv() => {
                refreshing = false;
                learn(&mut core, now(), configs, fresh, &latest);
            }
            _ = tokio::time::sleep_until(next_refresh), if !refreshing => {}
            Some((from, resp)) = responses.recv() => match resp {
                Some(bytes) => core.handle_message(now(), from, &bytes),
                None => core.peer_failed(now(), from),
            },
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await },
                if deadline.is_some() => core.handle_timeout(now()),
        }
    }
}

/// Feeds configurations and a freshness certificate learned elsewhere to the core.
fn learn(
    core: &mut Client,
    now: u64,
    configs: Vec<CertifiedConfig>,
    fresh: Option<Freshness>,
    latest: &Mutex<ConfigChain>,
) {
    if !configs.is_empty() {
        if let Err(e) = core.learn_configs(now, configs) {
            debug!(error = %e, "learned configurations refused");
        }
        *latest.lock().unwrap_or_else(|p| p.into_inner()) = core.chain().clone();
    }
    if let Some(f) = fresh {
        if let Err(e) = core.learn_freshness(now, f) {
            debug!(error = %e, "freshness certificate refused");
        }
    }
}

/// Asks `config`'s members for the configurations after `epoch`, the freshest freshness
/// certificate and the newest epoch each holds: committee members first (they issue freshness). Returns once every member answered
/// or failed, or once `2f+1` answered and the others had twice the time those took (20 ms to
/// 500 ms) more, so a dead or silent member costs a refresh a short hedge instead of the 3 s
/// request timeout. Untrusted: the caller verifies.
async fn ask_chain(
    endpoint: &Endpoint,
    config: &Configuration,
    epoch: Epoch,
) -> Vec<(Vec<CertifiedConfig>, Option<Freshness>, Epoch)> {
    let req = encode_msg(epoch, MsMessage::ChainAfter { epoch });
    let mut members: Vec<&Member> = config.members.iter().collect();
    members.sort_by_key(|m| !config.committee.contains(&m.id));
    let mut asks = tokio::task::JoinSet::new();
    for (addr, key) in members.into_iter().filter_map(|m| member_addr(m).ok()) {
        let endpoint = endpoint.clone();
        let req = req.clone();
        asks.spawn(async move {
            let resp =
                tokio::time::timeout(Duration::from_secs(3), endpoint.request(addr, &key, &req))
                    .await
                    .ok()?
                    .ok()?;
            match decode::<MsMessage>(&resp).ok()?.msg {
                MsMessage::Chain {
                    configs,
                    freshness,
                    newest,
                } => Some((configs, freshness, newest)),
                _ => None,
            }
        });
    }
    let need = config.quorum().quorum().min(asks.len());
    let started = tokio::time::Instant::now();
    let mut stop_at = None;
    let mut answers = Vec::new();
    loop {
        let next = match stop_at {
            None => asks.join_next().await,
            Some(at) => match tokio::time::timeout_at(at, asks.join_next()).await {
                Ok(next) => next,
                Err(_) => break, // the stragglers are dropped with the set
            },
        };
        let Some(done) = next else { break };
        if let Ok(Some(a)) = done {
            answers.push(a);
        }
        if stop_at.is_none() && answers.len() >= need {
            let grace = (started.elapsed() * 2)
                .clamp(Duration::from_millis(20), Duration::from_millis(500));
            stop_at = Some(tokio::time::Instant::now() + grace);
        }
    }
    answers
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Without OS randomness, fall back to the clock: still distinct between runs.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}
