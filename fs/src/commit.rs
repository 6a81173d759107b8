//! Group commit: how a batch of applied operations becomes durable, and checkpoints.
//!
//! Goals: one head write makes a whole batch durable; nothing the head names is missing when it
//! lands (data chunks and the journal segment are stored first); the volume lock is held only to
//! cut the batch and to record its outcome, never across a backend call; a failed commit loses
//! nothing (its batch goes back to the front of the next one).
//!
//! Protocol of one commit (serialized by the `Committer`'s mutex, so heads go out in order):
//! 1. cut, under the volume lock (`State::seal`): the final attributes of each changed inode,
//!    then the journal operations in order, then the dirty chunks, which move to `flushing`
//!    (readers still see them there);
//! 2. store the non-zero chunks, in parallel; add a `Chunk` operation for each, or `Patch`
//!    operations (the changed bytes, inline) for a chunk changed only a little;
//! 3. unless the batch's operations fit in the head's tail (small commits: one record write
//!    each), store them with the tail as a segment (split into pieces if large);
//! 4. write the head one version up, with the operations in its tail or the segment named
//!    after the earlier ones;
//! 5. apply the batch to the durable image and, under the volume lock, put the new chunk ids in
//!    the files' maps (`State::sealed`).
//!
//! Any failure in 2–4 undoes step 1 (`State::unseal`); a head version once tried is never
//! reused, since a failed write may have landed. One failure is not all-or-nothing: chunks the
//! nodes refuse for lack of space stay buffered while the rest of the batch commits (a file's
//! size stops short of its refused chunks), so that removals commit and the collector can free
//! space on a full cluster. Every `checkpoint_segments` commits (and on
//! demand) the committer writes the image's changed pages and root, then a head naming that
//! checkpoint and an empty journal.
//!
//! Non-goals: several writers (the daemon's lease keeps to one). Freeing what a commit or a
//! checkpoint leaves behind is the collector's (`gc`), which runs under the same lock.

use std::collections::btree_map::Entry;
use std::collections::HashMap;
use std::mem;
use std::sync::Arc;

use crate::backend::{Backend, BackendError, ChunkId};
use crate::error::{err, FsError, FsResult};
use crate::file::{Changes, Dirty};
use crate::gc::{Gc, RELEASE_BATCH};
use crate::image::{piece_size, put_chunks, put_chunks_each, Content, Image, Piece};
use crate::layout::{
    split, Head, JournalOp, Meta, Patch, Segment, Timestamp, FORMAT, FORMAT1_LABEL, HEAD_LABEL,
    ROOT_INO,
};
use crate::volume::{Node, State, VolumeConfig};

/// A batch cut from the state: operations, and buffered chunks to store.
pub(crate) struct Batch {
    pub ops: Vec<JournalOp>,
    pub data: Vec<Flush>,
    pub next_ino: u64,
}

/// What became of one buffered chunk of a committed batch.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stored {
    /// Stored whole (`None`: all zeros, a hole), or as patches in the journal (`None`).
    Chunk(Option<ChunkId>),
    /// The nodes had no space for it: it stays buffered, and the batch went without it.
    Refused,
}

/// One buffered chunk of a batch.
pub(crate) struct Flush {
    ino: u64,
    idx: u64,
    buf: Arc<Vec<u8>>,
    /// What changed since the chunk's state before the batch (`None`: too much to tell).
    changes: Option<Changes>,
    /// The patches that store it, or `None`: it is stored as a new chunk.
    patches: Option<Vec<Patch>>,
}

impl Flush {
    fn patch_ops(&self) -> impl Iterator<Item = JournalOp> + '_ {
        self.patches.iter().flatten().map(|patch| JournalOp::Patch {
            ino: self.ino,
            idx: self.idx,
            patch: patch.clone(),
        })
    }
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.data.is_empty()
    }
}

