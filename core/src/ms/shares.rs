//! What a committee member collects from the others besides the agreement: freshness shares
//! (assembled into freshness certificates) and signatures over the next configuration (assembled
//! into its certificate), including those that arrive before this member computed it.
//!
//! Goals: a certificate is assembled exactly once, from shares that verify, of members of the
//! right committee; memory stays bounded whatever peers send.
//!
//! Fault model: any share may be forged, for another configuration or time, or repeated; it is
//! checked before it counts.

use super::membership::CertificateCollector;
use crate::config::{CertifiedConfig, ConfigHash, Configuration, Freshness};
use crate::crypto::{Keypair, NodeId, Signature};
use std::collections::BTreeMap;

/// Times whose freshness shares are kept (the newest ones).
const FRESH_TIMES: usize = 8;
/// Signatures over a next configuration kept before this member computed it.
const EARLY_SHARES: usize = 64;

/// Freshness shares of one epoch's committee, per time.
#[derive(Clone, Debug)]
pub struct FreshnessShares {
    config: Configuration,
    by_time: BTreeMap<u64, BTreeMap<NodeId, Signature>>,
}

impl FreshnessShares {
    pub fn new(config: Configuration) -> FreshnessShares {
        FreshnessShares {
            config,
            by_time: BTreeMap::new(),
        }
    }

    /// Adds `signer`'s share for `time_ms` if it verifies; returns the freshness certificate
    /// when this share completes its quorum (once per time).
    pub fn add(&mut self, time_ms: u64, signer: NodeId, sig: Signature) -> Option<Freshness> {
        if !Freshness::verify_share(&self.config, time_ms, &signer, &sig) {
            return None;
        }
        if !self.by_time.contains_key(&time_ms) && self.by_time.len() >= FRESH_TIMES {
            let oldest = *self.by_time.keys().next()?;
            if time_ms < oldest {
                return None;
            }
            self.by_time.remove(&oldest);
        }
        let shares = self.by_time.entry(time_ms).or_default();
        if shares.insert(signer, sig).is_some() {
            return None;
        }
        if shares.len() != self.config.params.ms_quorum().quorum() {
            return None;
        }
        let cert = Freshness::assemble(
            &self.config,
            time_ms,
            shares.iter().map(|(id, s)| (*id, *s)).collect(),
        );
        cert.verify(&self.config).is_ok().then_some(cert)
    }
}

/// The next configuration's certificate, as this member of the ending epoch's committee
/// collects it.
#[derive(Debug, Default)]
pub struct NextConfig {
    collector: Option<CertificateCollector>,
    early: Vec<(NodeId, ConfigHash, Signature)>,
}

impl NextConfig {
    /// Whether this member computed the next configuration (and signed it).
    pub fn ended(&self) -> bool {
        self.collector.is_some()
    }

    /// Another member's signature over the next configuration `hash`: counted if this member
    /// computed it, kept for then otherwise. Returns the certified configuration once complete.
    pub fn share(
        &mut self,
        from: NodeId,
        hash: ConfigHash,
        sig: Signature,
    ) -> Option<CertifiedConfig> {
        match &mut self.collector {
            Some(c) => c.add(from, sig),
            None => {
                if self.early.len() < EARLY_SHARES {
                    self.early.push((from, hash, sig));
                }
                None
            }
        }
    }

    /// The epoch of `prev` ended with `next`: signs it as `me` and counts the signatures that came
    /// early. Returns this member's signature (to send to the others) and the certified
    /// configuration if it is already complete; `None` if it had ended already.
    pub fn end(
        &mut self,
        prev: Configuration,
        next: Configuration,
        me: &Keypair,
    ) -> Option<(Signature, Option<CertifiedConfig>)> {
        if self.collector.is_some() {
            return None;
        }
        let hash = next.hash();
        let mut collector = CertificateCollector::new(prev, next);
        let sig = collector.sign(me);
        let mut done = collector.add(me.node_id(), sig);
        for (from, h, s) in std::mem::take(&mut self.early) {
            if h == hash && done.is_none() {
                done = collector.add(from, s);
            }
        }
        self.collector = Some(collector);
        Some((sig, done))
    }
}
