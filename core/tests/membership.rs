//! The MS state machine: what each agreed operation does to the next configuration.

use dbqsfs_core::config::{CertifiedConfig, ConfigChain, Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId};
use dbqsfs_core::ms::app::{App, OutOfOrder};
use dbqsfs_core::ms::key::KeyMember;
use dbqsfs_core::ms::membership::{
    AdmissionCert, CertificateCollector, Executed, Membership, MsOp,
};
use dbqsfs_core::ms::pbft::{Evidence, PrePrepare, Request, Signed, SignedStatement};
use dbqsfs_core::ms::probe;

struct Cluster {
    admission: Keypair,
    keys: Vec<Keypair>,
    config: Configuration,
}

/// Six members, f = f_ms = 1; the committee is four of them.
fn cluster() -> Cluster {
    let keys: Vec<Keypair> = (0..6).map(|i| Keypair::from_seed([i + 30; 32])).collect();
    let members = keys
        .iter()
        .map(|k| Member::new(k.public(), "127.0.0.1:1"))
        .collect();
    let config = Configuration::new(0, Params::with_f(1), members, None);
    Cluster {
        admission: Keypair::from_seed([99; 32]),
        keys,
        config,
    }
}

impl Cluster {
    /// The membership of epoch 0 once the committee generated the MS key (so votes end it).
    fn membership(&self) -> Membership {
        let mut m = self.membership_before_key();
        for k in self.committee() {
            assert_eq!(
                m.execute(&k.public(), deal_of(k, &self.config), &SEED),
                Executed::Accepted
            );
        }
        m
    }
    fn membership_before_key(&self) -> Membership {
        Membership::new(self.config.clone(), self.admission.public(), 8)
    }
    /// The committee's keys in committee order (an agreement signer's index is its position).
    fn committee(&self) -> Vec<&Keypair> {
        self.config
            .committee
            .iter()
            .map(|id| {
                self.keys
                    .iter()
                    .find(|k| k.node_id() == *id)
                    .expect("a member")
            })
            .collect()
    }
    fn outsider(&self) -> &Keypair {
        self.keys
            .iter()
            .find(|k| !self.config.committee.contains(&k.node_id()))
            .expect("6 members, committee of 4")
    }
}

const SEED: [u8; 32] = [7; 32];

/// `key`'s deal in the round of the MS key that `config` makes, as its node makes it.
fn deal_of(key: &Keypair, config: &Configuration) -> MsOp {
    let op = KeyMember::new(key.clone(), Default::default())
        .enter(config)
        .expect("a dealer of this round");
    MsOp::Key {
        epoch: config.epoch,
        op: Box::new(op),
    }
}

/// Ends the epoch with f_ms+1 = 2 committee votes; returns the next configuration.
fn end_epoch(c: &Cluster, m: &mut Membership) -> Configuration {
    let e = m.config().epoch;
    let committee = c.committee();
    assert_eq!(
        m.execute(&committee[0].public(), MsOp::EndEpoch { epoch: e }, &SEED),
        Executed::Accepted
    );
    match m.execute(&committee[1].public(), MsOp::EndEpoch { epoch: e }, &SEED) {
        Executed::EpochEnded(next) => *next,
        other => panic!("the epoch should end, got {other:?}"),
    }
}

#[test]
fn joins_and_leaves_for_another_epoch_are_ignored_so_replays_do_nothing() {
    let c = cluster();
    let mut m = c.membership();
    let newcomer = Keypair::from_seed([51; 32]);
    let member = Member::new(newcomer.public(), "127.0.0.1:9");
    let cert = AdmissionCert::sign(&c.admission, &newcomer.public());
    assert!(matches!(
        m.execute(
            &newcomer.public(),
            MsOp::Join {
                epoch: 7,
                member,
                cert
            },
            &SEED
        ),
        Executed::Ignored(_)
    ));
    let leaver = &c.keys[2];
    assert!(matches!(
        m.execute(&leaver.public(), MsOp::Leave { epoch: 3 }, &SEED),
        Executed::Ignored(_)
    ));
    let next = end_epoch(&c, &mut m);
    assert!(!next.is_member(&newcomer.node_id()));
    assert!(next.is_member(&leaver.node_id()));
}

#[test]
fn a_node_with_an_admission_certificate_joins_at_the_next_epoch() {
    let c = cluster();
    let mut m = c.membership();
    let newcomer = Keypair::from_seed([50; 32]);
    let member = Member::new(newcomer.public(), "127.0.0.1:9");
    let cert = AdmissionCert::sign(&c.admission, &newcomer.public());
    assert_eq!(
        m.execute(
            &newcomer.public(),
            MsOp::Join {
                epoch: 0,
                member,
                cert
            },
            &SEED
        ),
        Executed::Accepted
    );
    let next = end_epoch(&c, &mut m);
    assert!(next.is_member(&newcomer.node_id()));
    assert_eq!(next.epoch, 1);
    assert_eq!(next.prev, Some(c.config.hash()));
    assert_eq!(next.validate(), Ok(()));
}

