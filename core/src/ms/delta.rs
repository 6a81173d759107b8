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
//! Pushes and a node's pulls (`MsMessage::DeltasAfter`: the puller names the epoch it holds; a
//! joining node's pulls from its bootstrap peer included) carry deltas; clients ask for whole
//! configurations (`MsMessage::ChainAfter`).
//!
//! Non-goals: configurations too large for one message (`ms::pieces`).
//!
//! Fault model: a delta comes from any node; nothing in it is trusted before the certificate of
//! the configuration it makes verifies.

use crate::config::{
    Certificate, CertifiedConfig, ConfigChain, ConfigError, ConfigHash, Configuration, Epoch,
    Member, Params, PublicShares,
};
use crate::crypto::NodeId;
use serde::{Deserialize, Serialize};

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
    /// The MS key's sharing the configuration carries (it changes every epoch).
    pub key: Option<PublicShares>,
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
    #[error("the delta of epoch {0} does not list its members in order")]
    Unsorted(Epoch),
    #[error("the configuration the delta makes does not verify: {0}")]
    Config(#[from] ConfigError),
}

impl ConfigDelta {
    /// What `next` changes against `prev` (its predecessor): one walk of both member lists, which
    /// a configuration keeps sorted by id.
    pub fn between(prev: &Configuration, next: &Configuration) -> ConfigDelta {
        let (a, b) = (&prev.members, &next.members);
        let (mut joined, mut left) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        loop {
            match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) if x.id == y.id => {
                    if x != y {
                        joined.push(y.clone());
                    }
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x.id < y.id => {
                    left.push(x.id);
                    i += 1;
                }
                (Some(x), None) => {
                    left.push(x.id);
                    i += 1;
                }
                (_, Some(y)) => {
                    joined.push(y.clone());
                    j += 1;
                }
                (None, None) => break,
            }
        }
        ConfigDelta {
            epoch: next.epoch,
            // A successor names its predecessor's hash: no need to hash `prev` again (a delta
            // whose `next` names another predecessor is refused where it is applied).
            prev: next.prev.unwrap_or_else(|| prev.hash()),
            params: (next.params != prev.params).then(|| next.params.clone()),
            joined,
            left,
            committee: next.committee.clone(),
            key: next.key.clone(),
        }
    }

    /// The configuration this delta makes of `prev` (not verified: see
    /// [`CertifiedDelta::apply`]): one walk of `prev`'s members (sorted by id) beside the delta's
    /// lists, which must be sorted too.
    pub fn apply(&self, prev: &Configuration) -> Result<Configuration, DeltaError> {
        if self.epoch != prev.epoch + 1 || self.prev != prev.hash() {
            return Err(DeltaError::OtherPredecessor(self.epoch));
        }
        let sorted_left = self.left.windows(2).all(|w| w[0] < w[1]);
        let sorted_joined = self.joined.windows(2).all(|w| w[0].id < w[1].id);
        if !sorted_left || !sorted_joined {
            return Err(DeltaError::Unsorted(self.epoch));
        }
        let mut members = Vec::with_capacity(prev.members.len() + self.joined.len());
        let mut left = self.left.iter().peekable();
        let mut joined = self.joined.iter().peekable();
        for m in &prev.members {
            while let Some(x) = joined.next_if(|x| x.id < m.id) {
                members.push(x.clone());
            }
            let removed = left.next_if(|id| **id == m.id).is_some();
            match joined.next_if(|x| x.id == m.id) {
                Some(x) => members.push(x.clone()),
                None if !removed => members.push(m.clone()),
                None => {}
            }
        }
        members.extend(joined.cloned());
        if left.next().is_some() {
            return Err(DeltaError::NotAMember(self.epoch));
        }
        Ok(Configuration {
            epoch: self.epoch,
            params: self.params.clone().unwrap_or_else(|| prev.params.clone()),
            members,
            committee: self.committee.clone(),
            prev: Some(self.prev),
            key: self.key.clone(),
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
