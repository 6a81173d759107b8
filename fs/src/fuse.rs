//! The FUSE adapter: fuser 0.18 requests mapped onto `Volume`, and `mount`.
//!
//! Goals: a thin translation with no filesystem logic of its own: decode the request, call the
//! volume, encode the reply, turn `FsError` into an errno. One FUSE node id per inode (node id =
//! inode number), so every name of a hard link shows the same, current attributes. Permission
//! checks are the kernel's (`default_permissions`).
//!
//! Clearing setuid/setgid: the adapter does not negotiate `FUSE_HANDLE_KILLPRIV(_V2)`, so the
//! kernel does it: on write, truncate and chown by a process that should drop the bits, the
//! kernel re-reads the attributes and sends a `SETATTR` with the new mode (in the same request as
//! the owner change for chown). The volume itself clears setgid on chmod by a caller outside the
//! file's group (the rule `setattr_copy` applies on local filesystems, which FUSE leaves to us)
//! and makes new entries of a setgid directory inherit its group.
//!
//! Threading: fuser runs `n_threads` request loops, each on its own cloned `/dev/fuse` fd; each
//! loop calls the volume directly and blocks until it answers, so up to `n_threads` requests are
//! in flight at once (the volume serializes them internally).
//!
//! Non-goals: readdirplus, kernel writeback caching, passthrough, file locks (the kernel keeps
//! POSIX and flock locks locally for one mount), `lseek` with SEEK_DATA/SEEK_HOLE.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

use crate::backend::Backend;
use crate::error::FsError;
use crate::layout::{FileKind, Timestamp};
use crate::mounts::{self, FuseMount, OwnMount};
use crate::volume::{Attr, Cred, SetAttr, TimeSet, Volume, VolumeConfig};

/// How to mount a volume.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Mount read-only: every change fails with `EROFS`.
    pub read_only: bool,
    /// Request loops (each with its own cloned `/dev/fuse` fd).
    pub n_threads: usize,
    /// How long the kernel may cache attributes and names. Short is safe; long is fast.
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    /// Let users other than the mounting one in (`allow_other`; needs root or
    /// `user_allow_other`).
    pub allow_other: bool,
    /// Largest write request the kernel sends.
    pub max_write: u32,
    pub fsname: String,
    /// Generic kernel mount flags (`dev`/`nodev`, `suid`/`nosuid`, `exec`/`noexec`,
    /// `atime`/`noatime`) by their mount(8) names. Without them a root mount is nodev,nosuid.
    pub kernel_flags: Vec<String>,
    pub volume: VolumeConfig,
}

/// Whether [`MountOptions::kernel_flags`] accepts the mount(8) flag `name`.
pub fn is_kernel_flag(name: &str) -> bool {
    kernel_flag(name).is_some()
}

