//! A committee member's role (`ms::role::Role`) driven by a tiny in-memory driver: the epoch ends
//! and every member assembles the same certificate; a member restarted from what it persisted
//! goes on; a failed write lets nothing after it out; strangers may only ask to join.

use dbqsfs_core::config::{CertifiedConfig, Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId};
use dbqsfs_core::ms::key::KeyMember;
use dbqsfs_core::ms::membership::MsOp;
use dbqsfs_core::ms::pbft::Request;
use dbqsfs_core::ms::role::{agreement_options, Action, Resume, Role, Setup};
use dbqsfs_core::ms::wire::MsMessage;
use std::collections::VecDeque;

/// Six members, f = 1; the committee is four of them.
fn genesis() -> (Vec<Keypair>, Configuration) {
    let keys: Vec<Keypair> = (0..6).map(|i| Keypair::from_seed([i + 40; 32])).collect();
    let members = keys
        .iter()
        .map(|k| Member::new(k.public(), "127.0.0.1:1"))
        .collect();
    (
        keys,
        Configuration::new(0, Params::with_f(1), members, None),
    )
}

fn setup(key: &Keypair, config: &Configuration) -> Setup {
    Setup {
        key: key.clone(),
        config: config.clone(),
        admission_key: Keypair::from_seed([99; 32]).public(),
        opts: agreement_options(config),
        epoch_timer: false,
        seed: [3; 32],
    }
}

/// One node of the test: its role and its disk.
struct Node {
    id: NodeId,
    key: Keypair,
    role: Role,
    disk: (Vec<u8>, Vec<Vec<u8>>),
    certified: Option<CertifiedConfig>,
    fail_writes: bool,
}

enum Msg {
    Agreement(Vec<u8>),
    Ms(MsMessage),
}

struct Net {
    nodes: Vec<Node>,
    queue: VecDeque<(usize, NodeId, Msg)>,
    now: u64,
    /// Messages that left after a failed write (must stay empty).
    leaked: usize,
    /// Certificate shares still to lose on the way.
    lose_shares: usize,
}

impl Net {
    fn new(keys: &[Keypair], config: &Configuration) -> Net {
        let nodes = config
            .committee
            .iter()
            .map(|id| {
                let key = keys.iter().find(|k| k.node_id() == *id).unwrap().clone();
                let (role, why) = Role::new(setup(&key, config), Resume::Fresh, 0);
                assert!(why.is_none());
                Node {
                    id: *id,
                    key,
                    role,
                    disk: Default::default(),
                    certified: None,
                    fail_writes: false,
                }
            })
            .collect();
        let mut net = Net {
            nodes,
            queue: VecDeque::new(),
            now: 0,
            leaked: 0,
            lose_shares: 0,
        };
        // Every member deals its part of the MS key (request 1 of its key), as its node does on
        // entering the epoch: the epoch can end only once the key was generated.
        for i in 0..net.nodes.len() {
            let key = net.nodes[i].key.clone();
            let op = KeyMember::new(key.clone(), Default::default())
                .enter(config)
                .expect("every member deals at genesis");
            let op = MsOp::Key {
                epoch: config.epoch,
                op: Box::new(op),
            };
            net.submit(
                i,
                Request::sign(&key, 1, postcard::to_allocvec(&op).unwrap()),
            );
        }
        net.run();
        net
    }

    fn index(&self, id: &NodeId) -> usize {
        self.nodes.iter().position(|n| n.id == *id).unwrap()
    }

    /// Carries out node `i`'s actions in order.
    fn drain(&mut self, i: usize) {
        let mut failed = false;
        while let Some(action) = self.nodes[i].role.poll() {
            let from = self.nodes[i].id;
            match action {
                Action::Persist(saved) => {
                    if self.nodes[i].fail_writes {
                        self.nodes[i].role.persist_failed();
                        failed = true;
                        continue;
                    }
                    let disk = &mut self.nodes[i].disk;
                    disk.0 = saved.record;
                    disk.1.truncate(saved.first_batch as usize - 1);
                    disk.1.extend(saved.batches);
                }
                Action::Agreement { to, bytes } => {
                    if failed {
                        self.leaked += 1;
                    }
                    let targets: Vec<usize> = match to {
                        Some(to) => vec![self.index(&to)],
                        None => (0..self.nodes.len()).filter(|&j| j != i).collect(),
                    };
                    for j in targets {
                        self.queue
                            .push_back((j, from, Msg::Agreement(bytes.clone())));
                    }
                }
                Action::Send { to, msg } => {
                    if matches!(msg, MsMessage::ConfigShare { .. }) && self.lose_shares > 0 {
                        self.lose_shares -= 1;
                        continue;
                    }
                    for id in to {
                        let j = self.index(&id);
                        self.queue.push_back((j, from, Msg::Ms(msg.clone())));
                    }
                }
                Action::Certified(cc) => self.nodes[i].certified = Some(cc),
                _ => {}
            }
        }
    }

    fn run(&mut self) {
        for _ in 0..100_000 {
            let Some((to, from, msg)) = self.queue.pop_front() else {
                return;
            };
            self.now += 1;
            let now = self.now;
            let role = &mut self.nodes[to].role;
            match msg {
                Msg::Agreement(bytes) => {
                    let _ = role.on_agreement(now, from, &bytes);
                }
                Msg::Ms(MsMessage::ConfigShare { epoch, hash, sig }) => {
                    role.on_config_share(from, epoch, hash, sig)
                }
                Msg::Ms(_) => {}
            }
            self.drain(to);
        }
        panic!("the messages never settled");
    }

