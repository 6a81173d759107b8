//! Answering the MS messages of peers: refusing what their kind may not send (the core's
//! [`permitted`]), the answers that need no task state (probe challenges, configurations,
//! pushes), and the others handed to the task.

use super::*;
use dbqsfs_core::ms::pieces::piece;
use dbqsfs_core::ms::wire::permitted;
use dbqsfs_core::wire::{within, MAX_MESSAGE};

/// Bytes of configurations or deltas in one answer, at most (room left for the envelope and the
/// freshness certificate).
const ANSWER_BUDGET: usize = MAX_MESSAGE - 64 * 1024;

impl MsHandle {
    /// The head and encoding of the configuration of `epoch`, if the node holds it: the last
    /// few asked are kept, since an asker asks for their pieces one by one.
    async fn whole(&self, epoch: Epoch) -> Option<Whole> {
        if let Some(w) = self
            .whole
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&epoch)
        {
            return Some(w.clone());
        }
        let cc = self.shared.epochs.chain().get(epoch)?.clone();
        let w = Arc::new(
            tokio::task::spawn_blocking(move || ConfigHead::of(&cc))
                .await
                .ok()?,
        );
        self.whole
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(epoch, w.clone());
        Some(w)
    }
}

/// Answers the MS messages that need no task state, forwards the others. `peer` is the sender's
/// key, `kind` what it is to us.
pub async fn serve(ms: &MsHandle, peer: PublicKey, kind: Peer, bytes: &[u8]) -> Option<Vec<u8>> {
    let shared = &ms.shared;
    let env = match decode::<MsMessage>(bytes) {
        Ok(env) => env,
        Err(e) => {
            debug!(peer = %peer.node_id().short(), error = %e, "undecodable MS message");
            return None;
        }
    };
    let epoch = shared.epochs.epoch();
    if let Err(reason) = permitted(&env.msg, kind) {
        let reason = reason.to_string();
        return Some(encode_msg(epoch, MsMessage::Refused { reason }));
    }
    let answer = match env.msg {
        MsMessage::Challenge { epoch: e, nonce } => Some(MsMessage::ChallengeAnswer {
            sig: shared
                .me
                .key
                .sign(Domain::Probe, &probe_body(e, &nonce, &peer.node_id())),
        }),
        // Answers hold what fits in one message and name the newest epoch held; an asker that
        // gets no configuration while a newer one exists fetches the next one in pieces.
        MsMessage::ChainAfter { epoch: after } => {
            let chain = shared.epochs.chain();
            Some(MsMessage::Chain {
                configs: within(chain.after(after, MAX_CONFIGS), ANSWER_BUDGET),
                freshness: shared.epochs.freshness(),
                newest: chain.epoch(),
            })
        }
        MsMessage::DeltasAfter { epoch: after } => {
            let chain = shared.epochs.chain();
            Some(MsMessage::Deltas {
                deltas: within(deltas_after(&chain, after, MAX_CONFIGS), ANSWER_BUDGET),
                freshness: shared.epochs.freshness(),
                newest: chain.epoch(),
            })
        }
        MsMessage::HeadAsk { epoch: e } => Some(match ms.whole(e).await {
            Some(whole) => MsMessage::Head(Box::new(whole.0.clone())),
            None => MsMessage::Refused {
                reason: format!("this node holds no configuration of epoch {e}"),
            },
        }),
        MsMessage::PieceAsk {
            epoch: e,
            hash,
            index,
        } => Some(
            match ms
                .whole(e)
                .await
                .filter(|w| w.0.hash == hash)
                .and_then(|w| piece(&w.1, index).map(<[u8]>::to_vec))
            {
                Some(bytes) => MsMessage::Piece { index, bytes },
                None => MsMessage::Refused {
                    reason: format!("this node holds no piece {index} of that configuration"),
                },
            },
        ),
        MsMessage::Push { configs, freshness } => {
            if let Some(f) = freshness {
                shared.epochs.learn_freshness(f);
            }
            if !configs.is_empty() {
                let s = shared.clone();
                let from = peer.node_id();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = s.epochs.install(configs) {
                        debug!(peer = %from.short(), error = %e, "refused pushed configurations");
                    }
                })
                .await
                .ok()?;
            }
            None
        }
        MsMessage::PushDeltas { deltas, freshness } => {
            if let Some(f) = freshness {
                shared.epochs.learn_freshness(f);
            }
            if !deltas.is_empty() {
                let s = shared.clone();
                let from = peer.node_id();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = s.epochs.install_deltas(&deltas) {
                        debug!(peer = %from.short(), error = %e, "refused pushed configurations");
                    }
                })
                .await
                .ok()?;
            }
            None
        }
        msg @ (MsMessage::Submit(_)
        | MsMessage::ConfigShare { .. }
        | MsMessage::KeySign { .. }
        | MsMessage::KeyRoundAsk { .. }
        | MsMessage::FreshShare { .. }
        | MsMessage::Batches { .. }
        | MsMessage::Executed { .. }
        | MsMessage::StatusRequest
        | MsMessage::Leave) => ms.ask(peer, msg).await,
        MsMessage::ChallengeAnswer { .. }
        | MsMessage::Chain { .. }
        | MsMessage::Deltas { .. }
        | MsMessage::BatchLog { .. }
        | MsMessage::Status(_)
        | MsMessage::Leaving { .. }
        | MsMessage::Head(_)
        | MsMessage::Piece { .. }
        | MsMessage::KeyRound(_)
        | MsMessage::Refused { .. } => None,
    };
    answer.map(|m| encode_msg(epoch, m))
}
