//! The composed mode (`--composed`): the Membership Service decides the epochs.
//!
//! The committee members of each epoch run the node's committee role (`ms::role::Role`, the
//! machine the daemon's MS driver runs) on the simulated nodes, over the same faulty network as
//! the replicas and clients: agreement messages, certificate and freshness shares, batch fetches
//! of a member catching up, probes. Nodes crash with their roles and restart them from what the
//! role asked to persist. When the test reconfigures, nodes that should join submit `Join` (with
//! an admission certificate), nodes that should go submit `Leave`, and the committee members
//! submit `EndEpoch` (the epoch timer, fired by the test), each resent until executed or the
//! epoch is over, as the daemon resends. The certificate the committee assembles is what every
//! node installs; the replicas, clients, transfers and collections live through those epochs.
//!
//! Checks (beside every dBQS check): every certificate a correct member assembles verifies as
//! the successor of the configuration before; two correct members never certify different
//! configurations of one epoch; once the faults healed, a reconfiguration the test asks for is
//! certified within the liveness bound.

use super::{Ev, Sim};
use crate::rng::Rng;
use dbqsfs_core::config::{CertifiedConfig, ConfigHash, Epoch, Member};
use dbqsfs_core::crypto::{Domain, Keypair, NodeId, Signature};
use dbqsfs_core::ms::membership::{AdmissionCert, MsOp};
use dbqsfs_core::ms::pbft::AgreementMessage;
use dbqsfs_core::ms::probe::probe_body;
use dbqsfs_core::ms::role::{agreement_options, Action, Resume, Role, Setup};
use dbqsfs_core::ms::submissions::Submissions;
use dbqsfs_core::ms::wire::{is_ms, MsMessage};
use dbqsfs_core::wire::{decode, encode_msg, Protocol};
use std::collections::BTreeMap;

/// Resubmission period of an operation not executed yet.
const RESUBMIT_MS: u64 = 1_000;

/// What a role persisted in one epoch: the record and the batches.
type Disk = (Vec<u8>, Vec<Vec<u8>>);

/// The MS side of a composed run.
pub(super) struct Ms {
    admission: Keypair,
    /// Draws of the MS (nonce seeds), apart from the run's stream.
    rng: Rng,
    /// The committee role each node runs in its current epoch (volatile: lost in a crash).
    roles: BTreeMap<usize, Role>,
    /// What each node's role persisted, by epoch: its disk.
    disks: BTreeMap<(usize, Epoch), Disk>,
    /// The pending timer event of each role.
    timers: BTreeMap<usize, u64>,
    /// What each node wants executed, submitted one at a time as the daemon does (volatile).
    subs: BTreeMap<usize, Submissions>,
    /// What correct members certified, by epoch.
    certified: BTreeMap<Epoch, ConfigHash>,
    /// The reconfiguration the test asked for and not certified yet: from which epoch, to which
    /// members (pool indices); and the nodes that queued their part of it.
    target: Option<(Epoch, Vec<usize>)>,
    queued: std::collections::BTreeSet<(usize, Epoch)>,
    pub(super) epochs_certified: u64,
}

impl Ms {
    pub(super) fn new(seed: u64) -> Ms {
        let mut rng = Rng::new(seed ^ 0x636f_6d70_6f73_6564);
        Ms {
            admission: Keypair::from_seed(rng.seed32()),
            rng,
            roles: BTreeMap::new(),
            disks: BTreeMap::new(),
            timers: BTreeMap::new(),
            subs: BTreeMap::new(),
            certified: BTreeMap::new(),
            target: None,
            queued: Default::default(),
            epochs_certified: 0,
        }
    }

    fn subs_of(&mut self, n: usize) -> &mut Submissions {
        self.subs
            .entry(n)
            .or_insert_with(|| Submissions::new(RESUBMIT_MS))
    }

    /// Whether a reconfiguration the test asked for is still to be certified.
    pub(super) fn reconfiguring(&self) -> bool {
        self.target.is_some()
    }
}

/// Whether `bytes` are the MS's (agreement or MS messages) rather than dBQS's.
pub(super) fn is_ms_traffic(bytes: &[u8]) -> bool {
    is_ms(bytes) || bytes.get(1) == Some(&AgreementMessage::ID)
}

impl Sim {
    fn ms(&mut self) -> &mut Ms {
        self.ms.as_mut().expect("composed mode")
    }

