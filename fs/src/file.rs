//! File contents: fixed-size chunking, the write-back buffer, the chunk cache and the chunk map
//! of large files.
//!
//! Goals: random reads and writes at any offset of a file of any size with a bounded amount of
//! work per call; holes cost nothing and read as zeros; a flush stores chunks first and the inode
//! (which names them) last, so a failed flush never makes a half-written file visible.
//!
//! Model: chunk `i` of a file holds bytes `[i*cs, (i+1)*cs)`; it is absent (a hole), a durable
//! chunk named in the inode's map, or a dirty buffer in memory that shadows the durable chunk.
//! Invariant: no chunk or buffer holds bytes at or beyond the file size, so growing a file never
//! exposes old data. A partially written chunk is read, modified and written whole.
//!
//! Non-goals: content-defined chunking or deduplication across offsets, compression, and
//! deleting chunks that are no longer referenced (dBQS has no delete).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use crate::backend::{Backend, ChunkId};
use crate::error::{err, FsResult};
use crate::layout::{FileMap, IndexChunk};
use crate::volume::{Content, Inode, State};

/// The largest file size (the largest `off_t`).
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;

/// Files with at most this many chunks keep the chunk list inside the inode record.
pub(crate) const INLINE_CHUNKS: usize = 64;

/// Which chunk holds each piece of a file, in memory.
#[derive(Clone, Debug, Default)]
pub(crate) struct ChunkMap {
    pub chunks: BTreeMap<u64, ChunkId>,
    /// Index chunks as last stored (empty while the map is stored inline).
    pub groups: BTreeMap<u64, ChunkId>,
    /// Whether the stored map is indexed.
    pub indexed: bool,
    /// Groups whose entries changed since their index chunk was stored.
    pub stale: BTreeSet<u64>,
}

