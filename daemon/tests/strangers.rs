//! Strangers are bounded: keys that are neither members nor listed clients share a small
//! transport budget (connections, streams, bytes of requests still arriving, a deadline to deliver
//! them). 50 stranger connections, each trying to hold 64 streams of half-sent 2 MiB frames, raise
//! a node's memory by less than 100 MB, the members and the cluster's client are served
//! meanwhile, and the memory comes back after the strangers leave.

mod common;

use common::Cluster;
use dbqsfs_core::crypto::Keypair;
use dbqsfs_net::{local_bind_for, Endpoint, TransportOptions};
use std::time::Duration;

/// Resident memory of process `pid`, in MB.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_strangers_with_half_sent_frames_cost_a_node_less_than_100_mb() {
    let tmp = tempfile::tempdir().unwrap();
    let (cluster, client) = Cluster::up(tmp.path(), 4, &[]).await;
    for i in 0..8u8 {
        client.put_content(vec![i; 1 << 20]).await.unwrap();
    }
    let pid = cluster.pid(0).unwrap();
    let before = rss_mb(pid);
    let target = client
        .chain()
        .config()
        .member(&cluster.node_id(0))
        .unwrap()
        .clone();
    let addr: std::net::SocketAddr = target.addr.parse().unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&target.key.0).unwrap();

    // 50 strangers, each with its own key and connection, each opening up to 64 streams and
    // sending half of a 2 MiB frame on each, never finishing.
    let mut attackers = Vec::new();
    let mut tasks = Vec::new();
    for s in 0..50u8 {
        let k = Keypair::from_seed([s.wrapping_add(100); 32]);
        let ep = Endpoint::client(
            local_bind_for(addr),
            k.dalek().clone(),
            TransportOptions::default(),
        )
        .unwrap();
        attackers.push(ep.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(conn) = ep.connection(addr, &key).await else {
                return 0usize;
            };
            let mut held = Vec::new();
            for _ in 0..64 {
                let Ok(Ok((mut send, recv))) =
                    tokio::time::timeout(Duration::from_millis(200), conn.open_bi()).await
                else {
                    break;
                };
                let mut frame = (2u32 << 20).to_le_bytes().to_vec();
                frame.extend(vec![0x5a; 1 << 20]);
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), send.write_all(&frame)).await;
                held.push((send, recv));
            }
            let n = held.len();
            tokio::time::sleep(Duration::from_secs(8)).await;
            drop(held);
            n
        }));
    }
    // Meanwhile the cluster's client is served.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut peak = rss_mb(pid);
    for i in 0..8u8 {
        let id = client
            .put_content(vec![i.wrapping_add(50); 1 << 20])
            .await
            .unwrap();
        assert!(client.get_content(id).await.unwrap().is_some());
        peak = peak.max(rss_mb(pid));
    }
    for t in tasks {
        t.await.unwrap();
        peak = peak.max(rss_mb(pid));
    }
    for ep in attackers {
        ep.close().await;
    }
    // The node returns freed memory to the OS every 10 s.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = rss_mb(pid);
    println!("node RSS: {before:.0} MB before, {peak:.0} MB at the peak, {after:.0} MB after");
    assert!(
        peak - before < 100.0,
        "strangers raised the node's memory by {:.0} MB",
        peak - before
    );
    assert!(
        after - before < 40.0,
        "memory did not come back: {before:.0} MB before, {after:.0} MB after"
    );
    let id = client
        .put_content(b"after the strangers".to_vec())
        .await
        .unwrap();
    assert!(client.get_content(id).await.unwrap().is_some());
}
