//! The deterministic simulator of dBQS.
//!
//! One seed fixes everything: the swarm parameters of the run (pool size, clients, loss, duplication,
//! delay, partitions, crashes, epoch changes, which nodes are Byzantine and how), and every random
//! choice during it. Time is virtual (milliseconds); events run in (time, sequence) order from one
//! queue, so a seed replays exactly, and a digest of every event proves it.
//!
//! A run has three phases:
//! 1. faults: clients run random operations on a small key set while the network drops, duplicates,
//!    delays and reorders messages, partitions nodes, nodes crash and restart, and the test moves the
//!    cluster to new configurations (acting as the Membership Service); nodes run the real state
//!    transfer into each epoch, fetch an object on demand when a read hits it before its range is
//!    transferred, and garbage-collect the ranges they lost once their transfer into the epoch is
//!    complete (docs/DESIGN.md §4);
//! 2. healed: the network is reliable, everyone is up and knows every configuration; every operation
//!    of a correct client must complete within [`LIVENESS_BOUND_MS`];
//! 3. audit: a fresh client reads every key and every written content block.
//!
//! Checks: every public-key block's history is linearizable; every content read returns exactly the
//! bytes named by the id; a content block whose write completed is never "not found"; no operation
//! fails; liveness after healing; when a correct node deletes a lost range, at least `f+1` correct
//! members of the range's new group hold it; after a final reconfiguration and once every transfer
//! and garbage collection finished, every completed write is on `2f+1` correct members of its group
//! and no correct node holds anything it is not responsible for.

pub mod adversary;
mod ms;

use crate::checker::{linearizable_register, RegKind, RegOp};
use crate::harness::{Network, Queue};
use crate::rng::Rng;
pub use adversary::Adversary;
use dbqsfs_core::config::{CertifiedConfig, ConfigChain, Configuration, Member, Params};
use dbqsfs_core::crypto::{Keypair, NodeId, ObjectId, Signature};
use dbqsfs_core::dbqs::client::{Client, ClientOptions, ClientOutput, OpId, Operation, Outcome};
use dbqsfs_core::dbqs::gc::{Gc, GcOptions, GcOutput};
use dbqsfs_core::dbqs::msg::DbqsMessage;
use dbqsfs_core::dbqs::refs::RefRecord;
use dbqsfs_core::dbqs::replica::{Handled, Replica, ReplicaOptions};
use dbqsfs_core::dbqs::transfer::{
    Arc as RingArc, Transfer, TransferMessage, TransferOptions, TransferOutput,
};
pub use dbqsfs_core::dbqs::Mutant;
use dbqsfs_core::object::{content_id, pk_block_id, PkBlock, Stamp};
use dbqsfs_core::store::{MemStore, Store, StoreError};
use dbqsfs_core::wire::Protocol;
use dbqsfs_core::wire::{decode, encode_msg};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// After the faults heal, every operation of a correct client must complete within this bound of
/// its start (or of the heal, for operations that started before it).
pub const LIVENESS_BOUND_MS: u64 = 60_000;
/// A run that processes more events than this is reported as a violation (a livelock).
const EVENT_BUDGET: u64 = 3_000_000;
const RETRANSMIT_MS: u64 = 150;
/// The replicas' grace before a released block goes ([`ReplicaOptions::grace_ms`]).
const GRACE_MS: u64 = 400;

/// What a run is asked to do.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub f: u32,
    pub mutant: Mutant,
    /// The composed mode: the Membership Service's committee (the node's role machine) decides
    /// the epochs instead of the test ([`ms`]).
    pub composed: bool,
    /// The driver mutant `forget-signed-state` (composed mode): a committee member that restarts
    /// resumes its role without what it persisted.
    pub forget_signed_state: bool,
}

/// What a run found.
#[derive(Clone, Debug)]
pub struct SeedReport {
    pub seed: u64,
    /// Client operations that completed (the audit excluded).
    pub ops: u64,
    pub violations: Vec<String>,
    pub digest: [u8; 32],
    /// The swarm parameters drawn, for the report of a failing seed.
    pub setup: String,
    /// What the run exercised, for `--verbose`.
    pub stats: Stats,
}

/// Counts of what a run exercised beyond client operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Objects deleted by garbage collection at correct nodes.
    pub deleted: u64,
    /// Reads that hit an object not transferred yet and started an on-demand fetch.
    pub on_demand: u64,
    /// On-demand fetches that completed before their range.
    pub on_demand_done: u64,
    /// `Gone` answers received by transfers.
    pub gone: u64,
    /// Requests to new-group peers (`ListReady`, `FetchReady`).
    pub peer_requests: u64,
    /// Content blocks a full store's transfer deferred (`Replica::defer`).
    pub deferred: u64,
    /// Releases of content blocks that completed.
    pub releases: u64,
    /// Released content blocks whose data correct nodes deleted.
    pub released_deleted: u64,
    /// A Byzantine client's forged or replayed releases.
    pub forged_releases: u64,
    /// Composed mode: epochs the MS committee certified.
    pub ms_epochs: u64,
    /// Composed mode: roles taken up by Byzantine nodes that lie in them (not only silent).
    pub ms_lying_roles: u64,
    /// Composed mode: pre-prepares a Byzantine primary equivocated on.
    pub ms_equivocations: u64,
    /// Composed mode: pieces of whole configurations correct nodes served, and pieces refused.
    pub ms_pieces_served: u64,
    pub ms_pieces_refused: u64,
    /// Composed mode: freshness certificates correct members assembled under the MS key.
    pub ms_fresh_under_key: u64,
    /// Composed mode: pull answers in which a lying node claimed epochs it does not hold.
    pub ms_false_epochs: u64,
}

#[derive(Debug)]
enum Ev {
    Deliver {
        to: NodeId,
        from: NodeId,
        bytes: Vec<u8>,
    },
    ClientTimer {
        c: usize,
        at: u64,
    },
    ClientNext {
        c: usize,
    },
    /// A request of client `c` to a node that was down failed in transport (the driver's connection
    /// timeout).
    ClientPeerFailed {
        c: usize,
        node: NodeId,
    },
    /// A state-transfer request of node `n` to a node that was down failed in transport.
    TransferPeerFailed {
        n: usize,
        node: NodeId,
    },
    ClientCrash {
        c: usize,
    },
    ClientRestart {
        c: usize,
    },
    Crash {
        n: usize,
    },
    Restart {
        n: usize,
    },
    Partition,
    HealPartition,
    EpochChange,
    Install {
        n: usize,
        epoch: u64,
    },
    Transfer {
        n: usize,
        epoch: u64,
        at: u64,
    },
    Gc {
        n: usize,
        epoch: u64,
        at: u64,
    },
    /// Node `n` deletes the released blocks whose grace is over (`Replica::sweep`).
    Sweep {
        n: usize,
        at: u64,
    },
    Heal,
    /// Composed mode: node `n`'s role timer.
    MsTimer {
        n: usize,
        at: u64,
    },
    /// Composed mode: the answer to node `n`'s probe of `target` (`None`: failed or timed out).
    MsProbeAnswer {
        n: usize,
        epoch: u64,
        target: NodeId,
        nonce: [u8; 32],
        answer: Option<Signature>,
    },
    /// Composed mode: resend what was not executed; start the roles nodes should run.
    MsTick,
}

struct Node {
    key: Keypair,
    replica: Replica<Arc<MemStore>>,
    store: Arc<MemStore>,
    up: bool,
    byz: Option<Byz>,
    /// State transfers in progress, by the epoch they enter (volatile: lost in a crash).
    transfers: BTreeMap<u64, Transfer>,
    /// Garbage collections in progress, by the epoch on entering which the ranges were lost, and
    /// those finished (volatile: a restarted node starts them again, skipping collected arcs).
    gcs: BTreeMap<u64, Gc>,
    gc_done: BTreeSet<u64>,
    /// The pending timer event of each transfer and collection, by epoch.
    transfer_timer: BTreeMap<u64, u64>,
    gc_timer: BTreeMap<u64, u64>,
    sweep_timer: Option<u64>,
}

struct Byz {
    kind: Adversary,
    /// Every validly signed public-key block it has been sent, by id.
    seen: BTreeMap<ObjectId, Vec<PkBlock>>,
    /// Messages it received, for replaying later.
    recorded: Vec<Vec<u8>>,
}

struct ClientSlot {
    key: Keypair,
    client: Client,
    up: bool,
    ops_left: u32,
    /// The operation in flight and its history index.
    current: Option<(OpId, usize)>,
    timer_at: Option<u64>,
    /// Owner key of this client's single-writer block.
    own: Keypair,
    /// The version of its own block it last wrote, when known (then it may skip discovery).
    own_version: Option<u64>,
    auditor: bool,
    /// The sequence number of this owner's next hold or release (kept across its crashes: the
    /// owner's durable counter).
    ref_seq: u64,
    /// The content blocks it holds (put, not released since).
    held: Vec<ObjectId>,
    /// A Byzantine client: it only sends forged and replayed releases of others' blocks.
    thief: bool,
}

#[derive(Clone, Debug)]
enum HKind {
    PkWrite {
        key: usize,
        tag: u64,
    },
    /// `stamp`: of the value read, if any.
    PkRead {
        key: usize,
        tag: Option<u64>,
        stamp: Option<Stamp>,
    },
    /// A put held by the client's own key at `seq`.
    PutContent {
        id: ObjectId,
        seq: u64,
    },
    /// A release by the client's own key at `seq`.
    Release {
        id: ObjectId,
        seq: u64,
    },
    /// A Byzantine client's forged or replayed release.
    Forged,
    GetContent {
        id: ObjectId,
        found: Option<bool>,
    },
}

#[derive(Clone, Debug)]
struct HOp {
    client: usize,
    call: u64,
    ret: Option<u64>,
    kind: HKind,
}

struct PkKey {
    id: ObjectId,
    label: Vec<u8>,
    /// `None`: the shared owner key, written by every client with version discovery.
    owner: Option<usize>,
}

