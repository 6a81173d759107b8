//! Configurations: who the members are in an epoch, and how anyone can check it.
//!
//! A configuration of epoch `e` lists the parameters, the members sorted by node id (the ring), the
//! MS committee of `e`, and the hash of configuration `e-1`. The genesis configuration (epoch 0) is
//! trusted by its hash, which is the cluster id. Every later configuration carries a [`Certificate`]:
//! `2f_ms+1` signatures of the committee of `e-1` over its hash, or, once configuration `e-1`
//! carries the MS's threshold key, one signature under that key (the same key for the life of the
//! cluster), which that committee makes together. Holding the genesis configuration is
//! therefore enough to verify any chain of configurations, and a faulty relay can delay
//! configurations but never forge them.
//!
//! Placement: the replica group of object `x` is the `3f+1` members that succeed `x` on the ring.
//! Everyone holds the configuration, so locating a group is a local computation.

use crate::crypto::{Domain, Keypair, NodeId, ObjectId, PublicKey, Signature};
use crate::quorum::Quorum;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// An epoch number. Genesis is epoch 0.
pub type Epoch = u64;

/// The hash of a configuration.
pub type ConfigHash = [u8; 32];

/// Cluster parameters, fixed per configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// Faults tolerated per replica group (groups have 3f+1 members).
    pub f: u32,
    /// Faults tolerated by the MS committee (3f_ms+1 members).
    pub f_ms: u32,
    /// Length of an epoch, in milliseconds.
    pub epoch_ms: u64,
    /// Period of liveness probes, in milliseconds.
    pub probe_ms: u64,
    /// Consecutive failed probes after which a member is reported unresponsive.
    pub evict_after_probes: u32,
    /// How long a freshness certificate stays valid, in milliseconds.
    pub freshness_ms: u64,
}

impl Params {
    /// Defaults that suit a LAN test cluster with `f` faults per group.
    pub fn with_f(f: u32) -> Params {
        Params {
            f,
            f_ms: f,
            epoch_ms: 30_000,
            probe_ms: 5_000,
            evict_after_probes: 6,
            freshness_ms: 60_000,
        }
    }

    pub fn quorum(&self) -> Quorum {
        Quorum::new(self.f as usize)
    }

    pub fn ms_quorum(&self) -> Quorum {
        Quorum::new(self.f_ms as usize)
    }
}

/// A member of the ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub key: PublicKey,
    /// Where the node listens (for example `127.0.0.1:7100`).
    pub addr: String,
}

impl Member {
    pub fn new(key: PublicKey, addr: impl Into<String>) -> Member {
        Member {
            id: key.node_id(),
            key,
            addr: addr.into(),
        }
    }
}

/// The membership of one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    pub epoch: Epoch,
    pub params: Params,
    /// Sorted by id, no duplicates.
    pub members: Vec<Member>,
    /// The MS committee of this epoch: ids of members, sorted.
    pub committee: Vec<NodeId>,
    /// Hash of the configuration of `epoch - 1`; `None` only for genesis.
    pub prev: Option<ConfigHash>,
    /// The public side of the MS's threshold key as the committee of `epoch - 1` held it when
    /// that epoch ended (`ms::key`); `None` at genesis and before the MS made its key. Once a
    /// configuration carries it, every later one carries the same key (its first commitment).
    pub key: Option<PublicShares>,
}

/// The public side of one epoch's sharing of the MS's threshold key: the committee in order
/// (member `i` has abscissa `i+1`) and the commitments to the sharing polynomial's coefficients.
/// The first commitment is the key. (`ms::key` does its arithmetic.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicShares {
    pub epoch: Epoch,
    pub members: Vec<NodeId>,
    pub commitments: Vec<[u8; 32]>,
}

