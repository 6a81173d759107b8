//! The collector: the node's garbage collections of lost ranges (one core [`Gc`] machine per
//! epoch the node entered), and what they ask of the worker.
//!
//! Goals: a collection starts once the node is ready in its epoch and has lost something there,
//! learns the later configurations (a later group may confirm what the first never will), asks
//! the new groups within a bound on questions in flight (beyond it a question is dropped and the
//! machine asks again at its next timeout), has every confirmed arc deleted, tries a failed
//! deletion again after a pause, and ends only when the machine is complete and every deletion is
//! carried out.
//!
//! Non-goals: sending, deleting and persisting (the worker's: it carries out the [`Effect`]s), and
//! the clock: every method takes `now` in the worker's milliseconds, so the collector runs the same
//! under a fake clock.

use super::source_addrs;
use dbqsfs_core::config::{Configuration, Epoch};
use dbqsfs_core::crypto::NodeId;
use dbqsfs_core::dbqs::gc::{Gc, GcOptions, GcOutput};
use dbqsfs_core::dbqs::transfer::Arc as RingArc;
use ed25519_dalek::VerifyingKey;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use tracing::{info, warn};

/// Where a member is reached.
pub(super) type Addr = (SocketAddr, VerifyingKey);

/// What the collector asks the worker to do, in order.
#[derive(Debug)]
// Effects live only between `poll` and the worker's carrying them out: their size does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Effect {
    /// Send this question of collection (`epoch`, `gen`) to `to` and hand its reply (or `None`)
    /// to [`Collector::on_reply`].
    Ask {
        epoch: Epoch,
        gen: u64,
        to: NodeId,
        dest: Option<Addr>,
        bytes: Vec<u8>,
    },
    /// Delete `arc`, lost on entering `epoch`, persist it collected, and report the outcome to
    /// [`Collector::on_deleted`].
    Delete { epoch: Epoch, arc: RingArc },
    /// `deleted` more objects were collected in `epoch`; `running` says whether it still runs.
    Progress {
        epoch: Epoch,
        deleted: u64,
        running: bool,
    },
}

/// One collection in progress.
struct Run {
    gen: u64,
    g: Gc,
    /// The new groups' addresses (members of the epoch and of the later ones it learned).
    addrs: BTreeMap<NodeId, Addr>,
    /// Deletions issued and not yet carried out (retried on failure).
    deleting: usize,
    deleted: u64,
    started_ms: u64,
}

/// The node's collections.
pub(super) struct Collector {
    runs: BTreeMap<Epoch, Run>,
    /// Epochs collected (or with nothing lost) in this process.
    done: BTreeSet<Epoch>,
    /// Questions in flight, over every collection.
    inflight: usize,
    max_inflight: usize,
    /// A failed deletion is tried again this long after it failed.
    retry_after_ms: u64,
    retries: Vec<(u64, Epoch, RingArc)>,
    next_gen: u64,
    out: VecDeque<Effect>,
}

impl Collector {
    pub(super) fn new(max_inflight: usize, retry_after_ms: u64) -> Collector {
        Collector {
            runs: BTreeMap::new(),
            done: BTreeSet::new(),
            inflight: 0,
            max_inflight: max_inflight.max(1),
            retry_after_ms,
            retries: Vec::new(),
            next_gen: 0,
            out: VecDeque::new(),
        }
    }

    /// Whether collection `e` is neither running nor done (the worker then gathers what
    /// [`Collector::start`] needs).
    pub(super) fn wants(&self, e: Epoch) -> bool {
        e > 0 && !self.runs.contains_key(&e) && !self.done.contains(&e)
    }

    /// Starts collecting what `me` lost on entering `next` from `prev`, except the arcs in
    /// `collected` (deleted before a restart).
    pub(super) fn start(
        &mut self,
        now: u64,
        prev: &Configuration,
        next: &Configuration,
        me: &NodeId,
        collected: &[RingArc],
        opts: GcOptions,
    ) {
        let e = next.epoch;
        if !self.wants(e) {
            return;
        }
        let mut g = Gc::new(prev, next, me, collected, opts);
        let (_, units) = g.progress();
        if units == 0 {
            self.done.insert(e);
            return;
        }
        info!(
            epoch = e,
            arcs = units,
            "garbage collection of lost ranges started"
        );
        let gen = self.next_gen;
        self.next_gen += 1;
        g.start(now);
        self.runs.insert(
            e,
            Run {
                gen,
                g,
                addrs: source_addrs(next),
                deleting: 0,
                deleted: 0,
                started_ms: now,
            },
        );
        self.out.push_back(Effect::Progress {
            epoch: e,
            deleted: 0,
            running: true,
        });
        self.drain(e);
    }

    /// The running collections and the newest epoch each has learned.
    pub(super) fn learned(&self) -> Vec<(Epoch, Epoch)> {
        self.runs.iter().map(|(e, r)| (*e, r.g.learned())).collect()
    }

