//! `Volume`: the POSIX filesystem over a `Backend`, on inode numbers, with no FUSE types.
//!
//! Goals: every operation a FUSE adapter needs (lookup, attributes, the namespace operations,
//! file I/O, directories, extended attributes) with POSIX/Linux semantics, testable without a
//! mount, at the speed of memory: the mount is the single writer of its volume, so its state in
//! memory is the truth and the backend is its log (`layout`, `commit`).
//!
//! Durability (the promise the README states):
//! - Every operation applies to the in-memory state at once and joins the current batch.
//! - A commit makes a batch durable as a whole: its new data chunks (and, for a large batch, its
//!   journal segment) first, then one head record naming them and holding a small batch's
//!   operations itself. Commits happen on `fsync`/`fdatasync` of any file or directory,
//!   `sync_all` (unmount, `syncfs`), every `commit_interval` (the mount's timer), when the batch
//!   grows past `journal_ops` operations or `dirty_limit` bytes of data, and after every change
//!   with `sync` set.
//! - After a crash at any instant, opening the volume shows the state after some prefix of the
//!   operations, and that prefix holds every operation that completed before a commit returned
//!   (so every `fsync` that succeeded). A batch is cut under the volume lock, so it is a prefix.
//! - A failed commit returns its batch to the front of the next one: nothing applied is lost
//!   while the volume lives, and the `fsync` that asked fails with the backend's error.
//!
//! Permission checks are left to the kernel (`default_permissions`); the volume applies the rules
//! the kernel leaves to filesystems: setgid directories, clearing setgid on chmod by a non-member,
//! times and link counts.
//!
//! Non-goals: several writers on one volume, atime updates on read (behaves as `noatime`),
//! POSIX ACLs, reserving space in `fallocate`, a namespace larger than memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::backend::{Backend, ChunkId};
use crate::commit::Committer;
use crate::dir::Edit;
use crate::error::{err, FsResult};
use crate::file::{ChunkCache, Dirty};
pub use crate::gc::GcStats;
use crate::image::{ChunkMap, DirState, Image};
pub(crate) use crate::image::{Content, Inode};
use crate::layout::{DirEntry, FileKind, JournalOp, Timestamp, ROOT_INO};

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
    /// Buffered file data (over all files) beyond which a change commits the batch first.
    pub dirty_limit: usize,
    /// Journal operations in the batch beyond which a change commits it first.
    pub journal_ops: usize,
    pub chunk_cache_bytes: usize,
    /// Commit at least this often while there are changes (a background thread; `None`: only
    /// on the other triggers, as tests want).
    pub commit_interval: Option<Duration>,
    /// Commit after every change before it returns (`-o sync`).
    pub sync: bool,
    /// Journal segments after which a commit also writes a checkpoint.
    pub checkpoint_segments: usize,
    /// Bytes of small writes the files' maps may hold as patches (in memory, and in each
    /// checkpoint); beyond it, changed chunks are stored whole.
    pub patch_budget: usize,
    /// How far a sequential read fetches ahead of itself, in bytes (whole chunks, at least one).
    pub readahead_bytes: usize,
    /// Open this snapshot instead of the volume's current state (read-only; see `snapshot`).
    pub snapshot: Option<String>,
    /// Run the collector (`gc`) this often in the commit thread (`None`: only when asked,
    /// [`Volume::collect_garbage`], as tests want).
    pub gc_interval: Option<Duration>,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            read_only: false,
            chunk_size: None,
            root_uid: 0,
            root_gid: 0,
            dirty_limit: 64 << 20,
            journal_ops: 100_000,
            chunk_cache_bytes: 128 << 20,
            commit_interval: None,
            sync: false,
            checkpoint_segments: 64,
            patch_budget: 64 << 20,
            readahead_bytes: 8 << 20,
            snapshot: None,
            gc_interval: None,
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

