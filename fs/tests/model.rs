//! Model-based test of `Volume`: seeded random sequences of POSIX operations, applied both to a
//! `Volume` over `MemBackend` and to a small in-memory reference model written independently of
//! the volume; every result (data or errno) must agree, and the whole tree is compared at
//! intervals and after re-opening a fresh `Volume` over the same backend.
//!
//! Each seed also picks the volume's shape (chunk size, block size, directory inline and bucket
//! limits, write-back limit) so that small trees still exercise index chunks, hashed directories,
//! bucket splits and threshold flushes.
//!
//! The crash test (`a_crash_at_any_point_leaves_a_prefix_holding_every_fsync`) runs short random
//! sequences with fsyncs while the backend stops storing writes after a random number of them
//! (half the cases with failed writes stored all the same, as when an acknowledgment is lost;
//! half recover later, so a batch that failed must be committed by a later fsync), then drops the volume without a commit and opens the backend again: the tree must equal the
//! model after some prefix of the operations that contains every operation completed before an
//! fsync that succeeded (the CrashMonkey/ALICE property).
//!
//! A failing seed is printed with the operations that led to it; replay just that seed with
//! `DBQSFS_FS_SEED=N cargo test -p dbqsfs-fs --test model`. `DBQSFS_FS_SEEDS` and
//! `DBQSFS_FS_OPS` change how many seeds and operations run; `DBQSFS_FS_CRASH_CASES` how many
//! crash cases (10,000 by default).

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use dbqsfs_fs::crypt::{Encrypted, VolumeKey};
use dbqsfs_fs::layout::ROOT_INO;
use dbqsfs_fs::{
    Backend, Cred, Failure, FileKind, FsResult, MemBackend, SetAttr, Volume, VolumeConfig,
};

// ---------------------------------------------------------------- deterministic randomness

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---------------------------------------------------------------- the reference model

#[derive(Clone, Debug)]
enum MKind {
    File(Vec<u8>),
    Dir(BTreeMap<String, usize>),
    Symlink(String),
    Fifo,
}

#[derive(Clone, Debug)]
struct MNode {
    kind: MKind,
    perm: u32,
    links: u32,
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// A plain tree of nodes; node 0 is the root. Node ids are never reused.
#[derive(Clone, Debug)]
struct Model {
    nodes: Vec<MNode>,
    parent: HashMap<usize, usize>,
}

type R<T> = Result<T, i32>;

impl Model {
    fn new() -> Self {
        let root = MNode {
            kind: MKind::Dir(BTreeMap::new()),
            perm: 0o755,
            links: 1,
            xattrs: BTreeMap::new(),
        };
        Model {
            nodes: vec![root],
            parent: HashMap::new(),
        }
    }

    fn dir(&self, id: usize) -> Option<&BTreeMap<String, usize>> {
        match &self.nodes[id].kind {
            MKind::Dir(m) => Some(m),
            _ => None,
        }
    }

    fn dir_mut(&mut self, id: usize) -> &mut BTreeMap<String, usize> {
        match &mut self.nodes[id].kind {
            MKind::Dir(m) => m,
            _ => panic!("not a directory"),
        }
    }

    fn is_dir(&self, id: usize) -> bool {
        self.dir(id).is_some()
    }

    /// The directory holding the last component, and that component.
    fn resolve<'p>(&self, path: &'p [String]) -> R<(usize, &'p str)> {
        let (last, init) = path.split_last().expect("non-empty path");
        let mut cur = 0;
        for c in init {
            let d = self.dir(cur).ok_or(libc::ENOTDIR)?;
            cur = *d.get(c).ok_or(libc::ENOENT)?;
        }
        if !self.is_dir(cur) {
            return Err(libc::ENOTDIR);
        }
        Ok((cur, last))
    }

    fn target(&self, path: &[String]) -> R<usize> {
        let (p, n) = self.resolve(path)?;
        self.dir(p).unwrap().get(n).copied().ok_or(libc::ENOENT)
    }

    fn add(&mut self, path: &[String], kind: MKind, perm: u32) -> R<()> {
        let (p, n) = self.resolve(path)?;
        if self.dir(p).unwrap().contains_key(n) {
            return Err(libc::EEXIST);
        }
        let id = self.nodes.len();
        let is_dir = matches!(kind, MKind::Dir(_));
        // A directory made inside a setgid directory is setgid too.
        let perm = if is_dir && self.nodes[p].perm & 0o2000 != 0 {
            perm | 0o2000
        } else {
            perm
        };
        self.nodes.push(MNode {
            kind,
            perm,
            links: 1,
            xattrs: BTreeMap::new(),
        });
        let n = n.to_string();
        self.dir_mut(p).insert(n, id);
        if is_dir {
            self.parent.insert(id, p);
        }
        Ok(())
    }

