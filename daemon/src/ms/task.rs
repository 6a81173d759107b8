//! The MS task: one loop that feeds the core's [`MsNode`] (the node's role, submissions and
//! following of the epochs, as one machine) its inputs and the clock, and carries out its outputs
//! in order: persist, send, request, probe, install, log.

#[cfg(feature = "fault-injection")]
mod forge;

use super::*;
use dbqsfs_core::ms::key::KeyOp;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    if getrandom::fill(&mut b).is_err() {
        // Without OS randomness: the clock, hashed (a probe nonce only needs to be fresh).
        b = *blake3::hash(&unix_ms().to_le_bytes()).as_bytes();
    }
    b
}

/// A random rotation among equally healthy members to pull from.
fn rotate() -> u64 {
    u64::from_le_bytes(random_bytes()[..8].try_into().unwrap_or([0; 8]))
}

fn member_target(m: &Member) -> Option<(SocketAddr, VerifyingKey)> {
    Some((
        m.addr.parse().ok()?,
        VerifyingKey::from_bytes(&m.key.0).ok()?,
    ))
}

pub(super) struct Task {
    shared: Arc<MsContext>,
    endpoint: Endpoint,
    opts: MsOptions,
    tx: mpsc::Sender<Inbound>,
    start: Instant,
    /// When the node entered its epoch.
    entered: Instant,
    node: MsNode,
}

