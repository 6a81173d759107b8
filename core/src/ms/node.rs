//! A node's whole part in the Membership Service as one sans-IO machine: its committee role in
//! the epoch it is in ([`super::role`]), its probing of the members it watches
//! ([`super::probe`]), its submissions ([`super::submissions`]) and its following of the epochs
//! ([`super::follower`]), with one ordered queue of [`Output`]s.
//!
//! The node's MS driver and the composed simulator drive this very machine: they feed it what
//! arrives (agreement bytes, MS messages, answers and failures of its requests, probe answers),
//! the configurations the node installed, and the clock; they carry out its outputs in the order
//! [`MsNode::poll`] returns them.
//!
//! Goals:
//! - **One order.** An [`Output::Persist`] must be durable before any output after it is carried
//!   out: every statement the agreement signs comes after the persist that holds it, whatever
//!   else (pulls, forwards, submissions) the node does between them.
//! - **Every decision here.** Whom to pull from and forward to, which operations to submit and
//!   when to send them again, when a role starts and from what, which members a certified
//!   configuration goes to first, when the next configuration is fetched whole in pieces
//!   ([`super::pieces`]: a pull answered with nothing by a member that holds a newer epoch) and
//!   from whom: the driver only sends, persists, probes and installs.
//!
//! Non-goals: verifying configurations (the driver installs them into its
//! [`crate::config::ConfigChain`], which checks the certificates), reading persisted state (the
//! driver loads it when [`MsNode::wants_role`] says so and passes it to [`MsNode::enter`]), the
//! answers that need no state (challenges, the configurations a node holds), the clock and
//! randomness (passed in).
//!
//! Fault model: as [`super::role`], [`super::probe`] and [`super::follower`]: every input may
//! come from a Byzantine peer.

use super::app::{OutOfOrder, Outcome};
use super::delta::CertifiedDelta;
use super::follower::{FollowAction, Follower};
use super::key::{KeyMember, KeyState};
use super::membership::{AdmissionCert, MsOp};
use super::pbft::{AgreementMessage, Request, SeqNo, View};
use super::pieces::{ConfigHead, Download, PIECE_TIMEOUT_MS};
use super::probe::{probe_timeout_ms, Prober};
use super::role::{agreement_options, Action, Resume, Role, Saved, Setup};
use super::submissions::Submissions;
use super::tree::tree_order;
use super::wire::MsMessage;
use crate::config::{CertifiedConfig, Configuration, Epoch, Freshness, Member};
use crate::crypto::{Keypair, NodeId, PublicKey, Signature};
use std::collections::{BTreeMap, VecDeque};

/// What the driver must do, in order. An [`Output::Persist`] must be durable before any output
/// after it is carried out.
#[derive(Clone, Debug)]
pub enum Output {
    /// Write this durably, replacing the epoch's previous record and appending the batches.
    Persist(Saved),
    /// Agreement bytes for these committee members.
    Agreement { to: Vec<NodeId>, bytes: Vec<u8> },
    /// A one-way MS message for these members.
    Send { to: Vec<NodeId>, msg: MsMessage },
    /// A request to `to`: feed its answer to [`MsNode::on_answer`], or its failure (no
    /// connection, no answer in time, an undecodable one) to [`MsNode::on_failed`].
    Request { to: NodeId, msg: MsMessage },
    /// Push the configurations after `after` that the node holds to `to`, as deltas
    /// (`MsMessage::PushDeltas` of [`super::delta::deltas_after`]).
    Forward { to: Vec<NodeId>, after: Epoch },
    /// The node is no member of the newest configuration it holds: ask the node it was told to
    /// start from, if any, for the configurations after `after` as deltas
    /// ([`MsMessage::DeltasAfter`], a request, as above).
    PullBootstrap { after: Epoch },
    /// Challenge `target` with `nonce` ([`MsMessage::Challenge`]); feed its answer, or `None`
    /// after `timeout_ms` or a failure, to [`MsNode::on_probe_answer`].
    Probe {
        epoch: Epoch,
        target: NodeId,
        nonce: [u8; 32],
        timeout_ms: u64,
    },
    /// Install these configurations if their certificates chain to what the node holds, and
    /// then call [`MsNode::enter`] with the newest.
    Install(Vec<CertifiedConfig>),
    /// Apply these deltas to what the node holds ([`super::delta::resolve`]) and install what
    /// they make, as [`Output::Install`].
    InstallDeltas(Vec<CertifiedDelta>),
    /// A freshness certificate: keep it if it is newer than the one held.
    Freshness(Freshness),
    /// The node's shares of the MS key (or the round deals it keeps) changed: persist these,
    /// replacing (and erasing) what was persisted before. Pass them to [`MsNode::new`] after a
    /// restart.
    KeyState(KeyState),
    /// What happened, for logs and checks.
    Event(Event),
}

