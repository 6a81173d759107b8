//! Hostile peers against real nodes (in-process QUIC servers over disk stores): a dialler that pins
//! the wrong key, a client whose key the cluster does not know, an oversized frame, and garbage
//! datagrams. None of them gets anything, and the nodes keep serving a correct client.

use dbqsfs_core::crypto::{Keypair, ObjectId};
use dbqsfs_core::dbqs::msg::{DbqsMessage, Reject};
use dbqsfs_core::wire::{decode, encode_msg};
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions};
use dbqsfs_daemon::files::ClusterInfo;
use dbqsfs_daemon::ms::MsMessage;
use dbqsfs_net::{local_bind_for, Endpoint, NetError, TransportOptions};
use ed25519_dalek::VerifyingKey;
use std::net::SocketAddr;
use std::time::Duration;

mod common;

use common::{init_cluster, start_node};

fn options() -> TransportOptions {
    TransportOptions {
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(5),
        ..TransportOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_get_nothing_and_nodes_keep_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    init_cluster(&dir);
    let nodes: Vec<common::Running> = (0..4)
        .map(|i| {
            start_node(
                &tokio::runtime::Handle::current(),
                &dir.join(format!("node-{i}")),
            )
        })
        .collect();
    let info = ClusterInfo::load(&dir.join("cluster.toml")).unwrap();
    let member = info.genesis.config.members[0].clone();
    let addr: SocketAddr = member.addr.parse().unwrap();
    let node_key = VerifyingKey::from_bytes(&member.key.0).unwrap();
    let client = DbqsClient::connect(
        info.genesis.clone(),
        info.client_key.clone(),
        DbqsClientOptions::default(),
    )
    .unwrap();
    let id = client
        .put_content(b"before".to_vec())
        .await
        .expect("a correct client writes");

    // A dialler that pins another key than the node's is refused by its own TLS check.
    let wrong = Keypair::from_seed([42; 32]);
    let ep = Endpoint::client(
        local_bind_for(addr),
        info.client_key.dalek().clone(),
        options(),
    )
    .unwrap();
    let err = ep
        .request(
            addr,
            &VerifyingKey::from_bytes(&wrong.public().0).unwrap(),
            b"x",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, NetError::WrongPeerKey | NetError::Handshake(_)),
        "got {err:?}"
    );

    // A key the cluster does not know may connect (a joining node must reach the Membership
    // Service) but gets no dBQS answer beyond "not authorized", and no MS answer beyond a refusal.
    let stranger =
        Endpoint::client(local_bind_for(addr), wrong.dalek().clone(), options()).unwrap();
    let get = encode_msg(
        0,
        DbqsMessage::GetContent {
            rid: 1,
            id: ObjectId([3; 32]),
        },
    );
    let resp = stranger.request(addr, &node_key, &get).await.unwrap();
    assert_eq!(
        decode::<DbqsMessage>(&resp).unwrap().msg,
        DbqsMessage::Rejected {
            rid: 1,
            reason: Reject::NotAuthorized
        }
    );
    let status = encode_msg(0, MsMessage::StatusRequest);
    let resp = stranger.request(addr, &node_key, &status).await.unwrap();
    assert!(
        matches!(
            decode::<MsMessage>(&resp).unwrap().msg,
            MsMessage::Refused { .. }
        ),
        "a stranger got an MS status"
    );

    // An authorized client that claims a 1 GiB frame gets its stream aborted, nothing allocated.
    let conn = ep.connection(addr, &node_key).await.expect("connect");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let _ = send.write_all(&(1u32 << 30).to_le_bytes()).await;
    let _ = send.write_all(&[0u8; 4096]).await;
    let _ = send.finish();
    let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .expect("the node answers at once");
    assert!(
        answer.is_err() || answer.as_ref().is_ok_and(|b| b.is_empty()),
        "an oversized frame got an answer"
    );

    // Garbage datagrams at the node's UDP port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut junk = [0u8; 1200];
    for i in 0..200u32 {
        getrandom::fill(&mut junk).unwrap();
        let len = (i as usize * 37) % junk.len();
        let _ = udp.send_to(&junk[..len], addr);
    }

    // The nodes still serve the correct client.
    assert_eq!(
        client.get_content(id).await.expect("read"),
        Some(b"before".to_vec())
    );
    let id2 = client
        .put_content(b"after".to_vec())
        .await
        .expect("write after the attacks");
    assert_eq!(
        client.get_content(id2).await.expect("read"),
        Some(b"after".to_vec())
    );

    for n in nodes {
        n.stop().await;
    }
}
