//! One epoch change of the Membership Service at 1,000, 10,000 and 100,000 members, with the real
//! core types: what the committee computes, what each member sends and receives, and how long the
//! push tree takes to reach every member.
//!
//! Run: `cargo run --release -p dbqsfs-examples --example ms_scale`.
//!
//! The epoch's changes are 1% of the members: 0.5% join (with admission certificates), 0.25%
//! leave, 0.25% are evicted (`f+1` of each one's watchers report it unresponsive). Measured on
//! this machine, one core:
//! - committee CPU: what every committee member does for the epoch's operations and its end:
//!   checking each submitted request's signature, executing it (`ms::membership`), computing
//!   the next configuration and its hash, signing it and checking `2f_ms+1` signatures
//!   (`CertificateCollector`), and the delta it pushes (`CertifiedDelta::of`). The agreement's own
//!   messages (a few signatures per batch) are not counted;
//! - a member's CPU: applying and verifying the pushed delta, and computing the push tree to find
//!   its children (`ms::tree`).
//!
//! Modeled, not measured: the time for the push tree to reach every member is its depth times one
//! hop, a hop being a one-way latency (`LATENCY_MS`) plus sending the delta to two children at
//! `BANDWIDTH_MBIT` plus the member's CPU above. Probing is delegated (`ms::probe`): every member
//! challenges the `3f+1` members after it on the ring once per probe period, whatever the size, and
//! the committee orders only the changes of verdict (`f+1` per evicted member, counted in the
//! requests ordered).

use dbqsfs_core::config::{CertifiedConfig, Configuration, Member, Params};
use dbqsfs_core::crypto::Keypair;
use dbqsfs_core::ms::delta::CertifiedDelta;
use dbqsfs_core::ms::membership::{
    AdmissionCert, CertificateCollector, Executed, Membership, MsOp,
};
use dbqsfs_core::ms::pbft::Request;
use dbqsfs_core::ms::probe::{eviction_reports, watch_count};
use dbqsfs_core::ms::tree::tree_order;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const LATENCY_MS: f64 = 20.0;
const BANDWIDTH_MBIT: f64 = 100.0;

fn key(i: u64) -> Keypair {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&i.to_le_bytes());
    seed[8] = 0x5c;
    Keypair::from_seed(seed)
}

fn member(k: &Keypair, i: u64) -> Member {
    Member::new(
        k.public(),
        format!("10.{}.{}.{}:7100", i >> 16, (i >> 8) & 255, i & 255),
    )
}

fn size<T: serde::Serialize>(v: &T) -> usize {
    postcard::to_allocvec(v).map(|b| b.len()).unwrap_or(0)
}

