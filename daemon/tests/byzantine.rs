//! One Byzantine node out of four, in each fault mode (built with `--features fault-injection`):
//! every content read returns the right bytes and public-key reads return the latest version.

use dbqsfs_core::crypto::Keypair;
use dbqsfs_core::object::pk_block_id;
use dbqsfs_daemon::client::{DbqsClient, DbqsClientOptions};
use dbqsfs_daemon::fault::Fault;
use dbqsfs_daemon::files::ClusterInfo;
use dbqsfs_daemon::node::{Node, NodeError};
use dbqsfs_daemon::volume::{BackendOptions, DbqsBackend};
use dbqsfs_fs::crypt::{Encrypted, VolumeKey};
use dbqsfs_fs::{Cred, Volume, VolumeConfig};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_dbqsfs");

type Stops = Vec<(
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), NodeError>>,
)>;

/// A 4-node cluster whose node 0 misbehaves as `fault`, on the current runtime.
async fn start_cluster(fault: Fault) -> (tempfile::TempDir, ClusterInfo, Stops) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let mut r = [0u8; 2];
    getrandom::fill(&mut r).unwrap();
    let base = 20000 + u32::from(u16::from_le_bytes(r)) % 39000;
    let out = Command::new(BIN)
        .args(["cluster", "init", "--nodes", "4", "--dir"])
        .arg(&dir)
        .args(["--base-port", &base.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut stops = Vec::new();
    for i in 0..4 {
        let mut node = Node::load(&dir.join(format!("node-{i}"))).unwrap();
        if i == 0 {
            node = node.with_fault(fault);
        }
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(node.run(async {
            let _ = rx.await;
        }));
        stops.push((tx, task));
    }
    let info = ClusterInfo::load(&dir.join("cluster.toml")).unwrap();
    (tmp, info, stops)
}

async fn stop(stops: Stops) {
    for (tx, task) in stops {
        let _ = tx.send(());
        task.await.unwrap().unwrap();
    }
}

async fn check_mode(fault: Fault) {
    let (_tmp, info, stops) = start_cluster(fault).await;
    let client = DbqsClient::connect(
        info.genesis,
        info.client_key,
        DbqsClientOptions {
            op_timeout: Duration::from_secs(20),
            ..DbqsClientOptions::default()
        },
    )
    .unwrap();

    for (i, len) in [0usize, 1, 4096, 1 << 20].into_iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|x| (x * 7 + i) as u8).collect();
        let id = client.put_content(data.clone()).await.unwrap();
        for _ in 0..3 {
            let got = client.get_content(id).await.unwrap();
            assert!(
                got.as_deref() == Some(&data[..]),
                "{fault:?}: wrong bytes for {len}"
            );
        }
    }
    let owner = Keypair::from_seed([5; 32]);
    let pid = pk_block_id(&owner.public(), b"head");
    for v in 1..=4u64 {
        let value = format!("value {v}").into_bytes();
        client
            .put_pk(&owner, b"head", value.clone(), None)
            .await
            .unwrap();
        let got = client.get_pk(pid).await.unwrap().expect("present");
        assert_eq!(got.value, value, "{fault:?}: read after write {v}");
    }
    stop(stops).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byzantine_node_in_every_fault_mode_cannot_change_what_clients_read() {
    for fault in [
        Fault::Corrupt,
        Fault::Stale,
        Fault::Silent,
        Fault::Garbage,
        Fault::AckWithoutStore,
        Fault::Equivocate,
    ] {
        check_mode(fault).await;
    }
}

/// An encrypted volume over a cluster with a node that serves tampered blocks (a flipped byte in
/// every content block, forged record values): the client's checks (content id, signature) and
/// the volume's AEAD refuse them, and every read comes right from the others. What the client
/// refused shows in the Prometheus metrics as Byzantine evidence.
#[test]
fn an_encrypted_volume_reads_right_past_a_tampering_node() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let metrics = {
        let _g = rt.enter();
        // A port free a moment ago may be taken before the exporter binds it (by an outgoing
        // connection of the test beside this one): try another.
        let mut tries = 0;
        loop {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            drop(l);
            match dbqsfs_daemon::metrics::serve(addr) {
                Ok(()) => break addr.to_string(),
                Err(e) if e.contains("in use") && tries < 20 => tries += 1,
                Err(e) => panic!("serving metrics at {addr}: {e}"),
            }
        }
    };
    for fault in [Fault::Corrupt, Fault::Equivocate] {
        let (_tmp, info, stops) = rt.block_on(start_cluster(fault));
        let key = VolumeKey::from_bytes([42; 32]);
        let open = || {
            let client = {
                let _g = rt.enter();
                DbqsClient::connect(
                    info.genesis.clone(),
                    info.client_key.clone(),
                    DbqsClientOptions {
                        op_timeout: Duration::from_secs(20),
                        ..DbqsClientOptions::default()
                    },
                )
                .unwrap()
            };
            let raw = DbqsBackend::new(
                client,
                info.client_key.clone(),
                "secret",
                rt.handle().clone(),
                BackendOptions::default(),
            );
            Volume::open_or_format(Arc::new(Encrypted::new(raw, &key)), VolumeConfig::default())
                .unwrap()
        };
        let data: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i * 13 % 253) as u8).collect();
        let ino = {
            let vol = open();
            let (a, fh) = vol.create(&Cred::ROOT, 1, b"file", 0o644).unwrap();
            vol.write(a.ino, 0, &data).unwrap();
            vol.release(fh).unwrap();
            vol.sync_all().unwrap();
            a.ino
        };
        let vol = open();
        assert_eq!(vol.lookup(1, b"file").unwrap().ino, ino, "{fault:?}");
        for _ in 0..2 {
            assert!(
                vol.read(ino, 0, data.len() as u32).unwrap() == data,
                "{fault:?}: wrong bytes"
            );
        }
        drop(vol);
        rt.block_on(stop(stops));
        let want = "dbqsfs_byzantine_evidence_total{what=";
        let text = common::metrics_with(&metrics, &[want], Duration::from_secs(5));
        assert!(
            text.contains(want),
            "{fault:?}: no evidence counted:\n{text}"
        );
    }
}