#[test]
fn a_join_without_a_valid_certificate_or_for_someone_else_is_ignored() {
    let c = cluster();
    let mut m = c.membership();
    let newcomer = Keypair::from_seed([50; 32]);
    let member = Member::new(newcomer.public(), "127.0.0.1:9");
    let self_signed = AdmissionCert::sign(&newcomer, &newcomer.public());
    assert!(matches!(
        m.execute(
            &newcomer.public(),
            MsOp::Join {
                epoch: 0,
                member: member.clone(),
                cert: self_signed
            },
            &SEED
        ),
        Executed::Ignored(_)
    ));
    let cert = AdmissionCert::sign(&c.admission, &newcomer.public());
    let other = c.keys[0].public();
    assert!(
        matches!(
            m.execute(
                &other,
                MsOp::Join {
                    epoch: 0,
                    member,
                    cert
                },
                &SEED
            ),
            Executed::Ignored(_)
        ),
        "submitted by another node"
    );
    assert!(!end_epoch(&c, &mut m).is_member(&newcomer.node_id()));
}

#[test]
fn a_leave_removes_exactly_its_submitter() {
    let c = cluster();
    let mut m = c.membership();
    let leaver = &c.keys[2];
    assert_eq!(
        m.execute(&leaver.public(), MsOp::Leave { epoch: 0 }, &SEED),
        Executed::Accepted
    );
    let next = end_epoch(&c, &mut m);
    assert!(!next.is_member(&leaver.node_id()));
    assert_eq!(next.members.len(), 5);
}

#[test]
fn one_faulty_watcher_cannot_evict_a_live_node_f_plus_1_evict_a_dead_one_and_others_are_not_heard()
{
    let c = cluster();
    let target = c.outsider().node_id();
    // Of six members, f = 1: the four before the target on the ring watch it, the fifth does not.
    let watchers: Vec<&Keypair> = c
        .keys
        .iter()
        .filter(|k| probe::watches(&c.config, &k.node_id(), &target))
        .collect();
    assert_eq!(watchers.len(), 4);
    let stranger = c
        .keys
        .iter()
        .find(|k| k.node_id() != target && !probe::watches(&c.config, &k.node_id(), &target))
        .expect("one member does not watch the target");
    let probe = |responsive| MsOp::Probe {
        epoch: 0,
        target,
        responsive,
    };

    let mut m = c.membership();
    assert_eq!(
        m.execute(&watchers[3].public(), probe(false), &SEED),
        Executed::Accepted
    );
    assert!(
        end_epoch(&c, &mut m).is_member(&target),
        "one report is not enough"
    );

    let mut m = c.membership();
    m.execute(&watchers[2].public(), probe(false), &SEED);
    m.execute(&watchers[3].public(), probe(false), &SEED);
    assert!(
        !end_epoch(&c, &mut m).is_member(&target),
        "f+1 watchers' reports evict"
    );

    let mut m = c.membership();
    m.execute(&watchers[2].public(), probe(false), &SEED);
    m.execute(&watchers[3].public(), probe(false), &SEED);
    m.execute(&watchers[3].public(), probe(true), &SEED);
    assert!(
        end_epoch(&c, &mut m).is_member(&target),
        "a member that answers again is no longer reported by that watcher"
    );

    // Reports from members that do not watch the target, or from the target itself, are not
    // heard: a member's `f` faulty watchers are the only accusers it can have.
    let mut m = c.membership();
    for k in [stranger, c.outsider()] {
        assert!(matches!(
            m.execute(&k.public(), probe(false), &SEED),
            Executed::Ignored(_)
        ));
    }
}

#[test]
fn an_epoch_ends_only_when_f_plus_1_committee_members_ask() {
    let c = cluster();
    let mut m = c.membership();
    let committee = c.committee();
    assert!(matches!(
        m.execute(&c.outsider().public(), MsOp::EndEpoch { epoch: 0 }, &SEED),
        Executed::Ignored(_)
    ));
    assert_eq!(
        m.execute(&committee[0].public(), MsOp::EndEpoch { epoch: 0 }, &SEED),
        Executed::Accepted
    );
    assert_eq!(
        m.execute(&committee[0].public(), MsOp::EndEpoch { epoch: 0 }, &SEED),
        Executed::Accepted,
        "a repeated vote counts once"
    );
    assert_eq!(m.config().epoch, 0);
    assert!(
        matches!(
            m.execute(&committee[1].public(), MsOp::EndEpoch { epoch: 5 }, &SEED),
            Executed::Ignored(_)
        ),
        "another epoch's vote"
    );
    assert!(matches!(
        m.execute(&committee[1].public(), MsOp::EndEpoch { epoch: 0 }, &SEED),
        Executed::EpochEnded(_)
    ));
    assert_eq!(m.config().epoch, 1);
}

