//! The messages of dBQS, one closed enum. Requests carry a request id chosen by the client; replies
//! echo it. The sender's epoch travels in the [`crate::wire::Envelope`].

use super::refs::RefRecord;
use crate::config::{CertifiedConfig, Epoch};
use crate::crypto::ObjectId;
use crate::object::{PkBlock, Stamp};
use crate::wire::Protocol;
use serde::{Deserialize, Serialize};

/// A client-chosen request id.
pub type RequestId = u64;

/// Most configurations sent in one reply; a client that is further behind asks again.
pub const MAX_CONFIGS_PER_REPLY: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DbqsMessage {
    // Client → replica.
    /// Store content block `id` (the replica checks that `data` hashes to `id`), held by the owner
    /// of `hold` (an owner-signed [`RefRecord`] of `id` with `hold` set).
    PutContent {
        rid: RequestId,
        id: ObjectId,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        hold: RefRecord,
    },
    GetContent {
        rid: RequestId,
        id: ObjectId,
    },
    /// Store `block` if it is newer than the held value.
    PutPk {
        rid: RequestId,
        block: PkBlock,
    },
    GetPk {
        rid: RequestId,
        id: ObjectId,
    },
    /// Ask for the configurations after `after`.
    GetConfigs {
        rid: RequestId,
        after: Epoch,
    },
    /// Newer configurations for a replica that is behind.
    PushConfigs {
        configs: Vec<CertifiedConfig>,
    },

    // Replica → client.
    ContentStored {
        rid: RequestId,
        id: ObjectId,
    },
    /// `None`: the replica does not hold the block.
    Content {
        rid: RequestId,
        id: ObjectId,
        #[serde(with = "serde_bytes")]
        data: Option<Vec<u8>>,
    },
    /// The replica now holds a value of `id` with stamp `stamp` (at least the one written).
    PkStored {
        rid: RequestId,
        id: ObjectId,
        stamp: Stamp,
    },
    Pk {
        rid: RequestId,
        id: ObjectId,
        block: Option<PkBlock>,
    },
    Configs {
        rid: RequestId,
        configs: Vec<CertifiedConfig>,
    },
    /// The request's epoch is older than the replica's (the envelope carries the replica's epoch).
    Stale {
        rid: RequestId,
    },
    /// The replica's epoch is older than the request's: push it the newer configurations.
    Behind {
        rid: RequestId,
    },
    /// The replica has not finished receiving this object's range in this epoch.
    NotReady {
        rid: RequestId,
    },
    Rejected {
        rid: RequestId,
        reason: Reject,
    },

    // Appended, so that the variants before keep their indices ([`is_block_op`]).
    /// Client → replica: record `record` (an owner's release of a content block, or a hold of it
    /// without its data).
    Reference {
        rid: RequestId,
        record: RefRecord,
    },
    /// Replica → client: the replica now holds `id`'s records merged with the one sent.
    RefStored {
        rid: RequestId,
        id: ObjectId,
    },
}

/// The variant index of [`DbqsMessage::Reference`] (a block operation too).
const REFERENCE_VARIANT: u32 = 15;

/// Why a replica refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reject {
    BadSignature,
    HashMismatch,
    TooLarge,
    NotResponsible,
    NoSpace,
    StoreFailed,
    /// The requester's key is neither a client the cluster lists nor a member.
    NotAuthorized,
    /// A put's hold is a release, or names another block.
    NotAReference,
    /// A put's hold is older than its owner's release of the block: sign the hold with a higher
    /// sequence number than any of the owner's releases, and put again.
    Superseded,
}

impl Protocol for DbqsMessage {
    const ID: u8 = 1;
}

