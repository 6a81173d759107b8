//! Who a node is: its key, the key that signs admission certificates, and the address members are
//! told to reach it at. One value per node, shared by its serving ([`crate::node`]) and its
//! Membership Service task ([`crate::ms`]).

use dbqsfs_core::crypto::{Keypair, NodeId, PublicKey};
use std::net::SocketAddr;

/// Who a node is.
pub struct Identity {
    pub key: Keypair,
    /// The key that signs admission certificates.
    pub admission_key: PublicKey,
    /// The address this node listens on (as members are told to reach it).
    pub listen: SocketAddr,
}

impl Identity {
    pub fn id(&self) -> NodeId {
        self.key.node_id()
    }
}