impl Task {
    pub(super) fn new(
        shared: Arc<MsContext>,
        endpoint: Endpoint,
        opts: MsOptions,
        tx: mpsc::Sender<Inbound>,
    ) -> Task {
        #[cfg(feature = "fault-injection")]
        let honest = !opts.forge;
        #[cfg(not(feature = "fault-injection"))]
        let honest = true;
        let node_opts = NodeOptions {
            admission_key: shared.me.admission_key,
            pull_ms: opts.pull.as_millis() as u64,
            resubmit_ms: opts.resubmit.as_millis() as u64,
            epoch_timer: honest,
        };
        let config = shared.epochs.chain().config().clone();
        let shares = shared.store.load_key_shares().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read this node's shares of the MS key: starting without");
            Default::default()
        });
        let mut node = MsNode::new(shared.me.key.clone(), config, shares, node_opts, 0);
        if let Some(cert) = opts.join.clone() {
            let me = Member::new(shared.me.key.public(), shared.me.listen.to_string());
            node.join(me, cert);
        }
        let now = Instant::now();
        Task {
            node,
            shared,
            endpoint,
            opts,
            tx,
            start: now,
            entered: now,
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Inbound>) {
        self.enter_epoch();
        let mut tick = tokio::time::interval(self.opts.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sampled = Instant::now();
        crate::metrics::ms(&self.status());
        loop {
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => self.on_input(input),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
            }
            if sampled.elapsed() >= crate::metrics::MS_SAMPLE_EVERY {
                crate::metrics::ms(&self.status());
                sampled = Instant::now();
            }
            if self.shared.epochs.epoch() != self.node.epoch() {
                self.enter_epoch();
            }
            self.drain();
        }
    }

    /// Enters the newest installed configuration, with what this member persisted in its
    /// agreement if it takes a role there.
    fn enter_epoch(&mut self) {
        let chain = self.shared.epochs.chain();
        let config = chain.config();
        if config.epoch != self.node.epoch() {
            self.entered = Instant::now();
        }
        // The agreement starts afresh, or from what this member persisted in this epoch before
        // a restart (everything it signed was persisted before it was sent).
        let saved = if self.node.wants_role(config) {
            self.saved_agreement(config.epoch)
        } else {
            Ok(None)
        };
        let resume = match &saved {
            Ok(Some((record, batches))) => Resume::Saved { record, batches },
            Ok(None) => Resume::Fresh,
            Err(why) => {
                warn!(epoch = config.epoch, "{why}");
                Resume::SitOut
            }
        };
        let now = self.now_ms();
        self.node.enter(config, resume, random_bytes(), now);
    }

    /// What this member persisted in `epoch`'s agreement, if anything: the record and the
    /// batches it had executed. `Err` says why it must sit the agreement out (it may have signed
    /// something it cannot recall).
    #[allow(clippy::type_complexity)]
    fn saved_agreement(&self, epoch: Epoch) -> Result<Option<(Vec<u8>, Vec<Vec<u8>>)>, String> {
        let store = &self.shared.store;
        let saved = store
            .load_agreement(epoch)
            .map_err(|e| format!("cannot read the persisted agreement state ({e})"))?;
        if saved.is_none() {
            let legacy = store
                .load_legacy_agreement_epoch()
                .map_err(|e| format!("cannot read the agreement marker ({e})"))?;
            if legacy.is_some_and(|e| e >= epoch) {
                return Err(
                    "restarted in an epoch whose agreement an older version of this \
                     node took part in without persisting what it signed"
                        .into(),
                );
            }
        }
        Ok(saved)
    }

    /// Writes what the role must persist, durable on return.
    fn persist(&self, saved: &Saved) -> Result<(), String> {
        self.shared
            .store
            .save_agreement(
                saved.epoch,
                &saved.record,
                saved.first_batch,
                &saved.batches,
            )
            .map_err(|e| e.to_string())
    }

    fn on_input(&mut self, input: Inbound) {
        let now = self.now_ms();
        match input {
            Inbound::Agreement { from, bytes } => {
                if let Err(e) = self.node.on_agreement(now, from, &bytes) {
                    debug!(peer = %from.short(), error = e, "agreement message refused");
                }
            }
            Inbound::Message { from, msg, reply } => {
                let answer = match msg {
                    MsMessage::StatusRequest => Some(MsMessage::Status(Box::new(self.status()))),
                    MsMessage::Leave => {
                        if self.node.leave() {
                            info!("asked to leave the cluster");
                        }
                        let member = self.node.config().is_member(&from.node_id());
                        Some(MsMessage::Leaving {
                            epoch: self.node.epoch(),
                            member,
                        })
                    }
                    msg => self.node.on_message(now, from.node_id(), msg),
                };
                let _ = reply.send(answer);
            }
            Inbound::Answer { from, msg } => self.node.on_answer(now, from, msg),
            Inbound::Failed { from } => self.node.on_failed(now, from, rotate()),
            Inbound::ProbeResult {
                target,
                epoch,
                nonce,
                answer,
            } => self
                .node
                .on_probe_answer(epoch, target, &nonce, answer.as_ref()),
        }
    }

    fn status(&self) -> MsStatus {
        let chain = self.shared.epochs.chain();
        let config = chain.config();
        let me = self.shared.me.key.node_id();
        let mut s = MsStatus {
            epoch: config.epoch,
            config: config.hash(),
            member: config.is_member(&me),
            committee: config.committee.clone(),
            // A configuration installed since this task last entered an epoch is entered next: it
            // is this node's epoch, just begun (not the age of the epoch before).
            epoch_age_ms: if config.epoch == self.node.epoch() {
                self.entered.elapsed().as_millis() as u64
            } else {
                0
            },
            freshness_ms: self.shared.epochs.freshness().map(|f| f.time_ms),
            leaving: self.node.leaving(),
            last_view_change: self.node.last_view_change(),
            ms_key: config
                .key
                .as_ref()
                .and_then(|k| k.commitments.first().copied()),
            key_shares: self
                .node
                .key_member()
                .holder()
                .held()
                .iter()
                .map(|s| s.epoch())
                .collect(),
            ..MsStatus::default()
        };
        if let Some(role) = self.node.role() {
            if let Some(a) = role.agreement() {
                s.in_agreement = true;
                s.view = a.view();
                s.primary = a.committee().id(a.committee().primary(a.view()));
                s.executed = a.last_executed();
                s.requests_executed = role.app().batches().iter().map(|b| b.len() as u64).sum();
                s.pending = Some(role.app().membership().pending());
            }
        }
        if let Some(prober) = self.node.prober() {
            s.probes = prober.counts();
        }
        s
    }

    fn on_tick(&mut self) {
        let now = self.now_ms();
        #[cfg(feature = "fault-injection")]
        if self.opts.forge && now >= self.node.follower().next_timer() {
            self.forge();
        }
        // Sequence numbers grow with the clock, so they stay above those of an earlier run.
        self.node
            .on_timer(now, unix_ms(), rotate(), unix_ms() << 10);
    }

    /// Carries out the node's outputs, in order.
    fn drain(&mut self) {
        while let Some(out) = self.node.poll() {
            self.on_output(out);
        }
    }

    fn on_output(&mut self, out: Output) {
        let epoch = self.node.epoch();
        match out {
            Output::Persist(saved) => {
                if let Err(e) = self.persist(&saved) {
                    // What follows must not leave unpersisted.
                    warn!(epoch, error = %e, "cannot persist the agreement state: sitting this epoch's agreement out");
                    self.node.persist_failed();
                }
            }
            #[cfg(feature = "fault-injection")]
            Output::Agreement { .. } if self.opts.forge => {}
            Output::Agreement { to, bytes } => {
                for m in self.members(&to) {
                    self.send_raw(m, bytes.clone());
                }
            }
            Output::Send { to, msg } => {
                let to = self.members(&to);
                self.send_all(to, msg);
            }
            Output::Request { to, msg } => {
                if let Some(m) = self.members(&[to]).pop() {
                    self.request(m, msg);
                } else if let Some((addr, key)) = self
                    .opts
                    .bootstrap
                    .filter(|(_, key)| PublicKey(key.to_bytes()).node_id() == to)
                {
                    // A node that is joining asks its bootstrap peer, a member or not.
                    self.request_at(addr, key, msg);
                }
            }
            Output::Forward { to, after } => {
                let deltas = deltas_after(&self.shared.epochs.chain(), after, MAX_CONFIGS);
                if !deltas.is_empty() {
                    let to = self.members(&to);
                    let msg = MsMessage::PushDeltas {
                        deltas,
                        freshness: None,
                    };
                    self.send_all(to, msg);
                }
            }
            Output::PullBootstrap { after } => {
                if let Some((addr, key)) = self.opts.bootstrap {
                    // Deltas, like any pull: a joiner far behind a large cluster would otherwise
                    // fetch every configuration it missed whole.
                    self.request_at(addr, key, MsMessage::DeltasAfter { epoch: after });
                }
            }
            Output::Probe {
                epoch,
                target,
                nonce,
                timeout_ms,
            } => self.probe(epoch, target, nonce, timeout_ms),
            Output::Install(configs) => {
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = shared.epochs.install(configs) {
                        debug!(error = %e, "configurations refused");
                    }
                });
            }
            Output::InstallDeltas(deltas) => {
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = shared.epochs.install_deltas(&deltas) {
                        debug!(error = %e, "configurations refused");
                    }
                });
            }
            Output::Freshness(cert) => self.shared.epochs.learn_freshness(cert),
            Output::KeyState(state) => {
                if let Err(e) = self.shared.store.save_key_shares(&state) {
                    warn!(error = %e, "cannot persist this node's shares of the MS key");
                }
            }
            Output::Event(event) => log(event),
        }
    }

    /// The members of the newest configuration among `ids` (others are skipped).
    fn members(&self, ids: &[NodeId]) -> Vec<Member> {
        let chain = self.shared.epochs.chain();
        let role = self.node.role().map(|r| r.config());
        ids.iter()
            .filter_map(|id| {
                chain
                    .config()
                    .member(id)
                    .or_else(|| role.and_then(|c| c.member(id)))
                    .cloned()
            })
            .collect()
    }

    /// Challenges `target`; its answer (or failure) comes back as [`Inbound::ProbeResult`].
    fn probe(&self, epoch: Epoch, target: NodeId, nonce: [u8; 32], timeout_ms: u64) {
        let Some((addr, key)) = self.members(&[target]).first().and_then(member_target) else {
            return;
        };
        let endpoint = self.endpoint.clone();
        let tx = self.tx.clone();
        let bytes = encode_msg(epoch, MsMessage::Challenge { epoch, nonce });
        let timeout = Duration::from_millis(timeout_ms);
        tokio::spawn(async move {
            let answer =
                match tokio::time::timeout(timeout, endpoint.request(addr, &key, &bytes)).await {
                    Ok(Ok(resp)) => match decode::<MsMessage>(&resp).map(|e| e.msg) {
                        Ok(MsMessage::ChallengeAnswer { sig }) => Some(sig),
                        _ => None,
                    },
                    _ => None,
                };
            let _ = tx
                .send(Inbound::ProbeResult {
                    target,
                    epoch,
                    nonce,
                    answer,
                })
                .await;
        });
    }

    fn send_all(&self, to: Vec<Member>, msg: MsMessage) {
        let bytes = encode_msg(self.node.epoch(), msg);
        for m in to {
            self.send_raw(m, bytes.clone());
        }
    }

    /// Sends one-way bytes to `m` (the answer, if any, is dropped).
    fn send_raw(&self, m: Member, bytes: Vec<u8>) {
        let Some((addr, key)) = member_target(&m) else {
            return;
        };
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            let _ = endpoint.request(addr, &key, &bytes).await;
        });
    }

    /// Sends `msg` to `m` and feeds its answer back as [`Inbound::Answer`].
    fn request(&self, m: Member, msg: MsMessage) {
        if let Some((addr, key)) = member_target(&m) {
            self.request_at(addr, key, msg);
        }
    }

    fn request_at(&self, addr: SocketAddr, key: VerifyingKey, msg: MsMessage) {
        let endpoint = self.endpoint.clone();
        let tx = self.tx.clone();
        let bytes = encode_msg(self.node.epoch(), msg);
        let from = PublicKey(key.to_bytes()).node_id();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(PULL_TIMEOUT, endpoint.request(addr, &key, &bytes))
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|resp| decode::<MsMessage>(&resp).ok());
            let _ = match answer {
                Some(env) => tx.send(Inbound::Answer { from, msg: env.msg }).await,
                None => tx.send(Inbound::Failed { from }).await,
            };
        });
    }
}

