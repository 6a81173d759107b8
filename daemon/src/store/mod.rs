//! The durable replica store of a node: [`DiskStore`].
//!
//! Goals:
//! - Content blocks live in hash-named files, `DIR/blocks/ab/cd/<hex id>`. A block is written to a
//!   temporary file under `DIR/blocks/tmp/`, fsync'd, renamed into place, and the directory fsync'd,
//!   so a block is either wholly present or absent after a crash. Every read re-hashes the bytes: a
//!   copy that does not hash to its name is logged and reported as missing, never served.
//! - Public-key blocks and node metadata (the installed configuration chain, the epochs whose state
//!   transfer is complete, the arcs done of transfers not yet complete) live in one redb database,
//!   `DIR/meta.redb`, with immediate durability. "Keep the highest version" runs inside one write
//!   transaction, so it is atomic.
//! - The ids of the content blocks are also kept in memory, ordered (built by walking the tree at
//!   open; about 50 bytes per block), so that a state-transfer listing page is a range query
//!   ([`Store::list_range`]) and not a walk of the tree. Renames into place and removals happen
//!   under the index's lock.
//! - Leftovers of a crash (temporary files) are removed when the store is opened.
//! - A reserve of free space ([`DiskStore::set_reserve`]) is kept for metadata: a new content block
//!   is refused ([`StoreError::NoSpace`]) when storing it would leave less free space on the
//!   filesystem than the reserve, while public-key blocks, configurations and progress records
//!   (small, and what keeps the node in its epoch and the volume's namespace writable) go on
//!   using the reserve. The store logs once when it becomes full and once when it is not any more.
//! - Content blocks a transfer could not store for lack of space are recorded as deferred
//!   (`DIR/meta.redb`), so the node answers for them honestly after a restart and stores them
//!   once space is back.
//!
//! Non-goals: garbage collection, repair of corrupt blocks (the protocol re-fetches them from the
//! group), group commit, quotas.
//!
//! Rooms: `blocks` (the block files, their index, space and reserve), `meta` (node metadata in
//! redb), `records` (owners' reference records, merged in groups); here the handle, opening, and
//! the [`Store`] the replica runs over.

mod blocks;
mod meta;
mod records;

use records::read_refs;

use dbqsfs_core::config::CertifiedConfig;
use dbqsfs_core::crypto::ObjectId;
use dbqsfs_core::dbqs::refs::{self, RefRecord};
use dbqsfs_core::dbqs::transfer::Arc as RingArc;
use dbqsfs_core::ms::key::{KeyShare, KeyState};
use dbqsfs_core::object::{check_content, PkBlock, Stamp, MAX_BLOCK};
use dbqsfs_core::store::{id_bounds, merge_ids, Store, StoreError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use tracing::{info, warn};

/// Public-key blocks: object id → postcard-encoded [`PkBlock`].
const PK: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pk_blocks");
/// Owners' reference records of content blocks (`dbqs::refs`): object id → postcard-encoded
/// records, at most one per owner. Kept after a released block's data goes (tombstones).
const REFS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("block_refs");
/// Node metadata: name → postcard-encoded value.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Written by versions before configurations had rows of their own (`CHAIN`): the whole chain as
/// one value, rewritten at every epoch. Read once and moved into `CHAIN`.
const META_CHAIN: &str = "config_chain";
/// The installed configurations: epoch → the certified configuration, encoded. Appended to at each
/// install; the rows already there are never rewritten.
const CHAIN: TableDefinition<u64, &[u8]> = TableDefinition::new("configurations");
const META_READY: &str = "ready_epochs";
/// The qualified deals of the newest rounds of the MS key this node saw (public).
const META_KEY_ROUNDS: &str = "ms_key_rounds";
/// Written by versions before the agreement state was persisted: the newest epoch whose MS
/// agreement the node took part in (read only, so that a node upgraded mid-epoch sits out the
/// agreement it signed in without a record).
const META_LEGACY_AGREEMENT: &str = "agreement_epoch";
/// State transfer progress: epoch → postcard-encoded arcs whose transfer into it is done (while the
/// epoch's transfer is not complete).
const TRANSFER_DONE: TableDefinition<u64, &[u8]> = TableDefinition::new("transfer_done");
/// Garbage collection: epoch → postcard-encoded arcs lost on entering it whose objects were deleted
/// (`Replica::delete_lost`); restored into the replica at start so it goes on answering `Gone`.
const GC_COLLECTED: TableDefinition<u64, &[u8]> = TableDefinition::new("gc_collected");
/// Content blocks a transfer could not store for lack of space: object id → ().
const DEFERRED: TableDefinition<&[u8], ()> = TableDefinition::new("deferred");
/// A committee member's MS agreement state: epoch → what it must not forget (the driver's record,
/// holding the core's durable state). Only the newest epoch is kept.
const MS_AGREEMENT: TableDefinition<u64, &[u8]> = TableDefinition::new("ms_agreement");
/// The batches a committee member executed: (epoch, sequence number) → the batch, encoded.
const MS_BATCHES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("ms_batches");
/// The node's shares of the MS's threshold key, by the epoch of their sharing (secret: like the
/// node's key file, they live only on this node's disk).
const MS_KEY_SHARES: TableDefinition<u64, &[u8]> = TableDefinition::new("ms_key_shares");

/// A committee member's agreement record and the batches it executed, encoded.
pub type SavedAgreement = (Vec<u8>, Vec<Vec<u8>>);

/// The reserve when none is set: 1% of the filesystem, at least 16 MiB and at most 1 GiB.
pub fn default_reserve(fs_bytes: u64) -> u64 {
    (fs_bytes / 100).clamp(16 << 20, 1 << 30)
}

/// Free space of a store, for status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    /// Bytes free on the store's filesystem for this process.
    pub free: u64,
    /// Size of the store's filesystem.
    pub size: u64,
    /// Free space kept for metadata: content blocks are refused below it.
    pub reserve: u64,
}

