//! The `dbqsfs` command line: argument definitions (clap derive) and the subcommands.
//!
//! Goals: every subcommand explains itself in `--help`; bad arguments exit with code 2 (clap's
//! convention), failures with code 1 and a message naming what failed. Non-goals: remote cluster
//! management (only local clusters on 127.0.0.1 are created and started here).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use dbqsfs_core::config::{CertifiedConfig, Configuration, Member, Params};
use dbqsfs_core::crypto::{Domain, PublicKey};
use dbqsfs_core::ms::membership::AdmissionCert;
use dbqsfs_daemon::blocks::{self, FileId};
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions};
use dbqsfs_daemon::files::{self, ClusterFile, ClusterInfo, NodeFile};
use dbqsfs_daemon::ms::MsMessage;
use dbqsfs_daemon::node::{shutdown_signal, Node};
use dbqsfs_daemon::transfer::{self, TransferOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "dbqsfs",
    version,
    about = "dbqsfs: a Byzantine-fault-tolerant distributed block store and filesystem",
    long_about = "dbqsfs stores content-addressed and owner-signed blocks on a cluster of nodes, \
                  tolerating f Byzantine nodes per replica group of 3f+1.\n\n\
                  Logs go to stderr and are filtered by RUST_LOG (for example RUST_LOG=debug)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a volume on DIR (with no options: the embedded local cluster's volume "default").
    #[command(long_about = MOUNT_HELP)]
    Mount(MountArgs),
    /// Unmount a dbqsfs mount and wait until its data is stored (and its embedded cluster stopped).
    #[command(
        long_about = "Unmount DIR and wait until the mount process has stored everything it \
        buffered, released the volume lease and, if it was the last mount of the embedded \
        cluster, stopped that cluster's nodes. As root it calls umount(2); otherwise it runs \
        `fusermount3 -u`. `fusermount3 -u DIR` and `umount DIR` work too (without the wait). \
        A busy mount (open files, a working directory inside) is refused unless --lazy."
    )]
    Umount(UmountArgs),
    /// Create, list and delete snapshots of a volume (mount one with -o snapshot=NAME).
    #[command(
        subcommand,
        long_about = "A snapshot names a volume's committed state (what the last commit of its \
        read-write mount stored): taking one is instant, whatever the volume holds, and works while \
        the volume is mounted. `dbqsfs mount -o snapshot=NAME DIR` mounts it read-only; it never \
        changes. The cluster must be running (the embedded one runs while a mount of it does). \
        Deleting a snapshot does not free its data yet."
    )]
    Snapshot(crate::snapshot_cmd::SnapshotCmd),
    /// Create an encrypted volume, or change what opens its key.
    #[command(
        subcommand,
        long_about = "An encrypted volume's blocks are sealed by the mount (XChaCha20-Poly1305 \
        under a random volume key) before they leave the machine: nodes store ciphertext and \
        hashed labels only. The volume key is kept in the volume, wrapped by a key file \
        (--keyfile PATH, at least 32 bytes: `head -c 32 /dev/urandom > PATH`) or a passphrase \
        (--passphrase: asked on the terminal, or $DBQSFS_PASSPHRASE; Argon2id). Mount it with \
        `-o keyfile=PATH` or `-o passphrase`. `rekey` changes the wrapping without rewriting \
        data. Lose the key file or passphrase and the data is lost. The cluster must be running \
        (the embedded one runs while a mount of it does; a first mount with `-o \
        encrypt,keyfile=PATH` creates an encrypted volume too)."
    )]
    Volume(crate::volume_cmd::VolumeCmd),
    /// Create, start and stop a local test cluster on 127.0.0.1.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Run one node in the foreground (SIGTERM or ctrl-c stops it cleanly).
    #[command(
        long_about = "Run one node in the foreground from its node directory (as written by \
        `dbqsfs cluster init`: node.toml, node.key, data/). The node serves the dBQS protocol over \
        QUIC to the members of the current configuration and the client keys listed in node.toml. \
        SIGTERM or ctrl-c shuts it down cleanly. Logs go to stderr, filtered by RUST_LOG (default info)."
    )]
    Node {
        /// The node directory.
        #[arg(long)]
        dir: PathBuf,
        /// Join a running cluster through the member at HOST:PORT (with --cert; first run only:
        /// it writes node.toml, and later runs keep joining until a configuration includes the node).
        #[arg(long, value_name = "HOST:PORT", requires = "cert")]
        join: Option<std::net::SocketAddr>,
        /// The certificate printed by `dbqsfs admit` for this node's key (a file, or the text itself).
        #[arg(long, value_name = "C", requires = "join")]
        cert: Option<String>,
        /// With --join: the UDP address this node listens on and members reach it at.
        #[arg(long, value_name = "IP:PORT", requires = "join")]
        listen: Option<std::net::SocketAddr>,
        /// Cap on the bytes per second the node's state transfers receive [default: no cap].
        #[arg(long, value_name = "BYTES_PER_SEC", value_parser = clap::value_parser!(u64).range(1..))]
        transfer_rate_limit: Option<u64>,
        /// Cap on the bytes per second the node's state transfers receive while it serves client
        /// requests (any in the last second); without clients they run at full speed. Higher moves
        /// data sooner and slows clients more.
        #[arg(long, value_name = "BYTES_PER_SEC", default_value_t = transfer::DEFAULT_RATE_UNDER_LOAD,
              value_parser = clap::value_parser!(u64).range(1..))]
        transfer_rate_under_load: u64,
        /// Free space (MiB) kept on the data directory's filesystem for metadata: below it the node
        /// refuses new content blocks (clients and transfers go on with the other replicas) but
        /// still stores public-key blocks and configurations, so it stays in its epoch and the
        /// volume's namespace stays writable [default: 1% of the filesystem, 16 MiB to 1 GiB].
        #[arg(long, value_name = "MIB")]
        reserve: Option<u64>,
        /// Test builds only: make this node Byzantine in the given way.
        #[cfg(feature = "fault-injection")]
        #[arg(long, value_enum)]
        fault: Option<dbqsfs_daemon::fault::Fault>,
    },
    /// Create a node key in DIR (for a node that will join) and print its public key.
    #[command(
        long_about = "Create DIR (if needed) and DIR/node.key, a fresh ed25519 key from OS         randomness (mode 0600), and print its public key in hex. Give the key to the cluster's         operator, who runs `dbqsfs admit` and returns the certificate; then start the node with         `dbqsfs node --dir DIR --join HOST:PORT --cert CERT --listen IP:PORT`."
    )]
    Keygen {
        /// The node directory to create.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print an admission certificate that lets the node with NODE_PUBKEY join the cluster.
    #[command(
        long_about = "Sign NODE_PUBKEY (hex, as printed by `dbqsfs keygen`) with the cluster's         admission key K (DIR/admission.key of `cluster init`) and print the certificate: one hex         line holding the signature and what the node needs to trust the cluster (the genesis         configuration, the admission public key and the client keys of cluster.toml, by default         the one next to K). The Membership Service admits only nodes with such a certificate."
    )]
    Admit {
        /// The admission key file.
        #[arg(long, value_name = "K")]
        admission_key: PathBuf,
        /// The cluster description [default: cluster.toml next to the admission key].
        #[arg(long, value_name = "FILE")]
        cluster: Option<PathBuf>,
        /// The public key of the node to admit (hex).
        node_pubkey: String,
    },
    /// Ask the node in DIR (running) to leave the cluster, and wait until it has.
    #[command(
        long_about = "Ask the node running from DIR to leave: it submits a Leave operation to the         Membership Service, and this command waits until a certified configuration without the         node is installed (at the end of the current epoch), printing the epoch. The node keeps         running so that the new replicas can copy its data; stop it afterwards. node.toml is         changed so that a restart does not join again."
    )]
    Leave {
        /// The node directory.
        #[arg(long)]
        dir: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Store and fetch files as blocks.
    #[command(subcommand)]
    Block(BlockCmd),
    /// Measure latency and throughput of block operations against a running cluster.
    #[command(
        long_about = "Measure, against a running cluster: public-key block write and read \
        latency (p50, p99), and content block write and read throughput for 4 KiB and 1 MiB blocks \
        with 1 and 16 operations in flight. Writes random data under a fresh owner key."
    )]
    Bench {
        /// The cluster description (DIR/cluster.toml).
        #[arg(long)]
        cluster: PathBuf,
        /// Operations per measurement.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
        ops: u32,
    },
    /// Show the cluster: epoch, committee, members (reachability, probe state, stored bytes,
    /// transfers), and the joins and leaves pending for the next epoch.
    Status {
        /// The cluster description written by `cluster init` (DIR/cluster.toml).
        #[arg(long)]
        cluster: PathBuf,
    },
}