impl State {
    /// Cuts the batch: everything applied so far.
    pub(crate) fn seal(&mut self) -> Batch {
        // Attributes first: a `Put` creates an inode that later operations of the batch (links
        // into a new directory, chunks of a new file) refer to.
        let mut ops = Vec::with_capacity(self.changed.len() + self.journal.len());
        for ino in mem::take(&mut self.changed) {
            if let Some(n) = self.nodes.get(&ino) {
                ops.push(JournalOp::Put {
                    ino,
                    meta: n.inode.meta(),
                });
            }
        }
        ops.append(&mut self.journal);
        // Small changes to stored chunks go as patches while the chunk's patches stay under the
        // limit and all files' patches under the budget (`patch_bytes` only overestimates: it
        // is not lowered when a file is truncated or removed, so it is counted again when full).
        let limit = self.patch_limit();
        if self.patch_bytes > self.cfg.patch_budget {
            self.patch_bytes = self.count_patch_bytes();
        }
        let mut budget = self.cfg.patch_budget.saturating_sub(self.patch_bytes);
        let mut data = Vec::new();
        for ino in mem::take(&mut self.dirty_files) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                for (idx, d) in mem::take(&mut n.dirty) {
                    let piece = match &n.inode.content {
                        Content::File(m) => m.chunks.get(&idx).filter(|p| p.id.is_some()),
                        _ => None,
                    };
                    let patches = match (piece, &d.changes) {
                        (Some(p), Some(c)) => {
                            let list = c.patches(&d.data);
                            let cost: usize = list.iter().map(Patch::cost).sum();
                            (p.patch_bytes() + cost <= limit && cost <= budget).then(|| {
                                budget -= cost;
                                list
                            })
                        }
                        _ => None,
                    };
                    let buf = Arc::new(d.data);
                    n.flushing.insert(idx, buf.clone());
                    data.push(Flush {
                        ino,
                        idx,
                        buf,
                        changes: d.changes,
                        patches,
                    });
                }
            }
        }
        // Every dirty buffer is in `dirty_files`, so none is left.
        self.dirty_bytes = 0;
        Batch {
            ops,
            data,
            next_ino: self.next_ino,
        }
    }

    /// Puts a batch that failed back in front of what happened since.
    pub(crate) fn unseal(&mut self, batch: Batch) {
        // Attributes are taken again at the next cut (they may have changed since); the other
        // operations go back in front of the ones that followed them.
        let mut ops = Vec::with_capacity(batch.ops.len() + self.journal.len());
        for op in batch.ops {
            match op {
                JournalOp::Put { ino, .. } => {
                    self.changed.insert(ino);
                }
                op => ops.push(op),
            }
        }
        ops.append(&mut self.journal);
        self.journal = ops;
        for f in batch.data {
            self.redirty(f);
        }
    }

    /// Makes a flushed buffer dirty again (its store failed), under what was written since.
    fn redirty(&mut self, f: Flush) {
        let limit = self.patch_limit();
        let Some(n) = take_flushing(&mut self.nodes, &f) else {
            return;
        };
        match n.dirty.entry(f.idx) {
            Entry::Vacant(slot) => {
                self.dirty_bytes += f.buf.len();
                slot.insert(Dirty {
                    data: Arc::try_unwrap(f.buf).unwrap_or_else(|b| b.as_ref().clone()),
                    changes: f.changes,
                });
                self.dirty_files.insert(f.ino);
            }
            // Written since, over this buffer: the changes since the stored state are both.
            Entry::Occupied(mut newer) => newer.get_mut().absorb(f.changes.as_ref(), limit),
        }
    }

    /// A batch is durable: its chunks join the files' maps (unless truncated away since). The
    /// chunks the nodes refused for lack of space are dirty again, and their files' attributes
    /// are written again at the next cut (the head carried a size short of them).
    fn sealed(&mut self, batch: Batch, stored: &[Stored]) {
        for (f, s) in batch.data.into_iter().zip(stored) {
            let id = match s {
                Stored::Chunk(id) => id,
                Stored::Refused => {
                    self.changed.insert(f.ino);
                    self.redirty(f);
                    continue;
                }
            };
            let Some(n) = take_flushing(&mut self.nodes, &f) else {
                continue;
            };
            let Content::File(map) = &mut n.inode.content else {
                continue;
            };
            let old = if let Some(patches) = &f.patches {
                let piece = map.chunks.entry(f.idx).or_default();
                for patch in patches {
                    self.patch_bytes += patch.cost();
                    piece.patches.push(patch.clone());
                }
                None
            } else if let Some(id) = id {
                self.chunks.insert(*id, f.buf.clone());
                map.chunks.insert(f.idx, Piece::whole(*id))
            } else {
                map.chunks.remove(&f.idx)
            };
            if let Some(old) = old {
                self.patch_bytes = self.patch_bytes.saturating_sub(old.patch_bytes());
            }
        }
    }
}