/// Whether `bytes` claim to be a client's read or write of a block (`PutContent`, `GetContent`,
/// `PutPk`, `GetPk`, `Reference`), by the envelope header and the message's variant alone: cheap, for deciding
/// priorities before anything is decoded (decoding decides what the message is).
pub fn is_block_op(bytes: &[u8]) -> bool {
    // Postcard: the version and protocol bytes, the epoch as a varint, then the variant's index
    // as a varint, in declaration order.
    match postcard::take_from_bytes::<(u8, u8, Epoch, u32)>(bytes) {
        Ok(((version, protocol, _, variant), _)) => {
            version == crate::wire::WIRE_VERSION
                && protocol == DbqsMessage::ID
                && (variant <= 3 || variant == REFERENCE_VARIANT)
        }
        Err(_) => false,
    }
}

impl DbqsMessage {
    /// The request id of a reply, `None` for requests and pushes.
    pub fn reply_rid(&self) -> Option<RequestId> {
        use DbqsMessage::*;
        match self {
            ContentStored { rid, .. }
            | Content { rid, .. }
            | PkStored { rid, .. }
            | Pk { rid, .. }
            | Configs { rid, .. }
            | Stale { rid }
            | Behind { rid }
            | NotReady { rid }
            | Rejected { rid, .. }
            | RefStored { rid, .. } => Some(*rid),
            PutContent { .. }
            | Reference { .. }
            | GetContent { .. }
            | PutPk { .. }
            | GetPk { .. }
            | GetConfigs { .. }
            | PushConfigs { .. } => None,
        }
    }
}

/// The answer to a block request (`PutContent`, `GetContent`, `PutPk`, `GetPk`) from a key the
/// node does not serve: `Rejected { NotAuthorized }` in the request's own epoch, so that the client
/// counts it and fails at once instead of waiting out its timeout. `None` for anything else.
pub fn refuse_unauthorized(request: &[u8]) -> Option<Vec<u8>> {
    let env = crate::wire::decode::<DbqsMessage>(request).ok()?;
    let rid = match env.msg {
        DbqsMessage::PutContent { rid, .. }
        | DbqsMessage::GetContent { rid, .. }
        | DbqsMessage::PutPk { rid, .. }
        | DbqsMessage::GetPk { rid, .. }
        | DbqsMessage::Reference { rid, .. } => rid,
        _ => return None,
    };
    let reply = DbqsMessage::Rejected {
        rid,
        reason: Reject::NotAuthorized,
    };
    Some(crate::wire::encode_msg(env.epoch, reply))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keypair;
    use crate::wire::encode_msg;

    #[test]
    fn block_ops_are_told_from_the_header_alone() {
        let id = ObjectId([7; 32]);
        let block = PkBlock::sign(&Keypair::from_seed([1; 32]), b"l", 1, b"v".to_vec()).unwrap();
        let ops = [
            DbqsMessage::PutContent {
                rid: 1,
                id,
                data: vec![1; 300],
                hold: RefRecord::hold(&Keypair::from_seed([1; 32]), id, 1),
            },
            DbqsMessage::GetContent { rid: 1 << 40, id },
            DbqsMessage::PutPk { rid: 2, block },
            DbqsMessage::GetPk { rid: 3, id },
            DbqsMessage::Reference {
                rid: 4,
                record: RefRecord::release(&Keypair::from_seed([1; 32]), id, 9),
            },
        ];
        for (i, m) in ops.into_iter().enumerate() {
            assert!(is_block_op(&encode_msg(u64::MAX - i as u64, m)));
        }
        let others = [
            DbqsMessage::GetConfigs { rid: 4, after: 9 },
            DbqsMessage::Stale { rid: 5 },
            DbqsMessage::NotReady { rid: 6 },
            DbqsMessage::RefStored { rid: 7, id },
        ];
        for m in others {
            assert!(!is_block_op(&encode_msg(3, m)));
        }
        assert!(!is_block_op(&[]));
        assert!(!is_block_op(&[crate::wire::WIRE_VERSION, DbqsMessage::ID]));
        let mut other_protocol = encode_msg(3, DbqsMessage::GetPk { rid: 3, id });
        other_protocol[1] = DbqsMessage::ID + 1;
        assert!(!is_block_op(&other_protocol));
    }
}
