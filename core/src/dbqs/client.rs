//! The client operations of dBQS as state machines.
//!
//! A [`Client`] runs any number of concurrent operations. Each operation runs in one epoch at a time
//! against the replica group of its object in that epoch:
//! - write content block: send to the group, done at `2f+1` acknowledgements;
//! - read content block: ask the healthiest replica ([`Health`]), then one more each time the hedge
//!   delay (adaptive, from the latency of good answers) passes without a copy, and all the others at
//!   once on a wrong copy, a refusal or "not held"; accept the first copy that hashes to the id;
//!   "not found" only when `2f+1` replicas say so. A replica that is slow, fails or lies is asked
//!   last for a while, so one bad replica costs little;
//! - write public-key block: phase 1 learns the highest version from `2f+1` replicas (skipped when
//!   the caller gives the version), phase 2 sends the signed value, done at `2f+1` acknowledgements;
//! - read public-key block: `2f+1` replies, take the highest validly signed value; if fewer than
//!   `2f+1` replicas hold it, write it back until `2f+1` do, then return.
//!
//! Epochs: a reply of another epoch is never counted. A replica of a newer epoch answers `Stale`: the
//! client fetches the newer configurations from it, verifies them against its chain, and restarts
//! every operation of an older epoch in the newest one (a public-key write that already signed its
//! value re-sends the same value, so a restarted write is idempotent). A replica of an older epoch
//! answers `Behind`: the client pushes it the configurations and resends.
//!
//! Drive it with [`Client::submit`], [`Client::handle_message`] and [`Client::handle_timeout`]
//! (at [`Client::next_timeout`]); take [`ClientOutput`]s with [`Client::poll_output`].

use super::health::Health;
use super::msg::{DbqsMessage, Reject, RequestId};
use super::refs::RefRecord;
use crate::config::{CertifiedConfig, ConfigChain, ConfigError, Configuration, Epoch, Freshness};
use crate::crypto::{Keypair, NodeId, ObjectId};
use crate::object::{check_content, content_id, ObjectError, PkBlock, Stamp};
use crate::quorum::Tally;
use crate::wire::{decode, encode_msg};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A client-side operation handle.
pub type OpId = u64;

/// Options of a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Resend unanswered requests after this many milliseconds.
    pub retransmit_ms: u64,
    /// Give up on an operation after this many milliseconds (`None`: never).
    pub op_timeout_ms: Option<u64>,
    /// The first request id. Choose it at random for each client incarnation, so that late replies
    /// to a previous incarnation (same key, same epoch) cannot match a new request.
    pub first_request_id: u64,
    /// When set, the client starts an operation only while it holds a freshness certificate of its
    /// newest epoch younger than this many milliseconds (see [`Freshness`]); otherwise the operation
    /// waits and the client asks for one ([`ClientOutput::NeedFreshness`]).
    pub freshness_lease_ms: Option<u64>,
    /// A content read asks one more replica each time this long passes without a copy, at the
    /// least: the delay follows the latency of good answers ([`Health::hedge_delay`]), between this
    /// and `retransmit_ms`.
    pub hedge_min_ms: u64,
    #[cfg(feature = "mutants")]
    pub mutant: super::Mutant,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retransmit_ms: 500,
            op_timeout_ms: None,
            first_request_id: 1,
            freshness_lease_ms: None,
            hedge_min_ms: 20,
            #[cfg(feature = "mutants")]
            mutant: super::Mutant::None,
        }
    }
}

/// An operation a caller asks for.
#[derive(Clone, Debug)]
pub enum Operation {
    /// Store `data` as a content block, held by `hold`'s owner (an owner-signed
    /// [`RefRecord::hold`] of the block).
    PutContent {
        data: Vec<u8>,
        hold: RefRecord,
    },
    /// Record an owner's signed reference, normally a release ([`RefRecord::release`]), at `2f+1`
    /// replicas of its block: once every owner released a block, its replicas delete it after
    /// their grace period.
    Reference {
        record: RefRecord,
    },
    GetContent {
        id: ObjectId,
    },
    /// Write `value` to `owner`'s block `label`; `version: None` discovers the version first.
    PutPk {
        /// Boxed: a key pair is large, and most operations carry none.
        owner: Box<Keypair>,
        label: Vec<u8>,
        value: Vec<u8>,
        version: Option<u64>,
    },
    GetPk {
        id: ObjectId,
    },
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    ContentStored {
        id: ObjectId,
    },
    /// `2f+1` replicas recorded the reference.
    RefStored {
        id: ObjectId,
    },
    /// `None`: `2f+1` replicas said they do not hold it.
    Content {
        id: ObjectId,
        data: Option<Vec<u8>>,
    },
    /// The value was written as `stamp`.
    PkStored {
        stamp: Stamp,
    },
    Pk {
        block: Option<PkBlock>,
    },
    Failed(OpError),
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("no quorum answered within the operation timeout")]
    Timeout,
    #[error("the replicas are out of space")]
    NoSpace,
    #[error("more than f replicas refused the request: {0:?}")]
    Refused(Reject),
    #[error("invalid request: {0}")]
    Invalid(ObjectError),
    #[error("the cluster does not know this client's key (not authorized): mount with the cluster's client key, or have the operator list this key among the cluster's clients")]
    NotAuthorized,
}