    /// Node `n` (up) starts its role in the newest epoch it installed, if it is in its committee
    /// and has no role there yet: from its disk if it persisted something in that epoch.
    pub(super) fn ms_enter(&mut self, n: usize) {
        if self.ms.is_none() || !self.nodes[n].up {
            return;
        }
        let epoch = self.nodes[n].replica.epoch();
        let config = self.configs[epoch as usize].config.clone();
        let me = self.nodes[n].key.node_id();
        if self.ms().roles.get(&n).is_some_and(|r| r.epoch() == epoch) {
            return;
        }
        // Operations of an older epoch are void.
        self.ms().subs_of(n).enter_epoch(epoch);
        let carried = self.ms().roles.remove(&n).map(|r| r.probes().clone());
        if !config.committee.contains(&me) {
            return;
        }
        let setup = Setup {
            key: self.nodes[n].key.clone(),
            opts: agreement_options(&config),
            config,
            admission_key: self.ms().admission.public(),
            nonce_seed: self.ms().rng.seed32(),
            epoch_timer: false,
        };
        let disk = self.ms().disks.get(&(n, epoch)).cloned();
        let resume = match &disk {
            Some((record, batches)) => Resume::Saved { record, batches },
            None => Resume::Fresh,
        };
        let (role, why) = Role::new(setup, resume, carried.as_ref(), self.now);
        if let Some(why) = why {
            if self.nodes[n].byz.is_none() {
                self.violation(format!(
                    "MS: node {n} cannot take its role in epoch {epoch} up: {why}"
                ));
            }
        }
        self.ms().roles.insert(n, role);
        self.ms().timers.remove(&n);
        self.ms_drain(n);
    }

    /// Node `n` queues its part of the reconfiguration asked for, once it is in that epoch:
    /// join or leave, and, as a committee member, the end of the epoch.
    fn ms_queue_wants(&mut self, n: usize) {
        let epoch = self.nodes[n].replica.epoch();
        let Some((from, members)) = self.ms().target.clone() else {
            return;
        };
        if from != epoch || !self.ms().queued.insert((n, epoch)) {
            return;
        }
        let last = self.configs[epoch as usize].config.clone();
        let id = self.nodes[n].key.node_id();
        let member = last.is_member(&id);
        let wanted = members.contains(&n);
        if wanted && !member {
            let key = self.nodes[n].key.public();
            let cert = AdmissionCert::sign(&self.ms().admission, &key);
            let op = MsOp::Join {
                epoch,
                member: Member::new(key, "sim"),
                cert,
            };
            self.ms_want(n, op);
        } else if !wanted && member {
            self.ms_want(n, MsOp::Leave { epoch });
        }
        if last.committee.contains(&id) {
            self.ms_want(n, MsOp::EndEpoch { epoch });
        }
    }

    /// Node `n` crashed: its role's memory is gone (its disk stays).
    pub(super) fn ms_crash(&mut self, n: usize) {
        if let Some(ms) = self.ms.as_mut() {
            ms.roles.remove(&n);
            ms.timers.remove(&n);
            ms.subs.remove(&n);
            ms.queued.retain(|(m, _)| *m != n);
        }
    }

    /// MS bytes for node `n` from `from`.
    pub(super) fn ms_deliver(&mut self, n: usize, from: NodeId, bytes: &[u8]) {
        if !self.nodes[n].up || self.nodes[n].byz.is_some() {
            return; // Byzantine nodes are silent members
        }
        let now = self.now;
        if !is_ms(bytes) {
            if let Some(role) = self.ms().roles.get_mut(&n) {
                let _ = role.on_agreement(now, from, bytes);
            }
            return self.ms_drain(n);
        }
        let Ok(env) = decode::<MsMessage>(bytes) else {
            return;
        };
        let me = self.nodes[n].key.node_id();
        let Some(role) = self.ms().roles.get_mut(&n) else {
            return;
        };
        match env.msg {
            MsMessage::Submit(req) if role.admits(&req).is_ok() => {
                let _ = role.submit(now, req);
            }
            MsMessage::ConfigShare { epoch, hash, sig } => {
                role.on_config_share(from, epoch, hash, sig)
            }
            MsMessage::FreshShare {
                epoch,
                config,
                time_ms,
                sig,
            } => role.on_fresh_share(from, epoch, config, time_ms, sig),
            MsMessage::Batches { epoch, upto } => {
                if let Some(batches) = role.batches(epoch, upto) {
                    let reply = encode_msg(epoch, MsMessage::BatchLog { batches });
                    self.send(me, from, reply);
                }
            }
            MsMessage::BatchLog { batches } => {
                role.on_batch_log(&batches);
            }
            _ => {}
        }
        self.ms_drain(n);
    }

    /// A probe answer (or its failure) reaches node `n`'s role.
    pub(super) fn ms_probe_answer(
        &mut self,
        n: usize,
        epoch: Epoch,
        target: NodeId,
        nonce: [u8; 32],
        answer: Option<Signature>,
    ) {
        if !self.nodes[n].up {
            return;
        }
        if let Some(role) = self.ms().roles.get_mut(&n) {
            role.on_probe_answer(epoch, target, &nonce, answer.as_ref());
        }
        self.ms_drain(n);
    }

