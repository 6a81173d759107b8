//! The worker task: one loop over its events, the runs of transfers into epochs and of
//! garbage collections, and their timers. Its rooms: [`pipeline`] (a unit's objects through
//! checks, store writes and durable announcements, in that order), [`requests`] (sending what
//! the scheduler, [`super::scheduler`], lets go, and what a source found down means for the
//! machines), [`gc`] (carrying out what the collector of lost ranges, [`super::collector`], asks)
//! and [`status`] (progress for `dbqsfs status` and the log).

mod gc;
mod pipeline;
mod requests;
mod status;

use super::collector::Collector;
use super::scheduler::Scheduler;
use super::view::arc_name;
use super::*;

/// One transfer in progress.
struct Running {
    /// Distinguishes this run from an abandoned one of the same epoch (whose events are ignored).
    gen: u64,
    t: Transfer,
    /// The sources' addresses (members of the previous configuration).
    addrs: BTreeMap<NodeId, (SocketAddr, VerifyingKey)>,
    units: Vec<UnitStats>,
    started: Instant,
    /// A [`TransferOutput::Check`] is being answered: nothing else is fed to the machine.
    checking: bool,
    /// Replies that arrived meanwhile.
    backlog: VecDeque<(NodeId, Vec<u8>)>,
    /// Store writes: the next sequence number and those not finished.
    next_seq: u64,
    writes: BTreeSet<u64>,
    /// Announcements waiting for every write numbered below theirs.
    announce: VecDeque<(u64, TransferOutput)>,
    announcing: bool,
    /// Requests of this transfer waiting in the send queues.
    queued: usize,
    /// On-demand fetches asked during a check, applied after it.
    fetch_backlog: Vec<ObjectId>,
    /// Content blocks deferred for lack of space in this run.
    deferred: u64,
}

struct UnitStats {
    arc: RingArc,
    phase: UnitPhase,
    objects_total: u64,
    objects_done: u64,
    bytes_done: u64,
    fetched_objects: u64,
    fetched_bytes: u64,
    first_fetch: Option<Instant>,
    last_fetch: Option<Instant>,
}

/// A store write.
enum Write {
    Content { id: ObjectId, data: Vec<u8> },
    Pk(Vec<PkBlock>),
}

struct Worker {
    me: NodeId,
    store: Arc<DiskStore>,
    replica: SharedReplica,
    endpoint: Endpoint,
    opts: TransferOptions,
    events: mpsc::UnboundedSender<Event>,
    status: watch::Sender<Vec<TransferStatus>>,
    /// Time zero of the core machines' clock.
    clock: Instant,
    transfers: BTreeMap<Epoch, Running>,
    finished: VecDeque<TransferStatus>,
    /// Abandoned runs start again at these times.
    restart_at: BTreeMap<Epoch, Instant>,
    /// Store failures since a transfer last completed (for the backoff of [`Worker::abandon`]).
    failures: u32,
    /// Arcs persisted as done, per epoch not complete.
    done_arcs: BTreeMap<Epoch, Vec<RingArc>>,
    /// Which request leaves next: queues, in-flight bounds, the rate cap, source health.
    sched: Scheduler,
    /// Writes issued and not finished, over all transfers.
    pending_writes: usize,
    write_slots: Arc<Semaphore>,
    /// When configurations were last pushed to a source that was behind.
    pushed: BTreeMap<NodeId, Instant>,
    next_gen: u64,
    dirty: bool,
    published_at: Instant,
    logged_at: Instant,
    /// The garbage collections of lost ranges.
    gc: Collector,
    handle: TransferWorker,
}

