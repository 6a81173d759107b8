//! The Membership Service as a node runs it (DESIGN §3): the epoch follower on every node, and the
//! committee role on the members of the current epoch's committee.
//!
//! Goals:
//! - **Follower** (every node). Configurations arrive pushed along a tree computed from the newest
//!   configuration ([`push_children`]) and are pulled every [`MsOptions::pull`] from a random member
//!   among the healthiest ([`Health`]: a member whose request failed or timed out, [`PULL_TIMEOUT`],
//!   is asked last until it answers again or its penalty decays, and a failed pull is retried at
//!   once elsewhere rather than a period later), or, for a node that is joining, from the peer it
//!   was told to join through. Every configuration
//!   is verified against the chain from the genesis configuration, persisted, and only then used
//!   ([`Epochs::install`]).
//! - **Committee role** (members of the current committee). Runs the core's PBFT
//!   ([`dbqsfs_core::ms::pbft::Agreement`]) over QUIC and executes the agreed operations with the
//!   core's [`Membership`]; probes every member every `probe_ms` with a nonce that the member must
//!   sign ([`MsMessage::Challenge`]) and submits its verdict when it changes (unresponsive after
//!   `evict_after_probes` failed probes in a row); submits `EndEpoch` when the epoch timer fires;
//!   turns agreement evidence into `Misbehaviour` operations; signs the next configuration when its
//!   epoch ends and collects `2f_ms+1` signatures into the certificate; signs a freshness share
//!   every third of `freshness_ms` and assembles freshness certificates.
//! - **Submissions** (any node): joins (`dbqsfs node --join`), leaves (`dbqsfs leave`), and the
//!   committee's own reports go out one at a time (the agreement executes a client's requests in
//!   order and drops overtaken ones), resent until executed or their epoch is over.
//!
//! Non-goals: protocol decisions (the core makes them), state transfer (the transfer worker reacts
//! to installed epochs on its own). A committee member persists what the agreement
//! must not forget ([`Output::Persist`]: written to the node's store, with the batches it
//! executed, before any message after it is sent) and, restarted in the same epoch, takes the
//! agreement up again from it ([`Agreement::restore`], the MS state replayed from the batches), so
//! epochs go on after a restart of any number of members. A member whose state cannot be read or
//! written sits that epoch's agreement out rather than risk signing twice.
//!
//! Fault model: every message comes from the network and is checked before use; a Byzantine peer
//! can delay or refuse, never forge: configurations and freshness certificates are self-certifying,
//! probe answers are signatures over our nonce, agreement messages are checked by the core.

use crate::epochs::{Epochs, Peer};
use crate::store::DiskStore;
use dbqsfs_core::config::{CertifiedConfig, Configuration, Epoch, Freshness, Member};
use dbqsfs_core::crypto::{Domain, Keypair, NodeId, PublicKey, Signature};
use dbqsfs_core::dbqs::health::Health;
use dbqsfs_core::ms::app::{op_epoch, App};
use dbqsfs_core::ms::membership::{AdmissionCert, Executed, Membership, MsOp};
use dbqsfs_core::ms::pbft::{
    Agreement, Digest, Options as AgreementOptions, Output, Request, SeqNo, View,
};
pub use dbqsfs_core::ms::probe::probe_body;
use dbqsfs_core::ms::probe::{probe_timeout_ms, Prober};
use dbqsfs_core::ms::shares::{FreshnessShares, NextConfig};
pub use dbqsfs_core::ms::tree::push_children;
use dbqsfs_core::ms::tree::tree_order;
pub use dbqsfs_core::ms::wire::{is_ms, MsMessage, MsStatus};
use dbqsfs_core::wire::{decode, encode_msg};
use dbqsfs_net::Endpoint;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How long a pull or batch fetch may take before it counts as failed.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(3);
/// Failed pulls retried at once, elsewhere, between two periodic pulls.
const PULL_RETRIES: u32 = 2;
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
    pub key: Keypair,
    pub admission_key: PublicKey,
    /// The address this node listens on (as members are told to reach it).
    pub listen: SocketAddr,
    pub store: Arc<DiskStore>,
    pub epochs: Arc<Epochs>,
}

/// The handle through which the node feeds the MS task.
#[derive(Clone)]
pub struct MsHandle {
    tx: mpsc::Sender<Inbound>,
    shared: Arc<MsContext>,
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
    };
    let task = Task::new(shared, endpoint, opts, tx);
    (handle, tokio::spawn(task.run(rx)))
}

