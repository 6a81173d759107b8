//! Content reads route around a bad replica: the client asks the healthiest replica, asks another
//! after an adaptive hedge delay (not the retransmission delay), and asks a replica that stayed
//! silent or lied last for a while.

use dbqsfs_core::config::{CertifiedConfig, ConfigChain, Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId};
use dbqsfs_core::dbqs::client::{Client, ClientOptions, ClientOutput, Operation, Outcome};
use dbqsfs_core::dbqs::replica::{Handled, Replica, ReplicaOptions};
use dbqsfs_core::object::content_id;
use dbqsfs_core::store::{MemStore, Store};
use std::collections::BTreeMap;
use std::sync::Arc;

const RETRANSMIT_MS: u64 = 2_000;
/// How long a correct replica takes to answer here.
const LATENCY_MS: u64 = 5;

struct Cluster {
    ids: Vec<NodeId>,
    replicas: Vec<Replica<Arc<MemStore>>>,
    client: Client,
    now: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Silent,
    Corrupt,
}

impl Cluster {
    fn new(blocks: &[Vec<u8>]) -> Cluster {
        let keys: Vec<Keypair> = (0..4).map(|i| Keypair::from_seed([i + 40; 32])).collect();
        let members = keys
            .iter()
            .map(|k| Member::new(k.public(), "127.0.0.1:1"))
            .collect();
        let genesis =
            CertifiedConfig::genesis(Configuration::new(0, Params::with_f(1), members, None));
        let replicas = keys
            .iter()
            .map(|k| {
                let store = Arc::new(MemStore::new());
                for b in blocks {
                    store.put_content(&content_id(b), b).unwrap();
                }
                let chain = ConfigChain::new(genesis.clone()).unwrap();
                Replica::new(k.node_id(), store, chain, true, ReplicaOptions::default())
            })
            .collect();
        let opts = ClientOptions {
            retransmit_ms: RETRANSMIT_MS,
            hedge_min_ms: 20,
            ..ClientOptions::default()
        };
        let chain = ConfigChain::new(genesis).unwrap();
        let client = Client::new(Keypair::from_seed([1; 32]).node_id(), chain, opts);
        Cluster {
            ids: keys.iter().map(|k| k.node_id()).collect(),
            replicas,
            client,
            now: 0,
        }
    }

    fn id(&self, i: usize) -> NodeId {
        self.ids[i]
    }

    /// Reads `data` with replica `bad` faulty; returns how long the read took and whom it asked.
    fn read(&mut self, data: &[u8], bad: NodeId, fault: Fault) -> (u64, Vec<NodeId>) {
        let start = self.now;
        let me = self.client.id();
        self.client.submit(
            self.now,
            Operation::GetContent {
                id: content_id(data),
            },
        );
        let mut asked = Vec::new();
        loop {
            let mut replies = Vec::new();
            while let Some(out) = self.client.poll_output() {
                match out {
                    ClientOutput::Send { to, bytes } => {
                        asked.push(to);
                        if to == bad && fault == Fault::Silent {
                            continue;
                        }
                        let r = &self.replicas[self.ids.iter().position(|n| *n == to).unwrap()];
                        if let Handled::Reply(mut reply) = r.handle(me, &bytes) {
                            if to == bad && fault == Fault::Corrupt {
                                let last = reply.len() - 1;
                                reply[last] ^= 1;
                            }
                            replies.push((to, reply));
                        }
                    }
                    ClientOutput::Done { outcome, .. } => {
                        assert_eq!(
                            outcome,
                            Outcome::Content {
                                id: content_id(data),
                                data: Some(data.to_vec())
                            }
                        );
                        return (self.now - start, asked);
                    }
                    _ => {}
                }
            }
            if !replies.is_empty() {
                self.now += LATENCY_MS;
                for (from, reply) in replies {
                    self.client.handle_message(self.now, from, &reply);
                }
                continue;
            }
            let at = self
                .client
                .next_timeout()
                .expect("the read waits for something");
            assert!(at - start < 10 * RETRANSMIT_MS, "the read never finished");
            self.now = self.now.max(at);
            self.client.handle_timeout(self.now);
        }
    }
}

fn blocks() -> Vec<Vec<u8>> {
    (0..40u32).map(|i| i.to_le_bytes().repeat(64)).collect()
}

#[test]
fn a_silent_replica_costs_a_hedge_delay_once_then_is_asked_last() {
    let blocks = blocks();
    let mut c = Cluster::new(&blocks);
    let silent = c.id(0);
    // Warm up: healthy reads teach the client the group's latency.
    for b in &blocks[..10] {
        c.read(b, NodeId([0; 32]), Fault::Silent);
    }
    let mut slow_reads = 0;
    for b in &blocks[10..] {
        let (took, asked) = c.read(b, silent, Fault::Silent);
        assert!(
            took < RETRANSMIT_MS / 10,
            "a read took {took} ms: it waited for the retransmission, not a hedge"
        );
        if asked[0] == silent {
            slow_reads += 1;
        }
    }
    assert_eq!(
        slow_reads, 1,
        "only the first read that met the silent replica asked it first"
    );
}

