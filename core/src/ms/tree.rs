//! The push tree of the Membership Service: how a certified configuration reaches every member
//! without anyone sending it to all (docs/DESIGN.md §3, "Dissemination").

use crate::config::{Configuration, Member};
use crate::crypto::NodeId;

/// The members that `me` forwards a newly installed configuration to: its children in a binary
/// tree over the members ordered by BLAKE3(epoch ‖ id). The committee members that certified it
/// push to the root.
pub fn push_children(config: &Configuration, me: &NodeId) -> Vec<Member> {
    let order = tree_order(config);
    let Some(i) = order.iter().position(|m| m.id == *me) else {
        return Vec::new();
    };
    [2 * i + 1, 2 * i + 2]
        .into_iter()
        .filter_map(|j| order.get(j).cloned())
        .collect()
}

/// The members of `config` in the order of its push tree: BLAKE3(epoch ‖ id), so that the tree
/// differs per epoch and nobody chooses their place.
pub fn tree_order(config: &Configuration) -> Vec<Member> {
    use blake3::hazmat::{hash_derive_key_context, HasherExt};
    let context = hash_derive_key_context("dbqsfs 2026-11 push tree");
    let mut ranked: Vec<([u8; 32], Member)> = config
        .members
        .iter()
        .map(|m| {
            let mut h = blake3::Hasher::new_from_context_key(&context);
            h.update(&config.epoch.to_le_bytes());
            h.update(&m.id.0);
            (*h.finalize().as_bytes(), m.clone())
        })
        .collect();
    ranked.sort_by_key(|r| r.0);
    ranked.into_iter().map(|(_, m)| m).collect()
}
