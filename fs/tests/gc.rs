//! The volume's collector over `MemBackend`, which drops a released chunk at once: a chunk
//! released too early shows up as a failed read.

use std::sync::{Arc, Mutex};

use dbqsfs_fs::layout::ROOT_INO;
use dbqsfs_fs::snapshot;
use dbqsfs_fs::{
    Backend, BackendError, ChunkId, Cred, Failure, MemBackend, Record, Volume, VolumeConfig,
};

const ROOT: u64 = ROOT_INO;
const ME: Cred = Cred::ROOT;

fn cfg() -> VolumeConfig {
    VolumeConfig {
        chunk_size: Some(4096),
        ..VolumeConfig::default()
    }
}

fn open(backend: &Arc<dyn Backend>, cfg: VolumeConfig) -> Volume {
    Volume::open_or_format(backend.clone(), cfg).unwrap()
}

fn open_snapshot(backend: &Arc<dyn Backend>, name: &str) -> Volume {
    let cfg = VolumeConfig {
        snapshot: Some(name.into()),
        ..cfg()
    };
    Volume::open_or_format(backend.clone(), cfg).unwrap()
}

/// Bytes no other file or chunk shares (chunks are content-addressed).
fn data(tag: u8, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new()
        .update(&[tag])
        .finalize_xof()
        .fill(&mut out);
    out
}

fn write_file(vol: &Volume, name: &str, bytes: &[u8]) -> u64 {
    let (attr, fh) = vol.create(&ME, ROOT, name.as_bytes(), 0o644).unwrap();
    vol.write(attr.ino, 0, bytes).unwrap();
    vol.release(fh).unwrap();
    attr.ino
}

fn read_file(vol: &Volume, name: &str) -> Vec<u8> {
    let attr = vol.lookup(ROOT, name.as_bytes()).unwrap();
    let fh = vol.open(attr.ino, libc::O_RDONLY).unwrap();
    let out = vol.read(attr.ino, 0, attr.size as u32).unwrap();
    vol.release(fh).unwrap();
    out
}

#[test]
fn overwritten_and_deleted_data_is_released_and_the_rest_stays_readable() {
    let mem = MemBackend::new();
    let backend: Arc<dyn Backend> = Arc::new(mem.clone());
    let vol = open(&backend, cfg());
    let (a, b, c) = (data(1, 40_000), data(2, 40_000), data(3, 40_000));
    let ino_a = write_file(&vol, "a", &a);
    write_file(&vol, "b", &b);
    write_file(&vol, "c", &c);
    vol.sync_all().unwrap();
    let full = mem.chunk_count();

    let a2 = data(4, 40_000);
    vol.write(ino_a, 0, &a2).unwrap();
    vol.unlink(ROOT, b"b").unwrap();
    let stats = vol.collect_garbage(&mut |_| {}).unwrap();
    // Ten chunks of `b` and ten of the old `a` (with journal pieces the commit left).
    assert!(stats.released >= 20, "{stats:?}");
    assert!(mem.chunk_count() <= full, "{} > {full}", mem.chunk_count());
    assert_eq!(read_file(&vol, "a"), a2);
    assert_eq!(read_file(&vol, "c"), c);
    assert_eq!(stats.pending, 0);

    // A clean close and a fresh writer: everything left behind by the last checkpoint is
    // found again (the head lists it) and the store ends up holding what the volume reaches.
    vol.sync_all().unwrap();
    drop(vol);
    let vol = open(&backend, cfg());
    vol.collect_garbage(&mut |_| {}).unwrap();
    let stats = vol.collect_garbage(&mut |_| {}).unwrap();
    assert_eq!(mem.chunk_count() as u64, stats.reachable);
    assert_eq!(read_file(&vol, "a"), a2);
    assert_eq!(read_file(&vol, "c"), c);
    assert!(vol.lookup(ROOT, b"b").is_err());
}

