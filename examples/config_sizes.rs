//! Configuration and delta sizes as the membership grows (simulated 1k, 10k and 100k members).
//!
//! Run: `cargo run --release -p dbqsfs-examples --example config_sizes`.
//!
//! A configuration is what nodes push and pull today: every member (id, key, address), the
//! committee, the parameters, the predecessor's hash, certified by `2f_ms+1` signatures. A delta is
//! what an epoch changes (1% of members joining and 1% leaving, a new committee): the size an
//! incremental encoding would need. Times are for computing the configuration hash (what the
//! committee signs and every follower checks).

use dbqsfs_core::config::{CertifiedConfig, Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId};
use serde::Serialize;
use std::time::Instant;

#[derive(Serialize)]
struct Delta {
    epoch: u64,
    prev: [u8; 32],
    joined: Vec<Member>,
    left: Vec<NodeId>,
    committee: Vec<NodeId>,
}

fn main() {
    let params = Params::with_f(1);
    println!("| members | configuration | certified | delta (1% join, 1% leave) | hash time |");
    println!("|---|---|---|---|---|");
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
        let config = Configuration::new(1, params.clone(), members.clone(), Some([1; 32]));
        let t = Instant::now();
        let hash = config.hash();
        let hash_time = t.elapsed();
        let signers: Vec<&Keypair> = keys.iter().take(3).collect();
        let certified = CertifiedConfig::certify(config.clone(), &signers);
        let churn = n / 100;
        let delta = Delta {
            epoch: 2,
            prev: hash,
            joined: members[..churn].to_vec(),
            left: members[churn..2 * churn].iter().map(|m| m.id).collect(),
            committee: config.committee.clone(),
        };
        let size = |v: &dyn erased::Size| v.size();
        println!(
            "| {n} | {} | {} | {} | {:.1} ms |",
            human(size(&config)),
            human(size(&certified)),
            human(size(&delta)),
            hash_time.as_secs_f64() * 1e3
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
