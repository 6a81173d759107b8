//! A node's part in the MS's threshold key, as the node's MS machine and the agreement simulator
//! drive it: the round each configuration makes ([`key_round`]), the node's deal when it is a
//! dealer of that round, its complaints and its share when it is a receiver, and the shares it
//! holds and persists.
//!
//! Goals: a node deals at most once per round, and the same deal after a restart (its randomness
//! is drawn from its key and the round: [`XofRng`]); a receiver checks every deal ordered for it
//! and computes its share again whenever the qualified dealers change; shares no round needs any
//! more are erased from memory and from what the driver persists.
//!
//! Non-goals: ordering the operations (the agreement) and applying them (the epoch's
//! `Membership`, whose [`Transcript`] this reads).
//!
//! Fault model: the transcript refuses what Byzantine dealers and receivers send; what this
//! reads of it is what every correct member reads.

use super::{
    deal, recover_share, Holder, KeyOp, KeyShare, Round, RoundDeals, SealKey, Transcript, XofRng,
};
use crate::config::{Configuration, Epoch};
use crate::crypto::{Keypair, NodeId};
use std::collections::{BTreeMap, BTreeSet};

/// The round that moves the MS key to `config`'s committee (each member's seal key is its node
/// key): from the committee whose sharing `config` carries, or a fresh generation among the
/// committee when it carries none.
pub fn key_round(config: &Configuration) -> Round {
    let receivers = config
        .committee
        .iter()
        .filter_map(|id| config.member(id))
        .map(|m| (m.id, m.key.0))
        .collect();
    let (dealers, old) = match &config.key {
        Some(shares) => (shares.members.clone(), Some(shares.clone())),
        None => (config.committee.clone(), None),
    };
    Round {
        epoch: config.epoch,
        dealers,
        old,
        receivers,
        threshold: config.params.ms_quorum().quorum(),
    }
}

/// What a node persists of its part in the MS key: its shares (secret) and the qualified deals
/// of the newest rounds it saw (public: what a receiver that missed a round recovers from).
#[derive(Clone, Debug, Default)]
pub struct KeyState {
    pub shares: Vec<KeyShare>,
    pub rounds: Vec<RoundDeals>,
}

/// A node's shares of the MS key and its duties in the rounds that move it.
pub struct KeyMember {
    node: Keypair,
    me: NodeId,
    seal: SealKey,
    holder: Holder,
    /// The round this node last dealt in (in this run; a restart deals the same deal again).
    dealt: Option<Epoch>,
    /// Deals already checked, per round.
    checked: BTreeSet<(Epoch, NodeId)>,
    /// The qualified dealers each held share was computed from.
    computed: BTreeMap<Epoch, Vec<NodeId>>,
    /// The qualified deals of the newest rounds this node saw, for receivers that missed them.
    rounds: BTreeMap<Epoch, RoundDeals>,
    changed: bool,
}

/// Rounds whose qualified deals a node keeps for others.
const ROUNDS_KEPT: usize = 2;

impl KeyMember {
    /// The part of `node`, with what it persisted.
    pub fn new(node: Keypair, restored: KeyState) -> KeyMember {
        let mut holder = Holder::default();
        for share in restored.shares {
            holder.install(share);
        }
        let rounds = restored.rounds.into_iter().map(|r| (r.epoch, r)).collect();
        KeyMember {
            me: node.node_id(),
            seal: SealKey::of_node(&node),
            node,
            holder,
            dealt: None,
            checked: BTreeSet::new(),
            computed: BTreeMap::new(),
            rounds,
            changed: false,
        }
    }

    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// The `keep-old-shares` mutant's switch.
    #[cfg(feature = "mutants")]
    pub fn holder_mut(&mut self) -> &mut Holder {
        &mut self.holder
    }

