//! What the daemon's in-process tests share: a cluster directory made by `dbqsfs cluster init`,
//! and nodes run as tasks that stop on request.
#![allow(dead_code)] // each test binary uses its own part

use dbqsfs_daemon::node::Node;
use std::path::{Path, PathBuf};
use std::process::Command;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const BIN: &str = env!("CARGO_BIN_EXE_dbqsfs");

/// Whether `dir` is a mount point now (per /proc/self/mountinfo).
pub fn is_mounted(dir: &Path) -> bool {
    let want = dir.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// How many files lie under `dir` (recursively), and their bytes.
pub fn files_under(dir: &Path) -> (usize, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => files_under(&e.path()),
            Ok(m) => (1, m.len()),
            Err(_) => (0, 0),
        })
        .fold((0, 0), |(n, b), (n2, b2)| (n + n2, b + b2))
}

/// Gives the node of directory `node_dir` a one-second release grace (a node.toml setting), so
/// that a test sees released blocks go within seconds.
pub fn one_second_grace(node_dir: &Path) {
    let toml = node_dir.join("node.toml");
    let mut text = std::fs::read_to_string(&toml).expect("node.toml");
    text.push_str("\n[settings]\nrelease_grace_secs = 1\n");
    std::fs::write(&toml, text).expect("write node.toml");
}

/// Polls `measure` every `every` until it is at most `bound` or `max` has passed; returns the
/// last value and how long it took.
pub fn wait_at_most(
    bound: u64,
    max: std::time::Duration,
    every: std::time::Duration,
    mut measure: impl FnMut() -> u64,
) -> (u64, std::time::Duration) {
    let start = std::time::Instant::now();
    loop {
        let now = measure();
        if now <= bound || start.elapsed() > max {
            return (now, start.elapsed());
        }
        std::thread::sleep(every);
    }
}

