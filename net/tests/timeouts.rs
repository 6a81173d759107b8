//! Timeouts: nothing waits forever on a silent peer.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{allow_all, bounded, client, key, server};
use dbqsfs_net::{NetError, TransportOptions};
use ed25519_dalek::VerifyingKey;
use tokio::sync::mpsc;

/// Sends on its channel when dropped, i.e. when the handler future is dropped.
struct DropSignal(mpsc::UnboundedSender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_times_out_when_the_handler_never_answers() {
    bounded(async {
        let (dropped_tx, mut dropped_rx) = mpsc::unbounded_channel();
        let server = server(
            1,
            TransportOptions::default(),
            allow_all(),
            move |_peer: VerifyingKey, request: Vec<u8>| {
                let signal = DropSignal(dropped_tx.clone());
                async move {
                    if request == b"hang" {
                        let _keep = signal;
                        std::future::pending::<()>().await;
                    }
                    Some(request)
                }
            },
        );
        let (addr, server_key) = (server.local_addr(), key(1).verifying_key());
        let impatient = client(
            2,
            TransportOptions {
                request_timeout: Duration::from_millis(500),
                ..TransportOptions::default()
            },
        );
        let before = impatient
            .connection(addr, &server_key)
            .await
            .expect("connect")
            .stable_id();
        let result = impatient.request(addr, &server_key, b"hang").await;
        assert!(matches!(result, Err(NetError::Timeout)), "{result:?}");
        // The timed-out connection is suspected dead and dropped: the next request dials afresh.
        let after = impatient
            .connection(addr, &server_key)
            .await
            .expect("connect")
            .stable_id();
        assert_ne!(
            before, after,
            "a request that timed out drops its cached connection"
        );
        assert_eq!(
            impatient
                .request(addr, &server_key, b"ok")
                .await
                .expect("answered"),
            b"ok"
        );

        // The server notices the requester left and drops the stuck handler.
        // (Handlers that answered drop their signal too; wait for the first.)
        dropped_rx.recv().await.expect("handler dropped");

        let patient = client(3, TransportOptions::default());
        let answer = patient
            .request(addr, &server_key, b"ping")
            .await
            .expect("still serving");
        assert_eq!(answer, b"ping");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_times_out_against_a_silent_address() {
    bounded(async {
        // A UDP socket that never answers stands in for a dead node.
        let silent = UdpSocket::bind("127.0.0.1:0").expect("bind silent socket");
        let client = client(
            2,
            TransportOptions {
                connect_timeout: Duration::from_millis(500),
                ..TransportOptions::default()
            },
        );
        let result = client
            .request(
                silent.local_addr().expect("addr"),
                &key(1).verifying_key(),
                b"hello?",
            )
            .await;
        assert!(
            matches!(result, Err(NetError::ConnectTimeout)),
            "{result:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_endpoint_refuses_to_dial() {
    bounded(async {
        let server = server(
            1,
            TransportOptions::default(),
            allow_all(),
            |_peer: VerifyingKey, request: Vec<u8>| async move { Some(request) },
        );
        let client = client(2, TransportOptions::default());
        let (addr, server_key) = (server.local_addr(), key(1).verifying_key());
        client
            .request(addr, &server_key, b"one")
            .await
            .expect("before close");

        client.close().await;
        let result = client.request(addr, &server_key, b"two").await;
        assert!(
            matches!(result, Err(NetError::EndpointClosed)),
            "{result:?}"
        );
        server.close().await;
    })
    .await;
}