/// What happened in the node's MS part (for logs and the simulator's checks).
#[derive(Clone, Debug)]
pub enum Event {
    /// The node is in `epoch`'s committee and took its role up: afresh, from what it persisted
    /// (`resumed`), or sitting the agreement out (`sat_out`, why).
    Role {
        epoch: Epoch,
        resumed: bool,
        sat_out: Option<String>,
    },
    /// The node is a member: its join is done.
    Joined { epoch: Epoch },
    /// An operation the node will submit.
    Queued(MsOp),
    /// A request the node sends to the committee.
    Submitting(Request),
    /// Batch `seq` of `epoch` executed.
    Executed {
        epoch: Epoch,
        seq: SeqNo,
        requests: Vec<Request>,
        outcomes: Vec<Outcome>,
    },
    /// A decided batch was not the next one and was not executed.
    OutOfOrder(OutOfOrder),
    /// The agreement entered `view`.
    EnteredView { epoch: Epoch, view: View },
    /// Catching up to a stable checkpoint: fetching the batches up to `upto`.
    FetchingBatches { epoch: Epoch, upto: SeqNo },
    /// The batches of the stable checkpoint arrived and replayed to its digest.
    CaughtUp { from: NodeId },
    /// This member signed the next configuration.
    SignedNext { epoch: Epoch },
    /// The next configuration is certified (pushed to the root of its tree and installed).
    Certified(CertifiedConfig),
    /// A pull failed and another member is asked.
    PullRetry { failed: NodeId },
    /// A peer refused a message of ours.
    Refused { from: NodeId, reason: String },
}

/// How a node's MS part runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The key that signs admission certificates.
    pub admission_key: PublicKey,
    /// How often the node pulls configurations.
    pub pull_ms: u64,
    /// How often an operation not executed yet is sent again.
    pub resubmit_ms: u64,
    /// Whether a committee member's epoch timer proposes the end of the epoch.
    pub epoch_timer: bool,
}

/// A node's part in the Membership Service.
pub struct MsNode {
    key: Keypair,
    opts: Options,
    /// The newest configuration the node entered.
    config: Configuration,
    /// The committee role in `config`'s epoch, if the node is in its committee.
    role: Option<Role>,
    submissions: Submissions,
    /// How far each committee member of `config`'s epoch says this node's requests were executed
    /// ([`MsMessage::Executed`]): how a node outside the committee learns its operation is done.
    executed_acks: BTreeMap<NodeId, SeqNo>,
    follower: Follower,
    /// The join to submit until the node is a member.
    join: Option<(Member, AdmissionCert)>,
    leaving: bool,
    last_view_change: Option<(Epoch, View)>,
    /// The configuration after the one entered, coming whole, in pieces.
    whole: Option<WholeFetch>,
    /// The probing of the members this node watches, while it is a member.
    prober: Option<Prober>,
    next_probe: u64,
    /// The secret the probe nonces are drawn from, and how many were drawn.
    nonce_seed: [u8; 32],
    nonces: u64,
    /// Its shares of the MS key and its part in the rounds that move it.
    key_member: KeyMember,
    /// When to ask again for the deals of a round whose share this node misses.
    key_ask_at: u64,
    out: VecDeque<Output>,
}

impl MsNode {
    /// The MS part of node `key`, which holds `config` (its newest) and what it persisted of
    /// the MS key ([`Output::KeyState`]), at time `now`. Call [`MsNode::enter`] with it to take
    /// its role up.
    pub fn new(
        key: Keypair,
        config: Configuration,
        shares: KeyState,
        opts: Options,
        now: u64,
    ) -> MsNode {
        let follower = Follower::new(key.node_id(), config.epoch, opts.pull_ms, now);
        MsNode {
            key_member: KeyMember::new(key.clone(), shares),
            key_ask_at: u64::MAX,
            submissions: Submissions::new(opts.resubmit_ms),
            executed_acks: BTreeMap::new(),
            follower,
            key,
            opts,
            config,
            role: None,
            join: None,
            leaving: false,
            last_view_change: None,
            whole: None,
            prober: None,
            next_probe: now,
            nonce_seed: [0; 32],
            nonces: 0,
            out: VecDeque::new(),
        }
    }

