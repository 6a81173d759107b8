//! Sending requests: what the scheduler ([`super::super::scheduler`]) lets go leaves over the
//! endpoint (or is served here when it is for this node), and a source found down is told to the
//! machines, which ask elsewhere at once.

use super::*;

impl Worker {
    /// The cap on the transfer's rate in force now, bytes/s, and whether it is the one under client
    /// load ([`TransferOptions::rate_under_load`]).
    pub(super) fn cap(&self) -> Option<(u64, bool)> {
        let limit = self.opts.rate_limit;
        let busy = self
            .opts
            .rate_under_load
            .filter(|_| self.handle.clients_active());
        match (limit, busy) {
            (Some(l), Some(b)) if b < l => Some((b.max(1), true)),
            (Some(l), _) => Some((l.max(1), false)),
            (None, Some(b)) => Some((b.max(1), true)),
            (None, None) => None,
        }
    }

    /// Sends what the scheduler lets go now.
    pub(super) fn pump(&mut self) {
        let now = Instant::now();
        let cap = self.cap().map(|c| c.0);
        let writes_full = self.pending_writes >= self.opts.max_pending_writes.max(1);
        let transfers = &self.transfers;
        let live = |w: &super::super::scheduler::Waiting| {
            transfers.get(&w.epoch).is_some_and(|r| r.gen == w.gen)
        };
        let mut go = Vec::new();
        while let Some(g) = self.sched.next(now, cap, writes_full, live) {
            go.push(g);
        }
        for g in go {
            let Some(r) = self.transfers.get_mut(&g.req.epoch) else {
                continue;
            };
            if !g.urgent {
                r.queued = r.queued.saturating_sub(1);
            }
            let dest = r.addrs.get(&g.to).copied();
            self.send(g.req.epoch, g.req.gen, g.to, dest, g.req.bytes, g.reserved);
        }
    }

    /// Sends a request the scheduler let go (`reserved`: what it charged to the bucket, settled
    /// against the reply's size when it comes).
    pub(super) fn send(
        &self,
        epoch: Epoch,
        gen: u64,
        to: NodeId,
        dest: Option<(SocketAddr, VerifyingKey)>,
        bytes: Vec<u8>,
        reserved: f64,
    ) {
        let reply = move |reply: Option<Vec<u8>>, unreachable| Event::Reply {
            epoch,
            gen,
            to,
            reply,
            reserved,
            unreachable,
        };
        self.dispatch(to, dest, bytes, reply);
    }

    /// Sends one request of a transfer or a collection: served here if it is for this node,
    /// else over the endpoint within the request timeout. `reply` makes the event that carries
    /// the answer back to the loop (`None`: no answer) and whether the transport failed (no
    /// connection, or no answer in time), as opposed to an answer of nothing.
    pub(super) fn dispatch(
        &self,
        to: NodeId,
        dest: Option<(SocketAddr, VerifyingKey)>,
        bytes: Vec<u8>,
        reply: impl FnOnce(Option<Vec<u8>>, bool) -> Event + Send + 'static,
    ) {
        let events = self.events.clone();
        if to == self.me {
            let replica = self.replica.clone();
            let me = self.me;
            tokio::spawn(async move {
                let r = tokio::task::spawn_blocking(move || serve(&replica, me, &bytes))
                    .await
                    .ok()
                    .flatten();
                let _ = events.send(reply(r, false));
            });
            return;
        }
        let Some((addr, key)) = dest else {
            debug!(to = %to.short(), "no usable address for a request");
            let _ = events.send(reply(None, false));
            return;
        };
        let endpoint = self.endpoint.clone();
        let timeout = self.opts.request_timeout;
        tokio::spawn(async move {
            let (r, unreachable) =
                match tokio::time::timeout(timeout, endpoint.request(addr, &key, &bytes)).await {
                    Ok(Ok(r)) => (Some(r), false),
                    // Alive, but it answered nothing (it refused or failed this request).
                    Ok(Err(NetError::NoResponse)) => (None, false),
                    Ok(Err(e)) => {
                        debug!(to = %to.short(), %addr, error = %e, "request failed");
                        (None, true)
                    }
                    Err(_) => {
                        debug!(to = %to.short(), %addr, "request timed out");
                        (None, true)
                    }
                };
            let _ = events.send(reply(r, unreachable));
        });
    }

    /// Source `n` is down (its request failed in transport, or it went silent): the requests
    /// that waited for it were dropped by the scheduler; the machines ask elsewhere now what
    /// waited on it ([`Transfer::peer_failed`]), rather than at their next timeout, so that a dead
    /// or silent source holds up neither the queue nor the machines' retransmissions.
    pub(super) fn source_down(
        &mut self,
        n: NodeId,
        dropped: Vec<super::super::scheduler::Waiting>,
    ) {
        if !dropped.is_empty() {
            debug!(source = %n.short(), requests = dropped.len(), "source unreachable: requests to it dropped");
        }
        for w in dropped {
            if let Some(r) = self.transfers.get_mut(&w.epoch).filter(|r| r.gen == w.gen) {
                r.queued = r.queued.saturating_sub(1);
            }
        }
        let now = self.now_ms();
        let epochs: Vec<Epoch> = self.transfers.keys().copied().collect();
        for e in epochs {
            // During a check the re-asks wait in the machine until `drain` may poll it again.
            if let Some(r) = self.transfers.get_mut(&e) {
                r.t.peer_failed(now, n);
            }
            self.drain(e);
        }
    }

    /// A source answered "not yet" from an older epoch: it has not installed the configuration
    /// the transfer is for, so push it the newer ones (at most once per retransmission interval).
    pub(super) fn maybe_push_configs(&mut self, epoch: Epoch, to: NodeId, bytes: &[u8]) {
        if to == self.me || bytes.len() > 64 {
            return;
        }
        let Ok(env) = decode::<TransferMessage>(bytes) else {
            return;
        };
        if !matches!(env.msg, TransferMessage::NotYet { .. }) || env.epoch >= epoch {
            return;
        }
        let now = Instant::now();
        if self
            .pushed
            .get(&to)
            .is_some_and(|t| now < *t + self.opts.retransmit)
        {
            return;
        }
        self.pushed.insert(to, now);
        let Some(Some((addr, key))) = self
            .transfers
            .get(&epoch)
            .map(|r| r.addrs.get(&to).copied())
        else {
            return;
        };
        let (mine, configs) = {
            let r = self.lock_replica();
            (r.epoch(), r.chain().after(env.epoch, MAX_CONFIGS_PER_REPLY))
        };
        debug!(to = %to.short(), their_epoch = env.epoch, "pushing configurations to a source that is behind");
        let push = encode_msg(mine, DbqsMessage::PushConfigs { configs });
        let endpoint = self.endpoint.clone();
        let timeout = self.opts.request_timeout;
        tokio::spawn(async move {
            // One-way: the node answers nothing.
            let _ = tokio::time::timeout(timeout, endpoint.request(addr, &key, &push)).await;
        });
    }
}
