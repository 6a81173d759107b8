//! Garbage collection of lost ranges, the peer path of a transfer whose old replicas deleted the
//! range, and on-demand fetch of one object, against real replicas (one of them lying).

use dbqsfs_core::config::{CertifiedConfig, ConfigChain, Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId, ObjectId};
use dbqsfs_core::dbqs::gc::{lost, Gc, GcOptions, GcOutput};
use dbqsfs_core::dbqs::msg::DbqsMessage;
use dbqsfs_core::dbqs::replica::{Handled, Replica, ReplicaOptions};
use dbqsfs_core::dbqs::transfer::{
    Arc as RingArc, Transfer, TransferMessage, TransferOptions, TransferOutput,
};
use dbqsfs_core::object::{content_id, PkBlock};
use dbqsfs_core::store::{MemStore, Store};
use dbqsfs_core::wire::{decode, encode_msg};
use std::collections::BTreeMap;
use std::sync::Arc;

type R = Replica<Arc<MemStore>>;

fn keys(n: u8) -> Vec<Keypair> {
    (0..n).map(|i| Keypair::from_seed([i + 120; 32])).collect()
}

fn config(epoch: u64, ks: &[&Keypair], prev: Option<[u8; 32]>) -> Configuration {
    let members = ks
        .iter()
        .map(|k| Member::new(k.public(), "127.0.0.1:1"))
        .collect();
    Configuration::new(epoch, Params::with_f(1), members, prev)
}

fn certify(prev: &Configuration, next: Configuration, ks: &[Keypair]) -> CertifiedConfig {
    let signers: Vec<&Keypair> = ks
        .iter()
        .filter(|k| prev.committee.contains(&k.node_id()))
        .collect();
    CertifiedConfig::certify(next, &signers[..3])
}

/// Six nodes; epoch 0 has the first five, epoch 1 the last five (node 0 leaves, node 5 joins).
struct World {
    ks: Vec<Keypair>,
    g: Configuration,
    next: Configuration,
    replicas: BTreeMap<NodeId, R>,
}

fn world() -> World {
    let ks = keys(6);
    let g = config(0, &ks[..5].iter().collect::<Vec<_>>(), None);
    let next = config(1, &ks[1..].iter().collect::<Vec<_>>(), Some(g.hash()));
    let c1 = certify(&g, next.clone(), &ks);
    let mut replicas = BTreeMap::new();
    for (i, k) in ks.iter().enumerate() {
        let chain = ConfigChain::new(CertifiedConfig::genesis(g.clone())).unwrap();
        let mut r = Replica::new(
            k.node_id(),
            Arc::new(MemStore::new()),
            chain,
            i < 5,
            ReplicaOptions::default(),
        );
        r.install(vec![c1.clone()]).unwrap();
        replicas.insert(k.node_id(), r);
    }
    World {
        ks,
        g,
        next,
        replicas,
    }
}

/// Some sample ids spread over the ring.
fn sample_ids() -> Vec<ObjectId> {
    (0..400u32).map(|i| content_id(&i.to_le_bytes())).collect()
}

#[test]
fn a_node_loses_what_it_was_responsible_for_and_no_longer_is() {
    let w = world();
    for k in &w.ks {
        let me = k.node_id();
        let lost = lost(&w.g, &w.next, &me);
        for x in sample_ids() {
            let should = w.g.is_responsible(&me, &x) && !w.next.is_responsible(&me, &x);
            let arcs: Vec<_> = lost.iter().filter(|l| l.arc.contains(&x)).collect();
            assert_eq!(arcs.len(), usize::from(should), "object {x:?}");
            if let Some(l) = arcs.first() {
                let mut group: Vec<NodeId> = w.next.group(&x).iter().map(|m| m.id).collect();
                group.sort();
                assert_eq!(l.holders, group, "holders are the new group");
            }
        }
    }
    // The node that leaves loses everything it held; the one that joins loses nothing.
    let leaver = w.ks[0].node_id();
    assert!(!lost(&w.g, &w.next, &leaver).is_empty());
    assert!(lost(&w.g, &w.next, &w.ks[5].node_id()).is_empty());
}