/// What the driver should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOutput {
    /// Send `bytes` to node `to` (a member of the client's newest configuration). A message for
    /// several nodes is encoded once and shared ([`Bytes`] clones are references).
    Send { to: NodeId, bytes: Bytes },
    /// Operation `op` finished.
    Done { op: OpId, outcome: Outcome },
    /// `from` sent something no correct replica sends (for logs and evidence).
    Misbehaviour { from: NodeId, what: &'static str },
    /// The client moved to a newer epoch.
    EpochChanged { epoch: Epoch },
    /// Operations wait for a freshness certificate of `epoch` (or a newer configuration): fetch one
    /// and give it to [`Client::learn_freshness`].
    NeedFreshness { epoch: Epoch },
}

/// The phase an operation is in, with what it has collected.
#[derive(Debug)]
enum Phase {
    PutContent {
        id: ObjectId,
        data: Vec<u8>,
        hold: RefRecord,
        acks: Tally<()>,
        refusals: Tally<Reject>,
    },
    Reference {
        record: RefRecord,
        acks: Tally<()>,
        refusals: Tally<Reject>,
    },
    GetContent {
        id: ObjectId,
        /// Replicas asked, with when they were first asked.
        asked: BTreeMap<NodeId, u64>,
        missing: Tally<()>,
    },
    /// Phase 1 of a public-key write, or a public-key read: collect stamps from a quorum.
    Collect {
        id: ObjectId,
        stamps: Tally<Option<Stamp>>,
        best: Option<PkBlock>,
        refusals: Tally<Reject>,
        /// A read whose quorum of answers does not show `2f+1` holders of the highest value waits
        /// until then for the rest of the group (whose answers may show them) before writing back.
        linger: Option<u64>,
    },
    /// Phase 2 of a public-key write, or a read's write-back: until a quorum holds at least `block`.
    Write {
        block: PkBlock,
        holders: Tally<()>,
        refusals: Tally<Reject>,
    },
}

#[derive(Debug)]
struct OpState {
    op: Operation,
    epoch: Epoch,
    rid: RequestId,
    phase: Phase,
    /// For a public-key write: the value once signed (kept across epoch restarts).
    signed: Option<PkBlock>,
    deadline: Option<u64>,
    retransmit_at: u64,
    /// A content read asks one more replica then.
    hedge_at: Option<u64>,
    /// Replicas that refused the client as not authorized.
    unauthorized: BTreeSet<NodeId>,
}

/// A dBQS client.
pub struct Client {
    me: NodeId,
    chain: ConfigChain,
    opts: ClientOptions,
    ops: BTreeMap<OpId, OpState>,
    by_rid: BTreeMap<RequestId, OpId>,
    /// Outstanding configuration fetches: request id → node asked.
    fetches: BTreeMap<RequestId, NodeId>,
    next_op: OpId,
    next_rid: RequestId,
    /// The newest epoch reported with [`ClientOutput::EpochChanged`].
    announced: Epoch,
    /// The newest verified freshness certificate of the client's newest epoch.
    freshness: Option<Freshness>,
    /// Operations waiting for a fresh certificate before they start.
    waiting: BTreeSet<OpId>,
    health: Health,
    out: VecDeque<ClientOutput>,
}

