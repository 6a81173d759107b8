//! What one threshold key for the Membership Service would cost (issue 14): FROST over Ed25519
//! (`frost-ed25519`, RFC 9591) for committees of 4, 7 and 10 members (`3f+1`, threshold `2f+1`),
//! measured here with the crate's own primitives, beside today's certificates of `2f+1` separate
//! ed25519 signatures. Not wired into the MS yet: this is the measurement the design starts from.
//!
//! Run: `cargo run --release -p dbqsfs-examples --example threshold_costs`.
//!
//! Per committee size: the distributed key generation (Pedersen DKG with proofs of knowledge: one
//! broadcast round, one round of sub-shares sent to each member, then each member's check of what
//! it received against the commitments), the bytes it moves; a refresh of the shares among the
//! same members (the key stays the same, old shares stop working with new ones); signing a
//! configuration hash with `2f+1` shares (two rounds) and aggregating; checking it. The aggregated
//! signature is an ordinary Ed25519 signature under one 32-byte key, checked here with
//! `ed25519-dalek`'s `verify_strict`.
//!
//! The second table moves the key to a new committee of the same size in which a quarter of the
//! members changed (members leave, others join), the way the dependency review planned it with
//! the crate's primitives: each joiner gets a share of the same key from `2f+1` old members by the
//! repairable threshold scheme (`keys::repairable`: each helper splits its Lagrange-weighted share
//! into random deltas for the other helpers, each helper sends the joiner the sum of what it
//! received), then the new committee refreshes its shares (`keys::refresh`), which leaves the
//! departed members' shares useless. The joiner's share is checked by a trial signature; the
//! repair itself gives no per-helper evidence (a Byzantine helper's bad delta is not attributed),
//! which is the gap issue 14's verifiable redistribution must close.
//!
//! The third table is that redistribution as built (`dbqsfs_core::ms::key`): a key generation among
//! the first committee, then the key moved to a committee with a quarter of its members replaced,
//! every deal applied to every member's copy of the transcript (its commitments, and at genesis its proof of knowledge,
//! checked), every receiver's sub-shares opened and checked and its share computed, and the new
//! committee's FROST signature checked under the unchanged key; then one dealer's wrong sub-share
//! found by its receiver, the complaint (a Chaum–Pedersen proof) checked and the dealer replaced.

use dbqsfs_core::crypto::{Domain, Keypair, NodeId};
use dbqsfs_core::ms::key::{self, Holder, KeyOp, Round, SealKey, Transcript};
use frost_ed25519 as frost;
use frost_ed25519::keys::{dkg, refresh, repairable, KeyPackage, PublicKeyPackage};
use frost_ed25519::Identifier;
use rand_core06::OsRng;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A DKG (or, with `old`, a refresh) among `n` members with threshold `t`: returns every member's
/// key package, the public package, the bytes sent in all, and the time (one core, all members).
fn keygen(
    n: u16,
    t: u16,
    old: Option<&(BTreeMap<Identifier, KeyPackage>, PublicKeyPackage)>,
) -> (
    BTreeMap<Identifier, KeyPackage>,
    PublicKeyPackage,
    usize,
    Duration,
) {
    let ids: Vec<Identifier> = match old {
        Some((keys, _)) => keys.keys().copied().collect(),
        None => (1..=n).map(|i| Identifier::try_from(i).unwrap()).collect(),
    };
    let start = Instant::now();
    let mut bytes = 0;
    let mut secrets1 = BTreeMap::new();
    let mut round1 = BTreeMap::new();
    for id in &ids {
        let (s, p) = match old {
            None => dkg::part1(*id, n, t, OsRng).unwrap(),
            Some(_) => refresh::refresh_dkg_part1(*id, n, t, OsRng).unwrap(),
        };
        // Broadcast to the n-1 others.
        bytes += p.serialize().unwrap().len() * (n as usize - 1);
        secrets1.insert(*id, s);
        round1.insert(*id, p);
    }
    let mut secrets2 = BTreeMap::new();
    let mut inbox: BTreeMap<Identifier, BTreeMap<Identifier, dkg::round2::Package>> =
        BTreeMap::new();
    for id in &ids {
        let mut others = round1.clone();
        others.remove(id);
        let (s, out) = match old {
            None => dkg::part2(secrets1.remove(id).unwrap(), &others).unwrap(),
            Some(_) => refresh::refresh_dkg_part2(secrets1.remove(id).unwrap(), &others).unwrap(),
        };
        for (to, p) in out {
            bytes += p.serialize().unwrap().len();
            inbox.entry(to).or_default().insert(*id, p);
        }
        secrets2.insert(*id, s);
    }
    let mut keys = BTreeMap::new();
    let mut public = None;
    for id in &ids {
        let mut others = round1.clone();
        others.remove(id);
        let (kp, pp) = match old {
            None => dkg::part3(&secrets2[id], &others, &inbox[id]).unwrap(),
            Some((old_keys, old_public)) => refresh::refresh_dkg_shares(
                &secrets2[id],
                &others,
                &inbox[id],
                old_public.clone(),
                old_keys[id].clone(),
            )
            .unwrap(),
        };
        keys.insert(*id, kp);
        public = Some(pp);
    }
    (keys, public.unwrap(), bytes, start.elapsed())
}

