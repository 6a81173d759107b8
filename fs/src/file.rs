//! File contents: the write-back buffers, the chunk cache and chunk reads.
//!
//! Goals: random reads and writes at any offset of a file of any size with a bounded amount of
//! work per call; holes cost nothing and read as zeros; buffered data joins the batch of the
//! next commit, which stores the chunks before the head that names them.
//!
//! Model: chunk `i` of a file holds bytes `[i*cs, (i+1)*cs)`; it is absent (a hole), a durable
//! chunk named in the inode's map, a buffer in the batch being committed (`flushing`), or a dirty
//! buffer not yet in a batch (`dirty`); each shadows the ones before it. Invariant: no chunk or
//! buffer holds bytes at or beyond the file size, so growing a file never exposes old data. A
//! partially written chunk is read, modified and committed whole.
//!
//! Non-goals: content-defined chunking or deduplication across offsets, compression, and
//! deleting chunks that are no longer referenced (dBQS has no delete).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use crate::backend::{Backend, ChunkId};
use crate::error::{err, FsResult};
use crate::image::{Content, Inode};
use crate::layout::JournalOp;
use crate::volume::State;

/// The largest file size (the largest `off_t`).
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;

/// A piece of a read that needs chunk `id` from the backend: `len` bytes from `within` in the
/// chunk go to `at` in the output.
pub(crate) struct Fetch {
    pub id: ChunkId,
    pub at: usize,
    pub within: usize,
    pub len: usize,
}

/// Completes a read planned by `State::read_plan`.
pub(crate) fn fill(out: &mut [u8], fetch: &Fetch, chunk: &[u8]) {
    copy_from_piece(
        &mut out[fetch.at..fetch.at + fetch.len],
        chunk,
        fetch.within,
    );
}

/// A bounded cache of chunk contents. Chunks are immutable, so an entry never goes stale.
pub(crate) struct ChunkCache {
    map: HashMap<ChunkId, Arc<Vec<u8>>>,
    order: VecDeque<ChunkId>,
    bytes: usize,
    limit: usize,
}

impl ChunkCache {
    pub fn new(limit: usize) -> Self {
        ChunkCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    pub fn peek(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.map.get(id).cloned()
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
        if data.len() > self.limit || self.map.contains_key(&id) {
            return;
        }
        self.bytes += data.len();
        self.map.insert(id, data);
        self.order.push_back(id);
        while self.bytes > self.limit {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(d) = self.map.remove(&old) {
                self.bytes -= d.len();
            }
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
            if let Some(buf) = node.dirty.get(&idx) {
                copy_from_piece(&mut out[at..at + n], buf, within);
            } else if let Some(buf) = node.flushing.get(&idx) {
                copy_from_piece(&mut out[at..at + n], buf, within);
            } else if let Some(id) = map.chunks.get(&idx) {
                match self.chunks.peek(id) {
                    Some(data) => copy_from_piece(&mut out[at..at + n], &data, within),
                    None => fetches.push(Fetch {
                        id: *id,
                        at,
                        within,
                        len: n,
                    }),
                }
            }
            pos += n as u64;
        }
        Ok((out, fetches))
    }

    /// The current contents of chunk `idx` of a file: its buffer, or its stored chunk.
    fn chunk_contents(&mut self, ino: u64, idx: u64) -> FsResult<Vec<u8>> {
        let node = &self.nodes[&ino];
        if let Some(buf) = node.dirty.get(&idx) {
            return Ok(buf.clone());
        }
        if let Some(buf) = node.flushing.get(&idx) {
            return Ok(buf.as_ref().clone());
        }
        let id = match &node.inode.content {
            Content::File(map) => map.chunks.get(&idx).copied(),
            _ => None,
        };
        match id {
            Some(id) => Ok(self
                .chunks
                .get(self.backend.as_ref(), &id)?
                .as_ref()
                .clone()),
            None => Ok(Vec::new()),
        }
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
        match self.node(ino)?.inode.content {
            Content::File(_) => {}
            Content::Dir(_) => return err(libc::EISDIR),
            _ => return err(libc::EINVAL),
        }
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
        let node = self.nodes.get_mut(&ino).expect("checked above");
        for (idx, base) in bases {
            node.dirty.insert(idx, base);
            self.dirty_bytes += cs as usize;
        }
        let mut pos = off;
        let mut src = 0usize;
        while src < data.len() {
            let idx = pos / cs;
            let within = (pos % cs) as usize;
            let n = (cs as usize - within).min(data.len() - src);
            let buf = node.dirty.entry(idx).or_insert_with(|| {
                self.dirty_bytes += cs as usize;
                Vec::with_capacity(cs as usize)
            });
            if buf.len() < within + n {
                buf.resize(within + n, 0);
            }
            buf[within..within + n].copy_from_slice(&data[src..src + n]);
            src += n;
            pos += n as u64;
        }
        let now = crate::layout::Timestamp::now();
        node.inode.size = node.inode.size.max(end);
        node.inode.mtime = now;
        node.inode.ctime = now;
        self.changed.insert(ino);
        self.dirty_files.insert(ino);
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
        if new_size < old {
            let rem = (new_size % cs) as usize;
            let last = new_size / cs;
            let trimmed = if rem != 0 {
                let mut data = self.chunk_contents(ino, last)?;
                data.truncate(rem);
                Some(data)
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
                node.dirty.remove(&idx);
                self.dirty_bytes -= cs as usize;
            }
            self.journal
                .extend(
                    gone.into_iter()
                        .map(|idx| JournalOp::Chunk { ino, idx, id: None }),
                );
            if let Some(data) = trimmed {
                if !node.dirty.contains_key(&last) {
                    self.dirty_bytes += cs as usize;
                }
                node.dirty.insert(last, data);
                self.dirty_files.insert(ino);
            }
        }
        let node = self.nodes.get_mut(&ino).expect("checked above");
        node.inode.size = new_size;
        self.changed.insert(ino);
        Ok(old)
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
