//! The `dbqsfs` command line: argument definitions (clap derive) and the dispatch to the
//! subcommands, one room each: `cluster` (local clusters), `node` (a node's membership),
//! `status`, `block` (blocks and the block benchmark), `mount` (mount and umount), `snapshot`,
//! `volume` (encrypted volumes), with `keys` (what opens an encrypted volume) and `common` (what
//! they all use). Submodules never import this file; it imports them.
//!
//! Goals: every subcommand explains itself in `--help`; bad arguments exit with code 2 (clap's
//! convention), failures with code 1 and a message naming what failed. Non-goals: remote cluster
//! management (clusters are created here for any addresses, but `cluster up`/`down` start and
//! stop only the nodes whose directories are on this host).

mod block;
mod cluster;
mod common;
mod gc;
mod keys;
mod mount;
mod node;
mod snapshot;
mod status;
mod volume;

pub use common::UsageError;

use anyhow::{Context, Result};
use block::{bench, block_get, block_put, block_rm, BlockCmd};
use clap::{Parser, Subcommand};
use cluster::{cluster_down, cluster_init, cluster_up, ClusterCmd};
use common::{init_logs, runtime};
use dbqsfs_daemon::files;
use dbqsfs_daemon::node::{shutdown_signal, Node};
use dbqsfs_daemon::transfer::{self, TransferOptions};
use mount::{MountArgs, UmountArgs, MOUNT_HELP};
use node::{admit, keygen, leave, prepare_join};
use status::status;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

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
        While a snapshot exists the volume's collector keeps every block it reaches; deleting it \
        lets the writer (a read-write mount, or `dbqsfs gc`) release what only it kept."
    )]
    Snapshot(snapshot::SnapshotCmd),
    /// Release what a volume no longer reaches, now (its read-write mount does it every 5 s).
    #[command(
        long_about = "A volume's writer releases the blocks its volume no longer reaches \
        (overwritten data, deleted files, deleted snapshots, journal folded into a checkpoint); \
        the nodes delete a released block after their grace period (`dbqsfs node \
        --release-grace`, default 30 s). A read-write mount does this every -o gc seconds \
        (default 5). `dbqsfs gc` asks the mount on this host that holds the volume for a pass \
        now and follows it; if no mount holds it, it takes the volume's lease and runs the pass \
        itself. The cluster must be running (the embedded one runs while a mount of it does)."
    )]
    Gc(gc::GcArgs),
    /// Create an encrypted volume, or change what opens its key.
    #[command(
        subcommand,
        long_about = "An encrypted volume's blocks are sealed by the mount (AES-256-GCM-SIV \
        under a random volume key) before they leave the machine: nodes store ciphertext and \
        hashed labels only. The volume key is kept in the volume, wrapped by a key file \
        (--keyfile PATH, at least 32 bytes: `head -c 32 /dev/urandom > PATH`) or a passphrase \
        (--passphrase: asked on the terminal, or $DBQSFS_PASSPHRASE; Argon2id). Mount it with \
        `-o keyfile=PATH` or `-o passphrase`. `rekey` changes the wrapping without rewriting \
        data. Lose the key file or passphrase and the data is lost. The cluster must be running \
        (the embedded one runs while a mount of it does; a first mount with `-o \
        encrypt,keyfile=PATH` creates an encrypted volume too)."
    )]
    Volume(volume::VolumeCmd),
    /// Create a cluster (keys, genesis, node directories); start and stop the nodes on this host.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Run one node in the foreground (SIGTERM or ctrl-c stops it cleanly).
    #[command(
        long_about = "Run one node in the foreground from its node directory (as written by \
        `dbqsfs cluster init`: node.toml, node.key, data/). The node serves the dBQS protocol over \
        QUIC to the members of the current configuration and the client keys listed in node.toml. \
        SIGTERM or ctrl-c shuts it down cleanly. Logs go to stderr, filtered by RUST_LOG (default info). \
        Settings can also be kept in node.toml, in a [settings] table with the flags' names \
        (transfer_rate_limit, transfer_rate_under_load, reserve_mib, release_grace_secs, \
        metrics = \"IP:PORT\", log); \
        flags override them."
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
        /// data sooner and slows clients more [default: 50000000].
        #[arg(long, value_name = "BYTES_PER_SEC", value_parser = clap::value_parser!(u64).range(1..))]
        transfer_rate_under_load: Option<u64>,
        /// Free space (MiB) kept on the data directory's filesystem for metadata: below it the node
        /// refuses new content blocks (clients and transfers go on with the other replicas) but
        /// still stores public-key blocks and configurations, so it stays in its epoch and the
        /// volume's namespace stays writable [default: 1% of the filesystem, 16 MiB to 1 GiB].
        #[arg(long, value_name = "MIB")]
        reserve: Option<u64>,
        /// Seconds a content block waits, once every owner released it, before the node deletes
        /// it (readers that began before the release finish meanwhile) [default: 30].
        #[arg(long, value_name = "SECS")]
        release_grace: Option<u64>,
        /// Serve Prometheus metrics at http://IP:PORT/metrics (requests by peer and protocol,
        /// epoch, readiness, stored bytes, free space, transfers).
        #[arg(long, value_name = "IP:PORT")]
        metrics: Option<std::net::SocketAddr>,
        /// Test builds only: make this node Byzantine in the given way.
        #[cfg(feature = "fault-injection")]
        #[arg(long, value_enum)]
        fault: Option<dbqsfs_daemon::fault::Fault>,
    },
    /// Create a node key in DIR (for a node that will join) and print its public key.
    #[command(
        long_about = "Create DIR (if needed) and DIR/node.key, a fresh ed25519 key from OS randomness \
        (mode 0600), and print its public key in hex. Give the key to the cluster's operator, \
        who runs `dbqsfs admit` and returns the certificate; then start the node with `dbqsfs \
        node --dir DIR --join HOST:PORT --cert CERT --listen IP:PORT`."
    )]
    Keygen {
        /// The node directory to create.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print an admission certificate that lets the node with NODE_PUBKEY join the cluster.
    #[command(
        long_about = "Sign NODE_PUBKEY (hex, as printed by `dbqsfs keygen`) with the cluster's admission key K \
        (DIR/admission.key of `cluster init`) and print the certificate: one hex line holding \
        the signature and what the node needs to trust the cluster (the genesis configuration, \
        the admission public key and the client keys of cluster.toml, by default the one next to \
        K). The Membership Service admits only nodes with such a certificate."
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
        long_about = "Ask the node running from DIR to leave: it submits a Leave operation to the Membership \
        Service, and this command waits until a certified configuration without the node is \
        installed (at the end of the current epoch), printing the epoch. The node keeps running \
        so that the new replicas can copy its data; stop it afterwards. node.toml is changed so \
        that a restart does not join again."
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
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    #[command(
        long_about = "Print the completion script of SHELL to stdout. For bash: \
        `dbqsfs completions bash > /etc/bash_completion.d/dbqsfs`; zsh: `dbqsfs completions zsh \
        > \"${fpath[1]}/_dbqsfs\"`; fish: `dbqsfs completions fish > \
        ~/.config/fish/completions/dbqsfs.fish`."
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (dbqsfs.1 and one per subcommand) into DIR.
    #[command(
        long_about = "Write the man pages, dbqsfs.1 and dbqsfs-SUBCOMMAND.1, into DIR \
        (for example /usr/local/share/man/man1, then `man dbqsfs-mount`)."
    )]
    Man {
        /// Where to write them.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Show the cluster: epoch, committee, members (reachability, probe state, stored bytes,
    /// transfers), and the joins and leaves pending for the next epoch.
    #[command(
        long_about = "Show the cluster: epoch, committee, members (reachability, \
        probe state, stored data, transfers), and the joins and leaves pending for the next \
        epoch. Exits 0 when every member answered, 3 when some did not, 1 when none did (the \
        cluster is down or unreachable from here)."
    )]
    Status {
        /// The cluster description written by `cluster init` [default: the embedded cluster of
        /// --data-dir].
        #[arg(long, value_name = "FILE")]
        cluster: Option<PathBuf>,
        /// The embedded cluster's data directory [default: as for `dbqsfs mount`].
        #[arg(long, value_name = "DIR", conflicts_with = "cluster")]
        data_dir: Option<PathBuf>,
        /// One JSON document instead of text (ids in hex, sizes in bytes, times in ms).
        #[arg(long)]
        json: bool,
    },
}

