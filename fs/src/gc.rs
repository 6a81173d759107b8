//! Volume garbage collection: the writer releases the chunks its volume no longer reaches.
//!
//! Goals: space comes back (overwritten data, deleted files, journal segments folded into a
//! checkpoint, replaced checkpoint pages, a deleted snapshot's blocks), incrementally and in the
//! background, without ever releasing a chunk that the durable state or a snapshot reaches.
//!
//! Safety rests on one check, made under the committer's lock (so no commit runs meanwhile):
//! a chunk is released only if it is not in `reach` — everything the durable image names (file
//! chunks, stored patch lists, checkpoint pages), the durable head's checkpoint and journal
//! pieces, and the structure of the checkpoint that head names (which a failed checkpoint may
//! have replaced in the image only) — nor in any snapshot's reach, nor put since that reach was
//! computed. A chunk becomes reachable again only by being put again, by a commit, under the
//! same lock; dBQS orders a hold and a release of one owner by their sequence numbers, so a put
//! after a release keeps the chunk whichever reaches the replicas first.
//!
//! Snapshots copy a head while the writer runs, so releasing what an older head reaches races
//! with them. The handshake: before releasing, the writer writes a head whose `gc_floor` is its
//! own version ("heads older than this may lose blocks from now on"), then reads the snapshot
//! index; `snapshot::create`, after writing the index, reads the head again and starts over if
//! the floor passed the head it copied. One of the two always sees the other. A pass releases
//! only what was pending at that moment (`ready`): a chunk that became unreachable later, say by
//! a checkpoint between two of its batches, waits for the next pass's floor and index read.
//!
//! Completeness (what is not released is only leaked, never lost): the candidates are what the
//! last pass reached plus what was put since, less what is reached now; at open, what the
//! checkpoint and the journal name plus the head's garbage list (the pending candidates, which
//! include what a checkpoint made unreachable from what an open can see; in the head when few,
//! else stored as a list the head names). So a crash leaks nothing. A snapshot deleted while no
//! writer runs waits in the index's deleted list (`snapshot::delete`) for the next collector.
//!
//! Non-goals: releasing records (the head, snapshot records), collecting for read-only mounts
//! (a reader that still holds an old chunk id keeps it for the replicas' grace period).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use crate::backend::{Backend, BackendError, Capacity, ChunkId, Record};
use crate::error::{FsError, FsResult};
use crate::image::{get_joined, piece_size, put_chunks, Content, Image};
use crate::layout::{split, GarbageList, Head};

/// How many pending ids a head lists at most (32 bytes each; fewer with small blocks).
pub(crate) const GARBAGE_IN_HEAD: usize = 2048;

/// How many chunks one release call covers (the committer's lock is held across it).
pub(crate) const RELEASE_BATCH: usize = 256;

/// A backend that remembers every chunk put through it, for the collector: a chunk put since
/// the last pass may be referenced by the state the pass did not see.
pub(crate) struct Recording {
    inner: Arc<dyn Backend>,
    puts: Arc<Mutex<Vec<ChunkId>>>,
}

impl Recording {
    pub fn wrap(inner: Arc<dyn Backend>) -> (Arc<dyn Backend>, Arc<Mutex<Vec<ChunkId>>>) {
        let puts = Arc::new(Mutex::new(Vec::new()));
        let b = Recording {
            inner,
            puts: puts.clone(),
        };
        (Arc::new(b), puts)
    }
}

impl Backend for Recording {
    fn put_chunk(&self, data: &[u8]) -> Result<ChunkId, BackendError> {
        let id = self.inner.put_chunk(data)?;
        self.puts.lock().unwrap_or_else(|p| p.into_inner()).push(id);
        Ok(id)
    }
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, BackendError> {
        self.inner.get_chunk(id)
    }
    fn get_record(&self, label: &[u8]) -> Result<Option<Record>, BackendError> {
        self.inner.get_record(label)
    }
    fn put_record(&self, label: &[u8], version: u64, value: &[u8]) -> Result<(), BackendError> {
        self.inner.put_record(label, version, value)
    }
    fn release_chunks(&self, ids: &[ChunkId]) -> Result<(), BackendError> {
        self.inner.release_chunks(ids)
    }
    fn max_block(&self) -> usize {
        self.inner.max_block()
    }
    fn capacity(&self) -> Option<Capacity> {
        self.inner.capacity()
    }
}

