//! A cluster on separate hosts: 7 nodes, each in a network namespace of its own, and a mount in
//! an 8th, wired by veth pairs to a bridge that lives in a 9th namespace (every address is private
//! to the namespaces this test creates and deletes). The nodes and the mount are the `dbqsfs`
//! binary, entered into their namespace's network with nsenter(1), so the FUSE mount itself shows
//! in this test's mount namespace and is read and written from here.
//!
//! What it does, with acknowledged writes (fsync returned) recorded throughout: a source tree copied
//! in; one node's namespace cut off at the bridge (its link down) while writes go on, then healed;
//! one node killed and evicted by the Membership Service; a new node (its own namespace, key made
//! and admitted as docs/DEPLOY.md says) joining; finally an unmount, a fresh mount and `diff -r`
//! against the local copy of everything acknowledged: 0 differences.
//!
//! Needs root (network namespaces, FUSE); elsewhere it says why and passes without running.

mod common;

use common::{is_mounted, BIN};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SUBNET: &str = "10.213.0";
const PORT: u16 = 7100;
/// Hosts 1..=7 run the genesis nodes, host 8 the mount, host 9 the node that joins later.
const NODES: usize = 7;
const CLIENT: usize = 8;
const JOINER: usize = 9;

fn show(o: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run a command");
    assert!(o.status.success(), "{cmd:?}: {}", show(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

fn addr(host: usize) -> String {
    format!("{SUBNET}.{host}:{PORT}")
}

/// The namespaces, processes and mounts of one run; everything is undone when dropped, also
/// after a failed assertion (then the run's directory is kept and its path printed).
struct Hosts {
    prefix: String,
    hosts: Vec<usize>,
    nodes: Vec<(usize, Child)>,
    mounts: Vec<PathBuf>,
    root: Option<tempfile::TempDir>,
    /// The writer's stop flag, raised before anything is torn down (a failed step panics while
    /// the writer still runs).
    writer_stop: Option<Arc<AtomicBool>>,
}

impl Hosts {
    /// `None` (with the reason printed) where network namespaces or FUSE are not available.
    fn new() -> Option<Hosts> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
            eprintln!("skipped: this test needs root and /dev/fuse (network namespaces, a mount)");
            return None;
        }
        let prefix = format!("dbqsfs-{}", std::process::id());
        let probe = format!("{prefix}-probe");
        let made = Command::new("ip").args(["netns", "add", &probe]).output();
        match made {
            Ok(o) if o.status.success() => {
                let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            }
            other => {
                eprintln!("skipped: `ip netns add` is not allowed here ({other:?})");
                return None;
            }
        }
        Some(Hosts {
            prefix,
            hosts: Vec::new(),
            nodes: Vec::new(),
            mounts: Vec::new(),
            root: Some(tempfile::tempdir().expect("tempdir")),
            writer_stop: None,
        })
    }

    fn root(&self) -> &Path {
        self.root.as_ref().expect("root").path()
    }

    fn ns(&self, host: usize) -> String {
        format!("{}-h{host}", self.prefix)
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// The bridge's namespace.
    fn make_switch(&mut self) {
        let sw = self.switch();
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
    }

    /// Namespace `host` with `eth0` at SUBNET.host/24, plugged into the bridge as port `p<host>`.
    fn make_host(&mut self, host: usize) {
        let ns = self.ns(host);
        let sw = self.switch();
        ip(&["netns", "add", &ns]);
        self.hosts.push(host);
        let port = format!("p{host}");
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        let cidr = format!("{SUBNET}.{host}/24");
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
    }

    /// Cuts host `host` off the bridge (`up == false`) or plugs it back.
    fn link(&self, host: usize, up: bool) {
        let port = format!("p{host}");
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.switch(), "link", "set", &port, state]);
    }

    /// `dbqsfs ARGS` with its network in host `host`'s namespace.
    fn dbqsfs_in(&self, host: usize, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns(host)))
            .arg(BIN)
            .args(args);
        c
    }

    fn start_node(&mut self, host: usize, dir: &Path, more: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))
            .expect("node log");
        // nsenter execs the node (no fork without --pid), so the child is the node itself.
        let child = self
            .dbqsfs_in(host, &["node", "--dir", dir.to_str().unwrap()])
            .args(more)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a node");
        self.nodes.push((host, child));
    }

    fn kill9(&mut self, host: usize) {
        let i = self
            .nodes
            .iter()
            .position(|(h, _)| *h == host)
            .expect("a node");
        let (_, mut child) = self.nodes.remove(i);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A background mount of the cluster in the client's namespace.
    fn mount(&mut self, toml: &Path, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        self.mounts.push(dir.to_path_buf());
        run(&mut self.dbqsfs_in(
            CLIENT,
            &[
                "mount",
                "--cluster",
                toml.to_str().unwrap(),
                "-o",
                "commit=500",
                dir.to_str().unwrap(),
            ],
        ));
        assert!(is_mounted(dir), "{} is not mounted", dir.display());
    }

    fn umount(&mut self, dir: &Path) {
        run(Command::new(BIN).args(["umount", dir.to_str().unwrap()]));
        assert!(!is_mounted(dir));
        self.mounts.retain(|m| m != dir);
    }

    /// `dbqsfs status --json` as seen from the client's host.
    fn status(&self, toml: &Path) -> serde_json::Value {
        let o = self
            .dbqsfs_in(
                CLIENT,
                &["status", "--json", "--cluster", toml.to_str().unwrap()],
            )
            .output()
            .expect("status");
        serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Waits (at most `within`) until `want` holds of the status; returns the status.
    fn wait_status(
        &self,
        toml: &Path,
        what: &str,
        within: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let s = self.status(toml);
            if want(&s) {
                println!(
                    "{what}: after {:.1} s (epoch {})",
                    start.elapsed().as_secs_f64(),
                    s["epoch"]
                );
                return s;
            }
            assert!(
                start.elapsed() < within,
                "{what}: not within {within:?}; last status: {s:#}; logs under {}",
                self.root().display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if let Some(stop) = self.writer_stop.take() {
            // The writer sleeps 50 ms between files: let it see the flag before the unmount.
            stop.store(true, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(300));
        }
        for dir in self.mounts.drain(..).rev() {
            if is_mounted(&dir) {
                let _ = Command::new(BIN)
                    .args(["umount", dir.to_str().unwrap()])
                    .output();
            }
            if is_mounted(&dir) {
                let _ = Command::new("fusermount3").arg("-uz").arg(&dir).output();
            }
        }
        for (_, mut child) in self.nodes.drain(..) {
            // SAFETY: kill(2) of a node this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let mut names: Vec<String> = self.hosts.iter().map(|h| self.ns(*h)).collect();
        names.push(self.switch());
        for ns in names {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        if std::thread::panicking() {
            if let Some(root) = self.root.take() {
                eprintln!(
                    "kept the run's directory (node logs): {}",
                    root.keep().display()
                );
            }
        }
    }
}

fn is_member(status: &serde_json::Value, a: &str) -> bool {
    status["members"]
        .as_array()
        .is_some_and(|ms| ms.iter().any(|m| m["addr"] == a))
}

fn reachable(status: &serde_json::Value, a: &str) -> bool {
    status["members"].as_array().is_some_and(|ms| {
        ms.iter()
            .any(|m| m["addr"] == a && m["node"]["reachable"] == true && m["node"]["ready"] == true)
    })
}

/// Writes `dbqsfs-acked/<n>` files into the mount until stopped, each fsynced; a file whose fsync
/// returned is acknowledged and copied into `mirror`. Returns (acknowledged, failed).
fn writer(mnt: PathBuf, mirror: PathBuf, stop: Arc<AtomicBool>) -> (usize, usize) {
    let dir = mnt.join("acked");
    let copy = mirror.join("acked");
    std::fs::create_dir_all(&dir).expect("mkdir in the mount");
    std::fs::create_dir_all(&copy).unwrap();
    let (mut acked, mut failed) = (0, 0);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let name = format!("{n:05}");
        let len = 1000 + (n * 7919 % 200_000) as usize;
        let data: Vec<u8> = (0..len).map(|i| (i as u64 * 31 + n) as u8).collect();
        let r = std::fs::File::create(dir.join(&name)).and_then(|mut f| {
            f.write_all(&data)?;
            f.sync_all()
        });
        match r {
            Ok(()) => {
                std::fs::write(copy.join(&name), &data).unwrap();
                acked += 1;
            }
            Err(e) => {
                if !is_mounted(&mnt) {
                    eprintln!("write {name}: {e}: the mount is gone; the writer stops");
                    break;
                }
                eprintln!("write {name}: {e} (not acknowledged)");
                failed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (acked, failed)
}

#[test]
fn seven_hosts_partition_evict_join_and_lose_nothing() {
    let Some(mut net) = Hosts::new() else { return };
    let root = net.root().to_path_buf();
    net.make_switch();
    for host in 1..=NODES {
        net.make_host(host);
    }
    net.make_host(CLIENT);
    net.make_host(JOINER);

    // The cluster as an operator makes it for seven hosts (docs/DEPLOY.md): one --node per host,
    // groups of 4 (f = 1) so that membership changes move data between nodes.
    let cdir = root.join("cluster");
    let mut init: Vec<String> = [
        "cluster",
        "init",
        "--dir",
        cdir.to_str().unwrap(),
        "--f",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for host in 1..=NODES {
        init.extend(["--node".into(), addr(host)]);
    }
    init.extend(
        [
            "--epoch-ms",
            "3000",
            "--probe-ms",
            "1000",
            "--evict-after",
            "8",
        ]
        .map(String::from),
    );
    run(Command::new(BIN).args(&init));
    let toml = cdir.join("cluster.toml");
    for host in 1..=NODES {
        let dir = cdir.join(format!("node-{}", host - 1));
        net.start_node(host, &dir, &[]);
    }
    net.wait_status(&toml, "all 7 nodes ready", Duration::from_secs(60), |s| {
        (1..=NODES).all(|h| reachable(s, &addr(h)))
    });

    // A source tree, copied in with cp -a and made durable by the unmount.
    let mirror = root.join("mirror");
    let mnt = root.join("mnt");
    let tree = mirror.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    for sub in ["core/src", "daemon/src", "fs/src"] {
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(sub);
        let to = tree.join(sub.replace('/', "-"));
        run(Command::new("cp").arg("-a").arg(&from).arg(&to));
    }
    net.mount(&toml, &mnt);
    run(Command::new("cp")
        .arg("-a")
        .arg(&tree)
        .arg(mnt.join("tree")));

    // Writes go on through everything below.
    let stop = Arc::new(AtomicBool::new(false));
    net.writer_stop = Some(stop.clone());
    let w = {
        let (mnt, mirror, stop) = (mnt.clone(), mirror.clone(), stop.clone());
        std::thread::spawn(move || writer(mnt, mirror, stop))
    };

    // Host 3 cut off for 4 s (less than the 8 missed probes that would evict it), then back.
    std::thread::sleep(Duration::from_secs(2));
    let cut = Instant::now();
    net.link(3, false);
    net.wait_status(
        &toml,
        "host 3 partitioned away",
        Duration::from_secs(10),
        |s| is_member(s, &addr(3)) && !reachable(s, &addr(3)),
    );
    std::thread::sleep(Duration::from_secs(4).saturating_sub(cut.elapsed()));
    net.link(3, true);
    let s = net.wait_status(
        &toml,
        "host 3 answers again",
        Duration::from_secs(60),
        |s| reachable(s, &addr(3)),
    );
    assert!(is_member(&s, &addr(3)), "host 3 was evicted: {s:#}");

    // Host 5's node dies and is evicted.
    net.kill9(5);
    println!("node on host 5 killed");
    net.wait_status(&toml, "host 5 evicted", Duration::from_secs(120), |s| {
        !is_member(s, &addr(5))
    });

    // A new node on host 9: key made, admitted with the cluster's admission key, joins via host 1.
    let jdir = root.join("joiner");
    let pubkey = run(Command::new(BIN).args(["keygen", "--dir", jdir.to_str().unwrap()]));
    let admission = cdir.join("admission.key");
    let cert = run(Command::new(BIN).args([
        "admit",
        "--admission-key",
        admission.to_str().unwrap(),
        pubkey.trim(),
    ]));
    net.start_node(
        JOINER,
        &jdir,
        &[
            "--join",
            &addr(1),
            "--cert",
            cert.trim(),
            "--listen",
            &addr(JOINER),
        ],
    );
    let status = net.wait_status(
        &toml,
        "host 9 joined and ready",
        Duration::from_secs(120),
        |s| is_member(s, &addr(JOINER)) && reachable(s, &addr(JOINER)),
    );
    assert!(
        !is_member(&status, &addr(5)),
        "the dead node came back: {status:#}"
    );

    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = w.join().expect("the writer");
    println!("{acked} files acknowledged, {failed} writes failed");
    assert!(acked > 20, "only {acked} writes acknowledged");

    // Everything again from the cluster alone: a fresh mount, compared with the local copy.
    net.umount(&mnt);
    net.mount(&toml, &mnt);
    let diff = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(&mirror)
        .arg(&mnt)
        .output()
        .expect("diff");
    assert!(
        diff.status.success(),
        "diff -r of the mount against what it acknowledged:\n{}",
        show(&diff)
    );
    println!("diff -r: 0 differences");
    net.umount(&mnt);
}