const MOUNT_HELP: &str =
    "Mount a dbqsfs volume on the empty directory DIR (created if its parent exists).

With no --cluster, this is the embedded default: a local cluster of 4 nodes (f=1) on loopback \
QUIC, kept under the data directory (--data-dir, else $XDG_DATA_HOME/dbqsfs, else \
~/.local/share/dbqsfs). The first mount creates the cluster (free UDP ports on 127.0.0.1 are \
picked) and the volume; every mount starts the nodes if they do not run, and the last mount to \
end stops them. A later mount shows the same files.

With --cluster FILE (a cluster.toml written by `dbqsfs cluster init`), it mounts volume --volume \
of that running cluster, creating the volume if it does not exist. The cluster's client key owns \
the volume.

Without -f the mount runs in the background: this command returns once the mount is up and \
prints where the logs go (DATA/mount.log, or mount-VOLUME.log next to cluster.toml). With -f it \
stays in the foreground and logs to stderr; SIGINT or SIGTERM unmounts. Unmount with \
`dbqsfs umount DIR` (or `fusermount3 -u DIR`).

One read-write mount per volume at a time: it holds a lease on the volume (renewed every 10 s, \
valid 30 s) and a second read-write mount is refused with the holder's name. Read-only mounts \
(-o ro) need no lease and may run alongside it; they see what the writer has committed within \
about 2 s (a file they hold open keeps the version it was opened with).