/// What the collector has done, for `dbqsfs status` and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcStats {
    /// Passes run (each computes what the volume reaches).
    pub passes: u64,
    /// Chunks released since the volume was opened.
    pub released: u64,
    /// Unreachable chunks waiting to be released.
    pub pending: u64,
    /// Chunks only snapshots keep (the live state does not reach them).
    pub kept_for_snapshots: u64,
    /// Chunks the live state and the snapshots reach, at the last pass.
    pub reachable: u64,
    /// The last pass's failure, if it failed.
    pub last_error: Option<String>,
}

/// The collector's state; lives in the `Committer`, behind its lock.
pub(crate) struct Gc {
    puts: Arc<Mutex<Vec<ChunkId>>>,
    /// What the last pass found reachable.
    last: HashSet<ChunkId>,
    /// Found unreachable, not yet released.
    pub pending: BTreeSet<ChunkId>,
    /// What the last pass may release: pending when it raised the floor and read the index.
    pub ready: BTreeSet<ChunkId>,
    /// The structure of the checkpoint the durable head names (root pieces, pages, patch lists).
    pub durable_checkpoint: HashSet<ChunkId>,
    /// Each snapshot's reach, by name, with the commit it copied.
    snapshots: BTreeMap<String, (u64, HashSet<ChunkId>)>,
    pub stats: GcStats,
    /// The pending ids as last stored for a head (a hash of the set, and the list's pieces).
    spilled: Option<([u8; 32], Vec<ChunkId>)>,
    /// Deleted snapshots (`NAME@COMMIT`) whose blocks are pending: the index forgets them once
    /// nothing is pending.
    pub freed_deleted: BTreeSet<String>,
    /// Stored lists a head replaced since the last `collect`: garbage no pass has seen yet, so
    /// every head lists them too.
    replaced: BTreeSet<ChunkId>,
}

fn list_hash(ids: &BTreeSet<ChunkId>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for id in ids {
        h.update(id);
    }
    *h.finalize().as_bytes()
}

impl Gc {
    /// A collector: `seen` is everything the volume named when it was opened (any of it may
    /// be unreachable now), `durable_checkpoint` the structure of its checkpoint.
    pub fn new(
        puts: Arc<Mutex<Vec<ChunkId>>>,
        seen: HashSet<ChunkId>,
        durable_checkpoint: HashSet<ChunkId>,
    ) -> Gc {
        Gc {
            puts,
            last: seen,
            pending: BTreeSet::new(),
            ready: BTreeSet::new(),
            durable_checkpoint,
            snapshots: BTreeMap::new(),
            stats: GcStats::default(),
            spilled: None,
            freed_deleted: BTreeSet::new(),
            replaced: BTreeSet::new(),
        }
    }

    /// The collector of a volume opened at `head`: what it lists as garbage is pending.
    pub fn open(
        backend: &dyn Backend,
        puts: Arc<Mutex<Vec<ChunkId>>>,
        seen: HashSet<ChunkId>,
        durable_checkpoint: HashSet<ChunkId>,
        head: &Head,
    ) -> FsResult<Gc> {
        let mut gc = Gc::new(puts, seen, durable_checkpoint);
        gc.pending.extend(head.garbage.iter().copied());
        if !head.garbage_list.is_empty() {
            let list = GarbageList::decode(&get_joined(backend, &head.garbage_list)?)?;
            gc.pending.extend(list.ids);
            gc.spilled = Some((list_hash(&gc.pending), head.garbage_list.clone()));
        }
        Ok(gc)
    }

    /// Everything the durable state reaches: `image` as `head` describes it, plus the structure
    /// of the checkpoint the durable head names.
    pub fn reach(&self, image: &Image, head: &Head) -> HashSet<ChunkId> {
        let mut r = image_reach(image, head);
        r.extend(self.durable_checkpoint.iter().copied());
        r
    }

    /// Moves into `pending` what was reachable or put before and is not in `now`.
    pub fn collect(&mut self, now: HashSet<ChunkId>) {
        let puts = std::mem::take(&mut *self.puts.lock().unwrap_or_else(|p| p.into_inner()));
        for id in self.last.iter().chain(&puts) {
            if !now.contains(id) {
                self.pending.insert(*id);
            }
        }
        self.pending.retain(|id| !now.contains(id));
        self.replaced.clear();
        self.last = now;
        self.stats.pending = self.pending.len() as u64;
    }

