//! The request scheduler: per-destination send queues (on-demand fetches first), the in-flight
//! bounds, the token bucket of the bandwidth cap, and source health (down after a transport
//! failure, with backoff; silent after [`SILENT_AFTER`] without an answer).

use super::*;

impl Worker {
    /// Sources with requests in flight, and since when they have answered nothing.
    pub(super) fn silent_since(&self) -> impl Iterator<Item = (NodeId, Instant)> + '_ {
        self.inflight_peer
            .iter()
            .filter(|(n, busy)| **busy > 0 && **n != self.me)
            .filter_map(|(n, _)| self.heard.get(n).map(|t| (*n, *t)))
    }

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

    /// Under a rate cap and with requests waiting: how long until the bucket allows the next one.
    pub(super) fn rate_wait(&self) -> Option<Duration> {
        let rate = self.cap()?.0 as f64;
        if self.queues.values().all(VecDeque::is_empty) || self.tokens > 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(
            (-self.tokens / rate).clamp(0.001, 1.0),
        ))
    }

    /// Sends the urgent requests, then queued ones while the bounds allow, round-robin over
    /// destinations.
    pub(super) fn pump(&mut self) {
        while let Some((to, epoch, gen, bytes)) = self.urgent.pop_front() {
            if self.is_down(&to) {
                continue; // the machine asks again, elsewhere, at its next timeout
            }
            let Some(r) = self.transfers.get_mut(&epoch).filter(|r| r.gen == gen) else {
                continue;
            };
            let dest = r.addrs.get(&to).copied();
            self.send(epoch, gen, to, dest, bytes);
        }
        loop {
            if self.inflight >= self.opts.max_requests.max(1)
                || self.pending_writes >= self.opts.max_pending_writes.max(1)
            {
                return;
            }
            let now = Instant::now();
            if let Some((rate, _)) = self.cap() {
                let burst = (rate as f64 / 10.0).max(self.reply_estimate);
                self.tokens =
                    (self.tokens + (now - self.tokens_at).as_secs_f64() * rate as f64).min(burst);
                self.tokens_at = now;
                if self.tokens <= 0.0 {
                    return;
                }
            } else {
                // No cap now: the bucket starts empty when one comes into force.
                self.tokens = 0.0;
                self.tokens_at = now;
            }
            let per_peer = self.opts.max_requests_per_peer.max(1);
            let ready = |n: &NodeId, q: &VecDeque<_>| {
                !q.is_empty() && self.inflight_peer.get(n).copied().unwrap_or(0) < per_peer
            };
            let after = self.last_peer;
            let pick = self
                .queues
                .iter()
                .filter(|(n, _)| after.is_none_or(|a| **n > a))
                .find(|(n, q)| ready(n, q))
                .or_else(|| self.queues.iter().find(|(n, q)| ready(n, q)))
                .map(|(n, _)| *n);
            let Some(to) = pick else {
                self.queues.retain(|_, q| !q.is_empty());
                return;
            };
            self.last_peer = Some(to);
            let Some((epoch, gen, bytes)) = self.queues.get_mut(&to).and_then(VecDeque::pop_front)
            else {
                continue;
            };
            let Some(r) = self.transfers.get_mut(&epoch).filter(|r| r.gen == gen) else {
                continue; // its run was abandoned
            };
            r.queued = r.queued.saturating_sub(1);
            let dest = r.addrs.get(&to).copied();
            self.send(epoch, gen, to, dest, bytes);
        }
    }

    pub(super) fn send(
        &mut self,
        epoch: Epoch,
        gen: u64,
        to: NodeId,
        dest: Option<(SocketAddr, VerifyingKey)>,
        bytes: Vec<u8>,
    ) {
        // Charged to the bucket now, settled against the reply's size when it comes.
        let reserved = self.reply_estimate;
        self.tokens -= reserved;
        self.inflight += 1;
        let busy = self.inflight_peer.entry(to).or_default();
        if *busy == 0 {
            self.heard.insert(to, Instant::now());
        }
        *busy += 1;
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

    pub(super) fn is_down(&self, n: &NodeId) -> bool {
        self.down
            .get(n)
            .is_some_and(|(until, _)| Instant::now() < *until)
    }

    /// A request to `n` failed in transport: send it nothing for a while (doubling while it stays
    /// unreachable, up to [`MAX_DOWN`]), drop what waits for it, and tell the machines
    /// ([`Transfer::peer_failed`]), which ask elsewhere at once what waited on it, so that a dead or
    /// silent source holds up neither the queue nor the machines' retransmissions.
    pub(super) fn mark_down(&mut self, n: NodeId) {
        let backoff = self
            .down
            .get(&n)
            .map_or(MIN_DOWN, |(_, b)| (*b * 2).min(MAX_DOWN));
        self.down.insert(n, (Instant::now() + backoff, backoff));
        let dropped = self.queues.remove(&n).unwrap_or_default();
        if !dropped.is_empty() {
            debug!(source = %n.short(), requests = dropped.len(), ?backoff, "source unreachable: requests to it dropped");
        }
        for (epoch, gen, _) in dropped {
            if let Some(r) = self.transfers.get_mut(&epoch).filter(|r| r.gen == gen) {
                r.queued = r.queued.saturating_sub(1);
            }
        }
        // The machines ask elsewhere now what waited on it, rather than at their next timeout.
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
