//! The replica state machine.
//!
//! A replica serves requests of its own epoch over a [`Store`]:
//! - content blocks are stored only if they hash to their id;
//! - public-key blocks are stored only if the owner's signature verifies, and only if newer than the
//!   held value; an older value is acknowledged (with the held stamp) without being stored;
//! - a request of an older epoch is answered [`DbqsMessage::Stale`], one of a newer epoch
//!   [`DbqsMessage::Behind`] (the client then pushes the configurations; the replica verifies and
//!   installs them, then serves);
//! - after moving to an epoch in which it gained objects, the replica answers reads of those objects
//!   [`DbqsMessage::NotReady`] until state transfer completes (for their arc, or for the one object
//!   fetched on demand), so a correct replica never claims a value it may be missing. It accepts
//!   writes at once. [`Replica::handle_noting_miss`] names the object of such a read, so the driver
//!   can fetch it on demand ([`super::transfer::Transfer::fetch_now`]);
//! - content blocks are kept on behalf of owners ([`super::refs`]): every put carries its owner's
//!   signed hold, a [`DbqsMessage::Reference`] its signed release; a block some owner held and
//!   none holds now is deleted [`ReplicaOptions::grace_ms`] after the replica learnt it
//!   ([`Replica::sweep`]), its records kept as tombstones;
//! - it serves state transfer and garbage collection ([`Replica::handle_transfer`]), and deletes a
//!   range it lost once `2f+1` of the range's new group hold it ([`Replica::delete_lost`]); from then
//!   on it answers requests for that range [`TransferMessage::Gone`], never an empty listing.
//!
//! [`Replica::handle`] takes `&self` so a driver may serve requests concurrently; installing
//! configurations takes `&mut self`.

use super::msg::{DbqsMessage, Reject, RequestId, MAX_CONFIGS_PER_REPLY};
use super::refs::{self, RefRecord};
use super::transfer::{responsible_for_arc, Arc, TransferMessage, PAGE, PAGE_BYTES};
use crate::config::{CertifiedConfig, ConfigChain, ConfigError, Epoch};
use crate::crypto::{NodeId, ObjectId};
use crate::object::{check_content, ObjectError};
use crate::store::{Store, StoreError};
use crate::wire::{decode, encode_msg, WireError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Options of a replica.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// A block every owner released is deleted this long after the replica learnt it (readers
    /// that started before the release, such as a snapshot's or a read-only mount's, finish
    /// meanwhile). A restarted replica counts the whole grace again.
    pub grace_ms: u64,
    #[cfg(feature = "mutants")]
    pub mutant: super::Mutant,
}

/// The default of [`ReplicaOptions::grace_ms`]: 30 s.
pub const DEFAULT_GRACE_MS: u64 = 30_000;

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            grace_ms: DEFAULT_GRACE_MS,
            #[cfg(feature = "mutants")]
            mutant: super::Mutant::None,
        }
    }
}

/// Released blocks waiting out their grace.
#[derive(Debug, Default)]
struct Sweep {
    /// Learnt released since the last [`Replica::sweep`] (which stamps them).
    new: BTreeSet<ObjectId>,
    /// The stamped ones in the order they are due, and when each is due. A block learnt released
    /// again (held meanwhile, then released anew) waits a whole grace again.
    due: BTreeSet<(u64, ObjectId)>,
    due_at: BTreeMap<ObjectId, u64>,
}

impl Sweep {
    fn stamp(&mut self, id: ObjectId, at: u64) {
        if let Some(old) = self.due_at.insert(id, at) {
            self.due.remove(&(old, id));
        }
        self.due.insert((at, id));
    }

    fn forget(&mut self, id: &ObjectId) {
        if let Some(at) = self.due_at.remove(id) {
            self.due.remove(&(at, *id));
        }
    }
}

/// What the driver should do with an incoming message.
#[derive(Debug)]
pub enum Handled {
    /// Send these bytes back to the sender.
    Reply(Vec<u8>),
    /// Verify and install these configurations ([`Replica::install`]); nothing to send.
    Install(Vec<CertifiedConfig>),
    /// Nothing to do; the reason is for logs and evidence.
    Dropped(Dropped),
}

/// Why a message was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Dropped {
    Undecodable(WireError),
    /// A reply sent to a replica.
    NotARequest,
}

