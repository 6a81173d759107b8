//! A node's following of the epochs: periodic pulls from the healthiest members, retried
//! elsewhere at once, and forwarding down the push tree on entering a newer epoch.

use dbqsfs_core::config::{Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId};
use dbqsfs_core::ms::follower::{FollowAction, Follower, PULL_RETRIES};
use dbqsfs_core::ms::tree::push_children;

fn config(epoch: u64, n: u8) -> Configuration {
    let members = (0..n)
        .map(|i| Member::new(Keypair::from_seed([i + 30; 32]).public(), "127.0.0.1:1"))
        .collect();
    Configuration::new(epoch, Params::with_f(1), members, None)
}

fn me() -> NodeId {
    Keypair::from_seed([30; 32]).node_id()
}

fn pulled(a: Option<FollowAction>) -> NodeId {
    match a {
        Some(FollowAction::Pull { to, after }) => {
            assert_eq!(after, 0);
            to
        }
        other => panic!("expected a pull, got {other:?}"),
    }
}

#[test]
fn pulls_once_per_period_from_another_member_and_elsewhere_at_once_after_a_failure() {
    let c = config(0, 5);
    let mut f = Follower::new(me(), 0, 2_000, 0);
    let first = pulled(f.on_timer(0, &c, 7));
    assert_ne!(first, me());
    assert!(f.on_timer(1_999, &c, 7).is_none(), "not before the period");
    assert_eq!(f.next_timer(), 2_000);
    // The pull fails: another member is asked at once, up to PULL_RETRIES times.
    let mut asked = vec![first];
    let mut last = first;
    for _ in 0..PULL_RETRIES {
        let next = pulled(f.failed(last, 10, &c, 7));
        assert!(
            !asked.contains(&next),
            "a member that just failed is not asked again"
        );
        asked.push(next);
        last = next;
    }
    assert!(
        f.failed(last, 20, &c, 7).is_none(),
        "then it waits for the period"
    );
    // A failure of a request that is not the pull changes nothing but health.
    assert!(f.failed(first, 30, &c, 7).is_none());
    // At the next period, members that failed lately are asked last.
    let next = pulled(f.on_timer(2_000, &c, 0));
    assert!(!asked.contains(&next));
    f.answered(next, 2_010);
    assert!(
        f.failed(next, 2_020, &c, 0).is_none(),
        "answered: no pull outstanding"
    );
}

#[test]
fn entering_a_newer_epoch_forwards_to_the_children_in_its_tree() {
    let mut f = Follower::new(me(), 2, 2_000, 0);
    assert!(f.entered(&config(2, 7)).is_none(), "not newer");
    let c = config(4, 7);
    let children: Vec<NodeId> = push_children(&c, &me()).into_iter().map(|m| m.id).collect();
    match f.entered(&c) {
        Some(FollowAction::Forward { to, after }) => {
            assert_eq!(after, 2, "everything after the epoch it was in");
            assert_eq!(to, children);
        }
        None => assert!(children.is_empty()),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.epoch(), 4);
    // Pulls now ask for what follows epoch 4.
    match f.on_timer(0, &c, 1) {
        Some(FollowAction::Pull { after, .. }) => assert_eq!(after, 4),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_message_of_a_later_epoch_makes_it_pull_from_the_sender() {
    let mut f = Follower::new(me(), 3, 2_000, 0);
    let other = NodeId([9; 32]);
    assert!(f.saw_epoch(other, 3).is_none());
    assert_eq!(
        f.saw_epoch(other, 5),
        Some(FollowAction::Pull {
            to: other,
            after: 3
        })
    );
}
