//! The committee role of one member in one epoch, as a sans-IO machine: the agreement, the MS
//! application on top of it, what the member persists, its catching up to a stable checkpoint,
//! its freshness shares, the epoch timer, and the next configuration's certificate. (Probing is
//! every member's, committee or not: [`super::node::MsNode`] runs it.)
//!
//! The node's MS driver and the agreement simulator run this very machine: they feed it inputs
//! (messages, answers, the clock) and carry out its [`Action`]s in the order it returns them.
//!
//! Goals:
//! - **Persist before announcing.** Every statement the agreement signs leaves only after an
//!   [`Action::Persist`] that holds it (with the batches executed so far), so a member restarted
//!   from what it persisted ([`Resume::Saved`]) never signs two different things for one slot. A
//!   driver that cannot persist calls [`Role::persist_failed`]: the member sits the epoch's
//!   agreement out, and nothing queued after the failed write leaves.
//! - **One application state.** Decided batches execute in order on [`App`]; a member the
//!   agreement skipped to a stable checkpoint fetches the batches up to it from the others
//!   ([`Action::FetchBatches`]), accepts them only if they replay to the agreed digest, and holds
//!   the decisions that came meanwhile until then.
//! - **Timers from one clock.** The epoch timer proposes `EndEpoch`; freshness shares are signed
//!   every third of the freshness period. All run on the
//!   driver's milliseconds ([`Role::on_timer`], [`Role::next_timer`]); freshness times are the
//!   driver's wall clock, as readers compare them to theirs.
//!
//! Non-goals: sending, retrying and timing out requests (the driver's), the submission queue of
//! the node (reports come out as [`Action::Submit`]), configurations installed by the follower.
//!
//! Fault model: every input may come from a Byzantine peer: agreement messages are checked by
//! [`Agreement`], shares by [`FreshnessShares`] and [`NextConfig`], batch logs by replaying them
//! to the digest the agreement certified.

use super::app::{App, OutOfOrder, Outcome};
use super::key::KeyShare;
use super::membership::{Executed, Membership, MsOp};
use super::pbft::{Agreement, Digest, Options, Output, Request, SeqNo, View};
use super::shares::{FreshnessShares, NextConfig};
use super::threshold::{SignOut, ThresholdSigning};
use super::wire::{MsMessage, SignStep};
use crate::config::{CertifiedConfig, ConfigHash, Configuration, Epoch, Freshness};
use crate::crypto::{Keypair, NodeId, PublicKey, Signature};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// What the driver must do, in order. An [`Action::Persist`] must be durable before any action
/// after it is carried out.
#[derive(Clone, Debug)]
pub enum Action {
    /// Write this durably, replacing the previous record of the epoch and appending the batches.
    Persist(Saved),
    /// Agreement bytes for member `to`, or for every other committee member (`None`).
    Agreement { to: Option<NodeId>, bytes: Vec<u8> },
    /// An MS message for these committee members (certificate and freshness shares).
    Send { to: Vec<NodeId>, msg: MsMessage },
    /// Ask the other committee members for the batches up to `upto` (whose application digest is
    /// `digest`) and feed the answers to [`Role::on_batch_log`].
    FetchBatches { upto: SeqNo, digest: Digest },
    /// Submit this operation to the MS (evidence, the end of the epoch).
    Submit(MsOp),
    /// Batch `seq` executed (for logs and checks).
    Executed {
        seq: SeqNo,
        requests: Vec<Request>,
        outcomes: Vec<Outcome>,
    },
    /// A decided batch was not the next one and was not executed (for logs and checks).
    OutOfOrder(OutOfOrder),
    /// The agreement entered `view` (for logs).
    EnteredView(View),
    /// The next configuration is certified: install it and push it to the root of its tree.
    Certified(CertifiedConfig),
    /// A freshness certificate was assembled.
    Freshness(Freshness),
}

/// What a member persists in an epoch ([`Action::Persist`]): read back by [`Resume::Saved`].
#[derive(Clone, Debug)]
pub struct Saved {
    pub epoch: Epoch,
    /// The record that replaces the previous one.
    pub record: Vec<u8>,
    /// The number (from 1) of the first batch in `batches`; the ones before are already saved.
    pub first_batch: u64,
    /// Encoded batches to append.
    pub batches: Vec<Vec<u8>>,
}

