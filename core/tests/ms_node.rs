//! A node's MS machine (`ms::node::MsNode`) on every node of a tiny in-memory cluster whose
//! driver only carries outputs out (no protocol decision of its own): a stranger joins and the
//! committee ends the epoch; every node, in the committee or not, learns the new configuration
//! from the machines' pushes and pulls alone; a member restarted from its disk goes on; every
//! agreement statement leaves after the persist that holds it; after a failed write nothing
//! leaves; a node that missed an epoch while pull answers carry nothing (configurations too large
//! for a message) fetches it whole, in pieces, through its machine's own requests.

use dbqsfs_core::config::{CertifiedConfig, ConfigChain, Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId};
use dbqsfs_core::ms::delta::{deltas_after, resolve};
use dbqsfs_core::ms::membership::{AdmissionCert, MsOp};
use dbqsfs_core::ms::node::{Event, MsNode, Options, Output};
use dbqsfs_core::ms::pieces::{piece, ConfigHead};
use dbqsfs_core::ms::role::Resume;
use dbqsfs_core::ms::wire::MsMessage;
use dbqsfs_core::wire::within;
use std::collections::VecDeque;

fn admission() -> Keypair {
    Keypair::from_seed([99; 32])
}

fn opts() -> Options {
    Options {
        admission_key: admission().public(),
        pull_ms: 1_000,
        resubmit_ms: 500,
        epoch_timer: false,
    }
}

/// One node: its machine, its chain of configurations, its disk.
struct Node {
    key: Keypair,
    ms: MsNode,
    chain: ConfigChain,
    disk: Option<(Vec<u8>, Vec<Vec<u8>>)>,
    /// The shares of the MS key it persisted.
    shares: dbqsfs_core::ms::key::KeyState,
    up: bool,
    /// Persists carried out (or tried) in the current epoch, and agreement outputs sent before any.
    persisted: usize,
    unpersisted_sends: usize,
    fail_writes: bool,
    /// Agreement outputs after a failed write.
    leaked: usize,
    /// Pushed deltas that did not apply (the node lacked the epoch before, or they were bad).
    refused_deltas: usize,
    events: Vec<Event>,
}

enum Msg {
    Agreement(Vec<u8>),
    Ms(MsMessage),
}

struct Net {
    nodes: Vec<Node>,
    queue: VecDeque<(usize, NodeId, Msg)>,
    now: u64,
    /// Bytes of configurations or deltas a pull's answer may hold.
    answer_budget: usize,
    /// Head and piece requests delivered.
    whole_requests: usize,
}

impl Net {
    /// Six members (f = 1, a committee of four) and `extra` strangers that know genesis.
    fn new(extra: usize) -> Net {
        let keys: Vec<Keypair> = (0..6 + extra as u8)
            .map(|i| Keypair::from_seed([i + 60; 32]))
            .collect();
        let members = keys[..6]
            .iter()
            .map(|k| Member::new(k.public(), "127.0.0.1:1"))
            .collect();
        let genesis =
            CertifiedConfig::genesis(Configuration::new(0, Params::with_f(1), members, None));
        let nodes = keys
            .into_iter()
            .map(|key| {
                let chain = ConfigChain::new(genesis.clone()).unwrap();
                Node {
                    ms: MsNode::new(
                        key.clone(),
                        chain.config().clone(),
                        Default::default(),
                        opts(),
                        0,
                    ),
                    key,
                    chain,
                    disk: None,
                    shares: Default::default(),
                    up: true,
                    persisted: 0,
                    unpersisted_sends: 0,
                    fail_writes: false,
                    leaked: 0,
                    refused_deltas: 0,
                    events: Vec::new(),
                }
            })
            .collect();
        let mut net = Net {
            nodes,
            queue: VecDeque::new(),
            now: 0,
            answer_budget: usize::MAX,
            whole_requests: 0,
        };
        for i in 0..net.nodes.len() {
            net.enter(i);
        }
        net
    }