/// Answers the MS messages that need no task state, forwards the others. `peer` is the sender's
/// key, `kind` what it is to us.
pub async fn serve(ms: &MsHandle, peer: PublicKey, kind: Peer, bytes: &[u8]) -> Option<Vec<u8>> {
    let shared = &ms.shared;
    let env = match decode::<MsMessage>(bytes) {
        Ok(env) => env,
        Err(e) => {
            debug!(peer = %peer.node_id().short(), error = %e, "undecodable MS message");
            return None;
        }
    };
    let epoch = shared.epochs.epoch();
    let allowed = match (&env.msg, kind) {
        (_, Peer::Member | Peer::Myself) => true,
        (MsMessage::StatusRequest | MsMessage::ChainAfter { .. }, Peer::Client) => true,
        // A stranger may learn the configurations and ask to join, nothing else.
        (MsMessage::ChainAfter { .. } | MsMessage::Submit(_), _) => true,
        _ => false,
    };
    if !allowed {
        let reason = "not a member of this cluster".to_string();
        return Some(encode_msg(epoch, MsMessage::Refused { reason }));
    }
    let answer = match env.msg {
        MsMessage::Challenge { epoch: e, nonce } => Some(MsMessage::ChallengeAnswer {
            sig: shared
                .key
                .sign(Domain::Probe, &probe_body(e, &nonce, &peer.node_id())),
        }),
        MsMessage::ChainAfter { epoch: after } => Some(MsMessage::Chain {
            configs: shared.epochs.chain().after(after, MAX_CONFIGS),
            freshness: shared.epochs.freshness(),
        }),
        MsMessage::Push { configs, freshness } => {
            if let Some(f) = freshness {
                shared.epochs.learn_freshness(f);
            }
            if !configs.is_empty() {
                let s = shared.clone();
                let from = peer.node_id();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = s.epochs.install(configs) {
                        debug!(peer = %from.short(), error = %e, "refused pushed configurations");
                    }
                })
                .await
                .ok()?;
            }
            None
        }
        MsMessage::Leave if kind != Peer::Myself => Some(MsMessage::Refused {
            reason: "only the node's own key may ask it to leave".into(),
        }),
        msg @ (MsMessage::Submit(_)
        | MsMessage::ConfigShare { .. }
        | MsMessage::FreshShare { .. }
        | MsMessage::Batches { .. }
        | MsMessage::StatusRequest
        | MsMessage::Leave) => ms.ask(peer, msg).await,
        MsMessage::ChallengeAnswer { .. }
        | MsMessage::Chain { .. }
        | MsMessage::BatchLog { .. }
        | MsMessage::Status(_)
        | MsMessage::Leaving { .. }
        | MsMessage::Refused { .. } => None,
    };
    answer.map(|m| encode_msg(epoch, m))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    if getrandom::fill(&mut b).is_err() {
        // Without OS randomness: the clock, hashed (a probe nonce only needs to be fresh).
        b = *blake3::hash(&unix_ms().to_le_bytes()).as_bytes();
    }
    b
}

fn member_target(m: &Member) -> Option<(SocketAddr, VerifyingKey)> {
    Some((
        m.addr.parse().ok()?,
        VerifyingKey::from_bytes(&m.key.0).ok()?,
    ))
}

/// The agreement and MS state of one epoch at a committee member.
struct Role {
    epoch: Epoch,
    config: Configuration,
    /// `None` while sitting this epoch's agreement out.
    agreement: Option<Agreement>,
    /// The MS application: the batches executed, their digests, the membership state.
    app: App,
    /// How many of the app's batches are persisted (with the agreement's state, [`Output::Persist`]).
    saved_batches: usize,
    /// Waiting for the batches up to a stable checkpoint: outputs are queued meanwhile.
    installing: Option<(SeqNo, Digest)>,
    queued: VecDeque<Output>,
    /// The next configuration's certificate, collected once the epoch ended here.
    next: NextConfig,
    fresh: FreshnessShares,
    probes: Prober,
    next_probe: Instant,
    next_fresh: Instant,
    end_at: Instant,
}

/// One outstanding submission of this node.
struct Outstanding {
    op: MsOp,
    req: Request,
    sent: Option<Instant>,
}

struct Task {
    shared: Arc<MsContext>,
    endpoint: Endpoint,
    opts: MsOptions,
    tx: mpsc::Sender<Inbound>,
    start: Instant,
    epoch: Epoch,
    entered: Instant,
    role: Option<Role>,
    /// Operations to submit, one at a time.
    outbox: VecDeque<MsOp>,
    outstanding: Option<Outstanding>,
    last_seq: u64,
    leaving: bool,
    next_pull: Instant,
    last_view_change: Option<(Epoch, View)>,
    /// How the members this node pulls from answered lately.
    health: Health,
    /// The member of the last random pull, until it answers or fails.
    pulling: Option<NodeId>,
    /// Pulls retried at once since the last periodic one (at most [`PULL_RETRIES`]).
    pull_retries: u32,
}

