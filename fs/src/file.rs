//! File contents: the write-back buffers, the chunk cache and chunk reads.
//!
//! Goals: random reads and writes at any offset of a file of any size with a bounded amount of
//! work per call; holes cost nothing and read as zeros; buffered data joins the batch of the
//! next commit, which stores the chunks before the head that names them.
//!
//! Model: chunk `i` of a file holds bytes `[i*cs, (i+1)*cs)`; it is absent (a hole), a durable
//! piece named in the inode's map (a stored chunk with small writes patched over it), a buffer in
//! the batch being committed (`flushing`), or a dirty buffer not yet in a batch (`dirty`); each
//! shadows the ones before it. Invariant: no chunk, patch or buffer holds bytes at or beyond the
//! file size, so growing a file never exposes old data. A partially written chunk is read and
//! modified in its buffer; the commit stores the bytes that changed as patches when they are few
//! (up to half the chunk, counting the patches it already has), else the chunk whole.
//!
//! Non-goals: content-defined chunking or deduplication across offsets, compression, and
//! deleting chunks that are no longer referenced (dBQS has no delete).

use std::collections::BTreeSet;
use std::sync::Arc;

use lru::LruCache;

use crate::backend::{Backend, ChunkId};
use crate::error::{err, FsResult};
use crate::image::{overlay, Content, Inode};
use crate::layout::{JournalOp, Patch};
use crate::volume::State;

/// The largest file size (the largest `off_t`).
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;

/// A piece of a read that needs chunk `id` from the backend: `len` bytes from `within` in the
/// chunk, with `patches` over them, go to `at` in the output.
pub(crate) struct Fetch {
    pub id: ChunkId,
    pub at: usize,
    pub within: usize,
    pub len: usize,
    pub patches: Vec<Patch>,
}

/// Completes a read planned by `State::read_plan`.
pub(crate) fn fill(out: &mut [u8], fetch: &Fetch, chunk: &[u8]) {
    let dst = &mut out[fetch.at..fetch.at + fetch.len];
    copy_from_piece(dst, chunk, fetch.within);
    overlay(dst, fetch.within, &fetch.patches);
}

/// A buffered chunk: its whole contents, and what changed since the chunk's state before the
/// batch, so that a small change can be stored as patches instead of a new chunk.
pub(crate) struct Dirty {
    pub data: Vec<u8>,
    /// `None`: store the buffer whole (more than the patch limit was written into it).
    pub changes: Option<Changes>,
}

/// The byte ranges of a buffered chunk that changed: zeroed (a truncation or a punched hole)
/// and written. Sorted, disjoint, not touching.
#[derive(Clone, Debug, Default)]
pub(crate) struct Changes {
    zeros: Vec<(usize, usize)>,
    writes: Vec<(usize, usize)>,
    written: usize,
}

impl Changes {
    /// The patches that turn the chunk's earlier state into `data`: the zeroed ranges first,
    /// then the written ranges with their final bytes. This holds whatever the order of the
    /// changes was, since a written byte carries its final value and a zeroed byte that was not
    /// written after is zero in `data`.
    pub fn patches(&self, data: &[u8]) -> Vec<Patch> {
        let zero = |s: usize, e: usize| Patch::Zero {
            off: s as u32,
            len: (e - s) as u32,
        };
        let mut out: Vec<Patch> = self.zeros.iter().map(|(s, e)| zero(*s, *e)).collect();
        for (s, e) in &self.writes {
            let in_data = (*e).min(data.len());
            if *s < in_data {
                out.push(Patch::Write {
                    off: *s as u32,
                    data: data[*s..in_data].to_vec(),
                });
            }
            // Written, then cut by a truncation: zeros now.
            if *e > in_data.max(*s) {
                out.push(zero(in_data.max(*s), *e));
            }
        }
        out
    }

    /// Takes in the changes of an older buffer of the same chunk that this one was made from.
    fn absorb(&mut self, older: &Changes) {
        for (s, e) in &older.zeros {
            merge_range(&mut self.zeros, *s, *e);
        }
        for (s, e) in &older.writes {
            merge_range(&mut self.writes, *s, *e);
        }
        self.written += older.written;
    }
}