    fn index(&self, id: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.key.node_id() == *id)
    }

    fn committee(&self) -> Vec<usize> {
        let c = &self.nodes[0].chain.config().committee;
        c.iter().filter_map(|id| self.index(id)).collect()
    }

    /// Node `i` enters its newest configuration, with its disk if it takes a role there.
    fn enter(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let config = node.chain.config().clone();
        let disk = node.disk.clone();
        let resume = match (&disk, node.ms.wants_role(&config)) {
            (Some((record, batches)), true) => Resume::Saved { record, batches },
            _ => Resume::Fresh,
        };
        node.ms.enter(&config, resume, [i as u8; 32], self.now);
        self.drain(i);
    }

    /// Carries out node `i`'s outputs in order.
    fn drain(&mut self, i: usize) {
        let me = self.nodes[i].key.node_id();
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.key.node_id()).collect();
        let index = |id: &NodeId| ids.iter().position(|x| x == id);
        let mut entered = false;
        while let Some(out) = self.nodes[i].ms.poll() {
            let node = &mut self.nodes[i];
            if node.fail_writes && node.persisted > 0 && matches!(out, Output::Agreement { .. }) {
                node.leaked += 1;
            }
            match out {
                Output::Persist(saved) => {
                    if node.fail_writes {
                        node.persisted = 1;
                        node.ms.persist_failed();
                        continue;
                    }
                    let disk = node.disk.get_or_insert_with(Default::default);
                    disk.0 = saved.record;
                    disk.1
                        .truncate(saved.first_batch.saturating_sub(1) as usize);
                    disk.1.extend(saved.batches);
                    node.persisted += 1;
                }
                Output::Agreement { to, bytes } => {
                    if node.persisted == 0 {
                        node.unpersisted_sends += 1;
                    }
                    for to in to.iter().filter_map(&index) {
                        self.queue
                            .push_back((to, me, Msg::Agreement(bytes.clone())));
                    }
                }
                Output::Send { to, msg } => {
                    for to in to.iter().filter_map(&index) {
                        self.queue.push_back((to, me, Msg::Ms(msg.clone())));
                    }
                }
                Output::Request { to, msg } => {
                    if let Some(to) = index(&to) {
                        self.queue.push_back((to, me, Msg::Ms(msg)));
                    }
                }
                Output::Forward { to, after } => {
                    let deltas = deltas_after(&node.chain, after, 64);
                    let msg = MsMessage::PushDeltas {
                        deltas,
                        freshness: None,
                    };
                    for to in to.iter().filter_map(&index) {
                        self.queue.push_back((to, me, Msg::Ms(msg.clone())));
                    }
                }
                Output::Install(configs) => {
                    entered |= self.install(i, configs);
                }
                Output::InstallDeltas(deltas) => {
                    let (configs, _) = resolve(&self.nodes[i].chain, &deltas);
                    entered |= self.install(i, configs);
                }
                Output::Event(e) => node.events.push(e),
                Output::KeyState(state) => node.shares = state,
                Output::PullBootstrap { .. } | Output::Probe { .. } | Output::Freshness(_) => {}
            }
        }
        if entered {
            self.enter(i);
        }
    }

    /// Installs what chains to node `i`'s configurations; `true` if it moved on.
    fn install(&mut self, i: usize, configs: Vec<CertifiedConfig>) -> bool {
        let node = &mut self.nodes[i];
        let before = node.chain.epoch();
        let _ = node.chain.extend(configs);
        if node.chain.epoch() > before {
            node.persisted = 0;
            node.disk = None;
            true
        } else {
            false
        }
    }

    fn deliver(&mut self, i: usize, from: NodeId, msg: Msg) {
        if !self.nodes[i].up {
            return;
        }
        let now = self.now;
        match msg {
            Msg::Agreement(bytes) => {
                let _ = self.nodes[i].ms.on_agreement(now, from, &bytes);
            }
            Msg::Ms(MsMessage::DeltasAfter { epoch }) => {
                let chain = &self.nodes[i].chain;
                let reply = MsMessage::Deltas {
                    deltas: within(deltas_after(chain, epoch, 64), self.answer_budget),
                    freshness: None,
                    newest: chain.epoch(),
                };
                self.reply(i, from, reply);
            }
            Msg::Ms(MsMessage::ChainAfter { epoch }) => {
                let chain = &self.nodes[i].chain;
                let reply = MsMessage::Chain {
                    configs: within(chain.after(epoch, 64), self.answer_budget),
                    freshness: None,
                    newest: chain.epoch(),
                };
                self.reply(i, from, reply);
            }
            Msg::Ms(MsMessage::HeadAsk { epoch }) => {
                self.whole_requests += 1;
                if let Some(cc) = self.nodes[i].chain.get(epoch) {
                    let head = Box::new(ConfigHead::of(cc).0);
                    self.reply(i, from, MsMessage::Head(head));
                }
            }
            Msg::Ms(MsMessage::PieceAsk { epoch, index, .. }) => {
                self.whole_requests += 1;
                if let Some(cc) = self.nodes[i].chain.get(epoch) {
                    let bytes = piece(&ConfigHead::of(cc).1, index).unwrap().to_vec();
                    self.reply(i, from, MsMessage::Piece { index, bytes });
                }
            }
            Msg::Ms(MsMessage::PushDeltas { deltas, .. }) => {
                let (configs, refused) = resolve(&self.nodes[i].chain, &deltas);
                self.nodes[i].refused_deltas += usize::from(refused.is_some());
                if self.install(i, configs) {
                    self.enter(i);
                }
            }
            Msg::Ms(
                msg @ (MsMessage::Chain { .. }
                | MsMessage::Deltas { .. }
                | MsMessage::Head(_)
                | MsMessage::Piece { .. }
                | MsMessage::BatchLog { .. }
                | MsMessage::Refused { .. }),
            ) => self.nodes[i].ms.on_answer(now, from, msg),
            Msg::Ms(msg) => {
                if let Some(answer) = self.nodes[i].ms.on_message(now, from, msg) {
                    let to = self.index(&from).unwrap();
                    let me = self.nodes[i].key.node_id();
                    self.queue.push_back((to, me, Msg::Ms(answer)));
                }
            }
        }
        self.drain(i);
    }

    /// Node `i` answers `to`.
    fn reply(&mut self, i: usize, to: NodeId, msg: MsMessage) {
        let to = self.index(&to).unwrap();
        let me = self.nodes[i].key.node_id();
        self.queue.push_back((to, me, Msg::Ms(msg)));
    }

    /// Delivers everything queued and runs every clock for `ms`, in steps of 100 ms.
    fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            while let Some((to, from, msg)) = self.queue.pop_front() {
                self.deliver(to, from, msg);
            }
            self.now += 100;
            for i in 0..self.nodes.len() {
                if self.nodes[i].up {
                    let now = self.now;
                    self.nodes[i].ms.on_timer(now, now, i as u64, now << 10);
                    self.drain(i);
                }
            }
        }
    }

    fn epochs(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.chain.epoch()).collect()
    }
}

