//! The per-user registry of running mount processes (`$XDG_RUNTIME_DIR/dbqsfs/` or
//! `/tmp/dbqsfs-<uid>/`), and the file lock that orders mounts of one embedded cluster.

use anyhow::{Context, Result};
use dbqsfs_daemon::files::{self};

use serde::{Deserialize, Serialize};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One running mount process, as recorded in the registry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct MountRecord {
    pub(super) pid: u32,
    pub(super) mountpoint: PathBuf,
    /// The cluster directory (the directory of cluster.toml).
    pub(super) cluster_dir: PathBuf,
    /// Whether it is the embedded default (whose nodes the mounts start and stop).
    pub(super) embedded: bool,
    pub(super) volume: String,
    pub(super) read_only: bool,
    pub(super) log: Option<PathBuf>,
}

pub(super) fn registry_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        Some(d) => PathBuf::from(d).join("dbqsfs"),
        // SAFETY: getuid has no preconditions.
        None => std::env::temp_dir().join(format!("dbqsfs-{}", unsafe { libc::getuid() })),
    }
}

pub(super) fn record_path(pid: u32) -> PathBuf {
    registry_dir().join(format!("mount-{pid}.toml"))
}

/// Whether `pid` still runs a `dbqsfs mount` (a zombie or a reused pid does not count).
pub(super) fn mount_process_alive(pid: u32) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    args.iter().any(|a| a.ends_with(b"dbqsfs")) && args.iter().any(|a| *a == b"mount")
}

pub(super) fn register(rec: &MountRecord) -> Result<()> {
    let dir = registry_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    files::write_toml(&record_path(rec.pid), rec)?;
    Ok(())
}

pub(super) fn unregister(pid: u32) {
    let _ = std::fs::remove_file(record_path(pid));
}

/// Every record in the registry, with whether its process is alive.
pub(super) fn records() -> Vec<(MountRecord, bool)> {
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
pub(super) fn other_live_mounts(cluster_dir: &Path, except: u32) -> Vec<MountRecord> {
    records()
        .into_iter()
        .filter(|(r, alive)| *alive && r.pid != except && r.cluster_dir == cluster_dir)
        .map(|(r, _)| r)
        .collect()
}

/// An exclusive lock on a file (`File::lock`, an flock(2) on Linux), held until dropped.
pub(super) struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    pub(super) fn take(path: &Path) -> Result<FileLock> {
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
