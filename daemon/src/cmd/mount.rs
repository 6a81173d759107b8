//! `dbqsfs mount` and `dbqsfs umount`.
//!
//! Goals:
//! - `dbqsfs mount DIR` with nothing else works on a fresh machine: the embedded default is a
//!   local 4-node cluster (f=1, loopback QUIC) under the data directory, created on first use,
//!   started when no mount of it is running, stopped when the last mount of it ends.
//! - Without `-f` the command daemonizes: it starts itself with `-f` in a new session (logs
//!   appended to a file it names), waits until the mount shows up in /proc/self/mountinfo and
//!   exits 0, or reports why the mount failed and exits 1.
//! - With `-f` it stays in the foreground; SIGINT/SIGTERM unmount cleanly; an external unmount
//!   (`dbqsfs umount DIR`, `fusermount3 -u DIR`, `umount DIR`) ends it after it stored everything
//!   buffered, released the volume lease and, for the last mount of the embedded cluster,
//!   stopped its nodes.
//! - Mount processes record themselves in a per-user registry (`$XDG_RUNTIME_DIR/dbqsfs/` or
//!   `/tmp/dbqsfs-<uid>/`), which is how `dbqsfs umount DIR` finds the process to wait for and
//!   how a mount knows whether it is the last one of its cluster.
//!
//! - Run as `mount.fuse.dbqsfs` (a symlink), it is mount(8)'s helper for `-t fuse.dbqsfs`, so
//!   fstab lines work; mount(8)'s generic options are accepted.
//! - SIGINT/SIGTERM at any moment end the mount cleanly (what it started is stopped); a failed
//!   mount removes the mount point it created.
//!
//! Non-goals: clusters on other machines being started or stopped from here.

use super::cluster::{cluster_down, cluster_init, local_addrs, Timing};
use super::common::{data_dir, init_logs, open_log, UsageError};
use super::keys::{self, PASSPHRASE_ENV};
use anyhow::{anyhow, bail, Context, Result};
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions};
use dbqsfs_daemon::files::{self, ClusterInfo};
use dbqsfs_daemon::volume::{
    valid_volume_name, BackendOptions, DbqsBackend, Lease, LeaseError, LeaseTiming,
};
use dbqsfs_fs::crypt::{self, Encrypted, KdfCost, KeyError, Secret};
use dbqsfs_fs::{mounts, Backend, MountOptions};
use zeroize::Zeroizing;

use serde::{Deserialize, Serialize};
use std::io::{Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Nodes and faults of the embedded default cluster.
const EMBEDDED_NODES: u32 = 4;
const EMBEDDED_F: u32 = 1;
/// Default bound on one dBQS operation of a mount (`-o timeout=SECS` changes it).
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a read-only mount forgets its cached inodes (so it sees a read-write mount's
/// changes within this plus the kernel's attribute timeout).
pub const RO_REFRESH: Duration = Duration::from_secs(2);
/// How long `dbqsfs mount` waits for the background mount to appear.
const MOUNT_WAIT: Duration = Duration::from_secs(120);
/// How long `dbqsfs umount` waits for the mount process to finish.
const UMOUNT_WAIT: Duration = Duration::from_secs(300);

/// The parsed `-o` options.
#[derive(Clone, Debug)]
pub struct Opts {
    pub read_only: bool,
    pub allow_other: bool,
    pub nonempty: bool,
    pub fsname: Option<String>,
    pub attr_ttl: Option<Duration>,
    pub entry_ttl: Option<Duration>,
    pub op_timeout: Duration,
    pub threads: Option<usize>,
    /// Chunk size of a volume created by this mount.
    pub chunk_size: Option<u32>,
    /// Commit after every change (`-o sync`).
    pub sync: bool,
    /// Longest time between a change and its commit (`-o commit=MS`).
    pub commit_interval: Duration,
    /// Mount this snapshot of the volume (read-only).
    pub snapshot: Option<String>,
    /// Create the volume encrypted (`-o encrypt`; implied by a key file or passphrase).
    pub encrypt: bool,
    /// The encrypted volume's key file (`-o keyfile=PATH`).
    pub keyfile: Option<PathBuf>,
    /// Read the encrypted volume's passphrase (`-o passphrase`).
    pub passphrase: bool,
    /// Generic kernel flags (`nodev`, `noexec`, `noatime`, ...), passed to the mount.
    pub kernel_flags: Vec<String>,
    /// Serve Prometheus metrics there (`-o metrics=IP:PORT`).
    pub metrics: Option<std::net::SocketAddr>,
}

/// Default of `-o commit=MS`.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

const KNOWN_OPTIONS: &str = "ro, rw, allow_other, default_permissions, nonempty, fsname=NAME, \
    attr_timeout=SECS, entry_timeout=SECS, timeout=SECS, threads=N, chunk_size=BYTES, sync, async, \
    commit=MS, snapshot=NAME, encrypt, keyfile=PATH, passphrase, metrics=IP:PORT; and mount(8)'s \
    generic ones: \
    defaults, dev, nodev, suid, nosuid, exec, noexec, atime, noatime, auto, noauto, user, nouser, \
    _netdev, nofail, relatime, strictatime, nodiratime, x-*, comment=*";

/// Generic options of mount(8) and fstab that mean nothing to a dbqsfs mount (they are for
/// mount(8) itself, systemd or the kernel's atime policy, which FUSE leaves to the filesystem).
const IGNORED_OPTIONS: [&str; 11] = [
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "relatime",
    "strictatime",
    "nodiratime",
];

fn secs(name: &str, v: &str) -> Result<Duration, UsageError> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e6)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| UsageError(format!("-o {name}={v}: expected a number of seconds")))
}