#[test]
fn a_stranger_joins_and_every_node_learns_the_epoch_from_the_machines_alone() {
    let mut net = Net::new(1);
    let stranger = 6;
    let key = net.nodes[stranger].key.public();
    let cert = AdmissionCert::sign(&admission(), &key);
    net.nodes[stranger]
        .ms
        .join(Member::new(key, "127.0.0.1:1"), cert);
    net.run(2_000);
    for i in net.committee() {
        net.nodes[i].ms.want(MsOp::EndEpoch { epoch: 0 });
    }
    net.run(5_000);
    assert_eq!(net.epochs(), vec![1; 7], "every node holds epoch 1");
    let config = net.nodes[0].chain.config().clone();
    assert!(
        config.is_member(&net.nodes[stranger].key.node_id()),
        "the stranger joined"
    );
    assert!(net.nodes[stranger]
        .events
        .iter()
        .any(|e| matches!(e, Event::Joined { epoch: 1 })));
    for (i, n) in net.nodes.iter().enumerate() {
        assert_eq!(n.unpersisted_sends, 0, "node {i} signed before persisting");
    }
    // The new committee runs its agreement: it ends its epoch too.
    for i in net.committee() {
        net.nodes[i].ms.want(MsOp::EndEpoch { epoch: 1 });
    }
    net.run(5_000);
    assert_eq!(net.epochs(), vec![2; 7]);
}