    pub(super) fn ms_timer(&mut self, n: usize, at: u64) {
        if self.ms().timers.get(&n) != Some(&at) || !self.nodes[n].up {
            return;
        }
        self.ms().timers.remove(&n);
        let now = self.now;
        if let Some(role) = self.ms().roles.get_mut(&n) {
            role.on_timer(now, now);
        }
        self.ms_drain(n);
    }

    /// Carries out node `n`'s role actions in order, as the daemon's MS driver does.
    fn ms_drain(&mut self, n: usize) {
        let me = self.nodes[n].key.node_id();
        let byz = self.nodes[n].byz.is_some();
        while let Some(action) = self.ms().roles.get_mut(&n).and_then(|r| r.poll()) {
            let Some(role) = self.ms().roles.get(&n) else {
                return;
            };
            let epoch = role.epoch();
            let peers = role.peers();
            match action {
                Action::Persist(saved) => {
                    let disk = self.ms().disks.entry((n, saved.epoch)).or_default();
                    disk.0 = saved.record;
                    disk.1
                        .truncate(saved.first_batch.saturating_sub(1) as usize);
                    disk.1.extend(saved.batches);
                }
                _ if byz => {}
                Action::Agreement { to, bytes } => {
                    for to in to.map_or(peers, |t| vec![t]) {
                        self.send(me, to, bytes.clone());
                    }
                }
                Action::Send { to, msg } => {
                    let bytes = encode_msg(epoch, msg);
                    for to in to {
                        self.send(me, to, bytes.clone());
                    }
                }
                Action::FetchBatches { upto, .. } => {
                    let bytes = encode_msg(epoch, MsMessage::Batches { epoch, upto });
                    for to in peers {
                        self.send(me, to, bytes.clone());
                    }
                }
                Action::Probe {
                    target,
                    nonce,
                    timeout_ms,
                } => self.ms_probe(n, epoch, target, nonce, timeout_ms),
                Action::Submit(op) => self.ms_want(n, op),
                Action::Executed { requests, .. } => {
                    // A node learns that its operation was executed in its epoch's agreement (the
                    // daemon from its own role or a later configuration; the simulator from any
                    // correct member of that epoch: a lagging member's older agreement ignores it).
                    let mut done = Vec::new();
                    let ms = self.ms.as_mut().expect("composed mode");
                    for (k, subs) in &mut ms.subs {
                        if self.nodes[*k].replica.epoch() == epoch && subs.executed(&requests) {
                            done.push(*k);
                        }
                    }
                    for k in done {
                        self.ms_submit(k);
                    }
                }
                Action::Certified(cc) => self.ms_certified(n, cc),
                Action::OutOfOrder(e) => {
                    self.violation(format!("MS: node {n}: {e}"));
                }
                Action::EnteredView(_) | Action::Freshness(_) => {}
            }
        }
        if let Some(t) = self.ms().roles.get(&n).and_then(|r| r.next_timer()) {
            let t = t.max(self.now + 1);
            if self.ms().timers.get(&n).is_none_or(|cur| t < *cur) {
                self.ms().timers.insert(n, t);
                self.schedule(t, Ev::MsTimer { n, at: t });
            }
        }
    }

    /// Node `n` challenges `target`: the answer travels there and back, or fails after the
    /// timeout (target down or the message lost).
    fn ms_probe(
        &mut self,
        n: usize,
        epoch: Epoch,
        target: NodeId,
        nonce: [u8; 32],
        timeout_ms: u64,
    ) {
        let me = self.nodes[n].key.node_id();
        let there = self.net.arrivals(&mut self.rng, self.now, me, target);
        let t = self.node_index.get(&target).copied();
        let answer = match (there.first(), t) {
            (Some(&at), Some(t)) if self.nodes[t].up => {
                let back = self.net.arrivals(&mut self.rng, at, target, me);
                back.first()
                    .filter(|&&b| b <= self.now + timeout_ms)
                    .map(|&b| {
                        let body = probe_body(epoch, &nonce, &me);
                        (b, Some(self.nodes[t].key.sign(Domain::Probe, &body)))
                    })
            }
            _ => None,
        };
        let (at, answer) = answer.unwrap_or((self.now + timeout_ms, None));
        self.schedule(
            at,
            Ev::MsProbeAnswer {
                n,
                epoch,
                target,
                nonce,
                answer,
            },
        );
    }

