//! Configuration deltas (`ms::delta`): a delta makes exactly the certified configuration it was
//! taken from, and nothing else gets through: a tampered delta, one applied to another
//! predecessor, one that removes a stranger, or one with a forged certificate is refused; a
//! chain of deltas resolves in turn and stops at the first bad one.

use dbqsfs_core::config::{CertifiedConfig, ConfigChain, Configuration, Member, Params};
use dbqsfs_core::crypto::{Domain, Keypair, Signature};
use dbqsfs_core::ms::delta::{deltas_after, resolve, CertifiedDelta, ConfigDelta, DeltaError};

fn keys(n: u8) -> Vec<Keypair> {
    (0..n).map(|i| Keypair::from_seed([i + 80; 32])).collect()
}

fn config(epoch: u64, ks: &[Keypair], prev: Option<[u8; 32]>) -> Configuration {
    let members = ks
        .iter()
        .map(|k| {
            Member::new(
                k.public(),
                format!("127.0.0.1:{}", 7000 + k.public().0[0] as u16),
            )
        })
        .collect();
    Configuration::new(epoch, Params::with_f(1), members, prev)
}

/// The successor of `prev` with members `ks`, certified by three of `prev`'s committee.
fn next(prev: &Configuration, ks: &[Keypair], all: &[Keypair]) -> CertifiedConfig {
    let c = config(prev.epoch + 1, ks, Some(prev.hash()));
    let signers: Vec<&Keypair> = all
        .iter()
        .filter(|k| prev.committee.contains(&k.node_id()))
        .take(3)
        .collect();
    CertifiedConfig::certify(c, &signers)
}

/// Genesis of members 0..6, then epoch 1 with 6..8 joining and 0 leaving, then epoch 2 with 1
/// leaving.
fn history() -> (
    Vec<Keypair>,
    CertifiedConfig,
    CertifiedConfig,
    CertifiedConfig,
) {
    let ks = keys(8);
    let g = CertifiedConfig::genesis(config(0, &ks[..6], None));
    let c1 = next(&g.config, &ks[1..8], &ks);
    let c2 = next(&c1.config, &ks[2..8], &ks);
    (ks, g, c1, c2)
}

#[test]
fn a_delta_makes_exactly_the_configuration_it_was_taken_from() {
    let (ks, g, c1, _) = history();
    let d = CertifiedDelta::of(&g.config, &c1);
    assert_eq!(d.delta.joined.len(), 2);
    assert_eq!(d.delta.left, vec![ks[0].node_id()]);
    assert_eq!(d.delta.params, None);
    assert_eq!(d.apply(&g.config).unwrap(), c1);
    // Smaller than the whole configuration it stands for.
    let size = |v: &dyn Encoded| v.encoded_len();
    assert!(size(&d) < size(&c1), "{} >= {}", size(&d), size(&c1));
    // A member whose record changed travels as a join of the new record.
    let mut moved = c1.config.clone();
    moved.members[0].addr = "127.0.0.2:9".into();
    let delta = ConfigDelta::between(&g.config, &moved);
    assert_eq!(delta.apply(&g.config).unwrap(), moved);
}

/// The size of a value on the wire.
trait Encoded {
    fn encoded_len(&self) -> usize;
}
impl<T: serde::Serialize> Encoded for T {
    fn encoded_len(&self) -> usize {
        postcard::to_allocvec(self).unwrap().len()
    }
}