/// Why a configuration or certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("members are not sorted by id or contain duplicates")]
    MembersNotSorted,
    #[error("member {0:?} has an id that is not the hash of its key")]
    BadMemberId(NodeId),
    #[error("{members} members cannot form groups of {needed} (3f+1)")]
    TooFewMembers { members: usize, needed: usize },
    #[error("committee is not a sorted set of {expected} members")]
    BadCommittee { expected: usize },
    #[error("epoch {got} does not follow epoch {prev}")]
    WrongEpoch { prev: Epoch, got: Epoch },
    #[error("configuration does not name the hash of its predecessor")]
    WrongPredecessor,
    #[error("certificate has {valid} valid committee signatures, {needed} needed")]
    NotEnoughSignatures { valid: usize, needed: usize },
    #[error("configuration of epoch {0} is unknown")]
    Unknown(Epoch),
    #[error("genesis configuration does not match the cluster id")]
    NotOurGenesis,
    #[error("the MS key it carries is not the one the committee before held, or changed")]
    WrongKey,
    #[error("the certificate has no valid signature under the MS key")]
    BadKeySignature,
}

/// The BLAKE3 key-derivation context of [`Configuration::hash`] (pieces of a configuration are
/// checked against the same tree: `ms::pieces`).
pub const CONFIG_HASH_CONTEXT: &str = "dbqsfs 2026-11 configuration";

impl Configuration {
    /// The hash that certificates sign and successors name. Computed over the canonical postcard
    /// encoding, which is deterministic for a given value.
    pub fn hash(&self) -> ConfigHash {
        let bytes = postcard::to_stdvec(self).expect("configurations always encode");
        let mut h = blake3::Hasher::new_derive_key(CONFIG_HASH_CONTEXT);
        h.update(&bytes);
        *h.finalize().as_bytes()
    }

    /// The configuration of `epoch` with `members` (in any order) whose committee is the first
    /// `3f_ms+1` members on the ring.
    pub fn new(
        epoch: Epoch,
        params: Params,
        mut members: Vec<Member>,
        prev: Option<ConfigHash>,
    ) -> Configuration {
        members.sort_by_key(|m| m.id);
        let committee = Configuration::first_members_as_committee(&members, &params);
        Configuration {
            epoch,
            params,
            members,
            committee,
            prev,
            key: None,
        }
    }

    /// Checks the internal rules every configuration must satisfy.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.members.windows(2).all(|w| w[0].id < w[1].id) {
            return Err(ConfigError::MembersNotSorted);
        }
        if let Some(m) = self.members.iter().find(|m| m.key.node_id() != m.id) {
            return Err(ConfigError::BadMemberId(m.id));
        }
        let needed = self.quorum().group_size();
        if self.members.len() < needed {
            return Err(ConfigError::TooFewMembers {
                members: self.members.len(),
                needed,
            });
        }
        let expected = self.params.ms_quorum().group_size();
        let sorted = self.committee.windows(2).all(|w| w[0] < w[1]);
        if self.committee.len() != expected
            || !sorted
            || self.committee.iter().any(|c| self.member(c).is_none())
        {
            return Err(ConfigError::BadCommittee { expected });
        }
        Ok(())
    }

    /// The MS key rules between `prev` and its successor `self`: the sharing `self` carries is
    /// the one `prev`'s committee held, of the MS's threshold, and the key never changes (nor
    /// disappears) once a configuration carried it.
    pub fn check_key(&self, prev: &Configuration) -> Result<(), ConfigError> {
        match (&prev.key, &self.key) {
            (None, None) => Ok(()),
            (Some(_), None) => Err(ConfigError::WrongKey),
            (before, Some(k)) => {
                let shaped = k.epoch == prev.epoch
                    && k.members == prev.committee
                    && k.commitments.len() == prev.params.ms_quorum().quorum();
                let same = before
                    .as_ref()
                    .is_none_or(|b| b.commitments.first() == k.commitments.first());
                if shaped && same {
                    Ok(())
                } else {
                    Err(ConfigError::WrongKey)
                }
            }
        }
    }

    pub fn quorum(&self) -> Quorum {
        self.params.quorum()
    }

    pub fn member(&self, id: &NodeId) -> Option<&Member> {
        self.members
            .binary_search_by(|m| m.id.cmp(id))
            .ok()
            .map(|i| &self.members[i])
    }

    pub fn is_member(&self, id: &NodeId) -> bool {
        self.member(id).is_some()
    }

    /// The replica group of `x`: the `3f+1` successors of `x` on the ring.
    pub fn group(&self, x: &ObjectId) -> Vec<&Member> {
        let n = self.members.len();
        let size = self.quorum().group_size().min(n);
        let start = self.members.partition_point(|m| m.id.0 < x.0);
        (0..size).map(|i| &self.members[(start + i) % n]).collect()
    }

    /// Whether `node` is in the replica group of `x`.
    pub fn is_responsible(&self, node: &NodeId, x: &ObjectId) -> bool {
        self.group(x).iter().any(|m| m.id == *node)
    }

    /// A deterministic default committee: the first `3f_ms+1` members on the ring.
    pub fn first_members_as_committee(members: &[Member], params: &Params) -> Vec<NodeId> {
        members
            .iter()
            .take(params.ms_quorum().group_size())
            .map(|m| m.id)
            .collect()
    }
}

