//! [`DbqsBackend`] and the volume [`Lease`] against four in-process nodes: chunks and records
//! round-trip, absent chunks are `NotFound`, volumes do not see each other's records, a `Volume`
//! reopened over a fresh client sees what the first stored, a second lease is refused naming the
//! holder, an expired lease stops writes, and an unreachable cluster fails calls within the bound.

use dbqsfs_core::object::content_id;
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions};
use dbqsfs_daemon::files::ClusterInfo;
use dbqsfs_daemon::volume::{BackendOptions, DbqsBackend, Lease, LeaseError, LeaseTiming};
use dbqsfs_fs::layout::HEAD_LABEL;
use dbqsfs_fs::{Backend, BackendError, Cred, Volume, VolumeConfig};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{init_cluster, start_node, Running};

fn client(rt: &tokio::runtime::Runtime, info: &ClusterInfo, timeout: Duration) -> DbqsClient {
    let _g = rt.enter();
    DbqsClient::connect(
        info.genesis.clone(),
        info.client_key.clone(),
        DbqsClientOptions {
            op_timeout: timeout,
            ..DbqsClientOptions::default()
        },
    )
    .unwrap()
}

fn backend(
    rt: &tokio::runtime::Runtime,
    c: &DbqsClient,
    info: &ClusterInfo,
    vol: &str,
) -> DbqsBackend {
    DbqsBackend::new(
        c.clone(),
        info.client_key.clone(),
        vol,
        rt.handle().clone(),
        BackendOptions {
            call_timeout: Duration::from_secs(5),
            ..BackendOptions::default()
        },
    )
}

