//! The request scheduler of the transfer worker: which request leaves next, and when.
//!
//! Goals: on-demand fetches (a read waits for them) go first; the others leave round-robin over
//! sources, within a bound on requests in flight (overall and per source) and, when a rate cap is
//! in force, a token bucket of bytes; a source whose request failed in transport is sent nothing
//! for a while (the backoff doubles while it stays unreachable); a source with requests in flight
//! that answers nothing for [`SILENT_AFTER`] counts as unreachable.
//!
//! Non-goals: sending (the worker's), what the requests mean (the core's transfer machines), and
//! the clock: every method takes `now`, so the scheduler runs the same under a fake clock.
//!
//! A reply's size is known only when it arrives, so a request reserves the expected size (a
//! moving average of the replies) and the difference is settled when its reply comes (the balance
//! may go negative). Not `governor`: its GCRA takes a known cost up front and a fixed quota, while
//! the cap here switches with client load without losing the balance.

use dbqsfs_core::config::Epoch;
use dbqsfs_core::crypto::NodeId;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// A source unreachable in transport is sent nothing for at least this long.
pub(super) const MIN_DOWN: Duration = Duration::from_secs(1);
/// ... and at most this long (the backoff doubles up to it while it stays unreachable).
pub(super) const MAX_DOWN: Duration = Duration::from_secs(16);
/// A source with requests in flight that answers nothing for this long is treated as
/// unreachable (its requests still run to their timeout; nothing more waits for it).
pub(super) const SILENT_AFTER: Duration = Duration::from_secs(3);

/// A request waiting to be sent, for the run (`epoch`, `gen`) that asked it.
#[derive(Debug)]
pub(super) struct Waiting {
    pub epoch: Epoch,
    pub gen: u64,
    pub bytes: Vec<u8>,
}

/// A request the scheduler lets go now.
#[derive(Debug)]
pub(super) struct Go {
    pub to: NodeId,
    pub req: Waiting,
    /// Bytes reserved in the bucket for its reply (settled by [`Scheduler::replied`]).
    pub reserved: f64,
    /// It came from the urgent queue (it was never counted as queued by its run).
    pub urgent: bool,
}

pub(super) struct Scheduler {
    /// This node (its requests to itself are served locally and never count as silent).
    me: NodeId,
    max_requests: usize,
    per_peer: usize,
    queues: BTreeMap<NodeId, VecDeque<Waiting>>,
    urgent: VecDeque<(NodeId, Waiting)>,
    /// Requests sent and not yet consumed (a reply held back counts until it is released).
    inflight: usize,
    inflight_peer: BTreeMap<NodeId, usize>,
    last_peer: Option<NodeId>,
    /// Until when nothing is sent to a source, and the backoff that set it.
    down: BTreeMap<NodeId, (Instant, Duration)>,
    /// When each source last answered (or, if it had nothing in flight, was sent a request).
    heard: BTreeMap<NodeId, Instant>,
    tokens: f64,
    tokens_at: Instant,
    reply_estimate: f64,
}

impl Scheduler {
    /// At most `max_requests` in flight, `per_peer` to one source; replies are expected to be
    /// about `reply_estimate` bytes until some arrive.
    pub(super) fn new(
        me: NodeId,
        max_requests: usize,
        per_peer: usize,
        reply_estimate: f64,
        now: Instant,
    ) -> Scheduler {
        Scheduler {
            me,
            max_requests: max_requests.max(1),
            per_peer: per_peer.max(1),
            queues: BTreeMap::new(),
            urgent: VecDeque::new(),
            inflight: 0,
            inflight_peer: BTreeMap::new(),
            last_peer: None,
            down: BTreeMap::new(),
            heard: BTreeMap::new(),
            tokens: 0.0,
            tokens_at: now,
            reply_estimate,
        }
    }

    pub(super) fn push(&mut self, to: NodeId, req: Waiting) {
        self.queues.entry(to).or_default().push_back(req);
    }

    pub(super) fn push_urgent(&mut self, to: NodeId, req: Waiting) {
        self.urgent.push_back((to, req));
    }

    /// Requests in flight (sent and not released).
    #[cfg(test)]
    pub(super) fn inflight(&self) -> usize {
        self.inflight
    }

    pub(super) fn is_down(&self, n: &NodeId, now: Instant) -> bool {
        self.down.get(n).is_some_and(|(until, _)| now < *until)
    }