    // ---- accessors ----

    /// The epoch entered.
    pub fn epoch(&self) -> Epoch {
        self.config.epoch
    }

    /// The newest configuration entered.
    pub fn config(&self) -> &Configuration {
        &self.config
    }

    /// The node's shares of the MS key and its part in moving it.
    pub fn key_member(&self) -> &KeyMember {
        &self.key_member
    }

    /// The `keep-old-shares` mutant's switch.
    #[cfg(feature = "mutants")]
    pub fn key_member_mut(&mut self) -> &mut KeyMember {
        &mut self.key_member
    }

    /// The committee role, if the node is in this epoch's committee.
    pub fn role(&self) -> Option<&Role> {
        self.role.as_ref()
    }

    /// The probing of the members this node watches, if it is a member.
    pub fn prober(&self) -> Option<&Prober> {
        self.prober.as_ref()
    }

    pub fn submissions(&self) -> &Submissions {
        &self.submissions
    }

    pub fn follower(&self) -> &Follower {
        &self.follower
    }

    /// Whether the node was asked to leave.
    pub fn leaving(&self) -> bool {
        self.leaving
    }

    /// The last view the agreement entered, and in which epoch.
    pub fn last_view_change(&self) -> Option<(Epoch, View)> {
        self.last_view_change
    }