/// Parses `-o` values (each a comma-separated list).
pub fn parse_options(values: &[String]) -> Result<Opts, UsageError> {
    let mut o = Opts {
        read_only: false,
        allow_other: false,
        nonempty: false,
        fsname: None,
        attr_ttl: None,
        entry_ttl: None,
        op_timeout: DEFAULT_OP_TIMEOUT,
        threads: None,
        chunk_size: None,
        sync: false,
        commit_interval: DEFAULT_COMMIT_INTERVAL,
        snapshot: None,
        encrypt: false,
        keyfile: None,
        passphrase: false,
        kernel_flags: Vec::new(),
        metrics: None,
    };
    for item in values.iter().flat_map(|v| v.split(',')) {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        match (k, v) {
            ("", None) => {}
            (k, None) if IGNORED_OPTIONS.contains(&k) => {}
            (k, None) if dbqsfs_fs::fuse::is_kernel_flag(k) => o.kernel_flags.push(k.into()),
            (k, _) if k.starts_with("x-") || k == "comment" => {}
            ("ro", None) => o.read_only = true,
            ("rw", None) => o.read_only = false,
            ("allow_other", None) => o.allow_other = true,
            ("default_permissions", None) => {} // always on
            ("nonempty", None) => o.nonempty = true,
            ("sync", None) => o.sync = true,
            ("async", None) => o.sync = false,
            ("commit", Some(v)) => {
                o.commit_interval = v
                    .parse::<u64>()
                    .ok()
                    .filter(|ms| (1..=3_600_000).contains(ms))
                    .map(Duration::from_millis)
                    .ok_or_else(|| {
                        UsageError(format!("-o commit={v}: expected 1..3600000 milliseconds"))
                    })?
            }
            ("fsname", Some(v)) if !v.is_empty() => o.fsname = Some(v.into()),
            ("snapshot", Some(v)) if !v.is_empty() => o.snapshot = Some(v.into()),
            ("encrypt", None) => o.encrypt = true,
            ("keyfile", Some(v)) if !v.is_empty() => o.keyfile = Some(v.into()),
            ("metrics", Some(v)) => {
                o.metrics = Some(
                    v.parse()
                        .map_err(|_| UsageError(format!("-o metrics={v}: expected IP:PORT")))?,
                )
            }
            ("passphrase", None) => o.passphrase = true,
            ("attr_timeout", Some(v)) => o.attr_ttl = Some(secs(k, v)?),
            ("entry_timeout", Some(v)) => o.entry_ttl = Some(secs(k, v)?),
            ("timeout", Some(v)) => {
                o.op_timeout = secs(k, v)?;
                if o.op_timeout < Duration::from_secs(1) {
                    return Err(UsageError("-o timeout must be at least 1 second".into()));
                }
            }
            ("threads", Some(v)) => {
                o.threads = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| UsageError(format!("-o threads={v}: expected 1..64")))?,
                )
            }
            ("chunk_size", Some(v)) => {
                o.chunk_size = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (512..=1 << 20).contains(n))
                        .ok_or_else(|| {
                            UsageError(format!("-o chunk_size={v}: expected 512..1048576 bytes"))
                        })?,
                )
            }
            _ => {
                return Err(UsageError(format!(
                    "unknown or malformed mount option {item:?}; known options: {KNOWN_OPTIONS}"
                )))
            }
        }
    }
    // A snapshot never changes: it mounts read-only.
    o.read_only |= o.snapshot.is_some();
    if o.keyfile.is_some() && o.passphrase {
        return Err(UsageError(
            "-o keyfile and -o passphrase exclude each other: a volume's key is wrapped by one"
                .into(),
        ));
    }
    if o.encrypt && o.keyfile.is_none() && !o.passphrase {
        return Err(UsageError(
            "-o encrypt needs -o keyfile=PATH or -o passphrase (what will open the volume's key)"
                .into(),
        ));
    }
    Ok(o)
}

/// `path` made absolute with its parent resolved, without touching `path` itself (which may be
/// a dead FUSE mount whose stat fails or hangs).
pub fn mount_path(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Ok(abs);
    };
    let parent = std::fs::canonicalize(parent).with_context(|| {
        format!(
            "{} does not exist: create the mount point first (mkdir -p {})",
            parent.display(),
            abs.display()
        )
    })?;
    Ok(parent.join(name))
}