pub(crate) struct Node {
    pub inode: Inode,
    /// Buffered chunk contents by chunk index, not yet in a batch. They shadow `flushing`.
    pub dirty: BTreeMap<u64, Dirty>,
    /// Chunk contents in the batch being committed; they shadow the chunk map until then.
    pub flushing: BTreeMap<u64, Arc<Vec<u8>>>,
    /// Open file handles.
    pub open: u32,
}

impl Node {
    fn new(inode: Inode) -> Self {
        Node {
            inode,
            dirty: BTreeMap::new(),
            flushing: BTreeMap::new(),
            open: 0,
        }
    }
}

pub(crate) struct State {
    pub backend: Arc<dyn Backend>,
    pub cfg: VolumeConfig,
    pub chunk_size: u32,
    pub next_ino: u64,
    /// Every live inode: the whole namespace is in memory.
    pub nodes: HashMap<u64, Node>,
    pub chunks: ChunkCache,
    handles: HashMap<u64, u64>,
    next_fh: u64,
    /// Bytes in `dirty` buffers, over all files.
    pub dirty_bytes: usize,
    /// Bytes of patches in the files' maps (an upper bound: see `State::seal`).
    pub patch_bytes: usize,
    /// The batch being gathered: operations in the order they happened...
    pub journal: Vec<JournalOp>,
    /// ...inodes whose attributes changed (their final attributes join the batch at the cut)...
    pub changed: BTreeSet<u64>,
    /// ...and files with dirty chunks.
    pub dirty_files: BTreeSet<u64>,
    /// Read-only: inodes kept at an older version because they were open when a newer head was
    /// taken up.
    pinned: BTreeSet<u64>,
    /// Chunks being fetched ahead of reads (a reader that needs one waits for it).
    pub(crate) inflight: HashSet<ChunkId>,
    /// The chunk index where each file's last read ended, to tell sequential reads.
    pub(crate) last_read: HashMap<u64, u64>,
    /// The sizes of all files, kept as they change: what `df` calls used, and what the quota
    /// bounds.
    pub(crate) file_bytes: u64,
    /// The volume's quota in bytes of files, if it has one (`quota` record).
    pub(crate) quota: Option<u64>,
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

impl State {
    pub(crate) fn node(&mut self, ino: u64) -> FsResult<&mut Node> {
        match self.nodes.get_mut(&ino) {
            Some(n) => Ok(n),
            None => err(libc::ENOENT),
        }
    }

    /// Makes `inode` the state of `ino`; its attributes join the batch.
    pub(crate) fn store_inode(&mut self, ino: u64, inode: Inode) {
        match self.nodes.get_mut(&ino) {
            Some(n) => n.inode = inode,
            None => {
                self.nodes.insert(ino, Node::new(inode));
            }
        }
        self.changed.insert(ino);
    }

    /// Changes one inode through a copy: a failing `f` changes nothing.
    pub(crate) fn update(
        &mut self,
        ino: u64,
        f: impl FnOnce(&mut Inode) -> FsResult<()>,
    ) -> FsResult<()> {
        let mut inode = self.node(ino)?.inode.clone();
        f(&mut inode)?;
        self.store_inode(ino, inode);
        Ok(())
    }

