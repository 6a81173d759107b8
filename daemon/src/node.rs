//! One dbqsfs node: a QUIC server in front of a [`Replica`] over a [`DiskStore`].
//!
//! Goals:
//! - Load the node directory (`node.toml`, `node.key`, the store under `data/`), check the node's
//!   admission certificate, and resume from the configuration chain saved in the store (verified
//!   from the genesis configuration) or from genesis.
//! - Admit as peers the members of the current configuration and the listed client keys.
//! - Feed every request to the replica (on the blocking pool: the store fsyncs), send back its reply,
//!   install pushed configurations and persist the chain. Answer [`ControlMessage::StatusRequest`].
//! - Shut down cleanly on SIGTERM or ctrl-c.
//!
//! Non-goals: protocol decisions (the replica makes them), membership changes, state transfer.

use crate::control::{is_control, ControlMessage};
use crate::files::{self, FileError, NodeFile};
use crate::store::{DiskStore, OpenError};
use dbqsfs_core::config::{ConfigChain, ConfigError};
use dbqsfs_core::crypto::{Domain, Keypair, NodeId, PublicKey, Signature};
use dbqsfs_core::dbqs::replica::{Handled, Replica, ReplicaOptions};
use dbqsfs_core::store::{Store, StoreError};
use dbqsfs_core::wire::{decode, encode_msg};
use dbqsfs_net::{Authorizer, Endpoint, NetError, TransportOptions};
use ed25519_dalek::VerifyingKey;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tracing::{debug, info, warn};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("store: {0}")]
    Open(#[from] OpenError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("configuration chain: {0}")]
    Config(#[from] ConfigError),
    #[error("listen address {0:?} is not an IP:port")]
    BadListen(String),
    #[error("the admission certificate in {0} does not verify for this node's key")]
    NotAdmitted(PathBuf),
    #[error("transport: {0}")]
    Net(#[from] NetError),
}

/// The store the replica runs over: the disk store, or a faulty wrapper of it in fault tests.
type ReplicaStore = Arc<dyn Store + Send + Sync>;
type SharedReplica = Arc<RwLock<Replica<ReplicaStore>>>;

/// A node loaded from its directory, not yet serving.
pub struct Node {
    key: Keypair,
    listen: SocketAddr,
    clients: BTreeSet<[u8; 32]>,
    store: Arc<DiskStore>,
    replica: SharedReplica,
    #[cfg(feature = "fault-injection")]
    fault: Option<crate::fault::Fault>,
}

impl Node {
    /// Loads the node in `dir`.
    pub fn load(dir: &Path) -> Result<Node, NodeError> {
        let toml_path = dir.join("node.toml");
        let file: NodeFile = files::read_toml(&toml_path)?;
        let key = files::read_key(&dir.join("node.key"))?;
        let listen: SocketAddr = file
            .listen
            .parse()
            .map_err(|_| NodeError::BadListen(file.listen.clone()))?;
        let admission = files::decode_public(&toml_path, &file.admission_key)?;
        let cert = files::from_hex(&file.admission_cert)
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(Signature)
            .ok_or_else(|| NodeError::NotAdmitted(toml_path.clone()))?;
        admission
            .verify(Domain::Admission, &key.public().0, &cert)
            .map_err(|_| NodeError::NotAdmitted(toml_path.clone()))?;
        let clients = file
            .clients
            .iter()
            .map(|c| files::decode_public(&toml_path, c).map(|k| k.0))
            .collect::<Result<_, _>>()?;
        let genesis = files::decode_genesis(&toml_path, &file.genesis)?;

        let store = Arc::new(DiskStore::open(&dir.join("data"))?);
        let mut chain = ConfigChain::new(genesis.clone())?;
        match store.load_chain()? {
            Some(saved) => {
                if saved.first().map(|g| g.config.hash()) != Some(genesis.config.hash()) {
                    return Err(ConfigError::NotOurGenesis.into());
                }
                chain.extend(saved.into_iter().skip(1).collect())?;
            }
            None => store.save_chain(&[genesis])?,
        }
        let ready = match store.load_ready()? {
            Some(epochs) => epochs.contains(&chain.epoch()),
            None => {
                // A fresh node at genesis holds everything it is responsible for (nothing).
                store.save_ready(&[chain.epoch()])?;
                true
            }
        };
        info!(node = %key.node_id().short(), epoch = chain.epoch(), ready, %listen, "node loaded");
        let replica_store: ReplicaStore = store.clone();
        let replica = Replica::new(
            key.node_id(),
            replica_store,
            chain,
            ready,
            ReplicaOptions::default(),
        );
        Ok(Node {
            key,
            listen,
            clients,
            store,
            replica: Arc::new(RwLock::new(replica)),
            #[cfg(feature = "fault-injection")]
            fault: None,
        })
    }

    /// Makes this node Byzantine in the way `fault` says (test builds only).
    #[cfg(feature = "fault-injection")]
    pub fn with_fault(mut self, fault: crate::fault::Fault) -> Self {
        let (chain, ready) = {
            let r = self.replica.read().unwrap_or_else(|p| p.into_inner());
            (r.chain().clone(), r.is_ready())
        };
        let faulty: ReplicaStore =
            Arc::new(crate::fault::FaultStore::new(self.store.clone(), fault));
        self.replica = Arc::new(RwLock::new(Replica::new(
            self.key.node_id(),
            faulty,
            chain,
            ready,
            ReplicaOptions::default(),
        )));
        self.fault = Some(fault);
        tracing::warn!(?fault, "this node is deliberately faulty");
        self
    }

    pub fn id(&self) -> NodeId {
        self.key.node_id()
    }

    /// Serves until `shutdown` completes, then closes the endpoint.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
        let authorizer = NodeAuthorizer {
            replica: self.replica.clone(),
            clients: self.clients.clone(),
        };
        let endpoint = Endpoint::server(
            self.listen,
            self.key.dalek().clone(),
            TransportOptions::default(),
            Arc::new(authorizer),
        )?;
        info!(addr = %endpoint.local_addr(), "serving");
        let replica = self.replica.clone();
        let store = self.store.clone();
        #[cfg(feature = "fault-injection")]
        let fault = self.fault;
        endpoint.serve(move |peer: VerifyingKey, request: Vec<u8>| {
            let replica = replica.clone();
            let store = store.clone();
            async move {
                let reply = handle(replica, store, peer, request).await;
                #[cfg(feature = "fault-injection")]
                let reply = crate::fault::distort_reply(fault, reply);
                reply
            }
        });
        shutdown.await;
        info!("shutting down");
        endpoint.close().await;
        Ok(())
    }
}

struct NodeAuthorizer {
    replica: SharedReplica,
    clients: BTreeSet<[u8; 32]>,
}

impl Authorizer for NodeAuthorizer {
    fn is_authorized(&self, peer: &VerifyingKey) -> bool {
        let bytes = peer.to_bytes();
        if self.clients.contains(&bytes) {
            return true;
        }
        let id = PublicKey(bytes).node_id();
        let r = self.replica.read().unwrap_or_else(|p| p.into_inner());
        r.chain().config().is_member(&id)
    }
}

async fn handle(
    replica: SharedReplica,
    store: Arc<DiskStore>,
    peer: VerifyingKey,
    request: Vec<u8>,
) -> Option<Vec<u8>> {
    let from = PublicKey(peer.to_bytes()).node_id();
    let task = tokio::task::spawn_blocking(move || {
        if is_control(&request) {
            return control(&replica, &store, from, &request);
        }
        let handled = replica
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .handle(from, &request);
        match handled {
            Handled::Reply(bytes) => Some(bytes),
            Handled::Install(configs) => {
                let mut r = replica.write().unwrap_or_else(|p| p.into_inner());
                // Persist the longer chain first and move to it only then: a node that restarted
                // in an epoch it had already left could accept writes the new epoch assumes over.
                let mut next = r.chain().clone();
                match next.extend(configs.clone()) {
                    Ok(added) if !added.is_empty() => {
                        if let Err(e) = store.save_chain(&next.all()) {
                            warn!(error = %e, "could not persist the configuration chain; staying in the current epoch");
                            return None;
                        }
                        if let Err(e) = r.install(configs) {
                            warn!(error = %e, "configurations verified once did not install");
                        }
                        info!(epochs = ?added, "installed configurations");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!(peer = %from.short(), error = %e, "refused pushed configurations")
                    }
                }
                None
            }
            Handled::Dropped(reason) => {
                debug!(peer = %from.short(), ?reason, "dropped a message");
                None
            }
        }
    });
    match task.await {
        Ok(reply) => reply,
        Err(e) => {
            warn!(error = %e, "request handler failed");
            None
        }
    }
}

fn control(
    replica: &SharedReplica,
    store: &DiskStore,
    from: NodeId,
    request: &[u8],
) -> Option<Vec<u8>> {
    let env = match decode::<ControlMessage>(request) {
        Ok(env) => env,
        Err(e) => {
            debug!(peer = %from.short(), error = %e, "undecodable control message");
            return None;
        }
    };
    match env.msg {
        ControlMessage::StatusRequest => {
            let (epoch, ready) = {
                let r = replica.read().unwrap_or_else(|p| p.into_inner());
                (r.epoch(), r.is_ready())
            };
            let objects = store.list().map(|l| l.len() as u64).unwrap_or(0);
            Some(encode_msg(
                epoch,
                ControlMessage::Status {
                    epoch,
                    stored_bytes: store.content_bytes(),
                    objects,
                    ready,
                    // Filled in by the transfer worker.
                    transfers: Vec::new(),
                },
            ))
        }
        ControlMessage::Status { .. } => None,
    }
}

/// Completes on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => info!("interrupt received"),
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; only ctrl-c stops this node");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
