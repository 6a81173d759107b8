//! State transfer: what a node plans to fetch, and the transfer machine against real replicas,
//! one of which lies.

use dbqsfs_core::config::{CertifiedConfig, ConfigChain, Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId, ObjectId, Signature};
use dbqsfs_core::dbqs::refs::{holding, released, RefRecord};
use dbqsfs_core::dbqs::replica::{Replica, ReplicaOptions};
use dbqsfs_core::dbqs::transfer::{
    plan, Transfer, TransferMessage, TransferOptions, TransferOutput,
};
use dbqsfs_core::object::{content_id, PkBlock};
use dbqsfs_core::store::{MemStore, Store};
use dbqsfs_core::wire::{decode, encode_msg};
use std::collections::BTreeMap;
use std::sync::Arc;

fn keys(n: u8) -> Vec<Keypair> {
    (0..n).map(|i| Keypair::from_seed([i + 60; 32])).collect()
}

fn config(epoch: u64, ks: &[Keypair], prev: Option<[u8; 32]>) -> Configuration {
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

#[test]
fn a_joining_node_gains_everything_it_is_responsible_for_and_nothing_else() {
    let ks = keys(7);
    let prev = config(0, &ks[..6], None);
    let next = config(1, &ks, Some(prev.hash()));
    let me = ks[6].node_id();
    let units = plan(&prev, &next, &me, true);
    assert!(!units.is_empty());
    assert!(
        units.iter().all(|u| u.gained),
        "a new member gains all it is responsible for"
    );
    // Every object is covered by a unit exactly when the node is responsible for it.
    for i in 0..2000u32 {
        let x = content_id(&i.to_le_bytes());
        let covered = units.iter().filter(|u| u.arc.contains(&x)).count();
        assert_eq!(
            covered,
            usize::from(next.is_responsible(&me, &x)),
            "object {x:?}"
        );
        if let Some(u) = units.iter().find(|u| u.arc.contains(&x)) {
            let mut group: Vec<NodeId> = prev.group(&x).iter().map(|m| m.id).collect();
            group.sort();
            assert_eq!(u.sources, group, "sources are the old group of the object");
        }
    }
}

#[test]
fn a_continuing_member_gains_only_what_it_was_not_responsible_for() {
    let ks = keys(7);
    let prev = config(0, &ks[..6], None);
    let next = config(1, &ks, Some(prev.hash()));
    let me = ks[0].node_id();
    let units = plan(&prev, &next, &me, true);
    for i in 0..2000u32 {
        let x = content_id(&i.to_le_bytes());
        if let Some(u) = units.iter().find(|u| u.arc.contains(&x)) {
            assert_eq!(u.gained, !prev.is_responsible(&me, &x));
        }
    }
    // Not ready in the previous epoch: everything counts as gained.
    assert!(plan(&prev, &next, &me, false).iter().all(|u| u.gained));
    // Not a member of the next epoch: nothing to fetch.
    let without = config(1, &ks[1..], Some(prev.hash()));
    assert!(plan(&prev, &without, &me, true).is_empty());
}

type R = Replica<Arc<MemStore>>;

/// Replicas of genesis `g` with keys `ks`, moved on to epoch 1 (`c1`) and ready in genesis.
fn old_replicas(ks: &[Keypair], g: &Configuration, c1: &CertifiedConfig) -> BTreeMap<NodeId, R> {
    ks.iter()
        .map(|k| {
            let chain = ConfigChain::new(CertifiedConfig::genesis(g.clone())).unwrap();
            let mut r = Replica::new(
                k.node_id(),
                Arc::new(MemStore::new()),
                chain,
                true,
                ReplicaOptions::default(),
            );
            r.install(vec![c1.clone()]).unwrap();
            (k.node_id(), r)
        })
        .collect()
}

/// Four old replicas holding some blocks; a fifth node joins in epoch 1. Replica 0 lies in
/// transfer: it lists a forged newer value and a content id that does not exist, withholds the
/// owners' reference records and forges releases in their names.
#[test]
fn a_joining_node_gets_the_latest_values_despite_a_lying_old_replica() {
    let ks = keys(5);
    let g = config(0, &ks[..4], None);
    let next = config(1, &ks, Some(g.hash()));
    let c1 = certify(&g, next.clone(), &ks);
    let owner = Keypair::from_seed([7; 32]);
    // Two owners of every content block: `a` holds each; `b` released the odd ones (a release
    // that reached three of the four old replicas), and `a` also released every fourth block.
    let (a, b) = (Keypair::from_seed([8; 32]), Keypair::from_seed([9; 32]));
    let replicas = old_replicas(&ks[..4], &g, &c1);
    // Data: 40 public-key blocks (v1 everywhere, v2 on three replicas) and 40 content blocks on
    // three replicas each.
    let ids: Vec<NodeId> = replicas.keys().copied().collect();
    let mut latest = Vec::new();
    let mut contents = Vec::new();
    for i in 0..40u32 {
        let label = i.to_le_bytes();
        let v1 = PkBlock::sign(&owner, &label, 1, b"one".to_vec()).unwrap();
        let v2 = PkBlock::sign(&owner, &label, 2, b"two".to_vec()).unwrap();
        let data = format!("content {i}").into_bytes();
        for (j, id) in ids.iter().enumerate() {
            let store = replicas[id].store();
            store.force_pk(if j as u32 == i % 4 {
                v1.clone()
            } else {
                v2.clone()
            });
            let id = content_id(&data);
            if j as u32 != (i + 1) % 4 {
                store.put_content(&id, &data).unwrap();
            }
            let mut recs = vec![RefRecord::hold(&a, id, 1), RefRecord::hold(&b, id, 1)];
            if j as u32 != (i + 2) % 4 {
                if i % 2 == 1 {
                    recs.push(RefRecord::release(&b, id, 2));
                }
                if i % 4 == 3 {
                    recs.push(RefRecord::release(&a, id, 2));
                }
            }
            store.merge_refs(&id, &recs).unwrap();
        }
        latest.push(v2);
        contents.push(data);
    }
    let liar = ids[0];
    let me = ks[4].node_id();
    let mut t = Transfer::new(&g, &next, &me, true, TransferOptions::default());
    let mine = Arc::new(MemStore::new());
    t.start(0);
    let mut now = 0;
    for _round in 0..200 {
        let mut sent = Vec::new();
        while let Some(out) = t.poll_output() {
            match out {
                TransferOutput::Send { to, bytes, .. } => sent.push((to, bytes)),
                TransferOutput::Check { ids, .. } => {
                    let held: Vec<ObjectId> = ids
                        .into_iter()
                        .filter(|id| mine.get_content(id).unwrap().is_some())
                        .collect();
                    t.held(&held);
                }
                TransferOutput::StoreContent { id, data } => mine.put_content(&id, &data).unwrap(),
                TransferOutput::StorePk { block } => {
                    mine.put_pk_if_newer(&block).unwrap();
                }
                TransferOutput::StoreRefs { refs } => {
                    for (id, records) in refs {
                        assert!(records.iter().all(|r| r.verify().is_ok()));
                        mine.merge_refs(&id, &records).unwrap();
                    }
                }
                TransferOutput::UnitDone { epoch, .. } | TransferOutput::Complete { epoch } => {
                    assert_eq!(epoch, 1)
                }
            }
        }
        if t.is_complete() {
            break;
        }
        for (to, bytes) in sent {
            let Some(mut reply) = replicas[&to].handle_transfer(me, &bytes) else {
                continue;
            };
            if to == liar {
                reply = lie(&reply, &a);
            }
            t.handle_message(now, to, &reply);
        }
        now += 1000;
        t.handle_timeout(now);
    }
    assert!(t.is_complete(), "the transfer finishes: {}", t.describe());
    for (i, v2) in latest.iter().enumerate() {
        if next.is_responsible(&me, &v2.id()) {
            assert_eq!(
                mine.get_pk(&v2.id()).unwrap().as_ref(),
                Some(v2),
                "block {i} has its latest value"
            );
        }
    }
    for (i, data) in contents.iter().enumerate() {
        let id = content_id(data);
        if next.is_responsible(&me, &id) {
            assert_eq!(mine.get_content(&id).unwrap().as_deref(), Some(&data[..]));
            // The union of 2f+1 listings has every record a quorum holds, and nothing forged.
            let refs = mine.refs(&id).unwrap();
            let b_released = i % 2 == 1;
            let a_released = i % 4 == 3;
            assert_eq!(
                holding(&refs, &b.public()),
                !b_released,
                "block {i}, owner b"
            );
            assert_eq!(
                holding(&refs, &a.public()),
                !a_released,
                "block {i}, owner a"
            );
            assert_eq!(released(&refs), a_released && b_released, "block {i}");
        }
    }
}

/// What the lying replica answers instead: forged newer versions, an id nobody holds, no
/// reference records but forged releases of `owner`'s.
fn lie(reply: &[u8], owner: &Keypair) -> Vec<u8> {
    let env = decode::<TransferMessage>(reply).unwrap();
    let msg = match env.msg {
        TransferMessage::Listing {
            rid,
            mut content,
            mut pk,
            next,
            refs,
        } => {
            let refs = refs
                .iter()
                .map(|r| RefRecord {
                    seq: 50,
                    hold: false,
                    signature: Signature([2; 64]),
                    owner: owner.public(),
                    ..r.clone()
                })
                .collect();
            let forged: Vec<PkBlock> = pk
                .iter()
                .map(|b| PkBlock {
                    version: 99,
                    signature: Signature([1; 64]),
                    ..b.clone()
                })
                .collect();
            pk.extend(forged);
            content.push(ObjectId([0xee; 32]));
            TransferMessage::Listing {
                rid,
                content,
                pk,
                next,
                refs,
            }
        }
        TransferMessage::Content { rid, id, .. } => TransferMessage::Content {
            rid,
            id,
            data: Some(b"garbage".to_vec()),
        },
        other => other,
    };
    encode_msg(env.epoch, msg)
}

/// Listing pages walk an arc in its order from any cursor, wrapping arcs and the whole ring
/// included, and a cursor from outside the arc yields nothing outside it.
#[test]
fn listing_pages_walk_an_arc_in_order_from_any_cursor() {
    use dbqsfs_core::dbqs::transfer::{Arc as RingArc, PAGE};
    let ks = keys(5);
    let g = config(0, &ks[..4], None);
    let c1 = certify(&g, config(1, &ks, Some(g.hash())), &ks);
    let chain = ConfigChain::new(CertifiedConfig::genesis(g.clone())).unwrap();
    let store = Arc::new(MemStore::new());
    let mut r = Replica::new(
        ks[0].node_id(),
        store.clone(),
        chain,
        true,
        ReplicaOptions::default(),
    );
    r.install(vec![c1]).unwrap();
    let owner = Keypair::from_seed([9; 32]);
    let mut all = Vec::new();
    for i in 0..700u32 {
        let data = format!("listed {i}").into_bytes();
        store.put_content(&content_id(&data), &data).unwrap();
        all.push(content_id(&data));
    }
    for i in 0..100u32 {
        let b = PkBlock::sign(&owner, &i.to_le_bytes(), 1, vec![1; 10]).unwrap();
        all.push(b.id());
        store.force_pk(b);
    }
    let me = ks[4].node_id();
    let list = |arc: RingArc, after: Option<ObjectId>| -> (Vec<ObjectId>, Option<ObjectId>) {
        let ask = encode_msg(
            1,
            TransferMessage::List {
                rid: 1,
                epoch: 1,
                arc,
                after,
            },
        );
        let reply = r.handle_transfer(me, &ask).expect("a listing");
        match decode::<TransferMessage>(&reply).unwrap().msg {
            TransferMessage::Listing {
                content, pk, next, ..
            } => {
                let mut ids = content;
                ids.extend(pk.iter().map(PkBlock::id));
                ids.sort_by_key(|id| arc.order_key(id));
                (ids, next)
            }
            other => panic!("not a listing: {other:?}"),
        }
    };
    let point = |b: u8| {
        let mut p = [0u8; 32];
        p[0] = b;
        p
    };
    let arcs = [
        RingArc {
            start: point(0x10),
            end: point(0xa0),
        },
        RingArc {
            start: point(0xc0),
            end: point(0x30),
        },
        RingArc {
            start: point(0x55),
            end: point(0x55),
        },
        RingArc {
            start: [0xff; 32],
            end: point(0x40),
        },
        RingArc::single(&all[3]),
    ];
    for arc in arcs {
        let mut want: Vec<ObjectId> = all.iter().filter(|id| arc.contains(id)).copied().collect();
        want.sort_by_key(|id| arc.order_key(id));
        let (mut got, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let (ids, next) = list(arc, after);
            assert!(ids.len() <= PAGE);
            got.extend(ids);
            pages += 1;
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(got, want, "arc {arc:?} in {pages} pages");
        // From every cursor, the rest of the arc.
        for (k, a) in want.iter().enumerate().step_by(97) {
            let (ids, _) = list(arc, Some(*a));
            assert_eq!(ids[..], want[k + 1..(k + 1 + PAGE).min(want.len())]);
        }
    }
    // A cursor outside the arc, before or after it: only the arc's ids, and no panic.
    let arc = arcs[0];
    for bogus in [point(0x05), point(0xf0), [0xff; 32], [0; 32]] {
        let (ids, _) = list(arc, Some(ObjectId(bogus)));
        assert!(ids.iter().all(|id| arc.contains(id)), "{bogus:?}");
    }

    // Garbage collection of the whole ring (from 0x55.., so wrapping), 7 objects a step: exactly
    // the objects the replica is not responsible for in epoch 1 go.
    let arc = arcs[2];
    r.note_collected(1, arc);
    let (mut after, mut steps, mut deleted) = (None, 0, 0);
    loop {
        let (page, next) = r.delete_collected_page(1, arc, after, 7).unwrap();
        steps += 1;
        deleted += page.len();
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let config = r.chain().config().clone();
    let held: std::collections::BTreeSet<ObjectId> = store.list().unwrap().into_iter().collect();
    for id in &all {
        let gone = arc.contains(id) && !config.is_responsible(&ks[0].node_id(), id);
        assert_eq!(held.contains(id), !gone, "{id:?} after {steps} steps");
    }
    assert!(
        steps > 5 && deleted > 0,
        "{deleted} deleted in {steps} steps"
    );
}

/// Four old replicas holding 60 content blocks each; a fifth node joins. One old replica lists,
/// then dies: every fetch sent to it fails in transport and the driver says so
/// ([`Transfer::peer_failed`]). The transfer completes without a single retransmission round, and
/// the fetches were spread over the live listers, not all sent to one.
#[test]
fn fetches_waiting_on_a_source_that_fails_are_asked_elsewhere_at_once() {
    let ks = keys(5);
    let g = config(0, &ks[..4], None);
    let next = config(1, &ks, Some(g.hash()));
    let c1 = certify(&g, next.clone(), &ks);
    let replicas = old_replicas(&ks[..4], &g, &c1);
    let contents: Vec<Vec<u8>> = (0..60u32)
        .map(|i| format!("block {i}").into_bytes())
        .collect();
    for r in replicas.values() {
        for data in &contents {
            r.store().put_content(&content_id(data), data).unwrap();
        }
    }
    let me = ks[4].node_id();
    let dead = *replicas.keys().next().unwrap();
    let mut t = Transfer::new(&g, &next, &me, true, TransferOptions::default());
    let mine = Arc::new(MemStore::new());
    t.start(0);
    let mut fetched_from: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut listed = false;
    for _round in 0..50 {
        let mut sent = Vec::new();
        while let Some(out) = t.poll_output() {
            match out {
                TransferOutput::Send { to, bytes, .. } => sent.push((to, bytes)),
                TransferOutput::Check { ids, .. } => {
                    listed = true;
                    t.held(&[]);
                    let _ = ids;
                }
                TransferOutput::StoreContent { id, data } => mine.put_content(&id, &data).unwrap(),
                _ => {}
            }
        }
        if t.is_complete() || sent.is_empty() {
            break;
        }
        for (to, bytes) in sent {
            let fetch = matches!(
                decode::<TransferMessage>(&bytes).map(|e| e.msg),
                Ok(TransferMessage::Fetch { .. })
            );
            if fetch {
                *fetched_from.entry(to).or_default() += 1;
                if to == dead {
                    t.peer_failed(1, dead);
                    continue;
                }
            }
            if let Some(reply) = replicas[&to].handle_transfer(me, &bytes) {
                t.handle_message(1, to, &reply);
            }
        }
        // No handle_timeout: only answers and failures move the transfer.
    }
    assert!(listed, "the dead replica listed before it died");
    assert!(
        t.is_complete(),
        "complete without retransmissions: {}",
        t.describe()
    );
    let wanted = contents
        .iter()
        .filter(|d| next.is_responsible(&me, &content_id(d)))
        .count();
    assert!(wanted > 0);
    for data in &contents {
        let id = content_id(data);
        if next.is_responsible(&me, &id) {
            assert_eq!(mine.get_content(&id).unwrap().as_deref(), Some(&data[..]));
        }
    }
    let live_sources = fetched_from
        .iter()
        .filter(|(n, c)| **n != dead && **c > 0)
        .count();
    assert!(
        live_sources >= 2,
        "fetches spread over the live listers: {fetched_from:?}"
    );
}

#[test]
fn an_on_demand_fetch_is_urgent_and_resent_on_its_own_timer() {
    let ks = keys(5);
    let g = config(0, &ks[..4], None);
    let next = config(1, &ks, Some(g.hash()));
    let me = ks[4].node_id();
    let mut t = Transfer::new(&g, &next, &me, true, TransferOptions::default());
    t.start(0);
    let drain = |t: &mut Transfer| {
        let mut sends = Vec::new();
        while let Some(out) = t.poll_output() {
            if let TransferOutput::Send { urgent, .. } = out {
                sends.push(urgent);
            }
        }
        sends
    };
    let first = drain(&mut t);
    assert!(
        !first.is_empty() && first.iter().all(|u| !u),
        "the plan's listings are not urgent"
    );
    assert_eq!(t.next_on_demand_timeout(), None, "no on-demand unit yet");
    // An object this node gains, wanted by a read before its range arrived.
    let x = (0u32..)
        .map(|i| content_id(format!("wanted {i}").as_bytes()))
        .find(|id| next.is_responsible(&me, id) && !g.is_responsible(&me, id))
        .unwrap();
    assert!(t.fetch_now(10, x));
    let asked = drain(&mut t);
    assert!(
        !asked.is_empty() && asked.iter().all(|u| *u),
        "on-demand requests are urgent"
    );
    // Nobody answers. Its own timer resends only the on-demand unit's requests, with no backoff,
    // while the ordinary retransmission (held back by a driver with a queue) is not run.
    let at = t
        .next_on_demand_timeout()
        .expect("an on-demand unit is open");
    let before = t.next_timeout();
    t.handle_on_demand_timeout(at);
    let again = drain(&mut t);
    assert_eq!(again.len(), asked.len());
    assert!(again.iter().all(|u| *u));
    assert_eq!(t.next_timeout(), before, "the ordinary timer is untouched");
    let next_at = t.next_on_demand_timeout().unwrap();
    assert_eq!(next_at - at, TransferOptions::default().retransmit_ms);
    t.handle_on_demand_timeout(next_at - 1);
    assert!(drain(&mut t).is_empty(), "not before its time");
}
