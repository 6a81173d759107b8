//! [`DbqsClient`]: the async dBQS client over QUIC, driving the core's sans-IO [`Client`].
//!
//! Goals:
//! - One task owns the core client. Callers submit operations through a channel and await a
//!   oneshot per operation; every `Send` the core asks for becomes a spawned request on the
//!   transport whose response is fed back to the core; a timer wakes the core at `next_timeout`.
//! - Operations end in a typed [`ClientError`], never a hang: the core gives up after the
//!   operation timeout.
//! - Node status queries for `dbqsfs status` ([`DbqsClient::node_status`]).
//!
//! Non-goals: protocol decisions (quorums, retries and epochs are the core's), chunking of large
//! files (the CLI does it), caching.

use crate::control::{ControlMessage, TransferStatus};
use dbqsfs_core::config::{CertifiedConfig, ConfigChain, ConfigError, Member};
use dbqsfs_core::crypto::{Keypair, NodeId, ObjectId};
use dbqsfs_core::dbqs::client::{
    Client, ClientOptions, ClientOutput, OpError, OpId, Operation, Outcome,
};
use dbqsfs_core::object::{PkBlock, Stamp};
use dbqsfs_core::wire::{decode, encode_msg};
use dbqsfs_net::{local_bind_for, Endpoint, NetError, TransportOptions};
use ed25519_dalek::VerifyingKey;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Op(#[from] OpError),
    #[error("the client's driver task has stopped")]
    Closed,
    #[error("transport: {0}")]
    Net(#[from] NetError),
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("the cluster has no members")]
    NoMembers,
    #[error("member address {0:?} is not an IP:port")]
    BadAddress(String),
    #[error("member key is not a valid ed25519 key")]
    BadMemberKey,
    #[error("the node's answer is not a status: {0}")]
    BadStatus(String),
    #[error("unexpected outcome {0:?}")]
    Unexpected(Box<Outcome>),
}

/// Options of a [`DbqsClient`].
#[derive(Clone, Debug)]
pub struct DbqsClientOptions {
    /// Resend unanswered requests after this long.
    pub retransmit: Duration,
    /// Give up on an operation after this long.
    pub op_timeout: Duration,
    pub transport: TransportOptions,
}

impl Default for DbqsClientOptions {
    fn default() -> Self {
        DbqsClientOptions {
            retransmit: Duration::from_secs(2),
            op_timeout: Duration::from_secs(30),
            transport: TransportOptions {
                request_timeout: Duration::from_secs(10),
                connect_timeout: Duration::from_secs(3),
                ..TransportOptions::default()
            },
        }
    }
}

/// A node's answer to a status request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub epoch: u64,
    pub stored_bytes: u64,
    pub objects: u64,
    pub ready: bool,
    /// State transfers running, then the last few completed.
    pub transfers: Vec<TransferStatus>,
}

type Submission = (Operation, oneshot::Sender<Outcome>);

/// An async dBQS client. Cheap to clone; all clones share one driver task, which stops when the
/// last clone is dropped.
#[derive(Clone)]
pub struct DbqsClient {
    submit: mpsc::Sender<Submission>,
    endpoint: Endpoint,
    chain: ConfigChain,
}

fn member_addr(m: &Member) -> Result<(SocketAddr, VerifyingKey), ClientError> {
    let addr = m
        .addr
        .parse()
        .map_err(|_| ClientError::BadAddress(m.addr.clone()))?;
    let key = VerifyingKey::from_bytes(&m.key.0).map_err(|_| ClientError::BadMemberKey)?;
    Ok((addr, key))
}

impl DbqsClient {
    /// A client with key `key` that trusts `genesis` (and verifies any newer configuration
    /// against it). Must be called inside a tokio runtime.
    pub fn connect(
        genesis: CertifiedConfig,
        key: Keypair,
        opts: DbqsClientOptions,
    ) -> Result<DbqsClient, ClientError> {
        let chain = ConfigChain::new(genesis)?;
        let first = chain
            .config()
            .members
            .first()
            .ok_or(ClientError::NoMembers)?;
        let (addr, _) = member_addr(first)?;
        let endpoint = Endpoint::client(
            local_bind_for(addr),
            key.dalek().clone(),
            opts.transport.clone(),
        )?;
        // The struct update is needed when core's `mutants` feature adds a field (workspace builds).
        #[allow(clippy::needless_update)]
        let core = Client::new(
            key.node_id(),
            chain.clone(),
            ClientOptions {
                retransmit_ms: opts.retransmit.as_millis() as u64,
                op_timeout_ms: Some(opts.op_timeout.as_millis() as u64),
                // A fresh random start, so late replies to an earlier run of this client (same key)
                // can never match a request of this one.
                first_request_id: random_u64(),
                ..ClientOptions::default()
            },
        );
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(drive(core, endpoint.clone(), rx));
        Ok(DbqsClient {
            submit: tx,
            endpoint,
            chain,
        })
    }

    /// The configuration the client started from.
    pub fn chain(&self) -> &ConfigChain {
        &self.chain
    }