/// How a role starts.
pub enum Resume<'a> {
    /// A fresh agreement: this member signed nothing in this epoch.
    Fresh,
    /// From what this member persisted in this epoch before a restart.
    Saved {
        record: &'a [u8],
        batches: &'a [Vec<u8>],
    },
    /// Without the agreement (the member may have signed something it cannot recall): it still
    /// signs freshness and certificate shares, and proposes the end of the epoch.
    SitOut,
}

/// What a role is made of.
pub struct Setup {
    pub key: Keypair,
    pub config: Configuration,
    /// The key that signs admission certificates.
    pub admission_key: PublicKey,
    /// The agreement's options ([`agreement_options`] for nodes).
    pub opts: Options,
    /// Whether the epoch timer proposes the end of the epoch (a driver that submits it itself,
    /// as the simulator's scripted clients do, turns it off).
    pub epoch_timer: bool,
    /// A fresh secret (never the same twice, across restarts too) for the nonces of FROST.
    pub seed: [u8; 32],
}

/// The agreement options nodes run an epoch's agreement with.
pub fn agreement_options(config: &Configuration) -> Options {
    Options {
        epoch: config.epoch,
        request_timeout_ms: 2_000,
        ..Options::default()
    }
}

/// The agreement's committee keys in committee order (index `i` leads views `i mod n`).
pub fn committee_keys(config: &Configuration) -> Vec<PublicKey> {
    config
        .committee
        .iter()
        .filter_map(|id| config.member(id).map(|m| m.key))
        .collect()
}

/// The committee role of one member in one epoch.
pub struct Role {
    key: Keypair,
    config: Configuration,
    /// `None` while sitting this epoch's agreement out.
    agreement: Option<Agreement>,
    app: App,
    /// How many of the app's batches are persisted.
    saved_batches: usize,
    /// Waiting for the batches up to a stable checkpoint: agreement outputs are held meanwhile.
    installing: Option<(SeqNo, Digest)>,
    /// When to ask again for those batches (every answer may be lost or false).
    fetch_again_at: u64,
    held: VecDeque<Output>,
    next: NextConfig,
    fresh: FreshnessShares,
    epoch_timer: bool,
    end_at: u64,
    next_fresh: u64,
    /// This member's signature over the next configuration, once the epoch ended here: sent
    /// again every [`SHARE_RESEND_MS`] while the role lives (a lost share must not leave another
    /// member short of a certificate).
    share: Option<MsMessage>,
    next_share: u64,
    /// A fresh secret for the nonces of FROST signing.
    seed: [u8; 32],
    /// This member's share of the MS key for this epoch, once its node holds it.
    key_share: Option<KeyShare>,
    /// The next configuration waiting for `key_share` to be certified under the MS key.
    waiting: Option<Configuration>,
    /// Its certification under the MS key, once started.
    threshold: Option<ThresholdSigning>,
    /// Freshness certificates signed under the MS key (when the configuration carries it), by
    /// time; the newest [`FRESH_SIGNINGS`] are kept. `fresh_due`: a time to sign once this
    /// member holds its share.
    fresh_signing: BTreeMap<u64, ThresholdSigning>,
    fresh_due: Option<u64>,
    /// Freshness signings started by this role: each draws its nonces from its own secret, even
    /// for a time signed before (a wall clock stepped back), so no nonce signs two packages.
    fresh_started: u64,
    /// Signing messages that came before this member started signing, with the hash they name
    /// (bounded per sender, so a Byzantine member cannot crowd the others' out).
    early: Vec<(NodeId, ConfigHash, u32, SignStep)>,
    /// The latest time an input brought.
    now: u64,
    actions: VecDeque<Action>,
}

/// How often a member sends its signature over the next configuration again.
pub const SHARE_RESEND_MS: u64 = 1_000;
/// How often a member installing a stable checkpoint asks again for the batches up to it.
const FETCH_AGAIN_MS: u64 = 2_000;
/// Signing messages kept from each committee member before this member starts signing.
const EARLY_SIGN_STEPS: usize = 16;
/// Freshness signings under the MS key a member runs at once (the newest times).
const FRESH_SIGNINGS: usize = 2;

/// What a member persists beside the agreement's durable state.
#[derive(Serialize, Deserialize)]
struct Record {
    agreement: Vec<u8>,
    installing: Option<(SeqNo, Digest)>,
    held: Vec<Held>,
}

