//! One dbqsfs node: a QUIC server in front of a [`Replica`] over a [`DiskStore`].
//!
//! Goals:
//! - Load the node directory (`node.toml`, `node.key`, the store under `data/`), check the node's
//!   admission certificate, and resume from the configuration chain saved in the store (verified
//!   from the genesis configuration) or from genesis.
//! - Serve dBQS and state transfer to the members of the current configuration and the listed
//!   client keys; the MS protocol (`ms`) to anyone, since a node that joins is nobody yet (what a
//!   stranger may ask is limited there). Every connection is authenticated by its key; what it may
//!   do is decided per message ([`Peer`]).
//! - Feed every request to the replica (on the blocking pool: the store fsyncs), send back its reply.
//!   Newer configurations, from any source, go through [`crate::epochs::Epochs::install`]: verified against the
//!   chain, persisted, then installed. Answer [`ControlMessage::StatusRequest`].
//! - Run the node's MS task ([`crate::ms`]): epoch follower, and committee role when in the committee.
//! - Shut down cleanly on SIGTERM or ctrl-c.
//!
//! Non-goals: protocol decisions (the replica and the MS core make them).

use crate::control::{is_control, ControlMessage, SpaceStatus, StatusParts};
use crate::epochs::{Epochs, Peer};
use crate::files::{self, FileError, NodeFile};
use crate::identity::Identity;
use crate::ms::{is_ms, Inbound, MsContext, MsHandle, MsOptions};
use crate::store::{DiskStore, OpenError};
use crate::transfer::{self, TransferOptions, TransferWorker};
use dbqsfs_core::config::{ConfigChain, ConfigError};
use dbqsfs_core::crypto::{Domain, NodeId, PublicKey, Signature};
use dbqsfs_core::dbqs::msg::is_block_op;
use dbqsfs_core::dbqs::replica::{Handled, Replica, ReplicaOptions};
use dbqsfs_core::ms::membership::AdmissionCert;
use dbqsfs_core::ms::pbft::AgreementMessage;
use dbqsfs_core::store::{Store, StoreError};
use dbqsfs_core::wire::{decode, encode_msg, Protocol};
use dbqsfs_net::{Authorizer, Endpoint, NetError, TransportOptions};
use ed25519_dalek::VerifyingKey;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tracing::{debug, info, warn};

mod serve;
mod tasks;

use serve::{handle, protocol_of, Trust};
use tasks::{sweep_released, trim_memory};

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
    #[error("the join address {0} is not a member address in any configuration this node knows; join through a member's address")]
    UnknownBootstrap(SocketAddr),
    #[error("a node already runs in {dir} ({who}); stop it first (`dbqsfs cluster down`, or kill that pid)")]
    AlreadyRunning { dir: PathBuf, who: String },
    #[error("cannot lock {0}: {1}")]
    Lock(PathBuf, std::io::Error),
}

/// Locks `dir/node.lock` for this process (released when the process ends, however it ends) and
/// records its pid there; a node already running in `dir` is named in the error.
fn lock_dir(dir: &Path) -> Result<std::fs::File, NodeError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("node.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| NodeError::Lock(path.clone(), e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(NodeError::AlreadyRunning {
                dir: dir.to_path_buf(),
                who: if pid.is_empty() {
                    "its pid is not recorded yet".into()
                } else {
                    format!("pid {pid}")
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(NodeError::Lock(path, e)),
    }
    let record = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    record.map_err(|e| NodeError::Lock(path, e))?;
    Ok(file)
}

/// The store the replica runs over: the disk store, or a faulty wrapper of it in fault tests.
type ReplicaStore = Arc<dyn Store + Send + Sync>;
type SharedReplica = Arc<RwLock<Replica<ReplicaStore>>>;

/// What serving the node's requests needs (and its status reads). The MS task has a context of
/// its own ([`MsContext`]) and shares only [`Identity`], the epochs and the store; the sweeper
/// holds just the replica.
pub struct Serving {
    /// Who this node is (shared with the MS task).
    pub me: Arc<Identity>,
    pub replica: SharedReplica,
    pub store: Arc<DiskStore>,
    clients: BTreeSet<[u8; 32]>,
    /// The chain, installs and freshness, shared with the MS task.
    pub epochs: Arc<Epochs>,
    pub transfers: TransferWorker,
}

impl Serving {
    pub fn peer(&self, key: &PublicKey) -> Peer {
        if *key == self.me.key.public() {
            Peer::Myself
        } else if self.clients.contains(&key.0) {
            Peer::Client
        } else if self
            .replica
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .chain()
            .config()
            .is_member(&key.node_id())
        {
            Peer::Member
        } else {
            Peer::Stranger
        }
    }
}

