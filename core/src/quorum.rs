//! All quorum arithmetic of dbqsfs, in one place.
//!
//! A replica group has `n = 3f+1` members and tolerates `f` Byzantine ones. A quorum is `2f+1`: two
//! quorums intersect in at least `f+1` members, so at least one correct member is in both. `f+1` replies
//! contain at least one from a correct member. The MS committee uses the same arithmetic with `f_ms`.
//!
//! [`Tally`] counts each sender once and returns a conflicting second vote as evidence instead of
//! overwriting the first.

use crate::crypto::NodeId;
use std::collections::BTreeMap;

/// The thresholds of a group that tolerates `f` faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quorum {
    f: usize,
}

impl Quorum {
    pub const fn new(f: usize) -> Self {
        Quorum { f }
    }
    /// Faults tolerated.
    pub const fn f(&self) -> usize {
        self.f
    }
    /// Group size: `3f+1`.
    pub const fn group_size(&self) -> usize {
        3 * self.f + 1
    }
    /// Replies needed for a read or write to complete: `2f+1`.
    pub const fn quorum(&self) -> usize {
        2 * self.f + 1
    }
    /// Replies that include at least one correct member: `f+1`.
    pub const fn one_correct(&self) -> usize {
        self.f + 1
    }
    /// The smallest number of members two quorums of a group share.
    pub const fn intersection(&self) -> usize {
        2 * self.quorum() - self.group_size()
    }
}

/// What adding a vote did.
#[derive(Debug, PartialEq, Eq)]
pub enum Vote<V> {
    /// The first vote of this sender.
    New,
    /// The sender repeated its vote.
    Duplicate,
    /// The sender voted differently before: both votes, as evidence. The first vote stands.
    Conflict { first: V, second: V },
}

/// Votes keyed by sender; each sender counts once.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Tally<V> {
    votes: BTreeMap<NodeId, V>,
}

impl<V> Default for Tally<V> {
    fn default() -> Self {
        Tally {
            votes: BTreeMap::new(),
        }
    }
}

impl<V: Clone + PartialEq> Tally<V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, from: NodeId, vote: V) -> Vote<V> {
        match self.votes.get(&from) {
            None => {
                self.votes.insert(from, vote);
                Vote::New
            }
            Some(v) if *v == vote => Vote::Duplicate,
            Some(v) => Vote::Conflict {
                first: v.clone(),
                second: vote,
            },
        }
    }

    /// Number of distinct senders.
    pub fn len(&self) -> usize {
        self.votes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.votes.is_empty()
    }

    pub fn contains(&self, from: &NodeId) -> bool {
        self.votes.contains_key(from)
    }

    /// Senders whose vote satisfies `pred`.
    pub fn count(&self, pred: impl Fn(&V) -> bool) -> usize {
        self.votes.values().filter(|v| pred(v)).count()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &V)> {
        self.votes.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.votes.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thresholds as a truth table: f, group size, quorum, one-correct, intersection.
    const TABLE: &[(usize, usize, usize, usize, usize)] = &[
        // f  n  q  f+1  q∩q
        (0, 1, 1, 1, 1),
        (1, 4, 3, 2, 2),
        (2, 7, 5, 3, 3),
        (3, 10, 7, 4, 4),
        (4, 13, 9, 5, 5),
    ];

    #[test]
    fn thresholds_match_the_table() {
        for &(f, n, q, one, inter) in TABLE {
            let qu = Quorum::new(f);
            assert_eq!(
                (
                    qu.group_size(),
                    qu.quorum(),
                    qu.one_correct(),
                    qu.intersection()
                ),
                (n, q, one, inter),
                "f={f}"
            );
        }
    }

    #[test]
    fn two_quorums_always_share_a_correct_member() {
        for f in 0..20 {
            let q = Quorum::new(f);
            // The intersection has f+1 members; at most f are faulty.
            assert!(q.intersection() > f, "f={f}");
            // A quorum can always be formed from the correct members alone (liveness).
            assert!(q.group_size() - f >= q.quorum(), "f={f}");
        }
    }

    /// Truth table of quorum membership for f=1: (replies, reaches quorum, has one correct).
    #[test]
    fn reply_counts_for_f1() {
        let q = Quorum::new(1);
        let table = [
            (0, false, false),
            (1, false, false),
            (2, false, true),
            (3, true, true),
            (4, true, true),
        ];
        for (replies, quorum, one) in table {
            assert_eq!(replies >= q.quorum(), quorum, "replies={replies}");
            assert_eq!(replies >= q.one_correct(), one, "replies={replies}");
        }
    }

    #[test]
    fn tally_counts_each_sender_once_and_keeps_conflicts_as_evidence() {
        let a = NodeId([1; 32]);
        let b = NodeId([2; 32]);
        let mut t = Tally::new();
        assert_eq!(t.add(a, 5), Vote::New);
        assert_eq!(t.add(a, 5), Vote::Duplicate);
        assert_eq!(
            t.add(a, 6),
            Vote::Conflict {
                first: 5,
                second: 6
            }
        );
        assert_eq!(t.add(b, 6), Vote::New);
        assert_eq!(t.len(), 2);
        assert_eq!(t.count(|v| *v == 5), 1, "the first vote stands");
    }
}
