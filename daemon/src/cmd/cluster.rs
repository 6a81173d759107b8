//! `dbqsfs cluster init|up|down`: a cluster's keys, genesis configuration and node directories
//! (nodes on loopback, or at the addresses given), and the node processes of this host.

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use dbqsfs_core::config::{CertifiedConfig, Configuration, Member, Params};
use dbqsfs_core::crypto::Domain;
use dbqsfs_daemon::files::{self, ClusterFile, NodeFile};

use super::common::open_log;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Create keys, admission certificates, a genesis configuration and node directories.
    #[command(
        long_about = "Create a local cluster description in DIR: one key and one admission \
        certificate (the admission key's signature over the node key) per node, a genesis \
        configuration of N nodes listening on 127.0.0.1:P, P+1, ... (or at the addresses given \
        with --node, one per node, for nodes on several hosts), with groups of 3f+1 and a \
        committee of the first 3f+1 members, a client key, DIR/cluster.toml for clients and \
        DIR/node-<i>/ for each node (copy it to the host that runs the node; see \
        docs/DEPLOY.md). Keys are made from OS randomness; secret key files are mode 0600."
    )]
    Init {
        /// Number of nodes on this host's loopback (at least 3f+1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000),
              required_unless_present = "node", conflicts_with = "node")]
        nodes: Option<u32>,
        /// A node's UDP address, IP:PORT (repeat once per node, at least 3f+1): it listens
        /// there and members and clients reach it there.
        #[arg(long = "node", value_name = "IP:PORT", conflicts_with = "base_port")]
        node: Vec<std::net::SocketAddr>,
        /// The directory to create (must be empty or absent).
        #[arg(long)]
        dir: PathBuf,
        /// Faults tolerated per replica group (default: the most N nodes allow, (N-1)/3).
        #[arg(long)]
        f: Option<u32>,
        /// UDP port of node 0; node i listens on P+i.
        #[arg(long, default_value_t = 7100, value_parser = clap::value_parser!(u16).range(1..))]
        base_port: u16,
        #[command(flatten)]
        timing: Timing,
    },
    /// Start the cluster's nodes in the background (those not already running).
    #[command(
        long_about = "Start `dbqsfs node --dir DIR/node-<i>` in the background for every node \
        of the cluster in DIR that is not already running, with its logs appended to \
        DIR/node-<i>/node.log and its pid recorded in DIR/node-<i>/node.pid. Running it again after \
        a node died restarts only that node."
    )]
    Up {
        /// The cluster directory (as given to `cluster init`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop the nodes started by `cluster up` (SIGTERM, then SIGKILL after a timeout).
    #[command(
        long_about = "Send SIGTERM to exactly the processes recorded in DIR/node-<i>/node.pid \
        (checking that each pid still runs a node of this directory), wait for them to exit, and \
        send SIGKILL to any still running after --timeout seconds."
    )]
    Down {
        /// The cluster directory.
        #[arg(long)]
        dir: PathBuf,
        /// Seconds to wait after SIGTERM before SIGKILL.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
}

/// The Membership Service's periods, fixed in the genesis configuration.
#[derive(clap::Args, Debug, Clone)]
pub struct Timing {
    /// Epoch length: a committee member proposes the end of the epoch this long after it began.
    #[arg(long, value_name = "MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1_000..))]
    pub epoch_ms: u64,
    /// Each member probes the 3f+1 members after it on the ring (its watched members) this often.
    #[arg(long, value_name = "MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub probe_ms: u64,
    /// A member is reported unresponsive after this many failed probes in a row (and evicted at
    /// the end of the epoch once f+1 of its watchers report it). With the defaults a dead
    /// node is gone within about a minute.
    #[arg(long, value_name = "N", default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..))]
    pub evict_after: u32,
    /// Clients use a configuration only while holding a freshness certificate younger than this.
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1_500..))]
    pub freshness_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        let p = Params::with_f(1);
        Timing {
            epoch_ms: p.epoch_ms,
            probe_ms: p.probe_ms,
            evict_after: p.evict_after_probes,
            freshness_ms: p.freshness_ms,
        }
    }
}

/// `n` loopback addresses from port `base_port` on.
pub(crate) fn local_addrs(n: u32, base_port: u16) -> Result<Vec<std::net::SocketAddr>> {
    if u32::from(base_port) + n > 65536 {
        bail!(
            "ports {base_port}..{} do not fit below 65536",
            u32::from(base_port) + n
        );
    }
    Ok((0..n)
        .map(|i| std::net::SocketAddr::from(([127, 0, 0, 1], (u32::from(base_port) + i) as u16)))
        .collect())
}