impl Worker {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn lock_replica(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, Replica<Arc<dyn Store + Send + Sync>>> {
        self.replica.read().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Event>) {
        self.start_missing();
        loop {
            self.fire_timers();
            self.pump();
            self.publish(false);
            let deadline = self.next_deadline();
            tokio::select! {
                ev = inbox.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Starts a transfer into every installed epoch that is neither ready, running nor waiting to
    /// restart.
    fn start_missing(&mut self) {
        let missing: Vec<Epoch> = {
            let r = self.lock_replica();
            (1..=r.epoch())
                .filter(|e| !r.ready_at(*e))
                .filter(|e| !self.transfers.contains_key(e) && !self.restart_at.contains_key(e))
                .collect()
        };
        for e in missing {
            self.start_transfer(e);
        }
        let ready: Vec<Epoch> = {
            let r = self.lock_replica();
            (1..=r.epoch()).filter(|e| r.ready_at(*e)).collect()
        };
        for e in ready {
            self.start_gc(e);
        }
        self.gc_learn();
    }

    fn start_transfer(&mut self, e: Epoch) {
        let (prev, next, was_ready) = {
            let r = self.lock_replica();
            if r.ready_at(e) || self.transfers.contains_key(&e) {
                return;
            }
            let get = |x: Epoch| r.chain().get(x).map(|c| c.config.clone());
            (
                get(e.wrapping_sub(1)),
                get(e),
                r.ready_at(e.wrapping_sub(1)),
            )
        };
        let (Some(prev), Some(next)) = (prev, next) else {
            warn!(
                epoch = e,
                "cannot transfer into an epoch whose configurations are not both known"
            );
            return;
        };
        // The struct update is needed when core's `mutants` feature adds a field (workspace builds).
        #[allow(clippy::needless_update)]
        let core_opts = CoreOptions {
            retransmit_ms: self.opts.retransmit.as_millis().max(1) as u64,
            // Random, so late replies to an earlier run can never match a request of this one.
            first_request_id: random_u64(),
            ..CoreOptions::default()
        };
        let mut t = Transfer::new(&prev, &next, &self.me, was_ready, core_opts);
        let done = self.done_arcs.get(&e).cloned().unwrap_or_default();
        let mut resumed = 0;
        for arc in &done {
            resumed += t.skip(arc);
        }
        let units: Vec<UnitStats> = plan(&prev, &next, &self.me, was_ready)
            .into_iter()
            .map(|u| UnitStats {
                phase: if done.iter().any(|d| d.covers(&u.arc)) {
                    UnitPhase::Resumed
                } else {
                    UnitPhase::Listing
                },
                arc: u.arc,
                objects_total: 0,
                objects_done: 0,
                bytes_done: 0,
                fetched_objects: 0,
                fetched_bytes: 0,
                first_fetch: None,
                last_fetch: None,
            })
            .collect();
        let addrs = source_addrs(&prev);
        let gen = self.next_gen;
        self.next_gen += 1;
        info!(
            epoch = e,
            units = units.len(),
            resumed,
            was_ready,
            "state transfer started"
        );
        t.start(self.now_ms());
        self.transfers.insert(
            e,
            Running {
                gen,
                t,
                addrs,
                units,
                started: Instant::now(),
                checking: false,
                backlog: VecDeque::new(),
                next_seq: 0,
                writes: BTreeSet::new(),
                announce: VecDeque::new(),
                announcing: false,
                queued: 0,
                fetch_backlog: Vec::new(),
                deferred: 0,
            },
        );
        self.dirty = true;
        self.drain(e);
    }

    /// Abandons the run of `e` (a store failure); it starts again from what is persisted.
    /// Store failures in a row back off (doubling up to [`MAX_RETRY`]) and are logged as warnings
    /// once, then at debug level, until a transfer completes.
    fn abandon(&mut self, e: Epoch, why: &str) {
        if self.remove(e).is_some() {
            let n = self.failures;
            self.failures += 1;
            let retry_in = (self.opts.retry_after_failure * 2u32.pow(n.min(8))).min(MAX_RETRY);
            if n == 0 {
                warn!(
                    epoch = e,
                    why,
                    ?retry_in,
                    "state transfer interrupted; retrying with backoff"
                );
            } else {
                debug!(
                    epoch = e,
                    why,
                    ?retry_in,
                    failures = n + 1,
                    "state transfer interrupted again"
                );
            }
            self.restart_at.insert(e, Instant::now() + retry_in);
            self.dirty = true;
        }
    }

    /// Removes the run of `e`; the replies it held back no longer count as in flight.
    fn remove(&mut self, e: Epoch) -> Option<Running> {
        let r = self.transfers.remove(&e)?;
        self.sched.release(r.backlog.len());
        Some(r)
    }

    fn live(&self, e: Epoch, gen: u64) -> bool {
        self.transfers.get(&e).is_some_and(|r| r.gen == gen)
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Installed(epochs) => {
                debug!(?epochs, "configurations installed");
                self.start_missing();
            }
            Event::FetchNow { epoch, x } => {
                self.handle
                    .shared
                    .fetches
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(epoch, x));
                self.fetch_now(epoch, x);
            }
            Event::GcReply {
                epoch,
                gen,
                from,
                reply,
            } => {
                let now = self.now_ms();
                self.gc.on_reply(now, epoch, gen, from, reply.as_deref());
                self.run_gc();
            }
            Event::GcDeleted { epoch, arc, result } => {
                if let Ok(n) = &result {
                    info!(epoch, objects = n, arc = %arc_name(&arc), "lost range collected");
                }
                let now = self.now_ms();
                let result = result.map_err(|e| format!("{e} (arc {})", arc_name(&arc)));
                self.gc.on_deleted(now, epoch, arc, result);
                self.run_gc();
            }
            Event::Reply {
                epoch,
                gen,
                to,
                reply,
                reserved,
                unreachable,
            } => {
                let got = reply.as_ref().map(Vec::len);
                let dropped = self
                    .sched
                    .replied(to, Instant::now(), got, reserved, unreachable);
                if unreachable {
                    self.source_down(to, dropped);
                }
                let Some(bytes) = reply else {
                    self.sched.release(1);
                    return;
                };
                self.maybe_push_configs(epoch, to, &bytes);
                if !self.live(epoch, gen) {
                    self.sched.release(1);
                    return;
                }
                let now = self.now_ms();
                let Some(r) = self.transfers.get_mut(&epoch) else {
                    return;
                };
                if r.checking {
                    r.backlog.push_back((to, bytes));
                    return;
                }
                self.sched.release(1);
                r.t.handle_message(now, to, &bytes);
                self.drain(epoch);
            }
            Event::Checked { epoch, gen, held } => {
                if !self.live(epoch, gen) {
                    return;
                }
                let held = match held {
                    Ok(h) => h,
                    Err(e) => return self.abandon(epoch, &format!("checking held blocks: {e}")),
                };
                if let Some(r) = self.transfers.get_mut(&epoch) {
                    for (id, len) in &held {
                        if let Some(u) = r.unit_of(id) {
                            u.objects_done += 1;
                            u.bytes_done += len;
                        }
                    }
                    let ids: Vec<ObjectId> = held.iter().map(|(id, _)| *id).collect();
                    r.t.held(&ids);
                    r.checking = false;
                    self.dirty = true;
                }
                self.drain(epoch);
                self.feed_backlog(epoch);
                let waiting = self
                    .transfers
                    .get_mut(&epoch)
                    .map(|r| std::mem::take(&mut r.fetch_backlog))
                    .unwrap_or_default();
                for x in waiting {
                    self.fetch_now(epoch, x);
                }
            }
            Event::Written {
                epoch,
                gen,
                seq,
                objects,
                fetched,
                result,
            } => {
                self.pending_writes = self.pending_writes.saturating_sub(1);
                if !self.live(epoch, gen) {
                    return;
                }
                let deferred = match result {
                    Ok(d) => d,
                    Err(e) => {
                        return self.abandon(epoch, &format!("storing a transferred object: {e}"))
                    }
                };
                if let Some(x) = deferred {
                    self.replica
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .defer(x);
                }
                if let Some(r) = self.transfers.get_mut(&epoch) {
                    if deferred.is_some() {
                        if r.deferred == 0 {
                            warn!(
                                epoch,
                                "store full: the transfer goes on without the content blocks that \
                                 do not fit; they are fetched once space is freed"
                            );
                        }
                        r.deferred += 1;
                    }
                    r.writes.remove(&seq);
                    let now = Instant::now();
                    for (id, len) in &objects {
                        if let Some(u) = r.unit_of(id) {
                            u.objects_done += 1;
                            u.bytes_done += len;
                            if fetched {
                                u.fetched_objects += 1;
                                u.fetched_bytes += len;
                                u.first_fetch.get_or_insert(now);
                                u.last_fetch = Some(now);
                            }
                        }
                    }
                    self.dirty = true;
                }
                self.try_announce(epoch);
            }
            Event::Announced {
                epoch,
                gen,
                what,
                result,
            } => {
                if !self.live(epoch, gen) {
                    return;
                }
                if let Err(e) = result {
                    return self.abandon(epoch, &format!("persisting progress: {e}"));
                }
                match what {
                    TransferOutput::UnitDone { arc, .. } => {
                        if !is_single(&arc) {
                            self.done_arcs.entry(epoch).or_default().push(arc);
                        }
                        if let Some(r) = self.transfers.get_mut(&epoch) {
                            r.announcing = false;
                            if let Some(u) = r.units.iter_mut().find(|u| u.arc == arc) {
                                if u.phase != UnitPhase::Resumed {
                                    u.phase = UnitPhase::Done;
                                }
                                // What was not stored was dropped: 2f+1 old replicas deny it.
                                u.objects_total = u.objects_done;
                                debug!(
                                    epoch,
                                    objects = u.objects_done,
                                    bytes = u.bytes_done,
                                    "transfer unit done"
                                );
                            }
                        }
                        self.dirty = true;
                        self.publish(true);
                        self.try_announce(epoch);
                    }
                    TransferOutput::Complete { .. } => self.complete(epoch),
                    TransferOutput::StoreRefs { .. } => {
                        if let Some(r) = self.transfers.get_mut(&epoch) {
                            r.announcing = false;
                        }
                        self.try_announce(epoch);
                    }
                    _ => {}
                }
            }
        }
    }

    fn complete(&mut self, epoch: Epoch) {
        let Some(r) = self.remove(epoch) else {
            return;
        };
        if self.failures > 1 {
            info!(epoch, "state transfer stores again after failures");
        }
        self.failures = 0;
        self.done_arcs.remove(&epoch);
        let status = r.status(epoch, true);
        let (objects, _, bytes, fetched) = status.totals();
        let secs = r.started.elapsed().as_secs_f64();
        info!(
            epoch,
            objects,
            bytes,
            fetched_bytes = fetched,
            secs = format!("{secs:.2}"),
            mb_per_s = format!("{:.1}", fetched as f64 / 1e6 / secs.max(1e-3)),
            "state transfer complete: ready in this epoch"
        );
        self.finished.retain(|s| s.epoch != epoch);
        self.finished.push_back(status);
        while self.finished.len() > KEEP_FINISHED {
            self.finished.pop_front();
        }
        self.dirty = true;
        self.publish(true);
        // Then collect what the node lost on entering this epoch.
        self.start_gc(epoch);
    }

    /// Has the running transfer into `epoch` fetch `x` ahead of its unit (after a check in
    /// progress).
    fn fetch_now(&mut self, epoch: Epoch, x: ObjectId) {
        let now = self.now_ms();
        let Some(r) = self.transfers.get_mut(&epoch) else {
            return;
        };
        if r.checking {
            if r.fetch_backlog.len() < MAX_FETCH_REQUESTS && !r.fetch_backlog.contains(&x) {
                r.fetch_backlog.push(x);
            }
            return;
        }
        if r.t.fetch_now(now, x) {
            debug!(epoch, object = %x.short(), "fetching an object on demand");
            self.drain(epoch);
        }
    }

    /// Feeds due timers: the machines' retransmissions (only when none of their requests still
    /// waits to be sent, so a slow queue never snowballs), and abandoned runs' restarts.
    fn fire_timers(&mut self) {
        let now = Instant::now();
        for n in self.sched.silent(now) {
            debug!(source = %n.short(), "source silent: treated as unreachable");
            let dropped = self.sched.mark_down(n, now);
            self.source_down(n, dropped);
        }
        let due: Vec<Epoch> = self
            .restart_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(e, _)| *e)
            .collect();
        for e in due {
            self.restart_at.remove(&e);
            self.start_transfer(e);
        }
        let now_ms = self.now_ms();
        let due: Vec<Epoch> = self
            .transfers
            .iter()
            .filter(|(_, r)| !r.checking && r.queued == 0)
            .filter(|(_, r)| r.t.next_timeout().is_some_and(|at| at <= now_ms))
            .map(|(e, _)| *e)
            .collect();
        for e in due {
            if let Some(r) = self.transfers.get_mut(&e) {
                r.t.handle_timeout(now_ms);
            }
            self.drain(e);
        }
        // On-demand fetches a read waits for are resent even while ordinary requests queue.
        let due: Vec<Epoch> = self
            .transfers
            .iter()
            .filter(|(_, r)| !r.checking)
            .filter(|(_, r)| r.t.next_on_demand_timeout().is_some_and(|at| at <= now_ms))
            .map(|(e, _)| *e)
            .collect();
        for e in due {
            if let Some(r) = self.transfers.get_mut(&e) {
                r.t.handle_on_demand_timeout(now_ms);
            }
            self.drain(e);
        }
        self.gc.on_timer(now_ms);
        self.run_gc();
    }

    fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        let mut at = now + Duration::from_secs(3600);
        if let Some(t) = self.sched.next_deadline(now, self.cap().map(|c| c.0)) {
            at = at.min(t);
        }
        for r in self.transfers.values().filter(|r| !r.checking) {
            let ordinary = r.t.next_timeout().filter(|_| r.queued == 0);
            for ms in ordinary.into_iter().chain(r.t.next_on_demand_timeout()) {
                at = at.min(self.clock + Duration::from_millis(ms));
            }
        }
        for t in self.restart_at.values() {
            at = at.min(*t);
        }
        if let Some(ms) = self.gc.next_deadline() {
            at = at.min(self.clock + Duration::from_millis(ms));
        }
        if self.dirty {
            at = at.min(self.published_at + PUBLISH_EVERY);
        }
        if !self.transfers.is_empty() {
            at = at.min(self.logged_at + LOG_EVERY);
        }
        at
    }
}

