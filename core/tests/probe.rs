//! A member's probing: whom it watches on the ring, verdicts from signed answers only, failures
//! counted across epochs, an unresponsive member reported again in each new epoch.

use dbqsfs_core::config::{Configuration, Member, Params};
use dbqsfs_core::crypto::{Domain, Keypair, NodeId};
use dbqsfs_core::ms::probe::{
    eviction_reports, probe_body, watch_count, watched, watches, Prober, Verdict,
};

fn keys() -> Vec<Keypair> {
    (0..5).map(|i| Keypair::from_seed([i + 60; 32])).collect()
}

fn config(epoch: u64, ks: &[Keypair], evict_after: u32) -> Configuration {
    let members = ks
        .iter()
        .map(|k| Member::new(k.public(), "127.0.0.1:1"))
        .collect();
    let mut params = Params::with_f(1);
    params.evict_after_probes = evict_after;
    Configuration::new(epoch, params, members, None)
}

/// One round in which every member in `alive` answers its challenge and the others do not.
fn round(p: &mut Prober, me: NodeId, ks: &[Keypair], alive: &[NodeId]) -> Vec<Verdict> {
    let mut n = 0u8;
    let challenges = p.round(|| {
        n += 1;
        [n; 32]
    });
    let mut verdicts = Vec::new();
    for (target, nonce) in challenges {
        let k = ks.iter().find(|k| k.node_id() == target).unwrap();
        let answer = alive
            .contains(&target)
            .then(|| k.sign(Domain::Probe, &probe_body(p.epoch(), &nonce, &me)));
        verdicts.extend(p.answered(&target, &nonce, answer.as_ref()));
    }
    verdicts
}

#[test]
fn a_dead_member_is_reported_after_evict_after_probes_failures_and_a_live_one_never() {
    let ks = keys();
    let me = ks[0].node_id();
    let c = config(0, &ks, 3);
    let (mut p, again) = Prober::new(&c, me, None);
    assert!(again.is_empty());
    let dead = ks[1].node_id();
    let alive: Vec<NodeId> = ks[2..].iter().map(|k| k.node_id()).collect();
    assert!(round(&mut p, me, &ks, &alive).is_empty());
    assert!(round(&mut p, me, &ks, &alive).is_empty());
    let v = round(&mut p, me, &ks, &alive);
    assert_eq!(
        v,
        vec![Verdict {
            target: dead,
            responsive: false
        }]
    );
    // Reported once, not at every round after.
    assert!(round(&mut p, me, &ks, &alive).is_empty());
    // One answer brings it back.
    let all: Vec<NodeId> = ks[1..].iter().map(|k| k.node_id()).collect();
    assert_eq!(
        round(&mut p, me, &ks, &all),
        vec![Verdict {
            target: dead,
            responsive: true
        }]
    );
}

#[test]
fn failures_carry_over_epochs_shorter_than_the_eviction_bound_and_verdicts_are_reported_again() {
    let ks = keys();
    let me = ks[0].node_id();
    let dead = ks[1].node_id();
    let alive: Vec<NodeId> = ks[2..].iter().map(|k| k.node_id()).collect();
    // Two rounds per epoch, eviction after three failures.
    let (mut p, _) = Prober::new(&config(0, &ks, 3), me, None);
    assert!(round(&mut p, me, &ks, &alive).is_empty());
    assert!(round(&mut p, me, &ks, &alive).is_empty());
    let (mut p, again) = Prober::new(&config(1, &ks, 3), me, Some(&p));
    assert!(again.is_empty());
    assert_eq!(
        round(&mut p, me, &ks, &alive).len(),
        1,
        "the third failure in a row"
    );
    // The next epoch's membership starts with it responsive: reported again at once.
    let (_, again) = Prober::new(&config(2, &ks, 3), me, Some(&p));
    assert_eq!(
        again,
        vec![Verdict {
            target: dead,
            responsive: false
        }]
    );
}

#[test]
fn only_a_signature_over_this_rounds_challenge_for_this_prober_counts() {
    let ks = keys();
    let me = ks[0].node_id();
    let c = config(0, &ks, 1);
    let (mut p, _) = Prober::new(&c, me, None);
    let target = ks[1].node_id();
    let nonce = p
        .round(|| [9; 32])
        .into_iter()
        .find(|(t, _)| *t == target)
        .unwrap()
        .1;
    // An answer to another prober, then one by another key: both are failures.
    let for_other = ks[1].sign(Domain::Probe, &probe_body(0, &nonce, &ks[2].node_id()));
    let verdict = p.answered(&target, &nonce, Some(&for_other));
    assert_eq!(
        verdict,
        Some(Verdict {
            target,
            responsive: false
        })
    );
    // A round does not challenge again before the last challenge is settled, and an answer to
    // a nonce no longer outstanding is ignored.
    let nonce2 = p
        .round(|| [10; 32])
        .into_iter()
        .find(|(t, _)| *t == target)
        .unwrap()
        .1;
    assert!(p.round(|| [11; 32]).iter().all(|(t, _)| *t != target));
    let good_old = ks[1].sign(Domain::Probe, &probe_body(0, &nonce, &me));
    assert_eq!(p.answered(&target, &nonce, Some(&good_old)), None);
    let by_other = ks[2].sign(Domain::Probe, &probe_body(0, &nonce2, &me));
    assert_eq!(p.answered(&target, &nonce2, Some(&by_other)), None);
    let nonce3 = p
        .round(|| [12; 32])
        .into_iter()
        .find(|(t, _)| *t == target)
        .unwrap()
        .1;
    let good = ks[1].sign(Domain::Probe, &probe_body(0, &nonce3, &me));
    assert_eq!(
        p.answered(&target, &nonce3, Some(&good)),
        Some(Verdict {
            target,
            responsive: true
        })
    );
}

#[test]
fn each_member_watches_the_3f_plus_1_after_it_and_is_watched_by_as_many() {
    for (n, f) in [(5usize, 1u32), (12, 1), (40, 2)] {
        let ks: Vec<Keypair> = (0..n)
            .map(|i| Keypair::from_seed([i as u8 + 1; 32]))
            .collect();
        let members = ks
            .iter()
            .map(|k| Member::new(k.public(), "127.0.0.1:1"))
            .collect();
        let c = Configuration::new(0, Params::with_f(f), members, None);
        let w = (3 * f as usize + 1).min(n - 1);
        assert_eq!(watch_count(&c), w);
        assert_eq!(eviction_reports(&c), f as usize + 1);
        for (i, m) in c.members.iter().enumerate() {
            let mine = watched(&c, &m.id);
            // The members after it on the ring, in order, wrapping around.
            let expected: Vec<NodeId> = (1..=w).map(|k| c.members[(i + k) % n].id).collect();
            assert_eq!(mine, expected);
            let watchers = c
                .members
                .iter()
                .filter(|x| watches(&c, &x.id, &m.id))
                .count();
            assert_eq!(watchers, w, "every member has {w} watchers");
            for other in &c.members {
                assert_eq!(watches(&c, &m.id, &other.id), mine.contains(&other.id));
            }
            // Its prober challenges exactly those.
            let (mut p, _) = Prober::new(&c, m.id, None);
            let mut challenged: Vec<NodeId> =
                p.round(|| [0; 32]).into_iter().map(|(t, _)| t).collect();
            challenged.sort();
            let mut sorted = mine.clone();
            sorted.sort();
            assert_eq!(challenged, sorted);
        }
        let stranger = NodeId([0xee; 32]);
        assert!(watched(&c, &stranger).is_empty());
        assert!(!watches(&c, &stranger, &c.members[0].id));
    }
}