fn human(b: f64) -> String {
    if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Row {
    n: usize,
    changes: usize,
    committee_cpu: Duration,
    /// Of which: the epoch's end (the next configuration, its hash, the certificate, the delta).
    end_cpu: Duration,
    ops_bytes: usize,
    delta: usize,
    full: usize,
    member_cpu: Duration,
    depth: u32,
    probes: usize,
}

/// One epoch of `n` members that `changes` change (half join, a quarter leave, a quarter are
/// evicted).
fn epoch_change(n: usize, changes: usize) -> Row {
    let params = Params::with_f(1);
    let admission = Keypair::from_seed([0xad; 32]);
    let joiners = changes / 2;
    let leavers = changes / 4;
    let evicted = changes - joiners - leavers;
    let keys: Vec<Keypair> = (0..(n + joiners) as u64).map(key).collect();
    let members: Vec<Member> = keys[..n]
        .iter()
        .enumerate()
        .map(|(i, k)| member(k, i as u64))
        .collect();
    let prev = Configuration::new(1, params.clone(), members, Some([1; 32]));
    let committee: Vec<&Keypair> = keys[..n]
        .iter()
        .filter(|k| prev.committee.contains(&k.node_id()))
        .collect();
    let outside: Vec<&Keypair> = keys[..n]
        .iter()
        .filter(|k| !prev.committee.contains(&k.node_id()))
        .collect();
    let reporters = params.ms_quorum().one_correct();
    let by_id: BTreeMap<_, &Keypair> = keys[..n].iter().map(|k| (k.node_id(), k)).collect();
    // A member's watchers are the members before it on the ring.
    let watchers = |target: &Keypair| -> Vec<&Keypair> {
        let at = prev
            .members
            .binary_search_by(|m| m.id.cmp(&target.node_id()))
            .expect("a member");
        (1..=eviction_reports(&prev))
            .map(|k| by_id[&prev.members[(at + n - k) % n].id])
            .collect()
    };

    // The signed requests the committee orders, as their submitters send them.
    let mut requests: Vec<Request> = Vec::new();
    let mut seq = 1;
    let mut submit = |k: &Keypair, op: MsOp| {
        seq += 1;
        Request::sign(k, seq, postcard::to_allocvec(&op).expect("encodes"))
    };
    for (i, k) in keys[n..].iter().enumerate() {
        let op = MsOp::Join {
            epoch: 1,
            member: member(k, (n + i) as u64),
            cert: AdmissionCert::sign(&admission, &k.public()),
        };
        requests.push(submit(k, op));
    }
    for k in &outside[..leavers] {
        requests.push(submit(k, MsOp::Leave { epoch: 1 }));
    }
    for target in &outside[leavers..leavers + evicted] {
        for w in watchers(target) {
            let op = MsOp::Probe {
                epoch: 1,
                target: target.node_id(),
                responsive: false,
            };
            requests.push(submit(w, op));
        }
    }
    for c in &committee[..reporters] {
        requests.push(submit(c, MsOp::EndEpoch { epoch: 1 }));
    }
    let ops_bytes = requests.iter().map(size).sum();

    // What every committee member computes.
    let t = Instant::now();
    let mut state = Membership::new(prev.clone(), admission.public(), 1 << 16);
    let mut next = None;
    let mut end_started = t;
    for (i, r) in requests.iter().enumerate() {
        if i + 1 == requests.len() {
            end_started = Instant::now();
        }
        r.verify().expect("a signed request");
        let op: MsOp = postcard::from_bytes(&r.payload).expect("an operation");
        if let Executed::EpochEnded(c) = state.execute(&r.client, op, &[7; 32]) {
            next = Some(*c);
        }
    }
    let next = next.expect("the epoch ended");
    let mut collector = CertificateCollector::new(prev.clone(), next.clone());
    let mut certified: Option<CertifiedConfig> = None;
    for c in &committee {
        let sig = collector.sign(c);
        if let Some(cc) = collector.add(c.node_id(), sig) {
            certified.get_or_insert(cc);
        }
    }
    let certified = certified.expect("certified");
    let delta = CertifiedDelta::of(&prev, &certified);
    let committee_cpu = t.elapsed();
    let end_cpu = end_started.elapsed();
    assert_eq!(
        next.members.len(),
        n + joiners - leavers - evicted,
        "every change executed"
    );

    // What every member computes on a push.
    let t = Instant::now();
    let applied = delta.apply(&prev).expect("the delta applies");
    let order = tree_order(&applied.config);
    let member_cpu = t.elapsed();
    assert_eq!(order.len(), next.members.len());

    Row {
        n,
        changes: joiners + leavers + evicted,
        committee_cpu,
        end_cpu,
        ops_bytes,
        delta: size(&delta),
        full: size(&certified),
        member_cpu,
        depth: (next.members.len() as f64 + 1.0).log2().ceil() as u32,
        probes: watch_count(&prev),
    }
}

fn main() {
    let sizes = [1_000, 10_000, 100_000];
    println!("Changes of 1% of the members per epoch:");
    println!();
    println!(
        "| members | changes | committee CPU (of which the epoch's end) | requests ordered | delta | full configuration | sent per member (most) | member CPU | tree depth | to every member (modeled) | challenges per member per period (any member, committee too) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let r = epoch_change(n, n / 100);
        let hop_ms = LATENCY_MS
            + (2 * r.delta) as f64 * 8.0 / (BANDWIDTH_MBIT * 1e6) * 1e3
            + ms(r.member_cpu);
        println!(
            "| {} | {} | {:.1} ms ({:.1} ms) | {} | {} | {} | {} | {:.1} ms | {} | {:.0} ms | {} |",
            r.n,
            r.changes,
            ms(r.committee_cpu),
            ms(r.end_cpu),
            human(r.ops_bytes as f64),
            human(r.delta as f64),
            human(r.full as f64),
            human((2 * r.delta) as f64),
            ms(r.member_cpu),
            r.depth,
            r.depth as f64 * hop_ms,
            r.probes
        );
    }
    println!();
    println!("The same 100 changes at every size (what grows with the members, not the changes):");
    println!();
    println!("| members | committee CPU | of which the epoch's end | delta |");
    println!("|---|---|---|---|");
    for n in sizes {
        let r = epoch_change(n, 100);
        println!(
            "| {} | {:.1} ms | {:.1} ms | {} |",
            r.n,
            ms(r.committee_cpu),
            ms(r.end_cpu),
            human(r.delta as f64)
        );
    }
}
