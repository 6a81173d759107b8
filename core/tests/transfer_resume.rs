//! Resuming a state transfer after a crash: units persisted as done are skipped (not listed or
//! fetched again), announced done, and only the rest is transferred.

use dbqsfs_core::config::{Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, ObjectId};
use dbqsfs_core::dbqs::transfer::{plan, Arc, Transfer, TransferOptions, TransferOutput};
use dbqsfs_core::object::content_id;
use dbqsfs_core::wire::decode;

fn keys(n: u8) -> Vec<Keypair> {
    (0..n).map(|i| Keypair::from_seed([i + 90; 32])).collect()
}

fn config(epoch: u64, ks: &[Keypair], prev: Option<[u8; 32]>) -> Configuration {
    let members = ks
        .iter()
        .map(|k| Member::new(k.public(), "127.0.0.1:1"))
        .collect();
    Configuration::new(epoch, Params::with_f(1), members, prev)
}

#[test]
fn covers_is_arc_containment_on_the_ring() {
    let a = |s: u8, e: u8| Arc {
        start: [s; 32],
        end: [e; 32],
    };
    assert!(a(10, 50).covers(&a(10, 50)));
    assert!(a(10, 50).covers(&a(10, 20)));
    assert!(a(10, 50).covers(&a(20, 50)));
    assert!(a(10, 50).covers(&a(20, 30)));
    assert!(!a(10, 50).covers(&a(5, 30)));
    assert!(!a(10, 50).covers(&a(20, 60)));
    assert!(!a(10, 50).covers(&a(50, 60)));
    assert!(
        !a(10, 50).covers(&a(30, 20)),
        "the complement-like arc wraps around"
    );
    assert!(!a(10, 50).covers(&a(7, 7)), "the whole ring");
    // Across the top of the ring.
    assert!(a(200, 20).covers(&a(210, 250)));
    assert!(a(200, 20).covers(&a(250, 10)));
    assert!(a(200, 20).covers(&a(200, 20)));
    assert!(!a(200, 20).covers(&a(100, 10)));
    assert!(!a(200, 20).covers(&a(10, 210)));
    assert!(a(7, 7).covers(&a(1, 2)));
    // Against membership: every point of a covered arc is in the covering one.
    for (outer, inner) in [(a(10, 50), a(20, 30)), (a(200, 20), a(250, 10))] {
        for i in 0..=255u8 {
            let x = ObjectId([i; 32]);
            if inner.contains(&x) {
                assert!(outer.contains(&x));
            }
        }
    }
}

#[test]
fn skipped_units_are_announced_done_and_never_requested() {
    let ks = keys(8);
    let prev = config(0, &ks[..7], None);
    let next = config(1, &ks, Some(prev.hash()));
    let me = ks[7].node_id();
    let units = plan(&prev, &next, &me, true);
    assert!(units.len() >= 2, "a joining node has several units here");
    let done = units[0].arc;

    let mut t = Transfer::new(&prev, &next, &me, true, TransferOptions::default());
    assert_eq!(t.skip(&done), 1);
    t.start(0);
    let mut announced = Vec::new();
    let mut listed = Vec::new();
    while let Some(out) = t.poll_output() {
        match out {
            TransferOutput::UnitDone { arc, .. } => announced.push(arc),
            TransferOutput::Send { bytes, .. } => {
                let env = decode::<dbqsfs_core::dbqs::transfer::TransferMessage>(&bytes).unwrap();
                if let dbqsfs_core::dbqs::transfer::TransferMessage::List { arc, .. } = env.msg {
                    listed.push(arc);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(announced, vec![done]);
    assert!(!listed.is_empty());
    assert!(
        !listed.contains(&done),
        "a skipped unit is not listed again"
    );
    assert_eq!(t.progress(), (1, units.len(), 0));

    // Skipping every unit completes the transfer at once.
    let mut t = Transfer::new(&prev, &next, &me, true, TransferOptions::default());
    let whole = Arc {
        start: [0; 32],
        end: [0; 32],
    };
    assert_eq!(t.skip(&whole), units.len());
    t.start(0);
    let outs: Vec<TransferOutput> = std::iter::from_fn(|| t.poll_output()).collect();
    assert!(matches!(
        outs.last(),
        Some(TransferOutput::Complete { epoch: 1 })
    ));
    assert!(t.is_complete());

    // An arc that covers no unit skips nothing.
    let mut t = Transfer::new(&prev, &next, &me, true, TransferOptions::default());
    let x = content_id(b"a point");
    let tiny = Arc {
        start: x.0,
        end: {
            let mut e = x.0;
            e[31] = e[31].wrapping_add(1);
            e
        },
    };
    assert_eq!(t.skip(&tiny), 0);
}
