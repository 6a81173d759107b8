//! Carrying out what the collector ([`super::super::collector`]) asks: the questions to the new
//! groups over the one send path, deletions on the blocking pool (persisted once carried out),
//! and progress in the status.

use super::super::collector::Effect;
use super::*;

impl Worker {
    /// Hands every running collection the configurations installed after the newest it learned,
    /// so that a later group can confirm what the first never will ([`dbqsfs_core::dbqs::gc::Gc::learn`]).
    pub(super) fn gc_learn(&mut self) {
        for (e, learned) in self.gc.learned() {
            let later: Vec<Configuration> = {
                let r = self.lock_replica();
                (learned + 1..=r.epoch())
                    .filter_map(|x| r.chain().get(x).map(|c| c.config.clone()))
                    .collect()
            };
            if !later.is_empty() {
                self.gc.learn(e, &later);
            }
        }
        self.run_gc();
    }

    /// Starts the garbage collection of what the node lost on entering `e` (it is ready in `e`),
    /// unless it runs or is done; arcs collected already (before a restart) are skipped.
    pub(super) fn start_gc(&mut self, e: Epoch) {
        if !self.gc.wants(e) {
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
        let now = self.now_ms();
        self.gc.start(now, &prev, &next, &self.me, &collected, opts);
        self.run_gc();
    }

    /// Carries out the collector's effects, in order.
    pub(super) fn run_gc(&mut self) {
        while let Some(effect) = self.gc.poll() {
            match effect {
                Effect::Ask {
                    epoch,
                    gen,
                    to,
                    dest,
                    bytes,
                } => self.dispatch(to, dest, bytes, move |reply, _| Event::GcReply {
                    epoch,
                    gen,
                    from: to,
                    reply,
                }),
                Effect::Delete { epoch, arc } => self.delete_lost(epoch, arc),
                Effect::Progress {
                    epoch,
                    deleted,
                    running,
                } => {
                    let mut gc = self
                        .handle
                        .shared
                        .gc
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    let s = gc.entry(epoch).or_insert((true, 0));
                    s.0 = running;
                    s.1 += deleted;
                }
            }
        }
    }

    /// Deletes `arc`, lost on entering `epoch`, through the replica (which re-checks every object),
    /// then persists it collected; on the blocking pool.
    fn delete_lost(&self, epoch: Epoch, arc: RingArc) {
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
}