impl Client {
    /// A client known as `me`, starting from the verified configurations in `chain`.
    pub fn new(me: NodeId, chain: ConfigChain, opts: ClientOptions) -> Client {
        let chain_epoch = chain.epoch();
        let first_rid = opts.first_request_id;
        Client {
            me,
            chain,
            opts,
            ops: BTreeMap::new(),
            by_rid: BTreeMap::new(),
            fetches: BTreeMap::new(),
            next_op: 1,
            next_rid: first_rid,
            announced: chain_epoch,
            freshness: None,
            waiting: BTreeSet::new(),
            health: Health::new(),
            out: VecDeque::new(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn epoch(&self) -> Epoch {
        self.chain.epoch()
    }

    pub fn config(&self) -> &Configuration {
        self.chain.config()
    }

    pub fn chain(&self) -> &ConfigChain {
        &self.chain
    }

    /// Number of operations in flight.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    pub fn poll_output(&mut self) -> Option<ClientOutput> {
        self.out.pop_front()
    }

    /// The earliest time at which [`Client::handle_timeout`] has work to do.
    pub fn next_timeout(&self) -> Option<u64> {
        self.ops
            .iter()
            .map(|(id, o)| {
                if self.waiting.contains(id) {
                    return o.deadline.unwrap_or(u64::MAX);
                }
                o.deadline
                    .into_iter()
                    .chain(o.hedge_at)
                    .fold(o.retransmit_at, u64::min)
            })
            .min()
    }

    /// Learns newer configurations from outside (for example the epoch follower); restarts
    /// operations of older epochs.
    pub fn learn_configs(
        &mut self,
        now: u64,
        configs: Vec<CertifiedConfig>,
    ) -> Result<(), crate::config::ConfigError> {
        let res = self.chain.extend(configs);
        self.restart_stale_ops(now);
        res.map(|_| ())
    }

    /// Whether the client may use its newest configuration at `now`.
    fn fresh(&self, now: u64) -> bool {
        match self.opts.freshness_lease_ms {
            None => true,
            Some(lease) => self
                .freshness
                .as_ref()
                .is_some_and(|f| f.epoch == self.epoch() && now <= f.time_ms.saturating_add(lease)),
        }
    }

    /// Learns a freshness certificate (verified against the configuration of its epoch, which the
    /// client must know) and starts the operations that waited for one.
    pub fn learn_freshness(&mut self, now: u64, cert: Freshness) -> Result<(), ConfigError> {
        let config = self
            .chain
            .get(cert.epoch)
            .ok_or(ConfigError::Unknown(cert.epoch))?;
        cert.verify(&config.config)?;
        let newer = self
            .freshness
            .as_ref()
            .is_none_or(|f| (cert.epoch, cert.time_ms) > (f.epoch, f.time_ms));
        if cert.epoch == self.epoch() && newer {
            self.freshness = Some(cert);
        }
        if self.fresh(now) {
            for id in std::mem::take(&mut self.waiting) {
                self.start(now, id);
            }
        }
        Ok(())
    }

    /// Starts an operation.
    pub fn submit(&mut self, now: u64, op: Operation) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        let deadline = self.opts.op_timeout_ms.map(|t| now + t);
        let state = OpState {
            op,
            epoch: self.epoch(),
            rid: 0,
            phase: Phase::GetContent {
                id: ObjectId([0; 32]),
                asked: BTreeMap::new(),
                missing: Tally::new(),
            },
            signed: None,
            deadline,
            retransmit_at: now,
            hedge_at: None,
            unauthorized: BTreeSet::new(),
        };
        self.ops.insert(id, state);
        self.start(now, id);
        id
    }

    fn quorum(&self) -> usize {
        let q = self.config().quorum();
        #[cfg(feature = "mutants")]
        if self.opts.mutant == super::Mutant::SmallQuorum {
            return q.one_correct();
        }
        q.quorum()
    }

    /// Most refusals the group can send while a quorum of it still can answer: `n - quorum`.
    fn max_refusals(&self) -> usize {
        self.config().quorum().group_size() - self.quorum()
    }

    fn fresh_rid(&mut self, op: OpId) -> RequestId {
        let rid = self.next_rid;
        self.next_rid = self.next_rid.wrapping_add(1);
        self.by_rid.insert(rid, op);
        rid
    }

    fn group_of(&self, x: &ObjectId) -> Vec<NodeId> {
        self.config().group(x).iter().map(|m| m.id).collect()
    }

    /// (Re)starts operation `id` in the client's newest epoch from its first phase.
    fn start(&mut self, now: u64, id: OpId) {
        let epoch = self.epoch();
        if !self.fresh(now) {
            if self.waiting.is_empty() {
                self.out.push_back(ClientOutput::NeedFreshness { epoch });
            }
            self.waiting.insert(id);
            return;
        }
        self.waiting.remove(&id);
        let Some(st) = self.ops.get(&id) else { return };
        let old_rid = st.rid;
        let phase = match (&st.op, &st.signed) {
            (Operation::PutContent { data, hold }, _) => Phase::PutContent {
                id: content_id(data),
                data: data.clone(),
                hold: hold.clone(),
                acks: Tally::new(),
                refusals: Tally::new(),
            },
            (Operation::Reference { record }, _) => Phase::Reference {
                record: record.clone(),
                acks: Tally::new(),
                refusals: Tally::new(),
            },
            (Operation::GetContent { id }, _) => Phase::GetContent {
                id: *id,
                asked: BTreeMap::new(),
                missing: Tally::new(),
            },
            (Operation::PutPk { .. }, Some(block)) => Phase::Write {
                block: block.clone(),
                holders: Tally::new(),
                refusals: Tally::new(),
            },
            (
                Operation::PutPk {
                    owner,
                    label,
                    value,
                    version: Some(v),
                },
                None,
            ) => match PkBlock::sign(owner, label, *v, value.clone()) {
                Ok(block) => Phase::Write {
                    block,
                    holders: Tally::new(),
                    refusals: Tally::new(),
                },
                Err(e) => return self.finish(id, Outcome::Failed(OpError::Invalid(e))),
            },
            (Operation::PutPk { owner, label, .. }, None) => Phase::Collect {
                id: crate::object::pk_block_id(&owner.public(), label),
                stamps: Tally::new(),
                best: None,
                refusals: Tally::new(),
                linger: None,
            },
            (Operation::GetPk { id }, _) => Phase::Collect {
                id: *id,
                stamps: Tally::new(),
                best: None,
                refusals: Tally::new(),
                linger: None,
            },
        };
        self.by_rid.remove(&old_rid);
        let rid = self.fresh_rid(id);
        let st = self.ops.get_mut(&id).expect("checked above");
        if let Phase::Write { block, .. } = &phase {
            st.signed = Some(block.clone());
        }
        st.epoch = epoch;
        st.rid = rid;
        st.phase = phase;
        self.send_phase(now, id, Send::First);
    }

    /// Sends the current phase's request: to every group member that has not answered (or, for a
    /// first content read, to one of them).
    fn send_phase(&mut self, now: u64, id: OpId, mode: Send) {
        let Some(st) = self.ops.get(&id) else { return };
        let rid = st.rid;
        let (target, msg) = (st.phase.target(), st.phase.request(rid));
        let group = self.group_of(&target);
        let st = self.ops.get_mut(&id).expect("checked above");
        let answered = |n: &NodeId| match &st.phase {
            Phase::PutContent { acks, refusals, .. } | Phase::Reference { acks, refusals, .. } => {
                acks.contains(n) || refusals.contains(n)
            }
            Phase::GetContent { missing, .. } => missing.contains(n),
            Phase::Collect {
                stamps, refusals, ..
            } => stamps.contains(n) || refusals.contains(n),
            Phase::Write {
                holders, refusals, ..
            } => holders.contains(n) || refusals.contains(n),
        };
        let mut to: Vec<NodeId> = group.iter().filter(|n| !answered(n)).copied().collect();
        // A read lingering for the rest of the group keeps its deadline; a content read sets its
        // next hedge below.
        st.hedge_at = match &st.phase {
            Phase::Collect { linger, .. } => *linger,
            _ => None,
        };
        if let Phase::GetContent { asked, .. } = &mut st.phase {
            // Healthiest first; equally healthy replicas rotate by request id, so load spreads.
            let unasked: Vec<NodeId> = to
                .iter()
                .filter(|n| !asked.contains_key(n))
                .copied()
                .collect();
            let unasked = self.health.order(&unasked, rid as usize, now);
            match mode {
                // One replica at a time, the next after each hedge delay without a copy.
                Send::First | Send::Hedge => to = unasked.into_iter().take(1).collect(),
                Send::Widen => to = unasked,
                Send::Retransmit => {}
            }
            for n in &to {
                asked.entry(*n).or_insert(now);
            }
            if asked.len() < group.len() {
                let delay = self
                    .health
                    .hedge_delay(self.opts.hedge_min_ms, self.opts.retransmit_ms);
                st.hedge_at = Some(now + delay);
            }
        }
        if mode != Send::Hedge {
            st.retransmit_at = now + self.opts.retransmit_ms;
        }
        let bytes = Bytes::from(encode_msg(st.epoch, msg));
        for n in to {
            self.out.push_back(ClientOutput::Send {
                to: n,
                bytes: bytes.clone(),
            });
        }
    }

    fn finish(&mut self, id: OpId, outcome: Outcome) {
        if let Some(st) = self.ops.remove(&id) {
            self.by_rid.remove(&st.rid);
            self.out.push_back(ClientOutput::Done { op: id, outcome });
        }
    }

    /// `from` sent something no correct replica sends: reported, counted against its health, and
    /// content reads that wait for it ask another replica at once.
    fn misbehaviour(&mut self, now: u64, from: NodeId, what: &'static str) {
        self.out
            .push_back(ClientOutput::Misbehaviour { from, what });
        self.peer_failed(now, from);
    }

    /// Handles the timers that are due at `now`: retransmissions and operation deadlines.
    pub fn handle_timeout(&mut self, now: u64) {
        // A configuration fetch whose answer was lost is asked again at the next `Stale`.
        self.fetches.clear();
        let due: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(id, o)| {
                ((o.retransmit_at <= now || o.hedge_at.is_some_and(|h| h <= now))
                    && !self.waiting.contains(id))
                    || o.deadline.is_some_and(|d| d <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let st = &self.ops[&id];
            if st.deadline.is_some_and(|d| d <= now) {
                self.finish(id, Outcome::Failed(OpError::Timeout));
            } else if let Phase::Collect {
                stamps,
                best,
                linger: Some(t),
                ..
            } = &st.phase
            {
                if *t <= now {
                    // The rest of the group did not answer in time: decide on what came.
                    let step = collect_step(&st.op, stamps, best.clone(), self.quorum(), true);
                    self.apply(now, id, step);
                } else {
                    self.send_phase(now, id, Send::Retransmit);
                }
            } else if st.retransmit_at <= now {
                self.send_phase(now, id, Send::Retransmit);
            } else {
                self.hedge(now, id);
            }
        }
    }

    /// The hedge delay of content read `id` passed without a copy: the replicas it waits for count
    /// as slow, and one more is asked.
    fn hedge(&mut self, now: u64, id: OpId) {
        let Some(Phase::GetContent { asked, missing, .. }) = self.ops.get(&id).map(|o| &o.phase)
        else {
            return;
        };
        let slow: Vec<NodeId> = asked
            .keys()
            .filter(|n| !missing.contains(n))
            .copied()
            .collect();
        for n in slow {
            self.health.slow(n, now);
        }
        self.send_phase(now, id, Send::Hedge);
    }

    /// A request to `node` failed in transport (the driver could not reach it, or it answered
    /// nothing): it counts against the replica's health, and content reads that wait for it ask
    /// another replica at once.
    pub fn peer_failed(&mut self, now: u64, node: NodeId) {
        self.health.failed(node, now);
        let waiting: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(id, o)| {
                !self.waiting.contains(id)
                    && matches!(&o.phase, Phase::GetContent { asked, missing, .. }
                        if asked.contains_key(&node) && !missing.contains(&node))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.send_phase(now, id, Send::Hedge);
        }
    }

    /// The replicas' health as this client sees it.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Handles bytes received from `from`.
    pub fn handle_message(&mut self, now: u64, from: NodeId, bytes: &[u8]) {
        let env = match decode::<DbqsMessage>(bytes) {
            Ok(env) => env,
            Err(_) => return self.misbehaviour(now, from, "undecodable message"),
        };
        let Some(rid) = env.msg.reply_rid() else {
            return self.misbehaviour(now, from, "request sent to a client");
        };
        if let DbqsMessage::Configs { configs, .. } = env.msg {
            // Configurations prove themselves, so any that extend the chain are welcome.
            self.fetches.remove(&rid);
            match self.chain.extend(configs) {
                // A gap (an answer meant for a client further ahead) proves nothing either way.
                Ok(_) | Err(ConfigError::WrongEpoch { .. }) => {}
                Err(_) => self.misbehaviour(now, from, "sent configurations that do not verify"),
            }
            return self.restart_stale_ops(now);
        }
        let Some(&op) = self.by_rid.get(&rid) else {
            return;
        }; // a late reply of a finished phase
        let st = &self.ops[&op];
        let op_epoch = st.epoch;
        let target = st.phase.target();
        if !self.group_of(&target).contains(&from) {
            return self.misbehaviour(now, from, "reply from outside the group");
        }
        match env.msg {
            DbqsMessage::Stale { .. } => {
                if env.epoch > op_epoch {
                    self.fetch_configs(from);
                }
                return;
            }
            DbqsMessage::Behind { .. } => {
                if env.epoch < op_epoch {
                    let configs = self
                        .chain
                        .after(env.epoch, super::msg::MAX_CONFIGS_PER_REPLY);
                    let epoch = self.epoch();
                    self.out.push_back(ClientOutput::Send {
                        to: from,
                        bytes: encode_msg(epoch, DbqsMessage::PushConfigs { configs }).into(),
                    });
                    self.resend_to(op, from);
                }
                return;
            }
            _ => {}
        }
        if env.epoch != op_epoch {
            return; // replies of different epochs never combine
        }
        self.on_reply(now, op, from, env.msg);
    }

    fn fetch_configs(&mut self, from: NodeId) {
        if self.fetches.values().any(|n| *n == from) {
            return;
        }
        let rid = self.next_rid;
        self.next_rid = self.next_rid.wrapping_add(1);
        self.fetches.insert(rid, from);
        let epoch = self.epoch();
        self.out.push_back(ClientOutput::Send {
            to: from,
            bytes: encode_msg(epoch, DbqsMessage::GetConfigs { rid, after: epoch }).into(),
        });
    }

    fn restart_stale_ops(&mut self, now: u64) {
        let epoch = self.epoch();
        if epoch > self.announced {
            self.announced = epoch;
            self.out.push_back(ClientOutput::EpochChanged { epoch });
            // Fetches in flight can tell us nothing newer than what restarts now.
            self.fetches.clear();
        }
        let stale: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, o)| o.epoch < epoch)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.start(now, id);
        }
    }

    /// Resends the current request of `op` to one node (after pushing it configurations).
    fn resend_to(&mut self, op: OpId, to: NodeId) {
        let st = &self.ops[&op];
        let msg = st.phase.request(st.rid);
        self.out.push_back(ClientOutput::Send {
            to,
            bytes: encode_msg(st.epoch, msg).into(),
        });
    }

    fn on_reply(&mut self, now: u64, op: OpId, from: NodeId, msg: DbqsMessage) {
        let quorum = self.quorum();
        let max_refusals = self.max_refusals();
        let write_back = {
            #[cfg(feature = "mutants")]
            {
                self.opts.mutant != super::Mutant::NoWriteBack
            }
            #[cfg(not(feature = "mutants"))]
            {
                true
            }
        };
        let group_size = self.config().quorum().group_size();
        let linger_ms = self
            .health
            .hedge_delay(self.opts.hedge_min_ms, self.opts.retransmit_ms);
        let st = self.ops.get_mut(&op).expect("caller checked");
        if let DbqsMessage::Rejected {
            reason: Reject::NotAuthorized,
            ..
        } = msg
        {
            // Whatever the phase: once more than `f` replicas refuse the key, no quorum will serve it.
            st.unauthorized.insert(from);
            if st.unauthorized.len() > max_refusals {
                self.finish(op, Outcome::Failed(OpError::NotAuthorized));
            }
            return;
        }
        let mut bad: Option<&'static str> = None;
        // A good copy of a content block, and how long after asking.
        let mut good: Option<u64> = None;
        let mut next: Option<Step> = None;
        match (&mut st.phase, msg) {
            (Phase::PutContent { id, acks, .. }, DbqsMessage::ContentStored { id: got, .. }) => {
                if got != *id {
                    bad = Some("acknowledged another block");
                } else {
                    acks.add(from, ());
                    if acks.len() >= quorum {
                        next = Some(Step::Done(Outcome::ContentStored { id: *id }));
                    }
                }
            }
            (Phase::Reference { record, acks, .. }, DbqsMessage::RefStored { id: got, .. }) => {
                if got != record.id {
                    bad = Some("acknowledged another block");
                } else {
                    acks.add(from, ());
                    if acks.len() >= quorum {
                        next = Some(Step::Done(Outcome::RefStored { id: got }));
                    }
                }
            }
            (
                Phase::GetContent { id, .. } | Phase::Collect { id, .. },
                DbqsMessage::Content { id: got, .. } | DbqsMessage::Pk { id: got, .. },
            ) if got != *id => {
                // A reply about another object is never counted, not even as "not held".
                bad = Some("answered about another object");
            }
            (
                Phase::GetContent {
                    id, missing, asked, ..
                },
                DbqsMessage::Content { data, .. },
            ) => match data {
                Some(data) if check_content(id, &data).is_ok() => {
                    let asked_at = asked.get(&from).copied().unwrap_or(now);
                    good = Some(now.saturating_sub(asked_at));
                    next = Some(Step::Done(Outcome::Content {
                        id: *id,
                        data: Some(data),
                    }));
                }
                Some(_) => {
                    bad = Some("served a content block that does not match its id");
                    missing.add(from, ());
                    next = Some(Step::AskAll);
                }
                None => {
                    missing.add(from, ());
                    next = Some(if missing.len() >= quorum {
                        Step::Done(Outcome::Content {
                            id: *id,
                            data: None,
                        })
                    } else {
                        Step::AskAll
                    });
                }
            },
            (Phase::GetContent { .. }, DbqsMessage::NotReady { .. }) => next = Some(Step::AskAll),
            (
                Phase::Collect {
                    id,
                    stamps,
                    best,
                    linger,
                    ..
                },
                DbqsMessage::Pk { block, .. },
            ) => {
                let valid = match block {
                    Some(b) if b.verify_as(id).is_ok() => Some(b),
                    Some(_) => {
                        bad = Some("served a public-key block that does not verify");
                        None
                    }
                    None => None,
                };
                let stamp = valid.as_ref().map(|b| b.stamp());
                // A retransmitted request may be answered again with a newer value; the first answer counts.
                stamps.add(from, stamp);
                if let Some(b) = valid {
                    if best.as_ref().is_none_or(|cur| b.stamp() > cur.stamp()) {
                        *best = Some(b);
                    }
                }
                if stamps.len() >= quorum {
                    let top = best.as_ref().map(|b| b.stamp());
                    let holders = stamps.count(|s| *s == top && top.is_some());
                    // A write-back costs a round; the answers of the rest of the group, likely on
                    // their way, may show `2f+1` holders already.
                    let would_write_back = matches!(st.op, Operation::GetPk { .. })
                        && top.is_some()
                        && holders < quorum
                        && write_back;
                    if would_write_back
                        && stamps.len() < group_size
                        && linger.is_none_or(|t| now < t)
                    {
                        if linger.is_none() {
                            *linger = Some(now + linger_ms);
                            next = Some(Step::Linger(now + linger_ms));
                        }
                    } else {
                        next = Some(collect_step(
                            &st.op,
                            stamps,
                            best.take(),
                            quorum,
                            write_back,
                        ));
                    }
                }
            }
            (Phase::Write { block, holders, .. }, DbqsMessage::PkStored { id, stamp, .. }) => {
                if id != block.id() {
                    bad = Some("acknowledged another block");
                } else if stamp >= block.stamp() {
                    holders.add(from, ());
                    if holders.len() >= quorum {
                        next = Some(Step::Done(match st.op {
                            Operation::GetPk { .. } => Outcome::Pk {
                                block: Some(block.clone()),
                            },
                            _ => Outcome::PkStored {
                                stamp: block.stamp(),
                            },
                        }));
                    }
                }
            }
            (Phase::Collect { .. } | Phase::Write { .. }, DbqsMessage::NotReady { .. }) => {}
            (
                Phase::PutContent { refusals, .. }
                | Phase::Reference { refusals, .. }
                | Phase::Collect { refusals, .. }
                | Phase::Write { refusals, .. },
                DbqsMessage::Rejected { reason, .. },
            ) => {
                refusals.add(from, reason);
                if refusals.len() > max_refusals {
                    let no_space = refusals.count(|r| *r == Reject::NoSpace);
                    let err = if no_space > 0 {
                        OpError::NoSpace
                    } else {
                        OpError::Refused(reason)
                    };
                    next = Some(Step::Done(Outcome::Failed(err)));
                }
            }
            (Phase::GetContent { missing, .. }, DbqsMessage::Rejected { .. }) => {
                // A refusal is no copy; it is not a "not found" vote either.
                let _ = missing;
                next = Some(Step::AskAll);
            }
            _ => bad = Some("reply does not fit the request"),
        }
        if let Some(what) = bad {
            self.misbehaviour(now, from, what);
        }
        if let Some(latency) = good {
            self.health.answered(from, now, latency);
        }
        if let Some(step) = next {
            self.apply(now, op, step);
        }
    }

    /// Carries out what a reply or a timer decided for operation `op`.
    fn apply(&mut self, now: u64, op: OpId, step: Step) {
        match step {
            Step::Linger(until) => {
                if let Some(st) = self.ops.get_mut(&op) {
                    st.hedge_at = Some(until);
                }
            }
            Step::Done(outcome) => self.finish(op, outcome),
            Step::AskAll => self.send_phase(now, op, Send::Widen),
            Step::Write(block) => {
                let st = self.ops.get_mut(&op).expect("caller checked");
                st.signed = Some(block.clone());
                self.enter_write(now, op, block, Tally::new());
            }
            Step::WriteBack(block, have) => self.enter_write(now, op, block, have),
        }
    }

    fn enter_write(&mut self, now: u64, op: OpId, block: PkBlock, holders: Tally<()>) {
        let old = self.ops[&op].rid;
        self.by_rid.remove(&old);
        let rid = self.fresh_rid(op);
        let st = self.ops.get_mut(&op).expect("caller checked");
        st.rid = rid;
        st.phase = Phase::Write {
            block,
            holders,
            refusals: Tally::new(),
        };
        self.send_phase(now, op, Send::First);
    }
}