    /// The next request to send at `now`, charged to the bounds and the bucket: urgent ones
    /// first, whatever the bounds; then round-robin over sources while fewer than the bounds are
    /// in flight, `writes_full` is false and the bucket (under `cap` bytes/s) is not empty.
    /// Requests for which `live` is false (their run was abandoned) are dropped on the way.
    pub(super) fn next(
        &mut self,
        now: Instant,
        cap: Option<u64>,
        writes_full: bool,
        live: impl Fn(&Waiting) -> bool,
    ) -> Option<Go> {
        while let Some((to, req)) = self.urgent.pop_front() {
            if self.is_down(&to, now) || !live(&req) {
                continue; // the machine asks again, elsewhere, at its next timeout
            }
            return Some(self.charge(to, req, true, now));
        }
        loop {
            if self.inflight >= self.max_requests || writes_full {
                return None;
            }
            if let Some(rate) = cap {
                let burst = (rate as f64 / 10.0).max(self.reply_estimate);
                self.tokens = (self.tokens
                    + now.saturating_duration_since(self.tokens_at).as_secs_f64() * rate as f64)
                    .min(burst);
                self.tokens_at = now;
                if self.tokens <= 0.0 {
                    return None;
                }
            } else {
                // No cap now: the bucket starts empty when one comes into force.
                self.tokens = 0.0;
                self.tokens_at = now;
            }
            let per_peer = self.per_peer;
            let inflight_peer = &self.inflight_peer;
            let ready = |n: &NodeId, q: &VecDeque<Waiting>| {
                !q.is_empty() && inflight_peer.get(n).copied().unwrap_or(0) < per_peer
            };
            let after = self.last_peer;
            let pick = self
                .queues
                .iter()
                .filter(|(n, _)| after.is_none_or(|a| **n > a))
                .find(|(n, q)| ready(n, q))
                .or_else(|| self.queues.iter().find(|(n, q)| ready(n, q)))
                .map(|(n, _)| *n);
            let Some(to) = pick else {
                self.queues.retain(|_, q| !q.is_empty());
                return None;
            };
            self.last_peer = Some(to);
            let Some(req) = self.queues.get_mut(&to).and_then(VecDeque::pop_front) else {
                continue;
            };
            if !live(&req) {
                continue;
            }
            return Some(self.charge(to, req, false, now));
        }
    }

    fn charge(&mut self, to: NodeId, req: Waiting, urgent: bool, now: Instant) -> Go {
        let reserved = self.reply_estimate;
        self.tokens -= reserved;
        self.inflight += 1;
        let busy = self.inflight_peer.entry(to).or_default();
        if *busy == 0 {
            self.heard.insert(to, now);
        }
        *busy += 1;
        Go {
            to,
            req,
            reserved,
            urgent,
        }
    }

    /// The reply of a request to `to` came back at `now` (`got`: its size, `None` if nothing
    /// came), or the transport failed (`unreachable`: no connection or no answer in time). It
    /// still counts in flight until [`Scheduler::release`]. Returns the requests dropped if the
    /// source is now down.
    pub(super) fn replied(
        &mut self,
        to: NodeId,
        now: Instant,
        got: Option<usize>,
        reserved: f64,
        unreachable: bool,
    ) -> Vec<Waiting> {
        if let Some(n) = self.inflight_peer.get_mut(&to) {
            *n = n.saturating_sub(1);
        }
        let got_bytes = got.unwrap_or(0) as f64;
        self.tokens += reserved - got_bytes;
        if got_bytes > 0.0 {
            self.reply_estimate = 0.9 * self.reply_estimate + 0.1 * got_bytes;
        }
        if unreachable {
            return self.mark_down(to, now);
        }
        self.heard.insert(to, now);
        if got.is_some() {
            self.down.remove(&to);
        }
        Vec::new()
    }

    /// `n` requests are consumed (fed to their machine, or dropped).
    pub(super) fn release(&mut self, n: usize) {
        self.inflight = self.inflight.saturating_sub(n);
    }

    /// `n` failed in transport or went silent: send it nothing for a while (doubling while it
    /// stays unreachable, up to [`MAX_DOWN`]). Returns what waited for it, dropped.
    pub(super) fn mark_down(&mut self, n: NodeId, now: Instant) -> Vec<Waiting> {
        let backoff = self
            .down
            .get(&n)
            .map_or(MIN_DOWN, |(_, b)| (*b * 2).min(MAX_DOWN));
        self.down.insert(n, (now + backoff, backoff));
        self.queues.remove(&n).unwrap_or_default().into()
    }

    /// Sources with requests in flight that have answered nothing for [`SILENT_AFTER`] and are
    /// not down already.
    pub(super) fn silent(&self, now: Instant) -> Vec<NodeId> {
        self.silent_since()
            .filter(|(n, since)| now >= *since + SILENT_AFTER && !self.is_down(n, now))
            .map(|(n, _)| n)
            .collect()
    }

