//! `dbqsfs umount`.

use super::args::UmountArgs;
use super::embedded::stop_cluster_if_unused;
use super::point::{mount_path, unmount_dir};
use super::registry::{
    mount_process_alive, record_path, records, unregister, FileLock, MountRecord,
};
use crate::cmd::common::UsageError;
use anyhow::{bail, Result};
use dbqsfs_fs::mounts;

use std::time::{Duration, Instant};

/// How long `dbqsfs umount` waits for the mount process to finish.
const UMOUNT_WAIT: Duration = Duration::from_secs(300);

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