    fn alloc_ino(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    /// Forgets an inode that no name and no handle refers to any more.
    fn discard(&mut self, ino: u64) {
        if let Some(node) = self.nodes.remove(&ino) {
            self.dirty_bytes -= node.dirty.values().map(|d| d.data.len()).sum::<usize>();
            if node.inode.kind == FileKind::File {
                self.file_bytes = self.file_bytes.saturating_sub(node.inode.size);
            }
        }
        self.changed.remove(&ino);
        self.dirty_files.remove(&ino);
        self.journal.push(JournalOp::Free { ino });
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
        self.node(ino)?;
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
        let ino = self.alloc_ino();
        self.store_inode(ino, inode);
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
        } else {
            // Unlinked but open: its attributes stay in the journal until the last close frees it.
            self.changed.insert(ino);
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
        let now = Timestamp::now();
        if let Some(size) = set.size {
            match self.node(ino)?.inode.kind {
                FileKind::File => {}
                FileKind::Dir => return err(libc::EISDIR),
                _ => return err(libc::EINVAL),
            }
            // The only step that can fail (reading the new last chunk), so it goes first.
            let old = self.truncate(ino, size)?;
            if set.mtime.is_none() && size != old {
                self.nodes.get_mut(&ino).expect("checked").inode.mtime = now;
            }
        }
        let mut inode = self.node(ino)?.inode.clone();
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
        self.store_inode(ino, inode);
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
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.open -= 1;
            if node.open == 0 && node.inode.nlink == 0 {
                self.discard(ino);
            }
        }
        Ok(())
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

    /// `fallocate`: allocation (space is not reserved: dBQS stores what is written), punching
    /// a hole (with `KEEP_SIZE`, as Linux requires) and zeroing a range.
    fn fallocate(&mut self, ino: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let (keep, punch, zero) = (
            libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_PUNCH_HOLE,
            libc::FALLOC_FL_ZERO_RANGE,
        );
        let clears = mode & (punch | zero) != 0;
        if mode & !(keep | punch | zero) != 0
            || (mode & punch != 0 && (mode & keep == 0 || mode & zero != 0))
        {
            return err(libc::EOPNOTSUPP);
        }
        let node = self.node(ino)?;
        match node.inode.kind {
            FileKind::File => {}
            FileKind::Dir => return err(libc::EISDIR),
            _ => return err(libc::ENODEV),
        }
        if clears && length == 0 {
            return err(libc::EINVAL);
        }
        let Some(end) = offset
            .checked_add(length)
            .filter(|e| *e <= crate::file::MAX_FILE_SIZE)
        else {
            return err(libc::EFBIG);
        };
        let size = node.inode.size;
        let grow = mode & keep == 0 && end > size;
        if grow {
            self.check_quota(end - size)?;
        }
        if clears {
            self.zero_range(ino, offset, end.min(size))?;
        }
        let now = Timestamp::now();
        if grow {
            self.file_bytes += end - size;
        }
        self.update(ino, |i| {
            if grow {
                i.size = end;
            }
            if grow || clears {
                i.mtime = now;
            }
            i.ctime = now;
            Ok(())
        })
    }

    /// Whether the batch is large enough that the change that grew it must commit it first.
    pub(crate) fn batch_full(&self) -> bool {
        self.journal.len() + self.changed.len() >= self.cfg.journal_ops
            || self.dirty_bytes >= self.cfg.dirty_limit
    }

    pub(crate) fn batch_over_hard_limit(&self) -> bool {
        self.journal.len() + self.changed.len() >= 2 * self.cfg.journal_ops
            || self.dirty_bytes >= 2 * self.cfg.dirty_limit
    }

    pub(crate) fn batch_empty(&self) -> bool {
        self.journal.is_empty() && self.changed.is_empty() && self.dirty_files.is_empty()
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

/// What a volume shares with its commit timer.
struct Shared {
    state: Mutex<State>,
    committer: Mutex<Committer>,
    backend: Arc<dyn Backend>,
    read_only: bool,
    /// Set when the volume is dropped; the timer waits on the condvar.
    stop: Mutex<bool>,
    wake: Condvar,
    /// Signalled (with `state`) when a fetch ahead of reads ends.
    fetched: Condvar,
    /// Bytes applications wrote (`write` calls), for the write amplification in the log.
    written: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit(&self, checkpoint: bool) -> FsResult<()> {
        if self.read_only {
            return Ok(());
        }
        let mut c = self.committer();
        c.commit(self.backend.as_ref(), &self.state, checkpoint)
    }

    fn committer(&self) -> MutexGuard<'_, Committer> {
        self.committer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One collector pass over what is committed: finds what the volume no longer reaches,
    /// then releases it a batch at a time, letting commits in between. `progress` sees the
    /// figures after each batch.
    fn collect_garbage(&self, progress: &mut dyn FnMut(&GcStats)) -> FsResult<GcStats> {
        let b = self.backend.as_ref();
        let mut pass = || -> FsResult<()> {
            self.committer().gc_collect(b)?;
            loop {
                let mut c = self.committer();
                let n = c.gc_release(b)?;
                let stats = c.gc.as_ref().map(|g| g.stats.clone()).unwrap_or_default();
                drop(c);
                progress(&stats);
                if n == 0 {
                    let mut c = self.committer();
                    c.gc_forget_deleted(b)?;
                    return c.gc_trim_head(b);
                }
            }
        };
        let result = pass();
        let mut c = self.committer();
        let Some(gc) = c.gc.as_mut() else {
            return Ok(GcStats::default());
        };
        gc.stats.last_error = result.as_ref().err().map(|e| e.to_string());
        let stats = gc.stats.clone();
        result.map(|_| stats)
    }
}

/// How often a writer reads its volume's quota record again.
const QUOTA_EVERY: Duration = Duration::from_secs(5);

/// Commits every `interval` while the volume has changes, and at once when a change finds the
/// batch full, until the volume is dropped.
fn commit_timer(shared: Weak<Shared>, interval: Duration, gc_every: Option<Duration>) {
    let mut failed = false;
    let mut last_gc = std::time::Instant::now();
    let mut last_quota = std::time::Instant::now();
    let mut released = 0;
    loop {
        let Some(s) = shared.upgrade() else { return };
        // After a failure, wait: the next try would fail at once (the backend fails fast).
        let full = !failed && s.lock().batch_full();
        {
            let stop = s.stop.lock().unwrap_or_else(|p| p.into_inner());
            let stop = if full {
                stop
            } else if failed {
                // The whole interval: writers' wake-ups do not cut it short.
                let deadline = std::time::Instant::now() + interval;
                let mut stop = stop;
                loop {
                    let now = std::time::Instant::now();
                    if *stop || now >= deadline {
                        break stop;
                    }
                    stop = s
                        .wake
                        .wait_timeout(stop, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            } else {
                s.wake
                    .wait_timeout(stop, interval)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            };
            if *stop {
                return;
            }
        }
        failed = false;
        // Out of space, the collector runs all the same: what it frees lets the batch through.
        let mut no_space = false;
        if !s.lock().batch_empty() {
            if let Err(e) = s.commit(false) {
                tracing::warn!(error = %e, "periodic commit failed; the batch is kept for the next");
                failed = true;
                no_space = e.errno() == libc::ENOSPC;
            }
        }
        if last_quota.elapsed() >= QUOTA_EVERY {
            last_quota = std::time::Instant::now();
            match crate::quota::read(s.backend.as_ref()) {
                Ok(q) => s.lock().quota = q,
                Err(e) => tracing::debug!(error = %e, "reading the volume's quota"),
            }
        }
        if let Some(every) = gc_every {
            if (!failed || no_space) && last_gc.elapsed() >= every {
                last_gc = std::time::Instant::now();
                match s.collect_garbage(&mut |_| {}) {
                    Ok(st) if st.released > released => {
                        tracing::debug!(
                            released = st.released - released,
                            pending = st.pending,
                            "collector released chunks"
                        );
                        released = st.released;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "collector pass failed; it runs again later")
                    }
                }
            }
        }
    }
}

/// A mounted-or-not filesystem volume: all POSIX logic on inode numbers. Thread-safe; operations
/// are serialized by one lock, which is never held across a backend call except to read a chunk
/// that a partial write or a truncation must modify.
pub struct Volume {
    shared: Arc<Shared>,
    timer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Volume {
    fn drop(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
    }
}

impl Volume {
    /// Opens the volume stored in `backend` (its last checkpoint and the journal after it),
    /// formatting it first if it has no head.
    pub fn open_or_format(backend: Arc<dyn Backend>, mut cfg: VolumeConfig) -> FsResult<Volume> {
        cfg.read_only |= cfg.snapshot.is_some();
        // The writer's backend remembers what it puts, for the collector.
        let (backend, puts) = if cfg.read_only {
            (backend, None)
        } else {
            let (b, puts) = crate::gc::Recording::wrap(backend);
            (b, Some(puts))
        };
        let committer = Committer::open(backend.as_ref(), &cfg, puts)?;
        let quota = if cfg.snapshot.is_some() {
            None
        } else {
            crate::quota::read(backend.as_ref())?
        };
        let mut state = State {
            chunks: ChunkCache::new(cfg.chunk_cache_bytes),
            backend: backend.clone(),
            chunk_size: committer.head.chunk_size,
            next_ino: committer.head.next_ino,
            nodes: HashMap::new(),
            handles: HashMap::new(),
            next_fh: 1,
            dirty_bytes: 0,
            patch_bytes: 0,
            journal: Vec::new(),
            changed: BTreeSet::new(),
            dirty_files: BTreeSet::new(),
            pinned: BTreeSet::new(),
            inflight: HashSet::new(),
            last_read: HashMap::new(),
            file_bytes: 0,
            quota: None,
            cfg: cfg.clone(),
        };
        state.take_up(&committer.image);
        state.quota = quota;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            committer: Mutex::new(committer),
            backend,
            read_only: cfg.read_only,
            stop: Mutex::new(false),
            wake: Condvar::new(),
            fetched: Condvar::new(),
            written: Default::default(),
        });
        let timer = match cfg.commit_interval {
            Some(interval) if !cfg.read_only => {
                let weak = Arc::downgrade(&shared);
                Some(
                    std::thread::Builder::new()
                        .name("dbqsfs-commit".into())
                        .spawn(move || commit_timer(weak, interval, cfg.gc_interval))
                        .map_err(|_| crate::error::FsError::Posix(libc::EAGAIN))?,
                )
            }
            _ => None,
        };
        Ok(Volume { shared, timer })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// Locks for a change, refusing it on a read-only volume.
    fn lock_rw(&self) -> FsResult<MutexGuard<'_, State>> {
        if self.shared.read_only {
            return err(libc::EROFS);
        }
        Ok(self.lock())
    }

    /// Locks for a change after making room: a batch past twice its limits (commits have been
    /// failing) must commit before anything else joins it, and the change fails, changing
    /// nothing, if that commit fails. This bounds the memory a batch takes.
    fn lock_change(&self) -> FsResult<MutexGuard<'_, State>> {
        let over = self.lock_rw()?.batch_over_hard_limit();
        if over {
            self.shared.commit(false)?;
        }
        self.lock_rw()
    }

    /// After a change (the lock released): commits when the batch is full (in the commit
    /// thread, if there is one), or always with `sync`. With `sync` a failed commit fails the call (the change stays applied, to be
    /// committed by the next commit); otherwise it is logged and the next `fsync` reports it.
    fn changed<T>(&self, r: FsResult<T>) -> FsResult<T> {
        let v = r?;
        let (sync, full) = {
            let s = self.lock();
            (s.cfg.sync, s.batch_full())
        };
        if sync {
            self.shared.commit(false)?;
        } else if full && self.timer.is_some() {
            // The commit thread takes it; writers go on until twice the limits (`lock_change`).
            self.shared.wake.notify_all();
        } else if full {
            if let Err(e) = self.shared.commit(false) {
                tracing::warn!(error = %e, "commit of a full batch failed; it is kept for the next");
            }
        }
        Ok(v)
    }

    pub fn is_read_only(&self) -> bool {
        self.shared.read_only
    }

    pub fn chunk_size(&self) -> u32 {
        self.lock().chunk_size
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        self.lock().lookup(parent, name)
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.lock().getattr(ino)
    }

    pub fn setattr(&self, cred: &Cred, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        let r = self.lock_change()?.setattr(cred, ino, set);
        self.changed(r)
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
        let r = self.lock_change()?.make_node(
            cred,
            parent,
            name,
            NewInode {
                kind,
                perm: mode as u16,
                rdev,
                content,
            },
        );
        self.changed(r)
    }

    pub fn mkdir(&self, cred: &Cred, parent: u64, name: &[u8], mode: u32) -> FsResult<Attr> {
        let content = Content::Dir(DirState::empty(parent));
        let r = self.lock_change()?.make_node(
            cred,
            parent,
            name,
            NewInode {
                kind: FileKind::Dir,
                perm: mode as u16,
                rdev: 0,
                content,
            },
        );
        self.changed(r)
    }

    /// Creates and opens a regular file; returns its attributes and a file handle.
    pub fn create(
        &self,
        cred: &Cred,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> FsResult<(Attr, u64)> {
        let r = (|| {
            let mut state = self.lock_change()?;
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
        })();
        self.changed(r)
    }

    pub fn symlink(&self, cred: &Cred, parent: u64, name: &[u8], target: &[u8]) -> FsResult<Attr> {
        if target.is_empty() {
            return err(libc::ENOENT);
        }
        if target.len() >= PATH_MAX {
            return err(libc::ENAMETOOLONG);
        }
        let content = Content::Symlink(target.to_vec());
        let r = self.lock_change()?.make_node(
            cred,
            parent,
            name,
            NewInode {
                kind: FileKind::Symlink,
                perm: 0o777,
                rdev: 0,
                content,
            },
        );
        self.changed(r)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        match &self.lock().node(ino)?.inode.content {
            Content::Symlink(t) => Ok(t.clone()),
            _ => err(libc::EINVAL),
        }
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let r = self.lock_change()?.unlink(parent, name);
        self.changed(r)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        let r = self.lock_change()?.rmdir(parent, name);
        self.changed(r)
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
        let r = self
            .lock_change()?
            .rename(parent, name, newparent, newname, flags);
        self.changed(r)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        let r = self.lock_change()?.link(ino, newparent, newname);
        self.changed(r)
    }

    /// Opens a file; `flags` are the `open(2)` flags. Returns a handle for `release`.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let mut state = if writes { self.lock_rw()? } else { self.lock() };
        state.open(ino)
    }

    /// Closes a handle; drops an unlinked file when its last handle goes. Makes nothing durable
    /// by itself (see `fsync`).
    pub fn release(&self, fh: u64) -> FsResult<()> {
        self.lock().release(fh)
    }

    /// Reads up to `size` bytes. Chunks that are not cached are fetched without holding the
    /// volume lock, so a slow fetch does not stall other operations; a sequential read also
    /// starts fetching the chunks after it (`readahead_bytes`), each in a thread of its own.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (mut out, fetches, ahead) = {
            let mut st = self.lock();
            let (out, fetches) = st.read_plan(ino, offset, size)?;
            (out, fetches, st.read_ahead(ino, offset, size))
        };
        for id in ahead {
            self.fetch_ahead(id);
        }
        for f in &fetches {
            let chunk = self.fetch(&f.id)?;
            crate::file::fill(&mut out, f, &chunk);
        }
        Ok(out)
    }

