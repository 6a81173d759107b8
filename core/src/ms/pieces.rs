//! Whole configurations in bounded pieces (docs/DESIGN.md §3, "Dissemination"): a certified
//! configuration is about 78 bytes a member (7.6 MiB at 100,000 members, beyond one message), so
//! a node or client that asks for a whole configuration gets it as pieces of [`PIECE_LEN`] bytes
//! of its canonical encoding, from any sources, each checked on arrival, and a transfer resumes
//! from the pieces it holds.
//!
//! How a piece is checked: a configuration's hash ([`Configuration::hash`]) is the BLAKE3 tree
//! hash (derive-key mode) of its encoding, and pieces are aligned power-of-two subtrees of that
//! tree, so the chaining values of all pieces (the head's `cvs`: 32 bytes a piece, 3.8 KiB at
//! 100,000 members) combine into the hash, and a piece is right only if its own chaining value is
//! its entry in the head. A receiver holding the configuration before checks, in order: the
//! certificate over the hash (`2f_ms+1` signatures of that configuration's committee), the head's
//! chaining values against the hash, every piece against its chaining value; the assembled
//! configuration is accepted only by [`CertifiedConfig::verify_successor`], as any other.
//!
//! Non-goals: choosing sources (the caller gives the members it may ask: `ms::node` asks the
//! member that said it holds the epoch and the committee that certified it), persisting pieces
//! (a driver may keep [`Download::held`] and [`Download::resume`] from it).
//!
//! Fault model: sources are untrusted. A head that does not verify is refused whole; a wrong piece
//! is refused, its source is not asked again, and the piece is asked of another source.

use crate::config::{
    Certificate, CertifiedConfig, ConfigError, ConfigHash, Configuration, Epoch,
    CONFIG_HASH_CONTEXT,
};
use crate::crypto::NodeId;
use blake3::hazmat::{
    hash_derive_key_context, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
    ChainingValue, HasherExt, Mode,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Bytes in a piece (the last may be shorter): a power of two times BLAKE3's 1 KiB chunk, so that
/// every piece is a subtree of the configuration's hash tree.
pub const PIECE_LEN: u64 = 64 * 1024;
/// The largest configuration a head may announce (about 3 million members).
pub const MAX_CONFIG_LEN: u64 = 256 * 1024 * 1024;
/// Pieces asked and not yet answered, at most, in one transfer.
pub const WINDOW: usize = 8;
/// A piece not answered within this long is asked of another source.
pub const PIECE_TIMEOUT_MS: u64 = 3_000;

/// What a receiver needs before the pieces: the configuration's epoch, hash and length, the
/// chaining value of every piece (none when the configuration is a single piece), and the
/// certificate over the hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigHead {
    pub epoch: Epoch,
    pub hash: ConfigHash,
    pub len: u64,
    pub cvs: Vec<ChainingValue>,
    pub cert: Certificate,
}

/// Why a head, a piece or an assembled configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PieceError {
    #[error("the head is for epoch {got}, not for the epoch after {held}")]
    WrongEpoch { held: Epoch, got: Epoch },
    #[error("a configuration of {0} bytes is empty or beyond the limit")]
    BadLength(u64),
    #[error("the head's piece hashes do not make the certified hash")]
    BadManifest,
    #[error("piece {0} does not match the certified hash")]
    BadPiece(u32),
    #[error("piece {0} is not a piece of this configuration")]
    NoSuchPiece(u32),
    #[error("the transfer holds {held} of {total} pieces")]
    Incomplete { held: u32, total: u32 },
    #[error("the assembled configuration does not decode")]
    Undecodable,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

fn context() -> [u8; 32] {
    hash_derive_key_context(CONFIG_HASH_CONTEXT)
}

/// The chaining value of piece `index` (its bytes `bytes`) in the configuration hash tree.
fn piece_cv(ctx: &[u8; 32], index: u32, bytes: &[u8]) -> ChainingValue {
    blake3::Hasher::new_from_context_key(ctx)
        .set_input_offset(index as u64 * PIECE_LEN)
        .update(bytes)
        .finalize_non_root()
}