/// What certifies a configuration hash: the signatures of the committee before, or, once the
/// configuration before carries the MS key, one signature under it. Users only call
/// [`CertifiedConfig::verify_successor`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Certificate {
    /// Committee members' signatures: the certificate of a configuration whose predecessor
    /// carries no MS key (the first ones).
    pub signatures: Vec<(NodeId, Signature)>,
    /// One signature under the MS key: the certificate of a configuration whose predecessor
    /// carries the key (`ms::threshold`).
    pub threshold: Option<Signature>,
}

/// A configuration with the certificate that lets anyone holding its predecessor accept it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertifiedConfig {
    pub config: Configuration,
    pub cert: Certificate,
}

impl CertifiedConfig {
    /// The genesis configuration, which needs no certificate: it is trusted by its hash.
    pub fn genesis(config: Configuration) -> CertifiedConfig {
        CertifiedConfig {
            config,
            cert: Certificate::default(),
        }
    }

    /// Certifies `config` with the signatures of `signers` (committee members of the previous epoch).
    pub fn certify(config: Configuration, signers: &[&Keypair]) -> CertifiedConfig {
        let h = config.hash();
        let signatures = signers
            .iter()
            .map(|k| (k.node_id(), k.sign(Domain::Configuration, &h)))
            .collect();
        CertifiedConfig {
            config,
            cert: Certificate {
                signatures,
                threshold: None,
            },
        }
    }

    /// Accepts `self` as the configuration that follows `prev`: the epoch follows, the predecessor
    /// hash matches, the configuration is well-formed, and `2f_ms+1` distinct members of `prev`'s
    /// committee signed its hash.
    pub fn verify_successor(&self, prev: &Configuration) -> Result<(), ConfigError> {
        let c = &self.config;
        if c.epoch != prev.epoch + 1 {
            return Err(ConfigError::WrongEpoch {
                prev: prev.epoch,
                got: c.epoch,
            });
        }
        if c.prev != Some(prev.hash()) {
            return Err(ConfigError::WrongPredecessor);
        }
        c.validate()?;
        c.check_key(prev)?;
        self.cert.verify_for(&c.hash(), prev)
    }
}

impl Certificate {
    /// Whether `2f_ms+1` distinct members of `prev`'s committee signed `hash` (the hash of the
    /// configuration that follows `prev`). Lets a node check a configuration's hash before it
    /// holds the configuration (a transfer in pieces).
    ///
    /// Once `prev` carries the MS key, the certificate is one signature under that key instead:
    /// one verification, whatever the epoch.
    pub fn verify_for(&self, hash: &ConfigHash, prev: &Configuration) -> Result<(), ConfigError> {
        if let Some(key) = ms_key(prev) {
            return verify_under_key(key, Domain::Configuration, hash, self.threshold.as_ref());
        }
        let mut signers = BTreeSet::new();
        for (id, sig) in &self.signatures {
            if !prev.committee.contains(id) || signers.contains(id) {
                continue;
            }
            let Some(m) = prev.member(id) else { continue };
            if m.key.verify(Domain::Configuration, hash, sig).is_ok() {
                signers.insert(*id);
            }
        }
        let needed = prev.params.ms_quorum().quorum();
        if signers.len() < needed {
            return Err(ConfigError::NotEnoughSignatures {
                valid: signers.len(),
                needed,
            });
        }
        Ok(())
    }
}