/// What the node's MS part did, in the log.
fn log(event: Event) {
    match event {
        Event::Role {
            epoch,
            resumed,
            sat_out,
        } => {
            if let Some(why) = sat_out {
                warn!(epoch, "{why}: sitting this epoch's agreement out");
            } else if resumed {
                info!(
                    epoch,
                    "restarted in this epoch's agreement from the state it persisted"
                );
            }
            info!(epoch, "in the committee of this epoch");
        }
        Event::Joined { epoch } => info!(epoch, "this node is a member"),
        Event::Queued(op) => match op {
            MsOp::Probe {
                target, responsive, ..
            } => info!(target = %target.short(), responsive, "probe verdict: reporting it"),
            MsOp::EndEpoch { epoch } => {
                info!(epoch, "epoch timer fired: proposing the end of the epoch")
            }
            MsOp::Misbehaviour { epoch, .. } => {
                warn!(epoch, "agreement evidence of misbehaviour: reporting it")
            }
            MsOp::Key { epoch, op } => match *op {
                KeyOp::Deal(_) => info!(epoch, "dealing this node's share of the MS key"),
                KeyOp::Complaint(c) => warn!(
                    epoch,
                    dealer = %c.against.short(),
                    "a sub-share of the MS key dealt to this node is wrong: complaining"
                ),
            },
            MsOp::Join { .. } | MsOp::Leave { .. } => {}
        },
        Event::Submitting(req) => debug!(req = ?req, "submitting an MS operation"),
        Event::Executed { outcomes, .. } => {
            for o in outcomes {
                match o.executed {
                    Executed::Accepted => debug!(op = ?o.op, "MS operation executed"),
                    Executed::Ignored(why) if matches!(o.op, MsOp::Key { .. }) => {
                        warn!(why, "an operation of the MS key's round was ignored")
                    }
                    Executed::Ignored(why) => debug!(op = ?o.op, why, "MS operation ignored"),
                    Executed::EpochEnded(next) => info!(
                        epoch = next.epoch,
                        members = next.members.len(),
                        "the epoch ended"
                    ),
                }
            }
        }
        Event::OutOfOrder(e) => warn!(error = %e, "decided batch ignored"),
        Event::EnteredView { epoch, view } => info!(epoch, view, "agreement entered a new view"),
        Event::FetchingBatches { epoch, upto } => info!(
            epoch,
            seq = upto,
            "catching up to a stable checkpoint: fetching its batches"
        ),
        Event::CaughtUp { from } => {
            info!(peer = %from.short(), "caught up to the stable checkpoint")
        }
        Event::SignedNext { epoch } => {
            info!(epoch, "the epoch ended: signed the next configuration")
        }
        Event::Certified(cc) => info!(epoch = cc.config.epoch, "next configuration certified"),
        Event::PullRetry { failed } => {
            debug!(peer = %failed.short(), "pull failed; pulling from another member")
        }
        Event::Refused { from, reason } => {
            debug!(peer = %from.short(), reason, "MS message refused")
        }
    }
}
