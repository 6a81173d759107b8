//! Replica health as one requester sees it: whom to ask first, and how long to wait before asking
//! another.
//!
//! Goals: a request that needs one good answer (a content read) goes first to the replica most
//! likely to give it, and a slow, dead or lying replica costs a short, adaptive hedge delay instead
//! of a retransmission timeout.
//! - Each replica has a penalty: it rises when the replica leaves a request unanswered past the
//!   hedge delay ([`Health::slow`]) or fails outright (a wrong or undecodable answer, a transport
//!   error: [`Health::failed`]), halves on each good answer, and halves every [`HALF_LIFE_MS`], so a
//!   replica that recovers is asked first again within seconds.
//! - The hedge delay follows the latency of good answers as TCP's retransmission timer does
//!   (`srtt + 4·rttvar`, RFC 6298), within bounds the caller gives.
//!
//! Non-goals: safety. Health decides only whom to ask and when; every answer is still checked and
//! counted by the quorum rules, so a replica that games its score gains nothing but being asked.
//!
//! Fault model: any replica may be slow, silent or lying; time is the caller's `now` (milliseconds).

use crate::crypto::NodeId;
use std::collections::BTreeMap;

/// A penalty halves after this long without news of the replica.
pub const HALF_LIFE_MS: u64 = 10_000;
/// What a request left unanswered past the hedge delay adds to the penalty.
const SLOW: u32 = 4;
/// What a wrong answer or a failed request adds.
const FAILED: u32 = 16;
/// Penalties stop growing here (a replica dead for long is asked again within minutes of recovering).
const MAX_PENALTY: u32 = 1 << 12;

/// Health of the replicas one requester talks to.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Penalty and when it was last updated.
    penalties: BTreeMap<NodeId, (u32, u64)>,
    /// Smoothed latency of good answers and its mean deviation (milliseconds), once one was seen.
    srtt: Option<(u64, u64)>,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    /// The penalty of `n` at `now` (0: nothing against it).
    pub fn penalty(&self, n: &NodeId, now: u64) -> u32 {
        self.penalties
            .get(n)
            .map_or(0, |&(p, at)| decayed(p, at, now))
    }

    fn add(&mut self, n: NodeId, now: u64, delta: u32) {
        let p = self.penalty(&n, now).saturating_add(delta).min(MAX_PENALTY);
        self.penalties.insert(n, (p, now));
    }

    /// `n` left a request unanswered past the hedge delay.
    pub fn slow(&mut self, n: NodeId, now: u64) {
        self.add(n, now, SLOW);
    }

    /// `n` answered wrongly, undecodably, or the request to it failed in transport.
    pub fn failed(&mut self, n: NodeId, now: u64) {
        self.add(n, now, FAILED);
    }

    /// `n` gave a good answer `latency_ms` after it was asked.
    pub fn answered(&mut self, n: NodeId, now: u64, latency_ms: u64) {
        self.good(n, now);
        self.srtt = Some(match self.srtt {
            None => (latency_ms, latency_ms / 2),
            Some((srtt, var)) => {
                let var = (3 * var + srtt.abs_diff(latency_ms)) / 4;
                ((7 * srtt + latency_ms) / 8, var)
            }
        });
    }

    /// `n` gave a good answer (its latency unknown or beside the point): its penalty halves.
    pub fn good(&mut self, n: NodeId, now: u64) {
        let p = self.penalty(&n, now) / 2;
        if p == 0 {
            self.penalties.remove(&n);
        } else {
            self.penalties.insert(n, (p, now));
        }
    }

    /// How long to wait for an answer before asking another replica: `srtt + 4·rttvar` of good
    /// answers, within `[min, max]` (before any answer was seen, `10·min` within the same bounds).
    pub fn hedge_delay(&self, min: u64, max: u64) -> u64 {
        let d = match self.srtt {
            None => min.saturating_mul(10),
            Some((srtt, var)) => srtt.saturating_add(var.saturating_mul(4)),
        };
        d.clamp(min, max.max(min))
    }

    /// `candidates` healthiest first; ties keep the order of `candidates` rotated by `rotate`, so
    /// requests with different `rotate` spread over equally healthy replicas.
    pub fn order(&self, candidates: &[NodeId], rotate: usize, now: u64) -> Vec<NodeId> {
        let n = candidates.len().max(1);
        let mut keyed: Vec<(u32, usize, NodeId)> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (self.penalty(c, now), (i + n - rotate % n) % n, *c))
            .collect();
        keyed.sort();
        keyed.into_iter().map(|(_, _, c)| c).collect()
    }
}

fn decayed(p: u32, at: u64, now: u64) -> u32 {
    let halvings = now.saturating_sub(at) / HALF_LIFE_MS;
    if halvings >= 32 {
        0
    } else {
        p >> halvings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId([b; 32])
    }

    #[test]
    fn a_failed_replica_is_asked_last_until_its_penalty_decays() {
        let mut h = Health::new();
        let all = [id(1), id(2), id(3), id(4)];
        assert_eq!(h.order(&all, 0, 0), all.to_vec());
        h.failed(id(1), 0);
        assert_eq!(h.order(&all, 0, 0)[3], id(1));
        assert_eq!(
            h.order(&all, 0, HALF_LIFE_MS * 3)[3],
            id(1),
            "16 >> 3 = 2 still counts"
        );
        assert_eq!(
            h.order(&all, 0, HALF_LIFE_MS * 5)[0],
            id(1),
            "forgiven after 5 half-lives"
        );
    }

    #[test]
    fn ties_rotate_so_load_spreads() {
        let h = Health::new();
        let all = [id(1), id(2), id(3), id(4)];
        let firsts: Vec<NodeId> = (0..4).map(|r| h.order(&all, r, 0)[0]).collect();
        assert_eq!(firsts, vec![id(1), id(2), id(3), id(4)]);
    }

    #[test]
    fn good_answers_halve_the_penalty() {
        let mut h = Health::new();
        h.slow(id(1), 0);
        h.slow(id(1), 0);
        assert_eq!(h.penalty(&id(1), 0), 8);
        h.answered(id(1), 0, 5);
        assert_eq!(h.penalty(&id(1), 0), 4);
    }

    #[test]
    fn the_hedge_delay_follows_latency_within_bounds() {
        let mut h = Health::new();
        assert_eq!(
            h.hedge_delay(20, 2000),
            200,
            "nothing seen yet: ten times the minimum"
        );
        for _ in 0..50 {
            h.answered(id(1), 0, 10);
        }
        let d = h.hedge_delay(20, 2000);
        assert!((20..=40).contains(&d), "steady 10 ms answers: {d}");
        for _ in 0..50 {
            h.answered(id(1), 0, 1);
        }
        assert_eq!(h.hedge_delay(20, 2000), 20, "never below the minimum");
        h.answered(id(1), 0, 100_000);
        assert_eq!(h.hedge_delay(20, 2000), 2000, "never above the maximum");
    }
}
