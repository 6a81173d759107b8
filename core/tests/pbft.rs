//! The agreement protocol's rules, one test each, on a committee of 4 (f=1) driven by a small
//! synchronous network in this file: every message is delivered in order unless a test drops it.

use dbqsfs_core::crypto::{Keypair, NodeId};
use dbqsfs_core::ms::pbft::msg::{reissue, Committee, NewView, StableProof};
use dbqsfs_core::ms::pbft::{
    batch_digest, Agreement, AgreementMessage, Digest, Evidence, Options, Output, PrePrepare,
    Prepare, Rejected, Request, SeqNo, Signed, SignedStatement,
};
use dbqsfs_core::wire::{decode, encode_msg};
use std::collections::{BTreeSet, VecDeque};

const EPOCH: u64 = 3;

struct Net {
    keys: Vec<Keypair>,
    members: Vec<Agreement>,
    now: u64,
    queue: VecDeque<(usize, usize, Vec<u8>)>,
    /// Members cut off: nothing from or to them is delivered.
    down: BTreeSet<usize>,
    /// Messages (from, to, message) the network drops.
    filter: Option<fn(usize, usize, &AgreementMessage) -> bool>,
    decided: Vec<Vec<(SeqNo, Vec<Request>)>>,
    evidence: Vec<Vec<Evidence>>,
    views: Vec<Vec<u64>>,
    /// Each member's application digest: a hash chain of what it executed.
    app: Vec<Digest>,
    /// What each member persisted last ([`Output::Persist`]), with its application then (digest,
    /// batches decided): its disk.
    saved: Vec<Option<(Vec<u8>, Digest, usize)>>,
    /// Every message broadcast so far, decoded (for tests that forge from real statements).
    seen: Vec<(usize, AgreementMessage)>,
}

fn options() -> Options {
    Options {
        epoch: EPOCH,
        checkpoint_interval: 4,
        window: 8,
        max_batch: 4,
        pipeline: 2,
        request_timeout_ms: 500,
        tick_ms: 100,
        ..Options::default()
    }
}

impl Net {
    fn new(n: usize) -> Net {
        Net::with(n, options())
    }

    fn with(n: usize, opts: Options) -> Net {
        let keys: Vec<Keypair> = (0..n)
            .map(|i| Keypair::from_seed([i as u8 + 1; 32]))
            .collect();
        let committee: Vec<_> = keys.iter().map(|k| k.public()).collect();
        let members = keys
            .iter()
            .map(|k| Agreement::new(k.clone(), committee.clone(), opts.clone()).unwrap())
            .collect();
        Net {
            keys,
            members,
            now: 0,
            queue: VecDeque::new(),
            down: BTreeSet::new(),
            filter: None,
            decided: vec![Vec::new(); n],
            evidence: vec![Vec::new(); n],
            views: vec![Vec::new(); n],
            app: vec![[0; 32]; n],
            saved: vec![None; n],
            seen: Vec::new(),
        }
    }

    fn id(&self, i: usize) -> NodeId {
        self.keys[i].node_id()
    }

    fn index(&self, id: &NodeId) -> usize {
        self.keys.iter().position(|k| k.node_id() == *id).unwrap()
    }

    fn drain(&mut self, i: usize) {
        while let Some(out) = self.members[i].poll_output() {
            match out {
                Output::Persist { state } => {
                    self.saved[i] = Some((state, self.app[i], self.decided[i].len()));
                }
                Output::Send { to, bytes } => {
                    let to = self.index(&to);
                    self.queue.push_back((i, to, bytes));
                }
                Output::Broadcast { bytes } => {
                    if let Ok(env) = decode::<AgreementMessage>(&bytes) {
                        self.seen.push((i, env.msg));
                    }
                    for to in 0..self.members.len() {
                        if to != i {
                            self.queue.push_back((i, to, bytes.clone()));
                        }
                    }
                }
                Output::Decided { seq, requests } => {
                    let mut h = blake3::Hasher::new();
                    h.update(&self.app[i]);
                    h.update(&seq.to_le_bytes());
                    for r in &requests {
                        h.update(&r.payload);
                    }
                    self.app[i] = *h.finalize().as_bytes();
                    self.decided[i].push((seq, requests));
                }
                Output::Checkpoint { seq } => {
                    let app = self.app[i];
                    self.members[i].checkpoint_digest(seq, app);
                }
                Output::InstallState { app_digest, .. } => self.app[i] = app_digest,
                Output::EnteredView { view } => self.views[i].push(view),
                Output::Evidence(e) => self.evidence[i].push(e),
            }
        }
    }

