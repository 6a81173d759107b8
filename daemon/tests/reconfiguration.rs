//! Reconfiguration under load on a real cluster of separate `dbqsfs node` processes: 4 nodes hold
//! 200 MiB while a verified client workload runs (content and public-key blocks, each read checked
//! against what was acknowledged); 3 nodes join, one per epoch; then one member leaves and one is
//! killed with kill -9 and evicted. The workload must see no failed and no wrong operation;
//! afterwards every object is readable and held by every member of its group in the final
//! configuration, and, once every node still running (the leaver too) reports its garbage
//! collection complete, no node holds an object it is not responsible for in that configuration.
//!
//! `DBQSFS_RECONF_MB` changes the amount of data (default 200).

mod common;

use common::{run_cli, Cluster, BIN};
use dbqsfs_core::crypto::{Keypair, ObjectId};
use dbqsfs_core::store::Store;
use dbqsfs_daemon::client::DbqsClient;
use dbqsfs_daemon::store::DiskStore;
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TIMING: &[&str] = &[
    "--epoch-ms",
    "4000",
    "--probe-ms",
    "500",
    "--evict-after",
    "4",
    "--freshness-ms",
    "6000",
];

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    getrandom::fill(&mut v).unwrap();
    v
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    wrong: AtomicU64,
}

