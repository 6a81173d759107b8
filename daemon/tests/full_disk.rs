//! A full node is one faulty node, not an outage: two of four nodes keep their data on tiny
//! filesystems (tmpfs mounts of 32 MiB that the test creates) and fill up through a live mount.
//! Writes then fail cleanly with ENOSPC; epochs go on, every node stays ready in them (the full
//! nodes' transfers go on without what does not fit, and nobody's transfer waits on them); the
//! volume stays readable through the mount and through a fresh read-only mount, and `rm` and
//! `mkdir` work; `status` says FULL. Once `rm` frees space (the mount's collector releases the
//! files' blocks, the nodes delete them after their grace), writes go on; once the filesystems
//! are grown, the deferred blocks are stored by themselves.
//!
//! Needs root (tmpfs mounts) and FUSE; without them it says so and passes. Unmounts everything it
//! mounted in every path (its guard's drop).

mod common;

use common::{is_mounted, Cluster, BIN};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FULL_NODES: [usize; 2] = [0, 1];

fn usable() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    if !(root && fuse) {
        eprintln!("needs root (tmpfs mounts) and /dev/fuse: skipping the full-disk test");
    }
    root && fuse
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.stdin(Stdio::null()).output().expect("run a command")
}

/// The cluster, its tmpfs mounts and the volume's mounts; drop undoes all of it.
struct Env {
    cluster: Cluster,
    tmpfs: Vec<PathBuf>,
    mounts: Vec<PathBuf>,
}

impl Env {
    fn cluster_toml(&self) -> PathBuf {
        self.cluster.dir.join("cluster.toml")
    }