    /// A chunk for a read: from the cache, from a fetch ahead already under way, or fetched.
    fn fetch(&self, id: &ChunkId) -> FsResult<Arc<Vec<u8>>> {
        let mut st = self.lock();
        loop {
            if let Some(c) = st.chunks.peek(id) {
                return Ok(c);
            }
            if !st.inflight.contains(id) {
                break;
            }
            st = self
                .shared
                .fetched
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
        drop(st);
        let chunk = Arc::new(self.shared.backend.get_chunk(id)?);
        self.lock().chunks.insert(*id, chunk.clone());
        Ok(chunk)
    }

    /// Fetches a chunk into the cache in the background (`id` is already in `inflight`).
    fn fetch_ahead(&self, id: ChunkId) {
        let weak = Arc::downgrade(&self.shared);
        let spawned = std::thread::Builder::new()
            .name("dbqsfs-readahead".into())
            .spawn(move || {
                let Some(s) = weak.upgrade() else { return };
                let r = s.backend.get_chunk(&id);
                let mut st = s.lock();
                st.inflight.remove(&id);
                match r {
                    Ok(data) => st.chunks.insert(id, Arc::new(data)),
                    Err(e) => tracing::debug!(error = %e, "read-ahead fetch failed"),
                }
                drop(st);
                s.fetched.notify_all();
            });
        if spawned.is_err() {
            self.lock().inflight.remove(&id);
            self.shared.fetched.notify_all();
        }
    }

    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        let r = self.lock_change()?.write(ino, offset, data);
        let n = self.changed(r)?;
        self.shared
            .written
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }

