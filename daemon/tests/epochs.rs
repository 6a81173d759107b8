//! A node that is pushed a newer certified configuration moves to it, keeps it across a restart,
//! and refuses an under-signed one; pushed as a delta, it is taken only if it makes the certified
//! configuration.

mod common;

use common::{init_cluster, start_node};
use dbqsfs_core::config::{CertifiedConfig, Configuration};
use dbqsfs_core::crypto::Keypair;
use dbqsfs_core::dbqs::msg::DbqsMessage;
use dbqsfs_core::wire::encode_msg;
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions};
use dbqsfs_daemon::files::{read_key, ClusterInfo};
use dbqsfs_net::{local_bind_for, Endpoint, TransportOptions};
use ed25519_dalek::VerifyingKey;
use std::net::SocketAddr;
use tokio::runtime::Handle;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_configuration_is_installed_persisted_and_forgeries_are_refused() {
    let Fixture {
        _tmp,
        dir,
        mut nodes,
        info,
        genesis,
        keys,
        next,
        committee,
    } = four_nodes();
    let committee: Vec<&Keypair> = committee.iter().map(|i| &keys[*i]).collect();
    let good = CertifiedConfig::certify(next.clone(), &committee[..3]);
    let weak = CertifiedConfig::certify(next, &committee[..2]);

    let client = DbqsClient::connect(
        info.genesis.clone(),
        info.client_key.clone(),
        DbqsClientOptions::default(),
    )
    .unwrap();
    let ep = Endpoint::client(
        local_bind_for("127.0.0.1:1".parse().unwrap()),
        info.client_key.dalek().clone(),
        TransportOptions::default(),
    )
    .unwrap();
    let push = |i: usize, c: CertifiedConfig| {
        let ep = ep.clone();
        let m = genesis
            .members
            .iter()
            .find(|m| m.id == keys[i].node_id())
            .unwrap()
            .clone();
        async move {
            let addr: SocketAddr = m.addr.parse().unwrap();
            let key = VerifyingKey::from_bytes(&m.key.0).unwrap();
            // A push is one-way: the node answers nothing.
            let _ = ep
                .request(
                    addr,
                    &key,
                    &encode_msg(1, DbqsMessage::PushConfigs { configs: vec![c] }),
                )
                .await;
            m
        }
    };

    let m1 = push(1, weak).await;
    assert_eq!(
        client.node_status(&m1).await.unwrap().epoch,
        0,
        "an under-signed configuration is refused"
    );

    let m0 = push(0, good).await;
    assert_eq!(
        client.node_status(&m0).await.unwrap().epoch,
        1,
        "a certified configuration is installed"
    );

    // Restarted from its directory, the node is still in epoch 1.
    nodes.remove(0).stop().await;
    nodes.insert(0, start_node(&Handle::current(), &dir.join("node-0")));
    let mut epoch = None;
    for _ in 0..50 {
        if let Ok(s) = client.node_status(&m0).await {
            epoch = Some(s.epoch);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        epoch,
        Some(1),
        "the installed chain was persisted before use"
    );
    for n in nodes {
        n.stop().await;
    }
}

/// Pushes of configuration deltas (what the push tree carries) between members: a delta that
/// makes another configuration than the certified one, or whose certificate is under-signed, is
/// refused; the delta of the certified configuration is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_delta_is_installed_only_as_the_certified_configuration() {
    use dbqsfs_core::config::Member;
    use dbqsfs_core::ms::delta::CertifiedDelta;
    use dbqsfs_core::ms::wire::MsMessage;

    let Fixture {
        _tmp,
        dir: _,
        nodes,
        info,
        genesis,
        keys,
        next,
        committee,
    } = four_nodes();
    let committee: Vec<&Keypair> = committee.iter().map(|i| &keys[*i]).collect();
    let good = CertifiedDelta::of(
        &genesis,
        &CertifiedConfig::certify(next.clone(), &committee[..3]),
    );
    let weak = CertifiedDelta::of(&genesis, &CertifiedConfig::certify(next, &committee[..2]));
    let mut tampered = good.clone();
    tampered.delta.joined.push(Member::new(
        Keypair::from_seed([5; 32]).public(),
        "127.0.0.1:1",
    ));

    let client = DbqsClient::connect(
        info.genesis.clone(),
        info.client_key.clone(),
        DbqsClientOptions::default(),
    )
    .unwrap();
    // The pusher is member 3, as a parent in the push tree would be.
    let ep = Endpoint::client(
        local_bind_for("127.0.0.1:1".parse().unwrap()),
        keys[3].dalek().clone(),
        TransportOptions::default(),
    )
    .unwrap();
    let member = |i: usize| {
        genesis
            .members
            .iter()
            .find(|m| m.id == keys[i].node_id())
            .unwrap()
            .clone()
    };
    let push = |i: usize, d: CertifiedDelta| {
        let ep = ep.clone();
        let m = member(i);
        async move {
            let addr: SocketAddr = m.addr.parse().unwrap();
            let key = VerifyingKey::from_bytes(&m.key.0).unwrap();
            let msg = MsMessage::PushDeltas {
                deltas: vec![d],
                freshness: None,
            };
            let _ = ep.request(addr, &key, &encode_msg(0, msg)).await;
            m
        }
    };

    let m1 = push(1, tampered).await;
    assert_eq!(
        client.node_status(&m1).await.unwrap().epoch,
        0,
        "a delta that makes another configuration than the certified one is refused"
    );
    let m1 = push(1, weak).await;
    assert_eq!(
        client.node_status(&m1).await.unwrap().epoch,
        0,
        "an under-signed delta is refused"
    );
    let m0 = push(0, good).await;
    assert_eq!(
        client.node_status(&m0).await.unwrap().epoch,
        1,
        "the certified configuration's delta is installed"
    );
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_is_fetched_whole_in_pieces_by_anyone() {
    use dbqsfs_core::ms::pieces::ConfigHead;
    use dbqsfs_core::ms::wire::MsMessage;
    use dbqsfs_daemon::client::fetch_whole;

    let Fixture {
        _tmp,
        dir: _,
        nodes,
        genesis,
        keys,
        next,
        committee,
        ..
    } = four_nodes();
    let committee: Vec<&Keypair> = committee.iter().map(|i| &keys[*i]).collect();
    let next = CertifiedConfig::certify(next, &committee[..3]);
    let pusher = Endpoint::client(
        local_bind_for("127.0.0.1:1".parse().unwrap()),
        keys[3].dalek().clone(),
        TransportOptions::default(),
    )
    .unwrap();
    // A stranger's key: configurations are public.
    let ep = Endpoint::client(
        local_bind_for("127.0.0.1:1".parse().unwrap()),
        Keypair::from_seed([77; 32]).dalek().clone(),
        TransportOptions::default(),
    )
    .unwrap();

    // Before any member holds epoch 1, the fetch fails with a clear error, and bounded.
    let err = fetch_whole(&ep, &genesis, |_, _| {}).await.unwrap_err();
    assert!(
        err.to_string().contains("no configuration of epoch 1"),
        "{err}"
    );

    for m in &genesis.members {
        let addr: SocketAddr = m.addr.parse().unwrap();
        let key = VerifyingKey::from_bytes(&m.key.0).unwrap();
        let msg = MsMessage::Push {
            configs: vec![next.clone()],
            freshness: None,
        };
        let _ = pusher.request(addr, &key, &encode_msg(0, msg)).await;
    }
    let mut seen = Vec::new();
    let got = fetch_whole(&ep, &genesis, |held, total| seen.push((held, total)))
        .await
        .unwrap();
    assert_eq!(got, next);
    let pieces = ConfigHead::of(&next).0.pieces();
    assert_eq!(seen.last(), Some(&(pieces, pieces)));

    // A piece of another hash is refused by the node, not served.
    let m = &genesis.members[0];
    let addr: SocketAddr = m.addr.parse().unwrap();
    let key = VerifyingKey::from_bytes(&m.key.0).unwrap();
    let ask = MsMessage::PieceAsk {
        epoch: 1,
        hash: [9; 32],
        index: 0,
    };
    let resp = ep.request(addr, &key, &encode_msg(0, ask)).await.unwrap();
    let answer = dbqsfs_core::wire::decode::<MsMessage>(&resp).unwrap().msg;
    assert!(matches!(answer, MsMessage::Refused { .. }), "{answer:?}");
    for n in nodes {
        n.stop().await;
    }
}

/// Four in-process nodes of a fresh cluster, their keys, and the configuration of epoch 1 with the
/// same members (not certified: `committee` are the indices of genesis' committee members).
struct Fixture {
    _tmp: tempfile::TempDir,
    /// The cluster's directory (`node-<i>` for each node).
    dir: std::path::PathBuf,
    nodes: Vec<common::Running>,
    info: ClusterInfo,
    genesis: Configuration,
    keys: Vec<Keypair>,
    next: Configuration,
    committee: Vec<usize>,
}

fn four_nodes() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let toml = init_cluster(&dir);
    let node_dir = |i: usize| dir.join(format!("node-{i}"));
    let nodes: Vec<common::Running> = (0..4)
        .map(|i| start_node(&Handle::current(), &node_dir(i)))
        .collect();
    let info = ClusterInfo::load(&toml).unwrap();
    let genesis = info.genesis.config.clone();
    let keys: Vec<Keypair> = (0..4)
        .map(|i| read_key(&node_dir(i).join("node.key")).unwrap())
        .collect();
    let committee = (0..4)
        .filter(|i| genesis.committee.contains(&keys[*i].node_id()))
        .collect();
    let next = Configuration::new(
        1,
        genesis.params.clone(),
        genesis.members.clone(),
        Some(genesis.hash()),
    );
    Fixture {
        _tmp: tmp,
        dir,
        nodes,
        info,
        genesis,
        keys,
        next,
        committee,
    }
}