#[test]
fn a_committee_member_restarted_from_its_disk_goes_on() {
    let mut net = Net::new(0);
    net.run(1_000);
    let victim = net.committee()[1];
    net.nodes[victim].ms.want(MsOp::EndEpoch { epoch: 0 });
    net.run(1_000);
    // Crash: the machine's memory is gone, the disk stays; restart it from the disk.
    let config = net.nodes[victim].chain.config().clone();
    let key = net.nodes[victim].key.clone();
    let shares = net.nodes[victim].shares.clone();
    net.nodes[victim].ms = MsNode::new(key, config, shares, opts(), net.now);
    net.enter(victim);
    assert!(net.nodes[victim].events.iter().any(|e| matches!(
        e,
        Event::Role {
            epoch: 0,
            resumed: true,
            sat_out: None
        }
    )));
    for i in net.committee() {
        net.nodes[i].ms.want(MsOp::EndEpoch { epoch: 0 });
    }
    net.run(5_000);
    assert_eq!(net.epochs(), vec![1; 6]);
}

#[test]
fn after_a_failed_write_nothing_leaves() {
    let mut net = Net::new(0);
    let victim = net.committee()[2];
    net.nodes[victim].fail_writes = true;
    for i in net.committee() {
        net.nodes[i].ms.want(MsOp::EndEpoch { epoch: 0 });
    }
    net.run(5_000);
    let v = &net.nodes[victim];
    assert_eq!(v.persisted, 1, "the write was tried");
    assert_eq!(v.leaked, 0, "nothing left after the failed write");
    // Three of four members are enough: the epoch still ends.
    assert!(net.epochs().iter().all(|e| *e == 1), "{:?}", net.epochs());
}

#[test]
fn a_node_that_missed_an_epoch_fetches_it_whole_when_answers_cannot_carry_it() {
    let mut net = Net::new(0);
    net.answer_budget = 0; // as at 100,000 members: no configuration fits in an answer
    let committee = net.committee();
    let away = (0..6).find(|i| !committee.contains(i)).unwrap();
    net.nodes[away].up = false;
    for i in net.committee() {
        net.nodes[i].ms.want(MsOp::EndEpoch { epoch: 0 });
    }
    net.run(5_000);
    assert_eq!(net.nodes[away].chain.epoch(), 0, "it was away");
    net.nodes[away].up = true;
    let before = net.whole_requests;
    net.run(5_000);
    assert_eq!(net.epochs(), vec![1; 6], "it caught up");
    assert!(
        net.whole_requests >= before + 2,
        "a head and at least one piece were asked"
    );
    assert!(
        !net.nodes[away]
            .events
            .iter()
            .any(|e| matches!(e, Event::Refused { .. })),
        "nothing was refused"
    );
}

/// The requests node `i`'s machine sends (its submissions), taken from its outputs at `now`.
fn submitted(net: &mut Net, i: usize, now: u64) -> Vec<dbqsfs_core::ms::pbft::Request> {
    net.nodes[i].ms.on_timer(now, now, 0, 1);
    let mut out = Vec::new();
    while let Some(o) = net.nodes[i].ms.poll() {
        if let Output::Send {
            msg: MsMessage::Submit(req),
            ..
        } = o
        {
            out.push(req);
        }
    }
    out
}

fn op_of(req: &dbqsfs_core::ms::pbft::Request) -> MsOp {
    postcard::from_bytes(&req.payload).unwrap()
}

/// Node `o` queues two operations: a verdict on member `target`, then its leave.
fn wants_a_verdict_then_to_leave(net: &mut Net, o: usize, target: usize) {
    let target = net.nodes[target].key.node_id();
    net.nodes[o].ms.want(MsOp::Probe {
        epoch: 0,
        target,
        responsive: false,
    });
    net.nodes[o].ms.want(MsOp::Leave { epoch: 0 });
}