impl Dirty {
    pub fn new(data: Vec<u8>) -> Self {
        Dirty {
            data,
            changes: Some(Changes::default()),
        }
    }

    /// Records that `[start, end)` was written; past `limit` bytes in all, the buffer goes whole.
    pub fn wrote(&mut self, start: usize, end: usize, limit: usize) {
        if let Some(c) = &mut self.changes {
            merge_range(&mut c.writes, start, end);
            c.written += end - start;
            if c.written > limit {
                self.changes = None;
            }
        }
    }

    /// Records that `[start, end)` became zeros.
    pub fn zeroed(&mut self, start: usize, end: usize) {
        if let Some(c) = &mut self.changes {
            merge_range(&mut c.zeros, start, end);
        }
    }

    /// Takes in the changes of an older buffer of the same chunk that failed to commit, which
    /// this one was made from.
    pub fn absorb(&mut self, older: Option<&Changes>, limit: usize) {
        match (&mut self.changes, older) {
            (Some(c), Some(o)) => {
                c.absorb(o);
                if c.written > limit {
                    self.changes = None;
                }
            }
            _ => self.changes = None,
        }
    }
}

/// Adds `[start, end)` to sorted disjoint ranges, joining those it overlaps or touches.
fn merge_range(ranges: &mut Vec<(usize, usize)>, mut start: usize, mut end: usize) {
    if start >= end {
        return;
    }
    let first = ranges.partition_point(|(_, e)| *e < start);
    let mut last = first;
    while last < ranges.len() && ranges[last].0 <= end {
        start = start.min(ranges[last].0);
        end = end.max(ranges[last].1);
        last += 1;
    }
    ranges.splice(first..last, [(start, end)]);
}

/// A bounded cache of chunk contents, least recently used out first, bounded in bytes. Chunks
/// are immutable, so an entry never goes stale.
pub(crate) struct ChunkCache {
    map: LruCache<ChunkId, Arc<Vec<u8>>>,
    bytes: usize,
    limit: usize,
}

impl ChunkCache {
    pub fn new(limit: usize) -> Self {
        ChunkCache {
            map: LruCache::unbounded(),
            bytes: 0,
            limit,
        }
    }

    /// The chunk if cached (it becomes the most recently used).
    pub fn peek(&mut self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.map.get(id).cloned()
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.map.contains(id)
    }

    pub fn get(&mut self, backend: &dyn Backend, id: &ChunkId) -> FsResult<Arc<Vec<u8>>> {
        if let Some(data) = self.map.get(id) {
            return Ok(data.clone());
        }
        let data = Arc::new(backend.get_chunk(id)?);
        self.insert(*id, data.clone());
        Ok(data)
    }

    pub fn insert(&mut self, id: ChunkId, data: Arc<Vec<u8>>) {
        if data.len() > self.limit || self.map.contains(&id) {
            return;
        }
        self.bytes += data.len();
        self.map.put(id, data);
        while self.bytes > self.limit {
            let Some((_, old)) = self.map.pop_lru() else {
                break;
            };
            self.bytes -= old.len();
        }
    }
}

/// Copies `piece[within..]` into `dst`; bytes the piece does not have stay zero.
fn copy_from_piece(dst: &mut [u8], piece: &[u8], within: usize) {
    if piece.len() > within {
        let m = dst.len().min(piece.len() - within);
        dst[..m].copy_from_slice(&piece[within..within + m]);
    }
}

impl State {
    fn cs(&self) -> u64 {
        self.chunk_size as u64
    }

