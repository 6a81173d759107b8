//! The deterministic simulator of the MS's threshold key (`dbqsfs_core::ms::key`): a genesis
//! key generation and a chain of redistributions to changing committees, with up to `f` Byzantine
//! members in every old and every new committee, corrupted afresh each epoch (a mobile
//! adversary), checked for what the key promises.
//!
//! Each round's operations (deals, complaints) reach the agreement's order after seeded delays,
//! some long (a slow member, a withheld deal released late); the order is one sequence every
//! member applies to the same [`Transcript`] (the agreement itself is the agreement simulator's
//! subject). Correct members run the core's code unchanged: a dealer deals from its [`Holder`]
//! and erases once its deal is ordered; a receiver checks every sub-share when it sees the deal,
//! complains with proof, and (re)computes its share from the qualified deals. Byzantine dealers
//! withhold, deal late, send bad sub-shares to some receivers, deal a secret that is not their
//! share, equivocate (a second, different deal), send malformed deals or bad proofs; Byzantine
//! receivers complain falsely, with bad proofs, about dealers that never dealt; Byzantine signers
//! send wrong signature shares or drop out.
//!
//! Checked after each round: the round completes; the key is the genesis key; every correct new
//! member holds a share that matches its public verifying share; no correct member's operation is
//! refused and every refused operation came from a Byzantine member; a signature by `2f+1`
//! members of the new committee (Byzantine signers named and replaced) verifies under the key
//! with one ed25519 verification; no member signs for an epoch whose committee it is not in.
//! After the last round: for every epoch, the shares the adversary ever saw (those held by each
//! member while it was corrupted) match fewer than `2f+1` of that epoch's verifying shares, so no
//! coalition can sign.
//!
//! Mutants: `reshare-unverified` (receivers take their sub-shares without checking them against
//! the commitments, and so never complain), `keep-old-shares` (members never erase, and sign with
//! the share they hold).

use crate::rng::Rng;
use dbqsfs_core::crypto::NodeId;
use dbqsfs_core::ms::key::{
    self, sign, Applied, Deal, Holder, KeyError, KeyOp, KeyShare, PublicShares, Round, SealKey,
    Transcript,
};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// Rounds per seed: the genesis key generation and this many redistributions after it.
const RESHARES: u64 = 6;
/// Virtual time by which every round must have completed (deals are submitted within 60, late
/// ones within 400, and receivers look at the order every 5–40).
const ROUND_DEADLINE: u64 = 2_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutant {
    None,
    ReshareUnverified,
    KeepOldShares,
}

pub struct RunOptions {
    pub f: usize,
    pub mutant: Mutant,
}

#[derive(Default, Debug)]
pub struct Report {
    pub rounds: u64,
    pub violations: Vec<String>,
    pub digest: [u8; 32],
    pub setup: String,
    pub stats: Stats,
}

#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    pub deals: u64,
    pub refused: u64,
    pub disproven: u64,
    pub late_complaints: u64,
    pub signatures: u64,
    pub culprits_named: u64,
}

/// How a Byzantine dealer behaves in one round.
#[derive(Clone, Copy, Debug)]
enum Dealing {
    Withhold,
    Late,
    BadSubShares,
    NotMyShare,
    Equivocate,
    Malformed,
    BadProof,
}

/// How a Byzantine receiver behaves in one round.
#[derive(Clone, Copy, Debug)]
enum Receiving {
    Quiet,
    FalseComplaint,
    ForgedProof,
    ComplainAboutAbsent,
}

/// The randomness the core asks the driver for: the run's seeded generator. Not a cryptographic
/// generator, which is what a simulation wants (a seed replays exactly).
struct SimRng<'a>(&'a mut Rng);

impl rand_core06::RngCore for SimRng<'_> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            chunk.copy_from_slice(&self.0.next_u64().to_le_bytes()[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core06::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core06::CryptoRng for SimRng<'_> {}

struct Member {
    seal: SealKey,
    holder: Holder,
}

/// One event of a round, in virtual time.
enum Event {
    /// An operation reaches the agreement's order.
    Ordered(NodeId, KeyOp, bool),
    /// A correct receiver looks at the order.
    Look(NodeId),
}

