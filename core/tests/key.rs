//! The MS's threshold key (`ms::key`): a key generation, a redistribution to a changed committee,
//! FROST signatures under the one key, and each way a dealer's or a receiver's operation is
//! refused. The simulator (`simulate-key`) runs the same code against Byzantine committees.

use dbqsfs_core::crypto::NodeId;
use dbqsfs_core::ms::key::{
    self, sign, Applied, Holder, KeyError, KeyOp, KeyShare, PublicShares, Round, SealKey,
    Transcript, XofRng,
};
use std::collections::BTreeMap;

/// A deterministic generator for the tests: the core's BLAKE3 stream keyed by a test seed.
fn test_rng(seed: u8) -> XofRng {
    XofRng::new(&[seed; 32], b"key tests")
}

fn node(i: u8) -> NodeId {
    NodeId([i; 32])
}

fn seal(i: u8) -> SealKey {
    SealKey::from_seed(&[i + 100; 32])
}

fn round(epoch: u64, dealers: &[u8], receivers: &[u8], old: Option<&PublicShares>) -> Round {
    Round {
        epoch,
        dealers: dealers.iter().map(|i| node(*i)).collect(),
        old: old.cloned(),
        receivers: receivers
            .iter()
            .map(|i| (node(*i), seal(*i).public()))
            .collect(),
        threshold: 3,
    }
}

/// Every dealer deals honestly (from `holders`, if any); returns the transcript and each
/// receiver's share.
fn run(
    r: Round,
    holders: &BTreeMap<NodeId, Holder>,
    rng: &mut XofRng,
) -> (Transcript, BTreeMap<NodeId, KeyShare>) {
    let mut t = Transcript::new(r.clone()).unwrap();
    for d in &r.dealers {
        let old = holders.get(d).and_then(|h| h.to_deal(r.epoch));
        let deal = key::deal(&r, d, old, rng).unwrap();
        assert_eq!(t.apply(d, &KeyOp::Deal(deal)).unwrap(), Applied::Dealt(*d));
    }
    let shares = r
        .receivers
        .iter()
        .map(|(id, _)| (*id, t.share(id, &seal(id.0[0])).unwrap()))
        .collect();
    (t, shares)
}

/// FROST's two rounds with `shares` over `msg`, aggregated under `public`.
fn signs(
    public: &PublicShares,
    shares: &[&KeyShare],
    msg: &[u8],
    rng: &mut XofRng,
) -> Result<[u8; 64], sign::AggregateError> {
    let mut nonces = Vec::new();
    let mut commitments = BTreeMap::new();
    for s in shares {
        let (n, c) = sign::commit(s, rng);
        nonces.push(n);
        commitments.insert(sign::identifier(s.position), c);
    }
    let package = sign::SigningPackage::new(commitments, msg);
    let sig_shares = shares
        .iter()
        .zip(&nonces)
        .map(|(s, n)| {
            (
                sign::identifier(s.position),
                sign::sign(s, &package, n).unwrap(),
            )
        })
        .collect();
    sign::aggregate(public, &package, &sig_shares)
}