impl Phase {
    /// The object the phase is about (whose group it asks).
    fn target(&self) -> ObjectId {
        match self {
            Phase::PutContent { id, .. }
            | Phase::GetContent { id, .. }
            | Phase::Collect { id, .. } => *id,
            Phase::Reference { record, .. } => record.id,
            Phase::Write { block, .. } => block.id(),
        }
    }

    /// The phase's request, with request id `rid`.
    fn request(&self, rid: RequestId) -> DbqsMessage {
        match self {
            Phase::PutContent { id, data, hold, .. } => DbqsMessage::PutContent {
                rid,
                id: *id,
                data: data.clone(),
                hold: hold.clone(),
            },
            Phase::Reference { record, .. } => DbqsMessage::Reference {
                rid,
                record: record.clone(),
            },
            Phase::GetContent { id, .. } => DbqsMessage::GetContent { rid, id: *id },
            Phase::Collect { id, .. } => DbqsMessage::GetPk { rid, id: *id },
            Phase::Write { block, .. } => DbqsMessage::PutPk {
                rid,
                block: block.clone(),
            },
        }
    }
}

/// Whom [`Client::send_phase`] sends to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Send {
    /// A phase's first request: the whole group (one replica for a content read).
    First,
    /// A content read asks one more replica (the healthiest not asked yet).
    Hedge,
    /// A content read widens to the replicas not asked yet.
    Widen,
    /// Every replica that has not answered.
    Retransmit,
}

