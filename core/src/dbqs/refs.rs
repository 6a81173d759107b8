//! Who holds a content block: owners' signed references, and when a block may go.
//!
//! A content block is kept on behalf of owners. An owner that puts a block signs a [`RefRecord`]
//! that *holds* it; an owner that no longer needs it signs one that *releases* it. Each record
//! carries the owner's sequence number, and per owner only the record with the highest one counts
//! ([`merge`]): an owner that releases a block and later puts the same content again (a higher
//! number) keeps it, and a replayed older record changes nothing. The owner numbers its records of
//! one block in the order it means them (a volume's writer numbers them from its commit sequence);
//! on a tie, a hold wins, so that ambiguity never loses data.
//!
//! A block is *released* when it has records and none of them holds it ([`released`]); a replica
//! deletes a released block's data after a grace period ([`super::replica::Replica::sweep`]) and keeps
//! the records as tombstones, so that a replayed put of an old hold cannot bring it back (it is
//! refused, [`super::msg::Reject::Superseded`], so an owner whose numbering went back learns it
//! rather than being acknowledged for nothing). Every put carries a hold. A replica takes a
//! client's release only from an owner whose record it has, so a block stored before owners signed
//! their puts (without any record) is kept whoever releases it; a state transfer brings every
//! record a quorum has.
//!
//! Records are signed by the owner ([`crate::crypto::Domain::BlockRef`]) so that a replica can
//! check a client's release, and a new replica can check the records a state transfer hands it:
//! a Byzantine replica can withhold records or replay old ones but not forge them. A transfer takes
//! the union of the records of `2f+1` old replicas (every completed hold and release reached a
//! correct one among them), merged by the same rule.

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

    /// Whether this record counts over `other` (of the same owner and block).
    fn supersedes(&self, other: &RefRecord) -> bool {
        (self.seq, self.hold) > (other.seq, other.hold)
    }
}

/// Merges `new` into `held` (the records of one block, at most one per owner, ordered by owner):
/// per owner the record with the highest `seq` stays (a hold over a release of the same `seq`).
/// Records of another block are ignored; signatures are the caller's to check. Returns whether
/// `held` changed.
pub fn merge(held: &mut Vec<RefRecord>, id: &ObjectId, new: &[RefRecord]) -> bool {
    let mut changed = false;
    for r in new.iter().filter(|r| r.id == *id) {
        match held.binary_search_by(|h| h.owner.cmp(&r.owner)) {
            Ok(i) if r.supersedes(&held[i]) => {
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

/// Whether a block with these records may be deleted: it has records, and no owner holds it.
pub fn released(records: &[RefRecord]) -> bool {
    !records.is_empty() && records.iter().all(|r| !r.hold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Keypair {
        Keypair::from_seed([n; 32])
    }

    #[test]
    fn the_highest_seq_of_each_owner_counts_whatever_the_order() {
        let (a, b) = (key(1), key(2));
        let id = ObjectId([9; 32]);
        let recs = [
            RefRecord::hold(&a, id, 1),
            RefRecord::release(&a, id, 2),
            RefRecord::hold(&a, id, 3),
            RefRecord::hold(&b, id, 1),
            RefRecord::release(&b, id, 5),
        ];
        // Every order of merging gives the same result: a holds (seq 3), b released (seq 5).
        for rot in 0..recs.len() {
            let mut held = Vec::new();
            for i in 0..recs.len() {
                merge(&mut held, &id, &[recs[(i + rot) % recs.len()].clone()]);
            }
            assert_eq!(held.len(), 2);
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
    fn a_hold_wins_a_tie_and_other_blocks_records_are_ignored() {
        let a = key(1);
        let id = ObjectId([9; 32]);
        let mut held = vec![RefRecord::release(&a, id, 7)];
        assert!(merge(&mut held, &id, &[RefRecord::hold(&a, id, 7)]));
        assert!(!released(&held));
        assert!(!merge(&mut held, &id, &[RefRecord::release(&a, id, 7)]));
        assert!(!merge(
            &mut held,
            &id,
            &[RefRecord::release(&a, ObjectId([8; 32]), 9)]
        ));
        assert!(!released(&[]), "a block nobody claimed is kept");
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