    /// Bytes written by `write` calls since the volume was opened.
    pub fn bytes_written(&self) -> u64 {
        self.shared
            .written
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `close` of one descriptor: nothing to do; the data is in the batch, which the next
    /// commit makes durable.
    pub fn flush(&self, ino: u64) -> FsResult<()> {
        self.lock().node(ino).map(|_| ())
    }

    /// `fsync`/`fdatasync` of a file or directory: commits everything applied so far (which
    /// includes every change the caller could have seen), as ext4's journal does.
    pub fn fsync(&self, _ino: u64, _datasync: bool) -> FsResult<()> {
        self.shared.commit(false)
    }

    /// Entries after `offset` (0 for the start), at most `limit`, `.` and `..` included.
    pub fn readdir(&self, ino: u64, offset: u64, limit: usize) -> FsResult<Vec<DirListEntry>> {
        self.lock().readdir(ino, offset, limit)
    }

    /// `df`'s view: used = the bytes of the volume's files (their sizes), available = what the
    /// backend says it can still take ([`Backend::capacity`]; without it, a notional 1 PiB),
    /// within the volume's quota if it has one; size = the two together. The block size is the
    /// chunk size.
    pub fn statfs(&self) -> StatFs {
        let state = self.lock();
        let bsize = state.chunk_size.max(1);
        let used_bytes = state.file_bytes;
        let inodes = state.nodes.len() as u64;
        let mut available = state.backend.capacity().map_or(1u64 << 50, |c| c.available);
        if let Some(q) = state.quota {
            available = available.min(q.saturating_sub(used_bytes));
        }
        let b = bsize as u64;
        let bavail = available / b;
        StatFs {
            blocks: used_bytes.div_ceil(b) + bavail,
            bfree: bavail,
            bavail,
            files: 1 << 40,
            ffree: (1 << 40) - inodes,
            bsize,
            namelen: 255,
        }
    }

    /// The sizes of the volume's files, each inode once (what `df` shows as used).
    pub fn used_bytes(&self) -> u64 {
        self.lock().file_bytes
    }

    /// The volume's quota (bytes of files), as last read from its `quota` record.
    pub fn quota(&self) -> Option<u64> {
        self.lock().quota
    }

    /// Reads the volume's quota record again (a mount does so every few seconds).
    pub fn refresh_quota(&self) -> FsResult<Option<u64>> {
        let q = crate::quota::read(self.shared.backend.as_ref())?;
        self.lock().quota = q;
        Ok(q)
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        let r = self.lock_change()?.setxattr(ino, name, value, flags);
        self.changed(r)
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
        let r = self.lock_change()?.removexattr(ino, name);
        self.changed(r)
    }

    /// Mode 0 and `FALLOC_FL_KEEP_SIZE`; every other mode is `EOPNOTSUPP`.
    pub fn fallocate(&self, ino: u64, offset: u64, length: u64, mode: i32) -> FsResult<()> {
        let r = self.lock_change()?.fallocate(ino, offset, length, mode);
        self.changed(r)
    }

    /// For a read-only volume: takes up what the writer committed since (files held open keep
    /// the version they were opened with). A mount calls this periodically. Returns whether
    /// there was anything new; no effect on a read-write volume.
    pub fn refresh(&self) -> FsResult<bool> {
        if !self.shared.read_only {
            return Ok(false);
        }
        let mut c = self
            .shared
            .committer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let new = c.follow(self.shared.backend.as_ref())?;
        let mut state = self.lock();
        if !new
            && state
                .pinned
                .iter()
                .all(|i| state.nodes.get(i).is_some_and(|n| n.open > 0))
        {
            return Ok(false);
        }
        state.next_ino = c.head.next_ino;
        state.take_up(&c.image);
        Ok(new)
    }

    /// Commits everything applied so far and writes a checkpoint (unmount, `syncfs`).
    pub fn sync_all(&self) -> FsResult<()> {
        self.shared.commit(true)
    }

    /// Commits what is applied, then runs a collector pass to its end (`dbqsfs gc`, tests):
    /// releases every chunk neither the volume nor a snapshot reaches. `progress` sees the
    /// figures after each batch. A read-only volume collects nothing.
    pub fn collect_garbage(&self, progress: &mut dyn FnMut(&GcStats)) -> FsResult<GcStats> {
        if self.shared.read_only {
            return Ok(GcStats::default());
        }
        // The pass works from what is committed: a commit that failed (the nodes refuse data
        // for lack of space) must not stop it, since freeing space is what lets it go through.
        if let Err(e) = self.shared.commit(false) {
            tracing::warn!(error = %e, "commit before the collector's pass failed; the pass goes on");
        }
        self.shared.collect_garbage(progress)
    }

    #[cfg(test)]
    pub(crate) fn committer_for_tests(&self) -> MutexGuard<'_, Committer> {
        self.shared.committer()
    }

