//! How a volume is laid out on the backend (format 2, the volume log): one record, the rest
//! content-addressed chunks.
//!
//! Goals: one signed record write makes a whole batch of operations durable (group commit);
//! opening a volume reads its last checkpoint and the journal after it, so opening costs what the
//! live namespace costs, not what its history did; a small write stores about its own size in
//! the journal until a checkpoint folds it in.
//!
//! Objects (the backend prefixes record labels with the volume's name):
//! - record `head` — [`Head`]: format, chunk size, next inode number, the current checkpoint's
//!   root pieces, the journal segments committed since, and the operations of the latest small
//!   commits inline (its tail). Its version is the commit number.
//! - chunk: a journal [`Segment`] — the [`JournalOp`]s of one commit (a commit whose operations
//!   exceed a block writes several segments; the head lists them all, so they become visible
//!   together).
//! - chunks: a checkpoint — a [`Root`] (split into pieces) naming, for each page of 256 inode
//!   numbers, the pieces of that [`Page`]. Pages that did not change keep their chunks, so a
//!   checkpoint writes what changed since the last one (a Merkle tree of depth two).
//! - chunks: file data, fixed-size and aligned: chunk `i` of a file holds bytes
//!   `[i*cs, (i+1)*cs)`, possibly shorter at the end of the data. A small write into a stored
//!   chunk is journaled as a [`JournalOp::Patch`] (its bytes inline) instead of a new chunk; a
//!   checkpoint keeps each patched chunk's patches in a chunk of their own ([`Patches`]), and
//!   the writer stores the chunk whole again once its patches pass half the chunk size.
//!
//! Every value is one tag byte followed by the postcard encoding of the struct. The tag names the
//! kind and the format revision, so a reader can refuse what it does not understand. A volume of
//! format 1 (a `super` record, no `head`) is refused with a message naming both formats.
//!
//! What the volume no longer reaches (journal segments folded into a checkpoint, replaced pages,
//! overwritten data) is released by the writer's collector (`crate::gc`); the head carries what
//! the collector needs to stay safe and complete (`Head::gc_floor`, `Head::garbage`).
//!
//! Non-goals: several writers.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::backend::ChunkId;
use crate::error::{FsError, FsResult};

/// The head record of format 2.
pub const HEAD_LABEL: &[u8] = b"head";
/// The superblock record of format 1 (only looked for, to refuse such a volume clearly).
pub const FORMAT1_LABEL: &[u8] = b"super";
pub const ROOT_INO: u64 = 1;

const TAG_HEAD_V1: u8 = 0x48;
const TAG_HEAD: u8 = 0x49;
const TAG_SEGMENT: u8 = 0x4a;
const TAG_PAGE: u8 = 0x50;
const TAG_ROOT: u8 = 0x52;
const TAG_PATCHES: u8 = 0x54;
const TAG_GARBAGE: u8 = 0x47;

/// Seconds and nanoseconds since the Unix epoch (seconds may be negative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nsec: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system(std::time::SystemTime::now())
    }

    pub fn from_system(t: std::time::SystemTime) -> Self {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let (mut secs, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    secs -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timestamp { secs, nsec }
            }
        }
    }

    pub fn to_system(self) -> std::time::SystemTime {
        use std::time::{Duration, UNIX_EPOCH};
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs())
                + Duration::from_nanos(self.nsec as u64)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDev,
    BlockDev,
    Socket,
}

/// The one mutable record of a volume (label [`HEAD_LABEL`]): where its state is. Written only
/// by the volume's writer, once per commit, at the commit's number as record version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Format of everything the head reaches; [`FORMAT`].
    pub format: u32,
    /// Bytes per data chunk; fixed at format time.
    pub chunk_size: u32,
    pub created: Timestamp,
    /// Inode numbers from here on were never used.
    pub next_ino: u64,
    /// The pieces of the last checkpoint's root (a [`Root`] split into chunks), or empty for a
    /// volume that has none yet (a fresh volume: only the root directory, made by its journal).
    pub checkpoint: Vec<ChunkId>,
    /// Journal segments committed since that checkpoint, oldest first; each is the list of its
    /// pieces (one, unless the segment is larger than a block).
    pub journal: Vec<Vec<ChunkId>>,
    /// Operations committed after those segments, held in the head itself: a small commit
    /// costs one record write. When they would pass [`Head::tail_max`], the next commit stores
    /// them (with its own) as a segment.
    pub tail: Vec<JournalOp>,
    /// Heads of a lower version may have lost blocks to the collector (`crate::gc`): a snapshot
    /// taken of one must be taken again.
    pub gc_floor: u64,
    /// Chunks the writer found unreachable and has not released yet, which an opening writer
    /// could not find otherwise, when they are few (`gc::GARBAGE_IN_HEAD`)...
    pub garbage: Vec<ChunkId>,
    /// ...else the pieces of a [`GarbageList`] holding them.
    pub garbage_list: Vec<ChunkId>,
}

/// The collector's pending chunks, stored when they are too many for the head.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GarbageList {
    pub ids: Vec<ChunkId>,
}