/// Ends a flush's time in its file's `flushing` and returns the file, unless the flush is no
/// longer there (truncated or punched away since, or the file is gone): then its data is dead.
fn take_flushing<'a>(nodes: &'a mut HashMap<u64, Node>, f: &Flush) -> Option<&'a mut Node> {
    let n = nodes.get_mut(&f.ino)?;
    if !n
        .flushing
        .get(&f.idx)
        .is_some_and(|b| Arc::ptr_eq(b, &f.buf))
    {
        return None;
    }
    n.flushing.remove(&f.idx);
    Some(n)
}

fn lock(state: &std::sync::Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything a snapshot's head reaches, the structure its journal replaced included.
fn snapshot_reach(
    backend: &dyn Backend,
    head: &Head,
) -> FsResult<std::collections::HashSet<ChunkId>> {
    let (image, mut seen, structure) = Image::load_seen(backend, head)?;
    seen.extend(structure);
    seen.extend(crate::gc::image_reach(&image, head));
    Ok(seen)
}

/// The volume's durable side: its image, its head, and the head's version.
pub(crate) struct Committer {
    pub image: Image,
    pub head: Head,
    pub version: u64,
    /// Opened from a snapshot: the head never changes.
    frozen: bool,
    /// The collector, for the volume's writer (`None` when read-only).
    pub gc: Option<Gc>,
}

fn format_error(detail: String) -> FsError {
    FsError::Format(detail)
}

fn check_format(head: &Head) -> FsResult<()> {
    if head.format != FORMAT {
        return Err(format_error(format!(
            "this volume is in dbqsfs volume format {}; this dbqsfs reads format {FORMAT}",
            head.format
        )));
    }
    Ok(())
}

impl Committer {
    /// Opens the volume in `backend`, formatting an empty one unless `cfg.read_only`. A writer
    /// passes the list its backend records puts in (`gc::Recording`), for its collector.
    pub fn open(
        backend: &dyn Backend,
        cfg: &VolumeConfig,
        puts: Option<Arc<std::sync::Mutex<Vec<ChunkId>>>>,
    ) -> FsResult<Committer> {
        if let Some(name) = &cfg.snapshot {
            let head = crate::snapshot::head_of(backend, name)?;
            check_format(&head)?;
            return Ok(Committer {
                image: Image::load(backend, &head)?,
                head,
                version: 0,
                frozen: true,
                gc: None,
            });
        }
        let Some(rec) = backend.get_record(HEAD_LABEL)? else {
            if backend.get_record(FORMAT1_LABEL)?.is_some() {
                return Err(format_error(format!(
                    "this volume was written in dbqsfs volume format 1 (one record per inode); \
                     this dbqsfs reads format {FORMAT} (the volume log) only. Copy its files out \
                     with the dbqsfs release that wrote it, then into a new volume"
                )));
            }
            if cfg.read_only {
                return err(libc::EROFS);
            }
            return Committer::format(backend, cfg, puts);
        };
        let head = Head::decode(&rec.value)?;
        check_format(&head)?;
        let (image, seen, structure) = Image::load_seen(backend, &head)?;
        let gc = match (!cfg.read_only).then_some(puts).flatten() {
            Some(puts) => Some(Gc::open(backend, puts, seen, structure, &head)?),
            None => None,
        };
        Ok(Committer {
            image,
            head,
            version: rec.version,
            frozen: false,
            gc,
        })
    }

    fn format(
        backend: &dyn Backend,
        cfg: &VolumeConfig,
        puts: Option<Arc<std::sync::Mutex<Vec<ChunkId>>>>,
    ) -> FsResult<Committer> {
        let chunk_size = cfg
            .chunk_size
            .unwrap_or(1 << 20)
            .min(backend.max_block() as u32)
            .max(512);
        let now = Timestamp::now();
        let root = Meta {
            kind: crate::layout::FileKind::Dir,
            perm: 0o755,
            uid: cfg.root_uid,
            gid: cfg.root_gid,
            nlink: 2,
            rdev: 0,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            xattrs: Default::default(),
            parent: ROOT_INO,
            target: Vec::new(),
        };
        let ops = vec![JournalOp::Put {
            ino: ROOT_INO,
            meta: root,
        }];
        let mut c = Committer {
            image: Image::empty(),
            head: Head {
                format: FORMAT,
                chunk_size,
                created: now,
                next_ino: ROOT_INO + 1,
                checkpoint: Vec::new(),
                journal: Vec::new(),
                tail: Vec::new(),
                gc_floor: 0,
                garbage: Vec::new(),
                garbage_list: Vec::new(),
            },
            version: 0,
            frozen: false,
            gc: None,
        };
        c.gc = puts.map(|puts| Gc::new(puts, Default::default(), Default::default()));
        c.append(backend, &ops, ROOT_INO + 1)?;
        Ok(c)
    }

    /// Writes a head holding `ops` in its tail, or, when the tail would grow too large, stores
    /// the tail and `ops` as a segment first and names it in the head; then applies `ops` to
    /// the image. If the nodes have no space for the segment, the tail grows on in the head
    /// (a record, which the nodes store from their reserve) while the head stays under three
    /// quarters of the largest value: so that removing files commits, and the collector frees space, on a full
    /// cluster.
    fn append(&mut self, backend: &dyn Backend, ops: &[JournalOp], next_ino: u64) -> FsResult<()> {
        let mut head = self.head.clone();
        head.tail.extend_from_slice(ops);
        let tail_bytes = Segment::encode_ops(&head.tail).len();
        if tail_bytes > Head::tail_max(backend.max_block()) {
            let segment = Segment::encode_ops(&head.tail);
            match put_chunks(backend, &split(&segment, piece_size(backend))) {
                Ok(pieces) => {
                    head.journal.push(pieces);
                    head.tail.clear();
                }
                Err(FsError::Backend(BackendError::NoSpace))
                    if head.encode().len() <= backend.max_block() / 4 * 3 =>
                {
                    tracing::debug!(
                        tail_bytes,
                        "no space for a journal segment: the head keeps it"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        head.next_ino = next_ino;
        self.write_head(backend, head)?;
        for op in ops {
            self.image.apply(op);
        }
        Ok(())
    }

    fn write_head(&mut self, backend: &dyn Backend, mut head: Head) -> FsResult<()> {
        if let Some(gc) = &mut self.gc {
            (head.garbage, head.garbage_list) =
                gc.garbage_for_head(backend, &self.head.garbage_list)?;
        }
        let value = head.encode();
        if value.len() > backend.max_block() {
            return err(libc::ENOSPC);
        }
        self.version += 1;
        backend.put_record(HEAD_LABEL, self.version, &value)?;
        self.head = head;
        Ok(())
    }

    /// Commits everything applied to `state` so far (see the module's protocol). With
    /// `checkpoint`, also writes a checkpoint afterwards.
    ///
    /// Chunks the nodes refuse for lack of space do not hold the rest back: the batch commits
    /// without them (each such file with the size its stored chunks reach), they stay buffered,
    /// and the call fails with `ENOSPC` after. A checkpoint that fails leaves the committed batch
    /// committed: it is logged and tried again at the next commit.
    pub fn commit(
        &mut self,
        backend: &dyn Backend,
        state: &std::sync::Mutex<State>,
        checkpoint: bool,
    ) -> FsResult<()> {
        let batch = lock(state).seal();
        let mut refused = false;
        if !batch.is_empty() {
            match self.store(backend, &batch) {
                Ok(stored) => {
                    refused = stored.iter().any(|s| matches!(s, Stored::Refused));
                    lock(state).sealed(batch, &stored);
                }
                Err(e) => {
                    lock(state).unseal(batch);
                    return Err(e);
                }
            }
        }
        let head_full = self.head.encode().len() > backend.max_block() / 2;
        let due = self.head.journal.len() >= lock(state).cfg.checkpoint_segments.max(1);
        if checkpoint || head_full || due {
            if let Err(e) = self.checkpoint(backend) {
                tracing::warn!(error = %e, "checkpoint failed (what is committed stays so); tried again at the next commit");
            }
        }
        if refused {
            return Err(BackendError::NoSpace.into());
        }
        Ok(())
    }

    /// Steps 2–4: chunks, segment, head. Returns what became of each buffered chunk.
    fn store(&mut self, backend: &dyn Backend, batch: &Batch) -> FsResult<Vec<Stored>> {
        let stored_whole = |f: &Flush| f.patches.is_none() && f.buf.iter().any(|x| *x != 0);
        let bodies: Vec<&[u8]> = batch
            .data
            .iter()
            .filter(|f| stored_whole(f))
            .map(|f| f.buf.as_slice())
            .collect();
        let mut puts = put_chunks_each(backend, &bodies)?.into_iter();
        let mut stored: Vec<Stored> = batch
            .data
            .iter()
            .map(|f| match stored_whole(f) {
                false => Stored::Chunk(None),
                true => match puts.next().expect("one result per stored chunk") {
                    Ok(id) => Stored::Chunk(Some(id)),
                    Err(_) => Stored::Refused,
                },
            })
            .collect();
        // A file with a refused chunk commits only below it: its later chunks wait with it, and
        // its size stops there (or at its committed size), so that a crash shows the file as
        // it was or shorter, never with a hole where the refused data was to go.
        let mut cut: HashMap<u64, u64> = HashMap::new();
        for (f, s) in batch.data.iter().zip(&stored) {
            if matches!(s, Stored::Refused) {
                let c = cut.entry(f.ino).or_insert(f.idx);
                *c = (*c).min(f.idx);
            }
        }
        for (f, s) in batch.data.iter().zip(stored.iter_mut()) {
            if cut.get(&f.ino).is_some_and(|c| f.idx >= *c) {
                *s = Stored::Refused;
            }
        }
        let chunk_size = u64::from(self.head.chunk_size);
        let mut ops = batch.ops.clone();
        for op in &mut ops {
            if let JournalOp::Put { ino, meta } = op {
                if let Some(c) = cut.get(ino) {
                    let committed = self.image.inodes.get(ino).map_or(0, |i| i.size);
                    meta.size = meta.size.min((c * chunk_size).max(committed));
                }
            }
        }
        for (f, s) in batch.data.iter().zip(&stored) {
            match s {
                Stored::Refused => {}
                Stored::Chunk(_) if f.patches.is_some() => ops.extend(f.patch_ops()),
                Stored::Chunk(id) => ops.push(JournalOp::Chunk {
                    ino: f.ino,
                    idx: f.idx,
                    id: *id,
                }),
            }
        }
        self.append(backend, &ops, batch.next_ino)?;
        Ok(stored)
    }

    /// Writes the image's changed pages and root, then a head naming them with an empty journal.
    pub fn checkpoint(&mut self, backend: &dyn Backend) -> FsResult<()> {
        if self.head.journal.is_empty()
            && self.head.tail.is_empty()
            && !self.head.checkpoint.is_empty()
        {
            return Ok(());
        }
        let root = self.image.checkpoint(backend)?;
        let mut head = self.head.clone();
        head.checkpoint = root;
        head.journal.clear();
        head.tail.clear();
        // What this checkpoint leaves behind (the old pages, the journal) cannot be found from
        // the new head at the next open: make it pending, so the head lists it.
        let mut structure = self.image.structure();
        structure.extend(head.checkpoint.iter().copied());
        if let Some(gc) = &mut self.gc {
            let mut now = crate::gc::image_reach(&self.image, &head);
            now.extend(structure.iter().copied());
            gc.collect(now);
        }
        if let Err(e) = self.write_head(backend, head) {
            // The old head stands: what it reaches is not garbage after all.
            if let Some(gc) = &mut self.gc {
                gc.collect(gc.reach(&self.image, &self.head));
            }
            return Err(e);
        }
        if let Some(gc) = &mut self.gc {
            gc.durable_checkpoint = structure;
        }
        Ok(())
    }

    /// The collector's first half, under the committer's lock: finds what the volume no longer
    /// reaches (nor any snapshot); if there is any, raises the head's `gc_floor` and reads the
    /// snapshot index again (in that order: see `gc`). Returns how many chunks are ready to
    /// release.
    pub fn gc_collect(&mut self, backend: &dyn Backend) -> FsResult<usize> {
        let Some(gc) = &mut self.gc else {
            return Ok(0);
        };
        let now = gc.reach(&self.image, &self.head);
        gc.collect(now);
        gc.stats.passes += 1;
        self.gc_snapshots(backend)?;
        if let Some(gc) = self.gc.as_mut().filter(|g| g.pending.is_empty()) {
            gc.ready.clear();
            return Ok(0);
        }
        if self.head.gc_floor < self.version {
            let mut head = self.head.clone();
            head.gc_floor = self.version + 1;
            self.write_head(backend, head)?;
            self.gc_snapshots(backend)?;
        }
        // Pending now, with the floor at this head and the index read since: no head from the
        // floor on reaches these, and every snapshot of an older one is known or taken again.
        let gc = self.gc.as_mut().expect("checked above");
        gc.ready = gc.pending.clone();
        Ok(gc.ready.len())
    }

    /// Takes up the snapshot index: loads the reach of new snapshots, frees what a deleted one
    /// alone kept, and takes out of `pending` what a snapshot keeps.
    fn gc_snapshots(&mut self, backend: &dyn Backend) -> FsResult<()> {
        let (listed, deleted) = crate::snapshot::for_collector(backend)?;
        let Some(gc) = self.gc.as_mut() else {
            return Ok(());
        };
        let now = gc.reach(&self.image, &self.head);
        let known = gc.known_snapshots();
        gc.set_snapshots(&listed, &now, |name| {
            snapshot_reach(backend, &crate::snapshot::head_of(backend, name)?)
        })?;
        // Deleted snapshots: what they alone reached is pending (a snapshot this collector knew
        // was freed above, as it left the list).
        for key in deleted {
            if gc.freed_deleted.contains(&key) {
                continue;
            }
            if !known.contains(&key) {
                if let Some(head) = crate::snapshot::deleted_head(backend, &key)? {
                    gc.free(snapshot_reach(backend, &head)?, &now);
                }
            }
            gc.freed_deleted.insert(key);
        }
        let kept: Vec<ChunkId> = gc
            .pending
            .iter()
            .filter(|id| gc.kept_by_snapshot(id))
            .copied()
            .collect();
        for id in &kept {
            gc.pending.remove(id);
        }
        gc.stats.kept_for_snapshots = gc.kept_total() as u64;
        gc.stats.reachable = now.len() as u64;
        gc.stats.pending = gc.pending.len() as u64;
        Ok(())
    }

    /// After a pass released everything pending: the deleted snapshots it freed leave the index.
    pub fn gc_forget_deleted(&mut self, backend: &dyn Backend) -> FsResult<()> {
        let Some(gc) = &mut self.gc else {
            return Ok(());
        };
        if !gc.pending.is_empty() || gc.freed_deleted.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = gc.freed_deleted.iter().cloned().collect();
        crate::snapshot::forget_deleted(backend, &keys)?;
        gc.freed_deleted.clear();
        Ok(())
    }

    /// After a pass released everything pending: a head that still lists garbage is written
    /// again without it, so the next writer does not release it a second time.
    pub fn gc_trim_head(&mut self, backend: &dyn Backend) -> FsResult<()> {
        let Some(gc) = &self.gc else {
            return Ok(());
        };
        let listed = !self.head.garbage.is_empty() || !self.head.garbage_list.is_empty();
        if !gc.pending.is_empty() || !listed || self.frozen {
            return Ok(());
        }
        self.write_head(backend, self.head.clone())
    }

    /// The collector's second half, a batch at a time under the committer's lock: releases up
    /// to `RELEASE_BATCH` pending chunks (none put since they were found unreachable). Returns
    /// how many pending chunks it took up (0: none left).
    pub fn gc_release(&mut self, backend: &dyn Backend) -> FsResult<usize> {
        let Some(gc) = &mut self.gc else {
            return Ok(0);
        };
        // Only what the pass found ready: a chunk that became unreachable since (a checkpoint
        // between two batches) may be reached by a snapshot taken after the index was read.
        let batch: Vec<ChunkId> = gc
            .ready
            .iter()
            .filter(|id| gc.pending.contains(*id))
            .take(RELEASE_BATCH)
            .copied()
            .collect();
        if batch.is_empty() {
            gc.ready.clear();
            return Ok(0);
        }
        let again = gc.put_since(&batch);
        let ids: Vec<ChunkId> = batch
            .iter()
            .filter(|id| !again.contains(*id))
            .copied()
            .collect();
        backend.release_chunks(&ids)?;
        gc.released(&ids);
        // A chunk put again stays out of `pending` until a pass finds it unreachable anew.
        for id in &batch {
            gc.pending.remove(id);
            gc.ready.remove(id);
        }
        gc.stats.pending = gc.pending.len() as u64;
        Ok(batch.len())
    }

    /// For a read-only volume: takes up a newer head if there is one. Returns whether it did.
    pub fn follow(&mut self, backend: &dyn Backend) -> FsResult<bool> {
        if self.frozen {
            return Ok(false);
        }
        let Some(rec) = backend.get_record(HEAD_LABEL)? else {
            return Ok(false);
        };
        if rec.version <= self.version {
            return Ok(false);
        }
        let head = Head::decode(&rec.value)?;
        let old = &self.head;
        let new_segments = head.journal.get(old.journal.len()..).unwrap_or_default();
        if head.checkpoint != old.checkpoint || !head.journal.starts_with(&old.journal) {
            self.image = Image::load(backend, &head)?;
        } else if new_segments.is_empty() && head.tail.starts_with(&old.tail) {
            for op in &head.tail[old.tail.len()..] {
                self.image.apply(op);
            }
        } else if !new_segments.is_empty() {
            // The new segments begin with the old tail's operations (the writer moved them
            // there): applying those again changes nothing.
            self.image.replay(backend, new_segments)?;
            for op in &head.tail {
                self.image.apply(op);
            }
        } else {
            self.image = Image::load(backend, &head)?;
        }
        self.head = head;
        self.version = rec.version;
        Ok(true)
    }
}
