//! Requests and responses between honest peers.

mod common;

use std::time::Instant;

use common::{allow_all, bounded, client, echo_server, key, payload, server};
use dbqsfs_net::{Handler, NetError, Responder, TransportOptions};
use ed25519_dalek::VerifyingKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_0_1_and_1mib_round_trip() {
    bounded(async {
        let server = echo_server(1);
        let client = client(2, TransportOptions::default());
        for len in [0, 1, 1024 * 1024] {
            let msg = payload(len, len as u32);
            let started = Instant::now();
            let answer = client
                .request(server.local_addr(), &key(1).verifying_key(), &msg)
                .await
                .expect("echo");
            eprintln!("{len}-byte echo took {:?}", started.elapsed());
            assert_eq!(answer, msg);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_sees_the_authenticated_client_key() {
    bounded(async {
        let server = server(
            1,
            TransportOptions::default(),
            allow_all(),
            |peer: VerifyingKey, _request: Vec<u8>| async move { Some(peer.to_bytes().to_vec()) },
        );
        let client = client(2, TransportOptions::default());
        let answer = client
            .request(server.local_addr(), &key(1).verifying_key(), b"who am I")
            .await
            .expect("request");
        assert_eq!(answer, key(2).verifying_key().to_bytes().to_vec());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_share_one_connection() {
    bounded(async {
        let server = echo_server(1);
        let client = client(2, TransportOptions::default());
        let (addr, peer) = (server.local_addr(), key(1).verifying_key());
        let before = client
            .connection(addr, &peer)
            .await
            .expect("dial")
            .stable_id();

        // More requests than the server's 64 concurrent streams: the rest wait
        // for a stream slot instead of failing.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let client = client.clone();
            tasks.spawn(async move {
                let msg = payload(i as usize * 331, i);
                let answer = client.request(addr, &peer, &msg).await;
                (msg, answer)
            });
        }
        let mut answered = 0;
        while let Some(joined) = tasks.join_next().await {
            let (msg, answer) = joined.expect("task");
            assert_eq!(answer.expect("request"), msg);
            answered += 1;
        }
        assert_eq!(answered, 200);

        let after = client
            .connection(addr, &peer)
            .await
            .expect("cached")
            .stable_id();
        assert_eq!(before, after, "all requests went over the first connection");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_request_reuses_the_connection_and_a_closed_one_is_redialled() {
    bounded(async {
        let server = echo_server(1);
        let client = client(2, TransportOptions::default());
        let (addr, peer) = (server.local_addr(), key(1).verifying_key());

        client.request(addr, &peer, b"one").await.expect("first");
        let first = client.connection(addr, &peer).await.expect("cached");
        client.request(addr, &peer, b"two").await.expect("second");
        let again = client.connection(addr, &peer).await.expect("cached");
        assert_eq!(first.stable_id(), again.stable_id());

        first.close(0u32.into(), b"test closes it");
        assert_eq!(
            client
                .request(addr, &peer, b"three")
                .await
                .expect("re-dialled"),
            b"three"
        );
        let redialled = client.connection(addr, &peer).await.expect("cached");
        assert_ne!(first.stable_id(), redialled.stable_id());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_returning_none_gives_no_response() {
    bounded(async {
        let server = server(
            1,
            TransportOptions::default(),
            allow_all(),
            |_peer: VerifyingKey, _request: Vec<u8>| async move { None },
        );
        let client = client(2, TransportOptions::default());
        let result = client
            .request(server.local_addr(), &key(1).verifying_key(), b"anyone?")
            .await;
        assert!(matches!(result, Err(NetError::NoResponse)), "{result:?}");
    })
    .await;
}

/// Answers with the request repeated as many times as its first byte says.
struct Repeat;

impl Handler for Repeat {
    async fn handle(&self, _peer: VerifyingKey, request: Vec<u8>) -> Option<Vec<u8>> {
        Some(request)
    }

    async fn handle_stream(
        &self,
        _peer: VerifyingKey,
        request: Vec<u8>,
        out: &mut Responder,
    ) -> Result<(), NetError> {
        let times = request.first().copied().unwrap_or(0);
        for _ in 0..times {
            out.send(&request).await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_can_be_several_frames() {
    bounded(async {
        let server = server(1, TransportOptions::default(), allow_all(), Repeat);
        let client = client(2, TransportOptions::default());
        let (addr, peer) = (server.local_addr(), key(1).verifying_key());

        let mut frames = client
            .request_stream(addr, &peer, &[3, 9, 9])
            .await
            .expect("request");
        for _ in 0..3 {
            assert_eq!(frames.next().await.expect("frame"), Some(vec![3, 9, 9]));
        }
        assert_eq!(frames.next().await.expect("end"), None);
        assert_eq!(frames.next().await.expect("still the end"), None);

        let mut none = client
            .request_stream(addr, &peer, &[0])
            .await
            .expect("request");
        assert_eq!(none.next().await.expect("end"), None);

        // A plain request takes the first frame.
        assert_eq!(
            client.request(addr, &peer, &[2, 1]).await.expect("first"),
            vec![2, 1]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_the_limit_are_refused_on_both_sides() {
    bounded(async {
        let server = server(
            1,
            TransportOptions::default(),
            allow_all(),
            |_peer: VerifyingKey, _request: Vec<u8>| async move { Some(vec![7; 5000]) },
        );
        let small = TransportOptions {
            max_frame: 1000,
            ..TransportOptions::default()
        };
        let client = client(2, small);
        let (addr, peer) = (server.local_addr(), key(1).verifying_key());

        let too_big = client.request(addr, &peer, &[0; 1001]).await;
        assert!(
            matches!(
                too_big,
                Err(NetError::FrameTooLarge {
                    len: 1001,
                    max: 1000
                })
            ),
            "{too_big:?}"
        );
        let answer_too_big = client.request(addr, &peer, &[0; 10]).await;
        assert!(
            matches!(
                answer_too_big,
                Err(NetError::FrameTooLarge {
                    len: 5000,
                    max: 1000
                })
            ),
            "{answer_too_big:?}"
        );
    })
    .await;
}

/// Benchmark (run with `-- --ignored --nocapture`): 1 MiB requests with 8 in flight over one
/// loopback connection for 3 s: MB/s, and the CPU time per MiB of this process (which runs both
/// ends), i.e. what moving one MiB over QUIC costs the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_one_mib_requests() {
    struct Sink;
    impl dbqsfs_net::Handler for Sink {
        async fn handle(&self, _peer: VerifyingKey, _request: Vec<u8>) -> Option<Vec<u8>> {
            Some(Vec::new())
        }
    }
    let opts = TransportOptions::default();
    let server = server(1, opts.clone(), allow_all(), Sink);
    let client = std::sync::Arc::new(client(2, opts.clone()));
    let to = server.local_addr();
    let vk = key(1).verifying_key();
    let msg = std::sync::Arc::new(payload(1 << 20, 7));
    // Warm up: the connection, and path-MTU discovery.
    for _ in 0..20 {
        client.request(to, &vk, &msg).await.expect("request");
    }
    let cpu = || {
        let t = std::fs::read_to_string("/proc/self/stat").unwrap();
        let f: Vec<&str> = t.rsplit(')').next().unwrap().split_whitespace().collect();
        (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
    };
    let (c0, t0) = (cpu(), Instant::now());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, msg) = (client.clone(), msg.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while t0.elapsed().as_secs() < 3 {
                client.request(to, &vk, &msg).await.expect("request");
                n += 1;
            }
            n
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "1 MiB requests, 8 in flight: {:.0} MB/s, {:.2} ms CPU per MiB (client and server)",
        n as f64 * 1.048576 / secs,
        (cpu() - c0) * 1000.0 / n as f64
    );
}