/// The swarm parameters of one run.
#[derive(Debug)]
struct Swarm {
    pool: usize,
    clients: usize,
    ops_per_client: u32,
    drop_p: f64,
    dup_p: f64,
    max_delay: u64,
    partitions: bool,
    crashes: bool,
    client_crashes: bool,
    epoch_changes: u32,
    heal_at: u64,
    /// When set, about a quarter of the directed links are persistently slow (200–800 ms extra), so
    /// a write can reach one replica long before the others.
    slow_links: Option<u64>,
    /// Clients release content blocks they put (drawn from a stream of its own, so that the runs
    /// without releases are those of before releases existed).
    releases: bool,
    /// A Byzantine client sends forged and replayed releases (with `releases` only).
    thief: bool,
}

struct Sim {
    rng: Rng,
    opts: RunOptions,
    swarm: Swarm,
    now: u64,
    queue: Queue<Ev>,
    digest: blake3::Hasher,
    nodes: Vec<Node>,
    node_index: BTreeMap<NodeId, usize>,
    clients: Vec<ClientSlot>,
    client_index: BTreeMap<NodeId, usize>,
    configs: Vec<CertifiedConfig>,
    net: Network<NodeId>,
    shared_owner: Keypair,
    keys: Vec<PkKey>,
    contents: Vec<Vec<u8>>,
    history: Vec<HOp>,
    next_tag: u64,
    violations: Vec<String>,
    completed: u64,
    healed_at: Option<u64>,
    /// The audit's reads, taken one at a time by the auditor client.
    audit_queue: Vec<(Operation, HKind)>,
    /// Per client, the event indexes of its most recent sends (lost in part if it crashes now).
    recent_sends: BTreeMap<NodeId, Vec<(u64, usize)>>,
    stats: Stats,
    /// The stream of every draw about releases.
    del_rng: Rng,
    /// Every genuine release record sent, for the thief to replay.
    release_records: Vec<RefRecord>,
    /// The Membership Service, in the composed mode.
    ms: Option<ms::Ms>,
}

/// Runs one seed.
pub fn run_seed(seed: u64, opts: &RunOptions) -> SeedReport {
    let mut sim = Sim::new(seed, opts.clone());
    sim.run();
    let setup = format!(
        "{:?} byzantine={:?}",
        sim.swarm,
        sim.nodes
            .iter()
            .filter_map(|n| n.byz.as_ref().map(|b| b.kind.name()))
            .collect::<Vec<_>>()
    );
    SeedReport {
        seed,
        ops: sim.completed,
        violations: sim.violations,
        digest: *sim.digest.finalize().as_bytes(),
        setup,
        stats: Stats {
            ms_epochs: sim.ms.as_ref().map_or(0, |m| m.epochs_certified),
            ms_lying_roles: sim.ms.as_ref().map_or(0, |m| m.lying_roles),
            ms_equivocations: sim.ms.as_ref().map_or(0, |m| m.equivocations),
            ms_pieces_served: sim.ms.as_ref().map_or(0, |m| m.pieces_served),
            ms_pieces_refused: sim.ms.as_ref().map_or(0, |m| m.pieces_refused),
            ms_fresh_under_key: sim.ms.as_ref().map_or(0, |m| m.fresh_under_key),
            ms_false_epochs: sim.ms.as_ref().map_or(0, |m| m.false_epochs),
            ..sim.stats
        },
    }
}

impl Sim {
    fn new(seed: u64, opts: RunOptions) -> Sim {
        let mut rng = Rng::new(seed);
        let f = opts.f as usize;
        let n_min = 3 * f + 1;
        let swarm = Swarm {
            pool: n_min + rng.below(4),
            clients: 2 + rng.below(4),
            ops_per_client: 15 + rng.below(26) as u32,
            drop_p: *rng.pick(&[0.0, 0.01, 0.05, 0.15]),
            dup_p: *rng.pick(&[0.0, 0.02, 0.1]),
            max_delay: *rng.pick(&[2, 20, 100]),
            partitions: rng.chance(0.5),
            crashes: rng.chance(0.5),
            client_crashes: rng.chance(0.5),
            epoch_changes: rng.below(4) as u32,
            heal_at: rng.range(500, 5000),
            slow_links: rng.chance(0.5).then(|| rng.next_u64()),
            releases: false,
            thief: false,
        };
        let mut swarm = swarm;
        let mut del_rng = Rng::new(seed ^ 0x7265_6c65_6173_6573);
        swarm.releases = del_rng.chance(0.5);
        swarm.thief = swarm.releases && del_rng.chance(0.5);
        let mut nodes = Vec::new();
        let mut node_index = BTreeMap::new();
        let byz_count = rng.below(f + 1);
        for i in 0..swarm.pool {
            let key = Keypair::from_seed(rng.seed32());
            node_index.insert(key.node_id(), i);
            nodes.push((key, None));
        }
        // Byzantine nodes: any `byz_count` of the pool, each with its own adversary.
        let mut order: Vec<usize> = (0..swarm.pool).collect();
        rng.shuffle(&mut order);
        // A full store is drawn from a stream of its own, so that adding it left every other
        // seed's draws (and the seeds recorded as regressions) as they were.
        let mut full = Rng::new(seed ^ 0x6675_6c6c_5f64_6973);
        let mut limits = BTreeMap::new();
        for &i in order.iter().take(byz_count) {
            nodes[i].1 = Some(*rng.pick(&Adversary::ALL));
            if full.chance(1.0 / 9.0) {
                nodes[i].1 = Some(Adversary::Full);
                limits.insert(i, full.below(6));
            }
        }
        // Genesis: the first 3f+1 + some of the pool.
        let params = Params::with_f(opts.f);
        let k = n_min + rng.below(swarm.pool - n_min + 1);
        let genesis = make_config(0, &params, nodes.iter().take(k).map(|(k, _)| k), None);
        let genesis = CertifiedConfig::genesis(genesis);
        let replica_opts = ReplicaOptions {
            grace_ms: GRACE_MS,
            mutant: opts.mutant,
        };
        let nodes: Vec<Node> = nodes
            .into_iter()
            .enumerate()
            .map(|(i, (key, byz))| {
                let store = Arc::new(match limits.get(&i) {
                    Some(&limit) => MemStore::with_content_limit(limit),
                    None => MemStore::new(),
                });
                let chain = ConfigChain::new(genesis.clone()).expect("genesis is valid");
                let replica = Replica::new(
                    key.node_id(),
                    store.clone(),
                    chain,
                    true,
                    replica_opts.clone(),
                );
                Node {
                    transfers: BTreeMap::new(),
                    gcs: BTreeMap::new(),
                    gc_done: BTreeSet::new(),
                    transfer_timer: BTreeMap::new(),
                    gc_timer: BTreeMap::new(),
                    sweep_timer: None,
                    key,
                    replica,
                    store,
                    up: true,
                    byz: byz.map(|kind| Byz {
                        kind,
                        seen: BTreeMap::new(),
                        recorded: Vec::new(),
                    }),
                }
            })
            .collect();
        let shared_owner = Keypair::from_seed(rng.seed32());
        let mut keys: Vec<PkKey> = (0..2)
            .map(|i| {
                let label = format!("shared/{i}").into_bytes();
                PkKey {
                    id: pk_block_id(&shared_owner.public(), &label),
                    label,
                    owner: None,
                }
            })
            .collect();
        let composed = opts.composed;
        let forget_signed_state = opts.forget_signed_state;
        let mut sim = Sim {
            rng,
            opts,
            now: 0,
            queue: Queue::default(),
            digest: blake3::Hasher::new(),
            nodes,
            node_index,
            clients: Vec::new(),
            client_index: BTreeMap::new(),
            configs: vec![genesis],
            net: Network::new(swarm.drop_p, swarm.dup_p, swarm.max_delay, swarm.slow_links),
            shared_owner,
            keys: Vec::new(),
            contents: Vec::new(),
            history: Vec::new(),
            next_tag: 1,
            violations: Vec::new(),
            completed: 0,
            healed_at: None,
            audit_queue: Vec::new(),
            recent_sends: BTreeMap::new(),
            stats: Stats::default(),
            swarm,
            del_rng,
            release_records: Vec::new(),
            ms: composed.then(|| ms::Ms::new(seed, forget_signed_state)),
        };
        for c in 0..sim.swarm.clients {
            let own = Keypair::from_seed(sim.rng.seed32());
            let label = b"own".to_vec();
            keys.push(PkKey {
                id: pk_block_id(&own.public(), &label),
                label,
                owner: Some(c),
            });
            sim.add_client(own, sim.swarm.ops_per_client, false);
        }
        sim.keys = keys;
        if sim.swarm.thief {
            let own = Keypair::from_seed(sim.del_rng.seed32());
            let c = sim.add_client(own, 12, false);
            sim.clients[c].thief = true;
        }
        sim
    }

    fn add_client(&mut self, own: Keypair, ops: u32, auditor: bool) -> usize {
        let key = Keypair::from_seed(self.rng.seed32());
        let c = self.clients.len();
        let client = self.new_client_machine(&key);
        self.client_index.insert(key.node_id(), c);
        self.clients.push(ClientSlot {
            key,
            client,
            up: true,
            ops_left: ops,
            current: None,
            timer_at: None,
            own,
            own_version: None,
            auditor,
            ref_seq: 1,
            held: Vec::new(),
            thief: false,
        });
        c
    }

    fn new_client_machine(&mut self, key: &Keypair) -> Client {
        // Clients start from genesis and learn newer configurations from the replicas.
        let chain = ConfigChain::new(self.configs[0].clone()).expect("genesis is valid");
        let opts = ClientOptions {
            retransmit_ms: RETRANSMIT_MS,
            op_timeout_ms: None,
            first_request_id: self.rng.next_u64(),
            freshness_lease_ms: None,
            hedge_min_ms: 10,
            mutant: self.opts.mutant,
        };
        Client::new(key.node_id(), chain, opts)
    }