    /// Node `n` wants `op` executed in its current epoch.
    fn ms_want(&mut self, n: usize, op: MsOp) {
        if self.ms().subs_of(n).push(op) {
            self.ms_submit(n);
        }
    }

    /// Sends node `n`'s next submission to the committee of its epoch (and its own role), or the
    /// outstanding one again once its period passed.
    fn ms_submit(&mut self, n: usize) {
        if !self.nodes[n].up || self.nodes[n].byz.is_some() {
            return;
        }
        let now = self.now;
        let key = self.nodes[n].key.clone();
        // As the daemon does: sequence numbers from the clock stay above those of an earlier run.
        let Some(req) = self.ms().subs_of(n).poll(now, &key, now << 10) else {
            return;
        };
        let me = key.node_id();
        let epoch = self.nodes[n].replica.epoch();
        let committee = self.configs[epoch as usize].config.committee.clone();
        if let Some(role) = self.ms().roles.get_mut(&n) {
            let _ = role.submit(now, req.clone());
        }
        self.ms_drain(n);
        let bytes = encode_msg(epoch, MsMessage::Submit(req));
        for to in committee.into_iter().filter(|id| *id != me) {
            self.send(me, to, bytes.clone());
        }
    }

    /// Every second: resend what was not executed; start roles a node should run.
    pub(super) fn ms_tick(&mut self) {
        for n in 0..self.nodes.len() {
            if self.nodes[n].up {
                self.ms_enter(n);
                self.ms_queue_wants(n);
                self.ms_submit(n);
            }
        }
        let at = self.now + RESUBMIT_MS;
        self.schedule(at, Ev::MsTick);
    }

    /// The test asks the MS for a new configuration of `members` (indices into the pool): the
    /// members to go leave, the others join, and the committee ends the epoch. Ignored while an
    /// earlier one is still to be certified.
    pub(super) fn ms_reconfigure(&mut self, members: Vec<usize>) {
        if self.ms().target.is_some() {
            return;
        }
        let last = self.configs.last().expect("never empty").config.epoch;
        self.ms().target = Some((last, members));
        for n in 0..self.nodes.len() {
            if self.nodes[n].up {
                self.ms_queue_wants(n);
            }
        }
    }

    /// The MS state of every node, for a liveness report (empty outside the composed mode).
    pub(super) fn ms_describe(&self) -> String {
        let Some(ms) = &self.ms else {
            return String::new();
        };
        let mut out = format!("; MS: asked {:?}", ms.target.as_ref().map(|t| t.0));
        for n in 0..self.nodes.len() {
            let role = ms.roles.get(&n).map(|r| {
                let a = r.agreement();
                format!(
                    "role of epoch {} view {:?} changing {:?} executed {} ended {}",
                    r.epoch(),
                    a.map(|a| a.view()),
                    a.and_then(|a| a.changing_to()),
                    r.app().executed(),
                    r.app().ended().is_some()
                )
            });
            out += &format!(
                "; node {n} (epoch {}{}): {role:?} wants {:?} outstanding {:?}",
                self.nodes[n].replica.epoch(),
                if self.nodes[n].byz.is_some() {
                    ", byzantine"
                } else {
                    ""
                },
                ms.subs.get(&n).map(|s| s.pending().collect::<Vec<_>>()),
                ms.subs.get(&n).and_then(|s| s.outstanding()).map(|r| r.seq)
            );
        }
        out
    }

    /// Node `n`'s role assembled the next configuration's certificate.
    fn ms_certified(&mut self, n: usize, cc: CertifiedConfig) {
        if self.nodes[n].byz.is_some() {
            return;
        }
        let epoch = cc.config.epoch;
        let prev = &self.configs[epoch as usize - 1].config;
        if let Err(e) = cc.verify_successor(prev) {
            self.violation(format!(
                "MS: node {n} assembled a certificate of epoch {epoch} that does not verify: {e}"
            ));
            return;
        }
        let hash = cc.config.hash();
        match self.ms().certified.insert(epoch, hash) {
            Some(before) if before != hash => {
                self.violation(format!(
                    "MS SAFETY: correct members certified two configurations of epoch {epoch}"
                ));
                return;
            }
            Some(_) => return,
            None => {}
        }
        if epoch as usize != self.configs.len() {
            return;
        }
        self.ms().epochs_certified += 1;
        if self
            .ms()
            .target
            .as_ref()
            .is_some_and(|(from, _)| *from < epoch)
        {
            self.ms().target = None;
        }
        self.configs.push(cc);
        // Nodes learn it from the committee's push within a moment (or from clients and peers).
        for m in 0..self.nodes.len() {
            let at = self.now + self.rng.range(0, 300);
            self.schedule(at, Ev::Install { n: m, epoch });
        }
    }
}