/// Creates a cluster of nodes at `addrs` in `dir`.
pub(crate) fn cluster_init(
    addrs: &[std::net::SocketAddr],
    dir: &Path,
    f: Option<u32>,
    timing: &Timing,
) -> Result<()> {
    let n = addrs.len() as u32;
    let f = f.unwrap_or(n.saturating_sub(1) / 3);
    if n < 3 * f + 1 {
        bail!(
            "{n} nodes cannot tolerate f={f}: groups need 3f+1 = {} nodes",
            3 * f + 1
        );
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = addrs.iter().find(|a| !seen.insert(**a)) {
        bail!("node address {dup} is given twice: every node needs its own");
    }
    if let Some(bad) = addrs
        .iter()
        .find(|a| a.ip().is_unspecified() || a.port() == 0)
    {
        bail!(
            "node address {bad}: give the address members and clients reach the node at (not \
             0.0.0.0 or port 0)"
        );
    }
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let rnd = || files::random_key().map_err(|e| anyhow!("OS randomness: {e}"));
    let admission = rnd()?;
    let client = rnd()?;
    let keys = (0..n).map(|_| rnd()).collect::<Result<Vec<_>>>()?;
    let addr = |i: u32| addrs[i as usize].to_string();
    let mut members: Vec<Member> = keys
        .iter()
        .zip(0..)
        .map(|(k, i)| Member::new(k.public(), addr(i)))
        .collect();
    members.sort_by_key(|m| m.id);
    let params = Params {
        epoch_ms: timing.epoch_ms,
        probe_ms: timing.probe_ms,
        evict_after_probes: timing.evict_after,
        freshness_ms: timing.freshness_ms,
        ..Params::with_f(f)
    };
    let committee = Configuration::first_members_as_committee(&members, &params);
    let config = Configuration {
        epoch: 0,
        params,
        members,
        committee,
        prev: None,
        key: None,
    };
    config.validate().context("genesis configuration")?;
    let genesis = files::encode_genesis(&CertifiedConfig::genesis(config));

    files::write_key(&dir.join("admission.key"), &admission)?;
    files::write_key(&dir.join("client.key"), &client)?;
    let mut names = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let name = format!("node-{i}");
        let ndir = dir.join(&name);
        std::fs::create_dir_all(&ndir).with_context(|| format!("creating {}", ndir.display()))?;
        files::write_key(&ndir.join("node.key"), key)?;
        let cert = admission.sign(Domain::Admission, &key.public().0);
        files::write_toml(
            &ndir.join("node.toml"),
            &NodeFile {
                listen: addr(i as u32),
                genesis: genesis.clone(),
                clients: vec![client.public().to_hex()],
                admission_key: admission.public().to_hex(),
                admission_cert: hex::encode(cert.0),
                join: false,
                bootstrap: None,
                settings: Default::default(),
            },
        )?;
        names.push(name);
    }
    files::write_toml(
        &dir.join("cluster.toml"),
        &ClusterFile {
            genesis,
            client_key: "client.key".into(),
            admission_key: admission.public().to_hex(),
            nodes: names,
        },
    )?;
    println!(
        "created a cluster of {n} nodes (f={f}) at {} in {}",
        match addrs {
            [a, .., b] if addrs.len() > 2 => format!("{a} .. {b}"),
            _ => addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        },
        dir.display()
    );
    Ok(())
}

pub(crate) fn node_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let path = dir.join("cluster.toml");
    let file: ClusterFile = files::read_toml(&path)?;
    Ok(file.nodes.iter().map(|n| dir.join(n)).collect())
}

/// The pid recorded for the node in `ndir`, if it still runs a node of that directory.
pub(crate) fn running_pid(ndir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(ndir.join("node.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let ndir = std::fs::canonicalize(ndir).ok()?;
    // A zombie has an empty command line and counts as stopped.
    (cmdline.contains("node") && cmdline.contains(&*ndir.to_string_lossy())).then_some(pid)
}

pub(crate) fn cluster_up(dir: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the dbqsfs executable")?;
    let mut started = Vec::new();
    for ndir in node_dirs(dir)? {
        if let Some(pid) = running_pid(&ndir) {
            println!("{}: already running (pid {pid})", ndir.display());
            continue;
        }
        let ndir = std::fs::canonicalize(&ndir)
            .with_context(|| format!("node directory {}", ndir.display()))?;
        let log_path = ndir.join("node.log");
        let log = open_log(&log_path)?;
        let child = std::process::Command::new(&exe)
            .arg("node")
            .arg("--dir")
            .arg(&ndir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the node in {}", ndir.display()))?;
        std::fs::write(ndir.join("node.pid"), format!("{}\n", child.id()))
            .with_context(|| format!("recording the pid in {}", ndir.display()))?;
        started.push((ndir, child));
    }
    // Catch nodes that fail at once (bad files, port in use).
    std::thread::sleep(Duration::from_millis(300));
    let mut failed = Vec::new();
    for (ndir, mut child) in started {
        match child.try_wait() {
            Ok(Some(status)) => failed.push(format!(
                "{} exited with {status}; see {}",
                ndir.display(),
                ndir.join("node.log").display()
            )),
            _ => println!("{}: started (pid {})", ndir.display(), child.id()),
        }
    }
    if !failed.is_empty() {
        bail!("some nodes did not start:\n{}", failed.join("\n"));
    }
    Ok(())
}

pub(crate) fn cluster_down(dir: &Path, timeout: Duration) -> Result<()> {
    let mut pids = Vec::new();
    for ndir in node_dirs(dir)? {
        if let Some(pid) = running_pid(&ndir) {
            // SAFETY: kill(2) has no memory effects; the pid was checked to be our node.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            pids.push((ndir, pid));
        } else {
            let _ = std::fs::remove_file(ndir.join("node.pid"));
        }
    }
    let start = Instant::now();
    while pids.iter().any(|(n, _)| running_pid(n).is_some()) && start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (ndir, pid) in &pids {
        if running_pid(ndir).is_some() {
            eprintln!(
                "{}: still running after {timeout:?}; sending SIGKILL",
                ndir.display()
            );
            // SAFETY: as above.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(ndir.join("node.pid"));
        println!("{}: stopped (pid {pid})", ndir.display());
    }
    Ok(())
}