Durability: changes apply at once in the mount's memory and are committed to the cluster in \
batches (one signed head record per batch). fsync, fdatasync and fsync of a directory return \
after everything done before them is stored on a quorum; unmount too (sync(1) does not reach \
FUSE filesystems). Without \
those a change is committed within -o commit=MS (default 1000). close makes nothing durable (as \
on ext4). A crash (of the mount or the machine) loses at most the uncommitted tail: the volume \
comes back as it was at some commit, holding everything a successful fsync covered. -o sync \
commits after every operation (slow, write-through).

When the cluster cannot be reached, a system call that needs it (fsync, anything under -o sync, \
a read of data not cached) fails with ETIMEDOUT or EIO after at most the operation timeout \
(-o timeout, default 15 s) plus 5 s; other changes keep applying and are committed once the \
cluster is back; the mount itself never hangs.

Options (-o, comma-separated): ro, rw, allow_other, default_permissions (always on), nonempty, \
fsname=NAME, attr_timeout=SECS and entry_timeout=SECS (kernel caching, default 1), \
timeout=SECS (per dBQS operation, default 15), threads=N (FUSE request threads), \
chunk_size=BYTES (file chunk size of a volume this mount creates; default 1 MiB), \
commit=MS (longest time a change waits for its commit, default 1000), sync (commit every \
operation before it returns), async (the default), snapshot=NAME (mount that snapshot of the \
volume, read-only; see `dbqsfs snapshot`).

Encryption (see `dbqsfs volume --help`): keyfile=PATH or passphrase (asked on the terminal, or \
$DBQSFS_PASSPHRASE) opens an encrypted volume; on a volume that does not exist yet they create \
it encrypted (encrypt says so explicitly and asks for a passphrase twice). Nodes then hold only \
ciphertext and hashed labels. An unencrypted volume stays unencrypted.";

/// Arguments of `dbqsfs mount`.
#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Data directory of the embedded default cluster [default: $XDG_DATA_HOME/dbqsfs or ~/.local/share/dbqsfs].
    #[arg(long, value_name = "D", conflicts_with = "cluster")]
    pub data_dir: Option<PathBuf>,
    /// Mount a volume of this existing cluster (its cluster.toml) instead of the embedded default.
    #[arg(long, value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// The volume to mount.
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub volume: String,
    /// Stay in the foreground (logs to stderr; SIGINT/SIGTERM unmount).
    #[arg(short, long)]
    pub foreground: bool,
    /// Mount options, comma-separated (see above).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// UDP port of the first node when the embedded cluster is created [default: free ports].
    #[arg(long, value_name = "P", conflicts_with = "cluster", value_parser = clap::value_parser!(u16).range(1..65530))]
    pub base_port: Option<u16>,
    /// The mount point: an empty directory (created if only its last component is missing).
    pub dir: PathBuf,
}

/// Arguments of `dbqsfs umount`.
#[derive(clap::Args, Debug)]
pub struct UmountArgs {
    /// Detach now even if busy; the mount ends when its last user goes.
    #[arg(short = 'z', long)]
    pub lazy: bool,
    /// The mount point.
    pub dir: PathBuf,
}

