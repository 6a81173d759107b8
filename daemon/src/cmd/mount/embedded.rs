//! The embedded default cluster: created on first use under the data directory, started when no
//! mount of it runs, stopped when the last mount of it ends.

use super::registry::other_live_mounts;
use crate::cmd::cluster::{cluster_down, cluster_init, local_addrs, Timing};
use anyhow::{anyhow, bail, Context, Result};

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Nodes and faults of the embedded default cluster.
const EMBEDDED_NODES: u32 = 4;
const EMBEDDED_F: u32 = 1;

/// Picks a base port with `n` consecutive free UDP ports on 127.0.0.1.
fn free_base_port(n: u16) -> Result<u16> {
    for _ in 0..200 {
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).map_err(|e| anyhow!("OS randomness: {e}"))?;
        let base = 20000 + u16::from_le_bytes(r) % 40000;
        let free = (0..n).all(|i| std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return Ok(base);
        }
    }
    bail!("found no {n} consecutive free UDP ports on 127.0.0.1 between 20000 and 60000")
}

/// Creates the embedded cluster in `DATA/cluster` if it does not exist yet.
pub(super) fn ensure_embedded_cluster(data: &Path, base_port: Option<u16>) -> Result<PathBuf> {
    let cdir = data.join("cluster");
    if cdir.join("cluster.toml").exists() {
        return Ok(cdir);
    }
    if cdir.exists() {
        // cluster.toml is written last: without it no node ever ran, so nothing is lost.
        tracing::warn!(dir = %cdir.display(), "removing an incomplete cluster directory (an interrupted first mount)");
        std::fs::remove_dir_all(&cdir).with_context(|| format!("removing {}", cdir.display()))?;
    }
    let base = match base_port {
        Some(p) => p,
        None => free_base_port(EMBEDDED_NODES as u16)?,
    };
    cluster_init(
        &local_addrs(EMBEDDED_NODES, base)?,
        &cdir,
        Some(EMBEDDED_F),
        &Timing::default(),
    )
    .context("creating the embedded cluster")?;
    Ok(cdir)
}

/// Starts the nodes of the cluster in `cdir` that are not running (`dbqsfs cluster up`, as a
/// child process, so the nodes do not become children of the mount process).
pub(super) fn cluster_up_subprocess(cdir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("finding the dbqsfs executable")?;
    let out = std::process::Command::new(exe)
        .args(["cluster", "up", "--dir"])
        .arg(cdir)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running `dbqsfs cluster up`")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        tracing::info!("{line}");
    }
    if !out.status.success() {
        bail!(
            "starting the embedded cluster failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Stops the embedded cluster in `cdir` unless another mount of it is alive. Call with the
/// data directory's lock held.
pub(super) fn stop_cluster_if_unused(cdir: &Path, me: u32) {
    let others = other_live_mounts(cdir, me);
    if !others.is_empty() {
        tracing::info!(
            mounts = others.len(),
            "other mounts of the embedded cluster remain: leaving its nodes running"
        );
        return;
    }
    tracing::info!("last mount of the embedded cluster: stopping its nodes");
    if let Err(e) = cluster_down(cdir, Duration::from_secs(10)) {
        tracing::error!(error = %e, "stopping the embedded cluster");
    }
}