    fn deliver_all(&mut self) {
        let mut budget = 200_000;
        while let Some((from, to, bytes)) = self.queue.pop_front() {
            budget -= 1;
            assert!(budget > 0, "the committee does not go quiet");
            if self.down.contains(&from) || self.down.contains(&to) {
                continue;
            }
            if let (Some(drop), Ok(env)) = (self.filter, decode::<AgreementMessage>(&bytes)) {
                if drop(from, to, &env.msg) {
                    continue;
                }
            }
            let from_id = self.id(from);
            let _ = self.members[to].handle_message(self.now, from_id, &bytes);
            self.drain(to);
        }
    }

    /// Advances time to `until` in 10 ms steps, firing timers and delivering everything.
    fn run_until(&mut self, until: u64) {
        loop {
            for i in 0..self.members.len() {
                self.drain(i);
            }
            self.deliver_all();
            if self.now >= until {
                return;
            }
            self.now += 10;
            for i in 0..self.members.len() {
                if self.down.contains(&i) {
                    continue;
                }
                if self.members[i]
                    .next_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    self.members[i].handle_timeout(self.now);
                }
            }
        }
    }

    /// Member `i` crashes and starts again from what it persisted: its memory is gone, and so is
    /// what its application did after that point.
    fn restart(&mut self, i: usize) {
        let (state, app, decided) = self.saved[i].clone().expect("it persisted something");
        let committee: Vec<_> = self.keys.iter().map(|k| k.public()).collect();
        let opts = self.members[i].options().clone();
        self.members[i] =
            Agreement::restore(self.keys[i].clone(), committee, opts, &state, self.now).unwrap();
        self.app[i] = app;
        self.decided[i].truncate(decided);
        self.drain(i);
    }

    fn submit(&mut self, to: usize, req: Request) -> Result<(), Rejected> {
        let r = self.members[to].submit(self.now, req);
        self.drain(to);
        r
    }

    /// Payloads executed by member `i`, in order.
    fn executed(&self, i: usize) -> Vec<Vec<u8>> {
        self.decided[i]
            .iter()
            .flat_map(|(_, rs)| rs.iter().map(|r| r.payload.clone()))
            .collect()
    }
}

fn client(i: u8) -> Keypair {
    Keypair::from_seed([100 + i; 32])
}

/// The pre-prepare of `batch` at (`view`, `seq`), signed by the primary of view 0 (`key`).
fn pre_prepare(key: &Keypair, view: u64, seq: SeqNo, batch: &[Request]) -> Signed<PrePrepare> {
    Signed::sign(
        key,
        0,
        EPOCH,
        PrePrepare {
            view,
            seq,
            digest: batch_digest(batch),
        },
    )
}

fn req(c: &Keypair, seq: u64) -> Request {
    Request::sign(c, seq, format!("op {seq}").into_bytes())
}

#[test]
fn the_normal_case_decides_batches_in_order_at_every_member() {
    let mut net = Net::new(4);
    // Twelve clients, one outstanding request each, submitted to every member in turn.
    for c in 0..12u8 {
        net.submit(c as usize % 4, req(&client(c), 1)).unwrap();
    }
    net.run_until(300);
    for i in 0..4 {
        let seqs: Vec<SeqNo> = net.decided[i].iter().map(|(s, _)| *s).collect();
        let expected: Vec<SeqNo> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, expected,
            "member {i} executes sequence numbers in order"
        );
        assert_eq!(
            net.executed(i).len(),
            12,
            "member {i} executes every request"
        );
        assert_eq!(net.decided[i], net.decided[0], "members agree");
    }
    assert!(
        net.decided[0].iter().any(|(_, rs)| rs.len() > 1),
        "requests that arrive while batches run are batched"
    );
    assert!(net.evidence.iter().all(Vec::is_empty));
}

