//! Inodes in memory, and `Image`: a volume's state exactly as its head describes it.
//!
//! Goals: one replay path. Opening a volume loads the head's checkpoint into an `Image` and
//! applies the journal after it; the writer's committer keeps its own `Image` and applies each
//! batch once the head naming it is stored, so a checkpoint is written from what is durable,
//! never from what is merely applied in memory; a read-only mount follows the head the same way.
//!
//! Model: every inode with its attributes (`Meta`), a directory's entries and a file's chunk
//! map (each piece a stored chunk plus the small writes patched over it). Journal operations each set one key (see `layout::JournalOp`), so applying a segment
//! twice, or a prefix of it again, changes nothing. The image remembers which checkpoint pages
//! changed since it last wrote them, and a checkpoint writes only those.
//!
//! Non-goals: anything not durable (buffered data, open handles: `volume::State`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::{Backend, BackendError, ChunkId};
use crate::error::{FsError, FsResult};
use crate::layout::{
    name_key, split, DirEntry, FileKind, Head, JournalOp, Meta, Page, Patch, Patches, Root,
    Segment, StoredChunk, StoredInode, Timestamp, PAGE_INODES,
};

/// A directory's entries by (name key, name): readdir order, stable offsets.
pub(crate) type EntryMap = BTreeMap<(u64, Vec<u8>), DirEntry>;

pub(crate) fn entry_key(name: &[u8]) -> (u64, Vec<u8>) {
    (name_key(name), name.to_vec())
}

/// An inode in memory.
#[derive(Clone, Debug)]
pub(crate) struct Inode {
    pub kind: FileKind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub content: Content,
}

#[derive(Clone, Debug)]
pub(crate) enum Content {
    File(ChunkMap),
    Dir(DirState),
    Symlink(Vec<u8>),
    Special,
}

#[derive(Clone, Debug)]
pub(crate) struct DirState {
    pub parent: u64,
    pub entries: EntryMap,
}

impl DirState {
    pub fn empty(parent: u64) -> Self {
        DirState {
            parent,
            entries: BTreeMap::new(),
        }
    }
}

/// What each chunk-sized piece of a file holds; missing pieces are holes.
#[derive(Clone, Debug, Default)]
pub(crate) struct ChunkMap {
    pub chunks: BTreeMap<u64, Piece>,
}

/// One chunk-sized piece of a file: a stored chunk and the small writes patched over it since
/// (in the order they apply). A piece without patches always has a chunk.
#[derive(Clone, Debug, Default)]
pub(crate) struct Piece {
    pub id: Option<ChunkId>,
    pub patches: Vec<Patch>,
    /// The chunk holding `patches` as the last checkpoint stored them (`None`: changed since).
    pub stored_patches: Option<ChunkId>,
}

impl Piece {
    pub fn whole(id: ChunkId) -> Self {
        Piece {
            id: Some(id),
            patches: Vec::new(),
            stored_patches: None,
        }
    }

    pub fn patch_bytes(&self) -> usize {
        self.patches.iter().map(Patch::cost).sum()
    }

    /// The piece's bytes, given its chunk's (zeros at the end are left out).
    pub fn materialize(&self, chunk: &[u8]) -> Vec<u8> {
        let mut out = chunk.to_vec();
        for patch in &self.patches {
            match patch {
                Patch::Write { off, data } => {
                    let end = *off as usize + data.len();
                    if out.len() < end {
                        out.resize(end, 0);
                    }
                    out[*off as usize..end].copy_from_slice(data);
                }
                Patch::Zero { off, len } => {
                    let (s, e) = (*off as usize, *off as usize + *len as usize);
                    if e >= out.len() {
                        out.truncate(s);
                    } else if s < out.len() {
                        out[s..e].fill(0);
                    }
                }
            }
        }
        out
    }
}

