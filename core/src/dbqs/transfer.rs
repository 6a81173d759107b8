//! State transfer between epochs (docs/DESIGN.md §4, "State transfer").
//!
//! When a node enters epoch `e`, it fetches what it is responsible for in `e` from the replica group
//! of `e-1`: everything it gained (what it was not responsible or not ready for in `e-1`), and, for
//! what it already held, whatever it is missing (a completed write may have reached only `f+1`
//! correct replicas, since up to `f` acknowledgements can be lies; after a transfer every correct
//! member of a group holds every completed write):
//! - planning ([`plan`]): the ring is cut at the member ids of both epochs; within one such arc the
//!   groups of both epochs are constant, so each arc the node gained is one unit of transfer with one
//!   set of sources;
//! - listing: each unit is listed (paged) by the old group; the unit waits for `2f+1` complete
//!   listings, from replicas that have moved to `e` (so no write can still complete in `e-1`) and
//!   were ready in `e-1`;
//! - listings carry public-key blocks whole, so a public-key block is taken as the highest validly
//!   signed version among those `2f+1` listings, with no claim to chase;
//! - listings carry the owners' signed reference records of the content blocks they list
//!   ([`super::refs`]), tombstones included; a unit takes their union over the listings it
//!   completed, merged per owner by sequence number, and hands them over when the unit is done
//!   ([`TransferOutput::StoreRefs`]): every completed hold or release reached a correct one of
//!   `2f+1` old replicas (or of `f+1` ready peers), and nobody can forge one, so a Byzantine
//!   lister can neither drop a hold (and get a referenced block deleted) nor a release (and keep
//!   a released block forever);
//! - content blocks are listed by id and fetched from any old replica, accepted when they hash to
//!   their id; an id is dropped only when `2f+1` old replicas say they do not hold it (a completed
//!   write has at most `2f` such replicas, counting liars), so a Byzantine lister can neither stall
//!   the transfer with an id that does not exist nor make it drop one that does;
//! - when every unit is done the transfer is complete and the replica may answer reads of what it
//!   gained ([`crate::dbqs::replica::Replica::transfer_complete`]);
//! - old replicas delete a range they lost only after `2f+1` of its new group confirm holding it
//!   ([`super::gc`]), and answer [`TransferMessage::Gone`] for it from then on. A unit that meets a
//!   `Gone` (or stays unfinished for long) also asks the other members of its new group
//!   ([`TransferMessage::ListReady`], [`TransferMessage::FetchReady`]); those that completed their
//!   own transfer of the range hold every write completed before the epoch, so `f+1` of their
//!   listings (one of them correct) do what `2f+1` old ones do, and `f+1` of their denials drop an id;
//! - a read need not wait for its range: [`Transfer::fetch_now`] runs the same rules for the arc
//!   holding just that object ([`Arc::single`]);
//! - whom a content block is fetched from routes around bad sources ([`super::health`]): each
//!   block tries its listers first, healthiest first (ties spread by the block's id, so the load
//!   spreads over the listers), then the rest of both groups; an undecodable answer or a copy that
//!   does not hash to its id counts against its sender, and a source whose request failed in
//!   transport ([`Transfer::peer_failed`], from the driver) has every fetch waiting on it asked
//!   elsewhere at once instead of at the next retransmission. Health decides only whom to ask, never
//!   what counts.
//!
//! Non-goals here: persistence of progress (the driver's).
//!
//! Fault model: up to `f` replicas of each old group may list objects that do not exist, claim
//! versions they cannot produce, serve wrong bytes or forged blocks, or go silent; every object is
//! verified before it is stored, and every claim is checked against the object fetched.

use super::health::Health;
use super::refs::{self, RefRecord};
use crate::config::{Configuration, Epoch};
use crate::crypto::{NodeId, ObjectId};
use crate::object::{check_content, PkBlock};
use crate::wire::Protocol;
use crate::wire::{decode, encode_msg};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A half-open arc of the ring, `(start, end]`; `start == end` is the whole ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Arc {
    pub start: [u8; 32],
    pub end: [u8; 32],
}

impl Arc {
    /// The order of ids along the arc, from just after `start` round to `end`.
    pub fn order_key(&self, x: &ObjectId) -> (bool, [u8; 32]) {
        (x.0 <= self.start, x.0)
    }

    pub fn contains(&self, x: &ObjectId) -> bool {
        let (s, e, x) = (&self.start, &self.end, &x.0);
        match s.cmp(e) {
            std::cmp::Ordering::Less => s < x && x <= e,
            std::cmp::Ordering::Greater => x > s || x <= e,
            std::cmp::Ordering::Equal => true,
        }
    }

    /// Whether `other` lies wholly within this arc.
    pub fn covers(&self, other: &Arc) -> bool {
        if self.start == self.end {
            return true;
        }
        if other.start == other.end {
            return false;
        }
        let end = ObjectId(other.end);
        if !self.contains(&end) {
            return false;
        }
        // `other` starts where this arc starts, or inside it and before its own end.
        let start = ObjectId(other.start);
        other.start == self.start
            || (self.contains(&start)
                && other.start != self.end
                && self.order_key(&start) < self.order_key(&end))
    }

    /// The arc holding exactly `x`: `(x-1, x]`.
    pub fn single(x: &ObjectId) -> Arc {
        let mut start = x.0;
        for b in start.iter_mut().rev() {
            let (v, borrow) = b.overflowing_sub(1);
            *b = v;
            if !borrow {
                break;
            }
        }
        Arc { start, end: x.0 }
    }

