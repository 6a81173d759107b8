//! A node's MS submissions: one outstanding request with rising sequence numbers, sent again until
//! executed, void in another epoch, and a small queue.

use dbqsfs_core::crypto::{Keypair, NodeId};
use dbqsfs_core::ms::membership::MsOp;
use dbqsfs_core::ms::submissions::Submissions;

fn key() -> Keypair {
    Keypair::from_seed([7; 32])
}

fn probe(epoch: u64, target: u8, responsive: bool) -> MsOp {
    MsOp::Probe {
        epoch,
        target: NodeId([target; 32]),
        responsive,
    }
}

fn op_of(req: &dbqsfs_core::ms::pbft::Request) -> MsOp {
    postcard::from_bytes(&req.payload).unwrap()
}

#[test]
fn one_request_is_outstanding_and_sent_again_until_executed() {
    let k = key();
    let mut s = Submissions::new(1_000);
    assert!(s.push(MsOp::Leave { epoch: 3 }));
    assert!(s.push(MsOp::EndEpoch { epoch: 3 }));
    let first = s.poll(0, &k, 0).expect("the first operation goes at once");
    assert_eq!(op_of(&first), MsOp::Leave { epoch: 3 });
    assert!(first.verify().is_ok());
    // Not again before the period, and the next one waits behind it.
    assert!(s.poll(999, &k, 0).is_none());
    let again = s.poll(1_000, &k, 0).expect("sent again after the period");
    assert_eq!(again, first);
    // Another request executed does not release it; its own execution does.
    assert!(!s.executed(&[]));
    assert!(s.executed(std::slice::from_ref(&first)));
    let second = s
        .poll(1_001, &k, 0)
        .expect("the next goes once the first is executed");
    assert_eq!(op_of(&second), MsOp::EndEpoch { epoch: 3 });
    assert!(second.seq > first.seq);
    assert!(s.executed(std::slice::from_ref(&second)));
    assert!(s.poll(5_000, &k, 0).is_none());
    assert_eq!(s.pending().count(), 0);
}

#[test]
fn sequence_numbers_rise_above_the_floor_and_above_the_last() {
    let k = key();
    let mut s = Submissions::new(10);
    s.push(MsOp::Leave { epoch: 1 });
    let a = s.poll(0, &k, 5_000).unwrap();
    assert_eq!(a.seq, 5_000);
    s.executed(std::slice::from_ref(&a));
    s.push(MsOp::EndEpoch { epoch: 1 });
    // A floor that went back (a clock step) never gives a number at or below the last one.
    let b = s.poll(0, &k, 10).unwrap();
    assert_eq!(b.seq, 5_001);
}

#[test]
fn entering_an_epoch_voids_what_was_for_another() {
    let k = key();
    let mut s = Submissions::new(1_000);
    s.push(MsOp::Leave { epoch: 2 });
    s.push(probe(2, 9, false));
    s.push(probe(3, 9, false));
    let out = s.poll(0, &k, 0).unwrap();
    assert_eq!(op_of(&out), MsOp::Leave { epoch: 2 });
    s.enter_epoch(3);
    assert!(
        s.outstanding().is_none(),
        "the outstanding leave of epoch 2 is void"
    );
    assert_eq!(
        s.pending().cloned().collect::<Vec<_>>(),
        vec![probe(3, 9, false)]
    );
    let next = s.poll(1, &k, 0).unwrap();
    assert!(next.seq > out.seq);
}

#[test]
fn the_queue_keeps_one_verdict_per_member_and_one_end_of_the_epoch() {
    let k = key();
    let mut s = Submissions::new(1_000);
    assert!(s.push(MsOp::EndEpoch { epoch: 4 }));
    let _ = s.poll(0, &k, 0).unwrap();
    // One end of the epoch, outstanding or queued, is enough.
    assert!(!s.push(MsOp::EndEpoch { epoch: 4 }));
    assert!(s.push(probe(4, 1, false)));
    assert!(s.push(probe(4, 2, false)));
    // A newer verdict about member 1 replaces the queued one, in place of queuing both.
    assert!(s.push(probe(4, 1, true)));
    assert!(
        !s.push(probe(4, 1, true)),
        "the same operation is not queued twice"
    );
    assert_eq!(
        s.pending().cloned().collect::<Vec<_>>(),
        vec![
            MsOp::EndEpoch { epoch: 4 },
            probe(4, 2, false),
            probe(4, 1, true)
        ]
    );
    assert!(s.has(|o| matches!(o, MsOp::EndEpoch { .. })));
    assert!(!s.has(|o| matches!(o, MsOp::Leave { .. })));
}

fn complaint(epoch: u64, against: u8) -> MsOp {
    use dbqsfs_core::ms::key::{Complaint, KeyOp, Proof};
    MsOp::Key {
        epoch,
        op: Box::new(KeyOp::Complaint(Complaint {
            against: NodeId([against; 32]),
            shared: [0; 32],
            proof: Proof {
                c: [0; 32],
                z: [0; 32],
            },
        })),
    }
}

/// The epoch cannot end before the MS key moved: the key's operations go before the probe
/// verdicts queued earlier, in the order they came, behind only the request outstanding.
#[test]
fn the_keys_operations_go_before_the_others() {
    let k = key();
    let mut s = Submissions::new(1_000);
    s.push(probe(4, 1, false));
    s.push(probe(4, 2, false));
    s.push(MsOp::EndEpoch { epoch: 4 });
    s.push(complaint(4, 7));
    s.push(complaint(4, 8));
    let order: Vec<MsOp> = s.pending().cloned().collect();
    assert_eq!(
        order,
        vec![
            complaint(4, 7),
            complaint(4, 8),
            probe(4, 1, false),
            probe(4, 2, false),
            MsOp::EndEpoch { epoch: 4 },
        ]
    );
    // Behind the outstanding request, never in its place.
    let first = s.poll(0, &k, 0).unwrap();
    s.push(complaint(4, 9));
    assert_eq!(op_of(&first), complaint(4, 7));
    assert_eq!(
        s.pending().cloned().collect::<Vec<_>>()[..3],
        [complaint(4, 7), complaint(4, 8), complaint(4, 9)]
    );
}