#[test]
fn the_key_moves_to_a_changed_committee_and_signs_with_one_verification() {
    let mut rng = test_rng(1);
    let (t0, shares0) = run(
        round(0, &[1, 2, 3, 4], &[1, 2, 3, 4], None),
        &BTreeMap::new(),
        &mut rng,
    );
    let public0 = t0.public().unwrap();
    assert!(shares0.values().all(KeyShare::is_valid));
    let key = public0.group_key();
    let sig = signs(
        &public0,
        &shares0.values().take(3).collect::<Vec<_>>(),
        b"epoch 0",
        &mut rng,
    )
    .unwrap();
    assert!(sign::verify(&key, b"epoch 0", &sig));
    // An ordinary ed25519 signature: ed25519-dalek checks it too.
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key).unwrap();
    vk.verify_strict(b"epoch 0", &ed25519_dalek::Signature::from_bytes(&sig))
        .unwrap();

    // Member 1 leaves, 5 joins.
    let mut holders: BTreeMap<NodeId, Holder> = BTreeMap::new();
    for (id, s) in shares0 {
        holders.entry(id).or_default().install(s);
    }
    let r1 = round(1, &[1, 2, 3, 4], &[2, 3, 4, 5], Some(&public0));
    let (t1, shares1) = run(r1, &holders, &mut rng);
    let public1 = t1.public().unwrap();
    assert_eq!(public1.group_key(), key, "the key stays the same");
    assert_ne!(
        public1.commitments, public0.commitments,
        "the shares are new"
    );
    assert!(shares1.values().all(KeyShare::is_valid));
    let newest: Vec<&KeyShare> = shares1.values().rev().take(3).collect();
    let sig = signs(&public1, &newest, b"epoch 1", &mut rng).unwrap();
    assert!(sign::verify(&key, b"epoch 1", &sig));
    assert!(!sign::verify(&key, b"epoch 2", &sig));

    // Once its deal is ordered, a dealer erases the old share; it signs only for its epoch.
    let h = holders.get_mut(&node(1)).unwrap();
    assert!(h.for_signing(0).is_some() && h.for_signing(1).is_none());
    h.dealt(1);
    assert!(h.held().is_empty() && h.for_signing(0).is_none());

    // An old share mixed into the new committee's signature is named.
    // The old share of member 2 sits at position 1 in epoch 0; in epoch 1, member 3 does.
    let old = holders[&node(2)].for_signing(0).unwrap();
    match signs(&public1, &[old, newest[0], newest[1]], b"epoch 1", &mut rng) {
        Err(sign::AggregateError::Culprits(c)) => assert_eq!(c, vec![public1.members[1]]),
        other => panic!("an old share signed with the new ones: {other:?}"),
    }
}

#[test]
fn a_wrong_sub_share_is_disproven_by_its_receiver_and_the_next_dealer_takes_its_place() {
    let mut rng = test_rng(2);
    let r = round(0, &[1, 2, 3, 4], &[1, 2, 3, 4], None);
    let mut t = Transcript::new(r.clone()).unwrap();
    let mut deals: Vec<_> = r
        .dealers
        .iter()
        .map(|d| key::deal(&r, d, None, &mut rng).unwrap())
        .collect();
    // Dealer 1 seals garbage for receiver 3 (position 2).
    deals[0].sealed[2] = [7; 32];
    for (d, deal) in r.dealers.iter().zip(deals) {
        t.apply(d, &KeyOp::Deal(deal)).unwrap();
    }
    assert_eq!(
        t.qualified_dealers().unwrap(),
        vec![node(1), node(2), node(3)]
    );
    let before = t.public().unwrap();
    // The others' shares are fine; receiver 3's is not, and says whom to complain about.
    assert!(t.share(&node(1), &seal(1)).unwrap().is_valid());
    assert_eq!(
        t.share(&node(3), &seal(3)).err(),
        Some(KeyError::BadSubShare(node(1)))
    );
    assert_eq!(
        t.check(&node(3), &seal(3), &node(2), &mut rng).unwrap(),
        Ok(())
    );
    let complaint = t
        .check(&node(3), &seal(3), &node(1), &mut rng)
        .unwrap()
        .unwrap_err();
    // The complaint is evidence anyone checks: the dealer is out, the fourth dealer is in.
    assert_eq!(
        t.apply(&node(3), &KeyOp::Complaint(complaint.clone()))
            .unwrap(),
        Applied::Disproved(node(1))
    );
    assert_eq!(t.disproven(), vec![node(1)]);
    assert_eq!(
        t.qualified_dealers().unwrap(),
        vec![node(2), node(3), node(4)]
    );
    let after = t.public().unwrap();
    assert_ne!(after, before, "the sharing is now of another qualified set");
    for i in 1..=4 {
        assert!(t.share(&node(i), &seal(i)).unwrap().is_valid());
    }
    // The same proof from another receiver does not verify.
    assert_eq!(
        t.apply(&node(2), &KeyOp::Complaint(complaint)).err(),
        Some(KeyError::BadProof)
    );
}