impl Task {
    fn new(
        shared: Arc<MsContext>,
        endpoint: Endpoint,
        opts: MsOptions,
        tx: mpsc::Sender<Inbound>,
    ) -> Task {
        let now = Instant::now();
        Task {
            epoch: shared.epochs.epoch(),
            shared,
            endpoint,
            opts,
            tx,
            start: now,
            entered: now,
            role: None,
            outbox: VecDeque::new(),
            outstanding: None,
            last_seq: 0,
            leaving: false,
            next_pull: now,
            last_view_change: None,
            health: Health::new(),
            pulling: None,
            pull_retries: 0,
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Inbound>) {
        self.enter_epoch();
        let mut tick = tokio::time::interval(self.opts.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sampled = Instant::now();
        crate::metrics::ms(&self.status());
        loop {
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => self.on_input(input),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
            }
            if sampled.elapsed() >= crate::metrics::MS_SAMPLE_EVERY {
                crate::metrics::ms(&self.status());
                sampled = Instant::now();
            }
            if self.shared.epochs.epoch() != self.epoch {
                self.forward_new_configs();
                self.enter_epoch();
            }
            self.drain();
        }
    }

    /// Passes the configurations installed since our last epoch down the push tree of the newest
    /// one (whatever their source: a push, a pull, or our own certificate).
    fn forward_new_configs(&self) {
        let chain = self.shared.epochs.chain();
        let configs = chain.after(self.epoch, MAX_CONFIGS);
        if configs.is_empty() {
            return;
        }
        let children = push_children(chain.config(), &self.shared.key.node_id());
        self.send_all(
            children,
            MsMessage::Push {
                configs,
                freshness: None,
            },
        );
    }

    /// Sets up the role for the newest installed epoch.
    fn enter_epoch(&mut self) {
        let chain = self.shared.epochs.chain();
        let config = chain.config().clone();
        let changed = config.epoch != self.epoch || self.role.is_none();
        self.epoch = config.epoch;
        self.entered = Instant::now();
        // Operations of an older epoch are void; what we still want is queued again.
        self.outbox
            .retain(|op| op_epoch(op).is_none_or(|e| e == config.epoch));
        if self
            .outstanding
            .as_ref()
            .is_some_and(|o| op_epoch(&o.op).is_some_and(|e| e != config.epoch))
        {
            self.outstanding = None;
        }
        let me = self.shared.key.node_id();
        let member = config.is_member(&me);
        if let Some(cert) = &self.opts.join {
            if member {
                info!(epoch = config.epoch, "this node is a member");
                self.opts.join = None;
            } else if !self.queued_kind(|op| matches!(op, MsOp::Join { .. })) {
                let addr = self.shared.listen.to_string();
                self.outbox.push_back(MsOp::Join {
                    epoch: config.epoch,
                    member: Member::new(self.shared.key.public(), addr),
                    cert: cert.clone(),
                });
            }
        }
        if self.leaving && member && !self.queued_kind(|op| matches!(op, MsOp::Leave { .. })) {
            self.outbox.push_back(MsOp::Leave {
                epoch: config.epoch,
            });
        }
        if !changed {
            return;
        }
        // Probe failures carry over from the epoch before (when this node probed in it too): a
        // count that restarted at every epoch could never reach `evict_after_probes` when an
        // epoch holds fewer probe rounds than that, and a dead member would never be evicted.
        let carried = self.role.take().map(|r| r.probes);
        if !config.committee.contains(&me) {
            return;
        }
        let keys: Vec<PublicKey> = config
            .committee
            .iter()
            .filter_map(|id| config.member(id).map(|m| m.key))
            .collect();
        #[allow(clippy::needless_update)]
        let opts = AgreementOptions {
            epoch: config.epoch,
            request_timeout_ms: 2_000,
            ..AgreementOptions::default()
        };
        let max_batch = opts.max_batch;
        let ms = Membership::new(config.clone(), self.shared.admission_key, max_batch);
        // The agreement starts afresh, or from what this member persisted in this epoch before
        // a restart (everything it signed was persisted before it was sent).
        let restored = self.restore_agreement(&config, keys, opts, &ms);
        let (agreement, app) = match restored {
            Ok(r) => r,
            Err(why) => {
                warn!(
                    epoch = config.epoch,
                    "{why}: sitting this epoch's agreement out"
                );
                (None, None)
            }
        };
        let now = Instant::now();
        // Probe failures carry over from the epoch before, and a member found unresponsive
        // before is reported again at once (the new membership starts with every member
        // responsive).
        let (probes, again) = Prober::new(&config, me, carried.as_ref());
        for v in again {
            info!(target = %v.target.short(), "still unresponsive: reported in the new epoch");
            self.outbox.push_back(MsOp::Probe {
                epoch: config.epoch,
                target: v.target,
                responsive: false,
            });
        }
        info!(epoch = config.epoch, "in the committee of this epoch");
        let fresh = FreshnessShares::new(config.clone());
        self.role = Some(Role {
            epoch: config.epoch,
            end_at: now + Duration::from_millis(config.params.epoch_ms),
            config,
            agreement,
            app: App::new(ms),
            saved_batches: 0,
            installing: None,
            queued: VecDeque::new(),
            next: NextConfig::default(),
            fresh,
            probes,
            next_probe: now,
            next_fresh: now,
        });
        if let Some(app) = app {
            self.resume(app);
        }
    }

    /// Reads back what this member persisted in `config`'s agreement, if anything: the agreement
    /// restored from it and the MS state replayed from the batches it had executed. `Err` says
    /// why it must sit the agreement out (it may have signed something it cannot recall).
    fn restore_agreement(
        &self,
        config: &Configuration,
        keys: Vec<PublicKey>,
        opts: AgreementOptions,
        start: &Membership,
    ) -> Result<(Option<Agreement>, Option<Restored>), String> {
        let epoch = config.epoch;
        let key = self.shared.key.clone();
        let store = &self.shared.store;
        let saved = store
            .load_agreement(epoch)
            .map_err(|e| format!("cannot read the persisted agreement state ({e})"))?;
        let Some((record, batches)) = saved else {
            let legacy = store
                .load_legacy_agreement_epoch()
                .map_err(|e| format!("cannot read the agreement marker ({e})"))?;
            if legacy.is_some_and(|e| e >= epoch) {
                return Err(
                    "restarted in an epoch whose agreement an older version of this \
                     node took part in without persisting what it signed"
                        .into(),
                );
            }
            let a = Agreement::new(key, keys, opts)
                .map_err(|e| format!("cannot run this epoch's agreement ({e})"))?;
            return Ok((Some(a), None));
        };
        let unreadable =
            |e: postcard::Error| format!("the persisted agreement state is unreadable ({e})");
        let record: SavedRole = postcard::from_bytes(&record).map_err(unreadable)?;
        let batches = batches
            .iter()
            .map(|b| postcard::from_bytes::<Vec<Request>>(b))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unreadable)?;
        let a = Agreement::restore(key, keys, opts, &record.agreement, self.now_ms())
            .map_err(|e| format!("cannot restore the agreement ({e})"))?;
        info!(
            epoch,
            view = a.view(),
            executed = batches.len(),
            "restarted in this epoch's agreement from the state it persisted"
        );
        Ok((
            Some(a),
            Some(Restored {
                app: App::replay(start.clone(), &batches),
                installing: record.installing,
                queued: record.queued,
            }),
        ))
    }

