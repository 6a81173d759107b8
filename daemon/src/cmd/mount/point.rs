//! The mount point: its path, whether something is mounted there, whether it may be used, and
//! unmounting it.

use super::options::Opts;
use crate::cmd::common::UsageError;
use anyhow::{bail, Context, Result};
use dbqsfs_fs::mounts;

use std::path::{Path, PathBuf};

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
pub(super) fn check_mount_point(dir: &Path, opts: &Opts, created: &mut bool) -> Result<()> {
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

/// Unmounts `dir` from inside the mount process (on SIGINT/SIGTERM): plain first, lazily if busy.
pub(super) fn unmount_dir(dir: &Path, lazy: bool) -> std::io::Result<()> {
    if is_root() {
        dbqsfs_fs::mounts::unmount(dir, lazy)
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
