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
    let node = Node::load(dir).expect("load node");
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
