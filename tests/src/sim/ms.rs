//! The composed mode (`--composed`): the Membership Service decides the epochs.
//!
//! Every simulated node runs the node's MS machine (`ms::node::MsNode`, the one the daemon's MS
//! driver runs: the committee role, the submissions and the following of the epochs), and the
//! committee members of each epoch run their role in it, over the same faulty network as
//! the replicas and clients: agreement messages, certificate and freshness shares, batch fetches
//! of a member catching up, probes. Nodes crash with their roles and restart them from what the
//! role asked to persist. When the test reconfigures, nodes that should join submit `Join` (with
//! an admission certificate), nodes that should go submit `Leave`, and the committee members
//! submit `EndEpoch` (the epoch timer, fired by the test), each resent until executed or the
//! epoch is over, as the daemon resends (`ms::submissions`); a node outside the committee learns
//! that its request was executed as the daemon does, from `f_ms+1` members' `Executed` words.
//! The certificate the committee
//! assembles is what every node installs, and it reaches them as it reaches nodes: the members
//! that assembled it push it to the root of the push tree, every node forwards what it installs
//! to its children and pulls from a member every second (`ms::follower`, the daemon's too; the
//! test installs nothing itself, not even at the heal). The replicas, clients, transfers and
//! collections live through those epochs.
//!
//! Byzantine dBQS nodes are Byzantine MS members too, each in one way ([`Lie`]): silent; sending
//! garbage (bit-flipped copies of its agreement messages and shares, random bytes); or lying
//! (agreeing honestly, but with shares for values it did not sign, tampered batch logs, inverted
//! probe verdicts, and its own false accusations, early ends of the epoch and joins without
//! admission, and pushes of tampered configuration deltas); or equivocating as a primary (each batch to some members, another for the same
//! slot, with its commit, to the others). They run the real machine and lie through its outputs, as a node with a modified
//! driver would. Their draws come from the MS's own random stream.
//!
//! Checks (beside every dBQS check): no correct member signs two different agreement statements
//! for one slot, across its crashes and restarts ([`SignedLog`]; the driver mutant
//! `forget-signed-state`, a restart without the persisted state, is caught by it); every
//! certificate a correct member assembles verifies as the successor of the configuration before;
//! two correct members never certify different configurations of one epoch; no epoch ends unless
//! a correct member asked; no configuration admits a node without an admission certificate; once
//! the faults healed, a reconfiguration the test asks for is certified within the liveness bound.

use super::{Ev, Sim};
use crate::rng::Rng;
use crate::signed::SignedLog;
use dbqsfs_core::config::{CertifiedConfig, ConfigHash, Epoch, Member};
use dbqsfs_core::crypto::{Domain, Keypair, NodeId, Signature};
use dbqsfs_core::dbqs::replica::Handled;
use dbqsfs_core::ms::delta::{deltas_after, resolve, CertifiedDelta};
use dbqsfs_core::ms::key::{KeyShare, KeyState, RoundDeals};
use dbqsfs_core::ms::membership::{AdmissionCert, MsOp};
use dbqsfs_core::ms::node::{Event, MsNode, Options, Output};
use dbqsfs_core::ms::pbft::{batch_digest, AgreementMessage, Commit, PrePrepare, Request, Signed};
use dbqsfs_core::ms::pieces::{piece, ConfigHead};
use dbqsfs_core::ms::probe::probe_body;
use dbqsfs_core::ms::role::Resume;
use dbqsfs_core::ms::threshold::share_statement;
use dbqsfs_core::ms::wire::{is_ms, MsMessage, SignStep};
use dbqsfs_core::wire::{decode, encode_msg, within, Protocol};
use std::collections::BTreeMap;

/// Resubmission period of an operation not executed yet.
const RESUBMIT_MS: u64 = 1_000;
/// Period of a node's pulls of configurations.
const PULL_MS: u64 = 1_000;
/// Most configurations in one push or pull answer (as the daemon's).
const MAX_CONFIGS: usize = 64;

/// What a role persisted in one epoch: the record and the batches.
type Disk = (Vec<u8>, Vec<Vec<u8>>);