    /// Puts the MS state read back by [`Task::restore_agreement`] in place, and goes on where it
    /// stopped: signing the next configuration if the epoch had ended, fetching the batches of a
    /// stable checkpoint it was installing.
    fn resume(&mut self, app: Restored) {
        let Some(role) = self.role.as_mut() else {
            return;
        };
        role.saved_batches = app.app.batches().len();
        let ended = app.app.ended().map(|e| e.config.clone());
        role.app = app.app;
        role.installing = app.installing;
        role.queued = app
            .queued
            .into_iter()
            .map(|q| match q {
                Queued::Decided { seq, requests } => Output::Decided { seq, requests },
                Queued::Checkpoint { seq } => Output::Checkpoint { seq },
            })
            .collect();
        let epoch = role.epoch;
        let installing = role.installing;
        if let Some(next) = ended {
            self.epoch_ended(next);
        }
        if let Some((upto, _)) = installing {
            for m in self.committee_peers() {
                self.request(m, MsMessage::Batches { epoch, upto });
            }
        }
    }

    /// Writes the agreement's durable state with what the driver must keep beside it (the
    /// batches executed since the last write, a stable checkpoint being installed and the
    /// outputs queued behind it), durable on return.
    fn persist(&mut self, state: Vec<u8>) -> Result<(), String> {
        let Some(role) = self.role.as_mut() else {
            return Ok(());
        };
        let record = SavedRole {
            agreement: state,
            installing: role.installing,
            queued: role
                .queued
                .iter()
                .filter_map(|o| match o {
                    Output::Decided { seq, requests } => Some(Queued::Decided {
                        seq: *seq,
                        requests: requests.clone(),
                    }),
                    Output::Checkpoint { seq } => Some(Queued::Checkpoint { seq: *seq }),
                    _ => None,
                })
                .collect(),
        };
        let encode = |e: postcard::Error| format!("cannot encode the agreement state ({e})");
        let record = postcard::to_allocvec(&record).map_err(encode)?;
        let batches = role.app.batches();
        let new = batches[role.saved_batches.min(batches.len())..]
            .iter()
            .map(postcard::to_allocvec)
            .collect::<Result<Vec<_>, _>>()
            .map_err(encode)?;
        self.shared
            .store
            .save_agreement(role.epoch, &record, role.saved_batches as u64 + 1, &new)
            .map_err(|e| e.to_string())?;
        role.saved_batches = role.app.batches().len();
        Ok(())
    }

    fn queued_kind(&self, f: impl Fn(&MsOp) -> bool) -> bool {
        self.outbox.iter().any(&f) || self.outstanding.as_ref().is_some_and(|o| f(&o.op))
    }

    fn on_input(&mut self, input: Inbound) {
        let now = self.now_ms();
        match input {
            Inbound::Agreement { from, bytes } => {
                if let Some(agreement) = self.role.as_mut().and_then(|r| r.agreement.as_mut()) {
                    if let Err(e) = agreement.handle_message(now, from, &bytes) {
                        debug!(peer = %from.short(), error = ?e, "agreement message refused");
                    }
                } else if let Ok(env) = decode::<dbqsfs_core::ms::pbft::AgreementMessage>(&bytes) {
                    if env.epoch > self.epoch {
                        self.pull_from(from);
                    }
                }
            }
            Inbound::Message { from, msg, reply } => {
                let answer = self.on_message(from, msg);
                let _ = reply.send(answer);
            }
            Inbound::Answer { from, msg } => {
                self.health.good(from, now);
                if self.pulling == Some(from) {
                    self.pulling = None;
                }
                self.on_answer(from, msg)
            }
            Inbound::Failed { from } => {
                self.health.failed(from, now);
                if self.pulling == Some(from) {
                    self.pulling = None;
                    if self.pull_retries < PULL_RETRIES {
                        // Ask another member now rather than a whole period later.
                        debug!(peer = %from.short(), "pull failed; pulling from another member");
                        self.pull_retries += 1;
                        self.pull_random();
                    }
                }
            }
            Inbound::ProbeResult {
                target,
                epoch,
                nonce,
                answer,
            } => self.on_probe_result(target, epoch, nonce, answer),
        }
    }

