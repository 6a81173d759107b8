//! A real 4-node cluster of separate `dbqsfs node` processes over loopback QUIC, driven through the
//! command line exactly as an operator would: `cluster init`, `cluster up`, `block put/get`,
//! `status`, `cluster down` (always, from a drop guard).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dbqsfs");

mod common;

use common::{files_under, one_second_grace, wait_at_most};

fn dbqsfs(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run the dbqsfs binary")
}

fn ok(args: &[&str]) -> String {
    let out = dbqsfs(args);
    assert!(
        out.status.success(),
        "dbqsfs {args:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running local cluster; stopped with `cluster down` when dropped, even on a failed assertion.
struct Cluster {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    toml: String,
}

impl Cluster {
    fn start(nodes: u32) -> Cluster {
        let c = Cluster::init(nodes);
        c.up();
        c
    }

    /// `cluster init` of `nodes` local nodes at a random base port, not started.
    fn init(nodes: u32) -> Cluster {
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).expect("randomness");
        let base = 20000 + u32::from(u16::from_le_bytes(r)) % 39000;
        Cluster::init_with(&[
            "--nodes",
            &nodes.to_string(),
            "--base-port",
            &base.to_string(),
        ])
    }

    /// A cluster made by `cluster init` with `how` (the nodes and their addresses), started.
    fn start_with(how: &[&str]) -> Cluster {
        let c = Cluster::init_with(how);
        c.up();
        c
    }

    /// A cluster made by `cluster init` with `how`, not started.
    fn init_with(how: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("cluster");
        let mut args = vec!["cluster", "init", "--dir", dir.to_str().unwrap()];
        args.extend_from_slice(how);
        ok(&args);
        Cluster {
            toml: dir.join("cluster.toml").to_string_lossy().into_owned(),
            dir,
            _tmp: tmp,
        }
    }

    fn up(&self) {
        ok(&["cluster", "up", "--dir", self.dir.to_str().unwrap()]);
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{i}"))
    }

    /// kill -9 of node `i`, by the pid `cluster up` recorded; waits until it is gone.
    fn kill9(&self, i: usize) {
        let pid: i32 = std::fs::read_to_string(self.node_dir(i).join("node.pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        // SAFETY: kill(2) on the pid of a node this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let start = Instant::now();
        while alive(pid) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(pid), "node {i} (pid {pid}) survived SIGKILL");
    }

    fn put(&self, file: &Path) -> String {
        ok(&[
            "block",
            "put",
            "--cluster",
            &self.toml,
            file.to_str().unwrap(),
        ])
        .trim()
        .to_string()
    }

    fn get(&self, id: &str, out: &Path) {
        ok(&[
            "block",
            "get",
            "--cluster",
            &self.toml,
            id,
            "-o",
            out.to_str().unwrap(),
        ]);
    }

    fn round_trip(&self, work: &Path, name: &str, data: &[u8]) -> String {
        let src = work.join(name);
        std::fs::write(&src, data).unwrap();
        let id = self.put(&src);
        let dst = work.join(format!("{name}.out"));
        self.get(&id, &dst);
        let back = std::fs::read(&dst).unwrap();
        assert!(
            back == data,
            "{name}: {} bytes back, {} put",
            back.len(),
            data.len()
        );
        id
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = dbqsfs(&[
            "cluster",
            "down",
            "--dir",
            self.dir.to_str().unwrap(),
            "--timeout",
            "10",
        ]);
    }
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn payload(len: usize, seed: &str) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

#[test]
fn files_round_trip_byte_identical_through_a_four_process_cluster_and_survive_kill_9() {
    let cluster = Cluster::start(4);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    let sizes = [
        ("0B", 0),
        ("1B", 1),
        ("4KiB", 4096),
        ("1MiB", 1 << 20),
        ("50MiB", 50 << 20),
    ];
    let mut stored = Vec::new();
    for (name, len) in sizes {
        let data = payload(len, name);
        let id = cluster.round_trip(w, name, &data);
        let expected_tag = if len <= 1 << 20 { "c:" } else { "m:" };
        assert!(id.starts_with(expected_tag), "{name}: id {id}");
        stored.push((id, data));
    }

    let status = ok(&["status", "--cluster", &cluster.toml]);
    assert_eq!(status.matches("  reachable  ").count(), 4, "{status}");

    // One node dies hard: writes and reads still complete, old data is still readable.
    cluster.kill9(1);
    let data = payload(3 << 20, "while node 1 is down");
    cluster.round_trip(w, "down1", &data);
    for (i, (id, data)) in stored.iter().enumerate() {
        let out = w.join(format!("again-{i}"));
        cluster.get(id, &out);
        assert!(std::fs::read(&out).unwrap() == *data, "{id} changed");
    }
    // Some members did not answer: exit code 3.
    let out = dbqsfs(&["status", "--cluster", &cluster.toml]);
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(3), "{status}");
    assert_eq!(status.matches("  unreachable  ").count(), 1, "{status}");

    // Restart it; with another node down, writes need its acknowledgement, so it serves again.
    cluster.up();
    cluster.kill9(2);
    let data = payload(2 << 20, "node 1 back, node 2 down");
    cluster.round_trip(w, "back1", &data);
    let small = payload(4096, "small while node 2 is down");
    cluster.round_trip(w, "back1-small", &small);
    cluster.up();
    let status = ok(&["status", "--cluster", &cluster.toml]);
    assert_eq!(status.matches("  reachable  ").count(), 4, "{status}");
}

#[test]
fn bad_arguments_exit_with_code_2_and_a_message() {
    for args in [
        vec!["block", "put"],
        vec![
            "block",
            "get",
            "--cluster",
            "x.toml",
            "not-an-id",
            "-o",
            "out",
        ],
        vec![
            "cluster",
            "init",
            "--nodes",
            "2",
            "--dir",
            "/nonexistent/x",
            "--f",
            "1",
        ],
        vec!["no-such-command"],
    ] {
        let out = dbqsfs(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} printed no message");
    }
}

#[test]
fn a_node_killed_in_the_middle_of_writes_holds_no_torn_or_corrupt_block_after_restart() {
    use dbqsfs_core::store::Store;
    let cluster = Cluster::start(4);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("big");
    let data = payload(48 << 20, "killed mid-write");
    std::fs::write(&src, &data).unwrap();
    let mut put = Command::new(BIN)
        .args([
            "block",
            "put",
            "--cluster",
            &cluster.toml,
            src.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start block put");
    // Kill node 0 once it has stored a few blocks, while the put is still running.
    let blocks = cluster.node_dir(0).join("data/blocks");
    let start = Instant::now();
    while files_under(&blocks).0 < 3 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        put.try_wait().unwrap().is_none(),
        "the put finished before the kill"
    );
    cluster.kill9(0);
    let out = put.wait_with_output().expect("block put finishes");
    assert!(
        out.status.success(),
        "put with a node killed mid-way failed"
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    cluster.up();
    let back = work.path().join("big.out");
    cluster.get(&id, &back);
    assert!(std::fs::read(&back).unwrap() == data);

    ok(&["cluster", "down", "--dir", cluster.dir.to_str().unwrap()]);
    for i in 0..4 {
        let store = dbqsfs_daemon::store::DiskStore::open(&cluster.node_dir(i).join("data"))
            .expect("reopen store");
        for oid in store.list().unwrap() {
            let ok =
                store.get_content(&oid).unwrap().is_some() || store.get_pk(&oid).unwrap().is_some();
            assert!(ok, "node {i} holds a torn or corrupt object {oid:?}");
        }
        let tmp = cluster.node_dir(i).join("data/blocks/tmp");
        assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
    }
}

/// The files under `dir` and their bytes, recursively (a node's block files are under
/// `data/blocks/`).
#[test]
fn a_removed_file_leaves_the_nodes_after_the_grace_and_the_other_files_stay() {
    let cluster = Cluster::init(4);
    for i in 0..4 {
        one_second_grace(&cluster.node_dir(i));
    }
    cluster.up();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let stored = || {
        (0..4)
            .map(|i| files_under(&cluster.node_dir(i).join("data/blocks")).1)
            .sum::<u64>()
    };
    let empty = stored();
    let big = payload(5 << 20, "big");
    let big_id = cluster.round_trip(w, "big", &big);
    let small = payload(3000, "small");
    let small_id = cluster.round_trip(w, "small", &small);
    let full = stored();
    assert!(
        full - empty >= 3 * (5 << 20),
        "at least 2f+1 copies: {full} bytes"
    );
    ok(&["block", "rm", "--cluster", &cluster.toml, &big_id]);
    // Every replica deletes it a second after it took the release (`block rm` waits for the
    // whole group to answer, not only a quorum); what is left is the small file's 4 copies.
    let bound = empty + 4 * small.len() as u64;
    let (left, took) = wait_at_most(
        bound,
        Duration::from_secs(30),
        Duration::from_millis(200),
        stored,
    );
    assert!(
        left <= bound,
        "{left} bytes on the nodes {took:?} after `block rm` of 5 MiB (from {full}; empty {empty})"
    );
    // The other file is whole; the removed one is gone.
    let out = w.join("small.again");
    cluster.get(&small_id, &out);
    assert_eq!(std::fs::read(&out).unwrap(), small);
    let gone = dbqsfs(&[
        "block",
        "get",
        "--cluster",
        &cluster.toml,
        &big_id,
        "-o",
        w.join("big.again").to_str().unwrap(),
    ]);
    assert!(!gone.status.success(), "a removed file cannot be read back");
    // Put again after the removal: held again, and readable.
    cluster.round_trip(w, "big", &big);
    eprintln!("stored {full} bytes; {left} bytes {took:?} after `block rm` (empty: {empty})");
}

#[test]
fn a_second_node_on_a_running_nodes_directory_is_refused_naming_the_running_one() {
    let cluster = Cluster::start(4);
    let ndir = cluster.dir.join("node-0");
    let pid = std::fs::read_to_string(ndir.join("node.pid")).unwrap();
    let out = dbqsfs(&["node", "--dir", ndir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "a node already runs in {} (pid {})",
            ndir.display(),
            pid.trim()
        )),
        "{err}"
    );
    assert_eq!(err.matches("already runs").count(), 1, "said once: {err}");
}

/// Nodes on four addresses of their own (127.0.0.1 to 127.0.0.4, one port), as on four hosts:
/// `cluster init --node IP:PORT` per node; blocks round-trip and every member answers `status`.
#[test]
fn nodes_at_addresses_of_their_own_form_a_cluster() {
    let mut r = [0u8; 2];
    getrandom::fill(&mut r).expect("randomness");
    let port = (20000 + u32::from(u16::from_le_bytes(r)) % 39000).to_string();
    let addrs: Vec<String> = (1..=4).map(|i| format!("127.0.0.{i}:{port}")).collect();
    let mut how = Vec::new();
    for a in &addrs {
        how.extend(["--node", a.as_str()]);
    }
    let cluster = Cluster::start_with(&how);
    let tmp = tempfile::tempdir().unwrap();
    let data = payload(3 << 20, "four addresses");
    cluster.round_trip(tmp.path(), "four", &data);
    let status = ok(&["status", "--cluster", &cluster.toml]);
    for a in &addrs {
        assert!(status.contains(&format!("{a}  reachable")), "{a}: {status}");
    }
    let dup = dbqsfs(&[
        "cluster",
        "init",
        "--dir",
        tmp.path().join("dup").to_str().unwrap(),
        "--node",
        &addrs[0],
        "--node",
        &addrs[0],
        "--node",
        &addrs[1],
        "--node",
        &addrs[2],
    ]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("given twice"));
}

#[test]
fn completions_and_man_pages_are_generated() {
    let bash = ok(&["completions", "bash"]);
    assert!(
        bash.contains("_dbqsfs()") && bash.contains("snapshot"),
        "{bash}"
    );
    let tmp = tempfile::tempdir().unwrap();
    ok(&["man", "--dir", tmp.path().to_str().unwrap()]);
    let page = std::fs::read_to_string(tmp.path().join("dbqsfs-mount.1")).unwrap();
    assert!(page.contains("keyfile"), "the mount page lacks its options");
    assert_eq!(dbqsfs(&["completions", "cmd.exe"]).status.code(), Some(2));
}

/// A node with `metrics = "IP:PORT"` in its node.toml's `[settings]` (the same as `dbqsfs node
/// --metrics IP:PORT`) serves Prometheus metrics: requests by peer and protocol, and the node's
/// sampled state. A setting that does not exist is refused, naming the file.
#[test]
fn a_node_serves_prometheus_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let mut r = [0u8; 2];
    getrandom::fill(&mut r).expect("randomness");
    let base = 20000 + u32::from(u16::from_le_bytes(r)) % 39000;
    ok(&[
        "cluster",
        "init",
        "--nodes",
        "4",
        "--dir",
        dir.to_str().unwrap(),
        "--base-port",
        &base.to_string(),
    ]);
    let metrics_addr = format!("127.0.0.1:{}", base + 10);
    let node0 = dir.join("node-0/node.toml");
    let toml0 = std::fs::read_to_string(&node0).unwrap();
    std::fs::write(&node0, format!("{toml0}\n[settings]\nmetrics_at = \"x\"\n")).unwrap();
    let o = dbqsfs(&["node", "--dir", dir.join("node-0").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("node.toml"),
        "{o:?}"
    );
    std::fs::write(&node0, format!("{toml0}\n[settings]\nlog = \"info,[x\"\n")).unwrap();
    let o = dbqsfs(&["node", "--dir", dir.join("node-0").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("node.toml") && err.contains("not a log filter"),
        "{o:?}"
    );
    std::fs::write(
        &node0,
        format!(
            "{toml0}\n[settings]\nmetrics = \"{metrics_addr}\"\nreserve_mib = 16\nlog = \"warn\"\n"
        ),
    )
    .unwrap();
    struct Nodes(Vec<std::process::Child>);
    impl Drop for Nodes {
        fn drop(&mut self) {
            for c in &mut self.0 {
                // SAFETY: kill(2) of a node this test started.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let _ = c.wait();
            }
        }
    }
    let nodes = Nodes(
        (0..4)
            .map(|i| {
                let mut cmd = Command::new(BIN);
                cmd.args(["node", "--dir"])
                    .arg(dir.join(format!("node-{i}")));
                cmd.stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    let file = tmp.path().join("f");
    let toml = dir.join("cluster.toml");
    // A put returns once a quorum (3 of 4) has stored the block and the command exits at once,
    // so node 0 may not see a given put at all: put distinct blocks until it has seen one.
    let mut text = String::new();
    for round in 0..8 {
        std::fs::write(&file, payload(100_000, &format!("metrics {round}"))).unwrap();
        // The nodes need a moment to listen; the client retries within its timeout.
        ok(&[
            "block",
            "put",
            "--cluster",
            toml.to_str().unwrap(),
            file.to_str().unwrap(),
        ]);
        text = common::metrics_with(
            &metrics_addr,
            &["dbqsfs_epoch", "protocol=\"dbqs\""],
            Duration::from_secs(3),
        );
        if text.contains("protocol=\"dbqs\"") {
            break;
        }
    }
    assert!(
        text.contains("dbqsfs_requests_total{peer=\"client\",protocol=\"dbqs\"}"),
        "{text}"
    );
    assert!(text.contains("dbqsfs_ready 1"), "{text}");
    assert!(
        text.contains("dbqsfs_request_seconds_bucket{protocol=\"dbqs\",le="),
        "{text}"
    );
    // Node 0 sits in the committee of 4 and runs its agreement; its MS sample is taken at once.
    assert!(text.contains("dbqsfs_ms_in_agreement 1"), "{text}");
    assert!(text.contains("dbqsfs_ms_probed_members"), "{text}");
    assert!(text.contains("dbqsfs_gc_arcs_lost"), "{text}");
    assert!(text.contains("dbqsfs_members 4"), "{text}");
    drop(nodes);
}