#[test]
fn tampered_misapplied_and_forged_deltas_are_refused() {
    let (ks, g, c1, c2) = history();
    let good = CertifiedDelta::of(&g.config, &c1);

    // One more member than the committee certified: the hash no longer matches.
    let mut extra = good.clone();
    extra.delta.joined.push(Member::new(
        Keypair::from_seed([7; 32]).public(),
        "127.0.0.1:1",
    ));
    extra.delta.joined.sort_by_key(|m| m.id);
    assert!(matches!(extra.apply(&g.config), Err(DeltaError::Config(_))));

    // Another committee than the certified one.
    let mut committee = good.clone();
    committee.delta.committee.reverse();
    assert!(committee.apply(&g.config).is_err());

    // Applied to another configuration than the one it was taken against.
    assert!(matches!(
        CertifiedDelta::of(&c1.config, &c2).apply(&g.config),
        Err(DeltaError::OtherPredecessor(2))
    ));

    // Removing a node that is not a member.
    let mut stranger = good.clone();
    stranger
        .delta
        .left
        .push(Keypair::from_seed([8; 32]).node_id());
    stranger.delta.left.sort();
    assert!(matches!(
        stranger.apply(&g.config),
        Err(DeltaError::NotAMember(1))
    ));

    // Lists out of order (a delta is applied in one walk beside the sorted members).
    let mut unsorted = good.clone();
    unsorted.delta.joined.reverse();
    assert!(unsorted.delta.joined.len() >= 2);
    assert!(matches!(
        unsorted.apply(&g.config),
        Err(DeltaError::Unsorted(1))
    ));

    // A certificate signed by nodes outside the committee.
    let mut forged = good.clone();
    let outsiders: Vec<Keypair> = (0..3).map(|i| Keypair::from_seed([200 + i; 32])).collect();
    let hash = c1.config.hash();
    forged.cert.signatures = outsiders
        .iter()
        .map(|k| (k.node_id(), k.sign(Domain::Configuration, &hash)))
        .collect();
    assert!(matches!(
        forged.apply(&g.config),
        Err(DeltaError::Config(_))
    ));
    // Or by the committee's ids with made-up signatures.
    let mut made_up = good.clone();
    for (_, sig) in &mut made_up.cert.signatures {
        *sig = Signature([1; 64]);
    }
    assert!(matches!(
        made_up.apply(&g.config),
        Err(DeltaError::Config(_))
    ));
    let _ = ks;
}

#[test]
fn a_chain_of_deltas_resolves_in_turn_and_stops_at_the_first_bad_one() {
    let (_, g, c1, c2) = history();
    let mut full = ConfigChain::new(g.clone()).unwrap();
    full.extend(vec![c1.clone(), c2.clone()]).unwrap();
    let deltas = deltas_after(&full, 0, 64);
    assert_eq!(deltas.len(), 2);

    // A node at genesis takes both.
    let behind = ConfigChain::new(g.clone()).unwrap();
    let (configs, refused) = resolve(&behind, &deltas);
    assert_eq!(configs, vec![c1.clone(), c2.clone()]);
    assert!(refused.is_none());

    // A node at epoch 1 skips the first.
    let mut at1 = ConfigChain::new(g.clone()).unwrap();
    at1.extend(vec![c1.clone()]).unwrap();
    let (configs, refused) = resolve(&at1, &deltas);
    assert_eq!(configs, vec![c2.clone()]);
    assert!(refused.is_none());

    // A node that lacks the epoch before the first delta takes nothing (it pulls).
    let (configs, refused) = resolve(&behind, &deltas[1..]);
    assert!(configs.is_empty());
    assert!(matches!(
        refused,
        Some(DeltaError::NoPredecessor { epoch: 2 })
    ));

    // A bad second delta: the first is kept, the reason given.
    let mut bad = deltas.clone();
    bad[1].delta.committee.clear();
    let (configs, refused) = resolve(&behind, &bad);
    assert_eq!(configs, vec![c1]);
    assert!(refused.is_some());
}

#[test]
fn any_successor_round_trips_through_its_delta() {
    // A small deterministic generator: members of a pool of 60 are in or out of each side, and
    // some change their address.
    let pool = keys(60);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_u = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..200 {
        let mut pick = |moved: bool| -> Vec<Member> {
            pool.iter()
                .filter_map(|k| {
                    let r = next_u();
                    (r % 3 != 0).then(|| {
                        let port = if moved && r % 7 == 0 { 2 } else { 1 };
                        Member::new(k.public(), format!("127.0.0.1:{port}"))
                    })
                })
                .collect()
        };
        let (a, b) = (pick(false), pick(true));
        if a.len() < 4 || b.len() < 4 {
            continue;
        }
        let prev = Configuration::new(3, Params::with_f(1), a, Some([3; 32]));
        let next = Configuration::new(4, Params::with_f(1), b, Some(prev.hash()));
        let d = ConfigDelta::between(&prev, &next);
        assert_eq!(d.apply(&prev).unwrap(), next);
    }
}
