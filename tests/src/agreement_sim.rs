//! The deterministic simulator of the MS agreement protocol (`dbqsfs_core::ms::pbft`).
//!
//! One seed fixes everything: the swarm parameters of the run (committee size from `f`, protocol
//! options, clients, loss, duplication, delay, partitions, crashes, primary crashes, which members
//! are Byzantine and how), and every random choice during it. Time is virtual (milliseconds); events
//! run in (time, sequence) order from one queue, so a seed replays exactly, and a digest of every
//! delivery and decision proves it.
//!
//! A run has two phases:
//! 1. faults: clients submit requests (one outstanding each, to random members, retried at other
//!    members, sometimes duplicated) while the network drops, duplicates, delays and reorders
//!    messages, partitions members, members crash and restart, the primary is crashed on purpose
//!    to force view changes, and in half the seeds every member crashes at once and restarts from
//!    what it persisted; up to `f` members are Byzantine all along;
//! 2. healed: the network is reliable and every member is up (the Byzantine ones stay Byzantine);
//!    every request of every client must be executed by every correct member within
//!    [`LIVENESS_BOUND_MS`].
//!
//! Checks, after every step: a correct member executes sequence numbers in order; no two correct
//! members execute different requests at one sequence number; no correct member executes a request
//! twice; no correct member sees two commit certificates for different batches at one sequence
//! number; no evidence names a correct member; a state a member installs is held by another member
//! and extends what it had executed. At the end: the logs of every two correct members agree on
//! their common prefix, and liveness.
//!
//! The Byzantine members run the real state machine and lie through its outputs (see
//! [`Adversary`]).
//!
//! Every member is the node's committee role (`ms::role::Role`, the machine the node's MS driver
//! runs): the agreement, the MS application on top of it, persistence (a crash loses everything
//! but the records and batches it asked to persist, and the member restarts from them as a node
//! does), catching up to a stable checkpoint from another member's batches, and the signatures
//! over the next configuration and freshness, sent to each other over the same faulty network.
//! The application (`ms::app::App`, over `Membership`) starts from one genesis configuration
//! (the agreement's committee plus members outside it): request payloads are postcard-encoded [`MsOp`]s, executed in decided order with the
//! submitter as authority and a seed hashed from the decided batch. The seed draws joiners (with
//! and without a valid admission certificate), leavers, dead members (reported unresponsive by
//! every correct committee member, whose verdicts come from the node's `ms::probe::Prober`: the
//! dead leave its signed challenges unanswered),
//! one Byzantine prober (accuses a live member, vouches for the dead, sometimes ends the epoch
//! early) and, once the faults healed and every other operation was decided, the correct
//! committee members' `EndEpoch`. The load clients are outsiders whose operations must be
//! ignored. One epoch transition per run; the agreement keeps the genesis committee. Checks:
//! see `check_membership` and `check_certificate`; every certificate a correct member assembles
//! verifies and certifies the configuration its epoch ended with; liveness includes the epoch
//! ending, and its certificate assembled, at every correct member.

use crate::harness::{Network, Queue};
use crate::rng::Rng;
use crate::signed::SignedLog;
use dbqsfs_core::config::{
    CertifiedConfig, ConfigChain, Configuration, Member as NodeInfo, Params,
};
use dbqsfs_core::crypto::{Domain, Keypair, NodeId, PublicKey};
use dbqsfs_core::ms::key::{KeyMember, KeyState};
use dbqsfs_core::ms::membership::{AdmissionCert, CertificateCollector, MsOp};
pub use dbqsfs_core::ms::pbft::Mutant;
use dbqsfs_core::ms::pbft::{
    batch_digest, Agreement, AgreementMessage, Commit, Digest, Evidence, NewView, Options,
    PrePrepare, Request, RequestKey, SeqNo, Signed,
};
use dbqsfs_core::ms::probe::{eviction_reports, probe_body, watched, watches, Prober};
use dbqsfs_core::ms::role::{Action, Resume, Role, Setup};
use dbqsfs_core::ms::wire::{is_ms, MsMessage};
use dbqsfs_core::ms::{self, app::Ended};
use dbqsfs_core::wire::{decode, encode_msg};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// After the faults heal, every request must be executed by every correct member within this bound.
pub const LIVENESS_BOUND_MS: u64 = 90_000;
/// A run that processes more events than this is reported as a violation (a livelock).
const EVENT_BUDGET: u64 = 4_000_000;
const EPOCH: u64 = 7;

/// What a run is asked to do.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub f: u32,
    pub mutant: Mutant,
    /// The driver mutant `forget-signed-state`: a crashed member restarts without what it
    /// persisted (a fresh agreement and application), as a driver that skipped
    /// [`Output::Persist`] would.
    pub forget_signed_state: bool,
}

/// What a run found.
#[derive(Clone, Debug)]
pub struct SeedReport {
    pub seed: u64,
    /// Client requests executed (by the first correct member to execute each).
    pub decided: u64,
    /// The highest view a correct member reached.
    pub max_view: u64,
    /// States installed by correct members that fell behind a stable checkpoint.
    pub state_installs: u64,
    /// Evidence returned by correct members (against Byzantine ones).
    pub evidence: u64,
    pub violations: Vec<String>,
    pub digest: [u8; 32],
    /// The swarm parameters drawn, for the report of a failing seed.
    pub setup: String,
    /// The membership changes the run made (what the MS checkers had to check).
    pub ms: MsCoverage,
}

/// What the MS part of a run exercised, counted in the next configuration.
#[derive(Clone, Debug, Default)]
pub struct MsCoverage {
    /// The epoch ended (at every correct member, with one configuration).
    pub epoch_ended: bool,
    /// Nodes with a valid admission certificate that joined.
    pub joined: u64,
    /// Joins without a valid certificate, refused.
    pub refused: u64,
    pub left: u64,
    /// Dead members evicted on the reports of at least f+1 correct committee members.
    pub evicted: u64,
    /// Live members reported unresponsive by the Byzantine prober alone, kept.
    pub kept: u64,
    /// A Byzantine member's early `EndEpoch` that did not end the epoch alone.
    pub early_end: bool,
    /// Forged or under-signed certificates rejected.
    pub rejected_certs: u64,
    /// Correct members that assembled the next configuration's certificate from the shares.
    pub certified: u64,
    /// Freshness certificates the members assembled.
    pub freshness: u64,
}

/// The named Byzantine behaviours a member can draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adversary {
    /// Sends nothing.
    Silent,
    /// Sends random bytes and bit-flipped copies of its messages.
    Garbage,
    /// Sends its statements with broken signatures, someone else's signer index, or a body altered
    /// after signing; submits requests with forged client signatures.
    BadSignatures,
    /// As primary: sends different batches to two halves of the committee (with commits backing
    /// each half) for a few sequence numbers, then stops proposing. As backup: sometimes sends a
    /// prepare for another digest to half of the members.
    Equivocate,
    /// As primary: never sends pre-prepares (and sometimes no new view). As backup: sends its
    /// commits to half of the members only.
    Withhold,
    /// Honest, but re-sends old messages to random members, re-submits executed requests, and as
    /// primary puts executed requests into its batches.
    Replay,
    /// As the primary of a new view: re-issues every sequence number as the null batch, dropping
    /// what was prepared. As backup: withholds its commits from one member.
    OmitInNewView,
}

impl Adversary {
    pub const ALL: [Adversary; 7] = [
        Adversary::Silent,
        Adversary::Garbage,
        Adversary::BadSignatures,
        Adversary::Equivocate,
        Adversary::Withhold,
        Adversary::Replay,
        Adversary::OmitInNewView,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Adversary::Silent => "silent",
            Adversary::Garbage => "garbage",
            Adversary::BadSignatures => "bad-signatures",
            Adversary::Equivocate => "equivocate",
            Adversary::Withhold => "withhold",
            Adversary::Replay => "replay",
            Adversary::OmitInNewView => "omit-in-new-view",
        }
    }
}

impl fmt::Display for Adversary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug)]
enum Ev {
    Deliver {
        to: usize,
        from: usize,
        bytes: Vec<u8>,
    },
    Timer {
        m: usize,
        at: u64,
    },
    /// A client's request reaches member `m`.
    Submit {
        m: usize,
        req: Request,
    },
    ClientNext {
        c: usize,
    },
    ClientRetry {
        c: usize,
        seq: u64,
    },
    Crash {
        m: usize,
    },
    CrashPrimary,
    /// Every member crashes at once.
    CrashAll,
    Restart {
        m: usize,
    },
    Partition,
    HealPartition,
    ByzTick {
        m: usize,
    },
    Heal,
}

struct Byz {
    kind: Adversary,
    /// Messages it received, for replaying.
    recorded: Vec<(usize, Vec<u8>)>,
    /// Requests its core executed, for replaying.
    old_requests: Vec<Request>,
    /// Pre-prepares left to equivocate on before withholding, in the current view.
    equivocations_left: u32,
    /// The member it withholds commits from.
    victim: usize,
    /// A client key of its own, for requests nobody else submitted.
    fake_client: Keypair,
    fake_seq: u64,
}

