//! What the node's tasks share about epochs: the verified configuration chain (held by the
//! replica), the installation of newer configurations (verified against the chain, persisted,
//! then installed, and the transfer worker told), and the newest freshness certificate. The
//! request handler (`node`) and the MS task (`ms`) both use it; neither imports
//! the other for it. Also who a peer is to the node ([`Peer`]), which both decide by.
//!
//! Fault model: configurations and freshness certificates come from the network; each is
//! verified against the chain (or the configuration of its epoch) before it is kept.

use crate::store::DiskStore;
use crate::transfer::{SharedReplica, TransferWorker};
use dbqsfs_core::config::{CertifiedConfig, ConfigChain, ConfigError, Epoch, Freshness};
use dbqsfs_core::crypto::NodeId;
use dbqsfs_core::ms::delta::{resolve, CertifiedDelta};
use dbqsfs_core::store::StoreError;
use std::sync::{Arc, Mutex};
use tracing::{debug, info, warn};

/// What a peer is to this node, by its key (the core's; what each may send is decided there).
pub use dbqsfs_core::ms::wire::Peer;

/// The node's epochs: its chain, installs, freshness.
pub struct Epochs {
    me: NodeId,
    replica: SharedReplica,
    store: Arc<DiskStore>,
    freshness: Mutex<Option<Freshness>>,
    /// Serializes installations (verify, persist, install must not interleave).
    installing: Mutex<()>,
    /// The state-transfer worker: told of every installed epoch ([`Epochs::install`]).
    transfers: TransferWorker,
}

impl Epochs {
    pub fn new(
        me: NodeId,
        replica: SharedReplica,
        store: Arc<DiskStore>,
        transfers: TransferWorker,
    ) -> Epochs {
        Epochs {
            me,
            replica,
            store,
            freshness: Mutex::new(None),
            installing: Mutex::new(()),
            transfers,
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.replica
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .epoch()
    }

    /// A copy of the verified configuration chain.
    pub fn chain(&self) -> ConfigChain {
        self.replica
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .chain()
            .clone()
    }

    /// Whether `id` is a member of any configuration this node knows.
    pub fn was_member(&self, id: &NodeId) -> bool {
        let r = self.replica.read().unwrap_or_else(|p| p.into_inner());
        let chain = r.chain();
        (0..=chain.epoch()).any(|e| chain.get(e).is_some_and(|c| c.config.is_member(id)))
    }

    /// Applies `deltas` (oldest first) to the chain held and installs what they make, as
    /// [`Epochs::install`]. A delta that does not apply (a forgery, or one whose epoch before the
    /// node lacks: it pulls) stops there; those before it are installed. Blocking.
    pub fn install_deltas(&self, deltas: &[CertifiedDelta]) -> Result<Vec<Epoch>, InstallError> {
        let (configs, refused) = resolve(&self.chain(), deltas);
        if let Some(e) = refused {
            debug!(error = %e, "delta not applied");
        }
        if configs.is_empty() {
            return Ok(Vec::new());
        }
        self.install(configs)
    }

    /// Verifies `configs` against the chain, persists the longer chain, and only then installs it
    /// (a node that restarted in an epoch it had already left could accept writes the new epoch
    /// assumes over). Blocking: it fsyncs. Returns the epochs added (none if nothing was new).
    pub fn install(&self, configs: Vec<CertifiedConfig>) -> Result<Vec<Epoch>, InstallError> {
        let _one = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.chain();
        let added = next.extend(configs.clone())?;
        if added.is_empty() {
            return Ok(added);
        }
        let new: Vec<CertifiedConfig> =
            added.iter().filter_map(|e| next.get(*e).cloned()).collect();
        self.store.save_configs(&new)?;
        {
            let mut r = self.replica.write().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = r.install(configs) {
                warn!(error = %e, "configurations verified once did not install");
            }
        }
        let config = next.config();
        info!(
            epochs = ?added,
            members = config.members.len(),
            member = config.is_member(&self.me),
            committee = config.committee.contains(&self.me),
            "installed configurations"
        );
        self.transfers.epochs_installed(&added);
        Ok(added)
    }

    /// The newest freshness certificate this node holds.
    pub fn freshness(&self) -> Option<Freshness> {
        self.freshness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps `f` if it verifies against the configuration of its epoch and is newer.
    pub fn learn_freshness(&self, f: Freshness) {
        let Some(config) = self.chain().get(f.epoch).map(|c| c.config.clone()) else {
            return;
        };
        if f.verify(&config).is_err() {
            return;
        }
        let mut cur = self.freshness.lock().unwrap_or_else(|p| p.into_inner());
        if cur
            .as_ref()
            .is_none_or(|c| (f.epoch, f.time_ms) > (c.epoch, c.time_ms))
        {
            *cur = Some(f);
        }
    }
}

/// Why configurations were not installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("could not persist the configuration chain (staying in the current epoch): {0}")]
    Store(#[from] StoreError),
}
