//! The FUSE mapping, exercised through a real mount and `std::fs`.
//!
//! Each test mounts a `MemBackend` volume on a temporary directory. The `MountHandle` unmounts
//! when dropped, also while a failing test unwinds, so no mount outlives its test. Where
//! `/dev/fuse` cannot be opened (a CI container without FUSE) the tests say so and pass.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use dbqsfs_fs::layout::ROOT_INO;
use dbqsfs_fs::{mount, MemBackend, MountHandle, MountOptions, Volume, VolumeConfig};

fn fuse_available() -> bool {
    let ok = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    if !ok {
        eprintln!("/dev/fuse is not usable here: skipping the mount test");
    }
    ok
}

fn mounted(backend: &MemBackend, dir: &Path, read_only: bool) -> MountHandle {
    let opts = MountOptions {
        read_only,
        n_threads: 2,
        ..MountOptions::default()
    };
    mount(Arc::new(backend.clone()), dir, opts).expect("mount")
}

fn setxattr(path: &Path, name: &str, value: &[u8]) -> i32 {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    }
}

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

#[test]
fn file_operations_through_a_mount_and_persistence_across_remount() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path();
    let backend = MemBackend::new();
    {
        let _mount = mounted(&backend, mnt, false);
        // Files, append, random writes, holes.
        fs::write(mnt.join("hello"), b"hello").unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(mnt.join("hello"))
            .unwrap();
        f.write_all(b", world").unwrap();
        drop(f);
        assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"hello, world");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(mnt.join("sparse"))
            .unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"far").unwrap();
        f.sync_all().unwrap();
        let mut back = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), (3 << 20) + 3);
        assert!(back[..3 << 20].iter().all(|b| *b == 0));
        drop(f);
        // A few MiB of patterned data through large writes.
        let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(mnt.join("big"), &big).unwrap();
        assert_eq!(fs::read(mnt.join("big")).unwrap(), big);
        // Directories, rename, hard links, symlinks.
        fs::create_dir_all(mnt.join("a/b")).unwrap();
        fs::rename(mnt.join("hello"), mnt.join("a/b/hello")).unwrap();
        fs::hard_link(mnt.join("a/b/hello"), mnt.join("a/link")).unwrap();
        let m1 = fs::metadata(mnt.join("a/b/hello")).unwrap();
        let m2 = fs::metadata(mnt.join("a/link")).unwrap();
        assert_eq!((m1.ino(), m1.nlink()), (m2.ino(), 2));
        std::os::unix::fs::symlink("b/hello", mnt.join("a/sym")).unwrap();
        assert_eq!(fs::read(mnt.join("a/sym")).unwrap(), b"hello, world");
        assert_eq!(
            fs::read_link(mnt.join("a/sym")).unwrap(),
            Path::new("b/hello")
        );
        let mut listed: Vec<_> = fs::read_dir(mnt.join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        listed.sort();
        assert_eq!(listed, ["b", "link", "sym"]);
        assert_eq!(
            fs::remove_dir(mnt.join("a")).unwrap_err().raw_os_error(),
            Some(libc::ENOTEMPTY)
        );
        // Attributes and xattrs.
        fs::set_permissions(mnt.join("a/link"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            fs::metadata(mnt.join("a/b/hello")).unwrap().mode() & 0o7777,
            0o600
        );
        assert_eq!(setxattr(&mnt.join("a/link"), "user.color", b"blue"), 0);
        assert_eq!(
            getxattr(&mnt.join("a/b/hello"), "user.color").unwrap(),
            b"blue"
        );
        // An unlinked file stays readable through an open descriptor.
        fs::write(mnt.join("tmp"), b"still here").unwrap();
        let mut open = File::open(mnt.join("tmp")).unwrap();
        fs::remove_file(mnt.join("tmp")).unwrap();
        let mut s = String::new();
        open.read_to_string(&mut s).unwrap();
        assert_eq!(s, "still here");
        // Many entries in one directory.
        fs::create_dir(mnt.join("many")).unwrap();
        for i in 0..600 {
            File::create(mnt.join(format!("many/f{i}"))).unwrap();
        }
        assert_eq!(fs::read_dir(mnt.join("many")).unwrap().count(), 600);
    }
    // Unmounted: a new mount over the same backend sees everything that was closed.
    {
        let _mount = mounted(&backend, mnt, false);
        assert_eq!(fs::read(mnt.join("a/link")).unwrap(), b"hello, world");
        assert_eq!(fs::metadata(mnt.join("big")).unwrap().len(), 5_000_000);
        assert_eq!(
            fs::metadata(mnt.join("sparse")).unwrap().len(),
            (3 << 20) + 3
        );
        assert_eq!(
            getxattr(&mnt.join("a/link"), "user.color").unwrap(),
            b"blue"
        );
        assert!(!mnt.join("tmp").exists());
        assert_eq!(fs::read_dir(mnt.join("many")).unwrap().count(), 600);
    }
    assert!(!fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(mnt.to_str().unwrap()));
}

