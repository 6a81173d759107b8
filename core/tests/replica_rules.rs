//! The replica's rules, one test each: what it stores, what it refuses, and how it treats epochs.

use dbqsfs_core::config::{CertifiedConfig, ConfigChain, Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId};
use dbqsfs_core::dbqs::msg::{DbqsMessage, Reject};
use dbqsfs_core::dbqs::refs::{released, RefRecord};
use dbqsfs_core::dbqs::replica::{Dropped, Handled, Replica, ReplicaOptions, DEFAULT_GRACE_MS};
use dbqsfs_core::object::{content_id, PkBlock};
use dbqsfs_core::store::{MemStore, Store};
use dbqsfs_core::wire::{decode, encode_msg, Envelope};
use std::sync::Arc;

struct Fixture {
    keys: Vec<Keypair>,
    configs: Vec<CertifiedConfig>,
}

/// Epoch 0 has members 0..4; epoch 1 has members 0..6 (certified by epoch 0's committee).
fn fixture() -> Fixture {
    let keys: Vec<Keypair> = (0..6).map(|i| Keypair::from_seed([i + 10; 32])).collect();
    let params = Params::with_f(1);
    let config = |epoch, ks: &[Keypair], prev| {
        let members = ks
            .iter()
            .map(|k| Member::new(k.public(), "127.0.0.1:1"))
            .collect();
        Configuration::new(epoch, params.clone(), members, prev)
    };
    let g = config(0, &keys[..4], None);
    let signers: Vec<&Keypair> = keys
        .iter()
        .filter(|k| g.committee.contains(&k.node_id()))
        .collect();
    let next = CertifiedConfig::certify(config(1, &keys, Some(g.hash())), &signers[..3]);
    Fixture {
        keys,
        configs: vec![CertifiedConfig::genesis(g), next],
    }
}

fn replica(fx: &Fixture, i: usize) -> Replica<Arc<MemStore>> {
    let chain = ConfigChain::new(fx.configs[0].clone()).unwrap();
    Replica::new(
        fx.keys[i].node_id(),
        Arc::new(MemStore::new()),
        chain,
        true,
        ReplicaOptions::default(),
    )
}