/// Overlays `patches` on `dst`, which holds the piece's bytes from offset `within`.
pub(crate) fn overlay(dst: &mut [u8], within: usize, patches: &[Patch]) {
    let w_end = within + dst.len();
    for patch in patches {
        let (p, len) = match patch {
            Patch::Write { off, data } => (*off as usize, data.len()),
            Patch::Zero { off, len } => (*off as usize, *len as usize),
        };
        let (s, e) = (p.max(within), (p + len).min(w_end));
        if s >= e {
            continue;
        }
        match patch {
            Patch::Write { data, .. } => {
                dst[s - within..e - within].copy_from_slice(&data[s - p..e - p])
            }
            Patch::Zero { .. } => dst[s - within..e - within].fill(0),
        }
    }
}

impl Inode {
    pub fn meta(&self) -> Meta {
        Meta {
            kind: self.kind,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            nlink: self.nlink,
            rdev: self.rdev,
            size: self.size,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            xattrs: self.xattrs.clone(),
            parent: match &self.content {
                Content::Dir(d) => d.parent,
                _ => 0,
            },
            target: match &self.content {
                Content::Symlink(t) => t.clone(),
                _ => Vec::new(),
            },
        }
    }

    /// A new inode with these attributes and no entries or chunks.
    pub fn from_meta(meta: Meta) -> Self {
        let content = match meta.kind {
            FileKind::File => Content::File(ChunkMap::default()),
            FileKind::Dir => Content::Dir(DirState::empty(meta.parent)),
            FileKind::Symlink => Content::Symlink(meta.target.clone()),
            _ => Content::Special,
        };
        let mut inode = Inode {
            kind: meta.kind,
            perm: 0,
            uid: 0,
            gid: 0,
            nlink: 0,
            rdev: 0,
            size: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            xattrs: BTreeMap::new(),
            content,
        };
        inode.set_meta(meta);
        inode
    }

    /// Replaces the attributes, keeping entries and chunks.
    pub fn set_meta(&mut self, meta: Meta) {
        self.perm = meta.perm;
        self.uid = meta.uid;
        self.gid = meta.gid;
        self.nlink = meta.nlink;
        self.rdev = meta.rdev;
        self.size = meta.size;
        self.atime = meta.atime;
        self.mtime = meta.mtime;
        self.ctime = meta.ctime;
        self.xattrs = meta.xattrs;
        match &mut self.content {
            Content::Dir(d) => d.parent = meta.parent,
            Content::Symlink(t) => *t = meta.target,
            _ => {}
        }
    }

    pub fn dir(&self) -> Option<&DirState> {
        match &self.content {
            Content::Dir(d) => Some(d),
            _ => None,
        }
    }

    fn stored(&self, ino: u64) -> StoredInode {
        StoredInode {
            ino,
            meta: self.meta(),
            entries: match &self.content {
                Content::Dir(d) => d.entries.values().cloned().collect(),
                _ => Vec::new(),
            },
            chunks: match &self.content {
                Content::File(m) => m
                    .chunks
                    .iter()
                    .map(|(k, p)| {
                        debug_assert!(p.patches.is_empty() || p.stored_patches.is_some());
                        (
                            *k,
                            StoredChunk {
                                id: p.id,
                                patches: p.stored_patches,
                            },
                        )
                    })
                    .collect(),
                _ => Vec::new(),
            },
        }
    }

    /// An inode from a checkpoint page; `patches` holds the patch lists the page names.
    fn from_stored(s: StoredInode, patches: &HashMap<ChunkId, Patches>) -> FsResult<Self> {
        let mut inode = Inode::from_meta(s.meta);
        match &mut inode.content {
            Content::Dir(d) => {
                d.entries = s
                    .entries
                    .into_iter()
                    .map(|e| (entry_key(&e.name), e))
                    .collect()
            }
            Content::File(m) => {
                for (idx, c) in s.chunks {
                    let list = match c.patches {
                        Some(id) => patches[&id].list.clone(),
                        None => Vec::new(),
                    };
                    if c.id.is_none() && list.is_empty() {
                        return Err(FsError::Decode {
                            what: "checkpoint page",
                            detail: format!("chunk {idx} of inode {} holds nothing", s.ino),
                        });
                    }
                    m.chunks.insert(
                        idx,
                        Piece {
                            id: c.id,
                            patches: list,
                            stored_patches: c.patches,
                        },
                    );
                }
            }
            _ => {}
        }
        Ok(inode)
    }
}

