//! Serving a request: who the peer is ([`Peer`]), which protocol it speaks, and the request
//! handed to the MS task, the transfer side, the control answers or the replica (on the blocking
//! pool: the store fsyncs), with the reply sent back.

use super::*;

/// Every key may connect: a joining node is in no configuration yet, and a node that left still
/// asks about what it collects. What a peer may ask is decided per message, by [`Serving::peer`].
/// Members, listed clients and this node itself get the transport's full budget, other keys the
/// strangers' small one. It holds the node weakly: the endpoint holds it, and the node's workers
/// hold the endpoint, so a strong reference would keep the socket bound after the node stopped.
pub(super) struct Trust(pub(super) std::sync::Weak<Serving>);

impl Authorizer for Trust {
    fn is_authorized(&self, _peer: &VerifyingKey) -> bool {
        true
    }

    fn is_trusted(&self, peer: &VerifyingKey) -> bool {
        self.0
            .upgrade()
            .is_some_and(|shared| shared.peer(&PublicKey(peer.to_bytes())) != Peer::Stranger)
    }
}

/// The protocol a request speaks, as metrics label it.
pub(super) fn protocol_of(request: &[u8]) -> &'static str {
    if is_ms(request) {
        "ms"
    } else if request.get(1) == Some(&<AgreementMessage as Protocol>::ID) {
        "agreement"
    } else if is_control(request) {
        "control"
    } else if transfer::is_transfer(request) {
        "transfer"
    } else {
        "dbqs"
    }
}

pub(super) async fn handle(
    shared: Arc<Serving>,
    ms: MsHandle,
    peer: VerifyingKey,
    protocol: &'static str,
    request: Vec<u8>,
) -> Option<Vec<u8>> {
    let key = PublicKey(peer.to_bytes());
    let from = key.node_id();
    let kind = shared.peer(&key);
    let peer_label = match kind {
        Peer::Member => "member",
        Peer::Client => "client",
        Peer::Myself => "self",
        Peer::Stranger => "stranger",
    };
    if is_ms(&request) {
        crate::metrics::request(peer_label, protocol);
        return crate::ms::serve(&ms, key, kind, &request).await;
    }
    if request.get(1) == Some(&<AgreementMessage as Protocol>::ID) {
        crate::metrics::request(peer_label, protocol);
        if kind == Peer::Member {
            ms.offer(Inbound::Agreement {
                from,
                bytes: request,
            });
        }
        return None;
    }
    if kind == Peer::Stranger {
        // A node that left still collects what it lost: it asks the members that took its ranges
        // over whether they hold them (an answer from memory, about what this node holds).
        if transfer::is_transfer(&request)
            && shared.epochs.was_member(&from)
            && transfer::is_have_query(&request)
        {
            return tokio::task::spawn_blocking(move || {
                transfer::serve(&shared.replica, from, &request)
            })
            .await
            .ok()
            .flatten();
        }
        debug!(peer = %from.short(), "request from a key that is neither a member nor a client: refused");
        // A block request is told so, and its client fails at once instead of timing out.
        return dbqsfs_core::dbqs::msg::refuse_unauthorized(&request);
    }
    if kind == Peer::Client && is_block_op(&request) {
        // Transfers yield to client traffic.
        shared.transfers.client_request();
    }
    crate::metrics::request(peer_label, protocol);
    let task = tokio::task::spawn_blocking(move || {
        if is_control(&request) {
            return control(&shared, from, &request);
        }
        if transfer::is_transfer(&request) {
            return transfer::serve(&shared.replica, from, &request);
        }
        let ((handled, miss), epoch) = {
            let r = shared.replica.read().unwrap_or_else(|p| p.into_inner());
            (r.handle_noting_miss(from, &request), r.epoch())
        };
        if let Some(x) = miss {
            // A read hit an object not transferred yet: fetch it ahead of its range.
            shared.transfers.fetch_now(epoch, x);
        }
        match handled {
            Handled::Reply(bytes) => {
                note_forgery(from, &bytes);
                Some(bytes)
            }
            Handled::Install(configs) => {
                if let Err(e) = shared.epochs.install(configs) {
                    debug!(peer = %from.short(), error = %e, "refused pushed configurations");
                }
                None
            }
            Handled::Dropped(reason) => {
                debug!(peer = %from.short(), ?reason, "dropped a message");
                None
            }
        }
    });
    match task.await {
        Ok(reply) => reply,
        Err(e) => {
            warn!(error = %e, "request handler failed");
            None
        }
    }
}

impl Serving {
    /// The node's state now (reads the replica under its read lock; blocking).
    pub fn status_parts(&self) -> StatusParts {
        let (epoch, ready, gc, deferred, members) = {
            let r = self.replica.read().unwrap_or_else(|p| p.into_inner());
            let deferred = r.deferred().len() as u64;
            (
                r.epoch(),
                r.is_ready(),
                self.transfers.gc_status(&r),
                deferred,
                r.chain().config().members.len(),
            )
        };
        let store = &self.store;
        let space = store.space().map_or(
            SpaceStatus {
                deferred,
                full: store.is_full(),
                ..SpaceStatus::default()
            },
            |s| SpaceStatus {
                free: s.free,
                size: s.size,
                reserve: s.reserve,
                deferred,
                full: store.is_full(),
            },
        );
        StatusParts {
            epoch,
            ready,
            gc,
            space,
            stored_bytes: store.content_bytes(),
            transfers: self.transfers.status(),
            members,
        }
    }
}

fn control(shared: &Serving, from: NodeId, request: &[u8]) -> Option<Vec<u8>> {
    let env = match decode::<ControlMessage>(request) {
        Ok(env) => env,
        Err(e) => {
            debug!(peer = %from.short(), error = %e, "undecodable control message");
            return None;
        }
    };
    match env.msg {
        ControlMessage::StatusRequest => {
            let s = shared.status_parts();
            let objects = shared.store.list().map(|l| l.len() as u64).unwrap_or(0);
            Some(encode_msg(
                s.epoch,
                ControlMessage::Status {
                    epoch: s.epoch,
                    stored_bytes: s.stored_bytes,
                    objects,
                    ready: s.ready,
                    transfers: s.transfers,
                    gc: s.gc,
                    space: s.space,
                },
            ))
        }
        ControlMessage::Status { .. } => None,
    }
}

/// Counts and logs (at most every 10 s, with how many since) requests refused for a signature
/// that does not verify: a client forging holds or releases in another owner's name.
fn note_forgery(from: NodeId, reply: &[u8]) {
    use dbqsfs_core::dbqs::msg::{DbqsMessage, Reject};
    use std::sync::atomic::{AtomicU64, Ordering};
    static SINCE: AtomicU64 = AtomicU64::new(0);
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    // A refusal is a few bytes; no other reply is decoded again.
    if reply.len() > 64 {
        return;
    }
    let forged = matches!(
        decode::<DbqsMessage>(reply).map(|e| e.msg),
        Ok(DbqsMessage::Rejected {
            reason: Reject::BadSignature,
            ..
        })
    );
    if !forged {
        return;
    }
    crate::metrics::forged_request();
    let n = SINCE.fetch_add(1, Ordering::Relaxed) + 1;
    let now = crate::volume::unix_ms();
    let last = LAST_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && LAST_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        SINCE.store(0, Ordering::Relaxed);
        warn!(peer = %from.short(), refused = n, "refused requests whose owner signature does not verify (forged holds or releases)");
    }
}