struct Queue {
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    seq: u64,
    /// Operations on their way to the order.
    ops: usize,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            heap: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            ops: 0,
        }
    }
    fn push(&mut self, at: u64, e: Event) {
        self.seq += 1;
        self.ops += usize::from(matches!(e, Event::Ordered(..)));
        self.heap.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, e);
    }
    fn pop(&mut self) -> Option<(u64, Event)> {
        let Reverse((at, seq)) = self.heap.pop()?;
        let e = self.events.remove(&seq).expect("queued");
        self.ops -= usize::from(matches!(e, Event::Ordered(..)));
        Some((at, e))
    }
}

pub fn run_seed(seed: u64, opts: &RunOptions) -> Report {
    let mut rng = Rng::new(seed);
    let f = opts.f;
    let n = 3 * f + 1;
    let t = 2 * f + 1;
    let mut report = Report::default();
    let mut digest = blake3::Hasher::new();

    // A pool of nodes; each epoch's committee keeps some of the last one's members.
    let pool: Vec<NodeId> = (0..3 * n).map(|_| NodeId(rng.seed32())).collect();
    let mut members: BTreeMap<NodeId, Member> = pool
        .iter()
        .map(|id| {
            let seal = SealKey::from_seed(&rng.seed32());
            let mut holder = Holder::default();
            holder.keep_old_shares = opts.mutant == Mutant::KeepOldShares;
            (*id, Member { seal, holder })
        })
        .collect();
    let mut committees: Vec<Vec<NodeId>> = Vec::new();
    let mut shuffled = pool.clone();
    rng.shuffle(&mut shuffled);
    committees.push(shuffled[..n].to_vec());
    for _ in 0..RESHARES {
        let mut next = committees.last().expect("one").clone();
        let changes = rng.range(0, (n as u64).div_ceil(2)) as usize;
        for _ in 0..changes {
            let outside: Vec<NodeId> = pool.iter().filter(|p| !next.contains(p)).copied().collect();
            let slot = rng.below(n);
            next[slot] = *rng.pick(&outside);
        }
        committees.push(next);
    }
    // The corrupted members of each epoch: at most f of its committee, drawn afresh; half the
    // time the adversary goes for the members that sat in the most committees before, whose old
    // shares it would gain if they were not erased.
    let corrupted: Vec<BTreeSet<NodeId>> = (0..committees.len())
        .map(|e| {
            let k = rng.range(0, f as u64) as usize;
            let mut c = committees[e].clone();
            rng.shuffle(&mut c);
            if rng.chance(0.5) {
                c.sort_by_key(|m| {
                    Reverse(committees[..e].iter().filter(|p| p.contains(m)).count())
                });
            }
            c.into_iter().take(k).collect()
        })
        .collect();
    report.setup = format!(
        "f={f} committees={} corrupted={:?}",
        committees.len(),
        corrupted.iter().map(BTreeSet::len).collect::<Vec<_>>()
    );

    // What the adversary saw: every share a member held while corrupted, by epoch.
    let mut seen: BTreeMap<u64, BTreeMap<usize, [u8; 32]>> = BTreeMap::new();
    let mut publics: Vec<PublicShares> = Vec::new();
    let mut genesis_key = None;

    for epoch in 0..=RESHARES {
        let receivers = &committees[epoch as usize];
        let (dealers, bad_dealers) = if epoch == 0 {
            (receivers.clone(), &corrupted[0])
        } else {
            (
                committees[epoch as usize - 1].clone(),
                &corrupted[epoch as usize - 1],
            )
        };
        let bad_receivers = &corrupted[epoch as usize];
        let round = Round {
            epoch,
            dealers: dealers.clone(),
            old: publics.last().cloned(),
            receivers: receivers
                .iter()
                .map(|r| (*r, members[r].seal.public()))
                .collect(),
            threshold: t,
        };
        let mut transcript = match Transcript::new(round.clone()) {
            Ok(tr) => tr,
            Err(e) => {
                report
                    .violations
                    .push(format!("epoch {epoch}: the round was refused: {e}"));
                break;
            }
        };
        let mut queue = Queue::new();
        for d in &dealers {
            let old = members[d].holder.to_deal(epoch);
            let Ok(honest) = key::deal(&round, d, old, &mut SimRng(&mut rng)) else {
                if bad_dealers.contains(d) {
                    // A Byzantine member that left itself without a share: it cannot deal.
                    continue;
                }
                report.violations.push(format!(
                    "epoch {epoch}: dealer {d:?} holds no share of epoch {} to deal",
                    epoch.saturating_sub(1)
                ));
                continue;
            };
            if !bad_dealers.contains(d) {
                let at = rng.range(0, 60);
                queue.push(at, Event::Ordered(*d, KeyOp::Deal(honest), true));
                continue;
            }
            let how = *rng.pick(&[
                Dealing::Withhold,
                Dealing::Late,
                Dealing::BadSubShares,
                Dealing::BadSubShares,
                Dealing::NotMyShare,
                Dealing::Equivocate,
                Dealing::Malformed,
                Dealing::BadProof,
            ]);
            let at = rng.range(0, 60);
            match how {
                Dealing::Withhold => {}
                Dealing::Late => {
                    let at = rng.range(200, 400);
                    queue.push(at, Event::Ordered(*d, KeyOp::Deal(honest), false));
                }
                Dealing::BadSubShares => {
                    let bad = spoil(&mut rng, honest, receivers.len());
                    queue.push(at, Event::Ordered(*d, KeyOp::Deal(bad), false));
                }
                Dealing::NotMyShare => {
                    // A deal of a secret that is not its share: a fresh genesis-style deal.
                    let fresh = Round {
                        old: None,
                        ..round.clone()
                    };
                    let bad = key::deal(&fresh, d, None, &mut SimRng(&mut rng)).expect("deals");
                    queue.push(at, Event::Ordered(*d, KeyOp::Deal(bad), false));
                }
                Dealing::Equivocate => {
                    let bad = spoil(&mut rng, honest.clone(), receivers.len());
                    let (first, second) = if rng.chance(0.5) {
                        (bad, honest)
                    } else {
                        (honest, bad)
                    };
                    queue.push(at, Event::Ordered(*d, KeyOp::Deal(first), false));
                    queue.push(at + 1, Event::Ordered(*d, KeyOp::Deal(second), false));
                }
                Dealing::Malformed => {
                    let mut bad = honest;
                    bad.sealed.pop();
                    queue.push(at, Event::Ordered(*d, KeyOp::Deal(bad), false));
                }
                Dealing::BadProof => {
                    let mut bad = honest;
                    bad.proof = Some(key::Proof {
                        c: rng.seed32(),
                        z: [0; 32],
                    });
                    queue.push(at, Event::Ordered(*d, KeyOp::Deal(bad), false));
                }
            }
        }
        let mut receiving: BTreeMap<NodeId, Receiving> = BTreeMap::new();
        for r in receivers {
            if bad_receivers.contains(r) {
                let how = *rng.pick(&[
                    Receiving::Quiet,
                    Receiving::FalseComplaint,
                    Receiving::ForgedProof,
                    Receiving::ComplainAboutAbsent,
                ]);
                receiving.insert(*r, how);
            }
            // A slow member looks late, the others soon.
            let first = if rng.chance(0.2) {
                rng.range(300, 600)
            } else {
                rng.range(5, 40)
            };
            queue.push(first, Event::Look(*r));
        }

        // Run the round.
        let mut checked: BTreeSet<(NodeId, NodeId)> = BTreeSet::new();
        let mut installed: BTreeMap<NodeId, PublicShares> = BTreeMap::new();
        let mut now = 0;
        while let Some((at, event)) = queue.pop() {
            now = at;
            if now > ROUND_DEADLINE {
                break;
            }
            match event {
                Event::Ordered(from, op, correct) => {
                    let qualified_before = transcript.qualified_dealers();
                    let result = transcript.apply(&from, &op);
                    digest.update(format!("{epoch} {from:?} {result:?}").as_bytes());
                    if result.is_ok() {
                        // Every member sees each ordered operation, some later than others.
                        for r in receivers {
                            queue.push(now + rng.range(1, 60), Event::Look(*r));
                        }
                    }
                    match result {
                        Ok(Applied::Dealt(d)) => {
                            report.stats.deals += 1;
                            if let Some(m) = members.get_mut(&d) {
                                if !bad_dealers.contains(&d) {
                                    m.holder.dealt(epoch);
                                }
                            }
                        }
                        Ok(Applied::Disproved(d)) => {
                            report.stats.disproven += 1;
                            if qualified_before.as_ref().is_some_and(|q| q.contains(&d)) {
                                report.stats.late_complaints += 1;
                            }
                            if !bad_dealers.contains(&d) {
                                report.violations.push(format!(
                                    "epoch {epoch}: a correct dealer {d:?} was disproven"
                                ));
                            }
                        }
                        Err(e) => {
                            report.stats.refused += 1;
                            if correct {
                                report.violations.push(format!(
                                    "epoch {epoch}: a correct member's operation was refused: {e}"
                                ));
                            }
                        }
                    }
                }
                Event::Look(r) => {
                    let bad = receiving.get(&r).copied();
                    look(
                        &mut rng,
                        &transcript,
                        &mut members,
                        &r,
                        bad,
                        opts.mutant,
                        now,
                        &mut checked,
                        &mut installed,
                        &mut queue,
                    );
                    // Look again while my share of the current qualified set is missing.
                    if transcript.public().ok().as_ref() != installed.get(&r) {
                        queue.push(now + rng.range(5, 40), Event::Look(r));
                    }
                }
            }
        }
        report.rounds += 1;
        if std::env::var_os("KEY_SIM_DEBUG").is_some() {
            eprintln!(
                "epoch {epoch}: ended at {now}, dealt {:?}, disproven {:?}, qualified {:?}",
                transcript.dealt(),
                transcript.disproven(),
                transcript.qualified_dealers()
            );
        }

        // The round's checks.
        let public = match transcript.public() {
            Ok(p) => p,
            Err(e) => {
                report.violations.push(format!(
                    "epoch {epoch}: the round did not complete by {now}: {e}"
                ));
                break;
            }
        };
        let key = public.group_key();
        digest.update(&key);
        if *genesis_key.get_or_insert(key) != key {
            report
                .violations
                .push(format!("epoch {epoch}: the key changed"));
        }
        for r in receivers {
            if bad_receivers.contains(r) {
                continue;
            }
            match members[r].holder.for_signing(epoch) {
                Some(s) if s.public == public && s.is_valid() => {}
                Some(s) if s.public != public => report.violations.push(format!(
                    "epoch {epoch}: correct member {r:?} holds a share of another qualified set ({:?} vs {:?})", s.public, public
                )),
                Some(_) => report.violations.push(format!(
                    "epoch {epoch}: correct member {r:?} holds a share that does not match its verifying share"
                )),
                None => report.violations.push(format!(
                    "epoch {epoch}: correct member {r:?} holds no share"
                )),
            }
        }
        // The adversary sees what the members it corrupted this epoch hold.
        for c in &corrupted[epoch as usize] {
            for s in members[c].holder.held() {
                seen.entry(s.epoch())
                    .or_default()
                    .insert(s.position, s.secret_bytes());
            }
        }
        sign_round(
            &mut rng,
            &members,
            &committees,
            epoch,
            &public,
            &corrupted[epoch as usize],
            &mut report,
        );
        publics.push(public);
    }

    // No coalition: for each epoch, the adversary's shares match fewer than t verifying shares.
    for public in &publics {
        let known = seen.get(&public.epoch).map_or(0, |shares| {
            shares
                .iter()
                .filter(|(position, secret)| {
                    public.verifying_share(**position) == Some(base_mul(secret))
                })
                .count()
        });
        if known >= public.threshold() {
            // First in the report: the worst a run can show.
            report.violations.insert(
                0,
                format!(
                    "the adversary holds {known} shares of epoch {}'s sharing: it can sign alone",
                    public.epoch
                ),
            );
        }
    }
    report.digest = *digest.finalize().as_bytes();
    report
}