/// `dbqsfs cluster init` of 4 nodes in `dir`, on random loopback ports; returns `cluster.toml`.
pub fn init_cluster(dir: &Path) -> PathBuf {
    let mut r = [0u8; 2];
    getrandom::fill(&mut r).expect("randomness");
    let base = 20000 + u32::from(u16::from_le_bytes(r)) % 39000;
    let out = Command::new(BIN)
        .args(["cluster", "init", "--nodes", "4", "--dir"])
        .arg(dir)
        .args(["--base-port", &base.to_string()])
        .output()
        .expect("run dbqsfs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("cluster.toml")
}

/// A node running as a task.
pub struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Runs the node of `dir` on `rt` until [`Running::stop`].
pub fn start_node(rt: &Handle, dir: &Path) -> Running {
    // A node stopped just before in this process may still hold its directory's lock, its store
    // and its socket for a few seconds: tasks it spawned (requests in flight, probes, installs
    // on the blocking pool) keep them until they end (longer while the other core runs the
    // simulators in CI). A node process releases them when it exits; here, wait until they
    // are free.
    let free_by = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let node = loop {
        match Node::load(dir) {
            Ok(node) => break node,
            Err(e) if std::time::Instant::now() < free_by => {
                eprintln!("node of {} not loadable yet ({e}): waiting", dir.display());
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => panic!("load node: {e}"),
        }
    };
    let addr = node.listen_addr();
    while std::net::UdpSocket::bind(addr).is_err() && std::time::Instant::now() < free_by {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (stop, rx) = oneshot::channel::<()>();
    let task = rt.spawn(async move {
        node.run(async {
            let _ = rx.await;
        })
        .await
        .expect("node runs");
    });
    Running { stop, task }
}

impl Running {
    /// Stops the node and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("node task");
    }

    /// Stops the node without waiting (for tests without an async context).
    pub fn stop_now(self) -> JoinHandle<()> {
        let _ = self.stop.send(());
        self.task
    }
}

/// Runs `dbqsfs ARGS` to success; returns its trimmed stdout.
pub fn run_cli(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run dbqsfs");
    assert!(
        out.status.success(),
        "dbqsfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A cluster of separate `dbqsfs node` processes, killed when dropped.
pub struct Cluster {
    pub dir: PathBuf,
    base: u32,
    n: usize,
    dirs: Vec<PathBuf>,
    children: Vec<Option<std::process::Child>>,
    extra: usize,
}

impl Cluster {
    /// `dbqsfs cluster init` of `n` nodes with `args` (e.g. timing) in `root/c`.
    pub fn init(root: &Path, n: usize, args: &[&str]) -> Cluster {
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).expect("randomness");
        let base = 20000 + u32::from(u16::from_le_bytes(r)) % 39000;
        let dir = root.join("c");
        let out = Command::new(BIN)
            .args(["cluster", "init", "--nodes", &n.to_string(), "--dir"])
            .arg(&dir)
            .args(["--base-port", &base.to_string()])
            .args(args)
            .output()
            .expect("run dbqsfs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dirs = (0..n).map(|i| dir.join(format!("node-{i}"))).collect();
        Cluster {
            dir,
            base,
            n,
            dirs,
            children: (0..n).map(|_| None).collect(),
            extra: 0,
        }
    }

    /// `init` of `n` nodes with `args`, every node started, and a client of the cluster once every
    /// member answers.
    pub async fn up(
        root: &Path,
        n: usize,
        args: &[&str],
    ) -> (Cluster, dbqsfs_daemon::client::DbqsClient) {
        let mut cluster = Cluster::init(root, n, args);
        for i in 0..n {
            cluster.start(i);
        }
        let client = cluster.client();
        cluster
            .wait_all_at_least(&client, 0, std::time::Duration::from_secs(30))
            .await;
        (cluster, client)
    }

    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    pub fn node_dir(&self, i: usize) -> &Path {
        &self.dirs[i]
    }

    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.base + i as u32)
    }

    /// Starts node `i` (logs to its directory's node.log).
    pub fn start(&mut self, i: usize) {
        self.start_with(i, &[]);
    }

    pub fn start_with(&mut self, i: usize, args: &[&str]) {
        let dir = self.dirs[i].clone();
        self.children[i] = Some(self.spawn(&dir, args));
    }

    fn spawn(&self, dir: &Path, args: &[&str]) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))
            .expect("node log");
        Command::new(BIN)
            .arg("node")
            .arg("--dir")
            .arg(dir)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn node")
    }

    /// A directory and address for one more node.
    pub fn new_node_dir(&mut self) -> (PathBuf, String) {
        let k = self.extra;
        self.extra += 1;
        let dir = self.dir.join(format!("extra-{k}"));
        (
            dir,
            format!("127.0.0.1:{}", self.base + (self.n + k) as u32),
        )
    }

    /// A directory and address for one more node, its key made (`dbqsfs keygen`) and admitted
    /// with the cluster's admission key (`dbqsfs admit`): (directory, address, public key,
    /// admission certificate).
    pub fn new_admitted_node(&mut self) -> (PathBuf, String, String, String) {
        let (dir, addr) = self.new_node_dir();
        let pubkey = run_cli(&["keygen", "--dir", dir.to_str().unwrap()]);
        let admission = self.dir.join("admission.key");
        let cert = run_cli(&[
            "admit",
            "--admission-key",
            admission.to_str().unwrap(),
            &pubkey,
        ]);
        (dir, addr, pubkey, cert)
    }

    /// Starts a node that joins through node 0 with certificate `cert`; returns its index.
    pub fn spawn_join(&mut self, dir: &Path, addr: &str, cert: &str) -> usize {
        self.spawn_join_with(dir, addr, cert, &[])
    }

    /// [`Cluster::spawn_join`] with more `dbqsfs node` arguments.
    pub fn spawn_join_with(&mut self, dir: &Path, addr: &str, cert: &str, more: &[&str]) -> usize {
        let via = self.addr(0);
        let mut args = vec!["--join", &via, "--cert", cert, "--listen", addr];
        args.extend_from_slice(more);
        let child = self.spawn(dir, &args);
        self.dirs.push(dir.to_path_buf());
        self.children.push(Some(child));
        self.dirs.len() - 1
    }

    pub fn node_id(&self, i: usize) -> dbqsfs_core::crypto::NodeId {
        dbqsfs_daemon::files::read_key(&self.dirs[i].join("node.key"))
            .expect("node key")
            .node_id()
    }

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(|c| c.id())
    }

    /// kill -9 node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, i: usize) {
        let dir = self.dirs[i].clone();
        self.children[i] = Some(self.spawn(&dir, &[]));
    }

    /// A client of the cluster (inside a tokio runtime).
    pub fn client(&self) -> dbqsfs_daemon::client::DbqsClient {
        let info = dbqsfs_daemon::files::ClusterInfo::load(&self.dir.join("cluster.toml"))
            .expect("cluster.toml");
        dbqsfs_daemon::client::DbqsClient::connect(
            info.genesis,
            info.client_key,
            dbqsfs_daemon::client::DbqsClientOptions::default(),
        )
        .expect("client")
    }

    /// Waits until the client learns epoch `e` or later; returns it.
    pub async fn wait_epoch(
        &self,
        client: &dbqsfs_daemon::client::DbqsClient,
        e: u64,
        timeout: std::time::Duration,
    ) -> u64 {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = client.refresh().await.epoch();
            if got >= e {
                return got;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "epoch {e} not reached in {timeout:?} (at {got}); logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Waits until every member of the newest configuration reports epoch `e` or later.
    pub async fn wait_all_at_least(
        &self,
        client: &dbqsfs_daemon::client::DbqsClient,
        e: u64,
        timeout: std::time::Duration,
    ) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let chain = client.refresh().await;
            let mut behind = Vec::new();
            for m in &chain.config().members {
                match client.ms_status(m).await {
                    Ok(s) if s.epoch >= e => {}
                    other => behind.push((m.id.short(), other.map(|s| s.epoch).ok())),
                }
            }
            if behind.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "members not at epoch {e} within {timeout:?}: {behind:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Waits until every member of the newest configuration is at that epoch and ready in it (its
    /// state transfer complete).
    pub async fn wait_ready(
        &self,
        client: &dbqsfs_daemon::client::DbqsClient,
        timeout: std::time::Duration,
    ) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let chain = client.refresh().await;
            let mut pending = Vec::new();
            for m in &chain.config().members {
                match client.node_status(m).await {
                    Ok(s) if s.epoch == chain.epoch() && s.ready => {}
                    other => pending.push((m.id.short(), other.map(|s| (s.epoch, s.ready)).ok())),
                }
            }
            if pending.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "members not ready in epoch {} within {timeout:?}: {pending:?}; logs in {}",
                chain.epoch(),
                self.dir.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }

    /// Has `f_ms+1` committee members of the client's newest epoch (whose keys the test holds)
    /// propose its end, as their epoch timers would; returns that epoch.
    pub async fn propose_end_of_epoch(&self, client: &dbqsfs_daemon::client::DbqsClient) -> u64 {
        use dbqsfs_core::ms::membership::MsOp;
        use dbqsfs_core::ms::pbft::Request;
        use dbqsfs_daemon::ms::MsMessage;
        let chain = client.refresh().await;
        let e = chain.epoch();
        let proposers = (0..self.len())
            .filter_map(|i| dbqsfs_daemon::files::read_key(&self.dirs[i].join("node.key")).ok())
            .filter(|k| chain.config().committee.contains(&k.node_id()))
            .take(chain.config().params.ms_quorum().one_correct());
        for k in proposers {
            // Above any sequence number the member itself used in this epoch (unix ms << 10).
            let seq = (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64)
                << 12;
            let op = MsOp::EndEpoch { epoch: e };
            let req = Request::sign(&k, seq, postcard::to_allocvec(&op).unwrap());
            let ep = dbqsfs_net::Endpoint::client(
                dbqsfs_net::local_bind_for("127.0.0.1:1".parse().unwrap()),
                k.dalek().clone(),
                dbqsfs_net::TransportOptions::default(),
            )
            .unwrap();
            let bytes = dbqsfs_core::wire::encode_msg(e, MsMessage::Submit(req));
            for m in &chain.config().members {
                let vk = ed25519_dalek::VerifyingKey::from_bytes(&m.key.0).unwrap();
                let _ = ep.request(m.addr.parse().unwrap(), &vk, &bytes).await;
            }
        }
        e
    }

    /// (epoch, configuration hash) of every member that answers.
    pub async fn config_hashes(
        &self,
        client: &dbqsfs_daemon::client::DbqsClient,
    ) -> Vec<(u64, [u8; 32])> {
        let chain = client.refresh().await;
        let mut out = Vec::new();
        for m in &chain.config().members {
            if let Ok(s) = client.ms_status(m).await {
                out.push((s.epoch, s.config));
            }
        }
        out
    }

    /// Stops every node (SIGTERM, then SIGKILL after 10 s).
    pub fn stop_all(&mut self) {
        for c in self.children.iter_mut() {
            if let Some(child) = c.as_mut() {
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGTERM);
                }
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for c in self.children.iter_mut() {
            if let Some(mut child) = c.take() {
                while std::time::Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            if let Some(mut child) = c.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            self.keep_logs();
        }
    }
}

impl Cluster {
    /// Copies every node's log out of the (temporary) cluster directory, which is about to be
    /// removed, so that a failed test can be read after the fact; prints where.
    fn keep_logs(&self) {
        let keep = std::env::temp_dir().join(format!(
            "dbqsfs-failed-{}-{}",
            std::process::id(),
            self.base
        ));
        if std::fs::create_dir_all(&keep).is_err() {
            return;
        }
        for dir in &self.dirs {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            let _ = std::fs::copy(dir.join("node.log"), keep.join(format!("{name}.log")));
        }
        eprintln!("node logs of the failed test kept in {}", keep.display());
    }
}

/// The Prometheus text at `http://addr/metrics` once it contains every one of `wanted` (polled
/// every 500 ms), or what it was when `within` ran out.
pub fn metrics_with(addr: &str, wanted: &[&str], within: std::time::Duration) -> String {
    use std::io::{Read, Write};
    // With curl(1) where it is installed (as .ci/run does), as an operator would scrape it.
    let curl = Command::new("curl").arg("--version").output().is_ok();
    let scrape = || {
        if curl {
            let o = Command::new("curl")
                .args(["-sf", "--max-time", "5", &format!("http://{addr}/metrics")])
                .output();
            return o
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
        }
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return String::new();
        };
        let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let start = std::time::Instant::now();
    loop {
        let text = scrape();
        if wanted.iter().all(|w| text.contains(w)) || start.elapsed() > within {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