    /// Whether the two arcs share a point.
    pub fn overlaps(&self, other: &Arc) -> bool {
        // A non-empty intersection of two arcs ends where one of them ends.
        self.contains(&ObjectId(other.end)) || other.contains(&ObjectId(self.end))
    }

    /// Whether every point of this arc lies in one of `arcs`.
    pub fn covered_by(&self, arcs: &[Arc]) -> bool {
        // Cut this arc at every end point of `arcs` inside it: no arc of `arcs` starts or ends
        // strictly inside a piece, so an arc holding a piece's last point holds the whole piece.
        arcs.iter()
            .flat_map(|a| [a.start, a.end])
            .filter(|p| self.contains(&ObjectId(*p)))
            .chain([self.end])
            .all(|p| arcs.iter().any(|a| a.contains(&ObjectId(p))))
    }
}

/// Whether `node` is responsible in `config` for every point of `arc`.
pub fn responsible_for_arc(config: &Configuration, node: &NodeId, arc: &Arc) -> bool {
    // The group is constant between consecutive member ids, so the end of each piece of `arc` cut
    // at member ids decides for the whole piece.
    config
        .members
        .iter()
        .map(|m| m.id.0)
        .filter(|p| arc.contains(&ObjectId(*p)))
        .chain([arc.end])
        .all(|p| config.is_responsible(node, &ObjectId(p)))
}

/// The ring cut at the member ids of both configurations: the pieces, in ring order, within each
/// of which the groups of both epochs are constant.
pub(crate) fn pieces(prev: &Configuration, next: &Configuration) -> Vec<Arc> {
    let mut cuts: Vec<[u8; 32]> = prev
        .members
        .iter()
        .chain(next.members.iter())
        .map(|m| m.id.0)
        .collect();
    cuts.sort();
    cuts.dedup();
    (0..cuts.len())
        .map(|i| Arc {
            start: cuts[(i + cuts.len() - 1) % cuts.len()],
            end: cuts[i],
        })
        .collect()
}

/// Joins consecutive pieces (in ring order, some left out) that meet and carry the same key,
/// also across the top of the ring.
pub(crate) fn merge<K: PartialEq + Clone>(pieces: Vec<(Arc, K)>) -> Vec<(Arc, K)> {
    let mut out: Vec<(Arc, K)> = Vec::new();
    for (arc, key) in pieces {
        match out.last_mut() {
            Some((a, k)) if a.end == arc.start && *k == key => a.end = arc.end,
            _ => out.push((arc, key)),
        }
    }
    if out.len() > 1 {
        let (first, last) = (out[0].clone(), out[out.len() - 1].clone());
        if last.0.end == first.0.start && last.1 == first.1 {
            out[0].0.start = last.0.start;
            out.pop();
        }
    }
    out
}

fn group_ids(config: &Configuration, point: &ObjectId, except: Option<&NodeId>) -> Vec<NodeId> {
    let mut ids: Vec<NodeId> = config
        .group(point)
        .iter()
        .map(|m| m.id)
        .filter(|id| Some(id) != except)
        .collect();
    ids.sort();
    ids
}

/// One unit of transfer: an arc the node is responsible for, the old group that holds it, and the
/// other members of its new group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub arc: Arc,
    pub sources: Vec<NodeId>,
    /// The other members of the arc's group in the new epoch: asked ([`TransferMessage::ListReady`])
    /// when old replicas deleted the range, since `f+1` of them that completed their own transfer
    /// include a correct one that holds everything.
    pub peers: Vec<NodeId>,
    /// The node was not responsible (or not ready) for this arc in the previous epoch: it may not
    /// answer reads of it before the unit is done.
    pub gained: bool,
}

/// The units node `me` transfers to enter `next` from `prev` (= epoch `next.epoch - 1`): every arc
/// it is responsible for in `next`, marked `gained` unless it was responsible for it in `prev` and
/// `was_ready` (it held everything it was responsible for in `prev`).
pub fn plan(prev: &Configuration, next: &Configuration, me: &NodeId, was_ready: bool) -> Vec<Unit> {
    if !next.is_member(me) {
        return Vec::new();
    }
    // Each piece keyed by (sources, peers, gained): pieces with the same key join into one unit.
    type Key = (Vec<NodeId>, Vec<NodeId>, bool);
    let keyed: Vec<(Arc, Key)> = pieces(prev, next)
        .into_iter()
        .filter_map(|arc| {
            let point = ObjectId(arc.end);
            if !next.is_responsible(me, &point) {
                return None;
            }
            let gained = !(was_ready && prev.is_responsible(me, &point));
            let sources = group_ids(prev, &point, None);
            let peers = group_ids(next, &point, Some(me));
            Some((arc, (sources, peers, gained)))
        })
        .collect();
    merge(keyed)
        .into_iter()
        .map(|(arc, (sources, peers, gained))| Unit {
            arc,
            sources,
            peers,
            gained,
        })
        .collect()
}

/// Most objects in one listing page.
pub const PAGE: usize = 256;
/// Most bytes of public-key blocks in one listing page (a larger single block still goes alone).
pub const PAGE_BYTES: usize = 512 * 1024;