#[test]
fn a_crashed_writer_leaves_nothing_behind_for_the_next() {
    let mem = MemBackend::new();
    let backend: Arc<dyn Backend> = Arc::new(mem.clone());
    let vol = open(&backend, cfg());
    for i in 0..20u8 {
        write_file(&vol, &format!("f{i}"), &data(i, 10_000));
    }
    vol.sync_all().unwrap();
    for i in 0..20u8 {
        vol.unlink(ROOT, format!("f{i}").as_bytes()).unwrap();
    }
    // The deletions are durable (and a checkpoint folded them in), but no pass ran: a crash.
    vol.sync_all().unwrap();
    drop(vol);
    let vol = open(&backend, cfg());
    vol.collect_garbage(&mut |_| {}).unwrap();
    let stats = vol.collect_garbage(&mut |_| {}).unwrap();
    assert_eq!(mem.chunk_count() as u64, stats.reachable, "{stats:?}");
    assert!(stats.reachable < 10, "{stats:?}");
}

#[test]
fn a_snapshot_keeps_what_it_reaches_until_it_is_deleted() {
    let mem = MemBackend::new();
    let backend: Arc<dyn Backend> = Arc::new(mem.clone());
    let vol = open(&backend, cfg());
    let old = data(7, 50_000);
    write_file(&vol, "f", &old);
    vol.sync_all().unwrap();
    snapshot::create(backend.as_ref(), "before").unwrap();
    vol.unlink(ROOT, b"f").unwrap();
    let stats = vol.collect_garbage(&mut |_| {}).unwrap();
    assert!(stats.kept_for_snapshots >= 13, "{stats:?}");
    let snap = open_snapshot(&backend, "before");
    assert_eq!(read_file(&snap, "f"), old);
    drop(snap);

    snapshot::delete(backend.as_ref(), "before").unwrap();
    vol.collect_garbage(&mut |_| {}).unwrap();
    let stats = vol.collect_garbage(&mut |_| {}).unwrap();
    assert_eq!(stats.kept_for_snapshots, 0, "{stats:?}");
    assert_eq!(mem.chunk_count() as u64, stats.reachable, "{stats:?}");
}