/// A member outside the committee has no role to tell it that its request was executed: it
/// learns so from `f_ms+1` committee members' word (one member's, or a non-member's, is not
/// enough), and only then sends its next operation. (Before, it learned nothing until the epoch
/// ended, so a probe verdict held back the deal of the MS key that the epoch's end waited for.)
#[test]
fn a_member_outside_the_committee_goes_on_once_f_plus_1_members_say_its_request_executed() {
    let mut net = Net::new(0);
    let committee = net.committee();
    let outsiders: Vec<usize> = (0..6).filter(|i| !committee.contains(i)).collect();
    let o = outsiders[0];
    wants_a_verdict_then_to_leave(&mut net, o, committee[0]);
    let first = submitted(&mut net, o, 100);
    assert_eq!(first.len(), 1);
    assert!(matches!(op_of(&first[0]), MsOp::Probe { .. }));
    let seq = first[0].seq;
    let word = MsMessage::Executed { epoch: 0, seq };
    let id = |net: &Net, i: usize| net.nodes[i].key.node_id();
    // One committee member and a member outside the committee say so: not enough.
    let (c0, other) = (id(&net, committee[0]), id(&net, outsiders[1]));
    net.nodes[o].ms.on_message(150, c0, word.clone());
    net.nodes[o].ms.on_message(150, other, word.clone());
    net.nodes[o].ms.on_message(150, c0, word.clone());
    // A word about another epoch does not count either.
    let c2 = id(&net, committee[2]);
    net.nodes[o]
        .ms
        .on_message(150, c2, MsMessage::Executed { epoch: 1, seq });
    assert!(submitted(&mut net, o, 200).is_empty(), "nothing new yet");
    let again = submitted(&mut net, o, 700);
    assert_eq!(again, first, "the outstanding request is sent again");
    // A second committee member: f_ms+1 = 2 say so, and the leave goes.
    let c1 = id(&net, committee[1]);
    net.nodes[o].ms.on_message(750, c1, word);
    let next = submitted(&mut net, o, 800);
    assert_eq!(next.len(), 1);
    assert_eq!(op_of(&next[0]), MsOp::Leave { epoch: 0 });
    assert!(next[0].seq > seq);
}

/// The same through the whole machines: both operations of a member outside the committee are
/// executed in one epoch, the committee telling it of the first as it executes it (and again when
/// it asks again, as after a lost word).
#[test]
fn a_member_outside_the_committee_gets_several_operations_executed_in_one_epoch() {
    let mut net = Net::new(0);
    let committee = net.committee();
    let o = (0..6).find(|i| !committee.contains(i)).unwrap();
    let me = net.nodes[o].key.node_id();
    wants_a_verdict_then_to_leave(&mut net, o, committee[0]);
    // Within the resubmission period (500 ms): the committee told it at once.
    net.run(400);
    let executed: Vec<MsOp> = net.nodes[committee[0]]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Executed { requests, .. } => Some(requests),
            _ => None,
        })
        .flatten()
        .filter(|r| r.client.node_id() == me)
        .map(op_of)
        .collect();
    assert!(
        executed.iter().any(|op| matches!(op, MsOp::Probe { .. })),
        "{executed:?}"
    );
    assert!(executed.contains(&MsOp::Leave { epoch: 0 }), "{executed:?}");
    // Asked again for an executed request, a committee member says again that it was.
    let last = net.nodes[committee[1]]
        .events
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::Executed { requests, .. } => {
                requests.iter().find(|r| r.client.node_id() == me).cloned()
            }
            _ => None,
        })
        .expect("the committee executed the outsider's requests");
    let c1 = committee[1];
    let answer = net.nodes[c1]
        .ms
        .on_message(net.now, me, MsMessage::Submit(last.clone()));
    assert!(answer.is_none());
    let mut told = false;
    while let Some(out) = net.nodes[c1].ms.poll() {
        if let Output::Send {
            to,
            msg: MsMessage::Executed { epoch: 0, seq },
        } = out
        {
            told |= to == vec![me] && seq >= last.seq;
        }
    }
    assert!(
        told,
        "the committee member did not say again that it was executed"
    );
}
