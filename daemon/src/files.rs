//! The on-disk formats of a node directory and of a cluster description.
//!
//! Goals: one place that reads and writes `node.toml`, `cluster.toml` and key files, with errors
//! that name the file. Non-goals: configuration management beyond a local test cluster.
//!
//! Layout written by `dbqsfs cluster init`:
//! - `DIR/cluster.toml`: [`ClusterFile`], what clients need (genesis configuration, client key path);
//! - `DIR/client.key`, `DIR/admission.key`: 32-byte seeds in hex, mode 0600;
//! - `DIR/node-<i>/node.toml`: [`NodeFile`]; `DIR/node-<i>/node.key`: the node's seed, mode 0600;
//! - `DIR/node-<i>/data/`: the node's store; `DIR/node-<i>/node.pid`, `node.log` when run by `cluster up`.

use dbqsfs_core::config::CertifiedConfig;
use dbqsfs_core::crypto::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The I/O error is in the message, not a `source`, so that a chain of causes (`{:#}`)
    /// does not say it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

impl FileError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
        let path = path.to_path_buf();
        move |error| FileError::Io { path, error }
    }
    fn invalid(path: &Path, what: impl Into<String>) -> FileError {
        FileError::Invalid {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

/// `node.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeFile {
    /// UDP address to listen on, e.g. `127.0.0.1:7100`.
    pub listen: String,
    /// The genesis configuration: hex of its postcard encoding.
    pub genesis: String,
    /// Public keys (hex) of clients allowed to use this node, besides the members.
    pub clients: Vec<String>,
    /// The cluster's admission public key (hex).
    pub admission_key: String,
    /// The admission key's signature over this node's public key (hex).
    pub admission_cert: String,
    /// Ask the MS to join the cluster until a configuration includes this node.
    #[serde(default)]
    pub join: bool,
    /// A member's address to learn configurations from while this node is not a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<String>,
    /// The node's settings (`[settings]`); the flags of `dbqsfs node` override them.
    #[serde(default, skip_serializing_if = "NodeSettings::is_empty")]
    pub settings: NodeSettings,
}

/// Settings of a node kept in its `node.toml` (so `cluster up` and service managers start it
/// with them). Each is the `dbqsfs node` flag of the same name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Cap on the bytes per second its state transfers receive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_rate_limit: Option<u64>,
    /// Cap on the bytes per second its state transfers receive while clients are served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_rate_under_load: Option<u64>,
    /// Free space (MiB) kept for metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_mib: Option<u64>,
    /// Where to serve Prometheus metrics, `IP:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// What to log, in `RUST_LOG`'s syntax (e.g. `info` or `warn,dbqsfs_daemon::transfer=debug`);
    /// `RUST_LOG` overrides it. Default `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// How long (seconds) a content block every owner released stays before it is deleted
    /// (readers that started before the release finish meanwhile). Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_grace_secs: Option<u64>,
}

impl NodeSettings {
    pub fn is_empty(&self) -> bool {
        *self == NodeSettings::default()
    }
}

/// `cluster.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    /// The genesis configuration: hex of its postcard encoding.
    pub genesis: String,
    /// The client's key file, relative to this file's directory unless absolute.
    pub client_key: String,
    /// The cluster's admission public key (hex).
    pub admission_key: String,
    /// Node directories, relative to this file's directory.
    pub nodes: Vec<String>,
}

/// What `dbqsfs admit` prints for a node that joins: its admission certificate and what it needs to
/// trust the cluster. Printed as hex of its postcard encoding.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinTicket {
    pub cert: dbqsfs_core::ms::membership::AdmissionCert,
    pub admission_key: PublicKey,
    pub genesis: CertifiedConfig,
    pub clients: Vec<PublicKey>,
}

impl JoinTicket {
    pub fn encode(&self) -> String {
        hex::encode(postcard::to_allocvec(self).unwrap_or_default())
    }

    /// Decodes a ticket from its hex text (`what` names it in errors).
    pub fn decode(what: &Path, text: &str) -> Result<JoinTicket, FileError> {
        hex::decode(text.trim())
            .ok()
            .and_then(|b| postcard::from_bytes(&b).ok())
            .ok_or_else(|| FileError::invalid(what, "not a certificate printed by `dbqsfs admit`"))
    }
}

/// What to tell about a configuration an older version wrote.
pub const OLDER_FORMAT: &str = "a cluster made before configurations carried the MS's threshold key (dbqsfs of 2026-12-07 and older) cannot be read by this version: make a new cluster and copy the files over";

pub fn encode_genesis(g: &CertifiedConfig) -> String {
    hex::encode(postcard::to_stdvec(g).expect("configurations encode"))
}

pub fn decode_genesis(path: &Path, hex: &str) -> Result<CertifiedConfig, FileError> {
    let bytes = hex::decode(hex.trim())
        .ok()
        .ok_or_else(|| FileError::invalid(path, "genesis is not hex"))?;
    postcard::from_bytes(&bytes).map_err(|e| {
        FileError::invalid(
            path,
            format!("genesis does not decode ({e}); {OLDER_FORMAT}"),
        )
    })
}

pub fn decode_public(path: &Path, hex: &str) -> Result<PublicKey, FileError> {
    PublicKey::from_hex(hex.trim())
        .ok_or_else(|| FileError::invalid(path, format!("{hex:?} is not a 32-byte hex key")))
}

/// Writes a secret seed, readable by the owner only.
pub fn write_key(path: &Path, key: &Keypair) -> Result<(), FileError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(FileError::io(path))?;
    writeln!(f, "{}", hex::encode(key.seed())).map_err(FileError::io(path))?;
    f.sync_all().map_err(FileError::io(path))
}

pub fn read_key(path: &Path) -> Result<Keypair, FileError> {
    let text = fs::read_to_string(path).map_err(FileError::io(path))?;
    let bytes = hex::decode(text.trim())
        .ok()
        .ok_or_else(|| FileError::invalid(path, "key is not hex"))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| FileError::invalid(path, "key is not 32 bytes"))?;
    Ok(Keypair::from_seed(seed))
}

/// A key from OS randomness.
pub fn random_key() -> Result<Keypair, getrandom::Error> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    Ok(Keypair::from_seed(seed))
}

pub fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<(), FileError> {
    let text = toml::to_string(value).map_err(|e| FileError::invalid(path, e.to_string()))?;
    fs::write(path, text).map_err(FileError::io(path))
}

pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = fs::read_to_string(path).map_err(FileError::io(path))?;
    toml::from_str(&text).map_err(|e| FileError::invalid(path, e.to_string()))
}

/// A cluster description loaded for a client.
pub struct ClusterInfo {
    pub genesis: CertifiedConfig,
    pub client_key: Keypair,
    pub file: ClusterFile,
    pub dir: PathBuf,
}

impl ClusterInfo {
    pub fn load(path: &Path) -> Result<ClusterInfo, FileError> {
        let file: ClusterFile = read_toml(path)?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let genesis = decode_genesis(path, &file.genesis)?;
        let key_path = dir.join(&file.client_key);
        let client_key = read_key(&key_path)?;
        Ok(ClusterInfo {
            genesis,
            client_key,
            file,
            dir,
        })
    }
}