/// An agreement output held while a stable checkpoint's batches are fetched.
#[derive(Serialize, Deserialize)]
enum Held {
    Decided { seq: SeqNo, requests: Vec<Request> },
    Checkpoint { seq: SeqNo },
}

impl Role {
    /// The role of `setup.key` in `setup.config`'s committee at time `now`, started as `resume`
    /// says. Returns the role and, when it sits the agreement out, why.
    pub fn new(setup: Setup, resume: Resume<'_>, now: u64) -> (Role, Option<String>) {
        let Setup {
            key,
            config,
            admission_key,
            opts,
            epoch_timer,
            seed,
        } = setup;
        let start = Membership::new(config.clone(), admission_key, opts.max_batch);
        let keys = committee_keys(&config);
        let mut role = Role {
            fresh: FreshnessShares::new(config.clone()),
            end_at: now.saturating_add(config.params.epoch_ms),
            key: key.clone(),
            config,
            agreement: None,
            app: App::new(start.clone()),
            saved_batches: 0,
            installing: None,
            fetch_again_at: u64::MAX,
            held: VecDeque::new(),
            next: NextConfig::default(),
            epoch_timer,
            next_fresh: now,
            share: None,
            next_share: u64::MAX,
            seed,
            key_share: None,
            waiting: None,
            threshold: None,
            fresh_signing: BTreeMap::new(),
            fresh_due: None,
            fresh_started: 0,
            early: Vec::new(),
            now,
            actions: VecDeque::new(),
        };
        let why = match resume {
            Resume::SitOut => Some("without the state it persisted".to_string()),
            Resume::Fresh => match Agreement::new(key, keys, opts) {
                Ok(a) => {
                    role.agreement = Some(a);
                    None
                }
                Err(e) => Some(format!("cannot run this epoch's agreement ({e})")),
            },
            Resume::Saved { record, batches } => role
                .resume(key, keys, opts, start, record, batches, now)
                .err(),
        };
        role.pump();
        (role, why)
    }