/// The filesystem type mounted on `path` (the topmost mount), if any.
pub fn mounted_fstype(path: &Path) -> Option<String> {
    mounts::mounted_at(path).map(|m| m.fstype)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// Checks the mount point and FUSE before anything is started; messages say what to do.
/// Sets `created` when it made the mount point (so that a failed mount removes it again).
fn check_mount_point(dir: &Path, opts: &Opts, created: &mut bool) -> Result<()> {
    match std::fs::metadata(dir) {
        // Its parent exists (`mount_path` checked): create the mount point itself.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dir)
                .with_context(|| format!("creating the mount point {}", dir.display()))?;
            *created = true;
            eprintln!("dbqsfs: created the mount point {}", dir.display());
        }
        Err(e) => {
            if let Some(t) = mounted_fstype(dir) {
                bail!(
                    "{} is already a mount point ({t}) that does not answer ({e}); if it is a \
                     dead dbqsfs mount, run `dbqsfs umount {}` first",
                    dir.display(),
                    dir.display()
                );
            }
            bail!("cannot use mount point {}: {e}", dir.display())
        }
        Ok(m) if !m.is_dir() => {
            return Err(
                UsageError(format!("mount point {} is not a directory", dir.display())).into(),
            )
        }
        Ok(_) => {}
    }
    if let Some(t) = mounted_fstype(dir) {
        bail!(
            "{} is already a mount point ({t}); unmount it first (`dbqsfs umount {}`)",
            dir.display(),
            dir.display()
        );
    }
    if !opts.nonempty
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        return Err(UsageError(format!(
            "mount point {} is not empty: use an empty directory, or `-o nonempty` to mount over \
             its contents (they stay hidden until unmount)",
            dir.display()
        ))
        .into());
    }
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "/dev/fuse is missing: load the FUSE module (`modprobe fuse`), or in a container \
             start it with `--device /dev/fuse --cap-add SYS_ADMIN`"
        );
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        if is_root() || e.kind() != std::io::ErrorKind::PermissionDenied {
            bail!("cannot open /dev/fuse: {e}");
        }
        if !in_path("fusermount3") {
            bail!("fuse3 is not installed (no fusermount3 in PATH): install it, e.g. `sudo apt-get install fuse3`");
        }
    }
    if !is_root() && !in_path("fusermount3") {
        bail!("fuse3 is not installed (no fusermount3 in PATH): install it, e.g. `sudo apt-get install fuse3`");
    }
    if opts.allow_other && !is_root() {
        let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
        if !conf.lines().any(|l| l.trim() == "user_allow_other") {
            bail!("-o allow_other needs `user_allow_other` in /etc/fuse.conf (or mount as root)");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The registry of running mounts.

/// One running mount process, as recorded in the registry.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct MountRecord {
    pid: u32,
    mountpoint: PathBuf,
    /// The cluster directory (the directory of cluster.toml).
    cluster_dir: PathBuf,
    /// Whether it is the embedded default (whose nodes the mounts start and stop).
    embedded: bool,
    volume: String,
    read_only: bool,
    log: Option<PathBuf>,
}

fn registry_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        Some(d) => PathBuf::from(d).join("dbqsfs"),
        // SAFETY: getuid has no preconditions.
        None => std::env::temp_dir().join(format!("dbqsfs-{}", unsafe { libc::getuid() })),
    }
}

fn record_path(pid: u32) -> PathBuf {
    registry_dir().join(format!("mount-{pid}.toml"))
}

/// Whether `pid` still runs a `dbqsfs mount` (a zombie or a reused pid does not count).
fn mount_process_alive(pid: u32) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    args.iter().any(|a| a.ends_with(b"dbqsfs")) && args.iter().any(|a| *a == b"mount")
}

fn register(rec: &MountRecord) -> Result<()> {
    let dir = registry_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    files::write_toml(&record_path(rec.pid), rec)?;
    Ok(())
}

fn unregister(pid: u32) {
    let _ = std::fs::remove_file(record_path(pid));
}

/// Every record in the registry, with whether its process is alive.
fn records() -> Vec<(MountRecord, bool)> {
    let Ok(entries) = std::fs::read_dir(registry_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().as_bytes().starts_with(b"mount-"))
        .filter_map(|e| files::read_toml::<MountRecord>(&e.path()).ok())
        .map(|r| {
            let alive = mount_process_alive(r.pid);
            (r, alive)
        })
        .collect()
}

/// Live mounts of the cluster in `cluster_dir`, other than `except`.
fn other_live_mounts(cluster_dir: &Path, except: u32) -> Vec<MountRecord> {
    records()
        .into_iter()
        .filter(|(r, alive)| *alive && r.pid != except && r.cluster_dir == cluster_dir)
        .map(|(r, _)| r)
        .collect()
}

/// An exclusive lock on a file (`File::lock`, an flock(2) on Linux), held until dropped.
struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    fn take(path: &Path) -> Result<FileLock> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(FileLock { _file: f })
    }
}

