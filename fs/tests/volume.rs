//! Specifications of `Volume` over `MemBackend`, without a mount.

use std::sync::Arc;

use dbqsfs_fs::layout::{HEAD_LABEL, ROOT_INO};
use dbqsfs_fs::{
    Backend, Cred, Failure, FileKind, MemBackend, SetAttr, TimeSet, Timestamp, Volume, VolumeConfig,
};

const ROOT: u64 = ROOT_INO;
const ME: Cred = Cred::ROOT;

fn volume_with(cfg: VolumeConfig) -> (MemBackend, Volume) {
    let backend = MemBackend::new();
    let vol = Volume::open_or_format(Arc::new(backend.clone()), cfg).unwrap();
    (backend, vol)
}

fn volume() -> (MemBackend, Volume) {
    volume_with(VolumeConfig::default())
}

fn reopen(backend: &MemBackend) -> Volume {
    Volume::open_or_format(Arc::new(backend.clone()), VolumeConfig::default()).unwrap()
}

fn errno<T: std::fmt::Debug>(r: dbqsfs_fs::FsResult<T>) -> i32 {
    r.expect_err("expected an error").errno()
}

fn create_file(vol: &Volume, parent: u64, name: &str, data: &[u8]) -> u64 {
    let (attr, fh) = vol.create(&ME, parent, name.as_bytes(), 0o644).unwrap();
    vol.write(attr.ino, 0, data).unwrap();
    vol.release(fh).unwrap();
    attr.ino
}

fn names(vol: &Volume, dir: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut off = 0;
    loop {
        let batch = vol.readdir(dir, off, 100).unwrap();
        if batch.is_empty() {
            break;
        }
        for e in batch {
            off = e.offset;
            out.push(String::from_utf8(e.name).unwrap());
        }
    }
    out
}

#[test]
fn fresh_volume_has_an_empty_root_directory() {
    let (_, vol) = volume();
    let root = vol.getattr(ROOT).unwrap();
    assert_eq!(
        (root.kind, root.nlink, root.perm),
        (FileKind::Dir, 2, 0o755)
    );
    assert_eq!(names(&vol, ROOT), [".", ".."]);
}

#[test]
fn written_data_reads_back_and_holes_read_as_zeros() {
    let cfg = VolumeConfig {
        chunk_size: Some(4096),
        ..VolumeConfig::default()
    };
    let (_, vol) = volume_with(cfg);
    let (a, fh) = vol.create(&ME, ROOT, b"f", 0o644).unwrap();
    vol.write(a.ino, 10_000, b"tail").unwrap();
    vol.write(a.ino, 2, b"head").unwrap();
    assert_eq!(vol.getattr(a.ino).unwrap().size, 10_004);
    let data = vol.read(a.ino, 0, 20_000).unwrap();
    assert_eq!(data.len(), 10_004);
    assert_eq!(&data[2..6], b"head");
    assert!(data[6..10_000].iter().all(|b| *b == 0));
    assert_eq!(&data[10_000..], b"tail");
    vol.release(fh).unwrap();
}

#[test]
fn unlinked_open_file_keeps_data_until_last_close() {
    let (backend, vol) = volume();
    let ino = create_file(&vol, ROOT, "f", b"keep me");
    let fh1 = vol.open(ino, libc::O_RDWR).unwrap();
    let fh2 = vol.open(ino, libc::O_RDONLY).unwrap();
    vol.unlink(ROOT, b"f").unwrap();
    assert_eq!(errno(vol.lookup(ROOT, b"f")), libc::ENOENT);
    assert_eq!(vol.getattr(ino).unwrap().nlink, 0);
    vol.write(ino, 7, b"!").unwrap();
    vol.release(fh1).unwrap();
    assert_eq!(vol.read(ino, 0, 100).unwrap(), b"keep me!");
    vol.release(fh2).unwrap();
    assert_eq!(errno(vol.getattr(ino)), libc::ENOENT);
    assert_eq!(errno(reopen(&backend).lookup(ROOT, b"f")), libc::ENOENT);
}

#[test]
fn a_create_in_a_large_directory_commits_one_small_segment_and_the_head() {
    let (backend, vol) = volume();
    let dir = vol.mkdir(&ME, ROOT, b"big", 0o755).unwrap().ino;
    for i in 0..10_000 {
        vol.mknod(
            &ME,
            dir,
            format!("file-{i}").as_bytes(),
            libc::S_IFREG | 0o644,
            0,
        )
        .unwrap();
    }
    vol.sync_all().unwrap();
    let before = backend.counts();
    let chunks_before = backend.chunk_count();
    vol.mknod(&ME, dir, b"one-more", libc::S_IFREG | 0o644, 0)
        .unwrap();
    assert_eq!(
        backend.counts(),
        before,
        "nothing is stored before a commit"
    );
    vol.fsync(dir, false).unwrap();
    let after = backend.counts();
    assert_eq!(after.put_record - before.put_record, 1, "one head write");
    assert_eq!(
        after.put_chunk - before.put_chunk,
        0,
        "the operations ride in the head's tail"
    );
    assert_eq!(backend.chunk_count(), chunks_before);
    assert!(backend.peek_record(HEAD_LABEL).unwrap().value.len() < 1024);
    assert_eq!(vol.lookup(dir, b"file-1234").unwrap().kind, FileKind::File);
    assert_eq!(names(&reopen(&backend), dir).len(), 10_003);
}