    /// The node holds `config` as its newest configuration: shares older than the one the round
    /// of `config` deals from are erased, and if this node is a dealer of that round (and holds
    /// the share it deals, or the round generates the key), its deal, once per round.
    pub fn enter(&mut self, config: &Configuration) -> Option<KeyOp> {
        let before = self.holder.held().len();
        self.holder.dealt(config.epoch.saturating_sub(1));
        self.changed |= self.holder.held().len() != before;
        let round = key_round(config);
        if self.dealt.is_some_and(|d| d >= config.epoch) || !round.dealers.contains(&self.me) {
            return None;
        }
        let old = match &round.old {
            Some(public) => Some(self.holder.held().iter().find(|s| s.public == *public)?),
            None => None,
        };
        let mut rng = XofRng::of_node(&self.node, "deal", config.epoch, &[]);
        let d = deal(&round, &self.me, old, &mut rng).ok()?;
        self.dealt = Some(config.epoch);
        Some(KeyOp::Deal(d))
    }

    /// What `round` (as ordered so far) asks of this node as a receiver: a complaint for each
    /// deal whose sub-share for it is wrong; and its share, computed again whenever the qualified
    /// dealers change.
    pub fn sync(&mut self, round: &Transcript) -> Vec<KeyOp> {
        let epoch = round.round().epoch;
        if !round.round().receivers.iter().any(|(r, _)| *r == self.me) {
            return Vec::new();
        }
        let mut ops = Vec::new();
        for dealer in round.dealt() {
            if !self.checked.insert((epoch, dealer)) {
                continue;
            }
            let mut rng = XofRng::of_node(&self.node, "complaint", epoch, &dealer.0);
            if let Ok(Err(complaint)) = round.check(&self.me, &self.seal, &dealer, &mut rng) {
                ops.push(KeyOp::Complaint(complaint));
            }
        }
        if let Some(deals) = round.qualified_deals() {
            if self.rounds.get(&epoch) != Some(&deals) {
                self.rounds.insert(epoch, deals);
                while self.rounds.len() > ROUNDS_KEPT {
                    self.rounds.pop_first();
                }
                self.changed = true;
            }
        }
        if let Some(qualified) = round.qualified_dealers() {
            if self.computed.get(&epoch) != Some(&qualified) {
                if let Ok(share) = round.share(&self.me, &self.seal) {
                    self.holder.install(share);
                    self.computed.insert(epoch, qualified);
                    self.changed = true;
                }
            }
        }
        ops
    }

    /// The qualified deals of the round of `epoch`, if this node saw it qualify.
    pub fn round_deals(&self, epoch: Epoch) -> Option<&RoundDeals> {
        self.rounds.get(&epoch)
    }

    /// The round whose share this node misses though it must deal from it in `config`'s round
    /// (it was a receiver of the round before but did not see it: it was down, cut off, or
    /// behind), and whom to ask for its deals.
    pub fn missing(&self, config: &Configuration) -> Option<(Epoch, Vec<NodeId>)> {
        let public = config.key.as_ref()?;
        if !public.members.contains(&self.me)
            || self.holder.held().iter().any(|s| s.public == *public)
        {
            return None;
        }
        let others = public
            .members
            .iter()
            .filter(|m| **m != self.me)
            .copied()
            .collect();
        Some((public.epoch, others))
    }

    /// Deals of the round `config` carries the sharing of, as another node gave them: the share
    /// is recovered if they make it. Returns whether it was.
    pub fn recover(&mut self, config: &Configuration, deals: &RoundDeals) -> bool {
        let Some(public) = config.key.as_ref() else {
            return false;
        };
        let Some(position) = public.members.iter().position(|m| *m == self.me) else {
            return false;
        };
        match recover_share(public, position, &self.seal, deals) {
            Ok(share) => {
                self.holder.install(share);
                self.changed = true;
                true
            }
            Err(_) => false,
        }
    }

    /// What to persist (replacing what was persisted), if it changed since last asked.
    pub fn take_changed(&mut self) -> Option<KeyState> {
        std::mem::take(&mut self.changed).then(|| KeyState {
            shares: self.holder.held().to_vec(),
            rounds: self.rounds.values().cloned().collect(),
        })
    }
}