// ---------------------------------------------------------------------------------------------
// The embedded cluster.

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
fn ensure_embedded_cluster(data: &Path, base_port: Option<u16>) -> Result<PathBuf> {
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
fn cluster_up_subprocess(cdir: &Path) -> Result<()> {
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
fn stop_cluster_if_unused(cdir: &Path, me: u32) {
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

// ---------------------------------------------------------------------------------------------
// mount

/// Entry point of `dbqsfs mount`.
pub fn run_mount(args: MountArgs) -> Result<()> {
    let opts = parse_options(&args.options)?;
    if !valid_volume_name(&args.volume) {
        return Err(UsageError(format!(
            "volume name {:?}: use letters, digits, '-', '_' and '.' (at most 128, not starting with '.')",
            args.volume
        ))
        .into());
    }
    let dir = mount_path(&args.dir).map_err(|e| UsageError(format!("{e:#}")))?;
    let mut created = false;
    let result = mount_on(&args, &opts, &dir, &mut created);
    if result.is_err() && created {
        // Only if still empty: a mount point this command made is not left behind.
        if std::fs::remove_dir(&dir).is_ok() {
            eprintln!("dbqsfs: removed the mount point {} again", dir.display());
        }
    }
    result
}

fn mount_on(args: &MountArgs, opts: &Opts, dir: &Path, created: &mut bool) -> Result<()> {
    check_mount_point(dir, opts, created)?;
    let target = Target::resolve(args)?;
    // Check the key file now, so a wrong path fails here and not in the background.
    if let Some(k) = &opts.keyfile {
        Secret::key_file(k).map_err(|e| UsageError(format!("-o keyfile: {e}")))?;
    }
    if args.foreground {
        init_logs("warn,fuser::mnt=error,dbqsfs=info,dbqsfs_daemon=info,dbqsfs_fs=info");
        foreground(args, opts, dir, &target)
    } else {
        // The background process cannot ask: the passphrase goes to it on its stdin.
        let pass = match opts.passphrase {
            true => Some(keys::passphrase(
                PASSPHRASE_ENV,
                "volume passphrase: ",
                opts.encrypt,
            )?),
            false => None,
        };
        daemonize(args, dir, &target, pass)
    }
}

/// The names under which this program is mount(8)'s helper for `-t fuse.dbqsfs` (a symlink
/// `/sbin/mount.fuse.dbqsfs` to `dbqsfs`), so fstab lines work.
pub const HELPER_NAMES: [&str; 2] = ["mount.fuse.dbqsfs", "mount.dbqsfs"];

/// The `dbqsfs mount` command line for a helper call `mount.fuse.dbqsfs SOURCE DIR [-o OPTIONS]
/// [-n] [-s] [-f] [-v]`, as mount(8) makes it. SOURCE is the volume (`VOLUME` or
/// `dbqsfs:VOLUME`); the options `cluster=FILE` and `data_dir=DIR` pick the cluster as
/// `--cluster` and `--data-dir` do; the rest are mount options. `None` for `-f` (mount(8)'s
/// "fake": do nothing).
pub fn helper_args(
    args: &[std::ffi::OsString],
) -> Result<Option<Vec<std::ffi::OsString>>, UsageError> {
    let usage = || {
        UsageError(
            "usage: mount.fuse.dbqsfs [dbqsfs:]VOLUME DIR [-o OPTIONS] (as mount(8) calls it; \
             OPTIONS may hold cluster=FILE or data_dir=DIR and any `dbqsfs mount` option)"
                .into(),
        )
    };
    let mut positional = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let mut rest = args.iter().skip(1);
    while let Some(a) = rest.next() {
        match a.to_str() {
            Some("-o") => {
                let o = rest.next().and_then(|o| o.to_str()).ok_or_else(usage)?;
                options.extend(o.split(',').map(str::to_string));
            }
            Some("-f") => return Ok(None),
            Some("-n" | "-s" | "-v") => {}
            Some(x) if x.starts_with('-') => return Err(usage()),
            _ => positional.push(a.clone()),
        }
    }
    let [source, dir] = &positional[..] else {
        return Err(usage());
    };
    let source = source.to_str().ok_or_else(usage)?;
    let volume = source.strip_prefix("dbqsfs:").unwrap_or(source);
    let mut cmd: Vec<std::ffi::OsString> = vec!["dbqsfs".into(), "mount".into()];
    let mut kept = Vec::new();
    for o in options {
        match o.split_once('=') {
            Some(("cluster", f)) => cmd.extend(["--cluster".into(), f.into()]),
            Some(("data_dir", d)) => cmd.extend(["--data-dir".into(), d.into()]),
            _ => kept.push(o),
        }
    }
    cmd.extend(["--volume".into(), volume.into()]);
    if !kept.is_empty() {
        cmd.extend(["-o".into(), kept.join(",").into()]);
    }
    cmd.push(dir.clone());
    Ok(Some(cmd))
}

/// Which cluster a mount uses.
struct Target {
    /// cluster.toml.
    cluster_toml: PathBuf,
    cluster_dir: PathBuf,
    /// `Some(data dir)` for the embedded default.
    embedded: Option<PathBuf>,
    volume: String,
    log: PathBuf,
}

impl Target {
    fn resolve(args: &MountArgs) -> Result<Target> {
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

/// Starts `dbqsfs mount ... -f` in a new session and waits for the mount to appear.
fn daemonize(
    args: &MountArgs,
    dir: &Path,
    target: &Target,
    pass: Option<Zeroizing<Vec<u8>>>,
) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the dbqsfs executable")?;
    let log = open_log(&target.log)?;
    let start_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    // The same mount in the foreground, from the parsed arguments (this process may have been
    // called as mount(8)'s helper, with another command line).
    let mut child_args: Vec<std::ffi::OsString> = vec!["mount".into(), "--foreground".into()];
    if let Some(d) = &args.data_dir {
        child_args.extend(["--data-dir".into(), d.into()]);
    }
    if let Some(c) = &args.cluster {
        child_args.extend(["--cluster".into(), c.into()]);
    }
    if let Some(p) = args.base_port {
        child_args.extend(["--base-port".into(), p.to_string().into()]);
    }
    child_args.extend(["--volume".into(), args.volume.clone().into()]);
    for o in &args.options {
        child_args.extend(["-o".into(), o.into()]);
    }
    child_args.push(dir.into());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&child_args)
        .env("DBQSFS_DAEMON_LOG", &target.log)
        .env_remove(PASSPHRASE_ENV)
        .stdin(match pass {
            Some(_) => std::process::Stdio::piped(),
            None => std::process::Stdio::null(),
        })
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount process")?;
    if let (Some(p), Some(mut stdin)) = (pass, child.stdin.take()) {
        use std::io::Write;
        // A child that failed early has closed its stdin; its log says why (below).
        let _ = stdin.write_all(&p).and_then(|_| stdin.write_all(b"\n"));
    }
    let start = Instant::now();
    loop {
        if let Some(t) = mounted_fstype(dir) {
            if t.starts_with("fuse") {
                println!(
                    "mounted volume {:?} on {} (process {}); logs: {}",
                    target.volume,
                    dir.display(),
                    child.id(),
                    target.log.display()
                );
                println!("unmount with: {} umount {}", self_name(), dir.display());
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&target.log) {
                let _ = f.seek(std::io::SeekFrom::Start(start_offset));
                let _ = f.read_to_string(&mut text);
            }
            let text = text.trim();
            // The child printed the error; its last line is the useful one.
            let msg = text
                .lines()
                .rev()
                .find(|l| l.starts_with("dbqsfs: error:"))
                .map(|l| l.trim_start_matches("dbqsfs: error:").trim().to_string())
                .unwrap_or_else(|| format!("the mount process exited with {status}"));
            eprintln!(
                "dbqsfs: the mount failed; its log is {}",
                target.log.display()
            );
            bail!("{msg}");
        }
        if start.elapsed() > MOUNT_WAIT {
            // SAFETY: kill(2) of the child we started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            bail!(
                "{} was not mounted after {:?}; stopped the mount process. See {}",
                dir.display(),
                MOUNT_WAIT,
                target.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How to call this program: `dbqsfs` when that is what PATH finds, else its full path.
fn self_name() -> String {
    let exe = std::env::current_exe().ok();
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("dbqsfs"))
            .find(|c| c.is_file())
    });
    match (exe, on_path) {
        (Some(e), Some(p)) if std::fs::canonicalize(&p).ok() == Some(e.clone()) => "dbqsfs".into(),
        (Some(e), _) => e.display().to_string(),
        (None, _) => "dbqsfs".into(),
    }
}

/// Unmounts `dir` from inside the mount process (on SIGINT/SIGTERM): plain first, lazily if busy.
fn unmount_dir(dir: &Path, lazy: bool) -> std::io::Result<()> {
    if is_root() {
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        // SAFETY: a valid C string; umount2 has no memory effects.
        if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
            return Ok(());
        }
        Err(std::io::Error::last_os_error())
    } else {
        let out = std::process::Command::new("fusermount3")
            .arg(if lazy { "-uz" } else { "-u" })
            .arg(dir)
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        Err(std::io::Error::other(err.trim().to_string()))
    }
}

/// What a foreground mount must undo when it ends, in this order: the registry entry, then
/// (embedded, last mount) the nodes. Runs on every path out of `foreground`.
struct Cleanup {
    pid: u32,
    cluster_dir: PathBuf,
    embedded: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        match &self.embedded {
            Some(data) => {
                let _lock = FileLock::take(&data.join("lock"));
                unregister(self.pid);
                stop_cluster_if_unused(&self.cluster_dir, self.pid);
            }
            None => unregister(self.pid),
        }
    }
}

fn foreground(args: &MountArgs, opts: &Opts, dir: &Path, target: &Target) -> Result<()> {
    let pid = std::process::id();
    let record = MountRecord {
        pid,
        mountpoint: dir.to_path_buf(),
        cluster_dir: target.cluster_dir.clone(),
        embedded: target.embedded.is_some(),
        volume: target.volume.clone(),
        read_only: opts.read_only,
        log: std::env::var_os("DBQSFS_DAEMON_LOG").map(PathBuf::from),
    };
    // SIGINT or SIGTERM at any moment from here on ends the mount cleanly: what was started is
    // stopped (a second one ends the process at once).
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
            .context("installing the signal handlers")?;
    }
    let interrupted = |what: &str| -> Result<()> {
        match stop.load(Ordering::SeqCst) {
            true => bail!("interrupted {what}; stopped what the mount had started"),
            false => Ok(()),
        }
    };
    let cleanup = match &target.embedded {
        Some(data) => {
            let _lock = FileLock::take(&data.join("lock"))?;
            ensure_embedded_cluster(data, args.base_port)?;
            let cleanup = Cleanup {
                pid,
                cluster_dir: target.cluster_dir.clone(),
                embedded: Some(data.clone()),
            };
            register(&record)?;
            cluster_up_subprocess(&target.cluster_dir)?;
            cleanup
        }
        None => {
            register(&record)?;
            Cleanup {
                pid,
                cluster_dir: target.cluster_dir.clone(),
                embedded: None,
            }
        }
    };
    let result = interrupted("while starting the cluster")
        .and_then(|_| secret_of(opts))
        .and_then(|secret| serve(opts, dir, target, secret, &stop));
    drop(cleanup);
    result
}