fn ask(r: &Replica<Arc<MemStore>>, epoch: u64, msg: DbqsMessage) -> Envelope<DbqsMessage> {
    match r.handle(NodeId([1; 32]), &encode_msg(epoch, msg)) {
        Handled::Reply(bytes) => decode(&bytes).unwrap(),
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn stores_a_valid_block_and_acknowledges_an_older_one_without_storing_it() {
    let fx = fixture();
    let r = replica(&fx, 0);
    let owner = Keypair::from_seed([77; 32]);
    let v2 = PkBlock::sign(&owner, b"k", 2, b"two".to_vec()).unwrap();
    let v1 = PkBlock::sign(&owner, b"k", 1, b"one".to_vec()).unwrap();
    let reply = ask(
        &r,
        0,
        DbqsMessage::PutPk {
            rid: 1,
            block: v2.clone(),
        },
    );
    assert_eq!(
        reply.msg,
        DbqsMessage::PkStored {
            rid: 1,
            id: v2.id(),
            stamp: v2.stamp()
        }
    );
    let reply = ask(
        &r,
        0,
        DbqsMessage::PutPk {
            rid: 2,
            block: v1.clone(),
        },
    );
    assert_eq!(
        reply.msg,
        DbqsMessage::PkStored {
            rid: 2,
            id: v1.id(),
            stamp: v2.stamp()
        },
        "acknowledged with the held stamp"
    );
    assert_eq!(r.store().get_pk(&v1.id()).unwrap(), Some(v2));
}

#[test]
fn refuses_bad_signatures_and_wrong_hashes() {
    let fx = fixture();
    let r = replica(&fx, 0);
    let owner = Keypair::from_seed([77; 32]);
    let mut forged = PkBlock::sign(&owner, b"k", 1, b"one".to_vec()).unwrap();
    forged.version = 9;
    let reply = ask(
        &r,
        0,
        DbqsMessage::PutPk {
            rid: 1,
            block: forged.clone(),
        },
    );
    assert_eq!(
        reply.msg,
        DbqsMessage::Rejected {
            rid: 1,
            reason: Reject::BadSignature
        }
    );
    assert_eq!(r.store().get_pk(&forged.id()).unwrap(), None);
    let reply = ask(
        &r,
        0,
        DbqsMessage::PutContent {
            rid: 2,
            id: content_id(b"a"),
            data: b"b".to_vec(),
            hold: RefRecord::hold(&fx.keys[0], content_id(b"a"), 1),
        },
    );
    assert_eq!(
        reply.msg,
        DbqsMessage::Rejected {
            rid: 2,
            reason: Reject::HashMismatch
        }
    );
}

#[test]
fn older_epoch_is_told_stale_and_newer_epoch_is_told_behind() {
    let fx = fixture();
    let mut r = replica(&fx, 0);
    let id = content_id(b"x");
    let reply = ask(&r, 1, DbqsMessage::GetContent { rid: 3, id });
    assert_eq!(
        (reply.epoch, reply.msg),
        (0, DbqsMessage::Behind { rid: 3 })
    );
    // The client pushes the newer configuration; the replica verifies and installs it.
    match r.handle(
        NodeId([1; 32]),
        &encode_msg(
            1,
            DbqsMessage::PushConfigs {
                configs: vec![fx.configs[1].clone()],
            },
        ),
    ) {
        Handled::Install(c) => assert_eq!(r.install(c).unwrap(), vec![1]),
        other => panic!("expected install, got {other:?}"),
    }
    let reply = ask(&r, 0, DbqsMessage::GetContent { rid: 4, id });
    assert_eq!((reply.epoch, reply.msg), (1, DbqsMessage::Stale { rid: 4 }));
    let reply = ask(&r, 0, DbqsMessage::GetConfigs { rid: 5, after: 0 });
    assert_eq!(
        reply.msg,
        DbqsMessage::Configs {
            rid: 5,
            configs: vec![fx.configs[1].clone()]
        }
    );
}

#[test]
fn a_forged_configuration_is_not_installed() {
    let fx = fixture();
    let mut r = replica(&fx, 0);
    let mut forged = fx.configs[1].clone();
    forged.cert.signatures.truncate(2);
    assert!(r.install(vec![forged]).is_err());
    assert_eq!(r.epoch(), 0);
}

#[test]
fn gained_objects_are_not_read_until_transfer_completes_but_writes_are_accepted() {
    let fx = fixture();
    // Node 4 joins in epoch 1: everything it is responsible for is gained.
    let chain = ConfigChain::new(fx.configs[0].clone()).unwrap();
    let mut r = Replica::new(
        fx.keys[4].node_id(),
        Arc::new(MemStore::new()),
        chain,
        true,
        ReplicaOptions::default(),
    );
    r.install(vec![fx.configs[1].clone()]).unwrap();
    assert!(!r.is_ready());
    let owner = Keypair::from_seed([5; 32]);
    let block = (0..200u32)
        .map(|i| PkBlock::sign(&owner, &i.to_le_bytes(), 1, vec![1]).unwrap())
        .find(|b| {
            fx.configs[1]
                .config
                .is_responsible(&fx.keys[4].node_id(), &b.id())
        })
        .expect("some label lands in node 4's range");
    let reply = ask(
        &r,
        1,
        DbqsMessage::GetPk {
            rid: 1,
            id: block.id(),
        },
    );
    assert_eq!(reply.msg, DbqsMessage::NotReady { rid: 1 });
    let reply = ask(
        &r,
        1,
        DbqsMessage::PutPk {
            rid: 2,
            block: block.clone(),
        },
    );
    assert!(
        matches!(reply.msg, DbqsMessage::PkStored { .. }),
        "writes are accepted at once"
    );
    r.transfer_complete(1);
    let reply = ask(
        &r,
        1,
        DbqsMessage::GetPk {
            rid: 3,
            id: block.id(),
        },
    );
    assert_eq!(
        reply.msg,
        DbqsMessage::Pk {
            rid: 3,
            id: block.id(),
            block: Some(block)
        }
    );
}

#[test]
fn objects_outside_the_group_are_refused() {
    let fx = fixture();
    let mut r = replica(&fx, 0);
    r.install(vec![fx.configs[1].clone()]).unwrap();
    let me = fx.keys[0].node_id();
    // With 6 members and groups of 4, some objects are not node 0's.
    let data = (0..500u32)
        .map(|i| i.to_le_bytes().to_vec())
        .find(|d| !fx.configs[1].config.is_responsible(&me, &content_id(d)))
        .expect("some object lands outside node 0's range");
    let reply = ask(
        &r,
        1,
        DbqsMessage::PutContent {
            rid: 1,
            id: content_id(&data),
            hold: RefRecord::hold(&fx.keys[0], content_id(&data), 1),
            data,
        },
    );
    assert_eq!(
        reply.msg,
        DbqsMessage::Rejected {
            rid: 1,
            reason: Reject::NotResponsible
        }
    );
}

#[test]
fn garbage_and_replies_are_dropped_without_an_answer() {
    let fx = fixture();
    let r = replica(&fx, 0);
    assert!(matches!(
        r.handle(NodeId([1; 32]), b"\x01\x01garbage"),
        Handled::Dropped(Dropped::Undecodable(_))
    ));
    assert!(matches!(
        r.handle(NodeId([1; 32]), &[]),
        Handled::Dropped(Dropped::Undecodable(_))
    ));
    let reply = encode_msg(0, DbqsMessage::Stale { rid: 1 });
    assert!(matches!(
        r.handle(NodeId([1; 32]), &reply),
        Handled::Dropped(Dropped::NotARequest)
    ));
}

#[test]
fn a_transferred_arc_is_readable_before_the_whole_epoch_is() {
    let fx = fixture();
    let chain = ConfigChain::new(fx.configs[0].clone()).unwrap();
    let mut r = Replica::new(
        fx.keys[4].node_id(),
        Arc::new(MemStore::new()),
        chain,
        true,
        ReplicaOptions::default(),
    );
    r.install(vec![fx.configs[1].clone()]).unwrap();
    let owner = Keypair::from_seed([5; 32]);
    let mine: Vec<PkBlock> = (0..400u32)
        .map(|i| PkBlock::sign(&owner, &i.to_le_bytes(), 1, vec![1]).unwrap())
        .filter(|b| {
            fx.configs[1]
                .config
                .is_responsible(&fx.keys[4].node_id(), &b.id())
        })
        .take(2)
        .collect();
    let (a, b) = (&mine[0], &mine[1]);
    // An arc that holds `a` but not `b`.
    let mut start = a.id().0;
    start[31] = start[31].wrapping_sub(1);
    let arc = dbqsfs_core::dbqs::transfer::Arc {
        start,
        end: a.id().0,
    };
    assert!(arc.contains(&a.id()) && !arc.contains(&b.id()));
    r.arc_ready(1, arc);
    assert!(matches!(
        ask(&r, 1, DbqsMessage::GetPk { rid: 1, id: a.id() }).msg,
        DbqsMessage::Pk { .. }
    ));
    assert_eq!(
        ask(&r, 1, DbqsMessage::GetPk { rid: 2, id: b.id() }).msg,
        DbqsMessage::NotReady { rid: 2 }
    );
}

#[test]
fn a_range_held_is_listed_for_the_next_epoch_though_another_range_is_still_transferring() {
    use dbqsfs_core::dbqs::transfer::{Arc as RingArc, TransferMessage};
    let fx = fixture();
    // Epoch 2: the same members as epoch 1, certified by epoch 1's committee.
    let prev = &fx.configs[1].config;
    let next = Configuration::new(
        2,
        prev.params.clone(),
        prev.members.clone(),
        Some(prev.hash()),
    );
    let signers: Vec<&Keypair> = fx
        .keys
        .iter()
        .filter(|k| prev.committee.contains(&k.node_id()))
        .collect();
    let epoch2 = CertifiedConfig::certify(next, &signers[..3]);
    // Node 4 joined in epoch 1 and completed its transfer of one arc only.
    let me = fx.keys[4].node_id();
    let chain = ConfigChain::new(fx.configs[0].clone()).unwrap();
    let mut r = Replica::new(
        me,
        Arc::new(MemStore::new()),
        chain,
        true,
        ReplicaOptions::default(),
    );
    r.install(vec![fx.configs[1].clone()]).unwrap();
    let mut ids = fx.configs[1]
        .config
        .members
        .iter()
        .map(|m| m.id.0)
        .collect::<Vec<_>>();
    ids.sort();
    // Node 4's own arc (from its predecessor to itself) is in its range in both epochs; an arc
    // just before its predecessor's id is another one.
    let at = ids.iter().position(|id| *id == me.0).unwrap();
    let held = RingArc {
        start: ids[(at + ids.len() - 1) % ids.len()],
        end: me.0,
    };
    let other = RingArc {
        start: ids[(at + ids.len() - 2) % ids.len()],
        end: ids[(at + ids.len() - 1) % ids.len()],
    };
    assert!(prev.is_responsible(&me, &dbqsfs_core::crypto::ObjectId(held.end)));
    r.arc_ready(1, held);
    let list = |r: &Replica<Arc<MemStore>>, rid, arc| {
        let asked = TransferMessage::List {
            rid,
            epoch: 2,
            arc,
            after: None,
        };
        let reply = r
            .handle_transfer(NodeId([1; 32]), &encode_msg(2, asked))
            .unwrap();
        decode::<TransferMessage>(&reply).unwrap().msg
    };
    // Still in epoch 1: writes may complete here, so nothing is listed yet.
    assert_eq!(list(&r, 1, held), TransferMessage::NotYet { rid: 1 });
    r.install(vec![epoch2]).unwrap();
    assert!(
        matches!(list(&r, 2, held), TransferMessage::Listing { rid: 2, .. }),
        "the arc it holds is listed though its transfer into epoch 1 is incomplete"
    );
    assert_eq!(
        list(&r, 3, other),
        TransferMessage::NotYet { rid: 3 },
        "an arc it never completed is not"
    );
}

#[test]
fn a_block_deferred_for_lack_of_space_is_never_denied_and_its_range_never_claimed() {
    use dbqsfs_core::dbqs::transfer::{Arc as RingArc, TransferMessage};
    let fx = fixture();
    let mut r = replica(&fx, 0);
    r.install(vec![fx.configs[1].clone()]).unwrap();
    r.transfer_complete(1);
    let me = fx.keys[0].node_id();
    // Two blocks node 0 is responsible for in epoch 1: one deferred, one stored.
    let mut mine = (0..200u32)
        .map(|i| format!("block {i}").into_bytes())
        .filter(|d| fx.configs[1].config.is_responsible(&me, &content_id(d)));
    let (data, stored) = (mine.next().unwrap(), mine.next().unwrap());
    let (x, y) = (content_id(&data), content_id(&stored));
    r.store().put_content(&y, &stored).unwrap();
    r.defer(x);
    // A deferred block the replica is no longer responsible for is for its driver to forget.
    let elsewhere = (0..200u32)
        .map(|i| content_id(format!("other {i}").as_bytes()))
        .find(|z| !fx.configs[1].config.is_responsible(&me, z))
        .unwrap();
    r.defer(elsewhere);
    assert_eq!(r.deferred_elsewhere(), vec![elsewhere]);
    r.undefer(&elsewhere);
    let transfer = |r: &Replica<Arc<MemStore>>, msg| {
        let reply = r
            .handle_transfer(NodeId([1; 32]), &encode_msg(1, msg))
            .unwrap();
        decode::<TransferMessage>(&reply).unwrap().msg
    };
    let have = |r: &Replica<Arc<MemStore>>, rid| {
        let arc = RingArc::single(&x);
        transfer(r, TransferMessage::HaveQuery { rid, epoch: 1, arc })
    };
    // A read of it is "not ready", never "not held" (which would vote that it does not exist).
    assert_eq!(
        ask(&r, 1, DbqsMessage::GetContent { rid: 1, id: x }).msg,
        DbqsMessage::NotReady { rid: 1 }
    );
    assert_eq!(
        transfer(&r, TransferMessage::Fetch { rid: 2, id: x }),
        TransferMessage::NotYet { rid: 2 }
    );
    // Garbage collection elsewhere must not take its range as held here.
    assert_eq!(
        have(&r, 3),
        TransferMessage::Have {
            rid: 3,
            have: false
        }
    );
    // What it holds is still served.
    assert!(matches!(
        ask(&r, 1, DbqsMessage::GetContent { rid: 4, id: y }).msg,
        DbqsMessage::Content { data: Some(_), .. }
    ));
    // Once stored, the deferral is forgotten and the block is served like any other.
    r.store().put_content(&x, &data).unwrap();
    r.undefer(&x);
    assert!(matches!(
        ask(&r, 1, DbqsMessage::GetContent { rid: 5, id: x }).msg,
        DbqsMessage::Content { data: Some(_), .. }
    ));
    assert_eq!(have(&r, 6), TransferMessage::Have { rid: 6, have: true });
}

#[test]
fn a_full_store_refuses_new_content_with_no_space_and_still_takes_public_key_blocks() {
    let fx = fixture();
    let chain = ConfigChain::new(fx.configs[0].clone()).unwrap();
    let r = Replica::new(
        fx.keys[0].node_id(),
        Arc::new(MemStore::with_content_limit(0)),
        chain,
        true,
        ReplicaOptions::default(),
    );
    let data = b"no room".to_vec();
    let put = DbqsMessage::PutContent {
        rid: 1,
        id: content_id(&data),
        hold: RefRecord::hold(&fx.keys[0], content_id(&data), 1),
        data,
    };
    assert_eq!(
        ask(&r, 0, put).msg,
        DbqsMessage::Rejected {
            rid: 1,
            reason: Reject::NoSpace
        }
    );
    let owner = Keypair::from_seed([9; 32]);
    let block = PkBlock::sign(&owner, b"name", 1, vec![1]).unwrap();
    assert!(matches!(
        ask(&r, 0, DbqsMessage::PutPk { rid: 2, block }).msg,
        DbqsMessage::PkStored { .. }
    ));
}

fn put_held(data: &[u8], hold: RefRecord) -> DbqsMessage {
    DbqsMessage::PutContent {
        rid: 7,
        id: content_id(data),
        data: data.to_vec(),
        hold,
    }
}

fn reference(record: RefRecord) -> DbqsMessage {
    DbqsMessage::Reference { rid: 8, record }
}

#[test]
fn a_block_goes_only_once_every_owner_released_it_and_the_grace_passed() {
    let fx = fixture();
    let r = replica(&fx, 0);
    let (a, b) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
    let data = b"shared by two owners".to_vec();
    let x = content_id(&data);
    for owner in [&a, &b] {
        let reply = ask(&r, 0, put_held(&data, RefRecord::hold(owner, x, 1)));
        assert_eq!(reply.msg, DbqsMessage::ContentStored { rid: 7, id: x });
    }
    let stored = DbqsMessage::RefStored { rid: 8, id: x };
    assert_eq!(
        ask(&r, 0, reference(RefRecord::release(&a, x, 2))).msg,
        stored
    );
    assert_eq!(r.sweep(0, 100).unwrap(), vec![], "b still holds it");
    assert_eq!(r.next_sweep(0), None);
    assert_eq!(
        ask(&r, 0, reference(RefRecord::release(&b, x, 2))).msg,
        stored
    );
    assert_eq!(
        r.next_sweep(1000),
        Some(1000),
        "the grace starts at the next sweep"
    );
    assert_eq!(r.sweep(1000, 100).unwrap(), vec![]);
    let due = 1000 + DEFAULT_GRACE_MS;
    assert_eq!(r.next_sweep(1001), Some(due));
    assert_eq!(r.sweep(due - 1, 100).unwrap(), vec![]);
    assert!(r.store().has_content(&x).unwrap(), "kept through the grace");
    assert_eq!(r.sweep(due, 100).unwrap(), vec![x]);
    assert!(!r.store().has_content(&x).unwrap());
    assert_eq!(
        r.store().refs(&x).unwrap().len(),
        4,
        "the records stay as tombstones"
    );
    // A replayed old put (hold 1 < release 2) brings nothing back, and says why...
    let reply = ask(&r, 0, put_held(&data, RefRecord::hold(&b, x, 1)));
    let superseded = DbqsMessage::Rejected {
        rid: 7,
        reason: Reject::Superseded,
    };
    assert_eq!(reply.msg, superseded);
    assert!(!r.store().has_content(&x).unwrap());
    // ... a release of a key that never held it changes nothing; a new hold of the owner brings
    // it back.
    let c = Keypair::from_seed([5; 32]);
    assert_eq!(
        ask(&r, 0, reference(RefRecord::release(&c, x, 9))).msg,
        stored
    );
    assert!(released(&r.store().refs(&x).unwrap()));
    ask(&r, 0, put_held(&data, RefRecord::hold(&b, x, 3)));
    assert!(r.store().has_content(&x).unwrap());
    assert_eq!(r.sweep(due + 10 * DEFAULT_GRACE_MS, 100).unwrap(), vec![]);
}

#[test]
fn a_hold_during_the_grace_keeps_the_block_and_a_new_release_waits_a_new_grace() {
    let fx = fixture();
    let r = replica(&fx, 0);
    let a = Keypair::from_seed([1; 32]);
    let data = b"held again".to_vec();
    let x = content_id(&data);
    ask(&r, 0, put_held(&data, RefRecord::hold(&a, x, 1)));
    ask(&r, 0, reference(RefRecord::release(&a, x, 2)));
    r.sweep(0, 100).unwrap();
    ask(&r, 0, put_held(&data, RefRecord::hold(&a, x, 3)));
    ask(&r, 0, reference(RefRecord::release(&a, x, 4)));
    // Due at the first release's grace: the block was held and released since, so it waits.
    assert_eq!(r.sweep(DEFAULT_GRACE_MS, 100).unwrap(), vec![]);
    assert!(r.store().has_content(&x).unwrap());
    assert_eq!(r.sweep(2 * DEFAULT_GRACE_MS - 1, 100).unwrap(), vec![]);
    assert_eq!(r.sweep(2 * DEFAULT_GRACE_MS, 100).unwrap(), vec![x]);
}

#[test]
fn forged_releases_and_foreign_holds_are_refused() {
    let fx = fixture();
    let r = replica(&fx, 0);
    let (a, thief) = (Keypair::from_seed([1; 32]), Keypair::from_seed([3; 32]));
    let data = b"not yours".to_vec();
    let x = content_id(&data);
    ask(&r, 0, put_held(&data, RefRecord::hold(&a, x, 1)));
    // A release in a's name signed by someone else.
    let mut forged = RefRecord::release(&thief, x, 9);
    forged.owner = a.public();
    let refused = |reason| DbqsMessage::Rejected { rid: 8, reason };
    assert_eq!(
        ask(&r, 0, reference(forged)).msg,
        refused(Reject::BadSignature)
    );
    // The thief's own release of a block it never held lets nothing go.
    ask(&r, 0, reference(RefRecord::release(&thief, x, 9)));
    assert!(!released(&r.store().refs(&x).unwrap()));
    r.sweep(0, 100).unwrap();
    assert_eq!(r.sweep(10 * DEFAULT_GRACE_MS, 100).unwrap(), vec![]);
    assert!(r.store().has_content(&x).unwrap());
    // A put's hold must hold, and this block.
    let refused = |reason| DbqsMessage::Rejected { rid: 7, reason };
    let other = RefRecord::hold(&a, content_id(b"other"), 2);
    assert_eq!(
        ask(&r, 0, put_held(&data, other)).msg,
        refused(Reject::NotAReference)
    );
    let release = RefRecord::release(&a, x, 2);
    assert_eq!(
        ask(&r, 0, put_held(&data, release)).msg,
        refused(Reject::NotAReference)
    );
    let mut bad = RefRecord::hold(&a, x, 2);
    bad.seq = 3;
    assert_eq!(
        ask(&r, 0, put_held(&data, bad)).msg,
        refused(Reject::BadSignature)
    );
}

#[test]
fn a_restarted_replica_schedules_its_released_blocks_again() {
    let fx = fixture();
    let r = replica(&fx, 0);
    let a = Keypair::from_seed([1; 32]);
    let data = b"released before a crash".to_vec();
    let x = content_id(&data);
    ask(&r, 0, put_held(&data, RefRecord::hold(&a, x, 1)));
    ask(&r, 0, reference(RefRecord::release(&a, x, 2)));
    // A crash before the sweep: a replica built anew on the same store.
    let chain = ConfigChain::new(fx.configs[0].clone()).unwrap();
    let again = Replica::new(
        fx.keys[0].node_id(),
        r.store().clone(),
        chain,
        true,
        ReplicaOptions::default(),
    );
    assert_eq!(again.next_sweep(5), None);
    assert_eq!(again.recover_released().unwrap(), 1);
    again.sweep(5, 100).unwrap();
    assert_eq!(again.sweep(5 + DEFAULT_GRACE_MS, 100).unwrap(), vec![x]);
    assert_eq!(again.recover_released().unwrap(), 0);
}

#[test]
fn listings_carry_reference_records_and_tombstones() {
    use dbqsfs_core::dbqs::transfer::{Arc as RingArc, TransferMessage};
    let fx = fixture();
    let mut r = replica(&fx, 0);
    r.install(vec![fx.configs[1].clone()]).unwrap();
    let a = Keypair::from_seed([1; 32]);
    let (kept, gone) = (b"kept".to_vec(), b"gone".to_vec());
    let store = r.store().clone();
    for (i, d) in [&kept, &gone].into_iter().enumerate() {
        let x = content_id(d);
        store.merge_refs(&x, &[RefRecord::hold(&a, x, 1)]).unwrap();
        store.put_content(&x, d).unwrap();
        if i == 1 {
            store
                .merge_refs(&x, &[RefRecord::release(&a, x, 2)])
                .unwrap();
            assert!(store.drop_released(&x).unwrap());
        }
    }
    let whole = RingArc {
        start: [0; 32],
        end: [0; 32],
    };
    let list = TransferMessage::List {
        rid: 1,
        epoch: 1,
        arc: whole,
        after: None,
    };
    let reply = r
        .handle_transfer(NodeId([1; 32]), &encode_msg(1, list))
        .unwrap();
    match decode::<TransferMessage>(&reply).unwrap().msg {
        TransferMessage::Listing { content, refs, .. } => {
            assert_eq!(
                content,
                vec![content_id(&kept)],
                "a tombstone lists no content"
            );
            let mut ids: Vec<_> = refs.iter().map(|r| (r.id, r.hold)).collect();
            ids.sort();
            let mut want = vec![
                (content_id(&kept), true),
                (content_id(&gone), false),
                (content_id(&gone), true),
            ];
            want.sort();
            assert_eq!(ids, want);
        }
        other => panic!("expected a listing, got {other:?}"),
    }
}

#[test]
fn the_same_records_brought_by_each_transfer_keep_the_grace_and_bring_nothing_back() {
    let fx = fixture();
    let r = replica(&fx, 0);
    let a = Keypair::from_seed([1; 32]);
    let data = b"released once".to_vec();
    let x = content_id(&data);
    let (hold, release) = (RefRecord::hold(&a, x, 1), RefRecord::release(&a, x, 2));
    ask(&r, 0, put_held(&data, hold.clone()));
    ask(&r, 0, reference(release.clone()));
    r.sweep(1000, 100).unwrap();
    let due = 1000 + DEFAULT_GRACE_MS;
    // Every epoch's transfer brings the same records: the deletion stays due when it was.
    let records = vec![(x, vec![hold, release])];
    r.merge_transferred_refs(&records).unwrap();
    r.sweep(due - 1, 100).unwrap();
    assert_eq!(
        r.next_sweep(due - 1),
        Some(due),
        "the grace is not started again"
    );
    assert_eq!(r.sweep(due, 100).unwrap(), vec![x]);
    // Deleted: a later transfer listing it released does not fetch it again, and merging the
    // records once more schedules nothing.
    assert!(r.transfer_skips(&x, true).unwrap());
    assert!(
        !r.transfer_skips(&x, false).unwrap(),
        "held again according to the listings: fetched"
    );
    r.merge_transferred_refs(&records).unwrap();
    assert_eq!(r.next_sweep(due + 1), None);
}
