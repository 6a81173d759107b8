//! The storage a replica runs over.
//!
//! The trait is the whole contract between the replica state machine and a disk: every method that
//! writes returns only once the write is durable, so the replica can acknowledge right after it. The
//! "keep the highest version" rule for public-key blocks is applied atomically by the store
//! ([`Store::put_pk_if_newer`]), so concurrent requests cannot lose an update. Methods take `&self` so
//! a driver may serve requests concurrently; implementations synchronise internally.
//!
//! [`MemStore`] keeps everything in memory; the simulator uses it and treats it as the durable state
//! that survives a crash.

use crate::crypto::ObjectId;
use crate::dbqs::refs::{self, RefRecord};
use crate::object::{PkBlock, Stamp};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Mutex;

/// An operating failure of the store (not a protocol matter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("no space left on the store")]
    NoSpace,
    #[error("store I/O failed: {0}")]
    Io(String),
}

/// Durable storage of content blocks and public-key blocks.
pub trait Store {
    /// The verified bytes of content block `id`, or `None` if absent (a copy found corrupt counts as
    /// absent).
    fn get_content(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores content block `id` (already verified by the caller); durable on return. Idempotent.
    fn put_content(&self, id: &ObjectId, data: &[u8]) -> Result<(), StoreError>;
    /// The highest stored value of public-key block `id`.
    fn get_pk(&self, id: &ObjectId) -> Result<Option<PkBlock>, StoreError>;
    /// Stores `block` if its stamp is higher than the stored one; returns the stamp held afterwards.
    /// Durable on return.
    fn put_pk_if_newer(&self, block: &PkBlock) -> Result<Stamp, StoreError>;
    /// Ids of every object held, for state transfer and inspection.
    fn list(&self) -> Result<Vec<ObjectId>, StoreError>;
    /// Ids of the objects held in `(lo, hi]` (from the lowest id when `lo` is `None`), ascending,
    /// at most `limit`, and the ids of content blocks that have reference records without data
    /// (tombstones): a page of a state-transfer listing. The default sorts [`Store::list`]
    /// (it lists no tombstones); stores with an ordered index answer from it.
    fn list_range(
        &self,
        lo: Option<&ObjectId>,
        hi: &ObjectId,
        limit: usize,
    ) -> Result<Vec<ObjectId>, StoreError> {
        let mut ids: Vec<ObjectId> = self
            .list()?
            .into_iter()
            .filter(|id| lo.is_none_or(|lo| id > lo) && id <= hi)
            .collect();
        ids.sort();
        ids.dedup();
        ids.truncate(limit);
        Ok(ids)
    }
    /// Removes object `id` (content or public-key block) and its reference records, for garbage
    /// collection of ranges handed to a later group; durable on return. Removing an absent object
    /// succeeds.
    fn delete(&self, id: &ObjectId) -> Result<(), StoreError>;
    /// Whether the data of content block `id` is held.
    fn has_content(&self, id: &ObjectId) -> Result<bool, StoreError> {
        Ok(self.get_content(id)?.is_some())
    }
    /// The reference records of content block `id` ([`crate::dbqs::refs`]), at most one per owner,
    /// ordered by owner.
    fn refs(&self, id: &ObjectId) -> Result<Vec<RefRecord>, StoreError>;
    /// Merges `records` (signatures checked by the caller) into those of `id` by
    /// [`refs::merge`], atomically; returns the records held afterwards. Durable on return.
    fn merge_refs(
        &self,
        id: &ObjectId,
        records: &[RefRecord],
    ) -> Result<Vec<RefRecord>, StoreError>;
    /// [`Store::merge_refs`] of many blocks (a state transfer's records), in as few durable
    /// writes as the store can; returns each block's records afterwards, in order.
    fn merge_refs_many(
        &self,
        items: &[(ObjectId, Vec<RefRecord>)],
    ) -> Result<Vec<Vec<RefRecord>>, StoreError> {
        items
            .iter()
            .map(|(id, records)| self.merge_refs(id, records))
            .collect()
    }
    /// Stores a put's block: merges `hold` (checked by the caller) into `id`'s records, and stores
    /// `data` unless the merged records say the owner released the block after this hold.
    /// Returns the records afterwards. When it returns, the records are durable and, if the owner
    /// holds the block, so is the data, whatever [`Store::drop_released`] ran meanwhile. The
    /// default merges first and then writes (so a sweep either saw the hold or deleted before the
    /// data was written); a store may write both at once if it then makes sure the data is there.
    fn put_held(
        &self,
        id: &ObjectId,
        data: &[u8],
        hold: &RefRecord,
    ) -> Result<Vec<RefRecord>, StoreError> {
        let held = self.merge_refs(id, std::slice::from_ref(hold))?;
        if refs::holding(&held, &hold.owner) {
            self.put_content(id, data)?;
        }
        Ok(held)
    }
    /// Deletes the data of content block `id` if its records release it ([`refs::released`]),
    /// keeping the records; returns whether data was deleted. Atomic against
    /// [`Store::merge_refs`]: a hold merged before it keeps the data, and one merged after it is
    /// followed by its put. Durable on return.
    fn drop_released(&self, id: &ObjectId) -> Result<bool, StoreError>;
    /// The content blocks whose data is held while their records release them (for a replica
    /// that restarts to schedule their deletion again).
    fn released(&self) -> Result<Vec<ObjectId>, StoreError>;
}

impl<T: Store + ?Sized> Store for std::sync::Arc<T> {
    fn get_content(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get_content(id)
    }
    fn put_content(&self, id: &ObjectId, data: &[u8]) -> Result<(), StoreError> {
        (**self).put_content(id, data)
    }
    fn get_pk(&self, id: &ObjectId) -> Result<Option<PkBlock>, StoreError> {
        (**self).get_pk(id)
    }
    fn put_pk_if_newer(&self, block: &PkBlock) -> Result<Stamp, StoreError> {
        (**self).put_pk_if_newer(block)
    }
    fn list(&self) -> Result<Vec<ObjectId>, StoreError> {
        (**self).list()
    }
    fn list_range(
        &self,
        lo: Option<&ObjectId>,
        hi: &ObjectId,
        limit: usize,
    ) -> Result<Vec<ObjectId>, StoreError> {
        (**self).list_range(lo, hi, limit)
    }
    fn delete(&self, id: &ObjectId) -> Result<(), StoreError> {
        (**self).delete(id)
    }
    fn put_held(
        &self,
        id: &ObjectId,
        data: &[u8],
        hold: &RefRecord,
    ) -> Result<Vec<RefRecord>, StoreError> {
        (**self).put_held(id, data, hold)
    }
    fn merge_refs_many(
        &self,
        items: &[(ObjectId, Vec<RefRecord>)],
    ) -> Result<Vec<Vec<RefRecord>>, StoreError> {
        (**self).merge_refs_many(items)
    }
    fn has_content(&self, id: &ObjectId) -> Result<bool, StoreError> {
        (**self).has_content(id)
    }
    fn refs(&self, id: &ObjectId) -> Result<Vec<RefRecord>, StoreError> {
        (**self).refs(id)
    }
    fn merge_refs(
        &self,
        id: &ObjectId,
        records: &[RefRecord],
    ) -> Result<Vec<RefRecord>, StoreError> {
        (**self).merge_refs(id, records)
    }
    fn drop_released(&self, id: &ObjectId) -> Result<bool, StoreError> {
        (**self).drop_released(id)
    }
    fn released(&self) -> Result<Vec<ObjectId>, StoreError> {
        (**self).released()
    }
}

/// The bounds of `(lo, hi]` (from the lowest id when `lo` is `None`) for an ordered map's range
/// query, or `None` when the range is empty (a reversed range would panic a `BTreeMap`).
pub fn id_bounds(
    lo: Option<&ObjectId>,
    hi: &ObjectId,
) -> Option<(Bound<ObjectId>, Bound<ObjectId>)> {
    if lo.is_some_and(|lo| lo >= hi) {
        return None;
    }
    Some((
        lo.map_or(Bound::Unbounded, |lo| Bound::Excluded(*lo)),
        Bound::Included(*hi),
    ))
}

/// The first `limit` ids of two ascending lists of ids (content and public-key blocks), merged.
pub fn merge_ids(mut a: Vec<ObjectId>, b: Vec<ObjectId>, limit: usize) -> Vec<ObjectId> {
    a.extend(b);
    a.sort();
    a.dedup();
    a.truncate(limit);
    a
}

/// An in-memory store.
#[derive(Debug, Default)]
pub struct MemStore {
    inner: Mutex<MemInner>,
}

#[derive(Debug, Default, Clone)]
struct MemInner {
    content: BTreeMap<ObjectId, Vec<u8>>,
    pk: BTreeMap<ObjectId, PkBlock>,
    refs: BTreeMap<ObjectId, Vec<RefRecord>>,
    /// At most this many content blocks; a new one beyond it is refused with `NoSpace`.
    content_limit: Option<usize>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that holds at most `limit` content blocks (a full disk, for tests): a new content
    /// block beyond it is refused with [`StoreError::NoSpace`]; public-key blocks always fit.
    pub fn with_content_limit(limit: usize) -> Self {
        let s = Self::default();
        s.lock().content_limit = Some(limit);
        s
    }

