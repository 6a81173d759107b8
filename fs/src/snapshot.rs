//! Snapshots: names for committed states of a volume.
//!
//! Goals: taking a snapshot costs O(1) whatever the volume holds, and works while the volume is
//! mounted read-write; a snapshot mounts read-only and never changes.
//!
//! Model: a committed state is what a head record describes (a checkpoint, the journal after it
//! and the head's tail), and everything a head names is an immutable content block. A snapshot
//! is a copy of the head's value in a record of its own (`snapshot/NAME`), and the volume's
//! index record (`snapshots`) lists the names with when they were taken and the commit they
//! copied. Deleting writes an empty value over the snapshot's record and drops the name.
//!
//! The writer's collector (`crate::gc`) keeps every block a listed snapshot reaches, and frees a
//! deleted snapshot's blocks if it sees the deletion (it ran meanwhile, or runs when a snapshot
//! is deleted; a snapshot deleted while no writer ran leaves its blocks behind for now).
//!
//! Non-goals: several clients changing one volume's snapshots at once (the last index write
//! wins; run one at a time).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{FsError, FsResult};
use crate::layout::{Head, Timestamp, HEAD_LABEL};

/// The record listing a volume's snapshots.
pub const INDEX_LABEL: &[u8] = b"snapshots";
const TAG_INDEX: u8 = 0x53;

/// What the index says of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub created: Timestamp,
    /// The commit (head version) it copied.
    pub commit: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Index {
    snapshots: BTreeMap<String, SnapshotInfo>,
}

/// Why a snapshot command failed, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("a snapshot name is 1 to 100 letters, digits, '.', '_' or '-', not starting with '.': {0:?}")]
    BadName(String),
    #[error("the volume has no snapshot named {0:?} (`dbqsfs snapshot list` shows them)")]
    NoSuchSnapshot(String),
    #[error("the volume already has a snapshot named {0:?}")]
    Exists(String),
    #[error("the volume's writer kept collecting garbage while snapshot {0:?} was taken; run the command again")]
    Busy(String),
    #[error("the volume does not exist yet (mount it read-write once to create it)")]
    NoVolume,
    #[error(transparent)]
    Fs(#[from] FsError),
}

impl From<crate::backend::BackendError> for SnapshotError {
    fn from(e: crate::backend::BackendError) -> Self {
        SnapshotError::Fs(e.into())
    }
}

/// The record label of snapshot `name`.
pub fn label(name: &str) -> Vec<u8> {
    [b"snapshot/".as_slice(), name.as_bytes()].concat()
}

fn check_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.into()))
    }
}

fn read_index(backend: &dyn Backend) -> FsResult<(Index, u64)> {
    let Some(rec) = backend.get_record(INDEX_LABEL)? else {
        return Ok((Index::default(), 0));
    };
    let index = match rec.value.split_first() {
        Some((&TAG_INDEX, rest)) => postcard::from_bytes(rest).map_err(|e| FsError::Decode {
            what: "snapshot index",
            detail: e.to_string(),
        })?,
        _ => {
            return Err(FsError::Decode {
                what: "snapshot index",
                detail: "unknown tag".into(),
            })
        }
    };
    Ok((index, rec.version))
}

fn write_index(backend: &dyn Backend, index: &Index, version: u64) -> FsResult<()> {
    let mut value = vec![TAG_INDEX];
    value.extend(postcard::to_stdvec(index).expect("in-memory serialization cannot fail"));
    Ok(backend.put_record(INDEX_LABEL, version, &value)?)
}

/// Names the volume's current committed state `name`.
///
/// While a writer has the volume mounted, its collector may release what only older heads
/// reach. So after the index names the snapshot, the head is read again: if its `gc_floor`
/// passed the copied head, the collector may already have released some of that head's blocks
/// without seeing the snapshot, and the snapshot is taken again of the newer head (see `gc`).
pub fn create(backend: &dyn Backend, name: &str) -> Result<SnapshotInfo, SnapshotError> {
    check_name(name)?;
    let mut ours = false;
    for _ in 0..CREATE_TRIES {
        let (mut index, version) = read_index(backend)?;
        if index.snapshots.contains_key(name) && !ours {
            return Err(SnapshotError::Exists(name.into()));
        }
        let head = backend
            .get_record(HEAD_LABEL)?
            .ok_or(SnapshotError::NoVolume)?;
        Head::decode(&head.value)?;
        // A deleted snapshot of the same name left its record at some version: go above it.
        let old = backend.get_record(&label(name))?.map_or(0, |r| r.version);
        backend.put_record(&label(name), old + 1, &head.value)?;
        let info = SnapshotInfo {
            created: Timestamp::now(),
            commit: head.version,
        };
        index.snapshots.insert(name.into(), info.clone());
        write_index(backend, &index, version + 1)?;
        ours = true;
        let now = backend
            .get_record(HEAD_LABEL)?
            .ok_or(SnapshotError::NoVolume)?;
        if Head::decode(&now.value)?.gc_floor <= head.version {
            return Ok(info);
        }
    }
    Err(SnapshotError::Busy(name.into()))
}

/// How often `create` takes a snapshot again while the writer's collector keeps passing it.
const CREATE_TRIES: usize = 8;

/// The volume's snapshots, by name.
pub fn list(backend: &dyn Backend) -> FsResult<Vec<(String, SnapshotInfo)>> {
    Ok(read_index(backend)?.0.snapshots.into_iter().collect())
}

/// Drops snapshot `name`.
pub fn delete(backend: &dyn Backend, name: &str) -> Result<(), SnapshotError> {
    let (mut index, version) = read_index(backend)?;
    if index.snapshots.remove(name).is_none() {
        return Err(SnapshotError::NoSuchSnapshot(name.into()));
    }
    write_index(backend, &index, version + 1)?;
    if let Some(rec) = backend.get_record(&label(name))? {
        backend.put_record(&label(name), rec.version + 1, &[])?;
    }
    Ok(())
}

/// The head a snapshot copied, for opening it read-only.
pub(crate) fn head_of(backend: &dyn Backend, name: &str) -> FsResult<Head> {
    match backend.get_record(&label(name))? {
        Some(rec) if !rec.value.is_empty() => Head::decode(&rec.value),
        _ => Err(FsError::Format(
            SnapshotError::NoSuchSnapshot(name.into()).to_string(),
        )),
    }
}