/// Makes an announcement durable, then applies it to the replica.
fn announce(
    store: &DiskStore,
    replica: &SharedReplica,
    into: Epoch,
    what: &TransferOutput,
) -> Result<(), StoreError> {
    match what {
        TransferOutput::StoreRefs { refs } => {
            // Under the read lock, as a content write: nothing of a range collected since.
            let r = replica.read().unwrap_or_else(|p| p.into_inner());
            let wanted: Vec<_> = refs
                .iter()
                .filter(|(id, _)| r.accepts_transferred(into, id))
                .cloned()
                .collect();
            r.merge_transferred_refs(&wanted)?;
        }
        TransferOutput::UnitDone { epoch, arc } if is_single(arc) => {
            // An object fetched on demand: not persisted (after a restart a read fetches it again).
            replica
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .object_ready(*epoch, &ObjectId(arc.end));
        }
        TransferOutput::UnitDone { epoch, arc } => {
            store.add_transfer_done(*epoch, *arc)?;
            replica
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .arc_ready(*epoch, *arc);
        }
        TransferOutput::Complete { epoch } => {
            {
                // Under the lock, so two completions cannot save over each other.
                let mut r = replica.write().unwrap_or_else(|p| p.into_inner());
                let mut ready: Vec<Epoch> = (0..=r.epoch()).filter(|e| r.ready_at(*e)).collect();
                ready.push(*epoch);
                ready.sort_unstable();
                ready.dedup();
                store.save_ready(&ready)?;
                r.transfer_complete(*epoch);
            }
            if let Err(e) = store.clear_transfer_done(*epoch) {
                debug!(epoch, error = %e, "could not clear the per-arc progress of a complete transfer");
            }
        }
        _ => {}
    }
    Ok(())
}