/// What opens the volume's key, as the options name it (a passphrase from $DBQSFS_PASSPHRASE,
/// the terminal, or a line of stdin: how the background mount gets it).
fn secret_of(opts: &Opts) -> Result<Option<Secret>> {
    Ok(match (&opts.keyfile, opts.passphrase) {
        (Some(k), _) => Some(Secret::key_file(k)?),
        (None, true) => Some(Secret::Passphrase(keys::passphrase(
            PASSPHRASE_ENV,
            "volume passphrase: ",
            opts.encrypt,
        )?)),
        (None, false) => None,
    })
}

/// Connects, takes the lease, mounts, and serves until unmounted or `stop` is set (by SIGINT or
/// SIGTERM).
fn serve(
    opts: &Opts,
    dir: &Path,
    target: &Target,
    secret: Option<Secret>,
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    let info = ClusterInfo::load(&target.cluster_toml)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let handle = rt.handle().clone();
    let client = {
        let _g = rt.enter();
        DbqsClient::connect(
            info.genesis.clone(),
            info.client_key.clone(),
            mount_client_options(opts.op_timeout),
        )?
    };
    let owner = info.client_key.clone();
    let call_timeout = opts.op_timeout + Duration::from_secs(5);
    let new_backend = || {
        DbqsBackend::new(
            client.clone(),
            owner.clone(),
            &target.volume,
            handle.clone(),
            BackendOptions {
                call_timeout,
                ..BackendOptions::default()
            },
        )
    };
    let probe = Arc::new(new_backend());
    let cannot_reach = |e: &dyn std::fmt::Display| {
        anyhow!(
            "cannot reach the cluster of {} ({e}); check that its nodes run (`dbqsfs status \
             --cluster {}`)",
            target.cluster_toml.display(),
            target.cluster_toml.display()
        )
    };
    let plain_exists = probe
        .get_record(dbqsfs_fs::layout::HEAD_LABEL)
        .map_err(|e| cannot_reach(&e))?
        .is_some();
    let encrypted = crypt::is_encrypted(&*probe).map_err(|e| cannot_reach(&e))?;
    let volume_name = &target.volume;
    let key = match (encrypted, &secret) {
        (true, None) => bail!(
            "volume {volume_name:?} is encrypted: mount it with -o keyfile=PATH or -o passphrase"
        ),
        (true, Some(s)) => Some(crypt::open_key(&*probe, s).map_err(|e| match e {
            KeyError::Backend(b) => cannot_reach(&b),
            e => keys::explain(e, volume_name),
        })?),
        (false, Some(_)) if plain_exists => bail!(
            "volume {volume_name:?} exists and is not encrypted; encryption is chosen when a \
             volume is created: leave out -o keyfile/passphrase, or create a new volume with -o \
             encrypt,keyfile=PATH and copy the data over"
        ),
        (false, _) => None,
    };
    let exists = match &key {
        Some(k) => Encrypted::new(probe.clone(), k)
            .get_record(dbqsfs_fs::layout::HEAD_LABEL)
            .map_err(|e| cannot_reach(&e))?
            .is_some(),
        None => plain_exists,
    };
    if !exists && opts.read_only {
        bail!(
            "volume {:?} does not exist yet: mount it read-write once to create it",
            target.volume
        );
    }

    // The lease (read-write mounts only).
    let mut backend = new_backend().with_capacity_updates();
    let mut lease_task = None;
    if !opts.read_only {
        let holder = format!(
            "{} pid {} at {}",
            dbqsfs_daemon::volume::hostname(),
            std::process::id(),
            dir.display()
        );
        let lease = match rt.block_on(Lease::acquire(
            client.clone(),
            owner.clone(),
            &target.volume,
            holder,
            LeaseTiming::default(),
        )) {
            Ok(l) => l,
            Err(e @ LeaseError::Held { .. }) => bail!("{e}"),
            Err(e) => return Err(e.into()),
        };
        backend = backend.with_lease_deadline(lease.writable_until.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let task = rt.spawn(async move {
            let mut lease = lease;
            lease.keep(stop_rx).await;
            lease
        });
        lease_task = Some((stop_tx, task));
    }
    // A new volume with a secret is created encrypted (its key first, after the lease is held).
    let key = match (key, &secret) {
        (None, Some(s)) => {
            tracing::info!(volume = target.volume, "creating the volume's key");
            // Under the lease now, so a read-write mount that created the volume unencrypted
            // since the probe above has finished and its head shows: look again first.
            let created = match backend.get_record(dbqsfs_fs::layout::HEAD_LABEL) {
                Ok(None) => crypt::create_key(&backend, s, KdfCost::default())
                    .map_err(|e| keys::explain(e, volume_name)),
                Ok(Some(_)) => Err(anyhow!(
                    "volume {volume_name:?} was just created unencrypted by another mount; \
                     nothing was changed"
                )),
                Err(e) => Err(cannot_reach(&e)),
            };
            match created {
                Ok(k) => Some(k),
                Err(e) => {
                    release_lease(&rt, lease_task);
                    return Err(e);
                }
            }
        }
        (key, _) => key,
    };
    if !exists {
        tracing::info!(
            volume = target.volume,
            encrypted = key.is_some(),
            "creating the volume"
        );
    }

    let defaults = MountOptions::default();
    let mopts = MountOptions {
        read_only: opts.read_only,
        n_threads: opts.threads.unwrap_or(defaults.n_threads),
        attr_ttl: opts.attr_ttl.unwrap_or(defaults.attr_ttl),
        entry_ttl: opts.entry_ttl.unwrap_or(defaults.entry_ttl),
        allow_other: opts.allow_other,
        kernel_flags: opts.kernel_flags.clone(),
        fsname: opts.fsname.clone().unwrap_or_else(|| match &opts.snapshot {
            Some(s) => format!("dbqsfs:{}@{s}", target.volume),
            None => format!("dbqsfs:{}", target.volume),
        }),
        volume: dbqsfs_fs::VolumeConfig {
            chunk_size: opts.chunk_size,
            sync: opts.sync,
            commit_interval: Some(opts.commit_interval),
            snapshot: opts.snapshot.clone(),
            ..defaults.volume.clone()
        },
        ..defaults
    };
    let stats = backend.stats();
    let fs_backend: Arc<dyn Backend> = match &key {
        Some(k) => Arc::new(Encrypted::new(backend, k)),
        None => Arc::new(backend),
    };
    drop(key);
    let mounted = dbqsfs_fs::mount(fs_backend, dir, mopts);
    let mount = match mounted {
        Ok(m) => m,
        Err(e) => {
            release_lease(&rt, lease_task);
            return Err(anyhow!("{e}")).with_context(|| {
                format!(
                    "mounting on {} failed (is FUSE usable here? as a user, is fuse3 installed \
                     and /dev/fuse accessible?)",
                    dir.display()
                )
            });
        }
    };
    let volume = mount.volume().clone();
    if let Some(addr) = opts.metrics {
        let _g = rt.enter();
        match dbqsfs_daemon::metrics::serve(addr) {
            Ok(()) => {
                let weak = Arc::downgrade(&volume);
                rt.spawn(dbqsfs_daemon::metrics::sample_mount(
                    stats.clone(),
                    move || weak.upgrade().map(|v| v.bytes_written()),
                ));
                tracing::info!(%addr, "serving metrics at /metrics");
            }
            Err(e) => tracing::warn!(%addr, error = %e, "cannot serve metrics; going on without"),
        }
    }
    tracing::info!(
        volume = target.volume,
        dir = %dir.display(),
        read_only = opts.read_only,
        "mounted"
    );

    // SIGINT/SIGTERM (also one that came while starting): unmount; the session then ends like
    // after an external unmount.
    let sig_dir = dir.to_path_buf();
    let stop = stop.clone();
    rt.spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!("unmounting on signal");
        let d = sig_dir.clone();
        let r = tokio::task::spawn_blocking(move || {
            unmount_dir(&d, false).or_else(|_| unmount_dir(&d, true))
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::error!(error = %e, "unmount on signal failed");
        }
    });

    // Read-only: forget cached inodes every RO_REFRESH, so new versions show up.
    let (refresh_stop, refresh_rx) = std::sync::mpsc::channel::<()>();
    let refresher = (opts.read_only && opts.snapshot.is_none()).then(|| {
        let volume = volume.clone();
        std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                refresh_rx.recv_timeout(RO_REFRESH)
            {
                if let Err(e) = volume.refresh() {
                    tracing::warn!(error = %e, "reading the volume's new head failed; retrying");
                }
            }
        })
    });

    let joined = mount.join();
    drop(refresh_stop);
    if let Some(t) = refresher {
        let _ = t.join();
    }
    if let Err(e) = volume.sync_all() {
        tracing::error!(error = %e, "storing buffered data after unmount failed");
    }
    release_lease(&rt, lease_task);
    tracing::info!(
        dir = %dir.display(),
        written_mib = volume.bytes_written() as f64 / (1 << 20) as f64,
        "unmounted; backend calls: {}",
        stats.summary()
    );
    drop(client);
    rt.shutdown_timeout(Duration::from_secs(2));
    joined.context("the FUSE session ended with an error")
}

