//! Misbehaving peers: the server survives and keeps serving honest ones.

mod common;

use std::net::UdpSocket;

use common::{bounded, client, echo_server, key, payload};
use dbqsfs_net::frame::read_frame;
use dbqsfs_net::{codes, Endpoint, NetError, TransportOptions, MAX_FRAME};

async fn assert_serves_honest_clients(server: &Endpoint) {
    let fresh = client(77, TransportOptions::default());
    let msg = payload(4096, 77);
    let answer = fresh
        .request(server.local_addr(), &key(1).verifying_key(), &msg)
        .await
        .expect("honest request after abuse");
    assert_eq!(answer, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_do_not_disturb_the_server() {
    bounded(async {
        let server = echo_server(1);
        let honest = client(2, TransportOptions::default());
        let (addr, server_key) = (server.local_addr(), key(1).verifying_key());
        honest
            .request(addr, &server_key, b"before")
            .await
            .expect("before");

        let junk = UdpSocket::bind("127.0.0.1:0").expect("bind junk socket");
        let mut datagrams: Vec<Vec<u8>> = vec![Vec::new(), vec![0], vec![0xff; 1500]];
        for i in 0..200u32 {
            let mut d = payload(1 + (i as usize * 37) % 1400, i);
            match i % 4 {
                // Long header, QUIC v1, garbage after.
                0 => d.splice(0..0, [0xc0, 0, 0, 0, 1]).for_each(drop),
                // Long header, unknown version (asks for version negotiation).
                1 => d
                    .splice(0..0, [0xc0, 0xba, 0xba, 0xba, 0xba])
                    .for_each(drop),
                // Short header.
                2 => d.splice(0..0, [0x40]).for_each(drop),
                _ => {}
            }
            datagrams.push(d);
        }
        for d in &datagrams {
            // A datagram the kernel refuses is just not sent; that is fine here.
            let _ = junk.send_to(d, addr);
        }

        honest
            .request(addr, &server_key, b"after")
            .await
            .expect("same client");
        assert_serves_honest_clients(&server).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_claiming_one_gib_is_refused_without_harm() {
    bounded(async {
        let server = echo_server(1);
        let attacker = client(2, TransportOptions::default());
        let (addr, server_key) = (server.local_addr(), key(1).verifying_key());
        let conn = attacker.connection(addr, &server_key).await.expect("dial");

        let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
        send.write_all(&(1u32 << 30).to_le_bytes())
            .await
            .expect("write header");
        let too_large = u64::from(codes::STREAM_FRAME_TOO_LARGE);
        // The server may refuse the stream as soon as it reads the header, before the body is
        // written: then the write itself sees the refusal.
        match send.write_all(&[0xaa; 1024]).await {
            Ok(()) => {
                let result = read_frame(&mut recv, MAX_FRAME).await;
                assert!(
                    matches!(result, Err(NetError::StreamAborted { code }) if code == too_large),
                    "{result:?}"
                );
            }
            Err(e) => {
                let stopped = NetError::from(e);
                assert!(
                    matches!(stopped, NetError::StreamAborted { code } if code == too_large),
                    "{stopped:?}"
                );
            }
        }

        // The same connection still carries honest requests, and so do new ones.
        let answer = attacker
            .request(addr, &server_key, b"sorry")
            .await
            .expect("same conn");
        assert_eq!(answer, b"sorry");
        assert_serves_honest_clients(&server).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_request_is_refused_without_harm() {
    bounded(async {
        let server = echo_server(1);
        let attacker = client(2, TransportOptions::default());
        let (addr, server_key) = (server.local_addr(), key(1).verifying_key());
        let conn = attacker.connection(addr, &server_key).await.expect("dial");

        let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
        send.write_all(&100u32.to_le_bytes()).await.expect("header");
        send.write_all(&[1; 10]).await.expect("part of the body");
        send.finish().expect("finish early");
        let result = read_frame(&mut recv, MAX_FRAME).await;
        assert!(
            matches!(result, Err(NetError::StreamAborted { code }) if code == u64::from(codes::STREAM_BAD_REQUEST)),
            "{result:?}"
        );

        // A stream finished with no request at all gets no answer.
        let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
        send.finish().expect("finish");
        assert!(matches!(read_frame(&mut recv, MAX_FRAME).await, Ok(None)));

        assert_serves_honest_clients(&server).await;
    })
    .await;
}
