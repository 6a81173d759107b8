//! Garbage collection of lost ranges (docs/DESIGN.md §4, "State transfer", last sentence).
//!
//! When a node enters epoch `e`, the arcs it was responsible for in `e-1` and is not in `e` are
//! lost: their new group holds them from now on. The node deletes what it holds there only after
//! `2f+1` members of the arc's new group confirm holding it (they completed their transfer of the
//! arc into `e` or a later epoch): up to `f` of them may lie, so at least `f+1` correct ones hold
//! every write completed before `e`, and the members that have not finished can take the range
//! from those ([`super::transfer`]'s peers) instead of from old replicas that deleted it.
//!
//! - planning ([`lost`]): the ring is cut at the member ids of both epochs, as for a transfer; each
//!   lost arc with one new group is one unit;
//! - confirming: a [`TransferMessage::HaveQuery`] to each member of the new group, asked again with
//!   backoff until `2f+1` answer `have`;
//! - later groups: a group that never gets `2f+1` members through (members that were cut off
//!   until the range moved on, then found every source gone) must not keep the old data forever.
//!   The driver hands the machine every later configuration the node installs ([`Gc::learn`]);
//!   each piece of the arc then may also be confirmed by `2f+1` of its group in a later epoch
//!   `e'` that completed their transfer into `e'` (they hold every write completed before `e'`,
//!   a superset of those before `e`). The arc is deleted once every point of it is confirmed by
//!   one such group, the first or a later one;
//! - deleting: [`GcOutput::Delete`] names the arc; the driver calls
//!   [`super::replica::Replica::delete_lost`], which checks at that moment, object by object, that
//!   the node has not been responsible for it since (it may have gained it back), and from then on
//!   answers requests for the arc `Gone`.
//!
//! Non-goals here: persistence (the replica's collected arcs are what a driver persists; a new
//! machine skips them), and deleting anything the node did not lose on entering its epoch.
//!
//! Fault model: new-group members may claim to hold what they do not, or go silent; old data goes
//! only on `2f+1` claims. Nothing a peer sends can make the machine delete an arc it did not lose.

use super::transfer::{merge, pieces, Arc, TransferMessage};
use crate::config::{Configuration, Epoch};
use crate::crypto::{NodeId, ObjectId};
use crate::wire::{decode, encode_msg};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// An arc node `me` lost on entering an epoch, and the arc's group in that epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostArc {
    pub arc: Arc,
    pub holders: Vec<NodeId>,
}

/// The arcs node `me` was responsible for in `prev` and is not in `next` (= epoch
/// `prev.epoch + 1`), each with its group in `next`.
pub fn lost(prev: &Configuration, next: &Configuration, me: &NodeId) -> Vec<LostArc> {
    if !prev.is_member(me) {
        return Vec::new();
    }
    let keyed: Vec<(Arc, Vec<NodeId>)> = pieces(prev, next)
        .into_iter()
        .filter_map(|arc| {
            let point = ObjectId(arc.end);
            if !prev.is_responsible(me, &point) || next.is_responsible(me, &point) {
                return None;
            }
            let mut holders: Vec<NodeId> = next.group(&point).iter().map(|m| m.id).collect();
            holders.sort();
            Some((arc, holders))
        })
        .collect();
    merge(keyed)
        .into_iter()
        .map(|(arc, holders)| LostArc { arc, holders })
        .collect()
}

/// `arc` cut at the member ids of `config`: within each piece, the group is constant.
fn split_at_members(arc: &Arc, config: &Configuration) -> Vec<Arc> {
    let mut cuts: Vec<[u8; 32]> = config
        .members
        .iter()
        .map(|m| m.id.0)
        .filter(|p| arc.contains(&ObjectId(*p)) && *p != arc.end)
        .collect();
    // In the arc's order, from just after its start round to its end.
    cuts.sort_by_key(|p| arc.order_key(&ObjectId(*p)));
    cuts.push(arc.end);
    let mut start = arc.start;
    cuts.into_iter()
        .map(|end| {
            let piece = Arc { start, end };
            start = end;
            piece
        })
        .collect()
}

/// Options of a garbage collection.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Ask again after this many milliseconds (doubling while nothing progresses, up to 16 times).
    pub retransmit_ms: u64,
    /// The first request id (random per run).
    pub first_request_id: u64,
    #[cfg(feature = "mutants")]
    pub mutant: super::Mutant,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            retransmit_ms: 1000,
            first_request_id: 1,
            #[cfg(feature = "mutants")]
            mutant: super::Mutant::None,
        }
    }
}

