//! The storage interface the filesystem is written against, and an in-memory implementation.
//!
//! Goals: state exactly what the filesystem needs from dBQS and nothing more. Two kinds of
//! object: immutable content-addressed *chunks* and mutable, versioned *records*. Every call is
//! blocking and returns only once the data is durable at a quorum, so the filesystem can order
//! its writes ("chunks first, then the inode") by ordering its calls.
//!
//! Chunks are released, not deleted: `release_chunks` tells the store that this volume no longer
//! needs them (dBQS drops a block a grace period after its last owner released it, so a reader
//! that still has an old id keeps it for that long). Only the volume's writer releases, and only
//! chunks nothing it keeps reaches (`crate::gc`). Records are never deleted.
//!
//! Non-goals: transactions across several records, caching (the filesystem caches), and
//! naming volumes: a `Backend` value is already bound to one volume, so labels here are relative
//! to it and the real client prefixes them with the volume's name.
//!
//! `MemBackend` is the test double: it keeps the same version rule as dBQS, counts calls so tests
//! can assert how many records an operation rewrites, and has a failure switch so tests can show
//! what the filesystem does when the cluster is unreachable or full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A chunk's id: the content hash the backend computes over the chunk's bytes.
pub type ChunkId = [u8; 32];

/// A mutable record as read back: the highest version the backend holds, and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub version: u64,
    pub value: Vec<u8>,
}

/// Why a backend call failed. The filesystem turns these into errno values in exactly one place,
/// `crate::error::backend_errno`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// No quorum could be reached (too many replicas down or unreachable).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The operation did not complete in time.
    #[error("backend operation timed out")]
    TimedOut,
    /// The replicas refuse to store more data.
    #[error("backend out of space")]
    NoSpace,
    /// No such chunk (a quorum says so).
    #[error("not found")]
    NotFound,
    /// Data that failed verification and could not be replaced by a good copy.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A value larger than `Backend::max_block`.
    #[error("value of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
}

/// The filesystem's view of dBQS. Implementations must be safe to call from many threads.
pub trait Backend: Send + Sync + 'static {
    /// Stores an immutable chunk and returns its id (the content hash, computed by the backend).
    fn put_chunk(&self, data: &[u8]) -> Result<ChunkId, BackendError>;
    /// Returns the verified bytes of a chunk, or `NotFound`.
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, BackendError>;
    /// Returns the highest version of a record, or `None` if it was never written.
    fn get_record(&self, label: &[u8]) -> Result<Option<Record>, BackendError>;
    /// Writes a record. Writing a version lower than or equal to the stored one is acknowledged
    /// but has no effect.
    fn put_record(&self, label: &[u8], version: u64, value: &[u8]) -> Result<(), BackendError>;
    /// Gives up this volume's hold on chunks (durable at a quorum when it returns). A chunk put
    /// again afterwards is held again. Releasing a chunk twice, or one never put, does nothing.
    fn release_chunks(&self, ids: &[ChunkId]) -> Result<(), BackendError>;
    /// The largest chunk or record value the backend accepts.
    fn max_block(&self) -> usize {
        1 << 20
    }
    /// What the store can hold, if it knows (for `statfs`). It must answer at once, from what
    /// it last learned: `df` must not wait on the network.
    fn capacity(&self) -> Option<Capacity> {
        None
    }
}

/// A store's room for data, in bytes of what a client writes (replication already accounted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    /// All the store could hold.
    pub total: u64,
    /// What it can still take.
    pub available: u64,
}

/// A shared backend is a backend (so a caller can keep a handle on what a `Volume` uses).
impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn put_chunk(&self, data: &[u8]) -> Result<ChunkId, BackendError> {
        (**self).put_chunk(data)
    }
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, BackendError> {
        (**self).get_chunk(id)
    }
    fn get_record(&self, label: &[u8]) -> Result<Option<Record>, BackendError> {
        (**self).get_record(label)
    }
    fn put_record(&self, label: &[u8], version: u64, value: &[u8]) -> Result<(), BackendError> {
        (**self).put_record(label, version, value)
    }
    fn release_chunks(&self, ids: &[ChunkId]) -> Result<(), BackendError> {
        (**self).release_chunks(ids)
    }
    fn max_block(&self) -> usize {
        (**self).max_block()
    }
    fn capacity(&self) -> Option<Capacity> {
        (**self).capacity()
    }
}