#[test]
fn a_duplicated_or_replayed_request_is_not_executed_twice() {
    let mut net = Net::new(4);
    let a = client(1);
    let r1 = req(&a, 1);
    // The same request through two members, and again.
    net.submit(1, r1.clone()).unwrap();
    net.submit(2, r1.clone()).unwrap();
    net.submit(1, r1.clone()).unwrap();
    net.run_until(300);
    // Replayed after execution: refused at once.
    assert_eq!(
        net.submit(3, r1.clone()),
        Err(Rejected::AlreadyExecuted {
            seq: 1,
            executed: 1
        })
    );
    // A faulty primary may still put an old request in a batch: execution skips it.
    let r2 = req(&a, 2);
    let primary = &net.keys[0];
    let batch = vec![r1.clone(), r2.clone(), r2.clone()];
    let next = net.members[1].last_executed() + 1;
    let pp = pre_prepare(primary, 0, next, &batch);
    let bytes = encode_msg(
        EPOCH,
        AgreementMessage::PrePrepare {
            pre_prepare: pp,
            batch,
        },
    );
    for to in 1..4 {
        let from = net.id(0);
        net.members[to]
            .handle_message(net.now, from, &bytes)
            .unwrap();
        net.drain(to);
    }
    net.run_until(600);
    for i in 0..4 {
        assert_eq!(
            net.executed(i),
            vec![b"op 1".to_vec(), b"op 2".to_vec()],
            "member {i} executes each request once"
        );
    }
}

#[test]
fn a_silent_primary_is_replaced_by_a_view_change() {
    let mut net = Net::new(4);
    net.down.insert(0);
    let a = client(1);
    net.submit(1, req(&a, 1)).unwrap();
    net.run_until(400);
    assert!(
        net.executed(1).is_empty(),
        "nothing is ordered without a primary"
    );
    net.run_until(3_000);
    for i in 1..4 {
        assert_eq!(net.members[i].view(), 1, "member {i} moved to view 1");
        assert_eq!(net.views[i], vec![1]);
        assert_eq!(net.executed(i), vec![b"op 1".to_vec()], "member {i}");
    }
    // The old primary comes back, learns the new view from the others and catches up.
    net.down.clear();
    net.run_until(4_000);
    assert_eq!(net.members[0].view(), 1);
    assert_eq!(net.executed(0), vec![b"op 1".to_vec()]);
}

#[test]
fn two_pre_prepares_for_one_slot_are_returned_as_evidence() {
    let mut net = Net::new(4);
    let a = client(1);
    let primary = net.keys[0].clone();
    let sign_pp = |batch: &[Request]| pre_prepare(&primary, 0, 1, batch);
    let first = vec![req(&a, 1)];
    let second = vec![req(&a, 2)];
    let (pp1, pp2) = (sign_pp(&first), sign_pp(&second));
    let from = net.id(0);
    let m = &mut net.members[1];
    let send = |pre_prepare: Signed<PrePrepare>, batch| {
        encode_msg(EPOCH, AgreementMessage::PrePrepare { pre_prepare, batch })
    };
    assert_eq!(m.handle_message(0, from, &send(pp1.clone(), first)), Ok(()));
    assert_eq!(
        m.handle_message(0, from, &send(pp2.clone(), second)),
        Err(Rejected::Conflicting)
    );
    net.drain(1);
    let evidence = net.evidence[1].clone();
    assert_eq!(
        evidence,
        vec![Evidence::Equivocation {
            first: SignedStatement::PrePrepare(pp1),
            second: SignedStatement::PrePrepare(pp2),
        }],
        "the first statement stands and both are returned"
    );
    let committee = Committee::new(net.keys.iter().map(|k| k.public()).collect()).unwrap();
    assert_eq!(
        evidence[0].verify(&committee, EPOCH, 4),
        Ok(Some(net.id(0))),
        "anyone holding the committee can check it names the primary"
    );
    assert_eq!(
        net.members[1].changing_to(),
        Some(1),
        "a provably faulty primary is abandoned at once"
    );
}

#[test]
fn a_stable_checkpoint_truncates_the_log() {
    let mut net = Net::new(4);
    let a = client(1);
    // One request at a time, so each gets its own sequence number.
    for seq in 1..=10 {
        net.submit(0, req(&a, seq)).unwrap();
        net.run_until(net.now + 50);
    }
    net.run_until(net.now + 200);
    for i in 0..4 {
        let m = &net.members[i];
        assert_eq!(m.last_executed(), 10, "member {i}");
        assert_eq!(
            m.stable_checkpoint(),
            8,
            "member {i}: checkpoints every 4, stable at 8"
        );
        let log = m.log_size();
        assert!(
            log.lowest.is_none_or(|s| s > 8),
            "member {i} keeps nothing at or below the stable checkpoint: {log:?}"
        );
        assert!(log.decided <= 2 && log.slots <= 2, "member {i}: {log:?}");
    }
}