    /// The collector's figures so far (empty for a read-only volume).
    pub fn gc_stats(&self) -> GcStats {
        self.shared
            .committer()
            .gc
            .as_ref()
            .map(|g| g.stats.clone())
            .unwrap_or_default()
    }
}

impl State {
    /// Makes the image's inodes the live ones. Inodes held open keep their state; an inode with
    /// no links and no handle (left by a crash while it was open) is dropped and, on a writable
    /// volume, freed in the next batch.
    fn take_up(&mut self, image: &Image) {
        let old = std::mem::take(&mut self.nodes);
        self.pinned.clear();
        for (ino, inode) in &image.inodes {
            if inode.nlink == 0 {
                if !self.cfg.read_only {
                    self.journal.push(JournalOp::Free { ino: *ino });
                }
                continue;
            }
            self.nodes.insert(*ino, Node::new(inode.clone()));
        }
        for (ino, n) in old {
            if n.open > 0 {
                self.nodes.insert(ino, n);
                self.pinned.insert(ino);
            }
        }
        self.next_ino = self
            .next_ino
            .max(image.inodes.keys().last().map_or(0, |i| i + 1));
        self.patch_bytes = self.count_patch_bytes();
        self.file_bytes = self
            .nodes
            .values()
            .filter(|n| n.inode.kind == FileKind::File)
            .map(|n| n.inode.size)
            .sum();
    }

    /// Fails with `EDQUOT` if the files growing by `growth` bytes would pass the quota.
    pub(crate) fn check_quota(&self, growth: u64) -> FsResult<()> {
        match self.quota {
            Some(q) if growth > 0 && self.file_bytes.saturating_add(growth) > q => {
                err(libc::EDQUOT)
            }
            _ => Ok(()),
        }
    }

    /// Bytes of patches over all files' maps.
    pub(crate) fn count_patch_bytes(&self) -> usize {
        self.nodes
            .values()
            .map(|n| match &n.inode.content {
                Content::File(m) => m.chunks.values().map(|p| p.patch_bytes()).sum(),
                _ => 0,
            })
            .sum()
    }
}
