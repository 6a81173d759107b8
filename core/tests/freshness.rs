//! Freshness leases: a client uses a configuration only while it holds a certificate, signed by
//! 2f_ms+1 members of that epoch's committee, younger than its lease.

use dbqsfs_core::config::{CertifiedConfig, ConfigChain, Configuration, Freshness, Member, Params};
use dbqsfs_core::crypto::{Keypair, ObjectId};
use dbqsfs_core::dbqs::client::{Client, ClientOptions, ClientOutput, Operation};

fn setup() -> (Vec<Keypair>, Configuration) {
    let keys: Vec<Keypair> = (0..4).map(|i| Keypair::from_seed([i + 80; 32])).collect();
    let members = keys
        .iter()
        .map(|k| Member::new(k.public(), "127.0.0.1:1"))
        .collect();
    (
        keys,
        Configuration::new(0, Params::with_f(1), members, None),
    )
}

fn cert(keys: &[Keypair], c: &Configuration, time: u64, signers: usize) -> Freshness {
    let shares = keys
        .iter()
        .take(signers)
        .map(|k| (k.node_id(), Freshness::sign_share(k, c, time)))
        .collect();
    Freshness::assemble(c, time, shares)
}

fn sends(client: &mut Client) -> (usize, bool) {
    let (mut n, mut need) = (0, false);
    while let Some(o) = client.poll_output() {
        match o {
            ClientOutput::Send { .. } => n += 1,
            ClientOutput::NeedFreshness { .. } => need = true,
            _ => {}
        }
    }
    (n, need)
}

#[test]
fn a_client_whose_lease_expired_waits_until_it_learns_a_fresh_certificate() {
    let (keys, c) = setup();
    let chain = ConfigChain::new(CertifiedConfig::genesis(c.clone())).unwrap();
    let opts = ClientOptions {
        freshness_lease_ms: Some(1_000),
        ..ClientOptions::default()
    };
    let mut client = Client::new(Keypair::from_seed([1; 32]).node_id(), chain, opts);
    let read = || Operation::GetContent {
        id: ObjectId([3; 32]),
    };

    // No certificate yet: the operation waits and the client asks for one.
    client.submit(0, read());
    assert_eq!(sends(&mut client), (0, true));
    client.learn_freshness(10, cert(&keys, &c, 0, 3)).unwrap();
    assert_eq!(
        sends(&mut client).0,
        1,
        "the waiting read starts (one replica first)"
    );

    // Within the lease operations start at once; after it, they wait again.
    client.submit(900, read());
    assert_eq!(sends(&mut client), (1, false));
    client.submit(1_500, read());
    assert_eq!(sends(&mut client), (0, true));
    client
        .learn_freshness(1_600, cert(&keys, &c, 1_400, 3))
        .unwrap();
    assert_eq!(sends(&mut client).0, 1);
}

#[test]
fn under_signed_forged_or_foreign_certificates_are_refused() {
    let (keys, c) = setup();
    assert!(
        cert(&keys, &c, 5, 2).verify(&c).is_err(),
        "2 of 4 committee members"
    );
    let mut dup = cert(&keys, &c, 5, 1);
    dup.signatures = vec![dup.signatures[0]; 3];
    assert!(dup.verify(&c).is_err(), "one member three times");
    let mut later = cert(&keys, &c, 5, 3);
    later.time_ms = 10_000;
    assert!(later.verify(&c).is_err(), "the time is signed");
    let outsiders: Vec<Keypair> = (0..3).map(|i| Keypair::from_seed([i + 90; 32])).collect();
    let foreign = Freshness::assemble(
        &c,
        5,
        outsiders
            .iter()
            .map(|k| (k.node_id(), Freshness::sign_share(k, &c, 5)))
            .collect(),
    );
    assert!(foreign.verify(&c).is_err(), "not the committee");
    assert!(cert(&keys, &c, 5, 3).verify(&c).is_ok());
}