/// The MS key `config` carries, if it carries one: certificates of and about it are then one
/// signature under that key.
fn ms_key(config: &Configuration) -> Option<&[u8; 32]> {
    config.key.as_ref().and_then(|k| k.commitments.first())
}

/// Accepts `sig` only if it is a signature under the MS key `key` over `body` in `domain`.
fn verify_under_key(
    key: &[u8; 32],
    domain: Domain,
    body: &[u8],
    sig: Option<&Signature>,
) -> Result<(), ConfigError> {
    match sig {
        Some(sig) if PublicKey(*key).verify(domain, body, sig).is_ok() => Ok(()),
        _ => Err(ConfigError::BadKeySignature),
    }
}

/// "Epoch `epoch` (the configuration with hash `config`) is current as of `time_ms`", signed by
/// that epoch's committee: once the configuration carries the MS key, by the key itself (one
/// signature, made with FROST by `2f_ms+1` shares, `ms::threshold`); before (genesis), by
/// `2f_ms+1` members. A client uses a configuration only while it holds such a certificate
/// younger than its lease, so a partitioned or misled client cannot keep talking to an old group
/// whose members may have been corrupted after they left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freshness {
    pub epoch: Epoch,
    pub config: ConfigHash,
    /// Milliseconds since the Unix epoch, on the committee's (loosely synchronised) clocks.
    pub time_ms: u64,
    /// Members' signatures (a configuration without the MS key).
    pub signatures: Vec<(NodeId, Signature)>,
    /// The signature under the MS key (a configuration that carries it).
    pub threshold: Option<Signature>,
}

impl Freshness {
    /// What a freshness certificate signs (in [`Domain::Freshness`]).
    pub fn body(epoch: Epoch, config: &ConfigHash, time_ms: u64) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[..8].copy_from_slice(&epoch.to_le_bytes());
        b[8..40].copy_from_slice(config);
        b[40..].copy_from_slice(&time_ms.to_le_bytes());
        b
    }

    /// A committee member's signature share: `config` is current at `time_ms`.
    pub fn sign_share(me: &Keypair, config: &Configuration, time_ms: u64) -> Signature {
        me.sign(
            Domain::Freshness,
            &Self::body(config.epoch, &config.hash(), time_ms),
        )
    }

    /// Whether `sig` is `signer`'s valid share for `config` at `time_ms`, and `signer` is a member
    /// of `config`'s committee.
    pub fn verify_share(
        config: &Configuration,
        time_ms: u64,
        signer: &NodeId,
        sig: &Signature,
    ) -> bool {
        config.committee.contains(signer)
            && config.member(signer).is_some_and(|m| {
                m.key
                    .verify(
                        Domain::Freshness,
                        &Self::body(config.epoch, &config.hash(), time_ms),
                        sig,
                    )
                    .is_ok()
            })
    }

    /// The certificate made of `shares` (member, signature) for `config` at `time_ms`.
    pub fn assemble(
        config: &Configuration,
        time_ms: u64,
        shares: Vec<(NodeId, Signature)>,
    ) -> Freshness {
        Freshness {
            epoch: config.epoch,
            config: config.hash(),
            time_ms,
            signatures: shares,
            threshold: None,
        }
    }

    /// The certificate of `config` at `time_ms` made of the MS key's signature `sig`.
    pub fn under_key(config: &Configuration, time_ms: u64, sig: Signature) -> Freshness {
        Freshness {
            epoch: config.epoch,
            config: config.hash(),
            time_ms,
            signatures: Vec::new(),
            threshold: Some(sig),
        }
    }

    /// Accepts the certificate for `config`: same epoch and hash, and signed by the MS key if
    /// `config` carries it (one verification; members' signatures are then refused), or else by
    /// `2f_ms+1` distinct members of `config`'s committee.
    pub fn verify(&self, config: &Configuration) -> Result<(), ConfigError> {
        if self.epoch != config.epoch || self.config != config.hash() {
            return Err(ConfigError::WrongPredecessor);
        }
        let body = Self::body(self.epoch, &self.config, self.time_ms);
        if let Some(key) = ms_key(config) {
            return verify_under_key(key, Domain::Freshness, &body, self.threshold.as_ref());
        }
        let mut signers = BTreeSet::new();
        for (id, sig) in &self.signatures {
            if !config.committee.contains(id) || signers.contains(id) {
                continue;
            }
            let Some(m) = config.member(id) else { continue };
            if m.key.verify(Domain::Freshness, &body, sig).is_ok() {
                signers.insert(*id);
            }
        }
        let needed = config.params.ms_quorum().quorum();
        if signers.len() < needed {
            return Err(ConfigError::NotEnoughSignatures {
                valid: signers.len(),
                needed,
            });
        }
        Ok(())
    }
}

