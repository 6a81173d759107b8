//! The kernel's side of a mount: what `/proc/self/mountinfo` says is mounted where, and the
//! mount(2) of a FUSE connection with the type `fuse.dbqsfs`.
//!
//! Goals: a dbqsfs mount shows as `fuse.dbqsfs` in `/proc/mounts`, `mount(8)` and `df -T`, as FUSE
//! filesystems mounted through libfuse do (fuser's own mount(2) as root names every filesystem
//! plain `fuse`; through fusermount3, for users, its `subtype=` option does it); and unmounting
//! touches only the mount this process made, never a later one on the same directory.
//! Non-goals: `fuseblk`, mounting as a user without fusermount3 (the FUSE crate does that).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

/// The filesystem type of every dbqsfs mount.
pub const FSTYPE: &str = "fuse.dbqsfs";

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mounted {
    /// The mount's id: unique among the mounts that exist at one time.
    pub id: u64,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// The topmost mount on `path` (an absolute path without symlinks), if any.
pub fn mounted_at(path: &Path) -> Option<Mounted> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    info.lines()
        .rev()
        .filter_map(parse_line)
        .find(|m| m.mount_point.as_os_str().as_bytes() == want)
}

/// Parses a mountinfo line: `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [TAGS...] - TYPE SOURCE
/// SUPER_OPTIONS`, paths with the kernel's octal escapes (`\040` for a space).
fn parse_line(line: &str) -> Option<Mounted> {
    let (head, tail) = line.split_once(" - ")?;
    let mut h = head.split(' ');
    let id = h.next()?.parse().ok()?;
    let mount_point = h.nth(3)?;
    let mut t = tail.split(' ');
    let fstype = t.next()?.to_string();
    let source = String::from_utf8_lossy(&unescape(t.next().unwrap_or_default())).into_owned();
    Some(Mounted {
        id,
        mount_point: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(mount_point))),
        fstype,
        source,
    })
}

/// Undoes mountinfo's octal escapes.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// A FUSE mount this process made with mount(2); [`OwnMount::unmount`] undoes exactly it.
#[derive(Debug)]
pub struct OwnMount {
    dir: PathBuf,
    id: Option<u64>,
}

/// What the kernel is told about a mount.
pub struct FuseMount<'a> {
    /// Shown as the mount's source (`dbqsfs:VOLUME`).
    pub source: &'a str,
    pub read_only: bool,
    pub allow_other: bool,
    /// `dev`, `suid`, `exec`, `atime` and their `no` forms; without `dev`/`suid` a mount is
    /// `nodev,nosuid`, as fusermount3 makes it.
    pub kernel_flags: &'a [String],
}

/// Mounts a new FUSE connection of type [`FSTYPE`] on `dir` (needs `CAP_SYS_ADMIN`): returns the
/// `/dev/fuse` descriptor for the session and the mount. `Err` with `PermissionDenied` when the
/// kernel refuses (then fusermount3 is the way).
pub fn mount_fuse(dir: &Path, how: &FuseMount) -> io::Result<(OwnedFd, OwnMount)> {
    use rustix::fs::{Mode, OFlags};
    let dir = std::fs::canonicalize(dir)?;
    let fd = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    let root_mode = rustix::fs::stat(&dir)?.st_mode & libc::S_IFMT;
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={},group_id={},default_permissions",
        fd.as_raw_fd(),
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    if how.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MountFlags::NODEV | MountFlags::NOSUID;
    if how.read_only {
        flags |= MountFlags::RDONLY;
    }
    for f in how.kernel_flags {
        match f.as_str() {
            "dev" => flags.remove(MountFlags::NODEV),
            "nodev" => flags |= MountFlags::NODEV,
            "suid" => flags.remove(MountFlags::NOSUID),
            "nosuid" => flags |= MountFlags::NOSUID,
            "exec" => flags.remove(MountFlags::NOEXEC),
            "noexec" => flags |= MountFlags::NOEXEC,
            "atime" => flags.remove(MountFlags::NOATIME),
            "noatime" => flags |= MountFlags::NOATIME,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("not a kernel mount flag: {other}"),
                ))
            }
        }
    }
    let data = std::ffi::CString::new(data).map_err(io::Error::other)?;
    rustix::mount::mount(how.source, &dir, FSTYPE, flags, data.as_c_str())?;
    let id = mounted_at(&dir)
        .filter(|m| m.fstype == FSTYPE)
        .map(|m| m.id);
    Ok((fd, OwnMount { dir, id }))
}

/// umount(2) of `dir` (needs `CAP_SYS_ADMIN`); `lazy` detaches it at once even if busy.
pub fn unmount(dir: &Path, lazy: bool) -> io::Result<()> {
    let flags = if lazy {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    Ok(rustix::mount::unmount(dir, flags)?)
}

impl OwnMount {
    /// Unmounts, if the mount this process made is still the one on its directory (someone may
    /// have unmounted it, and mounted something else there since).
    pub fn unmount(&self) -> io::Result<()> {
        match (mounted_at(&self.dir), self.id) {
            (Some(m), Some(id)) if m.id == id => unmount(&self.dir, false),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_and_escapes() {
        let line = r"36 35 0:53 / /mnt/a\040b rw,nosuid,nodev shared:1 - fuse.dbqsfs dbqsfs:v\040x rw,user_id=0";
        let m = parse_line(line).unwrap();
        assert_eq!(m.id, 36);
        assert_eq!(m.mount_point, Path::new("/mnt/a b"));
        assert_eq!(m.fstype, "fuse.dbqsfs");
        assert_eq!(m.source, "dbqsfs:v x");
        assert_eq!(unescape(r"/plain"), b"/plain");
        assert_eq!(unescape(r"/x\"), b"/x\\");
        assert!(parse_line("garbage").is_none());
    }
}