/// A volume's durable state: a checkpoint plus the journal applied after it.
pub(crate) struct Image {
    pub inodes: BTreeMap<u64, Inode>,
    /// The chunks of each page as last checkpointed.
    pages: BTreeMap<u64, Vec<ChunkId>>,
    /// Pages changed since.
    dirty: BTreeSet<u64>,
}

fn page_of(ino: u64) -> u64 {
    ino / PAGE_INODES
}

impl Image {
    pub fn empty() -> Self {
        Image {
            inodes: BTreeMap::new(),
            pages: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    pub fn apply(&mut self, op: &JournalOp) {
        let ino = match op {
            JournalOp::Put { ino, meta } => {
                match self.inodes.get_mut(ino) {
                    Some(i) if i.kind == meta.kind => i.set_meta(meta.clone()),
                    _ => {
                        self.inodes.insert(*ino, Inode::from_meta(meta.clone()));
                    }
                }
                *ino
            }
            JournalOp::Link { dir, entry } => {
                if let Some(Content::Dir(d)) = self.inodes.get_mut(dir).map(|i| &mut i.content) {
                    d.entries.insert(entry_key(&entry.name), entry.clone());
                }
                *dir
            }
            JournalOp::Unlink { dir, name } => {
                if let Some(Content::Dir(d)) = self.inodes.get_mut(dir).map(|i| &mut i.content) {
                    d.entries.remove(&entry_key(name));
                }
                *dir
            }
            JournalOp::Chunk { ino, idx, id } => {
                if let Some(Content::File(m)) = self.inodes.get_mut(ino).map(|i| &mut i.content) {
                    match id {
                        Some(id) => m.chunks.insert(*idx, Piece::whole(*id)),
                        None => m.chunks.remove(idx),
                    };
                }
                *ino
            }
            JournalOp::Patch { ino, idx, patch } => {
                if let Some(Content::File(m)) = self.inodes.get_mut(ino).map(|i| &mut i.content) {
                    let p = m.chunks.entry(*idx).or_default();
                    p.patches.push(patch.clone());
                    p.stored_patches = None;
                }
                *ino
            }
            JournalOp::Free { ino } => {
                self.inodes.remove(ino);
                *ino
            }
        };
        self.dirty.insert(page_of(ino));
    }

    /// Loads what `head` names: its checkpoint, then its journal, then its tail.
    pub fn load(backend: &dyn Backend, head: &Head) -> FsResult<Image> {
        Ok(Image::load_seen(backend, head)?.0)
    }

    /// Loads like [`Image::load`], and also returns every chunk the head names along the way
    /// (checkpoint structure and data, journal pieces, chunks its operations set) and the
    /// structure of its checkpoint alone (root pieces, pages, patch lists): what the collector
    /// starts from.
    pub fn load_seen(
        backend: &dyn Backend,
        head: &Head,
    ) -> FsResult<(Image, HashSet<ChunkId>, HashSet<ChunkId>)> {
        let mut image = Image::load_checkpoint(backend, head)?;
        let mut structure: HashSet<ChunkId> = image.page_pieces().collect();
        structure.extend(head.checkpoint.iter().copied());
        for inode in image.inodes.values() {
            if let Content::File(m) = &inode.content {
                structure.extend(m.chunks.values().filter_map(|p| p.stored_patches));
            }
        }
        let mut seen = crate::gc::image_reach(&image, head);
        let mut note = |op: &JournalOp| {
            if let JournalOp::Chunk { id: Some(id), .. } = op {
                seen.insert(*id);
            }
        };
        image.replay_noting(backend, &head.journal, &mut note)?;
        for op in &head.tail {
            note(op);
            image.apply(op);
        }
        Ok((image, seen, structure))
    }

    fn load_checkpoint(backend: &dyn Backend, head: &Head) -> FsResult<Image> {
        let mut image = Image::empty();
        if !head.checkpoint.is_empty() {
            let root = Root::decode(&get_joined(backend, &head.checkpoint)?)?;
            let pieces: Vec<ChunkId> = root.pages.iter().flat_map(|(_, p)| p.clone()).collect();
            let mut fetched = get_chunks(backend, &pieces)?.into_iter();
            let mut stored = Vec::new();
            for (no, ids) in &root.pages {
                let bytes: Vec<u8> = fetched.by_ref().take(ids.len()).flatten().collect();
                for s in Page::decode(&bytes)?.inodes {
                    if page_of(s.ino) != *no {
                        return Err(FsError::Decode {
                            what: "checkpoint page",
                            detail: format!("inode {} in page {no}", s.ino),
                        });
                    }
                    stored.push(s);
                }
            }
            let patch_ids: Vec<ChunkId> = stored
                .iter()
                .flat_map(|s| s.chunks.iter().filter_map(|(_, c)| c.patches))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut patches = HashMap::new();
            for (id, bytes) in patch_ids.iter().zip(get_chunks(backend, &patch_ids)?) {
                patches.insert(*id, Patches::decode(&bytes)?);
            }
            for s in stored {
                image.inodes.insert(s.ino, Inode::from_stored(s, &patches)?);
            }
            image.pages = root.pages.into_iter().collect();
        }
        Ok(image)
    }

    /// The pieces of every page as last checkpointed.
    pub fn page_pieces(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.pages.values().flatten().copied()
    }

    /// The structure a checkpoint just written names (with its root's pieces): pages and the
    /// files' stored patch lists.
    pub fn structure(&self) -> HashSet<ChunkId> {
        let mut s: HashSet<ChunkId> = self.page_pieces().collect();
        for inode in self.inodes.values() {
            if let Content::File(m) = &inode.content {
                s.extend(m.chunks.values().filter_map(|p| p.stored_patches));
            }
        }
        s
    }

    /// Applies journal segments (each a list of pieces) in order.
    pub fn replay(&mut self, backend: &dyn Backend, segments: &[Vec<ChunkId>]) -> FsResult<()> {
        self.replay_noting(backend, segments, &mut |_| {})
    }

    fn replay_noting(
        &mut self,
        backend: &dyn Backend,
        segments: &[Vec<ChunkId>],
        note: &mut dyn FnMut(&JournalOp),
    ) -> FsResult<()> {
        let pieces: Vec<ChunkId> = segments.iter().flatten().copied().collect();
        let mut fetched = get_chunks(backend, &pieces)?.into_iter();
        for seg in segments {
            let bytes: Vec<u8> = fetched.by_ref().take(seg.len()).flatten().collect();
            for op in &Segment::decode(&bytes)?.ops {
                note(op);
                self.apply(op);
            }
        }
        Ok(())
    }

    /// Writes the pages changed since the last checkpoint, then the root; returns the root's
    /// pieces for the head. Pages are written before the root that names them.
    pub fn checkpoint(&mut self, backend: &dyn Backend) -> FsResult<Vec<ChunkId>> {
        let max = piece_size(backend);
        let dirty: Vec<u64> = self.dirty.iter().copied().collect();
        // The patch lists that changed since they were last stored, before the pages naming them.
        let mut changed = Vec::new();
        for no in &dirty {
            for (ino, inode) in self.inodes.range(no * PAGE_INODES..(no + 1) * PAGE_INODES) {
                if let Content::File(m) = &inode.content {
                    for (idx, p) in &m.chunks {
                        if !p.patches.is_empty() && p.stored_patches.is_none() {
                            let list = Patches {
                                list: p.patches.clone(),
                            };
                            changed.push((*ino, *idx, list.encode()));
                        }
                    }
                }
            }
        }
        let bodies: Vec<&[u8]> = changed.iter().map(|(_, _, b)| b.as_slice()).collect();
        let ids = put_chunks(backend, &bodies)?;
        for ((ino, idx, _), id) in changed.iter().zip(ids) {
            if let Some(Content::File(m)) = self.inodes.get_mut(ino).map(|i| &mut i.content) {
                if let Some(p) = m.chunks.get_mut(idx) {
                    p.stored_patches = Some(id);
                }
            }
        }
        let mut encoded = Vec::new();
        for no in &dirty {
            let range = no * PAGE_INODES..(no + 1) * PAGE_INODES;
            let page = Page {
                inodes: self
                    .inodes
                    .range(range)
                    .map(|(ino, i)| i.stored(*ino))
                    .collect(),
            };
            encoded.push((*no, (!page.inodes.is_empty()).then(|| page.encode())));
        }
        let pieces: Vec<&[u8]> = encoded
            .iter()
            .filter_map(|(_, b)| b.as_deref())
            .flat_map(|b| split(b, max))
            .collect();
        let mut ids = put_chunks(backend, &pieces)?.into_iter();
        for (no, bytes) in &encoded {
            match bytes {
                Some(b) => {
                    let n = split(b, max).len();
                    self.pages.insert(*no, ids.by_ref().take(n).collect());
                }
                None => {
                    self.pages.remove(no);
                }
            }
        }
        self.dirty.clear();
        let root = Root {
            pages: self.pages.iter().map(|(k, v)| (*k, v.clone())).collect(),
        }
        .encode();
        put_chunks(backend, &split(&root, max))
    }
}

/// The largest piece a segment, page or root is split into.
pub(crate) fn piece_size(backend: &dyn Backend) -> usize {
    backend.max_block().max(64)
}

/// How many backend calls a volume makes at once when it moves many chunks.
const PARALLEL: usize = 16;

/// Runs `f` on every item with up to `PARALLEL` calls in flight; results in input order.
fn parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> FsResult<R> + Sync,
) -> FsResult<Vec<R>> {
    if items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<FsResult<R>>> = (0..items.len()).map(|_| None).collect();
    let slots: Vec<std::sync::Mutex<&mut Option<FsResult<R>>>> =
        results.iter_mut().map(std::sync::Mutex::new).collect();
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                let failed = r.is_err();
                **slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                if failed {
                    next.store(items.len(), Ordering::Relaxed);
                }
            });
        }
    });
    drop(slots);
    let mut out = Vec::with_capacity(items.len());
    for r in results {
        match r {
            Some(r) => out.push(r?),
            // Not attempted because an earlier item failed; that failure comes first.
            None => unreachable!("an unattempted item follows a failed one"),
        }
    }
    Ok(out)
}