/// The verified configurations a node or client knows, from genesis (or a trusted base) up to the
/// newest. Every configuration in the chain was verified against its predecessor. Configurations
/// are shared, not copied, between clones of a chain (drivers hand copies of theirs around), so a
/// clone costs a reference count per epoch, not the configurations' size.
#[derive(Clone, Debug)]
pub struct ConfigChain {
    configs: BTreeMap<Epoch, Arc<CertifiedConfig>>,
}

impl ConfigChain {
    /// A chain that starts from a trusted configuration (genesis, whose hash is the cluster id, or a
    /// configuration read back from the node's own disk).
    pub fn new(trusted: CertifiedConfig) -> Result<ConfigChain, ConfigError> {
        trusted.config.validate()?;
        let mut configs = BTreeMap::new();
        configs.insert(trusted.config.epoch, Arc::new(trusted));
        Ok(ConfigChain { configs })
    }

    pub fn current(&self) -> &CertifiedConfig {
        self.configs
            .values()
            .next_back()
            .map(|c| &**c)
            .expect("a chain is never empty")
    }

    pub fn config(&self) -> &Configuration {
        &self.current().config
    }

    pub fn epoch(&self) -> Epoch {
        self.config().epoch
    }

    pub fn get(&self, epoch: Epoch) -> Option<&CertifiedConfig> {
        self.configs.get(&epoch).map(|c| &**c)
    }

    /// Every configuration of the chain, oldest first.
    pub fn all(&self) -> Vec<CertifiedConfig> {
        self.configs.values().map(|c| (**c).clone()).collect()
    }

    /// The configurations after `epoch`, oldest first, at most `limit` of them.
    pub fn after(&self, epoch: Epoch, limit: usize) -> Vec<CertifiedConfig> {
        self.configs
            .range(epoch + 1..)
            .take(limit)
            .map(|(_, c)| (**c).clone())
            .collect()
    }

    /// Verifies and appends every configuration of `newer` that extends the chain, in epoch order.
    /// Configurations the chain already has are skipped. Returns the epochs added; stops at the first
    /// configuration that does not verify and reports why, keeping what was added before it.
    pub fn extend(&mut self, mut newer: Vec<CertifiedConfig>) -> Result<Vec<Epoch>, ConfigError> {
        newer.sort_by_key(|c| c.config.epoch);
        let mut added = Vec::new();
        for c in newer {
            let e = c.config.epoch;
            if e <= self.epoch() {
                continue;
            }
            c.verify_successor(self.config())?;
            self.configs.insert(e, Arc::new(c));
            added.push(e);
        }
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u8) -> Vec<Keypair> {
        (0..n).map(|i| Keypair::from_seed([i + 1; 32])).collect()
    }