    /// Lifts the limit of [`MemStore::with_content_limit`] (space was freed).
    pub fn lift_content_limit(&self) {
        self.lock().content_limit = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `block` unconditionally (for tests that build a specific state).
    pub fn force_pk(&self, block: PkBlock) {
        self.lock().pk.insert(block.id(), block);
    }

    /// Removes an object and its reference records (for tests and garbage collection).
    pub fn remove(&self, id: &ObjectId) {
        let mut g = self.lock();
        g.content.remove(id);
        g.pk.remove(id);
        g.refs.remove(id);
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.content.len() + g.pk.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store for MemStore {
    fn get_content(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().content.get(id).cloned())
    }

    fn put_content(&self, id: &ObjectId, data: &[u8]) -> Result<(), StoreError> {
        let mut g = self.lock();
        if !g.content.contains_key(id) && g.content_limit.is_some_and(|l| g.content.len() >= l) {
            return Err(StoreError::NoSpace);
        }
        g.content.entry(*id).or_insert_with(|| data.to_vec());
        Ok(())
    }

    fn get_pk(&self, id: &ObjectId) -> Result<Option<PkBlock>, StoreError> {
        Ok(self.lock().pk.get(id).cloned())
    }

    fn put_pk_if_newer(&self, block: &PkBlock) -> Result<Stamp, StoreError> {
        let mut g = self.lock();
        let stamp = block.stamp();
        match g.pk.get(&block.id()) {
            Some(old) if old.stamp() >= stamp => Ok(old.stamp()),
            _ => {
                g.pk.insert(block.id(), block.clone());
                Ok(stamp)
            }
        }
    }

    fn list(&self) -> Result<Vec<ObjectId>, StoreError> {
        let g = self.lock();
        Ok(g.content.keys().chain(g.pk.keys()).copied().collect())
    }

    fn list_range(
        &self,
        lo: Option<&ObjectId>,
        hi: &ObjectId,
        limit: usize,
    ) -> Result<Vec<ObjectId>, StoreError> {
        let Some(range) = id_bounds(lo, hi) else {
            return Ok(Vec::new());
        };
        let g = self.lock();
        let content = g.content.range(range).map(|(id, _)| *id).take(limit);
        let refs = g.refs.range(range).map(|(id, _)| *id).take(limit);
        let pk = g.pk.range(range).map(|(id, _)| *id).take(limit);
        let content = merge_ids(content.collect(), refs.collect(), limit);
        Ok(merge_ids(content, pk.collect(), limit))
    }

    fn delete(&self, id: &ObjectId) -> Result<(), StoreError> {
        self.remove(id);
        Ok(())
    }

    fn has_content(&self, id: &ObjectId) -> Result<bool, StoreError> {
        Ok(self.lock().content.contains_key(id))
    }

    fn refs(&self, id: &ObjectId) -> Result<Vec<RefRecord>, StoreError> {
        Ok(self.lock().refs.get(id).cloned().unwrap_or_default())
    }

    fn merge_refs(
        &self,
        id: &ObjectId,
        records: &[RefRecord],
    ) -> Result<Vec<RefRecord>, StoreError> {
        let mut g = self.lock();
        let held = g.refs.entry(*id).or_default();
        refs::merge(held, id, records);
        let held = held.clone();
        if held.is_empty() {
            g.refs.remove(id);
        }
        Ok(held)
    }

    fn drop_released(&self, id: &ObjectId) -> Result<bool, StoreError> {
        let mut g = self.lock();
        if !g.refs.get(id).is_some_and(|r| refs::released(r)) {
            return Ok(false);
        }
        Ok(g.content.remove(id).is_some())
    }

    fn released(&self) -> Result<Vec<ObjectId>, StoreError> {
        let g = self.lock();
        Ok(g.refs
            .iter()
            .filter(|(id, r)| refs::released(r) && g.content.contains_key(id))
            .map(|(id, _)| *id)
            .collect())
    }
}
