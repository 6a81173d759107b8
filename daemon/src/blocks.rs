//! Files as blocks: a file of at most one block is one content block; a larger file becomes
//! content blocks of at most [`MAX_BLOCK`] bytes plus a manifest content block listing them.
//!
//! Goals: the printed [`FileId`] says which of the two it is (`c:<hex>` or `m:<hex>`), so `get` needs
//! no guessing; every chunk is verified by the client against its id, and the manifest's sizes and
//! total are checked on reassembly. Non-goals: deduplicating chunking (fixed-size chunks only),
//! files too large for one manifest (about 28,000 chunks, roughly 28 GiB).
//!
//! Every block is put held by an [`Owner`] (a key and the numbering of its holds, `dbqs::refs`), and
//! [`remove_file`] releases the owner's hold on every block of a file, so that the replicas delete
//! them after their grace period. Holds are per owner, not counted: a block that two files of one
//! owner share goes when either is removed.

pub use crate::client::Owner;
use crate::client::{ClientError, DbqsClient};
use dbqsfs_core::crypto::ObjectId;
use dbqsfs_core::object::MAX_BLOCK;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use tokio::task::JoinSet;

/// How many blocks are in flight at once during a transfer.
pub const PARALLEL: usize = 8;

/// The id of a stored file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileId {
    /// The file is this one content block.
    Block(ObjectId),
    /// The file is described by this manifest content block.
    Manifest(ObjectId),
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileId::Block(id) => write!(f, "c:{}", id.to_hex()),
            FileId::Manifest(id) => write!(f, "m:{}", id.to_hex()),
        }
    }
}

impl FromStr for FileId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a block id (c:<64 hex digits> or m:<64 hex digits>)");
        let (tag, hex) = s.split_once(':').ok_or_else(bad)?;
        let id = ObjectId::from_hex(hex).ok_or_else(bad)?;
        match tag {
            "c" => Ok(FileId::Block(id)),
            "m" => Ok(FileId::Manifest(id)),
            _ => Err(bad()),
        }
    }
}

/// The manifest of a large file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    /// Format tag: `b"dbqsfs-manifest-v1"`.
    magic: Vec<u8>,
    total: u64,
    chunks: Vec<(ObjectId, u32)>,
}

const MAGIC: &[u8] = b"dbqsfs-manifest-v1";

/// Why a file transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("block {0} was not found in the cluster")]
    NotFound(String),
    #[error("manifest {0} is malformed: {1}")]
    BadManifest(String, String),
    #[error("file too large for one manifest")]
    TooLarge,
    #[error("transfer task failed: {0}")]
    Task(String),
}

