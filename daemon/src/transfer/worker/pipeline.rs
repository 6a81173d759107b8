//! A run's outputs carried out in the core's order: the held-block check, store writes (at most
//! `max_concurrent_writes`), and announcements, each made durable only after every write issued
//! before it ([`announce`]).

use super::scheduler::Waiting;
use super::*;

impl Worker {
    /// Feeds the replies held back during a check, until the next check.
    pub(super) fn feed_backlog(&mut self, e: Epoch) {
        loop {
            let now = self.now_ms();
            let Some(r) = self.transfers.get_mut(&e) else {
                return;
            };
            if r.checking {
                return;
            }
            let Some((from, bytes)) = r.backlog.pop_front() else {
                return;
            };
            self.sched.release(1);
            r.t.handle_message(now, from, &bytes);
            self.drain(e);
        }
    }

    /// Carries out what transfer `e` asks, in order, up to a check.
    pub(super) fn drain(&mut self, e: Epoch) {
        let Some(r) = self.transfers.get_mut(&e) else {
            return;
        };
        let gen = r.gen;
        let mut outs = Vec::new();
        while !r.checking {
            let Some(out) = r.t.poll_output() else { break };
            if matches!(out, TransferOutput::Check { .. }) {
                r.checking = true;
            }
            outs.push(out);
        }
        let mut pk: Vec<PkBlock> = Vec::new();
        for out in outs {
            if !matches!(out, TransferOutput::StorePk { .. }) && !pk.is_empty() {
                self.write(e, gen, Write::Pk(std::mem::take(&mut pk)));
            }
            match out {
                TransferOutput::Send { to, bytes, urgent } => {
                    if self.sched.is_down(&to, Instant::now()) {
                        continue; // the machine asks again, elsewhere, at its next timeout
                    }
                    let req = Waiting {
                        epoch: e,
                        gen,
                        bytes,
                    };
                    if urgent {
                        self.sched.push_urgent(to, req);
                        continue;
                    }
                    if let Some(r) = self.transfers.get_mut(&e) {
                        r.queued += 1;
                    }
                    self.sched.push(to, req);
                }
                TransferOutput::Check { ids, released } => self.check(e, gen, ids, released),
                TransferOutput::StoreContent { id, data } => {
                    self.write(e, gen, Write::Content { id, data })
                }
                TransferOutput::StorePk { block } => {
                    if let Some(u) = self
                        .transfers
                        .get_mut(&e)
                        .and_then(|r| r.unit_of(&block.id()))
                    {
                        u.objects_total += 1;
                    }
                    pk.push(block);
                    if pk.len() >= PK_BATCH {
                        self.write(e, gen, Write::Pk(std::mem::take(&mut pk)));
                    }
                }
                // Reference records go in order with the announcements: after every content
                // block of their unit is stored (so a released block is scheduled for deletion
                // once it is there), before the unit is done.
                out @ (TransferOutput::StoreRefs { .. }
                | TransferOutput::UnitDone { .. }
                | TransferOutput::Complete { .. }) => {
                    if let Some(r) = self.transfers.get_mut(&e) {
                        r.announce.push_back((r.next_seq, out));
                    }
                }
            }
        }
        if !pk.is_empty() {
            self.write(e, gen, Write::Pk(pk));
        }
        self.dirty = true;
        self.try_announce(e);
    }