    /// Takes the agreement up from what was persisted, and the MS state replayed from the batches;
    /// goes on where it stopped: signing the next configuration if the epoch had ended, fetching
    /// the batches of a stable checkpoint it was installing.
    #[allow(clippy::too_many_arguments)]
    fn resume(
        &mut self,
        key: Keypair,
        keys: Vec<PublicKey>,
        opts: Options,
        start: Membership,
        record: &[u8],
        batches: &[Vec<u8>],
        now: u64,
    ) -> Result<(), String> {
        let unreadable =
            |e: postcard::Error| format!("the persisted agreement state is unreadable ({e})");
        let record: Record = postcard::from_bytes(record).map_err(unreadable)?;
        let batches = batches
            .iter()
            .map(|b| postcard::from_bytes::<Vec<Request>>(b))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unreadable)?;
        let a = Agreement::restore(key, keys, opts, &record.agreement, now)
            .map_err(|e| format!("cannot restore the agreement ({e})"))?;
        self.agreement = Some(a);
        self.app = App::replay(start, &batches);
        self.saved_batches = self.app.batches().len();
        self.installing = record.installing;
        self.held = record
            .held
            .into_iter()
            .map(|q| match q {
                Held::Decided { seq, requests } => Output::Decided { seq, requests },
                Held::Checkpoint { seq } => Output::Checkpoint { seq },
            })
            .collect();
        if let Some(next) = self.app.ended().map(|e| e.config.clone()) {
            self.epoch_ended(next);
        }
        if let Some((upto, digest)) = self.installing {
            self.fetch_again_at = self.now.saturating_add(FETCH_AGAIN_MS);
            self.actions
                .push_back(Action::FetchBatches { upto, digest });
        }
        Ok(())
    }

    // ---- accessors ----

    pub fn epoch(&self) -> Epoch {
        self.config.epoch
    }

    pub fn config(&self) -> &Configuration {
        &self.config
    }

    /// The agreement, unless sitting it out.
    pub fn agreement(&self) -> Option<&Agreement> {
        self.agreement.as_ref()
    }

    /// The MS application (batches executed, digests, membership state).
    pub fn app(&self) -> &App {
        &self.app
    }

    /// The committee members other than this one.
    pub fn peers(&self) -> Vec<NodeId> {
        let me = self.key.node_id();
        self.config
            .committee
            .iter()
            .filter(|id| **id != me)
            .copied()
            .collect()
    }

    /// The next action to carry out, in order.
    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The stable checkpoint whose batches this member waits for, if any.
    pub fn installing(&self) -> Option<SeqNo> {
        self.installing.map(|(seq, _)| seq)
    }

    /// The earliest time at which [`Role::on_timer`] has work to do.
    pub fn next_timer(&self) -> Option<u64> {
        let mut t = self.next_fresh.min(self.next_share);
        if self.installing.is_some() {
            t = t.min(self.fetch_again_at);
        }
        for th in self.threshold.iter().chain(self.fresh_signing.values()) {
            t = t.min(th.next_timer());
        }
        if self.epoch_timer {
            t = t.min(self.end_at);
        }
        if let Some(a) = &self.agreement {
            t = a.next_timeout().map_or(t, |a| a.min(t));
        }
        Some(t)
    }

    // ---- inputs ----

    /// The last [`Action::Persist`] could not be written: sit the agreement out, and drop every
    /// action queued after it (they may carry statements nobody may see unpersisted).
    pub fn persist_failed(&mut self) {
        self.agreement = None;
        self.actions.clear();
    }

    /// Agreement bytes from committee member `from`.
    pub fn on_agreement(&mut self, now: u64, from: NodeId, bytes: &[u8]) -> Result<(), String> {
        self.now = self.now.max(now);
        let Some(a) = self.agreement.as_mut() else {
            return Err("not running this epoch's agreement".into());
        };
        let res = a.handle_message(now, from, bytes);
        self.pump();
        res.map_err(|e| format!("{e:?}"))
    }

    /// Whether this member takes `req` from the node that sent it: a stranger may only ask to
    /// join. (Requests that other committee members forward are the agreement's to check.)
    pub fn admits(&self, req: &Request) -> Result<(), String> {
        if self.agreement.is_none() {
            return Err("not running this epoch's agreement".into());
        }
        let from = req.client.node_id();
        let dealer = || {
            self.app
                .start()
                .key()
                .is_some_and(|k| k.round().dealers.contains(&from))
        };
        if !self.config.is_member(&from) {
            match postcard::from_bytes::<MsOp>(&req.payload) {
                Ok(MsOp::Join { .. }) => {}
                Ok(MsOp::Key { .. }) if dealer() => {}
                _ => return Err("a non-member may only ask to join (or deal the MS key)".into()),
            }
        }
        Ok(())
    }

    /// A signed MS operation submitted to this member (see [`Role::admits`]).
    pub fn submit(&mut self, now: u64, req: Request) -> Result<(), String> {
        self.now = self.now.max(now);
        let Some(a) = self.agreement.as_mut() else {
            return Err("not running this epoch's agreement".into());
        };
        let res = a.submit(now, req);
        self.pump();
        res.map_err(|e| format!("{e:?}"))
    }

    /// A committee member's signature over the next configuration.
    pub fn on_config_share(
        &mut self,
        from: NodeId,
        epoch: Epoch,
        hash: crate::config::ConfigHash,
        sig: Signature,
    ) {
        if epoch != self.config.epoch + 1 {
            return;
        }
        if let Some(cc) = self.next.share(from, hash, sig) {
            self.actions.push_back(Action::Certified(cc));
        }
    }

    /// This member's share of the MS key for this epoch (its node passes it once it holds it):
    /// the next configuration, if the epoch already ended, is certified with it.
    ///
    /// A share offered again after a complaint disproved a qualified dealer (the round's sharing
    /// changed) replaces the one held: signings started later use it. The next configuration's
    /// certification starts only after the epoch ended, when the sharing no longer changes.
    pub fn offer_key_share(&mut self, share: &KeyShare) {
        if share.epoch() != self.config.epoch
            || self
                .key_share
                .as_ref()
                .is_some_and(|k| k.public == share.public)
        {
            return;
        }
        self.key_share = Some(share.clone());
        self.start_threshold();
        self.start_fresh();
    }

    /// The certification of the next configuration under the MS key, once started.
    pub fn threshold(&self) -> Option<&ThresholdSigning> {
        self.threshold.as_ref()
    }

    /// Whether this role holds its share of the MS key.
    pub fn has_key_share(&self) -> bool {
        self.key_share.is_some()
    }

    /// A step of certifying the next configuration under the MS key, from committee member
    /// `from`.
    pub fn on_key_sign(
        &mut self,
        from: NodeId,
        epoch: Epoch,
        hash: crate::config::ConfigHash,
        attempt: u32,
        step: SignStep,
    ) {
        if epoch == self.config.epoch {
            if let Some(th) = self.fresh_signing.values_mut().find(|th| th.hash() == hash) {
                let out = th.on_step(self.now, from, attempt, step);
                self.sign_out(out);
            } else {
                self.keep_early(from, hash, attempt, step);
            }
            return;
        }
        if epoch != self.config.epoch + 1 {
            return;
        }
        match self.threshold.as_mut() {
            Some(th) => {
                if th.hash() != hash {
                    return;
                }
                let out = th.on_step(self.now, from, attempt, step);
                self.sign_out(out);
            }
            None => self.keep_early(from, hash, attempt, step),
        }
    }

    /// Keeps a signing message that came before this member started the signing it names.
    fn keep_early(&mut self, from: NodeId, hash: ConfigHash, attempt: u32, step: SignStep) {
        let kept = self.early.iter().filter(|(f, ..)| *f == from).count();
        if self.config.committee.contains(&from) && kept < EARLY_SIGN_STEPS {
            self.early.push((from, hash, attempt, step));
        }
    }

    /// The early messages naming `hash`, taken out.
    fn take_early(&mut self, hash: ConfigHash) -> Vec<(NodeId, u32, SignStep)> {
        let (mine, rest) = std::mem::take(&mut self.early)
            .into_iter()
            .partition(|(_, h, ..)| *h == hash);
        self.early = rest;
        mine.into_iter().map(|(f, _, a, s)| (f, a, s)).collect()
    }

    /// Starts signing freshness for the due time under the MS key, once this member holds its
    /// share; the nonces come from a secret of this signing's own (never those of another).
    fn start_fresh(&mut self) {
        let (Some(time_ms), Some(share)) = (self.fresh_due, self.key_share.clone()) else {
            return;
        };
        self.fresh_due = None;
        if self.fresh_signing.contains_key(&time_ms) {
            return;
        }
        self.fresh_started += 1;
        let mut label = b"freshness nonces".to_vec();
        label.extend_from_slice(&self.fresh_started.to_le_bytes());
        label.extend_from_slice(&time_ms.to_le_bytes());
        let seed = *blake3::keyed_hash(&self.seed, &label).as_bytes();
        let (th, out) = ThresholdSigning::start_fresh(
            self.key.clone(),
            self.config.clone(),
            time_ms,
            share,
            seed,
            self.now,
        );
        let hash = th.hash();
        self.fresh_signing.insert(time_ms, th);
        while self.fresh_signing.len() > FRESH_SIGNINGS {
            self.fresh_signing.pop_first();
        }
        self.sign_out(out);
        for (from, attempt, step) in self.take_early(hash) {
            if let Some(th) = self.fresh_signing.get_mut(&time_ms) {
                let out = th.on_step(self.now, from, attempt, step);
                self.sign_out(out);
            }
        }
    }

    /// Starts certifying the next configuration under the MS key once the epoch ended here and
    /// this member holds its share.
    fn start_threshold(&mut self) {
        if self.threshold.is_some() {
            return;
        }
        let (Some(next), Some(share)) = (self.waiting.clone(), self.key_share.clone()) else {
            return;
        };
        let (th, out) = ThresholdSigning::start(
            self.key.clone(),
            self.config.clone(),
            next,
            share,
            self.seed,
            self.now,
        );
        let hash = th.hash();
        self.threshold = Some(th);
        self.sign_out(out);
        for (from, attempt, step) in self.take_early(hash) {
            if let Some(th) = self.threshold.as_mut() {
                let out = th.on_step(self.now, from, attempt, step);
                self.sign_out(out);
            }
        }
    }

    fn sign_out(&mut self, out: Vec<SignOut>) {
        for o in out {
            self.actions.push_back(match o {
                SignOut::Send { to, msg } => Action::Send { to, msg },
                SignOut::Certified(cc) => Action::Certified(cc),
                SignOut::Fresh(cert) => Action::Freshness(cert),
            });
        }
    }

    /// A committee member's freshness share.
    pub fn on_fresh_share(
        &mut self,
        from: NodeId,
        epoch: Epoch,
        config: crate::config::ConfigHash,
        time_ms: u64,
        sig: Signature,
    ) {
        // A configuration that carries the MS key is kept fresh under it: members' signatures
        // would make no certificate.
        if epoch != self.config.epoch || config != self.config.hash() || self.config.key.is_some() {
            return;
        }
        if let Some(cert) = self.fresh.add(time_ms, from, sig) {
            self.actions.push_back(Action::Freshness(cert));
        }
    }

    /// The batches this member executed in `epoch` up to `upto`, for a member catching up.
    pub fn batches(&self, epoch: Epoch, upto: SeqNo) -> Option<Vec<Vec<Request>>> {
        if epoch != self.config.epoch {
            return None;
        }
        Some(self.app.batches().get(..upto as usize)?.to_vec())
    }

    /// Batches 1..=n from another member, for the stable checkpoint being installed: taken if
    /// they replay, from the epoch's start, to the digest the agreement certified.
    pub fn on_batch_log(&mut self, batches: &[Vec<Request>]) -> bool {
        let Some((seq, digest)) = self.installing else {
            return false;
        };
        if batches.len() as u64 != seq {
            return false;
        }
        let app = App::replay(self.app.start().clone(), batches);
        if app.digest() != digest {
            return false;
        }
        let ended = app.ended().map(|e| e.config.clone());
        self.app = app;
        self.installing = None;
        if let Some(next) = ended {
            self.epoch_ended(next);
        }
        let held: Vec<Output> = self.held.drain(..).collect();
        for out in held {
            match out {
                Output::Decided { seq: s, .. } | Output::Checkpoint { seq: s } if s <= seq => {}
                other => self.on_output(other),
            }
        }
        self.pump();
        true
    }

    /// Runs what is due at `now` (the driver's milliseconds); `unix_ms` is the wall clock that
    /// freshness shares are signed for.
    pub fn on_timer(&mut self, now: u64, unix_ms: u64) {
        self.now = self.now.max(now);
        if let Some(a) = self.agreement.as_mut() {
            a.handle_timeout(now);
        }
        self.pump();
        if let Some((upto, digest)) = self.installing.filter(|_| now >= self.fetch_again_at) {
            // The answers may all have been lost, or been false: ask again.
            self.fetch_again_at = now.saturating_add(FETCH_AGAIN_MS);
            self.actions
                .push_back(Action::FetchBatches { upto, digest });
        }
        if let Some(th) = self.threshold.as_mut() {
            let out = th.on_timer(now);
            self.sign_out(out);
        }
        let outs: Vec<SignOut> = self
            .fresh_signing
            .values_mut()
            .flat_map(|th| th.on_timer(now))
            .collect();
        self.sign_out(outs);
        let params = self.config.params.clone();
        let epoch = self.config.epoch;
        if self.epoch_timer && now >= self.end_at {
            self.end_at = now.saturating_add(params.epoch_ms.max(1_000));
            self.actions
                .push_back(Action::Submit(MsOp::EndEpoch { epoch }));
        }
        if now >= self.next_share {
            self.next_share = now.saturating_add(SHARE_RESEND_MS);
            if let Some(msg) = self.share.clone() {
                self.actions.push_back(Action::Send {
                    to: self.peers(),
                    msg,
                });
            }
        }
        if now >= self.next_fresh {
            let period = (params.freshness_ms / 3).max(500);
            self.next_fresh = now.saturating_add(period);
            let time_ms = unix_ms - unix_ms % period;
            if self.config.key.is_some() {
                // Under the MS key, once this member holds its share of it.
                self.fresh_due = Some(time_ms);
                self.start_fresh();
                return;
            }
            let sig = Freshness::sign_share(&self.key, &self.config, time_ms);
            let msg = MsMessage::FreshShare {
                epoch,
                config: self.config.hash(),
                time_ms,
                sig,
            };
            self.actions.push_back(Action::Send {
                to: self.peers(),
                msg,
            });
            self.on_fresh_share(self.key.node_id(), epoch, self.config.hash(), time_ms, sig);
        }
    }

    // ---- the agreement's outputs ----

    /// Turns the agreement's outputs into actions, holding decisions while installing.
    fn pump(&mut self) {
        loop {
            let Some(out) = self.agreement.as_mut().and_then(|a| a.poll_output()) else {
                return;
            };
            if self.installing.is_some()
                && matches!(out, Output::Decided { .. } | Output::Checkpoint { .. })
            {
                self.held.push_back(out);
                continue;
            }
            self.on_output(out);
        }
    }

    fn on_output(&mut self, out: Output) {
        let epoch = self.config.epoch;
        match out {
            Output::Persist { state } => match self.saved(state) {
                Ok(saved) => self.actions.push_back(Action::Persist(saved)),
                // Nothing after it may leave unpersisted.
                Err(_) => self.agreement = None,
            },
            Output::Send { to, bytes } => self.actions.push_back(Action::Agreement {
                to: Some(to),
                bytes,
            }),
            Output::Broadcast { bytes } => self
                .actions
                .push_back(Action::Agreement { to: None, bytes }),
            Output::Decided { seq, requests } => self.execute(seq, requests),
            Output::Checkpoint { seq } => {
                if seq == self.app.executed() {
                    let d = self.app.digest();
                    if let Some(a) = self.agreement.as_mut() {
                        a.checkpoint_digest(seq, d);
                    }
                }
            }
            Output::InstallState { seq, app_digest } => {
                self.installing = Some((seq, app_digest));
                self.fetch_again_at = self.now.saturating_add(FETCH_AGAIN_MS);
                self.actions.push_back(Action::FetchBatches {
                    upto: seq,
                    digest: app_digest,
                });
            }
            Output::EnteredView { view } => self.actions.push_back(Action::EnteredView(view)),
            Output::Evidence(evidence) => self
                .actions
                .push_back(Action::Submit(MsOp::Misbehaviour { epoch, evidence })),
        }
    }

    /// The record of [`Action::Persist`]: the agreement's durable state, the checkpoint being
    /// installed, the outputs held, and the batches executed since the last one.
    fn saved(&mut self, state: Vec<u8>) -> Result<Saved, postcard::Error> {
        let record = Record {
            agreement: state,
            installing: self.installing,
            held: self
                .held
                .iter()
                .filter_map(|o| match o {
                    Output::Decided { seq, requests } => Some(Held::Decided {
                        seq: *seq,
                        requests: requests.clone(),
                    }),
                    Output::Checkpoint { seq } => Some(Held::Checkpoint { seq: *seq }),
                    _ => None,
                })
                .collect(),
        };
        let record = postcard::to_allocvec(&record)?;
        let batches = self.app.batches();
        let first = self.saved_batches.min(batches.len());
        let new = batches[first..]
            .iter()
            .map(postcard::to_allocvec)
            .collect::<Result<Vec<_>, _>>()?;
        self.saved_batches = batches.len();
        Ok(Saved {
            epoch: self.config.epoch,
            record,
            first_batch: first as u64 + 1,
            batches: new,
        })
    }

    fn execute(&mut self, seq: SeqNo, requests: Vec<Request>) {
        let outcomes = match self.app.execute(seq, &requests) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                self.actions.push_back(Action::OutOfOrder(e));
                return;
            }
        };
        let ended = outcomes.iter().find_map(|o| match &o.executed {
            Executed::EpochEnded(next) => Some((**next).clone()),
            _ => None,
        });
        self.actions.push_back(Action::Executed {
            seq,
            requests,
            outcomes,
        });
        if let Some(next) = ended {
            self.epoch_ended(next);
        }
    }

    /// The epoch ended here with `next`: sign it, send the signature to the other members (or,
    /// once this configuration carries the MS key, certify it under the key with the others).
    fn epoch_ended(&mut self, next: Configuration) {
        if self.config.key.is_some() {
            if self.waiting.is_none() {
                self.waiting = Some(next);
                self.start_threshold();
            }
            return;
        }
        let hash = next.hash();
        let Some((sig, done)) = self.next.end(self.config.clone(), next, &self.key) else {
            return;
        };
        let msg = MsMessage::ConfigShare {
            epoch: self.config.epoch + 1,
            hash,
            sig,
        };
        self.share = Some(msg.clone());
        self.next_share = self.now.saturating_add(SHARE_RESEND_MS);
        self.actions.push_back(Action::Send {
            to: self.peers(),
            msg,
        });
        if let Some(cc) = done {
            self.actions.push_back(Action::Certified(cc));
        }
    }
}
