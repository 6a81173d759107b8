//! The wire: a versioned envelope around one closed message enum per protocol.
//!
//! Every message travels as `Envelope { version, protocol, epoch, msg }` encoded with postcard. The
//! epoch is the sender's current epoch. [`decode`] is the one place where untrusted bytes become
//! messages: it checks the size limit before looking at the bytes, checks the version and protocol,
//! refuses trailing bytes, and returns a typed error for anything else. It never panics.

use crate::config::Epoch;
use crate::object::MAX_BLOCK;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The wire version this build speaks.
pub const WIRE_VERSION: u8 = 1;

/// Hard limit of one encoded message: a full block plus room for headers and signatures.
pub const MAX_MESSAGE: usize = MAX_BLOCK + 64 * 1024;

/// A protocol's closed message enum.
pub trait Protocol: Serialize + DeserializeOwned {
    /// The protocol's tag in the envelope.
    const ID: u8;
}

/// What travels on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<M> {
    pub version: u8,
    pub protocol: u8,
    /// The sender's epoch.
    pub epoch: Epoch,
    pub msg: M,
}

impl<M: Protocol> Envelope<M> {
    pub fn new(epoch: Epoch, msg: M) -> Self {
        Envelope {
            version: WIRE_VERSION,
            protocol: M::ID,
            epoch,
            msg,
        }
    }
}

/// Why bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty message")]
    Empty,
    #[error("wire version {0} is not supported (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    #[error("message is for protocol {got}, expected {expected}")]
    WrongProtocol { expected: u8, got: u8 },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

/// Encodes an envelope.
pub fn encode<M: Protocol>(env: &Envelope<M>) -> Vec<u8> {
    postcard::to_stdvec(env).expect("in-memory messages always encode")
}

/// Encodes `msg` sent at `epoch`.
pub fn encode_msg<M: Protocol>(epoch: Epoch, msg: M) -> Vec<u8> {
    encode(&Envelope::new(epoch, msg))
}

/// The longest prefix of `items` whose encodings take at most `budget` bytes together (an
/// answer that must fit in one message; the asker asks again for the rest).
pub fn within<T: Serialize>(mut items: Vec<T>, budget: usize) -> Vec<T> {
    let mut used = 0usize;
    let fit = items
        .iter()
        .take_while(|t| {
            used = used
                .saturating_add(postcard::experimental::serialized_size(t).unwrap_or(usize::MAX));
            used <= budget
        })
        .count();
    items.truncate(fit);
    items
}

/// Decodes untrusted bytes into an envelope of protocol `M`.
pub fn decode<M: Protocol>(bytes: &[u8]) -> Result<Envelope<M>, WireError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: MAX_MESSAGE,
        });
    }
    match bytes {
        [] => return Err(WireError::Empty),
        [v, ..] if *v != WIRE_VERSION => return Err(WireError::UnsupportedVersion(*v)),
        [_] => return Err(WireError::Malformed("truncated header".into())),
        [_, p, ..] if *p != M::ID => {
            return Err(WireError::WrongProtocol {
                expected: M::ID,
                got: *p,
            })
        }
        _ => {}
    }
    let (env, rest): (Envelope<M>, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    Ok(env)
}