/// A committee member: the node's committee role ([`Role`]: the agreement, the MS application,
/// persistence, catching up, shares), driven as the node's MS driver drives it.
struct Member {
    key: Keypair,
    role: Role,
    up: bool,
    /// Crashed (not merely cut off): it restarts from what it persisted.
    crashed: bool,
    /// Its disk: the record and the batches it persisted ([`Action::Persist`]).
    disk: Option<(Vec<u8>, Vec<Vec<u8>>)>,
    byz: Option<Byz>,
    timer_at: Option<u64>,
    /// Requests it executed, for the checks.
    executed: BTreeSet<RequestKey>,
    /// Requests of the simulated clients this member executed.
    client_executed: usize,
    /// The next configuration's certificate it assembled.
    certified: Option<CertifiedConfig>,
    /// Its part in the MS key (the node's `ms::key::KeyMember`), and the shares it persisted.
    key_member: KeyMember,
    shares: KeyState,
}

impl Member {
    fn core(&self) -> &Agreement {
        self.role
            .agreement()
            .expect("simulated members always run the agreement")
    }

    fn app(&self) -> &ms::app::App {
        self.role.app()
    }
}

struct ClientSlot {
    key: Keypair,
    next_seq: u64,
    remaining: u32,
    current: Option<Request>,
    /// The payloads (encoded MS operations) of requests 1, 2, ...; `None` for a load client, whose
    /// requests are operations of an outsider ([`client_request`]).
    script: Option<Vec<Vec<u8>>>,
    /// The request (its `seq`) this client holds back until the epoch timer fires: its `EndEpoch`.
    gate: Option<u64>,
}

/// What the MS part of a run draws: the genesis configuration (the agreement's committee plus
/// `extras`), who joins, leaves, dies, and who lies about probes or ends the epoch early.
struct MsSetup {
    genesis: Configuration,
    /// Joining nodes and whether their admission certificate is valid.
    joiners: Vec<(NodeId, bool)>,
    leavers: BTreeSet<NodeId>,
    /// Members that no longer answer probes: every correct committee member reports them.
    dead: BTreeSet<NodeId>,
    /// A live member that the Byzantine prober (alone) reports unresponsive.
    accused: Option<NodeId>,
    /// The Byzantine member that lies in its probe reports, and whether it also submits an
    /// `EndEpoch` before anyone else.
    prober: Option<(usize, bool)>,
    /// Requests that must all be decided before the correct members' epoch timers fire.
    before_end: BTreeSet<RequestKey>,
}

/// The swarm parameters of one run.
#[derive(Debug)]
struct Swarm {
    clients: usize,
    requests_per_client: u32,
    drop_p: f64,
    dup_p: f64,
    max_delay: u64,
    partitions: bool,
    crashes: bool,
    primary_crashes: u32,
    /// Every member crashes at once (a power cut) at this time during the faults, and each
    /// restarts from what it persisted (drawn from a stream of its own, so that the seeds without
    /// it draw as before).
    crash_all: Option<u64>,
    heal_at: u64,
    client_retry_ms: u64,
    max_batch: usize,
    checkpoint_interval: u64,
    window: u64,
    pipeline: u64,
    request_timeout_ms: u64,
    tick_ms: u64,
}

struct Sim {
    rng: Rng,
    swarm: Swarm,
    now: u64,
    queue: Queue<Ev>,
    digest: blake3::Hasher,
    members: Vec<Member>,
    ids: Vec<NodeId>,
    clients: Vec<ClientSlot>,
    client_keys: BTreeSet<PublicKey>,
    net: Network<usize>,
    /// Every request the clients created.
    submitted: Vec<RequestKey>,
    /// seq → (digests executed there, first correct member that executed it).
    reference: BTreeMap<SeqNo, (Vec<Digest>, usize)>,
    /// Client requests executed by some correct member.
    decided: BTreeSet<RequestKey>,
    violations: Vec<String>,
    healed_at: Option<u64>,
    state_installs: u64,
    evidence: u64,
    ms: MsSetup,
    coverage: MsCoverage,
    /// What members restart with.
    core_opts: Options,
    admission: PublicKey,
    forget_signed_state: bool,
    /// Every statement a correct member signed.
    signed: SignedLog,
    /// Correct members restarted from their persisted state.
    restarts: u64,
}

/// Runs one seed.
pub fn run_seed(seed: u64, opts: &RunOptions) -> SeedReport {
    let mut sim = Sim::new(seed, opts.clone());
    sim.run();
    let byz: Vec<String> = sim
        .members
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.byz.as_ref().map(|b| format!("{i}:{}", b.kind)))
        .collect();
    let setup = format!(
        "{:?} byzantine={byz:?} ms: extras={} joiners(valid)={:?} leavers={} dead={} accused={} prober={:?}",
        sim.swarm,
        sim.ms.genesis.members.len() - sim.members.len(),
        sim.ms.joiners.iter().map(|j| j.1).collect::<Vec<_>>(),
        sim.ms.leavers.len(),
        sim.ms.dead.len(),
        sim.ms.accused.is_some(),
        sim.ms.prober
    );
    let max_view = sim
        .members
        .iter()
        .filter(|m| m.byz.is_none())
        .map(|m| m.core().view())
        .max()
        .unwrap_or(0);
    SeedReport {
        seed,
        decided: sim.decided.len() as u64,
        max_view,
        state_installs: sim.state_installs,
        evidence: sim.evidence,
        violations: sim.violations,
        digest: *sim.digest.finalize().as_bytes(),
        setup,
        ms: sim.coverage,
    }
}