/// The verified workload: puts and gets of content blocks and of public-key blocks (one writer per
/// label, so a read must return the last acknowledged value or a newer one being written).
async fn workload(client: DbqsClient, stop: Arc<AtomicBool>, counts: Arc<Counts>) -> Vec<ObjectId> {
    let owner = Keypair::from_seed(random(32).try_into().unwrap());
    let mut content: Vec<(ObjectId, blake3::Hash)> = Vec::new();
    let mut pk: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut i = 0u64;
    let fail = |what: String| {
        counts.failed.fetch_add(1, Ordering::Relaxed);
        eprintln!("workload: FAILED {what}");
    };
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        match i % 4 {
            0 => {
                let data = random(64 * 1024);
                match client.put_content(data.clone()).await {
                    Ok(id) => {
                        content.push((id, blake3::hash(&data)));
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => fail(format!("put content: {e}")),
                }
            }
            1 if !content.is_empty() => {
                let (id, h) = content[(i as usize / 4) % content.len()];
                match client.get_content(id).await {
                    Ok(Some(d)) if blake3::hash(&d) == h => {
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(other) => {
                        counts.wrong.fetch_add(1, Ordering::Relaxed);
                        eprintln!("workload: WRONG content read: {:?}", other.map(|d| d.len()));
                    }
                    Err(e) => fail(format!("get content: {e}")),
                }
            }
            2 => {
                let label = format!("k{}", i % 16).into_bytes();
                let value = format!("v{i}").into_bytes();
                match client.put_pk(&owner, &label, value.clone(), None).await {
                    Ok(_) => {
                        pk.insert(label, value);
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => fail(format!("put pk: {e}")),
                }
            }
            _ => {
                let Some((label, value)) = pk.iter().nth(i as usize % pk.len().max(1)) else {
                    continue;
                };
                let id = dbqsfs_core::object::pk_block_id(&owner.public(), label);
                match client.get_pk(id).await {
                    Ok(Some(b)) if b.value == *value => {
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(other) => {
                        counts.wrong.fetch_add(1, Ordering::Relaxed);
                        eprintln!("workload: WRONG pk read: {:?}", other.map(|b| b.version));
                    }
                    Err(e) => fail(format!("get pk: {e}")),
                }
            }
        }
    }
    let mut ids: Vec<ObjectId> = content.iter().map(|(id, _)| *id).collect();
    ids.extend(
        pk.keys()
            .map(|l| dbqsfs_core::object::pk_block_id(&owner.public(), l)),
    );
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_reads_and_writes_survive_three_joins_a_leave_and_a_kill_under_load() {
    let mb: usize = std::env::var("DBQSFS_RECONF_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::init(tmp.path(), 4, TIMING);
    for i in 0..4 {
        cluster.start(i);
    }
    let client = cluster.client();

    // 200 MiB of 1 MiB content blocks, 8 in flight.
    let t = Instant::now();
    let mut stored: Vec<(ObjectId, blake3::Hash)> = Vec::new();
    for chunk in (0..mb).collect::<Vec<_>>().chunks(8) {
        let puts: Vec<_> = chunk
            .iter()
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move {
                    let data = random(1 << 20);
                    let h = blake3::hash(&data);
                    (c.put_content(data).await.expect("initial put"), h)
                })
            })
            .collect();
        for p in puts {
            stored.push(p.await.unwrap());
        }
    }
    println!("stored {mb} MiB in {:?}", t.elapsed());

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let load = tokio::spawn(workload(client.clone(), stop.clone(), counts.clone()));

    // Three joins, one per epoch.
    let admission = tmp.path().join("c/admission.key");
    for k in 0..3 {
        let (dir, addr) = cluster.new_node_dir();
        let pubkey = run_cli(&["keygen", "--dir", dir.to_str().unwrap()]);
        let cert = run_cli(&[
            "admit",
            "--admission-key",
            admission.to_str().unwrap(),
            &pubkey,
        ]);
        let i = cluster.spawn_join(&dir, &addr, &cert);
        let id = cluster.node_id(i);
        let t = Instant::now();
        loop {
            let chain = client.refresh().await;
            if chain.config().is_member(&id) {
                println!(
                    "join {k}: member at epoch {} after {:?}",
                    chain.epoch(),
                    t.elapsed()
                );
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "join {k} not admitted"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cluster.wait_ready(&client, Duration::from_secs(180)).await;
    }

    // One member leaves, one is killed (kill -9) and evicted.
    let leaver = 1;
    let victim = 2;
    let leaver_id = cluster.node_id(leaver);
    let victim_id = cluster.node_id(victim);
    let out = Command::new(BIN)
        .args(["leave", "--dir"])
        .arg(cluster.node_dir(leaver))
        .args(["--timeout", "60"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "leave: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.kill(victim);
    let t = Instant::now();
    loop {
        let chain = client.refresh().await;
        let c = chain.config();
        if !c.is_member(&leaver_id) && !c.is_member(&victim_id) {
            println!(
                "leave and eviction done at epoch {} after {:?}",
                chain.epoch(),
                t.elapsed()
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "leaver or killed node still a member"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.wait_ready(&client, Duration::from_secs(180)).await;

    stop.store(true, Ordering::Relaxed);
    let written = load.await.unwrap();
    let (ok, failed, wrong) = (
        counts.ok.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.wrong.load(Ordering::Relaxed),
    );
    println!("workload: {ok} operations ok, {failed} failed, {wrong} wrong");
    assert!(ok > 100, "the workload hardly ran ({ok} operations)");
    assert_eq!(
        (failed, wrong),
        (0, 0),
        "the workload saw failed or wrong operations"
    );

    // Every object is readable.
    for (id, h) in &stored {
        let d = client
            .get_content(*id)
            .await
            .expect("read")
            .expect("present");
        assert_eq!(blake3::hash(&d), *h, "content {id:?} changed");
    }
    // Wait until every node still running (the members, and the node that left) has collected the
    // ranges it lost.
    let chain = client.refresh().await;
    let all_configs = chain.all();
    let left_at = all_configs
        .iter()
        .rev()
        .take_while(|c| !c.config.is_member(&leaver_id))
        .last()
        .map(|c| c.config.epoch)
        .expect("the leaver is no member in the newest configuration");
    let t = Instant::now();
    loop {
        let newest = client.refresh().await.epoch();
        let mut pending = Vec::new();
        let mut deleted = 0;
        for i in 0..cluster.len() {
            if i == victim {
                continue;
            }
            let id = cluster.node_id(i);
            let m = all_configs
                .iter()
                .rev()
                .find_map(|c| c.config.member(&id).cloned())
                .expect("every node was a member");
            match client.node_status(&m).await {
                Ok(s)
                    if s.ready
                        && s.gc.iter().all(|g| g.complete())
                        && s.epoch >= if i == leaver { left_at } else { newest } =>
                {
                    deleted += s.gc.iter().map(|g| g.objects_deleted).sum::<u64>();
                }
                Ok(s) => pending.push(format!(
                    "{}: epoch {} ready {} gc {:?}",
                    id.short(),
                    s.epoch,
                    s.ready,
                    s.gc
                )),
                Err(e) => pending.push(format!("{}: {e}", id.short())),
            }
        }
        if pending.is_empty() {
            println!(
                "garbage collection complete everywhere after {:?}: {deleted} objects deleted",
                t.elapsed()
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "garbage collection not complete:\n{}",
            pending.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let final_config = client.refresh().await.config().clone();
    cluster.stop_all();

    // Every object is held by every member of its group in the final configuration.
    let mut stores = BTreeMap::new();
    for i in 0..cluster.len() {
        let id = cluster.node_id(i);
        if i == victim {
            continue;
        }
        let store = DiskStore::open(&cluster.node_dir(i).join("data")).expect("open store");
        let held: std::collections::BTreeSet<ObjectId> =
            store.list().unwrap().into_iter().collect();
        stores.insert(id, held);
    }
    let all: Vec<ObjectId> = stored.iter().map(|(id, _)| *id).chain(written).collect();
    let mut extra = Vec::new();
    for x in &all {
        for m in final_config.group(x) {
            let held = stores.get(&m.id).expect("a member's store");
            assert!(
                held.contains(x),
                "{:?} is missing at group member {}",
                x,
                m.id.short()
            );
        }
        extra.extend(
            stores
                .iter()
                .filter(|(id, held)| !final_config.is_responsible(id, x) && held.contains(x))
                .map(|(id, _)| format!("{x:?} at {}", id.short())),
        );
    }
    println!(
        "{} objects held by every member of their final group; {} copies left at nodes no longer responsible",
        all.len(),
        extra.len()
    );
    assert!(
        extra.is_empty(),
        "copies left at nodes not responsible for them in the final configuration:\n{}",
        extra.join("\n")
    );
}

/// 1 MiB content puts, 8 in flight, for `secs`: MB/s.
async fn put_throughput(
    client: &DbqsClient,
    secs: u64,
    stop_early: Option<Arc<AtomicBool>>,
) -> (f64, u64) {
    let t = Instant::now();
    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = client.clone();
        let bytes = bytes.clone();
        let stop = stop_early.clone();
        tasks.push(tokio::spawn(async move {
            while t.elapsed() < Duration::from_secs(secs)
                && !stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
            {
                c.put_content(random(1 << 20))
                    .await
                    .expect("put during benchmark");
                bytes.fetch_add(1 << 20, Ordering::Relaxed);
            }
        }));
    }
    // The MB written in each second, printed at the end.
    let per_second = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = {
        let (bytes, per_second) = (bytes.clone(), per_second.clone());
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = bytes.load(Ordering::Relaxed);
                per_second
                    .lock()
                    .unwrap()
                    .push(((now - last) as f64 / 1e6).round() as u64);
                last = now;
            }
        })
    };
    for task in tasks {
        task.await.unwrap();
    }
    sampler.abort();
    println!("  MB written per second: {:?}", per_second.lock().unwrap());
    let b = bytes.load(Ordering::Relaxed);
    (b as f64 / 1e6 / t.elapsed().as_secs_f64(), b)
}

/// Benchmark (run with `-- --ignored --nocapture`): state-transfer rates into nodes joining a
/// cluster of 4 that holds `DBQSFS_BENCH_MB` (default 1024) MiB plus what the steady-state
/// measurement wrote: a 5th node joins the idle cluster (the transfer alone), then a 6th joins
/// while the client writes, which gives the transfer rate under load and the client throughput
/// during it relative to steady state, in the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_transfer_rate_and_throughput_dip() {
    let mb: usize = std::env::var("DBQSFS_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::init(
        tmp.path(),
        4,
        &["--epoch-ms", "3600000", "--freshness-ms", "60000"],
    );
    for i in 0..4 {
        cluster.start(i);
    }
    let client = cluster.client();
    let t = Instant::now();
    for chunk in (0..mb).collect::<Vec<_>>().chunks(8) {
        let puts: Vec<_> = chunk
            .iter()
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.put_content(random(1 << 20)).await.expect("put") })
            })
            .collect();
        for p in puts {
            p.await.unwrap();
        }
    }
    println!("stored {mb} MiB in {:?}", t.elapsed());

    let (steady, _) = put_throughput(&client, 15, None).await;
    println!("steady state: {steady:.1} MB/s of 1 MiB puts (8 in flight)");

    // A 5th node joins an idle cluster: the transfer alone, with the machine to itself.
    let (e, member) = join_one(&mut cluster, &client, tmp.path()).await;
    let cpu = Cpu::now();
    let transfer = transfer_of(&client, &member, e, None).await;
    report("into a node joining an idle cluster", e, &transfer);
    cpu.report("the idle transfer", transfer.totals().3);
    settle(&client).await;

    // A 6th node joins while the client writes: both rates, in the same run.
    let (e, member) = join_one(&mut cluster, &client, tmp.path()).await;
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (c, done) = (client.clone(), done.clone());
        tokio::spawn(async move { transfer_of(&c, &member, e, Some(done)).await })
    };
    let cpu = Cpu::now();
    let (during, _) = put_throughput(&client, 600, Some(done.clone())).await;
    let transfer = watcher.await.unwrap();
    cpu.report("the transfer under load", transfer.totals().3);
    report("into a node joining under the client load", e, &transfer);
    println!(
        "client throughput during the transfer: {during:.1} MB/s = {:.0}% of steady state ({steady:.1} MB/s)",
        100.0 * during / steady
    );
    // The same load on the 6 nodes once everything settled: what the transfer itself cost.
    settle(&client).await;
    let cpu = Cpu::now();
    let (after, written) = put_throughput(&client, 15, None).await;
    cpu.report("the client's writes alone", written);
    println!(
        "after: {after:.1} MB/s on 6 nodes; during the transfer {:.0}% of that",
        100.0 * during / after
    );
    cluster.stop_all();
}

/// The machine's CPU time (all processes), from /proc/stat.
struct Cpu {
    busy: u64,
    total: u64,
    at: Instant,
}

impl Cpu {
    fn now() -> Cpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        let total: u64 = ticks.iter().take(8).sum();
        Cpu {
            busy: total - idle,
            total,
            at: Instant::now(),
        }
    }

    /// Prints how busy the machine was since `self`, and the CPU time per MB of `bytes`.
    fn report(&self, what: &str, bytes: u64) {
        let now = Cpu::now();
        let busy = (now.busy - self.busy) as f64;
        let total = (now.total - self.total).max(1) as f64;
        let ticks_per_s = total / self.at.elapsed().as_secs_f64();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "CPU during {what}: {:.0}% of the machine, {:.1} ms per MB",
            100.0 * busy / total,
            1000.0 * busy / (ticks_per_s / cores) / (bytes as f64 / 1e6).max(1e-9)
        );
    }
}