    /// Answers a check from the store, on the blocking pool, by the block files' sizes
    /// ([`DiskStore::content_len`]): held blocks are not read. A node that stays responsible for a
    /// range holds most of it; reading and hashing all of it at every epoch change was about
    /// 1.4 GB per node in the transfer benchmark.
    pub(super) fn check(
        &mut self,
        e: Epoch,
        gen: u64,
        ids: Vec<ObjectId>,
        released: BTreeSet<ObjectId>,
    ) {
        if let Some(r) = self.transfers.get_mut(&e) {
            if let Some(u) = ids.first().and_then(|id| r.unit_of(id)) {
                if u.phase == UnitPhase::Listing {
                    u.phase = UnitPhase::Fetching;
                }
            }
            for id in &ids {
                if let Some(u) = r.unit_of(id) {
                    u.objects_total += 1;
                }
            }
        }
        let store = self.store.clone();
        let replica = self.replica.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let held = tokio::task::spawn_blocking(move || {
                let mut held = Vec::new();
                for id in ids {
                    if let Some(len) = store.content_len(&id)? {
                        held.push((id, len));
                    } else if replica
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .transfer_skips(&id, released.contains(&id))?
                    {
                        // Deferred for lack of space (fetched by `deferred::refetch` once there
                        // is room), or deleted after its release: not fetched again.
                        held.push((id, 0));
                    }
                }
                Ok(held)
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(format!("check task: {e}"))));
            let _ = events.send(Event::Checked {
                epoch: e,
                gen,
                held,
            });
        });
    }

    /// Writes on the blocking pool, at most `max_concurrent_writes` at once.
    pub(super) fn write(&mut self, e: Epoch, gen: u64, w: Write) {
        let Some(r) = self.transfers.get_mut(&e) else {
            return;
        };
        let seq = r.next_seq;
        r.next_seq += 1;
        r.writes.insert(seq);
        self.pending_writes += 1;
        let (objects, fetched) = match &w {
            Write::Content { id, data } => (vec![(*id, data.len() as u64)], true),
            Write::Pk(blocks) => (
                blocks
                    .iter()
                    .map(|b| (b.id(), (b.value.len() + b.label.len()) as u64))
                    .collect(),
                false,
            ),
        };
        let store = self.store.clone();
        let replica = self.replica.clone();
        let slots = self.write_slots.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            // The semaphore is never closed; without a permit the write still runs.
            let _permit = slots.acquire_owned().await.ok();
            let result = tokio::task::spawn_blocking(move || {
                // Under the replica's read lock, so no collection runs between the check and the
                // write: what a late transfer brings of a range collected since is not stored again.
                let r = replica.read().unwrap_or_else(|p| p.into_inner());
                match w {
                    Write::Content { id, data } => {
                        if !r.accepts_transferred(e, &id) {
                            return Ok(None);
                        }
                        match store.put_content(&id, &data) {
                            // A full store goes on without the block, and says so durably.
                            Err(StoreError::NoSpace) => {
                                store.add_deferred(&[id]).map(|()| Some(id))
                            }
                            other => other.map(|()| None),
                        }
                    }
                    Write::Pk(mut blocks) => {
                        blocks.retain(|b| r.accepts_transferred(e, &b.id()));
                        if blocks.is_empty() {
                            Ok(None)
                        } else {
                            store.put_pk_many(&blocks).map(|()| None)
                        }
                    }
                }
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(format!("write task: {e}"))));
            let _ = events.send(Event::Written {
                epoch: e,
                gen,
                seq,
                objects,
                fetched,
                result,
            });
        });
    }

    /// Persists and applies the next announcement of `e` once every write before it is durable.
    pub(super) fn try_announce(&mut self, e: Epoch) {
        let Some(r) = self.transfers.get_mut(&e) else {
            return;
        };
        if r.announcing {
            return;
        }
        let Some((barrier, _)) = r.announce.front() else {
            return;
        };
        if r.writes.first().is_some_and(|first| first < barrier) {
            return;
        }
        let Some((_, what)) = r.announce.pop_front() else {
            return;
        };
        r.announcing = true;
        let gen = r.gen;
        let store = self.store.clone();
        let replica = self.replica.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let w = what.clone();
            let result = tokio::task::spawn_blocking(move || announce(&store, &replica, e, &w))
                .await
                .unwrap_or_else(|e| Err(StoreError::Io(format!("announce task: {e}"))));
            let _ = events.send(Event::Announced {
                epoch: e,
                gen,
                what,
                result,
            });
        });
    }
}
