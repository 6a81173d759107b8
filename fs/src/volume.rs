//! `Volume`: the POSIX filesystem over a `Backend`, on inode numbers, with no FUSE types.
//!
//! Goals: every operation a FUSE adapter needs (lookup, attributes, the namespace operations,
//! file I/O, directories, extended attributes) with POSIX/Linux semantics, testable without a
//! mount; durable state reachable by a fresh `Volume` over the same backend.
//!
//! Durability rules:
//! - Namespace operations and attribute changes are written through: when the call returns, the
//!   records are stored. Each record is stored before the record that refers to it (a new inode
//!   before the directory entry naming it; bucket before the directory inode listing it), and an
//!   operation removes a name before lowering a link count, so a crash in between leaves at worst
//!   an unreferenced inode or a link count that is too high, never a name for a missing inode.
//! - File data is buffered (`file.rs`) and stored on `flush`, `fsync`, `release`, before any
//!   other change to that inode is stored, and when the dirty total passes `dirty_limit`. Chunks
//!   go first, the inode record last: a failed flush leaves the old file visible.
//! - The in-memory state of a record is replaced only once the store succeeded (namespace and
//!   attribute operations work on a copy), so a failed call changes nothing visible, apart from
//!   buffered data that stays buffered for a retry.
//!
//! Permission checks are left to the kernel (`default_permissions`); the volume applies the rules
//! the kernel leaves to filesystems: setgid directories, clearing setgid on chmod by a non-member,
//! times and link counts.
//!
//! Non-goals: concurrency inside one volume (one lock serializes operations; backend calls are
//! made under it), several writers on one volume, atime updates on read (behaves as `noatime`),
//! POSIX ACLs, hole punching.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::Backend;
use crate::dir::{BucketMem, DirMem, DirState, Edit};
use crate::error::{err, FsResult};
use crate::file::{ChunkCache, ChunkMap};
use crate::layout::{
    inode_label, Body, DirBody, DirEntry, DirLayout, FileKind, InodeRecord, Leaf, Superblock,
    Timestamp, ROOT_INO, SUPER_LABEL,
};

pub const NAME_MAX: usize = 255;
pub const PATH_MAX: usize = 4096;
/// Largest xattr value, and largest total of names and values on one inode.
pub const XATTR_VALUE_MAX: usize = 64 * 1024;
pub const XATTR_TOTAL_MAX: usize = 256 * 1024;
const LINK_MAX: u32 = 65000;

/// Tunables. `Default` is what a mount uses.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// Refuse every change with `EROFS`.
    pub read_only: bool,
    /// Chunk size for a volume formatted now (default: the backend's `max_block`, at most 1 MiB).
    pub chunk_size: Option<u32>,
    /// Owner of the root directory of a volume formatted now.
    pub root_uid: u32,
    pub root_gid: u32,
    /// Buffered bytes (over all files) beyond which a write first stores the file's dirty chunks.
    pub dirty_limit: usize,
    pub chunk_cache_bytes: usize,
    /// Inode numbers reserved per superblock write.
    pub ino_batch: u64,
    /// Entries a directory keeps in its inode record before moving to buckets.
    pub dir_inline_max: usize,
    /// Entries per bucket before it splits.
    pub bucket_max: usize,
    /// Cached inodes beyond which clean, closed ones are dropped.
    pub max_cached_inodes: usize,
    pub max_cached_buckets: usize,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            read_only: false,
            chunk_size: None,
            root_uid: 0,
            root_gid: 0,
            dirty_limit: 64 << 20,
            chunk_cache_bytes: 128 << 20,
            ino_batch: 1024,
            dir_inline_max: 32,
            bucket_max: 256,
            max_cached_inodes: 200_000,
            max_cached_buckets: 20_000,
        }
    }
}

/// Who is asking: the owner of anything created, and group membership for setgid rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
    /// Calling process, for supplementary groups (0: none known).
    pub pid: u32,
}

impl Cred {
    pub const ROOT: Cred = Cred {
        uid: 0,
        gid: 0,
        pid: 0,
    };

    pub fn user(uid: u32, gid: u32) -> Self {
        Cred { uid, gid, pid: 0 }
    }

    /// Whether the caller is in group `gid` (primary or supplementary).
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || (self.pid != 0 && supplementary_groups(self.pid).contains(&gid))
    }
}

