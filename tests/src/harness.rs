//! The virtual-time event queue and the faulty network that every simulator runs on (the dBQS
//! simulator, [`crate::sim`], and the MS agreement simulator, [`crate::agreement_sim`]).
//!
//! Goals: one seed replays a run exactly. Events run in (time, scheduling order); every random
//! choice of the network comes from the run's one [`Rng`], drawn in a fixed order per message:
//! loss, duplication, then each copy's delay.
//!
//! Faults, while [`Network::faulty`]: messages are lost with probability `drop_p`, duplicated
//! with probability `dup_p`, delayed by 1..`max_delay` ms each (so they reorder), cut by a
//! partition (a random side, [`Network::partition`]), and, with `slow_links`, a quarter of the
//! directed links are persistently 200–800 ms slower than the rest. Once healed, messages arrive
//! once, within `max_delay` (plus the slow links' extra delay, which stays).
//!
//! Crashes and restarts are each simulator's own (they are about what a process keeps), and so
//! are the events: the queue is generic over them.

use crate::rng::Rng;
use dbqsfs_core::crypto::NodeId;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

/// The events of a run, in virtual time.
pub struct Queue<E> {
    seq: u64,
    heap: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<E>>,
    processed: u64,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue {
            seq: 0,
            heap: BinaryHeap::new(),
            events: Vec::new(),
            processed: 0,
        }
    }
}

impl<E> Queue<E> {
    /// Schedules `ev` at time `at`; returns its index (for [`Queue::cancel`]).
    pub fn schedule(&mut self, at: u64, ev: E) -> usize {
        let idx = self.events.len();
        self.events.push(Some(ev));
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, idx)));
        idx
    }

    /// Cancels a scheduled event (a message lost in a crash of its sender); it still pops, empty.
    pub fn cancel(&mut self, idx: usize) {
        if let Some(slot) = self.events.get_mut(idx) {
            *slot = None;
        }
    }

    /// The next event: its time and the event (`None` if cancelled).
    pub fn pop(&mut self) -> Option<(u64, Option<E>)> {
        let Reverse((at, _, idx)) = self.heap.pop()?;
        self.processed += 1;
        Some((at, self.events[idx].take()))
    }

    /// Events popped so far.
    pub fn processed(&self) -> u64 {
        self.processed
    }
}

/// What a network address is made of, for the slow links' hash.
pub trait Address: Ord + Copy {
    fn link_bytes(&self) -> Vec<u8>;
}

impl Address for NodeId {
    fn link_bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

impl Address for usize {
    fn link_bytes(&self) -> Vec<u8> {
        (*self as u64).to_le_bytes().to_vec()
    }
}

/// The network between the simulated processes.
#[derive(Clone, Debug)]
pub struct Network<A: Address> {
    /// Faults on (until the run heals).
    pub faulty: bool,
    pub drop_p: f64,
    pub dup_p: f64,
    /// Delays are 1..max_delay ms.
    pub max_delay: u64,
    /// A salt choosing the slow links, if any.
    pub slow_links: Option<u64>,
    /// One side of the current partition, if any.
    pub partition: Option<BTreeSet<A>>,
}

impl<A: Address> Network<A> {
    pub fn new(drop_p: f64, dup_p: f64, max_delay: u64, slow_links: Option<u64>) -> Network<A> {
        Network {
            faulty: true,
            drop_p,
            dup_p,
            max_delay,
            slow_links,
            partition: None,
        }
    }

    /// When the copies of a message from `from` to `to` sent at `now` arrive: none if it is lost
    /// or a partition cuts the link, two if it is duplicated.
    pub fn arrivals(&self, rng: &mut Rng, now: u64, from: A, to: A) -> Vec<u64> {
        let mut copies = 1;
        if self.faulty {
            if let Some(side) = &self.partition {
                if side.contains(&from) != side.contains(&to) {
                    return Vec::new();
                }
            }
            if rng.chance(self.drop_p) {
                return Vec::new();
            }
            if rng.chance(self.dup_p) {
                copies = 2;
            }
        }
        let skew = self
            .slow_links
            .map_or(0, |salt| link_skew(salt, &from, &to));
        (0..copies)
            .map(|_| now + skew + rng.range(1, self.max_delay))
            .collect()
    }

    /// Cuts the network: each address is on one side with probability 0.4 (while faulty).
    pub fn partition(&mut self, rng: &mut Rng, all: impl IntoIterator<Item = A>) {
        if self.faulty {
            let side = all.into_iter().filter(|_| rng.chance(0.4)).collect();
            self.partition = Some(side);
        }
    }

    /// Ends the faults: no loss, duplication or partition from now on.
    pub fn heal(&mut self) {
        self.faulty = false;
        self.partition = None;
    }
}

/// The persistent extra delay of the directed link `from → to`: 0 for three links in four.
fn link_skew<A: Address>(salt: u64, from: &A, to: &A) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&from.link_bytes());
    h.update(&to.link_bytes());
    let x = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
    if x % 4 == 0 {
        200 + (x >> 8) % 600
    } else {
        0
    }
}
