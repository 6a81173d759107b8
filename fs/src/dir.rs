//! Directories: entries in memory in name-key order, with readdir offsets that stay valid while
//! the directory changes.
//!
//! Goals: creating or removing a name costs one journal operation however large the directory;
//! readdir resumes from any offset it handed out, even after inserts and removals, without
//! skipping or repeating a surviving entry.
//!
//! Model: every name has a 62-bit key (a hash of the name, `layout::name_key`). Entries are
//! listed in key order and an entry's readdir offset is `key + 3` (1 and 2 are `.` and `..`), so
//! an offset is a position in key space rather than an index.
//!
//! Non-goals: distinguishing two names whose 62-bit keys collide in readdir offsets (both are
//! listed under the same offset; a listing resumed exactly between them would skip the second).

use crate::error::{err, FsResult};
use crate::image::{entry_key, Content, DirState, Inode};
use crate::layout::{DirEntry, JournalOp};
use crate::volume::State;

/// First readdir offset of a real entry; `.` is 1 and `..` is 2.
pub const FIRST_ENTRY_COOKIE: u64 = 3;

/// One change to a directory's entries.
pub(crate) enum Edit {
    /// Add the entry, or replace the entry of the same name.
    Put(DirEntry),
    Remove(Vec<u8>),
}

impl State {
    fn dir_state(&mut self, dir: u64) -> FsResult<&mut DirState> {
        match &mut self.node(dir)?.inode.content {
            Content::Dir(d) => Ok(d),
            _ => err(libc::ENOTDIR),
        }
    }

    pub(crate) fn dir_lookup(&mut self, dir: u64, name: &[u8]) -> FsResult<Option<DirEntry>> {
        Ok(self.dir_state(dir)?.entries.get(&entry_key(name)).cloned())
    }

    /// Up to `limit` entries whose offset is greater than `after`, in offset order.
    pub(crate) fn dir_list(
        &mut self,
        dir: u64,
        after: u64,
        limit: usize,
    ) -> FsResult<Vec<(u64, DirEntry)>> {
        let min_key = after.saturating_sub(FIRST_ENTRY_COOKIE - 1);
        Ok(self
            .dir_state(dir)?
            .entries
            .range((min_key, Vec::new())..)
            .take(limit)
            .map(|((k, _), e)| (k + FIRST_ENTRY_COOKIE, e.clone()))
            .collect())
    }

    /// Applies `edits` to directory `dir`, then `f` to the directory's inode; all of it joins
    /// the batch.
    pub(crate) fn dir_edit(
        &mut self,
        dir: u64,
        edits: Vec<Edit>,
        f: impl FnOnce(&mut Inode),
    ) -> FsResult<()> {
        let d = self.dir_state(dir)?;
        let mut ops = Vec::with_capacity(edits.len());
        for edit in edits {
            match edit {
                Edit::Put(e) => {
                    d.entries.insert(entry_key(&e.name), e.clone());
                    ops.push(JournalOp::Link { dir, entry: e });
                }
                Edit::Remove(name) => {
                    d.entries.remove(&entry_key(&name));
                    ops.push(JournalOp::Unlink { dir, name });
                }
            }
        }
        self.journal.extend(ops);
        f(&mut self.node(dir)?.inode);
        self.changed.insert(dir);
        Ok(())
    }
}