/// Runs `gc` against the replicas until it stops sending; `liar` answers every question "have".
fn run_gc(gc: &mut Gc, me: NodeId, w: &mut World, liar: Option<NodeId>, now: &mut u64) {
    for _ in 0..20 {
        let mut sent = Vec::new();
        while let Some(out) = gc.poll_output() {
            match out {
                GcOutput::Send { to, bytes } => sent.push((to, bytes)),
                GcOutput::Delete { epoch, arc } => {
                    w.replicas
                        .get_mut(&me)
                        .unwrap()
                        .delete_lost(epoch, arc)
                        .unwrap();
                }
                GcOutput::Complete { epoch } => assert_eq!(epoch, 1),
            }
        }
        for (to, bytes) in sent {
            let Some(mut reply) = w.replicas[&to].handle_transfer(me, &bytes) else {
                continue;
            };
            if Some(to) == liar {
                let env = decode::<TransferMessage>(&reply).unwrap();
                if let TransferMessage::Have { rid, .. } = env.msg {
                    reply = encode_msg(env.epoch, TransferMessage::Have { rid, have: true });
                }
            }
            gc.handle_message(*now, to, &reply);
        }
        *now += 20_000;
        gc.handle_timeout(*now);
    }
}

#[test]
fn a_lost_range_is_deleted_only_after_2f_plus_1_of_its_new_group_hold_it() {
    let mut w = world();
    let leaver = w.ks[0].node_id();
    let owner = Keypair::from_seed([9; 32]);
    // The leaver holds content and public-key blocks everywhere it was responsible.
    let mut held = Vec::new();
    for i in 0..60u32 {
        let data = format!("block {i}").into_bytes();
        let id = content_id(&data);
        let b = PkBlock::sign(&owner, &i.to_le_bytes(), 1, b"v".to_vec()).unwrap();
        let store = w.replicas[&leaver].store().clone();
        if w.g.is_responsible(&leaver, &id) {
            store.put_content(&id, &data).unwrap();
            held.push(id);
        }
        if w.g.is_responsible(&leaver, &b.id()) {
            store.put_pk_if_newer(&b).unwrap();
            held.push(b.id());
        }
    }
    let lost = lost(&w.g, &w.next, &leaver);
    let mut gc = Gc::new(&w.g, &w.next, &leaver, &[], GcOptions::default());
    gc.start(0);
    let mut now = 0;
    // Nobody of the new group finished its transfer; one of them lies that it did.
    let liar = w.ks[1].node_id();
    run_gc(&mut gc, leaver, &mut w, Some(liar), &mut now);
    assert_eq!(gc.progress().0, 0, "nothing deleted on one lie");
    // One correct member finishes: a lie and one truth are f+1, not 2f+1.
    w.replicas
        .get_mut(&w.ks[2].node_id())
        .unwrap()
        .transfer_complete(1);
    run_gc(&mut gc, leaver, &mut w, Some(liar), &mut now);
    assert_eq!(gc.progress().0, 0, "a lie and one truth are f+1, not 2f+1");
    assert!(
        held.iter().all(|id| w.replicas[&leaver]
            .store()
            .get_content(id)
            .unwrap()
            .is_some()
            || w.replicas[&leaver].store().get_pk(id).unwrap().is_some()),
        "nothing deleted on f+1 confirmations"
    );
    // Everyone finishes: everything lost is deleted.
    for k in &w.ks[3..] {
        w.replicas
            .get_mut(&k.node_id())
            .unwrap()
            .transfer_complete(1);
    }
    run_gc(&mut gc, leaver, &mut w, Some(liar), &mut now);
    assert!(gc.is_complete(), "{}", gc.describe());
    assert!(w.replicas[&leaver].store().is_empty());
    // From now on the leaver answers requests for what it deleted "gone", never an empty listing.
    let r = &w.replicas[&leaver];
    let list = TransferMessage::List {
        rid: 5,
        epoch: 1,
        arc: lost[0].arc,
        after: None,
    };
    let reply = r
        .handle_transfer(w.ks[5].node_id(), &encode_msg(1, list))
        .unwrap();
    assert_eq!(
        decode::<TransferMessage>(&reply).unwrap().msg,
        TransferMessage::Gone { rid: 5 }
    );
    let fetch = TransferMessage::Fetch {
        rid: 6,
        id: held[0],
    };
    let reply = r
        .handle_transfer(w.ks[5].node_id(), &encode_msg(1, fetch))
        .unwrap();
    assert_eq!(
        decode::<TransferMessage>(&reply).unwrap().msg,
        TransferMessage::Gone { rid: 6 }
    );
    // A late transfer into epoch 0 would not bring the objects back.
    assert!(!r.accepts_transferred(0, &held[0]));
    assert!(r.accepts_transferred(1, &held[0]));
    // A restarted collection skips what was collected.
    let again = Gc::new(
        &w.g,
        &w.next,
        &leaver,
        r.collected_in(1),
        GcOptions::default(),
    );
    assert_eq!(again.progress(), (0, 0));
}