/// What `MemBackend` does with the next calls; see [`MemBackend::set_failure`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Every call succeeds.
    None,
    /// Every call fails with `Unavailable`.
    Unavailable,
    /// Every write fails with `NoSpace`; reads succeed.
    NoSpace,
    /// Chunk puts fail with `NoSpace`; records, releases and reads succeed (full dBQS nodes:
    /// they store public-key blocks from their reserve).
    ChunksNoSpace,
    /// The next `n` calls (reads or writes) succeed, then every call fails with `Unavailable`.
    UnavailableAfter(u64),
    /// The next `n` writes succeed, then every write fails with `Unavailable`; reads succeed.
    /// With `land`, the failing writes are stored all the same (a lost acknowledgment).
    WritesFailAfter { n: u64, land: bool },
}

/// How many calls of each kind a `MemBackend` has served (failed calls included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallCounts {
    pub put_chunk: u64,
    pub get_chunk: u64,
    pub get_record: u64,
    pub put_record: u64,
    /// Chunks released (not calls).
    pub released: u64,
}

#[derive(Default)]
struct MemInner {
    chunks: HashMap<ChunkId, Arc<Vec<u8>>>,
    records: HashMap<Vec<u8>, Record>,
    counts: CallCounts,
}

/// An in-memory `Backend` for tests: same version rule as dBQS, call counters, failure switch.
/// Cloning shares the underlying store, so a test can keep a handle while a `Volume` owns another.
#[derive(Clone)]
pub struct MemBackend {
    inner: Arc<Mutex<MemInner>>,
    failure: Arc<Mutex<Failure>>,
    calls: Arc<AtomicU64>,
    max_block: usize,
}

/// Domain prefix for chunk ids, so they can never collide with another use of BLAKE3.
const CHUNK_DOMAIN: &[u8] = b"dbqsfs-fs mem chunk v1\0";

impl Default for MemBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemBackend {
    pub fn new() -> Self {
        Self::with_max_block(1 << 20)
    }

    /// A backend whose blocks are smaller than 1 MiB, so tests can reach multi-chunk and
    /// index-chunk layouts with little data.
    pub fn with_max_block(max_block: usize) -> Self {
        MemBackend {
            inner: Arc::default(),
            failure: Arc::new(Mutex::new(Failure::None)),
            calls: Arc::default(),
            max_block,
        }
    }

    pub fn set_failure(&self, failure: Failure) {
        *self.failure.lock().unwrap() = failure;
        self.calls.store(0, Ordering::SeqCst);
    }

    pub fn counts(&self) -> CallCounts {
        self.inner.lock().unwrap().counts
    }

    /// Whether chunk `id` is stored (bypassing counters and failures).
    pub fn has_chunk(&self, id: &ChunkId) -> bool {
        self.inner.lock().unwrap().chunks.contains_key(id)
    }

    pub fn chunk_count(&self) -> usize {
        self.inner.lock().unwrap().chunks.len()
    }

    /// Bytes held: every chunk and the current value of every record.
    pub fn stored_bytes(&self) -> usize {
        let inner = self.inner.lock().unwrap();
        inner.chunks.values().map(|c| c.len()).sum::<usize>()
            + inner.records.values().map(|r| r.value.len()).sum::<usize>()
    }

    /// The stored version of a record, bypassing counters and failures.
    pub fn peek_record(&self, label: &[u8]) -> Option<Record> {
        self.inner.lock().unwrap().records.get(label).cloned()
    }

    /// Labels of all stored records, for tests that inspect the layout.
    pub fn labels(&self) -> Vec<Vec<u8>> {
        let mut labels: Vec<_> = self.inner.lock().unwrap().records.keys().cloned().collect();
        labels.sort();
        labels
    }

    fn check(&self, write: bool) -> Result<(), BackendError> {
        let failure = self.failure.lock().unwrap().clone();
        match failure {
            Failure::None => Ok(()),
            Failure::Unavailable => Err(BackendError::Unavailable("failure switch".into())),
            Failure::NoSpace if write => Err(BackendError::NoSpace),
            Failure::NoSpace | Failure::ChunksNoSpace => Ok(()),
            Failure::UnavailableAfter(n) => {
                if self.calls.fetch_add(1, Ordering::SeqCst) < n {
                    Ok(())
                } else {
                    Err(BackendError::Unavailable("failure switch".into()))
                }
            }
            Failure::WritesFailAfter { .. } if !write => Ok(()),
            Failure::WritesFailAfter { n, .. } => {
                if self.calls.fetch_add(1, Ordering::SeqCst) < n {
                    Ok(())
                } else {
                    Err(BackendError::Unavailable("failure switch".into()))
                }
            }
        }
    }