    /// The next output to carry out, in order.
    pub fn poll(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest time at which [`MsNode::on_timer`] has work to do.
    pub fn next_timer(&self) -> u64 {
        let mut t = self.follower.next_timer();
        if let Some(s) = self.submissions.next_timer() {
            t = t.min(s);
        }
        if let Some(r) = self.role.as_ref().and_then(Role::next_timer) {
            t = t.min(r);
        }
        if self.prober.is_some() {
            t = t.min(self.next_probe);
        }
        t = t.min(self.key_ask_at);
        if let Some(w) = &self.whole {
            t = t.min(w.until);
            if let Some(d) = w.download.as_ref().and_then(Download::next_deadline) {
                t = t.min(d);
            }
        }
        t
    }

    // ---- inputs ----

    /// Whether entering `config` starts a role: then the driver loads what the node persisted in
    /// that epoch's agreement and passes it to [`MsNode::enter`].
    pub fn wants_role(&self, config: &Configuration) -> bool {
        config.committee.contains(&self.key.node_id())
            && self.role.as_ref().map(Role::epoch) != Some(config.epoch)
    }

    /// The node holds `config` as its newest configuration (at start, and after every install
    /// that moved it on): the configurations after the one it was in go down the push tree,
    /// operations of other epochs are void, its join and leave are queued as needed, and, in the
    /// committee, its role starts as `resume` says (ignored otherwise); as a member, it probes
    /// the members it watches. `nonce_seed` is a fresh secret for the probe nonces.
    pub fn enter(
        &mut self,
        config: &Configuration,
        resume: Resume<'_>,
        nonce_seed: [u8; 32],
        now: u64,
    ) {
        if config.epoch < self.config.epoch {
            return;
        }
        let start_role = self.wants_role(config);
        if config.epoch > self.config.epoch {
            self.config = config.clone();
            self.whole = None;
            self.executed_acks.clear();
        }
        if let Some(FollowAction::Forward { to, after }) = self.follower.entered(config) {
            self.out.push_back(Output::Forward { to, after });
        }
        let epoch = config.epoch;
        self.submissions.enter_epoch(epoch);
        let me = self.key.node_id();
        let member = config.is_member(&me);
        if let Some((m, cert)) = self.join.clone() {
            if member {
                self.join = None;
                self.out.push_back(Output::Event(Event::Joined { epoch }));
            } else {
                self.want(MsOp::Join {
                    epoch,
                    member: m,
                    cert,
                });
            }
        }
        if self.leaving && member {
            self.want(MsOp::Leave { epoch });
        }
        if self.role.as_ref().is_some_and(|r| r.epoch() != epoch) || start_role {
            self.role = None;
            if start_role {
                self.start_role(config, resume, nonce_seed, now);
            }
        }
        if !member {
            self.prober = None;
        } else if self.prober.as_ref().map(Prober::epoch) != Some(epoch) {
            // Probe failures carry over from the epoch before for members still watched: a
            // count that restarted every epoch could never reach the eviction threshold when an
            // epoch holds fewer probe rounds than that. A member still unresponsive is reported
            // again at once (the new membership starts with every member responsive).
            let (prober, again) = Prober::new(config, me, self.prober.as_ref());
            self.prober = Some(prober);
            self.nonce_seed = nonce_seed;
            self.nonces = 0;
            self.next_probe = self.next_probe.min(now);
            for v in again {
                self.want(MsOp::Probe {
                    epoch,
                    target: v.target,
                    responsive: false,
                });
            }
        }
        self.deal(now);
        self.sync_key();
        self.pump();
    }

    /// This node's deal in the round of the epoch it is in, if it is a dealer; if it misses
    /// the share it must deal from, it asks the other receivers of that round for its deals.
    fn deal(&mut self, now: u64) {
        let epoch = self.config.epoch;
        if let Some(op) = self.key_member.enter(&self.config) {
            self.key_ask_at = u64::MAX;
            self.want(MsOp::Key {
                epoch,
                op: Box::new(op),
            });
        } else if let Some((round, others)) = self.key_member.missing(&self.config) {
            self.key_ask_at = now.saturating_add(KEY_ASK_MS);
            for to in others {
                self.out.push_back(Output::Request {
                    to,
                    msg: MsMessage::KeyRoundAsk { epoch: round },
                });
            }
        }
    }

    /// The node's part as a receiver of its role's round of the MS key (complaints, its share),
    /// and the shares to persist when they changed.
    fn sync_key(&mut self) {
        let ops = self.role.as_ref().map_or_else(Vec::new, |role| {
            let epoch = role.epoch();
            role.app()
                .membership()
                .key_of(epoch)
                .map(|round| self.key_member.sync(round))
                .unwrap_or_default()
                .into_iter()
                .map(|op| MsOp::Key {
                    epoch,
                    op: Box::new(op),
                })
                .collect()
        });
        for op in ops {
            self.want(op);
        }
        if let Some(role) = self.role.as_mut() {
            if let Some(share) = self.key_member.holder().for_signing(role.epoch()) {
                role.offer_key_share(share);
            }
        }
        if let Some(state) = self.key_member.take_changed() {
            self.out.push_back(Output::KeyState(state));
        }
    }

    fn start_role(&mut self, config: &Configuration, resume: Resume<'_>, seed: [u8; 32], now: u64) {
        let resumed = matches!(resume, Resume::Saved { .. });
        let setup = Setup {
            key: self.key.clone(),
            opts: agreement_options(config),
            config: config.clone(),
            admission_key: self.opts.admission_key,
            epoch_timer: self.opts.epoch_timer,
            seed: *blake3::keyed_hash(&seed, b"frost nonces").as_bytes(),
        };
        let (role, sat_out) = Role::new(setup, resume, now);
        self.out.push_back(Output::Event(Event::Role {
            epoch: config.epoch,
            resumed: resumed && sat_out.is_none(),
            sat_out,
        }));
        self.role = Some(role);
    }

    /// The node wants to join with `member` (its key and address), admitted by `cert`: submitted
    /// in every epoch until the node is a member.
    pub fn join(&mut self, member: Member, cert: AdmissionCert) {
        self.join = Some((member.clone(), cert.clone()));
        if !self.config.is_member(&self.key.node_id()) {
            self.want(MsOp::Join {
                epoch: self.config.epoch,
                member,
                cert,
            });
        }
    }

    /// The node was asked to leave the cluster: `Leave` is submitted in every epoch while it is a
    /// member. `false` if it was asked before.
    pub fn leave(&mut self) -> bool {
        if self.leaving {
            return false;
        }
        self.leaving = true;
        if self.config.is_member(&self.key.node_id()) {
            self.want(MsOp::Leave {
                epoch: self.config.epoch,
            });
        }
        true
    }

    /// Queues `op` for submission (see [`Submissions::push`]): sent at the next
    /// [`MsNode::on_timer`].
    pub fn want(&mut self, op: MsOp) {
        let what = op.clone();
        if self.submissions.push(op) {
            self.out.push_back(Output::Event(Event::Queued(what)));
        }
    }

    /// The clock: periodic pulls, submissions and their resending, the role's timers. `now` is
    /// the driver's monotonic milliseconds, `wall_ms` its wall clock (freshness times),
    /// `rotate` a random number (which of equally healthy members to pull from), `seq_floor`
    /// above every request sequence number an earlier run of this node may have used.
    pub fn on_timer(&mut self, now: u64, wall_ms: u64, rotate: u64, seq_floor: u64) {
        if self.whole.is_some() {
            self.ask_pieces(now);
        }
        if now >= self.key_ask_at {
            self.key_ask_at = u64::MAX;
            self.deal(now);
        }
        let due = now >= self.follower.next_timer();
        if let Some(action) = self.follower.on_timer(now, &self.config, rotate) {
            self.follow(action);
        }
        if due && !self.config.is_member(&self.key.node_id()) {
            self.out.push_back(Output::PullBootstrap {
                after: self.follower.epoch(),
            });
        }
        if let Some(req) = self.submissions.poll(now, &self.key, seq_floor) {
            self.out
                .push_back(Output::Event(Event::Submitting(req.clone())));
            if let Some(role) = self.role.as_mut().filter(|r| r.agreement().is_some()) {
                let _ = role.submit(now, req.clone());
            }
            let me = self.key.node_id();
            let to: Vec<NodeId> = self
                .config
                .committee
                .iter()
                .filter(|id| **id != me)
                .copied()
                .collect();
            self.out.push_back(Output::Send {
                to,
                msg: MsMessage::Submit(req),
            });
        }
        if let Some(role) = self.role.as_mut() {
            if role.next_timer().is_some_and(|t| t <= now) {
                role.on_timer(now, wall_ms);
            }
        }
        if now >= self.next_probe {
            self.probe_round(now);
        }
        self.pump();
    }

    /// Challenges every member this node watches whose last probe is answered or failed.
    fn probe_round(&mut self, now: u64) {
        let Some(prober) = self.prober.as_mut() else {
            return;
        };
        self.next_probe = now.saturating_add(self.config.params.probe_ms.max(100));
        let (seed, mut count) = (self.nonce_seed, self.nonces);
        let challenges = prober.round(|| {
            count += 1;
            *blake3::keyed_hash(&seed, &count.to_le_bytes()).as_bytes()
        });
        self.nonces = count;
        let timeout_ms = probe_timeout_ms(&self.config);
        let epoch = prober.epoch();
        for (target, nonce) in challenges {
            self.out.push_back(Output::Probe {
                epoch,
                target,
                nonce,
                timeout_ms,
            });
        }
    }

    /// Agreement bytes from `from`: for the role, or, from an agreement of a later epoch, a sign
    /// that `from` holds configurations the node lacks.
    pub fn on_agreement(&mut self, now: u64, from: NodeId, bytes: &[u8]) -> Result<(), String> {
        let res = match self.role.as_mut().filter(|r| r.agreement().is_some()) {
            Some(role) => role.on_agreement(now, from, bytes),
            None => {
                let env =
                    crate::wire::decode::<AgreementMessage>(bytes).map_err(|e| e.to_string())?;
                if let Some(action) = self.follower.saw_epoch(from, env.epoch) {
                    self.follow(action);
                }
                Ok(())
            }
        };
        self.pump();
        res
    }

    /// An MS message from `from` that needs the node's state (a submission, shares, a request
    /// for batches); returns the answer, if any. The driver answers the others itself.
    pub fn on_message(&mut self, now: u64, from: NodeId, msg: MsMessage) -> Option<MsMessage> {
        let answer = match (self.role.as_mut(), msg) {
            (_, MsMessage::KeyRoundAsk { epoch }) => Some(MsMessage::KeyRound(
                self.key_member.round_deals(epoch).cloned().map(Box::new),
            )),
            (None, MsMessage::Submit(_)) => Some(MsMessage::Refused {
                reason: "not running this epoch's agreement".into(),
            }),
            (Some(role), MsMessage::Submit(req)) => {
                let done = role.agreement().map_or(0, |a| a.executed_for(&req.client));
                if from == req.client.node_id() && req.seq <= done {
                    // Asked again: the word that it was executed may have been lost.
                    let epoch = role.epoch();
                    self.out.push_back(Output::Send {
                        to: vec![from],
                        msg: MsMessage::Executed { epoch, seq: done },
                    });
                    None
                } else {
                    role.admits(&req)
                        .and_then(|()| role.submit(now, req))
                        .err()
                        .map(|reason| MsMessage::Refused { reason })
                }
            }
            (_, MsMessage::Executed { epoch, seq }) => {
                self.on_executed(from, epoch, seq);
                None
            }
            (Some(role), MsMessage::ConfigShare { epoch, hash, sig }) => {
                role.on_config_share(from, epoch, hash, sig);
                None
            }
            (
                Some(role),
                MsMessage::KeySign {
                    epoch,
                    hash,
                    attempt,
                    step,
                },
            ) => {
                role.on_key_sign(from, epoch, hash, attempt, step);
                None
            }
            (
                Some(role),
                MsMessage::FreshShare {
                    epoch,
                    config,
                    time_ms,
                    sig,
                },
            ) => {
                role.on_fresh_share(from, epoch, config, time_ms, sig);
                None
            }
            (Some(role), MsMessage::Batches { epoch, upto }) => role
                .batches(epoch, upto)
                .map(|batches| MsMessage::BatchLog { batches }),
            _ => None,
        };
        self.pump();
        answer
    }

    /// The answer `from` gave to a request of ours.
    pub fn on_answer(&mut self, now: u64, from: NodeId, msg: MsMessage) {
        self.follower.answered(from, now);
        match msg {
            MsMessage::KeyRound(Some(deals)) if self.key_member.recover(&self.config, &deals) => {
                self.deal(now);
                self.sync_key();
            }
            MsMessage::Chain {
                configs,
                freshness,
                newest,
            } => {
                if configs.is_empty() {
                    self.fetch_whole(now, from, newest);
                } else {
                    self.out.push_back(Output::Install(configs));
                }
                self.out.extend(freshness.map(Output::Freshness));
            }
            MsMessage::Deltas {
                deltas,
                freshness,
                newest,
            } => {
                if deltas.is_empty() {
                    self.fetch_whole(now, from, newest);
                } else {
                    self.out.push_back(Output::InstallDeltas(deltas));
                }
                self.out.extend(freshness.map(Output::Freshness));
            }
            MsMessage::Head(head) => self.on_head(now, from, *head),
            MsMessage::Piece { index, bytes } => self.on_piece(now, from, index, bytes),
            MsMessage::BatchLog { batches }
                if self.role.as_mut().is_some_and(|r| r.on_batch_log(&batches)) =>
            {
                self.out.push_back(Output::Event(Event::CaughtUp { from }));
                // The batches replayed without executing one by one: the key's round too.
                self.sync_key();
            }
            MsMessage::Refused { reason } => {
                self.out
                    .push_back(Output::Event(Event::Refused { from, reason }));
            }
            _ => {}
        }
        self.pump();
    }

    // ---- a configuration fetched whole ----

    /// `from` answered a pull with nothing while it holds epoch `newest`: the next configuration
    /// (or its delta) does not fit in one message, so it is fetched whole, in pieces: first its
    /// head from `from`. One fetch at a time; `newest` is only a reason to try (a liar costs one
    /// head request per pull).
    fn fetch_whole(&mut self, now: u64, from: NodeId, newest: Epoch) {
        if newest <= self.config.epoch || self.whole.is_some() {
            return;
        }
        self.whole = Some(WholeFetch {
            sources: whole_sources(&self.config, from, self.key.node_id()),
            head_from: Some(from),
            download: None,
            until: now + PIECE_TIMEOUT_MS,
        });
        self.out.push_back(Output::Request {
            to: from,
            msg: MsMessage::HeadAsk {
                epoch: self.config.epoch + 1,
            },
        });
    }

    fn on_head(&mut self, now: u64, from: NodeId, head: ConfigHead) {
        let Some(w) = self.whole.as_mut().filter(|w| w.head_from == Some(from)) else {
            return;
        };
        match Download::new(&self.config, head) {
            Ok(d) => {
                w.head_from = None;
                w.download = Some(d);
                w.until = now + WHOLE_DEADLINE_MS;
                self.ask_pieces(now);
            }
            Err(e) => {
                self.whole = None;
                self.out.push_back(Output::Event(Event::Refused {
                    from,
                    reason: format!("configuration head: {e}"),
                }));
            }
        }
    }

    fn on_piece(&mut self, now: u64, from: NodeId, index: u32, bytes: Vec<u8>) {
        let Some(d) = self.whole.as_mut().and_then(|w| w.download.as_mut()) else {
            return;
        };
        if let Err(e) = d.on_piece(from, index, bytes) {
            self.out.push_back(Output::Event(Event::Refused {
                from,
                reason: format!("configuration piece: {e}"),
            }));
        }
        if !d.is_complete() {
            self.ask_pieces(now);
            return;
        }
        let Some(d) = self.whole.take().and_then(|w| w.download) else {
            return;
        };
        match d.finish(&self.config) {
            Ok(cc) => self.out.push_back(Output::Install(vec![cc])),
            Err(e) => self.out.push_back(Output::Event(Event::Refused {
                from,
                reason: format!("assembled configuration: {e}"),
            })),
        }
    }

    /// Asks the pieces due now; gives the fetch up when the head did not come in time, past the
    /// whole fetch's deadline, or when every source lied (the next pull that finds a newer epoch
    /// starts again, from the member it pulled).
    fn ask_pieces(&mut self, now: u64) {
        let Some(w) = self.whole.as_mut() else { return };
        let stuck = match w.download.as_mut() {
            Some(d) => !d.can_go_on(&w.sources),
            None => false,
        };
        if now >= w.until || stuck {
            self.whole = None;
            return;
        }
        let Some(d) = w.download.as_mut() else { return };
        let hash = d.head().hash;
        let epoch = d.head().epoch;
        for a in d.asks(now, &w.sources) {
            self.out.push_back(Output::Request {
                to: a.to,
                msg: MsMessage::PieceAsk {
                    epoch,
                    hash,
                    index: a.index,
                },
            });
        }
    }

    /// A request of ours to `from` failed: a failed pull is asked of another member at once.
    pub fn on_failed(&mut self, now: u64, from: NodeId, rotate: u64) {
        if let Some(w) = self.whole.as_mut() {
            if w.head_from == Some(from) {
                self.whole = None;
            } else if let Some(d) = w.download.as_mut() {
                d.on_source_failed(from);
                self.ask_pieces(now);
            }
        }
        if let Some(action) = self.follower.failed(from, now, &self.config, rotate) {
            self.out
                .push_back(Output::Event(Event::PullRetry { failed: from }));
            self.follow(action);
        }
    }

    /// The answer to a probe (`None`: no valid answer in time).
    pub fn on_probe_answer(
        &mut self,
        epoch: Epoch,
        target: NodeId,
        nonce: &[u8; 32],
        answer: Option<&Signature>,
    ) {
        let verdict = self
            .prober
            .as_mut()
            .filter(|p| p.epoch() == epoch)
            .and_then(|p| p.answered(&target, nonce, answer));
        if let Some(v) = verdict {
            self.want(MsOp::Probe {
                epoch,
                target,
                responsive: v.responsive,
            });
        }
        self.pump();
    }

    /// The last [`Output::Persist`] could not be written: the role sits the epoch's agreement
    /// out, and nothing queued after the failed write is carried out.
    pub fn persist_failed(&mut self) {
        if let Some(role) = self.role.as_mut() {
            role.persist_failed();
        }
        self.out.clear();
    }

    // ---- internals ----

    /// Tells the members whose requests the role executed in `epoch` (each other than this node:
    /// it learns from its role) that they were, so that they send their next operation.
    fn tell_executed(&mut self, epoch: Epoch, requests: &[Request]) {
        let me = self.key.node_id();
        for req in requests {
            let client = req.client.node_id();
            if client != me && self.config.is_member(&client) {
                self.out.push_back(Output::Send {
                    to: vec![client],
                    msg: MsMessage::Executed {
                        epoch,
                        seq: req.seq,
                    },
                });
            }
        }
    }

    /// Committee member `from` says this node's requests up to `seq` were executed in `epoch`:
    /// once `f_ms+1` members of the node's epoch say so of its outstanding request, at least one
    /// correct member executed it, and the next operation may go.
    fn on_executed(&mut self, from: NodeId, epoch: Epoch, seq: SeqNo) {
        if epoch != self.config.epoch || !self.config.committee.contains(&from) {
            return;
        }
        let told = self.executed_acks.entry(from).or_insert(0);
        *told = (*told).max(seq);
        let Some(req) = self.submissions.outstanding().cloned() else {
            return;
        };
        let saying = self
            .executed_acks
            .values()
            .filter(|s| **s >= req.seq)
            .count();
        if saying >= self.config.params.ms_quorum().one_correct() {
            self.submissions.executed(&[req]);
        }
    }

    fn follow(&mut self, action: FollowAction) {
        self.out.push_back(match action {
            // The node holds `after`: what it lacks comes as deltas against it.
            FollowAction::Pull { to, after } => Output::Request {
                to,
                msg: MsMessage::DeltasAfter { epoch: after },
            },
            FollowAction::Forward { to, after } => Output::Forward { to, after },
        });
    }

    /// Turns the role's actions into outputs, in order.
    fn pump(&mut self) {
        while let Some(action) = self.role.as_mut().and_then(Role::poll) {
            let Some(role) = self.role.as_ref() else {
                return;
            };
            let epoch = role.epoch();
            let out = match action {
                Action::Persist(saved) => Output::Persist(saved),
                Action::Agreement { to, bytes } => Output::Agreement {
                    to: to.map_or_else(|| role.peers(), |t| vec![t]),
                    bytes,
                },
                Action::Send { to, msg } => {
                    if matches!(msg, MsMessage::ConfigShare { .. }) {
                        self.out
                            .push_back(Output::Event(Event::SignedNext { epoch }));
                    }
                    Output::Send { to, msg }
                }
                Action::FetchBatches { upto, .. } => {
                    self.out
                        .push_back(Output::Event(Event::FetchingBatches { epoch, upto }));
                    for to in role.peers() {
                        self.out.push_back(Output::Request {
                            to,
                            msg: MsMessage::Batches { epoch, upto },
                        });
                    }
                    continue;
                }
                Action::Submit(op) => {
                    self.want(op);
                    continue;
                }
                Action::Executed {
                    seq,
                    requests,
                    outcomes,
                } => {
                    self.submissions.executed(&requests);
                    self.tell_executed(epoch, &requests);
                    self.sync_key();
                    Output::Event(Event::Executed {
                        epoch,
                        seq,
                        requests,
                        outcomes,
                    })
                }
                Action::OutOfOrder(e) => Output::Event(Event::OutOfOrder(e)),
                Action::EnteredView(view) => {
                    self.last_view_change = Some((epoch, view));
                    Output::Event(Event::EnteredView { epoch, view })
                }
                Action::Certified(cc) => {
                    // Pushed, as a delta against this epoch, to the root of the new
                    // configuration's tree, from where it goes down; every node's pulls fill in
                    // what is lost.
                    let roots = tree_order(&cc.config)
                        .into_iter()
                        .take(2)
                        .map(|m| m.id)
                        .collect();
                    self.out
                        .push_back(Output::Event(Event::Certified(cc.clone())));
                    self.out.push_back(Output::Send {
                        to: roots,
                        msg: MsMessage::PushDeltas {
                            deltas: vec![CertifiedDelta::of(role.config(), &cc)],
                            freshness: None,
                        },
                    });
                    Output::Install(vec![cc])
                }
                Action::Freshness(f) => Output::Freshness(f),
            };
            self.out.push_back(out);
        }
    }
}

/// How often a node that misses the share it must deal from asks for the round's deals again.
const KEY_ASK_MS: u64 = 2_000;

/// The longest a configuration fetched whole may take.
const WHOLE_DEADLINE_MS: u64 = 60_000;

/// A configuration coming whole: its head asked of `head_from`, then its pieces of `sources`;
/// given up at `until` (the head's timeout, then the whole fetch's deadline).
#[derive(Debug)]
struct WholeFetch {
    sources: Vec<NodeId>,
    head_from: Option<NodeId>,
    download: Option<Download>,
    until: u64,
}

/// Whom to ask for the pieces of the configuration after `config`: the node that said it holds
/// it and `config`'s committee (which certified it), never the node itself, in an order that
/// starts at a place of the node's own (so that nodes catching up spread over the sources).
fn whole_sources(config: &Configuration, from: NodeId, me: NodeId) -> Vec<NodeId> {
    let mut sources = vec![from];
    sources.extend(config.committee.iter().filter(|id| **id != from));
    sources.retain(|id| *id != me);
    if !sources.is_empty() {
        let start = me.0[0] as usize % sources.len();
        sources.rotate_left(start);
    }
    sources
}