impl GarbageList {
    pub fn encode(&self) -> Vec<u8> {
        encode(TAG_GARBAGE, self)
    }
    pub fn decode(bytes: &[u8]) -> FsResult<Self> {
        decode(TAG_GARBAGE, "garbage list", bytes)
    }
}

/// A head as written before the collector (tag [`TAG_HEAD_V1`]).
#[derive(Deserialize)]
struct HeadV1 {
    format: u32,
    chunk_size: u32,
    created: Timestamp,
    next_ino: u64,
    checkpoint: Vec<ChunkId>,
    journal: Vec<Vec<ChunkId>>,
    tail: Vec<JournalOp>,
}

/// Format version of a volume: 1 was one record per inode and directory bucket, written through;
/// 2 is the volume log (head, journal segments, checkpoints).
pub const FORMAT: u32 = 2;

/// One committed piece of the journal: operations in the order they apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub ops: Vec<JournalOp>,
}

/// A redo record. Each sets one key to its new value (an inode's attributes, a directory entry,
/// a file's chunk, an inode's existence), so replaying a segment twice changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JournalOp {
    /// Creates the inode or replaces its attributes (entries and chunks stay).
    Put {
        ino: u64,
        meta: Meta,
    },
    /// Adds an entry to a directory, or replaces the entry of the same name.
    Link {
        dir: u64,
        entry: DirEntry,
    },
    Unlink {
        dir: u64,
        name: Vec<u8>,
    },
    /// Sets chunk `idx` of a file (`None`: a hole), dropping the chunk's patches.
    Chunk {
        ino: u64,
        idx: u64,
        id: Option<ChunkId>,
    },
    /// Changes a few bytes of chunk `idx` of a file (a small write, a truncation or a punched
    /// hole inside it), stored inline instead of a new chunk. Applying it again leaves the same
    /// bytes.
    Patch {
        ino: u64,
        idx: u64,
        patch: Patch,
    },
    /// The inode is gone, with its entries and chunks.
    Free {
        ino: u64,
    },
}

/// An inode's attributes: everything but a directory's entries and a file's chunks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
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
    /// A directory's parent (`..`), 0 for other kinds.
    pub parent: u64,
    /// A symlink's target, empty for other kinds.
    pub target: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: FileKind,
}

/// A chunk of a file as a checkpoint stores it: its stored chunk (`None`: a hole) and, when small
/// writes were patched over it, the chunk holding those patches (a [`Patches`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredChunk {
    pub id: Option<ChunkId>,
    pub patches: Option<ChunkId>,
}

/// A change to some bytes of a chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Patch {
    /// `data` at `off`.
    Write { off: u32, data: Vec<u8> },
    /// Zeros over `[off, off + len)`.
    Zero { off: u32, len: u32 },
}

impl Patch {
    /// What the patch costs to keep: its bytes (a run of zeros costs a few).
    pub fn cost(&self) -> usize {
        match self {
            Patch::Write { data, .. } => data.len(),
            Patch::Zero { .. } => 8,
        }
    }
}

/// The patches of one chunk, in the order they apply over the chunk (a checkpoint stores each
/// patched chunk's list apart, so a page names it by id and rewrites it only when it changes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patches {
    pub list: Vec<Patch>,
}

/// An inode as a checkpoint stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInode {
    pub ino: u64,
    pub meta: Meta,
    pub entries: Vec<DirEntry>,
    pub chunks: Vec<(u64, StoredChunk)>,
}

/// The inodes of one page of a checkpoint: inode numbers `[n * PAGE_INODES, (n+1) * PAGE_INODES)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub inodes: Vec<StoredInode>,
}

/// Inode numbers per checkpoint page. A checkpoint rewrites only the pages that changed.
pub const PAGE_INODES: u64 = 256;

/// A checkpoint's root: the pieces of each page (a page larger than a block is split).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    pub pages: Vec<(u64, Vec<ChunkId>)>,
}

/// Splits an encoded value into pieces of at most `max` bytes (at least one piece).
pub fn split(bytes: &[u8], max: usize) -> Vec<&[u8]> {
    if bytes.is_empty() {
        return vec![bytes];
    }
    bytes.chunks(max.max(1)).collect()
}

/// Name keys are 62-bit, so that readdir cookies (`key + 3`) stay positive as `off_t`.
pub const KEY_BITS: u32 = 62;

/// The 62-bit key of a directory entry name: its position in readdir order and its bucket.
pub fn name_key(name: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"dbqsfs-fs dirent v1\0");
    h.update(name);
    let bytes = h.finalize();
    u64::from_be_bytes(bytes.as_bytes()[..8].try_into().unwrap()) >> (64 - KEY_BITS)
}

fn encode<T: Serialize>(tag: u8, value: &T) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(postcard::to_stdvec(value).expect("in-memory serialization cannot fail"));
    out
}