    fn config(epoch: Epoch, ks: &[Keypair], prev: Option<ConfigHash>) -> Configuration {
        let members = ks
            .iter()
            .map(|k| Member::new(k.public(), "127.0.0.1:1"))
            .collect();
        Configuration::new(epoch, Params::with_f(1), members, prev)
    }

    fn signers<'a>(c: &Configuration, ks: &'a [Keypair]) -> Vec<&'a Keypair> {
        ks.iter()
            .filter(|k| c.committee.contains(&k.node_id()))
            .collect()
    }

    #[test]
    fn group_is_the_3f_plus_1_successors_on_the_ring() {
        let ks = keys(6);
        let c = config(0, &ks, None);
        let ids: Vec<NodeId> = c.members.iter().map(|m| m.id).collect();
        // An object just after member 4 wraps around the ring: members 5, 0, 1, 2.
        let mut x = ids[4].0;
        x[31] = x[31].wrapping_add(1);
        let g: Vec<NodeId> = c.group(&ObjectId(x)).iter().map(|m| m.id).collect();
        assert_eq!(g, vec![ids[5], ids[0], ids[1], ids[2]]);
        // An object equal to a member's id starts at that member.
        let g: Vec<NodeId> = c.group(&ObjectId(ids[1].0)).iter().map(|m| m.id).collect();
        assert_eq!(g, vec![ids[1], ids[2], ids[3], ids[4]]);
    }

    #[test]
    fn a_chain_accepts_a_certified_successor_and_refuses_forgeries() {
        let ks = keys(5);
        let g = config(0, &ks[..4], None);
        let mut chain = ConfigChain::new(CertifiedConfig::genesis(g.clone())).unwrap();
        let next = config(1, &ks, Some(g.hash()));
        let committee = signers(&g, &ks);

        // Under-signed: 2 of 4 committee signatures.
        let weak = CertifiedConfig::certify(next.clone(), &committee[..2]);
        assert_eq!(
            weak.verify_successor(&g),
            Err(ConfigError::NotEnoughSignatures {
                valid: 2,
                needed: 3
            })
        );
        // The same signer three times counts once.
        let dup =
            CertifiedConfig::certify(next.clone(), &[committee[0], committee[0], committee[0]]);
        assert!(dup.verify_successor(&g).is_err());
        // Signed by a non-member of the committee.
        let outsider = Keypair::from_seed([99; 32]);
        let forged =
            CertifiedConfig::certify(next.clone(), &[&outsider, committee[0], committee[1]]);
        assert!(forged.verify_successor(&g).is_err());
        // Tampered after signing.
        let mut tampered = CertifiedConfig::certify(next.clone(), &committee[..3]);
        tampered.config.params.f = 0;
        assert!(tampered.verify_successor(&g).is_err());
        // Wrong predecessor.
        let wrong = CertifiedConfig::certify(config(1, &ks, Some([0; 32])), &committee[..3]);
        assert_eq!(
            wrong.verify_successor(&g),
            Err(ConfigError::WrongPredecessor)
        );

        let good = CertifiedConfig::certify(next, &committee[..3]);
        assert_eq!(chain.extend(vec![good]).unwrap(), vec![1]);
        assert_eq!(chain.epoch(), 1);
        assert_eq!(chain.after(0, 10).len(), 1);
    }

    #[test]
    fn validation_refuses_malformed_configurations() {
        let ks = keys(4);
        let mut c = config(0, &ks, None);
        assert_eq!(c.validate(), Ok(()));
        c.members.swap(0, 1);
        assert_eq!(c.validate(), Err(ConfigError::MembersNotSorted));
        let c3 = config(0, &ks[..3], None);
        assert!(matches!(
            c3.validate(),
            Err(ConfigError::TooFewMembers { .. })
        ));
    }
}
