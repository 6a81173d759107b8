//! A Byzantine client (built with `--features fault-injection`) on a real 4-node cluster: it
//! sends releases forged in another owner's name, releases of its own for blocks it never held,
//! and an owner's genuine but old release again. Replicas refuse the forgery (counted in
//! `dbqsfs_forged_requests_total` and logged at most every 10 s), let none of them
//! release anything, and every block stays readable well past the grace; an owner's own release
//! still frees its block (so the wait means something).

mod common;

use common::{init_cluster, one_second_grace, start_node};
use dbqsfs_core::crypto::Keypair;
use dbqsfs_core::dbqs::refs::RefRecord;
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions, Owner};
use dbqsfs_daemon::files::ClusterInfo;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_foreign_releases_free_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let toml = init_cluster(&dir);
    for i in 0..4 {
        one_second_grace(&dir.join(format!("node-{i}")));
    }
    let nodes: Vec<common::Running> = (0..4)
        .map(|i| {
            start_node(
                &tokio::runtime::Handle::current(),
                &dir.join(format!("node-{i}")),
            )
        })
        .collect();
    let info = ClusterInfo::load(&toml).unwrap();
    let options = DbqsClientOptions {
        op_timeout: Duration::from_secs(5),
        ..DbqsClientOptions::default()
    };
    // Both connect with the cluster's client key; they sign records with their own keys.
    let client = DbqsClient::connect(
        info.genesis.clone(),
        info.client_key.clone(),
        options.clone(),
    )
    .unwrap();
    let thief_link =
        DbqsClient::connect(info.genesis.clone(), info.client_key.clone(), options).unwrap();
    let alice_key = Keypair::from_seed([0xa1; 32]);
    let alice = Owner::new(alice_key.clone());
    let thief = Keypair::from_seed([0x7e; 32]);

    let kept = b"alice keeps this".to_vec();
    let x = client.put_as(&alice, kept.clone()).await.unwrap();
    let again = b"alice released this, then put it again".to_vec();
    let y = client.put_as(&alice, again.clone()).await.unwrap();
    // An old release of alice's, genuinely signed (as a thief would have captured it)...
    let old_release = RefRecord::release(&alice_key, y, 1);
    client.release_as(&alice, y).await.unwrap();
    client.put_as(&alice, again.clone()).await.unwrap();
    let freed = b"alice really releases this".to_vec();
    let z = client.put_as(&alice, freed).await.unwrap();

    // A release in alice's name signed by the thief: refused.
    let mut forged = RefRecord::release(&thief, x, u64::MAX / 2);
    forged.owner = alice_key.public();
    let r = thief_link.send_reference(forged).await;
    assert!(r.is_err(), "a forged release was accepted: {r:?}");
    // The thief's own releases, of blocks it never held: stored, and they free nothing.
    thief_link
        .send_reference(RefRecord::release(&thief, x, 7))
        .await
        .unwrap();
    thief_link
        .send_reference(RefRecord::release(&thief, y, 7))
        .await
        .unwrap();
    // alice's old release again: older than her hold since, it changes nothing.
    thief_link.send_reference(old_release).await.unwrap();
    // alice's own release of z: it goes after the grace.
    client.release_as(&alice, z).await.unwrap();
    client.settle(Duration::from_secs(3)).await;
    thief_link.settle(Duration::from_secs(3)).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client.get_content(z).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "alice's own release did not free z within 20 s (grace 1 s)"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Well past the grace: what alice holds is all there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(client.get_content(x).await.unwrap(), Some(kept));
    assert_eq!(client.get_content(y).await.unwrap(), Some(again));

    drop((client, thief_link));
    for n in nodes {
        n.stop().await;
    }
}