#[test]
fn a_forged_signature_is_ignored() {
    let mut net = Net::new(4);
    let a = client(1);
    net.submit(1, req(&a, 1)).unwrap();
    net.run_until(100);
    let (from2, from3) = (net.id(2), net.id(3));
    let digest = batch_digest(&[]);
    let prepare = |key: &Keypair, signer| {
        Signed::sign(
            key,
            signer,
            EPOCH,
            Prepare {
                view: 0,
                seq: 5,
                digest,
            },
        )
    };
    let m = &mut net.members[1];
    let msg = |p: Signed<Prepare>| encode_msg(EPOCH, AgreementMessage::Prepare(p));

    // Member 3 signs but claims to be member 2.
    let forged = prepare(&net.keys[3], 2);
    assert_eq!(
        m.handle_message(0, from3, &msg(forged)),
        Err(Rejected::BadSignature)
    );
    // A flipped signature bit.
    let mut flipped = prepare(&net.keys[2], 2);
    flipped.sig.0[10] ^= 1;
    assert_eq!(
        m.handle_message(0, from2, &msg(flipped)),
        Err(Rejected::BadSignature)
    );
    // A signer index beyond the committee.
    let out_of_range = prepare(&net.keys[2], 9);
    assert_eq!(
        m.handle_message(0, from2, &msg(out_of_range)),
        Err(Rejected::UnknownSigner(9))
    );
    // A pre-prepare signed by a backup.
    let pp = Signed::sign(
        &net.keys[2],
        2,
        EPOCH,
        PrePrepare {
            view: 0,
            seq: 5,
            digest,
        },
    );
    let bytes = encode_msg(
        EPOCH,
        AgreementMessage::PrePrepare {
            pre_prepare: pp,
            batch: vec![],
        },
    );
    assert_eq!(
        m.handle_message(0, from2, &bytes),
        Err(Rejected::NotPrimary)
    );
    // A request whose client signature does not match its payload.
    let mut bad = req(&a, 2);
    bad.payload.push(0);
    assert_eq!(m.submit(0, bad), Err(Rejected::BadSignature));
    // A valid prepare from a non-member, and one of another epoch.
    let good = msg(prepare(&net.keys[2], 2));
    let stranger = Keypair::from_seed([200; 32]).node_id();
    assert_eq!(
        m.handle_message(0, stranger, &good),
        Err(Rejected::NotAMember(stranger))
    );
    let other_epoch = encode_msg(
        EPOCH + 1,
        AgreementMessage::Prepare(prepare(&net.keys[2], 2)),
    );
    assert_eq!(
        m.handle_message(0, from2, &other_epoch),
        Err(Rejected::OtherEpoch {
            ours: EPOCH,
            theirs: EPOCH + 1
        })
    );
    // None of it changed what is executed.
    net.run_until(400);
    for i in 0..4 {
        assert_eq!(net.executed(i), vec![b"op 1".to_vec()], "member {i}");
        assert!(net.evidence[i].is_empty());
    }
}

