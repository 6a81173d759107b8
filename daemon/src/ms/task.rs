//! The MS task: one loop that feeds the core's machines (the committee role, the follower, the
//! submissions) their inputs and the clock, and carries out their actions in order: persist,
//! send, probe, install.

#[cfg(feature = "fault-injection")]
mod forge;

use super::*;

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
    epoch: Epoch,
    entered: Instant,
    role: Option<Role>,
    /// Operations to submit, one at a time.
    submissions: Submissions,
    leaving: bool,
    last_view_change: Option<(Epoch, View)>,
    /// Pulls and pushes of configurations.
    follower: Follower,
}

impl Task {
    pub(super) fn new(
        shared: Arc<MsContext>,
        endpoint: Endpoint,
        opts: MsOptions,
        tx: mpsc::Sender<Inbound>,
    ) -> Task {
        let now = Instant::now();
        let follower = Follower::new(
            shared.key.node_id(),
            shared.epochs.epoch(),
            opts.pull.as_millis() as u64,
            0,
        );
        Task {
            follower,
            epoch: shared.epochs.epoch(),
            submissions: Submissions::new(opts.resubmit.as_millis() as u64),
            shared,
            endpoint,
            opts,
            tx,
            start: now,
            entered: now,
            role: None,
            leaving: false,
            last_view_change: None,
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
            if self.shared.epochs.epoch() != self.epoch {
                let forward = self.follower.entered(self.shared.epochs.chain().config());
                self.follow(forward);
                self.enter_epoch();
            }
            self.drain();
        }
    }

    /// Carries out what the follower asks: a pull (`ChainAfter`), or the configurations installed
    /// after an epoch passed down the push tree of the newest one (whatever their source: a push,
    /// a pull, or our own certificate).
    fn follow(&mut self, action: Option<FollowAction>) {
        let chain = self.shared.epochs.chain();
        match action {
            Some(FollowAction::Pull { to, after }) => {
                if let Some(m) = chain.config().member(&to).cloned() {
                    self.request(m, MsMessage::ChainAfter { epoch: after });
                }
            }
            Some(FollowAction::Forward { to, after }) => {
                let configs = chain.after(after, MAX_CONFIGS);
                if configs.is_empty() {
                    return;
                }
                let to: Vec<Member> = to
                    .iter()
                    .filter_map(|id| chain.config().member(id).cloned())
                    .collect();
                self.send_all(
                    to,
                    MsMessage::Push {
                        configs,
                        freshness: None,
                    },
                );
            }
            None => {}
        }
    }

    /// A random rotation among equally healthy members to pull from.
    fn rotate() -> u64 {
        u64::from_le_bytes(random_bytes()[..8].try_into().unwrap_or([0; 8]))
    }