/// Signs `msg` with the shares of `signers` (two rounds) and aggregates; returns the signature
/// and the time, or the aggregator's refusal (a share that does not verify, with its culprit).
fn sign(
    keys: &BTreeMap<Identifier, KeyPackage>,
    public: &PublicKeyPackage,
    signers: &[Identifier],
    msg: &[u8],
) -> Result<(frost::Signature, Duration), frost::Error> {
    let start = Instant::now();
    let mut nonces = BTreeMap::new();
    let mut commitments = BTreeMap::new();
    for id in signers {
        let (n, c) = frost::round1::commit(keys[id].signing_share(), &mut OsRng);
        nonces.insert(*id, n);
        commitments.insert(*id, c);
    }
    let package = frost::SigningPackage::new(commitments, msg);
    let mut shares = BTreeMap::new();
    for id in signers {
        shares.insert(*id, frost::round2::sign(&package, &nonces[id], &keys[id])?);
    }
    let sig = frost::aggregate(&package, &shares, public)?;
    Ok((sig, start.elapsed()))
}

/// Moves the key of `keys` (committee 1..=n) to a committee where the first `changed` members
/// are replaced by new ones: the joiners' shares by repair from `t` remaining members, then a
/// refresh over the new committee. Returns the new committee's keys and public package, bytes
/// sent and time.
fn rotate(
    keys: &BTreeMap<Identifier, KeyPackage>,
    public: &PublicKeyPackage,
    n: u16,
    t: u16,
    changed: u16,
) -> (
    BTreeMap<Identifier, KeyPackage>,
    PublicKeyPackage,
    usize,
    Duration,
) {
    let start = Instant::now();
    let mut bytes = 0;
    let stay: Vec<Identifier> = keys.keys().skip(changed as usize).copied().collect();
    let helpers: Vec<Identifier> = stay.iter().take(t as usize).copied().collect();
    let joiners: Vec<Identifier> = (n + 1..=n + changed)
        .map(|i| Identifier::try_from(i).unwrap())
        .collect();
    let mut new_keys: BTreeMap<Identifier, KeyPackage> =
        stay.iter().map(|id| (*id, keys[id].clone())).collect();
    let mut shares = public.verifying_shares().clone();
    for j in &joiners {
        // Each helper splits its weighted share into deltas, one for each helper.
        let mut received: BTreeMap<Identifier, Vec<repairable::Delta>> = BTreeMap::new();
        for h in &helpers {
            let deltas = repairable::repair_share_part1::<frost::Ed25519Sha512, _>(
                &helpers, &keys[h], &mut OsRng, *j,
            )
            .unwrap();
            for (to, d) in deltas {
                bytes += d.serialize().len();
                received.entry(to).or_default().push(d);
            }
        }
        // Each helper sends the joiner the sum of what it received.
        let sigmas: Vec<repairable::Sigma> = helpers
            .iter()
            .map(|h| repairable::repair_share_part2(&received[h]))
            .collect();
        bytes += sigmas.iter().map(|s| s.serialize().len()).sum::<usize>();
        let kp = repairable::repair_share_part3(&sigmas, *j, public).unwrap();
        shares.insert(*j, *kp.verifying_share());
        new_keys.insert(*j, kp);
    }
    for id in keys.keys().take(changed as usize) {
        shares.remove(id);
    }
    let enrolled = PublicKeyPackage::new(shares, *public.verifying_key(), Some(t));
    // The joiners' shares are on the key's polynomial: a trial signature with one of them.
    let mut trial: Vec<Identifier> = joiners.iter().take(1).copied().collect();
    trial.extend(stay.iter().take(t as usize - 1));
    sign(&new_keys, &enrolled, &trial, b"trial").expect("a joiner's share signs");
    // The new committee refreshes: the departed members' shares no longer combine.
    let (refreshed, new_public, refresh_bytes, _) = keygen(n, t, Some(&(new_keys, enrolled)));
    (
        refreshed,
        new_public,
        bytes + refresh_bytes,
        start.elapsed(),
    )
}