/// Whether `arc` holds exactly one object (an on-demand unit).
fn is_single(arc: &RingArc) -> bool {
    *arc == RingArc::single(&ObjectId(arc.end))
}

/// Builds the worker of `handle` (readiness and collected arcs already restored into `replica`;
/// `done`: the arcs persisted as done per epoch not complete) and spawns it with the refetch of
/// deferred blocks beside it.
pub(super) fn spawn(
    handle: TransferWorker,
    endpoint: Endpoint,
    replica: SharedReplica,
    inbox: mpsc::UnboundedReceiver<Event>,
    done: BTreeMap<Epoch, Vec<RingArc>>,
) -> JoinHandle<()> {
    let opts = handle
        .shared
        .opts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let worker = Worker {
        me: handle.shared.me,
        store: handle.shared.store.clone(),
        replica,
        endpoint,
        events: handle.shared.events.clone(),
        status: handle.shared.status.clone(),
        clock: Instant::now(),
        transfers: BTreeMap::new(),
        finished: VecDeque::new(),
        restart_at: BTreeMap::new(),
        failures: 0,
        done_arcs: done,
        sched: Scheduler::new(
            handle.shared.me,
            opts.max_requests,
            opts.max_requests_per_peer,
            // Until replies are seen, assume the largest (a first burst stays within the cap).
            dbqsfs_core::object::MAX_BLOCK as f64,
            Instant::now(),
        ),
        gc: Collector::new(
            opts.max_requests,
            opts.retry_after_failure.as_millis() as u64,
        ),
        pending_writes: 0,
        write_slots: Arc::new(Semaphore::new(opts.max_concurrent_writes.max(1))),
        opts,
        pushed: BTreeMap::new(),
        next_gen: 1,
        dirty: false,
        published_at: Instant::now(),
        logged_at: Instant::now(),
        handle: handle.clone(),
    };
    // Blocks a full store deferred are brought in beside the transfers, and stop with them.
    let refetch = super::deferred::run(
        handle.shared.me,
        handle.shared.store.clone(),
        worker.replica.clone(),
        worker.endpoint.clone(),
    );
    tokio::spawn(async move {
        tokio::select! {
            () = worker.run(inbox) => {}
            () = refetch => {}
        }
    })
}