fn base_mul(secret: &[u8; 32]) -> [u8; 32] {
    key::public_of_secret(secret)
}

/// Replaces one to all sealed sub-shares with garbage: receivers who get them must complain.
fn spoil(rng: &mut Rng, mut deal: Deal, receivers: usize) -> Deal {
    let k = rng.range(1, receivers as u64) as usize;
    for _ in 0..k {
        let j = rng.below(receivers);
        let mut s = rng.seed32();
        s[31] &= 0x0f; // canonical
        deal.sealed[j] = s;
    }
    deal
}

/// A receiver looks at the order: checks the sub-shares of deals it has not seen, complains
/// about wrong ones (or, Byzantine, misbehaves), and installs its share of the current qualified
/// set.
#[allow(clippy::too_many_arguments)]
fn look(
    rng: &mut Rng,
    transcript: &Transcript,
    members: &mut BTreeMap<NodeId, Member>,
    me: &NodeId,
    bad: Option<Receiving>,
    mutant: Mutant,
    now: u64,
    checked: &mut BTreeSet<(NodeId, NodeId)>,
    installed: &mut BTreeMap<NodeId, PublicShares>,
    queue: &mut Queue,
) {
    let unverified = mutant == Mutant::ReshareUnverified;
    for dealer in transcript.dealt() {
        if !checked.insert((*me, dealer)) {
            continue;
        }
        let delay = if rng.chance(0.1) {
            rng.range(100, 300)
        } else {
            rng.range(1, 30)
        };
        let complaint = transcript
            .check(me, &members[me].seal, &dealer, &mut SimRng(rng))
            .expect("a receiver checks a dealt deal");
        match (bad, complaint) {
            (None, Err(c)) if !unverified => {
                queue.push(now + delay, Event::Ordered(*me, KeyOp::Complaint(c), true));
            }
            (None, _) => {}
            (Some(Receiving::Quiet), _) => {}
            (Some(Receiving::FalseComplaint), Ok(())) => {
                // A complaint with a correct proof about a correct sub-share: made by a receiver
                // that opens with a wrong key would not verify, so open honestly and claim.
                let c = key::false_complaint(
                    transcript,
                    me,
                    &members[me].seal,
                    &dealer,
                    &mut SimRng(rng),
                )
                .expect("dealt");
                queue.push(now + delay, Event::Ordered(*me, KeyOp::Complaint(c), false));
            }
            (Some(Receiving::FalseComplaint), Err(c)) => {
                queue.push(now + delay, Event::Ordered(*me, KeyOp::Complaint(c), false));
            }
            (Some(Receiving::ForgedProof), _) => {
                let c = forged_complaint(dealer, &members[me].seal);
                queue.push(now + delay, Event::Ordered(*me, KeyOp::Complaint(c), false));
            }
            (Some(Receiving::ComplainAboutAbsent), _) => {
                let absent = transcript
                    .round()
                    .dealers
                    .iter()
                    .find(|d| !transcript.dealt().contains(d))
                    .copied()
                    .unwrap_or(dealer);
                let c = forged_complaint(absent, &members[me].seal);
                queue.push(now + delay, Event::Ordered(*me, KeyOp::Complaint(c), false));
            }
        }
    }
    let Ok(public) = transcript.public() else {
        return;
    };
    if installed.get(me) == Some(&public) {
        return;
    }
    let member = members.get_mut(me).expect("a member");
    let share = if unverified {
        transcript.share_unverified(me, &member.seal)
    } else {
        transcript.share(me, &member.seal)
    };
    match share {
        Ok(share) => {
            member.holder.install(share);
            installed.insert(*me, public);
        }
        // A wrong sub-share: the complaint is on its way; look again once it is ordered.
        Err(KeyError::BadSubShare(d)) => {
            if std::env::var_os("KEY_SIM_DEBUG").is_some() {
                eprintln!("{now}: {me:?} bad sub-share from {d:?}");
            }
        }
        Err(e) => panic!("a receiver's share: {e}"),
    }
}