/// One round of `ms::key` among `dealers` to `receivers` (node numbers), every member correct,
/// one core: returns the transcript, each receiver's holder, the bytes of the deals and the time.
fn vsr_round(
    epoch: u64,
    dealers: &[u16],
    receivers: &[u16],
    t: usize,
    holders: &BTreeMap<u16, Holder>,
    old: Option<&key::PublicShares>,
    spoil: bool,
) -> (Transcript, BTreeMap<u16, Holder>, usize, Duration) {
    let id = |i: u16| {
        let mut b = [0u8; 32];
        b[..2].copy_from_slice(&i.to_le_bytes());
        NodeId(b)
    };
    let seal = |i: u16| SealKey::from_seed(&[i as u8; 32]);
    let round = Round {
        epoch,
        dealers: dealers.iter().map(|i| id(*i)).collect(),
        old: old.cloned(),
        receivers: receivers
            .iter()
            .map(|i| (id(*i), seal(*i).public()))
            .collect(),
        threshold: t,
    };
    let start = Instant::now();
    // Every receiver applies every operation to its own transcript (the others' copies are
    // applied here too, so the time is the whole committee's).
    let mut copies: Vec<Transcript> = (1..receivers.len())
        .map(|_| Transcript::new(round.clone()).expect("a round"))
        .collect();
    let mut transcript = Transcript::new(round.clone()).expect("a round");
    let mut bytes = 0;
    for (k, d) in dealers.iter().enumerate() {
        let share = holders.get(d).and_then(|h| h.to_deal(epoch));
        let mut deal = key::deal(&round, &id(*d), share, &mut OsRng).expect("deals");
        if spoil && k == 0 {
            deal.sealed[1] = [9; 32];
        }
        bytes += postcard::to_allocvec(&deal).expect("encodes").len();
        let op = KeyOp::Deal(deal);
        for c in &mut copies {
            c.apply(&id(*d), &op).expect("a correct deal");
        }
        transcript.apply(&id(*d), &op).expect("a correct deal");
    }
    let mut out = BTreeMap::new();
    for r in receivers {
        let share = match transcript.share(&id(*r), &seal(*r)) {
            Ok(s) => s,
            Err(key::KeyError::BadSubShare(dealer)) => {
                let complaint = transcript
                    .check(&id(*r), &seal(*r), &dealer, &mut OsRng)
                    .expect("checks")
                    .expect_err("a wrong sub-share");
                bytes += postcard::to_allocvec(&complaint).expect("encodes").len();
                let op = KeyOp::Complaint(complaint);
                for c in &mut copies {
                    c.apply(&id(*r), &op).expect("a true complaint");
                }
                transcript.apply(&id(*r), &op).expect("a true complaint");
                transcript.share(&id(*r), &seal(*r)).expect("a share now")
            }
            Err(e) => panic!("{e}"),
        };
        let mut h = Holder::default();
        h.install(share);
        out.insert(*r, h);
    }
    // Shares computed before the complaint are of the first qualified set: computed again.
    if spoil {
        for r in receivers {
            let share = transcript.share(&id(*r), &seal(*r)).expect("a share");
            out.get_mut(r).expect("held").install(share);
        }
    }
    (transcript, out, bytes, start.elapsed())
}

