//! What a committee member collects: freshness certificates and the next configuration's
//! certificate, from shares that verify, each assembled once.

use dbqsfs_core::config::{Configuration, Freshness, Member, Params};
use dbqsfs_core::crypto::{Domain, Keypair, NodeId};
use dbqsfs_core::ms::shares::{FreshnessShares, NextConfig};

fn keys() -> Vec<Keypair> {
    (0..5).map(|i| Keypair::from_seed([i + 80; 32])).collect()
}

fn config(epoch: u64, ks: &[Keypair]) -> Configuration {
    let members = ks
        .iter()
        .map(|k| Member::new(k.public(), "127.0.0.1:1"))
        .collect();
    Configuration::new(epoch, Params::with_f(1), members, None)
}

fn committee<'a>(c: &Configuration, ks: &'a [Keypair]) -> Vec<&'a Keypair> {
    c.committee
        .iter()
        .map(|id| ks.iter().find(|k| k.node_id() == *id).unwrap())
        .collect()
}

#[test]
fn a_freshness_certificate_comes_from_2f_plus_1_valid_shares_once() {
    let ks = keys();
    let c = config(3, &ks);
    let members = committee(&c, &ks);
    let outsider = ks
        .iter()
        .find(|k| !c.committee.contains(&k.node_id()))
        .unwrap();
    let mut shares = FreshnessShares::new(c.clone());
    let t = 6_000;
    let share = |k: &Keypair| Freshness::sign_share(k, &c, t);
    // An outsider's share, a share for another time, a repeated share: none counts.
    assert!(shares.add(t, outsider.node_id(), share(outsider)).is_none());
    assert!(shares
        .add(
            t,
            members[0].node_id(),
            Freshness::sign_share(members[0], &c, t + 1)
        )
        .is_none());
    assert!(shares
        .add(t, members[0].node_id(), share(members[0]))
        .is_none());
    assert!(shares
        .add(t, members[0].node_id(), share(members[0]))
        .is_none());
    assert!(shares
        .add(t, members[1].node_id(), share(members[1]))
        .is_none());
    let cert = shares
        .add(t, members[2].node_id(), share(members[2]))
        .expect("2f+1 = 3 shares");
    assert!(cert.verify(&c).is_ok());
    assert_eq!(cert.time_ms, t);
    // The fourth share does not assemble it again.
    assert!(shares
        .add(t, members[3].node_id(), share(members[3]))
        .is_none());
}

#[test]
fn the_next_configuration_is_certified_with_shares_that_came_before_this_member_computed_it() {
    let ks = keys();
    let prev = config(3, &ks);
    let next = config(4, &ks[..4]);
    let members = committee(&prev, &ks);
    let hash = next.hash();
    let sign = |k: &Keypair| k.sign(Domain::Configuration, &hash);
    let mut nc = NextConfig::default();
    // Early: one valid share, one over another configuration, one forged (signed by another key).
    assert!(nc
        .share(members[1].node_id(), hash, sign(members[1]))
        .is_none());
    assert!(nc
        .share(
            members[2].node_id(),
            [7; 32],
            members[2].sign(Domain::Configuration, &[7; 32])
        )
        .is_none());
    let forged: NodeId = members[3].node_id();
    assert!(nc.share(forged, hash, sign(members[2])).is_none());
    assert!(!nc.ended());
    let (mine, done) = nc.end(prev.clone(), next.clone(), members[0]).unwrap();
    assert_eq!(mine, sign(members[0]));
    assert!(done.is_none(), "two valid signatures of three needed");
    assert!(
        nc.end(prev.clone(), next.clone(), members[0]).is_none(),
        "ended once"
    );
    let cc = nc
        .share(members[2].node_id(), hash, sign(members[2]))
        .expect("the third valid signature completes it");
    assert_eq!(cc.config, next);
}