impl Sim {
    fn new(seed: u64, opts: RunOptions) -> Sim {
        let mut rng = Rng::new(seed);
        let f = opts.f as usize;
        let n = 3 * f + 1;
        let checkpoint_interval = *rng.pick(&[2u64, 4, 8]);
        let swarm = Swarm {
            clients: 2 + rng.below(4),
            requests_per_client: 5 + rng.below(26) as u32,
            drop_p: *rng.pick(&[0.0, 0.01, 0.05, 0.15]),
            dup_p: *rng.pick(&[0.0, 0.02, 0.1]),
            max_delay: *rng.pick(&[2, 20, 100]),
            partitions: rng.chance(0.4),
            crashes: rng.chance(0.4),
            primary_crashes: rng.below(3) as u32,
            crash_all: None,
            heal_at: rng.range(1_000, 8_000),
            client_retry_ms: rng.range(500, 3_000),
            max_batch: *rng.pick(&[1usize, 2, 4, 8]),
            checkpoint_interval,
            window: checkpoint_interval * *rng.pick(&[2u64, 4]),
            pipeline: *rng.pick(&[1u64, 2, 4]),
            request_timeout_ms: *rng.pick(&[300u64, 600, 1_000]),
            tick_ms: *rng.pick(&[50u64, 100, 250]),
        };
        let mut keys: Vec<Keypair> = (0..n).map(|_| Keypair::from_seed(rng.seed32())).collect();
        // Member i is the agreement's member i: the committee is in node id order.
        keys.sort_by_key(|k| k.node_id());
        let ids: Vec<NodeId> = keys.iter().map(|k| k.node_id()).collect();
        // Byzantine members: up to f, each with its own adversary. A primary-type adversary is
        // often put where it will be primary: view 0 (index 0) or the first view change (index 1).
        let byz_count = if rng.chance(0.5) { f } else { rng.below(f + 1) };
        let mut slots: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut slots);
        let mut byz: BTreeMap<usize, Adversary> = BTreeMap::new();
        for &i in slots.iter().take(byz_count) {
            let kind = *rng.pick(&Adversary::ALL);
            let wanted = match kind {
                Adversary::Equivocate | Adversary::Withhold => Some(0),
                Adversary::OmitInNewView => Some(1),
                _ => None,
            };
            let at = match wanted {
                Some(w) if rng.chance(0.6) && !byz.contains_key(&w) => w,
                _ => i,
            };
            let at = if byz.contains_key(&at) {
                (0..n).find(|j| !byz.contains_key(j)).expect("fewer than n")
            } else {
                at
            };
            byz.insert(at, kind);
        }
        // The largest messages (a window of batches and certificates) must fit the wire: shrink
        // the batches, then the window, until the core accepts the options.
        let mut swarm = swarm;
        let mut power = Rng::new(seed ^ 0x706f_7765_725f_6375);
        if power.chance(0.5) {
            swarm.crash_all = Some(power.range(100, swarm.heal_at));
        }
        let core_opts = loop {
            let o = Options {
                epoch: EPOCH,
                max_batch: swarm.max_batch,
                checkpoint_interval: swarm.checkpoint_interval,
                window: swarm.window,
                pipeline: swarm.pipeline.min(swarm.window),
                request_timeout_ms: swarm.request_timeout_ms,
                tick_ms: swarm.tick_ms,
                max_pending: 1024,
                mutant: opts.mutant,
            };
            if o.validate(n).is_ok() {
                break o;
            }
            if swarm.max_batch > 1 {
                swarm.max_batch /= 2;
            } else if swarm.window > 2 * swarm.checkpoint_interval {
                swarm.window /= 2;
            } else {
                swarm.checkpoint_interval /= 2;
                swarm.window = 2 * swarm.checkpoint_interval;
            }
        };
        // The MS: a genesis configuration whose committee is the agreement's committee, plus
        // members outside the committee (some leave, some die); nodes that join.
        let admission = Keypair::from_seed(rng.seed32());
        let extras: Vec<Keypair> = (0..2 + rng.below(4))
            .map(|_| Keypair::from_seed(rng.seed32()))
            .collect();
        let addr = |i: usize| format!("10.0.{}.{}:7100", i / 200, i % 200 + 1);
        let mut genesis_members: Vec<NodeInfo> = keys
            .iter()
            .chain(extras.iter())
            .enumerate()
            .map(|(i, k)| NodeInfo::new(k.public(), addr(i)))
            .collect();
        genesis_members.sort_by_key(|m| m.id);
        let mut committee_ids = ids.clone();
        committee_ids.sort();
        let genesis = Configuration {
            epoch: 0,
            params: Params::with_f(opts.f),
            members: genesis_members,
            committee: committee_ids,
            prev: None,
            key: None,
        };
        genesis
            .validate()
            .expect("the simulator builds valid genesis configurations");
        let mut members = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let setup = role_setup(key, &genesis, admission.public(), &core_opts);
            let (role, why) = Role::new(setup, Resume::Fresh, 0);
            assert!(
                why.is_none(),
                "the simulator builds valid committees: {why:?}"
            );
            let byz = byz.get(&i).map(|&kind| Byz {
                kind,
                recorded: Vec::new(),
                old_requests: Vec::new(),
                equivocations_left: 1 + rng.below(4) as u32,
                victim: (i + 1 + rng.below(n - 1)) % n,
                fake_client: Keypair::from_seed(rng.seed32()),
                fake_seq: 0,
            });
            members.push(Member {
                key: key.clone(),
                role,
                up: true,
                crashed: false,
                disk: None,
                byz,
                timer_at: None,
                executed: BTreeSet::new(),
                client_executed: 0,
                certified: None,
                key_member: KeyMember::new(key.clone(), Default::default()),
                shares: KeyState::default(),
            });
        }
        let mut clients: Vec<ClientSlot> = (0..swarm.clients)
            .map(|_| ClientSlot {
                key: Keypair::from_seed(rng.seed32()),
                next_seq: 1,
                remaining: swarm.requests_per_client,
                current: None,
                script: None,
                gate: None,
            })
            .collect();
        let ms = draw_ms(
            &mut rng,
            genesis,
            &admission,
            &keys,
            &extras,
            &byz,
            &mut clients,
        );
        let client_keys = clients.iter().map(|c| c.key.public()).collect();
        let net = Network::new(swarm.drop_p, swarm.dup_p, swarm.max_delay, None);
        Sim {
            rng,
            swarm,
            now: 0,
            queue: Queue::default(),
            digest: blake3::Hasher::new(),
            members,
            ids,
            clients,
            client_keys,
            net,
            submitted: Vec::new(),
            reference: BTreeMap::new(),
            decided: BTreeSet::new(),
            violations: Vec::new(),
            healed_at: None,
            state_installs: 0,
            evidence: 0,
            ms,
            coverage: MsCoverage::default(),
            core_opts,
            admission: admission.public(),
            forget_signed_state: opts.forget_signed_state,
            signed: SignedLog::default(),
            restarts: 0,
        }
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.queue.schedule(at, ev);
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(format!("t={}ms: {what}", self.now));
        }
    }

    fn correct(&self, m: usize) -> bool {
        self.members[m].byz.is_none()
    }

    fn run(&mut self) {
        for m in 0..self.members.len() {
            self.schedule(0, Ev::Timer { m, at: 0 });
            self.members[m].timer_at = Some(0);
            if self.members[m].byz.is_some() {
                let at = self.rng.range(50, 300);
                self.schedule(at, Ev::ByzTick { m });
            }
        }
        let heal_at = self.swarm.heal_at;
        for c in 0..self.clients.len() {
            // Load clients start at once; the MS's submitters at some point during the faults.
            let at = if self.clients[c].script.is_some() {
                self.rng.range(0, heal_at)
            } else {
                self.rng.range(0, 100)
            };
            self.schedule(at, Ev::ClientNext { c });
        }
        self.schedule(heal_at, Ev::Heal);
        if self.swarm.partitions {
            for _ in 0..3 {
                let at = self.rng.range(0, heal_at);
                self.schedule(at, Ev::Partition);
            }
        }
        if self.swarm.crashes {
            for _ in 0..3 {
                let at = self.rng.range(0, heal_at);
                let m = self.rng.below(self.members.len());
                self.schedule(at, Ev::Crash { m });
            }
        }
        if let Some(at) = self.swarm.crash_all {
            self.schedule(at, Ev::CrashAll);
        }
        for _ in 0..self.swarm.primary_crashes {
            let at = self.rng.range(100, heal_at);
            self.schedule(at, Ev::CrashPrimary);
        }
        while let Some((at, ev)) = self.queue.pop() {
            self.now = at;
            if self.queue.processed() > EVENT_BUDGET {
                self.violation(format!(
                    "event budget of {EVENT_BUDGET} exceeded (livelock?)"
                ));
                break;
            }
            let ev = ev.expect("nothing is cancelled here");
            self.step(ev);
            if let Some(h) = self.healed_at {
                if self.finished() {
                    break;
                }
                if self.now > h + LIVENESS_BOUND_MS {
                    self.report_liveness();
                    break;
                }
            }
        }
        self.check_prefixes();
        self.check_membership();
    }

    /// Every two correct members' logs agree on their common prefix (the application digests are
    /// a hash chain, so comparing the digest at the shorter length compares the whole prefix).
    fn check_prefixes(&mut self) {
        let correct: Vec<usize> = (0..self.members.len())
            .filter(|&m| self.correct(m))
            .collect();
        for (i, &a) in correct.iter().enumerate() {
            for &b in &correct[i + 1..] {
                let (la, lb) = (&self.members[a].app(), self.members[b].app());
                let common = la.executed().min(lb.executed());
                if common > 0 && la.digest_at(common) != lb.digest_at(common) {
                    self.violation(format!(
                        "SAFETY: the logs of members {a} and {b} differ within their first {common} sequence numbers"
                    ));
                }
            }
        }
    }

    /// The MS checks, against the agreed log (the longest log of a correct member, whose prefixes
    /// the other correct members share) and what the seed drew:
    /// - the epoch ends exactly at the first agreed `EndEpoch` that makes `f+1` distinct committee
    ///   members ask (so a single Byzantine member's early one does not end it), at every correct
    ///   member that got there, with the IDENTICAL next configuration;
    /// - joiners with a valid certificate that joined before the end are members of it, joiners
    ///   without one are not; leavers are not; a dead member reported by `f+1` correct members is
    ///   evicted; a live member reported only by the Byzantine prober is kept;
    /// - the old committee's correct members certify it (`2f+1` signatures verify against
    ///   genesis and extend the chain); `f` signatures, or a tampered configuration, are refused.
    fn check_membership(&mut self) {
        let f = self.ms.genesis.params.f_ms as usize;
        let correct: Vec<usize> = (0..self.members.len())
            .filter(|&m| self.correct(m))
            .collect();
        let Some(&oracle) = correct
            .iter()
            .max_by_key(|&&m| (self.members[m].app().executed(), Reverse(m)))
        else {
            return;
        };
        let genesis = self.ms.genesis.clone();
        // Walk the agreed log up to the end of the epoch.
        let mut votes: BTreeSet<NodeId> = BTreeSet::new();
        let mut end: Option<(SeqNo, usize)> = None;
        let mut before: BTreeSet<RequestKey> = BTreeSet::new();
        // target → its correct watchers whose last report called it unresponsive (the members
        // outside the committee are all correct).
        let byzantine: BTreeSet<NodeId> = (0..self.members.len())
            .filter(|&m| !self.correct(m))
            .map(|m| self.ids[m])
            .collect();
        let mut reported: BTreeMap<NodeId, BTreeSet<NodeId>> = BTreeMap::new();
        'walk: for (i, batch) in self.members[oracle].app().batches().iter().enumerate() {
            for (index, r) in batch.iter().enumerate() {
                before.insert(r.key());
                let from = r.client.node_id();
                match postcard::from_bytes::<MsOp>(&r.payload) {
                    Ok(MsOp::EndEpoch { epoch: 0 }) if genesis.committee.contains(&from) => {
                        votes.insert(from);
                        if votes.len() > f {
                            end = Some((i as SeqNo + 1, index));
                            break 'walk;
                        }
                    }
                    Ok(MsOp::Probe {
                        epoch: 0,
                        target,
                        responsive,
                    }) if !byzantine.contains(&from) && watches(&genesis, &from, &target) => {
                        let set = reported.entry(target).or_default();
                        if responsive {
                            set.remove(&from);
                        } else {
                            set.insert(from);
                        }
                    }
                    _ => {}
                }
            }
        }
        let ended: Vec<(usize, Ended)> = correct
            .iter()
            .filter_map(|&m| self.members[m].app().ended().cloned().map(|e| (m, e)))
            .collect();
        let Some((first, reference)) = ended.first().cloned() else {
            return; // the liveness check reports an epoch that never ended
        };
        for (m, e) in &ended {
            if Some((e.seq, e.index)) != end {
                self.violation(format!(
                    "MS: member {m} ended the epoch at request {}:{} but f+1 committee members asked only at {end:?}",
                    e.seq, e.index
                ));
            }
            if e.config.hash() != reference.config.hash() {
                self.violation(format!(
                    "MS SAFETY: members {first} and {m} computed different next configurations"
                ));
            }
        }
        let next = reference.config;
        self.digest.update(&next.hash());
        self.coverage.epoch_ended = true;
        if let Some((b, true)) = self.ms.prober {
            // Its EndEpoch was agreed (before the others were submitted) and did not end the epoch.
            let early = (self.members[b].key.public(), 1);
            if before.contains(&early) && votes.len() > f {
                self.coverage.early_end = true;
            }
        }
        if next.epoch != 1 || next.prev != Some(genesis.hash()) || next.validate().is_err() {
            self.violation(format!(
                "MS: the next configuration is not a valid successor of genesis (epoch {}, {:?})",
                next.epoch,
                next.validate()
            ));
        }
        // Who is in it.
        let submitted_before = |key: NodeId| {
            before
                .iter()
                .any(|(pk, seq)| *seq == 1 && pk.node_id() == key)
        };
        for &(id, valid) in &self.ms.joiners.clone() {
            let joined_before = submitted_before(id);
            match (valid, next.is_member(&id)) {
                (true, false) if joined_before => self.violation(format!(
                    "MS: node {id:?} joined with a valid certificate before the epoch ended but is not a member of the next configuration"
                )),
                (true, true) => self.coverage.joined += 1,
                (false, true) => self.violation(format!(
                    "MS: node {id:?} joined without a valid admission certificate and is a member of the next configuration"
                )),
                (false, false) => self.coverage.refused += 1,
                _ => {}
            }
        }
        for &id in &self.ms.leavers.clone() {
            if !submitted_before(id) {
                continue;
            }
            if next.is_member(&id) {
                self.violation(format!(
                    "MS: node {id:?} left before the epoch ended but is a member of the next configuration"
                ));
            } else {
                self.coverage.left += 1;
            }
        }
        for &id in &self.ms.dead.clone() {
            let reporters = reported.get(&id).map_or(0, |r| r.len());
            if reporters >= eviction_reports(&genesis) {
                if next.is_member(&id) {
                    self.violation(format!(
                        "MS: dead member {id:?} was reported unresponsive by {reporters} of its correct watchers but was not evicted"
                    ));
                } else {
                    self.coverage.evicted += 1;
                }
            }
        }
        if let Some(id) = self.ms.accused {
            if next.is_member(&id) {
                self.coverage.kept += 1;
            } else {
                self.violation(format!(
                    "MS: live member {id:?}, reported unresponsive only by a Byzantine member, was evicted"
                ));
            }
        }
        self.check_certificate(&genesis, &next, &correct);
    }

    /// The old committee certifies `next`: the correct members' signatures, collected, verify as a
    /// successor of genesis and extend a chain that starts at genesis; a certificate with `f`
    /// signatures, a tampered configuration, or one signed by the Byzantine members and outsiders
    /// is refused.
    fn check_certificate(
        &mut self,
        genesis: &Configuration,
        next: &Configuration,
        correct: &[usize],
    ) {
        let f = genesis.params.f_ms as usize;
        let mut collector = CertificateCollector::new(genesis.clone(), next.clone());
        let mut certified = None;
        for (k, &m) in correct.iter().enumerate() {
            let key = &self.members[m].key;
            let got = collector.add(key.node_id(), collector.sign(key));
            let enough = k >= 2 * f;
            if got.is_some() != enough && certified.is_none() {
                self.violation(format!(
                    "MS: the certificate collector returned {} after {} signatures",
                    if got.is_some() {
                        "a certificate"
                    } else {
                        "nothing"
                    },
                    k + 1
                ));
            }
            if certified.is_none() {
                certified = got;
            }
        }
        let Some(certified) = certified else {
            self.violation(
                "MS: the correct old committee members could not certify the next configuration"
                    .into(),
            );
            return;
        };
        // What the members' roles assembled from each other's shares certifies the same.
        for &m in correct {
            match &self.members[m].certified {
                Some(cc) if cc.config != certified.config => self.violation(format!(
                    "MS SAFETY: member {m} assembled a certificate of another configuration"
                )),
                Some(_) => self.coverage.certified += 1,
                None => {}
            }
        }
        if let Err(e) = certified.verify_successor(genesis) {
            self.violation(format!(
                "MS: the certified next configuration is refused: {e}"
            ));
        }
        let chain = || ConfigChain::new(CertifiedConfig::genesis(genesis.clone()));
        match chain().map(|mut c| c.extend(vec![certified.clone()]).map(|_| c.epoch())) {
            Ok(Ok(1)) => {}
            other => self.violation(format!(
                "MS: a chain from genesis does not extend to the certified configuration: {other:?}"
            )),
        }
        let mut forged: Vec<(&'static str, CertifiedConfig)> = Vec::new();
        let mut under = certified.clone();
        under.cert.signatures.truncate(f);
        forged.push(("under-signed (f signatures)", under));
        let mut tampered = certified.clone();
        let intruder = Keypair::from_seed(blake3::hash(&next.hash()).into());
        tampered
            .config
            .members
            .push(NodeInfo::new(intruder.public(), "10.9.9.9:7100"));
        tampered.config.members.sort_by_key(|m| m.id);
        forged.push(("tampered (an extra member)", tampered));
        let mut recommitted = certified.clone();
        recommitted.config.committee = genesis.committee.clone();
        if recommitted.config != certified.config {
            forged.push(("tampered (the old committee kept)", recommitted));
        }
        // Signed by every Byzantine member plus outsiders (members outside the old committee).
        let byz_keys: Vec<&Keypair> = (0..self.members.len())
            .filter(|&m| !self.correct(m))
            .map(|m| &self.members[m].key)
            .collect();
        let mut forger = Vec::new();
        forger.extend(byz_keys.iter().copied());
        forger.push(&intruder);
        let by_byz = CertifiedConfig::certify(next.clone(), &forger);
        forged.push(("signed by the Byzantine members and an outsider", by_byz));
        for (what, c) in forged {
            let direct = c.verify_successor(genesis);
            let chained = chain().map(|mut ch| ch.extend(vec![c]));
            if direct.is_ok() || matches!(chained, Ok(Ok(_))) {
                self.violation(format!(
                    "MS: a {what} configuration certificate was accepted"
                ));
            } else {
                self.coverage.rejected_certs += 1;
            }
        }
    }

    /// Every client is done and every correct member executed every request.
    fn finished(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.remaining == 0 && c.current.is_none())
            && self.members.iter().filter(|m| m.byz.is_none()).all(|m| {
                m.client_executed == self.submitted.len()
                    && m.app().ended().is_some()
                    && m.certified.is_some()
            })
    }

    fn report_liveness(&mut self) {
        let mut problems = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.byz.is_some() {
                continue;
            }
            let missing = self
                .submitted
                .iter()
                .filter(|k| !m.executed.contains(k))
                .count();
            if missing > 0 {
                problems.push(format!(
                    "member {i} (view {}, changing {:?}, executed {}, stable {}) misses {missing} of {} requests",
                    m.core().view(),
                    m.core().changing_to(),
                    m.core().last_executed(),
                    m.core().stable_checkpoint(),
                    self.submitted.len()
                ));
            }
        }
        let states: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                format!(
                    "{i}{}: view {} changing {:?} executed {} stable {}",
                    if m.byz.is_some() { " (byzantine)" } else { "" },
                    m.core().view(),
                    m.core().changing_to(),
                    m.core().last_executed(),
                    m.core().stable_checkpoint()
                )
            })
            .collect();
        problems.push(format!("members: {}", states.join(", ")));
        let not_ended: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.correct(i) && self.members[i].app().ended().is_none())
            .collect();
        if !not_ended.is_empty() {
            problems.push(format!(
                "the epoch did not end at correct members {not_ended:?}"
            ));
        }
        let uncertified: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.correct(i) && self.members[i].certified.is_none())
            .collect();
        if !uncertified.is_empty() {
            problems.push(format!(
                "correct members {uncertified:?} assembled no certificate of the next configuration"
            ));
        }
        let waiting = self.clients.iter().filter(|c| c.current.is_some()).count();
        self.violation(format!(
            "liveness: {LIVENESS_BOUND_MS}ms after the faults healed, {waiting} clients still wait; {}",
            problems.join("; ")
        ));
    }

    fn step(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Deliver { to, from, bytes } => {
                self.digest.update(&now.to_le_bytes());
                self.digest.update(&[to as u8, from as u8]);
                self.digest.update(blake3::hash(&bytes).as_bytes());
                if !self.members[to].up {
                    return;
                }
                if let Some(b) = self.members[to].byz.as_mut() {
                    if b.kind == Adversary::Replay && b.recorded.len() < 400 {
                        b.recorded.push((from, bytes.clone()));
                    }
                }
                let from_id = self.ids[from];
                let role = &mut self.members[to].role;
                if is_ms(&bytes) {
                    match decode::<MsMessage>(&bytes).map(|e| e.msg) {
                        Ok(MsMessage::ConfigShare { epoch, hash, sig }) => {
                            role.on_config_share(from_id, epoch, hash, sig)
                        }
                        Ok(MsMessage::FreshShare {
                            epoch,
                            config,
                            time_ms,
                            sig,
                        }) => role.on_fresh_share(from_id, epoch, config, time_ms, sig),
                        _ => {}
                    }
                } else {
                    let _ = role.on_agreement(now, from_id, &bytes);
                }
                self.drain(to);
            }
            Ev::Timer { m, at } => {
                if self.members[m].timer_at == Some(at) {
                    self.members[m].timer_at = None;
                    if self.members[m].up {
                        self.members[m].role.on_timer(now, now);
                        self.drain(m);
                    }
                }
            }
            Ev::Submit { m, req } => {
                if self.members[m].up {
                    if self.members[m]
                        .byz
                        .as_ref()
                        .is_some_and(|b| b.kind == Adversary::Silent)
                    {
                        return;
                    }
                    let _ = self.members[m].role.submit(now, req);
                    self.drain(m);
                }
            }
            Ev::ClientNext { c } => self.client_next(c),
            Ev::ClientRetry { c, seq } => {
                let current = self.clients[c].current.clone();
                if let Some(req) = current.filter(|r| r.seq == seq) {
                    self.submit_to_random(req);
                    let at = now + self.swarm.client_retry_ms;
                    self.schedule(at, Ev::ClientRetry { c, seq });
                }
            }
            Ev::Crash { m } => {
                if self.net.faulty && self.members[m].up {
                    self.members[m].up = false;
                    self.members[m].crashed = true;
                    let at = now + self.rng.range(100, 2_000);
                    self.schedule(at, Ev::Restart { m });
                }
            }
            Ev::CrashPrimary => {
                if self.net.faulty {
                    // The primary of the highest view a correct member is in.
                    let view = (0..self.members.len())
                        .filter(|&i| self.correct(i))
                        .map(|i| self.members[i].core().view())
                        .max()
                        .unwrap_or(0);
                    let p = (view % self.members.len() as u64) as usize;
                    if self.members[p].up {
                        self.members[p].up = false;
                        self.members[p].crashed = true;
                        let at = now + self.rng.range(500, 3_000);
                        self.schedule(at, Ev::Restart { m: p });
                    }
                }
            }
            Ev::CrashAll => {
                if self.net.faulty {
                    for m in 0..self.members.len() {
                        if self.members[m].up {
                            self.members[m].up = false;
                            self.members[m].crashed = true;
                            let at = now + self.rng.range(100, 2_000);
                            self.schedule(at, Ev::Restart { m });
                        }
                    }
                }
            }
            Ev::Restart { m } => self.restart(m),
            Ev::Partition => {
                if self.net.faulty {
                    self.net.partition(&mut self.rng, 0..self.members.len());
                    let at = now + self.rng.range(100, 1_500);
                    self.schedule(at, Ev::HealPartition);
                }
            }
            Ev::HealPartition => self.net.partition = None,
            Ev::ByzTick { m } => {
                self.byz_tick(m);
                let at = now + self.rng.range(50, 300);
                self.schedule(at, Ev::ByzTick { m });
            }
            Ev::Heal => {
                self.net.heal();
                self.healed_at = Some(now);
                for m in 0..self.members.len() {
                    self.restart(m);
                }
            }
        }
    }

    fn restart(&mut self, m: usize) {
        if self.members[m].up {
            return;
        }
        self.members[m].up = true;
        if std::mem::take(&mut self.members[m].crashed) {
            self.recover(m);
        }
        self.members[m].role.on_timer(self.now, self.now);
        self.drain(m);
    }

    /// A crashed member's process starts again: its memory is gone; it has what it persisted
    /// (nothing under the `forget-signed-state` mutant), which the role restarts from as a
    /// node's does.
    fn recover(&mut self, m: usize) {
        let disk = if self.forget_signed_state {
            None
        } else {
            self.members[m].disk.clone()
        };
        let setup = role_setup(
            &self.members[m].key,
            &self.ms.genesis,
            self.admission,
            &self.core_opts,
        );
        let resume = match &disk {
            Some((record, batches)) => Resume::Saved { record, batches },
            None => Resume::Fresh,
        };
        let (role, why) = Role::new(setup, resume, self.now);
        if let Some(why) = why {
            self.violation(format!(
                "member {m} cannot restart from the state it persisted: {why}"
            ));
            return;
        }
        if self.correct(m) {
            self.restarts += 1;
        }
        let member = &mut self.members[m];
        member.role = role;
        member.timer_at = None;
        member.key_member = KeyMember::new(member.key.clone(), member.shares.clone());
        self.sync_key(m);
        // Decisions it had not executed come out as actions.
        self.executed_again(m, disk.map_or(0, |d| d.1.len()));
    }

    /// Recomputes what member `m` executed from its application's first `upto` batches (after a
    /// restart or a state install; the later ones are still to come as actions).
    fn executed_again(&mut self, m: usize, upto: usize) {
        let batches = self.members[m].app().batches();
        let executed: BTreeSet<RequestKey> = batches[..upto.min(batches.len())]
            .iter()
            .flatten()
            .map(|r| r.key())
            .collect();
        let ours = executed
            .iter()
            .filter(|k| self.client_keys.contains(&k.0))
            .count();
        let member = &mut self.members[m];
        member.executed = executed;
        member.client_executed = ours;
    }

    /// Records what correct member `m` signed in `bytes` ([`SignedLog`]).
    fn check_signed(&mut self, m: usize, bytes: &[u8]) {
        for v in self.signed.record(m, m as u32, bytes) {
            self.violation(v);
        }
    }

    // ---- network ----

    fn send(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        for at in self.net.arrivals(&mut self.rng, self.now, from, to) {
            let bytes = bytes.clone();
            self.schedule(at, Ev::Deliver { to, from, bytes });
        }
    }

    fn others(&self, m: usize) -> Vec<usize> {
        (0..self.members.len()).filter(|&i| i != m).collect()
    }

    // ---- members ----

    /// Carries out member `m`'s actions in order, as the node's MS driver does.
    fn drain(&mut self, m: usize) {
        while let Some(action) = self.members[m].role.poll() {
            match action {
                Action::Persist(saved) => {
                    let disk = self.members[m].disk.get_or_insert_with(Default::default);
                    disk.0 = saved.record;
                    disk.1
                        .truncate(saved.first_batch.saturating_sub(1) as usize);
                    disk.1.extend(saved.batches);
                }
                Action::Agreement {
                    to: Some(to),
                    bytes,
                } => {
                    let to = self.ids.iter().position(|i| *i == to).expect("a member");
                    self.emit(m, vec![to], bytes);
                }
                Action::Agreement { to: None, bytes } => {
                    let to = self.others(m);
                    self.emit(m, to, bytes);
                }
                Action::Send { to, msg } => {
                    let to = to
                        .iter()
                        .filter_map(|id| self.ids.iter().position(|i| i == id))
                        .collect();
                    self.emit(m, to, encode_msg(0, msg));
                }
                Action::Executed { seq, requests, .. } => {
                    self.on_decided(m, seq, requests);
                    self.sync_key(m);
                }
                Action::OutOfOrder(e) => {
                    if self.correct(m) {
                        self.violation(format!("member {m}: {e}"));
                    }
                }
                Action::FetchBatches { upto, digest } => self.install_state(m, upto, digest),
                Action::EnteredView(view) => {
                    // An equivocating primary equivocates again in each view it leads.
                    let leads = view % self.members.len() as u64 == m as u64;
                    if leads && self.members[m].byz.is_some() {
                        let k = 1 + self.rng.below(4) as u32;
                        if let Some(b) = self.members[m].byz.as_mut() {
                            b.equivocations_left = k;
                        }
                    }
                }
                Action::Submit(MsOp::Misbehaviour { evidence, .. }) => {
                    self.on_evidence(m, evidence)
                }
                // The end of the epoch comes from the scripted clients (`draw_ms`), as probe
                // verdicts do, so that the checks know what the next configuration must hold.
                Action::Submit(_) => {}
                Action::Certified(cc) => self.on_certified(m, cc),
                Action::Freshness(cert) => {
                    if cert.verify(&self.ms.genesis).is_err() && self.correct(m) {
                        self.violation(format!(
                            "member {m} assembled a freshness certificate that does not verify"
                        ));
                    }
                    self.coverage.freshness += 1;
                }
            }
        }
        if !self.members[m].up {
            return;
        }
        if let Some(t) = self.members[m].role.next_timer() {
            let t = t.max(self.now + 1);
            if self.members[m].timer_at.is_none_or(|cur| t < cur) {
                self.members[m].timer_at = Some(t);
                self.schedule(t, Ev::Timer { m, at: t });
            }
        }
    }

    /// Member `m`'s part in the round of the MS key, as the node's machine does it after every
    /// batch: its complaints (a correct member complains only about a wrong deal, and every deal
    /// here is a correct one), its share, what it persists.
    fn sync_key(&mut self, m: usize) {
        let member = &mut self.members[m];
        let ops = match member.role.app().membership().key_of(0) {
            Some(round) => member.key_member.sync(round),
            None => Vec::new(),
        };
        if let Some(state) = member.key_member.take_changed() {
            member.shares = state;
        }
        if !ops.is_empty() && self.correct(m) {
            self.violation(format!(
                "member {m} complained about a deal of the MS key though every dealer deals correctly"
            ));
        }
    }

    /// Member `m` assembled the next configuration's certificate: it must verify as genesis's
    /// successor, certify the configuration the epoch ended with at `m`, and carry the MS key
    /// the committee generated, of which `m` holds a valid share.
    fn on_certified(&mut self, m: usize, cc: CertifiedConfig) {
        if !self.correct(m) {
            return;
        }
        let held = self.members[m]
            .key_member
            .holder()
            .for_signing(0)
            .map(|s| (s.is_valid(), s.public.clone()));
        match (&cc.config.key, held) {
            (None, _) => self.violation(format!(
                "member {m} certified a configuration that carries no MS key"
            )),
            (Some(_), None) => self.violation(format!(
                "member {m} holds no share of the MS key its epoch ended with"
            )),
            (Some(key), Some((valid, public))) => {
                if !valid || public != *key {
                    self.violation(format!(
                        "member {m}'s share of the MS key is not valid for the key its epoch ended with"
                    ));
                }
            }
        }
        if let Err(e) = cc.verify_successor(&self.ms.genesis) {
            self.violation(format!(
                "member {m} assembled a certificate that does not verify: {e}"
            ));
        }
        let ended = self.members[m].app().ended().map(|e| e.config.hash());
        if ended != Some(cc.config.hash()) {
            self.violation(format!(
                "MS SAFETY: member {m} certified a configuration other than the one its epoch ended with"
            ));
        }
        self.members[m].certified = Some(cc);
    }

    fn on_decided(&mut self, m: usize, seq: SeqNo, requests: Vec<Request>) {
        self.digest.update(&[m as u8]);
        self.digest.update(&seq.to_le_bytes());
        let correct = self.correct(m);
        if let Some(b) = self.members[m].byz.as_mut() {
            if b.old_requests.len() < 200 {
                b.old_requests.extend(requests.iter().cloned());
            }
        }
        let executed = &self.members[m].executed;
        let twice: Vec<RequestKey> = requests
            .iter()
            .map(|r| r.key())
            .filter(|k| executed.contains(k))
            .collect();
        if correct && !twice.is_empty() {
            self.violation(format!(
                "member {m} executed a request twice (at sequence number {seq})"
            ));
        }
        let digests: Vec<Digest> = requests.iter().map(|r| r.digest()).collect();
        if correct {
            match self.reference.get(&seq) {
                None => {
                    self.reference.insert(seq, (digests, m));
                }
                Some((d, first)) if *d != digests => {
                    let first = *first;
                    self.violation(format!(
                        "SAFETY: members {first} and {m} executed different requests at sequence number {seq}"
                    ));
                }
                Some(_) => {}
            }
        }
        let ours = requests
            .iter()
            .filter(|r| self.client_keys.contains(&r.client))
            .count();
        self.members[m].client_executed += ours;
        self.members[m]
            .executed
            .extend(requests.iter().map(|r| r.key()));
        if correct {
            let mut finished = Vec::new();
            for r in &requests {
                if self.client_keys.contains(&r.client) {
                    self.decided.insert(r.key());
                    finished.push(r.key());
                }
            }
            for key in finished {
                self.client_done(key);
            }
        }
    }

    /// Member `m` fetches the batches up to the stable checkpoint `seq` ([`Action::FetchBatches`]):
    /// from a member that holds them (the simulator picks one at once; the role checks them
    /// against `app_digest`).
    fn install_state(&mut self, m: usize, seq: SeqNo, app_digest: Digest) {
        let source = (0..self.members.len()).filter(|&j| j != m).find(|&j| {
            let a = self.members[j].app();
            a.executed() >= seq && a.digest_at(seq) == Some(app_digest)
        });
        let Some(j) = source else {
            if self.correct(m) {
                self.violation(format!(
                    "member {m} installs the state at {seq} but no member holds it"
                ));
            }
            return;
        };
        if self.correct(m) {
            self.state_installs += 1;
        }
        let batches = self.members[j].app().batches()[..seq as usize].to_vec();
        let old = self.members[m].app();
        let (last, digest) = (old.executed(), old.digest());
        let source_app = self.members[j].app();
        let extends = last < seq && (last == 0 || source_app.digest_at(last) == Some(digest));
        if self.correct(m) && !extends {
            self.violation(format!(
                "member {m} installs a state at {seq} that does not extend what it executed (up to {last})"
            ));
        }
        if !self.members[m].role.on_batch_log(&batches) && self.correct(m) {
            self.violation(format!(
                "member {m} refused the batches of the stable checkpoint {seq} it was installing"
            ));
        }
        // The batches replayed without executing one by one: its part in the key's round too,
        // as the node's machine does on catching up.
        self.sync_key(m);
        // What it held while installing comes out as actions (executed after `seq`).
        self.executed_again(m, seq as usize);
    }

    fn on_evidence(&mut self, m: usize, e: Evidence) {
        if !self.correct(m) {
            return;
        }
        self.evidence += 1;
        match e {
            Evidence::Equivocation { first, .. } => {
                let guilty = first.signer() as usize;
                if guilty < self.members.len() && self.correct(guilty) {
                    self.violation(format!(
                        "member {m} holds evidence against correct member {guilty}"
                    ));
                }
            }
            Evidence::ConflictingCommits { first, .. } => {
                self.violation(format!(
                    "SAFETY: member {m} holds commit certificates for two different batches at sequence number {}",
                    first.seq
                ));
            }
        }
    }

    // ---- clients ----

    fn client_next(&mut self, c: usize) {
        let slot = &self.clients[c];
        if slot.current.is_some() || slot.remaining == 0 {
            return;
        }
        if slot.gate == Some(slot.next_seq) && !self.epoch_timer_fired() {
            let at = self.now + 250;
            self.schedule(at, Ev::ClientNext { c });
            return;
        }
        let slot = &mut self.clients[c];
        slot.remaining -= 1;
        let seq = slot.next_seq;
        slot.next_seq += 1;
        let req = match &slot.script {
            Some(script) => Request::sign(&slot.key, seq, script[seq as usize - 1].clone()),
            None => client_request(&slot.key, seq),
        };
        slot.current = Some(req.clone());
        self.submitted.push(req.key());
        self.submit_to_random(req.clone());
        if self.rng.chance(0.1) {
            // The same request through a second member.
            self.submit_to_random(req);
        }
        let at = self.now + self.swarm.client_retry_ms;
        self.schedule(at, Ev::ClientRetry { c, seq });
    }

    /// The correct committee members' epoch timers fire once the faults healed and every other
    /// MS operation was decided (so what the next configuration must contain is known).
    fn epoch_timer_fired(&self) -> bool {
        self.healed_at.is_some() && self.ms.before_end.iter().all(|k| self.decided.contains(k))
    }

    fn submit_to_random(&mut self, req: Request) {
        let m = self.rng.below(self.members.len());
        if self.net.faulty && self.rng.chance(self.swarm.drop_p) {
            return;
        }
        let at = self.now + self.rng.range(1, self.swarm.max_delay);
        self.schedule(at, Ev::Submit { m, req });
    }

    fn client_done(&mut self, key: RequestKey) {
        let Some(c) = self.clients.iter().position(|c| {
            c.key.public() == key.0 && c.current.as_ref().is_some_and(|r| r.seq == key.1)
        }) else {
            return;
        };
        self.clients[c].current = None;
        let at = self.now + self.rng.range(0, 50);
        self.schedule(at, Ev::ClientNext { c });
    }

    // ---- Byzantine members ----

    /// Sends `bytes` from member `m` to `targets`, or what its adversary sends instead.
    fn emit(&mut self, m: usize, targets: Vec<usize>, bytes: Vec<u8>) {
        if self.correct(m) {
            self.check_signed(m, &bytes);
        }
        let Some(kind) = self.members[m].byz.as_ref().map(|b| b.kind) else {
            for to in targets {
                self.send(m, to, bytes.clone());
            }
            return;
        };
        let msg = decode::<AgreementMessage>(&bytes).ok().map(|e| e.msg);
        match kind {
            Adversary::Silent => {}
            Adversary::Garbage => {
                for to in targets {
                    let roll = self.rng.below(10);
                    let out = if roll < 4 {
                        let len = self.rng.below(200);
                        self.rng.bytes(len)
                    } else if roll < 7 {
                        let mut b = bytes.clone();
                        for _ in 0..1 + self.rng.below(3) {
                            if !b.is_empty() {
                                let i = self.rng.below(b.len());
                                b[i] ^= 1 << self.rng.below(8);
                            }
                        }
                        b
                    } else {
                        bytes.clone()
                    };
                    self.send(m, to, out);
                }
            }
            Adversary::BadSignatures => {
                for to in targets {
                    let out = match msg.clone() {
                        Some(mut msg) if self.rng.chance(0.7) => {
                            self.corrupt(&mut msg);
                            encode_msg(EPOCH, msg)
                        }
                        _ => bytes.clone(),
                    };
                    self.send(m, to, out);
                }
            }
            Adversary::Equivocate => match msg {
                Some(AgreementMessage::PrePrepare { pre_prepare, batch }) => {
                    self.equivocate(m, pre_prepare, batch)
                }
                Some(AgreementMessage::Prepare(p)) if self.rng.chance(0.2) => {
                    // A prepare for another digest to half of the members.
                    let mut other = p.body.clone();
                    other.digest[0] ^= 0xff;
                    let key = self.members[m].key.clone();
                    let alt = encode_msg(
                        EPOCH,
                        AgreementMessage::Prepare(Signed::sign(&key, p.signer, EPOCH, other)),
                    );
                    for to in targets {
                        let b = if self.rng.chance(0.5) { &alt } else { &bytes };
                        self.send(m, to, b.clone());
                    }
                }
                _ => {
                    for to in targets {
                        self.send(m, to, bytes.clone());
                    }
                }
            },
            Adversary::Withhold => match msg {
                Some(AgreementMessage::PrePrepare { .. }) => {}
                Some(AgreementMessage::NewView { .. }) if self.rng.chance(0.5) => {}
                Some(AgreementMessage::Commit(_)) => {
                    for to in targets {
                        if self.rng.chance(0.5) {
                            self.send(m, to, bytes.clone());
                        }
                    }
                }
                _ => {
                    for to in targets {
                        self.send(m, to, bytes.clone());
                    }
                }
            },
            Adversary::Replay => match msg {
                Some(AgreementMessage::PrePrepare { pre_prepare, batch }) => {
                    let out = self.with_replayed_request(m, pre_prepare, batch);
                    for to in targets {
                        self.send(m, to, out.clone());
                    }
                }
                _ => {
                    for to in targets {
                        self.send(m, to, bytes.clone());
                    }
                }
            },
            Adversary::OmitInNewView => match msg {
                Some(AgreementMessage::NewView { new_view, batches }) => {
                    let out = self.omit_in_new_view(m, new_view, batches);
                    for to in targets {
                        self.send(m, to, out.clone());
                    }
                }
                Some(AgreementMessage::Commit(_)) => {
                    let victim = self.members[m].byz.as_ref().map_or(0, |b| b.victim);
                    for to in targets {
                        if to != victim {
                            self.send(m, to, bytes.clone());
                        }
                    }
                }
                _ => {
                    for to in targets {
                        self.send(m, to, bytes.clone());
                    }
                }
            },
        }
    }

    fn byz_tick(&mut self, m: usize) {
        if !self.members[m].up {
            return;
        }
        let Some(kind) = self.members[m].byz.as_ref().map(|b| b.kind) else {
            return;
        };
        match kind {
            Adversary::Garbage => {
                let to = *self.rng.pick(&self.others(m));
                let len = self.rng.below(300);
                let mut junk = self.rng.bytes(len);
                if self.rng.chance(0.5) && junk.len() > 3 {
                    // A valid header in front of the junk.
                    junk[0] = 1;
                    junk[1] = 2;
                    junk[2] = EPOCH as u8;
                }
                self.send(m, to, junk);
            }
            Adversary::BadSignatures => {
                // A request with a forged client signature, as if from a simulated client.
                let c = self.rng.below(self.clients.len());
                let mut req = client_request(&self.clients[c].key, 1_000_000);
                req.payload.push(1);
                let to = *self.rng.pick(&self.others(m));
                self.send(m, to, encode_msg(EPOCH, AgreementMessage::Request(req)));
            }
            Adversary::Replay => {
                let b = self.members[m].byz.as_ref().expect("byzantine");
                let (recorded, old) = (b.recorded.len(), b.old_requests.len());
                for _ in 0..1 + self.rng.below(3) {
                    if recorded > 0 {
                        let i = self.rng.below(recorded);
                        let bytes = self.members[m].byz.as_ref().expect("byzantine").recorded[i]
                            .1
                            .clone();
                        let to = *self.rng.pick(&self.others(m));
                        self.send(m, to, bytes);
                    }
                }
                if old > 0 {
                    let i = self.rng.below(old);
                    let req = self.members[m]
                        .byz
                        .as_ref()
                        .expect("byzantine")
                        .old_requests[i]
                        .clone();
                    let to = *self.rng.pick(&self.others(m));
                    self.send(m, to, encode_msg(EPOCH, AgreementMessage::Request(req)));
                }
            }
            _ => {}
        }
    }

    /// Breaks the outermost signature of a message one way or another.
    fn corrupt(&mut self, msg: &mut AgreementMessage) {
        let n = self.members.len() as u32;
        let how = self.rng.below(3);
        fn mutate<T>(s: &mut Signed<T>, how: usize, n: u32) {
            match how {
                0 => s.sig.0[7] ^= 0x20,
                1 => s.signer = (s.signer + 1) % n,
                _ => s.signer = n + 3,
            }
        }
        match msg {
            AgreementMessage::Request(r) => r.sig.0[3] ^= 1,
            AgreementMessage::PrePrepare { pre_prepare, batch } => {
                if how == 2 && !batch.is_empty() {
                    batch.pop(); // the body no longer matches what was signed
                } else {
                    mutate(pre_prepare, how, n)
                }
            }
            AgreementMessage::Prepare(p) => {
                if how == 2 {
                    p.body.digest[0] ^= 1;
                } else {
                    mutate(p, how, n)
                }
            }
            AgreementMessage::Commit(c) => {
                if how == 2 {
                    c.body.seq += 1;
                } else {
                    mutate(c, how, n)
                }
            }
            AgreementMessage::Checkpoint(c) => mutate(c, how, n),
            AgreementMessage::ViewChange { view_change, .. } => {
                if how == 2 {
                    view_change.body.prepared.clear();
                } else {
                    mutate(view_change, how, n)
                }
            }
            AgreementMessage::NewView { new_view, .. } => mutate(new_view, how, n),
            AgreementMessage::Decided(proofs) => {
                if let Some(c) = proofs.first_mut().and_then(|p| p.commits.first_mut()) {
                    mutate(c, how, n)
                }
            }
            AgreementMessage::State(s) => {
                if let Some(c) = s.stable.signatures.first_mut() {
                    mutate(c, how, n)
                } else {
                    s.app_digest[0] ^= 1;
                }
            }
            AgreementMessage::Status { executed, .. } => *executed += 1_000,
            AgreementMessage::StableCheckpoint(proof) => {
                if let Some(c) = proof.signatures.first_mut() {
                    mutate(c, how, n)
                } else {
                    proof.seq += 8;
                }
            }
            AgreementMessage::Fetch { .. } => {}
        }
    }

    /// An equivocating primary: one batch to some backups, another to the rest, each backed by
    /// its commit; after a few, nothing at all.
    fn equivocate(&mut self, m: usize, pp: Signed<PrePrepare>, batch: Vec<Request>) {
        let b = self.members[m].byz.as_mut().expect("byzantine");
        if b.equivocations_left == 0 {
            return; // withholds from now on: the backups will change view
        }
        b.equivocations_left -= 1;
        b.fake_seq += 1;
        let fake = Request::sign(&b.fake_client, b.fake_seq, b"equivocation".to_vec());
        let key = self.members[m].key.clone();
        let mut alt = match self.rng.below(4) {
            0 => Vec::new(),
            1 => batch.iter().rev().cloned().collect(),
            2 => batch.iter().skip(1).cloned().collect(),
            _ => {
                let mut a = batch.clone();
                a.push(fake.clone());
                a
            }
        };
        if batch_digest(&alt) == batch_digest(&batch) {
            alt = vec![fake];
        }
        let max = self.members[m].core().options().max_batch;
        alt.truncate(max);
        if batch_digest(&alt) == batch_digest(&batch) {
            alt = Vec::new();
        }
        let mut others = self.others(m);
        self.rng.shuffle(&mut others);
        let cut = 1 + self.rng.below(others.len() - 1);
        let PrePrepare { view, seq, .. } = pp.body;
        for (i, to) in others.into_iter().enumerate() {
            let b = if i < cut { batch.clone() } else { alt.clone() };
            let digest = batch_digest(&b);
            let pre_prepare = if i < cut {
                pp.clone()
            } else {
                Signed::sign(&key, pp.signer, EPOCH, PrePrepare { view, seq, digest })
            };
            let commit = Signed::sign(&key, pp.signer, EPOCH, Commit { view, seq, digest });
            self.send(
                m,
                to,
                encode_msg(
                    EPOCH,
                    AgreementMessage::PrePrepare {
                        pre_prepare,
                        batch: b,
                    },
                ),
            );
            self.send(m, to, encode_msg(EPOCH, AgreementMessage::Commit(commit)));
        }
    }

    /// A replaying primary adds an already executed request to its batch (re-signing the
    /// pre-prepare): execution must skip it.
    fn with_replayed_request(
        &mut self,
        m: usize,
        pp: Signed<PrePrepare>,
        mut batch: Vec<Request>,
    ) -> Vec<u8> {
        let b = self.members[m].byz.as_ref().expect("byzantine");
        let max = self.members[m].core().options().max_batch;
        if b.old_requests.is_empty() || batch.len() >= max {
            return encode_msg(
                EPOCH,
                AgreementMessage::PrePrepare {
                    pre_prepare: pp,
                    batch,
                },
            );
        }
        let i = self.rng.below(b.old_requests.len());
        batch.insert(0, b.old_requests[i].clone());
        let key = self.members[m].key.clone();
        let body = PrePrepare {
            digest: batch_digest(&batch),
            ..pp.body
        };
        let pre_prepare = Signed::sign(&key, pp.signer, EPOCH, body);
        encode_msg(EPOCH, AgreementMessage::PrePrepare { pre_prepare, batch })
    }

    /// A new primary that re-issues every sequence number as the null batch.
    fn omit_in_new_view(
        &mut self,
        m: usize,
        nv: Signed<NewView>,
        batches: Vec<Vec<Request>>,
    ) -> Vec<u8> {
        let key = self.members[m].key.clone();
        let null = batch_digest(&[]);
        let mut body = nv.body.clone();
        let mut new_batches = batches;
        for (pp, b) in body.pre_prepares.iter_mut().zip(new_batches.iter_mut()) {
            if pp.body.digest != null {
                *pp = Signed::sign(
                    &key,
                    pp.signer,
                    EPOCH,
                    PrePrepare {
                        digest: null,
                        ..pp.body.clone()
                    },
                );
                b.clear();
            }
        }
        let new_view = Signed::sign(&key, nv.signer, EPOCH, body);
        encode_msg(
            EPOCH,
            AgreementMessage::NewView {
                new_view,
                batches: new_batches,
            },
        )
    }
}