/// The chaining value of the subtree of `len` bytes whose first piece is `cvs[0]`.
fn subtree(ctx: &[u8; 32], cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if len <= PIECE_LEN {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let split = (left / PIECE_LEN) as usize;
    merge_subtrees_non_root(
        &subtree(ctx, &cvs[..split], left),
        &subtree(ctx, &cvs[split..], len - left),
        Mode::DeriveKeyMaterial(ctx),
    )
}

/// The hash of an encoding of `len` bytes (more than one piece) whose pieces have `cvs`.
fn root(ctx: &[u8; 32], cvs: &[ChainingValue], len: u64) -> ConfigHash {
    let left = left_subtree_len(len);
    let split = (left / PIECE_LEN) as usize;
    *merge_subtrees_root(
        &subtree(ctx, &cvs[..split], left),
        &subtree(ctx, &cvs[split..], len - left),
        Mode::DeriveKeyMaterial(ctx),
    )
    .as_bytes()
}

/// Number of pieces of an encoding of `len` bytes.
fn piece_count(len: u64) -> u32 {
    len.div_ceil(PIECE_LEN) as u32
}

/// Piece `index` of `bytes` (an encoding), if there is one.
pub fn piece(bytes: &[u8], index: u32) -> Option<&[u8]> {
    let start = (index as u64).checked_mul(PIECE_LEN)? as usize;
    if start >= bytes.len() {
        return None;
    }
    let end = (start + PIECE_LEN as usize).min(bytes.len());
    Some(&bytes[start..end])
}

impl ConfigHead {
    /// The head of `cc` and the encoding its pieces are cut from.
    pub fn of(cc: &CertifiedConfig) -> (ConfigHead, Vec<u8>) {
        let bytes = postcard::to_stdvec(&cc.config).expect("configurations always encode");
        let ctx = context();
        let len = bytes.len() as u64;
        let cvs = if len <= PIECE_LEN {
            Vec::new()
        } else {
            bytes
                .chunks(PIECE_LEN as usize)
                .enumerate()
                .map(|(i, p)| piece_cv(&ctx, i as u32, p))
                .collect()
        };
        let head = ConfigHead {
            epoch: cc.config.epoch,
            hash: cc.config.hash(),
            len,
            cvs,
            cert: cc.cert.clone(),
        };
        (head, bytes)
    }

    pub fn pieces(&self) -> u32 {
        piece_count(self.len)
    }

    /// Accepts the head as that of the configuration after `prev`: the epoch follows, the
    /// committee of `prev` certified the hash, and the chaining values make the hash.
    pub fn verify(&self, prev: &Configuration) -> Result<(), PieceError> {
        if self.epoch != prev.epoch + 1 {
            return Err(PieceError::WrongEpoch {
                held: prev.epoch,
                got: self.epoch,
            });
        }
        if self.len == 0 || self.len > MAX_CONFIG_LEN {
            return Err(PieceError::BadLength(self.len));
        }
        self.cert.verify_for(&self.hash, prev)?;
        let n = self.pieces() as usize;
        let manifest_ok = if n == 1 {
            self.cvs.is_empty()
        } else {
            self.cvs.len() == n && root(&context(), &self.cvs, self.len) == self.hash
        };
        if !manifest_ok {
            return Err(PieceError::BadManifest);
        }
        Ok(())
    }

    /// Whether `bytes` is piece `index` of the configuration (meaningful once the head verified;
    /// never panics on a head that does not).
    pub fn check_piece(&self, index: u32, bytes: &[u8]) -> Result<(), PieceError> {
        let n = self.pieces();
        if index >= n {
            return Err(PieceError::NoSuchPiece(index));
        }
        let expected = if index + 1 < n {
            PIECE_LEN
        } else {
            self.len - (n as u64 - 1) * PIECE_LEN
        };
        let ctx = context();
        let right = bytes.len() as u64 == expected
            && if n == 1 {
                *blake3::Hasher::new_from_context_key(&ctx)
                    .update(bytes)
                    .finalize()
                    .as_bytes()
                    == self.hash
            } else {
                self.cvs.get(index as usize) == Some(&piece_cv(&ctx, index, bytes))
            };
        if right {
            Ok(())
        } else {
            Err(PieceError::BadPiece(index))
        }
    }
}

/// A piece to ask of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask {
    pub to: NodeId,
    pub index: u32,
}

/// One whole configuration coming in pieces: which piece to ask of whom, what came, which sources
/// lied. Clock in milliseconds, given by the driver.
#[derive(Debug)]
pub struct Download {
    head: ConfigHead,
    pieces: BTreeMap<u32, Vec<u8>>,
    /// Pieces asked: of whom, until when.
    asked: BTreeMap<u32, (NodeId, u64)>,
    /// For each piece, the source that last failed to deliver it (asked of another next).
    failed: BTreeMap<u32, NodeId>,
    refused: BTreeSet<NodeId>,
    turn: usize,
}

impl Download {
    /// A transfer of the configuration after `prev` described by `head` (verified here).
    pub fn new(prev: &Configuration, head: ConfigHead) -> Result<Download, PieceError> {
        head.verify(prev)?;
        Ok(Download {
            head,
            pieces: BTreeMap::new(),
            asked: BTreeMap::new(),
            failed: BTreeMap::new(),
            refused: BTreeSet::new(),
            turn: 0,
        })
    }

    /// A transfer resumed with pieces held from before (each checked again; wrong ones dropped).
    pub fn resume(
        prev: &Configuration,
        head: ConfigHead,
        held: impl IntoIterator<Item = (u32, Vec<u8>)>,
    ) -> Result<Download, PieceError> {
        let mut d = Download::new(prev, head)?;
        for (index, bytes) in held {
            if d.head.check_piece(index, &bytes).is_ok() {
                d.pieces.insert(index, bytes);
            }
        }
        Ok(d)
    }

    pub fn head(&self) -> &ConfigHead {
        &self.head
    }