    fn on_message(&mut self, from: PublicKey, msg: MsMessage) -> Option<MsMessage> {
        let now = self.now_ms();
        let sender = from.node_id();
        match msg {
            MsMessage::Submit(req) => {
                let Some(role) = self.role.as_mut().filter(|r| r.agreement.is_some()) else {
                    return Some(MsMessage::Refused {
                        reason: "not running this epoch's agreement".into(),
                    });
                };
                // A stranger's request must be a join by itself.
                if !role.config.is_member(&req.client.node_id()) {
                    match postcard::from_bytes::<MsOp>(&req.payload) {
                        Ok(MsOp::Join { .. }) => {}
                        _ => {
                            return Some(MsMessage::Refused {
                                reason: "a non-member may only ask to join".into(),
                            })
                        }
                    }
                }
                match role
                    .agreement
                    .as_mut()
                    .map(|a| a.submit(now, req))
                    .unwrap_or(Ok(()))
                {
                    Ok(()) => None,
                    Err(e) => Some(MsMessage::Refused {
                        reason: format!("{e:?}"),
                    }),
                }
            }
            MsMessage::ConfigShare { epoch, hash, sig } => {
                let role = self.role.as_mut()?;
                if epoch != role.epoch + 1 {
                    return None;
                }
                if let Some(cc) = role.next.share(sender, hash, sig) {
                    self.certified(cc);
                }
                None
            }
            MsMessage::FreshShare {
                epoch,
                config,
                time_ms,
                sig,
            } => {
                let role = self.role.as_mut()?;
                if epoch != role.epoch || config != role.config.hash() {
                    return None;
                }
                self.add_fresh_share(time_ms, sender, sig);
                None
            }
            MsMessage::Batches { epoch, upto } => {
                let role = self.role.as_ref()?;
                if epoch != role.epoch {
                    return None;
                }
                Some(MsMessage::BatchLog {
                    batches: role.app.batches().get(..upto as usize)?.to_vec(),
                })
            }
            MsMessage::StatusRequest => Some(MsMessage::Status(Box::new(self.status()))),
            MsMessage::Leave => {
                if !self.leaving {
                    info!("asked to leave the cluster");
                    self.leaving = true;
                    self.enter_epoch();
                }
                let member = self.shared.epochs.chain().config().is_member(&sender);
                Some(MsMessage::Leaving {
                    epoch: self.epoch,
                    member,
                })
            }
            _ => None,
        }
    }

    fn status(&self) -> MsStatus {
        let chain = self.shared.epochs.chain();
        let config = chain.config();
        let me = self.shared.key.node_id();
        let mut s = MsStatus {
            epoch: config.epoch,
            config: config.hash(),
            member: config.is_member(&me),
            committee: config.committee.clone(),
            // A configuration installed since this task last entered an epoch is entered next: it
            // is this node's epoch, just begun (not the age of the epoch before).
            epoch_age_ms: if config.epoch == self.epoch {
                self.entered.elapsed().as_millis() as u64
            } else {
                0
            },
            freshness_ms: self.shared.epochs.freshness().map(|f| f.time_ms),
            leaving: self.leaving,
            last_view_change: self.last_view_change,
            ..MsStatus::default()
        };
        if let Some(role) = &self.role {
            if let Some(a) = &role.agreement {
                s.in_agreement = true;
                s.view = a.view();
                s.primary = a.committee().id(a.committee().primary(a.view()));
                s.executed = a.last_executed();
                s.requests_executed = role.app.batches().iter().map(|b| b.len() as u64).sum();
                s.pending = Some(role.app.membership().pending());
            }
            s.probes = role.probes.counts();
        }
        s
    }