async fn put_all(
    client: &DbqsClient,
    owner: &Owner,
    data: &[u8],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<(ObjectId, u32)>, TransferError> {
    let chunks: Vec<&[u8]> = data.chunks(MAX_BLOCK).collect();
    let mut ids = vec![None; chunks.len()];
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < chunks.len() || !set.is_empty() {
        while next < chunks.len() && set.len() < PARALLEL {
            let (c, o) = (client.clone(), owner.clone());
            let chunk = chunks[next].to_vec();
            let i = next;
            set.spawn(async move {
                let len = chunk.len();
                c.put_as(&o, chunk).await.map(|id| (i, id, len))
            });
            next += 1;
        }
        if let Some(r) = set.join_next().await {
            let (i, id, len) = r.map_err(|e| TransferError::Task(e.to_string()))??;
            ids[i] = Some((id, len as u32));
            progress(len as u64);
        }
    }
    Ok(ids.into_iter().flatten().collect())
}

/// Stores `data`; `progress` is told the bytes of each block stored.
pub async fn put_file(
    client: &DbqsClient,
    owner: &Owner,
    data: &[u8],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<FileId, TransferError> {
    if data.len() <= MAX_BLOCK {
        let id = client.put_as(owner, data.to_vec()).await?;
        progress(data.len() as u64);
        return Ok(FileId::Block(id));
    }
    let chunks = put_all(client, owner, data, progress).await?;
    let manifest = Manifest {
        magic: MAGIC.to_vec(),
        total: data.len() as u64,
        chunks,
    };
    let bytes = postcard::to_stdvec(&manifest).map_err(|_| TransferError::TooLarge)?;
    if bytes.len() > MAX_BLOCK {
        return Err(TransferError::TooLarge);
    }
    Ok(FileId::Manifest(client.put_as(owner, bytes).await?))
}

/// Releases `owner`'s hold on every block of file `id` (its chunks, then its manifest, so that
/// a failure half way can be retried with the same id); returns how many blocks. The replicas
/// delete a block once every owner released it, after their grace period.
pub async fn remove_file(
    client: &DbqsClient,
    owner: &Owner,
    id: FileId,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<usize, TransferError> {
    let release = |x: ObjectId| {
        let (c, o) = (client.clone(), owner.clone());
        async move { c.release_as(&o, x).await }
    };
    let root = match id {
        FileId::Block(b) => b,
        FileId::Manifest(m) => m,
    };
    let chunks = match id {
        FileId::Block(_) => Vec::new(),
        FileId::Manifest(m) => fetch_manifest(client, m).await?.chunks,
    };
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < chunks.len() || !set.is_empty() {
        while next < chunks.len() && set.len() < PARALLEL {
            set.spawn(release(chunks[next].0));
            next += 1;
        }
        if let Some(r) = set.join_next().await {
            r.map_err(|e| TransferError::Task(e.to_string()))??;
            progress(1);
        }
    }
    release(root).await?;
    progress(1);
    Ok(chunks.len() + 1)
}

/// The total size of a stored file (fetches the manifest of a large one).
pub async fn file_size(client: &DbqsClient, id: FileId) -> Result<Option<u64>, TransferError> {
    match id {
        FileId::Block(_) => Ok(None),
        FileId::Manifest(m) => Ok(Some(fetch_manifest(client, m).await?.total)),
    }
}

async fn fetch_manifest(client: &DbqsClient, m: ObjectId) -> Result<Manifest, TransferError> {
    let name = FileId::Manifest(m).to_string();
    let bytes = client
        .get_content(m)
        .await?
        .ok_or_else(|| TransferError::NotFound(name.clone()))?;
    let manifest: Manifest = postcard::from_bytes(&bytes)
        .map_err(|e| TransferError::BadManifest(name.clone(), e.to_string()))?;
    if manifest.magic != MAGIC {
        return Err(TransferError::BadManifest(name, "wrong format tag".into()));
    }
    let sum: u64 = manifest.chunks.iter().map(|(_, n)| u64::from(*n)).sum();
    if sum != manifest.total || manifest.chunks.iter().any(|(_, n)| *n as usize > MAX_BLOCK) {
        return Err(TransferError::BadManifest(
            name,
            "sizes do not add up".into(),
        ));
    }
    Ok(manifest)
}

/// Fetches a stored file and hands its bytes, in order, to `sink`; `progress` is told the bytes
/// of each block fetched.
pub async fn get_file(
    client: &DbqsClient,
    id: FileId,
    sink: &mut (dyn FnMut(&[u8]) -> std::io::Result<()> + Send),
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), TransferError> {
    let m = match id {
        FileId::Block(b) => {
            let data = client
                .get_content(b)
                .await?
                .ok_or_else(|| TransferError::NotFound(id.to_string()))?;
            progress(data.len() as u64);
            return sink(&data).map_err(|e| TransferError::Task(e.to_string()));
        }
        FileId::Manifest(m) => fetch_manifest(client, m).await?,
    };
    let mut set = JoinSet::new();
    let mut ready = std::collections::BTreeMap::new();
    let (mut next, mut written) = (0, 0);
    while written < m.chunks.len() {
        while next < m.chunks.len() && set.len() < PARALLEL && next < written + 2 * PARALLEL {
            let (cid, len) = m.chunks[next];
            let c = client.clone();
            let i = next;
            set.spawn(async move { (i, cid, len, c.get_content(cid).await) });
            next += 1;
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let (i, cid, len, data) = r.map_err(|e| TransferError::Task(e.to_string()))?;
        let data = data?.ok_or_else(|| TransferError::NotFound(FileId::Block(cid).to_string()))?;
        if data.len() != len as usize {
            return Err(TransferError::BadManifest(
                id.to_string(),
                format!("chunk {i} has {} bytes, manifest says {len}", data.len()),
            ));
        }
        progress(data.len() as u64);
        ready.insert(i, data);
        while let Some(data) = ready.remove(&written) {
            sink(&data).map_err(|e| TransferError::Task(e.to_string()))?;
            written += 1;
        }
    }
    Ok(())
}
