//! Reconfiguration survives restarts. A committee member persists what it signed in the MS
//! agreement before it sends it, and a restarted member takes the agreement of its epoch up
//! again from that state; before, every member sat out the agreement of the epoch it restarted
//! in, and after a whole-cluster restart epochs stopped for good.
//!
//! One real cluster of 5 node processes (a committee of 4): five whole-cluster restarts at random
//! moments of an epoch (graceful stops and power cuts, kill -9 of every node), each followed by a
//! new epoch within two epoch lengths; kill -9 of two committee members at once, mid-agreement,
//! and their restart, after which epochs go on; then a join and an eviction; ten epochs or more,
//! under committees that change. No node ever
//! reports agreement evidence (two different statements of one member for one slot). And a
//! member killed for eight epochs catches up as soon as it is back.

mod common;

use common::Cluster;
use std::time::{Duration, Instant};

const EPOCH_MS: u64 = 3000;
const TIMING: &[&str] = &[
    "--epoch-ms",
    "3000",
    "--probe-ms",
    "500",
    "--evict-after",
    "3",
    "--freshness-ms",
    "3000",
];

/// A random duration below `ms` milliseconds.
fn random_ms(ms: u64) -> Duration {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).expect("randomness");
    Duration::from_millis(u64::from_le_bytes(r) % ms)
}