    async fn run(&self, op: Operation) -> Result<Outcome, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.submit
            .send((op, tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        match rx.await.map_err(|_| ClientError::Closed)? {
            Outcome::Failed(e) => Err(e.into()),
            other => Ok(other),
        }
    }

    /// Stores a content block (at most [`dbqsfs_core::object::MAX_BLOCK`] bytes); returns its id.
    pub async fn put_content(&self, data: Vec<u8>) -> Result<ObjectId, ClientError> {
        match self.run(Operation::PutContent { data }).await? {
            Outcome::ContentStored { id } => Ok(id),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// The verified bytes of content block `id`; `None` when a quorum says it is absent.
    pub async fn get_content(&self, id: ObjectId) -> Result<Option<Vec<u8>>, ClientError> {
        match self.run(Operation::GetContent { id }).await? {
            Outcome::Content { data, .. } => Ok(data),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Writes `value` to `owner`'s public-key block `label`; `version: None` writes the version
    /// after the highest one found.
    pub async fn put_pk(
        &self,
        owner: &Keypair,
        label: &[u8],
        value: Vec<u8>,
        version: Option<u64>,
    ) -> Result<Stamp, ClientError> {
        let op = Operation::PutPk {
            owner: owner.clone(),
            label: label.to_vec(),
            value,
            version,
        };
        match self.run(op).await? {
            Outcome::PkStored { stamp } => Ok(stamp),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// The latest value of public-key block `id` (atomic read).
    pub async fn get_pk(&self, id: ObjectId) -> Result<Option<PkBlock>, ClientError> {
        match self.run(Operation::GetPk { id }).await? {
            Outcome::Pk { block } => Ok(block),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    }

    /// Asks member `m` for its status (one request, bounded by the transport's timeouts).
    pub async fn node_status(&self, m: &Member) -> Result<NodeStatus, ClientError> {
        let (addr, key) = member_addr(m)?;
        let req = encode_msg(self.chain.epoch(), ControlMessage::StatusRequest);
        let resp = self.endpoint.request(addr, &key, &req).await?;
        match decode::<ControlMessage>(&resp)
            .map_err(|e| ClientError::BadStatus(e.to_string()))?
            .msg
        {
            ControlMessage::Status {
                epoch,
                stored_bytes,
                objects,
                ready,
                transfers,
            } => Ok(NodeStatus {
                epoch,
                stored_bytes,
                objects,
                ready,
                transfers,
            }),
            other => Err(ClientError::BadStatus(format!("{other:?}"))),
        }
    }
}

/// The driver task: owns the core client.
async fn drive(mut core: Client, endpoint: Endpoint, mut submissions: mpsc::Receiver<Submission>) {
    let start = Instant::now();
    let now = move || start.elapsed().as_millis() as u64;
    let (resp_tx, mut responses) = mpsc::unbounded_channel::<(NodeId, Vec<u8>)>();
    let mut waiting: HashMap<OpId, oneshot::Sender<Outcome>> = HashMap::new();
    let mut open = true;
    loop {
        while let Some(out) = core.poll_output() {
            match out {
                ClientOutput::Send { to, bytes } => {
                    let Some(m) = core.config().member(&to) else {
                        debug!(to = %to.short(), "send to an unknown member skipped");
                        continue;
                    };
                    let (addr, key) = match member_addr(m) {
                        Ok(x) => x,
                        Err(e) => {
                            warn!(to = %to.short(), error = %e, "member unreachable by configuration");
                            continue;
                        }
                    };
                    let endpoint = endpoint.clone();
                    let resp_tx = resp_tx.clone();
                    tokio::spawn(async move {
                        match endpoint.request(addr, &key, &bytes).await {
                            Ok(resp) => {
                                let _ = resp_tx.send((to, resp));
                            }
                            // Includes the expected NoResponse to one-way configuration pushes.
                            Err(e) => debug!(to = %to.short(), %addr, error = %e, "request failed"),
                        }
                    });
                }
                ClientOutput::Done { op, outcome } => {
                    if let Some(tx) = waiting.remove(&op) {
                        let _ = tx.send(outcome);
                    }
                }
                ClientOutput::Misbehaviour { from, what } => {
                    warn!(node = %from.short(), what, "replica misbehaved");
                }
                ClientOutput::EpochChanged { epoch } => info!(epoch, "client moved to a new epoch"),
                // The daemon's client sets no freshness lease (nodes do not issue certificates yet).
                ClientOutput::NeedFreshness { epoch } => {
                    warn!(epoch, "operations wait for a freshness certificate")
                }
            }
        }
        if !open && waiting.is_empty() {
            break;
        }
        let deadline = core
            .next_timeout()
            .map(|t| start + Duration::from_millis(t));
        tokio::select! {
            sub = submissions.recv(), if open => match sub {
                Some((op, tx)) => {
                    let id = core.submit(now(), op);
                    waiting.insert(id, tx);
                }
                None => open = false,
            },
            Some((from, bytes)) = responses.recv() => core.handle_message(now(), from, &bytes),
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await },
                if deadline.is_some() => core.handle_timeout(now()),
        }
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Without OS randomness, fall back to the clock: still distinct between runs.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}