/// Draws the MS part of a run and adds a client for every node that submits operations: joiners,
/// leavers, and the committee members themselves (probe reports, then `EndEpoch` once their epoch
/// timer fires, which the driver holds back until every other operation was decided and the
/// faults healed).
fn draw_ms(
    rng: &mut Rng,
    genesis: Configuration,
    admission: &Keypair,
    keys: &[Keypair],
    extras: &[Keypair],
    byz: &BTreeMap<usize, Adversary>,
    clients: &mut Vec<ClientSlot>,
) -> MsSetup {
    fn add(
        clients: &mut Vec<ClientSlot>,
        before_end: &mut BTreeSet<RequestKey>,
        key: Keypair,
        ops: Vec<MsOp>,
        gated_end: bool,
    ) {
        let n = ops.len() as u64;
        for seq in 1..=n {
            if !(gated_end && seq == n) {
                before_end.insert((key.public(), seq));
            }
        }
        clients.push(ClientSlot {
            key,
            next_seq: 1,
            remaining: n as u32,
            current: None,
            script: Some(
                ops.iter()
                    .map(|op| postcard::to_stdvec(op).expect("operations encode"))
                    .collect(),
            ),
            gate: gated_end.then_some(n),
        });
    }
    let mut before_end = BTreeSet::new();
    let mut order: Vec<usize> = (0..extras.len()).collect();
    rng.shuffle(&mut order);
    let dead_n = rng.below(3).min(extras.len() - 1);
    let leave_n = rng.below(3).min(extras.len() - 1 - dead_n);
    let dead: BTreeSet<NodeId> = order[..dead_n]
        .iter()
        .map(|&i| extras[i].node_id())
        .collect();
    let mut leavers = BTreeSet::new();
    for &i in &order[dead_n..dead_n + leave_n] {
        leavers.insert(extras[i].node_id());
        add(
            clients,
            &mut before_end,
            extras[i].clone(),
            vec![MsOp::Leave { epoch: 0 }],
            false,
        );
    }
    let mut joiners = Vec::new();
    let (valid_n, invalid_n) = (rng.below(4), rng.below(3));
    for j in 0..valid_n + invalid_n {
        let key = Keypair::from_seed(rng.seed32());
        let valid = j < valid_n;
        let cert = if valid {
            AdmissionCert::sign(admission, &key.public())
        } else if rng.chance(0.5) {
            // Self-signed.
            AdmissionCert::sign(&key, &key.public())
        } else {
            // The admission key's certificate of another node.
            let other = Keypair::from_seed(rng.seed32());
            AdmissionCert::sign(admission, &other.public())
        };
        let member = NodeInfo::new(key.public(), format!("10.1.0.{}:7100", j + 1));
        joiners.push((key.node_id(), valid));
        add(
            clients,
            &mut before_end,
            key,
            vec![MsOp::Join {
                epoch: 0,
                member,
                cert,
            }],
            false,
        );
    }
    let live: Vec<NodeId> = genesis
        .members
        .iter()
        .map(|m| m.id)
        .filter(|id| !dead.contains(id) && !leavers.contains(id))
        .collect();
    let probe = |target: NodeId, responsive: bool| MsOp::Probe {
        epoch: 0,
        target,
        responsive,
    };
    let byz_members: Vec<usize> = byz.keys().copied().collect();
    let mut prober = None;
    let mut accused = None;
    if !byz_members.is_empty() && rng.chance(0.8) {
        let b = *rng.pick(&byz_members);
        let early = rng.chance(0.5);
        let candidates: Vec<NodeId> = live
            .iter()
            .copied()
            .filter(|id| *id != keys[b].node_id())
            .collect();
        let target = *rng.pick(&candidates);
        let mut ops = Vec::new();
        if early {
            ops.push(MsOp::EndEpoch { epoch: 0 });
        }
        ops.push(probe(target, false));
        // It keeps vouching for the dead.
        ops.extend(dead.iter().map(|&d| probe(d, true)));
        prober = Some((b, early));
        accused = Some(target);
        if rng.chance(0.5) {
            ops.extend(genesis_deal(&genesis, &keys[b]));
        }
        add(clients, &mut before_end, keys[b].clone(), ops, false);
    }
    // The other Byzantine members deal correctly or withhold their deal.
    for &b in &byz_members {
        if prober.map(|(p, _)| p) != Some(b) && rng.chance(0.5) {
            let ops = genesis_deal(&genesis, &keys[b]).into_iter().collect();
            add(clients, &mut before_end, keys[b].clone(), ops, false);
        }
    }
    // Every correct member probes the members it watches (committee members and the live members
    // outside it alike); its verdicts come from the core's prober (the node's), over `evict_after`
    // rounds in which the dead answer nothing and every other member signs its challenge.
    let live_extras: Vec<&Keypair> = extras
        .iter()
        .filter(|k| !dead.contains(&k.node_id()) && !leavers.contains(&k.node_id()))
        .collect();
    for (i, key) in keys.iter().enumerate() {
        if byz.contains_key(&i) {
            continue;
        }
        let mut ops = verdicts(&genesis, key, keys, extras, &dead, rng);
        ops.extend(genesis_deal(&genesis, key));
        rng.shuffle(&mut ops);
        if rng.chance(0.5) {
            ops.push(probe(*rng.pick(&live), true));
        }
        ops.push(MsOp::EndEpoch { epoch: 0 });
        add(clients, &mut before_end, key.clone(), ops, true);
    }
    for key in live_extras {
        let ops = verdicts(&genesis, key, keys, extras, &dead, rng);
        if !ops.is_empty() {
            add(clients, &mut before_end, key.clone(), ops, false);
        }
    }
    MsSetup {
        genesis,
        joiners,
        leavers,
        dead,
        accused,
        prober,
        before_end,
    }
}