#[test]
fn a_new_view_that_drops_a_prepared_batch_is_refused() {
    let mut net = Net::new(4);
    let a = client(1);
    net.submit(0, req(&a, 1)).unwrap();
    net.run_until(100);
    assert_eq!(net.members[1].last_executed(), 1);
    // The primary goes silent; the backups change view. Member 1 will be the new primary: keep
    // its NEW-VIEW from the others and forge one that re-issues nothing.
    net.down.insert(0);
    net.submit(2, req(&a, 2)).unwrap();
    let honest_before = net.seen.len();
    net.down.insert(1);
    net.run_until(1_500);
    let vcs: Vec<_> = net.seen[honest_before..]
        .iter()
        .filter_map(|(_, m)| match m {
            AgreementMessage::ViewChange { view_change, .. } if view_change.body.new_view == 1 => {
                Some(view_change.clone())
            }
            _ => None,
        })
        .collect();
    let mut distinct: Vec<_> = Vec::new();
    for vc in vcs {
        if !distinct.iter().any(|d: &Signed<_>| d.signer == vc.signer) {
            distinct.push(vc);
        }
    }
    assert!(distinct.len() >= 2, "members 2 and 3 sent view changes");
    // Member 1's own view change completes the quorum.
    let stable = StableProof::genesis();
    let own = Signed::sign(
        &net.keys[1],
        1,
        EPOCH,
        dbqsfs_core::ms::pbft::ViewChange {
            new_view: 1,
            stable,
            prepared: vec![],
        },
    );
    distinct.push(own);
    let refs: Vec<_> = distinct.iter().collect();
    let honest = reissue(&refs, 8);
    assert!(
        honest.slots.iter().any(|s| s.digest != batch_digest(&[])),
        "the view changes carry the prepared batch of sequence number 1"
    );
    let nulls: Vec<_> = honest
        .slots
        .iter()
        .map(|s| {
            Signed::sign(
                &net.keys[1],
                1,
                EPOCH,
                PrePrepare {
                    view: 1,
                    seq: s.seq,
                    digest: batch_digest(&[]),
                },
            )
        })
        .collect();
    let batches = vec![Vec::new(); nulls.len()];
    let nv = Signed::sign(
        &net.keys[1],
        1,
        EPOCH,
        NewView {
            view: 1,
            view_changes: distinct,
            pre_prepares: nulls,
        },
    );
    let bytes = encode_msg(
        EPOCH,
        AgreementMessage::NewView {
            new_view: nv,
            batches,
        },
    );
    let from = net.id(1);
    assert_eq!(
        net.members[2].handle_message(net.now, from, &bytes),
        Err(Rejected::BadNewView(
            "the pre-prepares are not the ones the view changes require"
        ))
    );
    assert_eq!(net.members[2].view(), 0, "the backup stays out of view 1");
}

#[test]
fn a_member_that_missed_everything_catches_up_from_a_checkpoint() {
    let mut net = Net::new(4);
    let a = client(1);
    net.down.insert(3);
    for seq in 1..=10 {
        net.submit(0, req(&a, seq)).unwrap();
        net.run_until(net.now + 50);
    }
    assert_eq!(net.members[3].last_executed(), 0);
    net.down.clear();
    net.run_until(net.now + 1_000);
    let m = &net.members[3];
    assert_eq!(
        m.last_executed(),
        10,
        "state at 8, then the decided batches 9 and 10"
    );
    assert_eq!(
        net.app[3], net.app[0],
        "same application digest as the others"
    );
    assert_eq!(
        net.decided[3].iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![9, 10]
    );
}

#[test]
fn a_member_that_never_saw_a_checkpoint_become_stable_learns_it_from_a_peer() {
    let mut net = Net::new(4);
    let a = client(1);
    // Member 3 hears every message but the checkpoints.
    net.filter = Some(|_, to, m| {
        to == 3
            && matches!(
                m,
                AgreementMessage::Checkpoint(_) | AgreementMessage::StableCheckpoint(_)
            )
    });
    for seq in 1..=10 {
        net.submit(0, req(&a, seq)).unwrap();
        net.run_until(net.now + 50);
    }
    net.run_until(net.now + 500);
    assert_eq!(net.members[0].stable_checkpoint(), 8);
    assert_eq!(
        (
            net.members[3].stable_checkpoint(),
            net.members[3].last_executed()
        ),
        (0, 8),
        "its window (0, 8] refuses sequence numbers 9 and 10"
    );
    net.filter = None;
    net.run_until(net.now + 500);
    assert_eq!(
        (
            net.members[3].stable_checkpoint(),
            net.members[3].last_executed()
        ),
        (8, 10),
        "a peer's status reply carries the stable checkpoint; the window moves on"
    );
    assert_eq!(net.executed(3), net.executed(0));
}

#[test]
fn garbage_is_refused_without_panicking() {
    let mut net = Net::new(4);
    let from = net.id(2);
    let m = &mut net.members[1];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..600 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(m.handle_message(0, from, &bytes).is_err());
        // And with a valid header in front of the garbage.
        let mut framed = vec![1, 2, EPOCH as u8];
        framed.extend(&bytes);
        let _ = m.handle_message(0, from, &framed);
    }
}

#[test]
fn committees_that_are_not_three_f_plus_one_are_refused() {
    let keys: Vec<_> = (0..5).map(|i| Keypair::from_seed([i + 1; 32])).collect();
    let publics: Vec<_> = keys.iter().map(|k| k.public()).collect();
    assert!(Agreement::new(keys[0].clone(), publics.clone(), options()).is_err());
    assert!(Agreement::new(keys[0].clone(), publics[..4].to_vec(), options()).is_ok());
    assert!(
        Agreement::new(keys[4].clone(), publics[..4].to_vec(), options()).is_err(),
        "a non-member cannot run the agreement"
    );
}