/// Why a store could not be opened or its metadata read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("store directory {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("metadata database: {0}")]
    Db(#[from] redb::Error),
    #[error("stored metadata {0} is unreadable: {1}")]
    BadMetadata(&'static str, String),
}

/// A [`Store`] on a local directory.
pub struct DiskStore {
    blocks: PathBuf,
    tmp: PathBuf,
    db: Database,
    tmp_seq: AtomicU64,
    content_bytes: AtomicU64,
    /// Free space kept for metadata ([`DiskStore::set_reserve`]).
    reserve: AtomicU64,
    /// Whether the last content write was refused for want of space (for logging transitions).
    full: AtomicBool,
    /// The ids of the content block files, in order (built at open). Renames into place and
    /// removals of block files happen under its lock, so it always matches the directory tree.
    index: Mutex<BTreeSet<ObjectId>>,
    /// Reference records waiting to be merged ([`Store::merge_refs`]), committed in groups.
    ref_queue: Mutex<Vec<RefMerge>>,
    /// Held by the caller that commits a group of merges.
    ref_commit: Mutex<()>,
}

/// One caller's merge waiting in [`DiskStore::ref_queue`], and where its result goes.
struct RefMerge {
    id: ObjectId,
    records: Vec<RefRecord>,
    result: MergeSlot,
}

/// Where a queued merge's outcome is put by the caller that commits it.
type MergeSlot = std::sync::Arc<Mutex<Option<Result<Vec<RefRecord>, StoreError>>>>;

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("blocks", &self.blocks)
            .finish_non_exhaustive()
    }
}

