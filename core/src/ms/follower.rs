//! A node's following of the epochs: how certified configurations reach it, and whom it passes
//! them on to (docs/DESIGN.md §3, "Dissemination").
//!
//! Goals: every node, member or not, correct members' silence or a Byzantine parent in the push
//! tree notwithstanding, learns each new configuration within about one pull period of its
//! certification, and nobody sends a configuration to all.
//! - Push: the committee that certified a configuration pushes it to the root of the push tree
//!   ([`super::tree`]); a node that entered a newer epoch forwards every configuration after the
//!   epoch it was in to its two children in the newest one's tree.
//! - Pull: every period a node asks one other member of its newest configuration, a random one of
//!   the healthiest (a member that failed lately is asked last), for the configurations after its
//!   epoch. A pull that fails is asked of another member at once, at most [`PULL_RETRIES`] times
//!   per period. A message of a later epoch's agreement makes the node pull from its sender.
//!
//! Non-goals: checking what arrives (a configuration is installed only if its certificate chains
//! to what the node holds: [`crate::config::ConfigChain`]), sending, and the clock and randomness
//! (the driver passes `now` and a random rotation).
//!
//! Fault model: any other node may be silent, slow or lying; what it sends is checked on install,
//! and one that fails to answer is asked last for a while.

use super::tree::push_children;
use crate::config::{Configuration, Epoch};
use crate::crypto::NodeId;
use crate::dbqs::health::Health;

/// Pulls asked of another member at once after a failed one, per period.
pub const PULL_RETRIES: u32 = 2;

/// What the driver does for the follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FollowAction {
    /// Ask `to` for the certified configurations after `after` (`MsMessage::DeltasAfter`).
    Pull { to: NodeId, after: Epoch },
    /// Send `to` the configurations after `after` that this node holds (as deltas:
    /// `MsMessage::PushDeltas`).
    Forward { to: Vec<NodeId>, after: Epoch },
}

/// A node's following of the epochs.
#[derive(Clone, Debug)]
pub struct Follower {
    me: NodeId,
    period_ms: u64,
    /// The newest epoch this node entered (and forwarded).
    epoch: Epoch,
    next_pull: u64,
    /// The member of the last periodic pull (or its retry), until it answers or fails.
    pulling: Option<NodeId>,
    retries: u32,
    health: Health,
}

impl Follower {
    /// A follower of node `me`, in `epoch`, pulling every `period_ms` (the first pull at once).
    pub fn new(me: NodeId, epoch: Epoch, period_ms: u64, now: u64) -> Follower {
        Follower {
            me,
            period_ms: period_ms.max(1),
            epoch,
            next_pull: now,
            pulling: None,
            retries: 0,
            health: Health::new(),
        }
    }

    /// The newest epoch entered.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// When [`Follower::on_timer`] pulls next.
    pub fn next_timer(&self) -> u64 {
        self.next_pull
    }

    /// The node installed `config`, the newest it holds: if it is newer than the epoch it was in,
    /// the configurations after that one go to its children in `config`'s push tree.
    pub fn entered(&mut self, config: &Configuration) -> Option<FollowAction> {
        if config.epoch <= self.epoch {
            return None;
        }
        let after = self.epoch;
        self.epoch = config.epoch;
        let to: Vec<NodeId> = push_children(config, &self.me)
            .into_iter()
            .map(|m| m.id)
            .collect();
        (!to.is_empty()).then_some(FollowAction::Forward { to, after })
    }

    /// The periodic pull, when due: from one of the healthiest other members of `config` (the
    /// newest configuration held), `rotate` choosing among equals.
    pub fn on_timer(
        &mut self,
        now: u64,
        config: &Configuration,
        rotate: u64,
    ) -> Option<FollowAction> {
        if now < self.next_pull {
            return None;
        }
        self.next_pull = now.saturating_add(self.period_ms);
        self.retries = 0;
        self.pull(now, config, rotate, None)
    }

    /// `from` answered a request of ours.
    pub fn answered(&mut self, from: NodeId, now: u64) {
        self.health.good(from, now);
        if self.pulling == Some(from) {
            self.pulling = None;
        }
    }

    /// A request of ours to `from` failed (no connection, no answer in time, an undecodable one):
    /// if it was the pull, another member is asked now, rather than a whole period later.
    pub fn failed(
        &mut self,
        from: NodeId,
        now: u64,
        config: &Configuration,
        rotate: u64,
    ) -> Option<FollowAction> {
        self.health.failed(from, now);
        if self.pulling != Some(from) {
            return None;
        }
        self.pulling = None;
        if self.retries >= PULL_RETRIES {
            return None;
        }
        self.retries += 1;
        self.pull(now, config, rotate, Some(from))
    }

    /// `from` sent a message of `epoch`'s agreement: if that epoch is newer than ours, `from`
    /// holds configurations we lack.
    pub fn saw_epoch(&mut self, from: NodeId, epoch: Epoch) -> Option<FollowAction> {
        (epoch > self.epoch && from != self.me).then_some(FollowAction::Pull {
            to: from,
            after: self.epoch,
        })
    }

    fn pull(
        &mut self,
        now: u64,
        config: &Configuration,
        rotate: u64,
        not: Option<NodeId>,
    ) -> Option<FollowAction> {
        let others: Vec<NodeId> = config
            .members
            .iter()
            .map(|m| m.id)
            .filter(|id| *id != self.me && Some(*id) != not)
            .collect();
        let to = *self
            .health
            .order(&others, (rotate % others.len().max(1) as u64) as usize, now)
            .first()?;
        self.pulling = Some(to);
        Some(FollowAction::Pull {
            to,
            after: self.epoch,
        })
    }
}