    /// Reads `size` bytes at `off`, stopping at the end of the file.
    /// Reads what can be read without the backend: buffered data, cached chunks and holes. The
    /// pieces that need a chunk fetched are returned for the caller to fetch without holding the
    /// volume lock; since chunks are immutable the result is the file as it was at this call.
    pub(crate) fn read_plan(
        &mut self,
        ino: u64,
        off: u64,
        size: u32,
    ) -> FsResult<(Vec<u8>, Vec<Fetch>)> {
        let cs = self.cs();
        let Some(node) = self.nodes.get(&ino) else {
            return err(libc::ENOENT);
        };
        let map = match &node.inode.content {
            Content::File(map) => map,
            Content::Dir(_) => return err(libc::EISDIR),
            _ => return err(libc::EINVAL),
        };
        let end = off.saturating_add(size as u64).min(node.inode.size);
        if off >= end {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut out = vec![0u8; (end - off) as usize];
        let mut fetches = Vec::new();
        let mut pos = off;
        while pos < end {
            let idx = pos / cs;
            let within = (pos % cs) as usize;
            let n = ((cs - within as u64).min(end - pos)) as usize;
            let at = (pos - off) as usize;
            let dst = &mut out[at..at + n];
            if let Some(d) = node.dirty.get(&idx) {
                copy_from_piece(dst, &d.data, within);
            } else if let Some(buf) = node.flushing.get(&idx) {
                copy_from_piece(dst, buf, within);
            } else if let Some(piece) = map.chunks.get(&idx) {
                match piece.id.map(|id| (id, self.chunks.peek(&id))) {
                    Some((id, None)) => fetches.push(Fetch {
                        id,
                        at,
                        within,
                        len: n,
                        patches: piece.patches.clone(),
                    }),
                    Some((_, Some(data))) => {
                        copy_from_piece(dst, &data, within);
                        overlay(dst, within, &piece.patches);
                    }
                    None => overlay(dst, within, &piece.patches),
                }
            }
            pos += n as u64;
        }
        Ok((out, fetches))
    }

    /// After a read of `[off, off + size)`: when it follows the file's previous read (or starts
    /// the file), the stored chunks of the next `readahead_bytes` that are neither cached nor
    /// being fetched; they are marked as being fetched, for the caller to fetch.
    pub(crate) fn read_ahead(&mut self, ino: u64, off: u64, size: u32) -> Vec<ChunkId> {
        let cs = self.cs();
        if size == 0 {
            return Vec::new();
        }
        let (first, last) = (off / cs, (off + size as u64 - 1) / cs);
        if self.last_read.len() >= 4096 {
            self.last_read.clear();
        }
        let prev = self.last_read.insert(ino, last);
        let sequential = off == 0 || prev.is_some_and(|p| first == p || first == p + 1);
        let Some(node) = self.nodes.get(&ino).filter(|_| sequential) else {
            return Vec::new();
        };
        let Content::File(map) = &node.inode.content else {
            return Vec::new();
        };
        let window = (self.cfg.readahead_bytes as u64 / cs).max(1);
        let mut ids = Vec::new();
        for idx in last + 1..=last + window {
            if idx.saturating_mul(cs) >= node.inode.size
                || self.inflight.len() >= 2 * window as usize
            {
                break;
            }
            if node.dirty.contains_key(&idx) || node.flushing.contains_key(&idx) {
                continue;
            }
            if let Some(id) = map.chunks.get(&idx).and_then(|p| p.id) {
                if !self.chunks.contains(&id) && self.inflight.insert(id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// The current contents of chunk `idx` of a file: its buffer, or its stored chunk.
    fn chunk_contents(&mut self, ino: u64, idx: u64) -> FsResult<Vec<u8>> {
        let node = &self.nodes[&ino];
        if let Some(d) = node.dirty.get(&idx) {
            return Ok(d.data.clone());
        }
        if let Some(buf) = node.flushing.get(&idx) {
            return Ok(buf.as_ref().clone());
        }
        let piece = match &node.inode.content {
            Content::File(map) => map.chunks.get(&idx).cloned(),
            _ => None,
        };
        let Some(piece) = piece else {
            return Ok(Vec::new());
        };
        let chunk = match piece.id {
            Some(id) => self.chunks.get(self.backend.as_ref(), &id)?,
            None => Arc::new(Vec::new()),
        };
        Ok(piece.materialize(&chunk))
    }

    /// Bytes of small writes a chunk may carry as patches before it is stored whole again.
    pub(crate) fn patch_limit(&self) -> usize {
        self.chunk_size as usize / 2
    }

    /// Writes into the write-back buffer. Returns the number of bytes written (all of them).
    pub(crate) fn write(&mut self, ino: u64, off: u64, data: &[u8]) -> FsResult<usize> {
        let cs = self.cs();
        let Some(end) = off
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
        else {
            return err(libc::EFBIG);
        };
        let old_size = self.node(ino)?.inode.size;
        match self.node(ino)?.inode.content {
            Content::File(_) => {}
            Content::Dir(_) => return err(libc::EISDIR),
            _ => return err(libc::EINVAL),
        }
        self.check_quota(end.saturating_sub(old_size))?;
        // Read every chunk the write only partly covers before changing anything, so a failed
        // read leaves the file as it was.
        let mut bases = Vec::new();
        let mut pos = off;
        while pos < end {
            let idx = pos / cs;
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            let whole = within == 0 && n == cs;
            if !whole && !self.nodes[&ino].dirty.contains_key(&idx) {
                bases.push((idx, self.chunk_contents(ino, idx)?));
            }
            pos += n;
        }
        let limit = self.patch_limit();
        let node = self.nodes.get_mut(&ino).expect("checked above");
        for (idx, base) in bases {
            self.dirty_bytes += base.len();
            node.dirty.insert(idx, Dirty::new(base));
        }
        let mut pos = off;
        let mut src = 0usize;
        while src < data.len() {
            let idx = pos / cs;
            let within = (pos % cs) as usize;
            let n = (cs as usize - within).min(data.len() - src);
            // A chunk not yet buffered is written whole here (partial ones were read above).
            let d = node
                .dirty
                .entry(idx)
                .or_insert_with(|| Dirty::new(Vec::new()));
            let before = d.data.len();
            if d.data.len() < within + n {
                d.data.resize(within + n, 0);
            }
            d.data[within..within + n].copy_from_slice(&data[src..src + n]);
            d.wrote(within, within + n, limit);
            self.dirty_bytes += d.data.len() - before;
            src += n;
            pos += n as u64;
        }
        let now = crate::layout::Timestamp::now();
        node.inode.size = node.inode.size.max(end);
        let grown = node.inode.size - old_size;
        node.inode.mtime = now;
        node.inode.ctime = now;
        self.changed.insert(ino);
        self.dirty_files.insert(ino);
        self.file_bytes += grown;
        Ok(data.len())
    }

    /// Sets a file's size; returns the old one. A shrink drops the chunks and buffers past the
    /// end and trims the new last chunk (into a buffer). Fails, changing nothing, only if the new
    /// last chunk cannot be read.
    pub(crate) fn truncate(&mut self, ino: u64, new_size: u64) -> FsResult<u64> {
        let cs = self.cs();
        if new_size > MAX_FILE_SIZE {
            return err(libc::EFBIG);
        }
        let old = self.node(ino)?.inode.size;
        self.check_quota(new_size.saturating_sub(old))?;
        if new_size < old {
            let rem = (new_size % cs) as usize;
            let last = new_size / cs;
            let trimmed = if rem != 0 {
                let mut data = self.chunk_contents(ino, last)?;
                let old_len = data.len();
                data.truncate(rem);
                Some((data, old_len))
            } else {
                None
            };
            let keep = new_size.div_ceil(cs);
            let node = self.nodes.get_mut(&ino).expect("checked above");
            let Content::File(map) = &mut node.inode.content else {
                return err(libc::EINVAL);
            };
            let mut gone: BTreeSet<u64> = map.chunks.range(keep..).map(|(k, _)| *k).collect();
            gone.extend(node.flushing.range(keep..).map(|(k, _)| *k));
            for idx in &gone {
                map.chunks.remove(idx);
                node.flushing.remove(idx);
            }
            let dropped: Vec<u64> = node.dirty.range(keep..).map(|(k, _)| *k).collect();
            for idx in dropped {
                if let Some(d) = node.dirty.remove(&idx) {
                    self.dirty_bytes -= d.data.len();
                }
            }
            self.journal
                .extend(
                    gone.into_iter()
                        .map(|idx| JournalOp::Chunk { ino, idx, id: None }),
                );
            // The new last chunk loses its bytes from `rem` on (a zeroed range, so that they
            // read as zeros if the file grows again).
            if let Some((data, old_len)) = trimmed.filter(|(_, old_len)| *old_len > rem) {
                let mut d = match node.dirty.remove(&last) {
                    Some(mut d) => {
                        self.dirty_bytes -= d.data.len();
                        d.data = data;
                        d
                    }
                    None => Dirty::new(data),
                };
                d.zeroed(rem, old_len);
                self.dirty_bytes += d.data.len();
                node.dirty.insert(last, d);
                self.dirty_files.insert(ino);
            }
        }
        let node = self.nodes.get_mut(&ino).expect("checked above");
        node.inode.size = new_size;
        self.changed.insert(ino);
        self.file_bytes = self.file_bytes - old.min(self.file_bytes) + new_size;
        Ok(old)
    }

    /// Makes bytes `[start, end)` of a file zeros (`end` at most the size): chunks wholly inside
    /// become holes, the others are changed in their buffers. Fails, changing nothing, only if
    /// a chunk it partly covers cannot be read.
    pub(crate) fn zero_range(&mut self, ino: u64, start: u64, end: u64) -> FsResult<()> {
        let cs = self.cs();
        if start >= end {
            return Ok(());
        }
        let size = self.node(ino)?.inode.size;
        // Within chunk `idx`: the range it covers, and whether that leaves nothing of the chunk.
        let span = |idx: u64| {
            let (s, e) = (
                start.max(idx * cs) - idx * cs,
                end.min((idx + 1) * cs) - idx * cs,
            );
            (
                s as usize,
                e as usize,
                s == 0 && (e == cs || idx * cs + e >= size),
            )
        };
        let chunks = start / cs..=(end - 1) / cs;
        let mut bases = Vec::new();
        for idx in chunks.clone() {
            if !span(idx).2 && !self.nodes[&ino].dirty.contains_key(&idx) {
                bases.push((idx, self.chunk_contents(ino, idx)?));
            }
        }
        let node = self.nodes.get_mut(&ino).expect("checked above");
        let Content::File(map) = &mut node.inode.content else {
            return err(libc::EINVAL);
        };
        for (idx, base) in bases {
            self.dirty_bytes += base.len();
            node.dirty.insert(idx, Dirty::new(base));
        }
        for idx in chunks {
            let (s, e, whole) = span(idx);
            if whole {
                let stored = map.chunks.remove(&idx).is_some();
                let flushing = node.flushing.remove(&idx).is_some();
                if let Some(d) = node.dirty.remove(&idx) {
                    self.dirty_bytes -= d.data.len();
                }
                if stored || flushing {
                    self.journal.push(JournalOp::Chunk { ino, idx, id: None });
                }
            } else {
                let d = node.dirty.get_mut(&idx).expect("buffered above");
                let in_data = e.min(d.data.len());
                if s < in_data {
                    d.data[s..in_data].fill(0);
                }
                d.zeroed(s, e);
                self.dirty_files.insert(ino);
            }
        }
        Ok(())
    }

    /// Allocated 512-byte blocks: chunk-sized pieces that hold data, capped at the file size.
    pub(crate) fn blocks_of(&self, ino: u64, inode: &Inode) -> u64 {
        let Content::File(map) = &inode.content else {
            return 0;
        };
        let mut pieces = map.chunks.len() as u64;
        if let Some(node) = self.nodes.get(&ino) {
            let extra: BTreeSet<u64> = node
                .dirty
                .keys()
                .chain(node.flushing.keys())
                .filter(|k| !map.chunks.contains_key(k))
                .copied()
                .collect();
            pieces += extra.len() as u64;
        }
        (pieces * self.cs()).min(inode.size.next_multiple_of(512)) / 512
    }
}