#[test]
fn readdir_offsets_survive_inserts_and_removals() {
    let (_, vol) = volume();
    let dir = vol.mkdir(&ME, ROOT, b"d", 0o755).unwrap().ino;
    for i in 0..600 {
        vol.mknod(
            &ME,
            dir,
            format!("n{i}").as_bytes(),
            libc::S_IFREG | 0o644,
            0,
        )
        .unwrap();
    }
    let first = vol.readdir(dir, 0, 300).unwrap();
    let resume = first.last().unwrap().offset;
    let seen: Vec<String> = first
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect();
    // Change the directory between two readdir calls: remove some seen and unseen names, add
    // new ones (enough to split buckets).
    for i in (0..600).step_by(7) {
        vol.unlink(dir, format!("n{i}").as_bytes()).unwrap();
    }
    for i in 0..400 {
        vol.mknod(
            &ME,
            dir,
            format!("new{i}").as_bytes(),
            libc::S_IFREG | 0o644,
            0,
        )
        .unwrap();
    }
    let mut rest = Vec::new();
    let mut off = resume;
    loop {
        let batch = vol.readdir(dir, off, 50).unwrap();
        let Some(last) = batch.last() else { break };
        off = last.offset;
        rest.extend(
            batch
                .into_iter()
                .map(|e| String::from_utf8(e.name).unwrap()),
        );
    }
    for name in &rest {
        assert!(!seen.contains(name), "{name} listed twice");
    }
    for i in 0..600 {
        let name = format!("n{i}");
        if i % 7 != 0 {
            assert!(
                seen.contains(&name) || rest.contains(&name),
                "{name} skipped"
            );
        }
    }
}

#[test]
fn fsync_makes_buffered_data_durable_for_a_fresh_volume() {
    let (backend, vol) = volume();
    let (a, fh) = vol.create(&ME, ROOT, b"f", 0o644).unwrap();
    vol.write(a.ino, 0, b"buffered").unwrap();
    let fresh = reopen(&backend);
    assert_eq!(
        errno(fresh.getattr(a.ino)),
        libc::ENOENT,
        "not committed yet"
    );
    vol.fsync(a.ino, false).unwrap();
    let fresh = reopen(&backend);
    assert_eq!(fresh.read(a.ino, 0, 100).unwrap(), b"buffered");
    vol.release(fh).unwrap();
}

#[test]
fn failed_flush_leaves_the_old_contents_visible_and_can_be_retried() {
    let cfg = VolumeConfig {
        chunk_size: Some(4096),
        ..VolumeConfig::default()
    };
    let (backend, vol) = volume_with(cfg);
    let ino = create_file(&vol, ROOT, "f", &[1u8; 3 * 4096]);
    vol.fsync(ino, false).unwrap();
    vol.write(ino, 0, &[2u8; 3 * 4096]).unwrap();
    backend.set_failure(Failure::UnavailableAfter(1)); // one chunk lands, then the cluster is gone
    assert_eq!(errno(vol.fsync(ino, false)), libc::EIO);
    backend.set_failure(Failure::None);
    assert_eq!(
        reopen(&backend).read(ino, 0, 3 * 4096).unwrap(),
        vec![1u8; 3 * 4096]
    );
    assert_eq!(
        vol.read(ino, 0, 3 * 4096).unwrap(),
        vec![2u8; 3 * 4096],
        "buffered data is not lost"
    );
    vol.fsync(ino, false).unwrap();
    assert_eq!(
        reopen(&backend).read(ino, 0, 3 * 4096).unwrap(),
        vec![2u8; 3 * 4096]
    );
}

#[test]
fn backend_failures_surface_at_fsync_and_the_batch_waits_for_the_next_commit() {
    let (backend, vol) = volume();
    backend.set_failure(Failure::Unavailable);
    vol.mkdir(&ME, ROOT, b"d", 0o755).unwrap();
    assert_eq!(errno(vol.fsync(ROOT, false)), libc::EIO);
    backend.set_failure(Failure::NoSpace);
    let f = vol
        .mknod(&ME, ROOT, b"f", libc::S_IFREG | 0o644, 0)
        .unwrap();
    assert_eq!(errno(vol.fsync(ROOT, false)), libc::ENOSPC);
    vol.write(f.ino, 0, b"data").unwrap();
    backend.set_failure(Failure::UnavailableAfter(1)); // the data chunk lands, the head does not
    assert_eq!(errno(vol.fsync(ROOT, false)), libc::EIO);
    backend.set_failure(Failure::None);
    assert_eq!(names(&vol, ROOT), [".", "..", "d", "f"]);
    assert_eq!(names(&reopen(&backend), ROOT), [".", ".."]);
    vol.fsync(ROOT, false).unwrap();
    let again = reopen(&backend);
    assert_eq!(names(&again, ROOT), [".", "..", "d", "f"]);
    assert_eq!(again.read(f.ino, 0, 10).unwrap(), b"data");
}

#[test]
fn a_batch_that_cannot_commit_stops_growing() {
    let cfg = VolumeConfig {
        journal_ops: 10,
        ..VolumeConfig::default()
    };
    let (backend, vol) = volume_with(cfg);
    backend.set_failure(Failure::Unavailable);
    let mut made = 0;
    for i in 0..100 {
        match vol.mknod(
            &ME,
            ROOT,
            format!("f{i}").as_bytes(),
            libc::S_IFREG | 0o644,
            0,
        ) {
            Ok(_) => made += 1,
            Err(e) => {
                assert_eq!(e.errno(), libc::EIO);
                break;
            }
        }
    }
    assert!(
        made < 30,
        "{made} creates joined a batch that cannot commit"
    );
    backend.set_failure(Failure::None);
    vol.fsync(ROOT, false).unwrap();
    assert_eq!(names(&reopen(&backend), ROOT).len(), made + 2);
}