#[test]
fn false_forged_and_misplaced_complaints_are_refused() {
    let mut rng = test_rng(3);
    let r = round(0, &[1, 2, 3, 4], &[1, 2, 3, 4], None);
    let (mut t, _) = run(r, &BTreeMap::new(), &mut rng);
    let public = t.public().unwrap();
    // A correct proof about a correct sub-share: false, and the dealer stays.
    let c = key::false_complaint(&t, &node(2), &seal(2), &node(1), &mut rng).unwrap();
    assert_eq!(
        t.apply(&node(2), &KeyOp::Complaint(c.clone())).err(),
        Some(KeyError::FalseComplaint)
    );
    // A tampered proof.
    let mut forged = c.clone();
    forged.proof.z[0] ^= 1;
    assert_eq!(
        t.apply(&node(2), &KeyOp::Complaint(forged)).err(),
        Some(KeyError::BadProof)
    );
    // From outside the receivers; about a dealer outside the dealers.
    assert_eq!(
        t.apply(&node(9), &KeyOp::Complaint(c.clone())).err(),
        Some(KeyError::NotReceiver)
    );
    let mut elsewhere = c;
    elsewhere.against = node(9);
    assert_eq!(
        t.apply(&node(2), &KeyOp::Complaint(elsewhere)).err(),
        Some(KeyError::NotDealer)
    );
    assert_eq!(t.public().unwrap(), public, "nothing changed");
}

#[test]
fn deals_that_do_not_share_the_dealers_share_or_are_malformed_are_refused() {
    let mut rng = test_rng(4);
    let (t0, shares0) = run(
        round(0, &[1, 2, 3, 4], &[1, 2, 3, 4], None),
        &BTreeMap::new(),
        &mut rng,
    );
    let public0 = t0.public().unwrap();
    let r1 = round(1, &[1, 2, 3, 4], &[1, 2, 3, 5], Some(&public0));
    let mut t = Transcript::new(r1.clone()).unwrap();

    // A deal of some other secret (a genesis deal) in a redistribution.
    let fresh = Round {
        old: None,
        ..r1.clone()
    };
    let other = key::deal(&fresh, &node(1), None, &mut rng).unwrap();
    assert_eq!(
        t.apply(&node(1), &KeyOp::Deal(other)).err(),
        Some(KeyError::WrongConstant)
    );
    // Dealing needs the share of the sharing before.
    assert_eq!(
        key::deal(&r1, &node(1), None, &mut rng).err(),
        Some(KeyError::NoShare)
    );
    let good = key::deal(&r1, &node(1), Some(&shares0[&node(1)]), &mut rng).unwrap();
    let mut short = good.clone();
    short.sealed.pop();
    assert!(matches!(
        t.apply(&node(1), &KeyOp::Deal(short)),
        Err(KeyError::Malformed(_))
    ));
    let mut off_curve = good.clone();
    off_curve.commitments[1] = [0xff; 32];
    assert!(matches!(
        t.apply(&node(1), &KeyOp::Deal(off_curve)),
        Err(KeyError::Malformed(_))
    ));
    assert!(t.apply(&node(1), &KeyOp::Deal(good.clone())).is_ok());
    // The first deal counts: a second, different one is refused.
    let second = key::deal(&r1, &node(1), Some(&shares0[&node(1)]), &mut rng).unwrap();
    assert_eq!(
        t.apply(&node(1), &KeyOp::Deal(second)).err(),
        Some(KeyError::Duplicate)
    );
    assert_eq!(
        t.apply(&node(5), &KeyOp::Deal(good)).err(),
        Some(KeyError::NotDealer)
    );
    assert!(matches!(
        t.public(),
        Err(KeyError::NotQualified { have: 1, needed: 3 })
    ));

    // At genesis, a deal without its proof of knowledge, or with a wrong one.
    let r = round(0, &[1, 2, 3, 4], &[1, 2, 3, 4], None);
    let mut g = Transcript::new(r.clone()).unwrap();
    let mut unproven = key::deal(&r, &node(1), None, &mut rng).unwrap();
    let proof = unproven.proof.take();
    assert!(matches!(
        g.apply(&node(1), &KeyOp::Deal(unproven.clone())),
        Err(KeyError::Malformed(_))
    ));
    let mut wrong = proof.unwrap();
    wrong.c[0] ^= 1;
    unproven.proof = Some(wrong);
    assert_eq!(
        g.apply(&node(1), &KeyOp::Deal(unproven)).err(),
        Some(KeyError::BadProof)
    );
}