/// A usage error found after parsing: printed like clap's and exits with code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Create keys, admission certificates, a genesis configuration and node directories.
    #[command(
        long_about = "Create a local cluster description in DIR: one key and one admission \
        certificate (the admission key's signature over the node key) per node, a genesis \
        configuration of N nodes listening on 127.0.0.1:P, P+1, ..., with groups of 3f+1 and a \
        committee of the first 3f+1 members, a client key, DIR/cluster.toml for clients and \
        DIR/node-<i>/ for each node. Keys are made from OS randomness; secret key files are mode 0600."
    )]
    Init {
        /// Number of nodes (at least 3f+1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        nodes: u32,
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

/// What `status` says of a node's free space: nothing while it has room; "FULL" (it refuses new
/// content blocks), and the blocks it deferred, otherwise.
fn space_note(s: &dbqsfs_daemon::control::SpaceStatus) -> String {
    let mib = |b: u64| b >> 20;
    let mut note = String::new();
    if s.full {
        note += &format!(
            "  FULL ({} MiB free of {} MiB, {} MiB reserved): new content blocks refused",
            mib(s.free),
            mib(s.size),
            mib(s.reserve)
        );
    }
    if s.deferred > 0 {
        note += &format!(
            "  {} blocks deferred for lack of space (stored once space is freed)",
            s.deferred
        );
    }
    note
}

/// The Membership Service's periods, fixed in the genesis configuration.
#[derive(clap::Args, Debug, Clone)]
pub struct Timing {
    /// Epoch length: a committee member proposes the end of the epoch this long after it began.
    #[arg(long, value_name = "MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1_000..))]
    pub epoch_ms: u64,
    /// Each committee member probes every member this often.
    #[arg(long, value_name = "MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub probe_ms: u64,
    /// A member is reported unresponsive after this many failed probes in a row (and evicted at
    /// the end of the epoch once f_ms+1 committee members report it). With the defaults a dead
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

#[derive(Subcommand, Debug)]
pub enum BlockCmd {
    /// Store a file; print its id.
    #[command(
        long_about = "Store FILE in the cluster and print its id. A file of at most 1 MiB \
        becomes one content block (id `c:<hex>`); a larger file becomes content blocks of 1 MiB \
        plus a manifest block listing them (id `m:<hex>`). Prints the id on stdout once a quorum \
        of 2f+1 replicas of every block has stored it durably."
    )]
    Put {
        /// The cluster description (DIR/cluster.toml).
        #[arg(long)]
        cluster: PathBuf,
        /// The file to store.
        file: PathBuf,
    },
    /// Fetch a file by id and write it to OUT.
    #[command(
        long_about = "Fetch the file with id ID (as printed by `block put`) and write it to \
        OUT. Every block is verified against its hash before it is used; OUT is written to a \
        temporary name and renamed when complete, so a failed get leaves no partial OUT."
    )]
    Get {
        /// The cluster description (DIR/cluster.toml).
        #[arg(long)]
        cluster: PathBuf,
        /// The id printed by `block put` (`c:<hex>` or `m:<hex>`).
        id: FileId,
        /// Where to write the file.
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// Sets up logging on stderr with RUST_LOG, defaulting to `default`.
pub fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mount(args) => crate::mount_cmd::run_mount(args),
        Command::Umount(args) => {
            init_logs("warn");
            crate::mount_cmd::run_umount(args)
        }
        Command::Node {
            dir,
            join,
            cert,
            listen,
            transfer_rate_limit,
            transfer_rate_under_load,
            reserve,
            #[cfg(feature = "fault-injection")]
            fault,
        } => {
            init_logs("info");
            if let (Some(join), Some(cert)) = (join, cert) {
                prepare_join(&dir, join, &cert, listen)?;
            }
            let node =
                Node::load(&dir).with_context(|| format!("loading node {}", dir.display()))?;
            if let Some(mib) = reserve {
                node.set_reserve(mib.saturating_mul(1 << 20));
            }
            #[cfg(feature = "fault-injection")]
            let node = match fault {
                Some(f) => node.with_fault(f),
                None => node,
            };
            let node = node.with_transfer_options(TransferOptions {
                rate_limit: transfer_rate_limit,
                rate_under_load: Some(transfer_rate_under_load),
                ..TransferOptions::default()
            });
            let rt = runtime()?;
            // State transfers show a progress bar on a terminal (and are logged in any case).
            if std::io::stderr().is_terminal() {
                rt.spawn(transfer::show_progress(node.transfers().subscribe()));
            }
            rt.block_on(node.run(shutdown_signal()))?;
            Ok(())
        }
        Command::Cluster(ClusterCmd::Init {
            nodes,
            dir,
            f,
            base_port,
            timing,
        }) => {
            init_logs("warn");
            let fv = f.unwrap_or(nodes.saturating_sub(1) / 3);
            if nodes < 3 * fv + 1 {
                use clap::CommandFactory;
                Cli::command()
                    .error(
                        clap::error::ErrorKind::ValueValidation,
                        format!(
                            "{nodes} nodes cannot tolerate --f {fv}: groups need 3f+1 = {} nodes",
                            3 * fv + 1
                        ),
                    )
                    .exit();
            }
            cluster_init(nodes, &dir, f, base_port, &timing)
        }
        Command::Keygen { dir } => {
            init_logs("warn");
            keygen(&dir)
        }
        Command::Admit {
            admission_key,
            cluster,
            node_pubkey,
        } => {
            init_logs("warn");
            admit(&admission_key, cluster.as_deref(), &node_pubkey)
        }
        Command::Leave { dir, timeout } => {
            init_logs("warn");
            runtime()?.block_on(leave(&dir, Duration::from_secs(timeout)))
        }
        Command::Cluster(ClusterCmd::Up { dir }) => {
            init_logs("warn");
            cluster_up(&dir)
        }
        Command::Cluster(ClusterCmd::Down { dir, timeout }) => {
            init_logs("warn");
            cluster_down(&dir, Duration::from_secs(timeout))
        }
        Command::Block(BlockCmd::Put { cluster, file }) => {
            init_logs("warn");
            runtime()?.block_on(block_put(&cluster, &file))
        }
        Command::Block(BlockCmd::Get {
            cluster,
            id,
            output,
        }) => {
            init_logs("warn");
            runtime()?.block_on(block_get(&cluster, id, &output))
        }
        Command::Snapshot(cmd) => {
            init_logs("warn");
            crate::snapshot_cmd::run(cmd)
        }
        Command::Volume(cmd) => {
            init_logs("warn");
            crate::volume_cmd::run(cmd)
        }
        Command::Bench { cluster, ops } => {
            init_logs("warn");
            runtime()?.block_on(bench(&cluster, ops as usize))
        }
        Command::Status { cluster } => {
            init_logs("error");
            runtime()?.block_on(status(&cluster))
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn cluster_init(
    n: u32,
    dir: &Path,
    f: Option<u32>,
    base_port: u16,
    timing: &Timing,
) -> Result<()> {
    let f = f.unwrap_or(n.saturating_sub(1) / 3);
    if n < 3 * f + 1 {
        bail!(
            "{n} nodes cannot tolerate f={f}: groups need 3f+1 = {} nodes",
            3 * f + 1
        );
    }
    if u32::from(base_port) + n > 65536 {
        bail!(
            "ports {base_port}..{} do not fit below 65536",
            u32::from(base_port) + n
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
    let addr = |i: u32| format!("127.0.0.1:{}", u32::from(base_port) + i);
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
                admission_cert: files::to_hex(&cert.0),
                join: false,
                bootstrap: None,
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
        "created a cluster of {n} nodes (f={f}) on 127.0.0.1:{base_port}..{} in {}",
        u32::from(base_port) + n - 1,
        dir.display()
    );
    Ok(())
}

fn keygen(dir: &Path) -> Result<()> {
    let path = dir.join("node.key");
    if path.exists() {
        bail!(
            "{} exists; a node keeps its key (remove the directory to start over)",
            path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = files::random_key().map_err(|e| anyhow!("OS randomness: {e}"))?;
    files::write_key(&path, &key)?;
    println!("{}", key.public().to_hex());
    eprintln!(
        "created {}; next: `dbqsfs admit --admission-key CLUSTER/admission.key {}` on the cluster's side",
        path.display(),
        key.public().to_hex()
    );
    Ok(())
}

fn admit(admission_key: &Path, cluster: Option<&Path>, node: &str) -> Result<()> {
    let admission = files::read_key(admission_key)?;
    let node = PublicKey::from_hex(node)
        .filter(|k| ed25519_dalek::VerifyingKey::from_bytes(&k.0).is_ok())
        .ok_or_else(|| {
            UsageError(format!(
                "NODE_PUBKEY {node:?} is not an ed25519 public key in hex (64 hex digits, as printed by `dbqsfs keygen`)"
            ))
        })?;
    let cluster = match cluster {
        Some(c) => c.to_path_buf(),
        None => admission_key
            .parent()
            .unwrap_or(Path::new("."))
            .join("cluster.toml"),
    };
    let info = ClusterInfo::load(&cluster)?;
    if info.file.admission_key != admission.public().to_hex() {
        bail!(
            "{} is not the admission key of the cluster in {}",
            admission_key.display(),
            cluster.display()
        );
    }
    let ticket = files::JoinTicket {
        cert: AdmissionCert::sign(&admission, &node),
        admission_key: admission.public(),
        genesis: info.genesis.clone(),
        clients: vec![info.client_key.public()],
    };
    println!("{}", ticket.encode());
    Ok(())
}

/// Writes node.toml for a node that joins through `via`, from the certificate `cert`.
fn prepare_join(
    dir: &Path,
    via: std::net::SocketAddr,
    cert: &str,
    listen: Option<std::net::SocketAddr>,
) -> Result<()> {
    let key_path = dir.join("node.key");
    if !key_path.exists() {
        bail!(
            "{} does not exist: create the node's key with `dbqsfs keygen --dir {}` and have it admitted first",
            key_path.display(),
            dir.display()
        );
    }
    let key = files::read_key(&key_path)?;
    let cert_path = Path::new(cert);
    let text = if cert_path.exists() {
        std::fs::read_to_string(cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?
    } else {
        cert.to_string()
    };
    let ticket = files::JoinTicket::decode(Path::new("--cert"), &text)?;
    if ticket.cert.node != key.public() || !ticket.cert.verify(&ticket.admission_key) {
        bail!(
            "the certificate does not admit this node's key {} (was it made for another key?)",
            key.public().to_hex()
        );
    }
    let toml = dir.join("node.toml");
    if toml.exists() {
        // Already prepared: keep the node's file (it may have left since; `leave` clears `join`).
        return Ok(());
    }
    let listen = listen.ok_or_else(|| {
        UsageError(
            "the first `node --join` needs --listen IP:PORT (where members reach this node)".into(),
        )
    })?;
    files::write_toml(
        &toml,
        &NodeFile {
            listen: listen.to_string(),
            genesis: files::encode_genesis(&ticket.genesis),
            clients: ticket.clients.iter().map(|c| c.to_hex()).collect(),
            admission_key: ticket.admission_key.to_hex(),
            admission_cert: files::to_hex(&ticket.cert.sig.0),
            join: true,
            bootstrap: Some(via.to_string()),
        },
    )?;
    Ok(())
}

/// Asks the node running from `dir` to leave and waits until it is out of the configuration.
async fn leave(dir: &Path, timeout: Duration) -> Result<()> {
    let toml = dir.join("node.toml");
    let mut file: NodeFile = files::read_toml(&toml)?;
    let key = files::read_key(&dir.join("node.key"))?;
    let addr: std::net::SocketAddr = file.listen.parse().map_err(|_| {
        anyhow!(
            "{}: listen {:?} is not IP:port",
            toml.display(),
            file.listen
        )
    })?;
    // Do not join again after a restart.
    file.join = false;
    files::write_toml(&toml, &file)?;
    let endpoint = dbqsfs_net::Endpoint::client(
        dbqsfs_net::local_bind_for(addr),
        key.dalek().clone(),
        dbqsfs_net::TransportOptions::default(),
    )?;
    let vk = key.dalek().verifying_key();
    let deadline = Instant::now() + timeout;
    let mut announced = None;
    loop {
        let req = dbqsfs_core::wire::encode_msg(0, MsMessage::Leave);
        match endpoint.request(addr, &vk, &req).await {
            Ok(resp) => match dbqsfs_core::wire::decode::<MsMessage>(&resp).map(|e| e.msg) {
                Ok(MsMessage::Leaving {
                    epoch,
                    member: false,
                }) => {
                    println!("left: the configuration of epoch {epoch} does not include this node");
                    println!("the node keeps serving its old data to the new replicas; stop it when `dbqsfs status` shows their transfers complete");
                    return Ok(());
                }
                Ok(MsMessage::Leaving {
                    epoch,
                    member: true,
                }) => {
                    if announced != Some(epoch) {
                        eprintln!(
                            "epoch {epoch}: leave submitted, waiting for the end of the epoch"
                        );
                        announced = Some(epoch);
                    }
                }
                Ok(other) => bail!("the node refused: {other:?}"),
                Err(e) => bail!("the node's answer is undecodable: {e}"),
            },
            Err(e) => bail!(
                "cannot reach the node at {addr}: {e} (is `dbqsfs node --dir {}` running?)",
                dir.display()
            ),
        }
        if Instant::now() >= deadline {
            bail!("the node is still a member after {}s; is the Membership Service running (see `dbqsfs status`)?", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn node_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let path = dir.join("cluster.toml");
    let file: ClusterFile = files::read_toml(&path)?;
    Ok(file.nodes.iter().map(|n| dir.join(n)).collect())
}

/// The pid recorded for the node in `ndir`, if it still runs a node of that directory.
fn running_pid(ndir: &Path) -> Option<i32> {
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

fn cluster_up(dir: &Path) -> Result<()> {
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
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

fn connect(cluster: &Path) -> Result<DbqsClient> {
    let info = ClusterInfo::load(cluster)?;
    Ok(DbqsClient::connect(
        info.genesis,
        info.client_key,
        DbqsClientOptions::default(),
    )?)
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if std::io::stderr().is_terminal() && total > 4 * 1024 * 1024 {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

async fn block_put(cluster: &Path, file: &Path) -> Result<()> {
    let client = connect(cluster)?;
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let bar = progress_bar(data.len() as u64);
    let id = blocks::put_file(&client, &data, &|n| bar.inc(n))
        .await
        .with_context(|| format!("storing {}", file.display()))?;
    bar.finish_and_clear();
    println!("{id}");
    Ok(())
}

async fn block_get(cluster: &Path, id: FileId, out: &Path) -> Result<()> {
    let client = connect(cluster)?;
    let total = blocks::file_size(&client, id).await?.unwrap_or(0);
    let bar = progress_bar(total);
    let tmp = out.with_file_name(format!(
        ".{}.part",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into())
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = blocks::get_file(&client, id, &mut |bytes| f.write_all(bytes), &|n| {
        bar.inc(n)
    })
    .await;
    bar.finish_and_clear();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("fetching {id}"));
    }
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

async fn status(cluster: &Path) -> Result<()> {
    let client = connect(cluster)?;
    let chain = client.refresh().await;
    let config = chain.config().clone();
    let p = &config.params;
    println!(
        "epoch {}  f={}  {} members  committee of {} (f_ms={})  epoch {} s, probes every {} s, evict after {} failed",
        config.epoch,
        p.f,
        config.members.len(),
        config.committee.len(),
        p.f_ms,
        p.epoch_ms / 1000,
        p.probe_ms as f64 / 1000.0,
        p.evict_after_probes,
    );
    // The MS view of every member: the committee members' probes and pending changes.
    let ms_queries: Vec<_> = config
        .members
        .iter()
        .map(|m| {
            let c = client.clone();
            let m = m.clone();
            tokio::spawn(async move { c.ms_status(&m).await.ok() })
        })
        .collect();
    let mut views = Vec::new();
    for h in ms_queries {
        if let Some(v) = h.await? {
            views.push(v);
        }
    }
    // Probe state: how many committee members (of those that answered) report each member
    // unresponsive.
    let suspicion = |id: &dbqsfs_core::crypto::NodeId| -> (usize, usize) {
        let probers: Vec<_> = views
            .iter()
            .filter(|v| v.in_agreement && v.epoch == config.epoch)
            .collect();
        let bad = probers
            .iter()
            .filter(|v| v.probes.iter().any(|(t, _, ok)| t == id && !ok))
            .count();
        (bad, probers.len())
    };
    if let Some(v) = views
        .iter()
        .find(|v| v.in_agreement && v.epoch == config.epoch)
    {
        println!(
            "agreement: view {}  primary {}  {} operations batches executed  epoch age {} s",
            v.view,
            v.primary.map(|p| p.short()).unwrap_or_else(|| "?".into()),
            v.executed,
            v.epoch_age_ms / 1000
        );
        if let Some(pending) = &v.pending {
            let ids = |xs: &[dbqsfs_core::crypto::NodeId]| {
                xs.iter().map(|x| x.short()).collect::<Vec<_>>().join(" ")
            };
            println!(
                "pending for epoch {}: joins [{}]  leaves [{}]  suspected [{}]  guilty [{}]  end votes {}",
                config.epoch + 1,
                ids(&pending.joins),
                ids(&pending.leaves),
                pending
                    .suspected
                    .iter()
                    .map(|(id, n)| format!("{}×{n}", id.short()))
                    .collect::<Vec<_>>()
                    .join(" "),
                ids(&pending.guilty),
                pending.end_votes
            );
        }
    } else {
        println!("agreement: no committee member answered");
    }
    let queries = config.members.iter().map(|m| {
        let c = client.clone();
        let m = m.clone();
        tokio::spawn(async move {
            let r = c.node_status(&m).await;
            (m, r)
        })
    });
    let handles: Vec<_> = queries.collect();
    let mut unreachable = 0;
    let mut transfers = Vec::new();
    for h in handles {
        let (m, r) = h.await?;
        let (bad, probers) = suspicion(&m.id);
        // "C" marks committee members; then what the committee's probes say.
        print!(
            "{} {:<26} ",
            if config.committee.contains(&m.id) {
                "C"
            } else {
                " "
            },
            if bad == 0 {
                format!("probes ok ({probers} probers)")
            } else {
                format!("UNRESPONSIVE to {bad} of {probers}")
            },
        );
        if let Ok(s) = &r {
            let mut lines = transfer::status_lines(&s.transfers);
            lines.extend(transfer::gc_line(&s.gc));
            if !lines.is_empty() {
                transfers.push((m.id, lines));
            }
        }
        match r {
            Ok(s) => println!(
                "{}  {}  reachable  epoch {}  {} bytes in {} objects{}{}",
                m.id.short(),
                m.addr,
                s.epoch,
                s.stored_bytes,
                s.objects,
                if s.ready {
                    ""
                } else {
                    "  (state transfer pending)"
                },
                space_note(&s.space),
            ),
            Err(e) => {
                unreachable += 1;
                println!("{}  {}  unreachable  ({e})", m.id.short(), m.addr)
            }
        }
    }
    if unreachable > 0 {
        println!(
            "{unreachable} of {} members unreachable",
            config.members.len()
        );
    }
    for (id, lines) in transfers {
        for line in lines {
            println!("{}  {line}", id.short());
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn bench(cluster: &Path, ops: usize) -> Result<()> {
    let client = connect(cluster)?;
    let owner = files::random_key().map_err(|e| anyhow!("OS randomness: {e}"))?;
    let mut lat = Vec::with_capacity(ops);
    for i in 0..ops {
        let t = Instant::now();
        client
            .put_pk(
                &owner,
                b"bench",
                format!("v{i}").into_bytes(),
                Some(i as u64 + 1),
            )
            .await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "pk write (version known): p50 {:?}  p99 {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    let id = dbqsfs_core::object::pk_block_id(&owner.public(), b"bench");
    lat.clear();
    for _ in 0..ops {
        let t = Instant::now();
        client.get_pk(id).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "pk read: p50 {:?}  p99 {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    for size in [4096usize, 1 << 20] {
        let n = if size > 65536 { ops.min(64) } else { ops };
        for inflight in [1usize, 16] {
            let blocks: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let mut b = vec![0u8; size];
                    getrandom::fill(&mut b).map(|()| b)
                })
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow!("OS randomness: {e}"))?;
            let t = Instant::now();
            let ids = run_parallel(inflight, blocks, {
                let c = client.clone();
                move |b| {
                    let c = c.clone();
                    async move { c.put_content(b).await }
                }
            })
            .await?;
            let w = t.elapsed();
            let t = Instant::now();
            run_parallel(inflight, ids, {
                let c = client.clone();
                move |id| {
                    let c = c.clone();
                    async move { c.get_content(id).await }
                }
            })
            .await?;
            let r = t.elapsed();
            let mb = (n * size) as f64 / 1e6;
            println!(
                "content {:>7} B x{n:<4} in flight {inflight:>2}: write {:8.1} MB/s ({:7.0} ops/s)  read {:8.1} MB/s ({:7.0} ops/s)",
                size,
                mb / w.as_secs_f64(),
                n as f64 / w.as_secs_f64(),
                mb / r.as_secs_f64(),
                n as f64 / r.as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Runs `f` over `items` with at most `inflight` at once; results in input order.
async fn run_parallel<T, R, F, Fut, E>(inflight: usize, items: Vec<T>, f: F) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<R, E>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let mut items = items.into_iter().enumerate();
    loop {
        while set.len() < inflight {
            let Some((i, item)) = items.next() else { break };
            let fut = f(item);
            set.spawn(async move { (i, fut.await) });
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let (i, r) = r?;
        out[i] = Some(r?);
    }
    Ok(out.into_iter().flatten().collect())
}