/// A backend that runs a hook once, right after a snapshot's record is written (before the
/// index names it): the writer's collector running between a snapshot's copy of the head and
/// its check of the floor, without seeing the snapshot.
struct RaceAfterIndex {
    inner: MemBackend,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Backend for RaceAfterIndex {
    fn put_chunk(&self, data: &[u8]) -> Result<ChunkId, BackendError> {
        self.inner.put_chunk(data)
    }
    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, BackendError> {
        self.inner.get_chunk(id)
    }
    fn get_record(&self, label: &[u8]) -> Result<Option<Record>, BackendError> {
        self.inner.get_record(label)
    }
    fn put_record(&self, label: &[u8], version: u64, value: &[u8]) -> Result<(), BackendError> {
        self.inner.put_record(label, version, value)?;
        if label.starts_with(b"snapshot/") {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
        Ok(())
    }
    fn release_chunks(&self, ids: &[ChunkId]) -> Result<(), BackendError> {
        self.inner.release_chunks(ids)
    }
}

#[test]
fn a_snapshot_racing_the_collector_is_taken_again_of_a_head_it_kept() {
    let mem = MemBackend::new();
    let racy = Arc::new(RaceAfterIndex {
        inner: mem.clone(),
        hook: Mutex::new(None),
    });
    let backend: Arc<dyn Backend> = racy.clone();
    let vol = Arc::new(open(&backend, cfg()));
    write_file(&vol, "f", &data(9, 30_000));
    vol.sync_all().unwrap();
    let (v, kept) = (vol.clone(), data(10, 5_000));
    *racy.hook.lock().unwrap() = Some(Box::new(move || {
        // After the snapshot copied the head naming `f`, before it checks the floor: the
        // writer drops `f` and releases its chunks (it does not see the snapshot yet).
        v.unlink(ROOT, b"f").unwrap();
        write_file(&v, "g", &kept);
        let stats = v.collect_garbage(&mut |_| {}).unwrap();
        assert!(stats.released > 0, "{stats:?}");
    }));
    let info = snapshot::create(backend.as_ref(), "s").unwrap();
    let snap = open_snapshot(&backend, "s");
    // Taken again, of a head the collector keeps whole: every file in it reads.
    assert!(info.commit > 2, "{info:?}");
    assert!(snap.lookup(ROOT, b"f").is_err());
    assert_eq!(read_file(&snap, "g"), data(10, 5_000));
}

#[test]
fn a_snapshot_deleted_while_no_writer_runs_is_freed_by_the_next() {
    let mem = MemBackend::new();
    let backend: Arc<dyn Backend> = Arc::new(mem.clone());
    let vol = open(&backend, cfg());
    write_file(&vol, "f", &data(11, 60_000));
    write_file(&vol, "g", &data(12, 6_000));
    vol.sync_all().unwrap();
    snapshot::create(backend.as_ref(), "old").unwrap();
    vol.unlink(ROOT, b"f").unwrap();
    let stats = vol.collect_garbage(&mut |_| {}).unwrap();
    assert!(stats.kept_for_snapshots >= 15, "{stats:?}");
    vol.sync_all().unwrap();
    drop(vol);

    snapshot::delete(backend.as_ref(), "old").unwrap();
    assert!(snapshot::list(backend.as_ref()).unwrap().is_empty());
    // A snapshot of the same name again, of another state, before any writer ran.
    let vol = open(&backend, cfg());
    snapshot::create(backend.as_ref(), "old").unwrap();
    vol.collect_garbage(&mut |_| {}).unwrap();
    let stats = vol.collect_garbage(&mut |_| {}).unwrap();
    assert_eq!(stats.kept_for_snapshots, 0, "{stats:?}");
    assert_eq!(mem.chunk_count() as u64, stats.reachable, "{stats:?}");
    assert_eq!(read_file(&vol, "g"), data(12, 6_000));
    let labels: Vec<String> = mem
        .labels()
        .into_iter()
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .collect();
    assert!(
        labels.iter().any(|l| l.starts_with("deleted-snapshot/")),
        "{labels:?}"
    );
    for l in labels.iter().filter(|l| l.starts_with("deleted-snapshot/")) {
        let rec = mem.peek_record(l.as_bytes()).unwrap();
        assert!(
            rec.value.is_empty(),
            "{l} still holds a head after the collector freed it"
        );
    }
    let snap = open_snapshot(&backend, "old");
    assert_eq!(read_file(&snap, "g"), data(12, 6_000));
    assert!(snap.lookup(ROOT, b"f").is_err());
}

#[test]
fn writes_past_the_quota_fail_with_edquot_and_freeing_space_lets_them_go_on() {
    let mem = MemBackend::new();
    let backend: Arc<dyn Backend> = Arc::new(mem.clone());
    dbqsfs_fs::quota::set(backend.as_ref(), Some(100_000)).unwrap();
    let vol = open(&backend, cfg());
    assert_eq!(vol.quota(), Some(100_000));
    let a = write_file(&vol, "a", &data(1, 60_000));
    let (attr, fh) = vol.create(&ME, ROOT, b"b", 0o644).unwrap();
    vol.write(attr.ino, 0, &data(2, 30_000)).unwrap();
    // 90,000 of 100,000 used: 20,000 more is refused, changing nothing.
    let e = vol.write(attr.ino, 30_000, &data(3, 20_000)).unwrap_err();
    assert_eq!(e.errno(), libc::EDQUOT);
    assert_eq!(vol.getattr(attr.ino).unwrap().size, 30_000);
    // So is growing by truncation; rewriting inside the file is not growth.
    let grow = dbqsfs_fs::SetAttr {
        size: Some(200_000),
        ..Default::default()
    };
    assert_eq!(
        vol.setattr(&ME, attr.ino, &grow).unwrap_err().errno(),
        libc::EDQUOT
    );
    vol.write(attr.ino, 0, &data(4, 30_000)).unwrap();
    let st = vol.statfs();
    assert_eq!(
        st.blocks * st.bsize as u64,
        90_000u64.div_ceil(4096) * 4096 + st.bavail * 4096
    );
    assert_eq!(st.bavail, 10_000 / 4096);
    // Freeing space lets writes go on; what was written is all there.
    vol.unlink(ROOT, b"a").unwrap();
    vol.write(attr.ino, 30_000, &data(3, 20_000)).unwrap();
    vol.release(fh).unwrap();
    assert_eq!(read_file(&vol, "b")[30_000..], data(3, 20_000)[..]);
    assert!(vol.getattr(a).is_err());
    // Without a quota (the record emptied) nothing is refused.
    dbqsfs_fs::quota::set(backend.as_ref(), None).unwrap();
    assert_eq!(vol.refresh_quota().unwrap(), None);
    write_file(&vol, "c", &data(5, 200_000));
}

/// Full nodes refuse content blocks but store records: removing files must still commit (in the
/// head, since no journal segment can be stored) and the collector must free their chunks, while
/// new data waits buffered; a crash then shows the removals and the new file no longer than what
/// was stored of it.
#[test]
fn on_full_nodes_removals_commit_and_free_space_while_new_data_waits() {
    let mem = MemBackend::new();
    let backend: Arc<dyn Backend> = Arc::new(mem.clone());
    let vol = open(&backend, cfg());
    let keep = data(1, 40_000);
    write_file(&vol, "keep", &keep);
    // Enough names that removing them all takes more than a head's tail (64 KiB).
    let names: Vec<String> = (0..2500)
        .map(|i| format!("old-file-number-{i:05}"))
        .collect();
    for (i, name) in names.iter().enumerate() {
        let bytes = if i < 30 {
            data(10 + i as u8, 8192)
        } else {
            Vec::new()
        };
        write_file(&vol, name, &bytes);
    }
    vol.sync_all().unwrap();
    let before = mem.chunk_count();

    mem.set_failure(Failure::ChunksNoSpace);
    let new = data(2, 20_000);
    let ino_new = write_file(&vol, "new", &new);
    for name in &names {
        vol.unlink(ROOT, name.as_bytes()).unwrap();
    }
    let e = vol.fsync(ino_new, false).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    let stats = vol.collect_garbage(&mut |_| {}).unwrap();
    // Two chunks of each of the 30 files with data, and the checkpoint's pages they were on.
    assert!(stats.released >= 60, "{stats:?}");
    assert!(
        mem.chunk_count() + 60 <= before,
        "{} of {before}",
        mem.chunk_count()
    );
    assert_eq!(read_file(&vol, "new"), new);

    // What a crash now would leave: the committed head, read by a fresh reader.
    let committed = || {
        let cfg = VolumeConfig {
            read_only: true,
            ..cfg()
        };
        Volume::open_or_format(backend.clone(), cfg).unwrap()
    };
    let ro = committed();
    assert_eq!(
        ro.lookup(ROOT, names[0].as_bytes()).unwrap_err().errno(),
        libc::ENOENT
    );
    assert_eq!(ro.lookup(ROOT, b"new").unwrap().size, 0);
    assert_eq!(read_file(&ro, "keep"), keep);
    drop(ro);

    // Space again: the buffered data goes through, and the head is checkpointed small again.
    mem.set_failure(Failure::None);
    vol.fsync(ino_new, false).unwrap();
    vol.sync_all().unwrap();
    let ro = committed();
    assert_eq!(read_file(&ro, "new"), new);
    assert_eq!(read_file(&ro, "keep"), keep);
    // `.`, `..`, keep and new.
    assert_eq!(ro.readdir(ROOT, 0, 10_000).unwrap().len(), 4);
}