/// The messages of state transfer and of garbage collection. The envelope carries the sender's
/// epoch (a transfer sends its requests in the epoch it enters).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferMessage {
    /// List the objects of `arc` after `after`, for a node entering `epoch`.
    List {
        rid: u64,
        epoch: Epoch,
        arc: Arc,
        after: Option<ObjectId>,
    },
    /// A page of a listing: content block ids and whole public-key blocks, in arc order, and the
    /// reference records of the page's content blocks (also of those held only as tombstones).
    /// `next` is the last id of this page when more follow (the next page lists what comes after
    /// it); `None` on the last page.
    Listing {
        rid: u64,
        content: Vec<ObjectId>,
        pk: Vec<PkBlock>,
        next: Option<ObjectId>,
        refs: Vec<RefRecord>,
    },
    /// Send content block `id`.
    Fetch { rid: u64, id: ObjectId },
    /// The content block, or `None` when this replica does not hold it.
    Content {
        rid: u64,
        id: ObjectId,
        #[serde(with = "serde_bytes")]
        data: Option<Vec<u8>>,
    },
    /// This replica has not moved to the asked epoch yet, or was not ready in the epoch before it
    /// (for [`TransferMessage::ListReady`] and [`TransferMessage::FetchReady`]: has not completed its
    /// transfer of the range): ask again later.
    NotYet { rid: u64 },
    /// Asked of another member of the range's group in `epoch`: list `arc` after `after` if this
    /// replica completed its transfer of `arc` into `epoch` or a later epoch (it then holds every
    /// write completed before `epoch`). Answered [`TransferMessage::Listing`], `NotYet` or `Gone`.
    ListReady {
        rid: u64,
        epoch: Epoch,
        arc: Arc,
        after: Option<ObjectId>,
    },
    /// Like [`TransferMessage::Fetch`], from a member of `id`'s group in `epoch` that completed its
    /// transfer of `id` into `epoch` or later: its "not held" proves no write of `id` completed
    /// before `epoch`. Answered `Content`, `NotYet` or `Gone`.
    FetchReady {
        rid: u64,
        epoch: Epoch,
        id: ObjectId,
    },
    /// This replica deleted what was asked: it handed the range to a later group, which `2f+1` of
    /// that group confirmed holding. Ask elsewhere.
    Gone { rid: u64 },
    /// Garbage collection: has this replica completed its transfer of `arc` into `epoch` or a later
    /// epoch (so it holds every write of `arc` completed before `epoch`)?
    HaveQuery { rid: u64, epoch: Epoch, arc: Arc },
    /// The answer to [`TransferMessage::HaveQuery`].
    Have { rid: u64, have: bool },
}

impl Protocol for TransferMessage {
    const ID: u8 = 3;
}

/// Options of a transfer.
#[derive(Clone, Debug)]
pub struct TransferOptions {
    /// Resend unanswered requests after this many milliseconds.
    pub retransmit_ms: u64,
    /// The first request id (random per run, like the client's).
    pub first_request_id: u64,
    #[cfg(feature = "mutants")]
    pub mutant: super::Mutant,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            retransmit_ms: 500,
            first_request_id: 1,
            #[cfg(feature = "mutants")]
            mutant: super::Mutant::None,
        }
    }
}

/// A unit that is still unfinished after this many retransmission rounds also asks the new
/// group's peers (as it does at once when an old replica answers `Gone`).
const PEERS_AFTER_STALLS: u32 = 6;

/// What the driver should do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferOutput {
    /// Send `bytes` to `to`. `urgent`: the request serves an on-demand fetch
    /// ([`Transfer::fetch_now`]) that a client's read waits for: it goes before the transfer's
    /// other requests and is not held back by the transfer's rate.
    Send {
        to: NodeId,
        bytes: Vec<u8>,
        urgent: bool,
    },
    /// Which of these content blocks does the node hold already? Answer with [`Transfer::held`]
    /// before anything else; only the others are fetched. `released` (a subset) are the ones
    /// the listings' records show released: a replica that deleted such a block after its own
    /// grace counts it as held, so that a transfer does not bring it back
    /// ([`crate::dbqs::replica::Replica::transfer_skips`]).
    Check {
        ids: Vec<ObjectId>,
        released: BTreeSet<ObjectId>,
    },
    /// Persist this verified content block (unless
    /// [`crate::dbqs::replica::Replica::accepts_transferred`] says the range moved on).
    StoreContent { id: ObjectId, data: Vec<u8> },
    /// Persist this verified public-key block if it is newer than the held one (unless
    /// [`crate::dbqs::replica::Replica::accepts_transferred`] says the range moved on).
    StorePk { block: PkBlock },
    /// Merge these reference records, signatures checked, into the records of their blocks
    /// ([`crate::dbqs::replica::Replica::merge_transferred_refs`], unless
    /// [`crate::dbqs::replica::Replica::accepts_transferred`] says the range moved on). Given
    /// after the unit's content blocks, before its [`TransferOutput::UnitDone`].
    StoreRefs {
        refs: Vec<(ObjectId, Vec<RefRecord>)>,
    },
    /// Every object of `arc` is stored (once everything above is persisted): the replica may answer
    /// reads in `arc` ([`crate::dbqs::replica::Replica::arc_ready`]) before the whole epoch is done.
    /// For an on-demand fetch ([`Transfer::fetch_now`]) `arc` is [`Arc::single`] of the object.
    UnitDone { epoch: Epoch, arc: Arc },
    /// Every unit is done: once everything above is persisted, the epoch's transfer is complete.
    Complete { epoch: Epoch },
}

/// One listing page's contents, as received.
struct Page {
    content: Vec<ObjectId>,
    pk: Vec<PkBlock>,
    next: Option<ObjectId>,
    refs: Vec<RefRecord>,
}

#[derive(Debug, Default)]
struct Listing {
    content: BTreeSet<ObjectId>,
    pk: BTreeMap<ObjectId, PkBlock>,
    /// Reference records, signatures checked, merged per block.
    refs: BTreeMap<ObjectId, Vec<RefRecord>>,
    /// Where the next page starts (`None` before the first page).
    cursor: Option<ObjectId>,
    done: bool,
    /// The replica deleted the range: it will not list it.
    gone: bool,
}

