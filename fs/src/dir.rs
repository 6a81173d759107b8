//! Directories: entries kept inline in small directories and in hashed bucket records in large
//! ones, with readdir offsets that stay valid while the directory changes.
//!
//! Goals: creating or removing a name rewrites one bucket (plus the directory's own inode, whose
//! times change anyway), however large the directory; readdir resumes from any offset it handed
//! out, even after inserts and removals, without skipping or repeating a surviving entry.
//!
//! Model: every name has a 62-bit key (a hash of the name, `layout::name_key`). Entries are
//! listed in key order and an entry's readdir offset is `key + 3` (1 and 2 are `.` and `..`), so
//! an offset is a position in key space rather than an index. A directory with few entries keeps
//! them in its inode record. Past `inline_max` entries they move into buckets, each covering a
//! binary prefix of key space; a bucket over `bucket_max` entries splits into its two halves
//! (new labels; the old record is left behind as garbage). The leaves are listed in the
//! directory's inode.
//!
//! Non-goals: merging buckets after removals (a shrunken directory keeps its buckets), shrinking
//! back to inline, and distinguishing two names whose 62-bit keys collide in readdir offsets (both
//! are listed under the same offset; a listing resumed exactly between them would skip the second).

use std::collections::BTreeMap;

use crate::error::{err, FsResult};
use crate::layout::{bucket_label, name_key, Bucket, DirEntry, Leaf, KEY_BITS};
use crate::volume::{Content, Inode, State};

/// First readdir offset of a real entry; `.` is 1 and `..` is 2.
pub const FIRST_ENTRY_COOKIE: u64 = 3;

pub(crate) type EntryMap = BTreeMap<(u64, Vec<u8>), DirEntry>;

#[derive(Clone, Debug)]
pub(crate) struct DirState {
    pub parent: u64,
    pub count: u64,
    pub layout: DirMem,
}

#[derive(Clone, Debug)]
pub(crate) enum DirMem {
    Inline(EntryMap),
    /// Leaves by their first key.
    Hashed(BTreeMap<u64, Leaf>),
}

impl DirState {
    pub fn empty(parent: u64) -> Self {
        DirState {
            parent,
            count: 0,
            layout: DirMem::Inline(BTreeMap::new()),
        }
    }
}

pub(crate) struct BucketMem {
    pub version: u64,
    pub entries: EntryMap,
}

/// One change to a directory's entries.
pub(crate) enum Edit {
    /// Add the entry, or replace the entry of the same name.
    Put(DirEntry),
    Remove(Vec<u8>),
}

impl Edit {
    fn name(&self) -> &[u8] {
        match self {
            Edit::Put(e) => &e.name,
            Edit::Remove(n) => n,
        }
    }
}

fn leaf_for(leaves: &BTreeMap<u64, Leaf>, key: u64) -> Leaf {
    *leaves
        .range(..=key)
        .next_back()
        .expect("leaves partition the key space")
        .1
}

fn entries_bytes(entries: &EntryMap) -> usize {
    entries.values().map(|e| e.name.len() + 16).sum()
}

/// Applies edits to an entry map, returning the change in the number of entries.
fn apply(entries: &mut EntryMap, edits: &[Edit]) -> i64 {
    let mut delta = 0;
    for edit in edits {
        let key = (name_key(edit.name()), edit.name().to_vec());
        match edit {
            Edit::Put(e) => {
                if entries.insert(key, e.clone()).is_none() {
                    delta += 1;
                }
            }
            Edit::Remove(_) => {
                if entries.remove(&key).is_some() {
                    delta -= 1;
                }
            }
        }
    }
    delta
}

impl State {
    fn dir_state(&mut self, dir: u64) -> FsResult<&DirState> {
        match &self.node(dir)?.inode.content {
            Content::Dir(d) => Ok(d),
            _ => err(libc::ENOTDIR),
        }
    }

    fn bucket(&mut self, dir: u64, leaf: Leaf) -> FsResult<&BucketMem> {
        if !self.buckets.contains_key(&(dir, leaf)) {
            let (version, entries) = match self.backend.get_record(&bucket_label(dir, leaf))? {
                Some(rec) => {
                    let b = Bucket::decode(&rec.value)?;
                    let entries = b
                        .entries
                        .into_iter()
                        .map(|e| ((name_key(&e.name), e.name.clone()), e))
                        .collect();
                    (rec.version, entries)
                }
                None => (0, BTreeMap::new()),
            };
            self.buckets
                .insert((dir, leaf), BucketMem { version, entries });
        }
        Ok(&self.buckets[&(dir, leaf)])
    }

    pub(crate) fn dir_lookup(&mut self, dir: u64, name: &[u8]) -> FsResult<Option<DirEntry>> {
        let key = (name_key(name), name.to_vec());
        let leaf = match &self.dir_state(dir)?.layout {
            DirMem::Inline(map) => return Ok(map.get(&key).cloned()),
            DirMem::Hashed(leaves) => leaf_for(leaves, key.0),
        };
        Ok(self.bucket(dir, leaf)?.entries.get(&key).cloned())
    }

