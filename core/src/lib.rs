//! `dbqsfs-core`: the sans-IO heart of dbqsfs.
//!
//! Everything here is a pure data type or a deterministic state machine. There is no tokio, no socket,
//! no file, no clock and no OS randomness in this crate: time arrives as an argument (milliseconds on a
//! caller-chosen clock), keys arrive as seeds, bytes arrive as slices, and the state machines return what
//! should be sent. The node process (`dbqsfs-daemon`) and the simulator (`dbqsfs-tests`) are thin drivers
//! that feed inputs and carry outputs; they make no protocol decisions.
//!
//! Map of the crate:
//! - [`crypto`]: node and owner keys, domain-separated ed25519 signatures (`verify_strict` only), ids.
//! - [`quorum`]: all quorum arithmetic (3f+1 / 2f+1 / f+1) and the vote tally.
//! - [`config`]: configurations (epoch, parameters, members, committee), their certificates and the ring.
//! - [`object`]: content-hash blocks and owner-signed public-key blocks, with their size limits.
//! - [`wire`]: the versioned envelope and the single place where untrusted bytes are decoded.
//! - [`store`]: the storage trait a replica runs over, and an in-memory implementation.
//! - [`dbqs`]: the dBQS protocol: its messages, the replica state machine and the client operations.

pub mod config;
pub mod crypto;
pub mod dbqs;
pub mod ms;
pub mod object;
pub mod quorum;
pub mod store;
pub mod wire;

pub use config::{CertifiedConfig, Configuration, Epoch, Member, Params};
pub use crypto::{Keypair, NodeId, ObjectId, PublicKey, Signature};
pub use object::{PkBlock, Stamp};