#[test]
fn an_object_gained_back_since_is_not_deleted() {
    let mut w = world();
    let leaver = w.ks[0].node_id();
    // Epoch 2 takes the leaver back: it is responsible again for much of what it lost in 1.
    let e2 = config(2, &w.ks.iter().collect::<Vec<_>>(), Some(w.next.hash()));
    let c2 = certify(&w.next, e2.clone(), &w.ks);
    let r = w.replicas.get_mut(&leaver).unwrap();
    r.install(vec![c2]).unwrap();
    let mut back = 0;
    let mut ids = Vec::new();
    for i in 0..200u32 {
        let data = i.to_le_bytes().to_vec();
        let id = content_id(&data);
        if w.g.is_responsible(&leaver, &id) {
            r.store().put_content(&id, &data).unwrap();
            ids.push(id);
            back += usize::from(e2.is_responsible(&leaver, &id));
        }
    }
    assert!(back > 0 && back < ids.len(), "the test needs both kinds");
    let lost = lost(&w.g, &w.next, &leaver);
    // The deleting half alone deletes nothing before the arc is recorded as collected.
    assert!(r.delete_collected(1, lost[0].arc).unwrap().is_empty());
    for l in lost {
        r.delete_lost(1, l.arc).unwrap();
    }
    for id in ids {
        assert_eq!(
            r.store().get_content(&id).unwrap().is_some(),
            e2.is_responsible(&leaver, &id),
            "kept exactly what it is responsible for again"
        );
    }
}

/// What reaches the transfer of a request to a node, given the request and the node's reply.
type Deliver<'a> = dyn Fn(NodeId, &TransferMessage, Vec<u8>) -> Option<Vec<u8>> + 'a;

/// Drives transfer `t` of node `me` against the replicas; `deliver` filters (and may alter) each
/// request and reply. Returns the units and objects announced done.
fn run_transfer(
    t: &mut Transfer,
    me: NodeId,
    mine: &R,
    w: &World,
    deliver: &Deliver<'_>,
    now: &mut u64,
    rounds: usize,
) -> Vec<RingArc> {
    let mut done = Vec::new();
    for _ in 0..rounds {
        let mut sent = Vec::new();
        while let Some(out) = t.poll_output() {
            match out {
                TransferOutput::Send { to, bytes, .. } => sent.push((to, bytes)),
                TransferOutput::Check { ids, .. } => {
                    let held: Vec<ObjectId> = ids
                        .into_iter()
                        .filter(|id| mine.store().get_content(id).unwrap().is_some())
                        .collect();
                    t.held(&held);
                }
                TransferOutput::StoreContent { id, data } => {
                    mine.store().put_content(&id, &data).unwrap()
                }
                TransferOutput::StorePk { block } => {
                    mine.store().put_pk_if_newer(&block).unwrap();
                }
                TransferOutput::StoreRefs { refs } => mine.merge_transferred_refs(&refs).unwrap(),
                TransferOutput::UnitDone { arc, .. } => done.push(arc),
                TransferOutput::Complete { epoch } => assert_eq!(epoch, 1),
            }
        }
        if t.is_complete() {
            break;
        }
        for (to, bytes) in sent {
            let req = decode::<TransferMessage>(&bytes).unwrap().msg;
            let Some(reply) = w.replicas[&to].handle_transfer(me, &bytes) else {
                continue;
            };
            if let Some(reply) = deliver(to, &req, reply) {
                t.handle_message(*now, to, &reply);
            }
        }
        *now += 1000;
        t.handle_timeout(*now);
    }
    done
}

