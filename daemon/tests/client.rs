//! The async [`DbqsClient`] against four in-process nodes (each a real QUIC server over its own
//! [`dbqsfs_daemon::store::DiskStore`]): public-key blocks, absent objects, refused strangers,
//! garbage requests, and data that survives a node restart.

use dbqsfs_core::crypto::Keypair;
use dbqsfs_core::object::{content_id, pk_block_id};
use dbqsfs_daemon::client::{ClientError, DbqsClient, DbqsClientOptions};
use dbqsfs_daemon::files::ClusterInfo;
use dbqsfs_net::{Endpoint, TransportOptions};
use std::path::Path;
use std::time::Duration;

mod common;

use common::{init_cluster, start_node};

fn start(dir: &Path) -> common::Running {
    start_node(&tokio::runtime::Handle::current(), dir)
}

fn options() -> DbqsClientOptions {
    DbqsClientOptions {
        op_timeout: Duration::from_secs(5),
        ..DbqsClientOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reads_latest_pk_versions_and_absences_and_refuses_strangers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let toml = init_cluster(&dir);
    let mut nodes: Vec<common::Running> = (0..4)
        .map(|i| start(&dir.join(format!("node-{i}"))))
        .collect();
    let info = ClusterInfo::load(&toml).unwrap();
    let client =
        DbqsClient::connect(info.genesis.clone(), info.client_key.clone(), options()).unwrap();

    // Public-key blocks: the latest version wins; versions are discovered when not given.
    let owner = Keypair::from_seed([9; 32]);
    let s1 = client
        .put_pk(&owner, b"root", b"one".to_vec(), None)
        .await
        .unwrap();
    let s2 = client
        .put_pk(&owner, b"root", b"two".to_vec(), None)
        .await
        .unwrap();
    assert!(s2 > s1);
    let id = pk_block_id(&owner.public(), b"root");
    let got = client.get_pk(id).await.unwrap().expect("block present");
    assert_eq!(
        (got.version, got.value.as_slice()),
        (s2.version, &b"two"[..])
    );
    assert_eq!(
        client
            .get_pk(pk_block_id(&owner.public(), b"none"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        client
            .get_content(content_id(b"never stored"))
            .await
            .unwrap(),
        None
    );

    // Garbage and truncated protocol bytes from an admitted key get no answer and crash nothing.
    let m = &info.genesis.config.members[0];
    let addr = m.addr.parse().unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&m.key.0).unwrap();
    let raw = Endpoint::client(
        dbqsfs_net::local_bind_for(addr),
        info.client_key.dalek().clone(),
        TransportOptions::default(),
    )
    .unwrap();
    for junk in [
        &b"garbage"[..],
        &[1u8, 1, 0xff, 0xff][..],
        &[1u8, 0x40, 0, 7][..],
        &[][..],
    ] {
        assert!(raw.request(addr, &key, junk).await.is_err());
    }
    let data = b"after the garbage".to_vec();
    let cid = client.put_content(data.clone()).await.unwrap();
    assert_eq!(client.get_content(cid).await.unwrap(), Some(data.clone()));
    assert!(client.node_status(m).await.is_ok());

    // A key that is neither a member nor a listed client cannot write: the operation fails.
    let stranger = DbqsClient::connect(
        info.genesis.clone(),
        Keypair::from_seed([77; 32]),
        DbqsClientOptions {
            op_timeout: Duration::from_secs(2),
            ..DbqsClientOptions::default()
        },
    )
    .unwrap();
    match stranger.put_content(b"intruder".to_vec()).await {
        Err(ClientError::Op(_)) => {}
        other => panic!("a stranger's write ended as {other:?}"),
    }

    // Restart every node from its directory: acknowledged data is still there.
    for n in nodes.drain(..) {
        n.stop().await;
    }
    let nodes: Vec<common::Running> = (0..4)
        .map(|i| start(&dir.join(format!("node-{i}"))))
        .collect();
    // The restarted nodes come up one by one (each waits for its old socket to be released) and
    // the client first needs a fresh freshness certificate: the default operation timeout.
    let client = DbqsClient::connect(
        info.genesis.clone(),
        info.client_key.clone(),
        DbqsClientOptions::default(),
    )
    .unwrap();
    assert_eq!(client.get_content(cid).await.unwrap(), Some(data));
    let got = client
        .get_pk(id)
        .await
        .unwrap()
        .expect("block present after restart");
    assert_eq!(got.value, b"two");
    for n in nodes {
        n.stop().await;
    }
}
