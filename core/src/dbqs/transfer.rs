//! State transfer between epochs (DESIGN §4, "State transfer").
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
//! - content blocks are listed by id and fetched from any old replica, accepted when they hash to
//!   their id; an id is dropped only when `2f+1` old replicas say they do not hold it (a completed
//!   write has at most `2f` such replicas, counting liars), so a Byzantine lister can neither stall
//!   the transfer with an id that does not exist nor make it drop one that does;
//! - when every unit is done the transfer is complete and the replica may answer reads of what it
//!   gained ([`crate::dbqs::replica::Replica::transfer_complete`]).
//!
//! Non-goals here: persistence of progress and garbage collection of lost ranges (the driver's and a
//! later step's), on-demand fetch of single objects (a read waits for its unit instead).
//!
//! Fault model: up to `f` replicas of each old group may list objects that do not exist, claim
//! versions they cannot produce, serve wrong bytes or forged blocks, or go silent; every object is
//! verified before it is stored, and every claim is checked against the object fetched.

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
}

/// One unit of transfer: an arc the node is responsible for and the old group that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub arc: Arc,
    pub sources: Vec<NodeId>,
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
    let mut cuts: Vec<[u8; 32]> = prev
        .members
        .iter()
        .chain(next.members.iter())
        .map(|m| m.id.0)
        .collect();
    cuts.sort();
    cuts.dedup();
    let mut units: Vec<Unit> = Vec::new();
    for (i, end) in cuts.iter().enumerate() {
        let start = cuts[(i + cuts.len() - 1) % cuts.len()];
        let point = ObjectId(*end);
        if !next.is_responsible(me, &point) {
            continue;
        }
        let gained = !(was_ready && prev.is_responsible(me, &point));
        let mut sources: Vec<NodeId> = prev.group(&point).iter().map(|m| m.id).collect();
        sources.sort();
        // Merge with the previous unit when it ends where this one starts and has the same sources.
        match units.last_mut() {
            Some(u) if u.arc.end == start && u.sources == sources && u.gained == gained => {
                u.arc.end = *end
            }
            _ => units.push(Unit {
                gained,
                arc: Arc { start, end: *end },
                sources,
            }),
        }
    }
    // The first and last units may meet across the top of the ring.
    if units.len() > 1 {
        let (first, last) = (units[0].clone(), units[units.len() - 1].clone());
        if last.arc.end == first.arc.start
            && last.sources == first.sources
            && last.gained == first.gained
        {
            units[0].arc.start = last.arc.start;
            units.pop();
        }
    }
    units
}

/// Most objects in one listing page.
pub const PAGE: usize = 256;
/// Most bytes of public-key blocks in one listing page (a larger single block still goes alone).
pub const PAGE_BYTES: usize = 512 * 1024;

/// The messages of state transfer. The envelope carries the sender's epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferMessage {
    /// List the objects of `arc` after `after`, for a node entering `epoch`.
    List {
        rid: u64,
        epoch: Epoch,
        arc: Arc,
        after: Option<ObjectId>,
    },
    /// A page of a listing: content block ids and whole public-key blocks, in arc order. `next` is
    /// the last id of this page when more follow (the next page lists what comes after it); `None`
    /// on the last page.
    Listing {
        rid: u64,
        content: Vec<ObjectId>,
        pk: Vec<PkBlock>,
        next: Option<ObjectId>,
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
    /// This replica has not moved to the asked epoch yet, or was not ready in the epoch before it:
    /// ask again later.
    NotYet { rid: u64 },
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

/// What the driver should do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferOutput {
    Send {
        to: NodeId,
        bytes: Vec<u8>,
    },
    /// Which of these content blocks does the node hold already? Answer with [`Transfer::held`]
    /// before anything else; only the others are fetched.
    Check {
        ids: Vec<ObjectId>,
    },
    /// Persist this verified content block.
    StoreContent {
        id: ObjectId,
        data: Vec<u8>,
    },
    /// Persist this verified public-key block if it is newer than the held one.
    StorePk {
        block: PkBlock,
    },
    /// Every object of `arc` is stored (once everything above is persisted): the replica may answer
    /// reads in `arc` ([`crate::dbqs::replica::Replica::arc_ready`]) before the whole epoch is done.
    UnitDone {
        epoch: Epoch,
        arc: Arc,
    },
    /// Every unit is done: once everything above is persisted, the epoch's transfer is complete.
    Complete {
        epoch: Epoch,
    },
}