#[test]
fn the_next_committee_follows_the_seed_and_is_the_same_everywhere() {
    let c = cluster();
    let committee_for = |seed: [u8; 32]| {
        let mut a = c.membership();
        let mut b = c.membership();
        let k = c.committee();
        for m in [&mut a, &mut b] {
            m.execute(&k[0].public(), MsOp::EndEpoch { epoch: 0 }, &seed);
            m.execute(&k[1].public(), MsOp::EndEpoch { epoch: 0 }, &seed);
        }
        assert_eq!(a.config(), b.config(), "deterministic");
        a.config().committee.clone()
    };
    let draws: std::collections::BTreeSet<Vec<NodeId>> =
        (0..20u8).map(|i| committee_for([i; 32])).collect();
    assert!(draws.len() > 1, "different seeds draw different committees");
    for d in &draws {
        assert_eq!(d.len(), 4);
    }
}

#[test]
fn removals_never_take_the_membership_below_3f_plus_1() {
    let c = cluster();
    let mut m = c.membership();
    for k in &c.keys[..4] {
        m.execute(&k.public(), MsOp::Leave { epoch: 0 }, &SEED);
    }
    let next = end_epoch(&c, &mut m);
    assert_eq!(next.members.len(), 4);
    assert_eq!(next.validate(), Ok(()));
}

#[test]
fn an_equivocating_committee_member_is_evicted() {
    let c = cluster();
    let mut m = c.membership();
    let committee = c.committee();
    let index = 1u32;
    let guilty = committee[index as usize];
    let pp = |digest| {
        Signed::sign(
            guilty,
            index,
            0,
            PrePrepare {
                view: 0,
                seq: 1,
                digest,
            },
        )
    };
    let evidence = Evidence::Equivocation {
        first: SignedStatement::PrePrepare(pp([1; 32])),
        second: SignedStatement::PrePrepare(pp([2; 32])),
    };
    assert_eq!(
        m.execute(
            &committee[0].public(),
            MsOp::Misbehaviour {
                epoch: 0,
                evidence: evidence.clone()
            },
            &SEED
        ),
        Executed::Accepted
    );
    assert!(!end_epoch(&c, &mut m).is_member(&guilty.node_id()));

    let mut m = c.membership();
    let not_conflicting = Evidence::Equivocation {
        first: SignedStatement::PrePrepare(pp([1; 32])),
        second: SignedStatement::PrePrepare(pp([1; 32])),
    };
    assert!(matches!(
        m.execute(
            &committee[0].public(),
            MsOp::Misbehaviour {
                epoch: 0,
                evidence: not_conflicting
            },
            &SEED
        ),
        Executed::Ignored(_)
    ));
}

#[test]
fn the_old_committee_certifies_the_next_configuration_and_followers_accept_it() {
    let c = cluster();
    let mut m = c.membership();
    let next = end_epoch(&c, &mut m);
    let mut collector = CertificateCollector::new(c.config.clone(), next);
    let committee = c.committee();
    assert_eq!(
        collector.add(c.outsider().node_id(), collector.sign(c.outsider())),
        None,
        "not a committee member"
    );
    assert_eq!(
        collector.add(committee[0].node_id(), collector.sign(committee[1])),
        None,
        "a signature by someone else"
    );
    assert_eq!(
        collector.add(committee[0].node_id(), collector.sign(committee[0])),
        None
    );
    assert_eq!(
        collector.add(committee[1].node_id(), collector.sign(committee[1])),
        None
    );
    let certified: CertifiedConfig = collector
        .add(committee[2].node_id(), collector.sign(committee[2]))
        .expect("2f+1 signatures");
    let mut chain = ConfigChain::new(CertifiedConfig::genesis(c.config.clone())).unwrap();
    assert_eq!(chain.extend(vec![certified]), Ok(vec![1]));
}

fn op_request(key: &Keypair, seq: u64, op: &MsOp) -> Request {
    Request::sign(key, seq, postcard::to_stdvec(op).unwrap())
}