    fn schedule(&mut self, at: u64, ev: Ev) -> usize {
        self.queue.schedule(at, ev)
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }

    fn run(&mut self) {
        for c in 0..self.clients.len() {
            if self.clients[c].thief {
                let at = self.del_rng.range(0, 50);
                self.schedule(at, Ev::ClientNext { c });
                continue;
            }
            let at = self.rng.range(0, 50);
            self.schedule(at, Ev::ClientNext { c });
        }
        let heal_at = self.swarm.heal_at;
        self.schedule(heal_at, Ev::Heal);
        for _ in 0..self.swarm.epoch_changes {
            let at = self.rng.range(50, heal_at);
            self.schedule(at, Ev::EpochChange);
        }
        if self.swarm.partitions {
            for _ in 0..3 {
                let at = self.rng.range(0, heal_at);
                self.schedule(at, Ev::Partition);
            }
        }
        if self.swarm.crashes {
            for _ in 0..4 {
                let at = self.rng.range(0, heal_at);
                let n = self.rng.below(self.nodes.len());
                self.schedule(at, Ev::Crash { n });
            }
        }
        if self.swarm.client_crashes {
            let at = self.rng.range(0, heal_at);
            let c = self.rng.below(self.clients.len());
            self.schedule(at, Ev::ClientCrash { c });
        }
        if self.ms.is_some() {
            self.schedule(0, Ev::MsTick);
        }
        let mut audit_started = false;
        let mut settling_since: Option<u64> = None;
        let mut holders_checked = false;
        while let Some((at, ev)) = self.queue.pop() {
            self.now = at;
            if self.queue.processed() > EVENT_BUDGET {
                self.violation(format!(
                    "event budget of {EVENT_BUDGET} exceeded at t={}ms (livelock?)",
                    self.now
                ));
                break;
            }
            let Some(ev) = ev else {
                continue; // cancelled: lost in a crash
            };
            self.step(ev);
            if let Some(h) = self.healed_at {
                let workload_done = self
                    .clients
                    .iter()
                    .all(|c| c.auditor || (c.ops_left == 0 && c.current.is_none()));
                if workload_done && !audit_started {
                    audit_started = true;
                    self.start_audit();
                }
                let all_done = self
                    .clients
                    .iter()
                    .all(|c| c.ops_left == 0 && c.current.is_none());
                if audit_started && all_done {
                    // One more reconfiguration, let every transfer finish, then check where the
                    // objects are.
                    if settling_since.is_none() {
                        self.reconfigure(500);
                    }
                    let since = *settling_since.get_or_insert(self.now);
                    let newest = self.configs.len() as u64 - 1;
                    let reconfiguring = self.ms.as_ref().is_some_and(|m| m.reconfiguring());
                    let settled = !reconfiguring
                        && self.nodes.iter().all(|n| {
                            n.byz.is_some()
                                || (n.replica.epoch() == newest
                                    && n.replica.is_ready()
                                    && (1..=newest).all(|e| n.gc_done.contains(&e))
                                    && n.replica.next_sweep(self.now).is_none())
                        });
                    if settled {
                        self.check_holders();
                        holders_checked = true;
                        break;
                    }
                    if self.now > since + LIVENESS_BOUND_MS {
                        let nodes: Vec<String> = self
                            .nodes
                            .iter()
                            .filter(|n| n.byz.is_none())
                            .map(|n| {
                                let t: Vec<String> = n
                                    .transfers
                                    .iter()
                                    .map(|(e, t)| format!("transfer {e}: {}", t.describe()))
                                    .chain(
                                        n.gcs
                                            .iter()
                                            .map(|(e, g)| format!("gc {e}: {}", g.describe())),
                                    )
                                    .collect();
                                format!(
                                    "{} epoch {} ready {} gc done {:?} {}",
                                    n.key.node_id().short(),
                                    n.replica.epoch(),
                                    n.replica.is_ready(),
                                    n.gc_done,
                                    t.join(", ")
                                )
                            })
                            .collect();
                        let ms = self.ms_describe();
                        self.violation(format!(
                            "liveness: state transfers, garbage collections or a reconfiguration still running {LIVENESS_BOUND_MS}ms after the audit: {}{ms}",
                            nodes.join("; ")
                        ));
                        break;
                    }
                }
                // Every operation must complete within the bound of its start or of the heal,
                // whichever is later.
                let overdue = |c: &ClientSlot| {
                    c.current.is_some_and(|(_, hi)| {
                        self.now > self.history[hi].call.max(h) + LIVENESS_BOUND_MS
                    })
                };
                if self.clients.iter().any(overdue) {
                    let stuck: Vec<String> = self
                        .clients
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| overdue(c))
                        .map(|(i, c)| {
                            format!(
                                "client {i}: {:?}",
                                self.history[c.current.expect("filtered").1].kind
                            )
                        })
                        .collect();
                    let nodes: Vec<String> = self
                        .nodes
                        .iter()
                        .map(|n| {
                            let byz = n
                                .byz
                                .as_ref()
                                .map_or(String::new(), |b| format!(" {}", b.kind));
                            let ready = if n.replica.is_ready() {
                                "ready".to_string()
                            } else {
                                let t: Vec<String> = n
                                    .transfers
                                    .iter()
                                    .map(|(e, t)| format!("transfer {e}: {}", t.describe()))
                                    .collect();
                                format!("NOT ready (up {}; {})", n.up, t.join(", "))
                            };
                            format!(
                                "{} epoch {} {ready}{byz}",
                                n.key.node_id().short(),
                                n.replica.epoch()
                            )
                        })
                        .collect();
                    self.violation(format!(
                        "liveness: {} operations still running {}ms after they started or the faults healed: {}; nodes: {}",
                        stuck.len(),
                        LIVENESS_BOUND_MS,
                        stuck.join("; "),
                        nodes.join(", ")
                    ));
                    break;
                }
            }
        }
        if !holders_checked && self.violations.is_empty() {
            self.violation(
                "the run ended before every transfer finished (nothing left to do)".to_string(),
            );
        }
        self.check();
    }

    fn step(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Deliver { to, from, bytes } => {
                self.digest.update(&now.to_le_bytes());
                self.digest.update(&to.0);
                self.digest.update(&from.0);
                self.digest.update(blake3::hash(&bytes).as_bytes());
                if let Some(&n) = self.node_index.get(&to) {
                    if self.ms.is_some() && ms::is_ms_traffic(&bytes) {
                        self.ms_deliver(n, from, &bytes);
                    } else {
                        self.deliver_to_node(n, from, bytes);
                    }
                } else if let Some(&c) = self.client_index.get(&to) {
                    if self.clients[c].up {
                        self.clients[c].client.handle_message(now, from, &bytes);
                        self.drain_client(c);
                    }
                }
            }
            Ev::ClientTimer { c, at } => {
                if self.clients[c].timer_at == Some(at) {
                    self.clients[c].timer_at = None;
                    if self.clients[c].up {
                        self.clients[c].client.handle_timeout(now);
                        self.drain_client(c);
                    }
                }
            }
            Ev::ClientNext { c } => self.client_next(c),
            Ev::ClientPeerFailed { c, node } => {
                if self.clients[c].up {
                    self.clients[c].client.peer_failed(now, node);
                    self.drain_client(c);
                }
            }
            Ev::TransferPeerFailed { n, node } => {
                if self.nodes[n].up {
                    let epochs: Vec<u64> = self.nodes[n].transfers.keys().copied().collect();
                    for e in epochs {
                        if let Some(t) = self.nodes[n].transfers.get_mut(&e) {
                            t.peer_failed(now, node);
                        }
                        self.drain_transfer(n, e);
                    }
                }
            }
            Ev::ClientCrash { c } => {
                if self.clients[c].up && !self.clients[c].auditor {
                    self.clients[c].up = false;
                    // What it had sent in the last few milliseconds may not have left the machine:
                    // each such message is lost with probability one half.
                    let me = self.clients[c].key.node_id();
                    for (_, idx) in self.recent_sends.remove(&me).unwrap_or_default() {
                        if self.rng.chance(0.5) {
                            self.queue.cancel(idx);
                        }
                    }
                    // The operation in flight is abandoned: it stays without a return in the history.
                    self.clients[c].current = None;
                    self.clients[c].timer_at = None;
                    let at = now + self.rng.range(100, 1000);
                    self.schedule(at, Ev::ClientRestart { c });
                }
            }
            Ev::ClientRestart { c } => {
                if !self.clients[c].up {
                    let key = self.clients[c].key.clone();
                    self.clients[c].client = self.new_client_machine(&key);
                    self.clients[c].up = true;
                    self.clients[c].own_version = None;
                    self.schedule(now + 1, Ev::ClientNext { c });
                }
            }
            Ev::Crash { n } => {
                if self.net.faulty && self.nodes[n].up {
                    self.nodes[n].up = false;
                    self.ms_crash(n);
                    self.nodes[n].transfers.clear();
                    self.nodes[n].gcs.clear();
                    self.nodes[n].gc_done.clear();
                    self.nodes[n].transfer_timer.clear();
                    self.nodes[n].gc_timer.clear();
                    self.nodes[n].sweep_timer = None;
                    let at = now + self.rng.range(100, 2000);
                    self.schedule(at, Ev::Restart { n });
                }
            }
            Ev::Restart { n } => self.restart(n),
            Ev::Partition => {
                if self.net.faulty {
                    let all: Vec<NodeId> = self
                        .node_index
                        .keys()
                        .chain(self.client_index.keys())
                        .copied()
                        .collect();
                    self.net.partition(&mut self.rng, all);
                    let at = now + self.rng.range(100, 1500);
                    self.schedule(at, Ev::HealPartition);
                }
            }
            Ev::HealPartition => self.net.partition = None,
            Ev::EpochChange => self.epoch_change(),
            Ev::Install { n, epoch } => self.install(n, epoch),
            Ev::Transfer { n, epoch, at } => {
                if self.nodes[n].up && self.nodes[n].transfer_timer.get(&epoch) == Some(&at) {
                    self.nodes[n].transfer_timer.remove(&epoch);
                    if let Some(t) = self.nodes[n].transfers.get_mut(&epoch) {
                        t.handle_timeout(now);
                    }
                    self.drain_transfer(n, epoch);
                }
            }
            Ev::Gc { n, epoch, at } => {
                if self.nodes[n].up && self.nodes[n].gc_timer.get(&epoch) == Some(&at) {
                    self.nodes[n].gc_timer.remove(&epoch);
                    if let Some(g) = self.nodes[n].gcs.get_mut(&epoch) {
                        g.handle_timeout(now);
                    }
                    self.drain_gc(n, epoch);
                }
            }
            Ev::Sweep { n, at } => {
                if self.nodes[n].up && self.nodes[n].sweep_timer == Some(at) {
                    self.nodes[n].sweep_timer = None;
                    self.sweep(n);
                }
            }
            Ev::MsTimer { n, at } => self.ms_timer(n, at),
            Ev::MsProbeAnswer {
                n,
                epoch,
                target,
                nonce,
                answer,
            } => self.ms_probe_answer(n, epoch, target, nonce, answer),
            Ev::MsTick => self.ms_tick(),
            Ev::Heal => {
                self.net.heal();
                self.healed_at = Some(now);
                let newest = self.configs.len() as u64 - 1;
                for n in 0..self.nodes.len() {
                    self.restart(n);
                    // In the composed mode nodes learn the newest configuration by their own
                    // pulls and the push tree, as nodes do.
                    if self.ms.is_none() {
                        self.install(n, newest);
                    }
                }
                for c in 0..self.clients.len() {
                    if !self.clients[c].up {
                        self.schedule(now + 1, Ev::ClientRestart { c });
                    }
                }
            }
        }
    }

    // ---- network ----

    /// Puts `bytes` on the network; returns the event index of the (first) delivery, if any.
    fn send(&mut self, from: NodeId, to: NodeId, bytes: Vec<u8>) -> Option<usize> {
        let arrivals = self.net.arrivals(&mut self.rng, self.now, from, to);
        let mut first = None;
        for at in arrivals {
            let bytes = bytes.clone();
            let idx = self.schedule(at, Ev::Deliver { to, from, bytes });
            first.get_or_insert(idx);
        }
        first
    }

    // ---- replicas ----

    fn deliver_to_node(&mut self, n: usize, from: NodeId, bytes: Vec<u8>) {
        if !self.nodes[n].up {
            // A client's driver learns, after its connection timeout, that the request failed.
            if let Some(&c) = self.client_index.get(&from) {
                let at = self.now + self.rng.range(50, 500);
                let node = self.nodes[n].key.node_id();
                self.schedule(at, Ev::ClientPeerFailed { c, node });
            }
            // So does a node's state-transfer request (its driver marks the source down).
            if bytes.get(1) == Some(&TransferMessage::ID) {
                if let Some(&m) = self.node_index.get(&from) {
                    let at = self.now + self.rng.range(50, 500);
                    let node = self.nodes[n].key.node_id();
                    self.schedule(at, Ev::TransferPeerFailed { n: m, node });
                }
            }
            return;
        }
        if self.nodes[n].byz.is_some() {
            return self.byzantine(n, from, bytes);
        }
        if bytes.get(1) == Some(&TransferMessage::ID) {
            return self.transfer_message(n, from, &bytes);
        }
        let (handled, miss) = self.nodes[n].replica.handle_noting_miss(from, &bytes);
        if let Some(x) = miss {
            // A read hit an object not transferred yet: fetch it ahead of its range.
            let e = self.nodes[n].replica.epoch();
            if let Some(t) = self.nodes[n].transfers.get_mut(&e) {
                if t.fetch_now(self.now, x) {
                    self.stats.on_demand += 1;
                }
                self.drain_transfer(n, e);
            }
        }
        self.apply(n, from, handled);
        self.schedule_sweep(n);
    }

    /// Schedules node `n`'s next sweep, if it has one due earlier than the one scheduled.
    fn schedule_sweep(&mut self, n: usize) {
        let Some(at) = self.nodes[n].replica.next_sweep(self.now) else {
            return;
        };
        let at = at.max(self.now + 1);
        if self.nodes[n].sweep_timer.is_none_or(|cur| at < cur) {
            self.nodes[n].sweep_timer = Some(at);
            self.schedule(at, Ev::Sweep { n, at });
        }
    }

    /// Node `n` deletes released blocks whose grace is over. At a correct node, each deletion
    /// must come at least the grace after some release of the block was sent (a replica learns
    /// a release after it is sent, and waits the grace from then).
    fn sweep(&mut self, n: usize) {
        let deleted = self.nodes[n]
            .replica
            .sweep(self.now, usize::MAX)
            .unwrap_or_default();
        if self.nodes[n].byz.is_none() {
            for id in deleted {
                self.stats.released_deleted += 1;
                let first_release = self
                    .history
                    .iter()
                    .filter_map(|h| match h.kind {
                        HKind::Release { id: x, .. } if x == id => Some(h.call),
                        _ => None,
                    })
                    .min();
                if first_release.is_none_or(|t| self.now < t + GRACE_MS) {
                    let me = self.nodes[n].key.node_id().short();
                    self.violation(format!(
                        "node {me} deleted released block {id:?} at t={}ms, within the grace of {GRACE_MS}ms of its first release (sent at {first_release:?})",
                        self.now
                    ));
                }
            }
        }
        self.schedule_sweep(n);
    }

    /// A state-transfer message at node `n`: a request is served by its replica, a reply goes to
    /// its transfers and garbage collections in progress (each ignores request ids it did not issue).
    fn transfer_message(&mut self, n: usize, from: NodeId, bytes: &[u8]) {
        let me = self.nodes[n].key.node_id();
        if let Some(reply) = self.nodes[n].replica.handle_transfer(from, bytes) {
            self.send(me, from, reply);
            return;
        }
        if matches!(
            decode::<TransferMessage>(bytes).map(|e| e.msg),
            Ok(TransferMessage::Gone { .. })
        ) {
            self.stats.gone += 1;
        }
        let epochs: Vec<u64> = self.nodes[n].transfers.keys().copied().collect();
        for e in epochs {
            if let Some(t) = self.nodes[n].transfers.get_mut(&e) {
                t.handle_message(self.now, from, bytes);
            }
            self.drain_transfer(n, e);
        }
        let epochs: Vec<u64> = self.nodes[n].gcs.keys().copied().collect();
        for e in epochs {
            if let Some(g) = self.nodes[n].gcs.get_mut(&e) {
                g.handle_message(self.now, from, bytes);
            }
            self.drain_gc(n, e);
        }
    }

    /// A node comes back: up, and its unfinished transfers start again (their progress is what
    /// they already stored).
    fn restart(&mut self, n: usize) {
        if self.nodes[n].up {
            return;
        }
        self.nodes[n].up = true;
        let _ = self.nodes[n].replica.restart_sweep();
        self.schedule_sweep(n);
        let current = self.nodes[n].replica.epoch();
        for e in 1..=current {
            if !self.nodes[n].replica.ready_at(e) {
                self.start_transfer(n, e);
            }
            if self.nodes[n].replica.ready_at(e) || e < current {
                self.start_gc(n, e);
            }
        }
        self.ms_enter(n);
    }

    /// Starts the transfer of node `n` into epoch `e`.
    fn start_transfer(&mut self, n: usize, e: u64) {
        let me = self.nodes[n].key.node_id();
        let prev = &self.configs[e as usize - 1].config;
        let next = &self.configs[e as usize].config;
        let was_ready = self.nodes[n].replica.ready_at(e - 1);
        let opts = TransferOptions {
            retransmit_ms: 200,
            first_request_id: self.rng.next_u64(),
            mutant: self.opts.mutant,
        };
        let mut t = Transfer::new(prev, next, &me, was_ready, opts);
        t.start(self.now);
        self.nodes[n].transfers.insert(e, t);
        self.drain_transfer(n, e);
    }

    /// Carries out what transfer `e` of node `n` asks: sends, stores, completion, its timer.
    fn drain_transfer(&mut self, n: usize, e: u64) {
        let me = self.nodes[n].key.node_id();
        let mut timer = None;
        while let Some(out) = self.nodes[n]
            .transfers
            .get_mut(&e)
            .and_then(|t| t.poll_output())
        {
            match out {
                TransferOutput::Send { to, bytes, .. } => {
                    if matches!(
                        decode::<TransferMessage>(&bytes).map(|e| e.msg),
                        Ok(TransferMessage::ListReady { .. } | TransferMessage::FetchReady { .. })
                    ) {
                        self.stats.peer_requests += 1;
                    }
                    self.send(me, to, bytes);
                }
                TransferOutput::Check { ids, released } => {
                    // As in the node's driver: held, or skipped (`Replica::transfer_skips`).
                    let (store, replica) = (&self.nodes[n].store, &self.nodes[n].replica);
                    let held: Vec<ObjectId> = ids
                        .into_iter()
                        .filter(|id| {
                            store.get_content(id).ok().flatten().is_some()
                                || replica
                                    .transfer_skips(id, released.contains(id))
                                    .unwrap_or(false)
                        })
                        .collect();
                    if let Some(t) = self.nodes[n].transfers.get_mut(&e) {
                        t.held(&held);
                    }
                }
                // What a late transfer brings of a range collected since is not stored again; a
                // hollow node stores nothing.
                TransferOutput::StoreContent { id, data } => {
                    if self.nodes[n].replica.accepts_transferred(e, &id) && !self.hollow(n) {
                        // A full store defers the block, as the node's driver does.
                        if let Err(StoreError::NoSpace) =
                            self.nodes[n].store.put_content(&id, &data)
                        {
                            self.nodes[n].replica.defer(id);
                            self.stats.deferred += 1;
                        }
                    }
                }
                TransferOutput::StorePk { block } => {
                    if self.nodes[n].replica.accepts_transferred(e, &block.id()) && !self.hollow(n)
                    {
                        let _ = self.nodes[n].store.put_pk_if_newer(&block);
                    }
                }
                TransferOutput::StoreRefs { refs } => {
                    if !self.hollow(n) {
                        let replica = &self.nodes[n].replica;
                        let wanted: Vec<_> = refs
                            .into_iter()
                            .filter(|(id, _)| replica.accepts_transferred(e, id))
                            .collect();
                        let _ = replica.merge_transferred_refs(&wanted);
                        self.schedule_sweep(n);
                    }
                }
                TransferOutput::UnitDone { epoch, arc } => {
                    if arc == RingArc::single(&ObjectId(arc.end)) {
                        self.stats.on_demand_done += 1;
                    }
                    self.nodes[n].replica.arc_ready(epoch, arc)
                }
                TransferOutput::Complete { epoch } => {
                    self.nodes[n].replica.transfer_complete(epoch);
                    // Then collect what the node lost on entering this epoch.
                    self.start_gc(n, epoch);
                }
            }
        }
        if let Some(t) = self.nodes[n].transfers.get(&e) {
            if t.is_complete() {
                self.nodes[n].transfers.remove(&e);
            } else {
                timer = t.next_timeout();
            }
        }
        if let Some(at) = timer {
            let at = at.max(self.now + 1);
            let pending = self.nodes[n].transfer_timer.get(&e);
            if pending.is_none_or(|&p| at < p) {
                self.nodes[n].transfer_timer.insert(e, at);
                self.schedule(at, Ev::Transfer { n, epoch: e, at });
            }
        }
    }

    /// When correct node `n` deletes `arc`, lost on entering `epoch`: at least `f+1` correct members
    /// of the arc's group in `epoch` hold it (completed their transfer of it into `epoch` or later),
    /// so every write completed before `epoch` survives on a correct node that serves it (docs/DESIGN.md §4:
    /// old replicas delete only after `2f+1` new ones, up to `f` of them liars, confirm).
    fn check_deletion(&mut self, n: usize, epoch: u64, arc: RingArc) {
        // Every point of the arc must be held by `f+1` correct members of its group in `epoch` or
        // in one later epoch (those hold every write completed before it). The group is constant
        // between member ids, so checking each piece's end decides for the piece.
        let newest = self.configs.len() as u64 - 1;
        let mut points: Vec<[u8; 32]> = (epoch..=newest)
            .flat_map(|e| {
                self.configs[e as usize]
                    .config
                    .members
                    .iter()
                    .map(|m| m.id.0)
            })
            .filter(|p| arc.contains(&ObjectId(*p)) && *p != arc.end)
            .collect();
        points.push(arc.end);
        points.sort_by_key(|p| arc.order_key(&ObjectId(*p)));
        points.dedup();
        let mut start = arc.start;
        let mut short = None;
        for end in points {
            let piece = RingArc { start, end };
            start = end;
            let held_in = |e: u64| {
                let config = &self.configs[e as usize].config;
                let held = config
                    .group(&ObjectId(piece.end))
                    .iter()
                    .map(|m| &self.nodes[self.node_index[&m.id]])
                    .filter(|m| m.byz.is_none() && m.replica.holds_range(e, &piece))
                    .count();
                (held, config.quorum().one_correct())
            };
            if !(epoch..=newest).any(|e| {
                let (held, need) = held_in(e);
                held >= need
            }) {
                short = Some(held_in(epoch));
                break;
            }
        }
        if let Some((held, need)) = short {
            let me = self.nodes[n].key.node_id().short();
            self.violation(format!(
                "node {me} deleted a range lost on entering epoch {epoch} while {held} correct members of its new group (and too few of any later one) held it, {need} needed"
            ));
        }
    }

    /// Whether node `n` is Byzantine and holds nothing (acknowledges writes and transfers without
    /// storing them).
    fn hollow(&self, n: usize) -> bool {
        self.nodes[n]
            .byz
            .as_ref()
            .is_some_and(|b| b.kind == Adversary::AckWithoutStore)
    }

    /// Starts the garbage collection of what node `n` lost on entering epoch `e`, unless it runs
    /// or finished; arcs the replica collected already are skipped.
    fn start_gc(&mut self, n: usize, e: u64) {
        let node = &self.nodes[n];
        if e == 0 || node.gcs.contains_key(&e) || node.gc_done.contains(&e) {
            return;
        }
        let me = node.key.node_id();
        let prev = &self.configs[e as usize - 1].config;
        let next = &self.configs[e as usize].config;
        let opts = GcOptions {
            retransmit_ms: 300,
            first_request_id: self.rng.next_u64(),
            mutant: self.opts.mutant,
        };
        let mut gc = Gc::new(prev, next, &me, node.replica.collected_in(e), opts);
        gc.start(self.now);
        for later in e + 1..=node.replica.epoch() {
            gc.learn(&self.configs[later as usize].config);
        }
        self.nodes[n].gcs.insert(e, gc);
        self.drain_gc(n, e);
    }

    /// Carries out what collection `e` of node `n` asks: sends, deletions, its timer.
    fn drain_gc(&mut self, n: usize, e: u64) {
        let me = self.nodes[n].key.node_id();
        while let Some(out) = self.nodes[n].gcs.get_mut(&e).and_then(|g| g.poll_output()) {
            match out {
                GcOutput::Send { to, bytes } => {
                    self.send(me, to, bytes);
                }
                GcOutput::Delete { epoch, arc } => {
                    if self.nodes[n].byz.is_none() {
                        self.check_deletion(n, epoch, arc);
                    }
                    let deleted = self.nodes[n].replica.delete_lost(epoch, arc);
                    if self.nodes[n].byz.is_none() {
                        self.stats.deleted += deleted.map_or(0, |d| d.len() as u64);
                    }
                }
                GcOutput::Complete { epoch } => {
                    self.nodes[n].gc_done.insert(epoch);
                }
            }
        }
        let mut timer = None;
        if let Some(g) = self.nodes[n].gcs.get(&e) {
            if g.is_complete() {
                self.nodes[n].gcs.remove(&e);
            } else {
                timer = g.next_timeout();
            }
        }
        if let Some(at) = timer {
            let at = at.max(self.now + 1);
            let pending = self.nodes[n].gc_timer.get(&e);
            if pending.is_none_or(|&p| at < p) {
                self.nodes[n].gc_timer.insert(e, at);
                self.schedule(at, Ev::Gc { n, epoch: e, at });
            }
        }
    }

    fn apply(&mut self, n: usize, from: NodeId, handled: Handled) {
        match handled {
            Handled::Reply(reply) => {
                let me = self.nodes[n].key.node_id();
                self.send(me, from, reply);
            }
            Handled::Install(configs) => {
                let before = self.nodes[n].replica.epoch();
                let _ = self.nodes[n].replica.install(configs);
                let after = self.nodes[n].replica.epoch();
                if after > before {
                    // Composed mode: a committee member of the new epoch takes its role up.
                    self.ms_enter(n);
                }
                for e in before + 1..=after {
                    self.start_transfer(n, e);
                }
                // A node that moved past an epoch collects what it lost on entering it even if its
                // transfer into that epoch is still running.
                if after > before {
                    let running: Vec<u64> = self.nodes[n].gcs.keys().copied().collect();
                    for e in running {
                        for later in before + 1..=after {
                            let config = &self.configs[later as usize].config;
                            if let Some(g) = self.nodes[n].gcs.get_mut(&e) {
                                g.learn(config);
                            }
                        }
                        self.drain_gc(n, e);
                    }
                    for e in 1..after {
                        self.start_gc(n, e);
                    }
                }
            }
            Handled::Dropped(_) => {}
        }
    }

    fn install(&mut self, n: usize, epoch: u64) {
        if !self.nodes[n].up {
            return; // it learns at the heal, or from a client that pushes
        }
        let have = self.nodes[n].replica.epoch();
        if have >= epoch {
            return;
        }
        let configs = self.configs[(have + 1) as usize..=(epoch as usize)].to_vec();
        self.apply(n, NodeId([0; 32]), Handled::Install(configs));
    }

    fn epoch_change(&mut self) {
        if self.net.faulty {
            self.reconfigure(3000);
        }
    }

    /// The test, acting as the MS, moves the cluster to a new configuration of random members of
    /// the pool; nodes learn it within `spread_ms` (or from clients and peers that push it).
    fn reconfigure(&mut self, spread_ms: u64) {
        let last = self.configs.last().expect("never empty").config.clone();
        let f = self.opts.f as usize;
        let k = 3 * f + 1 + self.rng.below(self.nodes.len() - 3 * f);
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        self.rng.shuffle(&mut order);
        order.truncate(k);
        order.sort();
        if self.ms.is_some() {
            return self.ms_reconfigure(order);
        }
        let keys: Vec<Keypair> = order.iter().map(|&i| self.nodes[i].key.clone()).collect();
        let next = make_config(last.epoch + 1, &last.params, keys.iter(), Some(last.hash()));
        // The committee of the last epoch certifies the next one (the test plays the MS).
        let signers: Vec<&Keypair> = last
            .committee
            .iter()
            .take(last.params.ms_quorum().quorum())
            .map(|id| &self.nodes[self.node_index[id]].key)
            .collect();
        let certified = CertifiedConfig::certify(next, &signers);
        self.configs.push(certified);
        let epoch = last.epoch + 1;
        for n in 0..self.nodes.len() {
            let at = self.now + self.rng.range(0, spread_ms);
            self.schedule(at, Ev::Install { n, epoch });
        }
    }

    // ---- Byzantine nodes ----

    fn byzantine(&mut self, n: usize, from: NodeId, bytes: Vec<u8>) {
        let me = self.nodes[n].key.node_id();
        let kind = self.nodes[n].byz.as_ref().expect("caller checked").kind;
        if self
            .node_index
            .get(&from)
            .is_some_and(|&m| self.nodes[m].byz.is_some())
        {
            // Byzantine nodes do not feed each other, or themselves: that would only amplify traffic.
            return;
        }
        match kind {
            Adversary::Silent => return,
            Adversary::Garbage => {
                let len = self.rng.below(80);
                let junk = self.rng.bytes(len);
                self.send(me, from, junk);
                if self.rng.chance(0.3) {
                    let target = self.random_address(me);
                    let len = self.rng.below(80);
                    let junk = self.rng.bytes(len);
                    self.send(me, target, junk);
                }
                return;
            }
            Adversary::Replay => {
                let byz = self.nodes[n].byz.as_mut().expect("caller checked");
                if byz.recorded.len() < 500 {
                    byz.recorded.push(bytes.clone());
                }
                if self.rng.chance(0.2) {
                    let len = self.nodes[n].byz.as_ref().expect("checked").recorded.len();
                    let old = self.nodes[n].byz.as_ref().expect("checked").recorded
                        [self.rng.below(len)]
                    .clone();
                    let target = self.random_address(me);
                    self.send(me, target, old);
                }
            }
            _ => {}
        }
        if bytes.get(1) == Some(&TransferMessage::ID) {
            return self.byzantine_transfer(n, from, kind, &bytes);
        }
        let epoch = self.nodes[n].replica.epoch();
        let Ok(env) = decode::<DbqsMessage>(&bytes) else {
            return;
        };
        if let DbqsMessage::PutPk { block, .. } = &env.msg {
            if block.verify().is_ok() {
                let seen = &mut self.nodes[n].byz.as_mut().expect("checked").seen;
                seen.entry(block.id()).or_default().push(block.clone());
            }
        }
        // Lies are told in the requester's epoch; requests of other epochs get honest epoch answers.
        let lying = match kind {
            Adversary::Equivocate => from.0[0] % 2 == 1,
            Adversary::Stale | Adversary::AckWithoutStore => true,
            _ => false,
        };
        if env.epoch == epoch {
            let lie = match (&env.msg, kind) {
                (DbqsMessage::PutContent { rid, id, .. }, _)
                    if lying && kind != Adversary::Stale =>
                {
                    Some(DbqsMessage::ContentStored { rid: *rid, id: *id })
                }
                (DbqsMessage::Reference { rid, record }, _)
                    if lying && kind != Adversary::Stale =>
                {
                    Some(DbqsMessage::RefStored {
                        rid: *rid,
                        id: record.id,
                    })
                }
                (DbqsMessage::PutPk { rid, block }, _) if lying && kind != Adversary::Stale => {
                    Some(DbqsMessage::PkStored {
                        rid: *rid,
                        id: block.id(),
                        stamp: block.stamp(),
                    })
                }
                (DbqsMessage::GetPk { rid, id }, Adversary::Stale | Adversary::Equivocate)
                    if lying =>
                {
                    let oldest = self.nodes[n]
                        .byz
                        .as_ref()
                        .expect("checked")
                        .seen
                        .get(id)
                        .and_then(|v| v.iter().min_by_key(|b| b.stamp()).cloned());
                    Some(DbqsMessage::Pk {
                        rid: *rid,
                        id: *id,
                        block: oldest,
                    })
                }
                (DbqsMessage::GetContent { rid, id }, Adversary::Stale | Adversary::Equivocate)
                    if lying =>
                {
                    Some(DbqsMessage::Content {
                        rid: *rid,
                        id: *id,
                        data: None,
                    })
                }
                (DbqsMessage::GetContent { rid, id }, Adversary::Corrupt) => {
                    let mut data = self.nodes[n]
                        .store
                        .get_content(id)
                        .ok()
                        .flatten()
                        .unwrap_or_else(|| vec![0; 16]);
                    data.push(1);
                    Some(DbqsMessage::Content {
                        rid: *rid,
                        id: *id,
                        data: Some(data),
                    })
                }
                (DbqsMessage::GetPk { rid, id }, Adversary::Corrupt) => {
                    let block = self.nodes[n].store.get_pk(id).ok().flatten().map(|mut b| {
                        b.value.push(1);
                        b
                    });
                    Some(DbqsMessage::Pk {
                        rid: *rid,
                        id: *id,
                        block,
                    })
                }
                (DbqsMessage::GetPk { rid, id }, Adversary::Forge) => {
                    let real = self.nodes[n].store.get_pk(id).ok().flatten();
                    Some(DbqsMessage::Pk {
                        rid: *rid,
                        id: *id,
                        block: real.map(|b| self.forge(&b)),
                    })
                }
                _ => None,
            };
            if let Some(msg) = lie {
                self.send(me, from, encode_msg(epoch, msg));
                return;
            }
        }
        if kind == Adversary::Forge {
            if let DbqsMessage::PutPk { block, .. } = &env.msg {
                // Push a forged, higher version to the rest of the group, as if it were a client.
                let forged = self.forge(block);
                let config = self.nodes[n].replica.chain().config().clone();
                for m in config.group(&block.id()) {
                    if m.id != me {
                        let rid = self.rng.next_u64();
                        self.send(
                            me,
                            m.id,
                            encode_msg(
                                epoch,
                                DbqsMessage::PutPk {
                                    rid,
                                    block: forged.clone(),
                                },
                            ),
                        );
                    }
                }
                // And a forged configuration, signed only by itself.
                let mut fake = config.clone();
                fake.epoch += 1;
                fake.prev = Some(config.hash());
                let fake = CertifiedConfig::certify(fake, &[&self.nodes[n].key]);
                let target = self.random_address(me);
                self.send(
                    me,
                    target,
                    encode_msg(
                        epoch,
                        DbqsMessage::PushConfigs {
                            configs: vec![fake],
                        },
                    ),
                );
            }
        }
        let handled = self.nodes[n].replica.handle(from, &bytes);
        self.apply(n, from, handled);
    }

    /// A Byzantine node during state transfer: its own transfers run honestly (it wants the data);
    /// what it serves to others lies according to its kind.
    fn byzantine_transfer(&mut self, n: usize, from: NodeId, kind: Adversary, bytes: &[u8]) {
        let me = self.nodes[n].key.node_id();
        if kind == Adversary::AckWithoutStore
            && matches!(
                decode::<TransferMessage>(bytes).map(|e| e.msg),
                Ok(TransferMessage::ListReady { .. } | TransferMessage::FetchReady { .. })
            )
        {
            // Hollow: it claims to hold every range ("have" below) but serves none to its peers.
            return;
        }
        let Some(reply) = self.nodes[n].replica.handle_transfer(from, bytes) else {
            return self.transfer_message(n, from, bytes);
        };
        let lying = match kind {
            Adversary::Equivocate => from.0[0] % 2 == 1,
            Adversary::Stale | Adversary::Corrupt | Adversary::Forge => true,
            _ => false,
        };
        let epoch = self.nodes[n].replica.epoch();
        // Garbage collection: every liar, and the node that acknowledges without storing, claims
        // to hold whatever it is asked about, so that old replicas delete early.
        if let Ok(TransferMessage::Have { rid, .. }) =
            decode::<TransferMessage>(&reply).map(|e| e.msg)
        {
            if lying || kind == Adversary::AckWithoutStore {
                let lie = TransferMessage::Have { rid, have: true };
                self.send(me, from, encode_msg(epoch, lie));
                return;
            }
        }
        let reply = match decode::<TransferMessage>(&reply) {
            Ok(env) if lying => {
                let msg = match (env.msg, kind) {
                    // Stale: only the oldest versions it ever saw, and no content at all.
                    (
                        TransferMessage::Listing { rid, .. },
                        Adversary::Stale | Adversary::Equivocate,
                    ) => {
                        let seen = &self.nodes[n].byz.as_ref().expect("byzantine").seen;
                        let pk = seen
                            .values()
                            .filter_map(|v| v.iter().min_by_key(|b| b.stamp()).cloned())
                            .collect();
                        // ... and it withholds every reference record.
                        TransferMessage::Listing {
                            rid,
                            content: Vec::new(),
                            pk,
                            next: None,
                            refs: Vec::new(),
                        }
                    }
                    (
                        TransferMessage::Content { rid, id, .. },
                        Adversary::Stale | Adversary::Equivocate,
                    ) => TransferMessage::Content {
                        rid,
                        id,
                        data: None,
                    },
                    // Corrupt: altered values and bytes.
                    (
                        TransferMessage::Listing {
                            rid,
                            content,
                            mut pk,
                            next,
                            mut refs,
                        },
                        Adversary::Corrupt,
                    ) => {
                        for b in &mut pk {
                            b.value.push(1);
                        }
                        // Holds turned into releases, under the owners' (now wrong) signatures.
                        for r in &mut refs {
                            r.hold = false;
                        }
                        TransferMessage::Listing {
                            rid,
                            content,
                            pk,
                            next,
                            refs,
                        }
                    }
                    (TransferMessage::Content { rid, id, data }, Adversary::Corrupt) => {
                        let mut data = data.unwrap_or_default();
                        data.push(1);
                        TransferMessage::Content {
                            rid,
                            id,
                            data: Some(data),
                        }
                    }
                    // Forge: forged higher versions, and an id that does not exist.
                    (
                        TransferMessage::Listing {
                            rid,
                            mut content,
                            mut pk,
                            next,
                            mut refs,
                        },
                        Adversary::Forge,
                    ) => {
                        let forged: Vec<PkBlock> = pk.iter().map(|b| self.forge(b)).collect();
                        pk.extend(forged);
                        content.push(ObjectId(self.rng.seed32()));
                        // Later releases in the owners' names, with signatures it cannot make.
                        let forged: Vec<RefRecord> = refs
                            .iter()
                            .map(|r| {
                                let mut f = r.clone();
                                f.seq = f.seq.saturating_add(1000);
                                f.hold = false;
                                f
                            })
                            .collect();
                        refs.extend(forged);
                        TransferMessage::Listing {
                            rid,
                            content,
                            pk,
                            next,
                            refs,
                        }
                    }
                    (msg, _) => msg,
                };
                encode_msg(epoch, msg)
            }
            _ => reply,
        };
        self.send(me, from, reply);
    }

    fn forge(&mut self, real: &PkBlock) -> PkBlock {
        let mut b = real.clone();
        b.version = b.version.saturating_add(1000);
        b.value = self.rng.bytes(24);
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&self.rng.bytes(64));
        b.signature = Signature(sig);
        b
    }

    /// A random node or client other than `me`.
    fn random_address(&mut self, me: NodeId) -> NodeId {
        let all: Vec<NodeId> = self
            .node_index
            .keys()
            .chain(self.client_index.keys())
            .copied()
            .filter(|a| *a != me)
            .collect();
        *self.rng.pick(&all)
    }

    // ---- clients ----

    fn client_next(&mut self, c: usize) {
        let slot = &self.clients[c];
        if !slot.up || slot.current.is_some() || slot.ops_left == 0 {
            return;
        }
        let now = self.now;
        if slot.thief {
            return self.thief_next(c);
        }
        if self.swarm.releases && !slot.auditor && !slot.held.is_empty() && self.del_rng.chance(0.2)
        {
            return self.release_next(c);
        }
        let roll = self.rng.below(100);
        let (op, kind) = if slot.auditor {
            self.audit_queue
                .pop()
                .expect("ops_left counts the audit queue")
        } else if roll < 30 {
            let key = self.rng.below(self.keys.len());
            // Only the sole writer of a block writes it; the shared blocks are written by everyone.
            let key = match self.keys[key].owner {
                Some(o) if o != c => self
                    .keys
                    .iter()
                    .position(|k| k.owner == Some(c))
                    .expect("every client owns a key"),
                _ => key,
            };
            let tag = self.next_tag;
            self.next_tag += 1;
            let mut value = tag.to_le_bytes().to_vec();
            let pad = self.rng.below(200);
            value.extend(self.rng.bytes(pad));
            let (owner, version) = match self.keys[key].owner {
                None => (self.shared_owner.clone(), None),
                Some(_) => {
                    let slot = &self.clients[c];
                    let skip = slot.own_version.is_some() && self.rng.chance(0.5);
                    (
                        slot.own.clone(),
                        if skip {
                            slot.own_version.map(|v| v + 1)
                        } else {
                            None
                        },
                    )
                }
            };
            let label = self.keys[key].label.clone();
            (
                Operation::PutPk {
                    owner: Box::new(owner),
                    label,
                    value,
                    version,
                },
                HKind::PkWrite { key, tag },
            )
        } else if roll < 60 {
            let key = self.rng.below(self.keys.len());
            (
                Operation::GetPk {
                    id: self.keys[key].id,
                },
                HKind::PkRead {
                    key,
                    tag: None,
                    stamp: None,
                },
            )
        } else if roll < 80 || self.contents.is_empty() {
            // With releases, blocks are shared by several owners more often.
            let reuse = if self.swarm.releases {
                self.del_rng.chance(0.3)
            } else {
                self.rng.chance(0.1)
            };
            let data = if !self.contents.is_empty() && reuse {
                self.contents[self.rng.below(self.contents.len())].clone()
            } else {
                let len = *self.rng.pick(&[0usize, 1, 100, 4096, 20_000]);
                self.rng.bytes(len)
            };
            let id = content_id(&data);
            self.contents.push(data.clone());
            let slot = &mut self.clients[c];
            let seq = slot.ref_seq;
            slot.ref_seq += 1;
            if !slot.held.contains(&id) {
                slot.held.push(id);
            }
            let hold = RefRecord::hold(&slot.own, id, seq);
            (
                Operation::PutContent { data, hold },
                HKind::PutContent { id, seq },
            )
        } else {
            let released = self.recently_released();
            let id = if let Some(id) = released {
                id
            } else if self.rng.chance(0.1) {
                ObjectId(self.rng.seed32())
            } else {
                content_id(&self.contents[self.rng.below(self.contents.len())])
            };
            (
                Operation::GetContent { id },
                HKind::GetContent { id, found: None },
            )
        };
        let _ = now;
        self.submit(c, op, kind);
    }

    /// Starts operation `op` of client `c`, recorded in the history as `kind`.
    fn submit(&mut self, c: usize, op: Operation, kind: HKind) {
        let h = self.history.len();
        self.history.push(HOp {
            client: c,
            call: self.now,
            ret: None,
            kind,
        });
        let op_id = self.clients[c].client.submit(self.now, op);
        self.clients[c].current = Some((op_id, h));
        self.clients[c].ops_left -= 1;
        self.drain_client(c);
    }

    /// With releases, half the content reads go to a block released lately (so that reads meet
    /// the grace and the deletion).
    fn recently_released(&mut self) -> Option<ObjectId> {
        if !self.swarm.releases || !self.del_rng.chance(0.5) {
            return None;
        }
        let recent: Vec<ObjectId> = self
            .history
            .iter()
            .rev()
            .filter_map(|h| match h.kind {
                HKind::Release { id, .. } => Some(id),
                _ => None,
            })
            .take(4)
            .collect();
        (!recent.is_empty()).then(|| recent[self.del_rng.below(recent.len())])
    }

    /// Client `c` releases one of the blocks it holds.
    fn release_next(&mut self, c: usize) {
        let slot = &mut self.clients[c];
        let i = self.del_rng.below(slot.held.len());
        let id = slot.held.swap_remove(i);
        let seq = slot.ref_seq;
        slot.ref_seq += 1;
        let record = RefRecord::release(&slot.own, id, seq);
        self.release_records.push(record.clone());
        self.submit(
            c,
            Operation::Reference { record },
            HKind::Release { id, seq },
        );
    }

    /// The Byzantine client's next attempt to release others' blocks: a release in another
    /// owner's name with a bad signature, or a replay of a genuine release sent earlier.
    fn thief_next(&mut self, c: usize) {
        let owners: Vec<usize> = (0..self.clients.len())
            .filter(|&o| o != c && !self.clients[o].auditor && !self.clients[o].thief)
            .collect();
        if self.contents.is_empty() || owners.is_empty() {
            let others_done = owners.iter().all(|&o| self.clients[o].ops_left == 0);
            if others_done {
                self.clients[c].ops_left = 0; // nothing was ever put: nothing to steal
            } else {
                let at = self.now + self.del_rng.range(50, 300);
                self.schedule(at, Ev::ClientNext { c });
            }
            return;
        }
        let record = if !self.release_records.is_empty() && self.del_rng.chance(0.4) {
            self.release_records[self.del_rng.below(self.release_records.len())].clone()
        } else {
            let id = content_id(&self.contents[self.del_rng.below(self.contents.len())]);
            let victim = &self.clients[owners[self.del_rng.below(owners.len())]].own;
            let mut forged = RefRecord::release(&self.clients[c].own, id, u64::MAX / 2);
            forged.owner = victim.public();
            forged
        };
        self.stats.forged_releases += 1;
        self.submit(c, Operation::Reference { record }, HKind::Forged);
    }

    fn drain_client(&mut self, c: usize) {
        let me = self.clients[c].key.node_id();
        while let Some(out) = self.clients[c].client.poll_output() {
            match out {
                ClientOutput::Send { to, bytes } => {
                    // Sometimes crash a writer right after a write leaves, so that it can reach
                    // only some replicas: the schedule that write-back exists for.
                    let is_write = matches!(
                        decode::<DbqsMessage>(&bytes).map(|e| e.msg),
                        Ok(DbqsMessage::PutPk { .. })
                    );
                    let first = self.send(me, to, bytes.to_vec());
                    if self.swarm.client_crashes && self.net.faulty && !self.clients[c].auditor {
                        let now = self.now;
                        let recent = self.recent_sends.entry(me).or_default();
                        recent.retain(|&(t, _)| t + 3 >= now);
                        recent.extend(first.map(|i| (now, i)));
                        if is_write && self.rng.chance(0.03) {
                            let at = self.now + self.rng.range(0, 2);
                            self.schedule(at, Ev::ClientCrash { c });
                        }
                    }
                }
                ClientOutput::Done { op, outcome } => self.finish(c, op, outcome),
                ClientOutput::Misbehaviour { from, what } => {
                    if self
                        .node_index
                        .get(&from)
                        .is_none_or(|&n| self.nodes[n].byz.is_none())
                    {
                        let msg = format!("client {c} saw a correct node misbehave: {what}");
                        self.violation(msg);
                    }
                }
                // The simulated clients run without a freshness lease (core/tests cover leases).
                ClientOutput::EpochChanged { .. } | ClientOutput::NeedFreshness { .. } => {}
            }
        }
        if !self.clients[c].up {
            return;
        }
        if let Some(t) = self.clients[c].client.next_timeout() {
            let t = t.max(self.now + 1);
            if self.clients[c].timer_at.is_none_or(|cur| t < cur) {
                self.clients[c].timer_at = Some(t);
                self.schedule(t, Ev::ClientTimer { c, at: t });
            }
        }
    }

    fn finish(&mut self, c: usize, op: OpId, outcome: Outcome) {
        let Some((cur, h)) = self.clients[c].current else {
            return;
        };
        if cur != op {
            return;
        }
        self.clients[c].current = None;
        self.history[h].ret = Some(self.now);
        if !self.clients[c].auditor {
            self.completed += 1;
        }
        let mut kind = self.history[h].kind.clone();
        let problem = match (&mut kind, outcome) {
            (HKind::PkWrite { key, .. }, Outcome::PkStored { stamp }) => {
                if self.keys[*key].owner == Some(c) {
                    self.clients[c].own_version = Some(stamp.version);
                }
                None
            }
            (HKind::PkRead { key, tag, stamp }, Outcome::Pk { block }) => {
                *stamp = block.as_ref().map(|b| b.stamp());
                let invalid = block
                    .as_ref()
                    .is_some_and(|b| b.id() != self.keys[*key].id || b.verify().is_err());
                *tag = Some(block.map_or(0, |b| value_tag(&b.value)));
                invalid.then(|| format!("read of key {key} returned an invalid block"))
            }
            (HKind::PutContent { id, .. }, Outcome::ContentStored { id: got }) => {
                (*id != got).then(|| format!("content write of {id:?} acknowledged as {got:?}"))
            }
            (HKind::Release { id, .. }, Outcome::RefStored { id: got }) => {
                self.stats.releases += 1;
                (*id != got).then(|| format!("release of {id:?} acknowledged as {got:?}"))
            }
            // A forged release is refused (or, replayed, changes nothing); either is fine here:
            // the checks are on what the owners read.
            (HKind::Forged, _) => None,
            (HKind::GetContent { id, found }, Outcome::Content { id: got, data }) => {
                *found = Some(data.is_some());
                let wrong = data.is_some_and(|d| content_id(&d) != *id) || got != *id;
                wrong.then(|| format!("content read of {id:?} returned bytes of another block"))
            }
            (kind, outcome) => Some(format!(
                "client {c}: operation {kind:?} ended with {outcome:?}"
            )),
        };
        self.history[h].kind = kind;
        if let Some(p) = problem {
            self.violation(p);
        }
        let at = self.now + self.rng.range(0, 40);
        self.schedule(at, Ev::ClientNext { c });
    }

    fn start_audit(&mut self) {
        // A fresh client reads every key and every content block whose write completed, one at a time.
        let mut reads: Vec<(Operation, HKind)> = self
            .keys
            .iter()
            .enumerate()
            .map(|(key, k)| {
                (
                    Operation::GetPk { id: k.id },
                    HKind::PkRead {
                        key,
                        tag: None,
                        stamp: None,
                    },
                )
            })
            .collect();
        let written: BTreeSet<ObjectId> = self
            .history
            .iter()
            .filter_map(|h| match h.kind {
                HKind::PutContent { id, .. } if h.ret.is_some() => Some(id),
                _ => None,
            })
            .collect();
        reads.extend(written.into_iter().map(|id| {
            (
                Operation::GetContent { id },
                HKind::GetContent { id, found: None },
            )
        }));
        let count = reads.len() as u32;
        self.audit_queue = reads;
        let own = Keypair::from_seed(self.rng.seed32());
        let c = self.add_client(own, count, true);
        self.schedule(self.now + 1, Ev::ClientNext { c });
    }

    /// After every transfer and garbage collection finished: each object whose write completed (and
    /// each public-key block's value as the audit read it) is held by at least `2f+1` correct members
    /// of its group in the final configuration, and no correct node holds anything it is not
    /// responsible for in that configuration (what it lost was deleted).
    fn check_holders(&mut self) {
        let config = self.configs.last().expect("never empty").config.clone();
        let need = config.quorum().quorum();
        let correct_holders = |sim: &Sim, x: &ObjectId, holds: &dyn Fn(&Node) -> bool| {
            config
                .group(x)
                .iter()
                .map(|m| &sim.nodes[sim.node_index[&m.id]])
                .filter(|n| n.byz.is_none() && holds(n))
                .count()
        };
        let mut problems = Vec::new();
        let (referenced, released) = self.content_fates();
        for &id in &released {
            let held = correct_holders(self, &id, &|n: &Node| {
                n.store.get_content(&id).ok().flatten().is_some()
            });
            if held > 0 {
                problems.push(format!("content block {id:?}, released by every owner, is still held by {held} correct members of its group after the grace; its owners' puts and releases: {}", self.refs_history(id)));
            }
        }
        for id in referenced {
            let held = correct_holders(self, &id, &|n: &Node| {
                n.store.get_content(&id).ok().flatten().is_some()
            });
            if held < need {
                problems.push(format!("content block {id:?} is held by {held} correct members of its group, {need} needed"));
            }
        }
        let audited: Vec<(usize, Stamp)> = self
            .history
            .iter()
            .filter(|h| self.clients[h.client].auditor)
            .filter_map(|h| match h.kind {
                HKind::PkRead {
                    key,
                    stamp: Some(s),
                    ..
                } => Some((key, s)),
                _ => None,
            })
            .collect();
        for (key, stamp) in audited {
            let id = self.keys[key].id;
            let held = correct_holders(self, &id, &|n: &Node| {
                n.store
                    .get_pk(&id)
                    .ok()
                    .flatten()
                    .is_some_and(|b| b.stamp() >= stamp)
            });
            if held < need {
                problems.push(format!("public-key block {key} is held by {held} correct members of its group, {need} needed"));
            }
        }
        for n in self.nodes.iter().filter(|n| n.byz.is_none()) {
            let me = n.key.node_id();
            let stray: Vec<ObjectId> = n
                .store
                .list()
                .unwrap_or_default()
                .into_iter()
                .filter(|id| !config.is_responsible(&me, id))
                .collect();
            if let Some(id) = stray.first() {
                problems.push(format!(
                    "node {} still holds {} objects it is not responsible for after garbage collection (e.g. {id:?})",
                    me.short(),
                    stray.len()
                ));
            }
        }
        for p in problems {
            self.violation(p);
        }
    }

    /// The content blocks at the end of a run: those an owner still holds (a put of it completed,
    /// and the same owner sent no later release), and those every owner released (each owner's
    /// last put or release of it, sent or abandoned, is a release that completed). Blocks in
    /// neither (an abandoned release, say) may be held or not.
    fn content_fates(&self) -> (BTreeSet<ObjectId>, BTreeSet<ObjectId>) {
        /// One owner's puts and releases of one block.
        #[derive(Default)]
        struct OwnerOps {
            /// The highest seq of a put sent, and the seqs of the puts that completed.
            put: u64,
            completed: Vec<u64>,
            /// The highest seq of a release sent, and whether that release completed.
            release: u64,
            release_done: bool,
        }
        let mut last: BTreeMap<(ObjectId, usize), OwnerOps> = BTreeMap::new();
        for h in &self.history {
            match h.kind {
                HKind::PutContent { id, seq } => {
                    let e = last.entry((id, h.client)).or_default();
                    e.put = e.put.max(seq);
                    if h.ret.is_some() {
                        e.completed.push(seq);
                    }
                }
                HKind::Release { id, seq } => {
                    let e = last.entry((id, h.client)).or_default();
                    if seq > e.release {
                        e.release = seq;
                        e.release_done = h.ret.is_some();
                    }
                }
                _ => {}
            }
        }
        let (mut referenced, mut released) = (BTreeSet::new(), BTreeSet::new());
        let mut maybe_held = BTreeSet::new();
        for ((id, _), o) in &last {
            if o.completed.iter().any(|s| *s > o.release) {
                referenced.insert(*id);
            }
            if o.put > o.release || !o.release_done {
                maybe_held.insert(*id);
            }
            released.insert(*id);
        }
        released.retain(|id| !maybe_held.contains(id));
        (referenced, released)
    }

    /// Whether a read of `id` from `call` to `ret` must find it: some owner held it throughout (a
    /// put of it completed before the read began, and that owner sent no later release more
    /// than the grace before the read ended).
    fn must_find(&self, id: ObjectId, call: u64, ret: u64) -> bool {
        self.history.iter().any(|p| match p.kind {
            HKind::PutContent { id: x, seq } if x == id && p.ret.is_some_and(|r| r < call) => {
                !self.history.iter().any(|r| {
                    matches!(r.kind, HKind::Release { id: y, seq: s }
                        if y == id && s > seq && r.client == p.client && r.call + GRACE_MS <= ret)
                })
            }
            _ => false,
        })
    }

    /// The puts and releases of content block `id`, for a report.
    fn refs_history(&self, id: ObjectId) -> String {
        let ops: Vec<String> = self
            .history
            .iter()
            .filter_map(|h| {
                let what = match h.kind {
                    HKind::PutContent { id: x, seq } if x == id => format!("put#{seq}"),
                    HKind::Release { id: x, seq } if x == id => format!("release#{seq}"),
                    _ => return None,
                };
                let ret = h.ret.map_or("…".to_string(), |r| r.to_string());
                Some(format!("client {} {what} t={}..{ret}", h.client, h.call))
            })
            .collect();
        ops.join(", ")
    }

    /// Runs the checkers over the recorded history.
    fn check(&mut self) {
        // Public-key blocks: one register per key.
        for key in 0..self.keys.len() {
            let ops: Vec<RegOp> = self
                .history
                .iter()
                .filter_map(|h| {
                    let (k, kind) = match h.kind {
                        HKind::PkWrite { key, tag } => (key, RegKind::Write(tag)),
                        HKind::PkRead { key, tag, .. } => (key, RegKind::Read(tag.unwrap_or(0))),
                        _ => return None,
                    };
                    (k == key).then(|| RegOp {
                        call: h.call,
                        ret: h.ret,
                        kind,
                        label: format!("client {}", h.client),
                    })
                })
                .collect();
            if let Err(e) = linearizable_register(&ops) {
                self.violation(format!("public-key block {key} is not linearizable: {e}"));
            }
        }
        // Content blocks: a block some owner held throughout a read (its put completed before the
        // read began, and no later release of that owner was sent a grace before it ended) is found.
        let lost: Vec<String> = self
            .history
            .iter()
            .filter_map(|h| match h.kind {
                HKind::GetContent {
                    id,
                    found: Some(false),
                } if self.must_find(id, h.call, h.ret.unwrap_or(u64::MAX)) => Some(format!(
                    "content block {id:?}, held by an owner, was not found by client {} at t={}..{}ms; its owners' puts and releases: {}",
                    h.client,
                    h.call,
                    h.ret.unwrap_or(0),
                    self.refs_history(id)
                )),
                _ => None,
            })
            .collect();
        for l in lost {
            self.violation(l);
        }
    }
}

fn value_tag(value: &[u8]) -> u64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(u64::MAX, u64::from_le_bytes)
}

fn make_config<'a>(
    epoch: u64,
    params: &Params,
    keys: impl Iterator<Item = &'a Keypair>,
    prev: Option<[u8; 32]>,
) -> Configuration {
    let members = keys.map(|k| Member::new(k.public(), "sim")).collect();
    Configuration::new(epoch, params.clone(), members, prev)
}
