//! The two kinds of dBQS object.
//!
//! - A content-hash block is immutable bytes; its id is a BLAKE3 hash of the bytes under the content
//!   context, so any single copy proves itself.
//! - A public-key block is mutable. Its id is a BLAKE3 hash of (owner key, label) under another
//!   context (the two id spaces never meet). Each value carries a version and the owner's signature over
//!   (id, version, hash of the value). Replicas cannot forge a value; they can only hide it or offer an
//!   older one. Two values are ordered by their [`Stamp`] (version, then value hash), so even two
//!   writers racing on one version agree on which value is newer.

use crate::crypto::{CryptoError, Domain, Keypair, ObjectId, PublicKey, Signature};
use serde::{Deserialize, Serialize};

/// Largest content block and largest public-key block value: a volume's 1 MiB chunk plus room
/// for an envelope around it (an encrypted volume's nonce and authentication tag).
pub const MAX_BLOCK: usize = (1 << 20) + 4096;
/// Largest label of a public-key block.
pub const MAX_LABEL: usize = 1024;

const CONTENT_CONTEXT: &str = "dbqsfs 2026-11 content block id";
const PK_CONTEXT: &str = "dbqsfs 2026-11 public-key block id";
const VALUE_CONTEXT: &str = "dbqsfs 2026-11 public-key block value";

/// The id of the content block holding `data`.
pub fn content_id(data: &[u8]) -> ObjectId {
    let mut h = blake3::Hasher::new_derive_key(CONTENT_CONTEXT);
    h.update(data);
    ObjectId(*h.finalize().as_bytes())
}

/// The id of the public-key block of `owner` named `label`.
pub fn pk_block_id(owner: &PublicKey, label: &[u8]) -> ObjectId {
    let mut h = blake3::Hasher::new_derive_key(PK_CONTEXT);
    h.update(&owner.0);
    h.update(&(label.len() as u64).to_le_bytes());
    h.update(label);
    ObjectId(*h.finalize().as_bytes())
}

fn value_hash(value: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(VALUE_CONTEXT);
    h.update(value);
    *h.finalize().as_bytes()
}

/// Why an object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("block of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("label of {len} bytes exceeds the limit of {max}")]
    LabelTooLong { len: usize, max: usize },
    #[error("content does not hash to its id")]
    HashMismatch,
    #[error("owner signature: {0}")]
    Signature(#[from] CryptoError),
}

/// Checks that `data` is a valid content block named `id`.
pub fn check_content(id: &ObjectId, data: &[u8]) -> Result<(), ObjectError> {
    if data.len() > MAX_BLOCK {
        return Err(ObjectError::TooLarge {
            len: data.len(),
            max: MAX_BLOCK,
        });
    }
    if content_id(data) != *id {
        return Err(ObjectError::HashMismatch);
    }
    Ok(())
}

/// The order of public-key block values: version first, then the value hash as a tie-break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub version: u64,
    pub value_hash: [u8; 32],
}

/// One signed value of a public-key block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PkBlock {
    pub owner: PublicKey,
    #[serde(with = "serde_bytes")]
    pub label: Vec<u8>,
    pub version: u64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub signature: Signature,
}

impl PkBlock {
    /// Signs `value` as version `version` of `owner`'s block `label`.
    pub fn sign(
        owner: &Keypair,
        label: &[u8],
        version: u64,
        value: Vec<u8>,
    ) -> Result<PkBlock, ObjectError> {
        check_sizes(label, &value)?;
        let public = owner.public();
        let id = pk_block_id(&public, label);
        let signature = owner.sign(
            Domain::PkBlock,
            &signed_body(&id, version, &value_hash(&value)),
        );
        Ok(PkBlock {
            owner: public,
            label: label.to_vec(),
            version,
            value,
            signature,
        })
    }

    /// The tombstone of `owner`'s block `label` as version `version`: a signed empty value. It
    /// replaces every older version like any newer value does (so a replica keeps only the label
    /// and the signature, and an older value offered again is refused), and reads as deleted
    /// ([`PkBlock::is_tombstone`]).
    pub fn tombstone(owner: &Keypair, label: &[u8], version: u64) -> Result<PkBlock, ObjectError> {
        Self::sign(owner, label, version, Vec::new())
    }

