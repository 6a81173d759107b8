//! Fetching one whole configuration in pieces ([`dbqsfs_core::ms::pieces`]): what a client does
//! when a configuration is too large for one answer, or when asked for a configuration whole.
//!
//! Goals: the head from the first member whose head verifies against the configuration before;
//! the pieces from several members at once (at most the core's window in flight), each checked on
//! arrival; a member that sends a wrong piece is not asked again; a member that does not answer
//! costs one piece timeout. Bounded: gives up after [`WHOLE_DEADLINE`] or when no member that did
//! not lie is left.
//!
//! Non-goals: choosing what to fetch (the caller), keeping pieces across runs.

use super::{member_addr, ClientError};
use dbqsfs_core::config::{CertifiedConfig, Configuration};
use dbqsfs_core::crypto::NodeId;
use dbqsfs_core::ms::pieces::{Download, PieceError, PIECE_TIMEOUT_MS};
use dbqsfs_core::ms::wire::MsMessage;
use dbqsfs_core::wire::{decode, encode_msg};
use dbqsfs_net::Endpoint;
use ed25519_dalek::VerifyingKey;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::debug;

/// The longest a whole configuration may take.
pub const WHOLE_DEADLINE: Duration = Duration::from_secs(60);
/// Members asked for pieces, at most (the committee first).
const MAX_SOURCES: usize = 32;
/// Members asked for the head, at most, one after another.
const HEAD_TRIES: usize = 8;

/// Fetches the certified configuration that follows `prev`, in pieces, from `prev`'s members;
/// `progress` is told (pieces held, pieces in all) as they come.
pub async fn fetch_whole(
    endpoint: &Endpoint,
    prev: &Configuration,
    mut progress: impl FnMut(u32, u32),
) -> Result<CertifiedConfig, ClientError> {
    let epoch = prev.epoch + 1;
    let mut members: Vec<_> = prev.members.iter().collect();
    members.sort_by_key(|m| !prev.committee.contains(&m.id));
    let sources: BTreeMap<NodeId, (SocketAddr, VerifyingKey)> = members
        .into_iter()
        .filter_map(|m| Some((m.id, member_addr(m).ok()?)))
        .take(MAX_SOURCES)
        .collect();
    if sources.is_empty() {
        return Err(ClientError::NoMembers);
    }
    let ask = |to: (SocketAddr, VerifyingKey), msg: MsMessage| {
        let endpoint = endpoint.clone();
        let req = encode_msg(prev.epoch, msg);
        async move {
            let timeout = Duration::from_millis(PIECE_TIMEOUT_MS);
            let resp = tokio::time::timeout(timeout, endpoint.request(to.0, &to.1, &req))
                .await
                .ok()?
                .ok()?;
            decode::<MsMessage>(&resp).ok().map(|env| env.msg)
        }
    };

    // The head, from the committee first.
    let mut download = None;
    let mut last = "no answer".to_string();
    for (id, to) in sources.iter().take(HEAD_TRIES) {
        match ask(*to, MsMessage::HeadAsk { epoch }).await {
            Some(MsMessage::Head(head)) => match Download::new(prev, *head) {
                Ok(d) => {
                    download = Some(d);
                    break;
                }
                Err(e) => {
                    debug!(member = %id.short(), error = %e, "refused a configuration head");
                    last = e.to_string();
                }
            },
            Some(MsMessage::Refused { reason }) => last = reason,
            _ => debug!(member = %id.short(), "no head"),
        }
    }
    let Some(mut d) = download else {
        return Err(ClientError::NoHead(epoch, last));
    };

    let ids: Vec<NodeId> = sources.keys().copied().collect();
    let hash = d.head().hash;
    let started = Instant::now();
    let mut in_flight = JoinSet::new();
    while !d.is_complete() {
        if started.elapsed() > WHOLE_DEADLINE || !d.can_go_on(&ids) {
            let (held, total) = d.progress();
            return Err(ClientError::Whole(PieceError::Incomplete { held, total }));
        }
        for a in d.asks(started.elapsed().as_millis() as u64, &ids) {
            let msg = MsMessage::PieceAsk {
                epoch,
                hash,
                index: a.index,
            };
            let req = ask(sources[&a.to], msg);
            in_flight.spawn(async move { (a, req.await) });
        }
        // Wakes for an answer, or after a short while to ask overdue pieces again.
        let Ok(Some(Ok((a, answer)))) =
            tokio::time::timeout(Duration::from_millis(250), in_flight.join_next()).await
        else {
            continue;
        };
        match answer {
            Some(MsMessage::Piece { index, bytes }) if index == a.index => {
                match d.on_piece(a.to, index, bytes) {
                    Ok(_) => {
                        let (held, total) = d.progress();
                        progress(held, total);
                    }
                    Err(e) => debug!(member = %a.to.short(), error = %e, "refused a piece"),
                }
            }
            _ => d.on_failed(a.to, a.index),
        }
    }
    Ok(d.finish(prev)?)
}
