//! State transfer between epochs on real nodes over loopback QUIC. A configuration that adds a
//! node, certified with the genesis committee's keys, is pushed to a cluster that holds data:
//! - every member transfers into the new epoch and becomes ready; the new node fetches exactly the
//!   objects of its groups, serves them (every read succeeds with an old node stopped), and
//!   afterwards every member of every object's group holds it on disk;
//! - a new node killed (SIGKILL) mid-transfer resumes after a restart: the units it persisted as
//!   done are not transferred again, and it fetches only the blocks it had not stored;
//! - a source that hangs (SIGSTOP) in the middle of a transfer delays it by seconds, not by a
//!   request timeout per block;
//! - a read that needs the new node before its range is transferred is answered after a fetch of
//!   that one object (on demand), not after the range;
//! - once everyone is ready, the old members garbage-collect the ranges they lost to the new node:
//!   afterwards no node holds an object it is not responsible for, every member of every object's
//!   group still holds it and every object reads back; a restarted node remembers what it collected.

mod common;

use common::{start_node, Running, BIN};
use dbqsfs_core::config::{CertifiedConfig, Configuration, Member};
use dbqsfs_core::crypto::{Domain, Keypair, NodeId, ObjectId};
use dbqsfs_core::dbqs::msg::DbqsMessage;
use dbqsfs_core::dbqs::transfer::Arc as RingArc;
use dbqsfs_core::object::pk_block_id;
use dbqsfs_core::store::Store;
use dbqsfs_core::wire::encode_msg;
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions, NodeStatus};
use dbqsfs_daemon::control::{TransferStatus, UnitPhase};
use dbqsfs_daemon::files::{self, ClusterInfo, NodeFile};
use dbqsfs_daemon::store::DiskStore;
use dbqsfs_net::{local_bind_for, Endpoint, TransportOptions};
use ed25519_dalek::VerifyingKey;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

/// A cluster directory of `n` genesis nodes plus one more node directory, admitted by the
/// cluster's admission key, and the certified configuration of epoch 1 that adds it.
struct Setup {
    _tmp: tempfile::TempDir,
    info: ClusterInfo,
    /// Node directories: the genesis members', then the added node's (last).
    dirs: Vec<PathBuf>,
    ids: Vec<NodeId>,
    next: CertifiedConfig,
    /// An endpoint with the client key, for pushes.
    ep: Endpoint,
}