    /// Runs the messages, then the timers, until every member certified (or a bound).
    fn settle(&mut self) {
        for _ in 0..200 {
            self.run();
            if self.nodes.iter().all(|n| n.certified.is_some()) {
                return;
            }
            self.now += 500;
            for i in 0..self.nodes.len() {
                let now = self.now;
                self.nodes[i].role.on_timer(now, now);
                self.drain(i);
            }
        }
    }

    fn submit(&mut self, i: usize, req: Request) {
        self.now += 1;
        self.nodes[i].role.submit(self.now, req).unwrap();
        self.drain(i);
    }
}

/// The end of the epoch as `key`'s `seq`-th request after its deal.
fn end_epoch(key: &Keypair, seq: u64) -> Request {
    let op = postcard::to_allocvec(&MsOp::EndEpoch { epoch: 0 }).unwrap();
    Request::sign(key, seq + 1, op)
}

#[test]
fn the_epoch_ends_and_every_member_assembles_the_certificate() {
    let (keys, genesis) = genesis();
    let mut net = Net::new(&keys, &genesis);
    let (a, b) = (net.nodes[0].key.clone(), net.nodes[1].key.clone());
    net.submit(0, end_epoch(&a, 1));
    net.run();
    assert!(
        net.nodes.iter().all(|n| n.certified.is_none()),
        "f votes do not end it"
    );
    net.submit(2, end_epoch(&b, 1));
    net.run();
    let first = net.nodes[0].certified.clone().expect("certified");
    first.verify_successor(&genesis).unwrap();
    for n in &net.nodes {
        assert_eq!(
            n.certified.as_ref().map(|c| c.config.hash()),
            Some(first.config.hash())
        );
        assert_eq!(n.role.app().executed(), net.nodes[0].role.app().executed());
        assert!(
            !n.disk.0.is_empty(),
            "every member persisted what it signed"
        );
    }
}

#[test]
fn a_member_restarted_from_its_disk_goes_on_in_the_same_agreement() {
    let (keys, genesis) = genesis();
    let mut net = Net::new(&keys, &genesis);
    let (a, b) = (net.nodes[0].key.clone(), net.nodes[1].key.clone());
    net.submit(0, end_epoch(&a, 1));
    net.run();
    // Node 3 restarts: its memory is gone, its disk is not.
    let executed = net.nodes[3].role.app().executed();
    assert!(executed >= 1);
    let n = &net.nodes[3];
    let (record, batches) = n.disk.clone();
    let resume = Resume::Saved {
        record: &record,
        batches: &batches,
    };
    let (role, why) = Role::new(setup(&n.key, &genesis), resume, net.now);
    assert!(why.is_none(), "{why:?}");
    // What it persisted last (with its last message): the agreement and the batches agree.
    let a = role.agreement().expect("it rejoins the agreement");
    assert_eq!(
        role.app().executed(),
        a.last_executed(),
        "the batches are replayed"
    );
    assert!(role.app().executed() <= executed);
    net.nodes[3].role = role;
    net.drain(3);
    net.submit(3, end_epoch(&b, 1));
    net.settle();
    for n in &net.nodes {
        assert!(
            n.certified.is_some(),
            "every member, the restarted one included"
        );
        assert_eq!(n.role.app().digest(), net.nodes[0].role.app().digest());
    }
    // An unreadable record: the member says why and sits the agreement out.
    let resume = Resume::Saved {
        record: b"garbage",
        batches: &[],
    };
    let (role, why) = Role::new(setup(&keys[0], &genesis), resume, 0);
    assert!(why.unwrap().contains("unreadable"));
    assert!(role.agreement().is_none());
}

#[test]
fn after_a_failed_write_nothing_leaves() {
    let (keys, genesis) = genesis();
    let mut net = Net::new(&keys, &genesis);
    net.nodes[1].fail_writes = true;
    let before = net.nodes[0].role.app().executed();
    let a = net.nodes[0].key.clone();
    net.submit(0, end_epoch(&a, 1));
    net.run();
    assert_eq!(net.leaked, 0, "a message left after the write that failed");
    assert!(
        net.nodes[1].role.agreement().is_none(),
        "it sits the agreement out"
    );
    for i in [0, 2, 3] {
        assert_eq!(
            net.nodes[i].role.app().executed(),
            before + 1,
            "2f+1 others go on"
        );
    }
}

#[test]
fn a_stranger_may_only_ask_to_join() {
    let (keys, genesis) = genesis();
    let net = Net::new(&keys, &genesis);
    let stranger = Keypair::from_seed([77; 32]);
    let role = &net.nodes[0].role;
    assert!(role.admits(&end_epoch(&stranger, 1)).is_err());
    let member = keys
        .iter()
        .find(|k| genesis.is_member(&k.node_id()))
        .unwrap();
    assert!(role.admits(&end_epoch(member, 1)).is_ok());
}

#[test]
fn lost_certificate_shares_are_sent_again() {
    let (keys, genesis) = genesis();
    let mut net = Net::new(&keys, &genesis);
    // Every member's first round of signatures over the next configuration is lost.
    net.lose_shares = 4;
    let (a, b) = (net.nodes[0].key.clone(), net.nodes[1].key.clone());
    net.submit(0, end_epoch(&a, 1));
    net.submit(1, end_epoch(&b, 1));
    net.run();
    assert!(net.nodes.iter().all(|n| n.certified.is_none()));
    net.settle();
    for n in &net.nodes {
        let cc = n
            .certified
            .as_ref()
            .expect("certified once the shares are sent again");
        cc.verify_successor(&genesis).unwrap();
    }
}