#[test]
fn a_read_only_mount_refuses_writes_with_erofs() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path();
    let backend = MemBackend::new();
    {
        let _mount = mounted(&backend, mnt, false);
        fs::write(mnt.join("f"), b"data").unwrap();
    }
    let _mount = mounted(&backend, mnt, true);
    assert_eq!(fs::read(mnt.join("f")).unwrap(), b"data");
    let e = OpenOptions::new()
        .write(true)
        .custom_flags(0)
        .open(mnt.join("f"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        fs::create_dir(mnt.join("d")).unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
}

#[test]
fn a_failed_cluster_surfaces_as_eio_and_the_mount_keeps_answering() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path();
    let backend = MemBackend::new();
    let _mount = mounted(&backend, mnt, false);
    fs::write(mnt.join("before"), b"durable").unwrap();
    backend.set_failure(dbqsfs_fs::Failure::Unavailable);
    // Changes apply at once; the fsync that must commit them reports the failure.
    fs::create_dir(mnt.join("d")).unwrap();
    let mut f = OpenOptions::new()
        .write(true)
        .open(mnt.join("before"))
        .unwrap();
    f.write_all(b"lost?").unwrap();
    assert_eq!(f.sync_all().unwrap_err().raw_os_error(), Some(libc::EIO));
    backend.set_failure(dbqsfs_fs::Failure::NoSpace);
    assert_eq!(f.sync_all().unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    backend.set_failure(dbqsfs_fs::Failure::None);
    // Nothing applied was lost: the next fsync commits all of it.
    f.sync_all().unwrap();
    drop(f);
    assert!(mnt.join("d").is_dir());
    assert_eq!(fs::read(mnt.join("before")).unwrap(), b"lost?le");
    let fresh = Volume::open_or_format(Arc::new(backend.clone()), VolumeConfig::default()).unwrap();
    let d = fresh.lookup(ROOT_INO, b"d").unwrap();
    assert_eq!(d.kind, dbqsfs_fs::FileKind::Dir);
}

#[test]
fn concurrent_writers_through_several_request_threads() {
    if !fuse_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().to_path_buf();
    let backend = MemBackend::new();
    let _mount = mounted(&backend, &mnt, false);
    let workers: Vec<_> = (0..4u8)
        .map(|t| {
            let dir = mnt.join(format!("w{t}"));
            std::thread::spawn(move || {
                fs::create_dir(&dir).unwrap();
                for i in 0..50u32 {
                    let body: Vec<u8> = (0..(i * 997) % 70_000).map(|j| (j as u8) ^ t).collect();
                    fs::write(dir.join(format!("f{i}")), &body).unwrap();
                    assert_eq!(fs::read(dir.join(format!("f{i}"))).unwrap(), body);
                }
                fs::read_dir(&dir).unwrap().count()
            })
        })
        .collect();
    for w in workers {
        assert_eq!(w.join().unwrap(), 50);
    }
}