#[test]
fn the_ms_application_executes_in_order_chains_its_digest_and_replays_to_the_same_state() {
    let c = cluster();
    let committee = c.committee();
    let end = |k: &Keypair, seq| op_request(k, seq, &MsOp::EndEpoch { epoch: 0 });
    let garbage = Request::sign(committee[2], 1, b"not an operation".to_vec());
    let batches = vec![
        vec![end(committee[0], 1), garbage],
        vec![end(committee[1], 1)],
        vec![end(committee[2], 2)],
    ];
    let mut app = App::new(c.membership());
    assert_eq!(
        app.execute(2, &batches[1]).unwrap_err(),
        OutOfOrder {
            seq: 2,
            executed: 0
        }
    );
    let first = app.execute(1, &batches[0]).unwrap();
    // The payload that is no operation is skipped.
    assert_eq!(first.len(), 1);
    assert!(app.ended().is_none());
    let d1 = app.digest();
    app.execute(2, &batches[1]).unwrap();
    // The second committee vote ends the epoch, in batch 2 at index 0; later votes do not move it.
    let ended = app.ended().cloned().expect("f_ms+1 votes end the epoch");
    assert_eq!((ended.seq, ended.index), (2, 0));
    app.execute(3, &batches[2]).unwrap();
    assert_eq!(app.ended(), Some(&ended));
    assert_eq!(app.executed(), 3);
    assert_eq!(app.digest_at(1), Some(d1));

    // Replay and prefixes reach the same digests and the same epoch end.
    let again = App::replay(c.membership(), &batches);
    assert_eq!(again.digest(), app.digest());
    assert_eq!(again.ended(), app.ended());
    assert_eq!(app.prefix(1).unwrap().digest(), d1);
    // A different history has a different digest.
    let other = App::replay(c.membership(), &[batches[1].clone(), batches[0].clone()]);
    assert_ne!(other.digest_at(2), app.digest_at(2));
    // The seed of the next committee is the batch's: the same everywhere.
    let mut m = c.membership();
    let seed = dbqsfs_core::ms::app::ms_seed(2, &batches[1]);
    m.execute(&committee[0].public(), MsOp::EndEpoch { epoch: 0 }, &seed);
    match m.execute(&committee[1].public(), MsOp::EndEpoch { epoch: 0 }, &seed) {
        Executed::EpochEnded(next) => assert_eq!(*next, ended.config),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_epoch_ends_only_once_the_ms_key_has_moved_to_its_committee() {
    let c = cluster();
    let mut m = c.membership_before_key();
    let committee = c.committee();
    for k in &committee[..2] {
        assert_eq!(
            m.execute(&k.public(), MsOp::EndEpoch { epoch: 0 }, &SEED),
            Executed::Accepted
        );
    }
    assert_eq!(m.config().epoch, 0, "the votes wait for the key");
    // An outsider's deal is refused; two committee deals are not the 2f+1 needed.
    assert!(matches!(
        m.execute(
            &c.outsider().public(),
            deal_of(committee[0], &c.config),
            &SEED
        ),
        Executed::Ignored(_)
    ));
    for k in &committee[..2] {
        assert_eq!(
            m.execute(&k.public(), deal_of(k, &c.config), &SEED),
            Executed::Accepted
        );
    }
    assert_eq!(m.pending().key_dealt, 2);
    // The third deal completes the round, and the epoch ends at once.
    let next = match m.execute(
        &committee[2].public(),
        deal_of(committee[2], &c.config),
        &SEED,
    ) {
        Executed::EpochEnded(next) => *next,
        other => panic!("the epoch should end, got {other:?}"),
    };
    let key = next
        .key
        .clone()
        .expect("the next configuration carries the key");
    assert_eq!(key.members, c.config.committee);
    assert_eq!(next.check_key(&c.config), Ok(()));
    // Each receiver holds a valid share of it, computed from the ordered round.
    let round = m.key_of(0).expect("the ended round is kept");
    for k in &committee {
        let mut km = KeyMember::new((*k).clone(), Default::default());
        assert!(
            km.sync(round).is_empty(),
            "no complaint about correct deals"
        );
        let share = km.holder().for_signing(0).expect("a share");
        assert!(share.is_valid() && share.public == key);
    }
    // Once a configuration carries the key, its successor must carry the same key, as the
    // sharing of the committee before: a changed or dropped key is refused by every verifier.
    let mut after = next.clone();
    after.epoch = 2;
    after.key = Some(dbqsfs_core::config::PublicShares {
        epoch: 1,
        members: next.committee.clone(),
        commitments: key.commitments.clone(),
    });
    assert_eq!(after.check_key(&next), Ok(()));
    after.key.as_mut().unwrap().commitments[0] = key.commitments[1];
    assert!(after.check_key(&next).is_err(), "another key");
    after.key = None;
    assert!(after.check_key(&next).is_err(), "no key");
}