/// Stores chunks in parallel; for each, its id or `NoSpace` (the nodes refused it for lack of
/// space). Any other failure fails the whole call at once.
pub(crate) fn put_chunks_each(
    backend: &dyn Backend,
    pieces: &[&[u8]],
) -> FsResult<Vec<Result<ChunkId, BackendError>>> {
    parallel(pieces, |p| match backend.put_chunk(p) {
        Err(BackendError::NoSpace) => Ok(Err(BackendError::NoSpace)),
        r => Ok(Ok(r?)),
    })
}

/// Stores chunks in parallel; their ids in order.
pub(crate) fn put_chunks(backend: &dyn Backend, pieces: &[&[u8]]) -> FsResult<Vec<ChunkId>> {
    parallel(pieces, |p| Ok(backend.put_chunk(p)?))
}

/// Fetches chunks in parallel; their bytes in order.
pub(crate) fn get_chunks(backend: &dyn Backend, ids: &[ChunkId]) -> FsResult<Vec<Vec<u8>>> {
    parallel(ids, |id| Ok(backend.get_chunk(id)?))
}

/// Fetches the pieces of one value and joins them.
pub(crate) fn get_joined(backend: &dyn Backend, ids: &[ChunkId]) -> FsResult<Vec<u8>> {
    Ok(get_chunks(backend, ids)?.concat())
}