fn supplementary_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Attributes as reported by `stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid, sticky.
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// A `setattr` request; `None` leaves the attribute alone (this is how `UTIME_OMIT` arrives).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirListEntry {
    /// Pass this back to `readdir` to continue after this entry.
    pub offset: u64,
    pub ino: u64,
    pub kind: FileKind,
    pub name: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// What `make_node` creates.
struct NewInode {
    kind: FileKind,
    perm: u16,
    rdev: u32,
    content: Content,
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

pub(crate) struct Node {
    /// Highest version of the inode record this volume stored or saw.
    pub version: u64,
    pub inode: Inode,
    /// Buffered chunk contents by chunk index (file data not yet stored).
    pub dirty: BTreeMap<u64, Vec<u8>>,
    /// The inode differs from its stored record (buffered writes changed size or times).
    pub meta_dirty: bool,
    /// Open file handles.
    pub open: u32,
}

pub(crate) struct State {
    pub backend: Arc<dyn Backend>,
    pub cfg: VolumeConfig,
    pub sb: Superblock,
    sb_version: u64,
    next_ino: u64,
    pub nodes: HashMap<u64, Node>,
    /// Inodes removed while this volume ran; their stored records are unreachable garbage.
    dead: HashSet<u64>,
    pub buckets: HashMap<(u64, Leaf), BucketMem>,
    pub chunks: ChunkCache,
    handles: HashMap<u64, u64>,
    next_fh: u64,
    pub dirty_bytes: usize,
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return err(libc::EINVAL);
    }
    if name.len() > NAME_MAX {
        return err(libc::ENAMETOOLONG);
    }
    Ok(())
}

fn kind_of_mode(mode: u32) -> FsResult<FileKind> {
    Ok(match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => FileKind::File,
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFCHR => FileKind::CharDev,
        libc::S_IFBLK => FileKind::BlockDev,
        libc::S_IFSOCK => FileKind::Socket,
        _ => return err(libc::EINVAL),
    })
}

const SUID: u16 = libc::S_ISUID as u16;
const SGID: u16 = libc::S_ISGID as u16;
const XGRP: u16 = libc::S_IXGRP as u16;

impl Inode {
    fn from_record(rec: InodeRecord, content: Content) -> Self {
        Inode {
            kind: rec.kind,
            perm: rec.perm,
            uid: rec.uid,
            gid: rec.gid,
            nlink: rec.nlink,
            rdev: rec.rdev,
            size: rec.size,
            atime: rec.atime,
            mtime: rec.mtime,
            ctime: rec.ctime,
            xattrs: rec.xattrs,
            content,
        }
    }

    fn dir(&self) -> Option<&DirState> {
        match &self.content {
            Content::Dir(d) => Some(d),
            _ => None,
        }
    }
}

impl State {
    /// Loads an inode into the cache if it is not there yet.
    pub(crate) fn load(&mut self, ino: u64) -> FsResult<()> {
        if self.nodes.contains_key(&ino) {
            return Ok(());
        }
        if self.dead.contains(&ino) {
            return err(libc::ENOENT);
        }
        self.evict();
        let Some(rec) = self.backend.get_record(&inode_label(ino))? else {
            return err(libc::ENOENT);
        };
        let inode = InodeRecord::decode(&rec.value)?;
        let content = match &inode.body {
            Body::File(map) => Content::File(self.decode_map(map)?),
            Body::Dir(d) => Content::Dir(DirState {
                parent: d.parent,
                count: d.count,
                layout: match &d.layout {
                    DirLayout::Inline(entries) => DirMem::Inline(
                        entries
                            .iter()
                            .map(|e| {
                                (
                                    (crate::layout::name_key(&e.name), e.name.clone()),
                                    e.clone(),
                                )
                            })
                            .collect(),
                    ),
                    DirLayout::Hashed(leaves) => {
                        DirMem::Hashed(leaves.iter().map(|l| (l.first_key(), *l)).collect())
                    }
                },
            }),
            Body::Symlink(t) => Content::Symlink(t.clone()),
            Body::Special => Content::Special,
        };
        let node = Node {
            version: rec.version,
            inode: Inode::from_record(inode, content),
            dirty: BTreeMap::new(),
            meta_dirty: false,
            open: 0,
        };
        self.nodes.insert(ino, node);
        Ok(())
    }

    pub(crate) fn node(&mut self, ino: u64) -> FsResult<&mut Node> {
        self.load(ino)?;
        Ok(self.nodes.get_mut(&ino).expect("loaded"))
    }

    /// Drops clean, closed inodes and some buckets when the caches are over their limits.
    fn evict(&mut self) {
        if self.nodes.len() >= self.cfg.max_cached_inodes {
            let target = self.cfg.max_cached_inodes / 2;
            let victims: Vec<u64> = self
                .nodes
                .iter()
                .filter(|(ino, n)| {
                    **ino != ROOT_INO && n.open == 0 && !n.meta_dirty && n.dirty.is_empty()
                })
                .map(|(ino, _)| *ino)
                .take(self.nodes.len().saturating_sub(target))
                .collect();
            for ino in victims {
                self.nodes.remove(&ino);
            }
        }
        if self.buckets.len() >= self.cfg.max_cached_buckets {
            self.buckets.clear();
        }
    }

    /// Stores `inode` as the new record of `ino` (index chunks first), then makes it the cached
    /// state. The cached state is untouched if storing fails.
    pub(crate) fn store_inode(&mut self, ino: u64, mut inode: Inode) -> FsResult<()> {
        let body = match &mut inode.content {
            Content::File(map) => Body::File(self.encode_map(map)?),
            Content::Dir(d) => Body::Dir(DirBody {
                parent: d.parent,
                count: d.count,
                layout: match &d.layout {
                    DirMem::Inline(m) => DirLayout::Inline(m.values().cloned().collect()),
                    DirMem::Hashed(l) => DirLayout::Hashed(l.values().copied().collect()),
                },
            }),
            Content::Symlink(t) => Body::Symlink(t.clone()),
            Content::Special => Body::Special,
        };
        let rec = InodeRecord {
            kind: inode.kind,
            perm: inode.perm,
            uid: inode.uid,
            gid: inode.gid,
            nlink: inode.nlink,
            rdev: inode.rdev,
            size: inode.size,
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
            xattrs: inode.xattrs.clone(),
            body,
        };
        let value = rec.encode();
        if value.len() > self.backend.max_block() {
            return err(libc::ENOSPC);
        }
        let version = self.nodes.get(&ino).map_or(0, |n| n.version) + 1;
        if let Err(e) = self.backend.put_record(&inode_label(ino), version, &value) {
            // The write may have landed although it failed: never reuse this version.
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.version = version;
            }
            return Err(e.into());
        }
        match self.nodes.get_mut(&ino) {
            Some(n) => {
                n.version = version;
                n.inode = inode;
                n.meta_dirty = false;
            }
            None => {
                let node = Node {
                    version,
                    inode,
                    dirty: BTreeMap::new(),
                    meta_dirty: false,
                    open: 0,
                };
                self.nodes.insert(ino, node);
            }
        }
        Ok(())
    }

    /// Changes one inode: stores its buffered data, then a modified copy of it.
    pub(crate) fn update(
        &mut self,
        ino: u64,
        f: impl FnOnce(&mut Inode) -> FsResult<()>,
    ) -> FsResult<()> {
        self.load(ino)?;
        self.flush_data(ino)?;
        let mut inode = self.nodes[&ino].inode.clone();
        f(&mut inode)?;
        self.store_inode(ino, inode)
    }

    fn alloc_ino(&mut self) -> FsResult<u64> {
        if self.next_ino >= self.sb.ino_reserved {
            let mut sb = self.sb.clone();
            sb.ino_reserved = self.next_ino + self.cfg.ino_batch.max(1);
            self.sb_version += 1;
            self.backend
                .put_record(SUPER_LABEL, self.sb_version, &sb.encode())?;
            self.sb = sb;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        Ok(ino)
    }

    /// Forgets an inode that no name and no handle refers to any more.
    fn discard(&mut self, ino: u64) {
        if let Some(node) = self.nodes.remove(&ino) {
            self.dirty_bytes -= node.dirty.len() * self.sb.chunk_size as usize;
            if matches!(node.inode.content, Content::Dir(_)) {
                self.forget_dir(ino);
            }
        }
        self.dead.insert(ino);
    }

    fn attr_of(&self, ino: u64) -> Attr {
        let i = &self.nodes[&ino].inode;
        Attr {
            ino,
            kind: i.kind,
            perm: i.perm,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev,
            size: if i.kind == FileKind::Dir {
                4096
            } else {
                i.size
            },
            blocks: if i.kind == FileKind::Dir {
                8
            } else {
                self.blocks_of(ino, i)
            },
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
        }
    }

    fn getattr(&mut self, ino: u64) -> FsResult<Attr> {
        self.load(ino)?;
        Ok(self.attr_of(ino))
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        check_name(name)?;
        match self.dir_lookup(parent, name)? {
            Some(e) => self.getattr(e.ino),
            None => err(libc::ENOENT),
        }
    }

    /// A directory that exists and still has a name (new entries may go in it).
    fn live_dir(&mut self, dir: u64) -> FsResult<&Inode> {
        let node = self.node(dir)?;
        if node.inode.dir().is_none() {
            return err(libc::ENOTDIR);
        }
        if node.inode.nlink == 0 {
            return err(libc::ENOENT);
        }
        Ok(&node.inode)
    }

    fn make_node(
        &mut self,
        cred: &Cred,
        parent: u64,
        name: &[u8],
        spec: NewInode,
    ) -> FsResult<Attr> {
        let NewInode {
            kind,
            perm,
            rdev,
            content,
        } = spec;
        check_name(name)?;
        let p = self.live_dir(parent)?;
        let (p_perm, p_gid) = (p.perm, p.gid);
        if self.dir_lookup(parent, name)?.is_some() {
            return err(libc::EEXIST);
        }
        let mut perm = perm & 0o7777;
        let mut gid = cred.gid;
        if p_perm & SGID != 0 {
            gid = p_gid;
            if kind == FileKind::Dir {
                perm |= SGID;
            }
        }
        let size = match &content {
            Content::Symlink(t) => t.len() as u64,
            _ => 0,
        };
        let now = Timestamp::now();
        let inode = Inode {
            kind,
            perm,
            uid: cred.uid,
            gid,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            rdev,
            size,
            atime: now,
            mtime: now,
            ctime: now,
            xattrs: BTreeMap::new(),
            content,
        };
        let ino = self.alloc_ino()?;
        self.store_inode(ino, inode)?;
        let entry = DirEntry {
            name: name.to_vec(),
            ino,
            kind,
        };
        let linked = self.dir_edit(parent, vec![Edit::Put(entry)], |p| {
            p.mtime = now;
            p.ctime = now;
            if kind == FileKind::Dir {
                p.nlink += 1;
            }
        });
        if let Err(e) = linked {
            self.discard(ino);
            return Err(e);
        }
        self.getattr(ino)
    }

    /// Removes one link to `ino` whose name is already gone.
    fn drop_link(&mut self, ino: u64, now: Timestamp) -> FsResult<()> {
        let node = self.node(ino)?;
        if node.inode.nlink > 1 {
            return self.update(ino, |i| {
                i.nlink -= 1;
                i.ctime = now;
                Ok(())
            });
        }
        node.inode.nlink = 0;
        node.inode.ctime = now;
        if node.open == 0 {
            self.discard(ino);
        }
        Ok(())
    }

    fn unlink(&mut self, parent: u64, name: &[u8]) -> FsResult<()> {
        check_name(name)?;
        let Some(e) = self.dir_lookup(parent, name)? else {
            return err(libc::ENOENT);
        };
        if e.kind == FileKind::Dir {
            return err(libc::EISDIR);
        }
        let now = Timestamp::now();
        self.dir_edit(parent, vec![Edit::Remove(name.to_vec())], |p| {
            p.mtime = now;
            p.ctime = now;
        })?;
        self.drop_link(e.ino, now)
    }

    fn rmdir(&mut self, parent: u64, name: &[u8]) -> FsResult<()> {
        if name == b"." {
            return err(libc::EINVAL);
        }
        if name == b".." {
            return err(libc::ENOTEMPTY);
        }
        check_name(name)?;
        let Some(e) = self.dir_lookup(parent, name)? else {
            return err(libc::ENOENT);
        };
        if e.kind != FileKind::Dir {
            return err(libc::ENOTDIR);
        }
        if !self.dir_is_empty(e.ino)? {
            return err(libc::ENOTEMPTY);
        }
        let now = Timestamp::now();
        self.dir_edit(parent, vec![Edit::Remove(name.to_vec())], |p| {
            p.mtime = now;
            p.ctime = now;
            p.nlink -= 1;
        })?;
        self.discard(e.ino);
        Ok(())
    }

    fn link(&mut self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        check_name(newname)?;
        self.live_dir(newparent)?;
        if self.dir_lookup(newparent, newname)?.is_some() {
            return err(libc::EEXIST);
        }
        let node = self.node(ino)?;
        if node.inode.kind == FileKind::Dir {
            return err(libc::EPERM);
        }
        if node.inode.nlink == 0 {
            return err(libc::ENOENT);
        }
        if node.inode.nlink >= LINK_MAX {
            return err(libc::EMLINK);
        }
        let kind = node.inode.kind;
        let now = Timestamp::now();
        self.update(ino, |i| {
            i.nlink += 1;
            i.ctime = now;
            Ok(())
        })?;
        let entry = DirEntry {
            name: newname.to_vec(),
            ino,
            kind,
        };
        self.dir_edit(newparent, vec![Edit::Put(entry)], |p| {
            p.mtime = now;
            p.ctime = now;
        })?;
        self.getattr(ino)
    }

    /// Asks the entries themselves rather than the directory's count, which a failure between
    /// storing a bucket and storing the directory inode can leave behind.
    fn dir_is_empty(&mut self, dir: u64) -> FsResult<bool> {
        Ok(self.dir_list(dir, 0, 1)?.is_empty())
    }

    /// Whether directory `a` is `d` or one of its ancestors.
    fn is_ancestor(&mut self, a: u64, mut d: u64) -> FsResult<bool> {
        loop {
            if d == a {
                return Ok(true);
            }
            if d == ROOT_INO {
                return Ok(false);
            }
            d = match self.node(d)?.inode.dir() {
                Some(dir) => dir.parent,
                None => return Ok(false),
            };
        }
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0 || (exchange && noreplace)
        {
            return err(libc::EINVAL);
        }
        check_name(name)?;
        check_name(newname)?;
        self.live_dir(newparent)?;
        let Some(src) = self.dir_lookup(parent, name)? else {
            return err(libc::ENOENT);
        };
        let dst = self.dir_lookup(newparent, newname)?;
        match (&dst, exchange, noreplace) {
            (Some(_), _, true) => return err(libc::EEXIST),
            (None, true, _) => return err(libc::ENOENT),
            _ => {}
        }
        if dst.as_ref().is_some_and(|d| d.ino == src.ino) {
            return Ok(()); // two names of one inode: POSIX says do nothing
        }
        let src_dir = src.kind == FileKind::Dir;
        let dst_dir = dst.as_ref().is_some_and(|d| d.kind == FileKind::Dir);
        if src_dir && parent != newparent && self.is_ancestor(src.ino, newparent)? {
            return err(libc::EINVAL);
        }
        if let (Some(d), false) = (&dst, exchange) {
            if dst_dir && self.is_ancestor(d.ino, parent)? {
                return err(libc::ENOTEMPTY);
            }
            if src_dir && !dst_dir {
                return err(libc::ENOTDIR);
            }
            if !src_dir && dst_dir {
                return err(libc::EISDIR);
            }
            if dst_dir && !self.dir_is_empty(d.ino)? {
                return err(libc::ENOTEMPTY);
            }
        }
        if let (Some(d), true) = (&dst, exchange) {
            if dst_dir && parent != newparent && self.is_ancestor(d.ino, parent)? {
                return err(libc::EINVAL);
            }
        }
        let now = Timestamp::now();
        let touch = |p: &mut Inode| {
            p.mtime = now;
            p.ctime = now;
        };
        let moved = DirEntry {
            name: newname.to_vec(),
            ino: src.ino,
            kind: src.kind,
        };
        if exchange {
            let d = dst.clone().expect("checked above");
            let back = DirEntry {
                name: name.to_vec(),
                ino: d.ino,
                kind: d.kind,
            };
            if parent == newparent {
                self.dir_edit(parent, vec![Edit::Put(moved), Edit::Put(back)], touch)?;
            } else {
                let shift = src_dir as i64 - dst_dir as i64;
                self.dir_edit(newparent, vec![Edit::Put(moved)], |p| {
                    touch(p);
                    p.nlink = (p.nlink as i64 + shift) as u32;
                })?;
                self.dir_edit(parent, vec![Edit::Put(back)], |p| {
                    touch(p);
                    p.nlink = (p.nlink as i64 - shift) as u32;
                })?;
            }
            self.reparent(src.ino, newparent, now)?;
            self.reparent(d.ino, parent, now)?;
            return Ok(());
        }
        if parent == newparent {
            self.dir_edit(
                parent,
                vec![Edit::Put(moved), Edit::Remove(name.to_vec())],
                |p| {
                    touch(p);
                    if dst_dir {
                        p.nlink -= 1;
                    }
                },
            )?;
        } else {
            self.dir_edit(newparent, vec![Edit::Put(moved)], |p| {
                touch(p);
                if src_dir && !dst_dir {
                    p.nlink += 1;
                }
            })?;
            self.dir_edit(parent, vec![Edit::Remove(name.to_vec())], |p| {
                touch(p);
                if src_dir {
                    p.nlink -= 1;
                }
            })?;
        }
        self.reparent(src.ino, newparent, now)?;
        if let Some(d) = dst {
            if dst_dir {
                self.discard(d.ino);
            } else {
                self.drop_link(d.ino, now)?;
            }
        }
        Ok(())
    }

    /// A renamed inode: new ctime and, for a directory, its new `..`.
    fn reparent(&mut self, ino: u64, parent: u64, now: Timestamp) -> FsResult<()> {
        self.update(ino, |i| {
            i.ctime = now;
            if let Content::Dir(d) = &mut i.content {
                d.parent = parent;
            }
            Ok(())
        })
    }

    fn setattr(&mut self, cred: &Cred, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        self.load(ino)?;
        self.flush_data(ino)?;
        let mut inode = self.nodes[&ino].inode.clone();
        let now = Timestamp::now();
        if let Some(size) = set.size {
            match inode.kind {
                FileKind::File => {}
                FileKind::Dir => return err(libc::EISDIR),
                _ => return err(libc::EINVAL),
            }
            let old = inode.size;
            self.truncate_clone(&mut inode, size)?;
            if set.mtime.is_none() && size != old {
                inode.mtime = now;
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.unwrap_or(inode.uid);
            let gid = set.gid.unwrap_or(inode.gid);
            if set.mode.is_none()
                && inode.kind != FileKind::Dir
                && (uid != inode.uid || gid != inode.gid)
            {
                // What the kernel asks for on chown (`ATTR_KILL_SUID`/`SGID`) when it does not
                // send the mode itself.
                inode.perm &= !SUID;
                if inode.perm & XGRP != 0 {
                    inode.perm &= !SGID;
                }
            }
            inode.uid = uid;
            inode.gid = gid;
        }
        if let Some(mode) = set.mode {
            let mut perm = (mode & 0o7777) as u16;
            if cred.uid != 0 && !cred.in_group(inode.gid) {
                perm &= !SGID;
            }
            inode.perm = perm;
        }
        match set.atime {
            Some(TimeSet::Now) => inode.atime = now,
            Some(TimeSet::At(t)) => inode.atime = t,
            None => {}
        }
        match set.mtime {
            Some(TimeSet::Now) => inode.mtime = now,
            Some(TimeSet::At(t)) => inode.mtime = t,
            None => {}
        }
        inode.ctime = set.ctime.unwrap_or(now);
        if inode.nlink == 0 {
            // Unlinked but open: nothing names the record, keep the change in memory only.
            self.nodes.get_mut(&ino).expect("loaded").inode = inode;
        } else {
            self.store_inode(ino, inode)?;
        }
        Ok(self.attr_of(ino))
    }

    fn readdir(&mut self, ino: u64, offset: u64, limit: usize) -> FsResult<Vec<DirListEntry>> {
        let parent = match self.node(ino)?.inode.dir() {
            Some(d) => d.parent,
            None => return err(libc::ENOTDIR),
        };
        let mut out = Vec::new();
        if offset < 1 {
            out.push(DirListEntry {
                offset: 1,
                ino,
                kind: FileKind::Dir,
                name: b".".to_vec(),
            });
        }
        if offset < 2 {
            out.push(DirListEntry {
                offset: 2,
                ino: parent,
                kind: FileKind::Dir,
                name: b"..".to_vec(),
            });
        }
        let rest = self.dir_list(ino, offset, limit.saturating_sub(out.len()))?;
        out.extend(rest.into_iter().map(|(offset, e)| DirListEntry {
            offset,
            ino: e.ino,
            kind: e.kind,
            name: e.name,
        }));
        Ok(out)
    }

    fn open(&mut self, ino: u64) -> FsResult<u64> {
        let node = self.node(ino)?;
        node.open += 1;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, ino);
        Ok(fh)
    }

    fn release(&mut self, fh: u64) -> FsResult<()> {
        let Some(ino) = self.handles.remove(&fh) else {
            return err(libc::EBADF);
        };
        let flushed = self.flush_inode(ino);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.open -= 1;
            if node.open == 0 && node.inode.nlink == 0 {
                self.discard(ino);
                return Ok(());
            }
        }
        flushed
    }

    fn setxattr(&mut self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        check_xattr_name(name)?;
        if value.len() > XATTR_VALUE_MAX {
            return err(libc::E2BIG);
        }
        self.update(ino, |i| {
            let exists = i.xattrs.contains_key(name);
            if flags & libc::XATTR_CREATE != 0 && exists {
                return err(libc::EEXIST);
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return err(libc::ENODATA);
            }
            i.xattrs.insert(name.to_vec(), value.to_vec());
            if i.xattrs
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
                > XATTR_TOTAL_MAX
            {
                return err(libc::ENOSPC);
            }
            i.ctime = Timestamp::now();
            Ok(())
        })
    }

    fn removexattr(&mut self, ino: u64, name: &[u8]) -> FsResult<()> {
        check_xattr_name(name)?;
        self.update(ino, |i| {
            if i.xattrs.remove(name).is_none() {
                return err(libc::ENODATA);
            }
            i.ctime = Timestamp::now();
            Ok(())
        })
    }

    fn fallocate(&mut self, ino: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return err(libc::EOPNOTSUPP);
        }
        let node = self.node(ino)?;
        match node.inode.kind {
            FileKind::File => {}
            FileKind::Dir => return err(libc::EISDIR),
            _ => return err(libc::ENODEV),
        }
        let Some(end) = offset
            .checked_add(length)
            .filter(|e| *e <= crate::file::MAX_FILE_SIZE)
        else {
            return err(libc::EFBIG);
        };
        let grow = mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > node.inode.size;
        let now = Timestamp::now();
        self.update(ino, |i| {
            if grow {
                i.size = end;
                i.mtime = now;
            }
            i.ctime = now;
            Ok(())
        })
    }

    fn sync_all(&mut self) -> FsResult<()> {
        let dirty: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.meta_dirty || !n.dirty.is_empty())
            .map(|(i, _)| *i)
            .collect();
        let mut result = Ok(());
        for ino in dirty {
            if let Err(e) = self.flush_inode(ino) {
                result = result.and(Err(e));
            }
        }
        result
    }
}

fn check_xattr_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.len() > NAME_MAX {
        return err(libc::ERANGE);
    }
    let known = [&b"user."[..], b"trusted.", b"security."];
    if !known
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
    {
        return err(libc::EOPNOTSUPP);
    }
    Ok(())
}

/// A mounted-or-not filesystem volume: all POSIX logic on inode numbers. Thread-safe; operations
/// are serialized by one lock.
pub struct Volume {
    state: Mutex<State>,
    backend: Arc<dyn Backend>,
    read_only: bool,
}

impl Volume {
    /// Opens the volume stored in `backend`, formatting it first if it has no superblock.
    pub fn open_or_format(backend: Arc<dyn Backend>, cfg: VolumeConfig) -> FsResult<Volume> {
        let max_block = backend.max_block();
        let (sb, sb_version) = match backend.get_record(SUPER_LABEL)? {
            Some(rec) => (Superblock::decode(&rec.value)?, rec.version),
            None => {
                if cfg.read_only {
                    return err(libc::EROFS);
                }
                let chunk_size = cfg
                    .chunk_size
                    .unwrap_or(1 << 20)
                    .min(max_block as u32)
                    .max(512);
                let sb = Superblock {
                    chunk_size,
                    // An index entry takes at most 3 + 32 bytes; keep a margin for the header.
                    index_group: ((max_block - 64) / 40).max(1) as u32,
                    ino_reserved: ROOT_INO + 1,
                    created: Timestamp::now(),
                };
                let now = sb.created;
                let root = InodeRecord {
                    kind: FileKind::Dir,
                    perm: 0o755,
                    uid: cfg.root_uid,
                    gid: cfg.root_gid,
                    nlink: 2,
                    rdev: 0,
                    size: 0,
                    atime: now,
                    mtime: now,
                    ctime: now,
                    xattrs: BTreeMap::new(),
                    body: Body::Dir(DirBody {
                        parent: ROOT_INO,
                        count: 0,
                        layout: DirLayout::Inline(Vec::new()),
                    }),
                };
                let root_version = backend
                    .get_record(&inode_label(ROOT_INO))?
                    .map_or(0, |r| r.version);
                backend.put_record(&inode_label(ROOT_INO), root_version + 1, &root.encode())?;
                backend.put_record(SUPER_LABEL, 1, &sb.encode())?;
                (sb, 1)
            }
        };
        let state = State {
            chunks: ChunkCache::new(cfg.chunk_cache_bytes),
            backend,
            next_ino: sb.ino_reserved,
            sb,
            sb_version,
            nodes: HashMap::new(),
            dead: HashSet::new(),
            buckets: HashMap::new(),
            handles: HashMap::new(),
            next_fh: 1,
            dirty_bytes: 0,
            cfg: cfg.clone(),
        };
        let mut state = state;
        state.load(ROOT_INO)?;
        let backend = state.backend.clone();
        Ok(Volume {
            state: Mutex::new(state),
            backend,
            read_only: cfg.read_only,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks for a change, refusing it on a read-only volume.
    fn lock_rw(&self) -> FsResult<MutexGuard<'_, State>> {
        if self.read_only {
            return err(libc::EROFS);
        }
        Ok(self.lock())
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn chunk_size(&self) -> u32 {
        self.lock().sb.chunk_size
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        self.lock().lookup(parent, name)
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.lock().getattr(ino)
    }

    pub fn setattr(&self, cred: &Cred, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        self.lock_rw()?.setattr(cred, ino, set)
    }

    /// Creates a regular file, FIFO, socket or device; `mode` carries the file type bits.
    pub fn mknod(
        &self,
        cred: &Cred,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        let kind = kind_of_mode(mode)?;
        let content = match kind {
            FileKind::File => Content::File(ChunkMap::default()),
            FileKind::Dir | FileKind::Symlink => return err(libc::EINVAL),
            _ => Content::Special,
        };
        let rdev = if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
            rdev
        } else {
            0
        };
        self.lock_rw()?.make_node(
            cred,
            parent,
            name,
            NewInode {
                kind,
                perm: mode as u16,
                rdev,
                content,
            },
        )
    }

    pub fn mkdir(&self, cred: &Cred, parent: u64, name: &[u8], mode: u32) -> FsResult<Attr> {
        let content = Content::Dir(DirState::empty(parent));
        self.lock_rw()?.make_node(
            cred,
            parent,
            name,
            NewInode {
                kind: FileKind::Dir,
                perm: mode as u16,
                rdev: 0,
                content,
            },
        )
    }

    /// Creates and opens a regular file; returns its attributes and a file handle.
    pub fn create(
        &self,
        cred: &Cred,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> FsResult<(Attr, u64)> {
        let mut state = self.lock_rw()?;
        let content = Content::File(ChunkMap::default());
        let attr = state.make_node(
            cred,
            parent,
            name,
            NewInode {
                kind: FileKind::File,
                perm: mode as u16,
                rdev: 0,
                content,
            },
        )?;
        let fh = state.open(attr.ino)?;
        Ok((attr, fh))
    }

    pub fn symlink(&self, cred: &Cred, parent: u64, name: &[u8], target: &[u8]) -> FsResult<Attr> {
        if target.is_empty() {
            return err(libc::ENOENT);
        }
        if target.len() >= PATH_MAX {
            return err(libc::ENAMETOOLONG);
        }
        let content = Content::Symlink(target.to_vec());
        self.lock_rw()?.make_node(
            cred,
            parent,
            name,
            NewInode {
                kind: FileKind::Symlink,
                perm: 0o777,
                rdev: 0,
                content,
            },
        )
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        match &self.lock().node(ino)?.inode.content {
            Content::Symlink(t) => Ok(t.clone()),
            _ => err(libc::EINVAL),
        }
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.lock_rw()?.unlink(parent, name)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.lock_rw()?.rmdir(parent, name)
    }

    /// `renameat2`: `flags` may hold `RENAME_NOREPLACE` or `RENAME_EXCHANGE`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        self.lock_rw()?
            .rename(parent, name, newparent, newname, flags)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        self.lock_rw()?.link(ino, newparent, newname)
    }

    /// Opens a file; `flags` are the `open(2)` flags. Returns a handle for `release`.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let mut state = if writes { self.lock_rw()? } else { self.lock() };
        state.open(ino)
    }

    /// Closes a handle: stores the file if it was the last writer's, drops an unlinked file
    /// when its last handle goes.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        self.lock().release(fh)
    }

    /// Reads up to `size` bytes. Chunks that are not cached are fetched without holding the
    /// volume lock, so a slow fetch does not stall other operations.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (mut out, fetches) = self.lock().read_plan(ino, offset, size)?;
        for f in &fetches {
            let chunk = Arc::new(self.backend.get_chunk(&f.id)?);
            crate::file::fill(&mut out, f, &chunk);
            self.lock().chunks.insert(f.id, chunk);
        }
        Ok(out)
    }

    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        self.lock_rw()?.write(ino, offset, data)
    }

    /// `close` of one descriptor: returns once the file's chunks and then its inode are stored.
    pub fn flush(&self, ino: u64) -> FsResult<()> {
        self.lock().flush_inode(ino)
    }

    /// `fsync`/`fdatasync`: both store chunks and inode (the size is part of the data).
    pub fn fsync(&self, ino: u64, _datasync: bool) -> FsResult<()> {
        self.lock().flush_inode(ino)
    }

    /// Entries after `offset` (0 for the start), at most `limit`, `.` and `..` included.
    pub fn readdir(&self, ino: u64, offset: u64, limit: usize) -> FsResult<Vec<DirListEntry>> {
        self.lock().readdir(ino, offset, limit)
    }

    pub fn statfs(&self) -> StatFs {
        let state = self.lock();
        let bsize = state.sb.chunk_size;
        let blocks = (1u64 << 50) / bsize as u64;
        let used = state.next_ino;
        StatFs {
            blocks,
            bfree: blocks,
            bavail: blocks,
            files: 1 << 40,
            ffree: (1 << 40) - used,
            bsize,
            namelen: 255,
        }
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        self.lock_rw()?.setxattr(ino, name, value, flags)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        check_xattr_name(name)?;
        match self.lock().node(ino)?.inode.xattrs.get(name) {
            Some(v) => Ok(v.clone()),
            None => err(libc::ENODATA),
        }
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        Ok(self
            .lock()
            .node(ino)?
            .inode
            .xattrs
            .keys()
            .cloned()
            .collect())
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        self.lock_rw()?.removexattr(ino, name)
    }

    /// Mode 0 and `FALLOC_FL_KEEP_SIZE`; every other mode is `EOPNOTSUPP`.
    pub fn fallocate(&self, ino: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        self.lock_rw()?.fallocate(ino, offset, length, mode)
    }

    /// For a read-only volume: forgets cached inodes that are not open, and directory buckets,
    /// so later calls read the records the read-write mount stored since. A mount calls this
    /// periodically; files held open keep the version they were opened with. No effect on a
    /// read-write volume (it is the only writer, so its cache is the truth). Returns how many
    /// inodes were dropped.
    pub fn forget_cached(&self) -> usize {
        if !self.read_only {
            return 0;
        }
        let mut state = self.lock();
        let before = state.nodes.len();
        state.nodes.retain(|_, n| n.open > 0);
        state.buckets.clear();
        before - state.nodes.len()
    }

    /// Stores everything buffered.
    pub fn sync_all(&self) -> FsResult<()> {
        self.lock().sync_all()
    }
}