fn kernel_flag(name: &str) -> Option<MountOption> {
    Some(match name {
        "dev" => MountOption::Dev,
        "nodev" => MountOption::NoDev,
        "suid" => MountOption::Suid,
        "nosuid" => MountOption::NoSuid,
        "exec" => MountOption::Exec,
        "noexec" => MountOption::NoExec,
        "atime" => MountOption::Atime,
        "noatime" => MountOption::NoAtime,
        _ => return None,
    })
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            n_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            allow_other: false,
            max_write: 1 << 20,
            fsname: "dbqsfs".into(),
            kernel_flags: Vec::new(),
            volume: VolumeConfig {
                commit_interval: Some(Duration::from_secs(1)),
                ..VolumeConfig::default()
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot open the volume: {0}")]
    Volume(#[from] FsError),
    #[error("cannot mount: {0}")]
    Io(#[from] std::io::Error),
}

/// A mounted volume. Dropping it unmounts (lazily if the mount is busy) and waits for the
/// request loops to finish, after everything buffered has been stored.
pub struct MountHandle {
    session: Option<BackgroundSession>,
    /// The mount, when this process made it itself (as root; see [`crate::mounts`]); otherwise
    /// the session holds fuser's.
    own: Option<OwnMount>,
    volume: Arc<Volume>,
}

impl MountHandle {
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> std::io::Result<()> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        match self.own.take() {
            Some(m) => {
                m.unmount()?;
                s.join()
            }
            None => s.umount_and_join(),
        }
    }

    /// Blocks until someone else unmounts the volume (e.g. `umount DIR`).
    pub fn join(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!("unmount failed: {e}");
        }
    }
}

/// Opens (or formats) the volume in `backend` and mounts it on `dir`. The mount stays until the
/// returned handle is dropped or `unmount`ed, or someone unmounts `dir`.
pub fn mount(
    backend: Arc<dyn Backend>,
    dir: &Path,
    opts: MountOptions,
) -> Result<MountHandle, MountError> {
    let mut vcfg = opts.volume.clone();
    vcfg.read_only |= opts.read_only;
    let volume = Arc::new(Volume::open_or_format(backend, vcfg)?);
    let fs = FuseFs {
        volume: volume.clone(),
        attr_ttl: opts.attr_ttl,
        entry_ttl: opts.entry_ttl,
        max_write: opts.max_write,
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("dbqsfs".into()),
        MountOption::DefaultPermissions,
        if opts.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config
        .mount_options
        .extend(opts.kernel_flags.iter().filter_map(|f| kernel_flag(f)));
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.n_threads.max(1));
    config.clone_fd = true;
    // As root, mount(2) here so the type is `fuse.dbqsfs`; otherwise (or when the kernel says
    // no, as in a user namespace) fuser goes through fusermount3 with the subtype option.
    if rustix::process::geteuid().is_root() {
        let how = FuseMount {
            source: &opts.fsname,
            read_only: opts.read_only,
            allow_other: opts.allow_other,
            kernel_flags: &opts.kernel_flags,
        };
        match mounts::mount_fuse(dir, &how) {
            Ok((fd, own)) => {
                let acl = config.acl;
                let session = fuser::Session::from_fd(fs, fd, acl, config).and_then(|s| s.spawn());
                return match session {
                    Ok(session) => Ok(MountHandle {
                        session: Some(session),
                        own: Some(own),
                        volume,
                    }),
                    Err(e) => {
                        let _ = own.unmount();
                        Err(e.into())
                    }
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(e.into()),
        }
    }
    let session = fuser::spawn_mount(fs, dir, &config)?;
    Ok(MountHandle {
        session: Some(session),
        own: None,
        volume,
    })
}

struct FuseFs {
    volume: Arc<Volume>,
    attr_ttl: Duration,
    entry_ttl: Duration,
    max_write: u32,
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn cred(req: &Request) -> Cred {
    Cred {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Socket => FileType::Socket,
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(Timestamp::from_system(t)),
    }
}

impl FuseFs {
    fn file_attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.blocks,
            atime: a.atime.to_system(),
            mtime: a.mtime.to_system(),
            ctime: a.ctime.to_system(),
            crtime: a.ctime.to_system(),
            kind: file_type(a.kind),
            perm: a.perm,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: 1 << 16,
            flags: 0,
        }
    }

    fn entry(&self, reply: ReplyEntry, r: Result<Attr, FsError>) {
        match r {
            Ok(a) => reply.entry_with_ttls(
                &self.attr_ttl,
                &self.entry_ttl,
                &self.file_attr(&a),
                Generation(0),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn attr(&self, reply: ReplyAttr, r: Result<Attr, FsError>) {
        match r {
            Ok(a) => reply.attr(&self.attr_ttl, &self.file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(data);
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(self.max_write) {
            let _ = config.set_max_write(nearest);
        }
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.volume.sync_all() {
            tracing::error!("storing buffered data at unmount failed: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, self.volume.lookup(parent.0, name.as_bytes()));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.attr(reply, self.volume.getattr(ino.0));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(Timestamp::from_system),
        };
        self.attr(reply, self.volume.setattr(&cred(req), ino.0, &set));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.volume.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.volume
                .mknod(&cred(req), parent.0, name.as_bytes(), mode, rdev),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.volume
                .mkdir(&cred(req), parent.0, name.as_bytes(), mode),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.volume.unlink(parent.0, name.as_bytes()));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.volume.rmdir(parent.0, name.as_bytes()));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.volume.symlink(
            &cred(req),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.volume.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        );
        empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.volume.link(ino.0, newparent.0, newname.as_bytes()),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.volume.open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.volume.read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.volume.write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.volume.flush(ino.0));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.volume.release(fh.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.volume.fsync(ino.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.volume.getattr(ino.0) {
            Ok(a) if a.kind == FileKind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::from_i32(libc::ENOTDIR)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.volume.readdir(ino.0, offset, 256) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        e.offset,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.volume.fsync(ino.0, datasync));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.volume.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.volume.setxattr(ino.0, name.as_bytes(), value, flags),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.volume.getxattr(ino.0, name.as_bytes()) {
            Ok(v) => xattr_reply(reply, size, &v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.volume.listxattr(ino.0) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                xattr_reply(reply, size, &buf);
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.volume.removexattr(ino.0, name.as_bytes()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self
            .volume
            .create(&cred(req), parent.0, name.as_bytes(), mode)
        {
            Ok((a, fh)) => reply.created(
                &self.entry_ttl,
                &self.file_attr(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.volume.fallocate(ino.0, offset, length, mode));
    }
}