#[test]
fn when_old_replicas_deleted_the_range_the_new_groups_ready_peers_serve_it() {
    let mut w = world();
    let joiner = w.ks[5].node_id();
    let owner = Keypair::from_seed([8; 32]);
    // Every member of epoch 1 other than the joiner finished its transfer and holds v2 of every
    // block and every content block; then every old replica collected everything it could have
    // lost, so old replicas answer "gone" or nothing useful.
    let mut blocks = Vec::new();
    let mut contents = Vec::new();
    for i in 0..40u32 {
        let v2 = PkBlock::sign(&owner, &i.to_le_bytes(), 2, b"two".to_vec()).unwrap();
        let data = format!("content {i}").into_bytes();
        for k in &w.ks[1..5] {
            let s = w.replicas[&k.node_id()].store();
            s.force_pk(v2.clone());
            s.put_content(&content_id(&data), &data).unwrap();
        }
        blocks.push(v2);
        contents.push(data);
    }
    let whole = RingArc {
        start: [0; 32],
        end: [0; 32],
    };
    for k in &w.ks[1..5] {
        w.replicas
            .get_mut(&k.node_id())
            .unwrap()
            .transfer_complete(1);
    }
    w.replicas
        .get_mut(&w.ks[0].node_id())
        .unwrap()
        .delete_lost(1, whole)
        .unwrap();
    // One peer lies: it lists only stale v1 values and denies holding any content.
    let liar = w.ks[1].node_id();
    let stale: Vec<PkBlock> = (0..40u32)
        .map(|i| PkBlock::sign(&owner, &i.to_le_bytes(), 1, b"one".to_vec()).unwrap())
        .collect();
    let deliver = |to: NodeId, req: &TransferMessage, reply: Vec<u8>| -> Option<Vec<u8>> {
        let env = decode::<TransferMessage>(&reply).unwrap();
        let msg = match (req, env.msg) {
            // Old replicas: only "gone" gets through (kept members' old answers are lost, so the
            // old path cannot finish).
            (TransferMessage::List { .. } | TransferMessage::Fetch { .. }, m)
                if !matches!(m, TransferMessage::Gone { .. }) =>
            {
                return None
            }
            (_, TransferMessage::Listing { rid, next, .. }) if to == liar => {
                TransferMessage::Listing {
                    rid,
                    content: Vec::new(),
                    pk: stale.clone(),
                    next,
                    refs: Vec::new(),
                }
            }
            (_, TransferMessage::Content { rid, id, .. }) if to == liar => {
                TransferMessage::Content {
                    rid,
                    id,
                    data: None,
                }
            }
            (_, m) => m,
        };
        Some(encode_msg(env.epoch, msg))
    };
    let mine = Replica::new(
        joiner,
        Arc::new(MemStore::new()),
        ConfigChain::new(CertifiedConfig::genesis(w.g.clone())).unwrap(),
        false,
        ReplicaOptions::default(),
    );
    let mut t = Transfer::new(&w.g, &w.next, &joiner, false, TransferOptions::default());
    t.start(0);
    let mut now = 0;
    run_transfer(&mut t, joiner, &mine, &w, &deliver, &mut now, 300);
    assert!(t.is_complete(), "{}", t.describe());
    for b in &blocks {
        if w.next.is_responsible(&joiner, &b.id()) {
            assert_eq!(mine.store().get_pk(&b.id()).unwrap().as_ref(), Some(b));
        }
    }
    for data in &contents {
        let id = content_id(data);
        if w.next.is_responsible(&joiner, &id) {
            assert_eq!(
                mine.store().get_content(&id).unwrap().as_deref(),
                Some(&data[..])
            );
        }
    }
}

