//! The cost of the core's operations, measured in-process (no network, no disk).
//!
//! `cargo run --release -p dbqsfs-examples --example core_costs`
//!
//! Prints the time per operation of signing and verifying, hashing a block, and a replica handling
//! each kind of request over the in-memory store (decode, checks, store, encode).

use dbqsfs_core::config::{CertifiedConfig, ConfigChain, Configuration, Member, Params};
use dbqsfs_core::crypto::{Domain, Keypair, NodeId};
use dbqsfs_core::dbqs::msg::DbqsMessage;
use dbqsfs_core::dbqs::refs::RefRecord;
use dbqsfs_core::dbqs::replica::{Handled, Replica, ReplicaOptions};
use dbqsfs_core::object::{content_id, PkBlock};
use dbqsfs_core::store::MemStore;
use dbqsfs_core::wire::encode_msg;
use std::hint::black_box;
use std::time::Instant;

fn time<F: FnMut(u64)>(name: &str, iters: u64, mut f: F) {
    f(0); // warm up
    let start = Instant::now();
    for i in 0..iters {
        f(i);
    }
    let per = start.elapsed().as_secs_f64() / iters as f64;
    println!(
        "{name:<44} {:>10.2} µs/op {:>12.0} ops/s",
        per * 1e6,
        1.0 / per
    );
}

fn main() {
    let k = Keypair::from_seed([1; 32]);
    let body = [7u8; 72];
    let sig = k.sign(Domain::PkBlock, &body);
    time("ed25519 sign (72-byte body)", 5_000, |_| {
        black_box(k.sign(Domain::PkBlock, black_box(&body)));
    });
    time("ed25519 verify_strict", 5_000, |_| {
        black_box(k.public().verify(Domain::PkBlock, black_box(&body), &sig)).unwrap();
    });
    let value = vec![3u8; 4096];
    time("PkBlock::sign (4 KiB value)", 5_000, |i| {
        black_box(PkBlock::sign(&k, b"inode/1", i, value.clone()).unwrap());
    });
    let block = PkBlock::sign(&k, b"inode/1", 1, value.clone()).unwrap();
    time("PkBlock::verify (4 KiB value)", 5_000, |_| {
        black_box(block.verify()).unwrap();
    });
    let mib = vec![5u8; 1 << 20];
    time("content id of 1 MiB (BLAKE3)", 500, |_| {
        black_box(content_id(black_box(&mib)));
    });

    let keys: Vec<Keypair> = (0..4).map(|i| Keypair::from_seed([i + 2; 32])).collect();
    let members = keys
        .iter()
        .map(|k| Member::new(k.public(), "127.0.0.1:1"))
        .collect();
    let genesis = CertifiedConfig::genesis(Configuration::new(0, Params::with_f(1), members, None));
    let replica = Replica::new(
        keys[0].node_id(),
        MemStore::new(),
        ConfigChain::new(genesis).unwrap(),
        true,
        ReplicaOptions::default(),
    );
    let client = NodeId([9; 32]);
    let handle = |bytes: &[u8]| match replica.handle(client, bytes) {
        Handled::Reply(r) => {
            black_box(r);
        }
        other => panic!("unexpected {other:?}"),
    };
    let put_pk: Vec<Vec<u8>> = (0..5_000)
        .map(|i| {
            encode_msg(
                0,
                DbqsMessage::PutPk {
                    rid: i,
                    block: PkBlock::sign(&k, b"inode/1", i + 1, value.clone()).unwrap(),
                },
            )
        })
        .collect();
    time("replica PutPk (4 KiB, verify + store)", 5_000, |i| {
        handle(&put_pk[i as usize])
    });
    let get_pk = encode_msg(
        0,
        DbqsMessage::GetPk {
            rid: 1,
            id: block.id(),
        },
    );
    time("replica GetPk (4 KiB)", 20_000, |_| handle(&get_pk));
    let small = vec![1u8; 4096];
    let put_small = encode_msg(
        0,
        DbqsMessage::PutContent {
            rid: 1,
            id: content_id(&small),
            data: small.clone(),
            hold: RefRecord::hold(&k, content_id(&small), 1),
        },
    );
    time(
        "replica PutContent (4 KiB, hash + verify the hold + merge + store)",
        20_000,
        |_| handle(&put_small),
    );
    let put_big = encode_msg(
        0,
        DbqsMessage::PutContent {
            rid: 1,
            id: content_id(&mib),
            data: mib.clone(),
            hold: RefRecord::hold(&k, content_id(&mib), 1),
        },
    );
    time("replica PutContent (1 MiB, hash + store)", 300, |_| {
        handle(&put_big)
    });
    let get_big = encode_msg(
        0,
        DbqsMessage::GetContent {
            rid: 1,
            id: content_id(&mib),
        },
    );
    time("replica GetContent (1 MiB)", 300, |_| handle(&get_big));
}