/// What the driver should do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GcOutput {
    Send {
        to: NodeId,
        bytes: Vec<u8>,
    },
    /// `2f+1` of the new group hold `arc`, lost on entering `epoch`: call
    /// [`super::replica::Replica::delete_lost`]`(epoch, arc)` (and persist the collected arc).
    Delete {
        epoch: Epoch,
        arc: Arc,
    },
    /// Every lost arc is deleted (once the deletions above are carried out).
    Complete {
        epoch: Epoch,
    },
}

#[derive(Debug)]
struct Unit {
    lost: LostArc,
    /// Members of the new group that confirmed holding the arc.
    have: BTreeSet<NodeId>,
    /// Pieces of the arc, each with its group in a later epoch ([`Gc::learn`]).
    later: Vec<Later>,
    done: bool,
}

/// A piece of a lost arc and its group in a later epoch.
#[derive(Debug)]
struct Later {
    epoch: Epoch,
    arc: Arc,
    holders: Vec<NodeId>,
    need: usize,
    have: BTreeSet<NodeId>,
}

impl Later {
    fn confirmed(&self) -> bool {
        self.have.len() >= self.need
    }
}

/// Whom a question went to: the arc's group in the epoch it was lost in, or one of its later
/// pieces (by index into [`Unit::later`]).
type Asked = (usize, Option<usize>, NodeId);

/// The garbage collection of what one node lost on entering one epoch.
#[derive(Debug)]
pub struct Gc {
    epoch: Epoch,
    /// Confirmations needed: `2f+1` of the new group.
    need: usize,
    units: Vec<Unit>,
    /// Outstanding questions: rid → whom; the last few rids of each stay valid.
    by_rid: BTreeMap<u64, Asked>,
    recent: BTreeMap<Asked, VecDeque<u64>>,
    /// The node, never asked about a later piece it belongs to (it gained the piece back).
    me: NodeId,
    /// The latest epoch handed to [`Gc::learn`].
    learned: Epoch,
    next_rid: u64,
    opts: GcOptions,
    retransmit_at: u64,
    backoff: u64,
    complete: bool,
    out: VecDeque<GcOutput>,
}