#[derive(Debug, Default)]
struct Listing {
    content: BTreeSet<ObjectId>,
    pk: BTreeMap<ObjectId, PkBlock>,
    /// Where the next page starts (`None` before the first page).
    cursor: Option<ObjectId>,
    done: bool,
}

#[derive(Debug)]
struct Want {
    /// Old replicas that said they do not hold it.
    no: BTreeSet<NodeId>,
    /// Next source to ask, as an index into the unit's sources (listers are tried first).
    order: Vec<NodeId>,
    next: usize,
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
    listings: BTreeMap<NodeId, Listing>,
    phase: Phase,
    /// [`TransferOutput::UnitDone`] was given for it.
    announced: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Req {
    List,
    Fetch(ObjectId),
}

/// The transfer into one epoch at one node.
#[derive(Debug)]
pub struct Transfer {
    epoch: Epoch,
    quorum: usize,
    units: Vec<UnitState>,
    /// Outstanding requests: rid → (unit, node asked, what). A resend keeps the last few request
    /// ids of the same request alive, so a slow answer still counts.
    by_rid: BTreeMap<u64, (usize, NodeId, Req)>,
    recent: BTreeMap<(usize, NodeId, Req), VecDeque<u64>>,
    next_rid: u64,
    opts: TransferOptions,
    retransmit_at: u64,
    /// The current retransmission interval: doubles while nothing progresses, up to 16 times the
    /// base, and returns to the base on progress.
    backoff: u64,
    complete: bool,
    out: VecDeque<TransferOutput>,
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
            .map(|unit| UnitState {
                unit,
                listings: BTreeMap::new(),
                phase: Phase::Listing,
                announced: false,
            })
            .collect();
        let quorum = prev.quorum().quorum();
        Transfer {
            epoch: next.epoch,
            quorum,
            units,
            by_rid: BTreeMap::new(),
            recent: BTreeMap::new(),
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

    /// (units done, units in all, content blocks still wanted).
    pub fn progress(&self) -> (usize, usize, usize) {
        let done = self
            .units
            .iter()
            .filter(|u| matches!(u.phase, Phase::Done))
            .count();
        let wanted = self
            .units
            .iter()
            .map(|u| {
                if let Phase::Fetching(w) = &u.phase {
                    w.len()
                } else {
                    0
                }
            })
            .sum();
        (done, self.units.len(), wanted)
    }

    /// A one-line account of each unit, for logs and failure reports.
    pub fn describe(&self) -> String {
        let units: Vec<String> = self
            .units
            .iter()
            .map(|u| {
                let listed: Vec<String> = u
                    .listings
                    .iter()
                    .map(|(n, l)| format!("{}{}", n.short(), if l.done { "✓" } else { "…" }))
                    .collect();
                let phase = match &u.phase {
                    Phase::Listing => "listing".to_string(),
                    Phase::Checking(w) => format!("checking {}", w.len()),
                    Phase::Fetching(w) => format!("fetching {}", w.len()),
                    Phase::Done => "done".to_string(),
                };
                format!("[{phase}: {}]", listed.join(" "))
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
        for u in 0..self.units.len() {
            if matches!(self.units[u].phase, Phase::Done) {
                continue; // skipped
            }
            for n in self.units[u].unit.sources.clone() {
                self.units[u].listings.insert(n, Listing::default());
                self.request(u, n, Req::List);
            }
        }
        self.retransmit_at = now + self.opts.retransmit_ms;
        self.check_complete();
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
        let msg = match req {
            Req::List => {
                let arc = self.units[u].unit.arc;
                let after = self.units[u].listings.get(&to).and_then(|l| l.cursor);
                TransferMessage::List {
                    rid,
                    epoch: self.epoch,
                    arc,
                    after,
                }
            }
            Req::Fetch(id) => TransferMessage::Fetch { rid, id },
        };
        self.out.push_back(TransferOutput::Send {
            to,
            bytes: encode_msg(self.epoch, msg),
        });
    }

    /// Resends what is unanswered.
    pub fn handle_timeout(&mut self, now: u64) {
        if now < self.retransmit_at || self.complete {
            return;
        }
        self.retransmit_at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(self.opts.retransmit_ms * 16);
        for u in 0..self.units.len() {
            match &mut self.units[u].phase {
                Phase::Listing => {
                    let pending: Vec<NodeId> = self.units[u]
                        .listings
                        .iter()
                        .filter(|(_, l)| !l.done)
                        .map(|(n, _)| *n)
                        .collect();
                    for n in pending {
                        self.request(u, n, Req::List);
                    }
                }
                Phase::Fetching(wants) => {
                    let mut asks = Vec::new();
                    for (id, w) in wants.iter_mut() {
                        // Rotate to the next source that has not said no.
                        for _ in 0..w.order.len() {
                            let n = w.order[w.next % w.order.len()];
                            w.next += 1;
                            if !w.no.contains(&n) {
                                asks.push((*id, n));
                                break;
                            }
                        }
                    }
                    for (id, n) in asks {
                        self.request(u, n, Req::Fetch(id));
                    }
                }
                Phase::Checking(_) | Phase::Done => {}
            }
        }
    }

    /// Handles a reply from `from`.
    pub fn handle_message(&mut self, _now: u64, from: NodeId, bytes: &[u8]) {
        let Ok(env) = decode::<TransferMessage>(bytes) else {
            return;
        };
        let rid = match &env.msg {
            TransferMessage::Listing { rid, .. }
            | TransferMessage::Content { rid, .. }
            | TransferMessage::NotYet { rid } => *rid,
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
        if !matches!(env.msg, TransferMessage::NotYet { .. }) {
            self.backoff = self.opts.retransmit_ms;
        }
        match (env.msg, req) {
            (TransferMessage::NotYet { .. }, _) => {} // asked again at the next timeout
            (
                TransferMessage::Listing {
                    content, pk, next, ..
                },
                Req::List,
            ) => self.on_listing(u, from, content, pk, next),
            (TransferMessage::Content { id, data, .. }, Req::Fetch(want)) if id == want => {
                self.on_content(u, from, id, data)
            }
            _ => {}
        }
        self.check_complete();
    }

    fn on_listing(
        &mut self,
        u: usize,
        from: NodeId,
        content: Vec<ObjectId>,
        pk: Vec<PkBlock>,
        next: Option<ObjectId>,
    ) {
        let unit = &mut self.units[u];
        if !matches!(unit.phase, Phase::Listing) {
            return;
        }
        let arc = unit.unit.arc;
        let Some(l) = unit.listings.get_mut(&from) else {
            return;
        };
        if l.done {
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
        // A page must move forward along the arc; one that does not ends the listing.
        let forward = |n: &ObjectId| {
            arc.contains(n)
                && l.cursor
                    .is_none_or(|c| arc.order_key(n) > arc.order_key(&c))
        };
        match next {
            Some(n) if forward(&n) => {
                l.cursor = Some(n);
                self.request(u, from, Req::List);
            }
            // A page that does not move forward (a late answer to an earlier page, or a liar) says
            // nothing about where the listing ends; the next timeout asks again.
            Some(_) => {}
            None => {
                l.done = true;
                let done = unit.listings.values().filter(|l| l.done).count();
                if done >= self.quorum {
                    self.start_fetching(u);
                }
            }
        }
    }

    /// Enough complete listings: store the highest public-key blocks, fetch the content.
    fn start_fetching(&mut self, u: usize) {
        let unit = &mut self.units[u];
        let listers: Vec<(&NodeId, &Listing)> =
            unit.listings.iter().filter(|(_, l)| l.done).collect();
        let mut best: BTreeMap<ObjectId, PkBlock> = BTreeMap::new();
        let mut content: BTreeMap<ObjectId, Vec<NodeId>> = BTreeMap::new();
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
        for (n, l) in &listers {
            for id in &l.content {
                content.entry(*id).or_default().push(**n);
            }
        }
        for block in best.into_values() {
            self.out.push_back(TransferOutput::StorePk { block });
        }
        let sources = unit.unit.sources.clone();
        let wants: BTreeMap<ObjectId, Want> = content
            .into_iter()
            .map(|(id, listed_by)| {
                let mut order = listed_by.clone();
                order.extend(sources.iter().filter(|s| !listed_by.contains(s)));
                (
                    id,
                    Want {
                        no: BTreeSet::new(),
                        order,
                        next: 1,
                    },
                )
            })
            .collect();
        if wants.is_empty() {
            unit.phase = Phase::Done;
        } else {
            let ids = wants.keys().copied().collect();
            unit.phase = Phase::Checking(wants);
            self.out.push_back(TransferOutput::Check { ids });
        }
    }

    /// The driver's answer to [`TransferOutput::Check`]: the content blocks of `ids` it holds.
    pub fn held(&mut self, ids: &[ObjectId]) {
        let held: BTreeSet<ObjectId> = ids.iter().copied().collect();
        for u in 0..self.units.len() {
            let Phase::Checking(wants) = &mut self.units[u].phase else {
                continue;
            };
            let mut wants = std::mem::take(wants);
            wants.retain(|id, _| !held.contains(id));
            let first: Vec<(ObjectId, NodeId)> =
                wants.iter().map(|(id, w)| (*id, w.order[0])).collect();
            self.units[u].phase = if wants.is_empty() {
                Phase::Done
            } else {
                Phase::Fetching(wants)
            };
            for (id, n) in first {
                self.request(u, n, Req::Fetch(id));
            }
        }
        self.check_complete();
    }

    fn on_content(&mut self, u: usize, from: NodeId, id: ObjectId, data: Option<Vec<u8>>) {
        let quorum = self.quorum;
        let Phase::Fetching(wants) = &mut self.units[u].phase else {
            return;
        };
        let Some(w) = wants.get_mut(&id) else { return };
        match data {
            Some(data) if check_content(&id, &data).is_ok() => {
                wants.remove(&id);
                self.out
                    .push_back(TransferOutput::StoreContent { id, data });
            }
            _ => {
                w.no.insert(from);
                if w.no.len() >= quorum {
                    // 2f+1 old replicas do not hold it: it was never a completed write.
                    wants.remove(&id);
                } else {
                    let mut ask = None;
                    for _ in 0..w.order.len() {
                        let n = w.order[w.next % w.order.len()];
                        w.next += 1;
                        if !w.no.contains(&n) {
                            ask = Some(n);
                            break;
                        }
                    }
                    if let Some(n) = ask {
                        self.request(u, n, Req::Fetch(id));
                    }
                }
            }
        }
        if let Phase::Fetching(wants) = &self.units[u].phase {
            if wants.is_empty() {
                self.units[u].phase = Phase::Done;
            }
        }
    }

    fn check_complete(&mut self) {
        for u in &mut self.units {
            if matches!(u.phase, Phase::Done) && !u.announced {
                u.announced = true;
                self.out.push_back(TransferOutput::UnitDone {
                    epoch: self.epoch,
                    arc: u.unit.arc,
                });
            }
        }
        if !self.complete && self.units.iter().all(|u| matches!(u.phase, Phase::Done)) {
            self.complete = true;
            self.by_rid.clear();
            self.recent.clear();
            self.out
                .push_back(TransferOutput::Complete { epoch: self.epoch });
        }
    }
}