/// The command line of this process: `dbqsfs ...`, or mount(8)'s helper call when it runs as
/// `mount.fuse.dbqsfs` (see [`mount::helper_args`]); `None` when there is nothing to do.
pub fn command_line() -> std::result::Result<Option<Cli>, UsageError> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let name = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if mount::HELPER_NAMES.contains(&name) {
        return Ok(mount::helper_args(&args)?.map(Cli::parse_from));
    }
    Ok(Some(Cli::parse()))
}

pub fn run(cli: Cli) -> Result<()> {
    if !matches!(cli.command, Command::Node { .. } | Command::Mount(_)) {
        // A command whose output goes to a closed pipe (`dbqsfs status | head -1`) ends quietly,
        // as other Unix tools do (Rust ignores SIGPIPE, which turns it into a panic in println!).
        // Long-running processes (node, mount) keep ignoring it: their logs may outlive a reader.
        // SAFETY: restoring a signal's default disposition; no handler runs Rust code.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Mount(args) => mount::run_mount(args),
        Command::Umount(args) => {
            init_logs("warn");
            mount::run_umount(args)
        }
        Command::Node {
            dir,
            join,
            cert,
            listen,
            transfer_rate_limit,
            transfer_rate_under_load,
            reserve,
            release_grace,
            metrics,
            #[cfg(feature = "fault-injection")]
            fault,
        } => {
            // node.toml's `log` setting, read before anything logs (a node being set up by
            // --join has no node.toml yet).
            let log = files::read_toml::<files::NodeFile>(&dir.join("node.toml"))
                .ok()
                .and_then(|f| f.settings.log);
            if let Some(l) = &log {
                tracing_subscriber::EnvFilter::try_new(l).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: [settings] log = {l:?} is not a log filter ({e}); write it as \
                         RUST_LOG takes it, e.g. \"info\" or \"warn,dbqsfs_daemon=debug\"",
                        dir.join("node.toml").display()
                    )
                })?;
            }
            init_logs(log.as_deref().unwrap_or("info"));
            if let (Some(join), Some(cert)) = (join, cert) {
                prepare_join(&dir, join, &cert, listen)?;
            }
            let node =
                Node::load(&dir).with_context(|| format!("loading node {}", dir.display()))?;
            // Flags first, then node.toml's [settings], then the defaults.
            let file = node.settings().clone();
            let reserve = reserve.or(file.reserve_mib);
            let transfer_rate_limit = transfer_rate_limit.or(file.transfer_rate_limit);
            let transfer_rate_under_load = transfer_rate_under_load
                .or(file.transfer_rate_under_load)
                .unwrap_or(transfer::DEFAULT_RATE_UNDER_LOAD);
            let metrics = match (metrics, &file.metrics) {
                (Some(m), _) => Some(m),
                (None, Some(m)) => Some(m.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "{}: settings.metrics = {m:?} is not an IP:PORT",
                        dir.join("node.toml").display()
                    )
                })?),
                (None, None) => None,
            };
            if let Some(mib) = reserve {
                node.set_reserve(mib.saturating_mul(1 << 20));
            }

            #[cfg(feature = "fault-injection")]
            let node = match fault {
                Some(f) => node.with_fault(f),
                None => node,
            };
            let node = match metrics {
                Some(addr) => node.with_metrics(addr),
                None => node,
            };
            // node.toml's release_grace_secs is the node's own (Node::load); the flag overrides it.
            if let Some(secs) = release_grace {
                node.set_release_grace(std::time::Duration::from_secs(secs));
            }
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
            node,
            dir,
            f,
            base_port,
            timing,
        }) => {
            init_logs("warn");
            let addrs = match nodes {
                Some(n) => cluster::local_addrs(n, base_port)?,
                None => node,
            };
            let nodes = addrs.len() as u32;
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
            cluster_init(&addrs, &dir, f, &timing)
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
        Command::Block(BlockCmd::Rm { cluster, id }) => {
            init_logs("warn");
            runtime()?.block_on(block_rm(&cluster, id))
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
            snapshot::run(cmd)
        }
        Command::Volume(cmd) => {
            init_logs("warn");
            volume::run(cmd)
        }
        Command::Gc(args) => {
            init_logs("warn");
            gc::run(args)
        }
        Command::Bench { cluster, ops } => {
            init_logs("warn");
            runtime()?.block_on(bench(&cluster, ops as usize))
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "dbqsfs", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing the man pages into {}", dir.display()))?;
            println!("wrote the man pages into {}", dir.display());
            Ok(())
        }
        Command::Status {
            cluster,
            data_dir,
            json,
        } => {
            init_logs("error");
            let toml = common::cluster_toml(cluster.as_deref(), data_dir.as_deref())?;
            let answered = runtime()?.block_on(status(&toml, json))?;
            match answered {
                status::Answered::All => Ok(()),
                status::Answered::Some => std::process::exit(3),
                status::Answered::None => {
                    Err(anyhow::anyhow!(
                    "no member of the cluster answered: are its nodes running? (`dbqsfs cluster \
                     up --dir {}`, or for the embedded default a `dbqsfs mount`)",
                    toml.parent().map(|p| p.display().to_string()).unwrap_or_default()
                ))
                }
            }
        }
    }
}