/// The MS side of a composed run.
pub(super) struct Ms {
    admission: Keypair,
    /// Draws of the MS (nonce seeds, pull rotations), apart from the run's stream.
    rng: Rng,
    /// Each node's MS machine (volatile: lost in a crash).
    nodes: BTreeMap<usize, MsNode>,
    /// What each node's role persisted, by epoch: its disk.
    disks: BTreeMap<(usize, Epoch), Disk>,
    /// What each node persisted of the MS key (its shares as bytes, the round deals it keeps).
    key_disks: BTreeMap<usize, (Vec<Vec<u8>>, Vec<RoundDeals>)>,
    /// The MS key, once a certified configuration carried it.
    key: Option<[u8; 32]>,
    /// The pending timer event of each node's machine.
    timers: BTreeMap<usize, u64>,
    /// What correct members certified, by epoch.
    certified: BTreeMap<Epoch, ConfigHash>,
    /// The reconfiguration the test asked for and not certified yet: from which epoch, to which
    /// members (pool indices); and the nodes that queued their part of it.
    target: Option<(Epoch, Vec<usize>)>,
    queued: std::collections::BTreeSet<(usize, Epoch)>,
    pub(super) epochs_certified: u64,
    /// Roles taken up by Byzantine nodes that lie in them.
    pub(super) lying_roles: u64,
    /// Pre-prepares a Byzantine primary equivocated on.
    pub(super) equivocations: u64,
    /// Bytes of configurations or deltas in a pull's answer (drawn per seed: in a quarter of the
    /// seeds none fit, as at 100,000 members, and every node that falls behind fetches the next
    /// configuration whole, in pieces).
    answer_budget: usize,
    /// Pieces of whole configurations that correct nodes served, and pieces nodes refused.
    pub(super) pieces_served: u64,
    pub(super) pieces_refused: u64,
    /// Freshness certificates correct members assembled under the MS key (each checked).
    pub(super) fresh_under_key: u64,
    /// Pull answers in which a lying node claimed epochs it does not hold.
    pub(super) false_epochs: u64,
    /// How each Byzantine node lies in its MS role (drawn when it first takes one up).
    lies: BTreeMap<usize, Lie>,
    /// What correct members signed in the agreement.
    signed: SignedLog,
    /// The driver mutant `forget-signed-state`: a restarted member resumes without its disk.
    forget_signed_state: bool,
}

/// How a Byzantine node behaves in its MS role. It runs the real machine and lies through its
/// outputs, as a node with a modified driver would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lie {
    /// Sends nothing, submits nothing.
    Silent,
    /// Sends bit-flipped copies of its agreement messages and shares, and random bytes.
    Garbage,
    /// Agrees honestly, but its certificate and freshness shares are for values it did not sign,
    /// its batch logs are tampered with, its probe verdicts are inverted, and it submits false
    /// accusations of live members, early ends of the epoch and joins without admission.
    Liar,
    /// As a primary, equivocates: every batch it pre-prepares goes to some members, another one
    /// (reordered, cut, empty or with a request of its own), signed for the same slot and backed
    /// by its commit, to the others. Otherwise honest.
    Equivocate,
}