#[test]
fn a_replica_that_serves_wrong_bytes_is_asked_last() {
    let blocks = blocks();
    let mut c = Cluster::new(&blocks);
    let liar = c.id(1);
    let mut first_to_liar = 0;
    for b in &blocks {
        let (took, asked) = c.read(b, liar, Fault::Corrupt);
        assert!(
            took <= 2 * LATENCY_MS,
            "a wrong copy makes the client ask the others at once"
        );
        if asked[0] == liar {
            first_to_liar += 1;
        }
    }
    assert_eq!(first_to_liar, 1);
}

#[test]
fn a_replica_whose_requests_fail_in_transport_is_passed_over_at_once() {
    let blocks = blocks();
    let mut c = Cluster::new(&blocks);
    let dead = c.id(2);
    // A read that asks the dead replica first: the driver reports the failure.
    let b = blocks
        .iter()
        .find(|b| {
            let mut probe = Cluster::new(&[]);
            probe
                .client
                .submit(0, Operation::GetContent { id: content_id(b) });
            matches!(probe.client.poll_output(), Some(ClientOutput::Send { to, .. }) if to == dead)
        })
        .expect("some read asks replica 2 first");
    c.client
        .submit(0, Operation::GetContent { id: content_id(b) });
    let first = c.client.poll_output();
    assert!(matches!(first, Some(ClientOutput::Send { to, .. }) if to == dead));
    c.client.peer_failed(1, dead);
    assert!(
        matches!(c.client.poll_output(), Some(ClientOutput::Send { to, .. }) if to != dead),
        "another replica is asked at once"
    );
    assert!(c.client.health().penalty(&dead, 1) > 0);
}

/// A public-key read whose first `2f+1` answers include a stale one waits briefly for the last
/// replica instead of writing back at once: when its answer shows `2f+1` holders of the newest
/// value, the read ends without a write-back round; when it never comes, the read writes back.
#[test]
fn a_read_that_meets_a_stale_answer_waits_for_the_last_replica_before_writing_back() {
    use dbqsfs_core::object::PkBlock;
    let owner = Keypair::from_seed([9; 32]);
    let v1 = PkBlock::sign(&owner, b"inode", 1, b"old".to_vec()).unwrap();
    let v2 = PkBlock::sign(&owner, b"inode", 2, b"new".to_vec()).unwrap();
    for last_answers in [true, false] {
        // Replica 0 is stale: it holds version 1 only.
        let mut c = Cluster::new(&[]);
        for (i, r) in c.replicas.iter().enumerate() {
            r.store()
                .put_pk_if_newer(if i == 0 { &v1 } else { &v2 })
                .unwrap();
        }
        let me = c.client.id();
        c.client.submit(0, Operation::GetPk { id: v2.id() });
        let mut requests = BTreeMap::new();
        while let Some(out) = c.client.poll_output() {
            if let ClientOutput::Send { to, bytes } = out {
                requests.insert(to, bytes);
            }
        }
        assert_eq!(
            requests.len(),
            4,
            "a public-key read asks the whole group at once"
        );
        let answer = |c: &Cluster, i: usize| match c.replicas[i].handle(me, &requests[&c.ids[i]]) {
            Handled::Reply(r) => r,
            other => panic!("{other:?}"),
        };
        // The stale replica and two correct ones answer first.
        for i in 0..3 {
            let reply = answer(&c, i);
            c.client.handle_message(1, c.ids[i], &reply);
        }
        assert!(
            c.client.poll_output().is_none(),
            "no write-back yet: it waits for the last"
        );
        let mut outs = Vec::new();
        if last_answers {
            let reply = answer(&c, 3);
            c.client.handle_message(2, c.ids[3], &reply);
        } else {
            let at = c.client.next_timeout().unwrap();
            assert!(
                at < RETRANSMIT_MS,
                "it waits a hedge delay, not a retransmission"
            );
            c.client.handle_timeout(at);
        }
        while let Some(out) = c.client.poll_output() {
            outs.push(out);
        }
        let wrote_back = outs.iter().any(|o| matches!(o, ClientOutput::Send { .. }));
        let done = outs.iter().any(|o| {
            matches!(o, ClientOutput::Done { outcome: Outcome::Pk { block: Some(b) }, .. } if *b == v2)
        });
        if last_answers {
            assert!(
                done && !wrote_back,
                "3 holders among 4 answers: done, no write-back"
            );
        } else {
            assert!(wrote_back && !done, "only 2 holders: it writes back");
        }
    }
}