    /// Hands collection `e` configurations installed after the newest it learned.
    pub(super) fn learn(&mut self, e: Epoch, later: &[Configuration]) {
        let Some(run) = self.runs.get_mut(&e) else {
            return;
        };
        for config in later {
            run.g.learn(config);
            run.addrs.extend(source_addrs(config));
        }
        self.drain(e);
    }

    /// The reply of `from` to a question of collection (`epoch`, `gen`), or `None`.
    pub(super) fn on_reply(
        &mut self,
        now: u64,
        epoch: Epoch,
        gen: u64,
        from: NodeId,
        reply: Option<&[u8]>,
    ) {
        self.inflight = self.inflight.saturating_sub(1);
        let Some(run) = self.runs.get_mut(&epoch).filter(|r| r.gen == gen) else {
            return;
        };
        if let Some(bytes) = reply {
            run.g.handle_message(now, from, bytes);
            self.drain(epoch);
        }
    }

    /// The deletion of `arc` in `epoch` was carried out (`Ok`: that many objects deleted), or
    /// failed (tried again after the pause).
    pub(super) fn on_deleted(
        &mut self,
        now: u64,
        epoch: Epoch,
        arc: RingArc,
        result: Result<usize, String>,
    ) {
        match result {
            Ok(n) => {
                if let Some(run) = self.runs.get_mut(&epoch) {
                    run.deleting = run.deleting.saturating_sub(1);
                    run.deleted += n as u64;
                }
                self.out.push_back(Effect::Progress {
                    epoch,
                    deleted: n as u64,
                    running: true,
                });
                self.finish(now, epoch);
            }
            Err(e) => {
                warn!(epoch, error = %e, "deleting a lost range failed; trying again");
                self.retries
                    .push((now.saturating_add(self.retry_after_ms), epoch, arc));
            }
        }
    }

    /// Feeds due timeouts to the machines and lets due retries go.
    pub(super) fn on_timer(&mut self, now: u64) {
        let due: Vec<Epoch> = self
            .runs
            .iter()
            .filter(|(_, r)| r.g.next_timeout().is_some_and(|at| at <= now))
            .map(|(e, _)| *e)
            .collect();
        for e in due {
            if let Some(run) = self.runs.get_mut(&e) {
                run.g.handle_timeout(now);
            }
            self.drain(e);
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.retries = later;
        for (_, epoch, arc) in due {
            self.out.push_back(Effect::Delete { epoch, arc });
        }
    }

    /// When [`Collector::on_timer`] has something to do next.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        let timeouts = self.runs.values().filter_map(|r| r.g.next_timeout());
        let retries = self.retries.iter().map(|(at, _, _)| *at);
        timeouts.chain(retries).min()
    }

    /// The next effect to carry out.
    pub(super) fn poll(&mut self) -> Option<Effect> {
        self.out.pop_front()
    }

    /// Questions in flight.
    #[cfg(test)]
    fn inflight(&self) -> usize {
        self.inflight
    }

    /// Turns what collection `e`'s machine asks into effects.
    fn drain(&mut self, e: Epoch) {
        let Some(run) = self.runs.get_mut(&e) else {
            return;
        };
        while let Some(out) = run.g.poll_output() {
            match out {
                GcOutput::Send { to, bytes } => {
                    if self.inflight >= self.max_inflight {
                        continue; // asked again at the machine's next timeout
                    }
                    self.inflight += 1;
                    self.out.push_back(Effect::Ask {
                        epoch: e,
                        gen: run.gen,
                        to,
                        dest: run.addrs.get(&to).copied(),
                        bytes,
                    });
                }
                GcOutput::Delete { epoch, arc } => {
                    run.deleting += 1;
                    self.out.push_back(Effect::Delete { epoch, arc });
                }
                GcOutput::Complete { .. } => {}
            }
        }
    }