    fn file_mut(&mut self, id: usize) -> R<&mut Vec<u8>> {
        match &mut self.nodes[id].kind {
            MKind::File(d) => Ok(d),
            MKind::Dir(_) => Err(libc::EISDIR),
            _ => Err(libc::EINVAL),
        }
    }

    fn write(&mut self, path: &[String], off: usize, data: &[u8]) -> R<()> {
        let id = self.target(path)?;
        let f = self.file_mut(id)?;
        if f.len() < off + data.len() {
            f.resize(off + data.len(), 0);
        }
        f[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read(&mut self, path: &[String], off: usize, len: usize) -> R<Vec<u8>> {
        let id = self.target(path)?;
        let f = self.file_mut(id)?;
        let end = (off + len).min(f.len());
        Ok(if off >= end {
            Vec::new()
        } else {
            f[off..end].to_vec()
        })
    }

    fn truncate(&mut self, path: &[String], size: usize) -> R<()> {
        let id = self.target(path)?;
        self.file_mut(id)?.resize(size, 0);
        Ok(())
    }

    /// `kind`: 0 allocate, 1 punch a hole (size kept), 2 zero a range, 3 zero a range with the
    /// size kept.
    fn fallocate(&mut self, path: &[String], off: usize, len: usize, kind: u8) -> R<()> {
        let id = self.target(path)?;
        match &mut self.nodes[id].kind {
            MKind::File(f) => {
                if kind != 0 && len == 0 {
                    return Err(libc::EINVAL);
                }
                if kind != 0 {
                    let end = (off + len).min(f.len());
                    if off < end {
                        f[off..end].fill(0);
                    }
                }
                if (kind == 0 || kind == 2) && f.len() < off + len {
                    f.resize(off + len, 0);
                }
                Ok(())
            }
            MKind::Dir(_) => Err(libc::EISDIR),
            _ => Err(libc::ENODEV),
        }
    }

    fn unlink(&mut self, path: &[String]) -> R<()> {
        let (p, n) = self.resolve(path)?;
        let id = *self.dir(p).unwrap().get(n).ok_or(libc::ENOENT)?;
        if self.is_dir(id) {
            return Err(libc::EISDIR);
        }
        self.dir_mut(p).remove(n);
        self.nodes[id].links -= 1;
        Ok(())
    }

    fn rmdir(&mut self, path: &[String]) -> R<()> {
        let (p, n) = self.resolve(path)?;
        let id = *self.dir(p).unwrap().get(n).ok_or(libc::ENOENT)?;
        let d = self.dir(id).ok_or(libc::ENOTDIR)?;
        if !d.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.dir_mut(p).remove(n);
        Ok(())
    }

    fn link(&mut self, from: &[String], to: &[String]) -> R<()> {
        let src = self.target(from)?;
        let (p, n) = self.resolve(to)?;
        if self.dir(p).unwrap().contains_key(n) {
            return Err(libc::EEXIST);
        }
        if self.is_dir(src) {
            return Err(libc::EPERM);
        }
        let n = n.to_string();
        self.dir_mut(p).insert(n, src);
        self.nodes[src].links += 1;
        Ok(())
    }

    /// Whether `a` is `d` or an ancestor of `d`.
    fn is_ancestor(&self, a: usize, mut d: usize) -> bool {
        loop {
            if a == d {
                return true;
            }
            match self.parent.get(&d) {
                Some(p) => d = *p,
                None => return false,
            }
        }
    }

    fn rename(&mut self, from: &[String], to: &[String], flags: u32) -> R<()> {
        let (sp, sn) = self.resolve(from)?;
        let (dp, dn) = self.resolve(to)?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let src = *self.dir(sp).unwrap().get(sn).ok_or(libc::ENOENT)?;
        let dst = self.dir(dp).unwrap().get(dn).copied();
        if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(libc::EEXIST);
        }
        if exchange && dst.is_none() {
            return Err(libc::ENOENT);
        }
        if dst == Some(src) {
            return Ok(());
        }
        let (sdir, ddir) = (self.is_dir(src), dst.is_some_and(|d| self.is_dir(d)));
        if sdir && sp != dp && self.is_ancestor(src, dp) {
            return Err(libc::EINVAL);
        }
        if let Some(d) = dst {
            if ddir && sp != dp && self.is_ancestor(d, sp) {
                return Err(if exchange {
                    libc::EINVAL
                } else {
                    libc::ENOTEMPTY
                });
            }
            if !exchange {
                if sdir && !ddir {
                    return Err(libc::ENOTDIR);
                }
                if !sdir && ddir {
                    return Err(libc::EISDIR);
                }
                if ddir && !self.dir(d).unwrap().is_empty() {
                    return Err(libc::ENOTEMPTY);
                }
            }
        }
        let (sn, dn) = (sn.to_string(), dn.to_string());
        if exchange {
            let d = dst.unwrap();
            self.dir_mut(sp).insert(sn, d);
            self.dir_mut(dp).insert(dn, src);
            if self.is_dir(d) {
                self.parent.insert(d, sp);
            }
        } else {
            self.dir_mut(sp).remove(&sn);
            self.dir_mut(dp).insert(dn, src);
            if let Some(d) = dst {
                self.nodes[d].links -= 1;
            }
        }
        if sdir {
            self.parent.insert(src, dp);
        }
        Ok(())
    }

    fn chmod(&mut self, path: &[String], perm: u32) -> R<()> {
        let id = self.target(path)?;
        self.nodes[id].perm = perm;
        Ok(())
    }

    fn setxattr(&mut self, path: &[String], name: &str, value: &[u8], flags: i32) -> R<()> {
        let id = self.target(path)?;
        let x = &mut self.nodes[id].xattrs;
        if flags == libc::XATTR_CREATE && x.contains_key(name) {
            return Err(libc::EEXIST);
        }
        if flags == libc::XATTR_REPLACE && !x.contains_key(name) {
            return Err(libc::ENODATA);
        }
        x.insert(name.to_string(), value.to_vec());
        Ok(())
    }

    fn removexattr(&mut self, path: &[String], name: &str) -> R<()> {
        let id = self.target(path)?;
        self.nodes[id]
            .xattrs
            .remove(name)
            .map(|_| ())
            .ok_or(libc::ENODATA)
    }

    fn getxattr(&mut self, path: &[String], name: &str) -> R<Vec<u8>> {
        let id = self.target(path)?;
        self.nodes[id]
            .xattrs
            .get(name)
            .cloned()
            .ok_or(libc::ENODATA)
    }

    /// Every path in the tree (each name once), for picking targets that exist.
    fn paths(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![(0usize, Vec::<String>::new())];
        while let Some((id, path)) = stack.pop() {
            if let Some(d) = self.dir(id) {
                for (n, c) in d {
                    let mut p = path.clone();
                    p.push(n.clone());
                    out.push(p.clone());
                    stack.push((*c, p));
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------- the volume side

const ME: Cred = Cred::ROOT;

fn res<T>(r: FsResult<T>) -> R<T> {
    r.map_err(|e| e.errno())
}

/// Resolves all but the last component by lookups, as the kernel would.
fn vresolve(vol: &Volume, path: &[String]) -> R<(u64, Vec<u8>)> {
    let (last, init) = path.split_last().unwrap();
    let mut cur = ROOT_INO;
    for c in init {
        let a = res(vol.lookup(cur, c.as_bytes()))?;
        if a.kind != FileKind::Dir {
            return Err(libc::ENOTDIR);
        }
        cur = a.ino;
    }
    Ok((cur, last.as_bytes().to_vec()))
}

fn vtarget(vol: &Volume, path: &[String]) -> R<u64> {
    let (p, n) = vresolve(vol, path)?;
    Ok(res(vol.lookup(p, &n))?.ino)
}

#[derive(Debug)]
enum Op {
    Create(Vec<String>, u32),
    Mkdir(Vec<String>, u32),
    Symlink(Vec<String>, String),
    Mkfifo(Vec<String>),
    Write(Vec<String>, usize, usize, u8),
    Read(Vec<String>, usize, usize),
    Truncate(Vec<String>, usize),
    Fallocate(Vec<String>, usize, usize, u8),
    Unlink(Vec<String>),
    Rmdir(Vec<String>),
    Link(Vec<String>, Vec<String>),
    Rename(Vec<String>, Vec<String>, u32),
    Chmod(Vec<String>, u32),
    SetXattr(Vec<String>, String, Vec<u8>, i32),
    RemoveXattr(Vec<String>, String),
    GetXattr(Vec<String>, String),
    /// A collector pass (`Volume::collect_garbage`): changes nothing a reader can see.
    Gc,
    Reopen,
}

#[derive(Debug, PartialEq)]
enum Out {
    Unit,
    Bytes(Vec<u8>),
}

fn unit(r: R<()>) -> R<Out> {
    r.map(|_| Out::Unit)
}

fn data(len: usize, tag: u8) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_add((i % 251) as u8) | 1)
        .collect()
}

fn apply_model(m: &mut Model, op: &Op) -> R<Out> {
    match op {
        Op::Create(p, perm) => unit(m.add(p, MKind::File(Vec::new()), *perm)),
        Op::Mkdir(p, perm) => unit(m.add(p, MKind::Dir(BTreeMap::new()), *perm)),
        Op::Symlink(p, t) => unit(m.add(p, MKind::Symlink(t.clone()), 0o777)),
        Op::Mkfifo(p) => unit(m.add(p, MKind::Fifo, 0o644)),
        Op::Write(p, off, len, tag) => unit(m.write(p, *off, &data(*len, *tag))),
        Op::Read(p, off, len) => m.read(p, *off, *len).map(Out::Bytes),
        Op::Truncate(p, size) => unit(m.truncate(p, *size)),
        Op::Fallocate(p, off, len, kind) => unit(m.fallocate(p, *off, *len, *kind)),
        Op::Unlink(p) => unit(m.unlink(p)),
        Op::Rmdir(p) => unit(m.rmdir(p)),
        Op::Link(a, b) => unit(m.link(a, b)),
        Op::Rename(a, b, f) => unit(m.rename(a, b, *f)),
        Op::Chmod(p, perm) => unit(m.chmod(p, *perm)),
        Op::SetXattr(p, n, v, f) => unit(m.setxattr(p, n, v, *f)),
        Op::RemoveXattr(p, n) => unit(m.removexattr(p, n)),
        Op::GetXattr(p, n) => m.getxattr(p, n).map(Out::Bytes),
        Op::Reopen | Op::Gc => Ok(Out::Unit),
    }
}

fn apply_volume(vol: &Volume, op: &Op) -> R<Out> {
    match op {
        Op::Create(p, perm) => {
            let (d, n) = vresolve(vol, p)?;
            let (a, fh) = res(vol.create(&ME, d, &n, libc::S_IFREG | perm))?;
            let _ = a;
            unit(res(vol.release(fh)))
        }
        Op::Mkdir(p, perm) => {
            let (d, n) = vresolve(vol, p)?;
            unit(res(vol.mkdir(&ME, d, &n, *perm)).map(|_| ()))
        }
        Op::Symlink(p, t) => {
            let (d, n) = vresolve(vol, p)?;
            unit(res(vol.symlink(&ME, d, &n, t.as_bytes())).map(|_| ()))
        }
        Op::Mkfifo(p) => {
            let (d, n) = vresolve(vol, p)?;
            unit(res(vol.mknod(&ME, d, &n, libc::S_IFIFO | 0o644, 0)).map(|_| ()))
        }
        Op::Write(p, off, len, tag) => {
            let ino = vtarget(vol, p)?;
            unit(res(vol.write(ino, *off as u64, &data(*len, *tag))).map(|_| ()))
        }
        Op::Read(p, off, len) => {
            let ino = vtarget(vol, p)?;
            res(vol.read(ino, *off as u64, *len as u32)).map(Out::Bytes)
        }
        Op::Truncate(p, size) => {
            let ino = vtarget(vol, p)?;
            let set = SetAttr {
                size: Some(*size as u64),
                ..SetAttr::default()
            };
            unit(res(vol.setattr(&ME, ino, &set)).map(|_| ()))
        }
        Op::Fallocate(p, off, len, kind) => {
            let ino = vtarget(vol, p)?;
            let keep = libc::FALLOC_FL_KEEP_SIZE;
            let mode = [
                0,
                libc::FALLOC_FL_PUNCH_HOLE | keep,
                libc::FALLOC_FL_ZERO_RANGE,
                libc::FALLOC_FL_ZERO_RANGE | keep,
            ][*kind as usize];
            unit(res(vol.fallocate(ino, *off as u64, *len as u64, mode)))
        }
        Op::Unlink(p) => {
            let (d, n) = vresolve(vol, p)?;
            unit(res(vol.unlink(d, &n)))
        }
        Op::Rmdir(p) => {
            let (d, n) = vresolve(vol, p)?;
            unit(res(vol.rmdir(d, &n)))
        }
        Op::Link(a, b) => {
            let src = vtarget(vol, a)?;
            let (d, n) = vresolve(vol, b)?;
            unit(res(vol.link(src, d, &n)).map(|_| ()))
        }
        Op::Rename(a, b, f) => {
            let (sd, sn) = vresolve(vol, a)?;
            let (dd, dn) = vresolve(vol, b)?;
            unit(res(vol.rename(sd, &sn, dd, &dn, *f)))
        }
        Op::Chmod(p, perm) => {
            let ino = vtarget(vol, p)?;
            let set = SetAttr {
                mode: Some(*perm),
                ..SetAttr::default()
            };
            unit(res(vol.setattr(&ME, ino, &set)).map(|_| ()))
        }
        Op::SetXattr(p, n, v, f) => {
            let ino = vtarget(vol, p)?;
            unit(res(vol.setxattr(ino, n.as_bytes(), v, *f)))
        }
        Op::RemoveXattr(p, n) => {
            let ino = vtarget(vol, p)?;
            unit(res(vol.removexattr(ino, n.as_bytes())))
        }
        Op::GetXattr(p, n) => {
            let ino = vtarget(vol, p)?;
            res(vol.getxattr(ino, n.as_bytes())).map(Out::Bytes)
        }
        Op::Gc => unit(res(vol.collect_garbage(&mut |_| {}).map(|_| ()))),
        Op::Reopen => Ok(Out::Unit),
    }
}

/// Compares the whole tree: names, kinds, permissions, link counts, sizes, contents, symlink
/// targets, xattrs, `..`, and that hard links of one model node are one inode.
fn compare_trees(m: &Model, vol: &Volume) -> Result<(), String> {
    let mut ino_of: HashMap<usize, u64> = HashMap::from([(0, ROOT_INO)]);
    let mut stack = vec![(0usize, ROOT_INO, "/".to_string())];
    while let Some((id, ino, path)) = stack.pop() {
        let d = m.dir(id).unwrap();
        let mut listed = BTreeMap::new();
        let mut off = 0;
        loop {
            let batch = vol
                .readdir(ino, off, 3)
                .map_err(|e| format!("readdir {path}: {e}"))?;
            let Some(last) = batch.last() else { break };
            off = last.offset;
            for e in batch {
                let name = String::from_utf8(e.name).unwrap();
                if name == ".." {
                    let want = if id == 0 {
                        ROOT_INO
                    } else {
                        ino_of[&m.parent[&id]]
                    };
                    if e.ino != want {
                        return Err(format!("{path}: `..` is {} not {want}", e.ino));
                    }
                }
                if listed.insert(name.clone(), e.ino).is_some() {
                    return Err(format!("{path}: {name} listed twice"));
                }
            }
        }
        listed.remove(".");
        listed.remove("..");
        let want: Vec<&String> = d.keys().collect();
        let got: Vec<&String> = listed.keys().collect();
        if want != got {
            return Err(format!("{path}: entries {got:?}, model {want:?}"));
        }
        for (name, cid) in d {
            let cpath = format!("{path}{name}");
            let a = vol
                .lookup(ino, name.as_bytes())
                .map_err(|e| format!("lookup {cpath}: {e}"))?;
            if listed[name] != a.ino {
                return Err(format!(
                    "{cpath}: readdir ino {} != lookup ino {}",
                    listed[name], a.ino
                ));
            }
            if let Some(prev) = ino_of.insert(*cid, a.ino) {
                if prev != a.ino {
                    return Err(format!(
                        "{cpath}: hard link resolves to inode {} and {prev}",
                        a.ino
                    ));
                }
            }
            let n = &m.nodes[*cid];
            if a.perm as u32 != n.perm {
                return Err(format!("{cpath}: perm {:o}, model {:o}", a.perm, n.perm));
            }
            let (kind, nlink, size) = match &n.kind {
                MKind::File(f) => (FileKind::File, n.links, f.len() as u64),
                MKind::Dir(sub) => (
                    FileKind::Dir,
                    2 + sub.values().filter(|c| m.is_dir(**c)).count() as u32,
                    a.size,
                ),
                MKind::Symlink(t) => (FileKind::Symlink, n.links, t.len() as u64),
                MKind::Fifo => (FileKind::Fifo, n.links, 0),
            };
            if (a.kind, a.nlink, a.size) != (kind, nlink, size) {
                return Err(format!(
                    "{cpath}: (kind, nlink, size) {:?}, model {:?}",
                    (a.kind, a.nlink, a.size),
                    (kind, nlink, size)
                ));
            }
            match &n.kind {
                MKind::File(f) => {
                    let got = vol
                        .read(a.ino, 0, f.len() as u32 + 10)
                        .map_err(|e| format!("read {cpath}: {e}"))?;
                    if &got != f {
                        return Err(format!(
                            "{cpath}: contents differ (len {} vs {})",
                            got.len(),
                            f.len()
                        ));
                    }
                }
                MKind::Symlink(t) => {
                    if vol.readlink(a.ino).unwrap() != t.as_bytes() {
                        return Err(format!("{cpath}: symlink target differs"));
                    }
                }
                MKind::Dir(_) => stack.push((*cid, a.ino, format!("{cpath}/"))),
                MKind::Fifo => {}
            }
            let names: Vec<String> = vol
                .listxattr(a.ino)
                .unwrap()
                .into_iter()
                .map(|n| String::from_utf8(n).unwrap())
                .collect();
            let want: Vec<String> = n.xattrs.keys().cloned().collect();
            if names != want {
                return Err(format!("{cpath}: xattrs {names:?}, model {want:?}"));
            }
            for (k, v) in &n.xattrs {
                if &vol.getxattr(a.ino, k.as_bytes()).unwrap() != v {
                    return Err(format!("{cpath}: xattr {k} differs"));
                }
            }
        }
    }
    // What `df` calls used (and the quota bounds) is the files' sizes, each inode once.
    let files: u64 = ino_of
        .keys()
        .filter_map(|id| match &m.nodes[*id].kind {
            MKind::File(f) => Some(f.len() as u64),
            _ => None,
        })
        .sum();
    if vol.used_bytes() != files {
        return Err(format!(
            "used bytes {}, the model's files hold {files}",
            vol.used_bytes()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- generating operations

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

fn any_path(rng: &mut Rng) -> Vec<String> {
    let depth = 1 + rng.below(3) as usize;
    (0..depth).map(|_| rng.pick(&NAMES).to_string()).collect()
}

/// Mostly an existing path accepted by `filter`, sometimes any path (to reach the errors).
fn existing(rng: &mut Rng, m: &Model, filter: impl Fn(&MKind) -> bool) -> Vec<String> {
    let candidates: Vec<Vec<String>> = m
        .paths()
        .into_iter()
        .filter(|p| filter(&m.nodes[m.target(p).unwrap()].kind))
        .collect();
    if candidates.is_empty() || rng.chance(20) {
        any_path(rng)
    } else {
        rng.pick(&candidates).clone()
    }
}

/// Mostly a name inside an existing directory.
fn new_path(rng: &mut Rng, m: &Model) -> Vec<String> {
    if rng.chance(25) {
        return any_path(rng);
    }
    let mut dirs: Vec<Vec<String>> = m
        .paths()
        .into_iter()
        .filter(|p| m.is_dir(m.target(p).unwrap()))
        .collect();
    dirs.push(Vec::new());
    let mut p = rng.pick(&dirs).clone();
    p.push(rng.pick(&NAMES).to_string());
    p
}

fn random_op(rng: &mut Rng, m: &Model, cs: usize) -> Op {
    let file = |rng: &mut Rng| existing(rng, m, |k| matches!(k, MKind::File(_)));
    let any = |rng: &mut Rng| existing(rng, m, |_| true);
    let span = 150 * cs;
    let perm = [0o644, 0o600, 0o755, 0o4755, 0o2711, 0o1777][rng.below(6) as usize];
    match rng.below(100) {
        0..=9 => Op::Create(new_path(rng, m), perm & 0o777),
        10..=15 => Op::Mkdir(new_path(rng, m), 0o755),
        16..=17 => Op::Symlink(new_path(rng, m), "x".repeat(1 + rng.below(40) as usize)),
        18 => Op::Mkfifo(new_path(rng, m)),
        19..=36 => {
            let off = if rng.chance(50) {
                rng.below(4 * cs as u64)
            } else {
                rng.below(span as u64)
            } as usize;
            // Small writes often, so that stored chunks get patches.
            let len = if rng.chance(40) {
                1 + rng.below(cs as u64 / 6) as usize
            } else {
                1 + rng.below(3 * cs as u64) as usize
            };
            Op::Write(file(rng), off, len, rng.below(256) as u8)
        }
        37..=44 => Op::Read(
            file(rng),
            rng.below(span as u64) as usize / 2,
            rng.below(4 * cs as u64) as usize,
        ),
        45..=50 => Op::Truncate(file(rng), rng.below(span as u64 / 2) as usize),
        51..=52 => Op::Fallocate(
            file(rng),
            rng.below(span as u64 / 2) as usize,
            rng.below(2 * cs as u64) as usize,
            rng.below(4) as u8,
        ),
        53..=58 => Op::Unlink(any(rng)),
        59..=62 => Op::Rmdir(existing(rng, m, |k| matches!(k, MKind::Dir(_)))),
        63..=67 => Op::Link(any(rng), new_path(rng, m)),
        68..=79 => {
            let flags =
                [0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE][rng.below(4) as usize];
            let to = if rng.chance(50) {
                any(rng)
            } else {
                new_path(rng, m)
            };
            Op::Rename(any(rng), to, flags)
        }
        80..=84 => Op::Chmod(any(rng), perm),
        85..=89 => {
            let flags = [0, libc::XATTR_CREATE, libc::XATTR_REPLACE][rng.below(3) as usize];
            let value = data(rng.below(40) as usize, rng.below(256) as u8);
            Op::SetXattr(
                any(rng),
                rng.pick(&["user.x", "user.y", "trusted.z"]).to_string(),
                value,
                flags,
            )
        }
        90..=92 => Op::RemoveXattr(any(rng), rng.pick(&["user.x", "user.y"]).to_string()),
        93..=96 => Op::GetXattr(any(rng), rng.pick(&["user.x", "user.y"]).to_string()),
        97 => Op::Gc,
        _ => Op::Reopen,
    }
}

/// How many operations of each kind ran and how many succeeded, to show the sequences do reach
/// the interesting states (printed with `--nocapture`).
type Tally = BTreeMap<String, (u64, u64)>;

fn run_seed(seed: u64, ops: usize, tally: &mut Tally) {
    let mut rng = Rng(seed);
    let max_block = *rng.pick(&[4096usize, 1 << 20]);
    let cs = *rng.pick(&[512usize, 1024, 4096]);
    let cfg = VolumeConfig {
        chunk_size: Some(cs as u32),
        dirty_limit: cs * (1 + rng.below(64) as usize),
        journal_ops: 1 + rng.below(64) as usize,
        checkpoint_segments: 1 + rng.below(8) as usize,
        patch_budget: *rng.pick(&[cs / 4, 8 * cs, 64 << 20]),
        ..VolumeConfig::default()
    };
    let backend = MemBackend::with_max_block(max_block);
    // A quarter of the sequences run over an encrypted volume (whose blocks are smaller by the
    // envelope, so its chunk size is not a power of two either).
    let encrypted = seed % 4 == 3;
    let open = || {
        let b: Arc<dyn Backend> = if encrypted {
            let key = VolumeKey::from_bytes(blake3::hash(&seed.to_le_bytes()).into());
            Arc::new(Encrypted::new(backend.clone(), &key))
        } else {
            Arc::new(backend.clone())
        };
        Volume::open_or_format(b, cfg.clone()).unwrap()
    };
    let mut vol = open();
    let mut model = Model::new();
    let mut log = Vec::new();
    let fail = |log: &Vec<String>, msg: String| -> ! {
        let tail = log
            .iter()
            .rev()
            .take(40)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ");
        panic!("seed {seed}: {msg}\nlast operations:\n  {tail}\nreplay: DBQSFS_FS_SEED={seed}");
    };
    for step in 0..ops {
        let op = random_op(&mut rng, &model, cs);
        log.push(format!("{step}: {op:?}"));
        let want = apply_model(&mut model, &op);
        let got = apply_volume(&vol, &op);
        let kind = format!("{op:?}").split('(').next().unwrap().to_string();
        let t = tally.entry(kind).or_default();
        t.0 += 1;
        t.1 += want.is_ok() as u64;
        if want != got {
            fail(&log, format!("{op:?}: volume {got:?}, model {want:?}"));
        }
        if matches!(op, Op::Reopen) {
            vol.sync_all().unwrap();
            drop(vol);
            vol = open();
        }
        if step % 25 == 24 || matches!(op, Op::Reopen) {
            if let Err(e) = compare_trees(&model, &vol) {
                fail(&log, e);
            }
        }
    }
    vol.sync_all().unwrap();
    drop(vol);
    let fresh = open();
    if let Err(e) = compare_trees(&model, &fresh) {
        fail(&log, format!("after the final re-open: {e}"));
    }
    // The collector leaves exactly what the volume reaches (a clean close lists what its last
    // checkpoint left behind in the head, so the re-opened writer finds all of it), and reading
    // everything afterwards shows it released nothing it needed.
    // Two passes: the first one's own head write may leave the garbage list it replaced.
    fresh.collect_garbage(&mut |_| {}).unwrap();
    let stats = fresh.collect_garbage(&mut |_| {}).unwrap();
    if backend.chunk_count() as u64 != stats.reachable {
        fail(
            &log,
            format!(
                "after a full collection the backend holds {} chunks, the volume reaches {}",
                backend.chunk_count(),
                stats.reachable
            ),
        );
    }
    drop(fresh);
    if let Err(e) = compare_trees(&model, &open()) {
        fail(&log, format!("after the final collection: {e}"));
    }
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_operation_sequences_agree_with_the_reference_model() {
    let ops = env("DBQSFS_FS_OPS").unwrap_or(200) as usize;
    let seeds: Vec<u64> = match env("DBQSFS_FS_SEED") {
        Some(s) => vec![s],
        None => (0..env("DBQSFS_FS_SEEDS").unwrap_or(200)).collect(),
    };
    let mut tally = Tally::new();
    for seed in seeds {
        if catch_unwind(AssertUnwindSafe(|| run_seed(seed, ops, &mut tally))).is_err() {
            panic!("seed {seed} failed (see above); replay with DBQSFS_FS_SEED={seed}");
        }
    }
    for (kind, (n, ok)) in tally {
        println!("{kind:>12}: {n:6} run, {ok:6} succeeded");
    }
}

fn run_crash_case(seed: u64) {
    let mut rng = Rng(seed ^ 0x00c4_a511_0000_0000);
    let max_block = *rng.pick(&[4096usize, 1 << 20]);
    let cs = *rng.pick(&[512usize, 1024, 4096]);
    let cfg = VolumeConfig {
        chunk_size: Some(cs as u32),
        dirty_limit: cs * (1 + rng.below(16) as usize),
        journal_ops: 1 + rng.below(32) as usize,
        checkpoint_segments: 1 + rng.below(4) as usize,
        patch_budget: *rng.pick(&[cs / 4, 8 * cs, 64 << 20]),
        ..VolumeConfig::default()
    };
    let backend = MemBackend::with_max_block(max_block);
    let open = || Volume::open_or_format(Arc::new(backend.clone()), cfg.clone()).unwrap();
    let vol = open();
    let writes = rng.below(60);
    let land = rng.chance(50);
    backend.set_failure(Failure::WritesFailAfter { n: writes, land });
    let mut model = Model::new();
    // The model after each operation since the last fsync that succeeded (first: at that fsync).
    let mut since_durable = vec![model.clone()];
    // Half the cases recover at some step: what failed before must be committed after.
    let recover = rng.chance(50).then(|| rng.below(60));
    let mut log = vec![format!(
        "writes fail after {writes} (stored anyway: {land}), recovering at step {recover:?}"
    )];
    let fail = |log: &Vec<String>, msg: String| -> ! {
        panic!(
            "crash seed {seed}: {msg}\noperations:\n  {}\nreplay: DBQSFS_FS_SEED={seed} cargo \
             test -p dbqsfs-fs --test model a_crash",
            log.join("\n  ")
        );
    };
    for step in 0..5 + rng.below(60) {
        if recover == Some(step) {
            backend.set_failure(Failure::None);
        }
        let op = random_op(&mut rng, &model, cs);
        if matches!(op, Op::Reopen) {
            let r = vol.fsync(ROOT_INO, false);
            log.push(format!("{step}: fsync -> {r:?}"));
            if r.is_ok() {
                since_durable = vec![model.clone()];
            }
            continue;
        }
        if matches!(op, Op::Gc) {
            // It may fail with the writes; either way it changes nothing a reader sees.
            let r = vol.collect_garbage(&mut |_| {});
            log.push(format!("{step}: gc -> {:?}", r.map(|s| s.released)));
            continue;
        }
        log.push(format!("{step}: {op:?}"));
        let want = apply_model(&mut model, &op);
        let got = apply_volume(&vol, &op);
        if want != got {
            if got == Err(libc::EIO) {
                // Refused, changing nothing: the batch is full and cannot be committed.
                model = since_durable.last().expect("never empty").clone();
                continue;
            }
            fail(&log, format!("{op:?}: volume {got:?}, model {want:?}"));
        }
        since_durable.push(model.clone());
    }
    drop(vol); // the crash: nothing more reaches the backend
    backend.set_failure(Failure::None);
    let fresh = open();
    if !since_durable
        .iter()
        .any(|m| compare_trees(m, &fresh).is_ok())
    {
        let first = compare_trees(&since_durable[0], &fresh).unwrap_err();
        let last = compare_trees(since_durable.last().unwrap(), &fresh).unwrap_err();
        fail(
            &log,
            format!(
                "the reopened tree is no prefix since the last fsync: against that fsync: \
                 {first}; against the end: {last}"
            ),
        );
    }
}

#[test]
fn a_crash_at_any_point_leaves_a_prefix_holding_every_fsync() {
    let seeds: Vec<u64> = match env("DBQSFS_FS_SEED") {
        Some(s) => vec![s],
        None => (0..env("DBQSFS_FS_CRASH_CASES").unwrap_or(10_000)).collect(),
    };
    for seed in seeds {
        if catch_unwind(AssertUnwindSafe(|| run_crash_case(seed))).is_err() {
            panic!("crash seed {seed} failed (see above); replay with DBQSFS_FS_SEED={seed}");
        }
    }
}