    /// Whether this value is a tombstone (the empty value): the block was deleted.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_empty()
    }

    pub fn id(&self) -> ObjectId {
        pk_block_id(&self.owner, &self.label)
    }

    pub fn stamp(&self) -> Stamp {
        Stamp {
            version: self.version,
            value_hash: value_hash(&self.value),
        }
    }

    /// Checks sizes and the owner's signature.
    pub fn verify(&self) -> Result<(), ObjectError> {
        check_sizes(&self.label, &self.value)?;
        let body = signed_body(&self.id(), self.version, &value_hash(&self.value));
        self.owner.verify(Domain::PkBlock, &body, &self.signature)?;
        Ok(())
    }

    /// Checks the block is valid and is the block named `id`.
    pub fn verify_as(&self, id: &ObjectId) -> Result<(), ObjectError> {
        if self.id() != *id {
            return Err(ObjectError::HashMismatch);
        }
        self.verify()
    }
}

fn check_sizes(label: &[u8], value: &[u8]) -> Result<(), ObjectError> {
    if label.len() > MAX_LABEL {
        return Err(ObjectError::LabelTooLong {
            len: label.len(),
            max: MAX_LABEL,
        });
    }
    if value.len() > MAX_BLOCK {
        return Err(ObjectError::TooLarge {
            len: value.len(),
            max: MAX_BLOCK,
        });
    }
    Ok(())
}

fn signed_body(id: &ObjectId, version: u64, value_hash: &[u8; 32]) -> [u8; 72] {
    let mut b = [0u8; 72];
    b[..32].copy_from_slice(&id.0);
    b[32..40].copy_from_slice(&version.to_le_bytes());
    b[40..].copy_from_slice(value_hash);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_and_public_key_ids_never_collide() {
        let owner = Keypair::from_seed([3; 32]).public();
        let mut bytes = owner.0.to_vec();
        bytes.extend_from_slice(&0u64.to_le_bytes());
        assert_ne!(content_id(&bytes), pk_block_id(&owner, b""));
    }

    #[test]
    fn a_signed_block_verifies_and_any_change_breaks_it() {
        let k = Keypair::from_seed([9; 32]);
        let b = PkBlock::sign(&k, b"inode/1", 4, b"value".to_vec()).unwrap();
        assert_eq!(b.verify(), Ok(()));
        let mut v = b.clone();
        v.version = 5;
        assert!(v.verify().is_err(), "version is signed");
        let mut v = b.clone();
        v.value.push(0);
        assert!(v.verify().is_err(), "value is signed");
        let mut v = b.clone();
        v.label = b"inode/2".to_vec();
        assert!(v.verify().is_err(), "label is signed through the id");
        let mut v = b.clone();
        v.owner = Keypair::from_seed([8; 32]).public();
        assert!(v.verify().is_err(), "owner is bound");
    }

    #[test]
    fn size_limits_are_enforced() {
        let k = Keypair::from_seed([9; 32]);
        assert!(matches!(
            PkBlock::sign(&k, b"x", 1, vec![0; MAX_BLOCK + 1]),
            Err(ObjectError::TooLarge { .. })
        ));
        assert!(matches!(
            PkBlock::sign(&k, &[0; MAX_LABEL + 1], 1, vec![]),
            Err(ObjectError::LabelTooLong { .. })
        ));
        assert!(check_content(&content_id(&[1, 2]), &[1, 2]).is_ok());
        assert_eq!(
            check_content(&content_id(&[1, 2]), &[1, 3]),
            Err(ObjectError::HashMismatch)
        );
    }

    #[test]
    fn a_tombstone_is_a_newer_signed_empty_value() {
        let k = Keypair::from_seed([9; 32]);
        let v = PkBlock::sign(&k, b"x", 2, vec![7; 4096]).unwrap();
        let t = PkBlock::tombstone(&k, b"x", 3).unwrap();
        assert!(t.verify_as(&v.id()).is_ok() && t.is_tombstone() && !v.is_tombstone());
        assert!(t.stamp() > v.stamp(), "it supersedes the value");
        let other = Keypair::from_seed([8; 32]);
        let forged = PkBlock {
            owner: k.public(),
            ..PkBlock::tombstone(&other, b"x", 3).unwrap()
        };
        assert!(forged.verify().is_err(), "only the owner can delete");
    }

    #[test]
    fn stamps_order_by_version_then_value() {
        let k = Keypair::from_seed([9; 32]);
        let a = PkBlock::sign(&k, b"x", 2, b"a".to_vec()).unwrap().stamp();
        let b = PkBlock::sign(&k, b"x", 2, b"b".to_vec()).unwrap().stamp();
        let c = PkBlock::sign(&k, b"x", 3, b"a".to_vec()).unwrap().stamp();
        assert!(a.max(b) < c);
        assert_ne!(a, b);
    }
}