#[test]
fn a_file_past_4_gib_reads_back_after_reopening() {
    let (backend, vol) = volume();
    let (a, fh) = vol.create(&ME, ROOT, b"huge", 0o644).unwrap();
    let gib = 1u64 << 30;
    let offsets: Vec<u64> = (0..200).map(|i| i * (5 * gib / 200) + 17).collect();
    for (i, off) in offsets.iter().enumerate() {
        vol.write(a.ino, *off, format!("piece {i}").as_bytes())
            .unwrap();
    }
    vol.write(a.ino, 5 * gib, b"end").unwrap();
    vol.release(fh).unwrap();
    vol.sync_all().unwrap();
    let fresh = reopen(&backend);
    assert_eq!(fresh.getattr(a.ino).unwrap().size, 5 * gib + 3);
    for (i, off) in offsets.iter().enumerate() {
        let want = format!("piece {i}");
        assert_eq!(
            fresh.read(a.ino, *off, want.len() as u32).unwrap(),
            want.as_bytes()
        );
    }
    assert_eq!(fresh.read(a.ino, 5 * gib - 2, 10).unwrap(), b"\0\0end");
    fresh
        .setattr(
            &ME,
            a.ino,
            &SetAttr {
                size: Some(1000),
                ..SetAttr::default()
            },
        )
        .unwrap();
    fresh.fsync(a.ino, false).unwrap();
    assert_eq!(&reopen(&backend).read(a.ino, 17, 7).unwrap(), b"piece 0");
}

#[test]
fn a_batch_of_creates_costs_one_head_write_and_numbers_are_never_reused() {
    let (backend, vol) = volume();
    let before = backend.peek_record(HEAD_LABEL).unwrap().version;
    for i in 0..100 {
        vol.mknod(
            &ME,
            ROOT,
            format!("f{i}").as_bytes(),
            libc::S_IFREG | 0o644,
            0,
        )
        .unwrap();
    }
    vol.fsync(ROOT, false).unwrap();
    assert_eq!(backend.peek_record(HEAD_LABEL).unwrap().version - before, 1);
    let fresh = reopen(&backend);
    let newest = fresh
        .mknod(&ME, ROOT, b"after", libc::S_IFREG | 0o644, 0)
        .unwrap()
        .ino;
    assert!(newest > vol.lookup(ROOT, b"f99").unwrap().ino);
}

#[test]
fn a_volume_of_format_1_is_refused_with_both_formats_named() {
    let backend = MemBackend::new();
    backend.put_record(b"super", 1, b"old").unwrap();
    let e = Volume::open_or_format(Arc::new(backend), VolumeConfig::default())
        .err()
        .expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("format 1") && msg.contains("format 2"),
        "{msg}"
    );
}

#[test]
fn checkpoints_bound_the_journal_and_reopening_reads_checkpoint_and_journal() {
    let cfg = VolumeConfig {
        checkpoint_segments: 4,
        ..VolumeConfig::default()
    };
    let (backend, vol) = volume_with(cfg);
    for i in 0..20u32 {
        let ino = create_file(&vol, ROOT, &format!("f{i}"), &i.to_le_bytes());
        vol.fsync(ino, false).unwrap();
        let head = dbqsfs_fs::layout::Head::decode(&backend.peek_record(HEAD_LABEL).unwrap().value)
            .unwrap();
        assert!(
            head.journal.len() < 4,
            "journal of {} segments",
            head.journal.len()
        );
    }
    let fresh = reopen(&backend);
    for i in 0..20u32 {
        let ino = fresh.lookup(ROOT, format!("f{i}").as_bytes()).unwrap().ino;
        assert_eq!(fresh.read(ino, 0, 4).unwrap(), i.to_le_bytes());
    }
}

#[test]
fn rename_of_a_directory_into_its_own_subtree_is_einval() {
    let (_, vol) = volume();
    let a = vol.mkdir(&ME, ROOT, b"a", 0o755).unwrap().ino;
    let b = vol.mkdir(&ME, a, b"b", 0o755).unwrap().ino;
    assert_eq!(errno(vol.rename(ROOT, b"a", b, b"x", 0)), libc::EINVAL);
    assert_eq!(errno(vol.rename(ROOT, b"a", a, b"x", 0)), libc::EINVAL);
    vol.mkdir(&ME, ROOT, b"c", 0o755).unwrap();
    assert_eq!(
        errno(vol.rename(a, b"b", ROOT, b"a", 0)),
        libc::ENOTEMPTY,
        "target is the source's parent"
    );
}