impl Gc {
    /// The collection of what `me` lost on entering `next` from `prev`, except the arcs in
    /// `collected` ([`super::replica::Replica::collected_in`]: deleted already, before a restart).
    pub fn new(
        prev: &Configuration,
        next: &Configuration,
        me: &NodeId,
        collected: &[Arc],
        opts: GcOptions,
    ) -> Gc {
        let units = lost(prev, next, me)
            .into_iter()
            .filter(|l| !collected.contains(&l.arc))
            .map(|lost| Unit {
                lost,
                have: BTreeSet::new(),
                later: Vec::new(),
                done: false,
            })
            .collect();
        let q = next.quorum();
        #[cfg(feature = "mutants")]
        let need = if opts.mutant == super::Mutant::GcEarly {
            q.one_correct()
        } else {
            q.quorum()
        };
        #[cfg(not(feature = "mutants"))]
        let need = q.quorum();
        Gc {
            epoch: next.epoch,
            need,
            units,
            by_rid: BTreeMap::new(),
            recent: BTreeMap::new(),
            me: *me,
            learned: next.epoch,
            next_rid: opts.first_request_id,
            backoff: opts.retransmit_ms,
            opts,
            retransmit_at: 0,
            complete: false,
            out: VecDeque::new(),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// (arcs deleted, arcs in all).
    pub fn progress(&self) -> (usize, usize) {
        let done = self.units.iter().filter(|u| u.done).count();
        (done, self.units.len())
    }

    /// A one-line account of each arc, for logs and failure reports.
    pub fn describe(&self) -> String {
        let units: Vec<String> = self
            .units
            .iter()
            .map(|u| {
                let marks: Vec<String> = u
                    .lost
                    .holders
                    .iter()
                    .map(|n| {
                        let mark = if u.have.contains(n) { "✓" } else { "…" };
                        format!("{}{mark}", n.short())
                    })
                    .collect();
                let state = if u.done { "deleted" } else { "asking" };
                format!("[{state}: {}]", marks.join(" "))
            })
            .collect();
        units.join(" ")
    }

    pub fn poll_output(&mut self) -> Option<GcOutput> {
        self.out.pop_front()
    }

    pub fn next_timeout(&self) -> Option<u64> {
        (!self.complete).then_some(self.retransmit_at)
    }

    /// Asks every new holder.
    pub fn start(&mut self, now: u64) {
        for u in 0..self.units.len() {
            self.ask(u);
        }
        self.retransmit_at = now + self.opts.retransmit_ms;
        self.check_complete();
    }

    /// The latest epoch whose configuration [`Gc::learn`] took (the machine's own at first).
    pub fn learned(&self) -> Epoch {
        self.learned
    }

    /// A configuration the node installed after this machine's epoch (in any order; older or
    /// repeated ones are ignored): each unfinished arc may from now on also be confirmed piece by
    /// piece by that epoch's groups, which are asked at once.
    pub fn learn(&mut self, later: &Configuration) {
        if later.epoch <= self.learned || self.complete {
            return;
        }
        self.learned = later.epoch;
        let need = later.quorum().quorum();
        for u in 0..self.units.len() {
            if self.units[u].done {
                continue;
            }
            let arc = self.units[u].lost.arc;
            let first = self.units[u].later.len();
            for piece in split_at_members(&arc, later) {
                let mut holders: Vec<NodeId> = later
                    .group(&ObjectId(piece.end))
                    .iter()
                    .map(|m| m.id)
                    .collect();
                if holders.contains(&self.me) {
                    continue; // gained back: `delete_lost` keeps it anyway
                }
                holders.sort();
                self.units[u].later.push(Later {
                    epoch: later.epoch,
                    arc: piece,
                    holders,
                    need,
                    have: BTreeSet::new(),
                });
            }
            for l in first..self.units[u].later.len() {
                self.ask_later(u, l);
            }
        }
    }

    /// Asks the holders of unit `u` that have not confirmed, in its first group and in the later
    /// ones of pieces not yet confirmed.
    fn ask(&mut self, u: usize) {
        let pending: Vec<NodeId> = self.units[u]
            .lost
            .holders
            .iter()
            .filter(|n| !self.units[u].have.contains(n))
            .copied()
            .collect();
        for n in pending {
            self.request((u, None, n), self.epoch, self.units[u].lost.arc);
        }
        for l in 0..self.units[u].later.len() {
            self.ask_later(u, l);
        }
    }

    fn ask_later(&mut self, u: usize, l: usize) {
        let later = &self.units[u].later[l];
        if later.confirmed() {
            return;
        }
        let (epoch, arc) = (later.epoch, later.arc);
        let pending: Vec<NodeId> = later
            .holders
            .iter()
            .filter(|n| !later.have.contains(n))
            .copied()
            .collect();
        for n in pending {
            self.request((u, Some(l), n), epoch, arc);
        }
    }

    fn request(&mut self, asked: Asked, epoch: Epoch, arc: Arc) {
        const KEEP: usize = 4;
        let rid = self.next_rid;
        self.next_rid = self.next_rid.wrapping_add(1);
        self.by_rid.insert(rid, asked);
        let recent = self.recent.entry(asked).or_default();
        recent.push_back(rid);
        if recent.len() > KEEP {
            if let Some(old) = recent.pop_front() {
                self.by_rid.remove(&old);
            }
        }
        let msg = TransferMessage::HaveQuery { rid, epoch, arc };
        self.out.push_back(GcOutput::Send {
            to: asked.2,
            bytes: encode_msg(epoch, msg),
        });
    }

    /// Asks again those that have not confirmed.
    pub fn handle_timeout(&mut self, now: u64) {
        if now < self.retransmit_at || self.complete {
            return;
        }
        self.retransmit_at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(self.opts.retransmit_ms * 16);
        for u in 0..self.units.len() {
            if !self.units[u].done {
                self.ask(u);
            }
        }
    }

    /// Handles a reply from `from`.
    pub fn handle_message(&mut self, _now: u64, from: NodeId, bytes: &[u8]) {
        let Ok(env) = decode::<TransferMessage>(bytes) else {
            return;
        };
        let TransferMessage::Have { rid, have } = env.msg else {
            return;
        };
        let Some(&asked) = self.by_rid.get(&rid) else {
            return;
        };
        let (u, later, node) = asked;
        if node != from {
            return;
        }
        for old in self.recent.remove(&asked).unwrap_or_default() {
            self.by_rid.remove(&old);
        }
        // "Not yet" is asked again at the next timeout.
        let unit = &mut self.units[u];
        if !have || unit.done {
            return self.check_complete();
        }
        let new = match later {
            None => unit.have.insert(from),
            Some(l) => unit.later[l].have.insert(from),
        };
        if new {
            self.backoff = self.opts.retransmit_ms;
            let confirmed: Vec<Arc> = unit
                .later
                .iter()
                .filter(|l| l.confirmed())
                .map(|l| l.arc)
                .collect();
            if unit.have.len() >= self.need || unit.lost.arc.covered_by(&confirmed) {
                unit.done = true;
                self.out.push_back(GcOutput::Delete {
                    epoch: self.epoch,
                    arc: unit.lost.arc,
                });
            }
        }
        self.check_complete();
    }

    fn check_complete(&mut self) {
        if !self.complete && self.units.iter().all(|u| u.done) {
            self.complete = true;
            self.by_rid.clear();
            self.recent.clear();
            self.out.push_back(GcOutput::Complete { epoch: self.epoch });
        }
    }
}