fn io_err(e: io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        StoreError::NoSpace
    } else {
        StoreError::Io(e.to_string())
    }
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Io(io) => io_err(io),
        other => StoreError::Io(other.to_string()),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` (one level below `parent`) if needed, making its entry durable.
fn ensure_dir(parent: &Path, dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => fsync_dir(parent),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

impl DiskStore {
    /// Opens (creating if needed) the store in `dir`, removing crash leftovers.
    pub fn open(dir: &Path) -> Result<DiskStore, OpenError> {
        let at = |path: &Path| {
            let path = path.to_path_buf();
            move |error| OpenError::Io { path, error }
        };
        let blocks = dir.join("blocks");
        let tmp = blocks.join("tmp");
        fs::create_dir_all(&tmp).map_err(at(&tmp))?;
        for entry in fs::read_dir(&tmp).map_err(at(&tmp))? {
            let entry = entry.map_err(at(&tmp))?;
            fs::remove_file(entry.path()).map_err(at(&entry.path()))?;
        }
        let db_path = dir.join("meta.redb");
        let db = Database::create(&db_path).map_err(redb::Error::from)?;
        {
            let w = db.begin_write().map_err(redb::Error::from)?;
            w.open_table(PK).map_err(redb::Error::from)?;
            w.open_table(REFS).map_err(redb::Error::from)?;
            w.open_table(META).map_err(redb::Error::from)?;
            w.open_table(CHAIN).map_err(redb::Error::from)?;
            w.open_table(TRANSFER_DONE).map_err(redb::Error::from)?;
            w.open_table(GC_COLLECTED).map_err(redb::Error::from)?;
            w.open_table(DEFERRED).map_err(redb::Error::from)?;
            w.open_table(MS_AGREEMENT).map_err(redb::Error::from)?;
            w.open_table(MS_KEY_SHARES).map_err(redb::Error::from)?;
            w.open_table(MS_BATCHES).map_err(redb::Error::from)?;
            w.commit().map_err(redb::Error::from)?;
        }
        let store = DiskStore {
            blocks,
            tmp,
            db,
            tmp_seq: AtomicU64::new(0),
            content_bytes: AtomicU64::new(0),
            reserve: AtomicU64::new(0),
            full: AtomicBool::new(false),
            index: Mutex::new(BTreeSet::new()),
            ref_queue: Mutex::new(Vec::new()),
            ref_commit: Mutex::new(()),
        };
        let size = store.statvfs().map(|(_, size)| size).map_err(at(dir))?;
        store.set_reserve(default_reserve(size));
        let (mut total, mut index) = (0, BTreeSet::new());
        store
            .walk_blocks(&mut |id, len| {
                total += len;
                index.insert(id);
            })
            .map_err(at(&store.blocks))?;
        store.content_bytes.store(total, Ordering::Relaxed);
        *store.index() = index;
        Ok(store)
    }

    /// Ids of the keys of `table` (the public-key blocks, or the reference records) within
    /// `range` (from [`id_bounds`]), ascending, at most `limit`.
    fn table_range(
        &self,
        table: TableDefinition<&[u8], &[u8]>,
        range: (Bound<ObjectId>, Bound<ObjectId>),
        limit: usize,
    ) -> Result<Vec<ObjectId>, StoreError> {
        fn bytes(b: &Bound<ObjectId>) -> Bound<&[u8]> {
            b.as_ref().map(|id| &id.0[..])
        }
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(table).map_err(db_err)?;
        let mut ids = Vec::new();
        for entry in t
            .range::<&[u8]>((bytes(&range.0), bytes(&range.1)))
            .map_err(db_err)?
        {
            if ids.len() >= limit {
                break;
            }
            let (k, _) = entry.map_err(db_err)?;
            if let Ok(arr) = <[u8; 32]>::try_from(k.value()) {
                ids.push(ObjectId(arr));
            }
        }
        Ok(ids)
    }

    /// [`Store::put_pk_if_newer`] for many blocks in one durable transaction (state transfer).
    pub fn put_pk_many(&self, blocks: &[PkBlock]) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(PK).map_err(db_err)?;
            for block in blocks {
                let id = block.id();
                let held = t
                    .get(id.0.as_slice())
                    .map_err(db_err)?
                    .and_then(|v| postcard::from_bytes::<PkBlock>(v.value()).ok())
                    .filter(|b| b.verify_as(&id).is_ok())
                    .map(|b| b.stamp());
                if held.is_some_and(|h| h >= block.stamp()) {
                    continue;
                }
                let bytes =
                    postcard::to_stdvec(block).map_err(|e| StoreError::Io(e.to_string()))?;
                t.insert(id.0.as_slice(), bytes.as_slice())
                    .map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)
    }
}

impl Store for DiskStore {
    fn get_content(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError> {
        let (_, _, file) = self.block_path(id);
        let data = match fs::read(&file) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        match check_content(id, &data) {
            Ok(()) => Ok(Some(data)),
            Err(e) => {
                warn!(block = %id.to_hex(), path = %file.display(), error = %e,
                      "content block on disk is corrupt; treating it as missing");
                Ok(None)
            }
        }
    }

    fn put_content(&self, id: &ObjectId, data: &[u8]) -> Result<(), StoreError> {
        // Always rewrite: a corrupt copy must be replaced by a verified one, and blocks are
        // immutable, so rewriting an intact copy changes nothing. Below the reserve, a copy held
        // stays as it is (every read verifies it) and a new block is refused.
        if let Err(e) = self.room_for(data.len() as u64) {
            return if self.content_len(id)?.is_some() {
                Ok(())
            } else {
                Err(e)
            };
        }
        let new = self.write_block(id, data).map_err(io_err)?;
        if new {
            self.content_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn get_pk(&self, id: &ObjectId) -> Result<Option<PkBlock>, StoreError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(PK).map_err(db_err)?;
        let Some(v) = t.get(id.0.as_slice()).map_err(db_err)? else {
            return Ok(None);
        };
        match postcard::from_bytes::<PkBlock>(v.value()) {
            Ok(b) if b.verify_as(id).is_ok() => Ok(Some(b)),
            _ => {
                warn!(block = %id.to_hex(), "public-key block on disk is corrupt; treating it as missing");
                Ok(None)
            }
        }
    }

    fn put_pk_if_newer(&self, block: &PkBlock) -> Result<Stamp, StoreError> {
        let id = block.id();
        let stamp = block.stamp();
        let bytes = postcard::to_stdvec(block).map_err(|e| StoreError::Io(e.to_string()))?;
        // redb runs one write transaction at a time, so read-compare-write below is atomic.
        let w = self.db.begin_write().map_err(db_err)?;
        let held = {
            let mut t = w.open_table(PK).map_err(db_err)?;
            let old = t
                .get(id.0.as_slice())
                .map_err(db_err)?
                .and_then(|v| postcard::from_bytes::<PkBlock>(v.value()).ok())
                .filter(|b| b.verify_as(&id).is_ok())
                .map(|b| b.stamp());
            match old {
                Some(old) if old >= stamp => old,
                _ => {
                    t.insert(id.0.as_slice(), bytes.as_slice())
                        .map_err(db_err)?;
                    stamp
                }
            }
        };
        w.commit().map_err(db_err)?;
        Ok(held)
    }

    fn list(&self) -> Result<Vec<ObjectId>, StoreError> {
        let mut ids: Vec<ObjectId> = self.index().iter().copied().collect();
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(PK).map_err(db_err)?;
        for entry in t.iter().map_err(db_err)? {
            let (k, _) = entry.map_err(db_err)?;
            if let Ok(arr) = <[u8; 32]>::try_from(k.value()) {
                ids.push(ObjectId(arr));
            }
        }
        Ok(ids)
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
        let content: Vec<ObjectId> = self.index().range(range).take(limit).copied().collect();
        let content = merge_ids(content, self.table_range(REFS, range, limit)?, limit);
        Ok(merge_ids(
            content,
            self.table_range(PK, range, limit)?,
            limit,
        ))
    }

    fn delete(&self, id: &ObjectId) -> Result<(), StoreError> {
        self.delete_block_file(id)?;
        // A write transaction (an fsync) only for a public-key block or records actually held:
        // garbage collection deletes many content blocks in a row.
        let held = |table| -> Result<bool, StoreError> {
            let r = self.db.begin_read().map_err(db_err)?;
            let t = r.open_table(table).map_err(db_err)?;
            Ok(t.get(id.0.as_slice()).map_err(db_err)?.is_some())
        };
        let (pk, refs) = (held(PK)?, held(REFS)?);
        if !pk && !refs {
            return Ok(());
        }
        let w = self.db.begin_write().map_err(db_err)?;
        for (table, held) in [(PK, pk), (REFS, refs)] {
            if held {
                let mut t = w.open_table(table).map_err(db_err)?;
                t.remove(id.0.as_slice()).map_err(db_err)?;
            }
        }
        w.commit().map_err(db_err)
    }

    fn has_content(&self, id: &ObjectId) -> Result<bool, StoreError> {
        Ok(self.index().contains(id))
    }

    fn refs(&self, id: &ObjectId) -> Result<Vec<RefRecord>, StoreError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(REFS).map_err(db_err)?;
        Ok(read_refs(
            t.get(id.0.as_slice())
                .map_err(db_err)?
                .as_ref()
                .map(|v| v.value()),
            id,
        ))
    }

    fn merge_refs(
        &self,
        id: &ObjectId,
        records: &[RefRecord],
    ) -> Result<Vec<RefRecord>, StoreError> {
        // Most merges change nothing (a retransmitted put): those cost no write transaction.
        let held = self.refs(id)?;
        if !refs::merge(&mut held.clone(), id, records) {
            return Ok(held);
        }
        // Group commit: every merge queued meanwhile goes in one durable transaction (one fsync
        // for all the puts a node is storing at once), committed by whichever caller gets the
        // commit lock first; the others find their result done when they get it.
        let result = std::sync::Arc::new(Mutex::new(None));
        lock(&self.ref_queue).push(RefMerge {
            id: *id,
            records: records.to_vec(),
            result: result.clone(),
        });
        let _commit = lock(&self.ref_commit);
        if let Some(done) = lock(&result).take() {
            return done;
        }
        let group = std::mem::take(&mut *lock(&self.ref_queue));
        let outcome = self.commit_merges(&group);
        for (m, r) in group.iter().zip(outcome) {
            *lock(&m.result) = Some(r);
        }
        let done = lock(&result).take();
        done.unwrap_or_else(|| Err(StoreError::Io("a reference merge was lost".into())))
    }

    fn put_held(
        &self,
        id: &ObjectId,
        data: &[u8],
        hold: &RefRecord,
    ) -> Result<Vec<RefRecord>, StoreError> {
        // The block file and the hold's transaction, each with its fsyncs, at once; then, if a
        // sweep deleted the file before the hold was committed (the block was released a grace
        // ago and is put again just now), the file is written again: once the hold is durable no
        // sweep deletes it.
        let (held, wrote) = std::thread::scope(|s| {
            let writer = s.spawn(|| self.put_content(id, data));
            let held = self.merge_refs(id, std::slice::from_ref(hold));
            let wrote = writer
                .join()
                .unwrap_or_else(|_| Err(StoreError::Io("the block writer panicked".into())));
            (held, wrote)
        });
        let held = held?;
        if refs::holding(&held, &hold.owner) {
            wrote?;
            if !self.has_content(id)? {
                self.put_content(id, data)?;
            }
        }
        Ok(held)
    }

    fn merge_refs_many(
        &self,
        items: &[(ObjectId, Vec<RefRecord>)],
    ) -> Result<Vec<Vec<RefRecord>>, StoreError> {
        self.merge_in_one(items.iter().map(|(id, r)| (id, r.as_slice())))
    }

    fn drop_released(&self, id: &ObjectId) -> Result<bool, StoreError> {
        // Inside a write transaction, so that no hold is merged between the check and the
        // deletion (a put merges its hold before it writes its data).
        let w = self.db.begin_write().map_err(db_err)?;
        let released = {
            let t = w.open_table(REFS).map_err(db_err)?;
            let held = read_refs(
                t.get(id.0.as_slice())
                    .map_err(db_err)?
                    .as_ref()
                    .map(|v| v.value()),
                id,
            );
            refs::released(&held)
        };
        let dropped = released && self.delete_block_file(id)?;
        w.abort().map_err(db_err)?;
        Ok(dropped)
    }

    fn released(&self) -> Result<Vec<ObjectId>, StoreError> {
        let r = self.db.begin_read().map_err(db_err)?;
        let t = r.open_table(REFS).map_err(db_err)?;
        let index = self.index().clone();
        let mut ids = Vec::new();
        for entry in t.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let Ok(arr) = <[u8; 32]>::try_from(k.value()) else {
                continue;
            };
            let id = ObjectId(arr);
            if index.contains(&id) && refs::released(&read_refs(Some(v.value()), &id)) {
                ids.push(id);
            }
        }
        Ok(ids)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbqsfs_core::crypto::Keypair;
    use dbqsfs_core::object::content_id;

    fn open(dir: &Path) -> DiskStore {
        DiskStore::open(dir).expect("open store")
    }

    #[test]
    fn content_round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"hello blocks".to_vec();
        let id = content_id(&data);
        {
            let s = open(dir.path());
            assert_eq!(s.get_content(&id).unwrap(), None);
            s.put_content(&id, &data).unwrap();
            s.put_content(&id, &data).unwrap();
            assert_eq!(s.get_content(&id).unwrap(), Some(data.clone()));
            assert_eq!(s.content_bytes(), data.len() as u64);
        }
        let s = open(dir.path());
        assert_eq!(s.get_content(&id).unwrap(), Some(data.clone()));
        assert_eq!(s.content_bytes(), data.len() as u64);
        assert_eq!(s.content_len(&id).unwrap(), Some(data.len() as u64));
        assert_eq!(s.content_len(&content_id(b"other")).unwrap(), None);
        assert_eq!(s.list().unwrap(), vec![id]);
    }

    #[test]
    fn ranges_come_from_the_index_and_the_pk_table_in_order_across_reopen_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let owner = Keypair::from_seed([3; 32]);
        let mut all = Vec::new();
        {
            let s = open(dir.path());
            for i in 0..60u32 {
                let data = format!("block {i}").into_bytes();
                let id = content_id(&data);
                s.put_content(&id, &data).unwrap();
                all.push(id);
                let b = PkBlock::sign(&owner, &i.to_le_bytes(), 1, vec![2; 5]).unwrap();
                s.put_pk_if_newer(&b).unwrap();
                all.push(b.id());
            }
        }
        all.sort();
        let s = open(dir.path());
        let top = ObjectId([0xff; 32]);
        assert_eq!(s.list_range(None, &top, 1000).unwrap(), all);
        assert_eq!(s.list_range(None, &top, 7).unwrap(), all[..7]);
        assert_eq!(
            s.list_range(Some(&all[10]), &all[30], 1000).unwrap(),
            all[11..=30]
        );
        assert_eq!(
            s.list_range(Some(&all[30]), &all[10], 1000).unwrap(),
            vec![]
        );
        assert_eq!(
            s.list_range(Some(&all[10]), &all[10], 1000).unwrap(),
            vec![]
        );
        let mut listed = s.list().unwrap();
        listed.sort();
        assert_eq!(listed, all);
        for id in &all[..20] {
            s.delete(id).unwrap();
        }
        assert_eq!(s.list_range(None, &top, 1000).unwrap(), all[20..]);
        drop(s);
        assert_eq!(
            open(dir.path()).list_range(None, &top, 1000).unwrap(),
            all[20..]
        );
    }

    #[test]
    fn pk_blocks_keep_the_highest_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let owner = Keypair::from_seed([7; 32]);
        let v1 = PkBlock::sign(&owner, b"root", 1, b"one".to_vec()).unwrap();
        let v2 = PkBlock::sign(&owner, b"root", 2, b"two".to_vec()).unwrap();
        assert_eq!(s.put_pk_if_newer(&v2).unwrap(), v2.stamp());
        assert_eq!(s.put_pk_if_newer(&v1).unwrap(), v2.stamp());
        assert_eq!(s.get_pk(&v1.id()).unwrap(), Some(v2.clone()));
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.get_pk(&v1.id()).unwrap(), Some(v2));
        assert_eq!(s.list().unwrap(), vec![v1.id()]);
    }

    #[test]
    fn corrupt_block_file_reads_as_missing_and_can_be_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let data = vec![42u8; 4096];
        let id = content_id(&data);
        s.put_content(&id, &data).unwrap();
        let (_, _, file) = s.block_path(&id);
        let mut bad = data.clone();
        bad[100] ^= 1;
        fs::write(&file, &bad).unwrap();
        assert_eq!(s.get_content(&id).unwrap(), None);
        s.put_content(&id, &data).unwrap();
        assert_eq!(s.get_content(&id).unwrap(), Some(data));
    }

    #[test]
    fn crash_leftover_tmp_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"torn".to_vec();
        let id = content_id(&data);
        {
            let s = open(dir.path());
            fs::write(s.tmp.join(format!("{}.1.0", id.to_hex())), b"to").unwrap();
        }
        let s = open(dir.path());
        assert_eq!(fs::read_dir(&s.tmp).unwrap().count(), 0);
        assert_eq!(s.get_content(&id).unwrap(), None);
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn metadata_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        assert_eq!(s.load_ready().unwrap(), None);
        s.save_ready(&[0, 1]).unwrap();
        assert_eq!(s.load_chain().unwrap().map(|c| c.len()), None);
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.load_ready().unwrap(), Some(vec![0, 1]));
    }

    /// A chain of `n` certified configurations of four members (every member signs each).
    fn chain(n: u64) -> Vec<CertifiedConfig> {
        use dbqsfs_core::config::{Configuration, Member, Params};
        let keys: Vec<Keypair> = (0..4).map(|i| Keypair::from_seed([i + 40; 32])).collect();
        let members: Vec<Member> = keys
            .iter()
            .map(|k| Member::new(k.public(), "127.0.0.1:1"))
            .collect();
        let signers: Vec<&Keypair> = keys.iter().collect();
        let mut out = vec![CertifiedConfig::genesis(Configuration::new(
            0,
            Params::with_f(1),
            members.clone(),
            None,
        ))];
        for e in 1..n {
            let prev = out.last().unwrap().config.hash();
            let c = Configuration::new(e, Params::with_f(1), members.clone(), Some(prev));
            out.push(CertifiedConfig::certify(c, &signers));
        }
        out
    }

    #[test]
    fn the_chain_is_saved_a_row_per_epoch_and_an_old_whole_chain_moves_into_rows() {
        let configs = chain(5);
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.save_configs(&configs[..1]).unwrap();
        s.save_configs(&configs[1..3]).unwrap();
        s.save_configs(&configs[3..]).unwrap();
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.load_chain().unwrap(), Some(configs.clone()));

        // A store written by an older version holds the whole chain in one value.
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.put_meta(META_CHAIN, &configs[..3].to_vec()).unwrap();
        assert_eq!(s.load_chain().unwrap(), Some(configs[..3].to_vec()));
        assert_eq!(
            s.get_meta::<Vec<CertifiedConfig>>(META_CHAIN).unwrap(),
            None,
            "moved into rows"
        );
        s.save_configs(&configs[3..]).unwrap();
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.load_chain().unwrap(), Some(configs));
    }

    /// What installing one more configuration costs after `n` epochs: a row (now) against the
    /// whole chain rewritten (before), and a copy of the chain (shared configurations) against
    /// copying every configuration. A benchmark: `cargo test --release -p dbqsfs-daemon --lib
    /// bench_chain_growth -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_chain_growth() {
        use dbqsfs_core::config::ConfigChain;
        use std::time::Instant;
        for n in [100u64, 1_000, 3_000] {
            let configs = chain(n + 1);
            let dir = tempfile::tempdir().unwrap();
            let s = open(dir.path());
            s.save_configs(&configs[..n as usize]).unwrap();
            let t = Instant::now();
            s.save_configs(&configs[n as usize..]).unwrap();
            let row = t.elapsed();
            let t = Instant::now();
            s.put_meta(META_CHAIN, &configs).unwrap();
            let whole = t.elapsed();
            let mut c = ConfigChain::new(configs[0].clone()).unwrap();
            c.extend(configs[1..].to_vec()).unwrap();
            let t = Instant::now();
            for _ in 0..100 {
                std::hint::black_box(c.clone());
            }
            let shared = t.elapsed() / 100;
            let t = Instant::now();
            for _ in 0..100 {
                std::hint::black_box(c.all());
            }
            let copied = t.elapsed() / 100;
            println!(
                "after {n} epochs: install writes a row in {:.2} ms (the whole chain: {:.2} ms); a copy of the chain {:.3} ms (every configuration copied: {:.3} ms)",
                row.as_secs_f64() * 1e3,
                whole.as_secs_f64() * 1e3,
                shared.as_secs_f64() * 1e3,
                copied.as_secs_f64() * 1e3
            );
        }
    }

    #[test]
    fn transfer_progress_round_trips_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let arc = |a: u8, b: u8| RingArc {
            start: [a; 32],
            end: [b; 32],
        };
        {
            let s = open(dir.path());
            assert!(s.load_transfer_done().unwrap().is_empty());
            s.add_transfer_done(3, arc(1, 2)).unwrap();
            s.add_transfer_done(3, arc(1, 2)).unwrap();
            s.add_transfer_done(3, arc(5, 9)).unwrap();
            s.add_transfer_done(4, arc(7, 7)).unwrap();
        }
        let s = open(dir.path());
        let done = s.load_transfer_done().unwrap();
        assert_eq!(done[&3], vec![arc(1, 2), arc(5, 9)]);
        assert_eq!(done[&4], vec![arc(7, 7)]);
        s.clear_transfer_done(3).unwrap();
        assert_eq!(
            s.load_transfer_done().unwrap().keys().collect::<Vec<_>>(),
            [&4]
        );
    }

    #[test]
    fn pk_batches_keep_the_highest_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let owner = Keypair::from_seed([8; 32]);
        let v1 = PkBlock::sign(&owner, b"a", 1, b"one".to_vec()).unwrap();
        let v2 = PkBlock::sign(&owner, b"a", 2, b"two".to_vec()).unwrap();
        let w = PkBlock::sign(&owner, b"b", 1, b"w".to_vec()).unwrap();
        s.put_pk_many(&[v2.clone(), w.clone()]).unwrap();
        s.put_pk_many(std::slice::from_ref(&v1)).unwrap();
        assert_eq!(s.get_pk(&v1.id()).unwrap(), Some(v2));
        assert_eq!(s.get_pk(&w.id()).unwrap(), Some(w));
    }

    #[test]
    fn released_blocks_lose_their_data_and_keep_their_records_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
        let (kept, gone) = (b"kept".to_vec(), b"gone".to_vec());
        let (k, g) = (content_id(&kept), content_id(&gone));
        {
            let s = open(dir.path());
            for (x, d) in [(k, &kept), (g, &gone)] {
                s.merge_refs(&x, &[RefRecord::hold(&a, x, 1), RefRecord::hold(&b, x, 1)])
                    .unwrap();
                s.put_content(&x, d).unwrap();
            }
            // A replayed hold changes nothing; b lets go of both, a only of `gone`.
            assert_eq!(
                s.merge_refs(&k, &[RefRecord::hold(&b, k, 1)])
                    .unwrap()
                    .len(),
                2
            );
            s.merge_refs(&k, &[RefRecord::release(&b, k, 2)]).unwrap();
            let held = s
                .merge_refs(
                    &g,
                    &[RefRecord::release(&b, g, 2), RefRecord::release(&a, g, 2)],
                )
                .unwrap();
            assert!(refs::released(&held));
            assert!(!s.drop_released(&k).unwrap(), "a still holds it");
        }
        let s = open(dir.path());
        assert_eq!(
            s.released().unwrap(),
            vec![g],
            "found again after a restart"
        );
        let before = s.content_bytes();
        assert!(s.drop_released(&g).unwrap());
        assert!(!s.drop_released(&g).unwrap(), "idempotent");
        assert_eq!(s.content_bytes(), before - gone.len() as u64);
        assert!(!s.has_content(&g).unwrap());
        assert_eq!(s.get_content(&g).unwrap(), None);
        assert_eq!(s.refs(&g).unwrap().len(), 4, "the tombstones stay");
        assert!(s.released().unwrap().is_empty());
        // The tombstone is listed (for transfer) but not as held data.
        let top = ObjectId([0xff; 32]);
        let listed = s.list_range(None, &top, 10).unwrap();
        assert!(listed.contains(&g) && listed.contains(&k));
        assert_eq!(s.list().unwrap(), vec![k]);
        // Garbage collection of a lost range takes records and all.
        s.delete(&g).unwrap();
        s.delete(&k).unwrap();
        assert!(s.refs(&g).unwrap().is_empty() && s.refs(&k).unwrap().is_empty());
        assert!(s.list_range(None, &top, 10).unwrap().is_empty());
    }

    #[test]
    fn concurrent_merges_commit_in_groups_and_lose_none() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(open(dir.path()));
        let ids: Vec<ObjectId> = (0..4u8).map(|i| content_id(&[i])).collect();
        let threads: Vec<_> = (0..16u8)
            .map(|t| {
                let (s, ids) = (s.clone(), ids.clone());
                std::thread::spawn(move || {
                    let k = Keypair::from_seed([t + 1; 32]);
                    for (i, x) in ids.iter().enumerate() {
                        let held = s.merge_refs(x, &[RefRecord::hold(&k, *x, i as u64 + 1)]);
                        assert!(held.unwrap().iter().any(|r| r.owner == k.public()));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(s);
        let s = open(dir.path());
        for x in &ids {
            assert_eq!(s.refs(x).unwrap().len(), 16, "every owner's hold, durable");
        }
    }

    #[test]
    fn a_held_put_stores_data_and_hold_and_a_superseded_one_only_schedules_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let a = Keypair::from_seed([1; 32]);
        let data = b"put, released, put again".to_vec();
        let x = content_id(&data);
        let held = s.put_held(&x, &data, &RefRecord::hold(&a, x, 1)).unwrap();
        assert!(refs::holding(&held, &a.public()));
        assert_eq!(s.get_content(&x).unwrap(), Some(data.clone()));
        s.merge_refs(&x, &[RefRecord::release(&a, x, 2)]).unwrap();
        assert!(s.drop_released(&x).unwrap());
        // A late put of the old hold: not held, and whatever it wrote is released again.
        let late = RefRecord::hold(&a, x, 1);
        let held = s.put_held(&x, &data, &late).unwrap();
        assert!(!refs::holding(&held, &late.owner));
        assert!(s.released().unwrap().iter().all(|y| *y == x));
        // A newer hold brings it back, durable.
        let new = RefRecord::hold(&a, x, 3);
        assert!(refs::holding(
            &s.put_held(&x, &data, &new).unwrap(),
            &new.owner
        ));
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.get_content(&x).unwrap(), Some(data));
        assert!(s.released().unwrap().is_empty());
    }

    #[test]
    fn a_transfers_records_merge_in_one_write_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let a = Keypair::from_seed([1; 32]);
        let ids: Vec<ObjectId> = (0..100u8).map(|i| content_id(&[i])).collect();
        let first: Vec<_> = ids
            .iter()
            .map(|x| (*x, vec![RefRecord::hold(&a, *x, 1)]))
            .collect();
        assert!(s
            .merge_refs_many(&first)
            .unwrap()
            .iter()
            .all(|r| r.len() == 1));
        // The same block twice in one batch: the second sees the first.
        let x = ids[0];
        let twice = vec![
            (x, vec![RefRecord::release(&a, x, 2)]),
            (x, vec![RefRecord::hold(&a, x, 3)]),
        ];
        let out = s.merge_refs_many(&twice).unwrap();
        assert_eq!((out[0].len(), out[1].len()), (2, 2));
        assert!(refs::released(&out[0]) && !refs::released(&out[1]));
        drop(s);
        let s = open(dir.path());
        assert!(!refs::released(&s.refs(&x).unwrap()));
        assert_eq!(s.refs(&ids[99]).unwrap().len(), 1);
    }
}