/// Waits for an epoch after `after`; returns it and how long it took.
async fn next_epoch(
    cluster: &Cluster,
    client: &dbqsfs_daemon::client::DbqsClient,
    after: u64,
    bound: Duration,
    what: &str,
) -> (u64, Duration) {
    let t = Instant::now();
    let e = cluster.wait_epoch(client, after + 1, bound).await;
    println!(
        "{what}: epoch {e} after {:.1} s (was {after})",
        t.elapsed().as_secs_f64()
    );
    (e, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_go_on_after_whole_cluster_restarts_and_a_double_kill_then_a_join_and_an_eviction() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::init(tmp.path(), 5, TIMING);
    for i in 0..5 {
        cluster.start(i);
    }
    // A client per restart, as an operator's `dbqsfs status` would be: a client's cached
    // connections to killed processes look open until a request to them times out.
    let mut client = cluster.client();
    cluster
        .wait_epoch(&client, 2, Duration::from_secs(30))
        .await;
    // Two epoch lengths, as the issue asks, plus the nodes' start (a second or so on a loaded
    // machine with five processes starting at once).
    let bound = Duration::from_millis(2 * EPOCH_MS + 2_000);
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        tokio::time::sleep(random_ms(EPOCH_MS)).await;
        let epoch = client.refresh().await.epoch();
        let power_cut = round % 2 == 1;
        if power_cut {
            for i in 0..5 {
                cluster.kill(i);
            }
        } else {
            cluster.stop_all();
        }
        for i in 0..5 {
            cluster.restart(i);
        }
        client = cluster.client();
        let how = if power_cut {
            "kill -9 of every node"
        } else {
            "every node stopped"
        };
        let (_, took) = next_epoch(
            &cluster,
            &client,
            epoch,
            bound,
            &format!("restart {}: {how}", round + 1),
        )
        .await;
        slowest = slowest.max(took);
    }
    println!("slowest new epoch after a whole-cluster restart: {slowest:?}");

    // Two of the four committee members killed at once, in the middle of the epoch's agreement.
    let config = client.refresh().await.config().clone();
    let committee: Vec<usize> = (0..5)
        .filter(|&i| config.committee.contains(&cluster.node_id(i)))
        .collect();
    tokio::time::sleep(random_ms(EPOCH_MS)).await;
    let epoch = client.refresh().await.epoch();
    cluster.kill(committee[0]);
    cluster.kill(committee[1]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart(committee[0]);
    cluster.restart(committee[1]);
    client = cluster.client();
    let (e, _) = next_epoch(
        &cluster,
        &client,
        epoch,
        bound,
        "kill -9 of two committee members",
    )
    .await;
    let (mut epoch, _) = next_epoch(&cluster, &client, e, bound, "and the epoch after").await;

    // A join still happens.
    let (dir, addr, _, cert) = cluster.new_admitted_node();
    let joiner = cluster.spawn_join(&dir, &addr, &cert);
    let joiner_id = cluster.node_id(joiner);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client.refresh().await.config().is_member(&joiner_id) {
        assert!(
            Instant::now() < deadline,
            "the joiner is not a member after 30 s; logs in {}",
            cluster.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    epoch = epoch.max(client.refresh().await.epoch());
    println!("joined in epoch {epoch}");

    // An eviction still happens: a member outside the committee is killed for good.
    let config = client.refresh().await.config().clone();
    let victim = (0..5)
        .find(|&i| !config.committee.contains(&cluster.node_id(i)))
        .expect("six members and a committee of four");
    let victim_id = cluster.node_id(victim);
    cluster.kill(victim);
    let deadline = Instant::now() + Duration::from_secs(45);
    while client.refresh().await.config().is_member(&victim_id) {
        assert!(
            Instant::now() < deadline,
            "the killed member is still in the configuration after 45 s; logs in {}",
            cluster.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("evicted by epoch {}", client.refresh().await.epoch());

    // Ten epochs or more, under committees that changed: every configuration the client holds
    // was checked against the committee of the epoch before it.
    let chain = client.refresh().await;
    let committees: std::collections::BTreeSet<_> = (0..=chain.epoch())
        .filter_map(|e| chain.get(e))
        .map(|c| c.config.committee.clone())
        .collect();
    println!(
        "{} epochs, {} different committees",
        chain.epoch(),
        committees.len()
    );
    assert!(chain.epoch() >= 10, "only {} epochs", chain.epoch());
    assert!(committees.len() >= 2, "the committee never changed");
    // One MS key through every restart and committee change: generated in epoch 0, carried by
    // every later configuration, and from epoch 2 on the only thing that certifies one.
    assert_ms_key_held(&chain);

    // Nobody signed two different statements for one slot: a correct member holding two would
    // have reported them as evidence of misbehaviour.
    for i in 0..cluster.len() {
        let log = std::fs::read_to_string(cluster.node_dir(i).join("node.log")).unwrap_or_default();
        assert!(
            !log.contains("agreement evidence of misbehaviour"),
            "node {i} reported agreement evidence; logs in {}",
            cluster.dir.display()
        );
        if i < 5 {
            assert!(
                !log.contains("sitting this epoch's agreement out"),
                "node {i} sat an agreement out; logs in {}",
                cluster.dir.display()
            );
        }
    }
}

/// Every configuration from epoch 1 on carries the same MS key, and every one from epoch 2 on is
/// certified by one signature under it (no committee signatures).
fn assert_ms_key_held(chain: &dbqsfs_core::config::ConfigChain) {
    let key = chain
        .get(1)
        .and_then(|c| c.config.key.as_ref())
        .map(|k| k.commitments[0])
        .expect("configuration 1 carries the MS key");
    for e in 1..=chain.epoch() {
        let Some(c) = chain.get(e) else { continue };
        let carried = c.config.key.as_ref().map(|k| k.commitments[0]);
        assert_eq!(carried, Some(key), "epoch {e} carries another MS key");
        if e >= 2 {
            assert!(
                c.cert.threshold.is_some() && c.cert.signatures.is_empty(),
                "epoch {e} is not certified under the MS key"
            );
        }
    }
}

/// A member stopped for eight epochs (the other three of a committee of four go on without it)
/// and restarted catches up at once: its first pull brings every configuration it missed, as
/// deltas, each checked against its certificate; it then holds the same configuration as the
/// others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_away_for_eight_epochs_catches_up_at_once() {
    const EPOCH_MS: u64 = 1500;
    let tmp = tempfile::tempdir().unwrap();
    let timing = [
        "--epoch-ms",
        "1500",
        "--probe-ms",
        "500",
        // Four members are the fewest for f = 1: the one away is never evicted.
        "--evict-after",
        "3",
        "--freshness-ms",
        "3000",
    ];
    let mut cluster = Cluster::init(tmp.path(), 4, &timing);
    for i in 0..4 {
        cluster.start(i);
    }
    let client = cluster.client();
    let start = cluster
        .wait_epoch(&client, 2, Duration::from_secs(30))
        .await;
    let away = 3;
    cluster.kill(away);
    let bound = Duration::from_millis(8 * 3 * EPOCH_MS + 20_000);
    let now = cluster.wait_epoch(&client, start + 8, bound).await;
    println!("member {away} away from epoch {start} to {now}");

    cluster.restart(away);
    let t = Instant::now();
    let id = cluster.node_id(away);
    loop {
        let chain = client.refresh().await;
        let m = chain.config().member(&id).expect("still a member").clone();
        if let Ok(s) = client.ms_status(&m).await {
            if s.epoch >= now {
                println!(
                    "caught up to epoch {} in {:.1} s",
                    s.epoch,
                    t.elapsed().as_secs_f64()
                );
                break;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "member {away} did not catch up from epoch {start} to {now} within 20 s; logs in {}",
            tmp.path().display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What it caught up with is certified under the one MS key, one verification each.
    assert_ms_key_held(&client.refresh().await);
    // Everyone holds the same configuration of the newest epoch they agree on.
    let newest = client.refresh().await.epoch();
    cluster
        .wait_all_at_least(&client, newest, Duration::from_secs(20))
        .await;
    let hashes = cluster.config_hashes(&client).await;
    let e = hashes.iter().map(|(e, _)| *e).min().unwrap();
    let at_e: Vec<_> = hashes.iter().filter(|(x, _)| *x == e).collect();
    assert!(
        at_e.windows(2).all(|w| w[0].1 == w[1].1),
        "members disagree on epoch {e}: {hashes:?}"
    );
    cluster.stop_all();
}