enum Step {
    /// A read waits for more answers until then before it writes back.
    Linger(u64),
    Done(Outcome),
    AskAll,
    Write(PkBlock),
    WriteBack(PkBlock, Tally<()>),
}

/// What a quorum (or more) of collected stamps decides: a read returns the highest validly signed
/// value, written back first unless `2f+1` of the answers hold it; a write with version discovery
/// signs the next version.
fn collect_step(
    op: &Operation,
    stamps: &Tally<Option<Stamp>>,
    best: Option<PkBlock>,
    quorum: usize,
    write_back: bool,
) -> Step {
    let top = best.as_ref().map(|b| b.stamp());
    let holders = stamps.count(|s| *s == top && top.is_some());
    match (op, best) {
        (Operation::GetPk { .. }, None) => Step::Done(Outcome::Pk { block: None }),
        (Operation::GetPk { .. }, Some(b)) if holders >= quorum || !write_back => {
            Step::Done(Outcome::Pk { block: Some(b) })
        }
        (Operation::GetPk { .. }, Some(b)) => {
            let mut have = Tally::new();
            for (n, s) in stamps.iter() {
                if *s == top {
                    have.add(*n, ());
                }
            }
            Step::WriteBack(b, have)
        }
        (
            Operation::PutPk {
                owner,
                label,
                value,
                ..
            },
            b,
        ) => {
            let version = b.map_or(1, |b| b.version.saturating_add(1));
            match PkBlock::sign(owner, label, version, value.clone()) {
                Ok(block) => Step::Write(block),
                Err(e) => Step::Done(Outcome::Failed(OpError::Invalid(e))),
            }
        }
        _ => unreachable!("only public-key operations collect stamps"),
    }
}
