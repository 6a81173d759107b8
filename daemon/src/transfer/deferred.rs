//! Content blocks deferred for lack of space: stored once space is back.
//!
//! A state transfer into a node whose store is full completes without the content blocks that do
//! not fit above the store's reserve; it records them as deferred (durably, then in the replica,
//! which answers for them as `NotReady`/`NotYet` meanwhile: see `Replica::defer`). This task
//! brings them in later.
//!
//! Goals:
//! - Every [`EVERY`], while the replica defers blocks and the store has room above its reserve,
//!   take up to [`BATCH`] of them, fetch each from the other members of its current group (the
//!   transfer protocol's `Fetch`, which any epoch may ask: a content block proves itself by its
//!   hash, checked here before it is stored), store it, and forget the deferral, durably first.
//! - A block this node is no longer responsible for is forgotten (its new group got it by
//!   transfer), full or not; one that a client wrote again meanwhile is forgotten once held.
//! - Stops at the first refusal for want of space; logs what it stored, not every attempt.
//!
//! Non-goals: deciding that a block does not exist. A deferral is only dropped when the block is
//! held or no longer this node's, so a node never turns "could not store" into "does not exist".
//!
//! Fault model: sources may lie, stall or vanish: every request is bounded in time, every answer
//! verified, and a source that fails is skipped for the next.

use super::{random_u64, source_addrs, SharedReplica};
use crate::store::DiskStore;
use dbqsfs_core::config::{Configuration, Epoch};
use dbqsfs_core::crypto::{NodeId, ObjectId};
use dbqsfs_core::dbqs::transfer::TransferMessage;
use dbqsfs_core::object::check_content;
use dbqsfs_core::store::{Store, StoreError};
use dbqsfs_core::wire::{decode, encode_msg};
use dbqsfs_net::Endpoint;
use ed25519_dalek::VerifyingKey;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often the task looks for deferred blocks to store.
pub const EVERY: Duration = Duration::from_secs(5);
/// Deferred blocks tried per round.
const BATCH: usize = 64;
/// How long one source may take to answer one fetch.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until the node stops (it stops with the transfer worker).
pub async fn run(me: NodeId, store: Arc<DiskStore>, replica: SharedReplica, endpoint: Endpoint) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let round = {
            let r = replica.read().unwrap_or_else(|p| p.into_inner());
            if r.deferred().is_empty() {
                continue;
            }
            let elsewhere = r.deferred_elsewhere();
            let ours = r
                .deferred()
                .iter()
                .filter(|x| !elsewhere.contains(x))
                .take(BATCH)
                .copied()
                .collect();
            Round {
                epoch: r.epoch(),
                config: r.chain().config().clone(),
                elsewhere,
                ours,
                left: r.deferred().len(),
            }
        };
        let full = store.is_full();
        round.run(me, full, &store, &replica, &endpoint).await;
    }
}

struct Round {
    epoch: Epoch,
    config: Configuration,
    /// Deferred blocks no longer this node's (`Replica::deferred_elsewhere`): forgotten.
    elsewhere: Vec<ObjectId>,
    /// A batch of the others: stored if there is room.
    ours: Vec<ObjectId>,
    left: usize,
}

impl Round {
    /// Forgets what is no longer this node's; unless the store is `full`, fetches and stores a
    /// batch of the rest.
    async fn run(
        self,
        me: NodeId,
        full: bool,
        store: &Arc<DiskStore>,
        replica: &SharedReplica,
        endpoint: &Endpoint,
    ) {
        let mut stored = Vec::new();
        let sources = source_addrs(&self.config);
        for id in &self.ours {
            if matches!(store.content_len(id), Ok(Some(_))) {
                stored.push(*id);
                continue;
            }
            if full {
                continue;
            }
            let Some(data) = self.fetch(me, endpoint, &sources, id).await else {
                continue;
            };
            let (s, x) = (store.clone(), *id);
            let put = tokio::task::spawn_blocking(move || s.put_content(&x, &data))
                .await
                .unwrap_or_else(|e| Err(StoreError::Io(format!("write task: {e}"))));
            match put {
                Ok(()) => stored.push(*id),
                Err(StoreError::NoSpace) => break,
                Err(e) => {
                    warn!(error = %e, "storing a deferred block failed; trying again later");
                    break;
                }
            }
        }
        let done: Vec<ObjectId> = stored.iter().chain(&self.elsewhere).copied().collect();
        if done.is_empty() {
            return;
        }
        let s = store.clone();
        let persisted = {
            let done = done.clone();
            tokio::task::spawn_blocking(move || s.remove_deferred(&done))
                .await
                .unwrap_or_else(|e| Err(StoreError::Io(format!("write task: {e}"))))
        };
        if let Err(e) = persisted {
            warn!(error = %e, "cannot record deferred blocks as settled; trying again later");
            return;
        }
        let mut r = replica.write().unwrap_or_else(|p| p.into_inner());
        for id in &done {
            r.undefer(id);
        }
        info!(
            stored = stored.len(),
            no_longer_ours = self.elsewhere.len(),
            still_deferred = self.left.saturating_sub(done.len()),
            "deferred content blocks settled: stored now that space is free, or no longer this node's"
        );
    }

    /// A verified copy of `id` from the first other member of its group that has one.
    async fn fetch(
        &self,
        me: NodeId,
        endpoint: &Endpoint,
        sources: &BTreeMap<NodeId, (SocketAddr, VerifyingKey)>,
        id: &ObjectId,
    ) -> Option<Vec<u8>> {
        let rid = random_u64();
        let request = encode_msg(self.epoch, TransferMessage::Fetch { rid, id: *id });
        for m in self.config.group(id) {
            let Some((addr, key)) = sources.get(&m.id).filter(|_| m.id != me) else {
                continue;
            };
            let answer =
                tokio::time::timeout(REQUEST_TIMEOUT, endpoint.request(*addr, key, &request)).await;
            let bytes = match answer {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    debug!(source = %m.id.short(), error = %e, "fetch of a deferred block failed");
                    continue;
                }
                Err(_) => continue,
            };
            match decode::<TransferMessage>(&bytes).map(|env| env.msg) {
                Ok(TransferMessage::Content {
                    rid: r,
                    id: got,
                    data: Some(data),
                }) if r == rid && got == *id && check_content(id, &data).is_ok() => {
                    return Some(data)
                }
                _ => continue,
            }
        }
        None
    }
}