#[test]
fn a_read_of_an_object_not_transferred_yet_fetches_it_on_demand() {
    let w = world();
    let joiner = w.ks[5].node_id();
    let owner = Keypair::from_seed([6; 32]);
    // Blocks at v1 on one old replica and v2 on the others; a content block on two.
    let ids: Vec<NodeId> = w.ks[..5].iter().map(|k| k.node_id()).collect();
    let mut target = None;
    for i in 0..50u32 {
        let v1 = PkBlock::sign(&owner, &i.to_le_bytes(), 1, b"one".to_vec()).unwrap();
        let v2 = PkBlock::sign(&owner, &i.to_le_bytes(), 2, b"two".to_vec()).unwrap();
        for (j, n) in ids.iter().enumerate() {
            w.replicas[n]
                .store()
                .force_pk(if j == 0 { v1.clone() } else { v2.clone() });
        }
        if target.is_none() && w.next.is_responsible(&joiner, &v2.id()) {
            target = Some(v2);
        }
    }
    let target = target.expect("the joiner gains some block");
    let x = target.id();
    let data = b"a content block".to_vec();
    let c = content_id(&data);
    for n in &ids[1..3] {
        w.replicas[n].store().put_content(&c, &data).unwrap();
    }
    let mut mine = Replica::new(
        joiner,
        Arc::new(MemStore::new()),
        ConfigChain::new(CertifiedConfig::genesis(w.g.clone())).unwrap(),
        false,
        ReplicaOptions::default(),
    );
    mine.install(vec![certify(&w.g, w.next.clone(), &w.ks)])
        .unwrap();
    // A read of `x` now is answered "not ready", and names `x`.
    let get = encode_msg(1, DbqsMessage::GetPk { rid: 1, id: x });
    let (handled, miss) = mine.handle_noting_miss(w.ks[1].node_id(), &get);
    assert_eq!(miss, Some(x));
    let Handled::Reply(reply) = handled else {
        panic!("a reply")
    };
    assert!(matches!(
        decode::<DbqsMessage>(&reply).unwrap().msg,
        DbqsMessage::NotReady { rid: 1 }
    ));
    // The range is stuck (its listings never arrive); the one object comes on demand.
    let mut t = Transfer::new(&w.g, &w.next, &joiner, false, TransferOptions::default());
    t.start(0);
    assert!(t.fetch_now(0, x));
    let single = RingArc::single(&x);
    let only_single = |_: NodeId, req: &TransferMessage, reply: Vec<u8>| match req {
        TransferMessage::List { arc, .. } if *arc != single => None,
        _ => Some(reply),
    };
    let mut now = 0;
    let done = run_transfer(&mut t, joiner, &mine, &w, &only_single, &mut now, 20);
    assert_eq!(done, vec![single], "only the object is done");
    assert!(!t.is_complete());
    assert!(!t.fetch_now(now, x), "done already");
    mine.object_ready(1, &x);
    let (handled, miss) = mine.handle_noting_miss(w.ks[1].node_id(), &get);
    assert_eq!(miss, None);
    let Handled::Reply(reply) = handled else {
        panic!("a reply")
    };
    assert_eq!(
        decode::<DbqsMessage>(&reply).unwrap().msg,
        DbqsMessage::Pk {
            rid: 1,
            id: x,
            block: Some(target.clone())
        },
        "the highest of 2f+1 listings, not the stale one"
    );
    // A content block the joiner gains, absent here, is found on demand too.
    if w.next.is_responsible(&joiner, &c) {
        assert!(t.fetch_now(now, c));
        let single = RingArc::single(&c);
        let only = |_: NodeId, req: &TransferMessage, reply: Vec<u8>| match req {
            TransferMessage::List { arc, .. } if *arc != single => None,
            _ => Some(reply),
        };
        let done = run_transfer(&mut t, joiner, &mine, &w, &only, &mut now, 20);
        assert_eq!(done, vec![single]);
        assert_eq!(mine.store().get_content(&c).unwrap(), Some(data));
    }
    // An object the joiner is not responsible for is not fetched.
    let other = (0..100u32)
        .map(|i| content_id(&i.to_be_bytes()))
        .find(|id| !w.next.is_responsible(&joiner, id))
        .unwrap();
    assert!(!t.fetch_now(now, other));
}

