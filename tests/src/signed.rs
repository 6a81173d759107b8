//! The "never sign two things for one slot" check of the agreement, shared by both simulators.
//!
//! Every agreement message a correct committee member sends is recorded here: a second, different
//! statement of that member for one slot (a pre-prepare, prepare or commit of one view and
//! sequence number, a checkpoint of one sequence number, a view change or new view for one view,
//! all within one epoch) is a violation, whatever happened to the member in between (crashes and
//! restarts included). This is what a member that forgot what it persisted would do.

use dbqsfs_core::config::Epoch;
use dbqsfs_core::ms::pbft::AgreementMessage;
use dbqsfs_core::wire::decode;
use std::collections::BTreeMap;

const KINDS: [&str; 7] = [
    "",
    "pre-prepares",
    "prepares",
    "commits",
    "checkpoints",
    "view changes",
    "new views",
];

/// What correct members signed: (member, epoch, kind, view, seq) → digest of the statement.
#[derive(Default)]
pub struct SignedLog {
    seen: BTreeMap<(usize, Epoch, u8, u64, u64), [u8; 32]>,
}

/// A statement's identity, for comparing two statements of one slot.
fn body_hash<T: serde::Serialize>(body: &T) -> [u8; 32] {
    let bytes = postcard::to_allocvec(body).expect("in-memory statements encode");
    *blake3::hash(&bytes).as_bytes()
}

impl SignedLog {
    /// Records what member `who` (signer index `index` in the committee of the message's epoch)
    /// signed in the agreement message `bytes`; returns the violations it shows.
    pub fn record(&mut self, who: usize, index: u32, bytes: &[u8]) -> Vec<String> {
        use AgreementMessage as M;
        let Ok(env) = decode::<AgreementMessage>(bytes) else {
            return Vec::new();
        };
        let mut statements: Vec<(u32, u8, u64, u64, [u8; 32])> = Vec::new();
        match &env.msg {
            M::PrePrepare { pre_prepare: p, .. } => {
                statements.push((p.signer, 1, p.body.view, p.body.seq, p.body.digest))
            }
            M::Prepare(p) => statements.push((p.signer, 2, p.body.view, p.body.seq, p.body.digest)),
            M::Commit(c) => statements.push((c.signer, 3, c.body.view, c.body.seq, c.body.digest)),
            M::Checkpoint(c) => statements.push((c.signer, 4, 0, c.body.seq, c.body.digest)),
            M::ViewChange { view_change: v, .. } => {
                statements.push((v.signer, 5, v.body.new_view, 0, body_hash(&v.body)))
            }
            M::NewView { new_view: v, .. } => {
                statements.push((v.signer, 6, v.body.view, 0, body_hash(&v.body)));
                for p in &v.body.pre_prepares {
                    statements.push((p.signer, 1, p.body.view, p.body.seq, p.body.digest));
                }
            }
            _ => {}
        }
        let mut violations = Vec::new();
        for (signer, kind, view, seq, digest) in statements {
            if signer != index {
                continue;
            }
            match self.seen.insert((who, env.epoch, kind, view, seq), digest) {
                Some(before) if before != digest => violations.push(format!(
                    "SAFETY: member {who} signed two different {} for view {view}, sequence number {seq} (epoch {})",
                    KINDS[kind as usize], env.epoch
                )),
                _ => {}
            }
        }
        violations
    }
}