    /// Sets up the role for the newest installed epoch.
    fn enter_epoch(&mut self) {
        let chain = self.shared.epochs.chain();
        let config = chain.config().clone();
        let changed = config.epoch != self.epoch || self.role.is_none();
        self.epoch = config.epoch;
        self.entered = Instant::now();
        // Operations of an older epoch are void; what we still want is queued again.
        self.submissions.enter_epoch(config.epoch);
        let me = self.shared.key.node_id();
        let member = config.is_member(&me);
        if let Some(cert) = &self.opts.join {
            if member {
                info!(epoch = config.epoch, "this node is a member");
                self.opts.join = None;
            } else {
                let addr = self.shared.listen.to_string();
                self.submissions.push(MsOp::Join {
                    epoch: config.epoch,
                    member: Member::new(self.shared.key.public(), addr),
                    cert: cert.clone(),
                });
            }
        }
        if self.leaving && member {
            self.submissions.push(MsOp::Leave {
                epoch: config.epoch,
            });
        }
        if !changed {
            return;
        }
        // Probe failures carry over from the epoch before (when this node probed in it too): a
        // count that restarted at every epoch could never reach `evict_after_probes` when an
        // epoch holds fewer probe rounds than that, and a dead member would never be evicted.
        let carried = self.role.take().map(|r| r.probes().clone());
        if !config.committee.contains(&me) {
            return;
        }
        #[cfg(feature = "fault-injection")]
        let honest = !self.opts.forge;
        #[cfg(not(feature = "fault-injection"))]
        let honest = true;
        let setup = Setup {
            key: self.shared.key.clone(),
            opts: agreement_options(&config),
            config: config.clone(),
            admission_key: self.shared.admission_key,
            nonce_seed: random_bytes(),
            epoch_timer: honest,
        };
        // The agreement starts afresh, or from what this member persisted in this epoch before
        // a restart (everything it signed was persisted before it was sent).
        let saved = self.saved_agreement(config.epoch);
        let resume = match &saved {
            Ok(Some((record, batches))) => Resume::Saved { record, batches },
            Ok(None) => Resume::Fresh,
            Err(_) => Resume::SitOut,
        };
        let (role, why) = Role::new(setup, resume, carried.as_ref(), self.now_ms());
        match (why, saved) {
            (_, Err(why)) | (Some(why), _) => {
                warn!(
                    epoch = config.epoch,
                    "{why}: sitting this epoch's agreement out"
                )
            }
            (None, Ok(Some(_))) => info!(
                epoch = config.epoch,
                view = role.agreement().map_or(0, |a| a.view()),
                executed = role.app().executed(),
                "restarted in this epoch's agreement from the state it persisted"
            ),
            (None, Ok(None)) => {}
        }
        info!(epoch = config.epoch, "in the committee of this epoch");
        self.role = Some(role);
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
                if let Some(role) = self.role.as_mut().filter(|r| r.agreement().is_some()) {
                    if let Err(e) = role.on_agreement(now, from, &bytes) {
                        debug!(peer = %from.short(), error = e, "agreement message refused");
                    }
                } else if let Ok(env) = decode::<dbqsfs_core::ms::pbft::AgreementMessage>(&bytes) {
                    let pull = self.follower.saw_epoch(from, env.epoch);
                    self.follow(pull);
                }
            }
            Inbound::Message { from, msg, reply } => {
                let answer = self.on_message(from, msg);
                let _ = reply.send(answer);
            }
            Inbound::Answer { from, msg } => {
                self.follower.answered(from, now);
                self.on_answer(from, msg)
            }
            Inbound::Failed { from } => {
                let config = self.shared.epochs.chain().config().clone();
                let retry = self.follower.failed(from, now, &config, Self::rotate());
                if retry.is_some() {
                    debug!(peer = %from.short(), "pull failed; pulling from another member");
                }
                self.follow(retry);
            }
            Inbound::ProbeResult {
                target,
                epoch,
                nonce,
                answer,
            } => self.on_probe_result(target, epoch, nonce, answer),
        }
    }

    fn on_message(&mut self, from: PublicKey, msg: MsMessage) -> Option<MsMessage> {
        let now = self.now_ms();
        let sender = from.node_id();
        match msg {
            MsMessage::Submit(req) => {
                let Some(role) = self.role.as_mut() else {
                    return Some(MsMessage::Refused {
                        reason: "not running this epoch's agreement".into(),
                    });
                };
                role.admits(&req)
                    .and_then(|()| role.submit(now, req))
                    .err()
                    .map(|reason| MsMessage::Refused { reason })
            }
            MsMessage::ConfigShare { epoch, hash, sig } => {
                self.role
                    .as_mut()?
                    .on_config_share(sender, epoch, hash, sig);
                None
            }
            MsMessage::FreshShare {
                epoch,
                config,
                time_ms,
                sig,
            } => {
                self.role
                    .as_mut()?
                    .on_fresh_share(sender, epoch, config, time_ms, sig);
                None
            }
            MsMessage::Batches { epoch, upto } => Some(MsMessage::BatchLog {
                batches: self.role.as_ref()?.batches(epoch, upto)?,
            }),
            MsMessage::StatusRequest => Some(MsMessage::Status(Box::new(self.status()))),
            MsMessage::Leave => {
                if !self.leaving {
                    info!("asked to leave the cluster");
                    self.leaving = true;
                    self.enter_epoch();
                }
                let member = self.shared.epochs.chain().config().is_member(&sender);
                Some(MsMessage::Leaving {
                    epoch: self.epoch,
                    member,
                })
            }
            _ => None,
        }
    }

    fn status(&self) -> MsStatus {
        let chain = self.shared.epochs.chain();
        let config = chain.config();
        let me = self.shared.key.node_id();
        let mut s = MsStatus {
            epoch: config.epoch,
            config: config.hash(),
            member: config.is_member(&me),
            committee: config.committee.clone(),
            // A configuration installed since this task last entered an epoch is entered next: it
            // is this node's epoch, just begun (not the age of the epoch before).
            epoch_age_ms: if config.epoch == self.epoch {
                self.entered.elapsed().as_millis() as u64
            } else {
                0
            },
            freshness_ms: self.shared.epochs.freshness().map(|f| f.time_ms),
            leaving: self.leaving,
            last_view_change: self.last_view_change,
            ..MsStatus::default()
        };
        if let Some(role) = &self.role {
            if let Some(a) = role.agreement() {
                s.in_agreement = true;
                s.view = a.view();
                s.primary = a.committee().id(a.committee().primary(a.view()));
                s.executed = a.last_executed();
                s.requests_executed = role.app().batches().iter().map(|b| b.len() as u64).sum();
                s.pending = Some(role.app().membership().pending());
            }
            s.probes = role.probes().counts();
        }
        s
    }

    fn on_answer(&mut self, from: NodeId, msg: MsMessage) {
        match msg {
            MsMessage::Chain { configs, freshness } => {
                if let Some(f) = freshness {
                    self.shared.epochs.learn_freshness(f);
                }
                if configs.is_empty() {
                    return;
                }
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = shared.epochs.install(configs) {
                        debug!(peer = %from.short(), error = %e, "pulled configurations refused");
                    }
                });
            }
            MsMessage::BatchLog { batches }
                if self.role.as_mut().is_some_and(|r| r.on_batch_log(&batches)) =>
            {
                info!(peer = %from.short(), "caught up to the stable checkpoint");
            }
            MsMessage::Refused { reason } => {
                debug!(peer = %from.short(), reason, "MS message refused")
            }
            _ => {}
        }
    }

    fn on_probe_result(
        &mut self,
        target: NodeId,
        epoch: Epoch,
        nonce: [u8; 32],
        answer: Option<Signature>,
    ) {
        if let Some(role) = self.role.as_mut() {
            role.on_probe_answer(epoch, target, &nonce, answer.as_ref());
        }
    }

    fn on_tick(&mut self) {
        let now_ms = self.now_ms();
        if now_ms >= self.follower.next_timer() {
            #[cfg(feature = "fault-injection")]
            if self.opts.forge {
                self.forge();
            }
            let chain = self.shared.epochs.chain();
            let pull = self
                .follower
                .on_timer(now_ms, chain.config(), Self::rotate());
            self.follow(pull);
            if let Some((addr, key)) = self.opts.bootstrap {
                if !chain.config().is_member(&self.shared.key.node_id()) {
                    let msg = MsMessage::ChainAfter {
                        epoch: self.follower.epoch(),
                    };
                    self.request_at(addr, key, msg);
                }
            }
        }
        self.submit_next();
        if let Some(role) = self.role.as_mut() {
            if role.next_timer().is_some_and(|t| t <= now_ms) {
                role.on_timer(now_ms, unix_ms());
            }
        }
    }

    fn committee_peers(&self) -> Vec<Member> {
        let chain = self.shared.epochs.chain();
        let config = chain.config();
        let me = self.shared.key.node_id();
        config
            .committee
            .iter()
            .filter(|id| **id != me)
            .filter_map(|id| config.member(id).cloned())
            .collect()
    }

    /// Challenges `target`; its answer (or failure) comes back as [`Inbound::ProbeResult`].
    fn probe(&self, epoch: Epoch, target: NodeId, nonce: [u8; 32], timeout_ms: u64) {
        let Some(role) = self.role.as_ref() else {
            return;
        };
        let Some((addr, key)) = role.config().member(&target).and_then(member_target) else {
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

    /// Sends the next submission, or the outstanding one again once its period passed.
    fn submit_next(&mut self) {
        // Sequence numbers grow with the clock, so they stay above those of an earlier run.
        let floor = unix_ms() << 10;
        let now_ms = self.now_ms();
        let Some(req) = self.submissions.poll(now_ms, &self.shared.key, floor) else {
            return;
        };
        debug!(req = ?req, "submitting an MS operation");
        if let Some(role) = self.role.as_mut().filter(|r| r.agreement().is_some()) {
            if let Err(e) = role.submit(now_ms, req.clone()) {
                debug!(error = e, "own submission refused");
            }
        }
        let targets = self.committee_peers();
        self.send_all(targets, MsMessage::Submit(req));
    }

    /// Carries out the role's actions, in order.
    fn drain(&mut self) {
        while let Some(action) = self.role.as_mut().and_then(|r| r.poll()) {
            self.on_action(action);
        }
    }

    fn on_action(&mut self, action: Action) {
        let Some(role) = self.role.as_mut() else {
            return;
        };
        let epoch = role.epoch();
        match action {
            Action::Persist(saved) => {
                if let Err(e) = self.persist(&saved) {
                    // What follows must not leave unpersisted.
                    warn!(epoch, error = %e, "cannot persist the agreement state: sitting this epoch's agreement out");
                    if let Some(role) = self.role.as_mut() {
                        role.persist_failed();
                    }
                }
            }
            #[cfg(feature = "fault-injection")]
            Action::Agreement { .. } if self.opts.forge => {}
            Action::Agreement {
                to: Some(to),
                bytes,
            } => {
                if let Some(m) = role.config().member(&to).cloned() {
                    self.send_raw(m, bytes);
                }
            }
            Action::Agreement { to: None, bytes } => {
                for m in self.committee_peers() {
                    self.send_raw(m, bytes.clone());
                }
            }
            Action::Send { to, msg } => {
                let to: Vec<Member> = to
                    .iter()
                    .filter_map(|id| role.config().member(id).cloned())
                    .collect();
                if let MsMessage::ConfigShare { .. } = msg {
                    info!(epoch, "the epoch ended: signed the next configuration");
                }
                self.send_all(to, msg);
            }
            Action::FetchBatches { upto, .. } => {
                info!(
                    epoch,
                    seq = upto,
                    "catching up to a stable checkpoint: fetching its batches"
                );
                for m in self.committee_peers() {
                    self.request(m, MsMessage::Batches { epoch, upto });
                }
            }
            Action::Probe {
                target,
                nonce,
                timeout_ms,
            } => self.probe(epoch, target, nonce, timeout_ms),
            Action::Submit(op) => self.report(op),
            Action::Executed {
                requests, outcomes, ..
            } => {
                self.submissions.executed(&requests);
                for o in outcomes {
                    match o.executed {
                        Executed::Accepted => debug!(op = ?o.op, "MS operation executed"),
                        Executed::Ignored(why) => debug!(op = ?o.op, why, "MS operation ignored"),
                        Executed::EpochEnded(next) => info!(
                            epoch = next.epoch,
                            members = next.members.len(),
                            "the epoch ended"
                        ),
                    }
                }
            }
            Action::OutOfOrder(e) => warn!(error = %e, "decided batch ignored"),
            Action::EnteredView(view) => {
                info!(epoch, view, "agreement entered a new view");
                self.last_view_change = Some((epoch, view));
            }
            Action::Certified(cc) => self.certified(cc),
            Action::Freshness(cert) => {
                debug!(
                    epoch,
                    time_ms = cert.time_ms,
                    "freshness certificate assembled"
                );
                self.shared.epochs.learn_freshness(cert);
            }
        }
    }

    /// Queues an operation the role reports (the queue keeps one verdict per member and one end
    /// of the epoch).
    fn report(&mut self, op: MsOp) {
        let what = op.clone();
        if !self.submissions.push(op) {
            return;
        }
        match what {
            MsOp::Probe {
                target, responsive, ..
            } => info!(target = %target.short(), responsive, "probe verdict: reporting it"),
            MsOp::EndEpoch { epoch } => {
                info!(epoch, "epoch timer fired: proposing the end of the epoch")
            }
            MsOp::Misbehaviour { epoch, .. } => {
                warn!(epoch, "agreement evidence of misbehaviour: reporting it")
            }
            MsOp::Join { .. } | MsOp::Leave { .. } => {}
        }
    }

    /// The next configuration is certified: install it and push it to the root of the tree.
    fn certified(&mut self, cc: CertifiedConfig) {
        info!(epoch = cc.config.epoch, "next configuration certified");
        let root = tree_order(&cc.config)
            .into_iter()
            .take(2)
            .collect::<Vec<_>>();
        let shared = self.shared.clone();
        let msg = MsMessage::Push {
            configs: vec![cc.clone()],
            freshness: None,
        };
        self.send_all(root, msg);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = shared.epochs.install(vec![cc]) {
                warn!(error = %e, "the certified configuration did not install");
            }
        });
    }

    fn send_all(&self, to: Vec<Member>, msg: MsMessage) {
        let bytes = encode_msg(self.epoch, msg);
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
        let bytes = encode_msg(self.epoch, msg);
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