/// Whom a request goes to: an old replica, or a peer of the new group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Via {
    Old,
    Peer,
}

#[derive(Debug)]
struct Want {
    /// Old replicas that said they do not hold it.
    no_old: BTreeSet<NodeId>,
    /// Peers, ready for the range, that said they do not hold it.
    no_peer: BTreeSet<NodeId>,
    /// Replicas that deleted it.
    gone: BTreeSet<(Via, NodeId)>,
    /// Sources in the order they are tried: listers first, then the old group, then the peers.
    order: Vec<(Via, NodeId)>,
    next: usize,
    /// The source asked last, while its answer is awaited.
    asked: Option<NodeId>,
}

impl Want {
    /// The next source to ask, rotating over those that neither denied nor deleted it (peers only
    /// once they are asked at all).
    fn next_source(&mut self, peers: bool) -> Option<(Via, NodeId)> {
        for _ in 0..self.order.len() {
            let c = self.order[self.next % self.order.len()];
            self.next += 1;
            let refused = self.gone.contains(&c)
                || match c.0 {
                    Via::Old => self.no_old.contains(&c.1),
                    Via::Peer => !peers || self.no_peer.contains(&c.1),
                };
            if !refused {
                self.asked = Some(c.1);
                return Some(c);
            }
        }
        None
    }
}

#[derive(Debug)]
enum Phase {
    Listing,
    /// Waiting for the driver to say which of these it holds.
    Checking(BTreeMap<ObjectId, Want>),
    Fetching(BTreeMap<ObjectId, Want>),
    Done,
}

#[derive(Debug)]
struct UnitState {
    unit: Unit,
    /// An on-demand unit of this one object ([`Transfer::fetch_now`]).
    single: Option<ObjectId>,
    /// Listings of old replicas.
    listings: BTreeMap<NodeId, Listing>,
    /// Listings of new-group peers, once asked.
    peer_listings: BTreeMap<NodeId, Listing>,
    peers_asked: bool,
    /// Retransmission rounds that found the unit unfinished.
    stalls: u32,
    phase: Phase,
    /// The union of the completed listings' reference records, handed over when the unit is done.
    refs: BTreeMap<ObjectId, Vec<RefRecord>>,
    /// [`TransferOutput::UnitDone`] was given for it.
    announced: bool,
}