    fn mount(&mut self, dir: &Path, ro: bool) {
        let toml = self.cluster_toml();
        let mut cmd = Command::new(BIN);
        cmd.arg("mount").arg("--cluster").arg(&toml);
        cmd.args(["--volume", "v"]);
        if ro {
            cmd.args(["-o", "ro"]);
        }
        cmd.arg(dir);
        self.mounts.push(dir.to_path_buf());
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "mount {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn umount(&mut self, dir: &Path) {
        let out = run(Command::new(BIN).arg("umount").arg(dir));
        assert!(
            out.status.success(),
            "umount {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounts.retain(|m| m != dir);
    }

    fn status(&self) -> String {
        let out = run(Command::new(BIN)
            .arg("status")
            .arg("--cluster")
            .arg(self.cluster_toml()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            if is_mounted(&m) {
                let _ = run(Command::new(BIN).arg("umount").arg(&m));
            }
            if is_mounted(&m) {
                let _ = run(Command::new("fusermount3").arg("-uz").arg(&m));
            }
        }
        self.cluster.stop_all();
        for t in self.tmpfs.drain(..) {
            if is_mounted(&t) {
                let _ = run(Command::new("umount").arg(&t));
            }
            if is_mounted(&t) {
                let _ = run(Command::new("umount").arg("-l").arg(&t));
            }
        }
    }
}

/// Moves node directory `dir` (as `cluster init` wrote it) onto a fresh tmpfs of `size`.
fn onto_tmpfs(dir: &Path, size: &str, env: &mut Env) {
    let aside = dir.with_extension("init");
    std::fs::rename(dir, &aside).unwrap();
    std::fs::create_dir(dir).unwrap();
    let out = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir));
    assert!(
        out.status.success(),
        "mount tmpfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.tmpfs.push(dir.to_path_buf());
    let out = run(Command::new("cp").arg("-a").arg(aside.join(".")).arg(dir));
    assert!(out.status.success(), "copy the node directory");
}

/// Reads files `d/f{k}` below `dir` back and compares them with what was written.
fn read_back(dir: &Path, files: impl IntoIterator<Item = usize>, when: &str) {
    for k in files {
        let got = std::fs::read(dir.join(format!("d/f{k}"))).unwrap();
        assert!(got == file_bytes(k), "file f{k} reads back wrong {when}");
    }
}

/// Waits for `n` more epochs, then for every member to be ready in the newest.
async fn epochs_pass(env: &Env, client: &dbqsfs_daemon::client::DbqsClient, n: u64) {
    let e = client.refresh().await.epoch();
    env.cluster
        .wait_epoch(client, e + n, Duration::from_secs(60))
        .await;
    env.cluster
        .wait_ready(client, Duration::from_secs(60))
        .await;
}

fn file_bytes(k: usize) -> Vec<u8> {
    let mut state = (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_full_nodes_leave_the_volume_readable_and_writes_resume_when_space_is_freed() {
    if !usable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::init(tmp.path(), 4, &["--epoch-ms", "3000", "--probe-ms", "1000"]);
    let mut env = Env {
        cluster,
        tmpfs: Vec::new(),
        mounts: Vec::new(),
    };
    for i in FULL_NODES {
        let dir = env.cluster.node_dir(i).to_path_buf();
        onto_tmpfs(&dir, "32M", &mut env);
    }
    for i in 0..4 {
        if FULL_NODES.contains(&i) {
            env.cluster
                .start_with(i, &["--reserve", "4", "--release-grace", "1"]);
        } else {
            env.cluster.start_with(i, &["--release-grace", "1"]);
        }
    }
    let client = env.cluster.client();
    env.cluster
        .wait_all_at_least(&client, 0, Duration::from_secs(30))
        .await;

    // Fill the small filesystems through the mount, 1 MiB per file, until ENOSPC.
    let mnt = tmp.path().join("mnt");
    env.mount(&mnt, false);
    std::fs::create_dir(mnt.join("d")).unwrap();
    let mut written = 0;
    let mut refused = None;
    for k in 0..64 {
        // fsync, so that a refusal is reported here (close errors are dropped by Rust's File).
        let write = |path: PathBuf| {
            use std::io::Write;
            let mut f = std::fs::File::create(path)?;
            f.write_all(&file_bytes(k))?;
            f.sync_all()
        };
        match write(mnt.join(format!("d/f{k}"))) {
            Ok(()) => written += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("64 MiB never filled two 32 MiB filesystems");
    assert_eq!(
        refused.raw_os_error(),
        Some(libc::ENOSPC),
        "a write to full nodes fails with ENOSPC, not {refused}"
    );
    assert!(written >= 8, "only {written} files fitted before ENOSPC");
    println!("{written} files of 1 MiB written, then {refused}");
    // The file whose write failed may exist, partly written: it is not one of the checked ones.
    let _ = std::fs::remove_file(mnt.join(format!("d/f{written}")));
    let status = env.status();
    assert!(
        status.contains("FULL"),
        "status does not say FULL:\n{status}"
    );

    // Epochs go on, and every node becomes ready in them (nobody's transfer waits on the full).
    epochs_pass(&env, &client, 2).await;

    // The volume stays readable and its namespace writable.
    read_back(&mnt, 0..written, "through the mount");
    std::fs::remove_file(mnt.join("d/f0")).expect("rm on a volume with two full nodes");
    std::fs::create_dir(mnt.join("e")).expect("mkdir on a volume with two full nodes");
    env.umount(&mnt);
    let ro = tmp.path().join("ro");
    env.mount(&ro, true);
    let names = std::fs::read_dir(ro.join("d")).unwrap().count();
    assert_eq!(names, written - 1, "the fresh mount lists the files left");
    read_back(&ro, 1..written, "on a fresh mount");
    env.umount(&ro);

    // rm frees space: the writer releases the removed files' blocks, the nodes delete them a
    // second later, and a write that failed with ENOSPC goes through (retried while the
    // collector and the grace run).
    env.mount(&mnt, false);
    // Full again first (what `rm d/f0` freed is taken up), so the write below needs the rm.
    let mut refill = 300;
    loop {
        let write = |k: usize| {
            use std::io::Write;
            let mut f = std::fs::File::create(mnt.join(format!("d/f{k}")))?;
            f.write_all(&file_bytes(k))?;
            f.sync_all()
        };
        match write(refill) {
            Ok(()) if refill < 320 => refill += 1,
            Ok(()) => panic!("20 more files fitted on full nodes"),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                let _ = std::fs::remove_file(mnt.join(format!("d/f{refill}")));
                break;
            }
        }
    }
    // New data first, buffered (the nodes refuse it), then the removals: a commit of the two
    // together must let the removals through, and the collector free their space, so that the
    // same buffered data is stored by a later fsync.
    let mut pending = std::fs::File::create(mnt.join("d/f200")).unwrap();
    {
        use std::io::Write;
        pending.write_all(&file_bytes(200)).unwrap();
    }
    let half = written / 2;
    for k in 1..=half {
        std::fs::remove_file(mnt.join(format!("d/f{k}"))).expect("rm of a full volume's file");
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let again = loop {
        match pending.sync_all() {
            Ok(()) => break Instant::now(),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!(
                "a write after rm of {half} MiB still fails: {e}\n{}",
                env.status()
            ),
        }
    };
    drop(pending);
    println!(
        "after rm of {half} files, a write succeeded within {:?}",
        again.saturating_duration_since(deadline - Duration::from_secs(90))
    );
    read_back(
        &mnt,
        (half + 1..written).chain(300..refill),
        "after rm freed space",
    );
    env.umount(&mnt);

    // Space is freed: the deferred blocks are stored by themselves, and writes go on.
    for t in env.tmpfs.clone() {
        let out = run(Command::new("mount")
            .args(["-o", "remount,size=256M"])
            .arg(&t));
        assert!(out.status.success(), "grow the tmpfs");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let config = client.refresh().await.config().clone();
        let mut left = Vec::new();
        for m in &config.members {
            match client.node_status(m).await {
                Ok(s) if !s.space.full && s.space.deferred == 0 => {}
                Ok(s) => left.push(format!("{}: {:?}", m.id.short(), s.space)),
                Err(e) => left.push(format!("{}: {e}", m.id.short())),
            }
        }
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "60 s after space was freed: {left:?}\n{}",
            env.status()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    env.mount(&mnt, false);
    for k in 100..104 {
        std::fs::write(mnt.join(format!("d/f{k}")), file_bytes(k))
            .expect("write after space freed");
    }
    env.umount(&mnt);
    epochs_pass(&env, &client, 1).await;
    env.mount(&ro, true);
    read_back(
        &ro,
        (half + 1..written).chain(100..104).chain(200..201),
        "at the end",
    );
    env.umount(&ro);
}