/// A dBQS replica.
pub struct Replica<S> {
    me: NodeId,
    store: S,
    chain: ConfigChain,
    /// Epochs whose state transfer is complete (the replica holds everything it is responsible for).
    ready: BTreeSet<Epoch>,
    /// Arcs whose transfer into an epoch is complete, while the rest of that epoch's is not.
    ready_arcs: BTreeMap<Epoch, Vec<Arc>>,
    /// Arcs lost on entering an epoch whose objects were deleted ([`Replica::delete_lost`]).
    collected: BTreeMap<Epoch, Vec<Arc>>,
    /// Content blocks a transfer brought that the store had no room for ([`Replica::defer`]).
    deferred: BTreeSet<ObjectId>,
    /// Released blocks to delete ([`Replica::sweep`]); behind a lock, since requests are served
    /// through `&self`.
    sweep: Mutex<Sweep>,
    opts: ReplicaOptions,
}

impl<S: Store> Replica<S> {
    /// A replica at the newest epoch of `chain`; `ready` says whether it holds everything it is
    /// responsible for in that epoch (true at genesis).
    pub fn new(
        me: NodeId,
        store: S,
        chain: ConfigChain,
        ready: bool,
        opts: ReplicaOptions,
    ) -> Self {
        let mut r = Replica {
            me,
            store,
            chain,
            ready: BTreeSet::new(),
            ready_arcs: BTreeMap::new(),
            collected: BTreeMap::new(),
            deferred: BTreeSet::new(),
            sweep: Mutex::new(Sweep::default()),
            opts,
        };
        if ready {
            r.ready.insert(r.epoch());
        }
        r
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn epoch(&self) -> Epoch {
        self.chain.epoch()
    }

    pub fn chain(&self) -> &ConfigChain {
        &self.chain
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Whether the current epoch's state transfer is complete.
    pub fn is_ready(&self) -> bool {
        self.ready.contains(&self.epoch())
    }

    /// Verifies and installs newer configurations; returns the epochs added. The replica then answers
    /// in the newest epoch; reads of objects it gained wait for [`Replica::transfer_complete`].
    pub fn install(&mut self, configs: Vec<CertifiedConfig>) -> Result<Vec<Epoch>, ConfigError> {
        self.chain.extend(configs)
    }

    /// Marks the state transfer into `epoch` complete.
    pub fn transfer_complete(&mut self, epoch: Epoch) {
        self.ready.insert(epoch);
        self.ready_arcs.remove(&epoch);
    }

    /// Marks the transfer of `arc` into `epoch` complete: reads in it may be answered.
    pub fn arc_ready(&mut self, epoch: Epoch, arc: Arc) {
        if !self.ready.contains(&epoch) {
            self.ready_arcs.entry(epoch).or_default().push(arc);
        }
    }

    /// Marks object `x` transferred into `epoch` on demand ([`super::transfer::Transfer::fetch_now`]
    /// gave [`super::transfer::TransferOutput::UnitDone`] for [`Arc::single`]`(x)`): reads of it
    /// may be answered.
    pub fn object_ready(&mut self, epoch: Epoch, x: &ObjectId) {
        self.arc_ready(epoch, Arc::single(x));
    }

    /// Records that content block `x`, which this replica is responsible for, could not be stored
    /// for lack of space: its transfer may complete without it, and the replica answers for it as
    /// described in the module documentation until [`Replica::undefer`]. The driver persists the
    /// set and stores the blocks once space is back.
    pub fn defer(&mut self, x: ObjectId) {
        self.deferred.insert(x);
    }

    /// For a transfer's [`super::transfer::TransferOutput::Check`], of a content block the store
    /// lacks: whether it counts as held all the same. A block deferred for lack of space is
    /// fetched once there is room, not by every transfer again. A block that both the
    /// transfer's listings (`released_there`) and this replica's own records show released,
    /// without its data here, was deleted after its grace (or never came): fetching it again
    /// from a replica that has not deleted it yet would only bring it back.
    pub fn transfer_skips(&self, id: &ObjectId, released_there: bool) -> Result<bool, StoreError> {
        Ok(self.deferred.contains(id) || (released_there && refs::released(&self.store.refs(id)?)))
    }

    /// Forgets a deferral: the block is stored now, or this replica is no longer responsible for it.
    pub fn undefer(&mut self, x: &ObjectId) {
        self.deferred.remove(x);
    }

    /// The content blocks deferred for lack of space, in id order. A transfer's
    /// [`super::transfer::TransferOutput::Check`] counts them as held: the driver stores them once
    /// there is room, rather than every later transfer fetching them again.
    pub fn deferred(&self) -> &BTreeSet<ObjectId> {
        &self.deferred
    }

    /// The deferred blocks this replica is no longer responsible for (their new group got them by
    /// transfer): the driver forgets them ([`Replica::undefer`]), full or not.
    pub fn deferred_elsewhere(&self) -> Vec<ObjectId> {
        self.deferred
            .iter()
            .filter(|x| !self.responsible(x))
            .copied()
            .collect()
    }

    /// Whether a deferred block lies in `arc`.
    fn defers_in(&self, arc: &Arc) -> bool {
        !self.deferred.is_empty()
            && if arc.start == arc.end {
                true
            } else if arc.start < arc.end {
                self.deferred
                    .range(ObjectId(arc.start)..=ObjectId(arc.end))
                    .any(|x| arc.contains(x))
            } else {
                self.deferred.iter().any(|x| arc.contains(x))
            }
    }

    /// Whether the replica can answer a read of `x` in its current epoch: its transfer into this
    /// epoch is complete, or it was ready in the previous epoch and already responsible for `x` then.
    pub fn readable(&self, x: &ObjectId) -> bool {
        #[cfg(feature = "mutants")]
        if self.opts.mutant == super::Mutant::ServeBeforeTransfer {
            return true;
        }
        self.ready_in(self.epoch(), x)
    }

    /// Whether the transfer into epoch `e` completed here.
    pub fn ready_at(&self, e: Epoch) -> bool {
        self.ready.contains(&e)
    }

    /// Serves a state-transfer or garbage-collection request ([`TransferMessage`]); `None` means no
    /// answer (undecodable, not a request, or the store failed).
    pub fn handle_transfer(&self, _from: NodeId, bytes: &[u8]) -> Option<Vec<u8>> {
        let env = decode::<TransferMessage>(bytes).ok()?;
        let mine = self.epoch();
        let msg = match env.msg {
            TransferMessage::List {
                rid,
                epoch,
                arc,
                after,
            } => {
                if self.gone(epoch, &arc) {
                    TransferMessage::Gone { rid }
                } else if epoch == 0 || mine < epoch || !self.held_before(epoch - 1, &arc) {
                    // Only once this replica has moved to `epoch` (so no write can complete here in
                    // the epoch before) and held everything of `arc` that the epoch before needed.
                    TransferMessage::NotYet { rid }
                } else {
                    self.listing(rid, arc, after).ok()?
                }
            }
            TransferMessage::ListReady {
                rid,
                epoch,
                arc,
                after,
            } => {
                if self.gone(epoch, &arc) {
                    TransferMessage::Gone { rid }
                } else if !self.holds_range(epoch, &arc) {
                    TransferMessage::NotYet { rid }
                } else {
                    self.listing(rid, arc, after).ok()?
                }
            }
            TransferMessage::Fetch { rid, id } => {
                // Any copy of a content block proves itself: no epoch condition. "Not held" from a
                // replica that deleted it would be a lie: the asker counts denials.
                match self.store.get_content(&id).ok()? {
                    None if self.gone(env.epoch, &Arc::single(&id)) => {
                        TransferMessage::Gone { rid }
                    }
                    None if self.deferred.contains(&id) => TransferMessage::NotYet { rid },
                    data => TransferMessage::Content { rid, id, data },
                }
            }
            TransferMessage::FetchReady { rid, epoch, id } => {
                let arc = Arc::single(&id);
                if self.gone(epoch, &arc) {
                    TransferMessage::Gone { rid }
                } else if !self.holds_range(epoch, &arc) {
                    TransferMessage::NotYet { rid }
                } else {
                    TransferMessage::Content {
                        rid,
                        id,
                        data: self.store.get_content(&id).ok()?,
                    }
                }
            }
            TransferMessage::HaveQuery { rid, epoch, arc } => TransferMessage::Have {
                rid,
                have: self.holds_range(epoch, &arc),
            },
            _ => return None,
        };
        Some(encode_msg(mine, msg))
    }

    /// Whether this replica held every write of `arc` completed before epoch `e`: it was ready in `e`
    /// as a whole, or completed its transfer of `arc` into `e` or later.
    /// Checked by the arc, not the whole epoch: a transfer stuck on one range the replica no longer
    /// needs (every old holder and peer collected it after a later group took it) must not keep it
    /// from listing the ranges it does hold, or the next group could wait on it forever.
    /// Blocks a full store deferred are left out of its listings (it counts as one of the `f`
    /// faulty listers for them); the range is listed all the same, so that a full replica never
    /// holds up the next group's transfer.
    fn held_before(&self, e: Epoch, arc: &Arc) -> bool {
        self.ready.contains(&e) || (e > 0 && self.completed_range(e, arc))
    }

    /// Whether this replica completed its transfer of all of `arc` into `epoch` or a later epoch
    /// (as a whole epoch it was responsible for `arc` in, or arc by arc), so it held every write of
    /// `arc` completed before `epoch`, and defers none of the range's blocks. A later deletion of
    /// the range does not undo it: the replica deleted only after `2f+1` of a later group held the
    /// range. This is what it answers a [`TransferMessage::HaveQuery`].
    pub fn holds_range(&self, epoch: Epoch, arc: &Arc) -> bool {
        !self.defers_in(arc) && self.completed_range(epoch, arc)
    }

    /// [`Replica::holds_range`] without the deferred blocks: the transfer of `arc` into `epoch` or
    /// later completed (a full store may have deferred some of its blocks).
    fn completed_range(&self, epoch: Epoch, arc: &Arc) -> bool {
        (epoch.max(1)..=self.epoch()).any(|e| {
            (self.ready.contains(&e)
                && self
                    .chain
                    .get(e)
                    .is_some_and(|c| responsible_for_arc(&c.config, &self.me, arc)))
                || self
                    .ready_arcs
                    .get(&e)
                    .is_some_and(|arcs| arc.covered_by(arcs))
        })
    }

    /// Whether this replica deleted objects of `arc` that a transfer into `epoch` would ask for: it
    /// lost a range overlapping `arc` on entering `epoch` or later and collected it.
    fn gone(&self, epoch: Epoch, arc: &Arc) -> bool {
        self.collected
            .range(epoch..)
            .any(|(_, arcs)| arcs.iter().any(|a| a.overlaps(arc)))
    }

    /// Garbage collection of `arc`, lost on entering `epoch`, once `2f+1` of its new group hold it
    /// ([`super::gc::GcOutput::Delete`]): records the arc as collected (from now on requests for it
    /// are answered [`TransferMessage::Gone`]), then deletes every object held in `arc` that this
    /// replica has not been responsible for in any epoch from `epoch` to its current one, checked
    /// now (an object it gained back stays; a later loss collects it). Returns the ids deleted. On
    /// a store error, call it again: it is idempotent. A driver that shares the replica behind a
    /// lock may instead call [`Replica::note_collected`] (exclusive) and then
    /// [`Replica::delete_collected`] (shared), so that requests are served while it deletes.
    pub fn delete_lost(&mut self, epoch: Epoch, arc: Arc) -> Result<Vec<ObjectId>, StoreError> {
        self.note_collected(epoch, arc);
        self.delete_collected(epoch, arc)
    }

    /// The deleting half of [`Replica::delete_lost`], for an arc already recorded with
    /// [`Replica::note_collected`] (otherwise it deletes nothing: a range is answered `Gone` before
    /// anything of it goes). Checks responsibility object by object, at the moment of deleting.
    pub fn delete_collected(&self, epoch: Epoch, arc: Arc) -> Result<Vec<ObjectId>, StoreError> {
        let (mut deleted, mut after) = (Vec::new(), None);
        loop {
            let (page, next) = self.delete_collected_page(epoch, arc, after, PAGE)?;
            deleted.extend(page);
            match next {
                Some(n) => after = Some(n),
                None => return Ok(deleted),
            }
        }
    }

    /// One step of [`Replica::delete_collected`]: the next `limit` objects of `arc` after `after`
    /// (in the arc's order) are deleted unless the replica is responsible for them again. Returns
    /// those deleted and where the next step starts (`None`: the arc is done). A driver that wants
    /// to pause between steps (or let a writer take the lock) calls this instead.
    pub fn delete_collected_page(
        &self,
        epoch: Epoch,
        arc: Arc,
        after: Option<ObjectId>,
        limit: usize,
    ) -> Result<(Vec<ObjectId>, Option<ObjectId>), StoreError> {
        let mut deleted = Vec::new();
        if !self.collected_in(epoch).contains(&arc) {
            return Ok((deleted, None));
        }
        let ids = self.arc_ids(&arc, after, limit.max(1))?;
        for id in &ids {
            if !self.responsible_since(epoch, id) {
                self.store.delete(id)?;
                deleted.push(*id);
            }
        }
        let next = if ids.len() < limit.max(1) {
            None
        } else {
            ids.last().copied()
        };
        Ok((deleted, next))
    }

    fn responsible_since(&self, epoch: Epoch, x: &ObjectId) -> bool {
        // An epoch missing from the chain counts as responsible: never delete on a doubt.
        (epoch..=self.epoch()).any(|e| {
            self.chain
                .get(e)
                .is_none_or(|c| c.config.is_responsible(&self.me, x))
        })
    }

    /// Records `arc`, lost on entering `epoch`, as collected without deleting anything: for a
    /// driver restoring what it persisted of [`Replica::collected`].
    pub fn note_collected(&mut self, epoch: Epoch, arc: Arc) {
        let arcs = self.collected.entry(epoch).or_default();
        if !arcs.contains(&arc) {
            arcs.push(arc);
        }
    }

    /// Every arc collected, by the epoch on entering which it was lost (to persist: a restarted
    /// replica must go on answering `Gone` for them).
    pub fn collected(&self) -> &BTreeMap<Epoch, Vec<Arc>> {
        &self.collected
    }

    /// The arcs lost on entering `epoch` that are collected already (for
    /// [`super::gc::Gc::new`]).
    pub fn collected_in(&self, epoch: Epoch) -> &[Arc] {
        self.collected.get(&epoch).map_or(&[], |v| v.as_slice())
    }

    /// Whether an object transferred into `epoch` should still be stored: false once this replica
    /// collected a range holding it, lost on entering a later epoch (a late transfer must not bring
    /// back what garbage collection deleted; the later group holds it).
    pub fn accepts_transferred(&self, epoch: Epoch, id: &ObjectId) -> bool {
        !self
            .collected
            .range(epoch.saturating_add(1)..)
            .any(|(_, arcs)| arcs.iter().any(|a| a.contains(id)))
    }

    /// One page of the objects held in `arc` after `after`, in arc order.
    fn listing(
        &self,
        rid: u64,
        arc: Arc,
        after: Option<ObjectId>,
    ) -> Result<TransferMessage, StoreError> {
        // One more than a page, so that a full page knows whether more follow.
        let ids = self.arc_ids(&arc, after, PAGE + 1)?;
        let (mut content, mut pk, mut records) = (Vec::new(), Vec::new(), Vec::new());
        let (mut bytes, mut next) = (0, None);
        for (i, id) in ids.iter().enumerate() {
            if i > 0 && (i >= PAGE || bytes >= PAGE_BYTES) {
                next = Some(ids[i - 1]);
                break;
            }
            match self.store.get_pk(id)? {
                Some(b) => {
                    bytes += b.value.len() + b.label.len();
                    pk.push(b);
                }
                None => {
                    // A tombstone (records without data) is listed by its records alone.
                    if self.store.has_content(id)? {
                        content.push(*id);
                    }
                    let r = self.store.refs(id)?;
                    bytes += r.len() * REF_BYTES;
                    records.extend(r);
                }
            }
        }
        Ok(TransferMessage::Listing {
            rid,
            content,
            pk,
            next,
            refs: records,
        })
    }

    /// Ids held in `arc` after `after`, in the arc's order, at most `limit`: the arc is one or two
    /// ranges of ids ([`Store::list_range`]), the second one after it wraps round the ring.
    fn arc_ids(
        &self,
        arc: &Arc,
        after: Option<ObjectId>,
        limit: usize,
    ) -> Result<Vec<ObjectId>, StoreError> {
        let (start, end) = (ObjectId(arc.start), ObjectId(arc.end));
        let mut ranges = if arc.start < arc.end {
            vec![(Some(start), end)]
        } else {
            vec![(Some(start), ObjectId([0xff; 32])), (None, end)]
        };
        match after {
            // After the wrap: only the second range is left.
            Some(a) if arc.order_key(&a).0 => ranges = vec![(Some(a), end)],
            Some(a) => ranges[0].0 = Some(a),
            None => {}
        }
        let mut ids = Vec::new();
        for (lo, hi) in ranges {
            if ids.len() >= limit {
                break;
            }
            ids.extend(self.store.list_range(lo.as_ref(), &hi, limit - ids.len())?);
        }
        // A cursor from outside the arc (a confused or lying asker) yields nothing outside it.
        ids.retain(|id| arc.contains(id));
        Ok(ids)
    }

    /// Whether the replica held everything of `x` that epoch `e` needs: its transfer into `e` is
    /// complete (as a whole, or for an arc holding `x`), or it was ready in `e-1` and already
    /// responsible for `x` then.
    pub fn ready_in(&self, e: Epoch, x: &ObjectId) -> bool {
        if self.ready.contains(&e)
            || self
                .ready_arcs
                .get(&e)
                .is_some_and(|arcs| arcs.iter().any(|a| a.contains(x)))
        {
            return true;
        }
        e > 0
            && self.ready.contains(&(e - 1))
            && self
                .chain
                .get(e - 1)
                .is_some_and(|prev| prev.config.is_responsible(&self.me, x))
    }

    fn responsible(&self, x: &ObjectId) -> bool {
        self.chain.config().is_responsible(&self.me, x)
    }

    /// Merges the reference records a state transfer brought (the transfer checked their
    /// signatures, [`super::transfer::TransferOutput::StoreRefs`], given after the unit's blocks
    /// are stored; the caller leaves out what [`Replica::accepts_transferred`] refuses), a
    /// thousand blocks per durable write, and schedules the deletion of the blocks they release.
    pub fn merge_transferred_refs(
        &self,
        refs: &[(ObjectId, Vec<RefRecord>)],
    ) -> Result<(), StoreError> {
        for batch in refs.chunks(1024) {
            let held = self.store.merge_refs_many(batch)?;
            for ((id, _), records) in batch.iter().zip(held) {
                // Once per release: a block already scheduled keeps its time (each epoch's
                // transfer brings the same records again), and one whose data is gone needs none.
                if refs::released(&records)
                    && !self.lock_sweep().due_at.contains_key(id)
                    && self.store.has_content(id)?
                {
                    self.note_released(*id);
                }
            }
        }
        Ok(())
    }

    /// Schedules the deletion of every block the store holds released (after a restart: the
    /// grace counts again from the next [`Replica::sweep`]). Returns how many.
    pub fn recover_released(&self) -> Result<usize, StoreError> {
        let ids = self.store.released()?;
        let n = ids.len();
        self.lock_sweep().new.extend(ids);
        Ok(n)
    }

    /// What a restart loses of the sweep: the grace clocks. The replica forgets every scheduled
    /// deletion and schedules the store's released blocks again ([`Replica::recover_released`]),
    /// as a replica built anew after a restart does (for a driver, like the simulator, that keeps
    /// the replica across a crash).
    pub fn restart_sweep(&self) -> Result<usize, StoreError> {
        *self.lock_sweep() = Sweep::default();
        self.recover_released()
    }

    fn note_released(&self, id: ObjectId) {
        self.lock_sweep().new.insert(id);
    }

    fn lock_sweep(&self) -> std::sync::MutexGuard<'_, Sweep> {
        self.sweep.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When [`Replica::sweep`] has work: now for blocks learnt released since the last sweep (to
    /// start their grace), else the earliest end of a grace; `None` when nothing waits.
    pub fn next_sweep(&self, now: u64) -> Option<u64> {
        let s = self.lock_sweep();
        if !s.new.is_empty() {
            return Some(now);
        }
        s.due.first().map(|(t, _)| *t)
    }

    /// Starts the grace of blocks learnt released since the last call, and deletes the data of at
    /// most `limit` blocks whose grace has ended and which every owner still releases (the store
    /// checks that atomically against a hold arriving meanwhile). Returns the ids whose data went.
    /// On a store error the block stays due: call again.
    pub fn sweep(&self, now: u64, limit: usize) -> Result<Vec<ObjectId>, StoreError> {
        let grace = self.grace_ms();
        let due: Vec<ObjectId> = {
            let mut s = self.lock_sweep();
            for id in std::mem::take(&mut s.new) {
                s.stamp(id, now.saturating_add(grace));
            }
            s.due
                .iter()
                .take_while(|(t, _)| *t <= now)
                .take(limit)
                .map(|(_, id)| *id)
                .collect()
        };
        let mut deleted = Vec::new();
        for id in due {
            // Under the sweep's lock, so that a block held and released anew since it was
            // stamped (noted under this lock after its records were stored) waits a new grace.
            let mut s = self.lock_sweep();
            if s.new.contains(&id) {
                continue;
            }
            if self.store.drop_released(&id)? {
                deleted.push(id);
            }
            s.forget(&id);
        }
        Ok(deleted)
    }

    /// Changes [`ReplicaOptions::grace_ms`] (blocks already due keep their time).
    pub fn set_grace_ms(&mut self, ms: u64) {
        self.opts.grace_ms = ms;
    }

    fn grace_ms(&self) -> u64 {
        #[cfg(feature = "mutants")]
        if self.opts.mutant == super::Mutant::DeleteWithoutGrace {
            return 0;
        }
        self.opts.grace_ms
    }

    /// Handles one message from `from`.
    pub fn handle(&self, from: NodeId, bytes: &[u8]) -> Handled {
        self.handle_noting_miss(from, bytes).0
    }

    /// Like [`Replica::handle`], and also names the object of a read answered
    /// [`DbqsMessage::NotReady`] because its transfer into this epoch is not done: the driver may
    /// fetch it on demand ([`super::transfer::Transfer::fetch_now`]) and the client's retry is then
    /// answered.
    pub fn handle_noting_miss(&self, _from: NodeId, bytes: &[u8]) -> (Handled, Option<ObjectId>) {
        let env = match decode::<DbqsMessage>(bytes) {
            Ok(env) => env,
            Err(e) => return (Handled::Dropped(Dropped::Undecodable(e)), None),
        };
        let mine = self.epoch();
        let reply = |msg| Handled::Reply(encode_msg(mine, msg));
        use DbqsMessage::*;
        let rid = match &env.msg {
            PushConfigs { configs } => return (Handled::Install(configs.clone()), None),
            GetConfigs { rid, after } => {
                let configs = self.chain.after(*after, MAX_CONFIGS_PER_REPLY);
                return (reply(Configs { rid: *rid, configs }), None);
            }
            PutContent { rid, .. }
            | GetContent { rid, .. }
            | PutPk { rid, .. }
            | GetPk { rid, .. }
            | Reference { rid, .. } => *rid,
            _ => return (Handled::Dropped(Dropped::NotARequest), None),
        };
        if env.epoch < mine {
            return (reply(Stale { rid }), None);
        }
        if env.epoch > mine {
            return (reply(Behind { rid }), None);
        }
        let read = match &env.msg {
            GetContent { id, .. } | GetPk { id, .. } => Some(*id),
            _ => None,
        };
        let msg = self.serve(rid, env.msg);
        let miss = read.filter(|_| matches!(msg, NotReady { .. }));
        (reply(msg), miss)
    }

    fn serve(&self, rid: RequestId, msg: DbqsMessage) -> DbqsMessage {
        use DbqsMessage::*;
        let rejected = |reason| Rejected { rid, reason };
        match msg {
            PutContent { id, data, hold, .. } => {
                if !self.responsible(&id) {
                    return rejected(Reject::NotResponsible);
                }
                if let Err(e) = check_content(&id, &data) {
                    return rejected(object_reject(&e));
                }
                if !hold.hold || hold.id != id {
                    return rejected(Reject::NotAReference);
                }
                if hold.verify().is_err() {
                    return rejected(Reject::BadSignature);
                }
                match self.put_held(&id, &data, hold) {
                    Ok(true) => ContentStored { rid, id },
                    Ok(false) => rejected(Reject::Superseded),
                    Err(e) => rejected(store_reject(&e)),
                }
            }
            Reference { record, .. } => {
                let id = record.id;
                if !self.responsible(&id) {
                    return rejected(Reject::NotResponsible);
                }
                if !self.release_authorized(&record) {
                    return rejected(Reject::BadSignature);
                }
                // Recorded whether or not this replica saw the owner's hold (a put that did not
                // reach it): a completed release must be on `f+1` correct replicas of any `2f+1`,
                // for transfers. A release by a key that never held the block lets nothing go
                // (`refs::released`).
                match self.store.merge_refs(&id, std::slice::from_ref(&record)) {
                    Ok(held) => {
                        if refs::released(&held) {
                            self.note_released(id);
                        }
                        RefStored { rid, id }
                    }
                    Err(e) => rejected(store_reject(&e)),
                }
            }
            GetContent { id, .. } => {
                if !self.responsible(&id) {
                    return rejected(Reject::NotResponsible);
                }
                match self.store.get_content(&id) {
                    // Any copy of a content block proves itself, so it may be served before transfer.
                    Ok(Some(data)) => Content {
                        rid,
                        id,
                        data: Some(data),
                    },
                    Ok(None) if !self.readable(&id) || self.deferred.contains(&id) => {
                        NotReady { rid }
                    }
                    Ok(None) => Content {
                        rid,
                        id,
                        data: None,
                    },
                    Err(e) => rejected(store_reject(&e)),
                }
            }
            PutPk { block, .. } => {
                let id = block.id();
                if !self.responsible(&id) {
                    return rejected(Reject::NotResponsible);
                }
                if let Err(e) = self.check_pk(&block) {
                    return rejected(object_reject(&e));
                }
                match self.store.put_pk_if_newer(&block) {
                    Ok(stamp) => PkStored { rid, id, stamp },
                    Err(e) => rejected(store_reject(&e)),
                }
            }
            GetPk { id, .. } => {
                if !self.responsible(&id) {
                    return rejected(Reject::NotResponsible);
                }
                if !self.readable(&id) {
                    return NotReady { rid };
                }
                match self.store.get_pk(&id) {
                    Ok(block) => Pk { rid, id, block },
                    Err(e) => rejected(store_reject(&e)),
                }
            }
            _ => unreachable!("serve is only called with requests"),
        }
    }

    /// Stores a put block: its hold first, then its data (so that a sweep either sees the hold or
    /// deleted before the data is written). Returns false, storing nothing, when the hold is older
    /// than its owner's release (a replayed or late put, or an owner whose numbering went back:
    /// the owner is told, [`Reject::Superseded`], rather than acknowledged for nothing).
    fn put_held(&self, id: &ObjectId, data: &[u8], hold: RefRecord) -> Result<bool, StoreError> {
        let held = self.store.put_held(id, data, &hold)?;
        if refs::holding(&held, &hold.owner) {
            return Ok(true);
        }
        // A store that wrote the data alongside may hold it now: it goes after the grace.
        if refs::released(&held) {
            self.note_released(*id);
        }
        Ok(false)
    }

    fn release_authorized(&self, record: &RefRecord) -> bool {
        #[cfg(feature = "mutants")]
        if self.opts.mutant == super::Mutant::ReleaseUnsigned {
            return true;
        }
        record.verify().is_ok()
    }

    fn check_pk(&self, block: &crate::object::PkBlock) -> Result<(), ObjectError> {
        #[cfg(feature = "mutants")]
        if self.opts.mutant == super::Mutant::AcceptUnsigned {
            return Ok(());
        }
        let _ = &self.opts;
        block.verify()
    }
}

/// About the encoded size of a [`RefRecord`], for a listing's page budget.
const REF_BYTES: usize = 140;

fn object_reject(e: &ObjectError) -> Reject {
    match e {
        ObjectError::TooLarge { .. } | ObjectError::LabelTooLong { .. } => Reject::TooLarge,
        ObjectError::HashMismatch => Reject::HashMismatch,
        ObjectError::Signature(_) => Reject::BadSignature,
    }
}

fn store_reject(e: &StoreError) -> Reject {
    match e {
        StoreError::NoSpace => Reject::NoSpace,
        StoreError::Io(_) => Reject::StoreFailed,
    }
}