/// The client options of a mount. A node killed without closing its connections (kill -9, a
/// crash, a cut cable) leaves the client holding a connection that the restarted node no longer
/// knows; it is dropped (and re-dialled) only once nothing was received on it for the idle
/// timeout. Keep-alives every second and a 5 s idle timeout make a mount use a restarted node
/// again within seconds instead of the transport's default 30 s.
pub fn mount_client_options(op_timeout: Duration) -> DbqsClientOptions {
    let defaults = DbqsClientOptions::default();
    DbqsClientOptions {
        op_timeout,
        transport: dbqsfs_net::TransportOptions {
            idle_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(1),
            ..defaults.transport.clone()
        },
        ..defaults
    }
}

type LeaseTask = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Lease>,
);

fn release_lease(rt: &tokio::runtime::Runtime, task: Option<LeaseTask>) {
    let Some((stop, task)) = task else { return };
    let _ = stop.send(());
    match rt.block_on(task) {
        Ok(lease) => {
            if let Err(e) = rt.block_on(lease.release()) {
                tracing::warn!(error = %e, "releasing the volume lease failed; it expires by itself");
            }
        }
        Err(e) => tracing::warn!(error = %e, "the lease keeper failed"),
    }
}

// ---------------------------------------------------------------------------------------------
// umount