    /// Notes that `ids` are released: a stored list among them cannot be named again.
    pub fn released(&mut self, ids: &[ChunkId]) {
        if let Some((_, pieces)) = &self.spilled {
            if ids.iter().any(|id| pieces.contains(id)) {
                self.spilled = None;
            }
        }
        for id in ids {
            self.pending.remove(id);
        }
        self.stats.released += ids.len() as u64;
        self.stats.pending = self.pending.len() as u64;
    }

    /// Whether a chunk was put since the last `collect` (it may be reachable again).
    pub fn put_since(&self, ids: &[ChunkId]) -> HashSet<ChunkId> {
        let puts = self.puts.lock().unwrap_or_else(|p| p.into_inner());
        let asked: HashSet<&ChunkId> = ids.iter().collect();
        puts.iter()
            .filter(|id| asked.contains(id))
            .copied()
            .collect()
    }

    /// Takes up the snapshots the index lists (`(name, commit)`), loading the reach of new ones
    /// with `load`; a snapshot gone from the index gives back what only it kept.
    pub fn set_snapshots(
        &mut self,
        listed: &[(String, u64)],
        now: &HashSet<ChunkId>,
        mut load: impl FnMut(&str) -> crate::error::FsResult<HashSet<ChunkId>>,
    ) -> crate::error::FsResult<()> {
        let names: BTreeSet<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
        let gone: Vec<String> = self
            .snapshots
            .iter()
            .filter(|(n, (c, _))| {
                !names.contains(n.as_str()) || !listed.iter().any(|(m, k)| m == *n && k == c)
            })
            .map(|(n, _)| n.clone())
            .collect();
        let mut freed = HashSet::new();
        for n in gone {
            if let Some((_, reach)) = self.snapshots.remove(&n) {
                freed.extend(reach);
            }
        }
        for (name, commit) in listed {
            if !self.snapshots.contains_key(name) {
                let reach = load(name)?;
                self.snapshots.insert(name.clone(), (*commit, reach));
            }
        }
        for id in freed {
            if !now.contains(&id) {
                self.pending.insert(id);
            }
        }
        Ok(())
    }

    /// The snapshots whose reach is known, as `NAME@COMMIT`.
    pub fn known_snapshots(&self) -> BTreeSet<String> {
        self.snapshots
            .iter()
            .map(|(n, (c, _))| format!("{n}@{c}"))
            .collect()
    }

    /// Makes pending what a deleted snapshot reached and the volume does not.
    pub fn free(&mut self, reach: HashSet<ChunkId>, now: &HashSet<ChunkId>) {
        self.pending
            .extend(reach.into_iter().filter(|id| !now.contains(id)));
    }

    /// How many chunks the snapshots keep that the live state does not reach (as of the last
    /// pass).
    pub fn kept_total(&self) -> usize {
        let mut kept: HashSet<&ChunkId> = HashSet::new();
        for (_, reach) in self.snapshots.values() {
            kept.extend(reach.iter().filter(|id| !self.last.contains(*id)));
        }
        kept.len()
    }

    /// Whether a snapshot reaches `id`.
    pub fn kept_by_snapshot(&self, id: &ChunkId) -> bool {
        self.snapshots.values().any(|(_, r)| r.contains(id))
    }