impl ChunkMap {
    pub fn set(&mut self, idx: u64, id: Option<ChunkId>, group_size: u64) {
        let changed = match id {
            Some(id) => self.chunks.insert(idx, id) != Some(id),
            None => self.chunks.remove(&idx).is_some(),
        };
        if changed {
            self.stale.insert(idx / group_size);
        }
    }
}

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
        self.sb.chunk_size as u64
    }

    fn group_size(&self) -> u64 {
        self.sb.index_group as u64
    }

    /// Stores one chunk and remembers its bytes in the cache.
    pub(crate) fn put_chunk(&mut self, data: Vec<u8>) -> FsResult<ChunkId> {
        let id = self.backend.put_chunk(&data)?;
        self.chunks.insert(id, Arc::new(data));
        Ok(id)
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
        self.load(ino)?;
        let node = &self.nodes[&ino];
        let Content::File(map) = &node.inode.content else {
            return err(if matches!(node.inode.content, Content::Dir(_)) {
                libc::EISDIR
            } else {
                libc::EINVAL
            });
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

    /// Writes into the write-back buffer. Returns the number of bytes written (all of them).
    pub(crate) fn write(&mut self, ino: u64, off: u64, data: &[u8]) -> FsResult<usize> {
        let cs = self.cs();
        let Some(end) = off
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
        else {
            return err(libc::EFBIG);
        };
        let node = self.node(ino)?;
        match node.inode.content {
            Content::File(_) => {}
            Content::Dir(_) => return err(libc::EISDIR),
            _ => return err(libc::EINVAL),
        }
        if self.dirty_bytes >= self.cfg.dirty_limit {
            self.flush_data(ino)?;
        }
        let mut pos = off;
        let mut src = 0usize;
        while src < data.len() {
            let idx = pos / cs;
            let within = (pos % cs) as usize;
            let n = (cs as usize - within).min(data.len() - src);
            let node = self.nodes.get_mut(&ino).expect("loaded above");
            if !node.dirty.contains_key(&idx) {
                let base = match &node.inode.content {
                    Content::File(map) => match map.chunks.get(&idx) {
                        Some(id) => self.chunks.get(self.backend.as_ref(), id)?.as_ref().clone(),
                        None => Vec::new(),
                    },
                    _ => unreachable!("checked above"),
                };
                node.dirty.insert(idx, base);
                self.dirty_bytes += cs as usize;
            }
            let buf = node.dirty.get_mut(&idx).expect("inserted above");
            if buf.len() < within + n {
                buf.resize(within + n, 0);
            }
            buf[within..within + n].copy_from_slice(&data[src..src + n]);
            src += n;
            pos += n as u64;
        }
        let node = self.nodes.get_mut(&ino).expect("loaded above");
        let now = crate::layout::Timestamp::now();
        node.inode.size = node.inode.size.max(end);
        node.inode.mtime = now;
        node.inode.ctime = now;
        node.meta_dirty = true;
        Ok(data.len())
    }

    /// Stores the dirty chunks of a file (not its inode). On failure the chunks not yet stored
    /// stay dirty, so nothing is lost and a later flush retries.
    pub(crate) fn flush_data(&mut self, ino: u64) -> FsResult<()> {
        let gs = self.group_size();
        loop {
            let Some(node) = self.nodes.get_mut(&ino) else {
                return Ok(());
            };
            let Some((&idx, _)) = node.dirty.iter().next() else {
                return Ok(());
            };
            let buf = node.dirty.get(&idx).expect("just seen").clone();
            let id = if buf.iter().all(|b| *b == 0) {
                None
            } else {
                Some(self.put_chunk(buf)?)
            };
            let node = self.nodes.get_mut(&ino).expect("present above");
            node.dirty.remove(&idx);
            self.dirty_bytes -= self.sb.chunk_size as usize;
            if let Content::File(map) = &mut node.inode.content {
                map.set(idx, id, gs);
            }
            node.meta_dirty = true;
        }
    }

    /// Makes a file durable: dirty chunks, then index chunks and the inode record.
    pub(crate) fn flush_inode(&mut self, ino: u64) -> FsResult<()> {
        let Some(node) = self.nodes.get(&ino) else {
            return Ok(());
        };
        if node.inode.nlink == 0 {
            return Ok(()); // unlinked: nothing names it any more, there is nothing to make durable
        }
        self.flush_data(ino)?;
        let node = &self.nodes[&ino];
        if node.meta_dirty {
            let inode = node.inode.clone();
            self.store_inode(ino, inode)?;
        }
        Ok(())
    }

    /// Changes the size of `inode` (a clone that is about to be stored; its file has no dirty
    /// buffers). A shrink drops the chunks past the end and rewrites the new last chunk trimmed.
    pub(crate) fn truncate_clone(&mut self, inode: &mut Inode, new_size: u64) -> FsResult<()> {
        let (cs, gs) = (self.cs(), self.group_size());
        if new_size > MAX_FILE_SIZE {
            return err(libc::EFBIG);
        }
        if new_size < inode.size {
            let Content::File(map) = &mut inode.content else {
                return err(libc::EINVAL);
            };
            let keep = new_size.div_ceil(cs);
            let gone: Vec<u64> = map.chunks.range(keep..).map(|(k, _)| *k).collect();
            for idx in gone {
                map.set(idx, None, gs);
            }
            let rem = (new_size % cs) as usize;
            if rem != 0 {
                let idx = new_size / cs;
                if let Some(id) = map.chunks.get(&idx).copied() {
                    let data = self.chunks.get(self.backend.as_ref(), &id)?;
                    if data.len() > rem {
                        let trimmed = data[..rem].to_vec();
                        let new_id = if trimmed.iter().all(|b| *b == 0) {
                            None
                        } else {
                            Some(self.put_chunk(trimmed)?)
                        };
                        let Content::File(map) = &mut inode.content else {
                            unreachable!()
                        };
                        map.set(idx, new_id, gs);
                    }
                }
            }
        }
        inode.size = new_size;
        Ok(())
    }

    /// Encodes a chunk map for storing, writing the index chunks of stale groups first.
    pub(crate) fn encode_map(&mut self, map: &mut ChunkMap) -> FsResult<FileMap> {
        if map.chunks.len() <= INLINE_CHUNKS {
            map.groups.clear();
            map.stale.clear();
            map.indexed = false;
            return Ok(FileMap::Inline(
                map.chunks.iter().map(|(k, v)| (*k, *v)).collect(),
            ));
        }
        let gs = self.group_size();
        if !map.indexed {
            map.stale = map.chunks.keys().map(|k| k / gs).collect();
        }
        let stale: Vec<u64> = map.stale.iter().copied().collect();
        for g in stale {
            let start = g * gs;
            let entries: Vec<(u32, ChunkId)> = map
                .chunks
                .range(start..start.saturating_add(gs))
                .map(|(k, v)| ((k - start) as u32, *v))
                .collect();
            if entries.is_empty() {
                map.groups.remove(&g);
            } else {
                let id = self.put_chunk(IndexChunk { group: g, entries }.encode())?;
                map.groups.insert(g, id);
            }
            map.stale.remove(&g);
        }
        map.indexed = true;
        Ok(FileMap::Indexed(
            map.groups.iter().map(|(k, v)| (*k, *v)).collect(),
        ))
    }

    /// Rebuilds the in-memory chunk map from its stored form.
    pub(crate) fn decode_map(&mut self, stored: &FileMap) -> FsResult<ChunkMap> {
        let mut map = ChunkMap::default();
        match stored {
            FileMap::Inline(list) => map.chunks.extend(list.iter().copied()),
            FileMap::Indexed(groups) => {
                let gs = self.group_size();
                map.indexed = true;
                for (g, id) in groups {
                    let data = self.chunks.get(self.backend.as_ref(), id)?;
                    let index = IndexChunk::decode(&data)?;
                    map.chunks
                        .extend(index.entries.iter().map(|(i, c)| (g * gs + *i as u64, *c)));
                    map.groups.insert(*g, *id);
                }
            }
        }
        Ok(map)
    }

    /// Allocated 512-byte blocks: chunk-sized pieces that hold data, capped at the file size.
    pub(crate) fn blocks_of(&self, ino: u64, inode: &Inode) -> u64 {
        let Content::File(map) = &inode.content else {
            return 0;
        };
        let mut pieces = map.chunks.len() as u64;
        if let Some(node) = self.nodes.get(&ino) {
            pieces += node
                .dirty
                .keys()
                .filter(|k| !map.chunks.contains_key(k))
                .count() as u64;
        }
        (pieces * self.cs()).min(inode.size.next_multiple_of(512)) / 512
    }
}