/// Signs with the first `t` holders and checks the signature under `key`.
fn vsr_signs(
    transcript: &Transcript,
    holders: &BTreeMap<u16, Holder>,
    epoch: u64,
    t: usize,
) -> bool {
    let public = transcript.public().expect("qualified");
    let shares: Vec<&key::KeyShare> = holders
        .values()
        .filter_map(|h| h.for_signing(epoch))
        .take(t)
        .collect();
    let mut nonces = Vec::new();
    let mut commitments = BTreeMap::new();
    for s in &shares {
        let (n, c) = key::sign::commit(s, &mut OsRng);
        nonces.push(n);
        commitments.insert(key::sign::identifier(s.position), c);
    }
    let package = key::sign::SigningPackage::new(commitments, b"configuration");
    let sig_shares = shares
        .iter()
        .zip(&nonces)
        .map(|(s, n)| {
            (
                key::sign::identifier(s.position),
                key::sign::sign(s, &package, n).expect("signs"),
            )
        })
        .collect();
    let sig = key::sign::aggregate(&public, &package, &sig_shares).expect("aggregates");
    key::sign::verify(&public.group_key(), b"configuration", &sig)
}

fn main() {
    let msg = [0x5au8; 32]; // a configuration hash
    println!(
        "| committee | threshold | DKG (all members, one core) | DKG bytes | refresh | refresh bytes | sign + aggregate | certificate today | check: one signature | check today (t signatures) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in [4u16, 7, 10] {
        let f = (n - 1) / 3;
        let t = 2 * f + 1;
        let (keys, public, dkg_bytes, dkg_time) = keygen(n, t, None);
        let group_key = public.verifying_key().serialize().unwrap();
        let (refreshed, new_public, refresh_bytes, refresh_time) =
            keygen(n, t, Some(&(keys.clone(), public.clone())));
        assert_eq!(
            new_public.verifying_key().serialize().unwrap(),
            group_key,
            "a refresh keeps the key"
        );

        let signers: Vec<Identifier> = refreshed.keys().take(t as usize).copied().collect();
        let (sig, sign_time) = sign(&refreshed, &new_public, &signers, &msg).unwrap();
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&group_key.clone().try_into().unwrap())
            .unwrap();
        let dalek_sig = ed25519_dalek::Signature::from_slice(&sig.serialize().unwrap()).unwrap();
        let rounds = 200;
        let start = Instant::now();
        for _ in 0..rounds {
            vk.verify_strict(&msg, &dalek_sig)
                .expect("an Ed25519 signature");
        }
        let verify_one = start.elapsed() / rounds;

        // A member that kept its old share cannot sign with the refreshed ones: the aggregator
        // names it.
        let mut mixed = refreshed.clone();
        let first = signers[0];
        mixed.insert(first, keys[&first].clone());
        match sign(&mixed, &new_public, &signers, &msg) {
            Err(frost::Error::InvalidSignatureShare { culprits }) => {
                assert_eq!(culprits, vec![first])
            }
            other => panic!("an old share signed with refreshed ones: {other:?}"),
        }

        // Today: t separate signatures, each checked.
        let members: Vec<Keypair> = (0..t)
            .map(|i| Keypair::from_seed([i as u8 + 1; 32]))
            .collect();
        let start = Instant::now();
        let sigs: Vec<_> = members
            .iter()
            .map(|k| k.sign(Domain::Configuration, &msg))
            .collect();
        let sign_today = start.elapsed();
        let start = Instant::now();
        for _ in 0..rounds {
            for (k, s) in members.iter().zip(&sigs) {
                k.public()
                    .verify(Domain::Configuration, &msg, s)
                    .expect("verifies");
            }
        }
        let verify_today = start.elapsed() / rounds;
        println!(
            "| {n} | {t} | {:.1} ms | {:.1} KiB | {:.1} ms | {:.1} KiB | {:.2} ms | {:.2} ms ({} bytes) | {:.3} ms (64 bytes) | {:.3} ms |",
            ms(dkg_time),
            dkg_bytes as f64 / 1024.0,
            ms(refresh_time),
            refresh_bytes as f64 / 1024.0,
            ms(sign_time),
            ms(sign_today),
            t as usize * (32 + 64),
            ms(verify_one),
            ms(verify_today)
        );
    }
    println!();
    println!("| committee | members changed | move the key (repair the joiners' shares, then refresh) | bytes | the key stays | a departed member's share |");
    println!("|---|---|---|---|---|---|");
    for n in [4u16, 7, 10] {
        let f = (n - 1) / 3;
        let t = 2 * f + 1;
        let changed = n.div_ceil(4);
        let (keys, public, _, _) = keygen(n, t, None);
        let (new_keys, new_public, bytes, time) = rotate(&keys, &public, n, t, changed);
        assert_eq!(new_public.verifying_key(), public.verifying_key());
        let signers: Vec<Identifier> = new_keys.keys().rev().take(t as usize).copied().collect();
        sign(&new_keys, &new_public, &signers, b"next").expect("the new committee signs");
        // A departed member's old share, mixed with the new committee's, is refused.
        let departed = *keys.keys().next().unwrap();
        let mut mixed = new_keys.clone();
        let replaced = signers[0];
        let mut old = keys[&departed].clone();
        // It claims a new member's place, as a coalition of the departed would have to.
        old = KeyPackage::new(
            replaced,
            *old.signing_share(),
            *old.verifying_share(),
            *old.verifying_key(),
            *old.min_signers(),
        );
        mixed.insert(replaced, old);
        let refused = sign(&mixed, &new_public, &signers, b"next").is_err();
        assert!(
            refused,
            "a departed member's share signed with the new committee"
        );
        println!(
            "| {n} | {changed} | {:.1} ms | {:.1} KiB | yes | refused |",
            ms(time),
            bytes as f64 / 1024.0
        );
    }
    println!();
    println!("| committee | verifiable key generation (all members, one core) | deal bytes | move the key to a committee with a quarter replaced | deal bytes | the key stays, the new committee signs | with one wrong sub-share: complaint checked, dealer replaced |");
    println!("|---|---|---|---|---|---|---|");
    for n in [4u16, 7, 10] {
        let f = (n as usize - 1) / 3;
        let t = 2 * f + 1;
        let first: Vec<u16> = (1..=n).collect();
        let changed = n.div_ceil(4);
        let next: Vec<u16> = (1 + changed..=n + changed).collect();
        let (t0, h0, gen_bytes, gen_time) =
            vsr_round(0, &first, &first, t, &BTreeMap::new(), None, false);
        let public0 = t0.public().expect("qualified");
        assert!(vsr_signs(&t0, &h0, 0, t));
        let (t1, h1, move_bytes, move_time) =
            vsr_round(1, &first, &next, t, &h0, Some(&public0), false);
        let same = t1.public().expect("qualified").group_key() == public0.group_key()
            && vsr_signs(&t1, &h1, 1, t);
        let (t2, h2, _, spoil_time) = vsr_round(1, &first, &next, t, &h0, Some(&public0), true);
        let replaced = t2.disproven().len() == 1
            && t2.public().expect("qualified").group_key() == public0.group_key()
            && vsr_signs(&t2, &h2, 1, t);
        assert!(same && replaced);
        println!(
            "| {n} | {:.1} ms | {:.1} KiB | {:.1} ms | {:.1} KiB | yes | {:.1} ms, yes |",
            ms(gen_time),
            gen_bytes as f64 / 1024.0,
            ms(move_time),
            move_bytes as f64 / 1024.0,
            ms(spoil_time)
        );
    }
}