#[test]
fn dbqs_backend_serves_a_volume_and_leases_keep_one_writer() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let toml = init_cluster(&dir);
    let nodes: Vec<Running> = (0..4)
        .map(|i| start_node(rt.handle(), &dir.join(format!("node-{i}"))))
        .collect();
    let info = ClusterInfo::load(&toml).unwrap();
    let c = client(&rt, &info, Duration::from_secs(3));
    let b = backend(&rt, &c, &info, "v1");

    // Chunks are content blocks; records are versioned, per volume.
    let id = b.put_chunk(b"chunk bytes").unwrap();
    assert_eq!(id, content_id(b"chunk bytes").0);
    assert_eq!(b.get_chunk(&id).unwrap(), b"chunk bytes");
    assert_eq!(
        b.get_chunk(&content_id(b"never").0),
        Err(BackendError::NotFound)
    );
    assert_eq!(b.get_record(b"r").unwrap(), None);
    b.put_record(b"r", 2, b"two").unwrap();
    b.put_record(b"r", 1, b"one").unwrap();
    let r = b.get_record(b"r").unwrap().unwrap();
    assert_eq!((r.version, r.value.as_slice()), (2, &b"two"[..]));
    assert_eq!(
        backend(&rt, &c, &info, "v2").get_record(b"r").unwrap(),
        None
    );
    assert!(matches!(
        b.put_chunk(&vec![0; dbqsfs_core::object::MAX_BLOCK + 1]),
        Err(BackendError::TooLarge { .. })
    ));

    // A volume over the backend, reopened over a fresh client, shows the same files.
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let ino = {
        let vol = Volume::open_or_format(
            Arc::new(backend(&rt, &c, &info, "fs")),
            VolumeConfig::default(),
        )
        .unwrap();
        let (a, fh) = vol.create(&Cred::ROOT, 1, b"file", 0o644).unwrap();
        vol.write(a.ino, 0, &data).unwrap();
        vol.release(fh).unwrap();
        vol.mkdir(&Cred::ROOT, 1, b"dir", 0o755).unwrap();
        // What unmount does: commit the journal and write a checkpoint. Dropping a volume
        // without it is a crash, which keeps only what was committed.
        vol.sync_all().unwrap();
        a.ino
    };
    let c2 = client(&rt, &info, Duration::from_secs(3));
    let vol = Volume::open_or_format(
        Arc::new(backend(&rt, &c2, &info, "fs")),
        VolumeConfig::default(),
    )
    .unwrap();
    assert_eq!(vol.lookup(1, b"file").unwrap().ino, ino);
    assert_eq!(vol.read(ino, 0, data.len() as u32 + 10).unwrap(), data);
    assert!(vol.lookup(1, b"dir").is_ok());

    // Leases: one holder at a time; the refusal names the holder; release frees it.
    let timing = LeaseTiming {
        duration: Duration::from_secs(30),
        renew_every: Duration::from_secs(10),
    };
    let a = rt
        .block_on(Lease::acquire(
            c.clone(),
            info.client_key.clone(),
            "fs",
            "holder A".into(),
            timing,
        ))
        .unwrap();
    match rt.block_on(Lease::acquire(
        c2.clone(),
        info.client_key.clone(),
        "fs",
        "holder B".into(),
        timing,
    )) {
        Err(LeaseError::Held { holder, secs, .. }) => {
            assert_eq!(holder, "holder A");
            assert!(secs > 20 && secs <= 30, "{secs}");
        }
        other => panic!("second lease: {:?}", other.map(|l| l.holder().to_string())),
    }
    // Another volume's lease is independent.
    let other = rt
        .block_on(Lease::acquire(
            c2.clone(),
            info.client_key.clone(),
            "v2",
            "holder C".into(),
            timing,
        ))
        .unwrap();
    rt.block_on(other.release()).unwrap();
    rt.block_on(a.release()).unwrap();
    let b_lease = rt
        .block_on(Lease::acquire(
            c2.clone(),
            info.client_key.clone(),
            "fs",
            "holder B".into(),
            timing,
        ))
        .unwrap();
    assert!(rt.block_on(b_lease.still_ours()).unwrap());
    // A lease that lapsed is free for the next mount.
    let short = LeaseTiming {
        duration: Duration::from_millis(300),
        renew_every: Duration::from_secs(10),
    };
    let lapsing = rt
        .block_on(Lease::acquire(
            c.clone(),
            info.client_key.clone(),
            "short",
            "X".into(),
            short,
        ))
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let next = rt
        .block_on(Lease::acquire(
            c2.clone(),
            info.client_key.clone(),
            "short",
            "Y".into(),
            short,
        ))
        .unwrap();
    assert!(!rt.block_on(lapsing.still_ours()).unwrap());
    drop(next);

    // Writes stop when the lease deadline has passed; reads go on.
    let deadline = Arc::new(AtomicU64::new(0));
    let fenced = backend(&rt, &c, &info, "fs").with_lease_deadline(deadline);
    assert!(matches!(
        fenced.put_chunk(b"x"),
        Err(BackendError::Unavailable(_))
    ));
    assert!(matches!(
        fenced.put_record(b"r", 9, b"x"),
        Err(BackendError::Unavailable(_))
    ));
    assert!(fenced.get_record(HEAD_LABEL).unwrap().is_some());

    // With every node gone, calls fail within the operation timeout (3 s) instead of hanging.
    for n in nodes {
        rt.block_on(n.stop_now()).unwrap();
    }
    let t = Instant::now();
    let r = b.get_record(b"r");
    assert!(
        matches!(
            r,
            Err(BackendError::TimedOut) | Err(BackendError::Unavailable(_))
        ),
        "{r:?}"
    );
    let t2 = Instant::now();
    assert!(matches!(
        b.put_chunk(b"unreachable"),
        Err(BackendError::TimedOut) | Err(BackendError::Unavailable(_))
    ));
    assert!(t.elapsed() < Duration::from_secs(12), "{:?}", t.elapsed());
    assert!(t2.elapsed() < Duration::from_secs(6), "{:?}", t2.elapsed());
    assert_eq!(
        vol.read(ino, 0, 10).unwrap(),
        data[..10],
        "cached chunks stay readable"
    );
}
