//! Decoding untrusted bytes: typed errors, never a panic.

use dbqsfs_core::dbqs::msg::DbqsMessage;
use dbqsfs_core::wire::{decode, encode_msg, WireError, MAX_MESSAGE, WIRE_VERSION};
use proptest::prelude::*;

#[test]
fn a_message_round_trips() {
    let bytes = encode_msg(7, DbqsMessage::GetConfigs { rid: 3, after: 2 });
    let env = decode::<DbqsMessage>(&bytes).unwrap();
    assert_eq!(
        (env.epoch, env.msg),
        (7, DbqsMessage::GetConfigs { rid: 3, after: 2 })
    );
}

#[test]
fn oversized_input_is_refused_before_decoding() {
    let big = vec![WIRE_VERSION; MAX_MESSAGE + 1];
    assert!(matches!(
        decode::<DbqsMessage>(&big),
        Err(WireError::TooLarge { .. })
    ));
}

#[test]
fn wrong_version_protocol_and_trailing_bytes_are_typed_errors() {
    let mut bytes = encode_msg(1, DbqsMessage::Stale { rid: 1 });
    assert_eq!(decode::<DbqsMessage>(&[]), Err(WireError::Empty));
    let mut v = bytes.clone();
    v[0] = 9;
    assert_eq!(
        decode::<DbqsMessage>(&v),
        Err(WireError::UnsupportedVersion(9))
    );
    let mut p = bytes.clone();
    p[1] = 42;
    assert_eq!(
        decode::<DbqsMessage>(&p),
        Err(WireError::WrongProtocol {
            expected: 1,
            got: 42
        })
    );
    bytes.push(0);
    assert_eq!(
        decode::<DbqsMessage>(&bytes),
        Err(WireError::TrailingBytes(1))
    );
}

#[test]
fn a_huge_claimed_length_does_not_allocate_it() {
    // Header, epoch 0, variant PutContent, rid 0, a 32-byte id, then a length prefix of ~2^63.
    let mut bytes = vec![WIRE_VERSION, 1, 0, 0, 0];
    bytes.extend_from_slice(&[0; 32]);
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(matches!(
        decode::<DbqsMessage>(&bytes),
        Err(WireError::Malformed(_))
    ));
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<DbqsMessage>(&bytes);
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = vec![WIRE_VERSION, 1];
        bytes.extend(tail);
        let _ = decode::<DbqsMessage>(&bytes);
    }

    #[test]
    fn flipping_bytes_of_a_valid_message_never_panics(pos in 0usize..64, val in any::<u8>()) {
        let mut bytes = encode_msg(3, DbqsMessage::GetPk { rid: 99, id: dbqsfs_core::ObjectId([5; 32]) });
        let i = pos % bytes.len();
        bytes[i] = val;
        let _ = decode::<DbqsMessage>(&bytes);
    }
}

/// Who may send which MS message: strangers only learn the configurations and submit, clients
/// also ask for the status, and a node is asked to leave by its own key alone.
#[test]
fn ms_messages_are_permitted_by_the_senders_kind() {
    use dbqsfs_core::ms::wire::{permitted, MsMessage, Peer};
    let chain = MsMessage::ChainAfter { epoch: 0 };
    let head = MsMessage::HeadAsk { epoch: 1 };
    let piece = MsMessage::PieceAsk {
        epoch: 1,
        hash: [0; 32],
        index: 0,
    };
    let status = MsMessage::StatusRequest;
    let batches = MsMessage::Batches { epoch: 1, upto: 2 };
    for peer in [Peer::Member, Peer::Myself, Peer::Client, Peer::Stranger] {
        for ask in [&chain, &head, &piece] {
            assert!(
                permitted(ask, peer).is_ok(),
                "{peer:?} learns configurations"
            );
        }
    }
    assert!(permitted(&status, Peer::Client).is_ok());
    assert!(permitted(&status, Peer::Stranger).is_err());
    assert!(permitted(&batches, Peer::Member).is_ok());
    assert!(permitted(&batches, Peer::Client).is_err());
    assert!(permitted(&batches, Peer::Stranger).is_err());
    let deltas = MsMessage::PushDeltas {
        deltas: Vec::new(),
        freshness: None,
    };
    assert!(permitted(&deltas, Peer::Member).is_ok());
    assert!(permitted(&deltas, Peer::Client).is_err());
    assert!(permitted(&deltas, Peer::Stranger).is_err());
    assert!(permitted(&MsMessage::Leave, Peer::Myself).is_ok());
    for peer in [Peer::Member, Peer::Client, Peer::Stranger] {
        assert_eq!(
            permitted(&MsMessage::Leave, peer),
            Err("only the node's own key may ask it to leave")
        );
    }
}
