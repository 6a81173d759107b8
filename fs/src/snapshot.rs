//! Snapshots: names for committed states of a volume.
//!
//! Goals: taking a snapshot costs O(1) whatever the volume holds, and works while the volume is
//! mounted read-write; a snapshot mounts read-only and never changes; a deleted snapshot's
//! blocks come back.
//!
//! Model: a committed state is what a head record describes (a checkpoint, the journal after it
//! and the head's tail), and everything a head names is an immutable content block. A snapshot
//! is a copy of the head's value in a record of its own (`snapshot/NAME`), and the volume's
//! index record (`snapshots`) lists the names with when they were taken and the commit they
//! copied. Deleting moves the head's copy to `deleted-snapshot/NAME@COMMIT` and the name to
//! the index's deleted list; the writer's collector (`crate::gc`) releases what only that
//! snapshot reached, whenever a writer runs next, then drops the entry. Until then the
//! collector keeps every block a listed snapshot reaches.
//!
//! The index is changed by read, write one version up, read back: a change that lost to a
//! concurrent one (the same version written twice: the first stays) is made again on what won,
//! so a snapshot command and the collector never undo each other.
//!
//! Non-goals: renaming snapshots, snapshots of snapshots.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::{FsError, FsResult};
use crate::layout::{Head, Timestamp, HEAD_LABEL};

/// The record listing a volume's snapshots.
pub const INDEX_LABEL: &[u8] = b"snapshots";
const TAG_INDEX_V1: u8 = 0x53;
const TAG_INDEX: u8 = 0x73;

/// What the index says of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub created: Timestamp,
    /// The commit (head version) it copied.
    pub commit: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Index {
    snapshots: BTreeMap<String, SnapshotInfo>,
    /// Deleted snapshots whose blocks no collector has released yet, by `NAME@COMMIT`.
    deleted: BTreeMap<String, SnapshotInfo>,
}

/// The index as written before deleted snapshots were kept (tag [`TAG_INDEX_V1`]).
#[derive(Deserialize)]
struct IndexV1 {
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
    #[error("the volume's snapshot index kept changing under this command; run it again")]
    IndexBusy,
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
    let bad = |detail: String| FsError::Decode {
        what: "snapshot index",
        detail,
    };
    let index = match rec.value.split_first() {
        Some((&TAG_INDEX, rest)) => postcard::from_bytes(rest).map_err(|e| bad(e.to_string()))?,
        Some((&TAG_INDEX_V1, rest)) => Index {
            snapshots: postcard::from_bytes::<IndexV1>(rest)
                .map_err(|e| bad(e.to_string()))?
                .snapshots,
            deleted: BTreeMap::new(),
        },
        _ => return Err(bad("unknown tag".into())),
    };
    Ok((index, rec.version))
}

fn encode_index(index: &Index) -> Vec<u8> {
    let mut value = vec![TAG_INDEX];
    value.extend(postcard::to_stdvec(index).expect("in-memory serialization cannot fail"));
    value
}

/// How often a change of the index is made again after losing to a concurrent one.
const INDEX_TRIES: usize = 16;

/// Changes the index with `change` (which sees the current index and may refuse), made again
/// on the newer index while a concurrent change wins.
fn update_index<T>(
    backend: &dyn Backend,
    mut change: impl FnMut(&mut Index) -> Result<T, SnapshotError>,
) -> Result<T, SnapshotError> {
    for _ in 0..INDEX_TRIES {
        let (mut index, version) = read_index(backend)?;
        let out = change(&mut index)?;
        let value = encode_index(&index);
        backend.put_record(INDEX_LABEL, version + 1, &value)?;
        match backend.get_record(INDEX_LABEL)? {
            Some(rec) if rec.version == version + 1 && rec.value == value => return Ok(out),
            _ => continue,
        }
    }
    Err(SnapshotError::IndexBusy)
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
        let (index, _) = read_index(backend)?;
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
        update_index(backend, |index| {
            index.snapshots.insert(name.into(), info.clone());
            Ok(())
        })?;
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

/// Deletes snapshot `name`: its head goes to the deleted list, for the collector.
pub fn delete(backend: &dyn Backend, name: &str) -> Result<(), SnapshotError> {
    let (index, _) = read_index(backend)?;
    let info = index
        .snapshots
        .get(name)
        .cloned()
        .ok_or_else(|| SnapshotError::NoSuchSnapshot(name.into()))?;
    let key = format!("{name}@{}", info.commit);
    if let Some(rec) = backend.get_record(&label(name))? {
        if !rec.value.is_empty() {
            let old = backend
                .get_record(&deleted_label(&key))?
                .map_or(0, |r| r.version);
            backend.put_record(&deleted_label(&key), old + 1, &rec.value)?;
        }
    }
    update_index(backend, |index| {
        if index.snapshots.get(name) != Some(&info) {
            return Err(SnapshotError::NoSuchSnapshot(name.into()));
        }
        index.snapshots.remove(name);
        index.deleted.insert(key.clone(), info.clone());
        Ok(())
    })?;
    if let Some(rec) = backend.get_record(&label(name))? {
        backend.put_record(&label(name), rec.version + 1, &[])?;
    }
    Ok(())
}

fn deleted_label(key: &str) -> Vec<u8> {
    [b"deleted-snapshot/".as_slice(), key.as_bytes()].concat()
}

/// What the collector needs of the index: the snapshots (name, commit copied), and the deleted
/// ones whose blocks are not released yet (`NAME@COMMIT`).
pub(crate) type CollectorView = (Vec<(String, u64)>, Vec<String>);

/// [`CollectorView`], from one read of the index.
pub(crate) fn for_collector(backend: &dyn Backend) -> FsResult<CollectorView> {
    let index = read_index(backend)?.0;
    let listed = index
        .snapshots
        .into_iter()
        .map(|(name, info)| (name, info.commit))
        .collect();
    Ok((listed, index.deleted.into_keys().collect()))
}

/// The head a deleted snapshot copied (`None`: nothing left of it).
pub(crate) fn deleted_head(backend: &dyn Backend, key: &str) -> FsResult<Option<Head>> {
    match backend.get_record(&deleted_label(key))? {
        Some(rec) if !rec.value.is_empty() => Ok(Some(Head::decode(&rec.value)?)),
        _ => Ok(None),
    }
}

/// Drops deleted snapshots whose blocks the collector released.
pub(crate) fn forget_deleted(backend: &dyn Backend, keys: &[String]) -> FsResult<()> {
    update_index(backend, |index| {
        for k in keys {
            index.deleted.remove(k);
        }
        Ok(())
    })
    .map_err(|e| match e {
        SnapshotError::Fs(e) => e,
        e => FsError::Format(e.to_string()),
    })?;
    for k in keys {
        if let Some(rec) = backend.get_record(&deleted_label(k))? {
            backend.put_record(&deleted_label(k), rec.version + 1, &[])?;
        }
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