/// Waits until every member is ready and done with garbage collection (at most 2 minutes).
async fn settle(client: &DbqsClient) {
    let t = Instant::now();
    let config = client.refresh().await.config().clone();
    for m in &config.members {
        loop {
            match client.node_status(m).await {
                Ok(s) if s.ready && s.gc.iter().all(|g| g.complete()) => break,
                _ if t.elapsed() > Duration::from_secs(120) => {
                    panic!("{} did not settle in 2 minutes", m.id.short())
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    println!(
        "settled (ready, garbage collected) after {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// Admits and starts one more node, then ends the epoch so that it joins: its epoch and member.
async fn join_one(
    cluster: &mut Cluster,
    client: &DbqsClient,
    root: &std::path::Path,
) -> (u64, dbqsfs_core::config::Member) {
    let (dir, addr) = cluster.new_node_dir();
    let pubkey = run_cli(&["keygen", "--dir", dir.to_str().unwrap()]);
    let admission = root.join("c/admission.key");
    let cert = run_cli(&[
        "admit",
        "--admission-key",
        admission.to_str().unwrap(),
        &pubkey,
    ]);
    let more = std::env::var("DBQSFS_BENCH_NODE_ARGS").unwrap_or_default();
    let more: Vec<&str> = more.split_whitespace().collect();
    let i = cluster.spawn_join_with(&dir, &addr, &cert, &more);
    let id = cluster.node_id(i);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ended = cluster.propose_end_of_epoch(client).await;
    let e = cluster
        .wait_epoch(client, ended + 1, Duration::from_secs(30))
        .await;
    let chain = client.refresh().await;
    let member = chain
        .config()
        .member(&id)
        .expect("the new node joined")
        .clone();
    (e, member)
}

/// Waits for `member`'s transfer into epoch `e` to complete (then sets `done`): its status.
async fn transfer_of(
    client: &DbqsClient,
    member: &dbqsfs_core::config::Member,
    e: u64,
    done: Option<Arc<AtomicBool>>,
) -> dbqsfs_daemon::control::TransferStatus {
    loop {
        if let Ok(s) = client.node_status(member).await {
            if let Some(t) = s.transfers.iter().find(|t| t.epoch == e && t.complete) {
                if let Some(d) = done {
                    d.store(true, Ordering::Relaxed);
                }
                return t.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn report(what: &str, e: u64, transfer: &dbqsfs_daemon::control::TransferStatus) {
    let (objects, _, _, fetched) = transfer.totals();
    let secs = transfer.elapsed_ms as f64 / 1000.0;
    println!(
        "transfer {what} (epoch {e}): {objects} objects, {:.1} MB fetched in {secs:.1} s = {:.1} MB/s, {:.0} objects/s",
        fetched as f64 / 1e6,
        fetched as f64 / 1e6 / secs,
        objects as f64 / secs
    );
}