/// Member `key`'s deal in the generation of the MS key, as its node's machine makes it.
fn genesis_deal(genesis: &Configuration, key: &Keypair) -> Option<MsOp> {
    let op = KeyMember::new(key.clone(), Default::default()).enter(genesis)?;
    Some(MsOp::Key {
        epoch: 0,
        op: Box::new(op),
    })
}

/// What member `key`'s role is made of; the epoch timer is off (the scripted clients end the
/// epoch).
fn role_setup(
    key: &Keypair,
    genesis: &Configuration,
    admission: PublicKey,
    opts: &Options,
) -> Setup {
    Setup {
        key: key.clone(),
        config: genesis.clone(),
        admission_key: admission,
        opts: opts.clone(),
        epoch_timer: false,
        seed: [3; 32],
    }
}

/// The probe verdicts of member `key` after `evict_after` rounds in which the dead answer nothing
/// and every other member signs its challenge: exactly the dead among the members it watches.
fn verdicts(
    genesis: &Configuration,
    key: &Keypair,
    keys: &[Keypair],
    extras: &[Keypair],
    dead: &BTreeSet<NodeId>,
    rng: &mut Rng,
) -> Vec<MsOp> {
    let (mut prober, _) = Prober::new(genesis, key.node_id(), None);
    let mut ops = Vec::new();
    for _ in 0..genesis.params.evict_after_probes {
        for (target, nonce) in prober.round(|| rng.seed32()) {
            let answer = keys
                .iter()
                .chain(extras)
                .find(|k| k.node_id() == target && !dead.contains(&target))
                .map(|k| k.sign(Domain::Probe, &probe_body(0, &nonce, &key.node_id())));
            if let Some(v) = prober.answered(&target, &nonce, answer.as_ref()) {
                ops.push(MsOp::Probe {
                    epoch: 0,
                    target: v.target,
                    responsive: v.responsive,
                });
            }
        }
    }
    let watched_dead = watched(genesis, &key.node_id())
        .into_iter()
        .filter(|t| dead.contains(t))
        .count();
    assert_eq!(
        ops.len(),
        watched_dead,
        "the prober reports exactly the dead it watches"
    );
    ops
}

/// Request `seq` of a simulated client: deterministic, so its digest can be recomputed.
///
/// A load client is an outsider: its operations (leaving, ending the epoch, reporting itself)
/// carry no authority and must all be ignored by the MS.
fn client_request(key: &Keypair, seq: u64) -> Request {
    let op = match seq % 3 {
        0 => MsOp::Leave { epoch: 0 },
        1 => MsOp::EndEpoch { epoch: 0 },
        _ => MsOp::Probe {
            epoch: 0,
            target: key.node_id(),
            responsive: false,
        },
    };
    let payload = postcard::to_stdvec(&op).expect("operations encode");
    Request::sign(key, seq, payload)
}