fn decode<T: DeserializeOwned>(tag: u8, what: &'static str, bytes: &[u8]) -> FsResult<T> {
    match bytes.split_first() {
        Some((t, rest)) if *t == tag => postcard::from_bytes(rest).map_err(|e| FsError::Decode {
            what,
            detail: e.to_string(),
        }),
        Some((t, _)) => Err(FsError::Decode {
            what,
            detail: format!("unknown tag {t:#x}"),
        }),
        None => Err(FsError::Decode {
            what,
            detail: "empty value".into(),
        }),
    }
}

impl Head {
    /// The most bytes of encoded operations a head holds in its tail, for blocks of `max_block`.
    pub fn tail_max(max_block: usize) -> usize {
        (max_block / 4).min(64 << 10)
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(TAG_HEAD, self)
    }
    pub fn decode(bytes: &[u8]) -> FsResult<Self> {
        if bytes.first() == Some(&TAG_HEAD_V1) {
            let v1: HeadV1 = decode(TAG_HEAD_V1, "volume head", bytes)?;
            return Ok(Head {
                format: v1.format,
                chunk_size: v1.chunk_size,
                created: v1.created,
                next_ino: v1.next_ino,
                checkpoint: v1.checkpoint,
                journal: v1.journal,
                tail: v1.tail,
                gc_floor: 0,
                garbage: Vec::new(),
                garbage_list: Vec::new(),
            });
        }
        decode(TAG_HEAD, "volume head", bytes)
    }
}

/// A segment's encoding, from borrowed operations.
#[derive(Serialize)]
struct SegmentRef<'a> {
    ops: &'a [JournalOp],
}

impl Segment {
    pub fn encode(&self) -> Vec<u8> {
        Segment::encode_ops(&self.ops)
    }
    pub fn encode_ops(ops: &[JournalOp]) -> Vec<u8> {
        encode(TAG_SEGMENT, &SegmentRef { ops })
    }
    pub fn decode(bytes: &[u8]) -> FsResult<Self> {
        decode(TAG_SEGMENT, "journal segment", bytes)
    }
}

impl Page {
    pub fn encode(&self) -> Vec<u8> {
        encode(TAG_PAGE, self)
    }
    pub fn decode(bytes: &[u8]) -> FsResult<Self> {
        decode(TAG_PAGE, "checkpoint page", bytes)
    }
}

impl Patches {
    pub fn encode(&self) -> Vec<u8> {
        encode(TAG_PATCHES, self)
    }
    pub fn decode(bytes: &[u8]) -> FsResult<Self> {
        decode(TAG_PATCHES, "chunk patches", bytes)
    }
}

impl Root {
    pub fn encode(&self) -> Vec<u8> {
        encode(TAG_ROOT, self)
    }
    pub fn decode(bytes: &[u8]) -> FsResult<Self> {
        decode(TAG_ROOT, "checkpoint root", bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_before_the_epoch_round_trip() {
        for t in [
            Timestamp { secs: -1, nsec: 5 },
            Timestamp {
                secs: -100,
                nsec: 0,
            },
            Timestamp { secs: 7, nsec: 9 },
        ] {
            assert_eq!(Timestamp::from_system(t.to_system()), t);
        }
    }

    #[test]
    fn a_value_with_the_wrong_tag_is_refused() {
        let head = Head {
            format: FORMAT,
            chunk_size: 1,
            created: Timestamp::default(),
            next_ino: 2,
            checkpoint: Vec::new(),
            journal: vec![vec![[7; 32]]],
            tail: vec![JournalOp::Free { ino: 9 }],
            gc_floor: 3,
            garbage: vec![[8; 32]],
            garbage_list: vec![[9; 32]],
        };
        assert!(Segment::decode(&head.encode()).is_err());
        assert_eq!(Head::decode(&head.encode()).unwrap(), head);
    }

    #[test]
    fn a_head_written_before_the_collector_still_opens() {
        #[derive(Serialize)]
        struct V1<'a> {
            format: u32,
            chunk_size: u32,
            created: Timestamp,
            next_ino: u64,
            checkpoint: &'a [ChunkId],
            journal: &'a [Vec<ChunkId>],
            tail: &'a [JournalOp],
        }
        let journal = vec![vec![[7; 32]]];
        let old = encode(
            TAG_HEAD_V1,
            &V1 {
                format: FORMAT,
                chunk_size: 4096,
                created: Timestamp::default(),
                next_ino: 5,
                checkpoint: &[[1; 32]],
                journal: &journal,
                tail: &[],
            },
        );
        let head = Head::decode(&old).unwrap();
        assert_eq!((head.next_ino, head.gc_floor), (5, 0));
        assert_eq!(head.journal, journal);
        assert!(head.garbage.is_empty() && head.garbage_list.is_empty());
    }

    #[test]
    fn split_keeps_every_byte_in_order() {
        let bytes: Vec<u8> = (0..10u8).collect();
        assert_eq!(
            split(&bytes, 4),
            vec![&bytes[..4], &bytes[4..8], &bytes[8..]]
        );
        assert_eq!(split(&[], 4).len(), 1);
    }
}