#[test]
fn what_a_member_signs_is_persisted_before_it_leaves_and_a_restart_keeps_it() {
    let mut net = Net::new(4);
    let a = client(1);
    let primary = net.keys[0].clone();
    let sign_pp = |batch: &[Request]| pre_prepare(&primary, 0, 1, batch);
    let send = |pre_prepare: Signed<PrePrepare>, batch| {
        encode_msg(EPOCH, AgreementMessage::PrePrepare { pre_prepare, batch })
    };
    let first = vec![req(&a, 1)];
    let second = vec![req(&a, 2)];
    let (pp1, pp2) = (send(sign_pp(&first), first), send(sign_pp(&second), second));
    let from = net.id(0);
    assert_eq!(net.members[1].handle_message(0, from, &pp1), Ok(()));
    let mut outs = Vec::new();
    while let Some(o) = net.members[1].poll_output() {
        outs.push(o);
    }
    let persist = outs
        .iter()
        .position(|o| matches!(o, Output::Persist { .. }))
        .expect("a member that prepares persists first");
    let prepare = outs
        .iter()
        .position(|o| matches!(o, Output::Broadcast { .. }))
        .expect("and broadcasts its prepare");
    assert!(
        persist < prepare,
        "the state is persisted before the prepare leaves"
    );
    let Output::Persist { state } = &outs[persist] else {
        unreachable!()
    };
    // The member crashes and restarts from that state: it remembers its prepare for the slot
    // and refuses a second pre-prepare for it (an equivocating primary's), as before the crash.
    let committee: Vec<_> = net.keys.iter().map(|k| k.public()).collect();
    let mut restored =
        Agreement::restore(net.keys[1].clone(), committee.clone(), options(), state, 50).unwrap();
    assert_eq!(
        restored.handle_message(50, from, &pp2),
        Err(Rejected::Conflicting)
    );
    // Without it, the member would prepare the second batch: what the persisted state prevents.
    let mut amnesiac = Agreement::new(net.keys[1].clone(), committee.clone(), options()).unwrap();
    assert_eq!(amnesiac.handle_message(50, from, &pp2), Ok(()));
    // Nothing else restores: garbage, or the state of another epoch.
    assert!(Agreement::restore(
        net.keys[1].clone(),
        committee.clone(),
        options(),
        b"junk",
        0
    )
    .is_err());
    let other = Options {
        epoch: EPOCH + 1,
        ..options()
    };
    assert!(Agreement::restore(net.keys[1].clone(), committee, other, state, 0).is_err());
}

#[test]
fn a_whole_committee_restarted_from_what_it_persisted_goes_on_deciding() {
    let mut net = Net::new(4);
    let a = client(1);
    for seq in 1..=6 {
        net.submit(seq as usize % 4, req(&a, seq)).unwrap();
        net.run_until(net.now + 60);
    }
    // Mid-agreement: the last request reached the members, not yet decided.
    net.submit(2, req(&a, 7)).unwrap();
    for i in 0..4 {
        net.restart(i);
    }
    net.queue.clear();
    for seq in 8..=10 {
        net.submit(seq as usize % 4, req(&a, seq)).unwrap();
        net.run_until(net.now + 60);
    }
    net.run_until(net.now + 3_000);
    let all: Vec<Vec<u8>> = (1..=10).map(|s| format!("op {s}").into_bytes()).collect();
    for i in 0..4 {
        let seqs: Vec<SeqNo> = net.decided[i].iter().map(|(s, _)| *s).collect();
        let expected: Vec<SeqNo> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, expected,
            "member {i} executes in order, nothing twice"
        );
        // Request 7 was lost with the members' memories unless it was ordered before; its client
        // would resend it. Every other request is executed once, in order.
        let executed = net.executed(i);
        let want: Vec<Vec<u8>> = all
            .iter()
            .filter(|p| executed.contains(p) || p.as_slice() != b"op 7")
            .cloned()
            .collect();
        assert_eq!(executed, want, "member {i}");
        assert_eq!(net.decided[i], net.decided[0], "members agree");
    }
}