    /// Whether a write that fails is stored all the same.
    fn failed_write_lands(&self) -> bool {
        matches!(
            *self.failure.lock().unwrap(),
            Failure::WritesFailAfter { land: true, .. }
        )
    }

    pub fn chunk_id(data: &[u8]) -> ChunkId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(CHUNK_DOMAIN);
        hasher.update(data);
        *hasher.finalize().as_bytes()
    }
}

impl Backend for MemBackend {
    fn put_chunk(&self, data: &[u8]) -> Result<ChunkId, BackendError> {
        self.inner.lock().unwrap().counts.put_chunk += 1;
        if *self.failure.lock().unwrap() == Failure::ChunksNoSpace {
            return Err(BackendError::NoSpace);
        }
        let checked = self.check(true);
        if let Err(e) = &checked {
            if !self.failed_write_lands() {
                return Err(e.clone());
            }
        }
        if data.len() > self.max_block {
            return Err(BackendError::TooLarge {
                size: data.len(),
                limit: self.max_block,
            });
        }
        let id = Self::chunk_id(data);
        self.inner
            .lock()
            .unwrap()
            .chunks
            .entry(id)
            .or_insert_with(|| Arc::new(data.to_vec()));
        checked.map(|_| id)
    }

    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, BackendError> {
        self.inner.lock().unwrap().counts.get_chunk += 1;
        self.check(false)?;
        let inner = self.inner.lock().unwrap();
        inner
            .chunks
            .get(id)
            .map(|c| c.as_ref().clone())
            .ok_or(BackendError::NotFound)
    }

    fn get_record(&self, label: &[u8]) -> Result<Option<Record>, BackendError> {
        self.inner.lock().unwrap().counts.get_record += 1;
        self.check(false)?;
        Ok(self.inner.lock().unwrap().records.get(label).cloned())
    }

    fn put_record(&self, label: &[u8], version: u64, value: &[u8]) -> Result<(), BackendError> {
        self.inner.lock().unwrap().counts.put_record += 1;
        let checked = self.check(true);
        if checked.is_err() && !self.failed_write_lands() {
            return checked;
        }
        if value.len() > self.max_block {
            return Err(BackendError::TooLarge {
                size: value.len(),
                limit: self.max_block,
            });
        }
        let mut inner = self.inner.lock().unwrap();
        let newer = inner.records.get(label).is_none_or(|r| version > r.version);
        if newer {
            inner.records.insert(
                label.to_vec(),
                Record {
                    version,
                    value: value.to_vec(),
                },
            );
        }
        checked
    }

    /// Drops released chunks at once (no grace), so a test reading a chunk released too early
    /// gets `NotFound`.
    fn release_chunks(&self, ids: &[ChunkId]) -> Result<(), BackendError> {
        self.check(true)?;
        let mut inner = self.inner.lock().unwrap();
        inner.counts.released += ids.len() as u64;
        for id in ids {
            inner.chunks.remove(id);
        }
        Ok(())
    }

    fn max_block(&self) -> usize {
        self.max_block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_or_equal_record_versions_are_acknowledged_and_ignored() {
        let b = MemBackend::new();
        b.put_record(b"x", 2, b"two").unwrap();
        b.put_record(b"x", 2, b"again").unwrap();
        b.put_record(b"x", 1, b"one").unwrap();
        assert_eq!(
            b.get_record(b"x").unwrap(),
            Some(Record {
                version: 2,
                value: b"two".to_vec()
            })
        );
        b.put_record(b"x", 3, b"three").unwrap();
        assert_eq!(b.get_record(b"x").unwrap().unwrap().value, b"three");
    }

    #[test]
    fn chunk_ids_are_content_hashes() {
        let b = MemBackend::new();
        let id = b.put_chunk(b"hello").unwrap();
        assert_eq!(id, MemBackend::chunk_id(b"hello"));
        assert_eq!(b.get_chunk(&id).unwrap(), b"hello");
        assert_eq!(b.get_chunk(&[0; 32]), Err(BackendError::NotFound));
    }

    #[test]
    fn failure_switch_fails_calls_until_cleared() {
        let b = MemBackend::new();
        b.set_failure(Failure::NoSpace);
        assert_eq!(b.put_chunk(b"a"), Err(BackendError::NoSpace));
        assert_eq!(b.get_record(b"a"), Ok(None));
        b.set_failure(Failure::UnavailableAfter(1));
        assert!(b.put_chunk(b"a").is_ok());
        assert!(matches!(
            b.put_chunk(b"b"),
            Err(BackendError::Unavailable(_))
        ));
        b.set_failure(Failure::None);
        assert!(b.put_chunk(b"b").is_ok());
    }
}