    /// The pieces held (what a driver persists to resume).
    pub fn held(&self) -> impl Iterator<Item = (u32, &[u8])> {
        self.pieces.iter().map(|(i, b)| (*i, b.as_slice()))
    }

    /// (pieces held, pieces in all).
    pub fn progress(&self) -> (u32, u32) {
        (self.pieces.len() as u32, self.head.pieces())
    }

    pub fn is_complete(&self) -> bool {
        self.pieces.len() as u32 == self.head.pieces()
    }

    /// The sources that sent a wrong piece.
    pub fn refused(&self) -> &BTreeSet<NodeId> {
        &self.refused
    }

    /// Whether the transfer can go on with `sources`: some piece is asked, or a source that did
    /// not lie is left.
    pub fn can_go_on(&self, sources: &[NodeId]) -> bool {
        self.is_complete()
            || !self.asked.is_empty()
            || sources.iter().any(|s| !self.refused.contains(s))
    }

    /// The pieces to ask now, of `sources` in turn (never one that lied, and for a piece that a
    /// source failed, another one if there is one): pieces not yet asked, and those whose answer
    /// is overdue, while at most [`WINDOW`] are in flight.
    pub fn asks(&mut self, now_ms: u64, sources: &[NodeId]) -> Vec<Ask> {
        let overdue: Vec<u32> = self
            .asked
            .iter()
            .filter(|(_, (_, until))| *until <= now_ms)
            .map(|(i, _)| *i)
            .collect();
        for index in overdue {
            if let Some((from, _)) = self.asked.remove(&index) {
                self.failed.insert(index, from);
            }
        }
        let usable: Vec<NodeId> = sources
            .iter()
            .filter(|s| !self.refused.contains(s))
            .copied()
            .collect();
        if usable.is_empty() {
            return Vec::new();
        }
        let wanted: Vec<u32> = (0..self.head.pieces())
            .filter(|i| !self.pieces.contains_key(i) && !self.asked.contains_key(i))
            .take(WINDOW.saturating_sub(self.asked.len()))
            .collect();
        let mut out = Vec::with_capacity(wanted.len());
        for index in wanted {
            let mut to = usable[self.turn % usable.len()];
            self.turn = self.turn.wrapping_add(1);
            if usable.len() > 1 && self.failed.get(&index) == Some(&to) {
                to = usable[self.turn % usable.len()];
                self.turn = self.turn.wrapping_add(1);
            }
            self.asked.insert(index, (to, now_ms + PIECE_TIMEOUT_MS));
            out.push(Ask { to, index });
        }
        out
    }

    /// When the first piece asked becomes overdue, if any is asked.
    pub fn next_deadline(&self) -> Option<u64> {
        self.asked.values().map(|(_, until)| *until).min()
    }

    /// Piece `index` from `from`. Kept if it is right (`Ok(true)` if it is new); a wrong piece
    /// refuses its source for the rest of the transfer and is asked again of another.
    pub fn on_piece(
        &mut self,
        from: NodeId,
        index: u32,
        bytes: Vec<u8>,
    ) -> Result<bool, PieceError> {
        if let Err(e) = self.head.check_piece(index, &bytes) {
            self.refused.insert(from);
            if self.asked.get(&index).is_some_and(|(to, _)| *to == from) {
                self.asked.remove(&index);
            }
            self.failed.insert(index, from);
            return Err(e);
        }
        if self.asked.get(&index).is_some_and(|(to, _)| *to == from) {
            self.asked.remove(&index);
        }
        Ok(self.pieces.insert(index, bytes).is_none())
    }

    /// `from` could not deliver piece `index` (no answer, a refusal, a broken connection): the
    /// piece is asked again, of another source if there is one.
    pub fn on_failed(&mut self, from: NodeId, index: u32) {
        if self.asked.get(&index).is_some_and(|(to, _)| *to == from) {
            self.asked.remove(&index);
            self.failed.insert(index, from);
        }
    }

    /// A request to `from` failed without saying which (a transport failure): every piece asked
    /// of it is asked again, of another source if there is one.
    pub fn on_source_failed(&mut self, from: NodeId) {
        let lost: Vec<u32> = self
            .asked
            .iter()
            .filter(|(_, (to, _))| *to == from)
            .map(|(i, _)| *i)
            .collect();
        for index in lost {
            self.on_failed(from, index);
        }
    }

    /// The configuration the pieces make, verified as `prev`'s certified successor.
    pub fn finish(self, prev: &Configuration) -> Result<CertifiedConfig, PieceError> {
        let (held, total) = self.progress();
        if held != total {
            return Err(PieceError::Incomplete { held, total });
        }
        let mut bytes = Vec::with_capacity(self.head.len as usize);
        for p in self.pieces.into_values() {
            bytes.extend_from_slice(&p);
        }
        let config: Configuration =
            postcard::from_bytes(&bytes).map_err(|_| PieceError::Undecodable)?;
        let cc = CertifiedConfig {
            config,
            cert: self.head.cert,
        };
        cc.verify_successor(prev)?;
        Ok(cc)
    }
}
