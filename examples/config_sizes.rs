//! Configuration and delta sizes as the membership grows (simulated 1k, 10k and 100k members).
//!
//! Run: `cargo run --release -p dbqsfs-examples --example config_sizes`.
//!
//! A configuration is what nodes pull: every member (id, key, address), the committee, the
//! parameters, the predecessor's hash, certified by `2f_ms+1` signatures. A certified delta
//! (`ms::delta::CertifiedDelta`) is what pushes carry: what an epoch changes (here 1% of members
//! joining and 1% leaving) with the whole configuration's certificate. Times are for computing the
//! configuration hash (what the committee signs and every follower checks) and for applying and
//! verifying a delta (what a follower does with a push). The second table is a whole
//! configuration fetched in pieces (`ms::pieces`): the head a receiver gets first (every piece's
//! chaining value and the certificate), the pieces, and the receiver's work: verifying the head,
//! checking every piece and verifying the assembled configuration.

use dbqsfs_core::config::{CertifiedConfig, Configuration, Member, Params};
use dbqsfs_core::crypto::Keypair;
use dbqsfs_core::ms::delta::CertifiedDelta;
use dbqsfs_core::ms::pieces::{piece, ConfigHead, Download};
use std::time::Instant;

fn main() {
    let params = Params::with_f(1);
    println!(
        "| members | configuration | certified | certified delta (1% join, 1% leave) | hash time | delta apply + verify |"
    );
    println!("|---|---|---|---|---|---|");
    let mut whole = Vec::new();
    for n in [1_000usize, 10_000, 100_000] {
        let keys: Vec<Keypair> = (0..n)
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
                Keypair::from_seed(seed)
            })
            .collect();
        let members: Vec<Member> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                Member::new(
                    k.public(),
                    format!("10.{}.{}.{}:7100", i >> 16, (i >> 8) & 255, i & 255),
                )
            })
            .collect();
        let churn = n / 100;
        // Epoch 1 has members churn.., epoch 2 drops churn..2*churn and takes ..churn back.
        let prev = Configuration::new(1, params.clone(), members[churn..].to_vec(), Some([1; 32]));
        let mut next_members = members[..churn].to_vec();
        next_members.extend_from_slice(&members[2 * churn..]);
        let config = Configuration::new(2, params.clone(), next_members, Some(prev.hash()));
        let t = Instant::now();
        let _ = config.hash();
        let hash_time = t.elapsed();
        let signers: Vec<&Keypair> = keys
            .iter()
            .filter(|k| prev.committee.contains(&k.node_id()))
            .take(3)
            .collect();
        let certified = CertifiedConfig::certify(config.clone(), &signers);
        let delta = CertifiedDelta::of(&prev, &certified);
        let t = Instant::now();
        let applied = delta.apply(&prev).expect("the delta applies");
        let apply_time = t.elapsed();
        assert_eq!(applied, certified);
        let size = |v: &dyn erased::Size| v.size();
        println!(
            "| {n} | {} | {} | {} | {:.1} ms | {:.1} ms |",
            human(size(&config)),
            human(size(&certified)),
            human(size(&delta)),
            hash_time.as_secs_f64() * 1e3,
            apply_time.as_secs_f64() * 1e3
        );

        let t = Instant::now();
        let (head, bytes) = ConfigHead::of(&certified);
        let serve_time = t.elapsed();
        let head_size = size(&head);
        let t = Instant::now();
        let mut d = Download::new(&prev, head).expect("the head verifies");
        let source = keys[0].node_id();
        while !d.is_complete() {
            for a in d.asks(0, &[source]) {
                let p = piece(&bytes, a.index).expect("a piece").to_vec();
                d.on_piece(a.to, a.index, p).expect("the piece checks");
            }
        }
        let pieces = d.progress().1;
        assert_eq!(d.finish(&prev).expect("it verifies"), certified);
        whole.push((n, head_size, pieces, serve_time, t.elapsed()));
    }
    println!();
    println!("| members | head | pieces (64 KiB) | head + pieces, sender | head + pieces + assembled, receiver |");
    println!("|---|---|---|---|---|");
    for (n, head, pieces, serve, receive) in whole {
        println!(
            "| {n} | {} | {pieces} | {:.1} ms | {:.1} ms |",
            human(head),
            serve.as_secs_f64() * 1e3,
            receive.as_secs_f64() * 1e3
        );
    }
}

fn human(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

mod erased {
    pub trait Size {
        fn size(&self) -> usize;
    }
    impl<T: serde::Serialize> Size for T {
        fn size(&self) -> usize {
            postcard::to_allocvec(self).map(|v| v.len()).unwrap_or(0)
        }
    }
}