/// A complaint about `against` whose proof is made up (the key it shows is the receiver's own
/// public seal key).
fn forged_complaint(against: NodeId, seal: &SealKey) -> key::Complaint {
    key::Complaint {
        against,
        shared: seal.public(),
        proof: key::Proof {
            c: [1; 32],
            z: [2; 32],
        },
    }
}

/// The new committee signs the epoch's message: the members asked (the committee and the one
/// before, as a client that does not know the epoch changed would) answer if they hold a share for
/// the epoch; `t` of them sign; wrong shares are named and their signers replaced.
fn sign_round(
    rng: &mut Rng,
    members: &BTreeMap<NodeId, Member>,
    committees: &[Vec<NodeId>],
    epoch: u64,
    public: &PublicShares,
    corrupted: &BTreeSet<NodeId>,
    report: &mut Report,
) {
    let msg = format!("configuration of epoch {epoch}");
    let mut asked: Vec<NodeId> = committees[epoch as usize].clone();
    if epoch > 0 {
        let before: Vec<NodeId> = committees[epoch as usize - 1]
            .iter()
            .filter(|m| !asked.contains(m))
            .copied()
            .collect();
        asked.extend(before);
    }
    rng.shuffle(&mut asked);
    let mut signers: Vec<(NodeId, &KeyShare)> = Vec::new();
    for m in &asked {
        if let Some(share) = members[m].holder.for_signing(epoch) {
            if !committees[epoch as usize].contains(m) {
                report.violations.push(format!(
                    "{m:?} signed for epoch {epoch}, whose committee it is not in (with its share of epoch {})",
                    share.epoch()
                ));
                return;
            }
            signers.push((*m, share));
        }
    }
    let mut excluded: BTreeSet<NodeId> = BTreeSet::new();
    for _attempt in 0..=committees[epoch as usize].len() {
        let chosen: Vec<&(NodeId, &KeyShare)> = signers
            .iter()
            .filter(|(m, _)| !excluded.contains(m))
            .take(public.threshold())
            .collect();
        if chosen.len() < public.threshold() {
            break;
        }
        let mut nonces = BTreeMap::new();
        let mut commitments = BTreeMap::new();
        for (m, share) in &chosen {
            let (n, c) = sign::commit(share, &mut SimRng(rng));
            nonces.insert(*m, n);
            commitments.insert(sign::identifier(share.position), c);
        }
        let package = sign::SigningPackage::new(commitments, msg.as_bytes());
        let mut shares = BTreeMap::new();
        for (m, share) in &chosen {
            if corrupted.contains(m) && rng.chance(0.5) {
                // A wrong signature share: over another message.
                let other = sign::SigningPackage::new(
                    package.signing_commitments().clone(),
                    b"something else",
                );
                if let Ok(s) = sign::sign(share, &other, &nonces[m]) {
                    shares.insert(sign::identifier(share.position), s);
                }
                continue;
            }
            match sign::sign(share, &package, &nonces[m]) {
                Ok(s) => {
                    shares.insert(sign::identifier(share.position), s);
                }
                Err(e) => report
                    .violations
                    .push(format!("epoch {epoch}: {m:?} could not sign: {e}")),
            }
        }
        match sign::aggregate(public, &package, &shares) {
            Ok(sig) => {
                if sign::verify(&public.group_key(), msg.as_bytes(), &sig) {
                    report.stats.signatures += 1;
                } else {
                    report.violations.push(format!(
                        "epoch {epoch}: the aggregated signature does not verify under the key"
                    ));
                }
                return;
            }
            Err(sign::AggregateError::Culprits(culprits)) => {
                for c in culprits {
                    if !corrupted.contains(&c) {
                        report.violations.push(format!(
                            "epoch {epoch}: correct member {c:?} was named as a culprit"
                        ));
                        return;
                    }
                    report.stats.culprits_named += 1;
                    excluded.insert(c);
                }
            }
            Err(e) => {
                report
                    .violations
                    .push(format!("epoch {epoch}: aggregation failed: {e}"));
                return;
            }
        }
    }
    report.violations.push(format!(
        "epoch {epoch}: no 2f+1 members could sign ({} held a share)",
        signers.len()
    ));
}
