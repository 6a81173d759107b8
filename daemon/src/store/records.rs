//! Owners' reference records of content blocks: concurrent merges committed together in one
//! redb transaction.

use super::*;

impl DiskStore {
    /// Merges a group of queued reference records in one write transaction (redb runs one at a
    /// time, so each read-merge-write is atomic); returns each merge's records afterwards, or the
    /// transaction's error for all of them.
    pub(super) fn commit_merges(
        &self,
        group: &[RefMerge],
    ) -> Vec<Result<Vec<RefRecord>, StoreError>> {
        match self.merge_in_one(group.iter().map(|m| (&m.id, m.records.as_slice()))) {
            Ok(v) => v.into_iter().map(Ok).collect(),
            Err(e) => group.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// Merges each `(id, records)` in one durable write transaction (redb runs one at a time, so
    /// each read-merge-write is atomic); returns each block's records afterwards, in order.
    pub(super) fn merge_in_one<'a>(
        &self,
        items: impl Iterator<Item = (&'a ObjectId, &'a [RefRecord])>,
    ) -> Result<Vec<Vec<RefRecord>>, StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        let mut out = Vec::new();
        {
            let mut t = w.open_table(REFS).map_err(db_err)?;
            for (id, records) in items {
                let stored = t.get(id.0.as_slice()).map_err(db_err)?;
                let mut held = read_refs(stored.as_ref().map(|v| v.value()), id);
                drop(stored);
                if refs::merge(&mut held, id, records) {
                    let bytes =
                        postcard::to_stdvec(&held).map_err(|e| StoreError::Io(e.to_string()))?;
                    t.insert(id.0.as_slice(), bytes.as_slice())
                        .map_err(db_err)?;
                }
                out.push(held);
            }
        }
        w.commit().map_err(db_err)?;
        Ok(out)
    }
}

/// The reference records of `id` as stored; unreadable or foreign records count as none (the
/// block is then kept, never deleted on a doubt).
pub(super) fn read_refs(bytes: Option<&[u8]>, id: &ObjectId) -> Vec<RefRecord> {
    let Some(bytes) = bytes else {
        return Vec::new();
    };
    match postcard::from_bytes::<Vec<RefRecord>>(bytes) {
        Ok(mut v) => {
            v.retain(|r| r.id == *id);
            v
        }
        Err(e) => {
            warn!(block = %id.to_hex(), error = %e, "reference records on disk are unreadable; keeping the block");
            Vec::new()
        }
    }
}