#[test]
fn rename_noreplace_and_exchange() {
    let (_, vol) = volume();
    let f = create_file(&vol, ROOT, "f", b"f");
    let d = vol.mkdir(&ME, ROOT, b"d", 0o755).unwrap().ino;
    let g = create_file(&vol, d, "g", b"g");
    assert_eq!(
        errno(vol.rename(ROOT, b"f", d, b"g", libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    assert_eq!(
        errno(vol.rename(ROOT, b"f", d, b"none", libc::RENAME_EXCHANGE)),
        libc::ENOENT
    );
    vol.rename(ROOT, b"f", d, b"g", libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(vol.lookup(ROOT, b"f").unwrap().ino, g);
    assert_eq!(vol.lookup(d, b"g").unwrap().ino, f);
    // Exchanging a directory with a file across directories moves the link counts.
    let sub = vol.mkdir(&ME, d, b"sub", 0o755).unwrap().ino;
    assert_eq!(vol.getattr(d).unwrap().nlink, 3);
    vol.rename(d, b"sub", ROOT, b"f", libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(vol.getattr(d).unwrap().nlink, 2);
    assert_eq!(vol.getattr(ROOT).unwrap().nlink, 4);
    assert_eq!(
        vol.readdir(sub, 1, 1).unwrap()[0].ino,
        ROOT,
        "`..` follows the move"
    );
}

#[test]
fn rename_over_an_existing_name_replaces_it() {
    let (_, vol) = volume();
    let f = create_file(&vol, ROOT, "f", b"new");
    let old = create_file(&vol, ROOT, "old", b"old");
    vol.link(old, ROOT, b"old2").unwrap();
    vol.rename(ROOT, b"f", ROOT, b"old", 0).unwrap();
    assert_eq!(vol.lookup(ROOT, b"old").unwrap().ino, f);
    assert_eq!(
        vol.getattr(old).unwrap().nlink,
        1,
        "the other name of the replaced file stays"
    );
    let d1 = vol.mkdir(&ME, ROOT, b"d1", 0o755).unwrap().ino;
    vol.mkdir(&ME, ROOT, b"d2", 0o755).unwrap();
    create_file(&vol, d1, "x", b"");
    assert_eq!(
        errno(vol.rename(ROOT, b"d2", ROOT, b"d1", 0)),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(vol.rename(ROOT, b"old", ROOT, b"d1", 0)),
        libc::EISDIR
    );
    assert_eq!(
        errno(vol.rename(ROOT, b"d1", ROOT, b"old", 0)),
        libc::ENOTDIR
    );
    vol.unlink(d1, b"x").unwrap();
    vol.rename(ROOT, b"d2", ROOT, b"d1", 0).unwrap();
    assert_eq!(vol.getattr(ROOT).unwrap().nlink, 3);
}

#[test]
fn hard_links_share_one_inode_and_its_ctime() {
    let (_, vol) = volume();
    let f = create_file(&vol, ROOT, "f", b"x");
    let d = vol.mkdir(&ME, ROOT, b"d", 0o755).unwrap().ino;
    let before = vol.getattr(f).unwrap().ctime;
    std::thread::sleep(std::time::Duration::from_millis(2));
    let linked = vol.link(f, d, b"g").unwrap();
    assert_eq!((linked.ino, linked.nlink), (f, 2));
    assert!(linked.ctime > before);
    assert_eq!(
        vol.lookup(d, b"g").unwrap(),
        vol.lookup(ROOT, b"f").unwrap()
    );
    assert_eq!(errno(vol.link(d, ROOT, b"dirlink")), libc::EPERM);
    assert_eq!(errno(vol.link(f, d, b"g")), libc::EEXIST);
}

#[test]
fn rmdir_of_a_non_empty_directory_is_enotempty() {
    let (_, vol) = volume();
    let d = vol.mkdir(&ME, ROOT, b"d", 0o755).unwrap().ino;
    create_file(&vol, d, "f", b"");
    assert_eq!(errno(vol.rmdir(ROOT, b"d")), libc::ENOTEMPTY);
    assert_eq!(errno(vol.unlink(ROOT, b"d")), libc::EISDIR);
    assert_eq!(errno(vol.rmdir(d, b"f")), libc::ENOTDIR);
    vol.unlink(d, b"f").unwrap();
    vol.rmdir(ROOT, b"d").unwrap();
    assert_eq!(
        errno(vol.mknod(&ME, d, b"late", libc::S_IFREG | 0o644, 0)),
        libc::ENOENT
    );
    assert_eq!(vol.getattr(ROOT).unwrap().nlink, 2);
}

#[test]
fn truncate_shrinks_and_grows_with_zeros() {
    let cfg = VolumeConfig {
        chunk_size: Some(4096),
        ..VolumeConfig::default()
    };
    let (backend, vol) = volume_with(cfg);
    let f = create_file(&vol, ROOT, "f", &[7u8; 10_000]);
    vol.setattr(
        &ME,
        f,
        &SetAttr {
            size: Some(5000),
            ..SetAttr::default()
        },
    )
    .unwrap();
    vol.setattr(
        &ME,
        f,
        &SetAttr {
            size: Some(12_000),
            ..SetAttr::default()
        },
    )
    .unwrap();
    vol.sync_all().unwrap();
    for v in [&vol, &reopen(&backend)] {
        let data = v.read(f, 0, 20_000).unwrap();
        assert_eq!(data.len(), 12_000);
        assert!(data[..5000].iter().all(|b| *b == 7));
        assert!(data[5000..].iter().all(|b| *b == 0));
    }
}

#[test]
fn utime_omit_leaves_that_time_alone_and_ctime_moves() {
    let (_, vol) = volume();
    let f = create_file(&vol, ROOT, "f", b"");
    let t = Timestamp {
        secs: 1_000_000,
        nsec: 123_456_789,
    };
    let a = vol
        .setattr(
            &ME,
            f,
            &SetAttr {
                atime: Some(TimeSet::At(t)),
                mtime: Some(TimeSet::At(t)),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!((a.atime, a.mtime), (t, t));
    let b = vol
        .setattr(
            &ME,
            f,
            &SetAttr {
                atime: Some(TimeSet::Now),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(b.mtime, t, "mtime omitted");
    assert!(b.atime > t && b.ctime >= a.ctime);
    let neg = Timestamp { secs: -5, nsec: 1 };
    let c = vol
        .setattr(
            &ME,
            f,
            &SetAttr {
                mtime: Some(TimeSet::At(neg)),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(c.mtime, neg);
}

#[test]
fn chmod_by_a_non_member_clears_setgid_and_chown_clears_setuid() {
    let (_, vol) = volume();
    let f = create_file(&vol, ROOT, "f", b"");
    vol.setattr(
        &ME,
        f,
        &SetAttr {
            uid: Some(1000),
            gid: Some(50),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let owner = Cred::user(1000, 1000);
    let a = vol
        .setattr(
            &owner,
            f,
            &SetAttr {
                mode: Some(0o2755),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(a.perm, 0o755);
    let member = Cred::user(1000, 50);
    let a = vol
        .setattr(
            &member,
            f,
            &SetAttr {
                mode: Some(0o6755),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(a.perm, 0o6755);
    let a = vol
        .setattr(
            &ME,
            f,
            &SetAttr {
                uid: Some(2000),
                ..SetAttr::default()
            },
        )
        .unwrap();
    assert_eq!(
        a.perm, 0o755,
        "chown drops setuid, and setgid of a group-executable file"
    );
}

#[test]
fn setgid_directories_pass_on_their_group() {
    let (_, vol) = volume();
    let d = vol.mkdir(&ME, ROOT, b"d", 0o2775).unwrap().ino;
    vol.setattr(
        &ME,
        d,
        &SetAttr {
            gid: Some(77),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let user = Cred::user(1000, 1000);
    let f = vol.mknod(&user, d, b"f", libc::S_IFREG | 0o644, 0).unwrap();
    assert_eq!((f.uid, f.gid), (1000, 77));
    let sub = vol.mkdir(&user, d, b"sub", 0o755).unwrap();
    assert_eq!((sub.gid, sub.perm), (77, 0o2755));
}

#[test]
fn xattrs_honour_create_and_replace_flags() {
    let (backend, vol) = volume();
    let f = create_file(&vol, ROOT, "f", b"");
    assert_eq!(errno(vol.getxattr(f, b"user.a")), libc::ENODATA);
    assert_eq!(
        errno(vol.setxattr(f, b"user.a", b"1", libc::XATTR_REPLACE)),
        libc::ENODATA
    );
    vol.setxattr(f, b"user.a", b"1", libc::XATTR_CREATE)
        .unwrap();
    assert_eq!(
        errno(vol.setxattr(f, b"user.a", b"2", libc::XATTR_CREATE)),
        libc::EEXIST
    );
    vol.setxattr(f, b"user.a", b"2", libc::XATTR_REPLACE)
        .unwrap();
    vol.setxattr(f, b"user.b", b"", 0).unwrap();
    assert_eq!(
        errno(vol.setxattr(f, b"system.posix_acl_access", b"", 0)),
        libc::EOPNOTSUPP
    );
    vol.sync_all().unwrap();
    let fresh = reopen(&backend);
    assert_eq!(fresh.getxattr(f, b"user.a").unwrap(), b"2");
    assert_eq!(
        fresh.listxattr(f).unwrap(),
        [b"user.a".to_vec(), b"user.b".to_vec()]
    );
    vol.removexattr(f, b"user.a").unwrap();
    assert_eq!(errno(vol.removexattr(f, b"user.a")), libc::ENODATA);
}

#[test]
fn read_only_volume_rejects_changes_with_erofs() {
    let (backend, vol) = volume();
    let f = create_file(&vol, ROOT, "f", b"data");
    vol.sync_all().unwrap();
    let ro = Volume::open_or_format(
        Arc::new(backend),
        VolumeConfig {
            read_only: true,
            ..VolumeConfig::default()
        },
    )
    .unwrap();
    assert_eq!(ro.read(f, 0, 10).unwrap(), b"data");
    assert_eq!(errno(ro.mkdir(&ME, ROOT, b"d", 0o755)), libc::EROFS);
    assert_eq!(errno(ro.write(f, 0, b"x")), libc::EROFS);
    assert_eq!(errno(ro.open(f, libc::O_WRONLY)), libc::EROFS);
    assert_eq!(
        errno(ro.setattr(
            &ME,
            f,
            &SetAttr {
                mode: Some(0o600),
                ..SetAttr::default()
            }
        )),
        libc::EROFS
    );
    let fh = ro.open(f, libc::O_RDONLY).unwrap();
    ro.release(fh).unwrap();
}

#[test]
fn read_only_volume_follows_the_head_and_open_files_keep_their_version() {
    let (backend, vol) = volume();
    let f = create_file(&vol, ROOT, "f", b"old");
    vol.sync_all().unwrap();
    let ro = Volume::open_or_format(
        Arc::new(backend),
        VolumeConfig {
            read_only: true,
            ..VolumeConfig::default()
        },
    )
    .unwrap();
    assert_eq!(ro.read(f, 0, 10).unwrap(), b"old");
    let held = ro.open(f, libc::O_RDONLY).unwrap();
    let fh = vol.open(f, libc::O_WRONLY).unwrap();
    vol.write(f, 0, b"new!").unwrap();
    vol.release(fh).unwrap();
    let g = create_file(&vol, ROOT, "g", b"g");
    assert!(!ro.refresh().unwrap(), "nothing committed yet");
    assert_eq!(errno(ro.lookup(ROOT, b"g")), libc::ENOENT);
    vol.fsync(g, false).unwrap();
    assert!(!vol.refresh().unwrap(), "a read-write volume is the truth");
    assert!(ro.refresh().unwrap());
    assert_eq!(ro.lookup(ROOT, b"g").unwrap().ino, g);
    // A file held open keeps its version; once closed, the next refresh takes up the new one.
    assert_eq!(ro.read(f, 0, 10).unwrap(), b"old");
    ro.release(held).unwrap();
    ro.refresh().unwrap();
    assert_eq!(ro.read(f, 0, 10).unwrap(), b"new!");
}

#[test]
fn fallocate_extends_the_size_punches_holes_and_zeroes_ranges() {
    let (backend, vol) = volume_with(VolumeConfig {
        chunk_size: Some(4096),
        ..VolumeConfig::default()
    });
    let f = create_file(&vol, ROOT, "f", b"abc");
    vol.fallocate(f, 0, 100, 0).unwrap();
    assert_eq!(vol.getattr(f).unwrap().size, 100);
    vol.fallocate(f, 0, 200, libc::FALLOC_FL_KEEP_SIZE).unwrap();
    assert_eq!(vol.getattr(f).unwrap().size, 100);
    assert_eq!(&vol.read(f, 0, 5).unwrap(), b"abc\0\0");

    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let punch = libc::FALLOC_FL_PUNCH_HOLE | keep;
    let zero = libc::FALLOC_FL_ZERO_RANGE;
    assert_eq!(
        errno(vol.fallocate(f, 0, 10, libc::FALLOC_FL_PUNCH_HOLE)),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        errno(vol.fallocate(f, 0, 10, libc::FALLOC_FL_COLLAPSE_RANGE)),
        libc::EOPNOTSUPP
    );
    assert_eq!(errno(vol.fallocate(f, 0, 0, punch)), libc::EINVAL);

    // Five stored chunks; a hole over the middle frees chunk 2 and zeroes parts of 1 and 3.
    let mut expect: Vec<u8> = (0..5 * 4096).map(|i| (i % 251 + 1) as u8).collect();
    vol.write(f, 0, &expect).unwrap();
    vol.fsync(f, false).unwrap();
    let blocks = vol.getattr(f).unwrap().blocks;
    vol.fallocate(f, 4096 + 100, 3 * 4096 - 200, punch).unwrap();
    expect[4096 + 100..4 * 4096 - 100].fill(0);
    assert_eq!(vol.getattr(f).unwrap().size, 5 * 4096);
    assert!(vol.getattr(f).unwrap().blocks < blocks);
    assert_eq!(vol.read(f, 0, 6 * 4096).unwrap(), expect);
    // Zeroing past the end grows the file unless the size is kept.
    vol.fallocate(f, 5 * 4096 - 10, 30, zero | keep).unwrap();
    expect[5 * 4096 - 10..].fill(0);
    assert_eq!(vol.getattr(f).unwrap().size, 5 * 4096);
    vol.fallocate(f, 10, 5 * 4096, zero).unwrap();
    expect[10..].fill(0);
    expect.resize(5 * 4096 + 10, 0);
    assert_eq!(vol.read(f, 0, 6 * 4096).unwrap(), expect);
    vol.sync_all().unwrap();
    drop(vol);
    let vol = reopen(&backend);
    assert_eq!(vol.read(f, 0, 6 * 4096).unwrap(), expect);
}

#[test]
fn writes_past_the_dirty_limit_store_chunks_before_any_flush() {
    let cfg = VolumeConfig {
        chunk_size: Some(4096),
        dirty_limit: 16 * 4096,
        ..VolumeConfig::default()
    };
    let (backend, vol) = volume_with(cfg);
    let (a, fh) = vol.create(&ME, ROOT, b"f", 0o644).unwrap();
    for i in 0..64u64 {
        vol.write(a.ino, i * 4096, &[i as u8 + 1; 4096]).unwrap();
    }
    assert!(
        backend.counts().put_chunk >= 32,
        "most chunks were stored while writing"
    );
    vol.release(fh).unwrap();
    assert_eq!(
        reopen(&backend).read(a.ino, 63 * 4096, 4096).unwrap(),
        vec![64u8; 4096]
    );
}

#[test]
fn chunks_are_fetched_once_and_then_served_from_the_cache() {
    let (backend, vol) = volume();
    let f = create_file(&vol, ROOT, "f", &[5u8; 100_000]);
    vol.sync_all().unwrap();
    let fresh = reopen(&backend);
    fresh.read(f, 0, 100_000).unwrap();
    let fetched = backend.counts().get_chunk;
    for _ in 0..10 {
        fresh.read(f, 0, 100_000).unwrap();
    }
    assert_eq!(backend.counts().get_chunk, fetched);
}

#[test]
fn special_files_and_symlinks() {
    let (backend, vol) = volume();
    let fifo = vol
        .mknod(&ME, ROOT, b"fifo", libc::S_IFIFO | 0o600, 0)
        .unwrap();
    let dev = vol
        .mknod(&ME, ROOT, b"dev", libc::S_IFCHR | 0o600, 0x0103)
        .unwrap();
    let link = vol.symlink(&ME, ROOT, b"ln", b"../some/where").unwrap();
    assert_eq!(
        (fifo.kind, dev.kind, dev.rdev),
        (FileKind::Fifo, FileKind::CharDev, 0x0103)
    );
    assert_eq!((link.kind, link.size), (FileKind::Symlink, 13));
    vol.sync_all().unwrap();
    assert_eq!(
        reopen(&backend).readlink(link.ino).unwrap(),
        b"../some/where"
    );
    assert_eq!(errno(vol.readlink(fifo.ino)), libc::EINVAL);
    assert_eq!(
        errno(vol.mknod(&ME, ROOT, &[b'x'; 256], libc::S_IFREG, 0)),
        libc::ENAMETOOLONG
    );
}

/// A backend whose chunk reads wait until the test lets them through.
struct GatedReads {
    inner: MemBackend,
    gate: Arc<(std::sync::Mutex<(bool, bool)>, std::sync::Condvar)>, // (a read is waiting, open)
    /// Only the chunk with these bytes is held at the gate (not the journal read at open).
    held: Vec<u8>,
}

impl dbqsfs_fs::Backend for GatedReads {
    fn put_chunk(&self, data: &[u8]) -> Result<dbqsfs_fs::ChunkId, dbqsfs_fs::BackendError> {
        self.inner.put_chunk(data)
    }
    fn get_chunk(&self, id: &dbqsfs_fs::ChunkId) -> Result<Vec<u8>, dbqsfs_fs::BackendError> {
        if self.inner.get_chunk(id)? != self.held {
            return self.inner.get_chunk(id);
        }
        let (lock, cv) = &*self.gate;
        let mut g = lock.lock().unwrap();
        g.0 = true;
        cv.notify_all();
        while !g.1 {
            g = cv.wait(g).unwrap();
        }
        drop(g);
        self.inner.get_chunk(id)
    }
    fn get_record(
        &self,
        label: &[u8],
    ) -> Result<Option<dbqsfs_fs::Record>, dbqsfs_fs::BackendError> {
        self.inner.get_record(label)
    }
    fn release_chunks(&self, ids: &[dbqsfs_fs::ChunkId]) -> Result<(), dbqsfs_fs::BackendError> {
        self.inner.release_chunks(ids)
    }
    fn put_record(
        &self,
        label: &[u8],
        version: u64,
        value: &[u8],
    ) -> Result<(), dbqsfs_fs::BackendError> {
        self.inner.put_record(label, version, value)
    }
}

#[test]
fn a_slow_chunk_fetch_does_not_block_other_operations() {
    let (backend, vol) = volume();
    let f = create_file(&vol, ROOT, "f", b"slow data");
    vol.sync_all().unwrap();
    drop(vol);
    let gate = Arc::new((
        std::sync::Mutex::new((false, false)),
        std::sync::Condvar::new(),
    ));
    let gated = GatedReads {
        inner: backend,
        gate: gate.clone(),
        held: b"slow data".to_vec(),
    };
    let vol = Arc::new(Volume::open_or_format(Arc::new(gated), VolumeConfig::default()).unwrap());
    let reader = {
        let vol = vol.clone();
        std::thread::spawn(move || vol.read(f, 0, 100).unwrap())
    };
    {
        let (lock, cv) = &*gate;
        let mut g = lock.lock().unwrap();
        while !g.0 {
            g = cv.wait(g).unwrap();
        }
    }
    // The reader is stuck in the backend; the volume still answers.
    vol.mkdir(&ME, ROOT, b"meanwhile", 0o755).unwrap();
    assert_eq!(vol.getattr(f).unwrap().size, 9);
    {
        let (lock, cv) = &*gate;
        lock.lock().unwrap().1 = true;
        cv.notify_all();
    }
    assert_eq!(reader.join().unwrap(), b"slow data");
}

#[test]
fn a_small_write_into_a_stored_chunk_stores_about_its_own_size() {
    let (backend, vol) = volume();
    let data: Vec<u8> = (0..(3 << 20) + 100).map(|i| (i * 31 % 253) as u8).collect();
    let ino = create_file(&vol, ROOT, "big", &data);
    vol.fsync(ino, false).unwrap();
    let mut expect = data.clone();
    // 4 KiB writes into stored 1 MiB chunks: each commit stores the bytes, not the chunk.
    for (i, off) in [5000usize, (1 << 20) + 77, (2 << 20) + 4096, 12]
        .iter()
        .enumerate()
    {
        let before = backend.stored_bytes();
        let w = vec![i as u8 + 1; 4096];
        vol.write(ino, *off as u64, &w).unwrap();
        expect[*off..off + 4096].copy_from_slice(&w);
        vol.fsync(ino, false).unwrap();
        let grew = backend.stored_bytes() - before;
        assert!(grew < 12 << 10, "a 4 KiB write stored {grew} bytes");
        assert_eq!(vol.read(ino, 0, expect.len() as u32).unwrap(), expect);
    }
    // The patches survive a reopen from the journal, and from a checkpoint.
    drop(vol);
    let vol = reopen(&backend);
    assert_eq!(vol.read(ino, 0, expect.len() as u32).unwrap(), expect);
    vol.sync_all().unwrap();
    drop(vol);
    let vol = reopen(&backend);
    assert_eq!(vol.read(ino, 0, expect.len() as u32).unwrap(), expect);

    // Past an eighth of the chunk in patches, the chunk is stored whole again; a truncation
    // into a patched chunk cuts its patches too.
    for k in 0..40u64 {
        let w = vec![0xa0 + k as u8; 4096];
        let off = (k * 8192) as usize;
        vol.write(ino, off as u64, &w).unwrap();
        expect[off..off + 4096].copy_from_slice(&w);
        vol.fsync(ino, false).unwrap();
    }
    assert_eq!(vol.read(ino, 0, expect.len() as u32).unwrap(), expect);
    vol.setattr(
        &ME,
        ino,
        &SetAttr {
            size: Some(6000),
            ..SetAttr::default()
        },
    )
    .unwrap();
    vol.setattr(
        &ME,
        ino,
        &SetAttr {
            size: Some(9000),
            ..SetAttr::default()
        },
    )
    .unwrap();
    expect.truncate(6000);
    expect.resize(9000, 0);
    assert_eq!(vol.read(ino, 0, 10_000).unwrap(), expect);
    vol.sync_all().unwrap();
    drop(vol);
    let vol = reopen(&backend);
    assert_eq!(vol.read(ino, 0, 10_000).unwrap(), expect);
}

#[test]
fn sequential_reads_fetch_ahead_and_random_reads_do_not() {
    let cfg = VolumeConfig {
        chunk_size: Some(4096),
        readahead_bytes: 3 * 4096,
        ..VolumeConfig::default()
    };
    let (backend, vol) = volume_with(cfg.clone());
    let data: Vec<u8> = (0..40 * 4096).map(|i| (i % 249) as u8).collect();
    let f = create_file(&vol, ROOT, "f", &data);
    vol.sync_all().unwrap();
    drop(vol);
    let wait_for = |n: u64| {
        let t = std::time::Instant::now();
        while backend.counts().get_chunk < n && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        backend.counts().get_chunk
    };

    // A read far into the file fetches its chunk only.
    let vol = Volume::open_or_format(Arc::new(backend.clone()), cfg).unwrap();
    let base = backend.counts().get_chunk;
    assert_eq!(
        vol.read(f, 20 * 4096, 4096).unwrap(),
        data[20 * 4096..21 * 4096]
    );
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(backend.counts().get_chunk, base + 1);
    // The start of the file, then the next chunk: the three chunks after each are fetched
    // ahead, and reading them costs no more fetches.
    assert_eq!(vol.read(f, 0, 4096).unwrap(), data[..4096]);
    assert_eq!(wait_for(base + 5), base + 5);
    assert_eq!(vol.read(f, 4096, 4096).unwrap(), data[4096..8192]);
    assert_eq!(wait_for(base + 6), base + 6);
    for i in 2..5 {
        let r = vol.read(f, i * 4096, 4096).unwrap();
        assert_eq!(r, data[i as usize * 4096..(i as usize + 1) * 4096]);
    }
    // Chunks 2..5 read in order: the window moved on to chunk 7, nothing fetched twice.
    assert_eq!(wait_for(base + 9), base + 9);
    let all = vol.read(f, 0, data.len() as u32).unwrap();
    assert_eq!(all, data);
}

#[test]
fn a_read_only_volume_follows_tails_segments_and_checkpoints() {
    let (backend, vol) = volume_with(VolumeConfig {
        checkpoint_segments: 3,
        ..VolumeConfig::default()
    });
    let ro = Volume::open_or_format(
        Arc::new(backend.clone()),
        VolumeConfig {
            read_only: true,
            ..VolumeConfig::default()
        },
    )
    .unwrap();
    let mut made = Vec::new();
    for round in 0..12 {
        // Small commits ride in the head's tail; a round of many names overflows it into a
        // segment; every third segment brings a checkpoint.
        let n = if round % 3 == 2 { 2_000 } else { 3 };
        for i in 0..n {
            let name = format!("r{round}-{i}");
            vol.mknod(&ME, ROOT, name.as_bytes(), libc::S_IFREG | 0o644, 0)
                .unwrap();
            made.push(name);
        }
        if round % 4 == 1 {
            vol.unlink(ROOT, made.remove(0).as_bytes()).unwrap();
        }
        vol.fsync(ROOT, false).unwrap();
        assert!(ro.refresh().unwrap());
        let mut want: Vec<String> = made.clone();
        want.extend([".".into(), "..".into()]);
        want.sort();
        let mut got = names(&ro, ROOT);
        got.sort();
        assert_eq!(got, want, "round {round}");
    }
}

#[test]
fn a_snapshot_keeps_the_committed_state_and_mounts_read_only() {
    use dbqsfs_fs::snapshot::{self, SnapshotError};
    let (backend, vol) = volume();
    let f = create_file(&vol, ROOT, "f", b"before");
    vol.mkdir(&ME, ROOT, b"d", 0o755).unwrap();
    vol.fsync(ROOT, false).unwrap();
    let uncommitted = create_file(&vol, ROOT, "not-yet", b"x");
    let taken = snapshot::create(&backend, "s1").unwrap();
    assert!(matches!(
        snapshot::create(&backend, "s1"),
        Err(SnapshotError::Exists(_))
    ));
    for bad in ["", ".hidden", "a/b", &"x".repeat(101)] {
        assert!(matches!(
            snapshot::create(&backend, bad),
            Err(SnapshotError::BadName(_))
        ));
    }

    // The writer goes on; the snapshot does not move.
    vol.write(f, 0, b"AFTER!").unwrap();
    vol.rmdir(ROOT, b"d").unwrap();
    vol.sync_all().unwrap();
    let open_snap = |name: &str| {
        Volume::open_or_format(
            Arc::new(backend.clone()),
            VolumeConfig {
                snapshot: Some(name.into()),
                ..VolumeConfig::default()
            },
        )
    };
    let snap = open_snap("s1").unwrap();
    assert!(snap.is_read_only());
    assert_eq!(snap.read(f, 0, 10).unwrap(), b"before");
    assert!(snap.lookup(ROOT, b"d").is_ok());
    assert_eq!(errno(snap.lookup(ROOT, b"not-yet")), libc::ENOENT);
    assert_eq!(errno(snap.mkdir(&ME, ROOT, b"x", 0o755)), libc::EROFS);
    assert!(!snap.refresh().unwrap());
    assert_eq!(reopen(&backend).read(f, 0, 10).unwrap(), b"AFTER!");
    assert!(reopen(&backend).lookup(ROOT, b"not-yet").unwrap().ino == uncommitted);

    let listed = snapshot::list(&backend).unwrap();
    assert_eq!(listed, vec![("s1".to_string(), taken)]);
    snapshot::create(&backend, "s2").unwrap();
    assert_eq!(open_snap("s2").unwrap().read(f, 0, 10).unwrap(), b"AFTER!");
    snapshot::delete(&backend, "s1").unwrap();
    assert!(matches!(
        snapshot::delete(&backend, "s1"),
        Err(SnapshotError::NoSuchSnapshot(_))
    ));
    assert!(open_snap("s1").is_err());
    assert_eq!(snapshot::list(&backend).unwrap().len(), 1);
    // A name can be taken again after a delete.
    snapshot::create(&backend, "s1").unwrap();
    assert_eq!(open_snap("s1").unwrap().read(f, 0, 10).unwrap(), b"AFTER!");
}