/// Entry point of `dbqsfs umount`.
pub fn run_umount(args: UmountArgs) -> Result<()> {
    let dir = mount_path(&args.dir).map_err(|e| UsageError(format!("{e:#}")))?;
    let mounted = mounts::mounted_at(&dir).map(|m| (m.fstype, m.source));
    let recs: Vec<(MountRecord, bool)> = records()
        .into_iter()
        .filter(|(r, _)| r.mountpoint == dir)
        .collect();
    if mounted.is_none() && recs.is_empty() {
        bail!("{} is not mounted", dir.display());
    }
    if let Some((t, source)) = &mounted {
        if !t.starts_with("fuse") {
            bail!(
                "{} is a {t} mount, not dbqsfs: use umount(8)",
                dir.display()
            );
        }
        // A FUSE mount of another filesystem: not ours to unmount.
        if recs.is_empty() && t != mounts::FSTYPE && !source.starts_with("dbqsfs") {
            bail!(
                "{} is a FUSE mount of {source:?} ({t}), not a dbqsfs mount: unmount it with \
                 `fusermount3 -u {}`",
                dir.display(),
                dir.display()
            );
        }
        if let Err(e) = unmount_dir(&dir, args.lazy) {
            if e.raw_os_error() == Some(libc::EBUSY) || e.to_string().contains("busy") {
                bail!(
                    "{} is busy (a process has a file open or its working directory there): \
                     close those, or unmount lazily with `dbqsfs umount --lazy {}`",
                    dir.display(),
                    dir.display()
                );
            }
            bail!("unmounting {}: {e}", dir.display());
        }
    }
    // Wait for the mount processes to store what they buffered and stop.
    let start = Instant::now();
    let mut told = false;
    for (rec, _) in &recs {
        while mount_process_alive(rec.pid) {
            if start.elapsed() > UMOUNT_WAIT {
                bail!(
                    "unmounted, but the mount process {} is still running after {:?}",
                    rec.pid,
                    UMOUNT_WAIT
                );
            }
            if !told && start.elapsed() > Duration::from_secs(2) {
                eprintln!(
                    "waiting for the mount process (pid {}) to store buffered data and stop...",
                    rec.pid
                );
                told = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // A mount process that died without cleaning up (kill -9): clean up for it.
        if std::fs::metadata(record_path(rec.pid)).is_ok() {
            if rec.embedded {
                if let Some(data) = rec.cluster_dir.parent() {
                    let _lock = FileLock::take(&data.join("lock"));
                    unregister(rec.pid);
                    stop_cluster_if_unused(&rec.cluster_dir, rec.pid);
                }
            } else {
                unregister(rec.pid);
            }
        }
    }
    Ok(())
}

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
operation before it returns), async (the default), snapshot=NAME (mount that snapshot of the \
volume, read-only; see `dbqsfs snapshot`), metrics=IP:PORT (Prometheus metrics of the mount's \
calls to the cluster at http://IP:PORT/metrics), and mount(8)'s generic options (defaults, \
_netdev, nofail, noatime, nodev, ...: see the README).

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_parse_and_refuse_unknown_ones() {
        let o =
            parse_options(&["ro,allow_other".into(), "timeout=3,attr_timeout=0".into()]).unwrap();
        assert!(o.read_only && o.allow_other);
        assert_eq!(o.op_timeout, Duration::from_secs(3));
        assert_eq!(o.attr_ttl, Some(Duration::ZERO));
        assert!(parse_options(&["bogus".into()]).is_err());
        assert!(parse_options(&["timeout=x".into()]).is_err());
        assert!(parse_options(&["threads=0".into()]).is_err());
        let o = parse_options(&["sync,commit=250".into()]).unwrap();
        assert!(o.sync);
        assert_eq!(o.commit_interval, Duration::from_millis(250));
        assert!(parse_options(&["commit=0".into()]).is_err());
        let o = parse_options(&["encrypt,keyfile=/k".into()]).unwrap();
        assert!(o.encrypt && o.keyfile == Some(PathBuf::from("/k")) && !o.passphrase);
        assert!(parse_options(&["passphrase".into()]).unwrap().passphrase);
        assert!(
            parse_options(&["encrypt".into()]).is_err(),
            "encrypt needs a secret"
        );
        assert!(parse_options(&["keyfile=/k,passphrase".into()]).is_err());
        assert!(parse_options(&["keyfile=".into()]).is_err());
        let helper = |a: &[&str]| {
            let a: Vec<std::ffi::OsString> = a.iter().map(Into::into).collect();
            helper_args(&a).map(|c| c.map(|c| c.join(std::ffi::OsStr::new(" "))))
        };
        assert_eq!(
            helper(&[
                "mount.fuse.dbqsfs",
                "dbqsfs:v",
                "/m",
                "-o",
                "rw,data_dir=/d,noatime"
            ])
            .unwrap()
            .unwrap(),
            "dbqsfs mount --data-dir /d --volume v -o rw,noatime /m"
        );
        assert_eq!(
            helper(&["mount.fuse.dbqsfs", "v", "/m", "-f"]).unwrap(),
            None
        );
        assert!(helper(&["mount.fuse.dbqsfs", "v"]).is_err());
        let o =
            parse_options(&["defaults,_netdev,nofail,noatime,nodev,x-systemd.automount".into()])
                .unwrap();
        assert_eq!(o.kernel_flags, vec!["noatime", "nodev"]);
    }
}
