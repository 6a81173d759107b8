//! How a volume is laid out on the backend: record labels and value encodings.
//!
//! Goals: a small, versioned, documented format that a fresh mount can read back, and that
//! keeps each mutation to a few small records (one inode, at most a couple of directory buckets).
//!
//! Labels (relative to the volume; the backend prefixes the volume name):
//! - `super`                     — [`Superblock`]: format, chunk size, inode-number reservation.
//! - `inode/<n>`                 — [`InodeRecord`] of inode `n` (decimal). Root is inode 1.
//! - `dir/<n>/<depth>/<prefix>`  — [`Bucket`] of a hashed directory `n`: the entries whose name
//!   key has the top `depth` bits equal to `prefix` (hex). A bucket that splits is replaced by two
//!   buckets one level deeper; its old record becomes garbage and its label is never reused.
//!
//! Chunks: file data (fixed-size, aligned: chunk `i` holds bytes `[i*cs, (i+1)*cs)`, possibly
//! shorter at the end of the data) and [`IndexChunk`]s listing the data chunks of one group of
//! a large file.
//!
//! Every value is one tag byte followed by the postcard encoding of the struct. The tag names the
//! kind and the format revision, so a reader can refuse what it does not understand.
//!
//! Non-goals: multi-record atomicity (each record is replaced atomically; operations order their
//! writes so a crash leaves at worst an unreferenced inode or a stale link count), garbage
//! collection of unreachable chunks and records.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::backend::ChunkId;
use crate::error::{FsError, FsResult};

pub const SUPER_LABEL: &[u8] = b"super";
pub const ROOT_INO: u64 = 1;

pub fn inode_label(ino: u64) -> Vec<u8> {
    format!("inode/{ino}").into_bytes()
}

pub fn bucket_label(dir: u64, leaf: Leaf) -> Vec<u8> {
    format!("dir/{dir}/{}/{:x}", leaf.depth, leaf.prefix).into_bytes()
}

const TAG_SUPER: u8 = 0x51;
const TAG_INODE: u8 = 0x49;
const TAG_BUCKET: u8 = 0x42;
const TAG_INDEX: u8 = 0x58;

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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    /// Bytes per data chunk; fixed at format time.
    pub chunk_size: u32,
    /// Data-chunk entries per index chunk of a large file; fixed at format time.
    pub index_group: u32,
    /// Inode numbers below this may have been handed out; a new mount starts here.
    pub ino_reserved: u64,
    pub created: Timestamp,
}

/// One inode as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeRecord {
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
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Regular file: which chunk holds each chunk-sized piece. Missing pieces are holes.
    File(FileMap),
    Dir(DirBody),
    Symlink(Vec<u8>),
    /// FIFO, socket or device: nothing beyond the attributes.
    Special,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileMap {
    /// Sorted `(chunk index, chunk id)` pairs, for small files.
    Inline(Vec<(u64, ChunkId)>),
    /// Sorted `(group, index chunk id)` pairs; group `g` covers chunk indices
    /// `[g*index_group, (g+1)*index_group)` and only groups with data are listed.
    Indexed(Vec<(u64, ChunkId)>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirBody {
    pub parent: u64,
    /// Number of entries (excluding `.` and `..`).
    pub count: u64,
    pub layout: DirLayout,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirLayout {
    /// Entries kept in the directory's own inode record (small directories).
    Inline(Vec<DirEntry>),
    /// Entries spread over bucket records; these leaves partition the key space.
    Hashed(Vec<Leaf>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: FileKind,
}

/// A bucket of a hashed directory: all keys whose top `depth` bits equal `prefix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Leaf {
    pub depth: u8,
    pub prefix: u64,
}

/// Name keys are 62-bit, so that readdir cookies (`key + 3`) stay positive as `off_t`.
pub const KEY_BITS: u32 = 62;

impl Leaf {
    pub const ROOT: Leaf = Leaf {
        depth: 0,
        prefix: 0,
    };

    pub fn first_key(self) -> u64 {
        if self.depth == 0 {
            0
        } else {
            self.prefix << (KEY_BITS - self.depth as u32)
        }
    }

    pub fn contains(self, key: u64) -> bool {
        self.depth == 0 || key >> (KEY_BITS - self.depth as u32) == self.prefix
    }

    pub fn children(self) -> (Leaf, Leaf) {
        let d = self.depth + 1;
        (
            Leaf {
                depth: d,
                prefix: self.prefix << 1,
            },
            Leaf {
                depth: d,
                prefix: (self.prefix << 1) | 1,
            },
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub entries: Vec<DirEntry>,
}

/// The data-chunk list of one group of a large file: `(index within group, chunk id)`, sorted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexChunk {
    pub group: u64,
    pub entries: Vec<(u32, ChunkId)>,
}

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

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        encode(TAG_SUPER, self)
    }
    pub fn decode(bytes: &[u8]) -> FsResult<Self> {
        decode(TAG_SUPER, "superblock", bytes)
    }
}

impl InodeRecord {
    pub fn encode(&self) -> Vec<u8> {
        encode(TAG_INODE, self)
    }
    pub fn decode(bytes: &[u8]) -> FsResult<Self> {
        decode(TAG_INODE, "inode", bytes)
    }
}

impl Bucket {
    pub fn encode(&self) -> Vec<u8> {
        encode(TAG_BUCKET, self)
    }
    pub fn decode(bytes: &[u8]) -> FsResult<Self> {
        decode(TAG_BUCKET, "directory bucket", bytes)
    }
}

impl IndexChunk {
    pub fn encode(&self) -> Vec<u8> {
        encode(TAG_INDEX, self)
    }
    pub fn decode(bytes: &[u8]) -> FsResult<Self> {
        decode(TAG_INDEX, "index chunk", bytes)
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
    fn leaves_split_into_halves_of_their_key_range() {
        let (a, b) = Leaf::ROOT.children();
        assert!(a.contains(0) && !a.contains(1 << 61) && b.contains(1 << 61));
        assert_eq!(b.first_key(), 1 << 61);
        let (c, d) = b.children();
        assert_eq!(c.first_key(), 1 << 61);
        assert_eq!(d.first_key(), 3 << 60);
        assert!(d.contains((1 << 62) - 1));
    }

    #[test]
    fn a_value_with_the_wrong_tag_is_refused() {
        let sb = Superblock {
            chunk_size: 1,
            index_group: 1,
            ino_reserved: 2,
            created: Timestamp::default(),
        };
        assert!(InodeRecord::decode(&sb.encode()).is_err());
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }
}
