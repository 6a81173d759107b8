//! Configuration and delta sizes as the membership grows (simulated 1k, 10k and 100k members).
//!
//! Run: `cargo run --release -p dbqsfs-examples --example config_sizes`.
//!
//! A configuration is what nodes pull: every member (id, key, address), the committee, the
//! parameters, the predecessor's hash, certified by `2f_ms+1` signatures. A certified delta
//! (`ms::delta::CertifiedDelta`) is what pushes carry: what an epoch changes (here 1% of members
//! joining and 1% leaving) with the whole configuration's certificate. Times are for computing the
//! configuration hash (what the committee signs and every follower checks) and for applying and
//! verifying a delta (what a follower does with a push).

use dbqsfs_core::config::{CertifiedConfig, Configuration, Member, Params};
use dbqsfs_core::crypto::Keypair;
use dbqsfs_core::ms::delta::CertifiedDelta;
use std::time::Instant;

fn main() {
    let params = Params::with_f(1);
    println!(
        "| members | configuration | certified | certified delta (1% join, 1% leave) | hash time | delta apply + verify |"
    );
    println!("|---|---|---|---|---|---|");
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