impl Ms {
    pub(super) fn new(seed: u64, forget_signed_state: bool) -> Ms {
        let mut rng = Rng::new(seed ^ 0x636f_6d70_6f73_6564);
        let admission = Keypair::from_seed(rng.seed32());
        let answer_budget = if rng.below(4) == 0 { 0 } else { usize::MAX };
        Ms {
            answer_budget,
            pieces_served: 0,
            pieces_refused: 0,
            fresh_under_key: 0,
            false_epochs: 0,
            admission,
            rng,
            nodes: BTreeMap::new(),
            disks: BTreeMap::new(),
            key_disks: BTreeMap::new(),
            key: None,
            timers: BTreeMap::new(),
            certified: BTreeMap::new(),
            target: None,
            queued: Default::default(),
            epochs_certified: 0,
            lying_roles: 0,
            equivocations: 0,
            lies: BTreeMap::new(),
            signed: SignedLog::default(),
            forget_signed_state,
        }
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

    /// How node `n` behaves in its MS role: `None` if it is correct.
    fn lie(&mut self, n: usize) -> Option<Lie> {
        self.nodes[n].byz.as_ref()?;
        let ms = self.ms();
        let lie = match ms.lies.get(&n) {
            Some(l) => *l,
            None => {
                let l = *ms
                    .rng
                    .pick(&[Lie::Silent, Lie::Garbage, Lie::Liar, Lie::Equivocate]);
                ms.lies.insert(n, l);
                l
            }
        };
        Some(lie)
    }

    /// Node `n`'s MS machine (a restarted node starts a new one, from the epoch it holds).
    fn ms_node(&mut self, n: usize) -> &mut MsNode {
        let key = self.nodes[n].key.clone();
        let config = self.configs[self.nodes[n].replica.epoch() as usize]
            .config
            .clone();
        let now = self.now;
        let ms = self.ms.as_mut().expect("composed mode");
        let opts = Options {
            admission_key: ms.admission.public(),
            pull_ms: PULL_MS,
            resubmit_ms: RESUBMIT_MS,
            // The test ends epochs itself (`ms_queue_wants`).
            epoch_timer: false,
        };
        let disk = &ms.key_disks;
        ms.nodes.entry(n).or_insert_with(|| {
            let shares = disk
                .get(&n)
                .map(|(shares, rounds)| KeyState {
                    shares: shares
                        .iter()
                        .filter_map(|b| KeyShare::from_bytes(b).ok())
                        .collect(),
                    rounds: rounds.clone(),
                })
                .unwrap_or_default();
            MsNode::new(key, config, shares, opts, now)
        })
    }

    /// Node `n` (up) enters the newest epoch it installed: its machine forwards what it
    /// installed, and, in the committee, takes its role up, from its disk if it persisted
    /// something in that epoch.
    pub(super) fn ms_enter(&mut self, n: usize) {
        if self.ms.is_none() || !self.nodes[n].up {
            return;
        }
        let config = self.configs[self.nodes[n].replica.epoch() as usize]
            .config
            .clone();
        let disk = if self.ms_node(n).wants_role(&config) && !self.ms().forget_signed_state {
            self.ms().disks.get(&(n, config.epoch)).cloned()
        } else {
            None
        };
        let resume = match &disk {
            Some((record, batches)) => Resume::Saved { record, batches },
            None => Resume::Fresh,
        };
        let seed = self.ms().rng.seed32();
        let now = self.now;
        self.ms_node(n).enter(&config, resume, seed, now);
        self.ms_drain(n);
    }

    /// Runs node `n`'s machine's clock now (pulls, submissions, role timers).
    fn ms_poke(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        let now = self.now;
        let rotate = self.ms().rng.next_u64();
        // As the daemon does: sequence numbers from the clock stay above those of an earlier run.
        self.ms_node(n).on_timer(now, now, rotate, now << 10);
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

    /// Node `n` crashed: its machine's memory is gone (its disk stays).
    pub(super) fn ms_crash(&mut self, n: usize) {
        if let Some(ms) = self.ms.as_mut() {
            ms.nodes.remove(&n);
            ms.timers.remove(&n);
            ms.queued.retain(|(m, _)| *m != n);
        }
    }

    /// MS bytes for node `n` from `from`.
    pub(super) fn ms_deliver(&mut self, n: usize, from: NodeId, bytes: &[u8]) {
        if !self.nodes[n].up || self.lie(n) == Some(Lie::Silent) {
            return;
        }
        let now = self.now;
        if !is_ms(bytes) {
            let _ = self.ms_node(n).on_agreement(now, from, bytes);
            return self.ms_drain(n);
        }
        let Ok(env) = decode::<MsMessage>(bytes) else {
            return;
        };
        let me = self.nodes[n].key.node_id();
        let epoch = self.nodes[n].replica.epoch();
        match env.msg {
            // What needs no machine: the configurations the node holds, and pushes (a push is
            // not an answer to anything). A lying node claims epochs it does not hold (an empty
            // answer that names a later epoch sends the asker after a head that never comes or
            // does not verify).
            MsMessage::DeltasAfter { .. } | MsMessage::ChainAfter { .. }
                if self.lie(n).is_some_and(|l| l != Lie::Silent) =>
            {
                let newest = self.nodes[n].replica.chain().epoch() + 5;
                let reply = MsMessage::Deltas {
                    deltas: Vec::new(),
                    freshness: None,
                    newest,
                };
                self.ms().false_epochs += 1;
                self.send(me, from, encode_msg(epoch, reply));
            }
            MsMessage::DeltasAfter { epoch: after } => {
                if self.nodes[n].byz.is_none() {
                    let budget = self.ms().answer_budget;
                    let chain = self.nodes[n].replica.chain();
                    let reply = MsMessage::Deltas {
                        deltas: within(deltas_after(chain, after, MAX_CONFIGS), budget),
                        freshness: None,
                        newest: chain.epoch(),
                    };
                    self.send(me, from, encode_msg(epoch, reply));
                }
            }
            MsMessage::ChainAfter { epoch: after } => {
                if self.nodes[n].byz.is_none() {
                    let budget = self.ms().answer_budget;
                    let chain = self.nodes[n].replica.chain();
                    let reply = MsMessage::Chain {
                        configs: within(chain.after(after, MAX_CONFIGS), budget),
                        freshness: None,
                        newest: chain.epoch(),
                    };
                    self.send(me, from, encode_msg(epoch, reply));
                }
            }
            // A whole configuration in pieces: correct nodes serve what they hold, lying ones
            // tampered heads and pieces.
            MsMessage::HeadAsk { epoch: e } => {
                let lie = self.lie(n);
                let Some(cc) = self.nodes[n].replica.chain().get(e) else {
                    return;
                };
                let (mut head, _) = ConfigHead::of(cc);
                match lie {
                    Some(Lie::Silent) => return,
                    Some(_) => head.cvs.iter_mut().for_each(|cv| cv[0] ^= 1),
                    None => {}
                }
                self.send(me, from, encode_msg(epoch, MsMessage::Head(Box::new(head))));
            }
            MsMessage::PieceAsk {
                epoch: e,
                hash,
                index,
            } => {
                let lie = self.lie(n);
                let held = self.nodes[n].replica.chain().get(e).and_then(|cc| {
                    let (head, whole) = ConfigHead::of(cc);
                    piece(&whole, index)
                        .filter(|_| head.hash == hash)
                        .map(<[u8]>::to_vec)
                });
                let bytes = match (lie, held) {
                    (Some(Lie::Silent), _) => return,
                    // A liar answers whether it holds the piece or not.
                    (Some(_), Some(mut bytes)) => {
                        bytes[0] ^= 1;
                        bytes
                    }
                    (Some(_), None) => self.ms().rng.bytes(64),
                    (None, Some(bytes)) => {
                        self.ms().pieces_served += 1;
                        bytes
                    }
                    (None, None) => return,
                };
                self.send(
                    me,
                    from,
                    encode_msg(epoch, MsMessage::Piece { index, bytes }),
                );
            }
            MsMessage::Push { configs, .. } => {
                if !configs.is_empty() && self.nodes[n].byz.is_none() {
                    // Installed only if the certificates chain to what the node holds.
                    self.apply(n, from, Handled::Install(configs));
                }
            }
            MsMessage::PushDeltas { deltas, .. } => {
                if self.nodes[n].byz.is_none() {
                    // Applied to what the node holds, each verified as the successor of the one
                    // before; a node that lacks the epoch before pulls.
                    let (configs, _) = resolve(self.nodes[n].replica.chain(), &deltas);
                    for c in &configs {
                        let e = c.config.epoch as usize;
                        if self.configs.get(e).is_some_and(|k| k.config != c.config) {
                            self.violation(format!(
                                "MS: node {n} took a delta of epoch {e} that makes another \
                                 configuration than the certified one"
                            ));
                        }
                    }
                    if !configs.is_empty() {
                        self.apply(n, from, Handled::Install(configs));
                    }
                }
            }
            // Answers to the node's requests (the simulated network has no request-response).
            msg @ (MsMessage::Chain { .. }
            | MsMessage::Deltas { .. }
            | MsMessage::Head(_)
            | MsMessage::Piece { .. }
            | MsMessage::BatchLog { .. }
            | MsMessage::KeyRound(_)
            | MsMessage::Refused { .. }) => {
                self.ms_node(n).on_answer(now, from, msg);
                self.ms_drain(n);
            }
            msg => {
                let answer = self.ms_node(n).on_message(now, from, msg);
                if let Some(mut answer) = answer {
                    if let (MsMessage::KeyRound(Some(deals)), Some(_)) =
                        (&mut answer, self.nodes[n].byz.as_ref())
                    {
                        // Tampered deals: the member recovering must not take them.
                        if let Some(b) = deals
                            .deals
                            .first_mut()
                            .and_then(|(_, d)| d.sealed.first_mut())
                        {
                            b[0] ^= 1;
                        }
                    }
                    if let (MsMessage::BatchLog { batches }, Some(_)) =
                        (&mut answer, self.nodes[n].byz.as_ref())
                    {
                        // A tampered log: the member catching up must not take it.
                        match batches.iter_mut().flatten().next() {
                            Some(r) => r.seq += 1,
                            None => {
                                batches.pop();
                            }
                        }
                    }
                    self.send(me, from, encode_msg(epoch, answer));
                }
                self.ms_drain(n);
            }
        }
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
        self.ms_node(n)
            .on_probe_answer(epoch, target, &nonce, answer.as_ref());
        self.ms_drain(n);
    }

    pub(super) fn ms_timer(&mut self, n: usize, at: u64) {
        if self.ms().timers.get(&n) != Some(&at) || !self.nodes[n].up {
            return;
        }
        self.ms().timers.remove(&n);
        self.ms_poke(n);
    }

    /// Schedules node `n`'s machine's next timer.
    fn ms_arm(&mut self, n: usize) {
        let Some(t) = self.ms().nodes.get(&n).map(MsNode::next_timer) else {
            return;
        };
        let t = t.max(self.now + 1);
        if self.ms().timers.get(&n).is_none_or(|cur| t < *cur) {
            self.ms().timers.insert(n, t);
            self.schedule(t, Ev::MsTimer { n, at: t });
        }
    }

    /// Carries out node `n`'s outputs in order, as the daemon's MS driver does (a Byzantine node
    /// lies through them, [`Lie`]).
    fn ms_drain(&mut self, n: usize) {
        let me = self.nodes[n].key.node_id();
        let lie = self.lie(n);
        let mut installs = Vec::new();
        while let Some(out) = self.ms().nodes.get_mut(&n).and_then(MsNode::poll) {
            let epoch = self.ms().nodes.get(&n).map_or(0, MsNode::epoch);
            match out {
                Output::Persist(saved) => {
                    let disk = self.ms().disks.entry((n, saved.epoch)).or_default();
                    disk.0 = saved.record;
                    disk.1
                        .truncate(saved.first_batch.saturating_sub(1) as usize);
                    disk.1.extend(saved.batches);
                }
                Output::KeyState(state) => {
                    let shares = state.shares.iter().map(|s| s.to_bytes().to_vec()).collect();
                    self.ms().key_disks.insert(n, (shares, state.rounds));
                }
                Output::Event(Event::Role { sat_out, .. }) => match lie {
                    None => {
                        if let Some(why) = sat_out {
                            self.violation(format!(
                                "MS: node {n} cannot take its role in epoch {epoch} up: {why}"
                            ));
                        }
                    }
                    Some(Lie::Garbage | Lie::Liar | Lie::Equivocate) => self.ms().lying_roles += 1,
                    Some(Lie::Silent) => {}
                },
                _ if lie == Some(Lie::Silent) => {}
                Output::Agreement { to, bytes } => {
                    if lie.is_none() {
                        let index = self.ms().nodes.get(&n).and_then(|m| {
                            let c = &m.role()?.config().committee;
                            c.iter().position(|id| *id == me)
                        });
                        let index = index.map_or(u32::MAX, |i| i as u32);
                        for v in self.ms().signed.record(n, index, &bytes) {
                            self.violation(v);
                        }
                    }
                    if lie == Some(Lie::Equivocate) && self.ms_equivocate(n, epoch, &to, &bytes) {
                        continue;
                    }
                    for to in to {
                        let bytes = self.ms_garble(lie, &bytes);
                        self.send(me, to, bytes);
                    }
                }
                // A Byzantine node neither pulls nor passes configurations on.
                Output::Send {
                    msg: MsMessage::Push { .. } | MsMessage::PushDeltas { .. },
                    ..
                } if lie.is_some() => {}
                Output::Send {
                    to,
                    msg: MsMessage::Submit(req),
                } => {
                    let req = if lie == Some(Lie::Liar) {
                        self.ms_lie_verdict(n, req)
                    } else {
                        req
                    };
                    let bytes = encode_msg(epoch, MsMessage::Submit(req));
                    for to in to {
                        self.send(me, to, bytes.clone());
                    }
                }
                Output::Send { to, msg } => {
                    let msg = if lie == Some(Lie::Liar) {
                        self.ms_lie_share(n, msg)
                    } else {
                        msg
                    };
                    let bytes = encode_msg(epoch, msg);
                    for to in to {
                        let bytes = self.ms_garble(lie, &bytes);
                        self.send(me, to, bytes);
                    }
                }
                Output::Probe {
                    epoch,
                    target,
                    nonce,
                    timeout_ms,
                } => self.ms_probe(n, epoch, target, nonce, timeout_ms),
                Output::Request {
                    to,
                    msg: msg @ MsMessage::Batches { .. },
                } => {
                    self.send(me, to, encode_msg(epoch, msg));
                }
                _ if lie.is_some() => {}
                Output::Request { to, msg } => {
                    self.send(me, to, encode_msg(epoch, msg));
                }
                Output::Forward { to, after } => {
                    let deltas = deltas_after(self.nodes[n].replica.chain(), after, MAX_CONFIGS);
                    if deltas.is_empty() {
                        continue;
                    }
                    let msg = MsMessage::PushDeltas {
                        deltas,
                        freshness: None,
                    };
                    let bytes = encode_msg(epoch, msg);
                    for to in to {
                        self.send(me, to, bytes.clone());
                    }
                }
                // Installed once the outputs before are carried out (installing enters the
                // new epoch, which runs the machine again).
                Output::Install(configs) => installs.push(configs),
                Output::InstallDeltas(deltas) => {
                    let (configs, _) = resolve(self.nodes[n].replica.chain(), &deltas);
                    if !configs.is_empty() {
                        installs.push(configs);
                    }
                }
                Output::Event(Event::Certified(cc)) => self.ms_certified(n, cc),
                Output::Event(Event::Refused { reason, .. })
                    if reason.starts_with("configuration piece") =>
                {
                    self.ms().pieces_refused += 1;
                }
                Output::Event(Event::OutOfOrder(e)) => {
                    self.violation(format!("MS: node {n}: {e}"));
                }
                Output::Freshness(cert) if lie.is_none() => {
                    // What a correct member assembled must verify for the certified
                    // configuration of its epoch: under the MS key once that carries it.
                    let e = cert.epoch as usize;
                    if let Some(c) = self.configs.get(e).map(|k| k.config.clone()) {
                        match cert.verify(&c) {
                            Ok(()) if cert.threshold.is_some() => self.ms().fresh_under_key += 1,
                            Ok(()) => {}
                            Err(err) => self.violation(format!(
                                "MS: node {n} assembled a freshness certificate of epoch {e} that does not verify: {err}"
                            )),
                        }
                    }
                }
                Output::PullBootstrap { .. } | Output::Freshness(_) | Output::Event(_) => {}
            }
        }
        self.ms_arm(n);
        for configs in installs {
            self.apply(n, me, Handled::Install(configs));
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

    /// What a garbling Byzantine node sends in place of `bytes`: a bit-flipped copy or random
    /// bytes (others send `bytes`).
    fn ms_garble(&mut self, lie: Option<Lie>, bytes: &[u8]) -> Vec<u8> {
        if lie != Some(Lie::Garbage) {
            return bytes.to_vec();
        }
        let rng = &mut self.ms().rng;
        if bytes.is_empty() || rng.chance(0.2) {
            let len = 1 + rng.below(200);
            return rng.bytes(len);
        }
        let mut out = bytes.to_vec();
        let i = rng.below(out.len());
        out[i] ^= 1 << rng.below(8);
        out
    }

    /// A lying member's share: the certificate share names another configuration than the one
    /// signed, the freshness share another time.
    fn ms_lie_share(&mut self, n: usize, msg: MsMessage) -> MsMessage {
        match msg {
            // A wrong signature share, signed as its own (the evidence that convicts it).
            MsMessage::KeySign {
                epoch,
                hash,
                attempt,
                step:
                    SignStep::Share {
                        session,
                        mut share,
                        next,
                        ..
                    },
            } => {
                if let Some(b) = share.first_mut() {
                    *b ^= 1;
                }
                let package = self
                    .ms()
                    .nodes
                    .get(&n)
                    .and_then(|m| m.role()?.threshold()?.last_package(attempt))
                    .unwrap_or_default();
                let sig = self.nodes[n].key.sign(
                    Domain::KeySign,
                    &share_statement(epoch, attempt, &package, &share),
                );
                MsMessage::KeySign {
                    epoch,
                    hash,
                    attempt,
                    step: SignStep::Share {
                        session,
                        share,
                        sig,
                        next,
                    },
                }
            }
            // A package or a certificate that is not the real one.
            MsMessage::KeySign {
                epoch,
                hash,
                attempt,
                step:
                    SignStep::Package {
                        session,
                        mut package,
                    },
            } => {
                if let Some(b) = package.last_mut() {
                    *b ^= 1;
                }
                MsMessage::KeySign {
                    epoch,
                    hash,
                    attempt,
                    step: SignStep::Package { session, package },
                }
            }
            MsMessage::KeySign {
                epoch,
                hash,
                attempt,
                step: SignStep::Done(mut sig),
            } => {
                sig.0[0] ^= 1;
                MsMessage::KeySign {
                    epoch,
                    hash,
                    attempt,
                    step: SignStep::Done(sig),
                }
            }
            // Word that a node's requests were all executed: alone, never enough to stop it.
            MsMessage::Executed { epoch, .. } => MsMessage::Executed {
                epoch,
                seq: u64::MAX,
            },
            MsMessage::ConfigShare { epoch, sig, .. } => MsMessage::ConfigShare {
                epoch,
                hash: self.ms().rng.seed32(),
                sig,
            },
            MsMessage::FreshShare {
                epoch,
                config,
                time_ms,
                sig,
            } => MsMessage::FreshShare {
                epoch,
                config,
                time_ms: time_ms + 3_600_000,
                sig,
            },
            other => other,
        }
    }

    /// An equivocating primary's pre-prepare: the batch to a random part of `to`, another batch
    /// for the same slot to the rest, each followed by its commit. `false` if `bytes` are no
    /// pre-prepare (they go out as they are).
    fn ms_equivocate(&mut self, n: usize, epoch: Epoch, to: &[NodeId], bytes: &[u8]) -> bool {
        let Ok(env) = decode::<AgreementMessage>(bytes) else {
            return false;
        };
        let AgreementMessage::PrePrepare { pre_prepare, batch } = env.msg else {
            return false;
        };
        if to.len() < 2 {
            return false;
        }
        let key = self.nodes[n].key.clone();
        let me = key.node_id();
        let rng = &mut self.ms().rng;
        let fake = Request::sign(&key, rng.next_u64(), b"equivocation".to_vec());
        let mut alt: Vec<Request> = match rng.below(4) {
            0 => Vec::new(),
            1 => batch.iter().rev().cloned().collect(),
            2 => batch.iter().skip(1).cloned().collect(),
            _ => batch.iter().cloned().chain([fake.clone()]).collect(),
        };
        if batch_digest(&alt) == batch_digest(&batch) {
            alt = vec![fake];
        }
        let mut order = to.to_vec();
        rng.shuffle(&mut order);
        let cut = 1 + rng.below(order.len() - 1);
        let PrePrepare { view, seq, .. } = pre_prepare.body;
        let signer = pre_prepare.signer;
        for (i, to) in order.into_iter().enumerate() {
            let (pp, b) = if i < cut {
                (pre_prepare.clone(), batch.clone())
            } else {
                let digest = batch_digest(&alt);
                let body = PrePrepare { view, seq, digest };
                (Signed::sign(&key, signer, epoch, body), alt.clone())
            };
            let digest = pp.body.digest;
            let commit = Signed::sign(&key, signer, epoch, Commit { view, seq, digest });
            let msg = AgreementMessage::PrePrepare {
                pre_prepare: pp,
                batch: b,
            };
            self.send(me, to, encode_msg(epoch, msg));
            self.send(me, to, encode_msg(epoch, AgreementMessage::Commit(commit)));
        }
        self.ms().equivocations += 1;
        true
    }

    /// A lying member's probe verdict in a submission is the opposite of what it found (the
    /// request signed again with the same number).
    fn ms_lie_verdict(&mut self, n: usize, req: Request) -> Request {
        match postcard::from_bytes::<MsOp>(&req.payload) {
            Ok(MsOp::Probe {
                epoch,
                target,
                responsive,
            }) => {
                let op = MsOp::Probe {
                    epoch,
                    target,
                    responsive: !responsive,
                };
                let payload = postcard::to_allocvec(&op).expect("MS operations always encode");
                Request::sign(&self.nodes[n].key, req.seq, payload)
            }
            _ => req,
        }
    }

    /// A lying node pushes a tampered delta of its newest epoch (one more member than was
    /// certified) to a random node: it must not apply.
    fn ms_lie_push(&mut self, n: usize) {
        let chain = self.nodes[n].replica.chain().clone();
        let epoch = chain.epoch();
        let (Some(prev), Some(cur)) = (
            epoch.checked_sub(1).and_then(|e| chain.get(e)),
            chain.get(epoch),
        ) else {
            return;
        };
        let mut delta = CertifiedDelta::of(&prev.config, cur);
        let stranger = Keypair::from_seed(self.ms().rng.seed32());
        delta
            .delta
            .joined
            .push(Member::new(stranger.public(), "sim"));
        delta.delta.joined.sort_by_key(|m| m.id);
        let to = cur.config.members[self.ms().rng.below(cur.config.members.len())].id;
        let me = self.nodes[n].key.node_id();
        let msg = MsMessage::PushDeltas {
            deltas: vec![delta],
            freshness: None,
        };
        self.send(me, to, encode_msg(epoch, msg));
    }

    /// A lying committee member's own submissions: now and then it accuses a live member, asks
    /// to end the epoch before anyone else, or submits a join without admission.
    fn ms_lie_submit(&mut self, n: usize) {
        let Some(config) = self
            .ms()
            .nodes
            .get(&n)
            .and_then(MsNode::role)
            .filter(|r| r.agreement().is_some())
            .map(|r| r.config().clone())
        else {
            return;
        };
        let epoch = config.epoch;
        let me = self.nodes[n].key.node_id();
        if self.ms().rng.chance(0.3) {
            let others: Vec<NodeId> = config
                .members
                .iter()
                .map(|m| m.id)
                .filter(|id| *id != me)
                .collect();
            if !others.is_empty() {
                let target = others[self.ms().rng.below(others.len())];
                self.ms_want(
                    n,
                    MsOp::Probe {
                        epoch,
                        target,
                        responsive: false,
                    },
                );
            }
        }
        if self.ms().target.is_none() && self.ms().rng.chance(0.15) {
            self.ms_want(n, MsOp::EndEpoch { epoch });
        }
        if self.ms().rng.chance(0.1) {
            let stranger = Keypair::from_seed(self.ms().rng.seed32());
            // Admitted by itself, not by the admission authority.
            let cert = AdmissionCert::sign(&self.nodes[n].key, &stranger.public());
            let op = MsOp::Join {
                epoch,
                member: Member::new(stranger.public(), "sim"),
                cert,
            };
            self.ms_want(n, op);
        }
    }

    /// Node `n` wants `op` executed in its current epoch: its machine submits it now if nothing
    /// is outstanding.
    fn ms_want(&mut self, n: usize, op: MsOp) {
        if !self.nodes[n].up {
            return;
        }
        self.ms_node(n).want(op);
        self.ms_poke(n);
    }

    /// Every second: nodes enter what they installed and queue their part of a reconfiguration
    /// asked for; lying members submit their lies.
    pub(super) fn ms_tick(&mut self) {
        for n in 0..self.nodes.len() {
            if self.nodes[n].up {
                self.ms_enter(n);
                self.ms_queue_wants(n);
                if self.lie(n) == Some(Lie::Liar) {
                    self.ms_lie_submit(n);
                    if self.ms().rng.chance(0.3) {
                        self.ms_lie_push(n);
                    }
                }
                self.ms_arm(n);
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
            let node = ms.nodes.get(&n);
            let role = node.and_then(MsNode::role).map(|r| {
                let a = r.agreement();
                let p = r.app().membership().pending();
                format!(
                    "role of epoch {} view {:?} changing {:?} executed {} installing {:?} ended {} end votes {} key dealt {}/{} signing {:?}",
                    r.epoch(),
                    a.map(|a| a.view()),
                    a.and_then(|a| a.changing_to()),
                    r.app().executed(),
                    r.installing(),
                    r.app().ended().is_some(),
                    p.end_votes,
                    p.key_dealt,
                    p.key_needed,
                    r.threshold().map(|t| t.done().is_some()),
                )
            });
            out += &format!(
                "; node {n} (epoch {}{}): {role:?} key shares {:?} wants {:?} outstanding {:?}",
                self.nodes[n].replica.epoch(),
                if self.nodes[n].byz.is_some() {
                    ", byzantine"
                } else {
                    ""
                },
                node.map(|m| {
                    m.key_member()
                        .holder()
                        .held()
                        .iter()
                        .map(|s| s.epoch())
                        .collect::<Vec<_>>()
                }),
                node.map(|m| m.submissions().pending().collect::<Vec<_>>()),
                node.and_then(|m| m.submissions().outstanding())
                    .map(|r| r.seq)
            );
        }
        out
    }

    /// Node `n`'s role assembled the next configuration's certificate (its machine pushes it to
    /// the root of the push tree and installs it).
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
        let key = cc
            .config
            .key
            .as_ref()
            .and_then(|k| k.commitments.first().copied());
        match (self.ms().key, key) {
            (None, Some(k)) => self.ms().key = Some(k),
            (Some(before), now) if now != Some(before) => self.violation(format!(
                "MS: the configuration of epoch {epoch} carries another MS key, or none"
            )),
            (None, None) if epoch > 1 => self.violation(format!(
                "MS: the configuration of epoch {epoch} carries no MS key: the key generation \
                 of epoch {} did not end it",
                epoch - 1
            )),
            _ => {}
        }
        let convicted: Vec<NodeId> = self
            .ms()
            .nodes
            .get(&n)
            .and_then(|m| {
                m.role()?
                    .threshold()
                    .map(|t| t.cheaters().iter().copied().collect())
            })
            .unwrap_or_default();
        for c in convicted {
            if self
                .nodes
                .iter()
                .any(|x| x.key.node_id() == c && x.byz.is_none())
            {
                self.violation(format!(
                    "MS: node {n} holds correct node {} a cheater in signing epoch {epoch}",
                    c.short()
                ));
            }
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
        if self.ms().target.is_none() {
            self.violation(format!(
                "MS: epoch {epoch} was certified though no correct member asked to end epoch {}",
                epoch - 1
            ));
        }
        if let Some(m) = cc
            .config
            .members
            .iter()
            .find(|m| !self.node_index.contains_key(&m.id))
        {
            self.violation(format!(
                "MS: epoch {epoch} admits {}, which holds no admission certificate",
                m.id.short()
            ));
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
    }
}