    /// Up to `limit` entries whose offset is greater than `after`, in offset order.
    pub(crate) fn dir_list(
        &mut self,
        dir: u64,
        after: u64,
        limit: usize,
    ) -> FsResult<Vec<(u64, DirEntry)>> {
        let min_key = after.saturating_sub(FIRST_ENTRY_COOKIE - 1);
        let leaves: Vec<Leaf> = match &self.dir_state(dir)?.layout {
            DirMem::Inline(map) => {
                return Ok(map
                    .range((min_key, Vec::new())..)
                    .take(limit)
                    .map(|((k, _), e)| (k + FIRST_ENTRY_COOKIE, e.clone()))
                    .collect())
            }
            DirMem::Hashed(leaves) => {
                let first = leaf_for(leaves, min_key).first_key();
                leaves.range(first..).map(|(_, l)| *l).collect()
            }
        };
        let mut out = Vec::new();
        for leaf in leaves {
            let bucket = self.bucket(dir, leaf)?;
            for ((k, _), e) in bucket.entries.range((min_key, Vec::new())..) {
                if out.len() == limit {
                    return Ok(out);
                }
                out.push((k + FIRST_ENTRY_COOKIE, e.clone()));
            }
        }
        Ok(out)
    }

    /// Applies `edits` to directory `dir` and stores them, then applies `f` to the directory's
    /// inode and stores it. Buckets are written before the inode that lists them.
    pub(crate) fn dir_edit(
        &mut self,
        dir: u64,
        edits: Vec<Edit>,
        f: impl FnOnce(&mut Inode),
    ) -> FsResult<()> {
        let mut inode = self.node(dir)?.inode.clone();
        let Content::Dir(d) = &mut inode.content else {
            return err(libc::ENOTDIR);
        };
        let mut retired = Vec::new();
        match &mut d.layout {
            DirMem::Inline(map) => {
                let delta = apply(map, &edits);
                d.count = (d.count as i64 + delta) as u64;
                if map.len() > self.cfg.dir_inline_max
                    || entries_bytes(map) > self.backend.max_block() / 4
                {
                    let entries = std::mem::take(map);
                    let leaves = self.write_split(dir, Leaf::ROOT, entries)?;
                    d.layout =
                        DirMem::Hashed(leaves.into_iter().map(|l| (l.first_key(), l)).collect());
                }
            }
            DirMem::Hashed(leaves) => {
                let mut i = 0;
                while i < edits.len() {
                    let leaf = leaf_for(leaves, name_key(edits[i].name()));
                    let mut j = i + 1;
                    while j < edits.len() && leaf_for(leaves, name_key(edits[j].name())) == leaf {
                        j += 1;
                    }
                    let bucket = self.bucket(dir, leaf)?;
                    let (version, mut entries) = (bucket.version, bucket.entries.clone());
                    let delta = apply(&mut entries, &edits[i..j]);
                    d.count = (d.count as i64 + delta) as u64;
                    if self.must_split(&entries) && (leaf.depth as u32) < KEY_BITS {
                        let new_leaves = self.write_split(dir, leaf, entries)?;
                        leaves.remove(&leaf.first_key());
                        leaves.extend(new_leaves.into_iter().map(|l| (l.first_key(), l)));
                        retired.push(leaf);
                    } else {
                        self.store_bucket(dir, leaf, version, entries)?;
                    }
                    i = j;
                }
            }
        }
        f(&mut inode);
        self.store_inode(dir, inode)?;
        for leaf in retired {
            self.buckets.remove(&(dir, leaf));
        }
        Ok(())
    }

    fn must_split(&self, entries: &EntryMap) -> bool {
        entries.len() > self.cfg.bucket_max || entries_bytes(entries) > self.backend.max_block() / 2
    }

    /// Stores `entries` as the bucket `leaf`, or as several deeper buckets if they are too many.
    /// These labels may have been written by an earlier attempt that failed halfway, so their
    /// current versions are read first rather than assumed to be zero.
    fn write_split(&mut self, dir: u64, leaf: Leaf, entries: EntryMap) -> FsResult<Vec<Leaf>> {
        if !self.must_split(&entries) || leaf.depth as u32 >= KEY_BITS {
            let version = match self.buckets.get(&(dir, leaf)) {
                Some(b) => b.version,
                None => self
                    .backend
                    .get_record(&bucket_label(dir, leaf))?
                    .map_or(0, |r| r.version),
            };
            self.store_bucket(dir, leaf, version, entries)?;
            return Ok(vec![leaf]);
        }
        let (lo, hi) = leaf.children();
        let (mut a, mut b) = (EntryMap::new(), EntryMap::new());
        for (k, e) in entries {
            if lo.contains(k.0) {
                a.insert(k, e);
            } else {
                b.insert(k, e);
            }
        }
        let mut out = self.write_split(dir, lo, a)?;
        out.extend(self.write_split(dir, hi, b)?);
        Ok(out)
    }

    /// Writes a bucket at the version after `version` and caches it once stored.
    fn store_bucket(
        &mut self,
        dir: u64,
        leaf: Leaf,
        version: u64,
        entries: EntryMap,
    ) -> FsResult<()> {
        let v = version + 1;
        let value = Bucket {
            entries: entries.values().cloned().collect(),
        }
        .encode();
        if let Err(e) = self.backend.put_record(&bucket_label(dir, leaf), v, &value) {
            // The write may have landed even though it failed: never reuse this version.
            if let Some(b) = self.buckets.get_mut(&(dir, leaf)) {
                b.version = v;
            }
            return Err(e.into());
        }
        self.buckets.insert(
            (dir, leaf),
            BucketMem {
                version: v,
                entries,
            },
        );
        Ok(())
    }

    /// Drops the cached buckets of a removed directory.
    pub(crate) fn forget_dir(&mut self, dir: u64) {
        self.buckets.retain(|(d, _), _| *d != dir);
    }
}