#[test]
fn arc_helpers_agree_with_a_brute_force_over_sample_points() {
    // End points on multiples of 16, sample points on every byte value: every piece between end
    // points holds samples, so the brute force is exact.
    let p = |v: u8| [v; 32];
    let mut seed = 12345u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u8 & 0xf0
    };
    let samples: Vec<ObjectId> = (0..=255u8).map(|v| ObjectId(p(v))).collect();
    for _ in 0..2000 {
        let q = RingArc {
            start: p(next()),
            end: p(next()),
        };
        let arcs: Vec<RingArc> = (0..(next() >> 6))
            .map(|_| RingArc {
                start: p(next()),
                end: p(next()),
            })
            .collect();
        let brute_cover = samples
            .iter()
            .filter(|x| q.contains(x))
            .all(|x| arcs.iter().any(|a| a.contains(x)));
        assert_eq!(q.covered_by(&arcs), brute_cover, "{q:?} by {arcs:?}");
        for a in &arcs {
            let brute = samples.iter().any(|x| q.contains(x) && a.contains(x));
            assert_eq!(q.overlaps(a), brute, "{q:?} and {a:?}");
        }
    }
    // The arc of one object holds exactly it, also at the bottom of the ring.
    for x in [ObjectId([0; 32]), ObjectId([7; 32]), ObjectId(p(255))] {
        let s = RingArc::single(&x);
        assert!(s.contains(&x));
        assert!(samples.iter().filter(|y| s.contains(y)).count() == 1);
        assert_ne!(s.start, s.end);
    }
}

/// Answers every question of `gc` with `have` as `answer(epoch asked about, node asked)` says,
/// until it stops sending; returns the arcs it deleted.
fn answer_gc(gc: &mut Gc, answer: impl Fn(u64, NodeId) -> bool) -> Vec<(u64, RingArc)> {
    let mut deleted = Vec::new();
    let mut now = 0;
    for _ in 0..20 {
        let mut sent = Vec::new();
        while let Some(out) = gc.poll_output() {
            match out {
                GcOutput::Send { to, bytes } => sent.push((to, bytes)),
                GcOutput::Delete { epoch, arc } => deleted.push((epoch, arc)),
                GcOutput::Complete { .. } => {}
            }
        }
        for (to, bytes) in sent {
            let env = decode::<TransferMessage>(&bytes).unwrap();
            let TransferMessage::HaveQuery { rid, epoch, .. } = env.msg else {
                panic!("a collection asks only HaveQuery");
            };
            let have = answer(epoch, to);
            let reply = encode_msg(epoch, TransferMessage::Have { rid, have });
            gc.handle_message(now, to, &reply);
        }
        now += 20_000;
        gc.handle_timeout(now);
    }
    deleted
}

#[test]
fn a_lost_range_whose_group_never_confirms_is_deleted_once_2f_plus_1_of_a_later_group_hold_it() {
    let w = world();
    let leaver = w.ks[0].node_id();
    // Epoch 2: the same members as epoch 1, so each lost arc has one later group.
    let later = config(
        2,
        &w.ks[1..].iter().collect::<Vec<_>>(),
        Some(w.next.hash()),
    );
    let units = lost(&w.g, &w.next, &leaver).len();
    assert!(units > 0);
    let new = || Gc::new(&w.g, &w.next, &leaver, &[], GcOptions::default());

    // Nobody of epoch 1's groups ever confirms: nothing is deleted, however long it asks.
    let mut gc = new();
    gc.start(0);
    assert!(answer_gc(&mut gc, |e, _| e == 2).is_empty());
    // Told of epoch 2, whose groups all hold the range: every lost arc goes, as lost in epoch 1.
    gc.learn(&later);
    let deleted = answer_gc(&mut gc, |e, _| e == 2);
    assert_eq!(deleted.len(), units);
    assert!(deleted.iter().all(|(e, _)| *e == 1));
    assert!(gc.is_complete());

    // Only f of a later group (here: the first member of each) is not enough.
    let mut gc = new();
    gc.start(0);
    gc.learn(&later);
    let first: Vec<NodeId> = lost(&w.g, &w.next, &leaver)
        .iter()
        .map(|l| l.holders[0])
        .collect();
    let deleted = answer_gc(&mut gc, |e, n| e == 2 && first.contains(&n));
    assert!(deleted.is_empty(), "{deleted:?}");
    assert!(!gc.is_complete());
}
