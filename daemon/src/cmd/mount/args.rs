//! The command-line arguments of `dbqsfs mount` and `dbqsfs umount`, and which cluster a mount
//! uses.

use crate::cmd::common::{data_dir, UsageError};
use anyhow::{Context, Result};

use std::path::{Path, PathBuf};

pub(crate) const MOUNT_HELP: &str =
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
operation before it returns), async (the default), gc=SECS (how often the writer releases what \
its volume no longer reaches: overwritten data, deleted files and snapshots, folded journal; \
default 5, 0 for only `dbqsfs gc`), snapshot=NAME (mount that snapshot of the \
volume, read-only; see `dbqsfs snapshot`), metrics=IP:PORT (Prometheus metrics of the mount's \
calls to the cluster at http://IP:PORT/metrics), and mount(8)'s generic options (defaults, \
_netdev, nofail, noatime, nodev, ...: see the README).

Encryption (see `dbqsfs volume --help`): keyfile=PATH or passphrase (asked on the terminal, or \
$DBQSFS_PASSPHRASE) opens an encrypted volume; on a volume that does not exist yet they create \
it encrypted (encrypt says so explicitly and asks for a passphrase twice). Nodes then hold only \
ciphertext and hashed labels. An unencrypted volume stays unencrypted.

Space: the read-write mount releases what its volume no longer reaches every -o gc seconds; the \
nodes delete a released block after their grace period (default 30 s), so `df` and the nodes' \
disks show freed space about a minute after an rm. A read-only mount reading a file the writer \
replaced meanwhile can see EIO once that grace has passed.";

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

/// Which cluster a mount uses.
pub(super) struct Target {
    /// cluster.toml.
    pub(super) cluster_toml: PathBuf,
    pub(super) cluster_dir: PathBuf,
    /// `Some(data dir)` for the embedded default.
    pub(super) embedded: Option<PathBuf>,
    pub(super) volume: String,
    pub(super) log: PathBuf,
}

impl Target {
    pub(super) fn resolve(args: &MountArgs) -> Result<Target> {
        match &args.cluster {
            Some(toml) => {
                let toml = std::fs::canonicalize(toml)
                    .map_err(|e| UsageError(format!("--cluster {}: {e}", toml.display())))?;
                let cluster_dir = toml.parent().map(Path::to_path_buf).unwrap_or_default();
                Ok(Target {
                    log: cluster_dir.join(format!("mount-{}.log", args.volume)),
                    cluster_toml: toml,
                    cluster_dir,
                    embedded: None,
                    volume: args.volume.clone(),
                })
            }
            None => {
                let data = data_dir(args.data_dir.as_deref())?;
                std::fs::create_dir_all(&data)
                    .with_context(|| format!("creating the data directory {}", data.display()))?;
                let data = std::fs::canonicalize(&data)?;
                let cluster_dir = data.join("cluster");
                Ok(Target {
                    cluster_toml: cluster_dir.join("cluster.toml"),
                    cluster_dir,
                    log: data.join("mount.log"),
                    embedded: Some(data),
                    volume: args.volume.clone(),
                })
            }
        }
    }
}
