//! Identities and signatures.
//!
//! A node is its ed25519 key: `NodeId = BLAKE3(public key)`, a point on the 256-bit ring. Every
//! signature in dbqsfs is domain-separated: the signed message is `"dbqsfs/sig/v1/" ‖ domain ‖ 0x00 ‖ body`,
//! so a signature made for one purpose can never be replayed as another. Verification always uses
//! `verify_strict` (it rejects small-order keys and non-canonical signatures), so every correct node
//! accepts exactly the same signatures.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A 32-byte identifier on the ring: compared as a big-endian number.
macro_rules! ring_id {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The first eight bytes in hex, for logs.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..8])
            }
            /// All 32 bytes in hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// Parses 64 hex digits.
            pub fn from_hex(s: &str) -> Option<Self> {
                parse_hex32(s).map(Self)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
    };
}

ring_id!(
    NodeId,
    "The identity of a node: BLAKE3 of its ed25519 public key."
);
ring_id!(
    ObjectId,
    "The identity of a stored object (content-hash or public-key block)."
);

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// What a signature is for. Each purpose signs under its own context string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    /// An owner's signature over a public-key block: (id, version, value hash).
    PkBlock,
    /// A committee member's signature over the hash of the next configuration.
    Configuration,
    /// The operator's admission key over a node's public key.
    Admission,
    /// A node's answer to a liveness probe.
    Probe,
    /// The MS agreement protocol: committee members' protocol statements and clients' requests.
    Agreement,
    /// A committee member's statement that an epoch is current at a time.
    Freshness,
    /// An owner's hold or release of a content block: (id, seq, hold).
    BlockRef,
    /// A committee member's FROST signature share, over the package it answers.
    KeySign,
}

impl Domain {
    fn context(self) -> &'static [u8] {
        match self {
            Domain::PkBlock => b"pk-block",
            Domain::Configuration => b"configuration",
            Domain::Admission => b"admission",
            Domain::Probe => b"probe",
            Domain::Agreement => b"agreement",
            Domain::Freshness => b"freshness",
            Domain::BlockRef => b"block-ref",
            Domain::KeySign => b"key-sign",
        }
    }

    /// The bytes a signature in this domain covers.
    pub fn message(self, body: &[u8]) -> Vec<u8> {
        const PREFIX: &[u8] = b"dbqsfs/sig/v1/";
        let ctx = self.context();
        let mut m = Vec::with_capacity(PREFIX.len() + ctx.len() + 1 + body.len());
        m.extend_from_slice(PREFIX);
        m.extend_from_slice(ctx);
        m.push(0);
        m.extend_from_slice(body);
        m
    }
}

/// Why a signature or key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("the public key is not a valid ed25519 point")]
    BadKey,
    #[error("the signature does not verify")]
    BadSignature,
}

/// An ed25519 public key (32 bytes, as sent on the wire).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The node id of this key.
    pub fn node_id(&self) -> NodeId {
        NodeId(*blake3::hash(&self.0).as_bytes())
    }

    /// Checks `sig` over `body` in `domain` with `verify_strict`.
    pub fn verify(&self, domain: Domain, body: &[u8], sig: &Signature) -> Result<(), CryptoError> {
        let vk =
            ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|_| CryptoError::BadKey)?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        vk.verify_strict(&domain.message(body), &sig)
            .map_err(|_| CryptoError::BadSignature)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        parse_hex32(s).map(Self)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", hex::encode(&self.0[..8]))
    }
}

/// An ed25519 signature (64 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex::encode(&self.0[..8]))
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                let arr: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Signature(arr))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Signature, E> {
                self.visit_bytes(&v)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A secret signing key. Created from a 32-byte seed: randomness is the caller's business.
#[derive(Clone)]
pub struct Keypair {
    secret: ed25519_dalek::SigningKey,
}

impl Keypair {
    /// The key whose secret is `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Keypair {
            secret: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    /// The seed, for persisting the key.
    pub fn seed(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.secret.verifying_key().to_bytes())
    }

    pub fn node_id(&self) -> NodeId {
        self.public().node_id()
    }

    /// Signs `body` in `domain`.
    pub fn sign(&self, domain: Domain, body: &[u8]) -> Signature {
        use ed25519_dalek::Signer;
        Signature(self.secret.sign(&domain.message(body)).to_bytes())
    }

    /// The secret scalar of the key (clamped and reduced, as ed25519 signs with it): the node's
    /// seal key for the MS's threshold key is this scalar, so its public half is the node's
    /// public key (`ms::key::SealKey::of_node`).
    pub(crate) fn scalar_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.secret.to_scalar().to_bytes())
    }

    /// The underlying dalek key, for the transport's TLS identity.
    pub fn dalek(&self) -> &ed25519_dalek::SigningKey {
        &self.secret
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({:?})", self.public())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_verifies_only_in_its_own_domain() {
        let k = Keypair::from_seed([7; 32]);
        let sig = k.sign(Domain::PkBlock, b"hello");
        assert_eq!(k.public().verify(Domain::PkBlock, b"hello", &sig), Ok(()));
        assert_eq!(
            k.public().verify(Domain::Configuration, b"hello", &sig),
            Err(CryptoError::BadSignature)
        );
        assert_eq!(
            k.public().verify(Domain::PkBlock, b"hellO", &sig),
            Err(CryptoError::BadSignature)
        );
    }

    #[test]
    fn node_id_is_blake3_of_the_public_key() {
        let k = Keypair::from_seed([1; 32]);
        assert_eq!(k.node_id().0, *blake3::hash(&k.public().0).as_bytes());
    }

    #[test]
    fn small_order_keys_are_refused() {
        // The identity point (0x01 followed by zeros) is a small-order key: verify_strict refuses it.
        let mut id = [0u8; 32];
        id[0] = 1;
        let sig = Signature([0; 64]);
        assert!(PublicKey(id).verify(Domain::PkBlock, b"x", &sig).is_err());
    }

    #[test]
    fn hex_round_trips() {
        let id = NodeId([0xab; 32]);
        assert_eq!(NodeId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(NodeId::from_hex("zz"), None);
    }
}
