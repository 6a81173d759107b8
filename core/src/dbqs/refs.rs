//! Who holds a content block: owners' signed references, and when a block may go.
//!
//! A content block is kept on behalf of owners. An owner that puts a block signs a [`RefRecord`]
//! that *holds* it; an owner that no longer needs it signs one that *releases* it. Each record
//! carries the owner's sequence number. Per owner a replica keeps its highest hold and its highest
//! release ([`merge`]), and the owner holds the block while its hold is at least as high as its
//! release ([`holding`]; a tie goes to the hold, so that ambiguity never loses data): an owner that
//! releases a block and later puts the same content again (a higher number) keeps it, and a
//! replayed older record changes nothing. The owner numbers its records of one block in the order
//! it means them.
//!
//! A block is *released* when some owner held it and none holds it now ([`released`]): a signed
//! hold proves the block was claimed, so a release by a key that never held the block (a thief's,
//! or anyone's of a block stored before owners signed their puts) lets nothing go. A replica
//! deletes a released block's data after a grace period ([`super::replica::Replica::sweep`]) and
//! keeps the records as tombstones, so that a replayed put of an old hold cannot bring it back (it
//! is refused, [`super::msg::Reject::Superseded`], so an owner whose numbering went back learns it
//! rather than being acknowledged for nothing).
//!
//! Records are signed by the owner ([`crate::crypto::Domain::BlockRef`]) so that a replica can
//! check a client's release, and a new replica can check the records a state transfer hands it:
//! a Byzantine replica can withhold records or replay old ones but not forge them. Every replica
//! records every valid hold and release it is sent, so a completed one is on `f+1` correct members
//! of any `2f+1`; a transfer takes the union of the records of `2f+1` old replicas, merged by the
//! same rule.

use crate::crypto::{CryptoError, Domain, Keypair, ObjectId, PublicKey, Signature};
use serde::{Deserialize, Serialize};

/// An owner's signed hold or release of content block `id`, as of the owner's `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefRecord {
    pub owner: PublicKey,
    pub id: ObjectId,
    pub seq: u64,
    /// `true`: the owner holds the block; `false`: it releases it.
    pub hold: bool,
    pub signature: Signature,
}

fn body(id: &ObjectId, seq: u64, hold: bool) -> [u8; 41] {
    let mut b = [0u8; 41];
    b[..32].copy_from_slice(&id.0);
    b[32..40].copy_from_slice(&seq.to_le_bytes());
    b[40] = hold as u8;
    b
}

impl RefRecord {
    /// `owner` holds content block `id` as of `seq`.
    pub fn hold(owner: &Keypair, id: ObjectId, seq: u64) -> RefRecord {
        Self::sign(owner, id, seq, true)
    }

    /// `owner` releases content block `id` as of `seq`.
    pub fn release(owner: &Keypair, id: ObjectId, seq: u64) -> RefRecord {
        Self::sign(owner, id, seq, false)
    }

    fn sign(owner: &Keypair, id: ObjectId, seq: u64, hold: bool) -> RefRecord {
        RefRecord {
            owner: owner.public(),
            id,
            seq,
            hold,
            signature: owner.sign(Domain::BlockRef, &body(&id, seq, hold)),
        }
    }

    /// Checks the owner's signature.
    pub fn verify(&self) -> Result<(), CryptoError> {
        self.owner.verify(
            Domain::BlockRef,
            &body(&self.id, self.seq, self.hold),
            &self.signature,
        )
    }
}

/// Merges `new` into `held` (the records of one block, ordered by owner then kind, at most a hold
/// and a release per owner): per owner and kind the record with the highest `seq` stays. Records
/// of another block are ignored; signatures are the caller's to check. Returns whether `held`
/// changed.
pub fn merge(held: &mut Vec<RefRecord>, id: &ObjectId, new: &[RefRecord]) -> bool {
    let mut changed = false;
    for r in new.iter().filter(|r| r.id == *id) {
        match held.binary_search_by(|h| (h.owner, h.hold).cmp(&(r.owner, r.hold))) {
            Ok(i) if r.seq > held[i].seq => {
                held[i] = r.clone();
                changed = true;
            }
            Ok(_) => {}
            Err(i) => {
                held.insert(i, r.clone());
                changed = true;
            }
        }
    }
    changed
}

