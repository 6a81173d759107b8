//! The Membership Service (MS): the committee of `3f_ms+1` members that orders membership operations
//! and certifies each epoch's configuration (docs/DESIGN.md §3).
//!
//! Goals: every correct committee member executes the same operations in the same order while at
//! most `f_ms` members are Byzantine, under any message loss, duplication, delay or reordering
//! (safety), and executes every operation of a correct submitter once the network behaves and the
//! primary is correct or replaced (liveness).
//!
//! Non-goals here: what the operations mean (Join, Leave, probe reports, proofs of misbehaviour,
//! EndEpoch are the MS state machine that runs on top of the agreement), persistence (the driver
//! persists before it sends, as everywhere in `core/`), and the transport.
//!
//! Fault model: up to `f_ms` committee members may lie, equivocate, go silent, replay old messages,
//! forge signatures of others (and fail), or send garbage; they cannot forge a correct member's or a
//! client's signature. Clients are authenticated by their signatures only.
//!
//! - [`pbft`]: the agreement protocol (PBFT with signatures), a sans-IO state machine.
//! - [`membership`]: what the agreed operations mean: joins, leaves, evictions, epoch ends.
//! - [`app`]: the application a committee member runs on the agreement: batches executed in
//!   order, the digest chained through them, the next committee's seed, replay.
//! - [`role`]: a committee member's role in one epoch as one machine: the agreement, the
//!   application, persistence, catching up, probes, shares and the epoch timer, with ordered
//!   actions for the driver (the node's and the simulator's).
//! - [`node`]: a node's whole part in the MS as one machine: its role, its submissions and its
//!   following of the epochs, with one ordered queue of outputs for the driver.
//! - [`probe`]: a committee member's probing of the epoch's members and its verdicts.
//! - [`shares`]: freshness shares and the next configuration's signatures, collected.
//! - [`submissions`]: a node's operations for the MS, signed and sent one at a time until executed.
//! - [`delta`]: configurations as what they change against the epoch before, for pushes.
//! - [`pieces`]: whole configurations in bounded pieces, each checked against the certified hash.
//! - [`follower`]: a node's following of the epochs: whom it pulls configurations from and when,
//!   whom it forwards them to.
//! - [`key`]: the MS's threshold key: its shares dealt to each committee in turn, checked with
//!   evidence against cheating dealers, and FROST signing under one key.
//! - [`threshold`]: the next configuration certified under the MS key by the committee together
//!   (FROST's two rounds in attempts, one aggregator each).
//! - [`tree`]: the push tree that disseminates each certified configuration.
//! - [`wire`]: the MS's messages beside the agreement's.

pub mod app;
pub mod delta;
pub mod follower;
pub mod key;
pub mod membership;
pub mod node;
pub mod pbft;
pub mod pieces;
pub mod probe;
pub mod role;
pub mod shares;
pub mod submissions;
pub mod threshold;
pub mod tree;
pub mod wire;