    /// Ends collection `e` once its machine is complete and every deletion is carried out.
    fn finish(&mut self, now: u64, e: Epoch) {
        let Some(run) = self.runs.get(&e) else { return };
        if !run.g.is_complete() || run.deleting > 0 {
            return;
        }
        if let Some(run) = self.runs.remove(&e) {
            info!(
                epoch = e,
                objects_deleted = run.deleted,
                secs = format!("{:.2}", now.saturating_sub(run.started_ms) as f64 / 1e3),
                "garbage collection complete"
            );
        }
        self.done.insert(e);
        self.out.push_back(Effect::Progress {
            epoch: e,
            deleted: 0,
            running: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbqsfs_core::config::{Member, Params};
    use dbqsfs_core::crypto::Keypair;
    use dbqsfs_core::dbqs::transfer::TransferMessage;
    use dbqsfs_core::wire::{decode, encode_msg};

    /// Epoch 0 has nodes 0..5, epoch 1 nodes 1..6: node 0 loses everything it held.
    fn epochs() -> (Vec<Keypair>, Configuration, Configuration) {
        let ks: Vec<Keypair> = (0..6).map(|i| Keypair::from_seed([i + 90; 32])).collect();
        let config = |epoch, ks: &[Keypair], prev| {
            let members = ks
                .iter()
                .enumerate()
                .map(|(i, k)| Member::new(k.public(), format!("127.0.0.1:{}", 7000 + i)))
                .collect();
            Configuration::new(epoch, Params::with_f(1), members, prev)
        };
        let g = config(0, &ks[..5], None);
        let next = config(1, &ks[1..], Some(g.hash()));
        (ks, g, next)
    }

    fn collector(max_inflight: usize) -> (Collector, Configuration) {
        let (ks, g, next) = epochs();
        let mut c = Collector::new(max_inflight, 500);
        c.start(0, &g, &next, &ks[0].node_id(), &[], GcOptions::default());
        (c, next)
    }

    fn effects(c: &mut Collector) -> Vec<Effect> {
        std::iter::from_fn(|| c.poll()).collect()
    }

    /// Answers every question "held", as every member of the new group would.
    fn answer_all(c: &mut Collector, now: u64, asks: Vec<Effect>) {
        for e in asks {
            if let Effect::Ask {
                epoch,
                gen,
                to,
                bytes,
                dest,
            } = e
            {
                assert!(dest.is_some(), "members of the new group have addresses");
                let env = decode::<TransferMessage>(&bytes).unwrap();
                let TransferMessage::HaveQuery { rid, .. } = env.msg else {
                    panic!("a collection asks only HaveQuery");
                };
                let reply = encode_msg(env.epoch, TransferMessage::Have { rid, have: true });
                c.on_reply(now, epoch, gen, to, Some(&reply));
            }
        }
    }

    #[test]
    fn questions_stay_within_the_bound_and_are_asked_again_at_the_timeout() {
        let (mut c, _) = collector(2);
        let first = effects(&mut c);
        let asks = first
            .iter()
            .filter(|e| matches!(e, Effect::Ask { .. }))
            .count();
        assert_eq!(asks, 2, "two questions in flight at most: {first:?}");
        assert_eq!(c.inflight(), 2);
        // Nothing answers: the replies fail, and the machine asks again at its timeout.
        for e in first {
            if let Effect::Ask { epoch, gen, to, .. } = e {
                c.on_reply(10, epoch, gen, to, None);
            }
        }
        assert_eq!(c.inflight(), 0);
        let at = c.next_deadline().expect("the machine retransmits");
        c.on_timer(at - 1);
        assert!(effects(&mut c).is_empty(), "nothing before the deadline");
        c.on_timer(at);
        let again = effects(&mut c);
        assert!(again.iter().any(|e| matches!(e, Effect::Ask { .. })));
        assert!(c.inflight() <= 2);
    }

    #[test]
    fn a_failed_deletion_is_tried_again_and_the_collection_ends_only_when_all_are_done() {
        let (mut c, _) = collector(64);
        let mut now = 0;
        let mut deletes = Vec::new();
        for _ in 0..20 {
            let out = effects(&mut c);
            deletes.extend(out.iter().filter_map(|e| match e {
                Effect::Delete { epoch, arc } => Some((*epoch, *arc)),
                _ => None,
            }));
            answer_all(&mut c, now, out);
            now += 20_000;
            c.on_timer(now);
        }
        assert!(
            !deletes.is_empty(),
            "every lost arc is confirmed and deleted"
        );
        assert!(!c.wants(1), "running");
        // The first deletion fails: it comes back after the pause, not before.
        let (e0, a0) = deletes[0];
        c.on_deleted(now, e0, a0, Err("disk said no".into()));
        c.on_timer(now + 499);
        assert!(!effects(&mut c)
            .iter()
            .any(|e| matches!(e, Effect::Delete { .. })));
        c.on_timer(now + 500);
        let retried: Vec<_> = effects(&mut c)
            .into_iter()
            .filter(|e| matches!(e, Effect::Delete { .. }))
            .collect();
        assert_eq!(retried.len(), 1);
        // Every deletion carried out but one: still running.
        for (e, a) in &deletes[1..] {
            c.on_deleted(now, *e, *a, Ok(3));
        }
        assert!(c.learned().iter().any(|(e, _)| *e == 1));
        c.on_deleted(now + 600, e0, a0, Ok(3));
        assert!(c.learned().is_empty(), "the collection ended");
        let progress: u64 = effects(&mut c)
            .iter()
            .map(|e| match e {
                Effect::Progress { deleted, .. } => *deleted,
                _ => 0,
            })
            .sum();
        assert_eq!(progress, 3 * deletes.len() as u64);
        assert!(!c.wants(1), "done in this process");
    }
}