    fn silent_since(&self) -> impl Iterator<Item = (NodeId, Instant)> + '_ {
        self.inflight_peer
            .iter()
            .filter(|(n, busy)| **busy > 0 && **n != self.me)
            .filter_map(|(n, _)| self.heard.get(n).map(|t| (*n, *t)))
    }

    /// When the scheduler next has something to do by itself: a source turning silent, or (under
    /// `cap`, with requests waiting) the bucket allowing the next one.
    pub(super) fn next_deadline(&self, now: Instant, cap: Option<u64>) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut earliest = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        for (n, since) in self.silent_since() {
            if !self.is_down(&n, now) {
                earliest(since + SILENT_AFTER);
            }
        }
        if let Some(rate) = cap {
            if self.queues.values().any(|q| !q.is_empty()) && self.tokens <= 0.0 {
                let wait = (-self.tokens / rate as f64).clamp(0.001, 1.0);
                earliest(now + Duration::from_secs_f64(wait));
            }
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    fn req(epoch: Epoch) -> Waiting {
        Waiting {
            epoch,
            gen: 0,
            bytes: vec![epoch as u8],
        }
    }

    fn all(s: &mut Scheduler, now: Instant, cap: Option<u64>) -> Vec<(NodeId, Epoch)> {
        std::iter::from_fn(|| s.next(now, cap, false, |_| true))
            .map(|g| (g.to, g.req.epoch))
            .collect()
    }

    #[test]
    fn round_robin_within_the_bounds_and_urgent_first() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(node(0), 4, 2, 1000.0, t0);
        for e in 1..=3 {
            s.push(node(1), req(e));
            s.push(node(2), req(e));
        }
        s.push_urgent(node(1), req(9));
        let sent = all(&mut s, t0, None);
        // The urgent one first (it counts toward its source's bound); then round-robin over the
        // sources, two in flight to each at most.
        assert_eq!(
            sent,
            vec![(node(1), 9), (node(1), 1), (node(2), 1), (node(2), 2)]
        );
        assert_eq!(s.inflight(), 4);
        // A reply frees a slot once it is released.
        s.replied(node(2), t0, Some(10), 1000.0, false);
        assert!(
            s.next(t0, None, false, |_| true).is_none(),
            "still 4 in flight"
        );
        s.release(1);
        assert_eq!(all(&mut s, t0, None), vec![(node(2), 3)]);
    }

    #[test]
    fn the_bucket_holds_requests_under_a_cap() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(node(0), 100, 100, 1000.0, t0);
        for e in 1..=20 {
            s.push(node(1), req(e));
        }
        // 10,000 B/s, 1,000 B per reply: the bucket starts empty, then lets one request through
        // per 100 ms.
        assert!(all(&mut s, t0, Some(10_000)).is_empty());
        let wait = s.next_deadline(t0, Some(10_000)).expect("a wait");
        assert!(wait > t0 && wait <= t0 + Duration::from_secs(1));
        let sent = all(&mut s, t0 + Duration::from_millis(1000), Some(10_000));
        assert_eq!(
            sent.len(),
            1,
            "the burst is a tenth of a second of the rate"
        );
        let sent = all(&mut s, t0 + Duration::from_millis(1150), Some(10_000));
        assert_eq!(sent.len(), 1);
        // Without a cap everything goes.
        assert_eq!(
            all(&mut s, t0 + Duration::from_millis(1200), None).len(),
            18
        );
    }

    #[test]
    fn an_unreachable_source_is_skipped_with_a_doubling_backoff() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(node(0), 10, 10, 1000.0, t0);
        s.push(node(1), req(1));
        let go = s.next(t0, None, false, |_| true).expect("sent");
        s.push(node(1), req(2));
        let dropped = s.replied(node(1), t0, None, go.reserved, true);
        assert_eq!(dropped.len(), 1, "what waited for it is dropped");
        assert!(s.is_down(&node(1), t0 + MIN_DOWN / 2));
        assert!(!s.is_down(&node(1), t0 + MIN_DOWN));
        s.mark_down(node(1), t0 + MIN_DOWN);
        assert!(s.is_down(&node(1), t0 + MIN_DOWN * 2));
        assert!(!s.is_down(&node(1), t0 + MIN_DOWN * 3));
        // Urgent requests to a down source are dropped too.
        s.push_urgent(node(1), req(3));
        assert!(s.next(t0 + MIN_DOWN, None, false, |_| true).is_none());
        // An answer brings it back at once.
        s.replied(node(1), t0 + MIN_DOWN, Some(5), 1000.0, false);
        assert!(!s.is_down(&node(1), t0 + MIN_DOWN));
    }

    #[test]
    fn a_source_that_answers_nothing_turns_silent() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(node(0), 10, 10, 1000.0, t0);
        s.push(node(1), req(1));
        s.push(node(2), req(1));
        assert_eq!(all(&mut s, t0, None).len(), 2);
        s.replied(node(2), t0 + Duration::from_secs(1), Some(5), 1000.0, false);
        assert_eq!(
            s.next_deadline(t0, None),
            Some(t0 + SILENT_AFTER),
            "the source still out turns silent then"
        );
        assert!(s.silent(t0 + SILENT_AFTER / 2).is_empty());
        assert_eq!(s.silent(t0 + SILENT_AFTER), vec![node(1)]);
    }

    #[test]
    fn requests_of_abandoned_runs_are_dropped() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(node(0), 10, 10, 1000.0, t0);
        s.push(node(1), req(1));
        s.push(node(1), req(2));
        let sent: Vec<Epoch> = std::iter::from_fn(|| s.next(t0, None, false, |r| r.epoch != 1))
            .map(|g| g.req.epoch)
            .collect();
        assert_eq!(sent, vec![2]);
        assert_eq!(s.inflight(), 1);
    }
}