impl Setup {
    fn new(n: u32) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).unwrap();
        let base = 20000 + u32::from(u16::from_le_bytes(r)) % 30000;
        let out = Command::new(BIN)
            .args(["cluster", "init", "--nodes", &n.to_string(), "--dir"])
            .arg(&dir)
            .args(["--base-port", &base.to_string()])
            // The only epoch change is the test's (no Membership Service epoch ends meanwhile).
            .args(["--epoch-ms", "600000"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info = ClusterInfo::load(&dir.join("cluster.toml")).unwrap();
        let mut dirs: Vec<PathBuf> = info.file.nodes.iter().map(|d| dir.join(d)).collect();
        let mut keys: Vec<Keypair> = dirs
            .iter()
            .map(|d| files::read_key(&d.join("node.key")).unwrap())
            .collect();

        // The added node: a fresh key with an admission certificate, on a free loopback port.
        let admission = files::read_key(&dir.join("admission.key")).unwrap();
        let key = files::random_key().unwrap();
        let mut file: NodeFile = files::read_toml(&dirs[0].join("node.toml")).unwrap();
        file.listen = format!("127.0.0.1:{}", free_port());
        file.admission_cert = hex::encode(admission.sign(Domain::Admission, &key.public().0).0);
        let new_dir = dir.join("node-new");
        std::fs::create_dir_all(&new_dir).unwrap();
        files::write_key(&new_dir.join("node.key"), &key).unwrap();
        files::write_toml(&new_dir.join("node.toml"), &file).unwrap();

        let genesis = info.genesis.config.clone();
        let mut members = genesis.members.clone();
        members.push(Member::new(key.public(), file.listen.clone()));
        let next = Configuration::new(1, genesis.params.clone(), members, Some(genesis.hash()));
        let quorum = 2 * genesis.params.f_ms as usize + 1;
        let signers: Vec<&Keypair> = keys
            .iter()
            .filter(|k| genesis.committee.contains(&k.node_id()))
            .take(quorum)
            .collect();
        let next = CertifiedConfig::certify(next, &signers);
        next.verify_successor(&genesis)
            .expect("the test certifies correctly");

        dirs.push(new_dir);
        keys.push(key);
        let ep = Endpoint::client(
            local_bind_for("127.0.0.1:1".parse().unwrap()),
            info.client_key.dalek().clone(),
            TransportOptions::default(),
        )
        .unwrap();
        Setup {
            _tmp: tmp,
            ids: keys.iter().map(Keypair::node_id).collect(),
            info,
            dirs,
            next,
            ep,
        }
    }

    fn member(&self, i: usize) -> Member {
        self.next.config.member(&self.ids[i]).unwrap().clone()
    }

    fn new_node(&self) -> usize {
        self.dirs.len() - 1
    }

    fn client(&self) -> DbqsClient {
        DbqsClient::connect(
            self.info.genesis.clone(),
            self.info.client_key.clone(),
            DbqsClientOptions {
                freshness: false,
                // A read that asks a stopped node first soon asks another.
                retransmit: Duration::from_millis(300),
                ..DbqsClientOptions::default()
            },
        )
        .unwrap()
    }

    /// Pushes the configuration of epoch 1 to every member of it (one-way: nothing answers), the
    /// added node last (so that its sources are there when it starts).
    async fn push_next(&self) {
        let new = self.ids[self.new_node()];
        let mut members = self.next.config.members.clone();
        members.sort_by_key(|m| m.id == new);
        for m in &members {
            let addr: SocketAddr = m.addr.parse().unwrap();
            let key = VerifyingKey::from_bytes(&m.key.0).unwrap();
            let push = encode_msg(
                1,
                DbqsMessage::PushConfigs {
                    configs: vec![self.next.clone()],
                },
            );
            let _ = self.ep.request(addr, &key, &push).await;
        }
    }

    /// Content ids the added node is responsible for in epoch 1.
    fn needed(&self, data: &Data) -> BTreeSet<ObjectId> {
        let me = self.ids[self.new_node()];
        data.content
            .keys()
            .filter(|id| self.next.config.is_responsible(&me, id))
            .copied()
            .collect()
    }

    /// Every member of every object's group in epoch 1 holds it on disk (nodes stopped).
    fn check_holdings(&self, data: &Data) {
        let stores: BTreeMap<NodeId, DiskStore> = self
            .ids
            .iter()
            .zip(&self.dirs)
            .map(|(id, d)| (*id, open_store(d)))
            .collect();
        let mut missing = Vec::new();
        for (id, bytes) in &data.content {
            for m in self.next.config.group(id) {
                if stores[&m.id].get_content(id).unwrap().as_ref() != Some(bytes) {
                    missing.push(format!("content {} on {}", id.to_hex(), m.id.short()));
                }
            }
        }
        for (id, (version, _)) in &data.pk {
            for m in self.next.config.group(id) {
                let held = stores[&m.id].get_pk(id).unwrap().map(|b| b.version);
                if held < Some(*version) {
                    missing.push(format!(
                        "pk {} v{version} on {}: {held:?}",
                        id.to_hex(),
                        m.id.short()
                    ));
                }
            }
        }
        let new = self.ids[self.new_node()];
        assert!(
            missing.is_empty(),
            "{} objects missing from members of their group (new node {}):\n{}",
            missing.len(),
            new.short(),
            missing.join("\n")
        );
    }
}

/// Opens a stopped node's store (its last tasks may take a moment to let go of it).
fn open_store(dir: &Path) -> DiskStore {
    let start = Instant::now();
    loop {
        match DiskStore::open(&dir.join("data")) {
            Ok(s) => return s,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                eprintln!("store of {} not yet free: {e}", dir.display());
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("store of {}: {e}", dir.display()),
        }
    }
}

