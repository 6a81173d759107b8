//! Configuration deltas: epoch `e+1` disseminated as what it changes against epoch `e` (members
//! added or changed, members removed, the new committee, new parameters), carried with the
//! certificate of the whole configuration of `e+1` (docs/DESIGN.md §3, "Dissemination").
//!
//! Goals: pushes down the tree cost what an epoch changes, not the size of the membership; a
//! delta is accepted only as the whole configuration it makes: the receiver applies it to the
//! configuration it holds, and the result must verify as that one's certified successor
//! ([`CertifiedConfig::verify_successor`]: the hash the committee signed covers every member), so
//! a delta built or applied wrongly, or forged, is refused.
//!
//! Pushes and a node's periodic pulls (`MsMessage::DeltasAfter`: the puller names the epoch it
//! holds) carry deltas; clients and joining nodes ask for whole configurations
//! (`MsMessage::ChainAfter`).
//!
//! Non-goals: chunking large configurations.
//!
//! Fault model: a delta comes from any node; nothing in it is trusted before the certificate of
//! the configuration it makes verifies.

use crate::config::{
    Certificate, CertifiedConfig, ConfigChain, ConfigError, ConfigHash, Configuration, Epoch,
    Member, Params,
};
use crate::crypto::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What epoch `epoch` changes against the configuration of `epoch - 1` (whose hash is `prev`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDelta {
    pub epoch: Epoch,
    pub prev: ConfigHash,
    /// The parameters, if they changed.
    pub params: Option<Params>,
    /// Members added, or whose record changed, sorted by id.
    pub joined: Vec<Member>,
    /// Members removed (left or evicted), sorted.
    pub left: Vec<NodeId>,
    /// The committee of `epoch`.
    pub committee: Vec<NodeId>,
}

/// A delta with the certificate of the configuration it makes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertifiedDelta {
    pub delta: ConfigDelta,
    pub cert: Certificate,
}

/// Why a delta was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error(
        "the delta of epoch {epoch} needs the configuration of the epoch before, which is not held"
    )]
    NoPredecessor { epoch: Epoch },
    #[error("the delta of epoch {0} is not against the configuration held for the epoch before")]
    OtherPredecessor(Epoch),
    #[error("the delta of epoch {0} removes a node that is not a member")]
    NotAMember(Epoch),
    #[error("the configuration the delta makes does not verify: {0}")]
    Config(#[from] ConfigError),
}

impl ConfigDelta {
    /// What `next` changes against `prev` (its predecessor).
    pub fn between(prev: &Configuration, next: &Configuration) -> ConfigDelta {
        let before: BTreeMap<NodeId, &Member> = prev.members.iter().map(|m| (m.id, m)).collect();
        let after: BTreeMap<NodeId, &Member> = next.members.iter().map(|m| (m.id, m)).collect();
        ConfigDelta {
            epoch: next.epoch,
            prev: prev.hash(),
            params: (next.params != prev.params).then(|| next.params.clone()),
            joined: next
                .members
                .iter()
                .filter(|m| before.get(&m.id) != Some(m))
                .cloned()
                .collect(),
            left: prev
                .members
                .iter()
                .filter(|m| !after.contains_key(&m.id))
                .map(|m| m.id)
                .collect(),
            committee: next.committee.clone(),
        }
    }

    /// The configuration this delta makes of `prev` (not verified: see
    /// [`CertifiedDelta::apply`]).
    pub fn apply(&self, prev: &Configuration) -> Result<Configuration, DeltaError> {
        if self.epoch != prev.epoch + 1 || self.prev != prev.hash() {
            return Err(DeltaError::OtherPredecessor(self.epoch));
        }
        let mut members: BTreeMap<NodeId, Member> =
            prev.members.iter().map(|m| (m.id, m.clone())).collect();
        for id in &self.left {
            if members.remove(id).is_none() {
                return Err(DeltaError::NotAMember(self.epoch));
            }
        }
        for m in &self.joined {
            members.insert(m.id, m.clone());
        }
        Ok(Configuration {
            epoch: self.epoch,
            params: self.params.clone().unwrap_or_else(|| prev.params.clone()),
            members: members.into_values().collect(),
            committee: self.committee.clone(),
            prev: Some(self.prev),
        })
    }
}

impl CertifiedDelta {
    /// `next` (the certified successor of `prev`) as a delta against `prev`.
    pub fn of(prev: &Configuration, next: &CertifiedConfig) -> CertifiedDelta {
        CertifiedDelta {
            delta: ConfigDelta::between(prev, &next.config),
            cert: next.cert.clone(),
        }
    }

    /// The certified configuration this delta makes of `prev`, verified as `prev`'s successor.
    pub fn apply(&self, prev: &Configuration) -> Result<CertifiedConfig, DeltaError> {
        let cc = CertifiedConfig {
            config: self.delta.apply(prev)?,
            cert: self.cert.clone(),
        };
        cc.verify_successor(prev)?;
        Ok(cc)
    }
}

/// The configurations of `chain` after `after`, at most `limit`, as deltas (each against the one
/// before it).
pub fn deltas_after(chain: &ConfigChain, after: Epoch, limit: usize) -> Vec<CertifiedDelta> {
    chain
        .after(after, limit)
        .iter()
        .filter_map(|c| {
            Some(CertifiedDelta::of(
                &chain.get(c.config.epoch - 1)?.config,
                c,
            ))
        })
        .collect()
}

/// The certified configurations that `deltas` (oldest first) make, applied in turn from the one
/// `chain` holds for the epoch before the first; stops at the first that does not apply or
/// verify, and says why. Deltas of epochs the chain already holds are skipped.
pub fn resolve(
    chain: &ConfigChain,
    deltas: &[CertifiedDelta],
) -> (Vec<CertifiedConfig>, Option<DeltaError>) {
    let mut out: Vec<CertifiedConfig> = Vec::new();
    for d in deltas {
        let epoch = d.delta.epoch;
        if epoch <= chain.epoch() {
            continue;
        }
        let prev = match out.last() {
            Some(c) => &c.config,
            None => match epoch.checked_sub(1).and_then(|e| chain.get(e)) {
                Some(c) => &c.config,
                None => return (out, Some(DeltaError::NoPredecessor { epoch })),
            },
        };
        match d.apply(prev) {
            Ok(c) => out.push(c),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}
