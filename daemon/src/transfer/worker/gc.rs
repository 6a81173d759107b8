//! The driver of the collection of lost ranges ([`Gc`]): questions to the new groups, deletions
//! on the blocking pool, persisted once carried out.

use super::*;

/// One garbage collection in progress.
pub(super) struct GcRun {
    pub(super) gen: u64,
    pub(super) g: Gc,
    /// The new groups' addresses (members of the epoch and of the later ones it learned).
    pub(super) addrs: BTreeMap<NodeId, (SocketAddr, VerifyingKey)>,
    /// Deletions issued and not yet carried out (retried on failure).
    pub(super) deleting: usize,
    pub(super) deleted: u64,
    pub(super) started: Instant,
}

impl Worker {
    /// Hands every running collection the configurations installed after its epoch, so that a
    /// later group can confirm what the first never will ([`Gc::learn`]), and asks them.
    pub(super) fn gc_learn(&mut self) {
        let running: Vec<Epoch> = self.gcs.keys().copied().collect();
        for e in running {
            let later: Vec<Configuration> = {
                let r = self.lock_replica();
                let learned = self.gcs.get(&e).map_or(e, |run| run.g.learned());
                (learned + 1..=r.epoch())
                    .filter_map(|x| r.chain().get(x).map(|c| c.config.clone()))
                    .collect()
            };
            if later.is_empty() {
                continue;
            }
            if let Some(run) = self.gcs.get_mut(&e) {
                for config in &later {
                    run.g.learn(config);
                    run.addrs.extend(source_addrs(config));
                }
            }
            self.drain_gc(e);
        }
    }

    /// Starts the garbage collection of what the node lost on entering `e` (it is ready in `e`),
    /// unless it runs or is done; arcs collected already (before a restart) are skipped.
    pub(super) fn start_gc(&mut self, e: Epoch) {
        if e == 0 || self.gcs.contains_key(&e) || self.gc_done.contains(&e) {
            return;
        }
        let (prev, next, collected) = {
            let r = self.lock_replica();
            if !r.ready_at(e) {
                return;
            }
            let get = |x: Epoch| r.chain().get(x).map(|c| c.config.clone());
            (get(e - 1), get(e), r.collected_in(e).to_vec())
        };
        let (Some(prev), Some(next)) = (prev, next) else {
            return;
        };
        #[allow(clippy::needless_update)]
        let opts = GcOptions {
            retransmit_ms: self.opts.retransmit.as_millis().max(1) as u64,
            first_request_id: random_u64(),
            ..GcOptions::default()
        };
        let mut g = Gc::new(&prev, &next, &self.me, &collected, opts);
        let (_, units) = g.progress();
        if units == 0 {
            self.gc_done.insert(e);
            return;
        }
        info!(
            epoch = e,
            arcs = units,
            "garbage collection of lost ranges started"
        );
        let gen = self.next_gen;
        self.next_gen += 1;
        g.start(self.now_ms());
        self.gcs.insert(
            e,
            GcRun {
                gen,
                g,
                addrs: source_addrs(&next),
                deleting: 0,
                deleted: 0,
                started: Instant::now(),
            },
        );
        self.gc_publish(e, 0);
        self.drain_gc(e);
    }

    /// Carries out what collection `e` asks: questions (dropped beyond the bound: the machine asks
    /// again), deletions on the blocking pool.
    pub(super) fn drain_gc(&mut self, e: Epoch) {
        let mut outs = Vec::new();
        let gen = match self.gcs.get_mut(&e) {
            Some(run) => {
                while let Some(out) = run.g.poll_output() {
                    outs.push(out);
                }
                run.gen
            }
            None => return,
        };
        for out in outs {
            match out {
                GcOutput::Send { to, bytes } => {
                    if self.gc_inflight >= self.opts.max_requests.max(1) {
                        continue;
                    }
                    self.send_gc(e, gen, to, bytes);
                }
                GcOutput::Delete { epoch, arc } => {
                    if let Some(run) = self.gcs.get_mut(&e) {
                        run.deleting += 1;
                    }
                    self.delete_lost(epoch, arc);
                }
                GcOutput::Complete { .. } => {}
            }
        }
        self.gc_finish(e);
    }

    /// Ends collection `e` once its machine is complete and every deletion is carried out.
    pub(super) fn gc_finish(&mut self, e: Epoch) {
        let Some(run) = self.gcs.get(&e) else { return };
        if !run.g.is_complete() || run.deleting > 0 {
            return;
        }
        if let Some(run) = self.gcs.remove(&e) {
            info!(
                epoch = e,
                objects_deleted = run.deleted,
                secs = format!("{:.2}", run.started.elapsed().as_secs_f64()),
                "garbage collection complete"
            );
        }
        self.gc_done.insert(e);
        if let Some(s) = self
            .handle
            .shared
            .gc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&e)
        {
            s.0 = false;
        }
    }

    /// Counts `deleted` objects for collection `e` in the status (and marks it running).
    pub(super) fn gc_publish(&self, e: Epoch, deleted: u64) {
        let mut gc = self
            .handle
            .shared
            .gc
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let s = gc.entry(e).or_insert((true, 0));
        s.1 += deleted;
    }

    /// Deletes `arc`, lost on entering `epoch`, through the replica (which re-checks every object),
    /// then persists it collected; on the blocking pool.
    pub(super) fn delete_lost(&self, epoch: Epoch, arc: RingArc) {
        let store = self.store.clone();
        let replica = self.replica.clone();
        let events = self.events.clone();
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || {
                // Recorded under the write lock (from then on the range is answered `Gone` and no
                // late transfer stores into it), deleted under the read lock, a page at a time:
                // requests are served while the files go, an install waits for one page at most,
                // and while clients are served the deletion pauses between pages.
                replica
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .note_collected(epoch, arc);
                let (mut deleted, mut after) = (0, None);
                loop {
                    let (page, next) = replica
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .delete_collected_page(epoch, arc, after, GC_PAGE)?;
                    deleted += page.len();
                    match next {
                        Some(n) => after = Some(n),
                        None => break,
                    }
                    if handle.clients_active() {
                        std::thread::sleep(GC_PAUSE_UNDER_LOAD);
                    }
                }
                store.add_gc_collected(epoch, arc)?;
                Ok(deleted)
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(format!("delete task: {e}"))));
            let _ = events.send(Event::GcDeleted { epoch, arc, result });
        });
    }

    pub(super) fn send_gc(&mut self, epoch: Epoch, gen: u64, to: NodeId, bytes: Vec<u8>) {
        self.gc_inflight += 1;
        let dest = self.gcs.get(&epoch).and_then(|r| r.addrs.get(&to).copied());
        self.dispatch(to, dest, bytes, move |reply, _| Event::GcReply {
            epoch,
            gen,
            from: to,
            reply,
        });
    }
}