/// The highest hold and release of `owner` among a block's records.
fn of_owner(records: &[RefRecord], owner: &PublicKey) -> (Option<u64>, Option<u64>) {
    let seq = |hold: bool| {
        records
            .iter()
            .filter(|r| r.owner == *owner && r.hold == hold)
            .map(|r| r.seq)
            .max()
    };
    (seq(true), seq(false))
}

/// Whether `owner` holds the block: it has a hold at least as high as its release.
pub fn holding(records: &[RefRecord], owner: &PublicKey) -> bool {
    match of_owner(records, owner) {
        (Some(h), Some(r)) => h >= r,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Whether a block with these records may be deleted: some owner held it, and none holds it now.
pub fn released(records: &[RefRecord]) -> bool {
    let mut held_once = false;
    for r in records.iter().filter(|r| r.hold) {
        held_once = true;
        if holding(records, &r.owner) {
            return false;
        }
    }
    held_once
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Keypair {
        Keypair::from_seed([n; 32])
    }

    #[test]
    fn the_highest_hold_and_release_of_each_owner_count_whatever_the_order() {
        let (a, b) = (key(1), key(2));
        let id = ObjectId([9; 32]);
        let recs = [
            RefRecord::hold(&a, id, 1),
            RefRecord::release(&a, id, 2),
            RefRecord::hold(&a, id, 3),
            RefRecord::hold(&b, id, 1),
            RefRecord::release(&b, id, 5),
        ];
        // Every order of merging gives the same result: a holds (3 > 2), b released (5 > 1).
        for rot in 0..recs.len() {
            let mut held = Vec::new();
            for i in 0..recs.len() {
                merge(&mut held, &id, &[recs[(i + rot) % recs.len()].clone()]);
            }
            assert_eq!(held.len(), 4, "a hold and a release per owner");
            assert!(holding(&held, &a.public()) && !holding(&held, &b.public()));
            assert!(!released(&held));
            let replay = recs[1].clone();
            assert!(
                !merge(&mut held, &id, &[replay]),
                "a replayed release is old"
            );
            assert!(merge(&mut held, &id, &[RefRecord::release(&a, id, 4)]));
            assert!(released(&held));
        }
    }

    #[test]
    fn a_hold_wins_a_tie_and_a_release_without_a_hold_lets_nothing_go() {
        let (a, thief) = (key(1), key(3));
        let id = ObjectId([9; 32]);
        let mut held = vec![RefRecord::release(&a, id, 7)];
        assert!(
            !released(&held),
            "nobody ever held it: a block stored before holds"
        );
        assert!(merge(&mut held, &id, &[RefRecord::hold(&a, id, 7)]));
        assert!(!released(&held), "the tie goes to the hold");
        assert!(!merge(
            &mut held,
            &id,
            &[RefRecord::release(&a, ObjectId([8; 32]), 9)]
        ));
        assert!(merge(&mut held, &id, &[RefRecord::release(&a, id, 8)]));
        assert!(released(&held));
        let mut other = vec![RefRecord::hold(&a, id, 1)];
        merge(&mut other, &id, &[RefRecord::release(&thief, id, 99)]);
        assert!(!released(&other), "a thief's release lets go of nothing");
        assert!(!released(&[]));
    }

    #[test]
    fn signatures_bind_owner_block_seq_and_kind() {
        let a = key(1);
        let r = RefRecord::release(&a, ObjectId([9; 32]), 4);
        assert!(r.verify().is_ok());
        for f in [
            |r: &mut RefRecord| r.seq += 1,
            |r: &mut RefRecord| r.hold = true,
            |r: &mut RefRecord| r.id = ObjectId([8; 32]),
            |r: &mut RefRecord| r.owner = Keypair::from_seed([2; 32]).public(),
        ] {
            let mut bad = r.clone();
            f(&mut bad);
            assert!(bad.verify().is_err());
        }
    }
}