/// A node loaded from its directory, not yet serving.
pub struct Node {
    shared: Arc<Serving>,
    /// `DIR/node.lock`, locked while the node runs (one node per directory); holds its pid.
    _lock: std::fs::File,
    ms: MsOptions,
    /// Where to serve Prometheus metrics, if anywhere.
    metrics: Option<SocketAddr>,
    /// The `[settings]` of node.toml.
    settings: crate::files::NodeSettings,
    #[cfg(feature = "fault-injection")]
    fault: Option<crate::fault::Fault>,
}

impl Node {
    /// Loads the node in `dir`.
    pub fn load(dir: &Path) -> Result<Node, NodeError> {
        let lock = lock_dir(dir)?;
        let toml_path = dir.join("node.toml");
        let file: NodeFile = files::read_toml(&toml_path)?;
        let key = files::read_key(&dir.join("node.key"))?;
        let listen: SocketAddr = file
            .listen
            .parse()
            .map_err(|_| NodeError::BadListen(file.listen.clone()))?;
        let admission = files::decode_public(&toml_path, &file.admission_key)?;
        let cert = hex::decode(file.admission_cert.trim())
            .ok()
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
            None => store.save_configs(&[genesis])?,
        }
        let me = key.node_id();
        let ready = match store.load_ready()? {
            Some(epochs) => epochs.contains(&chain.epoch()),
            None => {
                // A fresh node holds everything it is responsible for: at genesis nothing has been
                // written, and a node that is not a member is responsible for nothing.
                let fresh = chain.epoch() == 0 || !chain.config().is_member(&me);
                if fresh {
                    store.save_ready(&[chain.epoch()])?;
                }
                fresh
            }
        };
        let mut ms = MsOptions::default();
        if file.join {
            ms.join = Some(AdmissionCert {
                node: key.public(),
                sig: cert,
            });
        }
        if let Some(addr) = &file.bootstrap {
            let addr: SocketAddr = addr
                .parse()
                .map_err(|_| NodeError::BadListen(addr.clone()))?;
            let member = chain
                .all()
                .iter()
                .rev()
                .find_map(|c| {
                    c.config
                        .members
                        .iter()
                        .find(|m| m.addr == addr.to_string())
                        .cloned()
                })
                .ok_or(NodeError::UnknownBootstrap(addr))?;
            let vk = VerifyingKey::from_bytes(&member.key.0)
                .map_err(|_| NodeError::UnknownBootstrap(addr))?;
            ms.bootstrap = Some((addr, vk));
        }
        info!(node = %me.short(), epoch = chain.epoch(), ready, %listen, "node loaded");
        let replica_store: ReplicaStore = store.clone();
        let replica_opts = replica_options(&file.settings);
        let mut replica = Replica::new(me, replica_store, chain, ready, replica_opts);
        let released = replica.recover_released()?;
        if released > 0 {
            info!(
                blocks = released,
                "released content blocks to delete after the grace period"
            );
        }
        let deferred = store.load_deferred()?;
        if !deferred.is_empty() {
            info!(
                blocks = deferred.len(),
                "content blocks deferred for lack of space: stored once space is free"
            );
        }
        for x in deferred {
            replica.defer(x);
        }
        let transfers = TransferWorker::new(me, store.clone(), TransferOptions::default());
        let replica: SharedReplica = Arc::new(RwLock::new(replica));
        let epochs = Epochs::new(me, replica.clone(), store.clone(), transfers.clone());
        Ok(Node {
            _lock: lock,
            shared: Arc::new(Serving {
                me: Arc::new(Identity {
                    key,
                    admission_key: admission,
                    listen,
                }),
                replica,
                epochs: Arc::new(epochs),
                store,
                clients,
                transfers,
            }),
            ms,
            metrics: None,
            settings: file.settings.clone(),
            #[cfg(feature = "fault-injection")]
            fault: None,
        })
    }

    /// The `[settings]` of the node's node.toml (which the command line's flags override).
    pub fn settings(&self) -> &crate::files::NodeSettings {
        &self.settings
    }

    /// Keeps `bytes` free on the data directory's filesystem for metadata
    /// ([`DiskStore::set_reserve`]).
    pub fn set_reserve(&self, bytes: u64) {
        self.shared.store.set_reserve(bytes);
    }

    /// Deletes a content block every owner released this long after the node learnt it
    /// (`Replica::sweep`; default [`dbqsfs_core::dbqs::replica::DEFAULT_GRACE_MS`]).
    pub fn set_release_grace(&self, grace: std::time::Duration) {
        self.shared
            .replica
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set_grace_ms(grace.as_millis() as u64);
    }

    /// The UDP address the node listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.shared.me.listen
    }

    /// Makes this node Byzantine in the way `fault` says (test builds only).
    #[cfg(feature = "fault-injection")]
    pub fn with_fault(mut self, fault: crate::fault::Fault) -> Self {
        let s = &self.shared;
        let (chain, ready) = {
            let r = s.replica.read().unwrap_or_else(|p| p.into_inner());
            (r.chain().clone(), r.is_ready())
        };
        let faulty: ReplicaStore = Arc::new(crate::fault::FaultStore::new(s.store.clone(), fault));
        let mut replica = Replica::new(
            s.me.id(),
            faulty,
            chain,
            ready,
            replica_options(&self.settings),
        );
        let _ = replica.recover_released();
        if let Ok(deferred) = s.store.load_deferred() {
            for x in deferred {
                replica.defer(x);
            }
        }
        let replica: SharedReplica = Arc::new(RwLock::new(replica));
        let epochs = Epochs::new(
            s.me.id(),
            replica.clone(),
            s.store.clone(),
            s.transfers.clone(),
        );
        self.shared = Arc::new(Serving {
            me: s.me.clone(),
            replica,
            epochs: Arc::new(epochs),
            store: s.store.clone(),
            clients: s.clients.clone(),
            transfers: s.transfers.clone(),
        });
        self.fault = Some(fault);
        self.ms.forge = fault == crate::fault::Fault::ForgeConfigs;
        tracing::warn!(?fault, "this node is deliberately faulty");
        self
    }

    /// Changes the node's MS timing (tests use short periods).
    pub fn with_ms_options(mut self, f: impl FnOnce(&mut MsOptions)) -> Self {
        f(&mut self.ms);
        self
    }

    pub fn id(&self) -> NodeId {
        self.shared.me.id()
    }

    /// Serves Prometheus metrics at `http://addr/metrics` while the node runs.
    pub fn with_metrics(mut self, addr: SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// Tunes the state-transfer worker (before [`Node::run`]).
    pub fn with_transfer_options(self, opts: TransferOptions) -> Self {
        self.shared.transfers.set_options(opts);
        self
    }

    /// The state-transfer worker (to follow its progress).
    pub fn transfers(&self) -> &TransferWorker {
        &self.shared.transfers
    }

    /// Serves until `shutdown` completes, then closes the endpoint.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
        let shared = self.shared;
        let endpoint = Endpoint::server(
            shared.me.listen,
            shared.me.key.dalek().clone(),
            TransportOptions::default(),
            Arc::new(Trust(Arc::downgrade(&shared))),
        )?;
        info!(addr = %endpoint.local_addr(), "serving");
        let sampler = match self.metrics {
            Some(addr) => match crate::metrics::serve(addr) {
                Ok(()) => {
                    info!(%addr, "serving metrics at /metrics");
                    let weak = Arc::downgrade(&shared);
                    Some(tokio::spawn(crate::metrics::sample(move || {
                        weak.upgrade().map(|s| s.status_parts())
                    })))
                }
                Err(e) => {
                    warn!(%addr, error = %e, "cannot serve metrics; going on without them");
                    None
                }
            },
            None => None,
        };
        let transfers = shared
            .transfers
            .start(endpoint.clone(), shared.replica.clone());
        let context = MsContext {
            me: shared.me.clone(),
            store: shared.store.clone(),
            epochs: shared.epochs.clone(),
        };
        let (ms, ms_task) = crate::ms::spawn(Arc::new(context), endpoint.clone(), self.ms);
        #[cfg(feature = "fault-injection")]
        let distorter = Arc::new(crate::fault::Distorter::new(self.fault));
        let serving = shared.clone();
        endpoint.serve(move |peer: VerifyingKey, request: Vec<u8>| {
            let shared = serving.clone();
            let ms = ms.clone();
            #[cfg(feature = "fault-injection")]
            let distorter = distorter.clone();
            async move {
                let started = std::time::Instant::now();
                let protocol = protocol_of(&request);
                let reply = handle(shared, ms, peer, protocol, request).await;
                crate::metrics::request_done(protocol, started);
                #[cfg(feature = "fault-injection")]
                let reply = distorter.reply(&peer.to_bytes(), reply);
                reply
            }
        });
        let trimmer = tokio::spawn(trim_memory());
        let sweeper = tokio::spawn(sweep_released(shared.replica.clone()));
        shutdown.await;
        info!("shutting down");
        trimmer.abort();
        sweeper.abort();
        if let Some(s) = sampler {
            s.abort();
        }
        ms_task.abort();
        let _ = ms_task.await;
        transfers.abort();
        let _ = transfers.await;
        endpoint.close().await;
        Ok(())
    }
}

/// The replica's options from node.toml's settings.
fn replica_options(settings: &crate::files::NodeSettings) -> ReplicaOptions {
    let mut opts = ReplicaOptions::default();
    if let Some(secs) = settings.release_grace_secs {
        opts.grace_ms = secs.saturating_mul(1000);
    }
    opts
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