async fn stop_all(nodes: impl Iterator<Item = Running>) {
    let mut set = tokio::task::JoinSet::new();
    for n in nodes {
        set.spawn(n.stop());
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the test wrote: content blocks, and public-key blocks by id with their latest
/// (version, value).
struct Data {
    content: BTreeMap<ObjectId, Vec<u8>>,
    pk: BTreeMap<ObjectId, (u64, Vec<u8>)>,
}

fn payload(len: usize, seed: &str) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Writes `blocks` content blocks of about `size` bytes (16 at a time) and `pks` public-key
/// blocks, a third of them in two versions.
async fn write_data(client: &DbqsClient, blocks: usize, size: usize, pks: usize) -> Data {
    let mut set = tokio::task::JoinSet::new();
    let mut content = BTreeMap::new();
    for i in 0..blocks {
        if set.len() >= 16 {
            let (id, data) = set.join_next().await.unwrap().unwrap();
            content.insert(id, data);
        }
        let c = client.clone();
        let data = payload(size / 2 + (i * 7919) % size, &format!("block {i}"));
        set.spawn(async move {
            let id = c.put_content(data.clone()).await.expect("write content");
            (id, data)
        });
    }
    while let Some(r) = set.join_next().await {
        let (id, data) = r.unwrap();
        content.insert(id, data);
    }
    let owner = files::random_key().unwrap();
    let mut pk = BTreeMap::new();
    for i in 0..pks {
        let label = format!("inode {i}").into_bytes();
        let mut version = 1;
        let mut value = payload(100 + i, &format!("pk {i} v1"));
        client
            .put_pk(&owner, &label, value.clone(), Some(1))
            .await
            .expect("write pk v1");
        if i % 3 == 0 {
            version = 2;
            value = payload(200 + i, &format!("pk {i} v2"));
            client
                .put_pk(&owner, &label, value.clone(), Some(2))
                .await
                .expect("write pk v2");
        }
        pk.insert(pk_block_id(&owner.public(), &label), (version, value));
    }
    Data { content, pk }
}

/// Reads everything back through the client.
async fn read_all(client: &DbqsClient, data: &Data) {
    for (id, bytes) in &data.content {
        let got = client.get_content(*id).await;
        assert!(
            matches!(&got, Ok(Some(b)) if b == bytes),
            "content {}: {:?}",
            id.to_hex(),
            got.map(|b| b.map(|b| b.len()))
        );
    }
    for (id, (version, value)) in &data.pk {
        let got = client.get_pk(*id).await.expect("read pk");
        let got = got.expect("pk block present");
        assert_eq!(
            (got.version, &got.value),
            (*version, value),
            "pk {}",
            id.to_hex()
        );
    }
}

fn describe(ts: &[TransferStatus]) -> String {
    ts.iter()
        .map(|t| {
            let (o, k, b, _) = t.totals();
            let (d, n) = t.units_done();
            let phases: Vec<String> = t.units.iter().map(|u| format!("{:?}", u.phase)).collect();
            format!(
                "[epoch {} complete {} units {d}/{n} objects {o}/{k} bytes {b} {}]",
                t.epoch,
                t.complete,
                phases.join(",")
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits until every member in `members` is ready in epoch 1 or later and reports no transfer
/// running; the statuses then.
async fn wait_ready(
    client: &DbqsClient,
    members: &[Member],
    within: Duration,
) -> BTreeMap<NodeId, NodeStatus> {
    let start = Instant::now();
    loop {
        let mut ready = BTreeMap::new();
        let mut pending = Vec::new();
        for m in members {
            match client.node_status(m).await {
                Ok(s) if s.epoch >= 1 && s.ready && s.transfers.iter().all(|t| t.complete) => {
                    ready.insert(m.id, s);
                }
                Ok(s) => pending.push(format!(
                    "{}: epoch {} ready {} {}",
                    m.id.short(),
                    s.epoch,
                    s.ready,
                    describe(&s.transfers)
                )),
                Err(e) => pending.push(format!("{}: {e}", m.id.short())),
            }
        }
        if pending.is_empty() {
            return ready;
        }
        assert!(
            start.elapsed() < within,
            "no state transfer into epoch 1 within {within:?}:\n{}",
            pending.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The completed transfer into epoch 1 in a status.
fn completed(s: &NodeStatus) -> &TransferStatus {
    s.transfers
        .iter()
        .find(|t| t.epoch == 1 && t.complete)
        .unwrap_or_else(|| {
            panic!(
                "no completed transfer into epoch 1: {}",
                describe(&s.transfers)
            )
        })
}

/// (objects fetched, bytes fetched) over the units of a transfer.
fn fetched(t: &TransferStatus) -> (u64, u64) {
    t.units.iter().fold((0, 0), |(o, b), u| {
        (o + u.fetched_objects, b + u.fetched_bytes)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_node_transfers_exactly_its_groups_objects_and_serves_them() {
    let s = Setup::new(4);
    let mut nodes: Vec<Option<Running>> = s
        .dirs
        .iter()
        .map(|d| Some(start_node(&Handle::current(), d)))
        .collect();
    let client = s.client();
    let data = write_data(&client, 96, 256 * 1024, 60).await;
    let new = s.member(s.new_node());
    let before = client
        .node_status(&new)
        .await
        .expect("the new node answers");
    assert_eq!(
        (before.epoch, before.objects, before.transfers.len()),
        (0, 0, 0),
        "the new node holds nothing and transfers nothing before the new configuration"
    );

    s.push_next().await;
    let statuses = wait_ready(&client, &s.next.config.members, Duration::from_secs(120)).await;

    // The new node fetched every content block of its groups, and nothing else; it stored every
    // public-key block of its groups from the listings.
    let t = completed(&statuses[&new.id]);
    let needed = s.needed(&data);
    let needed_bytes: u64 = needed.iter().map(|id| data.content[id].len() as u64).sum();
    let pk_needed = data
        .pk
        .keys()
        .filter(|id| s.next.config.is_responsible(&new.id, id))
        .count() as u64;
    let (objects, known, _, _) = t.totals();
    let (fetched_objects, fetched_bytes) = fetched(t);
    assert!(!needed.is_empty() && pk_needed > 0);
    assert_eq!(
        (fetched_objects, fetched_bytes),
        (needed.len() as u64, needed_bytes),
        "fetched exactly the content of its groups: {}",
        describe(&statuses[&new.id].transfers)
    );
    assert_eq!((objects, known), (needed.len() as u64 + pk_needed, objects));
    assert!(t.units.iter().all(|u| u.phase == UnitPhase::Done));
    let secs = t.elapsed_ms.max(1) as f64 / 1e3;
    eprintln!(
        "new node: {} content blocks ({:.1} MB) and {pk_needed} public-key blocks in {secs:.2} s: {:.1} MB/s",
        needed.len(),
        needed_bytes as f64 / 1e6,
        needed_bytes as f64 / 1e6 / secs
    );
    for m in &s.next.config.members {
        let t = completed(&statuses[&m.id]);
        eprintln!(
            "{}: transfer into 1 took {} ms, fetched {:?}",
            m.id.short(),
            t.elapsed_ms,
            fetched(t)
        );
    }

    // Reads through the client in epoch 1; then with an old node stopped, so that the groups that
    // held it need the new node's answers.
    let t0 = Instant::now();
    read_all(&client, &data).await;
    eprintln!("read all: {:?}", t0.elapsed());
    nodes[0].take().unwrap().stop().await;
    eprintln!("stopped: {:?}", t0.elapsed());
    let fresh = s.client();
    read_all(&fresh, &data).await;
    eprintln!("read all again: {:?}", t0.elapsed());

    stop_all(nodes.into_iter().flatten()).await;
    eprintln!("stopped all: {:?}", t0.elapsed());
    s.check_holdings(&data);
    // The transfer brought each block's owner's hold along with it.
    let store = open_store(&s.dirs[s.new_node()]);
    let owner = client.owner().key().public();
    for id in &needed {
        assert!(
            dbqsfs_core::dbqs::refs::holding(&store.refs(id).unwrap(), &owner),
            "block {} came without its owner's hold",
            id.short()
        );
    }
    eprintln!("checked: {:?}", t0.elapsed());
}

/// Waits until every member in `members` reports its garbage collection complete in epoch 1 or
/// later; the statuses then.
async fn wait_collected(
    client: &DbqsClient,
    members: &[Member],
    within: Duration,
) -> BTreeMap<NodeId, NodeStatus> {
    let start = Instant::now();
    loop {
        let mut done = BTreeMap::new();
        let mut pending = Vec::new();
        for m in members {
            match client.node_status(m).await {
                Ok(s) if s.epoch >= 1 && s.ready && s.gc.iter().all(|g| g.complete()) => {
                    done.insert(m.id, s);
                }
                Ok(s) => pending.push(format!("{}: epoch {} gc {:?}", m.id.short(), s.epoch, s.gc)),
                Err(e) => pending.push(format!("{}: {e}", m.id.short())),
            }
        }
        if pending.is_empty() {
            return done;
        }
        assert!(
            start.elapsed() < within,
            "garbage collection not complete within {within:?}:\n{}",
            pending.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_members_collect_the_ranges_they_lost_to_a_new_node() {
    let s = Setup::new(4);
    let mut nodes: Vec<Option<Running>> = s
        .dirs
        .iter()
        .map(|d| Some(start_node(&Handle::current(), d)))
        .collect();
    let client = s.client();
    let data = write_data(&client, 64, 64 * 1024, 40).await;
    s.push_next().await;
    let t0 = Instant::now();
    wait_ready(&client, &s.next.config.members, Duration::from_secs(120)).await;
    let statuses = wait_collected(&client, &s.next.config.members, Duration::from_secs(60)).await;
    eprintln!("ready and collected: {:?}", t0.elapsed());
    let mut deleted = 0;
    for (i, id) in s.ids.iter().enumerate() {
        let gc = &statuses[id].gc;
        eprintln!("{}: {gc:?}", id.short());
        if i == s.new_node() {
            assert!(gc.is_empty(), "the new node lost nothing");
        } else {
            // With 4 members every node held everything; each old node lost some range to the 5th.
            assert!(!gc.is_empty() && gc.iter().all(|g| g.epoch == 1 && g.arcs_lost > 0));
        }
        deleted += gc.iter().map(|g| g.objects_deleted).sum::<u64>();
    }
    assert!(deleted > 0, "some objects were deleted");
    read_all(&client, &data).await;

    // A restarted old node remembers what it collected: nothing left to collect, nothing to run.
    nodes[0].take().unwrap().stop().await;
    nodes[0] = Some(start_node(&Handle::current(), &s.dirs[0]));
    let m0 = s.member(0);
    let t1 = Instant::now();
    let after = loop {
        match client.node_status(&m0).await {
            Ok(st) => break st,
            Err(e) => {
                assert!(
                    t1.elapsed() < Duration::from_secs(20),
                    "restarted node: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(
        !after.gc.is_empty() && after.gc.iter().all(|g| g.complete() && !g.running),
        "after a restart: {:?}",
        after.gc
    );
    read_all(&s.client(), &data).await;

    stop_all(nodes.into_iter().flatten()).await;
    s.check_holdings(&data);
    // No node holds an object it is not responsible for in epoch 1.
    let mut extra = Vec::new();
    let mut held = 0;
    for (id, dir) in s.ids.iter().zip(&s.dirs) {
        for x in open_store(dir).list().unwrap() {
            held += 1;
            if !s.next.config.is_responsible(id, &x) {
                extra.push(format!("{} on {}", x.to_hex(), id.short()));
            }
        }
    }
    assert!(
        extra.is_empty(),
        "{} objects held by nodes not responsible for them:\n{}",
        extra.len(),
        extra.join("\n")
    );
    let copies: usize = data
        .content
        .keys()
        .chain(data.pk.keys())
        .map(|x| s.next.config.group(x).len())
        .sum();
    assert_eq!(held, copies, "every node holds exactly its groups' objects");
    eprintln!(
        "{deleted} objects deleted; {held} copies held: {:?}",
        t0.elapsed()
    );
}

/// A `dbqsfs node` process this test started; killed (SIGKILL, by its pid) when dropped.
struct NodeProcess {
    child: Child,
}

impl NodeProcess {
    fn spawn(dir: &Path, rate_limit: Option<u64>, log: &Path) -> NodeProcess {
        let limit = rate_limit.map(|r| r.to_string());
        let args: Vec<&str> = match &limit {
            Some(r) => vec!["--transfer-rate-limit", r],
            None => vec![],
        };
        NodeProcess::spawn_with(dir, &args, log)
    }

    /// `dbqsfs node --dir DIR ARGS`, logging to `log`.
    fn spawn_with(dir: &Path, args: &[&str], log: &Path) -> NodeProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(BIN)
            .arg("node")
            .arg("--dir")
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        NodeProcess { child }
    }
}

impl NodeProcess {
    /// SIGSTOP: from now on it accepts nothing and answers nothing, like a silent Byzantine node.
    fn freeze(&self) {
        // SAFETY: kill(2) on the pid of a process this test started.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) },
            0
        );
    }
}

/// Starts the genesis nodes: node `k` as a process (so that it can be frozen), the others in this
/// runtime; and a client, once node `k` answers.
async fn start_old_nodes(s: &Setup, k: usize) -> (NodeProcess, Vec<Running>, DbqsClient) {
    let proc = NodeProcess::spawn(&s.dirs[k], None, &s.dirs[k].join("node.log"));
    let nodes = (0..s.new_node())
        .filter(|i| *i != k)
        .map(|i| start_node(&Handle::current(), &s.dirs[i]))
        .collect();
    let client = s.client();
    wait_reachable(&client, &s.member(k)).await;
    (proc, nodes, client)
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_reachable(client: &DbqsClient, m: &Member) {
    let start = Instant::now();
    while client.node_status(m).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "node {} never answered",
            m.addr
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_transfer_resumes_without_fetching_again_what_it_stored() {
    // Seven nodes, so that the new node's share of the ring has several sources and units.
    let s = Setup::new(7);
    let n = s.new_node();
    let mut nodes: Vec<Running> = s.dirs[..n]
        .iter()
        .map(|d| start_node(&Handle::current(), d))
        .collect();
    let client = s.client();
    let data = write_data(&client, 200, 128 * 1024, 40).await;
    let needed = s.needed(&data);
    let new = s.member(n);
    let log = s.dirs[n].join("node.log");

    // The new node runs as a process, at 2 MB/s, so it can be killed in the middle.
    let proc = NodeProcess::spawn(&s.dirs[n], Some(2_000_000), &log);
    wait_reachable(&client, &new).await;
    s.push_next().await;
    let start = Instant::now();
    let (done_before, units) = loop {
        let st = client.node_status(&new).await.expect("status");
        if let Some(t) = st.transfers.iter().find(|t| t.epoch == 1) {
            assert!(
                !t.complete,
                "the transfer finished before it could be interrupted: {}",
                describe(&st.transfers)
            );
            let done: Vec<RingArc> = t
                .units
                .iter()
                .filter(|u| u.phase == UnitPhase::Done)
                .map(|u| u.arc)
                .collect();
            // A unit done that fetched blocks (one holding only public-key blocks, or none, may be
            // done before anything is stored).
            let fetched_in_done = t
                .units
                .iter()
                .any(|u| u.phase == UnitPhase::Done && u.fetched_objects > 0);
            if fetched_in_done {
                assert!(t.units.len() > done.len(), "{}", describe(&st.transfers));
                break (done, t.units.len());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no unit done within 60 s: {}",
            describe(&st.transfers)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    drop(proc); // SIGKILL
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    for line in text.lines().filter(|l| l.contains("transfer")) {
        eprintln!("log: {line}");
    }

    // What the killed node left on disk: the units it announced are persisted, and part of its
    // share of the content.
    let (held, persisted) = {
        let store = open_store(&s.dirs[n]);
        let held: BTreeSet<ObjectId> = needed
            .iter()
            .filter(|id| store.get_content(id).unwrap().is_some())
            .copied()
            .collect();
        let persisted = store
            .load_transfer_done()
            .unwrap()
            .remove(&1)
            .unwrap_or_default();
        (held, persisted)
    };
    for arc in &done_before {
        assert!(
            persisted.contains(arc),
            "a unit reported done was not persisted: {arc:?} not in {persisted:?}"
        );
    }
    assert!(
        !held.is_empty() && held.len() < needed.len(),
        "killed mid-transfer: held {} of {} blocks",
        held.len(),
        needed.len()
    );
    eprintln!(
        "killed after {:?}: {} of {units} units persisted, {} of {} blocks held",
        start.elapsed(),
        persisted.len(),
        held.len(),
        needed.len()
    );

    // Restarted (without a rate limit), it finishes: the persisted units are skipped, and only the
    // blocks it did not hold are fetched.
    let _proc = NodeProcess::spawn(&s.dirs[n], None, &log);
    let statuses = wait_ready(&client, &s.next.config.members, Duration::from_secs(120)).await;
    let t = completed(&statuses[&new.id]);
    let resumed: BTreeSet<RingArc> = t
        .units
        .iter()
        .filter(|u| u.phase == UnitPhase::Resumed)
        .map(|u| u.arc)
        .collect();
    let persisted_set: BTreeSet<RingArc> = persisted.iter().copied().collect();
    assert_eq!(
        resumed,
        persisted_set,
        "{}",
        describe(&statuses[&new.id].transfers)
    );
    for u in t.units.iter().filter(|u| u.phase == UnitPhase::Resumed) {
        assert_eq!(
            (u.objects_total, u.fetched_objects),
            (0, 0),
            "a resumed unit is neither listed nor fetched again"
        );
    }
    let (fetched_objects, _) = fetched(t);
    assert_eq!(
        fetched_objects as usize,
        needed.len() - held.len(),
        "after the restart only the blocks not held are fetched: {}",
        describe(&statuses[&new.id].transfers)
    );

    read_all(&client, &data).await;
    drop(_proc);
    stop_all(nodes.drain(..)).await;
    s.check_holdings(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_that_hangs_mid_transfer_holds_up_nothing() {
    let s = Setup::new(4);
    let n = s.new_node();
    // The old node with the lowest id (which the new node asks first for every block it listed)
    // runs as a process, so that it can be frozen (SIGSTOP): it then accepts nothing and answers
    // nothing, like a silent Byzantine node.
    let k = (0..n).min_by_key(|i| s.ids[*i]).unwrap();
    let (frozen, nodes, client) = start_old_nodes(&s, k).await;
    let data = write_data(&client, 96, 256 * 1024, 20).await;
    let needed = s.needed(&data);
    let new = s.member(n);

    // The new node fetches at 4 MB/s (about 5 s in all); once it has fetched something, that node
    // freezes for good.
    let _proc = NodeProcess::spawn(&s.dirs[n], Some(4_000_000), &s.dirs[n].join("node.log"));
    wait_reachable(&client, &new).await;
    s.push_next().await;
    let start = Instant::now();
    loop {
        let st = client.node_status(&new).await.expect("status");
        let t = st.transfers.iter().find(|t| t.epoch == 1);
        assert!(
            !t.is_some_and(|t| t.complete),
            "the transfer finished before a source froze: {}",
            describe(&st.transfers)
        );
        if t.is_some_and(|t| fetched(t).0 > 0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nothing fetched within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    frozen.freeze();
    let froze = Instant::now();

    let statuses = wait_ready(
        &client,
        std::slice::from_ref(&new),
        Duration::from_secs(120),
    )
    .await;
    let after = froze.elapsed();
    let t = completed(&statuses[&new.id]);
    eprintln!(
        "a source froze {:?} into the transfer; it completed {after:?} later, {} blocks fetched",
        froze - start,
        fetched(t).0
    );
    assert_eq!(fetched(t).0 as usize, needed.len());
    // Each request to the frozen source waits 10 s for its timeout: requests left queued for it, 8
    // at a time, would take minutes; dropped once it fails, they are asked elsewhere.
    assert!(
        after < Duration::from_secs(30),
        "the transfer took {after:?} after a source froze"
    );
    read_all(&client, &data).await;
    drop(frozen); // SIGKILL
    stop_all(nodes.into_iter()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_the_new_node_must_answer_fetches_its_object_on_demand() {
    let s = Setup::new(4);
    let n = s.new_node();
    // The old node with the highest id runs as a process, so that it can be frozen (SIGSTOP).
    let k = (0..n).max_by_key(|i| s.ids[*i]).unwrap();
    let (frozen, nodes, client) = start_old_nodes(&s, k).await;
    let data = write_data(&client, 96, 64 * 1024, 60).await;
    let new = s.member(n);

    // The new node fetches at 20 kB/s: its ranges (about 5 MB) would take minutes.
    let _proc = NodeProcess::spawn(&s.dirs[n], Some(20_000), &s.dirs[n].join("node.log"));
    wait_reachable(&client, &new).await;
    s.push_next().await;

    // A public-key block of a range the new node is still fetching, whose group in epoch 1 holds
    // the new node and the node about to freeze: a read (2f+1 = 3 answers of 4) needs the new node.
    let config = &s.next.config;
    let start = Instant::now();
    let (x, arc) = loop {
        let st = client.node_status(&new).await.expect("status");
        let pending: Vec<RingArc> = st
            .transfers
            .iter()
            .filter(|t| t.epoch == 1)
            .flat_map(|t| t.units.iter())
            .filter(|u| u.phase == UnitPhase::Fetching)
            .map(|u| u.arc)
            .collect();
        let found = data.pk.keys().find_map(|x| {
            let group: Vec<NodeId> = config.group(x).iter().map(|m| m.id).collect();
            let arc = pending.iter().find(|a| a.contains(x))?;
            (group.contains(&new.id) && group.contains(&s.ids[k])).then_some((*x, *arc))
        });
        if let Some(found) = found {
            break found;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no public-key block in a range being fetched: {}",
            describe(&st.transfers)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    frozen.freeze();

    let asked = Instant::now();
    let log_tail = || {
        let log = std::fs::read_to_string(s.dirs[n].join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    let got = match tokio::time::timeout(Duration::from_secs(30), client.get_pk(x)).await {
        Ok(Ok(Some(got))) => got,
        other => panic!(
            "the read needing the new node failed: {other:?}; the new node's log ends:\n{}",
            log_tail()
        ),
    };
    let took = asked.elapsed();
    let (version, value) = &data.pk[&x];
    assert_eq!((got.version, &got.value), (*version, value));

    // The range itself is still being fetched: the object came on demand.
    let st = client.node_status(&new).await.expect("status");
    let unit = st
        .transfers
        .iter()
        .filter(|t| t.epoch == 1)
        .flat_map(|t| t.units.iter())
        .find(|u| u.arc == arc)
        .expect("the unit is still reported");
    eprintln!(
        "a read needing the new node took {took:?}; its range is {:?}, {} of {} objects",
        unit.phase, unit.objects_done, unit.objects_total
    );
    assert_eq!(
        unit.phase,
        UnitPhase::Fetching,
        "the range was transferred before the read: on-demand fetch is untested"
    );
    drop(frozen); // SIGKILL
    stop_all(nodes.into_iter()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_yields_to_client_writes_and_runs_at_full_speed_without_them() {
    let s = Setup::new(4);
    let n = s.new_node();
    let nodes: Vec<Running> = s.dirs[..n]
        .iter()
        .map(|d| start_node(&Handle::current(), d))
        .collect();
    let client = s.client();
    let data = write_data(&client, 24, 256 * 1024, 0).await;
    let share: u64 = s
        .needed(&data)
        .iter()
        .map(|id| data.content[id].len() as u64)
        .sum();
    let new = s.member(n);

    // While clients write, the new node fetches at most 200 kB/s: its share (about 5 MB) would
    // take about half a minute.
    const UNDER_LOAD: u64 = 200_000;
    let _proc = NodeProcess::spawn_with(
        &s.dirs[n],
        &["--transfer-rate-under-load", &UNDER_LOAD.to_string()],
        &s.dirs[n].join("node.log"),
    );
    wait_reachable(&client, &new).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .put_content(payload(4096, &format!("load {i}")))
                    .await
                    .expect("a write during the transfer");
                i += 1;
            }
            i
        })
    };
    s.push_next().await;

    // Under the load: capped, and reported so. Measured from a first look 1 s in: when the new
    // epoch starts, clients refresh their configuration and may send nothing for a moment, and
    // a transfer that saw no client request for a second runs uncapped, as designed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = client.node_status(&new).await.expect("status");
    let before = before
        .transfers
        .iter()
        .find(|t| t.epoch == 1)
        .map_or(0, |t| fetched(t).1);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let st = client.node_status(&new).await.expect("status");
    let t = st
        .transfers
        .iter()
        .find(|t| t.epoch == 1)
        .unwrap_or_else(|| panic!("no transfer into epoch 1: {}", describe(&st.transfers)));
    let bytes = fetched(t).1 - before;
    eprintln!(
        "under load: {bytes} of {share} bytes fetched in {:?} ({before} before), cap {:?}, yielding {}",
        start.elapsed(),
        t.rate_cap,
        t.yielding
    );
    assert!(
        !t.complete,
        "the transfer did not yield: {}",
        describe(&st.transfers)
    );
    assert_eq!((t.rate_cap, t.yielding), (Some(UNDER_LOAD), true));
    // The bucket's burst is one reply: allow one largest block beyond the cap.
    let allowed = UNDER_LOAD * start.elapsed().as_secs() + dbqsfs_core::object::MAX_BLOCK as u64;
    assert!(
        bytes <= allowed,
        "{bytes} bytes fetched under load, {allowed} allowed"
    );
    for line in dbqsfs_daemon::transfer::status_lines(&st.transfers) {
        eprintln!("  {line}");
    }

    // Without clients: full speed, so the rest comes within a few seconds.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = load.await.unwrap();
    let stopped = Instant::now();
    let done = wait_ready(&client, std::slice::from_ref(&new), Duration::from_secs(20)).await;
    let t = completed(&done[&new.id]);
    eprintln!(
        "{writes} client writes; the transfer completed {:?} after they stopped ({} bytes fetched in all)",
        stopped.elapsed(),
        fetched(t).1
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "the transfer stayed slow after the clients stopped"
    );
    read_all(&client, &data).await;
    stop_all(nodes.into_iter()).await;
}