    /// What a head lists of the pending ids: in itself when they are few (at most
    /// `GARBAGE_IN_HEAD`, and an eighth of a block), else as a stored list (stored again only
    /// when it changed).
    ///
    /// A stored list the head named before (`current`) is garbage once the new head replaces
    /// it, and the volume may close before a pass sees that: heads name it too until one does.
    pub fn garbage_for_head(
        &mut self,
        backend: &dyn Backend,
        current: &[ChunkId],
    ) -> FsResult<(Vec<ChunkId>, Vec<ChunkId>)> {
        let cap = GARBAGE_IN_HEAD.min(backend.max_block() / 8 / 32);
        let mut ids = self.pending.clone();
        ids.extend(self.replaced.iter().copied());
        if ids.len() <= cap {
            self.replaced.extend(current.iter().copied());
            ids.extend(current.iter().copied());
            return Ok((ids.into_iter().collect(), Vec::new()));
        }
        let hash = list_hash(&ids);
        if let Some((h, pieces)) = &self.spilled {
            if *h == hash && pieces == current {
                return Ok((Vec::new(), pieces.clone()));
            }
        }
        self.replaced.extend(current.iter().copied());
        ids.extend(current.iter().copied());
        let hash = list_hash(&ids);
        let list = GarbageList {
            ids: ids.iter().copied().collect(),
        }
        .encode();
        let pieces = match put_chunks(backend, &split(&list, piece_size(backend))) {
            Ok(pieces) => pieces,
            // The nodes have no space for the list: the head carries it while it can (a head
            // must be written for the volume to free space at all).
            Err(FsError::Backend(BackendError::NoSpace))
                if ids.len() <= backend.max_block() / 4 / 32 =>
            {
                return Ok((ids.into_iter().collect(), Vec::new()));
            }
            Err(e) => return Err(e),
        };
        self.spilled = Some((hash, pieces.clone()));
        Ok((Vec::new(), pieces))
    }
}

/// What `image` and `head` name: file chunks, stored patch lists, checkpoint pages, and the
/// head's checkpoint root and journal pieces.
pub(crate) fn image_reach(image: &Image, head: &Head) -> HashSet<ChunkId> {
    let mut r = HashSet::new();
    for inode in image.inodes.values() {
        if let Content::File(m) = &inode.content {
            for p in m.chunks.values() {
                r.extend(p.id);
                r.extend(p.stored_patches);
            }
        }
    }
    r.extend(image.page_pieces());
    r.extend(head.checkpoint.iter().copied());
    r.extend(head.journal.iter().flatten().copied());
    r.extend(head.garbage_list.iter().copied());
    r
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::backend::{Backend, MemBackend};
    use crate::volume::{Cred, Volume, VolumeConfig};

    /// A pass releases only what was ready when it read the snapshot index: a file removed
    /// (and checkpointed) between two of its batches, which a snapshot taken meanwhile reaches,
    /// stays for the next pass to judge.
    #[test]
    fn what_became_unreachable_during_a_pass_waits_for_the_next() {
        let mem = MemBackend::new();
        let backend: Arc<dyn Backend> = Arc::new(mem.clone());
        let cfg = VolumeConfig {
            chunk_size: Some(4096),
            ..VolumeConfig::default()
        };
        let vol = Volume::open_or_format(backend.clone(), cfg).unwrap();
        let me = Cred::ROOT;
        let put = |name: &str, tag: u8, len: usize| {
            let mut data = vec![0; len];
            blake3::Hasher::new()
                .update(&[tag])
                .finalize_xof()
                .fill(&mut data);
            let (a, fh) = vol.create(&me, 1, name.as_bytes(), 0o644).unwrap();
            vol.write(a.ino, 0, &data).unwrap();
            vol.release(fh).unwrap();
            data
        };
        put("gone", 1, 4096 * 300);
        let f = put("f", 2, 4096 * 4);
        vol.sync_all().unwrap();
        vol.unlink(1, b"gone").unwrap();
        vol.fsync(1, false).unwrap();
        let b = backend.as_ref();
        {
            let mut c = vol.committer_for_tests();
            assert!(c.gc_collect(b).unwrap() >= 300);
            assert_eq!(c.gc_release(b).unwrap(), super::RELEASE_BATCH);
        }
        // Between two batches: a snapshot of the current head (which reaches `f`), then `f`
        // removed and a checkpoint, whose collection makes `f`'s chunks pending.
        crate::snapshot::create(b, "s").unwrap();
        vol.unlink(1, b"f").unwrap();
        vol.sync_all().unwrap();
        {
            let mut c = vol.committer_for_tests();
            while c.gc_release(b).unwrap() > 0 {}
        }
        let snap = Volume::open_or_format(
            backend.clone(),
            VolumeConfig {
                snapshot: Some("s".into()),
                ..VolumeConfig::default()
            },
        )
        .unwrap();
        let a = snap.lookup(1, b"f").unwrap();
        assert_eq!(snap.read(a.ino, 0, a.size as u32).unwrap(), f);
        // The next pass sees the snapshot and keeps them.
        vol.collect_garbage(&mut |_| {}).unwrap();
        assert_eq!(snap.read(a.ino, 0, a.size as u32).unwrap(), f);
    }
}