    fn on_answer(&mut self, from: NodeId, msg: MsMessage) {
        match msg {
            MsMessage::Chain { configs, freshness } => {
                if let Some(f) = freshness {
                    self.shared.epochs.learn_freshness(f);
                }
                if configs.is_empty() {
                    return;
                }
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = shared.epochs.install(configs) {
                        debug!(peer = %from.short(), error = %e, "pulled configurations refused");
                    }
                });
            }
            MsMessage::BatchLog { batches } => self.on_batch_log(batches),
            MsMessage::Refused { reason } => {
                debug!(peer = %from.short(), reason, "MS message refused")
            }
            _ => {}
        }
    }

    fn on_probe_result(
        &mut self,
        target: NodeId,
        epoch: Epoch,
        nonce: [u8; 32],
        answer: Option<Signature>,
    ) {
        let Some(role) = self.role.as_mut() else {
            return;
        };
        if epoch != role.probes.epoch() {
            return;
        }
        let Some(v) = role.probes.answered(&target, &nonce, answer.as_ref()) else {
            return;
        };
        info!(target = %target.short(), responsive = v.responsive, "probe verdict changed");
        // A newer verdict about the same target replaces a queued one.
        self.outbox
            .retain(|op| !matches!(op, MsOp::Probe { target: t, .. } if *t == target));
        self.outbox.push_back(MsOp::Probe {
            epoch,
            target,
            responsive: v.responsive,
        });
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let now_ms = self.now_ms();
        #[cfg(feature = "fault-injection")]
        if self.opts.forge && now >= self.next_pull {
            self.forge();
        }
        if now >= self.next_pull {
            self.next_pull = now + self.opts.pull;
            self.pull_retries = 0;
            self.pull_random();
        }
        self.submit_next(now);
        let Some(role) = self.role.as_mut() else {
            return;
        };
        if let Some(a) = role.agreement.as_mut() {
            if a.next_timeout().is_some_and(|t| t <= now_ms) {
                a.handle_timeout(now_ms);
            }
        }
        #[cfg(feature = "fault-injection")]
        let honest = !self.opts.forge;
        #[cfg(not(feature = "fault-injection"))]
        let honest = true;
        if honest && now >= role.end_at {
            role.end_at = now + Duration::from_millis(role.config.params.epoch_ms.max(1_000));
            let epoch = role.epoch;
            if !self
                .outbox
                .iter()
                .any(|op| matches!(op, MsOp::EndEpoch { .. }))
            {
                info!(epoch, "epoch timer fired: proposing the end of the epoch");
                self.outbox.push_back(MsOp::EndEpoch { epoch });
            }
        }
        let Some(role) = self.role.as_mut() else {
            return;
        };
        if now >= role.next_probe {
            role.next_probe = now + Duration::from_millis(role.config.params.probe_ms.max(100));
            self.probe_all();
        }
        let Some(role) = self.role.as_mut() else {
            return;
        };
        if now >= role.next_fresh {
            let period = (role.config.params.freshness_ms / 3).max(500);
            role.next_fresh = now + Duration::from_millis(period);
            let t = unix_ms();
            let time_ms = t - t % period;
            let sig = Freshness::sign_share(&self.shared.key, &role.config, time_ms);
            let msg = MsMessage::FreshShare {
                epoch: role.epoch,
                config: role.config.hash(),
                time_ms,
                sig,
            };
            let targets = self.committee_peers();
            self.send_all(targets, msg);
            self.add_fresh_share(time_ms, self.shared.key.node_id(), sig);
        }
    }

    fn add_fresh_share(&mut self, time_ms: u64, signer: NodeId, sig: Signature) {
        let Some(role) = self.role.as_mut() else {
            return;
        };
        if let Some(cert) = role.fresh.add(time_ms, signer, sig) {
            debug!(
                epoch = role.epoch,
                time_ms, "freshness certificate assembled"
            );
            self.shared.epochs.learn_freshness(cert);
        }
    }

    fn committee_peers(&self) -> Vec<Member> {
        let chain = self.shared.epochs.chain();
        let config = chain.config();
        let me = self.shared.key.node_id();
        config
            .committee
            .iter()
            .filter(|id| **id != me)
            .filter_map(|id| config.member(id).cloned())
            .collect()
    }

    fn probe_all(&mut self) {
        let Some(role) = self.role.as_mut() else {
            return;
        };
        let epoch = role.epoch;
        let sends: Vec<(Member, [u8; 32])> = role
            .probes
            .round(random_bytes)
            .into_iter()
            .filter_map(|(id, nonce)| Some((role.config.member(&id)?.clone(), nonce)))
            .collect();
        for (m, nonce) in sends {
            let Some((addr, key)) = member_target(&m) else {
                continue;
            };
            let endpoint = self.endpoint.clone();
            let tx = self.tx.clone();
            let bytes = encode_msg(epoch, MsMessage::Challenge { epoch, nonce });
            let timeout = Duration::from_millis(probe_timeout_ms(&role.config));
            tokio::spawn(async move {
                let answer =
                    match tokio::time::timeout(timeout, endpoint.request(addr, &key, &bytes)).await
                    {
                        Ok(Ok(resp)) => match decode::<MsMessage>(&resp).map(|e| e.msg) {
                            Ok(MsMessage::ChallengeAnswer { sig }) => Some(sig),
                            _ => None,
                        },
                        _ => None,
                    };
                let _ = tx
                    .send(Inbound::ProbeResult {
                        target: m.id,
                        epoch,
                        nonce,
                        answer,
                    })
                    .await;
            });
        }
    }

    /// Sends the head of the outbox (or resends the outstanding submission).
    fn submit_next(&mut self, now: Instant) {
        if self.outstanding.is_none() {
            let Some(op) = self.outbox.pop_front() else {
                return;
            };
            // Sequence numbers grow with the clock, so they stay above those of an earlier run.
            let seq = (unix_ms() << 10).max(self.last_seq + 1);
            self.last_seq = seq;
            let payload = match postcard::to_allocvec(&op) {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "cannot encode an MS operation");
                    return;
                }
            };
            let req = Request::sign(&self.shared.key, seq, payload);
            self.outstanding = Some(Outstanding {
                op,
                req,
                sent: None,
            });
        }
        let resubmit = self.opts.resubmit;
        let Some(o) = self.outstanding.as_mut() else {
            return;
        };
        if o.sent.is_some_and(|t| now < t + resubmit) {
            return;
        }
        o.sent = Some(now);
        let req = o.req.clone();
        debug!(op = ?o.op, "submitting an MS operation");
        let now_ms = self.now_ms();
        if let Some(a) = self.role.as_mut().and_then(|r| r.agreement.as_mut()) {
            if let Err(e) = a.submit(now_ms, req.clone()) {
                debug!(error = ?e, "own submission refused");
            }
        }
        let targets = self.committee_peers();
        self.send_all(targets, MsMessage::Submit(req));
    }

    /// Carries out the agreement's outputs.
    fn drain(&mut self) {
        loop {
            let Some(role) = self.role.as_mut() else {
                return;
            };
            let Some(out) = role.agreement.as_mut().and_then(|a| a.poll_output()) else {
                return;
            };
            if role.installing.is_some()
                && matches!(out, Output::Decided { .. } | Output::Checkpoint { .. })
            {
                role.queued.push_back(out);
                continue;
            }
            self.on_output(out);
        }
    }

    fn on_output(&mut self, out: Output) {
        let Some(role) = self.role.as_mut() else {
            return;
        };
        let epoch = role.epoch;
        match out {
            Output::Persist { state } => {
                if let Err(e) = self.persist(state) {
                    // What follows must not leave unpersisted: drop the agreement, and with it
                    // every output it still holds.
                    warn!(epoch, error = %e, "cannot persist the agreement state: sitting this epoch's agreement out");
                    if let Some(role) = self.role.as_mut() {
                        role.agreement = None;
                    }
                }
            }
            #[cfg(feature = "fault-injection")]
            Output::Send { .. } | Output::Broadcast { .. } if self.opts.forge => {}
            Output::Send { to, bytes } => {
                if let Some(m) = role.config.member(&to).cloned() {
                    self.send_raw(m, bytes);
                }
            }
            Output::Broadcast { bytes } => {
                for m in self.committee_peers() {
                    self.send_raw(m, bytes.clone());
                }
            }
            Output::Decided { seq, requests } => self.execute(seq, requests),
            Output::Checkpoint { seq } => {
                if seq == role.app.executed() {
                    let d = role.app.digest();
                    if let Some(a) = role.agreement.as_mut() {
                        a.checkpoint_digest(seq, d);
                    }
                }
            }
            Output::InstallState { seq, app_digest } => {
                info!(
                    epoch,
                    seq, "catching up to a stable checkpoint: fetching its batches"
                );
                role.installing = Some((seq, app_digest));
                for m in self.committee_peers() {
                    self.request(m, MsMessage::Batches { epoch, upto: seq });
                }
            }
            Output::EnteredView { view } => {
                info!(epoch, view, "agreement entered a new view");
                self.last_view_change = Some((epoch, view));
            }
            Output::Evidence(evidence) => {
                warn!(epoch, "agreement evidence of misbehaviour: reporting it");
                self.outbox
                    .push_back(MsOp::Misbehaviour { epoch, evidence });
            }
        }
    }

    /// Executes a decided batch on the MS state.
    fn execute(&mut self, seq: SeqNo, requests: Vec<Request>) {
        let Some(role) = self.role.as_mut() else {
            return;
        };
        let outcomes = match role.app.execute(seq, &requests) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                warn!(error = %e, "decided batch ignored");
                return;
            }
        };
        if let Some(o) = &self.outstanding {
            if requests
                .iter()
                .any(|r| o.req.client == r.client && o.req.seq == r.seq)
            {
                self.outstanding = None;
            }
        }
        let mut ended = None;
        for o in outcomes {
            let what = format!("{:?}", o.op);
            match o.executed {
                Executed::Accepted => debug!(op = what, "MS operation executed"),
                Executed::Ignored(why) => debug!(op = what, why, "MS operation ignored"),
                Executed::EpochEnded(next) => {
                    ended.get_or_insert(*next);
                }
            }
        }
        if let Some(next) = ended {
            self.epoch_ended(next);
        }
    }

    fn epoch_ended(&mut self, next: Configuration) {
        let Some(role) = self.role.as_mut() else {
            return;
        };
        if role.next.ended() {
            return;
        }
        info!(
            epoch = next.epoch,
            members = next.members.len(),
            "the epoch ended: signing the next configuration"
        );
        let hash = next.hash();
        let Some((sig, done)) = role.next.end(role.config.clone(), next, &self.shared.key) else {
            return;
        };
        let msg = MsMessage::ConfigShare {
            epoch: role.epoch + 1,
            hash,
            sig,
        };
        let targets = self.committee_peers();
        self.send_all(targets, msg);
        if let Some(cc) = done {
            self.certified(cc);
        }
    }

    /// The next configuration is certified: install it and push it to the root of the tree.
    fn certified(&mut self, cc: CertifiedConfig) {
        info!(epoch = cc.config.epoch, "next configuration certified");
        let root = tree_order(&cc.config)
            .into_iter()
            .take(2)
            .collect::<Vec<_>>();
        let shared = self.shared.clone();
        let msg = MsMessage::Push {
            configs: vec![cc.clone()],
            freshness: None,
        };
        self.send_all(root, msg);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = shared.epochs.install(vec![cc]) {
                warn!(error = %e, "the certified configuration did not install");
            }
        });
    }

    fn on_batch_log(&mut self, batches: Vec<Vec<Request>>) {
        let Some(role) = self.role.as_mut() else {
            return;
        };
        let Some((seq, digest)) = role.installing else {
            return;
        };
        if batches.len() as u64 != seq {
            return;
        }
        // Replay from the start of the epoch and accept only what hashes to the agreed digest.
        let app = App::replay(role.app.start().clone(), &batches);
        if app.digest() != digest {
            debug!("a batch log does not match the stable checkpoint: ignored");
            return;
        }
        info!(seq, "caught up to the stable checkpoint");
        let ended = app.ended().map(|e| e.config.clone());
        role.app = app;
        role.installing = None;
        let queued: Vec<Output> = role.queued.drain(..).collect();
        if let Some(next) = ended {
            self.epoch_ended(next);
        }
        for out in queued {
            match out {
                Output::Decided { seq: s, .. } | Output::Checkpoint { seq: s } if s <= seq => {}
                other => self.on_output(other),
            }
        }
    }

    fn pull_random(&mut self) {
        let chain = self.shared.epochs.chain();
        let me = self.shared.key.node_id();
        let others: Vec<&Member> = chain
            .config()
            .members
            .iter()
            .filter(|m| m.id != me)
            .collect();
        let msg = MsMessage::ChainAfter { epoch: self.epoch };
        if !others.is_empty() {
            // A random one of the healthiest members.
            let ids: Vec<NodeId> = others.iter().map(|m| m.id).collect();
            let rotate = u64::from_le_bytes(random_bytes()[..8].try_into().unwrap_or([0; 8]));
            let pick = self.health.order(&ids, rotate as usize, self.now_ms())[0];
            if let Some(m) = others.iter().find(|m| m.id == pick) {
                self.pulling = Some(pick);
                self.request((*m).clone(), msg.clone());
            }
        }
        if let Some((addr, key)) = self.opts.bootstrap {
            if !chain.config().is_member(&me) {
                self.request_at(addr, key, msg);
            }
        }
    }

    fn pull_from(&mut self, from: NodeId) {
        if let Some(m) = self.shared.epochs.chain().config().member(&from).cloned() {
            self.request(m, MsMessage::ChainAfter { epoch: self.epoch });
        }
    }

    fn send_all(&self, to: Vec<Member>, msg: MsMessage) {
        let bytes = encode_msg(self.epoch, msg);
        for m in to {
            self.send_raw(m, bytes.clone());
        }
    }

    /// Pushes a configuration certified by this node alone (its signature and made-up ones of the
    /// others) and a forged freshness certificate to every member; sends garbage agreement messages.
    #[cfg(feature = "fault-injection")]
    fn forge(&mut self) {
        let chain = self.shared.epochs.chain();
        let cur = chain.config();
        let me = self.shared.key.node_id();
        // Keep only ourselves and the fewest others a configuration may have.
        let mut members: Vec<Member> = cur.members.iter().filter(|m| m.id == me).cloned().collect();
        members.extend(
            cur.members
                .iter()
                .filter(|m| m.id != me)
                .take(cur.quorum().group_size() - 1)
                .cloned(),
        );
        let next = Configuration::new(cur.epoch + 1, cur.params.clone(), members, Some(cur.hash()));
        let hash = next.hash();
        let mut signatures: Vec<(NodeId, Signature)> = cur
            .committee
            .iter()
            .map(|id| (*id, Signature([7u8; 64])))
            .collect();
        signatures.retain(|(id, _)| *id != me);
        signatures.push((me, self.shared.key.sign(Domain::Configuration, &hash)));
        let forged = CertifiedConfig {
            config: next,
            cert: dbqsfs_core::config::Certificate { signatures },
        };
        let fresh = Freshness {
            epoch: cur.epoch,
            config: cur.hash(),
            time_ms: unix_ms() + 3_600_000,
            signatures: vec![(me, Signature([9u8; 64]))],
        };
        warn!(
            epoch = cur.epoch + 1,
            "FAULT: pushing a forged configuration to every member"
        );
        let others: Vec<Member> = cur.members.iter().filter(|m| m.id != me).cloned().collect();
        self.send_all(
            others.clone(),
            MsMessage::Push {
                configs: vec![forged],
                freshness: Some(fresh),
            },
        );
        let mut junk = vec![0u8; 200];
        junk.copy_from_slice(&[0x5a; 200]);
        junk[0] = dbqsfs_core::wire::WIRE_VERSION;
        junk[1] = <dbqsfs_core::ms::pbft::AgreementMessage as dbqsfs_core::wire::Protocol>::ID;
        for m in others {
            self.send_raw(m, junk.clone());
        }
    }

    /// Sends one-way bytes to `m` (the answer, if any, is dropped).
    fn send_raw(&self, m: Member, bytes: Vec<u8>) {
        let Some((addr, key)) = member_target(&m) else {
            return;
        };
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            let _ = endpoint.request(addr, &key, &bytes).await;
        });
    }

    /// Sends `msg` to `m` and feeds its answer back as [`Inbound::Answer`].
    fn request(&self, m: Member, msg: MsMessage) {
        if let Some((addr, key)) = member_target(&m) {
            self.request_at(addr, key, msg);
        }
    }

    fn request_at(&self, addr: SocketAddr, key: VerifyingKey, msg: MsMessage) {
        let endpoint = self.endpoint.clone();
        let tx = self.tx.clone();
        let bytes = encode_msg(self.epoch, msg);
        let from = PublicKey(key.to_bytes()).node_id();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(PULL_TIMEOUT, endpoint.request(addr, &key, &bytes))
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|resp| decode::<MsMessage>(&resp).ok());
            let _ = match answer {
                Some(env) => tx.send(Inbound::Answer { from, msg: env.msg }).await,
                None => tx.send(Inbound::Failed { from }).await,
            };
        });
    }
}

/// A probe's answer is awaited for most of the probe period, so that it is settled (answered or
/// failed) before the next round: a round that found the last probe still outstanding would count
/// nothing, and failures would accrue at half the rate.
/// What a committee member persists beside the agreement's durable state.
#[derive(Serialize, Deserialize)]
struct SavedRole {
    agreement: Vec<u8>,
    installing: Option<(SeqNo, Digest)>,
    queued: Vec<Queued>,
}

/// An agreement output queued while a stable checkpoint's batches are fetched.
#[derive(Serialize, Deserialize)]
enum Queued {
    Decided { seq: SeqNo, requests: Vec<Request> },
    Checkpoint { seq: SeqNo },
}

/// The MS state of an epoch read back after a restart.
struct Restored {
    app: App,
    installing: Option<(SeqNo, Digest)>,
    queued: Vec<Queued>,
}
