//! Authentication (pinned keys) and authorization (the server's callback).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{bounded, client, echo_server, key, server};
use dbqsfs_net::{NetError, TransportOptions};
use ed25519_dalek::VerifyingKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialling_with_the_wrong_pinned_key_fails_the_handshake() {
    bounded(async {
        let server = echo_server(1);
        let client = client(2, TransportOptions::default());
        let impostor_expected = key(3).verifying_key();
        let result = client
            .request(server.local_addr(), &impostor_expected, b"hello")
            .await;
        assert!(matches!(result, Err(NetError::WrongPeerKey)), "{result:?}");

        // The server is unharmed and the right key still works.
        let answer = client
            .request(server.local_addr(), &key(1).verifying_key(), b"hello")
            .await
            .expect("right key");
        assert_eq!(answer, b"hello");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthorized_client_key_is_refused() {
    bounded(async {
        let member = key(2).verifying_key();
        let server = server(
            1,
            TransportOptions::default(),
            Arc::new(move |peer: &VerifyingKey| *peer == member),
            |_peer: VerifyingKey, request: Vec<u8>| async move { Some(request) },
        );
        let (addr, server_key) = (server.local_addr(), key(1).verifying_key());

        let stranger = client(9, TransportOptions::default());
        for _ in 0..2 {
            // Refused again after the re-dial, too.
            let result = stranger.request(addr, &server_key, b"let me in").await;
            assert!(matches!(result, Err(NetError::Unauthorized)), "{result:?}");
        }

        let member = client(2, TransportOptions::default());
        let answer = member
            .request(addr, &server_key, b"hi")
            .await
            .expect("member");
        assert_eq!(answer, b"hi");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_authorization_closes_existing_connections() {
    bounded(async {
        let allowed = Arc::new(AtomicBool::new(true));
        let gate = allowed.clone();
        let server = server(
            1,
            TransportOptions::default(),
            Arc::new(move |_: &VerifyingKey| gate.load(Ordering::SeqCst)),
            |_peer: VerifyingKey, request: Vec<u8>| async move { Some(request) },
        );
        let (addr, server_key) = (server.local_addr(), key(1).verifying_key());
        let client = client(2, TransportOptions::default());

        client
            .request(addr, &server_key, b"before")
            .await
            .expect("allowed");
        allowed.store(false, Ordering::SeqCst);
        let result = client.request(addr, &server_key, b"after").await;
        assert!(matches!(result, Err(NetError::Unauthorized)), "{result:?}");

        allowed.store(true, Ordering::SeqCst);
        let answer = client
            .request(addr, &server_key, b"again")
            .await
            .expect("re-admitted");
        assert_eq!(answer, b"again");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_only_endpoint_accepts_nothing() {
    bounded(async {
        let listener = client(1, TransportOptions::default());
        // serve() on a dial-only endpoint returns at once instead of accepting.
        listener
            .serve(|_peer: VerifyingKey, request: Vec<u8>| async move { Some(request) })
            .await
            .expect("serve task");
        let opts = TransportOptions {
            connect_timeout: std::time::Duration::from_secs(2),
            ..TransportOptions::default()
        };
        let dialler = client(2, opts);
        let result = dialler
            .request(listener.local_addr(), &key(1).verifying_key(), b"x")
            .await;
        assert!(result.is_err(), "{result:?}");
    })
    .await;
}