impl UnitState {
    fn new(unit: Unit, single: Option<ObjectId>) -> UnitState {
        UnitState {
            unit,
            single,
            listings: BTreeMap::new(),
            peer_listings: BTreeMap::new(),
            peers_asked: false,
            stalls: 0,
            phase: Phase::Listing,
            refs: BTreeMap::new(),
            announced: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Req {
    List,
    ListReady,
    Fetch(ObjectId),
    FetchReady(ObjectId),
}

/// The transfer into one epoch at one node.
#[derive(Debug)]
pub struct Transfer {
    epoch: Epoch,
    /// Old listings needed (`2f+1` of the old group).
    quorum: usize,
    /// Peer listings, or peer denials, needed (`f+1` of the new group).
    peer_quorum: usize,
    /// The units of the plan, then on-demand units of single objects.
    units: Vec<UnitState>,
    /// Outstanding requests: rid → (unit, node asked, what). A resend keeps the last few request
    /// ids of the same request alive, so a slow answer still counts.
    by_rid: BTreeMap<u64, (usize, NodeId, Req)>,
    recent: BTreeMap<(usize, NodeId, Req), VecDeque<u64>>,
    next_rid: u64,
    opts: TransferOptions,
    retransmit_at: u64,
    /// When the on-demand units' unanswered requests are sent again
    /// ([`Transfer::handle_on_demand_timeout`]), if any are unfinished.
    on_demand_at: u64,
    /// The current retransmission interval: doubles while nothing progresses, up to 16 times the
    /// base, and returns to the base on progress.
    backoff: u64,
    complete: bool,
    out: VecDeque<TransferOutput>,
    /// Which sources answered well or badly lately: orders whom each block is fetched from.
    health: Health,
    /// The time of the latest input that gave one.
    now: u64,
}

impl Transfer {
    /// The transfer of node `me` into `next`, from the group of `prev` (its predecessor).
    pub fn new(
        prev: &Configuration,
        next: &Configuration,
        me: &NodeId,
        was_ready: bool,
        opts: TransferOptions,
    ) -> Transfer {
        let units = plan(prev, next, me, was_ready)
            .into_iter()
            .map(|unit| UnitState::new(unit, None))
            .collect();
        Transfer {
            epoch: next.epoch,
            quorum: prev.quorum().quorum(),
            peer_quorum: next.quorum().one_correct(),
            units,
            by_rid: BTreeMap::new(),
            recent: BTreeMap::new(),
            next_rid: opts.first_request_id,
            backoff: opts.retransmit_ms,
            opts,
            retransmit_at: 0,
            on_demand_at: u64::MAX,
            complete: false,
            out: VecDeque::new(),
            health: Health::new(),
            now: 0,
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// (units done, units in all, content blocks still wanted), on-demand units left out.
    pub fn progress(&self) -> (usize, usize, usize) {
        let range = || self.units.iter().filter(|u| u.single.is_none());
        let done = range().filter(|u| matches!(u.phase, Phase::Done)).count();
        let wanted = range()
            .map(|u| {
                if let Phase::Fetching(w) = &u.phase {
                    w.len()
                } else {
                    0
                }
            })
            .sum();
        (done, range().count(), wanted)
    }

    /// A one-line account of each unit, for logs and failure reports.
    pub fn describe(&self) -> String {
        let units: Vec<String> = self
            .units
            .iter()
            .map(|u| {
                let listed = |ls: &BTreeMap<NodeId, Listing>| -> Vec<String> {
                    ls.iter()
                        .map(|(n, l)| {
                            let mark = if l.gone {
                                "✗"
                            } else if l.done {
                                "✓"
                            } else {
                                "…"
                            };
                            format!("{}{mark}", n.short())
                        })
                        .collect()
                };
                let phase = match &u.phase {
                    Phase::Listing => "listing".to_string(),
                    Phase::Checking(w) => format!("checking {}", w.len()),
                    Phase::Fetching(w) => format!("fetching {}", w.len()),
                    Phase::Done => "done".to_string(),
                };
                let what = u
                    .single
                    .map_or(String::new(), |x| format!("object {} ", x.short()));
                let peers = if u.peers_asked {
                    format!("; peers {}", listed(&u.peer_listings).join(" "))
                } else {
                    String::new()
                };
                format!("[{what}{phase}: {}{peers}]", listed(&u.listings).join(" "))
            })
            .collect();
        units.join(" ")
    }

    pub fn poll_output(&mut self) -> Option<TransferOutput> {
        self.out.pop_front()
    }

    pub fn next_timeout(&self) -> Option<u64> {
        (!self.complete).then_some(self.retransmit_at)
    }

    /// When [`Transfer::handle_on_demand_timeout`] has requests to send again: a driver whose
    /// ordinary requests still wait to be sent (and so holds [`Transfer::handle_timeout`] back)
    /// still resends the on-demand ones a read waits for.
    pub fn next_on_demand_timeout(&self) -> Option<u64> {
        let open = self
            .units
            .iter()
            .any(|u| u.single.is_some() && !matches!(u.phase, Phase::Done));
        (!self.complete && open).then_some(self.on_demand_at)
    }

    /// Resends what the on-demand units have unanswered, every base retransmission interval (no
    /// backoff: a client waits), without touching the other units.
    pub fn handle_on_demand_timeout(&mut self, now: u64) {
        self.now = self.now.max(now);
        if now < self.on_demand_at || self.complete {
            return;
        }
        self.on_demand_at = now + self.opts.retransmit_ms;
        for u in 0..self.units.len() {
            if self.units[u].single.is_some() && !matches!(self.units[u].phase, Phase::Done) {
                self.retransmit(u);
            }
        }
    }

    /// Marks done, before [`Transfer::start`], every unit whose arc lies within `done`: a driver
    /// resuming after a crash passes the arcs it persisted as done (after [`TransferOutput::UnitDone`])
    /// and they are not listed or fetched again. They are announced done like the others. Returns
    /// how many units it marked.
    pub fn skip(&mut self, done: &Arc) -> usize {
        let mut n = 0;
        for u in &mut self.units {
            if matches!(u.phase, Phase::Listing)
                && u.listings.is_empty()
                && done.covers(&u.unit.arc)
            {
                u.phase = Phase::Done;
                n += 1;
            }
        }
        n
    }

    /// Sends the first requests.
    pub fn start(&mut self, now: u64) {
        self.now = now;
        for u in 0..self.units.len() {
            if matches!(self.units[u].phase, Phase::Done) {
                continue; // skipped
            }
            self.ask_sources(u);
        }
        self.retransmit_at = now + self.opts.retransmit_ms;
        self.check_complete();
    }

    fn ask_sources(&mut self, u: usize) {
        for n in self.units[u].unit.sources.clone() {
            self.units[u].listings.insert(n, Listing::default());
            self.request(u, n, Req::List);
        }
    }

    /// Fetches object `x` now, ahead of its unit, so that a read of it need not wait for the whole
    /// range: from the same old group with the same rules (a public-key block as the highest validly
    /// signed among `2f+1` listings of `(x-1, x]`, a content block from any copy that hashes to `x`,
    /// absence only when `2f+1` deny), or from the new group's peers like a unit. When it is stored,
    /// [`TransferOutput::UnitDone`] names [`Arc::single`]`(x)`. Returns whether `x` is being fetched
    /// (false: `x` is not in a gained unit still transferring, so reads of it need not wait here).
    pub fn fetch_now(&mut self, now: u64, x: ObjectId) -> bool {
        self.now = now;
        if self.complete {
            return false;
        }
        if let Some(u) = self.units.iter().find(|u| u.single == Some(x)) {
            return !matches!(u.phase, Phase::Done);
        }
        let Some(parent) = self
            .units
            .iter()
            .find(|u| u.single.is_none() && u.unit.arc.contains(&x))
        else {
            return false;
        };
        if !parent.unit.gained || matches!(parent.phase, Phase::Done) {
            return false;
        }
        let unit = Unit {
            arc: Arc::single(&x),
            ..parent.unit.clone()
        };
        let peers = parent.peers_asked;
        self.units.push(UnitState::new(unit, Some(x)));
        let u = self.units.len() - 1;
        self.ask_sources(u);
        if peers {
            self.ask_peers(u);
        }
        self.retransmit_at = self.retransmit_at.min(now + self.opts.retransmit_ms);
        self.on_demand_at = self.on_demand_at.min(now + self.opts.retransmit_ms);
        true
    }

    /// Also asks the unit's new-group peers (once).
    fn ask_peers(&mut self, u: usize) {
        if self.units[u].peers_asked {
            return;
        }
        self.units[u].peers_asked = true;
        let peers = self.units[u].unit.peers.clone();
        match &mut self.units[u].phase {
            Phase::Listing => {
                for n in peers {
                    self.units[u].peer_listings.insert(n, Listing::default());
                    self.request(u, n, Req::ListReady);
                }
            }
            // Peers are in every want's order already: they are tried from now on.
            Phase::Checking(_) | Phase::Fetching(_) | Phase::Done => {}
        }
    }

    fn fetch(&mut self, u: usize, id: ObjectId, (via, n): (Via, NodeId)) {
        let req = match via {
            Via::Old => Req::Fetch(id),
            Via::Peer => Req::FetchReady(id),
        };
        self.request(u, n, req);
    }

    fn request(&mut self, u: usize, to: NodeId, req: Req) {
        const KEEP: usize = 8;
        let rid = self.next_rid;
        self.next_rid = self.next_rid.wrapping_add(1);
        self.by_rid.insert(rid, (u, to, req));
        let recent = self.recent.entry((u, to, req)).or_default();
        recent.push_back(rid);
        if recent.len() > KEEP {
            if let Some(old) = recent.pop_front() {
                self.by_rid.remove(&old);
            }
        }
        let epoch = self.epoch;
        let arc = self.units[u].unit.arc;
        let msg = match req {
            Req::List => TransferMessage::List {
                rid,
                epoch,
                arc,
                after: self.units[u].listings.get(&to).and_then(|l| l.cursor),
            },
            Req::ListReady => TransferMessage::ListReady {
                rid,
                epoch,
                arc,
                after: self.units[u].peer_listings.get(&to).and_then(|l| l.cursor),
            },
            Req::Fetch(id) => TransferMessage::Fetch { rid, id },
            Req::FetchReady(id) => TransferMessage::FetchReady { rid, epoch, id },
        };
        self.out.push_back(TransferOutput::Send {
            to,
            bytes: encode_msg(epoch, msg),
            urgent: self.units[u].single.is_some(),
        });
    }

    /// Resends what is unanswered.
    pub fn handle_timeout(&mut self, now: u64) {
        self.now = self.now.max(now);
        if now < self.retransmit_at || self.complete {
            return;
        }
        self.retransmit_at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(self.opts.retransmit_ms * 16);
        for u in 0..self.units.len() {
            if matches!(self.units[u].phase, Phase::Done) {
                continue;
            }
            self.units[u].stalls += 1;
            if self.units[u].stalls >= PEERS_AFTER_STALLS {
                self.ask_peers(u);
            }
            self.retransmit(u);
        }
    }

    /// Sends unit `u`'s unanswered requests again.
    fn retransmit(&mut self, u: usize) {
        let unit = &mut self.units[u];
        let peers = unit.peers_asked;
        match &mut unit.phase {
            Phase::Listing => {
                let pending = |ls: &BTreeMap<NodeId, Listing>| -> Vec<NodeId> {
                    ls.iter()
                        .filter(|(_, l)| !l.done && !l.gone)
                        .map(|(n, _)| *n)
                        .collect()
                };
                let (old, new) = (pending(&unit.listings), pending(&unit.peer_listings));
                for n in old {
                    self.request(u, n, Req::List);
                }
                for n in new {
                    self.request(u, n, Req::ListReady);
                }
            }
            Phase::Fetching(wants) => {
                let asks: Vec<(ObjectId, (Via, NodeId))> = wants
                    .iter_mut()
                    .filter_map(|(id, w)| w.next_source(peers).map(|c| (*id, c)))
                    .collect();
                for (id, c) in asks {
                    self.fetch(u, id, c);
                }
            }
            Phase::Checking(_) | Phase::Done => {}
        }
    }

    /// The driver's request to `node` failed in transport (no connection, or no answer in time):
    /// every block whose fetch waits on it is asked of its next source now, and `node` goes last
    /// for the blocks wanted from here on until its health recovers.
    pub fn peer_failed(&mut self, now: u64, node: NodeId) {
        self.now = self.now.max(now);
        self.health.failed(node, self.now);
        for u in 0..self.units.len() {
            let peers = self.units[u].peers_asked;
            let Phase::Fetching(wants) = &mut self.units[u].phase else {
                continue;
            };
            let asks: Vec<(ObjectId, (Via, NodeId))> = wants
                .iter_mut()
                .filter(|(_, w)| w.asked == Some(node))
                .filter_map(|(id, w)| w.next_source(peers).map(|c| (*id, c)))
                .collect();
            for (id, c) in asks {
                self.fetch(u, id, c);
            }
        }
    }

    /// Handles a reply from `from`.
    pub fn handle_message(&mut self, now: u64, from: NodeId, bytes: &[u8]) {
        self.now = self.now.max(now);
        let Ok(env) = decode::<TransferMessage>(bytes) else {
            self.health.failed(from, self.now);
            return;
        };
        let rid = match &env.msg {
            TransferMessage::Listing { rid, .. }
            | TransferMessage::Content { rid, .. }
            | TransferMessage::NotYet { rid }
            | TransferMessage::Gone { rid } => *rid,
            _ => return,
        };
        let Some(&(u, asked, req)) = self.by_rid.get(&rid) else {
            return;
        };
        if asked != from {
            return;
        }
        // Every request id of this request is answered now.
        for old in self.recent.remove(&(u, asked, req)).unwrap_or_default() {
            self.by_rid.remove(&old);
        }
        if matches!(
            env.msg,
            TransferMessage::Listing { .. } | TransferMessage::Content { .. }
        ) {
            self.backoff = self.opts.retransmit_ms;
        }
        match (env.msg, req) {
            (TransferMessage::NotYet { .. }, _) => {} // asked again at the next timeout
            (TransferMessage::Gone { .. }, Req::List) => {
                if let Some(l) = self.units[u].listings.get_mut(&from) {
                    l.gone = true;
                }
                self.ask_peers(u);
            }
            (TransferMessage::Gone { .. }, Req::ListReady) => {
                if let Some(l) = self.units[u].peer_listings.get_mut(&from) {
                    l.gone = true;
                }
            }
            (TransferMessage::Gone { .. }, Req::Fetch(id)) => {
                self.ask_peers(u);
                self.on_gone(u, (Via::Old, from), id);
            }
            (TransferMessage::Gone { .. }, Req::FetchReady(id)) => {
                self.on_gone(u, (Via::Peer, from), id)
            }
            (
                TransferMessage::Listing {
                    content,
                    pk,
                    next,
                    refs,
                    ..
                },
                Req::List | Req::ListReady,
            ) => {
                let via = if req == Req::List {
                    Via::Old
                } else {
                    Via::Peer
                };
                self.on_listing(
                    u,
                    via,
                    from,
                    Page {
                        content,
                        pk,
                        next,
                        refs,
                    },
                )
            }
            (TransferMessage::Content { id, data, .. }, Req::Fetch(want)) if id == want => {
                self.on_content(u, (Via::Old, from), id, data)
            }
            (TransferMessage::Content { id, data, .. }, Req::FetchReady(want)) if id == want => {
                self.on_content(u, (Via::Peer, from), id, data)
            }
            _ => {}
        }
        self.check_complete();
    }

    fn on_listing(&mut self, u: usize, via: Via, from: NodeId, page: Page) {
        let Page {
            content,
            pk,
            next,
            refs: records,
        } = page;
        let unit = &mut self.units[u];
        if !matches!(unit.phase, Phase::Listing) {
            return;
        }
        let arc = unit.unit.arc;
        let listings = match via {
            Via::Old => &mut unit.listings,
            Via::Peer => &mut unit.peer_listings,
        };
        let Some(l) = listings.get_mut(&from) else {
            return;
        };
        if l.done || l.gone {
            return;
        }
        l.content
            .extend(content.into_iter().filter(|id| arc.contains(id)));
        for b in pk {
            let id = b.id();
            if arc.contains(&id)
                && b.verify().is_ok()
                && l.pk.get(&id).is_none_or(|cur| b.stamp() > cur.stamp())
            {
                l.pk.insert(id, b);
            }
        }
        for r in records {
            if arc.contains(&r.id) && r.verify().is_ok() {
                let held = l.refs.entry(r.id).or_default();
                refs::merge(held, &r.id.clone(), &[r]);
            }
        }
        // A page must move forward along the arc; one that does not ends the listing.
        let forward = |n: &ObjectId| {
            arc.contains(n)
                && l.cursor
                    .is_none_or(|c| arc.order_key(n) > arc.order_key(&c))
        };
        match next {
            Some(n) if forward(&n) => {
                l.cursor = Some(n);
                let req = match via {
                    Via::Old => Req::List,
                    Via::Peer => Req::ListReady,
                };
                self.request(u, from, req);
            }
            // A page that does not move forward (a late answer to an earlier page, or a liar) says
            // nothing about where the listing ends; the next timeout asks again.
            Some(_) => {}
            None => {
                l.done = true;
                let done = |ls: &BTreeMap<NodeId, Listing>| ls.values().filter(|l| l.done).count();
                // `2f+1` old replicas that moved on include one holding every completed write; so
                // do `f+1` peers that completed their own transfer of the range.
                if done(&unit.listings) >= self.quorum
                    || done(&unit.peer_listings) >= self.peer_quorum
                {
                    self.start_fetching(u);
                }
            }
        }
    }

    /// Enough complete listings: store the highest public-key blocks, fetch the content.
    fn start_fetching(&mut self, u: usize) {
        let unit = &mut self.units[u];
        let listers: Vec<((Via, NodeId), &Listing)> = unit
            .listings
            .iter()
            .map(|(n, l)| ((Via::Old, *n), l))
            .chain(unit.peer_listings.iter().map(|(n, l)| ((Via::Peer, *n), l)))
            .filter(|(_, l)| l.done)
            .collect();
        let mut best: BTreeMap<ObjectId, PkBlock> = BTreeMap::new();
        let mut content: BTreeMap<ObjectId, Vec<(Via, NodeId)>> = BTreeMap::new();
        #[cfg(feature = "mutants")]
        let pk_from = if self.opts.mutant == super::Mutant::TransferFromOne {
            1
        } else {
            listers.len()
        };
        #[cfg(not(feature = "mutants"))]
        let pk_from = listers.len();
        for (_, l) in listers.iter().take(pk_from) {
            for (id, b) in &l.pk {
                if best.get(id).is_none_or(|cur| b.stamp() > cur.stamp()) {
                    best.insert(*id, b.clone());
                }
            }
        }
        for (c, l) in &listers {
            for id in &l.content {
                content.entry(*id).or_default().push(*c);
            }
        }
        #[cfg(feature = "mutants")]
        let drop_refs = self.opts.mutant == super::Mutant::DropRefsInTransfer;
        #[cfg(not(feature = "mutants"))]
        let drop_refs = false;
        let mut union: BTreeMap<ObjectId, Vec<RefRecord>> = BTreeMap::new();
        for (_, l) in listers.iter().filter(|_| !drop_refs) {
            for (id, records) in &l.refs {
                refs::merge(union.entry(*id).or_default(), id, records);
            }
        }
        unit.refs = union;
        for block in best.into_values() {
            self.out.push_back(TransferOutput::StorePk { block });
        }
        let others: Vec<(Via, NodeId)> = unit
            .unit
            .sources
            .iter()
            .map(|n| (Via::Old, *n))
            .chain(unit.unit.peers.iter().map(|n| (Via::Peer, *n)))
            .collect();
        let wants: BTreeMap<ObjectId, Want> = content
            .into_iter()
            .map(|(id, listed_by)| {
                // Listers healthiest first; equally healthy ones in an order rotated by the id.
                let n = listed_by.len().max(1);
                let rotate = usize::from(id.0[0]) % n;
                let mut keyed: Vec<(u32, usize, (Via, NodeId))> = listed_by
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        (
                            self.health.penalty(&c.1, self.now),
                            (i + n - rotate) % n,
                            *c,
                        )
                    })
                    .collect();
                keyed.sort();
                let mut order: Vec<(Via, NodeId)> = keyed.into_iter().map(|(_, _, c)| c).collect();
                order.extend(others.iter().filter(|c| !listed_by.contains(c)));
                (
                    id,
                    Want {
                        no_old: BTreeSet::new(),
                        no_peer: BTreeSet::new(),
                        gone: BTreeSet::new(),
                        order,
                        next: 0,
                        asked: None,
                    },
                )
            })
            .collect();
        if wants.is_empty() {
            unit.phase = Phase::Done;
        } else {
            let ids: Vec<ObjectId> = wants.keys().copied().collect();
            let released = ids
                .iter()
                .filter(|id| unit.refs.get(id).is_some_and(|r| refs::released(r)))
                .copied()
                .collect();
            unit.phase = Phase::Checking(wants);
            self.out.push_back(TransferOutput::Check { ids, released });
        }
    }

    /// The driver's answer to [`TransferOutput::Check`]: the content blocks of `ids` it holds.
    pub fn held(&mut self, ids: &[ObjectId]) {
        let held: BTreeSet<ObjectId> = ids.iter().copied().collect();
        for u in 0..self.units.len() {
            let peers = self.units[u].peers_asked;
            let Phase::Checking(wants) = &mut self.units[u].phase else {
                continue;
            };
            let mut wants = std::mem::take(wants);
            wants.retain(|id, _| !held.contains(id));
            let first: Vec<(ObjectId, (Via, NodeId))> = wants
                .iter_mut()
                .filter_map(|(id, w)| w.next_source(peers).map(|c| (*id, c)))
                .collect();
            self.units[u].phase = if wants.is_empty() {
                Phase::Done
            } else {
                Phase::Fetching(wants)
            };
            for (id, c) in first {
                self.fetch(u, id, c);
            }
        }
        self.check_complete();
    }

    fn on_content(&mut self, u: usize, from: (Via, NodeId), id: ObjectId, data: Option<Vec<u8>>) {
        let (quorum, peer_quorum) = (self.quorum, self.peer_quorum);
        let peers = self.units[u].peers_asked;
        let Phase::Fetching(wants) = &mut self.units[u].phase else {
            return;
        };
        let Some(w) = wants.get_mut(&id) else { return };
        let mut ask = None;
        match data {
            Some(data) if check_content(&id, &data).is_ok() => {
                self.health.good(from.1, self.now);
                wants.remove(&id);
                self.out
                    .push_back(TransferOutput::StoreContent { id, data });
            }
            bad => {
                if bad.is_some() {
                    // A copy that does not hash to its id: a lie, counted against its sender.
                    self.health.failed(from.1, self.now);
                }
                match from.0 {
                    Via::Old => w.no_old.insert(from.1),
                    Via::Peer => w.no_peer.insert(from.1),
                };
                // `2f+1` old replicas do not hold it (a completed write has at most `2f` such,
                // liars included), or `f+1` peers that hold every write completed before this
                // epoch do not: it was never a completed write.
                if w.no_old.len() >= quorum || w.no_peer.len() >= peer_quorum {
                    wants.remove(&id);
                } else {
                    ask = w.next_source(peers);
                }
            }
        }
        if let Some(c) = ask {
            self.fetch(u, id, c);
        }
        if let Phase::Fetching(wants) = &self.units[u].phase {
            if wants.is_empty() {
                self.units[u].phase = Phase::Done;
            }
        }
    }

    /// `from` deleted content block `id`: ask the next source.
    fn on_gone(&mut self, u: usize, from: (Via, NodeId), id: ObjectId) {
        let peers = self.units[u].peers_asked;
        let Phase::Fetching(wants) = &mut self.units[u].phase else {
            return;
        };
        let Some(w) = wants.get_mut(&id) else { return };
        w.gone.insert(from);
        if let Some(c) = w.next_source(peers) {
            self.fetch(u, id, c);
        }
    }

    fn check_complete(&mut self) {
        for u in &mut self.units {
            if matches!(u.phase, Phase::Done) && !u.announced {
                u.announced = true;
                let refs: Vec<(ObjectId, Vec<RefRecord>)> =
                    std::mem::take(&mut u.refs).into_iter().collect();
                if !refs.is_empty() {
                    self.out.push_back(TransferOutput::StoreRefs { refs });
                }
                self.out.push_back(TransferOutput::UnitDone {
                    epoch: self.epoch,
                    arc: u.unit.arc,
                });
            }
        }
        if !self.complete
            && self
                .units
                .iter()
                .all(|u| u.single.is_some() || matches!(u.phase, Phase::Done))
        {
            self.complete = true;
            self.by_rid.clear();
            self.recent.clear();
            self.out
                .push_back(TransferOutput::Complete { epoch: self.epoch });
        }
    }
}
