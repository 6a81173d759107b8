//! Shared fixtures for the transport tests. Everything runs on 127.0.0.1.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dbqsfs_net::{Authorizer, Endpoint, Handler, TransportOptions};
use ed25519_dalek::{SigningKey, VerifyingKey};

/// Upper bound on any single test body, so a bug shows up as a failure, not a hang.
pub const TEST_BOUND: Duration = Duration::from_secs(120);

/// A deterministic node key.
pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// 127.0.0.1 with an OS-chosen port.
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Lets every authenticated key in.
pub fn allow_all() -> Arc<dyn Authorizer> {
    Arc::new(|_: &VerifyingKey| true)
}

/// A serving endpoint on loopback.
pub fn server<H: Handler>(
    seed: u8,
    opts: TransportOptions,
    authorizer: Arc<dyn Authorizer>,
    handler: H,
) -> Endpoint {
    let ep = Endpoint::server(loopback(), key(seed), opts, authorizer).expect("bind server");
    ep.serve(handler);
    ep
}

/// A server answering every request with the request's own bytes.
pub fn echo_server(seed: u8) -> Endpoint {
    server(
        seed,
        TransportOptions::default(),
        allow_all(),
        |_peer: VerifyingKey, request: Vec<u8>| async move { Some(request) },
    )
}

/// A dial-only endpoint on loopback.
pub fn client(seed: u8, opts: TransportOptions) -> Endpoint {
    Endpoint::client(loopback(), key(seed), opts).expect("bind client")
}

/// Deterministic, non-repeating-looking test payload.
pub fn payload(len: usize, salt: u32) -> Vec<u8> {
    let mut x = salt.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Runs a test body under [`TEST_BOUND`].
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_BOUND, body)
        .await
        .expect("test body exceeded its time bound");
}
